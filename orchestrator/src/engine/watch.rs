//! Watching sagas: every event of a saga from the first, then each new one as any replica
//! appends it. Watching is cheap: each replica hears what every commit appended (its own
//! writer's commits, and the others' through one `LISTEN`), and for each watched saga one hub
//! reads the new events once and hands them to all its watchers. A watcher reads the history
//! once when it joins, and again only to catch up (it lagged behind, or announcements were
//! lost); it never skips or repeats a `seq`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use uuid::Uuid;

use super::{Engine, EngineError};
use crate::store::EventRecord;

/// Events a hub holds for watchers that fall behind; beyond it they catch up from the log.
const HUB_BUFFER: usize = 256;
/// Events a watcher's stream holds for a slow client.
const WATCHER_BUFFER: usize = 64;
/// How often a hub reads the log even when nothing was announced: the announcements of
/// another replica travel through Postgres and may be lost while a connection is down.
const HUB_RESYNC: Duration = Duration::from_secs(5);

/// What the replica hears about appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Announcement {
    /// This saga is now at this version.
    Appended(Uuid, u64),
    /// Announcements may have been lost: every hub reads its log again.
    Resync,
}

/// The hubs of the sagas watched on this replica, and what they listen to.
pub(super) struct Watches {
    announced: broadcast::Sender<Announcement>,
    hubs: Mutex<HashMap<Uuid, broadcast::Sender<Arc<EventRecord>>>>,
}

impl Watches {
    pub(super) fn new() -> Self {
        let (announced, _) = broadcast::channel(4096);
        Self {
            announced,
            hubs: Mutex::new(HashMap::new()),
        }
    }

    /// Tells the hubs what was appended, here or on another replica.
    pub(super) fn announce(&self, announcement: Announcement) {
        // Nobody listening is fine: nothing is watched.
        let _ = self.announced.send(announcement);
    }
}

/// Whether the event ends the saga. A saga has ended when its last event is one: a `FAILED`
/// saga that is retried goes on after its `saga_failed`.
pub(super) fn is_terminal(event_type: &str) -> bool {
    matches!(
        event_type,
        "saga_completed" | "saga_compensated" | "saga_failed"
    )
}

impl Engine {
    /// Every event of the saga from the first, then the new ones as they are appended, ending
    /// after the terminal event; at shutdown the stream ends with `ShuttingDown`. The receiver
    /// may be dropped at any time.
    pub async fn watch(
        &self,
        saga_id: Uuid,
    ) -> Result<mpsc::Receiver<Result<EventRecord, EngineError>>, EngineError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(EngineError::ShuttingDown);
        }
        // Joined before the history is read, so nothing appended in between is missed.
        let live = self.hub(saga_id);
        let history = self.inner.store.history(saga_id).await?;
        if history.is_empty() {
            return Err(EngineError::NotFound(saga_id));
        }
        let (sender, receiver) = mpsc::channel(WATCHER_BUFFER);
        let engine = self.clone();
        tokio::spawn(async move {
            engine.feed_watcher(saga_id, history, live, sender).await;
        });
        Ok(receiver)
    }

    /// The hub of a saga, started if there is none.
    fn hub(&self, saga_id: Uuid) -> broadcast::Receiver<Arc<EventRecord>> {
        let Ok(mut hubs) = self.inner.watches.hubs.lock() else {
            // A poisoned map: a hub of its own, fed by nobody; the watcher catches up by
            // reading the log when the hub goes quiet.
            return broadcast::channel(1).1;
        };
        if let Some(hub) = hubs.get(&saga_id) {
            return hub.subscribe();
        }
        let (events, receiver) = broadcast::channel(HUB_BUFFER);
        hubs.insert(saga_id, events.clone());
        let engine = self.clone();
        let announced = self.inner.watches.announced.subscribe();
        tokio::spawn(async move { engine.run_hub(saga_id, events, announced).await });
        receiver
    }

    /// Reads a watched saga's new events once for all its watchers, until the saga ends or
    /// nobody watches any more.
    async fn run_hub(
        &self,
        saga_id: Uuid,
        events: broadcast::Sender<Arc<EventRecord>>,
        mut announced: broadcast::Receiver<Announcement>,
    ) {
        let shutdown = &self.inner.shutdown;
        let mut last = 0;
        let mut ended = false;
        let mut read_now = true;
        while !ended && events.receiver_count() > 0 {
            if read_now {
                match self
                    .inner
                    .store
                    .history_after(saga_id, last, u64::MAX, None)
                    .await
                {
                    Ok(new) => {
                        for event in new {
                            last = event.seq;
                            ended = is_terminal(&event.event_type);
                            let _ = events.send(Arc::new(event));
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%saga_id, %error, "a watch cannot read the log; will retry")
                    }
                }
                if ended {
                    break;
                }
            }
            read_now = tokio::select! {
                heard = announced.recv() => match heard {
                    Ok(Announcement::Appended(id, version)) => id == saga_id && version > last,
                    Ok(Announcement::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => true,
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                () = tokio::time::sleep(HUB_RESYNC) => true,
                () = shutdown.cancelled() => break,
            };
        }
        if let Ok(mut hubs) = self.inner.watches.hubs.lock()
            && hubs
                .get(&saga_id)
                .is_some_and(|hub| hub.same_channel(&events))
        {
            hubs.remove(&saga_id);
        }
    }

    /// Sends one watcher the history, then what its hub hears, catching up from the log
    /// when it falls behind, until the terminal event.
    async fn feed_watcher(
        &self,
        saga_id: Uuid,
        history: Vec<EventRecord>,
        mut live: broadcast::Receiver<Arc<EventRecord>>,
        sender: mpsc::Sender<Result<EventRecord, EngineError>>,
    ) {
        let mut last = 0;
        let mut ended = false;
        for event in history {
            last = event.seq;
            ended = is_terminal(&event.event_type);
            if sender.send(Ok(event)).await.is_err() {
                return;
            }
        }
        while !ended {
            let heard = tokio::select! {
                heard = live.recv() => heard,
                () = self.inner.shutdown.cancelled() => {
                    let _ = sender.send(Err(EngineError::ShuttingDown)).await;
                    return;
                }
                () = sender.closed() => return,
            };
            let events = match heard {
                Ok(event) if event.seq <= last => continue,
                Ok(event) if event.seq == last + 1 => vec![(*event).clone()],
                // A gap, a lag, or a hub that stopped (it ends with the saga or at shutdown):
                // the log has it all.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    match self
                        .inner
                        .store
                        .history_after(saga_id, last, u64::MAX, None)
                        .await
                    {
                        Ok(events) => events,
                        Err(error) => {
                            let _ = sender.send(Err(error.into())).await;
                            return;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => {
                    let caught_up = self
                        .inner
                        .store
                        .history_after(saga_id, last, u64::MAX, None)
                        .await;
                    match caught_up {
                        Ok(events) if events.last().is_some_and(|e| is_terminal(&e.event_type)) => {
                            events
                        }
                        Ok(events) => {
                            for event in events {
                                if sender.send(Ok(event)).await.is_err() {
                                    return;
                                }
                            }
                            // The hub stopped with the saga still going: follow a new one.
                            live = self.hub(saga_id);
                            continue;
                        }
                        Err(error) => {
                            let _ = sender.send(Err(error.into())).await;
                            return;
                        }
                    }
                }
            };
            for event in events {
                if event.seq <= last {
                    continue;
                }
                last = event.seq;
                ended = is_terminal(&event.event_type);
                if sender.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        }
    }
}
