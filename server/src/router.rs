//! The router: where each VIP, listener, datagram port and socket pair lives. Actors
//! write it when they register and deregister; the data path only reads it (a `DashMap`
//! lookup, no guard held across an `.await`). A route is a local session today; a
//! federated relay adds `Route::Peer` for VIPs behind a peer link.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};

use actix::Addr;
use dashmap::DashMap;
use overlan_shared::wire::control::SocketId;

use crate::pair::SocketPairActor;
use crate::session::SessionActor;
use crate::store::NetworkId;

/// Relay-local session number.
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

/// Where a VIP lives.
#[derive(Clone)]
pub enum Route {
    /// A session on this relay.
    Local(LocalSession),
}

/// A bound datagram port.
#[derive(Clone)]
pub struct DatagramBinding {
    /// Owning session.
    pub session: SessionId,
    /// Its connection.
    pub conn: quinn::Connection,
}

/// Lookup tables shared by every actor and data-path task of a relay.
#[derive(Default)]
pub struct Router {
    next_session: AtomicU64,
    next_socket: AtomicU64,
    routes: DashMap<(NetworkId, Ipv4Addr), Route>,
    listeners: DashMap<(NetworkId, SocketAddrV4), LocalSession>,
    datagram_ports: DashMap<(NetworkId, SocketAddrV4), DatagramBinding>,
    broadcast_groups: DashMap<(NetworkId, u16), HashMap<Ipv4Addr, DatagramBinding>>,
    pairs: DashMap<SocketId, Addr<SocketPairActor>>,
}

impl Router {
    /// A fresh session number.
    pub fn next_session_id(&self) -> SessionId {
        self.next_session.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A fresh socket id.
    pub fn next_socket_id(&self) -> SocketId {
        self.next_socket.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Every VIP that routes to a session now.
    pub fn online(&self) -> HashSet<(NetworkId, Ipv4Addr)> {
        self.routes.iter().map(|r| *r.key()).collect()
    }

    /// Routes `vip` to a local session; returns the session it replaces, if any (the same
    /// identity and instance joined again: same lease, same VIP). Only the network's
    /// actor calls this.
    pub fn attach_session(&self, net: NetworkId, vip: Ipv4Addr, session: LocalSession) -> Option<LocalSession> {
        self.routes.insert((net, vip), Route::Local(session)).map(|Route::Local(old)| old)
    }

    /// Removes the route of `vip` if session `id` still holds it.
    pub fn detach_session(&self, net: NetworkId, vip: Ipv4Addr, id: SessionId) {
        self.routes.remove_if(&(net, vip), |_, route| matches!(route, Route::Local(s) if s.id == id));
    }

    /// Where `vip` lives.
    pub fn route(&self, net: NetworkId, vip: Ipv4Addr) -> Option<Route> {
        self.routes.get(&(net, vip)).map(|r| r.clone())
    }

    /// Registers a stream listener (overwrites a stale entry of a replaced session).
    pub fn add_listener(&self, net: NetworkId, addr: SocketAddrV4, session: LocalSession) {
        self.listeners.insert((net, addr), session);
    }

    /// Removes a listener if session `id` owns it.
    pub fn remove_listener(&self, net: NetworkId, addr: SocketAddrV4, id: SessionId) {
        self.listeners.remove_if(&(net, addr), |_, s| s.id == id);
    }

    /// The session listening on `addr`.
    pub fn listener(&self, net: NetworkId, addr: SocketAddrV4) -> Option<LocalSession> {
        self.listeners.get(&(net, addr)).map(|s| s.clone())
    }

    /// Binds a datagram port and joins the port's broadcast group.
    pub fn bind_datagram(&self, net: NetworkId, addr: SocketAddrV4, binding: DatagramBinding) {
        self.broadcast_groups.entry((net, addr.port())).or_default().insert(*addr.ip(), binding.clone());
        self.datagram_ports.insert((net, addr), binding);
    }

    /// Releases a datagram port if session `id` owns it.
    pub fn unbind_datagram(&self, net: NetworkId, addr: SocketAddrV4, id: SessionId) {
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
    pub fn owns_datagram_port(&self, net: NetworkId, addr: SocketAddrV4, id: SessionId) -> bool {
        self.datagram_ports.get(&(net, addr)).is_some_and(|b| b.session == id)
    }

    /// The connection that receives datagrams for `addr`.
    pub fn datagram_target(&self, net: NetworkId, addr: SocketAddrV4) -> Option<quinn::Connection> {
        self.datagram_ports.get(&(net, addr)).map(|b| b.conn.clone())
    }

    /// Calls `f` with every connection bound to `port` in `net` except `except`'s.
    /// Returns how many were called. `f` must not block or await.
    pub fn for_each_broadcast_member(
        &self,
        net: NetworkId,
        port: u16,
        except: Ipv4Addr,
        mut f: impl FnMut(&quinn::Connection),
    ) -> usize {
        let Some(group) = self.broadcast_groups.get(&(net, port)) else {
            return 0;
        };
        let mut n = 0;
        for (vip, binding) in group.iter() {
            if *vip != except {
                f(&binding.conn);
                n += 1;
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

    /// The actor of a socket pair.
    pub fn pair(&self, socket: SocketId) -> Option<Addr<SocketPairActor>> {
        self.pairs.get(&socket).map(|p| p.clone())
    }
}
