//! The gRPC edge: parses requests, calls the engine, converts records to the wire types, and
//! maps errors to the contract's status codes. The only module that knows the proto types of
//! the client API.

use std::pin::Pin;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::Stream;
use prost::Message as _;
use sagad_proto::v1 as pb;
use sagad_proto::v1::saga_orchestrator_server::SagaOrchestrator;
use serde_json::Value;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::auth::{Authenticator, Role};
use crate::document::{self, shorten};
use crate::engine::{Engine, EngineError, MAX_REASON_BYTES, StartRequest};
use crate::limits::Limits;
use crate::saga::{CannotRetry, Context, SagaStatus, StepStatus};
use crate::store::{EventRecord, ListCursor, ListFilter, SagaRecord, StoreError};
use sagad_telemetry::trace;

/// The largest page a listing returns.
pub const MAX_PAGE_SIZE: u32 = 1000;
const DEFAULT_PAGE_SIZE: u32 = 50;
/// The most bytes of sagas one `ListSagas` page holds: gRPC clients read at most 4 MiB a
/// message by default.
const MAX_PAGE_BYTES: usize = 3 * 1024 * 1024;
/// The most events one `GetSaga` answer holds.
pub const MAX_HISTORY_PAGE_SIZE: u32 = 10_000;
/// The events of a history page unless asked otherwise: a saga retried for days keeps its
/// answers small.
pub const DEFAULT_HISTORY_PAGE_SIZE: u32 = 1000;
/// The longest `GetSaga.wait_ms` honoured.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// Longest `correlation_id`: it travels in every participant call's metadata, where a few KB
/// already exceed what servers accept.
pub const MAX_CORRELATION_ID_BYTES: usize = 256;
/// Longest `idempotency_key`.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 512;
/// Longest `saga_type`, also as a `ListSagas` filter; no definition name comes near it.
const MAX_SAGA_TYPE_BYTES: usize = 256;

/// The `sagad.v1.SagaOrchestrator` service.
pub struct Api {
    engine: Engine,
    auth: Authenticator,
    limits: Limits,
}

/// Who a request comes from.
struct Caller {
    /// For the history of what it changes: the token's name with tokens on, else the client's
    /// address.
    who: String,
    /// Whose share of the limits it takes: the token's name, else the client's IP address.
    limited_as: String,
}

impl Api {
    pub fn new(engine: Engine, auth: Authenticator, limits: Limits) -> Self {
        Self {
            engine,
            auth,
            limits,
        }
    }

    /// The request's right to `needed`, and who it comes from: the token's owner as
    /// [`authenticate`] found it before the message was decoded, else (a service built without
    /// it) as the metadata says.
    fn authorize<T>(&self, request: &Request<T>, needed: Role) -> Result<Caller, Status> {
        let token_owner = match request.extensions().get::<crate::auth::Caller>() {
            Some(caller) => {
                crate::auth::permit(caller, needed)?;
                Some(caller.clone())
            }
            None => self.auth.authorize(request.metadata(), needed)?,
        };
        Ok(match token_owner {
            Some(caller) => Caller {
                limited_as: caller.name.clone(),
                who: caller.name,
            },
            None => Caller {
                who: who_asks(request),
                limited_as: request
                    .remote_addr()
                    .map(|address| address.ip().to_string())
                    .unwrap_or_else(|| "a client".to_owned()),
            },
        })
    }
}

impl From<EngineError> for Status {
    fn from(error: EngineError) -> Self {
        let message = error.to_string();
        match error {
            EngineError::UnknownSagaType(_) | EngineError::InvalidInput(_) => {
                Status::invalid_argument(message)
            }
            EngineError::IdempotencyKeyReused { .. } => Status::already_exists(message),
            EngineError::NotFound(_) => Status::not_found(message),
            EngineError::NotCancellable(_)
            | EngineError::NotRetryable(CannotRetry::NotFailed(_)) => {
                Status::failed_precondition(message)
            }
            EngineError::NotRetryable(_) => Status::invalid_argument(message),
            EngineError::VersionNotReached { .. } => Status::deadline_exceeded(message),
            EngineError::Contended(_) => Status::aborted(message),
            // Data the edge let through yet the database refused is still the request's.
            EngineError::Store(StoreError::Rejected(_)) => Status::invalid_argument(message),
            // A log this release cannot read: retrying will not help, an operator must look.
            EngineError::Store(StoreError::CorruptLog { .. }) | EngineError::CorruptLog { .. } => {
                Status::data_loss(message)
            }
            EngineError::Store(_) | EngineError::ShuttingDown => Status::unavailable(message),
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::SagaEvent, Status>> + Send>>;

#[tonic::async_trait]
impl SagaOrchestrator for Api {
    async fn start_saga(
        &self,
        request: Request<pb::StartSagaRequest>,
    ) -> Result<Response<pb::StartSagaResponse>, Status> {
        let caller = self.authorize(&request, Role::Operator)?;
        self.limits
            .admit_start(&caller.limited_as, std::time::Instant::now())?;
        // The saga's trace continues the caller's, when it sent one (an invalid one is
        // ignored, as W3C says); else it is a trace of its own.
        let caller_trace = trace::from_metadata(request.metadata());
        let span = tracing::info_span!("StartSaga", otel.kind = "server");
        if let Some(caller) = &caller_trace {
            trace::continue_trace(&span, caller);
        }
        let trace_parent =
            trace::traceparent_of(&span, caller_trace.as_deref()).unwrap_or_else(trace::new_trace);
        let request = request.into_inner();
        if request.saga_type.is_empty() {
            return Err(Status::invalid_argument("saga_type is required"));
        }
        check_text("saga_type", &request.saga_type, MAX_SAGA_TYPE_BYTES)?;
        check_text(
            "idempotency_key",
            &request.idempotency_key,
            MAX_IDEMPOTENCY_KEY_BYTES,
        )?;
        check_text(
            "correlation_id",
            &request.correlation_id,
            MAX_CORRELATION_ID_BYTES,
        )?;
        let input = match request.input {
            Some(input) => document::from_struct(&input, "input")
                .map_err(|error| Status::invalid_argument(error.to_string()))?,
            None => Value::Object(Default::default()),
        };
        let started = self
            .engine
            .start_saga(StartRequest {
                saga_type: request.saga_type,
                idempotency_key: request.idempotency_key,
                input,
                correlation_id: request.correlation_id,
                trace_parent: Some(trace_parent),
            })
            .instrument(span)
            .await?;
        Ok(Response::new(pb::StartSagaResponse {
            saga_id: started.record.saga_id.to_string(),
            created: started.created,
            saga: Some(self.saga_message(&started.record)),
        }))
    }

    async fn get_saga(
        &self,
        request: Request<pb::GetSagaRequest>,
    ) -> Result<Response<pb::Saga>, Status> {
        self.authorize(&request, Role::Reader)?;
        let request = request.into_inner();
        let saga_id = parse_saga_id(&request.saga_id)?;
        let basic = match pb::SagaView::try_from(request.view) {
            Ok(pb::SagaView::Basic) => true,
            Ok(pb::SagaView::Full | pb::SagaView::Unspecified) => false,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "view: {} is not a saga view",
                    request.view
                )));
            }
        };
        let page_size = page_size(
            "history_page_size",
            request.history_page_size,
            DEFAULT_HISTORY_PAGE_SIZE,
            MAX_HISTORY_PAGE_SIZE,
        )?;
        let after = parse_history_token(&request.history_page_token)?;
        let wait = Duration::from_millis(u64::from(request.wait_ms)).min(MAX_WAIT);
        let record = self
            .engine
            .get_saga(saga_id, request.min_version, wait)
            .await?;
        if basic {
            return Ok(Response::new(self.saga_message(&record)));
        }
        Ok(Response::new(
            self.with_history(&record, after, page_size).await?,
        ))
    }

    async fn list_sagas(
        &self,
        request: Request<pb::ListSagasRequest>,
    ) -> Result<Response<pb::ListSagasResponse>, Status> {
        self.authorize(&request, Role::Reader)?;
        let request = request.into_inner();
        check_text("saga_type", &request.saga_type, MAX_SAGA_TYPE_BYTES)?;
        let page_size = page_size(
            "page_size",
            request.page_size,
            DEFAULT_PAGE_SIZE,
            MAX_PAGE_SIZE,
        )?;
        let statuses = request
            .statuses
            .iter()
            .map(|&status| saga_status_from_wire(status))
            .collect::<Result<Vec<_>, _>>()?;
        let after = if request.page_token.is_empty() {
            None
        } else {
            Some(parse_page_token(&request.page_token)?)
        };
        let filter = ListFilter {
            saga_type: Some(request.saga_type).filter(|saga_type| !saga_type.is_empty()),
            statuses,
            failing_before: request.stuck.then(|| self.engine.stuck_cutoff()),
            // One more than asked tells whether another page follows.
            limit: page_size + 1,
            after,
            find: None,
        };
        let records = self.engine.list_sagas(&filter).await?;
        // A page ends early rather than grow past what a client reads by default.
        let mut sagas = Vec::new();
        let mut bytes = 0;
        let mut last = None;
        for record in records.iter().take(page_size as usize) {
            let saga = self.saga_message(record);
            bytes += saga.encoded_len();
            if bytes > MAX_PAGE_BYTES && !sagas.is_empty() {
                break;
            }
            sagas.push(saga);
            last = Some(record);
        }
        let next_page_token = match last {
            Some(last) if sagas.len() < records.len() => ListCursor::after(last).token(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListSagasResponse {
            sagas,
            next_page_token,
        }))
    }

    type WatchSagaStream = EventStream;

    async fn watch_saga(
        &self,
        request: Request<pb::WatchSagaRequest>,
    ) -> Result<Response<Self::WatchSagaStream>, Status> {
        let caller = self.authorize(&request, Role::Reader)?;
        let permit = self.limits.open_watch(&caller.limited_as)?;
        let saga_id = parse_saga_id(&request.into_inner().saga_id)?;
        let events = self.engine.watch(saga_id).await?;
        // The permit lives as long as the stream: its end, or the client's going, frees it.
        let stream = futures::stream::unfold((events, permit), |(mut events, permit)| async move {
            let event = events.recv().await?;
            Some((
                event.map(event_message).map_err(Status::from),
                (events, permit),
            ))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_saga(
        &self,
        request: Request<pb::CancelSagaRequest>,
    ) -> Result<Response<pb::Saga>, Status> {
        let requested_by = self.authorize(&request, Role::Operator)?.who;
        let request = request.into_inner();
        let saga_id = parse_saga_id(&request.saga_id)?;
        check_text("reason", &request.reason, MAX_REASON_BYTES)?;
        let reason = if request.reason.is_empty() {
            "cancelled by request".to_owned()
        } else {
            request.reason
        };
        let record = self
            .engine
            .cancel_saga(saga_id, &reason, &requested_by)
            .await?;
        Ok(Response::new(
            self.with_history(&record, 0, DEFAULT_HISTORY_PAGE_SIZE)
                .await?,
        ))
    }

    async fn retry_saga(
        &self,
        request: Request<pb::RetrySagaRequest>,
    ) -> Result<Response<pb::Saga>, Status> {
        let requested_by = self.authorize(&request, Role::Admin)?.who;
        let request = request.into_inner();
        let saga_id = parse_saga_id(&request.saga_id)?;
        check_text("reason", &request.reason, MAX_REASON_BYTES)?;
        for step in &request.skip_steps {
            check_text("skip_steps", step, MAX_SAGA_TYPE_BYTES)?;
        }
        let reason = if request.reason.is_empty() {
            "retried by request".to_owned()
        } else {
            request.reason
        };
        let record = self
            .engine
            .retry_saga(saga_id, &reason, &requested_by, &request.skip_steps)
            .await?;
        Ok(Response::new(
            self.with_history(&record, 0, DEFAULT_HISTORY_PAGE_SIZE)
                .await?,
        ))
    }
}

/// The service's first look at a request, before its message is decoded: a request with no
/// or an unknown token is refused here, so that it costs no decoding; the token's owner goes
/// on in the request's extensions.
pub fn authenticate(
    auth: Authenticator,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut request: Request<()>| {
        if let Some(caller) = auth.authenticate(request.metadata())? {
            request.extensions_mut().insert(caller);
        }
        Ok(request)
    }
}

/// Who made a request when tokens are off: the client's address.
fn who_asks<T>(request: &Request<T>) -> String {
    match request.remote_addr() {
        Some(address) => format!("client {address}"),
        None => "a client".to_owned(),
    }
}

/// A text field the store keeps or searches ([`document::check_text`]).
fn check_text(field: &str, value: &str, max: usize) -> Result<(), Status> {
    document::check_text(field, value, max).map_err(Status::invalid_argument)
}

fn parse_saga_id(text: &str) -> Result<Uuid, Status> {
    if text.is_empty() {
        return Err(Status::invalid_argument("saga_id is required"));
    }
    Uuid::parse_str(text).map_err(|_| {
        Status::invalid_argument(format!("saga_id {:?} is not a UUID", shorten(text, 64)))
    })
}

/// A page token this server made ([`ListCursor::token`]).
fn parse_page_token(token: &str) -> Result<ListCursor, Status> {
    ListCursor::from_token(token).ok_or_else(|| {
        Status::invalid_argument(format!(
            "page_token {:?} is not a token this server gave",
            shorten(token, 64)
        ))
    })
}

/// A requested page size: 0 asks for `default`; more than `max` is refused, naming `field`.
fn page_size(field: &str, requested: u32, default: u32, max: u32) -> Result<u32, Status> {
    match requested {
        0 => Ok(default),
        size if size > max => Err(Status::invalid_argument(format!(
            "{field} {size} is over the limit of {max}"
        ))),
        size => Ok(size),
    }
}

/// A token this server made: the seq of the last event of the page before. Empty: from the
/// first event.
fn parse_history_token(token: &str) -> Result<u64, Status> {
    if token.is_empty() {
        return Ok(0);
    }
    token
        .strip_prefix('h')
        .filter(|seq| seq.bytes().all(|byte| byte.is_ascii_digit()))
        .and_then(|seq| seq.parse().ok())
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "history_page_token {:?} is not a token this server gave",
                shorten(token, 64)
            ))
        })
}

fn timestamp(at: DateTime<Utc>) -> pbjson_types::Timestamp {
    pbjson_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or_default(),
    }
}

fn saga_status_to_wire(status: SagaStatus) -> pb::SagaStatus {
    match status {
        SagaStatus::Running => pb::SagaStatus::Running,
        SagaStatus::Compensating => pb::SagaStatus::Compensating,
        SagaStatus::Completed => pb::SagaStatus::Completed,
        SagaStatus::Compensated => pb::SagaStatus::Compensated,
        SagaStatus::Failed => pb::SagaStatus::Failed,
    }
}

fn saga_status_from_wire(status: i32) -> Result<SagaStatus, Status> {
    match pb::SagaStatus::try_from(status) {
        Ok(pb::SagaStatus::Running) => Ok(SagaStatus::Running),
        Ok(pb::SagaStatus::Compensating) => Ok(SagaStatus::Compensating),
        Ok(pb::SagaStatus::Completed) => Ok(SagaStatus::Completed),
        Ok(pb::SagaStatus::Compensated) => Ok(SagaStatus::Compensated),
        Ok(pb::SagaStatus::Failed) => Ok(SagaStatus::Failed),
        Ok(pb::SagaStatus::Unspecified) | Err(_) => Err(Status::invalid_argument(format!(
            "statuses: {status} is not a saga status"
        ))),
    }
}

fn step_status_to_wire(status: StepStatus) -> pb::StepStatus {
    match status {
        StepStatus::Pending => pb::StepStatus::Pending,
        StepStatus::Running => pb::StepStatus::Running,
        StepStatus::Succeeded => pb::StepStatus::Succeeded,
        StepStatus::Failed => pb::StepStatus::Failed,
        StepStatus::Compensating => pb::StepStatus::Compensating,
        StepStatus::Compensated => pb::StepStatus::Compensated,
        StepStatus::CompensationFailed => pb::StepStatus::CompensationFailed,
    }
}

fn event_message(event: EventRecord) -> pb::SagaEvent {
    let mut data = event.data;
    // The type is a field of its own on the wire.
    if let Value::Object(fields) = &mut data {
        fields.remove("type");
    }
    pb::SagaEvent {
        seq: event.seq,
        r#type: event.event_type,
        step: event.step.unwrap_or_default(),
        data: document::to_struct(&data),
        recorded_at: Some(timestamp(event.recorded_at)),
    }
}

impl Api {
    /// A saga as the client API shows it, without its history. Never fails: whatever the store
    /// holds can be shown.
    fn saga_message(&self, record: &SagaRecord) -> pb::Saga {
        let stuck = record
            .projection
            .failing_since
            .is_some_and(|since| since < self.engine.stuck_cutoff());
        saga_message(record, stuck)
    }

    /// The saga with one page of its history: up to `page_size` events after seq `after`, fewer
    /// rather than grow the answer past what a client reads by default. The token for the rest
    /// is set unless the page ends with the newest event.
    async fn with_history(
        &self,
        record: &SagaRecord,
        after: u64,
        page_size: u32,
    ) -> Result<pb::Saga, Status> {
        // One more than asked tells whether another page follows.
        let events = self
            .engine
            .history_page(
                record.saga_id,
                after,
                record.projection.version,
                page_size + 1,
            )
            .await?;
        let mut more = events.len() > page_size as usize;
        let mut saga = self.saga_message(record);
        let mut bytes = saga.encoded_len();
        for event in events.into_iter().take(page_size as usize) {
            let event = event_message(event);
            bytes += event.encoded_len();
            if bytes > MAX_PAGE_BYTES && !saga.history.is_empty() {
                more = true;
                break;
            }
            saga.history.push(event);
        }
        if more && let Some(last) = saga.history.last() {
            saga.next_history_page_token = format!("h{}", last.seq);
        }
        Ok(saga)
    }
}

fn saga_message(record: &SagaRecord, stuck: bool) -> pb::Saga {
    let projection = &record.projection;
    let steps = projection
        .steps
        .iter()
        .map(|step| pb::Step {
            name: step.name.clone(),
            participant: step.participant.clone(),
            status: step_status_to_wire(step.status).into(),
            attempts: step.attempts,
            compensation_attempts: step.compensation_attempts,
            last_error: step.last_error.clone().unwrap_or_default(),
            output: step.output.as_deref().and_then(document::to_struct),
            next_attempt_at: step.next_attempt_at.map(timestamp),
        })
        .collect();
    pb::Saga {
        saga_id: record.saga_id.to_string(),
        saga_type: projection.saga_type.clone(),
        definition_version: projection.definition_version,
        status: saga_status_to_wire(projection.status).into(),
        input: document::to_struct(&projection.input),
        context: Some(document::context_struct(&Context::new(
            &projection.input,
            projection.steps.iter().filter_map(|step| {
                step.output
                    .as_deref()
                    .map(|output| (step.name.as_str(), output))
            }),
        ))),
        failure_reason: projection.failure_reason.clone().unwrap_or_default(),
        steps,
        version: projection.version,
        correlation_id: projection.correlation_id.clone(),
        idempotency_key: projection.idempotency_key.clone().unwrap_or_default(),
        created_at: Some(timestamp(record.created_at)),
        updated_at: Some(timestamp(record.updated_at)),
        history: Vec::new(),
        stuck,
        next_history_page_token: String::new(),
    }
}
