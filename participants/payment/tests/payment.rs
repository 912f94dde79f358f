//! Charges, refusals, refunds and the Payments read service, on a fresh database.

use std::time::Duration;

use payment_service::{PaymentHandler, PaymentReader};
use sagad_participant::testing::{TestDatabase, command, outcome};
use sagad_participant::{Faults, ParticipantService};
use sagad_proto::demo::v1::GetAccountRequest;
use sagad_proto::demo::v1::payments_server::Payments;
use sagad_proto::participant::v1::participant_server::Participant;
use serde_json::{Value, json};
use tonic::Request;

async fn balance(reader: &PaymentReader, customer_id: &str) -> i64 {
    reader
        .get_account(Request::new(GetAccountRequest {
            customer_id: customer_id.to_owned(),
        }))
        .await
        .unwrap()
        .into_inner()
        .balance_cents
}

fn context(customer_id: &str, amount_cents: f64) -> Value {
    json!({
        "input": { "customer_id": customer_id, "amount_cents": amount_cents, "country": "FR" },
        "steps": { "create_order": { "order_id": "o1" } },
    })
}

#[tokio::test]
async fn charge_refuse_and_refund() {
    let db = TestDatabase::new("payment");
    let pool = sagad_participant::connect(
        &db.url(),
        &payment_service::migrator(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let service =
        ParticipantService::new(pool.clone(), PaymentHandler::new(10_000), Faults::default());
    let reader = PaymentReader::new(pool.clone(), 10_000);
    assert_eq!(balance(&reader, "c1").await, 10_000);

    let charge = |saga: &str, amount: f64| {
        command(
            saga,
            "charge_payment",
            "ChargePayment",
            false,
            &context("c1", amount),
        )
    };
    let charged = service
        .execute(Request::new(charge("s1", 7_500.0)))
        .await
        .unwrap()
        .into_inner();
    assert!(outcome(&charged).unwrap()["payment_id"].is_string());
    assert_eq!(balance(&reader, "c1").await, 2_500);

    let refused = service
        .execute(Request::new(charge("s2", 2_501.0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&refused), Err("INSUFFICIENT_FUNDS".to_owned()));
    assert_eq!(balance(&reader, "c1").await, 2_500);

    let refund = command(
        "s1",
        "charge_payment",
        "RefundPayment",
        true,
        &context("c1", 7_500.0),
    );
    let refunded = service
        .compensate(Request::new(refund.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(outcome(&refunded).is_ok());
    assert_eq!(balance(&reader, "c1").await, 10_000);
    // A repeated refund changes nothing.
    service.compensate(Request::new(refund)).await.unwrap();
    assert_eq!(balance(&reader, "c1").await, 10_000);

    // The whole balance can be charged.
    let exact = service
        .execute(Request::new(charge("s3", 10_000.0)))
        .await
        .unwrap()
        .into_inner();
    assert!(outcome(&exact).is_ok());
    assert_eq!(balance(&reader, "c1").await, 0);
    pool.close().await;
}

/// A frozen account takes no refund (ACCOUNT_FROZEN, nothing changes); once unfrozen, the same
/// refund, under the same key, goes through.
#[tokio::test]
async fn a_frozen_account_refuses_its_refund_until_it_is_unfrozen() {
    let db = TestDatabase::new("payment_frozen");
    let pool = sagad_participant::connect(
        &db.url(),
        &payment_service::migrator(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let service =
        ParticipantService::new(pool.clone(), PaymentHandler::new(10_000), Faults::default());
    let reader = PaymentReader::new(pool.clone(), 10_000);
    let customer = "frozen-erin";
    let charge = command(
        "s1",
        "charge_payment",
        "ChargePayment",
        false,
        &context(customer, 2_000.0),
    );
    let charged = service
        .execute(Request::new(charge))
        .await
        .unwrap()
        .into_inner();
    assert!(outcome(&charged).is_ok(), "a frozen account is charged");
    assert_eq!(balance(&reader, customer).await, 8_000);

    let refund = command(
        "s1",
        "charge_payment",
        "RefundPayment",
        true,
        &context(customer, 2_000.0),
    );
    let refused = service
        .compensate(Request::new(refund.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&refused), Err("ACCOUNT_FROZEN".to_owned()));
    assert_eq!(balance(&reader, customer).await, 8_000, "nothing refunded");

    sqlx::query("update accounts set frozen = false where customer_id = $1")
        .bind(customer)
        .execute(&pool)
        .await
        .unwrap();
    let refunded = service
        .compensate(Request::new(refund))
        .await
        .unwrap()
        .into_inner();
    assert!(outcome(&refunded).is_ok(), "{refunded:?}");
    assert_eq!(balance(&reader, customer).await, 10_000);
    pool.close().await;
}

/// A customer id too long for the accounts' index: the database refuses the data, so the
/// charge is refused (a retry would send the same), not failed for a retry.
#[tokio::test]
async fn data_the_database_refuses_is_a_refusal_not_a_retry() {
    let db = TestDatabase::new("payment_long_id");
    let pool = sagad_participant::connect(
        &db.url(),
        &payment_service::migrator(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let service =
        ParticipantService::new(pool.clone(), PaymentHandler::new(10_000), Faults::default());
    // Random, so that compression cannot bring it under the index's limit.
    let long: String = (0..600)
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect();
    let charge = command(
        "s1",
        "charge_payment",
        "ChargePayment",
        false,
        &context(&long, 100.0),
    );
    let refused = service
        .execute(Request::new(charge))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&refused), Err("INVALID_INPUT".to_owned()));
    pool.close().await;
}
