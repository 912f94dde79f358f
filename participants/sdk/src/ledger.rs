//! The SDK's own table: one row per idempotency key that took effect (or was refused, or was
//! tombstoned), holding the reply to give again. Written in the transaction of the effect.
//!
//! Runtime-checked queries (`sqlx::query`), on purpose: the table lives in every participant's
//! database and is created by [`migrate`], not by a migration folder, so there is no schema for
//! the offline macros to check against.

use std::collections::HashMap;

use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool, Row};

/// The reply to a command, as stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reply {
    /// The step's output: a JSON object, or `Null` for none.
    Success(Value),
    Failure {
        code: String,
        reason: String,
    },
}

impl Reply {
    fn to_json(&self) -> Value {
        match self {
            Reply::Success(output) => json!({ "success": { "output": output } }),
            Reply::Failure { code, reason } => {
                json!({ "failure": { "code": code, "reason": reason } })
            }
        }
    }

    fn from_json(value: &Value) -> Option<Reply> {
        if let Some(success) = value.get("success") {
            return Some(Reply::Success(
                success.get("output").cloned().unwrap_or(Value::Null),
            ));
        }
        let failure = value.get("failure")?;
        Some(Reply::Failure {
            code: failure.get("code")?.as_str()?.to_owned(),
            reason: failure.get("reason")?.as_str()?.to_owned(),
        })
    }
}

/// What a stored key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Execute,
    Compensate,
    /// An execute key compensated before it ever took effect: a late execute is refused.
    Tombstone,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Execute => "execute",
            Kind::Compensate => "compensate",
            Kind::Tombstone => "tombstone",
        }
    }

    fn parse(text: &str) -> Option<Kind> {
        match text {
            "execute" => Some(Kind::Execute),
            "compensate" => Some(Kind::Compensate),
            "tombstone" => Some(Kind::Tombstone),
            _ => None,
        }
    }
}

/// A stored key.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Recorded {
    pub(crate) kind: Kind,
    pub(crate) reply: Reply,
}

/// The table's name, for tests that look inside.
pub const TABLE: &str = "sagad_processed_commands";

/// Creates the SDK's table if it is missing. Idempotent, and safe when several processes start
/// at once on the same database. Kept out of sqlx's migrator so a participant's own
/// `migrations/<service>/` folder and its `_sqlx_migrations` table are untouched.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Concurrent `create table if not exists` can collide in the catalog: take turns.
    sqlx::query("select pg_advisory_xact_lock(7245019301)")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        r"create table if not exists sagad_processed_commands (
            idempotency_key text primary key,
            kind text not null check (kind in ('execute', 'compensate', 'tombstone')),
            reply jsonb not null,
            recorded_at timestamptz not null default now()
        )",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Serializes every command of one step (its execute and its compensate, and duplicates of
/// either) until the transaction ends, for the steps of a whole batch at once. The locks are
/// taken in the order of their hashes, so two batches never wait for each other in a circle. A
/// hash collision only makes two steps take turns.
pub(crate) async fn lock_steps(
    conn: &mut PgConnection,
    execute_keys: &[String],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "select pg_advisory_xact_lock(hash) from (
            select distinct hashtextextended(key, 0) as hash from unnest($1::text[]) as key
            order by hash
        ) as ordered",
    )
    .bind(execute_keys)
    .execute(conn)
    .await?;
    Ok(())
}

/// The recorded keys among `keys`. Read after the locks are held, so a command of the same step
/// committed just before is seen.
pub(crate) async fn find_all(
    conn: &mut PgConnection,
    keys: &[String],
) -> Result<HashMap<String, Recorded>, sqlx::Error> {
    let rows = sqlx::query(
        "select idempotency_key, kind, reply from sagad_processed_commands
         where idempotency_key = any($1)",
    )
    .bind(keys)
    .fetch_all(conn)
    .await?;
    let mut found = HashMap::with_capacity(rows.len());
    for row in rows {
        let key: String = row.try_get("idempotency_key")?;
        let kind: String = row.try_get("kind")?;
        let reply: Value = row.try_get("reply")?;
        match (Kind::parse(&kind), Reply::from_json(&reply)) {
            (Some(kind), Some(reply)) => {
                found.insert(key, Recorded { kind, reply });
            }
            _ => {
                return Err(sqlx::Error::Decode(
                    format!("unreadable {TABLE} row for {key}: kind {kind}, reply {reply}").into(),
                ));
            }
        }
    }
    Ok(found)
}

/// Records the keys of a batch in one statement.
pub(crate) async fn record_all(
    conn: &mut PgConnection,
    records: &[(String, Kind, Reply)],
) -> Result<(), sqlx::Error> {
    if records.is_empty() {
        return Ok(());
    }
    let keys: Vec<&str> = records.iter().map(|(key, _, _)| key.as_str()).collect();
    let kinds: Vec<&str> = records.iter().map(|(_, kind, _)| kind.as_str()).collect();
    let replies: Vec<Value> = records
        .iter()
        .map(|(_, _, reply)| reply.to_json())
        .collect();
    sqlx::query(
        "insert into sagad_processed_commands (idempotency_key, kind, reply)
         select * from unnest($1::text[], $2::text[], $3::jsonb[])",
    )
    .bind(keys)
    .bind(kinds)
    .bind(replies)
    .execute(conn)
    .await?;
    Ok(())
}
