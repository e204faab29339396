//! The Valkey / Redis store on a `bb8-redis` pool.
//!
//! Hot path: one cloned `MultiplexedConnection` is kept outside the pool, so a lookup is one
//! round trip with no checkout and no PING: a plain `GET` of the entry while the connection
//! knows the invalidation sequence and the purge record (see `tracking`), else one `MGET` of
//! all three. When that connection breaks
//! (an I/O error or a timeout) it is dropped and the next operation takes a fresh one from
//! the pool, which PINGs on checkout and so replaces the broken one: after a server restart
//! caching resumes by itself. Every operation, reconnecting included, runs under one
//! timeout, so a dead or paused server costs a request at most that long.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bb8_redis::bb8;
use bb8_redis::redis::{self, aio::MultiplexedConnection, RedisError};
use bytes::Bytes;

use futures_util::StreamExt;
use tokio::sync::{broadcast, mpsc, oneshot};

mod tracking;
use tracking::{Manager, Tracked};

use super::{Fill, FillDone, FillOutcome, Invalidation, Lookup, Notice, Store, FENCE_WINDOW};
use crate::error::{ConfigError, StoreError};
use crate::key::EntryKey;

/// The entry format's schema version, part of every key: bumping it orphans old entries.
const SCHEMA: u32 = 1;

/// Default bound on one store operation.
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_millis(100);

/// A store in Valkey or Redis, reached through a `bb8-redis` pool.
///
/// Clones share the pool. The key layout (`{ns}` is the namespace, `1` the schema version):
///
/// | key | type | holds |
/// |---|---|---|
/// | `{ns}:1:e:{route}:{sha256 hex}` | string | an entry |
/// | `{ns}:1:seq` | integer | the invalidation sequence (the fence) |
/// | `{ns}:1:purged` | integer | the sequence of the last purge |
/// | `{ns}:1:t:{tag}` | sorted set | entry keys carrying the tag, scored by expiry |
/// | `{ns}:1:c:{tag}` | integer | the sequence of the tag's last clear (lives 10 min) |
/// | `{ns}:1:l:{route}:{sha256 hex}` | string | a fetch lease (stampede protection across instances) |
/// | `{ns}:1:inv` | channel | published clears |
///
/// A tag appears verbatim when it is at most 64 bytes of `[A-Za-z0-9_.:-]`, else as `#`
/// and its sha256. Every index and record expires.
///
/// ```no_run
/// use std::time::Duration;
/// use tower_cache_aside::ValkeyStore;
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
    client: redis::Client,
    /// Subscribers share one pub/sub connection; `None` until the first subscribe.
    notices: std::sync::Mutex<Option<broadcast::Sender<Notice>>>,
    /// Fills waiting for the batch writer; started on the first fill, and again if the
    /// runtime it ran on has gone.
    fills: std::sync::Mutex<Option<mpsc::Sender<PendingFill>>>,
    /// Bytes of entries waiting in that queue.
    queued_bytes: std::sync::atomic::AtomicUsize,
    /// Created on first use: bb8 spawns its reaper task when a pool is built, which needs a
    /// Tokio runtime, and a store may well be built before the runtime starts.
    pool: OnceLock<bb8::Pool<Manager>>,
    manager: Manager,
    pool_size: u32,
    connect_timeout: Duration,
    conn: RwLock<Option<Tracked>>,
    entry_prefix: String,
    lease_prefix: String,
    index_prefix: String,
    cleared_prefix: String,
    seq_key: String,
    purged_key: String,
    channel: String,
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

/// Configures a [`ValkeyStore`].
#[derive(Debug, Clone)]
#[must_use]
pub struct ValkeyStoreBuilder {
    url: Option<String>,
    namespace: String,
    operation_timeout: Duration,
    connect_timeout: Duration,
    pool_size: u32,
    client_tracking: bool,
}

impl Default for ValkeyStoreBuilder {
    fn default() -> Self {
        ValkeyStoreBuilder {
            url: None,
            namespace: "tca".to_owned(),
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
            connect_timeout: Duration::from_secs(2),
            pool_size: 4,
            client_tracking: true,
        }
    }
}

impl ValkeyStoreBuilder {
    /// The server URL: `redis://[user][:password@]host[:port][/db]`, `valkey://...`, or
    /// `rediss://` / `valkeys://` for TLS (with the `tls` feature). Without one, the builder
    /// reads the environment (see [`ValkeyStore::from_env`]).
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// Prefix of every key this store writes (default `tca`). Letters, digits, `_-.:`.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Bound on one operation, reconnecting included (default 100 ms). A request waits at
    /// most this long for the store before it is passed through.
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Bound on opening a connection in the background (default 2 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Most connections the pool opens (default 4). Requests share one multiplexed
    /// connection; the pool supplies replacements.
    pub fn pool_size(mut self, size: u32) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// Whether lookups keep the invalidation sequence and the purge record on this side
    /// (default on): the data connection speaks RESP3 and has the server announce changes to
    /// those two keys (`CLIENT TRACKING ON BCAST`), so a hit is a plain `GET` instead of an
    /// `MGET` of three keys, exactly as coherent. A server or proxy that refuses RESP3
    /// (`HELLO 3`) or `CLIENT TRACKING` is detected and served over RESP2 with the `MGET`
    /// (a warning is logged); turning this off skips the attempt.
    pub fn client_tracking(mut self, on: bool) -> Self {
        self.client_tracking = on;
        self
    }

    /// Builds the store. Nothing is connected yet: the first operation connects, so an
    /// application starts even while the server is down.
    pub fn build(self) -> Result<ValkeyStore, ConfigError> {
        let url = match self.url {
            Some(u) => u,
            None => url_from_env(),
        };
        let ns = &self.namespace;
        if ns.is_empty()
            || ns.len() > 64
            || !ns
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b))
        {
            return Err(ConfigError::new(format!(
                "namespace `{ns}` is not valid: use 1 to 64 letters, digits, `_`, `-`, `.` or `:`"
            )));
        }
        let display_url = redact(&url);
        let bad_url = |e: RedisError| {
            ConfigError::new(format!(
                "cannot use `{display_url}` as a Valkey URL ({e}); expected redis://[:password@]host[:port][/db]"
            ))
        };
        let seq_key = format!("{ns}:{SCHEMA}:seq");
        let purged_key = format!("{ns}:{SCHEMA}:purged");
        let tracking = self
            .client_tracking
            .then(|| [seq_key.clone(), purged_key.clone()]);
        let manager = Manager::new(
            url.as_str(),
            tracking,
            self.operation_timeout,
            display_url.clone(),
        )
        .map_err(bad_url)?;
        let client = redis::Client::open(url.as_str()).map_err(bad_url)?;
        Ok(ValkeyStore {
            inner: Arc::new(ValkeyInner {
                pool: OnceLock::new(),
                manager,
                pool_size: self.pool_size,
                connect_timeout: self.connect_timeout,
                conn: RwLock::new(None),
                client,
                notices: std::sync::Mutex::new(None),
                fills: std::sync::Mutex::new(None),
                queued_bytes: std::sync::atomic::AtomicUsize::new(0),
                entry_prefix: format!("{ns}:{SCHEMA}:e:"),
                lease_prefix: format!("{ns}:{SCHEMA}:l:"),
                index_prefix: format!("{ns}:{SCHEMA}:t:"),
                cleared_prefix: format!("{ns}:{SCHEMA}:c:"),
                seq_key,
                purged_key,
                channel: format!("{ns}:{SCHEMA}:inv"),
                operation_timeout: self.operation_timeout,
                display_url,
            }),
        })
    }
}

fn url_from_env() -> String {
    ["VALKEY_URL", "REDIS_URL"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned())
}

/// The URL with any password replaced, for logs.
fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((auth, host)) = rest.rsplit_once('@') {
            let user = auth.split_once(':').map_or(auth, |(u, _)| u);
            return format!("{scheme}://{user}:***@{host}");
        }
    }
    url.to_owned()
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

    /// Round-trips a PING; returns how long it took.
    pub async fn ping(&self) -> Result<Duration, StoreError> {
        let start = Instant::now();
        self.run(|mut c| async move { redis::cmd("PING").query_async::<()>(&mut c).await })
            .await?;
        Ok(start.elapsed())
    }

    /// The index and clear-record keys of a tag.
    fn tag_keys(&self, tag: &str) -> (String, String) {
        let name = TagName::of(tag);
        // Built from the namespace (validated) and a safe name or hex digest: UTF-8.
        let render = |prefix: &str| {
            let mut key = prefix.as_bytes().to_vec();
            key.extend_from_slice(name.as_bytes());
            String::from_utf8(key).unwrap_or_default()
        };
        (
            render(&self.inner.index_prefix),
            render(&self.inner.cleared_prefix),
        )
    }

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
        let mut slot = self.inner.notices.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = slot.as_ref().filter(|tx| tx.receiver_count() > 0) {
            return tx.subscribe();
        }
        let (tx, rx) = broadcast::channel(1024);
        *slot = Some(tx.clone());
        tokio::spawn(run_subscription(self.inner.clone(), tx));
        rx
    }

    /// `{ns}:1:l:{route}:{hex}`: who fetches this key from the origin right now.
    fn lease_key<'a>(&'a self, key: &'a EntryKey) -> KeyArg<'a> {
        KeyArg {
            prefix: &self.inner.lease_prefix,
            key,
        }
    }

    fn entry_key<'a>(&'a self, key: &'a EntryKey) -> KeyArg<'a> {
        KeyArg {
            prefix: &self.inner.entry_prefix,
            key,
        }
    }

    fn cached_connection(&self) -> Option<Tracked> {
        self.inner
            .conn
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Takes a fresh connection from the pool and keeps a clone of it for every later
    /// operation. Checkouts are rare (only to replace a broken connection), so the PING bb8
    /// does on checkout costs nothing on the hot path and weeds out dead connections.
    async fn connect(&self) -> Result<Tracked, StoreError> {
        let inner = &self.inner;
        let pool = inner.pool.get_or_init(|| {
            bb8::Pool::builder()
                .max_size(inner.pool_size)
                .min_idle(None)
                .test_on_check_out(true)
                .connection_timeout(inner.connect_timeout)
                .build_unchecked(inner.manager.clone())
        });
        let pooled = pool.get().await.map_err(|e| match e {
            bb8::RunError::User(e) => classify(e),
            bb8::RunError::TimedOut => StoreError::Timeout,
        })?;
        let conn = pooled.clone();
        drop(pooled);
        *inner.conn.write().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    fn discard_connection(&self) {
        self.inner
            .conn
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    /// Runs one command on the shared connection, bounded by the operation timeout (the
    /// connection's own response timeout, plus an outer one when it must reconnect first).
    async fn run<T, F, Fut>(&self, command: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        self.run_tracked(|t| command(t.conn)).await
    }

    /// [`run`](Self::run), with what the connection knows of the records.
    async fn run_tracked<T, F, Fut>(&self, command: F) -> Result<T, StoreError>
    where
        F: FnOnce(Tracked) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let result = match self.cached_connection() {
            Some(conn) => command(conn).await.map_err(classify),
            None => {
                // Rare (only after a failure), and its future is large: boxed, so that every
                // operation's future stays small.
                let attempt = async { command(self.connect().await?).await.map_err(classify) };
                let bounded = Box::pin(tokio::time::timeout(self.inner.operation_timeout, attempt));
                match bounded.await {
                    Ok(r) => r,
                    Err(_) => Err(StoreError::Timeout),
                }
            }
        };
        // A timed-out connection may be half-open: replace it rather than wait on it again.
        if let Err(StoreError::Timeout | StoreError::Unavailable(_)) = &result {
            self.discard_connection();
        }
        result
    }
}

/// Keeps one pub/sub connection subscribed and forwards what it hears, until nobody listens.
async fn run_subscription(inner: Arc<ValkeyInner>, tx: broadcast::Sender<Notice>) {
    const PING_EVERY: Duration = Duration::from_secs(2);
    let mut backoff = Duration::from_millis(50);
    let mut first = true;
    while tx.receiver_count() > 0 {
        let connected = tokio::time::timeout(inner.connect_timeout, async {
            let mut pubsub = inner.client.get_async_pubsub().await?;
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

/// `{prefix}{route}:{hex digest}`, written straight into a command's buffer: a lookup
/// allocates no key string.
struct KeyArg<'a> {
    prefix: &'a str,
    key: &'a EntryKey,
}

impl redis::ToRedisArgs for KeyArg<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write;
        let mut arg = out.writer_for_next_arg();
        // Writing into the command's Vec cannot fail.
        let _ = arg.write_all(self.prefix.as_bytes());
        let _ = arg.write_all(self.key.route().as_bytes());
        let _ = arg.write_all(b":");
        let _ = arg.write_all(&crate::key::hex(self.key.digest()));
    }
}

/// A tag as key names carry it: verbatim when it is at most 64 bytes of `[A-Za-z0-9_.:-]`,
/// else `#` and its sha256 in hex. Worked out once per tag, for both of its keys.
enum TagName<'a> {
    Verbatim(&'a str),
    Hashed([u8; 65]),
}

impl<'a> TagName<'a> {
    fn of(tag: &'a str) -> Self {
        let safe = tag.len() <= 64
            && tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b));
        if safe {
            return TagName::Verbatim(tag);
        }
        let digest = <sha2::Sha256 as sha2::Digest>::digest(tag.as_bytes());
        let mut name = [b'#'; 65];
        name[1..].copy_from_slice(&crate::key::hex(&digest.into()));
        TagName::Hashed(name)
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            TagName::Verbatim(t) => t.as_bytes(),
            TagName::Hashed(h) => h,
        }
    }
}

/// `{prefix}{tag name}`, written straight into a command's buffer.
struct TagKey<'a> {
    prefix: &'a str,
    name: &'a TagName<'a>,
}

impl redis::ToRedisArgs for TagKey<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write;
        let mut arg = out.writer_for_next_arg();
        // Writing into the command's Vec cannot fail.
        let _ = arg.write_all(self.prefix.as_bytes());
        let _ = arg.write_all(self.name.as_bytes());
    }
}

/// A token no other lease holder will have: the process's random hasher keys over a counter.
fn lease_token() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static KEYS: std::sync::LazyLock<std::collections::hash_map::RandomState> =
        std::sync::LazyLock::new(std::collections::hash_map::RandomState::new);
    let mut h = KEYS.build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

fn classify(e: RedisError) -> StoreError {
    if e.is_timeout() {
        return StoreError::Timeout;
    }
    if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
    {
        StoreError::Unavailable(Box::new(e))
    } else {
        StoreError::Server(Box::new(e))
    }
}

/// What a lookup read: the entry alone (the records were known), or all three.
enum Read {
    Entry(redis::Value, u64, u64),
    All(redis::Value, std::sync::Arc<tracking::Tracker>, u64),
}

/// One value of an `MGET` reply: a string or nil.
fn bulk(value: Option<redis::Value>) -> Result<Option<Vec<u8>>, StoreError> {
    match value {
        Some(redis::Value::BulkString(b)) => Ok(Some(b)),
        Some(redis::Value::Nil) => Ok(None),
        Some(other) => Err(unexpected_reply(other)),
        None => Ok(None),
    }
}

fn unexpected_reply(value: redis::Value) -> StoreError {
    match value {
        redis::Value::ServerError(e) => StoreError::Server(Box::new(RedisError::from(e))),
        // Described, not printed: the value may be a whole entry.
        other => {
            let what = match &other {
                redis::Value::Array(items) => format!("an array of {} values", items.len()),
                redis::Value::Int(_) => "an integer".to_owned(),
                _ => "a value of another type".to_owned(),
            };
            StoreError::Server(Box::new(RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "unexpected reply to MGET",
                what,
            ))))
        }
    }
}

/// Reads a sequence number leniently: anything unreadable counts as 0.
fn parse_seq(raw: Option<Vec<u8>>) -> u64 {
    raw.and_then(|b| std::str::from_utf8(&b).ok()?.parse().ok())
        .unwrap_or(0)
}

/// Most fills, and most bytes of entries, waiting for the batch writer: beyond either, new
/// fills are dropped (a stalled store must not hold the app's memory hostage).
const FILL_QUEUE: usize = 4096;
const FILL_QUEUE_BYTES: usize = 64 << 20;
/// Bounds on one batch: entries, and bytes of encoded entries. A script call holds the
/// (single-threaded) server for its whole run, delaying every lookup queued behind it: 32
/// fills (about 0.5 ms of script) added 0.35 ms to the miss p50 in `scripts/load`, eight
/// (about 120 µs) nothing measurable.
const FILL_BATCH: usize = 8;
const FILL_BATCH_BYTES: usize = 4 << 20;
/// Batches in flight at once: they pipeline on the connection, so a round trip is not
/// paid per batch; when all are out, waiting fills gather into bigger batches.
const FILL_IN_FLIGHT: usize = 4;

/// A fill and who waits for its outcome.
struct PendingFill {
    fill: Fill,
    done: Reply,
}

/// Where a fill's outcome goes: a waiting `fill` call, or a background fill's callback.
enum Reply {
    Waiting(oneshot::Sender<Result<FillOutcome, StoreError>>),
    Call(FillDone),
}

impl Reply {
    fn send(self, outcome: Result<FillOutcome, StoreError>) {
        match self {
            Reply::Waiting(tx) => {
                let _ = tx.send(outcome);
            }
            Reply::Call(done) => done(outcome),
        }
    }
}

/// Writes queued fills, as many as are waiting (up to a batch) in one script call, a few
/// batches at a time: under load, the fills of concurrent misses share one round trip and
/// one script run instead of paying for their own; alone, a fill is sent at once. Ends when
/// the store is dropped.
async fn write_fills(inner: std::sync::Weak<ValkeyInner>, mut queue: mpsc::Receiver<PendingFill>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(FILL_IN_FLIGHT));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = queue.recv().await else {
            return;
        };
        let Some(inner) = inner.upgrade() else { return };
        let mut bytes = first.fill.value.len();
        let mut batch = Vec::with_capacity(FILL_BATCH);
        batch.push(first);
        while batch.len() < FILL_BATCH && bytes < FILL_BATCH_BYTES {
            match queue.try_recv() {
                Ok(next) => {
                    bytes += next.fill.value.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        inner.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        let (fills, replies): (Vec<Fill>, Vec<Reply>) =
            batch.into_iter().map(|p| (p.fill, p.done)).unzip();
        tokio::spawn(async move {
            let _slot = slot;
            let store = ValkeyStore { inner };
            match store.fill_batch(&fills).await {
                Ok(stored) => {
                    for (reply, stored) in replies.into_iter().zip(stored) {
                        let outcome = if stored == 1 {
                            FillOutcome::Stored
                        } else {
                            FillOutcome::Fenced
                        };
                        reply.send(Ok(outcome));
                    }
                }
                Err(e) => {
                    for reply in replies {
                        reply.send(Err(e.replicate()));
                    }
                }
            }
        });
    }
}

impl ValkeyStore {
    /// Hands a fill to the batch writer (started on first use, and again if the runtime it
    /// ran on has gone); `reply` hears the outcome. When the queue is full the store is far
    /// behind, and the fill is shed at once rather than queued without bound.
    fn enqueue(&self, fill: Fill, reply: Reply) {
        if fill.ttl.as_millis() == 0 {
            return reply.send(Ok(FillOutcome::Stored)); // nothing to keep
        }
        let sent = {
            let mut slot = self.inner.fills.lock().unwrap_or_else(|e| e.into_inner());
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

    /// One call of the fill script for a batch; one 1 (stored) or 0 (fenced) per fill.
    async fn fill_batch(&self, batch: &[Fill]) -> Result<Vec<i64>, StoreError> {
        let command = self.fill_command(batch);
        let reply = self
            .run(|mut c| async move {
                use redis::aio::ConnectionLike;
                match c.req_packed_command(&command).await? {
                    // The server forgot the script (a restart, SCRIPT FLUSH): load it again.
                    redis::Value::ServerError(e)
                        if e.kind() == Some(redis::ServerErrorKind::NoScript) =>
                    {
                        FILL.prepare_invoke().load_async(&mut c).await?;
                        c.req_packed_command(&command).await
                    }
                    reply => Ok(reply),
                }
            })
            .await?;
        let stored: Option<Vec<i64>> = match &reply {
            redis::Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    redis::Value::Int(n) => Some(*n),
                    _ => None,
                })
                .collect(),
            _ => None,
        };
        match stored {
            Some(stored) if stored.len() == batch.len() => Ok(stored),
            Some(stored) => Err(StoreError::Server(
                format!(
                    "the fill script answered {} outcomes for {} fills",
                    stored.len(),
                    batch.len()
                )
                .into(),
            )),
            None => Err(match reply {
                redis::Value::ServerError(e) => StoreError::Server(Box::new(RedisError::from(e))),
                other => unexpected_reply(other),
            }),
        }
    }

    /// `EVALSHA` of the fill script for a batch, written into one buffer sized up front:
    /// each entry is copied once, and no key becomes a string of its own.
    fn fill_command(&self, batch: &[Fill]) -> redis::Cmd {
        let inner = &self.inner;
        let tags: usize = batch.iter().map(|f| f.tags.len()).sum();
        let keys = 1 + batch.len() + 2 * tags;
        let key_bytes = inner.purged_key.len()
            + batch.len() * (inner.entry_prefix.len() + 80)
            + 2 * tags * (inner.index_prefix.len() + 66);
        let value_bytes: usize = batch.iter().map(|f| f.value.len() + 48).sum();
        let mut cmd =
            redis::Cmd::with_capacity(3 + keys + 4 * batch.len(), key_bytes + value_bytes + 64);
        cmd.arg("EVALSHA")
            .arg(FILL.get_hash())
            .arg(keys)
            .arg(&inner.purged_key);
        for fill in batch {
            cmd.arg(self.entry_key(&fill.key));
            for tag in &fill.tags {
                let name = TagName::of(tag);
                let key = |prefix| TagKey {
                    prefix,
                    name: &name,
                };
                cmd.arg(key(&inner.index_prefix))
                    .arg(key(&inner.cleared_prefix));
            }
        }
        for fill in batch {
            let ttl_ms = fill.ttl.as_millis().clamp(1, u128::from(u64::MAX)) as u64;
            cmd.arg(fill.value.as_ref())
                .arg(ttl_ms)
                .arg(fill.fence)
                .arg(fill.tags.len());
        }
        cmd
    }
}

static FILL: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("fill.lua")));
static INVALIDATE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("invalidate.lua")));
static RELEASE_LEASE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("release_lease.lua")));
static PURGE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("purge.lua")));

impl Store for ValkeyStore {
    async fn lookup(&self, key: &EntryKey) -> Result<Lookup, StoreError> {
        let entry_key = self.entry_key(key);
        let inner = &self.inner;
        // Replies are read here rather than through `query_async`, which copies every array
        // reply once more to look for errors in it.
        let read = self
            .run_tracked(|t| async move {
                use redis::aio::ConnectionLike;
                let mut c = t.conn;
                // Sized up front: growing the command's buffers argument by argument showed
                // up in profiles as a chain of reallocations.
                let size = inner.entry_prefix.len() + key.route().len() + 80;
                if let Some(known) = t.tracker.known() {
                    let mut get = redis::Cmd::with_capacity(2, size);
                    get.arg("GET").arg(&entry_key);
                    let reply = c.req_packed_command(&get).await?;
                    if t.tracker.still(&known) {
                        return Ok(Read::Entry(reply, known.seq, known.purged));
                    }
                    // A record changed meanwhile: read them all (rare).
                }
                let mark = t.tracker.mark();
                let size = size + inner.seq_key.len() + inner.purged_key.len();
                let mut mget = redis::Cmd::with_capacity(4, size);
                mget.arg("MGET")
                    .arg(&entry_key)
                    .arg(&inner.seq_key)
                    .arg(&inner.purged_key);
                let reply = c.req_packed_command(&mget).await?;
                Ok(Read::All(reply, t.tracker, mark))
            })
            .await?;
        match read {
            Read::Entry(reply, fence, purged) => Ok(Lookup {
                value: bulk(Some(reply))?.map(Bytes::from),
                fence,
                purged,
            }),
            Read::All(reply, tracker, mark) => {
                let redis::Value::Array(mut items) = reply else {
                    return Err(unexpected_reply(reply));
                };
                if items.len() != 3 {
                    return Err(unexpected_reply(redis::Value::Array(items)));
                }
                let purged = parse_seq(bulk(items.pop())?);
                let fence = parse_seq(bulk(items.pop())?);
                let value = bulk(items.pop())?;
                tracker.arm(mark, fence, purged);
                Ok(Lookup {
                    value: value.map(Bytes::from),
                    fence,
                    purged,
                })
            }
        }
    }

    /// Queued for the batch writer, which sends whatever fills are waiting as one script
    /// call; the future ends when the store has answered for this one.
    async fn fill(&self, fill: Fill) -> Result<FillOutcome, StoreError> {
        let (done, answer) = oneshot::channel();
        self.enqueue(fill, Reply::Waiting(done));
        answer.await.unwrap_or(Err(StoreError::Timeout))
    }

    /// Queued for the batch writer, whose task reports the outcome: no task of its own.
    fn fill_in_background(&self, fill: Fill, done: FillDone) {
        self.enqueue(fill, Reply::Call(done));
    }

    async fn remove(&self, key: &EntryKey) -> Result<bool, StoreError> {
        let entry_key = self.entry_key(key);
        let n: i64 = self
            .run(|mut c| async move { redis::cmd("DEL").arg(&entry_key).query_async(&mut c).await })
            .await?;
        Ok(n > 0)
    }

    async fn invalidate(&self, tags: &[String]) -> Result<Invalidation, StoreError> {
        let mut invocation = INVALIDATE.prepare_invoke();
        invocation.key(&self.inner.seq_key);
        for tag in tags {
            let (index, cleared) = self.tag_keys(tag);
            invocation.key(index).key(cleared);
        }
        invocation
            .arg(&self.inner.channel)
            .arg(FENCE_WINDOW.as_millis() as u64);
        for tag in tags {
            invocation.arg(tag);
        }
        let (seq, removed): (u64, u64) = self
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        Ok(Invalidation { seq, removed })
    }

    async fn try_lease(&self, key: &EntryKey, ttl: Duration) -> Result<Option<u64>, StoreError> {
        let lease_key = self.lease_key(key);
        let token = lease_token();
        let ttl_ms = ttl.as_millis().clamp(1, u128::from(u64::MAX)) as u64;
        let set: Option<String> = self
            .run(|mut c| async move {
                redis::cmd("SET")
                    .arg(&lease_key)
                    .arg(token)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(set.map(|_| token))
    }

    async fn release_lease(&self, key: &EntryKey, token: u64) -> Result<(), StoreError> {
        let mut invocation = RELEASE_LEASE.prepare_invoke();
        invocation.key(self.lease_key(key)).arg(token);
        let _: i64 = self
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        Ok(())
    }

    async fn purge(&self) -> Result<u64, StoreError> {
        let mut invocation = PURGE.prepare_invoke();
        invocation
            .key(&self.inner.seq_key)
            .key(&self.inner.purged_key)
            .arg(&self.inner.channel);
        self.run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact("redis://u:pw@h"), "redis://u:***@h");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    }

    #[test]
    fn bad_configuration_is_explained() {
        let e = ValkeyStore::builder().url("nonsense").build().unwrap_err();
        assert!(e.to_string().contains("redis://"), "{e}");
        let e = ValkeyStore::builder()
            .url("redis://127.0.0.1")
            .namespace("bad space")
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("namespace"), "{e}");
    }

    #[test]
    fn builds_outside_a_runtime() {
        // Stores are often built in a sync `main` before the runtime starts.
        let store = ValkeyStore::new("redis://127.0.0.1:1").unwrap();
        assert_eq!(store.url(), "redis://127.0.0.1:1");
    }

    #[test]
    fn lenient_sequence() {
        assert_eq!(parse_seq(Some(b"17".to_vec())), 17);
        assert_eq!(parse_seq(Some(b"x".to_vec())), 0);
        assert_eq!(parse_seq(None), 0);
    }
}
