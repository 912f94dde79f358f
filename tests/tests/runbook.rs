//! The README's operations section, step by step, against the real demo (the three
//! participants and sagad as processes) with `sagactl`: a saga stuck while payment-service
//! does not answer is found with `list --stuck`, inspected with `get` and watched with `watch`
//! until it completes once payment-service answers again; a saga FAILED because its refund
//! was refused (a frozen account) is found, retried once the account is unfrozen, and another
//! is retried with its refund skipped, as done by hand.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use sagad_e2e::cli::{sagactl, spawn_sagactl};
use sagad_e2e::demo::{DEFAULT_BALANCE_CENTS, DemoOptions, DemoSystem, Service, flags};
use sagad_e2e::*;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt as _;

const WITHIN: Duration = Duration::from_secs(60);

fn order(customer: &str, country: &str) -> String {
    json!({
        "customer_id": customer,
        "amount_cents": 2500,
        "currency": "EUR",
        "country": country,
        "items": [{"sku": "parka-1", "quantity": 1}],
    })
    .to_string()
}

/// `sagactl --server S --output json ARGS…`, which must succeed (`ok`) or not.
async fn json_run(server: &str, args: &[&str]) -> anyhow::Result<sagad_e2e::cli::CliRun> {
    let mut all = vec!["--server", server, "--output", "json"];
    all.extend_from_slice(args);
    sagactl(&all).await
}

/// Starts an order and returns its saga id.
async fn start(server: &str, input: &str) -> anyhow::Result<String> {
    let started = json_run(server, &["start", "order_fulfillment", "--input", input])
        .await?
        .ok()?
        .json()?;
    Ok(started["saga_id"]
        .as_str()
        .context("no saga_id printed")?
        .to_owned())
}

/// `sagactl get ID` as JSON.
async fn get(server: &str, saga_id: &str) -> anyhow::Result<Value> {
    json_run(server, &["get", saga_id]).await?.ok()?.json()
}

/// Polls `sagactl get` until `done` holds.
async fn until(
    server: &str,
    saga_id: &str,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + WITHIN;
    loop {
        let saga = get(server, saga_id).await?;
        if done(&saga) {
            return Ok(saga);
        }
        if Instant::now() > deadline {
            bail!("saga {saga_id} did not get there: {saga}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The saga ids `sagactl list ARGS…` prints.
async fn listed(server: &str, args: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut all = vec!["list"];
    all.extend_from_slice(args);
    Ok(json_run(server, &all)
        .await?
        .ok()?
        .json_lines()?
        .iter()
        .filter_map(|saga| saga["saga_id"].as_str().map(str::to_owned))
        .collect())
}

fn step<'a>(saga: &'a Value, name: &str) -> Option<&'a Value> {
    saga["steps"]
        .as_array()?
        .iter()
        .find(|step| step["name"] == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operations_runbook_works_as_written() -> anyhow::Result<()> {
    let options = DemoOptions {
        // A minute in the README; shorter here.
        sagad_args: flags(&["--stuck-after", "3s"]),
        ..DemoOptions::default()
    };
    let defs = repo_root().join("saga-defs");
    let mut system = DemoSystem::start("runbook", &defs, options).await?;
    let outcome = runbook(&mut system).await;
    system.shut_down_after(outcome).await
}

async fn runbook(system: &mut DemoSystem) -> anyhow::Result<()> {
    let server = system.server();
    let run = uuid::Uuid::new_v4().simple().to_string();

    // A stuck saga: payment-service does not answer.
    system.payment.pause().await?;
    let stuck = start(&server, &order(&format!("dave-{run}"), "DE")).await?;
    let mut watch = spawn_sagactl(&["--server", &server, "watch", &stuck])?;
    let found = Instant::now();
    loop {
        if listed(&server, &["--stuck"]).await?.contains(&stuck) {
            break;
        }
        ensure!(found.elapsed() < WITHIN, "{stuck} never listed as stuck");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let saga = get(&server, &stuck).await?;
    let charge = step(&saga, "charge_payment").context("no charge_payment step")?;
    ensure!(
        saga["stuck"] == json!(true)
            && charge["attempts"]
                .as_u64()
                .is_some_and(|attempts| attempts >= 1)
            && charge["last_error"]
                .as_str()
                .is_some_and(|error| error.contains("timed out")),
        "get does not show why it is stuck: {saga}"
    );
    let table = sagactl(&["--server", &server, "get", &stuck]).await?.ok()?;
    ensure!(
        table.stdout.contains("stuck"),
        "the table of a stuck saga does not say so: {}",
        table.stdout
    );
    system.payment.resume().await?;
    let saga = until(&server, &stuck, |saga| saga["status"] == "COMPLETED").await?;
    ensure!(saga["stuck"] == json!(false));
    ensure!(!listed(&server, &["--stuck"]).await?.contains(&stuck));
    let status = tokio::time::timeout(WITHIN, watch.wait())
        .await
        .context("watch did not end with the saga")??;
    let mut watched = String::new();
    if let Some(mut out) = watch.stdout.take() {
        out.read_to_string(&mut watched).await?;
    }
    ensure!(
        status.success() && watched.contains("saga_completed"),
        "watch ({status}) printed: {watched}"
    );
    println!(
        "stuck saga listed within {:?}, completed once payment-service answered",
        found.elapsed()
    );

    // A FAILED saga: the refund to a frozen account is refused. Unfreeze it, retry.
    let frozen = format!("frozen-erin-{run}");
    let failed = start(&server, &order(&frozen, "AQ")).await?;
    until(&server, &failed, |saga| saga["status"] == "FAILED").await?;
    ensure!(
        listed(&server, &["--status", "FAILED"])
            .await?
            .contains(&failed)
    );
    let mut payment_db = system.participant_db(Service::Payment).await?;
    sqlx::query("update accounts set frozen = false where customer_id = $1")
        .bind(&frozen)
        .execute(&mut payment_db)
        .await?;
    let retried = json_run(
        &server,
        &["retry", &failed, "--reason", "account unfrozen, ticket 17"],
    )
    .await?
    .ok()?
    .json()?;
    ensure!(retried["status"] == "COMPENSATING", "{retried}");
    let saga = until(&server, &failed, |saga| saga["status"] == "COMPENSATED").await?;
    ensure!(
        system.balance_cents(&frozen).await? == DEFAULT_BALANCE_CENTS,
        "the retried refund did not credit the account back"
    );
    ensure!(
        saga["history"]
            .to_string()
            .contains("account unfrozen, ticket 17"),
        "the history does not say why it was retried: {saga}"
    );

    // Another: refunded by hand, so the refund is skipped.
    let by_hand = format!("frozen-frank-{run}");
    let failed = start(&server, &order(&by_hand, "AQ")).await?;
    until(&server, &failed, |saga| saga["status"] == "FAILED").await?;
    json_run(
        &server,
        &[
            "retry",
            &failed,
            "--skip",
            "charge_payment",
            "--reason",
            "refunded by bank transfer",
        ],
    )
    .await?
    .ok()?;
    let saga = until(&server, &failed, |saga| saga["status"] == "COMPENSATED").await?;
    ensure!(
        step(&saga, "create_order").is_some_and(|step| step["status"] == "COMPENSATED"),
        "the order was not cancelled: {saga}"
    );
    ensure!(
        system.balance_cents(&by_hand).await? == DEFAULT_BALANCE_CENTS - 2500,
        "payment-service refunded a skipped step"
    );
    let retry = json_run(&server, &["retry", &failed]).await?;
    ensure!(
        retry.status.code() == Some(1) && retry.stderr.contains("FAILED_PRECONDITION"),
        "retry of a COMPENSATED saga: {retry:?}"
    );
    Ok(())
}
