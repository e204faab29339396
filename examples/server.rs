//! Run with: `cargo run --release --example server`
//!
//! A small events dashboard behind `CacheLayer`. Its "database" answers after a simulated
//! 25 ms query (200 ms for the dashboard's aggregation), so hits are easy to tell apart from
//! misses. It uses Valkey when `VALKEY_URL` or `REDIS_URL` is set and the in-memory store
//! otherwise, and listens on `127.0.0.1:3000` (`ADDR` overrides). Try:
//!
//! ```sh
//! curl -si localhost:3000/events/1 | grep -iE 'x-cache|cache-status|age'   # MISS
//! curl -si localhost:3000/events/1 | grep -iE 'x-cache|cache-status|age'   # HIT
//! curl -s  localhost:3000/dashboard/stats -H 'Authorization: Bearer 1'      # per user
//! curl -s  -X PATCH localhost:3000/events/1 -H 'content-type: application/json' -d '{"status":"error"}'
//! curl -si localhost:3000/events/1 | grep -iE 'x-cache|status'             # MISS, new status
//! curl -s  localhost:3000/cache/stats
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{request::Parts, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower_cache_aside::{
    CacheLayer, CacheStats, MemoryStore, RoutePolicy, RouteTable, Store, ValkeyStore,
};

#[derive(Clone, Serialize)]
struct Event {
    id: u64,
    server: u64,
    status: String,
    message: String,
}

struct Db {
    events: std::sync::RwLock<Vec<Event>>,
}

impl Db {
    fn seed() -> Self {
        let statuses = ["ok", "warning", "error"];
        let events = (1..=5_000)
            .map(|id| Event {
                id,
                server: id % 40 + 1,
                status: statuses[(id % 3) as usize].to_owned(),
                message: format!("event {id} on server {}", id % 40 + 1),
            })
            .collect();
        Db {
            events: std::sync::RwLock::new(events),
        }
    }

    async fn query<T>(&self, cost: Duration, f: impl FnOnce(&[Event]) -> T) -> T {
        tokio::time::sleep(cost).await; // the round trip and work of a real query
        f(&self.events.read().unwrap())
    }

    async fn update<T>(&self, f: impl FnOnce(&mut Vec<Event>) -> T) -> T {
        tokio::time::sleep(Duration::from_millis(5)).await;
        f(&mut self.events.write().unwrap())
    }
}

#[derive(Clone)]
struct AppState {
    db: Arc<Db>,
    stats: CacheStats,
}

/// The user an auth layer would have established: here, whoever `Bearer <id>` names.
fn user_id(parts: &Parts) -> Option<String> {
    let v = parts.headers.get("authorization")?.to_str().ok()?;
    let id = v.strip_prefix("Bearer ")?;
    id.parse::<u64>().ok().map(|id| id.to_string())
}

/// The whole caching policy, in one place (the seed's TTL table).
fn cache_routes() -> RouteTable {
    let secs = |s| RoutePolicy::ttl(Duration::from_secs(s));
    RouteTable::new()
        .route(
            "/dashboard/stats",
            secs(60).per_user(user_id).tags(["dashboard"]),
        )
        .route("/events", secs(300).tags(["events"]))
        // A write to one event clears its page, the lists and the dashboards.
        .route(
            "/events/{id}",
            secs(300)
                .tags(["event:{id}"])
                .clears(["events", "event:{id}", "dashboard"]),
        )
        .route("/cache/stats", RoutePolicy::never())
        .fallback(RoutePolicy::never())
}

#[derive(Deserialize)]
struct EventFilter {
    status: Option<String>,
    server: Option<u64>,
    page: Option<usize>,
}

async fn list_events(State(s): State<AppState>, Query(f): Query<EventFilter>) -> Json<Vec<Event>> {
    let page = f.page.unwrap_or(1).max(1);
    let events =
        s.db.query(Duration::from_millis(25), |db| {
            db.iter()
                .filter(|e| f.status.as_deref().is_none_or(|st| e.status == st))
                .filter(|e| f.server.is_none_or(|sv| e.server == sv))
                .skip((page - 1) * 50)
                .take(50)
                .cloned()
                .collect()
        })
        .await;
    Json(events)
}

async fn get_event(State(s): State<AppState>, Path(id): Path<u64>) -> Response {
    let found =
        s.db.query(Duration::from_millis(25), |db| {
            db.iter().find(|e| e.id == id).cloned()
        })
        .await;
    match found {
        Some(e) => Json(e).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

#[derive(Deserialize)]
struct StatusChange {
    status: String,
}

async fn patch_event(
    State(s): State<AppState>,
    Path(id): Path<u64>,
    Json(change): Json<StatusChange>,
) -> Response {
    let updated =
        s.db.update(|events| {
            let e = events.iter_mut().find(|e| e.id == id)?;
            e.status = change.status;
            Some(e.clone())
        })
        .await;
    match updated {
        Some(e) => Json(e).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn delete_event(State(s): State<AppState>, Path(id): Path<u64>) -> StatusCode {
    let removed =
        s.db.update(|events| {
            let before = events.len();
            events.retain(|e| e.id != id);
            before != events.len()
        })
        .await;
    if removed {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    }
}

async fn dashboard(State(s): State<AppState>, parts: Parts) -> Response {
    let Some(user) = user_id(&parts) else {
        return (
            StatusCode::UNAUTHORIZED,
            "send Authorization: Bearer <user id>",
        )
            .into_response();
    };
    let counts = s
        .db
        .query(Duration::from_millis(200), |db| {
            let by = |st: &str| db.iter().filter(|e| e.status == st).count();
            serde_json::json!({ "user": user, "ok": by("ok"), "warning": by("warning"), "error": by("error") })
        })
        .await;
    ([("cache-control", "private")], Json(counts)).into_response()
}

async fn cache_stats(State(s): State<AppState>) -> Json<serde_json::Value> {
    let st = s.stats.snapshot();
    Json(serde_json::json!({
        "hits": st.hits, "misses": st.misses, "bypasses": st.bypasses, "fills": st.fills,
        "invalidations": st.invalidations, "invalidated_entries": st.invalidated_entries,
        "store_errors": st.store_errors, "breaker_open": st.breaker_open, "hit_rate": st.hit_rate(),
    }))
}

fn app<St: Store>(store: St) -> Router {
    let cache = CacheLayer::new(store)
        .routes(cache_routes())
        .ignore_query_params(["utm_*"]);
    let state = AppState {
        db: Arc::new(Db::seed()),
        stats: cache.stats(),
    };
    Router::new()
        .route("/events", get(list_events))
        .route(
            "/events/{id}",
            get(get_event).patch(patch_event).delete(delete_event),
        )
        .route("/dashboard/stats", get(dashboard))
        .route("/cache/stats", get(cache_stats))
        .layer(cache.invalidate_layer())
        .layer(cache)
        .with_state(state)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::var("ADDR")
        .unwrap_or_else(|_| "127.0.0.1:3000".into())
        .parse()?;
    let configured = ["VALKEY_URL", "REDIS_URL"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|u| !u.is_empty()));
    let router = if configured {
        let store = ValkeyStore::from_env()?;
        match store.ping().await {
            Ok(rtt) => println!("store: Valkey at {} (PING {rtt:?})", store.url()),
            Err(e) => println!(
                "store: Valkey at {} is not answering ({e}); serving uncached until it does",
                store.url()
            ),
        }
        app(store)
    } else {
        println!("store: in-memory (64 MiB); set VALKEY_URL to use Valkey");
        app(MemoryStore::new(64 << 20))
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on http://{addr}");
    axum::serve(listener, router).await?;
    Ok(())
}
