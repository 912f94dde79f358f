//! The daemon's configuration: flags with environment fallbacks, parsed and validated once at
//! start, then passed down.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use sagad_tls::FlaggedPath;

/// sagad: the saga orchestrator daemon.
#[derive(Debug, Clone, Parser)]
#[command(name = "sagad", version, about)]
pub struct Config {
    /// Postgres URL; the database is created if missing and migrated at start.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,

    /// gRPC address.
    #[arg(long, env = "SAGAD_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Folder of saga definitions (*.toml).
    #[arg(long, env = "SAGAD_DEFS", default_value = "./saga-defs")]
    pub defs: PathBuf,

    /// Where a participant named in the definitions is reached: NAME=URI (repeatable).
    #[arg(
        long = "participant",
        value_name = "NAME=URI",
        env = "SAGAD_PARTICIPANTS",
        value_delimiter = ',',
        value_parser = parse_participant
    )]
    pub participants: Vec<(String, String)>,

    /// HTTP address: the saga explorer at `/` (web pages; with --auth-tokens they ask for a
    /// token), `GET /metrics` (Prometheus text), `/healthz` and `/readyz`. Port 0 picks a free
    /// one (the log says which). The environment variable SAGAD_METRICS_LISTEN is read when
    /// SAGAD_HTTP_LISTEN is unset [default: 127.0.0.1:9464]
    #[arg(long, visible_alias = "metrics-listen", env = "SAGAD_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,

    /// Log lines as `text` or `json` (one object per line); the filter is RUST_LOG (default
    /// `info`).
    #[arg(long, env = "SAGAD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// How long to wait for an unreachable database at start before giving up.
    #[arg(long, env = "SAGAD_DATABASE_WAIT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub database_wait: Duration,

    /// Calls in flight to one participant at most, across all sagas.
    #[arg(long, env = "SAGAD_PARTICIPANT_CONCURRENCY", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub participant_concurrency: u32,

    /// How long a graceful shutdown lets calls in flight finish.
    #[arg(long, env = "SAGAD_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// How long a replica's lease on its sagas lasts without renewal (renewed every third of
    /// it): the sagas of a replica that died wait this long before another one takes them over.
    #[arg(long, env = "SAGAD_LEASE_TTL", default_value = "5s", value_parser = parse_lease_ttl)]
    pub lease_ttl: Duration,

    /// The longest pause between two sweeps for sagas nobody drives; a takeover happens within
    /// the lease TTL plus this.
    #[arg(long, env = "SAGAD_POLL_INTERVAL", default_value = "1s", value_parser = parse_poll_interval)]
    pub poll_interval: Duration,

    /// A running or compensating saga whose current step has kept failing (retrying) for
    /// longer than this is stuck: `ListSagas{stuck}`, `sagactl list --stuck`, and the gauge
    /// `sagad_sagas_stuck` show it.
    #[arg(long, env = "SAGAD_STUCK_AFTER", default_value = "60s", value_parser = parse_stuck_after)]
    pub stuck_after: Duration,

    /// Serve gRPC over TLS with this certificate chain (PEM); re-read on SIGHUP.
    #[arg(long, env = "SAGAD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of `--tls-cert` (PEM); re-read on SIGHUP.
    #[arg(long, env = "SAGAD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Require client certificates signed by this CA (PEM): mutual TLS. Re-read on SIGHUP.
    #[arg(long, env = "SAGAD_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Bearer tokens and their roles (TOML: `[[token]]` with `name`, `role` and `sha256`, the
    /// hex SHA-256 of the token). Without it every caller may do everything. Re-read on SIGHUP.
    #[arg(long, env = "SAGAD_AUTH_TOKENS")]
    pub auth_tokens: Option<PathBuf>,

    /// The largest request message sagad reads; a larger one is refused with
    /// RESOURCE_EXHAUSTED before it is decoded.
    #[arg(long, env = "SAGAD_MAX_REQUEST_BYTES", default_value_t = 1024 * 1024,
          value_parser = clap::value_parser!(u32).range(64 * 1024..=64 * 1024 * 1024))]
    pub max_request_bytes: u32,

    /// HTTP/2 streams (calls in flight) one connection may have open at once.
    #[arg(long, env = "SAGAD_MAX_CONCURRENT_STREAMS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_concurrent_streams: u32,

    /// WatchSaga streams one client (a token, or an IP address without tokens) may have open
    /// at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "SAGAD_MAX_WATCHES_PER_CLIENT", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_watches_per_client: u32,

    /// Sagas one client (a token, or an IP address without tokens) may start per second, in
    /// bursts of up to a second's worth; more are refused with RESOURCE_EXHAUSTED and a
    /// `retry-after-ms` hint. 0: no limit.
    #[arg(long, env = "SAGAD_START_RATE", default_value_t = 0)]
    pub start_rate: u32,

    /// Allow gRPC in plaintext on an address other than loopback.
    #[arg(long)]
    pub insecure: bool,

    /// Trust participants' TLS certificates signed by this CA (PEM) on `https://` URIs
    /// (default: the system's roots).
    #[arg(long, env = "SAGAD_PARTICIPANT_CA")]
    pub participant_ca: Option<PathBuf>,

    /// A client certificate (PEM) sagad shows to participants on `https://` URIs.
    #[arg(long, env = "SAGAD_PARTICIPANT_CERT", requires = "participant_key")]
    pub participant_cert: Option<PathBuf>,

    /// The private key of `--participant-cert` (PEM).
    #[arg(long, env = "SAGAD_PARTICIPANT_KEY", requires = "participant_cert")]
    pub participant_key: Option<PathBuf>,
}

pub use sagad_telemetry::LogFormat;

/// The HTTP address when neither `--http-listen` nor its environment variables say otherwise.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:9464";

/// The older name of `SAGAD_HTTP_LISTEN`, still read when the new one is unset.
const METRICS_LISTEN_ENV: &str = "SAGAD_METRICS_LISTEN";

impl Config {
    /// The HTTP address: `--http-listen` (or `--metrics-listen`), else `SAGAD_HTTP_LISTEN`, else
    /// `SAGAD_METRICS_LISTEN`, else the default. A bad value names its variable.
    pub fn http_listen(&self) -> Result<SocketAddr, String> {
        if let Some(addr) = self.http_listen {
            return Ok(addr);
        }
        match std::env::var(METRICS_LISTEN_ENV) {
            Ok(value) => value
                .trim()
                .parse()
                .map_err(|error| format!("{METRICS_LISTEN_ENV}={value:?}: {error}")),
            Err(_) => DEFAULT_HTTP_LISTEN
                .parse()
                .map_err(|error| format!("the default HTTP address: {error}")),
        }
    }

    /// Checks what one flag alone cannot: the error names the flag.
    pub fn validate(&self) -> Result<(), String> {
        self.http_listen()?;
        if self.tls_cert.is_none() && !self.insecure && !self.listen.ip().is_loopback() {
            return Err(format!(
                "--listen {}: gRPC in plaintext on an address other than loopback; serve TLS \
                 (--tls-cert, --tls-key) or pass --insecure",
                self.listen
            ));
        }
        if self.poll_interval > self.lease_ttl {
            return Err(format!(
                "--poll-interval ({}) must not be longer than --lease-ttl ({})",
                humantime::format_duration(self.poll_interval),
                humantime::format_duration(self.lease_ttl)
            ));
        }
        Ok(())
    }

    /// The gRPC server's TLS files, when it serves TLS.
    pub fn server_tls_files(&self) -> Option<sagad_tls::ServerTlsFiles> {
        Some(sagad_tls::ServerTlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }

    /// What sagad trusts and shows on `https://` participant addresses.
    pub fn participant_tls_files(&self) -> sagad_tls::ClientTlsFiles {
        sagad_tls::ClientTlsFiles::new(
            FlaggedPath::given("--participant-ca", self.participant_ca.as_ref()),
            FlaggedPath::given("--participant-cert", self.participant_cert.as_ref()),
            FlaggedPath::given("--participant-key", self.participant_key.as_ref()),
        )
    }

    /// Participant addresses by name; a name given twice is an error naming the flag.
    pub fn participant_addresses(&self) -> Result<BTreeMap<String, String>, String> {
        let mut addresses = BTreeMap::new();
        for (name, uri) in &self.participants {
            if addresses.insert(name.clone(), uri.clone()).is_some() {
                return Err(format!("--participant: {name:?} is given twice"));
            }
        }
        Ok(addresses)
    }
}

fn parse_participant(value: &str) -> Result<(String, String), String> {
    let (name, uri) = value
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=URI, got {value:?}"))?;
    let name = name.trim();
    let uri = uri.trim();
    if name.is_empty() || uri.is_empty() {
        return Err(format!("expected NAME=URI, got {value:?}"));
    }
    if !(uri.starts_with("http://") || uri.starts_with("https://")) {
        return Err(format!(
            "{name}: URI must start with http:// or https://, got {uri:?}"
        ));
    }
    Ok((name.to_owned(), uri.to_owned()))
}

fn parse_lease_ttl(value: &str) -> Result<Duration, String> {
    parse_duration_within(value, Duration::from_millis(500), Duration::from_secs(3600))
}

fn parse_stuck_after(value: &str) -> Result<Duration, String> {
    parse_duration_within(
        value,
        Duration::from_secs(1),
        Duration::from_secs(7 * 24 * 3600),
    )
}

fn parse_poll_interval(value: &str) -> Result<Duration, String> {
    parse_duration_within(value, Duration::from_millis(10), Duration::from_secs(3600))
}

fn parse_duration_within(value: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let duration = humantime::parse_duration(value).map_err(|error| error.to_string())?;
    if duration < min || duration > max {
        return Err(format!(
            "must be from {} to {}, got {value:?}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(duration)
}
