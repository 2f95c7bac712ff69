//! What every actor and data-path task of one relay node shares: its configuration, the
//! router's lookup tables, the lease allocator, the network actors, the relay-wide
//! budget of held bytes, the counters of what was refused or cut, and — in a cluster —
//! its credentials, the cluster actor and the filter of broadcasts seen already.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use actix::{Actor, Addr};
use dashmap::DashMap;
use overlan_shared::cluster::NodeCredentials;
use overlan_shared::route::{BroadcastDedup, NetKey};

use crate::allocator::VipAllocatorActor;
use crate::cluster::ClusterActor;
use crate::config::RelayConfig;
use crate::counters::{Counters, Reason};
use crate::holds::HoldBudget;
use crate::network::NetworkActor;
use crate::router::Router;
use crate::store::Network;

/// A node's membership of a cluster.
pub struct ClusterNode {
    /// Its name, slot, certificate and the cluster CA.
    pub credentials: NodeCredentials,
    /// Drawn at start: tells this process from another one with the same credentials
    /// (sent in the link hello).
    pub incarnation: u64,
    actor: OnceLock<Addr<ClusterActor>>,
}

/// One relay node's shared state.
pub struct Node {
    /// The resolved configuration.
    pub config: RelayConfig,
    /// Lookup tables of the data path.
    pub router: Router,
    /// The lease database's actor.
    pub allocator: Addr<VipAllocatorActor>,
    /// Bytes held for stalled receivers, relay-wide.
    pub holds: Arc<HoldBudget>,
    /// What was refused, dropped or cut, by reason.
    pub counters: Arc<Counters>,
    /// Cluster membership; `None` for a standalone relay.
    pub cluster: Option<ClusterNode>,
    networks: DashMap<NetKey, Addr<NetworkActor>>,
    /// Every network this node knows, by cluster-wide id (refreshed from the database).
    known: DashMap<NetKey, Network>,
    dedup: Mutex<BroadcastDedup>,
    /// Cancelled when the relay shuts down (peer dialers stop).
    pub stopping: tokio_util::sync::CancellationToken,
    /// Refusals logged as warnings lately, by peer and reason ([`Node::warn_once`]).
    warned: Mutex<HashMap<String, std::time::Instant>>,
    /// Peer processes whose links are being set up.
    pub link_claims: crate::link::LinkClaims,
}

impl Node {
    /// A node with empty tables; `cluster` makes it a cluster node.
    pub fn new(
        config: RelayConfig,
        allocator: Addr<VipAllocatorActor>,
        counters: Arc<Counters>,
        cluster: Option<NodeCredentials>,
    ) -> Self {
        let holds = Arc::new(HoldBudget::new(config.limits.max_held_bytes));
        let slot = cluster.as_ref().map_or(0, |c| c.slot);
        Self {
            config,
            router: Router::new(slot),
            allocator,
            holds,
            counters,
            cluster: cluster.map(|credentials| ClusterNode {
                credentials,
                incarnation: crate::link::random_u64(),
                actor: OnceLock::new(),
            }),
            networks: DashMap::new(),
            known: DashMap::new(),
            dedup: Mutex::new(BroadcastDedup::default()),
            stopping: tokio_util::sync::CancellationToken::new(),
            warned: Mutex::new(HashMap::new()),
            link_claims: Default::default(),
        }
    }

    /// Starts the cluster actor of a cluster node. Call once, on the relay's arbiter.
    pub fn start_cluster(self: &Arc<Self>) {
        if let Some(cluster) = &self.cluster {
            let name = &cluster.credentials.name;
            let actor = ClusterActor::new(name, cluster.credentials.slot, self.clone()).start();
            let _ = cluster.actor.set(actor);
        }
    }

    /// The cluster actor, in a cluster.
    pub fn cluster_actor(&self) -> Option<&Addr<ClusterActor>> {
        self.cluster.as_ref().and_then(|c| c.actor.get())
    }

    /// The actor of `network`, started on first use. Call on the relay's arbiter.
    pub fn network(self: &Arc<Self>, network: &Network) -> Addr<NetworkActor> {
        self.known.entry(network.key).or_insert_with(|| network.clone());
        self.networks
            .entry(network.key)
            .or_insert_with(|| NetworkActor::new(network.clone(), self.clone()).start())
            .clone()
    }

    /// The network with cluster-wide id `key`, if this node knows it.
    pub fn network_by_key(&self, key: NetKey) -> Option<Network> {
        self.known.get(&key).map(|n| n.clone())
    }

    /// Records the networks in the database (networks added since start included).
    /// Returns whether one was new, and the networks removed since the last call (their
    /// sessions are to be ended).
    pub fn set_networks(&self, networks: Vec<Network>) -> (bool, Vec<Network>) {
        let mut new = false;
        let removed: Vec<Network> = self
            .known
            .iter()
            .filter(|k| !networks.iter().any(|n| n.key == *k.key()))
            .map(|k| k.value().clone())
            .collect();
        for gone in &removed {
            self.known.remove(&gone.key);
            self.networks.remove(&gone.key);
        }
        for network in networks {
            new |= self.known.insert(network.key, network).is_none();
        }
        (new, removed)
    }

    /// Whether broadcast `seq` of the node in slot `origin` is seen here for the first
    /// time.
    pub fn first_sight(&self, origin: u8, seq: u64) -> bool {
        self.dedup.lock().unwrap_or_else(|e| e.into_inner()).handle_broadcast(u64::from(origin), seq)
    }

    /// Forgets the broadcasts seen from the node in slot `origin` (its link came up: it
    /// may have restarted, numbering anew).
    pub fn forget_broadcasts_of(&self, origin: u8) {
        self.dedup.lock().unwrap_or_else(|e| e.into_inner()).forget(u64::from(origin));
    }

    /// Counts one occurrence of `reason`.
    pub fn count(&self, reason: Reason) {
        self.counters.add(reason);
    }

    /// Whether a refusal keyed `key` (who, and why) is to be logged as a warning now: once
    /// per [`REFUSAL_LOG_INTERVAL`], so a refused peer that keeps retrying makes one
    /// line, not one per try (the rest go to debug).
    pub fn warn_once(&self, key: String) -> bool {
        let mut warned = self.warned.lock().expect("warned lock");
        quiet_since(&mut warned, key, std::time::Instant::now())
    }
}

/// Whether `key` is to be logged at `now`: not if it was within the last
/// [`REFUSAL_LOG_INTERVAL`] (`warned`: when each key was last logged; more than 1,024
/// keys and those logged longer ago are forgotten).
fn quiet_since(warned: &mut HashMap<String, std::time::Instant>, key: String, now: std::time::Instant) -> bool {
    if warned.len() > 1024 {
        warned.retain(|_, at| now.duration_since(*at) < REFUSAL_LOG_INTERVAL);
    }
    match warned.get(&key) {
        Some(at) if now.duration_since(*at) < REFUSAL_LOG_INTERVAL => false,
        _ => {
            warned.insert(key, now);
            true
        }
    }
}

/// How long a refusal logged as a warning stays quiet for the same peer and reason.
const REFUSAL_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_refusal_is_warned_of_once_per_interval_per_peer_and_reason() {
        let mut warned = HashMap::new();
        let start = Instant::now();
        assert!(quiet_since(&mut warned, "n9 foreign".into(), start));
        assert!(!quiet_since(&mut warned, "n9 foreign".into(), start + Duration::from_secs(1)), "retries are quiet");
        assert!(quiet_since(&mut warned, "n8 foreign".into(), start + Duration::from_secs(1)), "another peer");
        assert!(quiet_since(&mut warned, "n9 twice".into(), start + Duration::from_secs(1)), "another reason");
        assert!(!quiet_since(&mut warned, "n9 foreign".into(), start + REFUSAL_LOG_INTERVAL - Duration::from_secs(1)));
        assert!(quiet_since(&mut warned, "n9 foreign".into(), start + REFUSAL_LOG_INTERVAL), "said again after it");
        // Many peers: the old entries go, the map stays small.
        let later = start + 3 * REFUSAL_LOG_INTERVAL;
        for i in 0..2000 {
            quiet_since(&mut warned, format!("peer{i}"), later);
        }
        quiet_since(&mut warned, "one more".into(), later + REFUSAL_LOG_INTERVAL);
        assert!(warned.len() <= 1025, "{}", warned.len());
    }
}
