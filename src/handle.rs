//! [`CacheHandle`]: the cache from code, for handlers and background jobs.

use std::sync::Arc;

use crate::engine::Engine;
use crate::error::StoreError;
use crate::stats::CacheStats;
use crate::store::{Invalidation, Store};
use crate::tags::push_tags;

/// A cloneable handle on a [`CacheLayer`](crate::CacheLayer)'s store, rules and counters
/// (from [`CacheLayer::handle`](crate::CacheLayer::handle)).
///
/// ```
/// # async fn demo() {
/// use tower_cache_aside::{CacheLayer, store::MemoryStore};
///
/// let cache = CacheLayer::new(MemoryStore::new(64 << 20));
/// let handle = cache.handle();
/// // After a background job changed server 7:
/// let cleared = handle.invalidate(["server:7", "servers"]).await;
/// # }
/// ```
pub struct CacheHandle<St> {
    pub(crate) engine: Arc<Engine<St>>,
}

impl<St> Clone for CacheHandle<St> {
    fn clone(&self) -> Self {
        CacheHandle {
            engine: self.engine.clone(),
        }
    }
}

impl<St> std::fmt::Debug for CacheHandle<St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CacheHandle")
    }
}

impl<St: Store> CacheHandle<St> {
    /// Makes every entry carrying any of `tags` dead (HTTP responses and values alike) and
    /// reports the clear's sequence. It costs the same whatever the tags carry: entries are
    /// checked against the clear when read, never searched for. Invalid tags are logged and
    /// skipped. When the store
    /// cannot be reached the clear is deferred and retried, the store is bypassed until it
    /// lands, and the error is returned.
    pub async fn invalidate<I, T>(&self, tags: I) -> Result<Invalidation, StoreError>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        let given: Vec<T> = tags.into_iter().collect();
        let mut valid = Vec::with_capacity(given.len());
        push_tags(
            &mut valid,
            given.iter().map(AsRef::as_ref),
            "CacheHandle::invalidate",
        );
        self.engine.clear(valid).await
    }

    /// Makes every entry of the namespace dead at once (O(1): a floor that lookups compare
    /// with each entry's fence; the dead entries expire or are evicted on their own).
    pub async fn purge(&self) -> Result<u64, StoreError> {
        self.engine.purge_all().await
    }

    /// Adds this instance's counts of its most requested keys to the store's record now
    /// (it is added every [`CacheLayer::hot_flush_every`](crate::CacheLayer::hot_flush_every)
    /// anyway): before a graceful shutdown, say. Returns how many keys it added.
    pub async fn flush_hot_keys(&self) -> Result<usize, StoreError> {
        self.engine.flush_hot().await
    }

    /// This instance's most requested keys, most requested first (at most `limit`): what
    /// it would add to the store's record, and what a clear refreshes on routes that ask.
    /// Counts halve at each addition to the store's record, so they follow what is hot now.
    pub fn hot_keys(&self, limit: usize) -> Vec<HotKey> {
        self.engine
            .hot
            .top(limit)
            .into_iter()
            .map(|(r, requests)| HotKey {
                target: r.target.clone(),
                host: r
                    .host
                    .as_ref()
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned),
                user: r.user.clone(),
                requests,
            })
            .collect()
    }

    /// The latest clears (tags and purges) this instance made, newest last (at most 32).
    /// Clears other instances made reach this one as notices and are not listed.
    pub fn recent_clears(&self) -> Vec<crate::RecentClear> {
        self.engine.recent.list()
    }

    /// The layer's counters.
    pub fn stats(&self) -> CacheStats {
        self.engine.stats.clone()
    }
}

/// One of the most requested keys ([`CacheHandle::hot_keys`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HotKey {
    /// The path and query.
    pub target: String,
    /// The `Host` it was asked for, when the request named one.
    pub host: Option<String>,
    /// Whose entry it is, on a per-user route.
    pub user: Option<String>,
    /// Requests counted (recent ones weigh most).
    pub requests: u64,
}

#[cfg(feature = "serde")]
mod values {
    use super::*;
    use crate::engine::Found;
    use crate::entry::{now_ms, Entry, Lifetimes};
    use crate::key::EntryKey;
    use crate::stats::{count, count_route};
    use crate::store::{Fence, Fill};
    use sha2::{Digest, Sha256};
    use std::time::Duration;

    impl<St: Store> CacheHandle<St> {
        /// Returns the value cached under `key`, or computes it with `compute`, caches it for
        /// `ttl` under `tags` and returns it: the seed's `withCache`, for values that are not
        /// HTTP responses. Values are JSON (serde). The same tags, fence and fail-open rules
        /// apply as for responses: a store error means `compute` runs and nothing is cached;
        /// an error from `compute` is returned and nothing is cached.
        ///
        /// `key` is hashed, so any text will do; put everything the value depends on in it
        /// (`"stats:user:42"`).
        ///
        /// ```
        /// # async fn demo() -> Result<(), std::io::Error> {
        /// use std::time::Duration;
        /// use tower_cache_aside::{CacheLayer, store::MemoryStore};
        ///
        /// let handle = CacheLayer::new(MemoryStore::new(1 << 20)).handle();
        /// let total: u64 = handle
        ///     .get_or_fill("events:count", Duration::from_secs(60), ["events"], || async {
        ///         Ok::<_, std::io::Error>(12_345) // an expensive query
        ///     })
        ///     .await?;
        /// # Ok(()) }
        /// ```
        #[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
        pub async fn get_or_fill<T, I, Tag, F, Fut, E>(
            &self,
            key: &str,
            ttl: Duration,
            tags: I,
            compute: F,
        ) -> Result<T, E>
        where
            T: serde::Serialize + serde::de::DeserializeOwned,
            I: IntoIterator<Item = Tag>,
            Tag: AsRef<str>,
            F: FnOnce() -> Fut,
            Fut: std::future::Future<Output = Result<T, E>>,
        {
            let entry_key = EntryKey::new(
                crate::engine::VALUES_ROUTE,
                Sha256::digest(key.as_bytes()).into(),
            );
            let now = now_ms();
            let fence: Option<Fence> = match self.engine.lookup(&entry_key, now).await {
                Found::Hit { entry, .. } => match serde_json::from_slice(&entry.body) {
                    Ok(value) => {
                        count_route!(self.engine.stats.inner, self.engine.values, hits);
                        self.engine
                            .values
                            .served(entry.body.len() as u64, entry.origin_ms);
                        return Ok(value);
                    }
                    Err(e) => {
                        count!(self.engine.stats.inner, decode_errors);
                        tracing::warn!(error = %e, "cached value does not deserialize; recomputing");
                        None
                    }
                },
                Found::Miss { fence }
                | Found::Stale { fence, .. }
                | Found::Varies { fence, .. } => Some(fence),
                Found::Unavailable => None,
            };
            count_route!(self.engine.stats.inner, self.engine.values, misses);
            let asked_at = now_ms();
            let value = compute().await?;
            let Some(fence) = fence else { return Ok(value) };
            match serde_json::to_vec(&value) {
                Ok(json) if json.len() <= self.engine.max_body_bytes && !ttl.is_zero() => {
                    let given: Vec<Tag> = tags.into_iter().collect();
                    let mut valid = Vec::new();
                    push_tags(&mut valid, given.iter().map(AsRef::as_ref), "get_or_fill");
                    let headers = http::HeaderMap::new();
                    let lifetimes = Lifetimes::fresh_for(ttl);
                    let mut entry =
                        Entry::new(http::StatusCode::OK, headers, fence, valid, lifetimes);
                    entry.body = json.into();
                    let took = now_ms().saturating_sub(asked_at);
                    entry.origin_ms = u32::try_from(took).unwrap_or(u32::MAX);
                    let (encoded, ttl) = (entry.encode(), entry.store_ttl());
                    let fill = Fill::new(entry_key, encoded, ttl, entry.tags, fence);
                    self.engine.clone().spawn_fill(fill, None);
                }
                Ok(_) => count!(self.engine.stats.inner, oversize),
                Err(e) => tracing::warn!(error = %e, "value does not serialize; not cached"),
            }
            Ok(value)
        }
    }
}
