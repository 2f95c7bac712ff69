//! Federated relay nodes, in-process: three nodes in a line and in a triangle, with
//! clients on different nodes. Every socket semantic across nodes, broadcast exactly
//! once, withdrawal and rerouting when a link dies, route-origin validation against a
//! lying peer, and peers that are not of the cluster refused.

use std::net::SocketAddrV4;
use std::time::Duration;

use overlan_client::Error;
use overlan_integration_tests::*;
use overlan_shared::wire::MAX_DATAGRAM_PAYLOAD;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Connects, waiting first until `via` routes the target (routes converge quickly, but
/// a test must not race them).
async fn connect_via(via: &TestRelay, client: &overlan_client::Client, to: SocketAddrV4) -> overlan_client::VirtualStream {
    via.routed(*to.ip()).await;
    within("connect", client.connect(to)).await.expect("connect across the cluster")
}

#[tokio::test]
async fn streams_cross_a_line_of_three_nodes() {
    let cluster = TestCluster::line().await;
    let a = join(&cluster.invite(0)).await;
    let c = join(&cluster.invite(2)).await;
    assert_ne!(a.vip(), c.vip(), "nodes hand out VIPs from their own slots");
    assert_eq!(cluster.nodes[0].routed(c.vip()).await, "n1", "n0 reaches n2 through n1");

    // Refused, then accepted: the listener's node answers.
    let target = SocketAddrV4::new(c.vip(), 7000);
    cluster.nodes[0].routed(c.vip()).await;
    let err = within("refused", a.connect(target)).await.unwrap_err();
    assert!(matches!(err, Error::Refused { .. }), "{err}");
    let listener = c.listen(7000).await.unwrap();
    let mut out = connect_via(&cluster.nodes[0], &a, target).await;
    let (mut inc, peer) = within("accept", listener.accept()).await.unwrap();
    assert_eq!(peer, out.local_addr(), "the listener sees the connector's own VIP and port");
    assert_eq!(*peer.ip(), a.vip());

    // Both directions, 4 MiB each, then half-close carried through.
    let data: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
    let send = data.clone();
    let writer = tokio::spawn(async move {
        out.write_all(&send).await.unwrap();
        out.shutdown().await.unwrap();
        let mut back = Vec::new();
        out.read_to_end(&mut back).await.unwrap();
        back
    });
    let mut got = Vec::new();
    within("read across nodes", inc.read_to_end(&mut got)).await.unwrap();
    assert!(got == data, "bytes arrive unchanged across two hops");
    inc.write_all(b"reply after half-close").await.unwrap();
    inc.shutdown().await.unwrap();
    let back = within("reply", writer).await.unwrap();
    assert_eq!(back, b"reply after half-close");
}

#[tokio::test]
async fn denied_and_unreachable_across_nodes() {
    let cluster = TestCluster::line().await;
    let a = join(&cluster.invite(0)).await;
    let c = join(&cluster.invite(2)).await;
    let listener = c.listen_with_approval(7001).await.unwrap();
    cluster.nodes[0].routed(c.vip()).await;
    let connect = tokio::spawn({
        let a = a.clone();
        let to = SocketAddrV4::new(c.vip(), 7001);
        async move { a.connect(to).await }
    });
    let incoming = within("offer", listener.incoming()).await.unwrap();
    incoming.deny();
    let err = within("denied", connect).await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Denied { .. }), "{err}");

    // A VIP nobody holds: unreachable at once.
    let nobody = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 77, 200, 9), 7000);
    let err = within("unreachable", a.connect(nobody)).await.unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
}

#[tokio::test]
async fn datagrams_cross_nodes_with_the_stamped_source_and_the_same_max() {
    let cluster = TestCluster::line().await;
    let a = join(&cluster.invite(0)).await;
    let c = join(&cluster.invite(2)).await;
    let sa = a.bind_datagram(4000).await.unwrap();
    let sc = c.bind_datagram(4001).await.unwrap();
    cluster.nodes[0].routed(c.vip()).await;
    cluster.nodes[2].routed(a.vip()).await;
    assert_eq!(sa.max_payload(), sc.max_payload(), "the same maximum on every path");

    let big = vec![0x5au8; MAX_DATAGRAM_PAYLOAD];
    // Datagrams are unreliable; the first may race the route at the middle node.
    let d = within("datagram across two hops", async {
        loop {
            sa.send_to(&big, sc.local_addr()).await.unwrap();
            if let Ok(Ok(d)) = tokio::time::timeout(Duration::from_millis(200), sc.recv()).await {
                return d;
            }
        }
    })
    .await;
    assert_eq!(d.src, sa.local_addr(), "the source the origin node stamped arrives");
    assert_eq!(d.payload.len(), MAX_DATAGRAM_PAYLOAD);
    sc.send_to(b"back", d.src).await.unwrap();
    let back = within("reply", sa.recv()).await.unwrap();
    assert_eq!((&back.payload[..], back.src), (&b"back"[..], sc.local_addr()));
}

#[tokio::test]
async fn a_broadcast_reaches_every_member_on_every_node_exactly_once() {
    // A triangle has a cycle: without de-duplication every node would see it twice.
    let cluster = TestCluster::triangle().await;
    let mut members = Vec::new();
    for i in 0..3 {
        for _ in 0..2 {
            let client = join(&cluster.invite(i)).await;
            let socket = client.bind_datagram(27015).await.unwrap();
            members.push((client, socket));
        }
    }
    for node in &cluster.nodes {
        for (client, _) in &members {
            node.routed(client.vip()).await;
        }
    }
    let (sender, socket) = &members[0];
    socket.send_to(b"lobby?", SocketAddrV4::new(sender.broadcast_addr(), 27015)).await.unwrap();
    for (client, socket) in &members[1..] {
        let d = within("broadcast", socket.recv()).await.unwrap();
        assert_eq!((&d.payload[..], d.src), (&b"lobby?"[..], SocketAddrV4::new(sender.vip(), 27015)), "{}", client.vip());
    }
    // Nothing more: not a second copy anywhere, no copy to the sender.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (client, socket) in &members {
        let extra = tokio::time::timeout(Duration::from_millis(1), socket.recv()).await;
        assert!(extra.is_err(), "{} got a second copy", client.vip());
    }
}

#[tokio::test]
async fn a_dead_link_withdraws_its_routes_and_a_triangle_reroutes() {
    let cluster = TestCluster::triangle().await;
    let a = join(&cluster.invite(0)).await;
    let c = join(&cluster.invite(2)).await;
    assert_eq!(cluster.nodes[0].routed(c.vip()).await, "n2", "the direct link wins");
    let listener = c.listen(7002).await.unwrap();
    let target = SocketAddrV4::new(c.vip(), 7002);
    let mut before = connect_via(&cluster.nodes[0], &a, target).await;
    let (mut inc, _) = within("accept", listener.accept()).await.unwrap();
    before.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    within("first byte", inc.read_exact(&mut one)).await.unwrap();

    // Cut n0 — n2: the open socket crossed it and gets an error at both ends; new
    // traffic goes through n1 at once.
    assert!(cluster.nodes[0].handle().cut_links_to("n2") > 0);
    let mut rest = Vec::new();
    let err = within("reset across a dead link", inc.read_to_end(&mut rest)).await.unwrap_err();
    assert!(err.to_string().contains("link"), "{err}");
    let mut buf = [0u8; 16];
    let err = within("reset at the connector", before.read(&mut buf)).await.unwrap_err();
    assert!(err.to_string().contains("link"), "{err}");

    within("rerouted", async {
        loop {
            if cluster.nodes[0].handle().next_hop("default", c.vip()).as_deref() == Some("n1") {
                return;
            }
            // The dialer may have relinked already: cut again until the detour shows.
            cluster.nodes[0].handle().cut_links_to("n2");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let mut after = within("connect over the detour", a.connect(target)).await.expect("rerouted connect");
    let (mut inc, _) = within("accept", listener.accept()).await.unwrap();
    after.write_all(b"detour").await.unwrap();
    after.shutdown().await.unwrap();
    let mut got = Vec::new();
    within("read over the detour", inc.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"detour");
}

#[tokio::test]
async fn a_stopped_node_is_withdrawn_and_its_vips_answer_unreachable_at_once() {
    let mut cluster = TestCluster::line().await;
    let a = join(&cluster.invite(0)).await;
    let c = join(&cluster.invite(2)).await;
    let _l = c.listen(7003).await.unwrap();
    cluster.nodes[0].routed(c.vip()).await;
    cluster.nodes[2].stop();
    cluster.nodes[0].unrouted(c.vip()).await;
    let started = std::time::Instant::now();
    let err = within("unreachable", a.connect(SocketAddrV4::new(c.vip(), 7003))).await.unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2), "answered at once, not after a timeout");
}
