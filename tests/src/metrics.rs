//! Reads a sagad process's Prometheus metrics (`GET /metrics` at its `--metrics-listen`
//! address) with a plain HTTP/1.0 request: the figures a test checks beside the API's answers.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, ensure};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The metrics page as text. The exporter answers from memory, so it answers even while the
/// database does not; 10 s is the bound for a loaded machine.
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    tokio::time::timeout(Duration::from_secs(10), fetch(addr))
        .await
        .with_context(|| format!("GET http://{addr}/metrics did not answer within 10 s"))?
}

async fn fetch(addr: SocketAddr) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the metrics listener {addr}"))?;
    stream
        .write_all(
            format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("a metrics response without a blank line after its head")?;
    let status_line = head.lines().next().unwrap_or_default();
    ensure!(
        status_line.split_whitespace().nth(1) == Some("200"),
        "GET http://{addr}/metrics answered {status_line:?}"
    );
    Ok(body.to_owned())
}

/// The sum of every series of metric `name` on the page (all label sets); 0 when the page has
/// none, as for a counter never incremented since the process started.
pub fn total(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .fold(0.0, |total, value| total + value)
}
