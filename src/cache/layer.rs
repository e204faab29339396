use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use tower_layer::Layer;

use super::service::Cache;
use crate::engine::{Engine, Plan};
use crate::key::EntryKey;
use crate::policy::RouteTable;
use crate::stats::CacheStats;
use crate::store::Store;

/// The most `max_body_bytes` accepts: Valkey's largest value.
const MAX_BODY_LIMIT: usize = 512 * 1024 * 1024;

/// A tower layer that answers GET and HEAD requests from a [`Store`] and fills it on misses.
///
/// It doubles as its builder. Clones, and every service it makes, share one state (the store,
/// the route table and the counters) behind an `Arc`, so `Layer::layer` may run once per route.
///
/// ```
/// use std::time::Duration;
/// use axum::{routing::get, Router};
/// use tower_cache_aside::{CacheLayer, RoutePolicy, RouteTable, store::MemoryStore};
///
/// let routes = RouteTable::new()
///     .route("/events/{id}", RoutePolicy::ttl(Duration::from_secs(300)).tags(["events", "event:{id}"]));
/// let cache = CacheLayer::new(MemoryStore::new(64 << 20))
///     .routes(routes)
///     .ignore_query_params(["utm_*"]);
/// let app: Router = Router::new()
///     .route("/events/{id}", get(|| async { "event" }))
///     .layer(cache);
/// ```
#[derive(Clone)]
#[must_use]
pub struct CacheLayer<St> {
    pub(crate) engine: Arc<Engine<St>>,
}

impl<St: std::fmt::Debug> std::fmt::Debug for CacheLayer<St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheLayer")
            .field("store", &self.engine.store)
            .field("routes", &self.engine.routes)
            .field("max_body_bytes", &self.engine.max_body_bytes)
            .finish()
    }
}

impl<St: Store> CacheLayer<St> {
    /// A layer over `store` with an empty route table: only responses that carry their own
    /// freshness (`Cache-Control: s-maxage`/`max-age`, `Expires`, a [`CacheHint`](crate::CacheHint))
    /// are cached until routes are added.
    pub fn new(store: St) -> Self {
        CacheLayer {
            engine: Arc::new(Engine::new(store)),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Engine<St>)) -> Self {
        f(Arc::make_mut(&mut self.engine));
        self
    }

    /// Sets the route table (per-route TTL, tags, scope, statuses, vary).
    pub fn routes(self, routes: RouteTable) -> Self {
        self.edit(|s| {
            let routes = match s.compress {
                Some(encoding) => routes.with_compression(encoding),
                None => routes,
            };
            s.set_routes(routes);
        })
    }

    /// Stores bodies compressed with `encoding` on every route that does not choose for
    /// itself ([`RoutePolicy::compress`](crate::RoutePolicy::compress) has the rules), before
    /// or after [`routes`](Self::routes). Off by default.
    ///
    /// ```
    /// use tower_cache_aside::{store::MemoryStore, CacheLayer, Encoding};
    ///
    /// let cache = CacheLayer::new(MemoryStore::new(64 << 20)).compress(Encoding::Gzip);
    /// ```
    pub fn compress(self, encoding: crate::Encoding) -> Self {
        self.edit(|s| {
            s.compress = Some(encoding);
            s.routes = s.routes.with_compression(encoding);
        })
    }

    /// Leaves these query parameters out of the key. A trailing `*` matches a prefix:
    /// `["utm_*", "fbclid"]`.
    pub fn ignore_query_params<I, T>(self, params: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        self.edit(|s| {
            for p in params {
                s.query_filter.add(p.as_ref());
            }
        })
    }

    /// Largest body stored, in bytes (default 1 MiB, at most 512 MiB, Valkey's largest
    /// value). Larger bodies stream through untouched.
    pub fn max_body_bytes(self, max: usize) -> Self {
        self.edit(|s| s.max_body_bytes = max.min(MAX_BODY_LIMIT))
    }

    /// More request headers that carry credentials, on top of `Authorization` and `Cookie`
    /// (which always count). A request with any of them bypasses routes whose
    /// [`Scope`](crate::Scope) is `Shared`. Add your own, such as `x-api-key`, if your app
    /// authenticates by them.
    ///
    /// # Panics
    /// If a name is not a valid header name.
    #[track_caller]
    pub fn credential_headers<I, T>(self, headers: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        let names: Vec<HeaderName> = headers
            .into_iter()
            .map(|h| {
                HeaderName::from_bytes(h.as_ref().as_bytes())
                    .unwrap_or_else(|_| panic!("`{}` is not a valid header name", h.as_ref()))
            })
            .collect();
        self.edit(|s| {
            for name in names {
                if !s.credential_headers.contains(&name) {
                    s.credential_headers.push(name);
                }
            }
        })
    }

    /// The cache's name in `Cache-Status` (RFC 9211; default `tower-cache-aside`).
    ///
    /// # Panics
    /// If `name` is not a valid header value token.
    #[track_caller]
    pub fn cache_status_name(self, name: &str) -> Self {
        assert!(
            !name.is_empty()
                && HeaderValue::from_str(name).is_ok()
                && !name.contains([';', ',', ' ']),
            "cache_status_name `{name}` must be a token (no spaces, `;` or `,`)"
        );
        self.edit(|s| s.status_name = Arc::from(name))
    }

    /// Whether responses carry `X-Cache: HIT|MISS|BYPASS` besides `Cache-Status` (default on).
    pub fn x_cache_header(self, on: bool) -> Self {
        self.edit(|s| s.x_cache = on)
    }

    /// Whether responses the cache never looks up (other methods, uncached routes) also say
    /// so (`X-Cache: BYPASS`, `Cache-Status: …; fwd=bypass; detail=not-cached`); default off,
    /// so they pass through untouched.
    pub fn mark_every_response(self, on: bool) -> Self {
        self.edit(|s| s.mark_everything = on)
    }

    /// Circuit breaker: after `failures` consecutive store errors, skip the store for
    /// `cooldown`, then probe it with one request (default 5 failures, 1 s). It may be set
    /// at any point: nothing is reset. Clones of a layer share one breaker, as they share
    /// counters (and one store): setting it on one sets it for all.
    pub fn circuit_breaker(self, failures: u32, cooldown: Duration) -> Self {
        self.engine.breaker.configure(failures, cooldown);
        self
    }

    /// Stampede protection: how long a miss waits for another request already fetching the
    /// same key (default 10 s) before asking the origin itself. Zero turns coalescing off.
    pub fn stampede_wait(self, wait: Duration) -> Self {
        self.edit(|s| s.stampede_wait = wait)
    }

    /// How long a key whose response could not be stored is remembered, so that concurrent
    /// misses for it go to the origin at once instead of waiting on each other (Varnish's
    /// hit-for-miss; default 30 s). It never stops a later cacheable response from being stored.
    pub fn hit_for_miss(self, window: Duration) -> Self {
        self.edit(|s| s.hit_for_miss = window)
    }

    /// Stampede protection across instances: before calling the origin on a miss, take a
    /// lease on the key in the store (`SET NX PX` with a token on Valkey) for at most `ttl`.
    /// An instance that finds the lease taken polls the store for the holder's result, up to
    /// `ttl`, then asks the origin itself. Off by default: it costs a round trip per miss.
    pub fn stampede_lease(self, ttl: Duration) -> Self {
        self.edit(|s| s.lease = Some(ttl).filter(|t| !t.is_zero()))
    }

    /// How many of the most requested keys the layer records (default 1024, at most 65,536;
    /// 0 turns the record off). Each instance counts its looked-up GET requests per key and keeps the
    /// top ones with what it takes to ask for them again (path, query, `Host`, the headers
    /// the route varies by, and the user of a per-user entry; never a request keyed by a
    /// credential header, and never those headers; a secret in a query string is recorded
    /// as it is: turn the record off for such apps); every
    /// [`hot_flush_every`](Self::hot_flush_every) it adds its counts to the store's
    /// record, which a [`Warmer`](crate::Warmer) warms a new instance from.
    pub fn record_hot_keys(self, capacity: usize) -> Self {
        let capacity = capacity.min(crate::engine::MAX_HOT_KEYS);
        let every = self.engine.hot.flush_every();
        self.edit(|s| s.hot = Arc::new(crate::engine::Hot::new(capacity, every)))
    }

    /// How often the record of the most requested keys is added to the store's (default
    /// 30 s, at least 1 s); [`CacheHandle::flush_hot_keys`](crate::CacheHandle::flush_hot_keys) adds it now.
    pub fn hot_flush_every(self, every: Duration) -> Self {
        // Each flush halves the counts: more often than this, they would mean nothing.
        let every = every.max(Duration::from_secs(1));
        let capacity = self.engine.hot.capacity();
        self.edit(|s| s.hot = Arc::new(crate::engine::Hot::new(capacity, every)))
    }

    /// The layer's counters (shared with every service it made).
    pub fn stats(&self) -> CacheStats {
        self.engine.stats.clone()
    }

    /// The layer that clears tags after mutations, sharing this layer's store, routes,
    /// counters and breaker. Put it between this layer and the app (or on the mutating
    /// routes): `.layer(cache.invalidate_layer()).layer(cache)` in axum, whose last layer
    /// runs first.
    pub fn invalidate_layer(&self) -> crate::InvalidateLayer<St> {
        crate::InvalidateLayer {
            engine: self.engine.clone(),
        }
    }

    /// A handle for handlers and background jobs: clear tags, purge, cache values.
    pub fn handle(&self) -> crate::CacheHandle<St> {
        crate::CacheHandle {
            engine: self.engine.clone(),
        }
    }

    /// The layer that reads and hashes request bodies for body-keyed routes
    /// ([`RoutePolicy::keyed_by_body`](crate::RoutePolicy::keyed_by_body), [`grpc`](crate::RoutePolicy::grpc)).
    /// Put it outside this layer: in tonic, `Server::builder().layer(cache.body_digest_layer()).layer(cache)`.
    pub fn body_digest_layer(&self) -> crate::BodyDigestLayer {
        crate::BodyDigestLayer::new(self.engine.routes.clone())
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.engine.store
    }

    /// The key a GET or HEAD request with these parts would be cached under, or `None` when
    /// it would not be looked up (another method, an uncached route, a bypass). For a URL
    /// whose responses vary on headers the route does not declare, this key holds the marker
    /// of its variants, not a response: removing it does not remove them. Clear tags to
    /// reach every variant.
    pub fn entry_key(&self, parts: &Parts) -> Option<EntryKey> {
        match self.engine.plan(parts) {
            Plan::Lookup { key, .. } => Some(key),
            _ => None,
        }
    }
}

impl<S, St: Store> Layer<S> for CacheLayer<St> {
    type Service = Cache<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Cache {
            inner,
            engine: self.engine.clone(),
        }
    }
}
