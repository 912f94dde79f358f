//! What a participant implements: a [`StepHandler`] that applies an action's effect on the
//! connection of the SDK's transaction, and the [`StepError`] that says how a call failed.

use serde_json::Value;
use sqlx::PgConnection;

/// A command as the handler sees it: the proto `StepCommand` with its context as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct StepCommandView {
    pub saga_id: String,
    pub saga_type: String,
    pub step: String,
    pub action: String,
    pub idempotency_key: String,
    pub attempt: u32,
    /// The saga context: `{"input": <saga input>, "steps": {<step>: <output>, …}}`.
    pub context: Value,
    pub correlation_id: String,
    /// For a compensation: the output the step's `Execute` returned here. The SDK only calls
    /// [`StepHandler::compensate`] for a step whose execute took effect, so it is always set
    /// then; `None` for an execute.
    pub executed_output: Option<Value>,
}

impl StepCommandView {
    /// The saga's input (`context.input`); `Null` when absent.
    pub fn input(&self) -> &Value {
        &self.context["input"]
    }

    /// The output of an earlier step (`context.steps.<step>`), if it is in the context.
    pub fn step_output(&self, step: &str) -> Option<&Value> {
        self.context
            .get("steps")
            .and_then(|steps| steps.get(step))
            .filter(|output| !output.is_null())
    }

    /// A string field of the saga input, or a refusal naming it.
    pub fn input_str(&self, field: &str) -> Result<&str, StepError> {
        self.input()
            .get(field)
            .and_then(Value::as_str)
            .ok_or_else(|| StepError::bad_input(format!("input.{field} must be a string")))
    }

    /// An integer field of the saga input (a JSON number with no fraction), or a refusal.
    pub fn input_i64(&self, field: &str) -> Result<i64, StepError> {
        let value = self.input().get(field);
        value
            .and_then(Value::as_i64)
            // Struct numbers are doubles: 1500 arrives as 1500.0.
            .or_else(|| {
                value
                    .and_then(Value::as_f64)
                    .filter(|n| n.fract() == 0.0 && n.abs() < 9.0e15)
                    .map(|n| n as i64)
            })
            .ok_or_else(|| StepError::bad_input(format!("input.{field} must be a whole number")))
    }
}

/// How a handler call failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// A business refusal: the effect is rolled back, the refusal is the reply
    /// (`StepReply.failure`), recorded for an execute so the same key gets it again. Not retried.
    #[error("refused ({code}): {reason}")]
    Refused { code: String, reason: String },
    /// Something went wrong that a retry may fix: the whole transaction rolls back (nothing is
    /// recorded) and the call answers gRPC `INTERNAL`, so the orchestrator retries.
    #[error("internal error: {0}")]
    Internal(String),
}

impl StepError {
    pub fn refused(code: impl Into<String>, reason: impl Into<String>) -> Self {
        StepError::Refused {
            code: code.into(),
            reason: reason.into(),
        }
    }

    pub fn internal(error: impl std::fmt::Display) -> Self {
        StepError::Internal(error.to_string())
    }

    /// The saga context lacks what the action needs: a refusal, since a retry cannot fix it.
    pub fn bad_input(reason: impl Into<String>) -> Self {
        StepError::refused("INVALID_INPUT", reason)
    }
}

impl From<sqlx::Error> for StepError {
    /// The database refusing the command's data (SQLSTATE class 22, a data exception, or 54, a
    /// limit exceeded: a key too long to index, say) is a refusal, since a retry sends the same
    /// data; anything else may pass on a retry.
    fn from(error: sqlx::Error) -> Self {
        let refused_data = match &error {
            sqlx::Error::Database(database) => database
                .code()
                .is_some_and(|code| code.starts_with("22") || code.starts_with("54")),
            _ => false,
        };
        if refused_data {
            StepError::bad_input(format!("the database refused the command's data: {error}"))
        } else {
            StepError::internal(format!("database: {error}"))
        }
    }
}

/// A participant's business logic. Each call runs inside the SDK's transaction, which also
/// records the idempotency key: write through `conn`, never through another connection, or the
/// effect is no longer atomic with the key.
#[tonic::async_trait]
pub trait StepHandler: Send + Sync + 'static {
    /// Applies `command.action`; the returned JSON object (or `Null`) is the step's output.
    async fn execute(
        &self,
        command: &StepCommandView,
        conn: &mut PgConnection,
    ) -> Result<Value, StepError>;

    /// Undoes `command.action`'s step. Only called when its execute took effect (see
    /// [`StepCommandView::executed_output`]); the SDK answers the null compensation itself.
    async fn compensate(
        &self,
        command: &StepCommandView,
        conn: &mut PgConnection,
    ) -> Result<Value, StepError>;
}
