//! The `sagad.participant.v1.Participant` service around a [`StepHandler`]: fault injection,
//! then the command goes to a batch ([`crate::batch`]): a transaction shared with the commands
//! that arrived with it, in which it locks its step, replays a recorded reply, or runs the
//! handler in a savepoint and records its reply with its effect.
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

use crate::batch::{Batcher, Direction};
use crate::handler::{StepCommandView, StepHandler};
use crate::ledger::Reply;

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
    batcher: Batcher,
    faults: Faults,
    handler: std::marker::PhantomData<fn() -> H>,
}

impl<H> Clone for ParticipantService<H> {
    fn clone(&self) -> Self {
        Self {
            batcher: self.batcher.clone(),
            faults: self.faults,
            handler: std::marker::PhantomData,
        }
    }
}

impl<H: StepHandler> ParticipantService<H> {
    /// `pool` must reach a database where [`crate::migrate_ledger`] has run. Starts the task
    /// that gathers commands into batches, so it must be called inside a Tokio runtime.
    pub fn new(pool: PgPool, handler: H, faults: Faults) -> Self {
        Self {
            batcher: Batcher::spawn(pool, Arc::new(handler)),
            faults,
            handler: std::marker::PhantomData,
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
}

#[tonic::async_trait]
impl<H: StepHandler> Participant for ParticipantService<H> {
    async fn execute(&self, request: Request<StepCommand>) -> Result<Response<StepReply>, Status> {
        let span = call_span("Execute", &request);
        async {
            self.inject_faults().await?;
            let command = view(request.into_inner())?;
            let reply = self.batcher.run(command, Direction::Execute).await?;
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
            let reply = self.batcher.run(command, Direction::Compensate).await?;
            Ok(Response::new(to_proto(reply)?))
        }
        .instrument(span)
        .await
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
