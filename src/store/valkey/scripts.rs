//! The record set's scripts and the state they keep in this instance: the high-water mark
//! (the newest records state any reply showed, so that a set older than it is seen as
//! rolled back) and the nonce that keeps two new epochs apart.

use bb8_redis::redis;

use super::ValkeyStore;
use crate::error::StoreError;
use crate::store::records::tag_id;
use crate::store::Fence;

impl ValkeyStore {
    /// `EVALSHA` of the sync script on one copy of the records (`chunk`; 0 on a single
    /// server): what changed in it since `from`.
    pub(super) fn sync_command(&self, records_key: &str, chunk: usize, from: Fence) -> redis::Cmd {
        let high = self.high_water(chunk);
        let mut cmd = redis::Cmd::with_capacity(9, records_key.len() + 120);
        cmd.arg("EVALSHA")
            .arg(SYNC.get_hash())
            .arg(1)
            .arg(records_key)
            .arg(high.epoch())
            .arg(high.seq())
            .arg(from.epoch())
            .arg(from.seq())
            .arg(epoch_nonce())
            .arg(chunk);
        cmd
    }

    pub(super) fn high_water(&self, chunk: usize) -> Fence {
        self.inner
            .high_water
            .get(chunk)
            .map_or_else(Fence::default, |h| *crate::lock::lock(h))
    }

    /// Raises the high-water mark of one copy of the records to a state a reply showed.
    /// Epochs only grow (the scripts make each new one later than any the caller has seen),
    /// so states are ordered by epoch, then sequence, and a late reply never lowers the mark.
    pub(super) fn saw_in(&self, chunk: usize, fence: Fence) {
        let Some(high) = self.inner.high_water.get(chunk) else {
            return;
        };
        let mut high = crate::lock::lock(high);
        if (fence.epoch(), fence.seq()) > (high.epoch(), high.seq()) {
            *high = fence;
        }
    }

    /// Runs the clear script on every copy of the records: clears `tags`, or purges when
    /// `None`. Returns the first copy's state after it (the one whose clears are published).
    /// On a cluster the copies are written node by node, each node's at once; copies a
    /// redirect sent elsewhere are written once more after the map is read again.
    pub(super) async fn write_records(&self, tags: Option<&[String]>) -> Result<Fence, StoreError> {
        let Some(mut map) = self.topology().await? else {
            let seed = self.inner.seed.clone();
            let done = self.clear_on(&seed, &[0], tags).await;
            return done
                .into_iter()
                .next()
                .unwrap_or_else(|| Err(StoreError::Unavailable("no copy of the records".into())));
        };
        let mut results: Vec<Option<Result<Fence, StoreError>>> =
            (0..self.inner.chunk_keys.len()).map(|_| None).collect();
        let mut pending: Vec<usize> = (0..results.len()).collect();
        for attempt in 0..2 {
            let slots = pending.iter().map(|&c| (c, self.inner.chunk_slots[c]));
            let (groups, unserved) = map.group(slots);
            for chunk in unserved {
                let none = format!("no cluster node serves copy {chunk} of the records");
                results[chunk] = Some(Err(StoreError::Unavailable(none.into())));
            }
            let written = groups
                .iter()
                .map(|(node, chunks)| self.clear_on(node, chunks, tags));
            let written = futures_util::future::join_all(written).await;
            pending.clear();
            for ((_, chunks), done) in groups.iter().zip(written) {
                for (&chunk, result) in chunks.iter().zip(done) {
                    if attempt == 0 && matches!(&result, Err(e) if super::replies::is_redirect(e)) {
                        pending.push(chunk);
                    }
                    results[chunk] = Some(result);
                }
            }
            if pending.is_empty() {
                break;
            }
            map = self.refreshed_map(&map).await.unwrap_or(map);
        }
        let mut first = None;
        for result in results.into_iter().flatten() {
            let fence = result?;
            first.get_or_insert(fence);
        }
        first.ok_or_else(|| StoreError::Unavailable("no copy of the records".into()))
    }

    /// The key of copy `chunk` of the records.
    fn copy_key(&self, chunk: usize) -> &str {
        if self.is_cluster() {
            &self.inner.chunk_keys[chunk]
        } else {
            &self.inner.records_key
        }
    }

    /// The clear script for copy `chunk` of the records.
    fn clear_invocation(
        &self,
        chunk: usize,
        tags: Option<&[String]>,
    ) -> redis::ScriptInvocation<'static> {
        let high = self.high_water(chunk);
        let mut invocation = CLEAR.prepare_invoke();
        // Only the first copy announces the clear: one notice per clear.
        let channel = if chunk == 0 {
            &self.inner.channel[..]
        } else {
            ""
        };
        invocation
            .key(self.copy_key(chunk))
            .arg(high.epoch())
            .arg(high.seq())
            .arg(channel)
            .arg(self.inner.max_clear_records)
            .arg(epoch_nonce())
            .arg(chunk);
        match tags {
            None => {
                invocation.arg(-1);
            }
            Some(tags) => {
                invocation.arg(tags.len());
                for tag in tags {
                    invocation.arg(&tag_id(tag).to_le_bytes()[..]);
                }
                for tag in tags {
                    invocation.arg(tag);
                }
            }
        }
        invocation
    }

    /// Runs the clear script on the copies `chunks` of the records, all held by `node`; one
    /// result per copy. With `wait_for_replicas`, on a connection of their own (`WAIT`
    /// counts the replicas that have that connection's writes, and blocks it meanwhile),
    /// then one `WAIT` for them all.
    async fn clear_on(
        &self,
        node: &super::Node,
        chunks: &[usize],
        tags: Option<&[String]>,
    ) -> Vec<Result<Fence, StoreError>> {
        let Some((replicas, wait)) = self.inner.wait_for_replicas else {
            let each = chunks.iter().map(|&chunk| {
                let invocation = self.clear_invocation(chunk, tags);
                async move {
                    // Even on a node passed over after failures: a clear writes every
                    // copy at once, and a probe would leave all but one out.
                    let (epoch, seq): (u64, u64) = self
                        .run_on_even_passed_over(node, |mut t| async move {
                            invocation.invoke_async(&mut t.conn).await
                        })
                        .await?;
                    let fence = Fence::new(epoch, seq);
                    self.saw_in(chunk, fence);
                    Ok(fence)
                }
            });
            return futures_util::future::join_all(each).await;
        };
        let confirmed = async {
            let own = node.exclusive().await?;
            // The copies' scripts at once: the connection pipelines them.
            let each = chunks.iter().map(|&chunk| {
                let mut conn = own.conn.clone();
                let invocation = self.clear_invocation(chunk, tags);
                async move {
                    let result = invocation
                        .invoke_async::<(u64, u64)>(&mut conn)
                        .await
                        .map_err(super::replies::classify)
                        .map(|(epoch, seq)| Fence::new(epoch, seq));
                    if let Ok(fence) = &result {
                        self.saw_in(chunk, *fence);
                    }
                    result
                }
            });
            let done = futures_util::future::join_all(each).await;
            if done.iter().all(Result::is_err) {
                return Ok(done);
            }
            let mut conn = own.conn.clone();
            // Replicas attached now, or the most seen attached within the last minute: one
            // whose link is down at this moment is still waited for. A master that had none
            // has nobody a failover could promote.
            let role = redis::cmd("ROLE")
                .query_async::<redis::Value>(&mut conn)
                .await;
            let attached = match role {
                Ok(role) => super::replies::replicas_in_role(&role),
                // `ROLE` is an admin command an ACL may withhold: wait for all asked for.
                Err(e) if e.code() == Some("NOPERM") => i64::from(replicas),
                Err(e) => return Err(super::replies::classify(e)),
            };
            let seen = node.replicas_to_wait(attached);
            let wanted = i64::from(replicas).min(seen);
            if wanted == 0 {
                return Ok(done);
            }
            let acked: i64 = redis::cmd("WAIT")
                .arg(wanted)
                .arg(crate::entry::millis(wait).max(1))
                .query_async(&mut conn)
                .await
                .map_err(super::replies::classify)?;
            if acked < wanted {
                let short = format!(
                    "the clear reached {acked} of {wanted} replicas within {wait:?} \
                     (wait_for_replicas): it is deferred until they confirm it"
                );
                return Err(StoreError::Server(short.into()));
            }
            Ok(done)
        };
        // Checkout, scripts and `ROLE` within the operation timeouts, `WAIT` within `wait`.
        let bound = 2 * self.inner.operation_timeout + wait;
        let failed = |e: StoreError| chunks.iter().map(|_| Err(e.replicate())).collect();
        match tokio::time::timeout(bound, confirmed).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => failed(e),
            Err(_) => failed(StoreError::Timeout),
        }
    }
}

/// A random number below 2^20 that a script adds to a new epoch, so that two instances
/// making one from the same view still make different ones.
pub(super) fn epoch_nonce() -> u64 {
    crate::store::records::new_epoch() & ((1 << 20) - 1)
}

/// The record set's scripts.
pub(super) static SYNC: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("sync.lua")));
pub(super) static CLEAR: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("clear.lua")));
pub(super) static RELEASE_LEASE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("release_lease.lua")));
