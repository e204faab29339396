use std::sync::Arc;

use tower_layer::Layer;

use super::service::Invalidate;
use crate::engine::Engine;

/// A tower layer that clears tags after mutating requests: the tags a POST, PUT, PATCH,
/// DELETE (or any method not known to be safe, RFC 9111 §4.4) names are cleared after the
/// inner service answered and before the response goes out, so a client that got the
/// response reads its own write.
///
/// # Which tags
/// - the matched route's clear tags for the method ([`RoutePolicy::clears`](crate::RoutePolicy::clears),
///   [`clears_on`](crate::RoutePolicy::clears_on); by default the route's own tags), filled
///   from the path parameters;
/// - the target URI's entries (RFC 9111 §4.4), and those of a same-origin `Location` or
///   `Content-Location` in the response (unless [`clear_uri(false)`](crate::RoutePolicy::clear_uri));
/// - tags the handler emitted: an [`InvalidateTags`](crate::InvalidateTags) response extension
///   and the `Cache-Group-Invalidation` header (RFC 9875).
///
/// # On which statuses
/// Every response except 1xx and 4xx clears, and so does an error from the inner service: a
/// 2xx or 3xx means the write happened, and a 5xx or an error may follow a partial write,
/// so stale data must not survive it. A 4xx rejected the request before any write.
///
/// # When the store cannot be reached
/// The clear is deferred and retried in the background (merged into a purge if too many pile
/// up), and until it lands this instance serves nothing from the store: it never serves
/// data older than a mutation it answered.
///
/// Made by [`CacheLayer::invalidate_layer`](crate::CacheLayer::invalidate_layer), so that it
/// shares the cache's store, route table, counters and breaker.
///
/// ```
/// use std::time::Duration;
/// use axum::{routing::get, Router};
/// use tower_cache_aside::{CacheLayer, RoutePolicy, RouteTable, store::MemoryStore};
///
/// let routes = RouteTable::new()
///     .route("/events/{id}", RoutePolicy::ttl(Duration::from_secs(300)).tags(["events", "event:{id}"]));
/// let cache = CacheLayer::new(MemoryStore::new(64 << 20)).routes(routes);
/// let app: Router = Router::new()
///     .route("/events/{id}", get(|| async { "event" }).patch(|| async { "patched" }))
///     .layer(cache.invalidate_layer()) // inner: runs after the handler
///     .layer(cache); // outer: answers hits first
/// ```
#[must_use]
pub struct InvalidateLayer<St> {
    pub(crate) engine: Arc<Engine<St>>,
}

impl<St> Clone for InvalidateLayer<St> {
    fn clone(&self) -> Self {
        InvalidateLayer {
            engine: self.engine.clone(),
        }
    }
}

impl<St> std::fmt::Debug for InvalidateLayer<St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InvalidateLayer")
    }
}

impl<S, St> Layer<S> for InvalidateLayer<St> {
    type Service = Invalidate<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Invalidate {
            inner,
            engine: self.engine.clone(),
        }
    }
}
