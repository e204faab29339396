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
    pub(super) async fn write_records(&self, tags: Option<&[String]>) -> Result<Fence, StoreError> {
        let Some(map) = self.topology().await? else {
            let node = &self.inner.seed;
            return self
                .clear_copy(node, &self.inner.records_key, 0, tags)
                .await;
        };
        let copies = self
            .inner
            .chunk_keys
            .iter()
            .enumerate()
            .map(|(chunk, key)| {
                let map = map.clone();
                async move {
                    let mut last =
                        Err(StoreError::Unavailable("no node serves the records".into()));
                    // Once more after a redirect: the map is read again first.
                    for map in [Some(map), None] {
                        let map = match map {
                            Some(m) => m,
                            None => match self.refreshed_map().await {
                                Some(m) => m,
                                None => break,
                            },
                        };
                        let Some(node) = map.node(super::cluster::slot(key.as_bytes())) else {
                            break;
                        };
                        last = self.clear_copy(node, key, chunk, tags).await;
                        if !matches!(&last, Err(e) if super::replies::is_redirect(e)) {
                            break;
                        }
                    }
                    last
                }
            });
        let done = futures_util::future::join_all(copies).await;
        let mut first = None;
        for result in done {
            let fence = result?;
            first.get_or_insert(fence);
        }
        first.ok_or_else(|| StoreError::Unavailable("no copy of the records".into()))
    }

    /// The clear script on one copy of the records, on `node`.
    async fn clear_copy(
        &self,
        node: &super::Node,
        records_key: &str,
        chunk: usize,
        tags: Option<&[String]>,
    ) -> Result<Fence, StoreError> {
        let high = self.high_water(chunk);
        let mut invocation = CLEAR.prepare_invoke();
        // Only the first copy announces the clear: one notice per clear.
        let channel = if chunk == 0 {
            &self.inner.channel[..]
        } else {
            ""
        };
        invocation
            .key(records_key)
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
        let Some((replicas, wait)) = self.inner.wait_for_replicas else {
            let (epoch, seq): (u64, u64) = self
                .run_on(node, |mut t| async move {
                    invocation.invoke_async(&mut t.conn).await
                })
                .await?;
            let fence = Fence::new(epoch, seq);
            self.saw_in(chunk, fence);
            return Ok(fence);
        };
        // On a connection of its own: `WAIT` counts the replicas that have this
        // connection's writes, and blocks the connection meanwhile.
        let confirmed = async {
            let mut own = node.exclusive().await?;
            let (epoch, seq): (u64, u64) = invocation
                .invoke_async(&mut own.conn)
                .await
                .map_err(super::connection::classify)?;
            let fence = Fence::new(epoch, seq);
            self.saw_in(chunk, fence);
            // A master without replicas has nothing a failover could lose the clear to.
            let role: redis::Value = redis::cmd("ROLE")
                .query_async(&mut own.conn)
                .await
                .map_err(super::connection::classify)?;
            let attached = super::replies::replicas_in_role(&role);
            let wanted = i64::from(replicas).min(attached);
            if wanted == 0 {
                return Ok(fence);
            }
            let acked: i64 = redis::cmd("WAIT")
                .arg(wanted)
                .arg(crate::entry::millis(wait).max(1))
                .query_async(&mut own.conn)
                .await
                .map_err(super::connection::classify)?;
            if acked < wanted {
                return Err(StoreError::Server(
                    format!(
                        "the clear reached {acked} of {wanted} replicas within {wait:?} \
                         (wait_for_replicas): it is deferred until they confirm it"
                    )
                    .into(),
                ));
            }
            Ok(fence)
        };
        let bound = self.inner.operation_timeout + wait;
        match tokio::time::timeout(bound, confirmed).await {
            Ok(done) => done,
            Err(_) => Err(StoreError::Timeout),
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
