//! Writing an entry to the store in the background, fenced.

use std::sync::Arc;

use super::flights::Landing;
use super::Engine;
use crate::error::StoreError;
use crate::stats::count;
use crate::store::{Fill, FillOutcome, Store};

impl<St: Store> Engine<St> {
    /// Writes an encoded entry in the background: the client never waits for the store on a
    /// miss.
    pub(crate) fn spawn_fill(self: Arc<Self>, fill: Fill, landing: Option<Landing>) {
        let counters = &self.stats.inner;
        if !self.breaker.allow() {
            count!(counters, breaker_skips);
            return;
        }
        let span = tracing::debug_span!("cache.fill", route = fill.key.route());
        let _entered = span.enter();
        let engine = self.clone();
        // Called once the store has answered; the landing is dropped with it, so the
        // flight stays visible until the store has the entry.
        let done = move |outcome: Result<FillOutcome, StoreError>| {
            let _landing = landing;
            let counters = &engine.stats.inner;
            match outcome {
                Ok(FillOutcome::Stored) => {
                    engine.breaker.success();
                    count!(counters, fills);
                }
                Ok(FillOutcome::Fenced) => {
                    engine.breaker.success();
                    count!(counters, fills_fenced);
                }
                Ok(FillOutcome::Dropped) => count!(counters, fills_dropped),
                Err(e) => {
                    count!(counters, store_errors);
                    engine.breaker.failure();
                    tracing::debug!(error = %e, "cache fill failed");
                }
            }
        };
        self.store.fill_in_background(fill, Box::new(done));
    }
}
