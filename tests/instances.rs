//! Several app instances sharing one Valkey / Redis: clears made on one are seen by the
//! others' next reads, with and without a near cache, and the subscription survives restarts.

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use axum::routing::get as route_get;
use axum::Router;
use support::*;
use tower_cache_aside::{
    store::{MemoryStore, Notice, Store, TieredStore},
    CacheLayer, RoutePolicy, RouteTable,
};

fn table() -> RouteTable {
    RouteTable::new().route(
        "/things/{id}",
        RoutePolicy::ttl(Duration::from_secs(300)).tags(["thing:{id}"]),
    )
}

/// An instance whose handler answers with the shared version counter.
fn instance<St: Store>(store: St, version: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Router {
    use std::sync::atomic::Ordering;
    let cache = CacheLayer::new(store).routes(table());
    let (read, write) = (version.clone(), version);
    Router::new()
        .route(
            "/things/{id}",
            route_get(move || {
                let v = read.clone();
                async move { format!("v{}", v.load(Ordering::SeqCst)) }
            })
            .put(move || {
                let v = write.clone();
                async move { format!("v{}", v.fetch_add(1, Ordering::SeqCst) + 1) }
            }),
        )
        .layer(cache.invalidate_layer())
        .layer(cache)
}

async fn until_hit(app: &Router, uri: &str) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = get(app, uri).await;
        if r.x_cache() == "HIT" {
            return r;
        }
        assert!(Instant::now() < deadline, "{uri} never became a hit");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Until `uri` is held near (a hit copies it there once the records vouch for it).
async fn until_near(app: &Router, store: &TieredStore, uri: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.near().entry_count() == 0 {
        assert!(Instant::now() < deadline, "{uri} never held near");
        get(app, uri).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn tiered(server: &Server) -> TieredStore {
    TieredStore::new(MemoryStore::new(16 << 20), valkey_store(server))
}

/// Until the near tier may answer (the records of the connection serving the probe read).
async fn wait_live(store: &TieredStore) {
    use tower_cache_aside::store::Store;
    let probe = tower_cache_aside::EntryKey::new("probe", [0; 32]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !store.near_is_live(&probe) {
        let _ = store.lookup(&probe).await;
        assert!(Instant::now() < deadline, "near tier never went live");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn a_clear_on_one_instance_is_seen_by_the_others(kind: Kind) {
    let server = Server::start(kind);
    let version = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let a = instance(valkey_store(&server), version.clone());
    let near = tiered(&server);
    let b_near = instance(near.clone(), version.clone());
    let b_plain = instance(valkey_store(&server), version.clone());
    // Wake the near tier's subscription, then fill through every instance.
    get(&b_near, "/things/0").await;
    wait_live(&near).await;
    for app in [&a, &b_near, &b_plain] {
        assert_eq!(until_hit(app, "/things/1").await.text(), "v0");
    }
    // b_near now answers from memory, without Valkey.
    until_near(&b_near, &near, "/things/1").await;
    for round in 1..=5u64 {
        let w = send(&a, Request::put("/things/1").body(Body::empty()).unwrap()).await;
        assert_eq!(w.text(), format!("v{round}"));
        // The plain instance reads Valkey: the clear is already there.
        let r = get(&b_plain, "/things/1").await;
        assert_eq!((r.x_cache(), r.text()), ("MISS", format!("v{round}")));
        // The near instance hears of the clear on its data connection (the server's
        // announcement: delivery time, bounded here).
        let deadline = Instant::now() + Duration::from_secs(2);
        let started = Instant::now();
        loop {
            let r = get(&b_near, "/things/1").await;
            if r.text() == format!("v{round}") {
                eprintln!(
                    "[{kind:?}] round {round}: near instance saw the clear after {:?}",
                    started.elapsed()
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "near instance kept serving {}",
                r.text()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        until_hit(&b_near, "/things/1").await;
        until_hit(&b_plain, "/things/1").await;
    }
    // A clear made through the near instance applies to its own near tier before it answers.
    let w = send(
        &b_near,
        Request::put("/things/1").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(w.text(), "v6");
    assert_eq!(get(&b_near, "/things/1").await.text(), "v6");
    assert_eq!(get(&a, "/things/1").await.text(), "v6");
}

async fn next(rx: &mut tokio::sync::broadcast::Receiver<Notice>) -> Notice {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a notice within 10 s")
        .unwrap()
}

async fn the_subscription_survives_a_restart(kind: Kind) {
    let mut server = Server::start(kind);
    let store = valkey_store(&server);
    let mut notices = store.subscribe();
    assert_eq!(next(&mut notices).await, Notice::Subscribed);
    let done = store.invalidate(&["a".to_owned()]).await.unwrap();
    assert_eq!(
        next(&mut notices).await,
        Notice::Cleared {
            epoch: done.epoch,
            seq: done.seq,
            tags: vec!["a".into()]
        }
    );
    server.kill();
    assert_eq!(next(&mut notices).await, Notice::Lost);
    server.restart();
    assert_eq!(next(&mut notices).await, Notice::Subscribed);
    // Give the shared command connection a moment to be replaced too.
    let deadline = Instant::now() + Duration::from_secs(5);
    let done = loop {
        match store.invalidate(&["b".to_owned(), "c".to_owned()]).await {
            Ok(d) => break d,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("store never came back: {e}"),
        }
    };
    assert_eq!(
        next(&mut notices).await,
        Notice::Cleared {
            epoch: done.epoch,
            seq: done.seq,
            tags: vec!["b".into(), "c".into()]
        }
    );
    let seq = store.purge().await.unwrap();
    assert_eq!(
        next(&mut notices).await,
        Notice::Purged {
            epoch: done.epoch,
            seq
        }
    );
}

async fn the_near_tier_stops_answering_when_its_connection_breaks(kind: Kind) {
    let mut server = Server::start(kind);
    let near = tiered(&server);
    let version = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let app = instance(near.clone(), version.clone());
    get(&app, "/things/0").await;
    wait_live(&near).await;
    until_near(&app, &near, "/things/1").await;
    server.kill();
    // Valkey is gone, and with it the connection that would announce clears: the near
    // copies are not served with clears possibly missed.
    let probe = tower_cache_aside::EntryKey::new("probe", [0; 32]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while near.near_is_live(&probe) {
        assert!(
            Instant::now() < deadline,
            "near tier stayed live without its connection"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = get(&app, "/things/1").await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"));
    server.restart();
    wait_live(&near).await;
    until_hit(&app, "/things/1").await;
}

/// A `FLUSHALL` (or the record set's eviction) starts a new epoch, whose first clear is
/// numbered 1: a near tier must not take it for a clear older than its entries.
async fn a_clear_in_a_new_epoch_reaches_the_near_tier(kind: Kind) {
    use tower_cache_aside::{store::Store, EntryKey};
    let server = Server::start(kind);
    let (a, b) = (tiered(&server), valkey_store(&server));
    let key = EntryKey::new("r", [3; 32]);
    a.lookup(&key).await.unwrap();
    wait_live(&a).await;
    for _ in 0..5 {
        b.invalidate(&["other".to_owned()]).await.unwrap();
    }
    // Filled, and copied near once the records vouch for it (an announcement of the
    // clears above may still be arriving: then the next try copies it).
    let deadline = Instant::now() + Duration::from_secs(2);
    while a.near().entry_count() == 0 {
        assert!(Instant::now() < deadline, "never copied near");
        support::fill_as_looked_up(&a, &key, "t").await;
    }
    server.command(&["FLUSHALL"]);
    let done = b.invalidate(&["t".to_owned()]).await.unwrap();
    assert_eq!(done.seq, 1, "a new epoch");
    let deadline = Instant::now() + Duration::from_secs(2);
    while a.lookup(&key).await.unwrap().value.is_some() {
        assert!(
            Instant::now() < deadline,
            "the near tier kept serving an entry of a cleared tag"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Near tiers on two instances, writers and readers on both, no fixed window: a read that
/// starts after a write's response may miss it only while the clear's announcement travels
/// to the reader's instance (here: loopback and a busy 2-core machine). Prints what it saw.
async fn near_tiers_stay_coherent_under_concurrent_writes(kind: Kind) {
    use support::race::{instance, race, Db};
    let server = Server::start(kind);
    let db = Db::default();
    let (a_store, b_store) = (tiered(&server), tiered(&server));
    let (a, a_stats) = instance(a_store.clone(), db.clone());
    let (b, b_stats) = instance(b_store.clone(), db);
    wait_live(&a_store).await;
    wait_live(&b_store).await;
    let verdict = race(&[a, b], Duration::from_secs(3), async {}).await;
    let (sa, sb) = (a_stats.snapshot(), b_stats.snapshot());
    eprintln!(
        "[{kind:?}] near tiers under concurrent writes: {verdict:?}; hits {} + {}, of which near {} + {}",
        sa.hits,
        sb.hits,
        a_store.near_hits(),
        b_store.near_hits()
    );
    assert!(
        a_store.near_hits() + b_store.near_hits() > 0,
        "the near tiers never answered"
    );
    assert_eq!(verdict.errors, 0);
    assert!(sa.hits + sb.hits > 500, "too few hits to mean anything");
    assert!(
        verdict.worst_lag < Duration::from_millis(50),
        "a read started {:?} after a write's response missed it",
        verdict.worst_lag
    );
}

server_suite!(
    near_tiers_stay_coherent_under_concurrent_writes,
    a_clear_in_a_new_epoch_reaches_the_near_tier,
    a_clear_on_one_instance_is_seen_by_the_others,
    the_subscription_survives_a_restart,
    the_near_tier_stops_answering_when_its_connection_breaks,
);
