//! The shipping participant: `ScheduleShipment` (a `SCHEDULED` shipment for the saga's order,
//! output `{shipment_id}`; refuses `UNSUPPORTED_DESTINATION` for a listed country) and its
//! compensation `CancelShipment` (`CANCELLED`); and the `sagad.demo.v1.Shipping` read service.
//!
//! Queries are runtime-checked (`sqlx::query`), on purpose: the checked macros would need this
//! service's database in `.sqlx/`, and the SQL here is small and covered by the tests.

use std::collections::BTreeSet;

use sagad_participant::{StepCommandView, StepError, StepHandler};
use sagad_proto::demo::v1::shipping_server::Shipping;
use sagad_proto::demo::v1::{GetShipmentRequest, Shipment};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool, Row};
use tonic::{Request, Response, Status};

/// The service's migrations (`migrations/shipping/`).
pub fn migrator() -> sqlx::migrate::Migrator {
    sqlx::migrate!("../../migrations/shipping")
}

/// Applies the shipping actions.
#[derive(Debug, Clone)]
pub struct ShippingHandler {
    /// Upper-case country codes.
    unsupported: BTreeSet<String>,
}

impl ShippingHandler {
    /// `unsupported_countries`: codes it refuses, in any case; blanks are ignored.
    pub fn new(unsupported_countries: impl IntoIterator<Item = String>) -> Self {
        Self {
            unsupported: unsupported_countries
                .into_iter()
                .map(|country| country.trim().to_uppercase())
                .filter(|country| !country.is_empty())
                .collect(),
        }
    }

    async fn schedule(
        &self,
        command: &StepCommandView,
        conn: &mut PgConnection,
    ) -> Result<Value, StepError> {
        let country = command.input_str("country")?;
        let order_id = command
            .step_output("create_order")
            .and_then(|output| output.get("order_id"))
            .and_then(Value::as_str)
            .ok_or_else(|| StepError::bad_input("steps.create_order.order_id is missing"))?;
        if self.unsupported.contains(&country.trim().to_uppercase()) {
            return Err(StepError::refused(
                "UNSUPPORTED_DESTINATION",
                format!("no shipping to {country}"),
            ));
        }
        let shipment_id = uuid::Uuid::now_v7().to_string();
        sqlx::query(
            "insert into shipments (shipment_id, saga_id, order_id, country, status)
             values ($1, $2, $3, $4, 'SCHEDULED')",
        )
        .bind(&shipment_id)
        .bind(&command.saga_id)
        .bind(order_id)
        .bind(country)
        .execute(&mut *conn)
        .await?;
        Ok(json!({ "shipment_id": shipment_id }))
    }
}

#[tonic::async_trait]
impl StepHandler for ShippingHandler {
    async fn execute(
        &self,
        command: &StepCommandView,
        conn: &mut PgConnection,
    ) -> Result<Value, StepError> {
        match command.action.as_str() {
            "ScheduleShipment" => self.schedule(command, conn).await,
            other => Err(unknown_action(other)),
        }
    }

    async fn compensate(
        &self,
        command: &StepCommandView,
        conn: &mut PgConnection,
    ) -> Result<Value, StepError> {
        match command.action.as_str() {
            "CancelShipment" => cancel(command, conn).await,
            other => Err(unknown_action(other)),
        }
    }
}

fn unknown_action(action: &str) -> StepError {
    StepError::refused(
        "UNKNOWN_ACTION",
        format!("shipping-service has no action {action:?}"),
    )
}

/// Cancels the shipment the execute scheduled.
async fn cancel(command: &StepCommandView, conn: &mut PgConnection) -> Result<Value, StepError> {
    let shipment_id = command
        .executed_output
        .as_ref()
        .and_then(|output| output.get("shipment_id"))
        .and_then(Value::as_str)
        .ok_or_else(|| StepError::internal("the ScheduleShipment output has no shipment_id"))?;
    sqlx::query(
        "update shipments set status = 'CANCELLED', updated_at = now() where shipment_id = $1",
    )
    .bind(shipment_id)
    .execute(&mut *conn)
    .await?;
    Ok(Value::Null)
}

/// `sagad.demo.v1.Shipping`.
#[derive(Debug, Clone)]
pub struct ShipmentReader {
    pool: PgPool,
}

impl ShipmentReader {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

#[tonic::async_trait]
impl Shipping for ShipmentReader {
    /// The order's newest shipment.
    async fn get_shipment(
        &self,
        request: Request<GetShipmentRequest>,
    ) -> Result<Response<Shipment>, Status> {
        let order_id = request.into_inner().order_id;
        let row = sqlx::query(
            "select shipment_id, order_id, status from shipments where order_id = $1
             order by created_at desc, shipment_id desc limit 1",
        )
        .bind(&order_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(database_status)?;
        let Some(row) = row else {
            return Err(Status::not_found(format!(
                "no shipment for order {order_id}"
            )));
        };
        Ok(Response::new(Shipment {
            shipment_id: row.try_get("shipment_id").map_err(database_status)?,
            order_id: row.try_get("order_id").map_err(database_status)?,
            status: row.try_get("status").map_err(database_status)?,
        }))
    }
}

fn database_status(error: sqlx::Error) -> Status {
    Status::unavailable(format!("database: {error}"))
}
