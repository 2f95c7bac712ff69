//! `SessionActor`: one per joined client. It owns the client's control stream, its
//! listeners, datagram ports and socket memberships, registers them in the router when
//! it starts or the client asks, and releases all of it when it stops — closed,
//! timed out (QUIC idle timeout) or replaced by a newer session of the same identity
//! and instance. Data never passes through it: datagrams and stream splices run in
//! tasks that read the router directly.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytes::BytesMut;
use overlan_shared::cluster::in_slot;
use overlan_shared::route::NetKey;
use overlan_shared::session::{Refusal, SessionLimits, SessionPolicy, TokenBucket};
use overlan_shared::tls::Fingerprint;
use overlan_shared::wire::control::{ClientMessage, PeerInfo, RelayMessage, SocketId};
use overlan_shared::wire::frame::{FrameError, RelaySideCodec};
use overlan_shared::wire::stream::{StreamHeader, HEADER_LEN as STREAM_HEADER_LEN};
use overlan_shared::wire::{close_code, reset_code, ErrorCode, MAX_DATAGRAM_PAYLOAD, PROTOCOL_VERSION};
use quinn::VarInt;
use tokio_util::codec::FramedRead;

use crate::allocator::{LeaseSeen, ListLeases, ReleaseLease};
use crate::cluster::{Holder, MemberNames};
use crate::control::{ControlQueue, PushError};
use crate::counters::Reason;
use crate::datagram::{DatagramPath, Sender};
use crate::network::{JoinNetwork, LeaveNetwork, NetworkActor};
use crate::node::Node;
use crate::pair::{AnswerOffer, AttachStream, CloseSocket, HeldStream, PartyGone, PartyRef, SocketPairActor};
use crate::relay::{INITIAL_STREAMS_PER_SESSION, SESSION_RECEIVE_WINDOW};
use crate::router::{DatagramBinding, LocalSession, Route, SessionId};
use crate::store::Network;
use crate::store::StoreError;

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
    /// TUN mode: every datagram to the VIP, and IPv4 packets.
    pub tun: bool,
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
    tun: bool,
    node: Arc<Node>,
    network_addr: Addr<NetworkActor>,
    control: ControlQueue,
    codec: RelaySideCodec,
    control_recv: Option<FramedRead<quinn::RecvStream, RelaySideCodec>>,
    /// What the client holds and may hold (the sans-IO policy machine).
    policy: SessionPolicy,
    /// The pairs of the sockets it takes part in.
    pairs: HashMap<SocketId, Addr<SocketPairActor>>,
    /// QUIC close code and reason used when the session stops.
    end: (u32, String),
    /// The client gave its VIP back: the session only waits for the client to close.
    released: bool,
    /// Replaced by a newer session: told so, closing in a moment.
    replaced: bool,
}

impl SessionActor {
    /// Builds the actor; the control writer task starts at once.
    pub fn new(parts: SessionParts, node: Arc<Node>) -> Self {
        let parts_max_frame = node.config.max_control_frame;
        let network_addr = node.network(&parts.network);
        let control = ControlQueue::start(parts.control_send);
        let policy = SessionPolicy::new(session_limits(&node.config.limits), INITIAL_STREAMS_PER_SESSION);
        Self {
            id: node.router.next_session_id(),
            conn: parts.conn,
            identity: parts.identity,
            instance: parts.instance,
            network: parts.network,
            vip: parts.vip,
            proof: parts.proof,
            tun: parts.tun,
            network_addr,
            node,
            control,
            codec: RelaySideCodec::new(parts_max_frame),
            control_recv: Some(parts.control_recv),
            policy,
            pairs: HashMap::new(),
            end: (close_code::NORMAL, "session ended".to_owned()),
            released: false,
            replaced: false,
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

    /// Tells the client why the policy refused request `req` (`what`: the request, for
    /// the message), counting refusals by a limit.
    fn refuse(&mut self, ctx: &mut Context<Self>, req: u64, what: String, refusal: Refusal) {
        let (reason, message) = match refusal {
            Refusal::ListenerLimit(max) => {
                (Reason::ListenerLimit, format!("{what}: this session already has {max} listeners (the relay's limit)"))
            }
            Refusal::PortLimit(max) => {
                (Reason::PortLimit, format!("{what}: this session already has {max} bound ports (the relay's limit)"))
            }
            Refusal::PendingConnectLimit(max) => (
                Reason::PendingConnectLimit,
                format!("{what}: too many connection attempts in flight ({max}); retry later"),
            ),
            Refusal::SocketLimit(max) => (
                Reason::SocketLimit,
                format!("{what}: this session already has {max} sockets open (the relay's limit)"),
            ),
            Refusal::PendingOfferLimit(_) | Refusal::NotListening => {
                return self.fail(ctx, req, ErrorCode::Refused, format!("{what}: refused"))
            }
            Refusal::AddrInUse => return self.fail(ctx, req, ErrorCode::AddrInUse, format!("{what}: address in use")),
            Refusal::NoEphemeralPort => {
                return self.fail(ctx, req, ErrorCode::AddrInUse, format!("{what}: no free ephemeral port"))
            }
        };
        self.limit(ctx, req, reason, message);
    }

    fn handle_listen(&mut self, ctx: &mut Context<Self>, req: u64, port: u16) {
        if !self.is_current() {
            return self.fail(ctx, req, ErrorCode::Replaced, ErrorCode::Replaced.describe().to_owned());
        }
        match self.policy.handle_listen(port) {
            Ok(port) => {
                let local = self.local(ctx);
                self.node.router.add_listener(self.net(), SocketAddrV4::new(self.vip, port), local);
                self.send(ctx, RelayMessage::Listening { req, port });
            }
            Err(refusal) => self.refuse(ctx, req, format!("listen {}:{port}", self.vip), refusal),
        }
    }

    fn handle_unlisten(&mut self, port: u16) {
        if self.policy.handle_unlisten(port) {
            self.node.router.remove_listener(self.net(), SocketAddrV4::new(self.vip, port), self.id);
        }
    }

    fn handle_bind(&mut self, ctx: &mut Context<Self>, req: u64, port: u16) {
        if !self.is_current() {
            return self.fail(ctx, req, ErrorCode::Replaced, ErrorCode::Replaced.describe().to_owned());
        }
        match self.policy.handle_bind(port) {
            Ok(port) => {
                let binding = DatagramBinding { session: self.id, conn: self.conn.clone() };
                self.node.router.bind_datagram(self.net(), SocketAddrV4::new(self.vip, port), binding);
                self.send(ctx, RelayMessage::Bound { req, port });
            }
            Err(refusal) => self.refuse(ctx, req, format!("bind {}:{port}", self.vip), refusal),
        }
    }

    fn handle_unbind(&mut self, port: u16) {
        if self.policy.handle_unbind(port) {
            self.node.router.unbind_datagram(self.net(), SocketAddrV4::new(self.vip, port), self.id);
        }
    }

    fn handle_connect(&mut self, ctx: &mut Context<Self>, req: u64, to: SocketAddrV4) {
        if let Err(refusal) = self.policy.admit_connect() {
            return self.refuse(ctx, req, format!("connect {to}"), refusal);
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
        let socket = self.node.router.next_socket_id();
        let port = match self.policy.handle_connect(socket) {
            Ok(port) => port,
            Err(refusal) => return self.refuse(ctx, req, format!("connect {to}"), refusal),
        };
        let local = SocketAddrV4::new(self.vip, port);
        let connector = (PartyRef::Session(self.local(ctx)), local);
        let pair = SocketPairActor::new(socket, req, self.net(), connector, (listener, to), self.node.clone()).start();
        self.pairs.insert(socket, pair);
        self.grant_streams();
    }

    /// Lists the other members: the network's leases (instance, last seen) with whether
    /// each VIP is online anywhere in the cluster, plus online VIPs known only by route
    /// (members of other nodes, named as their routes name them).
    fn handle_peers(&mut self, ctx: &mut Context<Self>, req: u64) {
        let leases = self.node.allocator.send(ListLeases(self.network.name.clone()));
        let names = self.node.cluster_actor().map(|cluster| cluster.send(MemberNames(self.net())));
        let query = async move {
            let names = match names {
                Some(names) => names.await.unwrap_or_default(),
                None => HashMap::new(),
            };
            (leases.await, names)
        };
        ctx.spawn(query.into_actor(self).map(move |(leases, mut names), act, ctx| {
            let Ok(Ok(leases)) = leases else {
                return act.fail(ctx, req, ErrorCode::Internal, "relay database unavailable; try again".into());
            };
            let online: HashMap<Ipv4Addr, bool> = act.node.router.vips_in(act.net()).into_iter().collect();
            let mut peers: Vec<PeerInfo> = leases
                .into_iter()
                .filter(|l| l.vip != act.vip)
                .map(|l| PeerInfo {
                    vip: l.vip,
                    online: online.contains_key(&l.vip),
                    instance: Some(l.instance),
                    last_seen: Some(l.last_seen),
                })
                .collect();
            for (vip, _) in online {
                if vip != act.vip && !peers.iter().any(|p| p.vip == vip) {
                    peers.push(PeerInfo { vip, instance: names.remove(&vip), online: true, last_seen: None });
                }
            }
            peers.sort_by_key(|p| p.vip);
            act.send(ctx, RelayMessage::PeerList { req, peers });
        }));
    }

    fn with_socket(
        &mut self,
        ctx: &mut Context<Self>,
        socket: SocketId,
        f: impl FnOnce(&Addr<SocketPairActor>, SessionId),
    ) {
        match self.pairs.get(&socket) {
            Some(pair) => f(pair, self.id),
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
        if self.released || self.replaced {
            return; // the VIP is given back, or another session holds it; the client closes next
        }
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
                self.policy.handle_offer_answered(socket);
                self.with_socket(ctx, socket, |pair, session| pair.do_send(AnswerOffer { session, result: Ok(()) }))
            }
            ClientMessage::Deny { socket } => {
                self.policy.handle_offer_answered(socket);
                self.with_socket(ctx, socket, |pair, session| {
                    pair.do_send(AnswerOffer { session, result: Err(ErrorCode::Denied) })
                })
            }
            ClientMessage::Close { socket } => {
                self.with_socket(ctx, socket, |pair, session| pair.do_send(CloseSocket { session }))
            }
            ClientMessage::Ping { nonce } => self.send(ctx, RelayMessage::Pong { nonce }),
            ClientMessage::Peers { req } => self.handle_peers(ctx, req),
            ClientMessage::Release { req } => self.handle_release(ctx, req),
        }
    }

    /// `overlan leave`: the VIP stops routing here, the lease is deleted, the client is
    /// told and closes (or is closed after [`RELEASED_LINGER`]).
    fn handle_release(&mut self, ctx: &mut Context<Self>, req: u64) {
        if self.node.cluster.is_some() && !in_slot(self.network.subnet, self.node.router.slot(), self.vip) {
            return self.fail(
                ctx,
                req,
                ErrorCode::Unauthorized,
                format!(
                    "{} was given out by another node of the cluster, which keeps its lease: leave through that node (--relay HOST:PORT)",
                    self.vip
                ),
            );
        }
        self.released = true;
        self.network_addr.do_send(LeaveNetwork { vip: self.vip, session: self.id });
        self.unregister();
        let release = self.node.allocator.send(ReleaseLease { network: self.network.name.clone(), vip: self.vip });
        ctx.wait(release.into_actor(self).map(move |released, act, ctx| match released {
            // Released by the operator meanwhile: just as gone.
            Ok(Ok(_)) | Ok(Err(StoreError::NoSuchLease { .. })) => {
                tracing::info!(session = act.id, vip = %act.vip, network = %act.network.name, "lease released by its holder");
                act.send(ctx, RelayMessage::Released { req, vip: act.vip });
                act.end = (close_code::NORMAL, "lease released".into());
                ctx.run_later(RELEASED_LINGER, |_, ctx| ctx.stop());
            }
            _ => act.disconnect(ctx, close_code::INTERNAL, "relay database unavailable; leave again later".into()),
        }));
    }
}

/// How long a session whose VIP was given back waits for its client to close.
const RELEASED_LINGER: Duration = Duration::from_secs(5);

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
        let holder = Holder { identity: self.identity.to_string(), instance: self.instance.clone() };
        let join = JoinNetwork { vip: self.vip, session: self.local(ctx), holder, proof };
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
        if !self.released {
            self.node.allocator.do_send(LeaseSeen {
                network: self.network.id,
                identity: self.identity,
                instance: self.instance.clone(),
            });
        }
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
        self.conn.set_max_concurrent_bi_streams(VarInt::from_u32(INITIAL_STREAMS_PER_SESSION));
        self.send(ctx, welcome);
        if let Some(recv) = self.control_recv.take() {
            ctx.add_stream(throttled(recv, &self.node));
        }
        let sender =
            Sender { session: self.id, net: self.net(), vip: self.vip, subnet: self.network.subnet, tun: self.tun };
        if self.tun {
            let binding = DatagramBinding { session: self.id, conn: self.conn.clone() };
            self.node.router.add_tun(self.net(), self.vip, binding);
        }
        let path = DatagramPath::new(sender, &self.node.config.limits);
        tokio::spawn(run_session_io(self.conn.clone(), self.node.clone(), path, ctx.address()));
    }

    /// Releases everything the session registered and closes its connection.
    fn release_all(&mut self) {
        self.unregister();
        let (code, reason) = &self.end;
        self.conn.close(VarInt::from_u32(*code), reason.as_bytes());
        tracing::info!(session = self.id, vip = %self.vip, reason = %reason, "session closed");
    }

    /// Removes the session's listeners and bound ports and ends its sockets.
    fn unregister(&mut self) {
        let net = self.net();
        if self.tun {
            self.node.router.remove_tun(net, self.vip, self.id);
        }
        let (listeners, ports, _) = self.policy.drain();
        for port in listeners {
            self.node.router.remove_listener(net, SocketAddrV4::new(self.vip, port), self.id);
        }
        for port in ports {
            self.node.router.unbind_datagram(net, SocketAddrV4::new(self.vip, port), self.id);
        }
        for (_, pair) in self.pairs.drain() {
            pair.do_send(PartyGone { session: self.id });
        }
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
pub struct Replace {
    /// Why.
    pub why: ReplaceReason,
}

/// Why a session is ended for its VIP's sake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplaceReason {
    /// A newer session of this same client (identity and instance) holds it.
    Newer,
    /// Another client holds the VIP now (this session's lease was released, and the
    /// release missed this node).
    Taken,
    /// The lease this session held its VIP by (a client that roamed here) was released
    /// on the node that issued it.
    Released,
}

/// How long a replaced session's connection stays open after it was told, so the
/// goodbye reaches the client even if a packet is lost.
const REPLACED_GRACE: Duration = Duration::from_millis(500);

impl Handler<Replace> for SessionActor {
    type Result = ();
    fn handle(&mut self, msg: Replace, ctx: &mut Self::Context) {
        // The client is told on the control stream first, which QUIC delivers even when
        // the packet with the connection's close is lost (a client that missed the close
        // would time out and reconnect, taking the VIP back from the newer session). Its
        // listeners and ports go at once; the connection closes a moment later.
        let why = match msg.why {
            ReplaceReason::Taken => format!(
                "another member holds {} now: this instance's lease was released; join again for a new VIP",
                self.vip
            ),
            ReplaceReason::Released => format!(
                "the lease of {} was released (by the operator, or it expired); join again for a new VIP",
                self.vip
            ),
            ReplaceReason::Newer => ErrorCode::Replaced.describe().to_owned(),
        };
        if std::mem::replace(&mut self.replaced, true) {
            return;
        }
        self.send(ctx, RelayMessage::Goodbye { code: ErrorCode::Replaced, message: why.clone() });
        self.network_addr.do_send(LeaveNetwork { vip: self.vip, session: self.id });
        self.unregister();
        ctx.run_later(REPLACED_GRACE, move |act, ctx| act.disconnect(ctx, close_code::REPLACED, why));
    }
}

/// The operator removed the session's network: it ends for good.
#[derive(Message)]
#[rtype(result = "()")]
pub struct NetworkRemoved;

impl Handler<NetworkRemoved> for SessionActor {
    type Result = ();
    fn handle(&mut self, _: NetworkRemoved, ctx: &mut Self::Context) {
        let why = format!("network {} was removed by the relay operator", self.network.name);
        self.disconnect(ctx, close_code::UNAUTHORIZED, why);
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
        match self.policy.handle_offer(msg.socket, msg.local.port()) {
            Ok(()) => {}
            Err(Refusal::NotListening) => {
                msg.pair.do_send(AnswerOffer { session: self.id, result: Err(ErrorCode::Refused) });
                return;
            }
            Err(refusal) => {
                let reason = match refusal {
                    Refusal::PendingOfferLimit(_) => Reason::PendingOfferLimit,
                    _ => Reason::SocketLimit,
                };
                self.node.count(reason);
                msg.pair.do_send(AnswerOffer { session: self.id, result: Err(ErrorCode::LimitExceeded) });
                return;
            }
        }
        self.pairs.entry(msg.socket).or_insert(msg.pair);
        self.grant_streams();
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
        self.policy.handle_connect_answered(msg.socket);
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
    /// Lets the client open the QUIC streams its sockets need (the policy grows the
    /// limit as sockets approach it).
    fn grant_streams(&mut self) {
        if let Some(limit) = self.policy.poll_stream_limit() {
            self.conn.set_max_concurrent_bi_streams(VarInt::from_u32(limit));
        }
    }

    fn forget_socket(&mut self, socket: SocketId) {
        self.policy.handle_socket_ended(socket);
        self.pairs.remove(&socket);
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
        if self.policy.has_socket(msg.socket) {
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
    let limits = &node.config.limits;
    let bucket = TokenBucket::new(limits.control_rate, limits.control_burst, std::time::Instant::now());
    let bucket = Arc::new(std::sync::Mutex::new(bucket));
    let node = node.clone();
    recv.then(move |item| {
        let (bucket, node) = (bucket.clone(), node.clone());
        async move {
            let mut throttled = false;
            loop {
                let wait = {
                    let mut bucket = bucket.lock().unwrap_or_else(|e| e.into_inner());
                    let now = std::time::Instant::now();
                    if bucket.handle_take(now) {
                        break;
                    }
                    bucket.poll_wait(now)
                };
                if !std::mem::replace(&mut throttled, true) {
                    node.count(Reason::ControlThrottled);
                }
                tokio::time::sleep(wait).await;
            }
            item
        }
    })
}

/// The policy's caps from the relay's `[limits]`.
fn session_limits(limits: &crate::config::Limits) -> SessionLimits {
    SessionLimits {
        max_sockets: limits.max_sockets,
        max_pending_connects: limits.max_pending_connects,
        max_pending_offers: limits.max_pending_offers,
        max_listeners: limits.max_listeners,
        max_bound_ports: limits.max_bound_ports,
    }
}
