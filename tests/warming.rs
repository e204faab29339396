//! Cache warming: from a list, from the store's record of the most requested keys (a new
//! instance warms what was hot on another), and refreshing the hottest entries a clear made
//! dead. Real Valkey and Redis where a store is shared.

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, Request};
use support::*;
use tower_cache_aside::{store::Store, CacheLayer, RoutePolicy, Warmer};

fn layer<St: Store>(store: St) -> CacheLayer<St> {
    CacheLayer::new(store).routes(routes())
}

fn as_user(user: &str) -> Option<HeaderMap> {
    let mut h = HeaderMap::new();
    let token = HeaderValue::from_str(&format!("Bearer {user}")).ok()?;
    h.insert("authorization", token);
    Some(h)
}

/// Warming a list: missing entries call the origin once, fresh ones not at all, and the
/// report says which was which and why the rest were not warmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_warms_only_what_is_missing_and_reports_each_outcome() {
    let fixture = memory();
    let cache = layer(fixture.store);
    let stats = cache.stats();
    let (app, calls) = app(cache.clone());
    get(&app, "/items/1").await;
    fills_reach(&stats, 1).await;
    let before = calls.get();
    let warmer = cache.handle().warmer(app.clone()).concurrency(3);
    let report = warmer
        .warm([
            "/items/1", // fresh already
            "/items/2",
            "/items/3",
            "/items?page=1",
            "/cookie",   // Set-Cookie: never stored
            "/uncached", // not looked up
            "/me",       // per-user route, anonymous: its own entry
        ])
        .await;
    assert_eq!(report.requested, 7, "{report:?}");
    assert_eq!((report.warmed, report.fresh), (4, 1), "{report:?}");
    assert_eq!((report.failed, report.skipped), (1, 1), "{report:?}");
    let reasons: Vec<(&str, &str)> = report
        .problems
        .iter()
        .map(|p| (p.target.as_str(), p.reason.as_str()))
        .collect();
    assert!(reasons.contains(&("/cookie", "set-cookie")), "{reasons:?}");
    assert!(
        reasons.iter().any(|(t, _)| *t == "/uncached"),
        "{reasons:?}"
    );
    // Only the missing ones (and the two that are never stored) called the origin.
    assert_eq!(calls.get() - before, 6);
    fills_reach(&stats, 5).await;
    for uri in ["/items/2", "/items/3", "/items?page=1", "/me"] {
        assert_eq!(get(&app, uri).await.x_cache(), "HIT", "{uri}");
    }
    // Everything warm: a second run calls the origin for nothing it stores.
    let before = calls.get();
    let again = warmer.warm(["/items/1", "/items/2", "/items/3"]).await;
    assert_eq!((again.fresh, again.warmed), (3, 0), "{again:?}");
    assert_eq!(calls.get(), before);
    assert!(again.to_string().contains("3 fresh already"), "{again}");
}

/// A header given to the warmer goes with every request that lacks it: a user's token on
/// a per-user route warms that user's entry, and a request's own header wins.
#[tokio::test]
async fn a_warmers_header_goes_with_every_request() {
    let cache = layer(memory().store);
    let stats = cache.stats();
    let (app, _) = app(cache.clone());
    let own = Request::get("/me")
        .header("authorization", "Bearer 8")
        .body(())
        .unwrap();
    let report = cache
        .handle()
        .warmer(app.clone())
        .header(
            axum::http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer 7"),
        )
        .warm::<[tower_cache_aside::warm::WarmRequest; 2]>([own.into(), "/me".into()])
        .await;
    assert_eq!(report.warmed, 2, "{report:?}");
    fills_reach(&stats, 2).await;
    for user in ["7", "8"] {
        let bearer = format!("Bearer {user}");
        let r = get_with(&app, "/me", &[("authorization", bearer.as_str())]).await;
        assert_eq!((r.x_cache(), r.text()), ("HIT", format!("hello {bearer}")));
    }
}

/// A request that is not GET, or not a request target, is skipped with why; the rest run.
#[tokio::test]
async fn requests_it_cannot_send_are_skipped_with_why() {
    let cache = layer(memory().store);
    let (app, _) = app(cache.clone());
    let post = Request::post("/items/1").body(()).unwrap();
    let report = cache
        .handle()
        .warmer(app)
        .warm(vec![
            post.into(),
            "not a target \u{7f}".into(),
            tower_cache_aside::warm::WarmRequest::from("/items/9"),
        ])
        .await;
    assert_eq!((report.skipped, report.warmed), (2, 1), "{report:?}");
    assert!(report.problems[0].reason.contains("POST"), "{report:?}");
    assert!(
        report.problems[1].reason.contains("not a request target"),
        "{report:?}"
    );
}

/// A new instance warms what was hot on another: the store keeps the most requested keys
/// (with their requests, never their credentials); per-user entries are warmed only when
/// the app says how to ask as that user.
async fn a_new_instance_warms_what_was_hot_on_another(kind: Kind) {
    let server = Server::start(kind);
    let old = layer(valkey_store(&server));
    let old_stats = old.stats();
    let (old_app, _) = app(old.clone());
    // Hot: /items/1 (5 requests), /me as user 7 (3), /items/2 (2); cold: /items/3 (1).
    let traffic: [(&str, Option<&str>, usize); 4] = [
        ("/items/1", None, 5),
        ("/me", Some("7"), 3),
        ("/items/2", None, 2),
        ("/items/3", None, 1),
    ];
    for (uri, user, n) in traffic {
        for _ in 0..n {
            match user {
                Some(u) => {
                    get_with(&old_app, uri, &[("authorization", &format!("Bearer {u}"))]).await
                }
                None => get(&old_app, uri).await,
            };
        }
    }
    fills_reach(&old_stats, 4).await;
    let hot = old.handle().hot_keys(2);
    let hot: Vec<(&str, Option<&str>, u64)> = hot
        .iter()
        .map(|k| (k.target.as_str(), k.user.as_deref(), k.requests))
        .collect();
    assert_eq!(hot, [("/items/1", None, 5), ("/me", Some("7"), 3)]);
    assert_eq!(old.handle().flush_hot_keys().await.unwrap(), 4);
    // The record names the user, never the token.
    let record = old.store().hot(10).await.unwrap();
    let raw: Vec<String> = record
        .iter()
        .map(|(r, _)| String::from_utf8_lossy(r).into_owned())
        .collect();
    assert_eq!(raw.len(), 4, "{raw:?}");
    assert!(
        raw[0].contains("/items/1") && raw[1].contains("/me"),
        "{raw:?}"
    );
    assert_eq!(
        record.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
        [5, 3, 2, 1]
    );
    assert!(
        !raw.iter().any(|r| r.contains("Bearer")),
        "credentials reached the store: {raw:?}"
    );

    // A new instance (a new namespace of entries would be a cold store: purge it).
    old.handle().purge().await.unwrap();
    let new = layer(valkey_store(&server));
    let new_stats = new.stats();
    let (new_app, calls) = app(new.clone());
    // The three hottest, without a way to ask as user 7: the per-user one is skipped.
    let cautious = new.handle().warmer(new_app.clone());
    let report = cautious.warm_recorded(3).await.unwrap();
    assert_eq!((report.warmed, report.skipped), (2, 1), "{report:?}");
    assert!(report.problems[0].reason.contains("per-user"), "{report:?}");
    assert_eq!(calls.get(), 2);
    // Their fills land in the background, after the responses the warmer read.
    fills_reach(&new_stats, 2).await;
    // With it, all four; those warmed already are fresh.
    let warmer: Warmer<_, _> = new.handle().warmer(new_app.clone()).per_user(as_user);
    let report = warmer.warm_recorded(10).await.unwrap();
    assert_eq!((report.warmed, report.fresh), (2, 2), "{report:?}");
    fills_reach(&new_stats, 4).await;
    let calls_after_warming = calls.get();
    assert_eq!(get(&new_app, "/items/1").await.x_cache(), "HIT");
    let me = get_with(&new_app, "/me", &[("authorization", "Bearer 7")]).await;
    assert_eq!(
        (me.x_cache(), me.text().as_str()),
        ("HIT", "hello Bearer 7")
    );
    // Another user's entry was never made from user 7's.
    let other = get_with(&new_app, "/me", &[("authorization", "Bearer 8")]).await;
    assert_eq!(
        (other.x_cache(), other.text().as_str()),
        ("MISS", "hello Bearer 8")
    );
    assert_eq!(calls.get(), calls_after_warming + 1);
}

/// Garbage in the store's record is skipped, never sent.
async fn garbage_in_the_record_is_skipped(kind: Kind) {
    let server = Server::start(kind);
    server.command(&["ZADD", "tca:2:h", "9", "H1 not a record", "8", "\u{ff}"]);
    let cache = layer(valkey_store(&server));
    let (app, calls) = app(cache.clone());
    let report = cache.handle().warmer(app).warm_recorded(10).await.unwrap();
    assert_eq!(report.requested, 0, "{report:?}");
    assert_eq!(calls.get(), 0);
}

/// After a clear on a route that asks for it, the instance that made the clear fetches the
/// hottest entries it made dead again: the next reader hits, and the origin is called once
/// per entry, not once per instance.
async fn a_clear_refreshes_the_hottest_entries_it_made_dead(kind: Kind) {
    let server = Server::start(kind);
    let table = || {
        routes().route(
            "/refreshed/{id}",
            RoutePolicy::ttl(Duration::from_secs(60))
                .tags(["refreshed", "refreshed:{id}"])
                .refresh_after_clear(true),
        )
    };
    let versions = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let origin_calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let instance = || {
        let table = table().route(
            "/plain/{id}",
            RoutePolicy::ttl(Duration::from_secs(60)).tags(["refreshed"]),
        );
        let cache = CacheLayer::new(valkey_store(&server)).routes(table);
        let (versions, origin_calls) = (versions.clone(), origin_calls.clone());
        let router = axum::Router::new()
            .route(
                "/refreshed/{id}",
                axum::routing::get(move |axum::extract::Path(id): axum::extract::Path<u32>| {
                    let (versions, origin_calls) = (versions.clone(), origin_calls.clone());
                    async move {
                        origin_calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let v = versions.load(std::sync::atomic::Ordering::SeqCst);
                        format!("{id} v{v}")
                    }
                }),
            )
            .route("/plain/{id}", axum::routing::get(|| async { "plain" }))
            .layer(cache.clone());
        cache.handle().warmer(router.clone()).refresh_after_clears();
        (cache, router)
    };
    let (a, a_app) = instance();
    let (b, b_app) = instance();
    for id in [1, 2] {
        assert_eq!(
            get(&a_app, &format!("/refreshed/{id}")).await.text(),
            format!("{id} v0")
        );
    }
    get(&a_app, "/plain/1").await;
    fills_reach(&a.stats(), 3).await;
    assert_eq!(get(&b_app, "/refreshed/1").await.x_cache(), "HIT");
    let before = origin_calls.load(std::sync::atomic::Ordering::SeqCst);
    // The data changes; instance A clears both entries' tag.
    versions.store(1, std::sync::atomic::Ordering::SeqCst);
    a.handle().invalidate(["refreshed"]).await.unwrap();
    // A fetches both again in the background; B, which only heard of the clear, does not.
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.stats().snapshot().fills < 5 {
        assert!(
            Instant::now() < deadline,
            "the cleared entries were not refreshed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for app in [&a_app, &b_app] {
        for id in [1, 2] {
            let r = get(app, &format!("/refreshed/{id}")).await;
            assert_eq!((r.x_cache(), r.text()), ("HIT", format!("{id} v1")));
        }
    }
    settle().await;
    assert_eq!(
        origin_calls.load(std::sync::atomic::Ordering::SeqCst) - before,
        2
    );
    assert_eq!(b.stats().snapshot().fills, 0);
    // A route that did not ask is not refreshed: /plain/1 stays cold after the clear.
    assert_eq!(get(&a_app, "/plain/1").await.x_cache(), "MISS");
}

server_suite!(
    a_new_instance_warms_what_was_hot_on_another,
    garbage_in_the_record_is_skipped,
    a_clear_refreshes_the_hottest_entries_it_made_dead,
);

/// The record keeps no credentials: a route keyed by a credential header is not recorded;
/// nor are the warmer's own requests (what was warmed would stay on top), nor requests too
/// large to be worth it.
#[tokio::test]
async fn the_record_keeps_no_credentials_and_not_its_own_warming() {
    let table = routes().route(
        "/by-cookie",
        RoutePolicy::ttl(Duration::from_secs(60))
            .scope(tower_cache_aside::Scope::Public)
            .vary(["cookie"]),
    );
    let cache = CacheLayer::new(memory().store).routes(table);
    let (app, _) = app(cache.clone());
    let handle = cache.handle();
    get_with(&app, "/by-cookie", &[("cookie", "session=secret")]).await;
    get_with(&app, "/lang", &[("accept-language", "fr")]).await;
    let long = format!("/items?q={}", "x".repeat(5000));
    get(&app, &long).await;
    let hot = handle.hot_keys(10);
    let targets: Vec<&str> = hot.iter().map(|k| k.target.as_str()).collect();
    assert_eq!(targets, ["/lang"], "{hot:?}");
    let report = handle
        .warmer(app.clone())
        .warm(["/items/1", "/items/2"])
        .await;
    assert_eq!(report.warmed, 2, "{report:?}");
    assert_eq!(handle.hot_keys(10).len(), 1, "warming counted itself");
}
