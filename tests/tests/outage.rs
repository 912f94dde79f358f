//! sagad's database restarted under load: sagad's Postgres is a private cluster this test
//! starts, stops (`pg_ctl stop -m fast`, which ends every session) and starts again on the same
//! port and data folder, while the participants stay on the shared server. While the database
//! is down StartSaga must answer UNAVAILABLE, promptly, never a success; afterwards the same
//! sagad process reconnects and every saga ends as the demo domain says, money conserved.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use sagad_e2e::demo::{
    DemoOptions, DemoSystem, Pace, Planned, check_the_run, flags, mix, start_sagas,
};
use sagad_e2e::postgres::PrivateCluster;
use sagad_e2e::*;
use sagad_proto::v1::StartSagaRequest;

/// How long the database stays down.
const OUTAGE: Duration = Duration::from_secs(3);

/// A StartSaga that takes longer than this while the database is down has hung.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load_every_saga_finishes() -> anyhow::Result<()> {
    let cluster = PrivateCluster::start().await?;
    let defs = repo_root().join("saga-defs");
    let options = DemoOptions {
        participant_args: flags(&["--latency-ms", "50"]),
        sagad_server: Some(cluster.server_url()),
        ..DemoOptions::default()
    };
    let mut system = DemoSystem::start("outage", &defs, options).await?;
    let outcome = restart_postgres_under_load(&mut system, &cluster).await;
    system.shut_down_after(outcome).await
}

async fn restart_postgres_under_load(
    system: &mut DemoSystem,
    cluster: &PrivateCluster,
) -> anyhow::Result<()> {
    let planned = mix(15);
    let (before, after) = planned.split_at(48);
    // Two sagas that complete, asked for while the database is down.
    let probes: Vec<Planned> = mix(1).into_iter().take(2).collect();
    let mut plans = start_sagas(system.servers(), before, Pace::ALL_AT_ONCE)
        .await?
        .plans;

    let mut db = system.orchestrator_db().await?;
    let in_flight: i64 = sqlx::query_scalar("select count(*) from sagas where wake_at is not null")
        .fetch_one(&mut db)
        .await?;
    drop(db);
    ensure!(
        in_flight > 0,
        "every saga ended before the outage: the test proves nothing"
    );
    cluster.stop().await?;
    let stopped = Instant::now();
    println!(
        "database stopped with {in_flight} of {} sagas unfinished",
        plans.len()
    );
    // Once at once, once after sagad has had time to notice; side by side, so that a slow
    // answer does not stretch the outage.
    let mut client = system.client().await?;
    let mut later = client.clone();
    tokio::try_join!(start_while_down(&mut client, &probes[0]), async {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        start_while_down(&mut later, &probes[1]).await
    })?;
    tokio::time::sleep(OUTAGE.saturating_sub(stopped.elapsed())).await;

    cluster.start_again().await?;
    let restarted = Instant::now();
    println!("database started again after {:?}", stopped.elapsed());
    if let Some(status) = system.replica_exited(0)? {
        bail!("sagad exited with {status} while its database was down");
    }

    // New sagas once sagad has reconnected (start_sagas retries UNAVAILABLE meanwhile), and
    // the probes again with their keys, as a client told UNAVAILABLE would do.
    plans.extend(
        start_sagas(system.servers(), after, Pace::ALL_AT_ONCE)
            .await?
            .plans,
    );
    for probe in &probes {
        let (saga_id, created) = start_again(&mut client, probe).await?;
        if !created {
            println!(
                "note: the saga {} was told UNAVAILABLE, yet it was recorded",
                probe.idempotency_key
            );
        }
        plans.insert(saga_id, probe.clone());
    }

    let sagas = check_the_run(system, &plans).await?;
    println!(
        "every one of {} sagas ended as planned {:?} after the database came back",
        sagas.len(),
        restarted.elapsed()
    );
    if let Some(status) = system.replica_exited(0)? {
        bail!("sagad exited with {status}");
    }
    Ok(())
}

fn request(plan: &Planned) -> StartSagaRequest {
    StartSagaRequest {
        saga_type: "order_fulfillment".to_owned(),
        idempotency_key: plan.idempotency_key.clone(),
        input: Some(to_struct(plan.input())),
        correlation_id: plan.idempotency_key.clone(),
    }
}

/// StartSaga while the database is down: UNAVAILABLE within [`ANSWER_WITHIN`].
async fn start_while_down(client: &mut Client, plan: &Planned) -> anyhow::Result<()> {
    let asked = Instant::now();
    match tokio::time::timeout(ANSWER_WITHIN, client.start_saga(request(plan))).await {
        Err(_) => bail!("StartSaga did not answer within {ANSWER_WITHIN:?} with the database down"),
        Ok(Ok(reply)) => bail!(
            "StartSaga answered success ({}) with the database down",
            reply.into_inner().saga_id
        ),
        Ok(Err(status)) => {
            ensure!(
                status.code() == tonic::Code::Unavailable,
                "StartSaga with the database down answered {status}, want UNAVAILABLE"
            );
            println!(
                "StartSaga with the database down: UNAVAILABLE after {:?} ({})",
                asked.elapsed(),
                status.message()
            );
        }
    }
    Ok(())
}

/// The same StartSaga once the database is back: the saga id, and whether this call made it.
async fn start_again(client: &mut Client, plan: &Planned) -> anyhow::Result<(String, bool)> {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        match client.start_saga(request(plan)).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                return Ok((reply.saga_id, reply.created));
            }
            Err(status) if status.code() == tonic::Code::Unavailable && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => {
                return Err(status).context("StartSaga after the database came back");
            }
        }
    }
}
