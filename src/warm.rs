//! Cache warming: [`Warmer`] runs requests through the cached service so that their entries
//! exist before users ask, and says what it did in a [`WarmReport`].
//!
//! Each request goes through the whole service (the app with its [`CacheLayer`]), so the
//! cache's own rules decide: a fresh entry is left alone, a missing or stale one is fetched
//! from the origin (once, however many instances warm at the same time, when a lease is
//! configured), and what each request met is read from the `Cache-Status` header (RFC 9211)
//! the layer writes.
//!
//! [`CacheLayer`]: crate::CacheLayer

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HeaderMap;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Empty};
use tower_service::Service;

use crate::engine::{Recorded, Refresh, Warming, MAX_REFRESH};
use crate::error::StoreError;
use crate::handle::CacheHandle;
use crate::store::Store;

/// The request body warming requests carry: none. A service whose requests have another
/// body type takes them through a conversion, e.g. tower's
/// `ServiceExt::map_request(|r: Request<Empty<Bytes>>| r.map(MyBody::from))`.
pub type WarmBody = Empty<Bytes>;

/// Names the headers a per-user request needs (a token minted for the user, say), or
/// `None` to leave that user's entries cold.
type PerUser = Arc<dyn Fn(&str) -> Option<HeaderMap> + Send + Sync>;
type Progress = Arc<dyn Fn(&WarmReport) + Send + Sync>;

/// Most failures a report lists one by one (the rest are only counted).
const MAX_LISTED: usize = 20;

/// Runs requests through a cached service so that their entries exist before users ask
/// (from [`CacheHandle::warmer`]).
///
/// ```
/// # async fn demo() {
/// use std::time::Duration;
/// use axum::{routing::get, Router};
/// use tower_cache_aside::{CacheLayer, RoutePolicy, RouteTable, store::MemoryStore};
///
/// let cache = CacheLayer::new(MemoryStore::new(64 << 20))
///     .routes(RouteTable::new().route("/servers", RoutePolicy::ttl(Duration::from_secs(60))));
/// let app = Router::new().route("/servers", get(|| async { "[]" })).layer(cache.clone());
///
/// let warmer = cache.handle().warmer(app).concurrency(8);
/// let report = warmer.warm(["/servers", "/servers"]).await;
/// assert_eq!((report.warmed, report.fresh), (1, 1));
/// # }
/// ```
pub struct Warmer<S, St> {
    service: S,
    handle: CacheHandle<St>,
    concurrency: usize,
    timeout: Duration,
    per_user: Option<PerUser>,
    headers: HeaderMap,
    progress: Option<(Duration, Progress)>,
}

impl<S: Clone, St> Clone for Warmer<S, St> {
    fn clone(&self) -> Self {
        Warmer {
            service: self.service.clone(),
            handle: self.handle.clone(),
            concurrency: self.concurrency,
            timeout: self.timeout,
            per_user: self.per_user.clone(),
            headers: self.headers.clone(),
            progress: self.progress.clone(),
        }
    }
}

impl<S, St> fmt::Debug for Warmer<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Warmer")
            .field("concurrency", &self.concurrency)
            .field("timeout", &self.timeout)
            .field("per_user", &self.per_user.is_some())
            .finish()
    }
}

/// What a warming run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WarmReport {
    /// Requests run.
    pub requested: usize,
    /// Entries fetched from the origin and stored (or revalidated by it).
    pub warmed: usize,
    /// Entries that were fresh already (or that another request filled meanwhile): the
    /// origin was not called.
    pub fresh: usize,
    /// Stale entries now being refreshed in the background.
    pub refreshing: usize,
    /// Requests whose response could not be stored, or that failed.
    pub failed: usize,
    /// Requests the cache did not look up (an uncached route, a per-user entry with no
    /// [`Warmer::per_user`], credentials on a shared route, ...).
    pub skipped: usize,
    /// The first failures and skips, with why.
    pub problems: Vec<WarmProblem>,
    /// How long the run took.
    pub elapsed: Duration,
}

/// One request a warming run could not warm.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WarmProblem {
    /// The request's path and query.
    pub target: String,
    /// Why: the `Cache-Status` detail (`uncacheable`, `set-cookie`, `too-large`, ...), the
    /// service's error, or what kept it from being sent.
    pub reason: String,
}

/// What one request met.
enum Outcome {
    Warmed,
    Fresh,
    Refreshing,
    Failed(String),
    Skipped(String),
}

impl WarmReport {
    fn add(&mut self, target: &str, outcome: Outcome) {
        self.requested += 1;
        let problem = match outcome {
            Outcome::Warmed => return self.warmed += 1,
            Outcome::Fresh => return self.fresh += 1,
            Outcome::Refreshing => return self.refreshing += 1,
            Outcome::Failed(why) => {
                self.failed += 1;
                why
            }
            Outcome::Skipped(why) => {
                self.skipped += 1;
                why
            }
        };
        if self.problems.len() < MAX_LISTED {
            self.problems.push(WarmProblem {
                target: target.to_owned(),
                reason: problem,
            });
        }
    }
}

impl fmt::Display for WarmReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} requests in {:.1?}: {} warmed, {} fresh already, {} refreshing, {} failed, {} skipped",
            self.requested,
            self.elapsed,
            self.warmed,
            self.fresh,
            self.refreshing,
            self.failed,
            self.skipped
        )
    }
}

/// A request to warm: a path and query (`"/events?page=1"`), or a whole request built by the
/// app (its method must be GET; its headers are sent, its body is not).
#[derive(Debug)]
pub struct WarmRequest(Result<Request<()>, String>);

impl From<&str> for WarmRequest {
    fn from(target: &str) -> Self {
        WarmRequest(
            Request::get(target)
                .body(())
                .map_err(|e| format!("`{target}` is not a request target: {e}")),
        )
    }
}

impl From<String> for WarmRequest {
    fn from(target: String) -> Self {
        WarmRequest::from(target.as_str())
    }
}

impl From<Request<()>> for WarmRequest {
    fn from(req: Request<()>) -> Self {
        WarmRequest(Ok(req))
    }
}

impl<St: Store> CacheHandle<St> {
    /// A [`Warmer`] that runs its requests through `service`: the app with this cache's
    /// layer in it (requests that bypass the layer warm nothing).
    pub fn warmer<S>(&self, service: S) -> Warmer<S, St> {
        Warmer {
            service,
            handle: self.clone(),
            concurrency: 4,
            timeout: Duration::from_secs(30),
            per_user: None,
            headers: HeaderMap::new(),
            progress: None,
        }
    }
}

impl<S, St, ResBody> Warmer<S, St>
where
    S: Service<Request<WarmBody>, Response = Response<ResBody>> + Clone + Send + Sync + 'static,
    S::Future: Send,
    S::Error: fmt::Display,
    St: Store,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: fmt::Display,
{
    /// How many requests run at once (default 4; at least 1): the origin's share of a
    /// warming run.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// How long one request may take, body included, before it counts as failed
    /// (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How to ask for a user's entries: the headers (a token minted for `user`, say) a
    /// request needs so that the route's scope names that user. Without it, recorded
    /// per-user entries are skipped: the record keeps who they belong to, never their
    /// credentials.
    pub fn per_user<F>(mut self, headers: F) -> Self
    where
        F: Fn(&str) -> Option<HeaderMap> + Send + Sync + 'static,
    {
        self.per_user = Some(Arc::new(headers));
        self
    }

    /// Sends `value` as `name` with every request this warmer makes, unless the request
    /// has that header already: a service token, say, when every route is behind
    /// authentication. Mind the route's scope: credentials on a
    /// [`Scope::Shared`](crate::Scope::Shared) route make the request bypass the cache.
    pub fn header(mut self, name: http::HeaderName, value: http::HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }

    /// Calls `f` with the report so far at most once per `every` during a run (and logs
    /// progress at `info` level the same way), for long runs.
    pub fn on_progress<F>(mut self, every: Duration, f: F) -> Self
    where
        F: Fn(&WarmReport) + Send + Sync + 'static,
    {
        self.progress = Some((every, Arc::new(f)));
        self
    }

    /// Runs `requests` through the service, at most [`concurrency`](Self::concurrency) at
    /// once; only missing or stale entries call the origin.
    pub async fn warm<I>(&self, requests: I) -> WarmReport
    where
        I: IntoIterator,
        I::Item: Into<WarmRequest>,
    {
        let requests = requests.into_iter().map(|r| r.into().0);
        self.run(requests).await
    }

    /// Warms the store's record of the most requested keys (at most `limit`): what was hot
    /// before this instance started, on every instance sharing the store. Per-user entries
    /// are warmed only with [`per_user`](Self::per_user).
    pub async fn warm_recorded(&self, limit: usize) -> Result<WarmReport, StoreError> {
        let hot = self.handle.engine.store.hot(limit).await?;
        let mut undecodable = 0;
        let recorded: Vec<Recorded> = hot
            .iter()
            .filter_map(|(bytes, _)| {
                let r = Recorded::decode(bytes);
                undecodable += usize::from(r.is_none());
                r
            })
            .collect();
        if undecodable > 0 {
            tracing::warn!(undecodable, "skipping unreadable records of hot keys");
        }
        Ok(self.warm_recorded_list(recorded).await)
    }

    /// Makes this warmer the one that refreshes entries after clears, on routes with
    /// [`RoutePolicy::refresh_after_clear`](crate::RoutePolicy::refresh_after_clear): after
    /// a clear made by this instance lands, the hottest entries it made dead (up to 32,
    /// from this instance's record) are fetched again in the background.
    pub fn refresh_after_clears(&self) {
        let me: Arc<dyn Refresh> = Arc::new(self.clone());
        self.handle.engine.hot.set_refresher(me);
    }

    async fn warm_recorded_list<R: std::borrow::Borrow<Recorded>>(
        &self,
        recorded: Vec<R>,
    ) -> WarmReport {
        let requests = recorded.into_iter().map(|r| self.rebuild(r.borrow()));
        self.run(requests).await
    }

    /// The request for a recorded entry, with its user's headers when it has a user.
    fn rebuild(&self, r: &Recorded) -> Result<Request<()>, String> {
        let mut req = r
            .request()
            .body(())
            .map_err(|e| format!("`{}` cannot be asked for again: {e}", r.target))?;
        if let Some(user) = &r.user {
            let Some(make) = &self.per_user else {
                return Err(format!("per-user entry of `{user}`; no Warmer::per_user"));
            };
            let Some(headers) = make(user) else {
                return Err(format!(
                    "per-user entry of `{user}`; per_user gave no headers"
                ));
            };
            req.headers_mut().extend(headers);
        }
        Ok(req)
    }

    async fn run(&self, requests: impl Iterator<Item = Result<Request<()>, String>>) -> WarmReport {
        let started = Instant::now();
        let mut report = WarmReport::default();
        let mut running: tokio::task::JoinSet<(String, Outcome)> = tokio::task::JoinSet::new();
        let mut last_progress = Instant::now();
        for req in requests {
            while running.len() >= self.concurrency {
                if let Some(Ok((target, outcome))) = running.join_next().await {
                    report.add(&target, outcome);
                }
            }
            let req = match req {
                Ok(mut req) if req.method() == http::Method::GET => {
                    let absent: Vec<http::HeaderName> = (self.headers.keys())
                        .filter(|n| !req.headers().contains_key(*n))
                        .cloned()
                        .collect();
                    for name in absent {
                        for value in self.headers.get_all(&name) {
                            req.headers_mut().append(name.clone(), value.clone());
                        }
                    }
                    req
                }
                Ok(req) => {
                    let why = format!("{} is not GET", req.method());
                    report.add(req.uri().path(), Outcome::Skipped(why));
                    continue;
                }
                Err(why) => {
                    report.add("", Outcome::Skipped(why));
                    continue;
                }
            };
            let (service, status_name, timeout) = (
                self.service.clone(),
                self.handle.engine.status_name.clone(),
                self.timeout,
            );
            running.spawn(async move {
                let target = req
                    .uri()
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_owned();
                let outcome = tokio::time::timeout(timeout, one(service, req, &status_name))
                    .await
                    .unwrap_or_else(|_| Outcome::Failed(format!("took over {timeout:?}")));
                (target, outcome)
            });
            self.progress(&mut last_progress, &report, started);
        }
        while let Some(done) = running.join_next().await {
            if let Ok((target, outcome)) = done {
                report.add(&target, outcome);
            }
            self.progress(&mut last_progress, &report, started);
        }
        report.elapsed = started.elapsed();
        tracing::info!(%report, "cache warming done");
        report
    }

    fn progress(&self, last: &mut Instant, report: &WarmReport, started: Instant) {
        let Some((every, f)) = &self.progress else {
            return;
        };
        if last.elapsed() >= *every {
            *last = Instant::now();
            let mut so_far = report.clone();
            so_far.elapsed = started.elapsed();
            tracing::info!(report = %so_far, "warming the cache");
            f(&so_far);
        }
    }
}

/// Sends one request, reads its body to the end (the entry is stored once it has ended),
/// and reads what the cache did from its `Cache-Status`.
async fn one<S, ResBody>(mut service: S, req: Request<()>, status_name: &str) -> Outcome
where
    S: Service<Request<WarmBody>, Response = Response<ResBody>>,
    S::Error: fmt::Display,
    ResBody: Body,
    ResBody::Error: fmt::Display,
{
    if let Err(e) = std::future::poll_fn(|cx| service.poll_ready(cx)).await {
        return Outcome::Failed(format!("the service is not ready: {e}"));
    }
    let mut req = req.map(|()| Empty::new());
    req.extensions_mut().insert(Warming);
    let res = match service.call(req).await {
        Ok(res) => res,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let (parts, body) = res.into_parts();
    let mut body = std::pin::pin!(body);
    while let Some(frame) = body.frame().await {
        if let Err(e) = frame {
            return Outcome::Failed(format!("the body failed: {e}"));
        }
    }
    outcome(&parts.headers, status_name)
}

/// Reads this cache's member of the `Cache-Status` header (RFC 9211): the last one with
/// its name, since the layer appends its own after any the origin sent (an origin behind
/// another cache using the crate, say).
fn outcome(headers: &HeaderMap, status_name: &str) -> Outcome {
    let ours = headers
        .get_all(&crate::engine::CACHE_STATUS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter_map(|member| {
            let (name, params) = member.split_once(';')?;
            (name.trim() == status_name).then(|| params.trim().to_owned())
        })
        .next_back();
    let Some(params) = ours else {
        return Outcome::Skipped("not looked up by the cache (an uncached route?)".into());
    };
    let detail = params
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("detail="))
        .unwrap_or("")
        .to_owned();
    match params.split(';').next().map(str::trim).unwrap_or("") {
        // Served stale because the origin failed: nothing was warmed.
        "hit" if detail == "stale-if-error" => Outcome::Failed(detail),
        "hit" if params.contains("ttl=-") => Outcome::Refreshing,
        "hit" => Outcome::Fresh,
        "fwd=miss" if params.contains("collapsed") => Outcome::Fresh,
        "fwd=miss" if params.contains("stored") => Outcome::Warmed,
        "fwd=stale" => Outcome::Warmed,
        "fwd=bypass" => Outcome::Skipped(detail),
        _ => Outcome::Failed(detail),
    }
}

impl<S, St, ResBody> Refresh for Warmer<S, St>
where
    S: Service<Request<WarmBody>, Response = Response<ResBody>> + Clone + Send + Sync + 'static,
    S::Future: Send,
    S::Error: fmt::Display,
    St: Store,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: fmt::Display,
{
    fn refresh(&self, requests: Vec<Arc<Recorded>>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let warmer = self.clone();
        let n = requests.len().min(MAX_REFRESH);
        Box::pin(async move {
            let report = warmer.warm_recorded_list(requests).await;
            tracing::debug!(%report, n, "refreshed entries after a clear");
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.append("cache-status", v.parse().unwrap());
        h
    }

    #[test]
    fn outcomes_are_read_from_this_caches_member() {
        let read = |v: &str| match outcome(&status(v), "tca") {
            Outcome::Warmed => "warmed".to_owned(),
            Outcome::Fresh => "fresh".to_owned(),
            Outcome::Refreshing => "refreshing".to_owned(),
            Outcome::Failed(w) => format!("failed {w}"),
            Outcome::Skipped(w) => format!("skipped {w}"),
        };
        assert_eq!(read("tca; hit; ttl=30"), "fresh");
        assert_eq!(
            read("tca; hit; ttl=-3; detail=stale-while-revalidate"),
            "refreshing"
        );
        assert_eq!(read("tca; fwd=miss; stored"), "warmed");
        assert_eq!(read("tca; fwd=miss; collapsed"), "fresh");
        assert_eq!(read("tca; fwd=stale; fwd-status=304"), "warmed");
        assert_eq!(
            read("tca; fwd=miss; detail=set-cookie"),
            "failed set-cookie"
        );
        assert_eq!(
            read("tca; fwd=bypass; detail=credentials"),
            "skipped credentials"
        );
        // Another cache's member says nothing about ours.
        assert!(read("cdn; hit").starts_with("skipped"));
        assert_eq!(read("cdn; fwd=uri-miss, tca; hit; ttl=5"), "fresh");
        // An origin's own member with our name comes first; ours is the last.
        assert_eq!(read("tca; hit; ttl=9, tca; fwd=miss; stored"), "warmed");
        assert_eq!(
            read("tca; hit; ttl=-2; detail=stale-if-error"),
            "failed stale-if-error"
        );
        assert!(read("tcaX; hit").starts_with("skipped"));
    }
}
