//! One trace per saga, across sagad and the three real participants, exported by OTLP to a
//! receiver inside the test: every attempt of a step is a span in sagad and, as its child, a
//! span in the participant; a saga started with a caller's `traceparent` continues the
//! caller's trace; and a saga whose sagad is killed with SIGKILL mid-way goes on in the same
//! trace once another sagad takes it over, since the trace context is kept in the saga's log.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::ensure;
use sagad_e2e::demo::{DemoOptions, DemoSystem, flags};
use sagad_e2e::otlp::{OtlpReceiver, ReceivedSpan};
use sagad_e2e::*;
use sagad_proto::v1::{SagaStatus, StartSagaRequest};
use serde_json::json;

const STEPS: [&str; 4] = [
    "create_order",
    "charge_payment",
    "schedule_shipment",
    "approve_order",
];
const SERVICES: [&str; 4] = [
    "sagad",
    "order-service",
    "payment-service",
    "shipping-service",
];

fn order(customer: &str) -> serde_json::Value {
    json!({
        "customer_id": customer,
        "amount_cents": 1200,
        "currency": "EUR",
        "country": "SE",
        "items": [{"sku": "BOOK-42", "quantity": 1}],
    })
}

/// The spans about one saga (sagad's attempts and the participants' calls name it).
fn spans_of(receiver: &OtlpReceiver, saga_id: &str) -> Vec<ReceivedSpan> {
    receiver
        .spans()
        .into_iter()
        .filter(|span| span.attribute("saga_id") == Some(saga_id))
        .collect()
}

/// Whether each participant span of these steps is the child of one of sagad's attempt spans.
fn children_of_attempts(spans: &[ReceivedSpan], steps: &[&str]) -> Result<(), String> {
    let attempts: BTreeSet<&str> = spans
        .iter()
        .filter(|span| span.service == "sagad")
        .map(|span| span.span_id.as_str())
        .collect();
    for span in spans.iter().filter(|span| span.service != "sagad") {
        let of_step = span
            .attribute("step")
            .is_some_and(|step| steps.contains(&step));
        if of_step && !attempts.contains(span.parent_span_id.as_str()) {
            return Err(format!(
                "{}'s span {} is not the child of a sagad attempt",
                span.service, span.name
            ));
        }
    }
    Ok(())
}

/// Waits until the participants' spans of every step have arrived, and sagad's spans of the
/// attempts at `sagad_steps` (sagad sends its spans in batches of its own).
async fn wait_for_spans(
    receiver: &OtlpReceiver,
    saga_id: &str,
    sagad_steps: &[&str],
) -> anyhow::Result<Vec<ReceivedSpan>> {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let spans = spans_of(receiver, saga_id);
        let stepped: BTreeSet<&str> = spans
            .iter()
            .filter(|span| span.service != "sagad")
            .filter_map(|span| span.attribute("step"))
            .collect();
        if STEPS.iter().all(|step| stepped.contains(step))
            && children_of_attempts(&spans, sagad_steps).is_ok()
        {
            return Ok(spans);
        }
        if Instant::now() > until {
            return Ok(spans);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Everything about the saga is one trace, from sagad and each participant; the participant
/// spans of `sagad_steps` are children of sagad's attempt spans. Returns the trace id.
fn one_trace(spans: &[ReceivedSpan], sagad_steps: &[&str]) -> anyhow::Result<String> {
    let traces: BTreeSet<&str> = spans.iter().map(|span| span.trace_id.as_str()).collect();
    ensure!(
        traces.len() == 1,
        "the saga's spans are in {} traces: {:#?}",
        traces.len(),
        spans
            .iter()
            .map(|span| (
                &span.trace_id,
                &span.service,
                &span.name,
                &span.parent_span_id
            ))
            .collect::<Vec<_>>()
    );
    let services: BTreeSet<&str> = spans.iter().map(|span| span.service.as_str()).collect();
    for service in SERVICES {
        ensure!(
            services.contains(service),
            "no span of {service}: {services:?}"
        );
    }
    children_of_attempts(spans, sagad_steps).map_err(anyhow::Error::msg)?;
    // A participant's statements are events of its call's span.
    ensure!(
        spans
            .iter()
            .filter(|span| span.service == "payment-service")
            .any(|span| span.events.iter().any(|event| event
                .iter()
                .any(|(key, value)| key == "db.statement" && value.contains("accounts")))),
        "no statement of payment-service in its spans: {:#?}",
        spans
            .iter()
            .filter(|span| span.service == "payment-service")
            .map(|span| &span.events)
            .collect::<Vec<_>>()
    );
    Ok(traces.into_iter().next().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_saga_is_one_trace_across_sagad_and_the_participants_even_after_a_sigkill()
-> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let options = DemoOptions {
        // Slow enough for sagad to be killed between two steps.
        participant_args: flags(&["--latency-ms", "300"]),
        sagad_args: flags(&["--lease-ttl", "1s", "--poll-interval", "250ms"]),
        env: vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
                receiver.endpoint(),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
        ],
        ..DemoOptions::default()
    };
    let defs = repo_root().join("saga-defs");
    let mut system = DemoSystem::start("traces", &defs, options).await?;
    let outcome = traces(&mut system, &receiver).await;
    system.shut_down_after(outcome).await
}

async fn traces(system: &mut DemoSystem, receiver: &OtlpReceiver) -> anyhow::Result<()> {
    // A caller's trace goes on through the saga.
    let mut client = system.client().await?;
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(StartSagaRequest {
        saga_type: "order_fulfillment".to_owned(),
        input: Some(to_struct(order("c-traced"))),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{caller_trace}-00f067aa0ba902b7-01").parse()?,
    );
    let continued = client.start_saga(request).await?.into_inner().saga_id;
    let done = wait_terminal(&mut client, &continued, Duration::from_secs(60)).await?;
    ensure!(done.status == SagaStatus::Completed as i32);
    let spans = wait_for_spans(receiver, &continued, &STEPS).await?;
    let trace = one_trace(&spans, &STEPS)?;
    ensure!(
        trace == caller_trace,
        "the saga's trace {trace} is not the caller's {caller_trace}"
    );
    println!(
        "a saga with the caller's traceparent: {} spans, all in the caller's trace",
        spans.len()
    );

    // Killed mid-way: another sagad takes the saga over, in the same trace.
    let killed = start_saga(&mut client, "order_fulfillment", order("c-killed")).await?;
    wait_until(&mut client, &killed, Duration::from_secs(60), |saga| {
        saga.steps
            .iter()
            .any(|step| step.name == "create_order" && step.attempts >= 1)
            && saga.status == SagaStatus::Running as i32
    })
    .await?;
    system.kill_replica(0).await?;
    system.restart_replica(0).await?;
    let mut client = system.client().await?;
    let done = wait_terminal(&mut client, &killed, Duration::from_secs(60)).await?;
    ensure!(
        done.status == SagaStatus::Completed as i32,
        "{:?}",
        done.status
    );
    // The sagad that was killed may not have sent its last spans; the one that took over
    // sent the attempts of the steps it made.
    let after_the_kill = ["schedule_shipment", "approve_order"];
    let spans = wait_for_spans(receiver, &killed, &after_the_kill).await?;
    let trace = one_trace(&spans, &after_the_kill)?;
    ensure!(
        trace != caller_trace,
        "a new saga reused the caller's trace"
    );
    println!(
        "a saga whose sagad was killed mid-way: {} spans, all in trace {trace}",
        spans.len()
    );
    Ok(())
}
