//! One trace per saga. A saga keeps the W3C `traceparent` it descends from in its log (the
//! caller's, when `StartSaga` carried one; else a new trace), every attempt of a step is a span
//! under it, and each participant call carries the attempt's `traceparent` in its metadata, so
//! a participant continues the same trace. Spans are exported by OTLP only when the process
//! set up an exporter (`OTEL_EXPORTER_OTLP_ENDPOINT`); the trace context travels either way.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The metadata key (and header) of the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// The valid `traceparent` a request's metadata carries, if any (an invalid one is ignored, as
/// W3C says).
pub fn from_metadata(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get(TRACEPARENT)
        .and_then(|value| value.to_str().ok())
        .filter(|value| is_valid(value))
        .map(str::to_owned)
}

/// The OTLP (gRPC) exporter of this process's spans, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
/// its traces-only sibling) is set; `None` otherwise. The service is named by
/// `OTEL_SERVICE_NAME`, else `default_service`. Spans leave in batches (`OTEL_BSP_*`); shut
/// the provider down at exit to send the last ones.
pub fn otlp_provider(
    default_service: &str,
) -> Result<Option<opentelemetry_sdk::trace::SdkTracerProvider>, String> {
    let configured = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var(name).is_ok_and(|value| !value.trim().is_empty()));
    if !configured {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|error| format!("OTEL_EXPORTER_OTLP_ENDPOINT: {error}"))?;
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|name| !name.trim().is_empty())
        .unwrap_or_else(|| default_service.to_owned());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    Ok(Some(
        opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    ))
}

/// Whether `value` is a W3C `traceparent` of version 00 naming a real trace and span.
pub fn is_valid(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |part: &str, len: usize| {
        part.len() == len
            && part
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    matches!(parts.as_slice(), [version, trace, span, flags]
        if *version == "00" && hex(trace, 32) && hex(span, 16) && hex(flags, 2)
            && trace.bytes().any(|b| b != b'0') && span.bytes().any(|b| b != b'0'))
}

/// A new trace, sampled, for a saga whose caller sent none.
pub fn new_trace() -> String {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = &uuid::Uuid::new_v4().simple().to_string()[..16];
    format!("00-{trace}-{span}-01")
}

/// Makes `span` a child of the span `traceparent` names (for the exported trace; the log's
/// parent stays what it is). Without an exporter this does nothing.
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    if context.span().span_context().is_valid() {
        // Only fails when no OpenTelemetry layer is installed: nothing is exported then.
        let _ = span.set_parent(context);
    }
}

/// The `traceparent` of `span` when it is exported, else `fallback`: the saga's own, so the
/// participant still sees which trace the call belongs to.
pub fn traceparent_of(span: &tracing::Span, fallback: Option<&str>) -> Option<String> {
    let context = span.context();
    if context.span().span_context().is_valid() {
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(&context, &mut carrier);
        if let Some(traceparent) = carrier.remove(TRACEPARENT) {
            return Some(traceparent);
        }
    }
    fallback.map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_checked_and_new_ones_are_valid() {
        assert!(is_valid(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(!is_valid(bad), "{bad}");
        }
        let fresh = new_trace();
        assert!(is_valid(&fresh), "{fresh}");
        assert_ne!(fresh, new_trace());
    }

    #[test]
    fn without_an_exporter_the_saga_traceparent_travels_as_it_is() {
        let span = tracing::info_span!("attempt");
        let saga = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        continue_trace(&span, saga);
        assert_eq!(traceparent_of(&span, Some(saga)).as_deref(), Some(saga));
    }
}
