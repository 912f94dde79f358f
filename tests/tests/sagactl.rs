//! The real `sagactl` binary against an in-process sagad on the demo definition, with scripted
//! participants: every command in both output forms, and the errors a user meets.
//! Build the binaries first: `cargo build --workspace --bins`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use sagad_e2e::cli::{CliRun, sagactl, sagactl_with_env, spawn_sagactl};
use sagad_e2e::participant::default_answer;
use sagad_e2e::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

const DEADLINE: Duration = Duration::from_secs(30);

/// The widest line of sagactl's tables without `--wide`.
const MAX_WIDTH: usize = 100;

fn order_input(customer: &str) -> String {
    order_to(customer, "FR")
}

fn order_to(customer: &str, country: &str) -> String {
    json!({
        "customer_id": customer,
        "amount_cents": 1250,
        "currency": "EUR",
        "country": country,
        "items": [{"sku": "sku-1", "quantity": 2}],
    })
    .to_string()
}

/// sagad on the demo definitions, with participants that act as their names say: payment
/// refuses customer "poor"; shipping never answers an Execute for customer "slow" and refuses
/// country AQ; while refunds are broken, payment refuses to refund customers "stubborn…" and
/// answers UNAVAILABLE to refunds of customers "flaky…".
struct Env {
    participants: Vec<FakeParticipant>,
    refunds_broken: Arc<AtomicBool>,
    daemon: Option<TestDaemon>,
    server: String,
    client: Client,
    /// Last, so that on a panic sagad is told to stop before its database goes.
    db: DatabaseGuard,
}

impl Env {
    async fn start(label: &str) -> anyhow::Result<Env> {
        Self::start_with(label, &[]).await
    }

    /// With extra sagad flags.
    async fn start_with(label: &str, extra: &[&str]) -> anyhow::Result<Env> {
        let db = DatabaseGuard::new(label);
        let refunds_broken = Arc::new(AtomicBool::new(true));
        let broken = Arc::clone(&refunds_broken);
        let script: participant::Script = Arc::new(move |call, _| {
            let customer = call.input["input"]["customer_id"]
                .as_str()
                .unwrap_or_default();
            let country = &call.input["input"]["country"];
            let broken = broken.load(Ordering::SeqCst);
            match (call.kind, call.step.as_str()) {
                (CallKind::Execute, "charge_payment") if customer == "poor" => {
                    Answer::refuse("INSUFFICIENT_FUNDS")
                }
                (CallKind::Execute, "schedule_shipment") if customer == "slow" => Answer::hang(),
                (CallKind::Execute, "schedule_shipment") if country == &json!("AQ") => {
                    Answer::refuse("UNSUPPORTED_DESTINATION")
                }
                (CallKind::Compensate, "charge_payment")
                    if broken && customer.starts_with("stubborn") =>
                {
                    Answer::refuse("REFUND_BROKEN")
                }
                (CallKind::Compensate, "charge_payment")
                    if broken && customer.starts_with("flaky") =>
                {
                    Answer::status(tonic::Code::Unavailable)
                }
                _ => default_answer(call),
            }
        });
        let mut participants = Vec::new();
        for name in ["order", "payment", "shipping"] {
            participants.push(FakeParticipant::start_scripted(name, script.clone()).await?);
        }
        let mut args = vec![
            "--database-url".to_owned(),
            db.url(),
            "--defs".to_owned(),
            repo_root().join("saga-defs").display().to_string(),
        ];
        for participant in &participants {
            args.extend(["--participant".to_owned(), participant.flag()]);
        }
        args.extend(extra.iter().map(|flag| (*flag).to_owned()));
        let daemon = TestDaemon::start(&args).await?;
        let client = daemon.client().await?;
        Ok(Env {
            participants,
            refunds_broken,
            server: format!("http://{}", daemon.addr),
            daemon: Some(daemon),
            client,
            db,
        })
    }

    /// `sagactl --server <this sagad> ARGS…`
    async fn run(&self, args: &[&str]) -> anyhow::Result<CliRun> {
        let mut all = vec!["--server", self.server.as_str()];
        all.extend_from_slice(args);
        sagactl(&all).await
    }

    /// `sagactl --server <this sagad> --output json ARGS…`, which must succeed.
    async fn json(&self, args: &[&str]) -> anyhow::Result<CliRun> {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        self.run(&all).await?.ok()
    }

    /// Starts an order through sagactl and returns the saga id.
    async fn start_order(&self, customer: &str) -> anyhow::Result<String> {
        self.start_input(&order_input(customer)).await
    }

    async fn start_input(&self, input: &str) -> anyhow::Result<String> {
        let started = self
            .json(&["start", "order_fulfillment", "--input", input])
            .await?
            .json()?;
        Ok(text(&started["saga_id"]))
    }

    /// The calls payment-service got to refund the saga's charge.
    fn refunds(&self, saga_id: &str) -> usize {
        self.participants[1]
            .calls_for(saga_id)
            .iter()
            .filter(|call| call.kind == CallKind::Compensate)
            .count()
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(daemon) = self.daemon.take() {
            daemon.stop().await?;
        }
        self.db.drop_now().await
    }
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_owned()
}

fn assert_keys(value: &Value, keys: &[&str]) {
    for key in keys {
        assert!(value.get(key).is_some(), "no {key:?} in {value}");
    }
}

/// A failed run: exit 1, nothing on stdout, a message on stderr containing `needle`.
fn assert_fails_with(run: &CliRun, needle: &str) {
    assert_eq!(run.status.code(), Some(1), "expected exit 1: {run:?}");
    assert!(run.stdout.trim().is_empty(), "stdout of a failure: {run:?}");
    assert!(
        run.stderr.contains(needle),
        "stderr does not mention {needle:?}: {:?}",
        run.stderr
    );
}

/// Table output fits MAX_WIDTH columns.
fn assert_fits(run: &CliRun) {
    for line in run.stdout.lines() {
        assert!(
            line.chars().count() <= MAX_WIDTH,
            "a line of {} columns: {line}",
            line.chars().count()
        );
    }
}

/// The history of a saga as `get --output json` prints it: (seq, type) of each event.
fn seqs_and_types(saga: &Value) -> Vec<(u64, String)> {
    saga["history"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|event| {
            (
                event["seq"].as_u64().unwrap_or_default(),
                text(&event["type"]),
            )
        })
        .collect()
}

/// The events of `event_type` in a saga's history.
fn events_of<'a>(saga: &'a Value, event_type: &str) -> Vec<&'a Value> {
    saga["history"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|event| event["type"] == json!(event_type))
        .collect()
}

#[tokio::test]
async fn start_get_and_list_in_both_forms() -> anyhow::Result<()> {
    let mut env = Env::start("cli_basic").await?;
    let input = order_input("alice");

    // start, JSON; the global options may come after the subcommand too.
    let run = sagactl(&[
        "start",
        "order_fulfillment",
        "--input",
        &input,
        "--idempotency-key",
        "k-1",
        "--correlation-id",
        "corr-alice",
        "--output",
        "json",
        "--server",
        &env.server,
    ])
    .await?
    .ok()?;
    let started = run.json()?;
    assert_keys(&started, &["saga_id", "created", "status"]);
    assert_eq!(started["created"], json!(true));
    let id = text(&started["saga_id"]);
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{started}");
    assert!(
        ["RUNNING", "COMPLETED"].contains(&started["status"].as_str().unwrap_or_default()),
        "{started}"
    );

    // The same key again: the same saga, not created; table form.
    let run = env
        .run(&[
            "start",
            "order_fulfillment",
            "--input",
            &input,
            "--idempotency-key",
            "k-1",
        ])
        .await?
        .ok()?;
    assert!(run.stdout.contains(&id), "{run:?}");
    assert!(run.stdout.contains("false"), "{run:?}");

    // @FILE input.
    let dir = Scratch::with_files("cli-input", &[("input.json", &order_input("bob"))])?;
    let file = dir.join("input.json");
    let from_file = env
        .json(&[
            "start",
            "order_fulfillment",
            "--input",
            &format!("@{}", file.display()),
        ])
        .await?
        .json()?;
    let file_id = text(&from_file["saga_id"]);
    assert_ne!(file_id, id);

    wait_terminal(&mut env.client, &id, DEADLINE).await?;
    wait_terminal(&mut env.client, &file_id, DEADLINE).await?;

    // get, JSON.
    let saga = env.json(&["get", &id]).await?.json()?;
    assert_keys(
        &saga,
        &[
            "saga_id",
            "saga_type",
            "status",
            "version",
            "steps",
            "history",
        ],
    );
    assert_eq!(saga["saga_id"], json!(id));
    assert_eq!(saga["saga_type"], json!("order_fulfillment"));
    assert_eq!(saga["status"], json!("COMPLETED"));
    assert_eq!(saga["idempotency_key"], json!("k-1"));
    assert_eq!(saga["correlation_id"], json!("corr-alice"));
    assert_eq!(saga["stuck"], json!(false));
    assert_eq!(saga["input"]["customer_id"], json!("alice"));
    let steps = saga["steps"].as_array().cloned().unwrap_or_default();
    let names: Vec<String> = steps.iter().map(|step| text(&step["name"])).collect();
    assert_eq!(
        names,
        [
            "create_order",
            "charge_payment",
            "schedule_shipment",
            "approve_order"
        ]
    );
    for step in &steps {
        assert_keys(step, &["name", "status", "attempts", "last_error"]);
        assert_eq!(step["status"], json!("SUCCEEDED"), "{step}");
        assert_eq!(step["attempts"], json!(1), "{step}");
        assert_eq!(step["last_error"], json!(""), "{step}");
    }
    let history = saga["history"].as_array().cloned().unwrap_or_default();
    assert!(!history.is_empty(), "{saga}");
    assert_eq!(history[0]["seq"], json!(1));
    assert_eq!(
        history.last().map(|event| event["seq"].clone()),
        Some(saga["version"].clone())
    );
    for event in &history {
        assert_keys(event, &["seq", "type", "step", "recorded_at"]);
    }
    // Read two events a call, the history is the same: get follows the pages.
    let paged = env
        .json(&["get", &id, "--history-page-size", "2"])
        .await?
        .json()?;
    assert!(history.len() > 2, "{saga}");
    assert_eq!(seqs_and_types(&paged), seqs_and_types(&saga));

    // get, table: the id, the status, the steps and the timeline.
    let run = env.run(&["get", &id]).await?.ok()?;
    for needle in [
        id.as_str(),
        "COMPLETED",
        "SUCCEEDED",
        "schedule_shipment",
        "shipping",
        "COMP_ATTEMPTS",
        "corr-alice",
    ] {
        assert!(
            run.stdout.contains(needle),
            "no {needle:?} in {}",
            run.stdout
        );
    }
    let first_type = text(&history[0]["type"]);
    assert!(run.stdout.contains(&first_type), "{}", run.stdout);
    assert_fits(&run);

    // A compensated saga shows why.
    let poor = env.start_order("poor").await?;
    wait_terminal(&mut env.client, &poor, DEADLINE).await?;
    let saga = env.json(&["get", &poor]).await?.json()?;
    assert_eq!(saga["status"], json!("COMPENSATED"));
    assert_eq!(saga["steps"][1]["name"], json!("charge_payment"));
    assert_eq!(saga["steps"][1]["status"], json!("FAILED"));
    assert_eq!(saga["steps"][0]["status"], json!("COMPENSATED"));

    // list, JSON: one object per saga, with why it went backward.
    let run = env.json(&["list"]).await?;
    assert!(run.stderr.is_empty(), "{run:?}");
    let sagas = run.json_lines()?;
    assert_eq!(sagas.len(), 3, "{sagas:?}");
    for saga in &sagas {
        assert_keys(
            saga,
            &[
                "saga_id",
                "saga_type",
                "status",
                "updated_at",
                "failure_reason",
            ],
        );
    }
    let poor_listed = sagas
        .iter()
        .find(|saga| saga["saga_id"] == json!(poor))
        .context("the poor saga is listed")?;
    assert!(
        text(&poor_listed["failure_reason"]).contains("INSUFFICIENT_FUNDS"),
        "{poor_listed}"
    );
    let ids: Vec<String> = sagas.iter().map(|saga| text(&saga["saga_id"])).collect();
    for wanted in [&id, &file_id, &poor] {
        assert!(ids.contains(wanted), "{ids:?}");
    }
    let completed = env
        .json(&[
            "list",
            "--status",
            "completed",
            "--type",
            "order_fulfillment",
        ])
        .await?
        .json_lines()?;
    assert_eq!(completed.len(), 2, "{completed:?}");
    assert!(
        completed
            .iter()
            .all(|saga| saga["status"] == json!("COMPLETED"))
    );
    // --limit: says so when it cut the result, and only then.
    let limited = env.json(&["list", "--limit", "1"]).await?;
    assert_eq!(limited.json_lines()?.len(), 1);
    assert!(
        limited
            .stderr
            .contains("showing the newest 1 sagas; more match"),
        "{limited:?}"
    );
    let all = env.run(&["list", "--limit", "3"]).await?.ok()?;
    assert!(all.stderr.is_empty(), "{all:?}");
    assert_eq!(all.stdout.lines().count(), 1 + 3 + 1, "{all:?}");
    // Nothing matched: said on stderr, in either form.
    let none = env.json(&["list", "--type", "no_such_type"]).await?;
    assert!(none.json_lines()?.is_empty(), "{none:?}");
    assert!(
        none.stderr.contains("no sagas match --type no_such_type"),
        "{none:?}"
    );
    let none = env
        .run(&["list", "--status", "failed", "--stuck"])
        .await?
        .ok()?;
    assert!(none.stdout.is_empty(), "{none:?}");
    assert!(
        none.stderr
            .contains("no sagas match --status FAILED --stuck"),
        "{none:?}"
    );

    // list, table; the address from SAGAD_ADDR. A compensated saga says why, under its row.
    let run = sagactl_with_env(&["list"], &[("SAGAD_ADDR", &env.server)])
        .await?
        .ok()?;
    println!("{}", run.stdout);
    for needle in [id.as_str(), poor.as_str(), "COMPLETED", "COMPENSATED"] {
        assert!(
            run.stdout.contains(needle),
            "no {needle:?} in {}",
            run.stdout
        );
    }
    let lines: Vec<&str> = run.stdout.lines().collect();
    let row = lines
        .iter()
        .position(|line| line.starts_with(&poor))
        .context("a row for the poor saga")?;
    assert!(
        lines
            .get(row + 1)
            .is_some_and(|line| line.starts_with("  why: ") && line.contains("INSUFFICIENT_FUNDS")),
        "{}",
        run.stdout
    );
    assert_fits(&run);

    // A long value is cut to fit with `…` in a table, whole with --wide and in JSON.
    let long = "c".repeat(200);
    let started = env
        .json(&[
            "start",
            "order_fulfillment",
            "--input",
            &order_input("carol"),
            "--correlation-id",
            &long,
        ])
        .await?
        .json()?;
    let carol = text(&started["saga_id"]);
    let run = env.run(&["get", &carol]).await?.ok()?;
    assert_fits(&run);
    let line = run
        .stdout
        .lines()
        .find(|line| line.starts_with("correlation_id"))
        .context("a correlation_id line")?;
    assert!(line.ends_with("c…"), "{line}");
    let run = env.run(&["get", &carol, "--wide"]).await?.ok()?;
    assert!(
        run.stdout.contains(&format!("correlation_id  {long}\n")),
        "{run:?}"
    );
    assert!(!run.stdout.contains('…'), "{run:?}");
    let saga = env.json(&["get", &carol]).await?.json()?;
    assert_eq!(saga["correlation_id"], json!(long));

    env.stop().await
}

/// A saga waiting on schedule_shipment, which never answers for customer "slow".
fn waits_on_shipment(saga: &sagad_proto::v1::Saga) -> bool {
    saga.steps
        .get(2)
        .is_some_and(|step| step.name == "schedule_shipment" && step.attempts >= 1)
}

#[tokio::test]
async fn cancel_stops_a_running_saga() -> anyhow::Result<()> {
    let mut env = Env::start("cli_cancel").await?;

    // cancel, JSON: the saga, as get prints it.
    let id = env.start_order("slow").await?;
    wait_until(&mut env.client, &id, DEADLINE, waits_on_shipment).await?;
    let saga = env
        .json(&["cancel", &id, "--reason", "the customer called"])
        .await?
        .json()?;
    assert_keys(
        &saga,
        &["saga_id", "saga_type", "status", "version", "steps"],
    );
    assert_eq!(saga["saga_id"], json!(id));
    assert!(
        ["COMPENSATING", "COMPENSATED"].contains(&saga["status"].as_str().unwrap_or_default()),
        "{saga}"
    );
    wait_terminal(&mut env.client, &id, DEADLINE).await?;
    let saga = env.json(&["get", &id]).await?.json()?;
    assert_eq!(saga["status"], json!("COMPENSATED"));
    let cancelled = events_of(&saga, "cancel_requested");
    assert!(
        cancelled
            .first()
            .is_some_and(|event| event["data"]["reason"] == json!("the customer called")),
        "{saga}"
    );

    // Cancelling an ended saga: the server's refusal.
    let run = env.run(&["cancel", &id]).await?;
    assert_fails_with(&run, "FAILED_PRECONDITION");

    // cancel, table.
    let other = env.start_order("slow").await?;
    wait_until(&mut env.client, &other, DEADLINE, waits_on_shipment).await?;
    let run = env.run(&["cancel", &other]).await?.ok()?;
    assert!(run.stdout.contains(&other), "{run:?}");
    assert!(run.stdout.contains("COMPENSAT"), "{run:?}");
    assert_fits(&run);
    wait_terminal(&mut env.client, &other, DEADLINE).await?;

    env.stop().await
}

#[tokio::test]
async fn watch_prints_every_event_as_it_comes_and_ends_with_the_saga() -> anyhow::Result<()> {
    let mut env = Env::start("cli_watch").await?;
    let id = env.start_order("slow").await?;
    wait_until(&mut env.client, &id, DEADLINE, waits_on_shipment).await?;

    // A live watch: the history so far, then each event as it is appended.
    let mut watcher = spawn_sagactl(&["--server", &env.server, "--output", "json", "watch", &id])?;
    let stdout = watcher.stdout.take().context("the watcher's stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut events = Vec::new();
    let history_shown = async {
        while let Some(line) = lines.next_line().await? {
            let event: Value = serde_json::from_str(&line)
                .with_context(|| format!("a line that is not JSON: {line}"))?;
            let charged = event["type"] == json!("step_succeeded")
                && event["step"] == json!("charge_payment");
            events.push(event);
            if charged {
                return anyhow::Ok(());
            }
        }
        bail!("the watch ended before the saga got to schedule_shipment")
    };
    tokio::time::timeout(DEADLINE, history_shown)
        .await
        .context("the watch did not print the history")??;
    ensure!(
        watcher.try_wait()?.is_none(),
        "the watch exited while the saga was still running"
    );
    let before_cancel = events.len();
    env.json(&["cancel", &id, "--reason", "watched"]).await?;
    let rest = async {
        while let Some(line) = lines.next_line().await? {
            events.push(serde_json::from_str::<Value>(&line)?);
        }
        Ok::<_, anyhow::Error>(watcher.wait().await?)
    };
    let status = tokio::time::timeout(DEADLINE, rest)
        .await
        .context("the watch did not end with the saga")??;
    let mut stderr = String::new();
    if let Some(mut pipe) = watcher.stderr.take() {
        tokio::io::AsyncReadExt::read_to_string(&mut pipe, &mut stderr).await?;
    }
    ensure!(status.success(), "watch exited with {status}: {stderr}");
    println!(
        "watch printed {} events, {} of them after the cancel",
        events.len(),
        events.len() - before_cancel
    );
    for event in &events {
        assert_keys(event, &["seq", "type", "step", "recorded_at"]);
    }
    let watched: Vec<(u64, String)> = events
        .iter()
        .map(|event| {
            (
                event["seq"].as_u64().unwrap_or_default(),
                text(&event["type"]),
            )
        })
        .collect();
    let saga = env.json(&["get", &id]).await?.json()?;
    assert_eq!(saga["status"], json!("COMPENSATED"));
    // Every event, from the first, in order, ending with the terminal one.
    assert_eq!(watched, seqs_and_types(&saga));
    assert_eq!(
        watched.last().map(|(_, kind)| kind.as_str()),
        Some("saga_compensated")
    );
    assert!(
        watched[before_cancel..]
            .iter()
            .any(|(_, kind)| kind == "cancel_requested"),
        "{watched:?}"
    );

    // An ended saga, table form: the header, a line per event, at once.
    let run = env.run(&["watch", &id]).await?.ok()?;
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(lines[0].contains("SEQ"), "{run:?}");
    assert_eq!(lines.len(), 1 + watched.len(), "{run:?}");
    assert!(
        lines
            .last()
            .is_some_and(|line| line.contains("saga_compensated")),
        "{run:?}"
    );
    assert_fits(&run);

    // An unknown saga.
    let run = env
        .run(&["watch", &uuid::Uuid::new_v4().to_string()])
        .await?;
    assert_fails_with(&run, "NOT_FOUND");

    env.stop().await
}

#[tokio::test]
async fn retry_resumes_a_failed_compensation_and_skips_a_step_by_hand() -> anyhow::Result<()> {
    let mut env = Env::start("cli_retry").await?;
    // Shipping refuses AQ, so the charge is refunded: refused while refunds are broken.
    let fixed = env.start_input(&order_to("stubborn-1", "AQ")).await?;
    let skipped = env.start_input(&order_to("stubborn-2", "AQ")).await?;
    for id in [&fixed, &skipped] {
        let saga = wait_terminal(&mut env.client, id, DEADLINE).await?;
        ensure!(
            saga.status == sagad_proto::v1::SagaStatus::Failed as i32,
            "{id}: {saga:?}"
        );
    }
    let saga = env.json(&["get", &fixed]).await?.json()?;
    assert_eq!(saga["status"], json!("FAILED"));
    assert_eq!(saga["steps"][1]["status"], json!("COMPENSATION_FAILED"));
    assert!(
        text(&saga["steps"][1]["last_error"]).contains("REFUND_BROKEN"),
        "{saga}"
    );
    // get shows the failed compensation's error under its step.
    let run = env.run(&["get", &fixed]).await?.ok()?;
    assert!(
        run.stdout.contains("  last error: REFUND_BROKEN"),
        "{}",
        run.stdout
    );

    // A step that cannot be skipped: refused, and nothing changes.
    let run = env
        .run(&["retry", &skipped, "--skip", "no_such_step"])
        .await?;
    assert_fails_with(&run, "INVALID_ARGUMENT");

    env.refunds_broken.store(false, Ordering::SeqCst);

    // Fixed: retried, the refund goes through this time.
    let saga = env
        .json(&["retry", &fixed, "--reason", "refunds fixed in 4.2"])
        .await?
        .json()?;
    assert_keys(
        &saga,
        &[
            "saga_id",
            "saga_type",
            "status",
            "version",
            "steps",
            "history",
        ],
    );
    assert_eq!(saga["saga_id"], json!(fixed));
    wait_terminal(&mut env.client, &fixed, DEADLINE).await?;
    let saga = env.json(&["get", &fixed]).await?.json()?;
    assert_eq!(saga["status"], json!("COMPENSATED"), "{saga}");
    assert_eq!(saga["steps"][1]["status"], json!("COMPENSATED"));
    assert_eq!(saga["steps"][0]["status"], json!("COMPENSATED"));
    assert_eq!(
        env.refunds(&fixed),
        2,
        "one refused refund, one that went through"
    );
    let retried = events_of(&saga, "retry_requested");
    assert_eq!(retried.len(), 1, "{saga}");
    assert_eq!(retried[0]["data"]["reason"], json!("refunds fixed in 4.2"));
    assert!(
        !text(&retried[0]["data"]["requested_by"]).is_empty(),
        "{saga}"
    );

    // Refunded by hand: skipped, and payment is never asked again; table form.
    let refunds_before = env.refunds(&skipped);
    let run = env
        .run(&[
            "retry",
            &skipped,
            "--skip",
            "charge_payment",
            "--reason",
            "refunded by hand, ticket 81",
        ])
        .await?
        .ok()?;
    assert!(run.stdout.contains(&skipped), "{run:?}");
    assert_fits(&run);
    wait_terminal(&mut env.client, &skipped, DEADLINE).await?;
    let saga = env.json(&["get", &skipped]).await?.json()?;
    assert_eq!(saga["status"], json!("COMPENSATED"), "{saga}");
    assert_eq!(saga["steps"][1]["status"], json!("COMPENSATED"));
    assert_eq!(saga["steps"][0]["status"], json!("COMPENSATED"));
    assert_eq!(
        env.refunds(&skipped),
        refunds_before,
        "a skipped step was called"
    );
    let skips = events_of(&saga, "compensation_skipped");
    assert_eq!(skips.len(), 1, "{saga}");
    assert_eq!(skips[0]["step"], json!("charge_payment"));
    assert_eq!(
        skips[0]["data"]["reason"],
        json!("refunded by hand, ticket 81")
    );
    assert_eq!(events_of(&saga, "retry_requested").len(), 1, "{saga}");
    // The history in table form tells both, with the reasons.
    let run = env.run(&["get", &skipped, "--wide"]).await?.ok()?;
    for needle in [
        "retry_requested",
        "compensation_skipped",
        "refunded by hand, ticket 81",
    ] {
        assert!(run.stdout.contains(needle), "no {needle:?}: {}", run.stdout);
    }

    // A saga that is not FAILED cannot be retried.
    let run = env.run(&["retry", &fixed, "--reason", "again"]).await?;
    assert_fails_with(&run, "FAILED_PRECONDITION");
    let completed = env.start_order("alice").await?;
    wait_terminal(&mut env.client, &completed, DEADLINE).await?;
    let run = env.run(&["--output", "json", "retry", &completed]).await?;
    assert_fails_with(&run, "FAILED_PRECONDITION");

    env.stop().await
}

#[tokio::test]
async fn list_stuck_and_get_show_a_stuck_step_plainly() -> anyhow::Result<()> {
    let mut env = Env::start_with("cli_stuck", &["--stuck-after", "1s"]).await?;
    // The refund answers UNAVAILABLE while broken: retried without limit, so stuck.
    let id = env.start_input(&order_to("flaky-1", "AQ")).await?;
    let done = env.start_order("alice").await?;
    wait_terminal(&mut env.client, &done, DEADLINE).await?;

    let began = tokio::time::Instant::now();
    let listed = loop {
        let listed = env.json(&["list", "--stuck"]).await?.json_lines()?;
        if !listed.is_empty() {
            break listed;
        }
        ensure!(began.elapsed() < DEADLINE, "no saga listed as stuck");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "listed as stuck {:?} after the check began",
        began.elapsed()
    );
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["saga_id"], json!(id));
    assert_eq!(listed[0]["stuck"], json!(true));
    assert_eq!(listed[0]["status"], json!("COMPENSATING"));

    // Table forms: the list says what it keeps failing on; get says it plainly.
    let run = env.run(&["list", "--stuck"]).await?.ok()?;
    println!("{}", run.stdout);
    assert!(
        run.stdout
            .contains("  stuck: compensation of charge_payment after "),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains(&done), "{}", run.stdout);
    assert_fits(&run);
    let run = env.run(&["get", &id]).await?.ok()?;
    println!("{}", run.stdout);
    for needle in [
        "COMPENSATING (stuck",
        "STUCK: compensation charge_payment (payment) keeps failing",
        "  attempts  ",
        "  last error    Unavailable",
        "  next attempt  ",
    ] {
        assert!(run.stdout.contains(needle), "no {needle:?}: {}", run.stdout);
    }
    assert_fits(&run);
    let saga = env.json(&["get", &id]).await?.json()?;
    assert_eq!(saga["stuck"], json!(true));
    assert_keys(&saga["steps"][1], &["next_attempt_at"]);
    assert!(
        saga["steps"][1]["compensation_attempts"]
            .as_u64()
            .is_some_and(|attempts| attempts >= 2),
        "{saga}"
    );

    // Recovered: compensated, and no longer stuck.
    env.refunds_broken.store(false, Ordering::SeqCst);
    wait_terminal(&mut env.client, &id, Duration::from_secs(60)).await?;
    let run = env.json(&["list", "--stuck"]).await?;
    assert!(run.json_lines()?.is_empty(), "{run:?}");
    assert!(run.stderr.contains("no sagas match --stuck"), "{run:?}");

    env.stop().await
}

#[tokio::test]
async fn errors_are_clear_and_exit_non_zero() -> anyhow::Result<()> {
    // Nobody listens there.
    let nowhere = format!("http://127.0.0.1:{}", free_port()?);
    let run = sagactl(&["--server", &nowhere, "list"]).await?;
    assert_fails_with(&run, &format!("cannot reach sagad at {nowhere}"));
    let run = sagactl(&[
        "get",
        &uuid::Uuid::new_v4().to_string(),
        "--server",
        &nowhere,
    ])
    .await?;
    assert_fails_with(&run, "cannot reach sagad");
    let run = sagactl(&["--server", "http://bad host:1", "list"]).await?;
    assert_fails_with(&run, "not a valid address");

    // Bad input is refused before the network is touched.
    let run = sagactl(&[
        "--server",
        &nowhere,
        "start",
        "order_fulfillment",
        "--input",
        "{\"customer_id\": ",
    ])
    .await?;
    assert_fails_with(&run, "--input is not valid JSON");
    let run = sagactl(&[
        "--server",
        &nowhere,
        "start",
        "order_fulfillment",
        "--input",
        "[1, 2]",
    ])
    .await?;
    assert_fails_with(&run, "must be a JSON object");
    let missing =
        std::env::temp_dir().join(format!("sagactl-missing-{}.json", uuid::Uuid::new_v4()));
    let run = sagactl(&[
        "--server",
        &nowhere,
        "start",
        "order_fulfillment",
        "--input",
        &format!("@{}", missing.display()),
    ])
    .await?;
    assert_fails_with(&run, &format!("cannot read {}", missing.display()));
    let run = sagactl(&["--server", &nowhere, "list", "--status", "DONE"]).await?;
    assert_fails_with(&run, "not a saga status");

    // The server's refusals.
    let env = Env::start("cli_errors").await?;
    let unknown = uuid::Uuid::new_v4().to_string();
    let run = env.run(&["get", &unknown]).await?;
    assert_fails_with(&run, "NOT_FOUND");
    assert!(run.stderr.contains(&unknown), "{run:?}");
    let run = env.run(&["--output", "json", "cancel", &unknown]).await?;
    assert_fails_with(&run, "NOT_FOUND");
    let run = env.run(&["get", "not-a-uuid"]).await?;
    assert_fails_with(&run, "INVALID_ARGUMENT");
    let run = env.run(&["start", "no_such_type", "--input", "{}"]).await?;
    assert_fails_with(&run, "INVALID_ARGUMENT");
    let run = env
        .run(&[
            "start",
            "order_fulfillment",
            "--input",
            "{\"customer_id\": \"c\"}",
        ])
        .await?;
    assert_fails_with(&run, "INVALID_ARGUMENT");

    // Pointed at something that is not sagad: a gRPC server without sagad's service (a
    // participant), one with a health service that does not know it, an HTTP/1 server.
    let participant = env.participants[0].uri();
    let run = sagactl(&["--server", &participant, "list"]).await?;
    println!("{}", run.stderr);
    assert_fails_with(
        &run,
        &format!("this is not a sagad gRPC server at {participant}"),
    );
    let health_only = health_only_server().await?;
    let run = sagactl(&["--server", &health_only, "get", &unknown]).await?;
    println!("{}", run.stderr);
    assert_fails_with(
        &run,
        &format!(
            "this is not a sagad gRPC server at {health_only} (it does not serve \
             sagad.v1.SagaOrchestrator"
        ),
    );
    let http = http1_server().await?;
    for command in [&["list"][..], &["watch", &unknown][..]] {
        let run = sagactl(&[&["--server", http.as_str()][..], command].concat()).await?;
        println!("{}", run.stderr);
        assert_fails_with(&run, &format!("this is not a sagad gRPC server at {http}"));
    }

    env.stop().await
}

/// A gRPC server with only a health service, as a participant built on the SDK has.
async fn health_only_server() -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = format!("http://{}", listener.local_addr()?);
    let (_, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Ok(address)
}

/// An HTTP/1 server that answers anything with 400, as a plain web server meets gRPC.
async fn http1_server() -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = [0u8; 1024];
                let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut buffer).await;
                let _ = socket
                    .write_all(
                        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    )
                    .await;
            });
        }
    });
    Ok(address)
}

#[tokio::test]
async fn bench_reports_its_figures() -> anyhow::Result<()> {
    let env = Env::start("cli_bench").await?;
    let run = env
        .json(&["bench", "--sagas", "20", "--concurrency", "4"])
        .await?;
    // No progress bar without a terminal.
    assert!(run.stderr.is_empty(), "{run:?}");
    let report = run.json()?;
    assert_keys(
        &report,
        &[
            "sagas",
            "concurrency",
            "elapsed_s",
            "sagas_per_sec",
            "p50_ms",
            "p90_ms",
            "p99_ms",
            "max_ms",
            "completed",
            "compensated",
            "failed",
        ],
    );
    assert_eq!(report["sagas"], json!(20));
    assert_eq!(report["concurrency"], json!(4));
    assert_eq!(report["completed"], json!(20));
    assert_eq!(report["compensated"], json!(0));
    assert_eq!(report["failed"], json!(0));

    // Every saga had a customer of its own.
    let sagas = env.json(&["list", "--limit", "100"]).await?.json_lines()?;
    assert_eq!(sagas.len(), 20);
    let mut customers = std::collections::HashSet::new();
    for saga in &sagas {
        let saga = env.json(&["get", &text(&saga["saga_id"])]).await?.json()?;
        customers.insert(text(&saga["input"]["customer_id"]));
    }
    assert_eq!(customers.len(), 20);

    // Table form, with an input naming its customer: a refused payment compensates.
    let run = env
        .run(&[
            "bench",
            "--sagas",
            "3",
            "--concurrency",
            "2",
            "--input",
            &order_input("poor"),
        ])
        .await?
        .ok()?;
    for key in ["sagas_per_sec", "p99_ms", "completed", "compensated"] {
        assert!(run.stdout.contains(key), "no {key:?} in {}", run.stdout);
    }
    assert!(
        run.stdout
            .lines()
            .any(|line| line.split_whitespace().collect::<Vec<_>>() == ["compensated", "3"]),
        "{}",
        run.stdout
    );

    // The default concurrency, and a fraction sent where shipping refuses.
    let report = env
        .json(&["bench", "--sagas", "4", "--refused-fraction", "0.5"])
        .await?
        .json()?;
    println!("{report}");
    assert_eq!(report["concurrency"], json!(16));
    assert_eq!(report["completed"], json!(2));
    assert_eq!(report["compensated"], json!(2));
    let run = env
        .run(&["bench", "--sagas", "1", "--refused-fraction", "1.5"])
        .await?;
    assert_eq!(run.status.code(), Some(2), "{run:?}");

    // A saga that cannot end: bench gives up at its timeout and says so.
    let run = env
        .run(&[
            "bench",
            "--sagas",
            "1",
            "--concurrency",
            "1",
            "--input",
            &order_input("slow"),
            "--timeout",
            "1s",
        ])
        .await?;
    assert_fails_with(&run, "bench did not finish within 1s: 0 of 1 sagas ended");

    env.stop().await
}

#[tokio::test]
async fn start_wait_prints_the_ended_saga() -> anyhow::Result<()> {
    let env = Env::start("cli_wait").await?;

    // JSON: the ended saga, the same object as `get`, with `created` added; exit 0 for
    // COMPLETED, and no progress bar without a terminal.
    let input = order_input("alice");
    let run = env
        .json(&["start", "order_fulfillment", "--input", &input, "--wait"])
        .await?;
    assert!(run.stderr.is_empty(), "{run:?}");
    let saga = run.json()?;
    assert_keys(
        &saga,
        &[
            "saga_id",
            "saga_type",
            "status",
            "version",
            "steps",
            "history",
            "created",
        ],
    );
    assert_eq!(saga["status"], json!("COMPLETED"), "{saga}");
    assert_eq!(saga["created"], json!(true));
    let history = saga["history"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        history.last().map(|event| event["seq"].clone()),
        Some(saga["version"].clone())
    );
    let id = text(&saga["saga_id"]);
    let mut as_get = saga.clone();
    if let Some(fields) = as_get.as_object_mut() {
        fields.remove("created");
    }
    assert_eq!(as_get, env.json(&["get", &id]).await?.json()?);

    // Table form, a refused payment: the status, the steps with their compensation, the
    // refusal and the timeline; exit 3 for COMPENSATED.
    let run = env
        .run(&[
            "start",
            "order_fulfillment",
            "--input",
            &order_input("poor"),
            "--wait",
            "--timeout",
            "30s",
        ])
        .await?;
    assert_eq!(run.status.code(), Some(3), "{run:?}");
    assert!(run.stderr.is_empty(), "{run:?}");
    assert_fits(&run);
    for needle in [
        "COMPENSATED",
        "charge_payment",
        "FAILED",
        "INSUFFICIENT_FUNDS",
        "compensation_succeeded",
        "SEQ",
    ] {
        assert!(
            run.stdout.contains(needle),
            "no {needle:?} in {}",
            run.stdout
        );
    }

    // An idempotency key whose saga has already ended: answered at once, not created.
    let keyed = ["start", "order_fulfillment", "--input", &input];
    let first = env
        .json(&[&keyed[..], &["--idempotency-key", "k-wait", "--wait"]].concat())
        .await?
        .json()?;
    let again = env
        .json(&[&keyed[..], &["--idempotency-key", "k-wait", "--wait"]].concat())
        .await?
        .json()?;
    assert_eq!(again["saga_id"], first["saga_id"]);
    assert_eq!(again["created"], json!(false));
    assert_eq!(again["status"], json!("COMPLETED"));

    // A refund refused: FAILED, exit 4, the saga printed.
    let run = env
        .run(&[
            "--output",
            "json",
            "start",
            "order_fulfillment",
            "--input",
            &order_to("stubborn-wait", "AQ"),
            "--wait",
        ])
        .await?;
    assert_eq!(run.status.code(), Some(4), "{run:?}");
    assert_eq!(run.json()?["status"], json!("FAILED"));

    // A saga that does not end in time: exit 5, a clear message naming it; the saga goes on.
    let run = env
        .run(&[
            "start",
            "order_fulfillment",
            "--input",
            &order_input("slow"),
            "--wait",
            "--timeout",
            "1s",
        ])
        .await?;
    assert_eq!(run.status.code(), Some(5), "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
    assert!(run.stderr.contains("has not ended within 1s"), "{run:?}");
    let sagas = env
        .json(&["list", "--status", "running"])
        .await?
        .json_lines()?;
    assert_eq!(sagas.len(), 1, "{sagas:?}");
    assert!(run.stderr.contains(&text(&sagas[0]["saga_id"])), "{run:?}");

    // --timeout means nothing without --wait.
    let run = env
        .run(&[
            "start",
            "order_fulfillment",
            "--input",
            &input,
            "--timeout",
            "5s",
        ])
        .await?;
    assert_eq!(run.status.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("--wait"), "{run:?}");

    env.stop().await
}

#[tokio::test]
async fn defs_validate_checks_files_without_a_server() -> anyhow::Result<()> {
    // No server is needed: an address nobody listens on does not matter.
    let nowhere = format!("http://127.0.0.1:{}", free_port()?);
    let repo_defs = repo_root().join("saga-defs").display().to_string();

    let report = sagactl(&[
        "--server", &nowhere, "--output", "json", "defs", "validate", &repo_defs,
    ])
    .await?
    .ok()?
    .json()?;
    assert_eq!(report["valid"], json!(true), "{report}");
    assert_eq!(report["errors"], json!([]), "{report}");
    let run = sagactl(&["defs", "validate", &repo_defs]).await?.ok()?;
    assert_eq!(
        run.stdout.trim(),
        format!("ok: 1 definition in {repo_defs}")
    );

    // One good file, one with a bad field, one that is not TOML: an error for each bad file.
    let good = std::fs::read_to_string(repo_root().join("saga-defs/order_fulfillment.toml"))?;
    let bad_jitter = good.replacen("jitter = 0.2", "jitter = 2.0", 1);
    let bad_name = good
        .replacen("name = \"order_fulfillment\"", "name = \"other\"", 1)
        .replacen("name = \"create_order\"", "name = \"\"", 1);
    let dir = Scratch::defs(&[
        ("a_good.toml", &good),
        ("b_jitter.toml", &bad_jitter),
        ("c_step.toml", &bad_name),
    ])?;
    let dir_text = dir.display().to_string();
    let run = sagactl(&["--output", "json", "defs", "validate", &dir_text]).await?;
    assert!(!run.status.success(), "{run:?}");
    let report = run.json()?;
    assert_eq!(report["valid"], json!(false), "{report}");
    let errors = report["errors"].as_array().cloned().unwrap_or_default();
    assert_eq!(errors.len(), 2, "{report}");
    for error in &errors {
        assert_keys(error, &["file", "field", "message"]);
    }
    assert!(
        text(&errors[0]["file"]).ends_with("b_jitter.toml"),
        "{report}"
    );
    assert_eq!(
        errors[0]["field"],
        json!("defaults.retry.jitter"),
        "{report}"
    );
    assert!(
        text(&errors[1]["file"]).ends_with("c_step.toml"),
        "{report}"
    );
    assert_eq!(errors[1]["field"], json!("steps[0].name"), "{report}");

    // Table form: one `file: field: message` line per error, the count on stderr.
    let run = sagactl(&["defs", "validate", &dir_text]).await?;
    assert!(!run.status.success(), "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{run:?}");
    assert!(
        lines[0].starts_with(&format!(
            "{}: defaults.retry.jitter: ",
            dir.join("b_jitter.toml").display()
        )),
        "{run:?}"
    );
    assert!(run.stderr.contains("2 errors"), "{run:?}");

    // Input schemas: one that is no JSON Schema, one in a file that is not there.
    let bad_minimum = good.replacen(
        "amount_cents = { type = \"integer\", minimum = 1 }",
        "amount_cents = { type = \"integer\", minimum = \"one\" }",
        1,
    );
    let inline_schema = good
        .find("\n[input_schema]\n")
        .zip(good.find("\n[defaults]\n"))
        .context("the demo definition has an inline [input_schema] before [defaults]")?;
    let missing_file = format!(
        "{}\ninput_schema = \"order.input.json\"\n{}",
        &good[..inline_schema.0],
        &good[inline_schema.1..]
    );
    ensure!(
        bad_minimum != good,
        "the demo schema no longer has amount_cents' minimum"
    );
    let schemas = Scratch::defs(&[
        ("a_good.toml", &good),
        ("b_minimum.toml", &bad_minimum),
        ("c_file.toml", &missing_file),
    ])?;
    let schemas_text = schemas.display().to_string();
    let run = sagactl(&["--output", "json", "defs", "validate", &schemas_text]).await?;
    assert!(!run.status.success(), "{run:?}");
    let report = run.json()?;
    println!("{report}");
    assert_eq!(report["valid"], json!(false), "{report}");
    let errors = report["errors"].as_array().cloned().unwrap_or_default();
    assert_eq!(errors.len(), 2, "{report}");
    assert!(
        text(&errors[0]["file"]).ends_with("b_minimum.toml"),
        "{report}"
    );
    assert_eq!(
        errors[0]["field"],
        json!("input_schema.properties.amount_cents.minimum"),
        "{report}"
    );
    assert!(
        text(&errors[1]["file"]).ends_with("c_file.toml"),
        "{report}"
    );
    assert_eq!(errors[1]["field"], json!("input_schema"), "{report}");
    assert!(
        text(&errors[1]["message"]).contains("order.input.json"),
        "{report}"
    );
    // With the file there, the folder is valid: the .json beside is no definition.
    std::fs::write(
        schemas.join("order.input.json"),
        r#"{"type": "object", "required": ["customer_id"]}"#,
    )?;
    // a_good.toml defines the same saga and version as c_file.toml.
    std::fs::remove_file(schemas.join("a_good.toml"))?;
    std::fs::remove_file(schemas.join("b_minimum.toml"))?;
    let run = sagactl(&["defs", "validate", &schemas_text]).await?.ok()?;
    assert_eq!(
        run.stdout.trim(),
        format!("ok: 1 definition in {schemas_text}")
    );

    // A folder that is not there, or a file: said plainly.
    let missing = dir.join("absent").display().to_string();
    let run = sagactl(&["--output", "json", "defs", "validate", &missing]).await?;
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    let report = run.json()?;
    assert_eq!(report["valid"], json!(false));
    assert_eq!(report["errors"][0]["file"], json!(missing));
    assert_eq!(report["errors"][0]["message"], json!("no such folder"));
    let run = sagactl(&["defs", "validate", &missing]).await?;
    assert_fails_with(&run, &format!("defs validate {missing}: no such folder"));
    let file = dir.join("b_jitter.toml").display().to_string();
    let run = sagactl(&["defs", "validate", &file]).await?;
    assert_fails_with(&run, &format!("defs validate {file}: is not a folder"));

    Ok(())
}
