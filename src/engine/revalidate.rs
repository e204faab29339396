//! Revalidation (RFC 9111 §4.3): a stale entry with a validator is checked with the origin
//! by a conditional request instead of being fetched again. A `304` from the origin makes a
//! fresh entry of the stored one, its headers updated from the `304` (§4.3.4), without the
//! body crossing again; anything else is an ordinary miss.
//!
//! Only entries the lookup returned are revalidated, and the lookup returns none that a
//! clear made dead: a validator never brings a cleared entry back.

use http::header::{
    HeaderName, AGE, CONNECTION, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, ETAG,
    IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED, SET_COOKIE, TRANSFER_ENCODING, VARY,
};
use http::{HeaderMap, HeaderValue, StatusCode};

use super::conditional::DIGEST_ETAG_PREFIX;
use crate::compress;
use crate::entry::{Entry, Lifetimes};
use crate::policy::{decide, CacheHint, Decision, Route};
use crate::store::Fence;
use crate::tags::{push_tags, take_entry_tags};

/// The `ETag` the origin gave the entry: not one the layer made (a digest tag), and
/// without the suffix the layer added to a representation it compressed.
fn origin_etag(entry: &Entry) -> Option<HeaderValue> {
    let etag = entry.headers.get(ETAG)?;
    let etag = compress::origin_etag(etag, &entry.headers);
    let ours = etag.as_bytes().starts_with(DIGEST_ETAG_PREFIX.as_bytes());
    (!ours).then_some(etag)
}

/// Whether the origin can be asked about the entry: it has an `ETag` from the origin or a
/// `Last-Modified`.
pub(crate) fn has_validator(entry: &Entry) -> bool {
    entry.headers.contains_key(LAST_MODIFIED) || origin_etag(entry).is_some()
}

/// Makes `headers` (a request's) ask whether `entry` is still current: `If-None-Match`
/// with the origin's `ETag` and `If-Modified-Since` with its `Last-Modified`, whichever it
/// has (an origin that knows only dates answers the second).
pub(crate) fn ask_about(headers: &mut HeaderMap, entry: &Entry) {
    if let Some(etag) = origin_etag(entry) {
        headers.insert(IF_NONE_MATCH, etag);
    }
    if let Some(lm) = entry.headers.get(LAST_MODIFIED) {
        headers.insert(IF_MODIFIED_SINCE, lm.clone());
    }
}

/// The entry a `304` makes of the stored one: the stored status, body and trailers, its
/// headers updated with the `304`'s, a lifetime decided anew on those headers, and the
/// fence of the lookup that found it stale. `None` when the updated response may no longer
/// be stored (the `304` says `no-store`, sets a cookie...).
pub(crate) fn refreshed(
    stale: &Entry,
    not_modified: &http::response::Parts,
    route: &Route,
    fence: Fence,
) -> Option<Entry> {
    debug_assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
    if not_modified.headers.contains_key(SET_COOKIE) {
        return None;
    }
    let mut headers = stale.headers.clone();
    // What describes the stored bytes stays as stored (RFC 9111 §3.2 lets a cache keep
    // them): their length, their coding, and the tag and `Vary` of a representation the
    // layer compressed (the origin's `304` speaks of its identity bytes).
    let skip: [&HeaderName; 9] = [
        &CONTENT_LENGTH,
        &CONTENT_RANGE,
        &TRANSFER_ENCODING,
        &CONNECTION,
        &SET_COOKIE,
        &AGE,
        &CONTENT_ENCODING,
        &ETAG,
        &VARY,
    ];
    // Digests of the stored bytes, too.
    const DIGESTS: [&str; 4] = ["content-md5", "content-digest", "repr-digest", "digest"];
    let mut replaced: Vec<&HeaderName> = Vec::new();
    for (name, value) in &not_modified.headers {
        // Tag headers meant for the cache alone name its tags below; they never reach a
        // client, so the entry does not keep them.
        if skip.contains(&name)
            || DIGESTS.contains(&name.as_str())
            || crate::tags::is_cache_only(name)
        {
            continue;
        }
        if !replaced.contains(&name) {
            headers.remove(name);
            replaced.push(name);
        }
        headers.append(name.clone(), value.clone());
    }
    let hint = not_modified.extensions.get::<CacheHint>();
    let Decision::Store {
        lifetime,
        initial_age_s,
        stale_while_revalidate,
        stale_if_error,
    } = decide(&route.policy, stale.status, &headers, hint)
    else {
        return None;
    };
    let lifetimes = Lifetimes {
        lifetime,
        initial_age_s,
        stale_while_revalidate,
        stale_if_error,
    };
    // Tags the `304` names join the entry's: a clear of them must reach it too.
    let mut tags = stale.tags.clone();
    if let Some(hint) = hint {
        push_tags(&mut tags, hint.tags.iter().map(String::as_str), "CacheHint");
    }
    take_entry_tags(&mut not_modified.headers.clone(), &mut tags);
    let mut entry = Entry::new(stale.status, headers, fence, tags, lifetimes);
    entry.body = stale.body.clone();
    entry.trailers = stale.trailers.clone();
    Some(entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn value(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn a_304_updates_metadata_but_not_what_describes_the_stored_bytes() {
        let mut stored = HeaderMap::new();
        stored.insert(CONTENT_ENCODING, value("gzip"));
        stored.insert(ETAG, value("\"x-gzip\""));
        stored.insert(VARY, value("accept-encoding"));
        stored.insert("content-md5", value("old"));
        stored.insert(http::header::CACHE_CONTROL, value("max-age=1"));
        stored.insert("x-old", value("kept"));
        let lifetimes = Lifetimes::fresh_for(Duration::from_secs(1));
        let fence = Fence::new(1, 1);
        let mut stale = Entry::new(StatusCode::OK, stored, fence, vec!["a".into()], lifetimes);
        stale.body = bytes::Bytes::from_static(b"gzip bytes");
        let mut res = http::Response::new(());
        *res.status_mut() = StatusCode::NOT_MODIFIED;
        let h = res.headers_mut();
        h.insert(ETAG, value("\"x\""));
        h.insert(VARY, value("origin"));
        h.insert("content-md5", value("new"));
        h.insert(http::header::CACHE_CONTROL, value("max-age=60"));
        h.insert("x-new", value("added"));
        h.insert("surrogate-key", value("b"));
        let (parts, ()) = res.into_parts();
        // A route that compresses: its entries vary on Accept-Encoding.
        let table = crate::policy::RouteTable::new().with_compression(compress::Encoding::Gzip);
        let route = table.find("/");
        let entry = refreshed(&stale, &parts, route.route, Fence::new(1, 2)).unwrap();
        let h = &entry.headers;
        assert_eq!(h[CONTENT_ENCODING], "gzip");
        assert_eq!(h[ETAG], "\"x-gzip\"");
        assert_eq!(h[VARY], "accept-encoding");
        assert_eq!(h["content-md5"], "old");
        assert_eq!(h[http::header::CACHE_CONTROL], "max-age=60");
        assert_eq!(h["x-old"], "kept");
        assert_eq!(h["x-new"], "added");
        assert_eq!(entry.lifetime_ms, 60_000);
        assert_eq!(entry.body, stale.body);
        assert_eq!(entry.fence, Fence::new(1, 2));
        assert_eq!(entry.tags, ["a", "b"]);
        assert!(
            !h.contains_key("surrogate-key"),
            "tag headers reach clients"
        );
    }

    #[test]
    fn the_origin_is_asked_with_its_own_validators() {
        let lifetimes = Lifetimes::fresh_for(Duration::from_secs(1));
        let mut headers = HeaderMap::new();
        headers.insert(ETAG, value("\"tca-00ff\""));
        let ours = Entry::new(StatusCode::OK, headers, Fence::new(1, 1), vec![], lifetimes);
        assert!(
            !has_validator(&ours),
            "the layer's digest tag is not the origin's"
        );
        let mut headers = HeaderMap::new();
        headers.insert(ETAG, value("\"v1-gzip\""));
        headers.insert(CONTENT_ENCODING, value("gzip"));
        headers.insert(VARY, value("accept-encoding"));
        headers.insert(LAST_MODIFIED, value("Sun, 06 Nov 1994 08:49:37 GMT"));
        let compressed = Entry::new(StatusCode::OK, headers, Fence::new(1, 1), vec![], lifetimes);
        let mut request = HeaderMap::new();
        ask_about(&mut request, &compressed);
        assert_eq!(request[IF_NONE_MATCH], "\"v1\"");
        assert_eq!(request[IF_MODIFIED_SINCE], "Sun, 06 Nov 1994 08:49:37 GMT");
    }
}
