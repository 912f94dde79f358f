//! The engine is a thin shell around the saga core: it records new sagas, drives each one (ask
//! the core what to do, make the one participant call, append the outcome, repeat), takes over
//! the sagas no live replica drives, and answers queries through the store. A saga accepted
//! here is driven here at once, in memory, while this replica's lease lives; only retries wait
//! on a timer, and that timer is in the database. A retry further off than two poll intervals
//! is waited for there alone: the saga is parked (nobody owns it) until a sweep claims it.

mod driver;
mod lease;
mod participants;
mod takeover;
mod watch;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::definition::DefinitionSet;
use crate::document::{self, shorten};
use crate::saga::{CannotCancel, CannotRetry, Event, Saga, SagaStatus};
use crate::store::{
    EventRecord, Fence, ListFilter, Overview, Projection, SagaRecord, SagaWrite, Store, StoreError,
    WriteOutcome, Writer,
};

pub use lease::LeaseTiming;
use lease::{Lease, Tenure};
pub use participants::{BadParticipantAddress, Participants};

/// The largest saga input accepted, in bytes of JSON.
pub const MAX_INPUT_BYTES: usize = 256 * 1024;
/// The longest reason of a cancel or a retry: it is stored in the log and shown with the saga.
pub const MAX_REASON_BYTES: usize = 1024;

/// Why the engine refused or could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unknown saga type {0:?}")]
    UnknownSagaType(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("idempotency key {key:?} was already used for saga {saga_id} with a different input")]
    IdempotencyKeyReused { key: String, saga_id: Uuid },
    #[error("saga {0} not found")]
    NotFound(Uuid),
    #[error("{0}")]
    NotCancellable(#[from] CannotCancel),
    #[error("{0}")]
    NotRetryable(#[from] CannotRetry),
    #[error("saga {saga_id} did not reach version {min_version} in time (it is at {version})")]
    VersionNotReached {
        saga_id: Uuid,
        min_version: u64,
        version: u64,
    },
    #[error("the saga {0} was changed by others too often; try again")]
    Contended(Uuid),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("corrupt saga log for {saga_id}: {message}")]
    CorruptLog { saga_id: Uuid, message: String },
    #[error("sagad is shutting down; try another replica or again later")]
    ShuttingDown,
}

/// A request to start a saga, as the API parsed it.
#[derive(Debug, Clone)]
pub struct StartRequest {
    pub saga_type: String,
    /// Empty: every call makes a new saga.
    pub idempotency_key: String,
    pub input: Value,
    pub correlation_id: String,
    /// The W3C `traceparent` the saga's spans descend from.
    pub trace_parent: Option<String>,
}

/// The active sagas of the database, as the sampled gauges show them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Activity {
    /// RUNNING and COMPENSATING sagas, by type and status.
    pub active: Vec<(String, SagaStatus, i64)>,
    /// Of those, the stuck ones (see `--stuck-after`).
    pub stuck: i64,
    /// How long ago the oldest of them started.
    pub oldest_active_age: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct Started {
    /// `false` when the idempotency key named a saga that already existed.
    pub created: bool,
    pub record: SagaRecord,
}

/// The running engine; cloning it is cheap.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    writer: Writer,
    definitions: DefinitionSet,
    participants: Participants,
    lease: Lease,
    /// How long a step may keep failing before its saga counts as stuck.
    stuck_after: Duration,
    watches: watch::Watches,
    /// The sagas driven by this instance.
    drivers: Mutex<HashMap<Uuid, Driven>>,
    /// Sagas whose driver gave up on a log it cannot carry on (said in the log at the time):
    /// the sweep does not start them again and again.
    abandoned: Mutex<HashSet<Uuid>>,
    /// Rung to make the sweep for orphaned sagas run now.
    sweep_now: Notify,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// The lease, sweep and notification loops; they end with `shutdown`.
    background: TaskTracker,
}

/// A saga's driver: the bell that interrupts its wait or call, and the replica id it drives
/// under.
struct Driven {
    bell: Arc<Notify>,
    replica_id: Uuid,
    /// The newest version its driver knows to be in the database; `u64::MAX` until it has
    /// read the saga.
    stored: Arc<AtomicU64>,
}

impl Engine {
    /// Registers this process as a replica, takes over the sagas no live replica drives (their
    /// in-flight calls are re-sent with the same keys), and starts the loops that keep the
    /// lease, take over sagas later, and hear about requests made on other replicas. Returns
    /// the engine and how many sagas it took over at start.
    pub async fn start(
        store: Store,
        writer: Writer,
        definitions: DefinitionSet,
        participants: Participants,
        timing: LeaseTiming,
        stuck_after: Duration,
    ) -> Result<(Engine, usize), EngineError> {
        let since = tokio::time::Instant::now();
        let replica_id = store.register_replica(timing.ttl).await?;
        tracing::info!(%replica_id, ttl = ?timing.ttl, "registered as a replica");
        let engine = Engine {
            inner: Arc::new(Inner {
                store,
                writer,
                definitions,
                participants,
                lease: Lease::new(timing, replica_id, since),
                stuck_after,
                watches: watch::Watches::new(),
                drivers: Mutex::new(HashMap::new()),
                abandoned: Mutex::new(HashSet::new()),
                sweep_now: Notify::new(),
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
                background: TaskTracker::new(),
            }),
        };
        let unknown = engine.inner.store.release_unknown_owners().await?;
        if unknown > 0 {
            tracing::info!(
                released = unknown,
                "let go of sagas whose owner is no replica"
            );
        }
        let resumed = engine.take_over_orphans().await?;
        takeover::spawn_background(&engine);
        Ok((engine, resumed))
    }

    /// Records a new saga durably and starts driving it; answers only after the commit.
    pub async fn start_saga(&self, request: StartRequest) -> Result<Started, EngineError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(EngineError::ShuttingDown);
        }
        let definition = self
            .inner
            .definitions
            .newest(&request.saga_type)
            .ok_or_else(|| EngineError::UnknownSagaType(shorten(&request.saga_type, 100)))?;
        validate_input(&request.input, &definition.required_input)?;
        self.inner
            .definitions
            .check_input(&definition, &request.input)
            .map_err(|mismatch| EngineError::InvalidInput(mismatch.to_string()))?;
        let key = request.idempotency_key.clone();
        if !key.is_empty()
            && let Some(existing) = self
                .inner
                .store
                .find_by_idempotency_key(&request.saga_type, &key)
                .await?
        {
            return same_start(existing, &request);
        }

        let saga_id = Uuid::now_v7();
        let correlation_id = if request.correlation_id.is_empty() {
            saga_id.to_string()
        } else {
            request.correlation_id.clone()
        };
        let started = Event::SagaStarted {
            saga_type: request.saga_type.clone(),
            definition: Arc::clone(&definition),
            input: Arc::new(request.input.clone()),
            correlation_id,
            idempotency_key: key.clone(),
            trace_parent: request.trace_parent.clone(),
        };
        let saga = Saga::started(saga_id, &started).map_err(|error| EngineError::CorruptLog {
            saga_id,
            message: error.to_string(),
        })?;
        // From here on the work runs in a task of its own, which the request only waits for:
        // a client that goes away once the write is queued must not leave a saga recorded
        // with nobody to drive it.
        let engine = self.clone();
        self.inner
            .tasks
            .spawn(async move { engine.record_start(saga, started, request).await })
            .await
            .map_err(|_| EngineError::ShuttingDown)?
    }

    /// Commits a new saga's first event and starts its driver.
    async fn record_start(
        &self,
        saga: Saga,
        started: Event,
        request: StartRequest,
    ) -> Result<Started, EngineError> {
        let saga_id = saga.id;
        let tenure = self.inner.lease.tenure();
        let write = SagaWrite {
            saga_id,
            expected_version: 0,
            replica_id: tenure.replica_id,
            fence: Fence::Owner,
            events: vec![started],
            projection: projection(&saga),
        };
        match self.inner.writer.write(write).await? {
            WriteOutcome::Written => {
                metrics::counter!("sagad_sagas_started_total", "saga_type" => request.saga_type.clone())
                    .increment(1);
                let now = Utc::now();
                let record = SagaRecord {
                    saga_id,
                    projection: projection(&saga),
                    created_at: now,
                    updated_at: now,
                };
                self.drive(saga, tenure);
                Ok(Started {
                    created: true,
                    record,
                })
            }
            // Another start with this key won the race.
            WriteOutcome::Conflict | WriteOutcome::Fenced => {
                let existing = self
                    .inner
                    .store
                    .find_by_idempotency_key(&request.saga_type, &request.idempotency_key)
                    .await?
                    .ok_or(EngineError::Contended(saga_id))?;
                same_start(existing, &request)
            }
        }
    }

    /// The saga's read model; with `min_version`, waits up to `wait` for it to get there. A
    /// version this replica's writer commits is answered from that commit, without reading
    /// the row (one record shared by every long-poll waiting for it).
    pub async fn get_saga(
        &self,
        saga_id: Uuid,
        min_version: u64,
        wait: Duration,
    ) -> Result<Arc<SagaRecord>, EngineError> {
        if min_version == 0 {
            return Ok(Arc::new(self.read_model(saga_id).await?));
        }
        let deadline = tokio::time::Instant::now() + wait;
        // Waiting from before the first read: a commit between the two is not missed.
        let mut commit = self.inner.writer.wait_for(saga_id, min_version);
        // A version this replica's driver has not yet stored cannot be in the database (short of
        // a request recorded by another replica, which the driver reads when its own write of
        // that version is refused, or when it is told): the read is skipped, and the commit that
        // brings the version answers the wait.
        let mut read_first = !self.awaits_own_write(saga_id, min_version);
        let mut timed_out = false;
        loop {
            if read_first || timed_out {
                let record = self.read_model(saga_id).await?;
                let version = record.projection.version;
                if version >= min_version {
                    return Ok(Arc::new(record));
                }
                if timed_out || tokio::time::Instant::now() >= deadline {
                    return Err(EngineError::VersionNotReached {
                        saga_id,
                        min_version,
                        version,
                    });
                }
            }
            // Answered by this instance's commits; the short tick covers writes by other
            // instances, so it reads only when this replica's driver is not the one to write
            // the version (it is not driving the saga, or knows the version to be stored by
            // someone else). At shutdown the wait ends at once: the client is told to ask
            // another replica.
            if self.inner.shutdown.is_cancelled() {
                return Err(EngineError::ShuttingDown);
            }
            let shutdown = self.inner.shutdown.clone();
            let woken = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    record = commit.answered() => Some(record),
                    () = tokio::time::sleep(Duration::from_millis(250)) => None,
                    () = shutdown.cancelled() => None,
                }
            })
            .await;
            match woken {
                Ok(Some(record)) => return Ok(record),
                Ok(None) => read_first = !self.awaits_own_write(saga_id, min_version),
                Err(_) => timed_out = true,
            }
        }
    }

    /// The saga's read model as the database has it now.
    async fn read_model(&self, saga_id: Uuid) -> Result<SagaRecord, EngineError> {
        self.inner
            .store
            .get_saga(saga_id)
            .await?
            .ok_or(EngineError::NotFound(saga_id))
    }

    /// Whether this replica drives the saga and its driver does not know `version` to be in
    /// the database yet: it is writing it (its commit will answer) or has not got there.
    fn awaits_own_write(&self, saga_id: Uuid, version: u64) -> bool {
        self.inner.drivers.lock().is_ok_and(|drivers| {
            drivers
                .get(&saga_id)
                .is_some_and(|driven| driven.stored.load(Ordering::SeqCst) < version)
        })
    }

    /// Whether this replica can do its work: its lease is trusted, which needs the database.
    pub fn ready(&self) -> bool {
        let tenure = self.inner.lease.tenure();
        !self.inner.shutdown.is_cancelled() && self.inner.lease.holds(&tenure)
    }

    /// Sagas whose step has been failing since before this time are stuck.
    pub fn stuck_cutoff(&self) -> DateTime<Utc> {
        let stuck_after =
            chrono::Duration::from_std(self.inner.stuck_after).unwrap_or(chrono::Duration::MAX);
        Utc::now()
            .checked_sub_signed(stuck_after)
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    /// Counts the active sagas of the whole database (every replica's), for the gauges.
    pub async fn sample_activity(&self) -> Result<Activity, EngineError> {
        let activity = self.inner.store.activity(self.stuck_cutoff()).await?;
        Ok(Activity {
            active: activity.active,
            stuck: activity.stuck,
            oldest_active_age: activity
                .oldest_started_at
                .map(|started| (Utc::now() - started).to_std().unwrap_or_default()),
        })
    }

    /// Up to `limit` events of the saga's history after seq `after` and up to seq `through`
    /// (the version of the row an answer shows, so that the two agree even when the saga moved
    /// on between the reads), in order.
    pub async fn history_page(
        &self,
        saga_id: Uuid,
        after: u64,
        through: u64,
        limit: u32,
    ) -> Result<Vec<EventRecord>, EngineError> {
        Ok(self
            .inner
            .store
            .history_after(saga_id, after, through, Some(limit))
            .await?)
    }

    /// Every saga counted by type and status, and the sagas ended per minute since `since`.
    pub async fn overview(&self, since: DateTime<Utc>) -> Result<Overview, EngineError> {
        Ok(self.inner.store.overview(since).await?)
    }

    /// Up to `limit` sagas a person must look at (FAILED or stuck), the longest waiting first.
    pub async fn needing_attention(&self, limit: u32) -> Result<Vec<SagaRecord>, EngineError> {
        Ok(self
            .inner
            .store
            .needing_attention(self.stuck_cutoff(), limit)
            .await?)
    }

    /// The definitions this replica loaded: what it starts new sagas with.
    pub fn definitions(&self) -> &DefinitionSet {
        &self.inner.definitions
    }

    pub async fn list_sagas(&self, filter: &ListFilter) -> Result<Vec<SagaRecord>, EngineError> {
        Ok(self.inner.store.list_sagas(filter).await?)
    }

    /// Stops a running saga going forward and has it compensate, the step in flight first;
    /// `requested_by` says who asked, for the history. A saga already compensating is left as
    /// it is; an ended one is refused.
    pub async fn cancel_saga(
        &self,
        saga_id: Uuid,
        reason: &str,
        requested_by: &str,
    ) -> Result<SagaRecord, EngineError> {
        const ATTEMPTS: usize = 20;
        for _ in 0..ATTEMPTS {
            let saga = self.load(saga_id).await?;
            let events = saga.cancel(reason, requested_by, Utc::now())?;
            if events.is_empty() {
                break;
            }
            // Any replica may record a cancel; the owner is told to read the log again. A
            // saga nobody drives (parked until a retry an hour away) is due now: the sweep
            // claims it at once rather than at its next round.
            let written = self
                .record_request(&saga, events, move |engine| {
                    if !engine.ring(saga_id) {
                        engine.inner.sweep_now.notify_one();
                    }
                })
                .await?;
            match written {
                WriteOutcome::Written => break,
                // The driver recorded an outcome first: read again and decide again.
                WriteOutcome::Conflict | WriteOutcome::Fenced => tokio::task::yield_now().await,
            }
        }
        let record = self.read_model(saga_id).await?;
        if record.projection.status == crate::saga::SagaStatus::Running {
            return Err(EngineError::Contended(saga_id));
        }
        Ok(record)
    }

    /// Resumes the compensation of a FAILED saga, the steps in `skip` recorded as compensated
    /// by hand; `requested_by` says who asked, for the history. The saga's owner (or, if it
    /// has none alive, any replica) drives it on from its next sweep.
    pub async fn retry_saga(
        &self,
        saga_id: Uuid,
        reason: &str,
        requested_by: &str,
        skip: &[String],
    ) -> Result<SagaRecord, EngineError> {
        let saga = self.load(saga_id).await?;
        let events = saga.retry(reason, requested_by, skip, Utc::now())?;
        let written = self
            .record_request(&saga, events, |engine| engine.inner.sweep_now.notify_one())
            .await?;
        if written != WriteOutcome::Written {
            // Someone else retried it first, or it moved: the caller may look and ask again.
            return Err(EngineError::Contended(saga_id));
        }
        tracing::info!(%saga_id, %requested_by, reason, skipped = ?skip, "saga retried");
        self.read_model(saga_id).await
    }

    /// Appends the events of a request (a cancel, a retry) to `saga`, as it stands, then runs
    /// `then` if they were written. In a task of its own, like a start, which the request only
    /// waits for: a request recorded is a request carried out, whatever becomes of the caller.
    async fn record_request(
        &self,
        saga: &Saga,
        events: Vec<Event>,
        then: impl FnOnce(&Engine) + Send + 'static,
    ) -> Result<WriteOutcome, EngineError> {
        let mut next = saga.clone();
        for event in &events {
            next.apply(event).map_err(|error| EngineError::CorruptLog {
                saga_id: saga.id,
                message: error.to_string(),
            })?;
        }
        let write = SagaWrite {
            saga_id: saga.id,
            expected_version: saga.version,
            replica_id: self.inner.lease.tenure().replica_id,
            fence: Fence::Request,
            events,
            projection: projection(&next),
        };
        let engine = self.clone();
        self.inner
            .tasks
            .spawn(async move {
                let outcome = engine.inner.writer.write(write).await;
                if matches!(outcome, Ok(WriteOutcome::Written)) {
                    then(&engine);
                }
                outcome
            })
            .await
            .map_err(|_| EngineError::ShuttingDown)?
            .map_err(EngineError::from)
    }

    /// Stops taking work, at once: no new saga is started, no new call is made, and every
    /// `GetSaga` waiting for a version ends now (answered UNAVAILABLE).
    pub fn stop_taking_work(&self) {
        self.inner.shutdown.cancel();
    }

    /// Stops taking work ([`Engine::stop_taking_work`]) and lets the calls in flight finish and
    /// be recorded, for up to `drain`. Then the replica lets its sagas go, so another replica (or
    /// the next start) takes them over at once instead of after the lease.
    pub async fn shutdown(&self, drain: Duration) {
        self.stop_taking_work();
        self.inner.tasks.close();
        self.inner.background.close();
        if tokio::time::timeout(drain, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some sagas were still in flight at shutdown; they are let go");
        }
        self.inner.background.wait().await;
        let replica_id = self.inner.lease.lose();
        match self.inner.store.retire_replica(replica_id).await {
            Ok(released) => tracing::info!(%replica_id, released, "let go of the unfinished sagas"),
            Err(error) => tracing::warn!(
                %replica_id, %error,
                "cannot let go of the sagas; they are taken over once the lease expires"
            ),
        }
    }

    /// Sagas being driven by this instance right now.
    pub fn active_sagas(&self) -> usize {
        self.inner
            .drivers
            .lock()
            .map(|drivers| drivers.len())
            .unwrap_or(0)
    }

    async fn load(&self, saga_id: Uuid) -> Result<Saga, EngineError> {
        let log = self.inner.store.load_log(saga_id).await?;
        if log.events.is_empty() {
            return Err(EngineError::NotFound(saga_id));
        }
        let mut saga =
            Saga::replay(saga_id, &log.events).map_err(|error| EngineError::CorruptLog {
                saga_id,
                message: error.to_string(),
            })?;
        saga.restore_unlogged(&log.steps);
        Ok(saga)
    }

    /// Claims what no live replica drives and drives it, and drives what this replica owns
    /// with no driver. Returns how many sagas it started driving.
    async fn take_over_orphans(&self) -> Result<usize, EngineError> {
        /// Claimed per sweep, so replicas sweeping at once share the work.
        const CLAIM_BATCH: u32 = 64;
        /// Looked at per sweep among this replica's overdue sagas, most of them driven.
        const OVERDUE_BATCH: u32 = 256;
        let tenure = self.inner.lease.tenure();
        if !self.inner.lease.holds(&tenure) {
            return Ok(0);
        }
        let horizon = self.inner.lease.timing().poll_interval;
        let released = self.inner.store.reap_dead_replicas().await?;
        if released > 0 {
            tracing::info!(
                released,
                "let go of the sagas of replicas whose lease expired"
            );
        }
        let claimed = self
            .inner
            .store
            .claim_orphans(tenure.replica_id, CLAIM_BATCH, horizon)
            .await?;
        if !claimed.is_empty() {
            tracing::info!(claimed = claimed.len(), "took over sagas");
            metrics::counter!("sagad_sagas_taken_over_total").increment(claimed.len() as u64);
        }
        for saga_id in &claimed {
            self.drive_claimed(*saga_id, tenure.clone());
        }

        // The safety net: a saga this replica owns is driven here, whatever happened to the
        // request or the task that was to start its driver.
        let overdue = self
            .inner
            .store
            .owned_overdue(tenure.replica_id, horizon, OVERDUE_BATCH)
            .await?;
        let undriven: Vec<Uuid> = {
            let (Ok(drivers), Ok(abandoned)) =
                (self.inner.drivers.lock(), self.inner.abandoned.lock())
            else {
                return Ok(claimed.len());
            };
            overdue
                .into_iter()
                .filter(|saga_id| {
                    !abandoned.contains(saga_id)
                        && drivers
                            .get(saga_id)
                            .is_none_or(|driven| driven.replica_id != tenure.replica_id)
                })
                .collect()
        };
        if !undriven.is_empty() {
            tracing::warn!(
                sagas = undriven.len(),
                "driving sagas of this replica that had no driver"
            );
        }
        for saga_id in &undriven {
            self.drive_claimed(*saga_id, tenure.clone());
        }
        Ok(claimed.len() + undriven.len())
    }

    /// Marks a saga whose driver gave up on it, so the sweep leaves it be.
    fn abandon(&self, saga_id: Uuid) {
        if let Ok(mut abandoned) = self.inner.abandoned.lock() {
            abandoned.insert(saga_id);
        }
    }

    /// Interrupts the saga's driver, if this replica drives it, so it reads the log again.
    /// `false`: this replica has no driver for it.
    fn ring(&self, saga_id: Uuid) -> bool {
        let bell = self
            .inner
            .drivers
            .lock()
            .ok()
            .and_then(|drivers| drivers.get(&saga_id).map(|driven| driven.bell.clone()));
        match bell {
            Some(bell) => {
                bell.notify_one();
                true
            }
            None => false,
        }
    }

    /// Interrupts every driver: announcements may have been missed.
    fn ring_all(&self) {
        let bells: Vec<Arc<Notify>> = match self.inner.drivers.lock() {
            Ok(drivers) => drivers.values().map(|driven| driven.bell.clone()).collect(),
            Err(_) => return,
        };
        for bell in bells {
            bell.notify_one();
        }
    }

    /// Starts driving a saga under `tenure` unless it is already driven under it. A driver of
    /// a lost tenure is replaced.
    fn drive(&self, saga: Saga, tenure: Tenure) {
        let (saga_id, version) = (saga.id, saga.version);
        self.spawn_driver(saga_id, tenure, version, async move { Some(saga) });
    }

    /// Drives a saga just claimed, reading its log first.
    fn drive_claimed(&self, saga_id: Uuid, tenure: Tenure) {
        let engine = self.clone();
        let lost = tenure.lost.clone();
        self.spawn_driver(saga_id, tenure, u64::MAX, async move {
            driver::load_retrying(&engine, saga_id, &lost).await
        });
    }

    /// `known_version` is the version of the saga in hand (`u64::MAX` while it is still to be
    /// read): long-polls for a later one wait for the driver's commit without reading first,
    /// even before the driver's task has run.
    fn spawn_driver(
        &self,
        saga_id: Uuid,
        tenure: Tenure,
        known_version: u64,
        saga: impl Future<Output = Option<Saga>> + Send + 'static,
    ) {
        if self.inner.shutdown.is_cancelled() {
            return;
        }
        let bell = Arc::new(Notify::new());
        let stored = Arc::new(AtomicU64::new(known_version));
        {
            let Ok(mut drivers) = self.inner.drivers.lock() else {
                return;
            };
            if drivers
                .get(&saga_id)
                .is_some_and(|driven| driven.replica_id == tenure.replica_id)
            {
                return;
            }
            drivers.insert(
                saga_id,
                Driven {
                    bell: bell.clone(),
                    replica_id: tenure.replica_id,
                    stored: stored.clone(),
                },
            );
        }
        let engine = self.clone();
        metrics::gauge!("sagad_sagas_driven").increment(1.0);
        // Every line logged while driving names the saga.
        let span = tracing::info_span!("saga", %saga_id, correlation_id = tracing::field::Empty);
        self.inner.tasks.spawn(
            async move {
                if let Some(saga) = saga.await {
                    tracing::Span::current().record("correlation_id", saga.correlation_id.as_str());
                    driver::drive(&engine, saga, &bell, &tenure, &stored).await;
                }
                if let Ok(mut drivers) = engine.inner.drivers.lock()
                    && drivers
                        .get(&saga_id)
                        .is_some_and(|driven| Arc::ptr_eq(&driven.bell, &bell))
                {
                    drivers.remove(&saga_id);
                }
                metrics::gauge!("sagad_sagas_driven").decrement(1.0);
            }
            .instrument(span),
        );
    }
}

/// The read model of a saga as the core has it.
fn projection(saga: &Saga) -> Projection {
    Projection {
        saga_type: saga.saga_type.clone(),
        definition_version: saga.definition.version,
        status: saga.status(),
        input: saga.input.clone(),
        steps: saga.step_views(),
        failure_reason: saga.failure_reason.clone(),
        version: saga.version,
        correlation_id: saga.correlation_id.clone(),
        idempotency_key: Some(saga.idempotency_key.clone()).filter(|key| !key.is_empty()),
        wake_at: saga.wake_at(Utc::now()),
        failing_since: saga.failing_since(),
    }
}

fn validate_input(input: &Value, required: &[String]) -> Result<(), EngineError> {
    let Value::Object(fields) = input else {
        return Err(EngineError::InvalidInput(
            "input must be an object".to_owned(),
        ));
    };
    document::check_size(input, MAX_INPUT_BYTES, "input")
        .map_err(|error| EngineError::InvalidInput(error.to_string()))?;
    for field in required {
        if fields.get(field).is_none_or(Value::is_null) {
            return Err(EngineError::InvalidInput(format!(
                "input.{field}: missing, and the saga type requires it"
            )));
        }
    }
    Ok(())
}

/// A repeated start: the same saga if the input is the same, a refusal if not.
fn same_start(existing: SagaRecord, request: &StartRequest) -> Result<Started, EngineError> {
    if same_json(&existing.projection.input, &request.input) {
        Ok(Started {
            created: false,
            record: existing,
        })
    } else {
        Err(EngineError::IdempotencyKeyReused {
            key: shorten(&request.idempotency_key, 100),
            saga_id: existing.saga_id,
        })
    }
}

/// JSON equality that holds across the database's number round trip (`1` and `1.0` are equal).
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(xs), Value::Array(ys)) => {
            xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(xs), Value::Object(ys)) => {
            xs.len() == ys.len()
                && xs
                    .iter()
                    .all(|(key, x)| ys.get(key).is_some_and(|y| same_json(x, y)))
        }
        _ => a == b,
    }
}
