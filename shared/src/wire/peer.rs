//! The relay-to-relay protocol of a peer link (ALPN [`ALPN_PEER`]). The node that dialed
//! opens one control stream of length-prefixed JSON [`PeerMessage`]s; each virtual
//! stream that crosses the link is its own QUIC stream, opened by the node the connect
//! came from and starting with a [`StreamHeader`](super::stream::StreamHeader) naming
//! the opener's socket; datagrams and broadcasts are QUIC datagrams with a
//! [`LinkHeader`] in front of the client's datagram (its header and payload unchanged,
//! so the source the origin node stamped travels end to end).
//!
//! Sockets are node-scoped: every message about a socket names it by the sender's own
//! id, and the receiver maps that to its own socket on this link.

use std::net::SocketAddrV4;

use serde::{Deserialize, Serialize};

use super::control::SocketId;
use super::ErrorCode;
use crate::route::{NetKey, RouteUpdate};

/// ALPN identifier of relay↔relay links.
pub const ALPN_PEER: &[u8] = b"overlan-peer/1";

/// Version of the peer protocol; a link with another version is refused.
pub const PEER_PROTOCOL_VERSION: u32 = 1;

/// One control message on a peer link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PeerMessage {
    /// First message each way: who the sender is (its certificate already proved it).
    Hello {
        /// Protocol version.
        protocol: u32,
        /// The sender's node name.
        node: String,
        /// A number the sender's process drew at start: two links from one node with
        /// different numbers come from two processes (a restart, or the same
        /// credentials run twice).
        #[serde(default)]
        incarnation: u64,
    },
    /// The answer to a hello when the link is refused (then the connection closes):
    /// why, so the dialer can say so even if the close's packet is lost.
    Refused {
        /// Why, in words.
        why: String,
    },
    /// Route changes, in order.
    Routes {
        /// The changes.
        updates: Vec<RouteUpdate>,
    },
    /// A client behind the sender connects to `to`.
    Connect {
        /// The sender's socket.
        socket: SocketId,
        /// Network.
        net: NetKey,
        /// The connecting client's address.
        from: SocketAddrV4,
        /// The address connected to.
        to: SocketAddrV4,
        /// Nodes the connect may still cross (a guard against loops while routes
        /// converge); a node that would pass it on with none left answers `Unreachable`.
        #[serde(default = "max_hops")]
        hops: u8,
    },
    /// The answer to `Connect`.
    Answer {
        /// The sender's socket.
        socket: SocketId,
        /// The connecting node's socket it answers.
        to: SocketId,
        /// Accepted, or why not.
        result: Result<(), (ErrorCode, String)>,
    },
    /// The sender's socket ended before its stream was spliced (or its party left).
    Closed {
        /// The sender's socket.
        socket: SocketId,
        /// Why.
        code: ErrorCode,
    },
    /// The sender's networks and invites (on link-up and whenever they change): the
    /// receiver adds what it lacks and takes revocations and use counts.
    Catalog(Catalog),
    /// Keep-alive and round-trip probe.
    Ping {
        /// Echoed.
        nonce: u64,
    },
    /// Answer to `Ping`.
    Pong {
        /// Echoed.
        nonce: u64,
    },
}

/// What every node of a cluster must agree on: the networks and the invites (by token
/// hash; tokens themselves never travel).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    /// Networks.
    pub networks: Vec<CatalogNetwork>,
    /// Invites.
    pub invites: Vec<CatalogInvite>,
    /// Networks removed (so a node that missed the removal drops them, and none brings
    /// them back).
    #[serde(default)]
    pub removed: Vec<CatalogRemoval>,
    /// Leases released (given back, released by the operator, expired): proofs of them
    /// issued before the release no longer keep the VIP on any node. All of them when a
    /// link comes up; after that only those new since the sender's last catalog.
    #[serde(default)]
    pub voided: Vec<CatalogVoid>,
}

/// A released lease in a [`Catalog`]: proofs for `vip` in `network` issued before
/// `before` are void.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CatalogVoid {
    /// Network name.
    pub network: String,
    /// The VIP.
    pub vip: std::net::Ipv4Addr,
    /// When the lease was released, unix milliseconds.
    pub before: i64,
}

/// A removed network in a [`Catalog`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogRemoval {
    /// Its name.
    pub name: String,
    /// When it was removed, unix seconds.
    pub removed_at: i64,
}

/// A network in a [`Catalog`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogNetwork {
    /// Name (the cluster-wide key).
    pub name: String,
    /// Subnet, CIDR.
    pub subnet: String,
    /// Instances one identity may hold, if the network sets its own cap.
    pub max_instances: Option<u32>,
    /// When it was made, unix seconds (compared with a removal of the same name).
    #[serde(default)]
    pub created_at: i64,
    /// When its instance cap was last set, unix milliseconds (0: never; the latest
    /// setting wins on every node).
    #[serde(default)]
    pub cap_set_ms: i64,
}

/// An invite in a [`Catalog`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogInvite {
    /// SHA-256 of the token, hex.
    pub token_hash: String,
    /// The network it admits to.
    pub network: String,
    /// `default` or `issued`.
    pub kind: String,
    /// Most new members, if limited.
    pub max_uses: Option<i64>,
    /// New members admitted so far (as far as the sender knows).
    pub uses: i64,
    /// Expiry, unix seconds.
    pub expires_at: Option<i64>,
    /// Revoked.
    pub revoked: bool,
    /// When made, unix seconds.
    pub created_at: i64,
    /// The operator's label.
    #[serde(default)]
    pub label: String,
    /// New members admitted, by the node that admitted them (as far as the sender
    /// knows); `uses` is their sum.
    #[serde(default)]
    pub uses_by: std::collections::BTreeMap<String, i64>,
}

fn max_hops() -> u8 {
    MAX_HOPS
}

/// Kind byte of a unicast datagram on a link.
pub const LINK_UNICAST: u8 = 0x10;
/// Kind byte of a broadcast on a link.
pub const LINK_BROADCAST: u8 = 0x11;
/// Bytes of a unicast link header.
pub const UNICAST_HEADER_LEN: usize = 10;
/// Bytes of a broadcast link header.
pub const BROADCAST_HEADER_LEN: usize = 19;
/// Hops a link datagram may take before it is dropped (guards against transient loops
/// while routes converge).
pub const MAX_HOPS: u8 = 16;

/// The header in front of a client datagram on a link:
///
/// ```text
/// unicast:   0 kind (0x10)  1 hops left  2..10 network id
/// broadcast: 0 kind (0x11)  1 hops left  2..10 network id  10 origin slot  11..19 sequence
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkHeader {
    /// To one VIP.
    Unicast {
        /// Hops left.
        hops: u8,
        /// Network.
        net: NetKey,
    },
    /// To every member bound to the port, on every node once.
    Broadcast {
        /// Hops left.
        hops: u8,
        /// Network.
        net: NetKey,
        /// The slot of the node the broadcast entered the cluster at.
        origin: u8,
        /// That node's broadcast sequence number.
        seq: u64,
    },
}

/// Why a link datagram was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkHeaderError {
    /// Too short for its header.
    #[error("link datagram of {0} bytes is shorter than its header")]
    TooShort(usize),
    /// Unknown kind.
    #[error("unknown link datagram kind {0:#04x}")]
    UnknownKind(u8),
}

impl LinkHeader {
    /// Its length in bytes.
    pub fn len(&self) -> usize {
        match self {
            LinkHeader::Unicast { .. } => UNICAST_HEADER_LEN,
            LinkHeader::Broadcast { .. } => BROADCAST_HEADER_LEN,
        }
    }

    /// Never empty; for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The header as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(BROADCAST_HEADER_LEN);
        match *self {
            LinkHeader::Unicast { hops, net } => {
                out.extend_from_slice(&[LINK_UNICAST, hops]);
                out.extend_from_slice(&net.0.to_be_bytes());
            }
            LinkHeader::Broadcast { hops, net, origin, seq } => {
                out.extend_from_slice(&[LINK_BROADCAST, hops]);
                out.extend_from_slice(&net.0.to_be_bytes());
                out.push(origin);
                out.extend_from_slice(&seq.to_be_bytes());
            }
        }
        out
    }

    /// Parses the header at the front of `datagram`; the client datagram follows it.
    pub fn parse(datagram: &[u8]) -> Result<Self, LinkHeaderError> {
        let short = || LinkHeaderError::TooShort(datagram.len());
        let kind = *datagram.first().ok_or_else(short)?;
        let need = match kind {
            LINK_UNICAST => UNICAST_HEADER_LEN,
            LINK_BROADCAST => BROADCAST_HEADER_LEN,
            other => return Err(LinkHeaderError::UnknownKind(other)),
        };
        if datagram.len() < need {
            return Err(short());
        }
        let u64_at = |at: usize| u64::from_be_bytes(datagram[at..at + 8].try_into().expect("8 bytes"));
        let (hops, net) = (datagram[1], NetKey(u64_at(2)));
        Ok(match kind {
            LINK_UNICAST => LinkHeader::Unicast { hops, net },
            _ => LinkHeader::Broadcast { hops, net, origin: datagram[10], seq: u64_at(11) },
        })
    }

    /// The same header with one hop fewer, or `None` if no hops are left.
    pub fn next_hop(self) -> Option<Self> {
        match self {
            LinkHeader::Unicast { hops, net } => hops.checked_sub(1).map(|hops| LinkHeader::Unicast { hops, net }),
            LinkHeader::Broadcast { hops, net, origin, seq } => {
                hops.checked_sub(1).map(|hops| LinkHeader::Broadcast { hops, net, origin, seq })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn link_headers_round_trip(hops: u8, net: u64, origin: u8, seq: u64, broadcast: bool) {
            let header = if broadcast {
                LinkHeader::Broadcast { hops, net: NetKey(net), origin, seq }
            } else {
                LinkHeader::Unicast { hops, net: NetKey(net) }
            };
            let bytes = header.to_bytes();
            prop_assert_eq!(bytes.len(), header.len());
            prop_assert_eq!(LinkHeader::parse(&bytes), Ok(header));
            prop_assert_eq!(LinkHeader::parse(&bytes[..bytes.len() - 1]), Err(LinkHeaderError::TooShort(bytes.len() - 1)));
        }

        #[test]
        fn link_header_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = LinkHeader::parse(&bytes);
        }
    }

    #[test]
    fn hops_run_out() {
        let h = LinkHeader::Unicast { hops: 1, net: NetKey(1) };
        assert_eq!(h.next_hop(), Some(LinkHeader::Unicast { hops: 0, net: NetKey(1) }));
        assert_eq!(h.next_hop().unwrap().next_hop(), None);
    }

    #[test]
    fn peer_messages_are_json_with_a_type() {
        let msg = PeerMessage::Closed { socket: 4, code: ErrorCode::Refused };
        let text = serde_json::to_string(&msg).unwrap();
        assert!(text.contains("\"type\":\"closed\""), "{text}");
        assert_eq!(serde_json::from_str::<PeerMessage>(&text).unwrap(), msg);
    }
}
