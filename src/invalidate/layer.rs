use std::sync::Arc;

use tower_layer::Layer;

use super::service::Invalidate;
use crate::cache::Shared;

/// A tower layer that clears tags after mutating requests (see the [module docs](crate::invalidate)).
///
/// Made by [`CacheLayer::invalidate_layer`](crate::CacheLayer::invalidate_layer), so that it
/// shares the cache's store, route table, counters and breaker.
///
/// ```
/// use std::time::Duration;
/// use axum::{routing::get, Router};
/// use tower_cache_aside::{CacheLayer, MemoryStore, RoutePolicy, RouteTable};
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
    pub(crate) shared: Arc<Shared<St>>,
}

impl<St> Clone for InvalidateLayer<St> {
    fn clone(&self) -> Self {
        InvalidateLayer {
            shared: self.shared.clone(),
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
            shared: self.shared.clone(),
        }
    }
}
