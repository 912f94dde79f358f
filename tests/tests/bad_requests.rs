//! One regression test per defect the request fuzzer (`fuzz.rs`) found: each sends the few
//! requests that show it to an in-process sagad with scripted participants, and checks the
//! contract's answer (INVALID_ARGUMENT naming the field, nothing recorded) or, for a start
//! whose client gave up, that the saga is driven all the same. Each test gathers every
//! problem it sees before failing, so one run shows all that is wrong.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use pbjson_types::Struct;
use sagad_e2e::participant::{Script, default_answer};
use sagad_e2e::wire::{self, number, string};
use sagad_e2e::*;
use sagad_proto::v1::{
    CancelSagaRequest, GetSagaRequest, ListSagasRequest, SagaStatus, StartSagaRequest,
    StartSagaResponse,
};
use serde_json::{Value, json};
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

const ORDER: &str = "order_fulfillment";
const DEADLINE: Duration = Duration::from_secs(60);
/// 2^53: the largest integer a double carries exactly, and the largest magnitude accepted.
const MAX_SAFE: f64 = 9_007_199_254_740_992.0;

fn order(customer: &str) -> Value {
    json!({
        "customer_id": customer,
        "amount_cents": 1250,
        "currency": "EUR",
        "country": "FR",
        "items": [{"sku": "sku-1", "quantity": 2}],
    })
}

/// sagad on the demo definition with a step timeout of a minute, and participants that answer
/// at once, except that order-service never answers for customer "hang": its saga stays
/// RUNNING, at one version, until it is cancelled.
struct Env {
    participants: Vec<FakeParticipant>,
    daemon: Option<TestDaemon>,
    channel: Channel,
    client: Client,
    _defs: Scratch,
    /// Last, so that on a panic sagad is told to stop before its database goes.
    db: DatabaseGuard,
}

impl Env {
    async fn start(label: &str) -> anyhow::Result<Env> {
        let db = DatabaseGuard::new(label);
        let path = repo_root().join("saga-defs/order_fulfillment.toml");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let patient = text.replace("timeout = \"5s\"", "timeout = \"60s\"");
        ensure!(
            patient != text,
            "order_fulfillment.toml no longer has `timeout = \"5s\"`: update this test"
        );
        let defs = Scratch::defs(&[("order_fulfillment.toml", &patient)])?;
        let script: Script = Arc::new(|call, _| {
            if call.step == "create_order" && call.input["input"]["customer_id"] == json!("hang") {
                match call.kind {
                    CallKind::Execute => Answer::hang(),
                    CallKind::Compensate => default_answer(call),
                }
            } else {
                default_answer(call)
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
            defs.display().to_string(),
        ];
        for participant in &participants {
            args.extend(["--participant".to_owned(), participant.flag()]);
        }
        let daemon = TestDaemon::start(&args).await?;
        let channel = Endpoint::from_shared(format!("http://{}", daemon.addr))?
            .connect()
            .await?;
        Ok(Env {
            participants,
            daemon: Some(daemon),
            client: Client::new(channel.clone()),
            channel,
            _defs: defs,
            db,
        })
    }

    async fn start_saga(
        &mut self,
        request: StartSagaRequest,
    ) -> Result<StartSagaResponse, tonic::Status> {
        self.client
            .start_saga(request)
            .await
            .map(tonic::Response::into_inner)
    }

    async fn db(&self) -> anyhow::Result<PgConnection> {
        Ok(PgConnection::connect(&self.db.url()).await?)
    }

    /// How many sagas the database holds.
    async fn recorded(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar("select count(*) from sagas")
            .fetch_one(&mut self.db().await?)
            .await?)
    }

    fn participant_calls(&self) -> usize {
        self.participants
            .iter()
            .map(|participant| participant.calls().len())
            .sum()
    }

    /// The saga of customer "hang", RUNNING with its first call in flight for as long as the
    /// test needs it.
    async fn hanging_saga(&mut self) -> anyhow::Result<String> {
        let saga_id = start_saga(&mut self.client, ORDER, order("hang")).await?;
        let order_service = &self.participants[0];
        let until = tokio::time::Instant::now() + DEADLINE;
        while order_service.calls_for(&saga_id).is_empty() {
            ensure!(
                tokio::time::Instant::now() < until,
                "order-service was not called for {saga_id}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(saga_id)
    }

    /// Cancels a saga of [`hanging_saga`](Self::hanging_saga) if it still runs, and waits for
    /// its end: a call left hanging would hold sagad's shutdown for its whole grace period.
    async fn end_hanging(&mut self, saga_id: &str) -> anyhow::Result<()> {
        if get_saga(&mut self.client, saga_id).await?.status == SagaStatus::Running as i32 {
            self.cancel(saga_id, "the test is done").await?;
        }
        wait_terminal(&mut self.client, saga_id, DEADLINE).await?;
        Ok(())
    }

    async fn cancel(&mut self, saga_id: &str, reason: &str) -> Result<(), tonic::Status> {
        self.client
            .cancel_saga(CancelSagaRequest {
                saga_id: saga_id.to_owned(),
                reason: reason.to_owned(),
            })
            .await
            .map(|_| ())
    }

    async fn finish(mut self) -> anyhow::Result<()> {
        if let Some(daemon) = self.daemon.take() {
            daemon.stop().await?;
        }
        self.db.drop_now().await
    }
}

/// A StartSaga of the demo type with this input.
fn start_request(input: Struct) -> StartSagaRequest {
    StartSagaRequest {
        saga_type: ORDER.to_owned(),
        idempotency_key: String::new(),
        input: Some(input),
        correlation_id: String::new(),
    }
}

/// What is wrong with an answer that should be INVALID_ARGUMENT with a message naming each of
/// `names`; `None` when it is right.
fn not_refused<T>(what: &str, result: Result<T, tonic::Status>, names: &[&str]) -> Option<String> {
    match result {
        Ok(_) => Some(format!("{what}: accepted, want INVALID_ARGUMENT")),
        Err(status) if status.code() != Code::InvalidArgument => Some(format!(
            "{what}: {:?} {:?}, want INVALID_ARGUMENT",
            status.code(),
            status.message().chars().take(200).collect::<String>()
        )),
        Err(status) => {
            let missing: Vec<&&str> = names
                .iter()
                .filter(|name| !status.message().contains(**name))
                .collect();
            (!missing.is_empty()).then(|| {
                format!(
                    "{what}: INVALID_ARGUMENT {:?} does not name {missing:?}",
                    status.message().chars().take(200).collect::<String>()
                )
            })
        }
    }
}

/// Fails listing every problem, or passes when there is none.
fn verdict(problems: Vec<String>) -> anyhow::Result<()> {
    ensure!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
    Ok(())
}

/// A StartSaga whose client's deadline passes while sagad handles it: once the saga is
/// recorded it must be driven to its end, whether or not the client heard the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_start_whose_client_gave_up_is_still_driven() -> anyhow::Result<()> {
    const STARTS: usize = 400;
    const IN_FLIGHT: usize = 16;
    let env = Env::start("bad_gave_up").await?;
    let mut rng = fastrand::Rng::new();
    let mut running = tokio::task::JoinSet::new();
    let mut answers: std::collections::BTreeMap<String, usize> = Default::default();
    for n in 0..STARTS {
        while running.len() >= IN_FLIGHT {
            if let Some(code) = running.join_next().await {
                *answers.entry(code?).or_default() += 1;
            }
        }
        let mut request = tonic::Request::new(start_request(wire::fields(&order(&format!(
            "customer-{n}"
        )))));
        request.set_timeout(Duration::from_millis(rng.u64(2..=11)));
        let mut client = env.client.clone();
        running.spawn(async move {
            match client.start_saga(request).await {
                Ok(_) => "OK".to_owned(),
                Err(status) => format!("{:?}", status.code()),
            }
        });
    }
    while let Some(code) = running.join_next().await {
        *answers.entry(code?).or_default() += 1;
    }
    let mut db = env.db().await?;
    let ended =
        wait_recorded_sagas_end(&mut db, Duration::from_secs(30), Duration::from_secs(120)).await;
    let recorded = recorded_sagas(&mut db).await?;
    let open = recorded.iter().filter(|saga| !saga.ended()).count();
    println!(
        "{STARTS} starts with deadlines of 2-11 ms: answers {answers:?}; {} sagas recorded, {open} \
         of them not ended",
        recorded.len()
    );
    ensure!(
        !recorded.is_empty(),
        "no start got recorded: the deadlines are too short for this machine to show anything"
    );
    ended?;
    env.finish().await
}

/// `correlation_id` up to 256 bytes and `idempotency_key` up to 512, a cancel's `reason` up
/// to 1024: longer ones are refused. A correlation id of tens of kilobytes used to be
/// accepted and then sent along as a header to every participant call.
#[tokio::test]
async fn over_long_ids_keys_and_reasons_are_refused() -> anyhow::Result<()> {
    let mut env = Env::start("bad_lengths").await?;
    let mut problems = Vec::new();
    let input = wire::fields(&order("long"));

    for len in [257, 20_000, 50_000, 90_000] {
        let mut request = start_request(input.clone());
        request.correlation_id = "c".repeat(len);
        let result = env.start_saga(request).await;
        problems.extend(not_refused(
            &format!("correlation_id of {len} bytes"),
            result,
            &["correlation_id"],
        ));
    }
    for len in [513, 2000] {
        let mut request = start_request(input.clone());
        request.idempotency_key = "k".repeat(len);
        let result = env.start_saga(request).await;
        problems.extend(not_refused(
            &format!("idempotency_key of {len} bytes"),
            result,
            &["idempotency_key"],
        ));
    }
    let recorded = env.recorded().await?;
    if recorded != 0 {
        problems.push(format!("the refused starts recorded {recorded} sagas"));
    }

    // At the limits: accepted, and the correlation id reaches the participants.
    let correlation_id = format!("{}é", "c".repeat(254));
    let mut request = start_request(input.clone());
    request.correlation_id = correlation_id.clone();
    request.idempotency_key = "k".repeat(512);
    match env.start_saga(request).await {
        Err(status) => problems.push(format!(
            "correlation_id of 256 bytes and idempotency_key of 512: {status:?}"
        )),
        Ok(started) => {
            let saga = wait_terminal(&mut env.client, &started.saga_id, DEADLINE).await?;
            if saga.status != SagaStatus::Completed as i32 || saga.correlation_id != correlation_id
            {
                problems.push(format!(
                    "the saga at the limits: status {:?}, correlation id of {} bytes",
                    SagaStatus::try_from(saga.status),
                    saga.correlation_id.len()
                ));
            }
        }
    }
    let ascii = "c".repeat(256);
    let mut request = start_request(input.clone());
    request.correlation_id = ascii.clone();
    match env.start_saga(request).await {
        Err(status) => problems.push(format!("correlation_id of 256 ASCII bytes: {status:?}")),
        Ok(started) => {
            wait_terminal(&mut env.client, &started.saga_id, DEADLINE).await?;
            let calls = env.participants[0].calls_for(&started.saga_id);
            let headers: Vec<Option<String>> = calls
                .iter()
                .map(|call| call.metadata_correlation_id.clone())
                .collect();
            if calls.is_empty() || headers.iter().any(|header| header.as_ref() != Some(&ascii)) {
                problems.push(format!(
                    "order-service's calls carried x-correlation-id of {:?} bytes, want 256",
                    headers
                        .iter()
                        .map(|header| header.as_ref().map(String::len))
                        .collect::<Vec<_>>()
                ));
            }
        }
    }

    let saga_id = env.hanging_saga().await?;
    for len in [1025, 5000] {
        let result = env.cancel(&saga_id, &"r".repeat(len)).await;
        problems.extend(not_refused(
            &format!("CancelSaga reason of {len} bytes"),
            result,
            &["reason"],
        ));
    }
    let saga = get_saga(&mut env.client, &saga_id).await?;
    if saga.status != SagaStatus::Running as i32 {
        problems.push(format!(
            "after the refused cancels the saga is {:?}, want RUNNING",
            SagaStatus::try_from(saga.status)
        ));
    }
    env.end_hanging(&saga_id).await?;
    // 1024 bytes (512 two-byte characters) is within the limit.
    let saga_id = env.hanging_saga().await?;
    if let Err(status) = env.cancel(&saga_id, &"é".repeat(512)).await {
        problems.push(format!("CancelSaga reason of 1024 bytes: {status:?}"));
    }
    let saga = wait_terminal(&mut env.client, &saga_id, DEADLINE).await?;
    if saga.status != SagaStatus::Compensated as i32 {
        problems.push(format!(
            "the saga cancelled with a 1024-byte reason ended {:?}, want COMPENSATED",
            SagaStatus::try_from(saga.status)
        ));
    }
    verdict(problems)?;
    env.finish().await
}

/// Numbers travel as doubles: integers beyond ±2^53 are not what the client meant, and NaN
/// and the infinities are not JSON. Refused, naming the field; 2^53 itself is accepted and
/// reads back. Such an input used to be recorded and then break every read of it.
#[tokio::test]
async fn numbers_beyond_2_pow_53_are_refused() -> anyhow::Result<()> {
    let mut env = Env::start("bad_numbers").await?;
    let mut problems = Vec::new();
    let base = wire::fields(&order("numbers"));

    let cases: Vec<(&str, &str, pbjson_types::Value, &[&str])> = vec![
        (
            "input.amount_cents = 9223372036854775807",
            "amount_cents",
            number(9_223_372_036_854_775_807.0),
            &["amount_cents"],
        ),
        (
            "input.amount_cents = 2^53 + 2",
            "amount_cents",
            number(MAX_SAFE + 2.0),
            &["amount_cents"],
        ),
        (
            "input.loyalty_points = -9223372036854775808",
            "loyalty_points",
            number(-9_223_372_036_854_775_808.0),
            &["loyalty_points"],
        ),
        (
            "input.loyalty_points = 1e300",
            "loyalty_points",
            number(1e300),
            &["loyalty_points"],
        ),
        (
            "input.loyalty_points = NaN",
            "loyalty_points",
            number(f64::NAN),
            &["loyalty_points"],
        ),
        (
            "input.loyalty_points = Infinity",
            "loyalty_points",
            number(f64::INFINITY),
            &["loyalty_points"],
        ),
        (
            "input.loyalty_points = -Infinity",
            "loyalty_points",
            number(f64::NEG_INFINITY),
            &["loyalty_points"],
        ),
        (
            "input.items[0].quantity = 18446744073709551615",
            "items",
            wire::value(&json!([{"sku": "sku-1", "quantity": 18_446_744_073_709_551_615u64}])),
            &["items", "quantity"],
        ),
    ];
    for (what, field, value, names) in cases {
        let mut input = base.clone();
        input.fields.insert(field.to_owned(), value);
        let result = env.start_saga(start_request(input)).await;
        problems.extend(not_refused(what, result, names));
    }
    let recorded = env.recorded().await?;
    if recorded != 0 {
        problems.push(format!("the refused starts recorded {recorded} sagas"));
    }
    let calls = env.participant_calls();
    if calls != 0 {
        problems.push(format!("the refused starts made {calls} participant calls"));
    }

    // ±2^53 exactly: accepted, and read back as sent by GetSaga and ListSagas.
    let mut input = base.clone();
    input
        .fields
        .insert("loyalty_points".to_owned(), number(MAX_SAFE));
    input
        .fields
        .insert("debt_points".to_owned(), number(-MAX_SAFE));
    match env.start_saga(start_request(input.clone())).await {
        Err(status) => problems.push(format!("input with ±2^53: {status:?}")),
        Ok(started) => {
            let id = started.saga_id;
            let unread = problems.len();
            match get_saga(&mut env.client, &id).await {
                Ok(saga)
                    if saga
                        .input
                        .as_ref()
                        .is_some_and(|back| wire::same_struct(back, &input)) => {}
                Ok(saga) => problems.push(format!(
                    "GetSaga read the ±2^53 input back as {:?}",
                    saga.input
                )),
                Err(error) => problems.push(format!("GetSaga of the ±2^53 saga: {error:#}")),
            }
            match list_newest(&mut env.client).await {
                Ok(sagas) => {
                    let listed = sagas.iter().find(|saga| saga.saga_id == id);
                    if !listed
                        .and_then(|saga| saga.input.as_ref())
                        .is_some_and(|back| wire::same_struct(back, &input))
                    {
                        problems.push(format!(
                            "ListSagas has the ±2^53 saga as {:?}",
                            listed.map(|saga| &saga.input)
                        ));
                    }
                }
                Err(error) => problems.push(format!(
                    "ListSagas of the ±2^53 saga and whatever else got recorded: {error:#}"
                )),
            }
            // The saga must also run to its end; waiting needs GetSaga to read it.
            if problems.len() == unread {
                let saga = wait_terminal(&mut env.client, &id, DEADLINE).await?;
                if saga.status != SagaStatus::Completed as i32 {
                    problems.push(format!(
                        "the ±2^53 saga ended {:?}, want COMPLETED",
                        SagaStatus::try_from(saga.status)
                    ));
                }
            }
        }
    }
    verdict(problems)?;
    env.finish().await
}

/// Postgres text and jsonb cannot hold a NUL character: a NUL in any string of a request is
/// refused up front, naming the field, and nothing is recorded. It used to reach the database
/// and fail the whole batch of writes it was committed with, other sagas' included.
#[tokio::test]
async fn nul_characters_are_refused_and_nothing_is_recorded() -> anyhow::Result<()> {
    let mut env = Env::start("bad_nul").await?;
    let mut problems = Vec::new();
    let base = order("nul");

    let mut request = start_request(wire::fields(&base));
    request.saga_type = "order_fulfillment\0".to_owned();
    let result = env.start_saga(request).await;
    problems.extend(not_refused("NUL in saga_type", result, &["saga_type"]));

    let mut request = start_request(wire::fields(&base));
    request.idempotency_key = "key\0one".to_owned();
    let result = env.start_saga(request).await;
    problems.extend(not_refused(
        "NUL in idempotency_key",
        result,
        &["idempotency_key"],
    ));

    let mut request = start_request(wire::fields(&base));
    request.correlation_id = "corr\0one".to_owned();
    let result = env.start_saga(request).await;
    problems.extend(not_refused(
        "NUL in correlation_id",
        result,
        &["correlation_id"],
    ));

    let mut input = base.clone();
    input["customer_id"] = json!("cust\0omer");
    let result = env.start_saga(start_request(wire::fields(&input))).await;
    problems.extend(not_refused(
        "NUL in input.customer_id",
        result,
        &["customer_id"],
    ));

    let mut input = base.clone();
    input["items"] = json!([{"sku": "sku\0", "quantity": 1}]);
    let result = env.start_saga(start_request(wire::fields(&input))).await;
    problems.extend(not_refused("NUL in input.items[0].sku", result, &["sku"]));

    let mut input = wire::fields(&base);
    input.fields.insert("no\0te".to_owned(), string("x"));
    let result = env.start_saga(start_request(input)).await;
    problems.extend(not_refused("NUL in a key of input", result, &["input"]));

    let recorded = env.recorded().await?;
    if recorded != 0 {
        problems.push(format!("the refused starts recorded {recorded} sagas"));
    }
    let calls = env.participant_calls();
    if calls != 0 {
        problems.push(format!("the refused starts made {calls} participant calls"));
    }

    let result = env
        .client
        .list_sagas(ListSagasRequest {
            saga_type: "order\0".to_owned(),
            ..Default::default()
        })
        .await;
    problems.extend(not_refused(
        "NUL in ListSagas.saga_type",
        result,
        &["saga_type"],
    ));

    let saga_id = env.hanging_saga().await?;
    let before = get_saga(&mut env.client, &saga_id).await?;
    let result = env.cancel(&saga_id, "stop\0now").await;
    problems.extend(not_refused("NUL in CancelSaga.reason", result, &["reason"]));
    let after = get_saga(&mut env.client, &saga_id).await?;
    if after.version != before.version || after.status != SagaStatus::Running as i32 {
        problems.push(format!(
            "the refused cancel changed the saga: version {} -> {}, status {:?}",
            before.version,
            after.version,
            SagaStatus::try_from(after.status)
        ));
    }
    env.end_hanging(&saga_id).await?;
    verdict(problems)?;
    env.finish().await
}

/// The demo type's JSON Schema: a refusal names the field and the rule it breaks.
#[tokio::test]
async fn the_demo_schema_is_enforced() -> anyhow::Result<()> {
    let mut env = Env::start("bad_schema").await?;
    let mut problems = Vec::new();
    let cases: [(&str, Value, &[&str]); 3] = [
        ("amount_cents", json!(0), &["amount_cents", "minimum"]),
        ("customer_id", json!(""), &["customer_id", "minLength"]),
        ("country", json!("se"), &["country", "pattern"]),
    ];
    for (field, value, names) in cases {
        let mut input = order("schema");
        input[field] = value.clone();
        let result = env.start_saga(start_request(wire::fields(&input))).await;
        problems.extend(not_refused(
            &format!("input.{field} = {value}"),
            result,
            names,
        ));
    }
    let recorded = env.recorded().await?;
    if recorded != 0 {
        problems.push(format!("the refused starts recorded {recorded} sagas"));
    }
    verdict(problems)?;
    env.finish().await
}

/// A body that does not decode as the method's request message is the client's fault:
/// INVALID_ARGUMENT, where tonic answers INTERNAL by itself.
#[tokio::test]
async fn bodies_that_are_not_protobuf_are_invalid_argument() -> anyhow::Result<()> {
    let env = Env::start("bad_bodies").await?;
    let mut problems = Vec::new();
    let bodies: [(&str, &[u8]); 4] = [
        ("field 1 not UTF-8", &[0x0a, 2, 0xff, 0xfe]),
        ("field 1 cut short", &[0x0a, 10, b'a', b'b']),
        ("field 1 as a varint", &[0x08, 0x01]),
        ("field number 0", &[0x00]),
    ];
    for method in ["StartSaga", "GetSaga", "ListSagas", "CancelSaga"] {
        for (what, body) in bodies {
            let result = wire::call_raw(env.channel.clone(), method, body.to_vec(), None).await?;
            problems.extend(not_refused(&format!("{method}: {what}"), result, &[]));
        }
    }
    verdict(problems)?;
    env.finish().await
}

/// A refusal of a huge field must not carry the field back: a reply whose headers (the
/// status message is one) are over the client's limit never reaches it, and its connection
/// is torn down with every other request on it.
#[tokio::test]
async fn refusing_a_huge_field_gives_an_answer_the_client_can_read() -> anyhow::Result<()> {
    let mut env = Env::start("bad_huge").await?;
    let mut problems = Vec::new();
    let huge = "x".repeat(100_000);

    let mut request = start_request(wire::fields(&order("huge")));
    request.saga_type = huge.clone();
    let result = env.start_saga(request).await;
    problems.extend(not_refused("saga_type of 100 kB", result, &["saga_type"]));

    let result = env
        .client
        .get_saga(GetSagaRequest {
            saga_id: huge.clone(),
            ..Default::default()
        })
        .await;
    problems.extend(not_refused(
        "GetSaga saga_id of 100 kB",
        result,
        &["saga_id"],
    ));

    let result = env
        .client
        .list_sagas(ListSagasRequest {
            page_token: huge.clone(),
            ..Default::default()
        })
        .await;
    problems.extend(not_refused(
        "ListSagas page_token of 100 kB",
        result,
        &["page_token"],
    ));

    let result = env.cancel(&huge, "").await;
    problems.extend(not_refused(
        "CancelSaga saga_id of 100 kB",
        result,
        &["saga_id"],
    ));
    verdict(problems)?;
    env.finish().await
}

/// Sagas whose inputs are large fill a page of 1000 with far more than the 4 MiB a gRPC client
/// reads by default: the page ends early with a token instead, and paging reads every saga.
#[tokio::test]
async fn a_page_of_large_sagas_stays_readable() -> anyhow::Result<()> {
    let mut env = Env::start("bad_page").await?;
    const SAGAS: usize = 24;
    let mut started = std::collections::BTreeSet::new();
    for n in 0..SAGAS {
        let mut input = order(&format!("large-{n}"));
        input["note"] = json!("n".repeat(200 * 1024));
        started.insert(start_saga(&mut env.client, ORDER, input).await?);
    }
    let mut listed = std::collections::BTreeSet::new();
    let mut pages = 0;
    let mut token = String::new();
    loop {
        let page = env
            .client
            .list_sagas(ListSagasRequest {
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .context("a page of large sagas")?
            .into_inner();
        pages += 1;
        listed.extend(page.sagas.into_iter().map(|saga| saga.saga_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        ensure!(pages < SAGAS, "paging does not end");
    }
    println!("{SAGAS} sagas of 200 KiB inputs listed in {pages} pages");
    ensure!(pages > 1, "every saga came in one page of over 4 MiB");
    ensure!(listed == started, "listed {listed:?}, started {started:?}");
    env.finish().await
}

/// An input nested as deep as allowed (20 levels of objects, the deepest for the protobuf
/// message levels it costs) still travels everywhere: to the participants inside the saga
/// context, back in GetSaga and in ListSagas pages; one level deeper is refused at the start,
/// where otherwise a participant could not decode the calls and the saga would retry for ever.
#[tokio::test]
async fn the_deepest_input_allowed_travels_everywhere_and_a_deeper_one_is_refused()
-> anyhow::Result<()> {
    let mut env = Env::start("bad_deep").await?;
    // `objects` objects, each inside the one before.
    let nest = |objects: usize| {
        let mut value = json!("bottom");
        for _ in 0..objects {
            value = json!({ "deeper": value });
        }
        value
    };
    // The input object itself is the first level.
    let mut deepest = order("deep");
    deepest["meta"] = nest(19);
    let saga_id = start_saga(&mut env.client, ORDER, deepest).await?;
    let saga = wait_terminal(&mut env.client, &saga_id, DEADLINE).await?;
    ensure!(
        saga.status == SagaStatus::Completed as i32,
        "{:?}: {}",
        saga.status,
        saga.failure_reason
    );
    get_saga(&mut env.client, &saga_id).await?;
    let listed = list_newest(&mut env.client).await?;
    ensure!(listed.iter().any(|saga| saga.saga_id == saga_id));

    let mut deeper = order("deeper");
    deeper["meta"] = nest(20);
    let recorded = env.recorded().await?;
    let result = env.start_saga(start_request(wire::fields(&deeper))).await;
    let problems: Vec<String> = not_refused("an input 21 levels deep", result, &["input.meta"])
        .into_iter()
        .collect();
    ensure!(
        env.recorded().await? == recorded,
        "a refused start recorded a saga"
    );
    verdict(problems)?;
    env.finish().await
}
