//! `sagactl bench`: starts N sagas, C at a time, waits for each to end (long-polling
//! `GetSaga` with `min_version`), and reports throughput and the latency from the `StartSaga`
//! call to the terminal status seen. A progress bar shows on stderr when it is a terminal.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;

use futures::{StreamExt as _, TryStreamExt as _};
use sagad_proto::v1 as pb;
use serde_json::{Map, Value, json};

use super::{BenchArgs, Server, is_terminal, progress_bar, to_struct, wait_for_end};

/// The input used when `--input` is not given (the demo domain's order).
fn default_input() -> Map<String, Value> {
    let value = json!({
        "amount_cents": 1000,
        "currency": "EUR",
        "country": "FR",
        "items": [{"sku": "sku-1", "quantity": 1}],
    });
    match value {
        Value::Object(fields) => fields,
        _ => Map::new(),
    }
}

/// The destination the demo's shipping-service refuses by default.
const REFUSED_COUNTRY: &str = "AQ";

/// Whether saga `index` of the run goes to the refused destination: `fraction` of them, spread
/// evenly over the run.
fn refused(index: u32, fraction: f64) -> bool {
    let before = (f64::from(index) * fraction).floor();
    let after = (f64::from(index + 1) * fraction).floor();
    after > before
}

/// How many sagas ended so far, by how: for the progress bar and the timeout's message.
#[derive(Default)]
struct Tally {
    completed: AtomicU32,
    compensated: AtomicU32,
    failed: AtomicU32,
}

impl Tally {
    fn add(&self, status: i32) {
        let counter = match pb::SagaStatus::try_from(status) {
            Ok(pb::SagaStatus::Completed) => &self.completed,
            Ok(pb::SagaStatus::Compensated) => &self.compensated,
            _ => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn ended(&self) -> u32 {
        self.completed.load(Ordering::Relaxed)
            + self.compensated.load(Ordering::Relaxed)
            + self.failed.load(Ordering::Relaxed)
    }

    fn text(&self) -> String {
        format!(
            "{} completed, {} compensated, {} failed",
            self.completed.load(Ordering::Relaxed),
            self.compensated.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed)
        )
    }
}

/// Runs the benchmark and returns its report.
pub(super) async fn run(
    server: &Server,
    args: &BenchArgs,
    input: Option<Map<String, Value>>,
) -> anyhow::Result<Vec<(&'static str, Value)>> {
    let input = input.unwrap_or_else(default_input);
    let fresh_customer = !input.contains_key("customer_id");
    let progress = progress_bar(
        Some(u64::from(args.sagas)),
        "{elapsed_precise} [{bar:30}] {pos}/{len} sagas ended, {wide_msg}",
    );
    let began = Instant::now();
    let tally = Tally::default();
    let all = futures::stream::iter(0..args.sagas)
        .map(|index| {
            let mut input = input.clone();
            if fresh_customer {
                input.insert(
                    "customer_id".to_owned(),
                    Value::String(uuid::Uuid::new_v4().to_string()),
                );
            }
            if refused(index, args.refused_fraction) {
                input.insert(
                    "country".to_owned(),
                    Value::String(REFUSED_COUNTRY.to_owned()),
                );
            }
            let (tally, progress) = (&tally, &progress);
            let saga = one_saga(server, args.saga_type.clone(), input);
            async move {
                let outcome = saga.await?;
                tally.add(outcome.1);
                progress.inc(1);
                progress.set_message(tally.text());
                anyhow::Ok(outcome)
            }
        })
        .buffer_unordered(args.concurrency as usize)
        .try_collect::<Vec<(Duration, i32)>>();
    let finished = tokio::time::timeout(args.timeout, all).await;
    progress.finish_and_clear();
    let Ok(outcomes) = finished else {
        bail!(
            "bench did not finish within {}: {} of {} sagas ended",
            humantime::format_duration(args.timeout),
            tally.ended(),
            args.sagas
        );
    };
    let outcomes = outcomes?;
    let elapsed = began.elapsed();
    Ok(report(args, elapsed, &outcomes))
}

/// Starts one saga and waits for it to end: its latency and terminal status.
async fn one_saga(
    server: &Server,
    saga_type: String,
    input: Map<String, Value>,
) -> anyhow::Result<(Duration, i32)> {
    let started = Instant::now();
    let answer = server
        .client()
        .start_saga(pb::StartSagaRequest {
            saga_type,
            idempotency_key: String::new(),
            input: Some(to_struct(input)?),
            correlation_id: String::new(),
        })
        .await;
    let response = server.answer(answer).await?;
    let (version, status) = response
        .saga
        .as_ref()
        .map_or((0, 0), |saga| (saga.version, saga.status));
    if is_terminal(status) {
        return Ok((started.elapsed(), status));
    }
    let saga = wait_for_end(server, &response.saga_id, version + 1, |_| {}).await?;
    Ok((started.elapsed(), saga.status))
}

/// The nearest-rank percentile of sorted latencies, in milliseconds.
fn percentile_ms(sorted: &[Duration], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (fraction * sorted.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted.len()) - 1;
    millis(sorted[index])
}

fn millis(duration: Duration) -> f64 {
    round(duration.as_secs_f64() * 1000.0, 1)
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

/// The figures, in the order they are printed.
fn report(
    args: &BenchArgs,
    elapsed: Duration,
    outcomes: &[(Duration, i32)],
) -> Vec<(&'static str, Value)> {
    let mut latencies: Vec<Duration> = outcomes.iter().map(|(latency, _)| *latency).collect();
    latencies.sort();
    let count = |wanted: pb::SagaStatus| {
        outcomes
            .iter()
            .filter(|(_, status)| *status == wanted as i32)
            .count()
    };
    let seconds = elapsed.as_secs_f64();
    let per_sec = if seconds > 0.0 {
        outcomes.len() as f64 / seconds
    } else {
        0.0
    };
    vec![
        ("sagas", Value::from(args.sagas)),
        ("concurrency", Value::from(args.concurrency)),
        ("elapsed_s", Value::from(round(seconds, 3))),
        ("sagas_per_sec", Value::from(round(per_sec, 1))),
        ("p50_ms", Value::from(percentile_ms(&latencies, 0.50))),
        ("p90_ms", Value::from(percentile_ms(&latencies, 0.90))),
        ("p99_ms", Value::from(percentile_ms(&latencies, 0.99))),
        (
            "max_ms",
            Value::from(latencies.last().copied().map_or(0.0, millis)),
        ),
        ("completed", Value::from(count(pb::SagaStatus::Completed))),
        (
            "compensated",
            Value::from(count(pb::SagaStatus::Compensated)),
        ),
        ("failed", Value::from(count(pb::SagaStatus::Failed))),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refused_fraction_is_spread_over_the_run() {
        let picked = |fraction| (0..100).filter(|&index| refused(index, fraction)).count();
        assert_eq!(picked(0.0), 0);
        assert_eq!(picked(0.25), 25);
        assert_eq!(picked(1.0), 100);
        let quarter: Vec<u32> = (0..8).filter(|&index| refused(index, 0.25)).collect();
        assert_eq!(quarter, [3, 7]);
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let sorted: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&sorted, 0.50), 50.0);
        assert_eq!(percentile_ms(&sorted, 0.99), 99.0);
        assert_eq!(percentile_ms(&[Duration::from_millis(7)], 0.9), 7.0);
        assert_eq!(percentile_ms(&[], 0.5), 0.0);
    }
}
