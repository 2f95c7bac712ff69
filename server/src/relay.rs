//! Starting a relay: state directory, certificate, database, QUIC endpoint, the accept
//! loop and the handshake that turns a QUIC connection into a `SessionActor`. The relay
//! runs in its own actix `System` on a multi-threaded tokio runtime, so the session
//! actors stay on the arbiter while quinn and the data-path tasks use every core.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use anyhow::Context as _;
use futures_util::StreamExt;
use overlan_shared::config::Secret;
use overlan_shared::invite::Invite;
use overlan_shared::tls::{self, Fingerprint, Identity};
use overlan_shared::wire::control::ClientMessage;
use overlan_shared::wire::frame::RelaySideCodec;
use overlan_shared::wire::{close_code, ALPN_CLIENT, PROTOCOL_VERSION, RELAY_SERVER_NAME};
use quinn::VarInt;
use tokio::sync::oneshot;
use tokio_util::codec::FramedRead;

use crate::allocator::{AdmitError, AllocateVip, VipAllocatorActor};
use crate::config::RelayConfig;
use crate::router::Router;
use crate::session::{SessionActor, SessionParts};
use crate::store::{Store, DEFAULT_NETWORK};

/// File name of the relay's certificate and key inside the data directory.
pub const RELAY_IDENTITY_FILE: &str = "relay.pem";

/// What a started relay tells its owner.
#[derive(Debug, Clone)]
pub struct RelayInfo {
    /// The bound QUIC address.
    pub local_addr: SocketAddr,
    /// The relay certificate's SHA-256 fingerprint.
    pub fingerprint: Fingerprint,
    /// The default network's reusable invite, unless the operator revoked it.
    pub default_invite: Option<Invite>,
}

/// A running relay; dropping it shuts the relay down.
pub struct RelayHandle {
    info: RelayInfo,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RelayHandle {
    /// Starts a relay on its own thread and waits until it listens.
    pub fn start(config: RelayConfig) -> anyhow::Result<Self> {
        config.validate()?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("overlan-relay".into())
            .spawn(move || {
                let system = actix_rt::System::with_tokio_rt(|| {
                    tokio::runtime::Builder::new_multi_thread()
                        .enable_all()
                        .thread_name("overlan-relay-io")
                        .build()
                        .expect("building the tokio runtime")
                });
                system.block_on(async move {
                    match prepare(config).await {
                        Ok((prepared, info)) => {
                            let _ = ready_tx.send(Ok(info));
                            serve(prepared, shutdown_rx).await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })
            .context("spawning the relay thread")?;
        let info = ready_rx.recv().context("relay thread ended before it was ready")??;
        Ok(Self { info, shutdown: Some(shutdown_tx), thread: Some(thread) })
    }

    /// What the relay is.
    pub fn info(&self) -> &RelayInfo {
        &self.info
    }

    /// The bound QUIC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.info.local_addr
    }

    /// Stops the relay: every session is closed, then the thread ends.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Prepared {
    config: Arc<RelayConfig>,
    endpoint: quinn::Endpoint,
    allocator: Addr<VipAllocatorActor>,
    router: Arc<Router>,
}

/// The default network's invite token: derived from the relay key, so it is stable
/// across restarts without storing the token itself (only its hash is stored).
pub fn default_invite_token(identity: &Identity, network: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, identity.key_der());
    let tag = ring::hmac::sign(&key, format!("overlan default invite v1:{network}").as_bytes());
    tag.as_ref()[..20].iter().map(|b| format!("{b:02x}")).collect()
}

/// Loads or creates the relay identity in `data_dir`.
pub fn load_identity(data_dir: &Path) -> anyhow::Result<Identity> {
    let (identity, created) = Identity::load_or_create(&data_dir.join(RELAY_IDENTITY_FILE), &[RELAY_SERVER_NAME])?;
    if created {
        tracing::info!(fingerprint = %identity.fingerprint(), "created relay certificate");
    }
    Ok(identity)
}

/// Opens the database in the data directory (creating both if needed), with the
/// `default` network in it.
pub fn open_store(config: &RelayConfig) -> anyhow::Result<Store> {
    let store = Store::open(&config.data_dir)?;
    store.ensure_default_network(config.default_subnet)?;
    Ok(store)
}

/// A relay's state directory, opened: what the relay runs with and what the operator
/// commands work on. Blocking (file and database I/O).
pub struct RelayState {
    /// The relay certificate and key.
    pub identity: Identity,
    /// The database.
    pub store: Store,
    /// The default network's reusable invite token, unless the operator revoked it.
    pub default_token: Option<String>,
}

impl RelayState {
    /// Opens (creating on first use) the identity, the database and the default invite.
    pub fn open(config: &RelayConfig) -> anyhow::Result<Self> {
        let identity = load_identity(&config.data_dir)?;
        let store = open_store(config)?;
        let token = default_invite_token(&identity, DEFAULT_NETWORK);
        store.add_invite(DEFAULT_NETWORK, &token, "default", None, None)?;
        let default_token = (!store.invite_revoked(&token)?).then_some(token);
        Ok(Self { identity, store, default_token })
    }

    /// The invite URI for `token` into `network`, naming the relay as `relay`.
    pub fn invite(&self, relay: String, network: &str, token: String) -> Invite {
        Invite {
            relay,
            network: network.to_owned(),
            fingerprint: self.identity.fingerprint(),
            token: Secret::new(token),
        }
    }

    /// The default network's invite, for a relay reachable at `relay`.
    pub fn default_invite(&self, relay: String) -> Option<Invite> {
        self.default_token.clone().map(|token| self.invite(relay, DEFAULT_NETWORK, token))
    }
}

async fn prepare(config: RelayConfig) -> anyhow::Result<(Prepared, RelayInfo)> {
    let state = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || RelayState::open(&config)).await??
    };

    let crypto = tls::server_config(&state.identity, ALPN_CLIENT)?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(crypto).context("QUIC TLS configuration")?,
    ));
    server_config.transport_config(Arc::new(transport_config(config.idle_timeout)?));
    let endpoint = quinn::Endpoint::server(server_config, config.listen)
        .with_context(|| format!("binding QUIC on {}", config.listen))?;
    let local_addr = endpoint.local_addr()?;
    let fingerprint = state.identity.fingerprint();
    let default_invite = state.default_invite(config.invite_addr(local_addr));

    let data_dir = config.data_dir.clone();
    let allocator = SyncArbiter::start(1, move || {
        VipAllocatorActor::open(&data_dir).expect("the lease database opened a moment ago")
    });
    let prepared = Prepared { config: Arc::new(config), endpoint, allocator, router: Arc::new(Router::default()) };
    Ok((prepared, RelayInfo { local_addr, fingerprint, default_invite }))
}

/// Concurrent QUIC streams (one per virtual socket) a new session may open. quinn
/// pre-allocates bookkeeping for every stream it allows (about 60 bytes each), so idle
/// sessions start small; a session raises its own limit as its sockets grow, up to
/// [`MAX_STREAMS_PER_SESSION`].
pub const INITIAL_STREAMS_PER_SESSION: u32 = 4;
/// Most virtual streams one client may have open through the relay at once; beyond it,
/// `connect` waits until one closes.
pub const MAX_STREAMS_PER_SESSION: u32 = 4096;

/// Flow-control window of one virtual stream (bytes in flight per direction and hop).
/// Larger than quinn's 1.25 MB default: measured +15% relay throughput on loopback.
pub const STREAM_WINDOW: u32 = 4 << 20;
/// Flow-control window of a whole session: caps what one client can make the relay
/// buffer at once, whatever its number of streams (quinn's default is unlimited).
pub const SESSION_RECEIVE_WINDOW: u32 = 16 << 20;

/// Ask peers to acknowledge every 8th ack-eliciting packet instead of every 2nd (the
/// QUIC ACK frequency extension; both ends are quinn): fewer ACK packets to build,
/// send, receive and process per byte relayed.
pub fn ack_frequency() -> quinn::AckFrequencyConfig {
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(VarInt::from_u32(7));
    ack
}

/// QUIC transport settings of the relay: idle timeout with keep-alives at a third of it,
/// [`INITIAL_STREAMS_PER_SESSION`] concurrent streams to begin with, datagrams on, and
/// no path-MTU discovery: the datagram maximum is fixed for the minimum QUIC MTU anyway,
/// and discovery costs every idle session about 2 KiB (probe state, a larger send
/// buffer) — measured with `overlan-bench`, see BENCHMARKS.md.
pub fn transport_config(idle_timeout: Duration) -> anyhow::Result<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(idle_timeout.try_into().context("idle timeout out of range")?))
        .keep_alive_interval(Some(idle_timeout / 3))
        .max_concurrent_bidi_streams(VarInt::from_u32(INITIAL_STREAMS_PER_SESSION))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(Some(1024 * 1024))
        .datagram_send_buffer_size(1024 * 1024)
        .mtu_discovery_config(None)
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(SESSION_RECEIVE_WINDOW))
        .send_window(u64::from(SESSION_RECEIVE_WINDOW))
        .ack_frequency_config(Some(ack_frequency()));
    Ok(transport)
}

async fn serve(prepared: Prepared, mut shutdown: oneshot::Receiver<()>) {
    let Prepared { config, endpoint, allocator, router } = prepared;
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                actix_rt::spawn(handshake(incoming, config.clone(), allocator.clone(), router.clone()));
            }
            _ = &mut shutdown => break,
        }
    }
    tracing::info!("relay shutting down");
    endpoint.close(VarInt::from_u32(close_code::SHUTDOWN), b"relay shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    System::current().stop();
}

/// The fingerprint of the client certificate, if the client presented one.
fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let certs = conn.peer_identity()?.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>().ok()?;
    certs.first().map(|c| Fingerprint::of(c))
}

fn refuse(conn: &quinn::Connection, code: u32, reason: &str) {
    tracing::info!(peer = %conn.remote_address(), reason, "refusing client");
    conn.close(VarInt::from_u32(code), reason.as_bytes());
}

async fn handshake(
    incoming: quinn::Incoming,
    config: Arc<RelayConfig>,
    allocator: Addr<VipAllocatorActor>,
    router: Arc<Router>,
) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::debug!(%remote, error = %e, "QUIC handshake failed");
            return;
        }
    };
    let Some(identity) = peer_fingerprint(&conn) else {
        return refuse(
            &conn,
            close_code::UNAUTHORIZED,
            "unauthorized: a client certificate is required (overlan clients present their identity certificate)",
        );
    };
    let hello = tokio::time::timeout(config.hello_timeout, async {
        let (send, recv) = conn.accept_bi().await.ok()?;
        // Control frames are small; start the buffer small (it grows for a large frame).
        let mut framed = FramedRead::with_capacity(recv, RelaySideCodec::new(config.max_control_frame), 128);
        let first = framed.next().await?;
        Some((send, framed, first))
    })
    .await;
    let (send, framed, first) = match hello {
        Ok(Some(parts)) => parts,
        Ok(None) => return,
        Err(_) => return refuse(&conn, close_code::TIMED_OUT, "timed out: no hello received"),
    };
    let (protocol, token, instance) = match first {
        Ok(ClientMessage::Hello { protocol, token, instance }) => (protocol, token, instance),
        Ok(other) => {
            let what = format!("protocol violation: expected hello as the first control frame, got {other:?}");
            return refuse(&conn, close_code::PROTOCOL_VIOLATION, &what);
        }
        Err(e) => return refuse(&conn, close_code::PROTOCOL_VIOLATION, &format!("protocol violation: {e}")),
    };
    if protocol != PROTOCOL_VERSION {
        let what =
            format!("unsupported protocol version {protocol}: this relay speaks {PROTOCOL_VERSION}; upgrade overlan");
        return refuse(&conn, close_code::PROTOCOL_VIOLATION, &what);
    }
    if !valid_instance(&instance) {
        return refuse(
            &conn,
            close_code::PROTOCOL_VIOLATION,
            "protocol violation: instance name must be at most 64 of A-Z a-z 0-9 . _ -",
        );
    }
    let admitted = allocator.send(AllocateVip { token, identity, instance: instance.clone() }).await;
    let admission = match admitted {
        Ok(Ok(a)) => a,
        Ok(Err(AdmitError::Token(problem))) => {
            return refuse(&conn, close_code::UNAUTHORIZED, &format!("unauthorized: {}", problem.message()))
        }
        Ok(Err(e @ AdmitError::NetworkFull { .. })) => return refuse(&conn, close_code::NETWORK_FULL, &e.to_string()),
        Ok(Err(e)) => return refuse(&conn, close_code::INTERNAL, &e.to_string()),
        Err(_) => return refuse(&conn, close_code::INTERNAL, "relay internal error: allocator unavailable"),
    };
    if admission.new_lease {
        tracing::info!(network = %admission.network.name, vip = %admission.vip, %identity, %instance, "new lease");
    }
    let parts = SessionParts {
        conn,
        control_send: send,
        control_recv: framed,
        identity,
        instance,
        network: admission.network,
        vip: admission.vip,
    };
    SessionActor::new(parts, router, config).start();
}

/// Whether an instance name is acceptable: up to 64 of `A-Z a-z 0-9 . _ -` (may be empty).
pub fn valid_instance(name: &str) -> bool {
    name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
