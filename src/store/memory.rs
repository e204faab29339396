//! The in-process store: a byte-bounded map with per-entry TTLs (see `bounded`), checked
//! on read against clear records (see `records`): a clear costs O(tags), and an entry
//! carrying a cleared tag is dead from that moment, wherever it is.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::bounded::Bounded;
use super::records::{new_epoch, tag_id, Records, Shared, DEFAULT_MAX_RECORDS};
use super::{Fence, Fill, FillDone, FillOutcome, Invalidation, Lookup, Store, HOT_FADE};
use crate::error::StoreError;
use crate::key::EntryKey;

/// Bytes counted per entry on top of its key, value and tags: its slot and index entry, the
/// `Arc`s, the allocator's slack. Measured (benches/load.rs fills a 64 MiB store with a
/// million 1 KiB entries and compares the process's growth with the budget).
const ENTRY_OVERHEAD: usize = 448;

/// An in-process store bounded by bytes: the embedded default that needs no server.
///
/// Clones share the same cache. When the byte budget is reached, entries are evicted by
/// S3-FIFO: a new entry that is not read again goes first, one read again is kept while
/// it is read, and a scan of one-off keys does not push out what is read again. Entries
/// expire after their TTL. The budget is split into shards (one per 8 MiB of budget,
/// rounded down to a power of two, at most 16), and an entry is stored only if it fits in
/// one: a shard's share is the whole budget under 16 MiB, else at least 8 MiB and at least
/// a sixteenth of the budget. An entry weighs its body, key and tags plus about 450 bytes;
/// a fill heavier than a share reports [`FillOutcome::Dropped`]. A clear records each tag's
/// clear (at most 16,384 records, about 1 MiB beyond the budget, by default) and costs the
/// same whatever the tags carry; entries it made dead are dropped when next read, or by TTL
/// and eviction.
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
    cache: Bounded<MemValue>,
    /// Clears, purges and the sequence. Lookups read them under the read lock, so a clear
    /// (write lock) is either wholly before a lookup or wholly after it.
    records: Shared,
    /// The record of the most requested keys (`Store::record_hot`).
    hot: std::sync::Mutex<HashMap<Bytes, f64>>,
}

struct MemValue {
    bytes: Bytes,
    fence: Fence,
    tags: Box<[u64]>,
}

impl MemValue {
    /// What the entry counts against the budget.
    fn weight(&self, key: &EntryKey) -> u32 {
        let size = key.route().len() + 32 + self.bytes.len() + 8 * self.tags.len() + ENTRY_OVERHEAD;
        u32::try_from(size).unwrap_or(u32::MAX)
    }
}

impl MemoryStore {
    /// A store holding at most `max_bytes` of keys and entries.
    pub fn new(max_bytes: u64) -> Self {
        MemoryStore {
            inner: Arc::new(MemoryInner {
                cache: Bounded::new(max_bytes),
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

    /// Number of entries held. Entries made dead by a clear count until they are read or
    /// evicted; expired ones until they are evicted or written over.
    pub fn entry_count(&self) -> u64 {
        self.inner.cache.count().0
    }

    /// Bytes in use as counted against the budget (the entries [`entry_count`](Self::entry_count)
    /// counts).
    pub fn weighted_size(&self) -> u64 {
        self.inner.cache.count().1
    }

    /// Number of clear records kept: bounded by [`max_clear_records`](Self::max_clear_records).
    pub fn clear_records(&self) -> usize {
        self.inner.records.read().len()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (entries, weighted_size) = self.inner.cache.count();
        f.debug_struct("MemoryStore")
            .field("entries", &entries)
            .field("weighted_size", &weighted_size)
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
        let tags: Box<[u64]> = fill.tags.iter().map(|t| tag_id(t)).collect();
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
            fence: fill.fence,
            tags,
        };
        let weight = value.weight(&fill.key);
        if self.inner.cache.insert(fill.key, value, weight, fill.ttl) {
            FillOutcome::Stored
        } else {
            FillOutcome::Dropped
        }
    }

    fn read(&self, key: &EntryKey) -> Lookup {
        let records = &self.inner.records;
        let fence = records.fence();
        // Under the map's shard lock only what takes no lock (see `TieredStore`).
        let found = self.inner.cache.read(key, |v| {
            if records.surely_current(v.fence) {
                Ok(v.bytes.clone())
            } else {
                Err((v.bytes.clone(), v.fence, v.tags.to_vec()))
            }
        });
        let value = match found {
            None => None,
            Some(Ok(bytes)) => Some(bytes),
            Some(Err((bytes, stamp, ids))) if records.is_current(stamp, ids.iter().copied()) => {
                Some(bytes)
            }
            Some(Err((bytes, stamp, _))) => {
                // Dead: nobody may read it again (unless a fill replaced it meanwhile).
                self.drop_if_same(key, &bytes, stamp);
                None
            }
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
        self.inner.cache.clear();
        Ok(seq)
    }
}

/// Used as a near cache, the store holds entries whose validity another store vouches for
/// (see `TieredStore`): its own records are not consulted.
#[cfg_attr(not(feature = "valkey"), allow(dead_code))]
impl MemoryStore {
    /// Calls `f` with an entry as stored and the stamp it was filled under (its fence and
    /// tag ids), whether current or not; under a lock: `f` copies out what it needs.
    pub(crate) fn peek<R>(
        &self,
        key: &EntryKey,
        f: impl FnOnce(&Bytes, Fence, &[u64]) -> R,
    ) -> Option<R> {
        self.inner
            .cache
            .read(key, |v| f(&v.bytes, v.fence, &v.tags))
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
        let value = MemValue {
            bytes,
            fence,
            tags: tags.iter().map(|t| tag_id(t)).collect(),
        };
        let weight = value.weight(&key);
        let _ = self.inner.cache.insert(key, value, weight, ttl);
    }

    /// Drops one entry.
    /// Drops `key`'s entry if it is still the one read (these bytes, this fence): not one a
    /// fill put there meanwhile.
    pub(crate) fn drop_if_same(&self, key: &EntryKey, bytes: &Bytes, fence: Fence) {
        self.inner.cache.remove_if(key, |v| {
            v.fence == fence && v.bytes.as_ptr() == bytes.as_ptr() && v.bytes.len() == bytes.len()
        });
    }

    /// Drops every entry, keeping the records.
    pub(crate) fn flush(&self) {
        self.inner.cache.clear();
    }
}
