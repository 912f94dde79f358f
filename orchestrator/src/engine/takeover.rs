//! The loops that make replicas share the work: keeping this replica's lease (and starting a
//! new tenure when it was lost), sweeping for sagas no live replica drives (timers of released
//! sagas, sagas of dead replicas), and hearing about requests recorded on other replicas.

use std::time::Duration;

use tokio::time::Instant;

use super::Engine;
use super::watch::Announcement;
use crate::store::Change;

/// How long a loop waits before trying the database again after it failed.
const RETRY_DELAY: Duration = Duration::from_secs(1);

pub(super) fn spawn_background(engine: &Engine) {
    let background = &engine.inner.background;
    background.spawn(keep_lease(engine.clone()));
    background.spawn(sweep(engine.clone()));
    background.spawn(follow_changes(engine.clone()));
    background.spawn(follow_own_commits(engine.clone()));
}

/// Renews the lease on time, on a connection of its own. It is also the lease's timer: a lease
/// the database refused to renew, or that this side stopped trusting (no renewal got through
/// in time), is dropped the moment its trust ends, whoever is waiting for what. A lost lease
/// is lost for good: its drivers stop, and the replica registers again under a new id and
/// sweeps at once.
async fn keep_lease(engine: Engine) {
    let inner = &engine.inner;
    let timing = inner.lease.timing();
    loop {
        let tenure = inner.lease.tenure();
        tokio::select! {
            () = tokio::time::sleep(timing.renew_every()) => {}
            // A renewal that failed leaves less trust than one renewal period.
            () = tokio::time::sleep_until(inner.lease.trusted_until()) => {}
            () = tenure.lost.cancelled() => {}
            () = inner.shutdown.cancelled() => return,
        }
        if inner.lease.holds(&tenure) {
            let replica_id = tenure.replica_id;
            let since = Instant::now();
            // A renewal that comes back after the trust ended is of no use: give up then.
            let within = inner.lease.trusted_until().saturating_duration_since(since);
            match inner
                .store
                .renew_lease(replica_id, timing.ttl, within)
                .await
            {
                Ok(true) => {
                    inner.lease.renewed(replica_id, since);
                    continue;
                }
                Ok(false) => tracing::warn!(%replica_id, "the lease expired before it was renewed"),
                Err(error) => {
                    tracing::warn!(%replica_id, %error, "cannot renew the lease; will retry");
                    if inner.lease.holds(&tenure) {
                        continue;
                    }
                }
            }
        }
        let dead = inner.lease.lose();
        metrics::counter!("sagad_leases_lost_total").increment(1);
        tracing::warn!(replica_id = %dead, "lease lost: letting every saga go");
        if !register_again(&engine).await {
            return;
        }
        // The old id is dead: end it now, so its sagas are taken over without waiting for
        // the database to expire it. A late write of one of its drivers is fenced off.
        if let Err(error) = inner.store.retire_replica(dead).await {
            tracing::warn!(replica_id = %dead, %error, "cannot retire the old replica id");
        }
        inner.sweep_now.notify_one();
    }
}

/// Registers a new replica id, retrying while the database is down. `false`: shut down first.
async fn register_again(engine: &Engine) -> bool {
    let inner = &engine.inner;
    loop {
        let since = Instant::now();
        match inner.store.register_replica(inner.lease.timing().ttl).await {
            Ok(replica_id) => {
                inner.lease.replace(replica_id, since);
                tracing::info!(%replica_id, "registered again as a new replica");
                return true;
            }
            Err(error) => tracing::warn!(%error, "cannot register as a replica; will retry"),
        }
        tokio::select! {
            () = tokio::time::sleep(RETRY_DELAY) => {}
            () = inner.shutdown.cancelled() => return false,
        }
    }
}

/// Takes over orphaned sagas: at once after a sweep that found work, then less and less often
/// while there is none, up to the poll interval.
async fn sweep(engine: Engine) {
    let inner = &engine.inner;
    let timing = inner.lease.timing();
    let mut pause = timing.busy_poll();
    loop {
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = inner.sweep_now.notified() => {}
            () = inner.shutdown.cancelled() => return,
        }
        pause = match engine.take_over_orphans().await {
            Ok(0) => (pause * 2).min(timing.poll_interval),
            Ok(_) => timing.busy_poll(),
            Err(error) => {
                tracing::warn!(%error, "cannot sweep for sagas to take over; will retry");
                timing.poll_interval
            }
        };
    }
}

/// Follows what happens on every replica: rings the driver of a saga a request changed (a
/// cancel), so it stops going forward at once, even in the middle of a wait; and tells the
/// watches what was appended.
async fn follow_changes(engine: Engine) {
    let inner = &engine.inner;
    loop {
        match inner.store.listen_for_changes().await {
            Ok(mut listener) => loop {
                let next = tokio::select! {
                    next = listener.next() => next,
                    () = inner.shutdown.cancelled() => return,
                };
                match next {
                    Ok(Change::Requested(saga_id)) => {
                        engine.ring(saga_id);
                    }
                    Ok(Change::Appended(sagas)) => {
                        for (saga_id, version) in sagas {
                            inner
                                .watches
                                .announce(Announcement::Appended(saga_id, version));
                        }
                    }
                    // What was said meanwhile is lost: every driver and watch reads again.
                    Ok(Change::Reconnected) => {
                        engine.ring_all();
                        inner.watches.announce(Announcement::Resync);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "lost the change notifications; reconnecting");
                        break;
                    }
                }
            },
            Err(error) => tracing::warn!(%error, "cannot listen for changes; will retry"),
        }
        tokio::select! {
            () = tokio::time::sleep(RETRY_DELAY) => {}
            () = inner.shutdown.cancelled() => return,
        }
    }
}

/// Tells the watches at once what this replica's own writer committed, without waiting for
/// the announcement to come back through Postgres.
async fn follow_own_commits(engine: Engine) {
    let inner = &engine.inner;
    let mut committed = inner.writer.subscribe();
    loop {
        let heard = tokio::select! {
            heard = committed.recv() => heard,
            () = inner.shutdown.cancelled() => return,
        };
        match heard {
            Ok((saga_id, version)) => inner
                .watches
                .announce(Announcement::Appended(saga_id, version)),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                inner.watches.announce(Announcement::Resync);
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}
