//! Run with: `cargo run --example hyper`
//!
//! The cache on a plain hyper 1 server, no framework: a `tower::service_fn` handler wrapped
//! with `ServiceBuilder` in the cache and invalidation layers, served with
//! `hyper_util::service::TowerToHyperService`. The handler takes 50 ms, so hits are easy to
//! see. Listens on 127.0.0.1:3001 (`ADDR` overrides); in-memory store, or Valkey when
//! `VALKEY_URL` is set.
//!
//! ```sh
//! curl -si localhost:3001/time/utc | grep -iE 'x-cache|age'      # MISS, then HIT
//! curl -si -X POST localhost:3001/time/utc | head -1              # clears time:utc
//! ```

use std::convert::Infallible;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tower::ServiceBuilder;
use tower_cache_aside::{
    store::{MemoryStore, Store, ValkeyStore},
    CacheLayer, RoutePolicy, RouteTable,
};

async fn handler(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let zone = req.uri().path().trim_start_matches("/time/").to_owned();
    if req.method() == Method::POST {
        return Ok(Response::new(Full::new(Bytes::from(format!(
            "reset {zone}\n"
        )))));
    }
    tokio::time::sleep(Duration::from_millis(50)).await; // the expensive part
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let body = format!("{zone}: {}.{:03}\n", now.as_secs(), now.subsec_millis());
    let mut res = Response::new(Full::new(Bytes::from(body)));
    if !req.uri().path().starts_with("/time/") {
        *res.status_mut() = StatusCode::NOT_FOUND;
    }
    Ok(res)
}

async fn serve<St: Store>(store: St, addr: std::net::SocketAddr) -> std::io::Result<()> {
    let routes = RouteTable::new()
        .route(
            "/time/{zone}",
            RoutePolicy::ttl(Duration::from_secs(10)).tags(["time:{zone}"]),
        )
        .fallback(RoutePolicy::never());
    let cache = CacheLayer::new(store).routes(routes);
    let service = ServiceBuilder::new()
        .layer(cache.clone())
        .layer(cache.invalidate_layer())
        .service_fn(handler);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on http://{addr}");
    loop {
        let (stream, _) = listener.accept().await?;
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                eprintln!("connection error: {e}");
            }
        });
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::var("ADDR")
        .unwrap_or_else(|_| "127.0.0.1:3001".into())
        .parse()?;
    if std::env::var("VALKEY_URL").is_ok_and(|u| !u.is_empty()) {
        let store = ValkeyStore::from_env()?;
        println!("store: Valkey at {}", store.url());
        serve(store, addr).await?;
    } else {
        println!("store: in-memory");
        serve(MemoryStore::new(16 << 20), addr).await?;
    }
    Ok(())
}
