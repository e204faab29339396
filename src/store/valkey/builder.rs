//! Configuring a [`ValkeyStore`]: the URL (or the environment), the namespace and the bounds.

use std::sync::atomic::{AtomicU8, AtomicUsize};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use bb8_redis::redis::{self, ConnectionAddr, IntoConnectionInfo, RedisError};

use super::connection::{Node, NodeSettings};
use super::{ValkeyInner, ValkeyStore, DEFAULT_OPERATION_TIMEOUT, SCHEMA};
use crate::error::ConfigError;
use crate::store::records::DEFAULT_MAX_RECORDS;

/// Configures a [`ValkeyStore`].
#[derive(Clone)]
#[must_use]
pub struct ValkeyStoreBuilder {
    url: Option<String>,
    namespace: String,
    operation_timeout: Duration,
    connect_timeout: Duration,
    pool_size: u32,
    client_tracking: bool,
    max_clear_records: usize,
    wait_for_replicas: Option<(u32, Duration)>,
    seeds: Vec<String>,
}

/// Shown with passwords redacted.
impl std::fmt::Debug for ValkeyStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValkeyStoreBuilder")
            .field("url", &self.url.as_deref().map(redact))
            .field("namespace", &self.namespace)
            .field("operation_timeout", &self.operation_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("pool_size", &self.pool_size)
            .field("client_tracking", &self.client_tracking)
            .field("max_clear_records", &self.max_clear_records)
            .field("wait_for_replicas", &self.wait_for_replicas)
            .field(
                "cluster_seeds",
                &self.seeds.iter().map(|u| redact(u)).collect::<Vec<_>>(),
            )
            .finish()
    }
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
            max_clear_records: DEFAULT_MAX_RECORDS,
            wait_for_replicas: None,
            seeds: Vec::new(),
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

    /// Whether lookups keep the clear records on this side (default on): the data
    /// connection speaks RESP3 and has the server announce changes to the record set
    /// (`CLIENT TRACKING ON BCAST`), so a hit is a plain `GET` instead of a `GET` and a
    /// script call, exactly as coherent. A server or proxy that refuses RESP3 (`HELLO 3`) or
    /// `CLIENT TRACKING` is detected and served with the script call on every lookup (a
    /// warning is logged); turning this off skips the attempt.
    pub fn client_tracking(mut self, on: bool) -> Self {
        self.client_tracking = on;
        self
    }

    /// The most tag clear records the namespace keeps (default 16,384; give every instance
    /// the same). Beyond it a clear drops the oldest and raises the floor to them: entries
    /// filled before then read as misses. Each record costs about 60 bytes in Valkey and in
    /// every connection's mirror; clears that outrun the bound cost hit rate, never
    /// correctness.
    pub fn max_clear_records(mut self, max: usize) -> Self {
        self.max_clear_records = max.max(1);
        self
    }

    /// Makes a clear wait until `replicas` replicas of each master it wrote have it (`WAIT`),
    /// at most `timeout` (default: off). Replication is asynchronous: a master that fails
    /// right after a clear may hand over to a replica that never got it. With this set, a
    /// clear counts as done only once the replicas have it, so a failover cannot lose it;
    /// a clear they do not confirm in time is treated as failed: the layer defers it and
    /// passes the store by until it lands (see the crate docs, "What the store may drop").
    /// A master is waited on for the replicas it has had attached (`ROLE`) within the last
    /// minute, up to `replicas`: one that had none (say just after a failover) has nobody a
    /// later failover could promote, while a replica whose link just went down is still
    /// waited for (its clears are deferred until it is back, or a minute has passed).
    /// Each clear then holds a pooled connection of each master for the replicas' answer,
    /// never the connection lookups share.
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait_for_replicas = (replicas > 0).then_some((replicas, timeout));
        self
    }

    /// Other nodes of the same cluster (URLs like [`url`](Self::url)'s), asked for the
    /// cluster's map beside the URL's node: when that one is down at start (or when the map
    /// is read again), any of them will do. Ignored for a single server.
    pub fn cluster_seeds<I, U>(mut self, urls: I) -> Self
    where
        I: IntoIterator<Item = U>,
        U: Into<String>,
    {
        self.seeds = urls.into_iter().map(Into::into).collect();
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
        let records_key = format!("{ns}:{SCHEMA}:r");
        let info = url.as_str().into_connection_info().map_err(bad_url)?;
        let settings = NodeSettings {
            tracking: self.client_tracking.then(|| records_key.clone()),
            max_records: self.max_clear_records,
            operation_timeout: self.operation_timeout,
            wait: self.wait_for_replicas.map(|(_, wait)| wait),
            pool_size: self.pool_size,
            connect_timeout: self.connect_timeout,
        };
        let seed = Node::open(
            info.clone(),
            &settings,
            addr_of(&info),
            Some(0),
            display_url.clone(),
        )
        .map_err(bad_url)?;
        let mut seeds = Vec::with_capacity(self.seeds.len());
        for url in &self.seeds {
            let shown = redact(url);
            let bad_seed = |e: RedisError| {
                ConfigError::new(format!(
                    "cannot use `{shown}` as a cluster seed ({e}); expected redis://[:password@]host[:port]"
                ))
            };
            let info = url.as_str().into_connection_info().map_err(bad_seed)?;
            let node = Node::open(info.clone(), &settings, addr_of(&info), None, shown.clone())
                .map_err(bad_seed)?;
            seeds.push(Arc::new(node));
        }
        let client = redis::Client::open(info.clone()).map_err(bad_url)?;
        let chunk_keys = super::cluster::chunk_keys(&records_key);
        Ok(ValkeyStore {
            inner: Arc::new(ValkeyInner {
                seed: Arc::new(seed),
                seeds,
                settings,
                info,
                mode: AtomicU8::new(super::topology::UNKNOWN),
                map: RwLock::new(None),
                refreshing: tokio::sync::Mutex::new(()),
                chunk_slots: chunk_keys
                    .iter()
                    .map(|k| super::cluster::slot(k.as_bytes()))
                    .collect(),
                chunk_keys,
                connect_timeout: self.connect_timeout,
                client,
                notices: std::sync::Mutex::new(None),
                fills: std::sync::Mutex::new(None),
                queued_bytes: AtomicUsize::new(0),
                started: OnceLock::new(),
                entry_prefix: format!("{ns}:{SCHEMA}:e:"),
                lease_prefix: format!("{ns}:{SCHEMA}:l:"),
                records_key,
                hot_key: format!("{ns}:{SCHEMA}:h"),
                high_water: (0..super::cluster::CHUNKS)
                    .map(|_| std::sync::Mutex::new(crate::store::Fence::default()))
                    .collect(),
                channel: format!("{ns}:{SCHEMA}:inv"),
                max_clear_records: self.max_clear_records,
                wait_for_replicas: self.wait_for_replicas,
                operation_timeout: self.operation_timeout,
                display_url,
            }),
        })
    }
}

/// A URL's host and port (empty for a Unix socket).
fn addr_of(info: &redis::ConnectionInfo) -> (String, u16) {
    match info.addr() {
        ConnectionAddr::Tcp(host, port) => (host.clone(), *port),
        ConnectionAddr::TcpTls { host, port, .. } => (host.clone(), *port),
        _ => (String::new(), 0),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        let shown = format!(
            "{:?}",
            ValkeyStore::builder()
                .url("redis://:pw1@h:1")
                .cluster_seeds(["redis://u:pw2@h:2"])
        );
        assert!(!shown.contains("pw1") && !shown.contains("pw2"), "{shown}");
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
}
