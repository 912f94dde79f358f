//! The explorer's pages as HTML. maud escapes every value it inserts, so a saga's input,
//! outputs, errors and reasons always render as text. No inline script or style: the page's
//! behaviour is in `assets/explorer.js`, found through `data-` attributes.

use std::sync::Arc;

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};
use serde_json::Value;

use super::ListQuery;
use super::diagram::{self, DiagramStep};
use super::session::Visitor;
use crate::auth::Role;
use crate::definition::{RetryPolicy, SagaDefinition};
use crate::saga::{Context, SagaStatus, StepStatus, StepView};
use crate::store::{EventRecord, Overview, SagaRecord};

const STATUSES: [SagaStatus; 5] = [
    SagaStatus::Running,
    SagaStatus::Compensating,
    SagaStatus::Completed,
    SagaStatus::Compensated,
    SagaStatus::Failed,
];

fn layout(title: &str, visitor: Option<&Visitor>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · sagad" }
                link rel="stylesheet" href="/assets/explorer.css";
                script src="/assets/explorer.js" defer {}
            }
            body data-role=[visitor.map(|visitor| visitor.role.name())] {
                header.top {
                    a.brand href="/" { "sagad" }
                    @if visitor.is_some() {
                        nav {
                            a href="/" { "Overview" }
                            a href="/sagas" { "Sagas" }
                            a href="/definitions" { "Definitions" }
                        }
                    }
                    @if let Some(visitor) = visitor {
                        span #who {
                            @match &visitor.name {
                                Some(name) => { (name) " · " (visitor.role.name()) }
                                None => { "no tokens: every visitor may act" }
                            }
                        }
                        @if visitor.name.is_some() {
                            form.inline method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(visitor.csrf);
                                button.link type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main #main { (body) }
            }
        }
    }
}

pub(super) fn error(status: StatusCode, message: &str) -> Markup {
    let title = status.canonical_reason().unwrap_or("Error");
    layout(
        title,
        None,
        html! {
            h1 { (status.as_u16()) " " (title) }
            p #error-message { (message) }
            p { a href="/" { "Back to the overview" } }
        },
    )
}

pub(super) fn login(next: &str, csrf: &str, error: Option<&str>) -> Markup {
    layout(
        "Sign in",
        None,
        html! {
            h1 { "Sign in" }
            p { "This sagad takes bearer tokens. Paste yours once; the browser keeps it in a cookie no script can read." }
            @if let Some(error) = error {
                p.error #login-error { (error) }
            }
            form #login method="post" action="/login" {
                input type="hidden" name="next" value=(next);
                input type="hidden" name="csrf" value=(csrf);
                label for="token" { "Token" }
                input #token type="password" name="token" autocomplete="off" required;
                button type="submit" { "Sign in" }
            }
        },
    )
}

fn status_badge(status: SagaStatus) -> Markup {
    html! { span class={ "status s-" (status.as_str()) } { (status.as_str()) } }
}

fn step_status_name(status: StepStatus) -> &'static str {
    match status {
        StepStatus::Pending => "PENDING",
        StepStatus::Running => "RUNNING",
        StepStatus::Succeeded => "SUCCEEDED",
        StepStatus::Failed => "FAILED",
        StepStatus::Compensating => "COMPENSATING",
        StepStatus::Compensated => "COMPENSATED",
        StepStatus::CompensationFailed => "COMPENSATION_FAILED",
    }
}

fn time(at: DateTime<Utc>) -> Markup {
    html! {
        time datetime=(at.to_rfc3339()) { (at.format("%Y-%m-%d %H:%M:%S UTC")) }
    }
}

/// A duration as a person reads it: the two largest units.
pub(super) fn span(duration: chrono::Duration) -> String {
    let millis = duration.num_milliseconds().max(0);
    if millis < 1000 {
        return format!("{millis}ms");
    }
    let seconds = millis / 1000;
    let (days, hours, minutes, secs) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    if days > 0 {
        format!("{days}d {hours}h")
    } else if hours > 0 {
        format!("{hours}h {minutes}m")
    } else if minutes > 0 {
        format!("{minutes}m {secs}s")
    } else if millis < 10_000 {
        format!("{:.1}s", millis as f64 / 1000.0)
    } else {
        format!("{secs}s")
    }
}

fn is_stuck(record: &SagaRecord, stuck_cutoff: DateTime<Utc>) -> bool {
    record
        .projection
        .failing_since
        .is_some_and(|since| since < stuck_cutoff)
}

/// The step the saga works on now, or stopped at.
fn current_step(record: &SagaRecord) -> Option<&StepView> {
    let steps = &record.projection.steps;
    steps
        .iter()
        .find(|step| {
            matches!(
                step.status,
                StepStatus::Running | StepStatus::Compensating | StepStatus::CompensationFailed
            )
        })
        .or_else(|| {
            (record.projection.status == SagaStatus::Running)
                .then(|| steps.iter().find(|step| step.status == StepStatus::Pending))
                .flatten()
        })
}

/// The cells a saga's row starts with, in the overview and the list: its link, type, status
/// and the step it is at.
fn saga_cells(record: &SagaRecord, stuck_cutoff: DateTime<Utc>) -> Markup {
    html! {
        td { a.saga-link href={ "/sagas/" (record.saga_id) } { code { (record.saga_id) } } }
        td.saga-type { (record.projection.saga_type) }
        td {
            (status_badge(record.projection.status))
            @if is_stuck(record, stuck_cutoff) { " " span.badge.stuck { "stuck" } }
        }
        td.step { (current_step(record).map_or("", |step| step.name.as_str())) }
    }
}

pub(super) struct OverviewPage<'a> {
    pub(super) visitor: &'a Visitor,
    pub(super) types: &'a [String],
    pub(super) overview: &'a Overview,
    pub(super) attention: &'a [SagaRecord],
    pub(super) attention_limit: usize,
    pub(super) now: DateTime<Utc>,
    pub(super) stuck_cutoff: DateTime<Utc>,
}

pub(super) fn overview(page: &OverviewPage<'_>) -> Markup {
    let mut types: Vec<&str> = page.types.iter().map(String::as_str).collect();
    for (saga_type, _, _) in &page.overview.counts {
        if !types.contains(&saga_type.as_str()) {
            types.push(saga_type);
        }
    }
    let count = |saga_type: &str, status: SagaStatus| {
        page.overview
            .counts
            .iter()
            .filter(|(t, s, _)| t == saga_type && *s == status)
            .map(|(_, _, n)| *n)
            .sum::<i64>()
    };
    let ended_in_hour: i64 = page
        .overview
        .finished_per_minute
        .iter()
        .map(|(_, _, n)| n)
        .sum();
    let body = html! {
        h1 { "Overview" }
        section {
            h2 { "Sagas by type and status" }
            table #counts {
                thead { tr {
                    th { "Saga type" }
                    @for status in STATUSES { th { (status.as_str()) } }
                    th { "All" }
                } }
                tbody {
                    @for saga_type in &types {
                        tr data-type=(saga_type) {
                            th { a href=(ListQuery { saga_type: Some((*saga_type).to_owned()), ..ListQuery::default() }.href(None)) { (saga_type) } }
                            @for status in STATUSES {
                                td.count data-type=(saga_type) data-status=(status.as_str()) {
                                    a href=(ListQuery { saga_type: Some((*saga_type).to_owned()), status: Some(status), ..ListQuery::default() }.href(None)) {
                                        (count(saga_type, status))
                                    }
                                }
                            }
                            td.count.total data-type=(saga_type) {
                                (STATUSES.iter().map(|status| count(saga_type, *status)).sum::<i64>())
                            }
                        }
                    }
                }
            }
        }
        section {
            h2 { "Sagas ended per minute, last hour" }
            p #ended-last-hour {
                (ended_in_hour) " sagas ended in the last hour: "
                span.legend.s-COMPLETED { "completed" } " "
                span.legend.s-COMPENSATED { "compensated" } " "
                span.legend.s-FAILED { "failed" }
            }
            (diagram::finished_chart(&page.overview.finished_per_minute, page.now))
        }
        section {
            h2 { "Needs a person" }
            @if page.attention.is_empty() {
                p #attention-empty { "No saga is FAILED or stuck." }
            } @else {
                p { "FAILED sagas and stuck ones, the longest waiting first." }
                table #attention {
                    thead { tr { th { "Saga" } th { "Type" } th { "Status" } th { "Step" } th { "Waiting" } th { "Why" } } }
                    tbody {
                        @for record in page.attention {
                            @let since = record.projection.failing_since.unwrap_or(record.updated_at);
                            tr data-saga-id=(record.saga_id) {
                                (saga_cells(record, page.stuck_cutoff))
                                td { (span(page.now - since)) }
                                td.why {
                                    (record.projection.failure_reason.as_deref()
                                        .or_else(|| current_step(record).and_then(|step| step.last_error.as_deref()))
                                        .unwrap_or(""))
                                }
                            }
                        }
                    }
                }
                @if page.attention.len() >= page.attention_limit {
                    p { "Only the first " (page.attention_limit) " are shown: see "
                        a href="/sagas?status=FAILED" { "the FAILED sagas" } " and "
                        a href="/sagas?stuck=1" { "the stuck ones" } "." }
                }
            }
        }
    };
    layout("Overview", Some(page.visitor), body)
}

pub(super) struct ListPage<'a> {
    pub(super) visitor: &'a Visitor,
    pub(super) query: &'a ListQuery,
    pub(super) types: &'a [String],
    pub(super) sagas: &'a [SagaRecord],
    pub(super) next: Option<&'a str>,
    pub(super) now: DateTime<Utc>,
    pub(super) stuck_cutoff: DateTime<Utc>,
}

pub(super) fn list(page: &ListPage<'_>) -> Markup {
    let query = page.query;
    let body = html! {
        h1 { "Sagas" }
        form #filters method="get" action="/sagas" {
            label { "Type "
                select name="type" {
                    option value="" { "any" }
                    @for saga_type in page.types {
                        option value=(saga_type) selected[query.saga_type.as_deref() == Some(saga_type.as_str())] { (saga_type) }
                    }
                }
            }
            label { "Status "
                select name="status" {
                    option value="" { "any" }
                    @for status in STATUSES {
                        option value=(status.as_str()) selected[query.status == Some(status)] { (status.as_str()) }
                    }
                }
            }
            label { input type="checkbox" name="stuck" value="1" checked[query.stuck]; " stuck" }
            label { "Find "
                input type="search" name="q" value=[query.find.as_deref()]
                    placeholder="saga id, correlation id or idempotency key" size="40";
            }
            button type="submit" { "Show" }
        }
        @if page.sagas.is_empty() {
            p #no-sagas { "No saga matches." }
        } @else {
            table #sagas {
                thead { tr { th { "Saga" } th { "Type" } th { "Status" } th { "Step" } th { "Age" } th { "Updated" } } }
                tbody {
                    @for record in page.sagas {
                        tr data-saga-id=(record.saga_id) data-status=(record.projection.status.as_str()) {
                            (saga_cells(record, page.stuck_cutoff))
                            td.age { (span(page.now - record.created_at)) }
                            td.updated { (time(record.updated_at)) }
                        }
                    }
                }
            }
        }
        @if let Some(next) = page.next {
            p { a #next-page href=(next) { "Older sagas →" } }
        }
    };
    layout("Sagas", Some(page.visitor), body)
}

pub(super) struct SagaPage<'a> {
    pub(super) visitor: &'a Visitor,
    pub(super) record: &'a SagaRecord,
    pub(super) history: &'a [EventRecord],
    pub(super) timeline_limit: usize,
    pub(super) now: DateTime<Utc>,
    pub(super) stuck_cutoff: DateTime<Utc>,
}

/// The definition the saga started with, from its first event; `None` for a log whose first
/// event does not hold one this release reads.
fn snapshot(history: &[EventRecord]) -> Option<SagaDefinition> {
    let first = history
        .first()
        .filter(|event| event.event_type == "saga_started")?;
    serde_json::from_value(first.data.get("definition")?.clone()).ok()
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// Steps the retry dialog offers to skip: the ones whose compensation is still to be done.
fn skippable(step: &StepView) -> bool {
    matches!(
        step.status,
        StepStatus::CompensationFailed | StepStatus::Compensating | StepStatus::Succeeded
    )
}

pub(super) fn saga(page: &SagaPage<'_>) -> Markup {
    let record = page.record;
    let projection = &record.projection;
    let definition = snapshot(page.history);
    let steps: Vec<DiagramStep<'_>> = projection
        .steps
        .iter()
        .map(|step| {
            let defined = definition.as_ref().and_then(|d| d.step(&step.name));
            DiagramStep {
                name: &step.name,
                participant: &step.participant,
                action: defined.map(|d| d.action.as_str()),
                compensation: defined.and_then(|d| d.compensation.as_deref()),
                status: Some(step.status),
            }
        })
        .collect();
    let context = Context::new(
        &projection.input,
        projection.steps.iter().filter_map(|step| {
            step.output
                .as_deref()
                .map(|output| (step.name.as_str(), output))
        }),
    );
    let context = serde_json::to_value(&context).unwrap_or(Value::Null);
    let stuck = is_stuck(record, page.stuck_cutoff);
    let may_cancel = page.visitor.may(Role::Operator) && projection.status == SagaStatus::Running;
    let may_retry = page.visitor.may(Role::Admin) && projection.status == SagaStatus::Failed;
    let title = format!("{} {}", projection.saga_type, record.saga_id);
    let body = html! {
        section #saga-live data-saga-id=(record.saga_id) data-version=(projection.version) {
            h1 { (projection.saga_type) " " small { code #saga-id { (record.saga_id) } } }
            p.headline {
                span #status class={ "status s-" (projection.status.as_str()) } { (projection.status.as_str()) }
                @if stuck { " " span.badge.stuck #stuck { "stuck" } }
                @if let Some(reason) = &projection.failure_reason { " " span #failure-reason { (reason) } }
            }
            @if may_cancel || may_retry {
                div #actions {
                    @if may_cancel {
                        button #cancel-open type="button" data-opens="cancel-dialog" { "Cancel…" }
                        dialog #cancel-dialog {
                            form method="post" action={ "/sagas/" (record.saga_id) "/cancel" } {
                                h2 { "Cancel this saga?" }
                                p { "It stops going forward; the steps it has done are compensated, newest first." }
                                input type="hidden" name="csrf" value=(page.visitor.csrf);
                                label for="cancel-reason" { "Reason (kept in the history)" }
                                textarea #cancel-reason name="reason" required rows="2" {}
                                div.buttons {
                                    button type="button" data-closes="" { "Keep it running" }
                                    button.danger #cancel-confirm type="submit" { "Cancel the saga" }
                                }
                            }
                        }
                    }
                    @if may_retry {
                        button #retry-open type="button" data-opens="retry-dialog" { "Retry…" }
                        dialog #retry-dialog {
                            form method="post" action={ "/sagas/" (record.saga_id) "/retry" } {
                                h2 { "Retry the compensation?" }
                                p { "The compensation goes on from the step that stopped it. A step ticked below is recorded as compensated by hand and never called again." }
                                input type="hidden" name="csrf" value=(page.visitor.csrf);
                                @for step in projection.steps.iter().filter(|step| skippable(step)) {
                                    label.skip {
                                        input type="checkbox" name="skip" value=(step.name);
                                        " skip " code { (step.name) } " (" (step_status_name(step.status)) ")"
                                    }
                                }
                                label for="retry-reason" { "Reason (kept in the history)" }
                                textarea #retry-reason name="reason" required rows="2" {}
                                div.buttons {
                                    button type="button" data-closes="" { "Leave it" }
                                    button.danger #retry-confirm type="submit" { "Retry" }
                                }
                            }
                        }
                    }
                }
            }
            dl.facts {
                dt { "Saga id" } dd { code { (record.saga_id) } }
                dt { "Type" } dd { (projection.saga_type) " v" (projection.definition_version) }
                dt { "Correlation id" } dd #correlation-id { (projection.correlation_id) }
                dt { "Idempotency key" } dd #idempotency-key { (projection.idempotency_key.as_deref().unwrap_or("")) }
                dt { "Started" } dd { (time(record.created_at)) " (" (span(page.now - record.created_at)) " ago)" }
                dt { "Updated" } dd { (time(record.updated_at)) }
                dt { "Version" } dd #version { (projection.version) }
            }
            section {
                h2 { "Steps" }
                div.diagram { (diagram::steps(&steps, Some(projection.status))) }
                table #steps {
                    thead { tr { th { "Step" } th { "Participant" } th { "Status" } th { "Attempts" } th { "Last error" } th { "Next attempt" } th { "Output" } } }
                    tbody {
                        @for step in &projection.steps {
                            tr data-step=(step.name) data-status=(step_status_name(step.status)) {
                                td { code { (step.name) } }
                                td { (step.participant) }
                                td.step-status { span class={ "step-status st-" (step_status_name(step.status)) } { (step_status_name(step.status)) } }
                                td.attempts {
                                    (step.attempts)
                                    @if step.compensation_attempts > 0 { " · compensation " (step.compensation_attempts) }
                                }
                                td.last-error { (step.last_error.as_deref().unwrap_or("")) }
                                td.next-attempt {
                                    @if let Some(due) = step.next_attempt_at {
                                        time.countdown datetime=(due.to_rfc3339()) data-due=(due.to_rfc3339()) {
                                            @if due > page.now { "in " (span(due - page.now)) } @else { "due now" }
                                        }
                                    }
                                }
                                td.output {
                                    @if let Some(output) = &step.output {
                                        details { summary { "output" } pre { (pretty(output)) } }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            section {
                h2 { "Timeline" }
                @if page.history.len() >= page.timeline_limit {
                    p { "The first " (page.timeline_limit) " events of " (projection.version) "." }
                }
                (timeline(page.history))
            }
            section.documents {
                div {
                    h2 { "Input" }
                    pre #input { (pretty(&projection.input)) }
                }
                div {
                    h2 { "Context" }
                    p.note { "What the next participant call receives: the input and each step's output." }
                    pre #context { (pretty(&context)) }
                }
            }
        }
        div #live hidden data-live={ "/sagas/" (record.saga_id) "/live?after=" (projection.version) } {}
    };
    layout(&title, Some(page.visitor), body)
}

/// Who asked and why, for the events of a person's request.
fn audit(event: &EventRecord) -> Option<(String, String)> {
    let text = |field: &str| {
        event
            .data
            .get(field)
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    match event.event_type.as_str() {
        "cancel_requested" | "retry_requested" | "compensation_skipped" => Some((
            text("requested_by")
                .filter(|who| !who.is_empty())
                .unwrap_or_else(|| "someone".to_owned()),
            text("reason").unwrap_or_default(),
        )),
        _ => None,
    }
}

/// What went wrong, for the events that say so.
fn problem(event: &EventRecord) -> Option<String> {
    let text = |field: &str| event.data.get(field).and_then(Value::as_str);
    match (text("code"), text("reason"), text("error")) {
        (Some(code), Some(reason), _) => Some(format!("{code}: {reason}")),
        (None, Some(reason), _) if audit(event).is_none() => Some(reason.to_owned()),
        (_, _, Some(error)) => Some(error.to_owned()),
        _ => None,
    }
}

fn timeline(history: &[EventRecord]) -> Markup {
    html! {
        ol #timeline {
            @for (index, event) in history.iter().enumerate() {
                @let gap = index.checked_sub(1).and_then(|previous| history.get(previous))
                    .map(|previous| span(event.recorded_at - previous.recorded_at));
                li.event data-seq=(event.seq) data-type=(event.event_type) {
                    span.seq { (event.seq) }
                    span.event-type { (event.event_type) }
                    @if let Some(step) = &event.step { " " code.event-step { (step) } }
                    " " (time(event.recorded_at))
                    @if let Some(gap) = gap { " " span.gap { "+" (gap) } }
                    @if let Some((who, reason)) = audit(event) {
                        div.audit { "by " strong.who { (who) } ": " q.reason { (reason) } }
                    }
                    @if let Some(problem) = problem(event) {
                        div.problem { (problem) }
                    }
                    details.event-data { summary { "data" } pre { (pretty(&event.data)) } }
                }
            }
        }
    }
}

fn retry_policy(policy: &RetryPolicy) -> Markup {
    html! {
        (match policy.max_attempts { Some(n) => format!("{n} attempts"), None => "no attempt limit".to_owned() })
        ", " (humantime::format_duration(policy.initial_delay)) " ×" (policy.multiplier)
        " up to " (humantime::format_duration(policy.max_delay))
        ", jitter " (policy.jitter)
    }
}

pub(super) fn definitions(visitor: &Visitor, definitions: &[Arc<SagaDefinition>]) -> Markup {
    let body = html! {
        h1 { "Definitions" }
        p { "What this replica starts new sagas with. A saga keeps the version it started with." }
        @for definition in definitions {
            @let steps: Vec<DiagramStep<'_>> = definition.steps.iter().map(|step| DiagramStep {
                name: &step.name,
                participant: &step.participant,
                action: Some(&step.action),
                compensation: step.compensation.as_deref(),
                status: None,
            }).collect();
            section.definition data-type=(definition.name) data-version=(definition.version) {
                h2 { (definition.name) " " small { "version " (definition.version) } }
                @if !definition.required_input.is_empty() {
                    p { "Required input: " @for (i, field) in definition.required_input.iter().enumerate() { @if i > 0 { ", " } code { (field) } } }
                }
                @if definition.input_schema.is_some() { p { "The input is checked against a JSON Schema." } }
                div.diagram { (diagram::steps(&steps, None)) }
                table.definition-steps {
                    thead { tr { th { "Step" } th { "Participant" } th { "Action" } th { "Compensation" } th { "Timeout" } th { "Retries" } th { "Compensation retries" } } }
                    tbody {
                        @for step in &definition.steps {
                            tr data-step=(step.name) {
                                td { code { (step.name) } }
                                td { (step.participant) }
                                td { code { (step.action) } }
                                td { @if let Some(compensation) = &step.compensation { code { (compensation) } } @else { "none" } }
                                td { (humantime::format_duration(step.timeout)) }
                                td { (retry_policy(&step.retry)) }
                                td { @if step.compensation.is_some() { (retry_policy(&step.compensation_retry)) } }
                            }
                        }
                    }
                }
            }
        }
    };
    layout("Definitions", Some(visitor), body)
}
