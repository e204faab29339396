//! The path of a looked-up request, top to bottom: one store round trip; a fresh entry is
//! answered without calling the origin; a stale one is answered while one request refreshes
//! it; anything else goes down the miss path.

use std::future::Future;
use std::sync::Arc;

use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::body::CacheBody;
use super::lookup::Found;
use super::miss::OriginCall;
use super::respond::{represent, servable, Served};
use super::status::Stale;
use super::{vary, Asked, Engine, Want};
use crate::entry::{Entry, Staleness};
use crate::policy::Route;
use crate::stats::{count_route, Timer};
use crate::store::Store;

impl<St: Store> Engine<St> {
    /// Answers a request the plan said to look up: `found` is what the lookup found
    /// without waiting (boxed: the future stays small for lookups that must wait), `None`
    /// when the store is to be asked.
    ///
    /// An `async` block rather than an `async fn`, whose arguments the future would hold
    /// twice; with the call boxed and the rare variant lookup too, a lookup's future fits
    /// the allocator's per-thread cache (at most 1,032 bytes): one hit's future was 2.4 KB.
    #[allow(clippy::manual_async_fn)]
    pub(crate) fn serve<S, ReqBody, ResBody>(
        self: Arc<Self>,
        mut call: Box<OriginCall<S, ReqBody>>,
        asked: Asked,
        found: Option<Box<Found>>,
        timer: Timer,
    ) -> impl Future<Output = Result<Response<CacheBody<ResBody>>, S::Error>> + Send + 'static
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
        S::Future: Send,
        S::Error: Send + 'static,
        ReqBody: Send + 'static,
        ResBody: Body + Send + 'static,
        ResBody::Data: Send,
        ResBody::Error: Send + 'static,
    {
        async move {
            let now = asked.at_ms;
            let first = match found {
                Some(found) => *found,
                None => self.ask(&call.key, now).await,
            };
            let found = if matches!(first, Found::Varies { .. }) {
                // Boxed: rare, and its future would double this one's size (`first` moves
                // into it whole, so this future keeps no room for it).
                let resolving = Box::pin(self.variant(first, &mut call, now));
                resolving.await
            } else {
                first
            };
            // `{ found }` moves it whole: the miss's wait below keeps no room for it.
            #[allow(clippy::blocks_in_conditions)]
            let (fence, stale) = match { found } {
                Found::Hit { entry, fence } => {
                    match self.fresh_hit(entry, &call.route, &asked, timer) {
                        Some(res) => return Ok(res),
                        None => (Some(fence), None),
                    }
                }
                Found::Stale { entry, fence }
                    if entry.staleness(now) == Staleness::Revalidate
                        && servable(&entry, asked.accept_encoding.as_ref()) =>
                {
                    // Serve it now; this request, in the background, refreshes it (once).
                    let counters = call.route.counters.clone();
                    count_route!(self.stats.inner, counters, stale_hits);
                    let origin_ms = entry.origin_ms;
                    if asked.want == Want::Body {
                        if let Some(flight) = self.flights.lead(&call.key) {
                            let stale = entry.clone();
                            tokio::spawn(self.clone().refresh(*call, stale, fence, flight));
                        }
                    }
                    let served = Served::Stale(Stale::WhileRevalidate);
                    let res = self.hit_response(entry, &asked, now, served);
                    counters.served(body_len(&res), origin_ms);
                    timer.response(&counters, "hit");
                    return Ok(res);
                }
                Found::Stale { entry, fence } => (Some(fence), Some(entry)),
                Found::Miss { fence } | Found::Varies { fence, .. } => (Some(fence), None),
                Found::Unavailable => (None, None),
            };
            // Misses run in a future of their own, so a hit's future stays small to allocate
            // and move.
            let route = call.route.clone();
            let fetch = Box::pin(self.fetch(*call, asked, fence, stale));
            let res = fetch.await;
            timer.response(&route.counters, "miss");
            res
        }
    }
}

impl<St: Store> Engine<St> {
    /// The URL's responses vary on request headers the route does not key by: looks up
    /// the variant this request's values select (under `call.key`, which becomes its key).
    async fn variant<S, ReqBody>(
        &self,
        marker: Found,
        call: &mut OriginCall<S, ReqBody>,
        now: u64,
    ) -> Found {
        let Found::Varies { names, .. } = marker else {
            return marker;
        };
        match vary::variant_key(&call.primary, &names, call.req.headers()) {
            Some(variant) => {
                call.key = variant;
                match self.lookup(&call.key, now).await {
                    Found::Varies { fence, .. } => Found::Miss { fence },
                    other => other,
                }
            }
            // A value too long to key by: the origin answers, nothing is stored.
            None => Found::Unavailable,
        }
    }
}

impl<St> Engine<St> {
    /// Answers a fresh hit; `None` when the entry is stored in a coding this client refuses
    /// and that cannot be undone (the origin answers it then).
    pub(crate) fn fresh_hit<B>(
        &self,
        entry: Entry,
        route: &Route,
        asked: &Asked,
        timer: Timer,
    ) -> Option<Response<CacheBody<B>>>
    where
        B: Body,
        B::Error: 'static,
    {
        let entry = represent(entry, asked.accept_encoding.as_ref(), self.max_body_bytes).ok()?;
        let counters = &route.counters;
        count_route!(self.stats.inner, counters, hits);
        let origin_ms = entry.origin_ms;
        let res = self.answer(entry, asked, asked.at_ms, Served::Fresh);
        counters.served(body_len(&res), origin_ms);
        timer.response(counters, "hit");
        Some(res)
    }
}

/// The body bytes a response sends (none for `HEAD` and `304`).
fn body_len<B: Body>(res: &Response<B>) -> u64 {
    res.body().size_hint().exact().unwrap_or(0)
}
