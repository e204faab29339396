//! With the `metrics` feature, counters reach the `metrics` facade.
#![cfg(feature = "metrics")]

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{
    Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use support::*;
use tower_cache_aside::{store::MemoryStore, CacheLayer};

#[derive(Default)]
struct Counts(Mutex<HashMap<String, Arc<AtomicU64>>>);

struct Handle(Arc<AtomicU64>);

impl CounterFn for Handle {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::SeqCst);
    }
}

struct Capture(Arc<Counts>);

impl Recorder for Capture {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut map = self.0 .0.lock().unwrap();
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = match labels.is_empty() {
            true => key.name().to_owned(),
            false => format!("{}{{{}}}", key.name(), labels.join(",")),
        };
        let slot = map.entry(name).or_default().clone();
        Counter::from_arc(Arc::new(Handle(slot)))
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_reach_the_metrics_facade() {
    let counts = Arc::new(Counts::default());
    metrics::set_global_recorder(Capture(counts.clone())).unwrap();
    let cache = CacheLayer::new(MemoryStore::new(1 << 20)).routes(routes());
    let stats = cache.stats();
    let (app, _) = app(cache);
    get(&app, "/items/1").await;
    fills_reach(&stats, 1).await;
    get(&app, "/items/1").await;
    let read = |name: &str| {
        counts
            .0
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |c| c.load(Ordering::SeqCst))
    };
    // Per route: the route's id is the `route` label.
    assert_eq!(read("tower_cache_aside_hits_total{route=items_id}"), 1);
    assert_eq!(read("tower_cache_aside_misses_total{route=items_id}"), 1);
    assert_eq!(read("tower_cache_aside_fills_total{route=items_id}"), 1);
    assert_eq!(
        read("tower_cache_aside_bytes_served_total{route=items_id}"),
        "item 1".len() as u64
    );
    // Counted once: no unlabelled series beside the labelled ones.
    assert_eq!(read("tower_cache_aside_hits_total"), 0);
    get_with(&app, "/items/1", &[("authorization", "Bearer 1")]).await;
    assert_eq!(read("tower_cache_aside_bypasses_total{route=items_id}"), 1);
}
