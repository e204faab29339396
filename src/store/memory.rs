//! The in-process store: a byte-bounded moka cache with per-entry TTLs, checked on read
//! against clear records (see `records`): a clear costs O(tags), and an entry carrying a
//! cleared tag is dead from that moment, wherever it is.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::sync::Cache;
use moka::Expiry;

use super::records::{new_epoch, tag_id, Records, Shared, DEFAULT_MAX_RECORDS};
use super::{Fence, Fill, FillDone, FillOutcome, Invalidation, Lookup, Store, HOT_FADE};
use crate::error::StoreError;
use crate::key::EntryKey;

type Hasher = crate::Keyed;

/// Bytes counted per entry on top of its key, value and tags: moka's node, deques and timer
/// slots, the `Arc`s, the allocator's slack. Measured (benches/load.rs fills a 64 MiB store
/// with a million 1 KiB entries and compares the process's growth with the budget).
const ENTRY_OVERHEAD: usize = 560;

/// An in-process store bounded by bytes: the embedded default that needs no server.
///
/// Clones share the same cache. Entries are evicted by moka's TinyLFU policy when the byte
/// budget is reached, and expire after their TTL. A clear records each tag's clear (at most
/// 16,384 records, about 1 MiB beyond the budget, by default) and costs the same whatever
/// the tags carry; entries it made dead are dropped when next read, or by TTL and eviction.
///
/// ```
/// use tower_cache_aside::{CacheLayer, store::MemoryStore};
///
/// let layer = CacheLayer::new(MemoryStore::new(64 * 1024 * 1024)); // 64 MiB
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<MemoryInner>,
}

struct MemoryInner {
    cache: Cache<EntryKey, MemValue, Hasher>,
    /// Clears, purges and the sequence. Lookups read them under the read lock, so a clear
    /// (write lock) is either wholly before a lookup or wholly after it.
    records: Shared,
    /// The record of the most requested keys (`Store::record_hot`).
    hot: std::sync::Mutex<HashMap<Bytes, f64>>,
}

#[derive(Clone)]
struct MemValue {
    bytes: Bytes,
    ttl: Duration,
    fence: Fence,
    tags: Arc<[u64]>,
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
    /// A store holding at most `max_bytes` of keys and entries.
    pub fn new(max_bytes: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|k: &EntryKey, v: &MemValue| {
                let size = k.route().len() + 32 + v.bytes.len() + 8 * v.tags.len() + ENTRY_OVERHEAD;
                u32::try_from(size).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryTtl)
            // Keys are digests already: a fast keyed hash is enough (and moka's default,
            // SipHash, was a visible part of a hit).
            .build_with_hasher(Hasher::default());
        MemoryStore {
            inner: Arc::new(MemoryInner {
                cache,
                records: Shared::new(Records::new(new_epoch(), DEFAULT_MAX_RECORDS)),
                hot: Default::default(),
            }),
        }
    }

    /// The most clear records kept (default 16,384). Beyond it the oldest are dropped and
    /// every entry filled before them reads as a miss: memory stays bounded whatever the
    /// clear rate, at the price of extra misses when clears outrun it.
    #[must_use]
    pub fn max_clear_records(self, max: usize) -> Self {
        self.inner.records.write(|r| r.set_max(max));
        self
    }

    /// Number of entries (after pending maintenance has run). Entries made dead by a clear
    /// count until they are read, expire or are evicted.
    pub fn entry_count(&self) -> u64 {
        self.inner.cache.run_pending_tasks();
        self.inner.cache.entry_count()
    }

    /// Bytes in use as counted against the budget (after pending maintenance has run).
    pub fn weighted_size(&self) -> u64 {
        self.inner.cache.run_pending_tasks();
        self.inner.cache.weighted_size()
    }

    /// Number of clear records kept: bounded by [`max_clear_records`](Self::max_clear_records).
    pub fn clear_records(&self) -> usize {
        self.inner.records.read().len()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.inner.cache.entry_count())
            .field("weighted_size", &self.inner.cache.weighted_size())
            .field("clear_records", &self.clear_records())
            .finish()
    }
}

impl MemoryStore {
    /// Stores `fill` unless the records already say it is dead.
    pub(crate) fn fill_now(&self, fill: Fill) -> FillOutcome {
        if fill.ttl.is_zero() {
            return FillOutcome::Stored;
        }
        let tags: Arc<[u64]> = fill.tags.iter().map(|t| tag_id(t)).collect();
        if !self
            .inner
            .records
            .is_current(fill.fence, tags.iter().copied())
        {
            return FillOutcome::Fenced;
        }
        // A clear landing between the check and the insert is caught on read.
        let value = MemValue {
            bytes: fill.value,
            ttl: fill.ttl,
            fence: fill.fence,
            tags,
        };
        self.inner.cache.insert(fill.key, value);
        FillOutcome::Stored
    }

    fn read(&self, key: &EntryKey) -> Lookup {
        let records = &self.inner.records;
        let fence = records.fence();
        let found = self.inner.cache.get(key);
        let value = match found {
            Some(v) if records.is_current(v.fence, v.tags.iter().copied()) => Some(v.bytes),
            Some(_) => {
                self.inner.cache.invalidate(key); // dead: nobody may read it again
                None
            }
            None => None,
        };
        Lookup { value, fence }
    }
}

impl Store for MemoryStore {
    async fn lookup(&self, key: &EntryKey) -> Result<Lookup, StoreError> {
        Ok(self.read(key))
    }

    /// Always at once: nothing here waits.
    fn lookup_now(&self, key: &EntryKey) -> Option<Result<Lookup, StoreError>> {
        Some(Ok(self.read(key)))
    }

    async fn fill(&self, fill: Fill) -> Result<FillOutcome, StoreError> {
        Ok(self.fill_now(fill))
    }

    /// Fills on the spot: there is nothing to wait for.
    fn fill_in_background(&self, fill: Fill, done: FillDone) {
        done(Ok(self.fill_now(fill)));
    }

    async fn remove(&self, key: &EntryKey) -> Result<bool, StoreError> {
        Ok(self.inner.cache.remove(key).is_some())
    }

    async fn invalidate(&self, tags: &[String]) -> Result<Invalidation, StoreError> {
        let ids: Vec<u64> = tags.iter().map(|t| tag_id(t)).collect();
        let (epoch, seq) = self.inner.records.write(|records| {
            let seq = records.advance();
            records.clear(ids, seq);
            (records.epoch(), seq)
        });
        Ok(Invalidation::new(epoch, seq))
    }

    async fn record_hot(&self, counts: Vec<(Bytes, u64)>, keep: usize) -> Result<(), StoreError> {
        let mut hot = crate::lock::lock(&self.inner.hot);
        hot.values_mut().for_each(|c| *c *= HOT_FADE);
        for (request, n) in counts {
            *hot.entry(request).or_default() += n as f64;
        }
        if hot.len() > keep {
            let mut all: Vec<(Bytes, f64)> = hot.drain().collect();
            all.sort_by(|a, b| b.1.total_cmp(&a.1));
            all.truncate(keep);
            hot.extend(all);
        }
        Ok(())
    }

    async fn hot(&self, limit: usize) -> Result<Vec<(Bytes, u64)>, StoreError> {
        let hot = crate::lock::lock(&self.inner.hot);
        let mut all: Vec<(Bytes, u64)> = hot.iter().map(|(r, c)| (r.clone(), *c as u64)).collect();
        all.sort_by_key(|e| std::cmp::Reverse(e.1));
        all.truncate(limit);
        Ok(all)
    }

    async fn purge(&self) -> Result<u64, StoreError> {
        let seq = self.inner.records.write(|records| {
            let seq = records.advance();
            records.raise_floor(seq);
            seq
        });
        // Dead already; dropping them frees the memory now.
        self.inner.cache.invalidate_all();
        Ok(seq)
    }
}

/// Used as a near cache, the store holds entries whose validity another store vouches for
/// (see `TieredStore`): its own records are not consulted.
#[cfg_attr(not(feature = "valkey"), allow(dead_code))]
impl MemoryStore {
    /// An entry as stored, with the stamp it was filled under, whether current or not.
    pub(crate) fn peek(&self, key: &EntryKey) -> Option<(Bytes, Fence, Arc<[u64]>)> {
        self.inner
            .cache
            .get(key)
            .map(|v| (v.bytes, v.fence, v.tags))
    }

    /// Stores an entry without checking it against this store's records.
    pub(crate) fn put(
        &self,
        key: EntryKey,
        bytes: Bytes,
        ttl: Duration,
        fence: Fence,
        tags: &[String],
    ) {
        if ttl.is_zero() {
            return;
        }
        let tags: Arc<[u64]> = tags.iter().map(|t| tag_id(t)).collect();
        self.inner.cache.insert(
            key,
            MemValue {
                bytes,
                ttl,
                fence,
                tags,
            },
        );
    }

    /// Drops one entry.
    pub(crate) fn drop_entry(&self, key: &EntryKey) {
        self.inner.cache.invalidate(key);
    }

    /// Drops every entry, keeping the records.
    pub(crate) fn flush(&self) {
        self.inner.cache.invalidate_all();
    }
}
