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
