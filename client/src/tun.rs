//! TUN mode: this client's VIP on a real network interface, so programs that know
//! nothing of overlan (ping, ssh, iperf3, games) use the overlay through the kernel.
//!
//! What crosses the interface and the overlay:
//! - a UDP packet becomes a virtual datagram, same addresses and ports, so a TUN host
//!   and a datagram socket of the library (or `overlan nc -u`) talk to each other; to
//!   the network's broadcast address or 255.255.255.255 it becomes an overlay broadcast;
//! - every other IPv4 packet (TCP, ICMP, fragments) travels whole, as a packet datagram,
//!   to the TUN host holding its destination: the kernels' TCP end to end;
//! - a datagram that arrives becomes a UDP packet on the interface (a broadcast as one
//!   to 255.255.255.255, which every socket bound to the port receives).
//!
//! The interface's MTU is [`MAX_IP_PACKET`], so nothing is ever too large for the
//! overlay; the relay checks every source as always.

use std::net::{Ipv4Addr, SocketAddrV4};

use std::borrow::Cow;

use bytes::{Buf, Bytes, BytesMut};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
pub use overlan_shared::wire::datagram::MAX_IP_PACKET;
use overlan_shared::wire::datagram::{DatagramHeader, IpPacket, HEADER_LEN, IP_PREFIX_LEN, KIND_IP};
use overlan_shared::Subnet;

/// What becomes of a packet the kernel sent into the interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// Send this datagram (raw, header included).
    Send(Bytes),
    /// Not for the overlay; why.
    Drop(&'static str),
}

/// Whether this process holds CAP_NET_ADMIN in its effective set (root normally does),
/// which creating a TUN interface and configuring it need. Read from /proc; if that
/// cannot be read, the answer is yes and the kernel has the last word.
pub fn may_create_interfaces() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return true };
    let Some(caps) = status.lines().find_map(|l| l.strip_prefix("CapEff:")) else { return true };
    u64::from_str_radix(caps.trim(), 16).map_or(true, |caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// Translates a packet the kernel sent into the interface of `vip` in `subnet`, in
/// place: `buf` holds the packet after [`IP_PREFIX_LEN`] bytes of room, and the datagram
/// is made in the same buffer (the prefix written in front of a packet, or a datagram
/// header written over the IP and UDP headers), so no packet is copied.
pub fn outbound(mut buf: BytesMut, vip: Ipv4Addr, subnet: Subnet) -> Outbound {
    let packet = &buf[IP_PREFIX_LEN..];
    let Ok(sliced) = SlicedPacket::from_ip(packet) else { return Outbound::Drop("not an IP packet") };
    let Some(NetSlice::Ipv4(ip)) = &sliced.net else { return Outbound::Drop("not IPv4") };
    let header = ip.header();
    let (src, dst, total_len) = (header.source_addr(), header.destination_addr(), header.total_len());
    if src != vip {
        return Outbound::Drop("source is not this VIP");
    }
    let broadcast = dst == Ipv4Addr::BROADCAST || subnet.is_broadcast(dst);
    if !broadcast && !subnet.contains(dst) {
        return Outbound::Drop("destination outside the network");
    }
    let fragment = header.more_fragments() || header.fragments_offset().value() != 0;
    if let (Some(TransportSlice::Udp(udp)), false) = (&sliced.transport, fragment) {
        let header = DatagramHeader {
            src: SocketAddrV4::new(src, udp.source_port()),
            dst: SocketAddrV4::new(if broadcast { Ipv4Addr::BROADCAST } else { dst }, udp.destination_port()),
        };
        // The payload follows the IP and UDP headers (at least 28 bytes): the 14-byte
        // datagram header goes just in front of it.
        let start = IP_PREFIX_LEN + usize::from(ip.header().ihl()) * 4 + 8 - HEADER_LEN;
        let len = HEADER_LEN + udp.payload().len();
        buf[start..start + HEADER_LEN].copy_from_slice(&header.to_bytes());
        buf.advance(start);
        buf.truncate(len);
        return Outbound::Send(buf.freeze());
    }
    if broadcast {
        return Outbound::Drop("a broadcast that is not UDP");
    }
    let len = IP_PREFIX_LEN + usize::from(total_len);
    buf[..IP_PREFIX_LEN].copy_from_slice(&[KIND_IP, 0]);
    buf.truncate(len);
    Outbound::Send(buf.freeze())
}

/// The packet to write into the interface for a datagram that arrived, if any (a
/// packet datagram's own bytes; a UDP packet built for a datagram).
pub fn inbound(datagram: &[u8], subnet: Subnet) -> Option<Cow<'_, [u8]>> {
    if datagram.first() == Some(&KIND_IP) {
        IpPacket::parse(datagram).ok()?;
        return Some(Cow::Borrowed(&datagram[IP_PREFIX_LEN..]));
    }
    let header = DatagramHeader::parse(datagram).ok()?;
    let payload = &datagram[HEADER_LEN..];
    // A subnet broadcast is written as a limited broadcast: the kernel delivers that to
    // every socket bound to the port, whatever routes the interface has.
    let dst = match *header.dst.ip() {
        ip if subnet.is_broadcast(ip) => Ipv4Addr::BROADCAST,
        ip => ip,
    };
    let builder =
        PacketBuilder::ipv4(header.src.ip().octets(), dst.octets(), 64).udp(header.src.port(), header.dst.port());
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut out, payload).ok()?;
    Some(Cow::Owned(out))
}

#[cfg(target_os = "linux")]
pub use linux::{check_name, open, open_in_namespace, run, Device, Namespace};

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::net::Ipv4Addr;

    use overlan_shared::Subnet;

    use bytes::BytesMut;

    use super::{inbound, outbound, Outbound, IP_PREFIX_LEN, MAX_IP_PACKET};

    /// Largest packet taken from the interface: its MTU, with room to spare so a packet
    /// that is somehow larger is seen whole (and then checked) rather than cut.
    const READ_MAX: usize = 2 * MAX_IP_PACKET;
    /// Packets handled together: what one read from the interface may hold once split
    /// (a TCP segment of up to 64 KiB cut to the MTU: about 60), and the most packets
    /// written to it together.
    const BATCH: usize = tun_rs::IDEAL_BATCH_SIZE;
    /// One read from an interface with offloads: the kernel's header and a segment of up
    /// to 64 KiB.
    const RAW_READ: usize = tun_rs::VIRTIO_NET_HDR_LEN + 65_535;
    /// The capacity of a buffer written to the interface: the packets of one flow are
    /// joined into the first one's buffer, up to a 64 KiB segment, and only where the
    /// buffer has room (the offload code does not grow it). Pages are touched only as
    /// segments fill them.
    const GRO_BUFFER: usize = 2 * tun_rs::VIRTIO_NET_HDR_LEN + 65_535;
    use crate::{Client, Error};

    /// An overlay interface; removed (with its address and routes) when dropped.
    pub struct Device {
        dev: tun_rs::AsyncDevice,
        /// The interface's name.
        pub name: String,
    }

    /// Makes the interface (`name`, or the kernel's next `overlanN`) holding `vip` with
    /// `subnet`'s prefix, MTU [`MAX_IP_PACKET`], up, and a route for 255.255.255.255
    /// through it, so a program that broadcasts without choosing an interface reaches
    /// the overlay even on a host with no default route. Needs root or CAP_NET_ADMIN.
    ///
    /// The interface has segmentation and checksum offloads: the kernel hands over TCP
    /// segments of up to 64 KiB in one read, which [`run`] cuts to the MTU, and takes
    /// the packets of one flow that arrive together as one segment, so the kernels'
    /// TCP handles a few large segments instead of many packets (as wireguard-go does).
    pub fn open(name: Option<&str>, vip: Ipv4Addr, subnet: Subnet) -> Result<Device, String> {
        let build = |offload: bool| {
            tun_rs::DeviceBuilder::new()
                .name(name.unwrap_or("overlan%d"))
                .ipv4(vip, subnet.prefix(), None)
                .mtu(MAX_IP_PACKET as u16)
                .packet_information(false)
                .offload(offload)
                .build_async()
        };
        let dev = with_offloads_if_possible(build).map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied => {
                format!("creating the TUN interface: {e} (overlan tun needs root or CAP_NET_ADMIN)")
            }
            io::ErrorKind::NotFound => format!("creating the TUN interface: {e} (is /dev/net/tun there?)"),
            _ if e.raw_os_error() == Some(16) => {
                format!("creating the TUN interface: {e} (a TUN device of that name is in use: another overlan tun?)")
            }
            _ => format!("creating the TUN interface: {e}"),
        })?;
        let name = dev.name().map_err(|e| format!("TUN interface name: {e}"))?;
        dev.enabled(true).map_err(|e| format!("bringing {name} up: {e}"))?;
        if let Err(e) = ip(&["route", "replace", "255.255.255.255/32", "dev", &name]) {
            tracing::warn!(interface = %name, error = %e,
                "no route for 255.255.255.255 through the overlay; broadcasts may go elsewhere");
        }
        Ok(Device { dev, name })
    }

    /// Whether `name` can be the overlay interface's: a valid interface name, and not an
    /// interface other than a TUN device (an existing persistent TUN device is taken).
    pub fn check_name(name: &str) -> Result<(), String> {
        if name.is_empty() || name.len() > 15 || name.contains(['/', ':']) || name.chars().any(char::is_whitespace) {
            return Err(format!(
                "--dev {name:?}: an interface name has 1 to 15 characters, none of them / : or blanks"
            ));
        }
        let sys = std::path::Path::new("/sys/class/net").join(name);
        if sys.exists() && !sys.join("tun_flags").exists() {
            return Err(format!("--dev {name}: an interface of that name exists and is not a TUN device"));
        }
        Ok(())
    }

    /// Builds the interface with offloads; where the kernel refuses them (not for want
    /// of rights or of /dev/net/tun), without: slower, same packets.
    fn with_offloads_if_possible(
        build: impl Fn(bool) -> io::Result<tun_rs::AsyncDevice>,
    ) -> io::Result<tun_rs::AsyncDevice> {
        match build(true) {
            Err(e) if !matches!(e.kind(), io::ErrorKind::PermissionDenied | io::ErrorKind::NotFound) => {
                tracing::info!(error = %e, "the kernel refused TUN offloads; the interface runs without them");
                build(false)
            }
            made => made,
        }
    }

    /// A network namespace made for one program (`overlan run`); deleted when dropped.
    pub struct Namespace {
        /// Its name (`ip netns` shows it while it runs).
        pub name: String,
    }

    impl Namespace {
        /// The processes in the namespace (`ip netns pids`).
        fn pids(&self) -> Vec<String> {
            std::process::Command::new("ip")
                .args(["netns", "pids", &self.name])
                .output()
                .map(|out| String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default()
        }

        fn signal(pids: &[String], signal: &str) {
            let _ = std::process::Command::new("kill").arg(format!("-{signal}")).args(pids).output();
        }

        /// Ends every process left in the namespace: SIGTERM, then SIGKILL to those still
        /// there a second later.
        pub async fn stop_processes(&self) {
            for signal in ["TERM", "KILL"] {
                let pids = self.pids();
                if pids.is_empty() {
                    return;
                }
                Self::signal(&pids, signal);
                for _ in 0..20 {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    if self.pids().is_empty() {
                        return;
                    }
                }
            }
        }
    }

    impl Drop for Namespace {
        fn drop(&mut self) {
            // Nothing may outlive the namespace's name (a program's children included).
            let pids = self.pids();
            if !pids.is_empty() {
                Self::signal(&pids, "KILL");
            }
            // `ip netns` calls of other processes at the same moment can make one fail
            // (iproute2 remounts /run/netns as it goes): try again before giving up.
            let mut why = String::new();
            for _ in 0..5 {
                match ip(&["netns", "del", &self.name]) {
                    Ok(()) => return,
                    Err(e) => why = e,
                }
                if !std::path::Path::new("/run/netns").join(&self.name).exists() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            eprintln!(
                "overlan: the network namespace {} stays: {why}; remove it with `ip netns del {}`",
                self.name, self.name
            );
        }
    }

    /// Runs `ip ARGS`, saying what failed.
    fn ip(args: &[&str]) -> Result<(), String> {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("running `ip` (iproute2): {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
        }
    }

    /// A network namespace `name` whose only interfaces are loopback and an overlay
    /// interface `overlan0` holding `vip` with `subnet`'s prefix (and the route for
    /// 255.255.255.255), for a program that must see nothing else. The interface is made
    /// here and moved in; this process keeps carrying its packets. Needs root.
    pub fn open_in_namespace(name: &str, vip: Ipv4Addr, subnet: Subnet) -> Result<(Device, Namespace), String> {
        let dev = with_offloads_if_possible(|offload| {
            tun_rs::DeviceBuilder::new()
                .name("overlan%d")
                .mtu(MAX_IP_PACKET as u16)
                .packet_information(false)
                .offload(offload)
                .build_async()
        })
        .map_err(|e| format!("creating the TUN interface: {e} (overlan run needs root)"))?;
        let made = dev.name().map_err(|e| format!("TUN interface name: {e}"))?;
        ip(&["netns", "add", name])?;
        let namespace = Namespace { name: name.to_owned() };
        let address = format!("{vip}/{}", subnet.prefix());
        let mtu = MAX_IP_PACKET.to_string();
        ip(&["link", "set", &made, "netns", name])?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        ip(&["-n", name, "link", "set", &made, "name", "overlan0"])?;
        ip(&["-n", name, "addr", "add", &address, "dev", "overlan0"])?;
        ip(&["-n", name, "link", "set", "overlan0", "mtu", &mtu, "up"])?;
        ip(&["-n", name, "route", "add", "255.255.255.255/32", "dev", "overlan0"])?;
        Ok((Device { dev, name: "overlan0".to_owned() }, namespace))
    }

    /// Carries packets between the interface and the overlay until the session ends
    /// for good (or an I/O error of the interface). `client` must have joined in TUN
    /// mode.
    pub async fn run(client: Client, device: &Device) -> Result<(), String> {
        let mut arriving = client.take_tun_datagrams().ok_or("the client did not join in TUN mode")?;
        let (vip, subnet) = (client.vip(), client.subnet());
        let dev = &device.dev;
        let to_overlay = async {
            // Each packet lands after room for the datagram prefix, in a slot buffer it
            // is then split off (a slot allocates anew only every few dozen packets).
            let mut raw = vec![0; RAW_READ];
            let mut slots: Vec<BytesMut> = (0..BATCH).map(|_| BytesMut::zeroed(IP_PREFIX_LEN + READ_MAX)).collect();
            let mut sizes = [0; BATCH];
            loop {
                let n = dev.recv_multiple(&mut raw, &mut slots, &mut sizes, IP_PREFIX_LEN).await.map_err(|e| {
                    match e.raw_os_error() {
                        // EBADFD: the interface was deleted under the device.
                        Some(77) => format!("the interface {} was removed", device.name),
                        _ => format!("reading {}: {e}", device.name),
                    }
                })?;
                for (slot, &size) in slots.iter_mut().zip(&sizes).take(n) {
                    let packet = slot.split_to(IP_PREFIX_LEN + size);
                    // Only the slots a read filled need their room back.
                    slot.resize(IP_PREFIX_LEN + READ_MAX, 0);
                    match outbound(packet, vip, subnet) {
                        Outbound::Send(datagram) => match client.send_raw_datagram(datagram).await {
                            Ok(()) => {}
                            // The session is down for a moment (reconnecting): like a link
                            // that lost its carrier, packets are lost, not queued.
                            Err(Error::SessionLost(_)) => {}
                            Err(e) if e.is_terminal() => return Err(e.to_string()),
                            Err(e) => tracing::debug!(error = %e, "packet dropped"),
                        },
                        Outbound::Drop(why) => tracing::trace!(why, "packet not for the overlay"),
                    }
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), String>(())
        };
        let to_interface = async {
            // The datagrams that have arrived are written together, each after room for
            // the kernel's offload header, so that packets of one TCP flow are joined.
            let mut gro = tun_rs::GROTable::default();
            let mut batch: Vec<Vec<u8>> = Vec::with_capacity(BATCH);
            let mut spare: Vec<Vec<u8>> = Vec::with_capacity(BATCH);
            while let Some(first) = arriving.recv().await {
                let mut next = Some(first);
                while let Some(datagram) = next.take() {
                    if let Some(packet) = inbound(&datagram, subnet) {
                        let mut buf = spare.pop().unwrap_or_else(|| Vec::with_capacity(GRO_BUFFER));
                        buf.clear();
                        buf.resize(tun_rs::VIRTIO_NET_HDR_LEN, 0);
                        buf.extend_from_slice(&packet);
                        batch.push(buf);
                    }
                    if batch.len() < BATCH {
                        next = arriving.try_recv().ok();
                    }
                }
                if let Err(e) = dev.send_multiple(&mut gro, &mut batch, tun_rs::VIRTIO_NET_HDR_LEN).await {
                    tracing::debug!(error = %e, packets = batch.len(), "writing packets to the interface");
                }
                spare.append(&mut batch);
            }
            Err::<(), String>("the session ended".into())
        };
        tokio::try_join!(to_overlay, to_interface).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet() -> Subnet {
        "10.77.0.0/16".parse().unwrap()
    }

    /// `outbound` of `packet`, read after the room it needs, as the interface loop does.
    fn out(packet: &[u8], vip: Ipv4Addr) -> Outbound {
        let mut buf = BytesMut::zeroed(IP_PREFIX_LEN);
        buf.extend_from_slice(packet);
        outbound(buf, vip, subnet())
    }

    fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv4(src, dst, 64).udp(sport, dport);
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    #[test]
    fn udp_becomes_a_datagram_and_back() {
        let vip = Ipv4Addr::new(10, 77, 0, 2);
        let packet = udp([10, 77, 0, 2], [10, 77, 0, 3], 40000, 5000, b"hi");
        let Outbound::Send(d) = out(&packet, vip) else { panic!() };
        let h = DatagramHeader::parse(&d).unwrap();
        assert_eq!((h.src.to_string(), h.dst.to_string()), ("10.77.0.2:40000".into(), "10.77.0.3:5000".into()));
        assert_eq!(&d[HEADER_LEN..], b"hi");
        // The receiving side writes the same UDP packet into its interface.
        assert_eq!(inbound(&d, subnet()).unwrap(), &packet[..]);
    }

    #[test]
    fn broadcasts_go_out_as_overlay_broadcasts_and_come_in_as_limited_ones() {
        let vip = Ipv4Addr::new(10, 77, 0, 2);
        for dst in [[255, 255, 255, 255], [10, 77, 255, 255]] {
            let packet = udp([10, 77, 0, 2], dst, 4445, 4445, b"lobby");
            let Outbound::Send(d) = out(&packet, vip) else { panic!() };
            assert_eq!(DatagramHeader::parse(&d).unwrap().dst, SocketAddrV4::new(Ipv4Addr::BROADCAST, 4445));
        }
        let mut d =
            DatagramHeader { src: "10.77.0.3:4445".parse().unwrap(), dst: "10.77.255.255:4445".parse().unwrap() }
                .to_bytes()
                .to_vec();
        d.extend_from_slice(b"lobby");
        let written = inbound(&d, subnet()).unwrap();
        assert_eq!(written, &udp([10, 77, 0, 3], [255, 255, 255, 255], 4445, 4445, b"lobby")[..]);
    }

    #[test]
    fn other_packets_travel_whole_and_strangers_are_dropped() {
        let vip = Ipv4Addr::new(10, 77, 0, 2);
        let mut tcp = Vec::new();
        PacketBuilder::ipv4([10, 77, 0, 2], [10, 77, 0, 3], 64).tcp(40000, 22, 1, 1000).write(&mut tcp, b"x").unwrap();
        let Outbound::Send(d) = out(&tcp, vip) else { panic!() };
        assert_eq!(d[0], KIND_IP);
        assert_eq!(inbound(&d, subnet()).unwrap(), &tcp[..]);
        let other_source = udp([10, 77, 0, 9], [10, 77, 0, 3], 1, 2, b"");
        assert_eq!(out(&other_source, vip), Outbound::Drop("source is not this VIP"));
        let outside = udp([10, 77, 0, 2], [8, 8, 8, 8], 1, 53, b"");
        assert_eq!(out(&outside, vip), Outbound::Drop("destination outside the network"));
        let mut tcp_broadcast = Vec::new();
        PacketBuilder::ipv4([10, 77, 0, 2], [255, 255, 255, 255], 64)
            .tcp(1, 2, 1, 1000)
            .write(&mut tcp_broadcast, b"")
            .unwrap();
        assert_eq!(out(&tcp_broadcast, vip), Outbound::Drop("a broadcast that is not UDP"));
        assert_eq!(out(&[0u8; 3], vip), Outbound::Drop("not an IP packet"));
    }
}
