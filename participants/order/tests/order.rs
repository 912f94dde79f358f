//! The order actions and the Orders read service, on a fresh database.

use std::time::Duration;

use order_service::{OrderHandler, OrderReader};
use sagad_participant::testing::{TestDatabase, command, outcome};
use sagad_participant::{Faults, ParticipantService};
use sagad_proto::demo::v1::GetOrderRequest;
use sagad_proto::demo::v1::orders_server::Orders;
use sagad_proto::participant::v1::participant_server::Participant;
use serde_json::json;
use tonic::Request;

async fn status(reader: &OrderReader, order_id: &str) -> String {
    reader
        .get_order(Request::new(GetOrderRequest {
            order_id: order_id.to_owned(),
        }))
        .await
        .unwrap()
        .into_inner()
        .status
}

#[tokio::test]
async fn create_approve_and_cancel() {
    let db = TestDatabase::new("order");
    let pool = sagad_participant::connect(
        &db.url(),
        &order_service::migrator(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let service = ParticipantService::new(pool.clone(), OrderHandler, Faults::default());
    let reader = OrderReader::new(pool.clone());
    let input = json!({ "customer_id": "c1", "amount_cents": 1500.0, "country": "FR" });

    let created = service
        .execute(Request::new(command(
            "s1",
            "create_order",
            "CreateOrder",
            false,
            &json!({ "input": input, "steps": {} }),
        )))
        .await
        .unwrap()
        .into_inner();
    let output = outcome(&created).unwrap();
    let order_id = output["order_id"].as_str().unwrap().to_owned();
    let order = reader
        .get_order(Request::new(GetOrderRequest {
            order_id: order_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            order.customer_id.as_str(),
            order.amount_cents,
            order.status.as_str()
        ),
        ("c1", 1500, "PENDING")
    );

    let context = json!({ "input": input, "steps": { "create_order": output } });
    let approved = service
        .execute(Request::new(command(
            "s1",
            "approve_order",
            "ApproveOrder",
            false,
            &context,
        )))
        .await
        .unwrap()
        .into_inner();
    assert!(outcome(&approved).is_ok());
    assert_eq!(status(&reader, &order_id).await, "APPROVED");

    // Another saga's order, cancelled.
    let created = service
        .execute(Request::new(command(
            "s2",
            "create_order",
            "CreateOrder",
            false,
            &json!({ "input": input, "steps": {} }),
        )))
        .await
        .unwrap()
        .into_inner();
    let other = outcome(&created).unwrap()["order_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let cancelled = service
        .compensate(Request::new(command(
            "s2",
            "create_order",
            "CancelOrder",
            true,
            &json!({ "input": input, "steps": {} }),
        )))
        .await
        .unwrap()
        .into_inner();
    assert!(outcome(&cancelled).is_ok());
    assert_eq!(status(&reader, &other).await, "CANCELLED");

    let missing = reader
        .get_order(Request::new(GetOrderRequest {
            order_id: "nope".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    pool.close().await;
}
