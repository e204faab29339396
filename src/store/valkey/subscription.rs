//! The pub/sub connection that hears every instance's clears (for near caches).

use std::sync::Arc;
use std::time::Duration;

use bb8_redis::redis::RedisError;
use futures_util::StreamExt;
use tokio::sync::broadcast;

use super::{ValkeyInner, ValkeyStore};
use crate::store::Notice;

impl ValkeyStore {
    /// Announcements of every clear in this namespace, from any instance. The first call
    /// opens a dedicated pub/sub connection, shared by all subscribers, that re-subscribes by
    /// itself after the server comes back. It sends [`Notice::Subscribed`] each time it is
    /// subscribed and [`Notice::Lost`] when it breaks: clears published in between were
    /// missed (pub/sub is at-most-once), so whoever keeps local copies must stop serving them
    /// at `Lost` and drop them at `Subscribed`. The connection closes when the last subscriber
    /// is dropped.
    ///
    /// Must be called inside a Tokio runtime.
    pub fn subscribe(&self) -> broadcast::Receiver<Notice> {
        let mut slot = crate::lock::lock(&self.inner.notices);
        if let Some(tx) = slot.as_ref().filter(|tx| tx.receiver_count() > 0) {
            return tx.subscribe();
        }
        let (tx, rx) = broadcast::channel(1024);
        *slot = Some(tx.clone());
        tokio::spawn(run_subscription(self.inner.clone(), tx));
        rx
    }
}

/// Keeps one pub/sub connection subscribed and forwards what it hears, until nobody listens.
async fn run_subscription(inner: Arc<ValkeyInner>, tx: broadcast::Sender<Notice>) {
    const PING_EVERY: Duration = Duration::from_secs(2);
    let mut backoff = Duration::from_millis(50);
    let mut first = true;
    let store = ValkeyStore {
        inner: inner.clone(),
    };
    let mut attempt = 0usize;
    while tx.receiver_count() > 0 {
        // On a cluster a clear published on any node reaches subscribers on every node:
        // after a failure, the next node is tried (the one the URL names may be the dead one).
        let client = store.pubsub_client(attempt);
        attempt = attempt.wrapping_add(1);
        let connected = tokio::time::timeout(inner.connect_timeout, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&inner.channel).await?;
            Ok::<_, RedisError>(pubsub)
        })
        .await;
        let pubsub = match connected {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cache invalidation subscription failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        if !first {
            tracing::info!("cache invalidation subscription re-established");
        }
        first = false;
        let _ = tx.send(Notice::Subscribed);
        let (mut sink, mut stream) = pubsub.split();
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            tokio::select! {
                msg = stream.next() => {
                    let Some(msg) = msg else { break };
                    let Ok(text) = msg.get_payload::<String>() else { continue };
                    match Notice::parse(&text) {
                        Some(n) => { let _ = tx.send(n); }
                        None => tracing::warn!("ignoring an unreadable invalidation message"),
                    }
                }
                _ = ping.tick() => {
                    if tx.receiver_count() == 0 {
                        return;
                    }
                    // A half-open connection hears nothing: a ping that goes unanswered ends it.
                    let pong = tokio::time::timeout(inner.connect_timeout, sink.ping::<()>()).await;
                    if !matches!(pong, Ok(Ok(()))) {
                        break;
                    }
                }
            }
        }
        // Anything published until we are back is missed.
        let _ = tx.send(Notice::Lost);
        tracing::warn!("cache invalidation subscription lost; reconnecting");
    }
}
