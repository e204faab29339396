//! Valkey Cluster: the store on a real 3-master cluster.

mod support;

use std::time::Instant;

use support::cluster::Cluster;
use support::Kind;

#[test]
fn a_cluster_forms() {
    let start = Instant::now();
    let c = Cluster::start(Kind::Valkey, 3, 0);
    eprintln!("formed in {:?}", start.elapsed());
    let slots = c.masters[1].query(&["CLUSTER", "SLOTS"]);
    eprintln!("{slots}");
}
