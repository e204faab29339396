//! A minimal caching reverse proxy made of this crate's layers with their defaults, for the
//! public RFC 9111 test suite (`scripts/conformance`): every request is forwarded to
//! `ORIGIN` (default `http://127.0.0.1:8000`) through `CacheLayer` (an empty route table, so
//! only what responses say about themselves is cached, over a `MemoryStore`) and its
//! `InvalidateLayer`. Listens on `ADDR` (default `127.0.0.1:8080`).
//!
//! Run with: `cargo run --release --example conformance_proxy`

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower_cache_aside::{store::MemoryStore, CacheLayer};

type Upstream = Client<HttpConnector, Body>;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Takes off the hop-by-hop headers and those the `Connection` header lists.
fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let listed: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .chain(listed.iter().map(String::as_str))
    {
        headers.remove(name);
    }
}

async fn forward(State((client, origin)): State<(Upstream, String)>, req: Request) -> Response {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = match format!("{origin}{path}").parse() {
        Ok(uri) => uri,
        Err(_) => return (http::StatusCode::BAD_REQUEST, "bad path").into_response(),
    };
    strip_hop_by_hop(&mut parts.headers);
    match client.request(Request::from_parts(parts, body)).await {
        Ok(res) => {
            let (mut parts, body) = res.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, Body::new(body))
        }
        Err(e) => (http::StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::var("ADDR")
        .unwrap_or_else(|_| "127.0.0.1:8080".into())
        .parse()?;
    let origin = std::env::var("ORIGIN").unwrap_or_else(|_| "http://127.0.0.1:8000".into());
    let client: Upstream = Client::builder(TokioExecutor::new()).build_http();
    let cache = CacheLayer::new(MemoryStore::new(64 << 20));
    let app = Router::new()
        .fallback(forward)
        .with_state((client, origin.clone()))
        .layer(cache.invalidate_layer())
        .layer(cache);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("conformance proxy on http://{addr}, forwarding to {origin}");
    axum::serve(listener, app).await?;
    Ok(())
}
