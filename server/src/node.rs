//! What every actor and data-path task of one relay node shares: its configuration, the
//! router's lookup tables, the lease allocator, the network actors, the relay-wide
//! budget of held bytes and the counters of what was refused or cut.

use std::sync::Arc;

use actix::{Actor, Addr};
use dashmap::DashMap;

use crate::allocator::VipAllocatorActor;
use crate::config::RelayConfig;
use crate::counters::{Counters, Reason};
use crate::holds::HoldBudget;
use crate::network::NetworkActor;
use crate::router::Router;
use crate::store::{Network, NetworkId};

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
    networks: DashMap<NetworkId, Addr<NetworkActor>>,
}

impl Node {
    /// A node with empty tables.
    pub fn new(config: RelayConfig, allocator: Addr<VipAllocatorActor>, counters: Arc<Counters>) -> Self {
        let holds = Arc::new(HoldBudget::new(config.limits.max_held_bytes));
        Self { config, router: Router::default(), allocator, holds, counters, networks: DashMap::new() }
    }

    /// The actor of `network`, started on first use. Call on the relay's arbiter.
    pub fn network(self: &Arc<Self>, network: &Network) -> Addr<NetworkActor> {
        self.networks
            .entry(network.id)
            .or_insert_with(|| NetworkActor::new(network.clone(), self.clone()).start())
            .clone()
    }

    /// Counts one occurrence of `reason`.
    pub fn count(&self, reason: Reason) {
        self.counters.add(reason);
    }
}
