//! The UDP socket under QUIC, sized for bulk traffic.
//!
//! Linux gives a UDP socket about 208 KiB of receive buffer by default. A QUIC
//! connection at full speed delivers bursts larger than that between two reads, and
//! every datagram beyond it is dropped by the kernel (counted in `UdpRcvbufErrors`):
//! loss that QUIC's congestion control answers by slowing down. Measured on loopback
//! with `overlan-bench`: see BENCHMARKS.md. Clients take both buffers this size; the
//! relay takes the receive buffer only.

use std::net::UdpSocket;

/// The send and receive buffer each QUIC socket asks for. The kernel caps the request
/// at `net.core.rmem_max` / `net.core.wmem_max` (and reports double the size granted,
/// for its own bookkeeping).
pub const SOCKET_BUFFER: usize = 4 << 20;

/// What the kernel granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferSizes {
    /// Receive buffer in bytes, as the kernel reports it.
    pub recv: usize,
    /// Send buffer in bytes, as the kernel reports it.
    pub send: usize,
}

impl BufferSizes {
    /// True if the kernel's caps kept the receive buffer below half of what was asked.
    pub fn recv_capped(&self) -> bool {
        self.recv < SOCKET_BUFFER
    }
}

/// Asks for [`SOCKET_BUFFER`] in both directions and returns what the kernel granted.
pub fn enlarge_buffers(socket: &UdpSocket) -> std::io::Result<BufferSizes> {
    // Each request is independent: a cap on one must not cost the other.
    let _ = socket2::SockRef::from(socket).set_send_buffer_size(SOCKET_BUFFER);
    enlarge_receive_buffer(socket)
}

/// Asks for a [`SOCKET_BUFFER`] receive buffer only (the relay's choice) and returns
/// what the kernel granted.
pub fn enlarge_receive_buffer(socket: &UdpSocket) -> std::io::Result<BufferSizes> {
    let sock = socket2::SockRef::from(socket);
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    Ok(BufferSizes { recv: sock.recv_buffer_size()?, send: sock.send_buffer_size()? })
}

/// A UDP socket bound to `addr` for a QUIC client: dual-stack when `addr` is IPv6 (as
/// `quinn::Endpoint::client` makes it), so one socket reaches IPv4 and IPv6 relays.
pub fn bind_client(addr: std::net::SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, None)?;
    if addr.is_ipv6() {
        // Best effort, as quinn does: where the OS refuses, IPv6 relays still work.
        let _ = socket.set_only_v6(false);
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The largest UDP payload overlan's path-MTU discovery looks for, and the largest a
/// relay or client accepts. quinn sends up to 10 packets in one segmented (GSO) send
/// and the kernel takes at most 65,507 bytes of IPv4 UDP payload in one: 10 × 6,550
/// fit. Beyond it every batched send fails and quinn's black-hole detection drops back
/// to 1,200-byte packets (measured on loopback with bounds of 16,384 and 65,000).
/// Loopback and jumbo-frame links carry packets this large; on loopback they cut the
/// packets to seal, send and acknowledge per byte by 4.5 (BENCHMARKS.md).
pub const MTU_BOUND: u16 = 6_550;

/// The discovery bound on other paths, quinn's default: a 1,500-byte Ethernet MTU
/// minus IPv6 and UDP headers. Probing beyond what a path carries costs a connection
/// CPU for nothing (a dozen lost probes of up to 6,550 bytes) and memory that quinn
/// keeps for the connection's life (about 8 KiB per idle relay session, measured).
pub const INTERNET_MTU_BOUND: u16 = 1_452;

/// How far path-MTU discovery looks on the path to `peer`: [`MTU_BOUND`] to loopback,
/// and to private and link-local addresses when this host has an interface with an MTU
/// above 1,500 (jumbo frames: a LAN or data centre that may carry them);
/// [`INTERNET_MTU_BOUND`] elsewhere.
pub fn mtu_bound_toward(peer: std::net::IpAddr) -> u16 {
    static JUMBO: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    mtu_bound_for(peer, *JUMBO.get_or_init(host_has_jumbo_interface))
}

/// [`mtu_bound_toward`], with whether this host has a jumbo-frame interface given.
pub fn mtu_bound_for(peer: std::net::IpAddr, jumbo_host: bool) -> u16 {
    use std::net::IpAddr;
    let (loopback, local) = match peer.to_canonical() {
        IpAddr::V4(ip) => (ip.is_loopback(), ip.is_private() || ip.is_link_local()),
        // Unique local fc00::/7, link-local fe80::/10.
        IpAddr::V6(ip) => {
            (ip.is_loopback(), (ip.segments()[0] & 0xfe00) == 0xfc00 || (ip.segments()[0] & 0xffc0) == 0xfe80)
        }
    };
    if loopback || (local && jumbo_host) {
        MTU_BOUND
    } else {
        INTERNET_MTU_BOUND
    }
}

/// True if an interface other than loopback has an MTU above 1,500 (Linux: read from
/// `/sys/class/net`, which shows the network namespace sysfs was mounted in; elsewhere
/// false).
fn host_has_jumbo_interface() -> bool {
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else { return false };
    dir.flatten().filter(|entry| entry.file_name() != "lo").any(|entry| {
        std::fs::read_to_string(entry.path().join("mtu"))
            .ok()
            .and_then(|mtu| mtu.trim().parse::<u32>().ok())
            .is_some_and(|mtu| mtu > 1500)
    })
}

/// The hint for a capped receive buffer, for a log line.
pub fn capped_hint(granted: BufferSizes) -> String {
    format!(
        "the UDP receive buffer is {} KiB (asked for {} KiB): bursts beyond it are dropped; \
         raise it with `sysctl -w net.core.rmem_max={} net.core.wmem_max={}`",
        granted.recv / 1024,
        SOCKET_BUFFER / 1024,
        SOCKET_BUFFER,
        SOCKET_BUFFER
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_packets_are_looked_for_only_where_a_path_may_carry_them() {
        // Loopback always (an IPv4 client seen by a dual-stack socket too).
        for jumbo in [false, true] {
            for lo in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
                assert_eq!(mtu_bound_for(lo.parse().unwrap(), jumbo), MTU_BOUND, "{lo}");
            }
        }
        // Private and link-local addresses only on a host with a jumbo-frame interface.
        for local in ["10.1.2.3", "192.168.0.9", "172.16.5.5", "169.254.1.1", "fd00::1", "fe80::1", "::ffff:10.0.0.1"] {
            assert_eq!(mtu_bound_for(local.parse().unwrap(), true), MTU_BOUND, "{local}");
            assert_eq!(mtu_bound_for(local.parse().unwrap(), false), INTERNET_MTU_BOUND, "{local}");
        }
        for public in ["1.1.1.1", "172.32.0.1", "2001:db8::1", "::ffff:8.8.8.8"] {
            for jumbo in [false, true] {
                assert_eq!(mtu_bound_for(public.parse().unwrap(), jumbo), INTERNET_MTU_BOUND, "{public}");
            }
        }
        // quinn batches 10 packets per send; the kernel takes 65,507 bytes of UDP payload.
        assert!(10 * usize::from(MTU_BOUND) <= 65_507);
    }

    #[test]
    fn buffers_grow_to_what_the_kernel_allows() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = socket2::SockRef::from(&socket).recv_buffer_size().unwrap();
        let granted = enlarge_buffers(&socket).unwrap();
        // Never smaller than before; larger unless the default already is the cap.
        assert!(granted.recv >= before, "{granted:?} < {before}");
        let cap =
            std::fs::read_to_string("/proc/sys/net/core/rmem_max").ok().and_then(|s| s.trim().parse::<usize>().ok());
        if let Some(cap) = cap {
            // The kernel doubles the request it grants.
            assert_eq!(granted.recv, 2 * SOCKET_BUFFER.min(cap), "rmem_max {cap}");
        }
    }
}
