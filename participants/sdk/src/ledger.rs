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

/// Creates the SDK's table if it is missing, and (re)creates its function. Idempotent, and safe
/// when several processes start at once on the same database. Kept out of sqlx's migrator so a
/// participant's own `migrations/<service>/` folder and its `_sqlx_migrations` table are
/// untouched.
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
    sqlx::raw_sql(LOCK_AND_FIND).execute(&mut *tx).await?;
    tx.commit().await
}

/// The SDK's function that takes a batch's step locks and then reads its keys, in one round
/// trip. A `volatile` SQL function takes a fresh snapshot for each of its statements, so the
/// read sees a command of the same step that committed while the lock was awaited. The locks
/// are taken in the order of their hashes, so two batches never wait for each other in a
/// circle; a hash collision only makes two steps take turns.
const LOCK_AND_FIND: &str = r"create or replace function sagad_lock_steps_and_find(
        step_keys text[], keys text[]
    ) returns table (idempotency_key text, kind text, reply jsonb)
    language sql volatile as $$
        select pg_advisory_xact_lock(ordered.hash) from (
            select distinct hashtextextended(step_key, 0) as hash
            from unnest(step_keys) as step_key
            order by hash
        ) as ordered;
        select processed.idempotency_key, processed.kind, processed.reply
        from sagad_processed_commands as processed
        where processed.idempotency_key = any(keys);
    $$";

/// Serializes every command of one step (its execute and its compensate, and duplicates of
/// either) until the transaction ends, for the steps of a whole batch at once; returns the
/// recorded keys among `keys`, read after the locks are held; and sets the savepoint `command`
/// for the batch's first handler. All in one round trip: the keys travel as JSON text inside a
/// dollar-quoted literal (taken verbatim by Postgres, whatever they hold), because only a
/// simple query carries two statements.
pub(crate) async fn lock_find_and_savepoint(
    conn: &mut PgConnection,
    step_keys: &[String],
    keys: &[String],
) -> Result<HashMap<String, Recorded>, sqlx::Error> {
    let step_keys = Value::from(step_keys).to_string();
    let keys = Value::from(keys).to_string();
    let quote = dollar_quote(&[&step_keys, &keys]);
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "select idempotency_key, kind, reply from sagad_lock_steps_and_find(
             array(select jsonb_array_elements_text({quote}{step_keys}{quote}::jsonb)),
             array(select jsonb_array_elements_text({quote}{keys}{quote}::jsonb)));
         savepoint command"
    )))
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

/// A dollar-quote tag that occurs in none of `texts`.
fn dollar_quote(texts: &[&str]) -> String {
    (0u64..)
        .map(|n| format!("$k{n}$"))
        .find(|tag| texts.iter().all(|text| !text.contains(tag.as_str())))
        .unwrap_or_default()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dollar_quote_occurs_in_none_of_the_texts() {
        assert_eq!(dollar_quote(&["[\"a\"]"]), "$k0$");
        assert_eq!(dollar_quote(&["[\"$k0$\"]", "[\"$k1$\"]"]), "$k2$");
    }
}
