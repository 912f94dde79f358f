//! The order participant: `CreateOrder` (a `PENDING` order, output `{order_id}`), its
//! compensation `CancelOrder` (`CANCELLED`), and `ApproveOrder` (`APPROVED`); and the
//! `sagad.demo.v1.Orders` read service.
//!
//! Queries are runtime-checked (`sqlx::query`), on purpose: the checked macros would need this
//! service's database in `.sqlx/`, and the SQL here is small and covered by the tests.

use sagad_participant::{StepCommandView, StepError, StepHandler};
use sagad_proto::demo::v1::orders_server::Orders;
use sagad_proto::demo::v1::{GetOrderRequest, Order};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool, Row};
use tonic::{Request, Response, Status};

/// The service's migrations (`migrations/order/`).
pub fn migrator() -> sqlx::migrate::Migrator {
    sqlx::migrate!("../../migrations/order")
}

/// Applies the order actions.
#[derive(Debug, Clone, Copy, Default)]
pub struct OrderHandler;

#[tonic::async_trait]
impl StepHandler for OrderHandler {
    async fn execute(
        &self,
        command: &StepCommandView,
        conn: &mut PgConnection,
    ) -> Result<Value, StepError> {
        match command.action.as_str() {
            "CreateOrder" => create_order(command, conn).await,
            "ApproveOrder" => approve_order(command, conn).await,
            other => Err(unknown_action(other)),
        }
    }

    async fn compensate(
        &self,
        command: &StepCommandView,
        conn: &mut PgConnection,
    ) -> Result<Value, StepError> {
        match command.action.as_str() {
            "CancelOrder" => cancel_order(command, conn).await,
            other => Err(unknown_action(other)),
        }
    }
}

fn unknown_action(action: &str) -> StepError {
    StepError::refused(
        "UNKNOWN_ACTION",
        format!("order-service has no action {action:?}"),
    )
}

async fn create_order(
    command: &StepCommandView,
    conn: &mut PgConnection,
) -> Result<Value, StepError> {
    let customer_id = command.input_str("customer_id")?;
    let amount_cents = command.input_i64("amount_cents")?;
    let order_id = uuid::Uuid::now_v7().to_string();
    sqlx::query(
        "insert into orders (order_id, saga_id, customer_id, amount_cents, status)
         values ($1, $2, $3, $4, 'PENDING')",
    )
    .bind(&order_id)
    .bind(&command.saga_id)
    .bind(customer_id)
    .bind(amount_cents)
    .execute(&mut *conn)
    .await?;
    Ok(json!({ "order_id": order_id }))
}

/// The order this compensation undoes: the id its execute returned here.
async fn cancel_order(
    command: &StepCommandView,
    conn: &mut PgConnection,
) -> Result<Value, StepError> {
    let order_id = command
        .executed_output
        .as_ref()
        .and_then(|output| output.get("order_id"))
        .and_then(Value::as_str)
        .ok_or_else(|| StepError::internal("the CreateOrder output has no order_id"))?;
    sqlx::query("update orders set status = 'CANCELLED', updated_at = now() where order_id = $1")
        .bind(order_id)
        .execute(&mut *conn)
        .await?;
    Ok(Value::Null)
}

async fn approve_order(
    command: &StepCommandView,
    conn: &mut PgConnection,
) -> Result<Value, StepError> {
    let order_id = command
        .step_output("create_order")
        .and_then(|output| output.get("order_id"))
        .and_then(Value::as_str)
        .ok_or_else(|| StepError::bad_input("steps.create_order.order_id is missing"))?;
    // One statement for the common case; a row it leaves alone is read below for the refusal.
    let approved = sqlx::query(
        "update orders set status = 'APPROVED', updated_at = now()
         where order_id = $1 and status in ('PENDING', 'APPROVED')",
    )
    .bind(order_id)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if approved == 1 {
        return Ok(json!({ "order_id": order_id, "status": "APPROVED" }));
    }
    let row = sqlx::query("select status from orders where order_id = $1 for update")
        .bind(order_id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else {
        return Err(StepError::refused(
            "ORDER_NOT_FOUND",
            format!("no order {order_id}"),
        ));
    };
    let status: String = row.try_get("status")?;
    match status.as_str() {
        "PENDING" | "APPROVED" => {}
        other => {
            return Err(StepError::refused(
                "ORDER_NOT_PENDING",
                format!("order {order_id} is {other}"),
            ));
        }
    }
    sqlx::query("update orders set status = 'APPROVED', updated_at = now() where order_id = $1")
        .bind(order_id)
        .execute(&mut *conn)
        .await?;
    Ok(json!({ "order_id": order_id, "status": "APPROVED" }))
}

/// `sagad.demo.v1.Orders`.
#[derive(Debug, Clone)]
pub struct OrderReader {
    pool: PgPool,
}

impl OrderReader {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

#[tonic::async_trait]
impl Orders for OrderReader {
    async fn get_order(
        &self,
        request: Request<GetOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let order_id = request.into_inner().order_id;
        let row = sqlx::query(
            "select order_id, customer_id, amount_cents, status from orders where order_id = $1",
        )
        .bind(&order_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(database_status)?;
        let Some(row) = row else {
            return Err(Status::not_found(format!("no order {order_id}")));
        };
        Ok(Response::new(Order {
            order_id: row.try_get("order_id").map_err(database_status)?,
            customer_id: row.try_get("customer_id").map_err(database_status)?,
            amount_cents: row.try_get("amount_cents").map_err(database_status)?,
            status: row.try_get("status").map_err(database_status)?,
        }))
    }
}

fn database_status(error: sqlx::Error) -> Status {
    Status::unavailable(format!("database: {error}"))
}
