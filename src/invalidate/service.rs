use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{CONTENT_LOCATION, LOCATION};
use http::{HeaderMap, Method, Request, Response, Uri};
use tower_service::Service;
use tracing::Instrument;

use super::ResponseFuture;
use crate::engine::{Clear, Engine};
use crate::policy::InvalidateTags;
use crate::store::Store;
use crate::tags::{invalidation_header_tags, push_tags, request_host, uri_tag};

/// The service made by [`InvalidateLayer`](crate::InvalidateLayer).
pub struct Invalidate<S, St> {
    pub(crate) inner: S,
    pub(crate) engine: Arc<Engine<St>>,
}

impl<S: Clone, St> Clone for Invalidate<S, St> {
    fn clone(&self) -> Self {
        Invalidate {
            inner: self.inner.clone(),
            engine: self.engine.clone(),
        }
    }
}

impl<S: std::fmt::Debug, St> std::fmt::Debug for Invalidate<S, St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invalidate")
            .field("inner", &self.inner)
            .finish()
    }
}

/// Whether a method may change what a URI holds: every method not known to be safe,
/// including those whose safety is unknown (RFC 9111 §4.4: `M-SEARCH`, WebDAV's `MOVE`...).
fn is_mutation(m: &Method) -> bool {
    const SAFE: [&str; 8] = [
        "GET", "HEAD", "OPTIONS", "TRACE", "PROPFIND", "REPORT", "SEARCH", "QUERY",
    ];
    !SAFE.contains(&m.as_str())
}

/// The path of a `Location`-like header when it points at the same host.
fn same_origin_path(headers: &HeaderMap, name: &http::HeaderName, host: &[u8]) -> Option<String> {
    let uri: Uri = headers.get(name)?.to_str().ok()?.parse().ok()?;
    match uri.authority() {
        None if uri.path().starts_with('/') => Some(uri.path().to_owned()),
        Some(a) if a.as_str().as_bytes().eq_ignore_ascii_case(host) => Some(uri.path().to_owned()),
        _ => None,
    }
}

impl<S, St, ReqBody, ResBody> Service<Request<ReqBody>> for Invalidate<S, St>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: Store,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        if !is_mutation(req.method()) {
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        let matched = self.engine.routes.find(req.uri().path());
        let route = matched.route.clone();
        if req.method() == Method::POST && route.policy.body_key.is_some() {
            // A body-keyed POST is a read (a gRPC query, say), not a write.
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        let mut tags = route.clear_tags(req.method(), &matched.params);
        let host = request_host(req.headers(), req.uri()).to_vec();
        if route.policy.clear_uri {
            tags.push(uri_tag(&host, req.uri().path()));
        }
        let mut req = req;
        if route.policy.compress.is_some() {
            // Tags of representations the layer compressed, sent back with a write.
            crate::compress::strip_validator_suffixes(req.headers_mut());
        }
        // POST, PUT, PATCH and DELETE clear on anything but a 1xx or 4xx, errors and dropped
        // requests included (a write may have happened). Other methods, whose safety is
        // unknown, clear only after a 2xx or 3xx (RFC 9111 §4.4): any client can send one,
        // and a handler that does not know it answers 405 or 501.
        let known_write = matches!(
            *req.method(),
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE
        );
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let engine = self.engine.clone();
        ResponseFuture::boxed(async move {
            // Dropped before the clear ran (the client left, an outer timeout): the handler
            // may have written, so what the route clears is cleared anyway.
            let mut unless_done = ClearOnDrop {
                engine: engine.clone(),
                tags: known_write.then(|| tags.clone()),
            };
            let result = inner.call(req).await;
            let clears = match result.as_ref().map(|r| r.status()).ok() {
                Some(s) if known_write => !(s.is_client_error() || s.is_informational()),
                Some(s) => s.is_success() || s.is_redirection(),
                None => known_write,
            };
            if !clears {
                unless_done.tags = None;
                return result;
            }
            if let Ok(res) = &result {
                if let Some(emitted) = res.extensions().get::<InvalidateTags>() {
                    push_tags(
                        &mut tags,
                        emitted.0.iter().map(String::as_str),
                        "InvalidateTags",
                    );
                }
                invalidation_header_tags(res.headers(), &mut tags);
                if route.policy.clear_uri {
                    for name in [&LOCATION, &CONTENT_LOCATION] {
                        if let Some(path) = same_origin_path(res.headers(), name, &host) {
                            tags.push(uri_tag(&host, &path));
                        }
                    }
                }
            }
            unless_done.tags = None;
            let span = tracing::debug_span!("cache.invalidate", tags = tags.len());
            // Fail-open: a failed clear is deferred (and the store bypassed) by `clear`. In a
            // task of its own, so that it runs to the end even if this future is dropped.
            let clear = async move {
                let _ = engine.clear(tags).await;
            };
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    let _ = runtime.spawn(clear.instrument(span)).await;
                }
                Err(_) => clear.instrument(span).await,
            }
            result
        })
    }
}

/// How long after a dropped mutation its tags are cleared a second time: a write the
/// dropped handler left running (a statement the database finishes anyway, a task it
/// spawned) may land after the first clear.
const SECOND_CLEAR_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Clears the tags it holds when dropped (in a task: drop cannot wait), and again a moment
/// later.
struct ClearOnDrop<St: Store> {
    engine: Arc<Engine<St>>,
    tags: Option<Vec<String>>,
}

impl<St: Store> Drop for ClearOnDrop<St> {
    fn drop(&mut self) {
        let Some(tags) = self.tags.take() else { return };
        let engine = self.engine.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let _ = engine.clear(tags.clone()).await;
                    tokio::time::sleep(SECOND_CLEAR_AFTER).await;
                    let _ = engine.clear(tags).await;
                });
            }
            // No runtime to clear from: bypass the store until a clear can land.
            Err(_) => engine.defer(Clear::Tags(tags)),
        }
    }
}
