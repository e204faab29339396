//! The Valkey / Redis store on a `bb8-redis` pool. One job per file:
//!
//! - `builder`: configuration, the URL or the environment;
//! - `connection`: a server's `Node` (its pools, the shared data connection), timeouts,
//!   start-up checks, the record keeper;
//! - `cluster`: hash slots, the slot map, where the copies of the records lie;
//! - `topology`: one server or a cluster, found out on first use; the map read again;
//! - `near`: what a near tier may rely on (`vouch`);
//! - `tracking`: the connection's mirror of the clear records, kept current by the server;
//! - `fill_queue`: the fill writer (pipelined `SET`s, bounded queue);
//! - `subscription`: the pub/sub connection (`subscribe`);
//! - `keys`: key names and stamped values written into commands, lease tokens;
//! - `scripts`: the record set's scripts (a clear on every copy, `WAIT`), and the high-water
//!   marks their replies raise;
//! - `replies`: reading what the server answered, and what an error means;
//! - the `.lua` files: the record set's scripts (each touches that one key).
//!
//! Hot path: one cloned `MultiplexedConnection` is kept outside the pool, so a lookup is one
//! round trip with no checkout and no PING: a plain `GET` of the entry while the connection's
//! mirror of the clear records is current (see `tracking`), else the `GET` and the sync
//! script pipelined. When that connection breaks (an I/O error or a timeout) it is dropped
//! and the next operation takes a fresh one from the pool, which PINGs on checkout and so
//! replaces the broken one: after a server restart caching resumes by itself. Every
//! operation, reconnecting included, runs under one timeout, so a dead or paused server
//! costs a request at most that long.

use std::sync::atomic::{AtomicU8, AtomicUsize};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bb8_redis::redis;
use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, oneshot};

mod builder;
mod cluster;
mod connection;
mod fill_queue;
mod keys;
#[cfg(feature = "memory")]
mod near;
mod replies;
mod scripts;
mod subscription;
mod topology;
mod tracking;

pub use builder::ValkeyStoreBuilder;
use connection::Node;
use fill_queue::Reply;
use keys::{lease_token, KeyArg};
use replies::{bulk, is_noscript, is_redirect_reply, parse_synced, reads_whole_set};
use scripts::{RELEASE_LEASE, SYNC};
use tracking::Tracker;

use super::{Fence, Fill, FillDone, FillOutcome, Invalidation, Lookup, Notice, Store};
use crate::error::{ConfigError, StoreError};
use crate::key::EntryKey;

/// The storage schema's version, part of every key: bumping it orphans old entries and
/// records. 2: entries stamped and checked against one record set.
const SCHEMA: u32 = 2;

/// Default bound on one store operation.
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_millis(100);

/// A store in Valkey or Redis, reached through a `bb8-redis` pool.
///
/// Clones share the pool. The key layout (`{ns}` is the namespace, `2` the schema version):
///
/// | key | type | holds |
/// |---|---|---|
/// | `{ns}:2:e:{route}:{sha256 hex}` | string | an entry, behind a stamp: its fence and its tags' ids |
/// | `{ns}:2:r` | sorted set | the clear records: `epoch`, `seq`, `floor`, and each recently cleared tag's id scored by its last clear |
/// | `{ns}:2:l:{route}:{sha256 hex}` | string | a fetch lease (stampede protection across instances) |
/// | `{ns}:2:inv` | channel | published clears |
///
/// An entry is served only if its epoch is the records' epoch, its fence is at or above the
/// floor and none of its tags was cleared after its fence. A clear writes the record set
/// and nothing else (O(tags)); a fill is one `SET ... PX`. Every command touches one key.
/// Losing the record set (eviction, a restart, `FLUSHALL`) starts a new epoch: every entry
/// from before reads as a miss, never as a hit. See the crate docs, "What the store may drop".
///
/// ```no_run
/// use std::time::Duration;
/// use tower_cache_aside::store::ValkeyStore;
///
/// # fn main() -> Result<(), tower_cache_aside::ConfigError> {
/// // VALKEY_URL, else REDIS_URL, else redis://127.0.0.1:6379
/// let store = ValkeyStore::from_env()?;
///
/// let store = ValkeyStore::builder()
///     .url("redis://:secret@127.0.0.1:6380/0")
///     .namespace("myapp")
///     .operation_timeout(Duration::from_millis(50))
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ValkeyStore {
    inner: Arc<ValkeyInner>,
}

struct ValkeyInner {
    /// The server the URL names: the only one, or a cluster's first contact.
    seed: Arc<Node>,
    /// Other nodes of a cluster to ask for its map (`ValkeyStoreBuilder::cluster_seeds`).
    seeds: Vec<Arc<Node>>,
    /// The URL's connection settings, for the other nodes of a cluster.
    info: redis::ConnectionInfo,
    /// `topology::UNKNOWN`, `SINGLE` or `CLUSTER`.
    mode: AtomicU8,
    /// On a cluster: which node serves which slot.
    map: RwLock<Option<Arc<cluster::SlotMap>>>,
    refreshing: tokio::sync::Mutex<()>,
    /// On a cluster: the keys of the copies of the clear records, and their slots.
    chunk_keys: Vec<String>,
    chunk_slots: Vec<u16>,
    /// How the nodes' connections are made.
    settings: connection::NodeSettings,
    connect_timeout: Duration,
    /// For the pub/sub connection.
    client: redis::Client,
    /// Subscribers share one pub/sub connection; `None` until the first subscribe.
    notices: std::sync::Mutex<Option<broadcast::Sender<Notice>>>,
    /// Fills waiting for the writer; started on the first fill, and again if the runtime it
    /// ran on has gone.
    fills: std::sync::Mutex<Option<mpsc::Sender<fill_queue::PendingFill>>>,
    /// Bytes of entries waiting in that queue.
    queued_bytes: AtomicUsize,
    /// Set once the first connection is made (the start-up tasks run then).
    started: OnceLock<()>,
    entry_prefix: String,
    lease_prefix: String,
    /// The record set on a single server (on a cluster, `chunk_keys`; also the prefix
    /// tracked connections are told of changes under).
    records_key: String,
    /// The record of the most requested keys: a sorted set, scored by requests.
    hot_key: String,
    /// Per copy of the records (one on a single server): the highest state any reply has
    /// shown this store. A record set found below it in the same epoch lost clears (an old
    /// snapshot, a lagging replica), and the scripts start a new epoch.
    high_water: Vec<std::sync::Mutex<Fence>>,
    channel: String,
    max_clear_records: usize,
    /// Replicas a clear waits for, and for how long.
    wait_for_replicas: Option<(u32, Duration)>,
    operation_timeout: Duration,
    display_url: String,
}

impl std::fmt::Debug for ValkeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValkeyStore")
            .field("url", &self.inner.display_url)
            .field("prefix", &self.inner.entry_prefix)
            .field("operation_timeout", &self.inner.operation_timeout)
            .finish()
    }
}

impl ValkeyStore {
    /// A builder with the defaults.
    pub fn builder() -> ValkeyStoreBuilder {
        ValkeyStoreBuilder::default()
    }

    /// A store at `url` with the defaults.
    pub fn new(url: impl Into<String>) -> Result<Self, ConfigError> {
        Self::builder().url(url).build()
    }

    /// A store at `VALKEY_URL`, else `REDIS_URL`, else `redis://127.0.0.1:6379`.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::builder().build()
    }

    /// The server address, password redacted.
    pub fn url(&self) -> &str {
        &self.inner.display_url
    }

    /// Round-trips a PING (to every master, on a cluster); returns how long it took.
    pub async fn ping(&self) -> Result<Duration, StoreError> {
        let start = Instant::now();
        let nodes = match self.topology().await? {
            None => vec![self.inner.seed.clone()],
            Some(map) => map.nodes.clone(),
        };
        let pings = nodes.iter().map(|node| {
            self.run_on(node, |mut t| async move {
                redis::cmd("PING").query_async::<()>(&mut t.conn).await
            })
        });
        for done in futures_util::future::join_all(pings).await {
            done?;
        }
        Ok(start.elapsed())
    }

    /// `{ns}:2:l:{route}:{hex}`: who fetches this key from the origin right now.
    fn lease_key<'a>(&'a self, key: &'a EntryKey) -> KeyArg<'a> {
        KeyArg {
            prefix: &self.inner.lease_prefix,
            key,
            tagged: self.is_cluster(),
        }
    }

    fn entry_key<'a>(&'a self, key: &'a EntryKey) -> KeyArg<'a> {
        KeyArg {
            prefix: &self.inner.entry_prefix,
            key,
            tagged: self.is_cluster(),
        }
    }
}

/// The cluster slot of an entry (and of its lease): its hash tag is its group's hex.
fn entry_slot(key: &EntryKey) -> u16 {
    let mut tag = [0u8; 8];
    for (pair, &b) in tag.chunks_exact_mut(2).zip(key.group()) {
        pair.copy_from_slice(&crate::hex::hex_pair(b));
    }
    cluster::slot(&tag)
}

/// The sync script's answer, or the whole record set read with a plain `ZRANGE` when the
/// script asked for that: the caller's mirror is of another epoch (a new connection, a lost
/// set). Rare, and a plain `ZRANGE` of the largest set takes well under a millisecond of the
/// server's time.
async fn whole_set_if_asked(
    c: &mut redis::aio::MultiplexedConnection,
    records_key: &str,
    records: redis::Value,
) -> Result<redis::Value, redis::RedisError> {
    use redis::aio::ConnectionLike;
    if !reads_whole_set(&records) {
        return Ok(records);
    }
    let mut all = redis::cmd("ZRANGE");
    all.arg(records_key)
        .arg("-inf")
        .arg("+inf")
        .arg("BYSCORE")
        .arg("WITHSCORES");
    let list = c.req_packed_command(&all).await?;
    Ok(redis::Value::Array(vec![
        redis::Value::Int(0), // the list's own `epoch` member says which
        redis::Value::Int(1),
        list,
    ]))
}

/// What a lookup read: the entry alone (the mirror was current), or the entry and what
/// changed in the records; or a redirect (on a cluster: the slot map has changed).
enum Read {
    Known(redis::Value, Fence, Arc<Tracker>),
    Synced {
        entry: redis::Value,
        records: redis::Value,
        mark: u64,
        from: Fence,
        tracker: Arc<Tracker>,
    },
    Redirected,
}

impl ValkeyStore {
    /// Looks `key` up on `node`, checked against the copy of the records it holds (`chunk`,
    /// under `records_key`). `None` when a cluster redirected the lookup elsewhere.
    async fn lookup_on(
        &self,
        node: &Node,
        records_key: &str,
        chunk: usize,
        key: &EntryKey,
    ) -> Result<Option<Lookup>, StoreError> {
        let entry_key = self.entry_key(key);
        let inner = &self.inner;
        // Replies are read here rather than through `query_async`, which copies every array
        // reply once more to look for errors in it.
        let read = self
            .run_on(node, |t| async move {
                use redis::aio::ConnectionLike;
                let mut c = t.conn;
                // Sized up front: growing the command's buffers argument by argument showed
                // up in profiles as a chain of reallocations.
                let size = inner.entry_prefix.len() + key.route().len() + 80;
                if let Some(known) = t.tracker.known() {
                    let mut get = redis::Cmd::with_capacity(2, size);
                    get.arg("GET").arg(entry_key);
                    let reply = c.req_packed_command(&get).await?;
                    if is_redirect_reply(&reply) {
                        return Ok(Read::Redirected);
                    }
                    if t.tracker.still(&known) {
                        t.tracker.heard();
                        return Ok(Read::Known(reply, known.fence, t.tracker));
                    }
                    // The records changed meanwhile: read what changed (rare).
                }
                // Rare, and its future is large: boxed, so that a hit's stays small.
                Box::pin(self.read_synced(c, t.tracker, &entry_key, size, records_key, chunk)).await
            })
            .await?;
        self.checked(read, chunk)
    }

    /// The entry and what changed in the records since the mirror's state, in one round
    /// trip: a lookup on a connection whose mirror is not known to be current.
    async fn read_synced(
        &self,
        mut c: redis::aio::MultiplexedConnection,
        tracker: Arc<Tracker>,
        entry_key: &KeyArg<'_>,
        size: usize,
        records_key: &str,
        chunk: usize,
    ) -> Result<Read, redis::RedisError> {
        use redis::aio::ConnectionLike;
        let mark = tracker.mark();
        let from = tracker.synced();
        let mut get = redis::Cmd::with_capacity(2, size);
        get.arg("GET").arg(entry_key);
        let mut pipe = redis::Pipeline::with_capacity(2);
        pipe.add_command(get)
            .add_command(self.sync_command(records_key, chunk, from));
        let mut replies = c.req_packed_commands(&pipe, 0, 2).await?;
        if is_noscript(replies.get(1)) {
            // The server forgot the script (a restart, SCRIPT FLUSH): load it again.
            SYNC.prepare_invoke().load_async(&mut c).await?;
            replies = c.req_packed_commands(&pipe, 0, 2).await?;
        }
        if replies.iter().any(is_redirect_reply) {
            return Ok(Read::Redirected);
        }
        let records = replies.pop().unwrap_or(redis::Value::Nil);
        let entry = replies.pop().unwrap_or(redis::Value::Nil);
        let records = whole_set_if_asked(&mut c, records_key, records).await?;
        Ok(Read::Synced {
            entry,
            records,
            mark,
            from,
            tracker,
        })
    }

    /// What a lookup's read says: the entry if current by the records, and their state.
    fn checked(&self, read: Read, chunk: usize) -> Result<Option<Lookup>, StoreError> {
        match read {
            Read::Redirected => Ok(None),
            Read::Known(reply, fence, tracker) => {
                let value = bulk(reply)?.and_then(|v| tracker.check(Bytes::from(v)));
                Ok(Some(Lookup { value, fence }))
            }
            Read::Synced {
                entry,
                records,
                mark,
                from,
                tracker,
            } => {
                // Unusable (overtaken by a change of epoch, or read as the set vanished):
                // nothing read here may be served, and no fill may carry it (epoch 0 is no
                // epoch's).
                let merged = parse_synced(records)?.and_then(|s| tracker.merge(mark, from, s));
                let Some(fence) = merged else {
                    return Ok(Some(Lookup::new(None, Fence::default())));
                };
                self.saw_in(chunk, fence);
                let value = bulk(entry)?.and_then(|v| tracker.check(Bytes::from(v)));
                Ok(Some(Lookup { value, fence }))
            }
        }
    }

    /// The node serving `key`'s slot on a cluster, once more after a redirect.
    async fn lookup_in_cluster(
        &self,
        map: Arc<cluster::SlotMap>,
        key: &EntryKey,
    ) -> Result<Lookup, StoreError> {
        let slot = entry_slot(key);
        let mut current = map;
        for attempt in 0..2 {
            if attempt > 0 {
                match self.refreshed_map(&current).await {
                    Some(m) => current = m,
                    None => break,
                }
            }
            let Some(node) = current.node(slot) else {
                return Err(StoreError::Unavailable(
                    format!("no cluster node serves slot {slot}").into(),
                ));
            };
            let found = match node.home {
                Some(chunk) => {
                    let records_key = &self.inner.chunk_keys[chunk];
                    self.lookup_on(node, records_key, chunk, key).await?
                }
                // A node holding no copy of the records: read copy 0 beside the entry.
                None => self.lookup_beside(&current, node, key).await?,
            };
            if let Some(found) = found {
                return Ok(found);
            }
        }
        // Redirected twice (a slot on the move): a miss whose fill is refused.
        Ok(Lookup::new(None, Fence::default()))
    }

    /// Looks `key` up on `node`, which holds no copy of the records: the entry from `node`
    /// and, at the same time, what changed in copy 0 from the node holding it. Both are read
    /// after the lookup began, so a clear completed before it is in what is read; no
    /// mirror is trusted across the two connections.
    async fn lookup_beside(
        &self,
        map: &cluster::SlotMap,
        node: &Node,
        key: &EntryKey,
    ) -> Result<Option<Lookup>, StoreError> {
        use redis::aio::ConnectionLike;
        let records_key = &self.inner.chunk_keys[0];
        let Some(keeper) = map.node(self.inner.chunk_slots[0]) else {
            return Ok(None);
        };
        let entry_key = self.entry_key(key);
        let entry = self.run_on(node, |t| async move {
            let mut c = t.conn;
            c.req_packed_command(redis::cmd("GET").arg(entry_key)).await
        });
        let records = self.run_on(keeper, |t| async move {
            let mut c = t.conn;
            let (mark, from) = (t.tracker.mark(), t.tracker.synced());
            let sync = self.sync_command(records_key, 0, from);
            let mut reply = c.req_packed_command(&sync).await?;
            if is_noscript(Some(&reply)) {
                SYNC.prepare_invoke().load_async(&mut c).await?;
                reply = c.req_packed_command(&sync).await?;
            }
            let reply = whole_set_if_asked(&mut c, records_key, reply).await?;
            Ok((reply, mark, from, t.tracker))
        });
        let (entry, records) = futures_util::future::join(entry, records).await;
        let (entry, (records, mark, from, tracker)) = (entry?, records?);
        if is_redirect_reply(&entry) || is_redirect_reply(&records) {
            return Ok(None);
        }
        let read = Read::Synced {
            entry,
            records,
            mark,
            from,
            tracker,
        };
        self.checked(read, 0)
    }

    /// The cluster slot of a key argument (see [`entry_slot`] for entries).
    fn slot_of(&self, key: &impl redis::ToRedisArgs) -> u16 {
        let args = key.to_redis_args();
        cluster::slot(args.first().map_or(&[][..], |a| &a[..]))
    }

    /// The node serving a key on a cluster (after reading the map again if none does), or
    /// the single server.
    async fn node_for(&self, key: &impl redis::ToRedisArgs) -> Result<Arc<Node>, StoreError> {
        let Some(map) = self.topology().await? else {
            return Ok(self.inner.seed.clone());
        };
        let slot = self.slot_of(key);
        if let Some(node) = map.node(slot) {
            return Ok(node.clone());
        }
        self.refreshed_map(&map)
            .await
            .and_then(|m| m.node(slot).cloned())
            .ok_or_else(|| {
                StoreError::Unavailable(format!("no cluster node serves slot {slot}").into())
            })
    }

    /// Runs a one-key command on the node serving the key; on a cluster, once more on the
    /// new node after a `MOVED` (the map read again).
    async fn run_keyed<T, F, Fut>(
        &self,
        key: &impl redis::ToRedisArgs,
        command: F,
    ) -> Result<T, StoreError>
    where
        F: Fn(redis::aio::MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = Result<T, redis::RedisError>>,
    {
        let node = self.node_for(key).await?;
        let first = self.run_on(&node, |t| command(t.conn)).await;
        match &first {
            Err(e) if replies::is_redirect(e) => {
                if let Some(map) = self.map() {
                    self.refreshed_map(&map).await;
                }
                let node = self.node_for(key).await?;
                self.run_on(&node, |t| command(t.conn)).await
            }
            _ => first,
        }
    }
}

impl Store for ValkeyStore {
    async fn lookup(&self, key: &EntryKey) -> Result<Lookup, StoreError> {
        match self.topology().await? {
            None => {
                let found = self
                    .lookup_on(&self.inner.seed, &self.inner.records_key, 0, key)
                    .await?;
                Ok(found.unwrap_or_default())
            }
            // Redirects and a second node make it several steps: bounded as one.
            Some(map) => {
                let bound = self.inner.operation_timeout;
                match Box::pin(tokio::time::timeout(
                    bound,
                    self.lookup_in_cluster(map, key),
                ))
                .await
                {
                    Ok(found) => found,
                    Err(_) => Err(StoreError::Timeout),
                }
            }
        }
    }

    /// Queued for the writer, which sends whatever fills are waiting as one pipeline; the
    /// future ends when the store has answered for this one.
    async fn fill(&self, fill: Fill) -> Result<FillOutcome, StoreError> {
        let (done, answer) = oneshot::channel();
        self.enqueue(fill, Reply::Waiting(done));
        answer.await.unwrap_or(Err(StoreError::Timeout))
    }

    /// Queued for the writer, whose task reports the outcome: no task of its own.
    fn fill_in_background(&self, fill: Fill, done: FillDone) {
        self.enqueue(fill, Reply::Call(done));
    }

    async fn remove(&self, key: &EntryKey) -> Result<bool, StoreError> {
        // Known before the key is written: a cluster's keys carry a hash tag.
        self.topology().await?;
        let entry_key = self.entry_key(key);
        let del = redis::cmd("DEL").arg(entry_key).clone();
        let n: i64 = self
            .run_keyed(&entry_key, |mut c| {
                let del = del.clone();
                async move { del.query_async(&mut c).await }
            })
            .await?;
        Ok(n > 0)
    }

    async fn invalidate(&self, tags: &[String]) -> Result<Invalidation, StoreError> {
        let done = self.write_records(Some(tags)).await?;
        Ok(Invalidation::new(done.epoch(), done.seq()))
    }

    async fn try_lease(&self, key: &EntryKey, ttl: Duration) -> Result<Option<u64>, StoreError> {
        // Known before the key is written: a cluster's keys carry a hash tag.
        self.topology().await?;
        let lease_key = self.lease_key(key);
        let token = lease_token();
        let ttl_ms = crate::entry::millis(ttl).clamp(1, 1 << 40);
        let set = redis::cmd("SET")
            .arg(lease_key)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .clone();
        let set: Option<String> = self
            .run_keyed(&lease_key, |mut c| {
                let set = set.clone();
                async move { set.query_async(&mut c).await }
            })
            .await?;
        Ok(set.map(|_| token))
    }

    async fn release_lease(&self, key: &EntryKey, token: u64) -> Result<(), StoreError> {
        // Known before the key is written: a cluster's keys carry a hash tag.
        self.topology().await?;
        let lease_key = self.lease_key(key);
        let _: i64 = self
            .run_keyed(&lease_key, |mut c| async move {
                let mut invocation = RELEASE_LEASE.prepare_invoke();
                invocation.key(lease_key).arg(token);
                invocation.invoke_async(&mut c).await
            })
            .await?;
        Ok(())
    }

    async fn purge(&self) -> Result<u64, StoreError> {
        Ok(self.write_records(None).await?.seq())
    }

    /// One sorted set, one pipeline: earlier counts fade, this instance's are added, and
    /// only the `keep` most requested stay. The set lives a week past its last addition.
    async fn record_hot(&self, counts: Vec<(Bytes, u64)>, keep: usize) -> Result<(), StoreError> {
        let key = &self.inner.hot_key;
        let mut pipe = redis::pipe();
        pipe.cmd("ZUNIONSTORE")
            .arg(key)
            .arg(1)
            .arg(key)
            .arg("WEIGHTS")
            .arg(super::HOT_FADE)
            .ignore();
        for (request, n) in &counts {
            pipe.cmd("ZINCRBY")
                .arg(key)
                .arg(*n)
                .arg(&request[..])
                .ignore();
        }
        let last = -(keep.min(1 << 20) as i64) - 1;
        pipe.cmd("ZREMRANGEBYRANK")
            .arg(key)
            .arg(0)
            .arg(last)
            .ignore();
        pipe.cmd("PEXPIRE")
            .arg(key)
            .arg(7 * 24 * 3600 * 1000u64)
            .ignore();
        self.run_keyed(key, |mut c| {
            let pipe = pipe.clone();
            async move { pipe.query_async::<()>(&mut c).await }
        })
        .await
    }

    async fn hot(&self, limit: usize) -> Result<Vec<(Bytes, u64)>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let key = &self.inner.hot_key;
        let stop = limit.min(1 << 20) as i64 - 1;
        let top: Vec<(Vec<u8>, f64)> = self
            .run_keyed(key, |mut c| async move {
                redis::cmd("ZREVRANGE")
                    .arg(key)
                    .arg(0)
                    .arg(stop)
                    .arg("WITHSCORES")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(top
            .into_iter()
            .map(|(r, n)| (Bytes::from(r), n.max(0.0) as u64))
            .collect())
    }
}
