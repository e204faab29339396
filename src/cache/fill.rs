//! Writing an entry to the store in the background, fenced.

use std::sync::Arc;
use std::time::Duration;

use super::flights::Landing;
use super::layer::Shared;
use super::lookup::Fence;
use crate::error::StoreError;
use crate::key::EntryKey;
use crate::stats::count;
use crate::store::{Fill, FillOutcome, Store};

impl<St: Store> Shared<St> {
    /// Writes an encoded entry in the background: the client never waits for the store on a
    /// miss.
    pub(crate) fn spawn_fill(
        self: Arc<Self>,
        key: EntryKey,
        encoded: bytes::Bytes,
        ttl: Duration,
        tags: Vec<String>,
        fence: Fence,
        landing: Option<Landing>,
    ) {
        let counters = &self.stats.inner;
        if !counters.breaker.allow() {
            count!(counters, breaker_skips);
            return;
        }
        let fence = if self.unfenced {
            Fence::new(fence.epoch(), u64::MAX)
        } else {
            fence
        };
        let span = tracing::debug_span!("cache.fill", route = key.route());
        let _entered = span.enter();
        let fill = Fill::new(key, encoded, ttl, tags, fence);
        let shared = self.clone();
        // Called once the store has answered; the landing is dropped with it, so the
        // flight stays visible until the store has the entry.
        let done = move |outcome: Result<FillOutcome, StoreError>| {
            let _landing = landing;
            let counters = &shared.stats.inner;
            match outcome {
                Ok(FillOutcome::Stored) => {
                    counters.breaker.success();
                    count!(counters, fills);
                }
                Ok(FillOutcome::Fenced) => {
                    counters.breaker.success();
                    count!(counters, fills_fenced);
                }
                Ok(FillOutcome::Dropped) => count!(counters, fills_dropped),
                Err(e) => {
                    count!(counters, store_errors);
                    counters.breaker.failure();
                    tracing::debug!(error = %e, "cache fill failed");
                }
            }
        };
        self.store.fill_in_background(fill, Box::new(done));
    }
}
