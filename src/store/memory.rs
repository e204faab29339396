//! The in-process store: a byte-bounded moka cache with per-entry TTLs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::sync::Cache;
use moka::Expiry;

use super::{Fill, FillOutcome, Lookup, Store};
use crate::error::StoreError;
use crate::key::EntryKey;

/// Bookkeeping bytes counted per entry on top of its key and value (moka's node, the
/// `Arc`s and the map slot, measured roughly).
const ENTRY_OVERHEAD: u32 = 160;

/// An in-process store bounded by bytes: the embedded default that needs no server.
///
/// Clones share the same cache. Entries are evicted least-recently-used (moka's TinyLFU)
/// when the byte budget is reached, and expire after their TTL.
///
/// ```
/// use tower_cache_aside::{CacheLayer, MemoryStore};
///
/// let layer = CacheLayer::new(MemoryStore::new(64 * 1024 * 1024)); // 64 MiB
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<MemoryInner>,
}

struct MemoryInner {
    cache: Cache<EntryKey, MemValue>,
    sequence: AtomicU64,
}

#[derive(Clone)]
struct MemValue {
    bytes: Bytes,
    ttl: Duration,
}

struct PerEntryTtl;

impl Expiry<EntryKey, MemValue> for PerEntryTtl {
    fn expire_after_create(&self, _: &EntryKey, value: &MemValue, _: Instant) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _: &EntryKey,
        value: &MemValue,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

impl MemoryStore {
    /// A store holding at most `max_bytes` of keys, entries and bookkeeping.
    pub fn new(max_bytes: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|k: &EntryKey, v: &MemValue| {
                let size = k.route().len() + 32 + v.bytes.len();
                u32::try_from(size)
                    .unwrap_or(u32::MAX)
                    .saturating_add(ENTRY_OVERHEAD)
            })
            .expire_after(PerEntryTtl)
            .build();
        MemoryStore {
            inner: Arc::new(MemoryInner {
                cache,
                sequence: AtomicU64::new(0),
            }),
        }
    }

    /// Number of entries (approximate until pending maintenance has run).
    pub fn entry_count(&self) -> u64 {
        self.inner.cache.run_pending_tasks();
        self.inner.cache.entry_count()
    }

    /// Bytes in use as counted against the budget.
    pub fn weighted_size(&self) -> u64 {
        self.inner.cache.run_pending_tasks();
        self.inner.cache.weighted_size()
    }

    /// Stores raw bytes under a key, bypassing the entry format (for tests of what the layer
    /// does with garbage).
    #[doc(hidden)]
    pub fn insert_raw(&self, key: EntryKey, bytes: Bytes, ttl: Duration) {
        self.inner.cache.insert(key, MemValue { bytes, ttl });
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.inner.cache.entry_count())
            .field("weighted_size", &self.inner.cache.weighted_size())
            .finish()
    }
}

impl Store for MemoryStore {
    async fn lookup(&self, key: &EntryKey) -> Result<Lookup, StoreError> {
        let fence = self.inner.sequence.load(Ordering::Acquire);
        let value = self.inner.cache.get(key).map(|v| v.bytes);
        Ok(Lookup { value, fence })
    }

    async fn fill(&self, fill: Fill) -> Result<FillOutcome, StoreError> {
        if fill.ttl.is_zero() {
            return Ok(FillOutcome::Stored);
        }
        let value = MemValue {
            bytes: fill.value,
            ttl: fill.ttl,
        };
        self.inner.cache.insert(fill.key, value);
        Ok(FillOutcome::Stored)
    }

    async fn remove(&self, key: &EntryKey) -> Result<bool, StoreError> {
        Ok(self.inner.cache.remove(key).is_some())
    }
}
