//! Scale-out: several app instances on one Valkey and on a 3-master Valkey Cluster
//! (`cargo bench --bench scaleout`).
//!
//! Starts its own servers on loopback. For each backend and store (`ValkeyStore`, and
//! `TieredStore` with its near tier):
//!
//! - **Invalidation visible everywhere.** 4 instances hold a resource as a hit; one of them
//!   sends a mutation; as soon as its response is in, every instance reads the resource in a
//!   loop until it gets the new version. Per round, the time from the mutation's response to
//!   the start of the last instance's first fresh read; p50, p99 and max over the rounds
//!   (`SCALEOUT_ROUNDS`, default 300).
//! - **Hits per second as instances are added**: 1, 2 and 4 instances in this process,
//!   32 concurrent readers spread over them, each round `SCALEOUT_SECS` (default 2) s.
//!   The instances share this machine's cores (and the servers'): read the trend, not the
//!   absolute numbers.
//!
//! Everything is bounded in count and time.

#[path = "../tests/support/server.rs"]
#[allow(dead_code)]
mod server;

#[path = "../tests/support/cluster.rs"]
#[allow(dead_code)]
mod cluster;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::Request;
use axum::routing::get;
use axum::Router;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_cache_aside::store::{MemoryStore, Store, TieredStore, ValkeyStore};
use tower_cache_aside::{CacheLayer, RoutePolicy, RouteTable};

const INSTANCES: usize = 4;
const RESOURCES: u64 = 64;

#[derive(Clone, Default)]
struct Db(Arc<Vec<AtomicU64>>);

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn app<St: Store>(store: St, db: Db) -> Router {
    let cache = CacheLayer::new(store).routes(
        RouteTable::new().route(
            "/events/{id}",
            RoutePolicy::ttl(Duration::from_secs(300))
                .tags(["event:{id}"])
                .clears(["event:{id}"]),
        ),
    );
    Router::new()
        .route(
            "/events/{id}",
            get(|State(db): State<Db>, Path(id): Path<usize>| async move {
                format!("{id}@{}", db.0[id].load(Ordering::SeqCst))
            })
            .patch(|State(db): State<Db>, Path(id): Path<usize>| async move {
                format!("{id}@{}", db.0[id].fetch_add(1, Ordering::SeqCst) + 1)
            }),
        )
        .layer(cache.invalidate_layer())
        .layer(cache)
        .with_state(db)
}

async fn call(app: &Router, method: &str, uri: &str) -> (String, bool) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::empty())
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let hit = res.headers().get("x-cache").is_some_and(|v| v == "HIT");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (String::from_utf8_lossy(&body).into_owned(), hit)
}

fn version(text: &str) -> u64 {
    text.split('@')
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn valkey(url: &str) -> ValkeyStore {
    ValkeyStore::builder()
        .url(url)
        .operation_timeout(Duration::from_millis(500))
        .build()
        .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Rounds of: every instance holds the resource as a hit, instance 0 mutates it, every
/// instance reads until fresh. Returns the per-round delays (response to the start of the
/// last instance's first fresh read) and how many first reads after the response were stale.
async fn visibility(apps: &[Router], rounds: u64) -> (Vec<Duration>, u64) {
    let mut delays = Vec::with_capacity(rounds as usize);
    let mut stale_first = 0;
    for round in 0..rounds {
        let uri = format!("/events/{}", round % RESOURCES);
        // Until every instance answers it as a hit (bounded).
        for app in apps {
            for _ in 0..200 {
                if call(app, "GET", &uri).await.1 {
                    break;
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        let (text, _) = call(&apps[0], "PATCH", &uri).await;
        let answered = Instant::now();
        let want = version(&text);
        let readers = apps.iter().map(|app| {
            let (app, uri) = (app.clone(), uri.clone());
            tokio::spawn(async move {
                let mut first = true;
                let mut stale = 0;
                let deadline = answered + Duration::from_secs(5);
                loop {
                    let began = Instant::now();
                    if version(&call(&app, "GET", &uri).await.0) >= want || began > deadline {
                        return (began - answered, stale);
                    }
                    if first {
                        stale += 1;
                    }
                    first = false;
                    tokio::task::yield_now().await;
                }
            })
        });
        let mut last = Duration::ZERO;
        for r in futures_util::future::join_all(readers).await {
            let (delay, stale) = r.unwrap();
            last = last.max(delay);
            stale_first += stale;
        }
        delays.push(last);
    }
    delays.sort();
    (delays, stale_first)
}

/// Hits per second with `apps`, 32 readers spread over them, for `secs`.
async fn hits_per_second(apps: &[Router], secs: u64) -> f64 {
    for app in apps {
        for id in 0..RESOURCES {
            call(app, "GET", &format!("/events/{id}")).await;
        }
    }
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let (app, done) = (apps[i % apps.len()].clone(), done.clone());
            tokio::spawn(async move {
                let mut n = i as u64;
                while Instant::now() < deadline {
                    call(&app, "GET", &format!("/events/{}", n % RESOURCES)).await;
                    n += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / secs as f64
}

/// One backend's rows: the visibility table's, and the hits-per-second table's.
async fn run(backend: &str, url: &str, rounds: u64, secs: u64) -> (Vec<String>, Vec<String>) {
    let (mut seen, mut rate_rows) = (Vec::new(), Vec::new());
    for tiered in [false, true] {
        let db = Db(Arc::new(
            (0..RESOURCES).map(|_| AtomicU64::new(0)).collect(),
        ));
        let make = |db: Db| -> Router {
            if tiered {
                app(
                    TieredStore::new(MemoryStore::new(16 << 20), valkey(url)),
                    db,
                )
            } else {
                app(valkey(url), db)
            }
        };
        let apps: Vec<Router> = (0..INSTANCES).map(|_| make(db.clone())).collect();
        let (delays, stale_first) = visibility(&apps, rounds).await;
        let store = if tiered { "TieredStore" } else { "ValkeyStore" };
        seen.push(format!(
            "| {backend} | {store} | {} | {} | {} | {} of {} |",
            ms(percentile(&delays, 0.5)),
            ms(percentile(&delays, 0.99)),
            ms(*delays.last().unwrap_or(&Duration::ZERO)),
            stale_first,
            rounds * INSTANCES as u64,
        ));
        let mut rates = Vec::new();
        for n in [1, 2, 4] {
            let apps: Vec<Router> = (0..n).map(|_| make(db.clone())).collect();
            rates.push(hits_per_second(&apps, secs).await);
        }
        rate_rows.push(format!(
            "| {backend} | {store} | {:.0} | {:.0} | {:.0} |",
            rates[0], rates[1], rates[2]
        ));
    }
    (seen, rate_rows)
}

fn main() {
    let rounds = env_or("SCALEOUT_ROUNDS", 300);
    let secs = env_or("SCALEOUT_SECS", 2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("== scale-out: {INSTANCES} instances, {rounds} rounds, {secs} s per rate");
    let single = server::Server::start(server::Kind::Valkey);
    let one = rt.block_on(run("one Valkey", &single.url(), rounds, secs));
    drop(single);
    let cluster = cluster::Cluster::start(server::Kind::Valkey, 3, 0);
    let three = rt.block_on(run("3-master cluster", &cluster.url(), rounds, secs));
    println!("\nInvalidation visible on every instance: from the mutation's response to the start");
    println!("of the last instance's first fresh read.\n");
    println!(
        "| backend | store | p50 | p99 | max | first reads after the response that were stale |"
    );
    println!("|---|---|---:|---:|---:|---:|");
    for row in one.0.iter().chain(&three.0) {
        println!("{row}");
    }
    println!(
        "\nHits per second, 32 readers over the instances (all in this process, one machine):\n"
    );
    println!("| backend | store | 1 instance | 2 instances | 4 instances |");
    println!("|---|---|---:|---:|---:|");
    for row in one.1.iter().chain(&three.1) {
        println!("{row}");
    }
}
