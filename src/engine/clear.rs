//! Clears that could not reach the store, kept until a background retry lands them.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::Engine;
use crate::error::StoreError;
use crate::lock::lock;
use crate::stats::count;
use crate::store::{Invalidation, Store};

/// Past this many deferred tags, the retry purges the namespace instead.
const MAX_DEFERRED_TAGS: usize = 10_000;
const RETRY_EVERY: Duration = Duration::from_millis(200);

/// A clear to make.
#[derive(Debug)]
pub(crate) enum Clear {
    /// Every entry carrying any of these tags.
    Tags(Vec<String>),
    /// Every entry of the namespace.
    All,
}

#[derive(Debug, Default)]
pub(crate) struct Deferred {
    /// Set while anything is deferred: read on every lookup, so an atomic.
    active: AtomicBool,
    state: Mutex<DeferredState>,
}

#[derive(Debug, Default)]
struct DeferredState {
    tags: HashSet<String>,
    purge: bool,
    retrying: bool,
}

impl Deferred {
    pub(crate) fn pending(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    fn state(&self) -> MutexGuard<'_, DeferredState> {
        lock(&self.state)
    }
}

impl<St: Store> Engine<St> {
    /// Clears `tags` in the store now, or defers the clear when the store cannot be reached.
    pub(crate) async fn clear(
        self: &Arc<Self>,
        tags: Vec<String>,
    ) -> Result<Invalidation, StoreError> {
        if tags.is_empty() {
            return Ok(Invalidation::default());
        }
        let counters = &self.stats.inner;
        // An open breaker means the store is known to be down: defer without waiting on it.
        let result = if self.breaker.allow() {
            self.store.invalidate(&tags).await
        } else {
            Err(StoreError::Unavailable("circuit breaker open".into()))
        };
        match result {
            Ok(done) => {
                self.breaker.success();
                count!(counters, invalidations);
                self.refresh_cleared(&tags);
                self.recent.add(Some(tags), done.seq);
                Ok(done)
            }
            Err(e) => {
                count!(counters, store_errors);
                self.breaker.failure();
                tracing::warn!(error = %e, ?tags, "cache clear failed; deferring it and bypassing the store until it lands");
                self.defer(Clear::Tags(tags));
                Err(e)
            }
        }
    }

    /// Purges the namespace now, or defers the purge.
    pub(crate) async fn purge_all(self: &Arc<Self>) -> Result<u64, StoreError> {
        match self.store.purge().await {
            Ok(seq) => {
                self.breaker.success();
                count!(self.stats.inner, invalidations);
                self.recent.add(None, seq);
                Ok(seq)
            }
            Err(e) => {
                count!(self.stats.inner, store_errors);
                self.breaker.failure();
                self.defer(Clear::All);
                Err(e)
            }
        }
    }

    /// Keeps a clear that could not reach the store, bypasses the store until it lands,
    /// and makes sure a retry runs.
    pub(crate) fn defer(self: &Arc<Self>, clear: Clear) {
        count!(self.stats.inner, clears_deferred);
        let mut state = self.deferred.state();
        match clear {
            Clear::Tags(tags) => state.tags.extend(tags),
            Clear::All => state.purge = true,
        }
        state.purge |= state.tags.len() > MAX_DEFERRED_TAGS;
        if state.purge {
            state.tags.clear();
        }
        self.deferred.active.store(true, Ordering::Release);
        if !state.retrying {
            state.retrying = true;
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(self.clone().retry_deferred());
                }
                Err(_) => state.retrying = false,
            }
        }
    }

    async fn retry_deferred(self: Arc<Self>) {
        loop {
            tokio::time::sleep(RETRY_EVERY).await;
            let (tags, purge) = {
                let mut state = self.deferred.state();
                if state.tags.is_empty() && !state.purge {
                    // Checked and cleared under the lock, so no deferral is lost in between.
                    self.deferred.active.store(false, Ordering::Release);
                    state.retrying = false;
                    tracing::info!("deferred cache clears landed; using the store again");
                    return;
                }
                (
                    std::mem::take(&mut state.tags),
                    std::mem::take(&mut state.purge),
                )
            };
            let result = if purge {
                self.store.purge().await.map(|_| ())
            } else {
                let tags: Vec<String> = tags.iter().cloned().collect();
                self.store.invalidate(&tags).await.map(|_| ())
            };
            if result.is_ok() {
                self.breaker.success();
                count!(self.stats.inner, invalidations);
            } else {
                let mut state = self.deferred.state();
                state.purge |= purge;
                if !state.purge {
                    state.tags.extend(tags);
                }
            }
        }
    }
}

/// How many of its latest clears a layer remembers.
const RECENT: usize = 32;

/// One clear this instance made (for operators: [`CacheHandle::recent_clears`]).
///
/// [`CacheHandle::recent_clears`]: crate::CacheHandle::recent_clears
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecentClear {
    /// When it landed.
    pub at: std::time::SystemTime,
    /// The tags cleared; empty for a purge.
    pub tags: Vec<String>,
    /// Whether it was a purge of every entry.
    pub purge: bool,
    /// The clear's sequence in the store.
    pub seq: u64,
}

/// The latest clears, newest last.
#[derive(Debug, Default)]
pub(crate) struct Recent(Mutex<std::collections::VecDeque<RecentClear>>);

impl Recent {
    fn add(&self, tags: Option<Vec<String>>, seq: u64) {
        let mut recent = lock(&self.0);
        if recent.len() == RECENT {
            recent.pop_front();
        }
        let purge = tags.is_none();
        // Reserved tags (a path's) are the crate's own: shown as what they are.
        let tags = tags
            .unwrap_or_default()
            .into_iter()
            .map(|t| {
                if t.starts_with('~') {
                    "(a path's entries)".to_owned()
                } else {
                    t
                }
            })
            .collect();
        recent.push_back(RecentClear {
            at: std::time::SystemTime::now(),
            tags,
            purge,
            seq,
        });
    }

    pub(crate) fn list(&self) -> Vec<RecentClear> {
        lock(&self.0).iter().cloned().collect()
    }
}
