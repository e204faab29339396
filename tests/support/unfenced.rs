//! A store that turns off the invalidation fence, through the public `Store` trait alone:
//! every fill claims to have been read after every clear, which reopens the stale-set race.
//! Only for the test showing that the race test can fail; never in an application.

use std::time::Duration;

use tower_cache_aside::store::{Fence, Fill, FillDone, FillOutcome, Invalidation, Lookup, Store};
use tower_cache_aside::{EntryKey, StoreError};

#[derive(Clone, Debug)]
pub struct Unfenced<St>(pub St);

/// The fill as it would be had its lookup come after every clear.
fn unfence(mut fill: Fill) -> Fill {
    fill.fence = Fence::new(fill.fence.epoch(), u64::MAX);
    fill
}

impl<St: Store> Store for Unfenced<St> {
    async fn lookup(&self, key: &EntryKey) -> Result<Lookup, StoreError> {
        self.0.lookup(key).await
    }

    async fn fill(&self, fill: Fill) -> Result<FillOutcome, StoreError> {
        self.0.fill(unfence(fill)).await
    }

    fn fill_in_background(&self, fill: Fill, done: FillDone) {
        self.0.fill_in_background(unfence(fill), done)
    }

    async fn remove(&self, key: &EntryKey) -> Result<bool, StoreError> {
        self.0.remove(key).await
    }

    async fn invalidate(&self, tags: &[String]) -> Result<Invalidation, StoreError> {
        self.0.invalidate(tags).await
    }

    async fn purge(&self) -> Result<u64, StoreError> {
        self.0.purge().await
    }

    async fn try_lease(&self, key: &EntryKey, ttl: Duration) -> Result<Option<u64>, StoreError> {
        self.0.try_lease(key, ttl).await
    }

    async fn release_lease(&self, key: &EntryKey, token: u64) -> Result<(), StoreError> {
        self.0.release_lease(key, token).await
    }
}
