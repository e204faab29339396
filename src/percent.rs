//! One spelling for equivalent URIs. Clients spell a resource more than one way
//! (`/users/alice@example.com` and `/users/alice%40example.com`, `%31` and `1`, `%2f` and
//! `%2F`), and web frameworks decode them to the same path parameter. Keys, tags and URI
//! clears must then agree, or a write spelled one way leaves the entry read the other way.

use std::borrow::Cow;

/// For keys: percent-escapes in upper-case hex, nothing decoded. Routers match the raw
/// path, so `/items/%66eatured` and `/items/featured` may reach different handlers: two
/// spellings may share an entry only if every server treats them alike, and only the case
/// of an escape's hex digits is that safe.
pub(crate) fn normalize_path(path: &str) -> Cow<'_, str> {
    rewrite(path, |_| false, false)
}

/// For tags and URI clears: every percent-encoded visible ASCII character decoded (`/`
/// too), other escapes in upper-case hex, and raw non-ASCII bytes encoded: what a framework
/// decoding path parameters sees, in one spelling (`café` and `caf%C3%A9` alike). Tags only
/// ever clear more for being merged.
pub(crate) fn decode_for_tags(value: &str) -> Cow<'_, str> {
    rewrite(value, |b| b.is_ascii_graphic(), true)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes `%XX` where `decode(byte)` says so, upper-cases the hex of the rest, and (with
/// `encode_raw`) percent-encodes raw non-ASCII bytes; returns the input untouched when it
/// has nothing to change.
fn rewrite(s: &str, decode: impl Fn(u8) -> bool, encode_raw: bool) -> Cow<'_, str> {
    let bytes = s.as_bytes();
    let escape = |i: usize| -> Option<u8> {
        if bytes.get(i) != Some(&b'%') {
            return None;
        }
        Some(hex_value(*bytes.get(i + 1)?)? << 4 | hex_value(*bytes.get(i + 2)?)?)
    };
    let needs = (0..bytes.len()).any(|i| {
        (encode_raw && !bytes[i].is_ascii())
            || escape(i).is_some_and(|b| {
                decode(b) || bytes[i + 1..i + 3].iter().any(u8::is_ascii_lowercase)
            })
    });
    if !needs {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    let push_escape = |out: &mut String, b: u8| {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        out.push('%');
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 15)] as char);
    };
    let mut i = 0;
    while i < bytes.len() {
        if let Some(b) = escape(i) {
            if decode(b) {
                out.push(b as char);
            } else {
                push_escape(&mut out, b);
            }
            i += 3;
        } else if encode_raw && !bytes[i].is_ascii() {
            push_escape(&mut out, bytes[i]);
            i += 1;
        } else if bytes[i].is_ascii() {
            // One ASCII byte as it is (a `%` that starts no escape included).
            out.push(bytes[i] as char);
            i += 1;
        } else {
            // A whole character (`i` is on a boundary: only whole characters and ASCII
            // moved it).
            let c = s[i..].chars().next().unwrap_or('\u{fffd}');
            out.push(c);
            i += c.len_utf8().max(1);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths_only_upper_case_hex() {
        assert_eq!(
            normalize_path("/items/%31"),
            "/items/%31",
            "not decoded: routers differ"
        );
        assert_eq!(normalize_path("/a%7eb%2fc"), "/a%7Eb%2Fc");
        assert_eq!(normalize_path("/caf%c3%a9"), "/caf%C3%A9");
        assert_eq!(
            normalize_path("/café"),
            "/café",
            "raw bytes stay in the key"
        );
        assert!(matches!(normalize_path("/plain/path"), Cow::Borrowed(_)));
    }

    #[test]
    fn tag_values_decode_what_frameworks_decode() {
        assert_eq!(decode_for_tags("alice%40example.com"), "alice@example.com");
        assert_eq!(decode_for_tags("alice@example.com"), "alice@example.com");
        assert_eq!(decode_for_tags("%31"), "1");
        assert_eq!(
            decode_for_tags("a%2fb"),
            "a/b",
            "a catch-all's slash, as axum decodes it"
        );
        assert_eq!(decode_for_tags("a%20b"), "a%20b", "a space stays encoded");
        assert_eq!(decode_for_tags("caf%c3%a9"), "caf%C3%A9");
        assert_eq!(
            decode_for_tags("café"),
            "caf%C3%A9",
            "raw UTF-8 meets its encoded spelling"
        );
    }

    #[test]
    fn broken_escapes_and_non_ascii_are_handled() {
        assert_eq!(decode_for_tags("é%41"), "%C3%A9A");
        assert_eq!(decode_for_tags("%%41"), "%A");
        assert_eq!(decode_for_tags("%zz"), "%zz");
        assert_eq!(decode_for_tags("%"), "%");
        assert_eq!(decode_for_tags("%4"), "%4");
        assert_eq!(normalize_path("é%4"), "é%4");
        assert_eq!(
            normalize_path("%b3%\u{fffd}3é"),
            "%B3%\u{fffd}3é",
            "found by fuzzing"
        );
    }
}
