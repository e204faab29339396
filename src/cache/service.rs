use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Method, Request, Response};
use http_body::Body;
use tower_service::Service;

use super::body::CacheBody;
use super::flights::{wait_for, FlightGuard, Join, Landed};
use super::future::{Outcome, ResponseFuture};
use super::layer::Shared;
use super::lookup::{Fence, Found, Plan};
use super::respond::Served;
use crate::entry::{now_ms, Entry, Staleness};
use crate::key::EntryKey;
use crate::policy::Route;
use crate::stats::count;
use crate::store::Store;

/// The service made by [`CacheLayer`](crate::CacheLayer).
#[derive(Clone)]
pub struct Cache<S, St> {
    pub(crate) inner: S,
    pub(crate) shared: Arc<Shared<St>>,
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
        let (key, route) = match self.shared.plan(&parts) {
            Plan::Lookup { key, route } => (key, route),
            Plan::Skip if !self.shared.mark_everything => {
                return ResponseFuture::passthrough(
                    self.inner.call(Request::from_parts(parts, body)),
                )
            }
            // Passed through, with status headers saying why.
            skipped => {
                let why = match skipped {
                    Plan::Bypass(why) => {
                        count!(self.shared.stats.inner, bypasses);
                        why
                    }
                    _ => "not-cached",
                };
                let fut = self.inner.call(Request::from_parts(parts, body));
                let shared = self.shared.clone();
                return ResponseFuture::annotated(fut, move |headers| {
                    shared.mark(
                        headers,
                        Outcome::Bypass,
                        format_args!("fwd=bypass; detail={why}"),
                    )
                });
            }
        };
        // The clone was not polled ready; keep it and hand the ready one to the future.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        let head = parts.method == Method::HEAD;
        let span = tracing::debug_span!("cache.request", route = key.route());
        let fut = async move {
            let req = Request::from_parts(parts, body);
            let counters = &shared.stats.inner;
            // The hit path, top to bottom: one store round trip, no inner call.
            let now = now_ms();
            let (fence, stale) = match shared.lookup(&key, now).await {
                Found::Hit(entry) => {
                    count!(counters, hits);
                    return Ok(shared.hit_response(entry, head, now, Served::Fresh));
                }
                Found::Stale { entry, fence } if entry.staleness(now) == Staleness::Revalidate => {
                    // Serve it now; this request, in the background, refreshes it (once).
                    count!(counters, stale_hits);
                    if !head {
                        if let Some(flight) = shared.flights.lead(&key) {
                            let refresh = shared
                                .clone()
                                .refresh(inner, req, key, route, fence, flight);
                            tokio::spawn(refresh);
                        }
                    }
                    let served = Served::Stale("stale-while-revalidate");
                    return Ok(shared.hit_response(entry, head, now, served));
                }
                Found::Stale { entry, fence } => (Some(fence), Some(entry)),
                Found::Miss { fence } => (Some(fence), None),
                Found::Unavailable => (None, None),
            };
            // Misses run in a future of their own, so a hit's future stays small to allocate
            // and move.
            Box::pin(
                shared
                    .clone()
                    .fetch(inner, req, key, route, head, fence, stale),
            )
            .await
        };
        ResponseFuture::boxed(Box::pin(fut), span)
    }
}

impl<St: Store> Shared<St> {
    /// The miss path: call the origin (once per key, with stampede protection), answer with
    /// a stale entry if it fails and one is allowed, and store what it returns if allowed.
    #[allow(clippy::too_many_arguments)]
    async fn fetch<S, ReqBody, ResBody>(
        self: Arc<Self>,
        mut inner: S,
        req: Request<ReqBody>,
        key: EntryKey,
        route: Arc<Route>,
        head: bool,
        fence: Option<Fence>,
        stale: Option<Entry>,
    ) -> Result<Response<CacheBody<ResBody>>, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        ResBody: Body + Send + 'static,
        ResBody::Data: Send,
        ResBody::Error: Send + 'static,
    {
        let shared = &self;
        let counters = &self.stats.inner;
        // Stampede protection: one request per key calls the origin; the rest wait.
        let mut flight = None;
        if fence.is_some() && !head && !shared.stampede_wait.is_zero() {
            match shared.flights.join(&key) {
                Join::Leader(mut guard) => {
                    if let (Some(ttl), Some(f)) = (shared.lease, fence) {
                        match shared.store.try_lease(&key, ttl).await {
                            Ok(Some(token)) => {
                                let (store, key) = (shared.store.clone(), key.clone());
                                guard.on_done(move || {
                                    if let Ok(rt) = tokio::runtime::Handle::try_current() {
                                        rt.spawn(
                                            async move { store.release_lease(&key, token).await },
                                        );
                                    }
                                });
                            }
                            Ok(None) => {
                                // Another instance is fetching it: wait for its result.
                                if let Some(entry) = shared.await_remote_fill(&key, f, ttl).await {
                                    drop(guard.land(Landed::Entry(entry.encode()), Duration::ZERO));
                                    count!(counters, collapsed);
                                    let served = Served::Collapsed;
                                    return Ok(shared.hit_response(entry, head, now_ms(), served));
                                }
                            }
                            Err(_) => {}
                        }
                    }
                    flight = Some(guard);
                }
                Join::Waiter(rx) => match wait_for(rx, shared.stampede_wait).await {
                    Landed::Entry(bytes) => {
                        // The leader's data is ours only if no clear happened between
                        // its lookup and ours: a write acknowledged before we started
                        // would have moved the fence past the leader's.
                        let entry = Entry::decode(bytes).ok();
                        let ours =
                            entry.filter(|e| fence.is_some_and(|f| e.fence.is_at_or_after(f)));
                        if let Some(entry) = ours {
                            count!(counters, collapsed);
                            let served = Served::Collapsed;
                            return Ok(shared.hit_response(entry, head, now_ms(), served));
                        }
                    }
                    Landed::Uncacheable | Landed::Failed => {}
                },
                Join::Alone => {}
            }
        }
        let tags = shared.entry_tags(req.headers(), req.uri());
        let result = inner.call(req).await;
        // Stale-if-error: an origin failure is answered with the stale entry.
        if let Some(entry) = stale {
            let failed = match &result {
                Ok(res) => res.status().is_server_error(),
                Err(_) => true,
            };
            if failed {
                count!(counters, stale_on_error);
                let served = Served::Stale("stale-if-error");
                return Ok(shared.hit_response(entry, head, now_ms(), served));
            }
        }
        let res = result?;
        if head {
            // A HEAD response has no body to store, and storing it would poison GET.
            count!(counters, misses);
            let (mut parts, body) = res.into_parts();
            shared.mark(
                &mut parts.headers,
                Outcome::Miss,
                format_args!("fwd=miss; detail=head"),
            );
            return Ok(Response::from_parts(parts, CacheBody::passthrough(body)));
        }
        Ok(shared.miss_response(res, key, &route, tags, fence, flight))
    }
}

impl<St: Store> Shared<St> {
    /// Refreshes a stale entry in the background with the request that found it stale.
    #[allow(clippy::too_many_arguments)]
    async fn refresh<S, ReqBody, ResBody>(
        self: Arc<Self>,
        mut inner: S,
        req: Request<ReqBody>,
        key: EntryKey,
        route: Arc<Route>,
        fence: Fence,
        flight: FlightGuard,
    ) where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        ResBody: Body + Send + 'static,
        ResBody::Data: Send,
        ResBody::Error: Send + 'static,
    {
        use http_body_util::BodyExt;
        // Another refresh may have landed between our lookup and our taking the lead.
        if let Found::Hit(_) = self.lookup(&key, now_ms()).await {
            return;
        }
        count!(self.stats.inner, refreshes);
        let tags = self.entry_tags(req.headers(), req.uri());
        let Ok(res) = inner.call(req).await else {
            return; // the guard tells any waiter it failed
        };
        let res = self.miss_response(res, key, &route, tags, Some(fence), Some(flight));
        // Drain the body so the copy completes and is stored.
        let body = res.into_body();
        if body.is_filling() {
            let _ = body.collect().await;
        }
    }
}
