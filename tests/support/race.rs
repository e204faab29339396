//! Readers and writers racing on several app instances over one database: every read
//! that starts after a write's response must see that write (or a later one).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{Method, Request};
use axum::routing::get as route_get;
use axum::Router;
use tower_cache_aside::store::Store;
use tower_cache_aside::{CacheLayer, CacheStats, RoutePolicy, RouteTable};

use super::{get, send};

#[derive(Clone, Default)]
pub struct Db(Arc<Mutex<HashMap<u64, u64>>>);

impl Db {
    fn version(&self, id: u64) -> u64 {
        *self.0.lock().unwrap().get(&id).unwrap_or(&0)
    }
    fn bump(&self, id: u64) -> u64 {
        let mut m = self.0.lock().unwrap();
        let v = m.entry(id).or_insert(0);
        *v += 1;
        *v
    }
}

pub fn table() -> RouteTable {
    RouteTable::new().route(
        "/events/{id}",
        RoutePolicy::ttl(Duration::from_secs(300))
            .tags(["event:{id}"])
            .clears(["event:{id}"]),
    )
}

/// An instance of the app over the shared database.
pub fn instance<St: Store>(store: St, db: Db) -> (Router, CacheStats) {
    let cache = CacheLayer::new(store)
        .routes(table())
        .circuit_breaker(5, Duration::from_millis(200));
    let stats = cache.stats();
    let app = Router::new()
        .route(
            "/events/{id}",
            route_get(|State(db): State<Db>, Path(id): Path<u64>| async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                format!("{id}@{}", db.version(id))
            })
            .patch(|State(db): State<Db>, Path(id): Path<u64>| async move {
                format!("{id}@{}", db.bump(id))
            }),
        )
        .layer(cache.invalidate_layer())
        .layer(cache)
        .with_state(db);
    (app, stats)
}

fn version_of(text: &str) -> u64 {
    text.split('@')
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

/// What a race saw.
#[derive(Debug, Default)]
pub struct Verdict {
    pub reads: u64,
    pub writes: u64,
    pub violations: u64,
    pub errors: u64,
    /// The latest a stale read started after the response of the write it missed.
    pub worst_lag: Duration,
}

/// Two writers and six readers spread over `apps` for `budget`, on 64 resources (so their
/// entries land on every master of a cluster); `during` runs meanwhile (the failure under
/// test).
pub async fn race(
    apps: &[Router],
    budget: Duration,
    during: impl std::future::Future<Output = ()>,
) -> Verdict {
    const RESOURCES: usize = 64;
    let fresh =
        || -> Arc<Vec<AtomicU64>> { Arc::new((0..RESOURCES).map(|_| AtomicU64::new(0)).collect()) };
    // Per resource: the newest acknowledged version, and when its response came (µs since
    // `start`).
    let (acked, acked_at) = (fresh(), fresh());
    let counts: Arc<[AtomicU64; 5]> = Arc::new(Default::default());
    let start = Instant::now();
    let deadline = start + budget;
    let mut tasks = Vec::new();
    for w in 0..2usize {
        let app = apps[w % apps.len()].clone();
        let (acked, acked_at, counts) = (acked.clone(), acked_at.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = w * 7;
            while Instant::now() < deadline {
                let id = i % RESOURCES;
                i += 1;
                let req = Request::builder()
                    .method(Method::PATCH)
                    .uri(format!("/events/{id}"))
                    .body(Body::empty())
                    .unwrap();
                let r = send(&app, req).await;
                if r.status != 200 {
                    counts[3].fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let v = version_of(&r.text());
                let at = start.elapsed().as_micros() as u64;
                if acked[id].fetch_max(v, Ordering::SeqCst) < v {
                    acked_at[id].fetch_max(at, Ordering::SeqCst);
                }
                counts[1].fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    for r in 0..6usize {
        let app = apps[r % apps.len()].clone();
        let (acked, acked_at, counts) = (acked.clone(), acked_at.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = r * 11;
            while Instant::now() < deadline {
                let id = i % RESOURCES;
                i += 1;
                let floor = acked[id].load(Ordering::SeqCst);
                let floor_at = acked_at[id].load(Ordering::SeqCst);
                let began = start.elapsed().as_micros() as u64;
                let res = get(&app, &format!("/events/{id}")).await;
                if res.status != 200 {
                    counts[3].fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if version_of(&res.text()) < floor {
                    counts[2].fetch_add(1, Ordering::Relaxed);
                    counts[4].fetch_max(began.saturating_sub(floor_at), Ordering::Relaxed);
                }
                counts[0].fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        }));
    }
    during.await;
    for t in tasks {
        t.await.unwrap();
    }
    Verdict {
        reads: counts[0].load(Ordering::Relaxed),
        writes: counts[1].load(Ordering::Relaxed),
        violations: counts[2].load(Ordering::Relaxed),
        errors: counts[3].load(Ordering::Relaxed),
        worst_lag: Duration::from_micros(counts[4].load(Ordering::Relaxed)),
    }
}
