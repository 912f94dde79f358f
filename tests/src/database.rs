//! A fresh database per test on the local Postgres, dropped at the end.

use sqlx::Connection;
use sqlx::postgres::PgConnection;

/// The server the tests use; `SAGAD_TEST_DATABASE_URL` overrides it (without a database name).
pub fn server_url() -> String {
    std::env::var("SAGAD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432".to_owned())
}

/// A database of one test's own. sagad creates it on first start.
#[derive(Debug, Clone)]
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    /// The server it is on, without a database name.
    server: String,
}

impl TestDatabase {
    /// A new, not yet created, database name on the tests' server.
    pub fn new(label: &str) -> Self {
        Self::on(&server_url(), label)
    }

    /// A new, not yet created, database name on `server` (a URL without a database name).
    pub fn on(server: &str, label: &str) -> Self {
        let name = format!(
            "sagad_test_{label}_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let url = format!("{server}/{name}");
        Self {
            name,
            url,
            server: server.to_owned(),
        }
    }

    /// Reads the orchestrator's tables directly, for checks the API does not show.
    pub async fn connect(&self) -> anyhow::Result<PgConnection> {
        Ok(PgConnection::connect(&self.url).await?)
    }

    /// Drops the database, ending any session still on it.
    pub async fn drop_database(&self) -> anyhow::Result<()> {
        let mut admin = PgConnection::connect(&format!("{}/postgres", self.server)).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "drop database if exists \"{}\" with (force)",
            self.name
        )))
        .execute(&mut admin)
        .await?;
        Ok(())
    }
}

/// Owns a test's database and drops it even when the test fails half way.
pub struct DatabaseGuard(Option<TestDatabase>);

impl DatabaseGuard {
    pub fn new(label: &str) -> Self {
        Self(Some(TestDatabase::new(label)))
    }

    /// A database on `server` (a URL without a database name) instead of the tests' server.
    pub fn on(server: &str, label: &str) -> Self {
        Self(Some(TestDatabase::on(server, label)))
    }

    pub fn url(&self) -> String {
        self.0.as_ref().map(|db| db.url.clone()).unwrap_or_default()
    }

    /// Drops the database now, reporting a failure.
    pub async fn drop_now(&mut self) -> anyhow::Result<()> {
        match self.0.take() {
            Some(db) => db.drop_database().await,
            None => Ok(()),
        }
    }
}

impl Drop for DatabaseGuard {
    fn drop(&mut self) {
        if let Some(db) = self.0.take() {
            // A panicking test: its runtime is busy unwinding, so use a runtime of our own.
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(db.drop_database())
            })
            .join();
        }
    }
}
