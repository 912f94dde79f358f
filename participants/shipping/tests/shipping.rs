//! Scheduling, refusals, cancellation and the Shipping read service, on a fresh database.

use std::time::Duration;

use sagad_participant::testing::{TestDatabase, command, outcome};
use sagad_participant::{Faults, ParticipantService};
use sagad_proto::demo::v1::GetShipmentRequest;
use sagad_proto::demo::v1::shipping_server::Shipping;
use sagad_proto::participant::v1::participant_server::Participant;
use serde_json::{Value, json};
use shipping_service::{ShipmentReader, ShippingHandler};
use tonic::Request;

fn context(order_id: &str, country: &str) -> Value {
    json!({
        "input": { "customer_id": "c1", "amount_cents": 100.0, "country": country },
        "steps": { "create_order": { "order_id": order_id }, "charge_payment": { "payment_id": "p1" } },
    })
}

async fn shipment_status(reader: &ShipmentReader, order_id: &str) -> Result<String, tonic::Code> {
    reader
        .get_shipment(Request::new(GetShipmentRequest {
            order_id: order_id.to_owned(),
        }))
        .await
        .map(|response| response.into_inner().status)
        .map_err(|status| status.code())
}

#[tokio::test]
async fn schedule_refuse_and_cancel() {
    let db = TestDatabase::new("shipping");
    let pool = sagad_participant::connect(
        &db.url(),
        &shipping_service::migrator(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let handler = ShippingHandler::new(["aq".to_owned(), " XX ".to_owned()]);
    let service = ParticipantService::new(pool.clone(), handler, Faults::default());
    let reader = ShipmentReader::new(pool.clone());

    let scheduled = service
        .execute(Request::new(command(
            "s1",
            "schedule_shipment",
            "ScheduleShipment",
            false,
            &context("o1", "FR"),
        )))
        .await
        .unwrap()
        .into_inner();
    let shipment_id = outcome(&scheduled).unwrap()["shipment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let shipment = reader
        .get_shipment(Request::new(GetShipmentRequest {
            order_id: "o1".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (shipment.shipment_id.as_str(), shipment.status.as_str()),
        (shipment_id.as_str(), "SCHEDULED")
    );

    for (saga, country) in [("s2", "AQ"), ("s3", "xx")] {
        let refused = service
            .execute(Request::new(command(
                saga,
                "schedule_shipment",
                "ScheduleShipment",
                false,
                &context("o2", country),
            )))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(outcome(&refused), Err("UNSUPPORTED_DESTINATION".to_owned()));
    }
    assert_eq!(
        shipment_status(&reader, "o2").await,
        Err(tonic::Code::NotFound)
    );

    let cancelled = service
        .compensate(Request::new(command(
            "s1",
            "schedule_shipment",
            "CancelShipment",
            true,
            &context("o1", "FR"),
        )))
        .await
        .unwrap()
        .into_inner();
    assert!(outcome(&cancelled).is_ok());
    assert_eq!(
        shipment_status(&reader, "o1").await,
        Ok("CANCELLED".to_owned())
    );
    pool.close().await;
}
