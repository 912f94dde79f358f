//! The real `sagactl` binary against an in-process sagad on the demo definition, with scripted
//! participants: every command in both output forms, and the errors a user meets.
//! Build the binaries first: `cargo build --workspace --bins`.

use std::time::Duration;

use anyhow::{Context, ensure};
use sagad_e2e::cli::{CliRun, sagactl, sagactl_with_env};
use sagad_e2e::participant::default_answer;
use sagad_e2e::*;
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(30);

fn order_input(customer: &str) -> String {
    json!({
        "customer_id": customer,
        "amount_cents": 1250,
        "currency": "EUR",
        "country": "FR",
        "items": [{"sku": "sku-1", "quantity": 2}],
    })
    .to_string()
}

/// sagad on the demo definitions. The payment participant refuses customer "poor"; the
/// shipping participant never answers an Execute for customer "slow".
struct Env {
    _participants: Vec<FakeParticipant>,
    daemon: Option<TestDaemon>,
    server: String,
    client: Client,
    /// Last, so that on a panic sagad is told to stop before its database goes.
    db: DatabaseGuard,
}

impl Env {
    async fn start(label: &str) -> anyhow::Result<Env> {
        let db = DatabaseGuard::new(label);
        let script: participant::Script = std::sync::Arc::new(|call, _| {
            let customer = &call.input["input"]["customer_id"];
            match (call.kind, call.step.as_str()) {
                (CallKind::Execute, "charge_payment") if customer == &json!("poor") => {
                    Answer::refuse("INSUFFICIENT_FUNDS")
                }
                (CallKind::Execute, "schedule_shipment") if customer == &json!("slow") => {
                    Answer::hang()
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
        let daemon = TestDaemon::start(&args).await?;
        let client = daemon.client().await?;
        Ok(Env {
            _participants: participants,
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
        let input = order_input(customer);
        let started = self
            .json(&["start", "order_fulfillment", "--input", &input])
            .await?
            .json()?;
        Ok(text(&started["saga_id"]))
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

/// A failed run: non-zero exit, nothing on stdout, a message on stderr containing `needle`.
fn assert_fails_with(run: &CliRun, needle: &str) {
    assert!(!run.status.success(), "expected a failure: {run:?}");
    assert!(run.stdout.trim().is_empty(), "stdout of a failure: {run:?}");
    assert!(
        run.stderr.contains(needle),
        "stderr does not mention {needle:?}: {:?}",
        run.stderr
    );
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

    // get, table: the id, the status, the steps and the timeline.
    let run = env.run(&["get", &id]).await?.ok()?;
    for needle in [
        id.as_str(),
        "COMPLETED",
        "SUCCEEDED",
        "schedule_shipment",
        "shipping",
        "LAST_ERROR",
    ] {
        assert!(
            run.stdout.contains(needle),
            "no {needle:?} in {}",
            run.stdout
        );
    }
    let first_type = text(&history[0]["type"]);
    assert!(run.stdout.contains(&first_type), "{}", run.stdout);

    // A compensated saga shows why.
    let poor = env.start_order("poor").await?;
    wait_terminal(&mut env.client, &poor, DEADLINE).await?;
    let saga = env.json(&["get", &poor]).await?.json()?;
    assert_eq!(saga["status"], json!("COMPENSATED"));
    assert_eq!(saga["steps"][1]["name"], json!("charge_payment"));
    assert_eq!(saga["steps"][1]["status"], json!("FAILED"));
    assert_eq!(saga["steps"][0]["status"], json!("COMPENSATED"));

    // list, JSON: one object per saga.
    let sagas = env.json(&["list"]).await?.json_lines()?;
    assert_eq!(sagas.len(), 3, "{sagas:?}");
    for saga in &sagas {
        assert_keys(saga, &["saga_id", "saga_type", "status", "updated_at"]);
    }
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
    let limited = env.json(&["list", "--limit", "1"]).await?.json_lines()?;
    assert_eq!(limited.len(), 1);
    let none = env
        .json(&["list", "--type", "no_such_type"])
        .await?
        .json_lines()?;
    assert!(none.is_empty(), "{none:?}");

    // list, table; the address from SAGAD_ADDR.
    let run = sagactl_with_env(&["list"], &[("SAGAD_ADDR", &env.server)])
        .await?
        .ok()?;
    for needle in [id.as_str(), poor.as_str(), "COMPLETED", "COMPENSATED"] {
        assert!(
            run.stdout.contains(needle),
            "no {needle:?} in {}",
            run.stdout
        );
    }

    env.stop().await
}

#[tokio::test]
async fn cancel_watch_and_retry() -> anyhow::Result<()> {
    let mut env = Env::start("cli_cancel").await?;
    let stuck = |saga: &sagad_proto::v1::Saga| {
        saga.steps
            .get(2)
            .is_some_and(|step| step.name == "schedule_shipment" && step.attempts >= 1)
    };

    // cancel, JSON: the saga, as get prints it.
    let id = env.start_order("slow").await?;
    wait_until(&mut env.client, &id, DEADLINE, stuck).await?;
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

    // Cancelling an ended saga: the server's refusal.
    let run = env.run(&["cancel", &id]).await?;
    assert_fails_with(&run, "FAILED_PRECONDITION");

    // cancel, table.
    let other = env.start_order("slow").await?;
    wait_until(&mut env.client, &other, DEADLINE, stuck).await?;
    let run = env.run(&["cancel", &other]).await?.ok()?;
    assert!(run.stdout.contains(&other), "{run:?}");
    assert!(run.stdout.contains("COMPENSAT"), "{run:?}");
    wait_terminal(&mut env.client, &other, DEADLINE).await?;

    // watch: the events once the server streams them; until then its error, clearly.
    let run = env.run(&["--output", "json", "watch", &id]).await?;
    if run.status.success() {
        let events = run.json_lines()?;
        assert!(!events.is_empty());
        for event in &events {
            assert_keys(event, &["seq", "type", "step", "recorded_at"]);
        }
    } else {
        assert_fails_with(&run, "UNIMPLEMENTED");
    }
    let run = env.run(&["watch", &id]).await?;
    if run.status.success() {
        assert!(run.stdout.contains("SEQ"), "{run:?}");
    } else {
        assert_fails_with(&run, "UNIMPLEMENTED");
    }

    // retry of a saga that is not FAILED: refused either way.
    let run = env.run(&["retry", &id]).await?;
    assert!(!run.status.success(), "{run:?}");
    assert!(
        run.stderr.contains("UNIMPLEMENTED") || run.stderr.contains("FAILED_PRECONDITION"),
        "{run:?}"
    );

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

    env.stop().await
}

#[tokio::test]
async fn bench_reports_its_figures() -> anyhow::Result<()> {
    let env = Env::start("cli_bench").await?;
    let report = env
        .json(&["bench", "--sagas", "20", "--concurrency", "4"])
        .await?
        .json()?;
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

    // JSON: the ended saga, the same object as `get`, with `created` added.
    let input = order_input("alice");
    let saga = env
        .json(&["start", "order_fulfillment", "--input", &input, "--wait"])
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
    // refusal and the timeline.
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
        .await?
        .ok()?;
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

    // A saga that does not end in time: a clear error naming it; the saga goes on.
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
    assert_fails_with(&run, "has not ended within 1s");
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
    assert_fails_with(&run, "--wait");

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

    // A folder that is not there.
    let missing = dir.join("absent").display().to_string();
    let run = sagactl(&["--output", "json", "defs", "validate", &missing]).await?;
    assert!(!run.status.success(), "{run:?}");
    let report = run.json()?;
    assert_eq!(report["valid"], json!(false));
    assert_eq!(report["errors"][0]["file"], json!(missing));

    Ok(())
}
