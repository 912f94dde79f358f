//! The saga explorer: HTML pages on sagad's HTTP port that show what every saga is doing and let
//! an operator cancel or retry one. Pages are rendered on the server (maud: every value from a
//! saga is escaped); the stylesheet and the little JavaScript (live updates, countdowns, the
//! action dialogs) are compiled into the binary. Reads and writes go through the engine, as
//! the gRPC API's do: no SQL here, and nothing kept between requests but the cookies it sets.
//!
//! With tokens on, a visitor presents one once (`/login`); it travels in an `HttpOnly`,
//! `SameSite=Strict` cookie and gives the same role it gives over gRPC. Every action is a POST
//! that must carry the page's anti-forgery value (the double of a cookie a foreign page cannot
//! read) and come from this origin.

mod diagram;
mod pages;
mod session;
#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use chrono::{Duration as ChronoDuration, Utc};
use futures::Stream;
use maud::Markup;
use uuid::Uuid;

use crate::auth::{Authenticator, Role};
use crate::engine::{Engine, EngineError, MAX_REASON_BYTES};
use crate::limits::Limits;
use crate::saga::{CannotRetry, SagaStatus};
use crate::store::{ListCursor, ListFilter, StoreError};
use session::Visitor;

/// The engine once it runs; `None` while sagad starts or after it has stopped.
pub type EngineSource = Arc<dyn Fn() -> Option<Engine> + Send + Sync>;

/// Sagas on one page of the list.
const PAGE_SIZE: u32 = 50;
/// Sagas the overview lists as needing a person.
const ATTENTION_SIZE: u32 = 50;
/// Events of a saga's timeline; a longer history shows its first ones.
const TIMELINE_SIZE: u32 = 1000;
/// Longest text searched for: no correlation id or idempotency key is longer.
const MAX_FIND_BYTES: usize = 512;
/// How long a browser waits before it reconnects a live update that ended (the saga had
/// ended, or sagad restarted): an ended saga may still be retried.
const RECONNECT_AFTER: Duration = Duration::from_secs(3);

const STYLESHEET: &str = include_str!("assets/explorer.css");
const SCRIPT: &str = include_str!("assets/explorer.js");

/// Only this origin's own files; no inline script or style, no frames, forms posting here.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";

#[derive(Clone)]
struct Explorer {
    engine: EngineSource,
    auth: Authenticator,
    limits: Limits,
}

/// The explorer's routes; merged into sagad's HTTP router.
pub fn router(engine: EngineSource, auth: Authenticator, limits: Limits) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/sagas", get(list))
        .route("/sagas/{id}", get(saga))
        .route("/sagas/{id}/live", get(live))
        .route("/sagas/{id}/cancel", post(cancel))
        .route("/sagas/{id}/retry", post(retry))
        .route("/definitions", get(definitions))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/assets/explorer.css", get(stylesheet))
        .route("/assets/explorer.js", get(script))
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(Explorer {
            engine,
            auth,
            limits,
        })
}

/// What every explorer response carries: the content security policy and its companions.
async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "same-origin"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Why a page cannot be shown; each is a page of its own with the fitting status.
#[derive(Debug)]
enum PageError {
    /// No token, or one no longer known: the login page, then back to `next`.
    Login {
        next: String,
    },
    /// No token where no login page can help (a POST, a live update).
    Unauthenticated(String),
    BadRequest(String),
    Forbidden(String),
    NotFound(String),
    Conflict(String),
    TooMany(String),
    Unavailable(String),
    DataLoss(String),
}

impl From<EngineError> for PageError {
    fn from(error: EngineError) -> Self {
        let message = error.to_string();
        match error {
            EngineError::NotFound(_) => Self::NotFound(message),
            EngineError::NotCancellable(_)
            | EngineError::NotRetryable(CannotRetry::NotFailed(_))
            | EngineError::Contended(_)
            | EngineError::IdempotencyKeyReused { .. } => Self::Conflict(message),
            // A step to skip that the saga does not have, or that has nothing to undo.
            EngineError::NotRetryable(_)
            | EngineError::UnknownSagaType(_)
            | EngineError::InvalidInput(_)
            | EngineError::Store(StoreError::Rejected(_)) => Self::BadRequest(message),
            EngineError::Store(StoreError::CorruptLog { .. }) | EngineError::CorruptLog { .. } => {
                Self::DataLoss(message)
            }
            EngineError::VersionNotReached { .. }
            | EngineError::Store(_)
            | EngineError::ShuttingDown => Self::Unavailable(message),
        }
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            Self::Login { next } => {
                let target = format!("/login?next={}", query_value(&next));
                return Redirect::to(&target).into_response();
            }
            Self::Unauthenticated(message) => (StatusCode::UNAUTHORIZED, message),
            Self::BadRequest(message) => (StatusCode::BAD_REQUEST, message),
            Self::Forbidden(message) => (StatusCode::FORBIDDEN, message),
            Self::NotFound(message) => (StatusCode::NOT_FOUND, message),
            Self::Conflict(message) => (StatusCode::CONFLICT, message),
            Self::TooMany(message) => (StatusCode::TOO_MANY_REQUESTS, message),
            Self::Unavailable(message) => (StatusCode::SERVICE_UNAVAILABLE, message),
            Self::DataLoss(message) => (StatusCode::INTERNAL_SERVER_ERROR, message),
        };
        let mut response = (status, html(pages::error(status, &message))).into_response();
        no_store(response.headers_mut());
        response
    }
}

type PageResult = Result<Response, PageError>;

impl Explorer {
    fn engine(&self) -> Result<Engine, PageError> {
        (self.engine)().ok_or_else(|| {
            PageError::Unavailable("sagad is starting or stopping; try again shortly".to_owned())
        })
    }
}

/// A rendered page, with the visitor's new cookie if it needs one, and how long the server
/// took (`Server-Timing`, which browsers' developer tools show).
fn page(visitor: &Visitor, markup: Markup, began: Instant) -> Response {
    let mut response = html(markup).into_response();
    let headers = response.headers_mut();
    no_store(headers);
    visitor.set_cookies(headers);
    let millis = began.elapsed().as_secs_f64() * 1000.0;
    if let Ok(value) = HeaderValue::from_str(&format!("total;dur={millis:.2}")) {
        headers.insert("server-timing", value);
    }
    response
}

fn html(markup: Markup) -> ([(header::HeaderName, &'static str); 1], String) {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        markup.into_string(),
    )
}

/// Pages show sagas as they are now: never from a cache.
fn no_store(headers: &mut HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// The pairs of a query string or a form body.
fn pairs(text: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(text).into_owned().collect()
}

fn query_value(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// A text a visitor typed ([`crate::document::check_text`]).
fn checked_text(field: &str, value: &str, max: usize) -> Result<(), PageError> {
    crate::document::check_text(field, value, max).map_err(PageError::BadRequest)
}

fn parse_saga_id(text: &str) -> Result<Uuid, PageError> {
    Uuid::parse_str(text)
        .map_err(|_| PageError::NotFound(format!("{:?} is not a saga id", shorten(text))))
}

fn shorten(text: &str) -> String {
    crate::document::shorten(text, 64)
}

async fn overview(State(explorer): State<Explorer>, visitor: Visitor) -> PageResult {
    let began = Instant::now();
    let engine = explorer.engine()?;
    let now = Utc::now();
    let since = now - ChronoDuration::hours(1);
    let (counts, attention) = tokio::try_join!(
        engine.overview(since),
        engine.needing_attention(ATTENTION_SIZE)
    )?;
    let types = saga_types(&engine);
    let markup = pages::overview(&pages::OverviewPage {
        visitor: &visitor,
        types: &types,
        overview: &counts,
        attention: &attention,
        attention_limit: ATTENTION_SIZE as usize,
        now,
        stuck_cutoff: engine.stuck_cutoff(),
    });
    Ok(page(&visitor, markup, began))
}

/// The list's filters, as its query string gives them.
#[derive(Debug, Default, Clone)]
pub(crate) struct ListQuery {
    pub(crate) saga_type: Option<String>,
    pub(crate) status: Option<SagaStatus>,
    pub(crate) stuck: bool,
    pub(crate) find: Option<String>,
    pub(crate) after: Option<String>,
}

impl ListQuery {
    fn parse(query: Option<&str>) -> Result<Self, PageError> {
        let mut parsed = Self::default();
        for (name, value) in pairs(query.unwrap_or_default().as_bytes()) {
            let value = value.trim().to_owned();
            if value.is_empty() {
                continue;
            }
            match name.as_str() {
                "type" => {
                    checked_text("type", &value, MAX_FIND_BYTES)?;
                    parsed.saga_type = Some(value);
                }
                "status" => {
                    parsed.status = Some(SagaStatus::parse(&value).ok_or_else(|| {
                        PageError::BadRequest(format!(
                            "status {:?} is not one of RUNNING, COMPENSATING, COMPLETED, \
                             COMPENSATED, FAILED",
                            shorten(&value)
                        ))
                    })?);
                }
                "stuck" => parsed.stuck = value == "1" || value == "on" || value == "true",
                "q" => {
                    checked_text("the search", &value, MAX_FIND_BYTES)?;
                    parsed.find = Some(value);
                }
                "after" => parsed.after = Some(value),
                _ => {}
            }
        }
        Ok(parsed)
    }

    /// The query string of these filters, starting after `after`.
    pub(crate) fn href(&self, after: Option<&str>) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        if let Some(saga_type) = &self.saga_type {
            query.append_pair("type", saga_type);
        }
        if let Some(status) = self.status {
            query.append_pair("status", status.as_str());
        }
        if self.stuck {
            query.append_pair("stuck", "1");
        }
        if let Some(find) = &self.find {
            query.append_pair("q", find);
        }
        if let Some(after) = after {
            query.append_pair("after", after);
        }
        let query = query.finish();
        if query.is_empty() {
            "/sagas".to_owned()
        } else {
            format!("/sagas?{query}")
        }
    }
}

fn parse_cursor(text: &str) -> Result<ListCursor, PageError> {
    ListCursor::from_token(text).ok_or_else(|| {
        PageError::BadRequest(format!("{:?} is not a page of this list", shorten(text)))
    })
}

/// The saga types this replica has definitions of, for the pages' filters and counts.
fn saga_types(engine: &Engine) -> Vec<String> {
    engine
        .definitions()
        .saga_types()
        .map(str::to_owned)
        .collect()
}

async fn list(
    State(explorer): State<Explorer>,
    visitor: Visitor,
    RawQuery(query): RawQuery,
) -> PageResult {
    let began = Instant::now();
    let engine = explorer.engine()?;
    let query = ListQuery::parse(query.as_deref())?;
    let filter = ListFilter {
        saga_type: query.saga_type.clone(),
        statuses: query.status.into_iter().collect(),
        failing_before: query.stuck.then(|| engine.stuck_cutoff()),
        // One more than shown tells whether another page follows.
        limit: PAGE_SIZE + 1,
        after: query.after.as_deref().map(parse_cursor).transpose()?,
        find: query.find.clone(),
    };
    let mut sagas = engine.list_sagas(&filter).await?;
    let more = sagas.len() > PAGE_SIZE as usize;
    sagas.truncate(PAGE_SIZE as usize);
    let next = more
        .then(|| sagas.last())
        .flatten()
        .map(|last| query.href(Some(&ListCursor::after(last).token())));
    let types = saga_types(&engine);
    let markup = pages::list(&pages::ListPage {
        visitor: &visitor,
        query: &query,
        types: &types,
        sagas: &sagas,
        next: next.as_deref(),
        now: Utc::now(),
        stuck_cutoff: engine.stuck_cutoff(),
    });
    Ok(page(&visitor, markup, began))
}

async fn saga(
    State(explorer): State<Explorer>,
    visitor: Visitor,
    Path(id): Path<String>,
) -> PageResult {
    let began = Instant::now();
    let engine = explorer.engine()?;
    let saga_id = parse_saga_id(&id)?;
    let record = engine.get_saga(saga_id, 0, Duration::ZERO).await?;
    let history = engine
        .history_page(saga_id, 0, record.projection.version, TIMELINE_SIZE)
        .await?;
    let markup = pages::saga(&pages::SagaPage {
        visitor: &visitor,
        record: &record,
        history: &history,
        timeline_limit: TIMELINE_SIZE as usize,
        now: Utc::now(),
        stuck_cutoff: engine.stuck_cutoff(),
    });
    Ok(page(&visitor, markup, began))
}

/// The saga's new events as server-sent events, after the version the page showed (its
/// `after`, or on a reconnect the last event id the browser saw): the page reloads its live
/// part on each. It ends when the saga has ended; the browser reconnects a little later, so a
/// retry made elsewhere still shows. Each stream counts as one of the visitor's watches.
async fn live(
    State(explorer): State<Explorer>,
    visitor: Visitor,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, PageError> {
    let engine = explorer.engine()?;
    let saga_id = parse_saga_id(&id)?;
    let from_query = pairs(query.unwrap_or_default().as_bytes())
        .into_iter()
        .find(|(name, _)| name == "after")
        .and_then(|(_, value)| value.parse::<u64>().ok());
    let last_seen = headers
        .get("last-event-id")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let after = last_seen.or(from_query).unwrap_or(0);
    let permit = explorer
        .limits
        .open_watch(&visitor.limited_as)
        .map_err(|status| PageError::TooMany(status.message().to_owned()))?;
    let events = engine.watch(saga_id).await?;
    let appended =
        futures::stream::unfold((events, permit), move |(mut events, permit)| async move {
            loop {
                match events.recv().await? {
                    Ok(event) if event.seq <= after => continue,
                    Ok(event) => {
                        let message = SseEvent::default()
                            .event("appended")
                            .id(event.seq.to_string())
                            .data(
                                serde_json::json!({"seq": event.seq, "type": event.event_type})
                                    .to_string(),
                            );
                        return Some((Ok(message), (events, permit)));
                    }
                    // Shutting down, or the log cannot be read: the browser comes back later.
                    Err(_) => return None,
                }
            }
        });
    let opening = futures::stream::once(async {
        Ok(SseEvent::default().retry(RECONNECT_AFTER).comment("live"))
    });
    Ok(Sse::new(futures::StreamExt::chain(opening, appended)).keep_alive(KeepAlive::default()))
}

/// A POST's form, once it is shown to come from one of this explorer's own pages.
fn checked_form(headers: &HeaderMap, body: &Bytes) -> Result<Vec<(String, String)>, PageError> {
    let form = pairs(body);
    session::check_post(headers, form_value(&form, "csrf"))?;
    Ok(form)
}

/// The value of a form's or a query's field, trimmed; empty when it has none.
fn form_value<'f>(form: &'f [(String, String)], name: &str) -> &'f str {
    form.iter()
        .find(|(field, _)| field == name)
        .map_or("", |(_, value)| value.trim())
}

fn reason_of(form: &[(String, String)]) -> Result<String, PageError> {
    let reason = form_value(form, "reason");
    if reason.is_empty() {
        return Err(PageError::BadRequest("a reason is required".to_owned()));
    }
    checked_text("reason", reason, MAX_REASON_BYTES)?;
    Ok(reason.to_owned())
}

/// What a cancel or a retry needs, once its POST is shown to be the visitor's own and the
/// visitor's role allows it.
struct Action {
    engine: Engine,
    saga_id: Uuid,
    reason: String,
    form: Vec<(String, String)>,
}

impl Action {
    fn checked(
        explorer: &Explorer,
        visitor: &Visitor,
        (id, headers, body): (&str, &HeaderMap, &Bytes),
        needed: Role,
        what: &str,
    ) -> Result<Self, PageError> {
        let form = checked_form(headers, body)?;
        visitor.require(needed, what)?;
        let reason = reason_of(&form)?;
        Ok(Self {
            engine: explorer.engine()?,
            saga_id: parse_saga_id(id)?,
            reason,
            form,
        })
    }

    /// Back to the saga's page, which shows what the action did.
    fn done(&self) -> Response {
        Redirect::to(&format!("/sagas/{}", self.saga_id)).into_response()
    }
}

async fn cancel(
    State(explorer): State<Explorer>,
    visitor: Visitor,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> PageResult {
    let action = Action::checked(
        &explorer,
        &visitor,
        (&id, &headers, &body),
        Role::Operator,
        "cancel a saga",
    )?;
    action
        .engine
        .cancel_saga(action.saga_id, &action.reason, &visitor.who)
        .await?;
    Ok(action.done())
}

async fn retry(
    State(explorer): State<Explorer>,
    visitor: Visitor,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> PageResult {
    let action = Action::checked(
        &explorer,
        &visitor,
        (&id, &headers, &body),
        Role::Admin,
        "retry a saga",
    )?;
    let skip: Vec<String> = action
        .form
        .iter()
        .filter(|(name, value)| name == "skip" && !value.is_empty())
        .map(|(_, value)| value.clone())
        .collect();
    for step in &skip {
        checked_text("skip", step, MAX_REASON_BYTES)?;
    }
    action
        .engine
        .retry_saga(action.saga_id, &action.reason, &visitor.who, &skip)
        .await?;
    Ok(action.done())
}

async fn definitions(State(explorer): State<Explorer>, visitor: Visitor) -> PageResult {
    let began = Instant::now();
    let engine = explorer.engine()?;
    let definitions: Vec<_> = engine.definitions().all().cloned().collect();
    let markup = pages::definitions(&visitor, &definitions);
    Ok(page(&visitor, markup, began))
}

async fn login_page(
    State(explorer): State<Explorer>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let next = session::next_target(query.as_deref());
    session::login_form(&explorer.auth, &headers, &next, None, StatusCode::OK)
}

async fn login(State(explorer): State<Explorer>, headers: HeaderMap, body: Bytes) -> Response {
    session::log_in(&explorer.auth, &headers, &pairs(&body))
}

async fn logout(headers: HeaderMap, body: Bytes) -> Response {
    session::log_out(&headers, &pairs(&body))
}

async fn stylesheet() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        STYLESHEET,
    )
}

async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
}
