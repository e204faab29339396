//! Body-keyed POST routes (gRPC unary calls): keyed by the request body, stored only when
//! `grpc-status` is 0, trailers stored and replayed; against MemoryStore, Valkey and Redis.

#[macro_use]
mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use support::*;
use tower::{Service, ServiceExt};
use tower_cache_aside::{
    body_digest::BufferedBody, store::Store, CacheLayer, RoutePolicy, RouteTable,
};

type RespBody =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

fn table() -> RouteTable {
    RouteTable::new()
        .route(
            "/demo.Events/GetEvent",
            RoutePolicy::ttl(Duration::from_secs(60)).grpc(),
        )
        .route(
            "/demo.Events/Search",
            RoutePolicy::ttl(Duration::from_secs(60)).keyed_by_body(16),
        )
        .route(
            "/demo.Events/UpdateEvent",
            RoutePolicy::never().clears(["events"]),
        )
}

/// A gRPC-shaped handler: echoes the request; `missing` fails with grpc-status 5 in the
/// trailers, `denied` with a trailers-only response (status in the headers).
type Handler = tower::util::BoxCloneSyncService<
    Request<BufferedBody<Full<Bytes>>>,
    Response<RespBody>,
    Infallible,
>;

fn service(calls: Arc<AtomicUsize>) -> Handler {
    Handler::new(tower::service_fn(
        move |req: Request<BufferedBody<Full<Bytes>>>| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let path = req.uri().path().to_owned();
                // What a server compresses its reply with depends on what the client accepts.
                let accepts = req
                    .headers()
                    .get("grpc-accept-encoding")
                    .map(|v| format!(" [{}]", v.to_str().unwrap()))
                    .unwrap_or_default();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let text = String::from_utf8_lossy(&body).into_owned();
                let mut trailers = HeaderMap::new();
                let mut frames = Vec::new();
                let mut res = Response::builder().header("content-type", "application/grpc");
                match text.as_str() {
                    "denied" => res = res.header("grpc-status", "7"),
                    "missing" => {
                        trailers.insert("grpc-status", "5".parse().unwrap());
                        frames.push(Ok(Frame::trailers(trailers)));
                    }
                    _ => {
                        let reply = format!("{path} -> {text}{accepts}");
                        frames.push(Ok(Frame::data(Bytes::from(reply))));
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        frames.push(Ok(Frame::trailers(trailers)));
                    }
                }
                Ok::<_, Infallible>(
                    res.body(StreamBody::new(futures_util::stream::iter(frames)))
                        .unwrap(),
                )
            }
        },
    ))
}

struct Call {
    x_cache: String,
    body: Bytes,
    trailers: Option<HeaderMap>,
    headers: HeaderMap,
}

async fn rpc<S, B>(svc: &S, path: &str, body: &str) -> Call
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    rpc_with(svc, path, body, &[]).await
}

async fn rpc_with<S, B>(svc: &S, path: &str, body: &str, headers: &[(&str, &str)]) -> Call
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let mut req = Request::post(path).header("content-type", "application/grpc");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    Call {
        x_cache: parts
            .headers
            .get("x-cache")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default(),
        body: collected.to_bytes(),
        trailers,
        headers: parts.headers,
    }
}

/// The handler behind the body digest, cache and invalidation layers, and its call count.
fn stack<St: Store>(
    store: St,
) -> (
    impl Service<
            Request<Full<Bytes>>,
            Response = Response<impl http_body::Body<Error = impl std::fmt::Debug>>,
            Error = Infallible,
        > + Clone,
    Arc<AtomicUsize>,
) {
    let cache = CacheLayer::new(store).routes(table());
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = tower::ServiceBuilder::new()
        .layer(cache.body_digest_layer())
        .layer(cache.clone())
        .layer(cache.invalidate_layer())
        .service(service(calls.clone()));
    (svc, calls)
}

mod cases {
    use super::*;

    pub async fn unary_calls_are_keyed_by_their_message<St: Store>(store: St) {
        let (svc, calls) = stack(store);
        let first = rpc(&svc, "/demo.Events/GetEvent", "id=1").await;
        assert_eq!(first.x_cache, "MISS");
        let mut hit = None;
        for _ in 0..200 {
            let c = rpc(&svc, "/demo.Events/GetEvent", "id=1").await;
            if c.x_cache == "HIT" {
                hit = Some(c);
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let hit = hit.expect("the call was cached");
        assert_eq!(hit.body, first.body);
        assert_eq!(
            hit.trailers
                .as_ref()
                .and_then(|t| t.get("grpc-status"))
                .unwrap(),
            "0",
            "trailer replayed"
        );
        let before = calls.load(Ordering::SeqCst);
        // Another message is another entry.
        assert_eq!(
            rpc(&svc, "/demo.Events/GetEvent", "id=2").await.x_cache,
            "MISS"
        );
        assert_eq!(calls.load(Ordering::SeqCst), before + 1);
        // A body-keyed POST is a read, not a write: it cleared nothing.
        assert_eq!(
            rpc(&svc, "/demo.Events/GetEvent", "id=1").await.x_cache,
            "HIT"
        );
    }

    /// A reply compressed for a client that accepts gzip never reaches one that does not.
    pub async fn replies_are_keyed_by_the_compression_accepted<St: Store>(store: St) {
        let (svc, _calls) = stack(store);
        let gzip = [("grpc-accept-encoding", "gzip")];
        let mut cached = false;
        for _ in 0..200 {
            if rpc_with(&svc, "/demo.Events/GetEvent", "id=1", &gzip)
                .await
                .x_cache
                == "HIT"
            {
                cached = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(cached, "the gzip caller's reply was cached");
        let identity = [("grpc-accept-encoding", "identity")];
        let other = rpc_with(&svc, "/demo.Events/GetEvent", "id=1", &identity).await;
        assert_eq!(other.x_cache, "MISS");
        assert_eq!(
            other.body,
            "/demo.Events/GetEvent -> id=1 [identity]".as_bytes()
        );
    }

    pub async fn failed_calls_are_never_stored<St: Store>(store: St) {
        let (svc, calls) = stack(store);
        for message in ["missing", "denied"] {
            for _ in 0..3 {
                let c = rpc(&svc, "/demo.Events/GetEvent", message).await;
                assert_eq!(c.x_cache, "MISS", "{message}");
                let status = c
                    .trailers
                    .as_ref()
                    .and_then(|t| t.get("grpc-status"))
                    .or(c.headers.get("grpc-status"));
                assert!(
                    status.is_some_and(|s| s != "0"),
                    "{message}: the error reaches the client"
                );
                settle().await;
            }
        }
        assert_eq!(calls.load(Ordering::SeqCst), 6);
    }

    pub async fn bodies_over_the_limit_pass_through_intact<St: Store>(store: St) {
        let (svc, calls) = stack(store);
        let long = "x".repeat(40); // the Search route reads at most 16 bytes
        for _ in 0..2 {
            let c = rpc(&svc, "/demo.Events/Search", &long).await;
            assert_eq!(c.body, format!("/demo.Events/Search -> {long}").as_bytes());
            assert_eq!(c.x_cache, "");
            settle().await;
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}

store_suite!(
    unary_calls_are_keyed_by_their_message,
    failed_calls_are_never_stored,
    bodies_over_the_limit_pass_through_intact,
    replies_are_keyed_by_the_compression_accepted,
);
