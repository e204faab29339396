//! Micro-benchmarks of the hot path, run with `cargo bench --bench hot_path`.
//!
//! Starts its own `valkey-server` on a free loopback port (the test harness's), so the
//! Valkey figures sit beside their baseline in one run: a raw `GET` of the same size over a
//! redis-rs `MultiplexedConnection`. Compare ratios, not absolute times.

#[path = "../tests/support/server.rs"]
#[allow(dead_code)]
mod server;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bb8_redis::redis;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};
use tower_cache_aside::{
    store::{MemoryStore, Store, ValkeyStore},
    CacheLayer, RoutePolicy, RouteTable,
};

const BODY: usize = 1024;

fn routes() -> RouteTable {
    RouteTable::new().route(
        "/events/{id}",
        RoutePolicy::ttl(Duration::from_secs(300)).tags(["events", "event:{id}"]),
    )
}

type Handler =
    tower::util::BoxCloneSyncService<Request<Full<Bytes>>, Response<Full<Bytes>>, Infallible>;

fn handler() -> Handler {
    let body = Bytes::from(vec![b'x'; BODY]);
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let body = body.clone();
        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
    }))
}

async fn call<S, B>(mut svc: S, uri: &str) -> usize
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = Infallible>,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let req = Request::get(uri)
        .header("host", "bench.local")
        .body(Full::default())
        .unwrap();
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    res.into_body().collect().await.unwrap().to_bytes().len()
}

fn layered<St: Store>(
    store: St,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<tower_cache_aside::cache::CacheBody<Full<Bytes>>>,
    Error = Infallible,
> + Clone {
    layered_with(CacheLayer::new(store).routes(routes()))
}

fn layered_with<St: Store>(
    layer: CacheLayer<St>,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<tower_cache_aside::cache::CacheBody<Full<Bytes>>>,
    Error = Infallible,
> + Clone {
    tower::ServiceBuilder::new().layer(layer).service(handler())
}

fn key_derivation(c: &mut Criterion) {
    let layer = CacheLayer::new(MemoryStore::new(1 << 20))
        .routes(routes())
        .ignore_query_params(["utm_*"]);
    let (parts, ()) = Request::get("/events/12345?status=open&page=2&server=7&utm_source=x")
        .header("host", "api.example.com")
        .body(())
        .unwrap()
        .into_parts();
    c.bench_function("key: route match + sha256 (4 query params)", |b| {
        b.iter(|| layer.entry_key(std::hint::black_box(&parts)).unwrap())
    });
}

fn entry_format(c: &mut Criterion) {
    use tower_cache_aside::__private::bench::{decode_entry, encode_entry};
    let mut headers = http::HeaderMap::new();
    headers.insert("content-type", "application/json".parse().unwrap());
    headers.insert("content-length", "1024".parse().unwrap());
    headers.insert("cache-control", "public, max-age=300".parse().unwrap());
    let body = Bytes::from(vec![b'x'; BODY]);
    let tags = vec!["events".to_owned(), "event:12345".to_owned()];
    let encoded = encode_entry(&headers, body.clone(), tags.clone());
    let mut g = c.benchmark_group("entry (1 KiB body, 3 headers, 2 tags)");
    g.bench_function("encode", |b| {
        b.iter(|| encode_entry(&headers, body.clone(), tags.clone()))
    });
    g.bench_function("decode", |b| {
        b.iter(|| decode_entry(std::hint::black_box(encoded.clone())).unwrap())
    });
    g.finish();
}

/// What stored compression costs and saves on a 16 KiB JSON body: compressing once per
/// fill, and decompressing per hit for a client that takes no compression.
fn compression(c: &mut Criterion) {
    use tower_cache_aside::__private::bench::{compress, decompress};
    use tower_cache_aside::Encoding;
    let items: Vec<String> = (0..300)
        .map(|i| format!("{{\"id\":{i},\"name\":\"event number {i}\",\"tags\":[\"a\",\"b\"]}}"))
        .collect();
    let json = format!("[{}]", items.join(","));
    let codecs = [
        Encoding::Gzip,
        #[cfg(feature = "brotli")]
        Encoding::Brotli,
    ];
    let mut g = c.benchmark_group(format!("compression ({} bytes of JSON)", json.len()));
    for encoding in codecs {
        let packed = compress(encoding, json.as_bytes()).unwrap();
        eprintln!(
            "{}: {} -> {} bytes ({:.1}%)",
            encoding.token(),
            json.len(),
            packed.len(),
            packed.len() as f64 * 100.0 / json.len() as f64
        );
        g.bench_function(format!("{} compress (per fill)", encoding.token()), |b| {
            b.iter(|| compress(encoding, std::hint::black_box(json.as_bytes())))
        });
        g.bench_function(
            format!("{} decompress (per identity hit)", encoding.token()),
            |b| b.iter(|| decompress(encoding, std::hint::black_box(&packed))),
        );
    }
    g.finish();
}

fn memory_paths(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bare = handler();
    let cached = layered(MemoryStore::new(64 << 20));
    // The same without the record of the most requested keys: what counting costs a hit.
    let unrecorded = layered_with(
        CacheLayer::new(MemoryStore::new(64 << 20))
            .routes(routes())
            .record_hot_keys(0),
    );
    rt.block_on(async {
        call(cached.clone(), "/events/1").await;
        call(unrecorded.clone(), "/events/1").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    });
    let mut g = c.benchmark_group("memory");
    g.bench_function("hit, hot-key record off", |b| {
        b.to_async(&rt)
            .iter(|| call(unrecorded.clone(), "/events/1"))
    });
    g.bench_function("bare handler", |b| {
        b.to_async(&rt).iter(|| call(bare.clone(), "/events/1"))
    });
    g.bench_function("hit", |b| {
        b.to_async(&rt).iter(|| call(cached.clone(), "/events/1"))
    });
    // Two cores serving the same hits at once, as a server's worker threads do: what the
    // lines both write (reference counts, locks, queues) cost when they pass between cores.
    // Time per hit on each thread; compare with the one-thread figures above.
    g.bench_function("bare handler, two threads at once", |b| {
        b.iter_custom(|iters| on_two_threads(bare.clone(), iters))
    });
    g.bench_function("hit, two threads at once", |b| {
        b.iter_custom(|iters| on_two_threads(cached.clone(), iters))
    });
    g.finish();
}

/// The wall time two threads take to call `svc` `iters` times each, side by side.
fn on_two_threads<S, B>(svc: S, iters: u64) -> Duration
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + Sync,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let barrier = std::sync::Barrier::new(3);
    std::thread::scope(|s| {
        for _ in 0..2 {
            let (svc, barrier) = (svc.clone(), &barrier);
            s.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                barrier.wait();
                rt.block_on(async {
                    for _ in 0..iters {
                        call(svc.clone(), "/events/1").await;
                    }
                });
                barrier.wait();
            });
        }
        barrier.wait();
        let start = std::time::Instant::now();
        barrier.wait();
        start.elapsed()
    })
}

fn valkey_paths(c: &mut Criterion) {
    let server = server::Server::start(server::Kind::Valkey);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let raw = rt.block_on(async {
        let mut conn = redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = redis::cmd("SET")
            .arg("raw")
            .arg(vec![b'x'; BODY])
            .query_async(&mut conn)
            .await
            .unwrap();
        conn
    });
    let store = ValkeyStore::builder().url(server.url()).build().unwrap();
    let cached = layered(store);
    let near = layered(tower_cache_aside::store::TieredStore::new(
        MemoryStore::new(64 << 20),
        ValkeyStore::builder().url(server.url()).build().unwrap(),
    ));
    let memory = layered(MemoryStore::new(64 << 20));
    rt.block_on(async {
        for _ in 0..3 {
            call(cached.clone(), "/events/1").await;
            call(near.clone(), "/events/1").await;
            call(memory.clone(), "/events/1").await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let miss_counter = Arc::new(AtomicU64::new(0));
    let mut g = c.benchmark_group("valkey");
    g.bench_function("raw GET 1 KiB (MultiplexedConnection)", |b| {
        b.to_async(&rt).iter(|| {
            let mut conn = raw.clone();
            async move {
                let v: Vec<u8> = redis::cmd("GET")
                    .arg("raw")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                v.len()
            }
        })
    });
    // What bb8-redis does by default: a PING on every checkout, so two round trips.
    let pool = rt.block_on(async {
        bb8_redis::bb8::Pool::builder()
            .max_size(4)
            .build(bb8_redis::RedisConnectionManager::new(server.url()).unwrap())
            .await
            .unwrap()
    });
    g.bench_function("bb8 default checkout (PING) + GET 1 KiB", |b| {
        b.to_async(&rt).iter(|| {
            let pool = pool.clone();
            async move {
                let mut conn = pool.get().await.unwrap();
                let v: Vec<u8> = redis::cmd("GET")
                    .arg("raw")
                    .query_async(&mut *conn)
                    .await
                    .unwrap();
                v.len()
            }
        })
    });
    g.bench_function("hit 1 KiB", |b| {
        b.to_async(&rt).iter(|| call(cached.clone(), "/events/1"))
    });
    // The near tier answers; beside it, a MemoryStore hit in the same run.
    g.bench_function("near hit 1 KiB (TieredStore)", |b| {
        b.to_async(&rt).iter(|| call(near.clone(), "/events/1"))
    });
    g.bench_function("memory hit 1 KiB (same run)", |b| {
        b.to_async(&rt).iter(|| call(memory.clone(), "/events/1"))
    });
    g.bench_function("miss + background fill 1 KiB", |b| {
        b.to_async(&rt).iter(|| {
            let n = miss_counter.fetch_add(1, Ordering::Relaxed);
            let svc = cached.clone();
            async move { call(svc, &format!("/events/{n}?miss")).await }
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = key_derivation, entry_format, compression, memory_paths, valkey_paths
}
criterion_main!(benches);
