//! One level of the benchmark: `sagactl bench` at a client count, and what every process and
//! database spent on it, read from `/proc` and `pg_stat_database` before and after.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use sagad_e2e::demo::DemoSystem;
use sagad_e2e::postgres::PrivateCluster;
use sagad_e2e::signals::{self, CpuTime};
use serde_json::Value;
use sqlx::Connection as _;

/// How long Postgres may keep a backend's transaction counts before it publishes them: an idle
/// backend flushes its statistics within ten seconds.
const STATS_SETTLE: Duration = Duration::from_secs(11);

/// The demo's processes, by the names the report uses, sagad first.
pub(crate) const PROCESSES: [&str; 4] = ["sagad", "order", "payment", "shipping"];

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct Level {
    /// Which database it ran on: `empty` (only the benchmark's own sagas) or `grown`.
    pub(crate) label: &'static str,
    pub(crate) clients: u32,
    pub(crate) sagas: u32,
}

impl Level {
    pub(crate) fn new(label: &'static str, clients: u32, sagas: u32) -> Self {
        Self {
            label,
            clients,
            sagas,
        }
    }
}

/// What a level measured.
#[derive(Debug, Clone)]
pub(crate) struct Measured {
    pub(crate) level: Level,
    /// `sagactl bench`'s own report: throughput, latency percentiles, how the sagas ended.
    pub(crate) client: Value,
    /// CPU time per process over the level: the demo's processes, `postgres` (every backend
    /// and helper process of the cluster) and `client` (sagactl).
    pub(crate) cpu: BTreeMap<&'static str, Duration>,
    /// sagad's peak resident memory since it started, in bytes.
    pub(crate) sagad_peak_rss: u64,
    /// Transactions committed per database (by the process it belongs to) over the level,
    /// less what the idle system commits in the time the statistics took to settle.
    pub(crate) transactions: BTreeMap<&'static str, f64>,
}

impl Measured {
    pub(crate) fn figure(&self, name: &str) -> f64 {
        self.client.get(name).and_then(Value::as_f64).unwrap_or(0.0)
    }

    /// CPU milliseconds per saga, of one process or (`None`) of all together.
    pub(crate) fn cpu_ms_per_saga(&self, process: Option<&str>) -> f64 {
        let spent: Duration = match process {
            Some(name) => self.cpu.get(name).copied().unwrap_or_default(),
            None => self.cpu.values().sum(),
        };
        spent.as_secs_f64() * 1000.0 / f64::from(self.level.sagas.max(1))
    }

    pub(crate) fn transactions_per_saga(&self, database: &str) -> f64 {
        self.transactions.get(database).copied().unwrap_or(0.0) / f64::from(self.level.sagas.max(1))
    }
}

/// Runs `level` against `system` and measures it.
pub(crate) async fn run(
    cluster: &PrivateCluster,
    system: &DemoSystem,
    level: &Level,
) -> anyhow::Result<Measured> {
    let pids = pids(system)?;
    let mut stats = sqlx::PgConnection::connect(&format!("{}/postgres", cluster.server_url()))
        .await
        .context("connecting to the cluster for its statistics")?;
    // The system at rest: what it commits in the time the statistics take to settle.
    let rest_began = transactions(&mut stats).await?;
    tokio::time::sleep(STATS_SETTLE).await;
    let before_transactions = transactions(&mut stats).await?;
    let at_rest = difference(&before_transactions, &rest_began);

    let before_cpu = cpu(cluster, &pids)?;
    let client = run_client(system, level).await?;
    let after_cpu = cpu(cluster, &pids)?;
    tokio::time::sleep(STATS_SETTLE).await;
    let after_transactions = transactions(&mut stats).await?;

    let cpu = after_cpu
        .iter()
        .map(|(name, after)| {
            let before = before_cpu.get(name).copied().unwrap_or_default();
            (*name, after.saturating_sub(before))
        })
        .collect();
    let transactions = difference(&after_transactions, &before_transactions)
        .into_iter()
        .map(|(name, committed)| {
            let idle = at_rest.get(name).copied().unwrap_or(0.0);
            (name, (committed - idle).max(0.0))
        })
        .collect();
    let sagad_peak_rss = signals::peak_rss_bytes(pids[0])?;
    Ok(Measured {
        level: level.clone(),
        client,
        cpu,
        sagad_peak_rss,
        transactions,
    })
}

/// The process ids of sagad and the participants, in [`PROCESSES`] order.
fn pids(system: &DemoSystem) -> anyhow::Result<[u32; 4]> {
    let sagad = system.replica(0)?.pid();
    match (
        sagad,
        system.order.pid(),
        system.payment.pid(),
        system.shipping.pid(),
    ) {
        (Some(sagad), Some(order), Some(payment), Some(shipping)) => {
            Ok([sagad, order, payment, shipping])
        }
        _ => bail!("a process of the demo system is not running"),
    }
}

/// The CPU time used so far by each process of the run. The client's is what this process's
/// ended and waited-for children used: sagactl is the only one that ends during a level.
fn cpu(
    cluster: &PrivateCluster,
    pids: &[u32; 4],
) -> anyhow::Result<BTreeMap<&'static str, Duration>> {
    let mut spent = BTreeMap::new();
    for (name, pid) in PROCESSES.iter().zip(pids) {
        spent.insert(*name, signals::cpu_time(*pid)?.own);
    }
    spent.insert("postgres", cluster_cpu(cluster.postmaster_pid()?)?);
    spent.insert(
        "client",
        signals::cpu_time(std::process::id())?.reaped_children,
    );
    Ok(spent)
}

/// Everything the cluster has used: the postmaster, its live children, and the children it
/// has reaped (backends that ended).
fn cluster_cpu(postmaster: u32) -> anyhow::Result<Duration> {
    let CpuTime {
        own,
        reaped_children,
    } = signals::cpu_time(postmaster)?;
    let mut total = own + reaped_children;
    for child in signals::children(postmaster)? {
        // A backend that ended since the listing: its time is now among the reaped.
        if let Ok(time) = signals::cpu_time(child) {
            total += time.own;
        }
    }
    Ok(total)
}

/// Transactions committed so far in each of the demo's databases.
async fn transactions(
    stats: &mut sqlx::PgConnection,
) -> anyhow::Result<BTreeMap<&'static str, f64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "select datname::text, xact_commit from pg_stat_database where datname like 'sagad_test_bench%'",
    )
    .fetch_all(&mut *stats)
    .await
    .context("reading pg_stat_database")?;
    let mut committed = BTreeMap::new();
    for (database, count) in rows {
        let owner = if database == "sagad_test_bench" {
            "sagad"
        } else if let Some(participant) = PROCESSES[1..]
            .iter()
            .find(|name| database.starts_with(&format!("sagad_test_bench_{name}_")))
        {
            participant
        } else {
            continue;
        };
        committed.insert(owner, count as f64);
    }
    Ok(committed)
}

fn difference(
    after: &BTreeMap<&'static str, f64>,
    before: &BTreeMap<&'static str, f64>,
) -> BTreeMap<&'static str, f64> {
    after
        .iter()
        .map(|(name, count)| (*name, count - before.get(name).copied().unwrap_or(0.0)))
        .collect()
}

/// `sagactl bench` at the level's client count, with a tenth of the sagas refused by
/// shipping (so compensation is measured); its JSON report.
async fn run_client(system: &DemoSystem, level: &Level) -> anyhow::Result<Value> {
    let sagas = level.sagas.to_string();
    let clients = level.clients.to_string();
    sagactl(
        system,
        &[
            "bench",
            "--sagas",
            &sagas,
            "--concurrency",
            &clients,
            "--refused-fraction",
            "0.1",
            "--timeout",
            "20m",
        ],
    )
    .await
}

/// Runs `sagactl` against the system's sagad with JSON output; the last line it printed.
pub(crate) async fn sagactl(system: &DemoSystem, args: &[&str]) -> anyhow::Result<Value> {
    let sagactl = sagad_e2e::daemon::binary("sagactl")?;
    let output = tokio::process::Command::new(&sagactl)
        .args(["--server", &system.server(), "--output", "json"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", sagactl.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "sagactl {} failed ({}): {}{}",
            args.first().unwrap_or(&""),
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("sagactl printed {line:?}"))
}
