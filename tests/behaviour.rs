//! The behaviour suite, run against MemoryStore, Valkey and Redis alike.

#[macro_use]
mod support;

use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use bytes::Bytes;
use support::*;
use tower_cache_aside::{
    store::{Fill, MemoryStore, Store},
    CacheLayer,
};

fn layer<St: Store>(store: St) -> CacheLayer<St> {
    CacheLayer::new(store)
        .routes(routes())
        .ignore_query_params(["utm_*"])
}

mod cases {
    use super::*;

    pub async fn hit_does_not_call_inner<St: Store>(store: St) {
        let l = layer(store);
        let stats = l.stats();
        let (app, calls) = app(l);
        let first = get(&app, "/items/1").await;
        assert_eq!((first.text().as_str(), first.x_cache()), ("item 1", "MISS"));
        assert!(
            first.cache_status().contains("fwd=miss; stored"),
            "{}",
            first.cache_status()
        );
        fills_reach(&stats, 1).await;
        for _ in 0..3 {
            let hit = get(&app, "/items/1").await;
            assert_eq!((hit.text().as_str(), hit.x_cache()), ("item 1", "HIT"));
            assert!(hit.headers.contains_key("age"));
            assert!(
                hit.cache_status()
                    .starts_with("tower-cache-aside; hit; ttl="),
                "{}",
                hit.cache_status()
            );
            assert_eq!(hit.headers["content-length"], "6");
        }
        assert_eq!(calls.get(), 1, "hits must not call the inner service");
        let s = stats.snapshot();
        assert_eq!((s.hits, s.misses, s.fills), (3, 1, 1));
        // A different id is a different entry.
        assert_eq!(get(&app, "/items/2").await.text(), "item 2");
        assert_eq!(calls.get(), 2);
    }

    pub async fn query_order_does_not_split_keys<St: Store>(store: St) {
        let l = layer(store);
        let stats = l.stats();
        let (app, calls) = app(l);
        assert_eq!(get(&app, "/items?a=1&b=2").await.x_cache(), "MISS");
        fills_reach(&stats, 1).await;
        let r = get(&app, "/items?b=2&a=1").await;
        assert_eq!((r.x_cache(), r.text().as_str()), ("HIT", "items a=1&b=2"));
        assert_eq!(
            get(&app, "/items?a=1&b=2&utm_source=mail").await.x_cache(),
            "HIT"
        );
        assert_eq!(get(&app, "/items?a=1&b=3").await.x_cache(), "MISS");
        assert_eq!(calls.get(), 2);
    }

    pub async fn hosts_and_declared_vary_split_keys<St: Store>(store: St) {
        let l = layer(store);
        let stats = l.stats();
        let (app, calls) = app(l);
        assert_eq!(
            get_with(&app, "/echo-host", &[("host", "a.example")])
                .await
                .text(),
            "a.example"
        );
        fills_reach(&stats, 1).await;
        let b = get_with(&app, "/echo-host", &[("host", "b.example")]).await;
        assert_eq!((b.text().as_str(), b.x_cache()), ("b.example", "MISS"));
        fills_reach(&stats, 2).await;
        assert_eq!(
            get_with(&app, "/echo-host", &[("host", "a.example")])
                .await
                .text(),
            "a.example"
        );
        assert_eq!(calls.get(), 2);

        let en = get_with(&app, "/lang", &[("accept-language", "en")]).await;
        assert_eq!(en.text(), "en");
        fills_reach(&stats, 3).await;
        let fr = get_with(&app, "/lang", &[("accept-language", "fr")]).await;
        assert_eq!((fr.text().as_str(), fr.x_cache()), ("fr", "MISS"));
        fills_reach(&stats, 4).await;
        let en = get_with(&app, "/lang", &[("accept-language", "en")]).await;
        assert_eq!((en.text().as_str(), en.x_cache()), ("en", "HIT"));
        // A Vary on a header the route does not declare: stored as a variant of the URL,
        // per value of that header (tests/vary.rs has the rest).
        assert_eq!(get(&app, "/vary-undeclared").await.x_cache(), "MISS");
        fills_reach(&stats, 6).await; // the variant and its marker
        assert_eq!(get(&app, "/vary-undeclared").await.x_cache(), "HIT");
        let gzip = get_with(&app, "/vary-undeclared", &[("accept-encoding", "gzip")]).await;
        assert_eq!(gzip.x_cache(), "MISS", "another variant");
    }

    pub async fn unstorable_responses_are_never_stored<St: Store>(store: St) {
        let l = layer(store);
        let stats = l.stats();
        let (app, calls) = app(l);
        for (path, why) in [
            ("/cookie", "set-cookie"),
            ("/nostore", "no-store"),
            ("/private", "private"),
            ("/error", "status"),
        ] {
            let before = calls.get();
            for _ in 0..2 {
                let r = get(&app, path).await;
                assert_eq!(r.x_cache(), "MISS", "{path}");
                assert!(
                    r.cache_status().contains(why),
                    "{path}: {}",
                    r.cache_status()
                );
                settle().await;
            }
            assert_eq!(
                calls.get(),
                before + 2,
                "{path} must reach the app every time"
            );
        }
        // The Set-Cookie still reaches the client that caused it.
        assert_eq!(
            get(&app, "/cookie").await.headers["set-cookie"],
            "session=secret"
        );
        assert_eq!(stats.snapshot().fills, 0);
        // 404 is heuristically cacheable.
        assert_eq!(get(&app, "/missing").await.status, 404);
        fills_reach(&stats, 1).await;
        let r = get(&app, "/missing").await;
        assert_eq!(
            (r.status.as_u16(), r.x_cache(), r.text().as_str()),
            (404, "HIT", "not here")
        );
    }

    pub async fn credentials_bypass_shared_routes<St: Store>(store: St) {
        let l = layer(store);
        let stats = l.stats();
        let (app, calls) = app(l);
        get(&app, "/items/7").await;
        fills_reach(&stats, 1).await;
        for h in [("authorization", "Bearer alice"), ("cookie", "session=1")] {
            let r = get_with(&app, "/items/7", &[h]).await;
            assert_eq!(r.x_cache(), "BYPASS", "{h:?}");
            assert!(r.cache_status().contains("fwd=bypass; detail=credentials"));
        }
        assert_eq!(calls.get(), 3);
        settle().await;
        assert_eq!(
            stats.snapshot().fills,
            1,
            "bypassed responses are not stored"
        );
        // A public route serves everyone, credentials or not.
        get(&app, "/public").await;
        fills_reach(&stats, 2).await;
        let r = get_with(&app, "/public", &[("authorization", "Bearer bob")]).await;
        assert_eq!(r.x_cache(), "HIT");
        // Apps that authenticate by other headers declare them; `Authorization` and `Cookie`
        // still count.
        let l = layer(MemoryStore::new(1 << 20)).credential_headers(["x-api-key"]);
        let (app2, _) = support::app(l);
        for h in [
            ("x-api-key", "k"),
            ("cookie", "session=alice"),
            ("authorization", "a"),
        ] {
            let r = get_with(&app2, "/items/7", &[h]).await;
            assert_eq!(r.x_cache(), "BYPASS", "{h:?}");
        }
        // A GET with a body: the key does not cover the body, so it is not shared.
        let with_body = Request::get("/items/7")
            .header("content-length", "5")
            .body(Body::from("hello"))
            .unwrap();
        let r = send(&app, with_body).await;
        assert_eq!(r.x_cache(), "BYPASS");
        assert!(
            r.cache_status().contains("detail=request-body"),
            "{}",
            r.cache_status()
        );
        let empty = Request::get("/items/7")
            .header("content-length", "0")
            .body(Body::empty())
            .unwrap();
        assert_eq!(send(&app, empty).await.x_cache(), "HIT");
        // Range requests never share the full entry.
        let r = get_with(&app, "/items/7", &[("range", "bytes=0-1")]).await;
        assert_eq!(r.x_cache(), "BYPASS");
    }

    pub async fn users_never_see_each_others_responses<St: Store>(store: St) {
        let l = layer(store);
        let stats = l.stats();
        let (app, calls) = app(l);
        let alice = [("authorization", "Bearer alice")];
        let bob = [("authorization", "Bearer bob")];
        assert_eq!(
            get_with(&app, "/me", &alice).await.text(),
            "hello Bearer alice"
        );
        fills_reach(&stats, 1).await;
        let b = get_with(&app, "/me", &bob).await;
        assert_eq!(
            (b.text().as_str(), b.x_cache()),
            ("hello Bearer bob", "MISS")
        );
        fills_reach(&stats, 2).await;
        for _ in 0..3 {
            let a = get_with(&app, "/me", &alice).await;
            assert_eq!(
                (a.text().as_str(), a.x_cache()),
                ("hello Bearer alice", "HIT")
            );
            let b = get_with(&app, "/me", &bob).await;
            assert_eq!(
                (b.text().as_str(), b.x_cache()),
                ("hello Bearer bob", "HIT")
            );
        }
        let anon = get(&app, "/me").await;
        assert_eq!(anon.text(), "hello anonymous");
        // Credentials that name no user bypass rather than share the anonymous entry.
        fills_reach(&stats, 3).await;
        let odd = get_with(&app, "/me", &[("authorization", "Basic Zm9vOmJhcg==")]).await;
        assert_eq!(
            (odd.x_cache(), odd.text().as_str()),
            ("BYPASS", "hello Basic Zm9vOmJhcg==")
        );
        let odd = get_with(&app, "/me", &[("cookie", "a=b")]).await;
        assert_eq!(odd.x_cache(), "BYPASS");
        assert_eq!(calls.get(), 5);
    }

    pub async fn head_never_poisons_get<St: Store>(store: St) {
        let l = layer(store);
        let stats = l.stats();
        let (app, calls) = app(l);
        let head = |uri: &str| Request::head(uri).body(Body::empty()).unwrap();
        let h = send(&app, head("/items/3")).await;
        assert_eq!((h.x_cache(), h.body.len()), ("MISS", 0));
        settle().await;
        assert_eq!(stats.snapshot().fills, 0, "a HEAD response is never stored");
        let g = get(&app, "/items/3").await;
        assert_eq!((g.x_cache(), g.text().as_str()), ("MISS", "item 3"));
        fills_reach(&stats, 1).await;
        let g = get(&app, "/items/3").await;
        assert_eq!((g.x_cache(), g.text().as_str()), ("HIT", "item 3"));
        let h = send(&app, head("/items/3")).await;
        assert_eq!((h.x_cache(), h.body.len()), ("HIT", 0));
        assert_eq!(h.headers["content-length"], "6");
        assert_eq!(calls.get(), 2);
    }

    pub async fn oversized_bodies_stream_through_intact<St: Store>(store: St) {
        let l = layer(store).max_body_bytes(BIG_CHUNK * 2);
        let stats = l.stats();
        let (app, calls) = app(l);
        for _ in 0..2 {
            let r = get(&app, "/big").await;
            assert_eq!(r.status, 200);
            assert_eq!(r.body.len(), BIG_CHUNK * BIG_CHUNKS);
            assert!(r.body == big_expected(), "streamed body altered");
            settle().await;
        }
        let r = get(&app, "/big-declared").await;
        assert_eq!(r.body.len(), BIG_CHUNK * 4);
        assert!(
            r.cache_status().contains("too-large"),
            "{}",
            r.cache_status()
        );
        assert_eq!(calls.get(), 3);
        let s = stats.snapshot();
        assert_eq!((s.fills, s.oversize), (0, 3));
    }

    pub async fn large_bodies_within_the_limit_are_stored<St: Store>(store: St) {
        let l = layer(store).max_body_bytes(BIG_CHUNK * BIG_CHUNKS);
        let stats = l.stats();
        let (app, calls) = app(l);
        assert!(get(&app, "/big").await.body == big_expected());
        fills_reach(&stats, 1).await;
        let r = get(&app, "/big").await;
        assert_eq!(r.x_cache(), "HIT");
        assert!(r.body == big_expected());
        assert_eq!(calls.get(), 1);
    }

    /// One absurd lifetime (`CacheHint::ttl(Duration::MAX)`, `max-age=99999999999999999`)
    /// among good responses: clamped to 2^31 s, stored, and never failing another fill.
    pub async fn absurd_lifetimes_are_clamped<St: Store>(store: St) {
        use axum::extract::Path;
        use axum::response::IntoResponse;
        use tower_cache_aside::{CacheHint, RoutePolicy, RouteTable};
        let routes = RouteTable::new().route("/r/{n}", RoutePolicy::ttl(Duration::from_secs(60)));
        let l = CacheLayer::new(store).routes(routes);
        let stats = l.stats();
        let app = axum::Router::new()
            .route(
                "/r/{n}",
                axum::routing::get(|Path(n): Path<u32>| async move {
                    match n % 10 {
                        0 => {
                            let mut r = format!("forever {n}").into_response();
                            r.extensions_mut().insert(CacheHint::ttl(Duration::MAX));
                            r
                        }
                        5 => (
                            [("cache-control", "max-age=99999999999999999")],
                            format!("forever {n}"),
                        )
                            .into_response(),
                        _ => format!("ok {n}").into_response(),
                    }
                }),
            )
            .layer(l);
        const N: u64 = 200;
        for n in 0..N {
            assert_eq!(get(&app, &format!("/r/{n}")).await.x_cache(), "MISS");
        }
        fills_reach(&stats, N).await;
        for n in 0..N {
            let r = get(&app, &format!("/r/{n}")).await;
            assert_eq!(r.x_cache(), "HIT", "/r/{n}");
            if n % 5 == 0 {
                // An `Age` of 0 and a lifetime of at most 2^31 s, not an overflow.
                let ttl: u64 = r
                    .cache_status()
                    .split("ttl=")
                    .nth(1)
                    .and_then(|t| t.split(';').next()?.trim().parse().ok())
                    .expect("a ttl in Cache-Status");
                assert!(ttl <= 1 << 31, "{ttl}");
            }
        }
        let s = stats.snapshot();
        assert_eq!((s.store_errors, s.breaker_trips), (0, 0), "{s:?}");
    }

    /// `Surrogate-Key` and `Cache-Tag` are for the cache: no client sees them, whichever path
    /// the response took (stored, hit, skipped, bypassed, HEAD, too large, uncached route).
    pub async fn cache_only_headers_never_reach_clients<St: Store>(store: St) {
        use axum::extract::Path;
        use axum::response::IntoResponse;
        use tower_cache_aside::{RoutePolicy, RouteTable};
        let routes = RouteTable::new()
            .route("/t/{kind}", RoutePolicy::ttl(Duration::from_secs(60)))
            .route("/u", RoutePolicy::never());
        let l = CacheLayer::new(store).routes(routes).max_body_bytes(64);
        let stats = l.stats();
        let tagged = |kind: &str| {
            let (cc, body) = match kind {
                "skip" => ("no-store", "x".to_owned()),
                "big" => ("max-age=60", "x".repeat(1000)),
                _ => ("max-age=60", "x".to_owned()),
            };
            (
                [
                    ("surrogate-key", "a b"),
                    ("cache-tag", "c,d"),
                    ("cache-control", cc),
                ],
                body,
            )
                .into_response()
        };
        let app = axum::Router::new()
            .route(
                "/t/{kind}",
                axum::routing::get(move |Path(kind): Path<String>| async move { tagged(&kind) }),
            )
            .route("/u", axum::routing::get(move || async move { tagged("u") }))
            .layer(l);
        let leaks = |r: &Reply| {
            r.headers.contains_key("surrogate-key") || r.headers.contains_key("cache-tag")
        };
        let miss = get(&app, "/t/stored").await;
        assert!(!leaks(&miss), "stored miss");
        fills_reach(&stats, 1).await;
        let hit = get(&app, "/t/stored").await;
        assert_eq!(hit.x_cache(), "HIT");
        assert!(!leaks(&hit), "hit");
        for path in ["/t/skip", "/t/big", "/u"] {
            assert!(!leaks(&get(&app, path).await), "{path}");
        }
        let r = get_with(&app, "/t/other", &[("authorization", "Bearer a")]).await;
        assert_eq!(r.x_cache(), "BYPASS");
        assert!(!leaks(&r), "bypass");
        let head = Request::head("/t/fresh").body(Body::empty()).unwrap();
        assert!(!leaks(&send(&app, head).await), "HEAD miss");
    }

    /// A body that ends before its `Content-Length` (no error, just fewer bytes) is passed on
    /// as it is, and never stored for others.
    pub async fn a_body_shorter_than_declared_is_not_stored<St: Store>(store: St) {
        use axum::response::IntoResponse;
        use tower_cache_aside::{RoutePolicy, RouteTable};
        let routes = RouteTable::new().route("/short", RoutePolicy::ttl(Duration::from_secs(60)));
        let l = CacheLayer::new(store).routes(routes);
        let stats = l.stats();
        let app = axum::Router::new()
            .route(
                "/short",
                axum::routing::get(|| async {
                    let mut r = "abc".into_response();
                    r.headers_mut()
                        .insert("content-length", axum::http::HeaderValue::from_static("10"));
                    r
                }),
            )
            .layer(l);
        for _ in 0..2 {
            let r = get(&app, "/short").await;
            assert_eq!((r.x_cache(), r.text().as_str()), ("MISS", "abc"));
            settle().await;
        }
        let s = stats.snapshot();
        assert_eq!((s.fills, s.hits), (0, 0), "{s:?}");
    }

    /// Routers match the raw path: `/items/%66eatured` reaches the `{id}` handler (a 404,
    /// cacheable) while `/items/featured` reaches its own. Their keys must differ, or the
    /// first poisons the second.
    pub async fn escapes_never_merge_paths_a_router_tells_apart<St: Store>(store: St) {
        use axum::extract::Path;
        use axum::http::StatusCode;
        use axum::response::IntoResponse;
        use tower_cache_aside::{RoutePolicy, RouteTable};
        let routes =
            RouteTable::new().route("/items/{id}", RoutePolicy::ttl(Duration::from_secs(60)));
        let l = CacheLayer::new(store).routes(routes);
        let stats = l.stats();
        let app = axum::Router::new()
            .route(
                "/items/featured",
                axum::routing::get(|| async { "the featured items" }),
            )
            .route(
                "/items/{id}",
                axum::routing::get(|Path(id): Path<String>| async move {
                    (StatusCode::NOT_FOUND, format!("no item {id}")).into_response()
                }),
            )
            .layer(l);
        let odd = get(&app, "/items/%66eatured").await;
        assert_eq!(
            (odd.status.as_u16(), odd.text().as_str()),
            (404, "no item featured")
        );
        fills_reach(&stats, 1).await;
        assert_eq!(get(&app, "/items/%66eatured").await.x_cache(), "HIT");
        let real = get(&app, "/items/featured").await;
        assert_eq!(
            (real.status.as_u16(), real.text().as_str()),
            (200, "the featured items")
        );
    }

    pub async fn garbage_in_the_store_is_a_miss<St: Store>(store: St) {
        let l = layer(store.clone());
        let stats = l.stats();
        let (parts, ()) = Request::get("/items/9").body(()).unwrap().into_parts();
        let key = l.entry_key(&parts).expect("cacheable");
        let (app, calls) = app(l);
        for (i, garbage) in [&b""[..], b"TCA\x01", b"not an entry at all", &[0xff; 300]]
            .into_iter()
            .enumerate()
        {
            // Stamped as current by the store: the garbage reaches the layer's decoder.
            let fence = store.lookup(&key).await.unwrap().fence;
            let fill = Fill::new(
                key.clone(),
                Bytes::from(garbage.to_vec()),
                Duration::from_secs(60),
                vec![],
                fence,
            );
            store.fill(fill).await.unwrap();
            let r = get(&app, "/items/9").await;
            assert_eq!(
                (r.status.as_u16(), r.x_cache(), r.text().as_str()),
                (200, "MISS", "item 9")
            );
            fills_reach(&stats, i as u64 + 1).await;
        }
        let s = stats.snapshot();
        assert_eq!(s.decode_errors, 4);
        // The miss overwrote the garbage with a good entry.
        assert_eq!(get(&app, "/items/9").await.x_cache(), "HIT");
        assert_eq!(calls.get(), 4);
    }

    pub async fn other_methods_and_uncached_routes_pass_through<St: Store>(store: St) {
        let l = layer(store);
        let stats = l.stats();
        let (app, calls) = app(l);
        for _ in 0..2 {
            let r = send(&app, Request::post("/items/1").body(Body::empty()).unwrap()).await;
            assert_eq!((r.text().as_str(), r.x_cache()), ("posted", ""));
            let r = get(&app, "/uncached").await;
            assert_eq!((r.text().as_str(), r.x_cache()), ("uncached", ""));
        }
        assert_eq!(calls.get(), 4);
        settle().await;
        assert_eq!(stats.snapshot(), Default::default());
    }

    pub async fn handler_annotations_and_headers_set_freshness<St: Store>(store: St) {
        let l = layer(store);
        let stats = l.stats();
        let (app, calls) = app(l);
        // Unmatched routes follow the fallback: only responses that give a lifetime.
        get(&app, "/plain").await;
        settle().await;
        assert_eq!(get(&app, "/plain").await.x_cache(), "MISS");
        assert!(get(&app, "/plain")
            .await
            .cache_status()
            .contains("no-freshness"));
        get(&app, "/hinted").await;
        fills_reach(&stats, 1).await;
        assert_eq!(get(&app, "/hinted").await.x_cache(), "HIT");
        get(&app, "/smaxage").await;
        fills_reach(&stats, 2).await;
        let r = get(&app, "/smaxage").await;
        assert_eq!(r.x_cache(), "HIT");
        let ttl: u64 = r
            .cache_status()
            .rsplit("ttl=")
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            ttl > 5 && ttl <= 60,
            "s-maxage wins over max-age: ttl={ttl}"
        );
        assert_eq!(calls.get(), 5);
    }

    pub async fn entries_expire<St: Store>(store: St) {
        let l = layer(store);
        let stats = l.stats();
        let (app, calls) = app(l);
        get(&app, "/short").await;
        fills_reach(&stats, 1).await;
        assert_eq!(get(&app, "/short").await.x_cache(), "HIT");
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert_eq!(get(&app, "/short").await.x_cache(), "MISS");
        assert_eq!(calls.get(), 2);
    }

    pub async fn odd_inputs_are_served_safely<St: Store>(store: St) {
        let l = layer(store);
        let stats = l.stats();
        let (app, calls) = app(l);
        let odd_host = axum::http::HeaderValue::from_bytes(b"h\xffst").unwrap();
        let odd_lang = axum::http::HeaderValue::from_bytes(b"fr\xfe").unwrap();
        let long_query = format!(
            "/items?{}",
            (0..400)
                .map(|i| format!("k{i}=v{i}"))
                .collect::<Vec<_>>()
                .join("&")
        );
        let requests: Vec<Box<dyn Fn() -> Request<Body>>> = vec![
            Box::new(move || {
                let mut r = Request::get("/echo-host").body(Body::empty()).unwrap();
                r.headers_mut().insert("host", odd_host.clone());
                r
            }),
            Box::new(move || {
                let mut r = Request::get("/lang").body(Body::empty()).unwrap();
                r.headers_mut().insert("accept-language", odd_lang.clone());
                r
            }),
            Box::new(move || {
                Request::get(long_query.as_str())
                    .body(Body::empty())
                    .unwrap()
            }),
            Box::new(|| {
                Request::get("/items/%FF%FE%00")
                    .body(Body::empty())
                    .unwrap()
            }),
        ];
        for (i, make) in requests.iter().enumerate() {
            let first = send(&app, make()).await;
            assert_eq!(
                (first.status.as_u16(), first.x_cache()),
                (200, "MISS"),
                "request {i}"
            );
            fills_reach(&stats, i as u64 + 1).await;
            let again = send(&app, make()).await;
            assert_eq!(
                (again.x_cache(), &again.body),
                ("HIT", &first.body),
                "request {i}"
            );
        }
        assert_eq!(calls.get(), 4);
    }

    /// Each route's row counts its own hits, misses, bypasses and fills, the bytes its hits
    /// sent and the origin time they saved (which the entry carries through the store).
    pub async fn every_route_has_its_own_figures<St: Store>(store: St) {
        let l = layer(store);
        let stats = l.stats();
        let (app, _calls) = app(l);
        get(&app, "/items/1").await;
        fills_reach(&stats, 1).await;
        get(&app, "/slow").await;
        fills_reach(&stats, 2).await;
        for _ in 0..3 {
            assert_eq!(get(&app, "/items/1").await.x_cache(), "HIT");
        }
        assert_eq!(get(&app, "/slow").await.x_cache(), "HIT");
        let head = Request::head("/slow").body(Body::empty()).unwrap();
        assert_eq!(send(&app, head).await.x_cache(), "HIT");
        let with_auth = [("authorization", "Bearer 1")];
        assert_eq!(
            get_with(&app, "/items/1", &with_auth).await.x_cache(),
            "BYPASS"
        );
        let rows = stats.routes();
        let row = |id: &str| rows.iter().find(|r| r.route == id).unwrap().clone();
        let items = row("items_id");
        assert_eq!(items.pattern, "/items/{id}");
        assert_eq!(
            (items.hits, items.misses, items.bypasses, items.fills),
            (3, 1, 1, 1)
        );
        assert_eq!(items.bytes_served, 3 * "item 1".len() as u64);
        assert!(
            (items.hit_rate() - 0.75).abs() < 1e-9,
            "{}",
            items.hit_rate()
        );
        let slow = row("slow");
        assert_eq!((slow.hits, slow.misses, slow.fills), (2, 1, 1));
        assert_eq!(
            slow.bytes_served,
            "slow".len() as u64,
            "a HEAD sends no body"
        );
        // Each hit saved the origin the time the entry took it: at least `SLOW`.
        assert!(
            slow.origin_time_saved >= 2 * SLOW,
            "{:?}",
            slow.origin_time_saved
        );
        assert!(
            items.origin_time_saved < SLOW,
            "{:?}",
            items.origin_time_saved
        );
        // The rows add up to the layer's counters.
        let s = stats.snapshot();
        assert_eq!(rows.iter().map(|r| r.hits).sum::<u64>(), s.hits);
        assert_eq!(rows.iter().map(|r| r.misses).sum::<u64>(), s.misses);
        assert_eq!(rows.iter().map(|r| r.fills).sum::<u64>(), s.fills);
        assert_eq!(rows.iter().map(|r| r.bypasses).sum::<u64>(), s.bypasses);
        assert_eq!(rows.last().unwrap().route, "get_or_fill");
    }

    pub async fn concurrent_clients_all_get_correct_bodies<St: Store>(store: St) {
        let l = layer(store);
        let (app, _calls) = app(l);
        let mut tasks = Vec::new();
        for t in 0..8 {
            let app = app.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..50 {
                    let id = (t * 7 + i) % 10;
                    let r = get(&app, &format!("/items/{id}")).await;
                    assert_eq!(r.text(), format!("item {id}"));
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
}

store_suite!(
    hit_does_not_call_inner,
    query_order_does_not_split_keys,
    hosts_and_declared_vary_split_keys,
    unstorable_responses_are_never_stored,
    credentials_bypass_shared_routes,
    users_never_see_each_others_responses,
    absurd_lifetimes_are_clamped,
    cache_only_headers_never_reach_clients,
    a_body_shorter_than_declared_is_not_stored,
    escapes_never_merge_paths_a_router_tells_apart,
    head_never_poisons_get,
    oversized_bodies_stream_through_intact,
    large_bodies_within_the_limit_are_stored,
    garbage_in_the_store_is_a_miss,
    other_methods_and_uncached_routes_pass_through,
    handler_annotations_and_headers_set_freshness,
    entries_expire,
    concurrent_clients_all_get_correct_bodies,
    odd_inputs_are_served_safely,
    every_route_has_its_own_figures,
);

/// Two layers given one route table count apart.
#[tokio::test]
async fn two_layers_sharing_a_table_keep_their_own_figures() {
    let table = routes();
    let a = CacheLayer::new(MemoryStore::new(1 << 20)).routes(table.clone());
    let b = CacheLayer::new(MemoryStore::new(1 << 20)).routes(table);
    let (stats_a, stats_b) = (a.stats(), b.stats());
    let (app_a, _) = app(a);
    let (_app_b, _) = app(b);
    get(&app_a, "/items/1").await;
    let misses = |s: &tower_cache_aside::CacheStats| {
        s.routes()
            .iter()
            .find(|r| r.route == "items_id")
            .unwrap()
            .misses
    };
    assert_eq!((misses(&stats_a), misses(&stats_b)), (1, 0));
}

/// A status name longer than the stack buffer the status header is formatted in still
/// yields the whole value.
#[tokio::test]
async fn a_long_cache_status_name_is_written_whole() {
    let name = "x".repeat(200);
    let l = layer(MemoryStore::new(1 << 20)).cache_status_name(&name);
    let stats = l.stats();
    let (app, _) = app(l);
    get(&app, "/items/1").await;
    fills_reach(&stats, 1).await;
    let hit = get(&app, "/items/1").await;
    let status = hit.cache_status();
    assert!(
        status.starts_with(&format!("{name}; hit; ttl=")),
        "{status}"
    );
}

/// A body read for the fill keeps its origin alive only so long: after the client left and
/// the origin stalled, the reader gives the body up (at `stampede_wait`), and it is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_origin_body_is_let_go_once_its_client_left() {
    use futures_util::StreamExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tower::ServiceExt;
    struct Alive(Arc<AtomicUsize>);
    impl Drop for Alive {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let alive = Arc::new(AtomicUsize::new(0));
    let routes = tower_cache_aside::RouteTable::new().route(
        "/stall",
        tower_cache_aside::RoutePolicy::ttl(Duration::from_secs(60)),
    );
    let l = CacheLayer::new(MemoryStore::new(1 << 20))
        .routes(routes)
        .stampede_wait(Duration::from_millis(200));
    let counter = alive.clone();
    let app = axum::Router::new()
        .route(
            "/stall",
            axum::routing::get(move || {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let guard = Alive(counter);
                    let first = futures_util::stream::once(async {
                        Ok::<_, std::io::Error>(Bytes::from_static(b"part"))
                    });
                    let stream = first
                        .chain(futures_util::stream::pending())
                        .map(move |chunk| {
                            let _keep = &guard;
                            chunk
                        });
                    Body::from_stream(stream)
                }
            }),
        )
        .layer(l);
    let req = Request::get("/stall").body(Body::empty()).unwrap();
    let res = app.oneshot(req).await.unwrap();
    assert_eq!(alive.load(Ordering::SeqCst), 1);
    drop(res); // the client leaves
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while alive.load(Ordering::SeqCst) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the origin body was kept alive after its client left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A body that panics while it is read for the fill panics in its client's task too, as
/// it would without the cache: the response is cut off, never passed off as whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_panics_is_never_passed_off_as_whole() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    // Whole at once (read where the response is made), or arriving later (read by the
    // reader task): either way the panic reaches the task that runs the request.
    for later in [false, true] {
        let routes = tower_cache_aside::RouteTable::new().route(
            "/boom",
            tower_cache_aside::RoutePolicy::ttl(Duration::from_secs(60)),
        );
        let l = CacheLayer::new(MemoryStore::new(1 << 20)).routes(routes);
        let app = axum::Router::new()
            .route(
                "/boom",
                axum::routing::get(move || async move {
                    let mut polls = 0;
                    let stream = futures_util::stream::poll_fn(move |cx| {
                        polls += 1;
                        if later && polls == 1 {
                            cx.waker().wake_by_ref();
                            return std::task::Poll::Pending;
                        }
                        if polls > 1 + usize::from(later) {
                            panic!("the origin's body broke");
                        }
                        std::task::Poll::Ready(Some(Ok::<_, std::io::Error>(Bytes::from_static(
                            b"part",
                        ))))
                    });
                    Body::from_stream(stream)
                }),
            )
            .layer(l);
        // The request and its body in one task, as a connection runs them.
        let read = tokio::spawn(async move {
            let req = Request::get("/boom").body(Body::empty()).unwrap();
            let res = app.oneshot(req).await.unwrap();
            res.into_body().collect().await.map(|c| c.to_bytes())
        });
        let outcome = read.await;
        assert!(
            outcome.as_ref().is_err_and(|e| e.is_panic()),
            "later: {later}: the client saw a body that looked whole: {outcome:?}"
        );
    }
}

/// A body still arriving when the response is made is read by a task and fed to the client:
/// polled again after its end (as compression wrappers do), it stays ended instead of
/// panicking the connection. Found by `scripts/load` with tower-http's CompressionLayer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_polled_after_its_end_stays_ended() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let routes = tower_cache_aside::RouteTable::new().route(
        "/drip",
        tower_cache_aside::RoutePolicy::ttl(Duration::from_secs(60)),
    );
    let cache = CacheLayer::new(MemoryStore::new(1 << 20)).routes(routes);
    let router = axum::Router::new()
        .route(
            "/drip",
            axum::routing::get(|| async {
                let chunks = futures_util::stream::unfold(0u8, |i| async move {
                    if i == 3 {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    Some((
                        Ok::<_, std::io::Error>(Bytes::from(vec![b'a' + i; 100])),
                        i + 1,
                    ))
                });
                Body::from_stream(chunks)
            }),
        )
        .layer(cache);
    let res = router
        .oneshot(Request::get("/drip").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let mut body = res.into_body();
    let mut received = 0;
    while let Some(frame) = body.frame().await {
        received += frame.unwrap().into_data().map_or(0, |d| d.len());
    }
    assert_eq!(received, 300);
    for _ in 0..3 {
        assert!(body.frame().await.is_none(), "ended stays ended");
    }
}
