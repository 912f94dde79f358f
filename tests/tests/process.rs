//! The real sagad binary in a process of its own (`SagadProcess`): SIGKILL with many sagas in
//! flight going forward and compensating, a crash during a durable backoff and one in the middle
//! of a long run of failed attempts (kept out of the log), definitions and
//! flags it must refuse with one line on stderr, graceful shutdown on SIGTERM, and `/metrics`.
//!
//! The scripted participants run inside the test process and record every call they receive:
//! they are the "participants' databases" the checks read. Every wait polls a condition with a
//! generous deadline; no fixed sleep decides an outcome.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use sagad_e2e::participant::Script;
use sagad_e2e::*;
use sagad_proto::v1::{Saga, SagaStatus, StepStatus};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// Helpers shared by the tests.

/// The flags every started sagad gets (`SagadProcess` adds `--listen` and `--http-listen`).
fn sagad_args(db: &TestDatabase, defs: &Path, participants: &[&FakeParticipant]) -> Vec<String> {
    let mut args = vec![
        "--database-url".to_owned(),
        db.url.clone(),
        "--defs".to_owned(),
        defs.display().to_string(),
        // A killed process's sagas are taken over once its lease expires: keep the wait short.
        "--lease-ttl".to_owned(),
        "2s".to_owned(),
        "--poll-interval".to_owned(),
        "200ms".to_owned(),
    ];
    for participant in participants {
        args.extend(["--participant".to_owned(), participant.flag()]);
    }
    args
}

/// Every call the participants received, in arrival order.
fn all_calls(participants: &[&FakeParticipant]) -> Vec<CallRecord> {
    let mut calls: Vec<CallRecord> = participants.iter().flat_map(|p| p.calls()).collect();
    calls.sort_by_key(|call| call.received_at);
    calls
}

/// Runs `body` on a fresh database and drops the database afterwards, whatever happened (the
/// body runs in a task of its own so that a failed assertion does not skip the drop).
async fn with_database<F, Fut>(label: &str, body: F) -> anyhow::Result<()>
where
    F: FnOnce(TestDatabase) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let db = TestDatabase::new(label);
    let result = tokio::spawn(body(db.clone())).await;
    let dropped = db.drop_database().await;
    match result {
        Ok(result) => result?,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(error) => return Err(error.into()),
    }
    dropped
}

/// Removes terminal colour codes (`ESC [ … letter`) from a log.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for next in chars.by_ref() {
                if next.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// How many sagas the sagad writing this log has taken over so far (it logs `claimed=N` each
/// time it takes some over: at start, and later once a dead process's lease has expired).
fn taken_over_count(log: &Path) -> anyhow::Result<usize> {
    let text = strip_ansi(&std::fs::read_to_string(log)?);
    Ok(text
        .lines()
        .filter_map(|line| line.split_once("claimed=").map(|(_, rest)| rest))
        .filter_map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum())
}

/// Waits until the sagad writing this log has taken over at least `count` sagas.
async fn wait_taken_over(log: &Path, count: usize) -> anyhow::Result<usize> {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let taken = taken_over_count(log)?;
        if taken >= count {
            return Ok(taken);
        }
        ensure!(
            Instant::now() < until,
            "the restarted sagad took over {taken} sagas, want at least {count}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A small definition: `steps` are (name, participant); `first_step_extra` is added to the
/// first step's table.
fn small_definition(name: &str, steps: &[(&str, &str)], first_step_extra: &str) -> String {
    let mut text = format!(
        "name = \"{name}\"\nversion = 1\n\n[defaults]\ntimeout = \"5s\"\n\
         retry = {{ max_attempts = 3, initial_delay = \"50ms\", multiplier = 2.0, max_delay = \"500ms\", jitter = 0.0 }}\n"
    );
    for (i, (step, participant)) in steps.iter().enumerate() {
        text.push_str(&format!(
            "\n[[steps]]\nname = \"{step}\"\nparticipant = \"{participant}\"\naction = \"Do_{step}\"\ncompensation = \"Undo_{step}\"\n"
        ));
        if i == 0 && !first_step_extra.is_empty() {
            text.push_str(first_step_extra);
            text.push('\n');
        }
    }
    text
}

// ---------------------------------------------------------------------------------------------
// 1. SIGKILL with sagas mid-forward and mid-compensation.

const SAGA_TYPE: &str = "order_fulfillment";
const SAGAS: u32 = 60;
const STEPS: [&str; 4] = [
    "create_order",
    "charge_payment",
    "schedule_shipment",
    "approve_order",
];
const ACTIONS: [(&str, Option<&str>); 4] = [
    ("CreateOrder", Some("CancelOrder")),
    ("ChargePayment", Some("RefundPayment")),
    ("ScheduleShipment", Some("CancelShipment")),
    ("ApproveOrder", None),
];

/// The demo's definition with short backoffs, so that retries and compensations are quick.
const CRASH_DEFINITION: &str = r#"
name = "order_fulfillment"
version = 1
required_input = ["customer_id", "amount_cents", "country"]

[defaults]
timeout = "5s"
retry = { max_attempts = 6, initial_delay = "50ms", multiplier = 2.0, max_delay = "500ms", jitter = 0.2 }
compensation_retry = { max_attempts = 0, initial_delay = "50ms", multiplier = 2.0, max_delay = "500ms", jitter = 0.2 }

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
retry = { max_attempts = 0 }
"#;

/// How a saga of the crash test must end, from its input alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expected {
    Completed,
    /// Refused by the step at this index, then compensated.
    RefusedAt(usize),
}

/// Saga number `n`: customer `c-0nn`; ids ending in 7 have no funds; every fifth (n % 5 == 1,
/// never ending in 7) ships to Antarctica.
fn crash_input(n: u32) -> (Value, Expected) {
    let country = if n % 5 == 1 { "AQ" } else { "FR" };
    let expected = if n % 10 == 7 {
        Expected::RefusedAt(1)
    } else if n % 5 == 1 {
        Expected::RefusedAt(2)
    } else {
        Expected::Completed
    };
    let input = json!({
        "customer_id": format!("c-{n:03}"),
        "amount_cents": 1000 + n,
        "currency": "EUR",
        "country": country,
        "items": [{"sku": "sku-1", "quantity": 1}],
    });
    (input, expected)
}

fn customer_number(call: &CallRecord) -> Option<u32> {
    call.input["input"]["customer_id"]
        .as_str()?
        .strip_prefix("c-")?
        .parse()
        .ok()
}

fn step_index(step: &str) -> Option<usize> {
    STEPS.iter().position(|name| *name == step)
}

/// A delay in `[low, high]` ms that depends only on the call's key and attempt.
fn spread(call: &CallRecord, low: u64, high: u64) -> Duration {
    let mut hasher = DefaultHasher::new();
    (&call.idempotency_key, call.attempt).hash(&mut hasher);
    Duration::from_millis(low + hasher.finish() % (high - low + 1))
}

/// The participants' script: a pure function of the call (so the checks can recompute every
/// reply), which also makes a repeated key get the same business answer, as a real idempotent
/// participant would. Some first attempts fail transiently.
fn crash_answer(call: &CallRecord) -> Answer {
    let n = customer_number(call).unwrap_or(0);
    let k = step_index(&call.step).unwrap_or(0) as u32;
    match call.kind {
        CallKind::Execute => {
            let answer = if call.attempt == 1 && (n + k).is_multiple_of(4) {
                Answer::status(tonic::Code::Unavailable)
            } else if call.step == "charge_payment" && n % 10 == 7 {
                Answer::refuse("INSUFFICIENT_FUNDS")
            } else if call.step == "schedule_shipment" && call.input["input"]["country"] == "AQ" {
                Answer::refuse("UNSUPPORTED_DESTINATION")
            } else {
                participant::default_answer(call)
            };
            answer.after(spread(call, 50, 300))
        }
        CallKind::Compensate => {
            let answer = if call.attempt == 1 && (n + k).is_multiple_of(3) {
                Answer::status(tonic::Code::Unavailable)
            } else {
                Answer::success(json!({}))
            };
            answer.after(spread(call, 100, 400))
        }
    }
}

fn is_success(call: &CallRecord) -> bool {
    matches!(crash_answer(call).reply, Reply::Success(_))
}

fn is_refusal(call: &CallRecord) -> bool {
    matches!(crash_answer(call).reply, Reply::Refuse { .. })
}

/// The participant has not answered this call yet at `at` (it answers after the script's delay).
fn unanswered_at(call: &CallRecord, at: Instant) -> bool {
    at < call.received_at + crash_answer(call).delay
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_forward_and_mid_compensation_loses_nothing() -> anyhow::Result<()> {
    with_database("crash", crash_scenario).await
}

async fn crash_scenario(db: TestDatabase) -> anyhow::Result<()> {
    let script: Script = Arc::new(|call, _| crash_answer(call));
    let order = FakeParticipant::start_scripted("order", script.clone()).await?;
    let payment = FakeParticipant::start_scripted("payment", script.clone()).await?;
    let shipping = FakeParticipant::start_scripted("shipping", script).await?;
    let participants = [&order, &payment, &shipping];
    let defs = Scratch::defs(&[("order_fulfillment.toml", CRASH_DEFINITION)])?;
    let logs = Scratch::logs("crash-logs")?;
    let args = sagad_args(&db, &defs, &participants);
    let began = Instant::now();

    let mut sagad = SagadProcess::start(&args, &logs).await?;
    let client = sagad.client().await?;
    let mut starts = tokio::task::JoinSet::new();
    for n in 0..SAGAS {
        let mut client = client.clone();
        starts.spawn(async move {
            let (input, _) = crash_input(n);
            start_saga(&mut client, SAGA_TYPE, input)
                .await
                .map(|id| (id, n))
        });
    }
    let mut sagas: BTreeMap<String, u32> = BTreeMap::new();
    while let Some(started) = starts.join_next().await {
        let (id, n) = started??;
        sagas.insert(id, n);
    }
    ensure!(
        sagas.len() == SAGAS as usize,
        "{} distinct saga ids for {SAGAS} starts",
        sagas.len()
    );

    // Crash 1: wait for a good mix. Some compensation and some execute are unanswered (so some
    // sagas are mid-compensation and some mid-forward), a saga is half-way through a two-step
    // compensation (charge_payment undone, create_order not yet), and some saga has had its last
    // step approved (so some have ended or are about to).
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let calls = all_calls(&participants);
        let now = Instant::now();
        let unanswered = |kind: CallKind| {
            calls
                .iter()
                .any(|call| call.kind == kind && unanswered_at(call, now))
        };
        let answered_ok = |saga_id: Option<&str>, kind: CallKind, step: &str| {
            calls.iter().any(|call| {
                saga_id.is_none_or(|id| call.saga_id == id)
                    && call.kind == kind
                    && call.step == step
                    && !unanswered_at(call, now)
                    && is_success(call)
            })
        };
        let half_compensated = calls.iter().any(|call| {
            call.kind == CallKind::Compensate
                && call.step == "charge_payment"
                && answered_ok(Some(&call.saga_id), CallKind::Compensate, "charge_payment")
                && !answered_ok(Some(&call.saga_id), CallKind::Compensate, "create_order")
        });
        if unanswered(CallKind::Compensate)
            && unanswered(CallKind::Execute)
            && half_compensated
            && answered_ok(None, CallKind::Execute, "approve_order")
        {
            break;
        }
        ensure!(
            Instant::now() < until,
            "never saw the mix of sagas to crash on ({} calls received)",
            calls.len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sagad.kill().await?;
    let crashed_at = began.elapsed();
    let lost_1 = lost_calls(&participants, Instant::now());
    ensure!(
        lost_1.iter().any(|call| call.kind == CallKind::Compensate)
            && lost_1.iter().any(|call| call.kind == CallKind::Execute),
        "the first crash should have cut off both kinds of call: {:?}",
        lost_1
            .iter()
            .map(|c| &c.idempotency_key)
            .collect::<Vec<_>>()
    );
    let lost_sagas: BTreeSet<&str> = lost_1.iter().map(|call| call.saga_id.as_str()).collect();

    // Crash 2: once the restarted sagad has resumed, made some calls and has one in flight.
    // Every call received from here on comes from the new process.
    let restarted = Instant::now();
    let mut sagad = SagadProcess::start(&args, &logs).await?;
    // The killed process's lease must run out first.
    let resumed = wait_taken_over(&sagad.log, lost_sagas.len()).await?;
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let now = Instant::now();
        let calls: Vec<CallRecord> = all_calls(&participants)
            .into_iter()
            .filter(|call| call.received_at > restarted)
            .collect();
        if calls.len() >= 10 && calls.iter().any(|call| unanswered_at(call, now)) {
            break;
        }
        ensure!(
            Instant::now() < until,
            "the restarted sagad made only {} calls within 30 s",
            calls.len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sagad.kill().await?;
    let lost_2: Vec<CallRecord> = lost_calls(&participants, Instant::now())
        .into_iter()
        .filter(|call| call.received_at > restarted)
        .collect();

    // The third process finishes the work.
    let sagad = SagadProcess::start(&args, &logs).await?;
    let mut client = sagad.client().await?;
    let ids: BTreeSet<String> = sagas.keys().cloned().collect();
    let finals = wait_all_terminal(&mut client, &ids, Duration::from_secs(60)).await?;
    let calls = all_calls(&participants);
    eprintln!(
        "crash test: crash 1 at {:.1} s, {} calls, {} cut off by crash 1 ({} compensations), {:?} sagas resumed, {} cut off by crash 2, {:.1} s",
        crashed_at.as_secs_f64(),
        calls.len(),
        lost_1.len(),
        lost_1
            .iter()
            .filter(|call| call.kind == CallKind::Compensate)
            .count(),
        resumed,
        lost_2.len(),
        began.elapsed().as_secs_f64()
    );

    let mut problems = check_calls(&sagas, &calls);
    problems.extend(check_sagas(&sagas, &finals, &calls));
    for (crash, lost) in [(1, &lost_1), (2, &lost_2)] {
        problems.extend(check_resent(crash, lost, &calls));
    }
    let listed = list_newest(&mut client).await?;
    if listed.len() != SAGAS as usize {
        problems.push(format!(
            "ListSagas shows {} sagas, {SAGAS} were started",
            listed.len()
        ));
    }
    ensure!(problems.is_empty(), "{}", summarize(&problems));
    Ok(())
}

/// The violations, grouped by kind (a message with its ids and numbers taken out), with up
/// to three examples of each kind.
fn summarize(problems: &[String]) -> String {
    let shape = |message: &str| -> String {
        let mut out = String::new();
        let mut run = String::new();
        for c in message.chars().chain(std::iter::once(' ')) {
            if c.is_ascii_hexdigit() || c == '-' {
                run.push(c);
                continue;
            }
            let is_number = !run.is_empty() && run.chars().all(|c| c.is_ascii_digit());
            out.push_str(if run.len() >= 8 || is_number {
                "#"
            } else {
                &run
            });
            run.clear();
            out.push(c);
        }
        out
    };
    let mut kinds: BTreeMap<String, Vec<&String>> = BTreeMap::new();
    for problem in problems {
        kinds.entry(shape(problem)).or_default().push(problem);
    }
    let mut text = format!("{} violations of {} kinds:", problems.len(), kinds.len());
    for examples in kinds.values() {
        text.push_str(&format!("\n- {} like:", examples.len()));
        for example in examples.iter().take(3) {
            text.push_str(&format!("\n    {example}"));
        }
    }
    text
}

/// The calls received but not answered when the process died (their outcome was never recorded).
fn lost_calls(participants: &[&FakeParticipant], killed_at: Instant) -> Vec<CallRecord> {
    all_calls(participants)
        .into_iter()
        .filter(|call| unanswered_at(call, killed_at))
        .collect()
}

/// A call cut off by a crash is sent again after it with the same key (its outcome is unknown).
fn check_resent(crash: u32, lost: &[CallRecord], calls: &[CallRecord]) -> Vec<String> {
    lost.iter()
        .filter(|cut| {
            !calls.iter().any(|call| {
                call.received_at > cut.received_at
                    && call.idempotency_key == cut.idempotency_key
                    && call.attempt >= cut.attempt
            })
        })
        .map(|cut| {
            format!(
                "{} attempt {} was cut off by crash {crash} but never sent again",
                cut.idempotency_key, cut.attempt
            )
        })
        .collect()
}

/// Checks every call on its own and every key's attempts.
fn check_calls(sagas: &BTreeMap<String, u32>, calls: &[CallRecord]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut attempts: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for call in calls {
        let key = call.idempotency_key.as_str();
        let parts: Vec<&str> = key.split('/').collect();
        let [saga_id, step, kind] = parts[..] else {
            problems.push(format!("key {key:?} is not <saga_id>/<step>/<kind>"));
            continue;
        };
        let Some(&n) = sagas.get(saga_id) else {
            problems.push(format!("key {key:?} names no saga that was started"));
            continue;
        };
        let Some(k) = step_index(step) else {
            problems.push(format!("key {key:?} names no step of the definition"));
            continue;
        };
        let expected_kind = match call.kind {
            CallKind::Execute => "execute",
            CallKind::Compensate => "compensate",
        };
        if kind != expected_kind {
            problems.push(format!(
                "key {key:?} does not end in /{expected_kind} (it came as an {expected_kind} call)"
            ));
        }
        if call.saga_id != saga_id || call.step != step || call.saga_type != SAGA_TYPE {
            problems.push(format!(
                "key {key:?} came with saga_id {:?}, step {:?}, saga_type {:?}",
                call.saga_id, call.step, call.saga_type
            ));
        }
        if call.metadata_saga_id.as_deref() != Some(saga_id) {
            problems.push(format!(
                "key {key:?} came with x-saga-id {:?}",
                call.metadata_saga_id
            ));
        }
        let (action, compensation) = ACTIONS[k];
        let expected_action = match call.kind {
            CallKind::Execute => Some(action),
            CallKind::Compensate => compensation,
        };
        if expected_action != Some(call.action.as_str()) {
            problems.push(format!("key {key:?} came with action {:?}", call.action));
        }
        if customer_number(call) != Some(n) {
            problems.push(format!(
                "key {key:?} came with another saga's input: {}",
                call.input
            ));
        }
        attempts.entry(key).or_default().push(call.attempt);
    }
    for (key, seen) in attempts {
        let starts_at_one = seen.first() == Some(&1);
        let steps_by_zero_or_one = seen
            .windows(2)
            .all(|pair| pair[1] == pair[0] || pair[1] == pair[0] + 1);
        if !starts_at_one || !steps_by_zero_or_one {
            problems.push(format!("{key}: attempts arrived as {seen:?}"));
        }
    }
    problems
}

/// Checks each saga's end against its input and its calls against the saga rules.
fn check_sagas(
    sagas: &BTreeMap<String, u32>,
    finals: &BTreeMap<String, Saga>,
    calls: &[CallRecord],
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut by_saga: HashMap<&str, Vec<&CallRecord>> = HashMap::new();
    for call in calls {
        by_saga.entry(call.saga_id.as_str()).or_default().push(call);
    }
    for (id, &n) in sagas {
        let (_, expected) = crash_input(n);
        let mine = by_saga.get(id.as_str()).cloned().unwrap_or_default();
        let executes = |step: &str| -> Vec<&CallRecord> {
            mine.iter()
                .copied()
                .filter(|call| call.kind == CallKind::Execute && call.step == step)
                .collect()
        };
        let compensates = |step: &str| -> Vec<&CallRecord> {
            mine.iter()
                .copied()
                .filter(|call| call.kind == CallKind::Compensate && call.step == step)
                .collect()
        };
        let Some(saga) = finals.get(id) else {
            problems.push(format!("saga {id} (c-{n:03}): no final state"));
            continue;
        };
        let status = SagaStatus::try_from(saga.status).ok();
        let step_statuses: Vec<Option<StepStatus>> = saga
            .steps
            .iter()
            .map(|step| StepStatus::try_from(step.status).ok())
            .collect();
        match expected {
            Expected::Completed => {
                if status != Some(SagaStatus::Completed) {
                    problems.push(format!(
                        "saga {id} (c-{n:03}): {status:?}, expected COMPLETED"
                    ));
                }
                if step_statuses != vec![Some(StepStatus::Succeeded); STEPS.len()] {
                    problems.push(format!(
                        "saga {id} (c-{n:03}) completed with steps {step_statuses:?}"
                    ));
                }
                for step in STEPS {
                    if !executes(step).last().is_some_and(|call| is_success(call)) {
                        problems.push(format!(
                            "saga {id} (c-{n:03}) completed but {step} never got a success as its last execute"
                        ));
                    }
                }
                if mine.iter().any(|call| call.kind == CallKind::Compensate) {
                    problems.push(format!(
                        "saga {id} (c-{n:03}) completed but got compensate calls"
                    ));
                }
            }
            Expected::RefusedAt(refused) => {
                let label = format!("saga {id} (c-{n:03}, refused at {})", STEPS[refused]);
                if status != Some(SagaStatus::Compensated) {
                    problems.push(format!("{label}: {status:?}, expected COMPENSATED"));
                }
                let mut expected_steps = vec![Some(StepStatus::Compensated); refused];
                expected_steps.push(Some(StepStatus::Failed));
                expected_steps.resize(STEPS.len(), Some(StepStatus::Pending));
                if step_statuses != expected_steps {
                    problems.push(format!(
                        "{label}: steps {step_statuses:?}, expected {expected_steps:?}"
                    ));
                }
                if !executes(STEPS[refused])
                    .last()
                    .is_some_and(|call| is_refusal(call))
                {
                    problems.push(format!(
                        "{label}: the last execute of the refused step was not the refusal"
                    ));
                }
                for step in &STEPS[refused + 1..] {
                    if !executes(step).is_empty() {
                        problems.push(format!("{label}: {step} was executed after the refusal"));
                    }
                }
                for step in &STEPS[refused..] {
                    if !compensates(step).is_empty() {
                        problems.push(format!("{label}: {step} was compensated"));
                    }
                }
                for step in &STEPS[..refused] {
                    if !executes(step).iter().any(|call| is_success(call)) {
                        problems.push(format!("{label}: {step} never got a successful execute"));
                    }
                    match compensates(step).last() {
                        None => problems.push(format!(
                            "{label}: {step} was executed but never compensated"
                        )),
                        Some(last) if !is_success(last) => problems.push(format!(
                            "{label}: the compensation of {step} ended on attempt {} that failed",
                            last.attempt
                        )),
                        Some(_) => {}
                    }
                }
                // The first compensate call of each step, newest step first.
                let mut first_compensations: Vec<usize> = Vec::new();
                for call in mine.iter().filter(|call| call.kind == CallKind::Compensate) {
                    if let Some(k) = step_index(&call.step)
                        && !first_compensations.contains(&k)
                    {
                        first_compensations.push(k);
                    }
                }
                let reverse: Vec<usize> = (0..refused).rev().collect();
                if first_compensations != reverse {
                    problems.push(format!(
                        "{label}: compensations began in step order {first_compensations:?}, expected {reverse:?}"
                    ));
                }
                if let Some(first) = mine.iter().find(|call| call.kind == CallKind::Compensate) {
                    for late in mine.iter().filter(|call| {
                        call.kind == CallKind::Execute && call.received_at > first.received_at
                    }) {
                        problems.push(format!(
                            "{label}: execute {} attempt {} arrived after compensation began",
                            late.idempotency_key, late.attempt
                        ));
                    }
                }
            }
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// 2. A crash while a step waits out its backoff: the timer is in the database.

#[tokio::test]
async fn sigkill_during_a_backoff_keeps_the_key_and_the_timer() -> anyhow::Result<()> {
    with_database("backoff", |db| async move {
        const BACKOFF: Duration = Duration::from_secs(3);
        let script: Script = Arc::new(|call, _| {
            if call.step == "reserve" && call.attempt == 1 {
                Answer::status(tonic::Code::Unavailable)
            } else {
                participant::default_answer(call)
            }
        });
        let participant = FakeParticipant::start_scripted("p", script).await?;
        let definition = small_definition(
            "backoff",
            &[("reserve", "p"), ("confirm", "p")],
            r#"retry = { max_attempts = 3, initial_delay = "3s", multiplier = 1.0, max_delay = "3s", jitter = 0.0 }"#,
        );
        let defs = Scratch::defs(&[("backoff.toml", &definition)])?;
        let logs = Scratch::logs("backoff-logs")?;
        let args = sagad_args(&db, &defs, &[&participant]);

        let mut sagad = SagadProcess::start(&args, &logs).await?;
        let mut client = sagad.client().await?;
        let id = start_saga(&mut client, "backoff", json!({})).await?;
        // The failed attempt is recorded with its retry time: now the timer exists only in the
        // database (and in the memory of the process about to die).
        wait_until(&mut client, &id, Duration::from_secs(30), |saga| {
            saga.steps.first().is_some_and(|step| step.attempts >= 1 && !step.last_error.is_empty())
        })
        .await?;
        sagad.kill().await?;
        let killed_at = Instant::now();
        let first = participant.calls_for(&id).first().cloned().context("no first attempt")?;
        ensure!(
            killed_at < first.received_at + BACKOFF,
            "sagad was killed {:?} after attempt 1, after the backoff: the test proves nothing",
            killed_at - first.received_at
        );

        let sagad = SagadProcess::start(&args, &logs).await?;
        let mut client = sagad.client().await?;
        let saga = wait_terminal(&mut client, &id, Duration::from_secs(30)).await?;
        assert_eq!(SagaStatus::try_from(saga.status), Ok(SagaStatus::Completed));
        assert_eq!(taken_over_count(&sagad.log)?, 1, "the restarted sagad takes over the one saga");

        let reserve: Vec<CallRecord> = participant
            .calls_for(&id)
            .into_iter()
            .filter(|call| call.step == "reserve")
            .collect();
        let attempts: Vec<u32> = reserve.iter().map(|call| call.attempt).collect();
        assert_eq!(attempts, [1, 2], "one failed attempt, one retry after the restart");
        let key = format!("{id}/reserve/execute");
        assert!(reserve.iter().all(|call| call.idempotency_key == key), "{reserve:?}");
        assert!(reserve.iter().all(|call| call.kind == CallKind::Execute));
        let gap = reserve[1].received_at - reserve[0].received_at;
        // Lower bound only (the restart took a moment); 100 ms of slack for clock granularity.
        assert!(
            gap >= BACKOFF - Duration::from_millis(100),
            "attempt 2 came {gap:?} after attempt 1: the durable timer ({BACKOFF:?}) was not kept"
        );
        let confirm: Vec<u32> = participant
            .calls_for(&id)
            .iter()
            .filter(|call| call.step == "confirm")
            .map(|call| call.attempt)
            .collect();
        assert_eq!(confirm, [1]);
        Ok(())
    })
    .await
}

/// The attempts of `step`'s action the participant received for saga `id`, in order.
fn attempts_received(participant: &FakeParticipant, id: &str, step: &str) -> Vec<u32> {
    participant
        .calls_for(id)
        .iter()
        .filter(|call| call.step == step && call.kind == CallKind::Execute)
        .map(|call| call.attempt)
        .collect()
}

/// The failure events in a saga's history.
fn failures_logged(saga: &Saga) -> usize {
    saga.history
        .iter()
        .filter(|event| event.r#type == "step_attempt_failed")
        .count()
}

#[tokio::test]
async fn a_long_run_of_failures_keeps_the_log_small_and_survives_sigkill() -> anyhow::Result<()> {
    with_database("failing_run", |db| async move {
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let up = healthy.clone();
        let script: Script = Arc::new(move |call, _| {
            if call.step == "reserve" && !up.load(std::sync::atomic::Ordering::SeqCst) {
                Answer::status(tonic::Code::Unavailable)
            } else {
                participant::default_answer(call)
            }
        });
        let participant = FakeParticipant::start_scripted("p", script).await?;
        let definition = small_definition(
            "failing",
            &[("reserve", "p"), ("confirm", "p")],
            r#"retry = { max_attempts = 0, initial_delay = "20ms", multiplier = 1.0, max_delay = "20ms", jitter = 0.0 }"#,
        );
        let defs = Scratch::defs(&[("failing.toml", &definition)])?;
        let logs = Scratch::logs("failing-logs")?;
        let args = sagad_args(&db, &defs, &[&participant]);

        let mut sagad = SagadProcess::start(&args, &logs).await?;
        let mut client = sagad.client().await?;
        let id = start_saga(&mut client, "failing", json!({})).await?;
        let deadline = Duration::from_secs(60);
        wait_until(&mut client, &id, deadline, |saga| {
            saga.steps.first().is_some_and(|step| step.attempts >= 60)
        })
        .await?;
        let saga = get_saga(&mut client, &id).await?;
        let reserve = saga.steps.first().context("no step")?;
        let received = attempts_received(&participant, &id, "reserve").len() as u32;
        // Every attempt counted (one more may be in flight), few logged.
        ensure!(
            reserve.attempts == received || reserve.attempts + 1 == received,
            "{} attempts counted, {received} received",
            reserve.attempts
        );
        ensure!(reserve.last_error.contains("Unavailable"), "{reserve:?}");
        ensure!(reserve.next_attempt_at.is_some(), "no next attempt time");
        let bound = 3 + reserve.attempts.ilog2() as usize + 1;
        ensure!(
            failures_logged(&saga) <= bound,
            "{} failures logged for {} attempts",
            failures_logged(&saga),
            reserve.attempts
        );

        // SIGKILL in the middle of the run; the restarted sagad takes the saga over and goes
        // on numbering where the run was.
        sagad.kill().await?;
        let before_kill = attempts_received(&participant, &id, "reserve").len();
        let sagad = SagadProcess::start(&args, &logs).await?;
        let mut client = sagad.client().await?;
        let target = before_kill as u32 + 20;
        wait_until(&mut client, &id, deadline, |saga| {
            saga.steps.first().is_some_and(|step| step.attempts >= target)
        })
        .await?;
        healthy.store(true, std::sync::atomic::Ordering::SeqCst);
        let saga = wait_terminal(&mut client, &id, deadline).await?;
        ensure!(
            saga.status == SagaStatus::Completed as i32,
            "{:?}: {}",
            saga.status,
            saga.failure_reason
        );
        let saga = get_saga(&mut client, &id).await?;

        // Attempt numbers rise by one each time; only the call in flight at the kill may be
        // sent again with its number.
        let attempts = attempts_received(&participant, &id, "reserve");
        let repeats = attempts.windows(2).filter(|pair| pair[0] == pair[1]).count();
        ensure!(
            attempts.first() == Some(&1)
                && attempts.windows(2).all(|pair| pair[1] == pair[0] || pair[1] == pair[0] + 1)
                && repeats <= 1,
            "attempts received: {attempts:?}"
        );
        let reserve = saga.steps.first().context("no step")?;
        ensure!(
            Some(&reserve.attempts) == attempts.last(),
            "{} attempts counted, the last received was {:?}",
            reserve.attempts,
            attempts.last()
        );
        let bound = 3 + reserve.attempts.ilog2() as usize + 1;
        ensure!(
            failures_logged(&saga) <= bound,
            "{} failures logged for {} attempts",
            failures_logged(&saga),
            reserve.attempts
        );
        let seqs: Vec<u64> = saga.history.iter().map(|event| event.seq).collect();
        ensure!(seqs == (1..=saga.version).collect::<Vec<_>>(), "{seqs:?}");
        println!(
            "{} attempts, {} of them logged; {} events in all",
            reserve.attempts,
            failures_logged(&saga),
            saga.version
        );
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 3 and 4. What sagad must refuse at start: one line on stderr, non-zero exit.

/// A database URL nobody answers on: the refusals below must happen before sagad tries it.
const NO_DATABASE: &str = "postgres://postgres@127.0.0.1:1/sagad_never";

/// Runs the sagad binary to its exit with the config variables removed from its environment
/// (so only the given flags count); returns its status, stderr and how long it ran.
async fn run_sagad(args: &[String]) -> anyhow::Result<(ExitStatus, String, Duration)> {
    let mut command = tokio::process::Command::new(daemon::binary("sagad")?);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for name in [
        "DATABASE_URL",
        "SAGAD_LISTEN",
        "SAGAD_DEFS",
        "SAGAD_PARTICIPANTS",
        "SAGAD_HTTP_LISTEN",
        "SAGAD_METRICS_LISTEN",
        "SAGAD_LOG_FORMAT",
        "SAGAD_DATABASE_WAIT",
        "SAGAD_PARTICIPANT_CONCURRENCY",
        "SAGAD_SHUTDOWN_GRACE",
        "SAGAD_TLS_CERT",
        "SAGAD_TLS_KEY",
        "SAGAD_TLS_CLIENT_CA",
        "SAGAD_AUTH_TOKENS",
    ] {
        command.env_remove(name);
    }
    let started = Instant::now();
    let output = tokio::time::timeout(Duration::from_secs(90), command.output())
        .await
        .context("sagad did not exit within 90 s")??;
    Ok((
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
        started.elapsed(),
    ))
}

/// stderr must be exactly one line (a trailing newline aside); returns it.
fn the_one_line(stderr: &str) -> anyhow::Result<&str> {
    let line = stderr.strip_suffix('\n').unwrap_or(stderr);
    ensure!(
        !line.trim().is_empty() && !line.contains('\n'),
        "stderr should be exactly one line, got {stderr:?}"
    );
    Ok(line)
}

/// Any free port: sagad binds it only once everything else is checked.
const ANY_PORT: &str = "127.0.0.1:0";

/// A folder with one valid definition using participant `p`.
fn valid_defs() -> anyhow::Result<Scratch> {
    Scratch::defs(&[("ok.toml", &small_definition("ok", &[("a", "p")], ""))])
}

#[tokio::test]
async fn a_bad_definition_file_is_refused_in_one_line_before_the_database() -> anyhow::Result<()> {
    let cases: [(&str, String, &str); 6] = [
        (
            "input schema that is no JSON Schema",
            format!(
                "input_schema = {{ properties = {{ amount = {{ minimum = \"one\" }} }} }}\n{}",
                small_definition("bad", &[("a", "p")], "")
            ),
            "input_schema.properties.amount.minimum",
        ),
        (
            "input schema referring to the network",
            format!(
                "input_schema = {{ properties = {{ a = {{ \"$ref\" = \"https://example.com/a.json\" }} }} }}\n{}",
                small_definition("bad", &[("a", "p")], "")
            ),
            "input_schema.properties.a.$ref",
        ),
        (
            "duplicate step name",
            small_definition("bad", &[("a", "p"), ("a", "p")], ""),
            "steps[1].name",
        ),
        (
            "bad duration",
            small_definition("bad", &[("a", "p")], r#"timeout = "5 parsecs""#),
            "steps[0].timeout",
        ),
        (
            "max_attempts out of range",
            small_definition("bad", &[("a", "p")], "retry = { max_attempts = 5000 }"),
            "steps[0].retry.max_attempts",
        ),
        (
            "participant without --participant",
            small_definition("bad", &[("a", "p"), ("b", "q")], ""),
            "steps[1].participant",
        ),
    ];
    for (what, text, field) in cases {
        // A valid file beside it, sorted first, so the bad one is found among others.
        let defs = Scratch::defs(&[
            ("a_ok.toml", &small_definition("ok", &[("a", "p")], "")),
            ("bad.toml", &text),
        ])?;
        let args: Vec<String> = vec![
            "--database-url".into(),
            NO_DATABASE.into(),
            "--defs".into(),
            defs.display().to_string(),
            "--participant".into(),
            "p=http://127.0.0.1:1".into(),
            "--listen".into(),
            ANY_PORT.into(),
            "--http-listen".into(),
            ANY_PORT.into(),
        ];
        let (status, stderr, took) = run_sagad(&args).await?;
        assert!(!status.success(), "{what}: sagad exited with {status}");
        assert!(
            status.code().is_some(),
            "{what}: sagad died of a signal: {status}"
        );
        let line = the_one_line(&stderr).with_context(|| what.to_owned())?;
        println!("{what}: refused in {took:?}: {line}");
        assert!(
            line.contains("bad.toml"),
            "{what}: {line:?} does not name the file"
        );
        assert!(
            line.contains(field),
            "{what}: {line:?} does not name the field {field}"
        );
        assert!(
            !line.contains("a_ok.toml"),
            "{what}: {line:?} names the wrong file"
        );
        assert!(
            !line.contains("127.0.0.1:1/") && !line.contains("database"),
            "{what}: {line:?} is about the database, the definition should be checked first"
        );
        // The database wait defaults to 30 s: well below it proves nothing waited on Postgres.
        assert!(
            took < Duration::from_secs(15),
            "{what}: took {took:?} to refuse"
        );
    }
    Ok(())
}

/// Flags for a sagad that would start if the database were there, minus `without`.
fn flags_without(defs: &Path, without: &str) -> anyhow::Result<Vec<String>> {
    let all = [
        ("--database-url", NO_DATABASE.to_owned()),
        ("--defs", defs.display().to_string()),
        ("--participant", "p=http://127.0.0.1:1".to_owned()),
        ("--listen", ANY_PORT.to_owned()),
        ("--http-listen", ANY_PORT.to_owned()),
    ];
    Ok(all
        .into_iter()
        .filter(|(flag, _)| *flag != without)
        .flat_map(|(flag, value)| [flag.to_owned(), value])
        .collect())
}

#[tokio::test]
async fn a_bad_flag_is_refused_in_one_line_naming_it() -> anyhow::Result<()> {
    let defs = valid_defs()?;
    let cases: [(&str, Vec<String>, &str); 5] = [
        (
            "--listen nonsense",
            [
                flags_without(&defs, "--listen")?,
                vec!["--listen".into(), "nonsense".into()],
            ]
            .concat(),
            "--listen",
        ),
        (
            "--participant without =URI",
            [
                flags_without(&defs, "")?,
                vec!["--participant".into(), "order".into()],
            ]
            .concat(),
            "--participant",
        ),
        (
            "unknown flag",
            [flags_without(&defs, "")?, vec!["--bogus".into()]].concat(),
            "--bogus",
        ),
        (
            "plaintext on every address without --insecure",
            [
                flags_without(&defs, "--listen")?,
                vec!["--listen".into(), "0.0.0.0:0".into()],
            ]
            .concat(),
            "--insecure",
        ),
        (
            "--tls-cert without --tls-key",
            [
                flags_without(&defs, "")?,
                vec!["--tls-cert".into(), "cert.pem".into()],
            ]
            .concat(),
            "--tls-key",
        ),
    ];
    for (what, args, flag) in cases {
        let (status, stderr, took) = run_sagad(&args).await?;
        assert!(!status.success(), "{what}: sagad exited with {status}");
        assert!(
            status.code().is_some(),
            "{what}: sagad died of a signal: {status}"
        );
        let line = the_one_line(&stderr).with_context(|| what.to_owned())?;
        assert!(line.contains(flag), "{what}: {line:?} does not name {flag}");
        assert!(
            took < Duration::from_secs(15),
            "{what}: took {took:?} to refuse"
        );
    }
    Ok(())
}

#[tokio::test]
async fn plaintext_on_every_address_starts_with_insecure() -> anyhow::Result<()> {
    let defs = valid_defs()?;
    let args = [
        flags_without(&defs, "--listen")?,
        vec![
            "--listen".into(),
            "0.0.0.0:0".into(),
            "--insecure".into(),
            "--database-wait".into(),
            "1s".into(),
        ],
    ]
    .concat();
    let (status, stderr, _) = run_sagad(&args).await?;
    // Past the flags, it stops only at the database nobody answers.
    assert!(!status.success(), "sagad exited with {status}");
    let plain = strip_ansi(&stderr);
    let error = plain.lines().last().unwrap_or_default();
    assert!(
        error.starts_with("sagad:") && error.contains("--database-url"),
        "with --insecure the refusal should be the database's: {plain:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_missing_database_url_is_refused_in_one_line_naming_it() -> anyhow::Result<()> {
    let defs = valid_defs()?;
    let (status, stderr, _) = run_sagad(&flags_without(&defs, "--database-url")?).await?;
    assert!(!status.success(), "sagad exited with {status}");
    let line = the_one_line(&stderr)?;
    assert!(
        line.contains("--database-url"),
        "{line:?} does not name --database-url"
    );
    Ok(())
}

#[tokio::test]
async fn an_unreachable_database_is_refused_after_a_bounded_wait() -> anyhow::Result<()> {
    let defs = valid_defs()?;
    let args = [
        flags_without(&defs, "")?,
        vec!["--database-wait".into(), "1s".into()],
    ]
    .concat();
    let (status, stderr, took) = run_sagad(&args).await?;
    assert!(!status.success(), "sagad exited with {status}");
    assert!(status.code().is_some(), "sagad died of a signal: {status}");
    assert!(
        took < Duration::from_secs(30),
        "gave up only after {took:?}"
    );
    // Log records (the retries) also go to stderr; the error itself is one line, the last.
    let plain = strip_ansi(&stderr);
    let errors: Vec<&str> = plain
        .lines()
        .filter(|line| line.starts_with("sagad:"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line expected in {plain:?}");
    assert_eq!(
        plain.lines().last(),
        errors.first().copied(),
        "the error is the last line: {plain:?}"
    );
    assert!(
        errors[0].contains("--database-url"),
        "{:?} does not name --database-url",
        errors[0]
    );
    let others: Vec<&str> = plain
        .lines()
        .filter(|line| {
            !line.starts_with("sagad:") && !line.starts_with(|c: char| c.is_ascii_digit())
        })
        .collect();
    assert!(
        others.is_empty(),
        "stderr has lines that are neither log records nor the error: {others:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. SIGTERM: graceful shutdown.

#[tokio::test]
async fn sigterm_on_an_idle_sagad_exits_zero() -> anyhow::Result<()> {
    with_database("term-idle", |db| async move {
        let participant = FakeParticipant::start("p").await?;
        let defs = valid_defs()?;
        let logs = Scratch::logs("term-idle-logs")?;
        let mut sagad =
            SagadProcess::start(&sagad_args(&db, &defs, &[&participant]), &logs).await?;
        let sent = Instant::now();
        let status = tokio::time::timeout(Duration::from_secs(30), sagad.terminate())
            .await
            .context("sagad did not exit within 30 s of SIGTERM")??;
        assert_eq!(
            status.code(),
            Some(0),
            "exit status {status}; log: {}",
            read_log(&sagad.log)
        );
        eprintln!("idle sagad exited {:?} after SIGTERM", sent.elapsed());
        Ok(())
    })
    .await
}

fn read_log(path: &Path) -> String {
    strip_ansi(&std::fs::read_to_string(path).unwrap_or_default())
}

#[tokio::test]
async fn sigterm_with_a_call_in_flight_exits_zero_and_the_saga_completes_after_restart()
-> anyhow::Result<()> {
    with_database("term-busy", |db| async move {
        let script: Script =
            Arc::new(|call, _| participant::default_answer(call).after(Duration::from_secs(1)));
        let participant = FakeParticipant::start_scripted("p", script).await?;
        let defs = Scratch::defs(&[(
            "graceful.toml",
            &small_definition("graceful", &[("a", "p"), ("b", "p")], ""),
        )])?;
        let logs = Scratch::logs("term-busy-logs")?;
        let args = sagad_args(&db, &defs, &[&participant]);

        let mut sagad = SagadProcess::start(&args, &logs).await?;
        let mut client = sagad.client().await?;
        let id = start_saga(&mut client, "graceful", json!({})).await?;
        let until = Instant::now() + Duration::from_secs(30);
        while participant.calls_for(&id).is_empty() {
            ensure!(Instant::now() < until, "step a was never called");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(client);
        let status = tokio::time::timeout(Duration::from_secs(30), sagad.terminate())
            .await
            .context("sagad did not exit within 30 s of SIGTERM")??;
        let exited = Instant::now();
        assert_eq!(
            status.code(),
            Some(0),
            "exit status {status}; log: {}",
            read_log(&sagad.log)
        );
        let before: Vec<CallRecord> = participant.calls_for(&id);
        assert!(
            before.iter().all(|call| call.step == "a"),
            "after SIGTERM sagad must start no new call, yet got {:?}",
            before
                .iter()
                .map(|call| &call.idempotency_key)
                .collect::<Vec<_>>()
        );

        let sagad = SagadProcess::start(&args, &logs).await?;
        let mut client = sagad.client().await?;
        let saga = wait_terminal(&mut client, &id, Duration::from_secs(30)).await?;
        assert_eq!(SagaStatus::try_from(saga.status), Ok(SagaStatus::Completed));
        let calls = participant.calls_for(&id);
        let a: Vec<&CallRecord> = calls.iter().filter(|call| call.step == "a").collect();
        let b: Vec<&CallRecord> = calls.iter().filter(|call| call.step == "b").collect();
        // "Finish or release": a may be re-sent after the restart, but only with its key.
        assert!(
            a.iter()
                .all(|call| call.idempotency_key == format!("{id}/a/execute")
                    && call.kind == CallKind::Execute),
            "{a:?}"
        );
        assert_eq!(b.len(), 1, "b once, by the new process: {b:?}");
        assert!(
            b[0].received_at > exited,
            "b was called before the old process exited"
        );
        assert!(
            calls.iter().all(|call| call.kind == CallKind::Execute),
            "nothing to compensate: {calls:?}"
        );
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 6. Metrics.

/// `GET path` over HTTP/1.0; returns the status line, the headers and the body.
async fn http_get(
    addr: std::net::SocketAddr,
    path: &str,
) -> anyhow::Result<(String, String, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut response))
        .await
        .context("no complete HTTP answer within 30 s")??;
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no end of headers")?;
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    Ok((status.to_owned(), headers.to_owned(), body.to_owned()))
}

#[tokio::test]
async fn metrics_answer_in_prometheus_text_after_a_saga() -> anyhow::Result<()> {
    with_database("metrics", |db| async move {
        let participant = FakeParticipant::start("p").await?;
        let defs = valid_defs()?;
        let logs = Scratch::logs("metrics-logs")?;
        let sagad = SagadProcess::start(&sagad_args(&db, &defs, &[&participant]), &logs).await?;
        let mut client = sagad.client().await?;
        let id = start_saga(&mut client, "ok", json!({})).await?;
        let saga = wait_terminal(&mut client, &id, Duration::from_secs(30)).await?;
        assert_eq!(SagaStatus::try_from(saga.status), Ok(SagaStatus::Completed));

        let (status, headers, body) = http_get(sagad.http_addr, "/metrics").await?;
        assert!(status.contains(" 200"), "GET /metrics answered {status:?}");
        assert!(
            headers
                .to_ascii_lowercase()
                .contains("content-type: text/plain"),
            "not Prometheus text: {headers:?}"
        );
        let samples: Vec<&str> = body
            .lines()
            .filter(|line| line.starts_with("sagad_"))
            .collect();
        assert!(
            !samples.is_empty(),
            "no sagad_ sample after a saga ran:\n{body}"
        );
        // The saga that ran is counted.
        assert!(
            samples
                .iter()
                .any(|line| line.starts_with("sagad_sagas_started_total") && !line.ends_with(" 0")),
            "sagad_sagas_started_total missing or zero:\n{body}"
        );
        Ok(())
    })
    .await
}
