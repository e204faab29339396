//! What this crate's own benchmarks and fuzz targets reach inside it. Not an API: hidden
//! from the docs, and it may change in any release.

/// The entry format, for this crate's own benchmarks (`benches/hot_path.rs`).
pub mod bench {
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    /// Encodes a 200 response with these headers, body and tags, as the store keeps it.
    pub fn encode_entry(headers: &HeaderMap, body: Bytes, tags: Vec<String>) -> Bytes {
        let lifetimes = crate::entry::Lifetimes::fresh_for(std::time::Duration::from_secs(300));
        let fence = crate::store::Fence::new(1, 1);
        let mut entry =
            crate::entry::Entry::new(StatusCode::OK, headers.clone(), fence, tags, lifetimes);
        entry.body = body;
        entry.encode()
    }

    /// A body compressed as a fill stores it (`None` when it would not shrink).
    pub fn compress(encoding: crate::Encoding, body: &[u8]) -> Option<Bytes> {
        encoding.compress(body)
    }

    /// A stored body decompressed as a hit for a client without its coding does.
    pub fn decompress(encoding: crate::Encoding, body: &[u8]) -> Option<Bytes> {
        encoding.decompress(body, 64 << 20)
    }

    /// Decodes an entry as a hit does; returns its body length and header count.
    pub fn decode_entry(encoded: Bytes) -> Option<(usize, usize)> {
        let entry = crate::entry::Entry::decode(encoded).ok()?;
        Some((entry.body.len(), entry.headers.len()))
    }
}

/// Entry points for this crate's fuzz targets (`fuzz/`): each takes untrusted input the
/// crate may meet (stored bytes, request parts, response headers, route configuration,
/// channel messages) and checks what must hold for any of it.
#[cfg(feature = "memory")]
pub mod fuzz {
    use bytes::Bytes;
    use http::{HeaderMap, HeaderName, HeaderValue};

    /// Stored bytes: an entry decodes or is refused, never panics, and what decodes encodes
    /// back to the same entry; a store stamp reads within bounds; a record of a hot key
    /// reads or is refused, and re-encodes to itself.
    pub fn stored(data: &[u8]) {
        use crate::entry::Entry;
        // A record of a hot key read back from the store: refused or read whole, and what
        // reads encodes back to itself.
        if let Some(r) = crate::engine::Recorded::decode(data) {
            let again = crate::engine::Recorded::decode(&r.encode());
            assert_eq!(again.as_ref(), Some(&r), "a read record re-encodes");
            let _ = r.request().body(());
        }
        let bytes = Bytes::copy_from_slice(data);
        let _ = Entry::decode(bytes.clone());
        if let Ok(e) = Entry::decode_with_tags(bytes.clone()) {
            let again = Entry::decode_with_tags(e.encode()).expect("a decoded entry re-encodes");
            assert_eq!(again.status, e.status);
            assert_eq!(again.headers, e.headers);
            assert_eq!(again.body, e.body);
            assert_eq!(again.trailers, e.trailers);
            assert_eq!(again.tags, e.tags);
            assert_eq!(again.fence, e.fence);
            let _ = (
                e.staleness(crate::entry::now_ms()),
                e.store_ttl(),
                e.age_secs(0),
            );
        }
        use crate::store::records::{Records, Stamp};
        if let Some((_, ids, start)) = Stamp::read(data) {
            assert!(start <= data.len());
            let _ = ids.iter().count();
        }
        let _ = Stamp::check(bytes, &Records::new(1, 8));
    }

    /// A request as it may arrive: the key derivation and the route match never panic, and
    /// tags made from it are valid.
    pub fn request(uri: &str, headers: &[(&[u8], &[u8])]) {
        let Ok(uri) = uri.parse::<http::Uri>() else {
            return;
        };
        let mut builder = http::Request::get(uri);
        for (name, value) in headers {
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
                builder = builder.header(n, v);
            }
        }
        let Ok(req) = builder.body(()) else { return };
        let (parts, ()) = req.into_parts();
        let routes = crate::RouteTable::new()
            .route(
                "/r/{id}",
                crate::RoutePolicy::ttl(std::time::Duration::from_secs(1))
                    .tags(["t:{id}"])
                    .vary(["accept-language"]),
            )
            .route(
                "/r/{id}/x/{*rest}",
                crate::RoutePolicy::ttl(std::time::Duration::from_secs(1))
                    .tags(["u:{id}", "v:{rest}"]),
            );
        let layer = crate::CacheLayer::new(crate::store::MemoryStore::new(1 << 16)).routes(routes);
        let _ = layer.entry_key(&parts);
        let matched = layer.engine.routes.find(parts.uri.path());
        for tag in matched.route.tags(&matched.params) {
            assert!(crate::tags::is_valid_tag(&tag), "{tag:?}");
        }
        let host = crate::tags::request_host(&parts.headers, &parts.uri);
        assert!(crate::tags::is_valid_tag(&crate::tags::uri_tag(
            host,
            parts.uri.path()
        )));
        let _ = crate::percent::normalize_path(parts.uri.path());
    }

    /// Response headers: the storage decision never panics, and a stored lifetime is within
    /// what an entry keeps.
    pub fn response(status: u16, headers: &[(&[u8], &[u8])]) {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
                map.append(n, v);
            }
        }
        let policy = crate::RoutePolicy::ttl(std::time::Duration::from_secs(60));
        if let crate::policy::Decision::Store {
            lifetime,
            stale_while_revalidate,
            stale_if_error,
            ..
        } = http::StatusCode::from_u16(status)
            .map(|status| crate::policy::decide(&policy, status, &map, None))
            .unwrap_or(crate::policy::Decision::Skip(
                crate::policy::Uncacheable::Status,
            ))
        {
            for d in [lifetime, stale_while_revalidate, stale_if_error] {
                let _ = crate::entry::clamped_ms(d);
            }
        }
        let mut tags = Vec::new();
        crate::tags::take_entry_tags(&mut map, &mut tags);
        crate::tags::invalidation_header_tags(&map, &mut tags);
        for tag in &tags {
            assert!(crate::tags::is_valid_tag(tag), "{tag:?}");
        }
        assert!(tags.len() <= 3 * crate::tags::MAX_TAGS_PER_RESPONSE);
    }

    /// Route configuration: a pattern and tag templates are accepted or refused with an
    /// error, never a panic.
    pub fn route(pattern: &str, templates: &[&str], path: &str) {
        let policy = crate::RoutePolicy::ttl(std::time::Duration::from_secs(1))
            .tags(templates.iter().copied());
        if let Ok(table) = crate::RouteTable::new().try_route(pattern, policy) {
            let matched = table.find(path);
            for tag in matched.route.tags(&matched.params) {
                assert!(crate::tags::is_valid_tag(&tag), "{tag:?}");
            }
        }
    }

    /// A message on the invalidation channel: read or ignored, never a panic.
    pub fn notice(text: &str) {
        let _ = crate::store::Notice::parse(text);
    }

    /// Percent-encoding: a key path changes no byte but hex case; a tag value is ASCII
    /// (raw non-ASCII encoded, at most three bytes for one).
    pub fn percent(text: &str) {
        let path = crate::percent::normalize_path(text);
        assert_eq!(path.len(), text.len());
        assert!(path.eq_ignore_ascii_case(text));
        let tag = crate::percent::decode_for_tags(text);
        assert!(tag.is_ascii() && tag.len() <= 3 * text.len());
    }
}
