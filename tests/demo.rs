//! The demo app (examples/demo/app.rs): its routes and shapes, its caching, per-user
//! isolation of the dashboard, and invalidation on writes; through `Router::oneshot`, and
//! once over a real socket against Valkey.

#[path = "../examples/demo/app.rs"]
mod app;
mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request};
use axum::Router;
use serde_json::Value;
use support::*;
use tower_cache_aside::{
    store::{MemoryStore, Store},
    CacheLayer,
};

fn demo<St: Store>(store: Option<St>) -> (Router, Arc<app::Db>) {
    let db = Arc::new(app::Db::create(app::Seed::SMALL).unwrap());
    let cache = store.map(|s| CacheLayer::new(s).routes(app::cache_routes()));
    (app::app(db.clone(), cache, "test"), db)
}

async fn call(
    app: &Router,
    method: Method,
    uri: &str,
    user: Option<i64>,
    json: Option<&str>,
) -> Reply {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(u) = user {
        b = b.header("authorization", format!("Bearer {u}"));
    }
    let body = match json {
        Some(j) => {
            b = b.header("content-type", "application/json");
            Body::from(j.to_owned())
        }
        None => Body::empty(),
    };
    send(app, b.body(body).unwrap()).await
}

fn json(r: &Reply) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.text()))
}

/// GETs until the response is a hit (the fill lands in the background).
async fn until_hit(app: &Router, uri: &str, user: Option<i64>) -> Reply {
    for _ in 0..500 {
        let r = call(app, Method::GET, uri, user, None).await;
        if r.x_cache() == "HIT" {
            return r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("{uri} never became a hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_answer_with_the_promised_shapes() {
    let (app, _db) = demo(Some(MemoryStore::new(16 << 20)));
    let e = call(&app, Method::GET, "/events/1", Some(1), None).await;
    assert_eq!(e.status, 200);
    let v = json(&e);
    assert_eq!(v["id"], 1);
    assert!(v["status"].is_string());
    for uri in [
        "/events?status=error&server=2&page=1",
        "/workflows",
        "/workflows/1",
        "/servers",
        "/servers/1",
        "/servers/1/logs",
        "/users/1",
        "/webhooks",
    ] {
        let r = call(&app, Method::GET, uri, Some(1), None).await;
        assert_eq!(r.status, 200, "{uri}");
        json(&r);
    }
    for uri in [
        "/events/99999",
        "/workflows/99999",
        "/servers/99999",
        "/servers/99999/logs",
        "/users/99999",
    ] {
        assert_eq!(
            call(&app, Method::GET, uri, Some(1), None).await.status,
            404,
            "{uri}"
        );
    }
    // Every response says what the cache did, writes and uncached routes included.
    let health = call(&app, Method::GET, "/health", None, None).await;
    assert_eq!(health.x_cache(), "BYPASS");
    let patched = call(
        &app,
        Method::PATCH,
        "/events/3",
        Some(1),
        Some(r#"{"status":"resolved"}"#),
    )
    .await;
    assert_eq!(patched.x_cache(), "BYPASS");
    assert_eq!(json(&patched)["status"], "resolved");
    assert_eq!(
        call(&app, Method::DELETE, "/events/4", Some(1), None)
            .await
            .status,
        204
    );
    assert_eq!(
        call(&app, Method::DELETE, "/events/4", Some(1), None)
            .await
            .status,
        404
    );
    let created = call(
        &app,
        Method::POST,
        "/events",
        Some(1),
        Some(r#"{"server_id":1,"message":"new"}"#),
    )
    .await;
    assert_eq!(created.status, 201);
    assert!(created.headers["location"]
        .to_str()
        .unwrap()
        .starts_with("/events/"));
    let perms = call(
        &app,
        Method::PUT,
        "/users/2/permissions",
        Some(1),
        Some(r#"{"permissions":["read","write"]}"#),
    )
    .await;
    assert_eq!(perms.status, 200);
    assert_eq!(
        json(&call(&app, Method::GET, "/users/2", Some(1), None).await)["permissions"][1],
        "write"
    );
    assert_eq!(
        call(&app, Method::GET, "/dashboard/stats", None, None)
            .await
            .status,
        401
    );
    let health = json(&call(&app, Method::GET, "/health", None, None).await);
    assert_eq!(health["status"], "ok");
    // Prometheus text from the crate's `metrics` feature: per route, with histograms.
    until_hit(&app, "/events/1", Some(1)).await;
    let metrics = call(&app, Method::GET, "/metrics", None, None).await.text();
    for series in [
        "tower_cache_aside_hits_total{route=\"events_id\"}",
        "tower_cache_aside_misses_total{route=\"events_id\"}",
        "tower_cache_aside_response_seconds_bucket{route=\"events_id\",cache=\"hit\"",
        "tower_cache_aside_origin_seconds_count{route=\"events_id\"}",
        "demo_db_queries_total",
    ] {
        assert!(metrics.contains(series), "no {series} in:\n{metrics}");
    }
}

/// Authentication runs outside the cache: once a public route is cached for signed-in
/// users, a request without a known user still gets a 401 from the auth layer, never the
/// cached answer, and never a hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_request_never_gets_a_hit() {
    let (app, db) = demo(Some(MemoryStore::new(16 << 20)));
    for uri in ["/events/1", "/servers", "/users/2", "/dashboard/stats"] {
        until_hit(&app, uri, Some(1)).await;
        let queries = db.queries.load(std::sync::atomic::Ordering::SeqCst);
        for stranger in [None, Some(0), Some(db.users + 1), Some(-3)] {
            let r = call(&app, Method::GET, uri, stranger, None).await;
            assert_eq!(r.status, 401, "{uri} for {stranger:?}");
            assert_ne!(r.x_cache(), "HIT", "{uri} for {stranger:?}");
            assert!(
                !r.text().contains('{'),
                "{uri} for {stranger:?}: data leaked"
            );
        }
        let after = db.queries.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(queries, after, "a rejected request reached the app");
    }
    // The operator's routes stay open.
    for uri in ["/health", "/metrics", "/cache/stats"] {
        assert_eq!(
            call(&app, Method::GET, uri, None, None).await.status,
            200,
            "{uri}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_spare_the_database_and_writes_are_read_back() {
    let (app, db) = demo(Some(MemoryStore::new(16 << 20)));
    call(&app, Method::GET, "/events/1", Some(1), None).await;
    until_hit(&app, "/events/1", Some(1)).await;
    let before = db.queries.load(Ordering::SeqCst);
    for user in 1..=3 {
        // Public routes: every signed-in user shares the entry.
        assert_eq!(
            call(&app, Method::GET, "/events/1", Some(user), None)
                .await
                .x_cache(),
            "HIT"
        );
    }
    assert_eq!(
        db.queries.load(Ordering::SeqCst),
        before,
        "hits run no query"
    );
    call(
        &app,
        Method::PATCH,
        "/events/1",
        Some(1),
        Some(r#"{"status":"investigating"}"#),
    )
    .await;
    let r = call(&app, Method::GET, "/events/1", Some(2), None).await;
    assert_eq!(
        (r.x_cache(), json(&r)["status"].as_str()),
        ("MISS", Some("investigating"))
    );
    let stats = json(&call(&app, Method::GET, "/cache/stats", None, None).await);
    let served = stats["hits"].as_u64().unwrap() + stats["collapsed"].as_u64().unwrap();
    assert!(
        served >= 3 && stats["db_queries"].as_u64().is_some(),
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_are_per_user_and_cleared_by_permission_changes() {
    let (app, _db) = demo(Some(MemoryStore::new(16 << 20)));
    let one = until_hit(&app, "/dashboard/stats", Some(1)).await;
    let two = until_hit(&app, "/dashboard/stats", Some(2)).await;
    assert_eq!(json(&one)["user"]["id"], 1);
    assert_eq!(
        json(&two)["user"]["id"],
        2,
        "user 2 never sees user 1's dashboard"
    );
    for _ in 0..3 {
        assert_eq!(
            json(&call(&app, Method::GET, "/dashboard/stats", Some(1), None).await)["user"]["id"],
            1
        );
        assert_eq!(
            json(&call(&app, Method::GET, "/dashboard/stats", Some(2), None).await)["user"]["id"],
            2
        );
    }
    until_hit(&app, "/users/1", Some(2)).await;
    let r = call(
        &app,
        Method::PUT,
        "/users/1/permissions",
        Some(3), // an admin, say: any known user (the demo checks no roles)
        Some(r#"{"permissions":[]}"#),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        call(&app, Method::GET, "/dashboard/stats", Some(1), None)
            .await
            .x_cache(),
        "MISS"
    );
    assert_eq!(
        call(&app, Method::GET, "/users/1", Some(2), None)
            .await
            .x_cache(),
        "MISS"
    );
    assert_eq!(
        call(&app, Method::GET, "/dashboard/stats", Some(2), None)
            .await
            .x_cache(),
        "HIT"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_off_runs_every_query() {
    let (app, db) = demo::<MemoryStore>(None);
    for _ in 0..3 {
        let r = call(&app, Method::GET, "/events/1", Some(1), None).await;
        assert_eq!((r.status.as_u16(), r.x_cache()), (200, ""));
    }
    assert_eq!(db.queries.load(Ordering::SeqCst), 3);
}

/// Over a real socket, with Valkey behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_socket_with_valkey() {
    use http_body_util::BodyExt;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let server = Server::start(Kind::Valkey);
    let (app, _db) = demo(Some(valkey_store(&server)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client: Client<_, http_body_util::Full<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let fetch = |method: Method, path: &str, body: &str| {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .header("authorization", "Bearer 1")
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_owned(),
            )))
            .unwrap();
        let client = client.clone();
        async move {
            let res = client.request(req).await.unwrap();
            let x_cache = res
                .headers()
                .get("x-cache")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (
                x_cache,
                serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null),
            )
        }
    };
    assert_eq!(fetch(Method::GET, "/events/5", "").await.0, "MISS");
    let mut hit = false;
    for _ in 0..200 {
        if fetch(Method::GET, "/events/5", "").await.0 == "HIT" {
            hit = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(hit, "served from Valkey");
    fetch(Method::PATCH, "/events/5", r#"{"status":"closed"}"#).await;
    let (x_cache, v) = fetch(Method::GET, "/events/5", "").await;
    assert_eq!(
        (x_cache.as_str(), v["status"].as_str()),
        ("MISS", Some("closed"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_clears_exactly_the_lists_it_changes() {
    let (app, _db) = demo(Some(MemoryStore::new(16 << 20)));
    let event = json(&call(&app, Method::GET, "/events/1", Some(1), None).await);
    let (server, status) = (
        event["server_id"].as_i64().unwrap(),
        event["status"].as_str().unwrap().to_owned(),
    );
    let other_server = server % 4 + 1;
    let mine = format!("/events?server={server}");
    let by_status = format!("/events?status={status}");
    let other = format!("/events?server={other_server}");
    for uri in [&mine, &by_status, &other, &"/events".to_owned()] {
        until_hit(&app, uri, Some(1)).await;
    }
    let body = r#"{"status":"escalated"}"#;
    assert_eq!(
        call(&app, Method::PATCH, "/events/1", Some(1), Some(body))
            .await
            .status,
        200
    );
    for uri in [&mine, &by_status, &"/events".to_owned()] {
        assert_eq!(
            call(&app, Method::GET, uri, Some(1), None).await.x_cache(),
            "MISS",
            "{uri}"
        );
    }
    let stats = json(&call(&app, Method::GET, "/cache/stats", None, None).await);
    let r = call(&app, Method::GET, &other, Some(1), None).await;
    assert_eq!(
        r.x_cache(),
        "HIT",
        "another server's list stays: {other} {} {stats} mine={mine} status={by_status}",
        r.cache_status()
    );
    let escalated = json(&call(&app, Method::GET, "/events?status=escalated", Some(1), None).await);
    assert_eq!(escalated["events"][0]["id"], 1);
}

/// The demo's admin service: behind its token, and `inspect` sees a user's dashboard as the
/// auth layer would (the route's scope reads the user the auth layer puts in the request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_service_is_behind_its_token_and_inspects_as_a_user() {
    let (app, _db) = demo(Some(MemoryStore::new(16 << 20)));
    until_hit(&app, "/dashboard/stats", Some(3)).await;
    let ask = |token: String| {
        let req = Request::get(
            "/admin/cache/inspect?url=/dashboard/stats&header=authorization:Bearer%203",
        )
        .header("authorization", token)
        .body(Body::empty())
        .unwrap();
        send(&app, req)
    };
    let refused = ask("Bearer 1".into()).await;
    assert_eq!(refused.status, 401, "a user is not an operator");
    let r = ask(format!("Bearer {}", app::admin_token())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let found = json(&r);
    assert_eq!(
        (found["cached"].as_bool(), found["user"].as_str()),
        (Some(true), Some("3")),
        "{found}"
    );
    // The open figures name no user.
    let stats = json(&call(&app, Method::GET, "/cache/stats", None, None).await);
    assert!(
        stats["hot"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k.get("user").is_none()),
        "{stats}"
    );
}
