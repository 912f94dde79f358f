//! A participant's success whose output sagad must not store: a NUL character in a string, a
//! 10 MB output, a number of 1e300. Each comes from the third step of a saga of its own while
//! 30 good sagas run beside it, so that their writes share the store's commit batches. The bad
//! step took effect at the participant, so it is compensated, then the earlier steps newest
//! first, and the saga ends COMPENSATED; the good sagas complete, and sagad goes on serving.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use sagad_e2e::participant::default_answer;
use sagad_e2e::*;
use sagad_proto::v1::{Saga, SagaStatus, StepStatus};
use serde_json::{Value, json};
use sqlx::Connection as _;
use sqlx::postgres::PgConnection;

/// How long every saga may take to end on a loaded 2-core box; with the fast policies below a
/// healthy sagad needs a few seconds.
const DEADLINE: Duration = Duration::from_secs(60);

/// How many good sagas run beside the bad ones.
const GOOD: usize = 30;

/// The step whose output is bad: it has two steps before it and one after.
const BAD_STEP: &str = "schedule_shipment";

/// The demo's four steps with fast retries and unlimited compensation.
const DEFINITION: &str = r#"name = "bad_outputs"
version = 1
required_input = ["customer_id"]

[defaults]
timeout = "5s"
retry = { max_attempts = 3, initial_delay = "20ms", multiplier = 2.0, max_delay = "100ms", jitter = 0.0 }
compensation_retry = { max_attempts = 0, initial_delay = "20ms", multiplier = 2.0, max_delay = "100ms", jitter = 0.0 }

[[steps]]
name = "create_order"
participant = "order"
action = "CreateOrder"
compensation = "CancelOrder"

[[steps]]
name = "charge_payment"
participant = "payment"
action = "ChargePayment"
compensation = "RefundPayment"

[[steps]]
name = "schedule_shipment"
participant = "shipping"
action = "ScheduleShipment"
compensation = "CancelShipment"

[[steps]]
name = "approve_order"
participant = "order"
action = "ApproveOrder"
"#;

/// The largest magnitude a stored number may have (2^53).
const MAX_SAFE: f64 = 9_007_199_254_740_992.0;

/// The largest output sagad stores, as JSON.
const MAX_OUTPUT_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bad {
    Nul,
    Huge,
    HugeNumber,
}

impl Bad {
    const ALL: [Bad; 3] = [Bad::Nul, Bad::Huge, Bad::HugeNumber];

    /// The saga input's `bad` field, which tells the script what to answer.
    fn label(self) -> &'static str {
        match self {
            Bad::Nul => "nul",
            Bad::Huge => "huge",
            Bad::HugeNumber => "huge_number",
        }
    }

    fn from_call(call: &CallRecord) -> Option<Bad> {
        let label = call.input["input"]["bad"].as_str()?;
        Bad::ALL.into_iter().find(|bad| bad.label() == label)
    }

    fn output(self) -> Value {
        match self {
            Bad::Nul => json!({"shipment_id": "ship\u{0}ment"}),
            Bad::Huge => json!({"shipment_id": "s-1", "manifest": "x".repeat(10 * 1024 * 1024)}),
            Bad::HugeNumber => json!({"shipment_id": "s-1", "weight_grams": 1e300}),
        }
    }

    /// Words of which the step's `last_error` must hold one (in any case), beside "output":
    /// they say why the output was refused.
    fn reasons(self) -> &'static [&'static str] {
        match self {
            Bad::Nul => &["nul", "\\0", "\\u0000", "zero byte", "null character"],
            Bad::Huge => &["kib", "mib", "bytes", "large", "size", "long", "limit"],
            Bad::HugeNumber => &["finite", "2^53", "9007199254740992", "magnitude", "range"],
        }
    }
}

/// Whether the value holds what sagad must not store: a NUL in a string or key, a number that
/// is not finite or beyond 2^53, or more than 256 KiB of JSON.
fn offending(value: &Value) -> bool {
    fn inside(value: &Value) -> bool {
        match value {
            Value::String(text) => text.contains('\0'),
            Value::Number(number) => number
                .as_f64()
                .is_none_or(|number| !number.is_finite() || number.abs() > MAX_SAFE),
            Value::Array(items) => items.iter().any(inside),
            Value::Object(fields) => fields
                .iter()
                .any(|(key, value)| key.contains('\0') || inside(value)),
            Value::Null | Value::Bool(_) => false,
        }
    }
    inside(value) || value.to_string().len() > MAX_OUTPUT_BYTES
}

/// The bad step answers with the saga's bad output; everything else succeeds.
fn answer(call: &CallRecord) -> Answer {
    match Bad::from_call(call) {
        Some(bad) if call.kind == CallKind::Execute && call.step == BAD_STEP => {
            Answer::success(bad.output())
        }
        _ => default_answer(call),
    }
}

fn status(saga: &Saga) -> SagaStatus {
    SagaStatus::try_from(saga.status).unwrap_or(SagaStatus::Unspecified)
}

fn step_status(saga: &Saga, name: &str) -> Option<StepStatus> {
    saga.steps
        .iter()
        .find(|step| step.name == name)
        .and_then(|step| StepStatus::try_from(step.status).ok())
}

/// Status, failure reason and each step with its last error (cut short).
fn brief(saga: &Saga) -> String {
    let steps: Vec<String> = saga
        .steps
        .iter()
        .map(|step| {
            let error: String = step.last_error.chars().take(200).collect();
            format!(
                "{} {:?} attempts {} compensations {} error {error:?}",
                step.name,
                StepStatus::try_from(step.status).unwrap_or(StepStatus::Unspecified),
                step.attempts,
                step.compensation_attempts
            )
        })
        .collect();
    format!(
        "{:?} v{} reason {:?}; steps [{}]",
        status(saga),
        saga.version,
        saga.failure_reason,
        steps.join("; ")
    )
}

/// sagad and the three scripted participants on a database of this test's own.
struct World {
    participants: Vec<FakeParticipant>,
    daemon: Option<TestDaemon>,
    client: Client,
    db: DatabaseGuard,
    /// Holds the definition file while sagad runs.
    _defs: Scratch,
}

impl World {
    async fn start() -> anyhow::Result<World> {
        let defs = Scratch::defs(&[("bad_outputs.toml", DEFINITION)])?;
        let db = DatabaseGuard::new("bad_outputs");
        let script: participant::Script =
            Arc::new(|call: &CallRecord, _: &[CallRecord]| answer(call));
        let mut participants = Vec::new();
        for name in ["order", "payment", "shipping"] {
            participants.push(FakeParticipant::start_scripted(name, script.clone()).await?);
        }
        let mut args = vec![
            "--database-url".to_owned(),
            db.url(),
            "--defs".to_owned(),
            defs.display().to_string(),
        ];
        for participant in &participants {
            args.extend(["--participant".to_owned(), participant.flag()]);
        }
        let daemon = TestDaemon::start(&args).await?;
        let client = daemon.client().await?;
        Ok(World {
            participants,
            daemon: Some(daemon),
            client,
            db,
            _defs: defs,
        })
    }

    /// Every call for the saga, across participants, in arrival order.
    fn calls(&self, saga_id: &str) -> Vec<CallRecord> {
        let mut calls: Vec<CallRecord> = self
            .participants
            .iter()
            .flat_map(|participant| participant.calls_for(saga_id))
            .collect();
        calls.sort_by_key(|call| call.received_at);
        calls
    }

    async fn finish(mut self) -> anyhow::Result<()> {
        if let Some(daemon) = self.daemon.take() {
            daemon.stop().await?;
        }
        for participant in &mut self.participants {
            participant.stop();
        }
        self.db.drop_now().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_outputs_are_compensated_and_the_sagas_beside_them_complete() -> anyhow::Result<()> {
    let mut world = World::start().await?;
    let began = Instant::now();

    // Every saga at the same moment, so the bad writes meet the good ones in commit batches.
    let mut starts = tokio::task::JoinSet::new();
    let mut inputs: Vec<(Option<Bad>, Value)> = Bad::ALL
        .into_iter()
        .map(|bad| {
            (
                Some(bad),
                json!({"customer_id": format!("c-{}", bad.label()), "bad": bad.label()}),
            )
        })
        .collect();
    inputs.extend((0..GOOD).map(|n| (None, json!({"customer_id": format!("c-good-{n}")}))));
    for (bad, input) in inputs {
        let mut client = world.client.clone();
        starts.spawn(async move {
            let saga_id = start_saga(&mut client, "bad_outputs", input).await?;
            anyhow::Ok((saga_id, bad))
        });
    }
    let mut kinds: BTreeMap<String, Option<Bad>> = BTreeMap::new();
    while let Some(started) = starts.join_next().await {
        let (saga_id, bad) = started??;
        kinds.insert(saga_id, bad);
    }
    println!("started {} sagas in {:?}", kinds.len(), began.elapsed());

    let (sagas, mut problems) = wait_every_saga(&mut world.client, &kinds).await?;
    println!(
        "{} of {} sagas ended within {:?} of the first start",
        kinds.len() - problems.len(),
        kinds.len(),
        began.elapsed()
    );
    for (saga_id, bad) in &kinds {
        let saga = sagas.get(saga_id).context("a saga went missing")?;
        if !is_terminal(saga.status) {
            continue;
        }
        let found = match bad {
            Some(bad) => bad_saga_problems(&world, saga, *bad),
            None => good_saga_problems(&world, saga),
        };
        problems.extend(found.into_iter().map(|problem| {
            let kind = bad.map_or("good", Bad::label);
            format!("{kind} saga {saga_id}: {problem}")
        }));
    }
    problems.extend(listing_problems(&mut world.client, &sagas).await?);
    shared_batches(&world.db.url(), &kinds).await?;
    ensure!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );

    // sagad neither stopped nor wedged: a new saga still completes.
    let after = start_saga(
        &mut world.client,
        "bad_outputs",
        json!({"customer_id": "c-after"}),
    )
    .await?;
    let saga = wait_terminal(&mut world.client, &after, DEADLINE).await?;
    ensure!(
        status(&saga) == SagaStatus::Completed,
        "a saga started afterwards: {}",
        brief(&saga)
    );
    println!("a saga started afterwards completed");
    world.finish().await
}

/// Polls until every saga has ended and returns each as GetSaga has it, with a problem for
/// every saga still open at the deadline.
async fn wait_every_saga(
    client: &mut Client,
    kinds: &BTreeMap<String, Option<Bad>>,
) -> anyhow::Result<(BTreeMap<String, Saga>, Vec<String>)> {
    let until = Instant::now() + DEADLINE;
    loop {
        let mut sagas = BTreeMap::new();
        let mut open = Vec::new();
        for (saga_id, bad) in kinds {
            let saga = get_saga(client, saga_id)
                .await
                .with_context(|| format!("GetSaga {saga_id}"))?;
            if !is_terminal(saga.status) {
                open.push(format!(
                    "{} saga {saga_id} still open (stuck) after {DEADLINE:?}: {}",
                    bad.map_or("good", Bad::label),
                    brief(&saga)
                ));
            }
            sagas.insert(saga_id.clone(), saga);
        }
        if open.is_empty() || Instant::now() > until {
            return Ok((sagas, open));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What is wrong with a saga whose third step answered a bad output.
fn bad_saga_problems(world: &World, saga: &Saga, bad: Bad) -> Vec<String> {
    let mut problems = Vec::new();
    println!(
        "{} saga: {:?}, failure reason {:?}",
        bad.label(),
        status(saga),
        saga.failure_reason
    );
    if status(saga) != SagaStatus::Compensated {
        problems.push(format!("status {:?}, want Compensated", status(saga)));
    }
    if !saga.failure_reason.contains(BAD_STEP) {
        problems.push(format!(
            "failure reason {:?} does not name {BAD_STEP}",
            saga.failure_reason
        ));
    }
    let want = [
        ("create_order", StepStatus::Compensated),
        ("charge_payment", StepStatus::Compensated),
        (BAD_STEP, StepStatus::Compensated),
        ("approve_order", StepStatus::Pending),
    ];
    for (name, want) in want {
        let got = step_status(saga, name);
        if got != Some(want) {
            problems.push(format!("step {name} is {got:?}, want {want:?}"));
        }
    }
    match saga.steps.iter().find(|step| step.name == BAD_STEP) {
        Some(step) => {
            let error = step.last_error.to_lowercase();
            println!(
                "{} saga: {BAD_STEP} last_error {:?}",
                bad.label(),
                step.last_error.chars().take(300).collect::<String>()
            );
            if !error.contains("output") {
                problems.push(format!(
                    "{BAD_STEP}'s last error {:?} does not say its output was rejected",
                    step.last_error
                ));
            } else if !bad.reasons().iter().any(|word| error.contains(word)) {
                problems.push(format!(
                    "{BAD_STEP}'s last error {:?} does not say why (any of {:?})",
                    step.last_error,
                    bad.reasons()
                ));
            }
            if offending(&to_json(&step.output)) {
                problems.push(format!("{BAD_STEP}'s bad output was stored"));
            }
        }
        None => problems.push(format!("no step {BAD_STEP}")),
    }
    if offending(&to_json(&saga.context)) {
        problems.push("the bad output is in the saga's context".to_owned());
    }

    // The participants' side: the bad execute, then one compensation per done step, newest
    // first, every one after the bad execute; approve_order never asked.
    let calls = world.calls(&saga.saga_id);
    let Some(bad_execute) = calls
        .iter()
        .position(|call| call.kind == CallKind::Execute && call.step == BAD_STEP)
    else {
        problems.push(format!("{BAD_STEP} was never executed"));
        return problems;
    };
    let mut compensated: Vec<&str> = Vec::new();
    for (at, call) in calls.iter().enumerate() {
        if call.kind == CallKind::Compensate && !compensated.contains(&call.step.as_str()) {
            if at < bad_execute {
                problems.push(format!("{} compensated before the bad execute", call.step));
            }
            compensated.push(&call.step);
        }
    }
    if compensated != [BAD_STEP, "charge_payment", "create_order"] {
        problems.push(format!(
            "the participants were asked to compensate {compensated:?}, want [{BAD_STEP}, charge_payment, create_order]"
        ));
    }
    if calls.iter().any(|call| call.step == "approve_order") {
        problems.push("approve_order was called".to_owned());
    }
    let logged: Vec<&str> = saga
        .history
        .iter()
        .filter(|event| event.r#type == "compensation_succeeded")
        .map(|event| event.step.as_str())
        .collect();
    if logged != [BAD_STEP, "charge_payment", "create_order"] {
        problems.push(format!(
            "the log has compensations {logged:?}, want [{BAD_STEP}, charge_payment, create_order]"
        ));
    }
    problems
}

/// What is wrong with a good saga: anything but four steps done and nothing undone.
fn good_saga_problems(world: &World, saga: &Saga) -> Vec<String> {
    let mut problems = Vec::new();
    if status(saga) != SagaStatus::Completed {
        problems.push(format!("want Completed: {}", brief(saga)));
    }
    let steps: Vec<Option<StepStatus>> = saga
        .steps
        .iter()
        .map(|step| StepStatus::try_from(step.status).ok())
        .collect();
    if steps != [Some(StepStatus::Succeeded); 4] {
        problems.push(format!("steps {steps:?}, want four Succeeded"));
    }
    if world
        .calls(&saga.saga_id)
        .iter()
        .any(|call| call.kind == CallKind::Compensate)
    {
        problems.push("a compensation was asked for".to_owned());
    }
    problems
}

/// ListSagas shows every saga, each with the status GetSaga shows.
async fn listing_problems(
    client: &mut Client,
    sagas: &BTreeMap<String, Saga>,
) -> anyhow::Result<Vec<String>> {
    let listed: BTreeMap<String, i32> = list_newest(client)
        .await
        .context("ListSagas")?
        .into_iter()
        .map(|saga| (saga.saga_id, saga.status))
        .collect();
    Ok(sagas
        .values()
        .filter(|saga| listed.get(&saga.saga_id) != Some(&saga.status))
        .map(|saga| {
            format!(
                "ListSagas shows {} as {:?}, GetSaga as {:?}",
                saga.saga_id,
                listed
                    .get(&saga.saga_id)
                    .and_then(|status| SagaStatus::try_from(*status).ok()),
                status(saga)
            )
        })
        .collect())
}

/// Prints how many of the bad sagas' events were committed in one transaction with a good
/// saga's (the log's `recorded_at` is the transaction's `now()`): the batches were shared.
async fn shared_batches(url: &str, kinds: &BTreeMap<String, Option<Bad>>) -> anyhow::Result<()> {
    let bad: Vec<String> = kinds
        .iter()
        .filter(|(_, bad)| bad.is_some())
        .map(|(id, _)| id.clone())
        .collect();
    let mut db = PgConnection::connect(url).await?;
    let shared: i64 = sqlx::query_scalar(
        "select count(*) from saga_events mine
         where mine.saga_id::text = any($1)
           and exists (select 1 from saga_events other
                       where other.recorded_at = mine.recorded_at
                         and not other.saga_id::text = any($1))",
    )
    .bind(&bad)
    .fetch_one(&mut db)
    .await?;
    println!("events of the bad sagas committed in one batch with a good saga's: {shared}");
    Ok(())
}
