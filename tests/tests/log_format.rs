//! Logs written by an earlier release are read, and resumed, by this one.
//!
//! Each folder under `tests/fixtures/logs/` holds the sagas one release wrote (one file per
//! saga: its `sagas` row and `saga_events` rows as Postgres held them, and the definition it was
//! started from; `tests/examples/write_log_fixtures.rs` made them). Each folder gets a database
//! of its own, since two releases may reuse saga types, versions and idempotency keys. The
//! database is migrated up to the schema the rows were written under (`schema_version`), the
//! rows are inserted with exactly the columns they have, and sagad then runs the migrations that
//! came later: a column added since takes its default, and a later migration meets the old rows
//! as it would in production.
//!
//! Then two sagads run on it, one after the other:
//!
//! 1. **Read, held still.** Every participant call hangs (the unfinished fixtures' definitions
//!    give calls minutes), so nothing moves except what the test does. `GetSaga` must show each
//!    saga as its row has it (status, version, steps, failure reason, input, context, ids) and
//!    a history equal to its events; `ListSagas` must page through all of them. `CancelSaga`
//!    replays each log with this release's fold: an ended saga answers `FAILED_PRECONDITION`
//!    naming the status its row has, a compensating one is answered unchanged (nothing
//!    appended), and a running one whose retry is far off (more than [`PATIENCE`] after its
//!    last write) is cancelled, its `cancel_requested` appended on top of the old log.
//! 2. **Resume.** A new sagad with participants that succeed takes over the unfinished sagas:
//!    their owner in the fixture is a replica long dead. A cancelled one must end COMPENSATED
//!    through compensations only; one whose retry is due (or due within [`PATIENCE`]) must go
//!    on to its natural end (RUNNING: COMPLETED, COMPENSATING: COMPENSATED), its first call the
//!    attempt after the fixture's last one, under the same idempotency key, with the context
//!    the fixture's row holds. Every call names the action or compensation of the definition
//!    the saga started with, read from its snapshot in the log. The history must keep the old
//!    events and continue their seqs; the steps keep what they had done.
//!
//! Why this shape: the retry time lives in the log (`retry_at` inside an event) as well as in
//! the read model (`wake_at`), so making a far-off retry due by editing either would test an
//! edited log, not the old one. A cancel is the API's own way to move a waiting saga now, and
//! it exercises the whole resume path (replay, append after old seqs, takeover, compensation
//! calls built from the old outputs). The fixtures whose retry was due seconds after they were
//! written prove the forward and backward resumption as they are. A compensation waiting far
//! off cannot be hurried by any API: while its retry time is ahead, the check is that it is
//! left alone; once that time has passed (the fixture is an hour old), that it is resumed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use sagad_e2e::participant::default_answer;
use sagad_e2e::*;
use sagad_proto::v1::{CancelSagaRequest, ListSagasRequest, Saga, SagaStatus, StepStatus};
use serde_json::{Value, json};
use sqlx::Connection as _;
use sqlx::migrate::MigrateDatabase as _;
use tonic::Code;

/// How long a saga may take to get somewhere on a loaded 2-core box.
const DEADLINE: Duration = Duration::from_secs(60);

/// A retry due within this is waited for; one further off counts as far in the future.
const PATIENCE: Duration = Duration::from_secs(120);

/// Small pages, so that the listing really pages.
const PAGE_SIZE: u32 = 4;

/// One fixture file.
struct Fixture {
    file: PathBuf,
    /// The file as written, handed to Postgres as it is so stored values keep their form.
    text: String,
    doc: Value,
    /// The definition file the saga was started from.
    definition: toml::Table,
    saga_id: String,
    status: String,
    /// Seconds from the row's last write to its retry (`wake_at`), and from `loaded` to it.
    waits_for: Option<f64>,
    due_in: Option<f64>,
    loaded: Instant,
}

impl Fixture {
    fn load(file: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let doc: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", file.display()))?;
        let definition = toml::from_str(str_field(&doc, "definition_toml")?)
            .with_context(|| format!("{}: definition_toml", file.display()))?;
        let saga_id = str_field(&doc["saga"], "saga_id")?.to_owned();
        let status = str_field(&doc["saga"], "status")?.to_owned();
        let events = doc["events"].as_array().map_or(&[][..], Vec::as_slice);
        ensure!(!events.is_empty(), "{}: no events", file.display());
        // The writer sets both from one event: a file where they differ was edited by hand.
        for event in events {
            if let Some(tag) = event["data"]["type"].as_str() {
                ensure!(
                    event["event_type"] == tag,
                    "{}: event {} is stored as {} but its data is a {tag}",
                    file.display(),
                    event["seq"],
                    event["event_type"]
                );
            }
        }
        Ok(Self {
            file: file.to_owned(),
            text,
            doc,
            definition,
            saga_id,
            status,
            waits_for: None,
            due_in: None,
            loaded: Instant::now(),
        })
    }

    fn name(&self) -> String {
        self.file
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn row(&self) -> &Value {
        &self.doc["saga"]
    }

    fn events(&self) -> &[Value] {
        self.doc["events"].as_array().map_or(&[], Vec::as_slice)
    }

    fn version(&self) -> u64 {
        self.row()["version"].as_u64().unwrap_or_default()
    }

    fn is_ended(&self) -> bool {
        matches!(self.status.as_str(), "COMPLETED" | "COMPENSATED" | "FAILED")
    }

    /// A running saga whose retry is far off: the test cancels it instead of waiting.
    fn to_cancel(&self) -> bool {
        self.status == "RUNNING" && self.waits_for.unwrap_or_default() > PATIENCE.as_secs_f64()
    }

    /// The step the saga was busy with, and whether it was going backward.
    fn current_step(&self) -> anyhow::Result<(String, bool)> {
        let busy = if self.status == "RUNNING" {
            "RUNNING"
        } else {
            "COMPENSATING"
        };
        let step = self.row()["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|step| step["status"] == busy)
            .with_context(|| format!("{}: no step is {busy}", self.name()))?;
        Ok((str_field(step, "name")?.to_owned(), busy == "COMPENSATING"))
    }

    /// What the definition file names a call of `step` after: its action, or its compensation.
    fn asked(&self, step: &str, kind: CallKind) -> Option<&str> {
        let key = match kind {
            CallKind::Execute => "action",
            CallKind::Compensate => "compensation",
        };
        self.definition
            .get("steps")?
            .as_array()?
            .iter()
            .find(|s| s.get("name").and_then(toml::Value::as_str) == Some(step))?
            .get(key)?
            .as_str()
    }

    /// The row's attempts of `step` (forward or compensation).
    fn attempts(&self, step: &str, compensation: bool) -> u64 {
        let field = if compensation {
            "compensation_attempts"
        } else {
            "attempts"
        };
        self.row()["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == step)
            .and_then(|s| s[field].as_u64())
            .unwrap_or_default()
    }
}

fn str_field<'a>(value: &'a Value, field: &str) -> anyhow::Result<&'a str> {
    value[field]
        .as_str()
        .with_context(|| format!("no string {field:?} in {value}"))
}

/// A JSON document as the API carries it: a `Struct` (numbers become doubles; a non-object is
/// wrapped as `{"value": …}`), or nothing for null.
fn wire(value: &Value) -> Value {
    match value {
        Value::Null => Value::Null,
        Value::Object(_) => to_json(&Some(to_struct(value.clone()))),
        other => wire(&json!({ "value": other })),
    }
}

/// The context the row holds; a row of a release that builds the context when it is read
/// (its `context` is null) holds it as its input and its steps' outputs.
fn stored_context(row: &Value) -> Value {
    if !row["context"].is_null() {
        return row["context"].clone();
    }
    let outputs: serde_json::Map<String, Value> = row["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|step| !step["output"].is_null())
        .filter_map(|step| Some((step["name"].as_str()?.to_owned(), step["output"].clone())))
        .collect();
    json!({ "input": row["input"], "steps": outputs })
}

fn text_or_empty(value: &Value) -> Value {
    Value::String(value.as_str().unwrap_or_default().to_owned())
}

/// One event of a history: what the API shows of it.
fn event_view(seq: &Value, event_type: &Value, step: &Value, data: &Value) -> Value {
    let mut data = data.clone();
    if let Value::Object(fields) = &mut data {
        fields.remove("type");
    }
    json!({"seq": seq, "type": event_type, "step": text_or_empty(step), "data": wire(&data)})
}

/// The saga as `GetSaga` must show it, from the fixture's row and events.
fn expected_view(fixture: &Fixture) -> Value {
    let row = fixture.row();
    let steps: Vec<Value> = row["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|step| {
            json!({
                "name": step["name"],
                "participant": step["participant"],
                "status": format!("STEP_STATUS_{}", step["status"].as_str().unwrap_or_default()),
                "attempts": step["attempts"],
                "compensation_attempts": step["compensation_attempts"],
                "last_error": text_or_empty(&step["last_error"]),
                "output": wire(&step["output"]),
            })
        })
        .collect();
    let history: Vec<Value> = fixture
        .events()
        .iter()
        .map(|event| {
            event_view(
                &event["seq"],
                &event["event_type"],
                &event["step"],
                &event["data"],
            )
        })
        .collect();
    json!({
        "saga_type": row["saga_type"],
        "definition_version": row["definition_version"],
        "status": format!("SAGA_STATUS_{}", fixture.status),
        "version": row["version"],
        "failure_reason": text_or_empty(&row["failure_reason"]),
        "input": wire(&row["input"]),
        "context": wire(&stored_context(row)),
        "correlation_id": row["correlation_id"],
        "idempotency_key": text_or_empty(&row["idempotency_key"]),
        "steps": steps,
        "history": history,
    })
}

fn saga_status_name(status: i32) -> &'static str {
    SagaStatus::try_from(status)
        .unwrap_or(SagaStatus::Unspecified)
        .as_str_name()
}

/// The same fields, as the API answered.
fn actual_view(saga: &Saga) -> Value {
    let steps: Vec<Value> = saga
        .steps
        .iter()
        .map(|step| {
            json!({
                "name": step.name,
                "participant": step.participant,
                "status": StepStatus::try_from(step.status)
                    .unwrap_or(StepStatus::Unspecified)
                    .as_str_name(),
                "attempts": step.attempts,
                "compensation_attempts": step.compensation_attempts,
                "last_error": step.last_error,
                "output": to_json(&step.output),
            })
        })
        .collect();
    let history: Vec<Value> = saga
        .history
        .iter()
        .map(|event| {
            json!({
                "seq": event.seq,
                "type": event.r#type,
                "step": event.step,
                "data": to_json(&event.data),
            })
        })
        .collect();
    json!({
        "saga_type": saga.saga_type,
        "definition_version": saga.definition_version,
        "status": saga_status_name(saga.status),
        "version": saga.version,
        "failure_reason": saga.failure_reason,
        "input": to_json(&saga.input),
        "context": to_json(&saga.context),
        "correlation_id": saga.correlation_id,
        "idempotency_key": saga.idempotency_key,
        "steps": steps,
        "history": history,
    })
}

/// The fields of `actual` that differ from `expected`, one line each.
fn differences(expected: &Value, actual: &Value) -> Vec<String> {
    let (Value::Object(expected), Value::Object(actual)) = (expected, actual) else {
        return vec![format!("expected {expected}, got {actual}")];
    };
    expected
        .iter()
        .filter(|(key, value)| actual.get(*key) != Some(*value))
        .map(|(key, value)| {
            format!(
                "{key}: expected {value}, got {}",
                actual.get(key).unwrap_or(&Value::Null)
            )
        })
        .collect()
}

/// `"abc", "x_y"` → `"abc", "x_y"` quoted for SQL; only plain column names are accepted.
fn column_list(object: &Value, what: &str) -> anyhow::Result<String> {
    let fields = object
        .as_object()
        .with_context(|| format!("{what} is not an object"))?;
    let mut names = Vec::new();
    for name in fields.keys() {
        ensure!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{what}: {name:?} is not a column name"
        );
        names.push(format!("\"{name}\""));
    }
    Ok(names.join(", "))
}

/// Inserts the fixture's row and events with the columns they have, their values converted by
/// Postgres from the file's own text.
async fn insert(conn: &mut sqlx::PgConnection, fixture: &Fixture) -> anyhow::Result<()> {
    let name = fixture.name();
    let columns = column_list(fixture.row(), &format!("{name}: saga"))?;
    let sql = format!(
        "insert into sagas ({columns}) select {columns} \
         from jsonb_populate_record(null::sagas, $1::jsonb -> 'saga')"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&fixture.text)
        .execute(&mut *conn)
        .await
        .with_context(|| format!("{name}: inserting the saga row"))?;

    let first = &fixture.events()[0];
    let columns = column_list(first, &format!("{name}: event"))?;
    for event in fixture.events() {
        ensure!(
            column_list(event, &name)? == columns,
            "{name}: events with different columns"
        );
    }
    let sql = format!(
        "insert into saga_events ({columns}) select {columns} \
         from jsonb_populate_recordset(null::saga_events, $1::jsonb -> 'events')"
    );
    let inserted = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&fixture.text)
        .execute(&mut *conn)
        .await
        .with_context(|| format!("{name}: inserting the events"))?;
    ensure!(inserted.rows_affected() == fixture.events().len() as u64);
    Ok(())
}

/// Seconds from the row's last write to its retry, and from now to it (Postgres reads the
/// timestamps as they are written).
async fn timing(
    conn: &mut sqlx::PgConnection,
    fixture: &Fixture,
) -> anyhow::Result<(Option<f64>, Option<f64>)> {
    let row = fixture.row();
    let Some(wake_at) = row["wake_at"].as_str() else {
        return Ok((None, None));
    };
    let updated_at = str_field(row, "updated_at")?;
    Ok(sqlx::query_as(
        "select extract(epoch from $1::timestamptz - $2::timestamptz)::float8,
                extract(epoch from $1::timestamptz - now())::float8",
    )
    .bind(wake_at)
    .bind(updated_at)
    .fetch_one(&mut *conn)
    .await
    .map(|(waits, due): (f64, f64)| (Some(waits), Some(due)))?)
}

/// The definitions the fixtures were started from: file name → text, one file per saga type
/// and version.
fn definition_files(fixtures: &[Fixture]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    for fixture in fixtures {
        let text = str_field(&fixture.doc, "definition_toml")?;
        let file = format!(
            "{}_v{}.toml",
            str_field(fixture.row(), "saga_type")?,
            fixture.row()["definition_version"]
        );
        if let Some(known) = files.get(&file) {
            ensure!(
                known == text,
                "{}: another fixture has a different {file}",
                fixture.name()
            );
        }
        files.insert(file, text.to_owned());
    }
    Ok(files)
}

/// Every participant the definitions name.
fn participant_names(fixtures: &[Fixture]) -> BTreeSet<String> {
    fixtures
        .iter()
        .flat_map(|fixture| {
            fixture
                .definition
                .get("steps")
                .and_then(toml::Value::as_array)
                .into_iter()
                .flatten()
        })
        .filter_map(|step| step.get("participant").and_then(toml::Value::as_str))
        .map(str::to_owned)
        .collect()
}

/// A database of its own, with the fixtures in it at the schema they were written under.
async fn load_database(db: &DatabaseGuard, fixtures: &mut [Fixture]) -> anyhow::Result<()> {
    sqlx::Postgres::create_database(&db.url()).await?;
    let mut conn = sqlx::PgConnection::connect(&db.url()).await?;
    let versions: BTreeSet<Option<i64>> = fixtures
        .iter()
        .map(|fixture| fixture.doc["schema_version"].as_i64())
        .collect();
    ensure!(versions.len() == 1, "one folder, one schema: {versions:?}");
    let migrator = sqlx::migrate!("../migrations/orchestrator");
    match versions.into_iter().next().flatten() {
        Some(version) => migrator.run_to(version, &mut conn).await?,
        None => migrator.run(&mut conn).await?,
    }
    for fixture in fixtures.iter_mut() {
        insert(&mut conn, fixture).await?;
        (fixture.waits_for, fixture.due_in) = timing(&mut conn, fixture).await?;
        fixture.loaded = Instant::now();
    }
    conn.close().await?;
    Ok(())
}

async fn start_sagad(
    db: &DatabaseGuard,
    defs: &Path,
    participants: &[FakeParticipant],
) -> anyhow::Result<(TestDaemon, Client)> {
    let mut args = vec![
        "--database-url".to_owned(),
        db.url(),
        "--defs".to_owned(),
        defs.display().to_string(),
        "--poll-interval".to_owned(),
        "200ms".to_owned(),
        "--shutdown-grace".to_owned(),
        "1s".to_owned(),
    ];
    for participant in participants {
        args.extend(["--participant".to_owned(), participant.flag()]);
    }
    let daemon = TestDaemon::start(&args).await?;
    let client = daemon.client().await?;
    Ok((daemon, client))
}

async fn start_participants(
    names: &BTreeSet<String>,
    answer: fn(&CallRecord) -> Answer,
) -> anyhow::Result<Vec<FakeParticipant>> {
    let mut participants = Vec::new();
    for name in names {
        participants.push(
            FakeParticipant::start_scripted(name, Arc::new(move |call, _| answer(call))).await?,
        );
    }
    Ok(participants)
}

/// Every call made for the saga, in arrival order.
fn calls_for(participants: &[FakeParticipant], saga_id: &str) -> Vec<CallRecord> {
    let mut calls: Vec<CallRecord> = participants
        .iter()
        .flat_map(|participant| participant.calls_for(saga_id))
        .collect();
    calls.sort_by_key(|call| call.received_at);
    calls
}

/// Every saga `ListSagas` lists, page by page: id → (status, version).
async fn list_all(client: &mut Client) -> anyhow::Result<BTreeMap<String, (String, u64)>> {
    let mut listed = BTreeMap::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_sagas(ListSagasRequest {
                page_size: PAGE_SIZE,
                page_token,
                ..Default::default()
            })
            .await?
            .into_inner();
        pages += 1;
        ensure!(page.sagas.len() <= PAGE_SIZE as usize);
        for saga in &page.sagas {
            let status = saga_status_name(saga.status).to_owned();
            ensure!(
                listed
                    .insert(saga.saga_id.clone(), (status, saga.version))
                    .is_none(),
                "{} listed twice",
                saga.saga_id
            );
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    println!("ListSagas: {} sagas in {pages} pages", listed.len());
    Ok(listed)
}

async fn cancel(client: &mut Client, saga_id: &str) -> Result<Saga, tonic::Status> {
    client
        .cancel_saga(CancelSagaRequest {
            saga_id: saga_id.to_owned(),
            reason: "the log format test cancels".to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The history's first events are the fixture's, unchanged, and its seqs run on from them.
fn keeps_old_events(fixture: &Fixture, saga: &Saga) -> anyhow::Result<()> {
    let expected = expected_view(fixture)["history"].clone();
    let expected = expected.as_array().map_or(&[][..], Vec::as_slice);
    let actual = actual_view(saga)["history"].clone();
    let actual = actual.as_array().map_or(&[][..], Vec::as_slice);
    ensure!(
        actual.get(..expected.len()) == Some(expected),
        "{}: the history does not begin with the fixture's events: {actual:?}",
        fixture.name()
    );
    let seqs: Vec<u64> = saga.history.iter().map(|event| event.seq).collect();
    ensure!(
        seqs == (1..=saga.version).collect::<Vec<_>>(),
        "{}: history seqs {seqs:?}",
        fixture.name()
    );
    Ok(())
}

/// What the fixture's steps had done is still there after the saga went on: a step that had
/// succeeded keeps its attempts and output, and no count went down.
fn keeps_old_steps(fixture: &Fixture, saga: &Saga) -> anyhow::Result<()> {
    let before = expected_view(fixture)["steps"].clone();
    let after = actual_view(saga)["steps"].clone();
    let (Some(before), Some(after)) = (before.as_array(), after.as_array()) else {
        bail!("{}: no steps", fixture.name());
    };
    ensure!(
        before.len() == after.len(),
        "{}: steps {after:?}",
        fixture.name()
    );
    for (old, new) in before.iter().zip(after) {
        let grew = |field: &str| new[field].as_u64() >= old[field].as_u64();
        let kept = old["status"] != "STEP_STATUS_SUCCEEDED"
            || (new["output"] == old["output"] && new["attempts"] == old["attempts"]);
        ensure!(
            new["name"] == old["name"] && grew("attempts") && grew("compensation_attempts") && kept,
            "{}: step was {old}, is now {new}",
            fixture.name()
        );
    }
    Ok(())
}

/// Phase 1: reads every fixture through the API while nothing moves, and cancels.
async fn read_held_still(
    db: &DatabaseGuard,
    defs: &Path,
    fixtures: &[Fixture],
    names: &BTreeSet<String>,
) -> anyhow::Result<()> {
    let mut participants = start_participants(names, |_| Answer::hang()).await?;
    let (daemon, mut client) = start_sagad(db, defs, &participants).await?;

    for fixture in fixtures {
        let saga = get_saga(&mut client, &fixture.saga_id).await?;
        let wrong = differences(&expected_view(fixture), &actual_view(&saga));
        ensure!(
            wrong.is_empty(),
            "{}: GetSaga differs from the stored saga:\n{}",
            fixture.name(),
            wrong.join("\n")
        );
    }

    let listed = list_all(&mut client).await?;
    let expected: BTreeMap<String, (String, u64)> = fixtures
        .iter()
        .map(|f| {
            (
                f.saga_id.clone(),
                (format!("SAGA_STATUS_{}", f.status), f.version()),
            )
        })
        .collect();
    ensure!(
        listed == expected,
        "ListSagas: {listed:?}, expected {expected:?}"
    );

    // A running saga due soon is left to phase 2, to go on forward.
    for fixture in fixtures
        .iter()
        .filter(|f| f.status != "RUNNING" || f.to_cancel())
    {
        let name = fixture.name();
        let answer = cancel(&mut client, &fixture.saga_id).await;
        if fixture.is_ended() {
            let status = answer
                .err()
                .with_context(|| format!("{name}: an ended saga was cancelled"))?;
            // The refusal names the status the log folds to: the row's.
            ensure!(
                status.code() == Code::FailedPrecondition
                    && status.message().contains(&fixture.status),
                "{name}: CancelSaga of a {} saga answered {status:?}",
                fixture.status
            );
            continue;
        }
        let saga = answer.with_context(|| format!("{name}: CancelSaga"))?;
        keeps_old_events(fixture, &saga)?;
        if fixture.status == "COMPENSATING" {
            ensure!(
                saga.status == SagaStatus::Compensating as i32 && saga.version == fixture.version(),
                "{name}: a compensating saga must be answered unchanged, got {} v{}",
                saga_status_name(saga.status),
                saga.version
            );
        } else {
            ensure!(
                saga.status == SagaStatus::Compensating as i32
                    && saga
                        .history
                        .get(fixture.events().len())
                        .map(|e| e.r#type.as_str())
                        == Some("cancel_requested"),
                "{name}: cancelled to {} with history {:?}",
                saga_status_name(saga.status),
                saga.history.iter().map(|e| &e.r#type).collect::<Vec<_>>()
            );
        }
    }
    for fixture in fixtures.iter().filter(|f| f.is_ended()) {
        let calls = calls_for(&participants, &fixture.saga_id);
        ensure!(
            calls.is_empty(),
            "{}: an ended saga was called",
            fixture.name()
        );
    }

    daemon.stop().await?;
    for participant in &mut participants {
        participant.stop();
    }
    Ok(())
}

/// What phase 2 must make of an unfinished fixture.
enum Outcome {
    /// Cancelled in phase 1: compensations only, then COMPENSATED.
    Compensated,
    /// Due: the step it was busy with goes on, then this status.
    Resumed(SagaStatus),
    /// Due far in the future: left alone.
    Held,
}

fn outcome(fixture: &Fixture) -> Outcome {
    if fixture.to_cancel() {
        Outcome::Compensated
    } else if fixture.due_in.unwrap_or_default() > PATIENCE.as_secs_f64() {
        Outcome::Held
    } else if fixture.status == "RUNNING" {
        Outcome::Resumed(SagaStatus::Completed)
    } else {
        Outcome::Resumed(SagaStatus::Compensated)
    }
}

/// Phase 2: a new sagad takes the unfinished sagas over and drives them to their end.
async fn resume(
    db: &DatabaseGuard,
    defs: &Path,
    fixtures: &[Fixture],
    names: &BTreeSet<String>,
) -> anyhow::Result<()> {
    let mut participants = start_participants(names, default_answer).await?;
    let (daemon, mut client) = start_sagad(db, defs, &participants).await?;

    for fixture in fixtures.iter().filter(|f| !f.is_ended()) {
        let name = fixture.name();
        let outcome = outcome(fixture);
        let expected = match outcome {
            Outcome::Held => continue,
            Outcome::Compensated => SagaStatus::Compensated,
            Outcome::Resumed(status) => status,
        };
        let wait = DEADLINE + Duration::from_secs_f64(fixture.due_in.unwrap_or_default().max(0.0));
        let since = Instant::now();
        wait_terminal(&mut client, &fixture.saga_id, wait)
            .await
            .with_context(|| format!("{name}: not resumed"))?;
        let saga = get_saga(&mut client, &fixture.saga_id).await?;
        ensure!(
            saga.status == expected as i32,
            "{name}: ended {}, expected {expected:?}: {}",
            saga_status_name(saga.status),
            actual_view(&saga)
        );
        keeps_old_events(fixture, &saga)?;
        keeps_old_steps(fixture, &saga)?;
        let calls = calls_for(&participants, &fixture.saga_id);
        let context = wire(&stored_context(fixture.row()));
        let first = calls
            .first()
            .with_context(|| format!("{name}: no participant was called"))?;
        ensure!(
            first.input == context,
            "{name}: the first call's context {} is not the stored context {context}",
            first.input
        );
        // Each call as the saga's own snapshot of its definition has it.
        for call in &calls {
            ensure!(
                fixture.asked(&call.step, call.kind) == Some(call.action.as_str())
                    && call.correlation_id == fixture.row()["correlation_id"]
                    && call.idempotency_key
                        == format!(
                            "{}/{}/{}",
                            fixture.saga_id,
                            call.step,
                            match call.kind {
                                CallKind::Execute => "execute",
                                CallKind::Compensate => "compensate",
                            }
                        ),
                "{name}: call {call:?}"
            );
        }
        match outcome {
            Outcome::Compensated => {
                for call in &calls {
                    ensure!(
                        call.kind == CallKind::Compensate
                            && u64::from(call.attempt) == fixture.attempts(&call.step, true) + 1,
                        "{name}: after a cancel, {:?} {} #{}",
                        call.kind,
                        call.step,
                        call.attempt
                    );
                }
            }
            Outcome::Resumed(_) => {
                let (step, backward) = fixture.current_step()?;
                let kind = if backward {
                    CallKind::Compensate
                } else {
                    CallKind::Execute
                };
                ensure!(
                    first.kind == kind
                        && first.step == step
                        && u64::from(first.attempt) == fixture.attempts(&step, backward) + 1,
                    "{name}: resumed with {:?} {} #{}, expected {kind:?} {step} #{}",
                    first.kind,
                    first.step,
                    first.attempt,
                    fixture.attempts(&step, backward) + 1
                );
            }
            Outcome::Held => {}
        }
        println!(
            "{name}: {} -> {} in {:.1?}, {} calls, v{} -> v{}",
            fixture.status,
            saga_status_name(saga.status),
            since.elapsed(),
            calls.len(),
            fixture.version(),
            saga.version
        );
    }

    // Left alone: ended sagas, and retries still far off (checked last, after the others ran).
    let listed = list_all(&mut client).await?;
    for fixture in fixtures {
        let name = fixture.name();
        let held = !fixture.is_ended() && matches!(outcome(fixture), Outcome::Held);
        if !fixture.is_ended() && !held {
            continue;
        }
        let calls = calls_for(&participants, &fixture.saga_id);
        let (status, version) = listed
            .get(&fixture.saga_id)
            .with_context(|| format!("{name}: not listed"))?;
        if held {
            let saga = get_saga(&mut client, &fixture.saga_id).await?;
            let due = str_field(fixture.row(), "wake_at")?;
            if *version == fixture.version() && calls.is_empty() {
                keeps_old_events(fixture, &saga)?;
                println!("{name}: waits for its retry at {due}, left alone");
                continue;
            }
            // Only a test slower than the retry is far off may see it taken.
            let became_due =
                fixture.loaded.elapsed().as_secs_f64() >= fixture.due_in.unwrap_or_default();
            ensure!(
                became_due,
                "{name}: driven before its retry time {due}: {status} v{version}, {} calls",
                calls.len()
            );
            println!("{name}: its retry at {due} came during the test; taken over");
            continue;
        }
        ensure!(
            calls.is_empty() && *version == fixture.version(),
            "{name}: an ended saga moved: {status} v{version}, {} calls",
            calls.len()
        );
    }

    daemon.stop().await?;
    for participant in &mut participants {
        participant.stop();
    }
    Ok(())
}

/// The fixture folders, each with its files, sorted.
fn fixture_folders() -> anyhow::Result<Vec<(PathBuf, Vec<PathBuf>)>> {
    let root = repo_root().join("tests/fixtures/logs");
    let mut folders = Vec::new();
    for entry in std::fs::read_dir(&root).with_context(|| format!("reading {}", root.display()))? {
        let path = entry?.path();
        if !path.is_dir() {
            continue;
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&path)?
            .map(|entry| entry.map(|entry| entry.path()))
            .collect::<Result<_, _>>()?;
        files.retain(|file| file.extension().is_some_and(|ext| ext == "json"));
        files.sort();
        folders.push((path, files));
    }
    folders.sort();
    ensure!(
        !folders.is_empty(),
        "no fixture folders in {}",
        root.display()
    );
    Ok(folders)
}

#[tokio::test]
async fn logs_of_every_earlier_release_are_read_and_resumed() -> anyhow::Result<()> {
    let started = Instant::now();
    for (folder, files) in fixture_folders()? {
        let since = Instant::now();
        ensure!(!files.is_empty(), "{}: no fixtures", folder.display());
        let mut fixtures = files
            .iter()
            .map(|file| Fixture::load(file))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let definitions = definition_files(&fixtures)?;
        let names = participant_names(&fixtures);
        let definitions: Vec<(&str, &str)> = definitions
            .iter()
            .map(|(file, text)| (file.as_str(), text.as_str()))
            .collect();
        let defs = Scratch::defs(&definitions)?;
        let mut db = DatabaseGuard::new("log_format");
        load_database(&db, &mut fixtures).await?;

        let loaded = since.elapsed();
        read_held_still(&db, &defs, &fixtures, &names).await?;
        let read = since.elapsed();
        resume(&db, &defs, &fixtures, &names).await?;
        println!(
            "{}: {} fixtures loaded in {loaded:.1?}, read in {:.1?}, resumed in {:.1?}",
            folder.display(),
            fixtures.len(),
            read - loaded,
            since.elapsed() - read
        );
        db.drop_now().await?;
    }
    println!("log format test: {:.1?}", started.elapsed());
    Ok(())
}
