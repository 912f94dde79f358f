//! Long-polls waiting for a saga to reach a version, answered by this replica's batch writer
//! from the commit that brings it there: the answer is the write's projection with what the
//! database set in the row ([`SagaRecord::committed`]), so the row is not read again. A
//! projection is kept only for as long as it takes to hand it to those waiting for it (one
//! `Arc` for all of them); a commit nobody waits for costs one look-up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use uuid::Uuid;

use super::{RowStamps, SagaRecord, SagaWrite};

/// The long-polls of this replica, by the saga they wait for.
#[derive(Debug, Default)]
pub(super) struct Waiters {
    waiting: Mutex<HashMap<Uuid, Vec<Waiter>>>,
    next_id: AtomicU64,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    min_version: u64,
    answer: oneshot::Sender<Arc<SagaRecord>>,
}

/// One long-poll's place among the waiters. It leaves when dropped, however its wait ends (an
/// answer, a deadline, a client gone), so nothing is left behind.
#[derive(Debug)]
pub struct VersionWait {
    waiters: Arc<Waiters>,
    saga_id: Uuid,
    id: u64,
    /// `None` once it has given its answer or can no longer get one.
    answer: Option<oneshot::Receiver<Arc<SagaRecord>>>,
}

impl Waiters {
    /// Waits for this replica's commit of `saga_id` at `min_version` or later.
    pub(super) fn wait(self: &Arc<Self>, saga_id: Uuid, min_version: u64) -> VersionWait {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, answer) = oneshot::channel();
        // A poisoned lock drops the sender: that wait is never answered from a commit, and its
        // long-poll reads the database on its tick.
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.entry(saga_id).or_default().push(Waiter {
                id,
                min_version,
                answer: sender,
            });
        }
        VersionWait {
            waiters: self.clone(),
            saga_id,
            id,
            answer: Some(answer),
        }
    }

    /// Answers the waits these committed writes satisfy, each with the row its write left.
    pub(super) fn answer(&self, written: Vec<(SagaWrite, RowStamps)>) {
        // Who is answered is decided under the lock; the records are made outside it.
        let due: Vec<Vec<Waiter>> = {
            let Ok(mut waiting) = self.waiting.lock() else {
                return;
            };
            if waiting.is_empty() {
                return;
            }
            written
                .iter()
                .map(|(write, _)| {
                    let Some(waiters) = waiting.get_mut(&write.saga_id) else {
                        return Vec::new();
                    };
                    let version = write.projection.version;
                    let due: Vec<Waiter> = waiters
                        .extract_if(.., |waiter| waiter.min_version <= version)
                        .collect();
                    if waiters.is_empty() {
                        waiting.remove(&write.saga_id);
                    }
                    due
                })
                .collect()
        };
        for ((write, stamps), due) in written.into_iter().zip(due) {
            if due.is_empty() {
                continue;
            }
            let record = Arc::new(SagaRecord::committed(
                write.saga_id,
                write.projection,
                stamps,
            ));
            for waiter in due {
                // A long-poll that ended meanwhile no longer listens.
                let _ = waiter.answer.send(record.clone());
            }
        }
    }

    /// How many long-polls wait for a saga.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.waiting
            .lock()
            .map(|waiting| waiting.values().map(Vec::len).sum())
            .unwrap_or_default()
    }
}

impl VersionWait {
    /// The saga's row as this replica's commit that brought it to the version left it. Waits
    /// until then: for ever if no such commit comes (another replica's write, or a wait that
    /// could not be registered), so a caller waits for it beside a deadline and a re-read.
    /// Cancel-safe.
    pub async fn answered(&mut self) -> Arc<SagaRecord> {
        if let Some(answer) = &mut self.answer {
            let answered = answer.await;
            self.answer = None;
            if let Ok(record) = answered {
                return record;
            }
        }
        std::future::pending().await
    }
}

impl Drop for VersionWait {
    fn drop(&mut self) {
        let Ok(mut waiting) = self.waiters.waiting.lock() else {
            return;
        };
        if let Some(waiters) = waiting.get_mut(&self.saga_id) {
            waiters.retain(|waiter| waiter.id != self.id);
            if waiters.is_empty() {
                waiting.remove(&self.saga_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::Utc;
    use serde_json::json;

    use super::*;
    use crate::saga::SagaStatus;
    use crate::store::{Fence, Projection};

    fn write(saga_id: Uuid, version: u64) -> SagaWrite {
        SagaWrite {
            saga_id,
            expected_version: version - 1,
            replica_id: Uuid::nil(),
            fence: Fence::Owner,
            events: Vec::new(),
            projection: Projection {
                saga_type: "t".to_owned(),
                definition_version: 1,
                status: SagaStatus::Running,
                input: Arc::new(json!({"customer_id": "c"})),
                steps: Vec::new(),
                failure_reason: None,
                version,
                correlation_id: "c".to_owned(),
                idempotency_key: None,
                wake_at: Some(Utc::now()),
                failing_since: None,
            },
        }
    }

    fn stamps() -> RowStamps {
        let now = Utc::now();
        RowStamps {
            created_at: now - chrono::Duration::seconds(1),
            updated_at: now,
            wake_at: Some(now - chrono::Duration::seconds(1)),
            failing_since: None,
        }
    }

    #[tokio::test]
    async fn a_commit_answers_the_waits_it_satisfies_with_its_row_and_no_others() {
        let waiters = Arc::new(Waiters::default());
        let saga_id = Uuid::now_v7();
        let other_id = Uuid::now_v7();
        let mut at_3 = waiters.wait(saga_id, 3);
        let mut at_2 = waiters.wait(saga_id, 2);
        let mut at_4 = waiters.wait(saga_id, 4);
        let mut other = waiters.wait(other_id, 1);
        assert_eq!(waiters.len(), 4);

        let stamps = stamps();
        let committed = write(saga_id, 3);
        let projection = committed.projection.clone();
        waiters.answer(vec![(committed, stamps)]);
        assert_eq!(waiters.len(), 2, "the two waits satisfied have left");
        let (first, second) = (at_3.answered().await, at_2.answered().await);
        assert!(Arc::ptr_eq(&first, &second), "one record for both");
        let want = SagaRecord {
            saga_id,
            projection: Projection {
                wake_at: stamps.wake_at,
                failing_since: stamps.failing_since,
                ..projection
            },
            created_at: stamps.created_at,
            updated_at: stamps.updated_at,
        };
        assert_eq!(*first, want);
        let not_yet = tokio::time::timeout(Duration::from_millis(20), async {
            (at_4.answered().await, other.answered().await)
        })
        .await;
        assert!(
            not_yet.is_err(),
            "a wait for a later version or another saga was answered"
        );
        drop((at_2, at_3, at_4, other));
        assert_eq!(waiters.len(), 0);
    }

    #[tokio::test]
    async fn a_wait_dropped_at_any_point_leaves_nothing_behind() {
        let waiters = Arc::new(Waiters::default());
        let saga_id = Uuid::now_v7();
        // Dropped while awaiting, as when a client goes away or its deadline passes.
        let mut waiting = Vec::new();
        for _ in 0..8 {
            let waiters = waiters.clone();
            waiting.push(tokio::spawn(async move {
                let mut wait = waiters.wait(saga_id, 2);
                wait.answered().await
            }));
        }
        tokio::time::timeout(Duration::from_millis(20), async {
            while waiters.len() < 8 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the waits are registered");
        for task in &waiting {
            task.abort();
        }
        for task in waiting {
            assert!(task.await.is_err_and(|error| error.is_cancelled()));
        }
        assert_eq!(waiters.len(), 0, "an aborted long-poll left its wait");

        // Dropped without being awaited, and after a commit too early for it.
        let never_awaited = waiters.wait(saga_id, 2);
        waiters.answer(vec![(write(saga_id, 1), stamps())]);
        assert_eq!(waiters.len(), 1);
        drop(never_awaited);
        assert_eq!(waiters.len(), 0);

        // Answered, then dropped: the commit took it out, the drop finds nothing to do.
        let mut answered = waiters.wait(saga_id, 2);
        waiters.answer(vec![(write(saga_id, 2), stamps())]);
        assert_eq!(answered.answered().await.projection.version, 2);
        drop(answered);
        assert_eq!(waiters.len(), 0);
    }
}
