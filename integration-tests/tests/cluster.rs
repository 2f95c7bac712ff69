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
async fn connect_via(
    via: &TestRelay,
    client: &overlan_client::Client,
    to: SocketAddrV4,
) -> overlan_client::VirtualStream {
    via.routed_in(client.network(), *to.ip()).await;
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

/// Members of other nodes are listed by their instance names (`overlan peers`, and
/// `nc NAME PORT` resolves through the list), two hops away too.
#[tokio::test]
async fn members_of_other_nodes_are_known_by_name() {
    let cluster = TestCluster::line().await;
    let a = join_as(&cluster.invite(0), &identity(), "alice").await;
    let carol = join_as(&cluster.invite(2), &identity(), "carol").await;
    let unnamed = join(&cluster.invite(1)).await;
    cluster.nodes[0].routed(carol.vip()).await;
    cluster.nodes[0].routed(unnamed.vip()).await;
    let peers = a.peers().await.unwrap();
    let of = |vip| peers.iter().find(|p| p.vip == vip).unwrap_or_else(|| panic!("{vip} missing: {peers:?}"));
    assert_eq!(of(carol.vip()).instance.as_deref(), Some("carol"));
    assert!(of(carol.vip()).online);
    assert_eq!(of(unnamed.vip()).instance.as_deref(), Some(""), "the unnamed instance");
    assert!(!peers.iter().any(|p| p.vip == a.vip()), "not itself");
    // The other way round, from the far end.
    cluster.nodes[2].routed(a.vip()).await;
    let peers = carol.peers().await.unwrap();
    assert!(peers.iter().any(|p| p.vip == a.vip() && p.instance.as_deref() == Some("alice")), "{peers:?}");
    // Its node still names it once the operator released its lease there (the session
    // goes on until its next join).
    let neighbour = join(&cluster.invite(2)).await;
    cluster.nodes[2].store().release_lease("default", carol.vip()).unwrap();
    let peers = neighbour.peers().await.unwrap();
    assert!(peers.iter().any(|p| p.vip == carol.vip() && p.instance.as_deref() == Some("carol")), "{peers:?}");
    // Gone from the list's names when it leaves (its route is withdrawn).
    carol.close();
    cluster.nodes[0].unrouted(carol.vip()).await;
    let peers = a.peers().await.unwrap();
    assert!(!peers.iter().any(|p| p.vip == carol.vip()), "{peers:?}");
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
        assert_eq!(
            (&d.payload[..], d.src),
            (&b"lobby?"[..], SocketAddrV4::new(sender.vip(), 27015)),
            "{}",
            client.vip()
        );
    }
    // Nothing more: not a second copy anywhere, no copy to the sender.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (client, socket) in &members {
        let extra = tokio::time::timeout(Duration::from_millis(1), socket.recv()).await;
        assert!(extra.is_err(), "{} got a second copy", client.vip());
    }
    // The copies that came round the mesh by other paths were duplicates, not forgeries.
    for node in &cluster.nodes {
        assert_eq!(node.counters().get(overlan_server::counters::Reason::LinkDatagramDropped), 0);
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

#[tokio::test]
async fn a_client_fails_over_to_its_next_relay_and_keeps_its_vip() {
    let mut cluster = TestCluster::triangle().await;
    let relays = vec![cluster.nodes[0].addr().to_string(), cluster.nodes[2].addr().to_string()];
    let options = overlan_client::JoinOptions::new(cluster.invite(0), identity()).relays(relays);
    assert_eq!(options.idle_timeout, overlan_client::FAILOVER_IDLE_TIMEOUT, "several relays: quick failure detection");
    let x = within("join", overlan_client::Client::join(options)).await.unwrap();
    assert_eq!(x.relay_addr(), cluster.nodes[0].addr(), "the first relay of the list");
    let vip = x.vip();
    let listener = x.listen(7000).await.unwrap();
    let socket = x.bind_datagram(5000).await.unwrap();
    let y = join(&cluster.invite(1)).await;
    cluster.nodes[1].routed(vip).await;

    cluster.nodes[0].stop();
    let started = std::time::Instant::now();
    // Back up on n2 with the same VIP (n2 adopted n0's lease from the client's proof,
    // although n0 is down), listeners and ports re-registered.
    within("failover", async {
        while x.relay_addr() != cluster.nodes[2].addr() || x.state() != overlan_client::SessionState::Up {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let failover = started.elapsed();
    assert!(failover < Duration::from_secs(5), "failover took {failover:?}");
    assert_eq!(x.vip(), vip);
    assert_eq!(cluster.nodes[2].routed(vip).await, "local");
    // n1 learns the VIP from n2, outside n2's slot, with its proof.
    within("route via n2", async {
        while cluster.nodes[1].handle().next_hop("default", vip).as_deref() != Some("n2") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let target = SocketAddrV4::new(vip, 7000);
    let mut s = within("connect after failover", async {
        loop {
            match y.connect(target).await {
                Ok(s) => return s,
                // The listener is re-registered just after the session is up.
                Err(Error::Refused { .. }) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    let (mut inc, _) = within("accept after failover", listener.accept()).await.unwrap();
    s.write_all(b"still here").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    within("read", inc.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"still here");
    let ys = y.bind_datagram(0).await.unwrap();
    ys.send_to(b"dgram", SocketAddrV4::new(vip, 5000)).await.unwrap();
    let d = within("datagram after failover", socket.recv()).await.unwrap();
    assert_eq!(&d.payload[..], b"dgram");
}

/// A QUIC connection to node 0 as a peer with `creds` (the node may refuse it at once).
async fn rogue_connect(cluster: &TestCluster, creds: overlan_shared::cluster::NodeCredentials) -> quinn::Connection {
    use overlan_shared::wire::peer::ALPN_PEER;
    let crypto = overlan_shared::cluster::peer_client_config(&creds, ALPN_PEER).unwrap();
    let quic = quinn::ClientConfig::new(std::sync::Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap(),
    ));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = within("rogue connects", endpoint.connect_with(quic, cluster.nodes[0].addr(), "overlan-relay").unwrap())
        .await
        .unwrap();
    conn
}

/// A peer of the cluster (its certificate is the CA's) that lies in its announcements.
async fn rogue_peer(
    cluster: &TestCluster,
    name: &str,
    creds: overlan_shared::cluster::NodeCredentials,
) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    rogue_process(cluster, name, creds, 7).await
}

/// A node "liar" issued by the cluster's CA, linked to node 0 as a rogue peer.
async fn linked_liar(
    cluster: &TestCluster,
) -> (overlan_shared::cluster::Issued, quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let dir = overlan_shared::cluster::ClusterDir::new(cluster.dir());
    let issued = dir.issue("liar").unwrap();
    let (conn, send, recv) = rogue_peer(cluster, "liar", dir.load_node("liar").unwrap()).await;
    within("rogue link up", async {
        while !cluster.nodes[0].handle().peer_links().contains(&"liar".to_owned()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    (issued, conn, send, recv)
}

/// A rogue peer whose hello says it is process `incarnation` of node `name`.
async fn rogue_process(
    cluster: &TestCluster,
    name: &str,
    creds: overlan_shared::cluster::NodeCredentials,
    incarnation: u64,
) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    use overlan_shared::wire::frame::FrameCodec;
    use overlan_shared::wire::peer::{PeerMessage, PEER_PROTOCOL_VERSION};
    let conn = rogue_connect(cluster, creds).await;
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let codec = FrameCodec::<PeerMessage, PeerMessage>::new(1 << 20);
    let mut buf = bytes::BytesMut::new();
    codec
        .encode_into(&PeerMessage::Hello { protocol: PEER_PROTOCOL_VERSION, node: name.into(), incarnation }, &mut buf)
        .unwrap();
    send.write_all(&buf).await.unwrap();
    (conn, send, recv)
}

#[tokio::test]
async fn a_lying_peer_cannot_take_over_another_nodes_clients() {
    use overlan_shared::route::{Announce, NetKey, RouteUpdate};
    use overlan_shared::wire::frame::FrameCodec;
    use overlan_shared::wire::peer::PeerMessage;
    let cluster = TestCluster::start(2, &[(1, 0)]).await;
    let victim = join(&cluster.invite(1)).await;
    let _l = victim.listen(7000).await.unwrap();
    assert_eq!(cluster.nodes[0].routed(victim.vip()).await, "n1");

    let (issued, conn, mut send, _recv) = linked_liar(&cluster).await;
    // Fresher than the victim's own announcement, but not from the future.
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let lie_at = |origin: &str, slot: u8, seq: u64| {
        RouteUpdate::Announce(Announce {
            net: NetKey::of("default"),
            vip: victim.vip(),
            seq,
            path: vec![origin.to_owned(), "liar".to_owned()][usize::from(origin == "liar")..].to_vec(),
            origin_slot: slot,
            proof: None,
            holder: None,
            name: None,
        })
    };
    let lie = |origin: &str, slot: u8| lie_at(origin, slot, now_ms + 1000);
    let with_proof = |update: RouteUpdate| match update {
        RouteUpdate::Announce(a) => RouteUpdate::Announce(Announce { proof: Some("x".into()), ..a }),
        withdraw => withdraw,
    };
    let n1_slot = 1;
    let updates = vec![
        // The victim's VIP as the liar's own: not in the liar's slot.
        lie("liar", issued.slot),
        // Claiming n1's slot: the liar's certificate says otherwise.
        lie("liar", n1_slot),
        // Relaying a fresher route of n1's client: plausible on its face, so not
        // counted, but n0 hears n1 itself and takes n1's word.
        lie("n1", n1_slot),
        // A node n0 never heard of, in n0's own slot, or in n1's.
        lie("ghost", 0),
        lie("ghost", n1_slot),
        // From the future (a sequence number that would win forever).
        lie_at("liar", issued.slot, u64::MAX / 2),
        // A made-up proof does not lend a ghost n1's slot or n0's own.
        with_proof(lie("ghost", n1_slot)),
        with_proof(lie("ghost", 0)),
    ];
    let codec = FrameCodec::<PeerMessage, PeerMessage>::new(1 << 20);
    let mut buf = bytes::BytesMut::new();
    codec.encode_into(&PeerMessage::Routes { updates }, &mut buf).unwrap();
    send.write_all(&buf).await.unwrap();
    let rejected = || cluster.nodes[0].counters().get(overlan_server::counters::Reason::RouteRejected);
    within("announcements rejected", async {
        while rejected() < 7 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // One more round trip on the rogue's link: every lie has been handled by now.
    let (mut s2, _) = conn.open_bi().await.unwrap();
    s2.write_all(&[0u8; 12]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rejected(), 7, "every lie but the relayed one is dropped and counted");
    assert_eq!(cluster.nodes[0].handle().next_hop("default", victim.vip()).as_deref(), Some("n1"));
    let a = join(&cluster.invite(0)).await;
    let mut s = within("connect to the victim", a.connect(SocketAddrV4::new(victim.vip(), 7000))).await.unwrap();
    s.write_all(b"to the real one").await.unwrap();
    // The victim leaves: its route is gone, not replaced by the liar's relayed copy.
    victim.close();
    cluster.nodes[0].unrouted(victim.vip()).await;
    drop(conn);
}

/// A peer that announces a roamed client's VIP with its lease proof loses the route
/// when the lease is released (the proof is void from then on), and cannot announce it
/// again with that proof.
#[tokio::test]
async fn a_route_whose_lease_was_released_is_withdrawn_and_refused() {
    use overlan_shared::route::{Announce, NetKey, RouteUpdate};
    use overlan_shared::wire::peer::PeerMessage;
    let cluster = TestCluster::start(2, &[(1, 0)]).await;
    let victim = join_as(&cluster.invite(1), &identity(), "").await;
    let (vip, proof) = (victim.vip(), victim.lease().expect("a cluster lease proof"));
    assert_eq!(cluster.nodes[0].routed(vip).await, "n1");

    let (issued, conn, mut send, _recv) = linked_liar(&cluster).await;
    let announce = || {
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        PeerMessage::Routes {
            updates: vec![RouteUpdate::Announce(Announce {
                net: NetKey::of("default"),
                vip,
                seq: now_ms + 1000,
                path: vec!["liar".into()],
                origin_slot: issued.slot,
                proof: Some(proof.clone()),
                holder: None,
                name: None,
            })],
        }
    };
    let rejected = || cluster.nodes[0].counters().get(overlan_server::counters::Reason::RouteRejected);
    // The proof does not lend the route another holder's name.
    let misnamed = match announce() {
        PeerMessage::Routes { mut updates } => {
            if let RouteUpdate::Announce(a) = &mut updates[0] {
                a.name = Some("mallory".into());
            }
            PeerMessage::Routes { updates }
        }
        _ => unreachable!(),
    };
    send_peer(&mut send, &misnamed).await;
    within("the misnamed route refused", async {
        while rejected() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(cluster.nodes[0].handle().next_hop("default", vip).as_deref(), Some("n1"));
    // As if the client had roamed to the liar: a valid proof, a fresher route (n1 takes
    // it so too, and ends the client's session there).
    send_peer(&mut send, &announce()).await;
    within("the roamed route taken", async {
        while cluster.nodes[0].handle().next_hop("default", vip).as_deref() != Some("liar") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    within("the session at n1 replaced", victim.closed()).await;
    // The operator releases the lease on its issuing node: the release reaches n0 with
    // n1's catalog, and the route that leaned on the proof goes.
    cluster.nodes[1].store().release_lease("default", vip).unwrap();
    cluster.nodes[0].unrouted(vip).await;
    // Announced again with the void proof: refused and counted.
    let before = rejected();
    send_peer(&mut send, &announce()).await;
    within("the void proof refused", async {
        while rejected() == before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(cluster.nodes[0].handle().next_hop("default", vip), None);
    drop(conn);
}

/// A client that roamed to another node, whose lease its issuing node then releases:
/// the node it roamed to ends its session (and so stops announcing the VIP).
#[tokio::test]
async fn a_roamed_session_whose_lease_is_released_is_ended() {
    let cluster = TestCluster::start(2, &[(1, 0)]).await;
    let me = identity();
    let first = join_as(&cluster.invite(1), &me, "").await;
    let (vip, proof) = (first.vip(), first.lease().expect("a cluster lease proof"));
    first.close();
    let options = overlan_client::JoinOptions::new(cluster.invite(0), me.clone()).lease(Some(proof));
    let roamed = within("join n0", overlan_client::Client::join(options)).await.unwrap();
    assert_eq!(roamed.vip(), vip, "roaming keeps the VIP");
    within("routed to n0 at n1", async {
        while cluster.nodes[1].handle().next_hop("default", vip).as_deref() != Some("n0") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    cluster.nodes[1].store().release_lease("default", vip).unwrap();
    let why = within("the roamed session ended", roamed.closed()).await;
    assert!(why.contains(&format!("the lease of {vip} was released")), "{why}");
    assert!(!why.contains("another member"), "nobody else holds it: {why}");
    cluster.nodes[1].unrouted(vip).await;
    cluster.nodes[0].unrouted(vip).await;
}

/// Writes `msg` on a rogue link's control stream.
async fn send_peer(send: &mut quinn::SendStream, msg: &overlan_shared::wire::peer::PeerMessage) {
    use overlan_shared::wire::frame::FrameCodec;
    use overlan_shared::wire::peer::PeerMessage;
    let mut buf = bytes::BytesMut::new();
    FrameCodec::<PeerMessage, PeerMessage>::new(1 << 20).encode_into(msg, &mut buf).unwrap();
    send.write_all(&buf).await.unwrap();
}

#[tokio::test]
async fn a_peer_cannot_forge_sources_or_spoil_another_nodes_broadcasts() {
    use futures_util::StreamExt;
    use overlan_shared::route::{Announce, NetKey, RouteUpdate};
    use overlan_shared::wire::datagram::DatagramHeader;
    use overlan_shared::wire::frame::FrameCodec;
    use overlan_shared::wire::peer::{LinkHeader, PeerMessage, MAX_HOPS};
    use overlan_shared::wire::ErrorCode;
    let cluster = TestCluster::start(2, &[(1, 0)]).await;
    let victim = join(&cluster.invite(1)).await;
    let victim_socket = victim.bind_datagram(27015).await.unwrap();
    let a = join(&cluster.invite(0)).await;
    let a_socket = a.bind_datagram(27015).await.unwrap();
    let listener = a.listen(7000).await.unwrap();
    assert_eq!(cluster.nodes[0].routed(victim.vip()).await, "n1");
    cluster.nodes[1].routed(a.vip()).await;

    let dir = overlan_shared::cluster::ClusterDir::new(cluster.dir());
    let issued = dir.issue("liar").unwrap();
    let (conn, mut send, recv) = rogue_peer(&cluster, "liar", dir.load_node("liar").unwrap()).await;
    // The liar's own client, announced as a peer may: a VIP of its own slot.
    let net = NetKey::of("default");
    let block = overlan_shared::cluster::slot_block(a.subnet(), issued.slot).unwrap();
    let own = std::net::Ipv4Addr::from(u32::from(block.network()) + 5);
    let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let (now_ms, now_us) = (clock.as_millis() as u64, clock.as_micros() as u64);
    let announce = Announce {
        net,
        vip: own,
        seq: now_ms,
        path: vec!["liar".into()],
        origin_slot: issued.slot,
        proof: None,
        holder: None,
        name: None,
    };
    send_peer(&mut send, &PeerMessage::Routes { updates: vec![RouteUpdate::Announce(announce)] }).await;
    assert_eq!(cluster.nodes[0].routed(own).await, "liar");

    let datagram = |header: LinkHeader, src: std::net::Ipv4Addr, dst: SocketAddrV4, payload: &[u8]| {
        let mut out = header.to_bytes();
        out.extend_from_slice(&DatagramHeader { src: SocketAddrV4::new(src, 27015), dst }.to_bytes());
        out.extend_from_slice(payload);
        bytes::Bytes::from(out)
    };
    let unicast = LinkHeader::Unicast { hops: MAX_HOPS, net };
    let numbered = |origin: u8, seq: u64| LinkHeader::Broadcast { hops: MAX_HOPS, net, origin, seq };
    let (to_a, everyone) = (a_socket.local_addr(), SocketAddrV4::new(a.broadcast_addr(), 27015));
    let n1_slot = 1;
    let dropped = || cluster.nodes[0].counters().get(overlan_server::counters::Reason::LinkDatagramDropped);
    for lie in [
        // n1's client as the source: its route was not announced on this link.
        datagram(unicast, victim.vip(), to_a, b"forged unicast"),
        // ... and a number far ahead for n1, which would silence n1's broadcasts (dropped
        // without a count: it looks like a copy come round the mesh by another path).
        datagram(numbered(n1_slot, u64::MAX / 2), victim.vip(), everyone, b"forged broadcast"),
        // The liar's own client, numbered as n1 or from the future.
        datagram(numbered(n1_slot, now_us + 1), own, everyone, b"numbered as n1"),
        datagram(numbered(issued.slot, now_us + 3_600_000_000), own, everyone, b"numbered ahead"),
    ] {
        conn.send_datagram(lie).unwrap();
    }
    within("forgeries dropped", async {
        while dropped() < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // What the liar may send: its own client's datagrams.
    conn.send_datagram(datagram(numbered(issued.slot, now_us), own, everyone, b"own broadcast")).unwrap();
    conn.send_datagram(datagram(unicast, own, to_a, b"own unicast")).unwrap();
    for want in [&b"own broadcast"[..], b"own unicast"] {
        let d = within("the liar's own datagrams", a_socket.recv()).await.unwrap();
        assert_eq!((&d.payload[..], *d.src.ip()), (want, own));
    }
    // n1's broadcasts still count at n0, and its client's datagrams arrive.
    victim_socket.send_to(b"real broadcast", everyone).await.unwrap();
    victim_socket.send_to(b"real unicast", to_a).await.unwrap();
    for want in [&b"real broadcast"[..], b"real unicast"] {
        let d = within("the victim's datagrams", a_socket.recv()).await.unwrap();
        assert_eq!((&d.payload[..], *d.src.ip()), (want, victim.vip()));
    }
    assert_eq!(dropped(), 3);

    // A connect in the name of n1's client is refused (once its route had time to come).
    let from = SocketAddrV4::new(victim.vip(), 40000);
    let connect = PeerMessage::Connect { socket: 9, net, from, to: SocketAddrV4::new(a.vip(), 7000), hops: MAX_HOPS };
    send_peer(&mut send, &connect).await;
    let mut answers = tokio_util::codec::FramedRead::new(recv, FrameCodec::<PeerMessage, PeerMessage>::new(16 << 20));
    let answer = within("answer to the forged connect", async {
        loop {
            match answers.next().await.expect("link open").expect("frame") {
                PeerMessage::Answer { to: 9, result, .. } => return result,
                _ => continue,
            }
        }
    })
    .await;
    assert!(matches!(answer, Err((ErrorCode::Unreachable, _))), "{answer:?}");
    assert_eq!(cluster.nodes[0].counters().get(overlan_server::counters::Reason::PeerForgedSource), 1);
    let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(accepted.is_err(), "the listener saw the forged connect");
    drop(conn);
}

#[tokio::test]
async fn a_peer_whose_certificate_is_not_from_the_cluster_ca_is_refused() {
    let cluster = TestCluster::start(1, &[]).await;
    // A node of another cluster that knows this cluster's CA certificate (it is public).
    let other = tempfile::tempdir().unwrap();
    let other_dir = overlan_shared::cluster::ClusterDir::new(other.path());
    other_dir.init().unwrap();
    other_dir.issue("n7").unwrap();
    let mut creds = other_dir.load_node("n7").unwrap();
    creds.ca = overlan_shared::cluster::ClusterDir::new(cluster.dir()).ca_cert().unwrap();
    // Refused right after the handshake, before it could open a stream.
    let conn = rogue_connect(&cluster, creds).await;
    let (code, reason) = close_reason(&conn).await;
    assert_eq!(code, u64::from(overlan_shared::wire::close_code::UNAUTHORIZED), "{reason}");
    assert!(reason.contains("not a node of this cluster"), "{reason}");
    assert_eq!(cluster.nodes[0].counters().get(overlan_server::counters::Reason::PeerRefused), 1);
    assert!(cluster.nodes[0].handle().peer_links().is_empty());

    // A node of another cluster that trusts only its own CA: its side of the TLS
    // handshake fails, and this node counts (and logs) the refusal too.
    use overlan_shared::wire::peer::ALPN_PEER;
    let creds = other_dir.load_node("n7").unwrap();
    let crypto = overlan_shared::cluster::peer_client_config(&creds, ALPN_PEER).unwrap();
    let quic = quinn::ClientConfig::new(std::sync::Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap(),
    ));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let attempt = endpoint.connect_with(quic, cluster.nodes[0].addr(), "overlan-relay").unwrap();
    assert!(within("the foreign handshake", attempt).await.is_err());
    within("the refusal counted here", async {
        while cluster.nodes[0].counters().get(overlan_server::counters::Reason::PeerRefused) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Two relays run with one node's credentials: while the first is linked, the second's
/// link is refused with the reason (routes of two nodes would mix under one name), and
/// the first's members stay reachable; once the first stops, the second links, as a
/// restarted node does.
#[tokio::test]
async fn a_node_run_twice_is_refused_while_the_first_runs() {
    use overlan_server::counters::Reason;
    let mut cluster = TestCluster::start(2, &[(1, 0)]).await;
    let a = join(&cluster.invite(0)).await;
    let b = join(&cluster.invite(1)).await;
    let listener = b.listen(7000).await.unwrap();
    let refused = cluster.nodes[0].counters().get(Reason::PeerRefused);
    let twin = cluster.process_as("n1", 0);
    within("the twin refused", async {
        while cluster.nodes[0].counters().get(Reason::PeerRefused) == refused {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(cluster.nodes[0].handle().peer_links(), vec!["n1".to_owned()], "one link, the first n1's");
    assert!(twin.handle().peer_links().is_empty(), "the twin never saw its link up");
    let mut out = connect_via(&cluster.nodes[0], &a, SocketAddrV4::new(b.vip(), 7000)).await;
    let (mut inc, _) = within("accept", listener.accept()).await.unwrap();
    out.write_all(b"still here").await.unwrap();
    let mut got = [0; 10];
    within("read", inc.read_exact(&mut got)).await.unwrap();
    assert_eq!(&got, b"still here");

    // The first n1 stops: the twin's next try is taken (its retries back off).
    cluster.nodes[1].stop();
    tokio::time::timeout(Duration::from_secs(30), async {
        while !twin.handle().peer_links().contains(&"n0".to_owned()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the twin links once the first n1 has stopped");
}

/// Two processes with one node's credentials that say hello at the same moment: one
/// is linked, the other refused. The node's old link is silent (it restarted), so each
/// hello waits on the probe of that link: without a claim on the name while a hello is
/// checked, both would pass.
#[tokio::test]
async fn two_processes_of_a_node_saying_hello_at_once_get_one_link() {
    use futures_util::StreamExt;
    use overlan_shared::wire::frame::FrameCodec;
    use overlan_shared::wire::peer::PeerMessage;
    let cluster = TestCluster::start(1, &[]).await;
    let dir = overlan_shared::cluster::ClusterDir::new(cluster.dir());
    dir.issue("twin").unwrap();
    let creds = dir.load_node("twin").unwrap();
    for round in 0..3u64 {
        // An earlier process, linked, that no longer answers.
        let (old, _old_send, _old_recv) = rogue_process(&cluster, "twin", creds.clone(), 100 + round).await;
        within("the old process linked", async {
            while cluster.nodes[0].handle().peer_links().is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        let ((c1, s1, r1), (c2, s2, r2)) = tokio::join!(
            rogue_process(&cluster, "twin", creds.clone(), 2 * round + 1),
            rogue_process(&cluster, "twin", creds.clone(), 2 * round + 2)
        );
        // The node answers a hello only when it takes the link; a process taken answers
        // the node's pings from then on, as a live node does.
        let live = |mut send: quinn::SendStream, recv: quinn::RecvStream| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let codec = FrameCodec::<PeerMessage, PeerMessage>::new(1 << 20);
                let mut framed = tokio_util::codec::FramedRead::new(recv, codec.clone());
                let taken = matches!(framed.next().await, Some(Ok(PeerMessage::Hello { .. })));
                let _ = tx.send(taken);
                while let Some(Ok(msg)) = framed.next().await {
                    if let PeerMessage::Ping { nonce } = msg {
                        let mut buf = bytes::BytesMut::new();
                        codec.encode_into(&PeerMessage::Pong { nonce }, &mut buf).unwrap();
                        if send.write_all(&buf).await.is_err() {
                            break;
                        }
                    }
                }
            });
            rx
        };
        let (t1, t2) = (live(s1, r1), live(s2, r2));
        let taken1 = within("the hello answered or refused", t1).await.unwrap_or(false);
        let taken2 = within("the hello answered or refused", t2).await.unwrap_or(false);
        assert!(taken1 != taken2, "round {round}: exactly one process linked (taken: {taken1}, {taken2})");
        // The old link is closed before the hello is answered, and the new one up just
        // after: once the old is gone, one link, and it stays one.
        within("the old link closed", old.closed()).await;
        let links = || cluster.nodes[0].handle().peer_links();
        within("the new link alone", async {
            while links() != vec!["twin".to_owned()] {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(links(), vec!["twin".to_owned()]);
        // Both go; the next round starts with no link.
        c1.close(0u32.into(), b"");
        c2.close(0u32.into(), b"");
        old.close(0u32.into(), b"");
        within("the link gone", async {
            while !cluster.nodes[0].handle().peer_links().is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
}

/// A node that restarted while its old link still looks up (no close reached the peer):
/// the old link, silent, is closed at once and the new process linked, without waiting
/// for the old one to time out.
#[tokio::test]
async fn a_restarted_node_replaces_its_silent_old_link_at_once() {
    let cluster = TestCluster::start(1, &[]).await;
    let dir = overlan_shared::cluster::ClusterDir::new(cluster.dir());
    dir.issue("n1").unwrap();
    // The old process: linked, then silent (it answers no ping), as a crashed host is.
    let (old, _send, _recv) = rogue_peer(&cluster, "n1", dir.load_node("n1").unwrap()).await;
    within("the old link up", async {
        while !cluster.nodes[0].handle().peer_links().contains(&"n1".to_owned()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let started = std::time::Instant::now();
    let n1 = cluster.process_as("n1", 0);
    within("the new process linked", async {
        while !n1.handle().peer_links().contains(&"n0".to_owned()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // Closed by the probe's verdict (a link that timed out would end without a reason).
    let (_, reason) = close_reason(&old).await;
    assert!(reason.contains("new process"), "{reason} (after {:?})", started.elapsed());
    assert_eq!(cluster.nodes[0].handle().peer_links(), vec!["n1".to_owned()]);
}

/// Joins with `invite` until the relay admits it (its catalog may still be on the way).
async fn join_when_admitted(invite: &overlan_shared::Invite) -> (overlan_client::Client, Duration) {
    let started = std::time::Instant::now();
    let client = within("admitted", async {
        loop {
            let options = overlan_client::JoinOptions::new(invite.clone(), identity());
            match overlan_client::Client::join(options).await {
                Ok(c) => return c,
                Err(Error::Unauthorized(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    (client, started.elapsed())
}

#[tokio::test]
async fn a_use_of_a_limited_invite_on_one_node_counts_on_every_node() {
    let cluster = TestCluster::line().await;
    let twice = cluster.nodes[0].new_invite("default", Some(2), None);
    let on_n2 = overlan_shared::Invite { relay: cluster.nodes[2].addr().to_string(), ..twice.clone() };
    let (_first, _) = join_when_admitted(&on_n2).await;
    // Once everything has settled, the last use, on n0: each node admitted one, and the
    // uses add up (the highest count any node saw would be 1 of 2).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _second = join(&twice).await;
    // The uses meet on every node within about a second: a third member is refused,
    // on the node that saw neither join too.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let on_n1 = overlan_shared::Invite { relay: cluster.nodes[1].addr().to_string(), ..twice.clone() };
    for invite in [&twice, &on_n1, &on_n2] {
        let err = join_err(invite, &identity(), "").await;
        assert!(matches!(err, Error::Unauthorized(_)), "{err}");
        assert!(err.to_string().contains("no uses left"), "{err}");
    }
}

#[tokio::test]
async fn networks_and_invites_made_on_one_node_work_on_every_node() {
    let cluster = TestCluster::line().await;
    // On n0, as `overlan-server network add` and `invite` would (beside the running node).
    cluster.nodes[0].store().add_network("lan", "10.88.0.0/16".parse().unwrap()).unwrap();
    let on_n0 = cluster.nodes[0].new_invite("lan", None, None);
    let on_n2 = overlan_shared::Invite { relay: cluster.nodes[2].addr().to_string(), ..on_n0.clone() };
    let (c2, took) = join_when_admitted(&on_n2).await;
    println!("network and invite reached n2 (two hops) in {took:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(c2.network(), "lan");
    assert!(c2.subnet().contains(c2.vip()));
    let c0 = join(&on_n0).await;
    // A route in the new network crosses the cluster like any other.
    let l = c2.listen(80).await.unwrap();
    let mut s = connect_via(&cluster.nodes[0], &c0, SocketAddrV4::new(c2.vip(), 80)).await;
    let (mut inc, _) = within("accept", l.accept()).await.unwrap();
    s.write_all(b"lan").await.unwrap();
    let mut buf = [0u8; 3];
    within("read", inc.read_exact(&mut buf)).await.unwrap();

    // Its instance cap set on n2 (`network set lan --max-instances 3`) holds on n0 too.
    cluster.nodes[2].store().set_max_instances("lan", Some(3)).unwrap();
    within("the cap reaches n0", async {
        while cluster.nodes[0].store().network("lan").unwrap().max_instances != Some(3) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // Revoked on n2: refused on n0 soon after.
    let id = cluster.nodes[2].store().invites().unwrap().into_iter().find(|i| i.network == "lan").unwrap().id;
    cluster.nodes[2].store().revoke_invite(id).unwrap();
    let started = std::time::Instant::now();
    within("revocation reaches n0", async {
        loop {
            let options = overlan_client::JoinOptions::new(on_n0.clone(), identity());
            match overlan_client::Client::join(options).await {
                Err(Error::Unauthorized(why)) => return why,
                Ok(c) => {
                    c.close();
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    println!("revocation reached n0 (two hops) in {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(2));
    // Members it admitted stay.
    assert_eq!(c2.state(), overlan_client::SessionState::Up);

    // The network removed on n1 (as `overlan-server network remove lan`): its members on
    // n0 and n2 are told and end; the default network's member is untouched; no node
    // brings the network back from an older catalog.
    let bystander = join(&cluster.invite(0)).await;
    let removed = cluster.nodes[1].store().remove_network("lan").unwrap();
    assert_eq!(removed.invites, 1);
    let started = std::time::Instant::now();
    for member in [&c0, &c2] {
        let mut state = member.watch_state();
        let why = within("the member is told", async {
            loop {
                if let overlan_client::SessionState::Closed(why) = state.borrow_and_update().clone() {
                    return why;
                }
                state.changed().await.unwrap();
            }
        })
        .await;
        assert!(why.contains("network lan was removed"), "{why}");
    }
    println!("network removal ended its members on n0 and n2 in {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for node in &cluster.nodes {
        let names: Vec<String> = node.store().networks().unwrap().into_iter().map(|n| n.name).collect();
        assert_eq!(names, ["default"], "a node still has the removed network");
    }
    assert_eq!(bystander.state(), overlan_client::SessionState::Up);
    let err = join_err(&on_n2, &identity(), "").await;
    assert!(matches!(err, Error::Unauthorized(_)), "{err}");
}

#[tokio::test]
async fn a_vip_is_given_back_only_through_the_node_that_issued_it() {
    let cluster = TestCluster::line().await;
    let me = identity();
    let on_n0 = join_as(&cluster.invite(0), &me, "").await;
    let (vip, proof) = (on_n0.vip(), on_n0.lease().expect("a cluster lease proof"));
    on_n0.leave().await;
    // Roamed to n1: n1 holds no lease of its own for it, so it refuses and says where.
    let options = overlan_client::JoinOptions::new(cluster.invite(1), me.clone()).lease(Some(proof));
    let on_n1 = overlan_client::Client::join(options).await.unwrap();
    assert_eq!(on_n1.vip(), vip);
    let err = on_n1.release().await.unwrap_err();
    assert!(err.to_string().contains("given out by another node"), "{err}");
    // Through n0, the issuer: released, and the next join gets another VIP.
    let again = join_as(&cluster.invite(0), &me, "").await;
    assert_eq!(again.vip(), vip);
    assert_eq!(again.release().await.unwrap(), vip);
    let fresh = join_as(&cluster.invite(0), &me, "").await;
    assert_ne!(fresh.vip(), vip);
}

/// A lease given up voids its proof on every node: the client that kept the proof gets
/// a new VIP wherever it shows it, also while the VIP's new holder is offline.
#[tokio::test]
async fn a_lease_given_up_is_void_on_every_node() {
    let cluster = TestCluster::start(2, &[(1, 0)]).await;
    let me = identity();
    let first = join_as(&cluster.invite(0), &me, "").await;
    let (vip, stale) = (first.vip(), first.lease().expect("a cluster lease proof"));
    assert_eq!(first.release().await.unwrap(), vip);
    first.close();
    // The release reaches n1 with n0's next catalog (within about a second).
    within("the release reaches n1", async {
        while cluster.nodes[1].store().voided_before("default", vip).unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let options = overlan_client::JoinOptions::new(cluster.invite(1), me.clone()).lease(Some(stale));
    let back = within("join n1", overlan_client::Client::join(options)).await.unwrap();
    assert_ne!(back.vip(), vip, "the kept proof does not bring the VIP back");
}

/// A release that reaches a node while its database is locked (an operator command
/// holding it) is recorded once the lock is gone: the link tries the catalog again.
#[tokio::test]
async fn a_release_arriving_while_the_database_is_locked_is_recorded_later() {
    let cluster = TestCluster::start(2, &[(1, 0)]).await;
    let member = join(&cluster.invite(0)).await;
    let vip = member.vip();
    let db = cluster.nodes[1].data_dir().join(overlan_server::store::DB_FILE);
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    assert_eq!(member.release().await.unwrap(), vip);
    // Longer than the node waits for the lock (1 s): its first tries fail.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    lock.execute_batch("COMMIT").unwrap();
    within("the release recorded at n1", async {
        while cluster.nodes[1].store().voided_before("default", vip).unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Defence in depth for a node that missed a release: the node where the VIP's new
/// holder is online refuses the stale route and announces its holder anew.
#[tokio::test]
async fn a_lease_given_up_cannot_take_its_vip_back_from_the_new_holder() {
    let mut cluster = TestCluster::start(2, &[(1, 0)]).await;
    let old = identity();
    let first = join_as(&cluster.invite(0), &old, "").await;
    let (vip, stale) = (first.vip(), first.lease().expect("a cluster lease proof"));
    assert_eq!(first.release().await.unwrap(), vip);
    first.close();
    // Given up VIPs return to the pool when the node restarts; the next client gets it.
    let n0 = cluster.nodes.remove(0).restart_same_port();
    cluster.nodes.insert(0, n0);
    cluster.linked(1, 0).await;
    let holder = join(&cluster.invite(0)).await;
    assert_eq!(holder.vip(), vip, "the freed VIP is handed out again");
    let _l = holder.listen(7000).await.unwrap();
    // n1 missed the release: once n0's catalogs have settled, n1 forgets it.
    let db = cluster.nodes[1].data_dir().join(overlan_server::store::DB_FILE);
    within("the release reaches n1", async {
        while cluster.nodes[1].store().voided_before("default", vip).unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    rusqlite::Connection::open(&db).unwrap().execute("DELETE FROM voided_leases", []).unwrap();
    // The old holder comes back on n1 with the proof it kept. n1 cannot tell (the
    // proof's signature holds), but n0, where the VIP's holder is, refuses the route.
    let rejected = || cluster.nodes[0].counters().get(overlan_server::counters::Reason::RouteRejected);
    let options = overlan_client::JoinOptions::new(cluster.invite(1), old.clone()).lease(Some(stale));
    // The stale holder's session ends: replaced as soon as n0 announces its holder
    // anew (which may come before its join is even answered).
    let back = within("join n1", overlan_client::Client::join(options)).await;
    within("the stale route rejected at n0", async {
        while rejected() < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    if let Ok(back) = back {
        assert_eq!(back.vip(), vip);
        // Told as it is: another client holds the VIP, not "a newer session of you".
        let why = within("the stale session ended", back.closed()).await;
        assert!(why.contains("another member holds") && why.contains("lease was released"), "{why}");
    }
    // Every node routes the VIP to the holder.
    assert_eq!(cluster.nodes[1].routed(vip).await, "n0");
    let closed = tokio::time::timeout(Duration::from_millis(500), holder.closed()).await;
    assert!(closed.is_err(), "the new holder's session was replaced: {closed:?}");
    let local = join(&cluster.invite(0)).await;
    let mut s = within("connect to the holder", local.connect(SocketAddrV4::new(vip, 7000))).await.unwrap();
    s.write_all(b"still the holder's").await.unwrap();
}

#[tokio::test]
async fn a_network_too_small_for_the_cluster_refuses_joins_and_breaks_nothing() {
    let cluster = TestCluster::start(2, &[(1, 0)]).await;
    // Made behind the relay's back (`network add` refuses it on a cluster node), or
    // by a node of another version: every node must live with it.
    cluster.nodes[0].store().add_network("tiny", "10.91.0.0/25".parse().unwrap()).unwrap();
    let invite = cluster.nodes[0].new_invite("tiny", None, None);
    let err = join_err(&invite, &identity(), "").await;
    assert!(err.to_string().contains("no free VIP"), "{err}");
    // The node still admits members of other networks.
    let member = join(&cluster.invite(0)).await;
    assert!(member.subnet().contains(member.vip()));
}

#[tokio::test]
async fn one_vip_per_identity_and_instance_on_every_node_and_the_newer_session_wins() {
    let cluster = TestCluster::line().await;
    let me = identity();
    let first = join_as(&cluster.invite(0), &me, "game").await;
    let proof = first.lease().expect("a cluster node gives its lease");
    // The same identity and instance on n2, with the lease: the same VIP; the session
    // on n0 is replaced, as on one relay.
    let options = overlan_client::JoinOptions::new(cluster.invite(2), me.clone()).instance("game").lease(Some(proof));
    let second = within("join n2", overlan_client::Client::join(options)).await.unwrap();
    assert_eq!(second.vip(), first.vip());
    let why = within("the older session replaced", async {
        tokio::select! {
            why = first.closed() => why,
            why = second.closed() => panic!("the newer session was closed instead: {why}"),
        }
    })
    .await;
    assert!(why.contains("replaced"), "{why}");
    within("n0 routes the VIP to n2 now", async {
        while cluster.nodes[0].handle().next_hop("default", second.vip()).as_deref() != Some("n1") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let leases = cluster.nodes[2].store().lease_rows(None).unwrap();
    assert!(leases.iter().any(|l| l.vip == second.vip()), "n2 adopted the lease: {leases:?}");
}

#[tokio::test]
async fn an_abort_crosses_nodes_as_an_error_either_way() {
    let cluster = TestCluster::line().await;
    let a = join(&cluster.invite(0)).await;
    let c = join(&cluster.invite(2)).await;
    let listener = c.listen(7004).await.unwrap();
    let target = SocketAddrV4::new(c.vip(), 7004);
    // Abort by the connecting side: the listener's read fails, it does not see a clean end.
    let mut s = connect_via(&cluster.nodes[0], &a, target).await;
    let (mut inc, _) = within("accept", listener.accept()).await.unwrap();
    s.write_all(b"partial").await.unwrap();
    let mut buf = [0u8; 7];
    within("read", inc.read_exact(&mut buf)).await.unwrap();
    s.abort();
    let mut rest = Vec::new();
    let err = within("abort seen across two hops", inc.read_to_end(&mut rest)).await.unwrap_err();
    assert!(err.to_string().contains("aborted"), "{err}");
    // Abort by the listening side: the connector's read fails.
    let mut s = connect_via(&cluster.nodes[0], &a, target).await;
    let (inc, _) = within("accept", listener.accept()).await.unwrap();
    inc.abort();
    let err = within("abort seen by the connector", s.read_to_end(&mut rest)).await.unwrap_err();
    assert!(err.to_string().contains("aborted"), "{err}");
}
