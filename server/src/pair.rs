//! `SocketPairActor`: one per virtual stream (a connect to a listener), the shell around
//! its lifecycle machine ([`overlan_shared::pair::SocketPair`]: offer → accept/deny →
//! both streams attached → spliced → ended, with its deadlines and the TCP-like close).
//! The actor feeds the machine what happens, carries out what it decides, and holds
//! the streams. The bytes are spliced by a task it owns (one
//! `read_chunks`/`write_all_chunks` loop per direction), never through its mailbox; that
//! task also watches for receivers that take no data.

use std::net::SocketAddrV4;
use std::sync::Arc;

use actix::dev::SendError;
use actix::prelude::*;
use bytes::Bytes;
use overlan_shared::pair::{PairAction, PairTimeouts, Side, SocketPair};
use overlan_shared::wire::control::SocketId;
use overlan_shared::wire::{reset_code, ErrorCode};
use quinn::{ReadError, RecvStream, SendStream, VarInt, WriteError};
use std::time::{Duration, Instant};
use tokio::sync::watch;

use crate::counters::Reason;
use crate::link::{ForgetSocket, RegisterSocket, SendAnswer, SendConnect};
use crate::node::Node;
use crate::relay::STREAM_WINDOW;
use crate::router::{LocalSession, PeerLink, SessionId};
use crate::session::{ConnectOutcome, Notice, Offer, PairEnded, SessionActor};
use overlan_shared::route::NetKey;
use overlan_shared::wire::stream::StreamHeader;

/// A client's QUIC stream for a socket while the relay holds it. Dropped without being
/// taken (the pair ended, a message was dropped), it resets both directions, so the
/// client sees an error instead of a clean end of stream.
pub struct HeldStream {
    halves: Option<(SendStream, RecvStream)>,
}

impl HeldStream {
    /// Holds `send` and `recv`.
    pub fn new(send: SendStream, recv: RecvStream) -> Self {
        Self { halves: Some((send, recv)) }
    }

    /// Resets both directions with `code` now.
    pub fn reset(mut self, code: u32) {
        self.reset_halves(VarInt::from_u32(code));
    }

    fn reset_halves(&mut self, code: VarInt) {
        if let Some((mut send, mut recv)) = self.halves.take() {
            let _ = send.reset(code);
            let _ = recv.stop(code);
        }
    }

    /// Takes the halves out, to splice them.
    fn take(mut self) -> (SendStream, RecvStream) {
        self.halves.take().expect("a held stream holds its halves until taken or dropped")
    }
}

impl Drop for HeldStream {
    fn drop(&mut self) {
        self.reset_halves(VarInt::from_u32(reset_code::RELAY_TERMINATED));
    }
}

/// Who is on one side of a socket: a client session of this node, or the peer link the
/// socket crosses toward another node (which has a pair of its own for it).
#[derive(Clone)]
pub enum PartyRef {
    /// A session of this node.
    Session(LocalSession),
    /// A peer link; `remote` is the other node's socket, once known.
    Link {
        /// The link.
        link: PeerLink,
        /// The other node's socket id for this socket.
        remote: Option<SocketId>,
    },
}

impl PartyRef {
    /// The party's session number.
    pub fn id(&self) -> SessionId {
        match self {
            PartyRef::Session(s) => s.id,
            PartyRef::Link { link, .. } => link.session,
        }
    }

    fn ended(&self, socket: SocketId, notify: Option<ErrorCode>) {
        match self {
            PartyRef::Session(s) => s.addr.do_send(PairEnded { socket, notify }),
            PartyRef::Link { link, .. } => link.addr.do_send(ForgetSocket { socket, notify }),
        }
    }

    /// The reset code for a stream of this party whose connection was lost.
    fn lost_code(&self) -> VarInt {
        VarInt::from_u32(match self {
            PartyRef::Session(_) => reset_code::SESSION_LOST,
            PartyRef::Link { .. } => reset_code::LINK_LOST,
        })
    }
}

/// One side of a pair: who, its address and (until spliced) its stream.
struct Party {
    who: PartyRef,
    addr: SocketAddrV4,
    stream: Option<HeldStream>,
}

/// A connected (or connecting) virtual stream: the shell around its [`SocketPair`]
/// lifecycle, holding what the machine decides about.
pub struct SocketPairActor {
    socket: SocketId,
    req: u64,
    net: NetKey,
    parties: [Party; 2],
    machine: SocketPair,
    node: Arc<Node>,
    /// Cancels each direction of the splice, indexed by the [`Side`] it writes toward.
    cancel: Option<[watch::Sender<Option<VarInt>>; 2]>,
    /// The deadline the wake-up timer is set for.
    timer: Option<(Instant, SpawnHandle)>,
    /// Why the node across a link refused the connect, in its words.
    remote_failure: Option<String>,
    /// Nodes a connect passed on over a link may still cross.
    hops: u8,
}

impl SocketPairActor {
    /// A pair for `connector`'s request `req` (0 when the connector is a peer link) to
    /// `listener`, in network `net`.
    pub fn new(
        socket: SocketId,
        req: u64,
        net: NetKey,
        connector: (PartyRef, SocketAddrV4),
        listener: (PartyRef, SocketAddrV4),
        node: Arc<Node>,
    ) -> Self {
        let party = |(who, addr): (PartyRef, SocketAddrV4)| Party { who, addr, stream: None };
        let config = &node.config;
        let timeouts = PairTimeouts {
            accept: config.accept_timeout,
            attach: config.attach_timeout,
            drain: config.limits.drain_timeout.0,
        };
        Self {
            socket,
            req,
            net,
            parties: [party(connector), party(listener)],
            machine: SocketPair::new(Instant::now(), timeouts),
            node,
            cancel: None,
            timer: None,
            remote_failure: None,
            hops: overlan_shared::wire::peer::MAX_HOPS,
        }
    }

    /// A pair whose connect came over a link with `hops` nodes left to cross.
    pub fn with_hops(mut self, hops: u8) -> Self {
        self.hops = hops;
        self
    }

    fn party(&self, side: Side) -> &Party {
        &self.parties[side as usize]
    }

    /// The sides `session` is (both for a client connected to its own listener).
    fn sides_of(&self, session: SessionId) -> impl Iterator<Item = Side> + '_ {
        [Side::Connector, Side::Listener].into_iter().filter(move |&s| self.party(s).who.id() == session)
    }

    fn connector_outcome(&self, result: Result<(SocketAddrV4, SocketAddrV4), (ErrorCode, String)>) {
        match &self.party(Side::Connector).who {
            PartyRef::Session(s) => s.addr.do_send(ConnectOutcome { req: self.req, socket: self.socket, result }),
            PartyRef::Link { link, remote } => link.addr.do_send(SendAnswer {
                socket: self.socket,
                to: remote.expect("a pair with a link connector knows the connecting node's socket"),
                result: result.map(|_| ()),
            }),
        }
    }

    /// Carries out what the machine decided, then sets the timer for its next deadline.
    fn drive(&mut self, ctx: &mut Context<Self>) {
        while let Some(action) = self.machine.poll_action() {
            match action {
                PairAction::ConnectSucceeded => {
                    let (a, b) = (self.party(Side::Connector).addr, self.party(Side::Listener).addr);
                    self.connector_outcome(Ok((a, b)));
                }
                PairAction::ConnectFailed { code, why } => {
                    let to = self.party(Side::Listener).addr;
                    // The far node's own words say more ("nothing listening") than the code.
                    let message = self.remote_failure.take().unwrap_or_else(|| format!("connect {to}: {why}"));
                    self.connector_outcome(Err((code, message)));
                }
                PairAction::Splice => self.splice(ctx),
                PairAction::Cancel { toward, code } => {
                    if let Some(cancel) = &self.cancel {
                        let _ = cancel[toward as usize].send(Some(VarInt::from_u32(code)));
                    }
                }
                PairAction::Terminate { code, notify } => {
                    if let Some(cancel) = &self.cancel {
                        for direction in cancel {
                            let _ = direction.send(Some(VarInt::from_u32(code)));
                        }
                    }
                    for side in [Side::Connector, Side::Listener] {
                        if let Some(stream) = self.parties[side as usize].stream.take() {
                            stream.reset(code);
                        }
                        if !self.machine.is_gone(side) {
                            self.party(side).who.ended(self.socket, Some(notify));
                        }
                    }
                    ctx.stop();
                }
                PairAction::Stop => ctx.stop(),
            }
        }
        let next = self.machine.poll_timeout();
        if next != self.timer.as_ref().map(|(at, _)| *at) {
            if let Some((_, handle)) = self.timer.take() {
                ctx.cancel_future(handle);
            }
            if let Some(at) = next {
                let handle = ctx.run_later(at.saturating_duration_since(Instant::now()), |act, ctx| {
                    act.timer = None;
                    if act.machine.handle_timeout(Instant::now()) {
                        act.node.count(Reason::DrainTimeout);
                    }
                    act.drive(ctx);
                });
                self.timer = Some((at, handle));
            }
        }
    }

    fn splice(&mut self, ctx: &mut Context<Self>) {
        let [connector, listener] = &mut self.parties;
        let a = connector.stream.take().expect("the machine splices once both streams are attached").take();
        let b = listener.stream.take().expect("the machine splices once both streams are attached").take();
        let (to_connector, to_connector_rx) = watch::channel(None);
        let (to_listener, to_listener_rx) = watch::channel(None);
        self.cancel = Some([to_connector, to_listener]);
        tracing::debug!(socket = self.socket, from = %connector.addr, to = %listener.addr, "socket spliced");
        let guard = StallGuard {
            node: self.node.clone(),
            pair: ctx.address(),
            write_timeout: self.node.config.limits.write_timeout.0,
        };
        let lost = [connector.who.lost_code(), listener.who.lost_code()];
        tokio::spawn(splice(a, b, [to_connector_rx, to_listener_rx], lost, guard));
    }
}

impl Actor for SocketPairActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.node.router.add_pair(self.socket, ctx.address());
        for party in &self.parties {
            if let PartyRef::Link { link, remote } = &party.who {
                link.addr.do_send(RegisterSocket { socket: self.socket, remote: *remote, pair: ctx.address() });
            }
        }
        let (listener, connector) = (self.party(Side::Listener), self.party(Side::Connector));
        let gone = match &listener.who {
            PartyRef::Session(session) => {
                let offer =
                    Offer { socket: self.socket, pair: ctx.address(), local: listener.addr, peer: connector.addr };
                match session.addr.try_send(offer) {
                    Ok(()) => false,
                    // A busy mailbox only delays the offer; unbounded delivery is fine for control.
                    Err(SendError::Full(offer)) => {
                        session.addr.do_send(offer);
                        false
                    }
                    // The listener's session ended between the lookup and now: answer at once.
                    Err(SendError::Closed(_)) => true,
                }
            }
            PartyRef::Link { link, .. } => {
                let connect = SendConnect {
                    socket: self.socket,
                    net: self.net,
                    from: connector.addr,
                    to: listener.addr,
                    hops: self.hops,
                };
                link.addr.try_send(connect).is_err()
            }
        };
        if gone {
            self.machine.handle_party_gone(Instant::now(), Side::Listener);
        }
        self.drive(ctx);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.node.router.remove_pair(self.socket);
        for party in &self.parties {
            party.who.ended(self.socket, None);
        }
    }
}

/// The listener's application answered an offer.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AnswerOffer {
    /// The answering session.
    pub session: SessionId,
    /// Accept, or the reason to refuse (`Denied`, `Refused`).
    pub result: Result<(), ErrorCode>,
}

impl Handler<AnswerOffer> for SocketPairActor {
    type Result = ();
    fn handle(&mut self, msg: AnswerOffer, ctx: &mut Self::Context) {
        if msg.session == self.party(Side::Listener).who.id() {
            self.machine.handle_answer(Instant::now(), msg.result);
            self.drive(ctx);
        }
    }
}

/// The other node answered this node's connect across a link.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PeerAnswer {
    /// The link's session number.
    pub session: SessionId,
    /// The other node's socket.
    pub remote: SocketId,
    /// Accepted, or why not (the code, and the message the answering node wrote).
    pub result: Result<(), (ErrorCode, String)>,
}

impl Handler<PeerAnswer> for SocketPairActor {
    type Result = ();
    fn handle(&mut self, msg: PeerAnswer, ctx: &mut Self::Context) {
        let socket = self.socket;
        let PartyRef::Link { link, remote } = &mut self.parties[Side::Listener as usize].who else { return };
        if link.session != msg.session || remote.is_some() {
            return;
        }
        *remote = Some(msg.remote);
        if msg.result.is_ok() {
            // This node opens the socket's stream on the link (the node that answered
            // waits for it), and attaches it as the listener's side.
            let (conn, session, pair) = (link.conn.clone(), link.session, ctx.address());
            tokio::spawn(async move {
                match open_link_stream(&conn, socket).await {
                    Ok(stream) => pair.do_send(AttachStream { session, session_addr: None, stream }),
                    Err(e) => {
                        tracing::debug!(socket, error = %e, "could not open a socket stream on a peer link");
                        pair.do_send(PartyGone { session });
                    }
                }
            });
        }
        let result = match msg.result {
            Ok(()) => Ok(()),
            Err((code, message)) => {
                self.remote_failure = Some(message);
                Err(code)
            }
        };
        self.machine.handle_answer(Instant::now(), result);
        self.drive(ctx);
    }
}

/// Opens a QUIC stream for `socket` on a peer link and sends its header.
async fn open_link_stream(conn: &quinn::Connection, socket: SocketId) -> Result<HeldStream, String> {
    let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(&StreamHeader { socket }.to_bytes()).await.map_err(|e| e.to_string())?;
    Ok(HeldStream::new(send, recv))
}

/// A client opened the QUIC stream of a socket.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachStream {
    /// The session that opened it.
    pub session: SessionId,
    /// That session's actor (told if the stream is rejected); `None` for a link.
    pub session_addr: Option<Addr<SessionActor>>,
    /// The stream (reset if this message is dropped undelivered).
    pub stream: HeldStream,
}

impl Handler<AttachStream> for SocketPairActor {
    type Result = ();
    fn handle(&mut self, msg: AttachStream, ctx: &mut Self::Context) {
        // A client connected to its own listener is both parties; its two streams are
        // interchangeable ends of the splice, so either free side will do.
        let side = self.sides_of(msg.session).find(|&s| !self.machine.is_attached(s));
        match side {
            Some(side) if self.machine.handle_attach(side) => {
                self.parties[side as usize].stream = Some(msg.stream);
                self.drive(ctx);
            }
            _ => {
                msg.stream.reset(reset_code::UNKNOWN_SOCKET);
                let Some(session) = msg.session_addr else { return };
                session.do_send(Notice {
                    code: ErrorCode::UnknownSocket,
                    message: format!(
                        "stream for socket {} rejected: not this session's socket, or already attached",
                        self.socket
                    ),
                });
            }
        }
    }
}

/// A party closes the socket at once (both directions).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseSocket {
    /// The closing session.
    pub session: SessionId,
}

impl Handler<CloseSocket> for SocketPairActor {
    type Result = ();
    fn handle(&mut self, msg: CloseSocket, ctx: &mut Self::Context) {
        if self.sides_of(msg.session).next().is_some() {
            self.machine.handle_close();
            self.drive(ctx);
        }
    }
}

/// A party's session ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PartyGone {
    /// The session that ended.
    pub session: SessionId,
}

impl Handler<PartyGone> for SocketPairActor {
    type Result = ();
    fn handle(&mut self, msg: PartyGone, ctx: &mut Self::Context) {
        let sides: Vec<Side> = self.sides_of(msg.session).collect();
        for side in sides {
            self.machine.handle_party_gone(Instant::now(), side);
        }
        self.drive(ctx);
    }
}

/// Cut the pair: its receiver took no data within the write timeout (counted by the
/// pump), or the relay-wide cap on held bytes was reached and its stall is the oldest.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stalled {
    /// Why, for the log.
    pub why: &'static str,
}

impl Handler<Stalled> for SocketPairActor {
    type Result = ();
    fn handle(&mut self, msg: Stalled, ctx: &mut Self::Context) {
        let (a, b) = (self.party(Side::Connector).addr, self.party(Side::Listener).addr);
        tracing::info!(socket = self.socket, %a, %b, why = msg.why, "cutting a stalled socket");
        self.machine.handle_stalled();
        self.drive(ctx);
    }
}

/// Both directions of the splice have ended.
#[derive(Message)]
#[rtype(result = "()")]
struct SpliceDone;

impl Handler<SpliceDone> for SocketPairActor {
    type Result = ();
    fn handle(&mut self, _: SpliceDone, ctx: &mut Self::Context) {
        self.machine.handle_splice_done();
        self.drive(ctx);
    }
}

async fn splice(
    a: (SendStream, RecvStream),
    b: (SendStream, RecvStream),
    cancel: [watch::Receiver<Option<VarInt>>; 2],
    lost: [VarInt; 2],
    guard: StallGuard,
) {
    let (a_send, a_recv) = a;
    let (b_send, b_recv) = b;
    let [to_connector, to_listener] = cancel;
    let [a_lost, b_lost] = lost;
    tokio::join!(
        pump(a_recv, b_send, to_listener, [a_lost, b_lost], &guard, "connector to listener"),
        pump(b_recv, a_send, to_connector, [b_lost, a_lost], &guard, "listener to connector")
    );
    guard.pair.do_send(SpliceDone);
}

/// Resolves with the cancel code once the direction is cancelled; never if it is not.
async fn cancelled(rx: &mut watch::Receiver<Option<VarInt>>) -> VarInt {
    loop {
        if let Some(code) = *rx.borrow_and_update() {
            return code;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Chunks moved per read: each is one STREAM frame's data (about a packet), so taking
/// many per wake-up and writing them in one go cuts per-packet locking and waking.
const SPLICE_BATCH: usize = 32;

/// A write toward a receiver that has not completed for this long counts as a stall
/// against the relay-wide budget of held bytes.
const STALL_GRACE: Duration = Duration::from_secs(1);

/// What a stalled direction holds at most, as counted against the budget: what the
/// relay accepted from the sender (one stream window) and what it queued toward the
/// receiver (about one stream window).
const STALL_HOLD_BYTES: u64 = 2 * STREAM_WINDOW as u64;

/// Watches writes toward a receiver: counts long ones against the relay's budget of
/// held bytes and gives up on a receiver that takes nothing within the write timeout.
struct StallGuard {
    node: Arc<Node>,
    pair: Addr<SocketPairActor>,
    write_timeout: Duration,
}

/// Why a write toward a receiver ended early.
enum WriteEnd {
    /// The stream or its connection failed.
    Failed(WriteError),
    /// The receiver took nothing within the write timeout.
    Stalled,
}

impl StallGuard {
    async fn write(&self, to: &mut SendStream, chunks: &mut [Bytes]) -> Result<(), WriteEnd> {
        let write = to.write_all_chunks(chunks);
        tokio::pin!(write);
        // Most writes complete at once or within the grace; they never touch the budget.
        if let Ok(done) = tokio::time::timeout(STALL_GRACE, &mut write).await {
            return done.map_err(WriteEnd::Failed);
        }
        let _hold = self.node.holds.stall(STALL_HOLD_BYTES, self.pair.clone(), &self.node.counters);
        match tokio::time::timeout(self.write_timeout.saturating_sub(STALL_GRACE), write).await {
            Ok(done) => done.map_err(WriteEnd::Failed),
            Err(_) => Err(WriteEnd::Stalled),
        }
    }
}

/// Copies one direction until it ends or is cancelled; a cancel resets both halves
/// with its code, a stalled receiver has the whole pair cut. `lost` holds the codes
/// that tell the other end that the sender's or the receiver's connection was lost.
async fn pump(
    mut from: RecvStream,
    mut to: SendStream,
    mut cancel: watch::Receiver<Option<VarInt>>,
    lost: [VarInt; 2],
    guard: &StallGuard,
    direction: &'static str,
) {
    let code = tokio::select! {
        biased;
        code = cancelled(&mut cancel) => code,
        stalled = copy(&mut from, &mut to, lost, guard, direction) => {
            if !stalled {
                return;
            }
            // Counted before the reset, so whoever sees the reset sees the count.
            guard.node.count(Reason::ReceiverStalled);
            guard.pair.do_send(Stalled { why: "the receiver took no data within the write timeout" });
            VarInt::from_u32(reset_code::RECEIVER_STALLED)
        }
    };
    let _ = to.reset(code);
    let _ = from.stop(code);
}

/// Joins a batch of received chunks (one per QUIC packet) into one when they are small.
/// quinn keeps what a stream sent until it is acknowledged as a list of the chunks it
/// was given, and walks that list for every packet it builds: with 1,200–1,452-byte
/// packets, thousands of chunks in flight made that walk the relay's largest cost (15%
/// of its CPU in a profile), and one copy of the bytes is far cheaper. Chunks of
/// [`JOIN_BELOW`] or more (packets on loopback and jumbo-frame paths) are passed on as
/// they are: the list is short enough, and the copy cost more than the walk (relay CPU
/// per GiB through `overlan nc` 1.86 against 1.97 s, means of 6 alternating runs). A
/// batch is only as large as what arrived since the last read, so this adds no wait.
fn coalesce(chunks: &mut [Bytes]) -> &mut [Bytes] {
    let total: usize = chunks.iter().map(Bytes::len).sum();
    if chunks.len() < 2 || total / chunks.len() >= JOIN_BELOW {
        return chunks;
    }
    let mut joined = bytes::BytesMut::with_capacity(total);
    for chunk in chunks.iter_mut() {
        joined.extend_from_slice(&std::mem::take(chunk));
    }
    chunks[0] = joined.freeze();
    &mut chunks[..1]
}

/// The mean chunk size from which a batch is passed on without joining.
const JOIN_BELOW: usize = 4096;

/// Copies `from` to `to`, carrying the end over faithfully: a finish (half-close) as a
/// finish, a reset as a reset with the same code, a stop as a stop, a lost connection
/// as `lost` says (`SESSION_LOST`, or `LINK_LOST` across nodes). Data the relay already
/// accepted from a sender whose connection has since closed is still read and
/// delivered. Returns true if the receiver stalled.
async fn copy(
    from: &mut RecvStream,
    to: &mut SendStream,
    lost: [VarInt; 2],
    guard: &StallGuard,
    direction: &'static str,
) -> bool {
    let [sender_lost, receiver_lost] = lost;
    let mut chunks: [Bytes; SPLICE_BATCH] = Default::default();
    loop {
        match from.read_chunks(&mut chunks).await {
            Ok(Some(n)) => match guard.write(to, coalesce(&mut chunks[..n])).await {
                Ok(()) => {}
                Err(WriteEnd::Stalled) => return true,
                Err(WriteEnd::Failed(e)) => {
                    let code = match e {
                        WriteError::Stopped(code) => code,
                        _ => receiver_lost,
                    };
                    let _ = from.stop(code);
                    return false;
                }
            },
            Ok(None) => {
                tracing::debug!(direction, "sender finished; finishing toward the receiver");
                let _ = to.finish();
                return false;
            }
            Err(ReadError::Reset(code)) => {
                tracing::debug!(direction, %code, "sender reset; resetting toward the receiver");
                let _ = to.reset(code);
                return false;
            }
            Err(e) => {
                tracing::debug!(direction, error = %e, "sender lost; resetting toward the receiver");
                let _ = to.reset(sender_lost);
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_chunks_are_joined_in_order_and_large_ones_passed_on() {
        let mut small: Vec<Bytes> = (0..10u8).map(|i| Bytes::from(vec![i; 1400])).collect();
        let expected: Vec<u8> = small.iter().flat_map(|c| c.to_vec()).collect();
        let joined = coalesce(&mut small);
        assert_eq!(joined.len(), 1);
        assert_eq!(joined[0], expected);

        let mut large: Vec<Bytes> = (0..10u8).map(|i| Bytes::from(vec![i; 6500])).collect();
        let before = large.clone();
        assert_eq!(coalesce(&mut large), &before[..]);

        let mut one = vec![Bytes::from_static(b"x")];
        assert_eq!(coalesce(&mut one).len(), 1);
        assert!(coalesce(&mut []).is_empty());
    }
}
