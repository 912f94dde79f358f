//! `serve` over a real socket: health, a call through a gRPC client with the orchestrator's
//! metadata, an extra service beside the participant, and a graceful stop.

use std::time::Duration;

use sagad_participant::testing::{TestDatabase, command, outcome};
use sagad_participant::{Faults, Parts, StepCommandView, StepError, StepHandler};
use sagad_proto::demo::v1::orders_client::OrdersClient;
use sagad_proto::demo::v1::orders_server::{Orders, OrdersServer};
use sagad_proto::demo::v1::{GetOrderRequest, Order};
use sagad_proto::participant::v1::participant_client::ParticipantClient;
use serde_json::{Value, json};
use sqlx::PgConnection;
use tokio::net::TcpListener;
use tonic::Request;
use tonic::service::Routes;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

struct Echo;

#[tonic::async_trait]
impl StepHandler for Echo {
    async fn execute(
        &self,
        command: &StepCommandView,
        _conn: &mut PgConnection,
    ) -> Result<Value, StepError> {
        Ok(json!({ "echo": command.input().clone() }))
    }

    async fn compensate(
        &self,
        _command: &StepCommandView,
        _conn: &mut PgConnection,
    ) -> Result<Value, StepError> {
        Ok(Value::Null)
    }
}

/// An extra service, served beside the participant.
struct OneOrder;

#[tonic::async_trait]
impl Orders for OneOrder {
    async fn get_order(
        &self,
        request: Request<GetOrderRequest>,
    ) -> Result<tonic::Response<Order>, tonic::Status> {
        Ok(tonic::Response::new(Order {
            order_id: request.into_inner().order_id,
            customer_id: "c1".into(),
            amount_cents: 42,
            status: "PENDING".into(),
        }))
    }
}

#[tokio::test]
async fn serves_health_and_calls_and_stops_on_request() {
    let db = TestDatabase::new("sdk_serve");
    let pool = sagad_participant::connect(
        &db.url(),
        &sqlx::migrate::Migrator::DEFAULT,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let parts = Parts::new(Echo).with_routes(Routes::new(OrdersServer::new(OneOrder)));
    let server = tokio::spawn(sagad_participant::serve(
        pool,
        parts,
        Faults::default(),
        listener,
        None,
        async move {
            let _ = stopped.await;
        },
    ));

    let channel = tonic::transport::Channel::from_shared(address)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let status = health
        .check(HealthCheckRequest {
            service: "sagad.participant.v1.Participant".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);

    let order = OrdersClient::new(channel.clone())
        .get_order(GetOrderRequest {
            order_id: "o1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((order.order_id.as_str(), order.amount_cents), ("o1", 42));

    let mut client = ParticipantClient::new(channel);
    let mut request = Request::new(command(
        "s1",
        "echo",
        "Echo",
        false,
        &json!({ "input": { "n": 1.0 }, "steps": {} }),
    ));
    request
        .metadata_mut()
        .insert("x-saga-id", "s1".parse().unwrap());
    request
        .metadata_mut()
        .insert("x-correlation-id", "c1".parse().unwrap());
    let reply = client.execute(request).await.unwrap().into_inner();
    assert_eq!(outcome(&reply), Ok(json!({ "echo": { "n": 1.0 } })));

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
