//! Reading the framing headers, the same way wherever they are read.

use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::HeaderMap;

/// The `Content-Length`, when there is one readable value.
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Whether a request says it has a body (a `Content-Length` other than 0, or any
/// `Transfer-Encoding`).
pub(crate) fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(TRANSFER_ENCODING)
        || headers
            .get_all(CONTENT_LENGTH)
            .iter()
            .any(|v| v.as_bytes() != b"0")
}

/// The members of a weighted list (`Accept-Encoding`, `Accept-Language`): each name, trimmed,
/// with its `q` (1 when absent or unreadable), empty members left out.
pub(crate) fn weighted(list: &str) -> impl Iterator<Item = (&str, f32)> {
    list.split(',').filter_map(|item| {
        let mut parts = item.split(';');
        let name = parts.next()?.trim();
        let q = parts
            .find_map(|p| {
                let p = p.trim();
                p.strip_prefix("q=").or(p.strip_prefix("Q="))
            })
            .and_then(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        (!name.is_empty()).then_some((name, q))
    })
}

/// A header map from pairs, for tests.
#[cfg(test)]
pub(crate) fn map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}
