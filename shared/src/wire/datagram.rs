//! The binary header in front of every datagram payload (QUIC DATAGRAM frames). 14 bytes:
//!
//! ```text
//! 0      kind (0x01 = unicast or broadcast datagram, v1)
//! 1      flags (reserved, 0)
//! 2..6   source VIP      6..8   source port
//! 8..12  destination VIP 12..14 destination port
//! ```
//! A client fills in its own source; the relay checks it against the authenticated
//! session and stamps it, so a receiver can trust the source it sees.

use std::net::{Ipv4Addr, SocketAddrV4};

/// Header length in bytes.
pub const HEADER_LEN: usize = 14;
/// Kind byte of a v1 datagram.
pub const KIND_DATAGRAM: u8 = 0x01;

/// Source and destination of one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DatagramHeader {
    /// Sender's VIP and port.
    pub src: SocketAddrV4,
    /// Receiver's VIP and port, or a broadcast address and port.
    pub dst: SocketAddrV4,
}

/// Why a datagram header was rejected; small and `Copy` for the hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// Fewer bytes than a header.
    #[error("datagram of {0} bytes is shorter than the {HEADER_LEN}-byte header")]
    TooShort(usize),
    /// A kind this build does not know.
    #[error("unknown datagram kind {0:#04x}")]
    UnknownKind(u8),
    /// Reserved flags set.
    #[error("reserved datagram flags {0:#04x} set")]
    BadFlags(u8),
}

impl DatagramHeader {
    /// Writes the header into the first [`HEADER_LEN`] bytes of `out`.
    pub fn write(&self, out: &mut [u8; HEADER_LEN]) {
        out[0] = KIND_DATAGRAM;
        out[1] = 0;
        out[2..6].copy_from_slice(&self.src.ip().octets());
        out[6..8].copy_from_slice(&self.src.port().to_be_bytes());
        out[8..12].copy_from_slice(&self.dst.ip().octets());
        out[12..14].copy_from_slice(&self.dst.port().to_be_bytes());
    }

    /// The header as bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        self.write(&mut out);
        out
    }

    /// Parses the header at the front of `datagram`; the payload is `&datagram[HEADER_LEN..]`.
    pub fn parse(datagram: &[u8]) -> Result<Self, DatagramError> {
        if datagram.len() < HEADER_LEN {
            return Err(DatagramError::TooShort(datagram.len()));
        }
        if datagram[0] != KIND_DATAGRAM {
            return Err(DatagramError::UnknownKind(datagram[0]));
        }
        if datagram[1] != 0 {
            return Err(DatagramError::BadFlags(datagram[1]));
        }
        let ip = |at: usize| Ipv4Addr::new(datagram[at], datagram[at + 1], datagram[at + 2], datagram[at + 3]);
        let port = |at: usize| u16::from_be_bytes([datagram[at], datagram[at + 1]]);
        Ok(Self { src: SocketAddrV4::new(ip(2), port(6)), dst: SocketAddrV4::new(ip(8), port(12)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(src in any::<([u8; 4], u16)>(), dst in any::<([u8; 4], u16)>(), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let h = DatagramHeader {
                src: SocketAddrV4::new(src.0.into(), src.1),
                dst: SocketAddrV4::new(dst.0.into(), dst.1),
            };
            let mut wire = h.to_bytes().to_vec();
            wire.extend_from_slice(&payload);
            prop_assert_eq!(DatagramHeader::parse(&wire).unwrap(), h);
            prop_assert_eq!(&wire[HEADER_LEN..], &payload[..]);
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            let _ = DatagramHeader::parse(&bytes);
        }
    }

    #[test]
    fn rejects_short_and_unknown() {
        assert_eq!(DatagramHeader::parse(&[1, 0, 0]), Err(DatagramError::TooShort(3)));
        let mut wire = [0u8; HEADER_LEN];
        wire[0] = 0x7f;
        assert_eq!(DatagramHeader::parse(&wire), Err(DatagramError::UnknownKind(0x7f)));
    }
}
