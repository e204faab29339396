//! The circuit breaker: whether the layer talks to the store at all.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::entry::millis;

/// Skips the store after `threshold` consecutive failures, for `cooldown`; then lets one
/// probe through, whose success closes it again. A probe that never reports (its request
/// was dropped, its fill was shed) gives way to another after a further `cooldown`: the
/// breaker cannot stay open for good.
#[derive(Debug)]
pub(crate) struct Breaker {
    /// Set by the builder at any time (so configuring it never resets anything).
    threshold: AtomicU32,
    cooldown_ms: AtomicU64,
    epoch: Instant,
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which the breaker is open; 0 when closed.
    open_until_ms: AtomicU64,
    /// Milliseconds since `epoch` when the current probe was let through; 0 when none is.
    probe_since_ms: AtomicU64,
    trips: AtomicU64,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Self {
        let breaker = Breaker {
            threshold: AtomicU32::new(1),
            cooldown_ms: AtomicU64::new(1),
            epoch: Instant::now(),
            failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            probe_since_ms: AtomicU64::new(0),
            trips: AtomicU64::new(0),
        };
        breaker.configure(threshold, cooldown);
        breaker
    }

    /// Sets the failures that open it and how long it stays open.
    pub(crate) fn configure(&self, threshold: u32, cooldown: Duration) {
        self.threshold.store(threshold.max(1), Relaxed);
        // Bounded, so that millisecond sums cannot overflow.
        let cooldown = cooldown.min(Duration::from_secs(24 * 3600));
        self.cooldown_ms.store(millis(cooldown).max(1), Relaxed);
    }

    /// Times it opened.
    pub(crate) fn trips(&self) -> u64 {
        self.trips.load(Relaxed)
    }

    fn now_ms(&self) -> u64 {
        millis(self.epoch.elapsed()) + 1
    }

    /// May the next store operation run?
    pub(crate) fn allow(&self) -> bool {
        let until = self.open_until_ms.load(Relaxed);
        if until == 0 {
            return true;
        }
        let now = self.now_ms();
        if now < until {
            return false;
        }
        // Cool-down over: exactly one caller probes, until it reports or its time is up.
        let since = self.probe_since_ms.load(Relaxed);
        if since != 0 && now < since + self.cooldown_ms.load(Relaxed) {
            return false;
        }
        self.probe_since_ms
            .compare_exchange(since, now, Relaxed, Relaxed)
            .is_ok()
    }

    pub(crate) fn is_open(&self) -> bool {
        self.open_until_ms.load(Relaxed) != 0
    }

    pub(crate) fn success(&self) {
        // Read first: a store on every hit would pull this line away from the other cores.
        if self.failures.load(Relaxed) != 0 {
            self.failures.store(0, Relaxed);
        }
        if self.open_until_ms.load(Relaxed) != 0 {
            self.open_until_ms.store(0, Relaxed);
            self.probe_since_ms.store(0, Relaxed);
            #[cfg(feature = "metrics")]
            metrics::gauge!("tower_cache_aside_breaker_open").set(0.0);
            tracing::info!("cache store reachable again; circuit breaker closed");
        }
    }

    pub(crate) fn failure(&self) {
        let n = self.failures.fetch_add(1, Relaxed) + 1;
        let was_probe = self.probe_since_ms.swap(0, Relaxed) != 0;
        if was_probe || (n >= self.threshold.load(Relaxed) && self.open_until_ms.load(Relaxed) == 0)
        {
            self.open_until_ms
                .store(self.now_ms() + self.cooldown_ms.load(Relaxed), Relaxed);
            #[cfg(feature = "metrics")]
            metrics::gauge!("tower_cache_aside_breaker_open").set(1.0);
            if !was_probe {
                self.trips.fetch_add(1, Relaxed);
                tracing::warn!(
                    failures = n,
                    "cache store failing; circuit breaker open, passing requests through"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_probes_after_cooldown() {
        let b = Breaker::new(3, Duration::from_millis(30));
        b.failure();
        b.failure();
        assert!(b.allow());
        b.failure();
        assert!(b.is_open());
        assert!(!b.allow());
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allow(), "one probe");
        assert!(!b.allow(), "only one probe");
        b.failure(); // probe failed: open again
        assert!(!b.allow());
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allow());
        b.success();
        assert!(!b.is_open());
        assert!(b.allow() && b.allow());
        assert_eq!(b.trips.load(Relaxed), 1);
    }

    #[test]
    fn a_probe_that_never_reports_gives_way() {
        let b = Breaker::new(1, Duration::from_millis(30));
        b.failure();
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allow(), "the probe");
        // Its request was dropped, or its fill shed: no success, no failure.
        assert!(!b.allow(), "still its turn");
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allow(), "another probe after a cooldown");
        b.success();
        assert!(!b.is_open());
    }
}
