//! The namespace's clear records, mirrored on this side of the connection.
//!
//! Every lookup needs them (an entry is served only if none of its tags was cleared after
//! its fence, in the records' epoch, above their floor; and a miss's fill carries the
//! current fence), but reading them with the entry would turn a `GET` into a script call
//! whose reply costs the client about as much again as the rest of a hit. So the data
//! connection speaks RESP3 and asks the server to announce changes to the record set
//! (`CLIENT TRACKING ON BCAST PREFIX ...`): a clear, a purge, and equally its eviction,
//! expiry or a `FLUSHALL`. The server queues an announcement on this connection before the
//! reply to any command it reads after the change has been answered (broadcast
//! announcements go out before the event loop writes its next replies; a command read in
//! the same pass as the change may be answered first, but no request that starts after a
//! clear's response can be in that pass), and the client reads replies in order: a mirror
//! read once stays current for every reply that arrives while no announcement has.
//! A lookup therefore takes the known fence, sends a plain `GET`, and checks the entry
//! against the mirror only if nothing was announced by the time its reply is in; otherwise
//! (or before the first read, or when the server refused tracking) it sends the `GET` with
//! the sync script, which answers what changed since the mirror's state, and merges that.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bb8_redis::bb8;
use bb8_redis::redis::{
    self, aio::MultiplexedConnection, AsyncConnectionConfig, PushInfo, RedisError,
};
use bytes::Bytes;

use crate::store::records::{Records, Shared};
use crate::store::Fence;

/// Milliseconds on a monotonic clock (a wall clock stepping back must not make a silent
/// connection look recently heard), from 1; the request's pinned instant inside
/// `Cache::call` (see `clock`).
pub(super) use crate::clock::monotonic_ms;

/// What this connection knows of the record set, and whether it still holds.
pub(super) struct Tracker {
    /// Announcements heard, shifted left once; the low bit says the mirror is current.
    state: AtomicU64,
    /// The server agreed to announce changes on this connection.
    enabled: AtomicBool,
    /// The record set as last read (epoch 0 before the first read).
    mirror: Shared,
    /// When the server last answered on this connection (ms on a monotonic clock, see
    /// `monotonic_ms`): a connection gone silent (half-open) may be missing announcements.
    heard_ms: AtomicU64,
}

/// The fence as a lookup read it, before sending its `GET`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Known {
    state: u64,
    pub(super) fence: Fence,
}

/// A sync script's answer.
#[derive(Debug, Default)]
pub(super) struct Synced {
    pub(super) epoch: u64,
    /// The whole set (else only what changed since the state the read named).
    pub(super) whole: bool,
    pub(super) seq: Option<u64>,
    pub(super) floor: Option<u64>,
    pub(super) records: Vec<(u64, u64)>,
}

impl Tracker {
    pub(super) fn new(max_records: usize) -> Self {
        Tracker {
            state: AtomicU64::new(0),
            enabled: AtomicBool::new(false),
            mirror: Shared::new(Records::new(0, max_records)),
            heard_ms: AtomicU64::new(0),
        }
    }

    /// The server answered on this connection just now.
    pub(super) fn heard(&self) {
        self.heard_ms.store(monotonic_ms(), Ordering::Relaxed);
    }

    /// Whether the server answered on this connection within `within_ms`.
    #[cfg_attr(not(feature = "memory"), allow(dead_code))]
    pub(super) fn heard_within(&self, within_ms: u64) -> bool {
        let heard = self.heard_ms.load(Ordering::Relaxed);
        heard != 0 && monotonic_ms().saturating_sub(heard) <= within_ms
    }

    /// Whether an entry stamped `fence` with tags `ids` is current by the mirror.
    #[cfg_attr(not(feature = "memory"), allow(dead_code))]
    pub(super) fn is_current(&self, fence: Fence, ids: &[u64]) -> bool {
        self.mirror.is_current(fence, ids.iter().copied())
    }

    /// Whether the mirror holds no clear after `fence` at all (told without its lock;
    /// `false` says nothing).
    #[cfg_attr(not(feature = "memory"), allow(dead_code))]
    pub(super) fn surely_current(&self, fence: Fence) -> bool {
        self.mirror.surely_current(fence)
    }

    /// The fence, if the mirror is known to be current.
    pub(super) fn known(&self) -> Option<Known> {
        let state = self.state.load(Ordering::Acquire);
        if state & 1 == 0 {
            return None;
        }
        Some(Known {
            state,
            fence: self.mirror.fence(),
        })
    }

    /// Whether `known` still held when a reply that has since arrived was produced: no
    /// announcement was read before it.
    pub(super) fn still(&self, known: &Known) -> bool {
        self.state.load(Ordering::Acquire) == known.state
    }

    /// Taken before sending a command that reads the records.
    pub(super) fn mark(&self) -> u64 {
        self.state.load(Ordering::Acquire) >> 1
    }

    /// The state the mirror holds (current or not): what a sync asks the changes since.
    pub(super) fn synced(&self) -> Fence {
        self.mirror.fence()
    }

    /// The entry in a stored value, if its stamp is current by the mirror.
    pub(super) fn check(&self, value: Bytes) -> Option<Bytes> {
        self.mirror.check(value)
    }

    /// Whether a fill would be dead on arrival by what the mirror knows (`false` while the
    /// mirror has never been read: the read-side check decides then).
    pub(super) fn refuses(&self, fence: Fence, ids: &[u64]) -> bool {
        let mirror = self.mirror.read();
        mirror.epoch() != 0 && !mirror.is_current(fence, ids.iter().copied())
    }

    /// Merges what a sync sent after `mark`, asking for the changes since `from`, read.
    /// Returns the fence as of that read, or `None` when the answer cannot be used: it is of
    /// an older epoch than the mirror's (epochs only grow: an older answer must not undo a
    /// newer one), or a list of changes against another epoch. Re-arms the mirror if nothing
    /// was announced since `mark`.
    pub(super) fn merge(&self, mark: u64, from: Fence, synced: Synced) -> Option<Fence> {
        let fence = self.mirror.write(|mirror| {
            if synced.epoch < mirror.epoch() {
                return None;
            }
            if synced.epoch > mirror.epoch() {
                if !synced.whole {
                    return None;
                }
                mirror.reset(synced.epoch);
            } else if !synced.whole && from.epoch() != synced.epoch {
                return None; // changes since a state of another epoch say nothing
            }
            for (id, seq) in synced.records {
                mirror.record(id, seq);
            }
            if let Some(floor) = synced.floor {
                mirror.raise_floor(floor);
            }
            // Absent from a list of changes: not changed since `from`.
            let seq = synced.seq.unwrap_or(from.seq());
            mirror.observe(seq);
            Some(Fence::new(synced.epoch, seq))
        })?;
        self.heard();
        // Armed only once the merged records are published (lock-free readers check the
        // state first, then the records). Fails if an announcement came in since `mark`:
        // then the mirror is not trusted.
        if self.enabled.load(Ordering::Acquire) {
            let _ = self.state.compare_exchange(
                mark << 1,
                (mark << 1) | 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        Some(fence)
    }

    /// A change was announced (or the connection broke, or this store cleared on another
    /// connection): the mirror is not current until read again.
    pub(super) fn forget(&self) {
        let _ = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                Some(((s >> 1) + 1) << 1)
            });
    }
}

/// A data connection and what it knows of the records.
#[derive(Clone)]
pub(super) struct Tracked {
    pub(super) conn: MultiplexedConnection,
    pub(super) tracker: Arc<Tracker>,
}

/// Opens data connections for the pool: RESP3 with change announcements for the records
/// when tracking is wanted and the server speaks RESP3, plain RESP2 otherwise.
#[derive(Clone)]
pub(super) struct Manager {
    resp2: redis::Client,
    /// The RESP3 client and the `CLIENT TRACKING` prefix (the record set's key), when
    /// tracking is wanted.
    tracking: Option<(redis::Client, String)>,
    max_records: usize,
    /// The server (or a proxy) refused `HELLO 3`: later connections go straight to RESP2.
    resp3_refused: Arc<AtomicBool>,
    response_timeout: Duration,
    display_url: String,
}

impl Manager {
    pub(super) fn new(
        info: redis::ConnectionInfo,
        prefix: Option<String>,
        max_records: usize,
        response_timeout: Duration,
        display_url: String,
    ) -> Result<Self, RedisError> {
        let tracking = match prefix {
            Some(prefix) => {
                let settings = info
                    .redis_settings()
                    .clone()
                    .set_protocol(redis::ProtocolVersion::RESP3);
                let resp3 = redis::Client::open(info.clone().set_redis_settings(settings))?;
                Some((resp3, prefix))
            }
            None => None,
        };
        Ok(Manager {
            resp2: redis::Client::open(info)?,
            tracking,
            resp3_refused: Arc::new(AtomicBool::new(false)),
            max_records,
            response_timeout,
            display_url,
        })
    }

    /// A RESP3 connection with the records tracked, `None` when the server refuses RESP3.
    async fn connect_tracked(
        &self,
        resp3: &redis::Client,
        prefix: &str,
    ) -> Result<Option<Tracked>, RedisError> {
        let tracker = Arc::new(Tracker::new(self.max_records));
        let heard = tracker.clone();
        // Runs in the connection's reader, before any reply read after it is handed out.
        let config = self.config().set_push_sender(move |_: PushInfo| {
            heard.forget();
            Ok::<(), Infallible>(())
        });
        let mut conn = match resp3
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(c) => c,
            // A server older than RESP3, a proxy, or an ACL without `hello`.
            Err(e) if e.to_string().to_ascii_lowercase().contains("hello") => {
                tracing::warn!(
                    error = %e,
                    url = %self.display_url,
                    "the server refused RESP3 (HELLO 3); using RESP2, every lookup reads the records"
                );
                self.resp3_refused.store(true, Ordering::Relaxed);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let on = redis::cmd("CLIENT")
            .arg("TRACKING")
            .arg("ON")
            .arg("BCAST")
            .arg("PREFIX")
            .arg(prefix)
            .query_async::<()>(&mut conn)
            .await;
        match on {
            Ok(()) => tracker.enabled.store(true, Ordering::Release),
            // Still correct, one array reply per lookup dearer.
            Err(e) => tracing::warn!(
                error = %e,
                url = %self.display_url,
                "the server refused CLIENT TRACKING; every lookup reads the records"
            ),
        }
        Ok(Some(Tracked { conn, tracker }))
    }

    fn config(&self) -> AsyncConnectionConfig {
        // redis-rs bounds every command on the connection (500 ms by default): use ours, so
        // the hot path runs under a single timer.
        AsyncConnectionConfig::new().set_response_timeout(Some(self.response_timeout))
    }
}

impl bb8::ManageConnection for Manager {
    type Connection = Tracked;
    type Error = RedisError;

    async fn connect(&self) -> Result<Tracked, RedisError> {
        if let Some((resp3, prefix)) = &self.tracking {
            if !self.resp3_refused.load(Ordering::Relaxed) {
                if let Some(tracked) = self.connect_tracked(resp3, prefix).await? {
                    return Ok(tracked);
                }
            }
        }
        let conn = self
            .resp2
            .get_multiplexed_async_connection_with_config(&self.config())
            .await?;
        // Never enabled: every lookup reads the records.
        Ok(Tracked {
            conn,
            tracker: Arc::new(Tracker::new(self.max_records)),
        })
    }

    async fn is_valid(&self, tracked: &mut Tracked) -> Result<(), RedisError> {
        redis::cmd("PING")
            .query_async::<()>(&mut tracked.conn)
            .await
    }

    fn has_broken(&self, _: &mut Tracked) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled() -> Tracker {
        let t = Tracker::new(100);
        t.enabled.store(true, Ordering::Release);
        t
    }

    fn whole(epoch: u64, seq: u64) -> Synced {
        Synced {
            epoch,
            whole: true,
            seq: Some(seq),
            floor: Some(0),
            records: vec![],
        }
    }

    #[test]
    fn unknown_until_armed_and_forgotten_on_announcement() {
        let t = enabled();
        assert!(t.known().is_none());
        let (mark, from) = (t.mark(), t.synced());
        assert_eq!(t.merge(mark, from, whole(5, 7)), Some(Fence::new(5, 7)));
        let k = t.known().expect("armed");
        assert_eq!(k.fence, Fence::new(5, 7));
        assert!(t.still(&k));
        t.forget();
        assert!(
            !t.still(&k),
            "an announcement invalidates what a lookup read"
        );
        assert!(t.known().is_none());
    }

    #[test]
    fn a_read_overtaken_by_an_announcement_does_not_arm() {
        let t = enabled();
        let (mark, from) = (t.mark(), t.synced());
        t.forget(); // heard before the read's reply was used
                    // Merged (a newer epoch than the mirror's), but not armed.
        assert_eq!(t.merge(mark, from, whole(4, 7)), Some(Fence::new(4, 7)));
        assert!(t.known().is_none());
        // An older epoch's answer, arriving late: unusable, and the mirror keeps its state.
        let (mark, from) = (t.mark(), t.synced());
        assert_eq!(t.merge(mark, from, whole(3, 9)), None);
        assert_eq!(t.synced(), Fence::new(4, 7));
        // A newer epoch's answer is taken even when changes were announced meanwhile: an
        // instance under steady clears still moves to a new epoch.
        let (mark, from) = (t.mark(), t.synced());
        t.forget();
        assert_eq!(t.merge(mark, from, whole(5, 7)), Some(Fence::new(5, 7)));
        assert!(t.known().is_none());
        let (mark, from) = (t.mark(), t.synced());
        assert!(t.merge(mark, from, whole(5, 8)).is_some());
        assert_eq!(t.known().map(|k| k.fence), Some(Fence::new(5, 8)));
        // Same epoch, announced since: merged (nothing moves back) but not armed.
        let (mark, from) = (t.mark(), t.synced());
        t.forget();
        let changes = Synced {
            epoch: 5,
            seq: Some(9),
            records: vec![(1, 9)],
            ..Synced::default()
        };
        assert_eq!(t.merge(mark, from, changes), Some(Fence::new(5, 9)));
        assert!(t.known().is_none());
        assert!(t.refuses(Fence::new(5, 8), &[1]));
        assert!(!t.refuses(Fence::new(5, 9), &[1]));
    }

    #[test]
    fn changes_against_another_epoch_are_refused() {
        let t = enabled();
        let (mark, from) = (t.mark(), t.synced());
        t.merge(mark, from, whole(5, 3));
        let stale = Synced {
            epoch: 6,
            seq: Some(1),
            ..Synced::default()
        };
        assert_eq!(t.merge(t.mark(), t.synced(), stale), None);
    }

    #[test]
    fn never_armed_without_tracking() {
        let t = Tracker::new(100);
        let (mark, from) = (t.mark(), t.synced());
        assert!(t.merge(mark, from, whole(5, 7)).is_some());
        assert!(t.known().is_none());
    }
}
