//! Stored compression on every store: one compressed entry serves every client in the best
//! coding it accepts (the stored gzip as it is, or the identity bytes, equal to the
//! original); `Vary`, `Content-Length` and each representation's `ETag` right; small bodies,
//! images and `no-transform` left alone; a handler's own gzip kept and negotiated the same
//! way; `Accept-Encoding` spellings never multiply entries.

#[macro_use]
mod support;

use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get as route_get;
use axum::Router;
use support::*;
use tower_cache_aside::store::Store;
use tower_cache_aside::{CacheLayer, CacheStats, Encoding, RoutePolicy, RouteTable};

/// 16 KiB of JSON, as an API list page would be.
fn json_body() -> String {
    let items: Vec<String> = (0..300)
        .map(|i| format!("{{\"id\":{i},\"name\":\"event number {i}\",\"tags\":[\"a\",\"b\"]}}"))
        .collect();
    format!("[{}]", items.join(","))
}

#[derive(Clone, Default)]
struct Origin {
    calls: Arc<AtomicUsize>,
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("valid gzip");
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    w.write_all(bytes).unwrap();
    w.finish().unwrap()
}

async fn json(State(o): State<Origin>) -> impl IntoResponse {
    o.calls.fetch_add(1, Ordering::SeqCst);
    (
        [("content-type", "application/json"), ("etag", "\"list-7\"")],
        json_body(),
    )
}

async fn small(State(o): State<Origin>) -> impl IntoResponse {
    o.calls.fetch_add(1, Ordering::SeqCst);
    ([("content-type", "application/json")], "{\"small\":true}")
}

async fn png(State(o): State<Origin>) -> impl IntoResponse {
    o.calls.fetch_add(1, Ordering::SeqCst);
    ([("content-type", "image/png")], vec![7u8; 4096])
}

async fn untransformed(State(o): State<Origin>) -> impl IntoResponse {
    o.calls.fetch_add(1, Ordering::SeqCst);
    (
        [
            ("content-type", "application/json"),
            ("cache-control", "max-age=60, no-transform"),
        ],
        json_body(),
    )
}

/// Compresses by itself for clients that take gzip, as many frameworks do.
async fn self_gzip(State(o): State<Origin>, headers: HeaderMap) -> axum::response::Response {
    o.calls.fetch_add(1, Ordering::SeqCst);
    let takes_gzip = headers
        .get("accept-encoding")
        .is_some_and(|v| v.to_str().unwrap().contains("gzip"));
    if takes_gzip {
        (
            [
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
                ("vary", "accept-encoding"),
            ],
            gzip(json_body().as_bytes()),
        )
            .into_response()
    } else {
        (
            [
                ("content-type", "application/json"),
                ("vary", "accept-encoding"),
            ],
            json_body(),
        )
            .into_response()
    }
}

fn app<St: Store>(store: St) -> (Router, Origin, CacheStats) {
    let min = || RoutePolicy::ttl(Duration::from_secs(60));
    let routes = RouteTable::new()
        .route("/json", min())
        .route("/small", min())
        .route("/png", min())
        .route("/untransformed", min())
        .route("/self-gzip", min())
        .route(
            "/plain-vary",
            min().compress(Encoding::Gzip).vary(["accept-encoding"]),
        );
    // Compression for every route, set before the table: the order does not matter.
    let cache = CacheLayer::new(store)
        .compress(Encoding::Gzip)
        .routes(routes);
    let origin = Origin::default();
    let router = Router::new()
        .route("/json", route_get(json))
        .route("/small", route_get(small))
        .route("/png", route_get(png))
        .route("/untransformed", route_get(untransformed))
        .route("/self-gzip", route_get(self_gzip))
        .route("/plain-vary", route_get(json))
        .with_state(origin.clone())
        .layer(cache.clone());
    (router, origin, cache.stats())
}

fn header<'a>(reply: &'a Reply, name: &str) -> Option<&'a str> {
    reply.headers.get(name).map(|v| v.to_str().unwrap())
}

fn varies_on_accept_encoding(reply: &Reply) -> bool {
    reply.headers.get_all("vary").iter().any(|v| {
        v.to_str()
            .unwrap()
            .to_ascii_lowercase()
            .contains("accept-encoding")
    })
}

mod cases {
    use super::*;

    pub async fn one_entry_serves_every_client_in_its_coding<St: Store>(store: St) {
        let (router, origin, stats) = app(store);
        let original = json_body();
        let first = get(&router, "/json").await;
        assert_eq!(
            first.text(),
            original,
            "the miss streams the handler's body"
        );
        assert!(varies_on_accept_encoding(&first));
        fills_reach(&stats, 1).await;
        for accept in ["gzip", "gzip, deflate, br", "br;q=1.0, GZIP;q=0.5", "*"] {
            let hit = get_with(&router, "/json", &[("accept-encoding", accept)]).await;
            assert_eq!(hit.x_cache(), "HIT", "{accept}");
            assert_eq!(header(&hit, "content-encoding"), Some("gzip"), "{accept}");
            assert_eq!(gunzip(&hit.body), original.as_bytes(), "{accept}");
            assert_eq!(
                header(&hit, "content-length"),
                Some(hit.body.len().to_string().as_str())
            );
            assert!(hit.body.len() < original.len() / 3, "it was compressed");
            assert_eq!(header(&hit, "etag"), Some("\"list-7-gzip\""));
            assert!(varies_on_accept_encoding(&hit));
        }
        for accept in [None, Some("identity"), Some("br"), Some("gzip;q=0")] {
            let headers: Vec<(&str, &str)> = accept
                .map(|a| vec![("accept-encoding", a)])
                .unwrap_or_default();
            let hit = get_with(&router, "/json", &headers).await;
            assert_eq!(hit.x_cache(), "HIT", "{accept:?}");
            // No Accept-Encoding: the identity bytes, as Varnish does (plain tools such as
            // curl without --compressed send none and cannot decode gzip).
            assert_eq!(header(&hit, "content-encoding"), None, "{accept:?}");
            assert_eq!(hit.text(), original, "identity bytes equal the original");
            assert_eq!(
                header(&hit, "content-length"),
                Some(original.len().to_string().as_str())
            );
            assert_eq!(header(&hit, "etag"), Some("\"list-7\""));
        }
        assert_eq!(origin.calls.load(Ordering::SeqCst), 1, "one entry for all");
        assert_eq!(stats.snapshot().fills, 1);
    }

    pub async fn validators_follow_the_representation<St: Store>(store: St) {
        let (router, _origin, stats) = app(store);
        get(&router, "/json").await;
        fills_reach(&stats, 1).await;
        let gz = get_with(
            &router,
            "/json",
            &[
                ("accept-encoding", "gzip"),
                ("if-none-match", "\"list-7-gzip\""),
            ],
        )
        .await;
        assert_eq!(gz.status, StatusCode::NOT_MODIFIED);
        assert_eq!(header(&gz, "etag"), Some("\"list-7-gzip\""));
        let plain = get_with(
            &router,
            "/json",
            &[
                ("accept-encoding", "identity"),
                ("if-none-match", "\"list-7\""),
            ],
        )
        .await;
        assert_eq!(plain.status, StatusCode::NOT_MODIFIED);
        // The identity tag does not validate the gzip bytes.
        let crossed = get_with(
            &router,
            "/json",
            &[("accept-encoding", "gzip"), ("if-none-match", "\"list-7\"")],
        )
        .await;
        assert_eq!(crossed.status, StatusCode::OK);
    }

    pub async fn small_bodies_images_and_no_transform_are_left_alone<St: Store>(store: St) {
        let (router, _origin, stats) = app(store);
        for (i, uri) in ["/small", "/png", "/untransformed"].into_iter().enumerate() {
            get(&router, uri).await;
            fills_reach(&stats, i as u64 + 1).await;
            let hit = get_with(&router, uri, &[("accept-encoding", "gzip")]).await;
            assert_eq!(hit.x_cache(), "HIT", "{uri}");
            assert_eq!(header(&hit, "content-encoding"), None, "{uri}");
        }
    }

    pub async fn a_handlers_own_gzip_is_kept_and_negotiated<St: Store>(store: St) {
        let (router, origin, stats) = app(store);
        let first = get_with(&router, "/self-gzip", &[("accept-encoding", "gzip")]).await;
        assert_eq!(header(&first, "content-encoding"), Some("gzip"));
        fills_reach(&stats, 1).await;
        let identity = get_with(&router, "/self-gzip", &[("accept-encoding", "identity")]).await;
        assert_eq!(identity.x_cache(), "HIT");
        assert_eq!(header(&identity, "content-encoding"), None);
        assert_eq!(identity.text(), json_body());
        let gz = get_with(&router, "/self-gzip", &[("accept-encoding", "gzip, br")]).await;
        assert_eq!(gz.x_cache(), "HIT");
        assert_eq!(gunzip(&gz.body), json_body().as_bytes());
        assert_eq!(origin.calls.load(Ordering::SeqCst), 1);
    }

    pub async fn accept_encoding_spellings_share_an_entry<St: Store>(store: St) {
        let (router, origin, stats) = app(store.clone());
        // Declared `vary(["accept-encoding"])` on a layer without compression: keyed by
        // the set of codings, not by the header's spelling.
        let routes = RouteTable::new().route(
            "/uncompressed",
            RoutePolicy::ttl(Duration::from_secs(60)).vary(["accept-encoding"]),
        );
        let plain = CacheLayer::new(store).routes(routes);
        let plain_stats = plain.stats();
        let uncompressed = Router::new()
            .route("/uncompressed", route_get(json))
            .with_state(origin.clone())
            .layer(plain);
        let router_plain = &uncompressed;
        get_with(
            router_plain,
            "/uncompressed",
            &[("accept-encoding", "gzip, br")],
        )
        .await;
        fills_reach(&plain_stats, 1).await;
        for accept in ["br,GZIP", "gzip;q=1.0, br", "br, gzip, gzip"] {
            let hit = get_with(
                router_plain,
                "/uncompressed",
                &[("accept-encoding", accept)],
            )
            .await;
            assert_eq!(hit.x_cache(), "HIT", "{accept}");
        }
        let other = get_with(
            router_plain,
            "/uncompressed",
            &[("accept-encoding", "gzip")],
        )
        .await;
        assert_eq!(other.x_cache(), "MISS", "another set of codings");
        // With compression the declared vary is dropped: one entry whatever the client.
        get_with(&router, "/plain-vary", &[("accept-encoding", "gzip")]).await;
        fills_reach(&stats, 1).await;
        let hit = get_with(&router, "/plain-vary", &[("accept-encoding", "identity")]).await;
        assert_eq!(hit.x_cache(), "HIT");
        assert_eq!(origin.calls.load(Ordering::SeqCst), 3);
    }
}

store_suite!(
    one_entry_serves_every_client_in_its_coding,
    validators_follow_the_representation,
    small_bodies_images_and_no_transform_are_left_alone,
    a_handlers_own_gzip_is_kept_and_negotiated,
    accept_encoding_spellings_share_an_entry,
);

/// Brotli stored: a client taking `br` gets the stored bytes, one taking only gzip gets
/// the identity bytes (one representation is kept, not one per coding).
#[cfg(feature = "brotli")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brotli_is_stored_and_undone_for_other_clients() {
    let routes = RouteTable::new().route(
        "/json",
        RoutePolicy::ttl(Duration::from_secs(60)).compress(Encoding::Brotli),
    );
    let cache = CacheLayer::new(tower_cache_aside::store::MemoryStore::new(1 << 24)).routes(routes);
    let stats = cache.stats();
    let router = Router::new()
        .route("/json", route_get(json))
        .with_state(Origin::default())
        .layer(cache);
    get(&router, "/json").await;
    fills_reach(&stats, 1).await;
    let br = get_with(&router, "/json", &[("accept-encoding", "gzip, br")]).await;
    assert_eq!(header(&br, "content-encoding"), Some("br"));
    let mut out = Vec::new();
    brotli::Decompressor::new(&br.body[..], 4096)
        .read_to_end(&mut out)
        .unwrap();
    assert_eq!(out, json_body().as_bytes());
    let gz_only = get_with(&router, "/json", &[("accept-encoding", "gzip")]).await;
    assert_eq!(header(&gz_only, "content-encoding"), None);
    assert_eq!(gz_only.text(), json_body());
}

/// A compressed entry is revalidated with the origin's own tag (not the `-gzip` one the
/// layer made), and the origin's 304 keeps it compressed, its coding, tag and `Vary` intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_entry_is_revalidated_with_the_origins_tag() {
    let seen: Arc<std::sync::Mutex<Vec<Option<String>>>> = Arc::default();
    let handler_seen = seen.clone();
    let handler = move |headers: HeaderMap| {
        let seen = handler_seen.clone();
        async move {
            let inm = headers
                .get("if-none-match")
                .map(|v| v.to_str().unwrap().to_owned());
            seen.lock().unwrap().push(inm.clone());
            if inm.as_deref() == Some("\"list-7\"") {
                return (StatusCode::NOT_MODIFIED, [("etag", "\"list-7\"")]).into_response();
            }
            (
                [("content-type", "application/json"), ("etag", "\"list-7\"")],
                json_body(),
            )
                .into_response()
        }
    };
    let routes = RouteTable::new().route(
        "/json",
        RoutePolicy::ttl(Duration::from_secs(1)).keep(Duration::from_secs(60)),
    );
    let cache = CacheLayer::new(tower_cache_aside::store::MemoryStore::new(1 << 24))
        .routes(routes)
        .compress(Encoding::Gzip);
    let stats = cache.stats();
    let router = Router::new()
        .route("/json", route_get(handler))
        .layer(cache);
    get(&router, "/json").await;
    fills_reach(&stats, 1).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reply = get_with(&router, "/json", &[("accept-encoding", "gzip")]).await;
    assert!(
        reply.cache_status().contains("fwd-status=304"),
        "{}",
        reply.cache_status()
    );
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        &[None, Some("\"list-7\"".to_owned())]
    );
    assert_eq!(header(&reply, "content-encoding"), Some("gzip"));
    assert_eq!(header(&reply, "etag"), Some("\"list-7-gzip\""));
    assert!(varies_on_accept_encoding(&reply));
    assert_eq!(gunzip(&reply.body), json_body().as_bytes());
    let plain = get(&router, "/json").await;
    assert_eq!(plain.text(), json_body());
    assert_eq!(header(&plain, "etag"), Some("\"list-7\""));
}
