//! Virtual stream sockets: [`Listener`] (like `tokio::net::TcpListener`),
//! [`IncomingConnection`] (accept or deny), and [`VirtualStream`], which implements
//! `AsyncRead + AsyncWrite` over its own QUIC stream, so codecs and protocols written
//! for TCP run over it unchanged.

use std::io;
use std::net::SocketAddrV4;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use overlan_shared::wire::control::{ClientMessage, SocketId};
use overlan_shared::wire::reset_code;
use overlan_shared::wire::stream::StreamHeader;
use quinn::{ReadError, VarInt, WriteError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, Mutex};

use crate::client::{Client, Session};
use crate::error::Error;

/// What a listener's queue holds.
#[derive(Debug)]
pub(crate) enum Arrival {
    /// A connection waiting for the application's accept or deny.
    Offer(IncomingConnection),
    /// A connection the library accepted on arrival.
    Stream(VirtualStream),
}

/// Where the dispatcher puts a listener's arrivals.
#[derive(Debug, Clone)]
pub(crate) struct ListenerSlot {
    pub(crate) tx: mpsc::Sender<Arrival>,
    pub(crate) auto_accept: bool,
}

/// A stream listener on a virtual port. Dropping it stops listening.
#[derive(Debug)]
pub struct Listener {
    client: Client,
    local: SocketAddrV4,
    auto_accept: bool,
    rx: Mutex<mpsc::Receiver<Arrival>>,
}

impl Listener {
    pub(crate) fn new(client: Client, local: SocketAddrV4, rx: mpsc::Receiver<Arrival>, auto_accept: bool) -> Self {
        Self { client, local, auto_accept, rx: Mutex::new(rx) }
    }

    /// The listening address (VIP and port).
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// The next arrival that is still alive: connections the relay closed while they
    /// waited in the backlog (the connecting side gave up, or its session died before
    /// the stream was established) are dropped here, never handed out.
    async fn next(&self) -> Result<Arrival, Error> {
        let mut rx = self.rx.lock().await;
        loop {
            let arrival = rx.recv().await.ok_or_else(|| Error::SessionLost("listener closed".into()))?;
            let socket = match &arrival {
                Arrival::Offer(offer) => offer.socket,
                Arrival::Stream(stream) => stream.socket,
            };
            let queued = &self.client.inner.queued;
            if queued.get(&socket).is_some_and(|closed| *closed) {
                queued.remove(&socket);
                tracing::debug!(socket, "skipping a connection the relay closed while it waited in the backlog");
                if let Arrival::Stream(stream) = arrival {
                    stream.abort();
                }
                continue;
            }
            // An offer stays tracked until it is answered (the relay may still close it).
            if matches!(arrival, Arrival::Stream(_)) {
                queued.remove(&socket);
            }
            return Ok(arrival);
        }
    }

    /// Waits for the next connection attempt, to accept or deny. Only for listeners
    /// made with [`Client::listen_with_approval`].
    pub async fn incoming(&self) -> Result<IncomingConnection, Error> {
        if self.auto_accept {
            return Err(Error::Config(
                "this listener accepts connections on arrival; use Client::listen_with_approval to decide per connection".into(),
            ));
        }
        match self.next().await? {
            Arrival::Offer(incoming) => Ok(incoming.with_client(self.client.clone())),
            Arrival::Stream(_) => unreachable!("approval listeners only queue offers"),
        }
    }

    /// Accepts the next connection: the stream and the peer's address.
    pub async fn accept(&self) -> Result<(VirtualStream, SocketAddrV4), Error> {
        loop {
            match self.next().await? {
                Arrival::Stream(stream) => {
                    let peer = stream.peer_addr();
                    return Ok((stream, peer));
                }
                Arrival::Offer(incoming) => {
                    let incoming = incoming.with_client(self.client.clone());
                    let peer = incoming.peer_addr();
                    match incoming.accept().await {
                        Ok(stream) => return Ok((stream, peer)),
                        // The session changed between offer and accept: wait for the next.
                        Err(Error::SessionLost(why)) if self.client.inner.current().is_some() => {
                            tracing::debug!(%why, "dropping an offer from a previous session");
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Connections queued and never accepted are refused or reset, not left to end
        // cleanly (the connecting side would read a normal end of stream).
        if let Ok(mut rx) = self.rx.try_lock() {
            rx.close();
            while let Ok(arrival) = rx.try_recv() {
                let socket = match &arrival {
                    Arrival::Offer(offer) => offer.socket,
                    Arrival::Stream(stream) => stream.socket,
                };
                self.client.inner.queued.remove(&socket);
                match arrival {
                    Arrival::Offer(offer) => offer.with_client(self.client.clone()).deny(),
                    Arrival::Stream(stream) => stream.abort(),
                }
            }
        }
        let port = self.local.port();
        self.client.inner.listeners.remove(&port);
        self.client.inner.notify(ClientMessage::Unlisten { port });
    }
}

/// A connection attempt to one of this client's listeners. Dropping it denies it.
#[derive(Debug)]
pub struct IncomingConnection {
    socket: SocketId,
    local: SocketAddrV4,
    peer: SocketAddrV4,
    generation: u64,
    client: Option<Client>,
}

impl IncomingConnection {
    pub(crate) fn new(socket: SocketId, local: SocketAddrV4, peer: SocketAddrV4, generation: u64) -> Self {
        Self { socket, local, peer, generation, client: None }
    }

    fn with_client(mut self, client: Client) -> Self {
        self.client = Some(client);
        self
    }

    /// The connecting side's relay-stamped address.
    pub fn peer_addr(&self) -> SocketAddrV4 {
        self.peer
    }

    /// The listener's address.
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    fn live_session(&self) -> Result<(Client, Session), Error> {
        let client = self.client.clone().ok_or_else(|| Error::SessionLost("no client".into()))?;
        let session = client.inner.session()?;
        if session.generation != self.generation {
            return Err(Error::SessionLost("the session that received this connection has ended".into()));
        }
        Ok((client, session))
    }

    /// Accepts: the connecting side's `connect` succeeds and bytes can flow. Fails if
    /// the connecting side gave up (or its session ended) while the offer waited.
    pub async fn accept(mut self) -> Result<VirtualStream, Error> {
        let (client, session) = self.live_session()?;
        self.client = None; // answered; no deny on drop
        if client.inner.queued.remove(&self.socket).is_some_and(|(_, closed)| closed) {
            return Err(Error::SessionLost(format!(
                "the connection from {} was abandoned before it was accepted",
                self.peer
            )));
        }
        client.inner.notify(ClientMessage::Accept { socket: self.socket });
        VirtualStream::open(client, &session, self.socket, self.local, self.peer).await
    }

    /// Denies: the connecting side's `connect` fails with `Denied`.
    pub fn deny(mut self) {
        if let Ok((client, _)) = self.live_session() {
            client.inner.queued.remove(&self.socket);
            client.inner.notify(ClientMessage::Deny { socket: self.socket });
        }
        self.client = None;
    }
}

impl Drop for IncomingConnection {
    fn drop(&mut self) {
        if let Ok((client, _)) = self.live_session() {
            client.inner.queued.remove(&self.socket);
            client.inner.notify(ClientMessage::Deny { socket: self.socket });
        }
    }
}

/// A connected virtual stream: reliable, ordered bytes both ways.
///
/// `shutdown()` half-closes (the peer reads EOF, and may still send); dropping closes
/// both directions gracefully; [`VirtualStream::abort`] resets both at once, which the
/// peer sees as an error. A lost peer session surfaces as an error on read and write.
#[derive(Debug)]
pub struct VirtualStream {
    read: VirtualReadHalf,
    write: VirtualWriteHalf,
    socket: SocketId,
    local: SocketAddrV4,
    generation: u64,
}

impl VirtualStream {
    pub(crate) async fn open(
        client: Client,
        session: &Session,
        socket: SocketId,
        local: SocketAddrV4,
        peer: SocketAddrV4,
    ) -> Result<Self, Error> {
        let lost =
            |e: &dyn std::fmt::Display| Error::SessionLost(format!("opening the stream of socket {socket}: {e}"));
        let opened = tokio::time::timeout(crate::client::REQUEST_TIMEOUT, session.conn.open_bi()).await;
        let (mut send, recv) = opened
            .map_err(|_| Error::TimedOut(format!("the relay allowed no stream for socket {socket}")))?
            .map_err(|e| lost(&e))?;
        send.write_all(&StreamHeader { socket }.to_bytes()).await.map_err(|e| lost(&e))?;
        let slot = Arc::new(OpenStream::new(client.clone()));
        Ok(Self {
            read: VirtualReadHalf { recv, peer, _client: client.clone(), _open: slot.clone() },
            write: VirtualWriteHalf { send: Some(send), peer, aborted: false, _client: client, _open: slot },
            socket,
            local,
            generation: session.generation,
        })
    }

    /// This side's address.
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddrV4 {
        self.write.peer
    }

    /// The relay's id of this socket.
    pub fn socket_id(&self) -> SocketId {
        self.socket
    }

    /// Resets both directions at once; the peer's reads and writes fail with
    /// "connection aborted by the peer". Bytes not yet delivered are discarded.
    pub fn abort(mut self) {
        let code = VarInt::from_u32(reset_code::ABORTED);
        let _ = self.write.send().reset(code);
        self.write.aborted = true;
        let _ = self.read.recv.stop(code);
        // The reset may overtake the stream's header on the wire; the control message
        // makes sure the relay tears the pair down either way.
        let inner = &self.write._client.inner;
        if inner.current().is_some_and(|s| s.generation == self.generation) {
            inner.notify(ClientMessage::Close { socket: self.socket });
        }
    }

    /// Splits into owned read and write halves.
    pub fn into_split(self) -> (VirtualReadHalf, VirtualWriteHalf) {
        (self.read, self.write)
    }
}

fn map_read_error(e: io::Error, peer: SocketAddrV4) -> io::Error {
    let Some(read) = e.get_ref().and_then(|inner| inner.downcast_ref::<ReadError>()) else {
        return e;
    };
    match read {
        ReadError::Reset(code) => io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("connection to {peer}: {}", reset_code::describe(code.into_inner())),
        ),
        ReadError::ConnectionLost(c) => {
            io::Error::new(io::ErrorKind::NotConnected, format!("connection to {peer}: session lost ({c})"))
        }
        _ => e,
    }
}

fn map_write_error(e: WriteError, peer: SocketAddrV4) -> io::Error {
    match e {
        WriteError::Stopped(code) if code.into_inner() == 0 => {
            io::Error::new(io::ErrorKind::BrokenPipe, format!("connection to {peer}: the peer closed the socket"))
        }
        WriteError::Stopped(code) => io::Error::new(
            io::ErrorKind::BrokenPipe,
            format!("connection to {peer}: {}", reset_code::describe(code.into_inner())),
        ),
        WriteError::ConnectionLost(c) => {
            io::Error::new(io::ErrorKind::NotConnected, format!("connection to {peer}: session lost ({c})"))
        }
        other => other.into(),
    }
}

fn poll_read_mapped(
    recv: &mut quinn::RecvStream,
    peer: SocketAddrV4,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    Pin::new(recv).poll_read(cx, buf).map_err(|e| map_read_error(e, peer))
}

fn poll_write_mapped(
    send: &mut quinn::SendStream,
    peer: SocketAddrV4,
    cx: &mut Context<'_>,
    buf: &[u8],
) -> Poll<io::Result<usize>> {
    Pin::new(send).poll_write(cx, buf).map_err(|e| map_write_error(e, peer))
}

impl AsyncRead for VirtualStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().read).poll_read(cx, buf)
    }
}

impl AsyncWrite for VirtualStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().write).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_shutdown(cx)
    }
}

/// The read half of a [`VirtualStream`].
#[derive(Debug)]
pub struct VirtualReadHalf {
    recv: quinn::RecvStream,
    peer: SocketAddrV4,
    _client: Client,
    _open: Arc<OpenStream>,
}

/// Counts a stream as open (in [`Client::open_streams`]) until both its halves are gone.
#[derive(Debug)]
pub(crate) struct OpenStream(Client);

impl OpenStream {
    fn new(client: Client) -> Self {
        client.inner.open_streams.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(client)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.inner.open_streams.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl AsyncRead for VirtualReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        poll_read_mapped(&mut this.recv, this.peer, cx, buf)
    }
}

/// The write half of a [`VirtualStream`]; `shutdown()` half-closes.
#[derive(Debug)]
pub struct VirtualWriteHalf {
    /// Taken only by `drop`.
    send: Option<quinn::SendStream>,
    peer: SocketAddrV4,
    /// Reset by `abort`: what remains to deliver is the reset itself.
    aborted: bool,
    _client: Client,
    _open: Arc<OpenStream>,
}

impl VirtualReadHalf {
    /// Reads what arrived into `chunks` as the library holds it, without copying (a
    /// bulk reader that passes the pieces on, as `overlan nc` does to its stdout): the
    /// number of chunks filled, at least one, or `None` at the clean end. Errors as
    /// `read`'s.
    pub async fn read_chunks(&mut self, chunks: &mut [Bytes]) -> io::Result<Option<usize>> {
        let peer = self.peer;
        self.recv.read_chunks(chunks).await.map_err(|e| map_read_error(e.into(), peer))
    }

    /// Stops reading: the peer's writes fail with "connection aborted by the peer".
    pub fn abort(mut self) {
        let _ = self.recv.stop(VarInt::from_u32(reset_code::ABORTED));
    }
}

impl VirtualWriteHalf {
    fn send(&mut self) -> &mut quinn::SendStream {
        self.send.as_mut().expect("the send stream is taken only on drop")
    }

    /// Writes all of `data` without copying it: the library keeps the buffer until the
    /// relay has acknowledged it (a bulk writer that fills buffers of its own, as
    /// `overlan nc` does from its stdin). Errors as `write`'s.
    pub async fn write_chunk(&mut self, data: Bytes) -> io::Result<()> {
        let peer = self.peer;
        self.send().write_chunk(data).await.map_err(|e| map_write_error(e, peer))
    }

    /// Resets this direction: the peer's reads fail with "connection aborted by the
    /// peer" instead of seeing a clean end, and bytes not yet delivered are discarded.
    pub fn abort(mut self) {
        let reset = self.send().reset(VarInt::from_u32(reset_code::ABORTED));
        self.aborted = true;
        tracing::debug!(peer = %self.peer, ?reset, "write half aborted");
    }

    /// Waits until the relay has acknowledged every byte written and the end of the
    /// stream (call after `shutdown()`). From then on the relay delivers them to the
    /// peer even if this client leaves at once, the way a kernel delivers what a TCP
    /// socket accepted before `close()`. Fails if the peer stopped reading or its
    /// session ended first, or if the session with the relay was lost.
    pub async fn delivered(&mut self) -> io::Result<()> {
        match self.send().stopped().await {
            Ok(None) => Ok(()),
            Ok(Some(code)) => Err(map_write_error(WriteError::Stopped(code), self.peer)),
            Err(quinn::StoppedError::ConnectionLost(c)) => {
                Err(map_write_error(WriteError::ConnectionLost(c), self.peer))
            }
            Err(e) => Err(io::Error::other(e)),
        }
    }
}

impl VirtualStream {
    /// See [`VirtualWriteHalf::delivered`].
    pub async fn delivered(&mut self) -> io::Result<()> {
        self.write.delivered().await
    }
}

impl Drop for VirtualWriteHalf {
    /// Finishes the stream (quinn would too) unless it was aborted, and keeps the client
    /// from leaving until the relay has acknowledged everything written, or the reset, so
    /// `Client::leave` right after a transfer or an abort loses neither: the peer reads
    /// every byte and a clean end, or "aborted", never "session lost" instead.
    fn drop(&mut self) {
        let Some(mut send) = self.send.take() else { return };
        if !self.aborted {
            let _ = send.finish();
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let delivery = self._client.inner.track_delivery();
        let aborted = self.aborted;
        runtime.spawn(async move {
            if aborted {
                // `stopped()` resolves once the stream is gone from quinn's tables, but
                // quinn wakes it for acknowledged data, not for an acknowledged reset; a
                // fresh call checks the state again. A lost connection ends it too.
                while tokio::time::timeout(RESET_RECHECK, send.stopped()).await.is_err() {}
            } else {
                let _ = send.stopped().await;
            }
            drop(delivery);
        });
    }
}

/// How often an aborted stream checks whether its reset was acknowledged.
const RESET_RECHECK: std::time::Duration = std::time::Duration::from_millis(5);

impl AsyncWrite for VirtualWriteHalf {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        poll_write_mapped(this.send.as_mut().expect("taken only on drop"), this.peer, cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().send()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().send()).poll_shutdown(cx)
    }
}
