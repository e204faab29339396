//! Shared test support: real servers, the test app and request helpers.
#![allow(dead_code)]

pub mod cluster;
pub mod race;
pub mod server;
pub mod unfenced;

/// Runs every listed `cases::NAME(store)` against MemoryStore, Valkey, Redis, a
/// TieredStore (a near tier in front of Valkey) and Valkey on a 3-master cluster.
#[allow(unused_macros)]
macro_rules! store_suite {
    ($($case:ident),* $(,)?) => {
        store_suite!(@one memory, memory(), [$($case),*]);
        store_suite!(@one valkey, served(Kind::Valkey), [$($case),*]);
        store_suite!(@one redis, served(Kind::Redis), [$($case),*]);
        store_suite!(@one tiered, tiered(Kind::Valkey).await, [$($case),*]);
        store_suite!(@one cluster, clustered(Kind::Valkey), [$($case),*]);
    };
    (@one $store:ident, $fixture:expr, [$($case:ident),*]) => {
        mod $store {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let fx = $fixture;
                    cases::$case(fx.store.clone()).await;
                }
            )*
        }
    };
}

/// Runs every listed `NAME(kind)` against a Valkey and a Redis server.
#[allow(unused_macros)]
macro_rules! server_suite {
    ($($case:ident),* $(,)?) => {
        mod valkey {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $case() { super::$case(super::Kind::Valkey).await } )*
        }
        mod redis {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $case() { super::$case(super::Kind::Redis).await } )*
        }
    };
}

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get as route_get;
use axum::Router;
use bytes::Bytes;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_cache_aside::{
    store::{MemoryStore, Store, ValkeyStore},
    CacheHint, CacheLayer, CacheStats, RoutePolicy, RouteTable, Scope,
};

pub use server::{Kind, Server};

/// A store and the server behind it (kept alive for the test's duration).
pub struct Fixture<St> {
    pub store: St,
    pub server: Option<Server>,
    pub cluster: Option<cluster::Cluster>,
}

pub fn memory() -> Fixture<MemoryStore> {
    Fixture {
        store: MemoryStore::new(64 << 20),
        server: None,
        cluster: None,
    }
}

pub fn valkey_store(server: &Server) -> ValkeyStore {
    ValkeyStore::builder()
        .url(server.url())
        // Generous: a loaded CI machine must not turn a slow lookup into a spurious miss.
        .operation_timeout(Duration::from_secs(1))
        .build()
        .unwrap()
}

/// A near tier in front of a served store, its records read (so the near tier answers).
pub async fn tiered(kind: Kind) -> Fixture<tower_cache_aside::store::TieredStore> {
    let server = Server::start(kind);
    let store = tower_cache_aside::store::TieredStore::new(
        MemoryStore::new(64 << 20),
        valkey_store(&server),
    );
    // The first lookup reads the records; the near tier is used once they are current.
    let probe = tower_cache_aside::EntryKey::new("probe", [0; 32]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !store.near_is_live(&probe) {
        let _ = store.lookup(&probe).await;
        assert!(Instant::now() < deadline, "the near tier never went live");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Fixture {
        store,
        server: Some(server),
        cluster: None,
    }
}

pub fn served(kind: Kind) -> Fixture<ValkeyStore> {
    let server = Server::start(kind);
    Fixture {
        store: valkey_store(&server),
        server: Some(server),
        cluster: None,
    }
}

/// A store on a real 3-master cluster, given the URL of one node.
pub fn clustered(kind: Kind) -> Fixture<ValkeyStore> {
    let cluster = cluster::Cluster::start(kind, 3, 0);
    Fixture {
        store: ValkeyStore::builder()
            .url(cluster.url())
            .operation_timeout(Duration::from_secs(1))
            .build()
            .unwrap(),
        server: None,
        cluster: Some(cluster),
    }
}

/// Counts calls that reach the app (the inner service).
#[derive(Clone, Default)]
pub struct Calls(Arc<AtomicUsize>);

impl Calls {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
    fn bump(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

pub fn bearer(parts: &axum::http::request::Parts) -> Option<String> {
    let v = parts.headers.get("authorization")?.to_str().ok()?;
    v.strip_prefix("Bearer ").map(str::to_owned)
}

pub fn routes() -> RouteTable {
    let min = || RoutePolicy::ttl(Duration::from_secs(60));
    RouteTable::new()
        .route("/items", min().tags(["items"]))
        .route("/items/{id}", min().tags(["items", "item:{id}"]))
        .route("/echo-host", min())
        .route("/lang", min().vary(["accept-language"]))
        .route("/cookie", min())
        .route("/nostore", min())
        .route("/private", min())
        .route("/error", min())
        .route("/missing", min())
        .route("/big", min())
        .route("/big-declared", min())
        .route("/vary-undeclared", min())
        .route("/public", min().scope(Scope::Public))
        .route("/me", min().per_user(bearer))
        .route("/short", RoutePolicy::ttl(Duration::from_millis(1200)))
        .route("/uncached", RoutePolicy::never())
        .route("/slow", min())
}

/// How long `/slow` takes.
pub const SLOW: Duration = Duration::from_millis(300);

/// Sizes of the streamed `/big` body.
pub const BIG_CHUNK: usize = 16 * 1024;
pub const BIG_CHUNKS: usize = 64;

/// The app under test, behind the cache layer built from `layer`.
pub fn app<St: Store>(layer: CacheLayer<St>) -> (Router, Calls) {
    let calls = Calls::default();
    let c = calls.clone();
    let counted = move |r: Response| {
        c.bump();
        r
    };
    let h = move |f: fn(Request<Body>) -> Response| {
        let counted = counted.clone();
        move |req: Request<Body>| {
            let counted = counted.clone();
            async move { counted(f(req)) }
        }
    };
    let router = Router::new()
        .route(
            "/items",
            route_get(h(|req| {
                format!("items {}", req.uri().query().unwrap_or("")).into_response()
            })),
        )
        .route(
            "/items/{id}",
            route_get(h(|req| {
                format!("item {}", req.uri().path().trim_start_matches("/items/")).into_response()
            }))
            .post(h(|_| "posted".into_response())),
        )
        .route(
            "/echo-host",
            route_get(h(|req| {
                let host = req
                    .headers()
                    .get("host")
                    .map(|h| h.to_str().unwrap_or("?").to_owned());
                host.unwrap_or_default().into_response()
            })),
        )
        .route(
            "/lang",
            route_get(h(|req| {
                let lang = req
                    .headers()
                    .get("accept-language")
                    .map(|h| h.to_str().unwrap_or("?").to_owned());
                ([("vary", "accept-language")], lang.unwrap_or_default()).into_response()
            })),
        )
        .route(
            "/cookie",
            route_get(h(|_| {
                ([("set-cookie", "session=secret")], "with cookie").into_response()
            })),
        )
        .route(
            "/nostore",
            route_get(h(|_| {
                ([("cache-control", "no-store")], "no-store").into_response()
            })),
        )
        .route(
            "/private",
            route_get(h(|_| {
                ([("cache-control", "private")], "private").into_response()
            })),
        )
        .route(
            "/error",
            route_get(h(|_| {
                (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response()
            })),
        )
        .route(
            "/missing",
            route_get(h(|_| (StatusCode::NOT_FOUND, "not here").into_response())),
        )
        .route(
            "/big",
            route_get(h(|_| Response::new(Body::from_stream(big_stream())))),
        )
        .route(
            "/big-declared",
            route_get(h(|_| vec![b'x'; BIG_CHUNK * 4].into_response())),
        )
        .route(
            "/vary-undeclared",
            route_get(h(|_| {
                ([("vary", "accept-encoding")], "varies").into_response()
            })),
        )
        .route(
            "/public",
            route_get(h(|_| {
                ([("cache-control", "public")], "for everyone").into_response()
            })),
        )
        .route(
            "/me",
            route_get(h(|req| {
                let who = req
                    .headers()
                    .get("authorization")
                    .map(|h| h.to_str().unwrap_or("?").to_owned());
                (
                    [("cache-control", "private")],
                    format!("hello {}", who.unwrap_or_else(|| "anonymous".into())),
                )
                    .into_response()
            })),
        )
        .route("/short", route_get(h(|_| "short-lived".into_response())))
        .route("/uncached", route_get(h(|_| "uncached".into_response())))
        .route(
            "/hinted",
            route_get(h(|_| {
                let mut r = "hinted".into_response();
                r.extensions_mut()
                    .insert(CacheHint::ttl(Duration::from_secs(60)));
                r
            })),
        )
        .route(
            "/smaxage",
            route_get(h(|_| {
                ([("cache-control", "max-age=5, s-maxage=60")], "smaxage").into_response()
            })),
        )
        .route("/plain", route_get(h(|_| "plain".into_response())))
        .route(
            "/slow",
            route_get({
                let calls = calls.clone();
                move || async move {
                    calls.bump();
                    tokio::time::sleep(SLOW).await;
                    "slow"
                }
            }),
        )
        .layer(layer);
    (router, calls)
}

fn big_stream() -> impl futures_core::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    let mut i = 0usize;
    futures_util::stream::poll_fn(move |_| {
        if i == BIG_CHUNKS {
            return std::task::Poll::Ready(None);
        }
        let chunk = Bytes::from(vec![(i % 251) as u8; BIG_CHUNK]);
        i += 1;
        std::task::Poll::Ready(Some(Ok(chunk)))
    })
}

pub fn big_expected() -> Vec<u8> {
    (0..BIG_CHUNKS)
        .flat_map(|i| vec![(i % 251) as u8; BIG_CHUNK])
        .collect()
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn x_cache(&self) -> &str {
        self.headers
            .get("x-cache")
            .map_or("", |v| v.to_str().unwrap())
    }
    pub fn cache_status(&self) -> &str {
        self.headers
            .get("cache-status")
            .map_or("", |v| v.to_str().unwrap())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn send(router: &Router, req: Request<Body>) -> Reply {
    let res = router.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(router: &Router, uri: &str) -> Reply {
    send(router, Request::get(uri).body(Body::empty()).unwrap()).await
}

pub async fn get_with(router: &Router, uri: &str, headers: &[(&str, &str)]) -> Reply {
    let mut b = Request::get(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(router, b.body(Body::empty()).unwrap()).await
}

/// Waits (bounded) until the background fills reach `n`.
pub async fn fills_reach(stats: &CacheStats, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats.snapshot().fills < n {
        assert!(
            Instant::now() < deadline,
            "fills stuck at {:?}, wanted {n}",
            stats.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits long enough for a fill that should not happen to have happened.
pub async fn settle() {
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Looks `key` up on `store`, then fills it with `v` for 60 s, tagged `tag`, under the
/// fence that lookup read (what the layer does on a miss).
pub async fn fill_as_looked_up<St: tower_cache_aside::store::Store>(
    store: &St,
    key: &tower_cache_aside::EntryKey,
    tag: &str,
) -> tower_cache_aside::store::FillOutcome {
    let fence = store.lookup(key).await.unwrap().fence;
    let fill = tower_cache_aside::store::Fill::new(
        key.clone(),
        "v".into(),
        Duration::from_secs(60),
        vec![tag.to_owned()],
        fence,
    );
    store.fill(fill).await.unwrap()
}
