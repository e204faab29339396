#![doc = include_str!("../README.md")]
#![deny(missing_docs, unsafe_code, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body_digest;
mod cache;
mod entry;
mod error;
mod handle;
mod invalidate;
mod key;
mod percent;
mod policy;
mod service_future;
mod stats;
mod store;
mod tags;

pub use body_digest::{BodyDigest, BodyDigestLayer, BufferedBody, RequestBodyDigest};
pub use cache::{Cache, CacheBody, CacheLayer, ResponseFuture, DEFAULT_MAX_BODY_BYTES};
pub use error::{ConfigError, StoreError};
pub use handle::CacheHandle;
pub use invalidate::{Invalidate, InvalidateLayer};
pub use key::EntryKey;
pub use policy::{
    is_valid_tag, CacheHint, InvalidateTags, RoutePolicy, RouteTable, Scope, DEFAULT_STATUSES,
    MAX_TAG_LEN,
};
pub use service_future::PassthroughOrBoxed;
pub use stats::{CacheStats, StatsSnapshot};
#[cfg(feature = "memory")]
pub use store::memory::MemoryStore;
#[cfg(all(feature = "valkey", feature = "memory"))]
pub use store::tiered::{TieredStore, DEFAULT_MAX_NEAR_TTL};
#[cfg(feature = "valkey")]
pub use store::valkey::{ValkeyStore, ValkeyStoreBuilder, DEFAULT_OPERATION_TIMEOUT};
pub use store::{Fence, Fill, FillDone, FillOutcome, Invalidation, Lookup, Notice, Store};
pub use tags::MAX_TAGS_PER_RESPONSE;

/// The entry format, for this crate's own benchmarks (`benches/hot_path.rs`). Not a stable
/// API: it may change in any release.
#[doc(hidden)]
pub mod __bench {
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    /// Encodes a 200 response with these headers, body and tags, as the store keeps it.
    pub fn encode_entry(headers: &HeaderMap, body: Bytes, tags: Vec<String>) -> Bytes {
        crate::entry::Entry {
            status: StatusCode::OK,
            headers: headers.clone(),
            body,
            trailers: None,
            stored_at_ms: crate::entry::now_ms(),
            lifetime_ms: 300_000,
            initial_age_s: 0,
            fence: crate::store::Fence::new(1, 1),
            stale_while_revalidate_ms: 0,
            stale_if_error_ms: 0,
            tags,
        }
        .encode()
    }

    /// Decodes an entry as a hit does; returns its body length and header count.
    pub fn decode_entry(encoded: Bytes) -> Option<(usize, usize)> {
        let entry = crate::entry::Entry::decode(encoded).ok()?;
        Some((entry.body.len(), entry.headers.len()))
    }
}
