//! The participant SDK: serves `sagad.participant.v1.Participant` around a [`StepHandler`] and
//! makes a participant correct on its own: exactly-once effects do not depend on the
//! orchestrator sending each command once.
//!
//! Each command's effect commits in ONE transaction of the participant's database with a row of
//! the SDK's table (`sagad_processed_commands`, keyed by idempotency key). Commands that arrive
//! together share that transaction (group commit), each in a savepoint of its own, so a busy
//! participant pays one durable commit for many commands and one command's failure undoes only
//! its own writes:
//!
//! - a repeated key gets the recorded reply and changes nothing; concurrent duplicates take
//!   turns on a lock of the step, so exactly one takes effect;
//! - a `Compensate` whose execute key never took effect succeeds without calling the handler and
//!   leaves a tombstone for the execute key: a late `Execute` is refused (`COMPENSATED`) and
//!   changes nothing;
//! - [`StepError::Refused`] rolls back the handler's writes and is the reply (recorded, for an
//!   execute); [`StepError::Internal`] rolls back the handler's writes, records nothing, and
//!   answers gRPC `INTERNAL`, so the orchestrator retries. A handler that goes on after one of
//!   its statements failed is answered `INTERNAL` the same way; one that panics fails its whole
//!   batch (`INTERNAL` for each command, nothing recorded).
//!
//! [`run`] is a participant's whole `main`: the common flags ([`CommonArgs`]), the database (created if missing, migrated), fault injection, tracing (text or JSON logs), health,
//! and graceful shutdown on SIGTERM/SIGINT. A complete minimal participant:
//!
//! ```no_run
//! use std::process::ExitCode;
//!
//! use sagad_participant::{Parts, ServiceSpec, StepCommandView, StepError, StepHandler};
//! use serde_json::{Value, json};
//! use sqlx::PgConnection;
//!
//! struct Greeter;
//!
//! #[tonic::async_trait]
//! impl StepHandler for Greeter {
//!     async fn execute(&self, command: &StepCommandView, conn: &mut PgConnection)
//!         -> Result<Value, StepError> {
//!         let name = command.input_str("name")?;
//!         if name.is_empty() {
//!             return Err(StepError::refused("NO_NAME", "nobody to greet"));
//!         }
//!         // Runtime-checked SQL on the SDK's transaction: the effect and the key commit together.
//!         sqlx::query("insert into greetings (saga_id, name) values ($1, $2)")
//!             .bind(&command.saga_id)
//!             .bind(name)
//!             .execute(&mut *conn)
//!             .await?;
//!         Ok(json!({ "greeting": format!("hello, {name}") }))
//!     }
//!
//!     async fn compensate(&self, command: &StepCommandView, conn: &mut PgConnection)
//!         -> Result<Value, StepError> {
//!         sqlx::query("delete from greetings where saga_id = $1")
//!             .bind(&command.saga_id)
//!             .execute(&mut *conn)
//!             .await?;
//!         Ok(Value::Null)
//!     }
//! }
//!
//! fn main() -> ExitCode {
//!     // A real service embeds its folder: `sqlx::migrate!("../../migrations/greeter")`.
//!     let spec = ServiceSpec::new("greeter-service", "127.0.0.1:50070", sqlx::migrate::Migrator::DEFAULT);
//!     // No flags of its own (`NoArgs`), no read service (`Parts::new`).
//!     sagad_participant::run(spec, |_: sagad_participant::NoArgs, _pool| async {
//!         Ok(Parts::new(Greeter))
//!     })
//! }
//! ```

mod batch;
mod handler;
mod ledger;
mod service;
pub mod testing;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches};
use sagad_proto::participant::v1::participant_server::ParticipantServer;
pub use sagad_tls::{ServerTls, ServerTlsFiles};
use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;

pub use batch::COMPENSATED;
pub use handler::{StepCommandView, StepError, StepHandler};
pub use ledger::{TABLE as LEDGER_TABLE, migrate as migrate_ledger};
pub use service::{Faults, ParticipantService};

/// The flags every participant takes: `--listen`, `--database-url`, and the fault injection.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// gRPC address; port 0 takes a free port, logged as `participant is serving listen=ADDR`
    #[arg(long, env = "LISTEN")]
    pub listen: Option<SocketAddr>,
    /// The participant's own database (created if missing, migrated at start)
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// Fraction (0 to 1) of Execute/Compensate calls that answer UNAVAILABLE before doing anything
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub transient_failure_rate: f64,
    /// Every Execute/Compensate waits this many milliseconds first
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Log lines as `text` or `json` (one object per line); the filter is RUST_LOG (default
    /// `info`)
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Serve gRPC over TLS with this certificate chain (PEM); re-read on SIGHUP
    #[arg(long, env = "TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM); re-read on SIGHUP
    #[arg(long, env = "TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates (sagad's) signed by this CA (PEM): mutual TLS
    #[arg(long, env = "TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

pub use sagad_telemetry::LogFormat;

impl CommonArgs {
    /// The server's TLS, read and checked, when the flags ask for it.
    pub fn tls(&self) -> Result<Option<ServerTls>, sagad_tls::TlsError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => ServerTls::load(ServerTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            })
            .map(Some),
            _ => Ok(None),
        }
    }

    pub fn faults(&self) -> Faults {
        Faults {
            transient_failure_rate: self.transient_failure_rate,
            latency: Duration::from_millis(self.latency_ms),
        }
    }
}

fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("{rate} is not between 0 and 1"))
    }
}

/// A participant with no flags beyond the common ones.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct NoArgs {}

/// The flags of one participant: the common ones and its own.
#[derive(Debug, clap::Parser)]
struct Cli<A: clap::Args> {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    extra: A,
}

/// Who the participant is.
#[derive(Debug)]
pub struct ServiceSpec {
    /// The binary's name, for usage and errors.
    pub name: &'static str,
    /// What the service is, the first lines of its `--help`.
    pub about: &'static str,
    /// The `--listen` default, shown in `--help`.
    pub default_listen: &'static str,
    /// The service's own migrations (`sqlx::migrate!("../../migrations/<service>")`).
    pub migrator: Migrator,
}

impl ServiceSpec {
    pub fn new(name: &'static str, default_listen: &'static str, migrator: Migrator) -> Self {
        Self {
            name,
            about: "A participant of sagad's sagas: serves sagad.participant.v1.Participant",
            default_listen,
            migrator,
        }
    }

    /// Says what the service is in its `--help`.
    pub fn about(mut self, about: &'static str) -> Self {
        self.about = about;
        self
    }
}

/// What a participant serves: its handler, and any other gRPC services (its read service).
pub struct Parts<H> {
    pub handler: H,
    pub routes: Routes,
}

impl<H: StepHandler> Parts<H> {
    pub fn new(handler: H) -> Self {
        Self {
            handler,
            routes: Routes::default(),
        }
    }

    /// Serves `routes` beside the participant service, e.g.
    /// `Routes::new(OrdersServer::new(reader))`.
    pub fn with_routes(mut self, routes: Routes) -> Self {
        self.routes = routes;
        self
    }
}

/// A participant's whole `main`: parses the common flags and `A`, connects and migrates,
/// lets `build` make the handler and extra services, serves until SIGTERM/SIGINT. Exits 2 on a
/// bad flag and 1 on any other error, each with one line on stderr.
pub fn run<A, H, F, Fut>(spec: ServiceSpec, build: F) -> ExitCode
where
    A: clap::Args + clap::FromArgMatches,
    H: StepHandler,
    F: FnOnce(A, PgPool) -> Fut,
    Fut: Future<Output = anyhow::Result<Parts<H>>>,
{
    let name = spec.name;
    let parsed = Cli::<A>::command()
        .name(name)
        .about(spec.about)
        .mut_arg("listen", |arg| arg.default_value(spec.default_listen))
        .try_get_matches()
        .and_then(|matches| Cli::<A>::from_arg_matches(&matches));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(error) => {
            use clap::error::ErrorKind;
            if matches!(
                error.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) {
                let _ = error.print();
                return ExitCode::SUCCESS;
            }
            let rendered = error.render().to_string();
            let reason: Vec<&str> = rendered
                .lines()
                .take_while(|line| !line.is_empty() && !line.starts_with("Usage:"))
                .map(str::trim)
                .collect();
            eprintln!("{name}: {}", reason.join(" "));
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{name}: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // Log lines, and spans exported by OTLP when asked; the exporter lives on the runtime.
    let telemetry = {
        let _runtime = runtime.enter();
        match sagad_telemetry::Telemetry::init(cli.common.log_format, name) {
            Ok(telemetry) => telemetry,
            Err(error) => {
                eprintln!("{name}: {error}");
                return ExitCode::from(2);
            }
        }
    };
    let result = runtime.block_on(async move {
        // Clap fills in the default (set above); this only avoids trusting that blindly.
        let listen = match cli.common.listen {
            Some(listen) => listen,
            None => spec
                .default_listen
                .parse()
                .with_context(|| format!("--listen default {}", spec.default_listen))?,
        };
        let tls = cli.common.tls()?;
        if let Some(tls) = &tls {
            tokio::spawn(reload_on_hangup(tls.clone()));
        }
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("--listen {listen}"))?;
        let pool = connect(
            &cli.common.database_url,
            &spec.migrator,
            Duration::from_secs(30),
        )
        .await
        .context("--database-url")?;
        let faults = cli.common.faults();
        let parts = build(cli.extra, pool.clone()).await?;
        serve(pool, parts, faults, listener, tls, shutdown_signal()).await
    });
    if let Err(error) = telemetry.shutdown() {
        eprintln!("{name}: exporting the last spans: {error}");
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let text = format!("{error:#}");
            eprintln!(
                "{name}: {}",
                text.split_whitespace().collect::<Vec<_>>().join(" ")
            );
            ExitCode::FAILURE
        }
    }
}

/// Connects, creating the database if it is missing and retrying for up to `max_wait` while
/// the server is unreachable; then runs the service's migrations and creates the SDK's table.
pub async fn connect(url: &str, migrator: &Migrator, max_wait: Duration) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url.parse()?;
    let deadline = tokio::time::Instant::now() + max_wait;
    let mut delay = Duration::from_millis(100);
    let pool = loop {
        match try_connect(url, options.clone()).await {
            Ok(pool) => break pool,
            Err(error) => {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return Err(error.into());
                }
                tracing::warn!(%error, "database not reachable yet; retrying");
                tokio::time::sleep(delay.min(deadline - now)).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    };
    migrator.run(&pool).await.context("migrations")?;
    ledger::migrate(&pool).await.context("the SDK's table")?;
    Ok(pool)
}

async fn try_connect(url: &str, options: PgConnectOptions) -> Result<PgPool, sqlx::Error> {
    if !Postgres::database_exists(url).await? {
        match Postgres::create_database(url).await {
            Ok(()) => {}
            // Another process created it first.
            Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("42P04") => {}
            Err(error) => return Err(error),
        }
    }
    PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
}

/// Reads the TLS files again on each SIGHUP, for the connections to come.
async fn reload_on_hangup(tls: ServerTls) {
    let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        tracing::warn!("cannot listen for SIGHUP: the TLS files are read once");
        return;
    };
    while hangup.recv().await.is_some() {
        match tls.reload() {
            Ok(()) => tracing::info!("the TLS files are read again; new connections use them"),
            Err(error) => {
                tracing::error!(%error, "the TLS files cannot be read; the ones in force stay");
            }
        }
    }
}

/// Serves the participant (and `parts.routes`) on `listener`, over `tls` when given, with
/// health, until `shutdown` resolves: then health says NOT_SERVING, calls in flight finish,
/// and it returns.
pub async fn serve<H: StepHandler>(
    pool: PgPool,
    parts: Parts<H>,
    faults: Faults,
    listener: TcpListener,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ParticipantServer<ParticipantService<H>>>()
        .await;
    let participant =
        ParticipantServer::new(ParticipantService::new(pool.clone(), parts.handler, faults));
    tracing::info!(listen = %listener.local_addr()?, tls = tls.is_some(), "participant is serving");
    let shutdown_health = health.clone();
    let stopped = async move {
        shutdown.await;
        tracing::info!("shutting down: finishing calls in flight");
        shutdown_health
            .set_not_serving::<ParticipantServer<ParticipantService<H>>>()
            .await;
    };
    let router = tonic::transport::Server::builder()
        .add_routes(parts.routes)
        .add_service(health_service)
        .add_service(participant);
    match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(tls.incoming(listener), stopped)
                .await?;
        }
        None => {
            // Replies go out at once: without nodelay, Nagle's algorithm holds them back for
            // the peer's delayed ACK (tens of milliseconds per call).
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            router
                .serve_with_incoming_shutdown(incoming, stopped)
                .await?;
        }
    }
    pool.close().await;
    tracing::info!("participant stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = interrupt => {}
                _ = terminate.recv() => {}
            }
        }
        Err(_) => {
            let _ = interrupt.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use sagad_proto::participant::v1::StepCommand;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    /// Collects what a subscriber writes.
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_json_line_inside_a_call_carries_its_saga_and_correlation_ids() {
        let written = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&written);
        let subscriber = tracing_subscriber::registry()
            .with(sagad_telemetry::json_layer(move || Sink(Arc::clone(&sink))))
            .with(tracing_subscriber::EnvFilter::new("info"));
        let mut request = tonic::Request::new(StepCommand {
            step: "charge_payment".into(),
            attempt: 2,
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("x-saga-id", "0190-saga".parse().unwrap());
        request
            .metadata_mut()
            .insert("x-correlation-id", "order-7".parse().unwrap());
        tracing::subscriber::with_default(subscriber, || {
            let _call = service::call_span("Execute", &request).entered();
            tracing::info!(refused = false, "executed");
        });
        let text = String::from_utf8(written.lock().unwrap().clone()).unwrap();
        println!("{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "one line per event: {text}");
        let line: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(line["message"], "executed");
        assert_eq!(line["refused"], false);
        assert_eq!(line["level"], "INFO");
        let call = &line["spans"][0];
        assert_eq!(call["saga_id"], "0190-saga");
        assert_eq!(call["correlation_id"], "order-7");
        assert_eq!(call["step"], "charge_payment");
        assert_eq!(call["attempt"], 2);
    }
}
