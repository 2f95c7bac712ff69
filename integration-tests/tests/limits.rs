//! One member cannot hurt the others: per-session caps on sockets, listeners and ports,
//! rates for control messages, datagrams and broadcasts, a receiver that stops reading
//! neither stalls its sender's other sockets nor holds relay memory for ever. Every
//! refusal is counted; bystanders are checked after each.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use overlan_client::{Client, Error};
use overlan_integration_tests::*;
use overlan_server::config::Limits;
use overlan_server::counters::Reason;
use overlan_shared::wire::control::{ClientMessage, RelayMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn relay_with(limits: Limits) -> TestRelay {
    TestRelay::start_with(|c| c.limits = limits)
}

/// A stream from `a` to `b` works end to end.
async fn still_talk(a: &Client, b: &Client, port: u16) {
    let listener = b.listen(port).await.expect("bystander listens");
    let mut out = a.connect(listener.local_addr()).await.expect("bystander connects");
    let (mut inn, _) = within("accept", listener.accept()).await.unwrap();
    out.write_all(b"ok").await.unwrap();
    let mut buf = [0u8; 2];
    within("bystander data", inn.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"ok");
}

#[tokio::test]
async fn listeners_ports_and_sockets_are_capped_per_session() {
    let relay = relay_with(Limits { max_listeners: 3, max_bound_ports: 3, max_sockets: 4, ..Limits::default() });
    let greedy = join(&relay.invite()).await;
    let mut listeners = Vec::new();
    for port in 1..=3 {
        listeners.push(greedy.listen(port).await.unwrap());
    }
    let err = greedy.listen(4).await.unwrap_err();
    assert!(matches!(&err, Error::Limit(m) if m.contains("3 listeners")), "{err}");
    let mut ports = Vec::new();
    for port in 1..=3 {
        ports.push(greedy.bind_datagram(port).await.unwrap());
    }
    let err = greedy.bind_datagram(4).await.unwrap_err();
    assert!(matches!(&err, Error::Limit(m) if m.contains("3 bound ports")), "{err}");
    // Releasing one makes room again.
    drop(listeners.pop());
    within("the port to be released", async {
        loop {
            match greedy.listen(5).await {
                Ok(l) => return listeners.push(l),
                Err(Error::Limit(_)) => tokio::task::yield_now().await,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;

    // Sockets: four open, the fifth connect is refused, from either side.
    let peer = join(&relay.invite()).await;
    let target = peer.listen(80).await.unwrap();
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(greedy.connect(target.local_addr()).await.unwrap());
        open.push(within("accept", target.accept()).await.unwrap().0);
    }
    let err = greedy.connect(target.local_addr()).await.unwrap_err();
    assert!(matches!(&err, Error::Limit(m) if m.contains("4 sockets")), "{err}");
    let own = greedy.listen(0).await;
    assert!(own.is_err(), "still at the listener cap");
    let err = peer.connect(listeners[0].local_addr()).await.unwrap_err();
    assert!(matches!(err, Error::Limit(_)), "a listener at its socket cap refuses offers: {err}");

    let counters = relay.counters();
    assert!(counters.get(Reason::ListenerLimit) >= 2);
    assert_eq!(counters.get(Reason::PortLimit), 1);
    assert_eq!(counters.get(Reason::SocketLimit), 2);
    // Nobody else is affected.
    let (x, y) = (join(&relay.invite()).await, join(&relay.invite()).await);
    still_talk(&x, &y, 90).await;
}

#[tokio::test]
async fn datagram_and_broadcast_rates_drop_the_excess_and_count_it() {
    let relay = relay_with(Limits {
        datagram_rate: 50,
        datagram_burst: 50,
        broadcast_rate: 5,
        broadcast_burst: 5,
        ..Limits::default()
    });
    let sender = join(&relay.invite()).await;
    let receiver = join(&relay.invite()).await;
    let bystander = join(&relay.invite()).await;
    let from = sender.bind_datagram(4000).await.unwrap();
    let to = receiver.bind_datagram(4000).await.unwrap();
    let other = bystander.bind_datagram(4000).await.unwrap();
    let started = Instant::now();
    for i in 0..500u32 {
        from.send_to(&i.to_be_bytes(), to.local_addr()).await.unwrap();
    }
    for i in 0..50u32 {
        from.send_to(&i.to_be_bytes(), SocketAddrV4::new(Ipv4Addr::BROADCAST, 4000)).await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Count what arrives until the relay has clearly stopped forwarding.
    let mut unicast = 0u64;
    while let Ok(Ok(d)) = tokio::time::timeout(Duration::from_millis(500), to.recv()).await {
        unicast += u64::from(d.payload.len() == 4);
    }
    let dropped = relay.counters().get(Reason::DatagramRate);
    let allowed = 50.0 + 50.0 * (elapsed + 0.5);
    assert!(unicast as f64 <= allowed + 5.0, "{unicast} unicast datagrams passed in {elapsed:.2}s at 50/s");
    assert!(dropped >= 500 - allowed as u64 - 60, "dropped {dropped}");
    let broadcasts_dropped = relay.counters().get(Reason::BroadcastRate);
    assert!(broadcasts_dropped >= 40, "broadcasts over 5/s are dropped: {broadcasts_dropped}");
    // The bystander's own traffic is untouched.
    let back = other.send_to(b"fine", from.local_addr()).await;
    assert!(back.is_ok());
    let d = within("the bystander's datagram", from.recv()).await.unwrap();
    assert_eq!(&d.payload[..], b"fine");
}

#[tokio::test]
async fn control_spam_does_not_slow_a_bystanders_connects() {
    let relay = relay_with(Limits { control_rate: 200, control_burst: 200, ..Limits::default() });
    let a = join(&relay.invite()).await;
    let b = join(&relay.invite()).await;
    let listener = b.listen(7000).await.unwrap();
    let accepting = tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            drop(s);
        }
    });
    let connect_times = |n: usize| {
        let a = a.clone();
        let to = SocketAddrV4::new(b.vip(), 7000);
        async move {
            let mut worst = Duration::ZERO;
            for _ in 0..n {
                let started = Instant::now();
                drop(a.connect(to).await.unwrap());
                worst = worst.max(started.elapsed());
            }
            worst
        }
    };
    let quiet = connect_times(20).await;
    // The spammer writes control messages as fast as QUIC lets it (yielding now and
    // then only so this test's single-threaded runtime keeps serving the other clients;
    // a real spammer is another process).
    let mut spammer = RawSession::join(&relay, &relay.invite()).await;
    let spam = tokio::spawn(async move {
        for nonce in 0..200_000u64 {
            spammer.send(&ClientMessage::Ping { nonce }).await;
            if nonce % 100 == 0 {
                tokio::task::yield_now().await;
            }
        }
        spammer
    });
    tokio::time::sleep(Duration::from_millis(300)).await; // let the spam build up
    let during = connect_times(50).await;
    assert!(!spam.is_finished(), "the spammer is held back by its rate, not served at once");
    assert!(relay.counters().get(Reason::ControlThrottled) > 0);
    eprintln!("bystander connect, worst of 20 quiet: {quiet:?}; worst of 50 during spam: {during:?}");
    assert!(
        during < quiet + Duration::from_secs(1),
        "spam slowed a bystander's connect to {during:?} (quiet: {quiet:?})"
    );
    spam.abort();
    accepting.abort();
    // The spammer itself still gets answers, at its rate.
    let mut spammer = RawSession::join(&relay, &relay.invite()).await;
    spammer.send(&ClientMessage::Ping { nonce: 1 }).await;
    assert!(matches!(spammer.next().await, RelayMessage::Pong { nonce: 1 }));
}

/// Opens `n` streams from `a` to a listener of `b` that accepts them and never reads;
/// writes into each until the writes block. Returns the streams (kept open).
async fn stall_streams(a: &Client, b: &Client, port: u16, n: usize) -> Vec<overlan_client::VirtualStream> {
    let listener = b.listen(port).await.unwrap();
    let mut kept = Vec::new();
    for _ in 0..n {
        let mut out = a.connect(listener.local_addr()).await.unwrap();
        let (inn, _) = within("accept", listener.accept()).await.unwrap();
        kept.push(inn); // accepted, never read
        let chunk = vec![7u8; 1 << 20];
        // Write until flow control stops us (the relay and b's windows are full).
        while let Ok(written) = tokio::time::timeout(Duration::from_millis(300), out.write_all(&chunk)).await {
            written.expect("writes succeed until flow control blocks them");
        }
        kept.push(out);
    }
    kept
}

#[tokio::test]
async fn a_receiver_that_never_reads_does_not_stall_its_senders_other_streams() {
    let relay = TestRelay::start();
    let a = join(&relay.invite()).await;
    let b = join(&relay.invite()).await; // never reads
    let c = join(&relay.invite()).await; // reads
    let _stalled = stall_streams(&a, &b, 7000, 8).await;
    // A's transfer to C goes through at once.
    let listener = c.listen(7001).await.unwrap();
    let mut out = a.connect(listener.local_addr()).await.unwrap();
    let (mut inn, _) = within("accept", listener.accept()).await.unwrap();
    let data = vec![1u8; 32 << 20];
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        out.write_all(&data).await.unwrap();
        out.shutdown().await.unwrap();
    });
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    // Bounded well below the write timeout (30 s): a stalled sender would not finish.
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let n = inn.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
    })
    .await
    .expect("A's stream to C must not wait for B's stalled streams");
    writer.await.unwrap();
    assert_eq!(got, 32 << 20);
    eprintln!("32 MiB A→C beside 8 stalled A→B streams in {:?}", started.elapsed());
}

#[tokio::test]
async fn a_receiver_that_takes_nothing_is_cut_off_at_the_write_timeout() {
    let relay = relay_with(Limits { write_timeout: "2s".parse().unwrap(), ..Limits::default() });
    let a = join(&relay.invite()).await;
    let b = join(&relay.invite()).await;
    let listener = b.listen(7000).await.unwrap();
    let mut out = a.connect(listener.local_addr()).await.unwrap();
    let (mut inn, _) = within("accept", listener.accept()).await.unwrap();
    let chunk = vec![7u8; 1 << 20];
    let err = within("the sender to be cut off", async {
        loop {
            if let Err(e) = out.write_all(&chunk).await {
                return e;
            }
        }
    })
    .await;
    assert!(err.to_string().contains("receiver took no data"), "{err}");
    assert_eq!(relay.counters().get(Reason::ReceiverStalled), 1);
    // The stalled receiver learns it too, once it reads.
    let mut sink = Vec::new();
    let err = within("the receiver's read", inn.read_to_end(&mut sink)).await.unwrap_err();
    assert!(err.to_string().contains("receiver took no data"), "{err}");
    // Both sessions go on.
    still_talk(&a, &b, 7001).await;
}

#[tokio::test]
async fn the_relay_wide_cap_on_held_bytes_cuts_the_oldest_stall_first() {
    use overlan_server::relay::STREAM_WINDOW;
    // Room for two stalled directions (each counted at two stream windows).
    let cap = 4 * u64::from(STREAM_WINDOW);
    let relay = relay_with(Limits { max_held_bytes: cap, ..Limits::default() });
    let a = join(&relay.invite()).await;
    let b = join(&relay.invite()).await;
    let mut first = stall_streams(&a, &b, 7000, 1).await;
    // The first stall registers once its write has been blocked past the grace period.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _more = stall_streams(&a, &b, 7001, 2).await;
    within("the oldest stall to be cut", async {
        while relay.counters().get(Reason::HeldBytesCap) == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // The first (oldest) socket is the one cut: its reader sees the reset.
    let mut inn = first.remove(0);
    let mut sink = Vec::new();
    let err = within("the oldest socket's read", inn.read_to_end(&mut sink)).await.unwrap_err();
    assert!(err.to_string().contains("receiver took no data"), "{err}");
    still_talk(&a, &b, 7002).await;
}
