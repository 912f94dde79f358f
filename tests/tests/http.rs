//! sagad's HTTP side and its logs, on the real binary: every metric described from the first
//! scrape and moving as sagas run (histograms, linted by promtool), `/healthz` and `/readyz`
//! (and the explorer's 503) through a database outage, 404 elsewhere, the address flags and
//! variables, and JSON logs.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use sagad_e2e::participant::{Script, default_answer};
use sagad_e2e::postgres::PrivateCluster;
use sagad_e2e::*;
use sagad_proto::v1::{SagaStatus, StartSagaRequest};
use serde_json::{Value, json};

/// Two steps on participant `p`; step `b` is refused when the input says `refuse`, and then
/// `a` is compensated.
const FLOW: &str = r#"
name = "flow"
version = 1

[defaults]
timeout = "5s"
retry = { max_attempts = 3, initial_delay = "50ms", multiplier = 2.0, max_delay = "500ms", jitter = 0.0 }

[[steps]]
name = "a"
participant = "p"
action = "DoA"
compensation = "UndoA"

[[steps]]
name = "b"
participant = "p"
action = "DoB"
compensation = "UndoB"
"#;

/// One step on participant `p`, retried without end.
const SLOW: &str = r#"
name = "slow"
version = 1

[defaults]
timeout = "5s"
retry = { max_attempts = 0, initial_delay = "100ms", multiplier = 2.0, max_delay = "500ms", jitter = 0.0 }

[[steps]]
name = "a"
participant = "p"
action = "DoA"
compensation = "UndoA"
"#;

/// Every metric sagad promises, with its Prometheus type.
const METRICS: [(&str, &str); 13] = [
    ("sagad_sagas_started_total", "counter"),
    ("sagad_sagas_finished_total", "counter"),
    ("sagad_saga_duration_seconds", "histogram"),
    ("sagad_participant_calls_total", "counter"),
    ("sagad_participant_call_seconds", "histogram"),
    ("sagad_sagas_active", "gauge"),
    ("sagad_sagas_stuck", "gauge"),
    ("sagad_oldest_active_saga_age_seconds", "gauge"),
    ("sagad_sagas_driven", "gauge"),
    ("sagad_sagas_taken_over_total", "counter"),
    ("sagad_sagas_parked_total", "counter"),
    ("sagad_leases_lost_total", "counter"),
    ("sagad_writes_fenced_total", "counter"),
];

/// The default answers, but step `b` refused for an input with `"refuse": true`.
fn refusing_b() -> Script {
    Arc::new(|call: &CallRecord, _: &[CallRecord]| {
        if call.kind == CallKind::Execute
            && call.step == "b"
            && call.input["input"]["refuse"] == json!(true)
        {
            Answer::refuse("NO")
        } else {
            default_answer(call)
        }
    })
}

/// sagad's flags for `flow` on `database_url` (without the addresses).
fn flow_args(database_url: &str, defs: &Path, participant: &FakeParticipant) -> Vec<String> {
    vec![
        "--database-url".to_owned(),
        database_url.to_owned(),
        "--defs".to_owned(),
        defs.display().to_string(),
        "--participant".to_owned(),
        participant.flag(),
        "--lease-ttl".to_owned(),
        "2s".to_owned(),
        "--poll-interval".to_owned(),
        "200ms".to_owned(),
    ]
}

/// Starts a `flow` saga and returns its id.
async fn start_flow(
    client: &mut Client,
    refuse: bool,
    correlation_id: &str,
) -> anyhow::Result<String> {
    Ok(client
        .start_saga(StartSagaRequest {
            saga_type: "flow".to_owned(),
            input: Some(to_struct(json!({ "refuse": refuse }))),
            correlation_id: correlation_id.to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .saga_id)
}

/// Runs `body` with a fresh database on the shared server, a participant `p` refusing `b` when
/// asked, the `flow` definition and a log folder (kept when the body fails); drops the database
/// afterwards.
async fn with_flow<F, Fut>(label: &str, body: F) -> anyhow::Result<()>
where
    F: FnOnce(Vec<String>, std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut db = DatabaseGuard::new(label);
    let participant = FakeParticipant::start_scripted("p", refusing_b()).await?;
    let defs = Scratch::defs(&[("flow.toml", FLOW)])?;
    let mut logs = Scratch::logs(label)?;
    let args = flow_args(&db.url(), &defs, &participant);
    let outcome = match tokio::spawn(body(args, logs.to_path_buf())).await {
        Ok(outcome) => outcome,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(error) => Err(error.into()),
    };
    if outcome.is_err() {
        logs.keep();
        println!("logs kept in {}", logs.display());
    }
    db.drop_now().await?;
    outcome
}

/// Checks that every promised metric is described with its type, durations as histograms.
fn check_described(page: &str) -> anyhow::Result<()> {
    for (name, kind) in METRICS {
        ensure!(
            page.lines()
                .any(|line| line.starts_with(&format!("# HELP {name} "))
                    && line.len() > name.len() + 8),
            "no help text for {name}:\n{page}"
        );
        ensure!(
            page.lines()
                .any(|line| line == format!("# TYPE {name} {kind}")),
            "{name} is not described as a {kind}:\n{page}"
        );
    }
    ensure!(
        !page.contains("quantile="),
        "a summary on the page (durations must be histograms):\n{page}"
    );
    Ok(())
}

#[tokio::test]
async fn every_metric_is_described_from_the_first_scrape_and_moves_with_sagas() -> anyhow::Result<()>
{
    with_flow("http_metrics", |args, logs| async move {
        let sagad = SagadProcess::start(&args, &logs).await?;
        let fresh = metrics::scrape(sagad.http_addr).await?;
        check_described(&fresh)?;
        // The series known up front are there at zero: each saga type by terminal status, the
        // participant by kind and outcome, the durations' buckets.
        for status in ["COMPLETED", "COMPENSATED", "FAILED"] {
            let series = format!(
                "sagad_sagas_finished_total{{saga_type=\"flow\",status=\"{status}\"}} 0"
            );
            ensure!(fresh.lines().any(|line| line == series), "no {series}:\n{fresh}");
        }
        for (kind, outcome) in [("execute", "timeout"), ("compensate", "success")] {
            let series = format!(
                "sagad_participant_calls_total{{participant=\"p\",kind=\"{kind}\",outcome=\"{outcome}\"}} 0"
            );
            ensure!(fresh.lines().any(|line| line == series), "no {series}:\n{fresh}");
        }
        for name in ["sagad_saga_duration_seconds", "sagad_participant_call_seconds"] {
            ensure!(
                fresh.contains(&format!("{name}_bucket{{")),
                "no buckets of {name}:\n{fresh}"
            );
        }
        let active = "sagad_sagas_active{saga_type=\"flow\",status=\"RUNNING\"} 0";
        ensure!(fresh.lines().any(|line| line == active), "no {active}:\n{fresh}");
        metrics::promtool_check(&fresh)
            .await
            .context("the fresh page")?;
        println!(
            "fresh page: {} lines, {} families, promtool has nothing to say",
            fresh.lines().count(),
            fresh.lines().filter(|line| line.starts_with("# TYPE")).count()
        );

        let mut client = sagad.client().await?;
        let mut ids = Vec::new();
        for refuse in [false, false, false, true] {
            ids.push(start_flow(&mut client, refuse, "").await?);
        }
        for id in &ids {
            wait_terminal(&mut client, id, Duration::from_secs(60)).await?;
        }
        let page = metrics::scrape(sagad.http_addr).await?;
        check_described(&page)?;
        metrics::promtool_check(&page)
            .await
            .context("the page after four sagas")?;
        let value = |name: &str, labels: &[(&str, &str)]| metrics::value(&page, name, labels);
        let figures = [
            (
                "started",
                value("sagad_sagas_started_total", &[("saga_type", "flow")]),
                4.0,
            ),
            (
                "finished COMPLETED",
                value("sagad_sagas_finished_total", &[("status", "COMPLETED")]),
                3.0,
            ),
            (
                "finished COMPENSATED",
                value("sagad_sagas_finished_total", &[("status", "COMPENSATED")]),
                1.0,
            ),
            (
                "executes that succeeded",
                value(
                    "sagad_participant_calls_total",
                    &[("kind", "execute"), ("outcome", "success")],
                ),
                7.0,
            ),
            (
                "executes refused",
                value(
                    "sagad_participant_calls_total",
                    &[("kind", "execute"), ("outcome", "refused")],
                ),
                1.0,
            ),
            (
                "compensations",
                value(
                    "sagad_participant_calls_total",
                    &[("kind", "compensate"), ("outcome", "success")],
                ),
                1.0,
            ),
            (
                "calls timed",
                value("sagad_participant_call_seconds_count", &[("participant", "p")]),
                9.0,
            ),
            (
                "calls within 60 s",
                value(
                    "sagad_participant_call_seconds_bucket",
                    &[("participant", "p"), ("le", "60")],
                ),
                9.0,
            ),
            (
                "sagas timed",
                value("sagad_saga_duration_seconds_count", &[("saga_type", "flow")]),
                4.0,
            ),
            (
                "sagas timed, +Inf bucket",
                value(
                    "sagad_saga_duration_seconds_bucket",
                    &[("saga_type", "flow"), ("le", "+Inf")],
                ),
                4.0,
            ),
        ];
        for (what, got, want) in figures {
            println!("{what}: {got}");
            ensure!(got == want, "{what}: {got}, want {want}:\n{page}");
        }
        let took = value("sagad_saga_duration_seconds_sum", &[("saga_type", "flow")]);
        println!("the four sagas took {took:.3} s in all");
        ensure!(took > 0.0, "the sagas' durations add up to {took}");
        Ok(())
    })
    .await
}

/// Scrapes until `wanted` holds for the page (the sampled gauges change every few seconds);
/// returns the page and how long that took.
async fn wait_page(
    sagad: &SagadProcess,
    what: &str,
    wanted: impl Fn(&str) -> bool,
) -> anyhow::Result<(String, Duration)> {
    let started = Instant::now();
    loop {
        let page = metrics::scrape(sagad.http_addr).await?;
        if wanted(&page) {
            return Ok((page, started.elapsed()));
        }
        if started.elapsed() > Duration::from_secs(90) {
            bail!("the metrics page did not show {what} within 90 s:\n{page}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The value of the one series `series` (name and labels, as the page writes them).
fn series(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

#[tokio::test]
async fn the_sampled_gauges_follow_the_database_and_come_back_to_zero() -> anyhow::Result<()> {
    let mut db = DatabaseGuard::new("http_gauges");
    // Step `a` of a `slow` saga answers UNAVAILABLE while `held`: the saga stays RUNNING,
    // failing, and is stuck after a second.
    let held = Arc::new(AtomicBool::new(true));
    let holding = Arc::clone(&held);
    let script: Script = Arc::new(move |call: &CallRecord, _: &[CallRecord]| {
        if call.saga_type == "slow" && holding.load(Ordering::SeqCst) {
            Answer::status(tonic::Code::Unavailable)
        } else {
            default_answer(call)
        }
    });
    let participant = FakeParticipant::start_scripted("p", script).await?;
    let defs = Scratch::defs(&[("flow.toml", FLOW), ("slow.toml", SLOW)])?;
    let mut logs = Scratch::logs("http-gauges")?;
    let outcome = async {
        let mut args = flow_args(&db.url(), &defs, &participant);
        args.extend(["--stuck-after", "1s"].map(str::to_owned));
        let sagad = SagadProcess::start(&args, &logs).await?;
        const RUNNING: &str = "sagad_sagas_active{saga_type=\"slow\",status=\"RUNNING\"}";
        const STUCK: &str = "sagad_sagas_stuck";
        const OLDEST: &str = "sagad_oldest_active_saga_age_seconds";
        let fresh = metrics::scrape(sagad.http_addr).await?;
        for name in [RUNNING, STUCK, OLDEST] {
            ensure!(
                series(&fresh, name) == Some(0.0),
                "{name} is not 0 on a fresh page:\n{fresh}"
            );
        }

        let mut client = sagad.client().await?;
        let saga_id = client
            .start_saga(StartSagaRequest {
                saga_type: "slow".to_owned(),
                input: Some(to_struct(json!({}))),
                ..Default::default()
            })
            .await?
            .into_inner()
            .saga_id;
        let (page, took) = wait_page(&sagad, "the saga running, stuck and aging", |page| {
            series(page, RUNNING) == Some(1.0)
                && series(page, STUCK) == Some(1.0)
                && series(page, OLDEST).is_some_and(|age| age >= 1.0)
        })
        .await?;
        println!(
            "held saga sampled after {took:?}: running {:?}, stuck {:?}, oldest {:?} s",
            series(&page, RUNNING),
            series(&page, STUCK),
            series(&page, OLDEST)
        );

        held.store(false, Ordering::SeqCst);
        let saga = wait_terminal(&mut client, &saga_id, Duration::from_secs(60)).await?;
        ensure!(
            saga.status == SagaStatus::Completed as i32,
            "the released saga ended {:?}",
            SagaStatus::try_from(saga.status)
        );
        let (page, took) = wait_page(&sagad, "every gauge back at 0", |page| {
            [RUNNING, STUCK, OLDEST]
                .iter()
                .all(|name| series(page, name) == Some(0.0))
        })
        .await?;
        println!("released saga completed; gauges at 0 after {took:?}");
        let transient = metrics::value(
            &page,
            "sagad_participant_calls_total",
            &[("kind", "execute"), ("outcome", "transient")],
        );
        println!("transient answers while held: {transient}");
        ensure!(transient >= 1.0, "no transient call counted:\n{page}");
        Ok(())
    }
    .await;
    if outcome.is_err() {
        logs.keep();
        println!("logs kept in {}", logs.display());
    }
    db.drop_now().await?;
    outcome
}

/// Polls `GET path` until its status satisfies `wanted`; returns how long that took.
async fn wait_status(
    sagad: &SagadProcess,
    path: &str,
    what: &str,
    wanted: impl Fn(u16) -> bool,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < Duration::from_secs(90) {
        match metrics::get(sagad.http_addr, path).await {
            Ok((status, _)) if wanted(status) => return Ok(started.elapsed()),
            Ok((status, body)) => last = Some(format!("{status} {body}")),
            Err(error) => last = Some(format!("{error:#}")),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("GET {path} never became {what} within 90 s; last answer: {last:?}")
}

#[tokio::test]
async fn readiness_follows_the_database_health_the_process_and_other_paths_are_404()
-> anyhow::Result<()> {
    let cluster = PrivateCluster::start().await?;
    let participant = FakeParticipant::start_scripted("p", refusing_b()).await?;
    let defs = Scratch::defs(&[("flow.toml", FLOW)])?;
    let mut logs = Scratch::logs("http-ready")?;
    let url = format!("{}/sagad_http_ready", cluster.server_url());
    let outcome = async {
        let mut sagad = SagadProcess::start(&flow_args(&url, &defs, &participant), &logs).await?;
        for (path, want) in [
            ("/healthz", 200),
            ("/readyz", 200),
            ("/metrics", 200),
            ("/", 200),
            ("/nothing/here", 404),
        ] {
            let (status, body) = metrics::get(sagad.http_addr, path).await?;
            println!(
                "GET {path}: {status} {}",
                body.lines().next().unwrap_or_default()
            );
            ensure!(
                status == want,
                "GET {path} answered {status}, want {want}: {body}"
            );
        }
        let (_, root) = metrics::get(sagad.http_addr, "/").await?;
        ensure!(
            !root.contains("# TYPE") && root.contains(r#"id="counts""#),
            "/ answers with something else than the explorer's overview: {root}"
        );

        cluster.stop().await?;
        let not_ready = wait_status(&sagad, "/readyz", "non-200", |status| status != 200).await?;
        println!("database stopped: /readyz not 200 after {not_ready:?}");
        let (health, _) = metrics::get(sagad.http_addr, "/healthz").await?;
        ensure!(
            health == 200,
            "/healthz answered {health} while the database was down"
        );
        metrics::scrape(sagad.http_addr)
            .await
            .context("the metrics page while the database is down")?;
        // The explorer needs the database: it says so, and does not hang.
        let (explorer, page) = metrics::get(sagad.http_addr, "/sagas").await?;
        ensure!(
            explorer == 503,
            "the explorer answered {explorer} while the database was down: {page}"
        );

        cluster.start_again().await?;
        let ready = wait_status(&sagad, "/readyz", "200", |status| status == 200).await?;
        println!("database started again: /readyz 200 after {ready:?}");
        if let Some(status) = sagad.exited()? {
            bail!("sagad exited with {status} during the outage");
        }
        let status = sagad.terminate().await?;
        ensure!(status.success(), "sagad exited with {status} on SIGTERM");
        Ok(())
    }
    .await;
    if outcome.is_err() {
        logs.keep();
        println!("logs kept in {}", logs.display());
    }
    outcome
}

/// The `saga_id` or `correlation_id` a JSON log line carries: its own field, or a field of one
/// of the spans it was written in.
fn carried<'a>(line: &'a Value, field: &str) -> Vec<&'a str> {
    let spans = line["spans"].as_array().into_iter().flatten();
    std::iter::once(line)
        .chain(spans)
        .filter_map(|object| object.get(field)?.as_str())
        .collect()
}

#[tokio::test]
async fn json_logs_are_one_object_a_line_and_a_line_about_a_saga_carries_its_ids()
-> anyhow::Result<()> {
    with_flow("http_json", |mut args, logs| async move {
        args.extend(
            [
                "--log-format",
                "json",
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ]
            .map(str::to_owned),
        );
        let sagad = SagadProcess::start_with(&args, &[("RUST_LOG", "info")], &logs).await?;
        let mut client = sagad.client().await?;
        // A refused saga: the refusal and the compensation are worth a line at info.
        let saga_id = start_flow(&mut client, true, "order-42").await?;
        let saga = wait_terminal(&mut client, &saga_id, Duration::from_secs(60)).await?;
        ensure!(
            saga.status == SagaStatus::Compensated as i32,
            "the refused saga ended {:?}",
            SagaStatus::try_from(saga.status)
        );
        let started = Instant::now();
        let (lines, about) = loop {
            let text = std::fs::read_to_string(&sagad.log)?;
            let mut lines = Vec::new();
            for line in text.lines() {
                let parsed: Value = serde_json::from_str(line)
                    .with_context(|| format!("a log line that is not JSON: {line:?}"))?;
                ensure!(parsed.is_object(), "a log line that is no object: {line:?}");
                for key in ["timestamp", "level", "target"] {
                    ensure!(parsed.get(key).is_some(), "no {key} in {line:?}");
                }
                lines.push(parsed);
            }
            let about: Vec<Value> = lines
                .iter()
                .filter(|line| carried(line, "saga_id").contains(&saga_id.as_str()))
                .cloned()
                .collect();
            if !about.is_empty() {
                break (lines, about);
            }
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "no log line carries saga_id {saga_id} within 30 s:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        println!(
            "{} JSON lines, {} about saga {saga_id}, e.g. {}",
            lines.len(),
            about.len(),
            about[0]
        );
        for line in &about {
            ensure!(
                carried(line, "correlation_id").contains(&"order-42"),
                "a line about the saga without its correlation_id: {line}"
            );
        }
        let serving = lines
            .iter()
            .find(|line| line["message"] == "HTTP is serving")
            .context("no 'HTTP is serving' line")?;
        ensure!(
            serving["http_listen"] == sagad.http_addr.to_string(),
            "the HTTP line names {}, sagad serves on {}",
            serving["http_listen"],
            sagad.http_addr
        );
        Ok(())
    })
    .await
}

/// What a case is called, its flags and its environment variables.
type AddressCase = (
    &'static str,
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
);

#[tokio::test]
async fn the_http_address_comes_from_the_flag_its_alias_or_either_variable() -> anyhow::Result<()> {
    with_flow("http_flags", |args, logs| async move {
        const ANY: &str = "127.0.0.1:0";
        const BAD: &str = "not an address";
        let cases: [AddressCase; 6] = [
            ("--http-listen", &["--http-listen", ANY], &[]),
            ("--metrics-listen", &["--metrics-listen", ANY], &[]),
            ("SAGAD_HTTP_LISTEN", &[], &[("SAGAD_HTTP_LISTEN", ANY)]),
            (
                "SAGAD_METRICS_LISTEN, json logs from SAGAD_LOG_FORMAT",
                &[],
                &[("SAGAD_METRICS_LISTEN", ANY), ("SAGAD_LOG_FORMAT", "json")],
            ),
            (
                "SAGAD_HTTP_LISTEN before SAGAD_METRICS_LISTEN",
                &[],
                &[("SAGAD_HTTP_LISTEN", ANY), ("SAGAD_METRICS_LISTEN", BAD)],
            ),
            (
                "the flag before the variables",
                &["--http-listen", ANY],
                &[("SAGAD_HTTP_LISTEN", BAD), ("SAGAD_METRICS_LISTEN", BAD)],
            ),
        ];
        for (what, flags, env) in cases {
            let mut all = args.clone();
            all.extend(["--listen", ANY].map(str::to_owned));
            all.extend(flags.iter().map(|flag| (*flag).to_owned()));
            let mut sagad = SagadProcess::start_with(&all, env, &logs)
                .await
                .with_context(|| what.to_owned())?;
            let (health, _) = metrics::get(sagad.http_addr, "/healthz").await?;
            ensure!(health == 200, "{what}: /healthz answered {health}");
            let page = metrics::scrape(sagad.http_addr).await?;
            ensure!(
                page.contains("# TYPE sagad_sagas_started_total counter"),
                "{what}: not sagad's metrics page:\n{page}"
            );
            let log = std::fs::read_to_string(&sagad.log)?;
            let json = env.contains(&("SAGAD_LOG_FORMAT", "json"));
            ensure!(
                log.lines()
                    .all(|line| serde_json::from_str::<Value>(line).is_ok() == json),
                "{what}: want {} log lines:\n{log}",
                if json { "JSON" } else { "text" }
            );
            println!(
                "{what}: HTTP on {}, gRPC on {}",
                sagad.http_addr, sagad.addr
            );
            let status = sagad.terminate().await?;
            ensure!(status.success(), "{what}: exited with {status} on SIGTERM");
        }

        // The old variable alone, with nonsense in it: refused in one line that names it.
        let mut all = args.clone();
        all.extend(["--listen", ANY].map(str::to_owned));
        let output = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new(daemon::binary("sagad")?)
                .args(&all)
                .env_remove("SAGAD_HTTP_LISTEN")
                .env("SAGAD_METRICS_LISTEN", BAD)
                .stdin(Stdio::null())
                .output(),
        )
        .await
        .context("sagad did not exit within 60 s")??;
        let stderr = String::from_utf8_lossy(&output.stderr);
        println!(
            "SAGAD_METRICS_LISTEN={BAD:?}: {} {}",
            output.status,
            stderr.trim()
        );
        ensure!(
            !output.status.success(),
            "sagad started with SAGAD_METRICS_LISTEN={BAD:?}"
        );
        ensure!(
            stderr.trim().lines().count() == 1 && stderr.contains("SAGAD_METRICS_LISTEN"),
            "not one line naming the variable: {stderr:?}"
        );
        Ok(())
    })
    .await
}
