//! The yardstick: what this machine's Postgres does with the smallest durable transaction
//! worth the name (one insert, one update), measured by pgbench in the same run, so sagad's
//! figures can be read against the machine rather than in the abstract.

use std::time::Duration;

use anyhow::Context as _;
use sagad_e2e::postgres::PrivateCluster;
use serde_json::{Value, json};

/// The transaction pgbench runs: one insert and one update, as a saga's step record is.
const SCRIPT: &str = "\\set aid random(1, 100000)
begin;
insert into yard_history (aid, delta) values (:aid, 1);
update yard_accounts set balance = balance + 1 where aid = :aid;
commit;
";

const SETUP: &str = "create table yard_accounts (aid int primary key, balance bigint not null default 0);
insert into yard_accounts (aid) select generate_series(1, 100000);
create table yard_history (aid int not null, delta int not null, at timestamptz not null default now());";

/// pgbench's figures at one client count.
#[derive(Debug, Clone, Default)]
pub(crate) struct Run {
    pub(crate) clients: u32,
    pub(crate) transactions_per_sec: f64,
    pub(crate) latency_ms: f64,
}

impl Run {
    pub(crate) fn json(&self) -> Value {
        json!({
            "clients": self.clients,
            "transactions_per_sec": self.transactions_per_sec,
            "latency_ms": self.latency_ms,
        })
    }
}

/// pgbench at 1 and 32 clients, each for `time`, on a database of its own in `cluster`.
pub(crate) async fn measure(cluster: &PrivateCluster, time: Duration) -> anyhow::Result<Vec<Run>> {
    let port = cluster.port().to_string();
    let connect = ["-h", "127.0.0.1", "-p", port.as_str(), "-U", "postgres"];
    cluster
        .tool(
            "psql",
            &[&connect[..], &["-q", "-c", "create database yardstick"]].concat(),
        )
        .await?;
    cluster
        .tool(
            "psql",
            &[
                &connect[..],
                &[
                    "-q",
                    "-d",
                    "yardstick",
                    "-c",
                    SETUP,
                    "-c",
                    "vacuum analyze yard_accounts",
                ],
            ]
            .concat(),
        )
        .await?;
    let script = std::env::temp_dir().join(format!("sagad-yardstick-{}.sql", std::process::id()));
    std::fs::write(&script, SCRIPT).with_context(|| format!("writing {}", script.display()))?;
    // pgbench runs as the cluster's OS user, who must be able to read the script.
    let script_path = script.display().to_string();
    let seconds = time.as_secs().max(1).to_string();
    let mut runs = Vec::new();
    for clients in [1_u32, 32] {
        let clients_text = clients.to_string();
        let threads = clients.min(2).to_string();
        let printed = cluster
            .tool(
                "pgbench",
                &[
                    &connect[..],
                    &[
                        "-n",
                        "-f",
                        &script_path,
                        "-c",
                        &clients_text,
                        "-j",
                        &threads,
                        "-T",
                        &seconds,
                        "yardstick",
                    ],
                ]
                .concat(),
            )
            .await;
        let printed = printed?;
        runs.push(parse(clients, &printed)?);
    }
    let _ = std::fs::remove_file(&script);
    Ok(runs)
}

/// Reads `latency average = 0.470 ms` and `tps = 2127.1 (without initial connection time)`.
fn parse(clients: u32, printed: &str) -> anyhow::Result<Run> {
    let number_after = |prefix: &str| -> Option<f64> {
        printed.lines().find_map(|line| {
            line.trim()
                .strip_prefix(prefix)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
    };
    Ok(Run {
        clients,
        transactions_per_sec: number_after("tps = ")
            .with_context(|| format!("no tps in pgbench's output: {printed}"))?,
        latency_ms: number_after("latency average = ")
            .with_context(|| format!("no latency in pgbench's output: {printed}"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pgbench_figures() -> anyhow::Result<()> {
        let printed = "transaction type: /tmp/x.sql\nnumber of clients: 1\n\
                       latency average = 0.470 ms\ninitial connection time = 2.1 ms\n\
                       tps = 2127.100 (without initial connection time)\n";
        let run = parse(1, printed)?;
        assert_eq!(run.latency_ms, 0.470);
        assert_eq!(run.transactions_per_sec, 2127.1);
        Ok(())
    }
}
