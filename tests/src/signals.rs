//! Signals the tests send to processes they pause and resume (a sagad replica, a Postgres
//! cluster), and what the kernel says of those processes in `/proc`.

use std::time::Duration;

use anyhow::{Context, ensure};
use tokio::process::Command;

/// `kill -<name> <pid>`.
pub async fn send(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .await?;
    ensure!(status.success(), "kill -{name} {pid} failed");
    Ok(())
}

/// The fields of `/proc/<pid>/stat` after the command name: `pid (comm) S ppid …`, where the
/// name may hold spaces and parentheses, so the fields start after the last parenthesis.
fn stat_fields(pid: u32) -> anyhow::Result<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let (_, rest) = stat.rsplit_once(')').context("unreadable /proc stat")?;
    Ok(rest.split_whitespace().map(str::to_owned).collect())
}

/// The process's state letter (`R`, `S`, `T` for stopped, …).
pub fn state(pid: u32) -> anyhow::Result<char> {
    stat_fields(pid)?
        .first()
        .and_then(|state| state.chars().next())
        .context("no state in /proc stat")
}

/// The processes whose parent is `pid`, as `/proc` shows them now.
pub fn children(pid: u32) -> anyhow::Result<Vec<u32>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(child) = entry?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // A process that ended since the listing has no stat left: it is no child anymore.
        let Ok(fields) = stat_fields(child) else {
            continue;
        };
        if fields.get(1).and_then(|ppid| ppid.parse::<u32>().ok()) == Some(pid) {
            found.push(child);
        }
    }
    Ok(found)
}

/// Waits until the process's state letter satisfies `done`.
pub async fn wait_state(pid: u32, done: impl Fn(char) -> bool) -> anyhow::Result<()> {
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let state = state(pid)?;
        if done(state) {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < until,
            "process {pid} stays in state {state}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Like [`wait_state`], but a process that has ended is done with too: a backend of a cluster
/// being stopped or resumed may exit at any moment (its client went away meanwhile).
pub async fn wait_state_or_gone(pid: u32, done: impl Fn(char) -> bool) -> anyhow::Result<()> {
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let Ok(state) = state(pid) else {
            return Ok(());
        };
        if done(state) {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < until,
            "process {pid} stays in state {state}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// CPU time a process used, as `/proc/<pid>/stat` counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTime {
    /// Its own, user and system.
    pub own: Duration,
    /// Its children's that have ended and been waited for, user and system.
    pub reaped_children: Duration,
}

/// The CPU time `pid` has used so far.
pub fn cpu_time(pid: u32) -> anyhow::Result<CpuTime> {
    let fields = stat_fields(pid)?;
    // Fields 14 to 17 of proc(5) (utime, stime, cutime, cstime); the list starts at field 3.
    let ticks = |field: usize| -> anyhow::Result<u64> {
        fields
            .get(field - 3)
            .and_then(|value| value.parse().ok())
            .with_context(|| format!("no field {field} in /proc/{pid}/stat"))
    };
    let per_second = rustix::param::clock_ticks_per_second().max(1);
    let time = |ticks: u64| Duration::from_secs_f64(ticks as f64 / per_second as f64);
    Ok(CpuTime {
        own: time(ticks(14)? + ticks(15)?),
        reaped_children: time(ticks(16)? + ticks(17)?),
    })
}

/// The most resident memory `pid` has used (`VmHWM`), in bytes.
pub fn peak_rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
        .with_context(|| format!("no VmHWM in /proc/{pid}/status"))
}
