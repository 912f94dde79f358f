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
