//! What a near tier (`TieredStore`) may rely on: the clear records as a tracked connection
//! knows them, while it knows them to be current.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::topology::{CLUSTER, SINGLE};
use super::tracking::{Known, Tracker};
use super::ValkeyStore;
use crate::key::EntryKey;
use crate::store::Fence;

/// Near hits need the connection to have answered this recently: a connection gone
/// half-open hears no announcements, and the keeper's once-a-second read (bounded by the
/// operation timeout) replaces it well within this.
const HEARD_WITHIN_MS: u64 = 1_500;

/// The records of the connection serving a key, current when taken: no announcement of a
/// change had arrived since they were read.
pub(crate) struct Vouch {
    tracker: Arc<Tracker>,
    known: Known,
}

impl Vouch {
    /// The state the records were in.
    pub(crate) fn fence(&self) -> Fence {
        self.known.fence
    }

    /// Whether an entry stamped `fence` with tag ids `ids` may be served: current by the
    /// records, and still no announcement since they were taken.
    pub(crate) fn vouches(&self, fence: Fence, ids: &[u64]) -> bool {
        self.tracker.is_current(fence, ids) && self.tracker.still(&self.known)
    }

    /// [`vouches`](Self::vouches) when it can be told without a lock (no clear after
    /// `fence` at all); `false` says nothing. For callers holding a lock of their own.
    pub(crate) fn vouches_at_once(&self, fence: Fence) -> bool {
        self.tracker.surely_current(fence) && self.tracker.still(&self.known)
    }

    /// Whether the records are still as they were taken (no announcement since).
    pub(crate) fn holds(&self) -> bool {
        self.tracker.still(&self.known)
    }
}

impl ValkeyStore {
    /// The current records of the connection serving `key`; `None` when that connection
    /// does not track them (RESP2, tracking refused or off), has heard of a change it has
    /// not read yet, has gone quiet, or is not open.
    pub(crate) fn vouch(&self, key: &EntryKey) -> Option<Vouch> {
        let tracker = match self.inner.mode.load(Ordering::Acquire) {
            SINGLE => self.inner.seed.tracker()?,
            CLUSTER => {
                let map = self.map()?;
                let node = map.node(super::entry_slot(key))?;
                node.home?;
                node.tracker()?
            }
            _ => return None,
        };
        if !tracker.heard_within(HEARD_WITHIN_MS) {
            return None;
        }
        let known = tracker.known()?;
        Some(Vouch { tracker, known })
    }

    /// Forgets what every connection knows of the records, until read again: after a clear
    /// this store made on a connection of its own (`wait_for_replicas`), whose announcement
    /// may reach the shared connections after the clear's answer.
    pub(crate) fn forget_records(&self) {
        let mut nodes = vec![self.inner.seed.clone()];
        if let Some(map) = self.map() {
            nodes.extend(map.nodes.iter().cloned());
        }
        for node in nodes {
            if let Some(t) = node.tracker() {
                t.forget();
            }
        }
    }
}
