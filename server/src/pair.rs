//! `SocketPairActor`: one per virtual stream (a connect to a listener). It carries the
//! connection through offer → accept/deny → both sides attach their QUIC streams →
//! spliced, and supervises it: timeouts for a listener that never answers or a side
//! that never attaches, and teardown when either side closes or its session dies. The
//! bytes are spliced by a task it owns (one `read_chunks`/`write_all_chunks` loop per
//! direction), never through its mailbox.

use std::net::SocketAddrV4;
use std::sync::Arc;

use actix::dev::SendError;
use actix::prelude::*;
use bytes::Bytes;
use overlan_shared::wire::control::SocketId;
use overlan_shared::wire::{reset_code, ErrorCode};
use quinn::{ReadError, RecvStream, SendStream, VarInt, WriteError};
use tokio::sync::watch;

use crate::config::RelayConfig;
use crate::router::{LocalSession, Router, SessionId};
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

/// A connected (or connecting) virtual stream.
pub struct SocketPairActor {
    socket: SocketId,
    req: u64,
    connector: Party,
    listener: Party,
    state: PairState,
    router: Arc<Router>,
    config: Arc<RelayConfig>,
    cancel: Option<watch::Sender<Option<VarInt>>>,
}

impl SocketPairActor {
    /// A pair for `connector`'s request `req` to `listener`.
    pub fn new(
        socket: SocketId,
        req: u64,
        connector: (LocalSession, SocketAddrV4),
        listener: (LocalSession, SocketAddrV4),
        router: Arc<Router>,
        config: Arc<RelayConfig>,
    ) -> Self {
        let party = |(session, addr): (LocalSession, SocketAddrV4)| Party { session, addr, stream: None, gone: false };
        Self {
            socket,
            req,
            connector: party(connector),
            listener: party(listener),
            state: PairState::Offered,
            router,
            config,
            cancel: None,
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

    /// Ends the pair: resets every attached stream with `code`, tells the sessions still
    /// there why (`notify`), and stops.
    fn terminate(&mut self, ctx: &mut Context<Self>, code: u32, notify: ErrorCode) {
        if let Some(cancel) = &self.cancel {
            let _ = cancel.send(Some(VarInt::from_u32(code)));
        }
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

    fn party_mut(&mut self, session: SessionId) -> Option<&mut Party> {
        if self.connector.session.id == session {
            Some(&mut self.connector)
        } else if self.listener.session.id == session {
            Some(&mut self.listener)
        } else {
            None
        }
    }

    fn maybe_splice(&mut self, ctx: &mut Context<Self>) {
        if self.state != PairState::Accepted || self.connector.stream.is_none() || self.listener.stream.is_none() {
            return;
        }
        let a = self.connector.stream.take().expect("checked above").take();
        let b = self.listener.stream.take().expect("checked above").take();
        let (tx, rx) = watch::channel(None);
        self.cancel = Some(tx);
        self.state = PairState::Spliced;
        tracing::debug!(socket = self.socket, from = %self.connector.addr, to = %self.listener.addr, "socket spliced");
        tokio::spawn(splice(a, b, rx, ctx.address()));
    }
}

impl Actor for SocketPairActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.router.add_pair(self.socket, ctx.address());
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
        ctx.run_later(self.config.accept_timeout, |act, ctx| {
            if act.state == PairState::Offered {
                act.terminate(ctx, reset_code::TIMED_OUT, ErrorCode::TimedOut);
            }
        });
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.router.remove_pair(self.socket);
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
                ctx.run_later(self.config.attach_timeout, |act, ctx| {
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
        if self.party_mut(msg.session).is_some() {
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
        let Some(party) = self.party_mut(msg.session) else { return };
        party.gone = true;
        if self.state == PairState::Offered && self.listener.gone {
            self.connect_failed(ErrorCode::Unreachable, "unreachable (the listener's session ended)");
            self.connector.gone = true; // already told; no second outcome
        }
        self.terminate(ctx, reset_code::SESSION_LOST, ErrorCode::SessionLost);
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
    cancel: watch::Receiver<Option<VarInt>>,
    pair: Addr<SocketPairActor>,
) {
    let (a_send, a_recv) = a;
    let (b_send, b_recv) = b;
    tokio::join!(pump(a_recv, b_send, cancel.clone()), pump(b_recv, a_send, cancel));
    pair.do_send(SpliceDone);
}

/// Resolves with the cancel code once the pair is terminated; never if it is not.
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

/// Copies one direction until it ends or the pair is terminated; a termination resets
/// both halves with the pair's code.
async fn pump(mut from: RecvStream, mut to: SendStream, mut cancel: watch::Receiver<Option<VarInt>>) {
    let terminated = tokio::select! {
        biased;
        code = cancelled(&mut cancel) => Some(code),
        () = copy(&mut from, &mut to) => None,
    };
    if let Some(code) = terminated {
        let _ = to.reset(code);
        let _ = from.stop(code);
    }
}

/// Copies `from` to `to`, carrying the end over faithfully: a finish (half-close) as a
/// finish, a reset as a reset with the same code, a stop as a stop, a lost connection
/// as `SESSION_LOST`.
async fn copy(from: &mut RecvStream, to: &mut SendStream) {
    let session_lost = VarInt::from_u32(reset_code::SESSION_LOST);
    let mut chunks: [Bytes; SPLICE_BATCH] = Default::default();
    loop {
        match from.read_chunks(&mut chunks).await {
            Ok(Some(n)) => {
                if let Err(e) = to.write_all_chunks(&mut chunks[..n]).await {
                    let code = match e {
                        WriteError::Stopped(code) => code,
                        _ => session_lost,
                    };
                    let _ = from.stop(code);
                    return;
                }
            }
            Ok(None) => {
                let _ = to.finish();
                return;
            }
            Err(ReadError::Reset(code)) => {
                let _ = to.reset(code);
                return;
            }
            Err(_) => {
                let _ = to.reset(session_lost);
                return;
            }
        }
    }
}
