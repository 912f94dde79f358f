//! Reads a sagad process's HTTP endpoints (`/metrics`, `/healthz`, `/readyz` at its
//! `--http-listen` address) with plain HTTP/1.0 requests, and checks a metrics page with
//! Prometheus's own `promtool`.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;

/// The metrics page as text. The page is rendered from memory, so it answers even while the
/// database does not; 10 s is the bound for a loaded machine.
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let (status, body) = get(addr, "/metrics").await?;
    ensure!(
        status == 200,
        "GET http://{addr}/metrics answered {status}: {body}"
    );
    Ok(body)
}

/// `GET path`: the status code and the body, within 10 s.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let reply = crate::http::get(addr, path).await?;
    Ok((reply.status, reply.body))
}

/// The sum of every series of metric `name` on the page (all label sets); 0 when the page has
/// none, as for a counter never incremented since the process started.
pub fn total(page: &str, name: &str) -> f64 {
    value(page, name, &[])
}

/// The sum of the series of metric `name` (a histogram's `_count`, `_sum` or `_bucket` too)
/// whose labels include every one of `labels`.
pub fn value(page: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            let matches = metric == name
                && labels
                    .iter()
                    .all(|(label, value)| rest.contains(&format!("{label}=\"{value}\"")));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .fold(0.0, |total, value| total + value)
}

/// `promtool check metrics` on the page: what Prometheus's own linter says, which must be
/// nothing. promtool comes with Debian's `prometheus` package, which `scripts/test.sh`
/// installs (`scripts/ensure-promtool.sh`); without it this fails, it does not skip.
pub async fn promtool_check(page: &str) -> anyhow::Result<()> {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => bail!(
            "promtool is not installed: run scripts/ensure-promtool.sh (it installs Debian's \
             prometheus package, which scripts/test.sh does before the tests)"
        ),
        Err(error) => return Err(error).context("running promtool"),
    };
    let mut stdin = child.stdin.take().context("promtool's stdin")?;
    stdin.write_all(page.as_bytes()).await?;
    drop(stdin);
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .context("promtool did not finish within 60 s")??;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        output.status.success() && said.trim().is_empty(),
        "promtool check metrics: {}: {said}",
        output.status
    );
    Ok(())
}
