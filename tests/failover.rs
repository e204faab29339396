//! Fail-open against real servers: killed, paused and restarted Valkey / Redis, and AUTH.
//! Clients must never see an error, and a request waits at most about one operation timeout.

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use support::*;
use tower_cache_aside::{store::ValkeyStore, CacheLayer, StatsSnapshot};

const OP_TIMEOUT: Duration = Duration::from_millis(100);
/// Generous bound for "about one operation timeout" on a loaded 2-core CI machine: a hang
/// (no timeout) would blow through it, scheduling noise will not.
const BOUND: Duration = Duration::from_millis(1000);

fn store(server: &Server) -> ValkeyStore {
    ValkeyStore::builder()
        .url(server.url())
        .operation_timeout(OP_TIMEOUT)
        .build()
        .unwrap()
}

fn layer(store: ValkeyStore) -> CacheLayer<ValkeyStore> {
    CacheLayer::new(store).routes(routes())
}

/// Sends `n` GETs over 10 ids; every one must succeed with the right body. Returns the
/// slowest latency.
async fn hammer(app: &axum::Router, n: usize) -> Duration {
    let mut slowest = Duration::ZERO;
    for i in 0..n {
        let id = i % 10;
        let start = Instant::now();
        let r = get(app, &format!("/items/{id}")).await;
        slowest = slowest.max(start.elapsed());
        assert_eq!(r.status, 200, "request {i} failed");
        assert_eq!(r.text(), format!("item {id}"));
    }
    slowest
}

async fn wait_for_hit(app: &axum::Router, deadline: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if get(app, "/items/1").await.x_cache() == "HIT" {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

fn report(name: &str, kind: Kind, slowest: Duration, s: &StatsSnapshot) {
    eprintln!(
        "{name} [{kind:?}]: slowest request {slowest:?}; store_errors={} breaker_trips={} breaker_skips={}",
        s.store_errors, s.breaker_trips, s.breaker_skips
    );
}

async fn killed_server_fails_open(kind: Kind) {
    let mut server = Server::start(kind);
    let l = layer(store(&server));
    let stats = l.stats();
    let (app, calls) = app(l);
    hammer(&app, 10).await;
    fills_reach(&stats, 10).await;
    assert_eq!(get(&app, "/items/1").await.x_cache(), "HIT");
    server.kill();
    let before = calls.get();
    let slowest = hammer(&app, 200).await;
    let s = stats.snapshot();
    report("killed", kind, slowest, &s);
    assert_eq!(calls.get() - before, 200, "every request reached the app");
    assert!(slowest < BOUND, "a request waited {slowest:?}");
    assert!(s.store_errors >= 1 && s.breaker_trips >= 1, "{s:?}");
    assert!(
        s.breaker_skips > 150,
        "the breaker spared most requests the store: {s:?}"
    );
}

async fn paused_server_costs_at_most_the_timeout(kind: Kind) {
    let server = Server::start(kind);
    let l = layer(store(&server));
    let stats = l.stats();
    let (app, _calls) = app(l);
    hammer(&app, 10).await;
    fills_reach(&stats, 10).await;
    server.pause();
    // Concurrent clients too: none may hang on the stopped server.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move { hammer(&app, 30).await }));
    }
    let mut slowest = hammer(&app, 30).await;
    for t in tasks {
        slowest = slowest.max(t.await.unwrap());
    }
    let s = stats.snapshot();
    report("paused", kind, slowest, &s);
    assert!(slowest < BOUND, "a request waited {slowest:?}");
    assert!(
        slowest >= OP_TIMEOUT / 2,
        "some request should have waited for the timeout"
    );
    assert!(s.breaker_trips >= 1, "{s:?}");
    server.resume();
    let resumed = wait_for_hit(&app, Duration::from_secs(10)).await;
    eprintln!("paused [{kind:?}]: caching resumed {resumed:?} after SIGCONT");
    assert!(
        resumed.is_some(),
        "caching never resumed after the server was resumed"
    );
}

async fn restarted_server_resumes_caching(kind: Kind) {
    let mut server = Server::start(kind);
    let l = layer(store(&server));
    let stats = l.stats();
    let (app, _calls) = app(l);
    hammer(&app, 10).await;
    fills_reach(&stats, 10).await;
    server.kill();
    hammer(&app, 50).await;
    assert!(stats.snapshot().breaker_open);
    server.restart();
    let resumed = wait_for_hit(&app, Duration::from_secs(10)).await;
    eprintln!("restart [{kind:?}]: first hit {resumed:?} after the server came back");
    let resumed = resumed.expect("caching never resumed after a restart");
    assert!(resumed < Duration::from_secs(4), "took {resumed:?}");
    assert!(!stats.snapshot().breaker_open);
}

async fn auth_works_and_a_wrong_password_fails_open(kind: Kind) {
    let server = Server::start_with_password(kind, Some("s3cret-pw"));
    let l = layer(store(&server));
    let stats = l.stats();
    let (router, _calls) = app(l);
    get(&router, "/items/1").await;
    fills_reach(&stats, 1).await;
    assert_eq!(get(&router, "/items/1").await.x_cache(), "HIT");
    assert_ne!(
        server.command(&["DBSIZE"]),
        ":0",
        "the authenticated store wrote"
    );

    let wrong = ValkeyStore::builder()
        .url(format!("redis://:wrong@127.0.0.1:{}/0", server.port))
        .operation_timeout(OP_TIMEOUT)
        .build()
        .unwrap();
    assert!(
        !format!("{wrong:?}").contains("wrong"),
        "passwords are redacted"
    );
    let l = layer(wrong);
    let stats = l.stats();
    let (app, calls) = app(l);
    let slowest = hammer(&app, 20).await;
    assert!(slowest < BOUND);
    assert_eq!(calls.get(), 20);
    assert!(stats.snapshot().store_errors >= 1);
}

async fn pass_through_when_never_reachable(kind: Kind) {
    // A server that was never there: the app starts and serves anyway.
    let server = Server::start(kind);
    let url = server.url();
    drop(server);
    let l = layer(
        ValkeyStore::builder()
            .url(url)
            .operation_timeout(OP_TIMEOUT)
            .build()
            .unwrap(),
    );
    let (app, calls) = app(l);
    let slowest = hammer(&app, 30).await;
    assert!(slowest < BOUND);
    assert_eq!(calls.get(), 30);
}

async fn store_vanishes_mid_request(kind: Kind) {
    let mut server = Server::start(kind);
    let l = layer(store(&server));
    let stats = l.stats();
    let (app, calls) = app(l);
    // The lookup succeeds, then the server dies while the handler runs: the fill fails.
    let pending = tokio::spawn({
        let app = app.clone();
        async move { get(&app, "/slow").await }
    });
    tokio::time::sleep(SLOW / 3).await;
    server.kill();
    let r = pending.await.unwrap();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "slow"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats.snapshot().store_errors == 0 {
        assert!(Instant::now() < deadline, "the failed fill was not counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!((calls.get(), stats.snapshot().fills), (1, 0));
    // And back again: the next requests fill and hit.
    server.restart();
    let resumed = wait_for_hit(&app, Duration::from_secs(10)).await;
    assert!(resumed.is_some());
}

server_suite!(
    killed_server_fails_open,
    paused_server_costs_at_most_the_timeout,
    restarted_server_resumes_caching,
    auth_works_and_a_wrong_password_fails_open,
    pass_through_when_never_reachable,
    store_vanishes_mid_request,
);
