//! The seed's dashboard app (events, workflows, servers, logs, users, webhooks) on SQLite,
//! with its caching policy declared in one place: [`cache_routes`]. Shared by the `server`
//! and `loadgen` examples and by `tests/demo.rs`.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{request::Parts, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Deserialize;
use serde_json::{json, Value};
use tower_cache_aside::{
    store::Store, CacheHandle, CacheHint, CacheLayer, CacheStats, InvalidateTags, RoutePolicy,
    RouteTable, Scope, Warmer,
};

/// How much data to seed.
#[derive(Clone, Copy, Debug)]
pub struct Seed {
    pub users: i64,
    pub servers: i64,
    pub workflows: i64,
    pub events: i64,
    pub logs: i64,
    pub webhooks: i64,
}

impl Seed {
    /// Realistic volumes for the demo.
    pub const FULL: Seed = Seed {
        users: 50,
        servers: 40,
        workflows: 400,
        events: 300_000,
        logs: 300_000,
        webhooks: 30,
    };
    /// Small volumes for tests.
    pub const SMALL: Seed = Seed {
        users: 5,
        servers: 4,
        workflows: 10,
        events: 500,
        logs: 500,
        webhooks: 3,
    };
}

/// The user an auth layer established (from `Authorization: Bearer <user id>`).
#[derive(Clone, Copy, Debug)]
pub struct UserId(pub i64);

/// The database: a few SQLite connections on one file, used from blocking threads, and a
/// count of the queries run (the figure caching is meant to reduce).
pub struct Db {
    /// Users have ids 1 to `users`.
    pub users: i64,
    conns: Vec<Mutex<Connection>>,
    next: AtomicUsize,
    pub queries: AtomicU64,
    path: PathBuf,
}

impl Drop for Db {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.path.display()));
        }
    }
}

#[derive(Debug)]
pub struct DbError(String);

impl IntoResponse for DbError {
    fn into_response(self) -> Response {
        (StatusCode::INTERNAL_SERVER_ERROR, self.0).into_response()
    }
}

impl Db {
    /// Creates and seeds a fresh database file in the temp directory.
    pub fn create(seed: Seed) -> rusqlite::Result<Db> {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "tca-demo-{}-{}.db",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let mut conn = Connection::open(&path)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = OFF;
             CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL, permissions TEXT NOT NULL);
             CREATE TABLE servers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, region TEXT NOT NULL, status TEXT NOT NULL, config TEXT NOT NULL);
             CREATE TABLE workflows (id INTEGER PRIMARY KEY, name TEXT NOT NULL, server_id INTEGER NOT NULL, status TEXT NOT NULL, steps INTEGER NOT NULL);
             CREATE TABLE events (id INTEGER PRIMARY KEY, server_id INTEGER NOT NULL, workflow_id INTEGER NOT NULL, status TEXT NOT NULL, message TEXT NOT NULL, version INTEGER NOT NULL DEFAULT 1);
             CREATE INDEX events_status ON events(status, id);
             CREATE INDEX events_server ON events(server_id, id);
             CREATE TABLE logs (id INTEGER PRIMARY KEY, server_id INTEGER NOT NULL, level TEXT NOT NULL, line TEXT NOT NULL);
             CREATE INDEX logs_server ON logs(server_id, id);
             CREATE TABLE webhooks (id INTEGER PRIMARY KEY, url TEXT NOT NULL, event TEXT NOT NULL, active INTEGER NOT NULL);",
        )?;
        let tx = conn.transaction()?;
        {
            let statuses = ["ok", "warning", "error", "pending"];
            let levels = ["info", "info", "info", "warn", "error"];
            let mut st = tx.prepare("INSERT INTO users (id, name, email, permissions) VALUES (?1, ?2, ?3, '[\"read\"]')")?;
            for id in 1..=seed.users {
                st.execute(params![
                    id,
                    format!("user {id}"),
                    format!("user{id}@example.com")
                ])?;
            }
            let mut st = tx.prepare("INSERT INTO servers (id, name, region, status, config) VALUES (?1, ?2, ?3, 'up', '{}')")?;
            for id in 1..=seed.servers {
                st.execute(params![
                    id,
                    format!("srv-{id:03}"),
                    ["eu", "us", "ap"][(id % 3) as usize]
                ])?;
            }
            let mut st = tx.prepare("INSERT INTO workflows (id, name, server_id, status, steps) VALUES (?1, ?2, ?3, ?4, ?5)")?;
            for id in 1..=seed.workflows {
                st.execute(params![
                    id,
                    format!("workflow {id}"),
                    id % seed.servers + 1,
                    statuses[(id % 4) as usize],
                    id % 12 + 1
                ])?;
            }
            let mut st = tx.prepare("INSERT INTO events (id, server_id, workflow_id, status, message) VALUES (?1, ?2, ?3, ?4, ?5)")?;
            for id in 1..=seed.events {
                let server = id * 7 % seed.servers + 1;
                st.execute(params![
                    id,
                    server,
                    id % seed.workflows + 1,
                    statuses[(id * 13 % 4) as usize],
                    format!("event {id} on srv-{server:03}")
                ])?;
            }
            let mut st = tx
                .prepare("INSERT INTO logs (id, server_id, level, line) VALUES (?1, ?2, ?3, ?4)")?;
            for id in 1..=seed.logs {
                st.execute(params![
                    id,
                    id % seed.servers + 1,
                    levels[(id % 5) as usize],
                    format!("log line {id}")
                ])?;
            }
            let mut st = tx.prepare(
                "INSERT INTO webhooks (id, url, event, active) VALUES (?1, ?2, 'event.created', 1)",
            )?;
            for id in 1..=seed.webhooks {
                st.execute(params![id, format!("https://hooks.example.com/{id}")])?;
            }
        }
        tx.commit()?;
        drop(conn);
        let conns = (0..4)
            .map(|_| {
                let c = Connection::open(&path)?;
                c.busy_timeout(Duration::from_secs(5))?;
                Ok(Mutex::new(c))
            })
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(Db {
            users: seed.users,
            conns,
            next: AtomicUsize::new(0),
            queries: AtomicU64::new(0),
            path,
        })
    }

    /// Runs `f` on one of the connections in a blocking thread, counting it as one query.
    pub async fn run<T, F>(self: &Arc<Self>, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let db = self.clone();
        tokio::task::spawn_blocking(move || {
            db.queries.fetch_add(1, Ordering::Relaxed);
            let i = db.next.fetch_add(1, Ordering::Relaxed) % db.conns.len();
            let conn = db.conns[i].lock().unwrap_or_else(|e| e.into_inner());
            f(&conn)
        })
        .await
        .map_err(|e| DbError(e.to_string()))?
        .map_err(|e| DbError(e.to_string()))
    }
}

#[derive(Clone)]
pub struct AppState {
    pub db: Arc<Db>,
    pub stats: Option<CacheStats>,
    pub store_name: &'static str,
    /// The cache panel's figures beyond the counters (per route, clears, hottest keys).
    panel: Option<Arc<dyn Fn() -> Value + Send + Sync>>,
}

fn user_of(parts: &Parts) -> Option<String> {
    parts.extensions.get::<UserId>().map(|u| u.0.to_string())
}

/// The whole caching policy, in one screen: the seed's TTL table, tags and invalidations.
pub fn cache_routes() -> RouteTable {
    let ttl = |s| RoutePolicy::ttl(Duration::from_secs(s));
    // Everyone signs in, but most data is the same for everyone: `Public` scope.
    let public = |s| ttl(s).scope(Scope::Public);
    RouteTable::new()
        // Aggregates: per user, 60 s, as the seed has it. Writes do not clear them (every
        // event write would); a permission change does (`set_permissions` / `user:{id}`).
        .route(
            "/dashboard/stats",
            ttl(60).per_user(user_of).tags(["dashboard"]),
        )
        // Lists carry a tag for their filter, set by the handler (`list_events`); a write
        // clears the lists it can change, named by its handler (`update_event`...).
        .route("/events", public(300))
        .route("/events/{id}", public(300).tags(["event:{id}"]))
        .route("/workflows", public(300).tags(["workflows"]))
        .route(
            "/workflows/{id}",
            public(300)
                .tags(["workflow:{id}"])
                .clears(["workflows", "workflow:{id}"]),
        )
        .route("/servers", public(900).tags(["servers"]))
        .route(
            "/servers/{id}",
            public(900)
                .tags(["server:{id}"])
                .clears(["servers", "server:{id}", "logs:{id}"]),
        )
        .route("/servers/{id}/logs", public(120).tags(["logs:{id}"]))
        .route("/users/{id}", public(600).tags(["user:{id}"]))
        // A permission change clears everything cached for that user (dashboards carry it).
        .route(
            "/users/{id}/permissions",
            RoutePolicy::never().clears(["user:{id}"]),
        )
        .route("/webhooks", public(300).tags(["webhooks"]))
        .fallback(RoutePolicy::never())
}

/// Routes anyone may call: the page, and the operator's.
const OPEN: [&str; 4] = ["/", "/health", "/metrics", "/cache/stats"];

/// The token the admin service (`/admin/cache/...`) wants: `ADMIN_TOKEN`, or one made at
/// random when the process starts (the server prints it).
pub fn admin_token() -> &'static str {
    static TOKEN: OnceLock<String> = OnceLock::new();
    TOKEN.get_or_init(|| match std::env::var("ADMIN_TOKEN") {
        Ok(t) if !t.is_empty() => t,
        _ => {
            use std::hash::{BuildHasher, Hasher};
            let random = || std::collections::hash_map::RandomState::new().build_hasher();
            let (mut h, mut g) = (random(), random());
            h.write_u8(1);
            g.write_u8(2);
            format!("{:016x}{:016x}", h.finish(), g.finish())
        }
    })
}

/// The operators' check in front of the admin service (digests compared, so the time it
/// takes says nothing about the token).
async fn admin_only(req: Request, next: Next) -> Response {
    use sha2::{Digest, Sha256};
    let expected = Sha256::digest(format!("Bearer {}", admin_token()));
    let given = (req.headers().get("authorization")).map(|v| Sha256::digest(v.as_bytes()));
    if given == Some(expected) {
        next.run(req).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Bearer")],
            "the admin service wants Authorization: Bearer <ADMIN_TOKEN>",
        )
            .into_response()
    }
}

/// The process's Prometheus recorder: installed once, before the first count, so that the
/// crate's `metrics` (`tower_cache_aside_*`) and the demo's own reach `/metrics`.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let seconds = [
            0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
            0.25, 0.5, 1.0,
        ];
        let builder = PrometheusBuilder::new()
            .set_buckets(&seconds)
            .expect("buckets are given");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder installed first (a test's): this one renders only what it sees.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// The warmer the demo warms with: requests as user 1 (every route wants a known user; the
/// public ones are shared by all), and a user's dashboard as that user.
pub fn warmer<St: Store>(handle: &CacheHandle<St>, router: Router) -> Warmer<Router, St> {
    let bearer = |user: &str| axum::http::HeaderValue::from_str(&format!("Bearer {user}")).ok();
    handle
        .warmer(router)
        .concurrency(4)
        .header(
            axum::http::header::AUTHORIZATION,
            bearer("1").expect("valid"),
        )
        .per_user(move |user| {
            let mut h = axum::http::HeaderMap::new();
            h.insert(axum::http::header::AUTHORIZATION, bearer(user)?);
            Some(h)
        })
}

/// What the demo warms at start: the most active users' dashboards, the first pages of the
/// event lists, the workflows and every server.
pub fn warm_list(seed: &Seed) -> Vec<tower_cache_aside::warm::WarmRequest> {
    let mut list: Vec<tower_cache_aside::warm::WarmRequest> = Vec::new();
    for user in 1..=seed.users.min(10) {
        let req = axum::http::Request::get("/dashboard/stats")
            .header("authorization", format!("Bearer {user}"))
            .body(())
            .expect("a valid request");
        list.push(req.into());
    }
    for page in 1..=3 {
        list.push(format!("/events?page={page}").into());
    }
    for status in ["error", "warning", "pending"] {
        list.push(format!("/events?status={status}").into());
    }
    for fixed in ["/workflows", "/servers", "/webhooks"] {
        list.push(fixed.into());
    }
    for id in 1..=seed.servers {
        list.push(format!("/servers/{id}").into());
    }
    list
}

/// The authentication layer. It sits outside the cache, so it runs before every request,
/// hits included: a request without a known user (`Authorization: Bearer <user id>`) gets a
/// 401 and never reaches the cache. Put inside, a hit would skip it, and a `Public` route
/// would answer anyone.
async fn auth(State(users): State<i64>, mut req: Request, next: Next) -> Response {
    let user = bearer_user(req.headers(), users);
    match user {
        Some(id) => {
            req.extensions_mut().insert(UserId(id));
        }
        None if OPEN.contains(&req.uri().path()) => {}
        None => {
            return (
                StatusCode::UNAUTHORIZED,
                [("www-authenticate", "Bearer")],
                "send Authorization: Bearer <user id> of a known user",
            )
                .into_response()
        }
    }
    next.run(req).await
}

/// The known user `Authorization: Bearer <user id>` names.
fn bearer_user(headers: &axum::http::HeaderMap, users: i64) -> Option<i64> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|id| id.trim().parse::<i64>().ok())
        .filter(|id| (1..=users).contains(id))
}

/// The app; with `cache` it is behind the cache and invalidation layers.
pub fn app<St: Store>(
    db: Arc<Db>,
    cache: Option<CacheLayer<St>>,
    store_name: &'static str,
) -> Router {
    let _ = prometheus();
    let panel = cache.as_ref().map(|c| {
        let (handle, store) = (c.handle(), c.store().clone());
        Arc::new(move || {
            let mut v = panel(&handle);
            // The in-memory store can say how much it holds (Valkey's keyspace is shared).
            let memory = (&store as &dyn std::any::Any)
                .downcast_ref::<tower_cache_aside::store::MemoryStore>();
            if let (Some(m), Some(fields)) = (memory, v.as_object_mut()) {
                fields.insert("entries".into(), json!(m.entry_count()));
                fields.insert("entry_bytes".into(), json!(m.weighted_size()));
            }
            v
        }) as Arc<dyn Fn() -> Value + Send + Sync>
    });
    let state = AppState {
        db,
        stats: cache.as_ref().map(|c| c.stats()),
        store_name,
        panel,
    };
    let routes = Router::new()
        .route("/", get(page))
        .route("/dashboard/stats", get(dashboard))
        .route("/events", get(list_events).post(create_event))
        .route(
            "/events/{id}",
            get(get_event)
                .put(update_event)
                .patch(update_event)
                .delete(delete_event),
        )
        .route("/workflows", get(list_workflows).post(create_workflow))
        .route("/workflows/{id}", get(get_workflow).put(update_workflow))
        .route("/servers", get(list_servers))
        .route("/servers/{id}", get(get_server).put(update_server))
        .route("/servers/{id}/logs", get(server_logs))
        .route("/users/{id}", get(get_user))
        .route("/users/{id}/permissions", put(set_permissions))
        .route("/webhooks", get(list_webhooks))
        .route("/cache/stats", get(cache_stats))
        .route("/health", get(health))
        .route("/metrics", get(metrics));
    let cache = cache.map(|c| c.mark_every_response(true));
    let routes = match &cache {
        // Every response says what the cache did, uncached routes and writes included.
        Some(cache) => routes.layer(cache.invalidate_layer()).layer(cache.clone()),
        None => routes,
    };
    let users = state.db.users;
    let app = routes
        .layer(middleware::from_fn_with_state(users, auth))
        .with_state(state);
    let Some(cache) = cache else { return app };
    // The admin service, behind its own token, with a warmer over the app.
    let admin = cache
        .admin_service()
        .warmer(warmer(&cache.handle(), app.clone()))
        // `inspect` as the auth layer would see it: the user a token names.
        .prepare(move |parts| {
            if let Some(user) = bearer_user(&parts.headers, users) {
                parts.extensions.insert(UserId(user));
            }
        });
    let admin = Router::new()
        .nest_service("/admin/cache", admin)
        .route_layer(middleware::from_fn(admin_only));
    app.merge(admin)
}

/// The page: the app's data and a live cache panel (`examples/demo/index.html`).
async fn page() -> Html<&'static str> {
    Html(include_str!("index.html"))
}

/// The panel's figures: per route, the latest clears, the hottest keys.
fn panel<St: Store>(handle: &CacheHandle<St>) -> Value {
    let stats = handle.stats();
    let routes: Vec<Value> = stats
        .routes()
        .iter()
        .map(|r| {
            json!({
                "route": r.route, "pattern": r.pattern, "hits": r.hits, "misses": r.misses,
                "stale_hits": r.stale_hits, "collapsed": r.collapsed, "bypasses": r.bypasses,
                "fills": r.fills, "bytes_served": r.bytes_served, "hit_rate": r.hit_rate(),
                "origin_time_saved_ms": r.origin_time_saved.as_millis() as u64,
            })
        })
        .collect();
    let clears: Vec<Value> = handle
        .recent_clears()
        .iter()
        .rev()
        .map(|c| {
            let at =
                c.at.duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
            json!({"at_ms": at.as_millis() as u64, "tags": c.tags, "purge": c.purge})
        })
        .collect();
    let hot: Vec<Value> = handle
        .hot_keys(10)
        .iter()
        // No user ids: this endpoint is open (the admin service's stats have them).
        .map(|k| json!({"target": k.target, "host": k.host, "requests": k.requests}))
        .collect();
    json!({"routes": routes, "recent_clears": clears, "hot": hot})
}

fn event_json(r: &rusqlite::Row<'_>) -> rusqlite::Result<Value> {
    Ok(
        json!({"id": r.get::<_, i64>(0)?, "server_id": r.get::<_, i64>(1)?, "workflow_id": r.get::<_, i64>(2)?,
              "status": r.get::<_, String>(3)?, "message": r.get::<_, String>(4)?, "version": r.get::<_, i64>(5)?}),
    )
}

const EVENT_COLS: &str = "id, server_id, workflow_id, status, message, version";

fn found(v: Option<Value>) -> Response {
    match v {
        Some(v) => Json(v).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn dashboard(State(s): State<AppState>, parts: Parts) -> Result<Response, DbError> {
    let Some(UserId(user)) = parts.extensions.get::<UserId>().copied() else {
        return Ok((
            StatusCode::UNAUTHORIZED,
            "send Authorization: Bearer <user id>",
        )
            .into_response());
    };
    let stats = s
        .db
        .run(move |c| {
            let name: Option<String> = c.query_row("SELECT name FROM users WHERE id = ?1", [user], |r| r.get(0)).optional()?;
            let mut by_status = serde_json::Map::new();
            let mut st = c.prepare("SELECT status, COUNT(*) FROM events GROUP BY status")?;
            for row in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
                let (k, v) = row?;
                by_status.insert(k, v.into());
            }
            let mut st = c.prepare("SELECT server_id, COUNT(*) AS n FROM events WHERE status = 'error' GROUP BY server_id ORDER BY n DESC LIMIT 5")?;
            let noisy: Vec<Value> = st
                .query_map([], |r| Ok(json!({"server_id": r.get::<_, i64>(0)?, "errors": r.get::<_, i64>(1)?})))?
                .collect::<rusqlite::Result<_>>()?;
            let workflows: i64 = c.query_row("SELECT COUNT(*) FROM workflows WHERE status != 'ok'", [], |r| r.get(0))?;
            Ok(json!({"user": {"id": user, "name": name}, "events_by_status": by_status, "noisiest_servers": noisy, "workflows_needing_attention": workflows}))
        })
        .await?;
    let mut res = ([("cache-control", "private")], Json(stats)).into_response();
    // Tagged with its user, so a permission change for that user clears it.
    res.extensions_mut()
        .insert(CacheHint::default().tag(format!("user:{user}")));
    Ok(res)
}

#[derive(Deserialize)]
struct EventFilter {
    status: Option<String>,
    server: Option<i64>,
    page: Option<i64>,
}

/// The tag of an event list: its most specific filter.
fn list_tag(status: Option<&str>, server: Option<i64>) -> String {
    match (server, status) {
        (Some(s), _) => format!("events:server:{s}"),
        (None, Some(st)) => format!("events:status:{st}"),
        (None, None) => "events:all".to_owned(),
    }
}

/// The lists an event's change can alter: its server's, its old and new status', and the
/// unfiltered one.
fn lists_touched(server: i64, statuses: &[&str]) -> Vec<String> {
    let mut tags = vec![list_tag(None, Some(server)), list_tag(None, None)];
    tags.extend(statuses.iter().map(|st| list_tag(Some(st), None)));
    tags
}

async fn list_events(
    State(s): State<AppState>,
    Query(f): Query<EventFilter>,
) -> Result<Response, DbError> {
    let page = f.page.unwrap_or(1).max(1);
    let tag = list_tag(f.status.as_deref(), f.server);
    let rows = s
        .db
        .run(move |c| {
            let sql = format!(
                "SELECT {EVENT_COLS} FROM events WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR server_id = ?2) ORDER BY id DESC LIMIT 50 OFFSET ?3"
            );
            let mut st = c.prepare_cached(&sql)?;
            let rows = st.query_map(params![f.status, f.server, (page - 1) * 50], event_json)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })
        .await?;
    let mut res = Json(json!({"page": page, "events": rows})).into_response();
    res.extensions_mut().insert(CacheHint::default().tag(tag));
    Ok(res)
}

async fn get_event(State(s): State<AppState>, Path(id): Path<i64>) -> Result<Response, DbError> {
    let v =
        s.db.run(move |c| {
            c.query_row(
                &format!("SELECT {EVENT_COLS} FROM events WHERE id = ?1"),
                [id],
                event_json,
            )
            .optional()
        })
        .await?;
    Ok(found(v))
}

#[derive(Deserialize)]
struct NewEvent {
    server_id: i64,
    workflow_id: Option<i64>,
    status: Option<String>,
    message: String,
}

async fn create_event(
    State(s): State<AppState>,
    Json(e): Json<NewEvent>,
) -> Result<Response, DbError> {
    let v = s
        .db
        .run(move |c| {
            c.execute(
                "INSERT INTO events (server_id, workflow_id, status, message) VALUES (?1, ?2, ?3, ?4)",
                params![e.server_id, e.workflow_id.unwrap_or(1), e.status.unwrap_or_else(|| "pending".into()), e.message],
            )?;
            let id = c.last_insert_rowid();
            c.query_row(&format!("SELECT {EVENT_COLS} FROM events WHERE id = ?1"), [id], event_json)
        })
        .await?;
    let location = format!("/events/{}", v["id"]);
    let touched = lists_touched(
        v["server_id"].as_i64().unwrap_or(0),
        &[v["status"].as_str().unwrap_or("")],
    );
    let mut res = (StatusCode::CREATED, [("location", location)], Json(v)).into_response();
    res.extensions_mut().insert(InvalidateTags::new(touched));
    Ok(res)
}

#[derive(Deserialize)]
struct EventChange {
    status: Option<String>,
    message: Option<String>,
}

async fn update_event(
    State(s): State<AppState>,
    Path(id): Path<i64>,
    Json(ch): Json<EventChange>,
) -> Result<Response, DbError> {
    let v = s
        .db
        .run(move |c| {
            let old: Option<String> = c
                .query_row("SELECT status FROM events WHERE id = ?1", [id], |r| r.get(0))
                .optional()?;
            let n = c.execute(
                "UPDATE events SET status = COALESCE(?2, status), message = COALESCE(?3, message), version = version + 1 WHERE id = ?1",
                params![id, ch.status, ch.message],
            )?;
            if n == 0 {
                return Ok(None);
            }
            let new = c.query_row(&format!("SELECT {EVENT_COLS} FROM events WHERE id = ?1"), [id], event_json)?;
            Ok(Some((new, old.unwrap_or_default())))
        })
        .await?;
    let Some((new, old)) = v else {
        return Ok(StatusCode::NOT_FOUND.into_response());
    };
    let status = new["status"].as_str().unwrap_or("").to_owned();
    let touched = lists_touched(new["server_id"].as_i64().unwrap_or(0), &[&old, &status]);
    let mut res = Json(new).into_response();
    res.extensions_mut().insert(InvalidateTags::new(touched));
    Ok(res)
}

async fn delete_event(State(s): State<AppState>, Path(id): Path<i64>) -> Result<Response, DbError> {
    let gone =
        s.db.run(move |c| {
            let row = c
                .query_row(
                    "SELECT server_id, status FROM events WHERE id = ?1",
                    [id],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
                )
                .optional()?;
            c.execute("DELETE FROM events WHERE id = ?1", [id])?;
            Ok(row)
        })
        .await?;
    let Some((server, status)) = gone else {
        return Ok(StatusCode::NOT_FOUND.into_response());
    };
    let mut res = StatusCode::NO_CONTENT.into_response();
    res.extensions_mut()
        .insert(InvalidateTags::new(lists_touched(server, &[&status])));
    Ok(res)
}

fn workflow_json(r: &rusqlite::Row<'_>) -> rusqlite::Result<Value> {
    Ok(
        json!({"id": r.get::<_, i64>(0)?, "name": r.get::<_, String>(1)?, "server_id": r.get::<_, i64>(2)?,
              "status": r.get::<_, String>(3)?, "steps": r.get::<_, i64>(4)?}),
    )
}

async fn list_workflows(State(s): State<AppState>) -> Result<Json<Value>, DbError> {
    let rows =
        s.db.run(|c| {
            let mut st = c.prepare_cached(
                "SELECT id, name, server_id, status, steps FROM workflows ORDER BY id",
            )?;
            let rows = st.query_map([], workflow_json)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })
        .await?;
    Ok(Json(json!({"workflows": rows})))
}

async fn get_workflow(State(s): State<AppState>, Path(id): Path<i64>) -> Result<Response, DbError> {
    let v =
        s.db.run(move |c| {
            c.query_row(
                "SELECT id, name, server_id, status, steps FROM workflows WHERE id = ?1",
                [id],
                workflow_json,
            )
            .optional()
        })
        .await?;
    Ok(found(v))
}

#[derive(Deserialize)]
struct WorkflowChange {
    name: Option<String>,
    status: Option<String>,
    server_id: Option<i64>,
    steps: Option<i64>,
}

async fn create_workflow(
    State(s): State<AppState>,
    Json(w): Json<WorkflowChange>,
) -> Result<Response, DbError> {
    let v =
        s.db.run(move |c| {
            c.execute(
                "INSERT INTO workflows (name, server_id, status, steps) VALUES (?1, ?2, ?3, ?4)",
                params![
                    w.name.unwrap_or_else(|| "new workflow".into()),
                    w.server_id.unwrap_or(1),
                    w.status.unwrap_or_else(|| "pending".into()),
                    w.steps.unwrap_or(1)
                ],
            )?;
            let id = c.last_insert_rowid();
            c.query_row(
                "SELECT id, name, server_id, status, steps FROM workflows WHERE id = ?1",
                [id],
                workflow_json,
            )
        })
        .await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn update_workflow(
    State(s): State<AppState>,
    Path(id): Path<i64>,
    Json(w): Json<WorkflowChange>,
) -> Result<Response, DbError> {
    let v = s
        .db
        .run(move |c| {
            let n = c.execute(
                "UPDATE workflows SET name = COALESCE(?2, name), status = COALESCE(?3, status), server_id = COALESCE(?4, server_id), steps = COALESCE(?5, steps) WHERE id = ?1",
                params![id, w.name, w.status, w.server_id, w.steps],
            )?;
            if n == 0 {
                return Ok(None);
            }
            c.query_row("SELECT id, name, server_id, status, steps FROM workflows WHERE id = ?1", [id], workflow_json).optional()
        })
        .await?;
    Ok(found(v))
}

fn server_json(r: &rusqlite::Row<'_>) -> rusqlite::Result<Value> {
    let config: String = r.get(4)?;
    Ok(
        json!({"id": r.get::<_, i64>(0)?, "name": r.get::<_, String>(1)?, "region": r.get::<_, String>(2)?,
              "status": r.get::<_, String>(3)?, "config": serde_json::from_str::<Value>(&config).unwrap_or(Value::Null)}),
    )
}

async fn list_servers(State(s): State<AppState>) -> Result<Json<Value>, DbError> {
    let rows =
        s.db.run(|c| {
            let mut st = c.prepare_cached(
                "SELECT id, name, region, status, config FROM servers ORDER BY id",
            )?;
            let rows = st.query_map([], server_json)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })
        .await?;
    Ok(Json(json!({"servers": rows})))
}

async fn get_server(State(s): State<AppState>, Path(id): Path<i64>) -> Result<Response, DbError> {
    let v =
        s.db.run(move |c| {
            c.query_row(
                "SELECT id, name, region, status, config FROM servers WHERE id = ?1",
                [id],
                server_json,
            )
            .optional()
        })
        .await?;
    Ok(found(v))
}

#[derive(Deserialize)]
struct ServerChange {
    status: Option<String>,
    config: Option<Value>,
}

async fn update_server(
    State(s): State<AppState>,
    Path(id): Path<i64>,
    Json(ch): Json<ServerChange>,
) -> Result<Response, DbError> {
    let v = s
        .db
        .run(move |c| {
            let config = ch.config.map(|c| c.to_string());
            let n = c.execute(
                "UPDATE servers SET status = COALESCE(?2, status), config = COALESCE(?3, config) WHERE id = ?1",
                params![id, ch.status, config],
            )?;
            if n == 0 {
                return Ok(None);
            }
            c.query_row("SELECT id, name, region, status, config FROM servers WHERE id = ?1", [id], server_json).optional()
        })
        .await?;
    Ok(found(v))
}

async fn server_logs(State(s): State<AppState>, Path(id): Path<i64>) -> Result<Response, DbError> {
    let v = s
        .db
        .run(move |c| {
            let exists: Option<i64> = c.query_row("SELECT id FROM servers WHERE id = ?1", [id], |r| r.get(0)).optional()?;
            if exists.is_none() {
                return Ok(None);
            }
            let mut st = c.prepare_cached("SELECT id, level, line FROM logs WHERE server_id = ?1 ORDER BY id DESC LIMIT 100")?;
            let rows = st
                .query_map([id], |r| Ok(json!({"id": r.get::<_, i64>(0)?, "level": r.get::<_, String>(1)?, "line": r.get::<_, String>(2)?})))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Some(json!({"server_id": id, "logs": rows})))
        })
        .await?;
    Ok(found(v))
}

async fn get_user(State(s): State<AppState>, Path(id): Path<i64>) -> Result<Response, DbError> {
    let v = s
        .db
        .run(move |c| {
            c.query_row("SELECT id, name, email, permissions FROM users WHERE id = ?1", [id], |r| {
                let perms: String = r.get(3)?;
                Ok(json!({"id": r.get::<_, i64>(0)?, "name": r.get::<_, String>(1)?, "email": r.get::<_, String>(2)?,
                          "permissions": serde_json::from_str::<Value>(&perms).unwrap_or(Value::Null)}))
            })
            .optional()
        })
        .await?;
    Ok(found(v))
}

#[derive(Deserialize)]
struct Permissions {
    permissions: Vec<String>,
}

async fn set_permissions(
    State(s): State<AppState>,
    Path(id): Path<i64>,
    Json(p): Json<Permissions>,
) -> Result<Response, DbError> {
    let perms = serde_json::to_string(&p.permissions).unwrap_or_else(|_| "[]".into());
    let v =
        s.db.run(move |c| {
            let n = c.execute(
                "UPDATE users SET permissions = ?2 WHERE id = ?1",
                params![id, perms],
            )?;
            Ok(n)
        })
        .await?;
    Ok(if v == 0 {
        StatusCode::NOT_FOUND.into_response()
    } else {
        Json(json!({"id": id, "permissions": p.permissions})).into_response()
    })
}

async fn list_webhooks(State(s): State<AppState>) -> Result<Json<Value>, DbError> {
    let rows = s
        .db
        .run(|c| {
            let mut st = c.prepare_cached("SELECT id, url, event, active FROM webhooks ORDER BY id")?;
            let rows = st.query_map([], |r| {
                Ok(json!({"id": r.get::<_, i64>(0)?, "url": r.get::<_, String>(1)?, "event": r.get::<_, String>(2)?, "active": r.get::<_, i64>(3)? == 1}))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })
        .await?;
    Ok(Json(json!({"webhooks": rows})))
}

async fn cache_stats(State(s): State<AppState>) -> Json<Value> {
    let queries = s.db.queries.load(Ordering::Relaxed);
    let Some(stats) = &s.stats else {
        return Json(json!({"cache": "off", "store": "off", "db_queries": queries}));
    };
    let st = stats.snapshot();
    let mut out = json!({
        "store": s.store_name, "hits": st.hits, "misses": st.misses, "stale_hits": st.stale_hits,
        "collapsed": st.collapsed, "bypasses": st.bypasses, "fills": st.fills, "fills_fenced": st.fills_fenced,
        "invalidations": st.invalidations,
        "store_errors": st.store_errors, "breaker_open": st.breaker_open, "hit_rate": st.hit_rate(),
        "db_queries": queries,
    });
    if let (Some(panel), Some(fields)) = (&s.panel, out.as_object_mut()) {
        if let Value::Object(more) = panel() {
            fields.extend(more);
        }
    }
    Json(out)
}

async fn health(State(s): State<AppState>) -> Json<Value> {
    let breaker_open = s
        .stats
        .as_ref()
        .is_some_and(|st| st.snapshot().breaker_open);
    Json(json!({"status": "ok", "store": s.store_name, "breaker_open": breaker_open}))
}

/// Prometheus text: the crate's figures through its `metrics` feature (per route, with
/// latency histograms), and the demo's database queries.
async fn metrics(State(s): State<AppState>) -> Response {
    metrics::counter!("demo_db_queries_total").absolute(s.db.queries.load(Ordering::Relaxed));
    let text = prometheus().render();
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}
