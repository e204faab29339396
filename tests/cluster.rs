//! Valkey Cluster beyond the store suites (which run on a 3-master cluster too): entries
//! spread over every master, any node's URL works, a master killed mid-traffic with its
//! replica taking over, and slots moved under traffic. Readers and writers race on two
//! instances throughout, and every read that starts after a write's response must see it.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use support::cluster::Cluster;
use support::race::{instance, race, Db};
use support::{get, Kind};
use tower_cache_aside::store::ValkeyStore;

/// Requests `/events/0..n` once (misses), waits for their fills, then checks each is a hit.
async fn fill_then_hit(app: &Router, stats: &tower_cache_aside::CacheStats, n: u64) {
    for id in 0..n {
        assert_eq!(get(app, &format!("/events/{id}")).await.status, 200);
    }
    support::fills_reach(stats, n).await;
    for id in 0..n {
        let r = get(app, &format!("/events/{id}")).await;
        assert_eq!(r.x_cache(), "HIT", "{id}");
    }
}

/// The number of keys a node holds.
fn dbsize(node: &support::Server) -> u64 {
    node.query(&["DBSIZE"])
        .trim_start_matches(':')
        .parse()
        .unwrap()
}

fn store(url: &str, wait: bool) -> ValkeyStore {
    let b = ValkeyStore::builder()
        .url(url)
        .operation_timeout(Duration::from_millis(250));
    let b = if wait {
        b.wait_for_replicas(1, Duration::from_millis(500))
    } else {
        b
    };
    b.build().unwrap()
}

/// Waits until `app` serves a hit again (caching resumed), at most `within`.
async fn until_hit(app: &Router, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        // A few resources: one of them lives on each master.
        let mut all = true;
        for id in 0..8 {
            let uri = format!("/events/{id}");
            get(app, &uri).await;
            all &= get(app, &uri).await.x_cache() == "HIT";
        }
        if all {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_spread_over_every_master_and_any_node_url_works() {
    let cluster = Cluster::start(Kind::Valkey, 3, 1);
    // The URL of a replica: the store learns the masters from it.
    let db = Db::default();
    let store = ValkeyStore::builder()
        .url(cluster.replicas[2].url())
        .operation_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let (app, stats) = instance(store, db);
    fill_then_hit(&app, &stats, 300).await;
    for m in &cluster.masters {
        let keys = dbsize(m);
        // 300 entries, 16 copies of the records: about a third each.
        assert!(
            (60..=200).contains(&keys),
            "master {} holds {keys} keys",
            m.port
        );
    }
    let s = stats.snapshot();
    assert_eq!((s.store_errors, s.hits), (0, 300), "{s:?}");
}

/// A master that stops answering (paused: its connections hang rather than close) costs
/// requests for its keys the operation timeout only a few times in a row; then it is passed
/// over, one operation probing it each second, while the other masters' keys stay cached.
/// Once it answers again, so does its cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_master_is_passed_over_while_the_others_serve() {
    // No replicas: nothing takes over, and nodes are declared failed only after 5 s.
    let cluster = Cluster::start(Kind::Valkey, 3, 0);
    let timeout = Duration::from_millis(250);
    let (app, stats) = instance(store(&cluster.url(), false), Db::default());
    fill_then_hit(&app, &stats, 30).await;
    cluster.masters[1].pause();
    let start = Instant::now();
    let (mut slow, mut hits, mut requests) = (0u32, 0u32, 0u32);
    for _ in 0..3 {
        for id in 0..30 {
            let asked = Instant::now();
            let r = get(&app, &format!("/events/{id}")).await;
            assert_eq!(r.status, 200, "{id}");
            slow += u32::from(asked.elapsed() >= timeout * 9 / 10);
            hits += u32::from(r.x_cache() == "HIT");
            requests += 1;
        }
    }
    let elapsed = start.elapsed();
    cluster.masters[1].resume();
    println!("hung master: {slow} of {requests} requests waited out the timeout, {hits} hits, in {elapsed:?}");
    // About a third of the 90 requests are for the hung master's keys: each would wait out
    // the timeout if it were not passed over.
    // Three to find it failing, one probe a second, and two for a loaded machine's luck.
    let probes = elapsed.as_secs() as u32 + 1;
    assert!(
        slow <= 3 + probes + 2,
        "{slow} of {requests} requests waited out the timeout in {elapsed:?}"
    );
    assert!(
        hits >= requests / 2,
        "{hits} hits of {requests}: the other masters' keys"
    );
    assert!(
        until_hit(&app, Duration::from_secs(10)).await.is_some(),
        "caching did not resume on the master once it answered"
    );
}

/// A master is killed mid-traffic; its replica takes over. No client sees an error, caching
/// resumes, and (with `wait_for_replicas`) no read that starts after a write's response is
/// older than it. The verdict without waiting for replicas is printed.
async fn a_killed_master_hands_over_to_its_replica(wait: bool) {
    let mut cluster = Cluster::start(Kind::Valkey, 3, 1);
    let db = Db::default();
    // Both instances name the master that dies: they must find the others.
    let url = cluster.url();
    let (a, a_stats) = instance(store(&url, wait), db.clone());
    let (b, _) = instance(store(&url, wait), db);
    for id in 0..64 {
        get(&a, &format!("/events/{id}")).await;
        get(&b, &format!("/events/{id}")).await;
    }
    let victim = cluster.masters.remove(0);
    let replica_port = cluster.replicas[0].port;
    let mut victim = Some(victim);
    let verdict = race(&[a.clone(), b.clone()], Duration::from_secs(6), async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(victim.take()); // killed
    })
    .await;
    let promoted = cluster.replicas[0].query(&["ROLE"]);
    eprintln!(
        "failover (wait_for_replicas {wait}): {verdict:?}; replica on {replica_port} is now {}; {:?}",
        promoted.lines().next().unwrap_or(""),
        a_stats.snapshot()
    );
    assert_eq!(verdict.errors, 0, "a client saw an error");
    assert!(
        verdict.reads > 300 && verdict.writes > 100,
        "too little traffic: {verdict:?}"
    );
    assert!(
        promoted.starts_with("master"),
        "the replica did not take over: {promoted}"
    );
    let resumed = until_hit(&a, Duration::from_secs(15)).await;
    eprintln!("caching resumed after {resumed:?}");
    assert!(
        resumed.is_some(),
        "caching did not resume after the failover"
    );
    if wait {
        assert_eq!(
            verdict.violations, 0,
            "a stale read after a completed write"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_hands_over_waiting_for_replicas() {
    a_killed_master_hands_over_to_its_replica(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_hands_over_without_waiting() {
    a_killed_master_hands_over_to_its_replica(false).await;
}

/// Moves `slots` from one master to another the way `valkey-cli --cluster reshard` does:
/// importing / migrating, `MIGRATE` key by key, then the new owner announced to every master.
fn move_slots(cluster: &Cluster, from: usize, to: usize, slots: std::ops::RangeInclusive<u16>) {
    let (src, dst) = (&cluster.masters[from], &cluster.masters[to]);
    let src_id = src.query(&["CLUSTER", "MYID"]);
    let dst_id = dst.query(&["CLUSTER", "MYID"]);
    for slot in slots {
        let slot = slot.to_string();
        assert_eq!(
            dst.command(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &src_id]),
            "+OK"
        );
        assert_eq!(
            src.command(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &dst_id]),
            "+OK"
        );
        loop {
            let keys = src.query(&["CLUSTER", "GETKEYSINSLOT", &slot, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let port = dst.port.to_string();
            let mut words = vec![
                "MIGRATE",
                "127.0.0.1",
                &port,
                "",
                "0",
                "5000",
                "REPLACE",
                "KEYS",
            ];
            words.extend(keys);
            let ok = src.command(&words);
            assert!(ok == "+OK" || ok == "+NOKEY", "MIGRATE: {ok}");
        }
        // The new owner first, then the old, then the rest (as the cluster manual says).
        let others = cluster
            .masters
            .iter()
            .filter(|m| m.port != src.port && m.port != dst.port);
        for m in [dst, src].into_iter().chain(others) {
            let ok = m.command(&["CLUSTER", "SETSLOT", &slot, "NODE", &dst_id]);
            assert_eq!(ok, "+OK", "SETSLOT NODE on {}", m.port);
        }
    }
}

/// Slots move between masters under traffic, among them the range holding the first copy
/// of the clear records: no client error, no stale read, and caching carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_move_under_traffic() {
    let cluster = Arc::new(Cluster::start(Kind::Valkey, 3, 0));
    let db = Db::default();
    let url = cluster.masters[1].url();
    let (a, a_stats) = instance(store(&url, false), db.clone());
    let (b, _) = instance(store(&url, false), db);
    for id in 0..64 {
        get(&a, &format!("/events/{id}")).await;
    }
    let mover = cluster.clone();
    let verdict = race(
        &[a.clone(), b.clone()],
        Duration::from_secs(6),
        async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            // Copy 0 of the records lies in slots 0..=1023, on master 0: move that range.
            let moved = tokio::task::spawn_blocking(move || move_slots(&mover, 0, 1, 0..=1023));
            moved.await.unwrap();
        },
    )
    .await;
    eprintln!("resharding: {verdict:?}; {:?}", a_stats.snapshot());
    assert_eq!(verdict.errors, 0);
    assert_eq!(
        verdict.violations, 0,
        "a stale read after a completed write"
    );
    assert!(
        verdict.reads > 300 && verdict.writes > 100,
        "too little traffic: {verdict:?}"
    );
    assert!(
        until_hit(&a, Duration::from_secs(10)).await.is_some(),
        "caching did not resume"
    );
}

/// A master that holds none of the copies of the clear records (an uneven slot layout:
/// copies lie at slots 0, 1024, 2048, ...): its entries are still served, the records read
/// from copy 0's node beside each `GET`, and stay coherent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_without_a_copy_of_the_records_still_serves_coherently() {
    // Master 0 owns every slot but the 16 the copies lie in; master 1 owns those.
    let between: Vec<(usize, usize)> = (0..16).map(|n| (n * 1024 + 1, n * 1024 + 1023)).collect();
    let copies: Vec<(usize, usize)> = (0..16).map(|n| (n * 1024, n * 1024)).collect();
    let cluster = Cluster::start_with_slots(Kind::Valkey, &[between, copies], 0);
    let db = Db::default();
    let url = cluster.url();
    let (a, a_stats) = instance(store(&url, false), db.clone());
    let (b, _) = instance(store(&url, false), db);
    // Some of the 64 resources live on the master without a copy.
    assert_eq!(dbsize(&cluster.masters[0]), 0);
    let verdict = race(&[a.clone(), b], Duration::from_secs(3), async {}).await;
    let keys = dbsize(&cluster.masters[0]);
    eprintln!(
        "uneven layout: {verdict:?}; {keys} keys on the master without a copy; {:?}",
        a_stats.snapshot()
    );
    assert!(
        keys > 32,
        "too few entries were stored on the master without a copy"
    );
    assert_eq!((verdict.errors, verdict.violations), (0, 0));
    assert!(a_stats.snapshot().hits > 0);
}

/// Near tiers on two instances over the cluster, writers and readers on both: near copies
/// are vouched for by each master's tracked copy of the records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_tiers_on_a_cluster_stay_coherent() {
    use tower_cache_aside::store::{MemoryStore, TieredStore};
    let cluster = Cluster::start(Kind::Valkey, 3, 0);
    let db = Db::default();
    let url = cluster.url();
    let tiered = || TieredStore::new(MemoryStore::new(16 << 20), store(&url, false));
    let (a_store, b_store) = (tiered(), tiered());
    let (a, a_stats) = instance(a_store.clone(), db.clone());
    let (b, b_stats) = instance(b_store.clone(), db);
    let verdict = race(&[a, b], Duration::from_secs(3), async {}).await;
    let near = a_store.near_hits() + b_store.near_hits();
    let hits = a_stats.snapshot().hits + b_stats.snapshot().hits;
    eprintln!("near tiers on a cluster: {verdict:?}; {hits} hits, {near} of them near");
    assert_eq!(verdict.errors, 0);
    assert!(near > 0, "the near tiers never answered");
    assert!(
        verdict.worst_lag < Duration::from_millis(50),
        "a read started {:?} after a write's response missed it",
        verdict.worst_lag
    );
}

/// A cluster whose nodes require a password: the nodes learnt from `CLUSTER SLOTS` are
/// reached with the credentials of the URL given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_is_reached_with_the_urls_credentials() {
    let cluster = Cluster::start_with_password(Kind::Valkey, 3, "s3cret-pw");
    let db = Db::default();
    let (app, stats) = instance(store(&cluster.url(), false), db);
    fill_then_hit(&app, &stats, 64).await;
    for m in &cluster.masters {
        let keys = dbsize(m);
        assert!(keys > 0, "master {} holds nothing", m.port);
    }
    assert_eq!(stats.snapshot().store_errors, 0);
}

/// The node the URL names is down when the app starts: the store finds the cluster through
/// the other seeds it was given, and caches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_first_node_is_passed_over_for_the_other_seeds() {
    let cluster = Cluster::start(Kind::Valkey, 3, 0);
    // A node that is not there: a port nothing listens on.
    let dead = format!("redis://127.0.0.1:{}/0", support::server::free_port());
    let store = ValkeyStore::builder()
        .url(dead)
        .cluster_seeds([cluster.masters[1].url(), cluster.masters[2].url()])
        .operation_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let (app, stats) = instance(store, Db::default());
    fill_then_hit(&app, &stats, 64).await;
}
