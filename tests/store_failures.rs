//! What Valkey may do to the keys the store writes, and the guarantee holding through it:
//! eviction under every usual policy, `noeviction` with memory full, restarts without
//! persistence, `FLUSHALL`, and a chaos monkey deleting random keys of the namespace.
//!
//! Each runs the race checker below against a real server: writers bump a resource's
//! version, clear its tag, then acknowledge; readers note the acknowledged version, look the
//! resource up and, on a miss, read it (slowly) and fill the store as the layer does. A read
//! that starts after an acknowledgement and is served an older version is a violation.

#[macro_use]
mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bb8_redis::redis as rds;
use support::*;
use tower_cache_aside::{
    store::{Fence, Fill, Store, ValkeyStore},
    EntryKey,
};

const RESOURCES: u64 = 4;

#[derive(Debug, Default)]
struct Report {
    reads: u64,
    hits: u64,
    writes: u64,
    violations: u64,
}

fn key(id: u64) -> EntryKey {
    let mut digest = [0u8; 32];
    digest[..8].copy_from_slice(&id.to_le_bytes());
    EntryKey::new("race", digest)
}

/// Readers and writers on `RESOURCES` resources for `budget`; `fenced: false` makes fills
/// claim a fence newer than anything (the stale-set race reopened) to show the checker can
/// fail. Store errors are what a bad day brings: a reader then reads the source, a writer
/// retries its clear until it lands before acknowledging.
async fn race(store: ValkeyStore, budget: Duration, fenced: bool) -> Report {
    let db: Arc<Vec<AtomicU64>> = Arc::new((0..RESOURCES).map(|_| AtomicU64::new(1)).collect());
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..RESOURCES).map(|_| AtomicU64::new(0)).collect());
    let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let deadline = Instant::now() + budget;
    let mut tasks = Vec::new();
    for w in 0..2u64 {
        let (store, db, acked, counts) = (store.clone(), db.clone(), acked.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while Instant::now() < deadline {
                let id = i % RESOURCES;
                i += 1;
                let version = db[id as usize].fetch_add(1, Ordering::SeqCst) + 1;
                let tags = [format!("res:{id}")];
                while store.invalidate(&tags).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                acked[id as usize].fetch_max(version, Ordering::SeqCst);
                counts[2].fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }));
    }
    for r in 0..6u64 {
        let (store, db, acked, counts) = (store.clone(), db.clone(), acked.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = r;
            while Instant::now() < deadline {
                let id = i % RESOURCES;
                i += 1;
                let floor = acked[id as usize].load(Ordering::SeqCst);
                counts[0].fetch_add(1, Ordering::Relaxed);
                let found = match store.lookup(&key(id)).await {
                    Ok(found) => found,
                    Err(_) => continue, // passed through to the source: nothing to check
                };
                if let Some(value) = found.value {
                    counts[1].fetch_add(1, Ordering::Relaxed);
                    let served: u64 = std::str::from_utf8(&value).unwrap().parse().unwrap();
                    if served < floor {
                        counts[3].fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                // A miss: read the source slowly (writers overtake us), then fill.
                let version = db[id as usize].load(Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
                let fence = if fenced {
                    found.fence
                } else {
                    Fence::new(found.fence.epoch(), u64::MAX)
                };
                let fill = Fill::new(
                    key(id),
                    version.to_string().into(),
                    Duration::from_secs(60),
                    vec![format!("res:{id}")],
                    fence,
                );
                let _ = store.fill(fill).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = |i: usize| counts[i].load(Ordering::Relaxed);
    Report {
        reads: n(0),
        hits: n(1),
        writes: n(2),
        violations: n(3),
    }
}

/// Kills and starts the server again (on a thread of its own: starting blocks until it
/// answers). Without persistence it comes back empty; after a `SAVE`, from that snapshot.
async fn restart(server: Server) -> Server {
    tokio::task::spawn_blocking(move || {
        let mut server = server;
        server.restart();
        server
    })
    .await
    .unwrap()
}

/// Retries `op` until the server answers again (at most two seconds).
async fn once_back<T, F, Fut>(op: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, tower_cache_aside::StoreError>>,
{
    for _ in 0..100 {
        match op().await {
            Ok(done) => return done,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    panic!("the server never came back")
}

fn store_for(server: &Server) -> ValkeyStore {
    ValkeyStore::builder()
        .url(server.url())
        .operation_timeout(Duration::from_millis(500))
        .build()
        .unwrap()
}

/// Writes `n` keys of `size` bytes from another client, half of them with a TTL.
async fn filler(url: String, stop: Arc<AtomicBool>, size: usize) -> u64 {
    let mut conn = rds::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let value = vec![b'f'; size];
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) && i < 200_000 {
        let mut pipe = rds::pipe();
        for j in 0..50 {
            let k = format!("filler:{}", i + j);
            if j % 2 == 0 {
                pipe.cmd("SET")
                    .arg(&k)
                    .arg(&value)
                    .arg("EX")
                    .arg(600)
                    .ignore();
            } else {
                pipe.cmd("SET").arg(&k).arg(&value).ignore();
            }
        }
        // Refused writes (noeviction, volatile with nothing volatile left) are fine here.
        let _ = pipe.query_async::<()>(&mut conn).await;
        i += 50;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    i
}

async fn info_field(server: &Server, field: &str) -> u64 {
    let mut conn = rds::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let info: String = rds::cmd("INFO")
        .arg("stats")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Eviction: a tiny `maxmemory` under each usual policy, filler traffic from another client: the
/// record set and entries are evicted as Valkey pleases; no read is ever stale.
async fn eviction_never_serves_stale(kind: Kind) {
    for policy in ["allkeys-lru", "allkeys-lfu", "volatile-lru"] {
        let server = Server::start_with(
            kind,
            None,
            &["--maxmemory", "4mb", "--maxmemory-policy", policy],
        );
        let stop = Arc::new(AtomicBool::new(false));
        let fill = tokio::spawn(filler(server.url(), stop.clone(), 2048));
        let store = store_for(&server);
        assert_eq!(store.eviction_policy().await.unwrap(), policy);
        let report = race(store, Duration::from_millis(1500), true).await;
        stop.store(true, Ordering::Relaxed);
        fill.await.unwrap();
        let evicted = info_field(&server, "evicted_keys").await;
        eprintln!("{policy}: {report:?}, {evicted} keys evicted");
        assert!(evicted > 0, "{policy}: the test must actually evict");
        assert!(
            report.writes > 50 && report.reads > 200,
            "{policy}: {report:?}"
        );
        assert!(report.hits > 0, "{policy}: the cache must still serve hits");
        assert_eq!(report.violations, 0, "{policy}: stale reads under eviction");
    }
}

/// Full memory: `noeviction` with memory full: fills are refused, clears still land (and the entries
/// they cover are misses), and no read is stale.
async fn noeviction_with_memory_full_still_clears(kind: Kind) {
    let server = Server::start_with(
        kind,
        None,
        &["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"],
    );
    let store = store_for(&server);
    let fence = store.lookup(&key(0)).await.unwrap().fence;
    for id in 0..RESOURCES {
        let fill = Fill::new(
            key(id),
            "1".into(),
            Duration::from_secs(60),
            vec![format!("res:{id}")],
            fence,
        );
        store.fill(fill).await.unwrap();
    }
    // Fill memory from another client until writes are refused.
    let mut conn = rds::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let value = vec![b'f'; 4096];
    let mut full = false;
    for i in 0..100_000 {
        let set: Result<(), _> = rds::cmd("SET")
            .arg(format!("filler:{i}"))
            .arg(&value)
            .query_async(&mut conn)
            .await;
        if let Err(e) = set {
            assert_eq!(e.code(), Some("OOM"), "{e}");
            full = true;
            break;
        }
    }
    assert!(full, "memory must be full");
    // Clears land under OOM, and the entries they cover read as misses.
    for id in 0..RESOURCES {
        assert!(store.lookup(&key(id)).await.unwrap().value.is_some());
        store
            .invalidate(&[format!("res:{id}")])
            .await
            .expect("a clear lands with memory full");
        assert!(store.lookup(&key(id)).await.unwrap().value.is_none());
    }
    let stats = tower_cache_aside::store::FillOutcome::Dropped;
    let fence = store.lookup(&key(0)).await.unwrap().fence;
    let fill = Fill::new(key(0), "2".into(), Duration::from_secs(60), vec![], fence);
    assert_eq!(
        store.fill(fill).await.unwrap(),
        stats,
        "a refused fill is shed, not an error"
    );
    let report = race(store, Duration::from_millis(1000), true).await;
    eprintln!("noeviction, memory full: {report:?}");
    assert!(report.writes > 50, "{report:?}");
    assert_eq!(report.violations, 0);
}

/// Restart: the exact sequence from the review: a lookup, a restart without persistence, a clear
/// that starts the sequence again, then the fill of the first lookup. It must not be served.
async fn a_restart_between_lookup_and_fill_cannot_send_the_fence_back(kind: Kind) {
    let server = Server::start(kind);
    let (a, b) = (store_for(&server), store_for(&server));
    for _ in 0..5 {
        b.invalidate(&["other".to_owned()]).await.unwrap();
    }
    let fence = a.lookup(&key(1)).await.unwrap().fence;
    assert_eq!(fence.seq(), 5);
    let _server = restart(server).await;
    // The restarted server lost everything: the clear begins the records anew.
    let tags = ["res:1".to_owned()];
    let cleared = once_back(|| b.invalidate(&tags)).await;
    assert_eq!(cleared.seq, 1);
    let fill = Fill::new(
        key(1),
        "old".into(),
        Duration::from_secs(60),
        vec!["res:1".into()],
        fence,
    );
    once_back(|| a.fill(fill.clone())).await;
    for store in [&a, &b] {
        let found = store.lookup(&key(1)).await.unwrap();
        assert!(
            found.value.is_none(),
            "a fill from before the restart was served"
        );
        assert_ne!(
            found.fence.epoch(),
            fence.epoch(),
            "the lost records show as a new epoch"
        );
    }
}

/// Fills resource 1 (tagged `res:1`), saves a snapshot holding it, then clears its tag.
async fn snapshot_then_clear(
    server: &Server,
    store: &ValkeyStore,
) -> tower_cache_aside::store::Invalidation {
    let fence = store.lookup(&key(1)).await.unwrap().fence;
    let tags = vec!["res:1".to_owned()];
    let fill = Fill::new(
        key(1),
        "old".into(),
        Duration::from_secs(60),
        tags.clone(),
        fence,
    );
    store.fill(fill).await.unwrap();
    assert!(store.lookup(&key(1)).await.unwrap().value.is_some());
    assert_eq!(server.command(&["SAVE"]), "+OK");
    let cleared = store.invalidate(&tags).await.unwrap();
    assert!(store.lookup(&key(1)).await.unwrap().value.is_none());
    cleared
}

/// Restart from an older snapshot (or a failover to a replica that missed the last writes):
/// the records come back in the same epoch with a lower sequence, and an entry the lost
/// clear had made dead comes back with them. An instance that saw the higher sequence starts
/// a new epoch instead of serving it, and every instance then sees the new epoch.
async fn a_restart_from_an_older_snapshot_starts_a_new_epoch(kind: Kind) {
    let server = Server::start(kind);
    let (a, b) = (store_for(&server), store_for(&server));
    for _ in 0..5 {
        a.invalidate(&["other".to_owned()]).await.unwrap();
    }
    // The snapshot holds the entry and the records at sequence 5; the clear comes after it.
    let cleared = snapshot_then_clear(&server, &a).await;
    assert_eq!(cleared.seq, 6);
    assert!(a.lookup(&key(1)).await.unwrap().value.is_none());
    let _server = restart(server).await;
    let one = key(1);
    let seen = once_back(|| a.lookup(&one)).await;
    assert!(
        seen.value.is_none(),
        "the cleared entry came back from the snapshot and was served"
    );
    assert_ne!(
        seen.fence.epoch(),
        cleared.epoch,
        "the rollback shows as a new epoch"
    );
    // An instance that never saw sequence 6 follows the new epoch too.
    let other = b.lookup(&key(1)).await.unwrap();
    assert!(other.value.is_none());
    assert_eq!(other.fence.epoch(), seen.fence.epoch());
    // The server restarts from the same old snapshot again: its epoch is now older than the
    // newest A has seen, which is a rollback too.
    let _server = restart(_server).await;
    let again = once_back(|| a.lookup(&one)).await;
    assert!(
        again.value.is_none(),
        "the old snapshot's entry was served after a second restart"
    );
    assert!(again.fence.epoch() > seen.fence.epoch(), "epochs only grow");
}

/// The instance that saw the lost clear need not be serving requests: its keeper reads the
/// records once a second, finds them rolled back and starts a new epoch, and an instance
/// that came up after the restart (and never saw the clear) follows it.
async fn an_idle_instance_finds_a_rollback_within_seconds(kind: Kind) {
    let server = Server::start(kind);
    let a = store_for(&server);
    let fence = snapshot_then_clear(&server, &a).await;
    let server = restart(server).await;
    // A sends nothing from here on; B starts after the restart.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let b = store_for(&server);
    let found = b.lookup(&key(1)).await.unwrap();
    assert!(
        found.value.is_none(),
        "an entry whose clear was lost was served"
    );
    assert_ne!(found.fence.epoch(), fence.epoch);
    drop(a);
}

/// Restarts and `FLUSHALL`s while readers and writers race.
async fn restarts_and_flushes_during_the_race(kind: Kind) {
    let mut server = Server::start(kind);
    let store = store_for(&server);
    let url = server.url();
    // On a thread of its own: starting a server blocks until it answers.
    let chaos = tokio::task::spawn_blocking(move || {
        let mut rounds = 0;
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(2500) {
            std::thread::sleep(Duration::from_millis(150));
            if rounds % 3 == 2 {
                server.restart();
            } else {
                server.command(&["FLUSHALL"]);
            }
            rounds += 1;
        }
        (server, rounds)
    });
    let report = race(store, Duration::from_millis(3000), true).await;
    let (_server, rounds) = chaos.await.unwrap();
    eprintln!("restarts and flushes ({rounds} rounds, {url}): {report:?}");
    assert!(rounds >= 10);
    assert!(report.hits > 0 && report.writes > 50, "{report:?}");
    assert_eq!(report.violations, 0);
}

/// Chaos: a monkey deletes one random key of the namespace (entries and the record set
/// alike) between operations, thousands of times.
async fn chaos_deleting_random_keys(kind: Kind) {
    let server = Server::start(kind);
    let store = store_for(&server);
    let stop = Arc::new(AtomicBool::new(false));
    let monkey = {
        let (stop, url) = (stop.clone(), server.url());
        tokio::spawn(async move {
            let mut conn = rds::Client::open(url)
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            let mut deleted = 0u64;
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) && rounds < 20_000 {
                rounds += 1;
                let keys: Vec<String> = rds::cmd("KEYS")
                    .arg("tca:*")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                if keys.is_empty() {
                    tokio::task::yield_now().await;
                    continue;
                }
                let pick = &keys[(rounds as usize * 7919) % keys.len()];
                let n: u64 = rds::cmd("DEL")
                    .arg(pick)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                deleted += n;
                tokio::time::sleep(Duration::from_micros(300)).await;
            }
            deleted
        })
    };
    let report = race(store, Duration::from_millis(2500), true).await;
    stop.store(true, Ordering::Relaxed);
    let deleted = monkey.await.unwrap();
    eprintln!("chaos: {deleted} keys deleted, {report:?}");
    assert!(deleted >= 1000, "only {deleted} deletions");
    assert!(report.hits > 0, "{report:?}");
    assert_eq!(report.violations, 0);
}

/// The checker can fail: with fills claiming a fence newer than any clear, the same race on
/// a healthy server finds stale reads.
async fn without_the_fence_the_checker_finds_stale_reads(kind: Kind) {
    let server = Server::start(kind);
    let report = race(store_for(&server), Duration::from_millis(1500), false).await;
    eprintln!("unfenced: {report:?}");
    assert!(
        report.violations > 0,
        "the race checker must be able to fail"
    );
}

server_suite!(
    eviction_never_serves_stale,
    noeviction_with_memory_full_still_clears,
    a_restart_between_lookup_and_fill_cannot_send_the_fence_back,
    a_restart_from_an_older_snapshot_starts_a_new_epoch,
    an_idle_instance_finds_a_rollback_within_seconds,
    restarts_and_flushes_during_the_race,
    chaos_deleting_random_keys,
    without_the_fence_the_checker_finds_stale_reads,
);
