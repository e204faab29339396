//! Where entries live. [`Store`] is the small async trait every backend implements; the
//! layer owns the rules (keys, freshness, fail-open) and a store only moves bytes.
//!
//! - [`MemoryStore`]: in-process, bounded by bytes; needs no server (feature `memory`).
//! - [`ValkeyStore`]: Valkey or Redis through a `bb8-redis` pool (feature `valkey`).
//! - [`TieredStore`]: a `MemoryStore` near cache in front of a `ValkeyStore` (both).
//!
//! Write your own by implementing [`Store`]: its docs state the contract and show one.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

use crate::error::StoreError;

/// What the record of the most requested keys keeps of earlier counts at each addition
/// (`Store::record_hot`): it follows what is requested now.
#[cfg_attr(not(any(feature = "memory", feature = "valkey")), allow(dead_code))]
pub(crate) const HOT_FADE: f64 = 0.9;
use crate::key::EntryKey;

#[cfg(feature = "memory")]
mod bounded;
#[cfg(feature = "memory")]
mod memory;
pub(crate) mod records;
#[cfg(all(feature = "valkey", feature = "memory"))]
mod tiered;
#[cfg(feature = "valkey")]
mod valkey;

#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub use memory::MemoryStore;
#[cfg(all(feature = "valkey", feature = "memory"))]
#[cfg_attr(docsrs, doc(cfg(all(feature = "valkey", feature = "memory"))))]
pub use tiered::TieredStore;
#[cfg(feature = "valkey")]
#[cfg_attr(docsrs, doc(cfg(feature = "valkey")))]
pub use valkey::{ValkeyStore, ValkeyStoreBuilder, DEFAULT_OPERATION_TIMEOUT};

/// Where a store's invalidation state stood when a lookup read it: the *epoch* of its clear
/// records (made anew whenever they are created, so a lost record set shows) and the
/// invalidation *sequence*. A fill hands back the fence of the lookup that preceded its
/// origin call; the entry is served later only while no clear of its tags (and no purge)
/// has happened since, in the same epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Fence {
    epoch: u64,
    seq: u64,
}

impl Fence {
    /// A fence at sequence `seq` of epoch `epoch`.
    pub fn new(epoch: u64, seq: u64) -> Self {
        Fence { epoch, seq }
    }

    /// The epoch of the records the sequence belongs to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The invalidation sequence.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Whether `self` was read at or after `earlier`, in the same epoch: everything cleared
    /// before `earlier` was cleared before `self` too. Never for epoch 0, which is no
    /// epoch's (a lookup that could not read the records): it orders nothing.
    pub fn is_at_or_after(&self, earlier: Fence) -> bool {
        self.epoch != 0 && self.epoch == earlier.epoch && self.seq >= earlier.seq
    }
}

/// What a lookup found.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Lookup {
    /// The stored bytes, if the store holds an entry under the key *and* it is current: no
    /// clear of its tags and no purge since its fill's fence. (The bytes may still be
    /// garbage: the layer decodes them and treats anything unreadable as a miss.)
    pub value: Option<Bytes>,
    /// The store's invalidation state as of the moment the value was read (or known not to
    /// have changed since: a store may report an older state, never a newer one). A later
    /// fill passes it back, so an entry whose tags are cleared in between is never served.
    pub fence: Fence,
}

impl Lookup {
    /// A lookup result.
    pub fn new(value: Option<Bytes>, fence: Fence) -> Self {
        Lookup { value, fence }
    }
}

/// What a tag clear did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Invalidation {
    /// The epoch of the records the clear was made in.
    pub epoch: u64,
    /// The invalidation sequence the clear was given: every entry of these tags filled under
    /// an older fence is dead from now on.
    pub seq: u64,
}

impl Invalidation {
    /// An invalidation result.
    pub fn new(epoch: u64, seq: u64) -> Self {
        Invalidation { epoch, seq }
    }
}

/// A clear announced on a namespace's channel (see [`ValkeyStore::subscribe`](crate::store::ValkeyStore::subscribe)).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notice {
    /// These tags were cleared at `seq` of `epoch`.
    Cleared {
        /// The epoch of the records.
        epoch: u64,
        /// The invalidation sequence.
        seq: u64,
        /// The tags.
        tags: Vec<String>,
    },
    /// The whole namespace was purged at `seq` of `epoch`.
    Purged {
        /// The epoch of the records.
        epoch: u64,
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
    /// Reads a channel message: `v2 {epoch} {seq} tags {tag} {tag}...` or
    /// `v2 {epoch} {seq} purge`.
    #[cfg_attr(not(feature = "valkey"), allow(dead_code))]
    pub(crate) fn parse(message: &str) -> Option<Notice> {
        let mut words = message.split(' ');
        if words.next()? != "v2" {
            return None;
        }
        let epoch = words.next()?.parse().ok()?;
        let seq = words.next()?.parse().ok()?;
        match words.next()? {
            "tags" => Some(Notice::Cleared {
                epoch,
                seq,
                tags: words.filter(|w| !w.is_empty()).map(str::to_owned).collect(),
            }),
            "purge" => Some(Notice::Purged { epoch, seq }),
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
    /// The fence returned by the lookup that preceded this fill's origin call.
    pub fence: Fence,
}

impl Fill {
    /// A fill request.
    pub fn new(
        key: EntryKey,
        value: Bytes,
        ttl: Duration,
        tags: Vec<String>,
        fence: Fence,
    ) -> Self {
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
    /// Not written: one of its tags was cleared (or the store purged, or its records
    /// started a new epoch) after the fence, so it could never be served.
    Fenced,
    /// Not written: the store is too far behind to take more fills right now, or the value
    /// is larger than it holds (see `MemoryStore`). Not a failure (the
    /// layer's circuit breaker ignores it); the next miss fills again.
    Dropped,
}

/// A cache backend. Implementations must be cheap to clone (share state through an `Arc`).
///
/// Every method should bound its own time (the layer adds no timeout of its own) and must
/// not panic on any stored value. Values are opaque bytes: the layer encodes and decodes
/// entries, and treats anything unreadable as a miss.
///
/// The contract that keeps promise 4 ("never older than a completed invalidation"): a
/// lookup returns a value only if no clear of the value's tags, and no purge, happened after
/// the fence its fill carried. Fences of epoch 0 mean "the records could not be read": the
/// layer orders nothing by them, so a store's fences should carry an epoch of 1 or more. Check it when the value is read, against records that cannot
/// be half lost: a clear then costs O(tags), and missing records mean a miss, never a hit.
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::{Arc, Mutex};
/// use tower_cache_aside::store::{Fence, Fill, FillOutcome, Invalidation, Lookup, Store};
/// use tower_cache_aside::{EntryKey, StoreError};
///
/// /// A toy store without expiry or bounds (use `MemoryStore` for real).
/// #[derive(Clone, Default)]
/// struct MapStore(Arc<Mutex<Map>>);
///
/// #[derive(Default)]
/// struct Map {
///     entries: HashMap<EntryKey, Fill>,
///     cleared: HashMap<String, u64>, // tag -> sequence of its last clear
///     seq: u64,
///     purged: u64,
/// }
///
/// impl Map {
///     fn current(&self, fill: &Fill) -> bool {
///         let seq = fill.fence.seq();
///         seq >= self.purged && fill.tags.iter().all(|t| self.cleared.get(t).is_none_or(|&c| c <= seq))
///     }
/// }
///
/// impl Store for MapStore {
///     async fn lookup(&self, key: &EntryKey) -> Result<Lookup, StoreError> {
///         let m = self.0.lock().unwrap();
///         let value = m.entries.get(key).filter(|f| m.current(f)).map(|f| f.value.clone());
///         // One epoch for the store's life (it keeps its records as long as its entries);
///         // epoch 0 is reserved for "the records could not be read".
///         Ok(Lookup::new(value, Fence::new(1, m.seq)))
///     }
///     async fn fill(&self, fill: Fill) -> Result<FillOutcome, StoreError> {
///         let mut m = self.0.lock().unwrap();
///         if !m.current(&fill) {
///             return Ok(FillOutcome::Fenced);
///         }
///         m.entries.insert(fill.key.clone(), fill);
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
///         Ok(Invalidation::new(1, seq))
///     }
///     async fn purge(&self) -> Result<u64, StoreError> {
///         let mut m = self.0.lock().unwrap();
///         m.seq += 1;
///         m.purged = m.seq;
///         Ok(m.seq)
///     }
/// }
///
/// let layer = tower_cache_aside::CacheLayer::new(MapStore::default());
/// ```
pub trait Store: Clone + Send + Sync + 'static {
    /// Reads the value under `key`, if it is current, and the fence, in one step.
    fn lookup(&self, key: &EntryKey) -> impl Future<Output = Result<Lookup, StoreError>> + Send;

    /// The same answer as [`lookup`](Store::lookup), given at once when the store has it
    /// without waiting (an in-process store, a near tier holding the key), or `None` to
    /// have the layer await `lookup` instead (the default). A hit answered here is served
    /// without a future of its own: no allocation, no call into the service below. It runs
    /// inside the service's `call`: it must not block, wait for a lock held across I/O, or
    /// poll a future to completion.
    fn lookup_now(&self, key: &EntryKey) -> Option<Result<Lookup, StoreError>> {
        let _ = key;
        None
    }

    /// Stores a value; a store may refuse one that a clear since `fill.fence` made dead.
    fn fill(&self, fill: Fill) -> impl Future<Output = Result<FillOutcome, StoreError>> + Send;

    /// Removes the value under `key`; returns whether there was one.
    fn remove(&self, key: &EntryKey) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Makes every entry carrying any of `tags` dead, and every later fill whose fence
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

    /// Adds an instance's counts of its most requested keys to the store's record, which
    /// keeps the `keep` most requested (and lets older counts fade, so that it follows
    /// what is requested now). Each key is an encoded request, opaque to the store. Stores
    /// that keep no record ignore it (the default).
    fn record_hot(
        &self,
        counts: Vec<(Bytes, u64)>,
        keep: usize,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = (counts, keep);
        async { Ok(()) }
    }

    /// The store's record of the most requested keys, most requested first, at most
    /// `limit` (empty for stores that keep none, the default).
    fn hot(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(Bytes, u64)>, StoreError>> + Send {
        let _ = limit;
        async { Ok(Vec::new()) }
    }

    /// Runs [`fill`](Store::fill) in the background and hands its outcome to `done`, once,
    /// on whatever thread finishes it. This is how the layer fills after a miss. The default
    /// spawns a Tokio task (or, outside a runtime, reports [`StoreError::Unavailable`]);
    /// stores override it to skip the task: the Valkey store queues the fill for its batch
    /// writer, the memory store fills on the spot.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_cache_aside::{EntryKey, store::{Fence, Fill, FillOutcome, MemoryStore, Store}};
    ///
    /// let store = MemoryStore::new(1 << 20);
    /// let key = EntryKey::new("events_id", [0; 32]);
    /// // The fence of the lookup that missed, before the origin was asked.
    /// let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    /// let fence: Fence = runtime.block_on(store.lookup(&key)).unwrap().fence;
    /// let fill = Fill::new(key, "{}".into(), Duration::from_secs(60), vec!["event:1".into()], fence);
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
    struct Plain(crate::store::MemoryStore);

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
    fn one_fill(fence: Fence) -> Fill {
        let ttl = Duration::from_secs(60);
        Fill::new(
            EntryKey::new("r", [1; 32]),
            Bytes::from_static(b"v"),
            ttl,
            vec![],
            fence,
        )
    }

    #[cfg(feature = "memory")]
    #[tokio::test]
    async fn default_background_fill_runs_a_task_and_reports() {
        let store = Plain(crate::store::MemoryStore::new(1 << 20));
        let fence = store
            .lookup(&EntryKey::new("r", [1; 32]))
            .await
            .unwrap()
            .fence;
        let (tx, rx) = tokio::sync::oneshot::channel();
        store.fill_in_background(one_fill(fence), Box::new(move |r| drop(tx.send(r))));
        assert_eq!(rx.await.unwrap().unwrap(), FillOutcome::Stored);
        let found = store.lookup(&EntryKey::new("r", [1; 32])).await.unwrap();
        assert_eq!(found.value.as_deref(), Some(&b"v"[..]));
    }

    #[cfg(feature = "memory")]
    #[test]
    fn default_background_fill_outside_a_runtime_reports_an_error() {
        let store = Plain(crate::store::MemoryStore::new(1 << 20));
        let outcome = std::sync::Arc::new(std::sync::Mutex::new(None));
        let seen = outcome.clone();
        store.fill_in_background(
            one_fill(Fence::default()),
            Box::new(move |r| *seen.lock().unwrap() = Some(r.is_err())),
        );
        assert_eq!(*outcome.lock().unwrap(), Some(true));
    }

    #[test]
    fn notices_parse() {
        assert_eq!(
            Notice::parse("v2 3 7 tags events event:1"),
            Some(Notice::Cleared {
                epoch: 3,
                seq: 7,
                tags: vec!["events".into(), "event:1".into()]
            })
        );
        assert_eq!(
            Notice::parse("v2 3 9 purge"),
            Some(Notice::Purged { epoch: 3, seq: 9 })
        );
        for bad in [
            "",
            "v1 1 purge",
            "v2 1 x purge",
            "v2 1 1 other",
            "v2 1",
            "v2",
        ] {
            assert_eq!(Notice::parse(bad), None, "{bad}");
        }
    }
}
