//! The response's own `Vary` (RFC 9111 §4.1): a response that varies on request headers the
//! route did not declare is stored as one *variant* of its URL, under a key that adds the
//! request's values of those headers, and a small *marker* under the URL's own key lists the
//! headers, so that the next lookup finds the marker and then the variant for its own values
//! (two store reads, only for URLs whose responses vary this way; declared `vary(...)`
//! stays the one-read fast path).
//!
//! Bounded: at most [`MAX_VARY_NAMES`] headers, values of at most [`MAX_VARY_VALUE`] bytes,
//! and [`MAX_VARIANTS`] variants of one URL stored by one instance (more are passed through
//! unstored). `Accept-Encoding` and `Accept-Language` are normalized first, so that
//! spellings of the same preference share a variant. `Vary: *` is never stored.
//!
//! The marker carries the same tags and fence as its variants, so a clear makes both dead at
//! once. An instance of an older version reads a marker as an unreadable entry: a miss.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderName, ACCEPT_ENCODING, ACCEPT_LANGUAGE};
use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::key::EntryKey;
use crate::lock::lock;

pub(crate) use crate::policy::MAX_VARY_NAMES;
/// The longest request header value a variant is keyed by.
pub(crate) const MAX_VARY_VALUE: usize = 1024;
/// The most variants of one URL one instance stores.
pub(crate) const MAX_VARIANTS: usize = 32;
/// URLs whose variants are counted; past it the counts start over (they are only a bound).
const MAX_COUNTED_URLS: usize = 50_000;

const MARKER_MAGIC: &[u8; 4] = b"TCV1";

/// The key of the variant of `primary` that a request with these headers selects; `None`
/// when one of its values is too long to key by.
pub(crate) fn variant_key(
    primary: &EntryKey,
    names: &[HeaderName],
    request: &HeaderMap,
) -> Option<EntryKey> {
    let mut h = Sha256::new();
    h.update(b"variant");
    h.update(primary.digest());
    for name in names {
        let value = normalized(name, request)?;
        for part in [name.as_str().as_bytes(), value.as_bytes()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
    }
    Some(primary.with_digest(h.finalize().into()))
}

/// A request header's value as a variant is keyed by it: its lines joined; the codings of
/// `Accept-Encoding` and the languages of `Accept-Language` as sets in preference order,
/// lower-case; other values trimmed. A missing header keys as absent, not as empty.
fn normalized(name: &HeaderName, request: &HeaderMap) -> Option<String> {
    let lines: Vec<&str> = request
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap_or("\u{fffd}").trim())
        .collect();
    if lines.is_empty() {
        return Some("\u{0}absent".to_owned());
    }
    let joined = lines.join(",");
    if joined.len() > MAX_VARY_VALUE {
        return None;
    }
    Some(if name == ACCEPT_ENCODING {
        crate::compress::normalized_accept_encoding(joined.as_bytes())
    } else if name == ACCEPT_LANGUAGE {
        normalized_languages(&joined)
    } else {
        joined
    })
}

/// `Accept-Language` as the languages accepted (q > 0), lower-case, highest q first (ties
/// in their order): `en-US, fr;q=0.5` and `en-us,fr;q=0.5` are one variant.
fn normalized_languages(value: &str) -> String {
    let mut langs: Vec<(String, f32)> = value
        .split(',')
        .filter_map(|item| {
            let mut parts = item.split(';');
            let lang = parts.next()?.trim().to_ascii_lowercase();
            let q = parts
                .find_map(|p| p.trim().strip_prefix("q=").or(p.trim().strip_prefix("Q=")))
                .and_then(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            (!lang.is_empty() && q > 0.0).then_some((lang, q))
        })
        .collect();
    langs.sort_by(|a, b| b.1.total_cmp(&a.1));
    langs.dedup_by(|a, b| a.0 == b.0);
    langs
        .into_iter()
        .map(|(l, _)| l)
        .collect::<Vec<_>>()
        .join(",")
}

/// The marker stored under a URL's own key: the headers its responses vary on.
pub(crate) fn encode_marker(names: &[HeaderName]) -> Bytes {
    let mut out = BytesMut::with_capacity(8 + names.len() * 24);
    out.put_slice(MARKER_MAGIC);
    out.put_u8(names.len() as u8);
    for name in names {
        out.put_u8(name.as_str().len() as u8);
        out.put_slice(name.as_str().as_bytes());
    }
    out.freeze()
}

/// What stored bytes are: a marker (with its header names), or not one.
pub(crate) enum Stored {
    Marker(Vec<HeaderName>),
    /// Bytes starting like a marker that do not read as one.
    Broken,
    NotMarker,
}

pub(crate) fn read_marker(bytes: &[u8]) -> Stored {
    let Some(rest) = bytes.strip_prefix(MARKER_MAGIC) else {
        return Stored::NotMarker;
    };
    let Some((&count, mut rest)) = rest.split_first() else {
        return Stored::Broken;
    };
    let mut names = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let Some((&len, tail)) = rest.split_first() else {
            return Stored::Broken;
        };
        let Some(name) = tail.get(..len as usize) else {
            return Stored::Broken;
        };
        let Ok(name) = HeaderName::from_bytes(name) else {
            return Stored::Broken;
        };
        names.push(name);
        rest = &tail[len as usize..];
    }
    if !rest.is_empty() || names.is_empty() || names.len() > MAX_VARY_NAMES {
        return Stored::Broken;
    }
    Stored::Marker(names)
}

/// How many variants of each URL this instance stored: the bound on variants per URL.
#[derive(Debug, Default)]
pub(crate) struct Variants {
    seen: Mutex<HashMap<EntryKey, Vec<[u8; 8]>>>,
}

impl Variants {
    /// Whether one more variant of `primary` may be stored (one already counted may).
    pub(crate) fn admit(&self, primary: &EntryKey, variant: &EntryKey) -> bool {
        let mut id = [0u8; 8];
        id.copy_from_slice(&variant.digest()[..8]);
        let mut seen = lock(&self.seen);
        if seen.len() >= MAX_COUNTED_URLS && !seen.contains_key(primary) {
            seen.clear();
        }
        let ids = seen.entry(primary.clone()).or_default();
        if ids.contains(&id) {
            return true;
        }
        if ids.len() >= MAX_VARIANTS {
            return false;
        }
        ids.push(id);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn markers_round_trip_and_garbage_is_refused() {
        let names = vec![ACCEPT_LANGUAGE, HeaderName::from_static("x-tenant")];
        let bytes = encode_marker(&names);
        assert!(matches!(read_marker(&bytes), Stored::Marker(n) if n == names));
        assert!(matches!(read_marker(b"TCA\x03..."), Stored::NotMarker));
        for bad in [
            &b"TCV1"[..],
            b"TCV1\x01",
            b"TCV1\x01\x05ab",
            b"TCV1\x00",
            b"TCV1\x01\x01a!",
        ] {
            assert!(matches!(read_marker(bad), Stored::Broken), "{bad:?}");
        }
    }

    #[test]
    fn variants_key_by_normalized_values() {
        let primary = EntryKey::new("r", [7; 32]);
        let lang = [ACCEPT_LANGUAGE];
        let key = |v: &str| variant_key(&primary, &lang, &headers(&[("accept-language", v)]));
        assert_eq!(key("en-US, fr;q=0.5"), key("fr;q=0.5,EN-us"));
        assert_ne!(key("en-US"), key("fr"));
        assert_ne!(
            variant_key(&primary, &lang, &HeaderMap::new()),
            key(""),
            "absent is not empty"
        );
        let long = "a".repeat(MAX_VARY_VALUE + 1);
        assert!(key(&long).is_none());
        assert_ne!(key("en").unwrap(), primary);
    }

    #[test]
    fn variants_per_url_are_bounded() {
        let v = Variants::default();
        let primary = EntryKey::new("r", [1; 32]);
        for i in 0..MAX_VARIANTS {
            assert!(v.admit(&primary, &EntryKey::new("r", [i as u8 + 10; 32])));
        }
        assert!(!v.admit(&primary, &EntryKey::new("r", [200; 32])));
        assert!(
            v.admit(&primary, &EntryKey::new("r", [10; 32])),
            "a known one"
        );
    }
}
