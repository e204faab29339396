//! The shared data connection: kept outside the pool for the hot path, replaced from the
//! pool when it breaks, every operation bounded by one timeout. Also what runs once a server
//! is first reached: the eviction-policy report and the record set's keeper.

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{OnceLock, RwLock, Weak};
use std::time::Duration;

use bb8_redis::bb8;
use bb8_redis::redis::{self, aio::MultiplexedConnection, RedisError};

use super::replies::classify;
use super::tracking::{Manager, Tracked};
use super::{ValkeyInner, ValkeyStore};
use crate::error::StoreError;

/// One server: its pool, and the shared connection kept outside the pool for the hot path.
/// A store on one server has one; on a cluster, one per master.
pub(super) struct Node {
    pub(super) host: String,
    pub(super) port: u16,
    /// The copy of the clear records this node holds and its connections track (a cluster's
    /// `cluster::CHUNKS` copies); `Some(0)` on a single server.
    pub(super) home: Option<usize>,
    manager: Manager,
    /// Created on first use: bb8 spawns its reaper task when a pool is built, which needs a
    /// Tokio runtime, and a store may well be built before the runtime starts. The shared
    /// connection comes from `pool`; connections for one caller alone from `own`, so that
    /// they are never the shared one.
    pool: OnceLock<bb8::Pool<Manager>>,
    own: OnceLock<bb8::Pool<Manager>>,
    own_manager: Manager,
    /// The most replicas `ROLE` has shown attached to this master lately, and when that
    /// many were last seen (see `replicas_to_wait`).
    replicas_seen: AtomicI64,
    replicas_seen_at: AtomicU64,
    conn: RwLock<Option<Tracked>>,
    pool_size: u32,
    connect_timeout: Duration,
    /// Failures in a row, and until when (monotonic ms) the node is passed over.
    failures: AtomicU32,
    skip_until_ms: AtomicU64,
    /// How long it is passed over: 1 s, or the operation timeout if longer (a probe must
    /// be able to finish within its pause).
    pause_ms: u64,
    /// Numbers the shared connections: the operations in flight on one connection when it
    /// breaks count as one failure (`failed_conn`, the last one counted), not one each.
    conn_gen: AtomicU64,
    failed_conn: AtomicU64,
}

/// Failures in a row after which a cluster node is passed over.
const NODE_FAILURES: u32 = 3;
/// How long a failed cluster node is passed over, at least, before one operation probes it.
const NODE_PAUSE_MS: u64 = 1_000;

/// Whether an operation may go to a node now.
enum Turn {
    Go,
    /// The first after a pause: it probes the node, and the pause it set ends at `.0`.
    Probe(u64),
    PassOver,
}

/// A probe under way: if it ends without an outcome (its future dropped, as when another
/// node answered a question first or an outer timeout fired), the next operation probes.
struct Probing<'a> {
    node: &'a Node,
    until: u64,
}

impl Drop for Probing<'_> {
    fn drop(&mut self) {
        let now = super::tracking::monotonic_ms();
        let _ = self.node.skip_until_ms.compare_exchange(
            self.until,
            now,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

/// How every node's connections are made.
#[derive(Clone, Debug)]
pub(super) struct NodeSettings {
    /// The records' key prefix the shared connections track (`None`: no tracking).
    pub(super) tracking: Option<String>,
    pub(super) max_records: usize,
    pub(super) operation_timeout: Duration,
    /// How long a clear waits for replicas, if it does.
    pub(super) wait: Option<Duration>,
    pub(super) pool_size: u32,
    pub(super) connect_timeout: Duration,
}

impl Node {
    /// A node at `info`'s address, nothing connected yet.
    pub(super) fn open(
        info: redis::ConnectionInfo,
        settings: &NodeSettings,
        (host, port): (String, u16),
        home: Option<usize>,
        display: String,
    ) -> Result<Node, RedisError> {
        let manager = Manager::new(
            info.clone(),
            settings.tracking.clone(),
            settings.max_records,
            settings.operation_timeout,
            display.clone(),
        )?;
        // A caller's own connections track nothing (nothing reads their mirror), and wait
        // for `WAIT` as long as it may take.
        let own = Manager::new(
            info,
            None,
            settings.max_records,
            settings.operation_timeout + settings.wait.unwrap_or_default(),
            display,
        )?;
        Ok(Node {
            host,
            port,
            home,
            manager,
            own_manager: own,
            pool: OnceLock::new(),
            own: OnceLock::new(),
            conn: RwLock::new(None),
            pool_size: settings.pool_size,
            connect_timeout: settings.connect_timeout,
            replicas_seen: AtomicI64::new(0),
            replicas_seen_at: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            skip_until_ms: AtomicU64::new(0),
            pause_ms: NODE_PAUSE_MS.max(crate::entry::millis(settings.operation_timeout)),
            conn_gen: AtomicU64::new(0),
            failed_conn: AtomicU64::new(0),
        })
    }

    /// Whether an operation may go to this node now: not while it is passed over after
    /// failures in a row; once the pause is over, one operation probes it (the others keep
    /// passing it over until the probe's outcome, or another pause, has gone by).
    fn turn(&self) -> Turn {
        let until = self.skip_until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return Turn::Go;
        }
        let now = super::tracking::monotonic_ms();
        let next = now + self.pause_ms;
        let won = now >= until
            && self
                .skip_until_ms
                .compare_exchange(until, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        if won {
            Turn::Probe(next)
        } else {
            Turn::PassOver
        }
    }

    /// An operation on this node timed out or could not reach it; `conn` numbers the
    /// shared connection it ran on (`None`: it was connecting, which counts every time).
    fn failed(&self, conn: Option<u64>) {
        if let Some(conn) = conn {
            if self.failed_conn.swap(conn, Ordering::Relaxed) == conn {
                return; // that connection's failure is counted already
            }
        }
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= NODE_FAILURES {
            let until = super::tracking::monotonic_ms() + self.pause_ms;
            self.skip_until_ms.store(until, Ordering::Relaxed);
        }
    }

    /// An operation on this node got an answer (an error reply is one too).
    fn answered(&self) {
        // Read first: a write on every answer would pull these lines between cores.
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.skip_until_ms.load(Ordering::Relaxed) != 0 {
            self.skip_until_ms.store(0, Ordering::Relaxed);
        }
    }

    /// How many replicas a clear waits for, `attached` being attached now: as many as were
    /// attached at most within the last minute, so a replica whose link is down at this
    /// moment is not silently left out, while one removed for good stops being waited for.
    pub(super) fn replicas_to_wait(&self, attached: i64) -> i64 {
        const REMEMBERED_MS: u64 = 60_000;
        let now = super::tracking::monotonic_ms();
        let seen = self.replicas_seen.load(Ordering::Relaxed);
        let at = self.replicas_seen_at.load(Ordering::Relaxed);
        if attached >= seen || now.saturating_sub(at) > REMEMBERED_MS {
            self.replicas_seen.store(attached, Ordering::Relaxed);
            self.replicas_seen_at.store(now, Ordering::Relaxed);
            return attached;
        }
        seen
    }

    /// The shared connection, if one is open (nothing is connected here).
    pub(super) fn cached(&self) -> Option<Tracked> {
        crate::lock::read(&self.conn).clone()
    }

    /// What the shared connection knows of the records, if one is open (for a near tier).
    #[cfg_attr(not(feature = "memory"), allow(dead_code))]
    pub(super) fn tracker(&self) -> Option<std::sync::Arc<super::tracking::Tracker>> {
        crate::lock::read(&self.conn)
            .as_ref()
            .map(|t| t.tracker.clone())
    }

    pub(super) fn discard(&self) {
        crate::lock::write(&self.conn).take();
    }

    /// A connection of the pool for this caller alone (a command that blocks its
    /// connection, such as `WAIT`, must not hold up the shared one).
    pub(super) async fn exclusive(&self) -> Result<bb8::PooledConnection<'_, Manager>, StoreError> {
        get(self.pool_of(&self.own, &self.own_manager)).await
    }

    fn pool_of<'a>(
        &self,
        pool: &'a OnceLock<bb8::Pool<Manager>>,
        manager: &Manager,
    ) -> &'a bb8::Pool<Manager> {
        pool.get_or_init(|| {
            bb8::Pool::builder()
                .max_size(self.pool_size)
                .min_idle(None)
                .test_on_check_out(true)
                .connection_timeout(self.connect_timeout)
                .build_unchecked(manager.clone())
        })
    }

    /// Takes a fresh connection from the pool and keeps a clone of it for every later
    /// operation. Checkouts are rare (only to replace a broken connection), so the PING bb8
    /// does on checkout costs nothing on the hot path and weeds out dead connections.
    pub(super) async fn checkout(&self) -> Result<Tracked, StoreError> {
        let pooled = get(self.pool_of(&self.pool, &self.manager)).await?;
        let conn = pooled.clone();
        drop(pooled);
        *crate::lock::write(&self.conn) = Some(conn.clone());
        self.conn_gen.fetch_add(1, Ordering::Relaxed);
        Ok(conn)
    }
}

impl ValkeyStore {
    /// A fresh connection to `node` from its pool. The first connection the store makes
    /// starts its background tasks. (Boxed with its type spelled out: the tasks it starts
    /// connect through here, and the compiler cannot see through that cycle.)
    fn connect<'a>(
        &'a self,
        node: &'a Node,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Tracked, StoreError>> + Send + 'a>>
    {
        Box::pin(async move {
            let conn = node.checkout().await?;
            self.inner.started.get_or_init(|| {
                tokio::spawn(report_eviction_policy(
                    conn.conn.clone(),
                    self.url().to_owned(),
                ));
                tokio::spawn(keep_records(std::sync::Arc::downgrade(&self.inner)));
            });
            Ok(conn)
        })
    }

    /// Runs one command on the single server's shared connection (see [`run_on`](Self::run_on)).
    pub(super) async fn run<T, F, Fut>(&self, command: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        self.run_on(&self.inner.seed, |t| command(t.conn)).await
    }

    /// Runs one command on `node`'s shared connection, bounded by the operation timeout
    /// (the connection's own response timeout, plus an outer one when it must reconnect
    /// first).
    ///
    /// On a cluster, a node that failed several times in a row is passed over for a while
    /// (one operation probes it each pause): the others' keys keep their cache, and requests
    /// for its keys go to the origin at once instead of waiting out the timeout each. (A
    /// single server has the layer's own breaker for that.)
    pub(super) async fn run_on<T, F, Fut>(&self, node: &Node, command: F) -> Result<T, StoreError>
    where
        F: FnOnce(Tracked) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        self.run_on_node(node, true, command).await
    }

    /// [`run_on`](Self::run_on), also on a node passed over: for clears, which write every
    /// copy of the records at once and would fail whole for the copies a probe left out.
    pub(super) async fn run_on_even_passed_over<T, F, Fut>(
        &self,
        node: &Node,
        command: F,
    ) -> Result<T, StoreError>
    where
        F: FnOnce(Tracked) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        self.run_on_node(node, false, command).await
    }

    async fn run_on_node<T, F, Fut>(
        &self,
        node: &Node,
        pass_over: bool,
        command: F,
    ) -> Result<T, StoreError>
    where
        F: FnOnce(Tracked) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let cluster = self.is_cluster();
        let mut probing = None;
        if cluster && pass_over {
            match node.turn() {
                Turn::Go => {}
                Turn::Probe(until) => probing = Some(Probing { node, until }),
                Turn::PassOver => {
                    return Err(StoreError::Unavailable(Box::new(crate::error::PassedOver)))
                }
            }
        }
        let conn_gen = node.conn_gen.load(Ordering::Relaxed);
        let (result, on_conn) = match node.cached() {
            Some(conn) => (command(conn).await.map_err(classify), Some(conn_gen)),
            None => {
                // Rare (only after a failure), and its future is large: boxed, so that every
                // operation's future stays small.
                let attempt = async { command(self.connect(node).await?).await.map_err(classify) };
                let bounded = Box::pin(tokio::time::timeout(self.inner.operation_timeout, attempt));
                let result = match bounded.await {
                    Ok(r) => r,
                    Err(_) => Err(StoreError::Timeout),
                };
                (result, None)
            }
        };
        match &result {
            // A timed-out connection may be half-open: replace it rather than wait on it again.
            Err(StoreError::Timeout | StoreError::Unavailable(_)) => {
                node.discard();
                self.lost_node();
                if cluster {
                    node.failed(on_conn);
                }
            }
            Ok(_) | Err(StoreError::Server(_)) if cluster => node.answered(),
            _ => {}
        }
        // The probe had its outcome.
        std::mem::forget(probing);
        result
    }

    /// The server's `maxmemory-policy`, where `CONFIG GET` is allowed. At start the store
    /// logs what the cache does under it (see the crate docs, "What the store may drop").
    pub async fn eviction_policy(&self) -> Result<String, StoreError> {
        self.run(eviction_policy).await
    }
}

async fn eviction_policy(mut c: MultiplexedConnection) -> Result<String, RedisError> {
    let reply: redis::Value = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(&mut c)
        .await?;
    // A map over RESP3, a flat [name, value] array over RESP2.
    let value = match reply {
        redis::Value::Map(pairs) => pairs.into_iter().next().map(|(_, v)| v),
        redis::Value::Array(items) => items.into_iter().nth(1),
        _ => None,
    };
    match value {
        Some(redis::Value::BulkString(b)) => Ok(String::from_utf8_lossy(&b).into_owned()),
        Some(redis::Value::SimpleString(s)) => Ok(s),
        _ => Err(RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "CONFIG GET maxmemory-policy answered no policy",
        ))),
    }
}

/// Says once, at start, what the cache does under the server's eviction policy.
async fn report_eviction_policy(conn: MultiplexedConnection, url: String) {
    match eviction_policy(conn).await {
        Ok(policy) => match policy_advice(&policy) {
            (true, advice) => tracing::info!(%url, %policy, "{advice}"),
            (false, advice) => tracing::warn!(%url, %policy, "{advice}"),
        },
        Err(e) => tracing::info!(
            %url, error = %e,
            "cannot read maxmemory-policy (CONFIG may be disabled); the cache stays correct under \
             any policy, see the crate docs, \"What the store may drop\""
        ),
    }
}

/// What the cache does under an eviction policy, and whether that is the recommended setting.
pub(crate) fn policy_advice(policy: &str) -> (bool, &'static str) {
    match policy {
        p if p.starts_with("volatile-") => (
            true,
            "entries expire and are evicted; the clear records have no TTL and are never \
             evicted under this policy (recommended)",
        ),
        p if p.starts_with("allkeys-") => (
            true,
            "entries are evicted; the clear records may be too (kept warm every second), and if \
             they are, every entry from before reads as a miss until filled again: correct, \
             with a burst of misses. volatile-lru keeps the records out of eviction",
        ),
        "noeviction" => (
            false,
            "with memory full, fills are refused (requests pass through, nothing is served \
             stale) while clears still land (scripts allowed under OOM). Prefer volatile-lru \
             so that the cache makes room for itself",
        ),
        _ => (
            false,
            "unknown eviction policy: the cache stays correct, but see the crate docs, \"What \
             the store may drop\"",
        ),
    }
}

/// Once a second, runs the sync script with the newest state this store has seen, even
/// while no request comes (reconnecting if need be). That reads the record set, so an LRU or
/// LFU policy sees it in use (hits read the mirror, not the set) and evicts entries before
/// it; and it finds within a second a set that went back in time (a restart from an older
/// snapshot, a failover to a lagging replica) and starts a new epoch, which every
/// instance's mirror is then told of. Ends with the store.
async fn keep_records(inner: Weak<ValkeyInner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let store = ValkeyStore { inner };
        let _ = tokio::time::timeout(store.inner.connect_timeout, store.keep_once()).await;
    }
}

impl ValkeyStore {
    async fn keep_once(&self) -> Result<(), StoreError> {
        if self.topology().await?.is_none() {
            let seed = &self.inner.seed;
            return self.keep_copy(seed, &self.inner.records_key, 0).await;
        }
        // On a cluster, the map is read again every second too (resharding, failovers).
        if let Some(map) = self.map() {
            self.refreshed_map(&map).await;
        }
        self.keep_copies().await
    }

    /// Syncs every copy of a cluster's records with this store's newest view of it: a copy
    /// found behind it (a failover to a replica that missed clears) starts a new epoch.
    pub(super) async fn keep_copies(&self) -> Result<(), StoreError> {
        let Some(map) = self.map() else {
            return Ok(());
        };
        // Each bounded on its own: a dead master must not hold up the others' reads (their
        // connections' `heard` is what lets near tiers answer).
        let bound = self.inner.operation_timeout;
        let copies = self
            .inner
            .chunk_keys
            .iter()
            .enumerate()
            .filter_map(|(chunk, key)| {
                let node = map.node(self.inner.chunk_slots[chunk])?;
                Some(async move {
                    tokio::time::timeout(bound, self.keep_copy(node, key, chunk))
                        .await
                        .unwrap_or(Err(StoreError::Timeout))
                })
            });
        let mut result = Ok(());
        for done in futures_util::future::join_all(copies).await {
            if done.is_err() {
                result = done;
            }
        }
        result
    }

    /// Syncs one copy of the records on `node` with this store's newest view of it.
    async fn keep_copy(
        &self,
        node: &Node,
        records_key: &str,
        chunk: usize,
    ) -> Result<(), StoreError> {
        let conn = match node.cached() {
            Some(c) => c,
            None => node.checkout().await?,
        };
        let mut c = conn.conn.clone();
        let high = self.high_water(chunk);
        let mut sync = super::scripts::SYNC.prepare_invoke();
        sync.key(records_key)
            .arg(high.epoch())
            .arg(high.seq())
            .arg(high.epoch())
            .arg(high.seq())
            .arg(super::scripts::epoch_nonce())
            .arg(chunk);
        match sync
            .invoke_async::<redis::Value>(&mut c)
            .await
            .map_err(classify)
        {
            Err(e @ (StoreError::Timeout | StoreError::Unavailable(_))) => {
                node.discard();
                self.lost_node();
                Err(e)
            }
            Err(e) => Err(e),
            Ok(reply) => {
                conn.tracker.heard();
                node.answered();
                // What it read raises the mark: a set it made anew is this store's newest.
                if let Some(synced) = super::replies::parse_synced(reply)? {
                    let seq = match synced.seq {
                        Some(seq) => seq,
                        None if synced.epoch == high.epoch() => high.seq(),
                        None => 0,
                    };
                    self.saw_in(chunk, crate::store::Fence::new(synced.epoch, seq));
                }
                Ok(())
            }
        }
    }
}

async fn get(pool: &bb8::Pool<Manager>) -> Result<bb8::PooledConnection<'_, Manager>, StoreError> {
    pool.get().await.map_err(|e| match e {
        bb8::RunError::User(e) => classify(e),
        bb8::RunError::TimedOut => StoreError::Timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::policy_advice;

    #[test]
    fn every_policy_gets_advice() {
        for p in [
            "volatile-lru",
            "volatile-lfu",
            "volatile-ttl",
            "volatile-random",
        ] {
            assert!(policy_advice(p).0, "{p}");
        }
        for p in ["allkeys-lru", "allkeys-lfu", "allkeys-random"] {
            assert!(policy_advice(p).0, "{p}");
        }
        assert!(!policy_advice("noeviction").0);
        assert!(!policy_advice("something-new").0);
    }
}
