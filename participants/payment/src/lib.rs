//! The payment participant: `ChargePayment` debits the customer's account (created at first
//! sight with the default balance) and answers `{payment_id}`, or refuses `INSUFFICIENT_FUNDS`;
//! its compensation `RefundPayment` credits it back, or refuses `ACCOUNT_FROZEN` while the
//! account is frozen (accounts of customers whose id begins with `frozen-` are opened frozen;
//! `update accounts set frozen = false` unfreezes one). And the `sagad.demo.v1.Payments` read
//! service. Money is integer cents (`i64`).
//!
//! Queries are runtime-checked (`sqlx::query`), on purpose: the checked macros would need this
//! service's database in `.sqlx/`, and the SQL here is small and covered by the tests.

use sagad_participant::{StepCommandView, StepError, StepHandler};
use sagad_proto::demo::v1::payments_server::Payments;
use sagad_proto::demo::v1::{Account, GetAccountRequest};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool, Row};
use tonic::{Request, Response, Status};

/// The service's migrations (`migrations/payment/`).
pub fn migrator() -> sqlx::migrate::Migrator {
    sqlx::migrate!("../../migrations/payment")
}

/// Customers whose id begins so have their account opened frozen: it takes no refund.
pub const FROZEN_PREFIX: &str = "frozen-";

/// Applies the payment actions.
#[derive(Debug, Clone, Copy)]
pub struct PaymentHandler {
    default_balance_cents: i64,
}

impl PaymentHandler {
    pub fn new(default_balance_cents: i64) -> Self {
        Self {
            default_balance_cents,
        }
    }

    async fn charge(
        &self,
        command: &StepCommandView,
        conn: &mut PgConnection,
    ) -> Result<Value, StepError> {
        let customer_id = command.input_str("customer_id")?;
        let amount_cents = command.input_i64("amount_cents")?;
        if amount_cents < 0 {
            return Err(StepError::bad_input("input.amount_cents is negative"));
        }
        let payment_id = uuid::Uuid::now_v7().to_string();
        // One statement for the common case: the account opened already debited, or an open
        // one debited, and the payment inserted. It does nothing when the balance (or a new
        // account's default balance) is short; the statements below then decide.
        let charged = sqlx::query(
            "with debited as (
                 insert into accounts as account (customer_id, balance_cents, frozen)
                 select $1, $2 - $4, starts_with($1, $3) where $2 >= $4
                 on conflict (customer_id) do update
                     set balance_cents = account.balance_cents - $4, updated_at = now()
                     where account.balance_cents >= $4
                 returning account.customer_id
             )
             insert into payments (payment_id, saga_id, customer_id, amount_cents, status)
             select $5, $6, customer_id, $4, 'CHARGED' from debited",
        )
        .bind(customer_id)
        .bind(self.default_balance_cents)
        .bind(FROZEN_PREFIX)
        .bind(amount_cents)
        .bind(&payment_id)
        .bind(&command.saga_id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if charged == 1 {
            return Ok(json!({ "payment_id": payment_id }));
        }
        sqlx::query(
            "insert into accounts (customer_id, balance_cents, frozen)
             values ($1, $2, starts_with($1, $3))
             on conflict (customer_id) do nothing",
        )
        .bind(customer_id)
        .bind(self.default_balance_cents)
        .bind(FROZEN_PREFIX)
        .execute(&mut *conn)
        .await?;
        let balance: i64 =
            sqlx::query("select balance_cents from accounts where customer_id = $1 for update")
                .bind(customer_id)
                .fetch_one(&mut *conn)
                .await?
                .try_get("balance_cents")?;
        if balance < amount_cents {
            return Err(StepError::refused(
                "INSUFFICIENT_FUNDS",
                format!("customer {customer_id} has {balance} cents, the charge is {amount_cents}"),
            ));
        }
        sqlx::query(
            "update accounts set balance_cents = balance_cents - $2, updated_at = now()
             where customer_id = $1",
        )
        .bind(customer_id)
        .bind(amount_cents)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "insert into payments (payment_id, saga_id, customer_id, amount_cents, status)
             values ($1, $2, $3, $4, 'CHARGED')",
        )
        .bind(&payment_id)
        .bind(&command.saga_id)
        .bind(customer_id)
        .bind(amount_cents)
        .execute(&mut *conn)
        .await?;
        Ok(json!({ "payment_id": payment_id }))
    }
}

#[tonic::async_trait]
impl StepHandler for PaymentHandler {
    async fn execute(
        &self,
        command: &StepCommandView,
        conn: &mut PgConnection,
    ) -> Result<Value, StepError> {
        match command.action.as_str() {
            "ChargePayment" => self.charge(command, conn).await,
            other => Err(unknown_action(other)),
        }
    }

    async fn compensate(
        &self,
        command: &StepCommandView,
        conn: &mut PgConnection,
    ) -> Result<Value, StepError> {
        match command.action.as_str() {
            "RefundPayment" => refund(command, conn).await,
            other => Err(unknown_action(other)),
        }
    }
}

fn unknown_action(action: &str) -> StepError {
    StepError::refused(
        "UNKNOWN_ACTION",
        format!("payment-service has no action {action:?}"),
    )
}

/// Credits back the payment the execute made; a payment already refunded changes nothing.
async fn refund(command: &StepCommandView, conn: &mut PgConnection) -> Result<Value, StepError> {
    let payment_id = command
        .executed_output
        .as_ref()
        .and_then(|output| output.get("payment_id"))
        .and_then(Value::as_str)
        .ok_or_else(|| StepError::internal("the ChargePayment output has no payment_id"))?;
    // One statement: the payment marked refunded and its account credited unless frozen.
    let refunded = sqlx::query(
        "with refunded as (
             update payments set status = 'REFUNDED', updated_at = now()
             where payment_id = $1 and status = 'CHARGED'
             returning customer_id, amount_cents
         ), credited as (
             update accounts as account
             set balance_cents = account.balance_cents + refunded.amount_cents,
                 updated_at = now()
             from refunded
             where account.customer_id = refunded.customer_id and not account.frozen
             returning account.customer_id
         )
         select refunded.customer_id, exists (select from credited) as credited
         from refunded",
    )
    .bind(payment_id)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(row) = refunded
        && !row.try_get::<bool, _>("credited")?
    {
        let customer_id: String = row.try_get("customer_id")?;
        // Refused: the SDK rolls this command's writes back, so the payment stays CHARGED and
        // the same key runs again once the account is unfrozen and the saga retried.
        return Err(StepError::refused(
            "ACCOUNT_FROZEN",
            format!("the account of {customer_id} is frozen: no refund can be made"),
        ));
    }
    Ok(Value::Null)
}

/// `sagad.demo.v1.Payments`.
#[derive(Debug, Clone)]
pub struct PaymentReader {
    pool: PgPool,
    default_balance_cents: i64,
}

impl PaymentReader {
    pub fn new(pool: PgPool, default_balance_cents: i64) -> Self {
        Self {
            pool,
            default_balance_cents,
        }
    }
}

#[tonic::async_trait]
impl Payments for PaymentReader {
    /// An unseen customer reads the default balance.
    async fn get_account(
        &self,
        request: Request<GetAccountRequest>,
    ) -> Result<Response<Account>, Status> {
        let customer_id = request.into_inner().customer_id;
        let row = sqlx::query("select balance_cents from accounts where customer_id = $1")
            .bind(&customer_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(database_status)?;
        let balance_cents = match row {
            Some(row) => row.try_get("balance_cents").map_err(database_status)?,
            None => self.default_balance_cents,
        };
        Ok(Response::new(Account {
            customer_id,
            balance_cents,
        }))
    }
}

fn database_status(error: sqlx::Error) -> Status {
    Status::unavailable(format!("database: {error}"))
}
