//! The demo's page in a real browser: headless Chromium (Debian's `chromium`, which
//! `scripts/test` installs; `CHROMIUM` names another binary) loads `GET /` from the running
//! demo, runs its script, and the DOM it rendered is checked: the app's data, the cache
//! panel, and the panel catching up with traffic and an invalidation between two loads.

#[path = "../examples/demo/app.rs"]
mod app;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tower_cache_aside::{store::MemoryStore, CacheLayer};

fn chromium() -> String {
    let named = std::env::var("CHROMIUM").ok().filter(|c| !c.is_empty());
    let found = named.or_else(|| {
        ["chromium", "chromium-browser", "google-chrome"]
            .into_iter()
            .find(|c| {
                std::process::Command::new(c)
                    .arg("--version")
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .map(str::to_owned)
    });
    found.expect(
        "no Chromium: install Debian's `chromium` (scripts/test does) or set CHROMIUM to a binary",
    )
}

/// The DOM after the page ran for `ms` of virtual time.
async fn render(url: &str, ms: u32) -> String {
    let profile = std::env::temp_dir().join(format!(
        "tca-chromium-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    let mut cmd = tokio::process::Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .arg(format!("--virtual-time-budget={ms}"))
    .arg("--dump-dom")
    .arg(url)
    .kill_on_drop(true)
    .stderr(std::process::Stdio::null());
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("Chromium took over a minute")
        .expect("Chromium ran");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(out.status.success(), "Chromium failed: {:?}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    h.finish()
}

/// The text of the element with `id` (its first text node).
fn text_of(dom: &str, id: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let rest = &dom[at..];
    let open = rest.find('>').expect("a tag") + 1;
    let close = rest[open..].find('<').expect("an end");
    rest[open..open + close].trim().to_owned()
}

fn number(text: &str) -> u64 {
    let digits: String = text.chars().filter(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {text}"))
}

async fn get(client: &reqwest_like::Client, addr: SocketAddr, path: &str) {
    client.send(addr, "GET", path, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_data_and_a_panel_that_follows_the_cache() {
    let db = Arc::new(app::Db::create(app::Seed::SMALL).unwrap());
    let cache = CacheLayer::new(MemoryStore::new(16 << 20)).routes(app::cache_routes());
    let router = app::app(db, Some(cache), "memory");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let url = format!("http://{addr}/");

    // About three refreshes (every 1.5 s) of virtual time.
    let first = render(&url, 4_000).await;
    let updates = first
        .split("data-updates=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .map(number)
        .expect("the panel's update count");
    assert!(updates >= 2, "the panel refreshed {updates} times");
    // The app's data: events, servers, the signed-in user's dashboard.
    assert!(first.contains("event 500 on srv-"), "no events rendered");
    // (The script's own template has the same start, followed by `${`.)
    let servers = first
        .split("class=\"server status-")
        .skip(1)
        .filter(|rest| !rest.starts_with('$'))
        .count();
    assert_eq!(servers, 4, "4 servers");
    assert!(
        first.contains("X-Cache: <span class=\"x-HIT\">HIT</span>"),
        "no hit shown"
    );
    // The panel: the store, the hit rate, a row per route the page asked for.
    let store = text_of(&first, "store");
    assert!(
        store.starts_with("store: memory · ") && store.contains(" entries, "),
        "{store}"
    );
    assert!(
        text_of(&first, "hit-rate").ends_with('%'),
        "{}",
        text_of(&first, "hit-rate")
    );
    for route in ["dashboard_stats", "events", "servers"] {
        assert!(
            first.contains(&format!("data-route=\"{route}\"")),
            "no row for {route}"
        );
    }
    let hits_before = number(&text_of(&first, "hits"));

    // Traffic and a write between two loads: the panel shows both.
    let client = reqwest_like::Client;
    for _ in 0..20 {
        get(&client, addr, "/servers").await;
    }
    client
        .send(addr, "PATCH", "/events/7", Some(r#"{"status":"error"}"#))
        .await;
    let second = render(&url, 2_000).await;
    let hits_after = number(&text_of(&second, "hits"));
    assert!(
        hits_after >= hits_before + 20,
        "the panel did not follow: {hits_before} then {hits_after} hits"
    );
    assert!(second.contains("event:7"), "the invalidation is not listed");
}

/// A tiny HTTP/1.1 client over a socket (as user 1): enough for this test.
mod reqwest_like {
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub struct Client;

    impl Client {
        pub async fn send(&self, addr: SocketAddr, method: &str, path: &str, json: Option<&str>) {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let body = json.unwrap_or("");
            let req = format!(
                "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer 1\r\n\
                 content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = Vec::new();
            s.read_to_end(&mut out).await.unwrap();
            let head = String::from_utf8_lossy(&out);
            assert!(head.starts_with("HTTP/1.1 2"), "{method} {path}: {head}");
        }
    }
}
