//! `ClusterActor`: one per cluster node, the shell around its route table
//! ([`overlan_shared::route::RouteTable`]). Network actors tell it which VIPs sessions
//! here hold; peer-link actors tell it of links that come and go and of the route
//! updates peers send, which it checks first (route-origin validation: a node announces
//! only VIPs of its own slot). It carries out what the table decides: the router's
//! peer routes are rewritten, updates go out on the links, and a local session whose VIP
//! a fresher announcement placed on another node (the client roamed) is replaced.

use std::net::Ipv4Addr;
use std::sync::Arc;

use actix::prelude::*;
use overlan_shared::cluster::{in_slot, valid_node_name, verify_lease};
use overlan_shared::route::{
    Announce, Dropped, Hop, LinkId, NetKey, RouteOutput, RouteTable, RouteUpdate, MAX_ROUTES_PER_LINK,
};
use overlan_shared::wire::control::valid_instance;
use overlan_shared::wire::peer::{CatalogVoid, MAX_HOPS};

use crate::counters::Reason;
use crate::link::SendRoutes;
use crate::node::Node;
use crate::router::{Route, SessionId};
use crate::session::{Replace, ReplaceReason};
use std::collections::HashMap;

/// The route table's shell.
pub struct ClusterActor {
    table: RouteTable,
    node: Arc<Node>,
    /// Each link's peer and its slot (from its certificate).
    links: std::collections::HashMap<LinkId, (String, u8, Addr<crate::link::PeerLinkActor>)>,
    /// Announcements for networks this node does not know yet (the network was just
    /// added on another node; its catalog is on the way), checked again when it arrives.
    pending: HashMap<LinkId, HashMap<(NetKey, Ipv4Addr), Announce>>,
    /// The session each local VIP was attached by (so a stale verdict never replaces a
    /// newer session).
    attached: HashMap<(NetKey, Ipv4Addr), (SessionId, Holder)>,
    /// Released leases, as the catalog lists them: a proof of the VIP issued before
    /// this time (unix ms) proves nothing.
    voids: HashMap<(NetKey, Ipv4Addr), i64>,
}

/// Most announcements one link may have held for networks not known yet.
const MAX_PENDING_PER_LINK: usize = 25_000;
/// Longest lease proof accepted in an announcement (a claim, a signature and a
/// certificate: about 2 KiB as hex).
const MAX_PROOF: usize = 8 * 1024;
/// How far ahead of this node's clock an announcement's sequence number may be.
const MAX_SEQ_AHEAD_MS: u64 = 60_000;

/// Why an announcement was not taken.
enum Refusal {
    /// Its network is not known here (yet).
    UnknownNetwork,
    /// It failed route-origin validation.
    Invalid(String),
    /// Its lease proof is of another client than the one holding the VIP here.
    StaleProof(String),
}

impl ClusterActor {
    /// The actor of node `name` holding `slot`.
    pub fn new(name: &str, slot: u8, node: Arc<Node>) -> Self {
        Self {
            table: RouteTable::new(name, slot),
            node,
            links: Default::default(),
            pending: HashMap::new(),
            attached: HashMap::new(),
            voids: HashMap::new(),
        }
    }

    fn now_ms() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }

    /// Carries out what the table decided. Updates for one link go out together (a
    /// burst of changes makes few frames, not one per route).
    fn drive(&mut self) {
        let mut outgoing: HashMap<LinkId, Vec<RouteUpdate>> = HashMap::new();
        while let Some(out) = self.table.poll_output() {
            match out {
                RouteOutput::BestChanged { net, vip, best } => self.sync(net, vip, best),
                RouteOutput::SourcesChanged { net, vip, sources } => self.node.router.set_sources(net, vip, sources),
                RouteOutput::Superseded { net, vip, by } => {
                    // Only the session the table judged: a newer one may hold the VIP now.
                    let judged = self.attached.get(&(net, vip)).map(|(session, holder)| (*session, holder.digest()));
                    if let Some(Route::Local(session)) = self.node.router.route(net, vip) {
                        match judged {
                            Some((id, _)) if id != session.id => {}
                            None => {}
                            // Another client holds the VIP where it is announced: this
                            // session's lease was released (and the release missed here).
                            Some((_, mine)) if by.as_ref().is_some_and(|by| *by != mine) => {
                                tracing::info!(%vip, "another client holds the VIP on another node; ending the stale session here");
                                session.addr.do_send(Replace { why: ReplaceReason::Taken });
                            }
                            Some(_) => {
                                tracing::info!(%vip, "the client joined another node; replacing its session here");
                                session.addr.do_send(Replace { why: ReplaceReason::Newer });
                            }
                        }
                    }
                }
                RouteOutput::Send { link, updates } => outgoing.entry(link).or_default().extend(updates),
            }
        }
        for (link, updates) in outgoing {
            if let Some((_, _, addr)) = self.links.get(&link) {
                addr.do_send(SendRoutes { updates });
            }
        }
    }

    /// Makes the router's entry of `vip` say what the table says (local entries are the
    /// network actors' to write).
    fn sync(&self, net: NetKey, vip: Ipv4Addr, best: Option<Hop>) {
        match best {
            Some(Hop::Peer(link)) => self.node.router.set_peer_route(net, vip, Some(link)),
            Some(Hop::Local) => {}
            None => self.node.router.set_peer_route(net, vip, None),
        }
    }

    /// Whether the peer on `link` may announce `a`: the origin's slot must be the one
    /// its certificate names when the origin is the peer itself, and the VIP must lie in
    /// the origin's slot of a network this node knows.
    fn check(&self, link: LinkId, a: &Announce) -> Result<(), Refusal> {
        self.check_origin(link, a).map_err(Refusal::Invalid)?;
        let Some(network) = self.node.network_by_key(a.net) else { return Err(Refusal::UnknownNetwork) };
        self.check_vip(&network, a)
    }

    fn check_origin(&self, link: LinkId, a: &Announce) -> Result<(), String> {
        let Some((peer, peer_slot, _)) = self.links.get(&link) else { return Err("unknown link".into()) };
        if a.seq > Self::now_ms() + MAX_SEQ_AHEAD_MS {
            return Err(format!("sequence number {} is in the future", a.seq));
        }
        if a.proof.as_ref().is_some_and(|p| p.len() > MAX_PROOF) {
            return Err("lease proof too long".into());
        }
        if a.path.len() > usize::from(MAX_HOPS) || !a.path.iter().all(|n| valid_node_name(n)) {
            return Err(format!("a path of {} nodes, or with a name no node can have", a.path.len()));
        }
        if a.name.as_deref().is_some_and(|name| !valid_instance(name)) {
            return Err("a holder's name no instance can have".into());
        }
        // A slot belongs to one node: this node's own, and those of the peers whose
        // certificates it has seen, are known. (A roamed client's VIP lies outside its
        // origin's slot, but the origin still announces its own slot: a proof changes
        // nothing here.)
        let me = self.table.me();
        if a.origin_slot == self.node.router.slot() && a.origin() != me {
            return Err(format!("origin {} claims this node's slot {}", a.origin(), a.origin_slot));
        }
        if let Some((name, _, _)) = self.links.values().find(|(_, slot, _)| *slot == a.origin_slot) {
            if name != a.origin() {
                return Err(format!("origin {} claims slot {}, which is {name}'s", a.origin(), a.origin_slot));
            }
        }
        if a.origin() == peer && a.origin_slot != *peer_slot {
            return Err(format!("{peer} claims slot {} but its certificate says {peer_slot}", a.origin_slot));
        }
        if let Some((_, slot, _)) = self.links.values().find(|(name, _, _)| name == a.origin()) {
            if *slot != a.origin_slot {
                return Err(format!("origin {} claimed with slot {} but holds {slot}", a.origin(), a.origin_slot));
            }
        }
        Ok(())
    }

    /// Whether a release of `vip` voided proofs issued at `issued`.
    fn voided(&self, net: NetKey, vip: Ipv4Addr, issued: i64) -> bool {
        self.voids.get(&(net, vip)).is_some_and(|before| issued < *before)
    }

    fn check_vip(&self, network: &crate::store::Network, a: &Announce) -> Result<(), Refusal> {
        // Outside the origin's slot: only a client that roamed there, with its lease. A
        // proof that comes along is checked wherever the VIP lies.
        let in_own_slot = in_slot(network.subnet, a.origin_slot, a.vip);
        let outside = || {
            let place = if in_own_slot { "in" } else { "not in" };
            format!("{} is {place} slot {} of network {} ({})", a.vip, a.origin_slot, network.name, network.subnet)
        };
        let Some(proof) = &a.proof else {
            return match in_own_slot {
                true => Ok(()),
                false => Err(Refusal::Invalid(format!("{} and comes with no lease proof", outside()))),
            };
        };
        let ca = &self.node.cluster.as_ref().expect("a cluster actor runs on a cluster node").credentials.ca;
        let (claim, issuer) = verify_lease(proof, ca).map_err(|e| Refusal::Invalid(format!("{}: {e}", outside())))?;
        if claim.vip != a.vip || NetKey::of(&claim.network) != a.net || !in_slot(network.subnet, issuer.slot, a.vip) {
            return Err(Refusal::Invalid(format!(
                "{} and its lease proof is for another VIP, network or slot",
                outside()
            )));
        }
        if a.name.as_ref().is_some_and(|name| *name != claim.instance) {
            return Err(Refusal::Invalid(format!("{} and its holder is named unlike its lease proof's", outside())));
        }
        // A client holds the VIP here: a proof of another client's (a lease given up
        // and since given to this one) cannot take it; the same client roaming can.
        if let Some((_, holder)) = self.attached.get(&(a.net, a.vip)) {
            if claim.identity != holder.identity || claim.instance != holder.instance {
                return Err(Refusal::StaleProof(format!(
                    "{} is held here by another client; its lease proof is stale",
                    a.vip
                )));
            }
        }
        // (After the check above: a node that missed a release is answered with the
        // holder here, which ends its stale session.)
        if self.voided(a.net, a.vip, claim.issued) {
            return Err(Refusal::Invalid(format!(
                "{} and its lease was released after the proof was issued",
                outside()
            )));
        }
        Ok(())
    }
}

impl Actor for ClusterActor {
    type Context = Context<Self>;
}

/// A session here took `vip`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LocalAttach {
    /// Network.
    pub net: NetKey,
    /// The VIP.
    pub vip: Ipv4Addr,
    /// Its lease proof, if it lies outside this node's slot.
    pub proof: Option<String>,
    /// The session that took it.
    pub session: SessionId,
    /// Whose session it is.
    pub holder: Holder,
}

/// The client holding a VIP: its identity (SPKI SHA-256, hex) and instance name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Identity, hex.
    pub identity: String,
    /// Instance name.
    pub instance: String,
}

impl Holder {
    /// What route announcements say of the holder: a digest of identity and instance
    /// (enough to tell one client from another, naming neither).
    pub fn digest(&self) -> String {
        let text = format!("{}/{}", self.identity, self.instance);
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        hex::encode(&digest.as_ref()[..8])
    }
}

impl Handler<LocalAttach> for ClusterActor {
    type Result = ();
    fn handle(&mut self, msg: LocalAttach, _ctx: &mut Self::Context) {
        self.attached.insert((msg.net, msg.vip), (msg.session, msg.holder.clone()));
        let (digest, name) = (msg.holder.digest(), msg.holder.instance.clone());
        self.table.handle_local_attach(msg.net, msg.vip, msg.proof, Some(digest), Some(name), Self::now_ms());
        self.drive();
    }
}

/// The session here holding `vip` is gone.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LocalDetach {
    /// Network.
    pub net: NetKey,
    /// The VIP.
    pub vip: Ipv4Addr,
}

impl Handler<LocalDetach> for ClusterActor {
    type Result = ();
    fn handle(&mut self, msg: LocalDetach, _ctx: &mut Self::Context) {
        self.attached.remove(&(msg.net, msg.vip));
        self.table.handle_local_detach(msg.net, msg.vip);
        self.drive();
        // The route may have pointed at a peer all along (a roamed client's old session
        // here just ended): the router's entry was the local one until now.
        let best = self.table.best(msg.net, msg.vip);
        self.sync(msg.net, msg.vip, best);
    }
}

/// A link came up.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LinkUp {
    /// The link.
    pub link: LinkId,
    /// The peer node.
    pub peer: String,
    /// Its slot.
    pub slot: u8,
    /// The link actor.
    pub addr: Addr<crate::link::PeerLinkActor>,
}

impl Handler<LinkUp> for ClusterActor {
    type Result = ();
    fn handle(&mut self, msg: LinkUp, _ctx: &mut Self::Context) {
        self.node.forget_broadcasts_of(msg.slot);
        self.links.insert(msg.link, (msg.peer.clone(), msg.slot, msg.addr));
        self.table.handle_link_up(msg.link, msg.peer);
        self.drive();
    }
}

/// A link went down.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LinkDown {
    /// The link.
    pub link: LinkId,
}

impl Handler<LinkDown> for ClusterActor {
    type Result = ();
    fn handle(&mut self, msg: LinkDown, _ctx: &mut Self::Context) {
        self.links.remove(&msg.link);
        self.pending.remove(&msg.link);
        self.table.handle_link_down(msg.link);
        self.drive();
    }
}

/// A peer sent route updates.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RoutesReceived {
    /// The link they came on.
    pub link: LinkId,
    /// The updates.
    pub updates: Vec<RouteUpdate>,
}

impl Handler<RoutesReceived> for ClusterActor {
    type Result = ();
    fn handle(&mut self, msg: RoutesReceived, _ctx: &mut Self::Context) {
        let peer = self.links.get(&msg.link).map(|(name, _, _)| name.clone()).unwrap_or_default();
        let mut accepted = Vec::with_capacity(msg.updates.len());
        // One log line per batch, not per route: a lying peer must not flood the log.
        let mut rejected = 0;
        let mut first_why = None;
        let mut stale = Vec::new();
        let mut pending = self.pending.remove(&msg.link).unwrap_or_default();
        for update in msg.updates {
            if let RouteUpdate::Announce(a) = &update {
                // A newer word about the VIP from this link replaces one still waiting.
                pending.remove(&(a.net, a.vip));
                let why = match self.check(msg.link, a) {
                    Ok(()) => {
                        accepted.push(update);
                        continue;
                    }
                    Err(Refusal::UnknownNetwork) if pending.len() < MAX_PENDING_PER_LINK => {
                        tracing::debug!(%peer, vip = %a.vip, net = %a.net, "route for a network not known yet; held");
                        pending.insert((a.net, a.vip), a.clone());
                        continue;
                    }
                    Err(Refusal::UnknownNetwork) => format!("{}: too many routes held for unknown networks", a.vip),
                    Err(Refusal::Invalid(why)) => format!("{} (origin {}): {why}", a.vip, a.origin()),
                    Err(Refusal::StaleProof(why)) => {
                        // The cluster hears this node's holder again, fresher than the
                        // stale announcement: every node routes to it, and the node
                        // that took the stale proof ends that session.
                        stale.push((a.net, a.vip, a.seq));
                        format!("{} (origin {}): {why}", a.vip, a.origin())
                    }
                };
                rejected += 1;
                first_why.get_or_insert(why);
                continue;
            } else if let RouteUpdate::Withdraw { net, vip } = &update {
                pending.remove(&(*net, *vip));
            }
            accepted.push(update);
        }
        if !pending.is_empty() && self.links.contains_key(&msg.link) {
            self.pending.insert(msg.link, pending);
        }
        for (net, vip, above) in stale {
            self.table.handle_local_reassert(net, vip, above, Self::now_ms());
        }
        for (update, why) in self.table.handle_updates(msg.link, accepted) {
            if why == Dropped::TooMany {
                rejected += 1;
                first_why.get_or_insert(format!("the link holds {MAX_ROUTES_PER_LINK} routes already"));
            } else {
                tracing::debug!(%peer, ?update, ?why, "route update dropped");
            }
        }
        if rejected > 0 {
            self.node.counters.add_n(Reason::RouteRejected, rejected);
            let why = first_why.unwrap_or_default();
            tracing::warn!(%peer, rejected, first = %why, "dropping route announcements");
        }
        self.drive();
    }
}

/// Releases of leases the node learned (its catalog's: all of them the first time, then
/// those new whenever it changed). Routes already taken whose lease proof a release
/// voided are withdrawn: a peer that announced one before the release reached this node
/// (or that lies) cannot keep the VIP's traffic. A session here that holds its VIP by
/// such a proof (its client roamed here, and the lease was released meanwhile) is ended,
/// so this node stops announcing it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct VoidsChanged(pub Vec<CatalogVoid>);

impl Handler<VoidsChanged> for ClusterActor {
    type Result = ();
    fn handle(&mut self, msg: VoidsChanged, _ctx: &mut Self::Context) {
        let mut raised = Vec::new();
        for void in msg.0 {
            let key = (NetKey::of(&void.network), void.vip);
            if self.voids.get(&key).is_none_or(|before| *before < void.before) {
                self.voids.insert(key, void.before);
                raised.push(key);
            }
        }
        let ca = &self.node.cluster.as_ref().expect("a cluster actor runs on a cluster node").credentials.ca;
        let mut withdrawn = 0;
        for (net, vip) in raised {
            let stale: Vec<LinkId> = self
                .table
                .learned_proofs(net, vip)
                .into_iter()
                .filter(|(_, proof)| {
                    verify_lease(proof, ca).is_ok_and(|(claim, _)| self.voided(net, vip, claim.issued))
                })
                .map(|(link, _)| link)
                .collect();
            for link in stale {
                self.table.handle_updates(link, [RouteUpdate::Withdraw { net, vip }]);
                withdrawn += 1;
            }
            let local_void = self.table.local_proof(net, vip).is_some_and(|proof| {
                verify_lease(proof, ca).is_ok_and(|(claim, _)| self.voided(net, vip, claim.issued))
            });
            if let (true, Some((attached, _))) = (local_void, self.attached.get(&(net, vip))) {
                if let Some(Route::Local(session)) = self.node.router.route(net, vip) {
                    if session.id == *attached {
                        tracing::info!(%vip, "the lease of a session here was released; ending it");
                        session.addr.do_send(Replace { why: ReplaceReason::Released });
                    }
                }
            }
        }
        if withdrawn > 0 {
            tracing::info!(routes = withdrawn, "routes whose lease was released withdrawn");
            self.drive();
        }
    }
}

/// The instance names of the members of a network online, by VIP: on other nodes (as
/// their routes name them) and here (whether or not a lease names them still).
#[derive(Message)]
#[rtype(result = "HashMap<Ipv4Addr, String>")]
pub struct MemberNames(pub NetKey);

impl Handler<MemberNames> for ClusterActor {
    type Result = MessageResult<MemberNames>;
    fn handle(&mut self, msg: MemberNames, _ctx: &mut Self::Context) -> Self::Result {
        let mut names: HashMap<Ipv4Addr, String> =
            self.table.names_in(msg.0).into_iter().map(|(vip, name)| (vip, name.to_owned())).collect();
        for ((net, vip), (_, holder)) in &self.attached {
            if *net == msg.0 {
                names.insert(*vip, holder.instance.clone());
            }
        }
        MessageResult(names)
    }
}

/// The node learned networks it did not know: announcements held for them are checked
/// again.
#[derive(Message)]
#[rtype(result = "()")]
pub struct NetworksChanged;

impl Handler<NetworksChanged> for ClusterActor {
    type Result = ();
    fn handle(&mut self, _: NetworksChanged, ctx: &mut Self::Context) {
        let mut by_link: std::collections::HashMap<LinkId, Vec<RouteUpdate>> = Default::default();
        for (link, waiting) in &mut self.pending {
            let known: Vec<_> =
                waiting.keys().filter(|(net, _)| self.node.network_by_key(*net).is_some()).copied().collect();
            for key in known {
                let a = waiting.remove(&key).expect("listed above");
                by_link.entry(*link).or_default().push(RouteUpdate::Announce(a));
            }
        }
        for (link, updates) in by_link {
            self.handle(RoutesReceived { link, updates }, ctx);
        }
    }
}
