use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use std::convert::Infallible;
use std::time::Duration;
use tower::{Service, ServiceExt};
use tower_cache_aside::*;
fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = Bytes::from(vec![b'x'; 1024]);
    let h = tower::service_fn(move |_r: Request<Full<Bytes>>| {
        let b = body.clone();
        async move { Ok::<_, Infallible>(Response::new(Full::new(b))) }
    });
    let routes = RouteTable::new().route(
        "/events/{id}",
        RoutePolicy::ttl(Duration::from_secs(300)).tags(["events", "event:{id}"]),
    );
    let svc = tower::ServiceBuilder::new()
        .layer(CacheLayer::new(MemoryStore::new(64 << 20)).routes(routes))
        .service(h);
    rt.block_on(async move {
        let n: u64 = std::env::args()
            .nth(1)
            .and_then(|a| a.parse().ok())
            .unwrap_or(2_000_000);
        let mut total = 0;
        for _ in 0..n {
            let req = Request::get("/events/1")
                .header("host", "bench.local")
                .body(Full::default())
                .unwrap();
            let mut s = svc.clone();
            let res = s.ready().await.unwrap().call(req).await.unwrap();
            let mut b = res.into_body();
            while let Some(f) = b.frame().await {
                if let Ok(d) = f.unwrap().into_data() {
                    total += d.len();
                }
            }
            if total == 1024 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        println!("{total}");
    });
}
