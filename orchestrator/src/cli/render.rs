//! The wire types as `sagactl` shows them: JSON objects with snake_case keys and short enum
//! names, and plain-text tables.

use chrono::{DateTime, SecondsFormat, Utc};
use sagad_proto::v1 as pb;
use serde_json::{Value, json};

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

fn time(at: Option<&pbjson_types::Timestamp>) -> Option<DateTime<Utc>> {
    let at = at?;
    DateTime::from_timestamp(at.seconds, u32::try_from(at.nanos).unwrap_or_default())
}

fn time_text(at: Option<&pbjson_types::Timestamp>) -> String {
    time(at)
        .map(|at| at.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_default()
}

fn time_json(at: Option<&pbjson_types::Timestamp>) -> Value {
    time(at).map_or(Value::Null, |at| {
        Value::String(at.to_rfc3339_opts(SecondsFormat::Millis, true))
    })
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
        "version": saga.version,
        "created_at": time_json(saga.created_at.as_ref()),
        "updated_at": time_json(saga.updated_at.as_ref()),
    })
}

/// Aligned columns under a header; cells never span lines.
pub(super) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let clean = |cell: &str| cell.replace(['\n', '\r', '\t'], " ");
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| clean(cell)).collect())
        .collect();
    let mut widths: Vec<usize> = headers
        .iter()
        .map(|header| header.chars().count())
        .collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (index, cell) in cells.enumerate() {
            if index > 0 {
                text.push_str("  ");
            }
            let width = widths.get(index).copied().unwrap_or_default();
            text.push_str(&format!("{cell:<width$}"));
        }
        text.trim_end().to_owned()
    };
    let mut text = line(&mut headers.iter().copied());
    for row in &rows {
        text.push('\n');
        text.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    text
}

/// Fields as `key  value` lines, in the order given.
pub(super) fn key_values(fields: &[(&str, Value)]) -> String {
    let width = fields
        .iter()
        .map(|(key, _)| key.len())
        .max()
        .unwrap_or_default();
    fields
        .iter()
        .map(|(key, value)| {
            let value = match value {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            format!("{key:<width$}  {value}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `get`, `cancel` and `retry` for people: the saga, its steps, its history as a timeline.
pub(super) fn saga_table(saga: &pb::Saga) -> String {
    let mut header = vec![
        ("saga_id", saga.saga_id.clone()),
        (
            "saga_type",
            format!(
                "{} (definition v{})",
                saga.saga_type, saga.definition_version
            ),
        ),
        ("status", saga_status(saga.status)),
        ("version", saga.version.to_string()),
        ("created_at", time_text(saga.created_at.as_ref())),
        ("updated_at", time_text(saga.updated_at.as_ref())),
    ];
    header.push(("input", brief(&struct_json(saga.input.as_ref()))));
    if !saga.correlation_id.is_empty() {
        header.push(("correlation_id", saga.correlation_id.clone()));
    }
    if !saga.idempotency_key.is_empty() {
        header.push(("idempotency_key", saga.idempotency_key.clone()));
    }
    if !saga.failure_reason.is_empty() {
        header.push(("failure_reason", saga.failure_reason.clone()));
    }
    let width = header
        .iter()
        .map(|(key, _)| key.len())
        .max()
        .unwrap_or_default();
    let mut text = header
        .iter()
        .map(|(key, value)| format!("{key:<width$}  {value}"))
        .collect::<Vec<_>>()
        .join("\n");

    let steps: Vec<Vec<String>> = saga
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
                step.last_error.clone(),
            ]
        })
        .collect();
    text.push_str("\n\n");
    text.push_str(&table(
        &[
            "STEP",
            "PARTICIPANT",
            "STATUS",
            "ATTEMPTS",
            "COMP_ATTEMPTS",
            "OUTPUT",
            "LAST_ERROR",
        ],
        &steps,
    ));

    if !saga.history.is_empty() {
        let first = saga
            .history
            .first()
            .and_then(|event| time(event.recorded_at.as_ref()));
        let history: Vec<Vec<String>> = saga
            .history
            .iter()
            .map(|event| {
                let at = time(event.recorded_at.as_ref());
                let offset = match (first, at) {
                    (Some(first), Some(at)) => {
                        format!("+{:.3}s", (at - first).num_milliseconds() as f64 / 1000.0)
                    }
                    _ => String::new(),
                };
                vec![
                    event.seq.to_string(),
                    time_text(event.recorded_at.as_ref()),
                    offset,
                    event.r#type.clone(),
                    event.step.clone(),
                    event_detail(event),
                ]
            })
            .collect();
        text.push_str("\n\n");
        text.push_str(&table(
            &["SEQ", "TIME", "OFFSET", "TYPE", "STEP", "DETAIL"],
            &history,
        ));
    }
    text
}

/// The longest document a table cell shows before it is cut short.
const BRIEF_CHARS: usize = 160;

/// A document on one line, cut short if long (the JSON form has it whole).
fn brief(value: &Value) -> String {
    let text = match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    if text.chars().count() <= BRIEF_CHARS {
        return text;
    }
    let mut short: String = text.chars().take(BRIEF_CHARS).collect();
    short.push('…');
    short
}

/// An object's fields as `key=value key=value`; an empty or absent one as nothing.
fn fields_text(value: &Value) -> String {
    match value {
        Value::Object(fields) => brief(&Value::String(
            fields
                .iter()
                .map(|(key, value)| format!("{key}={}", brief(value)))
                .collect::<Vec<_>>()
                .join(" "),
        )),
        Value::Null => String::new(),
        other => brief(other),
    }
}

/// What an event says besides its type and step, for a person: the output of a step, the
/// refusal's code and reason, the error of an attempt and when the next one is due, a reason.
/// The start event's data (the definition snapshot) is left to the JSON form.
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
                    "retry in {:.3}s",
                    (due.with_timezone(&Utc) - now).num_milliseconds() as f64 / 1000.0
                )),
                _ => parts.push(format!("retry at {at}")),
            }
        }
        Some(Value::Null) => parts.push("no attempts left".to_owned()),
        _ => {}
    }
    let output = fields_text(data.get("output").unwrap_or(&Value::Null));
    if !output.is_empty() {
        parts.push(output);
    }
    parts.join("; ")
}

/// `list` for people.
pub(super) fn saga_list_table(sagas: &[pb::Saga]) -> String {
    let rows: Vec<Vec<String>> = sagas
        .iter()
        .map(|saga| {
            vec![
                saga.saga_id.clone(),
                saga.saga_type.clone(),
                saga_status(saga.status),
                saga.version.to_string(),
                time_text(saga.updated_at.as_ref()),
            ]
        })
        .collect();
    table(
        &["SAGA_ID", "TYPE", "STATUS", "VERSION", "UPDATED_AT"],
        &rows,
    )
}

/// The header line `watch` prints first in table form.
pub(super) fn event_header() -> String {
    format!("{:>5}  {:<24}  {:<24}  STEP", "SEQ", "TIME", "TYPE")
}

/// One event of `watch`, in columns that line up with [`event_header`].
pub(super) fn event_line(event: &pb::SagaEvent) -> String {
    format!(
        "{:>5}  {:<24}  {:<24}  {}",
        event.seq,
        time_text(event.recorded_at.as_ref()),
        event.r#type,
        event.step
    )
    .trim_end()
    .to_owned()
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
        let text = table(
            &["A", "LONG_HEADER"],
            &[
                vec!["value".into(), "x".into()],
                vec!["v".into(), "y\nz".into()],
            ],
        );
        assert_eq!(text, "A      LONG_HEADER\nvalue  x\nv      y z");
    }

    #[test]
    fn whole_doubles_show_as_integers() {
        let value = json!({"a": 1250.0, "b": [2.5, 3.0], "c": {"d": -1.0}, "e": "1.0"});
        assert_eq!(
            whole_numbers(value),
            json!({"a": 1250, "b": [2.5, 3], "c": {"d": -1}, "e": "1.0"})
        );
    }

    fn event(event_type: &str, data: Value) -> pb::SagaEvent {
        pb::SagaEvent {
            seq: 2,
            r#type: event_type.to_owned(),
            step: "charge_payment".to_owned(),
            data: serde_json::from_value(data).ok(),
            recorded_at: Some(pbjson_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
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
        let started = event("saga_started", json!({"input": {"a": 1.0}}));
        assert_eq!(event_detail(&started), "");
    }

    #[test]
    fn long_documents_are_cut_short() {
        let long = "x".repeat(BRIEF_CHARS + 10);
        let text = brief(&Value::String(long));
        assert_eq!(text.chars().count(), BRIEF_CHARS + 1);
        assert!(text.ends_with('…'));
        assert_eq!(fields_text(&json!({"a": 1, "b": "two"})), "a=1 b=two");
        assert_eq!(fields_text(&Value::Null), "");
    }
}
