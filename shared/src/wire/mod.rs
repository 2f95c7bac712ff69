//! The overlan wire protocol. Control messages travel on one QUIC stream per session as
//! length-prefixed JSON ([`frame`]); each virtual stream is its own QUIC stream opened
//! with a binary [`stream::StreamHeader`]; datagrams and broadcasts are QUIC DATAGRAM
//! frames with a compact binary [`datagram::DatagramHeader`].

pub mod control;
pub mod datagram;
pub mod frame;
pub mod peer;
pub mod stream;

use serde::{Deserialize, Serialize};

/// Protocol version spoken by this build; a relay refuses a `Hello` with another one.
pub const PROTOCOL_VERSION: u32 = 1;

/// ALPN identifier for client↔relay connections.
pub const ALPN_CLIENT: &[u8] = b"overlan/1";

/// TLS server name clients ask for; the relay's certificate is pinned by fingerprint, so
/// the name only has to match what the relay certificate carries.
pub const RELAY_SERVER_NAME: &str = "overlan-relay";

/// The largest datagram payload overlan carries, in bytes. It fits a QUIC DATAGRAM frame
/// on a path of the minimum QUIC MTU (1200 bytes) with the overlan header and leaves
/// headroom for relay-to-relay headers, so a datagram accepted from one member can be
/// delivered to every other member on any path. Larger payloads are refused with
/// [`ErrorCode::MessageTooLarge`], never truncated.
pub const MAX_DATAGRAM_PAYLOAD: usize = 1100;

/// Default cap on one control frame's JSON body.
pub const DEFAULT_MAX_CONTROL_FRAME: usize = 64 * 1024;

/// What went wrong, as carried on the wire in `Failed`, `Error`, `SocketClosed` and
/// `Goodbye` messages. Each side maps it to its own error type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The target VIP has no session online.
    Unreachable,
    /// Nothing listens on the target port.
    Refused,
    /// The target's application denied the connection.
    Denied,
    /// The port is already in use by this client.
    AddrInUse,
    /// The join token is wrong, revoked, expired or used up, or no client certificate.
    Unauthorized,
    /// The network has no free VIP left.
    NetworkFull,
    /// A datagram payload exceeds the maximum.
    MessageTooLarge,
    /// Something did not answer in time.
    TimedOut,
    /// A frame could not be decoded or broke the protocol's rules.
    ProtocolViolation,
    /// A datagram claimed a source address that is not the sender's.
    ForgedSource,
    /// A socket id that does not exist or does not belong to the sender.
    UnknownSocket,
    /// The port is not usable (e.g. sending from a port that is not bound).
    InvalidPort,
    /// The same identity and instance joined again; this older session was closed.
    Replaced,
    /// The peer's session ended; its sockets are gone.
    SessionLost,
    /// The peer closed or aborted the socket.
    Closed,
    /// The relay is shutting down or terminated the socket.
    RelayShutdown,
    /// The peer speaks another protocol version.
    UnsupportedVersion,
    /// The relay hit an internal error; the request may be retried.
    Internal,
    /// A per-session or per-identity limit of the relay was reached.
    LimitExceeded,
}

impl ErrorCode {
    /// A short human phrase for the code, used in error lines.
    pub fn describe(self) -> &'static str {
        match self {
            ErrorCode::Unreachable => "unreachable (no such VIP online)",
            ErrorCode::Refused => "refused (nothing listening)",
            ErrorCode::Denied => "denied by the peer",
            ErrorCode::AddrInUse => "address in use",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NetworkFull => "network full (no free VIP)",
            ErrorCode::MessageTooLarge => "message too large",
            ErrorCode::TimedOut => "timed out",
            ErrorCode::ProtocolViolation => "protocol violation",
            ErrorCode::ForgedSource => "forged source address",
            ErrorCode::UnknownSocket => "unknown socket",
            ErrorCode::InvalidPort => "invalid port",
            ErrorCode::Replaced => "replaced by a newer session of the same identity and instance",
            ErrorCode::SessionLost => "peer session lost",
            ErrorCode::Closed => "closed by the peer",
            ErrorCode::RelayShutdown => "terminated by the relay",
            ErrorCode::UnsupportedVersion => "unsupported protocol version",
            ErrorCode::Internal => "relay internal error",
            ErrorCode::LimitExceeded => "limit reached",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// QUIC connection close codes the relay uses; the reason bytes carry a human message.
pub mod close_code {
    /// Normal close (client left, relay shut down).
    pub const NORMAL: u32 = 0;
    /// A newer session of the same identity and instance took over.
    pub const REPLACED: u32 = 1;
    /// Token or certificate rejected.
    pub const UNAUTHORIZED: u32 = 2;
    /// The peer broke the protocol (malformed or oversized frame, bad hello).
    pub const PROTOCOL_VIOLATION: u32 = 3;
    /// The network has no free VIP.
    pub const NETWORK_FULL: u32 = 4;
    /// The relay is shutting down.
    pub const SHUTDOWN: u32 = 5;
    /// The hello did not arrive in time.
    pub const TIMED_OUT: u32 = 6;
    /// Relay internal error, or the relay is busy; joining again may work.
    pub const INTERNAL: u32 = 7;
    /// A limit of the relay refuses this client (e.g. its identity holds the most
    /// instances a network allows); joining again will not help.
    pub const LIMIT: u32 = 8;
    /// The hello asked to join only with a VIP held already, and this identity and
    /// instance hold none in the network.
    pub const NO_LEASE: u32 = 9;
}

/// QUIC stream reset / stop codes on virtual stream sockets.
pub mod reset_code {
    /// The peer application aborted the socket.
    pub const ABORTED: u32 = 1;
    /// The peer's session ended (closed, timed out, replaced).
    pub const SESSION_LOST: u32 = 2;
    /// The stream named a socket id that is not the sender's.
    pub const UNKNOWN_SOCKET: u32 = 3;
    /// The other side never attached its stream in time.
    pub const TIMED_OUT: u32 = 4;
    /// The relay terminated the socket (shutdown or operator action).
    pub const RELAY_TERMINATED: u32 = 5;
    /// The stream header was malformed.
    pub const BAD_HEADER: u32 = 6;
    /// The receiver took no data for too long (or the relay's cap on bytes held for
    /// slow receivers was reached); the relay cut the socket.
    pub const RECEIVER_STALLED: u32 = 7;
    /// The link between two relay nodes that carried the socket was lost.
    pub const LINK_LOST: u32 = 8;

    /// A human phrase for a reset code.
    pub fn describe(code: u64) -> &'static str {
        match code as u32 {
            ABORTED => "connection aborted by the peer",
            SESSION_LOST => "peer session lost",
            UNKNOWN_SOCKET => "unknown socket",
            TIMED_OUT => "peer never attached (timed out)",
            RELAY_TERMINATED => "terminated by the relay",
            BAD_HEADER => "malformed stream header",
            RECEIVER_STALLED => "cut off by the relay: the receiver took no data for too long",
            LINK_LOST => "the link between relay nodes that carried it was lost",
            _ => "reset by the peer",
        }
    }
}
