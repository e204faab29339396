//! The admin endpoint: a tower service an app mounts under a path of its choice, behind its
//! own authentication, that reads the cache's figures and acts on it, in JSON.
//!
//! | request | does |
//! |---|---|
//! | `GET  stats` | the counters, hit rate and breaker, one row per route, the hottest keys |
//! | `POST purge` | makes every entry dead (O(1)) |
//! | `POST invalidate` | clears tags: a JSON body `{"tags": ["event:7"]}` or `?tag=event:7&tag=…` |
//! | `GET  inspect?url=/events/7` | what is cached for that request: route, key, whose, age, TTL, tags, size |
//! | `POST remove?url=/events/7` | makes every entry of that path dead (all queries, users, variants) |
//! | `POST warm?limit=100` | warms the store's record of the most requested keys |
//!
//! `inspect` and `remove` take the request's `Host` from an absolute `url`, else from a
//! `host` parameter, else from the admin request's own host; `inspect` takes request
//! headers (a user's token, `Accept-Language`, ...) as `header=name:value`, repeated
//! (percent-encode the values: `url=%2Fevents%3Fpage%3D2`). When a route's scope reads what
//! authentication put in the request, [`AdminService::prepare`] does the same for
//! `inspect`. A clear the store cannot take now is deferred, as the layer defers it, and
//! answered `202 {"deferred": true}`.
//!
//! Every answer is JSON; errors are `{"error": "..."}` with a 4xx or 5xx status, and a
//! request that is refused in part is refused whole (no tag is cleared when one is not
//! valid). The service does no authentication of its own: mount it behind the app's.
//!
//! ```
//! use axum::{extract::Request, middleware::{self, Next}, response::Response, Router};
//! use axum::http::StatusCode;
//! use tower_cache_aside::{CacheLayer, store::MemoryStore};
//!
//! async fn operators_only(req: Request, next: Next) -> Result<Response, StatusCode> {
//!     let token = req.headers().get("authorization").and_then(|v| v.to_str().ok());
//!     match token {
//!         Some(t) if t == "Bearer let-me-in" => Ok(next.run(req).await),
//!         _ => Err(StatusCode::UNAUTHORIZED),
//!     }
//! }
//!
//! let cache = CacheLayer::new(MemoryStore::new(64 << 20));
//! let app: Router = Router::new(); // the app's routes, with `.layer(cache.clone())`
//! // The admin service behind the operators' check, beside (not inside) the app.
//! let admin = Router::new()
//!     .nest_service("/admin/cache", cache.admin_service())
//!     .route_layer(middleware::from_fn(operators_only));
//! let app = app.merge(admin);
//! ```

use crate::entry::millis;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{json, Value};
use tower_service::Service;

use crate::engine::{Engine, Inspection};
use crate::error::StoreError;
use crate::store::Store;
use crate::tags::{is_user_tag, request_host, uri_tag};
use crate::warm::{WarmBody, WarmReport, Warmer};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Most tags one `invalidate` may clear.
pub const MAX_ADMIN_TAGS: usize = 1000;
/// Largest request body the admin service reads.
const MAX_BODY: usize = 256 * 1024;
/// Most keys `warm` runs.
const MAX_WARM: usize = 10_000;
/// Most query parameters a request may have (more are refused, never cut short).
const MAX_PARAMS: usize = 256;
/// Most request headers `inspect` takes.
const MAX_HEADERS: usize = 32;

type WarmFn = Arc<
    dyn Fn(usize) -> Pin<Box<dyn Future<Output = Result<WarmReport, StoreError>> + Send>>
        + Send
        + Sync,
>;

/// The admin service (from [`CacheLayer::admin_service`](crate::CacheLayer::admin_service)):
/// see [the module](self) for its requests.
pub struct AdminService<St> {
    engine: Arc<Engine<St>>,
    warm: Option<WarmFn>,
    prepare: Option<Prepare>,
}

type Prepare = Arc<dyn Fn(&mut http::request::Parts) + Send + Sync>;

impl<St> Clone for AdminService<St> {
    fn clone(&self) -> Self {
        AdminService {
            engine: self.engine.clone(),
            warm: self.warm.clone(),
            prepare: self.prepare.clone(),
        }
    }
}

impl<St> fmt::Debug for AdminService<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminService")
            .field("warm", &self.warm.is_some())
            .finish()
    }
}

impl<St: Store> crate::CacheLayer<St> {
    /// The admin service over this layer's store, rules and counters: mount it behind the
    /// app's authentication (see [`admin`](crate::admin)).
    pub fn admin_service(&self) -> AdminService<St> {
        AdminService {
            engine: self.engine.clone(),
            warm: None,
            prepare: None,
        }
    }
}

impl<St: Store> AdminService<St> {
    /// Runs `f` on the request `inspect` looks up before the layer sees it, as the app's
    /// own middleware would: when a route's scope reads what authentication put in the
    /// request's extensions (a user id), `f` puts it there from the headers given.
    pub fn prepare<F>(mut self, f: F) -> Self
    where
        F: Fn(&mut http::request::Parts) + Send + Sync + 'static,
    {
        self.prepare = Some(Arc::new(f));
        self
    }

    /// Lets `POST warm` run this warmer over the store's record of the most requested keys
    /// (without one, `warm` answers `501`).
    pub fn warmer<S, ResBody>(mut self, warmer: Warmer<S, St>) -> Self
    where
        S: Service<Request<WarmBody>, Response = Response<ResBody>> + Clone + Send + Sync + 'static,
        S::Future: Send,
        S::Error: fmt::Display,
        ResBody: Body + Send + 'static,
        ResBody::Data: Send,
        ResBody::Error: fmt::Display,
    {
        self.warm = Some(Arc::new(move |limit| {
            let warmer = warmer.clone();
            Box::pin(async move { warmer.warm_recorded(limit).await })
        }));
        self
    }
}

/// The admin service's future.
pub type AdminFuture =
    Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, std::convert::Infallible>> + Send>>;

impl<St, B> Service<Request<B>> for AdminService<St>
where
    St: Store,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<Full<Bytes>>;
    type Error = std::convert::Infallible;
    type Future = AdminFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let answer = me.answer(req).await;
            Ok(answer.unwrap_or_else(|e| e.response()))
        })
    }
}

/// A refusal: its status and what to do about it.
struct Refusal(StatusCode, String);

impl Refusal {
    fn bad(message: impl Into<String>) -> Self {
        Refusal(StatusCode::BAD_REQUEST, message.into())
    }

    fn store(e: StoreError) -> Self {
        Refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the store did not answer ({e}); try again when it is back"),
        )
    }

    /// A clear the store could not take now: the layer keeps it, bypasses the store until
    /// it lands, and retries (accepted, not failed).
    fn deferred(e: StoreError) -> Self {
        Refusal(
            StatusCode::ACCEPTED,
            format!("the store did not answer ({e}); the clear is deferred: the cache is bypassed until it lands"),
        )
    }

    fn too_large(message: String) -> Self {
        Refusal(StatusCode::PAYLOAD_TOO_LARGE, message)
    }

    fn response(self) -> Response<Full<Bytes>> {
        if self.0 == StatusCode::ACCEPTED {
            return json_response(self.0, &json!({ "deferred": true, "message": self.1 }));
        }
        json_response(self.0, &json!({ "error": self.1 }))
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    res
}

impl<St: Store> AdminService<St> {
    async fn answer<B>(&self, req: Request<B>) -> Result<Response<Full<Bytes>>, Refusal>
    where
        B: Body,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path().trim_end_matches('/');
        let action = path.rsplit('/').next().unwrap_or("");
        let query = Query::parse(parts.uri.query().unwrap_or(""))?;
        let wants = |method: Method| -> Result<(), Refusal> {
            if parts.method == method {
                Ok(())
            } else {
                Err(Refusal(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("`{action}` takes {method}, not {}", parts.method),
                ))
            }
        };
        let value = match action {
            "stats" => {
                wants(Method::GET)?;
                self.stats()
            }
            "purge" => {
                wants(Method::POST)?;
                let seq = self.engine.purge_all().await.map_err(Refusal::deferred)?;
                json!({ "purged": true, "seq": seq })
            }
            "invalidate" => {
                wants(Method::POST)?;
                let body = read_body(body).await?;
                let tags = tags_asked(&query, &body)?;
                let done = (self.engine.clear(tags.clone()).await).map_err(Refusal::deferred)?;
                json!({ "cleared": tags, "epoch": done.epoch, "seq": done.seq })
            }
            "inspect" => {
                wants(Method::GET)?;
                let mut probe = probe(&query, &parts)?;
                if let Some(prepare) = &self.prepare {
                    prepare(&mut probe);
                }
                let found = self.engine.inspect(&probe).await.map_err(Refusal::store)?;
                inspection(&probe, &found)
            }
            "remove" => {
                wants(Method::POST)?;
                let probe = probe(&query, &parts)?;
                let host = request_host(&probe.headers, &probe.uri);
                let shown = String::from_utf8_lossy(host).into_owned();
                let tag = uri_tag(host, probe.uri.path());
                let done = (self.engine.clear(vec![tag]).await).map_err(Refusal::deferred)?;
                json!({ "removed": probe.uri.path(), "host": shown, "seq": done.seq })
            }
            "warm" => {
                wants(Method::POST)?;
                let limit = match query.get("limit") {
                    None => 100,
                    Some(n) => n
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_WARM).contains(n))
                        .ok_or_else(|| {
                            Refusal::bad(format!("`limit` must be 1 to {MAX_WARM}, not `{n}`"))
                        })?,
                };
                let Some(warm) = &self.warm else {
                    return Err(Refusal(
                        StatusCode::NOT_IMPLEMENTED,
                        "no warmer: give the admin service one with AdminService::warmer".into(),
                    ));
                };
                let report = warm(limit).await.map_err(Refusal::store)?;
                warm_report(&report)
            }
            _ => {
                return Err(Refusal(
                    StatusCode::NOT_FOUND,
                    format!(
                        "no admin request `{action}`: use stats, purge, invalidate, inspect, remove or warm"
                    ),
                ))
            }
        };
        Ok(json_response(StatusCode::OK, &value))
    }

    fn stats(&self) -> Value {
        let stats = &self.engine.stats;
        let s = stats.snapshot();
        let routes: Vec<Value> = stats
            .routes()
            .iter()
            .map(|r| {
                json!({
                    "route": r.route, "pattern": r.pattern, "hits": r.hits,
                    "stale_hits": r.stale_hits, "collapsed": r.collapsed, "misses": r.misses,
                    "bypasses": r.bypasses, "fills": r.fills, "bytes_served": r.bytes_served,
                    "origin_time_saved_ms": millis(r.origin_time_saved),
                    "hit_rate": r.hit_rate(),
                })
            })
            .collect();
        let hot: Vec<Value> = self
            .engine
            .hot
            .top(20)
            .iter()
            .map(|(r, n)| json!({ "target": r.target, "user": r.user, "requests": n }))
            .collect();
        let recent: Vec<Value> = self
            .engine
            .recent
            .list()
            .iter()
            .rev()
            .map(|c| {
                let at = c.at.duration_since(std::time::UNIX_EPOCH).map_or(0, millis);
                json!({ "at_ms": at, "tags": c.tags, "purge": c.purge, "seq": c.seq })
            })
            .collect();
        json!({
            "hit_rate": s.hit_rate(),
            "breaker_open": s.breaker_open,
            "counters": {
                "hits": s.hits, "misses": s.misses, "bypasses": s.bypasses, "fills": s.fills,
                "fills_fenced": s.fills_fenced, "fills_dropped": s.fills_dropped,
                "uncacheable": s.uncacheable, "oversize": s.oversize,
                "store_errors": s.store_errors, "decode_errors": s.decode_errors,
                "breaker_skips": s.breaker_skips, "breaker_trips": s.breaker_trips,
                "invalidations": s.invalidations, "clears_deferred": s.clears_deferred,
                "pending_clear_skips": s.pending_clear_skips, "collapsed": s.collapsed,
                "stale_hits": s.stale_hits, "stale_on_error": s.stale_on_error,
                "refreshes": s.refreshes, "not_modified": s.not_modified,
                "revalidated": s.revalidated,
            },
            "routes": routes,
            "hot": hot,
            "recent_clears": recent,
        })
    }
}

async fn read_body<B>(body: B) -> Result<Bytes, Refusal>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Refusal::too_large(format!(
            "the body is over {MAX_BODY} bytes"
        ))),
        Err(e) => Err(Refusal::bad(format!("the body could not be read: {e}"))),
    }
}

/// The tags an `invalidate` names, all valid, or a refusal naming the first that is not.
fn tags_asked(query: &Query, body: &[u8]) -> Result<Vec<String>, Refusal> {
    let mut tags: Vec<String> = query.all("tag").map(str::to_owned).collect();
    if !body.iter().all(u8::is_ascii_whitespace) {
        let parsed: Value = serde_json::from_slice(body).map_err(|e| {
            Refusal::bad(format!(
                r#"the body is not JSON like {{"tags": ["event:7"]}} ({e})"#
            ))
        })?;
        let Some(list) = parsed.get("tags").and_then(Value::as_array) else {
            return Err(Refusal::bad(
                r#"the body needs a "tags" array: {"tags": ["event:7"]}"#,
            ));
        };
        for t in list {
            let Some(t) = t.as_str() else {
                return Err(Refusal::bad(format!("tag {t} is not a string")));
            };
            tags.push(t.to_owned());
        }
    }
    if tags.is_empty() {
        return Err(Refusal::bad(r#"no tags: give {"tags": [...]} or ?tag=..."#));
    }
    if tags.len() > MAX_ADMIN_TAGS {
        return Err(Refusal::too_large(format!(
            "{} tags; at most {MAX_ADMIN_TAGS} per request: split them",
            tags.len()
        )));
    }
    if let Some(bad) = tags.iter().find(|t| !is_user_tag(t)) {
        return Err(Refusal::bad(format!(
            "`{}` is not a valid tag (1 to {} visible ASCII characters, not starting with `~`); nothing was cleared",
            bad.escape_debug(),
            crate::tags::MAX_TAG_LEN
        )));
    }
    tags.sort();
    tags.dedup();
    Ok(tags)
}

/// The request an `inspect` or `remove` asks about: a GET of `url`, its `Host` and the
/// given headers.
fn probe(query: &Query, admin: &http::request::Parts) -> Result<http::request::Parts, Refusal> {
    let url = query
        .get("url")
        .ok_or_else(|| Refusal::bad("give the URL to look at: ?url=/events/7"))?;
    let uri: Uri = url
        .parse()
        .map_err(|e| Refusal::bad(format!("`{}` is not a URL ({e})", url.escape_debug())))?;
    if uri.path_and_query().is_none() || !uri.path().starts_with('/') {
        return Err(Refusal::bad(format!(
            "`{}` has no path",
            url.escape_debug()
        )));
    }
    let mut req = Request::get(uri.clone());
    let mut headers = http::HeaderMap::new();
    for (i, h) in query.all("header").enumerate() {
        if i >= MAX_HEADERS {
            return Err(Refusal::bad(format!("at most {MAX_HEADERS} headers")));
        }
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| Refusal::bad(format!("`{}` is not `name:value`", h.escape_debug())))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| Refusal::bad(format!("`{}` is not a header name", name.escape_debug())))?;
        let value = HeaderValue::from_str(value.trim()).map_err(|_| {
            Refusal::bad(format!("`{}` is not a header value", value.escape_debug()))
        })?;
        headers.append(name, value);
    }
    let host = match (uri.authority(), query.get("host")) {
        (Some(a), _) => HeaderValue::from_str(a.as_str()).ok(),
        (None, Some(h)) => Some(
            HeaderValue::from_str(h)
                .map_err(|_| Refusal::bad(format!("`{}` is not a host", h.escape_debug())))?,
        ),
        // The admin request's own host: its `Host`, or its URI's authority (HTTP/2).
        (None, None) => match headers.get(HOST).or(admin.headers.get(HOST)) {
            Some(h) => Some(h.clone()),
            None => (admin.uri.authority()).and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        },
    };
    if let Some(host) = host {
        headers.insert(HOST, host);
    }
    if let Some(h) = req.headers_mut() {
        *h = headers;
    }
    let (parts, ()) = req
        .body(())
        .map_err(|e| Refusal::bad(format!("not a request: {e}")))?
        .into_parts();
    Ok(parts)
}

fn inspection(probe: &http::request::Parts, found: &Inspection) -> Value {
    let mut out = json!({
        "url": probe.uri.to_string(),
        "route": found.route,
        "pattern": found.pattern,
        "looked_up": found.bypass.is_none(),
        "cached": found.entry.is_some(),
        "state": found.state(),
    });
    let fields = out.as_object_mut().expect("an object");
    if let Some(why) = found.unavailable {
        // What the layer would do now: pass through, whatever the store holds.
        fields.insert("served_from_cache".into(), json!(false));
        fields.insert("why".into(), json!(why));
    }
    if let Some(why) = found.bypass {
        fields.insert("bypass".into(), json!(why));
        return out;
    }
    fields.insert("key".into(), json!(found.key));
    fields.insert("scope".into(), json!(found.scope));
    fields.insert("user".into(), json!(found.user));
    if !found.varies_on.is_empty() {
        let names: Vec<&str> = found.varies_on.iter().map(HeaderName::as_str).collect();
        fields.insert("varies_on".into(), json!(names));
    }
    let Some(e) = &found.entry else {
        return out;
    };
    let header = |name: http::header::HeaderName| {
        e.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let now = found.now_ms;
    let tags: Vec<&String> = e.tags.iter().filter(|t| is_user_tag(t)).collect();
    fields.insert("status".into(), json!(e.status.as_u16()));
    fields.insert("age_s".into(), json!(e.age_secs(now)));
    fields.insert(
        "ttl_s".into(),
        json!(e.remaining(now).map_or(0, |d| d.as_secs())),
    );
    fields.insert("size".into(), json!(e.body.len()));
    fields.insert("tags".into(), json!(tags));
    fields.insert("etag".into(), json!(header(http::header::ETAG)));
    fields.insert("content_type".into(), json!(header(CONTENT_TYPE)));
    fields.insert(
        "content_encoding".into(),
        json!(header(http::header::CONTENT_ENCODING)),
    );
    fields.insert("origin_ms".into(), json!(e.origin_ms));
    out
}

fn warm_report(r: &WarmReport) -> Value {
    let problems: Vec<Value> = r
        .problems
        .iter()
        .map(|p| json!({ "target": p.target, "reason": p.reason }))
        .collect();
    json!({
        "requested": r.requested, "warmed": r.warmed, "fresh": r.fresh,
        "refreshing": r.refreshing, "failed": r.failed, "skipped": r.skipped,
        "elapsed_ms": millis(r.elapsed), "problems": problems,
    })
}

/// A form-encoded query, decoded (`+` is a space, `%XX` a byte; invalid UTF-8 is replaced).
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: &str) -> Result<Query, Refusal> {
        let decode = |s: &str| {
            let bytes = s.as_bytes();
            let mut out = Vec::with_capacity(bytes.len());
            let mut i = 0;
            while i < bytes.len() {
                match bytes[i] {
                    b'+' => out.push(b' '),
                    b'%' if i + 2 < bytes.len() => {
                        let hex = |b: u8| (b as char).to_digit(16);
                        match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                            (Some(hi), Some(lo)) => {
                                out.push((hi * 16 + lo) as u8);
                                i += 2;
                            }
                            _ => out.push(b'%'),
                        }
                    }
                    b => out.push(b),
                }
                i += 1;
            }
            String::from_utf8_lossy(&out).into_owned()
        };
        let params: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
        if params.len() > MAX_PARAMS {
            return Err(Refusal::too_large(format!(
                "{} query parameters; at most {MAX_PARAMS} (give many tags as a JSON body)",
                params.len()
            )));
        }
        Ok(Query(
            params
                .into_iter()
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (decode(k), decode(v))
                })
                .collect(),
        ))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode_and_odd_escapes_never_panic() {
        let q = Query::parse("url=%2Fevents%2F7%3Fa%3D1&tag=a+b&tag=%&tag=%4&tag=%zz&tag=%C3%A9&x")
            .ok()
            .unwrap();
        assert_eq!(q.get("url"), Some("/events/7?a=1"));
        let tags: Vec<&str> = q.all("tag").collect();
        assert_eq!(tags, ["a b", "%", "%4", "%zz", "é"]);
        assert_eq!(q.get("x"), Some(""));
        for odd in ["%", "%%", "a=%e2%82", "=%", "é=%é", "%é1"] {
            let _ = Query::parse(odd);
        }
        let many: Vec<String> = (0..=MAX_PARAMS).map(|i| format!("tag=t{i}")).collect();
        match Query::parse(&many.join("&")) {
            Err(r) => assert_eq!(r.0, StatusCode::PAYLOAD_TOO_LARGE),
            Ok(_) => panic!("too many parameters were taken"),
        }
    }

    #[test]
    fn tags_are_refused_whole() {
        let q = Query::parse("").ok().unwrap();
        assert!(tags_asked(&q, br#"{"tags": ["a", "b"]}"#).is_ok());
        for bad in [
            &br#"{"tags": ["a", "has space"]}"#[..],
            br#"{"tags": ["~u:reserved"]}"#,
            br#"{"tags": [1]}"#,
            br#"{"tag": ["a"]}"#,
            b"not json",
            br#"{"tags": []}"#,
        ] {
            assert!(
                tags_asked(&q, bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let many: Vec<String> = (0..=MAX_ADMIN_TAGS).map(|i| format!("t{i}")).collect();
        let body = serde_json::to_vec(&json!({ "tags": many })).unwrap();
        assert_eq!(
            tags_asked(&q, &body).err().map(|r| r.0),
            Some(StatusCode::PAYLOAD_TOO_LARGE)
        );
    }
}
