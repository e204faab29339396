//! The demo's load: clients, the request mix and the stale-read check, shared by
//! `examples/loadgen.rs` (performance) and `examples/soak.rs` (failures).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub const CLIENTS: usize = 32;
pub const HOT_EVENTS: usize = 20_000;

/// xorshift64*: a fast, seedable generator (no dependency needed).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf(s = 1.1) over 1..=n by inverse CDF.
pub struct Zipf(Vec<f64>);

impl Zipf {
    pub fn new(n: usize) -> Self {
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
    pub fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.0.partition_point(|&c| c < u) + 1
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Class {
    Dashboard,
    EventList,
    Single,
    Write,
}

#[derive(Default)]
pub struct Outcome {
    pub latencies: HashMap<Class, Vec<Duration>>,
    /// When each request of `latencies` started, from the start of the run (same order).
    pub started: HashMap<Class, Vec<Duration>>,
    pub requests: u64,
    pub errors: u64,
    pub stale_reads: u64,
    pub checked_reads: u64,
}

pub fn pct(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Drives the demo at `base` for `secs` seconds with `CLIENTS` clients: a 90/10 read/write
/// mix over Zipf-distributed ids, every read of an event checked against the versions
/// acknowledged to writers before it started.
#[allow(dead_code)] // the soak example's; the load generator counts as it goes
pub async fn drive(base: String, secs: u64) -> Outcome {
    drive_counted(base, secs, Arc::default(), 0).await
}

/// [`drive`], counting each finished request in `done` as it goes (for progress lines);
/// `seed` picks another sequence of requests (0: the usual one).
pub async fn drive_counted(base: String, secs: u64, done: Arc<AtomicU64>, seed: u64) -> Outcome {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(CLIENTS)
        .build_http();
    let acked: Arc<Vec<AtomicU64>> =
        Arc::new((0..=HOT_EVENTS).map(|_| AtomicU64::new(0)).collect());
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let events = Arc::new(Zipf::new(HOT_EVENTS));
    let small = Arc::new(Zipf::new(40));
    let users = Arc::new(Zipf::new(50));
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (client, base, acked, outcome, done) = (
            client.clone(),
            base.clone(),
            acked.clone(),
            outcome.clone(),
            done.clone(),
        );
        let (events, small, users) = (events.clone(), small.clone(), users.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((c as u64 + 1) * 0x1000_0001) ^ seed);
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
                local.started.entry(class).or_default().push(start - t0);
                local.requests += 1;
                done.fetch_add(1, Ordering::Relaxed);
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
            for (k, v) in local.started {
                o.started.entry(k).or_default().extend(v);
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
