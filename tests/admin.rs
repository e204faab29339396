//! The admin service: each request, and its refusals (bad input is refused whole, never
//! half-applied). On real Valkey and Redis, and the memory store.

#[macro_use]
mod support;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::Value;
use support::*;
use tower::ServiceExt;
use tower_cache_aside::{store::Store, CacheLayer};

/// The app with the admin service mounted under `/admin/cache` behind a bearer token.
fn mounted<St: Store>(cache: &CacheLayer<St>) -> (Router, Router) {
    let (app, _calls) = app(cache.clone());
    let warmer = cache.handle().warmer(app.clone());
    let admin = Router::new()
        .nest_service("/admin/cache", cache.admin_service().warmer(warmer))
        .route_layer(axum::middleware::from_fn(
            |req: axum::extract::Request, next: axum::middleware::Next| async move {
                let ok = req
                    .headers()
                    .get("authorization")
                    .is_some_and(|v| v == "Bearer operator");
                if ok {
                    next.run(req).await
                } else {
                    axum::response::IntoResponse::into_response(StatusCode::UNAUTHORIZED)
                }
            },
        ));
    (app, admin)
}

async fn admin(router: &Router, method: &str, uri: &str, body: &str) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", "Bearer operator")
        .header("host", "example.com")
        .body(Body::from(body.to_owned()))
        .unwrap();
    let res = router.clone().oneshot(req).await.unwrap();
    let status = res.status();
    assert_eq!(res.headers()["content-type"], "application/json");
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    (status, json)
}

async fn get_as_host(app: &Router, uri: &str) -> Reply {
    get_with(app, uri, &[("host", "example.com")]).await
}

pub async fn every_admin_request_and_its_refusals<St: Store>(store: St) {
    let cache = CacheLayer::new(store).routes(routes());
    let stats = cache.stats();
    let (app, admin_router) = mounted(&cache);
    for uri in ["/items/1", "/items?page=1", "/items?page=2"] {
        get_as_host(&app, uri).await;
    }
    fills_reach(&stats, 3).await;
    get_as_host(&app, "/items/1").await;

    // Without the token: the app's authentication answers.
    let anonymous = Request::get("/admin/cache/stats")
        .body(Body::empty())
        .unwrap();
    let res = admin_router.clone().oneshot(anonymous).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);

    // stats: counters, routes, the hottest keys.
    let (status, s) = admin(&admin_router, "GET", "/admin/cache/stats", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s["counters"]["hits"], 1);
    let items = s["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "items_id")
        .unwrap();
    assert_eq!(
        (items["hits"].as_u64(), items["misses"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(s["hot"][0]["target"], "/items/1");
    assert_eq!(s["hot"][0]["requests"], 2);

    // inspect: what is cached for a URL, and for whom.
    let (status, i) = admin(
        &admin_router,
        "GET",
        "/admin/cache/inspect?url=%2Fitems%2F1",
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{i}");
    assert_eq!(
        (i["cached"].as_bool(), i["state"].as_str()),
        (Some(true), Some("fresh"))
    );
    assert_eq!(
        (i["route"].as_str(), i["scope"].as_str()),
        (Some("items_id"), Some("shared"))
    );
    assert_eq!(i["size"], "item 1".len());
    assert_eq!(i["tags"], serde_json::json!(["items", "item:1"]));
    assert!(i["ttl_s"].as_u64().unwrap() > 50, "{i}");
    let (_, cold) = admin(
        &admin_router,
        "GET",
        "/admin/cache/inspect?url=/items/404",
        "",
    )
    .await;
    assert_eq!(cold["cached"], false);
    let (_, skipped) = admin(
        &admin_router,
        "GET",
        "/admin/cache/inspect?url=/uncached",
        "",
    )
    .await;
    assert_eq!(
        (skipped["looked_up"].as_bool(), skipped["bypass"].as_str()),
        (Some(false), Some("not-cached"))
    );
    // A per-user entry: found with that user's token, not with another's.
    get_with(
        &app,
        "/me",
        &[("host", "example.com"), ("authorization", "Bearer 7")],
    )
    .await;
    fills_reach(&stats, 4).await;
    let as_7 = "/admin/cache/inspect?url=/me&header=authorization:Bearer%207";
    let (_, mine) = admin(&admin_router, "GET", as_7, "").await;
    assert_eq!(
        (mine["cached"].as_bool(), mine["user"].as_str()),
        (Some(true), Some("7")),
        "{mine}"
    );
    let as_8 = "/admin/cache/inspect?url=/me&header=authorization:Bearer%208";
    let (_, theirs) = admin(&admin_router, "GET", as_8, "").await;
    assert_eq!(
        (theirs["cached"].as_bool(), theirs["user"].as_str()),
        (Some(false), Some("8"))
    );

    // invalidate: refused whole when one tag is bad, or when there are too many.
    let before = stats.snapshot().invalidations;
    for (body, code) in [
        (
            r#"{"tags": ["item:1", "has space"]}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            r#"{"tags": ["item:1", "~u:reserved"]}"#,
            StatusCode::BAD_REQUEST,
        ),
        (r#"{"tags": "item:1"}"#, StatusCode::BAD_REQUEST),
        ("{", StatusCode::BAD_REQUEST),
        ("", StatusCode::BAD_REQUEST),
    ] {
        let (status, e) = admin(&admin_router, "POST", "/admin/cache/invalidate", body).await;
        assert_eq!(status, code, "{body}: {e}");
        assert!(e["error"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    }
    let many: Vec<String> = (0..1001).map(|i| format!("t{i}")).collect();
    let body = serde_json::json!({ "tags": many }).to_string();
    let (status, _) = admin(&admin_router, "POST", "/admin/cache/invalidate", &body).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let huge = "x".repeat(300 * 1024);
    let (status, _) = admin(&admin_router, "POST", "/admin/cache/invalidate", &huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        stats.snapshot().invalidations,
        before,
        "a refused request cleared something"
    );
    assert_eq!(get_as_host(&app, "/items/1").await.x_cache(), "HIT");
    let (status, done) = admin(
        &admin_router,
        "POST",
        "/admin/cache/invalidate",
        r#"{"tags": ["item:1"]}"#,
    )
    .await;
    assert_eq!(
        (status, done["cleared"].clone()),
        (StatusCode::OK, serde_json::json!(["item:1"]))
    );
    assert_eq!(get_as_host(&app, "/items/1").await.x_cache(), "MISS");
    let (status, _) = admin(
        &admin_router,
        "POST",
        "/admin/cache/invalidate?tag=items&tag=item:2",
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, s) = admin(&admin_router, "GET", "/admin/cache/stats", "").await;
    assert_eq!(
        s["recent_clears"][0]["tags"],
        serde_json::json!(["item:2", "items"]),
        "{s}"
    );
    assert_eq!(
        s["recent_clears"][1]["tags"],
        serde_json::json!(["item:1"]),
        "{s}"
    );

    // remove: every entry of a path, whatever its query.
    for uri in ["/items?page=1", "/items?page=2"] {
        get_as_host(&app, uri).await;
    }
    settle().await;
    assert_eq!(get_as_host(&app, "/items?page=2").await.x_cache(), "HIT");
    let (status, _) = admin(&admin_router, "POST", "/admin/cache/remove?url=/items", "").await;
    assert_eq!(status, StatusCode::OK);
    for uri in ["/items?page=1", "/items?page=2"] {
        assert_eq!(get_as_host(&app, uri).await.x_cache(), "MISS", "{uri}");
    }

    // warm: the record of this instance's hottest keys, once it reached the store.
    cache.handle().purge().await.unwrap();
    cache.handle().flush_hot_keys().await.unwrap();
    let (status, w) = admin(&admin_router, "POST", "/admin/cache/warm?limit=50", "").await;
    assert_eq!(status, StatusCode::OK, "{w}");
    let recorded = cache.store().hot(50).await.unwrap().len() as u64;
    // Stores that keep no record warm nothing; the others warm what they recorded.
    assert_eq!(w["requested"].as_u64(), Some(recorded), "{w}");
    let (status, _) = admin(&admin_router, "POST", "/admin/cache/warm?limit=0", "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // purge: everything.
    get_as_host(&app, "/items/1").await;
    settle().await;
    let (status, _) = admin(&admin_router, "POST", "/admin/cache/purge", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(get_as_host(&app, "/items/1").await.x_cache(), "MISS");

    // Wrong method, unknown request, bad URL.
    let (status, _) = admin(&admin_router, "GET", "/admin/cache/purge", "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, e) = admin(&admin_router, "GET", "/admin/cache/everything", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(e["error"].as_str().unwrap().contains("stats"), "{e}");
    let many: Vec<String> = (0..300).map(|i| format!("tag=t{i}")).collect();
    let uri = format!("/admin/cache/invalidate?{}", many.join("&"));
    let (status, _) = admin(&admin_router, "POST", &uri, "").await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "never cut short");
    for bad in [
        "/admin/cache/inspect",
        "/admin/cache/inspect?url=%20",
        "/admin/cache/inspect?url=/a&header=nocolon",
    ] {
        let (status, e) = admin(&admin_router, "GET", bad, "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {e}");
    }
}

/// Without a warmer, `warm` says what to do; with the store gone, requests say so.
#[tokio::test]
async fn warm_without_a_warmer_and_a_store_that_is_gone() {
    let mut server = Server::start(Kind::Valkey);
    let cache = CacheLayer::new(valkey_store(&server)).routes(routes());
    let admin_router = Router::new().nest_service("/admin", cache.admin_service());
    let (status, e) = admin(&admin_router, "POST", "/admin/warm", "").await;
    assert_eq!(status, StatusCode::NOT_IMPLEMENTED);
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("AdminService::warmer"),
        "{e}"
    );
    server.kill();
    // A clear the store cannot take is deferred, as the layer defers it: accepted.
    let (status, e) = admin(&admin_router, "POST", "/admin/purge", "").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{e}");
    assert_eq!(e["deferred"], true, "{e}");
    let (status, e) = admin(&admin_router, "POST", "/admin/invalidate?tag=items", "").await;
    assert_eq!(
        (status, e["deferred"].as_bool()),
        (StatusCode::ACCEPTED, Some(true)),
        "{e}"
    );
    // Reading the store cannot be deferred: said so.
    let (status, e) = admin(&admin_router, "GET", "/admin/inspect?url=/items/1", "").await;
    assert!(
        status.is_server_error() || e["why"].is_string(),
        "{status} {e}"
    );
    let (status, _) = admin(&admin_router, "GET", "/admin/stats", "").await;
    assert_eq!(status, StatusCode::OK, "stats need no store");
}

mod cases {
    pub use super::every_admin_request_and_its_refusals;
}

store_suite!(every_admin_request_and_its_refusals);
