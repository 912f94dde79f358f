//! A participant server for tests: it records every call it receives and answers as a script
//! says (success with an output, a refusal, a gRPC error, a delay, no answer at all, or a
//! broken connection). Calls reach it through a TCP relay of its own, so that a script can
//! break the connection under a call in flight, as a participant that crashes does.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use sagad_proto::participant::v1::participant_server::{Participant, ParticipantServer};
use sagad_proto::participant::v1::{StepCommand, StepFailure, StepReply, StepSuccess, step_reply};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallKind {
    Execute,
    Compensate,
}

/// One call as the participant received it.
#[derive(Debug, Clone)]
pub struct CallRecord {
    pub participant: String,
    pub kind: CallKind,
    pub saga_id: String,
    pub saga_type: String,
    pub step: String,
    pub action: String,
    pub idempotency_key: String,
    pub attempt: u32,
    /// The saga context: `{"input": …, "steps": {…}}`.
    pub input: Value,
    pub correlation_id: String,
    pub metadata_saga_id: Option<String>,
    pub metadata_correlation_id: Option<String>,
    pub received_at: Instant,
}

/// What the participant answers.
#[derive(Debug, Clone)]
pub enum Reply {
    Success(Value),
    Refuse {
        code: String,
        reason: String,
    },
    Status(tonic::Code),
    /// Never answers: the orchestrator's step timeout must fire.
    Hang,
    /// Breaks every open connection to the participant without an answer, as a crash does.
    BreakConnection,
}

/// An answer, given after `delay`.
#[derive(Debug, Clone)]
pub struct Answer {
    pub delay: Duration,
    pub reply: Reply,
}

impl Answer {
    pub fn success(output: Value) -> Self {
        Self {
            delay: Duration::ZERO,
            reply: Reply::Success(output),
        }
    }

    pub fn refuse(code: &str) -> Self {
        Self {
            delay: Duration::ZERO,
            reply: Reply::Refuse {
                code: code.to_owned(),
                reason: format!("scripted {code}"),
            },
        }
    }

    pub fn status(code: tonic::Code) -> Self {
        Self {
            delay: Duration::ZERO,
            reply: Reply::Status(code),
        }
    }

    pub fn hang() -> Self {
        Self {
            delay: Duration::ZERO,
            reply: Reply::Hang,
        }
    }

    pub fn break_connection() -> Self {
        Self {
            delay: Duration::ZERO,
            reply: Reply::BreakConnection,
        }
    }

    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// Decides the answer to a call; it sees the call and every call received before it.
pub type Script = Arc<dyn Fn(&CallRecord, &[CallRecord]) -> Answer + Send + Sync>;

/// Every call succeeds, with `{"<step>_id": "<step>-<saga_id>"}` as output.
pub fn default_answer(call: &CallRecord) -> Answer {
    match call.kind {
        CallKind::Execute => Answer::success(
            json!({ format!("{}_id", call.step): format!("{}-{}", call.step, call.saga_id) }),
        ),
        CallKind::Compensate => Answer::success(json!({})),
    }
}

struct Shared {
    name: String,
    calls: Mutex<Vec<CallRecord>>,
    script: RwLock<Script>,
    /// Bumped to break every connection the relay holds.
    breaks: watch::Sender<u64>,
}

/// A running scripted participant.
pub struct FakeParticipant {
    shared: Arc<Shared>,
    pub addr: SocketAddr,
    /// Set to stop the server and the relay.
    stop: watch::Sender<bool>,
}

impl FakeParticipant {
    /// Starts on a free port with the default script.
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        Self::start_on(
            name,
            "127.0.0.1:0".parse()?,
            Arc::new(|call: &CallRecord, _: &[CallRecord]| default_answer(call)),
        )
        .await
    }

    /// Starts on a free port with a script.
    pub async fn start_scripted(name: &str, script: Script) -> anyhow::Result<Self> {
        Self::start_on(name, "127.0.0.1:0".parse()?, script).await
    }

    /// Starts on a given address (to come back on the same port after a stop).
    pub async fn start_on(name: &str, addr: SocketAddr, script: Script) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let server_listener = TcpListener::bind("127.0.0.1:0").await?;
        let server_addr = server_listener.local_addr()?;
        let (breaks, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            calls: Mutex::new(Vec::new()),
            script: RwLock::new(script),
            breaks,
        });
        let (stop, mut stopped) = watch::channel(false);
        let service = ParticipantServer::new(Service {
            shared: shared.clone(),
        });
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(server_listener), async move {
                    let _ = stopped.wait_for(|stopped| *stopped).await;
                })
                .await;
        });
        tokio::spawn(relay(
            listener,
            server_addr,
            stop.subscribe(),
            shared.breaks.clone(),
        ));
        Ok(Self { shared, addr, stop })
    }

    /// The URI sagad's `--participant NAME=URI` takes.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `NAME=URI` for sagad's `--participant`.
    pub fn flag(&self) -> String {
        format!("{}={}", self.shared.name, self.uri())
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn set_script(&self, script: Script) {
        if let Ok(mut current) = self.shared.script.write() {
            *current = script;
        }
    }

    /// Every call received so far, in arrival order.
    pub fn calls(&self) -> Vec<CallRecord> {
        self.shared
            .calls
            .lock()
            .map(|calls| calls.clone())
            .unwrap_or_default()
    }

    /// The calls received for one saga, in arrival order.
    pub fn calls_for(&self, saga_id: &str) -> Vec<CallRecord> {
        self.calls()
            .into_iter()
            .filter(|call| call.saga_id == saga_id)
            .collect()
    }

    /// Stops serving (connections are refused afterwards); the record of calls stays.
    pub fn stop(&mut self) {
        self.stop.send_replace(true);
    }
}

impl Drop for FakeParticipant {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Accepts connections until stopped and relays each to the server; a break drops them all.
async fn relay(
    listener: TcpListener,
    server_addr: SocketAddr,
    mut stop: watch::Receiver<bool>,
    breaks: watch::Sender<u64>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stopped| *stopped) => return,
        };
        let Ok((mut client, _)) = accepted else {
            continue;
        };
        let mut broken = breaks.subscribe();
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(server_addr).await else {
                return;
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = broken.changed() => {}
            }
        });
    }
}

struct Service {
    shared: Arc<Shared>,
}

impl Service {
    async fn handle(
        &self,
        kind: CallKind,
        request: Request<StepCommand>,
    ) -> Result<Response<StepReply>, Status> {
        let metadata = |key: &str| {
            request
                .metadata()
                .get(key)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        let metadata_saga_id = metadata("x-saga-id");
        let metadata_correlation_id = metadata("x-correlation-id");
        let command = request.into_inner();
        let call = CallRecord {
            participant: self.shared.name.clone(),
            kind,
            saga_id: command.saga_id,
            saga_type: command.saga_type,
            step: command.step,
            action: command.action,
            idempotency_key: command.idempotency_key,
            attempt: command.attempt,
            input: command
                .input
                .and_then(|input| serde_json::to_value(input).ok())
                .unwrap_or(Value::Null),
            correlation_id: command.correlation_id,
            metadata_saga_id,
            metadata_correlation_id,
            received_at: Instant::now(),
        };
        let answer = {
            let script = self.shared.script.read().map(|script| script.clone());
            let calls = self
                .shared
                .calls
                .lock()
                .map(|calls| calls.clone())
                .unwrap_or_default();
            match script {
                Ok(script) => script(&call, &calls),
                Err(_) => default_answer(&call),
            }
        };
        if let Ok(mut calls) = self.shared.calls.lock() {
            calls.push(call);
        }
        tokio::time::sleep(answer.delay).await;
        let result = match answer.reply {
            Reply::Success(output) => step_reply::Result::Success(StepSuccess {
                output: serde_json::from_value(output).ok(),
            }),
            Reply::Refuse { code, reason } => {
                step_reply::Result::Failure(StepFailure { code, reason })
            }
            Reply::Status(code) => return Err(Status::new(code, "scripted error")),
            Reply::Hang => {
                std::future::pending::<()>().await;
                return Err(Status::internal("unreachable"));
            }
            Reply::BreakConnection => {
                self.shared.breaks.send_modify(|breaks| *breaks += 1);
                std::future::pending::<()>().await;
                return Err(Status::internal("unreachable"));
            }
        };
        Ok(Response::new(StepReply {
            result: Some(result),
        }))
    }
}

#[tonic::async_trait]
impl Participant for Service {
    async fn execute(&self, request: Request<StepCommand>) -> Result<Response<StepReply>, Status> {
        self.handle(CallKind::Execute, request).await
    }

    async fn compensate(
        &self,
        request: Request<StepCommand>,
    ) -> Result<Response<StepReply>, Status> {
        self.handle(CallKind::Compensate, request).await
    }
}

/// The calls as short lines, `X <step> #<attempt>` for an execute and `C …` for a
/// compensate, in the order they came: what a test compares with the order it expects.
pub fn call_trace(calls: &[CallRecord]) -> Vec<String> {
    calls
        .iter()
        .map(|call| {
            let kind = match call.kind {
                CallKind::Execute => "X",
                CallKind::Compensate => "C",
            };
            format!("{kind} {} #{}", call.step, call.attempt)
        })
        .collect()
}
