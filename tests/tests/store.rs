//! The store against a real Postgres. Group commit: a write whose data the database refuses
//! (here a NUL character, which the API would have refused at the edge) fails alone; the
//! writes committed in the same batch go through. Takeover: no saga is left owned by a dead
//! replica. Parking: a saga is let go only by its owner, under a live lease, at the version its
//! driver read, and only when it is not due soon. Plans: the writer's, made once, still find
//! sagas by key in a large table. History: a read up to a version stops there. In the
//! group-commit test, on a current-thread runtime, every write is queued before the writer task
//! first runs, so they all land in one batch.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use sagad::definition::SagaDefinition;
use sagad::saga::{Event, Saga};
use sagad::store::{
    Fence, Parking, Projection, SagaWrite, Store, StoreError, WriteOutcome, Writer,
};
use sagad_e2e::DatabaseGuard;
use serde_json::{Value, json};
use sqlx::Connection as _;
use uuid::Uuid;

const DEFINITION: &str = r#"
name = "poison"
version = 1

[[steps]]
name = "only"
participant = "p"
action = "Do"
"#;

/// The first write of a new saga with this input, as the engine makes it.
fn start(definition: &SagaDefinition, replica_id: Uuid, input: Value) -> anyhow::Result<SagaWrite> {
    let saga_id = Uuid::now_v7();
    let input = Arc::new(input);
    let event = Event::SagaStarted {
        saga_type: definition.name.clone(),
        definition: Arc::new(definition.clone()),
        input: Arc::clone(&input),
        correlation_id: saga_id.to_string(),
        idempotency_key: String::new(),
        trace_parent: None,
    };
    let saga = Saga::started(saga_id, &event)?;
    Ok(SagaWrite {
        saga_id,
        expected_version: 0,
        replica_id,
        fence: Fence::Owner,
        events: vec![event],
        projection: Projection {
            saga_type: definition.name.clone(),
            definition_version: definition.version,
            status: saga.status(),
            input,
            steps: saga.step_views(),
            failure_reason: None,
            version: saga.version,
            correlation_id: saga_id.to_string(),
            idempotency_key: None,
            wake_at: None,
            failing_since: None,
        },
    })
}

#[tokio::test(flavor = "current_thread")]
async fn a_poison_write_fails_alone_and_the_writes_beside_it_commit() -> anyhow::Result<()> {
    let mut db = DatabaseGuard::new("poison");
    let store = Store::connect(&db.url(), Duration::from_secs(30)).await?;
    let (writer, writer_task) = Writer::spawn(store.clone());
    let replica_id = store.register_replica(Duration::from_secs(60)).await?;
    let definition = SagaDefinition::from_toml_str(DEFINITION, "poison.toml")?;

    let mut writes = Vec::new();
    for n in 0..20 {
        writes.push(start(
            &definition,
            replica_id,
            json!({"customer_id": format!("c-{n}")}),
        )?);
    }
    let poison = start(&definition, replica_id, json!({"customer_id": "bad\u{0}"}))?;
    let poison_id = poison.saga_id;
    writes.insert(7, poison);

    let mut answers = tokio::task::JoinSet::new();
    for write in writes {
        let writer = writer.clone();
        answers.spawn(async move { (write.saga_id, writer.write(write).await) });
    }
    let mut problems = Vec::new();
    let mut written = 0;
    while let Some(answer) = answers.join_next().await {
        let (saga_id, outcome) = answer?;
        match outcome {
            Ok(WriteOutcome::Written) if saga_id != poison_id => written += 1,
            Err(StoreError::Rejected(error)) if saga_id == poison_id => {
                println!("the poison write alone failed: {error}");
            }
            other => problems.push(format!("{saga_id}: {other:?}")),
        }
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    ensure!(written == 20, "{written} of 20 good writes committed");
    ensure!(
        store.get_saga(poison_id).await?.is_none(),
        "the poison saga was recorded"
    );

    drop(writer);
    writer_task.await.context("the writer task")?;
    store.close().await;
    db.drop_now().await
}

/// A history read up to a version returns the events that version reflects and none after,
/// so an answer pairs a row read first with its own events even when the saga moved on between
/// the two reads.
#[tokio::test(flavor = "current_thread")]
async fn a_history_read_up_to_a_version_stops_there() -> anyhow::Result<()> {
    let mut db = DatabaseGuard::new("history_through");
    let store = Store::connect(&db.url(), Duration::from_secs(30)).await?;
    let (writer, writer_task) = Writer::spawn(store.clone());
    let replica_id = store.register_replica(Duration::from_secs(60)).await?;
    let definition = SagaDefinition::from_toml_str(DEFINITION, "poison.toml")?;

    let first = start(&definition, replica_id, json!({"customer_id": "c-1"}))?;
    let saga_id = first.saga_id;
    let mut saga = Saga::started(
        saga_id,
        first.events.first().context("a start has its event")?,
    )?;
    let mut projection = first.projection.clone();
    ensure!(matches!(writer.write(first).await?, WriteOutcome::Written));
    let events = saga.cancel("the test cancels", "the test", chrono::Utc::now())?;
    let started_at = saga.version;
    for event in &events {
        saga.apply(event)?;
    }
    projection.status = saga.status();
    projection.steps = saga.step_views();
    projection.version = saga.version;
    let moved_on = SagaWrite {
        saga_id,
        expected_version: started_at,
        replica_id,
        fence: Fence::Request,
        events,
        projection,
    };
    ensure!(matches!(
        writer.write(moved_on).await?,
        WriteOutcome::Written
    ));
    ensure!(saga.version > started_at, "the cancel appended nothing");

    let seqs = |events: Vec<sagad::store::EventRecord>| -> Vec<u64> {
        events.iter().map(|event| event.seq).collect()
    };
    let up_to_start = store.history_after(saga_id, 0, started_at, None).await?;
    ensure!(
        seqs(up_to_start.clone()) == (1..=started_at).collect::<Vec<_>>(),
        "up to version {started_at}: {:?}",
        seqs(up_to_start)
    );
    let whole = store.history_after(saga_id, 0, u64::MAX, None).await?;
    ensure!(
        seqs(whole.clone()) == (1..=saga.version).collect::<Vec<_>>(),
        "the whole history: {:?}",
        seqs(whole)
    );
    let after_start = store
        .history_after(saga_id, started_at, saga.version, Some(1))
        .await?;
    ensure!(
        seqs(after_start.clone()) == vec![started_at + 1],
        "one event after the start: {:?}",
        seqs(after_start)
    );

    drop(writer);
    writer_task.await.context("the writer task")?;
    store.close().await;
    db.drop_now().await
}

/// A saga recorded under a replica id that is no longer alive is taken over: whether its start
/// committed after the lease had expired and the sweep had let go of the replica's sagas (a
/// request that waited out a database outage), or just before the expiry, with nobody looking.
#[tokio::test(flavor = "current_thread")]
async fn a_saga_started_under_an_expired_lease_is_taken_over() -> anyhow::Result<()> {
    let mut db = DatabaseGuard::new("expired_start");
    let store = Store::connect(&db.url(), Duration::from_secs(30)).await?;
    let (writer, writer_task) = Writer::spawn(store.clone());
    let definition = SagaDefinition::from_toml_str(DEFINITION, "poison.toml")?;
    let expired = store.register_replica(Duration::from_secs(60)).await?;
    let survivor = store.register_replica(Duration::from_secs(60)).await?;

    // Started just before the lease expires: the sweep that follows lets it go.
    let mut before = start(&definition, expired, json!({"customer_id": "before"}))?;
    before.projection.wake_at = Some(chrono::Utc::now());
    let before_id = before.saga_id;
    ensure!(matches!(writer.write(before).await?, WriteOutcome::Written));
    let mut conn = sqlx::PgConnection::connect(&db.url()).await?;
    sqlx::query("update replicas set lease_expires_at = clock_timestamp() where replica_id = $1")
        .bind(expired)
        .execute(&mut conn)
        .await?;
    let released = store.reap_dead_replicas().await?;
    ensure!(
        released == 1,
        "the sweep let go of {released} sagas, want 1"
    );

    // Started after the sweep: recorded with nobody owning it.
    let mut after = start(&definition, expired, json!({"customer_id": "after"}))?;
    after.projection.wake_at = Some(chrono::Utc::now());
    let after_id = after.saga_id;
    ensure!(matches!(writer.write(after).await?, WriteOutcome::Written));
    store.reap_dead_replicas().await?;

    let mut claimed = store
        .claim_orphans(survivor, 64, Duration::from_secs(60))
        .await?;
    claimed.sort();
    let mut want = vec![before_id, after_id];
    want.sort();
    ensure!(
        claimed == want,
        "the live replica took over {claimed:?}, want both sagas {want:?}"
    );

    drop(writer);
    writer_task.await.context("the writer task")?;
    store.close().await;
    db.drop_now().await
}

/// `Store::park` lets a waiting saga go (no owner, its timer kept) only for its owner under a
/// live lease, at the version the driver read, and when it is not due within the margin given;
/// the sweep leaves it be until it is due.
#[tokio::test(flavor = "current_thread")]
async fn a_saga_is_parked_only_by_its_live_owner_at_its_version_and_not_due_soon()
-> anyhow::Result<()> {
    let mut db = DatabaseGuard::new("park");
    let store = Store::connect(&db.url(), Duration::from_secs(30)).await?;
    let (writer, writer_task) = Writer::spawn(store.clone());
    let definition = SagaDefinition::from_toml_str(DEFINITION, "poison.toml")?;
    let owner = store.register_replica(Duration::from_secs(60)).await?;
    let other = store.register_replica(Duration::from_secs(60)).await?;
    let margin = Duration::from_secs(2);
    let in_an_hour = chrono::Utc::now() + chrono::Duration::hours(1);
    let waiting = |customer: &str| -> anyhow::Result<SagaWrite> {
        let mut write = start(&definition, owner, json!({ "customer_id": customer }))?;
        write.projection.wake_at = Some(in_an_hour);
        Ok(write)
    };
    let parked = waiting("parked")?;
    let parked_id = parked.saga_id;
    let version = parked.projection.version;
    ensure!(matches!(writer.write(parked).await?, WriteOutcome::Written));
    let orphaned = waiting("orphaned")?;
    let orphaned_id = orphaned.saga_id;
    ensure!(matches!(
        writer.write(orphaned).await?,
        WriteOutcome::Written
    ));

    let far = Duration::from_secs(7200);
    let tries = [
        ("another replica", version, other, margin, Parking::Fenced),
        (
            "another version",
            version + 1,
            owner,
            margin,
            Parking::Moved,
        ),
        (
            "due within two hours",
            version,
            owner,
            far,
            Parking::DueSoon,
        ),
        ("its owner", version, owner, margin, Parking::Parked),
    ];
    for (what, version, replica, due_after, want) in tries {
        let got = store.park(parked_id, version, replica, due_after).await?;
        ensure!(got == want, "parking by {what}: {got:?}, want {want:?}");
    }
    let mut conn = sqlx::PgConnection::connect(&db.url()).await?;
    let (owner_now, wake_at): (Option<Uuid>, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("select owner, wake_at from sagas where saga_id = $1")
            .bind(parked_id)
            .fetch_one(&mut conn)
            .await?;
    ensure!(owner_now.is_none(), "a parked saga owned by {owner_now:?}");
    ensure!(
        wake_at.is_some_and(|at| (at - in_an_hour).num_milliseconds().abs() < 1),
        "a parked saga's timer moved to {wake_at:?} from {in_an_hour}"
    );
    let claimed = store
        .claim_orphans(other, 64, Duration::from_secs(1))
        .await?;
    ensure!(
        claimed.is_empty(),
        "the sweep claimed {claimed:?}, due in an hour"
    );

    sqlx::query("update replicas set lease_expires_at = clock_timestamp() where replica_id = $1")
        .bind(owner)
        .execute(&mut conn)
        .await?;
    let late = store.park(orphaned_id, version, owner, margin).await?;
    ensure!(
        late == Parking::Fenced,
        "parking under an expired lease: {late:?}"
    );

    drop(writer);
    writer_task.await.context("the writer task")?;
    store.close().await;
    db.drop_now().await
}

/// How the `sagas` table has been read and written, as the server's statistics have it.
#[derive(Debug, Clone, Copy, sqlx::FromRow)]
struct TableReads {
    seq_scan: i64,
    n_tup_ins: i64,
    n_tup_upd: i64,
}

/// Reads the statistics until `settled` holds: a backend reports its counts only some seconds
/// after its transactions, so this waits for the writer's to arrive.
async fn table_reads_once(
    conn: &mut sqlx::PgConnection,
    settled: impl Fn(&TableReads) -> bool,
) -> anyhow::Result<TableReads> {
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let reads: TableReads = sqlx::query_as(
            "select coalesce(seq_scan, 0) as seq_scan, n_tup_ins, n_tup_upd
             from pg_stat_user_tables where relname = 'sagas'",
        )
        .fetch_one(&mut *conn)
        .await?;
        if settled(&reads) {
            return Ok(reads);
        }
        ensure!(
            tokio::time::Instant::now() < until,
            "the statistics never showed the writes: {reads:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The writer's statements run on plans made once, not knowing a batch's size; in a table of
/// thousands of sagas its updates must still find each saga by its key, not read the whole
/// table for every batch.
#[tokio::test(flavor = "current_thread")]
async fn the_writer_finds_sagas_by_key_in_a_table_of_thousands() -> anyhow::Result<()> {
    const STORED: i64 = 3000;
    const UPDATES: i64 = 20;
    let mut db = DatabaseGuard::new("writer_plan");
    let store = Store::connect(&db.url(), Duration::from_secs(30)).await?;
    let (writer, writer_task) = Writer::spawn(store.clone());
    let replica_id = store.register_replica(Duration::from_secs(60)).await?;
    let definition = SagaDefinition::from_toml_str(DEFINITION, "poison.toml")?;
    let mut conn = sqlx::PgConnection::connect(&db.url()).await?;
    sqlx::query(
        "insert into sagas (saga_id, saga_type, definition_version, status, input, steps,
                            version, correlation_id)
         select gen_random_uuid(), 'poison', 1, 'COMPLETED', '{}', '[]', 1, 'stored'
         from generate_series(1, $1)",
    )
    .bind(STORED)
    .execute(&mut conn)
    .await?;
    sqlx::query("analyze sagas").execute(&mut conn).await?;
    sqlx::query("select pg_stat_force_next_flush()")
        .execute(&mut conn)
        .await?;

    let first = start(&definition, replica_id, json!({"customer_id": "c-plan"}))?;
    let mut again = first.clone();
    let outcome = writer.write(first).await?;
    ensure!(outcome == WriteOutcome::Written, "the start: {outcome:?}");
    let before = table_reads_once(&mut conn, |reads| reads.n_tup_ins > STORED).await?;

    // Writes with no events: each updates the saga's row at its version, a batch of its own.
    again.expected_version = again.projection.version;
    again.events.clear();
    for _ in 0..UPDATES {
        let outcome = writer.write(again.clone()).await?;
        ensure!(outcome == WriteOutcome::Written, "an update: {outcome:?}");
    }
    let after = table_reads_once(&mut conn, |reads| {
        reads.n_tup_upd >= before.n_tup_upd + UPDATES
    })
    .await?;
    ensure!(
        after.seq_scan == before.seq_scan,
        "{UPDATES} updates in a table of {STORED} sagas read the whole table {} times",
        after.seq_scan - before.seq_scan
    );

    drop(writer);
    writer_task.await.context("the writer task")?;
    store.close().await;
    db.drop_now().await
}
