//! Parking, on the real binary: a saga whose next attempt is an hour away is let go from
//! sagad's memory (no owner, its timer in the database) instead of being held by a sleeping
//! driver, a cancel of it is still carried out at once, and a saga retrying every second is
//! kept by its driver. The poll interval is the default, 1 s: sagas waiting longer than 2 s
//! are parked.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use sagad_e2e::participant::{Script, default_answer};
use sagad_e2e::*;
use sagad_proto::v1::{CancelSagaRequest, SagaStatus};
use serde_json::json;
use sqlx::Connection as _;
use sqlx::postgres::PgConnection;
use uuid::Uuid;

/// Two steps on participant `p`; `b` is retried after `{delay}`.
fn definition(name: &str, delay: &str) -> String {
    format!(
        r#"
name = "{name}"
version = 1

[defaults]
timeout = "5s"
retry = {{ max_attempts = 0, initial_delay = "{delay}", multiplier = 1.0, max_delay = "{delay}", jitter = 0.0 }}
compensation_retry = {{ max_attempts = 0, initial_delay = "100ms", multiplier = 1.0, max_delay = "100ms", jitter = 0.0 }}

[[steps]]
name = "a"
participant = "p"
action = "DoA"
compensation = "UndoA"

[[steps]]
name = "b"
participant = "p"
action = "DoB"
compensation = "UndoB"
"#
    )
}

/// How long sagad may take to get somewhere on a loaded 2-core box.
const DEADLINE: Duration = Duration::from_secs(30);

/// A saga's row as the sweep sees it.
#[derive(Debug)]
struct Row {
    status: String,
    owner: Option<Uuid>,
    /// Seconds from the database's now to `wake_at`.
    due_in: Option<f64>,
}

async fn row(db: &mut PgConnection, saga_id: &str) -> anyhow::Result<Row> {
    let (status, owner, due_in): (String, Option<Uuid>, Option<f64>) = sqlx::query_as(
        "select status, owner, extract(epoch from wake_at - now())::float8 \
         from sagas where saga_id = $1",
    )
    .bind(Uuid::parse_str(saga_id)?)
    .fetch_one(db)
    .await?;
    Ok(Row {
        status,
        owner,
        due_in,
    })
}

/// `X step #attempt` for an execute, `C step #attempt` for a compensation.
/// What a test body gets: sagad's flags, where its logs go, its database, the participant.
struct World {
    args: Vec<String>,
    logs: PathBuf,
    db_url: String,
    participant: FakeParticipant,
}

impl World {
    /// sagad started, a client of it and a connection to its database.
    async fn sagad(&self) -> anyhow::Result<(SagadProcess, Client, PgConnection)> {
        let sagad = SagadProcess::start(&self.args, &self.logs).await?;
        let client = sagad.client().await?;
        let db = PgConnection::connect(&self.db_url).await?;
        Ok((sagad, client, db))
    }
}

/// Runs `body` with a fresh database, participant `p` answering as `script`, the `long` (1 h)
/// and `short` (1 s) saga types, and a log folder kept when it fails.
async fn with_world<F, Fut>(label: &str, script: Script, body: F) -> anyhow::Result<()>
where
    F: FnOnce(World) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut db = DatabaseGuard::new(label);
    let participant = FakeParticipant::start_scripted("p", script).await?;
    let defs = Scratch::defs(&[
        ("long.toml", &definition("long", "1h")),
        ("short.toml", &definition("short", "1s")),
    ])?;
    let mut logs = Scratch::logs(label)?;
    let args = vec![
        "--database-url".to_owned(),
        db.url(),
        "--defs".to_owned(),
        defs.display().to_string(),
        "--participant".to_owned(),
        participant.flag(),
    ];
    let world = World {
        args,
        logs: logs.to_path_buf(),
        db_url: db.url(),
        participant,
    };
    let outcome = match tokio::spawn(body(world)).await {
        Ok(outcome) => outcome,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(error) => Err(error.into()),
    };
    if outcome.is_err() {
        logs.keep();
        println!("logs kept in {}", logs.display());
    }
    db.drop_now().await?;
    outcome
}

#[tokio::test]
async fn a_saga_waiting_an_hour_is_parked_and_a_cancel_still_compensates_it_at_once()
-> anyhow::Result<()> {
    let b_fails: Script = Arc::new(|call: &CallRecord, _: &[CallRecord]| {
        if call.kind == CallKind::Execute && call.step == "b" {
            Answer::status(tonic::Code::Unavailable)
        } else {
            default_answer(call)
        }
    });
    with_world("parked", b_fails, |world| async move {
        let (mut sagad, mut client, mut db) = world.sagad().await?;
        let participant = &world.participant;
        let id = start_saga(&mut client, "long", json!({})).await?;

        // Parked: nobody owns it, and its timer says when the sweep is to claim it.
        let until = Instant::now() + DEADLINE;
        let parked = loop {
            let row = row(&mut db, &id).await?;
            if row.owner.is_none() {
                break row;
            }
            ensure!(
                Instant::now() < until,
                "not parked within {DEADLINE:?}: {row:?}, calls {:?}",
                call_trace(&participant.calls_for(&id))
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        println!("parked: {parked:?}");
        ensure!(parked.status == "RUNNING", "{parked:?}");
        let due_in = parked.due_in.context("a parked saga without a timer")?;
        ensure!(
            (3_500.0..=3_600.0).contains(&due_in),
            "a parked saga due in {due_in} s, not in about an hour"
        );
        // No longer driven here: the driver ended, and said why.
        let until = Instant::now() + DEADLINE;
        loop {
            let page = metrics::scrape(sagad.http_addr).await?;
            let parked = metrics::total(&page, "sagad_sagas_parked_total");
            let driven = metrics::total(&page, "sagad_sagas_driven");
            if parked == 1.0 && driven == 0.0 {
                break;
            }
            ensure!(
                Instant::now() < until,
                "parked {parked}, driven {driven} after {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ensure!(
            call_trace(&participant.calls_for(&id)) == ["X a #1", "X b #1"],
            "{:?}",
            call_trace(&participant.calls_for(&id))
        );

        // A cancel makes the parked saga due now: it is claimed and compensated at once.
        let cancelled_at = Instant::now();
        client
            .cancel_saga(CancelSagaRequest {
                saga_id: id.clone(),
                reason: "test cancels a parked saga".to_owned(),
            })
            .await?;
        let saga = wait_terminal(&mut client, &id, Duration::from_secs(60)).await?;
        let took = cancelled_at.elapsed();
        println!("a parked saga compensated {took:?} after its cancel");
        ensure!(
            saga.status == SagaStatus::Compensated as i32,
            "ended {:?}",
            SagaStatus::try_from(saga.status)
        );
        ensure!(
            call_trace(&participant.calls_for(&id)) == ["X a #1", "X b #1", "C b #1", "C a #1"],
            "{:?}",
            call_trace(&participant.calls_for(&id))
        );
        let page = metrics::scrape(sagad.http_addr).await?;
        let taken_over = metrics::total(&page, "sagad_sagas_taken_over_total");
        ensure!(
            taken_over == 1.0,
            "the sweep claimed {taken_over} sagas, not the parked one once"
        );
        if let Some(status) = sagad.exited()? {
            bail!("sagad exited with {status}");
        }
        sagad.terminate().await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_saga_retrying_every_second_is_not_parked() -> anyhow::Result<()> {
    // `b` fails its first three attempts.
    let b_fails_thrice: Script = Arc::new(|call: &CallRecord, earlier: &[CallRecord]| {
        let tries = earlier
            .iter()
            .filter(|other| other.idempotency_key == call.idempotency_key)
            .count();
        if call.kind == CallKind::Execute && call.step == "b" && tries < 3 {
            Answer::status(tonic::Code::Unavailable)
        } else {
            default_answer(call)
        }
    });
    with_world("not_parked", b_fails_thrice, |world| async move {
        let (mut sagad, mut client, mut db) = world.sagad().await?;
        let participant = &world.participant;
        let id = start_saga(&mut client, "short", json!({})).await?;

        // Its driver keeps it throughout: owned at every look until it has ended.
        let until = Instant::now() + DEADLINE;
        let mut looks = 0;
        loop {
            let row = row(&mut db, &id).await?;
            ensure!(
                row.owner.is_some(),
                "a saga waiting a second was let go: {row:?}, calls {:?}",
                call_trace(&participant.calls_for(&id))
            );
            looks += 1;
            if row.status != "RUNNING" {
                ensure!(row.status == "COMPLETED", "{row:?}");
                break;
            }
            ensure!(
                Instant::now() < until,
                "not completed within {DEADLINE:?}: {row:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!("owned at each of {looks} looks");
        ensure!(
            call_trace(&participant.calls_for(&id))
                == ["X a #1", "X b #1", "X b #2", "X b #3", "X b #4"],
            "{:?}",
            call_trace(&participant.calls_for(&id))
        );
        let page = metrics::scrape(sagad.http_addr).await?;
        let parked = metrics::total(&page, "sagad_sagas_parked_total");
        ensure!(parked == 0.0, "{parked} sagas parked");
        if let Some(status) = sagad.exited()? {
            bail!("sagad exited with {status}");
        }
        sagad.terminate().await?;
        Ok(())
    })
    .await
}
