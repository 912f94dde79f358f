//! The `sagad.participant.v1.Participant` service around a [`StepHandler`]: fault injection,
//! then one transaction per command that locks the step, replays a recorded reply, or runs the
//! handler and records its reply with its effect.
//!
//! That transaction runs in a task of its own, which the RPC only waits for. The orchestrator
//! gives up on a call when its deadline passes or the saga is cancelled, and tonic then drops the
//! RPC's future wherever it is. Were the transaction that future, it would stop at that await: in
//! the handler (rolled back, so the next attempt runs it again), or in the middle of `COMMIT`,
//! when sqlx, seeing a transaction never marked done, queues a `ROLLBACK` behind the `COMMIT`
//! already sent (Postgres then warns "there is no transaction in progress"). A command the
//! participant has begun is carried to its end instead, and its key is recorded, whoever is
//! still listening.

use std::sync::Arc;
use std::time::Duration;

use pbjson_types::Struct;
use sagad_proto::participant::v1::participant_server::Participant;
use sagad_proto::participant::v1::{StepCommand, StepFailure, StepReply, StepSuccess, step_reply};
use serde_json::Value;
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::handler::{StepCommandView, StepError, StepHandler};
use crate::ledger::{self, Kind, Reply};

/// The failure code of an `Execute` that arrives after its step was compensated.
pub const COMPENSATED: &str = "COMPENSATED";

/// Faults a participant injects on purpose, to exercise the orchestrator's retries.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// The fraction (0 to 1) of Execute/Compensate calls that answer `UNAVAILABLE` before
    /// doing anything.
    pub transient_failure_rate: f64,
    /// How long every Execute/Compensate waits first.
    pub latency: Duration,
}

/// The participant service: serve it with
/// `ParticipantServer::new(ParticipantService::new(pool, handler, faults))`.
pub struct ParticipantService<H> {
    pool: PgPool,
    handler: Arc<H>,
    faults: Faults,
}

impl<H> Clone for ParticipantService<H> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            handler: Arc::clone(&self.handler),
            faults: self.faults,
        }
    }
}

impl<H: StepHandler> ParticipantService<H> {
    /// `pool` must reach a database where [`crate::migrate_ledger`] has run.
    pub fn new(pool: PgPool, handler: H, faults: Faults) -> Self {
        Self {
            pool,
            handler: Arc::new(handler),
            faults,
        }
    }

    async fn inject_faults(&self) -> Result<(), Status> {
        if !self.faults.latency.is_zero() {
            tokio::time::sleep(self.faults.latency).await;
        }
        if self.faults.transient_failure_rate > 0.0
            && fastrand::f64() < self.faults.transient_failure_rate
        {
            tracing::info!("injected transient failure");
            return Err(Status::unavailable("injected transient failure"));
        }
        Ok(())
    }

    async fn execute_command(&self, command: StepCommandView) -> Result<Reply, Status> {
        let key = command.idempotency_key.clone();
        let mut tx = self.pool.begin().await.map_err(database_status)?;
        ledger::lock_step(&mut tx, &key)
            .await
            .map_err(database_status)?;
        if let Some(recorded) = ledger::find(&mut tx, &key).await.map_err(database_status)? {
            tx.rollback().await.map_err(database_status)?;
            tracing::info!(
                tombstone = recorded.kind == Kind::Tombstone,
                "repeated key: the recorded reply"
            );
            return Ok(recorded.reply);
        }

        let reply = match self.handler.execute(&command, &mut tx).await {
            Ok(output) => Reply::Success(checked_output(output)?),
            Err(StepError::Refused { code, reason }) => {
                // The refusal is recorded without the handler's writes: they are rolled back,
                // and the key recorded in a transaction of its own (refusals are rare, so the
                // common path pays for no savepoint).
                tx.rollback().await.map_err(database_status)?;
                tx = self.pool.begin().await.map_err(database_status)?;
                ledger::lock_step(&mut tx, &key)
                    .await
                    .map_err(database_status)?;
                if let Some(recorded) =
                    ledger::find(&mut tx, &key).await.map_err(database_status)?
                {
                    tx.rollback().await.map_err(database_status)?;
                    return Ok(recorded.reply);
                }
                Reply::Failure { code, reason }
            }
            Err(StepError::Internal(message)) => {
                // Dropping the transaction rolls back the effect and leaves the key unrecorded.
                tracing::warn!(%message, "execute failed; rolled back");
                return Err(Status::internal(message));
            }
        };
        ledger::record(&mut tx, &key, Kind::Execute, &reply)
            .await
            .map_err(database_status)?;
        tx.commit().await.map_err(database_status)?;
        tracing::info!(refused = matches!(reply, Reply::Failure { .. }), "executed");
        Ok(reply)
    }

    async fn compensate_command(&self, mut command: StepCommandView) -> Result<Reply, Status> {
        let key = command.idempotency_key.clone();
        let execute_key = execute_key_of(&command);
        let mut tx = self.pool.begin().await.map_err(database_status)?;
        ledger::lock_step(&mut tx, &execute_key)
            .await
            .map_err(database_status)?;
        if let Some(recorded) = ledger::find(&mut tx, &key).await.map_err(database_status)? {
            tx.rollback().await.map_err(database_status)?;
            tracing::info!("repeated key: the recorded reply");
            return Ok(recorded.reply);
        }

        let executed = ledger::find(&mut tx, &execute_key)
            .await
            .map_err(database_status)?;
        let executed_output = match executed {
            Some(recorded) if recorded.kind == Kind::Execute => match recorded.reply {
                Reply::Success(output) => Some(output),
                // A refused execute changed nothing.
                Reply::Failure { .. } => None,
            },
            Some(_) => None,
            None => {
                // Null compensation: the execute never took effect here. A tombstone makes a
                // late execute with that key a refusal that changes nothing.
                let tombstone = Reply::Failure {
                    code: COMPENSATED.to_owned(),
                    reason: format!(
                        "step {} of saga {} was compensated before it executed",
                        command.step, command.saga_id
                    ),
                };
                ledger::record(&mut tx, &execute_key, Kind::Tombstone, &tombstone)
                    .await
                    .map_err(database_status)?;
                None
            }
        };
        let Some(executed_output) = executed_output else {
            let reply = Reply::Success(Value::Null);
            ledger::record(&mut tx, &key, Kind::Compensate, &reply)
                .await
                .map_err(database_status)?;
            tx.commit().await.map_err(database_status)?;
            tracing::info!("null compensation: nothing to undo");
            return Ok(reply);
        };

        command.executed_output = Some(executed_output);
        let result = self.handler.compensate(&command, &mut tx).await;
        match result {
            Ok(output) => {
                let reply = Reply::Success(checked_output(output)?);
                ledger::record(&mut tx, &key, Kind::Compensate, &reply)
                    .await
                    .map_err(database_status)?;
                tx.commit().await.map_err(database_status)?;
                tracing::info!("compensated");
                Ok(reply)
            }
            Err(StepError::Refused { code, reason }) => {
                // Not recorded: the saga goes FAILED, an operator fixes the cause and RetrySaga
                // sends the same key again, which must then run.
                tx.rollback().await.map_err(database_status)?;
                tracing::warn!(%code, %reason, "compensation refused");
                Ok(Reply::Failure { code, reason })
            }
            Err(StepError::Internal(message)) => {
                tracing::warn!(%message, "compensate failed; rolled back");
                Err(Status::internal(message))
            }
        }
    }
}

#[tonic::async_trait]
impl<H: StepHandler> Participant for ParticipantService<H> {
    async fn execute(&self, request: Request<StepCommand>) -> Result<Response<StepReply>, Status> {
        let span = call_span("Execute", &request);
        async {
            self.inject_faults().await?;
            let command = view(request.into_inner())?;
            let service = self.clone();
            let reply = to_the_end(async move { service.execute_command(command).await }).await?;
            Ok(Response::new(to_proto(reply)?))
        }
        .instrument(span)
        .await
    }

    async fn compensate(
        &self,
        request: Request<StepCommand>,
    ) -> Result<Response<StepReply>, Status> {
        let span = call_span("Compensate", &request);
        async {
            self.inject_faults().await?;
            let command = view(request.into_inner())?;
            let service = self.clone();
            let reply =
                to_the_end(async move { service.compensate_command(command).await }).await?;
            Ok(Response::new(to_proto(reply)?))
        }
        .instrument(span)
        .await
    }
}

/// Runs a command's transaction in a task of its own, in the call's span, and waits for its
/// reply: if the caller goes away, only the waiting stops. A handler that panics is an
/// `INTERNAL` error, which the orchestrator retries (its transaction was rolled back).
async fn to_the_end(
    command: impl Future<Output = Result<Reply, Status>> + Send + 'static,
) -> Result<Reply, Status> {
    match tokio::spawn(command.in_current_span()).await {
        Ok(reply) => reply,
        Err(error) => {
            tracing::error!(%error, "the command's task failed; rolled back");
            Err(Status::internal(format!(
                "the command's task failed: {error}"
            )))
        }
    }
}

pub(crate) fn call_span(rpc: &'static str, request: &Request<StepCommand>) -> tracing::Span {
    let metadata = |name: &str| {
        request
            .metadata()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let command = request.get_ref();
    let span = tracing::info_span!(
        "step",
        otel.name = %format!("{rpc} {}", command.step),
        otel.kind = "server",
        rpc,
        saga_id = %metadata("x-saga-id"),
        correlation_id = %metadata("x-correlation-id"),
        step = %command.step,
        action = %command.action,
        idempotency_key = %command.idempotency_key,
        attempt = command.attempt,
    );
    // The saga's trace goes on here: the call's span is a child of sagad's attempt span.
    if let Some(parent) = sagad_telemetry::trace::from_metadata(request.metadata()) {
        sagad_telemetry::trace::continue_trace(&span, &parent);
    }
    span
}

/// The execute key of the step a compensation undoes: `<saga>/<step>/execute`.
fn execute_key_of(command: &StepCommandView) -> String {
    match command.idempotency_key.strip_suffix("/compensate") {
        Some(prefix) => format!("{prefix}/execute"),
        None => format!("{}/{}/execute", command.saga_id, command.step),
    }
}

fn view(command: StepCommand) -> Result<StepCommandView, Status> {
    if command.idempotency_key.is_empty() {
        return Err(Status::invalid_argument("idempotency_key is empty"));
    }
    let context = match command.input {
        Some(input) => serde_json::to_value(&input)
            .map_err(|error| Status::invalid_argument(format!("input: {error}")))?,
        None => Value::Object(Default::default()),
    };
    Ok(StepCommandView {
        saga_id: command.saga_id,
        saga_type: command.saga_type,
        step: command.step,
        action: command.action,
        idempotency_key: command.idempotency_key,
        attempt: command.attempt,
        context,
        correlation_id: command.correlation_id,
        executed_output: None,
    })
}

/// An output must be a JSON object (or `Null`, no output): it becomes a `Struct`.
fn checked_output(output: Value) -> Result<Value, Status> {
    match output {
        Value::Null | Value::Object(_) => Ok(output),
        other => Err(Status::internal(format!(
            "the handler returned {other}, not a JSON object"
        ))),
    }
}

fn to_proto(reply: Reply) -> Result<StepReply, Status> {
    let result = match reply {
        Reply::Success(Value::Null) => step_reply::Result::Success(StepSuccess { output: None }),
        Reply::Success(output) => {
            let output: Struct = serde_json::from_value(output)
                .map_err(|error| Status::internal(format!("output: {error}")))?;
            step_reply::Result::Success(StepSuccess {
                output: Some(output),
            })
        }
        Reply::Failure { code, reason } => {
            step_reply::Result::Failure(StepFailure { code, reason })
        }
    };
    Ok(StepReply {
        result: Some(result),
    })
}

/// The database is down or busy: transient, so the orchestrator retries.
fn database_status(error: sqlx::Error) -> Status {
    tracing::warn!(%error, "database error");
    Status::unavailable(format!("database: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_execute_key_of_a_compensation() {
        let mut command = view(StepCommand {
            saga_id: "s".into(),
            step: "charge".into(),
            idempotency_key: "s/charge/compensate".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(execute_key_of(&command), "s/charge/execute");
        command.idempotency_key = "odd".into();
        assert_eq!(execute_key_of(&command), "s/charge/execute");
    }
}
