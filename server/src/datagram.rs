//! The datagram data path: one task per session reads its QUIC datagrams, checks the
//! claimed source against the authenticated session, and forwards by router lookup —
//! unicast to the bound port's session, broadcast to every other member bound to the
//! port. No actor mailbox is involved; rejections become a rate-limited notice, and
//! each session's unicast and broadcast rates are token buckets (over them, datagrams
//! are dropped and counted, as UDP would drop them).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Instant;

use actix::Addr;
use bytes::Bytes;
use overlan_shared::session::TokenBucket;
use overlan_shared::wire::datagram::{DatagramHeader, IpPacket, HEADER_LEN, KIND_IP};
use overlan_shared::wire::{ErrorCode, MAX_DATAGRAM_PAYLOAD};
use overlan_shared::Subnet;

use crate::config::Limits;
use crate::counters::Reason;
use crate::link::{flood_broadcast, link_datagram};
use crate::node::Node;
use crate::router::{Route, Router, SessionId};
use crate::session::{Notice, SessionActor};
use overlan_shared::route::NetKey;
use overlan_shared::wire::peer::{LinkHeader, MAX_HOPS};

/// Notices a session may get in a burst; after that one per second, so a flood of bad
/// datagrams cannot make the relay flood back.
const NOTICE_BURST: u32 = 8;

/// What the data path needs to know about the sending session.
#[derive(Debug, Clone, Copy)]
pub struct Sender {
    /// Session number.
    pub session: SessionId,
    /// Network.
    pub net: NetKey,
    /// The session's VIP.
    pub vip: Ipv4Addr,
    /// The network's subnet.
    pub subnet: Subnet,
    /// In TUN mode: any port of its VIP is its own, and it may send IPv4 packets.
    pub tun: bool,
}

/// Why a datagram was dropped and the sender told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// The header did not parse.
    Malformed,
    /// The payload exceeds the maximum.
    TooLarge(usize),
    /// The source VIP is not the sender's.
    Forged(SocketAddrV4),
    /// The source port is not bound by the sender.
    PortNotBound(u16),
    /// An IPv4 packet from a session not in TUN mode.
    NotTun,
    /// An IPv4 packet that is malformed, too large, not from the sender's VIP, or has
    /// nowhere to go (counted; the sender is not told, as IP would not tell it).
    PacketDropped,
}

impl Reject {
    fn notice(self) -> Notice {
        let (code, message) = match self {
            Reject::Malformed => (ErrorCode::ProtocolViolation, "datagram dropped: malformed header".to_owned()),
            Reject::TooLarge(len) => (
                ErrorCode::MessageTooLarge,
                format!("datagram dropped: payload of {len} bytes exceeds the maximum of {MAX_DATAGRAM_PAYLOAD}"),
            ),
            Reject::Forged(src) => {
                (ErrorCode::ForgedSource, format!("datagram dropped: source {src} is not this session's VIP"))
            }
            Reject::PortNotBound(port) => {
                (ErrorCode::InvalidPort, format!("datagram dropped: source port {port} is not bound by this session"))
            }
            Reject::NotTun => {
                (ErrorCode::ProtocolViolation, "IP packet dropped: this session did not join in TUN mode".to_owned())
            }
            Reject::PacketDropped => (ErrorCode::ForgedSource, "IP packet dropped".to_owned()),
        };
        Notice { code, message }
    }
}

/// What kind of datagram passed the checks, for the rate limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// To one VIP.
    Unicast,
    /// To every member bound to the port.
    Broadcast,
}

/// Checks one datagram from `from` and, if `admit` lets its kind through, forwards it.
/// Returns how many receivers it was handed to (0 when `admit` refused it).
pub fn forward(
    router: &Router,
    from: &Sender,
    datagram: Bytes,
    admit: impl FnOnce(Kind) -> bool,
) -> Result<usize, Reject> {
    if datagram.first() == Some(&KIND_IP) {
        return forward_packet(router, from, datagram, admit);
    }
    let header = DatagramHeader::parse(&datagram).map_err(|_| Reject::Malformed)?;
    let payload = datagram.len() - HEADER_LEN;
    if payload > MAX_DATAGRAM_PAYLOAD {
        return Err(Reject::TooLarge(payload));
    }
    // The source check is the stamp: only the session's own VIP and a port it bound pass,
    // so the source every receiver sees is the authenticated one.
    if *header.src.ip() != from.vip {
        return Err(Reject::Forged(header.src));
    }
    if !from.tun && !router.owns_datagram_port(from.net, header.src, from.session) {
        return Err(Reject::PortNotBound(header.src.port()));
    }
    let dst = *header.dst.ip();
    let kind = if from.subnet.is_broadcast(dst) { Kind::Broadcast } else { Kind::Unicast };
    if !admit(kind) {
        return Ok(0);
    }
    if kind == Kind::Broadcast {
        let n = router.for_each_broadcast_member(from.net, header.dst.port(), from.vip, |conn| {
            let _ = conn.send_datagram(datagram.clone());
        });
        // Every other node gets it once and fans it out to its own members.
        flood_broadcast(router, from.net, &datagram);
        return Ok(n);
    }
    // Unreliable by contract: a full receive buffer, a vanished peer or a VIP with no
    // route drops it.
    if let Some(conn) = router.datagram_target(from.net, header.dst) {
        let _ = conn.send_datagram(datagram);
        return Ok(1);
    }
    match router.route(from.net, dst) {
        Some(Route::Peer(link)) => {
            let _ = link
                .conn
                .send_datagram(link_datagram(LinkHeader::Unicast { hops: MAX_HOPS, net: from.net }, &datagram));
            Ok(1)
        }
        _ => Ok(0),
    }
}

/// Forwards an IPv4 packet of a TUN session to the TUN session holding its destination,
/// here or behind a peer. Its source must be the sender's VIP; broadcasts travel as
/// datagrams (the client turns a UDP broadcast into one), so a packet to a broadcast
/// address is dropped.
fn forward_packet(
    router: &Router,
    from: &Sender,
    datagram: Bytes,
    admit: impl FnOnce(Kind) -> bool,
) -> Result<usize, Reject> {
    if !from.tun {
        return Err(Reject::NotTun);
    }
    let packet = IpPacket::parse(&datagram).map_err(|_| Reject::PacketDropped)?;
    if packet.src != from.vip || from.subnet.is_broadcast(packet.dst) || !from.subnet.contains(packet.dst) {
        return Err(Reject::PacketDropped);
    }
    if !admit(Kind::Unicast) {
        return Ok(0);
    }
    if let Some(conn) = router.tun_target(from.net, packet.dst) {
        let _ = conn.send_datagram(datagram);
        return Ok(1);
    }
    match router.route(from.net, packet.dst) {
        Some(Route::Peer(link)) => {
            let _ = link
                .conn
                .send_datagram(link_datagram(LinkHeader::Unicast { hops: MAX_HOPS, net: from.net }, &datagram));
            Ok(1)
        }
        // No TUN session holds the destination (an ordinary session cannot take a
        // packet, and no route is none).
        _ => Err(Reject::PacketDropped),
    }
}

/// One session's datagram path: who sends, and its rate limits.
pub struct DatagramPath {
    from: Sender,
    unicast: TokenBucket,
    broadcast: TokenBucket,
    notices: TokenBucket,
}

impl DatagramPath {
    /// The path of `from`, limited as `limits` say.
    pub fn new(from: Sender, limits: &Limits) -> Self {
        let now = Instant::now();
        Self {
            from,
            unicast: TokenBucket::new(limits.datagram_rate, limits.datagram_burst, now),
            broadcast: TokenBucket::new(limits.broadcast_rate, limits.broadcast_burst, now),
            notices: TokenBucket::new(1, NOTICE_BURST, now),
        }
    }

    /// The sending session.
    pub fn session(&self) -> SessionId {
        self.from.session
    }

    /// Forwards one datagram, telling the session (within the notice rate) if it was
    /// rejected and counting what its rate limits dropped.
    pub fn handle_datagram(&mut self, node: &Node, datagram: Bytes, session: &Addr<SessionActor>) {
        let now = Instant::now();
        let (unicast, broadcast) = (&mut self.unicast, &mut self.broadcast);
        let admit = |kind| {
            let (bucket, reason) = match kind {
                Kind::Unicast => (unicast, Reason::DatagramRate),
                Kind::Broadcast => (broadcast, Reason::BroadcastRate),
            };
            let ok = bucket.handle_take(now);
            if !ok {
                node.count(reason);
            }
            ok
        };
        if let Err(reject) = forward(&node.router, &self.from, datagram, admit) {
            tracing::debug!(session = self.from.session, ?reject, "datagram rejected");
            if reject == Reject::PacketDropped {
                node.count(Reason::TunPacketDropped);
                return;
            }
            if self.notices.handle_take(now) {
                session.do_send(reject.notice());
            }
        }
    }
}
