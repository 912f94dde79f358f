//! Runs the real `sagactl` binary and reads what it printed.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use tokio::process::Command;

/// What one `sagactl` run printed, and how it ended.
#[derive(Debug)]
pub struct CliRun {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    /// Each line of stdout as a JSON object (`--output json`).
    pub fn json_lines(&self) -> anyhow::Result<Vec<Value>> {
        self.stdout
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                let value: Value = serde_json::from_str(line)
                    .with_context(|| format!("sagactl printed a line that is not JSON: {line}"))?;
                anyhow::ensure!(value.is_object(), "not a JSON object: {line}");
                Ok(value)
            })
            .collect()
    }

    /// The only JSON line on stdout.
    pub fn json(&self) -> anyhow::Result<Value> {
        let mut lines = self.json_lines()?;
        anyhow::ensure!(
            lines.len() == 1,
            "expected one JSON line, got {}: {}",
            lines.len(),
            self.stdout
        );
        Ok(lines.remove(0))
    }

    /// Fails, with everything printed, unless the run exited 0.
    pub fn ok(self) -> anyhow::Result<Self> {
        anyhow::ensure!(
            self.status.success(),
            "sagactl failed ({}): stdout {:?}, stderr {:?}",
            self.status,
            self.stdout,
            self.stderr
        );
        Ok(self)
    }
}

/// Runs `sagactl` with these arguments (and no `SAGAD_ADDR` from the caller's environment).
pub async fn sagactl(args: &[&str]) -> anyhow::Result<CliRun> {
    sagactl_with_env(args, &[]).await
}

/// Runs `sagactl` with these arguments and environment variables.
pub async fn sagactl_with_env(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<CliRun> {
    let mut command = Command::new(crate::daemon::binary("sagactl")?);
    command
        .args(args)
        .env_remove("SAGAD_ADDR")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .with_context(|| format!("sagactl {args:?} did not exit within 120 s"))??;
    Ok(CliRun {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// Starts `sagactl` with these arguments and its stdout piped, for a test that reads what it
/// prints while it runs (`watch`); killed if dropped.
pub fn spawn_sagactl(args: &[&str]) -> anyhow::Result<tokio::process::Child> {
    Command::new(crate::daemon::binary("sagactl")?)
        .args(args)
        .env_remove("SAGAD_ADDR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting sagactl")
}
