use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{CONNECTION, CONTENT_LENGTH, RANGE};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, Response};
use http_body::Body;
use tower_service::Service;
use tracing::Instrument;

use super::body::{CacheBody, Tee};
use super::flights::{wait_for, FlightGuard, Join, Landed, Landing};
use super::future::{Outcome, ResponseFuture};
use super::layer::{Shared, CACHE_STATUS, X_CACHE};
use crate::entry::{now_ms, Entry, Staleness};
use crate::key::{derive_key, EntryKey, ScopeKey};
use crate::policy::{decide, CacheHint, Decision, Freshness, Route, Scope};
use crate::stats::bump;
use crate::store::FENCE_WINDOW;
use crate::store::{Fill, FillOutcome, Store};
use crate::tags::{push_tags, request_host, take_entry_tags, uri_tag};

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

/// What to do with one request, decided before anything is awaited.
pub(crate) enum Plan {
    /// Not ours: another method or an uncached route. Untouched.
    Skip,
    /// A cacheable route, but this request must not share an entry.
    Bypass(&'static str),
    Lookup {
        key: EntryKey,
        route: Arc<Route>,
    },
}

/// The invalidation sequence a lookup saw, and when: the fill must present it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fence {
    pub(crate) seq: u64,
    pub(crate) at: Instant,
}

impl Fence {
    /// Fills older than this are dropped: the clear records that would refuse them may be gone.
    pub(crate) fn expired(&self) -> bool {
        self.at.elapsed() + Duration::from_secs(30) > FENCE_WINDOW
    }
}

/// What the lookup step found.
// Lives for one step on the stack; boxing the entry would allocate on every hit.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Found {
    Hit(Entry),
    /// Past its freshness but within a stale window (RFC 5861).
    Stale {
        entry: Entry,
        fence: Fence,
    },
    Miss {
        fence: Fence,
    },
    /// The store failed or the breaker is open: serve from the origin, do not fill.
    Unavailable,
}

impl<St: Store> Shared<St> {
    pub(crate) fn plan(&self, parts: &Parts) -> Plan {
        let matched = self.routes.find(parts.uri.path());
        let route = matched.route;
        // A POST is looked up only on a body-keyed route, once its body was read and hashed.
        let body = match parts.method {
            Method::GET | Method::HEAD => None,
            Method::POST if route.policy.body_key.is_some() => {
                match parts
                    .extensions
                    .get::<crate::body_digest::RequestBodyDigest>()
                {
                    Some(d) => Some(d.0),
                    None => return Plan::Skip,
                }
            }
            _ => return Plan::Skip,
        };
        if route.policy.freshness == Freshness::Never {
            return Plan::Skip;
        }
        if parts.headers.contains_key(RANGE) {
            return Plan::Bypass("range");
        }
        let has_credentials = self
            .credential_headers
            .iter()
            .any(|h| parts.headers.contains_key(h));
        let user;
        let scope = match &route.policy.scope {
            Scope::Shared if has_credentials => return Plan::Bypass("credentials"),
            Scope::Shared | Scope::Public => ScopeKey::Shared,
            Scope::PerUser(name_user) => {
                user = name_user(parts);
                match &user {
                    Some(u) => ScopeKey::User(u),
                    None if has_credentials => return Plan::Bypass("unknown-user"),
                    None => ScopeKey::Anonymous,
                }
            }
        };
        let key = derive_key(
            &route.id,
            parts,
            &route.policy.vary,
            &self.query_filter,
            scope,
            body.as_ref(),
        );
        Plan::Lookup {
            key,
            route: route.clone(),
        }
    }

    /// The tags an entry for this request carries: its route's, filled from the path, and
    /// its URI's. Only misses need them, so hits never pay for rendering them.
    fn entry_tags(&self, headers: &HeaderMap, uri: &http::Uri) -> Vec<String> {
        let matched = self.routes.find(uri.path());
        let mut tags = matched.route.tags(&matched.params);
        tags.push(uri_tag(request_host(headers, uri), uri.path()));
        tags
    }

    pub(crate) async fn lookup(&self, key: &EntryKey, now_ms: u64) -> Found {
        let counters = &self.stats.inner;
        if self.deferred.pending() {
            // A clear has not reached the store yet: what it holds may predate a mutation.
            bump(&counters.pending_clear_skips);
            return Found::Unavailable;
        }
        if !counters.breaker.allow() {
            bump(&counters.breaker_skips);
            return Found::Unavailable;
        }
        let lookup = match self.store.lookup(key).await {
            Ok(l) => l,
            Err(e) => {
                bump(&counters.store_errors);
                counters.breaker.failure();
                tracing::debug!(error = %e, %key, "cache lookup failed; passing through");
                return Found::Unavailable;
            }
        };
        counters.breaker.success();
        // Only misses need the fence's clock reading.
        let fence = || Fence {
            seq: lookup.fence,
            at: Instant::now(),
        };
        let Some(bytes) = lookup.value else {
            return Found::Miss { fence: fence() };
        };
        match Entry::decode(bytes) {
            // An entry filled before the last purge is dead.
            Ok(entry) if entry.fence < lookup.purged => Found::Miss { fence: fence() },
            Ok(entry) => match entry.staleness(now_ms) {
                Staleness::Fresh => Found::Hit(entry),
                Staleness::Revalidate | Staleness::IfError => Found::Stale {
                    entry,
                    fence: fence(),
                },
                Staleness::Dead => Found::Miss { fence: fence() },
            },
            Err(e) => {
                bump(&counters.decode_errors);
                tracing::warn!(%key, reason = e.0, "unreadable cache entry; treating as a miss");
                Found::Miss { fence: fence() }
            }
        }
    }

    fn status_value(&self, detail: std::fmt::Arguments<'_>) -> HeaderValue {
        use std::io::Write;
        // One allocation: the bytes the header value keeps.
        let mut v = Vec::with_capacity(self.status_name.len() + 48);
        v.extend_from_slice(self.status_name.as_bytes());
        let _ = write!(v, "; {detail}");
        HeaderValue::from_maybe_shared(bytes::Bytes::from(v))
            .unwrap_or_else(|_| HeaderValue::from_static("tower-cache-aside"))
    }

    pub(crate) fn mark(
        &self,
        headers: &mut HeaderMap,
        outcome: Outcome,
        detail: std::fmt::Arguments<'_>,
    ) {
        headers.append(&CACHE_STATUS, self.status_value(detail));
        if self.x_cache {
            let v = match outcome {
                Outcome::Hit => "HIT",
                Outcome::Stale => "STALE",
                Outcome::Miss => "MISS",
                Outcome::Bypass => "BYPASS",
            };
            headers.insert(&X_CACHE, HeaderValue::from_static(v));
        }
    }

    /// Answers from a stored entry; `served` says how, for the status headers.
    fn hit_response<B: Body>(
        &self,
        entry: Entry,
        head: bool,
        now_ms: u64,
        served: Served,
    ) -> Response<CacheBody<B>> {
        let age = entry.age_secs(now_ms);
        let ttl = entry.remaining(now_ms).map_or(0, |d| d.as_secs());
        let stale = (age as i64).saturating_sub((entry.lifetime_ms / 1000) as i64);
        let mut headers = entry.headers;
        if !headers.contains_key(CONTENT_LENGTH) {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(entry.body.len()));
        }
        // Most hits are under a second old: skip formatting (and allocating) the common case.
        let age = match age {
            0 => HeaderValue::from_static("0"),
            n => HeaderValue::from(n),
        };
        headers.insert(http::header::AGE, age);
        match served {
            Served::Fresh => {
                self.mark(&mut headers, Outcome::Hit, format_args!("hit; ttl={ttl}"));
            }
            Served::Collapsed => self.mark(
                &mut headers,
                Outcome::Hit,
                format_args!("fwd=miss; collapsed"),
            ),
            Served::Stale(why) => {
                self.mark(
                    &mut headers,
                    Outcome::Stale,
                    format_args!("hit; ttl=-{stale}; detail={why}"),
                );
            }
        }
        let body = if head {
            CacheBody::stored(bytes::Bytes::new(), None)
        } else {
            CacheBody::stored(entry.body, entry.trailers)
        };
        let mut res = Response::new(body);
        *res.status_mut() = entry.status;
        *res.headers_mut() = headers;
        res
    }
}

/// How a stored entry came to be served.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Served {
    Fresh,
    /// A waiter got what its flight's leader fetched.
    Collapsed,
    Stale(&'static str),
}

impl<St: Store> Shared<St> {
    /// Decides whether a miss's response is stored, and wraps its body accordingly.
    fn miss_response<B: Body>(
        self: &Arc<Self>,
        res: Response<B>,
        key: EntryKey,
        route: &Route,
        mut tags: Vec<String>,
        fence: Option<Fence>,
        flight: Option<FlightGuard>,
    ) -> Response<CacheBody<B>> {
        let counters = &self.stats.inner;
        bump(&counters.misses);
        let (mut parts, body) = res.into_parts();
        let Some(fence) = fence else {
            self.mark(
                &mut parts.headers,
                Outcome::Miss,
                format_args!("fwd=miss; detail=store-unavailable"),
            );
            return Response::from_parts(parts, CacheBody::passthrough(body));
        };
        let hint = parts.extensions.get::<CacheHint>();
        let uncacheable = |flight: Option<FlightGuard>| {
            if let Some(f) = flight {
                drop(f.land(Landed::Uncacheable, self.hit_for_miss));
            }
        };
        let (lifetime, initial_age_s, swr, sie) =
            match decide(&route.policy, parts.status.as_u16(), &parts.headers, hint) {
                Decision::Store {
                    lifetime,
                    initial_age_s,
                    stale_while_revalidate,
                    stale_if_error,
                } => (
                    lifetime,
                    initial_age_s,
                    stale_while_revalidate,
                    stale_if_error,
                ),
                Decision::Skip(why) => {
                    uncacheable(flight);
                    bump(&counters.uncacheable);
                    self.mark(
                        &mut parts.headers,
                        Outcome::Miss,
                        format_args!("fwd=miss; detail={why}"),
                    );
                    return Response::from_parts(parts, CacheBody::passthrough(body));
                }
            };
        let declared_len = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let known_len = declared_len.unwrap_or(0).max(body.size_hint().lower());
        if known_len > self.max_body_bytes as u64 {
            uncacheable(flight);
            bump(&counters.oversize);
            self.mark(
                &mut parts.headers,
                Outcome::Miss,
                format_args!("fwd=miss; detail=too-large"),
            );
            return Response::from_parts(parts, CacheBody::passthrough(body));
        }
        if let Some(hint) = hint {
            push_tags(&mut tags, hint.tags.iter().map(String::as_str), "CacheHint");
        }
        take_entry_tags(&mut parts.headers, &mut tags);
        let entry = Entry {
            status: parts.status,
            headers: storable_headers(&parts.headers),
            body: bytes::Bytes::new(),
            trailers: None,
            stored_at_ms: now_ms(),
            lifetime_ms: lifetime.as_millis().min(u128::from(u64::MAX)) as u64,
            initial_age_s,
            fence: fence.seq,
            stale_while_revalidate_ms: swr.as_millis().min(u128::from(u64::MAX)) as u64,
            stale_if_error_ms: sie.as_millis().min(u128::from(u64::MAX)) as u64,
            tags,
        };
        self.mark(
            &mut parts.headers,
            Outcome::Miss,
            format_args!("fwd=miss; stored"),
        );
        let shared = self.clone();
        let grpc = route.policy.grpc;
        let tee = Tee::new(
            self.max_body_bytes,
            self.stats.clone(),
            Box::new(move |body, trailers| {
                // gRPC: only a call that succeeded is stored; its status is a trailer.
                let grpc_failed = grpc && !grpc_ok(&entry.headers, trailers.as_ref());
                if grpc_failed {
                    bump(&shared.stats.inner.uncacheable);
                    if let Some(f) = flight {
                        drop(f.land(Landed::Uncacheable, shared.hit_for_miss));
                    }
                    return;
                }
                let entry = Entry {
                    body,
                    trailers,
                    ..entry
                };
                let encoded = entry.encode();
                let landing =
                    flight.map(|f| f.land(Landed::Entry(encoded.clone()), Duration::ZERO));
                shared.spawn_fill(key, encoded, entry.store_ttl(), entry.tags, fence, landing);
            }),
        );
        Response::from_parts(parts, CacheBody::filling(body, tee))
    }

    /// Writes an encoded entry in the background: the client never waits for the store on a
    /// miss.
    pub(crate) fn spawn_fill(
        self: Arc<Self>,
        key: EntryKey,
        encoded: bytes::Bytes,
        ttl: Duration,
        tags: Vec<String>,
        fence: Fence,
        landing: Option<Landing>,
    ) {
        if fence.expired() {
            bump(&self.stats.inner.fills_fenced);
            tracing::debug!(%key, "miss took longer than the fence window; not stored");
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::debug!("no Tokio runtime to fill the cache from; entry dropped");
            return;
        };
        let span = tracing::debug_span!("cache.fill", route = key.route());
        let fill = async move {
            // Dropped when this task ends: the flight stays visible until the store has it.
            let _landing = landing;
            let counters = &self.stats.inner;
            if !counters.breaker.allow() {
                bump(&counters.breaker_skips);
                return;
            }
            let fence = if self.unfenced { u64::MAX } else { fence.seq };
            match self
                .store
                .fill(Fill::new(key, encoded, ttl, tags, fence))
                .await
            {
                Ok(FillOutcome::Stored) => {
                    counters.breaker.success();
                    bump(&counters.fills);
                }
                Ok(FillOutcome::Fenced) => {
                    counters.breaker.success();
                    bump(&counters.fills_fenced);
                }
                Err(e) => {
                    bump(&counters.store_errors);
                    counters.breaker.failure();
                    tracing::debug!(error = %e, "cache fill failed");
                }
            }
        };
        runtime.spawn(fill.instrument(span));
    }
}

/// Whether a gRPC response says it succeeded: `grpc-status: 0` in the trailers, or in the
/// headers of a trailers-only response.
fn grpc_ok(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> bool {
    let status = trailers
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| headers.get("grpc-status"));
    status.is_some_and(|s| s == "0")
}

/// The headers worth storing: no hop-by-hop headers (RFC 9110 §7.6.1), no `Age` (recomputed
/// on every hit) and no `Set-Cookie` (never stored anyway).
fn storable_headers(headers: &HeaderMap) -> HeaderMap {
    const HOP_BY_HOP: [&str; 8] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "age",
    ];
    let listed: Vec<String> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || n == "set-cookie" || listed.iter().any(|l| l == n) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
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
            Plan::Skip => {
                return ResponseFuture::passthrough(
                    self.inner.call(Request::from_parts(parts, body)),
                )
            }
            Plan::Bypass(why) => {
                bump(&self.shared.stats.inner.bypasses);
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
            Plan::Lookup { key, route } => (key, route),
        };
        // The clone was not polled ready; keep it and hand the ready one to the future.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        let head = parts.method == Method::HEAD;
        ResponseFuture::boxed(Box::pin(async move {
            let req = Request::from_parts(parts, body);
            let counters = &shared.stats.inner;
            // The hit path, top to bottom: one store round trip, no inner call.
            let now = now_ms();
            let span = tracing::debug_span!("cache.lookup", route = key.route());
            let (fence, stale) = match shared.lookup(&key, now).instrument(span).await {
                Found::Hit(entry) => {
                    bump(&counters.hits);
                    return Ok(shared.hit_response(entry, head, now, Served::Fresh));
                }
                Found::Stale { entry, fence } if entry.staleness(now) == Staleness::Revalidate => {
                    // Serve it now; this request, in the background, refreshes it (once).
                    bump(&counters.stale_hits);
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
        }))
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
        ResBody: Body,
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
                                    bump(&counters.collapsed);
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
                        let ours = entry.filter(|e| fence.is_some_and(|f| e.fence >= f.seq));
                        if let Some(entry) = ours {
                            bump(&counters.collapsed);
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
                bump(&counters.stale_on_error);
                let served = Served::Stale("stale-if-error");
                return Ok(shared.hit_response(entry, head, now_ms(), served));
            }
        }
        let res = result?;
        if head {
            // A HEAD response has no body to store, and storing it would poison GET.
            bump(&counters.misses);
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
    /// Polls the store for an entry another instance (holding the lease) is fetching, at
    /// most `wait`; takes it only if no clear happened since our own lookup.
    async fn await_remote_fill(
        &self,
        key: &EntryKey,
        fence: Fence,
        wait: Duration,
    ) -> Option<Entry> {
        let deadline = Instant::now() + wait;
        let mut pause = Duration::from_millis(5);
        while Instant::now() < deadline {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
            match self.lookup(key, now_ms()).await {
                Found::Hit(entry) if entry.fence >= fence.seq => return Some(entry),
                Found::Unavailable => return None,
                _ => {}
            }
        }
        None
    }

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
        ResBody: Body,
    {
        use http_body_util::BodyExt;
        // Another refresh may have landed between our lookup and our taking the lead.
        if let Found::Hit(_) = self.lookup(&key, now_ms()).await {
            return;
        }
        bump(&self.stats.inner.refreshes);
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
