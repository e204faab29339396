//! The one store round trip that decides hit, stale or miss, with the breaker and deferred
//! clears in front of it.

use std::time::{Duration, Instant};

use super::Engine;
use crate::entry::{now_ms, Entry, Staleness};
use crate::key::EntryKey;
use crate::stats::count;
use crate::store::{Fence, Lookup, Store};
use crate::StoreError;

/// What the lookup step found.
// Lives for one step on the stack; boxing the entry would allocate on every hit.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Found {
    Hit {
        entry: Entry,
        fence: Fence,
    },
    /// Past its freshness but within a stale window (RFC 5861).
    Stale {
        entry: Entry,
        fence: Fence,
    },
    Miss {
        fence: Fence,
    },
    /// The URL's responses vary on these request headers: look up the variant.
    Varies {
        names: Vec<http::HeaderName>,
        fence: Fence,
    },
    /// The store failed or the breaker is open: serve from the origin, do not fill.
    Unavailable,
}

/// What a lookup found without waiting, or that it must wait for the store.
// Lives for one step on the stack, like `Found`.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Begun {
    /// Decided at once: by the breaker or a deferred clear, or by a store that answered
    /// without waiting (an in-process store, a near tier).
    Found(Found),
    /// The store may be asked, and must be awaited: [`Engine::ask`].
    Ask,
}

impl<St: Store> Engine<St> {
    pub(crate) async fn lookup(&self, key: &EntryKey, now_ms: u64) -> Found {
        match self.begin_lookup(key, now_ms) {
            Begun::Found(found) => found,
            Begun::Ask => self.ask(key, now_ms).await,
        }
    }

    /// The part of a lookup that needs no waiting: whether the store may be asked at all,
    /// and its answer when it has one at once ([`Store::lookup_now`]). A hit found here is
    /// served without a future of its own.
    pub(crate) fn begin_lookup(&self, key: &EntryKey, now_ms: u64) -> Begun {
        let counters = &self.stats.inner;
        if self.deferred.pending() {
            // A clear has not reached the store yet: what it holds may predate a mutation.
            count!(counters, pending_clear_skips);
            return Begun::Found(Found::Unavailable);
        }
        if !self.breaker.allow() {
            count!(counters, breaker_skips);
            return Begun::Found(Found::Unavailable);
        }
        match self.store.lookup_now(key) {
            Some(answer) => Begun::Found(self.found(key, now_ms, answer)),
            None => Begun::Ask,
        }
    }

    /// Asks the store, once [`begin_lookup`](Self::begin_lookup) said it may.
    pub(crate) async fn ask(&self, key: &EntryKey, now_ms: u64) -> Found {
        // Checked again at the last moment: a clear deferred since the request came in
        // (its mutation may have answered meanwhile) must keep this lookup off the store.
        if self.deferred.pending() {
            count!(self.stats.inner, pending_clear_skips);
            return Found::Unavailable;
        }
        let answer = self.store.lookup(key).await;
        self.found(key, now_ms, answer)
    }

    /// What the store's answer means.
    fn found(&self, key: &EntryKey, now_ms: u64, answer: Result<Lookup, StoreError>) -> Found {
        let counters = &self.stats.inner;
        let lookup = match answer {
            Ok(l) => l,
            Err(e) => {
                count!(counters, store_errors);
                // A cluster node passed over after failures is not a new failure: the other
                // nodes' keys must not lose their cache through the layer's breaker.
                if !e.is_passed_over() {
                    self.breaker.failure();
                }
                tracing::debug!(error = %e, %key, "cache lookup failed; passing through");
                return Found::Unavailable;
            }
        };
        self.breaker.success();
        let fence = || lookup.fence;
        let Some(bytes) = lookup.value else {
            return Found::Miss { fence: fence() };
        };
        match super::vary::read_marker(&bytes) {
            super::vary::Stored::Marker(names) => {
                return Found::Varies {
                    names,
                    fence: fence(),
                }
            }
            super::vary::Stored::Broken => {
                count!(counters, decode_errors);
                return Found::Miss { fence: fence() };
            }
            super::vary::Stored::NotMarker => {}
        }
        match Entry::decode(bytes) {
            Ok(entry) => match entry.staleness(now_ms) {
                Staleness::Fresh => Found::Hit {
                    entry,
                    fence: fence(),
                },
                Staleness::Revalidate | Staleness::IfError => Found::Stale {
                    entry,
                    fence: fence(),
                },
                // Kept for revalidation (`RoutePolicy::keep`): the miss asks the origin
                // whether it is still current.
                Staleness::Dead if super::revalidate::has_validator(&entry) => Found::Stale {
                    entry,
                    fence: fence(),
                },
                Staleness::Dead => Found::Miss { fence: fence() },
            },
            Err(e) => {
                count!(counters, decode_errors);
                tracing::warn!(%key, reason = e.0, "unreadable cache entry; treating as a miss");
                Found::Miss { fence: fence() }
            }
        }
    }

    /// Polls the store for an entry another instance (holding the lease) is fetching, at
    /// most `wait`; takes it only if no clear happened since our own lookup.
    pub(crate) async fn await_remote_fill(
        &self,
        key: &EntryKey,
        fence: Fence,
        wait: Duration,
    ) -> Option<Entry> {
        let deadline = Instant::now() + wait;
        let mut pause = Duration::from_millis(5);
        while Instant::now() < deadline {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
            match self.lookup(key, now_ms()).await {
                Found::Hit { entry, .. } if entry.fence.is_at_or_after(fence) => {
                    return Some(entry)
                }
                Found::Unavailable => return None,
                // The holder's response varied: its entry is under a variant key, and only
                // this request's headers say which. Ask the origin now rather than poll.
                Found::Varies { .. } => return None,
                _ => {}
            }
        }
        None
    }
}
