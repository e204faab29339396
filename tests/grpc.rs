//! gRPC unary caching through tonic, over a real HTTP/2 socket, on Valkey and Redis.

#[macro_use]
mod support;
#[path = "../examples/demo/grpc_service.rs"]
mod grpc_service;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use grpc_service::{grpc_routes, Events, EventsClient};
use support::*;
use tower_cache_aside::CacheLayer;

async fn unary_methods_are_cached_and_mutations_clear_them(kind: Kind) {
    let server = Server::start(kind);
    let cache = CacheLayer::new(valkey_store(&server)).routes(grpc_routes());
    let events = Events::seeded();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tokio_stream_from(listener);
    let svc = tonic::transport::Server::builder()
        .layer(cache.body_digest_layer())
        .layer(cache.clone())
        .layer(cache.invalidate_layer())
        .add_service(events.clone())
        .serve_with_incoming(incoming);
    tokio::spawn(svc);
    let mut client = EventsClient::connect(addr).await.unwrap();
    let (event, x_cache) = client.get_event(3).await.unwrap();
    assert_eq!((event.version, x_cache.as_str()), (1, "MISS"));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (event, x_cache) = client.get_event(3).await.unwrap();
        assert_eq!(event.status, "open");
        if x_cache == "HIT" {
            break;
        }
        assert!(Instant::now() < deadline, "never cached");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let calls = events.calls.load(Ordering::SeqCst);
    for _ in 0..5 {
        assert_eq!(client.get_event(3).await.unwrap().1, "HIT");
    }
    assert_eq!(
        events.calls.load(Ordering::SeqCst),
        calls,
        "hits never reach the service"
    );
    let (updated, _) = client.update_event(3, "closed").await.unwrap();
    assert_eq!(updated.version, 2);
    let (event, x_cache) = client.get_event(3).await.unwrap();
    assert_eq!(
        (event.status.as_str(), event.version, x_cache.as_str()),
        ("closed", 2, "MISS")
    );
    // Errors are never stored: every call reaches the service.
    let calls = events.calls.load(Ordering::SeqCst);
    for _ in 0..3 {
        let err = client.get_event(999).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(events.calls.load(Ordering::SeqCst), calls + 3);
}

/// tonic's `serve_with_incoming` wants a stream of connections.
fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl futures_core::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |l| async move {
        let conn = l.accept().await.map(|(s, _)| s);
        Some((conn, l))
    })
}

server_suite!(unary_methods_are_cached_and_mutations_clear_them);
