//! Writing an entry to the store in the background, fenced.

use std::sync::Arc;

use std::time::Duration;

use super::flights::{FlightGuard, Landed, Landing};
use super::revalidate::has_validator;
use super::Engine;
use crate::entry::Entry;
use crate::error::StoreError;
use crate::key::EntryKey;
use crate::stats::{count, count_route, RouteCounters};
use crate::store::{Fill, FillOutcome, Store};

impl<St: Store> Engine<St> {
    /// Stores an entry (in the background) and hands it to the requests waiting on its key.
    /// An entry with a validator stays `keep` longer than its stale windows, so that it can
    /// be revalidated instead of fetched again.
    pub(crate) fn store_entry(
        self: Arc<Self>,
        key: EntryKey,
        entry: &Entry,
        keep: Duration,
        flight: Option<FlightGuard>,
    ) {
        let encoded = entry.encode();
        let landing = flight.map(|f| f.land(Landed::Entry(encoded.clone()), Duration::ZERO));
        self.store_encoded(key, entry, encoded, keep, landing);
    }

    /// Stores a URL's marker of its variants under its own key, as long as `variant` lives
    /// and with its tags and fence, so that a clear of one is a clear of both.
    pub(crate) fn store_marker(
        self: &Arc<Self>,
        primary: EntryKey,
        marker: bytes::Bytes,
        variant: &Entry,
        keep: Duration,
    ) {
        let ttl = variant.store_ttl().saturating_add(keep);
        let fill = Fill::new(primary, marker, ttl, variant.tags.clone(), variant.fence);
        self.clone().spawn_fill(fill, None);
    }

    /// Stores an entry already encoded; `landing` keeps its flight visible until the store
    /// has it.
    pub(crate) fn store_encoded(
        self: Arc<Self>,
        key: EntryKey,
        entry: &Entry,
        encoded: bytes::Bytes,
        keep: Duration,
        landing: Option<Landing>,
    ) {
        let keep = if has_validator(entry) {
            keep
        } else {
            Duration::ZERO
        };
        let ttl = entry.store_ttl().saturating_add(keep);
        let fill = Fill::new(key, encoded, ttl, entry.tags.clone(), entry.fence);
        self.spawn_fill(fill, landing);
    }

    /// Writes an encoded entry in the background: the client never waits for the store on a
    /// miss.
    pub(crate) fn spawn_fill(self: Arc<Self>, fill: Fill, landing: Option<Landing>) {
        let counters = &self.stats.inner;
        if !self.breaker.allow() {
            count!(counters, breaker_skips);
            return;
        }
        let route = fill.key.route().to_owned();
        let span = tracing::debug_span!("cache.fill", route = route);
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
                    match engine.route_counters(&route) {
                        Some(route) => count_route!(counters, route, fills),
                        None => count!(counters, fills),
                    }
                }
                Ok(FillOutcome::Fenced) => {
                    engine.breaker.success();
                    count!(counters, fills_fenced);
                }
                Ok(FillOutcome::Dropped) => count!(counters, fills_dropped),
                Err(e) => {
                    count!(counters, store_errors);
                    if !e.is_passed_over() {
                        engine.breaker.failure();
                    }
                    tracing::debug!(error = %e, "cache fill failed");
                }
            }
        };
        self.store.fill_in_background(fill, Box::new(done));
    }

    /// The counters of the route with this id (a fill knows its route by its key).
    fn route_counters(&self, id: &str) -> Option<Arc<RouteCounters>> {
        if id == super::VALUES_ROUTE {
            return Some(self.values.clone());
        }
        self.routes.counters().find(|c| &*c.id == id)
    }
}
