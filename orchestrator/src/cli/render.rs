//! The wire types as `sagactl` shows them: JSON objects with snake_case keys and short enum
//! names, never cut; and plain-text tables for people, which fit [`MAX_WIDTH`] columns by
//! cutting long values with `…` unless `--wide` asks for them whole.

use chrono::{DateTime, SecondsFormat, Utc};
use sagad_proto::v1 as pb;
use serde_json::{Value, json};

/// The widest line of table output, unless `--wide`.
pub(super) const MAX_WIDTH: usize = 100;

/// How wide table output may be: [`MAX_WIDTH`] columns, or any width (`--wide`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fit {
    limit: Option<usize>,
}

impl Fit {
    pub(super) fn new(wide: bool) -> Self {
        Self {
            limit: (!wide).then_some(MAX_WIDTH),
        }
    }

    /// `text` in at most `width` characters, its end replaced by `…` when cut; whole when wide.
    fn cut(self, text: &str, width: usize) -> String {
        if self.limit.is_none() || text.chars().count() <= width {
            return text.to_owned();
        }
        let mut short: String = text.chars().take(width.saturating_sub(1)).collect();
        short.push('…');
        short
    }

    /// One line of output, cut to the width.
    pub(super) fn line(self, text: &str) -> String {
        let text = one_line(text);
        match self.limit {
            Some(limit) => self.cut(&text, limit),
            None => text,
        }
    }
}

/// A cell or a value on one line: line breaks and tabs become spaces.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r', '\t'], " ")
}

/// `COMPLETED`, not `SAGA_STATUS_COMPLETED`.
pub(super) fn saga_status(status: i32) -> String {
    match pb::SagaStatus::try_from(status) {
        Ok(status) => short_name(status.as_str_name(), "SAGA_STATUS_"),
        Err(_) => format!("UNKNOWN_{status}"),
    }
}

/// `SUCCEEDED`, not `STEP_STATUS_SUCCEEDED`.
pub(super) fn step_status(status: i32) -> String {
    match pb::StepStatus::try_from(status) {
        Ok(status) => short_name(status.as_str_name(), "STEP_STATUS_"),
        Err(_) => format!("UNKNOWN_{status}"),
    }
}

fn short_name(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_owned()
}

/// What kind of JSON value this is, for error messages.
pub(super) fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(super) fn time(at: Option<&pbjson_types::Timestamp>) -> Option<DateTime<Utc>> {
    let at = at?;
    DateTime::from_timestamp(at.seconds, u32::try_from(at.nanos).unwrap_or_default())
}

fn time_text(at: Option<&pbjson_types::Timestamp>) -> String {
    time(at)
        .map(|at| at.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// To the second: the table column's form.
fn time_seconds(at: Option<&pbjson_types::Timestamp>) -> String {
    time(at)
        .map(|at| at.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn time_json(at: Option<&pbjson_types::Timestamp>) -> Value {
    time(at).map_or(Value::Null, |at| {
        Value::String(at.to_rfc3339_opts(SecondsFormat::Millis, true))
    })
}

/// A duration for people: `0.250s`, `42.0s`, `12m05s`, `3h02m`.
fn duration_text(millis: i64) -> String {
    let sign = if millis < 0 { "-" } else { "" };
    let millis = millis.unsigned_abs();
    let seconds = millis / 1000;
    match seconds {
        0..10 => format!("{sign}{:.3}s", millis as f64 / 1000.0),
        10..60 => format!("{sign}{:.1}s", millis as f64 / 1000.0),
        60..3600 => format!("{sign}{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{sign}{}h{:02}m", seconds / 3600, seconds % 3600 / 60),
    }
}

/// When `at` is, said from `now`: `in 3.200s`, `due now`.
fn due_text(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let millis = (at - now).num_milliseconds();
    if millis <= 0 {
        "due now".to_owned()
    } else {
        format!("in {}", duration_text(millis))
    }
}

/// A Struct as JSON. The wire carries every number as a double: whole ones are shown as
/// integers again (`1250`, not `1250.0`).
fn struct_json(value: Option<&pbjson_types::Struct>) -> Value {
    value
        .and_then(|value| serde_json::to_value(value).ok())
        .map_or(Value::Null, whole_numbers)
}

fn whole_numbers(value: Value) -> Value {
    /// Doubles hold every integer up to 2^53 exactly.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    match value {
        Value::Number(number) => match number.as_f64() {
            Some(float) if number.is_f64() && float.fract() == 0.0 && float.abs() <= EXACT => {
                Value::from(float as i64)
            }
            _ => Value::Number(number),
        },
        Value::Array(items) => Value::Array(items.into_iter().map(whole_numbers).collect()),
        Value::Object(fields) => Value::Object(
            fields
                .into_iter()
                .map(|(key, value)| (key, whole_numbers(value)))
                .collect(),
        ),
        other => other,
    }
}

/// A JSON object of these fields (in the order given, for [`key_values`]).
pub(super) fn object(fields: &[(&str, Value)]) -> Value {
    Value::Object(
        fields
            .iter()
            .map(|(key, value)| ((*key).to_owned(), value.clone()))
            .collect(),
    )
}

pub(super) fn step_json(step: &pb::Step) -> Value {
    json!({
        "name": step.name,
        "participant": step.participant,
        "status": step_status(step.status),
        "attempts": step.attempts,
        "compensation_attempts": step.compensation_attempts,
        "last_error": step.last_error,
        "next_attempt_at": time_json(step.next_attempt_at.as_ref()),
        "output": struct_json(step.output.as_ref()),
    })
}

pub(super) fn event_json(event: &pb::SagaEvent) -> Value {
    json!({
        "seq": event.seq,
        "type": event.r#type,
        "step": event.step,
        "data": struct_json(event.data.as_ref()),
        "recorded_at": time_json(event.recorded_at.as_ref()),
    })
}

/// The whole saga, as `get`, `cancel` and `retry` print it.
pub(super) fn saga_json(saga: &pb::Saga) -> Value {
    json!({
        "saga_id": saga.saga_id,
        "saga_type": saga.saga_type,
        "definition_version": saga.definition_version,
        "status": saga_status(saga.status),
        "stuck": saga.stuck,
        "version": saga.version,
        "input": struct_json(saga.input.as_ref()),
        "context": struct_json(saga.context.as_ref()),
        "failure_reason": saga.failure_reason,
        "correlation_id": saga.correlation_id,
        "idempotency_key": saga.idempotency_key,
        "created_at": time_json(saga.created_at.as_ref()),
        "updated_at": time_json(saga.updated_at.as_ref()),
        "steps": saga.steps.iter().map(step_json).collect::<Vec<_>>(),
        "history": saga.history.iter().map(event_json).collect::<Vec<_>>(),
    })
}

/// One line of `list`.
pub(super) fn saga_summary_json(saga: &pb::Saga) -> Value {
    json!({
        "saga_id": saga.saga_id,
        "saga_type": saga.saga_type,
        "status": saga_status(saga.status),
        "stuck": saga.stuck,
        "version": saga.version,
        "failure_reason": saga.failure_reason,
        "created_at": time_json(saga.created_at.as_ref()),
        "updated_at": time_json(saga.updated_at.as_ref()),
    })
}

/// A column of a [`table`]: cut to fit (a text that can be long), or always whole (ids,
/// statuses, numbers, times).
#[derive(Debug, Clone, Copy)]
pub(super) struct Column {
    header: &'static str,
    cut: bool,
}

const fn whole(header: &'static str) -> Column {
    Column { header, cut: false }
}

const fn cut(header: &'static str) -> Column {
    Column { header, cut: true }
}

/// How wide each column is: its widest cell; when that is too wide for `fit`, the columns that
/// may be cut share what the others leave, the narrow ones whole first (none narrower than its
/// header).
fn column_widths(columns: &[Column], rows: &[Vec<String>], fit: Fit) -> Vec<usize> {
    let mut widths: Vec<usize> = columns
        .iter()
        .map(|column| column.header.chars().count())
        .collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let Some(limit) = fit.limit else {
        return widths;
    };
    let gaps = 2 * columns.len().saturating_sub(1);
    if widths.iter().sum::<usize>() + gaps <= limit {
        return widths;
    }
    let fixed: usize = columns
        .iter()
        .zip(&widths)
        .filter(|(column, _)| !column.cut)
        .map(|(_, width)| width)
        .sum();
    let mut budget = limit.saturating_sub(fixed + gaps);
    let mut elastic: Vec<usize> = (0..columns.len())
        .filter(|&index| columns[index].cut)
        .collect();
    elastic.sort_by_key(|&index| widths[index]);
    let mut left = elastic.len();
    for index in elastic {
        let share = budget / left.max(1);
        let header = columns[index].header.chars().count();
        let width = widths[index].min(share.max(header));
        widths[index] = width;
        budget = budget.saturating_sub(width);
        left -= 1;
    }
    widths
}

/// Aligned columns under a header, one line per row; cells never span lines. See
/// [`column_widths`] for how it fits.
pub(super) fn table(columns: &[Column], rows: &[Vec<String>], fit: Fit) -> Vec<String> {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| one_line(cell)).collect())
        .collect();
    let widths = column_widths(columns, &rows, fit);
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (index, cell) in cells.enumerate() {
            if index > 0 {
                text.push_str("  ");
            }
            let width = widths.get(index).copied().unwrap_or_default();
            let cell = fit.cut(cell, width);
            text.push_str(&format!("{cell:<width$}"));
        }
        text.trim_end().to_owned()
    };
    let mut lines = vec![line(&mut columns.iter().map(|column| column.header))];
    for row in &rows {
        lines.push(line(&mut row.iter().map(String::as_str)));
    }
    lines
}

/// Fields as `key  value` lines, in the order given, each cut to fit.
pub(super) fn key_values(fields: &[(&str, Value)], fit: Fit) -> String {
    let fields: Vec<(&str, String)> = fields
        .iter()
        .map(|(key, value)| {
            let value = match value {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            (*key, value)
        })
        .collect();
    aligned(&fields, fit)
}

fn aligned(fields: &[(&str, String)], fit: Fit) -> String {
    let width = fields
        .iter()
        .map(|(key, _)| key.len())
        .max()
        .unwrap_or_default();
    fields
        .iter()
        .map(|(key, value)| fit.line(&format!("{key:<width$}  {value}")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `get`, `cancel` and `retry` for people: the saga, its steps, what a retrying step waits
/// for, and its history as a timeline. `now` says when a next attempt is due.
pub(super) fn saga_table(saga: &pb::Saga, fit: Fit, now: DateTime<Utc>) -> String {
    let mut status = saga_status(saga.status);
    if saga.stuck {
        status.push_str(" (stuck: a step has kept failing for longer than sagad's --stuck-after)");
    }
    let mut header = vec![
        ("saga_id", saga.saga_id.clone()),
        (
            "saga_type",
            format!(
                "{} (definition v{})",
                saga.saga_type, saga.definition_version
            ),
        ),
        ("status", status),
        ("version", saga.version.to_string()),
        ("created_at", time_text(saga.created_at.as_ref())),
        ("updated_at", time_text(saga.updated_at.as_ref())),
        ("input", value_text(&struct_json(saga.input.as_ref()))),
    ];
    if !saga.correlation_id.is_empty() {
        header.push(("correlation_id", saga.correlation_id.clone()));
    }
    if !saga.idempotency_key.is_empty() {
        header.push(("idempotency_key", saga.idempotency_key.clone()));
    }
    if !saga.failure_reason.is_empty() {
        header.push(("failure_reason", saga.failure_reason.clone()));
    }
    let mut text = aligned(&header, fit);

    let waiting: Vec<&pb::Step> = saga
        .steps
        .iter()
        .filter(|step| is_waiting(saga, step))
        .collect();
    let rows: Vec<Vec<String>> = saga
        .steps
        .iter()
        .map(|step| {
            vec![
                step.name.clone(),
                step.participant.clone(),
                step_status(step.status),
                step.attempts.to_string(),
                step.compensation_attempts.to_string(),
                fields_text(&struct_json(step.output.as_ref())),
            ]
        })
        .collect();
    let lines = table(
        &[
            whole("STEP"),
            whole("PARTICIPANT"),
            whole("STATUS"),
            whole("ATTEMPTS"),
            whole("COMP_ATTEMPTS"),
            cut("OUTPUT"),
        ],
        &rows,
        fit,
    );
    text.push_str("\n\n");
    let mut lines = lines.into_iter();
    text.push_str(&lines.next().unwrap_or_default());
    for (step, line) in saga.steps.iter().zip(lines) {
        text.push('\n');
        text.push_str(&line);
        // A waiting step's error is told in full below.
        if !step.last_error.is_empty() && !waiting.iter().any(|other| other.name == step.name) {
            text.push('\n');
            text.push_str(&fit.line(&format!("  last error: {}", step.last_error)));
        }
    }

    for step in waiting {
        text.push_str("\n\n");
        text.push_str(&waiting_text(saga, step, fit, now));
    }

    if !saga.history.is_empty() {
        text.push_str("\n\n");
        text.push_str(&history_table(&saga.history, fit).join("\n"));
    }
    text
}

/// A step that waits for its next attempt, or keeps failing in a stuck saga.
fn is_waiting(saga: &pb::Saga, step: &pb::Step) -> bool {
    let current = matches!(
        pb::StepStatus::try_from(step.status),
        Ok(pb::StepStatus::Running | pb::StepStatus::Compensating)
    );
    current && (step.next_attempt_at.is_some() || (saga.stuck && !step.last_error.is_empty()))
}

/// What a retrying step waits for, plainly: how often it failed, the last error, when it tries
/// again.
fn waiting_text(saga: &pb::Saga, step: &pb::Step, fit: Fit, now: DateTime<Utc>) -> String {
    let compensating = step.status == pb::StepStatus::Compensating as i32;
    let (what, attempts) = if compensating {
        ("compensation", step.compensation_attempts)
    } else {
        ("step", step.attempts)
    };
    let title = if saga.stuck {
        format!(
            "STUCK: {what} {} ({}) keeps failing",
            step.name, step.participant
        )
    } else {
        format!("retrying: {what} {} ({})", step.name, step.participant)
    };
    let next = match time(step.next_attempt_at.as_ref()) {
        Some(at) => format!(
            "{}, {}",
            at.to_rfc3339_opts(SecondsFormat::Millis, true),
            due_text(at, now)
        ),
        None => "now (an attempt is in flight)".to_owned(),
    };
    let fields = [
        ("  attempts", attempts.to_string()),
        ("  last error", step.last_error.clone()),
        ("  next attempt", next),
    ];
    format!("{}\n{}", fit.line(&title), aligned(&fields, fit))
}

/// The history as a timeline: each event's offset from the first.
fn history_table(history: &[pb::SagaEvent], fit: Fit) -> Vec<String> {
    let first = history
        .first()
        .and_then(|event| time(event.recorded_at.as_ref()));
    let rows: Vec<Vec<String>> = history
        .iter()
        .map(|event| {
            let offset = match (first, time(event.recorded_at.as_ref())) {
                (Some(first), Some(at)) => {
                    format!("+{}", duration_text((at - first).num_milliseconds()))
                }
                _ => String::new(),
            };
            vec![
                event.seq.to_string(),
                offset,
                event.r#type.clone(),
                event.step.clone(),
                event_detail(event),
            ]
        })
        .collect();
    table(
        &[
            whole("SEQ"),
            whole("OFFSET"),
            whole("TYPE"),
            whole("STEP"),
            cut("DETAIL"),
        ],
        &rows,
        fit,
    )
}

/// A document on one line (cut to fit where it is shown).
fn value_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// An object's fields as `key=value key=value`; an empty or absent one as nothing.
fn fields_text(value: &Value) -> String {
    match value {
        Value::Object(fields) => fields
            .iter()
            .map(|(key, value)| format!("{key}={}", value_text(value)))
            .collect::<Vec<_>>()
            .join(" "),
        Value::Null => String::new(),
        other => value_text(other),
    }
}

/// What an event says besides its type and step, for a person: the output of a step, the
/// refusal's code and reason, the error of an attempt and when the next one is due, a reason
/// and who gave it. The start event's data (the definition snapshot) is left to the JSON form.
fn event_detail(event: &pb::SagaEvent) -> String {
    if event.r#type == "saga_started" {
        return String::new();
    }
    let data = struct_json(event.data.as_ref());
    let text = |key: &str| data.get(key).and_then(Value::as_str).unwrap_or_default();
    let mut parts = Vec::new();
    if let Some(attempt) = data.get("attempt").and_then(Value::as_u64)
        && attempt > 1
    {
        parts.push(format!("attempt {attempt}"));
    }
    match (text("code"), text("reason")) {
        ("", "") => {}
        ("", reason) => parts.push(reason.to_owned()),
        (code, "") => parts.push(code.to_owned()),
        (code, reason) => parts.push(format!("{code}: {reason}")),
    }
    if !text("error").is_empty() {
        parts.push(text("error").to_owned());
    }
    match data.get("retry_at") {
        Some(Value::String(at)) => {
            let due = DateTime::parse_from_rfc3339(at).ok();
            match (due, time(event.recorded_at.as_ref())) {
                (Some(due), Some(now)) => parts.push(format!(
                    "retry in {}",
                    duration_text((due.with_timezone(&Utc) - now).num_milliseconds())
                )),
                _ => parts.push(format!("retry at {at}")),
            }
        }
        Some(Value::Null) => parts.push("no attempts left".to_owned()),
        _ => {}
    }
    if !text("requested_by").is_empty() {
        parts.push(format!("by {}", text("requested_by")));
    }
    let output = fields_text(data.get("output").unwrap_or(&Value::Null));
    if !output.is_empty() {
        parts.push(output);
    }
    parts.join("; ")
}

/// `list` for people: a row per saga; under it, why it went backward or failed, and what a
/// stuck saga keeps failing on.
pub(super) fn saga_list_table(sagas: &[pb::Saga], fit: Fit, now: DateTime<Utc>) -> String {
    let rows: Vec<Vec<String>> = sagas
        .iter()
        .map(|saga| {
            vec![
                saga.saga_id.clone(),
                saga.saga_type.clone(),
                saga_status(saga.status),
                saga.version.to_string(),
                time_seconds(saga.updated_at.as_ref()),
            ]
        })
        .collect();
    let mut lines = table(
        &[
            whole("SAGA_ID"),
            cut("TYPE"),
            whole("STATUS"),
            whole("VERSION"),
            whole("UPDATED_AT"),
        ],
        &rows,
        fit,
    )
    .into_iter();
    let mut text = lines.next().unwrap_or_default();
    for (saga, line) in sagas.iter().zip(lines) {
        text.push('\n');
        text.push_str(&line);
        if saga.stuck {
            text.push('\n');
            text.push_str(&fit.line(&format!("  stuck: {}", stuck_summary(saga, now))));
        }
        if !saga.failure_reason.is_empty() {
            text.push('\n');
            text.push_str(&fit.line(&format!("  why: {}", saga.failure_reason)));
        }
    }
    text
}

/// The step a stuck saga keeps failing on, in a few words.
fn stuck_summary(saga: &pb::Saga, now: DateTime<Utc>) -> String {
    let Some(step) = saga.steps.iter().find(|step| is_waiting(saga, step)) else {
        return "a step has kept failing for longer than sagad's --stuck-after".to_owned();
    };
    let compensating = step.status == pb::StepStatus::Compensating as i32;
    let (what, attempts) = if compensating {
        ("compensation of ", step.compensation_attempts)
    } else {
        ("", step.attempts)
    };
    let next = match time(step.next_attempt_at.as_ref()) {
        Some(at) => format!("next attempt {}", due_text(at, now)),
        None => "an attempt in flight".to_owned(),
    };
    format!(
        "{what}{} after {attempts} attempts, {next}; last error: {}",
        step.name, step.last_error
    )
}

/// The header line `watch` prints first in table form.
pub(super) fn event_header(fit: Fit) -> String {
    fit.line(&format!(
        "{:>5}  {:<12}  {:<27}  {:<17}  DETAIL",
        "SEQ", "TIME (UTC)", "TYPE", "STEP"
    ))
}

/// One event of `watch`, in columns that line up with [`event_header`].
pub(super) fn event_line(event: &pb::SagaEvent, fit: Fit) -> String {
    let at = time(event.recorded_at.as_ref())
        .map(|at| at.format("%H:%M:%S%.3f").to_string())
        .unwrap_or_default();
    fit.line(
        format!(
            "{:>5}  {:<12}  {:<27}  {:<17}  {}",
            event.seq,
            at,
            event.r#type,
            event.step,
            event_detail(event)
        )
        .trim_end(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_have_short_names() {
        assert_eq!(saga_status(pb::SagaStatus::Completed as i32), "COMPLETED");
        assert_eq!(
            step_status(pb::StepStatus::CompensationFailed as i32),
            "COMPENSATION_FAILED"
        );
        assert_eq!(saga_status(42), "UNKNOWN_42");
    }

    #[test]
    fn tables_align_their_columns() {
        let lines = table(
            &[whole("A"), whole("LONG_HEADER")],
            &[
                vec!["value".into(), "x".into()],
                vec!["v".into(), "y\nz".into()],
            ],
            Fit::new(false),
        );
        assert_eq!(lines.join("\n"), "A      LONG_HEADER\nvalue  x\nv      y z");
    }

    #[test]
    fn tables_fit_by_cutting_the_long_columns_unless_wide() {
        let id = "0".repeat(36);
        let rows = vec![
            vec![id.clone(), "short".into(), "e".repeat(200)],
            vec![id.clone(), "o".repeat(80), "tiny".into()],
        ];
        let columns = [whole("ID"), cut("OUTPUT"), cut("ERROR")];
        let lines = table(&columns, &rows, Fit::new(false));
        for line in &lines {
            assert!(line.chars().count() <= MAX_WIDTH, "{line}");
        }
        // The id is whole; the two long columns share the rest.
        assert!(lines[1].starts_with(&format!("{id}  short")), "{lines:?}");
        assert!(lines[1].ends_with('…'), "{lines:?}");
        assert!(lines[2].contains('…'), "{lines:?}");
        assert_eq!(lines[1].chars().count(), MAX_WIDTH);

        let wide = table(&columns, &rows, Fit::new(true));
        assert!(wide[1].ends_with(&"e".repeat(200)), "{wide:?}");
        assert!(!wide.iter().any(|line| line.contains('…')));
    }

    #[test]
    fn a_cut_keeps_the_width_and_ends_with_an_ellipsis() {
        let fit = Fit::new(false);
        assert_eq!(fit.cut("abcdef", 4), "abc…");
        assert_eq!(fit.cut("abcd", 4), "abcd");
        assert_eq!(fit.cut("ééééé", 3), "éé…");
        assert_eq!(Fit::new(true).cut("abcdef", 4), "abcdef");
        assert_eq!(fit.line(&"x".repeat(150)).chars().count(), MAX_WIDTH);
    }

    #[test]
    fn whole_doubles_show_as_integers() {
        let value = json!({"a": 1250.0, "b": [2.5, 3.0], "c": {"d": -1.0}, "e": "1.0"});
        assert_eq!(
            whole_numbers(value),
            json!({"a": 1250, "b": [2.5, 3], "c": {"d": -1}, "e": "1.0"})
        );
    }

    #[test]
    fn durations_read_easily() {
        assert_eq!(duration_text(250), "0.250s");
        assert_eq!(duration_text(42_049), "42.0s");
        assert_eq!(duration_text(725_000), "12m05s");
        assert_eq!(duration_text(10_920_000), "3h02m");
        assert_eq!(duration_text(-1_500), "-1.500s");
    }

    fn timestamp(seconds: i64, nanos: i32) -> Option<pbjson_types::Timestamp> {
        Some(pbjson_types::Timestamp { seconds, nanos })
    }

    fn event(event_type: &str, data: Value) -> pb::SagaEvent {
        pb::SagaEvent {
            seq: 2,
            r#type: event_type.to_owned(),
            step: "charge_payment".to_owned(),
            data: serde_json::from_value(data).ok(),
            recorded_at: timestamp(1_700_000_000, 0),
        }
    }

    #[test]
    fn event_details_say_what_happened() {
        let succeeded = event(
            "step_succeeded",
            json!({"step": "charge_payment", "attempt": 1.0, "output": {"payment_id": "p-1"}}),
        );
        assert_eq!(event_detail(&succeeded), "payment_id=p-1");
        let refused = event(
            "step_refused",
            json!({"attempt": 2.0, "code": "INSUFFICIENT_FUNDS", "reason": "too poor"}),
        );
        assert_eq!(
            event_detail(&refused),
            "attempt 2; INSUFFICIENT_FUNDS: too poor"
        );
        let retried = event(
            "step_attempt_failed",
            json!({"attempt": 1.0, "error": "UNAVAILABLE", "retry_at": "2023-11-14T22:13:20.2Z"}),
        );
        assert_eq!(event_detail(&retried), "UNAVAILABLE; retry in 0.200s");
        let exhausted = event(
            "step_attempt_failed",
            json!({"attempt": 6.0, "error": "timeout", "retry_at": null}),
        );
        assert_eq!(
            event_detail(&exhausted),
            "attempt 6; timeout; no attempts left"
        );
        let retried = event(
            "retry_requested",
            json!({"reason": "refunds work again", "requested_by": "client 127.0.0.1:5"}),
        );
        assert_eq!(
            event_detail(&retried),
            "refunds work again; by client 127.0.0.1:5"
        );
        let started = event("saga_started", json!({"input": {"a": 1.0}}));
        assert_eq!(event_detail(&started), "");
    }

    fn stuck_saga() -> pb::Saga {
        pb::Saga {
            saga_id: "0190a0a0-0000-7000-8000-000000000000".to_owned(),
            saga_type: "order_fulfillment".to_owned(),
            definition_version: 1,
            status: pb::SagaStatus::Running as i32,
            stuck: true,
            version: 9,
            steps: vec![
                pb::Step {
                    name: "create_order".to_owned(),
                    participant: "order".to_owned(),
                    status: pb::StepStatus::Succeeded as i32,
                    attempts: 1,
                    output: serde_json::from_value(json!({"order_id": "o".repeat(120)})).ok(),
                    ..Default::default()
                },
                pb::Step {
                    name: "charge_payment".to_owned(),
                    participant: "payment".to_owned(),
                    status: pb::StepStatus::Running as i32,
                    attempts: 7,
                    last_error: format!(
                        "UNAVAILABLE: {}",
                        "the payment service is down ".repeat(6)
                    ),
                    next_attempt_at: timestamp(1_700_000_003, 200_000_000),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn a_stuck_step_is_shown_plainly_and_fits() {
        let saga = stuck_saga();
        let now = DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default();
        let text = saga_table(&saga, Fit::new(false), now);
        println!("{text}");
        for line in text.lines() {
            assert!(line.chars().count() <= MAX_WIDTH, "{line}");
        }
        assert!(text.contains("RUNNING (stuck"), "{text}");
        assert!(
            text.contains("STUCK: step charge_payment (payment) keeps failing"),
            "{text}"
        );
        assert!(text.contains("attempts      7"), "{text}");
        assert!(
            text.contains("last error    UNAVAILABLE: the payment"),
            "{text}"
        );
        assert!(
            text.contains("next attempt  2023-11-14T22:13:23.200Z, in 3.200s"),
            "{text}"
        );
        assert!(text.contains('…'), "{text}");
        let wide = saga_table(&saga, Fit::new(true), now);
        assert!(wide.contains(&"o".repeat(120)), "{wide}");
        assert!(!wide.contains('…'), "{wide}");

        let list = saga_list_table(&[saga], Fit::new(false), now);
        println!("{list}");
        assert!(
            list.contains("  stuck: charge_payment after 7 attempts, next attempt in 3.200s"),
            "{list}"
        );
        for line in list.lines() {
            assert!(line.chars().count() <= MAX_WIDTH, "{line}");
        }
    }

    #[test]
    fn a_failed_saga_in_a_list_says_why() {
        let saga = pb::Saga {
            saga_id: "0190a0a0-0000-7000-8000-000000000001".to_owned(),
            saga_type: "order_fulfillment".to_owned(),
            status: pb::SagaStatus::Compensated as i32,
            failure_reason: "charge_payment refused: INSUFFICIENT_FUNDS".to_owned(),
            updated_at: timestamp(1_700_000_000, 0),
            ..Default::default()
        };
        let now = DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default();
        let list = saga_list_table(&[saga], Fit::new(false), now);
        assert!(
            list.ends_with("\n  why: charge_payment refused: INSUFFICIENT_FUNDS"),
            "{list}"
        );
        assert!(list.contains("2023-11-14T22:13:20Z"), "{list}");
    }
}
