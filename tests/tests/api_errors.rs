//! Every error code the contract gives for the client API, against an in-process sagad on a
//! database of its own per test; and that a refused request changes nothing.

use std::time::Duration;

use sagad_e2e::participant::default_answer;
use sagad_e2e::*;
use sagad_proto::v1::{
    CancelSagaRequest, GetSagaRequest, ListSagasRequest, ListSagasResponse, Saga, SagaStatus,
    StartSagaRequest, StartSagaResponse,
};
use serde_json::{Value, json};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const DEADLINE: Duration = Duration::from_secs(30);

fn order_input(customer: &str) -> Value {
    json!({
        "customer_id": customer,
        "amount_cents": 1250,
        "currency": "EUR",
        "country": "FR",
        "items": [{"sku": "sku-1", "quantity": 2}],
    })
}

/// sagad on the demo definitions; the payment participant refuses customer "poor".
struct Env {
    participants: Vec<FakeParticipant>,
    daemon: Option<TestDaemon>,
    addr: std::net::SocketAddr,
    client: Client,
    /// Last, so that on a panic sagad is told to stop before its database goes.
    db: DatabaseGuard,
}

impl Env {
    async fn start(label: &str) -> anyhow::Result<Env> {
        let db = DatabaseGuard::new(label);
        let script: participant::Script = std::sync::Arc::new(|call, _| {
            if call.kind == CallKind::Execute
                && call.step == "charge_payment"
                && call.input["input"]["customer_id"] == json!("poor")
            {
                Answer::refuse("INSUFFICIENT_FUNDS")
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
            repo_root().join("saga-defs").display().to_string(),
        ];
        for participant in &participants {
            args.extend(["--participant".to_owned(), participant.flag()]);
        }
        let daemon = TestDaemon::start(&args).await?;
        let client = daemon.client().await?;
        Ok(Env {
            participants,
            addr: daemon.addr,
            daemon: Some(daemon),
            client,
            db,
        })
    }

    async fn start_saga(
        &mut self,
        saga_type: &str,
        key: &str,
        input: Option<Value>,
    ) -> Result<StartSagaResponse, tonic::Status> {
        self.client
            .start_saga(StartSagaRequest {
                saga_type: saga_type.to_owned(),
                idempotency_key: key.to_owned(),
                input: input.map(to_struct),
                correlation_id: String::new(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    async fn get(
        &mut self,
        saga_id: &str,
        min_version: u64,
        wait_ms: u32,
    ) -> Result<Saga, tonic::Status> {
        self.client
            .get_saga(GetSagaRequest {
                saga_id: saga_id.to_owned(),
                min_version,
                wait_ms,
                ..Default::default()
            })
            .await
            .map(tonic::Response::into_inner)
    }

    async fn list(
        &mut self,
        statuses: Vec<i32>,
        page_size: u32,
        page_token: &str,
    ) -> Result<ListSagasResponse, tonic::Status> {
        self.client
            .list_sagas(ListSagasRequest {
                saga_type: String::new(),
                statuses,
                page_size,
                page_token: page_token.to_owned(),
                ..Default::default()
            })
            .await
            .map(tonic::Response::into_inner)
    }

    async fn cancel(&mut self, saga_id: &str) -> Result<Saga, tonic::Status> {
        self.client
            .cancel_saga(CancelSagaRequest {
                saga_id: saga_id.to_owned(),
                reason: "test cancels".to_owned(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Every saga recorded, newest first.
    async fn recorded(&mut self) -> anyhow::Result<Vec<String>> {
        let page = self.list(Vec::new(), 1000, "").await?;
        Ok(page.sagas.into_iter().map(|saga| saga.saga_id).collect())
    }

    fn participant_calls(&self) -> usize {
        self.participants
            .iter()
            .map(|participant| participant.calls().len())
            .sum()
    }

    async fn finish(mut self) -> anyhow::Result<()> {
        if let Some(daemon) = self.daemon.take() {
            daemon.stop().await?;
        }
        self.db.drop_now().await
    }
}

/// The request failed with `code`; returns the message.
fn expect_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
    what: &str,
) -> String {
    match result {
        Ok(value) => panic!("{what}: expected {code:?}, got success {value:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{what}: {status:?}");
            status.message().to_owned()
        }
    }
}

#[tokio::test]
async fn start_saga_refusals_record_nothing() -> anyhow::Result<()> {
    let mut env = Env::start("api_start").await?;

    let result = env
        .start_saga("no_such_saga", "", Some(order_input("c")))
        .await;
    expect_code(result, Code::InvalidArgument, "unknown saga_type");
    assert!(env.recorded().await?.is_empty());

    let result = env.start_saga("", "", Some(order_input("c"))).await;
    expect_code(result, Code::InvalidArgument, "empty saga_type");
    assert!(env.recorded().await?.is_empty());

    let result = env.start_saga("order_fulfillment", "", None).await;
    expect_code(result, Code::InvalidArgument, "no input at all");
    assert!(env.recorded().await?.is_empty());

    for field in ["customer_id", "amount_cents", "country"] {
        let mut missing = order_input("c");
        missing.as_object_mut().map(|fields| fields.remove(field));
        let message = expect_code(
            env.start_saga("order_fulfillment", "", Some(missing)).await,
            Code::InvalidArgument,
            &format!("without {field}"),
        );
        assert!(message.contains(field), "{field} not named in {message:?}");

        let mut null = order_input("c");
        null[field] = Value::Null;
        let message = expect_code(
            // With a key: a refused start must not take the key.
            env.start_saga("order_fulfillment", &format!("key-{field}"), Some(null))
                .await,
            Code::InvalidArgument,
            &format!("{field} null"),
        );
        assert!(message.contains(field), "{field} not named in {message:?}");
        assert!(env.recorded().await?.is_empty(), "after {field}");
    }

    let mut big = order_input("c");
    big["notes"] = json!("x".repeat(300 * 1024));
    let result = env
        .start_saga("order_fulfillment", "key-big", Some(big))
        .await;
    expect_code(result, Code::InvalidArgument, "300 KiB input");
    assert!(env.recorded().await?.is_empty());
    assert_eq!(env.participant_calls(), 0);

    // The keys of refused starts are free: they start a saga now.
    let first = env
        .start_saga("order_fulfillment", "key-country", Some(order_input("c")))
        .await?;
    assert!(first.created);
    let big_key = env
        .start_saga("order_fulfillment", "key-big", Some(order_input("c")))
        .await?;
    assert!(big_key.created);
    assert_ne!(big_key.saga_id, first.saga_id);

    // A used key with another input.
    let result = env
        .start_saga(
            "order_fulfillment",
            "key-country",
            Some(order_input("someone-else")),
        )
        .await;
    expect_code(result, Code::AlreadyExists, "key reused with another input");
    assert_eq!(
        env.recorded().await?,
        [big_key.saga_id.clone(), first.saga_id.clone()]
    );
    for id in [&first.saga_id, &big_key.saga_id] {
        let saga = wait_terminal(&mut env.client, id, DEADLINE).await?;
        assert_eq!(saga.status, SagaStatus::Completed as i32);
    }
    env.finish().await
}

#[tokio::test]
async fn get_saga_errors() -> anyhow::Result<()> {
    let mut env = Env::start("api_get").await?;
    for id in ["not-a-uuid", "", "01234567-89ab-cdef-0123-456789abcdeg"] {
        expect_code(
            env.get(id, 0, 0).await,
            Code::InvalidArgument,
            &format!("id {id:?}"),
        );
    }
    let unknown = uuid::Uuid::new_v4().to_string();
    expect_code(env.get(&unknown, 0, 0).await, Code::NotFound, "unknown id");
    expect_code(
        env.get(&unknown, 5, 300).await,
        Code::NotFound,
        "unknown id with min_version",
    );

    let id = start_saga(&mut env.client, "order_fulfillment", order_input("c")).await?;
    let done = wait_terminal(&mut env.client, &id, DEADLINE).await?;
    assert_eq!(done.status, SagaStatus::Completed as i32);
    let reached = env.get(&id, done.version, 300).await?;
    assert_eq!(reached.version, done.version);
    expect_code(
        env.get(&id, done.version + 1, 300).await,
        Code::DeadlineExceeded,
        "min_version never reached",
    );
    env.finish().await
}

#[tokio::test]
async fn list_sagas_errors() -> anyhow::Result<()> {
    let mut env = Env::start("api_list").await?;
    let id = start_saga(&mut env.client, "order_fulfillment", order_input("c")).await?;
    wait_terminal(&mut env.client, &id, DEADLINE).await?;

    expect_code(
        env.list(Vec::new(), 1001, "").await,
        Code::InvalidArgument,
        "page_size 1001",
    );
    let largest = env.list(Vec::new(), 1000, "").await?;
    assert_eq!(largest.sagas.len(), 1);

    for token in ["garbage", "123.not-a-uuid", "abc.def", "."] {
        expect_code(
            env.list(Vec::new(), 10, token).await,
            Code::InvalidArgument,
            &format!("page_token {token:?}"),
        );
    }
    // Well-formed tokens at times no saga has: before Postgres' first day (4713 BC), at the
    // ends of the range. Refused or answered, never a server error.
    let saga_id = uuid::Uuid::new_v4().simple();
    for micros in [
        i64::MIN,
        -250_000_000_000_000_000,
        8_000_000_000_000_000_000,
        i64::MAX,
    ] {
        let token = format!("{micros}.{saga_id}");
        if let Err(status) = env.list(Vec::new(), 10, &token).await {
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "page_token {token:?}: {status:?}"
            );
        }
    }
    for statuses in [
        vec![0],
        vec![99],
        vec![SagaStatus::Completed as i32, 99],
        vec![-1],
    ] {
        expect_code(
            env.list(statuses.clone(), 10, "").await,
            Code::InvalidArgument,
            &format!("statuses {statuses:?}"),
        );
    }
    let completed = env.list(vec![SagaStatus::Completed as i32], 10, "").await?;
    assert_eq!(completed.sagas.len(), 1);
    env.finish().await
}

#[tokio::test]
async fn cancel_saga_errors_leave_the_saga_as_it_was() -> anyhow::Result<()> {
    let mut env = Env::start("api_cancel").await?;
    for id in ["not-a-uuid", ""] {
        expect_code(
            env.cancel(id).await,
            Code::InvalidArgument,
            &format!("id {id:?}"),
        );
    }
    let unknown = uuid::Uuid::new_v4().to_string();
    expect_code(env.cancel(&unknown).await, Code::NotFound, "unknown id");
    assert!(env.recorded().await?.is_empty());

    let completed = start_saga(&mut env.client, "order_fulfillment", order_input("c")).await?;
    let compensated = start_saga(&mut env.client, "order_fulfillment", order_input("poor")).await?;
    for (id, expected) in [
        (&completed, SagaStatus::Completed),
        (&compensated, SagaStatus::Compensated),
    ] {
        let before = wait_terminal(&mut env.client, id, DEADLINE).await?;
        assert_eq!(before.status, expected as i32, "{id}");
        let before = env.get(id, 0, 0).await?;
        let calls = env.participant_calls();

        expect_code(
            env.cancel(id).await,
            Code::FailedPrecondition,
            &format!("cancel a {expected:?} saga"),
        );

        let after = env.get(id, 0, 0).await?;
        assert_eq!(after.version, before.version, "{expected:?}");
        assert_eq!(after.status, before.status);
        assert_eq!(after.steps, before.steps);
        assert_eq!(after.history.len(), before.history.len());
        assert_eq!(
            env.participant_calls(),
            calls,
            "a refused cancel made calls"
        );
    }
    env.finish().await
}

/// `grpc.health.v1.Health/Check` for `service`.
async fn health_check(env: &Env, service: &str) -> Result<ServingStatus, tonic::Status> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", env.addr))
        .map_err(|error| tonic::Status::internal(error.to_string()))?
        .connect()
        .await
        .map_err(|error| tonic::Status::unavailable(error.to_string()))?;
    let mut client = HealthClient::new(channel);
    let reply = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?
        .into_inner();
    Ok(reply.status())
}

#[tokio::test]
async fn health_reports_the_orchestrator_serving() -> anyhow::Result<()> {
    let env = Env::start("api_health").await?;
    assert_eq!(
        health_check(&env, "sagad.v1.SagaOrchestrator").await?,
        ServingStatus::Serving
    );
    // The health service itself answers (not some other service on the path): it knows no
    // such service.
    expect_code(
        health_check(&env, "no.such.Service").await,
        Code::NotFound,
        "health of an unknown service",
    );
    env.finish().await
}
