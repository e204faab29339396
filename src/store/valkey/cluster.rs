//! Valkey Cluster: hash slots, the map of which node serves which, and where the clear
//! records live.
//!
//! The store routes every command itself, by its key's slot, to a connection of the node
//! that serves it; no command touches keys of two slots. Entries spread over every slot.
//! The clear records are kept in [`CHUNKS`] copies, one per slot range (each copy's key is
//! placed in its range by a hash tag), and a clear writes every copy (O(tags) each). A
//! lookup reads the copy its entry's node holds ("home" copy): the node's connection has
//! the server announce changes to it, and since the entry's `GET` travels on that same
//! connection, an announcement sent before the `GET` is answered arrives before the answer.
//! That is what makes a one-`GET` hit exactly as coherent as on one server. A node that
//! holds no copy (more masters than copies, or an uneven slot layout) has its lookups read
//! the records from the node that holds copy 0, beside the `GET` and after the lookup began.
//!
//! Writer and readers need not agree on the topology: every clear writes every copy, and a
//! copy that moves away from a node is deleted there, which its tracked connections hear.

use std::sync::Arc;

use bb8_redis::redis;

use super::connection::Node;

/// The cluster's hash slots.
pub(super) const SLOTS: usize = 16_384;

/// Copies of the clear records in a cluster, one at the start of each range of
/// `SLOTS / CHUNKS` slots. Every clear writes all of them; a cluster of up to this many
/// masters with even ranges has a copy on every master (others are served too, with a
/// second read: see the module docs).
pub(super) const CHUNKS: usize = 16;

/// CRC16 (XMODEM), as the cluster hashes keys.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of a key: the CRC of its hash tag (the text between its first `{` and the next
/// `}`, if not empty), else of the whole key.
pub(super) fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let len = rest.iter().position(|&b| b == b'}')?;
        (len > 0).then(|| &rest[..len])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS as u16
}

/// Per copy `n`, the `m` of its hash tag `cn.m`: the first whose slot is exactly
/// `n * SLOTS / CHUNKS`, the first slot of its range (checked by a test). So any split of
/// the slots into at most `CHUNKS` even ranges gives every master a copy.
const CHUNK_TAGS: [u32; CHUNKS] = [
    1760, 14579, 47824, 11281, 12077, 5135, 97, 341, 1941, 4188, 12614, 1669, 1686, 43872, 29387,
    11468,
];

/// The keys of the record copies: `{records key}:16:{cN.M}` (the number of copies is part
/// of the name: instances that disagree on it share no records rather than some).
pub(super) fn chunk_keys(records_key: &str) -> Vec<String> {
    CHUNK_TAGS
        .iter()
        .enumerate()
        .map(|(n, m)| format!("{records_key}:{CHUNKS}:{{c{n}.{m}}}"))
        .collect()
}

/// Which node serves each slot, and the nodes.
pub(super) struct SlotMap {
    /// Per slot, an index into `nodes` (`u16::MAX`: no node serves it).
    owner: Vec<u16>,
    pub(super) nodes: Vec<Arc<Node>>,
    /// Grows with every reading of the map: a caller that met a redirect under one map
    /// reads it again only if nobody has since.
    pub(super) generation: u64,
}

/// A node and the items (by index) it serves.
pub(super) type Group = (Arc<Node>, Vec<usize>);

/// One slot range of a `CLUSTER SLOTS` reply and its master's address.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Range {
    pub(super) first: u16,
    pub(super) last: u16,
    pub(super) host: String,
    pub(super) port: u16,
}

impl SlotMap {
    /// A map of `ranges`, reusing the nodes of `old` that serve the same address with the
    /// same home copy (their connections and what they know), making the others with
    /// `make(host, port, home)`.
    pub(super) fn build(
        ranges: &[Range],
        chunk_slots: &[u16],
        old: Option<&SlotMap>,
        generation: u64,
        mut make: impl FnMut(&str, u16, Option<usize>) -> Option<Arc<Node>>,
    ) -> SlotMap {
        let mut owner = vec![u16::MAX; SLOTS];
        let mut addrs: Vec<(&str, u16)> = Vec::new();
        for r in ranges {
            let at = match addrs.iter().position(|&(h, p)| h == r.host && p == r.port) {
                Some(i) => i,
                None => {
                    addrs.push((&r.host, r.port));
                    addrs.len() - 1
                }
            };
            for s in r.first..=r.last.min(SLOTS as u16 - 1) {
                owner[usize::from(s)] = at as u16;
            }
        }
        let mut nodes = Vec::with_capacity(addrs.len());
        let mut kept = vec![true; addrs.len()];
        for (i, &(host, port)) in addrs.iter().enumerate() {
            let holds = |c: usize| usize::from(owner[usize::from(chunk_slots[c])]) == i;
            // The copy a node read before, while it still holds it (a new home would read
            // every entry on the node as a miss); else the first it holds.
            let before = old
                .and_then(|m| m.nodes.iter().find(|n| n.host == host && n.port == port))
                .and_then(|n| n.home)
                .filter(|&c| c < chunk_slots.len() && holds(c));
            let home = before.or_else(|| (0..chunk_slots.len()).find(|&c| holds(c)));
            let reused = old.and_then(|m| {
                m.nodes
                    .iter()
                    .find(|n| n.host == host && n.port == port && n.home == home)
                    .cloned()
            });
            match reused.or_else(|| make(host, port, home)) {
                Some(node) => nodes.push(node),
                None => kept[i] = false,
            }
        }
        // Nodes that could not be made (a bad address) serve nothing.
        let mut index = Vec::with_capacity(addrs.len());
        let mut next = 0u16;
        for k in &kept {
            index.push(if *k { next } else { u16::MAX });
            next += u16::from(*k);
        }
        for o in owner.iter_mut().filter(|o| **o != u16::MAX) {
            *o = index[usize::from(*o)];
        }
        SlotMap {
            owner,
            nodes,
            generation,
        }
    }

    /// Items (by index, with their slots) grouped by the node serving them, in the order
    /// nodes first appear; and the items no node serves.
    pub(super) fn group(
        &self,
        items: impl IntoIterator<Item = (usize, u16)>,
    ) -> (Vec<Group>, Vec<usize>) {
        let (mut groups, mut unserved): (Vec<Group>, Vec<usize>) = (Vec::new(), Vec::new());
        for (item, slot) in items {
            let Some(node) = self.node(slot) else {
                unserved.push(item);
                continue;
            };
            match groups.iter_mut().find(|(n, _)| Arc::ptr_eq(n, node)) {
                Some((_, these)) => these.push(item),
                None => groups.push((node.clone(), vec![item])),
            }
        }
        (groups, unserved)
    }

    /// The node serving `slot`.
    pub(super) fn node(&self, slot: u16) -> Option<&Arc<Node>> {
        self.nodes
            .get(usize::from(*self.owner.get(usize::from(slot))?))
    }
}

/// Reads a `CLUSTER SLOTS` reply: `[[first, last, [endpoint, port, id, {metadata}],
/// replicas...], ...]`. The endpoint: empty or nil means the node the reply came from
/// (`from_host`); `?` means a hostname was wanted but none is set, so the metadata's `ip`.
/// With `prefer_hostname` (TLS, whose certificates name hosts) a `hostname` in the
/// metadata is used over an address.
pub(super) fn parse_slots(
    reply: redis::Value,
    from_host: &str,
    prefer_hostname: bool,
) -> Option<Vec<Range>> {
    let redis::Value::Array(items) = reply else {
        return None;
    };
    let mut ranges = Vec::with_capacity(items.len());
    for item in items {
        let redis::Value::Array(parts) = item else {
            return None;
        };
        let mut parts = parts.into_iter();
        let int = |v: Option<redis::Value>| match v? {
            redis::Value::Int(n) => u16::try_from(n).ok(),
            _ => None,
        };
        let first = int(parts.next())?;
        let last = int(parts.next())?;
        let Some(redis::Value::Array(master)) = parts.next() else {
            return None;
        };
        let mut master = master.into_iter();
        let endpoint = text(master.next()?).unwrap_or_default();
        let port = int(master.next())?;
        let _id = master.next();
        let meta = master.next().map(metadata).unwrap_or_default();
        let field = |name: &str| meta.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let host = match (prefer_hostname, field("hostname"), endpoint.as_str()) {
            (true, Some(name), _) if !name.is_empty() => name,
            (_, _, "") => from_host.to_owned(),
            (_, _, "?") => field("ip")
                .filter(|ip| !ip.is_empty())
                .unwrap_or_else(|| from_host.to_owned()),
            _ => endpoint,
        };
        ranges.push(Range {
            first,
            last,
            host,
            port,
        });
    }
    Some(ranges)
}

fn text(v: redis::Value) -> Option<String> {
    match v {
        redis::Value::BulkString(b) => String::from_utf8(b).ok(),
        redis::Value::SimpleString(s) => Some(s),
        redis::Value::VerbatimString { text, .. } => Some(text),
        _ => None,
    }
}

/// A node's metadata: a map over RESP3, a flat list of names and values over RESP2.
fn metadata(v: redis::Value) -> Vec<(String, String)> {
    match v {
        redis::Value::Map(pairs) => pairs
            .into_iter()
            .filter_map(|(k, v)| Some((text(k)?, text(v)?)))
            .collect(),
        redis::Value::Array(items) => {
            let mut items = items.into_iter();
            let mut out = Vec::new();
            while let (Some(k), Some(v)) = (items.next(), items.next()) {
                if let (Some(k), Some(v)) = (text(k), text(v)) {
                    out.push((k, v));
                }
            }
            out
        }
        _ => Vec::new(),
    }
}

/// Whether an error says the server is not part of a cluster.
pub(super) fn not_a_cluster(e: &redis::RedisError) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    text.contains("cluster support disabled")
        || text.contains("unknown command")
        || text.contains("cluster is disabled")
        || text.contains("cluster mode is not enabled")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_the_clusters() {
        // Reference values from the cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(
            slot(b"foo{}{bar}"),
            slot(b"bar"),
            "an empty tag hashes the whole key"
        );
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
    }

    #[test]
    fn servers_that_are_not_clusters_say_so() {
        let says = |text: &str| {
            not_a_cluster(&redis::RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
                "",
                text.to_owned(),
            )))
        };
        assert!(says("ERR This instance has cluster support disabled"));
        assert!(says(
            "ERR unknown command 'CLUSTER', with args beginning with: 'SLOTS'"
        ));
        assert!(says(
            "ERR Cluster is disabled. Enabled via passing --cluster_mode=emulated|yes"
        ));
        assert!(says("ERR Cluster mode is not enabled"));
        assert!(!says("ERR something else"));
    }

    #[test]
    fn each_copy_lies_in_its_range() {
        let keys = chunk_keys("tca:2:r");
        assert_eq!(keys.len(), CHUNKS);
        for (n, k) in keys.iter().enumerate() {
            assert!(k.starts_with("tca:2:r:16:{c"), "{k}");
            assert_eq!(usize::from(slot(k.as_bytes())), n * (SLOTS / CHUNKS), "{k}");
        }
        // Every even split into up to CHUNKS masters gives each master a copy.
        for masters in 1..=CHUNKS {
            for i in 0..masters {
                let (first, last) = (i * SLOTS / masters, (i + 1) * SLOTS / masters - 1);
                assert!(
                    keys.iter()
                        .any(|k| (first..=last).contains(&usize::from(slot(k.as_bytes())))),
                    "{masters} masters: none on {first}..={last}"
                );
            }
        }
    }

    #[test]
    fn reads_cluster_slots() {
        use redis::Value::{Array, BulkString, Int};
        let reply = Array(vec![
            Array(vec![
                Int(0),
                Int(5460),
                Array(vec![BulkString(b"10.0.0.1".to_vec()), Int(7000)]),
            ]),
            Array(vec![
                Int(5461),
                Int(16383),
                Array(vec![BulkString(Vec::new()), Int(7001)]),
                Array(vec![BulkString(b"10.0.0.3".to_vec()), Int(7002)]),
            ]),
        ]);
        let ranges = parse_slots(reply, "seed", false).unwrap();
        assert_eq!(ranges[0].host, "10.0.0.1");
        assert_eq!(ranges[1].host, "seed");
        assert_eq!(
            (ranges[1].first, ranges[1].last, ranges[1].port),
            (5461, 16383, 7001)
        );
        assert!(parse_slots(Int(3), "x", false).is_none());
        // `?`: a hostname was wanted and none is set; the metadata's ip. Over TLS, a
        // hostname in the metadata wins.
        let node = |endpoint: &[u8], meta: Vec<redis::Value>| {
            Array(vec![Array(vec![
                Int(0),
                Int(16383),
                Array(vec![
                    BulkString(endpoint.to_vec()),
                    Int(6379),
                    BulkString(b"id".to_vec()),
                    Array(meta),
                ]),
            ])])
        };
        let meta = || {
            vec![
                BulkString(b"ip".to_vec()),
                BulkString(b"10.0.0.9".to_vec()),
                BulkString(b"hostname".to_vec()),
                BulkString(b"cache-0.example".to_vec()),
            ]
        };
        let host = |reply, tls| parse_slots(reply, "seed", tls).unwrap()[0].host.clone();
        assert_eq!(host(node(b"?", meta()), false), "10.0.0.9");
        assert_eq!(host(node(b"10.0.0.9", meta()), true), "cache-0.example");
        assert_eq!(host(node(b"10.0.0.9", meta()), false), "10.0.0.9");
        assert_eq!(host(node(b"?", vec![]), false), "seed");
    }
}
