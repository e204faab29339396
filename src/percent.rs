//! One spelling for equivalent URIs. Clients spell a resource more than one way
//! (`/users/alice@example.com` and `/users/alice%40example.com`, `%31` and `1`, `%2f` and
//! `%2F`), and web frameworks decode them to the same path parameter. Keys, tags and URI
//! clears must then agree, or a write spelled one way leaves the entry read the other way.

use std::borrow::Cow;

/// RFC 3986 §6.2.2: percent-encoded unreserved characters decoded, the remaining
/// percent-encodings in upper-case hex. Spellings this makes equal mean the same to every
/// server, so they may share a cache entry.
pub(crate) fn normalize_path(path: &str) -> Cow<'_, str> {
    rewrite(path, |b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

/// For tags and URI clears: every percent-encoded visible ASCII character decoded except `/`
/// (which would move segment boundaries), the rest in upper-case hex: how a framework
/// decoding path parameters sees them. Over-matching only clears more.
pub(crate) fn decode_for_tags(value: &str) -> Cow<'_, str> {
    rewrite(value, |b| b.is_ascii_graphic() && b != b'/')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes `%XX` where `decode(byte)` says so, upper-cases the hex of the rest; returns the
/// input untouched when it has nothing to change.
fn rewrite(s: &str, decode: impl Fn(u8) -> bool) -> Cow<'_, str> {
    let bytes = s.as_bytes();
    let escape = |i: usize| -> Option<u8> {
        if bytes.get(i) != Some(&b'%') {
            return None;
        }
        Some(hex_value(*bytes.get(i + 1)?)? << 4 | hex_value(*bytes.get(i + 2)?)?)
    };
    let needs = (0..bytes.len()).any(|i| {
        escape(i)
            .is_some_and(|b| decode(b) || bytes[i + 1..i + 3].iter().any(u8::is_ascii_lowercase))
    });
    if !needs {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < bytes.len() {
        match escape(i) {
            Some(b) if decode(b) => {
                out.push(b as char);
                i += 3;
            }
            Some(_) => {
                out.push('%');
                out.push(bytes[i + 1].to_ascii_uppercase() as char);
                out.push(bytes[i + 2].to_ascii_uppercase() as char);
                i += 3;
            }
            // A `%` that starts no escape: kept as it is.
            None if bytes[i] == b'%' => {
                out.push('%');
                i += 1;
            }
            None => {
                // Up to the next `%` (`i` is a char boundary: only ASCII moved it).
                let next = s[i..].find('%').map_or(s.len(), |p| i + p);
                out.push_str(&s[i..next]);
                i = next;
            }
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_decode_unreserved_only() {
        assert_eq!(normalize_path("/items/%31"), "/items/1");
        assert_eq!(normalize_path("/a%7eb%2fc"), "/a~b%2Fc");
        assert_eq!(
            normalize_path("/users/alice%40example.com"),
            "/users/alice%40example.com"
        );
        assert_eq!(normalize_path("/caf%c3%a9"), "/caf%C3%A9");
        assert!(matches!(normalize_path("/plain/path"), Cow::Borrowed(_)));
    }

    #[test]
    fn tag_values_decode_what_frameworks_decode() {
        assert_eq!(decode_for_tags("alice%40example.com"), "alice@example.com");
        assert_eq!(decode_for_tags("alice@example.com"), "alice@example.com");
        assert_eq!(decode_for_tags("%31"), "1");
        assert_eq!(decode_for_tags("a%2fb"), "a%2Fb", "a slash stays encoded");
        assert_eq!(decode_for_tags("a%20b"), "a%20b", "a space stays encoded");
        assert_eq!(
            decode_for_tags("caf%c3%a9"),
            "caf%C3%A9",
            "non-ASCII stays encoded"
        );
    }

    #[test]
    fn broken_escapes_and_non_ascii_pass_unchanged() {
        for s in ["%", "%4", "%zz", "a%g1", "é%41", "%%41"] {
            let out = decode_for_tags(s);
            assert!(!out.is_empty() || s.is_empty());
        }
        assert_eq!(decode_for_tags("é%41"), "éA");
        assert_eq!(decode_for_tags("%%41"), "%A");
        assert_eq!(decode_for_tags("%zz"), "%zz");
    }
}
