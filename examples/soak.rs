//! Run with: `scripts/soak [SECONDS]` (or `SOAK_SECS=60 cargo run --release --example soak`)
//!
//! The demo app on Valkey (or Redis: `SOAK_SERVER=redis`) while the server has a bad day:
//! every few seconds it is killed and started again empty, paused (`SIGSTOP`) and resumed,
//! or flushed. Meanwhile 32 clients read and write over loopback (the load of
//! `examples/loadgen.rs`), every read of an event checked against the writes acknowledged
//! before it started. The run fails unless: no client saw an error, no read was stale, no
//! request waited more than a second, and after each recovery the cache served hits again
//! within two seconds.

#[path = "demo/app.rs"]
mod app;
#[path = "demo/drive.rs"]
mod drive;
#[path = "../tests/support/server.rs"]
#[allow(dead_code)]
mod server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use drive::{drive, pct, Class};
use tower_cache_aside::{store::ValkeyStore, CacheLayer};

/// Enough data for the load's id ranges, quick to create.
const SEED: app::Seed = app::Seed {
    users: 50,
    servers: 40,
    workflows: 400,
    events: drive::HOT_EVENTS as i64,
    logs: 2_000,
    webhooks: 30,
};

/// What the chaos did, and how long the cache took to serve hits again after it.
struct Recovery {
    what: &'static str,
    back_after: Option<Duration>,
}

/// Asks for a hot resource until it is a hit again (at most 10 s).
async fn until_cached(base: &str) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let hit = async {
            let client = reqwest_like::get(&format!("{base}/servers/1"), "Bearer 1").await?;
            Some(client == "HIT")
        };
        if hit.await == Some(true) {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// A bare HTTP/1 GET returning the `X-Cache` header (no client crate needed).
mod reqwest_like {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub async fn get(url: &str, auth: &str) -> Option<String> {
        let rest = url.strip_prefix("http://")?;
        let (host, path) = rest.split_once('/')?;
        let mut s = tokio::net::TcpStream::connect(host).await.ok()?;
        let req = format!(
            "GET /{path} HTTP/1.1\r\nhost: {host}\r\nauthorization: {auth}\r\nconnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        let text = String::from_utf8_lossy(&out);
        text.lines()
            .find_map(|l| l.strip_prefix("x-cache: "))
            .map(|v| v.trim().to_owned())
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let kind = match std::env::var("SOAK_SERVER").as_deref() {
        Ok("redis") => server::Kind::Redis,
        _ => server::Kind::Valkey,
    };
    let server = server::Server::start(kind);
    let url = server.url();
    let db = Arc::new(
        tokio::task::spawn_blocking(|| app::Db::create(SEED))
            .await
            .unwrap()
            .unwrap(),
    );
    let store = ValkeyStore::builder().url(url).build().unwrap();
    let cache = CacheLayer::new(store).routes(app::cache_routes());
    let stats = cache.stats();
    let router = app::app(db.clone(), Some(cache), "valkey");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    println!(
        "soak: {secs} s against {kind:?}, {} clients, chaos every 3 s",
        drive::CLIENTS
    );

    // The chaos: kill and start again, pause and resume, flush; each followed by a
    // measurement of how long the cache took to serve hits again.
    let chaos_base = base.clone();
    let chaos = tokio::spawn(async move {
        let mut server = server;
        let mut recoveries = Vec::new();
        let end = Instant::now() + Duration::from_secs(secs.saturating_sub(3));
        let mut round = 0;
        while Instant::now() + Duration::from_secs(3) < end {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let what = match round % 3 {
                0 => {
                    server.kill();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    server = tokio::task::spawn_blocking(move || {
                        server.restart();
                        server
                    })
                    .await
                    .unwrap();
                    "killed, down 1 s, started again empty"
                }
                1 => {
                    server.pause();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    server.resume();
                    "paused (SIGSTOP) 1 s"
                }
                _ => {
                    server.command(&["FLUSHALL"]);
                    "FLUSHALL"
                }
            };
            let back_after = until_cached(&chaos_base).await;
            recoveries.push(Recovery { what, back_after });
            round += 1;
        }
        (server, recoveries)
    });
    let mut outcome = drive(base, secs).await;
    let (_server, recoveries) = chaos.await.unwrap();

    let all: Vec<Duration> = outcome.latencies.values().flatten().copied().collect();
    let worst = all.iter().max().copied().unwrap_or_default();
    println!(
        "{} requests, {} errors; {} reads checked, {} stale; slowest request {:.0} ms",
        outcome.requests,
        outcome.errors,
        outcome.checked_reads,
        outcome.stale_reads,
        worst.as_secs_f64() * 1e3
    );
    for (class, label) in [(Class::Single, "single views"), (Class::Write, "writes")] {
        let v = outcome.latencies.entry(class).or_default();
        println!(
            "  {label}: p50 {:.2} ms, p99 {:.2} ms",
            pct(v, 0.50).as_secs_f64() * 1e3,
            pct(v, 0.99).as_secs_f64() * 1e3
        );
    }
    let s = stats.snapshot();
    println!(
        "  cache: {} hits, {} misses, {} store errors, {} breaker trips, {} clears deferred",
        s.hits, s.misses, s.store_errors, s.breaker_trips, s.clears_deferred
    );
    let mut failed = Vec::new();
    for r in &recoveries {
        match r.back_after {
            Some(d) => println!(
                "  {}: hits again after {:.0} ms",
                r.what,
                d.as_secs_f64() * 1e3
            ),
            None => println!("  {}: no hit within 10 s", r.what),
        }
        if r.back_after.is_none_or(|d| d > Duration::from_secs(2)) {
            failed.push(format!("caching was not back within 2 s after: {}", r.what));
        }
    }
    if outcome.errors > 0 {
        failed.push(format!("{} client errors", outcome.errors));
    }
    if outcome.stale_reads > 0 {
        failed.push(format!("{} stale reads", outcome.stale_reads));
    }
    if worst > Duration::from_secs(1) {
        failed.push(format!("a request took {worst:?}"));
    }
    if recoveries.is_empty() || s.hits == 0 {
        failed.push("the run was too short to mean anything".into());
    }
    let verdict = if failed.is_empty() { 1 } else { 0 };
    println!("soak: {verdict} passed, {} failed", 1 - verdict);
    if !failed.is_empty() {
        for f in &failed {
            eprintln!("soak failed: {f}");
        }
        std::process::exit(1);
    }
}
