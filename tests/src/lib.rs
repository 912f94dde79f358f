//! Support for sagad's integration and end-to-end tests: fresh Postgres databases, scripted
//! participant servers that record every call, sagad in-process or as a real process, client
//! helpers, and a headless Chromium for the explorer's pages. Each test gets its own database
//! and ports, so tests run in parallel.

pub mod browser;
pub mod cli;
pub mod daemon;
pub mod database;
pub mod demo;
pub mod http;
pub mod metrics;
pub mod otlp;
pub mod participant;
pub mod postgres;
pub mod signals;
pub mod tls;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sagad_proto::v1::saga_orchestrator_client::SagaOrchestratorClient;
use sagad_proto::v1::{GetSagaRequest, ListSagasRequest, Saga, SagaStatus, StartSagaRequest};
use serde_json::Value;
use sqlx::postgres::PgConnection;
use tonic::transport::Channel;

pub use daemon::{SagadProcess, TestDaemon};
pub use database::{DatabaseGuard, TestDatabase};
pub use participant::{Answer, CallKind, CallRecord, FakeParticipant, Reply, call_trace};

/// The client the tests drive sagad with.
pub type Client = SagaOrchestratorClient<Channel>;

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// A folder of its own for one test (definitions, logs), under the system temp dir; a test
/// holds it as a [`Scratch`], which removes it.
fn scratch_dir(label: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "sagad-test-{label}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// A port nobody listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// JSON to the wire's Struct.
pub fn to_struct(value: Value) -> pbjson_types::Struct {
    serde_json::from_value(value).unwrap_or_default()
}

/// The wire's Struct to JSON.
pub fn to_json(value: &Option<pbjson_types::Struct>) -> Value {
    value
        .as_ref()
        .and_then(|value| serde_json::to_value(value).ok())
        .unwrap_or(Value::Null)
}

/// A `[[token]]` entry of a `--auth-tokens` file: the token's name, role and SHA-256.
pub fn token_entry(name: &str, role: &str, token: &str) -> String {
    format!(
        "[[token]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n",
        sagad::auth::token_hash(token)
    )
}

/// A request carrying `authorization: Bearer <token>`, or no token.
pub fn with_token<T>(message: T, token: Option<&str>) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
    }
    Ok(request)
}

/// Starts a saga and returns its id.
pub async fn start_saga(
    client: &mut Client,
    saga_type: &str,
    input: Value,
) -> anyhow::Result<String> {
    let response = client
        .start_saga(StartSagaRequest {
            saga_type: saga_type.to_owned(),
            idempotency_key: String::new(),
            input: Some(to_struct(input)),
            correlation_id: String::new(),
        })
        .await?
        .into_inner();
    Ok(response.saga_id)
}

pub fn is_terminal(status: i32) -> bool {
    matches!(
        SagaStatus::try_from(status),
        Ok(SagaStatus::Completed | SagaStatus::Compensated | SagaStatus::Failed)
    )
}

/// Polls until the saga has ended; the generous deadline keeps a loaded 2-core box from flaking.
pub async fn wait_terminal(
    client: &mut Client,
    saga_id: &str,
    deadline: Duration,
) -> anyhow::Result<Saga> {
    wait_until(client, saga_id, deadline, |saga| is_terminal(saga.status)).await
}

/// Polls until `done` holds for the saga.
pub async fn wait_until(
    client: &mut Client,
    saga_id: &str,
    deadline: Duration,
    done: impl Fn(&Saga) -> bool,
) -> anyhow::Result<Saga> {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let saga = get_saga(client, saga_id).await?;
        if done(&saga) {
            return Ok(saga);
        }
        if tokio::time::Instant::now() > until {
            bail!(
                "saga {saga_id} did not get there within {deadline:?}: status {:?}, steps {:?}",
                SagaStatus::try_from(saga.status),
                saga.steps
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A folder this test made (definitions, logs), removed when the test is done with it; kept
/// after a failed assertion or when [`keep`](Scratch::keep) was called, for the logs.
pub struct Scratch {
    path: PathBuf,
    keep: bool,
}

impl Scratch {
    /// A folder holding the given files (name, text).
    pub fn with_files(label: &str, files: &[(&str, &str)]) -> anyhow::Result<Self> {
        let scratch = Self {
            path: scratch_dir(label)?,
            keep: false,
        };
        for (name, text) in files {
            let path = scratch.path.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(scratch)
    }

    /// A folder holding the given definition files.
    pub fn defs(files: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::with_files("defs", files)
    }

    /// An empty folder, for the logs of the processes a test runs.
    pub fn logs(label: &str) -> anyhow::Result<Self> {
        Self::with_files(label, &[])
    }

    /// Leaves the folder in place: the test failed and its logs explain why.
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.keep && !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// GetSaga without waiting.
pub async fn get_saga(client: &mut Client, saga_id: &str) -> anyhow::Result<Saga> {
    Ok(client
        .get_saga(GetSagaRequest {
            saga_id: saga_id.to_owned(),
            min_version: 0,
            wait_ms: 0,
            ..Default::default()
        })
        .await?
        .into_inner())
}

/// The newest 1000 sagas (one full page), as `ListSagas` has them.
pub async fn list_newest(client: &mut Client) -> anyhow::Result<Vec<Saga>> {
    Ok(client
        .list_sagas(ListSagasRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .sagas)
}

/// Polls `ListSagas` until every saga in `ids` has ended, then returns each as `GetSaga` has it.
pub async fn wait_all_terminal(
    client: &mut Client,
    ids: &BTreeSet<String>,
    deadline: Duration,
) -> anyhow::Result<BTreeMap<String, Saga>> {
    let until = Instant::now() + deadline;
    loop {
        let listed = list_newest(client).await?;
        let open: Vec<(String, Option<SagaStatus>)> = ids
            .iter()
            .filter_map(|id| match listed.iter().find(|saga| &saga.saga_id == id) {
                Some(saga) if is_terminal(saga.status) => None,
                Some(saga) => Some((id.clone(), SagaStatus::try_from(saga.status).ok())),
                None => Some((id.clone(), None)),
            })
            .collect();
        if open.is_empty() {
            break;
        }
        if Instant::now() > until {
            bail!(
                "{} of {} sagas not terminal (stuck?) after {deadline:?}: {:?}",
                open.len(),
                ids.len(),
                &open[..open.len().min(10)]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut sagas = BTreeMap::new();
    for id in ids {
        sagas.insert(id.clone(), get_saga(client, id).await?);
    }
    Ok(sagas)
}

/// A saga as sagad's `sagas` table holds it: what the database recorded, whether or not the
/// API can still read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedSaga {
    pub saga_id: String,
    pub status: String,
    pub version: i64,
}

impl RecordedSaga {
    pub fn ended(&self) -> bool {
        matches!(self.status.as_str(), "COMPLETED" | "COMPENSATED" | "FAILED")
    }
}

/// Every saga in sagad's database, oldest first.
pub async fn recorded_sagas(db: &mut PgConnection) -> anyhow::Result<Vec<RecordedSaga>> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "select saga_id::text, status, version from sagas order by created_at, saga_id",
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(saga_id, status, version)| RecordedSaga {
            saga_id,
            status,
            version,
        })
        .collect())
}

/// Waits until every saga in sagad's database has ended. While sagas keep ending (or new ones
/// appear) it waits up to `cap`; it gives up early once no saga has ended for `quiet`, far
/// longer than any retry delay: what is left then is stuck, whether it never moves again or
/// retries for ever.
pub async fn wait_recorded_sagas_end(
    db: &mut PgConnection,
    quiet: Duration,
    cap: Duration,
) -> anyhow::Result<Vec<RecordedSaga>> {
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut progress = (0, 0);
    let mut at_progress: BTreeMap<String, i64> = BTreeMap::new();
    loop {
        let sagas = recorded_sagas(db).await?;
        let open: Vec<&RecordedSaga> = sagas.iter().filter(|saga| !saga.ended()).collect();
        if open.is_empty() {
            return Ok(sagas);
        }
        let now = (sagas.len(), sagas.len() - open.len());
        if now != progress {
            progress = now;
            last_progress = Instant::now();
            at_progress = open
                .iter()
                .map(|saga| (saga.saga_id.clone(), saga.version))
                .collect();
        }
        if last_progress.elapsed() > quiet || started.elapsed() > cap {
            let mut by_state: BTreeMap<(&str, i64), usize> = BTreeMap::new();
            for saga in &open {
                *by_state
                    .entry((saga.status.as_str(), saga.version))
                    .or_default() += 1;
            }
            let moving = open
                .iter()
                .filter(|saga| at_progress.get(&saga.saga_id) != Some(&saga.version))
                .count();
            let examples: Vec<String> = open
                .iter()
                .take(5)
                .map(|saga| format!("{} {} v{}", saga.saga_id, saga.status, saga.version))
                .collect();
            bail!(
                "{} of {} recorded sagas have not ended after {:?}, none ended in the last \
                 {:?}; {moving} of them still append events (retrying), the others do not \
                 move at all; by (status, version): {by_state:?}; e.g. {examples:?}",
                open.len(),
                sagas.len(),
                started.elapsed(),
                last_progress.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
