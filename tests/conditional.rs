//! Conditional requests (RFC 9110 §13, RFC 9111 §4.3) on every store: `If-None-Match` and
//! `If-Modified-Since` answered with `304 Not Modified` from a hit or from what a miss
//! fetched; validators taken off the request the handler sees on a miss; digest `ETag`s for
//! responses without one; a cleared entry never answered as not modified. Also the
//! conformance fixes found by the public RFC 9111 suite: methods of unknown safety
//! invalidate.

#[macro_use]
mod support;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{any, get as route_get};
use axum::Router;
use support::*;
use tower_cache_aside::store::Store;
use tower_cache_aside::{CacheLayer, CacheStats, RoutePolicy, RouteTable};

const LAST_MODIFIED: &str = "Sun, 06 Nov 1994 08:49:37 GMT";

#[derive(Clone, Default)]
struct Origin {
    version: Arc<AtomicU64>,
    calls: Arc<AtomicUsize>,
    /// The `If-None-Match` each GET reaching the handler carried.
    seen: Arc<Mutex<Vec<Option<String>>>>,
    /// The 304s the handler sent (it answers `If-None-Match` itself).
    not_modified: Arc<AtomicUsize>,
}

impl Origin {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

async fn doc(
    State(o): State<Origin>,
    Path(id): Path<String>,
    method: Method,
    headers: HeaderMap,
) -> axum::response::Response {
    if method.as_str() == "PROPFIND" {
        return StatusCode::MULTI_STATUS.into_response();
    }
    if method.as_str() == "BREW" {
        return StatusCode::NOT_IMPLEMENTED.into_response();
    }
    if method != Method::GET && method != Method::HEAD {
        o.version.fetch_add(1, Ordering::SeqCst);
        return StatusCode::NO_CONTENT.into_response();
    }
    o.calls.fetch_add(1, Ordering::SeqCst);
    let seen = headers
        .get("if-none-match")
        .map(|v| v.to_str().unwrap().to_owned());
    o.seen.lock().unwrap().push(seen.clone());
    let v = o.version.load(Ordering::SeqCst) + 1;
    if seen.as_deref() == Some(format!("\"v{v}\"").as_str()) {
        o.not_modified.fetch_add(1, Ordering::SeqCst);
        let headers = [
            ("etag", format!("\"v{v}\"")),
            ("cache-control", "max-age=60".into()),
        ];
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    (
        [
            ("etag", format!("\"v{v}\"")),
            ("last-modified", LAST_MODIFIED.to_owned()),
            ("content-type", "application/json".to_owned()),
        ],
        format!("{{\"doc\":\"{id}\",\"version\":{v}}}"),
    )
        .into_response()
}

async fn plain(State(o): State<Origin>) -> &'static str {
    o.calls.fetch_add(1, Ordering::SeqCst);
    "no validator of its own"
}

/// `/status/299` rotates a session cookie (and has an `ETag`).
fn headers_cookie(uri: &axum::http::Uri) -> Option<&'static str> {
    (uri.path() == "/status/299").then_some("session=rotated")
}

/// `/status/{code}`: that status, with the query as its `Cache-Control` (`?max-age=60`).
/// A handler that does not know a method answers 501 (`BREW`).
async fn status(
    State(o): State<Origin>,
    Path(code): Path<u16>,
    uri: axum::http::Uri,
) -> axum::response::Response {
    o.calls.fetch_add(1, Ordering::SeqCst);
    let mut res = (StatusCode::from_u16(code).unwrap(), "status body").into_response();
    if let Some(query) = uri.query() {
        res.headers_mut()
            .insert("cache-control", query.parse().unwrap());
    }
    if let Some(cookie) = headers_cookie(&uri) {
        res.headers_mut()
            .insert("set-cookie", cookie.parse().unwrap());
        res.headers_mut().insert("etag", "\"c1\"".parse().unwrap());
    }
    res
}

async fn me(State(o): State<Origin>, headers: HeaderMap) -> axum::response::Response {
    o.calls.fetch_add(1, Ordering::SeqCst);
    let user = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("anonymous")
        .to_owned();
    (
        [("etag", format!("\"u-{user}\""))],
        format!("dashboard of {user}"),
    )
        .into_response()
}

fn app<St: Store>(store: St) -> (Router, Origin, CacheStats) {
    let min = || RoutePolicy::ttl(Duration::from_secs(60));
    let routes = RouteTable::new()
        .route("/doc/{id}", min().tags(["doc:{id}"]))
        .route("/plain", min())
        .route("/raw", min().etag(false))
        .route("/me", min().per_user(bearer))
        .route("/status/{code}", min())
        .route(
            "/kept/{id}",
            RoutePolicy::ttl(Duration::from_secs(1))
                .tags(["doc:{id}"])
                .keep(Duration::from_secs(60)),
        )
        .route(
            "/swr/{id}",
            RoutePolicy::ttl(Duration::from_secs(1))
                .tags(["doc:{id}"])
                .stale_while_revalidate(Duration::from_secs(60)),
        );
    let cache = CacheLayer::new(store).routes(routes);
    let origin = Origin::default();
    let router = Router::new()
        .route("/doc/{id}", any(doc))
        .route("/kept/{id}", any(doc))
        .route("/swr/{id}", any(doc))
        .route("/plain", route_get(plain))
        .route("/raw", route_get(plain))
        .route("/me", route_get(me))
        .route("/status/{code}", route_get(status))
        .with_state(origin.clone())
        .layer(cache.invalidate_layer())
        .layer(cache.clone());
    (router, origin, cache.stats())
}

fn header<'a>(reply: &'a Reply, name: &str) -> Option<&'a str> {
    reply.headers.get(name).map(|v| v.to_str().unwrap())
}

/// A 304 as RFC 9110 §15.4.5 has it: no body, the validator and caching headers, no
/// representation headers.
fn assert_not_modified(reply: &Reply, etag: &str) {
    assert_eq!(
        reply.status,
        StatusCode::NOT_MODIFIED,
        "{:?}",
        reply.headers
    );
    assert!(reply.body.is_empty());
    assert_eq!(header(reply, "etag"), Some(etag));
    assert_eq!(header(reply, "content-type"), None);
    assert_eq!(header(reply, "content-length"), None);
}

async fn filled(router: &Router, stats: &CacheStats, uri: &str) -> Reply {
    let before = stats.snapshot().fills;
    let first = get(router, uri).await;
    assert_eq!(first.status, StatusCode::OK);
    fills_reach(stats, before + 1).await;
    first
}

mod cases {
    use super::*;

    pub async fn a_hit_answers_if_none_match_with_304<St: Store>(store: St) {
        let (router, origin, stats) = app(store);
        filled(&router, &stats, "/doc/1").await;
        for inm in ["\"v1\"", "W/\"v1\"", "\"v0\", \"v1\"", "*"] {
            let reply = get_with(&router, "/doc/1", &[("if-none-match", inm)]).await;
            assert_not_modified(&reply, "\"v1\"");
            assert_eq!(reply.x_cache(), "HIT", "{inm}");
            assert!(reply.cache_status().contains("hit"), "{inm}");
            assert!(header(&reply, "age").is_some());
        }
        // HEAD alike.
        let head = send(
            &router,
            Request::head("/doc/1")
                .header("if-none-match", "\"v1\"")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_not_modified(&head, "\"v1\"");
        // A validator that does not match: the full body, from the store.
        let other = get_with(&router, "/doc/1", &[("if-none-match", "\"v0\"")]).await;
        assert_eq!(other.status, StatusCode::OK);
        assert_eq!(other.x_cache(), "HIT");
        assert_eq!(other.text(), "{\"doc\":\"1\",\"version\":1}");
        assert_eq!(origin.calls(), 1, "every answer came from the store");
        assert_eq!(stats.snapshot().not_modified, 5);
    }

    pub async fn if_modified_since_is_answered_from_last_modified<St: Store>(store: St) {
        let (router, origin, stats) = app(store);
        filled(&router, &stats, "/doc/3").await;
        let same = get_with(&router, "/doc/3", &[("if-modified-since", LAST_MODIFIED)]).await;
        assert_not_modified(&same, "\"v1\"");
        let later = "Mon, 07 Nov 1994 08:49:37 GMT";
        let reply = get_with(&router, "/doc/3", &[("if-modified-since", later)]).await;
        assert_eq!(reply.status, StatusCode::NOT_MODIFIED);
        let earlier = "Sat, 05 Nov 1994 08:49:37 GMT";
        let reply = get_with(&router, "/doc/3", &[("if-modified-since", earlier)]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(!reply.body.is_empty());
        // If-None-Match wins over If-Modified-Since.
        let reply = get_with(
            &router,
            "/doc/3",
            &[("if-none-match", "\"v9\""), ("if-modified-since", later)],
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(origin.calls(), 1);
    }

    pub async fn a_miss_takes_the_validators_off_and_still_answers_304<St: Store>(store: St) {
        let (router, origin, stats) = app(store);
        // A client that has v1 from before (another instance, a cleared cache).
        let reply = get_with(&router, "/doc/2", &[("if-none-match", "\"v1\"")]).await;
        assert_not_modified(&reply, "\"v1\"");
        assert_eq!(reply.x_cache(), "MISS");
        assert_eq!(
            origin.seen.lock().unwrap().as_slice(),
            &[None],
            "the handler must get a request for the full response"
        );
        // The body was still read to its end and stored.
        fills_reach(&stats, 1).await;
        let hit = get(&router, "/doc/2").await;
        assert_eq!(hit.x_cache(), "HIT");
        assert_eq!(hit.text(), "{\"doc\":\"2\",\"version\":1}");
        assert_eq!(origin.calls(), 1);
        // A validator that does not match gets the full body on a miss too.
        let reply = get_with(&router, "/doc/5", &[("if-none-match", "\"v0\"")]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "{\"doc\":\"5\",\"version\":1}");
    }

    pub async fn responses_without_a_validator_get_a_digest_etag<St: Store>(store: St) {
        let (router, _origin, stats) = app(store);
        filled(&router, &stats, "/plain").await;
        let hit = get(&router, "/plain").await;
        assert_eq!(hit.x_cache(), "HIT");
        let etag = header(&hit, "etag").expect("a digest ETag").to_owned();
        assert!(etag.len() == 38 && etag.starts_with("\"tca-"), "{etag}");
        let reply = get_with(&router, "/plain", &[("if-none-match", &etag)]).await;
        assert_not_modified(&reply, &etag);
        // The same body has the same tag in another layer (another instance, a restart).
        let (other, _, other_stats) = app(tower_cache_aside::store::MemoryStore::new(1 << 20));
        filled(&other, &other_stats, "/plain").await;
        assert_eq!(
            header(&get(&other, "/plain").await, "etag"),
            Some(etag.as_str())
        );
        // Turned off for a route: no validator the handler did not send.
        filled(&router, &stats, "/raw").await;
        let raw = get(&router, "/raw").await;
        assert_eq!(raw.x_cache(), "HIT");
        assert_eq!(header(&raw, "etag"), None);
    }

    pub async fn a_miss_not_stored_goes_out_whole<St: Store>(store: St) {
        let (router, _origin, _stats) = app(store);
        // A response refused for Set-Cookie is not the cache's to validate: the client gets
        // the 200 and its cookie, even with a matching validator.
        let reply = get_with(
            &router,
            "/status/299?max-age=60",
            &[("if-none-match", "\"c1\"")],
        )
        .await;
        assert_eq!(reply.status.as_u16(), 299);
        assert_eq!(header(&reply, "set-cookie"), Some("session=rotated"));
    }

    pub async fn a_cleared_entry_is_never_answered_as_not_modified<St: Store>(store: St) {
        let (router, origin, stats) = app(store);
        filled(&router, &stats, "/doc/4").await;
        let patch = send(
            &router,
            Request::patch("/doc/4").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(patch.status, StatusCode::NO_CONTENT);
        // The client still holds v1: the origin is asked, and its v2 is not v1.
        let reply = get_with(&router, "/doc/4", &[("if-none-match", "\"v1\"")]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(header(&reply, "etag"), Some("\"v2\""));
        assert_eq!(reply.text(), "{\"doc\":\"4\",\"version\":2}");
        assert_eq!(origin.calls(), 2);
    }

    pub async fn a_304_is_only_about_the_requesters_own_entry<St: Store>(store: St) {
        let (router, origin, stats) = app(store);
        let before = stats.snapshot().fills;
        let alice = get_with(&router, "/me", &[("authorization", "Bearer alice")]).await;
        assert_eq!(header(&alice, "etag"), Some("\"u-alice\""));
        fills_reach(&stats, before + 1).await;
        // Bob presents Alice's validator: his own entry is looked up (a miss), and his
        // dashboard is not hers.
        let bob = get_with(
            &router,
            "/me",
            &[
                ("authorization", "Bearer bob"),
                ("if-none-match", "\"u-alice\""),
            ],
        )
        .await;
        assert_eq!(bob.status, StatusCode::OK);
        assert_eq!(bob.text(), "dashboard of bob");
        let again = get_with(
            &router,
            "/me",
            &[
                ("authorization", "Bearer alice"),
                ("if-none-match", "\"u-alice\""),
            ],
        )
        .await;
        assert_not_modified(&again, "\"u-alice\"");
        assert_eq!(again.x_cache(), "HIT");
        assert_eq!(origin.calls(), 2);
    }

    pub async fn preconditions_go_to_the_origin<St: Store>(store: St) {
        let (router, origin, stats) = app(store);
        filled(&router, &stats, "/doc/6").await;
        for (name, value) in [
            ("if-match", "\"v1\""),
            ("if-unmodified-since", LAST_MODIFIED),
        ] {
            let reply = get_with(&router, "/doc/6", &[(name, value)]).await;
            assert_eq!(reply.x_cache(), "BYPASS", "{name}");
            assert!(reply.cache_status().contains("detail=precondition"));
        }
        assert_eq!(origin.calls(), 3);
    }

    pub async fn statuses_that_state_their_lifetime_are_stored<St: Store>(store: St) {
        let (router, origin, stats) = app(store);
        for (code, cc) in [
            (302, "max-age=60"),
            (307, "max-age=60"),
            (503, "s-maxage=60"),
        ] {
            let uri = format!("/status/{code}?{cc}");
            let before = stats.snapshot().fills;
            let first = get(&router, &uri).await;
            assert_eq!(first.status.as_u16(), code);
            fills_reach(&stats, before + 1).await;
            let again = get(&router, &uri).await;
            assert_eq!(again.status.as_u16(), code);
            assert_eq!(again.x_cache(), "HIT", "{code}");
        }
        // Without a lifetime of its own, a 503 is not kept for the route's TTL; nor with a
        // blanket max-age (a layer that puts one on every response): only s-maxage says it
        // is meant for shared caches.
        for uri in ["/status/503", "/status/503?max-age=60"] {
            let first = get(&router, uri).await;
            assert!(
                first.cache_status().contains("detail=status"),
                "{}",
                first.cache_status()
            );
            assert_eq!(get(&router, uri).await.x_cache(), "MISS");
        }
        assert_eq!(origin.calls(), 7);
    }

    pub async fn a_kept_entry_is_revalidated_not_fetched_again<St: Store>(store: St) {
        let (router, origin, stats) = app(store);
        let first = filled(&router, &stats, "/kept/1").await;
        // Its own `max-age` would win over the route's second: this handler sends none on
        // the 200, so the entry is fresh for 1 s, then kept 60 s for revalidation.
        assert!(header(&first, "cache-control").is_none());
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let reply = get(&router, "/kept/1").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "{\"doc\":\"1\",\"version\":1}");
        assert_eq!(reply.x_cache(), "HIT");
        assert!(
            reply.cache_status().contains("fwd=stale; fwd-status=304"),
            "{}",
            reply.cache_status()
        );
        assert_eq!(
            origin.seen.lock().unwrap().as_slice(),
            &[None, Some("\"v1\"".to_owned())],
            "the origin is asked whether v1 is current"
        );
        assert_eq!(origin.not_modified.load(Ordering::SeqCst), 1);
        assert_eq!(stats.snapshot().revalidated, 1);
        // The 304's max-age=60 now rules: fresh, from the store, no origin call.
        fills_reach(&stats, 2).await;
        let hit = get(&router, "/kept/1").await;
        assert_eq!(hit.x_cache(), "HIT");
        assert!(hit.cache_status().starts_with("tower-cache-aside; hit"));
        assert_eq!(origin.calls(), 2);
        // A client's own validator is answered from the revalidated entry.
        let reply = get_with(&router, "/kept/1", &[("if-none-match", "\"v1\"")]).await;
        assert_not_modified(&reply, "\"v1\"");
    }

    pub async fn a_changed_resource_is_fetched_whole_on_revalidation<St: Store>(store: St) {
        let (router, origin, stats) = app(store);
        filled(&router, &stats, "/kept/2").await;
        // Changed behind the cache's back (no clear): the entry is only stale.
        origin.version.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let reply = get(&router, "/kept/2").await;
        assert_eq!(reply.text(), "{\"doc\":\"2\",\"version\":2}");
        assert_eq!(reply.x_cache(), "MISS");
        assert_eq!(header(&reply, "etag"), Some("\"v2\""));
        assert_eq!(stats.snapshot().revalidated, 0);
        // A clear makes the entry dead at once: nothing is revalidated, the origin sends
        // the body.
        fills_reach(&stats, 2).await;
        send(
            &router,
            Request::patch("/kept/2").body(Body::empty()).unwrap(),
        )
        .await;
        let reply = get(&router, "/kept/2").await;
        assert_eq!(reply.text(), "{\"doc\":\"2\",\"version\":3}");
        assert_eq!(origin.seen.lock().unwrap().last().unwrap(), &None);
        assert_eq!(origin.not_modified.load(Ordering::SeqCst), 0);
    }

    pub async fn a_background_refresh_revalidates<St: Store>(store: St) {
        let (router, origin, stats) = app(store);
        filled(&router, &stats, "/swr/3").await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let stale = get(&router, "/swr/3").await;
        assert_eq!(stale.x_cache(), "STALE");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while stats.snapshot().revalidated < 1 || stats.snapshot().fills < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                stats.snapshot()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(origin.not_modified.load(Ordering::SeqCst), 1);
        let hit = get(&router, "/swr/3").await;
        assert_eq!(hit.x_cache(), "HIT");
        assert_eq!(hit.text(), "{\"doc\":\"3\",\"version\":1}");
    }

    pub async fn methods_of_unknown_safety_invalidate<St: Store>(store: St) {
        let (router, origin, stats) = app(store);
        filled(&router, &stats, "/doc/7").await;
        assert_eq!(get(&router, "/doc/7").await.x_cache(), "HIT");
        let method = Method::from_bytes(b"M-SEARCH").unwrap();
        let reply = send(
            &router,
            Request::builder()
                .method(method)
                .uri("/doc/7")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::NO_CONTENT);
        let after = get(&router, "/doc/7").await;
        assert_eq!(after.x_cache(), "MISS", "M-SEARCH must clear like a POST");
        assert_eq!(after.text(), "{\"doc\":\"7\",\"version\":2}");
        // An unknown method the handler refuses (501) clears nothing: any client can send
        // one.
        fills_reach(&stats, 2).await;
        let brew = Method::from_bytes(b"BREW").unwrap();
        let refused = send(
            &router,
            Request::builder()
                .method(brew)
                .uri("/doc/7")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(refused.status, StatusCode::NOT_IMPLEMENTED);
        assert_eq!(get(&router, "/doc/7").await.x_cache(), "HIT");
        // A safe WebDAV method clears nothing.
        let propfind = Method::from_bytes(b"PROPFIND").unwrap();
        send(
            &router,
            Request::builder()
                .method(propfind)
                .uri("/doc/7")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(get(&router, "/doc/7").await.x_cache(), "HIT");
        assert_eq!(origin.calls(), 2);
    }
}

store_suite!(
    a_hit_answers_if_none_match_with_304,
    if_modified_since_is_answered_from_last_modified,
    a_miss_takes_the_validators_off_and_still_answers_304,
    responses_without_a_validator_get_a_digest_etag,
    a_cleared_entry_is_never_answered_as_not_modified,
    a_304_is_only_about_the_requesters_own_entry,
    preconditions_go_to_the_origin,
    statuses_that_state_their_lifetime_are_stored,
    a_miss_not_stored_goes_out_whole,
    a_kept_entry_is_revalidated_not_fetched_again,
    a_changed_resource_is_fetched_whole_on_revalidation,
    a_background_refresh_revalidates,
    methods_of_unknown_safety_invalidate,
);

/// Over a real HTTP/1.1 connection (hyper): the 304 has no `Content-Length: 0`, no chunked
/// framing, and the connection stays usable for the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_304_over_http1_has_no_body_framing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (router, _origin, stats) = app(tower_cache_aside::store::MemoryStore::new(1 << 20));
    filled(&router, &stats, "/doc/1").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = "GET /doc/1 HTTP/1.1\r\nhost: t\r\nif-none-match: \"v1\"\r\n\r\n\
                   GET /doc/1 HTTP/1.1\r\nhost: t\r\n\r\n";
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let body = "{\"doc\":\"1\",\"version\":1}";
    while !String::from_utf8_lossy(&seen).ends_with(body) {
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("both answers within 5 s")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&seen).to_ascii_lowercase();
    let (first, second) = text.split_at(text.find("http/1.1 200").expect("then a 200"));
    assert!(first.starts_with("http/1.1 304"), "{first}");
    assert!(!first.contains("content-length"), "{first}");
    assert!(!first.contains("transfer-encoding"), "{first}");
    assert!(second.contains("content-length: 23"), "{second}");
    server.abort();
}
