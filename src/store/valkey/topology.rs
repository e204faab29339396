//! One server or a cluster: found out on first contact (`CLUSTER SLOTS`), and on a cluster
//! the slot map, read again after a redirect, a lost node, and every second.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bb8_redis::redis::{self, aio::ConnectionLike, ConnectionAddr};

use super::cluster::{self, SlotMap};
use super::connection::Node;
use super::ValkeyStore;
use crate::error::StoreError;

/// Not known yet: the first operation finds out.
pub(super) const UNKNOWN: u8 = 0;
pub(super) const SINGLE: u8 = 1;
pub(super) const CLUSTER: u8 = 2;

impl ValkeyStore {
    /// `None` on a single server; the slot map on a cluster. Finds out on first use.
    pub(super) async fn topology(&self) -> Result<Option<Arc<SlotMap>>, StoreError> {
        match self.inner.mode.load(Ordering::Acquire) {
            SINGLE => Ok(None),
            CLUSTER => Ok(self.map()),
            // Bounded as one operation, waiting on another request's question included.
            _ => match Box::pin(tokio::time::timeout(
                self.inner.operation_timeout,
                self.detect(),
            ))
            .await
            {
                Ok(found) => found,
                Err(_) => Err(StoreError::Timeout),
            },
        }
    }

    fn uses_tls(&self) -> bool {
        matches!(self.inner.info.addr(), ConnectionAddr::TcpTls { .. })
    }

    /// Whether the store is known to talk to a cluster.
    pub(super) fn is_cluster(&self) -> bool {
        self.inner.mode.load(Ordering::Relaxed) == CLUSTER
    }

    pub(super) fn map(&self) -> Option<Arc<SlotMap>> {
        crate::lock::read(&self.inner.map).clone()
    }

    /// Asks the server the URL names whether it is part of a cluster, and if so which node
    /// serves which slots.
    async fn detect(&self) -> Result<Option<Arc<SlotMap>>, StoreError> {
        // One question at a time: the first requests of a busy app all arrive here.
        let _one = self.inner.refreshing.lock().await;
        match self.inner.mode.load(Ordering::Acquire) {
            SINGLE => return Ok(None),
            CLUSTER => return Ok(self.map()),
            _ => {}
        }
        // The URL's node and any other seeds, at once: the first to answer says.
        let seeds = std::iter::once(&self.inner.seed).chain(&self.inner.seeds);
        let asks = seeds.map(|node| {
            Box::pin(async move {
                let reply = self
                    .run_on(node, |mut t| async move {
                        t.conn
                            .req_packed_command(&redis::cmd("CLUSTER").arg("SLOTS").clone())
                            .await
                    })
                    .await?;
                Ok::<_, StoreError>((reply, node))
            })
        });
        let (reply, seed) = futures_util::future::select_ok(asks).await?.0;
        match reply {
            redis::Value::ServerError(e) => {
                let e = redis::RedisError::from(e);
                // A cluster always answers with its map. Only a passing state says nothing
                // (a node loading, busy with a script, between masters): ask again later.
                if matches!(
                    e.code(),
                    Some("LOADING" | "BUSY" | "MASTERDOWN" | "TRYAGAIN" | "CLUSTERDOWN")
                ) {
                    return Err(StoreError::Server(Box::new(e)));
                }
                if !cluster::not_a_cluster(&e) {
                    // A proxy, a server that does not know the command under this name, an
                    // ACL that forbids it: taken as one server, and said so.
                    tracing::warn!(
                        error = %e, url = %self.url(),
                        "CLUSTER SLOTS was refused; using the server as a single one. If it \
                         is part of a cluster, allow `cluster|slots` to this user: commands \
                         for other nodes' slots would fail (and the cache pass them through)"
                    );
                }
                self.inner.mode.store(SINGLE, Ordering::Release);
                Ok(None)
            }
            reply => {
                let Some(ranges) = cluster::parse_slots(reply, &seed.host, self.uses_tls()) else {
                    return Err(StoreError::Server(
                        "CLUSTER SLOTS answered something unreadable".into(),
                    ));
                };
                let map = Arc::new(self.build_map(&ranges, None));
                tracing::info!(
                    url = %self.url(), nodes = map.nodes.len(),
                    "the server is part of a cluster; routing by hash slot"
                );
                self.warn_homeless(&map);
                *crate::lock::write(&self.inner.map) = Some(map.clone());
                self.inner.mode.store(CLUSTER, Ordering::Release);
                Ok(Some(map))
            }
        }
    }

    fn build_map(&self, ranges: &[cluster::Range], old: Option<&SlotMap>) -> SlotMap {
        let generation = old.map_or(1, |m| m.generation + 1);
        SlotMap::build(
            ranges,
            &self.inner.chunk_slots,
            old,
            generation,
            |host, port, home| self.make_node(host, port, home),
        )
    }

    /// A node at `host:port`, reached with the seed URL's credentials and TLS settings.
    fn make_node(&self, host: &str, port: u16, home: Option<usize>) -> Option<Arc<Node>> {
        let info = self
            .inner
            .info
            .clone()
            .set_addr(node_addr(&self.inner.info, host, port));
        let node = Node::open(
            info,
            &self.inner.settings,
            (host.to_owned(), port),
            home,
            format!("{host}:{port}"),
        );
        match node {
            Ok(node) => Some(Arc::new(node)),
            Err(e) => {
                tracing::warn!(error = %e, %host, port, "cannot reach a cluster node at this address");
                None
            }
        }
    }

    fn warn_homeless(&self, map: &SlotMap) {
        for node in map.nodes.iter().filter(|n| n.home.is_none()) {
            tracing::warn!(
                node = %format!("{}:{}", node.host, node.port),
                "this cluster node holds none of the {} copies of the clear records; its \
                 entries are passed by (more masters than copies, or an uneven slot layout)",
                cluster::CHUNKS
            );
        }
    }

    /// The slot map, read again unless a newer one than `seen` is known already (someone
    /// else read it since). Concurrent callers share one reading; all of it is bounded by the
    /// operation timeout.
    pub(super) async fn refreshed_map(&self, seen: &SlotMap) -> Option<Arc<SlotMap>> {
        let bounded =
            tokio::time::timeout(self.inner.operation_timeout, self.refresh(seen.generation));
        let _ = Box::pin(bounded).await;
        self.map()
    }

    /// Reads the slot map from whichever node answers first, unless one newer than
    /// `generation` is known already.
    pub(super) async fn refresh(&self, generation: u64) {
        let _one = self.inner.refreshing.lock().await;
        let old = self.map();
        if old.as_ref().is_some_and(|m| m.generation > generation) {
            return; // read by someone else meanwhile
        }
        let mut candidates: Vec<Arc<Node>> = old.iter().flat_map(|m| m.nodes.clone()).collect();
        candidates.push(self.inner.seed.clone());
        candidates.extend(self.inner.seeds.iter().cloned());
        let asks = candidates.into_iter().map(|node| {
            Box::pin(async move {
                let reply = self
                    .run_on(&node, |mut t| async move {
                        t.conn
                            .req_packed_command(&redis::cmd("CLUSTER").arg("SLOTS").clone())
                            .await
                    })
                    .await?;
                match cluster::parse_slots(reply, &node.host, self.uses_tls()) {
                    // A node that has not joined (yet) knows no slots.
                    Some(ranges) if !ranges.is_empty() => Ok(ranges),
                    _ => Err(StoreError::Server("no usable CLUSTER SLOTS answer".into())),
                }
            })
        });
        let Ok((ranges, _)) = futures_util::future::select_ok(asks).await else {
            return;
        };
        let map = Arc::new(self.build_map(&ranges, old.as_deref()));
        let changed = old.as_ref().is_none_or(|o| {
            o.nodes.len() != map.nodes.len()
                || o.nodes
                    .iter()
                    .zip(&map.nodes)
                    .any(|(a, b)| !Arc::ptr_eq(a, b))
        });
        *crate::lock::write(&self.inner.map) = Some(map.clone());
        if changed {
            tracing::info!(nodes = map.nodes.len(), "the cluster's slot map changed");
            self.warn_homeless(&map);
            // A failover may have lost clears this store saw: check every copy now rather
            // than at the next tick.
            let store = self.clone();
            let check: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
                Box::pin(async move {
                    let _ = tokio::time::timeout(store.inner.connect_timeout, store.keep_copies())
                        .await;
                });
            tokio::spawn(check);
        }
    }

    /// A client for the pub/sub connection: the server the URL names, or on a cluster the
    /// `attempt`-th of its masters in turn.
    pub(super) fn pubsub_client(&self, attempt: usize) -> redis::Client {
        let Some(map) = self.map().filter(|m| !m.nodes.is_empty()) else {
            return self.inner.client.clone();
        };
        let node = &map.nodes[attempt % map.nodes.len()];
        let info =
            self.inner
                .info
                .clone()
                .set_addr(node_addr(&self.inner.info, &node.host, node.port));
        redis::Client::open(info).unwrap_or_else(|_| self.inner.client.clone())
    }

    /// A node's connection failed: on a cluster, the map may have changed (a failover).
    pub(super) fn lost_node(&self) {
        let Some(map) = self.map().filter(|_| self.is_cluster()) else {
            return;
        };
        // One reading under way serves every failure meanwhile: no task per failed request.
        if self.inner.refreshing.try_lock().is_err() {
            return;
        }
        let store = self.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { store.refreshed_map(&map).await });
        }
    }
}

/// The address of another node, with the seed's TLS settings.
fn node_addr(seed: &redis::ConnectionInfo, host: &str, port: u16) -> ConnectionAddr {
    match seed.addr() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host.to_owned(), port),
    }
}
