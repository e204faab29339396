#![doc = include_str!("../docs/guide.md")]
#![deny(missing_docs, unsafe_code, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "serde")]
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
pub mod admin;
pub mod body_digest;
mod breaker;
pub mod cache;
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

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

/// The README's code blocks, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
