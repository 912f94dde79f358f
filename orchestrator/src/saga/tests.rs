//! Given these events, when this outcome, then these events and this decision.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::json;
use uuid::Uuid;

use super::*;
use crate::definition::{RetryPolicy, SagaDefinition, StepDefinition};

pub(super) fn policy(max_attempts: Option<u32>) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_delay: Duration::from_millis(200),
        multiplier: 2.0,
        max_delay: Duration::from_secs(5),
        jitter: 0.2,
    }
}

pub(super) fn step(
    name: &str,
    compensation: Option<&str>,
    max_attempts: Option<u32>,
) -> StepDefinition {
    StepDefinition {
        name: name.to_owned(),
        participant: "p".to_owned(),
        action: format!("Do_{name}"),
        compensation: compensation.map(str::to_owned),
        timeout: Duration::from_secs(5),
        retry: policy(max_attempts),
        compensation_retry: policy(None),
    }
}

/// Three compensable steps with 3 attempts each, then a final step without compensation.
pub(super) fn definition() -> SagaDefinition {
    SagaDefinition {
        name: "demo".to_owned(),
        version: 1,
        required_input: vec!["customer_id".to_owned()],
        input_schema: None,
        steps: vec![
            step("a", Some("undo_a"), Some(3)),
            step("b", Some("undo_b"), Some(3)),
            step("c", Some("undo_c"), Some(3)),
            step("d", None, None),
        ],
    }
}

pub(super) fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or_default()
}

pub(super) fn new_saga() -> Saga {
    let started = Event::SagaStarted {
        saga_type: "demo".to_owned(),
        definition: Arc::new(definition()),
        input: Arc::new(json!({"customer_id": "c1"})),
        correlation_id: "corr".to_owned(),
        idempotency_key: String::new(),
        trace_parent: None,
    };
    Saga::started(Uuid::nil(), &started).unwrap_or_else(|error| panic!("{error}"))
}

/// Applies the events the core asks to record, as the engine does after a commit.
fn record(saga: &mut Saga, command: Command, outcome: Outcome, now: DateTime<Utc>) -> Vec<Event> {
    let events = saga.record_outcome(command, outcome, now, 0.5);
    for event in &events {
        saga.apply(event).unwrap_or_else(|error| panic!("{error}"));
    }
    events
}

fn expect_call(saga: &Saga, now: DateTime<Utc>) -> Command {
    match saga.decide(now) {
        Decision::Call(command) => command,
        other => panic!("expected a call, got {other:?}"),
    }
}

fn success(output: serde_json::Value) -> Outcome {
    Outcome::Success { output }
}

fn transient() -> Outcome {
    Outcome::Transient {
        error: "UNAVAILABLE".to_owned(),
    }
}

fn refused() -> Outcome {
    Outcome::Refused {
        code: "NO".to_owned(),
        reason: "not today".to_owned(),
    }
}

#[test]
fn every_step_succeeding_completes_the_saga_in_the_same_commit_as_the_last_step() {
    let mut saga = new_saga();
    for (k, name) in ["a", "b", "c", "d"].iter().enumerate() {
        let command = expect_call(&saga, t0());
        assert_eq!(
            command,
            Command {
                kind: CommandKind::Execute,
                step: k,
                attempt: 1
            }
        );
        let events = record(&mut saga, command, success(json!({ "id": name })), t0());
        assert_eq!(events.last().map(Event::is_terminal), Some(k == 3));
    }
    assert_eq!(saga.status(), SagaStatus::Completed);
    assert_eq!(saga.decide(t0()), Decision::Ended);
    assert_eq!(saga.version, 6);
    assert_eq!(
        serde_json::to_value(saga.context()).ok(),
        Some(
            json!({"input": {"customer_id": "c1"}, "steps": {"a": {"id": "a"}, "b": {"id": "b"}, "c": {"id": "c"}, "d": {"id": "d"}}})
        )
    );
}

#[test]
fn a_refusal_compensates_the_steps_before_it_newest_first_but_not_itself() {
    let mut saga = new_saga();
    for _ in 0..2 {
        let command = expect_call(&saga, t0());
        record(&mut saga, command, success(json!({})), t0());
    }
    let command = expect_call(&saga, t0());
    assert_eq!(command.step, 2);
    record(&mut saga, command, refused(), t0());
    assert_eq!(saga.status(), SagaStatus::Compensating);
    assert_eq!(saga.steps[2].status, StepStatus::Failed);
    assert_eq!(
        saga.failure_reason.as_deref(),
        Some("step c refused: NO: not today")
    );

    let mut compensated = Vec::new();
    loop {
        match saga.decide(t0()) {
            Decision::Call(command) => {
                assert_eq!(command.kind, CommandKind::Compensate);
                compensated.push(command.step);
                record(&mut saga, command, success(json!({})), t0());
            }
            Decision::Ended => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(compensated, vec![1, 0]);
    assert_eq!(saga.status(), SagaStatus::Compensated);
}

#[test]
fn a_transient_failure_waits_out_its_backoff_then_retries_with_the_next_attempt_number() {
    let mut saga = new_saga();
    let command = expect_call(&saga, t0());
    let events = record(&mut saga, command, transient(), t0());
    let retry_at = t0() + chrono::Duration::milliseconds(200);
    assert_eq!(
        events,
        vec![Event::StepAttemptFailed {
            step: "a".to_owned(),
            attempt: 1,
            error: "UNAVAILABLE".to_owned(),
            retry_at: Some(retry_at),
            failed_at: Some(t0()),
        }]
    );
    assert_eq!(saga.decide(t0()), Decision::WaitUntil(retry_at));
    assert_eq!(saga.wake_at(t0()), Some(retry_at));
    assert_eq!(saga.steps[0].status, StepStatus::Running);
    let retry = expect_call(&saga, retry_at);
    assert_eq!(retry.attempt, 2);
    assert_eq!(
        saga.idempotency_key(retry),
        format!("{}/a/execute", Uuid::nil())
    );
}

#[test]
fn exhausted_attempts_compensate_the_step_itself_first() {
    let mut saga = new_saga();
    let command = expect_call(&saga, t0());
    record(&mut saga, command, success(json!({})), t0());
    let mut now = t0();
    for attempt in 1..=3 {
        let command = expect_call(&saga, now);
        assert_eq!((command.step, command.attempt), (1, attempt));
        record(&mut saga, command, transient(), now);
        now += chrono::Duration::seconds(10);
    }
    assert_eq!(saga.status(), SagaStatus::Compensating);
    let first = expect_call(&saga, now);
    assert_eq!((first.kind, first.step), (CommandKind::Compensate, 1));
    assert_eq!(
        saga.idempotency_key(first),
        format!("{}/b/compensate", Uuid::nil())
    );
    record(&mut saga, first, success(json!({})), now);
    let second = expect_call(&saga, now);
    assert_eq!((second.kind, second.step), (CommandKind::Compensate, 0));
    record(&mut saga, second, success(json!({})), now);
    assert_eq!(saga.status(), SagaStatus::Compensated);
}

#[test]
fn a_rejected_output_fails_the_step_and_compensates_it_first_since_it_took_effect() {
    let mut saga = new_saga();
    let command = expect_call(&saga, t0());
    record(&mut saga, command, success(json!({})), t0());
    let command = expect_call(&saga, t0());
    let error = "output.note: the string holds a NUL character".to_owned();
    let rejected = Outcome::OutputRejected {
        error: error.clone(),
    };
    let events = record(&mut saga, command, rejected, t0());
    assert_eq!(
        events,
        vec![Event::StepOutputRejected {
            step: "b".to_owned(),
            attempt: 1,
            error,
        }]
    );
    assert_eq!(saga.status(), SagaStatus::Compensating);
    assert_eq!(saga.steps[1].status, StepStatus::Failed);
    assert!(
        saga.failure_reason
            .as_deref()
            .is_some_and(|reason| reason.contains("step b") && reason.contains("output")),
        "{:?}",
        saga.failure_reason
    );
    let first = expect_call(&saga, t0());
    assert_eq!((first.kind, first.step), (CommandKind::Compensate, 1));
    record(&mut saga, first, success(json!({})), t0());
    let second = expect_call(&saga, t0());
    assert_eq!((second.kind, second.step), (CommandKind::Compensate, 0));
    record(&mut saga, second, success(json!({})), t0());
    assert_eq!(saga.status(), SagaStatus::Compensated);
    assert!(
        saga.steps[1]
            .last_error
            .as_deref()
            .is_some_and(|error| error.starts_with("output rejected: ")),
        "{:?}",
        saga.steps[1].last_error
    );
}

#[test]
fn cancel_compensates_the_step_in_flight_first() {
    let mut saga = new_saga();
    let command = expect_call(&saga, t0());
    record(&mut saga, command, success(json!({})), t0());
    // Step b is in flight (or between retries) when the cancel lands.
    let command = expect_call(&saga, t0());
    record(&mut saga, command, transient(), t0());
    let events = saga
        .cancel("changed my mind", "ops", t0())
        .unwrap_or_default();
    assert_eq!(
        events,
        vec![Event::CancelRequested {
            reason: "changed my mind".to_owned(),
            requested_by: "ops".to_owned(),
        }]
    );
    saga.apply(&events[0])
        .unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(saga.status(), SagaStatus::Compensating);
    let first = expect_call(&saga, t0());
    assert_eq!(
        (first.kind, first.step, first.attempt),
        (CommandKind::Compensate, 1, 1)
    );
    record(&mut saga, first, success(json!({})), t0());
    let second = expect_call(&saga, t0());
    assert_eq!((second.kind, second.step), (CommandKind::Compensate, 0));
    assert_eq!(saga.cancel("again", "ops", t0()), Ok(Vec::new()));
    record(&mut saga, second, success(json!({})), t0());
    assert_eq!(saga.status(), SagaStatus::Compensated);
    assert_eq!(
        saga.cancel("too late", "ops", t0()),
        Err(CannotCancel("COMPENSATED"))
    );
}

#[test]
fn a_refused_compensation_fails_the_saga_and_stops_compensating() {
    let mut saga = new_saga();
    for _ in 0..2 {
        let command = expect_call(&saga, t0());
        record(&mut saga, command, success(json!({})), t0());
    }
    let command = expect_call(&saga, t0());
    record(&mut saga, command, refused(), t0());
    let undo_b = expect_call(&saga, t0());
    let events = record(&mut saga, undo_b, refused(), t0());
    assert!(matches!(events.last(), Some(Event::SagaFailed { .. })));
    assert_eq!(saga.status(), SagaStatus::Failed);
    assert_eq!(saga.steps[1].status, StepStatus::CompensationFailed);
    assert_eq!(saga.steps[0].status, StepStatus::Succeeded);
    assert_eq!(
        saga.failure_reason.as_deref(),
        Some("compensation of b refused: NO: not today")
    );
}

/// A saga FAILED on b's refused compensation, a and b to undo.
fn failed_on_undo_b() -> Saga {
    let mut saga = new_saga();
    for _ in 0..2 {
        let command = expect_call(&saga, t0());
        record(&mut saga, command, success(json!({})), t0());
    }
    let command = expect_call(&saga, t0());
    record(&mut saga, command, refused(), t0());
    let undo_b = expect_call(&saga, t0());
    record(&mut saga, undo_b, refused(), t0());
    assert_eq!(saga.status(), SagaStatus::Failed);
    saga
}

fn apply_all(saga: &mut Saga, events: &[Event]) {
    for event in events {
        saga.apply(event).unwrap_or_else(|error| panic!("{error}"));
    }
}

#[test]
fn a_retry_resumes_the_failed_compensation_with_its_next_attempt_then_the_older_steps() {
    let mut saga = failed_on_undo_b();
    let events = saga
        .retry("refund service fixed", "ops", &[], t0())
        .unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(
        events,
        vec![Event::RetryRequested {
            reason: "refund service fixed".to_owned(),
            requested_by: "ops".to_owned(),
        }]
    );
    apply_all(&mut saga, &events);
    assert_eq!(saga.status(), SagaStatus::Compensating);
    assert_eq!(saga.steps[1].status, StepStatus::Compensating);
    let undo_b = expect_call(&saga, t0());
    assert_eq!(
        (undo_b.kind, undo_b.step, undo_b.attempt),
        (CommandKind::Compensate, 1, 2),
        "the same key, the next attempt"
    );
    record(&mut saga, undo_b, success(json!({})), t0());
    let undo_a = expect_call(&saga, t0());
    assert_eq!((undo_a.kind, undo_a.step), (CommandKind::Compensate, 0));
    record(&mut saga, undo_a, success(json!({})), t0());
    assert_eq!(saga.status(), SagaStatus::Compensated);
    assert_eq!(
        saga.failure_reason.as_deref(),
        Some("step c refused: NO: not today"),
        "why the saga went backward, again"
    );
}

#[test]
fn a_retry_may_skip_steps_undone_by_hand_and_ends_at_once_when_nothing_is_left() {
    let saga = failed_on_undo_b();
    let skip = ["b".to_owned(), "a".to_owned()];
    let events = saga
        .retry("refunded by hand", "ops", &skip, t0())
        .unwrap_or_else(|error| panic!("{error}"));
    let types: Vec<&str> = events.iter().map(Event::type_name).collect();
    assert_eq!(
        types,
        [
            "retry_requested",
            "compensation_skipped",
            "compensation_skipped",
            "saga_compensated"
        ]
    );
    let mut after = saga.clone();
    apply_all(&mut after, &events);
    assert_eq!(after.status(), SagaStatus::Compensated);
    assert!(
        after.steps[1]
            .last_error
            .as_deref()
            .is_some_and(|error| error.contains("by hand (ops): refunded by hand"))
    );

    // Only b skipped: a is still compensated by its participant.
    let events = saga
        .retry("b refunded by hand", "ops", &["b".to_owned()], t0())
        .unwrap_or_else(|error| panic!("{error}"));
    let mut after = saga.clone();
    apply_all(&mut after, &events);
    let next = expect_call(&after, t0());
    assert_eq!((next.kind, next.step), (CommandKind::Compensate, 0));
}

#[test]
fn a_retry_is_refused_unless_the_saga_failed_and_a_skip_must_be_a_step_to_undo() {
    let running = new_saga();
    assert_eq!(
        running.retry("r", "ops", &[], t0()),
        Err(CannotRetry::NotFailed("RUNNING"))
    );
    let failed = failed_on_undo_b();
    assert_eq!(
        failed.retry("r", "ops", &["zz".to_owned()], t0()),
        Err(CannotRetry::UnknownStep("zz".to_owned()))
    );
    assert!(matches!(
        failed.retry("r", "ops", &["c".to_owned()], t0()),
        Err(CannotRetry::NotSkippable { step, .. }) if step == "c"
    ));
    assert!(matches!(
        failed.retry("r", "ops", &["d".to_owned()], t0()),
        Err(CannotRetry::NotSkippable { step, .. }) if step == "d"
    ));
    let mut done = failed.clone();
    let events = failed
        .retry("r", "ops", &[], t0())
        .unwrap_or_else(|error| panic!("{error}"));
    apply_all(&mut done, &events);
    let undo_b = expect_call(&done, t0());
    record(&mut done, undo_b, success(json!({})), t0());
    let undo_a = expect_call(&done, t0());
    record(&mut done, undo_a, success(json!({})), t0());
    assert_eq!(
        done.retry("r", "ops", &[], t0()),
        Err(CannotRetry::NotFailed("COMPENSATED"))
    );
}

#[test]
fn an_attempt_interrupted_by_a_cancel_counts_as_an_attempt_of_unknown_outcome() {
    let mut saga = new_saga();
    let command = expect_call(&saga, t0());
    record(&mut saga, command, success(json!({})), t0());
    let in_flight = expect_call(&saga, t0());
    assert_eq!(
        saga.interrupted(in_flight, "cancelled"),
        None,
        "still running"
    );
    let events = saga
        .cancel("changed my mind", "ops", t0())
        .unwrap_or_default();
    apply_all(&mut saga, &events);
    assert_eq!(saga.steps[1].attempts, 0);
    let interrupted = saga
        .interrupted(in_flight, "cancelled: changed my mind")
        .unwrap_or_else(|| panic!("the attempt in flight is counted"));
    apply_all(&mut saga, &[interrupted]);
    assert_eq!(saga.steps[1].attempts, 1);
    assert_eq!(saga.steps[1].status, StepStatus::Failed);
    assert!(saga.steps[1].last_error.as_deref().is_some_and(|error| {
        error.contains("attempt 1 was interrupted") && error.contains("unknown")
    }));
    assert_eq!(saga.interrupted(in_flight, "again"), None, "counted once");
    let undo_b = expect_call(&saga, t0());
    assert_eq!((undo_b.kind, undo_b.step), (CommandKind::Compensate, 1));
}

#[test]
fn a_step_failing_again_and_again_is_failing_since_its_first_failure() {
    let mut saga = new_saga();
    assert_eq!(saga.failing_since(), None);
    let mut now = t0();
    let command = expect_call(&saga, now);
    record(&mut saga, command, transient(), now);
    assert_eq!(saga.failing_since(), Some(t0()));
    now += chrono::Duration::seconds(10);
    let command = expect_call(&saga, now);
    record(&mut saga, command, transient(), now);
    assert_eq!(saga.failing_since(), Some(t0()), "since the first failure");
    assert!(saga.step_views()[0].next_attempt_at.is_some());
    let command = expect_call(&saga, now + chrono::Duration::seconds(10));
    record(&mut saga, command, success(json!({})), now);
    assert_eq!(saga.failing_since(), None, "a success ends it");
    assert_eq!(saga.step_views()[0].next_attempt_at, None);
}

#[test]
fn a_refusal_of_the_first_step_ends_compensated_at_once() {
    let mut saga = new_saga();
    let command = expect_call(&saga, t0());
    let events = record(&mut saga, command, refused(), t0());
    assert_eq!(events.last(), Some(&Event::SagaCompensated));
    assert_eq!(saga.status(), SagaStatus::Compensated);
    assert_eq!(saga.wake_at(t0()), None);
}

#[test]
fn compensation_retries_without_limit_by_default() {
    let mut saga = new_saga();
    let command = expect_call(&saga, t0());
    record(&mut saga, command, success(json!({})), t0());
    let command = expect_call(&saga, t0());
    record(&mut saga, command, refused(), t0());
    let mut now = t0();
    for attempt in 1..=50 {
        let command = expect_call(&saga, now);
        assert_eq!(
            (command.kind, command.attempt),
            (CommandKind::Compensate, attempt)
        );
        record(&mut saga, command, transient(), now);
        assert_eq!(saga.steps[0].status, StepStatus::Compensating);
        now += chrono::Duration::seconds(10);
    }
    assert_eq!(saga.status(), SagaStatus::Compensating);
}

#[test]
fn apply_refuses_events_that_cannot_follow_and_changes_nothing() {
    let mut saga = new_saga();
    let before = saga.clone();
    let unknown = Event::StepSucceeded {
        step: "zz".to_owned(),
        attempt: 1,
        output: Arc::new(json!({})),
    };
    assert_eq!(
        saga.apply(&unknown),
        Err(ApplyError::UnknownStep("zz".to_owned()))
    );
    let again = Event::SagaStarted {
        saga_type: "demo".to_owned(),
        definition: Arc::new(definition()),
        input: Arc::new(json!({})),
        correlation_id: String::new(),
        idempotency_key: String::new(),
        trace_parent: None,
    };
    assert_eq!(saga.apply(&again), Err(ApplyError::StartedTwice));
    assert_eq!(saga, before);
    assert!(Saga::replay(Uuid::nil(), &[Event::SagaCompleted]).is_err());

    saga.apply(&Event::SagaCompleted)
        .unwrap_or_else(|error| panic!("{error}"));
    assert!(matches!(
        saga.apply(&Event::SagaCompensated),
        Err(ApplyError::AfterEnd { .. })
    ));
}

#[test]
fn replay_rebuilds_the_same_state_as_live_application() {
    let mut saga = new_saga();
    let mut log = vec![Event::SagaStarted {
        saga_type: "demo".to_owned(),
        definition: Arc::new(definition()),
        input: Arc::new(json!({"customer_id": "c1"})),
        correlation_id: "corr".to_owned(),
        idempotency_key: String::new(),
        trace_parent: None,
    }];
    let command = expect_call(&saga, t0());
    log.extend(record(&mut saga, command, success(json!({"x": 1})), t0()));
    let command = expect_call(&saga, t0());
    log.extend(record(&mut saga, command, transient(), t0()));
    assert_eq!(Saga::replay(Uuid::nil(), &log), Ok(saga));
}

#[test]
fn events_round_trip_through_json() {
    let event = Event::StepAttemptFailed {
        step: "a".to_owned(),
        attempt: 2,
        error: "e".to_owned(),
        retry_at: Some(t0()),
        failed_at: Some(t0()),
    };
    let text = serde_json::to_value(&event).unwrap_or_default();
    assert_eq!(text["type"], "step_attempt_failed");
    assert_eq!(serde_json::from_value::<Event>(text).ok(), Some(event));
}
