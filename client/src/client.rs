//! The client: joins a relay with an invite and an identity, keeps the session up
//! (reconnecting with backoff, re-registering listeners and datagram ports), and
//! dispatches what the relay sends — answers to requests, incoming connections,
//! datagrams — to the sockets that wait for them.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use futures_util::StreamExt;
use overlan_shared::tls::{self, Identity};
use overlan_shared::wire::control::{ClientMessage, PeerInfo, RelayMessage, SocketId};
use overlan_shared::wire::datagram::{DatagramHeader, HEADER_LEN};
use overlan_shared::wire::frame::ClientSideCodec;
use overlan_shared::wire::{
    close_code, ErrorCode, ALPN_CLIENT, DEFAULT_MAX_CONTROL_FRAME, PROTOCOL_VERSION, RELAY_SERVER_NAME,
};
use overlan_shared::{Invite, Subnet};
use quinn::VarInt;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use crate::datagram::{Datagram, DatagramSocket};
use crate::error::Error;
use crate::stream::{Arrival, IncomingConnection, Listener, ListenerSlot, VirtualStream};

/// Default idle timeout the client asks for; the relay's own may be shorter.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle timeout with more than one relay to fail over to: a dead relay is noticed
/// within this, so the client is on its next relay within about 5 s.
pub const FAILOVER_IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a request to the relay may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a relay's name may take to resolve (a resolver's usual timeout).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// First reconnect delay; doubles up to [`MAX_BACKOFF`], each delay jittered (after a
/// relay restart, thousands of clients must not retry in lockstep).
pub const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// Longest reconnect delay (before jitter).
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest [`Client::leave`] waits for stream data to be acknowledged.
pub const LEAVE_LINGER: Duration = Duration::from_secs(3);
/// Incoming connections queued per listener before new ones are denied.
const LISTEN_BACKLOG: usize = 128;
/// Datagrams queued per socket before new ones are dropped (UDP semantics).
const DATAGRAM_QUEUE: usize = 4096;
/// Datagrams a TUN-mode client holds before it drops (a burst of full-size packets:
/// about 4.5 MB).
const TUN_QUEUE: usize = 4096;

/// How to join.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// The invite: relay address, fingerprint pin, token.
    pub invite: Invite,
    /// This client's identity (certificate and key).
    pub identity: Identity,
    /// Instance name: several instances of one identity each get their own VIP.
    pub instance: String,
    /// QUIC idle timeout to ask for.
    pub idle_timeout: Duration,
    /// Reconnect after the session is lost.
    pub reconnect: bool,
    /// Relays (`HOST:PORT`) to use instead of the invite's, in order of preference; the
    /// client moves to the next when its relay is unreachable or dies. Empty: the
    /// invite's relay.
    pub relays: Vec<String>,
    /// A lease proof a node of a cluster gave this identity and instance before
    /// ([`Client::lease`]): presented at join, it keeps the VIP on any node.
    pub lease: Option<String>,
    /// TUN mode: the session takes every datagram to its VIP and IPv4 packets
    /// ([`Client::take_tun_datagrams`], [`Client::send_raw_datagram`]).
    pub tun: bool,
    /// Join only if this identity and instance hold a VIP in the network already
    /// (to give it back); otherwise the join fails with [`Error::NoLease`].
    pub existing_only: bool,
}

impl JoinOptions {
    /// Options with defaults: no instance name, reconnect on.
    pub fn new(invite: Invite, identity: Identity) -> Self {
        Self {
            invite,
            identity,
            instance: String::new(),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            reconnect: true,
            relays: Vec::new(),
            lease: None,
            tun: false,
            existing_only: false,
        }
    }

    /// Sets the lease proof to present (from [`Client::lease`] of an earlier join).
    pub fn lease(mut self, lease: Option<String>) -> Self {
        self.lease = lease;
        self
    }

    /// Joins only with a VIP held already (see [`JoinOptions::existing_only`]).
    pub fn existing_only(mut self, existing_only: bool) -> Self {
        self.existing_only = existing_only;
        self
    }

    /// Joins in TUN mode (see [`JoinOptions::tun`]).
    pub fn tun(mut self, tun: bool) -> Self {
        self.tun = tun;
        self
    }

    /// Sets the relays to use instead of the invite's, in order of preference. With
    /// more than one, the default idle timeout becomes [`FAILOVER_IDLE_TIMEOUT`].
    pub fn relays(mut self, relays: Vec<String>) -> Self {
        if relays.len() > 1 && self.idle_timeout == DEFAULT_IDLE_TIMEOUT {
            self.idle_timeout = FAILOVER_IDLE_TIMEOUT;
        }
        self.relays = relays;
        self
    }

    /// The relays to try, in order.
    fn relay_list(&self) -> Vec<String> {
        if self.relays.is_empty() {
            vec![self.invite.relay.clone()]
        } else {
            self.relays.clone()
        }
    }

    /// Sets the instance name.
    pub fn instance(mut self, name: impl Into<String>) -> Self {
        self.instance = name.into();
        self
    }
}

/// A message the relay sent about something this client did outside a request (a
/// rejected datagram, an unknown socket id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// What went wrong.
    pub code: ErrorCode,
    /// The relay's explanation.
    pub message: String,
}

/// The session's state as seen by the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    /// Joined; sockets work.
    Up,
    /// Lost; reconnecting. Holds why it was lost.
    Reconnecting(String),
    /// Given up (replaced, unauthorized, closed). Holds why.
    Closed(String),
}

/// One live QUIC session.
#[derive(Clone)]
pub(crate) struct Session {
    pub(crate) conn: quinn::Connection,
    control: mpsc::UnboundedSender<ClientMessage>,
    pub(crate) generation: u64,
}

enum Register {
    Listener(ListenerSlot),
    Datagram(mpsc::Sender<Datagram>),
}

struct Pending {
    tx: oneshot::Sender<RelayMessage>,
    register: Option<Register>,
}

pub(crate) struct Inner {
    options: JoinOptions,
    endpoint: quinn::Endpoint,
    quic: quinn::ClientConfig,
    /// The relay in use, by index into the relay list, and its address.
    relay: Mutex<(usize, SocketAddr)>,
    /// The lease proof the relay gave (in a cluster): presented when joining another node.
    lease: Mutex<Option<String>>,
    vip: Ipv4Addr,
    network: String,
    subnet: Subnet,
    max_payload: usize,
    session: Mutex<Option<Session>>,
    state: watch::Sender<SessionState>,
    next_req: AtomicU64,
    pending: DashMap<u64, Pending>,
    pub(crate) listeners: DashMap<u16, ListenerSlot>,
    pub(crate) datagram_ports: DashMap<u16, mpsc::Sender<Datagram>>,
    /// Sockets waiting in a listener's backlog, and whether the relay has since closed
    /// them (the connecting side gave up or its session died): a listener skips those.
    pub(crate) queued: DashMap<SocketId, bool>,
    notices: broadcast::Sender<Notice>,
    shutdown: CancellationToken,
    guard: std::sync::OnceLock<std::sync::Weak<ShutdownOnDrop>>,
    /// Finished streams whose data the relay has not acknowledged yet.
    undelivered: watch::Sender<usize>,
    /// Stream sockets open (see [`Client::open_streams`]).
    pub(crate) open_streams: std::sync::atomic::AtomicUsize,
    /// When the current session was established.
    since: Mutex<std::time::SystemTime>,
    /// TUN mode: where every datagram no bound socket takes goes, raw.
    tun_sink: Option<mpsc::Sender<Bytes>>,
    tun_datagrams: Mutex<Option<mpsc::Receiver<Bytes>>>,
}

/// Counts one finished stream as undelivered until dropped.
pub(crate) struct DeliveryGuard(watch::Sender<usize>);

impl Drop for DeliveryGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

struct ShutdownOnDrop(CancellationToken);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A joined overlan client. Cheap to clone; the session ends when the last clone and
/// every socket made from it are dropped, or on [`Client::close`].
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
    _guard: Arc<ShutdownOnDrop>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("vip", &self.inner.vip).field("network", &self.inner.network).finish()
    }
}

struct Welcome {
    vip: Ipv4Addr,
    network: String,
    subnet: Subnet,
    max_payload: usize,
    lease: Option<String>,
}

fn connection_error(relay: &str, e: &quinn::ConnectionError) -> Error {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) => {
            let reason = String::from_utf8_lossy(&close.reason).into_owned();
            match close.error_code.into_inner() as u32 {
                close_code::UNAUTHORIZED => Error::Unauthorized(reason),
                close_code::NETWORK_FULL => Error::NetworkFull(reason),
                close_code::LIMIT => Error::Limit(reason),
                close_code::NO_LEASE => Error::NoLease(reason),
                close_code::REPLACED => Error::Replaced(reason),
                close_code::SHUTDOWN => Error::SessionLost(reason),
                close_code::PROTOCOL_VIOLATION => Error::Relay { code: ErrorCode::ProtocolViolation, message: reason },
                _ => Error::SessionLost(if reason.is_empty() { "closed by the relay".into() } else { reason }),
            }
        }
        quinn::ConnectionError::TimedOut => {
            Error::SessionLost(format!("relay {relay} stopped answering (idle timeout)"))
        }
        quinn::ConnectionError::LocallyClosed => Error::SessionLost("closed by this client".into()),
        // This end's TLS refused the handshake (QUIC's CRYPTO_ERROR range carries the
        // TLS alert): the relay's certificate is not the pinned one.
        quinn::ConnectionError::TransportError(error) if (0x100..0x200).contains(&u64::from(error.code)) => {
            // rustls says "unexpected error: " before what the verifier said.
            let message = error.reason.strip_prefix("unexpected error: ").unwrap_or(&error.reason);
            Error::Untrusted { relay: relay.to_owned(), message: message.to_owned() }
        }
        other => Error::Connect { relay: relay.to_owned(), message: other.to_string() },
    }
}

impl Client {
    /// Joins the relay named by `options.invite` (or the first of `options.relays` that
    /// answers); fails at once if a relay refuses.
    pub async fn join(options: JoinOptions) -> Result<Client, Error> {
        let relays = options.relay_list();
        let crypto = tls::client_config(Some(&options.identity), options.invite.fingerprint, ALPN_CLIENT)
            .map_err(|e| Error::Config(e.to_string()))?;
        let quic = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(crypto).map_err(|e| Error::Config(e.to_string()))?,
        ));
        // Each relay's connection gets its transport settings in `establish`.
        let first = resolve(&relays[0]).await;
        let ipv6 = first.as_ref().is_ok_and(|a| a.is_ipv6());
        let bind: SocketAddr = if ipv6 { "[::]:0".parse().expect("addr") } else { "0.0.0.0:0".parse().expect("addr") };
        let socket = overlan_shared::udp::bind_client(bind)
            .map_err(|e| Error::Connect { relay: relays[0].clone(), message: format!("binding a UDP socket: {e}") })?;
        match overlan_shared::udp::enlarge_buffers(&socket) {
            Ok(buffers) if buffers.recv_capped() => tracing::debug!("{}", overlan_shared::udp::capped_hint(buffers)),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "cannot read the UDP socket's buffer sizes"),
        }
        let endpoint = quinn::Endpoint::new(endpoint_config(), None, socket, Arc::new(quinn::TokioRuntime))
            .map_err(|e| Error::Connect { relay: relays[0].clone(), message: format!("binding a UDP socket: {e}") })?;
        // The first relay that admits; with one relay a refusal (bad token, limits) ends
        // the join at once, with several the others are tried first (a node may not
        // know a new invite yet), and the first refusal is what is reported.
        let mut last_error = None;
        let mut refusal = None;
        let mut joined = None;
        for (index, text) in relays.iter().enumerate() {
            let attempt = match resolve(text).await {
                Ok(addr) => establish(&endpoint, &quic, addr, text, &options, options.lease.clone())
                    .await
                    .map(|e| (index, addr, e)),
                Err(e) => Err(e),
            };
            match attempt {
                Ok(done) => {
                    joined = Some(done);
                    break;
                }
                Err(e) if e.is_terminal() && relays.len() == 1 => return Err(e),
                Err(e) if e.is_terminal() => {
                    tracing::info!(relay = %text, error = %e, "relay refused; trying the next");
                    refusal.get_or_insert(e);
                }
                Err(e) => {
                    tracing::info!(relay = %text, error = %e, "relay unavailable; trying the next");
                    last_error = Some(e);
                }
            }
        }
        let Some((index, relay, (conn, send, recv, welcome))) = joined else {
            return Err(refusal.or(last_error).expect("at least one relay was tried"));
        };
        let lease = welcome.lease.or_else(|| options.lease.clone());
        let (state, _) = watch::channel(SessionState::Up);
        let (tun_sink, tun_datagrams) = match options.tun {
            true => {
                let (tx, rx) = mpsc::channel(TUN_QUEUE);
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        let inner = Arc::new(Inner {
            options,
            endpoint,
            quic,
            relay: Mutex::new((index, relay)),
            lease: Mutex::new(lease),
            vip: welcome.vip,
            network: welcome.network,
            subnet: welcome.subnet,
            max_payload: welcome.max_payload,
            session: Mutex::new(None),
            state,
            next_req: AtomicU64::new(1),
            pending: DashMap::new(),
            listeners: DashMap::new(),
            datagram_ports: DashMap::new(),
            queued: DashMap::new(),
            notices: broadcast::channel(64).0,
            shutdown: CancellationToken::new(),
            guard: std::sync::OnceLock::new(),
            undelivered: watch::channel(0).0,
            open_streams: std::sync::atomic::AtomicUsize::new(0),
            since: Mutex::new(std::time::SystemTime::now()),
            tun_sink,
            tun_datagrams: Mutex::new(tun_datagrams),
        });
        let first = inner.install(conn, send, recv, 0);
        tokio::spawn(supervise(inner.clone(), first));
        let guard = Arc::new(ShutdownOnDrop(inner.shutdown.clone()));
        let _ = inner.guard.set(Arc::downgrade(&guard));
        Ok(Client { inner, _guard: guard })
    }

    /// This client's permanent VIP.
    pub fn vip(&self) -> Ipv4Addr {
        self.inner.vip
    }

    /// Name of the network joined.
    pub fn network(&self) -> &str {
        &self.inner.network
    }

    /// The network's subnet.
    pub fn subnet(&self) -> Subnet {
        self.inner.subnet
    }

    /// The network's directed broadcast address (255.255.255.255 works as well).
    pub fn broadcast_addr(&self) -> Ipv4Addr {
        self.inner.subnet.broadcast()
    }

    /// The exact largest datagram payload, in bytes.
    pub fn max_payload(&self) -> usize {
        self.inner.max_payload
    }

    /// In a cluster: the signed lease of this client's VIP. Keep it with the identity
    /// and pass it to [`JoinOptions::lease`] next time, so any node of the cluster gives
    /// the same VIP.
    pub fn lease(&self) -> Option<String> {
        self.inner.lease.lock().expect("lease lock").clone()
    }

    /// The UDP address of the relay in use.
    pub fn relay_addr(&self) -> SocketAddr {
        self.inner.relay.lock().expect("relay lock").1
    }

    /// The path to the relay as QUIC sees it now: the largest UDP payload it carries
    /// (path-MTU discovery: 1,452 bytes across the internet, up to 6,550 on loopback and
    /// jumbo-frame LANs) and the smoothed round-trip time. `None` between sessions.
    pub fn path(&self) -> Option<PathInfo> {
        let stats = self.inner.current()?.conn.stats();
        Some(PathInfo { mtu: stats.path.current_mtu, rtt: stats.path.rtt })
    }

    /// The session state now.
    pub fn state(&self) -> SessionState {
        self.inner.state.borrow().clone()
    }

    /// Watches the session state (up, reconnecting, closed).
    pub fn watch_state(&self) -> watch::Receiver<SessionState> {
        self.inner.state.subscribe()
    }

    /// Resolves, with the reason, once the session current now is gone: lost (the
    /// client reconnects with a new one), replaced or closed. A stream opened on it
    /// cannot outlive it; a transfer waiting on something else (stdin) learns it here.
    pub fn session_gone(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let client = self.clone();
        let since = self.since();
        let mut state = self.watch_state();
        async move {
            loop {
                let gone = match &*state.borrow_and_update() {
                    SessionState::Up if client.since() == since => None,
                    SessionState::Up => Some("the session was lost and made anew".to_owned()),
                    SessionState::Reconnecting(why) | SessionState::Closed(why) => Some(why.clone()),
                };
                if let Some(why) = gone {
                    return why;
                }
                if state.changed().await.is_err() {
                    return "the client stopped".to_owned();
                }
            }
        }
    }

    /// Waits until the client has given up on the session for good, and says why.
    pub async fn closed(&self) -> String {
        let mut rx = self.inner.state.subscribe();
        loop {
            if let SessionState::Closed(why) = &*rx.borrow_and_update() {
                return why.clone();
            }
            if rx.changed().await.is_err() {
                return "client dropped".into();
            }
        }
    }

    /// Notices the relay sends about rejected datagrams, unknown sockets and the like.
    pub fn notices(&self) -> broadcast::Receiver<Notice> {
        self.inner.notices.subscribe()
    }

    /// Leaves the network: closes the session and stops reconnecting. Sockets made from
    /// this client fail from now on.
    pub fn close(&self) {
        self.inner.shutdown.cancel();
        if let Some(s) = self.inner.current() {
            s.conn.close(VarInt::from_u32(close_code::NORMAL), b"client left");
        }
    }

    /// Leaves like [`Client::close`], but first waits (up to [`LEAVE_LINGER`]) until the
    /// relay has acknowledged every byte of the streams already finished or dropped, and
    /// then until the relay has been told, so a process can exit right after.
    pub async fn leave(&self) {
        let mut undelivered = self.inner.undelivered.subscribe();
        let _ = tokio::time::timeout(LEAVE_LINGER, undelivered.wait_for(|n| *n == 0)).await;
        self.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.endpoint.wait_idle()).await;
    }

    /// Listens for virtual stream connections on `port` (0: an ephemeral port). Like a
    /// TCP listener, connections are accepted as they arrive and queued (up to a
    /// backlog) for [`Listener::accept`]; when the backlog is full, new ones are denied.
    pub async fn listen(&self, port: u16) -> Result<Listener, Error> {
        self.listen_mode(port, true).await
    }

    /// Listens on `port`, but lets the application decide: each connection attempt
    /// arrives as an [`IncomingConnection`] from [`Listener::incoming`], to accept or
    /// deny (the connecting side then gets `Denied`).
    pub async fn listen_with_approval(&self, port: u16) -> Result<Listener, Error> {
        self.listen_mode(port, false).await
    }

    async fn listen_mode(&self, port: u16, auto_accept: bool) -> Result<Listener, Error> {
        let (tx, rx) = mpsc::channel(LISTEN_BACKLOG);
        let slot = ListenerSlot { tx, auto_accept };
        let reply =
            self.inner.request(|req| ClientMessage::Listen { req, port }, Some(Register::Listener(slot))).await?;
        match reply {
            RelayMessage::Listening { port, .. } => {
                Ok(Listener::new(self.clone(), SocketAddrV4::new(self.vip(), port), rx, auto_accept))
            }
            RelayMessage::Failed { code, message, .. } => Err(Error::from_failure(code, message, None, Some(port))),
            other => Err(unexpected(other)),
        }
    }

    /// Opens a virtual stream to `addr`.
    pub async fn connect(&self, addr: SocketAddrV4) -> Result<VirtualStream, Error> {
        let reply = self.inner.request(|req| ClientMessage::Connect { req, to: addr }, None).await?;
        match reply {
            RelayMessage::Connected { socket, local, peer, .. } => {
                let session = self.inner.session()?;
                VirtualStream::open(self.clone(), &session, socket, local, peer).await
            }
            RelayMessage::Failed { code, message, .. } => Err(Error::from_failure(code, message, Some(addr), None)),
            other => Err(unexpected(other)),
        }
    }

    /// Binds a datagram socket on `port` (0: an ephemeral port).
    pub async fn bind_datagram(&self, port: u16) -> Result<DatagramSocket, Error> {
        let (tx, rx) = mpsc::channel(DATAGRAM_QUEUE);
        let reply = self.inner.request(|req| ClientMessage::Bind { req, port }, Some(Register::Datagram(tx))).await?;
        match reply {
            RelayMessage::Bound { port, .. } => {
                Ok(DatagramSocket::new(self.clone(), SocketAddrV4::new(self.vip(), port), rx))
            }
            RelayMessage::Failed { code, message, .. } => Err(Error::from_failure(code, message, None, Some(port))),
            other => Err(unexpected(other)),
        }
    }

    /// The other members of the network the relay knows: VIP, instance name, online or
    /// not, when last seen.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, Error> {
        match self.inner.request(|req| ClientMessage::Peers { req }, None).await? {
            RelayMessage::PeerList { peers, .. } => Ok(peers),
            RelayMessage::Failed { code, message, .. } => Err(Error::from_failure(code, message, None, None)),
            other => Err(unexpected(other)),
        }
    }

    /// Gives this identity and instance's VIP back to the relay and leaves: the relay
    /// deletes the lease, so the next join gets a new VIP (as `overlan leave`). Returns
    /// the VIP given back. The client is closed afterwards, also when this fails.
    pub async fn release(&self) -> Result<Ipv4Addr, Error> {
        let answer = self.inner.request(|req| ClientMessage::Release { req }, None).await;
        self.close();
        match answer? {
            RelayMessage::Released { vip, .. } => Ok(vip),
            RelayMessage::Failed { code, message, .. } => Err(Error::from_failure(code, message, None, None)),
            other => Err(unexpected(other)),
        }
    }

    /// TUN mode: the datagrams no bound socket takes — IPv4 packets, and datagrams to
    /// any other port of this VIP or to a broadcast address — raw, header included, as
    /// they arrive (a full queue drops, as a NIC would). `None` if not joined in TUN mode,
    /// or taken already.
    pub fn take_tun_datagrams(&self) -> Option<mpsc::Receiver<Bytes>> {
        self.inner.tun_datagrams.lock().expect("tun lock").take()
    }

    /// TUN mode: sends a raw datagram — an IPv4 packet datagram, or a v1 datagram from
    /// any port of this VIP. The relay checks the source as always. Waits only while
    /// the connection's send buffer is full.
    pub async fn send_raw_datagram(&self, datagram: Bytes) -> Result<(), Error> {
        let session = self.inner.session()?;
        match session.conn.send_datagram_wait(datagram).await {
            Ok(()) => Ok(()),
            Err(quinn::SendDatagramError::TooLarge) => Err(Error::MessageTooLarge { max: self.inner.max_payload() }),
            Err(e) => Err(Error::SessionLost(e.to_string())),
        }
    }

    /// When the current session was established (the first join, or the last
    /// reconnect).
    pub fn since(&self) -> std::time::SystemTime {
        *self.inner.since.lock().expect("since lock")
    }

    /// Stream sockets open now (both halves of a split stream count once).
    pub fn open_streams(&self) -> usize {
        self.inner.open_streams.load(Ordering::Relaxed)
    }

    /// Listeners and bound datagram ports now.
    pub fn open_ports(&self) -> (usize, usize) {
        (self.inner.listeners.len(), self.inner.datagram_ports.len())
    }

    /// Round trip to the relay over the control stream.
    pub async fn ping(&self) -> Result<Duration, Error> {
        let start = std::time::Instant::now();
        // The nonce is the request id: `Pong` answers through the pending table.
        self.inner.request(|req| ClientMessage::Ping { nonce: req }, None).await?;
        Ok(start.elapsed())
    }
}

fn unexpected(msg: RelayMessage) -> Error {
    Error::Relay { code: ErrorCode::ProtocolViolation, message: format!("unexpected answer from relay: {msg:?}") }
}

/// The path to the relay: see [`Client::path`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathInfo {
    /// The largest UDP payload the path carries, in bytes.
    pub mtu: u16,
    /// Smoothed round-trip time to the relay.
    pub rtt: Duration,
}

/// The client's QUIC endpoint settings: it accepts UDP payloads up to
/// [`overlan_shared::udp::MTU_BOUND`] (quinn's default is 1,472), so a relay on a path
/// that carries them (loopback, a jumbo-frame LAN) sends larger packets. Public so
/// measurements (overlan-bench) can configure a baseline like the real path.
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    config.max_udp_payload_size(overlan_shared::udp::MTU_BOUND).expect("within QUIC's bounds");
    config
}

/// The client's QUIC transport settings: the idle timeout, keep-alives at a third of it,
/// datagrams on, path-MTU discovery up to `mtu_bound` bytes of UDP payload (the client
/// library passes [`overlan_shared::udp::mtu_bound_toward`] the relay, as the relay does
/// toward the client). The relay never opens streams toward a client
/// (the client opens every socket's stream), so none are allowed; quinn would
/// pre-allocate bookkeeping for each. Public so measurements (overlan-bench) can
/// configure a baseline like the real path.
pub fn transport_config(idle_timeout: Duration, mtu_bound: u16) -> Result<quinn::TransportConfig, Error> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(idle_timeout.try_into().map_err(|_| Error::Config("idle timeout out of range".into()))?))
        .keep_alive_interval(Some(idle_timeout / 3))
        .max_concurrent_bidi_streams(VarInt::from_u32(0))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(Some(1024 * 1024))
        .datagram_send_buffer_size(1024 * 1024)
        .stream_receive_window(VarInt::from_u32(4 << 20))
        .send_window(16 << 20)
        .mtu_discovery_config(Some({
            let mut mtu = quinn::MtuDiscoveryConfig::default();
            mtu.upper_bound(mtu_bound);
            mtu
        }))
        .ack_frequency_config(Some({
            let mut ack = quinn::AckFrequencyConfig::default();
            ack.ack_eliciting_threshold(VarInt::from_u32(7));
            ack
        }));
    Ok(transport)
}

type ControlRecv = FramedRead<quinn::RecvStream, ClientSideCodec>;

/// The address of relay `text` (`HOST:PORT`).
async fn resolve(text: &str) -> Result<SocketAddr, Error> {
    let failed = |message: String| Error::Connect { relay: text.to_owned(), message };
    tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(text))
        .await
        .map_err(|_| failed(format!("cannot resolve: no answer from DNS within {} s", RESOLVE_TIMEOUT.as_secs())))?
        .map_err(|e| failed(format!("cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| Error::Connect { relay: text.to_owned(), message: "no address".into() })
}

/// Connects to `relay` (named `relay_text`), says hello (presenting `lease`, if any)
/// and waits for the welcome.
async fn establish(
    endpoint: &quinn::Endpoint,
    quic: &quinn::ClientConfig,
    relay: SocketAddr,
    relay_text: &str,
    options: &JoinOptions,
    lease: Option<String>,
) -> Result<(quinn::Connection, quinn::SendStream, ControlRecv, Welcome), Error> {
    let relay_text = relay_text.to_owned();
    let connect_err = |message: String| Error::Connect { relay: relay_text.clone(), message };
    let mut quic = quic.clone();
    let mtu_bound = overlan_shared::udp::mtu_bound_toward(relay.ip());
    quic.transport_config(Arc::new(transport_config(options.idle_timeout, mtu_bound)?));
    let connecting = endpoint.connect_with(quic, relay, RELAY_SERVER_NAME).map_err(|e| connect_err(e.to_string()))?;
    let conn = tokio::time::timeout(REQUEST_TIMEOUT, connecting)
        .await
        .map_err(|_| Error::TimedOut(format!("relay {relay_text} did not answer the QUIC handshake")))?
        .map_err(|e| match e {
            // Nothing came back at all: not a session that was lost.
            quinn::ConnectionError::TimedOut => connect_err("no answer to the QUIC handshake".into()),
            e => connection_error(&relay_text, &e),
        })?;
    let result = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let (mut send, recv) = conn.open_bi().await.map_err(|e| connection_error(&relay_text, &e))?;
        let codec = ClientSideCodec::new(DEFAULT_MAX_CONTROL_FRAME);
        let mut buf = BytesMut::new();
        let hello = ClientMessage::Hello {
            protocol: PROTOCOL_VERSION,
            token: options.invite.token.clone(),
            instance: options.instance.clone(),
            lease,
            network: Some(options.invite.network.clone()),
            tun: options.tun,
            existing_only: options.existing_only,
        };
        codec.encode_into(&hello, &mut buf).map_err(|e| Error::Config(e.to_string()))?;
        if send.write_all(&buf).await.is_err() {
            return Err(closed_error(&conn, &relay_text));
        }
        let mut framed = FramedRead::new(recv, codec);
        match framed.next().await {
            Some(Ok(RelayMessage::Welcome { vip, network, subnet, max_datagram_payload, lease, .. })) => {
                let max_payload = max_datagram_payload as usize;
                Ok((send, framed, Welcome { vip, network, subnet, max_payload, lease }))
            }
            Some(Ok(other)) => Err(unexpected(other)),
            _ => Err(closed_error(&conn, &relay_text)),
        }
    })
    .await;
    match result {
        Ok(Ok((send, recv, welcome))) => Ok((conn, send, recv, welcome)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::TimedOut(format!("relay {relay_text} did not welcome this client"))),
    }
}

/// The error for a connection that ended, waiting briefly for the close reason.
fn closed_error(conn: &quinn::Connection, relay: &str) -> Error {
    match conn.close_reason() {
        Some(e) => connection_error(relay, &e),
        None => Error::SessionLost("control stream closed by the relay".into()),
    }
}

impl Inner {
    pub(crate) fn current(&self) -> Option<Session> {
        self.session.lock().expect("session lock").clone()
    }

    /// The live session, or why there is none.
    pub(crate) fn session(&self) -> Result<Session, Error> {
        if let Some(s) = self.current() {
            return Ok(s);
        }
        Err(match &*self.state.borrow() {
            SessionState::Up => Error::SessionLost("no session".into()),
            // The reason may say "session lost" already; the error says it once.
            SessionState::Reconnecting(why) => {
                Error::SessionLost(format!("{}; reconnecting", why.strip_prefix("session lost: ").unwrap_or(why)))
            }
            SessionState::Closed(why) => {
                Error::SessionLost(why.strip_prefix("session lost: ").unwrap_or(why).to_owned())
            }
        })
    }

    /// Counts a finished stream as undelivered until the guard is dropped.
    pub(crate) fn track_delivery(&self) -> DeliveryGuard {
        self.undelivered.send_modify(|n| *n += 1);
        DeliveryGuard(self.undelivered.clone())
    }

    pub(crate) fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// Sends a control message without waiting for an answer.
    pub(crate) fn notify(&self, msg: ClientMessage) {
        if let Some(s) = self.current() {
            let _ = s.control.send(msg);
        }
    }

    async fn request(
        &self,
        make: impl FnOnce(u64) -> ClientMessage,
        register: Option<Register>,
    ) -> Result<RelayMessage, Error> {
        let session = self.session()?;
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.insert(req, Pending { tx, register });
        if session.control.send(make(req)).is_err() {
            self.pending.remove(&req);
            return Err(self.session().err().unwrap_or_else(|| Error::SessionLost("control stream closed".into())));
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(self
                .session()
                .err()
                .unwrap_or_else(|| Error::SessionLost("session ended during the request".into()))),
            Err(_) => {
                self.pending.remove(&req);
                Err(Error::TimedOut("the relay did not answer the request".into()))
            }
        }
    }

    /// Starts the writer and datagram tasks of a new connection and makes it current.
    fn install(
        self: &Arc<Self>,
        conn: quinn::Connection,
        send: quinn::SendStream,
        recv: ControlRecv,
        generation: u64,
    ) -> (Session, ControlRecv) {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run_control_writer(send, rx));
        tokio::spawn(run_datagram_reader(conn.clone(), Arc::downgrade(self)));
        let session = Session { conn, control: tx, generation };
        *self.session.lock().expect("session lock") = Some(session.clone());
        *self.since.lock().expect("since lock") = std::time::SystemTime::now();
        self.state.send_replace(SessionState::Up);
        (session, recv)
    }

    fn dispatch(self: &Arc<Self>, session: &Session, msg: RelayMessage) {
        match msg {
            RelayMessage::Listening { req, port } => match self.pending.remove(&req) {
                Some((_, p)) => {
                    if let Some(Register::Listener(ch)) = p.register {
                        self.listeners.insert(port, ch);
                    }
                    let _ = p.tx.send(RelayMessage::Listening { req, port });
                }
                // An answer nobody waits for any more (the request timed out): give the
                // port back, unless it is a re-registration after a reconnect.
                None if !self.listeners.contains_key(&port) => {
                    let _ = session.control.send(ClientMessage::Unlisten { port });
                }
                None => {}
            },
            RelayMessage::Bound { req, port } => match self.pending.remove(&req) {
                Some((_, p)) => {
                    if let Some(Register::Datagram(ch)) = p.register {
                        self.datagram_ports.insert(port, ch);
                    }
                    let _ = p.tx.send(RelayMessage::Bound { req, port });
                }
                None if !self.datagram_ports.contains_key(&port) => {
                    let _ = session.control.send(ClientMessage::Unbind { port });
                }
                None => {}
            },
            RelayMessage::PeerList { req, .. } | RelayMessage::Released { req, .. } => {
                if let Some((_, p)) = self.pending.remove(&req) {
                    let _ = p.tx.send(msg);
                }
            }
            RelayMessage::Connected { req, .. } | RelayMessage::Failed { req, .. } => {
                if let Some((_, p)) = self.pending.remove(&req) {
                    let _ = p.tx.send(msg);
                } else if let RelayMessage::Failed { code, message, .. } = &msg {
                    // Re-registrations after a reconnect have no waiter; say what failed.
                    tracing::warn!(%code, %message, "relay refused a re-registration");
                } else if let RelayMessage::Connected { socket, .. } = msg {
                    // The requester gave up (timeout); do not leave the socket dangling.
                    let _ = session.control.send(ClientMessage::Close { socket });
                }
            }
            RelayMessage::Pong { nonce } => {
                if let Some((_, p)) = self.pending.remove(&nonce) {
                    let _ = p.tx.send(msg);
                }
            }
            RelayMessage::Incoming { socket, local, peer } => self.handle_incoming(session, socket, local, peer),
            RelayMessage::SocketClosed { socket, code } => {
                tracing::debug!(socket, %code, "socket closed by the relay");
                if let Some(mut closed) = self.queued.get_mut(&socket) {
                    *closed = true;
                }
            }
            RelayMessage::Error { code, message } => {
                tracing::warn!(%code, %message, "relay notice");
                let _ = self.notices.send(Notice { code, message });
            }
            RelayMessage::Goodbye { code, message } => {
                tracing::info!(%code, %message, "relay says goodbye");
            }
            RelayMessage::Welcome { .. } => tracing::warn!("ignoring a second welcome"),
        }
    }

    fn handle_incoming(self: &Arc<Self>, session: &Session, socket: SocketId, local: SocketAddrV4, peer: SocketAddrV4) {
        let slot = self.listeners.get(&local.port()).map(|s| s.clone());
        let client =
            self.guard.get().and_then(|g| g.upgrade()).map(|guard| Client { inner: self.clone(), _guard: guard });
        let (Some(slot), Some(client)) = (slot, client) else {
            let _ = session.control.send(ClientMessage::Deny { socket });
            return;
        };
        // Reserve a backlog place first, so a full backlog denies instead of dropping.
        let Ok(permit) = slot.tx.clone().try_reserve_owned() else {
            let _ = session.control.send(ClientMessage::Deny { socket });
            return;
        };
        self.queued.insert(socket, false);
        if !slot.auto_accept {
            permit.send(Arrival::Offer(IncomingConnection::new(socket, local, peer, session.generation)));
            return;
        }
        let _ = session.control.send(ClientMessage::Accept { socket });
        let session = session.clone();
        tokio::spawn(async move {
            let inner = client.inner.clone();
            match VirtualStream::open(client, &session, socket, local, peer).await {
                Ok(stream) => {
                    permit.send(Arrival::Stream(stream));
                }
                Err(e) => {
                    inner.queued.remove(&socket);
                    tracing::debug!(socket, error = %e, "could not open an accepted stream");
                }
            }
        });
    }

    /// Ends the client for good: listeners and datagram sockets wake with an error.
    fn give_up(&self, why: String) {
        self.listeners.clear();
        self.datagram_ports.clear();
        self.state.send_replace(SessionState::Closed(why));
    }

    /// Re-registers every listener and datagram port after a reconnect.
    fn reregister(self: &Arc<Self>, session: &Session) {
        let ports: Vec<u16> = self.listeners.iter().map(|e| *e.key()).collect();
        for port in ports {
            let req = self.next_req.fetch_add(1, Ordering::Relaxed);
            let _ = session.control.send(ClientMessage::Listen { req, port });
        }
        let ports: Vec<u16> = self.datagram_ports.iter().map(|e| *e.key()).collect();
        for port in ports {
            let req = self.next_req.fetch_add(1, Ordering::Relaxed);
            let _ = session.control.send(ClientMessage::Bind { req, port });
        }
    }
}

async fn run_control_writer(mut send: quinn::SendStream, mut rx: mpsc::UnboundedReceiver<ClientMessage>) {
    let codec = ClientSideCodec::new(DEFAULT_MAX_CONTROL_FRAME);
    let mut buf = BytesMut::new();
    while let Some(msg) = rx.recv().await {
        let mut next = Some(msg);
        while let Some(msg) = next.take() {
            if let Err(e) = codec.encode_into(&msg, &mut buf) {
                tracing::error!(error = %e, "dropping unencodable control message");
            }
            next = rx.try_recv().ok();
        }
        if send.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
    }
    let _ = send.finish();
}

async fn run_datagram_reader(conn: quinn::Connection, inner: std::sync::Weak<Inner>) {
    while let Ok(bytes) = conn.read_datagram().await {
        let Some(inner) = inner.upgrade() else { return };
        let Ok(header) = DatagramHeader::parse(&bytes) else {
            // An IPv4 packet (TUN mode).
            if let Some(sink) = &inner.tun_sink {
                let _ = sink.try_send(bytes);
            }
            continue;
        };
        let delivered = match inner.datagram_ports.get(&header.dst.port()) {
            Some(ch) => {
                let _ = ch.try_send(Datagram { payload: bytes.slice(HEADER_LEN..), src: header.src, dst: header.dst });
                true
            }
            None => false,
        };
        // No socket bound to the port: a TUN session takes it (any port of its VIP).
        if let (false, Some(sink)) = (delivered, &inner.tun_sink) {
            let _ = sink.try_send(bytes);
        }
    }
}

/// Runs sessions until the client gives up: dispatches control messages, and when a
/// session ends fails what waits on it and reconnects with backoff.
async fn supervise(inner: Arc<Inner>, first: (Session, ControlRecv)) {
    let relays = inner.options.relay_list();
    let (mut session, mut recv) = first;
    loop {
        let relay_text = relays[inner.relay.lock().expect("relay lock").0].clone();
        let end = tokio::select! {
            _ = inner.shutdown.cancelled() => None,
            end = async {
                while let Some(item) = recv.next().await {
                    match item {
                        // Replaced by a newer session of this identity and instance: the
                        // relay says so on the control stream (delivered even if the
                        // connection's close is lost) before it closes.
                        Ok(RelayMessage::Goodbye { code: ErrorCode::Replaced, message }) => {
                            tracing::info!(%message, "relay says goodbye");
                            return Some(Error::Replaced(message));
                        }
                        Ok(msg) => inner.dispatch(&session, msg),
                        Err(e) => {
                            if !inner.shutdown.is_cancelled() && session.conn.close_reason().is_none() {
                                tracing::warn!(error = %e, "bad control frame from relay");
                            }
                            break;
                        }
                    }
                }
                // The control stream ended; wait for the connection's close reason.
                let reason = tokio::time::timeout(Duration::from_secs(2), session.conn.closed()).await;
                Some(match reason {
                    Ok(e) => connection_error(&relay_text, &e),
                    Err(_) => Error::SessionLost("control stream closed by the relay".into()),
                })
            } => end,
        };
        *inner.session.lock().expect("session lock") = None;
        inner.pending.clear();
        let end = end.filter(|_| !inner.shutdown.is_cancelled());
        let Some(error) = end else {
            session.conn.close(VarInt::from_u32(close_code::NORMAL), b"client left");
            inner.give_up("closed by this client".into());
            return;
        };
        session.conn.close(VarInt::from_u32(close_code::NORMAL), b"session ended");
        let why = error.to_string();
        // Info, not warn: the application is told through the session state (the CLI
        // prints it once); a warning here would say the same thing twice.
        tracing::info!(reason = %why, "session lost");
        if error.is_terminal() || !inner.options.reconnect {
            inner.give_up(why);
            return;
        }
        inner.state.send_replace(SessionState::Reconnecting(why));
        let mut delays = reconnect_delays();
        let generation = session.generation + 1;
        // With several relays, the next one is tried at once, then the others in turn
        // (the one just lost last); a full round without success waits a backoff.
        let (current, n) = (inner.relay.lock().expect("relay lock").0, relays.len());
        let mut backoff = Duration::ZERO;
        let mut refused_in_round = 0;
        for attempt in 0usize.. {
            let index = (current + 1 + attempt) % n;
            if attempt % n == 0 {
                refused_in_round = 0;
            }
            if n == 1 || (attempt > 0 && attempt % n == 0) {
                backoff = delays.next().unwrap_or(MAX_BACKOFF);
                tokio::select! {
                    _ = inner.shutdown.cancelled() => {
                        inner.give_up("closed by this client".into());
                        return;
                    }
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
            let text = &relays[index];
            let lease = inner.lease.lock().expect("lease lock").clone();
            let attempt = match resolve(text).await {
                Ok(addr) => establish(&inner.endpoint, &inner.quic, addr, text, &inner.options, lease)
                    .await
                    .map(|established| (addr, established)),
                Err(e) => Err(e),
            };
            match attempt {
                Ok((addr, (conn, send, new_recv, welcome))) => {
                    *inner.relay.lock().expect("relay lock") = (index, addr);
                    if welcome.lease.is_some() {
                        *inner.lease.lock().expect("lease lock") = welcome.lease.clone();
                    }
                    if welcome.vip != inner.vip {
                        // Every socket is bound to the old VIP; carrying on would only
                        // produce rejected datagrams. A relay that lost its leases needs
                        // the application to join again.
                        conn.close(VarInt::from_u32(close_code::NORMAL), b"VIP changed");
                        inner.give_up(format!(
                            "the relay now gives this identity {} instead of {}; join again",
                            welcome.vip, inner.vip
                        ));
                        return;
                    }
                    let (s, r) = inner.install(conn, send, new_recv, generation);
                    inner.reregister(&s);
                    tracing::info!(vip = %inner.vip, relay = %text, "session re-established");
                    session = s;
                    recv = r;
                    break;
                }
                // Refused for good by the only relay, or by every relay of a round.
                Err(e) if e.is_terminal() && (n == 1 || refused_in_round + 1 >= n) => {
                    inner.give_up(e.to_string());
                    return;
                }
                Err(e) if e.is_terminal() => {
                    refused_in_round += 1;
                    tracing::info!(relay = %text, error = %e, "relay refused; trying the next");
                }
                Err(e) => {
                    tracing::info!(error = %e, retry_in = ?backoff, "reconnect failed");
                    inner.state.send_replace(SessionState::Reconnecting(e.to_string()));
                }
            }
        }
    }
}

/// Reconnect delays: from [`MIN_BACKOFF`] doubling to [`MAX_BACKOFF`], each with up to
/// its own length again of random jitter, without end.
fn reconnect_delays() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(MIN_BACKOFF)
        .with_max_delay(MAX_BACKOFF)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delays_grow_with_jitter() {
        let runs: Vec<Vec<Duration>> = (0..8).map(|_| reconnect_delays().take(12).collect()).collect();
        for delays in &runs {
            assert!(delays[0] >= MIN_BACKOFF && delays[0] <= MIN_BACKOFF * 2, "{delays:?}");
            assert!(delays[11] >= MAX_BACKOFF && delays[11] <= MAX_BACKOFF * 2, "capped: {delays:?}");
        }
        assert!(runs.iter().any(|d| d != &runs[0]), "jittered: clients do not retry in lockstep");
    }
}
