//! The pure saga core: a saga's state is the fold of its events, and `decide` says what to do
//! next. This module does no IO, reads no clock and draws no random numbers: the time and the
//! jitter sample are passed in, so every rule here is tested exhaustively without a database.

mod event;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::definition::{RetryPolicy, SagaDefinition, StepDefinition};

pub use event::Event;

/// The saga's status as clients see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SagaStatus {
    Running,
    Compensating,
    Completed,
    Compensated,
    /// Compensation could not finish: an operator must act.
    Failed,
}

impl SagaStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Compensated | Self::Failed)
    }

    /// The name stored in the read model and printed by clients.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "RUNNING",
            Self::Compensating => "COMPENSATING",
            Self::Completed => "COMPLETED",
            Self::Compensated => "COMPENSATED",
            Self::Failed => "FAILED",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [
            Self::Running,
            Self::Compensating,
            Self::Completed,
            Self::Compensated,
            Self::Failed,
        ]
        .into_iter()
        .find(|status| status.as_str() == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StepStatus {
    Pending,
    /// The step is the current one going forward: in flight or waiting for its next attempt.
    Running,
    Succeeded,
    Failed,
    Compensating,
    Compensated,
    CompensationFailed,
}

/// What the core knows of one step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepState {
    pub status: StepStatus,
    pub attempts: u32,
    pub compensation_attempts: u32,
    pub last_error: Option<String>,
    /// Shared with the read model and the copies the engine makes of the saga, not copied.
    pub output: Option<Arc<Value>>,
    /// The durable timer of the next attempt (forward or compensation).
    pub retry_at: Option<DateTime<Utc>>,
    /// The step may have taken effect and has a compensation to undo it.
    pub needs_compensation: bool,
    /// When the current run of failed attempts (of the action, or of the compensation once the
    /// saga goes backward) began; `None` while the step is not failing.
    pub failing_since: Option<DateTime<Utc>>,
    /// The failures of the current run that are in the log, and the error of the last one:
    /// what decides whether the next failure is worth an event (see
    /// [`Saga::keeps_out_of_log`]). Only logged events change them, so a replay has them too.
    logged_failures: u32,
    logged_error: Option<String>,
}

impl StepState {
    fn pending() -> Self {
        Self {
            status: StepStatus::Pending,
            attempts: 0,
            compensation_attempts: 0,
            last_error: None,
            output: None,
            retry_at: None,
            needs_compensation: false,
            failing_since: None,
            logged_failures: 0,
            logged_error: None,
        }
    }

    /// Counts a failure the log records; the first of a run starts the count afresh.
    fn log_failure(&mut self, error: &str) {
        if self.failing_since.is_none() {
            self.logged_failures = 0;
        }
        self.logged_failures = self.logged_failures.saturating_add(1);
        self.logged_error = Some(error.to_owned());
    }
}

/// The failures at the start of a run that are always logged: a short outage reads in full
/// in the history.
const LOGGED_FAILURES_PER_RUN: u32 = 3;

/// One step as the read model stores and clients see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepView {
    pub name: String,
    pub participant: String,
    pub status: StepStatus,
    pub attempts: u32,
    pub compensation_attempts: u32,
    pub last_error: Option<String>,
    /// Shared with the read model and the copies the engine makes of the saga, not copied.
    pub output: Option<Arc<Value>>,
    /// When the next attempt is due, while a retry waits.
    #[serde(default)]
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// Where the saga is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Forward,
    Backward,
    Ended(SagaStatus),
}

/// A saga as folded from its log.
#[derive(Debug, Clone, PartialEq)]
pub struct Saga {
    pub id: Uuid,
    pub saga_type: String,
    pub definition: Arc<SagaDefinition>,
    /// Shared with the read model and the copies the engine makes of the saga, not copied.
    pub input: Arc<Value>,
    pub correlation_id: String,
    pub idempotency_key: String,
    /// The W3C `traceparent` the saga's spans descend from.
    pub trace_parent: Option<String>,
    pub steps: Vec<StepState>,
    /// The seq of the last event applied (the first event has seq 1).
    pub version: u64,
    pub failure_reason: Option<String>,
    /// Why the saga went backward: the failure reason again once a retry resumes it.
    backward_reason: Option<String>,
    phase: Phase,
}

/// An event that cannot follow the state it was applied to: a corrupt or foreign log.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApplyError {
    #[error("the first event of a saga must be saga_started, found {0}")]
    NotStarted(&'static str),
    #[error("saga_started may only be the first event")]
    StartedTwice,
    #[error("unknown step {0:?}")]
    UnknownStep(String),
    #[error("{event} cannot follow a saga that is {status}")]
    AfterEnd {
        event: &'static str,
        status: &'static str,
    },
    #[error("retry_requested needs a FAILED saga; this one is {0}")]
    RetryNotFailed(&'static str),
}

/// Whether a command performs a step's action or undoes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    Execute,
    Compensate,
}

/// One participant call the saga needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    pub kind: CommandKind,
    pub step: usize,
    /// 1 on the first try; a call re-sent after a crash keeps the number it had.
    pub attempt: u32,
}

/// What to do next with a saga.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Call(Command),
    /// Nothing to do before this time (a retry's backoff).
    WaitUntil(DateTime<Utc>),
    /// Record this terminal event.
    Finish(Event),
    /// The saga has ended; nothing more will happen.
    Ended,
}

/// The result of one participant call, as the engine classified it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Success {
        output: Value,
    },
    /// A business refusal: not retried.
    Refused {
        code: String,
        reason: String,
    },
    /// The call may or may not have taken effect; retried by the step's policy.
    Transient {
        error: String,
    },
    /// The participant answered success, but its output cannot be kept. Retrying under the
    /// same key would only repeat the recorded answer, so the step has failed, having taken
    /// effect.
    OutputRejected {
        error: String,
    },
}

/// Why a cancellation was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("the saga is {0} and can no longer be cancelled")]
pub struct CannotCancel(pub &'static str);

/// Why a retry was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CannotRetry {
    #[error("the saga is {0}; only a FAILED saga can be retried")]
    NotFailed(&'static str),
    #[error("skip_steps: the saga has no step {0:?}")]
    UnknownStep(String),
    #[error("skip_steps: step {step} cannot be skipped: {why}")]
    NotSkippable { step: String, why: &'static str },
}

impl Saga {
    /// Folds a log into a saga; the first event must be `saga_started`.
    pub fn replay<'a>(
        id: Uuid,
        events: impl IntoIterator<Item = &'a Event>,
    ) -> Result<Saga, ApplyError> {
        let mut events = events.into_iter();
        let mut saga = match events.next() {
            Some(first) => Saga::started(id, first)?,
            None => return Err(ApplyError::NotStarted("nothing")),
        };
        for event in events {
            saga.apply(event)?;
        }
        Ok(saga)
    }

    /// A saga from its first event.
    pub fn started(id: Uuid, event: &Event) -> Result<Saga, ApplyError> {
        let Event::SagaStarted {
            saga_type,
            definition,
            input,
            correlation_id,
            idempotency_key,
            trace_parent,
        } = event
        else {
            return Err(ApplyError::NotStarted(event.type_name()));
        };
        let mut steps = vec![StepState::pending(); definition.steps.len()];
        if let Some(first) = steps.first_mut() {
            first.status = StepStatus::Running;
        }
        Ok(Saga {
            id,
            saga_type: saga_type.clone(),
            definition: Arc::clone(definition),
            input: Arc::clone(input),
            correlation_id: correlation_id.clone(),
            idempotency_key: idempotency_key.clone(),
            trace_parent: trace_parent.clone(),
            steps,
            version: 1,
            failure_reason: None,
            backward_reason: None,
            phase: Phase::Forward,
        })
    }

    pub fn status(&self) -> SagaStatus {
        match self.phase {
            Phase::Forward => SagaStatus::Running,
            Phase::Backward => SagaStatus::Compensating,
            Phase::Ended(status) => status,
        }
    }

    /// Applies one event. It never panics: an event that cannot follow is an error and leaves
    /// the saga as it was.
    pub fn apply(&mut self, event: &Event) -> Result<(), ApplyError> {
        match (self.phase, event) {
            // The one event that may follow an end: an operator resumes a FAILED saga.
            (Phase::Ended(SagaStatus::Failed), Event::RetryRequested { .. }) => {}
            (_, Event::RetryRequested { .. }) => {
                return Err(ApplyError::RetryNotFailed(self.status().as_str()));
            }
            (Phase::Ended(status), _) => {
                return Err(ApplyError::AfterEnd {
                    event: event.type_name(),
                    status: status.as_str(),
                });
            }
            _ => {}
        }
        // Resolved before anything changes, so an unknown step leaves the saga as it was.
        let k = match event.step() {
            Some(name) => self.step_index(name)?,
            None => 0,
        };
        match event {
            Event::SagaStarted { .. } => return Err(ApplyError::StartedTwice),
            Event::StepSucceeded {
                attempt, output, ..
            } => {
                let has_compensation = self.definition.steps[k].compensation.is_some();
                let step = &mut self.steps[k];
                step.status = StepStatus::Succeeded;
                step.attempts = *attempt;
                step.output = Some(Arc::clone(output));
                step.retry_at = None;
                step.failing_since = None;
                step.needs_compensation = has_compensation;
                if self.phase == Phase::Forward
                    && let Some(next) = self.steps.get_mut(k + 1)
                    && next.status == StepStatus::Pending
                {
                    next.status = StepStatus::Running;
                }
            }
            Event::StepRefused {
                step: name,
                attempt,
                code,
                reason,
            } => {
                let step = &mut self.steps[k];
                step.status = StepStatus::Failed;
                step.attempts = *attempt;
                step.last_error = Some(format!("{code}: {reason}"));
                step.retry_at = None;
                step.needs_compensation = false;
                self.go_backward(format!("step {name} refused: {code}: {reason}"));
            }
            Event::StepAttemptFailed {
                step: name,
                attempt,
                error,
                retry_at,
                failed_at,
            } => {
                let has_compensation = self.definition.steps[k].compensation.is_some();
                let step = &mut self.steps[k];
                step.log_failure(error);
                step.attempts = *attempt;
                step.last_error = Some(error.clone());
                step.retry_at = *retry_at;
                step.failing_since = step.failing_since.or(*failed_at);
                if retry_at.is_none() {
                    step.status = StepStatus::Failed;
                    step.needs_compensation = has_compensation;
                    self.go_backward(format!(
                        "step {name} failed after {attempt} attempts: {error}"
                    ));
                }
            }
            Event::StepOutputRejected {
                step: name,
                attempt,
                error,
            } => {
                let has_compensation = self.definition.steps[k].compensation.is_some();
                let step = &mut self.steps[k];
                step.attempts = *attempt;
                step.status = StepStatus::Failed;
                step.last_error = Some(format!("output rejected: {error}"));
                step.retry_at = None;
                step.needs_compensation = has_compensation;
                self.go_backward(format!(
                    "step {name} failed: its output was rejected: {error}"
                ));
            }
            Event::StepAttemptInterrupted {
                attempt, reason, ..
            } => {
                let step = &mut self.steps[k];
                step.attempts = step.attempts.max(*attempt);
                step.last_error = Some(format!(
                    "attempt {attempt} was interrupted ({reason}): whether it took effect is \
                     unknown, so the step is compensated"
                ));
            }
            Event::CancelRequested { reason, .. } => {
                if self.phase == Phase::Forward {
                    if let Some(k) = self.current_forward_step() {
                        let has_compensation = self.definition.steps[k].compensation.is_some();
                        let step = &mut self.steps[k];
                        step.retry_at = None;
                        step.needs_compensation = has_compensation;
                        step.status = StepStatus::Failed;
                        step.last_error = Some(format!("cancelled: {reason}"));
                    }
                    self.go_backward(format!("cancelled: {reason}"));
                }
            }
            Event::CompensationSucceeded { attempt, .. } => {
                let step = &mut self.steps[k];
                step.status = StepStatus::Compensated;
                step.compensation_attempts = *attempt;
                step.retry_at = None;
                step.failing_since = None;
            }
            Event::CompensationAttemptFailed {
                step: name,
                attempt,
                error,
                retry_at,
                failed_at,
            } => {
                let step = &mut self.steps[k];
                step.log_failure(error);
                step.compensation_attempts = *attempt;
                step.last_error = Some(error.clone());
                step.retry_at = *retry_at;
                step.failing_since = step.failing_since.or(*failed_at);
                if retry_at.is_some() {
                    step.status = StepStatus::Compensating;
                } else {
                    step.status = StepStatus::CompensationFailed;
                    self.failure_reason = Some(format!(
                        "compensation of {name} failed after {attempt} attempts: {error}"
                    ));
                }
            }
            Event::CompensationRefused {
                step: name,
                attempt,
                code,
                reason,
            } => {
                let step = &mut self.steps[k];
                step.compensation_attempts = *attempt;
                step.last_error = Some(format!("{code}: {reason}"));
                step.retry_at = None;
                step.status = StepStatus::CompensationFailed;
                self.failure_reason =
                    Some(format!("compensation of {name} refused: {code}: {reason}"));
            }
            Event::RetryRequested {
                reason,
                requested_by,
            } => {
                // Back to compensating: the failed compensation is tried again (the next
                // attempt, under the same key), then the steps before it.
                self.phase = Phase::Backward;
                self.failure_reason = self.backward_reason.clone();
                for step in &mut self.steps {
                    if step.status == StepStatus::CompensationFailed {
                        step.status = StepStatus::Compensating;
                        step.retry_at = None;
                        step.failing_since = None;
                        step.last_error = Some(format!(
                            "retried by {requested_by} ({reason}); last error: {}",
                            step.last_error.as_deref().unwrap_or("none")
                        ));
                    }
                }
            }
            Event::CompensationSkipped {
                reason,
                requested_by,
                ..
            } => {
                let step = &mut self.steps[k];
                step.status = StepStatus::Compensated;
                step.retry_at = None;
                step.failing_since = None;
                step.last_error = Some(format!("compensated by hand ({requested_by}): {reason}"));
            }
            Event::SagaCompleted => self.end(SagaStatus::Completed),
            Event::SagaCompensated => self.end(SagaStatus::Compensated),
            Event::SagaFailed { reason } => {
                self.failure_reason = Some(reason.clone());
                self.end(SagaStatus::Failed);
            }
        }
        self.version += 1;
        Ok(())
    }

    /// Whether `events`, what [`Saga::record_outcome`] returned, are a failed attempt like the
    /// ones before it, to be kept out of the log: the saga's read model records it (with
    /// [`Saga::absorb`]), its history does not. A step retried for days would otherwise grow
    /// its log, and every replay of it, without bound. Logged are the first failures of a run,
    /// a failure whose error differs from the last one logged, one at each attempt that is a
    /// power of two (so a run of n failures logs O(log n) events), and the last one, which
    /// ends the retries.
    pub fn keeps_out_of_log(&self, events: &[Event]) -> bool {
        let [event] = events else {
            return false;
        };
        let (name, attempt, error) = match event {
            Event::StepAttemptFailed {
                step,
                attempt,
                error,
                retry_at: Some(_),
                ..
            }
            | Event::CompensationAttemptFailed {
                step,
                attempt,
                error,
                retry_at: Some(_),
                ..
            } => (step, *attempt, error),
            _ => return false,
        };
        let Ok(k) = self.step_index(name) else {
            return false;
        };
        let step = &self.steps[k];
        step.failing_since.is_some()
            && step.logged_failures >= LOGGED_FAILURES_PER_RUN
            && step.logged_error.as_deref() == Some(error.as_str())
            && !attempt.is_power_of_two()
    }

    /// Applies an event kept out of the log ([`Saga::keeps_out_of_log`]): the saga changes as
    /// with [`Saga::apply`], but its version, the seq of its last logged event, does not.
    pub fn absorb(&mut self, event: &Event) -> Result<(), ApplyError> {
        let before = self.clone();
        self.apply(event)?;
        self.version = before.version;
        for (step, was) in self.steps.iter_mut().zip(&before.steps) {
            step.logged_failures = was.logged_failures;
            step.logged_error.clone_from(&was.logged_error);
        }
        Ok(())
    }

    /// Takes back from the read model written at this saga's version what the attempts kept
    /// out of the log changed: each step's attempt counts, and the last error and next attempt
    /// time of a step being retried (the only kind whose failures may be unlogged). The read
    /// model is never behind the log it was written with, so a count in it is never lower. A
    /// replay of the log alone would number the next attempt lower than the one before.
    pub fn restore_unlogged(&mut self, views: &[StepView]) {
        if views.len() != self.steps.len() {
            return;
        }
        for (step, view) in self.steps.iter_mut().zip(views) {
            // A read model that does not agree with the log on where the step is says nothing
            // of its attempts.
            if view.status != step.status {
                continue;
            }
            let retried = match step.status {
                StepStatus::Running => view.attempts > step.attempts,
                StepStatus::Compensating => view.compensation_attempts > step.compensation_attempts,
                _ => false,
            };
            step.attempts = step.attempts.max(view.attempts);
            step.compensation_attempts = step.compensation_attempts.max(view.compensation_attempts);
            if retried && step.failing_since.is_some() {
                step.last_error.clone_from(&view.last_error);
                step.retry_at = view.next_attempt_at;
            }
        }
    }

    /// What to do next, given the time now.
    pub fn decide(&self, now: DateTime<Utc>) -> Decision {
        match self.phase {
            Phase::Ended(_) => Decision::Ended,
            Phase::Forward => match self.current_forward_step() {
                None => Decision::Finish(Event::SagaCompleted),
                Some(k) => self.call_or_wait(CommandKind::Execute, k, now),
            },
            Phase::Backward => {
                // The event that failed the compensation set the reason.
                if self
                    .steps
                    .iter()
                    .any(|step| step.status == StepStatus::CompensationFailed)
                {
                    let reason = self.failure_reason.clone().unwrap_or_default();
                    return Decision::Finish(Event::SagaFailed { reason });
                }
                match self.next_compensation() {
                    None => Decision::Finish(Event::SagaCompensated),
                    Some(k) => self.call_or_wait(CommandKind::Compensate, k, now),
                }
            }
        }
    }

    /// The events that record a call's outcome, followed by the terminal event when the saga
    /// ends with it (so both land in one commit). `jitter_sample` is drawn from [0, 1) by the
    /// caller.
    pub fn record_outcome(
        &self,
        command: Command,
        outcome: Outcome,
        now: DateTime<Utc>,
        jitter_sample: f64,
    ) -> Vec<Event> {
        let definition = &self.definition.steps[command.step];
        let step = definition.name.clone();
        let attempt = command.attempt;
        let event = match (command.kind, outcome) {
            (CommandKind::Execute, Outcome::Success { output }) => Event::StepSucceeded {
                step,
                attempt,
                output: Arc::new(output),
            },
            (CommandKind::Execute, Outcome::Refused { code, reason }) => Event::StepRefused {
                step,
                attempt,
                code,
                reason,
            },
            (CommandKind::Execute, Outcome::Transient { error }) => Event::StepAttemptFailed {
                step,
                attempt,
                error,
                retry_at: retry_time(&definition.retry, attempt, now, jitter_sample),
                failed_at: Some(now),
            },
            (CommandKind::Execute, Outcome::OutputRejected { error }) => {
                Event::StepOutputRejected {
                    step,
                    attempt,
                    error,
                }
            }
            // A compensation's output is not kept, so none is ever rejected.
            (CommandKind::Compensate, Outcome::Success { .. } | Outcome::OutputRejected { .. }) => {
                Event::CompensationSucceeded { step, attempt }
            }
            (CommandKind::Compensate, Outcome::Refused { code, reason }) => {
                Event::CompensationRefused {
                    step,
                    attempt,
                    code,
                    reason,
                }
            }
            (CommandKind::Compensate, Outcome::Transient { error }) => {
                Event::CompensationAttemptFailed {
                    step,
                    attempt,
                    error,
                    retry_at: retry_time(
                        &definition.compensation_retry,
                        attempt,
                        now,
                        jitter_sample,
                    ),
                    failed_at: Some(now),
                }
            }
        };
        self.with_terminal(vec![event], now)
    }

    /// The events that resume a FAILED saga's compensation, `skip` naming the steps an operator
    /// undid by hand: each must be one still to be compensated (its compensation failed, or has
    /// not run yet). When nothing is left to compensate, the saga ends in the same commit.
    pub fn retry(
        &self,
        reason: &str,
        requested_by: &str,
        skip: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<Event>, CannotRetry> {
        if self.phase != Phase::Ended(SagaStatus::Failed) {
            return Err(CannotRetry::NotFailed(self.status().as_str()));
        }
        let mut events = vec![Event::RetryRequested {
            reason: reason.to_owned(),
            requested_by: requested_by.to_owned(),
        }];
        let mut skipped = Vec::new();
        for name in skip {
            let k = self
                .step_index(name)
                .map_err(|_| CannotRetry::UnknownStep(name.clone()))?;
            let step = &self.steps[k];
            let why = if !step.needs_compensation {
                Some("it has nothing to undo")
            } else if step.status == StepStatus::Compensated {
                Some("it is compensated already")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(CannotRetry::NotSkippable {
                    step: name.clone(),
                    why,
                });
            }
            if !skipped.contains(&k) {
                skipped.push(k);
                events.push(Event::CompensationSkipped {
                    step: name.clone(),
                    reason: reason.to_owned(),
                    requested_by: requested_by.to_owned(),
                });
            }
        }
        Ok(self.with_terminal(events, now))
    }

    /// When a cancel stopped the saga while `command`, an attempt going forward, was in
    /// flight: the event that counts that attempt, whose outcome stays unknown. `None` when
    /// the log already has it, or the saga is not compensating.
    pub fn interrupted(&self, command: Command, reason: &str) -> Option<Event> {
        let step = self.steps.get(command.step)?;
        (self.phase == Phase::Backward
            && command.kind == CommandKind::Execute
            && step.status == StepStatus::Failed
            && step.attempts < command.attempt)
            .then(|| Event::StepAttemptInterrupted {
                step: self.definition.steps[command.step].name.clone(),
                attempt: command.attempt,
                reason: reason.to_owned(),
            })
    }

    /// Since when the step being worked on has kept failing, while the saga has not ended:
    /// what decides whether the saga is stuck.
    pub fn failing_since(&self) -> Option<DateTime<Utc>> {
        let k = match self.phase {
            Phase::Ended(_) => None,
            Phase::Forward => self.current_forward_step(),
            Phase::Backward => self.next_compensation(),
        }?;
        self.steps[k].failing_since
    }

    /// The events that cancel a running saga. A saga already compensating needs none; an ended
    /// one cannot be cancelled.
    pub fn cancel(
        &self,
        reason: &str,
        requested_by: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<Event>, CannotCancel> {
        match self.phase {
            Phase::Forward => Ok(self.with_terminal(
                vec![Event::CancelRequested {
                    reason: reason.to_owned(),
                    requested_by: requested_by.to_owned(),
                }],
                now,
            )),
            Phase::Backward => Ok(Vec::new()),
            Phase::Ended(status) => Err(CannotCancel(status.as_str())),
        }
    }

    /// The document a participant receives: `{"input": …, "steps": {<step>: <output>}}`.
    pub fn context(&self) -> Context<'_> {
        Context::new(
            &self.input,
            self.definition
                .steps
                .iter()
                .zip(&self.steps)
                .filter_map(|(definition, step)| {
                    step.output
                        .as_deref()
                        .map(|output| (definition.name.as_str(), output))
                }),
        )
    }

    /// The steps as the read model shows them.
    pub fn step_views(&self) -> Vec<StepView> {
        self.definition
            .steps
            .iter()
            .zip(&self.steps)
            .map(|(definition, step)| StepView {
                name: definition.name.clone(),
                participant: definition.participant.clone(),
                status: step.status,
                attempts: step.attempts,
                compensation_attempts: step.compensation_attempts,
                last_error: step.last_error.clone(),
                output: step.output.clone(),
                next_attempt_at: step.retry_at,
            })
            .collect()
    }

    /// When the saga next needs attention: `None` once it has ended. This is the durable timer.
    pub fn wake_at(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self.decide(now) {
            Decision::Ended => None,
            Decision::WaitUntil(at) => Some(at),
            Decision::Call(_) | Decision::Finish(_) => Some(now),
        }
    }

    pub fn step_definition(&self, step: usize) -> &StepDefinition {
        &self.definition.steps[step]
    }

    /// The key a participant deduplicates on: the same for every attempt and after any crash.
    pub fn idempotency_key(&self, command: Command) -> String {
        let suffix = match command.kind {
            CommandKind::Execute => "execute",
            CommandKind::Compensate => "compensate",
        };
        format!(
            "{}/{}/{suffix}",
            self.id, self.definition.steps[command.step].name
        )
    }

    fn step_index(&self, name: &str) -> Result<usize, ApplyError> {
        self.definition
            .steps
            .iter()
            .position(|step| step.name == name)
            .ok_or_else(|| ApplyError::UnknownStep(name.to_owned()))
    }

    fn current_forward_step(&self) -> Option<usize> {
        self.steps
            .iter()
            .position(|step| step.status != StepStatus::Succeeded)
    }

    /// The newest step that may have taken effect and is not yet undone.
    fn next_compensation(&self) -> Option<usize> {
        self.steps.iter().rposition(|step| {
            step.needs_compensation
                && !matches!(
                    step.status,
                    StepStatus::Compensated | StepStatus::CompensationFailed
                )
        })
    }

    fn call_or_wait(&self, kind: CommandKind, k: usize, now: DateTime<Utc>) -> Decision {
        let step = &self.steps[k];
        if let Some(at) = step.retry_at
            && at > now
        {
            return Decision::WaitUntil(at);
        }
        let attempts = match kind {
            CommandKind::Execute => step.attempts,
            CommandKind::Compensate => step.compensation_attempts,
        };
        Decision::Call(Command {
            kind,
            step: k,
            attempt: attempts.saturating_add(1),
        })
    }

    fn go_backward(&mut self, reason: String) {
        if self.phase != Phase::Forward {
            return;
        }
        self.phase = Phase::Backward;
        self.failure_reason = Some(reason.clone());
        self.backward_reason = Some(reason);
        for step in &mut self.steps {
            // Compensations fail (or not) afresh.
            step.failing_since = None;
            if step.status == StepStatus::Running {
                step.status = StepStatus::Pending;
            }
        }
    }

    fn end(&mut self, status: SagaStatus) {
        self.phase = Phase::Ended(status);
        for step in &mut self.steps {
            step.retry_at = None;
        }
    }

    /// Appends the terminal event when `events` end the saga.
    fn with_terminal(&self, mut events: Vec<Event>, now: DateTime<Utc>) -> Vec<Event> {
        let mut next = self.clone();
        for event in &events {
            if next.apply(event).is_err() {
                return events;
            }
        }
        if let Decision::Finish(terminal) = next.decide(now) {
            events.push(terminal);
        }
        events
    }
}

/// A saga's context, `{"input": …, "steps": {<step>: <output>}}`, from its input and the
/// outputs of its steps that have one: the read model keeps those, and the context is made when
/// a call or an answer needs it. Borrowed, so that it is serialized or converted straight from
/// the saga's documents, never copied into a tree of its own first.
#[derive(Debug)]
pub struct Context<'a> {
    pub input: &'a Value,
    /// In the definition's order; a step's name appears once.
    pub outputs: Vec<(&'a str, &'a Value)>,
}

impl<'a> Context<'a> {
    pub fn new(input: &'a Value, outputs: impl IntoIterator<Item = (&'a str, &'a Value)>) -> Self {
        Self {
            input,
            outputs: outputs.into_iter().collect(),
        }
    }
}

impl Serialize for Context<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;

        struct Outputs<'s, 'a>(&'s [(&'a str, &'a Value)]);
        impl Serialize for Outputs<'_, '_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_map(self.0.iter().copied())
            }
        }

        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry("input", self.input)?;
        map.serialize_entry("steps", &Outputs(&self.outputs))?;
        map.end()
    }
}

/// The time of the next attempt after `failed_attempt`, or `None` when the policy allows no more.
fn retry_time(
    policy: &RetryPolicy,
    failed_attempt: u32,
    now: DateTime<Utc>,
    jitter_sample: f64,
) -> Option<DateTime<Utc>> {
    if !policy.allows_attempt(failed_attempt.saturating_add(1)) {
        return None;
    }
    let delay = policy.delay_after(failed_attempt, jitter_sample);
    let delay = chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
    Some(
        now.checked_add_signed(delay)
            .unwrap_or(DateTime::<Utc>::MAX_UTC),
    )
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
