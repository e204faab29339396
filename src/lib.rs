#![doc = include_str!("../docs/guide.md")]
#![deny(missing_docs, unsafe_code, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "serde")]
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
pub mod admin;
pub mod body_digest;
mod breaker;
pub mod cache;
pub(crate) mod clock;
mod compress;
mod engine;
mod entry;
mod error;
mod handle;
mod headers;
mod hex;
pub mod invalidate;
mod key;
mod lock;
mod percent;
mod policy;
mod service_future;
mod stats;
pub mod store;
mod tags;
pub mod warm;

pub use body_digest::BodyDigestLayer;
pub use cache::CacheLayer;
pub use compress::{Encoding, MIN_COMPRESS_BYTES};
pub use engine::RecentClear;
pub use error::{ConfigError, StoreError};
pub use handle::{CacheHandle, HotKey};
pub use invalidate::InvalidateLayer;
pub use key::EntryKey;
pub use policy::{CacheHint, InvalidateTags, RoutePolicy, RouteTable, Scope, DEFAULT_STATUSES};
pub use stats::{CacheStats, RouteStats, StatsSnapshot};
pub use tags::{is_valid_tag, MAX_TAGS_PER_RESPONSE, MAX_TAG_LEN};
pub use warm::{WarmReport, Warmer};

/// The hash map of the per-request paths (single flights, hot-key counts, `Vary` sightings):
/// foldhash, at a fraction of SipHash's cost, keyed from the OS's randomness (its keys, such
/// as cache key digests, follow from request inputs, so a client must not be able to
/// predict where they land).
pub(crate) type Map<K, V> = std::collections::HashMap<K, V, Keyed>;

/// foldhash seeded through std's `RandomState` (the OS's randomness) rather than foldhash's
/// own default seeding (addresses and the clock).
#[derive(Clone, Debug)]
pub(crate) struct Keyed(foldhash::fast::SeedableRandomState);

impl Default for Keyed {
    fn default() -> Self {
        use std::hash::{BuildHasher, Hasher};
        static SHARED: std::sync::LazyLock<foldhash::SharedSeed> =
            std::sync::LazyLock::new(|| foldhash::SharedSeed::from_u64(os_random()));
        fn os_random() -> u64 {
            std::hash::RandomState::new().build_hasher().finish()
        }
        Keyed(foldhash::fast::SeedableRandomState::with_seed(
            os_random(),
            std::sync::LazyLock::force(&SHARED),
        ))
    }
}

impl std::hash::BuildHasher for Keyed {
    type Hasher = foldhash::fast::FoldHasher<'static>;

    fn build_hasher(&self) -> Self::Hasher {
        self.0.build_hasher()
    }
}

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

/// The README's code blocks, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
