//! Conditional requests (RFC 9110 §13): `If-None-Match` and `If-Modified-Since` answered
//! with `304 Not Modified` from what the cache holds or has just fetched, so a client that
//! already has the body does not download it again.
//!
//! The rules, for a GET or HEAD:
//! - `If-None-Match` is compared with the response's `ETag` by weak comparison (`W/"a"`
//!   matches `"a"`); `*` matches any stored response. When the request has it,
//!   `If-Modified-Since` is ignored (§13.2.2).
//! - Else `If-Modified-Since` is compared with `Last-Modified` (else `Date`, else the time
//!   the response was received): not modified when that is no later than the date given.
//!   An unreadable date is ignored.
//! - Only a `200` is turned into a `304`; the `304` carries the headers §15.4.5 lists
//!   (`Cache-Control`, `Content-Location`, `Date`, `ETag`, `Expires`, `Vary`, and
//!   `Last-Modified` when there is no `ETag`), `Age` and the status headers, and no body.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{
    CACHE_CONTROL, CONTENT_LOCATION, DATE, ETAG, EXPIRES, IF_MODIFIED_SINCE, IF_NONE_MATCH,
    LAST_MODIFIED, VARY,
};
use http::{HeaderMap, HeaderValue, StatusCode};

/// The validators a request sent, when it sent any.
#[derive(Clone, Debug, Default)]
pub(crate) struct Conditions {
    if_none_match: Option<HeaderValue>,
    if_modified_since: Option<SystemTime>,
}

impl Conditions {
    /// The request's conditions; `None` for the common request that has none (nothing is
    /// copied then).
    pub(crate) fn of(headers: &HeaderMap) -> Option<Self> {
        let inm = headers.get(IF_NONE_MATCH);
        let ims = headers.get(IF_MODIFIED_SINCE);
        if inm.is_none() && ims.is_none() {
            return None;
        }
        let mut conditions = Conditions {
            if_none_match: None,
            if_modified_since: None,
        };
        // Several `If-None-Match` lines form one list; keep it as one value.
        let lines: Vec<&[u8]> = headers
            .get_all(IF_NONE_MATCH)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        if !lines.is_empty() {
            conditions.if_none_match = HeaderValue::from_bytes(&lines.join(&b","[..])).ok();
        }
        if conditions.if_none_match.is_none() {
            conditions.if_modified_since = ims.and_then(http_date);
        }
        (conditions.if_none_match.is_some() || conditions.if_modified_since.is_some())
            .then_some(conditions)
    }

    /// Whether a response with this status and these headers, received at `received_ms`
    /// (milliseconds since the Unix epoch), is one the client already has.
    pub(crate) fn not_modified(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        received_ms: u64,
    ) -> bool {
        if status != StatusCode::OK {
            return false;
        }
        if let Some(list) = &self.if_none_match {
            let Some(etag) = headers.get(ETAG) else {
                return list.as_bytes().trim_ascii() == b"*";
            };
            return none_match_fails(list.as_bytes(), etag.as_bytes());
        }
        let Some(since) = self.if_modified_since else {
            return false;
        };
        let modified = headers
            .get(LAST_MODIFIED)
            .or_else(|| headers.get(DATE))
            .and_then(http_date)
            .unwrap_or_else(|| UNIX_EPOCH + Duration::from_millis(received_ms));
        modified <= since
    }
}

/// Whether `If-None-Match: list` fails (the client's copy is current) for a response whose
/// `ETag` is `etag`: `*`, or any listed tag equal to it by weak comparison.
fn none_match_fails(list: &[u8], etag: &[u8]) -> bool {
    let Some(ours) = opaque_tag(etag.trim_ascii()) else {
        return false;
    };
    list.split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .any(|tag| tag == b"*" || opaque_tag(tag) == Some(ours))
}

/// The quoted part of an entity-tag (`"x"` or `W/"x"`), quotes included; `None` when it is
/// not one.
fn opaque_tag(tag: &[u8]) -> Option<&[u8]> {
    let tag = tag.strip_prefix(b"W/").unwrap_or(tag);
    let quoted = tag.len() >= 2 && tag[0] == b'"' && tag[tag.len() - 1] == b'"';
    let inner_ok = quoted && !tag[1..tag.len() - 1].contains(&b'"');
    inner_ok.then_some(tag)
}

fn http_date(value: &HeaderValue) -> Option<SystemTime> {
    httpdate::parse_http_date(value.to_str().ok()?.trim()).ok()
}

/// The headers of a `304` made from a `200`'s (RFC 9110 §15.4.5).
pub(crate) fn not_modified_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in [CACHE_CONTROL, CONTENT_LOCATION, DATE, ETAG, EXPIRES, VARY] {
        for value in headers.get_all(&name) {
            out.append(name.clone(), value.clone());
        }
    }
    if !headers.contains_key(ETAG) {
        if let Some(lm) = headers.get(LAST_MODIFIED) {
            out.insert(LAST_MODIFIED, lm.clone());
        }
    }
    out
}

/// What starts the `ETag`s the layer makes, so that it never asks an origin about them.
pub(crate) const DIGEST_ETAG_PREFIX: &str = "\"tca-";

/// A strong `ETag` for a stored body: `"tca-` and the first 16 bytes of its SHA-256, in hex.
/// The same body gives the same tag on every instance and after restarts.
pub(crate) fn digest_etag(body: &[u8]) -> HeaderValue {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(body);
    let mut tag = String::with_capacity(38);
    tag.push_str(DIGEST_ETAG_PREFIX);
    crate::hex::push_hex(&mut tag, &digest[..16]);
    tag.push('"');
    HeaderValue::from_str(&tag).unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::headers::map as headers;

    fn not_modified(request: &[(&str, &str)], response: &[(&str, &str)]) -> bool {
        Conditions::of(&headers(request))
            .is_some_and(|c| c.not_modified(StatusCode::OK, &headers(response), 0))
    }

    #[test]
    fn if_none_match_uses_weak_comparison() {
        let etag = [("etag", "\"v1\"")];
        assert!(not_modified(&[("if-none-match", "\"v1\"")], &etag));
        assert!(not_modified(&[("if-none-match", "W/\"v1\"")], &etag));
        assert!(not_modified(&[("if-none-match", "\"a\", W/\"v1\"")], &etag));
        assert!(not_modified(
            &[("if-none-match", "\"a\""), ("if-none-match", "\"v1\"")],
            &etag
        ));
        assert!(not_modified(&[("if-none-match", "*")], &etag));
        assert!(not_modified(
            &[("if-none-match", "\"v1\"")],
            &[("etag", "W/\"v1\"")]
        ));
        assert!(!not_modified(&[("if-none-match", "\"v2\"")], &etag));
        assert!(!not_modified(&[("if-none-match", "v1")], &etag));
        assert!(!not_modified(&[("if-none-match", "\"v1\"")], &[]));
        assert!(not_modified(&[("if-none-match", "*")], &[]));
        assert!(!not_modified(
            &[("if-none-match", "\"v1\"")],
            &[("etag", "v1")]
        ));
    }

    #[test]
    fn if_modified_since_compares_last_modified_and_yields_to_if_none_match() {
        let lm = [("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT")];
        assert!(not_modified(
            &[("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")],
            &lm
        ));
        assert!(not_modified(
            &[("if-modified-since", "Mon, 07 Nov 1994 08:49:37 GMT")],
            &lm
        ));
        assert!(!not_modified(
            &[("if-modified-since", "Sat, 05 Nov 1994 08:49:37 GMT")],
            &lm
        ));
        assert!(!not_modified(&[("if-modified-since", "yesterday")], &lm));
        // If-None-Match present: If-Modified-Since is not looked at.
        assert!(!not_modified(
            &[
                ("if-none-match", "\"other\""),
                ("if-modified-since", "Mon, 07 Nov 1994 08:49:37 GMT")
            ],
            &[
                ("etag", "\"v1\""),
                ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT")
            ],
        ));
    }

    #[test]
    fn only_a_200_becomes_a_304() {
        let c = Conditions::of(&headers(&[("if-none-match", "*")])).unwrap();
        assert!(!c.not_modified(StatusCode::NOT_FOUND, &HeaderMap::new(), 0));
    }

    #[test]
    fn a_304_keeps_only_the_listed_headers() {
        let h = headers(&[
            ("etag", "\"v1\""),
            ("cache-control", "max-age=60"),
            ("content-type", "application/json"),
            ("vary", "accept-language"),
            ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]);
        let out = not_modified_headers(&h);
        assert_eq!(out.len(), 3, "{out:?}");
        assert!(out.contains_key(ETAG) && out.contains_key(VARY));
        assert!(!out.contains_key(LAST_MODIFIED), "an ETag is there");
    }

    #[test]
    fn digest_etags_are_strong_and_stable() {
        let a = digest_etag(b"hello");
        assert_eq!(a, digest_etag(b"hello"));
        assert_ne!(a, digest_etag(b"hello!"));
        assert_eq!(a.len(), 38);
        assert!(a.to_str().unwrap().starts_with(DIGEST_ETAG_PREFIX));
        assert!(a.to_str().unwrap().starts_with('"'));
    }
}
