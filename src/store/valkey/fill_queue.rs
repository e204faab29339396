//! The fill writer: fills queue up, bounded by count and bytes, and are sent as pipelined
//! `SET ... PX` commands by one writer task, a few batches in flight. A fill is one plain
//! `SET`: whether the entry may be served is decided when it is read (see `records`), so
//! the write need not be atomic with anything.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use bb8_redis::redis::{self, RedisError};
use tokio::sync::{mpsc, oneshot};

use super::keys::StampedValue;
use super::{Node, ValkeyInner, ValkeyStore};
use crate::error::StoreError;
use crate::store::records::tag_id;
use crate::store::{Fill, FillDone, FillOutcome};

/// Most fills, and most bytes of entries, waiting for the writer: beyond either, new fills
/// are dropped (a stalled store must not hold the app's memory hostage).
const FILL_QUEUE: usize = 4096;
const FILL_QUEUE_BYTES: usize = 64 << 20;
/// Bounds on one batch (one pipeline): entries, and bytes of encoded entries.
const FILL_BATCH: usize = 16;
const FILL_BATCH_BYTES: usize = 4 << 20;
/// Batches in flight at once: they pipeline on the connection, so a round trip is not
/// paid per batch; when all are out, waiting fills gather into bigger batches.
const FILL_IN_FLIGHT: usize = 4;
/// The longest an entry is kept: 2^31 seconds (RFC 9111 §1.2.2), in milliseconds. A longer
/// `PX` would be refused by the server.
const MAX_TTL_MS: u64 = (1 << 31) * 1000;

/// A fill and who waits for its outcome.
pub(super) struct PendingFill {
    fill: Fill,
    done: Reply,
}

/// Where a fill's outcome goes: a waiting `fill` call, or a background fill's callback.
pub(super) enum Reply {
    Waiting(oneshot::Sender<Result<FillOutcome, StoreError>>),
    Call(FillDone),
}

impl Reply {
    fn send(self, outcome: Result<FillOutcome, StoreError>) {
        match self {
            Reply::Waiting(tx) => {
                let _ = tx.send(outcome);
            }
            // The writer task runs every batch's callbacks: one that panics must not take
            // the other batches in flight, and the fills queued behind them, down with it.
            Reply::Call(done) => {
                let call = std::panic::AssertUnwindSafe(move || done(outcome));
                if std::panic::catch_unwind(call).is_err() {
                    tracing::error!("a fill's completion callback panicked");
                }
            }
        }
    }
}

/// Writes queued fills, as many as are waiting (up to a batch) in one pipeline, a few
/// batches at a time: under load, the fills of concurrent misses share one write and one
/// round trip; alone, a fill is sent at once. The batches in flight are driven by this task
/// itself (no task per batch). Ends when the store is dropped, once its batches are done.
async fn write_fills(inner: Weak<ValkeyInner>, mut queue: mpsc::Receiver<PendingFill>) {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let mut in_flight = FuturesUnordered::new();
    loop {
        let next = std::future::poll_fn(|cx| {
            // Batches that finished free their room; a wake from one polls them all.
            while let std::task::Poll::Ready(Some(())) = in_flight.poll_next_unpin(cx) {}
            if in_flight.len() < FILL_IN_FLIGHT {
                queue.poll_recv(cx)
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
        let Some(first) = next else { break };
        let Some(inner) = inner.upgrade() else { break };
        let mut bytes = first.fill.value.len();
        let (mut fills, mut replies) = (Vec::with_capacity(4), Vec::with_capacity(4));
        fills.push(first.fill);
        replies.push(first.done);
        while fills.len() < FILL_BATCH && bytes < FILL_BATCH_BYTES {
            match queue.try_recv() {
                Ok(next) => {
                    bytes += next.fill.value.len();
                    fills.push(next.fill);
                    replies.push(next.done);
                }
                Err(_) => break,
            }
        }
        inner.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        let batch = async move {
            let store = ValkeyStore { inner };
            match store.fill_batch(&fills).await {
                Ok(outcomes) => {
                    for (reply, outcome) in replies.into_iter().zip(outcomes) {
                        reply.send(outcome);
                    }
                }
                Err(e) => {
                    for reply in replies {
                        reply.send(Err(e.replicate()));
                    }
                }
            }
        };
        // A batch that panics (in the store or the client below) loses its own fills only:
        // its waiting callers hear that their sender went, the writer goes on.
        in_flight.push(async move {
            use futures_util::FutureExt;
            if std::panic::AssertUnwindSafe(batch)
                .catch_unwind()
                .await
                .is_err()
            {
                tracing::error!("writing a batch of fills panicked; its fills are dropped");
            }
        });
    }
    while in_flight.next().await.is_some() {}
}

impl ValkeyStore {
    /// Hands a fill to the writer (started on first use, and again if the runtime it ran on
    /// has gone); `reply` hears the outcome. When the queue is full the store is far behind,
    /// and the fill is shed at once rather than queued without bound.
    pub(super) fn enqueue(&self, fill: Fill, reply: Reply) {
        if fill.ttl.as_millis() == 0 {
            return reply.send(Ok(FillOutcome::Stored)); // nothing to keep
        }
        let sent = {
            let mut slot = crate::lock::lock(&self.inner.fills);
            let queue = match slot.take().filter(|q| !q.is_closed()) {
                Some(q) => slot.insert(q),
                None => match tokio::runtime::Handle::try_current() {
                    Ok(runtime) => {
                        // A writer that ended took its queue with it.
                        self.inner.queued_bytes.store(0, Ordering::Relaxed);
                        let (tx, rx) = mpsc::channel(FILL_QUEUE);
                        runtime.spawn(write_fills(Arc::downgrade(&self.inner), rx));
                        slot.insert(tx)
                    }
                    Err(_) => {
                        let no_runtime = "no Tokio runtime to write fills from".into();
                        return reply.send(Err(StoreError::Unavailable(no_runtime)));
                    }
                },
            };
            let len = fill.value.len();
            let queued = self.inner.queued_bytes.fetch_add(len, Ordering::Relaxed);
            if queued + len > FILL_QUEUE_BYTES {
                self.inner.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                return reply.send(Ok(FillOutcome::Dropped));
            }
            queue
                .try_send(PendingFill { fill, done: reply })
                .inspect_err(|_| {
                    self.inner.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                })
        };
        match sent {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(p)) => p.done.send(Ok(FillOutcome::Dropped)),
            Err(mpsc::error::TrySendError::Closed(p)) => p.done.send(Err(StoreError::Timeout)),
        }
    }

    /// Writes a batch as one pipeline of `SET`s (one per node, on a cluster); one outcome
    /// per fill.
    async fn fill_batch(
        &self,
        batch: &[Fill],
    ) -> Result<Vec<Result<FillOutcome, StoreError>>, StoreError> {
        let Some(map) = self.topology().await? else {
            let all: Vec<usize> = (0..batch.len()).collect();
            return self.fill_on(&self.inner.seed, batch, &all).await;
        };
        let mut outcomes: Vec<Option<Result<FillOutcome, StoreError>>> =
            (0..batch.len()).map(|_| None).collect();
        let slots = batch
            .iter()
            .enumerate()
            .map(|(i, f)| (i, super::entry_slot(&f.key)));
        let (groups, unserved) = map.group(slots);
        for i in unserved {
            outcomes[i] = Some(Ok(FillOutcome::Dropped));
        }
        let written = groups
            .iter()
            .map(|(node, group)| self.fill_on(node, batch, group));
        let written = futures_util::future::join_all(written).await;
        for ((_, group), result) in groups.iter().zip(written) {
            match result {
                Ok(done) => {
                    for (&i, outcome) in group.iter().zip(done) {
                        outcomes[i] = Some(outcome);
                    }
                }
                Err(e) => {
                    for &i in group {
                        outcomes[i] = Some(Err(e.replicate()));
                    }
                }
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Ok(FillOutcome::Dropped)))
            .collect())
    }

    /// Writes the fills `which` of `batch` to `node` as one pipeline of `SET`s; one outcome
    /// per fill written. Fills the node's mirror already knows to be dead are not sent
    /// (`Fenced`); a server out of memory refuses a fill without failing the store
    /// (`Dropped`), and so does a cluster node that no longer serves the key's slot.
    async fn fill_on(
        &self,
        node: &Node,
        batch: &[Fill],
        which: &[usize],
    ) -> Result<Vec<Result<FillOutcome, StoreError>>, StoreError> {
        let mirror = node.cached().map(|t| t.tracker);
        let ids: Vec<Vec<u64>> = which
            .iter()
            .map(|&i| batch[i].tags.iter().map(|t| tag_id(t)).collect())
            .collect();
        let mut outcomes: Vec<Option<Result<FillOutcome, StoreError>>> = which
            .iter()
            .zip(&ids)
            .map(|(&i, ids)| {
                let fill = &batch[i];
                if ids.len() > usize::from(u16::MAX) {
                    let many = "a fill with more than 65,535 tags cannot be stored";
                    return Some(Err(StoreError::Server(many.into())));
                }
                // Epoch 0 is no epoch's: its lookup could not read the records.
                let dead = fill.fence.epoch() == 0
                    || mirror.as_ref().is_some_and(|m| m.refuses(fill.fence, ids));
                dead.then_some(Ok(FillOutcome::Fenced))
            })
            .collect();
        let sent: Vec<usize> = (0..which.len())
            .filter(|&j| outcomes[j].is_none())
            .collect();
        if sent.is_empty() {
            return Ok(outcomes.into_iter().flatten().collect());
        }
        let mut pipe = redis::Pipeline::with_capacity(sent.len());
        for &j in &sent {
            let fill = &batch[which[j]];
            let ttl_ms = crate::entry::millis(fill.ttl).clamp(1, MAX_TTL_MS);
            // Sized for its arguments at once: the entry is copied in once, never regrown.
            let key_len = self.inner.entry_prefix.len() + fill.key.route().len() + 80;
            let size = 16 + key_len + 8 * ids[j].len() + 32 + fill.value.len();
            let mut cmd = redis::Cmd::with_capacity(5, size);
            cmd.arg("SET")
                .arg(self.entry_key(&fill.key))
                .arg(StampedValue {
                    fence: fill.fence,
                    ids: &ids[j],
                    entry: &fill.value,
                })
                .arg("PX")
                .arg(ttl_ms);
            pipe.add_command(cmd);
        }
        let count = sent.len();
        let replies = self
            .run_on(node, |t| async move {
                use redis::aio::ConnectionLike;
                let mut c = t.conn;
                c.req_packed_commands(&pipe, 0, count).await
            })
            .await?;
        if replies.len() != sent.len() {
            return Err(StoreError::Server(
                format!("{} replies to {} fills", replies.len(), sent.len()).into(),
            ));
        }
        let mut redirected = false;
        for (&j, reply) in sent.iter().zip(replies) {
            outcomes[j] = Some(match reply {
                redis::Value::Okay => Ok(FillOutcome::Stored),
                // `noeviction` with memory full: not a failure of the store.
                redis::Value::ServerError(e) if e.code() == "OOM" => Ok(FillOutcome::Dropped),
                ref r if super::replies::is_redirect_reply(r) => {
                    redirected = true;
                    Ok(FillOutcome::Dropped)
                }
                redis::Value::ServerError(e) => {
                    Err(StoreError::Server(Box::new(RedisError::from(e))))
                }
                other => Err(super::replies::unexpected_reply(other, "SET")),
            });
        }
        if redirected {
            if let Some(map) = self.map() {
                self.refreshed_map(&map).await;
            }
        }
        Ok(outcomes.into_iter().flatten().collect())
    }
}
