//! Stored compression: one compressed representation kept per entry, served to each client
//! in the best coding it accepts (the stored bytes as they are, or decompressed on the way
//! out for a client that accepts none), as Varnish does with gzip.
//!
//! - What is compressed: bodies of at least [`MIN_COMPRESS_BYTES`] with a text-like
//!   `Content-Type`, no `Content-Encoding` of their own, and no `Cache-Control:
//!   no-transform`; kept only when compression makes them smaller.
//! - A compressed representation has its own validator (RFC 9110 §8.8.3): a strong or weak
//!   `ETag` `"x"` becomes `"x-gzip"` (`"x-br"`), and the suffix comes off again for a client
//!   served the identity bytes.
//! - Bodies the handler compressed itself are stored as they are and negotiated the same
//!   way (decompressed for a client that does not accept their coding, unless the response
//!   says `no-transform`).

use std::io::{Read, Write};

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_TYPE, ETAG, VARY};
use http::{HeaderMap, HeaderValue};

/// Bodies smaller than this are stored as they are: a few hundred bytes gain little, and
/// small responses often fit one packet anyway.
pub const MIN_COMPRESS_BYTES: usize = 1024;

/// A content coding the layer can store bodies in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Encoding {
    /// gzip (RFC 1952), level 6: understood by every client.
    Gzip,
    /// Brotli (RFC 7932), quality 5: smaller than gzip for text at a similar cost. Needs the
    /// `brotli` feature; clients that do not accept it get gzip's fallback, the identity
    /// bytes.
    #[cfg(feature = "brotli")]
    #[cfg_attr(docsrs, doc(cfg(feature = "brotli")))]
    Brotli,
}

impl Encoding {
    /// The `Content-Encoding` token.
    pub fn token(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            #[cfg(feature = "brotli")]
            Encoding::Brotli => "br",
        }
    }

    fn from_token(token: &str) -> Option<Self> {
        match token.trim() {
            t if t.eq_ignore_ascii_case("gzip") || t.eq_ignore_ascii_case("x-gzip") => {
                Some(Encoding::Gzip)
            }
            #[cfg(feature = "brotli")]
            t if t.eq_ignore_ascii_case("br") => Some(Encoding::Brotli),
            _ => None,
        }
    }

    /// `body` compressed, or `None` when that would not make it smaller.
    pub(crate) fn compress(self, body: &[u8]) -> Option<Bytes> {
        let out = match self {
            Encoding::Gzip => {
                let level = flate2::Compression::new(6);
                let mut w =
                    flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 3), level);
                w.write_all(body).ok()?;
                w.finish().ok()?
            }
            #[cfg(feature = "brotli")]
            Encoding::Brotli => {
                let mut out = Vec::with_capacity(body.len() / 3);
                {
                    let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                    w.write_all(body).ok()?;
                }
                out
            }
        };
        (out.len() < body.len()).then(|| Bytes::from(out))
    }

    /// `body` decompressed, or `None` when it is not valid or would exceed `limit` bytes
    /// (a small body may expand a thousandfold).
    pub(crate) fn decompress(self, body: &[u8], limit: usize) -> Option<Bytes> {
        let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit));
        let cap = limit as u64 + 1;
        let read = match self {
            // Every member: a handler's gzip may be several files concatenated.
            Encoding::Gzip => flate2::read::MultiGzDecoder::new(body)
                .take(cap)
                .read_to_end(&mut out),
            #[cfg(feature = "brotli")]
            Encoding::Brotli => brotli::Decompressor::new(body, 4096)
                .take(cap)
                .read_to_end(&mut out),
        };
        (read.is_ok() && out.len() <= limit).then(|| Bytes::from(out))
    }
}

/// Whether a response's body may be compressed for storing.
pub(crate) fn compressible(headers: &HeaderMap, len: usize) -> bool {
    len >= MIN_COMPRESS_BYTES
        && !headers.contains_key(CONTENT_ENCODING)
        && !no_transform(headers)
        && headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(text_like)
}

/// Whether the response forbids intermediaries to transform it.
pub(crate) fn no_transform(headers: &HeaderMap) -> bool {
    headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
}

/// Media types that compress well: text, JSON, XML, JavaScript, SVG, WebAssembly.
fn text_like(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let (kind, sub) = essence.split_once('/').unwrap_or((essence.as_str(), ""));
    kind == "text"
        || sub.ends_with("+json")
        || sub.ends_with("+xml")
        || matches!(
            (kind, sub),
            ("application", "json")
                | ("application", "javascript")
                | ("application", "ecmascript")
                | ("application", "xml")
                | ("application", "x-ndjson")
                | ("application", "wasm")
                | ("application", "graphql-response+json")
                | ("image", "svg+xml")
        )
}

/// Turns the headers of an identity response into those of its compressed representation:
/// `Content-Encoding`, the `ETag` suffixed, `Vary: Accept-Encoding`.
pub(crate) fn mark_compressed(headers: &mut HeaderMap, encoding: Encoding) {
    headers.insert(CONTENT_ENCODING, HeaderValue::from_static(encoding.token()));
    // They describe the identity bytes: ranges and digests of those mean nothing now.
    for name in [
        "accept-ranges",
        "content-digest",
        "repr-digest",
        "digest",
        "content-md5",
    ] {
        headers.remove(name);
    }
    if let Some(etag) = headers.get(ETAG).and_then(|e| suffixed(e, encoding)) {
        headers.insert(ETAG, etag);
    }
    add_vary_accept_encoding(headers);
}

/// Adds `Accept-Encoding` to `Vary` unless it is there (or `Vary: *`).
pub(crate) fn add_vary_accept_encoding(headers: &mut HeaderMap) {
    let star = headers.get_all(VARY).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|n| n.trim() == "*"))
    });
    if !star && !varies_on_accept_encoding(headers) {
        headers.append(VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// Whether a response says its coding depends on `Accept-Encoding`: only such entries are
/// negotiated on hits. One that does not (an origin that always sends gzip) is served as the
/// origin sent it.
pub(crate) fn varies_on_accept_encoding(headers: &HeaderMap) -> bool {
    headers
        .get_all(VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|n| n.trim().eq_ignore_ascii_case("accept-encoding"))
}

/// `"x"` → `"x-gzip"`, `W/"x"` → `W/"x-gzip"`.
fn suffixed(etag: &HeaderValue, encoding: Encoding) -> Option<HeaderValue> {
    let text = etag.to_str().ok()?;
    let quoted = text.strip_suffix('"')?;
    HeaderValue::from_str(&format!("{quoted}-{}\"", encoding.token())).ok()
}

/// The `ETag` the origin gave a representation the layer compressed (`"x-gzip"` → `"x"`);
/// the tag as it is otherwise.
pub(crate) fn origin_etag(etag: &HeaderValue, headers: &HeaderMap) -> HeaderValue {
    let ours = headers
        .get(CONTENT_ENCODING)
        .and_then(|c| c.to_str().ok())
        .and_then(Encoding::from_token)
        .filter(|_| varies_on_accept_encoding(headers));
    ours.and_then(|e| unsuffixed(etag, e))
        .unwrap_or_else(|| etag.clone())
}

/// The identity representation's `ETag` from a compressed one's, when the suffix is ours.
fn unsuffixed(etag: &HeaderValue, encoding: Encoding) -> Option<HeaderValue> {
    let text = etag.to_str().ok()?;
    let suffix = format!("-{}\"", encoding.token());
    let stem = text.strip_suffix(suffix.as_str())?;
    HeaderValue::from_str(&format!("{stem}\"")).ok()
}

/// What a client gets of a stored body with this `Content-Encoding`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Served {
    /// The stored bytes, as they are.
    AsStored,
    /// Decompressed, in this coding.
    Identity(Encoding),
    /// A coding the client does not accept and the layer cannot undo.
    Unservable,
}

/// Chooses how to serve a body stored in `stored` coding to a client that sent
/// `accept` (RFC 9110 §12.5.3 q-values and `*`). A client that sends no `Accept-Encoding`
/// gets the identity bytes: the RFC lets a server send it anything, but such clients are
/// mostly plain tools (`curl` without `--compressed`, simple HTTP libraries) that cannot
/// decode it, and Varnish and nginx decompress for them too.
pub(crate) fn negotiate(
    stored: &HeaderValue,
    accept: Option<&HeaderValue>,
    headers: &HeaderMap,
) -> Served {
    let Some(stored_token) = stored.to_str().ok().map(str::trim) else {
        return Served::Unservable;
    };
    if stored_token.eq_ignore_ascii_case("identity") {
        return Served::AsStored;
    }
    if accept.is_some_and(|a| accepts(a, stored_token)) {
        return Served::AsStored;
    }
    match Encoding::from_token(stored_token) {
        Some(e) if !no_transform(headers) => Served::Identity(e),
        _ => Served::Unservable,
    }
}

/// Whether an `Accept-Encoding` value accepts `coding` (q > 0, by name or by `*`).
fn accepts(accept: &HeaderValue, coding: &str) -> bool {
    let Ok(accept) = accept.to_str() else {
        return false;
    };
    let mut star = None;
    for (name, q) in crate::headers::weighted(accept) {
        let same = name.eq_ignore_ascii_case(coding)
            || (coding.eq_ignore_ascii_case("gzip") && name.eq_ignore_ascii_case("x-gzip"));
        if same {
            return q > 0.0;
        }
        if name == "*" {
            star = Some(q > 0.0);
        }
    }
    star.unwrap_or(false)
}

/// The headers of the identity representation served from a stored compressed one.
pub(crate) fn identity_headers(headers: &mut HeaderMap, encoding: Encoding, len: usize) {
    headers.remove(CONTENT_ENCODING);
    headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
    match headers.get(ETAG).map(|e| unsuffixed(e, encoding)) {
        Some(Some(identity)) => {
            headers.insert(ETAG, identity);
        }
        // The handler's tag names its compressed bytes: the identity has none of its own.
        Some(None) => {
            headers.remove(ETAG);
        }
        None => {}
    }
}

/// An `Accept-Encoding` value as a key input: the codings accepted (q > 0), lower-cased,
/// sorted, deduplicated; so `gzip, br` and `br;q=1.0,GZIP` share one entry.
pub(crate) fn normalized_accept_encoding(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    let mut codings: Vec<String> = crate::headers::weighted(&text)
        .filter(|(_, q)| *q > 0.0)
        .map(|(name, _)| name.to_ascii_lowercase())
        .collect();
    codings.sort();
    codings.dedup();
    codings.join(",")
}

/// A request's `Accept-Encoding`, its lines joined into one list (usually one line: no
/// copy beyond a reference count).
pub(crate) fn accept_encoding(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut lines = headers.get_all(ACCEPT_ENCODING).iter();
    let first = lines.next()?;
    let rest: Vec<&HeaderValue> = lines.collect();
    if rest.is_empty() {
        return Some(first.clone());
    }
    let joined: Vec<&[u8]> = std::iter::once(first)
        .chain(rest)
        .map(HeaderValue::as_bytes)
        .collect();
    HeaderValue::from_bytes(&joined.join(&b","[..])).ok()
}

/// Takes the layer's coding suffix off the entity-tags in a request's preconditions
/// (`If-Match: "x-gzip"` → `"x"`): a client that got a compressed representation sends its
/// tag back with a write, and the origin only knows its own. Only for routes that compress.
pub(crate) fn strip_validator_suffixes(headers: &mut HeaderMap) {
    use http::header::{IF_MATCH, IF_NONE_MATCH, IF_RANGE};
    for name in [IF_MATCH, IF_NONE_MATCH, IF_RANGE] {
        let Some(value) = headers.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        let mut changed = false;
        let tags: Vec<String> = value
            .split(',')
            .map(|tag| {
                let tag = tag.trim();
                for suffix in ["-gzip\"", "-br\""] {
                    if let Some(stem) = tag.strip_suffix(suffix) {
                        changed = true;
                        return format!("{stem}\"");
                    }
                }
                tag.to_owned()
            })
            .collect();
        if changed {
            if let Ok(v) = HeaderValue::from_str(&tags.join(", ")) {
                headers.insert(name, v);
            }
        }
    }
}

/// Whether this request header is `Accept-Encoding`.
pub(crate) fn is_accept_encoding(name: &http::HeaderName) -> bool {
    name == ACCEPT_ENCODING
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn gzip_round_trips_and_refuses_what_does_not_shrink() {
        let body = "{\"a\":1}".repeat(500);
        let gz = Encoding::Gzip.compress(body.as_bytes()).unwrap();
        assert!(gz.len() < body.len() / 10);
        assert_eq!(
            Encoding::Gzip.decompress(&gz, 1 << 20).unwrap(),
            body.as_bytes()
        );
        assert!(
            Encoding::Gzip.decompress(&gz, 100).is_none(),
            "over the limit"
        );
        assert!(Encoding::Gzip.decompress(b"not gzip", 1 << 20).is_none());
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let random: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        assert!(Encoding::Gzip.compress(&random).is_none());
    }

    #[cfg(feature = "brotli")]
    #[test]
    fn brotli_round_trips() {
        let body = "{\"a\":1}".repeat(500);
        let br = Encoding::Brotli.compress(body.as_bytes()).unwrap();
        assert_eq!(
            Encoding::Brotli.decompress(&br, 1 << 20).unwrap(),
            body.as_bytes()
        );
    }

    #[test]
    fn negotiation_follows_q_values() {
        let gzip = value("gzip");
        let h = HeaderMap::new();
        let n = |accept: Option<&str>| negotiate(&gzip, accept.map(value).as_ref(), &h);
        assert_eq!(n(None), Served::Identity(Encoding::Gzip));
        assert_eq!(n(Some("gzip, deflate, br")), Served::AsStored);
        assert_eq!(n(Some("GZIP;q=0.5")), Served::AsStored);
        assert_eq!(n(Some("x-gzip")), Served::AsStored);
        assert_eq!(n(Some("*")), Served::AsStored);
        assert_eq!(n(Some("br")), Served::Identity(Encoding::Gzip));
        assert_eq!(n(Some("gzip;q=0, *")), Served::Identity(Encoding::Gzip));
        assert_eq!(n(Some("identity")), Served::Identity(Encoding::Gzip));
        assert_eq!(n(Some("")), Served::Identity(Encoding::Gzip));
        let mut no_transform = HeaderMap::new();
        no_transform.insert(CACHE_CONTROL, value("max-age=60, no-transform"));
        assert_eq!(
            negotiate(&gzip, Some(&value("br")), &no_transform),
            Served::Unservable
        );
        assert_eq!(
            negotiate(&value("compress"), Some(&value("gzip")), &h),
            Served::Unservable
        );
    }

    #[test]
    fn compressed_representations_have_their_own_etags() {
        let mut h = HeaderMap::new();
        h.insert(ETAG, value("W/\"v1\""));
        mark_compressed(&mut h, Encoding::Gzip);
        assert_eq!(h[ETAG], "W/\"v1-gzip\"");
        assert_eq!(h[CONTENT_ENCODING], "gzip");
        assert_eq!(h[VARY], "accept-encoding");
        identity_headers(&mut h, Encoding::Gzip, 42);
        assert_eq!(h[ETAG], "W/\"v1\"");
        assert_eq!(h[http::header::CONTENT_LENGTH], "42");
        assert!(!h.contains_key(CONTENT_ENCODING));
        // A handler's own tag for its gzip bytes does not name the identity bytes.
        let mut own = HeaderMap::new();
        own.insert(ETAG, value("\"handler\""));
        identity_headers(&mut own, Encoding::Gzip, 1);
        assert!(!own.contains_key(ETAG));
    }

    #[test]
    fn what_is_compressible() {
        let h = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(CONTENT_TYPE, value(ct));
            h
        };
        assert!(compressible(&h("application/json"), 2048));
        assert!(compressible(&h("text/html; charset=utf-8"), 2048));
        assert!(compressible(&h("application/problem+json"), 2048));
        assert!(compressible(&h("image/svg+xml"), 2048));
        assert!(!compressible(&h("application/json"), 100), "small");
        assert!(!compressible(&h("image/png"), 2048));
        assert!(!compressible(&h("application/octet-stream"), 2048));
        assert!(!compressible(&HeaderMap::new(), 2048), "no type");
        let mut encoded = h("application/json");
        encoded.insert(CONTENT_ENCODING, value("gzip"));
        assert!(!compressible(&encoded, 2048));
        let mut nt = h("application/json");
        nt.insert(CACHE_CONTROL, value("no-transform"));
        assert!(!compressible(&nt, 2048));
    }

    #[test]
    fn precondition_tags_lose_the_coding_suffix() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::IF_MATCH,
            value("\"v1-gzip\", W/\"v2-br\", \"v3\""),
        );
        strip_validator_suffixes(&mut h);
        assert_eq!(h[http::header::IF_MATCH], "\"v1\", W/\"v2\", \"v3\"");
    }

    #[test]
    fn accept_encoding_normalizes() {
        let n = |s: &str| normalized_accept_encoding(s.as_bytes());
        assert_eq!(n("gzip, br"), n("br;q=1.0,GZIP"));
        assert_eq!(n("gzip, deflate;q=0"), "gzip");
        assert_eq!(n(""), "");
    }
}
