//! The engine against scripted participants: an in-process sagad on a database of its own per
//! test. Each test checks what the participants received (order, keys, attempts, context) and
//! what the API reports afterwards (status, steps, version, history).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use sagad_e2e::participant::{Script, default_answer};
use sagad_e2e::*;
use sagad_proto::v1::{
    CancelSagaRequest, GetSagaRequest, ListSagasRequest, Saga, SagaStatus, SagaView,
    StartSagaRequest, StartSagaResponse, Step, StepStatus,
};
use serde_json::{Value, json};
use tonic::Code;

/// How long a saga may take to get somewhere on a loaded 2-core box.
const DEADLINE: Duration = Duration::from_secs(30);

/// The demo's steps: name, participant, action, compensation.
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

/// Fast policies: generous call timeout, short backoffs, three attempts, unlimited compensation.
const FAST: &str = r#"timeout = "5s"
retry = { max_attempts = 3, initial_delay = "20ms", multiplier = 2.0, max_delay = "100ms", jitter = 0.0 }
compensation_retry = { max_attempts = 0, initial_delay = "20ms", multiplier = 2.0, max_delay = "100ms", jitter = 0.0 }"#;

/// The demo's four steps under saga type `name`, with `defaults` as the `[defaults]` table and
/// extra lines for some steps (`(step, "timeout = \"1s\"")`).
fn fulfillment_def(name: &str, defaults: &str, extra: &[(&str, &str)]) -> String {
    let mut text = format!(
        "name = \"{name}\"\nversion = 1\nrequired_input = [\"customer_id\"]\n\n[defaults]\n{defaults}\n"
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

/// A definitions folder with one `fast` saga type.
fn fast_defs(defaults: &str, extra: &[(&str, &str)]) -> anyhow::Result<Scratch> {
    Scratch::defs(&[("fast.toml", &fulfillment_def("fast", defaults, extra))])
}

fn demo_defs() -> PathBuf {
    repo_root().join("saga-defs")
}

fn order_input(customer: &str) -> Value {
    json!({
        "customer_id": customer,
        "amount_cents": 1250,
        "currency": "EUR",
        "country": "FR",
        "items": [{"sku": "sku-1", "quantity": 2}],
    })
}

/// A JSON document as it comes back from the wire (numbers become doubles).
fn wire(value: Value) -> Value {
    to_json(&Some(to_struct(value)))
}

fn script(f: impl Fn(&CallRecord, &[CallRecord]) -> Answer + Send + Sync + 'static) -> Script {
    Arc::new(f)
}

/// How many calls with the same key the participant received before this one.
fn earlier_tries(call: &CallRecord, earlier: &[CallRecord]) -> usize {
    earlier
        .iter()
        .filter(|other| other.idempotency_key == call.idempotency_key)
        .count()
}

/// A field of the saga input the call carries.
fn input_field<'a>(call: &'a CallRecord, field: &str) -> &'a Value {
    &call.input["input"][field]
}

fn is_execute(call: &CallRecord, step: &str) -> bool {
    call.kind == CallKind::Execute && call.step == step
}

fn is_compensate(call: &CallRecord, step: &str) -> bool {
    call.kind == CallKind::Compensate && call.step == step
}

/// One line per call: `X step #attempt` for Execute, `C step #attempt` for Compensate.
fn status(saga: &Saga) -> SagaStatus {
    SagaStatus::try_from(saga.status).unwrap_or(SagaStatus::Unspecified)
}

/// Status, failure reason and steps: enough to see what went wrong, without the history.
fn brief(saga: &Saga) -> String {
    let steps: Vec<String> = saga
        .steps
        .iter()
        .map(|step| {
            format!(
                "{}: {:?} attempts {} compensations {} error {:?}",
                step.name,
                StepStatus::try_from(step.status).unwrap_or(StepStatus::Unspecified),
                step.attempts,
                step.compensation_attempts,
                step.last_error
            )
        })
        .collect();
    format!(
        "saga {} {:?} v{} ({:?}); steps [{}]",
        saga.saga_id,
        status(saga),
        saga.version,
        saga.failure_reason,
        steps.join("; ")
    )
}

fn step<'a>(saga: &'a Saga, name: &str) -> &'a Step {
    saga.steps
        .iter()
        .find(|step| step.name == name)
        .unwrap_or_else(|| panic!("saga {} has no step {name}: {:?}", saga.saga_id, saga.steps))
}

fn step_status(saga: &Saga, name: &str) -> StepStatus {
    StepStatus::try_from(step(saga, name).status).unwrap_or(StepStatus::Unspecified)
}

/// The history is the log: seq 1..=version, opening with `saga_started`, ending with `last`.
fn assert_history(saga: &Saga, last: &str) {
    let seqs: Vec<u64> = saga.history.iter().map(|event| event.seq).collect();
    let expected: Vec<u64> = (1..=saga.version).collect();
    assert_eq!(seqs, expected, "history seqs of {}", saga.saga_id);
    assert_eq!(
        saga.history.first().map(|event| event.r#type.as_str()),
        Some("saga_started")
    );
    assert_eq!(
        saga.history.last().map(|event| event.r#type.as_str()),
        Some(last)
    );
}

/// Polls `done` until it holds.
async fn wait_for(what: &str, done: impl Fn() -> bool) -> anyhow::Result<()> {
    let until = Instant::now() + DEADLINE;
    while !done() {
        if Instant::now() > until {
            bail!("{what}: not within {DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// One test's world: a database, the three participants sharing one script, sagad.
struct Env {
    participants: Vec<FakeParticipant>,
    args: Vec<String>,
    daemon: Option<TestDaemon>,
    client: Client,
    /// Last, so that on a panic sagad is told to stop before its database goes.
    db: DatabaseGuard,
}

impl Env {
    async fn start(label: &str, defs: &Path, script: Script) -> anyhow::Result<Env> {
        Self::start_on(&database::server_url(), label, defs, script).await
    }

    /// With its database on `server` (a URL without a database name).
    async fn start_on(
        server: &str,
        label: &str,
        defs: &Path,
        script: Script,
    ) -> anyhow::Result<Env> {
        let db = DatabaseGuard::on(server, label);
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
        Ok(Env {
            db,
            participants,
            args,
            daemon: Some(daemon),
            client,
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

    fn all_calls(&self) -> Vec<CallRecord> {
        self.participants
            .iter()
            .flat_map(FakeParticipant::calls)
            .collect()
    }

    async fn start_saga(
        &mut self,
        saga_type: &str,
        input: Value,
        key: &str,
        correlation_id: &str,
    ) -> Result<StartSagaResponse, tonic::Status> {
        self.client
            .start_saga(StartSagaRequest {
                saga_type: saga_type.to_owned(),
                idempotency_key: key.to_owned(),
                input: Some(to_struct(input)),
                correlation_id: correlation_id.to_owned(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    async fn begin(&mut self, saga_type: &str, input: Value) -> anyhow::Result<String> {
        Ok(self.start_saga(saga_type, input, "", "").await?.saga_id)
    }

    async fn get(&mut self, saga_id: &str) -> anyhow::Result<Saga> {
        get_saga(&mut self.client, saga_id).await
    }

    async fn terminal(&mut self, saga_id: &str) -> anyhow::Result<Saga> {
        wait_terminal(&mut self.client, saga_id, DEADLINE).await?;
        // wait_terminal's read is enough for the status; this one carries the history.
        self.get(saga_id).await
    }

    async fn until(&mut self, saga_id: &str, done: impl Fn(&Saga) -> bool) -> anyhow::Result<Saga> {
        wait_until(&mut self.client, saga_id, DEADLINE, done).await
    }

    async fn cancel(&mut self, saga_id: &str) -> Result<Saga, tonic::Status> {
        self.client
            .cancel_saga(CancelSagaRequest {
                saga_id: saga_id.to_owned(),
                reason: "test cancels".to_owned(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Graceful stop of sagad, then a new one on the same database and participants.
    async fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(daemon) = self.daemon.take() {
            daemon.stop().await.context("stopping sagad")?;
        }
        let daemon = TestDaemon::start(&self.args).await?;
        self.client = daemon.client().await?;
        self.daemon = Some(daemon);
        Ok(())
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

/// The demo's outputs, as the CONTRACT names them.
fn demo_output(call: &CallRecord) -> Answer {
    match (call.kind, call.step.as_str()) {
        (CallKind::Execute, "create_order") => Answer::success(json!({"order_id": "o-17"})),
        (CallKind::Execute, "charge_payment") => Answer::success(json!({"payment_id": "p-17"})),
        (CallKind::Execute, "schedule_shipment") => {
            Answer::success(json!({"shipment_id": "s-17", "eta_days": 3}))
        }
        (CallKind::Execute, "approve_order") => Answer::success(json!({"approved": true})),
        _ => default_answer(call),
    }
}

#[tokio::test]
async fn happy_path_calls_every_step_once_in_order_with_a_growing_context() -> anyhow::Result<()> {
    let mut env = Env::start("happy", &demo_defs(), script(|call, _| demo_output(call))).await?;
    let input = order_input("c-happy");
    let started = env
        .start_saga("order_fulfillment", input.clone(), "", "corr-happy-1")
        .await?;
    assert!(started.created);
    let id = started.saga_id.clone();
    let saga = env.terminal(&id).await?;
    assert_eq!(status(&saga), SagaStatus::Completed, "{}", brief(&saga));

    let calls = env.calls(&id);
    assert_eq!(
        call_trace(&calls),
        [
            "X create_order #1",
            "X charge_payment #1",
            "X schedule_shipment #1",
            "X approve_order #1"
        ]
    );
    let outputs = [
        ("create_order", json!({"order_id": "o-17"})),
        ("charge_payment", json!({"payment_id": "p-17"})),
        (
            "schedule_shipment",
            json!({"shipment_id": "s-17", "eta_days": 3}),
        ),
        ("approve_order", json!({"approved": true})),
    ];
    let mut steps_before = serde_json::Map::new();
    for (k, call) in calls.iter().enumerate() {
        let (name, participant, action, _) = STEPS[k];
        assert_eq!(call.participant, participant);
        assert_eq!(call.action, action);
        assert_eq!(call.saga_id, id);
        assert_eq!(call.saga_type, "order_fulfillment");
        assert_eq!(call.idempotency_key, format!("{id}/{name}/execute"));
        assert_eq!(call.attempt, 1);
        assert_eq!(call.correlation_id, "corr-happy-1");
        assert_eq!(call.metadata_saga_id.as_deref(), Some(id.as_str()));
        assert_eq!(
            call.metadata_correlation_id.as_deref(),
            Some("corr-happy-1")
        );
        let expected =
            json!({"input": input.clone(), "steps": Value::Object(steps_before.clone())});
        assert_eq!(call.input, wire(expected), "context seen by {name}");
        steps_before.insert(name.to_owned(), outputs[k].1.clone());
    }

    assert_eq!(saga.correlation_id, "corr-happy-1");
    assert_eq!(to_json(&saga.input), wire(input.clone()));
    assert_eq!(
        to_json(&saga.context),
        wire(json!({"input": input, "steps": Value::Object(steps_before)}))
    );
    for (name, output) in &outputs {
        let step = step(&saga, name);
        assert_eq!(step_status(&saga, name), StepStatus::Succeeded);
        assert_eq!(step.attempts, 1);
        assert_eq!(step.compensation_attempts, 0);
        assert_eq!(to_json(&step.output), wire(output.clone()), "{name}");
    }
    // Started, four steps, completed.
    assert_eq!(saga.version, 6);
    assert_history(&saga, "saga_completed");
    assert!(saga.failure_reason.is_empty(), "{}", saga.failure_reason);
    env.finish().await
}

#[tokio::test]
async fn refusal_at_charge_payment_compensates_create_order_only() -> anyhow::Result<()> {
    let refuse = script(|call, _| {
        if is_execute(call, "charge_payment") {
            Answer::refuse("INSUFFICIENT_FUNDS")
        } else {
            demo_output(call)
        }
    });
    let mut env = Env::start("refuse_charge", &demo_defs(), refuse).await?;
    let id = env
        .begin("order_fulfillment", order_input("c-poor"))
        .await?;
    let saga = env.terminal(&id).await?;
    assert_eq!(status(&saga), SagaStatus::Compensated, "{}", brief(&saga));
    assert!(
        saga.failure_reason.contains("INSUFFICIENT_FUNDS"),
        "failure_reason: {:?}",
        saga.failure_reason
    );

    let calls = env.calls(&id);
    assert_eq!(
        call_trace(&calls),
        [
            "X create_order #1",
            "X charge_payment #1",
            "C create_order #1"
        ]
    );
    let cancel = &calls[2];
    assert_eq!(cancel.participant, "order");
    assert_eq!(cancel.action, "CancelOrder");
    assert_eq!(
        cancel.idempotency_key,
        format!("{id}/create_order/compensate")
    );
    assert_eq!(cancel.metadata_saga_id.as_deref(), Some(id.as_str()));
    assert_eq!(
        cancel.input,
        wire(
            json!({"input": order_input("c-poor"), "steps": {"create_order": {"order_id": "o-17"}}})
        )
    );

    assert_eq!(step_status(&saga, "create_order"), StepStatus::Compensated);
    assert_eq!(step(&saga, "create_order").compensation_attempts, 1);
    assert_eq!(step_status(&saga, "charge_payment"), StepStatus::Failed);
    assert_eq!(step(&saga, "charge_payment").compensation_attempts, 0);
    assert!(
        step(&saga, "charge_payment")
            .last_error
            .contains("INSUFFICIENT_FUNDS")
    );
    assert_eq!(step_status(&saga, "schedule_shipment"), StepStatus::Pending);
    assert_eq!(step_status(&saga, "approve_order"), StepStatus::Pending);
    assert_history(&saga, "saga_compensated");
    env.finish().await
}

#[tokio::test]
async fn refusal_at_schedule_shipment_compensates_newest_first() -> anyhow::Result<()> {
    let refuse = script(|call, _| {
        if is_execute(call, "schedule_shipment") {
            Answer::refuse("UNSUPPORTED_DESTINATION")
        } else {
            demo_output(call)
        }
    });
    let mut env = Env::start("refuse_ship", &demo_defs(), refuse).await?;
    let id = env.begin("order_fulfillment", order_input("c-aq")).await?;
    let saga = env.terminal(&id).await?;
    assert_eq!(status(&saga), SagaStatus::Compensated, "{}", brief(&saga));
    assert!(
        saga.failure_reason.contains("UNSUPPORTED_DESTINATION"),
        "{}",
        saga.failure_reason
    );

    let calls = env.calls(&id);
    assert_eq!(
        call_trace(&calls),
        [
            "X create_order #1",
            "X charge_payment #1",
            "X schedule_shipment #1",
            "C charge_payment #1",
            "C create_order #1",
        ]
    );
    assert_eq!(calls[3].action, "RefundPayment");
    assert_eq!(calls[3].participant, "payment");
    assert_eq!(
        calls[3].idempotency_key,
        format!("{id}/charge_payment/compensate")
    );
    assert_eq!(calls[4].action, "CancelOrder");
    assert_eq!(
        calls[4].idempotency_key,
        format!("{id}/create_order/compensate")
    );
    assert_eq!(step_status(&saga, "schedule_shipment"), StepStatus::Failed);
    assert_eq!(
        step_status(&saga, "charge_payment"),
        StepStatus::Compensated
    );
    assert_eq!(step_status(&saga, "create_order"), StepStatus::Compensated);
    assert_history(&saga, "saga_compensated");
    env.finish().await
}

#[tokio::test]
async fn transient_errors_are_retried_under_the_same_key() -> anyhow::Result<()> {
    let flaky = script(|call, earlier| {
        if is_execute(call, "charge_payment") && earlier_tries(call, earlier) < 2 {
            Answer::status(Code::Unavailable)
        } else {
            default_answer(call)
        }
    });
    let defs = fast_defs(FAST, &[])?;
    let mut env = Env::start("transient", &defs, flaky).await?;
    let id = env.begin("fast", order_input("c-flaky")).await?;
    let saga = env.terminal(&id).await?;
    assert_eq!(status(&saga), SagaStatus::Completed, "{}", brief(&saga));

    let calls = env.calls(&id);
    assert_eq!(
        call_trace(&calls),
        [
            "X create_order #1",
            "X charge_payment #1",
            "X charge_payment #2",
            "X charge_payment #3",
            "X schedule_shipment #1",
            "X approve_order #1",
        ]
    );
    for call in calls.iter().filter(|call| call.step == "charge_payment") {
        assert_eq!(call.idempotency_key, format!("{id}/charge_payment/execute"));
    }
    assert_eq!(step(&saga, "charge_payment").attempts, 3);
    assert_eq!(step(&saga, "create_order").attempts, 1);
    assert_eq!(step_status(&saga, "charge_payment"), StepStatus::Succeeded);
    assert_history(&saga, "saga_completed");
    let failed_attempts = saga
        .history
        .iter()
        .filter(|event| event.r#type == "step_attempt_failed" && event.step == "charge_payment")
        .count();
    assert_eq!(failed_attempts, 2);
    env.finish().await
}

#[tokio::test]
async fn a_connection_broken_mid_call_is_retried_under_the_same_key() -> anyhow::Result<()> {
    // charge_payment's first try never answers: the connection under it breaks, as when the
    // participant crashes. The gRPC client makes an error of its own of that (UNKNOWN, or
    // CANCELLED when the break comes before the call is sent), which is no refusal: the
    // charge may have been made, so it is tried again under its key.
    let crashing = script(|call, earlier| {
        if is_execute(call, "charge_payment") && earlier_tries(call, earlier) == 0 {
            Answer::break_connection()
        } else {
            default_answer(call)
        }
    });
    let defs = fast_defs(FAST, &[])?;
    let mut env = Env::start("broken", &defs, crashing).await?;
    let id = env.begin("fast", order_input("c-broken")).await?;
    let saga = env.terminal(&id).await?;
    assert_eq!(status(&saga), SagaStatus::Completed, "{}", brief(&saga));
    let calls = env.calls(&id);
    let charges: Vec<&str> = calls
        .iter()
        .filter(|call| is_execute(call, "charge_payment"))
        .map(|call| call.idempotency_key.as_str())
        .collect();
    let key = format!("{id}/charge_payment/execute");
    assert_eq!(
        charges,
        [key.as_str(), key.as_str()],
        "{:?}",
        call_trace(&calls)
    );
    assert_eq!(step(&saga, "charge_payment").attempts, 2);
    let failed: Vec<String> = saga
        .history
        .iter()
        .filter(|event| event.r#type == "step_attempt_failed")
        .map(|event| format!("{:?}", event.data))
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_history(&saga, "saga_completed");
    env.finish().await
}

/// The contract's classification of gRPC errors.
const CODES: [(&str, Code, bool); 9] = [
    ("UNAVAILABLE", Code::Unavailable, true),
    ("DEADLINE_EXCEEDED", Code::DeadlineExceeded, true),
    ("RESOURCE_EXHAUSTED", Code::ResourceExhausted, true),
    ("ABORTED", Code::Aborted, true),
    ("INTERNAL", Code::Internal, true),
    ("UNKNOWN", Code::Unknown, true),
    ("INVALID_ARGUMENT", Code::InvalidArgument, false),
    ("NOT_FOUND", Code::NotFound, false),
    ("FAILED_PRECONDITION", Code::FailedPrecondition, false),
];

#[tokio::test]
async fn transient_codes_are_retried_and_other_codes_are_refusals() -> anyhow::Result<()> {
    // charge_payment's first try fails with the code the saga's input names.
    let by_code = script(|call, earlier| {
        let named = input_field(call, "code").as_str().unwrap_or_default();
        match CODES.iter().find(|(name, _, _)| *name == named) {
            Some((_, code, _))
                if is_execute(call, "charge_payment") && earlier_tries(call, earlier) == 0 =>
            {
                Answer::status(*code)
            }
            _ => default_answer(call),
        }
    });
    let defs = fast_defs(FAST, &[])?;
    let mut env = Env::start("codes", &defs, by_code).await?;
    let mut sagas = Vec::new();
    for (name, _, transient) in CODES {
        let mut input = order_input("c-codes");
        input["code"] = json!(name);
        sagas.push((name, transient, env.begin("fast", input).await?));
    }
    for (name, transient, id) in sagas {
        let saga = env.terminal(&id).await?;
        let calls = env.calls(&id);
        let charges: Vec<u32> = calls
            .iter()
            .filter(|call| is_execute(call, "charge_payment"))
            .map(|call| call.attempt)
            .collect();
        if transient {
            assert_eq!(
                status(&saga),
                SagaStatus::Completed,
                "{name}: {}",
                brief(&saga)
            );
            assert_eq!(charges, [1, 2], "{name}: {:?}", call_trace(&calls));
            assert_eq!(step(&saga, "charge_payment").attempts, 2, "{name}");
            assert!(
                !calls.iter().any(|call| call.kind == CallKind::Compensate),
                "{name}"
            );
        } else {
            assert_eq!(
                status(&saga),
                SagaStatus::Compensated,
                "{name}: {}",
                brief(&saga)
            );
            assert_eq!(
                call_trace(&calls),
                [
                    "X create_order #1",
                    "X charge_payment #1",
                    "C create_order #1"
                ],
                "{name}"
            );
            assert_eq!(
                step_status(&saga, "charge_payment"),
                StepStatus::Failed,
                "{name}"
            );
            assert_eq!(step(&saga, "charge_payment").attempts, 1, "{name}");
        }
    }
    env.finish().await
}

#[tokio::test]
async fn exhausted_attempts_compensate_the_failing_step_first() -> anyhow::Result<()> {
    let down = script(|call, _| {
        if is_execute(call, "charge_payment") {
            Answer::status(Code::Unavailable)
        } else {
            default_answer(call)
        }
    });
    let defs = fast_defs(FAST, &[])?;
    let mut env = Env::start("exhausted", &defs, down).await?;
    let id = env.begin("fast", order_input("c-down")).await?;
    let saga = env.terminal(&id).await?;
    assert_eq!(status(&saga), SagaStatus::Compensated, "{}", brief(&saga));

    let calls = env.calls(&id);
    assert_eq!(
        call_trace(&calls),
        [
            "X create_order #1",
            "X charge_payment #1",
            "X charge_payment #2",
            "X charge_payment #3",
            "C charge_payment #1",
            "C create_order #1",
        ]
    );
    assert_eq!(
        calls[4].idempotency_key,
        format!("{id}/charge_payment/compensate")
    );
    assert_eq!(calls[4].action, "RefundPayment");
    assert_eq!(step(&saga, "charge_payment").attempts, 3);
    assert_eq!(
        step_status(&saga, "charge_payment"),
        StepStatus::Compensated
    );
    assert_eq!(step_status(&saga, "create_order"), StepStatus::Compensated);
    assert_eq!(step_status(&saga, "schedule_shipment"), StepStatus::Pending);
    assert!(!saga.failure_reason.is_empty());
    assert_history(&saga, "saga_compensated");
    env.finish().await
}

/// charge_payment's first try gets `first` (1 s timeout), the retry an answer at once: the
/// timeout is a transient failure, retried under the same key, and the saga completes.
async fn timeout_then_retry(label: &str, first: Answer) -> anyhow::Result<()> {
    let stalls = script(move |call, earlier| {
        if is_execute(call, "charge_payment") && earlier_tries(call, earlier) == 0 {
            first.clone()
        } else {
            default_answer(call)
        }
    });
    let defs = fast_defs(FAST, &[("charge_payment", "timeout = \"1s\"")])?;
    let mut env = Env::start(label, &defs, stalls).await?;
    let id = env.begin("fast", order_input("c-timeout")).await?;
    let saga = env.terminal(&id).await?;
    assert_eq!(status(&saga), SagaStatus::Completed, "{}", brief(&saga));
    let calls = env.calls(&id);
    let charges: Vec<(u32, String)> = calls
        .iter()
        .filter(|call| is_execute(call, "charge_payment"))
        .map(|call| (call.attempt, call.idempotency_key.clone()))
        .collect();
    let key = format!("{id}/charge_payment/execute");
    assert_eq!(charges, [(1, key.clone()), (2, key)]);
    assert_eq!(step(&saga, "charge_payment").attempts, 2);
    let failed_attempts = saga
        .history
        .iter()
        .filter(|event| event.r#type == "step_attempt_failed" && event.step == "charge_payment")
        .count();
    assert_eq!(failed_attempts, 1);
    // The retry succeeded, so nothing is compensated.
    assert!(
        !calls.iter().any(|call| call.kind == CallKind::Compensate),
        "{:?}",
        call_trace(&calls)
    );
    env.finish().await
}

#[tokio::test]
async fn a_hanging_participant_times_out_and_is_retried() -> anyhow::Result<()> {
    timeout_then_retry("hang", Answer::hang()).await
}

#[tokio::test]
async fn an_answer_later_than_the_timeout_is_retried() -> anyhow::Result<()> {
    timeout_then_retry(
        "slow",
        Answer::success(json!({"late": true})).after(Duration::from_secs(5)),
    )
    .await
}

#[tokio::test]
async fn retries_back_off_exponentially() -> anyhow::Result<()> {
    let flaky = script(|call, earlier| {
        if is_execute(call, "charge_payment") && earlier_tries(call, earlier) < 2 {
            Answer::status(Code::Unavailable)
        } else {
            default_answer(call)
        }
    });
    let policy = r#"retry = { max_attempts = 3, initial_delay = "100ms", multiplier = 2.0, max_delay = "1s", jitter = 0.0 }"#;
    let defs = fast_defs(FAST, &[("charge_payment", policy)])?;
    let mut env = Env::start("backoff", &defs, flaky).await?;
    let id = env.begin("fast", order_input("c-backoff")).await?;
    let saga = env.terminal(&id).await?;
    assert_eq!(status(&saga), SagaStatus::Completed, "{}", brief(&saga));
    let times: Vec<Instant> = env
        .calls(&id)
        .iter()
        .filter(|call| is_execute(call, "charge_payment"))
        .map(|call| call.received_at)
        .collect();
    assert_eq!(times.len(), 3);
    let first_gap = times[1] - times[0];
    let second_gap = times[2] - times[1];
    // Lower bounds only (a few ms of slack for timer rounding); a busy box may be slower.
    assert!(
        first_gap >= Duration::from_millis(95),
        "first gap {first_gap:?}"
    );
    assert!(
        second_gap >= Duration::from_millis(190),
        "second gap {second_gap:?}"
    );
    env.finish().await
}

#[tokio::test]
async fn a_compensation_is_retried_without_limit() -> anyhow::Result<()> {
    let stubborn = script(|call, earlier| {
        if is_execute(call, "charge_payment") {
            Answer::refuse("INSUFFICIENT_FUNDS")
        } else if is_compensate(call, "create_order") && earlier_tries(call, earlier) < 5 {
            Answer::status(Code::Unavailable)
        } else {
            default_answer(call)
        }
    });
    // Forward steps make at most 3 attempts; compensations are not bound by that.
    let defs = fast_defs(FAST, &[])?;
    let mut env = Env::start("comp_retry", &defs, stubborn).await?;
    let id = env.begin("fast", order_input("c-comp")).await?;
    let saga = env.terminal(&id).await?;
    assert_eq!(status(&saga), SagaStatus::Compensated, "{}", brief(&saga));
    assert_eq!(step(&saga, "create_order").compensation_attempts, 6);
    assert_eq!(step_status(&saga, "create_order"), StepStatus::Compensated);
    let calls = env.calls(&id);
    let cancels: Vec<(u32, String)> = calls
        .iter()
        .filter(|call| is_compensate(call, "create_order"))
        .map(|call| (call.attempt, call.idempotency_key.clone()))
        .collect();
    let key = format!("{id}/create_order/compensate");
    let expected: Vec<(u32, String)> = (1..=6).map(|attempt| (attempt, key.clone())).collect();
    assert_eq!(cancels, expected);
    assert_eq!(calls.len(), 2 + 6, "{:?}", call_trace(&calls));
    env.finish().await
}

#[tokio::test]
async fn a_refused_compensation_fails_the_saga_and_stops_compensating() -> anyhow::Result<()> {
    let refusals = script(|call, _| {
        if is_execute(call, "schedule_shipment") {
            Answer::refuse("UNSUPPORTED_DESTINATION")
        } else if is_compensate(call, "charge_payment") {
            Answer::refuse("REFUND_REJECTED")
        } else {
            default_answer(call)
        }
    });
    let defs = fast_defs(FAST, &[])?;
    let mut env = Env::start("comp_refused", &defs, refusals).await?;
    let id = env.begin("fast", order_input("c-norefund")).await?;
    let saga = env.terminal(&id).await?;
    assert_eq!(status(&saga), SagaStatus::Failed, "{}", brief(&saga));
    assert!(!saga.failure_reason.is_empty());
    assert_eq!(
        step_status(&saga, "charge_payment"),
        StepStatus::CompensationFailed
    );
    assert_eq!(step(&saga, "charge_payment").compensation_attempts, 1);
    assert!(
        step(&saga, "charge_payment")
            .last_error
            .contains("REFUND_REJECTED")
    );
    // create_order is left as it was: an operator must act first.
    assert_eq!(step_status(&saga, "create_order"), StepStatus::Succeeded);
    assert_eq!(step(&saga, "create_order").compensation_attempts, 0);
    assert_eq!(
        call_trace(&env.calls(&id)),
        [
            "X create_order #1",
            "X charge_payment #1",
            "X schedule_shipment #1",
            "C charge_payment #1",
        ]
    );
    assert_history(&saga, "saga_failed");
    env.finish().await
}

#[tokio::test]
async fn cancel_while_a_step_is_in_flight_compensates_it_first() -> anyhow::Result<()> {
    // schedule_shipment answers only after 20 s (its timeout is longer): unless the cancel
    // interrupts the call, nothing can be compensated within the 15 s the test allows.
    let slow = script(|call, _| {
        if is_execute(call, "schedule_shipment") {
            default_answer(call).after(Duration::from_secs(20))
        } else if is_compensate(call, "schedule_shipment") {
            // Keeps the saga COMPENSATING while CancelSaga answers.
            default_answer(call).after(Duration::from_millis(500))
        } else {
            default_answer(call)
        }
    });
    let defs = fast_defs(FAST, &[("schedule_shipment", "timeout = \"25s\"")])?;
    let mut env = Env::start("cancel_flight", &defs, slow).await?;
    let id = env.begin("fast", order_input("c-cancel")).await?;
    let shipping = &env.participants[2];
    wait_for("schedule_shipment is called", || {
        shipping
            .calls_for(&id)
            .iter()
            .any(|call| is_execute(call, "schedule_shipment"))
    })
    .await?;

    let cancelled = env.cancel(&id).await?;
    assert_eq!(
        status(&cancelled),
        SagaStatus::Compensating,
        "{}",
        brief(&cancelled)
    );

    let until = Instant::now() + Duration::from_secs(15);
    let saga = loop {
        let saga = env.get(&id).await?;
        if is_terminal(saga.status) {
            break saga;
        }
        assert!(
            Instant::now() < until,
            "not compensated within 15 s: {}",
            brief(&saga)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status(&saga), SagaStatus::Compensated, "{}", brief(&saga));
    let calls = env.calls(&id);
    assert_eq!(
        call_trace(&calls),
        [
            "X create_order #1",
            "X charge_payment #1",
            "X schedule_shipment #1",
            "C schedule_shipment #1",
            "C charge_payment #1",
            "C create_order #1",
        ]
    );
    assert_eq!(
        calls[3].idempotency_key,
        format!("{id}/schedule_shipment/compensate")
    );
    assert_eq!(calls[3].action, "CancelShipment");
    assert_eq!(
        step_status(&saga, "schedule_shipment"),
        StepStatus::Compensated
    );
    assert_eq!(step_status(&saga, "approve_order"), StepStatus::Pending);
    assert!(
        saga.history
            .iter()
            .any(|event| event.r#type == "cancel_requested")
    );
    // The attempt in flight counts, its outcome unknown; it is what was compensated.
    let shipment = step(&saga, "schedule_shipment");
    assert_eq!(shipment.attempts, 1, "{}", brief(&saga));
    assert!(
        shipment.last_error.contains("interrupted") && shipment.last_error.contains("unknown"),
        "{:?}",
        shipment.last_error
    );
    let interrupted = saga
        .history
        .iter()
        .position(|event| event.r#type == "step_attempt_interrupted")
        .context("no step_attempt_interrupted in the history")?;
    assert_eq!(saga.history[interrupted].step, "schedule_shipment");
    assert_history(&saga, "saga_compensated");
    env.finish().await
}

#[tokio::test]
async fn cancel_during_a_backoff_compensates_at_once() -> anyhow::Result<()> {
    cancel_during_a_backoff("cancel_backoff", false).await
}

/// The cancel reaches the replica driving the saga through the database's notifications.
#[tokio::test]
async fn cancel_on_another_replica_compensates_at_once() -> anyhow::Result<()> {
    cancel_during_a_backoff("cancel_elsewhere", true).await
}

async fn cancel_during_a_backoff(label: &str, on_another_replica: bool) -> anyhow::Result<()> {
    let down = script(|call, _| {
        if is_execute(call, "charge_payment") {
            Answer::status(Code::Unavailable)
        } else if is_compensate(call, "charge_payment") {
            default_answer(call).after(Duration::from_millis(500))
        } else {
            default_answer(call)
        }
    });
    let policy = r#"retry = { max_attempts = 5, initial_delay = "30s", multiplier = 2.0, max_delay = "60s", jitter = 0.0 }"#;
    let defs = fast_defs(FAST, &[("charge_payment", policy)])?;
    let mut env = Env::start(label, &defs, down).await?;
    let id = env.begin("fast", order_input("c-backoff-cancel")).await?;
    env.until(&id, |saga| {
        saga.steps.get(1).is_some_and(|step| step.attempts >= 1)
            && status(saga) == SagaStatus::Running
    })
    .await?;

    let other = if on_another_replica {
        Some(TestDaemon::start(&env.args).await?)
    } else {
        None
    };
    let cancelled = match &other {
        Some(other) => other
            .client()
            .await?
            .cancel_saga(CancelSagaRequest {
                saga_id: id.clone(),
                reason: "test cancels on another replica".to_owned(),
            })
            .await?
            .into_inner(),
        None => env.cancel(&id).await?,
    };
    assert_eq!(
        status(&cancelled),
        SagaStatus::Compensating,
        "{}",
        brief(&cancelled)
    );
    let until = Instant::now() + Duration::from_secs(15);
    let saga = loop {
        let saga = env.get(&id).await?;
        if is_terminal(saga.status) {
            break saga;
        }
        assert!(
            Instant::now() < until,
            "not compensated within 15 s of a 30 s backoff: {}",
            brief(&saga)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status(&saga), SagaStatus::Compensated, "{}", brief(&saga));
    assert_eq!(
        call_trace(&env.calls(&id)),
        [
            "X create_order #1",
            "X charge_payment #1",
            "C charge_payment #1",
            "C create_order #1",
        ]
    );
    assert_history(&saga, "saga_compensated");
    if let Some(other) = other {
        other.stop().await?;
    }
    env.finish().await
}

#[tokio::test]
async fn start_saga_is_idempotent_per_key() -> anyhow::Result<()> {
    let mut env = Env::start(
        "idempotent",
        &demo_defs(),
        script(|call, _| demo_output(call)),
    )
    .await?;
    let input = order_input("c-idem");
    let first = env
        .start_saga("order_fulfillment", input.clone(), "key-1", "")
        .await?;
    assert!(first.created);
    let again = env
        .start_saga("order_fulfillment", input.clone(), "key-1", "")
        .await?;
    assert_eq!(again.saga_id, first.saga_id);
    assert!(!again.created);

    let mut other_input = input.clone();
    other_input["amount_cents"] = json!(999);
    let refused = env
        .start_saga("order_fulfillment", other_input, "key-1", "")
        .await
        .expect_err("a reused key with another input must be refused");
    assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");

    let saga = env.terminal(&first.saga_id).await?;
    assert_eq!(status(&saga), SagaStatus::Completed);
    assert_eq!(saga.idempotency_key, "key-1");
    // Once ended, the key still names the same saga.
    let late = env
        .start_saga("order_fulfillment", input.clone(), "key-1", "")
        .await?;
    assert_eq!(late.saga_id, first.saga_id);
    assert!(!late.created);

    let calls = env.all_calls();
    assert_eq!(calls.len(), 4, "{:?}", call_trace(&calls));
    assert!(calls.iter().all(|call| call.saga_id == first.saga_id));

    // No key: a new saga every time.
    let a = env
        .start_saga("order_fulfillment", input.clone(), "", "")
        .await?;
    let b = env.start_saga("order_fulfillment", input, "", "").await?;
    assert!(a.created && b.created);
    assert_ne!(a.saga_id, b.saga_id);
    assert_ne!(a.saga_id, first.saga_id);
    for id in [&a.saga_id, &b.saga_id] {
        assert_eq!(status(&env.terminal(id).await?), SagaStatus::Completed);
    }
    env.finish().await
}

#[tokio::test]
async fn get_saga_waits_for_a_min_version() -> anyhow::Result<()> {
    let slow = script(|call, _| {
        if is_execute(call, "charge_payment") {
            default_answer(call).after(Duration::from_millis(1500))
        } else {
            default_answer(call)
        }
    });
    let defs = fast_defs(FAST, &[])?;
    let mut env = Env::start("min_version", &defs, slow).await?;
    let id = env.begin("fast", order_input("c-wait")).await?;
    let payment = &env.participants[1];
    wait_for("charge_payment is called", || {
        payment
            .calls_for(&id)
            .iter()
            .any(|call| is_execute(call, "charge_payment"))
    })
    .await?;
    let before = env.get(&id).await?;
    assert_eq!(
        step_status(&before, "charge_payment"),
        StepStatus::Running,
        "{}",
        brief(&before)
    );
    let version = before.version;

    let after = env
        .client
        .get_saga(GetSagaRequest {
            saga_id: id.clone(),
            min_version: version + 1,
            wait_ms: 5000,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(after.version > version, "{} after {version}", after.version);
    assert_eq!(step_status(&after, "charge_payment"), StepStatus::Succeeded);

    let done = env.terminal(&id).await?;
    let error = env
        .client
        .get_saga(GetSagaRequest {
            saga_id: id.clone(),
            min_version: done.version + 1,
            wait_ms: 300,
            ..Default::default()
        })
        .await
        .expect_err("a version never reached");
    assert_eq!(error.code(), Code::DeadlineExceeded, "{error:?}");
    env.finish().await
}

/// How many times sagad read one saga's row (`GetSaga`'s read), as Postgres counts the
/// statements run on this database (pg_stat_statements).
async fn row_reads(db: &mut sqlx::PgConnection) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar::<_, i64>(
        "select coalesce(sum(calls), 0)::int8 from pg_stat_statements
         where dbid = (select oid from pg_database where datname = current_database())
           and query like '%from sagas where saga_id = $1%'",
    )
    .fetch_one(db)
    .await?)
}

/// What `sagactl start --wait` and `bench` send: a long-poll for the version after the one
/// they know. For sagas driven here it is answered from the commit that brings that version:
/// each answer (BASIC or FULL) is what a read of the same version returns afterwards, and the
/// long-polls read no saga row. Postgres counts the reads (pg_stat_statements, on a cluster
/// of the test's own), and the count is checked against reads the test forces. The inputs
/// are large, as a client may send.
#[tokio::test]
async fn long_polls_of_sagas_driven_here_are_answered_from_the_commit_unread() -> anyhow::Result<()>
{
    const SAGAS: usize = 24;
    let cluster =
        postgres::PrivateCluster::start_with(&["shared_preload_libraries=pg_stat_statements"])
            .await?;
    // create_order answers after a moment, so each long-poll waits for its commit;
    // charge_payment answers long after, so a saga stays at the version its long-poll got
    // while the test reads it again.
    let paced = script(|call, _| {
        let answer = demo_output(call);
        match (call.kind, call.step.as_str()) {
            (CallKind::Execute, "create_order") => answer.after(Duration::from_millis(100)),
            (CallKind::Execute, "charge_payment") => answer.after(Duration::from_secs(4)),
            _ => answer,
        }
    });
    let defs = fast_defs(FAST, &[])?;
    let mut env = Env::start_on(&cluster.server_url(), "answered", &defs, paced).await?;
    let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&env.db.url()).await?;
    sqlx::query("create extension pg_stat_statements")
        .execute(&mut db)
        .await?;
    let view = |n: usize| {
        if n.is_multiple_of(2) {
            SagaView::Basic
        } else {
            SagaView::Full
        }
    };

    let before = row_reads(&mut db).await?;
    let mut polls = tokio::task::JoinSet::new();
    for n in 0..SAGAS {
        let mut client = env.client.clone();
        let mut input = order_input(&format!("c-answered-{n}"));
        input["note"] = json!(
            (0..64 * 1024)
                .map(|_| fastrand::alphanumeric())
                .collect::<String>()
        );
        polls.spawn(async move {
            let started = client
                .start_saga(StartSagaRequest {
                    saga_type: "fast".to_owned(),
                    input: Some(to_struct(input)),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let known = started.saga.context("StartSaga answered no saga")?.version;
            let answered = client
                .get_saga(GetSagaRequest {
                    saga_id: started.saga_id,
                    min_version: known + 1,
                    wait_ms: 20_000,
                    view: view(n).into(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            anyhow::Ok((n, known, answered))
        });
    }
    let mut answers = Vec::new();
    while let Some(answer) = polls.join_next().await {
        answers.push(answer??);
    }
    let polled = row_reads(&mut db).await? - before;

    // Every saga now waits for charge_payment: a read now is a read of the version answered.
    for (n, known, answered) in &answers {
        assert_eq!(answered.version, known + 1, "{}", brief(answered));
        assert_eq!(step_status(answered, "create_order"), StepStatus::Succeeded);
        assert_eq!(step_status(answered, "charge_payment"), StepStatus::Running);
        let read = env
            .client
            .get_saga(GetSagaRequest {
                saga_id: answered.saga_id.clone(),
                view: view(*n).into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        assert_eq!(
            read.version,
            answered.version,
            "the saga moved on before the test read it: {}",
            brief(&read)
        );
        // The inputs are compared apart, so that a difference elsewhere shows briefly.
        assert!(
            read.input == answered.input,
            "{}: the inputs differ",
            read.saga_id
        );
        let without_input = |saga: &Saga| Saga {
            input: None,
            ..saga.clone()
        };
        assert_eq!(
            without_input(&read),
            without_input(answered),
            "a long-poll's answer (right) is not what a read of its version returns (left)"
        );
        if view(*n) == SagaView::Full {
            assert_history(answered, "step_succeeded");
        }
    }
    let forced = row_reads(&mut db).await? - before - polled;
    println!("{SAGAS} long-polls read {polled} saga rows; {forced} reads forced after them");
    assert_eq!(
        forced, SAGAS as i64,
        "the count of reads did not see the {SAGAS} reads the test made"
    );
    // A long-poll reads only where this replica's driver had not yet taken its saga up (a
    // loaded machine); answering after a read would read once per long-poll.
    assert!(
        polled <= (SAGAS / 4) as i64,
        "{polled} reads of saga rows for {SAGAS} long-polls answered by this replica's commits"
    );

    for (_, _, answered) in &answers {
        assert_eq!(
            status(&env.terminal(&answered.saga_id).await?),
            SagaStatus::Completed
        );
    }
    env.finish().await?;
    cluster.stop().await
}

fn ids(sagas: &[Saga]) -> Vec<String> {
    sagas.iter().map(|saga| saga.saga_id.clone()).collect()
}

#[tokio::test]
async fn list_sagas_newest_first_with_filters_and_pages() -> anyhow::Result<()> {
    let refuse_some = script(|call, _| {
        if is_execute(call, "charge_payment") && input_field(call, "refuse") == &json!(true) {
            Answer::refuse("INSUFFICIENT_FUNDS")
        } else {
            default_answer(call)
        }
    });
    let defs = Scratch::defs(&[
        ("alpha.toml", &fulfillment_def("alpha", FAST, &[])),
        ("beta.toml", &fulfillment_def("beta", FAST, &[])),
    ])?;
    let mut env = Env::start("list", &defs, refuse_some).await?;
    let plan = [
        ("alpha", false),
        ("alpha", true),
        ("beta", false),
        ("alpha", false),
        ("beta", true),
    ];
    let mut started = Vec::new();
    for (saga_type, refuse) in plan {
        let mut input = order_input("c-list");
        input["refuse"] = json!(refuse);
        let id = env.begin(saga_type, input).await?;
        env.terminal(&id).await?;
        started.push(id);
    }
    let newest_first: Vec<String> = started.iter().rev().cloned().collect();
    let s = &started;

    let mut list =
        async |saga_type: &str, statuses: &[SagaStatus], page_size: u32, page_token: String| {
            env.client
                .list_sagas(ListSagasRequest {
                    saga_type: saga_type.to_owned(),
                    statuses: statuses.iter().map(|status| *status as i32).collect(),
                    page_size,
                    page_token,
                    ..Default::default()
                })
                .await
                .map(tonic::Response::into_inner)
        };

    let all = list("", &[], 0, String::new()).await?;
    assert_eq!(ids(&all.sagas), newest_first);
    assert!(all.next_page_token.is_empty());

    let alpha = list("alpha", &[], 0, String::new()).await?;
    assert_eq!(
        ids(&alpha.sagas),
        [s[3].clone(), s[1].clone(), s[0].clone()]
    );
    assert!(alpha.sagas.iter().all(|saga| saga.saga_type == "alpha"));

    let compensated = list("", &[SagaStatus::Compensated], 0, String::new()).await?;
    assert_eq!(ids(&compensated.sagas), [s[4].clone(), s[1].clone()]);
    let beta_completed = list("beta", &[SagaStatus::Completed], 0, String::new()).await?;
    assert_eq!(ids(&beta_completed.sagas), [s[2].clone()]);
    let ended = list(
        "",
        &[SagaStatus::Completed, SagaStatus::Compensated],
        0,
        String::new(),
    )
    .await?;
    assert_eq!(ids(&ended.sagas), newest_first);
    let running = list(
        "",
        &[SagaStatus::Running, SagaStatus::Failed],
        0,
        String::new(),
    )
    .await?;
    assert!(running.sagas.is_empty(), "{:?}", ids(&running.sagas));
    let unknown_type = list("gamma", &[], 0, String::new()).await?;
    assert!(unknown_type.sagas.is_empty());

    let mut paged = Vec::new();
    let mut sizes = Vec::new();
    let mut token = String::new();
    loop {
        let page = list("", &[], 2, token).await?;
        sizes.push(page.sagas.len());
        paged.extend(ids(&page.sagas));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(sizes.len() < 10, "paging does not end");
    }
    assert_eq!(paged, newest_first);
    assert_eq!(sizes, [2, 2, 1]);
    env.finish().await
}

#[tokio::test]
async fn a_saga_waiting_on_a_backoff_survives_a_graceful_restart() -> anyhow::Result<()> {
    let once = script(|call, earlier| {
        if is_execute(call, "charge_payment") && earlier_tries(call, earlier) == 0 {
            Answer::status(Code::Unavailable)
        } else {
            default_answer(call)
        }
    });
    let policy = r#"retry = { max_attempts = 3, initial_delay = "3s", multiplier = 2.0, max_delay = "3s", jitter = 0.0 }"#;
    let defs = fast_defs(FAST, &[("charge_payment", policy)])?;
    let mut env = Env::start("restart", &defs, once).await?;
    let id = env.begin("fast", order_input("c-restart")).await?;
    env.until(&id, |saga| {
        saga.steps.get(1).is_some_and(|step| step.attempts == 1)
    })
    .await?;

    env.restart().await?;
    let charges = |env: &Env| {
        env.calls(&id)
            .iter()
            .filter(|call| is_execute(call, "charge_payment"))
            .map(|call| (call.attempt, call.idempotency_key.clone()))
            .collect::<Vec<_>>()
    };
    let key = format!("{id}/charge_payment/execute");
    assert_eq!(
        charges(&env),
        [(1, key.clone())],
        "the retry came before the restart"
    );

    let saga = env.terminal(&id).await?;
    assert_eq!(status(&saga), SagaStatus::Completed, "{}", brief(&saga));
    assert_eq!(charges(&env), [(1, key.clone()), (2, key)]);
    assert_eq!(
        call_trace(&env.calls(&id)),
        [
            "X create_order #1",
            "X charge_payment #1",
            "X charge_payment #2",
            "X schedule_shipment #1",
            "X approve_order #1",
        ]
    );
    assert_history(&saga, "saga_completed");
    env.finish().await
}

/// The safety net: a saga recorded under a live replica's id whose driver never started (a
/// task lost, a request dropped at the wrong instant) is found by that replica's sweep and
/// driven to its end. The saga is recorded here behind sagad's back, as a copy of the first
/// event of one that completed, owned by the running replica.
#[tokio::test]
async fn the_sweep_drives_a_saga_its_own_replica_owns_but_does_not_drive() -> anyhow::Result<()> {
    use sqlx::Connection as _;

    let defs = fast_defs(FAST, &[])?;
    let mut env = Env::start("undriven", &defs, script(|call, _| demo_output(call))).await?;
    let model = env.begin("fast", order_input("c-undriven")).await?;
    env.terminal(&model).await?;
    let copy = uuid::Uuid::now_v7();
    let mut db = sqlx::postgres::PgConnection::connect(&env.db.url()).await?;
    let owner: uuid::Uuid = sqlx::query_scalar(
        "select replica_id from replicas where lease_expires_at > now() \
         order by started_at desc limit 1",
    )
    .fetch_one(&mut db)
    .await?;
    let model_id = uuid::Uuid::parse_str(&model)?;
    sqlx::query(
        "insert into sagas (saga_id, saga_type, definition_version, status, input, context,
                            steps, version, correlation_id, wake_at, owner)
         select $1, saga_type, definition_version, 'RUNNING', input,
                jsonb_build_object('input', input, 'steps', '{}'::jsonb), steps, 1, $1::text,
                now() - interval '1 hour', $3
         from sagas where saga_id = $2",
    )
    .bind(copy)
    .bind(model_id)
    .bind(owner)
    .execute(&mut db)
    .await?;
    sqlx::query(
        "insert into saga_events (saga_id, seq, event_type, data, replica_id)
         select $1, 1, 'saga_started',
                jsonb_set(data, '{correlation_id}', to_jsonb($1::text)), $3
         from saga_events where saga_id = $2 and seq = 1",
    )
    .bind(copy)
    .bind(model_id)
    .bind(owner)
    .execute(&mut db)
    .await?;

    let copy = copy.to_string();
    let saga = env.terminal(&copy).await?;
    assert_eq!(status(&saga), SagaStatus::Completed, "{}", brief(&saga));
    assert_eq!(
        call_trace(&env.calls(&copy)),
        [
            "X create_order #1",
            "X charge_payment #1",
            "X schedule_shipment #1",
            "X approve_order #1"
        ]
    );
    let driver: Option<uuid::Uuid> =
        sqlx::query_scalar("select replica_id from saga_events where saga_id = $1 and seq = 2")
            .bind(uuid::Uuid::parse_str(&copy)?)
            .fetch_one(&mut db)
            .await?;
    assert_eq!(driver, Some(owner), "the owner itself drove it");
    env.finish().await
}
