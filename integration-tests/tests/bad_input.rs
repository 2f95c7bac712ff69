//! Bad input gets a clear error and harms nobody else: malformed, unknown and oversized
//! control frames, a forged datagram source, a datagram from an unbound port, a stream
//! for someone else's socket. Each test keeps a healthy pair of members talking through
//! the abuse and checks them afterwards.

use std::net::SocketAddrV4;

use bytes::{BufMut, BytesMut};
use overlan_client::{Client, DatagramSocket, SessionState, VirtualStream};
use overlan_integration_tests::*;
use overlan_shared::config::Secret;
use overlan_shared::wire::control::ClientMessage;
use overlan_shared::wire::control::RelayMessage;
use overlan_shared::wire::datagram::DatagramHeader;
use overlan_shared::wire::stream::StreamHeader;
use overlan_shared::wire::{close_code, reset_code, ErrorCode, MAX_DATAGRAM_PAYLOAD, PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Two members with an open stream and datagram sockets, to check after the abuse.
struct Bystanders {
    a: Client,
    b: Client,
    a_stream: VirtualStream,
    b_stream: VirtualStream,
    a_dgram: DatagramSocket,
    b_dgram: DatagramSocket,
}

impl Bystanders {
    async fn new(relay: &TestRelay) -> Self {
        let a = join(&relay.invite()).await;
        let b = join(&relay.invite()).await;
        let l = b.listen(1000).await.unwrap();
        let a_stream = a.connect(l.local_addr()).await.unwrap();
        let (b_stream, _) = within("accept", l.accept()).await.unwrap();
        let a_dgram = a.bind_datagram(2000).await.unwrap();
        let b_dgram = b.bind_datagram(2000).await.unwrap();
        Self { a, b, a_stream, b_stream, a_dgram, b_dgram }
    }

    async fn still_fine(&mut self) {
        assert_eq!(self.a.state(), SessionState::Up);
        assert_eq!(self.b.state(), SessionState::Up);
        self.a_stream.write_all(b"still here").await.unwrap();
        let mut buf = [0u8; 10];
        within("bystander stream", self.b_stream.read_exact(&mut buf)).await.unwrap();
        assert_eq!(&buf, b"still here");
        self.b_dgram.send_to(b"and here", self.a_dgram.local_addr()).await.unwrap();
        let d = within("bystander datagram", self.a_dgram.recv()).await.unwrap();
        assert_eq!(&d.payload[..], b"and here");
    }
}

fn frame(body: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u32(body.len() as u32);
    b.put_slice(body);
    b
}

fn hello(token: &str) -> BytesMut {
    let msg = ClientMessage::Hello {
        protocol: PROTOCOL_VERSION,
        token: Secret::new(token),
        instance: String::new(),
        lease: None,
        network: None,
        tun: false,
        existing_only: false,
    };
    frame(&serde_json::to_vec(&msg).unwrap())
}

/// Sends a valid hello then `payload` on the control stream, returns how the relay closed.
async fn after_hello(relay: &TestRelay, payload: &[u8]) -> (u64, String) {
    let id = identity();
    let conn = raw_connect(relay, Some(&id)).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&hello(relay.invite().token.expose())).await.unwrap();
    send.write_all(payload).await.unwrap();
    close_reason(&conn).await
}

#[tokio::test]
async fn malformed_unknown_and_oversized_control_frames_disconnect_only_the_offender() {
    let relay = TestRelay::start();
    let mut ok = Bystanders::new(&relay).await;
    let leases_before = relay.store().leases(1).unwrap();

    let (code, reason) = after_hello(&relay, &frame(b"{not json")).await;
    assert_eq!(code, u64::from(close_code::PROTOCOL_VIOLATION));
    assert!(reason.contains("malformed control frame"), "{reason}");

    let (code, reason) = after_hello(&relay, &frame(br#"{"type":"format_disk","req":1}"#)).await;
    assert_eq!(code, u64::from(close_code::PROTOCOL_VIOLATION));
    assert!(reason.contains("unknown variant"), "{reason}");

    let mut huge = BytesMut::new();
    huge.put_u32(10 * 1024 * 1024);
    let (code, reason) = after_hello(&relay, &huge).await;
    assert_eq!(code, u64::from(close_code::PROTOCOL_VIOLATION));
    assert!(reason.contains("exceeds the 65536-byte cap"), "{reason}");

    // Garbage instead of a hello.
    let conn = raw_connect(&relay, Some(&identity())).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&frame(br#"{"type":"ping","nonce":1}"#)).await.unwrap();
    let (code, reason) = close_reason(&conn).await;
    assert_eq!(code, u64::from(close_code::PROTOCOL_VIOLATION));
    assert!(reason.contains("expected hello"), "{reason}");

    // A second hello later.
    let (_, reason) = after_hello(&relay, &hello("x")).await;
    assert!(reason.contains("hello sent twice"), "{reason}");

    ok.still_fine().await;
    let leases_after = relay.store().leases(1).unwrap();
    assert!(leases_after.len() >= leases_before.len());
    for lease in &leases_before {
        assert!(leases_after.contains(lease), "lease {lease:?} lost");
    }
}

#[tokio::test]
async fn forged_datagram_sources_are_dropped_and_reported() {
    let relay = TestRelay::start();
    let mut ok = Bystanders::new(&relay).await;
    let mut mallory = RawSession::join(&relay, &relay.invite()).await;
    mallory.send(&ClientMessage::Bind { req: 1, port: 3000 }).await;
    assert!(matches!(mallory.next().await, RelayMessage::Bound { req: 1, port: 3000 }));
    let datagram = |src: SocketAddrV4, payload: &[u8]| {
        let mut d = DatagramHeader { src, dst: ok.b_dgram.local_addr() }.to_bytes().to_vec();
        d.extend_from_slice(payload);
        bytes::Bytes::from(d)
    };

    // Claiming to be a.
    mallory.conn.send_datagram(datagram(ok.a_dgram.local_addr(), b"i am a")).unwrap();
    let (code, message) = mallory.next_error().await;
    assert_eq!(code, ErrorCode::ForgedSource);
    assert!(message.contains(&ok.a_dgram.local_addr().to_string()), "{message}");

    // Her own VIP, but a port she never bound.
    mallory.conn.send_datagram(datagram(SocketAddrV4::new(mallory.vip, 4321), b"unbound")).unwrap();
    let (code, message) = mallory.next_error().await;
    assert_eq!(code, ErrorCode::InvalidPort);
    assert!(message.contains("4321"), "{message}");

    // Too large for the network (the library refuses this before sending).
    let big = vec![0u8; MAX_DATAGRAM_PAYLOAD + 1];
    mallory.conn.send_datagram(datagram(SocketAddrV4::new(mallory.vip, 3000), &big)).unwrap();
    let (code, _) = mallory.next_error().await;
    assert_eq!(code, ErrorCode::MessageTooLarge);

    // A well-formed datagram from her bound port still goes through: she was told, not cut off.
    mallory.conn.send_datagram(datagram(SocketAddrV4::new(mallory.vip, 3000), b"legit")).unwrap();
    let got = within("mallory's legit datagram", ok.b_dgram.recv()).await.unwrap();
    assert_eq!(&got.payload[..], b"legit", "no forged datagram was delivered before it");
    assert_eq!(got.src, SocketAddrV4::new(mallory.vip, 3000));
    ok.still_fine().await;
}

#[tokio::test]
async fn a_stream_for_someone_elses_socket_is_reset() {
    let relay = TestRelay::start();
    let mut ok = Bystanders::new(&relay).await;
    let mut mallory = RawSession::join(&relay, &relay.invite()).await;
    let mut buf = [0u8; 1];
    // Attach to the bystanders' socket id.
    let (mut send, mut recv) = mallory.conn.open_bi().await.unwrap();
    send.write_all(&StreamHeader { socket: ok.a_stream.socket_id() }.to_bytes()).await.unwrap();
    send.write_all(b"injected").await.unwrap();
    let err = within("reset of the hijack stream", recv.read(&mut buf)).await.unwrap_err();
    assert!(
        matches!(err, quinn::ReadError::Reset(c) if c.into_inner() == u64::from(reset_code::UNKNOWN_SOCKET)),
        "{err}"
    );
    let (code, message) = mallory.next_error().await;
    assert_eq!(code, ErrorCode::UnknownSocket);
    assert!(message.contains("not this session's socket"), "{message}");
    // A socket id that does not exist at all.
    let (mut send, mut recv) = mallory.conn.open_bi().await.unwrap();
    send.write_all(&StreamHeader { socket: 999_999 }.to_bytes()).await.unwrap();
    let err = within("reset of the unknown stream", recv.read(&mut buf)).await.unwrap_err();
    assert!(matches!(err, quinn::ReadError::Reset(_)), "{err}");
    let (code, _) = mallory.next_error().await;
    assert_eq!(code, ErrorCode::UnknownSocket);
    // Accepting or closing a socket that is not hers.
    mallory.send(&ClientMessage::Close { socket: ok.a_stream.socket_id() }).await;
    let (code, _) = mallory.next_error().await;
    assert_eq!(code, ErrorCode::UnknownSocket);
    // The real pair carries on, and never saw "injected".
    ok.still_fine().await;
}

#[tokio::test]
async fn a_connect_flood_is_capped_and_the_target_stays_up() {
    use overlan_server::config::DEFAULT_MAX_PENDING_CONNECTS;
    use overlan_server::counters::Reason;
    const MAX_PENDING_CONNECTS: usize = DEFAULT_MAX_PENDING_CONNECTS as usize;
    let relay = TestRelay::start();
    // A target whose application never answers: every attempt stays pending.
    let mut victim = RawSession::join(&relay, &relay.invite()).await;
    victim.send(&ClientMessage::Listen { req: 1, port: 80 }).await;
    assert!(matches!(victim.next().await, RelayMessage::Listening { req: 1, port: 80 }));
    let mut mallory = RawSession::join(&relay, &relay.invite()).await;
    const FLOOD: usize = 1000;
    for req in 0..FLOOD as u64 {
        mallory.send(&ClientMessage::Connect { req, to: SocketAddrV4::new(victim.vip, 80) }).await;
    }
    // At most MAX_PENDING_CONNECTS wait at once; the rest are refused at once.
    for _ in 0..FLOOD - MAX_PENDING_CONNECTS {
        match mallory.next().await {
            RelayMessage::Failed { code: ErrorCode::LimitExceeded, message, .. } => {
                assert!(message.contains("too many connection attempts in flight"), "{message}")
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // The target got exactly the admitted offers, and is still connected and answering.
    let mut offers = 0;
    victim.send(&ClientMessage::Ping { nonce: 7 }).await;
    loop {
        match victim.next().await {
            RelayMessage::Incoming { .. } => offers += 1,
            RelayMessage::Pong { nonce: 7 } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(offers, MAX_PENDING_CONNECTS);
    assert_eq!(relay.counters().get(Reason::PendingConnectLimit), (FLOOD - MAX_PENDING_CONNECTS) as u64);
    // Others still reach the relay and each other.
    let a = join(&relay.invite()).await;
    let b = join(&relay.invite()).await;
    let listener = b.listen(81).await.unwrap();
    let _s = a.connect(listener.local_addr()).await.unwrap();
    within("accept", listener.accept()).await.unwrap();
}
