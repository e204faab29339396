//! A real Valkey (or Redis) Cluster on loopback: masters given slot ranges with
//! `CLUSTER ADDSLOTSRANGE`, joined with `CLUSTER MEET`, optionally one replica each
//! (`CLUSTER REPLICATE`). No `valkey-cli` needed. Every process stops with the value.

use std::time::{Duration, Instant};

use super::server::{free_port, Kind, Server};

pub struct Cluster {
    pub masters: Vec<Server>,
    pub replicas: Vec<Server>,
}

fn node(kind: Kind, node_timeout_ms: u32, password: Option<&str>) -> (Server, u16) {
    // Both ports are found free and let go: either may be taken before the node binds it.
    for _ in 0..5 {
        let bus = free_port();
        let mut args: Vec<String> = password
            .map(|p| vec!["--masterauth".to_owned(), p.to_owned()])
            .unwrap_or_default();
        args.extend(
            [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-port",
                &bus.to_string(),
                "--cluster-node-timeout",
                &node_timeout_ms.to_string(),
                // A replica may take over however far it lagged (the tests make it lag).
                "--cluster-replica-validity-factor",
                "0",
                // Slots whose master is down do not stop the rest of the cluster.
                "--cluster-require-full-coverage",
                "no",
            ]
            .map(str::to_owned),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if let Some(server) = Server::try_start_with(kind, password, &args) {
            return (server, bus);
        }
    }
    panic!("no cluster node started on 5 pairs of free ports");
}

impl Cluster {
    /// `masters` masters splitting the 16,384 slots evenly, and `replicas` replicas each.
    /// With replicas, a master is declared failed after 1 s (failover tests); without, after
    /// 5 s, so that a loaded CI machine never has nodes take each other for dead.
    pub fn start(kind: Kind, masters: usize, replicas: usize) -> Cluster {
        let ranges: Vec<Vec<(usize, usize)>> = (0..masters)
            .map(|i| vec![(i * 16384 / masters, (i + 1) * 16384 / masters - 1)])
            .collect();
        Self::start_with_slots(kind, &ranges, replicas)
    }

    /// Masters owning the given slot ranges (one list of inclusive ranges per master).
    pub fn start_with_slots(kind: Kind, slots: &[Vec<(usize, usize)>], replicas: usize) -> Cluster {
        Self::start_full(kind, slots, replicas, None)
    }

    /// Every node requiring `password` (and replicas authenticating with it).
    pub fn start_with_password(kind: Kind, masters: usize, password: &str) -> Cluster {
        let ranges: Vec<Vec<(usize, usize)>> = (0..masters)
            .map(|i| vec![(i * 16384 / masters, (i + 1) * 16384 / masters - 1)])
            .collect();
        Self::start_full(kind, &ranges, 0, Some(password))
    }

    fn start_full(
        kind: Kind,
        slots: &[Vec<(usize, usize)>],
        replicas: usize,
        password: Option<&str>,
    ) -> Cluster {
        let masters = slots.len();
        let timeout = if replicas > 0 { 1000 } else { 5000 };
        let m: Vec<(Server, u16)> = (0..masters)
            .map(|_| node(kind, timeout, password))
            .collect();
        let r: Vec<(Server, u16)> = (0..masters * replicas)
            .map(|_| node(kind, timeout, password))
            .collect();
        for ((s, _), ranges) in m.iter().zip(slots) {
            for &(first, last) in ranges {
                let ok = s.command(&[
                    "CLUSTER",
                    "ADDSLOTSRANGE",
                    &first.to_string(),
                    &last.to_string(),
                ]);
                assert_eq!(ok, "+OK", "ADDSLOTSRANGE on {}", s.port);
            }
        }
        let seed = &m[0].0;
        for (s, bus) in m.iter().skip(1).chain(&r) {
            let ok = seed.command(&[
                "CLUSTER",
                "MEET",
                "127.0.0.1",
                &s.port.to_string(),
                &bus.to_string(),
            ]);
            assert_eq!(ok, "+OK", "MEET {}", s.port);
        }
        let cluster = Cluster {
            masters: m.into_iter().map(|(s, _)| s).collect(),
            replicas: r.into_iter().map(|(s, _)| s).collect(),
        };
        let total = cluster.masters.len() + cluster.replicas.len();
        cluster.wait(|c| {
            c.all()
                .all(|s| info_field(s, "cluster_known_nodes") == total.to_string())
        });
        for (i, replica) in cluster.replicas.iter().enumerate() {
            let master = &cluster.masters[i / replicas.max(1)];
            let id = master.query(&["CLUSTER", "MYID"]);
            // The replica must know the master first; MEET has made that so.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let ok = replica.command(&["CLUSTER", "REPLICATE", &id]);
                if ok == "+OK" {
                    break;
                }
                assert!(Instant::now() < deadline, "REPLICATE: {ok}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cluster.wait(|c| c.is_ready());
        cluster
    }

    pub fn all(&self) -> impl Iterator<Item = &Server> {
        self.masters.iter().chain(&self.replicas)
    }

    /// Every node says the cluster is up and every replica has caught up with its master.
    fn is_ready(&self) -> bool {
        let up = self.all().all(|s| info_field(s, "cluster_state") == "ok");
        let synced = self.replicas.iter().all(|s| {
            let info = s.query(&["INFO", "replication"]);
            info.contains("master_link_status:up")
        });
        up && synced
    }

    pub fn wait(&self, ready: impl Fn(&Cluster) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready(self) {
            assert!(Instant::now() < deadline, "the cluster did not form");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The URL of one node (any: the store finds the others).
    pub fn url(&self) -> String {
        self.masters[0].url()
    }
}

/// A field of `CLUSTER INFO`.
pub fn info_field(s: &Server, field: &str) -> String {
    s.query(&["CLUSTER", "INFO"])
        .lines()
        .find_map(|l| l.trim().strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or("")
        .trim()
        .to_owned()
}
