//! The record set's scripts and the state they keep in this instance: the high-water mark
//! (the newest records state any reply showed, so that a set older than it is seen as
//! rolled back) and the nonce that keeps two new epochs apart.

use bb8_redis::redis;

use super::ValkeyStore;
use crate::error::StoreError;
use crate::store::records::tag_id;
use crate::store::Fence;

impl ValkeyStore {
    /// `EVALSHA` of the sync script: what changed in the record set since `from`.
    pub(super) fn sync_command(&self, from: Fence) -> redis::Cmd {
        let high = self.high_water();
        let mut cmd = redis::Cmd::with_capacity(8, self.inner.records_key.len() + 112);
        cmd.arg("EVALSHA")
            .arg(SYNC.get_hash())
            .arg(1)
            .arg(&self.inner.records_key)
            .arg(high.epoch())
            .arg(high.seq())
            .arg(from.epoch())
            .arg(from.seq())
            .arg(epoch_nonce());
        cmd
    }

    pub(super) fn high_water(&self) -> Fence {
        *crate::lock::lock(&self.inner.high_water)
    }

    /// Raises the high-water mark to a state a reply showed. Epochs only grow (the scripts
    /// make each new one later than any the caller has seen), so states are ordered by
    /// epoch, then sequence, and a late reply never lowers the mark.
    pub(crate) fn saw(&self, fence: Fence) {
        let mut high = crate::lock::lock(&self.inner.high_water);
        if (fence.epoch(), fence.seq()) > (high.epoch(), high.seq()) {
            *high = fence;
        }
    }

    /// The purge, with the epoch it was made in (for a near tier).
    #[cfg_attr(not(feature = "memory"), allow(dead_code))]
    pub(crate) async fn purge_fence(&self) -> Result<Fence, StoreError> {
        self.write_records(None).await
    }

    /// Runs the clear script: clears `tags`, or purges when `None`.
    pub(super) async fn write_records(&self, tags: Option<&[String]>) -> Result<Fence, StoreError> {
        let high = self.high_water();
        let mut invocation = CLEAR.prepare_invoke();
        invocation
            .key(&self.inner.records_key)
            .arg(high.epoch())
            .arg(high.seq())
            .arg(&self.inner.channel)
            .arg(self.inner.max_clear_records);
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
        invocation.arg(epoch_nonce());
        let (epoch, seq): (u64, u64) = self
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        let fence = Fence::new(epoch, seq);
        self.saw(fence);
        Ok(fence)
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
