//! The miss path: call the origin once per key (stampede protection, in this instance and,
//! with a lease, across instances), answer with a stale entry if the origin fails and one
//! is allowed, and store what it returns when allowed. Also the background refresh of a
//! stale entry.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body::Body;
use tower_service::Service;

use super::admit::MissKeys;
use super::body::CacheBody;
use super::flights::{wait_for, FlightGuard, Join, Landed};
use super::lookup::Found;
use super::respond::{servable, Served};
use super::revalidate::{ask_about, has_validator, refreshed};
use super::status::{Miss, Stale, Status};
use super::{vary, Asked, Engine, Want};
use crate::entry::{now_ms, Entry, Staleness};
use crate::key::EntryKey;
use crate::policy::{extra_vary_names, Route, Uncacheable};
use crate::stats::{count, count_route, Timer};
use crate::store::{Fence, Store};

/// A request to send to the origin, with the key and route it was looked up under.
pub(crate) struct OriginCall<S, ReqBody> {
    pub(crate) inner: S,
    pub(crate) req: Request<ReqBody>,
    /// The key looked up: the URL's own, or a variant's (see `vary`).
    pub(crate) key: EntryKey,
    /// The URL's own key, where a marker of its variants goes.
    pub(crate) primary: EntryKey,
    pub(crate) route: Arc<Route>,
}

/// Takes the validators off a request (RFC 9111 §4.3.1 lets a cache leave them out), so
/// that the origin sends a full response to store.
fn strip_conditions(headers: &mut http::HeaderMap) {
    headers.remove(http::header::IF_NONE_MATCH);
    headers.remove(http::header::IF_MODIFIED_SINCE);
}

/// What joining a key's flight gave.
enum Joined {
    /// The leader's response varied on these request headers: join this request's variant.
    Varies(Vec<http::HeaderName>),
    /// Another request fetched it since our lookup: serve that.
    Served(Entry),
    /// Call the origin, leading the flight (when there is one).
    Lead(Option<FlightGuard>),
}

impl<St: Store> Engine<St> {
    /// Answers a miss (or a stale entry that may be served only if the origin fails).
    /// `fence` is `None` when the store could not be asked: nothing is stored then.
    #[allow(clippy::manual_async_fn)]
    pub(crate) fn fetch<S, ReqBody, ResBody>(
        self: Arc<Self>,
        mut call: OriginCall<S, ReqBody>,
        asked: Asked,
        fence: Option<Fence>,
        mut previous: Option<Entry>,
    ) -> impl std::future::Future<Output = Result<Response<CacheBody<ResBody>>, S::Error>>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        ResBody: Body + Send + 'static,
        ResBody::Data: Send,
        ResBody::Error: Send + 'static,
    {
        // An `async` block using its captures in place: an `async fn` (or a block moving
        // them into locals) would hold its arguments twice, in a future allocated for
        // every miss.
        async move {
            let want = asked.want;
            let accept = asked.accept_encoding.as_ref();
            // A stale entry this client could not take (a coding it refuses) is no use to it.
            if previous.as_ref().is_some_and(|e| !servable(e, accept)) {
                previous = None;
            }
            let mut joined = self.join_flight(&call.key, fence, &asked).await;
            if let Joined::Varies(names) = joined {
                // The URL turned out to vary: this request's variant has a flight of its own.
                joined = match vary::variant_key(&call.primary, &names, call.req.headers()) {
                    Some(variant) => {
                        call.key = variant;
                        match self.join_flight(&call.key, fence, &asked).await {
                            Joined::Varies(_) => Joined::Lead(None),
                            other => other,
                        }
                    }
                    None => Joined::Lead(None),
                };
            }
            let flight = match joined {
                Joined::Varies(_) => None,
                Joined::Served(entry) => {
                    count_route!(self.stats.inner, call.route.counters, collapsed);
                    return Ok(self.hit_response(entry, &asked, now_ms(), Served::Collapsed));
                }
                Joined::Lead(flight) => flight,
            };
            let tags = self.entry_tags(call.req.headers(), call.req.uri());
            // The client's headers, for the key of a response that turns out to vary on some of
            // them (taken before the layer changes the validators).
            let request = call.req.headers().clone();
            // What the origin is asked to confirm: the stale entry, when it has a validator.
            let mut revalidating = None;
            if let (Want::Body, Some(fence)) = (want, fence) {
                // The fill needs a full response: the client's validators are answered here.
                strip_conditions(call.req.headers_mut());
                if let Some(entry) = previous.as_ref().filter(|e| has_validator(e)) {
                    ask_about(call.req.headers_mut(), entry);
                    revalidating = Some(fence);
                }
            }
            let asked_at_ms = now_ms();
            let timer = Timer::start();
            let result = call.inner.call(call.req).await;
            timer.origin(&call.route.counters);
            // Stale-if-error: an origin failure is answered with the stale entry while its
            // window lasts.
            let now = now_ms();
            if let Some(entry) = previous
                .as_ref()
                .filter(|e| e.staleness(now) != Staleness::Dead)
            {
                let failed = match &result {
                    Ok(res) => res.status().is_server_error(),
                    Err(_) => true,
                };
                if failed {
                    count!(self.stats.inner, stale_on_error);
                    let served = Served::Stale(Stale::IfError);
                    let entry = entry.clone();
                    return Ok(self.hit_response(entry, &asked, now, served));
                }
            }
            let res = result?;
            if previous.is_some() && res.status().is_server_error() {
                // Past the stale-if-error window: the error goes out, and the stale entry is not
                // replaced by it (nor is a revalidation answered by it).
                return Ok(self.unstored(res, &call.route, Uncacheable::Status, flight));
            }
            if let (Some(fence), Some(stale)) = (revalidating, previous) {
                if res.status() == StatusCode::NOT_MODIFIED {
                    let (parts, _) = res.into_parts();
                    let entry = self.clone().revalidated(
                        MissKeys {
                            key: call.key,
                            primary: call.primary,
                            request,
                            asked_at_ms,
                        },
                        &call.route,
                        stale,
                        &parts,
                        fence,
                        flight,
                    );
                    return Ok(self.hit_response(entry, &asked, now_ms(), Served::Revalidated));
                }
            }
            if want == Want::HeadersOnly {
                // A HEAD response has no body to store, and storing it would poison GET.
                count_route!(self.stats.inner, call.route.counters, misses);
                let (mut parts, body) = res.into_parts();
                self.mark(&mut parts.headers, Status::Miss(Miss::Head));
                return Ok(Response::from_parts(parts, CacheBody::passthrough(body)));
            }
            let keys = MissKeys {
                key: call.key,
                primary: call.primary,
                request,
                asked_at_ms,
            };
            let res = self.miss_response(res, keys, &call.route, tags, fence, flight);
            // Only a response being stored is answered 304 here: it is the cache's to validate
            // (one refused for Set-Cookie, say, goes out whole, cookie and all).
            let stored = res.body().is_filling();
            match &asked.conditions {
                Some(c) if stored && c.not_modified(res.status(), res.headers(), now_ms()) => {
                    Ok(self.not_modified_miss(res))
                }
                _ => Ok(res),
            }
        }
    }

    /// Stampede protection: one request per key calls the origin; the others wait for it.
    async fn join_flight(&self, key: &EntryKey, fence: Option<Fence>, asked: &Asked) -> Joined {
        let want = asked.want;
        let accept = asked.accept_encoding.as_ref();
        let Some(fence) = fence else {
            return Joined::Lead(None);
        };
        if want == Want::HeadersOnly || self.stampede_wait.is_zero() {
            return Joined::Lead(None);
        }
        match self.flights.join(key) {
            Join::Leader(guard) if self.lease.is_none() => Joined::Lead(Some(guard)),
            // Boxed: its future (a store round trip, then perhaps a wait for another
            // instance's fill) would double the size of every miss's.
            Join::Leader(guard) => Box::pin(self.lease(key, fence, guard, accept)).await,
            Join::Waiter(rx) => match wait_for(rx, self.stampede_wait).await {
                Landed::Entry(bytes) => {
                    // The leader's data is ours only if no clear happened between its
                    // lookup and ours: a write acknowledged before we started would have
                    // moved the fence past the leader's.
                    match Entry::decode(bytes) {
                        Ok(entry)
                            if entry.fence.is_at_or_after(fence) && servable(&entry, accept) =>
                        {
                            Joined::Served(entry)
                        }
                        _ => Joined::Lead(None),
                    }
                }
                Landed::Varies(names) => Joined::Varies(names),
                Landed::Uncacheable | Landed::Failed => Joined::Lead(None),
            },
            Join::Alone => Joined::Lead(None),
        }
    }

    /// Across instances (when configured): takes the store's lease on the key, or waits
    /// for the instance holding it to fill the entry.
    async fn lease(
        &self,
        key: &EntryKey,
        fence: Fence,
        mut guard: FlightGuard,
        accept: Option<&http::HeaderValue>,
    ) -> Joined {
        let Some(ttl) = self.lease else {
            return Joined::Lead(Some(guard));
        };
        match self.store.try_lease(key, ttl).await {
            Ok(Some(token)) => {
                let (store, key) = (self.store.clone(), key.clone());
                guard.on_done(move || {
                    if let Ok(rt) = tokio::runtime::Handle::try_current() {
                        rt.spawn(async move { store.release_lease(&key, token).await });
                    }
                });
            }
            Ok(None) => {
                // Another instance is fetching it: wait for its result.
                let filled = self.await_remote_fill(key, fence, ttl).await;
                if let Some(entry) = filled.filter(|e| servable(e, accept)) {
                    drop(guard.land(Landed::Entry(entry.encode()), Duration::ZERO));
                    return Joined::Served(entry);
                }
            }
            Err(_) => {}
        }
        Joined::Lead(Some(guard))
    }

    /// A stale entry the origin confirmed with a `304`: stored again, refreshed (and the
    /// requests waiting on the key told), or, when the refreshed response may no longer be
    /// stored, answered this once as it is.
    fn revalidated(
        self: Arc<Self>,
        keys: MissKeys,
        route: &Route,
        stale: Entry,
        not_modified: &http::response::Parts,
        fence: Fence,
        flight: Option<FlightGuard>,
    ) -> Entry {
        count!(self.stats.inner, revalidated);
        match refreshed(&stale, not_modified, route, fence) {
            Some(entry) => {
                let keep = route.policy.keep;
                if keys.key != keys.primary {
                    // A variant: its URL's marker lives as long as it does.
                    if let Ok(names) = extra_vary_names(&route.policy, &entry.headers) {
                        let marker = vary::encode_marker(&names);
                        self.store_marker(keys.primary, marker, &entry, keep);
                    }
                }
                self.store_entry(keys.key, &entry, keep, flight);
                entry
            }
            None => {
                if let Some(f) = flight {
                    drop(f.land(Landed::Uncacheable, self.hit_for_miss));
                }
                stale
            }
        }
    }

    /// Refreshes a stale entry in the background with the request that found it stale:
    /// revalidated when it has a validator, else fetched again.
    pub(crate) async fn refresh<S, ReqBody, ResBody>(
        self: Arc<Self>,
        call: OriginCall<S, ReqBody>,
        stale: Entry,
        fence: Fence,
        flight: FlightGuard,
    ) where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        ResBody: Body + Send + 'static,
        ResBody::Data: Send,
        ResBody::Error: Send + 'static,
    {
        let OriginCall {
            mut inner,
            mut req,
            key,
            primary,
            route,
        } = call;
        // Another refresh may have landed between our lookup and our taking the lead.
        if let Found::Hit { .. } = self.lookup(&key, now_ms()).await {
            return;
        }
        count!(self.stats.inner, refreshes);
        let tags = self.entry_tags(req.headers(), req.uri());
        let request = req.headers().clone();
        strip_conditions(req.headers_mut());
        let revalidating = has_validator(&stale);
        if revalidating {
            ask_about(req.headers_mut(), &stale);
        }
        let asked_at_ms = now_ms();
        let timer = Timer::start();
        let result = inner.call(req).await;
        timer.origin(&route.counters);
        let Ok(res) = result else {
            return; // the guard tells any waiter it failed
        };
        if revalidating && res.status() == StatusCode::NOT_MODIFIED {
            let (parts, _) = res.into_parts();
            let keys = MissKeys {
                key,
                primary,
                request,
                asked_at_ms,
            };
            self.revalidated(keys, &route, stale, &parts, fence, Some(flight));
            return;
        }
        if res.status().is_server_error() {
            return; // the stale entry stays; the guard tells any waiter it failed
        }
        // Nobody reads this response: its body's reader task finishes the copy for the
        // store by itself, within the size limit and the flight's patience (reading it here
        // would also hold whatever comes past the limit).
        let keys = MissKeys {
            key,
            primary,
            request,
            asked_at_ms,
        };
        drop(self.miss_response(res, keys, &route, tags, Some(fence), Some(flight)));
    }
}
