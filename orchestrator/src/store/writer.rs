//! Group commit: one writer per instance gathers the writes that are ready, commits them in one
//! transaction, and answers each. Under load many sagas share one commit; alone, a write is a
//! batch of one and waits for nothing. A write whose data fails its batch fails alone: the
//! batch is tried again write by write. A database that fails or does not answer fails every
//! write queued at that moment at once, so nobody waits out one timeout per batch. After a
//! commit, the long-polls waiting for what it wrote are answered from it (see `waiters`).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, oneshot};
use uuid::Uuid;

use super::waiters::{VersionWait, Waiters};
use super::{BatchOutcome, Result, SagaWrite, Store, StoreError, WriteOutcome};

/// The most writes one transaction carries.
const MAX_BATCH: usize = 256;

struct Pending {
    write: SagaWrite,
    reply: oneshot::Sender<Result<WriteOutcome>>,
}

/// A handle to the instance's batch writer; cloning it is cheap.
#[derive(Debug, Clone)]
pub struct Writer {
    queue: mpsc::Sender<Pending>,
    committed: broadcast::Sender<(Uuid, u64)>,
    waiters: Arc<Waiters>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("saga_id", &self.write.saga_id)
            .finish()
    }
}

impl Writer {
    /// Starts the writer task. It ends when every `Writer` handle is dropped.
    pub fn spawn(store: Store) -> (Writer, tokio::task::JoinHandle<()>) {
        let (queue, receiver) = mpsc::channel(4 * MAX_BATCH);
        let (committed, _) = broadcast::channel(4096);
        let waiters = Arc::new(Waiters::default());
        let task = tokio::spawn(run(store, receiver, committed.clone(), waiters.clone()));
        (
            Writer {
                queue,
                committed,
                waiters,
            },
            task,
        )
    }

    /// Writes once the batch holding this write is committed.
    pub async fn write(&self, write: SagaWrite) -> Result<WriteOutcome> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending { write, reply })
            .await
            .map_err(|_| StoreError::WriterStopped)?;
        answer.await.map_err(|_| StoreError::WriterStopped)?
    }

    /// Announces `(saga_id, version)` after each committed write: what watchers wait on.
    pub fn subscribe(&self) -> broadcast::Receiver<(Uuid, u64)> {
        self.committed.subscribe()
    }

    /// Waits for a commit of this writer that brings `saga_id` to `min_version` or later, and
    /// answers with the row it left, unread: read-your-writes without reading.
    pub fn wait_for(&self, saga_id: Uuid, min_version: u64) -> VersionWait {
        self.waiters.wait(saga_id, min_version)
    }
}

async fn run(
    store: Store,
    mut receiver: mpsc::Receiver<Pending>,
    committed: broadcast::Sender<(Uuid, u64)>,
    waiters: Arc<Waiters>,
) {
    // Writes held back because their saga already had a write in the batch being built: two
    // writes of one saga in one statement could not tell which won.
    let mut held: VecDeque<Pending> = VecDeque::new();
    loop {
        let first = match held.pop_front() {
            Some(pending) => pending,
            None => match receiver.recv().await {
                Some(pending) => pending,
                None => return,
            },
        };
        let mut in_batch: HashSet<Uuid> = HashSet::from([first.write.saga_id]);
        let mut batch = vec![first];
        let mut still_held = VecDeque::new();
        while let Some(pending) = held.pop_front() {
            if batch.len() < MAX_BATCH && in_batch.insert(pending.write.saga_id) {
                batch.push(pending);
            } else {
                still_held.push_back(pending);
            }
        }
        held = still_held;
        while batch.len() < MAX_BATCH {
            let Ok(pending) = receiver.try_recv() else {
                break;
            };
            if in_batch.insert(pending.write.saga_id) {
                batch.push(pending);
            } else {
                held.push_back(pending);
            }
        }

        let (writes, replies): (Vec<SagaWrite>, Vec<_>) =
            batch.into_iter().map(|p| (p.write, p.reply)).unzip();
        metrics::histogram!("sagad_store_batch_writes").record(writes.len() as f64);
        // A reply whose requester has gone, or an announcement nobody listens to, is dropped.
        match store.write_batch(&writes).await {
            Ok(outcomes) => answer(&committed, &waiters, writes, replies, outcomes),
            // One write's data may have failed the whole transaction: each is tried alone, so
            // that it fails alone.
            Err(error) if writes.len() > 1 && error.concerns_data() => {
                tracing::warn!(%error, size = writes.len(), "batch commit failed; writing one by one");
                for (write, reply) in writes.into_iter().zip(replies) {
                    let outcomes = match store.write_batch(std::slice::from_ref(&write)).await {
                        Ok(outcomes) => outcomes,
                        Err(error) => vec![Err(error)],
                    };
                    answer(&committed, &waiters, vec![write], vec![reply], outcomes);
                }
            }
            Err(error) => {
                tracing::warn!(%error, size = writes.len(), "batch commit failed");
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
                // The database itself failed (down, or not answering in time): what waits in
                // the queue would fail the same way, batch after batch, each after a timeout.
                // It is answered at once instead; its writers retry when they see fit.
                if !error.concerns_data() {
                    let mut failed = 0;
                    while let Some(pending) = held.pop_front().or_else(|| receiver.try_recv().ok())
                    {
                        let _ = pending.reply.send(Err(error.clone()));
                        failed += 1;
                    }
                    if failed > 0 {
                        tracing::warn!(failed, "failed the writes queued behind the batch");
                    }
                }
            }
        }
    }
}

/// Answers each write of a committed batch, announces the written ones, and answers the
/// long-polls waiting for them.
fn answer(
    committed: &broadcast::Sender<(Uuid, u64)>,
    waiters: &Waiters,
    writes: Vec<SagaWrite>,
    replies: Vec<oneshot::Sender<Result<WriteOutcome>>>,
    outcomes: Vec<Result<BatchOutcome>>,
) {
    let mut written = Vec::new();
    for ((write, reply), outcome) in writes.into_iter().zip(replies).zip(outcomes) {
        if let Ok(BatchOutcome::Written(stamps)) = outcome {
            let _ = committed.send((write.saga_id, write.projection.version));
            written.push((write, stamps));
        }
        let _ = reply.send(outcome.map(BatchOutcome::outcome));
    }
    waiters.answer(written);
}
