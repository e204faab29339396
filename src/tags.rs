//! Where an entry's tags come from besides the route table: the handler's tag headers and
//! the target URI, and which tags a mutation clears besides its route's.

use http::header::{HeaderName, HOST};
use http::{HeaderMap, Uri};
use sha2::{Digest, Sha256};

/// The longest tag accepted, in bytes (as Fastly and Cloudflare allow).
pub const MAX_TAG_LEN: usize = 1024;

/// Is `tag` acceptable as a cache tag: 1 to [`MAX_TAG_LEN`] bytes of visible ASCII.
pub fn is_valid_tag(tag: &str) -> bool {
    !tag.is_empty() && tag.len() <= MAX_TAG_LEN && tag.bytes().all(|b| b.is_ascii_graphic())
}

/// A tag a user may give (in a route, a hint, a header, a handle call): valid, and not
/// starting with the crate's reserved `~`. The one check every source of tags goes through.
pub(crate) fn is_user_tag(tag: &str) -> bool {
    is_valid_tag(tag) && !tag.starts_with(RESERVED_PREFIX)
}

/// Most tags one response may add or clear; more are logged and dropped.
pub const MAX_TAGS_PER_RESPONSE: usize = 128;

/// Fastly's `Surrogate-Key` (space-separated): meant for the cache, stripped before the client.
pub(crate) static SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");
/// Cloudflare's `Cache-Tag` (comma-separated): meant for the cache, stripped before the client.
pub(crate) static CACHE_TAG: HeaderName = HeaderName::from_static("cache-tag");
/// RFC 9875 `Cache-Groups` (a list of strings): standard, so left for downstream caches.
pub(crate) static CACHE_GROUPS: HeaderName = HeaderName::from_static("cache-groups");
/// RFC 9875 `Cache-Group-Invalidation` on responses to unsafe methods.
pub(crate) static CACHE_GROUP_INVALIDATION: HeaderName =
    HeaderName::from_static("cache-group-invalidation");

/// Tags starting with this are the crate's own (URI tags); user tags may not use it.
pub(crate) const RESERVED_PREFIX: char = '~';

/// The tag every entry of a target URI carries, so that a mutation of that URI clears it
/// (RFC 9111 §4.4): `~u:` and a digest of the lower-cased host and the path. The query is
/// left out on purpose: a write to `/events/1` clears `/events/1?fields=name` too.
pub(crate) fn uri_tag(host: &[u8], path: &str) -> String {
    let mut h = Sha256::new();
    h.update((host.len() as u64).to_le_bytes());
    h.update(host.to_ascii_lowercase());
    h.update(crate::percent::decode_for_tags(path).as_bytes());
    let digest = h.finalize();
    let mut tag = String::with_capacity(3 + 32);
    tag.push_str("~u:");
    crate::hex::push_hex(&mut tag, &digest[..16]);
    tag
}

/// The request's host as sent: the `Host` header, else the URI authority (HTTP/2).
pub(crate) fn request_host<'a>(headers: &'a HeaderMap, uri: &'a Uri) -> &'a [u8] {
    match headers.get(HOST) {
        Some(h) => h.as_bytes(),
        None => uri.authority().map_or(&b""[..], |a| a.as_str().as_bytes()),
    }
}

/// Appends valid tags from `source`, up to the per-response limit; logs what it drops.
pub(crate) fn push_tags<'a>(
    out: &mut Vec<String>,
    source: impl IntoIterator<Item = &'a str>,
    from: &str,
) {
    for tag in source {
        let tag = tag.trim().trim_matches('"');
        if tag.is_empty() {
            continue;
        }
        if !is_user_tag(tag) {
            tracing::warn!(from, "skipping an invalid cache tag");
        } else if out.len() >= MAX_TAGS_PER_RESPONSE {
            tracing::warn!(
                from,
                "too many cache tags on one response; dropping the rest"
            );
            return;
        } else if !out.iter().any(|t| t == tag) {
            out.push(tag.to_owned());
        }
    }
}

fn header_words<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
    separator: char,
) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(move |v| v.split(separator))
}

/// The tags a handler put on its response in headers, removing the cache-only ones.
pub(crate) fn take_entry_tags(headers: &mut HeaderMap, out: &mut Vec<String>) {
    push_tags(
        out,
        header_words(headers, &SURROGATE_KEY, ' '),
        "Surrogate-Key",
    );
    push_tags(out, header_words(headers, &CACHE_TAG, ','), "Cache-Tag");
    push_tags(
        out,
        header_words(headers, &CACHE_GROUPS, ','),
        "Cache-Groups",
    );
    strip_cache_only(headers);
}

/// The tag headers meant for the cache alone (`Surrogate-Key`, `Cache-Tag`): on every
/// response the layer passes, stored or not, they are taken off; clients never see them.
pub(crate) fn is_cache_only(name: &HeaderName) -> bool {
    name == SURROGATE_KEY || name == CACHE_TAG
}

/// Removes the tag headers meant for the cache alone (see [`is_cache_only`]).
pub(crate) fn strip_cache_only(headers: &mut HeaderMap) {
    headers.remove(&SURROGATE_KEY);
    headers.remove(&CACHE_TAG);
}

/// The tags a response to an unsafe method asks to clear (RFC 9875).
pub(crate) fn invalidation_header_tags(headers: &HeaderMap, out: &mut Vec<String>) {
    push_tags(
        out,
        header_words(headers, &CACHE_GROUP_INVALIDATION, ','),
        "Cache-Group-Invalidation",
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn header_tags_are_parsed_validated_and_stripped() {
        let mut h = HeaderMap::new();
        h.insert(&SURROGATE_KEY, HeaderValue::from_static("a b  c"));
        h.insert(&CACHE_TAG, HeaderValue::from_static("c, d,~reserved"));
        h.insert(&CACHE_GROUPS, HeaderValue::from_static("\"e\", \"f\""));
        let mut tags = Vec::new();
        take_entry_tags(&mut h, &mut tags);
        assert_eq!(tags, ["a", "b", "c", "d", "e", "f"]);
        assert!(!h.contains_key(&SURROGATE_KEY) && !h.contains_key(&CACHE_TAG));
        assert!(h.contains_key(&CACHE_GROUPS), "the standard header stays");
    }

    #[test]
    fn tag_count_is_bounded() {
        let many: Vec<String> = (0..500).map(|i| format!("t{i}")).collect();
        let mut out = Vec::new();
        push_tags(&mut out, many.iter().map(String::as_str), "test");
        assert_eq!(out.len(), MAX_TAGS_PER_RESPONSE);
    }

    #[test]
    fn uri_tags_ignore_host_case_and_split_paths() {
        assert_eq!(uri_tag(b"A.example", "/x"), uri_tag(b"a.example", "/x"));
        assert_ne!(uri_tag(b"a.example", "/x"), uri_tag(b"a.example", "/y"));
        assert_ne!(uri_tag(b"a.example", "/x"), uri_tag(b"b.example", "/x"));
        assert!(uri_tag(b"h", "/").starts_with("~u:"));
    }
}
