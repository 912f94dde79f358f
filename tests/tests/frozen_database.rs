//! sagad's database frozen under load: every process of its private Postgres cluster is
//! SIGSTOPped for 20 s, so that nothing sagad asks is ever answered nor refused, while the
//! participants stay on the shared server. Meanwhile StartSaga, GetSaga and ListSagas must
//! answer UNAVAILABLE within seconds, the replica must drop its lease once it can no longer
//! trust it (`sagad_leases_lost_total` rises) and the process must stay up. After SIGCONT the
//! same process recovers and every saga ends as the demo domain says, money conserved. The
//! sibling of the restart test (`outage.rs`), where the server ends every session at once.
//!
//! A call sent after the freeze already waits for a connection, and the pool gives up on that
//! by itself; the calls that need a deadline of their own are those the database had received
//! when it froze. To have some for sure, the test holds a lock on `sagas` and `replicas` for a
//! moment before the freeze, so that one round of requests and the lease's renewal are in
//! Postgres's hands, waiting, when it stops.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use sagad_e2e::demo::{
    DemoOptions, DemoSystem, Pace, Planned, check_the_run, flags, mix, start_sagas,
};
use sagad_e2e::postgres::PrivateCluster;
use sagad_e2e::*;
use sagad_proto::v1::{GetSagaRequest, ListSagasRequest, StartSagaRequest};
use sqlx::postgres::PgConnection;

/// How long the database stays frozen.
const FREEZE: Duration = Duration::from_secs(20);

/// A request not answered within this while the database is frozen has hung.
const ANSWER_WITHIN: Duration = Duration::from_secs(15);

/// When the last round of requests goes out after the freeze: by then the lease (2 s) has run
/// out, so both sides of losing it are probed.
const LATE_ROUND: Duration = Duration::from_secs(4);

/// How long the lock is held before the freeze, at least: longer than the lease's renewal
/// period (a third of its 2 s), so that a renewal is waiting on it.
const PIN_AT_LEAST: Duration = Duration::from_millis(1_500);

/// The metric that counts the leases this replica gave up.
const LEASES_LOST: &str = "sagad_leases_lost_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_database_requests_fail_fast_the_lease_is_dropped_and_sagas_finish()
-> anyhow::Result<()> {
    let cluster = PrivateCluster::start().await?;
    let defs = repo_root().join("saga-defs");
    let options = DemoOptions {
        participant_args: flags(&["--latency-ms", "50"]),
        sagad_args: flags(&["--lease-ttl", "2s", "--poll-interval", "250ms"]),
        sagad_server: Some(cluster.server_url()),
        ..DemoOptions::default()
    };
    let mut system = DemoSystem::start("frozen", &defs, options).await?;
    let outcome = freeze_under_load(&mut system, &cluster).await;
    system.shut_down_after(outcome).await
}

async fn freeze_under_load(
    system: &mut DemoSystem,
    cluster: &PrivateCluster,
) -> anyhow::Result<()> {
    let planned = mix(15);
    let (before, after) = planned.split_at(48);
    // Three sagas asked for around the freeze, one per round of requests.
    let probes: Vec<Planned> = mix(1).into_iter().take(3).collect();
    let mut plans = start_sagas(system.servers(), before, Pace::ALL_AT_ONCE)
        .await?
        .plans;

    let mut db = system.orchestrator_db().await?;
    let unfinished: Vec<String> =
        sqlx::query_scalar("select saga_id::text from sagas where wake_at is not null")
            .fetch_all(&mut db)
            .await?;
    let Some(watched) = unfinished.first().cloned() else {
        bail!("every saga ended before the freeze: the test proves nothing");
    };
    let metrics_addr = system.replica(0)?.http_addr;
    let lost_before = metrics::total(&metrics::scrape(metrics_addr).await?, LEASES_LOST);
    let client = system.client().await?;

    // The first round and a renewal of the lease wait on the lock when the database freezes.
    let locked = lock(&mut db).await?;
    let waiting_before = waiting_on_lock(&mut db).await?;
    let pinned = tokio::spawn(one_round(
        client.clone(),
        watched.clone(),
        probes[0].clone(),
        "sent before the freeze",
    ));
    let waiting = wait_pinned(&mut db, waiting_before, locked).await?;

    cluster.freeze().await?;
    let frozen = Instant::now();
    println!(
        "database frozen with {} of {} sagas unfinished, {waiting} queries of sagad waiting in \
         it; {LEASES_LOST} {lost_before}",
        unfinished.len(),
        plans.len()
    );
    let problems = while_frozen(
        client.clone(),
        &watched,
        &probes[1..],
        metrics_addr,
        lost_before,
    )
    .await;
    let pinned = pinned.await;
    let exited = system.replica_exited(0)?;
    tokio::time::sleep(FREEZE.saturating_sub(frozen.elapsed())).await;
    cluster.thaw().await?;
    let thawed = Instant::now();
    println!("database thawed after {:?}", frozen.elapsed());
    sqlx::query("rollback").execute(&mut db).await?;
    drop(db);

    let mut problems = problems?;
    problems.extend(pinned?);
    if let Some(status) = exited {
        problems.push(format!(
            "sagad exited with {status} while its database was frozen"
        ));
    }
    ensure!(
        problems.is_empty(),
        "while the database was frozen, {} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );

    // The probes again with their keys, as a client told UNAVAILABLE would do, and new sagas.
    let mut client = client;
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
    println!(
        "StartSaga succeeded again {:?} after the thaw",
        thawed.elapsed()
    );
    plans.extend(
        start_sagas(system.servers(), after, Pace::ALL_AT_ONCE)
            .await?
            .plans,
    );
    let sagas = check_the_run(system, &plans).await?;
    println!(
        "every one of {} sagas ended as planned {:?} after the thaw",
        sagas.len(),
        thawed.elapsed()
    );
    if let Some(status) = system.replica_exited(0)? {
        bail!("sagad exited with {status}");
    }
    Ok(())
}

/// Takes `sagas` and `replicas` for this session alone, until its transaction ends; returns
/// when it got them.
async fn lock(db: &mut PgConnection) -> anyhow::Result<Instant> {
    sqlx::query("begin").execute(&mut *db).await?;
    sqlx::query("set local lock_timeout = '10s'")
        .execute(&mut *db)
        .await?;
    sqlx::query("lock table sagas, replicas in access exclusive mode")
        .execute(&mut *db)
        .await
        .context("locking sagas and replicas")?;
    Ok(Instant::now())
}

/// How many queries wait for the lock this session holds.
async fn waiting_on_lock(db: &mut PgConnection) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "select count(*) from pg_locks
         where not granted and relation in ('sagas'::regclass, 'replicas'::regclass)",
    )
    .fetch_one(db)
    .await?)
}

/// Waits until the round's three requests have joined the queries waiting on the lock, and a
/// renewal of the lease has had time to; returns how many wait. A request the pool turned away
/// meanwhile is not waited for long: the round still checks its answer.
async fn wait_pinned(
    db: &mut PgConnection,
    waiting_before: i64,
    locked: Instant,
) -> anyhow::Result<i64> {
    loop {
        let waiting = waiting_on_lock(db).await?;
        let joined = waiting >= waiting_before + 3;
        if (joined && locked.elapsed() >= PIN_AT_LEAST) || locked.elapsed() >= 3 * PIN_AT_LEAST {
            if !joined {
                println!(
                    "note: {waiting} queries wait on the lock, {waiting_before} did before the round"
                );
            }
            return Ok(waiting);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The frozen stretch: a round of StartSaga, GetSaga and ListSagas at once and another after
/// [`LATE_ROUND`], side by side with a watch on the lease metric. Returns what went wrong; an
/// error only when the metrics cannot be read at all.
async fn while_frozen(
    client: Client,
    watched: &str,
    probes: &[Planned],
    metrics_addr: SocketAddr,
    lost_before: f64,
) -> anyhow::Result<Vec<String>> {
    let frozen = Instant::now();
    let at_once = one_round(
        client.clone(),
        watched.to_owned(),
        probes[0].clone(),
        "sent at the freeze",
    );
    let late = async {
        tokio::time::sleep(LATE_ROUND).await;
        one_round(
            client.clone(),
            watched.to_owned(),
            probes[1].clone(),
            "sent 4 s into the freeze",
        )
        .await
    };
    let lease = async {
        loop {
            let lost = metrics::total(&metrics::scrape(metrics_addr).await?, LEASES_LOST);
            if lost > lost_before {
                println!(
                    "{LEASES_LOST} rose to {lost} {:?} after the freeze",
                    frozen.elapsed()
                );
                return anyhow::Ok(None);
            }
            if frozen.elapsed() >= FREEZE {
                return Ok(Some(format!(
                    "the lease was not dropped: {LEASES_LOST} stayed at {lost} through \
                     {FREEZE:?} of frozen database (lease TTL 2 s)"
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let (at_once, late, lease) = tokio::join!(at_once, late, lease);
    let mut problems = at_once;
    problems.extend(late);
    problems.extend(lease.context("reading sagad's metrics while the database was frozen")?);
    Ok(problems)
}

/// StartSaga, GetSaga and ListSagas side by side, each of which must answer UNAVAILABLE within
/// [`ANSWER_WITHIN`]; returns the problems.
async fn one_round(client: Client, watched: String, probe: Planned, round: &str) -> Vec<String> {
    let (mut start, mut get, mut list) = (client.clone(), client.clone(), client);
    let (started, got, listed) = tokio::join!(
        timed(round, "StartSaga", start.start_saga(request(&probe))),
        timed(
            round,
            "GetSaga",
            get.get_saga(GetSagaRequest {
                saga_id: watched,
                min_version: 0,
                wait_ms: 0,
                ..Default::default()
            })
        ),
        timed(
            round,
            "ListSagas",
            list.list_sagas(ListSagasRequest {
                page_size: 10,
                ..Default::default()
            })
        ),
    );
    [started, got, listed].into_iter().flatten().collect()
}

/// Times one request made around the freeze: `None` when it answered UNAVAILABLE in time,
/// else the problem.
async fn timed<T>(
    round: &str,
    name: &str,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Option<String> {
    let asked = Instant::now();
    let answer = tokio::time::timeout(ANSWER_WITHIN, call).await;
    let took = asked.elapsed();
    let problem = match answer {
        Err(_) => format!("{name} ({round}) did not answer within {ANSWER_WITHIN:?}: it hangs"),
        Ok(Ok(_)) => format!("{name} ({round}) answered success after {took:?}"),
        Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
            println!(
                "{name} ({round}): UNAVAILABLE after {took:?} ({})",
                status.message()
            );
            return None;
        }
        Ok(Err(status)) => {
            format!("{name} ({round}) answered {status} after {took:?}, want UNAVAILABLE")
        }
    };
    println!("{problem}");
    Some(problem)
}

fn request(plan: &Planned) -> StartSagaRequest {
    StartSagaRequest {
        saga_type: "order_fulfillment".to_owned(),
        idempotency_key: plan.idempotency_key.clone(),
        input: Some(to_struct(plan.input())),
        correlation_id: plan.idempotency_key.clone(),
    }
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
                return Err(status).context("StartSaga after the database thawed");
            }
        }
    }
}
