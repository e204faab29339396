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
pub use store::{Fill, FillDone, FillOutcome, Invalidation, Lookup, Notice, Store, FENCE_WINDOW};
pub use tags::MAX_TAGS_PER_RESPONSE;
