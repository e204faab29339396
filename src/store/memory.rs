//! The in-process store: a byte-bounded moka cache with per-entry TTLs, a tag index and the
//! same fence rule as Valkey (a fill whose tags were cleared after its lookup is refused).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::notification::RemovalCause;
use moka::sync::Cache;
use moka::Expiry;

use super::{Fill, FillDone, FillOutcome, Invalidation, Lookup, Store, FENCE_WINDOW};
use crate::error::StoreError;
use crate::key::EntryKey;

type Hasher = foldhash::fast::RandomState;

/// Bytes counted per entry on top of its key, value and tags: moka's node, deques and timer
/// slots, the `Arc`s, the allocator's slack. Measured (benches/load.rs fills a 64 MiB store
/// with a million 1 KiB entries and compares the process's growth with the budget).
const ENTRY_OVERHEAD: usize = 560;
/// Bytes counted per tag of an entry: its string, its slot in the tag index's set.
const TAG_OVERHEAD: usize = 120;

/// An in-process store bounded by bytes: the embedded default that needs no server.
///
/// Clones share the same cache. Entries are evicted by moka's TinyLFU policy when the byte
/// budget is reached, and expire after their TTL. Tags are indexed in memory; the index
/// shrinks as entries leave.
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
    cache: Cache<EntryKey, MemValue, Hasher>,
    /// The invalidation sequence (the fence) and the last purge.
    sequence: AtomicU64,
    purged: AtomicU64,
    /// Fills and clears take this lock, so no clear slips between a fill's check and write.
    index: Mutex<TagIndex>,
    /// Entries that left the cache, for the index to forget. Kept apart from `index` because
    /// moka may call the eviction listener while a fill or clear holds `index`.
    departed: Arc<Mutex<Departed>>,
}

/// Keys that left the cache, with the tags they were indexed under.
type Departed = Vec<(EntryKey, Arc<[String]>)>;

#[derive(Default)]
struct TagIndex {
    members: HashMap<String, HashSet<EntryKey>>,
    /// Each tag's last clear: its sequence and when the record may be forgotten.
    cleared: HashMap<String, (u64, Instant)>,
}

#[derive(Clone)]
struct MemValue {
    bytes: Bytes,
    ttl: Duration,
    tags: Arc<[String]>,
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
        let departed: Arc<Mutex<Departed>> = Arc::default();
        let listener_queue = departed.clone();
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|k: &EntryKey, v: &MemValue| {
                let tags: usize = v.tags.iter().map(|t| t.len() + TAG_OVERHEAD).sum();
                let size = k.route().len() + 32 + v.bytes.len() + tags + ENTRY_OVERHEAD;
                u32::try_from(size).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryTtl)
            .eviction_listener(move |key: Arc<EntryKey>, value: MemValue, cause| {
                // A replaced entry keeps its key: the new value re-indexes it.
                if cause != RemovalCause::Replaced && !value.tags.is_empty() {
                    lock(&listener_queue).push(((*key).clone(), value.tags));
                }
            })
            // Keys are digests already: a fast keyed hash is enough (and moka's default,
            // SipHash, was a visible part of a hit).
            .build_with_hasher(Hasher::default());
        MemoryStore {
            inner: Arc::new(MemoryInner {
                cache,
                sequence: AtomicU64::new(0),
                purged: AtomicU64::new(0),
                index: Mutex::default(),
                departed,
            }),
        }
    }

    /// Number of entries (after pending maintenance has run).
    pub fn entry_count(&self) -> u64 {
        self.inner.cache.run_pending_tasks();
        self.inner.cache.entry_count()
    }

    /// Bytes in use as counted against the budget (after pending maintenance has run).
    pub fn weighted_size(&self) -> u64 {
        self.inner.cache.run_pending_tasks();
        self.inner.cache.weighted_size()
    }

    /// Number of tags that index at least one entry, and of clear records kept (after
    /// pending maintenance has run): both return to zero once entries expire and the fence
    /// window has passed.
    pub fn index_size(&self) -> (usize, usize) {
        self.inner.cache.run_pending_tasks();
        let mut index = self.index();
        let now = Instant::now();
        index.cleared.retain(|_, (_, until)| *until > now);
        (index.members.len(), index.cleared.len())
    }

    /// Locks the tag index, first forgetting entries that left the cache.
    fn index(&self) -> MutexGuard<'_, TagIndex> {
        let departed = std::mem::take(&mut *lock(&self.inner.departed));
        let mut index = lock(&self.inner.index);
        for (key, tags) in departed {
            // The key may have been filled again since: keep it indexed then.
            if self.inner.cache.contains_key(&key) {
                continue;
            }
            for tag in tags.iter() {
                if let Some(set) = index.members.get_mut(tag) {
                    set.remove(&key);
                    if set.is_empty() {
                        index.members.remove(tag);
                    }
                }
            }
        }
        index
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.inner.cache.entry_count())
            .field("weighted_size", &self.inner.cache.weighted_size())
            .finish()
    }
}

impl MemoryStore {
    /// Stores `fill` unless a clear or purge newer than its fence refuses it.
    pub(crate) fn fill_now(&self, fill: Fill) -> FillOutcome {
        if fill.ttl.is_zero() {
            return FillOutcome::Stored;
        }
        let mut index = self.index();
        let now = Instant::now();
        let cleared_after_fence = |tag: &String| {
            index
                .cleared
                .get(tag)
                .is_some_and(|(seq, until)| *seq > fill.fence && *until > now)
        };
        if self.inner.purged.load(Ordering::Acquire) > fill.fence
            || fill.tags.iter().any(cleared_after_fence)
        {
            return FillOutcome::Fenced;
        }
        for tag in &fill.tags {
            index
                .members
                .entry(tag.clone())
                .or_default()
                .insert(fill.key.clone());
        }
        let value = MemValue {
            bytes: fill.value,
            ttl: fill.ttl,
            tags: fill.tags.into(),
        };
        self.inner.cache.insert(fill.key, value);
        FillOutcome::Stored
    }
}

impl Store for MemoryStore {
    async fn lookup(&self, key: &EntryKey) -> Result<Lookup, StoreError> {
        let fence = self.inner.sequence.load(Ordering::Acquire);
        let purged = self.inner.purged.load(Ordering::Acquire);
        let value = self.inner.cache.get(key).map(|v| v.bytes);
        Ok(Lookup {
            value,
            fence,
            purged,
        })
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
        let mut index = self.index();
        let seq = self.inner.sequence.fetch_add(1, Ordering::AcqRel) + 1;
        let removed = self.clear_locked(&mut index, tags, seq);
        Ok(Invalidation { seq, removed })
    }

    async fn purge(&self) -> Result<u64, StoreError> {
        let mut index = self.index();
        let seq = self.inner.sequence.fetch_add(1, Ordering::AcqRel) + 1;
        self.purge_locked(&mut index, seq);
        Ok(seq)
    }
}

/// Used as a near cache, the store applies clears numbered by the far store's sequence.
#[cfg_attr(not(feature = "valkey"), allow(dead_code))]
impl MemoryStore {
    /// Applies a clear made elsewhere at `seq`: removes the tags' entries and refuses fills
    /// fenced before `seq`. Returns how many entries it removed.
    pub(crate) fn clear_at(&self, tags: &[String], seq: u64) -> u64 {
        let mut index = self.index();
        self.clear_locked(&mut index, tags, seq)
    }

    /// Applies a purge made elsewhere at `seq`.
    pub(crate) fn purge_at(&self, seq: u64) {
        let mut index = self.index();
        self.purge_locked(&mut index, seq);
    }

    /// Drops every entry (the index follows), keeping clear records.
    pub(crate) fn flush(&self) {
        let mut index = self.index();
        self.inner.cache.invalidate_all();
        index.members.clear();
    }

    fn purge_locked(&self, index: &mut TagIndex, seq: u64) {
        self.inner.purged.fetch_max(seq, Ordering::AcqRel);
        self.inner.cache.invalidate_all();
        index.members.clear();
    }

    fn clear_locked(&self, index: &mut TagIndex, tags: &[String], seq: u64) -> u64 {
        let now = Instant::now();
        if index.cleared.len() > 4096 {
            index.cleared.retain(|_, (_, until)| *until > now);
        }
        let mut removed = 0;
        for tag in tags {
            let record = index.cleared.entry(tag.clone()).or_insert((0, now));
            *record = (record.0.max(seq), now + FENCE_WINDOW);
            for key in index.members.remove(tag).unwrap_or_default() {
                if self.inner.cache.remove(&key).is_some() {
                    removed += 1;
                }
            }
        }
        removed
    }
}
