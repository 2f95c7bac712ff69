//! The router: where each VIP, listener, datagram port, socket pair and peer link lives.
//! Actors write it when they register and deregister; the data path only reads it (a
//! `DashMap` lookup, no guard held across an `.await`). Every forwarding decision — a
//! stream connect, a unicast datagram, a broadcast — starts with [`Router::route`], whose
//! answer is a local session or a peer link. Tables are keyed on cluster-wide network
//! ids ([`NetKey`]); session and socket ids are this node's own.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};

use actix::Addr;
use dashmap::DashMap;
use overlan_shared::route::{LinkId, NetKey, Sources};
use overlan_shared::wire::control::SocketId;

use crate::link::PeerLinkActor;
use crate::pair::SocketPairActor;
use crate::session::SessionActor;

/// Node-local session number (peer links get one too: a link is a party of the sockets
/// that cross it).
pub type SessionId = u64;

/// A session attached to this relay.
#[derive(Clone)]
pub struct LocalSession {
    /// Session number; entries are removed only by the session that made them.
    pub id: SessionId,
    /// The session actor.
    pub addr: Addr<SessionActor>,
    /// The session's QUIC connection (datagrams go straight to it).
    pub conn: quinn::Connection,
}

/// A live link to a peer node.
#[derive(Clone)]
pub struct PeerLink {
    /// The link's number.
    pub id: LinkId,
    /// Its session number, as a party of sockets.
    pub session: SessionId,
    /// The peer node's name (shared: a route lookup on the data path clones the link
    /// and must not allocate).
    pub node: std::sync::Arc<str>,
    /// The link actor.
    pub addr: Addr<PeerLinkActor>,
    /// The link's QUIC connection (datagrams and socket streams go straight to it).
    pub conn: quinn::Connection,
    /// The peer process's number from its hello.
    pub incarnation: u64,
}

/// Where a VIP lives.
#[derive(Clone)]
pub enum Route {
    /// A session on this relay.
    Local(LocalSession),
    /// Behind a peer link.
    Peer(PeerLink),
}

/// A bound datagram port.
#[derive(Clone)]
pub struct DatagramBinding {
    /// Owning session.
    pub session: SessionId,
    /// Its connection.
    pub conn: quinn::Connection,
}

/// What a route table entry holds: a local session, or the link number of a peer route.
#[derive(Clone)]
enum Entry {
    Local(LocalSession),
    Peer(LinkId),
}

/// Lookup tables shared by every actor and data-path task of a relay.
pub struct Router {
    next_session: AtomicU64,
    next_socket: AtomicU64,
    routes: DashMap<(NetKey, Ipv4Addr), Entry>,
    /// Remote VIPs: the links their traffic may come on, and their origin's slot.
    sources: DashMap<(NetKey, Ipv4Addr), Sources>,
    links: DashMap<LinkId, PeerLink>,
    listeners: DashMap<(NetKey, SocketAddrV4), LocalSession>,
    datagram_ports: DashMap<(NetKey, SocketAddrV4), DatagramBinding>,
    broadcast_groups: DashMap<(NetKey, u16), HashMap<Ipv4Addr, DatagramBinding>>,
    /// Sessions in TUN mode, by network: each takes every datagram to its VIP.
    tun: DashMap<NetKey, HashMap<Ipv4Addr, DatagramBinding>>,
    pairs: DashMap<SocketId, Addr<SocketPairActor>>,
    /// This node's slot (0 for a standalone relay).
    slot: u8,
    broadcast_seq: AtomicU64,
}

impl Router {
    /// Empty tables of a node holding `slot`.
    pub fn new(slot: u8) -> Self {
        // Broadcast numbers start at the clock (in microseconds), so a restarted node
        // numbers above what it sent before and peers' duplicate filters let it through.
        let start =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64);
        Self {
            next_session: AtomicU64::new(0),
            next_socket: AtomicU64::new(0),
            routes: DashMap::new(),
            sources: DashMap::new(),
            links: DashMap::new(),
            listeners: DashMap::new(),
            datagram_ports: DashMap::new(),
            broadcast_groups: DashMap::new(),
            tun: DashMap::new(),
            pairs: DashMap::new(),
            slot,
            broadcast_seq: AtomicU64::new(start),
        }
    }

    /// A fresh session number.
    pub fn next_session_id(&self) -> SessionId {
        self.next_session.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A fresh socket id.
    pub fn next_socket_id(&self) -> SocketId {
        self.next_socket.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// This node's slot.
    pub fn slot(&self) -> u8 {
        self.slot
    }

    /// A fresh sequence number for a broadcast entering the cluster here.
    pub fn next_broadcast_seq(&self) -> u64 {
        self.broadcast_seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Every VIP online now: held by a session of this node, or (in a cluster) routed
    /// to another node's session. A lease of an online VIP must not expire, wherever its
    /// holder is.
    pub fn online(&self) -> HashSet<(NetKey, Ipv4Addr)> {
        self.routes.iter().map(|r| *r.key()).collect()
    }

    /// Routes `vip` to a local session; returns the session it replaces, if any (the same
    /// identity and instance joined again: same lease, same VIP). Only the network's
    /// actor calls this.
    pub fn attach_session(&self, net: NetKey, vip: Ipv4Addr, session: LocalSession) -> Option<LocalSession> {
        match self.routes.insert((net, vip), Entry::Local(session)) {
            Some(Entry::Local(old)) => Some(old),
            _ => None,
        }
    }

    /// Removes the route of `vip` if session `id` still holds it; returns whether it did.
    pub fn detach_session(&self, net: NetKey, vip: Ipv4Addr, id: SessionId) -> bool {
        self.routes.remove_if(&(net, vip), |_, e| matches!(e, Entry::Local(s) if s.id == id)).is_some()
    }

    /// Routes `vip` over `link` (`None`: no peer route), unless a local session holds
    /// it. Only the cluster actor calls this.
    pub fn set_peer_route(&self, net: NetKey, vip: Ipv4Addr, link: Option<LinkId>) {
        match link {
            Some(link) => {
                let mut entry = self.routes.entry((net, vip)).or_insert(Entry::Peer(link));
                if let Entry::Peer(old) = entry.value_mut() {
                    *old = link;
                }
            }
            None => {
                self.routes.remove_if(&(net, vip), |_, e| matches!(e, Entry::Peer(_)));
            }
        }
    }

    /// Where `vip` lives.
    pub fn route(&self, net: NetKey, vip: Ipv4Addr) -> Option<Route> {
        match self.routes.get(&(net, vip))?.value() {
            Entry::Local(s) => Some(Route::Local(s.clone())),
            Entry::Peer(link) => self.links.get(link).map(|l| Route::Peer(l.clone())),
        }
    }

    /// Every VIP of `net` with a route here, and whether a session here holds it.
    pub fn vips_in(&self, net: NetKey) -> Vec<(Ipv4Addr, bool)> {
        self.routes
            .iter()
            .filter(|r| r.key().0 == net)
            .map(|r| (r.key().1, matches!(r.value(), Entry::Local(_))))
            .collect()
    }

    /// The sessions of this node in `net`.
    pub fn local_sessions_in(&self, net: NetKey) -> Vec<LocalSession> {
        self.routes
            .iter()
            .filter(|r| r.key().0 == net)
            .filter_map(|r| match r.value() {
                Entry::Local(s) => Some(s.clone()),
                Entry::Peer(_) => None,
            })
            .collect()
    }

    /// Records where traffic from remote `vip` may come from (the cluster actor's
    /// route table decides).
    pub fn set_sources(&self, net: NetKey, vip: Ipv4Addr, sources: Option<Sources>) {
        match sources {
            Some(sources) => self.sources.insert((net, vip), sources),
            None => self.sources.remove(&(net, vip)).map(|(_, s)| s),
        };
    }

    /// The slot of the node remote `vip` is attached at, if traffic from it may come on
    /// `link` (a route to it from its origin was announced there). A peer that stamps
    /// another source than that is forging.
    pub fn source_origin(&self, net: NetKey, vip: Ipv4Addr, link: LinkId) -> Option<u8> {
        self.sources.get(&(net, vip)).filter(|s| s.links.contains(&link)).map(|s| s.origin_slot)
    }

    /// The slot of the node remote `vip` is attached at, wherever its traffic may come
    /// from.
    pub fn remote_origin(&self, net: NetKey, vip: Ipv4Addr) -> Option<u8> {
        self.sources.get(&(net, vip)).map(|s| s.origin_slot)
    }

    /// Registers a live peer link.
    pub fn add_link(&self, link: PeerLink) {
        self.links.insert(link.id, link);
    }

    /// Removes a peer link (its routes are withdrawn by the cluster actor).
    pub fn remove_link(&self, link: LinkId) {
        self.links.remove(&link);
    }

    /// Every live link.
    pub fn links(&self) -> Vec<PeerLink> {
        self.links.iter().map(|l| l.clone()).collect()
    }

    /// The peer node of every live link.
    pub fn link_peers(&self) -> Vec<String> {
        self.links.iter().map(|l| l.node.to_string()).collect()
    }

    /// Closes every live link to node `peer`; returns how many.
    pub fn close_links_to(&self, peer: &str) -> usize {
        let mut n = 0;
        for link in self.links.iter().filter(|l| &*l.node == peer) {
            link.conn.close(quinn::VarInt::from_u32(overlan_shared::wire::close_code::NORMAL), b"link cut");
            n += 1;
        }
        n
    }

    /// A peer link.
    pub fn link(&self, link: LinkId) -> Option<PeerLink> {
        self.links.get(&link).map(|l| l.clone())
    }

    /// Calls `f` with every live link's connection except `except`'s. `f` must not
    /// block or await.
    pub fn for_each_link(&self, except: Option<LinkId>, mut f: impl FnMut(&quinn::Connection)) {
        for link in self.links.iter() {
            if Some(*link.key()) != except {
                f(&link.conn);
            }
        }
    }

    /// Registers a stream listener (overwrites a stale entry of a replaced session).
    pub fn add_listener(&self, net: NetKey, addr: SocketAddrV4, session: LocalSession) {
        self.listeners.insert((net, addr), session);
    }

    /// Removes a listener if session `id` owns it.
    pub fn remove_listener(&self, net: NetKey, addr: SocketAddrV4, id: SessionId) {
        self.listeners.remove_if(&(net, addr), |_, s| s.id == id);
    }

    /// The session listening on `addr`.
    pub fn listener(&self, net: NetKey, addr: SocketAddrV4) -> Option<LocalSession> {
        self.listeners.get(&(net, addr)).map(|s| s.clone())
    }

    /// Binds a datagram port and joins the port's broadcast group.
    pub fn bind_datagram(&self, net: NetKey, addr: SocketAddrV4, binding: DatagramBinding) {
        self.broadcast_groups.entry((net, addr.port())).or_default().insert(*addr.ip(), binding.clone());
        self.datagram_ports.insert((net, addr), binding);
    }

    /// Releases a datagram port if session `id` owns it.
    pub fn unbind_datagram(&self, net: NetKey, addr: SocketAddrV4, id: SessionId) {
        self.datagram_ports.remove_if(&(net, addr), |_, b| b.session == id);
        let key = (net, addr.port());
        if let Some(mut group) = self.broadcast_groups.get_mut(&key) {
            if group.get(addr.ip()).is_some_and(|b| b.session == id) {
                group.remove(addr.ip());
            }
        }
        self.broadcast_groups.remove_if(&key, |_, g| g.is_empty());
    }

    /// Whether session `id` has bound `addr`.
    pub fn owns_datagram_port(&self, net: NetKey, addr: SocketAddrV4, id: SessionId) -> bool {
        self.datagram_ports.get(&(net, addr)).is_some_and(|b| b.session == id)
    }

    /// The local connection that receives datagrams for `addr`: the session that bound
    /// it, else a session in TUN mode holding the VIP.
    pub fn datagram_target(&self, net: NetKey, addr: SocketAddrV4) -> Option<quinn::Connection> {
        match self.datagram_ports.get(&(net, addr)) {
            Some(b) => Some(b.conn.clone()),
            None => self.tun_target(net, *addr.ip()),
        }
    }

    /// Registers a session in TUN mode holding `vip`.
    pub fn add_tun(&self, net: NetKey, vip: Ipv4Addr, binding: DatagramBinding) {
        self.tun.entry(net).or_default().insert(vip, binding);
    }

    /// Removes a TUN session's entry if session `id` owns it.
    pub fn remove_tun(&self, net: NetKey, vip: Ipv4Addr, id: SessionId) {
        if let Some(mut sessions) = self.tun.get_mut(&net) {
            if sessions.get(&vip).is_some_and(|b| b.session == id) {
                sessions.remove(&vip);
            }
        }
        self.tun.remove_if(&net, |_, s| s.is_empty());
    }

    /// The local session in TUN mode holding `vip`, which takes IPv4 packets to it.
    pub fn tun_target(&self, net: NetKey, vip: Ipv4Addr) -> Option<quinn::Connection> {
        self.tun.get(&net)?.get(&vip).map(|b| b.conn.clone())
    }

    /// Calls `f` with every local connection bound to `port` in `net` except `except`'s.
    /// Returns how many were called. `f` must not block or await.
    pub fn for_each_broadcast_member(
        &self,
        net: NetKey,
        port: u16,
        except: Ipv4Addr,
        mut f: impl FnMut(&quinn::Connection),
    ) -> usize {
        let mut n = 0;
        if let Some(group) = self.broadcast_groups.get(&(net, port)) {
            for (vip, binding) in group.iter() {
                if *vip != except {
                    f(&binding.conn);
                    n += 1;
                }
            }
        }
        // Sessions in TUN mode take every broadcast (the kernel behind them decides
        // whether a program listens on the port).
        if let Some(sessions) = self.tun.get(&net) {
            for (vip, binding) in sessions.iter() {
                if *vip != except {
                    f(&binding.conn);
                    n += 1;
                }
            }
        }
        n
    }

    /// Registers a socket pair.
    pub fn add_pair(&self, socket: SocketId, addr: Addr<SocketPairActor>) {
        self.pairs.insert(socket, addr);
    }

    /// Removes a socket pair.
    pub fn remove_pair(&self, socket: SocketId) {
        self.pairs.remove(&socket);
    }

    /// Socket pairs alive: connects waiting for an answer and established sockets.
    pub fn pair_count(&self) -> usize {
        self.pairs.len()
    }

    /// The actor of a socket pair.
    pub fn pair(&self, socket: SocketId) -> Option<Addr<SocketPairActor>> {
        self.pairs.get(&socket).map(|p| p.clone())
    }
}
