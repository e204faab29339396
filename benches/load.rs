//! The end-to-end load benchmark: `scripts/load` (or `cargo bench --bench load`).
//!
//! Starts its own Valkey on a free loopback port and, in this process, one axum server per
//! case; drives each with `wrk -t1 -c50` for a bounded time (LOAD_SECS per round, default 3;
//! LOAD_ROUNDS rounds, default 3, run round-robin, the median round reported) and prints one
//! table of req/s, p50, p99 and CPU per request with the ratios the project targets (each
//! also taken within every round, and judged by the rounds' median from three rounds on: the
//! two cases of a round ran seconds apart, while this machine's speed drifts). Varnish
//! joins when `varnishd` is installed. Everything shares this machine's cores, as in
//! production-like single-box measurements: compare ratios from one run, not absolute numbers
//! across runs. Four floor rows do no cache work at all: the bare handler sending a hit's
//! header lines (or only `Age` and `Cache-Status`), the raw `GET` handler sending them, and
//! one raw `GET` before the 1 ms backend; what a target leaves to the layer is its ratio to
//! them. Each runs right after its baseline, and every other round runs backwards. Then it
//! fills a near cache with a million distinct keys and reports its memory.

#[path = "../tests/support/server.rs"]
#[allow(dead_code)]
mod server;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use axum::extract::Path;
use axum::routing::get;
use axum::Router;
use bb8_redis::redis;
use bytes::Bytes;
use tower_cache_aside::{
    store::{MemoryStore, Store, TieredStore, ValkeyStore},
    CacheLayer, CacheStats, RoutePolicy, RouteTable,
};

const BODY: usize = 1024;

struct Row {
    name: &'static str,
    rps: f64,
    p50: String,
    p99: String,
    /// CPU time per request of this process (the servers) and of Valkey, in µs.
    cpu_us: Option<(f64, f64)>,
    /// wrk's CPU time per request, in µs: on these shared cores, what a response costs
    /// the client counts against the server's throughput too.
    wrk_us: Option<f64>,
}

/// The run with the median req/s (its latencies with it), CPU averaged over all runs.
fn median(name: &'static str, runs: &mut [Row]) -> Row {
    if runs.is_empty() {
        return Row {
            name,
            rps: f64::NAN,
            p50: "-".into(),
            p99: "-".into(),
            cpu_us: None,
            wrk_us: None,
        };
    }
    let wrk: Vec<f64> = runs.iter().filter_map(|r| r.wrk_us).collect();
    let wrk_us = (!wrk.is_empty()).then(|| wrk.iter().sum::<f64>() / wrk.len() as f64);
    let cpu: Vec<(f64, f64)> = runs.iter().filter_map(|r| r.cpu_us).collect();
    let cpu_us = (!cpu.is_empty()).then(|| {
        let n = cpu.len() as f64;
        (
            cpu.iter().map(|c| c.0).sum::<f64>() / n,
            cpu.iter().map(|c| c.1).sum::<f64>() / n,
        )
    });
    runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    let mid = &runs[runs.len() / 2];
    Row {
        name,
        rps: mid.rps,
        p50: mid.p50.clone(),
        p99: mid.p99.clone(),
        cpu_us,
        wrk_us,
    }
}

/// CPU seconds (user + system) a process has used, from `/proc/{pid}/stat`.
fn cpu_secs(pid: &str) -> f64 {
    stat_secs(pid, 11)
}

/// CPU seconds (user + system) of this process's children that have ended and been waited
/// for: each wrk run, once it returns (Valkey, Varnish and nginx run on to the end).
fn children_cpu_secs() -> f64 {
    stat_secs("self", 13)
}

/// The sum of two tick counts of `/proc/{pid}/stat`, from field `at` (after the state), in
/// seconds.
fn stat_secs(pid: &str, at: usize) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    let ticks = f.get(at).copied().unwrap_or(0.0) + f.get(at + 1).copied().unwrap_or(0.0);
    ticks / 100.0 // USER_HZ is 100 on Linux
}

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

fn body() -> Bytes {
    Bytes::from(vec![b'x'; BODY])
}

/// 16 KiB of JSON, as an API list page would be, with an `ETag` of its own.
fn json_app() -> Router {
    let items: Vec<String> = (0..300)
        .map(|i| format!("{{\"id\":{i},\"name\":\"event number {i}\",\"tags\":[\"a\",\"b\"]}}"))
        .collect();
    let json = Bytes::from(format!("[{}]", items.join(",")));
    Router::new().route(
        "/json",
        get(move || {
            let json = json.clone();
            async move {
                (
                    [("content-type", "application/json"), ("etag", "\"j1\"")],
                    json,
                )
            }
        }),
    )
}

/// `json_app` behind a memory-store cache, with stored compression or not.
fn json_cached<St: Store>(store: St, compress: bool) -> Router {
    let routes = RouteTable::new().route("/json", RoutePolicy::ttl(Duration::from_secs(300)));
    let mut cache = CacheLayer::new(store).routes(routes);
    if compress {
        cache = cache.compress(tower_cache_aside::Encoding::Gzip);
    }
    json_app().layer(cache)
}

fn static_app() -> Router {
    let b = body();
    Router::new().route(
        "/static",
        get(move || {
            let b = b.clone();
            async move { b }
        }),
    )
}

/// A handler that takes 1 ms: it waits on `tokio::time::sleep`, or on a reply from a
/// backend thread answering after exactly 1 ms (as a database would, by socket readiness).
/// Tokio's timer has millisecond ticks, and fires later when the runtime is idle than when
/// it is busy: its 1 ms sleeps last 1 to 3 ms depending on load, which moves the baseline.
fn slow_app(backend: Option<DelayLine>) -> Router {
    let b = body();
    Router::new().route(
        "/slow/{n}",
        get(move |Path(_n): Path<String>| {
            let (b, backend) = (b.clone(), backend.clone());
            async move {
                match backend {
                    Some(line) => line.wait(Duration::from_millis(1)).await,
                    None => tokio::time::sleep(Duration::from_millis(1)).await,
                }
                b
            }
        }),
    )
}

/// A thread answering every request exactly `delay` after it was made, in order.
#[derive(Clone)]
struct DelayLine {
    requests: std::sync::mpsc::Sender<(std::time::Instant, tokio::sync::oneshot::Sender<()>)>,
}

impl DelayLine {
    fn start() -> DelayLine {
        let (requests, queue) =
            std::sync::mpsc::channel::<(std::time::Instant, tokio::sync::oneshot::Sender<()>)>();
        std::thread::spawn(move || {
            // Every delay is the same, so requests fall due in the order they came.
            for (due, reply) in queue {
                let now = std::time::Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let _ = reply.send(());
            }
        });
        DelayLine { requests }
    }

    async fn wait(&self, delay: Duration) {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let _ = self
            .requests
            .send((std::time::Instant::now() + delay, reply));
        let _ = answer.await;
    }
}

/// A mutation: `PATCH /things/{n}` answers at once.
fn patch_app() -> Router {
    Router::new().route("/things/{n}", axum::routing::patch(|| async { "ok" }))
}

/// The mutation behind the layers: each response clears `thing:{n}`, `things` and its URI
/// (three tags, one clear) in Valkey before it is sent.
fn clearing(store: ValkeyStore) -> Router {
    let routes = RouteTable::new().route(
        "/things/{n}",
        RoutePolicy::ttl(Duration::from_secs(300)).tags(["thing:{n}", "things"]),
    );
    let cache = CacheLayer::new(store).routes(routes);
    patch_app().layer(cache.invalidate_layer()).layer(cache)
}

fn cached<St: Store>(app: Router, store: St) -> Router {
    cached_with_stats(app, store).0
}

fn bench_routes() -> RouteTable {
    RouteTable::new()
        .route(
            "/static",
            RoutePolicy::ttl(Duration::from_secs(300)).tags(["static"]),
        )
        .route(
            "/slow/{n}",
            RoutePolicy::ttl(Duration::from_secs(300)).tags(["slow:{n}"]),
        )
}

fn cached_with_stats<St: Store>(app: Router, store: St) -> (Router, CacheStats) {
    let cache = CacheLayer::new(store).routes(bench_routes());
    let stats = cache.stats();
    (app.layer(cache), stats)
}

/// The layer around the whole `Router` rather than inside it (`Router::layer` wraps each
/// route, after routing): a hit is answered before axum routes the request at all.
async fn serve_outside_router<St: Store>(app: Router, store: St) -> SocketAddr {
    let cache = CacheLayer::new(store).routes(bench_routes());
    // axum serves `Body` responses: the cache's body is boxed into one, as axum boxes
    // every route's response when the layer sits inside the Router.
    let cached = tower::Layer::layer(&cache, app);
    let svc = tower::ServiceExt::<axum::extract::Request>::map_response(cached, |res| {
        res.map(axum::body::Body::new)
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let make = axum::ServiceExt::<axum::extract::Request>::into_make_service(svc);
    tokio::spawn(async move { axum::serve(listener, make).await.unwrap() });
    addr
}

/// What paths and method a case's requests use.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Paths {
    /// `GET` of the same URL (hits, once warm).
    Same,
    /// `GET` of a new path every request: always a miss.
    Unique,
    /// `PATCH` of a new path every request: every response clears its tags.
    UniquePatch,
}

/// How a case's requests are made, and whose CPU is counted with ours.
#[derive(Clone, Copy)]
struct How<'a> {
    paths: Paths,
    /// Request headers, as wrk's `-H` takes them.
    headers: &'static [&'static str],
    valkey_pid: Option<&'a str>,
}

/// Runs wrk against `url` with the requests `paths` says.
/// `valkey_pid` names the store's process, whose CPU per request is reported with ours.
/// `warm` runs a 1 s warm-up first.
fn wrk(name: &'static str, url: &str, secs: u64, how: How, warm: bool) -> Row {
    let How {
        paths,
        headers,
        valkey_pid,
    } = how;
    let run = |secs: u64| {
        let mut cmd = Command::new("wrk");
        cmd.args(["-t1", "-c50", &format!("-d{secs}s"), "--latency"]);
        for h in headers {
            cmd.args(["-H", h]);
        }
        // wrk seeds its random numbers the same way every run: a run id keeps every run's
        // paths apart, so a miss case never meets what an earlier run (a warm-up, an earlier
        // round) stored.
        static RUN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let run_id = format!(
            "{}x{}",
            std::process::id(),
            RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let script = std::env::temp_dir().join(format!("tca-unique-{run_id}.lua"));
        if paths != Paths::Same {
            let method = if paths == Paths::UniquePatch {
                "'PATCH'"
            } else {
                "nil"
            };
            let lua = format!(
                "local n = 0\nrequest = function()\n  n = n + 1\n  return wrk.format({method}, wrk.path .. '{run_id}-' .. n)\nend\n"
            );
            std::fs::write(&script, lua).unwrap();
            cmd.arg("-s").arg(&script);
        }
        cmd.arg(url).stderr(Stdio::null());
        let out = cmd.output().expect("wrk (scripts/load installs it)");
        let _ = std::fs::remove_file(&script);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    if warm {
        run(1); // warm up connections, caches and the CPU's branch predictors
    }
    let (ours0, valkey0) = (cpu_secs("self"), valkey_pid.map_or(0.0, cpu_secs));
    let wrk0 = children_cpu_secs();
    let text = run(secs);
    let wrk1 = children_cpu_secs();
    let (ours1, valkey1) = (cpu_secs("self"), valkey_pid.map_or(0.0, cpu_secs));
    let requests: f64 = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let cpu_us = valkey_pid.filter(|_| requests > 0.0).map(|_| {
        (
            (ours1 - ours0) * 1e6 / requests,
            (valkey1 - valkey0) * 1e6 / requests,
        )
    });
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    let pct = |p: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(p).map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| "?".into())
    };
    let errors = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    if let Some(e) = errors {
        eprintln!("{name}: {}", e.trim());
    }
    let wrk_us = (requests > 0.0).then(|| (wrk1 - wrk0) * 1e6 / requests);
    Row {
        name,
        rps,
        p50: pct("50%"),
        p99: pct("99%"),
        cpu_us,
        wrk_us,
    }
}

fn varnish(backend: SocketAddr) -> Option<(std::process::Child, SocketAddr, std::path::PathBuf)> {
    let (varnishd, port) = installed(["/usr/sbin/varnishd", "/usr/bin/varnishd"])?;
    let dir = std::env::temp_dir().join(format!("tca-varnish-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let vcl = dir.join("bench.vcl");
    std::fs::write(
        &vcl,
        format!(
            "vcl 4.1;\nbackend default {{ .host = \"127.0.0.1\"; .port = \"{}\"; }}\nsub vcl_backend_response {{ set beresp.ttl = 300s; }}\n",
            backend.port()
        ),
    )
    .ok()?;
    let child = Command::new(varnishd)
        .args(["-F", "-a", &format!("127.0.0.1:{port}"), "-f"])
        .arg(&vcl)
        .args(["-s", "malloc,64m", "-n"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    listening(child, port, dir)
}

/// nginx with `proxy_cache` in front of `backend`, every response kept 300 s (a reference:
/// on this kind of machine the faster of the two proxies).
fn nginx(backend: SocketAddr) -> Option<(std::process::Child, SocketAddr, std::path::PathBuf)> {
    let (nginx, port) = installed(["/usr/sbin/nginx", "/usr/bin/nginx"])?;
    let dir = std::env::temp_dir().join(format!("tca-nginx-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("cache")).ok()?;
    let d = dir.display();
    let conf = format!(
        "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           proxy_cache_path {d}/cache keys_zone=bench:8m max_size=64m;\n\
           upstream app {{ server 127.0.0.1:{}; keepalive 32; }}\n\
           server {{\n    listen 127.0.0.1:{port};\n    location / {{\n\
               proxy_pass http://app;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n\
               proxy_cache bench;\n      proxy_cache_valid 200 300s;\n    }}\n  }}\n}}\n",
        backend.port()
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).ok()?;
    let child = Command::new(nginx)
        .arg("-c")
        .arg(&conf_path)
        .arg("-p")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    listening(child, port, dir)
}

/// The first of `paths` that exists, and a free loopback port for it to listen on.
fn installed(paths: [&'static str; 2]) -> Option<(&'static str, u16)> {
    let path = paths
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    Some((path, port))
}

/// A proxy started on `port`, once it accepts connections (5 s at most).
fn listening(
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
) -> Option<(std::process::Child, SocketAddr, std::path::PathBuf)> {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().ok()?;
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Some((child, addr, dir));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("load benchmark: run it with `scripts/load` or `cargo bench --bench load`");
        return;
    }
    let secs: u64 = std::env::var("LOAD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let rounds: usize = std::env::var("LOAD_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let valkey = server::Server::start(server::Kind::Valkey);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let url = valkey.url();
    let valkey_pid = valkey.pid();

    let backend = DelayLine::start();
    let valkey_store = || {
        ValkeyStore::builder()
            .url(url.as_str())
            .client_tracking(std::env::var("LOAD_CLIENT_TRACKING").as_deref() != Ok("0"))
            .build()
            .unwrap()
    };
    // The miss cases must miss: their stats are checked after the runs.
    let (slow, slow_stats) = cached_with_stats(slow_app(None), valkey_store());
    let (backed, backed_stats) = cached_with_stats(slow_app(Some(backend.clone())), valkey_store());
    let mut miss_servers = [Some(slow), Some(backed)];
    let (addrs, _guard) = rt.block_on(async {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("SET")
            .arg("raw")
            .arg(vec![b'x'; BODY])
            .query_async(&mut conn)
            .await
            .unwrap();
        let raw_conn = conn.clone();
        let raw = Router::new().route(
            "/static",
            get(move || {
                let mut c = raw_conn.clone();
                async move {
                    Bytes::from(
                        redis::cmd("GET")
                            .arg("raw")
                            .query_async::<Vec<u8>>(&mut c)
                            .await
                            .unwrap(),
                    )
                }
            }),
        );
        let pool = bb8_redis::bb8::Pool::builder()
            .max_size(50)
            .build(bb8_redis::RedisConnectionManager::new(url.as_str()).unwrap())
            .await
            .unwrap();
        let bb8_default = Router::new().route(
            "/static",
            get(move || {
                let pool = pool.clone();
                async move {
                    let mut c = pool.get().await.unwrap();
                    Bytes::from(
                        redis::cmd("GET")
                            .arg("raw")
                            .query_async::<Vec<u8>>(&mut *c)
                            .await
                            .unwrap(),
                    )
                }
            }),
        );
        let tiered = TieredStore::new(MemoryStore::new(64 << 20), valkey_store());
        let addrs = [
            serve(static_app()).await,
            serve(raw).await,
            serve(bb8_default).await,
            serve(cached(static_app(), valkey_store())).await,
            serve(cached(static_app(), tiered.clone())).await,
            serve(cached(static_app(), MemoryStore::new(64 << 20))).await,
            serve(slow_app(None)).await,
            serve(miss_servers[0].take().unwrap()).await,
            serve(slow_app(Some(backend.clone()))).await,
            serve(miss_servers[1].take().unwrap()).await,
            serve(patch_app()).await,
            serve(clearing(valkey_store())).await,
            serve(json_cached(MemoryStore::new(64 << 20), false)).await,
            serve(json_cached(MemoryStore::new(64 << 20), true)).await,
            serve(
                json_cached(MemoryStore::new(64 << 20), false)
                    .layer(tower_http::compression::CompressionLayer::new().gzip(true)),
            )
            .await,
        ];
        for a in &addrs[12..15] {
            for _ in 0..3 {
                raw_get(*a, "/json").await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Warm the cached routes (and let the near tier's subscription come up).
        for a in &addrs[3..6] {
            for _ in 0..3 {
                raw_get(*a, "/static").await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // The two floors: a hit's very headers (taken from a near-cache hit) with no cache
        // work; one raw lookup round trip before the 1 ms backend.
        let hit_headers = |headers: Vec<(String, String)>| {
            assert!(
                headers
                    .iter()
                    .any(|(n, v)| n == "cache-status" && v.contains("hit")),
                "the cache answers a hit: {headers:?}"
            );
            headers
        };
        let near_hit = hit_headers(raw_get(addrs[4], "/static").await);
        let valkey_hit = hit_headers(raw_get(addrs[3], "/static").await);
        // The one header a cache must send (`Age`, RFC 9111 §4) and the standard status.
        let required: Vec<(String, String)> = near_hit
            .iter()
            .filter(|(n, _)| n != "etag" && n != "x-cache")
            .cloned()
            .collect();
        let outside = serve_outside_router(
            static_app(),
            TieredStore::new(MemoryStore::new(64 << 20), valkey_store()),
        )
        .await;
        for _ in 0..3 {
            raw_get(outside, "/static").await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let floors = [
            serve(hit_headers_app(near_hit)).await,
            serve(lookup_then_backend(conn.clone(), backend.clone())).await,
            serve(raw_get_with_hit_headers(conn.clone(), valkey_hit)).await,
            serve(hit_headers_app(required)).await,
            outside,
        ];
        ((addrs, floors), tiered)
    });
    let (addrs, floors) = addrs;
    let v = varnish(addrs[0]);
    let n = nginx(addrs[0]);

    // LOAD_ONLY=1,3 runs just those cases (by index in the table), for A/B comparisons.
    let only: Option<Vec<usize>> = std::env::var("LOAD_ONLY")
        .ok()
        .map(|v| v.split(',').filter_map(|i| i.trim().parse().ok()).collect());
    let wanted = |i: usize| only.as_ref().is_none_or(|o| o.contains(&i));
    let cases: [(&'static str, String, Paths); 12] = [
        (
            "bare axum handler (static 1 KiB)",
            format!("http://{}/static", addrs[0]),
            Paths::Same,
        ),
        (
            "handler + raw Valkey GET (multiplexed)",
            format!("http://{}/static", addrs[1]),
            Paths::Same,
        ),
        (
            "handler + bb8-redis default (PING/checkout)",
            format!("http://{}/static", addrs[2]),
            Paths::Same,
        ),
        (
            "CacheLayer hit, ValkeyStore",
            format!("http://{}/static", addrs[3]),
            Paths::Same,
        ),
        (
            "CacheLayer hit, TieredStore (near)",
            format!("http://{}/static", addrs[4]),
            Paths::Same,
        ),
        (
            "CacheLayer hit, MemoryStore",
            format!("http://{}/static", addrs[5]),
            Paths::Same,
        ),
        (
            "handler sleeping 1 ms, no cache",
            format!("http://{}/slow/", addrs[6]),
            Paths::Unique,
        ),
        (
            "CacheLayer miss + fill over the 1 ms handler",
            format!("http://{}/slow/", addrs[7]),
            Paths::Unique,
        ),
        (
            "handler awaiting a 1 ms backend, no cache",
            format!("http://{}/slow/", addrs[8]),
            Paths::Unique,
        ),
        (
            "CacheLayer miss + fill over the 1 ms backend",
            format!("http://{}/slow/", addrs[9]),
            Paths::Unique,
        ),
        (
            "PATCH handler, no cache",
            format!("http://{}/things/", addrs[10]),
            Paths::UniquePatch,
        ),
        (
            "PATCH + InvalidateLayer: one clear (3 tags) per request",
            format!("http://{}/things/", addrs[11]),
            Paths::UniquePatch,
        ),
    ];
    // Every case runs ROUNDS times, round-robin, and reports its median round: this
    // machine's speed drifts over a minute, and interleaving keeps the drift out of the
    // ratios between cases.
    let mut cases: Vec<(&'static str, String, How)> = cases
        .into_iter()
        .map(|(name, url, paths)| {
            let how = How {
                paths,
                headers: &[],
                valkey_pid: Some(valkey_pid.as_str()),
            };
            (name, url, how)
        })
        .collect();
    let same = |headers| How {
        paths: Paths::Same,
        headers,
        valkey_pid: None,
    };
    if let Some((_, addr, _)) = v.as_ref() {
        let url = format!("http://{addr}/static");
        let name = "Varnish 7 hit in front of the bare handler";
        cases.push((name, url, same(&[])));
    } else {
        cases.push(("Varnish 7 (not installed)", String::new(), same(&[])));
    }
    // Issue 12's rows: a 16 KiB JSON body from a MemoryStore, so the layer's own work shows.
    let json = |i: usize| format!("http://{}/json", addrs[i]);
    cases.extend([
        ("16 KiB JSON hit, MemoryStore", json(12), same(&[])),
        (
            "16 KiB JSON hit answered 304 (If-None-Match)",
            json(12),
            same(&["If-None-Match: \"j1\""]),
        ),
        (
            "16 KiB JSON hit, stored gzip sent as is",
            json(13),
            same(&["Accept-Encoding: gzip"]),
        ),
        (
            "16 KiB JSON hit + tower-http CompressionLayer (gzip per hit)",
            json(14),
            same(&["Accept-Encoding: gzip"]),
        ),
    ]);
    // 17: nginx, a reference beside Varnish.
    match n.as_ref() {
        Some((_, addr, _)) => cases.push((
            "nginx 1.22 proxy_cache hit in front of the bare handler",
            format!("http://{addr}/static"),
            same(&[]),
        )),
        None => cases.push(("nginx (not installed)", String::new(), same(&[]))),
    }
    // 18-21: the floors under a hit, a miss, a Valkey hit and a hit with only `Age` and
    // `Cache-Status` (see `hit_headers_app`, `lookup_then_backend` and
    // `raw_get_with_hit_headers`); 22: the near cache with the layer around the Router.
    let extra: [(&'static str, &str, Paths); 5] = [
        (
            "floor: bare handler sending a hit's headers (no cache work)",
            "static",
            Paths::Same,
        ),
        (
            "floor: one raw Valkey GET, then the 1 ms backend (no cache)",
            "slow/",
            Paths::Unique,
        ),
        (
            "floor: raw Valkey GET handler sending a hit's headers (no cache work)",
            "static",
            Paths::Same,
        ),
        (
            "floor: bare handler sending only a hit's Age and Cache-Status",
            "static",
            Paths::Same,
        ),
        (
            "CacheLayer hit, TieredStore (near), layer around the Router",
            "static",
            Paths::Same,
        ),
    ];
    for ((name, path, paths), addr) in extra.into_iter().zip(floors) {
        let how = How {
            paths,
            headers: &[],
            valkey_pid: Some(valkey_pid.as_str()),
        };
        cases.push((name, format!("http://{addr}/{path}"), how));
    }
    let mut samples: Vec<Vec<Row>> = cases.iter().map(|_| Vec::new()).collect();
    // The cases a ratio compares run back to back (each floor beside its baseline), and
    // every other round runs backwards: this machine's drift over a round then falls on
    // both sides of a ratio alike.
    let mut order: Vec<usize> = vec![0, 18, 21, 4, 22, 5, 12, 17, 1, 20, 3, 2, 6, 7, 8, 19, 9];
    let rest: Vec<usize> = (0..cases.len()).filter(|i| !order.contains(i)).collect();
    order.extend(rest);
    for round in 0..rounds {
        let mut this_round = order.clone();
        if round % 2 == 1 {
            this_round.reverse();
        }
        for i in this_round {
            let (name, url, how) = &cases[i];
            if wanted(i) && !url.is_empty() {
                samples[i].push(wrk(name, url, secs, *how, round == 0));
            }
        }
    }
    for stats in [&slow_stats, &backed_stats] {
        let s = stats.snapshot();
        assert_eq!(
            s.hits + s.collapsed,
            0,
            "a miss case was answered from the cache: {s:?}"
        );
    }
    // Each round's req/s per case, in round order, before `median` sorts them: a ratio is
    // also taken within each round (its two cases ran seconds apart), and its median and
    // range shown beside the ratio of the medians, since this machine's speed drifts.
    let per_round: Vec<Vec<f64>> = samples
        .iter()
        .map(|runs| runs.iter().map(|r| r.rps).collect())
        .collect();
    let rows: Vec<Row> = cases
        .iter()
        .zip(samples)
        .map(|((name, ..), mut runs)| median(name, &mut runs))
        .collect();
    for (mut child, _, dir) in [v, n].into_iter().flatten() {
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(dir);
    }

    println!(
        "\n| case | req/s | p50 | p99 | CPU µs/req: server, Valkey | wrk |\n|---|---:|---:|---:|---:|---:|"
    );
    for r in &rows {
        let cpu = r
            .cpu_us
            .map_or_else(|| "-".to_owned(), |(s, v)| format!("{s:.1}, {v:.1}"));
        let wrk = r
            .wrk_us
            .map_or_else(|| "-".to_owned(), |w| format!("{w:.1}"));
        println!(
            "| {} | {:.0} | {} | {} | {cpu} | {wrk} |",
            r.name, r.rps, r.p50, r.p99
        );
    }
    let rps = |i: usize| rows.get(i).map_or(f64::NAN, |r| r.rps);
    println!(
        "\n| target | of the medians | per round: median (range), judged | goal |\n|---|---:|---:|---:|"
    );
    // `a` over `b`, by case index.
    let ratio = |what: &str, a: usize, b: usize, goal: f64| {
        let r = rps(a) / rps(b);
        let mut each: Vec<f64> = match (per_round.get(a), per_round.get(b)) {
            (Some(x), Some(y)) => x.iter().zip(y).map(|(x, y)| x / y).collect(),
            _ => Vec::new(),
        };
        each.sort_by(f64::total_cmp);
        let paired = match (each.first(), each.last()) {
            (Some(lo), Some(hi)) => format!("{:.2} ({lo:.2}–{hi:.2})", each[each.len() / 2]),
            _ => "-".to_owned(),
        };
        // Judged by the rounds' median once there are three or more: one case's slow
        // round cannot then decide it either way.
        let judged = if each.len() >= 3 {
            each[each.len() / 2]
        } else {
            r
        };
        let verdict = if judged.is_nan() {
            "n/a"
        } else if judged >= goal {
            "met"
        } else {
            "missed"
        };
        println!("| {what} | {r:.2} | {paired} | ≥ {goal:.2} ({verdict}) |");
    };
    // (what, a, over b, goal); a goal of 0 marks a reference row. The floors' own ratios,
    // and ours over them, show what the targets leave to the layer.
    let targets: [(&str, usize, usize, f64); 21] = [
        ("Valkey hit / raw multiplexed GET", 3, 1, 0.95),
        ("Valkey hit / Varnish hit", 3, 12, 1.0),
        ("Valkey hit / nginx hit (for reference)", 3, 17, 0.0),
        ("near-cache hit / bare handler", 4, 0, 0.90),
        ("near-cache hit / Varnish hit", 4, 12, 1.5),
        ("miss + fill / 1 ms backend alone", 9, 8, 0.90),
        (
            "floor: a hit's headers / bare handler (for reference)",
            18,
            0,
            0.0,
        ),
        (
            "floor: raw GET + a hit's headers / raw GET (for reference)",
            20,
            1,
            0.0,
        ),
        ("Valkey hit / that floor (for reference)", 3, 20, 0.0),
        ("near-cache hit / that floor (for reference)", 4, 18, 0.0),
        (
            "floor: one GET + 1 ms backend / backend alone (for reference)",
            19,
            8,
            0.0,
        ),
        ("miss + fill / that floor (for reference)", 9, 19, 0.0),
        (
            "floor: a hit's headers / Varnish hit (for reference)",
            18,
            12,
            0.0,
        ),
        (
            "floor: Age and Cache-Status only / bare handler (for reference)",
            21,
            0,
            0.0,
        ),
        (
            "near hit, layer around the Router / bare handler",
            22,
            0,
            0.90,
        ),
        (
            "near hit, layer around the Router / Varnish hit",
            22,
            12,
            1.5,
        ),
        (
            "near hit, layer around the Router / its floor (for reference)",
            22,
            18,
            0.0,
        ),
        (
            "miss + fill / 1 ms tokio sleep alone (timer-quantized)",
            7,
            6,
            0.95,
        ),
        (
            "bb8 default / raw multiplexed GET (for reference)",
            2,
            1,
            0.0,
        ),
        (
            "PATCH with its clear / PATCH alone (for reference)",
            11,
            10,
            0.0,
        ),
        ("304 hit / full 16 KiB hit (for reference)", 14, 13, 0.0),
    ];
    for (what, a, b, goal) in targets {
        ratio(what, a, b, goal);
    }
    ratio(
        "stored gzip hit / CompressionLayer gzip per hit",
        15,
        16,
        5.0,
    );
    println!(
        "\nclears per second through InvalidateLayer: {:.0}",
        rps(11)
    );
    rt.block_on(entry_bytes(&url));

    // Memory: a 64 MiB near cache after a million distinct 1 KiB entries.
    if !wanted(23) {
        return;
    }
    rt.block_on(async {
        use tower_cache_aside::{EntryKey, store::{Fill, Store}};
        const BUDGET: u64 = 64 << 20;
        let before = rss_bytes();
        let store = MemoryStore::new(BUDGET);
        let fence = store.lookup(&EntryKey::new("load", [0; 32])).await.unwrap().fence;
        for i in 0..1_000_000u64 {
            // A buffer of its own per entry, as real responses have.
            let value = Bytes::from(vec![(i % 251) as u8; BODY]);
            let mut digest = [0u8; 32];
            digest[..8].copy_from_slice(&i.to_le_bytes());
            let tags = vec![format!("t:{}", i % 1000)];
            let fill = Fill::new(EntryKey::new("load", digest), value, Duration::from_secs(300), tags, fence);
            store.fill(fill).await.unwrap();
        }
        let entries = store.entry_count();
        let counted = store.weighted_size();
        let after = rss_bytes();
        println!(
            "\nnear cache of {} MiB after 1,000,000 distinct 1 KiB keys: {} entries, {:.1} MiB counted, \
             process RSS grew {:.1} MiB ({:+.1} MiB over the budget)",
            BUDGET >> 20,
            entries,
            counted as f64 / 1048576.0,
            after.saturating_sub(before) as f64 / 1048576.0,
            (after.saturating_sub(before) as f64 - BUDGET as f64) / 1048576.0
        );
    });
    drop(valkey);
}

/// Bytes one 16 KiB JSON entry takes in Valkey (`MEMORY USAGE`), with and without stored
/// compression.
async fn entry_bytes(url: &str) {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut sizes = Vec::new();
    for (namespace, compress) in [("bytes-plain", false), ("bytes-gzip", true)] {
        let store = ValkeyStore::builder()
            .url(url)
            .namespace(namespace)
            .build()
            .unwrap();
        let addr = serve(json_cached(store, compress)).await;
        raw_get(addr, "/json").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{namespace}:*:e:*"))
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut bytes = 0u64;
        for key in &keys {
            let used: Option<u64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            bytes += used.unwrap_or(0);
        }
        sizes.push((keys.len(), bytes));
    }
    println!(
        "\none 16 KiB JSON entry in Valkey: {} bytes stored as is, {} bytes with stored gzip ({} and {} keys)",
        sizes[0].1, sizes[1].1, sizes[0].0, sizes[1].0
    );
}

/// A minimal HTTP/1.1 GET over a raw socket (the benchmark needs no HTTP client crate);
/// the response's header lines (status line, `Date`, `Connection` and `Content-Length`
/// left out), as `(name, value)`.
async fn raw_get(addr: SocketAddr, path: &str) -> Vec<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    head.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .filter(|(n, _)| !matches!(n.as_str(), "date" | "connection" | "content-length"))
        .collect()
}

/// The floor under a hit: a handler answering the bare handler's body with the very
/// header lines a cached hit carries (`Age`, `ETag`, `Cache-Status`, ...), doing no cache
/// work at all. What a hit costs beyond it is the layer's own work; what it costs over the
/// bare handler, the bytes and lines of those headers (for the server and for wrk).
fn hit_headers_app(headers: Vec<(String, String)>) -> Router {
    let (b, map) = (body(), header_map(headers));
    Router::new().route(
        "/static",
        get(move || {
            let res = with_headers(&map, b.clone());
            async move { res }
        }),
    )
}

/// The floor under a Valkey hit: the raw multiplexed `GET` handler sending a hit's
/// header lines (see `hit_headers_app`).
fn raw_get_with_hit_headers(
    conn: redis::aio::MultiplexedConnection,
    headers: Vec<(String, String)>,
) -> Router {
    let map = header_map(headers);
    Router::new().route(
        "/static",
        get(move || {
            let (mut c, map) = (conn.clone(), map.clone());
            async move {
                let value: Vec<u8> = redis::cmd("GET")
                    .arg("raw")
                    .query_async(&mut c)
                    .await
                    .unwrap();
                with_headers(&map, Bytes::from(value))
            }
        }),
    )
}

/// The header lines as a map to clone per response: names and values leaked once, so
/// that a clone touches no reference count (the floor should cost as little as it can).
fn header_map(headers: Vec<(String, String)>) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    for (n, v) in headers {
        let name: &'static str = Box::leak(n.into_boxed_str());
        let value: &'static str = Box::leak(v.into_boxed_str());
        map.append(
            http::HeaderName::from_static(name),
            http::HeaderValue::from_static(value),
        );
    }
    map
}

/// A response with these headers and body, built as the layer builds a hit's (the map set
/// whole, nothing merged into a default one).
fn with_headers(map: &http::HeaderMap, body: Bytes) -> axum::response::Response {
    let mut res = axum::response::Response::new(axum::body::Body::from(body));
    *res.headers_mut() = map.clone();
    res
}

/// The floor under a miss: a handler that makes one multiplexed Valkey `GET` (of a key
/// that is not there, as a cache-aside lookup of a new URL does) before awaiting the 1 ms
/// backend. Any cache-aside layer pays that round trip before the origin.
fn lookup_then_backend(conn: redis::aio::MultiplexedConnection, backend: DelayLine) -> Router {
    let b = body();
    Router::new().route(
        "/slow/{n}",
        get(move |Path(n): Path<String>| {
            let (b, backend, mut c) = (b.clone(), backend.clone(), conn.clone());
            async move {
                let found: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(format!("absent:{n}"))
                    .query_async(&mut c)
                    .await
                    .unwrap();
                assert!(found.is_none());
                backend.wait(Duration::from_millis(1)).await;
                b
            }
        }),
    )
}
