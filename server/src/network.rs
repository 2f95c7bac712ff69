//! `NetworkActor`: one per virtual network. It decides membership — who holds which VIP
//! right now — so joins, replacements and departures of one network are serialized:
//! when the same identity and instance join again, it is here that the older session is
//! told to go. It writes the router's routes; the data path (broadcast fan-out included)
//! only reads them. With federation it will also own the network's broadcast sequence
//! numbers and the routes it announces to peers.

use std::net::Ipv4Addr;
use std::sync::Arc;

use actix::prelude::*;

use crate::cluster::{Holder, LocalAttach, LocalDetach};
use crate::node::Node;
use crate::router::{LocalSession, SessionId};
use crate::session::{Replace, ReplaceReason};
use crate::store::Network;
use overlan_shared::route::NetKey;

/// Membership of one virtual network. The members themselves are the router's routes
/// of this network (one table, read by the data path); only this actor writes them.
pub struct NetworkActor {
    network: Network,
    node: Arc<Node>,
}

impl NetworkActor {
    /// The actor of `network`.
    pub fn new(network: Network, node: Arc<Node>) -> Self {
        Self { network, node }
    }

    fn id(&self) -> NetKey {
        self.network.key
    }
}

impl Actor for NetworkActor {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        tracing::debug!(network = %self.network.name, subnet = %self.network.subnet, "network active");
    }
}

/// A session takes its VIP; a session already holding it is replaced. Answered once the
/// VIP routes to the new session and, in a cluster, once the route table has stamped it:
/// the client learns its lease only then, so a join elsewhere with that lease is always
/// the newer of the two (were the stamp taken later, the older session would win).
#[derive(Message)]
#[rtype(result = "()")]
pub struct JoinNetwork {
    /// The VIP.
    pub vip: Ipv4Addr,
    /// The session.
    pub session: LocalSession,
    /// Whose session it is.
    pub holder: Holder,
    /// The lease proof of a VIP outside this node's slot.
    pub proof: Option<String>,
}

impl Handler<JoinNetwork> for NetworkActor {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, msg: JoinNetwork, _ctx: &mut Self::Context) -> Self::Result {
        let session = msg.session.id;
        if let Some(old) = self.node.router.attach_session(self.id(), msg.vip, msg.session) {
            tracing::info!(network = %self.network.name, vip = %msg.vip, old = old.id, "replacing the older session");
            old.addr.do_send(Replace { why: ReplaceReason::Newer });
        }
        let stamped = self.node.cluster_actor().map(|cluster| {
            cluster.send(LocalAttach { net: self.id(), vip: msg.vip, proof: msg.proof, session, holder: msg.holder })
        });
        Box::pin(async move {
            if let Some(stamped) = stamped {
                let _ = stamped.await;
            }
        })
    }
}

/// A session gives its VIP up (it ended). Ignored if a newer session holds the VIP.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LeaveNetwork {
    /// The VIP.
    pub vip: Ipv4Addr,
    /// The session leaving.
    pub session: SessionId,
}

impl Handler<LeaveNetwork> for NetworkActor {
    type Result = ();
    fn handle(&mut self, msg: LeaveNetwork, _ctx: &mut Self::Context) {
        if self.node.router.detach_session(self.id(), msg.vip, msg.session) {
            if let Some(cluster) = self.node.cluster_actor() {
                cluster.do_send(LocalDetach { net: self.id(), vip: msg.vip });
            }
        }
    }
}
