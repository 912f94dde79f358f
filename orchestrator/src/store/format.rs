//! The stored log as a format with a version. Each row of `saga_events` says the format its
//! `data` was written in; a release reads every format up to its own, so the logs of earlier
//! releases (committed as fixtures under `tests/fixtures/logs/`) stay readable for good.
//!
//! Format 1 is the serde form of [`Event`]. It grows only by fields that old logs lack and
//! that read back as a default (`#[serde(default)]`): a new field never turns an old log into
//! a corrupt one. A change that cannot be written so (a field renamed or retyped, an event
//! split) takes format 2, with its own decoder here beside the old one.
//!
//! A log need not hold every failed attempt: those the core keeps out of it leave gaps in the
//! attempt numbers of `step_attempt_failed` and `compensation_attempt_failed`, which every
//! release folds alike (an event's attempt number is taken as it is).

use serde_json::Value;

use crate::saga::Event;

/// The format this release writes.
pub const LOG_FORMAT: i16 = 1;

/// An event as stored: its JSON text.
pub(super) fn encode_event(event: &Event) -> Result<String, serde_json::Error> {
    serde_json::to_string(event)
}

/// A stored event, in the format it was written in.
pub(super) fn decode_event(format: i16, data: Value) -> Result<Event, String> {
    match format {
        1 => serde_json::from_value(data).map_err(|error| error.to_string()),
        other => Err(format!(
            "stored in log format {other}, which this release cannot read (it reads 1 to \
             {LOG_FORMAT}): was it written by a newer sagad?"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_format_one_event_reads_back_and_unknown_formats_are_named() {
        let data = json!({"type": "step_succeeded", "step": "a", "attempt": 1, "output": {}});
        assert!(matches!(
            decode_event(1, data.clone()),
            Ok(Event::StepSucceeded { .. })
        ));
        let error = decode_event(LOG_FORMAT + 1, data).err().unwrap_or_default();
        assert!(error.contains("log format 2"), "{error}");
    }
}
