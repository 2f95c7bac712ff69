//! Datagrams and broadcasts: stamped sources, the exact maximum payload, ports,
//! broadcast to many members (any member may broadcast; the sender gets no copy), and
//! isolation between networks.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use overlan_client::Error;
use overlan_integration_tests::*;
use overlan_shared::wire::MAX_DATAGRAM_PAYLOAD;

#[tokio::test]
async fn datagrams_carry_the_stamped_source_and_the_exact_max() {
    let relay = TestRelay::start();
    let a = join(&relay.invite()).await;
    let b = join(&relay.invite()).await;
    let sa = a.bind_datagram(0).await.unwrap();
    let sb = b.bind_datagram(5353).await.unwrap();
    assert!(sa.local_addr().port() >= 49152);
    assert_eq!(sa.max_payload(), MAX_DATAGRAM_PAYLOAD);
    assert_eq!(a.max_payload(), MAX_DATAGRAM_PAYLOAD);

    sa.send_to(b"hello", sb.local_addr()).await.unwrap();
    let mut buf = vec![0u8; sb.max_payload()];
    let (n, src) = within("datagram", sb.recv_from(&mut buf)).await.unwrap();
    assert_eq!(&buf[..n], b"hello");
    assert_eq!(src, sa.local_addr(), "source is the sender's VIP and port");

    // Reply to the source.
    sb.send_to(b"back", src).await.unwrap();
    let d = within("reply", sa.recv()).await.unwrap();
    assert_eq!(&d.payload[..], b"back");
    assert_eq!(d.src, sb.local_addr());

    // Exactly max works, max + 1 is refused with the max, nothing is truncated.
    let big = vec![0xabu8; MAX_DATAGRAM_PAYLOAD];
    sa.send_to(&big, sb.local_addr()).await.unwrap();
    let d = within("max datagram", sb.recv()).await.unwrap();
    assert_eq!(d.payload.len(), MAX_DATAGRAM_PAYLOAD);
    assert!(d.payload.iter().all(|&b| b == 0xab));
    let err = sa.send_to(&vec![0u8; MAX_DATAGRAM_PAYLOAD + 1], sb.local_addr()).await.unwrap_err();
    assert!(matches!(err, Error::MessageTooLarge { max } if max == MAX_DATAGRAM_PAYLOAD), "{err}");
}

#[tokio::test]
async fn datagram_ports_in_use() {
    let relay = TestRelay::start();
    let a = join(&relay.invite()).await;
    let _s = a.bind_datagram(27015).await.unwrap();
    let err = a.bind_datagram(27015).await.unwrap_err();
    assert!(matches!(err, Error::AddrInUse { port: 27015 }), "{err}");
    // Streams and datagrams have separate port spaces, as TCP and UDP do.
    let _l = a.listen(27015).await.unwrap();
}

#[tokio::test]
async fn any_member_broadcasts_to_every_other_member_on_the_port() {
    const MEMBERS: usize = 24;
    let relay = TestRelay::start();
    let mut clients = Vec::new();
    let mut sockets = Vec::new();
    for _ in 0..MEMBERS {
        let c = join(&relay.invite()).await;
        sockets.push(c.bind_datagram(4445).await.unwrap());
        clients.push(c);
    }
    // A member bound to another port hears nothing.
    let outsider = clients[0].bind_datagram(9999).await.unwrap();
    let broadcast = clients[0].broadcast_addr();
    assert_eq!(broadcast, Ipv4Addr::new(10, 77, 255, 255));

    // Every member, not just the first, can broadcast: the last one and a middle one.
    for (sender, dst) in [(MEMBERS - 1, Ipv4Addr::BROADCAST), (MEMBERS / 2, broadcast)] {
        let msg = format!("lobby from {sender}");
        sockets[sender].send_to(msg.as_bytes(), SocketAddrV4::new(dst, 4445)).await.unwrap();
        for (i, s) in sockets.iter().enumerate() {
            if i == sender {
                continue;
            }
            let d = within("broadcast copy", s.recv()).await.unwrap();
            assert_eq!(d.payload, msg.as_bytes());
            assert_eq!(d.src, sockets[sender].local_addr());
            assert_eq!(*d.dst.ip(), dst);
        }
    }
    // The sender got no copy of its own broadcasts, and the outsider nothing: the next
    // datagram each sees is a unicast sent now.
    let probe = clients[1].bind_datagram(0).await.unwrap();
    for s in [&sockets[MEMBERS - 1], &sockets[MEMBERS / 2], &outsider] {
        probe.send_to(b"probe", s.local_addr()).await.unwrap();
        let d = within("probe", s.recv()).await.unwrap();
        assert_eq!(&d.payload[..], b"probe", "no broadcast copy was queued before the probe");
    }
}

#[tokio::test]
async fn networks_are_isolated() {
    let relay = TestRelay::start();
    relay.store().add_network("games", "10.88.0.0/24".parse().unwrap()).unwrap();
    let games = relay.new_invite("games", None, None);
    let a = join(&relay.invite()).await;
    let g1 = join(&games).await;
    let g2 = join(&games).await;
    assert_eq!(g1.network(), "games");
    assert!(g1.subnet().contains(g1.vip()));
    assert!(!g1.subnet().contains(a.vip()));

    let sa = a.bind_datagram(7777).await.unwrap();
    let s1 = g1.bind_datagram(7777).await.unwrap();
    let s2 = g2.bind_datagram(7777).await.unwrap();
    let _listener = a.listen(80).await.unwrap();

    // A stream from another network does not reach.
    let err = g1.connect(SocketAddrV4::new(a.vip(), 80)).await.unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    // Neither do unicast datagrams nor broadcasts.
    s1.send_to(b"cross", sa.local_addr()).await.unwrap();
    s1.send_to(b"bcast", SocketAddrV4::new(Ipv4Addr::BROADCAST, 7777)).await.unwrap();
    let d = within("broadcast inside games", s2.recv()).await.unwrap();
    assert_eq!(&d.payload[..], b"bcast");
    sa.send_to(b"default-bcast", SocketAddrV4::new(Ipv4Addr::BROADCAST, 7777)).await.unwrap();
    // The default member saw neither; a probe from its own network arrives first.
    let probe = a.bind_datagram(0).await.unwrap();
    probe.send_to(b"probe", sa.local_addr()).await.unwrap();
    assert_eq!(&within("probe", sa.recv()).await.unwrap().payload[..], b"probe");
    // And the games members did not get the default network's broadcast.
    s2.send_to(b"probe2", s1.local_addr()).await.unwrap();
    assert_eq!(&within("probe2", s1.recv()).await.unwrap().payload[..], b"probe2");
    assert!(tokio::time::timeout(Duration::from_millis(200), s2.recv()).await.is_err());
}
