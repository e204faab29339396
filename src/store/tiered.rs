//! A near cache in front of Valkey: an in-process [`MemoryStore`] that answers repeat hits
//! without a network round trip, held to the same records as the store.
//!
//! Coherence rules:
//! - A near entry keeps the stamp its Valkey copy has (the fence its data was read under,
//!   its tags). It is served only if the records of the Valkey connection that serves its
//!   key say it is current, and only while that connection knows its records to be
//!   current: the server announces every change to them on that connection (client
//!   tracking), so a clear made anywhere stops near hits as soon as its announcement
//!   arrives, and the next lookup goes to Valkey, reads what changed and re-arms them.
//! - So there is no fixed window: a near hit can be older than a clear only by the time the
//!   clear's announcement takes to travel from the server to this instance (one way, on a
//!   live connection; measured by `benches/scaleout.rs`). A connection that has not
//!   answered for 1.5 s (gone half-open) does not vouch for anything: that is the bound
//!   when a connection stops carrying announcements without breaking.
//! - This instance's own clears stop its near hits before the mutation's response is sent.
//! - Without client tracking (a server or proxy that refuses RESP3 or `CLIENT TRACKING`,
//!   or `client_tracking(false)`), nothing vouches for near entries, and every lookup goes
//!   to Valkey.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::memory::MemoryStore;
use super::valkey::ValkeyStore;
use super::{Fill, FillDone, FillOutcome, Invalidation, Lookup, Store};
use crate::entry::Entry;
use crate::error::StoreError;
use crate::key::EntryKey;
use crate::stats::Striped;

/// A [`MemoryStore`] near cache in front of a [`ValkeyStore`].
///
/// ```
/// use std::time::Duration;
/// use tower_cache_aside::{CacheLayer, store::{MemoryStore, TieredStore, ValkeyStore}};
///
/// # fn main() -> Result<(), tower_cache_aside::ConfigError> {
/// let store = TieredStore::new(MemoryStore::new(32 << 20), ValkeyStore::from_env()?);
/// let layer = CacheLayer::new(store);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TieredStore {
    inner: Arc<TierInner>,
}

struct TierInner {
    near: MemoryStore,
    far: ValkeyStore,
    max_near_ttl: Option<Duration>,
    near_hits: Striped<NearTally>,
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct NearTally {
    hits: AtomicU64,
}

impl std::fmt::Debug for TieredStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TieredStore")
            .field("near", &self.inner.near)
            .field("far", &self.inner.far)
            .finish()
    }
}

impl TieredStore {
    /// `near` in front of `far`.
    pub fn new(near: MemoryStore, far: ValkeyStore) -> Self {
        near.flush();
        TieredStore {
            inner: Arc::new(TierInner {
                near,
                far,
                max_near_ttl: None,
                near_hits: Striped::default(),
            }),
        }
    }

    /// The longest a near copy lives (default: as long as the entry). Not needed for
    /// coherence (see the module docs); a way to bound the near tier's age for other
    /// reasons.
    #[must_use]
    pub fn max_near_ttl(mut self, ttl: Duration) -> Self {
        if Arc::get_mut(&mut self.inner).is_none() {
            // Shared already (cloned before configuring): configure a fresh one.
            self = TieredStore::new(self.inner.near.clone(), self.inner.far.clone());
        }
        Arc::get_mut(&mut self.inner)
            .expect("unshared")
            .max_near_ttl = Some(ttl);
        self
    }

    /// Lookups the near tier answered (without a round trip to Valkey).
    pub fn near_hits(&self) -> u64 {
        self.inner.near_hits.sum(|t| &t.hits)
    }

    /// The near tier, for inspection (`entry_count`, `weighted_size`). Its entries are
    /// checked against Valkey's records, not its own: a `lookup` made on it directly reads
    /// them as misses (and drops them).
    pub fn near(&self) -> &MemoryStore {
        &self.inner.near
    }

    /// The far tier.
    pub fn far(&self) -> &ValkeyStore {
        &self.inner.far
    }

    /// Whether the near tier may answer `key` now: the Valkey connection serving it tracks
    /// the records and knows them to be current.
    pub fn near_is_live(&self, key: &EntryKey) -> bool {
        self.inner.far.vouch(key).is_some()
    }

    /// The near copy of `key`, if the records of the connection serving it vouch for it.
    fn near_lookup(&self, key: &EntryKey) -> Option<Lookup> {
        let vouch = self.inner.far.vouch(key)?;
        // Under the near map's shard lock only what takes no lock: an entry some clear came
        // after is copied out and checked against the records (which lock) after it.
        let held = self.inner.near.peek(key, |bytes, fence, ids| {
            if vouch.vouches_at_once(fence) {
                Ok(bytes.clone())
            } else {
                Err((bytes.clone(), fence, ids.to_vec()))
            }
        })?;
        let current = match held {
            Ok(bytes) => Ok(bytes),
            Err((bytes, fence, ids)) if vouch.vouches(fence, &ids) => Ok(bytes),
            Err((bytes, fence, _)) => Err((bytes, fence)),
        };
        let (bytes, fence) = match current {
            Ok(bytes) => {
                let tally = self.inner.near_hits.local();
                tally.hits.fetch_add(1, Ordering::Relaxed);
                return Some(Lookup::new(Some(bytes), vouch.fence()));
            }
            Err(dead) => dead,
        };
        if vouch.holds() {
            // Dead by records still current: nobody may read it again (unless a fill
            // replaced it meanwhile).
            self.inner.near.drop_if_same(key, &bytes, fence);
        }
        // Else a change was announced meanwhile: Valkey decides.
        None
    }

    /// Copies an entry near, unless nothing vouches for its key right now: a connection
    /// without tracking, or a node holding no copy of the records, never will.
    fn near_fill(
        &self,
        key: EntryKey,
        value: Bytes,
        ttl: Duration,
        tags: &[String],
        fence: super::Fence,
    ) {
        if self.inner.far.vouch(&key).is_none() {
            return;
        }
        let ttl = self.inner.max_near_ttl.map_or(ttl, |max| ttl.min(max));
        self.inner.near.put(key, value, ttl, fence, tags);
    }
}

impl Store for TieredStore {
    async fn lookup(&self, key: &EntryKey) -> Result<Lookup, StoreError> {
        if let Some(near) = self.near_lookup(key) {
            return Ok(near);
        }
        // Boxed: the far lookup's future is large, and a near hit should not carry it.
        let found = Box::pin(self.inner.far.lookup(key)).await?;
        if let Some(value) = &found.value {
            // Copy it near, with the tags, fence and lifetime the entry itself carries.
            if let Ok(entry) = Entry::decode_with_tags(value.clone()) {
                if let Some(ttl) = entry.remaining(crate::entry::now_ms()) {
                    self.near_fill(key.clone(), value.clone(), ttl, &entry.tags, entry.fence);
                }
            }
        }
        Ok(found)
    }

    /// A near hit, at once; anything else waits for Valkey.
    fn lookup_now(&self, key: &EntryKey) -> Option<Result<Lookup, StoreError>> {
        self.near_lookup(key).map(Ok)
    }

    async fn fill(&self, fill: Fill) -> Result<FillOutcome, StoreError> {
        let outcome = self.inner.far.fill(fill.clone()).await?;
        if outcome == FillOutcome::Stored {
            self.near_fill(fill.key, fill.value, fill.ttl, &fill.tags, fill.fence);
        }
        Ok(outcome)
    }

    /// Through the far tier's batch writer; copied near once Valkey has it.
    fn fill_in_background(&self, fill: Fill, done: FillDone) {
        let (tier, near) = (self.clone(), fill.clone());
        let copy_near = move |outcome: Result<FillOutcome, StoreError>| {
            if let Ok(FillOutcome::Stored) = outcome {
                tier.near_fill(near.key, near.value, near.ttl, &near.tags, near.fence);
            }
            done(outcome);
        };
        self.inner.far.fill_in_background(fill, Box::new(copy_near));
    }

    async fn remove(&self, key: &EntryKey) -> Result<bool, StoreError> {
        let _ = self.inner.near.remove(key).await;
        self.inner.far.remove(key).await
    }

    /// Clears in Valkey; every connection's records are forgotten first and again after, so
    /// no near hit is served on the strength of records read before the clear landed.
    async fn invalidate(&self, tags: &[String]) -> Result<Invalidation, StoreError> {
        self.inner.far.forget_records();
        let done = self.inner.far.invalidate(tags).await;
        self.inner.far.forget_records();
        done
    }

    async fn try_lease(&self, key: &EntryKey, ttl: Duration) -> Result<Option<u64>, StoreError> {
        self.inner.far.try_lease(key, ttl).await
    }

    async fn release_lease(&self, key: &EntryKey, token: u64) -> Result<(), StoreError> {
        self.inner.far.release_lease(key, token).await
    }

    async fn record_hot(&self, counts: Vec<(Bytes, u64)>, keep: usize) -> Result<(), StoreError> {
        self.inner.far.record_hot(counts, keep).await
    }

    async fn hot(&self, limit: usize) -> Result<Vec<(Bytes, u64)>, StoreError> {
        self.inner.far.hot(limit).await
    }

    async fn purge(&self) -> Result<u64, StoreError> {
        self.inner.far.forget_records();
        let done = self.inner.far.purge().await;
        self.inner.far.forget_records();
        self.inner.near.flush();
        done
    }
}
