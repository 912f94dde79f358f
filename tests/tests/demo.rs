//! End-to-end with every part real: order-service, payment-service and shipping-service as
//! processes on databases of their own, sagad as a process, sagas started with `sagactl`.
//! A mix of sagas — some complete, some are refused for funds, some for their destination —
//! must end as the demo domain says, and the participants' databases must agree: every order's
//! status matches its saga, every account holds the default balance minus the amounts of its
//! customer's completed sagas, and the participants' ledgers hold exactly the contract's keys.
//! The same mix runs with transient faults injected into every participant, and with
//! payment-service killed by SIGKILL and started again while sagas are in flight.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use anyhow::{Context, ensure};
use sagad_e2e::cli::sagactl;
use sagad_e2e::demo::{DemoSystem, Service};
use sagad_e2e::*;
use sagad_proto::v1::{Saga, SagaStatus, StepStatus};
use serde_json::{Value, json};

const DEFAULT_BALANCE_CENTS: i64 = 100_000;

/// Long enough for a few dozen sagas with retries on a loaded 2-core machine.
const ALL_DONE_WITHIN: Duration = Duration::from_secs(180);

/// What the demo domain makes of a saga's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expected {
    Completes,
    RefusedForFunds,
    RefusedForDestination,
}

#[derive(Debug, Clone)]
struct Planned {
    customer_id: String,
    amount_cents: i64,
    country: &'static str,
    expected: Expected,
}

impl Planned {
    fn input(&self) -> Value {
        json!({
            "customer_id": self.customer_id,
            "amount_cents": self.amount_cents,
            "currency": "EUR",
            "country": self.country,
            "items": [{"sku": "BOOK-42", "quantity": 1}],
        })
    }
}

/// Per customer: two orders that complete, one over the whole balance, one to Antarctica
/// (shipping's default unsupported country). The completing amounts of a customer stay well
/// under the default balance, so no order of arrival changes an outcome.
fn mix(customers: usize) -> Vec<Planned> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut planned = Vec::new();
    for c in 0..customers {
        let customer_id = format!("customer-{}-{c}", &run[..8]);
        let amount = |n: i64| 1_000 + 100 * (c as i64) + n;
        let order = |amount_cents, country, expected| Planned {
            customer_id: customer_id.clone(),
            amount_cents,
            country,
            expected,
        };
        planned.push(order(amount(1), "SE", Expected::Completes));
        planned.push(order(amount(2), "DE", Expected::Completes));
        planned.push(order(150_000, "SE", Expected::RefusedForFunds));
        planned.push(order(amount(3), "AQ", Expected::RefusedForDestination));
    }
    planned
}

/// The repository's demo definition with a larger attempt budget for the three limited steps.
/// With faults injected on purpose, six attempts would now and then all fail (0.3^6 per step)
/// and turn a saga meant to complete into a compensated one; the point of these runs is that
/// retries under the same keys give the same outcomes, not the size of the budget.
fn patient_defs() -> anyhow::Result<Scratch> {
    let path = repo_root().join("saga-defs/order_fulfillment.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let patient = text.replace("max_attempts = 6,", "max_attempts = 40,");
    ensure!(
        patient != text,
        "order_fulfillment.toml no longer has `max_attempts = 6,`: update this test"
    );
    Scratch::defs(&[("order_fulfillment.toml", &patient)])
}

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

fn step_status(saga: &Saga, name: &str) -> Option<StepStatus> {
    saga.steps
        .iter()
        .find(|step| step.name == name)
        .and_then(|step| StepStatus::try_from(step.status).ok())
}

/// The steps whose compensation succeeded, in the order the log recorded it.
fn compensated_in_order(saga: &Saga) -> Vec<String> {
    saga.history
        .iter()
        .filter(|event| event.r#type == "compensation_succeeded")
        .map(|event| event.step.clone())
        .collect()
}

/// Everything wrong with one saga and what the participants say of it.
async fn saga_problems(system: &DemoSystem, saga: &Saga, plan: &Planned) -> Vec<String> {
    let mut problems = Vec::new();
    let id = &saga.saga_id;
    let status = SagaStatus::try_from(saga.status).ok();
    let steps: Vec<(&str, Option<StepStatus>)> = [
        "create_order",
        "charge_payment",
        "schedule_shipment",
        "approve_order",
    ]
    .iter()
    .map(|name| (*name, step_status(saga, name)))
    .collect();
    use StepStatus::*;
    let (want_status, want_steps, want_compensated, refusal) = match plan.expected {
        Expected::Completes => (
            SagaStatus::Completed,
            [Succeeded, Succeeded, Succeeded, Succeeded],
            vec![],
            None,
        ),
        Expected::RefusedForFunds => (
            SagaStatus::Compensated,
            [Compensated, Failed, Pending, Pending],
            vec!["create_order"],
            Some("INSUFFICIENT_FUNDS"),
        ),
        Expected::RefusedForDestination => (
            SagaStatus::Compensated,
            [Compensated, Compensated, Failed, Pending],
            vec!["charge_payment", "create_order"],
            Some("UNSUPPORTED_DESTINATION"),
        ),
    };
    if status != Some(want_status) {
        problems.push(format!(
            "{id} ({:?}): status {status:?}, want {want_status:?} ({})",
            plan.expected, saga.failure_reason
        ));
        return problems;
    }
    let got_steps: Vec<Option<StepStatus>> = steps.iter().map(|(_, status)| *status).collect();
    let want_steps: Vec<Option<StepStatus>> = want_steps.iter().map(|s| Some(*s)).collect();
    if got_steps != want_steps {
        problems.push(format!("{id}: steps {got_steps:?}, want {want_steps:?}"));
    }
    if compensated_in_order(saga) != want_compensated {
        problems.push(format!(
            "{id}: compensated {:?}, want {want_compensated:?} (newest first)",
            compensated_in_order(saga)
        ));
    }
    if let Some(code) = refusal
        && !saga.failure_reason.contains(code)
    {
        problems.push(format!(
            "{id}: failure reason {:?} does not name {code}",
            saga.failure_reason
        ));
    }

    let context = to_json(&saga.context);
    let Some(order_id) = context["steps"]["create_order"]["order_id"].as_str() else {
        problems.push(format!("{id}: no order_id in the context {context}"));
        return problems;
    };
    let want_order = if plan.expected == Expected::Completes {
        "APPROVED"
    } else {
        "CANCELLED"
    };
    match system.order_status(order_id).await {
        Ok(order) if order == want_order => {}
        Ok(order) => problems.push(format!(
            "{id}: order {order_id} is {order} at order-service, the saga says {want_order}"
        )),
        Err(error) => problems.push(format!("{id}: order {order_id}: {error:#}")),
    }
    let want_shipment = (plan.expected == Expected::Completes).then(|| "SCHEDULED".to_owned());
    match system.shipment_status(order_id).await {
        Ok(shipment) if shipment == want_shipment => {}
        Ok(shipment) => problems.push(format!(
            "{id}: shipment of {order_id} is {shipment:?}, want {want_shipment:?}"
        )),
        Err(error) => problems.push(format!("{id}: shipment of {order_id}: {error:#}")),
    }
    problems
}

/// Each account holds the default balance minus the amounts of its completed sagas.
async fn money_problems(
    system: &DemoSystem,
    sagas: &BTreeMap<String, Saga>,
    plans: &HashMap<String, Planned>,
) -> anyhow::Result<Vec<String>> {
    let mut charged: BTreeMap<&str, i64> = BTreeMap::new();
    for (id, plan) in plans {
        let completed = sagas
            .get(id)
            .is_some_and(|saga| saga.status == SagaStatus::Completed as i32);
        *charged.entry(&plan.customer_id).or_default() +=
            if completed { plan.amount_cents } else { 0 };
    }
    let mut problems = Vec::new();
    for (customer, charged) in charged {
        let balance = system.balance_cents(customer).await?;
        if balance != DEFAULT_BALANCE_CENTS - charged {
            problems.push(format!(
                "{customer}: balance {balance}, want {DEFAULT_BALANCE_CENTS} - {charged}"
            ));
        }
    }
    Ok(problems)
}

/// Every key a participant recorded is `<saga_id>/<step>/execute|compensate` for one of these
/// sagas and one of its own steps; every step the saga shows as done or undone has its key.
async fn ledger_problems(
    system: &DemoSystem,
    sagas: &BTreeMap<String, Saga>,
) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    for service in Service::ALL {
        let ledger = system.ledger(service).await?;
        let recorded: BTreeSet<&str> = ledger
            .iter()
            .map(|entry| entry.idempotency_key.as_str())
            .collect();
        for entry in &ledger {
            let parts: Vec<&str> = entry.idempotency_key.split('/').collect();
            let well_formed = match parts.as_slice() {
                [saga_id, step, action] => {
                    let own_step = sagas.get(*saga_id).is_some_and(|saga| {
                        saga.steps
                            .iter()
                            .any(|s| s.name == *step && s.participant == service.participant())
                    });
                    let kind_fits = match *action {
                        "execute" => entry.kind == "execute" || entry.kind == "tombstone",
                        "compensate" => entry.kind == "compensate",
                        _ => false,
                    };
                    own_step && kind_fits
                }
                _ => false,
            };
            if !well_formed {
                problems.push(format!(
                    "{}: key {:?} ({}) breaks the contract's format",
                    service.participant(),
                    entry.idempotency_key,
                    entry.kind
                ));
            }
        }
        for saga in sagas.values() {
            for step in saga
                .steps
                .iter()
                .filter(|step| step.participant == service.participant())
            {
                let status = StepStatus::try_from(step.status).ok();
                let mut needed = Vec::new();
                if matches!(
                    status,
                    Some(StepStatus::Succeeded | StepStatus::Compensated | StepStatus::Failed)
                ) {
                    needed.push(format!("{}/{}/execute", saga.saga_id, step.name));
                }
                if status == Some(StepStatus::Compensated) {
                    needed.push(format!("{}/{}/compensate", saga.saga_id, step.name));
                }
                for key in needed {
                    if !recorded.contains(key.as_str()) {
                        problems.push(format!(
                            "{}: no record of {key}, yet the saga shows {:?}",
                            service.participant(),
                            status
                        ));
                    }
                }
            }
        }
    }
    Ok(problems)
}

/// Waits for every saga to end, then checks sagas, orders, shipments, money and ledgers.
async fn check_the_run(
    system: &DemoSystem,
    plans: &HashMap<String, Planned>,
) -> anyhow::Result<BTreeMap<String, Saga>> {
    let mut client = system.sagad.client().await?;
    let ids: BTreeSet<String> = plans.keys().cloned().collect();
    let sagas = wait_all_terminal(&mut client, &ids, ALL_DONE_WITHIN).await?;
    let mut problems = Vec::new();
    for (id, saga) in &sagas {
        let plan = plans.get(id).context("a saga nobody planned")?;
        problems.extend(saga_problems(system, saga, plan).await);
    }
    problems.extend(money_problems(system, &sagas, plans).await?);
    problems.extend(ledger_problems(system, &sagas).await?);
    ensure!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
    Ok(sagas)
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
    let system = DemoSystem::start("demo_mix", &defs, &[]).await?;
    let plans = start_with_sagactl(&system.server(), &mix(4)).await?;
    let outcome = check_the_run(&system, &plans).await;
    let sagas = system.shut_down_after(outcome).await?;
    ensure!(sagas.len() == 16, "{} sagas, want 16", sagas.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_mix_under_transient_faults_ends_the_same() -> anyhow::Result<()> {
    let defs = patient_defs()?;
    let faults = ["--transient-failure-rate".to_owned(), "0.3".to_owned()];
    let system = DemoSystem::start("demo_faults", &defs, &faults).await?;
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
    let latency = ["--latency-ms".to_owned(), "100".to_owned()];
    let mut system = DemoSystem::start("demo_kill", &defs, &latency).await?;
    let outcome = kill_payment_mid_run(&mut system).await;
    system.shut_down_after(outcome).await
}

async fn kill_payment_mid_run(system: &mut DemoSystem) -> anyhow::Result<()> {
    let server = system.server();
    let mut planned = mix(4).into_iter();
    let first_wave: Vec<Planned> = planned.by_ref().take(8).collect();
    let mut plans = start_with_sagactl(&server, &first_wave).await?;

    // Kill payment-service once a charge is in flight.
    let mut client = system.sagad.client().await?;
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
