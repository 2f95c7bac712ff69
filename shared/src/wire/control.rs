//! Control messages, the plain-data vocabulary of a session's control stream. The client
//! sends [`ClientMessage`]s, the relay answers with [`RelayMessage`]s. Requests carry a
//! client-chosen `req` id that the answer echoes. Sockets are numbered by the relay.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::ErrorCode;
use crate::addr::{Subnet, VirtualAddr};
use crate::config::Secret;

/// Relay-assigned id of a connected virtual stream (a socket pair); unique per relay.
pub type SocketId = u64;

/// Whether an instance name is acceptable: up to 64 of `A-Z a-z 0-9 . _ -` (may be empty).
/// The relay enforces it; the CLI checks it first so a typo is a usage error.
pub fn valid_instance(name: &str) -> bool {
    name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Messages from a client to the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// First message of a session: protocol version, join token, instance name.
    Hello {
        /// Must equal [`super::PROTOCOL_VERSION`].
        protocol: u32,
        /// The join token from the invite (`Debug` prints `***`).
        token: Secret,
        /// Instance name; one identity may run several instances, each with its own VIP.
        #[serde(default)]
        instance: String,
        /// A lease proof a node of the cluster gave this client (see `Welcome::lease`):
        /// joining another node, the client keeps its VIP.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lease: Option<String>,
        /// The network the invite URI names; the relay refuses the join if the token
        /// is for another network (an edited or mixed-up invite).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        network: Option<String>,
        /// TUN mode: the session takes every datagram to its VIP (any port, and every
        /// broadcast) and may send IPv4 packets.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        tun: bool,
        /// Join only if this identity and instance hold a VIP in the network already
        /// (`overlan leave`: giving a VIP back must not lease one first); otherwise the
        /// relay closes with [`super::close_code::NO_LEASE`].
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        existing_only: bool,
    },
    /// Register a stream listener on `port` (0: the relay picks an ephemeral port).
    Listen {
        /// Request id echoed in the answer.
        req: u64,
        /// Virtual port.
        port: u16,
    },
    /// Remove a stream listener.
    Unlisten {
        /// Virtual port.
        port: u16,
    },
    /// Bind a datagram port (0: the relay picks an ephemeral port).
    Bind {
        /// Request id echoed in the answer.
        req: u64,
        /// Virtual port.
        port: u16,
    },
    /// Release a datagram port.
    Unbind {
        /// Virtual port.
        port: u16,
    },
    /// Open a virtual stream to `to`.
    Connect {
        /// Request id echoed in the answer.
        req: u64,
        /// Target VIP and port.
        to: VirtualAddr,
    },
    /// Accept an `Incoming` connection.
    Accept {
        /// The socket id from `Incoming`.
        socket: SocketId,
    },
    /// Deny an `Incoming` connection.
    Deny {
        /// The socket id from `Incoming`.
        socket: SocketId,
    },
    /// Close a socket at once (both directions), e.g. before its stream was opened.
    Close {
        /// The socket id.
        socket: SocketId,
    },
    /// Liveness probe; answered by `Pong`.
    Ping {
        /// Echoed in `Pong`.
        nonce: u64,
    },
    /// Who else is in my network; answered by `PeerList`.
    Peers {
        /// Request id.
        req: u64,
    },
    /// Give this identity and instance's VIP back: the relay deletes the lease, answers
    /// `Released` and the session ends (the next join gets a new VIP).
    Release {
        /// Request id.
        req: u64,
    },
}

/// A member of the network, as `PeerList` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Its VIP.
    pub vip: Ipv4Addr,
    /// Its instance name (empty for the unnamed instance; `None` if the relay does not
    /// know it: a member of another node of a cluster whose route did not name it).
    pub instance: Option<String>,
    /// Online now (its session, here or on another node, holds the VIP).
    pub online: bool,
    /// When it was last seen by this relay (joined or left), unix seconds.
    pub last_seen: Option<i64>,
}

/// Messages from the relay to a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RelayMessage {
    /// The join succeeded.
    Welcome {
        /// Protocol version of the relay.
        protocol: u32,
        /// Session id (for logs and operators).
        session: u64,
        /// Network name.
        network: String,
        /// The client's permanent VIP.
        vip: Ipv4Addr,
        /// The network's subnet.
        subnet: Subnet,
        /// Exact maximum datagram payload in bytes.
        max_datagram_payload: u32,
        /// Idle timeout of the session in milliseconds.
        idle_timeout_ms: u64,
        /// In a cluster: the signed lease of this VIP, to present when joining any node.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lease: Option<String>,
    },
    /// A `Listen` succeeded.
    Listening {
        /// Request id.
        req: u64,
        /// The port now listening (the ephemeral one if 0 was asked).
        port: u16,
    },
    /// A `Bind` succeeded.
    Bound {
        /// Request id.
        req: u64,
        /// The port now bound.
        port: u16,
    },
    /// A `Connect` succeeded; open the data stream for `socket`.
    Connected {
        /// Request id.
        req: u64,
        /// The socket id.
        socket: SocketId,
        /// This side's address (relay-stamped, ephemeral port).
        local: VirtualAddr,
        /// The peer's address.
        peer: VirtualAddr,
    },
    /// A request failed.
    Failed {
        /// Request id.
        req: u64,
        /// What went wrong.
        code: ErrorCode,
        /// Human explanation.
        message: String,
    },
    /// Someone connects to one of this client's listeners; answer `Accept` or `Deny`.
    Incoming {
        /// The socket id.
        socket: SocketId,
        /// The listener's address.
        local: VirtualAddr,
        /// The connecting side's relay-stamped address.
        peer: VirtualAddr,
    },
    /// A socket ended without the data stream telling (peer lost before attaching, etc.).
    SocketClosed {
        /// The socket id.
        socket: SocketId,
        /// Why.
        code: ErrorCode,
    },
    /// The relay rejected something the client did that has no request id (a bad
    /// datagram, an unknown socket id); the session goes on.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// Human explanation.
        message: String,
    },
    /// Answer to `Ping`.
    Pong {
        /// The nonce from `Ping`.
        nonce: u64,
    },
    /// Answer to `Peers`: every other member the relay knows, by VIP.
    PeerList {
        /// Request id.
        req: u64,
        /// The members.
        peers: Vec<PeerInfo>,
    },
    /// Answer to `Release`: the lease is gone; the client closes the session.
    Released {
        /// Request id.
        req: u64,
        /// The VIP given back.
        vip: Ipv4Addr,
    },
    /// The relay is about to close the session.
    Goodbye {
        /// Why.
        code: ErrorCode,
        /// Human explanation.
        message: String,
    },
}
