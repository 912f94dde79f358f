//! What sagad and the participants built on its SDK share about telemetry: log lines on
//! stderr (text, or one JSON object per line carrying the fields of the spans they happened
//! in, a saga's `saga_id` and `correlation_id` among them), and one trace per saga ([`trace`]),
//! exported by OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` says where.

pub mod trace;

use std::io::IsTerminal as _;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with the fields of the spans it happened in.
    Json,
}

/// The process's telemetry once set up; [`Telemetry::shutdown`] sends the last spans.
#[must_use = "shut it down at exit, or the last spans are lost"]
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Logs to stderr in `format`, filtered by `RUST_LOG` (default `info`), and exports spans
    /// by OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, as `OTEL_SERVICE_NAME` or else
    /// `service`. Call it within the Tokio runtime the exporter's channel is to live on.
    pub fn init(format: LogFormat, service: &str) -> Result<Telemetry, String> {
        let traces = trace::otlp_provider(service)?;
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let lines = match format {
            LogFormat::Text => tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .boxed(),
            LogFormat::Json => json_layer(std::io::stderr).boxed(),
        }
        .with_filter(filter);
        // Only the spans that say their `otel.kind` make up the trace (a saga's attempts, the
        // participants' calls); the others (a whole saga's driver) only label the log lines.
        // The statements a call ran (sqlx's debug events) go into its span.
        let exported = traces.as_ref().map(|provider| {
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("sagad"))
                .with_filter(EnvFilter::new("info,sqlx::query=debug"))
                .with_filter(tracing_subscriber::filter::filter_fn(|metadata| {
                    !metadata.is_span() || metadata.fields().field("otel.kind").is_some()
                }))
        });
        tracing_subscriber::registry()
            .with(lines)
            .with(exported)
            .init();
        Ok(Telemetry { traces })
    }

    /// Sends the spans still waiting in the exporter's batch.
    pub fn shutdown(self) -> Result<(), String> {
        match self.traces {
            Some(traces) => traces.shutdown().map_err(|error| error.to_string()),
            None => Ok(()),
        }
    }
}

/// One JSON object per line: the event's fields flattened into it, and `spans` listing each
/// span the event happened in, outermost first, with its fields.
pub fn json_layer<S, W>(writer: W) -> impl tracing_subscriber::Layer<S> + Send + Sync
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(true)
}
