//! A near cache in front of Valkey: an in-process [`MemoryStore`] that answers repeat hits
//! without a network round trip, kept coherent by the clears every instance publishes.
//!
//! Coherence rules:
//! - The near tier is used only while the invalidation subscription is live; when it breaks
//!   every near entry is dropped and lookups go to Valkey until it is back (clears published
//!   meanwhile were missed).
//! - Near entries live at most `max_near_ttl` (default 5 s): a bound on staleness should a
//!   published clear ever be lost without the connection noticing.
//! - The near tier keeps clear records numbered by Valkey's sequence, in Valkey's epoch, and
//!   checks its entries against them on read, as Valkey's are: a near entry fenced before a
//!   clear it has heard of is dead, and a new epoch in Valkey drops the whole near tier.
//! - This instance's own clears apply to the near tier before the mutation's response is
//!   sent; other instances' arrive within the pub/sub delivery time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::broadcast;

use super::memory::MemoryStore;
use super::valkey::ValkeyStore;
use super::{Fence, Fill, FillDone, FillOutcome, Invalidation, Lookup, Notice, Store};
use crate::entry::Entry;
use crate::error::StoreError;
use crate::key::EntryKey;

/// Near entries live at most this long unless configured otherwise.
pub const DEFAULT_MAX_NEAR_TTL: Duration = Duration::from_secs(5);

/// A [`MemoryStore`] near cache in front of a [`ValkeyStore`].
///
/// ```
/// use std::time::Duration;
/// use tower_cache_aside::{CacheLayer, store::{MemoryStore, TieredStore, ValkeyStore}};
///
/// # fn main() -> Result<(), tower_cache_aside::ConfigError> {
/// let store = TieredStore::new(MemoryStore::new(32 << 20), ValkeyStore::from_env()?)
///     .max_near_ttl(Duration::from_secs(2));
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
    max_near_ttl: Duration,
    /// The invalidation subscription is live: the near tier may answer.
    live: AtomicBool,
    listening: OnceLock<()>,
}

impl std::fmt::Debug for TieredStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TieredStore")
            .field("near", &self.inner.near)
            .field("far", &self.inner.far)
            .field("live", &self.inner.live.load(Ordering::Relaxed))
            .finish()
    }
}

impl TieredStore {
    /// `near` in front of `far`.
    pub fn new(near: MemoryStore, far: ValkeyStore) -> Self {
        near.follow_another_store();
        TieredStore {
            inner: Arc::new(TierInner {
                near,
                far,
                max_near_ttl: DEFAULT_MAX_NEAR_TTL,
                live: AtomicBool::new(false),
                listening: OnceLock::new(),
            }),
        }
    }

    /// The longest a near entry lives (default 5 s).
    #[must_use]
    pub fn max_near_ttl(mut self, ttl: Duration) -> Self {
        if Arc::get_mut(&mut self.inner).is_none() {
            // Shared already (cloned before configuring): configure a fresh one.
            self = TieredStore::new(self.inner.near.clone(), self.inner.far.clone());
        }
        Arc::get_mut(&mut self.inner)
            .expect("unshared")
            .max_near_ttl = ttl;
        self
    }

    /// The near tier.
    pub fn near(&self) -> &MemoryStore {
        &self.inner.near
    }

    /// The far tier.
    pub fn far(&self) -> &ValkeyStore {
        &self.inner.far
    }

    /// Whether the near tier is in use (its invalidation subscription is live).
    pub fn near_is_live(&self) -> bool {
        self.inner.live.load(Ordering::Acquire)
    }

    fn listen(&self) {
        self.inner.listening.get_or_init(|| {
            let notices = self.inner.far.subscribe();
            tokio::spawn(apply_notices(Arc::downgrade(&self.inner), notices));
        });
    }

    fn near_fill(
        &self,
        key: EntryKey,
        value: bytes::Bytes,
        ttl: Duration,
        tags: Vec<String>,
        fence: Fence,
    ) {
        if !self.near_is_live() {
            return;
        }
        self.inner.near.follow(fence);
        let ttl = ttl.min(self.inner.max_near_ttl);
        self.inner
            .near
            .fill_now(Fill::new(key, value, ttl, tags, fence));
    }
}

/// Applies what the subscription hears to the near tier, until the store is dropped.
async fn apply_notices(tier: Weak<TierInner>, mut notices: broadcast::Receiver<Notice>) {
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        let notice = tokio::select! {
            n = notices.recv() => n,
            _ = check.tick() => {
                if tier.strong_count() == 0 { return; }
                continue;
            }
        };
        let Some(tier) = tier.upgrade() else { return };
        match notice {
            // What another instance saw raises this one's mark too: a set gone back behind
            // it is then made anew by this instance's next sync, within a second.
            Ok(Notice::Cleared { epoch, seq, tags }) => {
                tier.far.saw(Fence::new(epoch, seq));
                tier.near.clear_at(&tags, epoch, seq);
            }
            Ok(Notice::Purged { epoch, seq }) => {
                tier.far.saw(Fence::new(epoch, seq));
                tier.near.purge_at(epoch, seq);
            }
            Ok(Notice::Subscribed) => {
                tier.near.flush();
                tier.live.store(true, Ordering::Release);
            }
            // Lost, or fell behind the channel: clears were missed.
            Ok(Notice::Lost) | Err(broadcast::error::RecvError::Lagged(_)) => {
                tier.live.store(false, Ordering::Release);
                tier.near.flush();
            }
            Err(broadcast::error::RecvError::Closed) => {
                tier.live.store(false, Ordering::Release);
                tier.near.flush();
                return;
            }
        }
    }
}

impl Store for TieredStore {
    async fn lookup(&self, key: &EntryKey) -> Result<Lookup, StoreError> {
        self.listen();
        if self.near_is_live() {
            if let Ok(found) = self.inner.near.lookup(key).await {
                if found.value.is_some() {
                    return Ok(found);
                }
            }
        }
        // Boxed: the far lookup's future is large, and a near hit should not carry it.
        let found = Box::pin(self.inner.far.lookup(key)).await?;
        self.inner.near.follow(found.fence);
        if let Some(value) = &found.value {
            // Copy it near, with the tags, fence and lifetime the entry itself carries.
            if let Ok(entry) = Entry::decode_with_tags(value.clone()) {
                if let Some(ttl) = entry.remaining(crate::entry::now_ms()) {
                    self.near_fill(key.clone(), value.clone(), ttl, entry.tags, entry.fence);
                }
            }
        }
        Ok(found)
    }

    async fn fill(&self, fill: Fill) -> Result<FillOutcome, StoreError> {
        let outcome = self.inner.far.fill(fill.clone()).await?;
        if outcome == FillOutcome::Stored {
            self.near_fill(fill.key, fill.value, fill.ttl, fill.tags, fill.fence);
        }
        Ok(outcome)
    }

    /// Through the far tier's batch writer; copied near once Valkey has it.
    fn fill_in_background(&self, fill: Fill, done: FillDone) {
        let (tier, near) = (self.clone(), fill.clone());
        let copy_near = move |outcome: Result<FillOutcome, StoreError>| {
            if let Ok(FillOutcome::Stored) = outcome {
                tier.near_fill(near.key, near.value, near.ttl, near.tags, near.fence);
            }
            done(outcome);
        };
        self.inner.far.fill_in_background(fill, Box::new(copy_near));
    }

    async fn remove(&self, key: &EntryKey) -> Result<bool, StoreError> {
        let _ = self.inner.near.remove(key).await;
        self.inner.far.remove(key).await
    }

    async fn invalidate(&self, tags: &[String]) -> Result<Invalidation, StoreError> {
        let done = self.inner.far.invalidate(tags).await;
        match &done {
            Ok(d) => self.inner.near.clear_at(tags, d.epoch, d.seq),
            // Unknown outcome: the near copies must go in any case.
            Err(_) => {
                let known = self.inner.near.fence();
                self.inner
                    .near
                    .clear_at(tags, known.epoch(), known.seq() + 1);
            }
        }
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
        match self.inner.far.purge_fence().await {
            Ok(done) => {
                self.inner.near.purge_at(done.epoch(), done.seq());
                Ok(done.seq())
            }
            Err(e) => {
                self.inner.near.flush();
                Err(e)
            }
        }
    }
}
