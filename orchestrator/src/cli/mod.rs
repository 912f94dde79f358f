//! `sagactl`, the command-line client of sagad (its `--help` lists the commands): flags, the connection,
//! one function per command. `render` turns the wire types into JSON lines and tables; `bench`
//! drives many sagas at once and measures them.

mod bench;
mod render;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::StreamExt as _;
use sagad_proto::v1 as pb;
use sagad_proto::v1::saga_orchestrator_client::SagaOrchestratorClient;
use serde_json::{Map, Value, json};
use tonic::transport::{Channel, Endpoint};

use crate::definition::DefinitionSet;

/// The client every command uses.
pub type Client = SagaOrchestratorClient<Channel>;

/// How long connecting to sagad may take before the command gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest page `ListSagas` serves.
const MAX_PAGE_SIZE: u32 = 1000;

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
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a saga.
    Start {
        /// The saga type (the `name` of a definition).
        saga_type: String,
        /// The input: a JSON object, or @FILE to read it from a file.
        #[arg(long)]
        input: String,
        /// Starting again with the same key returns the same saga.
        #[arg(long, default_value = "")]
        idempotency_key: String,
        /// Wait until the saga has ended, then print it as `get` does.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up, exiting non-zero, if the saga has not ended within this time
        /// ("90s", "10m"); the saga itself goes on.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, requires = "wait")]
        timeout: Duration,
    },
    /// Show a saga: its status, steps and history.
    Get {
        /// The saga id.
        id: String,
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
        /// At most this many sagas.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// Print a saga's events as they happen, until it ends.
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
    /// Resume the compensation of a FAILED saga.
    Retry {
        /// The saga id.
        id: String,
    },
    /// Start many sagas, wait for each to end, and report throughput and latency.
    Bench(BenchArgs),
    /// Saga definitions.
    Defs {
        #[command(subcommand)]
        command: DefsCommand,
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
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    /// The saga type.
    #[arg(long = "type", default_value = "order_fulfillment")]
    pub saga_type: String,
    /// The input of every saga (JSON object or @FILE); without a `customer_id`, each saga gets
    /// a fresh one.
    #[arg(long)]
    pub input: Option<String>,
    /// Give up if the sagas have not all ended within this time ("90s", "10m").
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
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
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sagactl: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // Checking files needs no server.
    if let Command::Defs {
        command: DefsCommand::Validate { dir },
    } = &cli.command
    {
        return validate_defs(cli.output, dir);
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
    let mut client = connect(&cli.server).await?;
    let output = cli.output;
    match cli.command {
        Command::Start {
            saga_type,
            idempotency_key,
            wait,
            timeout,
            ..
        } => {
            let input = start_input.unwrap_or_default();
            let response = client
                .start_saga(pb::StartSagaRequest {
                    saga_type,
                    idempotency_key,
                    input: Some(to_struct(input)?),
                    correlation_id: String::new(),
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            if wait {
                return start_and_wait(&mut client, output, response, timeout).await;
            }
            let status = response.saga.as_ref().map_or(0, |saga| saga.status);
            emit_fields(
                output,
                &[
                    ("saga_id", Value::from(response.saga_id)),
                    ("created", Value::from(response.created)),
                    ("status", Value::from(render::saga_status(status))),
                ],
            )
        }
        Command::Get { id } => {
            let saga = client
                .get_saga(pb::GetSagaRequest {
                    saga_id: id,
                    ..Default::default()
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            emit_saga(output, &saga)
        }
        Command::List {
            saga_type, limit, ..
        } => list(&mut client, output, saga_type, list_statuses, limit).await,
        Command::Watch { id } => watch(&mut client, output, id).await,
        Command::Cancel { id, reason } => {
            let saga = client
                .cancel_saga(pb::CancelSagaRequest {
                    saga_id: id,
                    reason,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            emit_saga(output, &saga)
        }
        Command::Retry { id } => {
            let saga = client
                .retry_saga(pb::RetrySagaRequest {
                    saga_id: id,
                    ..Default::default()
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            emit_saga(output, &saga)
        }
        Command::Bench(args) => {
            let report = bench::run(&client, &args, bench_input).await?;
            emit_fields(output, &report)
        }
        // Handled above, before connecting.
        Command::Defs { .. } => bail!("defs commands run without a server"),
    }
}

/// `start --wait`: waits for the saga `StartSaga` answered with to end, then prints it as
/// `get` does (JSON with `created` added).
async fn start_and_wait(
    client: &mut Client,
    output: Output,
    started: pb::StartSagaResponse,
    timeout: Duration,
) -> anyhow::Result<()> {
    let saga_id = started.saga_id;
    // A saga that has already ended (an idempotency key used before) is read as it is.
    let min_version = started.saga.as_ref().map_or(1, |saga| {
        if is_terminal(saga.status) {
            saga.version
        } else {
            saga.version + 1
        }
    });
    let Ok(saga) = tokio::time::timeout(timeout, wait_for_end(client, &saga_id, min_version)).await
    else {
        bail!(
            "saga {saga_id} has not ended within {}; it goes on: `sagactl get {saga_id}` shows \
             where it is",
            humantime::format_duration(timeout)
        );
    };
    let saga = saga?;
    match output {
        Output::Json => {
            let mut json = render::saga_json(&saga);
            if let Value::Object(fields) = &mut json {
                fields.insert("created".to_owned(), Value::from(started.created));
            }
            emit_json(&json)
        }
        Output::Table => emit(&render::saga_table(&saga)),
    }
}

/// `defs validate DIR`: every file of the folder checked as sagad checks it at start; the
/// report on stdout, and a non-zero exit when some file is bad.
fn validate_defs(output: Output, dir: &Path) -> anyhow::Result<()> {
    let folder = dir.display().to_string();
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
            emit(&format!("ok: {count} {noun} in {folder}"))?;
        }
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

/// How long one `GetSaga` long-poll waits for the next version.
const POLL_WAIT_MS: u32 = 10_000;

/// Long-polls `GetSaga`, first for `min_version`, then for each version after the one seen,
/// until the saga has ended; returns it then, with its history.
async fn wait_for_end(
    client: &mut Client,
    saga_id: &str,
    mut min_version: u64,
) -> anyhow::Result<pb::Saga> {
    loop {
        let answer = client
            .get_saga(pb::GetSagaRequest {
                saga_id: saga_id.to_owned(),
                min_version,
                wait_ms: POLL_WAIT_MS,
                ..Default::default()
            })
            .await;
        match answer {
            Ok(saga) => {
                let saga = saga.into_inner();
                if is_terminal(saga.status) {
                    return Ok(saga);
                }
                min_version = saga.version + 1;
            }
            // Nothing new within the wait: ask again.
            Err(status) if status.code() == tonic::Code::DeadlineExceeded => {}
            Err(status) => {
                return Err(rpc_error(status).context(format!("waiting for saga {saga_id}")));
            }
        }
    }
}

/// Connects to sagad, or says clearly why not.
pub async fn connect(server: &str) -> anyhow::Result<Client> {
    let url = if server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    };
    if !url.starts_with("http://") {
        bail!("--server {server:?}: only http:// addresses are supported");
    }
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|error| anyhow!("--server {server:?} is not a valid address: {error}"))?
        .connect_timeout(CONNECT_TIMEOUT);
    let channel = endpoint
        .connect()
        .await
        .map_err(|error| anyhow!("cannot reach sagad at {url}: {}", error_chain(&error)))?;
    Ok(SagaOrchestratorClient::new(channel))
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

/// A gRPC error as a message: the code's name, then the server's words.
pub fn rpc_error(status: tonic::Status) -> anyhow::Error {
    let code = code_name(status.code());
    if status.message().is_empty() {
        anyhow!("{code}")
    } else {
        anyhow!("{code}: {}", status.message())
    }
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

async fn list(
    client: &mut Client,
    output: Output,
    saga_type: Option<String>,
    statuses: Vec<i32>,
    limit: u32,
) -> anyhow::Result<()> {
    let mut sagas = Vec::new();
    let mut page_token = String::new();
    while (sagas.len() as u64) < u64::from(limit) {
        let remaining = limit.saturating_sub(u32::try_from(sagas.len()).unwrap_or(u32::MAX));
        let page = client
            .list_sagas(pb::ListSagasRequest {
                saga_type: saga_type.clone().unwrap_or_default(),
                statuses: statuses.clone(),
                page_size: remaining.min(MAX_PAGE_SIZE),
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .map_err(rpc_error)?
            .into_inner();
        sagas.extend(page.sagas);
        if page.next_page_token.is_empty() {
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
            Ok(())
        }
        Output::Table => emit(&render::saga_list_table(&sagas)),
    }
}

async fn watch(client: &mut Client, output: Output, saga_id: String) -> anyhow::Result<()> {
    let mut events = client
        .watch_saga(pb::WatchSagaRequest { saga_id })
        .await
        .map_err(rpc_error)?
        .into_inner();
    if output == Output::Table {
        emit(&render::event_header())?;
    }
    while let Some(event) = events.next().await {
        let event = event.map_err(rpc_error)?;
        match output {
            Output::Json => emit_json(&render::event_json(&event))?,
            Output::Table => emit(&render::event_line(&event))?,
        }
    }
    Ok(())
}

fn emit_saga(output: Output, saga: &pb::Saga) -> anyhow::Result<()> {
    match output {
        Output::Json => emit_json(&render::saga_json(saga)),
        Output::Table => emit(&render::saga_table(saga)),
    }
}

/// A flat result: one JSON object, or `key  value` lines.
fn emit_fields(output: Output, fields: &[(&str, Value)]) -> anyhow::Result<()> {
    match output {
        Output::Json => emit_json(&render::object(fields)),
        Output::Table => emit(&render::key_values(fields)),
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
