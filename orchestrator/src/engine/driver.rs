//! Drives one saga: ask the core, make the one call, append the outcome, repeat. Nothing that
//! matters is held only here: the outcome of every call is in the log before the next decision,
//! and a retry's time is in the log before the wait. A driver acts only under a live tenure:
//! once its lease is lost or its write is fenced, it lets the saga go.

use std::time::Duration;

use chrono::Utc;
use sagad_proto::participant::v1::StepCommand;
use tokio::sync::Notify;
use uuid::Uuid;

use super::lease::Tenure;
use super::participants::Call;
use super::{Engine, projection};
use crate::saga::{Command, CommandKind, Decision, Event, Outcome, Saga};
use crate::store::{Fence, SagaWrite, WriteOutcome};

/// How long a driver waits before trying again when the database fails it.
const STORE_RETRY_DELAY: Duration = Duration::from_secs(1);

pub(super) async fn drive(engine: &Engine, mut saga: Saga, bell: &Notify, tenure: &Tenure) {
    let shutdown = &engine.inner.shutdown;
    let lost = &tenure.lost;
    loop {
        if shutdown.is_cancelled() || lost.is_cancelled() {
            return;
        }
        let now = Utc::now();
        let events = match saga.decide(now) {
            Decision::Ended => return,
            Decision::Finish(event) => vec![event],
            Decision::WaitUntil(at) => {
                let wait = (at - now).to_std().unwrap_or_default();
                tokio::select! {
                    () = tokio::time::sleep(wait) => continue,
                    () = bell.notified() => {}
                    () = shutdown.cancelled() => return,
                    () = lost.cancelled() => return,
                }
                match load_retrying(engine, saga.id).await {
                    Some(fresh) => saga = fresh,
                    None => return,
                }
                continue;
            }
            Decision::Call(command) => {
                if !engine.inner.lease.holds(tenure) {
                    tracing::info!(saga_id = %saga.id, "lease no longer trusted; letting the saga go");
                    return;
                }
                let call = prepare_call(&saga, command);
                let participant = call.participant.clone();
                let started = std::time::Instant::now();
                // A call in flight is allowed to finish at shutdown (it is bounded by the step's
                // timeout); a cancellation interrupts it, and the step is compensated. A ring
                // that finds the log unchanged (a repeated or spurious one) leaves the call be.
                let in_flight = engine.inner.participants.call(call);
                tokio::pin!(in_flight);
                let outcome = loop {
                    tokio::select! {
                        outcome = &mut in_flight => break Some(outcome),
                        () = lost.cancelled() => return,
                        () = bell.notified() => match load_retrying(engine, saga.id).await {
                            Some(fresh) if fresh.version == saga.version => {}
                            Some(fresh) => {
                                saga = fresh;
                                break None;
                            }
                            None => return,
                        },
                    }
                };
                let Some(outcome) = outcome else {
                    continue;
                };
                record_call_metrics(&participant, command.kind, &outcome, started.elapsed());
                saga.record_outcome(command, outcome, Utc::now(), fastrand::f64())
            }
        };
        match commit(engine, &saga, events, tenure.replica_id).await {
            Some(next) => saga = next,
            None => return,
        }
    }
}

fn prepare_call(saga: &Saga, command: Command) -> Call {
    let step = saga.step_definition(command.step);
    let (action, compensate) = match command.kind {
        CommandKind::Execute => (step.action.clone(), false),
        CommandKind::Compensate => (step.compensation.clone().unwrap_or_default(), true),
    };
    Call {
        participant: step.participant.clone(),
        compensate,
        timeout: step.timeout,
        command: StepCommand {
            saga_id: saga.id.to_string(),
            saga_type: saga.saga_type.clone(),
            step: step.name.clone(),
            action,
            idempotency_key: saga.idempotency_key(command),
            attempt: command.attempt,
            input: serde_json::from_value(saga.context()).ok(),
            correlation_id: saga.correlation_id.clone(),
        },
    }
}

fn record_call_metrics(participant: &str, kind: CommandKind, outcome: &Outcome, took: Duration) {
    let kind = match kind {
        CommandKind::Execute => "execute",
        CommandKind::Compensate => "compensate",
    };
    let outcome = match outcome {
        Outcome::Success { .. } => "success",
        Outcome::Refused { .. } => "refused",
        Outcome::Transient { .. } => "transient",
    };
    let participant = participant.to_owned();
    metrics::counter!(
        "sagad_participant_calls_total",
        "participant" => participant.clone(),
        "kind" => kind,
        "outcome" => outcome
    )
    .increment(1);
    metrics::histogram!(
        "sagad_participant_call_seconds",
        "participant" => participant,
        "kind" => kind
    )
    .record(took.as_secs_f64());
}

/// Appends `events` and returns the saga after them; after a conflict or a database failure,
/// the saga as the log has it. `None`: stop driving (fenced off, shutdown, or a log that cannot
/// be read).
async fn commit(
    engine: &Engine,
    saga: &Saga,
    events: Vec<Event>,
    replica_id: Uuid,
) -> Option<Saga> {
    let mut next = saga.clone();
    for event in &events {
        if let Err(error) = next.apply(event) {
            tracing::error!(saga_id = %saga.id, %error, "the core produced an event it cannot apply");
            return None;
        }
    }
    let write = SagaWrite {
        saga_id: saga.id,
        expected_version: saga.version,
        replica_id,
        fence: Fence::Owner,
        events,
        projection: projection(&next),
    };
    match engine.inner.writer.write(write).await {
        Ok(WriteOutcome::Written) => {
            if next.status().is_terminal() {
                metrics::counter!(
                    "sagad_sagas_finished_total",
                    "saga_type" => next.saga_type.clone(),
                    "status" => next.status().as_str()
                )
                .increment(1);
            }
            Some(next)
        }
        Ok(WriteOutcome::Conflict) => load_retrying(engine, saga.id).await,
        Ok(WriteOutcome::Fenced) => {
            tracing::info!(saga_id = %saga.id, %replica_id, "fenced off: another replica has the saga");
            metrics::counter!("sagad_writes_fenced_total").increment(1);
            None
        }
        Err(error) => {
            tracing::warn!(saga_id = %saga.id, %error, "cannot record the outcome; will retry");
            tokio::select! {
                () = tokio::time::sleep(STORE_RETRY_DELAY) => {}
                () = engine.inner.shutdown.cancelled() => return None,
            }
            load_retrying(engine, saga.id).await
        }
    }
}

/// The saga as its log has it now, retrying while the database fails.
pub(super) async fn load_retrying(engine: &Engine, saga_id: Uuid) -> Option<Saga> {
    loop {
        match engine.load(saga_id).await {
            Ok(fresh) => return Some(fresh),
            Err(super::EngineError::Store(error)) => {
                tracing::warn!(%saga_id, %error, "cannot read the saga log; will retry");
                tokio::select! {
                    () = tokio::time::sleep(STORE_RETRY_DELAY) => {}
                    () = engine.inner.shutdown.cancelled() => return None,
                }
            }
            Err(error) => {
                tracing::error!(%saga_id, %error, "cannot resume saga");
                return None;
            }
        }
    }
}
