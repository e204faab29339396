//! Lower-case hex for digests: into a `String`, or on the stack.

pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    out.reserve(bytes.len() * 2);
    for b in bytes {
        let [hi, lo] = hex_pair(*b);
        out.push(hi as char);
        out.push(lo as char);
    }
}

/// A digest in lower-case hex, on the stack.
#[cfg_attr(not(feature = "valkey"), allow(dead_code))]
pub(crate) fn hex(digest: &[u8; 32]) -> [u8; 64] {
    let mut out = [0u8; 64];
    for (pair, b) in out.chunks_exact_mut(2).zip(digest) {
        pair.copy_from_slice(&hex_pair(*b));
    }
    out
}

pub(crate) fn hex_pair(b: u8) -> [u8; 2] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    [HEX[(b >> 4) as usize], HEX[(b & 0xf) as usize]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_hex_matches_string_hex() {
        let digest: [u8; 32] = std::array::from_fn(|i| (i * 37 + 5) as u8);
        let mut s = String::new();
        push_hex(&mut s, &digest);
        assert_eq!(std::str::from_utf8(&hex(&digest)).unwrap(), s);
        assert!(s.starts_with("052a4f"), "{s}");
    }
}
