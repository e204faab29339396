//! The counters: what the layer did. [`CacheStats`] reads them, with the breaker's state.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::breaker::Breaker;
use crate::lock::{read, write};

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

#[derive(Debug, Default)]
pub(crate) struct Counters {
    tallies: Striped<Tally>,
    /// Every route's counters, in the route table's order, for [`CacheStats::routes`].
    routes: RwLock<Vec<Arc<RouteCounters>>>,
}

/// One set of counters per stripe: threads count in their own stripe (their own cache
/// lines), so two cores serving hits do not pass one counter's line back and forth.
#[derive(Debug, Default)]
pub(crate) struct Striped<T> {
    stripes: Box<[T; STRIPES]>,
}

const STRIPES: usize = 8;

impl<T> Striped<T> {
    /// This thread's stripe.
    pub(crate) fn local(&self) -> &T {
        use std::sync::atomic::AtomicUsize;
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static STRIPE: usize = NEXT.fetch_add(1, Relaxed) % STRIPES;
        }
        &self.stripes[STRIPE.with(|s| *s)]
    }

    /// Every stripe.
    pub(crate) fn all(&self) -> impl Iterator<Item = &T> {
        self.stripes.iter()
    }

    pub(crate) fn sum(&self, field: impl Fn(&T) -> &AtomicU64) -> u64 {
        self.stripes.iter().map(|t| field(t).load(Relaxed)).sum()
    }
}

/// The counters of one route (its hits, misses, ... and what its hits saved the origin).
#[derive(Debug)]
pub(crate) struct RouteCounters {
    /// The route's id: the `route` label of its metrics.
    pub(crate) id: Arc<str>,
    pattern: Arc<str>,
    pub(crate) tallies: Striped<RouteTally>,
    /// The route's `metrics` handles, taken from the recorder at the route's first event
    /// (so a hit builds no metric key: install the recorder before serving).
    #[cfg(feature = "metrics")]
    metrics: std::sync::OnceLock<RouteMetrics>,
}

/// One route's `metrics` handles.
#[cfg(feature = "metrics")]
#[derive(Debug)]
pub(crate) struct RouteMetrics {
    pub(crate) hits: metrics::Counter,
    pub(crate) stale_hits: metrics::Counter,
    pub(crate) collapsed: metrics::Counter,
    pub(crate) misses: metrics::Counter,
    pub(crate) bypasses: metrics::Counter,
    pub(crate) fills: metrics::Counter,
    bytes_served: metrics::Counter,
    origin_saved_ms: metrics::Counter,
    response_hit: metrics::Histogram,
    response_miss: metrics::Histogram,
    origin: metrics::Histogram,
}

#[cfg(feature = "metrics")]
impl RouteMetrics {
    fn register(id: &Arc<str>) -> Self {
        let counter = |name: &'static str| metrics::counter!(name, "route" => id.clone());
        let response = |cache: &'static str| {
            metrics::histogram!(
                "tower_cache_aside_response_seconds",
                "route" => id.clone(),
                "cache" => cache
            )
        };
        RouteMetrics {
            hits: counter("tower_cache_aside_hits_total"),
            stale_hits: counter("tower_cache_aside_stale_hits_total"),
            collapsed: counter("tower_cache_aside_collapsed_total"),
            misses: counter("tower_cache_aside_misses_total"),
            bypasses: counter("tower_cache_aside_bypasses_total"),
            fills: counter("tower_cache_aside_fills_total"),
            bytes_served: counter("tower_cache_aside_bytes_served_total"),
            origin_saved_ms: counter("tower_cache_aside_origin_saved_ms_total"),
            response_hit: response("hit"),
            response_miss: response("miss"),
            origin: metrics::histogram!("tower_cache_aside_origin_seconds", "route" => id.clone()),
        }
    }
}

#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct RouteTally {
    pub(crate) hits: AtomicU64,
    pub(crate) stale_hits: AtomicU64,
    pub(crate) collapsed: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) bypasses: AtomicU64,
    pub(crate) fills: AtomicU64,
    pub(crate) bytes_served: AtomicU64,
    pub(crate) origin_saved_ms: AtomicU64,
}

impl RouteCounters {
    pub(crate) fn new(id: Arc<str>, pattern: &str) -> Self {
        RouteCounters {
            id,
            pattern: Arc::from(pattern),
            tallies: Striped::default(),
            #[cfg(feature = "metrics")]
            metrics: std::sync::OnceLock::new(),
        }
    }

    /// The route's `metrics` handles (taken at the first call).
    #[cfg(feature = "metrics")]
    pub(crate) fn metrics(&self) -> &RouteMetrics {
        self.metrics
            .get_or_init(|| RouteMetrics::register(&self.id))
    }

    pub(crate) fn pattern(&self) -> &str {
        &self.pattern
    }

    /// A hit (fresh or stale) that sent `bytes` of body and saved the origin `origin_ms`.
    pub(crate) fn served(&self, bytes: u64, origin_ms: u32) {
        let t = self.tallies.local();
        t.bytes_served.fetch_add(bytes, Relaxed);
        t.origin_saved_ms.fetch_add(u64::from(origin_ms), Relaxed);
        #[cfg(feature = "metrics")]
        {
            let m = self.metrics();
            m.bytes_served.increment(bytes);
            m.origin_saved_ms.increment(u64::from(origin_ms));
        }
    }

    fn snapshot(&self) -> RouteStats {
        let t = &self.tallies;
        RouteStats {
            route: self.id.to_string(),
            pattern: self.pattern.to_string(),
            hits: t.sum(|t| &t.hits),
            stale_hits: t.sum(|t| &t.stale_hits),
            collapsed: t.sum(|t| &t.collapsed),
            misses: t.sum(|t| &t.misses),
            bypasses: t.sum(|t| &t.bypasses),
            fills: t.sum(|t| &t.fills),
            bytes_served: t.sum(|t| &t.bytes_served),
            origin_time_saved: Duration::from_millis(t.sum(|t| &t.origin_saved_ms)),
        }
    }
}

/// Times a request or an origin call for the `metrics` histograms
/// (`tower_cache_aside_response_seconds{route, cache}` and
/// `tower_cache_aside_origin_seconds{route}`); does nothing without the feature.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timer {
    #[cfg(feature = "metrics")]
    started: std::time::Instant,
}

impl Timer {
    pub(crate) fn start() -> Self {
        Self::started(std::time::Instant::now())
    }

    /// A timer started at `at`. (Its end is read from the clock itself, never a pinned
    /// instant: see `clock`.)
    pub(crate) fn started(at: std::time::Instant) -> Self {
        let _ = at;
        Timer {
            #[cfg(feature = "metrics")]
            started: at,
        }
    }

    /// A response's headers are ready: `cache` is `hit` (fresh or stale, from the store) or
    /// `miss` (after the origin or another request's call).
    pub(crate) fn response(self, route: &RouteCounters, cache: &'static str) {
        #[cfg(feature = "metrics")]
        {
            let m = route.metrics();
            let histogram = if cache == "hit" {
                &m.response_hit
            } else {
                &m.response_miss
            };
            histogram.record(self.started.elapsed().as_secs_f64());
        }
        let _ = (route, cache);
    }

    /// The origin's response headers arrived.
    pub(crate) fn origin(self, route: &RouteCounters) {
        #[cfg(feature = "metrics")]
        route
            .metrics()
            .origin
            .record(self.started.elapsed().as_secs_f64());
        let _ = route;
    }
}

/// What one route did: a row of [`CacheStats::routes`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouteStats {
    /// The route's id ([`RoutePolicy::id`](crate::RoutePolicy::id), or made from its
    /// pattern: `events_id` for `/events/{id}`); `default` for the fallback and
    /// `get_or_fill` for [`CacheHandle::get_or_fill`](crate::CacheHandle)'s values.
    pub route: String,
    /// The route's pattern (empty for the fallback and for values).
    pub pattern: String,
    /// Requests answered from a fresh entry.
    pub hits: u64,
    /// Requests answered from a stale entry (while revalidated, or because the origin failed).
    pub stale_hits: u64,
    /// Requests that waited for another's origin call and were served its response.
    pub collapsed: u64,
    /// Requests that called the origin.
    pub misses: u64,
    /// Requests that skipped the cache (credentials, `Range`, ...).
    pub bypasses: u64,
    /// Responses written to the store.
    pub fills: u64,
    /// Body bytes sent from the store (hits and stale hits; none for `HEAD` and `304`).
    pub bytes_served: u64,
    /// The origin time the hits saved: each hit adds the time its entry took the origin to
    /// produce (from the request to the body's end, as measured when it was filled).
    pub origin_time_saved: Duration,
}

impl RouteStats {
    /// The share of looked-up requests answered without calling the origin (as
    /// [`StatsSnapshot::hit_rate`]).
    pub fn hit_rate(&self) -> f64 {
        let served = self.hits + self.stale_hits + self.collapsed;
        ratio(served, served + self.misses)
    }
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

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
        self.tallies.local()
    }

    fn sum(&self, field: impl Fn(&Tally) -> &AtomicU64) -> u64 {
        self.tallies.sum(field)
    }

    /// The routes whose counters [`CacheStats::routes`] reports (the layer's table, and
    /// the values of `get_or_fill`).
    pub(crate) fn set_routes(&self, routes: Vec<Arc<RouteCounters>>) {
        *write(&self.routes) = routes;
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
        ratio(served, served + self.misses)
    }
}

impl CacheStats {
    pub(crate) fn new(breaker: Arc<Breaker>) -> Self {
        CacheStats {
            inner: Arc::default(),
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

    /// Reads every route's counters, in the route table's order (the fallback, `default`,
    /// and `get_or_fill`'s values last).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_cache_aside::{CacheLayer, RoutePolicy, RouteTable, store::MemoryStore};
    ///
    /// let layer = CacheLayer::new(MemoryStore::new(64 << 20)).routes(
    ///     RouteTable::new().route("/events/{id}", RoutePolicy::ttl(Duration::from_secs(60))),
    /// );
    /// let rows = layer.stats().routes();
    /// assert_eq!(rows[0].route, "events_id");
    /// assert_eq!(rows[0].pattern, "/events/{id}");
    /// assert_eq!(rows[0].hits, 0);
    /// ```
    pub fn routes(&self) -> Vec<RouteStats> {
        read(&self.inner.routes)
            .iter()
            .map(|r| r.snapshot())
            .collect()
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

/// Counts one event of a route, in the layer's counters and the route's:
/// `count_route!(counters, route_counters, hits)`; with the `metrics` feature, the
/// `tower_cache_aside_hits_total` counter with the route's id as its `route` label.
macro_rules! count_route {
    ($counters:expr, $route:expr, $field:ident) => {{
        use std::sync::atomic::Ordering::Relaxed;
        $counters.local().$field.fetch_add(1, Relaxed);
        let route: &$crate::stats::RouteCounters = &$route;
        route.tallies.local().$field.fetch_add(1, Relaxed);
        #[cfg(feature = "metrics")]
        route.metrics().$field.increment(1);
    }};
}
pub(crate) use count_route;
