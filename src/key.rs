//! Cache key derivation: the one place that decides which request inputs select a response.
//!
//! Every input that can change the response is hashed (promise 3: no unkeyed inputs): the
//! method class, the host, the path, the query with its parameters sorted (minus an ignore
//! list), the values of the route's declared `Vary` headers and the user scope. Raw request
//! text never reaches a store key; only the route id (configuration) and the digest do.

use std::fmt;
use std::sync::Arc;

use http::header::HeaderName;
use http::request::Parts;
use sha2::{Digest, Sha256};

/// The key of one cached response: the route it belongs to and a SHA-256 digest of the
/// request inputs that select it.
///
/// Stores turn it into their own key format; `ValkeyStore` writes
/// `{namespace}:{schema}:e:{route}:{hex digest}`. [`CacheLayer::entry_key`](crate::CacheLayer::entry_key)
/// tells the key of a request.
///
/// ```
/// use tower_cache_aside::EntryKey;
///
/// let key = EntryKey::new("events_id", [0u8; 32]);
/// assert_eq!(key.to_string(), format!("events_id:{}", "0".repeat(64)));
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct EntryKey {
    route: Arc<str>,
    digest: [u8; 32],
    /// What a cluster places the key by: the start of its digest, or of its primary's for a
    /// variant (so that a variant lives on the node its URL's lookup read).
    group: [u8; 4],
}

impl EntryKey {
    /// Builds a key from a route id and a digest (for custom stores and tests).
    pub fn new(route: impl Into<Arc<str>>, digest: [u8; 32]) -> Self {
        EntryKey {
            route: route.into(),
            group: [digest[0], digest[1], digest[2], digest[3]],
            digest,
        }
    }

    /// The id of the route this entry belongs to.
    pub fn route(&self) -> &str {
        &self.route
    }

    /// The SHA-256 digest of the request inputs.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }

    /// Another key of the same route, placed with this one.
    pub(crate) fn with_digest(&self, digest: [u8; 32]) -> EntryKey {
        EntryKey {
            route: self.route.clone(),
            digest,
            group: self.group,
        }
    }

    /// The bytes a cluster places the key by (its node): keys derived from one request
    /// share them.
    #[cfg_attr(not(feature = "valkey"), allow(dead_code))]
    pub(crate) fn group(&self) -> &[u8; 4] {
        &self.group
    }

    /// Appends `{route}:{hex digest}` to `out` (no intermediate allocation).
    pub fn write_to(&self, out: &mut String) {
        out.push_str(&self.route);
        out.push(':');
        crate::hex::push_hex(out, &self.digest);
    }
}

impl fmt::Debug for EntryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::with_capacity(self.route.len() + 65);
        self.write_to(&mut s);
        f.write_str(&s)
    }
}

impl fmt::Display for EntryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The SHA-256 of a request body, put in the request extensions by [`BodyDigest`](crate::body_digest::BodyDigest) for the
/// cache key. Private: only this crate's layer can put one there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RequestBodyDigest(pub(crate) [u8; 32]);

/// Query parameters left out of the key, such as tracking parameters (`utm_*`).
#[derive(Clone, Debug, Default)]
pub(crate) struct QueryFilter {
    exact: Vec<String>,
    prefixes: Vec<String>,
}

impl QueryFilter {
    pub(crate) fn add(&mut self, pattern: &str) {
        match pattern.strip_suffix('*') {
            Some(prefix) => self.prefixes.push(prefix.to_owned()),
            None => self.exact.push(pattern.to_owned()),
        }
    }

    fn ignores(&self, pair: &str) -> bool {
        let name = pair.split_once('=').map_or(pair, |(n, _)| n);
        self.exact.iter().any(|e| e == name) || self.prefixes.iter().any(|p| name.starts_with(p))
    }
}

/// Who a response is for, as it enters the key.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ScopeKey<'a> {
    Shared,
    Anonymous,
    User(&'a str),
}

/// Derives the key of a GET or HEAD request (both share the GET entry).
pub(crate) fn derive_key(
    route: &Arc<str>,
    parts: &Parts,
    vary: &[HeaderName],
    query_filter: &QueryFilter,
    scope: ScopeKey<'_>,
    body: Option<&[u8; 32]>,
) -> EntryKey {
    // Each field is its length (a varint) then its bytes, and each count a varint, so no two
    // different inputs hash the same bytes; a usual request (method, host, path, a short
    // query) then fits in one SHA-256 block. (Until 0.1 lengths were 8 bytes each: those
    // inputs began `03 00`, these `03 'G'` or `04 'P'`, so no key of one can equal a key
    // of the other.)
    let mut hasher = Sha256::new();
    let h = &mut hasher;
    // GET and HEAD share entries; a body-keyed POST is another kind of request.
    match body {
        None => field(h, b"GET"),
        Some(digest) => {
            field(h, b"POST");
            field(h, digest);
        }
    }
    field(h, &host(parts));
    field(
        h,
        crate::percent::normalize_path(parts.uri.path()).as_bytes(),
    );
    // The query as a sorted list of its `&`-separated pairs, ignored ones left out.
    match parts.uri.query() {
        None | Some("") => number(h, 0),
        Some(q) if !q.contains('&') => {
            let kept = !query_filter.ignores(q);
            number(h, u64::from(kept));
            if kept {
                field(h, q.as_bytes());
            }
        }
        Some(q) => {
            let mut pairs: Vec<&str> = q
                .split('&')
                .filter(|p| !p.is_empty() && !query_filter.ignores(p))
                .collect();
            // By name only, and stably: repeated names keep their order, which apps read
            // (`?page=2&page=1` is not `?page=1&page=2` to a handler taking the last value).
            // By the name a handler sees (`%70` is `p` to it), with one rule for every
            // comparison so that the order is total (a mixed rule is not, and sorting
            // panics). Plain names are their own decoded form: no allocation then.
            if pairs
                .iter()
                .any(|p| !param_name(p).bytes().all(|b| b.is_ascii() && b != b'%'))
            {
                let name = |p: &str| crate::percent::decode_for_tags(param_name(p)).into_owned();
                pairs.sort_by_cached_key(|p| name(p));
            } else {
                pairs.sort_by(|a, b| param_name(a).cmp(param_name(b)));
            }
            number(h, pairs.len() as u64);
            for p in pairs {
                field(h, p.as_bytes());
            }
        }
    }
    for name in vary {
        field(h, name.as_str().as_bytes());
        let values = parts.headers.get_all(name);
        if crate::compress::is_accept_encoding(name) {
            // One entry per set of codings, not per spelling of the header.
            let joined: Vec<&[u8]> = values.iter().map(|v| v.as_bytes()).collect();
            let normalized = crate::compress::normalized_accept_encoding(&joined.join(&b","[..]));
            field(h, normalized.as_bytes());
            continue;
        }
        number(h, values.iter().count() as u64);
        for v in values {
            field(h, v.as_bytes());
        }
    }
    match scope {
        ScopeKey::Shared => field(h, b"s"),
        ScopeKey::Anonymous => field(h, b"a"),
        ScopeKey::User(u) => {
            field(h, b"u");
            field(h, u.as_bytes());
        }
    }
    EntryKey::new(route.clone(), hasher.finalize().into())
}

/// A field of the key's input: its length, then its bytes.
fn field(h: &mut Sha256, bytes: &[u8]) {
    number(h, bytes.len() as u64);
    h.update(bytes);
}

/// A count in the key's input, as a varint.
fn number(h: &mut Sha256, n: u64) {
    let mut buf = [0u8; 10];
    let len = varint(n, &mut buf);
    h.update(&buf[..len]);
}

/// `n` as LEB128 (7 bits a byte, low first) into `buf`; the bytes written.
fn varint(mut n: u64, buf: &mut [u8; 10]) -> usize {
    let mut len = 0;
    loop {
        let low = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            buf[len] = low;
            return len + 1;
        }
        buf[len] = low | 0x80;
        len += 1;
    }
}

/// A query pair's name: what comes before its first `=`.
fn param_name(pair: &str) -> &str {
    pair.split_once('=').map_or(pair, |(name, _)| name)
}

/// The request's host, lower-cased (the raw bytes, UTF-8 or not).
fn host(parts: &Parts) -> std::borrow::Cow<'_, [u8]> {
    let raw = crate::tags::request_host(&parts.headers, &parts.uri);
    if raw.iter().any(u8::is_ascii_uppercase) {
        raw.to_ascii_lowercase().into()
    } else {
        raw.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HOST;
    use http::Request;

    fn key(uri: &str, headers: &[(&str, &str)], vary: &[&str], filter: &QueryFilter) -> EntryKey {
        let mut b = Request::get(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let (parts, ()) = b.body(()).unwrap().into_parts();
        let vary: Vec<HeaderName> = vary.iter().map(|v| v.parse().unwrap()).collect();
        derive_key(
            &Arc::from("r"),
            &parts,
            &vary,
            filter,
            ScopeKey::Shared,
            None,
        )
    }

    #[test]
    fn the_key_input_is_the_documented_byte_stream() {
        // Each field its varint length then its bytes; the query a count then fields. Pinned,
        // so that entries stored by an earlier build keep their keys.
        let f = QueryFilter::default();
        for path in ["/p".to_owned(), format!("/{}", "p".repeat(300))] {
            let got = key(&format!("{path}?x=1"), &[("host", "a.example")], &[], &f);
            let mut input = vec![3];
            input.extend_from_slice(b"GET");
            input.push(9);
            input.extend_from_slice(b"a.example");
            let mut len = [0u8; 10];
            let n = varint(path.len() as u64, &mut len);
            input.extend_from_slice(&len[..n]);
            input.extend_from_slice(path.as_bytes());
            input.extend_from_slice(&[1, 3]);
            input.extend_from_slice(b"x=1");
            input.extend_from_slice(&[1, b's']);
            let want: [u8; 32] = Sha256::digest(&input).into();
            assert_eq!(got.digest(), &want, "{} bytes of path", path.len());
        }
    }

    #[test]
    fn counts_are_leb128() {
        let cases: [(u64, &[u8]); 5] = [
            (0, &[0]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (300, &[0xac, 0x02]),
            (
                u64::MAX,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ];
        for (n, want) in cases {
            let mut buf = [0u8; 10];
            let len = varint(n, &mut buf);
            assert_eq!(&buf[..len], want, "{n}");
        }
    }

    #[test]
    fn query_order_does_not_split_keys() {
        let f = QueryFilter::default();
        assert_eq!(
            key("/a?x=1&y=2", &[], &[], &f),
            key("/a?y=2&x=1", &[], &[], &f)
        );
        assert_ne!(
            key("/a?x=1&y=2", &[], &[], &f),
            key("/a?x=2&y=1", &[], &[], &f)
        );
        assert_ne!(key("/a?x=1", &[], &[], &f), key("/a", &[], &[], &f));
    }

    #[test]
    fn repeated_names_keep_their_order() {
        let f = QueryFilter::default();
        // A handler taking the last value answers these two differently.
        assert_ne!(
            key("/a?page=2&page=1", &[], &[], &f),
            key("/a?page=1&page=2", &[], &[], &f)
        );
        assert_eq!(
            key("/a?page=2&b=0&page=1", &[], &[], &f),
            key("/a?b=0&page=2&page=1", &[], &[], &f)
        );
        // Names spelled with escapes, raw bytes and stray `%`s: a total order, no panic.
        let odd = "/a?%7A=1&y=2&%=3&z=4&%25=5&%C3%A9=6&\u{e9}=7&%zz=8";
        assert_eq!(key(odd, &[], &[], &f), key(odd, &[], &[], &f));
        // A name spelled with an escape is the same name to the handler.
        assert_ne!(
            key("/a?p=1&%70=2", &[], &[], &f),
            key("/a?%70=2&p=1", &[], &[], &f)
        );
    }

    #[test]
    fn ignored_params_are_dropped() {
        let mut f = QueryFilter::default();
        f.add("utm_*");
        f.add("fbclid");
        assert_eq!(
            key("/a?x=1&utm_source=z", &[], &[], &f),
            key("/a?x=1", &[], &[], &f)
        );
        assert_eq!(key("/a?fbclid=9", &[], &[], &f), key("/a", &[], &[], &f));
        assert_ne!(key("/a?fbclidx=9", &[], &[], &f), key("/a", &[], &[], &f));
    }

    #[test]
    fn host_path_and_vary_split_keys() {
        let f = QueryFilter::default();
        let a = key("/a", &[("host", "a.example")], &[], &f);
        assert_ne!(a, key("/a", &[("host", "b.example")], &[], &f));
        assert_eq!(a, key("/a", &[("host", "A.example")], &[], &f));
        assert_ne!(key("/a/b", &[], &[], &f), key("/a%2Fb", &[], &[], &f));
        let en = key("/a", &[("accept-language", "en")], &["accept-language"], &f);
        let fr = key("/a", &[("accept-language", "fr")], &["accept-language"], &f);
        assert_ne!(en, fr);
        // Hosts that are not UTF-8 still split keys (no fallback to a shared empty host).
        let odd = |h: &[u8]| {
            let (mut parts, ()) = Request::get("/a").body(()).unwrap().into_parts();
            parts
                .headers
                .insert(HOST, http::HeaderValue::from_bytes(h).unwrap());
            derive_key(&Arc::from("r"), &parts, &[], &f, ScopeKey::Shared, None)
        };
        assert_ne!(odd(b"\xffa"), odd(b"\xffb"));
        assert_ne!(odd(b"\xffa"), key("/a", &[], &[], &f));
        // an undeclared header does not split
        assert_eq!(
            key("/a", &[("x-other", "1")], &[], &f),
            key("/a", &[("x-other", "2")], &[], &f)
        );
    }

    #[test]
    fn framing_prevents_ambiguity() {
        let f = QueryFilter::default();
        assert_ne!(key("/a?b&c", &[], &[], &f), key("/a?b%26c", &[], &[], &f));
        assert_ne!(key("/ab?", &[], &[], &f), key("/a?b", &[], &[], &f));
    }

    #[test]
    fn display_is_route_and_hex() {
        let k = EntryKey::new("events", [0xab; 32]);
        assert_eq!(k.to_string(), format!("events:{}", "ab".repeat(32)));
    }
}
