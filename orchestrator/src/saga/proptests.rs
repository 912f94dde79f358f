//! Property tests of the saga core.
//!
//! A simulated driver runs random definitions (1 to 6 steps, with or without compensation,
//! limited or unlimited attempts) against a random script of participant replies, maybe with a
//! cancellation and crashes. The properties:
//!
//! 1. Driving: the saga always ends, as `COMPLETED` (every step succeeded, nothing undone),
//!    `COMPENSATED` (exactly the steps that may have taken effect and have a compensation are
//!    undone, newest first, a refused step never) or `FAILED` (only when a compensation was
//!    refused or ran out of attempts). Attempt numbers count 1, 2, 3… per step and kind, never
//!    past the limit; no step runs forward once compensation began; every call carries the key
//!    `<saga_id>/<step>/execute|compensate` and the context of the steps before it that
//!    succeeded; a retry waits for its backoff. Replaying the log rebuilds the live saga, and
//!    every prefix of it replays to a saga that can decide. After every step of the driver, the
//!    saga's status and its steps' statuses and attempt counts agree with a model built from the
//!    replies alone.
//! 2. Crash recovery: crashing anywhere (between commits, or with a call in flight) and
//!    replaying the log from its JSON form changes nothing: the call in flight is re-sent with
//!    the same key and attempt, and the log ends exactly as without the crash.
//! 3. `apply` is total: arbitrary events in any order never panic, and an event refused leaves
//!    the saga unchanged.
//! 4. The events `record_outcome` and `cancel` return always apply to the saga they came from,
//!    the terminal event (if any) last, and once applied the core never asks to `Finish`.
//! 5. A `FAILED` saga retried once its cause is fixed, with any steps skipped, ends
//!    `COMPENSATED` with exactly the steps to undo undone, and a skipped step is never called.
//! 6. A step (or its compensation) failing n times, its error changing now and then, logs
//!    O(log n) failures: its log, with the read model's steps restored, replays to the live
//!    saga at every point (so a takeover makes the same next call), and once the step gets
//!    through, the log alone does.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, Utc};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::tests::{definition, policy, step, t0};
use super::*;

/// The driver gives up after this many decisions: a saga that has not ended by then never will.
const MAX_DECISIONS: usize = 10_000;

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct StepSpec {
    compensable: bool,
    max_attempts: Option<u32>,
    compensation_max_attempts: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    Success,
    Refused,
    Transient,
    /// Success, with an output sagad cannot keep.
    Rejected,
}

#[derive(Debug, Clone)]
struct Scenario {
    saga_id: Uuid,
    steps: Vec<StepSpec>,
    /// The participant's replies, one per call; `Success` once it runs out.
    script: Vec<Reply>,
    /// Cancel the saga before this call (counting from 0), whatever state it is in then.
    cancel_before_call: Option<usize>,
    /// Jitter samples in [0, 1), used in turn.
    jitter: Vec<f64>,
    /// How long each call takes.
    latency_ms: i64,
}

/// Crash when `calls` calls have completed: `in_flight` after sending the next call but before
/// its outcome is recorded, otherwise right after the last commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Crash {
    calls: usize,
    in_flight: bool,
}

fn name(step: usize) -> String {
    format!("s{step}")
}

fn input() -> Value {
    json!({"customer_id": "c1"})
}

fn build_definition(specs: &[StepSpec]) -> SagaDefinition {
    let mut built = definition();
    built.steps = specs
        .iter()
        .enumerate()
        .map(|(k, spec)| {
            let undo = format!("undo_{}", name(k));
            let mut built = step(
                &name(k),
                spec.compensable.then_some(undo.as_str()),
                spec.max_attempts,
            );
            built.compensation_retry = policy(spec.compensation_max_attempts);
            built
        })
        .collect();
    built
}

fn saga_started(definition: SagaDefinition) -> Event {
    Event::SagaStarted {
        saga_type: "demo".to_owned(),
        definition: Arc::new(definition),
        input: Arc::new(input()),
        correlation_id: "corr".to_owned(),
        idempotency_key: String::new(),
        trace_parent: None,
    }
}

fn step_spec() -> impl Strategy<Value = StepSpec> {
    (
        any::<bool>(),
        prop::option::of(1u32..=4),
        prop::option::of(1u32..=3),
    )
        .prop_map(
            |(compensable, max_attempts, compensation_max_attempts)| StepSpec {
                compensable,
                max_attempts,
                compensation_max_attempts,
            },
        )
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        4 => Just(Reply::Success),
        1 => Just(Reply::Refused),
        4 => Just(Reply::Transient),
        1 => Just(Reply::Rejected),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        any::<u128>(),
        prop::collection::vec(step_spec(), 1..=6),
        prop::collection::vec(reply(), 0..30),
        prop::option::weighted(0.4, 0usize..8),
        prop::collection::vec(0.0f64..1.0, 1..4),
        0i64..3_000,
    )
        .prop_map(
            |(id, steps, script, cancel_before_call, jitter, latency_ms)| Scenario {
                saga_id: Uuid::from_u128(id),
                steps,
                script,
                cancel_before_call,
                jitter,
                latency_ms,
            },
        )
}

fn crashes() -> impl Strategy<Value = BTreeSet<Crash>> {
    prop::collection::btree_set(
        (0usize..12, any::<bool>()).prop_map(|(calls, in_flight)| Crash { calls, in_flight }),
        1..4,
    )
}

// ---------------------------------------------------------------------------------------------
// The model: what the driver knows from the replies it gave, independent of the core's state
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Model {
    specs: Vec<StepSpec>,
    /// The output of each step that succeeded.
    outputs: Vec<Option<Value>>,
    executions: Vec<u32>,
    compensations: Vec<u32>,
    refused: Option<usize>,
    /// The step whose attempts ran out, or whose output was rejected: it may have taken effect.
    exhausted: Option<usize>,
    /// Set when a cancellation stopped the saga going forward: the step that was current.
    cancelled: Option<Option<usize>>,
    compensated: Vec<bool>,
    /// The step whose compensation was refused or ran out of attempts.
    compensation_failed: Option<usize>,
}

impl Model {
    fn new(specs: &[StepSpec]) -> Self {
        let n = specs.len();
        Self {
            specs: specs.to_vec(),
            outputs: vec![None; n],
            executions: vec![0; n],
            compensations: vec![0; n],
            refused: None,
            exhausted: None,
            cancelled: None,
            compensated: vec![false; n],
            compensation_failed: None,
        }
    }

    fn current_forward_step(&self) -> Option<usize> {
        self.outputs.iter().position(Option::is_none)
    }

    /// The steps that may have taken effect and have a compensation.
    fn to_undo(&self) -> BTreeSet<usize> {
        (0..self.specs.len())
            .filter(|&k| {
                self.specs[k].compensable
                    && (self.outputs[k].is_some()
                        || self.exhausted == Some(k)
                        || self.cancelled == Some(Some(k)))
            })
            .collect()
    }

    fn status(&self) -> SagaStatus {
        let backward =
            self.refused.is_some() || self.exhausted.is_some() || self.cancelled.is_some();
        if !backward {
            return match self.current_forward_step() {
                Some(_) => SagaStatus::Running,
                None => SagaStatus::Completed,
            };
        }
        if self.compensation_failed.is_some() {
            SagaStatus::Failed
        } else if self.to_undo().iter().all(|&k| self.compensated[k]) {
            SagaStatus::Compensated
        } else {
            SagaStatus::Compensating
        }
    }

    /// What the read model should show for step `k`.
    fn step_status(&self, k: usize) -> StepStatus {
        if self.compensated[k] {
            StepStatus::Compensated
        } else if self.compensation_failed == Some(k) {
            StepStatus::CompensationFailed
        } else if self.compensations[k] > 0 {
            StepStatus::Compensating
        } else if self.outputs[k].is_some() {
            StepStatus::Succeeded
        } else if self.refused == Some(k)
            || self.exhausted == Some(k)
            || self.cancelled == Some(Some(k))
        {
            StepStatus::Failed
        } else if self.status() == SagaStatus::Running && self.current_forward_step() == Some(k) {
            StepStatus::Running
        } else {
            StepStatus::Pending
        }
    }

    fn record(&mut self, command: Command, reply: Reply, output: &Value) {
        let k = command.step;
        let spec = &self.specs[k];
        match command.kind {
            CommandKind::Execute => {
                self.executions[k] += 1;
                match reply {
                    Reply::Success => self.outputs[k] = Some(output.clone()),
                    Reply::Refused => self.refused = Some(k),
                    Reply::Rejected => self.exhausted = Some(k),
                    Reply::Transient => {
                        if spec.max_attempts == Some(self.executions[k]) {
                            self.exhausted = Some(k);
                        }
                    }
                }
            }
            CommandKind::Compensate => {
                self.compensations[k] += 1;
                match reply {
                    Reply::Success | Reply::Rejected => self.compensated[k] = true,
                    Reply::Refused => self.compensation_failed = Some(k),
                    Reply::Transient => {
                        if spec.compensation_max_attempts == Some(self.compensations[k]) {
                            self.compensation_failed = Some(k);
                        }
                    }
                }
            }
        }
    }

    /// The context a call should carry: the input and the outputs of the steps that succeeded,
    /// only those before the step when it goes forward.
    fn context(&self, command: Command) -> Value {
        let steps: Map<String, Value> = self
            .outputs
            .iter()
            .enumerate()
            .filter(|&(k, _)| command.kind == CommandKind::Compensate || k < command.step)
            .filter_map(|(k, output)| output.clone().map(|output| (name(k), output)))
            .collect();
        json!({"input": input(), "steps": steps})
    }
}

// ---------------------------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
struct CallRecord {
    command: Command,
    key: String,
    reply: Reply,
}

#[derive(Debug)]
struct Run {
    saga: Saga,
    log: Vec<Event>,
    calls: Vec<CallRecord>,
    model: Model,
    /// How many calls had been made when the saga stopped going forward.
    calls_before_backward: Option<usize>,
    now: DateTime<Utc>,
}

/// Applies the events of one commit, checking what every commit must satisfy: they apply, a
/// terminal event comes last, and afterwards the core never asks to `Finish` (the terminal event
/// would have been in the same commit).
fn apply_commit(
    saga: &mut Saga,
    events: &[Event],
    now: DateTime<Utc>,
) -> Result<(), TestCaseError> {
    for (i, event) in events.iter().enumerate() {
        prop_assert!(
            !event.is_terminal() || i + 1 == events.len(),
            "a terminal event that is not last: {events:?}"
        );
        let applied = saga.apply(event);
        prop_assert!(applied.is_ok(), "{event:?} does not apply: {applied:?}");
    }
    let decision = saga.decide(now);
    prop_assert!(
        !matches!(decision, Decision::Finish(_)),
        "the terminal event was not in the same commit: {:?}",
        decision
    );
    Ok(())
}

/// Applies events as the engine does after a commit, and appends them to the log.
fn commit(
    saga: &mut Saga,
    log: &mut Vec<Event>,
    events: Vec<Event>,
    now: DateTime<Utc>,
) -> Result<(), TestCaseError> {
    apply_commit(saga, &events, now)?;
    log.extend(events);
    prop_assert_eq!(saga.version, log.len() as u64);
    Ok(())
}

/// What a restarted engine has: the log as stored (JSON), folded again.
fn recover(id: Uuid, log: &[Event]) -> Result<Saga, TestCaseError> {
    let mut stored = Vec::with_capacity(log.len());
    for event in log {
        let json = serde_json::to_value(event);
        prop_assert!(json.is_ok(), "{event:?} does not serialize: {json:?}");
        let back = json.map(serde_json::from_value::<Event>);
        prop_assert!(
            matches!(&back, Ok(Ok(back)) if back == event),
            "{event:?} does not survive JSON: {back:?}"
        );
        if let Ok(Ok(back)) = back {
            stored.push(back);
        }
    }
    let saga = Saga::replay(id, &stored);
    prop_assert!(saga.is_ok(), "the log does not replay: {saga:?}");
    saga.map_err(|error| TestCaseError::fail(error.to_string()))
}

fn outcome_of(reply: Reply, output: Value) -> Outcome {
    match reply {
        Reply::Success => Outcome::Success { output },
        Reply::Refused => Outcome::Refused {
            code: "NO".to_owned(),
            reason: "not today".to_owned(),
        },
        Reply::Transient => Outcome::Transient {
            error: "UNAVAILABLE".to_owned(),
        },
        Reply::Rejected => Outcome::OutputRejected {
            error: "output: too large".to_owned(),
        },
    }
}

/// Property 4: whatever the participant answers, the events apply to the saga they came from.
fn check_every_outcome_applies(
    saga: &Saga,
    command: Command,
    now: DateTime<Utc>,
) -> Result<(), TestCaseError> {
    for reply in [
        Reply::Success,
        Reply::Refused,
        Reply::Transient,
        Reply::Rejected,
    ] {
        for jitter in [0.0, 0.999_999] {
            let events = saga.record_outcome(command, outcome_of(reply, json!({})), now, jitter);
            let step = name(command.step);
            prop_assert_eq!(events.first().and_then(Event::step), Some(step.as_str()));
            let mut next = saga.clone();
            apply_commit(&mut next, &events, now)?;
            prop_assert_eq!(next.version, saga.version + events.len() as u64);
            if let Some(
                Event::StepAttemptFailed {
                    retry_at: Some(at), ..
                }
                | Event::CompensationAttemptFailed {
                    retry_at: Some(at), ..
                },
            ) = events.first()
            {
                // Later than now, unless the clock is already at its end (it saturates).
                prop_assert!(
                    *at > now || now == DateTime::<Utc>::MAX_UTC,
                    "a retry at {at}, not after {now}"
                );
            }
        }
    }
    Ok(())
}

/// Checks the call the core asks for against what the driver knows.
fn check_call(
    scenario: &Scenario,
    saga: &Saga,
    model: &Model,
    command: Command,
    key: &str,
) -> Result<(), TestCaseError> {
    let suffix = match command.kind {
        CommandKind::Execute => "execute",
        CommandKind::Compensate => "compensate",
    };
    prop_assert_eq!(
        key,
        format!("{}/{}/{suffix}", scenario.saga_id, name(command.step))
    );
    let context = serde_json::to_value(saga.context())
        .map_err(|error| TestCaseError::fail(format!("the context does not serialize: {error}")))?;
    prop_assert_eq!(context, model.context(command));
    Ok(())
}

fn drive(scenario: &Scenario, crashes: &BTreeSet<Crash>) -> Result<Run, TestCaseError> {
    let id = scenario.saga_id;
    let mut log = vec![saga_started(build_definition(&scenario.steps))];
    let mut saga = recover(id, &log)?;
    let mut model = Model::new(&scenario.steps);
    let mut calls: Vec<CallRecord> = Vec::new();
    let mut script = scenario.script.iter().copied();
    let mut cancel_before_call = scenario.cancel_before_call;
    let mut crashes = crashes.clone();
    let mut in_flight: Option<(Command, String)> = None;
    let mut calls_before_backward = None;
    // The retry a transient failure scheduled: not to be made before its time.
    let mut backoff: Option<(CommandKind, usize, DateTime<Utc>)> = None;
    let mut now = t0();

    for _ in 0..MAX_DECISIONS {
        prop_assert_eq!(saga.status(), model.status(), "model: {:?}", model);
        for (k, view) in saga.step_views().iter().enumerate() {
            prop_assert_eq!(
                (view.status, view.attempts, view.compensation_attempts),
                (
                    model.step_status(k),
                    model.executions[k],
                    model.compensations[k]
                ),
                "step {}",
                k
            );
        }
        if calls_before_backward.is_none() && saga.status() != SagaStatus::Running {
            calls_before_backward = Some(calls.len());
        }
        if cancel_before_call == Some(calls.len()) {
            cancel_before_call = None;
            let expected = model.status();
            match saga.cancel("operator", "ops", now) {
                Ok(events) => {
                    match expected {
                        SagaStatus::Running => {
                            prop_assert_eq!(
                                events.first(),
                                Some(&Event::CancelRequested {
                                    reason: "operator".to_owned(),
                                    requested_by: "ops".to_owned(),
                                })
                            );
                            model.cancelled = Some(model.current_forward_step());
                        }
                        SagaStatus::Compensating => prop_assert!(events.is_empty()),
                        ended => prop_assert!(false, "cancelled a saga that is {ended:?}"),
                    }
                    commit(&mut saga, &mut log, events, now)?;
                }
                Err(CannotCancel(status)) => {
                    prop_assert!(expected.is_terminal());
                    prop_assert_eq!(status, expected.as_str());
                }
            }
            continue;
        }
        match saga.decide(now) {
            Decision::Ended => {
                return Ok(Run {
                    saga,
                    log,
                    calls,
                    model,
                    calls_before_backward,
                    now,
                });
            }
            Decision::Finish(event) => commit(&mut saga, &mut log, vec![event], now)?,
            Decision::WaitUntil(at) => {
                prop_assert!(at > now, "waiting until {at}, which is not after {now}");
                now = at;
            }
            Decision::Call(command) => {
                let key = saga.idempotency_key(command);
                if let Some((sent, sent_key)) = in_flight.take() {
                    prop_assert_eq!(command, sent, "the call in flight was not re-sent");
                    prop_assert_eq!(&key, &sent_key);
                }
                check_call(scenario, &saga, &model, command, &key)?;
                check_every_outcome_applies(&saga, command, now)?;
                if let Some((kind, step, at)) = backoff
                    && (kind, step) == (command.kind, command.step)
                {
                    prop_assert!(now >= at, "retried at {now}, before its time {at}");
                }
                if crashes.remove(&Crash {
                    calls: calls.len(),
                    in_flight: true,
                }) {
                    in_flight = Some((command, key));
                    saga = recover(id, &log)?;
                    continue;
                }

                let reply = script.next().unwrap_or(Reply::Success);
                let output = json!({"step": name(command.step), "call": calls.len()});
                now += Duration::milliseconds(scenario.latency_ms);
                let jitter = scenario.jitter[calls.len() % scenario.jitter.len()];
                let events =
                    saga.record_outcome(command, outcome_of(reply, output.clone()), now, jitter);
                backoff = match events.first() {
                    Some(
                        Event::StepAttemptFailed {
                            retry_at: Some(at), ..
                        }
                        | Event::CompensationAttemptFailed {
                            retry_at: Some(at), ..
                        },
                    ) => {
                        // The delay is the step's policy for this kind, attempt and jitter.
                        let definition = saga.step_definition(command.step);
                        let policy = match command.kind {
                            CommandKind::Execute => &definition.retry,
                            CommandKind::Compensate => &definition.compensation_retry,
                        };
                        let delay = policy.delay_after(command.attempt, jitter);
                        prop_assert_eq!(Duration::from_std(delay).ok(), Some(*at - now));
                        Some((command.kind, command.step, *at))
                    }
                    _ => None,
                };
                commit(&mut saga, &mut log, events, now)?;
                model.record(command, reply, &output);
                calls.push(CallRecord {
                    command,
                    key,
                    reply,
                });

                if crashes.remove(&Crash {
                    calls: calls.len() - 1,
                    in_flight: false,
                }) {
                    let recovered = recover(id, &log)?;
                    prop_assert_eq!(&recovered, &saga, "replay differs from the live saga");
                    saga = recovered;
                }
            }
        }
    }
    Err(TestCaseError::fail(format!(
        "the saga did not end after {MAX_DECISIONS} decisions: {saga:?}"
    )))
}

// ---------------------------------------------------------------------------------------------
// The invariants of a finished run
// ---------------------------------------------------------------------------------------------

fn check_run(scenario: &Scenario, run: &Run) -> Result<(), TestCaseError> {
    let specs = &scenario.steps;
    let calls = &run.calls;
    let status = run.saga.status();
    prop_assert!(status.is_terminal());
    prop_assert_eq!(run.saga.decide(run.now), Decision::Ended);

    // The facts, from the replies alone.
    let of = |kind: CommandKind, k: usize| {
        calls
            .iter()
            .filter(move |call| call.command.kind == kind && call.command.step == k)
    };
    let count = |kind, k, reply| of(kind, k).filter(|call| call.reply == reply).count();
    let succeeded: BTreeSet<usize> = (0..specs.len())
        .filter(|&k| count(CommandKind::Execute, k, Reply::Success) > 0)
        .collect();
    let refused: BTreeSet<usize> = (0..specs.len())
        .filter(|&k| count(CommandKind::Execute, k, Reply::Refused) > 0)
        .collect();
    let exhausted: BTreeSet<usize> = (0..specs.len())
        .filter(|&k| {
            count(CommandKind::Execute, k, Reply::Rejected) > 0
                || specs[k].max_attempts.is_some_and(|max| {
                    count(CommandKind::Execute, k, Reply::Transient) == max as usize
                })
        })
        .collect();
    let cancelled_step = run.model.cancelled.flatten();
    let compensation_failed: BTreeSet<usize> = (0..specs.len())
        .filter(|&k| {
            count(CommandKind::Compensate, k, Reply::Refused) > 0
                || specs[k].compensation_max_attempts.is_some_and(|max| {
                    count(CommandKind::Compensate, k, Reply::Transient) == max as usize
                })
        })
        .collect();
    let to_undo: BTreeSet<usize> = (0..specs.len())
        .filter(|&k| {
            specs[k].compensable
                && (succeeded.contains(&k) || exhausted.contains(&k) || cancelled_step == Some(k))
        })
        .collect();
    let undone: Vec<usize> = calls
        .iter()
        .filter(|call| {
            call.command.kind == CommandKind::Compensate
                && matches!(call.reply, Reply::Success | Reply::Rejected)
        })
        .map(|call| call.command.step)
        .collect();
    let compensate_steps: Vec<usize> = calls
        .iter()
        .filter(|call| call.command.kind == CommandKind::Compensate)
        .map(|call| call.command.step)
        .collect();

    match status {
        SagaStatus::Completed => {
            prop_assert_eq!(succeeded.len(), specs.len());
            prop_assert!(compensate_steps.is_empty());
            prop_assert!(
                run.saga
                    .steps
                    .iter()
                    .all(|step| step.status == StepStatus::Succeeded)
            );
        }
        SagaStatus::Compensated => {
            prop_assert_eq!(&undone.iter().copied().collect::<BTreeSet<_>>(), &to_undo);
            for &k in &to_undo {
                prop_assert_eq!(run.saga.steps[k].status, StepStatus::Compensated);
            }
        }
        SagaStatus::Failed => {
            // Compensation stopped at the failure: it is the last call, the newer steps are
            // undone, the older ones not.
            let last = calls.last().map(|call| call.command);
            prop_assert!(
                last.is_some_and(|last| last.kind == CommandKind::Compensate
                    && compensation_failed.contains(&last.step)),
                "the failed compensation is not the last call: {calls:?}"
            );
            if let Some(failed) = last.map(|last| last.step) {
                let newer: BTreeSet<usize> = to_undo.range(failed + 1..).copied().collect();
                prop_assert_eq!(undone.iter().copied().collect::<BTreeSet<_>>(), newer);
            }
        }
        other => prop_assert!(false, "the saga ended {other:?}"),
    }
    prop_assert_eq!(
        status == SagaStatus::Failed,
        !compensation_failed.is_empty()
    );
    prop_assert!(
        undone.iter().all(|k| to_undo.contains(k)),
        "undid a step that took no effect: {undone:?}, {to_undo:?}"
    );

    // Newest first, one at a time, each once.
    prop_assert!(
        undone.windows(2).all(|pair| pair[0] > pair[1]),
        "compensations not strictly newest first: {undone:?}"
    );
    prop_assert!(
        compensate_steps.windows(2).all(|pair| pair[0] >= pair[1]),
        "compensations out of order: {compensate_steps:?}"
    );
    for &k in &refused {
        prop_assert!(
            !compensate_steps.contains(&k),
            "the refused step {k} was compensated"
        );
    }

    // Attempts count 1, 2, 3… and never past the limit; forward never after backward.
    for (k, spec) in specs.iter().enumerate() {
        for kind in [CommandKind::Execute, CommandKind::Compensate] {
            let attempts: Vec<u32> = of(kind, k).map(|call| call.command.attempt).collect();
            let expected: Vec<u32> = (1..=attempts.len() as u32).collect();
            prop_assert_eq!(attempts, expected, "step {} {:?}", k, kind);
        }
        if let Some(max) = spec.max_attempts {
            prop_assert!(of(CommandKind::Execute, k).count() <= max as usize);
        }
        let first_compensation = calls.iter().position(|call| {
            call.command.kind == CommandKind::Compensate && call.command.step == k
        });
        let last_execution = calls
            .iter()
            .rposition(|call| call.command.kind == CommandKind::Execute && call.command.step == k);
        if let (Some(first), Some(last)) = (first_compensation, last_execution) {
            prop_assert!(last < first, "step {k} executed after its compensation");
        }
    }
    if let Some(backward) = run.calls_before_backward {
        prop_assert!(
            calls[backward..]
                .iter()
                .all(|call| call.command.kind == CommandKind::Compensate),
            "a step executed after compensation began: {calls:?}"
        );
    }
    for call in calls {
        prop_assert_eq!(&run.saga.idempotency_key(call.command), &call.key);
    }

    // Recovery: the whole log rebuilds the saga, and every prefix replays to a usable saga.
    let replayed = recover(run.saga.id, &run.log)?;
    prop_assert_eq!(&replayed, &run.saga);
    for len in 1..=run.log.len() {
        let prefix = Saga::replay(run.saga.id, &run.log[..len]);
        prop_assert!(prefix.is_ok(), "prefix of {len} events: {prefix:?}");
        if let Ok(prefix) = prefix {
            prop_assert_eq!(prefix.version, len as u64);
            let _ = prefix.decide(run.now);
            let _ = prefix.wake_at(run.now);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Arbitrary events (property 3)
// ---------------------------------------------------------------------------------------------

fn any_time() -> impl Strategy<Value = DateTime<Utc>> + Clone {
    prop_oneof![
        8 => (-60i64..600).prop_map(|s| t0() + Duration::seconds(s)),
        1 => Just(DateTime::<Utc>::MIN_UTC),
        1 => Just(DateTime::<Utc>::MAX_UTC),
    ]
}

fn any_event(names: Vec<String>) -> impl Strategy<Value = Event> {
    let step = prop::sample::select(names);
    let attempt = prop_oneof![4 => 0u32..5, 1 => Just(u32::MAX), 1 => any::<u32>()];
    let retry_at = prop::option::of(any_time());
    let failed_at = prop::option::of(any_time());
    let text = prop::sample::select(vec![String::new(), "x".to_owned(), "é/?".to_owned()]);
    let started = prop::collection::vec(step_spec(), 0..4)
        .prop_map(|specs| saga_started(build_definition(&specs)));
    prop_oneof![
        1 => started,
        3 => (step.clone(), attempt.clone()).prop_map(|(step, attempt)| Event::StepSucceeded {
            step,
            attempt,
            output: Arc::new(json!({"a": attempt})),
        }),
        2 => (step.clone(), attempt.clone(), text.clone()).prop_map(|(step, attempt, code)| {
            Event::StepRefused { step, attempt, reason: code.clone(), code }
        }),
        3 => (step.clone(), attempt.clone(), text.clone(), retry_at.clone(), failed_at.clone()).prop_map(
            |(step, attempt, error, retry_at, failed_at)| Event::StepAttemptFailed {
                step,
                attempt,
                error,
                retry_at,
                failed_at,
            }
        ),
        2 => (step.clone(), attempt.clone(), text.clone()).prop_map(|(step, attempt, reason)| {
            Event::StepAttemptInterrupted { step, attempt, reason }
        }),
        2 => (text.clone(), text.clone()).prop_map(|(reason, requested_by)| {
            Event::CancelRequested { reason, requested_by }
        }),
        3 => (step.clone(), attempt.clone())
            .prop_map(|(step, attempt)| Event::CompensationSucceeded { step, attempt }),
        3 => (step.clone(), attempt.clone(), text.clone(), retry_at, failed_at).prop_map(
            |(step, attempt, error, retry_at, failed_at)| Event::CompensationAttemptFailed {
                step,
                attempt,
                error,
                retry_at,
                failed_at,
            }
        ),
        1 => (text.clone(), text.clone()).prop_map(|(reason, requested_by)| {
            Event::RetryRequested { reason, requested_by }
        }),
        2 => (step.clone(), text.clone()).prop_map(|(step, reason)| {
            Event::CompensationSkipped { step, requested_by: reason.clone(), reason }
        }),
        2 => (step.clone(), attempt.clone(), text.clone()).prop_map(|(step, attempt, code)| {
            Event::CompensationRefused { step, attempt, reason: code.clone(), code }
        }),
        2 => (step, attempt, text.clone()).prop_map(|(step, attempt, error)| {
            Event::StepOutputRejected { step, attempt, error }
        }),
        1 => Just(Event::SagaCompleted),
        1 => Just(Event::SagaCompensated),
        1 => text.prop_map(|reason| Event::SagaFailed { reason }),
    ]
}

/// A first event (usually `saga_started`) and arbitrary events after it.
fn any_log() -> impl Strategy<Value = (Event, Vec<Event>)> {
    prop::collection::vec(step_spec(), 0..=5).prop_flat_map(|specs| {
        let mut names: Vec<String> = (0..specs.len()).map(name).collect();
        names.extend(["zz".to_owned(), String::new()]);
        let first = prop_oneof![
            9 => Just(saga_started(build_definition(&specs))),
            1 => any_event(names.clone()),
        ];
        (first, prop::collection::vec(any_event(names), 0..40))
    })
}

/// Uses every read of the core on `saga`; none may panic, whatever state it is in.
fn exercise(saga: &Saga, now: DateTime<Utc>) -> Result<(), TestCaseError> {
    let _ = saga.status();
    let _ = serde_json::to_value(saga.context());
    let _ = saga.step_views();
    let _ = saga.wake_at(now);
    let _ = saga.cancel("why", "ops", now);
    if let Decision::Call(command) = saga.decide(now) {
        let _ = saga.idempotency_key(command);
        let _ = saga.step_definition(command.step);
        check_every_outcome_applies(saga, command, now)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Property 1 (and 4 on every state the driver reaches).
    #[test]
    fn a_driven_saga_always_ends_by_the_rules(scenario in scenario()) {
        let run = drive(&scenario, &BTreeSet::new())?;
        check_run(&scenario, &run)?;
    }

    /// Property 2: a crash anywhere is invisible in the log.
    #[test]
    fn a_crash_anywhere_changes_nothing(scenario in scenario(), crashes in crashes()) {
        let calm = drive(&scenario, &BTreeSet::new())?;
        let crashed = drive(&scenario, &crashes)?;
        check_run(&scenario, &crashed)?;
        prop_assert_eq!(&crashed.log, &calm.log);
        prop_assert_eq!(&crashed.calls, &calm.calls);
        prop_assert_eq!(&crashed.saga, &calm.saga);
    }

    /// Property 3: `apply` and `replay` are total, and a refused event changes nothing.
    #[test]
    fn apply_never_panics_and_an_error_changes_nothing(
        (first, rest) in any_log(),
        id in any::<u128>(),
        now in any_time(),
    ) {
        let id = Uuid::from_u128(id);
        let log: Vec<Event> = std::iter::once(first.clone()).chain(rest.iter().cloned()).collect();
        let replayed = Saga::replay(id, &log);

        // The same fold by hand: `replay` stops at the first error.
        let mut strict = Saga::started(id, &first);
        for event in &rest {
            strict = strict.and_then(|mut saga| saga.apply(event).map(|()| saga));
        }
        prop_assert_eq!(&replayed, &strict);

        // Applying on regardless: each error leaves the saga exactly as it was.
        let Ok(mut saga) = Saga::started(id, &first) else {
            let started = matches!(first, Event::SagaStarted { .. });
            prop_assert!(!started, "saga_started did not start a saga");
            return Ok(());
        };
        exercise(&saga, now)?;
        for event in &rest {
            let before = saga.clone();
            match saga.apply(event) {
                Ok(()) => prop_assert_eq!(saga.version, before.version + 1),
                Err(_) => prop_assert_eq!(&saga, &before),
            }
            exercise(&saga, now)?;
        }
    }
}

/// Property 5: a `FAILED` saga an operator retries, once the cause is fixed, ends
/// `COMPENSATED` with exactly the steps to undo undone, each either by its compensation or
/// by hand (skipped), a skipped one never called again, the log still replaying.
fn check_retry(run: Run, skip_mask: u8) -> Result<(), TestCaseError> {
    let mut saga = run.saga;
    let mut log = run.log;
    let now = run.now;
    let to_undo = run.model.to_undo();
    let skippable: Vec<usize> = to_undo
        .iter()
        .copied()
        .filter(|&k| saga.steps[k].status != StepStatus::Compensated)
        .collect();
    let skip: Vec<usize> = skippable
        .iter()
        .copied()
        .filter(|&k| skip_mask & (1 << (k % 8)) != 0)
        .collect();
    let names: Vec<String> = skip.iter().map(|&k| name(k)).collect();
    let events = saga.retry("fixed", "ops", &names, now);
    prop_assert!(events.is_ok(), "{events:?}");
    let events = events.unwrap_or_default();
    commit(&mut saga, &mut log, events, now)?;
    for _ in 0..MAX_DECISIONS {
        match saga.decide(now) {
            Decision::Ended => break,
            Decision::Call(command) => {
                prop_assert_eq!(command.kind, CommandKind::Compensate);
                prop_assert!(
                    !skip.contains(&command.step),
                    "skipped step {} called",
                    command.step
                );
                let events =
                    saga.record_outcome(command, outcome_of(Reply::Success, json!({})), now, 0.5);
                commit(&mut saga, &mut log, events, now)?;
            }
            other => prop_assert!(false, "a retried saga decided {other:?}"),
        }
    }
    prop_assert_eq!(saga.status(), SagaStatus::Compensated);
    for &k in &to_undo {
        prop_assert_eq!(saga.steps[k].status, StepStatus::Compensated);
    }
    let replayed = recover(saga.id, &log)?;
    prop_assert_eq!(replayed, saga);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Property 5 on every scenario that ends `FAILED`.
    #[test]
    fn a_failed_saga_retried_ends_compensated_and_skipped_steps_stay_uncalled(
        scenario in scenario(),
        skip_mask in any::<u8>(),
    ) {
        let run = drive(&scenario, &BTreeSet::new())?;
        if run.saga.status() == SagaStatus::Failed {
            check_retry(run, skip_mask)?;
        }
    }

    /// A `FAILED` saga should say which compensation failed. When a compensation runs out of
    /// attempts, `failure_reason` still names the reason the saga went backward (`decide`
    /// only falls back to "compensation of … failed" when there is no reason, and in the
    /// backward phase there always is one). See also the minimal example below.
    #[test]

    fn a_failed_saga_names_the_compensation_that_failed(scenario in scenario()) {
        let run = drive(&scenario, &BTreeSet::new())?;
        if run.saga.status() == SagaStatus::Failed {
            let failed = run.model.compensation_failed.map(name).unwrap_or_default();
            let reason = run.saga.failure_reason.clone().unwrap_or_default();
            prop_assert!(
                reason.contains(&format!("compensation of {failed}")),
                "{reason:?} does not name the compensation of {failed}"
            );
        }
    }
}

/// The smallest log showing the bug above.
#[test]

fn an_exhausted_compensation_is_named_in_the_failure_reason() {
    let log = [
        saga_started(build_definition(&[
            StepSpec {
                compensable: true,
                max_attempts: None,
                compensation_max_attempts: Some(1),
            },
            StepSpec {
                compensable: false,
                max_attempts: None,
                compensation_max_attempts: None,
            },
        ])),
        Event::StepSucceeded {
            step: "s0".to_owned(),
            attempt: 1,
            output: Arc::new(json!({})),
        },
        Event::StepRefused {
            step: "s1".to_owned(),
            attempt: 1,
            code: "NO".to_owned(),
            reason: "not today".to_owned(),
        },
        Event::CompensationAttemptFailed {
            step: "s0".to_owned(),
            attempt: 1,
            error: "UNAVAILABLE".to_owned(),
            retry_at: None,
            failed_at: Some(t0()),
        },
    ];
    let saga = Saga::replay(Uuid::nil(), &log).unwrap_or_else(|error| panic!("{error}"));
    let decision = saga.decide(t0());
    let Decision::Finish(Event::SagaFailed { reason }) = decision else {
        panic!("expected the saga to fail, got {decision:?}");
    };
    assert!(
        reason.contains("compensation of s0"),
        "the reason does not name the failed compensation: {reason:?}"
    );
}

/// Drives `live` to its next call, waiting out each backoff.
fn next_call(live: &Saga, now: &mut DateTime<Utc>) -> Result<Command, TestCaseError> {
    loop {
        match live.decide(*now) {
            Decision::Call(command) => return Ok(command),
            Decision::WaitUntil(at) => *now = at,
            other => {
                prop_assert!(false, "expected a call, the core decided {other:?}");
            }
        }
    }
}

/// Records an outcome as the engine does: in the log, or, for a failure the core keeps out
/// of it, in the live saga alone.
fn record_compactly(
    live: &mut Saga,
    log: &mut Vec<Event>,
    command: Command,
    outcome: Outcome,
    now: DateTime<Utc>,
) -> Result<bool, TestCaseError> {
    let events = live.record_outcome(command, outcome, now, 0.5);
    if live.keeps_out_of_log(&events) {
        let version = live.version;
        for event in &events {
            let absorbed = live.absorb(event);
            prop_assert!(absorbed.is_ok(), "{event:?} is not absorbed: {absorbed:?}");
        }
        prop_assert_eq!(live.version, version);
        Ok(false)
    } else {
        commit(live, log, events, now)?;
        Ok(true)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Property 6.
    #[test]
    fn a_long_run_of_failures_logs_few_events_and_replays_the_same(
        failures in 1u32..400,
        changes in prop::collection::btree_set(0u32..400, 0..4),
        backward in any::<bool>(),
    ) {
        let unlimited = StepSpec {
            compensable: true,
            max_attempts: None,
            compensation_max_attempts: None,
        };
        let started = saga_started(build_definition(&[unlimited.clone(), unlimited]));
        let id = Uuid::from_u128(6);
        let mut live = recover(id, std::slice::from_ref(&started))?;
        let mut log = vec![started];
        let mut now = t0();
        if backward {
            // The first step gets through, the second is refused: its compensation retries.
            let first = next_call(&live, &mut now)?;
            record_compactly(&mut live, &mut log, first, outcome_of(Reply::Success, json!({})), now)?;
            let second = next_call(&live, &mut now)?;
            record_compactly(&mut live, &mut log, second, outcome_of(Reply::Refused, json!({})), now)?;
        }
        let logged_before = log.len();
        let mut error = 0;
        for n in 1..=failures {
            if changes.contains(&n) {
                error += 1;
            }
            let command = next_call(&live, &mut now)?;
            prop_assert_eq!(command.attempt, n);
            let outcome = Outcome::Transient { error: format!("UNAVAILABLE: error {error}") };
            record_compactly(&mut live, &mut log, command, outcome, now)?;

            // A takeover now: the log and the read model give back the live saga.
            let mut taken_over = recover(id, &log)?;
            let alone = taken_over.decide(now);
            taken_over.restore_unlogged(&live.step_views());
            prop_assert_eq!(&taken_over, &live);
            // The log alone asks for the same call, numbered at most as high and maybe
            // earlier (its timer is the last logged failure's): an early retry, harmless.
            let mut later = now;
            let call = next_call(&live, &mut later)?;
            match alone {
                Decision::Call(alone) => {
                    prop_assert_eq!((alone.kind, alone.step), (call.kind, call.step));
                    prop_assert!(alone.attempt <= call.attempt);
                }
                Decision::WaitUntil(at) => prop_assert!(at <= later),
                other => prop_assert!(false, "{other:?} from the log, {call:?} live"),
            }
        }
        let logged = (log.len() - logged_before) as u32;
        let bound = LOGGED_FAILURES_PER_RUN + changes.len() as u32 + failures.ilog2() + 1;
        prop_assert!(
            logged <= bound.min(failures),
            "{logged} of {failures} failures logged, more than {bound}"
        );
        let views = live.step_views();
        let counted = if backward { views[0].compensation_attempts } else { views[0].attempts };
        prop_assert_eq!(counted, failures);

        // Once through, the log alone is the saga.
        let command = next_call(&live, &mut now)?;
        let success = outcome_of(Reply::Success, json!({}));
        let logged = record_compactly(&mut live, &mut log, command, success, now)?;
        prop_assert!(logged, "a success was kept out of the log");
        prop_assert_eq!(recover(id, &log)?, live);
    }
}
