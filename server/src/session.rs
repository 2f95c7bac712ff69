//! `SessionActor`: one per joined client. It owns the client's control stream, its
//! listeners, datagram ports and socket memberships, registers them in the router when
//! it starts or the client asks, and releases all of it when it stops — closed,
//! timed out (QUIC idle timeout) or replaced by a newer session of the same identity
//! and instance. Data never passes through it: datagrams and stream splices run in
//! tasks that read the router directly.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytes::BytesMut;
use overlan_shared::cluster::in_slot;
use overlan_shared::ports::PortSet;
use overlan_shared::route::NetKey;
use overlan_shared::tls::Fingerprint;
use overlan_shared::wire::control::{ClientMessage, RelayMessage, SocketId};
use overlan_shared::wire::frame::{FrameError, RelaySideCodec};
use overlan_shared::wire::stream::{StreamHeader, HEADER_LEN as STREAM_HEADER_LEN};
use overlan_shared::wire::{close_code, reset_code, ErrorCode, MAX_DATAGRAM_PAYLOAD, PROTOCOL_VERSION};
use quinn::VarInt;
use tokio_util::codec::FramedRead;

use crate::allocator::LeaseSeen;
use crate::control::{ControlQueue, PushError};
use crate::counters::Reason;
use crate::datagram::{DatagramPath, Sender};
use crate::network::{JoinNetwork, LeaveNetwork, NetworkActor};
use crate::node::Node;
use crate::pair::{AnswerOffer, AttachStream, CloseSocket, HeldStream, PartyGone, PartyRef, SocketPairActor};
use crate::relay::{INITIAL_STREAMS_PER_SESSION, SESSION_RECEIVE_WINDOW};
use crate::router::{DatagramBinding, LocalSession, Route, SessionId};
use crate::store::Network;

/// How long a newly opened stream has to deliver its header.
const STREAM_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The parts a session is made of, handed over by the handshake.
pub struct SessionParts {
    /// The client's QUIC connection.
    pub conn: quinn::Connection,
    /// Control stream, send half.
    pub control_send: quinn::SendStream,
    /// Control stream, receive half (already past the hello).
    pub control_recv: FramedRead<quinn::RecvStream, RelaySideCodec>,
    /// Client identity.
    pub identity: Fingerprint,
    /// Instance name.
    pub instance: String,
    /// Network joined.
    pub network: Network,
    /// The client's VIP.
    pub vip: Ipv4Addr,
    /// In a cluster: the signed lease of the VIP.
    pub proof: Option<String>,
}

/// A socket this session takes part in (as connector, listener, or both when a client
/// connects to its own listener).
struct Membership {
    pair: Addr<SocketPairActor>,
    /// The ephemeral stream port this session holds as the connecting side.
    local_port: Option<u16>,
    /// Waiting for this session's `Connect` answer (connecting side).
    connecting: bool,
    /// Waiting for this session's application to accept or deny (listening side).
    offered: bool,
    /// QUIC streams this session opens for the socket: one per side it is on.
    streams: u32,
}

/// One joined client.
pub struct SessionActor {
    id: SessionId,
    conn: quinn::Connection,
    identity: Fingerprint,
    instance: String,
    network: Network,
    vip: Ipv4Addr,
    proof: Option<String>,
    node: Arc<Node>,
    network_addr: Addr<NetworkActor>,
    control: ControlQueue,
    codec: RelaySideCodec,
    control_recv: Option<FramedRead<quinn::RecvStream, RelaySideCodec>>,
    listeners: HashSet<u16>,
    datagram_ports: PortSet,
    stream_ports: PortSet,
    sockets: HashMap<SocketId, Membership>,
    /// Streams the client may need for its sockets (sum of `Membership::streams`).
    stream_demand: u32,
    pending_connects: usize,
    pending_offers: usize,
    /// Current QUIC stream limit granted to the client.
    stream_limit: u32,
    /// QUIC close code and reason used when the session stops.
    end: (u32, String),
}

impl SessionActor {
    /// Builds the actor; the control writer task starts at once.
    pub fn new(parts: SessionParts, node: Arc<Node>) -> Self {
        let parts_max_frame = node.config.max_control_frame;
        let network_addr = node.network(&parts.network);
        let control = ControlQueue::start(parts.control_send);
        Self {
            id: node.router.next_session_id(),
            conn: parts.conn,
            identity: parts.identity,
            instance: parts.instance,
            network: parts.network,
            vip: parts.vip,
            proof: parts.proof,
            network_addr,
            node,
            control,
            codec: RelaySideCodec::new(parts_max_frame),
            control_recv: Some(parts.control_recv),
            listeners: HashSet::new(),
            datagram_ports: PortSet::default(),
            stream_ports: PortSet::default(),
            sockets: HashMap::new(),
            stream_demand: 0,
            pending_connects: 0,
            pending_offers: 0,
            stream_limit: INITIAL_STREAMS_PER_SESSION,
            end: (close_code::NORMAL, "session ended".to_owned()),
        }
    }

    fn local(&self, ctx: &Context<Self>) -> LocalSession {
        LocalSession { id: self.id, addr: ctx.address(), conn: self.conn.clone() }
    }

    fn net(&self) -> NetKey {
        self.network.key
    }

    /// Queues a control message; a client that lets the queue fill is cut off. Frames
    /// are encoded here so the queue holds small `Bytes`, not message structs.
    fn send(&mut self, ctx: &mut Context<Self>, msg: RelayMessage) {
        let mut buf = BytesMut::new();
        if let Err(e) = self.codec.encode_into(&msg, &mut buf) {
            tracing::error!(error = %e, "dropping unencodable control message");
            return;
        }
        if let Err(e) = self.control.push(buf.freeze()) {
            if e == PushError::Full {
                tracing::warn!(session = self.id, vip = %self.vip, "control queue full; disconnecting");
                self.end = (close_code::PROTOCOL_VIOLATION, "control stream not read; too many unread messages".into());
            }
            ctx.stop();
        }
    }

    fn fail(&mut self, ctx: &mut Context<Self>, req: u64, code: ErrorCode, message: String) {
        self.send(ctx, RelayMessage::Failed { req, code, message });
    }

    fn disconnect(&mut self, ctx: &mut Context<Self>, code: u32, reason: String) {
        tracing::info!(session = self.id, vip = %self.vip, %reason, "disconnecting session");
        self.end = (code, reason);
        ctx.stop();
    }

    /// Refuses request `req` because a limit of this session is reached.
    fn limit(&mut self, ctx: &mut Context<Self>, req: u64, reason: Reason, message: String) {
        self.node.count(reason);
        self.fail(ctx, req, ErrorCode::LimitExceeded, message);
    }

    fn handle_listen(&mut self, ctx: &mut Context<Self>, req: u64, port: u16) {
        if !self.is_current() {
            return self.fail(ctx, req, ErrorCode::Replaced, ErrorCode::Replaced.describe().to_owned());
        }
        let max = self.node.config.limits.max_listeners;
        if self.listeners.len() >= max as usize {
            let what =
                format!("listen {}:{port}: this session already has {max} listeners (the relay's limit)", self.vip);
            return self.limit(ctx, req, Reason::ListenerLimit, what);
        }
        let Ok(port) = self.stream_ports.claim(port) else {
            return self.fail(ctx, req, ErrorCode::AddrInUse, format!("listen {}:{port}: address in use", self.vip));
        };
        self.listeners.insert(port);
        let local = self.local(ctx);
        self.node.router.add_listener(self.net(), SocketAddrV4::new(self.vip, port), local);
        self.send(ctx, RelayMessage::Listening { req, port });
    }

    fn handle_unlisten(&mut self, port: u16) {
        if self.listeners.remove(&port) {
            self.stream_ports.release(port);
            self.node.router.remove_listener(self.net(), SocketAddrV4::new(self.vip, port), self.id);
        }
    }

    fn handle_bind(&mut self, ctx: &mut Context<Self>, req: u64, port: u16) {
        if !self.is_current() {
            return self.fail(ctx, req, ErrorCode::Replaced, ErrorCode::Replaced.describe().to_owned());
        }
        let max = self.node.config.limits.max_bound_ports;
        if self.datagram_ports.len() >= max as usize {
            let what =
                format!("bind {}:{port}: this session already has {max} bound ports (the relay's limit)", self.vip);
            return self.limit(ctx, req, Reason::PortLimit, what);
        }
        let Ok(port) = self.datagram_ports.claim(port) else {
            return self.fail(ctx, req, ErrorCode::AddrInUse, format!("bind {}:{port}: address in use", self.vip));
        };
        let binding = DatagramBinding { session: self.id, conn: self.conn.clone() };
        self.node.router.bind_datagram(self.net(), SocketAddrV4::new(self.vip, port), binding);
        self.send(ctx, RelayMessage::Bound { req, port });
    }

    fn handle_unbind(&mut self, port: u16) {
        if self.datagram_ports.release(port) {
            self.node.router.unbind_datagram(self.net(), SocketAddrV4::new(self.vip, port), self.id);
        }
    }

    fn handle_connect(&mut self, ctx: &mut Context<Self>, req: u64, to: SocketAddrV4) {
        let limits = &self.node.config.limits;
        let (max_pending, max_sockets) = (limits.max_pending_connects, limits.max_sockets);
        if self.pending_connects >= max_pending as usize {
            let what = format!("connect {to}: too many connection attempts in flight ({max_pending}); retry later");
            return self.limit(ctx, req, Reason::PendingConnectLimit, what);
        }
        if self.sockets.len() >= max_sockets as usize {
            let what = format!("connect {to}: this session already has {max_sockets} sockets open (the relay's limit)");
            return self.limit(ctx, req, Reason::SocketLimit, what);
        }
        let subnet = self.network.subnet;
        if to.port() == 0 || !subnet.is_assignable(*to.ip()) {
            return self.fail(
                ctx,
                req,
                ErrorCode::Unreachable,
                format!("connect {to}: unreachable (not a client address of network {} {subnet})", self.network.name),
            );
        }
        // The one route lookup: a session here (its listener answers), or a peer link
        // toward the node that has it (that node's listener answers).
        let listener = match self.node.router.route(self.net(), *to.ip()) {
            None => {
                return self.fail(
                    ctx,
                    req,
                    ErrorCode::Unreachable,
                    format!("connect {to}: unreachable (no session has that VIP)"),
                )
            }
            Some(Route::Local(_)) => match self.node.router.listener(self.net(), to) {
                Some(listener) => PartyRef::Session(listener),
                None => {
                    return self.fail(
                        ctx,
                        req,
                        ErrorCode::Refused,
                        format!("connect {to}: refused (nothing listening)"),
                    )
                }
            },
            Some(Route::Peer(link)) => PartyRef::Link { link, remote: None },
        };
        let Ok(port) = self.stream_ports.claim(0) else {
            return self.fail(ctx, req, ErrorCode::AddrInUse, format!("connect {to}: no free ephemeral port"));
        };
        let socket = self.node.router.next_socket_id();
        let local = SocketAddrV4::new(self.vip, port);
        let connector = (PartyRef::Session(self.local(ctx)), local);
        let pair = SocketPairActor::new(socket, req, self.net(), connector, (listener, to), self.node.clone()).start();
        self.pending_connects += 1;
        self.add_socket(
            socket,
            Membership { pair, local_port: Some(port), connecting: true, offered: false, streams: 1 },
        );
    }

    fn with_socket(
        &mut self,
        ctx: &mut Context<Self>,
        socket: SocketId,
        f: impl FnOnce(&Addr<SocketPairActor>, SessionId),
    ) {
        match self.sockets.get(&socket) {
            Some(m) => f(&m.pair, self.id),
            None => self.send(
                ctx,
                RelayMessage::Error {
                    code: ErrorCode::UnknownSocket,
                    message: format!("socket {socket} is not one of this session's sockets"),
                },
            ),
        }
    }

    fn handle_message(&mut self, ctx: &mut Context<Self>, msg: ClientMessage) {
        match msg {
            ClientMessage::Hello { .. } => {
                self.disconnect(ctx, close_code::PROTOCOL_VIOLATION, "protocol violation: hello sent twice".into())
            }
            ClientMessage::Listen { req, port } => self.handle_listen(ctx, req, port),
            ClientMessage::Unlisten { port } => self.handle_unlisten(port),
            ClientMessage::Bind { req, port } => self.handle_bind(ctx, req, port),
            ClientMessage::Unbind { port } => self.handle_unbind(port),
            ClientMessage::Connect { req, to } => self.handle_connect(ctx, req, to),
            ClientMessage::Accept { socket } => {
                self.answered(socket);
                self.with_socket(ctx, socket, |pair, session| pair.do_send(AnswerOffer { session, result: Ok(()) }))
            }
            ClientMessage::Deny { socket } => {
                self.answered(socket);
                self.with_socket(ctx, socket, |pair, session| {
                    pair.do_send(AnswerOffer { session, result: Err(ErrorCode::Denied) })
                })
            }
            ClientMessage::Close { socket } => {
                self.with_socket(ctx, socket, |pair, session| pair.do_send(CloseSocket { session }))
            }
            ClientMessage::Ping { nonce } => self.send(ctx, RelayMessage::Pong { nonce }),
        }
    }
}

impl Actor for SessionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Join the network first; nothing else happens until the VIP routes here, so the
        // client is welcomed only once others can reach it.
        // A VIP outside this node's slot (the client roamed here) is announced with the
        // proof of its issuing node, so peers accept it.
        let slot = self.node.router.slot();
        let foreign = self.node.cluster.is_some() && !in_slot(self.network.subnet, slot, self.vip);
        let proof = if foreign { self.proof.clone() } else { None };
        let join = JoinNetwork { vip: self.vip, session: self.local(ctx), proof };
        ctx.wait(self.network_addr.send(join).into_actor(self).map(|joined, act, ctx| match joined {
            Ok(()) => act.welcome(ctx),
            Err(_) => {
                act.end = (close_code::INTERNAL, "relay internal error: network unavailable".into());
                ctx.stop();
            }
        }));
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.network_addr.do_send(LeaveNetwork { vip: self.vip, session: self.id });
        self.node.allocator.do_send(LeaseSeen {
            network: self.network.id,
            identity: self.identity,
            instance: self.instance.clone(),
        });
        self.release_all();
    }
}

impl SessionActor {
    fn welcome(&mut self, ctx: &mut Context<Self>) {
        tracing::info!(
            session = self.id, network = %self.network.name, vip = %self.vip,
            identity = %self.identity, instance = %self.instance,
            peer = %self.conn.remote_address(), "session joined"
        );
        let welcome = RelayMessage::Welcome {
            protocol: PROTOCOL_VERSION,
            session: self.id,
            network: self.network.name.clone(),
            vip: self.vip,
            subnet: self.network.subnet,
            max_datagram_payload: MAX_DATAGRAM_PAYLOAD as u32,
            idle_timeout_ms: self.node.config.idle_timeout.as_millis() as u64,
            lease: self.proof.clone(),
        };
        // Authenticated: the tiny windows of the handshake grow to a member's.
        self.conn.set_receive_window(VarInt::from_u32(SESSION_RECEIVE_WINDOW));
        self.conn.set_max_concurrent_bi_streams(VarInt::from_u32(self.stream_limit));
        self.send(ctx, welcome);
        if let Some(recv) = self.control_recv.take() {
            ctx.add_stream(throttled(recv, &self.node));
        }
        let sender = Sender { session: self.id, net: self.net(), vip: self.vip, subnet: self.network.subnet };
        let path = DatagramPath::new(sender, &self.node.config.limits);
        tokio::spawn(run_session_io(self.conn.clone(), self.node.clone(), path, ctx.address()));
    }

    /// Releases everything the session registered and closes its connection.
    fn release_all(&mut self) {
        let net = self.net();
        for port in self.listeners.drain() {
            self.node.router.remove_listener(net, SocketAddrV4::new(self.vip, port), self.id);
        }
        for port in self.datagram_ports.drain() {
            self.node.router.unbind_datagram(net, SocketAddrV4::new(self.vip, port), self.id);
        }
        for (_, m) in self.sockets.drain() {
            m.pair.do_send(PartyGone { session: self.id });
        }
        let (code, reason) = &self.end;
        self.conn.close(VarInt::from_u32(*code), reason.as_bytes());
        tracing::info!(session = self.id, vip = %self.vip, reason = %reason, "session closed");
    }
}

impl StreamHandler<Result<ClientMessage, FrameError>> for SessionActor {
    fn handle(&mut self, item: Result<ClientMessage, FrameError>, ctx: &mut Self::Context) {
        match item {
            Ok(msg) => self.handle_message(ctx, msg),
            Err(FrameError::Io(_)) => ctx.stop(),
            Err(e) => self.disconnect(ctx, close_code::PROTOCOL_VIOLATION, format!("protocol violation: {e}")),
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        // The client closed its control stream: it left.
        ctx.stop();
    }
}

/// A newer session of the same identity and instance took over.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Replace;

impl Handler<Replace> for SessionActor {
    type Result = ();
    fn handle(&mut self, _: Replace, ctx: &mut Self::Context) {
        self.disconnect(ctx, close_code::REPLACED, ErrorCode::Replaced.describe().to_owned());
    }
}

/// Something the client did was rejected outside a request; tell it.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Notice {
    /// What went wrong.
    pub code: ErrorCode,
    /// Human explanation.
    pub message: String,
}

impl Handler<Notice> for SessionActor {
    type Result = ();
    fn handle(&mut self, msg: Notice, ctx: &mut Self::Context) {
        self.send(ctx, RelayMessage::Error { code: msg.code, message: msg.message });
    }
}

/// A socket pair offers an incoming connection to this (listening) session.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Offer {
    /// Socket id.
    pub socket: SocketId,
    /// The pair.
    pub pair: Addr<SocketPairActor>,
    /// The listener's address.
    pub local: SocketAddrV4,
    /// The connecting side's address.
    pub peer: SocketAddrV4,
}

impl Handler<Offer> for SessionActor {
    type Result = ();
    fn handle(&mut self, msg: Offer, ctx: &mut Self::Context) {
        if !self.listeners.contains(&msg.local.port()) {
            msg.pair.do_send(AnswerOffer { session: self.id, result: Err(ErrorCode::Refused) });
            return;
        }
        let limits = &self.node.config.limits;
        let refusal = if self.pending_offers >= limits.max_pending_offers as usize {
            Some(Reason::PendingOfferLimit)
        } else if self.sockets.len() >= limits.max_sockets as usize && !self.sockets.contains_key(&msg.socket) {
            Some(Reason::SocketLimit)
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.node.count(reason);
            msg.pair.do_send(AnswerOffer { session: self.id, result: Err(ErrorCode::LimitExceeded) });
            return;
        }
        self.pending_offers += 1;
        match self.sockets.get_mut(&msg.socket) {
            // A connect to this session's own listener: one membership on both sides.
            Some(m) => {
                m.offered = true;
                m.streams += 1;
                self.stream_demand += 1;
                self.grow_stream_limit();
            }
            None => self.add_socket(
                msg.socket,
                Membership { pair: msg.pair, local_port: None, connecting: false, offered: true, streams: 1 },
            ),
        }
        self.send(ctx, RelayMessage::Incoming { socket: msg.socket, local: msg.local, peer: msg.peer });
    }
}

/// The outcome of this session's `Connect`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConnectOutcome {
    /// Request id.
    pub req: u64,
    /// Socket id.
    pub socket: SocketId,
    /// Local and peer address, or why it failed.
    pub result: Result<(SocketAddrV4, SocketAddrV4), (ErrorCode, String)>,
}

impl Handler<ConnectOutcome> for SessionActor {
    type Result = ();
    fn handle(&mut self, msg: ConnectOutcome, ctx: &mut Self::Context) {
        if let Some(m) = self.sockets.get_mut(&msg.socket) {
            if std::mem::take(&mut m.connecting) {
                self.pending_connects -= 1;
            }
        }
        match msg.result {
            Ok((local, peer)) => {
                self.send(ctx, RelayMessage::Connected { req: msg.req, socket: msg.socket, local, peer })
            }
            Err((code, message)) => {
                self.forget_socket(msg.socket);
                self.fail(ctx, msg.req, code, message);
            }
        }
    }
}

impl SessionActor {
    /// Records a socket and makes sure the client may open a QUIC stream for it: the
    /// stream limit doubles while sockets approach it.
    fn add_socket(&mut self, socket: SocketId, membership: Membership) {
        self.stream_demand += membership.streams;
        self.sockets.insert(socket, membership);
        self.grow_stream_limit();
    }

    fn grow_stream_limit(&mut self) {
        // Each socket needs one stream per side this session is on (two when it connects
        // to its own listener), plus the control stream.
        let max = self.node.config.limits.max_sockets * 2 + 1;
        let wanted = self.stream_demand + INITIAL_STREAMS_PER_SESSION / 2;
        if wanted > self.stream_limit && self.stream_limit < max {
            self.stream_limit = (self.stream_limit * 2).clamp(wanted, max);
            self.conn.set_max_concurrent_bi_streams(VarInt::from_u32(self.stream_limit));
        }
    }

    fn forget_socket(&mut self, socket: SocketId) {
        if let Some(m) = self.sockets.remove(&socket) {
            if let Some(port) = m.local_port {
                self.stream_ports.release(port);
            }
            self.stream_demand -= m.streams;
            self.pending_connects -= usize::from(m.connecting);
            self.pending_offers -= usize::from(m.offered);
        }
    }

    /// The application answered an offer: no longer pending.
    fn answered(&mut self, socket: SocketId) {
        if let Some(m) = self.sockets.get_mut(&socket) {
            if std::mem::take(&mut m.offered) {
                self.pending_offers -= 1;
            }
        }
    }

    /// Whether this session still holds its VIP (a newer session of the same identity
    /// and instance may have replaced it while its messages were in flight).
    fn is_current(&self) -> bool {
        matches!(self.node.router.route(self.net(), self.vip), Some(Route::Local(s)) if s.id == self.id)
    }
}

/// A socket pair this session took part in has ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PairEnded {
    /// Socket id.
    pub socket: SocketId,
    /// Tell the client why, if its stream may not have told it.
    pub notify: Option<ErrorCode>,
}

impl Handler<PairEnded> for SessionActor {
    type Result = ();
    fn handle(&mut self, msg: PairEnded, ctx: &mut Self::Context) {
        if self.sockets.contains_key(&msg.socket) {
            self.forget_socket(msg.socket);
            if let Some(code) = msg.notify {
                self.send(ctx, RelayMessage::SocketClosed { socket: msg.socket, code });
            }
        }
    }
}

/// The session's one data-path task: forwards the client's datagrams and hands each
/// QUIC stream it opens to its socket pair. When the connection ends — closed, or the
/// QUIC idle timeout found the client dead — it tells the session, which then ends.
async fn run_session_io(conn: quinn::Connection, node: Arc<Node>, mut path: DatagramPath, addr: Addr<SessionActor>) {
    let session = path.session();
    let reason = loop {
        tokio::select! {
            datagram = conn.read_datagram() => match datagram {
                Ok(datagram) => path.handle_datagram(&node, datagram, &addr),
                Err(e) => break e,
            },
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    tokio::spawn(attach_stream(send, recv, node.clone(), session, addr.clone()));
                }
                Err(e) => break e,
            },
        }
    };
    addr.do_send(ConnectionEnded(reason));
}

/// The session's QUIC connection ended.
#[derive(Message)]
#[rtype(result = "()")]
struct ConnectionEnded(quinn::ConnectionError);

impl Handler<ConnectionEnded> for SessionActor {
    type Result = ();
    fn handle(&mut self, msg: ConnectionEnded, ctx: &mut Self::Context) {
        tracing::info!(session = self.id, vip = %self.vip, reason = %msg.0, "connection ended");
        ctx.stop();
    }
}

async fn attach_stream(
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    node: Arc<Node>,
    session: SessionId,
    addr: Addr<SessionActor>,
) {
    let mut raw = [0u8; STREAM_HEADER_LEN];
    let header = match tokio::time::timeout(STREAM_HEADER_TIMEOUT, recv.read_exact(&mut raw)).await {
        Ok(Ok(())) => StreamHeader::parse(&raw).map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(format!("stream ended before its header: {e}")),
        Err(_) => Err("stream header did not arrive in time".to_owned()),
    };
    let stream = HeldStream::new(send, recv);
    let header = match header {
        Ok(h) => h,
        Err(why) => {
            stream.reset(reset_code::BAD_HEADER);
            addr.do_send(Notice { code: ErrorCode::ProtocolViolation, message: format!("stream rejected: {why}") });
            return;
        }
    };
    match node.router.pair(header.socket) {
        Some(pair) => pair.do_send(AttachStream { session, session_addr: Some(addr), stream }),
        None => {
            stream.reset(reset_code::UNKNOWN_SOCKET);
            addr.do_send(Notice {
                code: ErrorCode::UnknownSocket,
                message: format!("stream for socket {} rejected: no such socket", header.socket),
            });
        }
    }
}

/// The control stream, read no faster than the session's control rate: a client that
/// sends faster is slowed down (its QUIC flow control pushes back), so one client's
/// spam costs the shared arbiter a bounded amount of work.
fn throttled(
    recv: FramedRead<quinn::RecvStream, RelaySideCodec>,
    node: &Arc<Node>,
) -> impl futures_util::Stream<Item = Result<ClientMessage, FrameError>> {
    use futures_util::StreamExt;
    use governor::{Quota, RateLimiter};
    use std::num::NonZeroU32;
    let limits = &node.config.limits;
    let quota = Quota::per_second(NonZeroU32::new(limits.control_rate).unwrap_or(NonZeroU32::MIN))
        .allow_burst(NonZeroU32::new(limits.control_burst).unwrap_or(NonZeroU32::MIN));
    let limiter = Arc::new(RateLimiter::direct(quota));
    let node = node.clone();
    recv.then(move |item| {
        let limiter = limiter.clone();
        let node = node.clone();
        async move {
            if limiter.check().is_err() {
                node.count(Reason::ControlThrottled);
                limiter.until_ready().await;
            }
            item
        }
    })
}
