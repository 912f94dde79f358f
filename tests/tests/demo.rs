//! End-to-end with every part real: order-service, payment-service and shipping-service as
//! processes on databases of their own, sagad as a process, sagas started with `sagactl`.
//! A mix of sagas — some complete, some are refused for funds, some for their destination —
//! must end as the demo domain says, and the participants' databases must agree: every order's
//! status matches its saga, every account holds the default balance minus the amounts of its
//! customer's completed sagas, and the participants' ledgers hold exactly the contract's keys.
//! The same mix runs with transient faults injected into every participant, and with
//! payment-service killed by SIGKILL and started again while sagas are in flight.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::{Context, ensure};
use sagad_e2e::cli::sagactl;
use sagad_e2e::demo::{
    ALL_DONE_WITHIN, DemoOptions, DemoSystem, Planned, check_the_run, flags, mix, patient_defs,
    step_status,
};
use sagad_e2e::*;
use sagad_proto::v1::{Saga, StepStatus};
use serde_json::json;

/// Starts each planned saga with `sagactl start --output json`, all at once.
async fn start_with_sagactl(
    server: &str,
    planned: &[Planned],
) -> anyhow::Result<HashMap<String, Planned>> {
    let mut runs = tokio::task::JoinSet::new();
    for plan in planned.iter().cloned() {
        let server = server.to_owned();
        runs.spawn(async move {
            let input = plan.input().to_string();
            let run = sagactl(&[
                "--server",
                &server,
                "--output",
                "json",
                "start",
                "order_fulfillment",
                "--input",
                &input,
                "--idempotency-key",
                &plan.idempotency_key,
            ])
            .await?
            .ok()?;
            let started = run.json()?;
            ensure!(started["created"] == json!(true), "not created: {started}");
            let saga_id = started["saga_id"]
                .as_str()
                .context("sagactl start printed no saga_id")?
                .to_owned();
            anyhow::Ok((saga_id, plan))
        });
    }
    let mut started = HashMap::new();
    while let Some(run) = runs.join_next().await {
        let (saga_id, plan) = run??;
        started.insert(saga_id, plan);
    }
    Ok(started)
}

fn attempts_beyond_the_first(sagas: &BTreeMap<String, Saga>) -> u32 {
    sagas
        .values()
        .flat_map(|saga| &saga.steps)
        .map(|step| step.attempts.saturating_sub(1) + step.compensation_attempts.saturating_sub(1))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mix_of_sagas_ends_as_the_domain_says() -> anyhow::Result<()> {
    let defs = repo_root().join("saga-defs");
    let system = DemoSystem::start("demo_mix", &defs, DemoOptions::default()).await?;
    let plans = start_with_sagactl(&system.server(), &mix(4)).await?;
    let outcome = check_the_run(&system, &plans).await;
    let sagas = system.shut_down_after(outcome).await?;
    ensure!(sagas.len() == 16, "{} sagas, want 16", sagas.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_mix_under_transient_faults_ends_the_same() -> anyhow::Result<()> {
    let defs = patient_defs()?;
    let options = DemoOptions {
        participant_args: flags(&["--transient-failure-rate", "0.3"]),
        ..DemoOptions::default()
    };
    let system = DemoSystem::start("demo_faults", &defs, options).await?;
    let plans = start_with_sagactl(&system.server(), &mix(4)).await?;
    let outcome = check_the_run(&system, &plans).await;
    let sagas = system.shut_down_after(outcome).await?;
    // About 50 calls at a 0.3 failure rate: some must have been retried, or no fault was
    // injected and this run proved nothing.
    let retries = attempts_beyond_the_first(&sagas);
    ensure!(retries > 0, "no call was retried: were faults injected?");
    println!("transient faults: {retries} retried attempts, same outcomes");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_killed_and_restarted_mid_run_loses_nothing() -> anyhow::Result<()> {
    let defs = patient_defs()?;
    let options = DemoOptions {
        participant_args: flags(&["--latency-ms", "100"]),
        ..DemoOptions::default()
    };
    let mut system = DemoSystem::start("demo_kill", &defs, options).await?;
    let outcome = kill_payment_mid_run(&mut system).await;
    system.shut_down_after(outcome).await
}

async fn kill_payment_mid_run(system: &mut DemoSystem) -> anyhow::Result<()> {
    let server = system.server();
    let mut planned = mix(4).into_iter();
    let first_wave: Vec<Planned> = planned.by_ref().take(8).collect();
    let mut plans = start_with_sagactl(&server, &first_wave).await?;

    // Kill payment-service once a charge is in flight.
    let mut client = system.client().await?;
    let charging = plans.keys().next().cloned().context("no saga started")?;
    wait_until(&mut client, &charging, ALL_DONE_WITHIN, |saga| {
        step_status(saga, "create_order") == Some(StepStatus::Succeeded)
    })
    .await?;
    system.payment.kill().await?;

    // Sagas started while it is down wait at their charge and retry it.
    let second_wave: Vec<Planned> = planned.collect();
    plans.extend(start_with_sagactl(&server, &second_wave).await?);
    wait_for_a_failed_charge(&mut client, &plans).await?;
    system.payment.restart().await?;

    let sagas = check_the_run(system, &plans).await?;
    ensure!(sagas.len() == 16, "{} sagas, want 16", sagas.len());
    println!(
        "payment-service killed and restarted: {} retried attempts, every saga finished",
        attempts_beyond_the_first(&sagas)
    );
    Ok(())
}

/// Waits until some saga has seen its charge fail (payment-service is down).
async fn wait_for_a_failed_charge(
    client: &mut Client,
    plans: &HashMap<String, Planned>,
) -> anyhow::Result<()> {
    let until = tokio::time::Instant::now() + ALL_DONE_WITHIN;
    loop {
        for id in plans.keys() {
            let saga = get_saga(client, id).await?;
            if saga
                .steps
                .iter()
                .any(|step| step.name == "charge_payment" && !step.last_error.is_empty())
            {
                return Ok(());
            }
        }
        ensure!(
            tokio::time::Instant::now() < until,
            "no charge failed while payment-service was down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
