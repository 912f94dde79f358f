//! This process's place among the replicas sharing one database: its replica id and lease,
//! and the tenure each driver holds. The database fences off the writes of an expired id;
//! this side makes a replica stop acting before that happens. A lease that ran out (database
//! unreachable, process paused) ends the tenure for good: every driver of it stops, and the
//! process registers under a new id and takes sagas over like any other replica.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The timing of leases, from the flags.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    /// How long a lease lasts without renewal: a dead replica's sagas wait this long.
    pub ttl: Duration,
    /// The longest pause between two sweeps for sagas nobody alive drives.
    pub poll_interval: Duration,
}

impl LeaseTiming {
    /// Renewals come three to a lease, so one slow or failed renewal loses nothing.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// The shortest pause between sweeps, when the last one found work.
    pub fn busy_poll(&self) -> Duration {
        self.poll_interval / 4
    }

    /// A driver whose saga has nothing to do for longer than this parks it (lets it go, to be
    /// claimed again by a sweep once it is due within the poll interval). Twice the poll
    /// interval, so a saga parked stays parked at least one whole interval instead of being
    /// claimed back by the next sweep.
    pub fn park_after(&self) -> Duration {
        self.poll_interval * 2
    }

    /// How long after a renewal began this side trusts the lease: less than the database,
    /// whose expiry counts from a later instant, so a driver never acts on a lease the
    /// database may already have ended.
    fn trusted_for(&self) -> Duration {
        self.ttl - self.ttl / 5
    }
}

/// What a driver holds while it drives a saga: the replica id it writes under, and the token
/// that is cancelled when that id's lease is lost.
#[derive(Debug, Clone)]
pub(super) struct Tenure {
    pub(super) replica_id: Uuid,
    pub(super) lost: CancellationToken,
}

#[derive(Debug)]
struct Current {
    tenure: Tenure,
    trusted_until: Instant,
}

/// The current tenure and how long it can be trusted.
#[derive(Debug)]
pub(super) struct Lease {
    timing: LeaseTiming,
    current: Mutex<Current>,
}

impl Lease {
    /// A lease just registered as `replica_id`, whose registration began at `since`.
    pub(super) fn new(timing: LeaseTiming, replica_id: Uuid, since: Instant) -> Lease {
        Lease {
            timing,
            current: Mutex::new(Current {
                tenure: Tenure {
                    replica_id,
                    lost: CancellationToken::new(),
                },
                trusted_until: since + timing.trusted_for(),
            }),
        }
    }

    pub(super) fn timing(&self) -> LeaseTiming {
        self.timing
    }

    /// The tenure new work is done under.
    pub(super) fn tenure(&self) -> Tenure {
        match self.current.lock() {
            Ok(current) => current.tenure.clone(),
            Err(poisoned) => poisoned.into_inner().tenure.clone(),
        }
    }

    /// May a driver of `tenure` act now (make a call)? Not once the tenure is lost or the
    /// lease is older than this side trusts. Outliving the trust loses the tenure for good: a
    /// driver may already have let its saga go, so a late renewal must not keep the id (and
    /// the sagas it still owns) alive with nobody driving them.
    pub(super) fn holds(&self, tenure: &Tenure) -> bool {
        let Ok(current) = self.current.lock() else {
            return false;
        };
        if current.tenure.replica_id != tenure.replica_id || tenure.lost.is_cancelled() {
            return false;
        }
        if Instant::now() >= current.trusted_until {
            tenure.lost.cancel();
            return false;
        }
        true
    }

    /// When the current tenure stops being trusted, unless a renewal gets through first.
    pub(super) fn trusted_until(&self) -> Instant {
        match self.current.lock() {
            Ok(current) => current.trusted_until,
            Err(poisoned) => poisoned.into_inner().trusted_until,
        }
    }

    /// The renewal of `replica_id` that began at `since` succeeded.
    pub(super) fn renewed(&self, replica_id: Uuid, since: Instant) {
        if let Ok(mut current) = self.current.lock()
            && current.tenure.replica_id == replica_id
        {
            current.trusted_until = since + self.timing.trusted_for();
        }
    }

    /// Ends the current tenure: its drivers stop. Returns the id that is now dead.
    pub(super) fn lose(&self) -> Uuid {
        let tenure = self.tenure();
        tenure.lost.cancel();
        tenure.replica_id
    }

    /// Starts a new tenure under `replica_id`, registered at `since`.
    pub(super) fn replace(&self, replica_id: Uuid, since: Instant) {
        let fresh = Current {
            tenure: Tenure {
                replica_id,
                lost: CancellationToken::new(),
            },
            trusted_until: since + self.timing.trusted_for(),
        };
        let old = match self.current.lock() {
            Ok(mut current) => std::mem::replace(&mut *current, fresh),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), fresh),
        };
        old.tenure.lost.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> LeaseTiming {
        LeaseTiming {
            ttl: Duration::from_secs(5),
            poll_interval: Duration::from_secs(1),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_is_trusted_for_less_than_its_ttl_and_renewal_extends_it() {
        let id = Uuid::now_v7();
        let lease = Lease::new(timing(), id, Instant::now());
        let tenure = lease.tenure();
        assert!(lease.holds(&tenure));
        tokio::time::advance(Duration::from_secs(3)).await;
        lease.renewed(id, Instant::now());
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(lease.holds(&tenure), "renewed 3 s ago, trusted for 4 s");
        tokio::time::advance(Duration::from_millis(1_100)).await;
        assert!(!lease.holds(&tenure), "4.1 s after the last renewal");
        assert!(
            tenure.lost.is_cancelled(),
            "outliving the trust ends the tenure"
        );
        lease.renewed(id, Instant::now());
        assert!(!lease.holds(&tenure), "a late renewal does not revive it");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_tenure_never_holds_again_and_a_new_one_does() {
        let old = Uuid::now_v7();
        let lease = Lease::new(timing(), old, Instant::now());
        let tenure = lease.tenure();
        assert_eq!(lease.lose(), old);
        assert!(tenure.lost.is_cancelled());
        assert!(!lease.holds(&tenure));
        lease.renewed(old, Instant::now());
        assert!(
            !lease.holds(&tenure),
            "a renewal does not revive a lost tenure"
        );

        let new = Uuid::now_v7();
        lease.replace(new, Instant::now());
        let fresh = lease.tenure();
        assert_eq!(fresh.replica_id, new);
        assert!(lease.holds(&fresh));
        assert!(!lease.holds(&tenure), "the old tenure stays lost");
    }
}
