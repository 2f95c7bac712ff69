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
//!
//! A session in TUN mode also sends and receives whole IPv4 packets (TCP, ICMP, …
//! between TUN hosts, carried end to end):
//!
//! ```text
//! 0      kind (0x02 = IPv4 packet)
//! 1      flags (reserved, 0)
//! 2..    the packet, at most MAX_IP_PACKET bytes
//! ```
//! The relay routes it by the destination in the packet and drops it unless the
//! packet's source is the sender's VIP.

use std::net::{Ipv4Addr, SocketAddrV4};

use super::MAX_DATAGRAM_PAYLOAD;

/// Header length in bytes.
pub const HEADER_LEN: usize = 14;
/// Kind byte of a v1 datagram.
pub const KIND_DATAGRAM: u8 = 0x01;
/// Kind byte of an IPv4 packet (TUN mode).
pub const KIND_IP: u8 = 0x02;
/// Bytes in front of an IPv4 packet.
pub const IP_PREFIX_LEN: usize = 2;
/// Largest IPv4 packet a datagram carries, and so the MTU of a TUN interface: a packet
/// datagram is never larger than a full v1 datagram, so every path that carries one
/// carries the other.
pub const MAX_IP_PACKET: usize = HEADER_LEN + MAX_DATAGRAM_PAYLOAD - IP_PREFIX_LEN;

/// Source and destination of an IPv4 packet datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpPacket {
    /// The packet's source address.
    pub src: Ipv4Addr,
    /// Its destination address.
    pub dst: Ipv4Addr,
}

impl IpPacket {
    /// Parses the prefix and IPv4 header of a packet datagram; the packet is
    /// `&datagram[IP_PREFIX_LEN..]`. Its total length must be the datagram's.
    pub fn parse(datagram: &[u8]) -> Result<Self, DatagramError> {
        if datagram.len() < IP_PREFIX_LEN + 20 {
            return Err(DatagramError::TooShort(datagram.len()));
        }
        if datagram[0] != KIND_IP {
            return Err(DatagramError::UnknownKind(datagram[0]));
        }
        if datagram[1] != 0 {
            return Err(DatagramError::BadFlags(datagram[1]));
        }
        let packet = &datagram[IP_PREFIX_LEN..];
        if packet.len() > MAX_IP_PACKET {
            return Err(DatagramError::TooLarge(packet.len()));
        }
        let (version, header_len) = (packet[0] >> 4, usize::from(packet[0] & 0x0f) * 4);
        let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
        if version != 4 || header_len < 20 || total != packet.len() || header_len > total {
            return Err(DatagramError::BadPacket);
        }
        let ip = |at: usize| Ipv4Addr::new(packet[at], packet[at + 1], packet[at + 2], packet[at + 3]);
        Ok(Self { src: ip(12), dst: ip(16) })
    }

    /// `packet` as a datagram.
    pub fn datagram(packet: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(IP_PREFIX_LEN + packet.len());
        out.extend_from_slice(&[KIND_IP, 0]);
        out.extend_from_slice(packet);
        out
    }
}

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
    /// An IP packet over [`MAX_IP_PACKET`].
    #[error("IP packet of {0} bytes exceeds the maximum of {MAX_IP_PACKET}")]
    TooLarge(usize),
    /// Not a well-formed IPv4 packet (version, header length, total length).
    #[error("not a well-formed IPv4 packet")]
    BadPacket,
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
            let _ = IpPacket::parse(&bytes);
        }
    }

    #[test]
    fn ip_packets_are_checked_and_sized_like_a_full_datagram() {
        assert_eq!(MAX_IP_PACKET, 1112);
        let mut packet = vec![0u8; 28];
        packet[0] = 0x45;
        packet[2..4].copy_from_slice(&28u16.to_be_bytes());
        packet[12..16].copy_from_slice(&[10, 77, 0, 2]);
        packet[16..20].copy_from_slice(&[10, 77, 0, 3]);
        let datagram = IpPacket::datagram(&packet);
        let parsed = IpPacket::parse(&datagram).unwrap();
        assert_eq!((parsed.src, parsed.dst), (Ipv4Addr::new(10, 77, 0, 2), Ipv4Addr::new(10, 77, 0, 3)));
        let mut lying = datagram.clone();
        lying[IP_PREFIX_LEN + 3] = 200; // total length says more than there is
        assert_eq!(IpPacket::parse(&lying), Err(DatagramError::BadPacket));
        let mut v6 = datagram.clone();
        v6[IP_PREFIX_LEN] = 0x60;
        assert_eq!(IpPacket::parse(&v6), Err(DatagramError::BadPacket));
        let mut big = vec![0u8; MAX_IP_PACKET + 1];
        big[0] = 0x45;
        assert!(matches!(IpPacket::parse(&IpPacket::datagram(&big)), Err(DatagramError::TooLarge(_))));
        assert!(matches!(IpPacket::parse(&[KIND_DATAGRAM; 30]), Err(DatagramError::UnknownKind(1))));
    }

    #[test]
    fn rejects_short_and_unknown() {
        assert_eq!(DatagramHeader::parse(&[1, 0, 0]), Err(DatagramError::TooShort(3)));
        let mut wire = [0u8; HEADER_LEN];
        wire[0] = 0x7f;
        assert_eq!(DatagramHeader::parse(&wire), Err(DatagramError::UnknownKind(0x7f)));
    }
}
