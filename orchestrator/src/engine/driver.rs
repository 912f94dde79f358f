//! Drives one saga: ask the core, make the one call, append the outcome, repeat. Nothing that
//! matters is held only here: the outcome of every call is in the log before the next decision,
//! and a retry's time is in the log before the wait. A driver acts only under a live tenure:
//! once its lease is lost or its write is fenced, it lets the saga go. A wait longer than
//! [`LeaseTiming::park_after`](super::LeaseTiming::park_after) is not spent here: the saga is
//! parked (let go, its timer in the database) and a sweep claims it when it is due, so sagas
//! waiting long cost no memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;
use sagad_proto::participant::v1::StepCommand;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use super::lease::Tenure;
use super::participants::{Call, TIMED_OUT};
use super::{Engine, projection};
use crate::document;
use crate::saga::{Command, CommandKind, Decision, Event, Outcome, Saga};
use crate::store::{Fence, Parking, SagaWrite, StoreError, WriteOutcome};
use sagad_telemetry::trace;

/// How long a driver waits before trying again when the database fails it.
const STORE_RETRY_DELAY: Duration = Duration::from_secs(1);

/// The largest context (the input and every output, as JSON) a saga may build up: sent with
/// every call, it must stay well within what a participant accepts in one message.
/// With it, a saga with its history stays within the 4 MiB a gRPC client reads by default.
pub(super) const MAX_CONTEXT_BYTES: usize = 1024 * 1024;

/// Drives `saga` until it ends, this replica lets it go, or sagad stops. `stored` is kept at
/// the newest version this driver knows to be in the database (committed or read): a
/// long-poll for a later one is answered by this driver's commit, or has nothing to read yet
/// (see `Engine::get_saga`).
pub(super) async fn drive(
    engine: &Engine,
    mut saga: Saga,
    bell: &Notify,
    tenure: &Tenure,
    stored: &AtomicU64,
) {
    let shutdown = &engine.inner.shutdown;
    let lost = &tenure.lost;
    stored.store(saga.version, Ordering::SeqCst);
    loop {
        stored.fetch_max(saga.version, Ordering::SeqCst);
        if shutdown.is_cancelled() || lost.is_cancelled() {
            return;
        }
        let now = Utc::now();
        let events = match saga.decide(now) {
            Decision::Ended => return,
            Decision::Finish(event) => vec![event],
            Decision::WaitUntil(at) => {
                let mut wait = (at - now).to_std().unwrap_or_default();
                let park_after = engine.inner.lease.timing().park_after();
                if wait > park_after {
                    let parking = engine
                        .inner
                        .store
                        .park(saga.id, saga.version, tenure.replica_id, park_after)
                        .await;
                    match parking {
                        Ok(Parking::Parked) => {
                            metrics::counter!("sagad_sagas_parked_total").increment(1);
                            tracing::debug!(wake_at = %at, "parked until due");
                            return;
                        }
                        Ok(Parking::Moved) => {
                            match load_retrying(engine, saga.id, lost).await {
                                Some(fresh) => saga = fresh,
                                None => return,
                            }
                            continue;
                        }
                        Ok(Parking::Fenced) => {
                            tracing::info!(saga_id = %saga.id, "not this replica's saga any more; letting it go");
                            return;
                        }
                        Ok(Parking::DueSoon) => {}
                        Err(error) => {
                            tracing::warn!(saga_id = %saga.id, %error, "cannot park the saga; will retry");
                            wait = wait.min(STORE_RETRY_DELAY);
                        }
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(wait) => continue,
                    () = bell.notified() => {}
                    () = shutdown.cancelled() => return,
                    () = lost.cancelled() => return,
                }
                match load_retrying(engine, saga.id, lost).await {
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
                let mut call = prepare_call(&saga, command);
                // One span per attempt, in the saga's trace; the participant continues it.
                let attempt = tracing::info_span!(
                    "step attempt",
                    otel.name = %format!("{} {}", kind_name(command.kind), call.command.step),
                    otel.kind = "client",
                    saga_id = %saga.id,
                    saga_type = %saga.saga_type,
                    step = %call.command.step,
                    kind = kind_name(command.kind),
                    attempt = command.attempt,
                    outcome = tracing::field::Empty,
                );
                if let Some(parent) = &saga.trace_parent {
                    trace::continue_trace(&attempt, parent);
                }
                call.traceparent = trace::traceparent_of(&attempt, saga.trace_parent.as_deref());
                let participant = call.participant.clone();
                let started = std::time::Instant::now();
                // A call in flight is allowed to finish at shutdown (it is bounded by the step's
                // timeout); a cancellation interrupts it, and the step is compensated. A ring
                // that finds the log unchanged (a repeated or spurious one) leaves the call be.
                // The tenure is asked again once the call holds its permit, right before it
                // goes out: the wait for a permit may have outlasted the lease.
                let in_flight = engine
                    .inner
                    .participants
                    .call(call, || engine.inner.lease.holds(tenure))
                    .instrument(attempt.clone());
                tokio::pin!(in_flight);
                let outcome = loop {
                    tokio::select! {
                        outcome = &mut in_flight => match outcome {
                            Some(outcome) => break Some(outcome),
                            None => {
                                tracing::info!(saga_id = %saga.id, "lease no longer trusted; letting the saga go");
                                return;
                            }
                        },
                        () = lost.cancelled() => return,
                        () = bell.notified() => match load_retrying(engine, saga.id, lost).await {
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
                    // Abandoned for a cancel: the attempt is counted, its outcome unknown.
                    let reason = saga.failure_reason.clone().unwrap_or_default();
                    if let Some(event) = saga.interrupted(command, &reason) {
                        match commit(engine, &saga, vec![event], tenure, stored).await {
                            Some(next) => saga = next,
                            None => return,
                        }
                    }
                    continue;
                };
                let label =
                    record_call_metrics(&participant, command.kind, &outcome, started.elapsed());
                attempt.record("outcome", label);
                let outcome = within_context_limit(&saga, outcome);
                saga.record_outcome(command, outcome, Utc::now(), fastrand::f64())
            }
        };
        match commit(engine, &saga, events, tenure, stored).await {
            Some(next) => saga = next,
            None => return,
        }
    }
}

/// A success whose output would grow the saga's context past [`MAX_CONTEXT_BYTES`] is rejected
/// like any output sagad cannot keep.
fn within_context_limit(saga: &Saga, outcome: Outcome) -> Outcome {
    let Outcome::Success { output } = &outcome else {
        return outcome;
    };
    let size = document::size_of(&saga.context()).saturating_add(document::size_of(output));
    if size > MAX_CONTEXT_BYTES {
        return Outcome::OutputRejected {
            error: format!(
                "output: with it the saga's context would be {size} bytes, over the limit of \
                 {MAX_CONTEXT_BYTES}"
            ),
        };
    }
    outcome
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
        traceparent: None,
        command: StepCommand {
            saga_id: saga.id.to_string(),
            saga_type: saga.saga_type.clone(),
            step: step.name.clone(),
            action,
            idempotency_key: saga.idempotency_key(command),
            attempt: command.attempt,
            input: Some(document::context_struct(&saga.context())),
            correlation_id: saga.correlation_id.clone(),
        },
    }
}

fn kind_name(kind: CommandKind) -> &'static str {
    match kind {
        CommandKind::Execute => "execute",
        CommandKind::Compensate => "compensate",
    }
}

/// Counts the call and returns its outcome's label.
fn record_call_metrics(
    participant: &str,
    kind: CommandKind,
    outcome: &Outcome,
    took: Duration,
) -> &'static str {
    let kind = kind_name(kind);
    let outcome = match outcome {
        Outcome::Success { .. } | Outcome::OutputRejected { .. } => "success",
        Outcome::Refused { .. } => "refused",
        Outcome::Transient { error } if error.starts_with(TIMED_OUT) => "timeout",
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
    outcome
}

/// Appends `events` and returns the saga after them; after a conflict or a database failure,
/// the saga as the log has it. `None`: stop driving (fenced off, shutdown, or a log that cannot
/// be read). A failed attempt the core keeps out of the log is written to the read model
/// alone, at the same version, under the same fence: its count and the timer of the next
/// attempt are durable all the same.
async fn commit(
    engine: &Engine,
    saga: &Saga,
    events: Vec<Event>,
    tenure: &Tenure,
    stored: &AtomicU64,
) -> Option<Saga> {
    let replica_id = tenure.replica_id;
    let unlogged = saga.keeps_out_of_log(&events);
    let mut next = saga.clone();
    for event in &events {
        let applied = if unlogged {
            next.absorb(event)
        } else {
            next.apply(event)
        };
        if let Err(error) = applied {
            tracing::error!(saga_id = %saga.id, %error, "the core produced an event it cannot apply");
            engine.abandon(saga.id);
            return None;
        }
    }
    let write = SagaWrite {
        saga_id: saga.id,
        expected_version: saga.version,
        replica_id,
        fence: Fence::Owner,
        events: if unlogged { Vec::new() } else { events },
        projection: projection(&next),
    };
    let events_written = write.events.clone();
    match engine.inner.writer.write(write).await {
        Ok(WriteOutcome::Written) => {
            stored.fetch_max(next.version, Ordering::SeqCst);
            if next.status().is_terminal() {
                metrics::counter!(
                    "sagad_sagas_finished_total",
                    "saga_type" => next.saga_type.clone(),
                    "status" => next.status().as_str()
                )
                .increment(1);
                // A saga's id is a UUIDv7: it carries the millisecond the saga was started.
                if let Some(started) = next.id.get_timestamp() {
                    let (seconds, nanos) = started.to_unix();
                    let started = std::time::UNIX_EPOCH + Duration::new(seconds, nanos);
                    if let Ok(took) = std::time::SystemTime::now().duration_since(started) {
                        metrics::histogram!(
                            "sagad_saga_duration_seconds",
                            "saga_type" => next.saga_type.clone(),
                            "status" => next.status().as_str()
                        )
                        .record(took.as_secs_f64());
                    }
                }
            }
            for event in &events_written {
                log_event(event);
            }
            Some(next)
        }
        Ok(WriteOutcome::Conflict) => load_retrying(engine, saga.id, &tenure.lost).await,
        Ok(WriteOutcome::Fenced) => {
            tracing::info!(saga_id = %saga.id, %replica_id, "fenced off: another replica has the saga");
            metrics::counter!("sagad_writes_fenced_total").increment(1);
            None
        }
        // Everything the events carry was checked on its way in; should the database still
        // refuse them, retrying cannot help. The saga is left as it is, and said so.
        Err(error @ StoreError::Rejected(_)) => {
            tracing::error!(saga_id = %saga.id, %error, "the database refused the saga's events; it is no longer driven");
            engine.abandon(saga.id);
            None
        }
        Err(error) => {
            tracing::warn!(saga_id = %saga.id, %error, "cannot record the outcome; will retry");
            tokio::select! {
                () = tokio::time::sleep(STORE_RETRY_DELAY) => {}
                () = engine.inner.shutdown.cancelled() => return None,
                () = tenure.lost.cancelled() => return None,
            }
            load_retrying(engine, saga.id, &tenure.lost).await
        }
    }
}

/// One line for what an operator wants to hear of (refusals, giving up, compensations, the
/// end of a saga that did not complete); the saga's span names it. Successes are debug.
fn log_event(event: &Event) {
    match event {
        Event::StepRefused {
            step, code, reason, ..
        } => tracing::info!(step, code, reason, "step refused: compensating"),
        Event::StepAttemptFailed {
            step,
            attempt,
            error,
            retry_at: None,
            ..
        } => tracing::warn!(step, attempt, error, "step failed for good: compensating"),
        Event::StepOutputRejected { step, error, .. } => {
            tracing::warn!(step, error, "step output rejected: compensating")
        }
        Event::StepAttemptInterrupted { step, attempt, .. } => {
            tracing::info!(
                step,
                attempt,
                "attempt interrupted by a cancel; compensating it"
            )
        }
        Event::CompensationSucceeded { step, .. } => tracing::info!(step, "step compensated"),
        Event::CompensationRefused {
            step, code, reason, ..
        } => tracing::warn!(step, code, reason, "compensation refused"),
        Event::CompensationAttemptFailed {
            step,
            error,
            retry_at: None,
            ..
        } => tracing::warn!(step, error, "compensation failed for good"),
        Event::SagaCompensated => tracing::info!("saga compensated"),
        Event::SagaFailed { reason } => {
            tracing::error!(reason, "saga FAILED: an operator must act (RetrySaga)")
        }
        other => tracing::debug!(event = other.type_name(), "recorded"),
    }
}

/// The saga as its log has it now, retrying while the database fails. `None`: stop driving
/// (shutdown, the tenure lost, or a log that cannot be read).
pub(super) async fn load_retrying(
    engine: &Engine,
    saga_id: Uuid,
    lost: &CancellationToken,
) -> Option<Saga> {
    loop {
        match engine.load(saga_id).await {
            Ok(fresh) => return Some(fresh),
            Err(super::EngineError::Store(error))
                if !matches!(error, StoreError::CorruptLog { .. }) =>
            {
                tracing::warn!(%saga_id, %error, "cannot read the saga log; will retry");
                tokio::select! {
                    () = tokio::time::sleep(STORE_RETRY_DELAY) => {}
                    () = engine.inner.shutdown.cancelled() => return None,
                    () = lost.cancelled() => return None,
                }
            }
            Err(error) => {
                tracing::error!(%saga_id, %error, "cannot resume saga; it is no longer driven");
                engine.abandon(saga_id);
                return None;
            }
        }
    }
}
