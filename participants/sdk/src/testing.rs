//! For participants' tests: a fresh database on the local Postgres, dropped at the end.

use sqlx::{Connection, PgConnection};

/// The server tests use; `SAGAD_TEST_DATABASE_URL` overrides it (without a database name).
pub fn server_url() -> String {
    std::env::var("SAGAD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432".to_owned())
}

/// A database name of a test's own (created by [`crate::connect`]), dropped when this guard
/// goes, even when the test panics.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
}

impl TestDatabase {
    pub fn new(label: &str) -> Self {
        let name = format!("sagad_test_{label}_{:016x}", fastrand::u64(..));
        Self { name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn url(&self) -> String {
        format!("{}/{}", server_url(), self.name)
    }

    async fn drop_database(name: &str) -> Result<(), sqlx::Error> {
        let mut admin = PgConnection::connect(&format!("{}/postgres", server_url())).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "drop database if exists \"{name}\" with (force)"
        )))
        .execute(&mut admin)
        .await?;
        Ok(())
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // The test's runtime may be gone or unwinding: use a runtime of our own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|error| error.to_string())?;
            runtime
                .block_on(Self::drop_database(&name))
                .map_err(|error| error.to_string())
        })
        .join();
    }
}

/// A command as the orchestrator would send it, for `step` of `saga_id`, with the saga context
/// `context` (`{"input": …, "steps": {…}}`).
pub fn command(
    saga_id: &str,
    step: &str,
    action: &str,
    compensate: bool,
    context: &serde_json::Value,
) -> sagad_proto::participant::v1::StepCommand {
    let suffix = if compensate { "compensate" } else { "execute" };
    sagad_proto::participant::v1::StepCommand {
        saga_id: saga_id.to_owned(),
        saga_type: "order_fulfillment".to_owned(),
        step: step.to_owned(),
        action: action.to_owned(),
        idempotency_key: format!("{saga_id}/{step}/{suffix}"),
        attempt: 1,
        input: serde_json::from_value(context.clone()).ok(),
        correlation_id: format!("test-{saga_id}"),
    }
}

/// The output of a success, or the code of a failure.
pub fn outcome(
    reply: &sagad_proto::participant::v1::StepReply,
) -> Result<serde_json::Value, String> {
    use sagad_proto::participant::v1::step_reply::Result as R;
    match &reply.result {
        Some(R::Success(success)) => Ok(success
            .output
            .as_ref()
            .and_then(|output| serde_json::to_value(output).ok())
            .unwrap_or(serde_json::Value::Null)),
        Some(R::Failure(failure)) => Err(failure.code.clone()),
        None => Err(String::new()),
    }
}
