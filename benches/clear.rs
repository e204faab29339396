//! Clearing a tag that 1,000,000 entries carry: how long the clear takes, and how long any
//! other client waits meanwhile (PINGs sent back to back during the clear, and `SLOWLOG`).
//! Also clears per second from one instance. Starts its own Valkey on a free loopback port.
//!
//! Run with: cargo bench --bench clear   (CLEAR_ENTRIES=N for another size)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bb8_redis::redis;
use tower_cache_aside::{
    store::{Fill, Store, ValkeyStore},
    EntryKey,
};

#[allow(dead_code)]
#[path = "../tests/support/server.rs"]
mod server;

fn main() {
    // `cargo test --all-targets` runs benchmark binaries too: a million fills is not a test.
    if !std::env::args().any(|a| a == "--bench") {
        println!("clear benchmark: run it with `cargo bench --bench clear`");
        return;
    }
    let entries: u64 = std::env::var("CLEAR_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let valkey = server::Server::start(server::Kind::Valkey);
    rt.block_on(async {
        let store = ValkeyStore::builder()
            .url(valkey.url())
            .operation_timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let key = |i: u64| {
            let mut digest = [0u8; 32];
            digest[..8].copy_from_slice(&i.to_le_bytes());
            EntryKey::new("bulk", digest)
        };
        let fence = store.lookup(&key(0)).await.unwrap().fence;
        let start = Instant::now();
        let value = bytes::Bytes::from(vec![b'x'; 100]);
        for chunk in (0..entries).collect::<Vec<_>>().chunks(2_000) {
            let fills = chunk.iter().map(|&i| {
                let tags = vec!["bulk".to_owned(), format!("item:{i}")];
                let fill = Fill::new(
                    key(i),
                    value.clone(),
                    Duration::from_secs(3600),
                    tags,
                    fence,
                );
                store.fill(fill)
            });
            for outcome in futures_util::future::join_all(fills).await {
                outcome.unwrap();
            }
        }
        println!(
            "filled {entries} entries tagged `bulk` in {:.1?}",
            start.elapsed()
        );

        let mut raw = redis::Client::open(valkey.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = redis::cmd("SLOWLOG")
            .arg("RESET")
            .query_async(&mut raw)
            .await
            .unwrap();
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("slowlog-log-slower-than")
            .arg(1000)
            .query_async(&mut raw)
            .await
            .unwrap();
        // Another client pings back to back while the clear runs.
        let done = Arc::new(AtomicBool::new(false));
        let pinger = {
            let (done, mut raw) = (done.clone(), raw.clone());
            tokio::spawn(async move {
                let mut worst = Duration::ZERO;
                let mut n = 0u32;
                while !done.load(Ordering::Relaxed) || n < 100 {
                    let t = Instant::now();
                    let _: () = redis::cmd("PING").query_async(&mut raw).await.unwrap();
                    worst = worst.max(t.elapsed());
                    n += 1;
                }
                (n, worst)
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t = Instant::now();
        store.invalidate(&["bulk".to_owned()]).await.unwrap();
        let took = t.elapsed();
        done.store(true, Ordering::Relaxed);
        let (pings, worst) = pinger.await.unwrap();
        let slow: Vec<redis::Value> = redis::cmd("SLOWLOG")
            .arg("GET")
            .query_async(&mut raw)
            .await
            .unwrap();
        println!(
            "clear of the tag: {took:.2?}; {pings} PINGs meanwhile, slowest {worst:.2?}; \
             commands over 1 ms in SLOWLOG: {}",
            slow.len()
        );
        let live = store
            .lookup(&key(entries / 2))
            .await
            .unwrap()
            .value
            .is_some();
        println!(
            "an entry of the tag after the clear: {}",
            if live { "SERVED (bug)" } else { "a miss" }
        );

        // Clears per second from one instance, one tag each, 32 at a time.
        let n = 20_000u64;
        let t = Instant::now();
        for chunk in (0..n).collect::<Vec<_>>().chunks(32) {
            let clears = chunk.iter().map(|i| {
                let store = store.clone();
                async move { store.invalidate(&[format!("item:{i}")]).await.unwrap() }
            });
            futures_util::future::join_all(clears).await;
        }
        let secs = t.elapsed().as_secs_f64();
        println!("{n} clears in {secs:.2} s: {:.0} clears/s", n as f64 / secs);
    });
}
