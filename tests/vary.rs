//! The response's own `Vary` (RFC 9111 §4.1) on every store: a response that varies on
//! request headers its route did not declare is stored as one variant per (normalized)
//! value; a request is only ever served the variant its own headers select, concurrent
//! first requests included; variants clear together; `Vary: *`, too many headers and too
//! many variants of one URL are passed through unstored.

#[macro_use]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Request};
use axum::response::IntoResponse;
use axum::routing::get as route_get;
use axum::Router;
use support::*;
use tower_cache_aside::store::Store;
use tower_cache_aside::{CacheLayer, CacheStats, RoutePolicy, RouteTable};

#[derive(Clone, Default)]
struct Origin {
    calls: Arc<AtomicUsize>,
}

fn greeting(headers: &HeaderMap) -> &'static str {
    let lang = headers
        .get("accept-language")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if lang.starts_with("fr") {
        "bonjour"
    } else if lang.starts_with("de") {
        "hallo"
    } else {
        "hello"
    }
}

async fn greet(State(o): State<Origin>, headers: HeaderMap) -> impl IntoResponse {
    o.calls.fetch_add(1, Ordering::SeqCst);
    // Slow enough that concurrent first requests overlap.
    tokio::time::sleep(Duration::from_millis(50)).await;
    ([("vary", "Accept-Language")], greeting(&headers))
}

async fn tenant(State(o): State<Origin>, headers: HeaderMap) -> impl IntoResponse {
    o.calls.fetch_add(1, Ordering::SeqCst);
    let t = headers.get("x-tenant").map_or("none".to_owned(), |v| {
        String::from_utf8_lossy(v.as_bytes()).into_owned()
    });
    ([("vary", "x-tenant")], format!("tenant {t}"))
}

async fn star(State(o): State<Origin>) -> impl IntoResponse {
    o.calls.fetch_add(1, Ordering::SeqCst);
    ([("vary", "*")], "anything")
}

async fn many(State(o): State<Origin>) -> impl IntoResponse {
    o.calls.fetch_add(1, Ordering::SeqCst);
    ([("vary", "a, b, c, d, e")], "too many")
}

fn app<St: Store>(store: St) -> (Router, Origin, CacheStats) {
    let min = || RoutePolicy::ttl(Duration::from_secs(60));
    let routes = RouteTable::new()
        .route("/greet", min().tags(["greet"]))
        .route("/tenant", min())
        .route("/star", min())
        .route("/many", min());
    let cache = CacheLayer::new(store).routes(routes);
    let origin = Origin::default();
    let router = Router::new()
        .route("/greet", route_get(greet).patch(|| async { "patched" }))
        .route("/tenant", route_get(tenant))
        .route("/star", route_get(star))
        .route("/many", route_get(many))
        .with_state(origin.clone())
        .layer(cache.invalidate_layer())
        .layer(cache.clone());
    (router, origin, cache.stats())
}

fn calls(o: &Origin) -> usize {
    o.calls.load(Ordering::SeqCst)
}

async fn in_lang(router: &Router, lang: &str) -> Reply {
    get_with(router, "/greet", &[("accept-language", lang)]).await
}

mod cases {
    use super::*;

    pub async fn each_value_gets_its_own_variant<St: Store>(store: St) {
        let (router, origin, stats) = app(store);
        let en = in_lang(&router, "en-US").await;
        assert_eq!((en.text().as_str(), en.x_cache()), ("hello", "MISS"));
        fills_reach(&stats, 2).await; // the variant and its marker
        let fr = in_lang(&router, "fr").await;
        assert_eq!((fr.text().as_str(), fr.x_cache()), ("bonjour", "MISS"));
        fills_reach(&stats, 4).await;
        for (lang, body) in [
            ("en-US", "hello"),
            ("EN-us", "hello"),
            ("fr", "bonjour"),
            ("fr;q=1.0", "bonjour"),
        ] {
            let reply = in_lang(&router, lang).await;
            assert_eq!(reply.text(), body, "{lang}");
            assert_eq!(reply.x_cache(), "HIT", "{lang}");
        }
        // No Accept-Language at all is a variant of its own, not the empty one's.
        let none = get(&router, "/greet").await;
        assert_eq!((none.text().as_str(), none.x_cache()), ("hello", "MISS"));
        assert_eq!(calls(&origin), 3);
    }

    pub async fn concurrent_first_requests_each_get_their_own<St: Store>(store: St) {
        let (router, _origin, _stats) = app(store);
        let mut tasks = Vec::new();
        for lang in ["en", "fr", "de", "en", "fr", "de"] {
            let router = router.clone();
            tasks.push(tokio::spawn(async move {
                (lang, in_lang(&router, lang).await.text())
            }));
        }
        for task in tasks {
            let (lang, body) = task.await.unwrap();
            let expected = greeting(&{
                let mut h = HeaderMap::new();
                h.insert("accept-language", lang.parse().unwrap());
                h
            });
            assert_eq!(body, expected, "{lang} got another variant");
        }
    }

    pub async fn a_cold_varied_url_keeps_its_stampede_protection<St: Store>(store: St) {
        let (router, origin, _stats) = app(store);
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let router = router.clone();
            tasks.push(tokio::spawn(
                async move { in_lang(&router, "en").await.text() },
            ));
        }
        for task in tasks {
            assert_eq!(task.await.unwrap(), "hello");
        }
        // The first leader's response varied: its waiters each joined their own variant's
        // flight (all the same here), so the origin saw two calls, not eight.
        assert!(calls(&origin) <= 2, "{} origin calls", calls(&origin));
    }

    pub async fn values_that_are_not_utf8_never_share_a_variant<St: Store>(store: St) {
        let (router, _origin, stats) = app(store);
        let as_user = |v: &'static [u8]| {
            let router = router.clone();
            async move {
                let req = Request::get("/tenant")
                    .header("x-tenant", axum::http::HeaderValue::from_bytes(v).unwrap())
                    .body(Body::empty())
                    .unwrap();
                send(&router, req).await
            }
        };
        let first = as_user(b"jos\xe9").await;
        assert_eq!(first.x_cache(), "MISS");
        fills_reach(&stats, 2).await;
        let other = as_user(b"zo\xeb").await;
        assert_eq!(
            other.x_cache(),
            "MISS",
            "another user's variant must not be served"
        );
        assert_ne!(other.body, first.body);
        assert_eq!(as_user(b"jos\xe9").await.x_cache(), "HIT");
    }

    pub async fn variants_clear_together<St: Store>(store: St) {
        let (router, origin, stats) = app(store);
        in_lang(&router, "en").await;
        in_lang(&router, "fr").await;
        fills_reach(&stats, 4).await;
        assert_eq!(in_lang(&router, "fr").await.x_cache(), "HIT");
        send(
            &router,
            Request::patch("/greet").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(in_lang(&router, "en").await.x_cache(), "MISS");
        assert_eq!(in_lang(&router, "fr").await.x_cache(), "MISS");
        assert_eq!(calls(&origin), 4);
    }

    pub async fn what_cannot_be_keyed_is_not_stored<St: Store>(store: St) {
        let (router, origin, _stats) = app(store);
        for (uri, detail) in [("/star", "vary-star"), ("/many", "vary-undeclared")] {
            let first = get(&router, uri).await;
            assert!(
                first.cache_status().contains(detail),
                "{uri}: {}",
                first.cache_status()
            );
            assert_eq!(get(&router, uri).await.x_cache(), "MISS", "{uri}");
        }
        // A value longer than a variant is keyed by: passed through, nothing stored.
        let long = "x".repeat(2000);
        get_with(&router, "/tenant", &[("x-tenant", &long)]).await;
        let again = get_with(&router, "/tenant", &[("x-tenant", &long)]).await;
        assert_eq!(again.text(), format!("tenant {long}"));
        assert_ne!(again.x_cache(), "HIT");
        assert_eq!(calls(&origin), 6);
    }

    pub async fn variants_of_one_url_are_bounded<St: Store>(store: St) {
        let (router, _origin, stats) = app(store);
        let mut refused = 0;
        for i in 0..40 {
            let t = format!("t{i}");
            let reply = get_with(&router, "/tenant", &[("x-tenant", &t)]).await;
            assert_eq!(reply.text(), format!("tenant {t}"));
            if reply.cache_status().contains("too-many-variants") {
                refused += 1;
            }
        }
        assert_eq!(refused, 40 - 32, "{:?}", stats.snapshot());
        // The stored ones are served, each to its own tenant.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let hit = get_with(&router, "/tenant", &[("x-tenant", "t3")]).await;
        assert_eq!((hit.text().as_str(), hit.x_cache()), ("tenant t3", "HIT"));
    }
}

store_suite!(
    each_value_gets_its_own_variant,
    concurrent_first_requests_each_get_their_own,
    a_cold_varied_url_keeps_its_stampede_protection,
    values_that_are_not_utf8_never_share_a_variant,
    variants_clear_together,
    what_cannot_be_keyed_is_not_stored,
    variants_of_one_url_are_bounded,
);
