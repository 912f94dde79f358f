//! Writes the committed fixtures of the stored saga log: runs one saga per scenario on an
//! in-process sagad with scripted participants, and dumps each saga's `sagas` row and
//! `saga_events` rows exactly as Postgres holds them (its own JSON of every column), one file
//! per scenario. `tests/tests/log_format.rs` loads these files into the sagad of every later
//! release and checks that it still reads and resumes them.
//!
//! ```sh
//! cargo run -p sagad-e2e --example write_log_fixtures -- tests/fixtures/logs/format-N
//! ```
//!
//! Run it once, by the release that changes the stored format, into a new folder: it refuses a
//! folder that already holds files, since released fixtures are never rewritten.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use sagad_e2e::participant::{Script, default_answer};
use sagad_e2e::*;
use sagad_proto::v1::{CancelSagaRequest, Saga, SagaStatus, StartSagaRequest};
use serde_json::{Value, json};
use sqlx::{Connection as _, Row as _};
use tonic::Code;

/// How long a scenario may take to get where it is dumped, on a loaded 2-core box.
const DEADLINE: Duration = Duration::from_secs(60);

/// Quick policies, so the whole run takes seconds; the jitter is stored in each snapshot.
const FAST: &str = r#"timeout = "5s"
retry = { max_attempts = 3, initial_delay = "20ms", multiplier = 2.0, max_delay = "100ms", jitter = 0.1 }
compensation_retry = { max_attempts = 0, initial_delay = "20ms", multiplier = 2.0, max_delay = "100ms", jitter = 0.1 }"#;

/// For the sagas dumped unfinished: a call that never answers stays in flight for minutes, so
/// the test can hold them still while it reads them.
const PATIENT: &str = r#"timeout = "10m"
retry = { max_attempts = 3, initial_delay = "20ms", multiplier = 2.0, max_delay = "100ms", jitter = 0.0 }
compensation_retry = { max_attempts = 0, initial_delay = "20ms", multiplier = 2.0, max_delay = "100ms", jitter = 0.0 }"#;

/// The order saga's steps: name, participant, action, compensation.
const STEPS: [(&str, &str, &str, Option<&str>); 4] = [
    ("create_order", "order", "CreateOrder", Some("CancelOrder")),
    (
        "charge_payment",
        "payment",
        "ChargePayment",
        Some("RefundPayment"),
    ),
    (
        "schedule_shipment",
        "shipping",
        "ScheduleShipment",
        Some("CancelShipment"),
    ),
    ("approve_order", "order", "ApproveOrder", None),
];

/// Every participant named in the definitions below.
const PARTICIPANTS: [&str; 4] = ["order", "payment", "shipping", "mail-service"];

/// What the generator does with a saga once started, and the status its dump must show.
enum Course {
    /// Let it run to its end.
    Finish(SagaStatus),
    /// Cancel it as soon as this holds, then let it end.
    CancelWhen(fn(&Saga, &[CallRecord]) -> bool),
    /// Dump it as soon as this holds: it waits for a retry, unfinished.
    DumpWhen(SagaStatus, fn(&Saga) -> bool),
}

struct Scenario {
    /// The file name and the saga type.
    name: &'static str,
    definition: String,
    input: Value,
    idempotency_key: &'static str,
    correlation_id: &'static str,
    course: Course,
}

/// The four-step order saga under type `name`: `about` as its first comment line, `defaults`
/// as the `[defaults]` table, extra lines for some steps (`(step, "timeout = \"1s\"")`).
fn order_saga(name: &str, about: &str, defaults: &str, extra: &[(&str, &str)]) -> String {
    let mut text = format!(
        "# {about}\nname = \"{name}\"\nversion = 1\nrequired_input = [\"customer_id\", \"amount_cents\"]\n\n[defaults]\n{defaults}\n"
    );
    for (step, participant, action, compensation) in STEPS {
        text.push_str(&format!(
            "\n[[steps]]\nname = \"{step}\"\nparticipant = \"{participant}\"\naction = \"{action}\"\n"
        ));
        if let Some(compensation) = compensation {
            text.push_str(&format!("compensation = \"{compensation}\"\n"));
        }
        for (target, lines) in extra {
            if *target == step {
                text.push_str(lines);
                text.push('\n');
            }
        }
    }
    text
}

/// A plain order for `customer`.
fn order(customer: &str) -> Value {
    json!({
        "customer_id": customer,
        "amount_cents": 1250,
        "currency": "EUR",
        "items": [{"sku": "sku-1", "quantity": 2}],
    })
}

fn step_attempts(saga: &Saga, step: &str) -> (u32, u32) {
    saga.steps
        .iter()
        .find(|s| s.name == step)
        .map(|s| (s.attempts, s.compensation_attempts))
        .unwrap_or_default()
}

fn status_is(saga: &Saga, status: SagaStatus) -> bool {
    saga.status == status as i32
}

fn scenarios() -> Vec<Scenario> {
    let scenario = |name, definition, course| Scenario {
        name,
        definition,
        input: order(&format!("c-{name}")),
        idempotency_key: "",
        correlation_id: "",
        course,
    };
    vec![
        Scenario {
            name: "completed_after_retry",
            definition: order_saga(
                "completed_after_retry",
                "Completed; charge_payment failed once (UNAVAILABLE) and was retried.",
                FAST,
                &[],
            ),
            input: json!({
                "customer_id": "c-zoë-Ωmega-中文",
                "amount_cents": 123456,
                "negative": -42,
                "largest_exact_integer": 9007199254740991_i64,
                "ratio": 0.125,
                "pi": std::f64::consts::PI,
                "tiny": 1.5e-7,
                // StartSaga takes no number beyond 2^53 in magnitude; format-1 was written
                // when larger ones were still let in, and holds 6.02214076e23 here.
                "huge": 1.0e15,
                "gift": true,
                "note": null,
                "escapes": "tab\tquote\"backslash\\newline\n",
                "emoji": "📦🚚",
                "address": {
                    "city": "Zürich",
                    "lines": ["Bahnhofstrasse 1", "8001"],
                    "geo": {"lat": 47.3769, "lon": 8.5417},
                },
                "items": [
                    {"sku": "sku-ß", "quantity": 2, "unit_cents": 50000},
                    {"sku": "sku-2", "quantity": 1, "tags": ["fragile", "日本語"], "extra": {}},
                ],
                "nested_empty": {"list": [], "object": {}},
            }),
            idempotency_key: "fixture-completed-after-retry",
            correlation_id: "corr/ünï-4711",
            course: Course::Finish(SagaStatus::Completed),
        },
        scenario(
            "step_refused",
            order_saga(
                "step_refused",
                "schedule_shipment refused: charge_payment, then create_order, compensated.",
                FAST,
                &[],
            ),
            Course::Finish(SagaStatus::Compensated),
        ),
        scenario(
            "step_attempts_exhausted",
            order_saga(
                "step_attempts_exhausted",
                "schedule_shipment failed transiently 3 times (UNAVAILABLE, a timeout, \
                 RESOURCE_EXHAUSTED): it is compensated too, then the earlier steps.",
                FAST,
                &[("schedule_shipment", "timeout = \"300ms\"")],
            ),
            Course::Finish(SagaStatus::Compensated),
        ),
        scenario(
            "compensation_retried",
            order_saga(
                "compensation_retried",
                "schedule_shipment refused; RefundPayment failed once (UNAVAILABLE), then succeeded.",
                FAST,
                &[],
            ),
            Course::Finish(SagaStatus::Compensated),
        ),
        scenario(
            "compensation_refused",
            order_saga(
                "compensation_refused",
                "schedule_shipment refused; RefundPayment refused: the saga FAILED.",
                FAST,
                &[],
            ),
            Course::Finish(SagaStatus::Failed),
        ),
        scenario(
            "compensation_attempts_exhausted",
            order_saga(
                "compensation_attempts_exhausted",
                "schedule_shipment refused; RefundPayment failed transiently twice, its limit: \
                 the saga FAILED.",
                r#"timeout = "5s"
retry = { max_attempts = 3, initial_delay = "20ms", multiplier = 2.0, max_delay = "100ms", jitter = 0.1 }
compensation_retry = { max_attempts = 2, initial_delay = "20ms", multiplier = 3.0, max_delay = "1s", jitter = 0.0 }"#,
                &[],
            ),
            Course::Finish(SagaStatus::Failed),
        ),
        scenario(
            "cancelled_in_flight",
            order_saga(
                "cancelled_in_flight",
                "Cancelled while ScheduleShipment was in flight: it is compensated first.",
                FAST,
                &[("schedule_shipment", "timeout = \"60s\"")],
            ),
            Course::CancelWhen(|_, calls| {
                calls
                    .iter()
                    .any(|call| call.kind == CallKind::Execute && call.step == "schedule_shipment")
            }),
        ),
        scenario(
            "cancelled_in_backoff",
            order_saga(
                "cancelled_in_backoff",
                "Cancelled while charge_payment waited out a 30 s backoff.",
                FAST,
                &[(
                    "charge_payment",
                    r#"retry = { initial_delay = "30s", max_delay = "30s" }"#,
                )],
            ),
            Course::CancelWhen(|saga, _| {
                status_is(saga, SagaStatus::Running) && step_attempts(saga, "charge_payment").0 == 1
            }),
        ),
        scenario(
            "running_waiting",
            order_saga(
                "running_waiting",
                "Left RUNNING: charge_payment failed once and waits an hour for its next attempt.",
                PATIENT,
                &[(
                    "charge_payment",
                    r#"retry = { max_attempts = 5, initial_delay = "1h", max_delay = "1h" }"#,
                )],
            ),
            Course::DumpWhen(SagaStatus::Running, |saga| {
                status_is(saga, SagaStatus::Running) && step_attempts(saga, "charge_payment").0 == 1
            }),
        ),
        scenario(
            "running_retry_due",
            order_saga(
                "running_retry_due",
                "Left RUNNING: schedule_shipment failed once; its next attempt was due 10 s later.",
                PATIENT,
                &[(
                    "schedule_shipment",
                    r#"retry = { initial_delay = "10s", max_delay = "10s" }"#,
                )],
            ),
            Course::DumpWhen(SagaStatus::Running, |saga| {
                status_is(saga, SagaStatus::Running)
                    && step_attempts(saga, "schedule_shipment").0 == 1
            }),
        ),
        scenario(
            "compensating_waiting",
            order_saga(
                "compensating_waiting",
                "Left COMPENSATING: RefundPayment failed once and waits an hour for its next attempt.",
                PATIENT,
                &[(
                    "charge_payment",
                    r#"compensation_retry = { initial_delay = "1h", max_delay = "1h" }"#,
                )],
            ),
            Course::DumpWhen(SagaStatus::Compensating, |saga| {
                status_is(saga, SagaStatus::Compensating)
                    && step_attempts(saga, "charge_payment").1 == 1
            }),
        ),
        scenario(
            "compensating_retry_due",
            order_saga(
                "compensating_retry_due",
                "Left COMPENSATING: RefundPayment failed once; its next attempt was due 10 s later.",
                PATIENT,
                &[(
                    "charge_payment",
                    r#"compensation_retry = { initial_delay = "10s", max_delay = "10s" }"#,
                )],
            ),
            Course::DumpWhen(SagaStatus::Compensating, |saga| {
                status_is(saga, SagaStatus::Compensating)
                    && step_attempts(saga, "charge_payment").1 == 1
            }),
        ),
        scenario(
            "output_rejected",
            order_saga(
                "output_rejected",
                "ScheduleShipment answered an output with a NUL character: the step failed, was compensated first, then the earlier ones.",
                FAST,
                &[],
            ),
            Course::Finish(SagaStatus::Compensated),
        ),
        scenario(
            "typed_input",
            format!(
                "{}\n{TYPED_INPUT_SCHEMA}",
                order_saga(
                    "typed_input",
                    "A definition with an input schema (kept in the snapshot); completed.",
                    FAST,
                    &[],
                )
            ),
            Course::Finish(SagaStatus::Completed),
        ),
        Scenario {
            name: "defaults_and_overrides",
            definition: DEFAULTS_AND_OVERRIDES.to_owned(),
            input: json!({"customer_id": "c-defaults", "email": "zoë@example.org"}),
            idempotency_key: "",
            correlation_id: "corr-defaults",
            course: Course::Finish(SagaStatus::Compensated),
        },
    ]
}

/// An input schema, written after the steps as TOML tables.
const TYPED_INPUT_SCHEMA: &str = r#"[input_schema]
type = "object"
required = ["customer_id", "amount_cents"]
properties.customer_id = { type = "string", minLength = 1 }
properties.amount_cents = { type = "integer", minimum = 1 }

[input_schema.properties.items]
type = "array"
items = { type = "object", required = ["sku"] }
"#;

/// `[defaults]` with unlimited attempts and no jitter, steps overriding parts of it, a
/// participant name with a dash, a step without compensation, a version above 1.
const DEFAULTS_AND_OVERRIDES: &str = r#"# reserve_stock failed twice under unlimited attempts, then succeeded; send_confirmation
# (nothing to undo) succeeded; charge_card was refused: only reserve_stock is compensated.
name = "defaults_and_overrides"
version = 3
required_input = ["customer_id"]

[defaults]
timeout = "2s"
retry = { max_attempts = 0, initial_delay = "10ms", multiplier = 1.5, max_delay = "50ms", jitter = 0.0 }
compensation_retry = { max_attempts = 4, initial_delay = "10ms", max_delay = "40ms", jitter = 0.0 }

[[steps]]
name = "reserve_stock"
participant = "order"
action = "ReserveStock"
compensation = "ReleaseStock"

[[steps]]
name = "send_confirmation"
participant = "mail-service"
action = "SendConfirmation"
timeout = "1s"
retry = { initial_delay = "5ms" }

[[steps]]
name = "charge_card"
participant = "payment"
action = "ChargeCard"
compensation = "RefundCard"
retry = { max_attempts = 2 }
compensation_retry = { max_attempts = 0, multiplier = 4.0 }
"#;

/// How every participant answers, by saga type, step and how many tries of the same key came
/// before.
fn answer(call: &CallRecord, earlier: &[CallRecord]) -> Answer {
    let tries = earlier
        .iter()
        .filter(|other| other.idempotency_key == call.idempotency_key)
        .count();
    let execute = call.kind == CallKind::Execute;
    let step = call.step.as_str();
    match call.saga_type.as_str() {
        "completed_after_retry" if execute => match (step, tries) {
            ("charge_payment", 0) => Answer::status(Code::Unavailable),
            ("create_order", _) => Answer::success(json!({"order_id": "o-4711"})),
            ("charge_payment", _) => {
                Answer::success(json!({"payment_id": "p-4711", "charged_cents": 123456}))
            }
            ("schedule_shipment", _) => Answer::success(json!({
                "shipment_id": "s-4711",
                "eta_days": 3,
                "carrier": {"name": "Poste ✉", "legs": ["Zürich", "Genève"], "insured": true},
            })),
            _ => Answer::success(json!({})),
        },
        "step_refused"
        | "compensation_retried"
        | "compensation_refused"
        | "compensation_attempts_exhausted"
        | "compensating_waiting"
        | "compensating_retry_due"
            if execute && step == "schedule_shipment" =>
        {
            Answer::refuse("UNSUPPORTED_DESTINATION")
        }
        "compensation_retried" if !execute && step == "charge_payment" && tries == 0 => {
            Answer::status(Code::Unavailable)
        }
        "compensation_refused" if !execute && step == "charge_payment" => {
            Answer::refuse("REFUND_REJECTED")
        }
        "compensation_attempts_exhausted" | "compensating_waiting" | "compensating_retry_due"
            if !execute && step == "charge_payment" =>
        {
            Answer::status(Code::Unavailable)
        }
        "step_attempts_exhausted" if execute && step == "schedule_shipment" => match tries {
            0 => Answer::status(Code::Unavailable),
            1 => Answer::hang(),
            _ => Answer::status(Code::ResourceExhausted),
        },
        "output_rejected" if execute && step == "schedule_shipment" => {
            Answer::success(json!({"shipment_id": "s-\u{0}-1"}))
        }
        "cancelled_in_flight" if execute && step == "schedule_shipment" => {
            default_answer(call).after(Duration::from_secs(30))
        }
        "cancelled_in_backoff" | "running_waiting" if execute && step == "charge_payment" => {
            Answer::status(Code::Unavailable)
        }
        "running_retry_due" if execute && step == "schedule_shipment" => {
            Answer::status(Code::Unavailable)
        }
        "defaults_and_overrides" => match (step, tries) {
            ("reserve_stock", 0 | 1) if execute => Answer::status(Code::Unavailable),
            ("charge_card", _) if execute => Answer::refuse("CARD_DECLINED"),
            _ => default_answer(call),
        },
        _ => default_answer(call),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let out = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .context("usage: write_log_fixtures <out dir>, e.g. tests/fixtures/logs/format-2")?;
    if out.exists() && std::fs::read_dir(&out)?.next().is_some() {
        bail!(
            "{} already holds files: released fixtures are never rewritten; write a new folder",
            out.display()
        );
    }
    std::fs::create_dir_all(&out)?;

    let scenarios = scenarios();
    let files: Vec<(String, &str)> = scenarios
        .iter()
        .map(|s| (format!("{}.toml", s.name), s.definition.as_str()))
        .collect();
    let files: Vec<(&str, &str)> = files.iter().map(|(f, t)| (f.as_str(), *t)).collect();
    let defs = Scratch::defs(&files)?;
    let mut db = DatabaseGuard::new("log_fixtures");
    let script: Script = Arc::new(answer);
    let mut participants = Vec::new();
    for name in PARTICIPANTS {
        participants.push(FakeParticipant::start_scripted(name, script.clone()).await?);
    }
    let mut args = vec![
        "--database-url".to_owned(),
        db.url(),
        "--defs".to_owned(),
        defs.display().to_string(),
        "--shutdown-grace".to_owned(),
        "1s".to_owned(),
    ];
    for participant in &participants {
        args.extend(["--participant".to_owned(), participant.flag()]);
    }
    let daemon = TestDaemon::start(&args).await?;
    let mut client = daemon.client().await?;
    let mut conn = sqlx::PgConnection::connect(&db.url()).await?;
    // Timestamps in the dump are written in UTC, whatever the server's zone.
    sqlx::query("set time zone 'UTC'")
        .execute(&mut conn)
        .await?;
    let schema_version: i64 = sqlx::query_scalar("select max(version) from _sqlx_migrations")
        .fetch_one(&mut conn)
        .await?;

    for scenario in &scenarios {
        let saga_id = run(&mut client, &participants, scenario).await?;
        let text = dump(&mut conn, &saga_id, scenario, schema_version).await?;
        let file = out.join(format!("{}.json", scenario.name));
        std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
    }

    daemon.stop().await?;
    for participant in &mut participants {
        participant.stop();
    }
    conn.close().await?;
    db.drop_now().await?;
    check_coverage(&out, &scenarios)
}

/// Starts the scenario's saga and takes it where it is to be dumped; returns its id.
async fn run(
    client: &mut Client,
    participants: &[FakeParticipant],
    scenario: &Scenario,
) -> anyhow::Result<String> {
    let saga_id = client
        .start_saga(StartSagaRequest {
            saga_type: scenario.name.to_owned(),
            idempotency_key: scenario.idempotency_key.to_owned(),
            input: Some(to_struct(scenario.input.clone())),
            correlation_id: scenario.correlation_id.to_owned(),
        })
        .await?
        .into_inner()
        .saga_id;
    let calls = || -> Vec<CallRecord> {
        participants
            .iter()
            .flat_map(|participant| participant.calls_for(&saga_id))
            .collect()
    };
    match &scenario.course {
        Course::Finish(_) => {
            wait_terminal(client, &saga_id, DEADLINE).await?;
        }
        Course::CancelWhen(ready) => {
            wait_until(client, &saga_id, DEADLINE, |saga| ready(saga, &calls())).await?;
            client
                .cancel_saga(CancelSagaRequest {
                    saga_id: saga_id.clone(),
                    reason: format!("the {} fixture cancels", scenario.name),
                })
                .await?;
            wait_terminal(client, &saga_id, DEADLINE).await?;
        }
        Course::DumpWhen(_, ready) => {
            wait_until(client, &saga_id, DEADLINE, ready).await?;
        }
    }
    Ok(saga_id)
}

/// The fixture file of one saga: Postgres' own JSON of its row and of each of its events (one
/// statement, so one snapshot), pretty-printed by Postgres, so every stored value is kept as
/// stored.
async fn dump(
    conn: &mut sqlx::PgConnection,
    saga_id: &str,
    scenario: &Scenario,
    schema_version: i64,
) -> anyhow::Result<String> {
    let row = sqlx::query(
        "select jsonb_pretty(to_jsonb(s)) as saga, s.status,
                (select jsonb_pretty(jsonb_agg(to_jsonb(e) order by e.seq))
                 from saga_events e where e.saga_id = s.saga_id) as events
         from sagas s where s.saga_id = $1",
    )
    .bind(uuid::Uuid::parse_str(saga_id)?)
    .fetch_one(&mut *conn)
    .await?;
    let saga: String = row.try_get("saga")?;
    let events: String = row.try_get("events")?;
    let status: String = row.try_get("status")?;
    let expected = match &scenario.course {
        Course::Finish(status) | Course::DumpWhen(status, _) => *status,
        Course::CancelWhen(_) => SagaStatus::Compensated,
    };
    ensure!(
        format!("SAGA_STATUS_{status}") == expected.as_str_name(),
        "{}: dumped as {status}, expected {expected:?} (a retry came before the dump?)",
        scenario.name
    );
    // jsonb_pretty indents by 4; nested one level down here. JSON strings hold no newline.
    let nest = |text: &str| text.replace('\n', "\n    ");
    let text = format!(
        "{{\n    \"scenario\": {},\n    \"schema_version\": {schema_version},\n    \"definition_toml\": {},\n    \"saga\": {},\n    \"events\": {}\n}}\n",
        serde_json::to_string(scenario.name)?,
        serde_json::to_string(&scenario.definition)?,
        nest(&saga),
        nest(&events),
    );
    let parsed: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: the fixture is not JSON", scenario.name))?;
    let types: Vec<&str> = parsed["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter_map(|event| event["event_type"].as_str())
                .collect()
        })
        .unwrap_or_default();
    println!("{}: {status}: {}", scenario.name, types.join(", "));
    Ok(text)
}

/// The event types and statuses of today's log, which the scenarios must cover between them.
const EVENT_TYPES: [&str; 12] = [
    "saga_started",
    "step_succeeded",
    "step_refused",
    "step_attempt_failed",
    "step_output_rejected",
    "cancel_requested",
    "compensation_succeeded",
    "compensation_attempt_failed",
    "compensation_refused",
    "saga_completed",
    "saga_compensated",
    "saga_failed",
];
const STATUSES: [&str; 5] = [
    "RUNNING",
    "COMPENSATING",
    "COMPLETED",
    "COMPENSATED",
    "FAILED",
];

/// Reads the files back and checks that together they hold every event type and status.
fn check_coverage(out: &Path, scenarios: &[Scenario]) -> anyhow::Result<()> {
    let mut types = BTreeSet::new();
    let mut statuses = BTreeSet::new();
    for scenario in scenarios {
        let text = std::fs::read_to_string(out.join(format!("{}.json", scenario.name)))?;
        let doc: Value = serde_json::from_str(&text)?;
        statuses.insert(
            doc["saga"]["status"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
        for event in doc["events"].as_array().into_iter().flatten() {
            types.insert(event["event_type"].as_str().unwrap_or_default().to_owned());
        }
    }
    let missing: Vec<&str> = EVENT_TYPES
        .iter()
        .chain(&STATUSES)
        .copied()
        .filter(|name| !types.contains(*name) && !statuses.contains(*name))
        .collect();
    ensure!(missing.is_empty(), "no fixture holds {missing:?}");
    println!(
        "{} fixtures in {}: statuses {statuses:?}, event types {types:?}",
        scenarios.len(),
        out.display()
    );
    Ok(())
}
