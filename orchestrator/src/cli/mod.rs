//! `sagactl`, the command-line client of sagad (its `--help` lists the commands): flags, the connection,
//! one function per command. `render` turns the wire types into JSON lines and tables; `bench`
//! drives many sagas at once and measures them.

mod bench;
mod render;

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use sagad_proto::v1 as pb;
use sagad_proto::v1::saga_orchestrator_client::SagaOrchestratorClient;
use sagad_tls::FlaggedPath;
use serde_json::{Map, Value, json};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::definition::DefinitionSet;
use render::Fit;

/// The client every command uses: every request carries the token, when one is given.
pub type Client = SagaOrchestratorClient<InterceptedService<Channel, BearerToken>>;

/// Adds `authorization: Bearer <token>` to each request.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// How long connecting to sagad may take before the command gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the health check that tells sagad from another server may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// The largest page `ListSagas` serves.
const MAX_PAGE_SIZE: u32 = 1000;
/// The gRPC service sagad serves, as its health service knows it.
const SAGAD_SERVICE: &str = "sagad.v1.SagaOrchestrator";

/// `start --wait`'s exit codes besides 0 (it ended COMPLETED) and 1 (an error).
const EXIT_COMPENSATED: u8 = 3;
const EXIT_FAILED: u8 = 4;
const EXIT_TIMED_OUT: u8 = 5;

/// The command line of `sagactl`.
#[derive(Debug, Parser)]
#[command(
    name = "sagactl",
    version,
    about = "Command-line client of the sagad saga orchestrator"
)]
pub struct Cli {
    /// Address of sagad's gRPC API.
    #[arg(
        long,
        global = true,
        env = "SAGAD_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,
    /// `table` for people, `json` for one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Tables: print long values whole instead of cutting them (with `…`) to fit 100 columns.
    /// JSON is never cut.
    #[arg(long, global = true)]
    pub wide: bool,
    #[command(flatten)]
    pub credentials: Credentials,
    #[command(subcommand)]
    pub command: Command,
}

/// Who the client is to sagad, and whom it trusts on `https://` addresses.
#[derive(Debug, Default, Args)]
pub struct Credentials {
    /// The bearer token sent with every request, when sagad runs with --auth-tokens.
    #[arg(long, global = true, env = "SAGAD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The CA (PEM) that signed sagad's certificate, for an `https://` --server (default: the
    /// system's roots).
    #[arg(long, global = true, env = "SAGAD_CA")]
    pub ca: Option<PathBuf>,
    /// A client certificate (PEM), for a sagad that asks for one (mutual TLS).
    #[arg(long, global = true, env = "SAGAD_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(long, global = true, env = "SAGAD_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a saga.
    #[command(
        after_help = "Exit codes with --wait: 0 the saga COMPLETED, 3 it was COMPENSATED, \
                            4 it FAILED, 5 --timeout passed first, 1 an error."
    )]
    Start {
        /// The saga type (the `name` of a definition).
        saga_type: String,
        /// The input: a JSON object, or @FILE to read it from a file.
        #[arg(long)]
        input: String,
        /// Starting again with the same key returns the same saga.
        #[arg(long, default_value = "")]
        idempotency_key: String,
        /// Sent to every participant as x-correlation-id, to follow the saga through their
        /// logs (default: the saga id).
        #[arg(long, default_value = "")]
        correlation_id: String,
        /// Wait until the saga has ended, then print it as `get` does; the exit code says how
        /// it ended (below). A progress line shows on stderr when it is a terminal.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up, exiting 5, if the saga has not ended within this time
        /// ("90s", "10m"); the saga itself goes on.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, requires = "wait")]
        timeout: Duration,
    },
    /// Show a saga: its status, steps and whole history.
    Get {
        /// The saga id.
        id: String,
        /// Events read per call while following a long history (0: the server's default).
        #[arg(long, default_value_t = 0)]
        history_page_size: u32,
    },
    /// List sagas, newest first.
    List {
        /// Only sagas of this type.
        #[arg(long = "type")]
        saga_type: Option<String>,
        /// Only sagas in these statuses (RUNNING, COMPENSATING, COMPLETED, COMPENSATED,
        /// FAILED); repeat the flag or separate with commas.
        #[arg(long, value_delimiter = ',')]
        status: Vec<String>,
        /// Only stuck sagas: running or compensating, with a step that has kept failing for
        /// longer than sagad's --stuck-after.
        #[arg(long)]
        stuck: bool,
        /// At most this many sagas (the newest); stderr says when more match.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// Print a saga's events, from the first, as they happen; exits once it has ended.
    Watch {
        /// The saga id.
        id: String,
    },
    /// Stop a running saga and compensate what it has done.
    Cancel {
        /// The saga id.
        id: String,
        /// Why, recorded in the saga's history.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Resume the compensation of a FAILED saga, once the cause is fixed.
    Retry {
        /// The saga id.
        id: String,
        /// Why, recorded in the saga's history with who asked.
        #[arg(long, default_value = "")]
        reason: String,
        /// Record this step as compensated by hand instead of calling its compensation (a step
        /// whose compensation failed, or one still to come); repeat for more steps.
        #[arg(long = "skip", value_name = "STEP")]
        skip: Vec<String>,
    },
    /// Start many sagas, wait for each to end, and report throughput and latency.
    Bench(BenchArgs),
    /// Saga definitions.
    Defs {
        #[command(subcommand)]
        command: DefsCommand,
    },
    /// Ask a server's gRPC health service (grpc.health.v1) about a service: exit 0 when it is
    /// SERVING, 1 otherwise. Made for container and orchestrator health checks, of sagad
    /// (the default service) or of a participant (`--service sagad.participant.v1.Participant`).
    Health {
        /// The service to ask about.
        #[arg(long, default_value = SAGAD_SERVICE)]
        service: String,
    },
    /// Bearer tokens for sagad's --auth-tokens file.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a fresh random token: prints it (give it to the client, once) and the lines to
    /// add to the --auth-tokens file, which hold only its SHA-256. Runs without a server.
    New {
        /// The token's name: what sagad records as who cancelled or retried a saga.
        name: String,
        /// reader (GetSaga, ListSagas, WatchSaga), operator (also StartSaga, CancelSaga) or
        /// admin (also RetrySaga).
        #[arg(long, value_parser = ["reader", "operator", "admin"])]
        role: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DefsCommand {
    /// Check the definition files of a folder as sagad does at start, without a server (the
    /// participants' addresses are not checked).
    Validate {
        /// The folder of `*.toml` definitions.
        dir: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// How many sagas to run.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub sagas: u32,
    /// How many run at the same time.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    /// The saga type.
    #[arg(long = "type", default_value = "order_fulfillment")]
    pub saga_type: String,
    /// The input of every saga (JSON object or @FILE); without a `customer_id`, each saga gets
    /// a fresh one.
    #[arg(long)]
    pub input: Option<String>,
    /// This fraction (0 to 1) of the sagas go to country AQ, which the demo's shipping-service
    /// refuses: their payment is refunded and their order cancelled, so compensation is
    /// measured too.
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    pub refused_fraction: f64,
    /// Give up if the sagas have not all ended within this time ("90s", "10m").
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

fn parse_fraction(text: &str) -> Result<f64, String> {
    let fraction: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if (0.0..=1.0).contains(&fraction) {
        Ok(fraction)
    } else {
        Err(format!("{fraction} is not between 0 and 1"))
    }
}

/// Runs `sagactl` with the process's arguments; the exit code says whether it worked.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("sagactl: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("sagactl: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one command; the exit code it asks for (errors are returned, and exit 1).
pub async fn run(cli: Cli) -> anyhow::Result<u8> {
    let fit = Fit::new(cli.wide);
    // Checking files needs no server.
    if let Command::Defs {
        command: DefsCommand::Validate { dir },
    } = &cli.command
    {
        validate_defs(cli.output, fit, dir)?;
        return Ok(0);
    }
    if let Command::Token {
        command: TokenCommand::New { name, role },
    } = &cli.command
    {
        new_token(cli.output, name, role)?;
        return Ok(0);
    }
    // Input is checked before connecting: a typo should not wait on the network.
    let start_input = match &cli.command {
        Command::Start { input, .. } => Some(parse_input(input)?),
        _ => None,
    };
    let bench_input = match &cli.command {
        Command::Bench(args) => match &args.input {
            Some(input) => Some(parse_input(input)?),
            None => None,
        },
        _ => None,
    };
    let list_statuses = match &cli.command {
        Command::List { status, .. } => status
            .iter()
            .map(|name| parse_status(name))
            .collect::<anyhow::Result<Vec<_>>>()?,
        _ => Vec::new(),
    };
    let server = Server::connect(&cli.server, &cli.credentials).await?;
    let mut client = server.client();
    let output = cli.output;
    match cli.command {
        Command::Start {
            saga_type,
            idempotency_key,
            correlation_id,
            wait,
            timeout,
            ..
        } => {
            let input = start_input.unwrap_or_default();
            let answer = client
                .start_saga(pb::StartSagaRequest {
                    saga_type,
                    idempotency_key,
                    input: Some(to_struct(input)?),
                    correlation_id,
                })
                .await;
            let response = server.answer(answer).await?;
            if wait {
                return start_and_wait(&server, output, fit, response, timeout).await;
            }
            let status = response.saga.as_ref().map_or(0, |saga| saga.status);
            emit_fields(
                output,
                fit,
                &[
                    ("saga_id", Value::from(response.saga_id)),
                    ("created", Value::from(response.created)),
                    ("status", Value::from(render::saga_status(status))),
                ],
            )?;
        }
        Command::Get {
            id,
            history_page_size,
        } => {
            let answer = client
                .get_saga(pb::GetSagaRequest {
                    saga_id: id,
                    view: pb::SagaView::Full as i32,
                    history_page_size,
                    ..Default::default()
                })
                .await;
            let saga = server.answer(answer).await?;
            let saga = whole_history(&server, saga, history_page_size).await?;
            emit_saga(output, fit, &saga)?;
        }
        Command::List {
            saga_type,
            stuck,
            limit,
            ..
        } => {
            let filters = ListFilters {
                saga_type: saga_type.unwrap_or_default(),
                statuses: list_statuses,
                stuck,
            };
            list(&server, output, fit, &filters, limit).await?;
        }
        Command::Watch { id } => watch(&server, output, fit, id).await?,
        Command::Cancel { id, reason } => {
            let answer = client
                .cancel_saga(pb::CancelSagaRequest {
                    saga_id: id,
                    reason,
                })
                .await;
            let saga = whole_history(&server, server.answer(answer).await?, 0).await?;
            emit_saga(output, fit, &saga)?;
        }
        Command::Retry { id, reason, skip } => {
            let answer = client
                .retry_saga(pb::RetrySagaRequest {
                    saga_id: id,
                    reason,
                    skip_steps: skip,
                })
                .await;
            let saga = whole_history(&server, server.answer(answer).await?, 0).await?;
            emit_saga(output, fit, &saga)?;
        }
        Command::Bench(args) => {
            let report = bench::run(&server, &args, bench_input).await?;
            emit_fields(output, fit, &report)?;
        }
        Command::Health { service } => {
            let status = server.health(&service).await?;
            let fields = [
                ("service", Value::from(service.as_str())),
                ("status", Value::from(status.as_str())),
            ];
            emit_fields(output, fit, &fields)?;
            if status != "SERVING" {
                return Ok(1);
            }
        }
        // Handled above, before connecting.
        Command::Defs { .. } | Command::Token { .. } => {
            bail!("defs and token commands run without a server")
        }
    }
    Ok(0)
}

/// `start --wait`: waits for the saga `StartSaga` answered with to end, then prints it as
/// `get` does (JSON with `created` added); the exit code says how it ended.
async fn start_and_wait(
    server: &Server,
    output: Output,
    fit: Fit,
    started: pb::StartSagaResponse,
    timeout: Duration,
) -> anyhow::Result<u8> {
    let saga_id = started.saga_id;
    // A saga that has already ended (an idempotency key used before) is read as it is.
    let min_version = started.saga.as_ref().map_or(1, |saga| {
        if is_terminal(saga.status) {
            saga.version
        } else {
            saga.version + 1
        }
    });
    let progress = spinner(&saga_id);
    if let Some(saga) = &started.saga {
        progress.set_message(progress_text(saga));
    }
    let waited = tokio::time::timeout(
        timeout,
        wait_for_end(server, &saga_id, min_version, |saga| {
            progress.set_message(progress_text(saga));
        }),
    )
    .await;
    progress.finish_and_clear();
    let Ok(ended) = waited else {
        eprintln!(
            "sagactl: saga {saga_id} has not ended within {}; it goes on: `sagactl get \
             {saga_id}` shows where it is",
            humantime::format_duration(timeout)
        );
        return Ok(EXIT_TIMED_OUT);
    };
    let ended = ended?;
    // The long-poll reads the basic view; the ended saga is printed whole.
    let answer = server
        .client()
        .get_saga(pb::GetSagaRequest {
            saga_id: saga_id.clone(),
            min_version: ended.version,
            view: pb::SagaView::Full as i32,
            ..Default::default()
        })
        .await;
    let saga = whole_history(server, server.answer(answer).await?, 0).await?;
    match output {
        Output::Json => {
            let mut json = render::saga_json(&saga);
            if let Value::Object(fields) = &mut json {
                fields.insert("created".to_owned(), Value::from(started.created));
            }
            emit_json(&json)?;
        }
        Output::Table => emit(&render::saga_table(&saga, fit, chrono::Utc::now()))?,
    }
    Ok(match pb::SagaStatus::try_from(saga.status) {
        Ok(pb::SagaStatus::Completed) => 0,
        Ok(pb::SagaStatus::Compensated) => EXIT_COMPENSATED,
        _ => EXIT_FAILED,
    })
}

/// A progress bar on stderr while it is a terminal; hidden otherwise (pipes, scripts, tests).
fn progress_bar(length: Option<u64>, template: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match length {
        Some(length) => ProgressBar::new(length),
        None => ProgressBar::new_spinner(),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// `start --wait`'s line: how long it has waited, and where the saga is.
fn spinner(saga_id: &str) -> ProgressBar {
    let bar = progress_bar(None, "{spinner} {elapsed:>4} saga {prefix}: {wide_msg}");
    bar.set_prefix(saga_id.to_owned());
    bar
}

/// Where a saga is, in a few words: its status, version and the step under way.
fn progress_text(saga: &pb::Saga) -> String {
    let mut text = format!(
        "{}, version {}",
        render::saga_status(saga.status),
        saga.version
    );
    let current = saga.steps.iter().find(|step| {
        matches!(
            pb::StepStatus::try_from(step.status),
            Ok(pb::StepStatus::Running | pb::StepStatus::Compensating)
        )
    });
    if let Some(step) = current {
        let attempts = if step.status == pb::StepStatus::Compensating as i32 {
            step.compensation_attempts
        } else {
            step.attempts
        };
        text.push_str(&format!(
            ", {} {} (attempts: {attempts})",
            render::step_status(step.status).to_lowercase(),
            step.name
        ));
        if !step.last_error.is_empty() {
            text.push_str(&format!(", last error: {}", step.last_error));
        }
    }
    if saga.stuck {
        text.push_str(", STUCK");
    }
    text
}

/// `token new NAME --role R`: 32 random bytes from the operating system as the token, and the
/// `[[token]]` entry that grants it the role, which holds only its SHA-256.
fn new_token(output: Output, name: &str, role: &str) -> anyhow::Result<()> {
    if name.trim().is_empty() {
        bail!("token new: the name must not be empty");
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|error| anyhow!("no randomness: {error}"))?;
    let token = format!("sagad_{}", hex::encode(secret));
    let sha256 = crate::auth::token_hash(&token);
    let mut entry = toml::Table::new();
    entry.insert("name".into(), name.into());
    entry.insert("role".into(), role.into());
    entry.insert("sha256".into(), sha256.clone().into());
    let mut file = toml::Table::new();
    file.insert("token".into(), toml::Value::Array(vec![entry.into()]));
    let lines = toml::to_string(&file).context("cannot write the TOML entry")?;
    match output {
        Output::Json => emit_json(&json!({
            "name": name,
            "role": role,
            "token": token,
            "sha256": sha256,
            "toml": lines,
        })),
        Output::Table => emit(&format!(
            "token: {token}\n\nAdd to sagad's --auth-tokens file, then send sagad SIGHUP:\n\n{lines}"
        )),
    }
}

/// `defs validate DIR`: every file of the folder checked as sagad checks it at start; the
/// report on stdout, and a non-zero exit when some file is bad or the folder is not there.
fn validate_defs(output: Output, fit: Fit, dir: &Path) -> anyhow::Result<()> {
    let folder = dir.display().to_string();
    let missing = if dir.is_dir() {
        None
    } else if dir.exists() {
        Some("is not a folder")
    } else {
        Some("no such folder")
    };
    if let Some(problem) = missing {
        if output == Output::Json {
            emit_json(&json!({
                "valid": false,
                "definitions": 0,
                "errors": [{"file": folder, "field": "", "message": problem}],
            }))?;
        }
        bail!("defs validate {folder}: {problem}");
    }
    let (count, errors) = match DefinitionSet::validate_dir(dir) {
        Ok(set) => (set.len(), Vec::new()),
        Err(errors) => (0, errors),
    };
    match output {
        Output::Json => emit_json(&json!({
            "valid": errors.is_empty(),
            "definitions": count,
            "errors": errors
                .iter()
                .map(|error| json!({
                    "file": error.file,
                    "field": error.field,
                    "message": error.message,
                }))
                .collect::<Vec<_>>(),
        }))?,
        Output::Table if errors.is_empty() => {
            let noun = if count == 1 {
                "definition"
            } else {
                "definitions"
            };
            emit(&fit.line(&format!("ok: {count} {noun} in {folder}")))?;
        }
        // Each error whole: a cut one could hide what to fix.
        Output::Table => emit(
            &errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
        )?,
    }
    match errors.len() {
        0 => Ok(()),
        1 => bail!("{folder}: 1 error in the saga definitions"),
        n => bail!("{folder}: {n} errors in the saga definitions"),
    }
}

/// Whether a saga with this status has ended.
fn is_terminal(status: i32) -> bool {
    matches!(
        pb::SagaStatus::try_from(status),
        Ok(pb::SagaStatus::Completed | pb::SagaStatus::Compensated | pb::SagaStatus::Failed)
    )
}

/// The events that end a saga's log (and its `WatchSaga` stream).
fn is_terminal_event(event_type: &str) -> bool {
    matches!(
        event_type,
        "saga_completed" | "saga_compensated" | "saga_failed"
    )
}

/// How long one `GetSaga` long-poll waits for the next version.
const POLL_WAIT_MS: u32 = 10_000;

/// Long-polls `GetSaga` (the basic view: no history), first for `min_version`, then for each
/// version after the one seen, until the saga has ended; `seen` hears of each version, and
/// the ended saga is returned.
async fn wait_for_end(
    server: &Server,
    saga_id: &str,
    mut min_version: u64,
    mut seen: impl FnMut(&pb::Saga),
) -> anyhow::Result<pb::Saga> {
    let mut client = server.client();
    loop {
        let answer = client
            .get_saga(pb::GetSagaRequest {
                saga_id: saga_id.to_owned(),
                min_version,
                wait_ms: POLL_WAIT_MS,
                view: pb::SagaView::Basic as i32,
                ..Default::default()
            })
            .await;
        match answer {
            Ok(saga) => {
                let saga = saga.into_inner();
                seen(&saga);
                if is_terminal(saga.status) {
                    return Ok(saga);
                }
                min_version = saga.version + 1;
            }
            // Nothing new within the wait: ask again.
            Err(status) if status.code() == tonic::Code::DeadlineExceeded => {}
            Err(status) => {
                return Err(server
                    .error(status)
                    .await
                    .context(format!("waiting for saga {saga_id}")));
            }
        }
    }
}

/// `saga` with the rest of its history: the pages after the first, read one `GetSaga` at a
/// time (`page_size` events each, 0 for the server's default), as long as the server says
/// more follow. The state shown is that of the last answer, the newest.
async fn whole_history(
    server: &Server,
    mut saga: pb::Saga,
    page_size: u32,
) -> anyhow::Result<pb::Saga> {
    let mut client = server.client();
    let mut history = std::mem::take(&mut saga.history);
    while !saga.next_history_page_token.is_empty() {
        let answer = client
            .get_saga(pb::GetSagaRequest {
                saga_id: saga.saga_id.clone(),
                view: pb::SagaView::Full as i32,
                history_page_size: page_size,
                history_page_token: std::mem::take(&mut saga.next_history_page_token),
                ..Default::default()
            })
            .await;
        saga = server.answer(answer).await?;
        history.append(&mut saga.history);
    }
    saga.history = history;
    Ok(saga)
}

/// A connection to what `--server` names, and the words for what it answers.
pub struct Server {
    url: String,
    channel: Channel,
    token: BearerToken,
}

impl Server {
    /// Connects, or says clearly why not.
    pub async fn connect(server: &str, credentials: &Credentials) -> anyhow::Result<Server> {
        let url = if server.contains("://") {
            server.to_owned()
        } else {
            format!("http://{server}")
        };
        let tls = url.starts_with("https://");
        if !url.starts_with("http://") && !tls {
            bail!("--server {server:?}: the address must start with http:// or https://");
        }
        let token = match &credentials.token {
            Some(token) => Some(
                format!("Bearer {}", token.trim())
                    .parse()
                    .map_err(|_| anyhow!("--token: a token is printable ASCII"))?,
            ),
            None => None,
        };
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|error| anyhow!("--server {server:?} is not a valid address: {error}"))?
            .connect_timeout(CONNECT_TIMEOUT);
        if tls {
            let files = sagad_tls::ClientTlsFiles::new(
                FlaggedPath::given("--ca", credentials.ca.as_ref()),
                FlaggedPath::given("--cert", credentials.cert.as_ref()),
                FlaggedPath::given("--key", credentials.key.as_ref()),
            );
            endpoint = endpoint.tls_config(files.client_config()?)?;
        } else if credentials.ca.is_some() || credentials.cert.is_some() {
            bail!("--ca and --cert need an https:// --server, got {url}");
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|error| anyhow!("cannot reach sagad at {url}: {}", error_chain(&error)))?;
        Ok(Server {
            url,
            channel,
            token: BearerToken(token),
        })
    }

    pub fn client(&self) -> Client {
        SagaOrchestratorClient::with_interceptor(self.channel.clone(), self.token.clone())
    }

    /// An RPC's answer, or its error in words (see [`error`](Self::error)).
    pub async fn answer<T>(
        &self,
        answer: Result<tonic::Response<T>, tonic::Status>,
    ) -> anyhow::Result<T> {
        match answer {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(self.error(status).await),
        }
    }

    /// A gRPC error as a message: the code's name, then the server's words. A code sagad does
    /// not answer a well-formed request with (the RPC unknown, the call cancelled, or no gRPC
    /// at all, as from an HTTP/1 server) is checked with a health check for sagad's service:
    /// when that fails too, the other end is not sagad, and the message says so.
    pub async fn error(&self, status: tonic::Status) -> anyhow::Error {
        use tonic::Code;
        let suspicious = matches!(
            status.code(),
            Code::Unimplemented | Code::Cancelled | Code::Unknown | Code::Internal
        );
        if suspicious && let Some(why) = self.not_sagad().await {
            let answered = status_text(&status);
            let why = if why.ends_with(&answered) {
                why
            } else {
                format!("{why}; the call answered {answered}")
            };
            return anyhow!(
                "this is not a sagad gRPC server at {} ({why}): check --server or SAGAD_ADDR \
                 (sagad's gRPC address is 127.0.0.1:50051 unless its --listen says otherwise)",
                self.url
            );
        }
        anyhow!("{}", status_text(&status))
    }

    /// Why the other end is not sagad, or `None` when its health service knows sagad's
    /// service (or cannot be asked right now).
    /// What the server's health service says of `service` (`SERVING`, `NOT_SERVING`, …).
    async fn health(&self, service: &str) -> anyhow::Result<String> {
        let mut health = HealthClient::new(self.channel.clone());
        let probe = health.check(HealthCheckRequest {
            service: service.to_owned(),
        });
        let reply = tokio::time::timeout(PROBE_TIMEOUT, probe)
            .await
            .map_err(|_| {
                anyhow!(
                    "the health check of {} took longer than {PROBE_TIMEOUT:?}",
                    self.url
                )
            })?
            .map_err(|status| anyhow!("health of {service}: {}", status_text(&status)))?;
        let status = reply.into_inner().status();
        Ok(status.as_str_name().to_owned())
    }

    async fn not_sagad(&self) -> Option<String> {
        let mut health = HealthClient::new(self.channel.clone());
        let probe = health.check(HealthCheckRequest {
            service: SAGAD_SERVICE.to_owned(),
        });
        match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            Ok(Ok(_)) => None,
            Ok(Err(status)) => match status.code() {
                tonic::Code::NotFound => Some(format!("it does not serve {SAGAD_SERVICE}")),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => None,
                _ => Some(format!(
                    "its health check for {SAGAD_SERVICE} answered {}",
                    status_text(&status)
                )),
            },
            Err(_) => None,
        }
    }
}

/// A status's code name and message.
fn status_text(status: &tonic::Status) -> String {
    let code = code_name(status.code());
    if status.message().is_empty() {
        code.to_owned()
    } else {
        format!("{code}: {}", status.message())
    }
}

/// An error and its sources on one line.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// `--input`: a JSON object, or `@FILE` holding one.
pub fn parse_input(text: &str) -> anyhow::Result<Map<String, Value>> {
    let (source, json) = match text.strip_prefix('@') {
        Some(path) => {
            let json = std::fs::read_to_string(path)
                .with_context(|| format!("--input: cannot read {path}"))?;
            (format!("--input (file {path})"), json)
        }
        None => ("--input".to_owned(), text.to_owned()),
    };
    let value: Value = serde_json::from_str(&json)
        .map_err(|error| anyhow!("{source} is not valid JSON: {error}"))?;
    match value {
        Value::Object(fields) => Ok(fields),
        other => bail!(
            "{source} must be a JSON object, not {}",
            render::json_kind(&other)
        ),
    }
}

/// JSON to the wire's Struct.
pub fn to_struct(fields: Map<String, Value>) -> anyhow::Result<pbjson_types::Struct> {
    serde_json::from_value(Value::Object(fields))
        .map_err(|error| anyhow!("the input cannot be sent: {error}"))
}

/// A saga status by its short name (`completed`, `COMPLETED`) or its full proto name.
pub fn parse_status(name: &str) -> anyhow::Result<i32> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("SAGA_STATUS_") {
        upper
    } else {
        format!("SAGA_STATUS_{upper}")
    };
    match pb::SagaStatus::from_str_name(&full) {
        Some(pb::SagaStatus::Unspecified) | None => bail!(
            "--status {name:?} is not a saga status (RUNNING, COMPENSATING, COMPLETED, \
             COMPENSATED, FAILED)"
        ),
        Some(status) => Ok(status as i32),
    }
}

/// What `list` asks the server for.
struct ListFilters {
    saga_type: String,
    statuses: Vec<i32>,
    stuck: bool,
}

impl ListFilters {
    fn request(&self, page_size: u32, page_token: String) -> pb::ListSagasRequest {
        pb::ListSagasRequest {
            saga_type: self.saga_type.clone(),
            statuses: self.statuses.clone(),
            page_size,
            page_token,
            stuck: self.stuck,
        }
    }

    /// The filters as flags, for the messages.
    fn describe(&self) -> String {
        let mut flags = Vec::new();
        if !self.saga_type.is_empty() {
            flags.push(format!("--type {}", self.saga_type));
        }
        for status in &self.statuses {
            flags.push(format!("--status {}", render::saga_status(*status)));
        }
        if self.stuck {
            flags.push("--stuck".to_owned());
        }
        flags.join(" ")
    }
}

/// `list`: the newest sagas that match, page after page up to `limit`; stderr says when
/// nothing matched, or when more matched than `limit`.
async fn list(
    server: &Server,
    output: Output,
    fit: Fit,
    filters: &ListFilters,
    limit: u32,
) -> anyhow::Result<()> {
    let mut client = server.client();
    let mut sagas = Vec::new();
    let mut page_token = String::new();
    let mut more = false;
    loop {
        let remaining = limit.saturating_sub(u32::try_from(sagas.len()).unwrap_or(u32::MAX));
        let answer = client
            .list_sagas(filters.request(remaining.min(MAX_PAGE_SIZE), page_token))
            .await;
        let page = server.answer(answer).await?;
        sagas.extend(page.sagas);
        if page.next_page_token.is_empty() {
            break;
        }
        if sagas.len() >= limit as usize {
            // A token does not promise another saga: look for one.
            let answer = client
                .list_sagas(filters.request(1, page.next_page_token))
                .await;
            more = sagas.len() > limit as usize || !server.answer(answer).await?.sagas.is_empty();
            break;
        }
        page_token = page.next_page_token;
    }
    sagas.truncate(limit as usize);
    match output {
        Output::Json => {
            for saga in &sagas {
                emit_json(&render::saga_summary_json(saga))?;
            }
        }
        Output::Table if sagas.is_empty() => {}
        Output::Table => emit(&render::saga_list_table(&sagas, fit, chrono::Utc::now()))?,
    }
    let filtered = filters.describe();
    if sagas.is_empty() {
        if filtered.is_empty() {
            note("no sagas yet");
        } else {
            note(&format!("no sagas match {filtered}"));
        }
    } else if more {
        note(&format!(
            "showing the newest {limit} sagas; more match: raise --limit or narrow the filters"
        ));
    }
    Ok(())
}

/// `watch`: each event of the `WatchSaga` stream as it comes, until the terminal one ends it.
async fn watch(server: &Server, output: Output, fit: Fit, saga_id: String) -> anyhow::Result<()> {
    let answer = server
        .client()
        .watch_saga(pb::WatchSagaRequest {
            saga_id: saga_id.clone(),
        })
        .await;
    let mut events = server.answer(answer).await?;
    if output == Output::Table {
        emit(&render::event_header(fit))?;
    }
    let mut last = None;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(status) => return Err(server.error(status).await),
        };
        match output {
            Output::Json => emit_json(&render::event_json(&event))?,
            Output::Table => emit(&render::event_line(&event, fit))?,
        }
        last = Some(event);
    }
    match last {
        Some(event) if is_terminal_event(&event.r#type) => Ok(()),
        last => bail!(
            "the stream of saga {saga_id} ended before the saga did (last event: {}); `sagactl \
             watch {saga_id}` again to follow it",
            last.map_or("none".to_owned(), |event| format!(
                "{} {}",
                event.seq, event.r#type
            ))
        ),
    }
}

fn emit_saga(output: Output, fit: Fit, saga: &pb::Saga) -> anyhow::Result<()> {
    match output {
        Output::Json => emit_json(&render::saga_json(saga)),
        Output::Table => emit(&render::saga_table(saga, fit, chrono::Utc::now())),
    }
}

/// A flat result: one JSON object, or `key  value` lines.
fn emit_fields(output: Output, fit: Fit, fields: &[(&str, Value)]) -> anyhow::Result<()> {
    match output {
        Output::Json => emit_json(&render::object(fields)),
        Output::Table => emit(&render::key_values(fields, fit)),
    }
}

/// One JSON object on one line of stdout.
fn emit_json(value: &Value) -> anyhow::Result<()> {
    emit(&value.to_string())
}

/// Text on stdout, ending with a newline, flushed at once (watch prints as events come).
fn emit(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    let text = text.trim_end_matches('\n');
    writeln!(stdout, "{text}")
        .and_then(|()| stdout.flush())
        .context("cannot write to stdout")
}

/// A remark about the result, on stderr: stdout holds only the result itself.
fn note(text: &str) {
    eprintln!("sagactl: {text}");
}
