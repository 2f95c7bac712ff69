//! Peer links between the relay nodes of a cluster. `PeerLinkActor` is one link: it
//! owns the link's control stream (hello, route updates, connects and answers for
//! sockets that cross it), tells the cluster actor when the link comes and goes, and is
//! a party of every socket that crosses it. The link's data path runs in a task that
//! reads the link's datagrams (unicast and broadcast, forwarded by router lookup with no
//! mailbox in between) and hands each socket stream the peer opens to its pair.
//!
//! [`dial`] keeps a link to one `--peer` address up: connect, reconnect with backoff
//! and jitter. [`accept`] takes a link a peer dialed. Both check that the peer's
//! certificate chains to the cluster CA before anything else happens.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use overlan_shared::cluster::{verify_node, NodeInfo};
use overlan_shared::route::{LinkId, NetKey, RouteUpdate};
use overlan_shared::wire::control::SocketId;
use overlan_shared::wire::datagram::{DatagramHeader, IpPacket, HEADER_LEN, KIND_IP};
use overlan_shared::wire::frame::{FrameCodec, FrameError};
use overlan_shared::wire::peer::{Catalog, LinkHeader, PeerMessage, MAX_HOPS, PEER_PROTOCOL_VERSION};
use overlan_shared::wire::stream::{StreamHeader, HEADER_LEN as STREAM_HEADER_LEN};
use overlan_shared::wire::{close_code, reset_code, ErrorCode, MAX_DATAGRAM_PAYLOAD, RELAY_SERVER_NAME};
use quinn::VarInt;
use tokio::sync::oneshot;
use tokio_util::codec::FramedRead;

use crate::allocator::{GetCatalog, MergeCatalog};
use crate::cluster::{LinkDown, LinkUp, RoutesReceived};
use crate::control::ControlQueue;
use crate::counters::Reason;
use crate::node::Node;
use crate::pair::{AttachStream, HeldStream, PartyGone, PartyRef, PeerAnswer, SocketPairActor};
use crate::router::{PeerLink, Route, Router};

/// Largest control frame on a link (a full route table goes in pieces of
/// [`ROUTES_PER_FRAME`]).
const MAX_LINK_FRAME: usize = 16 << 20;
/// Most lease releases in one catalog frame (about 4 MiB; a catalog with more goes in
/// several frames, each merged as it comes).
const VOIDS_PER_FRAME: usize = 50_000;
/// Most entries (networks, invites, removals, releases) of a peer's catalogs held while an
/// earlier catalog is recorded.
const MAX_WAITING_ENTRIES: usize = 1 << 20;
/// How long a link waits before trying again a catalog the database did not take.
const MERGE_RETRY: Duration = Duration::from_secs(1);
/// Route updates per `Routes` frame.
const ROUTES_PER_FRAME: usize = 1000;
/// How long a new link has to exchange hellos.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a link of another process of a node has to answer a ping before a new
/// link from the node replaces it (the node restarted) instead of being refused (the
/// node's credentials run twice).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// A link that carries nothing for this long is dead (keep-alives go out every second),
/// so routes behind a dead node are withdrawn within a few seconds.
pub const LINK_IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// Keep-alive interval of links.
const LINK_KEEP_ALIVE: Duration = Duration::from_secs(1);
/// Concurrent socket streams a link allows each way.
const LINK_STREAMS: u32 = 100_000;
/// How far ahead of this node's clock a broadcast may be numbered (origins number from
/// their clock in microseconds; clocks of nodes differ a little). A number beyond it
/// would make every later broadcast of that origin look old.
const MAX_BROADCAST_AHEAD_US: u64 = 60_000_000;
/// A connect whose source has no route on the link yet waits this long, step by step,
/// for the route (a connect right after the client joined can overtake its route).
const SOURCE_WAIT_STEP: Duration = Duration::from_millis(50);
const SOURCE_WAIT_STEPS: u32 = 40;
/// Route frames of a link the cluster actor may have queued before the link stops
/// reading its control stream until it catches up.
const MAX_ROUTE_FRAMES_IN_FLIGHT: usize = 64;
/// Flow-control window of a whole link.
const LINK_RECEIVE_WINDOW: u32 = 256 << 20;
/// First reconnect delay; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// Longest reconnect delay.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A link that stayed up this long resets the backoff.
const STABLE_LINK: Duration = Duration::from_secs(10);

type LinkCodec = FrameCodec<PeerMessage, PeerMessage>;

/// QUIC transport settings of a link as the dialing node runs it: large windows and many
/// streams (every socket between the nodes is a stream), keep-alives every second, and
/// path-MTU discovery up to [`overlan_shared::udp::MTU_BOUND`] whatever the path (links
/// are few: the probes' memory is nothing, and jumbo-frame links between nodes in one
/// data centre, or nodes on one host, get 6,550-byte packets). The accepting node runs
/// the endpoint's settings for new connections (it learns that a connection is a link
/// only after the handshake): it raises the windows and stream limit then, and its
/// discovery bound is the one for the dialer's address.
pub fn link_transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(LINK_IDLE_TIMEOUT.try_into().expect("a small timeout fits")))
        .keep_alive_interval(Some(LINK_KEEP_ALIVE))
        .max_concurrent_bidi_streams(VarInt::from_u32(LINK_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(Some(8 << 20))
        .datagram_send_buffer_size(8 << 20)
        .mtu_discovery_config(Some(crate::relay::mtu_discovery(overlan_shared::udp::MTU_BOUND)))
        .stream_receive_window(VarInt::from_u32(crate::relay::STREAM_WINDOW))
        .receive_window(VarInt::from_u32(LINK_RECEIVE_WINDOW))
        .send_window(u64::from(LINK_RECEIVE_WINDOW))
        .ack_frequency_config(Some(crate::relay::ack_frequency()));
    transport
}

/// A peer's `Connect`.
#[derive(Clone, Copy)]
struct PeerConnect {
    socket: SocketId,
    net: NetKey,
    from: SocketAddrV4,
    to: SocketAddrV4,
    hops: u8,
}

/// One link to a peer node.
pub struct PeerLinkActor {
    id: LinkId,
    peer: NodeInfo,
    /// The peer process's number from its hello.
    incarnation: u64,
    /// The claim on the peer's name until the link is in the router.
    claim: Option<LinkClaim>,
    /// Pings sent for [`Probe`]s, by nonce, with whom to tell of the pong.
    probes: Vec<(u64, oneshot::Sender<()>)>,
    conn: quinn::Connection,
    node: Arc<Node>,
    control: ControlQueue,
    codec: LinkCodec,
    control_recv: Option<FramedRead<quinn::RecvStream, LinkCodec>>,
    /// Sockets with a party on this link: this node's socket id → its pair.
    pairs: HashMap<SocketId, Addr<SocketPairActor>>,
    /// The peer's socket ids → this node's.
    remote: HashMap<SocketId, SocketId>,
    /// This node's socket ids → the peer's (the reverse of `remote`).
    local: HashMap<SocketId, SocketId>,
    /// The peer's connects waiting for their source's route.
    waiting: HashSet<SocketId>,
    /// Route frames handed to the cluster actor and not yet taken in.
    routes_in_flight: usize,
    /// Whether the allocator is merging a catalog of the peer's, and the latest one
    /// that came meanwhile.
    catalog_merging: bool,
    catalog_next: Option<Catalog>,
    /// Told when the link ends (the dialer then reconnects).
    ended: Option<oneshot::Sender<()>>,
    /// This link as a party of sockets.
    me: Option<PeerLink>,
}

impl PeerLinkActor {
    fn link(&self) -> PeerLink {
        self.me.clone().expect("set when the actor starts")
    }

    fn send(&mut self, ctx: &mut Context<Self>, msg: &PeerMessage) {
        let mut buf = BytesMut::new();
        if let Err(e) = self.codec.encode_into(msg, &mut buf) {
            tracing::error!(error = %e, "dropping an unencodable peer message");
            return;
        }
        if self.control.push(buf.freeze()).is_err() {
            tracing::warn!(peer = %self.peer.name, "peer link control queue full or closed; dropping the link");
            ctx.stop();
        }
    }

    /// Sends `catalog`, its releases in frames of at most [`VOIDS_PER_FRAME`].
    fn send_catalog(&mut self, ctx: &mut Context<Self>, catalog: Catalog) {
        for frame in catalog_frames(catalog, VOIDS_PER_FRAME) {
            self.send(ctx, &PeerMessage::Catalog(frame));
        }
    }

    fn answer_err(&mut self, ctx: &mut Context<Self>, to: SocketId, code: ErrorCode, message: String) {
        self.send(ctx, &PeerMessage::Answer { socket: 0, to, result: Err((code, message)) });
    }

    /// A client behind the peer connects: a pair here joins the link (as the connecting
    /// side) to what the route lookup finds. `waited`: steps waited so far for the
    /// source's route.
    fn handle_connect(&mut self, ctx: &mut Context<Self>, connect: PeerConnect, waited: u32) {
        let PeerConnect { socket, net, from, to, hops } = connect;
        let router = &self.node.router;
        // A peer speaks only for clients whose routes it announced.
        if matches!(router.route(net, *from.ip()), Some(Route::Local(_))) {
            self.node.count(Reason::PeerForgedSource);
            tracing::warn!(peer = %self.peer.name, %from, "connect from a source that is a client of this node; refused");
            return self.answer_err(ctx, socket, ErrorCode::Unreachable, format!("connect {to}: unreachable"));
        }
        if router.source_origin(net, *from.ip(), self.id).is_none() {
            if waited < SOURCE_WAIT_STEPS {
                // Its route may be on its way (a connect right after a join overtakes it).
                self.waiting.insert(socket);
                ctx.run_later(SOURCE_WAIT_STEP, move |act, ctx| {
                    if act.waiting.remove(&socket) {
                        act.handle_connect(ctx, connect, waited + 1);
                    }
                });
                return;
            }
            self.node.count(Reason::PeerForgedSource);
            tracing::warn!(peer = %self.peer.name, %from, "connect from a source this peer announced no route for; refused");
            return self.answer_err(ctx, socket, ErrorCode::Unreachable, format!("connect {to}: unreachable"));
        }
        let listener = match router.route(net, *to.ip()) {
            None => {
                let why = format!("connect {to}: unreachable (no session has that VIP)");
                return self.answer_err(ctx, socket, ErrorCode::Unreachable, why);
            }
            Some(Route::Local(_)) => match router.listener(net, to) {
                Some(listener) => PartyRef::Session(listener),
                None => {
                    let why = format!("connect {to}: refused (nothing listening)");
                    return self.answer_err(ctx, socket, ErrorCode::Refused, why);
                }
            },
            Some(Route::Peer(next)) if next.id == self.id || *next.node == *self.peer.name || hops <= 1 => {
                let why = format!("connect {to}: unreachable (routes are changing)");
                return self.answer_err(ctx, socket, ErrorCode::Unreachable, why);
            }
            Some(Route::Peer(next)) => PartyRef::Link { link: next, remote: None },
        };
        let local = router.next_socket_id();
        let connector = (PartyRef::Link { link: self.link(), remote: Some(socket) }, from);
        // Registered here at once (the pair registers too), so a `Closed` or the stream
        // that follows finds it even before the pair has started.
        let pair = SocketPairActor::new(local, 0, net, connector, (listener, to), self.node.clone())
            .with_hops(hops.saturating_sub(1))
            .start();
        self.pairs.insert(local, pair);
        self.map(socket, local);
    }

    fn merge_catalog(&mut self, ctx: &mut Context<Self>, catalog: Catalog) {
        self.catalog_merging = true;
        let merged = self.node.allocator.send(MergeCatalog(catalog)).into_actor(self).map(|merged, act, ctx| {
            if let Ok(Err(failed)) = merged {
                // Not recorded: it goes first, with what came meanwhile, after a pause.
                let after = act.catalog_next.take();
                act.catalog_next = Some(failed);
                if let Some(after) = after {
                    act.wait_catalog(ctx, after);
                }
                ctx.run_later(MERGE_RETRY, |act, ctx| act.merge_next(ctx));
                return;
            }
            act.merge_next(ctx);
        });
        ctx.spawn(merged);
    }

    /// Merges what waits, if anything.
    fn merge_next(&mut self, ctx: &mut Context<Self>) {
        self.catalog_merging = false;
        if let Some(next) = self.catalog_next.take() {
            self.merge_catalog(ctx, next);
        }
    }

    /// Keeps `catalog` to merge after the one being merged. Past [`MAX_WAITING_ENTRIES`]
    /// the link is dropped: when it comes back, the peer sends everything again.
    fn wait_catalog(&mut self, ctx: &mut Context<Self>, catalog: Catalog) {
        match queue_catalog(self.catalog_next.take(), catalog, MAX_WAITING_ENTRIES) {
            Ok(next) => self.catalog_next = Some(next),
            Err(()) => {
                tracing::warn!(peer = %self.peer.name, "the peer's catalogs outpace this node's database; dropping the link to start over");
                ctx.stop();
            }
        }
    }

    /// Records that the peer's socket `remote` is this node's `local`.
    fn map(&mut self, remote: SocketId, local: SocketId) {
        self.remote.insert(remote, local);
        self.local.insert(local, remote);
    }

    fn handle_message(&mut self, ctx: &mut Context<Self>, msg: PeerMessage) {
        match msg {
            PeerMessage::Hello { .. } | PeerMessage::Refused { .. } => {
                tracing::warn!(peer = %self.peer.name, "protocol violation on a peer link: a hello or refusal on a link up");
                ctx.stop();
            }
            // A peer that floods its control stream is slowed to what this node can
            // check: past a number of frames not yet taken in, the next one is read only
            // once the cluster actor has caught up. Nothing queues without bound.
            PeerMessage::Routes { updates } => {
                if let Some(cluster) = self.node.cluster_actor() {
                    self.routes_in_flight += 1;
                    let taken = cluster.send(RoutesReceived { link: self.id, updates });
                    let taken = taken.into_actor(self).map(|_, act, _| act.routes_in_flight -= 1);
                    if self.routes_in_flight > MAX_ROUTE_FRAMES_IN_FLIGHT {
                        ctx.wait(taken);
                    } else {
                        ctx.spawn(taken);
                    }
                }
            }
            PeerMessage::Connect { socket, net, from, to, hops } => {
                self.handle_connect(ctx, PeerConnect { socket, net, from, to, hops }, 0)
            }
            PeerMessage::Answer { socket, to, result } => {
                if let Some(pair) = self.pairs.get(&to).cloned() {
                    if result.is_ok() {
                        self.map(socket, to);
                    }
                    pair.do_send(PeerAnswer { session: self.id, remote: socket, result });
                }
            }
            PeerMessage::Closed { socket, .. } => {
                self.waiting.remove(&socket);
                if let Some(pair) = self.remote.get(&socket).and_then(|local| self.pairs.get(local)) {
                    pair.do_send(PartyGone { session: self.id });
                }
            }
            // Releases come only when new (all of them when the link comes up), and a
            // large catalog in several frames. While one catalog is being merged, what
            // came meanwhile waits as one (the allocator's queue holds one per link, and
            // reading the link never waits for its disk).
            PeerMessage::Catalog(catalog) => {
                if self.catalog_merging {
                    self.wait_catalog(ctx, catalog);
                } else {
                    self.merge_catalog(ctx, catalog);
                }
            }
            PeerMessage::Ping { nonce } => self.send(ctx, &PeerMessage::Pong { nonce }),
            PeerMessage::Pong { nonce } => {
                if let Some(at) = self.probes.iter().position(|(n, _)| *n == nonce) {
                    let _ = self.probes.swap_remove(at).1.send(());
                }
            }
        }
    }
}

impl Actor for PeerLinkActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let link = PeerLink {
            id: self.id,
            session: self.id,
            node: self.peer.name.as_str().into(),
            addr: ctx.address(),
            conn: self.conn.clone(),
            incarnation: self.incarnation,
        };
        self.me = Some(link.clone());
        self.node.router.add_link(link);
        self.claim = None;
        tracing::info!(peer = %self.peer.name, slot = self.peer.slot, addr = %self.conn.remote_address(), link = self.id, "peer link up");
        if let Some(cluster) = self.node.cluster_actor() {
            cluster.do_send(LinkUp {
                link: self.id,
                peer: self.peer.name.clone(),
                slot: self.peer.slot,
                addr: ctx.address(),
            });
        }
        if let Some(recv) = self.control_recv.take() {
            ctx.add_stream(recv);
        }
        // The peer gets this node's networks and invites at once, then changes as they
        // happen.
        let catalog = self.node.allocator.send(GetCatalog).into_actor(self).map(|got, act, ctx| match got {
            Ok(Ok(catalog)) => act.send_catalog(ctx, catalog),
            _ => tracing::warn!(peer = %act.peer.name, "cannot read the catalog for a new link"),
        });
        ctx.spawn(catalog);
        tokio::spawn(run_link_io(self.conn.clone(), self.node.clone(), self.id, ctx.address()));
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.node.router.remove_link(self.id);
        if let Some(cluster) = self.node.cluster_actor() {
            cluster.do_send(LinkDown { link: self.id });
        }
        for pair in self.pairs.values() {
            pair.do_send(PartyGone { session: self.id });
        }
        self.conn.close(VarInt::from_u32(close_code::NORMAL), b"link closed");
        let path = self.conn.stats().path;
        tracing::info!(peer = %self.peer.name, link = self.id, mtu = path.current_mtu, rtt = ?path.rtt, "peer link down");
        if let Some(ended) = self.ended.take() {
            let _ = ended.send(());
        }
    }
}

impl StreamHandler<Result<PeerMessage, FrameError>> for PeerLinkActor {
    fn handle(&mut self, item: Result<PeerMessage, FrameError>, ctx: &mut Self::Context) {
        match item {
            Ok(msg) => self.handle_message(ctx, msg),
            Err(FrameError::Io(_)) => ctx.stop(),
            Err(e) => {
                tracing::warn!(peer = %self.peer.name, error = %e, "protocol violation on a peer link; dropping it");
                ctx.stop();
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

/// Whether the peer answers: a ping goes out, the sender is told when its pong comes.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Probe(pub oneshot::Sender<()>);

impl Handler<Probe> for PeerLinkActor {
    type Result = ();
    fn handle(&mut self, msg: Probe, ctx: &mut Self::Context) {
        let nonce = random_u64();
        // Probes whose asker gave up are dropped first: the list stays small.
        self.probes.retain(|(_, asker)| !asker.is_closed());
        self.probes.push((nonce, msg.0));
        self.send(ctx, &PeerMessage::Ping { nonce });
    }
}

/// This node's networks and invites changed: tell the peer.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SendCatalog(pub Catalog);

impl Handler<SendCatalog> for PeerLinkActor {
    type Result = ();
    fn handle(&mut self, msg: SendCatalog, ctx: &mut Self::Context) {
        self.send_catalog(ctx, msg.0);
    }
}

/// Route updates for the peer.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SendRoutes {
    /// The updates, in order.
    pub updates: Vec<RouteUpdate>,
}

impl Handler<SendRoutes> for PeerLinkActor {
    type Result = ();
    fn handle(&mut self, msg: SendRoutes, ctx: &mut Self::Context) {
        for chunk in msg.updates.chunks(ROUTES_PER_FRAME) {
            self.send(ctx, &PeerMessage::Routes { updates: chunk.to_vec() });
        }
    }
}

/// A pair here has a party on this link.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RegisterSocket {
    /// This node's socket.
    pub socket: SocketId,
    /// The peer's socket, if known.
    pub remote: Option<SocketId>,
    /// The pair.
    pub pair: Addr<SocketPairActor>,
}

impl Handler<RegisterSocket> for PeerLinkActor {
    type Result = ();
    fn handle(&mut self, msg: RegisterSocket, _ctx: &mut Self::Context) {
        self.pairs.insert(msg.socket, msg.pair);
        if let Some(remote) = msg.remote {
            self.map(remote, msg.socket);
        }
    }
}

/// A client here connects across this link.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SendConnect {
    /// This node's socket.
    pub socket: SocketId,
    /// Network.
    pub net: NetKey,
    /// The connecting client.
    pub from: SocketAddrV4,
    /// The address connected to.
    pub to: SocketAddrV4,
    /// Nodes it may still cross.
    pub hops: u8,
}

impl Handler<SendConnect> for PeerLinkActor {
    type Result = ();
    fn handle(&mut self, msg: SendConnect, ctx: &mut Self::Context) {
        let connect =
            PeerMessage::Connect { socket: msg.socket, net: msg.net, from: msg.from, to: msg.to, hops: msg.hops };
        self.send(ctx, &connect);
    }
}

/// This node's answer to the peer's connect.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SendAnswer {
    /// This node's socket.
    pub socket: SocketId,
    /// The peer's socket it answers.
    pub to: SocketId,
    /// Accepted, or why not.
    pub result: Result<(), (ErrorCode, String)>,
}

impl Handler<SendAnswer> for PeerLinkActor {
    type Result = ();
    fn handle(&mut self, msg: SendAnswer, ctx: &mut Self::Context) {
        self.send(ctx, &PeerMessage::Answer { socket: msg.socket, to: msg.to, result: msg.result });
    }
}

/// A pair with a party on this link ended; `notify`: it ended abnormally, tell the peer.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ForgetSocket {
    /// This node's socket.
    pub socket: SocketId,
    /// Why, if the peer must be told.
    pub notify: Option<ErrorCode>,
}

impl Handler<ForgetSocket> for PeerLinkActor {
    type Result = ();
    fn handle(&mut self, msg: ForgetSocket, ctx: &mut Self::Context) {
        if self.pairs.remove(&msg.socket).is_none() {
            return;
        }
        if let Some(remote) = self.local.remove(&msg.socket) {
            self.remote.remove(&remote);
        }
        if let Some(code) = msg.notify {
            self.send(ctx, &PeerMessage::Closed { socket: msg.socket, code });
        }
    }
}

/// The peer opened a socket stream naming its socket `remote`.
#[derive(Message)]
#[rtype(result = "()")]
struct LinkStream {
    remote: SocketId,
    stream: HeldStream,
}

impl Handler<LinkStream> for PeerLinkActor {
    type Result = ();
    fn handle(&mut self, msg: LinkStream, _ctx: &mut Self::Context) {
        match self.remote.get(&msg.remote).and_then(|local| self.pairs.get(local)) {
            Some(pair) => pair.do_send(AttachStream { session: self.id, session_addr: None, stream: msg.stream }),
            None => msg.stream.reset(reset_code::UNKNOWN_SOCKET),
        }
    }
}

/// The link's connection ended.
#[derive(Message)]
#[rtype(result = "()")]
struct LinkLost(quinn::ConnectionError);

impl Handler<LinkLost> for PeerLinkActor {
    type Result = ();
    fn handle(&mut self, msg: LinkLost, ctx: &mut Self::Context) {
        tracing::info!(peer = %self.peer.name, reason = %msg.0, "peer link lost");
        ctx.stop();
    }
}

/// The link's data path: datagrams forwarded by lookup, socket streams handed to pairs.
async fn run_link_io(conn: quinn::Connection, node: Arc<Node>, link: LinkId, addr: Addr<PeerLinkActor>) {
    let reason = loop {
        tokio::select! {
            datagram = conn.read_datagram() => match datagram {
                Ok(datagram) => forward_link_datagram(&node, link, datagram),
                Err(e) => break e,
            },
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => { tokio::spawn(read_stream_header(send, recv, addr.clone())); }
                Err(e) => break e,
            },
        }
    };
    addr.do_send(LinkLost(reason));
}

async fn read_stream_header(send: quinn::SendStream, mut recv: quinn::RecvStream, addr: Addr<PeerLinkActor>) {
    let mut raw = [0u8; STREAM_HEADER_LEN];
    let header = tokio::time::timeout(HELLO_TIMEOUT, recv.read_exact(&mut raw)).await;
    let stream = HeldStream::new(send, recv);
    match header.ok().and_then(|r| r.ok()).and_then(|()| StreamHeader::parse(&raw).ok()) {
        Some(header) => addr.do_send(LinkStream { remote: header.socket, stream }),
        None => stream.reset(reset_code::BAD_HEADER),
    }
}

/// A link datagram: `header` then the client datagram.
pub fn link_datagram(header: LinkHeader, inner: &[u8]) -> Bytes {
    let head = header.to_bytes();
    let mut out = BytesMut::with_capacity(head.len() + inner.len());
    out.extend_from_slice(&head);
    out.extend_from_slice(inner);
    out.freeze()
}

/// Sends a client's broadcast (already delivered here) on every link, numbered as one
/// that enters the cluster at this node.
pub fn flood_broadcast(router: &Router, net: NetKey, datagram: &[u8]) {
    let mut out = None;
    router.for_each_link(None, |conn| {
        let out = out.get_or_insert_with(|| {
            let header =
                LinkHeader::Broadcast { hops: MAX_HOPS, net, origin: router.slot(), seq: router.next_broadcast_seq() };
            link_datagram(header, datagram)
        });
        let _ = conn.send_datagram(out.clone());
    });
}

/// Forwards one datagram that came over `link`: to a local session, on toward another
/// node, or (a broadcast seen here for the first time) to every local member and every
/// other link. The source the origin node stamped must be a VIP whose route from its
/// origin was announced on this link, and a broadcast must be numbered by that origin
/// (a peer can neither forge another node's clients nor spoil its broadcast numbers).
fn forward_link_datagram(node: &Node, link: LinkId, datagram: Bytes) {
    let drop = |why: &str| {
        node.count(Reason::LinkDatagramDropped);
        tracing::debug!(link, why, "dropping a link datagram");
    };
    let Ok(header) = LinkHeader::parse(&datagram) else { return drop("malformed link header") };
    let inner = datagram.slice(header.len()..);
    if inner.first() == Some(&KIND_IP) {
        return forward_link_packet(node, link, header, inner);
    }
    let Ok(client) = DatagramHeader::parse(&inner) else { return drop("malformed datagram header") };
    if inner.len() - HEADER_LEN > MAX_DATAGRAM_PAYLOAD {
        return drop("payload too large");
    }
    let router = &node.router;
    let net = match header {
        LinkHeader::Unicast { net, .. } | LinkHeader::Broadcast { net, .. } => net,
    };
    let Some(source_node) = router.source_origin(net, *client.src.ip(), link) else {
        // In a mesh, a broadcast also comes round by other paths than its origin's
        // link: such a copy is a duplicate, not a forgery, and is not counted.
        if let LinkHeader::Broadcast { origin, .. } = header {
            if router.remote_origin(net, *client.src.ip()) == Some(origin) {
                return tracing::trace!(link, "a broadcast's copy by another path");
            }
        }
        return drop("source not announced on this link");
    };
    match header {
        LinkHeader::Unicast { .. } => {
            if let Some(conn) = router.datagram_target(net, client.dst) {
                let _ = conn.send_datagram(inner);
                return;
            }
            if let (Some(Route::Peer(next)), Some(header)) = (router.route(net, *client.dst.ip()), header.next_hop()) {
                if next.id != link {
                    let _ = next.conn.send_datagram(link_datagram(header, &inner));
                }
            }
        }
        LinkHeader::Broadcast { origin, seq, .. } => {
            if origin != source_node {
                return drop("broadcast numbered by another node than its source's");
            }
            let now_us =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
            if seq > now_us.saturating_add(MAX_BROADCAST_AHEAD_US) {
                return drop("broadcast numbered in the future");
            }
            if origin == router.slot() || !node.first_sight(origin, seq) {
                return;
            }
            router.for_each_broadcast_member(net, client.dst.port(), *client.src.ip(), |conn| {
                let _ = conn.send_datagram(inner.clone());
            });
            if let Some(header) = header.next_hop() {
                let out = link_datagram(header, &inner);
                router.for_each_link(Some(link), |conn| {
                    let _ = conn.send_datagram(out.clone());
                });
            }
        }
    }
}

/// Forwards an IPv4 packet of a TUN session that came over `link`: to the TUN session
/// holding its destination here, or on toward the next node. Its source must be a VIP
/// whose route was announced on this link.
fn forward_link_packet(node: &Node, link: LinkId, header: LinkHeader, inner: Bytes) {
    let drop = |why: &str| {
        node.count(Reason::LinkDatagramDropped);
        tracing::debug!(link, why, "dropping a link packet");
    };
    let Ok(packet) = IpPacket::parse(&inner) else { return drop("malformed IP packet") };
    let LinkHeader::Unicast { net, .. } = header else { return drop("an IP packet broadcast") };
    let router = &node.router;
    if router.source_origin(net, packet.src, link).is_none() {
        return drop("source not announced on this link");
    }
    if let Some(conn) = router.tun_target(net, packet.dst) {
        let _ = conn.send_datagram(inner);
        return;
    }
    if let (Some(Route::Peer(next)), Some(header)) = (router.route(net, packet.dst), header.next_hop()) {
        if next.id != link {
            let _ = next.conn.send_datagram(link_datagram(header, &inner));
        }
    }
}

/// The peer's certificate chain, verified against the cluster CA.
fn verified_peer(conn: &quinn::Connection, node: &Node) -> Result<NodeInfo, String> {
    let cluster = node.cluster.as_ref().ok_or("this relay is not a cluster node")?;
    let certs = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>().ok())
        .ok_or("no certificate")?;
    let info = verify_node(&certs, &cluster.credentials.ca).map_err(|e| e.to_string())?;
    if info.name == cluster.credentials.name {
        return Err(format!("it presents this node's own name {} (a --peer naming this node?)", info.name));
    }
    if info.slot == node.router.slot() {
        return Err(format!(
            "{} holds this node's slot {} (its certificate was issued in another cluster directory, or twice)",
            info.name, info.slot
        ));
    }
    Ok(info)
}

/// How long a link whose control stream ended before the peer's hello waits for the
/// peer's close, which says why it refused.
const REFUSAL_WAIT: Duration = Duration::from_millis(500);

/// A new link's control stream, the peer process's number from its hello, and its claim
/// on the peer's name until the link is up.
type Hello = (quinn::SendStream, FramedRead<quinn::RecvStream, LinkCodec>, u64, LinkClaim);

/// Exchanges hellos on a new link's control stream. The dialer opens the stream and
/// speaks first; the accepting node answers only once it takes the link (see
/// [`one_process`]), so a dialer it refuses never sees the link up.
async fn hello(conn: &quinn::Connection, node: &Node, peer: &NodeInfo, dialer: bool) -> Result<Hello, String> {
    let Some(cluster) = node.cluster.as_ref() else { return Err("not a cluster node".into()) };
    let exchange = async {
        let (mut send, recv) = if dialer { conn.open_bi().await } else { conn.accept_bi().await }
            .map_err(|e| format!("control stream: {e}"))?;
        let codec = LinkCodec::new(MAX_LINK_FRAME);
        let mut buf = BytesMut::new();
        let hello = PeerMessage::Hello {
            protocol: PEER_PROTOCOL_VERSION,
            node: cluster.credentials.name.clone(),
            incarnation: cluster.incarnation,
        };
        codec.encode_into(&hello, &mut buf).map_err(|e| e.to_string())?;
        if dialer {
            send.write_all(&buf).await.map_err(|e| format!("sending hello: {e}"))?;
        }
        let mut framed = FramedRead::new(recv, LinkCodec::new(MAX_LINK_FRAME));
        let incarnation = match framed.next().await {
            Some(Ok(PeerMessage::Hello { protocol, node, incarnation })) => {
                if protocol != PEER_PROTOCOL_VERSION {
                    return Err(format!("peer protocol {protocol}, this node speaks {PEER_PROTOCOL_VERSION}"));
                }
                if node != peer.name {
                    return Err(format!("hello names node {node} but the certificate is {}'s", peer.name));
                }
                incarnation
            }
            Some(Ok(PeerMessage::Refused { why })) => return Err(format!("the peer refused the link: {why}")),
            Some(Ok(other)) => return Err(format!("expected hello, got {other:?}")),
            // Refused: the peer said why in its close, which may come a moment after
            // the stream's end.
            ended => {
                let _ = tokio::time::timeout(REFUSAL_WAIT, conn.closed()).await;
                return Err(match ended {
                    _ if conn.close_reason().is_some() => refusal(conn),
                    Some(Err(e)) => e.to_string(),
                    _ => "control stream closed before hello".to_owned(),
                });
            }
        };
        let claim = match one_process(node, &peer.name, incarnation).await {
            Ok(claim) => claim,
            Err(why) => {
                if !dialer {
                    // Said on the stream (delivered even if the close's packet is lost),
                    // and a moment given for it before the caller closes.
                    let mut refused = BytesMut::new();
                    if codec.encode_into(&PeerMessage::Refused { why: why.clone() }, &mut refused).is_ok() {
                        let _ = send.write_all(&refused).await;
                        let _ = send.finish();
                        let _ = tokio::time::timeout(REFUSAL_WAIT, send.stopped()).await;
                    }
                }
                return Err(why);
            }
        };
        if !dialer {
            send.write_all(&buf).await.map_err(|e| format!("sending hello: {e}"))?;
        }
        Ok((send, framed, incarnation, claim))
    };
    tokio::time::timeout(HELLO_TIMEOUT, exchange).await.map_err(|_| "no hello in time".to_owned())?
}

/// Why the peer closed a new link.
fn refusal(conn: &quinn::Connection) -> String {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(close)) => {
            format!("the peer refused the link: {}", String::from_utf8_lossy(&close.reason))
        }
        Some(e) => format!("link closed during the hello: {e}"),
        None => "control stream closed before hello".to_owned(),
    }
}

/// The peer processes whose links are being set up, by node name and process: a claim
/// lasts from a hello's check ([`one_process`]) until the link is in the router, so two
/// processes of one node that say hello at the same moment cannot both pass the check.
#[derive(Default)]
pub struct LinkClaims(Arc<std::sync::Mutex<HashMap<String, (u64, usize)>>>);

impl LinkClaims {
    /// Claims `name` for its process `incarnation`; refused while another process of
    /// it holds a claim.
    fn claim(&self, name: &str, incarnation: u64) -> Result<LinkClaim, ()> {
        let mut claims = self.0.lock().expect("link claims lock");
        let entry = claims.entry(name.to_owned()).or_insert((incarnation, 0));
        if entry.0 != incarnation {
            return Err(());
        }
        entry.1 += 1;
        Ok(LinkClaim { claims: self.0.clone(), name: name.to_owned() })
    }

    /// Whether a link is being set up.
    pub fn any(&self) -> bool {
        !self.0.lock().expect("link claims lock").is_empty()
    }
}

/// One link's claim on its peer's name; given up when dropped.
pub struct LinkClaim {
    claims: Arc<std::sync::Mutex<HashMap<String, (u64, usize)>>>,
    name: String,
}

impl Drop for LinkClaim {
    fn drop(&mut self) {
        let mut claims = self.claims.lock().expect("link claims lock");
        if let Some(entry) = claims.get_mut(&self.name) {
            entry.1 -= 1;
            if entry.1 == 0 {
                claims.remove(&self.name);
            }
        }
    }
}

/// Whether a link from `name`'s process `incarnation` may be taken. A node's links all
/// come from one process: while a link from another process of `name` answers pings,
/// or is being set up, the new one is refused (the node's credentials run twice, which
/// would mix two nodes' routes under one name); a link of an earlier process that is
/// silent (the node restarted, and its old link has not timed out yet) is closed. The
/// claim returned lasts until the link is up.
async fn one_process(node: &Node, name: &str, incarnation: u64) -> Result<LinkClaim, String> {
    let twice = |from: String| {
        format!(
            "node {name} is linked already from {from} by another process: do two relays run with {name}'s credentials? Issue each node its own (`overlan-server ca issue NODE`)"
        )
    };
    let claim = node.link_claims.claim(name, incarnation).map_err(|()| twice("elsewhere at this moment".into()))?;
    let others: Vec<PeerLink> =
        node.router.links().into_iter().filter(|l| *l.node == *name && l.incarnation != incarnation).collect();
    // All at once: a hello waits one probe's time at most.
    let probes = others.iter().map(|other| async move {
        let (tx, rx) = oneshot::channel();
        other.addr.send(Probe(tx)).await.is_ok()
            && tokio::time::timeout(PROBE_TIMEOUT, rx).await.is_ok_and(|pong| pong.is_ok())
    });
    let answers = futures_util::future::join_all(probes).await;
    for (other, answered) in others.iter().zip(answers) {
        if answered {
            return Err(twice(other.conn.remote_address().to_string()));
        }
        tracing::info!(peer = %name, addr = %other.conn.remote_address(), link = other.id, "closing the silent link of an earlier process of this peer (it restarted)");
        other.conn.close(VarInt::from_u32(close_code::NORMAL), b"the node linked again from a new process");
    }
    Ok(claim)
}

fn start_link(
    conn: quinn::Connection,
    node: Arc<Node>,
    peer: NodeInfo,
    (send, recv, incarnation, claim): Hello,
    ended: Option<oneshot::Sender<()>>,
) {
    let id = node.router.next_session_id();
    let actor = PeerLinkActor {
        id,
        peer,
        incarnation,
        claim: Some(claim),
        probes: Vec::new(),
        conn,
        codec: LinkCodec::new(MAX_LINK_FRAME),
        control: ControlQueue::start(send),
        control_recv: Some(recv),
        node,
        pairs: HashMap::new(),
        remote: HashMap::new(),
        local: HashMap::new(),
        waiting: HashSet::new(),
        routes_in_flight: 0,
        catalog_merging: false,
        catalog_next: None,
        ended,
        me: None,
    };
    actor.start();
}

/// Takes a link a peer dialed (a connection that chose the peer ALPN). Run on the
/// relay's arbiter.
pub async fn accept(conn: quinn::Connection, node: Arc<Node>) {
    let peer = match verified_peer(&conn, &node) {
        Ok(peer) => peer,
        Err(why) => {
            node.count(Reason::PeerRefused);
            let addr = conn.remote_address();
            if node.warn_once(format!("{} {why}", addr.ip())) {
                tracing::warn!(%addr, %why, "refusing peer link");
            } else {
                tracing::debug!(%addr, %why, "refusing peer link");
            }
            conn.close(VarInt::from_u32(close_code::UNAUTHORIZED), b"not a node of this cluster");
            return;
        }
    };
    // Authenticated: the tiny windows of the handshake grow to a link's.
    conn.set_receive_window(VarInt::from_u32(LINK_RECEIVE_WINDOW));
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(LINK_STREAMS));
    match hello(&conn, &node, &peer, false).await {
        Ok(control) => start_link(conn, node, peer, control, None),
        Err(why) => {
            node.count(Reason::PeerRefused);
            if node.warn_once(format!("{} {why}", peer.name)) {
                tracing::warn!(peer = %peer.name, %why, "refusing peer link");
            } else {
                tracing::debug!(peer = %peer.name, %why, "refusing peer link");
            }
            conn.close(VarInt::from_u32(close_code::PROTOCOL_VIOLATION), why.as_bytes());
        }
    }
}

/// Keeps a link to `addr` (`HOST:PORT`) up for as long as the relay runs: connects,
/// waits for the link to end, reconnects after a backoff that doubles up to
/// [`MAX_BACKOFF`] with jitter. Failures are logged once per change (then at debug).
pub async fn dial(node: Arc<Node>, endpoint: quinn::Endpoint, client: quinn::ClientConfig, addr: String) {
    let mut backoff = MIN_BACKOFF;
    let mut last_error = String::new();
    loop {
        let started = Instant::now();
        let attempt = tokio::select! {
            biased;
            _ = node.stopping.cancelled() => return,
            attempt = connect(&node, &endpoint, &client, &addr) => attempt,
        };
        // A dial that failed because the relay is stopping (its endpoint closed) is no
        // failure to report.
        if node.stopping.is_cancelled() {
            return;
        }
        match attempt {
            Ok(ended) => {
                last_error.clear();
                let _ = ended.await;
                if started.elapsed() >= STABLE_LINK {
                    backoff = MIN_BACKOFF;
                }
            }
            Err(why) => {
                if why != last_error {
                    tracing::warn!(peer = %addr, %why, "cannot link to peer; retrying");
                    last_error = why;
                } else {
                    tracing::debug!(peer = %addr, why = %last_error, "cannot link to peer; retrying");
                }
            }
        }
        let jitter = rand_fraction();
        tokio::select! {
            _ = tokio::time::sleep(backoff.mul_f64(0.5 + jitter)) => {}
            _ = node.stopping.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A number in [0, 1) from the system's randomness.
fn rand_fraction() -> f64 {
    f64::from((random_u64() >> 32) as u32) / (f64::from(u32::MAX) + 1.0)
}

/// A number from the system's randomness.
pub fn random_u64() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    u64::from_le_bytes(b)
}

async fn connect(
    node: &Arc<Node>,
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    addr: &str,
) -> Result<oneshot::Receiver<()>, String> {
    let target = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("resolving {addr}: {e}"))?
        .find(|a| a.is_ipv4() == endpoint.local_addr().map(|l| l.is_ipv4()).unwrap_or(true))
        .ok_or_else(|| format!("{addr} has no address of this endpoint's family"))?;
    let conn =
        endpoint.connect_with(client.clone(), target, RELAY_SERVER_NAME).map_err(|e| e.to_string())?.await.map_err(
            |e| match e {
                // TLS alert 120, no_application_protocol: the peer does not speak links.
                quinn::ConnectionError::ConnectionClosed(close) if u64::from(close.error_code) == 0x100 + 120 => {
                    format!("{addr} is not a node of a cluster (a standalone relay, or another version of overlan)")
                }
                e => e.to_string(),
            },
        )?;
    let peer = verified_peer(&conn, node).inspect_err(|e| {
        // The TLS verifier checked the chain already; only the name check can fail here.
        conn.close(VarInt::from_u32(close_code::UNAUTHORIZED), e.as_bytes());
    })?;
    let control = hello(&conn, node, &peer, true).await.inspect_err(|e| {
        conn.close(VarInt::from_u32(close_code::PROTOCOL_VIOLATION), e.as_bytes());
    })?;
    let (tx, rx) = oneshot::channel();
    start_link(conn, node.clone(), peer, control, Some(tx));
    Ok(rx)
}

/// `catalog` as frames: the first with its networks, invites and removals, each with at
/// most `per_frame` of its releases (merging is additive, so a release may come in any
/// frame).
fn catalog_frames(catalog: Catalog, per_frame: usize) -> Vec<Catalog> {
    let Catalog { networks, invites, removed, voided } = catalog;
    let mut chunks = voided.chunks(per_frame.max(1)).map(<[_]>::to_vec);
    let first = Catalog { networks, invites, removed, voided: chunks.next().unwrap_or_default() };
    std::iter::once(first)
        .chain(chunks.map(|voided| Catalog { networks: Vec::new(), invites: Vec::new(), removed: Vec::new(), voided }))
        .collect()
}

/// A peer's `catalog` that came while an earlier one is being recorded, joined to
/// `waiting` (what came before it meanwhile). Merging is additive and keeps the newest of
/// each entry, so the two are simply put together; an error past `max` entries.
fn queue_catalog(waiting: Option<Catalog>, catalog: Catalog, max: usize) -> Result<Catalog, ()> {
    let Some(mut waiting) = waiting else { return Ok(catalog) };
    let size = |c: &Catalog| c.networks.len() + c.invites.len() + c.removed.len() + c.voided.len();
    if size(&waiting) + size(&catalog) > max {
        return Err(());
    }
    waiting.networks.extend(catalog.networks);
    waiting.invites.extend(catalog.invites);
    waiting.removed.extend(catalog.removed);
    waiting.voided.extend(catalog.voided);
    Ok(waiting)
}

#[cfg(test)]
mod tests {
    use super::*;
    use overlan_shared::wire::peer::CatalogVoid;

    fn catalog(label: &str, vips: &[u8]) -> Catalog {
        Catalog {
            networks: Vec::new(),
            invites: Vec::new(),
            removed: vec![overlan_shared::wire::peer::CatalogRemoval { name: label.into(), removed_at: 1 }],
            voided: vips
                .iter()
                .map(|v| CatalogVoid { network: "default".into(), vip: [10, 77, 0, *v].into(), before: 5 })
                .collect(),
        }
    }

    #[test]
    fn a_large_catalog_goes_in_frames_that_each_fit() {
        let frames = catalog_frames(catalog("a", &[1, 2, 3, 4, 5]), 2);
        let sizes: Vec<usize> = frames.iter().map(|f| f.voided.len()).collect();
        assert_eq!(sizes, [2, 2, 1]);
        assert_eq!(frames[0].removed.len(), 1, "the rest goes in the first");
        assert!(frames[1..].iter().all(|f| f.removed.is_empty() && f.networks.is_empty()));
        let vips: Vec<u8> = frames.iter().flat_map(|f| f.voided.iter().map(|v| v.vip.octets()[3])).collect();
        assert_eq!(vips, [1, 2, 3, 4, 5]);
        assert_eq!(catalog_frames(catalog("a", &[]), 2).len(), 1, "a catalog without releases is one frame");
        // The most releases one frame carries encode within the frame limit (with network
        // names twice the longest allowed, and the widest times).
        let many: Vec<u8> = (0..=255).collect();
        let mut big = catalog("a", &many);
        big.voided = big.voided.iter().cycle().take(VOIDS_PER_FRAME).cloned().collect();
        for v in &mut big.voided {
            v.network = "x".repeat(64);
            v.before = i64::MAX;
        }
        let mut buf = BytesMut::new();
        LinkCodec::new(MAX_LINK_FRAME).encode_into(&PeerMessage::Catalog(big), &mut buf).expect("fits one frame");
    }

    #[test]
    fn one_process_of_a_node_claims_its_name_at_a_time() {
        let claims = LinkClaims::default();
        let first = claims.claim("n1", 7).unwrap();
        assert!(claims.claim("n1", 8).is_err(), "another process of n1");
        let again = claims.claim("n1", 7).expect("a second link of the same process");
        assert!(claims.claim("n2", 8).is_ok(), "another node");
        drop(first);
        assert!(claims.claim("n1", 8).is_err(), "still claimed by the second link");
        drop(again);
        assert!(!claims.any());
        assert!(claims.claim("n1", 8).is_ok(), "given up with the last link");
    }

    #[test]
    fn catalogs_waiting_keep_every_entry_of_each() {
        let first = queue_catalog(None, catalog("a", &[1]), 10).unwrap();
        let next = queue_catalog(Some(first), catalog("b", &[2, 3]), 10).unwrap();
        // A continuation frame (releases only) takes nothing away.
        let next = queue_catalog(Some(next), catalog_frames(catalog("c", &[7, 4, 5]), 1).pop().unwrap(), 10).unwrap();
        let removed: Vec<&str> = next.removed.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(removed, ["a", "b"]);
        let vips: Vec<u8> = next.voided.iter().map(|v| v.vip.octets()[3]).collect();
        assert_eq!(vips, [1, 2, 3, 5], "no release lost");
        // Past the bound: refused (the link starts over, and the peer sends it all).
        assert!(queue_catalog(Some(next), catalog("d", &[6, 7, 8, 9]), 10).is_err());
    }
}
