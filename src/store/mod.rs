//! Where entries live. [`Store`] is the small async trait every backend implements; the
//! layer owns the rules (keys, freshness, fail-open) and a store only moves bytes.
//!
//! - [`MemoryStore`](crate::MemoryStore): in-process, bounded by bytes; needs no server.
//! - [`ValkeyStore`](crate::ValkeyStore): Valkey or Redis through a `bb8-redis` pool.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

use crate::error::StoreError;
use crate::key::EntryKey;

#[cfg(feature = "memory")]
pub(crate) mod memory;
#[cfg(all(feature = "valkey", feature = "memory"))]
pub(crate) mod tiered;
#[cfg(feature = "valkey")]
pub(crate) mod valkey;

/// How long a tag's clear is remembered, and so the longest a miss may take between its
/// lookup and its fill: the layer drops fills older than this rather than risk storing data
/// from before a clear whose record has expired.
pub const FENCE_WINDOW: Duration = Duration::from_secs(600);

/// What a lookup found.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Lookup {
    /// The stored bytes, if any (an encoded entry, or garbage: the layer checks).
    pub value: Option<Bytes>,
    /// The store's invalidation sequence as of the moment the value was read (read with it,
    /// or known not to have changed since: a store may report an older sequence, never a
    /// newer one). A later fill passes it back so the store can refuse data that an
    /// invalidation made stale in between.
    pub fence: u64,
    /// The sequence of the last purge as of the moment the value was read: an entry filled
    /// with an older fence is dead.
    pub purged: u64,
}

impl Lookup {
    /// A lookup result.
    pub fn new(value: Option<Bytes>, fence: u64) -> Self {
        Lookup {
            value,
            fence,
            purged: 0,
        }
    }

    /// Sets the sequence of the last purge.
    #[must_use]
    pub fn purged(mut self, purged: u64) -> Self {
        self.purged = purged;
        self
    }
}

/// What a tag clear did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Invalidation {
    /// The invalidation sequence the clear was given.
    pub seq: u64,
    /// How many stored entries it removed.
    pub removed: u64,
}

impl Invalidation {
    /// An invalidation result.
    pub fn new(seq: u64, removed: u64) -> Self {
        Invalidation { seq, removed }
    }
}

/// A clear announced on a namespace's channel (see [`ValkeyStore::subscribe`](crate::ValkeyStore::subscribe)).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notice {
    /// These tags were cleared at `seq`.
    Cleared {
        /// The invalidation sequence.
        seq: u64,
        /// The tags.
        tags: Vec<String>,
    },
    /// The whole namespace was purged at `seq`.
    Purged {
        /// The invalidation sequence.
        seq: u64,
    },
    /// The subscription is (re)established. Clears published before this, while it was
    /// down, were missed (pub/sub is at-most-once): local copies must be dropped now.
    Subscribed,
    /// The subscription broke: until the next `Subscribed`, clears may be missed, so local
    /// copies must not be served.
    Lost,
}

impl Notice {
    /// Reads a channel message: `v1 {seq} tags {tag} {tag}...` or `v1 {seq} purge`.
    #[cfg_attr(not(feature = "valkey"), allow(dead_code))]
    pub(crate) fn parse(message: &str) -> Option<Notice> {
        let mut words = message.split(' ');
        if words.next()? != "v1" {
            return None;
        }
        let seq = words.next()?.parse().ok()?;
        match words.next()? {
            "tags" => Some(Notice::Cleared {
                seq,
                tags: words.filter(|w| !w.is_empty()).map(str::to_owned).collect(),
            }),
            "purge" => Some(Notice::Purged { seq }),
            _ => None,
        }
    }
}

/// A value to store.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Fill {
    /// Where to store it.
    pub key: EntryKey,
    /// The encoded entry.
    pub value: Bytes,
    /// How long the store keeps it.
    pub ttl: Duration,
    /// The entry's tags (validated).
    pub tags: Vec<String>,
    /// The fence returned by the lookup that preceded this fill.
    pub fence: u64,
}

impl Fill {
    /// A fill request.
    pub fn new(key: EntryKey, value: Bytes, ttl: Duration, tags: Vec<String>, fence: u64) -> Self {
        Fill {
            key,
            value,
            ttl,
            tags,
            fence,
        }
    }
}

/// Whether a fill was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FillOutcome {
    /// The value is stored.
    Stored,
    /// The store refused it: one of its tags was invalidated after the fence.
    Fenced,
    /// Not written: the store is too far behind to take more fills right now. Not a
    /// failure (the layer's circuit breaker ignores it); the next miss fills again.
    Dropped,
}

/// A cache backend. Implementations must be cheap to clone (share state through an `Arc`).
///
/// Every method should bound its own time (the layer adds no timeout of its own) and must
/// not panic on any stored value. Values are opaque bytes: the layer encodes and decodes
/// entries, and treats anything unreadable as a miss.
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::{Arc, Mutex};
/// use tower_cache_aside::{EntryKey, Fill, FillOutcome, Invalidation, Lookup, Store, StoreError};
///
/// /// A toy store without expiry or bounds (use `MemoryStore` for real).
/// #[derive(Clone, Default)]
/// struct MapStore(Arc<Mutex<Map>>);
///
/// #[derive(Default)]
/// struct Map {
///     entries: HashMap<EntryKey, (bytes::Bytes, Vec<String>)>,
///     cleared: HashMap<String, u64>, // tag -> sequence of its last clear
///     seq: u64,
///     purged: u64,
/// }
///
/// impl Store for MapStore {
///     async fn lookup(&self, key: &EntryKey) -> Result<Lookup, StoreError> {
///         let m = self.0.lock().unwrap();
///         Ok(Lookup::new(m.entries.get(key).map(|e| e.0.clone()), m.seq).purged(m.purged))
///     }
///     async fn fill(&self, fill: Fill) -> Result<FillOutcome, StoreError> {
///         let mut m = self.0.lock().unwrap();
///         let stale = m.purged > fill.fence
///             || fill.tags.iter().any(|t| m.cleared.get(t).is_some_and(|&s| s > fill.fence));
///         if stale {
///             return Ok(FillOutcome::Fenced);
///         }
///         m.entries.insert(fill.key, (fill.value, fill.tags));
///         Ok(FillOutcome::Stored)
///     }
///     async fn remove(&self, key: &EntryKey) -> Result<bool, StoreError> {
///         Ok(self.0.lock().unwrap().entries.remove(key).is_some())
///     }
///     async fn invalidate(&self, tags: &[String]) -> Result<Invalidation, StoreError> {
///         let mut m = self.0.lock().unwrap();
///         m.seq += 1;
///         let seq = m.seq;
///         for t in tags {
///             m.cleared.insert(t.clone(), seq);
///         }
///         let before = m.entries.len();
///         m.entries.retain(|_, (_, own)| !own.iter().any(|t| tags.contains(t)));
///         Ok(Invalidation::new(seq, (before - m.entries.len()) as u64))
///     }
///     async fn purge(&self) -> Result<u64, StoreError> {
///         let mut m = self.0.lock().unwrap();
///         m.seq += 1;
///         m.purged = m.seq;
///         m.entries.clear();
///         Ok(m.seq)
///     }
/// }
///
/// let layer = tower_cache_aside::CacheLayer::new(MapStore::default());
/// ```
pub trait Store: Clone + Send + Sync + 'static {
    /// Reads the value under `key` and the current fence, in one step.
    fn lookup(&self, key: &EntryKey) -> impl Future<Output = Result<Lookup, StoreError>> + Send;

    /// Stores a value unless an invalidation made it stale since `fill.fence`.
    fn fill(&self, fill: Fill) -> impl Future<Output = Result<FillOutcome, StoreError>> + Send;

    /// Removes the value under `key`; returns whether there was one.
    fn remove(&self, key: &EntryKey) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Clears every entry carrying any of `tags`, and refuses later fills whose fence
    /// predates the clear.
    fn invalidate(
        &self,
        tags: &[String],
    ) -> impl Future<Output = Result<Invalidation, StoreError>> + Send;

    /// Makes every stored entry dead at once; returns the purge's sequence.
    fn purge(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Asks for the right to fetch `key` from the origin for `ttl`, across every instance
    /// sharing the store: `Some(token)` when granted, `None` while another instance holds it.
    /// Stores that no other instance shares grant it always (the default).
    fn try_lease(
        &self,
        key: &EntryKey,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send {
        let _ = (key, ttl);
        async { Ok(Some(0)) }
    }

    /// Gives a lease back early (it expires by itself otherwise).
    fn release_lease(
        &self,
        key: &EntryKey,
        token: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = (key, token);
        async { Ok(()) }
    }

    /// Runs [`fill`](Store::fill) in the background and hands its outcome to `done`, once,
    /// on whatever thread finishes it. This is how the layer fills after a miss. The default
    /// spawns a Tokio task (or, outside a runtime, reports [`StoreError::Unavailable`]);
    /// stores override it to skip the task: the Valkey store queues the fill for its batch
    /// writer, the memory store fills on the spot.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_cache_aside::{EntryKey, Fill, FillOutcome, MemoryStore, Store};
    ///
    /// let store = MemoryStore::new(1 << 20);
    /// let key = EntryKey::new("events_id", [0; 32]);
    /// let fill = Fill::new(key, "{}".into(), Duration::from_secs(60), vec!["event:1".into()], 0);
    /// store.fill_in_background(
    ///     fill,
    ///     Box::new(|outcome| assert!(matches!(outcome, Ok(FillOutcome::Stored)))),
    /// );
    /// ```
    fn fill_in_background(&self, fill: Fill, done: FillDone) {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let store = self.clone();
                let task = async move { done(store.fill(fill).await) };
                runtime.spawn(tracing::Instrument::in_current_span(task));
            }
            Err(_) => done(Err(StoreError::Unavailable(
                "no Tokio runtime to fill the cache from".into(),
            ))),
        }
    }
}

/// What [`Store::fill_in_background`] calls with the outcome of a fill.
pub type FillDone = Box<dyn FnOnce(Result<FillOutcome, StoreError>) + Send>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A store that keeps `Store`'s default `fill_in_background` (a task per fill).
    #[cfg(feature = "memory")]
    #[derive(Clone)]
    struct Plain(crate::MemoryStore);

    #[cfg(feature = "memory")]
    impl Store for Plain {
        async fn lookup(&self, key: &EntryKey) -> Result<Lookup, StoreError> {
            self.0.lookup(key).await
        }
        async fn fill(&self, fill: Fill) -> Result<FillOutcome, StoreError> {
            self.0.fill(fill).await
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
    }

    #[cfg(feature = "memory")]
    fn one_fill() -> Fill {
        let ttl = Duration::from_secs(60);
        Fill::new(
            EntryKey::new("r", [1; 32]),
            Bytes::from_static(b"v"),
            ttl,
            vec![],
            0,
        )
    }

    #[cfg(feature = "memory")]
    #[tokio::test]
    async fn default_background_fill_runs_a_task_and_reports() {
        let store = Plain(crate::MemoryStore::new(1 << 20));
        let (tx, rx) = tokio::sync::oneshot::channel();
        store.fill_in_background(one_fill(), Box::new(move |r| drop(tx.send(r))));
        assert_eq!(rx.await.unwrap().unwrap(), FillOutcome::Stored);
        let found = store.lookup(&EntryKey::new("r", [1; 32])).await.unwrap();
        assert_eq!(found.value.as_deref(), Some(&b"v"[..]));
    }

    #[cfg(feature = "memory")]
    #[test]
    fn default_background_fill_outside_a_runtime_reports_an_error() {
        let store = Plain(crate::MemoryStore::new(1 << 20));
        let outcome = std::sync::Arc::new(std::sync::Mutex::new(None));
        let seen = outcome.clone();
        store.fill_in_background(
            one_fill(),
            Box::new(move |r| *seen.lock().unwrap() = Some(r.is_err())),
        );
        assert_eq!(*outcome.lock().unwrap(), Some(true));
    }

    #[test]
    fn notices_parse() {
        assert_eq!(
            Notice::parse("v1 7 tags events event:1"),
            Some(Notice::Cleared {
                seq: 7,
                tags: vec!["events".into(), "event:1".into()]
            })
        );
        assert_eq!(Notice::parse("v1 9 purge"), Some(Notice::Purged { seq: 9 }));
        for bad in ["", "v2 1 purge", "v1 x purge", "v1 1 other", "v1"] {
            assert_eq!(Notice::parse(bad), None, "{bad}");
        }
    }
}
