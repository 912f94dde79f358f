//! What one client may take of sagad, so that one busy or broken client cannot starve the
//! others: sagas started per second (a token bucket per caller) and `WatchSaga` streams open
//! at once. A caller is a token's name with tokens on, else the client's IP address.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tonic::Status;

/// Past this many callers tracked, the buckets that are full again (their callers idle for a
/// second or more) are forgotten.
const TRACKED_CALLERS: usize = 10_000;

/// The limits, shared by every request.
#[derive(Clone)]
pub struct Limits {
    /// Sagas a caller may start per second, on average; `None`: no limit.
    start_rate: Option<f64>,
    watches_per_caller: usize,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    buckets: HashMap<String, Bucket>,
    watches: HashMap<String, usize>,
}

/// Starts a caller may make now, refilled at the rate up to one second's worth.
struct Bucket {
    available: f64,
    refilled_at: Instant,
}

impl Limits {
    /// `start_rate` sagas per second per caller (0: unlimited), in bursts of up to a second's
    /// worth; `watches_per_caller` streams open at once.
    pub fn new(start_rate: u32, watches_per_caller: u32) -> Self {
        Self {
            start_rate: (start_rate > 0).then_some(f64::from(start_rate)),
            watches_per_caller: watches_per_caller as usize,
            state: Arc::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// One start by `caller`, or `RESOURCE_EXHAUSTED` saying when the next one will be let in
    /// (also as `retry-after-ms` metadata).
    pub fn admit_start(&self, caller: &str, now: Instant) -> Result<(), Status> {
        let Some(rate) = self.start_rate else {
            return Ok(());
        };
        let capacity = rate.max(1.0);
        let mut state = self.state();
        if state.buckets.len() > TRACKED_CALLERS {
            state.buckets.retain(|_, bucket| {
                bucket.available + now.duration_since(bucket.refilled_at).as_secs_f64() * rate
                    < capacity
            });
        }
        let bucket = state.buckets.entry(caller.to_owned()).or_insert(Bucket {
            available: capacity,
            refilled_at: now,
        });
        let elapsed = now
            .saturating_duration_since(bucket.refilled_at)
            .as_secs_f64();
        bucket.available = (bucket.available + elapsed * rate).min(capacity);
        bucket.refilled_at = now;
        if bucket.available >= 1.0 {
            bucket.available -= 1.0;
            return Ok(());
        }
        let wait = Duration::from_secs_f64((1.0 - bucket.available) / rate);
        let millis = wait.as_millis().max(1);
        let mut status = Status::resource_exhausted(format!(
            "{caller} may start {rate} sagas per second; retry in {millis} ms"
        ));
        if let Ok(value) = millis.to_string().parse() {
            status.metadata_mut().insert("retry-after-ms", value);
        }
        Err(status)
    }

    /// A `WatchSaga` stream for `caller`, held as long as the stream is open; past the limit,
    /// `RESOURCE_EXHAUSTED`.
    pub fn open_watch(&self, caller: &str) -> Result<WatchPermit, Status> {
        let mut state = self.state();
        let open = state.watches.entry(caller.to_owned()).or_insert(0);
        if *open >= self.watches_per_caller {
            return Err(Status::resource_exhausted(format!(
                "{caller} has {open} WatchSaga streams open, the most allowed; close one first"
            )));
        }
        *open += 1;
        Ok(WatchPermit {
            limits: self.clone(),
            caller: caller.to_owned(),
        })
    }
}

/// One open `WatchSaga` stream; dropping it (the stream ends or the client goes) frees it.
pub struct WatchPermit {
    limits: Limits,
    caller: String,
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        let mut state = self.limits.state();
        if let Some(open) = state.watches.get_mut(&self.caller) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                state.watches.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn starts_beyond_the_rate_wait_their_turn_each_caller_on_its_own() {
        let limits = Limits::new(2, 1);
        let t0 = Instant::now();
        assert!(limits.admit_start("a", t0).is_ok());
        assert!(limits.admit_start("a", t0).is_ok());
        let refused = limits.admit_start("a", t0).err();
        assert_eq!(
            refused.as_ref().map(Status::code),
            Some(Code::ResourceExhausted)
        );
        let hint = refused
            .as_ref()
            .and_then(|status| status.metadata().get("retry-after-ms"))
            .and_then(|value| value.to_str().ok())
            .and_then(|text| text.parse::<u64>().ok());
        assert_eq!(hint, Some(500));
        // Another caller has a bucket of its own.
        assert!(limits.admit_start("b", t0).is_ok());
        // Half a second later one more start is let in.
        assert!(
            limits
                .admit_start("a", t0 + Duration::from_millis(500))
                .is_ok()
        );
        assert!(
            limits
                .admit_start("a", t0 + Duration::from_millis(500))
                .is_err()
        );
        assert!(Limits::new(0, 1).admit_start("a", t0).is_ok());
    }

    #[test]
    fn a_watch_closed_frees_its_place() {
        let limits = Limits::new(0, 2);
        let first = limits.open_watch("a");
        let second = limits.open_watch("a");
        assert!(first.is_ok() && second.is_ok());
        let third = limits.open_watch("a").err().map(|status| status.code());
        assert_eq!(third, Some(Code::ResourceExhausted));
        assert!(limits.open_watch("b").is_ok());
        drop(first);
        assert!(limits.open_watch("a").is_ok());
    }
}
