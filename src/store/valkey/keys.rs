//! Key names and values written straight into a command's buffer, and lease tokens.

use bb8_redis::redis;

use crate::key::EntryKey;
use crate::store::records::Stamp;
use crate::store::Fence;

/// `{prefix}{route}:{hex digest}`, written straight into a command's buffer: a lookup
/// allocates no key string. On a cluster, `{prefix}{route}:{{group}}{hex digest}`: the hash
/// tag places a URL's variants on the node of the URL's own entry.
#[derive(Clone, Copy)]
pub(super) struct KeyArg<'a> {
    pub(super) prefix: &'a str,
    pub(super) key: &'a EntryKey,
    pub(super) tagged: bool,
}

impl redis::ToRedisArgs for KeyArg<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write;
        let mut arg = out.writer_for_next_arg();
        // Writing into the command's Vec cannot fail.
        let _ = arg.write_all(self.prefix.as_bytes());
        let _ = arg.write_all(self.key.route().as_bytes());
        let _ = arg.write_all(b":");
        if self.tagged {
            let _ = arg.write_all(b"{");
            for &b in self.key.group() {
                let _ = arg.write_all(&crate::hex::hex_pair(b));
            }
            let _ = arg.write_all(b"}");
        }
        let _ = arg.write_all(&crate::hex::hex(self.key.digest()));
    }
}

/// An entry behind its stamp (the fence and tag ids it is checked against on read), as one
/// argument: the entry is copied once, into the command.
pub(super) struct StampedValue<'a> {
    pub(super) fence: Fence,
    pub(super) ids: &'a [u64],
    pub(super) entry: &'a [u8],
}

impl redis::ToRedisArgs for StampedValue<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write;
        let mut arg = out.writer_for_next_arg();
        // Writing into the command's Vec cannot fail.
        let _ = Stamp::write(&mut arg, self.fence, self.ids);
        let _ = arg.write_all(self.entry);
    }
}

/// A token no other lease holder will have: the process's random hasher keys over a counter.
pub(super) fn lease_token() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static KEYS: std::sync::LazyLock<std::collections::hash_map::RandomState> =
        std::sync::LazyLock::new(std::collections::hash_map::RandomState::new);
    let mut h = KEYS.build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}
