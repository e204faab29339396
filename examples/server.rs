//! Run with: `cargo run --release --example server`
//!
//! The seed's dashboard app (events, workflows, servers, logs, users, webhooks) on an
//! embedded SQLite database, created and seeded at start (40 servers, 400 workflows, 300,000
//! events and as many log lines), behind `CacheLayer` and its `InvalidateLayer`. It uses
//! Valkey when `VALKEY_URL` or `REDIS_URL` is set and the in-memory store otherwise, listens
//! on `127.0.0.1:3000` (`ADDR` overrides), and `CACHE=off` runs the same app uncached. The
//! whole caching policy is `cache_routes()` in `examples/demo/app.rs`. Try:
//!
//! ```sh
//! curl -si localhost:3000/events/1 -H 'Authorization: Bearer 1' | grep -i x-cache   # MISS
//! curl -si localhost:3000/events/1 -H 'Authorization: Bearer 1' | grep -i x-cache   # HIT
//! curl -s -X PATCH localhost:3000/events/1 -H 'Authorization: Bearer 1' \
//!      -H 'content-type: application/json' -d '{"status":"error"}'                   # clears
//! curl -si localhost:3000/events/1 -H 'Authorization: Bearer 1' | grep -iE 'x-cache|status'  # MISS, new
//! curl -s localhost:3000/dashboard/stats -H 'Authorization: Bearer 2'                # per user
//! curl -s localhost:3000/cache/stats
//! ```
//!
//! Open <http://127.0.0.1:3000/> in a browser for the app's data and a live cache panel.
//! At start the cache is warmed (what was hot before a restart, then dashboards, the first
//! pages and servers; `WARM=off` skips it). The admin service is at `/admin/cache/...`
//! behind `Authorization: Bearer $ADMIN_TOKEN` (made at random and printed when unset):
//!
//! ```sh
//! export ADMIN_TOKEN=let-me-in   # before starting the server
//! curl -s localhost:3000/admin/cache/stats -H "Authorization: Bearer $ADMIN_TOKEN"
//! curl -s 'localhost:3000/admin/cache/inspect?url=/servers' -H "Authorization: Bearer $ADMIN_TOKEN"
//! curl -s -X POST localhost:3000/admin/cache/invalidate -H "Authorization: Bearer $ADMIN_TOKEN" \
//!      -d '{"tags": ["servers"]}'
//! ```
//!
//! Hits answer conditional requests and keep their bodies gzipped (the layer's
//! `compress(Encoding::Gzip)`):
//!
//! ```sh
//! curl -si localhost:3000/servers -H 'Authorization: Bearer 1' | grep -i etag   # ETag: "…"
//! curl -si localhost:3000/servers -H 'Authorization: Bearer 1' \
//!      -H 'If-None-Match: "…"' | head -1                                         # 304
//! curl -s --compressed -w '%{size_download}\n' -o /dev/null \
//!      localhost:3000/servers -H 'Authorization: Bearer 1'                       # gzip bytes
//! ```

#[path = "demo/app.rs"]
mod app;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tower_cache_aside::{
    store::{MemoryStore, ValkeyStore},
    CacheLayer, Encoding,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::var("ADDR")
        .unwrap_or_else(|_| "127.0.0.1:3000".into())
        .parse()?;
    let started = Instant::now();
    let seed = app::Seed::FULL;
    let db = Arc::new(tokio::task::spawn_blocking(move || app::Db::create(seed)).await??);
    println!(
        "database: SQLite seeded with {} events, {} log lines, {} workflows, {} servers, {} users in {:.1?}",
        seed.events, seed.logs, seed.workflows, seed.servers, seed.users, started.elapsed()
    );
    let cache_off = std::env::var("CACHE").is_ok_and(|v| v.eq_ignore_ascii_case("off"));
    let configured = ["VALKEY_URL", "REDIS_URL"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|u| !u.is_empty()));
    let router = if cache_off {
        println!("cache: off (CACHE=off)");
        app::app::<MemoryStore>(db, None, "off")
    } else if configured {
        let store = ValkeyStore::from_env()?;
        match store.ping().await {
            Ok(rtt) => println!("cache: Valkey at {} (PING {rtt:?})", store.url()),
            Err(e) => println!(
                "cache: Valkey at {} is not answering ({e}); serving uncached until it does",
                store.url()
            ),
        }
        let cache = CacheLayer::new(store)
            .routes(app::cache_routes())
            .compress(Encoding::Gzip);
        let router = app::app(db, Some(cache.clone()), "valkey");
        warm_at_start(&cache, router.clone(), seed);
        router
    } else {
        println!("cache: in-memory store, 64 MiB (set VALKEY_URL to use Valkey)");
        let cache = CacheLayer::new(MemoryStore::new(64 << 20))
            .routes(app::cache_routes())
            .compress(Encoding::Gzip);
        let router = app::app(db, Some(cache.clone()), "memory");
        warm_at_start(&cache, router.clone(), seed);
        router
    };
    println!(
        "admin: /admin/cache/{{stats,inspect,invalidate,remove,purge,warm}} with Authorization: Bearer {}",
        app::admin_token()
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on http://{addr} (open it in a browser: the app and a live cache panel)");
    axum::serve(listener, router).await?;
    Ok(())
}

/// Warms the cache in the background while the server starts listening: first what was hot
/// before a restart (the store's record: Valkey keeps it, a new in-memory store has none),
/// then the demo's list (dashboards of the most active users, first pages, servers).
/// `WARM=off` skips it.
fn warm_at_start<St: tower_cache_aside::store::Store>(
    cache: &CacheLayer<St>,
    router: axum::Router,
    seed: app::Seed,
) {
    if std::env::var("WARM").is_ok_and(|v| v.eq_ignore_ascii_case("off")) {
        println!("warming: off (WARM=off)");
        return;
    }
    let warmer = app::warmer(&cache.handle(), router)
        .on_progress(std::time::Duration::from_secs(1), |so_far| {
            println!("warming: {so_far}")
        });
    tokio::spawn(async move {
        match warmer.warm_recorded(500).await {
            Ok(r) if r.requested > 0 => println!("warming: what was hot before: {r}"),
            Ok(_) => {}
            Err(e) => println!("warming: the store's record could not be read ({e})"),
        }
        let r = warmer.warm(app::warm_list(&seed)).await;
        println!("warming: the start list: {r}");
    });
}
