//! Run with: `cargo run --example grpc`
//!
//! Caching idempotent gRPC unary methods with tonic. A gRPC call is a POST whose request is
//! in the body, so the route opts in with `RoutePolicy::grpc()`: `body_digest_layer()` reads
//! and hashes the request message for the key, only `grpc-status: 0` results are stored, and
//! the status trailer is stored and replayed. A mutating method clears tags like a REST
//! mutation. The service is hand-written (`examples/demo/grpc_service.rs`, no protoc).
//! The example starts the server on 127.0.0.1:50051 (`ADDR` overrides), then calls it:
//! GetEvent (MISS), GetEvent (HIT), UpdateEvent (clears), GetEvent (MISS, new version).

#[path = "demo/grpc_service.rs"]
mod grpc_service;

use std::time::Duration;

use grpc_service::{grpc_routes, Events, EventsClient};
use tower_cache_aside::{store::MemoryStore, CacheLayer};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::var("ADDR")
        .unwrap_or_else(|_| "127.0.0.1:50051".into())
        .parse()?;
    let cache = CacheLayer::new(MemoryStore::new(16 << 20)).routes(grpc_routes());
    let events = Events::seeded();
    let server = tonic::transport::Server::builder()
        .layer(cache.body_digest_layer())
        .layer(cache.clone())
        .layer(cache.invalidate_layer())
        .add_service(events.clone())
        .serve(addr);
    tokio::spawn(server);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut client = EventsClient::connect(addr).await?;
    for step in ["get", "get", "update", "get", "get"] {
        let (event, x_cache) = match step {
            "update" => client.update_event(7, "closed").await?,
            _ => client.get_event(7).await?,
        };
        println!(
            "{step:>6} event 7: status={} version={} x-cache={x_cache}",
            event.status, event.version
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // let the fill land
    }
    match client.get_event(999).await {
        Err(status) => println!(
            "   get event 999: {} (errors are never cached)",
            status.code()
        ),
        Ok(_) => println!("   get event 999: unexpectedly found"),
    }
    println!(
        "calls that reached the service: {}",
        events.calls.load(std::sync::atomic::Ordering::SeqCst)
    );
    Ok(())
}
