//! All SQL lives here. The log (`saga_events`) is the truth; the read model (`sagas`) is written
//! in the same transaction as the events that change it, so a query never replays and is never
//! behind the write it follows. Nothing outside this module writes SQL.
//!
//! Every database call has a deadline: the server ends a statement after [`STATEMENT_TIMEOUT`],
//! and this side gives up a little later, for a server that does not answer at all (paused,
//! or cut off with the connection left half open). A call that ran out of time is a
//! [`StoreError::Timeout`]; whether its write took effect is learnt by reading the log again.

mod format;
mod waiters;
mod writer;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{PgPool, Postgres};
use uuid::Uuid;

use crate::saga::{Event, SagaStatus, StepView};

pub use format::LOG_FORMAT;
pub use waiters::VersionWait;
pub use writer::Writer;

/// How long the server lets one statement run.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long this side waits for one call (a connection, then a statement) before giving up.
const CALL_TIMEOUT: Duration = Duration::from_secs(6);
/// How long this side waits for a batch commit: a few statements in one transaction.
const BATCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request waits for a free connection; shorter than [`CALL_TIMEOUT`], so a
/// request answers UNAVAILABLE within seconds while the database is down.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// How long an expired replica id is remembered: far longer than any transaction of its time
/// can last (see [`STATEMENT_TIMEOUT`]), so every saga it wrote is let go before it is forgotten.
const FORGET_DEAD_REPLICAS_AFTER: Duration = Duration::from_secs(3600);

/// Settings of every session: the server ends a statement or an idle transaction that runs
/// too long, and probes a client that went silent (TCP keepalive on the server's side), so a
/// vanished sagad never holds locks for long. sqlx sets no socket options on this side; the
/// deadlines above stand in for them and also cover a server that stopped answering.
fn session_settings(options: PgConnectOptions) -> PgConnectOptions {
    options.options([
        ("statement_timeout", "5s"),
        ("lock_timeout", "5s"),
        ("idle_in_transaction_session_timeout", "15s"),
        ("tcp_keepalives_idle", "10"),
        ("tcp_keepalives_interval", "5"),
        ("tcp_keepalives_count", "3"),
        ("tcp_user_timeout", "20000"),
    ])
}

/// The writer's session also keeps one plan per statement. Planning the batch statement anew
/// for each batch (what Postgres does for a statement whose parameters are arrays, as it
/// sizes the plan to them) took 0.5 to 0.8 ms of the server's CPU, longer than executing it.
/// The plan made once must serve any table size and batch: the statement keeps its row
/// look-ups on the primary key whatever the batch (see `commit_batch`).
fn writer_settings(options: PgConnectOptions) -> PgConnectOptions {
    options.options([("plan_cache_mode", "force_generic_plan")])
}

/// A store failure. Cloneable, because one failed batch commit is the answer of every write in it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(Arc<sqlx::Error>),
    #[error("migration failed: {0}")]
    Migration(Arc<sqlx::migrate::MigrateError>),
    /// The database was migrated by a newer release: running on it could misread what that
    /// release wrote.
    #[error(
        "the database's schema is newer than this sagad knows (its migration {0} comes from a \
         newer release): run the newer sagad, or give this one a database of its own"
    )]
    SchemaTooNew(i64),
    #[error("corrupt saga log for {saga_id} at seq {seq}: {message}")]
    CorruptLog {
        saga_id: Uuid,
        seq: i64,
        message: String,
    },
    #[error("cannot encode an event: {0}")]
    Encode(Arc<serde_json::Error>),
    /// The database refused the data of a write (a data exception or a size limit): retrying
    /// the same write can only fail again.
    #[error("the database refused the data: {0}")]
    Rejected(Arc<sqlx::Error>),
    #[error("the database did not answer within {} ({what})", humantime::format_duration(*.after))]
    Timeout { what: &'static str, after: Duration },
    #[error("the batch writer has stopped")]
    WriterStopped,
}

impl StoreError {
    /// Whether the error comes from what one write carried rather than from the database's
    /// state: a batch that failed for it is worth retrying write by write.
    fn concerns_data(&self) -> bool {
        match self {
            StoreError::Rejected(_) | StoreError::Encode(_) => true,
            StoreError::Database(error) => matches!(**error, sqlx::Error::Database(_)),
            _ => false,
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        // SQLSTATE classes 22 (data exception: a NUL character, an out-of-range number) and
        // 54 (program limit exceeded: a document too large).
        let refused_data = match &error {
            sqlx::Error::Database(database) => database
                .code()
                .is_some_and(|code| code.starts_with("22") || code.starts_with("54")),
            _ => false,
        };
        if refused_data {
            StoreError::Rejected(Arc::new(error))
        } else {
            StoreError::Database(Arc::new(error))
        }
    }
}

/// `call`, given up after `after`.
async fn bounded<T>(
    what: &'static str,
    after: Duration,
    call: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T> {
    match tokio::time::timeout(after, call).await {
        Ok(result) => result.map_err(StoreError::from),
        Err(_) => Err(StoreError::Timeout { what, after }),
    }
}

/// `call` (several statements), given up after `after`.
async fn bounded_all<T>(
    what: &'static str,
    after: Duration,
    call: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(after, call)
        .await
        .unwrap_or(Err(StoreError::Timeout { what, after }))
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The read-model row of a saga, written with every append.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    pub saga_type: String,
    pub definition_version: u32,
    pub status: SagaStatus,
    pub input: Arc<Value>,
    /// Each step's output is here; the context a participant receives is built from the input
    /// and them when it is needed, not stored.
    pub steps: Vec<StepView>,
    pub failure_reason: Option<String>,
    pub version: u64,
    pub correlation_id: String,
    /// `None` when the client gave no key.
    pub idempotency_key: Option<String>,
    pub wake_at: Option<DateTime<Utc>>,
    /// Since when the step being worked on has kept failing; stuck beyond `--stuck-after`.
    pub failing_since: Option<DateTime<Utc>>,
}

/// Events to append to one saga's log, and its read model after them. With no events, the
/// read model alone changes, at `expected_version` (a failed attempt kept out of the log).
#[derive(Debug, Clone)]
pub struct SagaWrite {
    pub saga_id: Uuid,
    /// The version the writer read; 0 starts a new saga. A different version in the database
    /// means another writer moved the saga first: this write is refused.
    pub expected_version: u64,
    /// The replica appending: recorded on each event, and the owner of a saga it starts.
    pub replica_id: Uuid,
    pub fence: Fence,
    pub events: Vec<Event>,
    pub projection: Projection,
}

/// Who may append to a saga that exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// The saga's driver: only while `replica_id` owns the saga and its lease is alive, so a
    /// replica that lost its lease can never append.
    Owner,
    /// A client's request (a cancel), by any replica: the owner is told to read the log again.
    Request,
}

/// What became of one write in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    Written,
    /// The saga's version moved (or, for a start, its idempotency key is taken): nothing was written.
    Conflict,
    /// The writer no longer owns the saga, or its lease expired: nothing was written, and the
    /// writer must let the saga go.
    Fenced,
}

/// What became of one write of a committed batch, as the batch writer learns it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BatchOutcome {
    /// Written, with what the database itself set in the saga's row.
    Written(RowStamps),
    Conflict,
    Fenced,
}

impl BatchOutcome {
    /// The outcome as the write's caller is told it.
    pub fn outcome(self) -> WriteOutcome {
        match self {
            BatchOutcome::Written(_) => WriteOutcome::Written,
            BatchOutcome::Conflict => WriteOutcome::Conflict,
            BatchOutcome::Fenced => WriteOutcome::Fenced,
        }
    }
}

/// The columns of a saga's row that the database, not the write, decides: returned by the
/// statement that wrote the row, so that the row can be known without reading it again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowStamps {
    pub created_at: DateTime<Utc>,
    /// The writing transaction's `now()`.
    pub updated_at: DateTime<Utc>,
    /// Not always the projection's: an update keeps the row's due time when both are past.
    pub wake_at: Option<DateTime<Utc>>,
    /// As stored: to the microsecond.
    pub failing_since: Option<DateTime<Utc>>,
}

/// What became of a driver's request to park its saga (see [`Store::park`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parking {
    /// Nobody owns the saga now: a sweep claims it once it is due.
    Parked,
    /// Its version moved (a request was recorded): the driver reads it again.
    Moved,
    /// The replica no longer owns the saga, or its lease expired: the driver lets it go.
    Fenced,
    /// By the database's clock the saga is due too soon to be parked: the driver keeps it.
    DueSoon,
}

/// The channel on which a replica hears that a saga it may drive was changed by a request.
const CHANGED_CHANNEL: &str = "sagad_saga_changed";
/// The channel on which every replica hears what each commit appended (for watchers).
const APPENDED_CHANNEL: &str = "sagad_saga_appended";
/// Sagas announced per notification: `<id>:<version>` is at most 53 bytes, and a payload must
/// stay under 8000.
const APPENDED_PER_NOTIFICATION: usize = 140;

/// A saga as the read model has it.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaRecord {
    pub saga_id: Uuid,
    pub projection: Projection,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl SagaRecord {
    /// The row a committed write left: its projection, with what the database set in the row.
    /// What a read of the row right after the commit returns, without that read.
    pub fn committed(saga_id: Uuid, mut projection: Projection, stamps: RowStamps) -> Self {
        projection.wake_at = stamps.wake_at;
        projection.failing_since = stamps.failing_since;
        Self {
            saga_id,
            projection,
            created_at: stamps.created_at,
            updated_at: stamps.updated_at,
        }
    }
}

/// A saga's log and the steps of its read model at the log's last event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoredLog {
    pub events: Vec<Event>,
    pub steps: Vec<StepView>,
}

/// One entry of a saga's history.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub seq: u64,
    pub event_type: String,
    pub step: Option<String>,
    pub data: Value,
    pub recorded_at: DateTime<Utc>,
}

/// Which sagas a listing wants, and where the previous page ended.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub saga_type: Option<String>,
    pub statuses: Vec<SagaStatus>,
    /// Only sagas failing since before this time (stuck).
    pub failing_before: Option<DateTime<Utc>>,
    pub limit: u32,
    pub after: Option<ListCursor>,
    /// Only the saga with this id, correlation id or idempotency key.
    pub find: Option<String>,
}

/// What the explorer's overview shows: every saga counted by type and status, and the sagas
/// that ended in each minute since a time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overview {
    pub counts: Vec<(String, SagaStatus, i64)>,
    /// The start of each minute with sagas ended in it, their end status and how many.
    pub finished_per_minute: Vec<(DateTime<Utc>, SagaStatus, i64)>,
}

/// The active sagas of the database, counted in one query for the sampled gauges.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Activity {
    /// RUNNING and COMPENSATING sagas, by type and status.
    pub active: Vec<(String, SagaStatus, i64)>,
    /// Of those, the ones failing since before the cutoff given.
    pub stuck: i64,
    /// When the oldest of them started.
    pub oldest_started_at: Option<DateTime<Utc>>,
}

/// The position of the last saga of a page: listings are ordered newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListCursor {
    pub created_at: DateTime<Utc>,
    pub saga_id: Uuid,
}

impl ListCursor {
    /// The last saga of a page, where the next one starts.
    pub fn after(record: &SagaRecord) -> Self {
        Self {
            created_at: record.created_at,
            saga_id: record.saga_id,
        }
    }

    /// The cursor as clients carry it (a page token, a link): the creation time in
    /// microseconds since 1970, a dot, and the saga id.
    pub fn token(&self) -> String {
        format!(
            "{}.{}",
            self.created_at.timestamp_micros(),
            self.saga_id.simple()
        )
    }

    /// A cursor [`token`](Self::token) made; `None` for any other text, or a time Postgres
    /// cannot compare (years 1970 to 9999).
    pub fn from_token(token: &str) -> Option<Self> {
        const LATEST_MICROS: i64 = 253_402_300_799_999_999;
        let (micros, saga_id) = token.split_once('.')?;
        let micros: i64 = micros.parse().ok()?;
        if !(0..=LATEST_MICROS).contains(&micros) {
            return None;
        }
        Some(Self {
            created_at: DateTime::from_timestamp_micros(micros)?,
            saga_id: Uuid::parse_str(saga_id).ok()?,
        })
    }
}

/// The connection pools and every query sagad makes.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    /// The lease's own connection: a renewal never waits behind requests for the main pool.
    lease_pool: PgPool,
    /// The batch writer's own connection (it writes one batch at a time), whose statements
    /// run on plans made once: see [`writer_settings`].
    write_pool: PgPool,
}

impl Store {
    /// Connects, creating the database if it is missing and retrying for up to `max_wait` while
    /// the server is unreachable, then applies the migrations. Replicas starting together
    /// migrate one at a time: the migrator holds a Postgres advisory lock while it works, and
    /// each finds what the one before applied. A database migrated by a newer release is
    /// refused.
    pub async fn connect(url: &str, max_wait: Duration) -> Result<Store> {
        let options = session_settings(url.parse()?);
        let deadline = tokio::time::Instant::now() + max_wait;
        let mut delay = Duration::from_millis(100);
        let store = loop {
            match Self::try_connect(url, options.clone()).await {
                Ok(store) => break store,
                Err(error) => {
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        return Err(error);
                    }
                    tracing::warn!(%error, "database not reachable yet; retrying");
                    tokio::time::sleep(delay.min(deadline - now)).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        };
        sqlx::migrate!("../migrations/orchestrator")
            .run(&store.pool)
            .await
            .map_err(|error| match error {
                sqlx::migrate::MigrateError::VersionMissing(version) => {
                    StoreError::SchemaTooNew(version)
                }
                other => StoreError::Migration(Arc::new(other)),
            })?;
        Ok(store)
    }

    async fn try_connect(url: &str, options: PgConnectOptions) -> Result<Store> {
        let exists = bounded(
            "checking the database exists",
            CALL_TIMEOUT,
            Postgres::database_exists(url),
        )
        .await?;
        if !exists {
            match bounded(
                "creating the database",
                CALL_TIMEOUT,
                Postgres::create_database(url),
            )
            .await
            {
                Ok(()) => {}
                // Another process created it first (found by name, or by the catalog's unique
                // index when both creates ran at once).
                Err(StoreError::Database(error)) if matches!(&*error, sqlx::Error::Database(e) if matches!(e.code().as_deref(), Some("42P04" | "23505"))) =>
                    {}
                Err(error) => return Err(error),
            }
        }
        let pool = bounded(
            "connecting",
            CALL_TIMEOUT,
            PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_with(options.clone()),
        )
        .await?;
        let lease_pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options.clone());
        let write_pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(writer_settings(options));
        Ok(Store {
            pool,
            lease_pool,
            write_pool,
        })
    }

    /// Is the database answering?
    pub async fn ping(&self) -> Result<()> {
        bounded(
            "ping",
            CALL_TIMEOUT,
            sqlx::query_scalar!("select 1 as \"one!\"").fetch_one(&self.pool),
        )
        .await?;
        Ok(())
    }

    /// Commits a batch of writes for distinct sagas in one transaction. A conflict on one saga
    /// does not fail the others; an event that cannot be encoded fails its own write only.
    /// Either every write of the batch is committed, or none. A written one comes back with
    /// what the database set in its row, so the row is known without reading it.
    pub async fn write_batch(&self, writes: &[SagaWrite]) -> Result<Vec<Result<BatchOutcome>>> {
        let mut ready = Vec::with_capacity(writes.len());
        let mut failed: Vec<Option<StoreError>> = Vec::with_capacity(writes.len());
        for write in writes {
            match EncodedWrite::of(write) {
                Ok(encoded) => {
                    ready.push(encoded);
                    failed.push(None);
                }
                Err(error) => failed.push(Some(StoreError::Encode(Arc::new(error)))),
            }
        }
        let outcomes = if ready.is_empty() {
            Vec::new()
        } else {
            bounded_all(
                "committing a batch",
                BATCH_TIMEOUT,
                self.commit_batch(&ready),
            )
            .await?
        };
        let mut outcomes = outcomes.into_iter();
        Ok(failed
            .into_iter()
            .map(|failure| match failure {
                Some(error) => Err(error),
                None => Ok(outcomes.next().unwrap_or(BatchOutcome::Conflict)),
            })
            .collect())
    }

    /// One statement, so one round trip and one transaction, for `writes` (each with its events
    /// encoded), answered in their order: the new sagas inserted and the others' read models
    /// updated (each only at the version its writer read, and a driver's only while it owns the
    /// saga under a live lease), the events of those that passed appended, and the replicas
    /// told what was appended (and which sagas a request changed), in a few notifications.
    async fn commit_batch(&self, ready: &[EncodedWrite<'_>]) -> Result<Vec<BatchOutcome>> {
        let writes: Vec<&SagaWrite> = ready.iter().map(|encoded| encoded.write).collect();
        let (starts, mut updates): (Vec<&EncodedWrite>, Vec<&EncodedWrite>) = ready
            .iter()
            .partition(|encoded| encoded.write.expected_version == 0);
        // One lock order for every batch, so concurrent batches cannot deadlock.
        updates.sort_by_key(|encoded| encoded.write.saga_id);

        let new = StartColumns::of(&starts);
        let moved = RowColumns::of(&updates);
        let mut events = EventColumns::default();
        for encoded in ready {
            events.push(encoded);
        }
        let requested: Vec<Uuid> = writes
            .iter()
            .filter(|w| w.fence == Fence::Request)
            .map(|w| w.saga_id)
            .collect();
        let written: HashMap<Uuid, RowStamps> = sqlx::query!(
            r#"
            with started as (
                insert into sagas (saga_id, saga_type, definition_version, status, input, steps,
                                   failure_reason, version, correlation_id, idempotency_key, wake_at, owner,
                                   failing_since)
                select n.saga_id, n.saga_type, n.definition_version, n.status, n.input::jsonb,
                       n.steps::jsonb,
                       n.failure_reason, n.version, n.correlation_id, n.idempotency_key, n.wake_at,
                       -- No owner unless its replica is alive: see reap_dead_replicas.
                       (select r.replica_id from replicas r
                        where r.replica_id = n.owner and r.lease_expires_at > clock_timestamp()),
                       n.failing_since
                from unnest($1::uuid[], $2::text[], $3::int4[], $4::text[], $5::text[], $6::text[],
                            $7::text[], $8::int8[], $9::text[], $10::text[], $11::timestamptz[],
                            $12::uuid[], $13::timestamptz[])
                     as n(saga_id, saga_type, definition_version, status, input, steps,
                          failure_reason, version, correlation_id, idempotency_key, wake_at,
                          owner, failing_since)
                on conflict do nothing
                returning saga_id, version, created_at, updated_at, wake_at, failing_since
            ),
            moved as (
                update sagas as s
                set status = u.status, context = null, steps = u.steps::jsonb,
                    failure_reason = u.failure_reason, version = u.version,
                    -- A saga due before and due still keeps its time, so that going from step
                    -- to step changes no indexed column: a HOT update.
                    wake_at = case when u.wake_at <= now() and s.wake_at <= now() then s.wake_at
                                   else u.wake_at end,
                    failing_since = u.failing_since, updated_at = now()
                from unnest($14::uuid[], $15::int8[], $16::text[], $17::text[], $18::text[],
                            $19::int8[], $20::timestamptz[], $21::uuid[], $22::bool[], $23::timestamptz[])
                    as u(saga_id, expected_version, status, steps, failure_reason, version, wake_at,
                         writer_id, owner_only, failing_since)
                -- `any($14)` besides the join: a plan made once, not knowing the batch's size,
                -- still finds the rows by primary key instead of scanning the table.
                where s.saga_id = any($14::uuid[]) and s.saga_id = u.saga_id
                  and s.version = u.expected_version
                  and (not u.owner_only
                       or (s.owner = u.writer_id
                           and exists (select 1 from replicas r
                                       where r.replica_id = u.writer_id
                                         and r.lease_expires_at > clock_timestamp())))
                returning s.saga_id, s.version, s.created_at, s.updated_at, s.wake_at,
                          s.failing_since
            ),
            written as (
                select saga_id, version, created_at, updated_at, wake_at, failing_since
                from started
                union all
                select saga_id, version, created_at, updated_at, wake_at, failing_since
                from moved
            ),
            logged as (
                insert into saga_events (saga_id, seq, event_type, step, data, replica_id, format)
                select e.saga_id, e.seq, e.event_type, e.step, e.data::jsonb, e.replica_id, $30
                from unnest($24::uuid[], $25::int8[], $26::text[], $27::text[], $28::text[], $29::uuid[])
                    as e(saga_id, seq, event_type, step, data, replica_id)
                where e.saga_id in (select saga_id from written)
            ),
            -- Delivered at commit, to every replica listening: the sagas a request changed, so
            -- their drivers read them again, and what was appended, for the watchers.
            rung as (
                select pg_notify($31, r.saga_id::text)
                from unnest($32::uuid[]) as r(saga_id)
                where r.saga_id in (select saga_id from moved)
            ),
            announced as (
                select pg_notify($33, string_agg(replace(w.saga_id::text, '-', '') || ':' || w.version, ','))
                from (select saga_id, version, row_number() over () - 1 as n from written) as w
                group by w.n / $34
            )
            select w.saga_id as "saga_id!", w.created_at as "created_at!",
                   w.updated_at as "updated_at!", w.wake_at as "wake_at?",
                   w.failing_since as "failing_since?"
            from written w, (select count(*) from rung) as r, (select count(*) from announced) as a
            "#,
            &new.row.ids,
            &new.saga_types as &[&str],
            &new.definition_versions,
            &new.row.statuses as &[&str],
            &new.inputs as &[&str],
            &new.row.steps as &[&str],
            &new.row.failure_reasons as &[Option<&str>],
            &new.row.versions,
            &new.correlation_ids as &[&str],
            &new.idempotency_keys as &[Option<&str>],
            &new.row.wake_ats as &[Option<DateTime<Utc>>],
            &new.row.writers,
            &new.row.failing_sinces as &[Option<DateTime<Utc>>],
            &moved.ids,
            &moved.expected,
            &moved.statuses as &[&str],
            &moved.steps as &[&str],
            &moved.failure_reasons as &[Option<&str>],
            &moved.versions,
            &moved.wake_ats as &[Option<DateTime<Utc>>],
            &moved.writers,
            &moved.owner_only,
            &moved.failing_sinces as &[Option<DateTime<Utc>>],
            &events.saga_ids,
            &events.seqs,
            &events.types as &[&str],
            &events.steps as &[Option<&str>],
            &events.datas as &[&str],
            &events.replicas,
            LOG_FORMAT,
            CHANGED_CHANNEL,
            &requested,
            APPENDED_CHANNEL,
            APPENDED_PER_NOTIFICATION as i64,
        )
        .fetch_all(&self.write_pool)
        .await?
        .into_iter()
        .map(|row| {
            let stamps = RowStamps {
                created_at: row.created_at,
                updated_at: row.updated_at,
                wake_at: row.wake_at,
                failing_since: row.failing_since,
            };
            (row.saga_id, stamps)
        })
        .collect();

        // A driver's write that did not pass: a lost lease or owner, or only a moved version?
        // Asked after the fact, and only when it happens: either way nothing was written.
        let (refused, refused_writers): (Vec<Uuid>, Vec<Uuid>) = updates
            .iter()
            .map(|encoded| encoded.write)
            .filter(|w| w.fence == Fence::Owner && !written.contains_key(&w.saga_id))
            .map(|w| (w.saga_id, w.replica_id))
            .unzip();
        let fenced: HashSet<Uuid> = if refused.is_empty() {
            HashSet::new()
        } else {
            sqlx::query_scalar!(
                r#"
                select u.saga_id as "saga_id!" from unnest($1::uuid[], $2::uuid[]) as u(saga_id, writer_id)
                join sagas s on s.saga_id = u.saga_id
                where s.owner is distinct from u.writer_id
                   or not exists (select 1 from replicas r
                                  where r.replica_id = u.writer_id
                                    and r.lease_expires_at > clock_timestamp())
                "#,
                &refused,
                &refused_writers,
            )
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .collect()
        };

        Ok(writes
            .iter()
            .map(|w| match written.get(&w.saga_id) {
                Some(stamps) => BatchOutcome::Written(*stamps),
                None if fenced.contains(&w.saga_id) => BatchOutcome::Fenced,
                None => BatchOutcome::Conflict,
            })
            .collect())
    }

    /// A saga's whole log, in order, for replay, with the steps of its read model as they
    /// stand at the log's last event: what failed attempts kept out of the log left there
    /// (see `Saga::restore_unlogged`). One statement, so the two agree.
    pub async fn load_log(&self, saga_id: Uuid) -> Result<StoredLog> {
        let rows = bounded(
            "reading a saga's log",
            CALL_TIMEOUT,
            sqlx::query!(
                r#"select e.seq, e.format, e.data,
                          case when e.seq = s.version then s.steps end as steps
                   from sagas s
                   join saga_events e on e.saga_id = s.saga_id and e.seq <= s.version
                   where s.saga_id = $1
                   order by e.seq"#,
                saga_id
            )
            .fetch_all(&self.pool),
        )
        .await?;
        let mut log = StoredLog::default();
        for row in rows {
            let corrupt = |message: String| StoreError::CorruptLog {
                saga_id,
                seq: row.seq,
                message,
            };
            if let Some(steps) = row.steps {
                log.steps = serde_json::from_value(steps)
                    .map_err(|error| corrupt(format!("steps: {error}")))?;
            }
            log.events
                .push(format::decode_event(row.format, row.data).map_err(corrupt)?);
        }
        Ok(log)
    }

    /// A saga's history as clients see it.
    pub async fn history(&self, saga_id: Uuid) -> Result<Vec<EventRecord>> {
        self.history_after(saga_id, 0, u64::MAX, None).await
    }

    /// The events of a saga's history after seq `after` and up to seq `through`, in order; at
    /// most `limit` of them, so that one answer never has to read a long history whole. The
    /// bound lets an answer pair a row read earlier with exactly the events it reflects.
    pub async fn history_after(
        &self,
        saga_id: Uuid,
        after: u64,
        through: u64,
        limit: Option<u32>,
    ) -> Result<Vec<EventRecord>> {
        let rows = bounded(
            "reading a saga's history",
            CALL_TIMEOUT,
            sqlx::query!(
                r#"select seq, event_type, step, data, recorded_at from saga_events
                   where saga_id = $1 and seq > $2 and seq <= $3 order by seq limit $4"#,
                saga_id,
                to_i64(after),
                to_i64(through),
                limit.map(i64::from),
            )
            .fetch_all(&self.pool),
        )
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| EventRecord {
                seq: u64::try_from(row.seq).unwrap_or_default(),
                event_type: row.event_type,
                step: row.step,
                data: row.data,
                recorded_at: row.recorded_at,
            })
            .collect())
    }

    pub async fn get_saga(&self, saga_id: Uuid) -> Result<Option<SagaRecord>> {
        let row = bounded(
            "reading a saga",
            CALL_TIMEOUT,
            sqlx::query_as!(
                SagaRow,
                r#"select saga_id, saga_type, definition_version, status, input, steps,
                          failure_reason, version, correlation_id, idempotency_key, created_at,
                          updated_at, wake_at, failing_since
                   from sagas where saga_id = $1"#,
                saga_id
            )
            .fetch_optional(&self.pool),
        )
        .await?;
        row.map(SagaRow::into_record).transpose()
    }

    /// The saga that a start with this key made, if any.
    pub async fn find_by_idempotency_key(
        &self,
        saga_type: &str,
        idempotency_key: &str,
    ) -> Result<Option<SagaRecord>> {
        let row = bounded(
            "looking up an idempotency key",
            CALL_TIMEOUT,
            sqlx::query_as!(
                SagaRow,
                r#"select saga_id, saga_type, definition_version, status, input, steps,
                          failure_reason, version, correlation_id, idempotency_key, created_at,
                          updated_at, wake_at, failing_since
                   from sagas where saga_type = $1 and idempotency_key = $2"#,
                saga_type,
                idempotency_key
            )
            .fetch_optional(&self.pool),
        )
        .await?;
        row.map(SagaRow::into_record).transpose()
    }

    /// Sagas newest first, filtered, one page.
    pub async fn list_sagas(&self, filter: &ListFilter) -> Result<Vec<SagaRecord>> {
        let statuses: Vec<String> = filter
            .statuses
            .iter()
            .map(|s| s.as_str().to_owned())
            .collect();
        let rows = bounded(
            "listing sagas",
            CALL_TIMEOUT,
            sqlx::query_as!(
                SagaRow,
                r#"select saga_id, saga_type, definition_version, status, input, steps,
                          failure_reason, version, correlation_id, idempotency_key, created_at,
                          updated_at, wake_at, failing_since
                   from sagas
                   where ($1::text is null or saga_type = $1)
                     and (cardinality($2::text[]) = 0 or status = any($2))
                     and ($3::timestamptz is null or (created_at, saga_id) < ($3, $4::uuid))
                     and ($6::timestamptz is null or failing_since < $6)
                     and ($7::text is null
                          or saga_id = $8 or correlation_id = $7 or idempotency_key = $7)
                   order by created_at desc, saga_id desc
                   limit $5"#,
                filter.saga_type.as_deref(),
                &statuses,
                filter.after.map(|cursor| cursor.created_at),
                filter.after.map(|cursor| cursor.saga_id),
                i64::from(filter.limit),
                filter.failing_before,
                filter.find.as_deref(),
                filter
                    .find
                    .as_deref()
                    .and_then(|text| Uuid::parse_str(text).ok()),
            )
            .fetch_all(&self.pool),
        )
        .await?;
        rows.into_iter().map(SagaRow::into_record).collect()
    }

    /// Every saga counted by type and status, and the sagas ended in each minute since
    /// `since`: two scans of the read model (no index helps a count of every row).
    pub async fn overview(&self, since: DateTime<Utc>) -> Result<Overview> {
        let (counts, finished) = bounded_all("counting sagas", CALL_TIMEOUT, async {
            let counts = sqlx::query!(
                r#"select saga_type, status, count(*) as "count!"
                   from sagas group by saga_type, status order by saga_type, status"#,
            )
            .fetch_all(&self.pool)
            .await?;
            let finished = sqlx::query!(
                r#"select date_trunc('minute', updated_at) as "minute!", status,
                          count(*) as "count!"
                   from sagas
                   where wake_at is null and updated_at >= $1
                     and status in ('COMPLETED', 'COMPENSATED', 'FAILED')
                   group by 1, 2 order by 1"#,
                since,
            )
            .fetch_all(&self.pool)
            .await?;
            Ok((counts, finished))
        })
        .await?;
        Ok(Overview {
            counts: counts
                .into_iter()
                .filter_map(|row| Some((row.saga_type, SagaStatus::parse(&row.status)?, row.count)))
                .collect(),
            finished_per_minute: finished
                .into_iter()
                .filter_map(|row| Some((row.minute, SagaStatus::parse(&row.status)?, row.count)))
                .collect(),
        })
    }

    /// The sagas a person must look at, `FAILED` ones and the ones failing since before
    /// `failing_before` (stuck), the longest waiting first: a failed saga since it was last
    /// changed, a stuck one since it began failing.
    pub async fn needing_attention(
        &self,
        failing_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<SagaRecord>> {
        let rows = bounded(
            "listing the sagas that need a person",
            CALL_TIMEOUT,
            sqlx::query_as!(
                SagaRow,
                r#"select saga_id, saga_type, definition_version, status, input, steps,
                          failure_reason, version, correlation_id, idempotency_key, created_at,
                          updated_at, wake_at, failing_since
                   from sagas
                   where status = 'FAILED' or failing_since < $1
                   order by coalesce(failing_since, updated_at), saga_id
                   limit $2"#,
                failing_before,
                i64::from(limit),
            )
            .fetch_all(&self.pool),
        )
        .await?;
        rows.into_iter().map(SagaRow::into_record).collect()
    }

    /// The active sagas by type and status, how many of them fail since before
    /// `failing_before`, and when the oldest started: one query over the unfinished sagas.
    pub async fn activity(&self, failing_before: DateTime<Utc>) -> Result<Activity> {
        let rows = bounded(
            "counting active sagas",
            CALL_TIMEOUT,
            sqlx::query!(
                r#"select saga_type, status, count(*) as "count!",
                          count(*) filter (where failing_since < $1) as "stuck!",
                          min(created_at) as "oldest!"
                   from sagas where wake_at is not null
                   group by saga_type, status"#,
                failing_before,
            )
            .fetch_all(&self.pool),
        )
        .await?;
        let mut activity = Activity::default();
        for row in rows {
            let Some(status) = SagaStatus::parse(&row.status) else {
                continue;
            };
            activity.active.push((row.saga_type, status, row.count));
            activity.stuck += row.stuck;
            activity.oldest_started_at = Some(match activity.oldest_started_at {
                Some(oldest) => oldest.min(row.oldest),
                None => row.oldest,
            });
        }
        Ok(activity)
    }

    /// Registers a new replica id with a lease of `ttl`, and forgets the ids dead for a day
    /// (a saga still naming one as owner is orphaned either way).
    pub async fn register_replica(&self, ttl: Duration) -> Result<Uuid> {
        let replica_id = Uuid::now_v7();
        bounded_all("registering a replica", CALL_TIMEOUT, async {
            sqlx::query!(
                r#"insert into replicas (replica_id, lease_expires_at)
                   values ($1, clock_timestamp() + make_interval(secs => $2))"#,
                replica_id,
                ttl.as_secs_f64(),
            )
            .execute(&self.lease_pool)
            .await?;
            Ok(())
        })
        .await?;
        Ok(replica_id)
    }

    /// Extends the replica's lease to `ttl` from now, unless it has expired: an expired id stays
    /// dead, so whatever it still holds can be taken over. `false`: the lease was lost.
    /// It gives up after `within`: a renewal that comes back later than the lease can be
    /// trusted is of no use.
    pub async fn renew_lease(
        &self,
        replica_id: Uuid,
        ttl: Duration,
        within: Duration,
    ) -> Result<bool> {
        let renewed = bounded(
            "renewing the lease",
            within.min(CALL_TIMEOUT),
            sqlx::query!(
                r#"update replicas set lease_expires_at = clock_timestamp() + make_interval(secs => $2)
                   where replica_id = $1 and lease_expires_at > clock_timestamp()"#,
                replica_id,
                ttl.as_secs_f64(),
            )
            .execute(&self.lease_pool),
        )
        .await?;
        Ok(renewed.rows_affected() == 1)
    }

    /// Ends a replica id at once: its sagas are let go (anyone may take them over at once) and
    /// its late writes are fenced off. Returns how many sagas it let go.
    pub async fn retire_replica(&self, replica_id: Uuid) -> Result<u64> {
        bounded_all("retiring a replica", CALL_TIMEOUT, async {
            let mut tx = self.lease_pool.begin().await?;
            sqlx::query!(
                r#"update replicas set lease_expires_at = clock_timestamp() where replica_id = $1"#,
                replica_id
            )
            .execute(&mut *tx)
            .await?;
            let released = sqlx::query!(
                r#"update sagas set owner = null where owner = $1 and wake_at is not null"#,
                replica_id
            )
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(released.rows_affected())
        })
        .await
    }

    /// Lets go of the sagas of every replica whose lease has expired. It does so on every sweep,
    /// not once: a write that found its replica alive may commit just after the lease expired,
    /// and a new saga is seen by none of the statements that began before its commit. An
    /// expired id never comes back; it is forgotten once no write of its time can still be in
    /// flight. Returns how many sagas it let go.
    pub async fn reap_dead_replicas(&self) -> Result<u64> {
        let released = bounded(
            "reaping dead replicas",
            CALL_TIMEOUT,
            sqlx::query!(
                r#"with forgotten as (delete from replicas
                                      where lease_expires_at < clock_timestamp() - make_interval(secs => $1))
                   update sagas set owner = null
                   where wake_at is not null
                     and owner in (select replica_id from replicas
                                   where lease_expires_at <= clock_timestamp())"#,
                FORGET_DEAD_REPLICAS_AFTER.as_secs_f64(),
            )
            .execute(&self.pool),
        )
        .await?;
        Ok(released.rows_affected())
    }

    /// Lets go of the unfinished sagas whose owner is no replica at all (left by a release
    /// that forgot replicas without letting go of their sagas, or restored from elsewhere).
    /// It looks at every unfinished saga: done once, when a replica starts.
    pub async fn release_unknown_owners(&self) -> Result<u64> {
        let released = bounded(
            "letting go of sagas of unknown owners",
            CALL_TIMEOUT,
            sqlx::query!(
                r#"update sagas set owner = null
                   where wake_at is not null and owner is not null
                     and not exists (select 1 from replicas r where r.replica_id = sagas.owner)"#
            )
            .execute(&self.pool),
        )
        .await?;
        Ok(released.rows_affected())
    }

    /// Claims up to `limit` unfinished sagas that nobody owns (see
    /// [`Store::reap_dead_replicas`]) and that are due within `horizon`, soonest first, for
    /// `replica_id` (only while its own lease is alive). Rows another replica is claiming right
    /// now are skipped, not waited for.
    pub async fn claim_orphans(
        &self,
        replica_id: Uuid,
        limit: u32,
        horizon: Duration,
    ) -> Result<Vec<Uuid>> {
        bounded(
            "claiming sagas",
            CALL_TIMEOUT,
            sqlx::query_scalar!(
                r#"
                update sagas set owner = $1
                where saga_id in (
                    select c.saga_id from sagas c
                    where c.owner is null and c.wake_at is not null
                      and c.wake_at <= now() + make_interval(secs => $3)
                    order by c.wake_at
                    limit $2
                    for update skip locked)
                  and exists (select 1 from replicas me
                              where me.replica_id = $1 and me.lease_expires_at > clock_timestamp())
                returning saga_id
                "#,
                replica_id,
                i64::from(limit),
                horizon.as_secs_f64(),
            )
            .fetch_all(&self.pool),
        )
        .await
    }

    /// Lets go of a saga its driver need not hold while it waits: `owner` becomes null if
    /// `replica_id` still owns it under a live lease (the fence of a driver's append), its
    /// version is still `expected_version` (a request recorded meanwhile is acted on, not
    /// lost), and it is not due within `due_after` by the database's clock, the one
    /// [`Store::claim_orphans`] goes by (so a clock apart from it cannot make a saga be
    /// parked and claimed back over and over). Its `wake_at` stays: the sweep's timer.
    pub async fn park(
        &self,
        saga_id: Uuid,
        expected_version: u64,
        replica_id: Uuid,
        due_after: Duration,
    ) -> Result<Parking> {
        bounded_all("parking a saga", CALL_TIMEOUT, async {
            let parked = sqlx::query!(
                r#"update sagas set owner = null
                   where saga_id = $1 and version = $2 and owner = $3
                     and wake_at > now() + make_interval(secs => $4)
                     and exists (select 1 from replicas r
                                 where r.replica_id = $3
                                   and r.lease_expires_at > clock_timestamp())"#,
                saga_id,
                to_i64(expected_version),
                replica_id,
                due_after.as_secs_f64(),
            )
            .execute(&self.pool)
            .await?;
            if parked.rows_affected() == 1 {
                return Ok(Parking::Parked);
            }
            // Why not, read afresh: ownership first, for a saga taken over moved too.
            let row = sqlx::query!(
                r#"select s.version,
                          (s.owner is not distinct from $2
                           and exists (select 1 from replicas r
                                       where r.replica_id = $2
                                         and r.lease_expires_at > clock_timestamp())) as "owned!"
                   from sagas s where s.saga_id = $1"#,
                saga_id,
                replica_id,
            )
            .fetch_optional(&self.pool)
            .await?;
            Ok(match row {
                Some(row) if row.owned && row.version != to_i64(expected_version) => Parking::Moved,
                Some(row) if row.owned => Parking::DueSoon,
                _ => Parking::Fenced,
            })
        })
        .await
    }

    /// Up to `limit` unfinished sagas `replica_id` owns that were due more than `overdue_by`
    /// ago, most overdue first: a saga driven as it should be is either waiting for a time
    /// still to come or in the middle of one call, so what this finds beyond the calls in
    /// flight is a saga whose driver never started or stopped early.
    pub async fn owned_overdue(
        &self,
        replica_id: Uuid,
        overdue_by: Duration,
        limit: u32,
    ) -> Result<Vec<Uuid>> {
        bounded(
            "finding overdue sagas",
            CALL_TIMEOUT,
            sqlx::query_scalar!(
                r#"select saga_id from sagas
                   where owner = $1 and wake_at is not null
                     and wake_at < now() - make_interval(secs => $2)
                   order by wake_at
                   limit $3"#,
                replica_id,
                overdue_by.as_secs_f64(),
                i64::from(limit),
            )
            .fetch_all(&self.pool),
        )
        .await
    }

    /// Listens for sagas changed by requests on any replica (see [`Fence::Request`]) and for
    /// what every commit appended.
    pub async fn listen_for_changes(&self) -> Result<ChangeListener> {
        bounded_all("listening for changes", CALL_TIMEOUT, async {
            let mut listener = PgListener::connect_with(&self.pool).await?;
            listener
                .listen_all([CHANGED_CHANNEL, APPENDED_CHANNEL])
                .await?;
            Ok(ChangeListener { listener })
        })
        .await
    }

    pub async fn close(&self) {
        self.write_pool.close().await;
        self.lease_pool.close().await;
        self.pool.close().await;
    }
}

/// Announcements of sagas changed by requests, and of what commits appended.
pub struct ChangeListener {
    listener: PgListener,
}

/// What a [`ChangeListener`] heard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A request (a cancel, a retry) changed this saga.
    Requested(Uuid),
    /// A commit appended to these sagas, which are now at these versions.
    Appended(Vec<(Uuid, u64)>),
    /// The connection was lost and is back: what was announced meanwhile is lost, so whoever
    /// follows sagas should read them again.
    Reconnected,
}

impl ChangeListener {
    /// The next change heard.
    pub async fn next(&mut self) -> Result<Change> {
        loop {
            let Some(notification) = self.listener.try_recv().await? else {
                return Ok(Change::Reconnected);
            };
            let payload = notification.payload();
            if notification.channel() == APPENDED_CHANNEL {
                let appended: Vec<(Uuid, u64)> = payload
                    .split(',')
                    .filter_map(|entry| {
                        let (id, version) = entry.split_once(':')?;
                        Some((id.parse().ok()?, version.parse().ok()?))
                    })
                    .collect();
                if !appended.is_empty() {
                    return Ok(Change::Appended(appended));
                }
            } else if let Ok(saga_id) = payload.parse() {
                return Ok(Change::Requested(saga_id));
            }
        }
    }
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A write with its JSON as text: encoded before the batch's statement, so that a value that
/// cannot be encoded fails its own write only, and sent as text, which Postgres parses once as
/// it would the binary form, without a tree of values built and copied on the way.
struct EncodedWrite<'w> {
    write: &'w SagaWrite,
    events: Vec<String>,
    steps: String,
    /// Only a start writes the input.
    input: Option<String>,
}

impl<'w> EncodedWrite<'w> {
    fn of(write: &'w SagaWrite) -> std::result::Result<Self, serde_json::Error> {
        Ok(Self {
            write,
            events: write
                .events
                .iter()
                .map(format::encode_event)
                .collect::<std::result::Result<_, _>>()?,
            steps: serde_json::to_string(&write.projection.steps)?,
            input: if write.expected_version == 0 {
                Some(serde_json::to_string(&write.projection.input)?)
            } else {
                None
            },
        })
    }
}

/// The read-model columns of a batch's writes, as arrays for `unnest`, borrowed from them.
struct RowColumns<'w> {
    ids: Vec<Uuid>,
    expected: Vec<i64>,
    writers: Vec<Uuid>,
    owner_only: Vec<bool>,
    statuses: Vec<&'static str>,
    steps: Vec<&'w str>,
    failure_reasons: Vec<Option<&'w str>>,
    versions: Vec<i64>,
    wake_ats: Vec<Option<DateTime<Utc>>>,
    failing_sinces: Vec<Option<DateTime<Utc>>>,
}

impl<'w> RowColumns<'w> {
    fn of(writes: &[&'w EncodedWrite<'w>]) -> Self {
        let projections = writes.iter().map(|w| &w.write.projection);
        Self {
            ids: writes.iter().map(|w| w.write.saga_id).collect(),
            expected: writes
                .iter()
                .map(|w| to_i64(w.write.expected_version))
                .collect(),
            writers: writes.iter().map(|w| w.write.replica_id).collect(),
            owner_only: writes
                .iter()
                .map(|w| w.write.fence == Fence::Owner)
                .collect(),
            statuses: projections.clone().map(|p| p.status.as_str()).collect(),
            steps: writes.iter().map(|w| w.steps.as_str()).collect(),
            failure_reasons: projections
                .clone()
                .map(|p| p.failure_reason.as_deref())
                .collect(),
            versions: projections.clone().map(|p| to_i64(p.version)).collect(),
            wake_ats: projections.clone().map(|p| p.wake_at).collect(),
            failing_sinces: projections.map(|p| p.failing_since).collect(),
        }
    }
}

/// The columns of the sagas a batch starts: their rows' and what only a start writes.
struct StartColumns<'w> {
    row: RowColumns<'w>,
    saga_types: Vec<&'w str>,
    definition_versions: Vec<i32>,
    inputs: Vec<&'w str>,
    correlation_ids: Vec<&'w str>,
    idempotency_keys: Vec<Option<&'w str>>,
}

impl<'w> StartColumns<'w> {
    fn of(writes: &[&'w EncodedWrite<'w>]) -> Self {
        let projections = writes.iter().map(|w| &w.write.projection);
        Self {
            row: RowColumns::of(writes),
            saga_types: projections.clone().map(|p| p.saga_type.as_str()).collect(),
            definition_versions: projections
                .clone()
                .map(|p| i32::try_from(p.definition_version).unwrap_or(i32::MAX))
                .collect(),
            inputs: writes
                .iter()
                .map(|w| w.input.as_deref().unwrap_or("null"))
                .collect(),
            correlation_ids: projections
                .clone()
                .map(|p| p.correlation_id.as_str())
                .collect(),
            idempotency_keys: projections.map(|p| p.idempotency_key.as_deref()).collect(),
        }
    }
}

/// The events of a batch, as arrays for `unnest`, borrowed from its writes.
#[derive(Default)]
struct EventColumns<'w> {
    saga_ids: Vec<Uuid>,
    seqs: Vec<i64>,
    types: Vec<&'static str>,
    steps: Vec<Option<&'w str>>,
    datas: Vec<&'w str>,
    replicas: Vec<Uuid>,
}

impl<'w> EventColumns<'w> {
    fn push(&mut self, encoded: &'w EncodedWrite<'w>) {
        let write = encoded.write;
        for (offset, (event, data)) in write.events.iter().zip(&encoded.events).enumerate() {
            self.saga_ids.push(write.saga_id);
            self.replicas.push(write.replica_id);
            self.seqs
                .push(to_i64(write.expected_version) + 1 + to_i64(offset as u64));
            self.types.push(event.type_name());
            self.steps.push(event.step());
            self.datas.push(data);
        }
    }
}

struct SagaRow {
    saga_id: Uuid,
    saga_type: String,
    definition_version: i32,
    status: String,
    input: Value,
    steps: Value,
    failure_reason: Option<String>,
    version: i64,
    correlation_id: String,
    idempotency_key: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    wake_at: Option<DateTime<Utc>>,
    failing_since: Option<DateTime<Utc>>,
}

impl SagaRow {
    fn into_record(self) -> Result<SagaRecord> {
        let corrupt = |message: String| StoreError::CorruptLog {
            saga_id: self.saga_id,
            seq: self.version,
            message,
        };
        let status = SagaStatus::parse(&self.status)
            .ok_or_else(|| corrupt(format!("unknown status {:?}", self.status)))?;
        let steps: Vec<StepView> = serde_json::from_value(self.steps.clone())
            .map_err(|error| corrupt(format!("steps: {error}")))?;
        Ok(SagaRecord {
            saga_id: self.saga_id,
            projection: Projection {
                saga_type: self.saga_type,
                definition_version: u32::try_from(self.definition_version).unwrap_or_default(),
                status,
                input: Arc::new(self.input),
                steps,
                failure_reason: self.failure_reason,
                version: u64::try_from(self.version).unwrap_or_default(),
                correlation_id: self.correlation_id,
                idempotency_key: self.idempotency_key,
                wake_at: self.wake_at,
                failing_since: self.failing_since,
            },
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}
