//! The datagram data path: one task per session reads its QUIC datagrams, checks the
//! claimed source against the authenticated session, and forwards by router lookup —
//! unicast to the bound port's session, broadcast to every other member bound to the
//! port. No actor mailbox is involved; rejections become a rate-limited notice.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use actix::Addr;
use bytes::Bytes;
use overlan_shared::wire::datagram::{DatagramHeader, HEADER_LEN};
use overlan_shared::wire::{ErrorCode, MAX_DATAGRAM_PAYLOAD};
use overlan_shared::Subnet;

use crate::router::{Router, SessionId};
use crate::session::{Notice, SessionActor};
use crate::store::NetworkId;

/// Notices a session may get in a burst; after that one per [`NOTICE_INTERVAL`], so a
/// flood of bad datagrams cannot make the relay flood back.
const NOTICE_BURST: u32 = 8;
/// Refill interval of the notice budget.
const NOTICE_INTERVAL: Duration = Duration::from_secs(1);

/// What the data path needs to know about the sending session.
#[derive(Debug, Clone, Copy)]
pub struct Sender {
    /// Session number.
    pub session: SessionId,
    /// Network.
    pub net: NetworkId,
    /// The session's VIP.
    pub vip: Ipv4Addr,
    /// The network's subnet.
    pub subnet: Subnet,
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
        };
        Notice { code, message }
    }
}

/// Outcome of forwarding one datagram: how many receivers it was handed to.
pub fn forward(router: &Router, from: &Sender, datagram: Bytes) -> Result<usize, Reject> {
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
    if !router.owns_datagram_port(from.net, header.src, from.session) {
        return Err(Reject::PortNotBound(header.src.port()));
    }
    let dst = *header.dst.ip();
    if from.subnet.is_broadcast(dst) {
        return Ok(router.for_each_broadcast_member(from.net, header.dst.port(), from.vip, |conn| {
            let _ = conn.send_datagram(datagram.clone());
        }));
    }
    match router.datagram_target(from.net, header.dst) {
        Some(conn) => {
            // Unreliable by contract: a full receive buffer or a vanished peer drops it.
            let _ = conn.send_datagram(datagram);
            Ok(1)
        }
        None => Ok(0),
    }
}

/// Rate limit of the notices one session gets about rejected datagrams: a burst, then
/// one per [`NOTICE_INTERVAL`].
pub struct NoticeBudget {
    budget: u32,
    refilled: Instant,
}

impl Default for NoticeBudget {
    fn default() -> Self {
        Self { budget: NOTICE_BURST, refilled: Instant::now() }
    }
}

impl NoticeBudget {
    /// Whether one more notice may go out now.
    pub fn poll_take(&mut self) -> bool {
        let earned = (self.refilled.elapsed().as_secs_f64() / NOTICE_INTERVAL.as_secs_f64()) as u32;
        if earned > 0 {
            self.budget = (self.budget + earned).min(NOTICE_BURST);
            self.refilled = Instant::now();
        }
        let allowed = self.budget > 0;
        self.budget = self.budget.saturating_sub(1);
        allowed
    }
}

/// Forwards one datagram from `from`, telling its session (within `budget`) if it was
/// rejected.
pub fn handle_datagram(
    router: &Router,
    from: &Sender,
    datagram: Bytes,
    budget: &mut NoticeBudget,
    session: &Addr<SessionActor>,
) {
    if let Err(reject) = forward(router, from, datagram) {
        tracing::debug!(session = from.session, ?reject, "datagram rejected");
        if budget.poll_take() {
            session.do_send(reject.notice());
        }
    }
}
