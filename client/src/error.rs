//! The client's error type: what went wrong, named so a program can match on it and a
//! person can read it ("connect 10.77.0.9:7000: refused (nothing listening)").

use std::net::SocketAddrV4;

use overlan_shared::wire::ErrorCode;

/// Everything the client library can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The target VIP has no session online.
    #[error("connect {addr}: unreachable (no session has that VIP)")]
    Unreachable {
        /// The target.
        addr: SocketAddrV4,
    },
    /// Nothing listens on the target port.
    #[error("connect {addr}: refused (nothing listening)")]
    Refused {
        /// The target.
        addr: SocketAddrV4,
    },
    /// The target's application denied the connection.
    #[error("connect {addr}: denied by the peer")]
    Denied {
        /// The target.
        addr: SocketAddrV4,
    },
    /// A datagram payload is larger than the network carries.
    #[error("datagram payload exceeds the maximum of {max} bytes")]
    MessageTooLarge {
        /// The exact maximum payload in bytes.
        max: usize,
    },
    /// The port is already in use by this client.
    #[error("port {port}: address in use")]
    AddrInUse {
        /// The port.
        port: u16,
    },
    /// The relay refused the join: wrong, revoked, expired or used-up token.
    #[error("{0}")]
    Unauthorized(String),
    /// The session with the relay ended; open sockets are gone.
    #[error("{}", said("session lost", .0))]
    SessionLost(String),
    /// A newer session of the same identity and instance took over; this one does not
    /// reconnect (two copies would keep replacing each other).
    #[error("session lost: {0}")]
    Replaced(String),
    /// Something did not answer in time.
    #[error("{}", said("timed out", .0))]
    TimedOut(String),
    /// The network has no free VIP.
    #[error("{0}")]
    NetworkFull(String),
    /// A limit of the relay refused this (too many sockets, listeners or ports in this
    /// session; or, at join, too many instances of this identity in the network).
    #[error("{0}")]
    Limit(String),
    /// The join asked for a VIP held already ([`crate::JoinOptions::existing_only`]),
    /// and this identity and instance hold none in the network.
    #[error("{0}")]
    NoLease(String),
    /// The relay's certificate is not the one the invite pins (nor a node certificate
    /// of the pinned cluster CA): the invite is for another relay, or the relay's key
    /// changed. Retrying cannot help.
    #[error("relay {relay}: {message}")]
    Untrusted {
        /// The relay address.
        relay: String,
        /// Why its certificate was not trusted.
        message: String,
    },
    /// The relay could not be reached.
    #[error("relay {relay}: {message}")]
    Connect {
        /// The relay address.
        relay: String,
        /// What failed.
        message: String,
    },
    /// The relay answered with an error this client has no variant for.
    #[error("{message}")]
    Relay {
        /// The wire code.
        code: ErrorCode,
        /// The relay's explanation.
        message: String,
    },
    /// Bad local input: invite, identity file, address.
    #[error("{0}")]
    Config(String),
}

impl Error {
    /// The error for a relay `Failed` answer to a request about `addr`.
    pub(crate) fn from_failure(
        code: ErrorCode,
        message: String,
        addr: Option<SocketAddrV4>,
        port: Option<u16>,
    ) -> Self {
        match (code, addr) {
            (ErrorCode::Unreachable, Some(addr)) => Error::Unreachable { addr },
            (ErrorCode::Refused, Some(addr)) => Error::Refused { addr },
            (ErrorCode::Denied, Some(addr)) => Error::Denied { addr },
            (ErrorCode::AddrInUse, _) if port.is_some() => Error::AddrInUse { port: port.unwrap_or(0) },
            (ErrorCode::TimedOut, _) => Error::TimedOut(message),
            (ErrorCode::SessionLost, _) => Error::SessionLost(message),
            (ErrorCode::Unauthorized, _) => Error::Unauthorized(message),
            (ErrorCode::LimitExceeded, _) => Error::Limit(message),
            _ => Error::Relay { code, message },
        }
    }

    /// Whether retrying the join cannot help (the relay refused this client for good).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Error::Unauthorized(_)
                | Error::Config(_)
                | Error::NetworkFull(_)
                | Error::Limit(_)
                | Error::NoLease(_)
                | Error::Untrusted { .. }
                | Error::Replaced(_)
                | Error::Relay { code: ErrorCode::ProtocolViolation | ErrorCode::UnsupportedVersion, .. }
        )
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        use std::io::ErrorKind;
        let kind = match &e {
            Error::Unreachable { .. } => ErrorKind::HostUnreachable,
            Error::Refused { .. } | Error::Denied { .. } => ErrorKind::ConnectionRefused,
            Error::MessageTooLarge { .. } => ErrorKind::InvalidInput,
            Error::AddrInUse { .. } => ErrorKind::AddrInUse,
            Error::Unauthorized(_) => ErrorKind::PermissionDenied,
            Error::SessionLost(_) | Error::Replaced(_) => ErrorKind::NotConnected,
            Error::TimedOut(_) => ErrorKind::TimedOut,
            _ => ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}

/// `what: message`, or the message alone when it says `what` already (the relay's
/// messages often do: "connect 10.77.0.3:80: timed out").
fn said(what: &str, message: &str) -> String {
    if message.contains(what) {
        message.to_owned()
    } else {
        format!("{what}: {message}")
    }
}
