//! Virtual stream sockets: connect/accept with stamped addresses, the failure answers
//! (unreachable, refused, denied), half-close, close, abort, ports, and what a peer sees
//! when the other side's session dies.

use std::io::ErrorKind;
use std::net::SocketAddrV4;

use overlan_client::Error;
use overlan_integration_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn bytes_flow_both_ways_with_stamped_addresses() {
    let relay = TestRelay::start();
    let a = join(&relay.invite()).await;
    let b = join(&relay.invite()).await;
    let listener = b.listen(7000).await.unwrap();
    assert_eq!(listener.local_addr(), SocketAddrV4::new(b.vip(), 7000));
    let mut out = a.connect(listener.local_addr()).await.unwrap();
    let (mut inn, peer) = within("accept", listener.accept()).await.unwrap();
    assert_eq!(*peer.ip(), a.vip(), "the relay stamps the connector's VIP");
    assert_eq!(peer, out.local_addr());
    assert_eq!(inn.peer_addr(), out.local_addr());
    assert_eq!(out.peer_addr(), listener.local_addr());
    assert_eq!(inn.socket_id(), out.socket_id());

    out.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    within("read ping", inn.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"ping");
    inn.write_all(b"pong").await.unwrap();
    within("read pong", out.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"pong");

    // A larger transfer arrives intact.
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        out.write_all(&sent).await.unwrap();
        out.shutdown().await.unwrap();
        out
    });
    let mut got = Vec::new();
    within("read 2 MB", inn.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes changed in transit");
    writer.await.unwrap();
}

#[tokio::test]
async fn unreachable_refused_and_denied() {
    let relay = TestRelay::start();
    let a = join(&relay.invite()).await;
    let b = join(&relay.invite()).await;

    let nobody = SocketAddrV4::new("10.77.200.200".parse().unwrap(), 80);
    let err = a.connect(nobody).await.unwrap_err();
    assert!(matches!(err, Error::Unreachable { addr } if addr == nobody), "{err}");
    assert_eq!(err.to_string(), "connect 10.77.200.200:80: unreachable (no session has that VIP)");

    let closed = SocketAddrV4::new(b.vip(), 81);
    let err = a.connect(closed).await.unwrap_err();
    assert!(matches!(err, Error::Refused { addr } if addr == closed), "{err}");
    assert!(err.to_string().ends_with("refused (nothing listening)"));

    let gate = b.listen_with_approval(82).await.unwrap();
    let denier = tokio::spawn(async move {
        let offer = gate.incoming().await.unwrap();
        offer.deny();
        let offer = gate.incoming().await.unwrap();
        let peer = offer.peer_addr();
        let stream = offer.accept().await.unwrap();
        (peer, stream, gate)
    });
    let err = a.connect(SocketAddrV4::new(b.vip(), 82)).await.unwrap_err();
    assert!(matches!(err, Error::Denied { .. }), "{err}");
    let ok = a.connect(SocketAddrV4::new(b.vip(), 82)).await.unwrap();
    let (peer, _stream, _gate) = within("approval", denier).await.unwrap();
    assert_eq!(peer, ok.local_addr());

    // Outside the network's subnet is unreachable too.
    let err = a.connect("192.168.1.1:80".parse().unwrap()).await.unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
}

#[tokio::test]
async fn half_close_close_and_abort_are_seen_by_the_peer() {
    let relay = TestRelay::start();
    let a = join(&relay.invite()).await;
    let b = join(&relay.invite()).await;
    let listener = b.listen(0).await.unwrap();
    assert!(listener.local_addr().port() >= 49152, "port 0 gives an ephemeral port");

    // Half-close: A stops sending; B reads EOF and can still answer.
    let mut x = a.connect(listener.local_addr()).await.unwrap();
    let (mut y, _) = within("accept", listener.accept()).await.unwrap();
    x.write_all(b"request").await.unwrap();
    x.shutdown().await.unwrap();
    let mut got = Vec::new();
    within("read to EOF", y.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"request");
    y.write_all(b"response").await.unwrap();
    y.shutdown().await.unwrap();
    let mut got = Vec::new();
    within("read reply", x.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"response");

    // Close: dropping one side ends the peer's reads with EOF, and its writes fail.
    let x = a.connect(listener.local_addr()).await.unwrap();
    let (mut y, _) = within("accept", listener.accept()).await.unwrap();
    drop(x);
    let mut buf = [0u8; 16];
    assert_eq!(within("EOF after close", y.read(&mut buf)).await.unwrap(), 0);
    let write_err = within("write after peer closed", async {
        loop {
            if let Err(e) = y.write_all(&[0u8; 4096]).await {
                break e;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(write_err.kind(), ErrorKind::BrokenPipe, "{write_err}");

    // Abort: the peer's read fails with a reset, not EOF.
    let x = b.connect(SocketAddrV4::new(b.vip(), listener.local_addr().port())).await.unwrap();
    let (mut y, _) = within("accept", listener.accept()).await.unwrap();
    x.abort();
    let err = within("read after abort", y.read(&mut buf)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    assert!(err.to_string().contains("aborted"), "{err}");
}

/// An abort followed at once by leaving reaches the peer as "aborted": the reset is
/// delivered before the session closes, not overtaken by "session lost".
#[tokio::test]
async fn an_abort_right_before_leaving_reaches_the_peer_as_aborted() {
    let relay = TestRelay::start();
    let listening = join(&relay.invite()).await;
    let listener = listening.listen(4100).await.unwrap();
    for round in 0..5 {
        let leaving = join(&relay.invite()).await;
        let mut x = leaving.connect(listener.local_addr()).await.unwrap();
        let (mut y, _) = within("accept", listener.accept()).await.unwrap();
        x.write_all(b"partial").await.unwrap();
        let mut buf = [0u8; 7];
        within("the first bytes", y.read_exact(&mut buf)).await.unwrap();
        let (read, write) = x.into_split();
        write.abort();
        read.abort();
        // Not held until the linger runs out: the reset's acknowledgement ends the wait.
        let leave = std::time::Instant::now();
        within("leave", leaving.leave()).await;
        assert!(leave.elapsed() < overlan_client::LEAVE_LINGER / 2, "round {round}: leave took {:?}", leave.elapsed());
        let err = within("read after abort", y.read(&mut buf)).await.unwrap_err();
        assert!(err.to_string().contains("aborted"), "round {round}: {err}");
    }
}

#[tokio::test]
async fn ports_in_use_and_released() {
    let relay = TestRelay::start();
    let a = join(&relay.invite()).await;
    let l = a.listen(4000).await.unwrap();
    let err = a.listen(4000).await.unwrap_err();
    assert!(matches!(err, Error::AddrInUse { port: 4000 }), "{err}");
    // Another client may use the same port number on its own VIP.
    let b = join(&relay.invite()).await;
    let _lb = b.listen(4000).await.unwrap();
    drop(l);
    // Dropping the listener releases the port.
    let again = within("re-listen", async {
        loop {
            match a.listen(4000).await {
                Ok(l) => break l,
                Err(Error::AddrInUse { .. }) => tokio::task::yield_now().await,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    assert_eq!(again.local_addr().port(), 4000);
}

#[tokio::test]
async fn a_dead_session_resets_its_sockets_and_the_peer_is_told() {
    let overlan = bin("overlan"); // build before any session exists: the build blocks this thread
    let relay = TestRelay::start();
    let server = join(&relay.invite()).await;
    let listener = server.listen(6000).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    assert!(overlan.exists());
    // A real client process, killed without a goodbye: only the idle timeout can tell.
    let mut nc = Proc::spawn({
        let mut cmd = overlan_cmd(&relay.invite(), dir.path(), "victim");
        cmd.args(["nc", &server.vip().to_string(), "6000"]);
        cmd
    });
    let accepted = tokio::select! {
        a = within("accept from the process", listener.accept()) => a,
        line = nc.stderr_until("overlan:") => panic!("the client process failed: {line}"),
    };
    let (mut stream, peer) = accepted.unwrap();
    nc.write_stdin(b"hello\n").await;
    let mut buf = [0u8; 6];
    within("data from the process", stream.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"hello\n");
    nc.child.start_kill().unwrap();
    let _ = nc.child.wait().await;

    let started = std::time::Instant::now();
    let err = within("the peer's read to fail", stream.read(&mut buf)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    assert!(err.to_string().contains("peer session lost"), "{err}");
    assert!(
        started.elapsed() <= TEST_IDLE_TIMEOUT * 2,
        "cleanup took {:?}, idle timeout is {TEST_IDLE_TIMEOUT:?}",
        started.elapsed()
    );
    // Its VIP is offline now: connecting to it is answered at once.
    let err = server.connect(SocketAddrV4::new(*peer.ip(), 1)).await.unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
}

#[tokio::test]
async fn tokio_util_codecs_run_over_a_virtual_stream() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_util::codec::{Framed, LinesCodec};
    let relay = TestRelay::start();
    let a = join(&relay.invite()).await;
    let b = join(&relay.invite()).await;
    let listener = b.listen(25).await.unwrap();
    let echo = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let mut lines = Framed::new(s, LinesCodec::new());
        while let Some(Ok(line)) = lines.next().await {
            lines.send(format!("echo {line}")).await.unwrap();
        }
    });
    let mut lines = Framed::new(a.connect(SocketAddrV4::new(b.vip(), 25)).await.unwrap(), LinesCodec::new());
    for i in 0..10 {
        lines.send(format!("line {i}")).await.unwrap();
        let got = within("echo", lines.next()).await.unwrap().unwrap();
        assert_eq!(got, format!("echo line {i}"));
    }
    drop(lines);
    within("echo server ends", echo).await.unwrap();
}

#[tokio::test]
async fn a_client_can_connect_to_its_own_listener() {
    // A game host joining its own lobby by VIP: several at once, each needing two streams
    // from the same session.
    const SOCKETS: usize = 12;
    let relay = TestRelay::start();
    let a = join(&relay.invite()).await;
    let listener = a.listen(8080).await.unwrap();
    let mut pairs = Vec::new();
    for _ in 0..SOCKETS {
        let out = within("self connect", a.connect(listener.local_addr())).await.unwrap();
        let (inn, peer) = within("accept", listener.accept()).await.unwrap();
        assert_eq!(*peer.ip(), a.vip());
        pairs.push((out, inn));
    }
    for (out, inn) in pairs.iter_mut() {
        out.write_all(b"loop").await.unwrap();
        let mut buf = [0u8; 4];
        within("read own bytes", inn.read_exact(&mut buf)).await.unwrap();
        assert_eq!(&buf, b"loop");
        inn.write_all(b"back").await.unwrap();
        within("read reply", out.read_exact(&mut buf)).await.unwrap();
        assert_eq!(&buf, b"back");
    }
}

#[tokio::test]
async fn sockets_wake_with_an_error_when_the_client_closes() {
    let relay = TestRelay::start();
    let a = join(&relay.invite()).await;
    let listener = a.listen(70).await.unwrap();
    let socket = a.bind_datagram(71).await.unwrap();
    let waiting = tokio::spawn(async move { (listener.accept().await.map(|_| ()), socket.recv().await.map(|_| ())) });
    a.close();
    let (accepted, received) = within("listener and socket to wake", waiting).await.unwrap();
    assert!(matches!(accepted, Err(Error::SessionLost(_))), "{accepted:?}");
    assert!(matches!(received, Err(Error::SessionLost(_))), "{received:?}");
}

#[tokio::test]
async fn many_concurrent_sockets_per_session() {
    // Sessions start with a small QUIC stream allowance that the relay raises as their
    // sockets grow; every one of these must open and carry data at the same time.
    const SOCKETS: usize = 120;
    let relay = TestRelay::start();
    let a = join(&relay.invite()).await;
    let b = join(&relay.invite()).await;
    let listener = b.listen(3000).await.unwrap();
    let mut outs = Vec::new();
    for _ in 0..SOCKETS {
        outs.push(within("connect", a.connect(listener.local_addr())).await.unwrap());
    }
    let mut ins = Vec::new();
    for _ in 0..SOCKETS {
        ins.push(within("accept", listener.accept()).await.unwrap().0);
    }
    for (i, out) in outs.iter_mut().enumerate() {
        out.write_all(format!("{i:04}").as_bytes()).await.unwrap();
    }
    let mut seen = std::collections::HashSet::new();
    for inn in ins.iter_mut() {
        let mut buf = [0u8; 4];
        within("read", inn.read_exact(&mut buf)).await.unwrap();
        seen.insert(String::from_utf8_lossy(&buf).into_owned());
    }
    assert_eq!(seen.len(), SOCKETS);
}

#[tokio::test]
async fn loopback_paths_carry_large_packets_through_a_bulk_transfer() {
    // Path-MTU discovery finds MTU_BOUND on loopback, and a bulk transfer keeps it: a
    // bound whose batched sends the kernel refuses would make quinn fall back to 1,200.
    let relay = TestRelay::start();
    let a = join(&relay.invite()).await;
    let b = join(&relay.invite()).await;
    let bound = overlan_shared::udp::MTU_BOUND;
    within("path-MTU discovery", async {
        while [&a, &b].iter().any(|c| c.path().map(|p| p.mtu) != Some(bound)) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let listener = b.listen(7000).await.unwrap();
    let mut out = a.connect(listener.local_addr()).await.unwrap();
    let (mut inn, _) = within("accept", listener.accept()).await.unwrap();
    let data: Vec<u8> = (0..32_000_000u32).map(|i| (i * 13 + i / 509) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        out.write_all(&sent).await.unwrap();
        out.shutdown().await.unwrap();
        out
    });
    let mut got = Vec::with_capacity(data.len());
    within("read 32 MB", inn.read_to_end(&mut got)).await.unwrap();
    assert!(got == data, "bytes lost or changed in transit");
    writer.await.unwrap();
    assert_eq!(a.path().map(|p| p.mtu), Some(bound), "the sender's path fell back");
}
