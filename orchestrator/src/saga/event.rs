//! The events of a saga's log. They are the truth: a saga's state is the fold of its events, so
//! an event says what happened, never what to do next.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::definition::SagaDefinition;

/// One entry of a saga's append-only log, stored as JSON with its `type` as the tag (log
/// format 1, see `store::format`). A field added to an event later must read back as a
/// default from the logs written before it (`#[serde(default)]`), so old logs stay readable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// Always the first event: it snapshots the definition, so editing a file never changes a
    /// running saga.
    SagaStarted {
        saga_type: String,
        definition: Arc<SagaDefinition>,
        input: Arc<Value>,
        correlation_id: String,
        idempotency_key: String,
        /// The W3C `traceparent` every span of the saga descends from, so its trace goes on
        /// after a takeover or a restart. Absent from logs written before it existed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trace_parent: Option<String>,
    },
    StepSucceeded {
        step: String,
        attempt: u32,
        output: Arc<Value>,
    },
    /// A business refusal: the step took no effect and is not compensated.
    StepRefused {
        step: String,
        attempt: u32,
        code: String,
        reason: String,
    },
    /// A transient failure. `retry_at` is the durable timer of the next attempt; `None` means
    /// the attempts are exhausted and the step may have taken effect.
    StepAttemptFailed {
        step: String,
        attempt: u32,
        error: String,
        retry_at: Option<DateTime<Utc>>,
        /// When the attempt failed: how long a step has kept failing says whether it is stuck.
        /// Absent from logs written before it existed.
        #[serde(default)]
        failed_at: Option<DateTime<Utc>>,
    },
    /// The participant did the step, but its output cannot be kept (too large, a NUL
    /// character, a number a `Struct` cannot carry): the step failed, and since it took
    /// effect, it is compensated with the steps before it.
    StepOutputRejected {
        step: String,
        attempt: u32,
        error: String,
    },
    /// An attempt in flight was abandoned when the saga was cancelled: it may or may not have
    /// taken effect, so the step is compensated like one that did.
    StepAttemptInterrupted {
        step: String,
        attempt: u32,
        reason: String,
    },
    /// An operator stopped the saga going forward.
    CancelRequested {
        reason: String,
        /// Who asked (a token's name, or the client's address); logs of releases before it
        /// was recorded read it as empty.
        #[serde(default)]
        requested_by: String,
    },
    CompensationSucceeded {
        step: String,
        attempt: u32,
    },
    /// A transient failure of a compensation; `None` means its attempts are exhausted.
    CompensationAttemptFailed {
        step: String,
        attempt: u32,
        error: String,
        retry_at: Option<DateTime<Utc>>,
        /// As in `StepAttemptFailed`.
        #[serde(default)]
        failed_at: Option<DateTime<Utc>>,
    },
    /// The participant refused to undo the step: an operator must act.
    CompensationRefused {
        step: String,
        attempt: u32,
        code: String,
        reason: String,
    },
    /// An operator resumed the compensation of a FAILED saga, having fixed the cause.
    RetryRequested {
        reason: String,
        requested_by: String,
    },
    /// An operator undid a step by hand: it is compensated without its compensation being
    /// called (again).
    CompensationSkipped {
        step: String,
        reason: String,
        requested_by: String,
    },
    SagaCompleted,
    SagaCompensated,
    SagaFailed {
        reason: String,
    },
}

impl Event {
    /// The name stored in the log's `event_type` column and shown in history.
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::SagaStarted { .. } => "saga_started",
            Event::StepSucceeded { .. } => "step_succeeded",
            Event::StepRefused { .. } => "step_refused",
            Event::StepAttemptFailed { .. } => "step_attempt_failed",
            Event::StepOutputRejected { .. } => "step_output_rejected",
            Event::StepAttemptInterrupted { .. } => "step_attempt_interrupted",
            Event::CancelRequested { .. } => "cancel_requested",
            Event::CompensationSucceeded { .. } => "compensation_succeeded",
            Event::CompensationAttemptFailed { .. } => "compensation_attempt_failed",
            Event::CompensationRefused { .. } => "compensation_refused",
            Event::RetryRequested { .. } => "retry_requested",
            Event::CompensationSkipped { .. } => "compensation_skipped",
            Event::SagaCompleted => "saga_completed",
            Event::SagaCompensated => "saga_compensated",
            Event::SagaFailed { .. } => "saga_failed",
        }
    }

    /// The step the event is about, if any.
    pub fn step(&self) -> Option<&str> {
        match self {
            Event::StepSucceeded { step, .. }
            | Event::StepRefused { step, .. }
            | Event::StepAttemptFailed { step, .. }
            | Event::StepOutputRejected { step, .. }
            | Event::StepAttemptInterrupted { step, .. }
            | Event::CompensationSkipped { step, .. }
            | Event::CompensationSucceeded { step, .. }
            | Event::CompensationAttemptFailed { step, .. }
            | Event::CompensationRefused { step, .. } => Some(step),
            _ => None,
        }
    }

    /// Whether this event ends the saga.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Event::SagaCompleted | Event::SagaCompensated | Event::SagaFailed { .. }
        )
    }
}
