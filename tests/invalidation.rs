//! Tags and invalidation against MemoryStore, Valkey and Redis: what a mutation clears, the
//! stale-set race (with and without the fence), purge, values, and clears at scale.

#[macro_use]
mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get as route_get;
use axum::Router;
use bytes::Bytes;
use support::*;
use tower_cache_aside::{
    store::{Fill, FillOutcome, Store},
    CacheLayer, EntryKey, InvalidateTags, RoutePolicy, RouteTable,
};

/// A data source with versions, and a count of the reads that reached it.
#[derive(Clone, Default)]
struct Db {
    versions: Arc<Mutex<HashMap<String, u64>>>,
    reads: Arc<AtomicUsize>,
    /// Time a read spends after it read, before it answers (widens the stale-set race).
    read_lag: Duration,
}

impl Db {
    fn version(&self, id: &str) -> u64 {
        self.reads.fetch_add(1, Ordering::SeqCst);
        *self.versions.lock().unwrap().get(id).unwrap_or(&0)
    }
    fn bump(&self, id: &str) -> u64 {
        let mut v = self.versions.lock().unwrap();
        let e = v.entry(id.to_owned()).or_insert(0);
        *e += 1;
        *e
    }
}

fn table() -> RouteTable {
    let ttl = || RoutePolicy::ttl(Duration::from_secs(300));
    RouteTable::new()
        .route("/events", ttl().tags(["events"]))
        .route(
            "/events/{id}",
            ttl().tags(["event:{id}"]).clears(["events", "event:{id}"]),
        )
        .route("/servers/{id}", ttl().tags(["servers", "server:{id}"]))
        .route(
            "/users/{id}/permissions",
            RoutePolicy::never().clears(["user:{id}"]),
        )
        .route("/users/{id}", ttl().tags(["user:{id}"]))
}

async fn read_event(State(db): State<Db>, Path(id): Path<String>) -> String {
    let v = db.version(&id);
    if !db.read_lag.is_zero() {
        tokio::time::sleep(db.read_lag).await;
    }
    format!("{id}@{v}")
}

async fn write_event(State(db): State<Db>, Path(id): Path<String>, req: Request<Body>) -> Response {
    let wanted = req
        .headers()
        .get("x-outcome")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("ok")
        .to_owned();
    match wanted.as_str() {
        "reject" => return (StatusCode::UNPROCESSABLE_ENTITY, "no").into_response(),
        "crash" => {
            db.bump(&id);
            return (StatusCode::INTERNAL_SERVER_ERROR, "partial write").into_response();
        }
        "late" => {
            // The write lands after the handler gave its answer up (a statement the
            // database finishes after the client left, a task the handler spawned).
            let db = db.clone();
            let id = id.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                db.bump(&id);
            });
            tokio::time::sleep(Duration::from_secs(5)).await;
            return "late".into_response();
        }
        "slow" => {
            // Writes, then takes its time answering (a client may give up meanwhile).
            let v = db.bump(&id);
            tokio::time::sleep(Duration::from_millis(300)).await;
            return format!("{id}@{v}").into_response();
        }
        _ => {}
    }
    let v = db.bump(&id);
    let mut res = format!("{id}@{v}").into_response();
    if wanted == "emit" {
        res.extensions_mut()
            .insert(InvalidateTags::new(["servers"]));
    }
    if wanted == "header" {
        res.headers_mut()
            .insert("cache-group-invalidation", "\"server:1\"".parse().unwrap());
    }
    res
}

fn app_with<St: Store>(cache: CacheLayer<St>, db: Db) -> Router {
    Router::new()
        .route(
            "/events",
            route_get(|State(db): State<Db>| async move { format!("list@{}", db.version("list")) })
                .post(|State(db): State<Db>| async move {
                    let v = db.bump("list");
                    (
                        StatusCode::CREATED,
                        [("location", format!("/events/{v}"))],
                        "created",
                    )
                }),
        )
        .route(
            "/events/{id}",
            route_get(read_event)
                .patch(write_event)
                .put(write_event)
                .delete(write_event),
        )
        .route("/servers/{id}", route_get(read_event))
        .route("/users/{id}", route_get(read_event))
        .route(
            "/users/{id}/permissions",
            axum::routing::put(|State(db): State<Db>, Path(id): Path<String>| async move {
                db.bump(&id);
                StatusCode::NO_CONTENT
            }),
        )
        .route(
            "/tagged",
            route_get(|| async {
                (
                    [
                        ("surrogate-key", "custom-a custom-b"),
                        ("cache-control", "max-age=60"),
                    ],
                    "tagged",
                )
            }),
        )
        .layer(cache.invalidate_layer())
        .layer(cache)
        .with_state(db)
}

async fn send_method(app: &Router, method: Method, uri: &str, outcome: &str) -> Reply {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("x-outcome", outcome)
        .body(Body::empty())
        .unwrap();
    send(app, req).await
}

mod cases {
    use super::*;

    /// Requests `paths` until each is served from the cache (bounded).
    async fn warm(app: &Router, _stats: &tower_cache_aside::CacheStats, paths: &[&str]) {
        for p in paths {
            let deadline = Instant::now() + Duration::from_secs(5);
            while get(app, p).await.x_cache() != "HIT" {
                assert!(Instant::now() < deadline, "{p} never became a hit");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    pub async fn mutation_clears_its_tags_and_nothing_else<St: Store>(store: St) {
        let cache = CacheLayer::new(store).routes(table());
        let stats = cache.stats();
        let app = app_with(cache, Db::default());
        let all = ["/events", "/events/1", "/events/2", "/servers/1"];
        warm(&app, &stats, &all).await;
        let r = send_method(&app, Method::PATCH, "/events/1", "ok").await;
        assert_eq!(r.text(), "1@1");
        assert_eq!(get(&app, "/events").await.x_cache(), "MISS");
        let e1 = get(&app, "/events/1").await;
        assert_eq!(
            (e1.x_cache(), e1.text().as_str()),
            ("MISS", "1@1"),
            "reads its own write"
        );
        assert_eq!(get(&app, "/events/2").await.x_cache(), "HIT");
        assert_eq!(get(&app, "/servers/1").await.x_cache(), "HIT");
        let s = stats.snapshot();
        assert_eq!(s.invalidations, 1);
    }

    pub async fn statuses_decide_whether_to_clear<St: Store>(store: St) {
        let cache = CacheLayer::new(store).routes(table());
        let stats = cache.stats();
        let app = app_with(cache, Db::default());
        warm(&app, &stats, &["/events/1"]).await;
        // A 4xx rejected the write: nothing to clear.
        assert_eq!(
            send_method(&app, Method::PUT, "/events/1", "reject")
                .await
                .status,
            422
        );
        assert_eq!(get(&app, "/events/1").await.x_cache(), "HIT");
        // A 5xx may follow a partial write: clear.
        assert_eq!(
            send_method(&app, Method::PUT, "/events/1", "crash")
                .await
                .status,
            500
        );
        let r = get(&app, "/events/1").await;
        assert_eq!((r.x_cache(), r.text().as_str()), ("MISS", "1@1"));
        // DELETE clears too.
        warm(&app, &stats, &["/events/1"]).await;
        send_method(&app, Method::DELETE, "/events/1", "ok").await;
        assert_eq!(get(&app, "/events/1").await.x_cache(), "MISS");
    }

    pub async fn handler_emitted_tags_and_locations_clear<St: Store>(store: St) {
        let cache = CacheLayer::new(store).routes(table());
        let stats = cache.stats();
        let app = app_with(cache, Db::default());
        warm(&app, &stats, &["/servers/1", "/servers/2"]).await;
        send_method(&app, Method::PATCH, "/events/9", "header").await;
        assert_eq!(
            get(&app, "/servers/1").await.x_cache(),
            "MISS",
            "Cache-Group-Invalidation"
        );
        assert_eq!(get(&app, "/servers/2").await.x_cache(), "HIT");
        fills_reach(&stats, 3).await;
        send_method(&app, Method::PATCH, "/events/9", "emit").await;
        assert_eq!(
            get(&app, "/servers/1").await.x_cache(),
            "MISS",
            "InvalidateTags"
        );
        assert_eq!(
            get(&app, "/servers/2").await.x_cache(),
            "MISS",
            "InvalidateTags"
        );
        // POST /events answers 201 with Location /events/1: that URI's entries go too.
        warm(&app, &stats, &["/events/1"]).await;
        let created = send(&app, Request::post("/events").body(Body::empty()).unwrap()).await;
        assert_eq!(created.headers["location"], "/events/1");
        assert_eq!(
            get(&app, "/events/1").await.x_cache(),
            "MISS",
            "Location target cleared"
        );
    }

    pub async fn permission_change_clears_a_users_entries<St: Store>(store: St) {
        let cache = CacheLayer::new(store).routes(table());
        let stats = cache.stats();
        let app = app_with(cache, Db::default());
        warm(&app, &stats, &["/users/7", "/users/8"]).await;
        let r = send(
            &app,
            Request::put("/users/7/permissions")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 204);
        assert_eq!(get(&app, "/users/7").await.x_cache(), "MISS");
        assert_eq!(get(&app, "/users/8").await.x_cache(), "HIT");
    }

    pub async fn tag_headers_handle_purge_and_values<St: Store>(store: St) {
        let cache = CacheLayer::new(store).routes(table());
        let stats = cache.stats();
        let handle = cache.handle();
        let app = app_with(cache, Db::default());
        let first = get(&app, "/tagged").await;
        assert!(
            !first.headers.contains_key("surrogate-key"),
            "cache-only header stripped"
        );
        fills_reach(&stats, 1).await;
        assert_eq!(get(&app, "/tagged").await.x_cache(), "HIT");
        let cleared = handle.invalidate(["custom-b"]).await.unwrap();
        assert!(cleared.seq > 0);
        assert_eq!(get(&app, "/tagged").await.x_cache(), "MISS");

        // Values: computed once, cached, recomputed after their tag is cleared.
        let computed = Arc::new(AtomicUsize::new(0));
        let value = |n: u64| {
            let computed = computed.clone();
            move || async move {
                computed.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(vec![n, n + 1])
            }
        };
        let ttl = Duration::from_secs(60);
        assert_eq!(
            handle
                .get_or_fill("stats:42", ttl, ["stats"], value(1))
                .await
                .unwrap(),
            vec![1, 2]
        );
        fills_reach(&stats, 3).await;
        assert_eq!(
            handle
                .get_or_fill("stats:42", ttl, ["stats"], value(5))
                .await
                .unwrap(),
            vec![1, 2]
        );
        assert_eq!(computed.load(Ordering::SeqCst), 1);
        handle.invalidate(["stats"]).await.unwrap();
        assert_eq!(
            handle
                .get_or_fill("stats:42", ttl, ["stats"], value(5))
                .await
                .unwrap(),
            vec![5, 6]
        );
        assert_eq!(computed.load(Ordering::SeqCst), 2);
        // A purge makes everything dead at once.
        warm(&app, &stats, &["/events/3", "/servers/3"]).await;
        handle.purge().await.unwrap();
        assert_eq!(get(&app, "/events/3").await.x_cache(), "MISS");
        assert_eq!(get(&app, "/servers/3").await.x_cache(), "MISS");
        let v: Vec<u64> = handle
            .get_or_fill("stats:42", ttl, ["stats"], value(9))
            .await
            .unwrap();
        assert_eq!(v, vec![9, 10]);
        // Fresh fills after the purge are served again.
        warm(&app, &stats, &["/events/3"]).await;
    }

    /// Two spellings of one resource (what `encodeURIComponent` sends, a percent-encoded
    /// digit, lower-case hex): a write spelled one way clears what was read the other way.
    pub async fn a_write_clears_every_spelling_of_its_resource<St: Store>(store: St) {
        let cache = CacheLayer::new(store).routes(table());
        let stats = cache.stats();
        let app = app_with(cache, Db::default());
        let spellings = [
            ("/events/alice@example.com", "/events/alice%40example.com"),
            ("/events/alice%40example.org", "/events/alice@example.org"),
            ("/events/1", "/events/%31"),
            ("/events/%32", "/events/2"),
            ("/events/x%7ey", "/events/x~y"),
            ("/events/a%3ab", "/events/a%3Ab"),
            ("/events/café", "/events/caf%C3%A9"),
            ("/events/na%C3%AFve", "/events/naïve"),
        ];
        for (n, (read, write)) in spellings.iter().enumerate() {
            let first = get(&app, read).await;
            fills_reach(&stats, 2 * n as u64 + 1).await;
            let hit = get(&app, read).await;
            assert_eq!(hit.x_cache(), "HIT", "{read}");
            let w = send_method(&app, Method::PATCH, write, "ok").await;
            assert_eq!(w.status.as_u16(), 200, "{write}");
            let after = get(&app, read).await;
            assert_ne!(
                after.text(),
                first.text(),
                "{read} served from before a write to {write}"
            );
        }
    }

    /// The client leaves (or an outer timeout fires) after the handler wrote and before the
    /// clear ran: the write is cleared all the same.
    pub async fn a_write_is_cleared_even_if_its_client_leaves<St: Store>(store: St) {
        let cache = CacheLayer::new(store).routes(table());
        let stats = cache.stats();
        let app = app_with(cache, Db::default());
        get(&app, "/events/5").await;
        fills_reach(&stats, 1).await;
        let before = get(&app, "/events/5").await;
        assert_eq!((before.x_cache(), before.text().as_str()), ("HIT", "5@0"));
        patch_and_leave(&app, "/events/5", "slow").await;
        read_until(&app, "/events/5", "5@1", Duration::from_secs(3)).await;
    }

    /// Sends a PATCH and gives up on it after 50 ms, as a client that leaves.
    async fn patch_and_leave(app: &Router, uri: &str, outcome: &str) {
        let req = Request::patch(uri)
            .header("x-outcome", outcome)
            .body(Body::empty())
            .unwrap();
        let gave_up = tokio::time::timeout(Duration::from_millis(50), send(app, req)).await;
        assert!(gave_up.is_err(), "the client left before the answer");
    }

    /// Reads `uri` until it answers `want`, at most `within`.
    async fn read_until(app: &Router, uri: &str, want: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let r = get(app, uri).await;
            if r.text() == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the write was never cleared: {} still reads {}",
                uri,
                r.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The client leaves, and the write lands only afterwards: a second clear a moment
    /// later catches what the first could not.
    pub async fn a_write_landing_after_its_client_left_is_cleared<St: Store>(store: St) {
        let cache = CacheLayer::new(store).routes(table());
        let stats = cache.stats();
        let app = app_with(cache, Db::default());
        get(&app, "/events/6").await;
        fills_reach(&stats, 1).await;
        patch_and_leave(&app, "/events/6", "late").await;
        // Read (and refill) between the first clear and the write.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(get(&app, "/events/6").await.text(), "6@0");
        read_until(&app, "/events/6", "6@1", Duration::from_secs(4)).await;
    }

    /// A clear costs the same whatever its tag carries: it is a record that every lookup
    /// checks, so each of ten thousand entries reads as a miss right after one clear.
    pub async fn a_tag_of_ten_thousand_entries_clears_in_one_call<St: Store>(store: St) {
        const N: usize = 10_000;
        let key = |i: usize| {
            let mut digest = [0u8; 32];
            digest[..8].copy_from_slice(&(i as u64).to_le_bytes());
            EntryKey::new("bulk", digest)
        };
        let fence = store.lookup(&key(N)).await.unwrap().fence;
        let value = Bytes::from_static(b"x");
        let start = Instant::now();
        for chunk in (0..=N).collect::<Vec<_>>().chunks(250) {
            let fills = chunk.iter().map(|&i| {
                // Entry N is the control: it does not carry the cleared tag.
                let tags = if i == N {
                    vec!["other".into()]
                } else {
                    vec!["bulk".into(), format!("one:{}", i % 7)]
                };
                let fill = Fill::new(key(i), value.clone(), Duration::from_secs(60), tags, fence);
                let store = store.clone();
                async move { store.fill(fill).await.unwrap() }
            });
            for outcome in futures_util::future::join_all(fills).await {
                assert_eq!(outcome, FillOutcome::Stored);
            }
        }
        let filled = start.elapsed();
        let start = Instant::now();
        let done = store.invalidate(&["bulk".to_owned()]).await.unwrap();
        let took = start.elapsed();
        eprintln!("cleared a tag of {N} entries in {took:?} ({N} fills took {filled:?})");
        assert!(done.seq > fence.seq());
        let mut live = 0;
        for chunk in (0..N).collect::<Vec<_>>().chunks(500) {
            let reads = chunk.iter().map(|&i| {
                let (store, key) = (store.clone(), key(i));
                async move { store.lookup(&key).await.unwrap().value.is_some() }
            });
            live += futures_util::future::join_all(reads)
                .await
                .into_iter()
                .filter(|&l| l)
                .count();
        }
        assert_eq!(live, 0, "entries of a cleared tag were served");
        let control = store.lookup(&key(N)).await.unwrap();
        assert!(control.value.is_some(), "an entry without the tag survives");
        // A fill fenced before the clear is dead; one fenced after it lives.
        let stale = Fill::new(
            key(0),
            value.clone(),
            Duration::from_secs(60),
            vec!["bulk".into()],
            fence,
        );
        let _ = store.fill(stale).await.unwrap();
        assert!(store.lookup(&key(0)).await.unwrap().value.is_none());
        let now = store.lookup(&key(0)).await.unwrap().fence;
        let fresh = Fill::new(
            key(0),
            value,
            Duration::from_secs(60),
            vec!["bulk".into()],
            now,
        );
        assert_eq!(store.fill(fresh).await.unwrap(), FillOutcome::Stored);
        assert!(store.lookup(&key(0)).await.unwrap().value.is_some());
    }

    /// Readers and writers race on a few resources; every read that starts after a write's
    /// response must see that write. Returns (reads checked, writes, violations).
    pub async fn race<St: Store>(cache: CacheLayer<St>, budget: Duration) -> (u64, u64, u64) {
        const RESOURCES: u64 = 4;
        let db = Db {
            read_lag: Duration::from_millis(2),
            ..Default::default()
        };
        let app = app_with(cache, db);
        let acked: Arc<Vec<AtomicU64>> =
            Arc::new((0..RESOURCES).map(|_| AtomicU64::new(0)).collect());
        let (reads, writes, violations) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let deadline = Instant::now() + budget;
        let mut tasks = Vec::new();
        for w in 0..2u64 {
            let (app, acked, writes) = (app.clone(), acked.clone(), writes.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = w;
                while Instant::now() < deadline {
                    let id = i % RESOURCES;
                    i += 1;
                    let r = send_method(&app, Method::PATCH, &format!("/events/{id}"), "ok").await;
                    let v: u64 = r.text().split('@').nth(1).unwrap().parse().unwrap();
                    acked[id as usize].fetch_max(v, Ordering::SeqCst);
                    writes.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
            }));
        }
        for r in 0..6u64 {
            let (app, acked, reads, violations) = (
                app.clone(),
                acked.clone(),
                reads.clone(),
                violations.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut i = r;
                while Instant::now() < deadline {
                    let id = i % RESOURCES;
                    i += 1;
                    let floor = acked[id as usize].load(Ordering::SeqCst);
                    let res = get(&app, &format!("/events/{id}")).await;
                    let v: u64 = res.text().split('@').nth(1).unwrap().parse().unwrap();
                    if v < floor {
                        violations.fetch_add(1, Ordering::Relaxed);
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                    // In-memory hits never wait: let the writers run.
                    tokio::task::yield_now().await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        (
            reads.load(Ordering::Relaxed),
            writes.load(Ordering::Relaxed),
            violations.load(Ordering::Relaxed),
        )
    }

    pub async fn no_stale_read_after_a_completed_write<St: Store>(store: St) {
        let cache = CacheLayer::new(store).routes(table());
        let stats = cache.stats();
        let (reads, writes, violations) = race(cache, Duration::from_secs(2)).await;
        let s = stats.snapshot();
        eprintln!(
            "fenced race: {reads} reads and {writes} writes checked, {violations} violations; \
             {} hits, {} collapsed, {} fills, {} fills refused by the fence",
            s.hits, s.collapsed, s.fills, s.fills_fenced
        );
        assert!(
            reads > 200 && writes > 50,
            "too little traffic to mean anything"
        );
        assert!(s.hits > 0, "the cache must actually have served hits");
        assert_eq!(violations, 0);
    }

    pub async fn without_the_fence_the_race_test_finds_stale_reads<St: Store>(store: St) {
        let cache = CacheLayer::new(support::unfenced::Unfenced(store)).routes(table());
        let (reads, writes, violations) = race(cache, Duration::from_secs(2)).await;
        eprintln!("unfenced race: {reads} reads and {writes} writes, {violations} violations");
        assert!(violations > 0, "the race test must be able to fail");
    }
}

store_suite!(
    mutation_clears_its_tags_and_nothing_else,
    statuses_decide_whether_to_clear,
    handler_emitted_tags_and_locations_clear,
    permission_change_clears_a_users_entries,
    tag_headers_handle_purge_and_values,
    a_tag_of_ten_thousand_entries_clears_in_one_call,
    a_write_is_cleared_even_if_its_client_leaves,
    a_write_clears_every_spelling_of_its_resource,
    a_write_landing_after_its_client_left_is_cleared,
    no_stale_read_after_a_completed_write,
    without_the_fence_the_race_test_finds_stale_reads,
);
