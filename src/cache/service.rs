use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::future::ResponseFuture;
use crate::engine::{
    as_stored, Asked, Begun, Bypass, CacheBody, Engine, Found, OriginCall, Plan, Status,
};
use crate::stats::count_route;
use crate::stats::Timer;
use crate::store::Store;

/// The service made by [`CacheLayer`](crate::CacheLayer).
#[derive(Clone)]
pub struct Cache<S, St> {
    pub(crate) inner: S,
    pub(crate) engine: Arc<Engine<St>>,
}

impl<S: std::fmt::Debug, St> std::fmt::Debug for Cache<S, St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").field("inner", &self.inner).finish()
    }
}

impl<S, St, ReqBody, ResBody> Service<Request<ReqBody>> for Cache<S, St>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: Store,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Send,
{
    type Response = Response<CacheBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let (key, route) = match self.engine.plan(&parts) {
            Plan::Lookup { key, route } => (key, route),
            Plan::Skip if !self.engine.mark_everything => {
                return ResponseFuture::passthrough(
                    self.inner.call(Request::from_parts(parts, body)),
                )
            }
            // Passed through, with status headers saying why.
            skipped => {
                let why = match skipped {
                    Plan::Bypass(why, route) => {
                        count_route!(self.engine.stats.inner, route.counters, bypasses);
                        why
                    }
                    _ => Bypass::NotCached,
                };
                let fut = self.inner.call(Request::from_parts(parts, body));
                let engine = self.engine.clone();
                return ResponseFuture::annotated(fut, move |headers| {
                    engine.mark(headers, Status::Bypass(why))
                });
            }
        };
        // The one clock read of a hit answered here (see `clock`).
        let at = std::time::Instant::now();
        let asked = Asked::of(&parts, crate::clock::wall_ms_at(at));
        let timer = Timer::started(at);
        let engine = &self.engine;
        let begun = crate::clock::pinned(at, || match engine.begin_lookup(&key, asked.at_ms) {
            // A hit the store had at once is answered here: no future to allocate, nothing
            // cloned, the service below untouched (and still ready for the next call). One
            // stored compressed for a client that does not take it is decompressed in the
            // future instead, never inside `call`.
            Begun::Found(Found::Hit { entry, fence })
                if as_stored(&entry, asked.accept_encoding.as_ref()) =>
            {
                match engine.fresh_hit(entry, route, &asked, timer) {
                    Some(res) => Ok(res),
                    None => Err(Some(Box::new(Found::Miss { fence }))),
                }
            }
            Begun::Found(found) => Err(Some(Box::new(found))),
            Begun::Ask => Err(None),
        });
        // Counted after the pinned work: a key's first sighting runs the route's scope
        // function, which must not age the pinned instant.
        self.engine.seen(&key, route, &parts, asked.at_ms);
        let found = match begun {
            Ok(res) => return ResponseFuture::ready(res),
            Err(found) => found,
        };
        // The clone was not polled ready; keep it and hand the ready one to the future.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let span = tracing::debug_span!("cache.request", route = key.route());
        let call = Box::new(OriginCall {
            inner,
            req: Request::from_parts(parts, body),
            primary: key.clone(),
            key,
            route: route.clone(),
        });
        ResponseFuture::boxed(
            Box::pin(self.engine.clone().serve(call, asked, found, timer)),
            span,
        )
    }
}
