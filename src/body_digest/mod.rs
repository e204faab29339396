//! Reading and hashing request bodies for body-keyed routes (cacheable `POST`s such as gRPC
//! unary calls): [`BodyDigestLayer`], its [`BodyDigest`] service and the [`BufferedBody`] it
//! hands on. The layer sits outside [`CacheLayer`](crate::CacheLayer): it reads the body of a
//! `POST` to a route that opted in (up to that route's limit), puts the body's digest
//! in the request extensions for the cache key, and passes the same bytes on. Bodies over the
//! limit, or that fail, are passed on as they come, with no digest (and so uncached).

use std::sync::Arc;

use tower_layer::Layer;

use crate::policy::RouteTable;

mod body;
mod service;

pub use body::BufferedBody;
pub use service::BodyDigest;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

crate::service_future::response_future! {
    /// The future of [`BodyDigest`]: the inner future untouched for requests it leaves
    /// alone, else the body read and hashed, then the inner call.
}

/// Makes [`BodyDigest`] services; from [`CacheLayer::body_digest_layer`](crate::CacheLayer::body_digest_layer).
#[derive(Clone, Debug)]
#[must_use]
pub struct BodyDigestLayer {
    routes: Arc<RouteTable>,
}

impl BodyDigestLayer {
    pub(crate) fn new(routes: RouteTable) -> Self {
        BodyDigestLayer {
            routes: Arc::new(routes),
        }
    }
}

impl<S> Layer<S> for BodyDigestLayer {
    type Service = BodyDigest<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BodyDigest {
            inner,
            routes: self.routes.clone(),
        }
    }
}
