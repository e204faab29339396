//! The isolation property: no response ever reaches a request whose own inputs would have
//! produced a different one. Random sequences of requests from random users (with random
//! credentials), hosts in any case, spellings of paths and queries, `Vary` values, GET and
//! HEAD, over routes of every scope, against an origin that echoes every input it depends
//! on. On every store, the near tier in front of Valkey included (proptest shrinks a
//! failing sequence to a short one).

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query};
use axum::http::{HeaderMap, Request};
use axum::routing::get;
use axum::Router;
use proptest::prelude::*;
use support::*;
use tower_cache_aside::{
    store::{MemoryStore, Store},
    CacheLayer, RoutePolicy, RouteTable, Scope,
};

const ROUTES: [&str; 4] = ["shared", "public", "user", "lang"];
const IDS: [&str; 3] = ["a", "b", "a@b"];
const HOSTS: [&str; 3] = ["a.test", "A.Test", "b.test"];
const USERS: [&str; 3] = ["", "alice", "bob"];
const QUERIES: [&str; 6] = ["", "?x=1&y=2", "?y=2&x=1", "?x=1&x=2", "?x=2&x=1", "?y=2"];
const LANGS: [&str; 3] = ["", "en", "de"];

#[derive(Clone, Debug)]
struct Req {
    route: usize,
    id: usize,
    /// 0: as is; 1: every character percent-encoded; 2: the same in lower-case hex.
    spelling: usize,
    user: usize,
    /// The user is named by `Authorization: Bearer` (true) or a session cookie.
    bearer: bool,
    host: usize,
    query: usize,
    lang: usize,
    head: bool,
}

/// A few base requests, then a sequence that repeats them, each time maybe changing one
/// input: the same key meets different inputs often, which is where isolation can break.
fn requests() -> impl Strategy<Value = Vec<Req>> {
    let pool = prop::collection::vec(one_request(), 1..6);
    let steps = prop::collection::vec((any::<prop::sample::Index>(), 0..8usize, 0..6usize), 1..60);
    (pool, steps).prop_map(|(pool, steps)| {
        steps
            .into_iter()
            .map(|(pick, change, value)| {
                let mut r = pick.get(&pool).clone();
                match change {
                    0 => r.spelling = value % 3,
                    1 => r.host = value % HOSTS.len(),
                    2 => r.query = value % QUERIES.len(),
                    3 => r.user = value % USERS.len(),
                    4 => r.bearer = value % 2 == 0,
                    5 => r.lang = value % LANGS.len(),
                    6 => r.head = value == 0,
                    _ => {} // unchanged: a repeat, a likely hit
                }
                r
            })
            .collect()
    })
}

fn one_request() -> impl Strategy<Value = Req> {
    (
        0..ROUTES.len(),
        0..IDS.len(),
        0..3usize,
        0..USERS.len(),
        any::<bool>(),
        0..HOSTS.len(),
        0..QUERIES.len(),
        0..LANGS.len(),
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(route, id, spelling, user, bearer, host, query, lang, head)| Req {
                route,
                id,
                spelling,
                user,
                bearer,
                host,
                query,
                lang,
                head,
            },
        )
}

impl Req {
    fn uri(&self) -> String {
        let id = IDS[self.id];
        let spelled: String = match self.spelling {
            0 => id.to_owned(),
            1 => id.bytes().map(|b| format!("%{b:02X}")).collect(),
            _ => id.bytes().map(|b| format!("%{b:02x}")).collect(),
        };
        format!("/{}/{spelled}{}", ROUTES[self.route], QUERIES[self.query])
    }

    fn request(&self) -> Request<axum::body::Body> {
        let mut b = Request::builder()
            .method(if self.head { "HEAD" } else { "GET" })
            .uri(self.uri())
            .header("host", HOSTS[self.host]);
        let user = USERS[self.user];
        if !user.is_empty() {
            b = if self.bearer {
                b.header("authorization", format!("Bearer {user}"))
            } else {
                b.header("cookie", format!("session={user}"))
            };
        }
        if !LANGS[self.lang].is_empty() {
            b = b.header("accept-language", LANGS[self.lang]);
        }
        b.body(axum::body::Body::empty()).unwrap()
    }

    /// What the origin answers this request, from its own inputs only.
    fn expected(&self) -> String {
        let query = QUERIES[self.query].trim_start_matches('?');
        let pairs: Vec<(String, String)> = if query.is_empty() {
            vec![]
        } else {
            query
                .split('&')
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap();
                    (k.to_owned(), v.to_owned())
                })
                .collect()
        };
        echo(
            ROUTES[self.route],
            &HOSTS[self.host].to_ascii_lowercase(),
            IDS[self.id],
            pairs,
            LANGS[self.lang],
            USERS[self.user],
        )
    }
}

/// The origin's answer: every input the route's handler depends on, and nothing else (a
/// shared route does not read the language it did not declare, a public one not the user).
fn echo(
    route: &str,
    host: &str,
    id: &str,
    mut query: Vec<(String, String)>,
    lang: &str,
    user: &str,
) -> String {
    // Handlers read the query by name: the order of different names does not matter to
    // them, the order of repeated ones does.
    query.sort_by(|a, b| a.0.cmp(&b.0));
    let query: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let base = format!("{route}|{host}|{id}|{}", query.join("&"));
    match route {
        "public" => base,
        "lang" => format!("{base}|lang={lang}|user={user}"),
        _ => format!("{base}|user={user}"),
    }
}

fn user_of(headers: &HeaderMap) -> String {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let cookie = headers
        .get("cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("session="));
    bearer.or(cookie).unwrap_or_default().to_owned()
}

fn bearer_user(parts: &axum::http::request::Parts) -> Option<String> {
    let v = parts.headers.get("authorization")?.to_str().ok()?;
    v.strip_prefix("Bearer ").map(str::to_owned)
}

fn app<St: Store>(store: St) -> (Router, tower_cache_aside::CacheStats) {
    let ttl = || RoutePolicy::ttl(Duration::from_secs(60));
    let routes = RouteTable::new()
        .route("/shared/{id}", ttl())
        .route("/public/{id}", ttl().scope(Scope::Public))
        .route("/user/{id}", ttl().per_user(bearer_user))
        .route("/lang/{id}", ttl().vary(["accept-language"]));
    let cache = CacheLayer::new(store).routes(routes);
    let stats = cache.stats();
    let handler = |route: &'static str| {
        move |Path(id): Path<String>,
              Query(query): Query<Vec<(String, String)>>,
              headers: HeaderMap| async move {
            let host = headers
                .get("host")
                .and_then(|h| h.to_str().ok())
                .unwrap_or_default()
                .to_ascii_lowercase();
            let lang = headers
                .get("accept-language")
                .and_then(|h| h.to_str().ok())
                .unwrap_or_default();
            echo(route, &host, &id, query, lang, &user_of(&headers))
        }
    };
    let router = Router::new()
        .route("/shared/{id}", get(handler("shared")))
        .route("/public/{id}", get(handler("public")))
        .route("/user/{id}", get(handler("user")))
        .route("/lang/{id}", get(handler("lang")))
        .layer(cache);
    (router, stats)
}

/// Runs the property on stores made by `store` (a fresh one per case).
fn check<St: Store>(cases: u32, store: impl Fn() -> St) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let hits = AtomicU64::new(0);
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let result = runner.run(&requests(), |sequence| {
        let (router, stats) = runtime.block_on(async { app(store()) });
        runtime.block_on(async {
            for req in &sequence {
                let reply = send(&router, req.request()).await;
                prop_assert_eq!(reply.status.as_u16(), 200, "{:?}", req);
                if !req.head {
                    prop_assert_eq!(
                        reply.text(),
                        req.expected(),
                        "{:?} ({})",
                        req,
                        reply.cache_status()
                    );
                }
                // Let background fills land, so later requests meet stored entries.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok(())
        })?;
        hits.fetch_add(stats.snapshot().hits, Ordering::Relaxed);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let hits = hits.load(Ordering::Relaxed);
    eprintln!("{cases} sequences, {hits} hits");
    assert!(hits > 0, "the cache must have served hits");
}

#[test]
fn isolation_memory() {
    check(64, || MemoryStore::new(8 << 20));
}

/// Each case gets a namespace of its own on one server.
fn served(kind: Kind) {
    let server = Server::start(kind);
    let url = server.url();
    let n = Arc::new(AtomicU64::new(0));
    check(24, move || {
        tower_cache_aside::store::ValkeyStore::builder()
            .url(url.clone())
            .namespace(format!("iso{}", n.fetch_add(1, Ordering::Relaxed)))
            .operation_timeout(Duration::from_secs(1))
            .build()
            .unwrap()
    });
}

#[test]
fn isolation_tiered() {
    let server = Server::start(Kind::Valkey);
    let url = server.url();
    let n = AtomicU64::new(0);
    check(24, move || {
        let far = tower_cache_aside::store::ValkeyStore::builder()
            .url(url.clone())
            .namespace(format!("tiered{}", n.fetch_add(1, Ordering::Relaxed)))
            .operation_timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        tower_cache_aside::store::TieredStore::new(MemoryStore::new(8 << 20), far)
    });
}

#[test]
fn isolation_valkey() {
    served(Kind::Valkey);
}

#[test]
fn isolation_redis() {
    served(Kind::Redis);
}
