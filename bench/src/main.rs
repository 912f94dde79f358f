//! The engine of `bench/run.sh`: a private Postgres cluster that syncs to disk as production
//! does, the yardstick (pgbench's one-insert-one-update transaction), the demo participants and
//! sagad on that cluster, then `sagactl bench` at each client count, measured from outside the
//! processes: throughput and latency, CPU per saga of every process (Postgres's backends
//! summed), sagad's peak memory and transactions per saga in each database. Then the database
//! is grown (finished sagas, sagas waiting on an hour-long retry) and the busiest level runs
//! again. Figures only: nothing here passes or fails on a number.

mod growth;
mod level;
mod report;
mod yardstick;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use sagad_e2e::Scratch;
use sagad_e2e::demo::{DemoOptions, DemoSystem};
use sagad_e2e::postgres::PrivateCluster;

use crate::level::Level;
use crate::report::Report;

/// Measures sagad against the yardstick of the same machine; prints text and writes JSON.
#[derive(Debug, Parser)]
#[command(name = "sagad-bench")]
struct Args {
    /// The size CI runs: a few hundred sagas, a small grown database, short yardstick runs.
    #[arg(long)]
    small: bool,
    /// The client counts (sagas in flight at once) to measure, in order.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    clients: Vec<u32>,
    /// Sagas per level; by default sized so that each level runs for tens of seconds (a few
    /// seconds with --small).
    #[arg(long)]
    sagas: Option<u32>,
    /// Finished sagas loaded before the grown run (default 1,000,000; 20,000 with --small).
    #[arg(long)]
    finished: Option<u64>,
    /// Sagas waiting on an hour-long retry loaded before the grown run (default 100,000;
    /// 2,000 with --small).
    #[arg(long)]
    waiting: Option<u64>,
    /// Skip the grown database.
    #[arg(long)]
    no_growth: bool,
    /// sagad and the participants reach Postgres through its Unix socket instead of TCP on
    /// 127.0.0.1 (what a deployment with the database on the same machine would choose).
    #[arg(long)]
    unix_socket: bool,
    /// Where the JSON report goes.
    #[arg(long, default_value = "target/bench/latest.json")]
    json: PathBuf,
}

impl Args {
    fn sagas(&self, clients: u32) -> u32 {
        self.sagas.unwrap_or(if self.small {
            60 + 5 * clients
        } else {
            1_000 + 180 * clients
        })
    }

    fn yardstick_time(&self) -> Duration {
        Duration::from_secs(if self.small { 2 } else { 10 })
    }
}

/// A saga type whose one step calls a participant that never answers and is retried an hour
/// later: what a saga waiting on a long retry looks like, for the grown database.
const WAITING_DEFINITION: &str = r#"
name = "bench_waiting"
version = 1

[defaults]
timeout = "1s"

[[steps]]
name = "call_the_unreachable"
participant = "unreachable"
action = "Wait"
retry = { max_attempts = 0, initial_delay = "1h", multiplier = 1.0, max_delay = "1h", jitter = 0.0 }
"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cluster = PrivateCluster::start_durable()
        .await
        .context("starting a private Postgres cluster")?;
    let mut report = Report::new(&cluster).await?;
    let server = if args.unix_socket {
        report.connection = "unix socket";
        cluster.socket_url()
    } else {
        cluster.server_url()
    };
    eprintln!("{}", report.machine_line());

    eprintln!("yardstick: pgbench, one insert and one update per transaction…");
    report.yardstick = yardstick::measure(&cluster, args.yardstick_time()).await?;
    eprintln!("{}", report.yardstick_lines());

    let demo_defs = sagad_e2e::repo_root().join("saga-defs");
    let order_definition = std::fs::read_to_string(demo_defs.join("order_fulfillment.toml"))
        .context("reading saga-defs/order_fulfillment.toml")?;
    let defs = Scratch::defs(&[
        ("order_fulfillment.toml", &order_definition),
        ("bench_waiting.toml", WAITING_DEFINITION),
    ])?;
    let unreachable = format!("unreachable=http://127.0.0.1:{}", sagad_e2e::free_port()?);
    let options = DemoOptions {
        sagad_args: vec!["--participant".to_owned(), unreachable],
        sagad_server: Some(server.clone()),
        participant_server: Some(server),
        ..DemoOptions::default()
    };
    let mut system = DemoSystem::start("bench", &defs, options).await?;
    let outcome = run(&args, &cluster, &mut system, &mut report).await;
    system.shut_down_after(outcome).await?;

    println!("{}", report.text());
    if let Some(folder) = args.json.parent() {
        std::fs::create_dir_all(folder)
            .with_context(|| format!("creating {}", folder.display()))?;
    }
    std::fs::write(&args.json, format!("{:#}\n", report.json()))
        .with_context(|| format!("writing {}", args.json.display()))?;
    eprintln!("JSON report: {}", args.json.display());
    Ok(())
}

async fn run(
    args: &Args,
    cluster: &PrivateCluster,
    system: &mut DemoSystem,
    report: &mut Report,
) -> anyhow::Result<()> {
    let warm_up = Level::new("warm-up", 16, if args.small { 50 } else { 500 });
    level::run(cluster, system, &warm_up).await?;
    for &clients in &args.clients {
        let level = Level::new("empty", clients, args.sagas(clients));
        eprintln!("{clients} clients, {} sagas…", level.sagas);
        let measured = level::run(cluster, system, &level).await?;
        eprintln!("{}", report::level_line(&measured));
        report.levels.push(measured);
    }
    if args.no_growth {
        return Ok(());
    }
    let finished = args
        .finished
        .unwrap_or(if args.small { 20_000 } else { 1_000_000 });
    let waiting = args
        .waiting
        .unwrap_or(if args.small { 2_000 } else { 100_000 });
    eprintln!("growing the database: {finished} finished sagas, {waiting} waiting an hour…");
    report.growth = Some(growth::grow(cluster, system, finished, waiting).await?);
    // A new sagad process, so that its peak memory is the grown database's.
    system.restart_replica(0).await?;
    let busiest = args.clients.iter().copied().max().unwrap_or(64);
    let level = Level::new("grown", busiest, args.sagas(busiest));
    eprintln!(
        "{busiest} clients on the grown database, {} sagas…",
        level.sagas
    );
    let measured = level::run(cluster, system, &level).await?;
    eprintln!("{}", report::level_line(&measured));
    report.levels.push(measured);
    Ok(())
}
