//! The counters: what the layer did. [`CacheStats`] reads them, with the breaker's state.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crate::breaker::Breaker;

/// Live counters of one [`CacheLayer`](crate::CacheLayer) (clones share them).
///
/// ```
/// use tower_cache_aside::{CacheLayer, store::MemoryStore};
///
/// let layer = CacheLayer::new(MemoryStore::new(64 << 20));
/// let stats = layer.stats();
/// assert_eq!(stats.snapshot().hits, 0);
/// ```
#[derive(Clone, Debug)]
pub struct CacheStats {
    pub(crate) inner: Arc<Counters>,
    breaker: Arc<Breaker>,
}

#[derive(Debug)]
pub(crate) struct Counters {
    /// One set of counters per stripe: threads count in their own stripe (their own cache
    /// lines), so two cores serving hits do not pass one counter's line back and forth.
    stripes: Box<[Tally; STRIPES]>,
}

const STRIPES: usize = 8;

#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Tally {
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) bypasses: AtomicU64,
    pub(crate) fills: AtomicU64,
    pub(crate) fills_fenced: AtomicU64,
    pub(crate) fills_dropped: AtomicU64,
    pub(crate) uncacheable: AtomicU64,
    pub(crate) oversize: AtomicU64,
    pub(crate) store_errors: AtomicU64,
    pub(crate) decode_errors: AtomicU64,
    pub(crate) breaker_skips: AtomicU64,
    pub(crate) invalidations: AtomicU64,
    pub(crate) clears_deferred: AtomicU64,
    pub(crate) pending_clear_skips: AtomicU64,
    pub(crate) collapsed: AtomicU64,
    pub(crate) stale_hits: AtomicU64,
    pub(crate) stale_on_error: AtomicU64,
    pub(crate) refreshes: AtomicU64,
    pub(crate) not_modified: AtomicU64,
    pub(crate) revalidated: AtomicU64,
}

impl Counters {
    /// This thread's stripe.
    pub(crate) fn local(&self) -> &Tally {
        use std::sync::atomic::AtomicUsize;
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static STRIPE: usize = NEXT.fetch_add(1, Relaxed) % STRIPES;
        }
        &self.stripes[STRIPE.with(|s| *s)]
    }

    fn sum(&self, field: impl Fn(&Tally) -> &AtomicU64) -> u64 {
        self.stripes.iter().map(|t| field(t).load(Relaxed)).sum()
    }
}

/// A point-in-time copy of the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// Requests answered from the store.
    pub hits: u64,
    /// Lookups that found nothing usable (the inner service was called).
    pub misses: u64,
    /// Cacheable-route requests that skipped the cache (credentials, `Range`, ...).
    pub bypasses: u64,
    /// Responses written to the store.
    pub fills: u64,
    /// Fills refused because an invalidation happened after the lookup (the stale-set race).
    pub fills_fenced: u64,
    /// Fills not written because the store was too far behind to take them (not failures).
    pub fills_dropped: u64,
    /// Misses whose response may not be stored (status, `Set-Cookie`, `no-store`, ...).
    pub uncacheable: u64,
    /// Misses whose body was over the size limit and streamed through unstored.
    pub oversize: u64,
    /// Store operations that failed or timed out.
    pub store_errors: u64,
    /// Stored values that were not a readable entry (treated as misses).
    pub decode_errors: u64,
    /// Store operations skipped because the circuit breaker was open.
    pub breaker_skips: u64,
    /// Tag clears that reached the store.
    pub invalidations: u64,
    /// Clears that could not reach the store and wait for a retry.
    pub clears_deferred: u64,
    /// Lookups skipped while a deferred clear was pending (the store may hold stale data).
    pub pending_clear_skips: u64,
    /// Waiters served what their flight's leader fetched (stampede protection).
    pub collapsed: u64,
    /// Stale entries served while being refreshed (`stale-while-revalidate`).
    pub stale_hits: u64,
    /// Stale entries served because the origin failed (`stale-if-error`).
    pub stale_on_error: u64,
    /// Background refreshes that called the origin.
    pub refreshes: u64,
    /// Requests answered `304 Not Modified` (the client's validator matched a hit, or what
    /// a miss fetched).
    pub not_modified: u64,
    /// Stale entries the origin confirmed with a `304` (revalidated, not fetched again).
    pub revalidated: u64,
    /// Times the circuit breaker opened.
    pub breaker_trips: u64,
    /// Whether the breaker is open now (the store is being skipped).
    pub breaker_open: bool,
}

impl StatsSnapshot {
    /// The share of looked-up requests answered without calling the app: fresh hits, stale
    /// hits and collapsed waiters, over those plus misses (0 when there were none).
    pub fn hit_rate(&self) -> f64 {
        let served = self.hits + self.stale_hits + self.collapsed;
        let total = served + self.misses;
        if total == 0 {
            0.0
        } else {
            served as f64 / total as f64
        }
    }
}

impl CacheStats {
    pub(crate) fn new(breaker: Arc<Breaker>) -> Self {
        CacheStats {
            inner: Arc::new(Counters {
                stripes: Box::default(),
            }),
            breaker,
        }
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let c = &self.inner;
        StatsSnapshot {
            hits: c.sum(|t| &t.hits),
            misses: c.sum(|t| &t.misses),
            bypasses: c.sum(|t| &t.bypasses),
            fills: c.sum(|t| &t.fills),
            fills_fenced: c.sum(|t| &t.fills_fenced),
            fills_dropped: c.sum(|t| &t.fills_dropped),
            uncacheable: c.sum(|t| &t.uncacheable),
            oversize: c.sum(|t| &t.oversize),
            store_errors: c.sum(|t| &t.store_errors),
            decode_errors: c.sum(|t| &t.decode_errors),
            breaker_skips: c.sum(|t| &t.breaker_skips),
            invalidations: c.sum(|t| &t.invalidations),
            clears_deferred: c.sum(|t| &t.clears_deferred),
            pending_clear_skips: c.sum(|t| &t.pending_clear_skips),
            collapsed: c.sum(|t| &t.collapsed),
            stale_hits: c.sum(|t| &t.stale_hits),
            stale_on_error: c.sum(|t| &t.stale_on_error),
            refreshes: c.sum(|t| &t.refreshes),
            not_modified: c.sum(|t| &t.not_modified),
            revalidated: c.sum(|t| &t.revalidated),
            breaker_trips: self.breaker.trips(),
            breaker_open: self.breaker.is_open(),
        }
    }
}

/// Counts one event: `count!(counters, hits)` bumps the counter and, with the `metrics`
/// feature, the `tower_cache_aside_hits_total` counter of the `metrics` facade.
macro_rules! count {
    ($counters:expr, $field:ident) => {{
        $counters
            .local()
            .$field
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!(concat!("tower_cache_aside_", stringify!($field), "_total")).increment(1);
    }};
}
pub(crate) use count;
