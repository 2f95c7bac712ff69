//! The relay's side of TUN mode, without a TUN device: sessions that joined in TUN mode
//! send IPv4 packets (routed by destination, dropped and counted unless their source is
//! the sender's VIP), take every datagram to their VIP and every broadcast, and
//! interoperate with datagram sockets of ordinary sessions; across a cluster too.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use bytes::Bytes;
use overlan_client::{Client, JoinOptions};
use overlan_integration_tests::*;
use overlan_server::counters::Reason;
use overlan_shared::wire::datagram::{DatagramHeader, IpPacket, IP_PREFIX_LEN, MAX_IP_PACKET};
use overlan_shared::Invite;

async fn join_tun(invite: &Invite) -> Client {
    let options = JoinOptions::new(invite.clone(), identity()).tun(true);
    within("join in TUN mode", Client::join(options)).await.expect("join")
}

/// A minimal IPv4 packet (protocol 253, "for experiments") of `len` bytes.
fn packet(src: Ipv4Addr, dst: Ipv4Addr, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 253;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    for (i, b) in p[20..].iter_mut().enumerate() {
        *b = i as u8;
    }
    p
}

/// The next raw datagram of a TUN session, or `None` within `wait`.
async fn next(rx: &mut tokio::sync::mpsc::Receiver<Bytes>, wait: Duration) -> Option<Bytes> {
    tokio::time::timeout(wait, rx.recv()).await.ok().flatten()
}

#[tokio::test]
async fn tun_sessions_carry_ip_packets_with_checked_sources() {
    let relay = TestRelay::start();
    let (a, b) = (join_tun(&relay.invite()).await, join_tun(&relay.invite()).await);
    let mut b_rx = b.take_tun_datagrams().unwrap();
    let mut a_rx = a.take_tun_datagrams().unwrap();
    // A full-size packet from a to b arrives whole.
    let sent = packet(a.vip(), b.vip(), MAX_IP_PACKET);
    a.send_raw_datagram(IpPacket::datagram(&sent).into()).await.unwrap();
    let got = within("b's packet", b_rx.recv()).await.unwrap();
    assert_eq!(&got[IP_PREFIX_LEN..], &sent[..]);
    b.send_raw_datagram(IpPacket::datagram(&packet(b.vip(), a.vip(), 84)).into()).await.unwrap();
    assert_eq!(within("a's packet", a_rx.recv()).await.unwrap().len(), IP_PREFIX_LEN + 84);

    // A packet claiming b's VIP as its source, one to an ordinary session, one to a
    // broadcast address and a malformed one: dropped and counted, nothing delivered.
    let plain = join(&relay.invite()).await;
    let before = relay.counters().get(Reason::TunPacketDropped);
    for bad in [
        IpPacket::datagram(&packet(b.vip(), b.vip(), 60)),
        IpPacket::datagram(&packet(a.vip(), plain.vip(), 60)),
        IpPacket::datagram(&packet(a.vip(), Ipv4Addr::BROADCAST, 60)),
        IpPacket::datagram(&packet(a.vip(), b.vip(), 60))[..40].to_vec(),
    ] {
        a.send_raw_datagram(bad.into()).await.unwrap();
    }
    within("the drops are counted", async {
        while relay.counters().get(Reason::TunPacketDropped) < before + 4 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(next(&mut b_rx, Duration::from_millis(300)).await.is_none(), "b got a forged packet");

    // An ordinary session may not send packets: it is told.
    let mut notices = plain.notices();
    let from_plain = packet(plain.vip(), b.vip(), 60);
    plain.send_raw_datagram(IpPacket::datagram(&from_plain).into()).await.unwrap();
    let notice = within("the notice", notices.recv()).await.unwrap();
    assert!(notice.message.contains("not join in TUN mode"), "{notice:?}");
    assert!(next(&mut b_rx, Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn tun_sessions_and_datagram_sockets_interoperate_and_broadcasts_reach_tun_sessions() {
    let relay = TestRelay::start();
    let tun = join_tun(&relay.invite()).await;
    let mut tun_rx = tun.take_tun_datagrams().unwrap();
    let other_tun = join_tun(&relay.invite()).await;
    let mut other_rx = other_tun.take_tun_datagrams().unwrap();
    let plain = join(&relay.invite()).await;
    let socket = plain.bind_datagram(5000).await.unwrap();
    // From the TUN session's port 40000 (never bound: in TUN mode every port of the
    // VIP is its own) to the socket, and the answer back to that port.
    let from = SocketAddrV4::new(tun.vip(), 40000);
    let mut datagram = DatagramHeader { src: from, dst: socket.local_addr() }.to_bytes().to_vec();
    datagram.extend_from_slice(b"hello socket");
    tun.send_raw_datagram(datagram.into()).await.unwrap();
    let got = within("the socket's datagram", socket.recv()).await.unwrap();
    assert_eq!((got.src, &got.payload[..]), (from, &b"hello socket"[..]));
    socket.send_to(b"hello tun", from).await.unwrap();
    let back = within("the answer", tun_rx.recv()).await.unwrap();
    let header = DatagramHeader::parse(&back).unwrap();
    assert_eq!((header.src, header.dst), (socket.local_addr(), from));
    assert_eq!(&back[overlan_shared::wire::datagram::HEADER_LEN..], b"hello tun");
    // A broadcast of the ordinary session reaches both TUN sessions (any port), once.
    socket.send_to(b"lobby", SocketAddrV4::new(Ipv4Addr::BROADCAST, 4445)).await.unwrap();
    for rx in [&mut tun_rx, &mut other_rx] {
        let b = within("the broadcast", rx.recv()).await.unwrap();
        let header = DatagramHeader::parse(&b).unwrap();
        assert_eq!(header.dst, SocketAddrV4::new(Ipv4Addr::BROADCAST, 4445));
        assert!(next(rx, Duration::from_millis(200)).await.is_none(), "a second copy");
    }
    // Source stamping still holds for TUN sessions: another VIP as source is refused.
    let mut notices = tun.notices();
    let forged = DatagramHeader { src: SocketAddrV4::new(plain.vip(), 5000), dst: socket.local_addr() };
    tun.send_raw_datagram(Bytes::copy_from_slice(&forged.to_bytes())).await.unwrap();
    let notice = within("the notice", notices.recv()).await.unwrap();
    assert!(notice.message.contains("is not this session's VIP"), "{notice:?}");
}

#[tokio::test]
async fn ip_packets_cross_a_line_of_three_nodes() {
    let cluster = TestCluster::line().await;
    let a = join_tun(&cluster.invite(0)).await;
    let b = join_tun(&cluster.invite(2)).await;
    let mut b_rx = b.take_tun_datagrams().unwrap();
    cluster.nodes[0].routed(b.vip()).await;
    let sent = packet(a.vip(), b.vip(), MAX_IP_PACKET);
    within("the packet crosses two links", async {
        loop {
            a.send_raw_datagram(IpPacket::datagram(&sent).into()).await.unwrap();
            if let Some(got) = next(&mut b_rx, Duration::from_millis(200)).await {
                assert_eq!(&got[IP_PREFIX_LEN..], &sent[..]);
                return;
            }
        }
    })
    .await;
}
