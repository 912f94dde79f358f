//! Calls to participant services: one lazily connected channel per participant, a concurrency
//! limit per participant, the step's timeout, and the contract's classification of outcomes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sagad_proto::participant::v1::participant_client::ParticipantClient;
use sagad_proto::participant::v1::{StepCommand, step_reply};
use serde_json::Value;
use tokio::sync::Semaphore;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

use crate::saga::Outcome;

/// A participant named in the definitions without a usable address.
#[derive(Debug, thiserror::Error)]
#[error("--participant {name}={uri}: {message}")]
pub struct BadParticipantAddress {
    pub name: String,
    pub uri: String,
    pub message: String,
}

struct Participant {
    client: ParticipantClient<Channel>,
    permits: Arc<Semaphore>,
}

/// Every participant this instance may call, by name.
#[derive(Clone)]
pub struct Participants {
    by_name: Arc<BTreeMap<String, Participant>>,
}

/// One participant call, as the engine prepared it.
#[derive(Debug, Clone)]
pub struct Call {
    pub participant: String,
    pub compensate: bool,
    pub command: StepCommand,
    pub timeout: Duration,
}

impl Participants {
    /// Channels connect on first use, so a participant that is down at start only delays its
    /// steps.
    pub fn new(
        addresses: &BTreeMap<String, String>,
        concurrency_per_participant: usize,
    ) -> Result<Self, BadParticipantAddress> {
        let mut by_name = BTreeMap::new();
        for (name, uri) in addresses {
            let bad = |message: String| BadParticipantAddress {
                name: name.clone(),
                uri: uri.clone(),
                message,
            };
            let endpoint = Endpoint::from_shared(uri.clone())
                .map_err(|error| bad(error.to_string()))?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true);
            by_name.insert(
                name.clone(),
                Participant {
                    client: ParticipantClient::new(endpoint.connect_lazy()),
                    permits: Arc::new(Semaphore::new(concurrency_per_participant.max(1))),
                },
            );
        }
        Ok(Self {
            by_name: Arc::new(by_name),
        })
    }

    /// Makes one call and classifies what came back. Never fails: an unreachable participant or
    /// a timeout is a transient outcome.
    pub async fn call(&self, call: Call) -> Outcome {
        let Some(participant) = self.by_name.get(&call.participant) else {
            return Outcome::Transient {
                error: format!("participant {:?} has no address", call.participant),
            };
        };
        let Ok(_permit) = participant.permits.acquire().await else {
            return Outcome::Transient {
                error: "participant limiter closed".to_owned(),
            };
        };
        let mut request = Request::new(call.command.clone());
        request.set_timeout(call.timeout);
        let metadata = request.metadata_mut();
        if let Ok(value) = call.command.saga_id.parse() {
            metadata.insert("x-saga-id", value);
        }
        if let Ok(value) = call.command.correlation_id.parse() {
            metadata.insert("x-correlation-id", value);
        }
        let mut client = participant.client.clone();
        let started = tokio::time::Instant::now();
        let reply = if call.compensate {
            tokio::time::timeout(call.timeout, client.compensate(request)).await
        } else {
            tokio::time::timeout(call.timeout, client.execute(request)).await
        };
        match reply {
            Err(_) => Outcome::Transient {
                error: format!(
                    "timed out after {}",
                    humantime::format_duration(call.timeout)
                ),
            },
            // The channel enforces the deadline it sent as `grpc-timeout` and reports it as
            // CANCELLED: that is our timeout, not the participant's refusal.
            Ok(Err(status))
                if status.code() == Code::Cancelled && started.elapsed() >= call.timeout =>
            {
                Outcome::Transient {
                    error: format!(
                        "timed out after {}",
                        humantime::format_duration(call.timeout)
                    ),
                }
            }
            Ok(Err(status)) => classify_status(&status),
            Ok(Ok(reply)) => match reply.into_inner().result {
                Some(step_reply::Result::Success(success)) => Outcome::Success {
                    output: success
                        .output
                        .and_then(|output| serde_json::to_value(output).ok())
                        .unwrap_or_else(|| Value::Object(Default::default())),
                },
                Some(step_reply::Result::Failure(failure)) => Outcome::Refused {
                    code: failure.code,
                    reason: failure.reason,
                },
                None => Outcome::Transient {
                    error: "the participant replied with neither success nor failure".to_owned(),
                },
            },
        }
    }
}

/// The contract: these codes mean the call may be retried; any other is a refusal.
fn classify_status(status: &tonic::Status) -> Outcome {
    let transient = matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Internal
            | Code::Unknown
    );
    let message = format!("{:?}: {}", status.code(), status.message());
    if transient {
        Outcome::Transient { error: message }
    } else {
        Outcome::Refused {
            code: format!("GRPC_{:?}", status.code()).to_uppercase(),
            reason: status.message().to_owned(),
        }
    }
}
