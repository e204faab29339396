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

use std::sync::Mutex;
use std::time::{Duration, Instant};

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
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(b"variant");
    field(primary.digest());
    for name in names {
        field(name.as_str().as_bytes());
        match normalized(name, request)? {
            Value::Normalized(value) => {
                field(b"n");
                field(value.as_bytes());
            }
            // Every line's exact bytes, counted: two values never share a variant unless
            // they are the same bytes (UTF-8 or not).
            Value::Raw(lines) => {
                field(b"r");
                field(&(lines.len() as u64).to_le_bytes());
                for line in lines {
                    field(line);
                }
            }
        }
    }
    Some(primary.with_digest(h.finalize().into()))
}

/// A request header's value as a variant is keyed by it.
enum Value<'a> {
    /// A preference list reduced to what it means.
    Normalized(String),
    /// The lines as sent (none: the header is absent).
    Raw(Vec<&'a [u8]>),
}

/// A request header's value as a variant is keyed by it: the codings of `Accept-Encoding`
/// and the languages of `Accept-Language` (when ASCII) as sets in preference order,
/// lower-case; any other value as its exact bytes, line by line. `None` when the value is
/// longer than [`MAX_VARY_VALUE`] bytes.
fn normalized<'a>(name: &HeaderName, request: &'a HeaderMap) -> Option<Value<'a>> {
    let lines: Vec<&[u8]> = request.get_all(name).iter().map(|v| v.as_bytes()).collect();
    if lines.iter().map(|l| l.len()).sum::<usize>() > MAX_VARY_VALUE {
        return None;
    }
    let preference = name == ACCEPT_ENCODING || name == ACCEPT_LANGUAGE;
    if !preference || lines.is_empty() || !lines.iter().all(|l| l.is_ascii()) {
        return Some(Value::Raw(lines));
    }
    let joined = lines.join(&b","[..]);
    let text = String::from_utf8_lossy(&joined);
    Some(Value::Normalized(if name == ACCEPT_ENCODING {
        crate::compress::normalized_accept_encoding(&joined)
    } else {
        normalized_languages(&text)
    }))
}

/// `Accept-Language` as the languages accepted (q > 0), lower-case, highest q first (ties
/// in their order): `en-US, fr;q=0.5` and `en-us,fr;q=0.5` are one variant.
fn normalized_languages(value: &str) -> String {
    let mut langs: Vec<(String, f32)> = crate::headers::weighted(value)
        .filter(|(_, q)| *q > 0.0)
        .map(|(lang, q)| (lang.to_ascii_lowercase(), q))
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

/// The variants of each URL this instance stored and until when they live: the bound on
/// variants per URL counts only live ones.
#[derive(Debug, Default)]
pub(crate) struct Variants {
    seen: Mutex<crate::Map<EntryKey, Vec<Live>>>,
}

/// A variant (the first bytes of its key's digest) and until when it lives.
type Live = ([u8; 8], Instant);

impl Variants {
    /// Whether one more variant of `primary`, living `lives`, may be stored (one already
    /// counted may, and lives longer).
    pub(crate) fn admit(&self, primary: &EntryKey, variant: &EntryKey, lives: Duration) -> bool {
        let mut id = [0u8; 8];
        id.copy_from_slice(&variant.digest()[..8]);
        let now = Instant::now();
        let until = now
            .checked_add(lives)
            .unwrap_or(now + Duration::from_secs(1 << 31));
        let mut seen = lock(&self.seen);
        if seen.len() >= MAX_COUNTED_URLS && !seen.contains_key(primary) {
            // Forget the URLs whose variants all expired; if that is not enough, all.
            seen.retain(|_, ids| ids.iter().any(|(_, until)| *until > now));
            if seen.len() >= MAX_COUNTED_URLS {
                seen.clear();
            }
        }
        let ids = seen.entry(primary.clone()).or_default();
        ids.retain(|(_, until)| *until > now);
        if let Some(known) = ids.iter_mut().find(|(known, _)| *known == id) {
            known.1 = known.1.max(until);
            return true;
        }
        if ids.len() >= MAX_VARIANTS {
            return false;
        }
        ids.push((id, until));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    use crate::headers::map as headers;

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
        // Other headers: exact bytes, non-ASCII ones included, lines counted.
        let tenant = [HeaderName::from_static("x-user")];
        let raw = |values: &[&[u8]]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append("x-user", HeaderValue::from_bytes(v).unwrap());
            }
            variant_key(&primary, &tenant, &h)
        };
        assert_ne!(
            raw(&["jos\u{e9}".as_bytes()]),
            raw(&["zo\u{eb}".as_bytes()])
        );
        assert_ne!(raw(&[b"jos\xe9"]), raw(&[b"zo\xeb"]));
        assert_ne!(raw(&[b"a,b"]), raw(&[b"a", b"b"]));
        assert!(
            raw(&[&[0xe9; 1025]]).is_none(),
            "bytes, not characters, are counted"
        );
        let long = "a".repeat(MAX_VARY_VALUE + 1);
        assert!(key(&long).is_none());
        assert_ne!(key("en").unwrap(), primary);
    }

    #[test]
    fn variants_per_url_are_bounded() {
        let v = Variants::default();
        let primary = EntryKey::new("r", [1; 32]);
        let long = Duration::from_secs(60);
        for i in 0..MAX_VARIANTS - 1 {
            assert!(v.admit(&primary, &EntryKey::new("r", [i as u8 + 10; 32]), long));
        }
        let short = Duration::from_millis(20);
        assert!(v.admit(&primary, &EntryKey::new("r", [100; 32]), short));
        assert!(!v.admit(&primary, &EntryKey::new("r", [200; 32]), long));
        assert!(
            v.admit(&primary, &EntryKey::new("r", [10; 32]), long),
            "a known one"
        );
        // Once a variant has expired, its place is free again.
        std::thread::sleep(Duration::from_millis(30));
        assert!(v.admit(&primary, &EntryKey::new("r", [200; 32]), long));
    }
}
