//! The figures, as text for people and JSON for tools, with the targets they are held to.
//! The targets are reported as met or missed, never asserted.

use anyhow::Context as _;
use sagad_e2e::postgres::PrivateCluster;
use serde_json::{Value, json};
use sqlx::Connection as _;

use crate::growth::Growth;
use crate::level::{Measured, PROCESSES};
use crate::yardstick;

/// One MiB.
const MIB: f64 = 1024.0 * 1024.0;

pub(crate) struct Report {
    machine: Value,
    /// How sagad and the participants reach Postgres: `tcp` or `unix socket`.
    pub(crate) connection: &'static str,
    pub(crate) yardstick: Vec<yardstick::Run>,
    pub(crate) levels: Vec<Measured>,
    pub(crate) growth: Option<Growth>,
}

impl Report {
    /// An empty report, with what the machine and the cluster are.
    pub(crate) async fn new(cluster: &PrivateCluster) -> anyhow::Result<Self> {
        let mut db = sqlx::PgConnection::connect(&format!("{}/postgres", cluster.server_url()))
            .await
            .context("connecting to the private cluster")?;
        let settings: Vec<(String, String)> = sqlx::query_as(
            "select name, setting from pg_settings
             where name in ('server_version', 'fsync', 'synchronous_commit', 'shared_buffers',
                            'max_connections')
             order by name",
        )
        .fetch_all(&mut db)
        .await?;
        let postgres: serde_json::Map<String, Value> = settings
            .into_iter()
            .map(|(name, setting)| (name, Value::String(setting)))
            .collect();
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|line| line.strip_prefix("model name"))
                    .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_default();
        let memory_kib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|line| line.strip_prefix("MemTotal:"))
                    .and_then(|rest| {
                        rest.trim()
                            .trim_end_matches("kB")
                            .trim()
                            .parse::<u64>()
                            .ok()
                    })
            })
            .unwrap_or_default();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|text| text.trim().to_owned())
            .unwrap_or_default();
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        Ok(Self {
            machine: json!({
                "cpu": cpu_model,
                "cores": cores,
                "memory_gib": (memory_kib as f64 / MIB * 10.0).round() / 10.0,
                "kernel": kernel,
                "postgres": postgres,
            }),
            connection: "tcp",
            yardstick: Vec::new(),
            levels: Vec::new(),
            growth: None,
        })
    }

    pub(crate) fn machine_line(&self) -> String {
        let postgres = &self.machine["postgres"];
        format!(
            "machine: {} ({} cores, {} GiB), Linux {}; Postgres {} (fsync {}, synchronous_commit {}, shared_buffers {} pages, reached by {})",
            self.machine["cpu"].as_str().unwrap_or("?"),
            self.machine["cores"],
            self.machine["memory_gib"],
            self.machine["kernel"].as_str().unwrap_or("?"),
            postgres["server_version"].as_str().unwrap_or("?"),
            postgres["fsync"].as_str().unwrap_or("?"),
            postgres["synchronous_commit"].as_str().unwrap_or("?"),
            postgres["shared_buffers"].as_str().unwrap_or("?"),
            self.connection,
        )
    }

    pub(crate) fn yardstick_lines(&self) -> String {
        self.yardstick
            .iter()
            .map(|run| {
                format!(
                    "yardstick (pgbench, 1 insert + 1 update) at {:>2} clients: {:>8.1} tx/s, {:.3} ms average",
                    run.clients, run.transactions_per_sec, run.latency_ms
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Everything, for people.
    pub(crate) fn text(&self) -> String {
        let mut lines = vec![self.machine_line(), self.yardstick_lines()];
        if let Some(growth) = &self.growth {
            lines.push(format!(
                "grown database: {} finished and {} waiting sagas loaded in {:.0} s (sagas {} MiB, events {} MiB)",
                growth.finished,
                growth.waiting,
                growth.load_seconds,
                growth.sagas_table_bytes / (1024 * 1024),
                growth.events_table_bytes / (1024 * 1024),
            ));
        }
        lines.push(String::new());
        lines.push(format!(
            "{:<6} {:>7} {:>6} {:>8} {:>7} {:>7} {:>7} {:>7} | {}| {:>6} {:>8} | {}",
            "db",
            "clients",
            "sagas",
            "sagas/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            ["sagad", "order", "paymt", "ship", "pg", "client", "total"]
                .map(|name| format!("{name:>6} "))
                .concat(),
            "RSS",
            "ended",
            PROCESSES
                .map(|name| format!("{:>6} ", &name[..name.len().min(6)]))
                .concat(),
        ));
        lines.push(format!(
            "{:<49} | {:<49}| {:>6} {:>8} | {}",
            "", "CPU ms per saga", "MiB", "ok/comp", "transactions per saga"
        ));
        for measured in &self.levels {
            lines.push(level_line(measured));
        }
        lines.push(String::new());
        lines.push("targets (one run on this machine; reported, not asserted):".to_owned());
        for (target, verdict) in self.targets() {
            lines.push(format!("  {verdict:<6} {target}"));
        }
        lines.join("\n")
    }

    /// Everything, for tools.
    pub(crate) fn json(&self) -> Value {
        json!({
            "machine": self.machine,
            "connection": self.connection,
            "yardstick": self.yardstick.iter().map(yardstick::Run::json).collect::<Vec<_>>(),
            "growth": self.growth.as_ref().map(Growth::json),
            "levels": self.levels.iter().map(level_json).collect::<Vec<_>>(),
            "targets": self.targets().into_iter().map(|(target, verdict)| json!({
                "target": target,
                "verdict": verdict,
            })).collect::<Vec<_>>(),
        })
    }

    fn level(&self, label: &str, clients: u32) -> Option<&Measured> {
        self.levels
            .iter()
            .find(|measured| measured.level.label == label && measured.level.clients == clients)
    }

    /// Each target with `met`, `missed` or `n/a` (its level was not run).
    fn targets(&self) -> Vec<(String, &'static str)> {
        let verdict = |met: Option<bool>| match met {
            Some(true) => "met",
            Some(false) => "missed",
            None => "n/a",
        };
        let busy = self.level("empty", 64);
        let single = self.level("empty", 1);
        let grown = self
            .levels
            .iter()
            .find(|measured| measured.level.label == "grown");
        let pgbench_1 = self
            .yardstick
            .iter()
            .find(|run| run.clients == 1)
            .map(|run| run.latency_ms);
        let rss_mib = |measured: &Measured| measured.sagad_peak_rss as f64 / MIB;
        let mut targets = Vec::new();
        targets.push((
            format!(
                "64 clients: >= 920 sagas/s with p99 <= 150 ms (got {})",
                busy.map_or("-".to_owned(), |m| format!(
                    "{:.0}/s, p99 {:.0} ms",
                    m.figure("sagas_per_sec"),
                    m.figure("p99_ms")
                ))
            ),
            verdict(
                busy.map(|m| m.figure("sagas_per_sec") >= 920.0 && m.figure("p99_ms") <= 150.0),
            ),
        ));
        targets.push((
            format!(
                "64 clients: <= 2.0 CPU ms per saga, every process together (got {})",
                busy.map_or("-".to_owned(), |m| format!(
                    "{:.2}",
                    m.cpu_ms_per_saga(None)
                ))
            ),
            verdict(busy.map(|m| m.cpu_ms_per_saga(None) <= 2.0)),
        ));
        let single_target = pgbench_1.map(|latency| 1.25 * 9.0 * latency);
        targets.push((
            format!(
                "1 client: p50 <= 1.25 x 9 x pgbench's 1-client latency = {} ms, p99 <= 2 x p50 (got {})",
                single_target.map_or("-".to_owned(), |ms| format!("{ms:.2}")),
                single.map_or("-".to_owned(), |m| format!(
                    "p50 {:.2} ms, p99 {:.2} ms",
                    m.figure("p50_ms"),
                    m.figure("p99_ms")
                ))
            ),
            verdict(single.zip(single_target).map(|(m, limit)| {
                m.figure("p50_ms") <= limit && m.figure("p99_ms") <= 2.0 * m.figure("p50_ms")
            })),
        ));
        targets.push((
            format!(
                "sagad's peak RSS <= 100 MiB at 64 clients (got {})",
                busy.map_or("-".to_owned(), |m| format!("{:.0} MiB", rss_mib(m)))
            ),
            verdict(busy.map(|m| rss_mib(m) <= 100.0)),
        ));
        targets.push((
            format!(
                "grown database: sagad's peak RSS <= 100 MiB with {} sagas waiting (got {})",
                self.growth.as_ref().map_or(0, |growth| growth.waiting),
                grown.map_or("-".to_owned(), |m| format!("{:.0} MiB", rss_mib(m)))
            ),
            verdict(grown.map(|m| rss_mib(m) <= 100.0)),
        ));
        let empty_busiest = grown.and_then(|g| self.level("empty", g.level.clients));
        targets.push((
            format!(
                "grown database: throughput and p99 within 10% of the empty database (got {})",
                grown
                    .zip(empty_busiest)
                    .map_or("-".to_owned(), |(g, e)| format!(
                        "{:.0}/s vs {:.0}/s, p99 {:.0} vs {:.0} ms",
                        g.figure("sagas_per_sec"),
                        e.figure("sagas_per_sec"),
                        g.figure("p99_ms"),
                        e.figure("p99_ms")
                    ))
            ),
            verdict(grown.zip(empty_busiest).map(|(g, e)| {
                g.figure("sagas_per_sec") >= 0.9 * e.figure("sagas_per_sec")
                    && g.figure("p99_ms") <= 1.1 * e.figure("p99_ms")
            })),
        ));
        targets
    }
}

/// One level on one line.
pub(crate) fn level_line(measured: &Measured) -> String {
    let cpu = [
        "sagad", "order", "payment", "shipping", "postgres", "client",
    ]
    .map(|name| format!("{:>6.2} ", measured.cpu_ms_per_saga(Some(name))))
    .concat();
    let transactions = PROCESSES
        .map(|name| format!("{:>6.1} ", measured.transactions_per_saga(name)))
        .concat();
    format!(
        "{:<6} {:>7} {:>6} {:>8.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1} | {}{:>6.2} | {:>6.0} {:>8} | {}",
        measured.level.label,
        measured.level.clients,
        measured.level.sagas,
        measured.figure("sagas_per_sec"),
        measured.figure("p50_ms"),
        measured.figure("p90_ms"),
        measured.figure("p99_ms"),
        measured.figure("max_ms"),
        cpu,
        measured.cpu_ms_per_saga(None),
        measured.sagad_peak_rss as f64 / MIB,
        format!(
            "{}/{}",
            measured.figure("completed"),
            measured.figure("compensated")
        ),
        transactions,
    )
}

fn level_json(measured: &Measured) -> Value {
    let cpu: serde_json::Map<String, Value> = measured
        .cpu
        .keys()
        .map(|name| {
            (
                (*name).to_owned(),
                json!(round(measured.cpu_ms_per_saga(Some(name)))),
            )
        })
        .chain([(
            "total".to_owned(),
            json!(round(measured.cpu_ms_per_saga(None))),
        )])
        .collect();
    let transactions: serde_json::Map<String, Value> = PROCESSES
        .iter()
        .map(|name| {
            (
                (*name).to_owned(),
                json!(round(measured.transactions_per_saga(name))),
            )
        })
        .collect();
    json!({
        "database": measured.level.label,
        "clients": measured.level.clients,
        "sagas": measured.level.sagas,
        "client_report": measured.client,
        "cpu_ms_per_saga": cpu,
        "sagad_peak_rss_mib": round(measured.sagad_peak_rss as f64 / MIB),
        "transactions_per_saga": transactions,
    })
}

fn round(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}
