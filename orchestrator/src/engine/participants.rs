//! Calls to participant services: one lazily connected channel per participant, a concurrency
//! limit per participant, the step's timeout, and the contract's classification of outcomes.
//! A call that cannot even be sent is refused here with the reason, not retried for ever; an
//! output sagad cannot keep is rejected here, as it arrives.

use std::collections::BTreeMap;
use std::error::Error as _;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prost::Message as _;
use sagad_proto::participant::v1::participant_client::ParticipantClient;
use sagad_proto::participant::v1::{StepCommand, step_reply};
use serde_json::Value;
use tokio::sync::Semaphore;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request};

use crate::document;
use crate::saga::Outcome;

/// The largest command sent: what gRPC servers accept by default.
const MAX_COMMAND_BYTES: usize = 4 * 1024 * 1024;
/// The largest step output kept, as JSON.
const MAX_OUTPUT_BYTES: usize = 256 * 1024;
/// The largest reply read; a larger one is rejected without being read whole.
const MAX_REPLY_BYTES: usize = 64 * 1024 * 1024;
/// How the error of a call that ran out of time begins.
pub(super) const TIMED_OUT: &str = "timed out after";
/// The code of a refusal made by sagad itself, for a call it could not send.
const NOT_SENT: &str = "NOT_SENT";
/// How the error of a call whose connection broke before the participant answered begins.
const CONNECTION_LOST: &str = "the connection to the participant broke mid-call";

/// A participant named in the definitions without a usable address.
#[derive(Debug, thiserror::Error)]
#[error("--participant {name}={uri}: {message}")]
pub struct BadParticipantAddress {
    pub name: String,
    pub uri: String,
    pub message: String,
}

struct Participant {
    uri: String,
    /// Replaced when the TLS files are read again: calls in flight keep the client they took.
    client: RwLock<ParticipantClient<Channel>>,
    permits: Arc<Semaphore>,
}

impl Participant {
    fn client(&self) -> ParticipantClient<Channel> {
        match self.client.read() {
            Ok(client) => client.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// A lazily connected client of `uri`, over `tls` for `https://`.
fn client_of(uri: &str, tls: &ClientTlsConfig) -> Result<ParticipantClient<Channel>, String> {
    let endpoint = Endpoint::from_shared(uri.to_owned())
        .map_err(|error| error.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    let endpoint = if uri.starts_with("https://") {
        endpoint
            .tls_config(tls.clone())
            .map_err(|error| error.to_string())?
    } else {
        endpoint
    };
    Ok(ParticipantClient::new(endpoint.connect_lazy()).max_decoding_message_size(MAX_REPLY_BYTES))
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
    /// The W3C trace context of the attempt, sent as `traceparent`.
    pub traceparent: Option<String>,
}

impl Participants {
    /// Channels connect on first use, so a participant that is down at start only delays its
    /// steps.
    /// `tls` is used for the `https://` addresses.
    pub fn new(
        addresses: &BTreeMap<String, String>,
        concurrency_per_participant: usize,
        tls: &ClientTlsConfig,
    ) -> Result<Self, BadParticipantAddress> {
        let mut by_name = BTreeMap::new();
        for (name, uri) in addresses {
            let client = client_of(uri, tls).map_err(|message| BadParticipantAddress {
                name: name.clone(),
                uri: uri.clone(),
                message,
            })?;
            by_name.insert(
                name.clone(),
                Participant {
                    uri: uri.clone(),
                    client: RwLock::new(client),
                    permits: Arc::new(Semaphore::new(concurrency_per_participant.max(1))),
                },
            );
        }
        Ok(Self {
            by_name: Arc::new(by_name),
        })
    }

    /// The `https://` participants' next connections use `tls` (a CA or client certificate
    /// read again); calls in flight go on over the connections they have. Returns how many
    /// participants it concerns.
    pub fn use_tls(&self, tls: &ClientTlsConfig) -> Result<usize, BadParticipantAddress> {
        let mut changed = 0;
        for (name, participant) in self.by_name.iter() {
            if !participant.uri.starts_with("https://") {
                continue;
            }
            let fresh =
                client_of(&participant.uri, tls).map_err(|message| BadParticipantAddress {
                    name: name.clone(),
                    uri: participant.uri.clone(),
                    message,
                })?;
            match participant.client.write() {
                Ok(mut client) => *client = fresh,
                Err(poisoned) => *poisoned.into_inner() = fresh,
            }
            changed += 1;
        }
        Ok(changed)
    }

    /// Makes one call and classifies what came back: an unreachable participant or a timeout
    /// is a transient outcome, a call that cannot be sent a refusal. `may_send` is asked once
    /// a call permit is held, right before sending (a wait for a permit can be long);
    /// `None`: it said no, and nothing was sent.
    pub async fn call(&self, call: Call, may_send: impl FnOnce() -> bool) -> Option<Outcome> {
        let Some(participant) = self.by_name.get(&call.participant) else {
            return Some(not_sent(format!(
                "participant {:?} has no address (give it with --participant)",
                call.participant
            )));
        };
        let size = call.command.encoded_len();
        if size > MAX_COMMAND_BYTES {
            return Some(not_sent(format!(
                "the command is {size} bytes, over the {MAX_COMMAND_BYTES} a participant accepts"
            )));
        }
        let Ok(_permit) = participant.permits.acquire().await else {
            return Some(Outcome::Transient {
                error: "participant limiter closed".to_owned(),
            });
        };
        if !may_send() {
            return None;
        }
        let saga_id = header_value(&call.command.saga_id);
        let correlation_id = header_value(&call.command.correlation_id);
        let mut request = Request::new(call.command);
        request.set_timeout(call.timeout);
        let metadata = request.metadata_mut();
        metadata.insert("x-saga-id", saga_id);
        metadata.insert("x-correlation-id", correlation_id);
        if let Some(traceparent) = &call.traceparent {
            metadata.insert(
                sagad_telemetry::trace::TRACEPARENT,
                header_value(traceparent),
            );
        }
        let mut client = participant.client();
        let started = tokio::time::Instant::now();
        let reply = if call.compensate {
            tokio::time::timeout(call.timeout, client.compensate(request)).await
        } else {
            tokio::time::timeout(call.timeout, client.execute(request)).await
        };
        Some(match reply {
            Err(_) => timed_out(call.timeout),
            Ok(Err(status)) => {
                classify_status(&status, started.elapsed() >= call.timeout, call.timeout)
            }
            Ok(Ok(reply)) => match reply.into_inner().result {
                // A compensation's output is not kept.
                Some(step_reply::Result::Success(_)) if call.compensate => Outcome::Success {
                    output: Value::Object(Default::default()),
                },
                Some(step_reply::Result::Success(success)) => match success.output {
                    None => Outcome::Success {
                        output: Value::Object(Default::default()),
                    },
                    Some(output) => accept_output(&output),
                },
                Some(step_reply::Result::Failure(failure)) => Outcome::Refused {
                    code: storable(&failure.code),
                    reason: storable(&failure.reason),
                },
                None => Outcome::Transient {
                    error: "the participant replied with neither success nor failure".to_owned(),
                },
            },
        })
    }
}

/// A step's output, if sagad can keep it: checked as a saga's input is.
fn accept_output(output: &pbjson_types::Struct) -> Outcome {
    let checked = document::from_struct(output, "output").and_then(|output| {
        document::check_size(&output, MAX_OUTPUT_BYTES, "output")?;
        Ok(output)
    });
    match checked {
        Ok(output) => Outcome::Success { output },
        Err(error) => Outcome::OutputRejected {
            error: error.to_string(),
        },
    }
}

fn not_sent(reason: String) -> Outcome {
    Outcome::Refused {
        code: NOT_SENT.to_owned(),
        reason,
    }
}

/// A metadata value that is always valid: visible ASCII stays as it is, any other byte is
/// percent-encoded (`%XX`), as is `%` itself.
fn header_value(text: &str) -> MetadataValue<tonic::metadata::Ascii> {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    MetadataValue::try_from(encoded.as_str()).unwrap_or_else(|_| MetadataValue::from_static(""))
}

/// What a gRPC error means for the step. The contract: a participant's status of these codes
/// means the call may be retried, any other a refusal. `out_of_time`: the step's timeout had
/// passed when the error came.
fn classify_status(status: &tonic::Status, out_of_time: bool, timeout: Duration) -> Outcome {
    // The channel enforces the deadline it sent as `grpc-timeout` and reports it as
    // CANCELLED: that is our timeout, not the participant's refusal.
    if status.code() == Code::Cancelled && out_of_time {
        return timed_out(timeout);
    }
    // A CANCELLED the client made of a broken connection (it carries the transport error; a
    // participant's own status never does): the participant crashed or restarted mid-call
    // and may have taken the step, so the call is retried under its key.
    if status.code() == Code::Cancelled && status.source().is_some() {
        return Outcome::Transient {
            error: format!("{CONNECTION_LOST} ({})", error_chain(status)),
        };
    }
    // Our own decoder's limit: the participant answered, with more than sagad reads.
    if status.code() == Code::OutOfRange
        && status
            .message()
            .starts_with("Error, decoded message length too large")
    {
        return Outcome::OutputRejected {
            error: format!("the reply is over {MAX_REPLY_BYTES} bytes"),
        };
    }
    let transient = matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Internal
            | Code::Unknown
    );
    let message = format!("{:?}: {}", status.code(), storable(status.message()));
    if transient {
        Outcome::Transient { error: message }
    } else {
        Outcome::Refused {
            code: format!("GRPC_{:?}", status.code()).to_uppercase(),
            reason: storable(status.message()),
        }
    }
}

/// The outcome of a call that ran out of time.
fn timed_out(timeout: Duration) -> Outcome {
    Outcome::Transient {
        error: format!("{TIMED_OUT} {}", humantime::format_duration(timeout)),
    }
}

/// A status the client made, with the transport errors under it, outermost first: `operation
/// was canceled: connection closed`.
fn error_chain(status: &tonic::Status) -> String {
    let mut text = status.message().to_owned();
    let mut source = status.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !cause.is::<tonic::Status>() && !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    storable(&text)
}

/// A participant's text as the log can keep it: without NUL characters (Postgres refuses
/// them) and at most 1024 characters.
fn storable(text: &str) -> String {
    document::shorten(&text.replace('\0', "\\0"), 1024)
}

#[cfg(test)]
mod tests {
    use std::fmt;

    use super::*;

    /// A transport error the way the gRPC client wraps one: the status it stands for sits in
    /// its source chain.
    #[derive(Debug)]
    struct TransportError(tonic::Status);

    impl fmt::Display for TransportError {
        fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            formatter.write_str("connection closed")
        }
    }

    impl std::error::Error for TransportError {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[test]
    fn a_cancelled_the_participant_sent_is_a_refusal() {
        let sent = tonic::Status::cancelled("the handler gave up");
        assert_eq!(
            classify_status(&sent, false, TIMEOUT),
            Outcome::Refused {
                code: "GRPC_CANCELLED".to_owned(),
                reason: "the handler gave up".to_owned(),
            }
        );
    }

    #[test]
    fn a_cancelled_made_of_a_broken_connection_is_transient() {
        let broken = tonic::Status::from_error(Box::new(TransportError(tonic::Status::cancelled(
            "operation was canceled",
        ))));
        assert_eq!(broken.code(), Code::Cancelled);
        assert_eq!(
            classify_status(&broken, false, TIMEOUT),
            Outcome::Transient {
                error: format!("{CONNECTION_LOST} (operation was canceled: connection closed)"),
            }
        );
    }

    #[test]
    fn a_cancelled_after_the_timeout_is_the_timeout() {
        let late = tonic::Status::cancelled("Timeout expired");
        assert_eq!(
            classify_status(&late, true, TIMEOUT),
            Outcome::Transient {
                error: format!("{TIMED_OUT} 5s"),
            }
        );
    }
}
