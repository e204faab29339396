//! The invalidation sequence and the purge record, kept on this side of the connection.
//!
//! Every lookup needs both (the sequence fences a miss's fill; the purge record tells a
//! dead entry from a live one), but reading them with the entry turns a `GET` into an
//! `MGET`, whose array reply costs the client about as much again as the rest of a hit. So
//! the data connection speaks RESP3 and asks the server to announce changes to those two
//! keys (`CLIENT TRACKING ON BCAST PREFIX ...`). The server queues an announcement on this
//! connection before the reply to any command it runs after the change, and the client
//! reads replies in order: a value read once stays current for every reply that arrives
//! while no announcement has. A lookup therefore reads the known values, sends a plain
//! `GET`, and uses them only if nothing was announced by the time its reply is in; otherwise
//! (or before the first read, or when the server refused tracking) it reads all three with
//! `MGET` as before, which also re-arms the known values.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bb8_redis::bb8;
use bb8_redis::redis::{
    self, aio::MultiplexedConnection, AsyncConnectionConfig, IntoConnectionInfo, PushInfo,
    RedisError,
};

/// What this connection knows of the two records, and whether it still holds.
pub(super) struct Tracker {
    /// Announcements heard, shifted left once; the low bit says `seq` and `purged` are
    /// current.
    state: AtomicU64,
    seq: AtomicU64,
    purged: AtomicU64,
    /// The server agreed to announce changes on this connection.
    enabled: AtomicBool,
    /// Serializes re-arming (rare: after a change), never taken by a hit.
    arming: Mutex<()>,
}

/// The records as a lookup read them, before sending its `GET`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Known {
    state: u64,
    pub(super) seq: u64,
    pub(super) purged: u64,
}

impl Tracker {
    fn new() -> Self {
        Tracker {
            state: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            purged: AtomicU64::new(0),
            enabled: AtomicBool::new(false),
            arming: Mutex::new(()),
        }
    }

    /// The records, if they are known to be current.
    pub(super) fn known(&self) -> Option<Known> {
        let state = self.state.load(Ordering::Acquire);
        if state & 1 == 0 {
            return None;
        }
        Some(Known {
            state,
            seq: self.seq.load(Ordering::Acquire),
            purged: self.purged.load(Ordering::Acquire),
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

    /// Records read by a command sent after `mark`: kept if no change was announced since
    /// (one that was would have been read before the reply).
    pub(super) fn arm(&self, mark: u64, seq: u64, purged: u64) {
        if !self.enabled.load(Ordering::Acquire) {
            return;
        }
        let _one_at_a_time = self.arming.lock().unwrap_or_else(|e| e.into_inner());
        let state = self.state.load(Ordering::Acquire);
        // Armed already (by a read that saw the same values), or announced since.
        if state & 1 == 1 || state >> 1 != mark {
            return;
        }
        self.seq.store(seq, Ordering::Release);
        self.purged.store(purged, Ordering::Release);
        // Fails if an announcement came in meanwhile: then the values stay unused.
        let _ = self.state.compare_exchange(
            mark << 1,
            (mark << 1) | 1,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// A change was announced (or the connection broke): the values are unknown until
    /// read again.
    fn forget(&self) {
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
    /// The RESP3 client and the `CLIENT TRACKING` prefixes (the sequence's key and the purge
    /// record's), when tracking is wanted.
    tracking: Option<(redis::Client, [String; 2])>,
    /// The server (or a proxy) refused `HELLO 3`: later connections go straight to RESP2.
    resp3_refused: Arc<AtomicBool>,
    response_timeout: Duration,
    display_url: String,
}

impl Manager {
    pub(super) fn new(
        url: &str,
        prefixes: Option<[String; 2]>,
        response_timeout: Duration,
        display_url: String,
    ) -> Result<Self, RedisError> {
        let info = url.into_connection_info()?;
        let tracking = match prefixes {
            Some(prefixes) => {
                let settings = info
                    .redis_settings()
                    .clone()
                    .set_protocol(redis::ProtocolVersion::RESP3);
                let resp3 = redis::Client::open(info.clone().set_redis_settings(settings))?;
                Some((resp3, prefixes))
            }
            None => None,
        };
        Ok(Manager {
            resp2: redis::Client::open(info)?,
            tracking,
            resp3_refused: Arc::new(AtomicBool::new(false)),
            response_timeout,
            display_url,
        })
    }

    /// A RESP3 connection with the records tracked, `None` when the server refuses RESP3.
    async fn connect_tracked(
        &self,
        resp3: &redis::Client,
        [seq, purged]: &[String; 2],
    ) -> Result<Option<Tracked>, RedisError> {
        let tracker = Arc::new(Tracker::new());
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
            .arg(seq)
            .arg("PREFIX")
            .arg(purged)
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
        if let Some((resp3, prefixes)) = &self.tracking {
            if !self.resp3_refused.load(Ordering::Relaxed) {
                if let Some(tracked) = self.connect_tracked(resp3, prefixes).await? {
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
            tracker: Arc::new(Tracker::new()),
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
        let t = Tracker::new();
        t.enabled.store(true, Ordering::Release);
        t
    }

    #[test]
    fn unknown_until_armed_and_forgotten_on_announcement() {
        let t = enabled();
        assert!(t.known().is_none());
        let mark = t.mark();
        t.arm(mark, 7, 3);
        let k = t.known().expect("armed");
        assert_eq!((k.seq, k.purged), (7, 3));
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
        let mark = t.mark();
        t.forget(); // heard before the read's reply was used
        t.arm(mark, 7, 3);
        assert!(t.known().is_none());
        let mark = t.mark();
        t.arm(mark, 8, 3);
        assert_eq!(t.known().map(|k| k.seq), Some(8));
    }

    #[test]
    fn never_armed_without_tracking() {
        let t = Tracker::new();
        t.arm(t.mark(), 7, 3);
        assert!(t.known().is_none());
    }
}
