//! `SocketPairActor`: one per virtual stream (a connect to a listener). It carries the
//! connection through offer → accept/deny → both sides attach their QUIC streams →
//! spliced, and supervises it: timeouts for a listener that never answers or a side
//! that never attaches, and teardown when either side closes, aborts or stalls. The
//! bytes are spliced by a task it owns (one `read_chunks`/`write_all_chunks` loop per
//! direction), never through its mailbox.
//!
//! Closing is TCP-like: when a party's session ends, the direction toward it is reset
//! (nobody is left to read), but the direction from it keeps delivering what the relay
//! already accepted; if that party had finished its side, the receiver reads every byte
//! and then a clean end, even though the sender has gone. Only an abort, the death of
//! the receiving side, a stalled receiver or the drain deadline cut a socket short.

use std::net::SocketAddrV4;
use std::sync::Arc;

use actix::dev::SendError;
use actix::prelude::*;
use bytes::Bytes;
use overlan_shared::wire::control::SocketId;
use overlan_shared::wire::{reset_code, ErrorCode};
use quinn::{ReadError, RecvStream, SendStream, VarInt, WriteError};
use std::time::Duration;
use tokio::sync::watch;

use crate::counters::Reason;
use crate::node::Node;
use crate::relay::STREAM_WINDOW;
use crate::router::{LocalSession, SessionId};
use crate::session::{ConnectOutcome, Notice, Offer, PairEnded, SessionActor};

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

/// One side of a pair.
struct Party {
    session: LocalSession,
    addr: SocketAddrV4,
    stream: Option<HeldStream>,
    gone: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PairState {
    /// Waiting for the listener's application to accept or deny.
    Offered,
    /// Accepted; waiting for both data streams.
    Accepted,
    /// Bytes flow.
    Spliced,
}

/// The two directions of a splice, by the party they write toward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Toward {
    Connector = 0,
    Listener = 1,
}

/// A connected (or connecting) virtual stream.
pub struct SocketPairActor {
    socket: SocketId,
    req: u64,
    connector: Party,
    listener: Party,
    state: PairState,
    node: Arc<Node>,
    /// Cancels each direction of the splice, indexed by [`Toward`].
    cancel: Option<[watch::Sender<Option<VarInt>>; 2]>,
    /// A party has gone and the drain deadline runs.
    draining: bool,
}

impl SocketPairActor {
    /// A pair for `connector`'s request `req` to `listener`.
    pub fn new(
        socket: SocketId,
        req: u64,
        connector: (LocalSession, SocketAddrV4),
        listener: (LocalSession, SocketAddrV4),
        node: Arc<Node>,
    ) -> Self {
        let party = |(session, addr): (LocalSession, SocketAddrV4)| Party { session, addr, stream: None, gone: false };
        Self {
            socket,
            req,
            connector: party(connector),
            listener: party(listener),
            state: PairState::Offered,
            node,
            cancel: None,
            draining: false,
        }
    }

    fn connect_failed(&self, code: ErrorCode, why: &str) {
        let to = self.listener.addr;
        self.connector.session.addr.do_send(ConnectOutcome {
            req: self.req,
            socket: self.socket,
            result: Err((code, format!("connect {to}: {why}"))),
        });
    }

    fn cancel_direction(&self, toward: Toward, code: u32) {
        if let Some(cancel) = &self.cancel {
            let _ = cancel[toward as usize].send(Some(VarInt::from_u32(code)));
        }
    }

    /// Ends the pair: resets every attached stream with `code`, tells the sessions still
    /// there why (`notify`), and stops.
    fn terminate(&mut self, ctx: &mut Context<Self>, code: u32, notify: ErrorCode) {
        self.cancel_direction(Toward::Connector, code);
        self.cancel_direction(Toward::Listener, code);
        for party in [&mut self.connector, &mut self.listener] {
            if let Some(stream) = party.stream.take() {
                stream.reset(code);
            }
        }
        if self.state == PairState::Offered && !self.connector.gone {
            self.connect_failed(notify, notify.describe());
        }
        for party in [&self.connector, &self.listener] {
            if !party.gone {
                party.session.addr.do_send(PairEnded { socket: self.socket, notify: Some(notify) });
            }
        }
        ctx.stop();
    }

    fn maybe_splice(&mut self, ctx: &mut Context<Self>) {
        if self.state != PairState::Accepted || self.connector.stream.is_none() || self.listener.stream.is_none() {
            return;
        }
        let a = self.connector.stream.take().expect("checked above").take();
        let b = self.listener.stream.take().expect("checked above").take();
        let (to_connector, to_connector_rx) = watch::channel(None);
        let (to_listener, to_listener_rx) = watch::channel(None);
        self.cancel = Some([to_connector, to_listener]);
        self.state = PairState::Spliced;
        tracing::debug!(socket = self.socket, from = %self.connector.addr, to = %self.listener.addr, "socket spliced");
        let guard = StallGuard {
            node: self.node.clone(),
            pair: ctx.address(),
            write_timeout: self.node.config.limits.write_timeout.0,
        };
        tokio::spawn(splice(a, b, [to_connector_rx, to_listener_rx], guard));
        // A party that left before the splice began: its direction drains, the other
        // is cut now.
        for (party, toward) in [(&self.connector, Toward::Connector), (&self.listener, Toward::Listener)] {
            if party.gone {
                self.cancel_direction(toward, reset_code::SESSION_LOST);
            }
        }
    }

    /// Bounds how long a socket may go on delivering after a party has gone.
    fn start_drain_deadline(&mut self, ctx: &mut Context<Self>) {
        if std::mem::replace(&mut self.draining, true) {
            return;
        }
        ctx.run_later(self.node.config.limits.drain_timeout.0, |act, ctx| {
            act.node.count(Reason::DrainTimeout);
            act.terminate(ctx, reset_code::SESSION_LOST, ErrorCode::SessionLost);
        });
    }
}

impl Actor for SocketPairActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.node.router.add_pair(self.socket, ctx.address());
        let offer =
            Offer { socket: self.socket, pair: ctx.address(), local: self.listener.addr, peer: self.connector.addr };
        match self.listener.session.addr.try_send(offer) {
            Ok(()) => {}
            // A busy mailbox only delays the offer; unbounded delivery is fine for control.
            Err(SendError::Full(offer)) => self.listener.session.addr.do_send(offer),
            // The listener's session ended between the lookup and now: answer at once.
            Err(SendError::Closed(_)) => {
                self.listener.gone = true;
                self.connect_failed(ErrorCode::Unreachable, "unreachable (the listener's session ended)");
                self.connector.gone = true;
                ctx.stop();
                return;
            }
        }
        ctx.run_later(self.node.config.accept_timeout, |act, ctx| {
            if act.state == PairState::Offered {
                act.terminate(ctx, reset_code::TIMED_OUT, ErrorCode::TimedOut);
            }
        });
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.node.router.remove_pair(self.socket);
        for party in [&self.connector, &self.listener] {
            party.session.addr.do_send(PairEnded { socket: self.socket, notify: None });
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
        if msg.session != self.listener.session.id || self.state != PairState::Offered {
            return;
        }
        match msg.result {
            Ok(()) => {
                self.state = PairState::Accepted;
                self.connector.session.addr.do_send(ConnectOutcome {
                    req: self.req,
                    socket: self.socket,
                    result: Ok((self.connector.addr, self.listener.addr)),
                });
                ctx.run_later(self.node.config.attach_timeout, |act, ctx| {
                    if act.state != PairState::Spliced {
                        act.terminate(ctx, reset_code::TIMED_OUT, ErrorCode::TimedOut);
                    }
                });
                self.maybe_splice(ctx);
            }
            Err(code) => {
                self.connect_failed(code, code.describe());
                ctx.stop();
            }
        }
    }
}

/// A client opened the QUIC stream of a socket.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachStream {
    /// The session that opened it.
    pub session: SessionId,
    /// That session's actor (told if the stream is rejected).
    pub session_addr: Addr<SessionActor>,
    /// The stream (reset if this message is dropped undelivered).
    pub stream: HeldStream,
}

impl Handler<AttachStream> for SocketPairActor {
    type Result = ();
    fn handle(&mut self, msg: AttachStream, ctx: &mut Self::Context) {
        let socket = self.socket;
        let spliced = self.state == PairState::Spliced;
        // A client connected to its own listener is both parties; its two streams are
        // interchangeable ends of the splice, so either free slot will do.
        let slot = [&mut self.connector, &mut self.listener]
            .into_iter()
            .find(|p| p.session.id == msg.session && p.stream.is_none() && !p.gone && !spliced);
        let Some(slot) = slot else {
            msg.stream.reset(reset_code::UNKNOWN_SOCKET);
            msg.session_addr.do_send(Notice {
                code: ErrorCode::UnknownSocket,
                message: format!("stream for socket {socket} rejected: not this session's socket, or already attached"),
            });
            return;
        };
        slot.stream = Some(msg.stream);
        self.maybe_splice(ctx);
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
        if self.connector.session.id == msg.session || self.listener.session.id == msg.session {
            self.terminate(ctx, reset_code::ABORTED, ErrorCode::Closed);
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
        let mut found = false;
        for party in [&mut self.connector, &mut self.listener] {
            if party.session.id == msg.session {
                party.gone = true;
                found = true;
            }
        }
        if !found {
            return;
        }
        let both_gone = self.connector.gone && self.listener.gone;
        match self.state {
            PairState::Offered => {
                if self.listener.gone && !self.connector.gone {
                    self.connect_failed(ErrorCode::Unreachable, "unreachable (the listener's session ended)");
                    self.connector.gone = true; // already told; no second outcome
                }
                self.terminate(ctx, reset_code::SESSION_LOST, ErrorCode::SessionLost);
            }
            // A party that left after attaching its stream may have finished it: keep the
            // pair until the other side attaches, so what it sent is still delivered.
            PairState::Accepted => {
                let gone_attached = [&self.connector, &self.listener].iter().all(|p| !p.gone || p.stream.is_some());
                if both_gone || !gone_attached {
                    self.terminate(ctx, reset_code::SESSION_LOST, ErrorCode::SessionLost);
                } else {
                    self.start_drain_deadline(ctx);
                }
            }
            PairState::Spliced => {
                if both_gone {
                    self.terminate(ctx, reset_code::SESSION_LOST, ErrorCode::SessionLost);
                    return;
                }
                let toward = if self.connector.gone { Toward::Connector } else { Toward::Listener };
                self.cancel_direction(toward, reset_code::SESSION_LOST);
                self.start_drain_deadline(ctx);
            }
        }
    }
}

/// A receiver took no data within the write timeout.
#[derive(Message)]
#[rtype(result = "()")]
struct Stalled;

impl Handler<Stalled> for SocketPairActor {
    type Result = ();
    fn handle(&mut self, _: Stalled, ctx: &mut Self::Context) {
        tracing::info!(socket = self.socket, a = %self.connector.addr, b = %self.listener.addr, "cutting a socket whose receiver takes no data");
        self.terminate(ctx, reset_code::RECEIVER_STALLED, ErrorCode::TimedOut);
    }
}

/// The relay-wide cap on held bytes was reached and this pair's stall is the oldest.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Evicted;

impl Handler<Evicted> for SocketPairActor {
    type Result = ();
    fn handle(&mut self, _: Evicted, ctx: &mut Self::Context) {
        tracing::info!(socket = self.socket, a = %self.connector.addr, b = %self.listener.addr, "cutting a stalled socket: relay cap on held bytes reached");
        self.terminate(ctx, reset_code::RECEIVER_STALLED, ErrorCode::TimedOut);
    }
}

/// Both directions of the splice have ended.
#[derive(Message)]
#[rtype(result = "()")]
struct SpliceDone;

impl Handler<SpliceDone> for SocketPairActor {
    type Result = ();
    fn handle(&mut self, _: SpliceDone, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

async fn splice(
    a: (SendStream, RecvStream),
    b: (SendStream, RecvStream),
    cancel: [watch::Receiver<Option<VarInt>>; 2],
    guard: StallGuard,
) {
    let (a_send, a_recv) = a;
    let (b_send, b_recv) = b;
    let [to_connector, to_listener] = cancel;
    tokio::join!(pump(a_recv, b_send, to_listener, &guard), pump(b_recv, a_send, to_connector, &guard));
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
/// with its code, a stalled receiver has the whole pair cut.
async fn pump(
    mut from: RecvStream,
    mut to: SendStream,
    mut cancel: watch::Receiver<Option<VarInt>>,
    guard: &StallGuard,
) {
    let code = tokio::select! {
        biased;
        code = cancelled(&mut cancel) => code,
        stalled = copy(&mut from, &mut to, guard) => {
            if !stalled {
                return;
            }
            // Counted before the reset, so whoever sees the reset sees the count.
            guard.node.count(Reason::ReceiverStalled);
            guard.pair.do_send(Stalled);
            VarInt::from_u32(reset_code::RECEIVER_STALLED)
        }
    };
    let _ = to.reset(code);
    let _ = from.stop(code);
}

/// Copies `from` to `to`, carrying the end over faithfully: a finish (half-close) as a
/// finish, a reset as a reset with the same code, a stop as a stop, a lost connection
/// as `SESSION_LOST`. Data the relay already accepted from a sender whose connection has
/// since closed is still read and delivered. Returns true if the receiver stalled.
async fn copy(from: &mut RecvStream, to: &mut SendStream, guard: &StallGuard) -> bool {
    let session_lost = VarInt::from_u32(reset_code::SESSION_LOST);
    let mut chunks: [Bytes; SPLICE_BATCH] = Default::default();
    loop {
        match from.read_chunks(&mut chunks).await {
            Ok(Some(n)) => match guard.write(to, &mut chunks[..n]).await {
                Ok(()) => {}
                Err(WriteEnd::Stalled) => return true,
                Err(WriteEnd::Failed(e)) => {
                    let code = match e {
                        WriteError::Stopped(code) => code,
                        _ => session_lost,
                    };
                    let _ = from.stop(code);
                    return false;
                }
            },
            Ok(None) => {
                let _ = to.finish();
                return false;
            }
            Err(ReadError::Reset(code)) => {
                let _ = to.reset(code);
                return false;
            }
            Err(_) => {
                let _ = to.reset(session_lost);
                return false;
            }
        }
    }
}
