//! The grown database: many finished sagas and many waiting on an hour-long retry, loaded in
//! bulk by copying real sagas (their rows and their logs) under new ids, so that what sagad
//! meets is what it wrote itself.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use sagad_e2e::demo::DemoSystem;
use sagad_e2e::postgres::PrivateCluster;
use serde_json::{Value, json};
use sqlx::Connection as _;

/// How long the one real waiting saga may take to fail its first attempt.
const FIRST_ATTEMPT_WITHIN: Duration = Duration::from_secs(60);

/// Sagas copied per transaction.
const CHUNK: i64 = 50_000;

/// Finished sagas loaded between two progress lines.
const PROGRESS_EVERY: i64 = 100_000;

/// What was loaded, and how long it took.
#[derive(Debug, Clone)]
pub(crate) struct Growth {
    pub(crate) finished: u64,
    pub(crate) waiting: u64,
    pub(crate) load_seconds: f64,
    pub(crate) sagas_table_bytes: i64,
    pub(crate) events_table_bytes: i64,
}

impl Growth {
    pub(crate) fn json(&self) -> Value {
        json!({
            "finished_sagas": self.finished,
            "waiting_sagas": self.waiting,
            "load_seconds": self.load_seconds,
            "sagas_table_mib": self.sagas_table_bytes / (1024 * 1024),
            "events_table_mib": self.events_table_bytes / (1024 * 1024),
        })
    }
}

/// Loads `finished` finished sagas (copies of the ones the benchmark ran) and `waiting`
/// sagas waiting an hour (copies of one real saga of type `bench_waiting` whose first
/// attempt failed) into sagad's database.
pub(crate) async fn grow(
    cluster: &PrivateCluster,
    system: &DemoSystem,
    finished: u64,
    waiting: u64,
) -> anyhow::Result<Growth> {
    let began = Instant::now();
    let mut db = sqlx::PgConnection::connect(&format!("{}/sagad_test_bench", cluster.server_url()))
        .await
        .context("connecting to sagad's database")?;
    let waiting_template = start_waiting_saga(system, &mut db).await?;

    sqlx::query(
        "create temp table templates as
         select saga_id, row_number() over (order by saga_id) as n from sagas
         where status in ('COMPLETED', 'COMPENSATED')",
    )
    .execute(&mut db)
    .await?;
    let templates: i64 = sqlx::query_scalar("select count(*) from templates")
        .fetch_one(&mut db)
        .await?;
    ensure!(templates > 0, "no finished saga to copy");
    let mut copied: i64 = 0;
    let mut copy = 0_i64;
    let wanted = i64::try_from(finished).unwrap_or(i64::MAX);
    let mut next_report = PROGRESS_EVERY;
    while copied < wanted {
        copy += 1;
        let mut from = 1_i64;
        while from <= templates && copied < wanted {
            let count = CHUNK.min(templates - from + 1).min(wanted - copied);
            copy_sagas(&mut db, copy, from, from + count - 1).await?;
            copied += count;
            from += count;
        }
        if copied >= next_report || copied == wanted {
            eprintln!("  {copied} finished sagas loaded");
            next_report = copied + PROGRESS_EVERY;
        }
    }

    sqlx::query("create temp table waiting_template (saga_id uuid, n bigint)")
        .execute(&mut db)
        .await?;
    sqlx::query("insert into waiting_template values ($1::uuid, 1)")
        .bind(&waiting_template)
        .execute(&mut db)
        .await?;
    let mut loaded: i64 = 0;
    let wanted = i64::try_from(waiting).unwrap_or(i64::MAX);
    while loaded < wanted {
        let count = CHUNK.min(wanted - loaded);
        copy_waiting(&mut db, loaded + 1, loaded + count).await?;
        loaded += count;
    }
    eprintln!("  {loaded} waiting sagas loaded");
    sqlx::query("vacuum analyze sagas").execute(&mut db).await?;
    sqlx::query("vacuum analyze saga_events")
        .execute(&mut db)
        .await?;
    let (sagas_table_bytes, events_table_bytes): (i64, i64) = sqlx::query_as(
        "select pg_total_relation_size('sagas'), pg_total_relation_size('saga_events')",
    )
    .fetch_one(&mut db)
    .await?;
    Ok(Growth {
        finished: u64::try_from(copied).unwrap_or_default(),
        waiting: u64::try_from(loaded).unwrap_or_default(),
        load_seconds: began.elapsed().as_secs_f64(),
        sagas_table_bytes,
        events_table_bytes,
    })
}

/// Starts one `bench_waiting` saga and waits until its first attempt has failed and its next
/// is an hour away; its id.
async fn start_waiting_saga(
    system: &DemoSystem,
    db: &mut sqlx::PgConnection,
) -> anyhow::Result<String> {
    let started =
        crate::level::sagactl(system, &["start", "bench_waiting", "--input", "{}"]).await?;
    let saga_id = started
        .get("saga_id")
        .and_then(Value::as_str)
        .with_context(|| format!("no saga_id in {started}"))?
        .to_owned();
    let began = Instant::now();
    loop {
        let waits_long: Option<bool> = sqlx::query_scalar(
            "select wake_at > now() + interval '30 minutes' from sagas where saga_id = $1::uuid",
        )
        .bind(&saga_id)
        .fetch_optional(&mut *db)
        .await?
        .flatten();
        if waits_long == Some(true) {
            return Ok(saga_id);
        }
        ensure!(
            began.elapsed() < FIRST_ATTEMPT_WITHIN,
            "the waiting saga {saga_id} did not get its hour-long retry within {FIRST_ATTEMPT_WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Copies templates `from..=to` (rows of the temporary table `templates`) under new ids (a
/// hash of the template and `copy`), `copy` days older, in one transaction.
async fn copy_sagas(
    db: &mut sqlx::PgConnection,
    copy: i64,
    from: i64,
    to: i64,
) -> anyhow::Result<()> {
    let mut tx = db.begin().await?;
    sqlx::query(
        "insert into sagas (saga_id, saga_type, definition_version, status, input, context, steps,
                            failure_reason, version, correlation_id, idempotency_key, created_at,
                            updated_at, wake_at, owner, failing_since)
         select md5(s.saga_id::text || ':' || $1)::uuid, s.saga_type, s.definition_version,
                s.status, s.input, s.context, s.steps, s.failure_reason, s.version,
                md5(s.saga_id::text || ':' || $1)::uuid::text, null,
                s.created_at - make_interval(days => $1::int), s.updated_at - make_interval(days => $1::int),
                s.wake_at, null, s.failing_since
         from sagas s join templates t using (saga_id)
         where t.n between $2 and $3",
    )
    .bind(copy)
    .bind(from)
    .bind(to)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into saga_events (saga_id, seq, event_type, step, data, recorded_at, replica_id, format)
         select md5(e.saga_id::text || ':' || $1)::uuid, e.seq, e.event_type, e.step, e.data,
                e.recorded_at - make_interval(days => $1::int), e.replica_id, e.format
         from saga_events e join templates t using (saga_id)
         where t.n between $2 and $3",
    )
    .bind(copy)
    .bind(from)
    .bind(to)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Copies the waiting template as copies `from..=to`, with nobody owning them: a saga waiting
/// that long is not held by any replica.
async fn copy_waiting(db: &mut sqlx::PgConnection, from: i64, to: i64) -> anyhow::Result<()> {
    let mut tx = db.begin().await?;
    sqlx::query(
        "insert into sagas (saga_id, saga_type, definition_version, status, input, context, steps,
                            failure_reason, version, correlation_id, idempotency_key, created_at,
                            updated_at, wake_at, owner, failing_since)
         select md5(s.saga_id::text || ':' || c)::uuid, s.saga_type, s.definition_version,
                s.status, s.input, s.context, s.steps, s.failure_reason, s.version,
                md5(s.saga_id::text || ':' || c)::uuid::text, null, s.created_at, s.updated_at,
                s.wake_at, null, s.failing_since
         from sagas s join waiting_template t using (saga_id), generate_series($1::int8, $2::int8) c",
    )
    .bind(from)
    .bind(to)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into saga_events (saga_id, seq, event_type, step, data, recorded_at, replica_id, format)
         select md5(e.saga_id::text || ':' || c)::uuid, e.seq, e.event_type, e.step, e.data,
                e.recorded_at, e.replica_id, e.format
         from saga_events e join waiting_template t using (saga_id),
              generate_series($1::int8, $2::int8) c",
    )
    .bind(from)
    .bind(to)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}
