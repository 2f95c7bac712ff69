//! Starting a relay: state directory, certificate, database, QUIC endpoint, the accept
//! loop and the handshake that turns a QUIC connection into a `SessionActor`. The relay
//! runs in its own actix `System` on a multi-threaded tokio runtime, so the session
//! actors stay on the arbiter while quinn and the data-path tasks use every core.
//!
//! Before a connection has authenticated it holds almost nothing: one stream, a
//! connection window of [`PREAUTH_WINDOW`], a hello of at most [`PREAUTH_MAX_FRAME`],
//! its datagrams discarded, and a place among at most `limits.max_unauthenticated`
//! such connections (past half of them, new ones must validate their address first).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use anyhow::Context as _;
use futures_util::StreamExt;
use overlan_shared::cluster::{ClusterDir, NodeCredentials};
use overlan_shared::config::Secret;
use overlan_shared::invite::Invite;
use overlan_shared::tls::{self, Fingerprint, Identity};
use overlan_shared::udp::{mtu_bound_toward, INTERNET_MTU_BOUND, MTU_BOUND};
use overlan_shared::wire::control::{valid_instance, ClientMessage};
use overlan_shared::wire::frame::RelaySideCodec;
use overlan_shared::wire::peer::ALPN_PEER;
use overlan_shared::wire::{close_code, ALPN_CLIENT, PROTOCOL_VERSION, RELAY_SERVER_NAME};
use quinn::VarInt;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::FramedRead;

use crate::allocator::{
    AdmitError, AllocateVip, CatalogIfChanged, ExpireLeases, FlushSeen, GetCatalog, ListNetworks, SeenOnline,
    VipAllocatorActor,
};
use crate::cluster::{NetworksChanged, VoidsChanged};
use crate::config::RelayConfig;
use crate::counters::{Counters, Reason};
use crate::link;
use crate::link::SendCatalog;
use crate::node::Node;
use crate::session::{NetworkRemoved, SessionActor, SessionParts};
use crate::store::{DataDirLock, Store, DEFAULT_NETWORK};

/// File in the data directory holding the address the running (or last) relay put into
/// its invites, for the operator commands that print invites beside it, and on a second
/// line the address it listened on.
pub const INVITE_ADDR_FILE: &str = "invite-addr";

/// What the relay on this data directory last ran with: the address in its invites and
/// the one it listened on (`None` for a relay before it recorded that).
fn last_run(config: &RelayConfig) -> Option<(String, Option<String>)> {
    let text = std::fs::read_to_string(config.data_dir.join(INVITE_ADDR_FILE)).ok()?;
    let mut lines = text.lines().map(str::trim);
    let invite = lines.next().filter(|l| !l.is_empty())?.to_owned();
    Some((invite, lines.next().filter(|l| !l.is_empty()).map(str::to_owned)))
}

/// The address to put into invites made by an operator command: `public_addr` if set,
/// else the address the relay on this data directory last ran with, else one derived
/// from the configured listen address.
pub fn operator_invite_addr(config: &RelayConfig) -> String {
    match (&config.public_addr, last_run(config)) {
        (None, Some((invite, _))) => invite,
        _ => config.invite_addr(config.listen),
    }
}

/// The listen address an operator command prints: the one the relay on this data
/// directory last ran with (running now, or the last to run), else the configured one.
pub fn operator_listen_addr(config: &RelayConfig) -> String {
    match last_run(config) {
        Some((_, Some(listen))) => listen,
        _ => config.listen.to_string(),
    }
}

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
    counters: Arc<Counters>,
    node: Arc<Node>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RelayHandle {
    /// Starts a relay on its own thread and waits until it listens.
    pub fn start(config: RelayConfig) -> anyhow::Result<Self> {
        config.validate()?;
        check_data_dir(&config)?;
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
                            let _ = ready_tx.send(Ok((info, prepared.node.clone())));
                            serve(prepared, shutdown_rx).await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })
            .context("spawning the relay thread")?;
        let (info, node) = ready_rx.recv().context("relay thread ended before it was ready")??;
        let counters = node.counters.clone();
        Ok(Self { info, counters, node, shutdown: Some(shutdown_tx), thread: Some(thread) })
    }

    /// The names of the peer nodes this node has live links to (one entry per link).
    pub fn peer_links(&self) -> Vec<String> {
        let mut peers = self.node.router.link_peers();
        peers.sort();
        peers
    }

    /// Where traffic to `vip` of `network` goes next: `Some("local")`, the name of the
    /// peer node of the link it takes, or `None` if it has no route.
    pub fn next_hop(&self, network: &str, vip: std::net::Ipv4Addr) -> Option<String> {
        match self.node.router.route(overlan_shared::route::NetKey::of(network), vip)? {
            crate::router::Route::Local(_) => Some("local".to_owned()),
            crate::router::Route::Peer(link) => Some(link.node.to_string()),
        }
    }

    /// Closes every link to peer node `peer` (as if the network between them failed);
    /// a node that dials `peer` links again after its backoff. For tests and operators.
    pub fn cut_links_to(&self, peer: &str) -> usize {
        self.node.router.close_links_to(peer)
    }

    /// What the relay refused, dropped or cut so far, by reason.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Virtual stream sockets alive on this node: connects waiting for an answer and
    /// established sockets. A socket is gone from this count only after its parties
    /// were told it ended.
    pub fn open_sockets(&self) -> usize {
        self.node.router.pair_count()
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
    node: Arc<Node>,
    endpoint: quinn::Endpoint,
    server_configs: ServerConfigs,
    _lock: DataDirLock,
}

/// The default network's invite token: derived from the relay key (in a cluster, from
/// the cluster secret every node holds, so every node derives the same), so it is
/// stable across restarts without storing the token itself (only its hash is stored).
pub fn default_invite_token(key: &[u8], network: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&key, format!("overlan default invite v1:{network}").as_bytes());
    hex::encode(&tag.as_ref()[..20])
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
    let mut store = Store::open(&config.data_dir)?;
    store.ensure_default_network(config.default_subnet)?;
    Ok(store)
}

/// A relay's state directory, opened: what the relay runs with and what the operator
/// commands work on. Blocking (file and database I/O).
pub struct RelayState {
    /// The relay certificate and key (a cluster node's: its node certificate).
    pub identity: Identity,
    /// A cluster node's credentials.
    pub cluster: Option<NodeCredentials>,
    /// The database.
    pub store: Store,
    /// The default network's reusable invite token, unless the operator revoked it.
    pub default_token: Option<String>,
}

impl RelayState {
    /// Opens (creating on first use) the identity, the database and the default invite.
    pub fn open(config: &RelayConfig) -> anyhow::Result<Self> {
        let cluster = match &config.cluster {
            Some(c) => Some(
                ClusterDir::new(&c.dir)
                    .load_node(&c.node)
                    .with_context(|| format!("loading node {}'s credentials from {}", c.node, c.dir.display()))?,
            ),
            None => None,
        };
        let identity = match &cluster {
            Some(creds) => {
                mark_data_dir(config, &creds.name)?;
                creds.identity.clone()
            }
            None => load_identity(&config.data_dir)?,
        };
        let store = open_store(config)?;
        let key = cluster.as_ref().map_or(identity.key_der(), |c| &c.secret);
        let token = default_invite_token(key, DEFAULT_NETWORK);
        store.add_invite(DEFAULT_NETWORK, &token, "default", None, None)?;
        let default_token = (!store.invite_revoked(&token)?).then_some(token);
        Ok(Self { identity, cluster, store, default_token })
    }

    /// The fingerprint clients pin: the relay certificate's, or in a cluster the
    /// cluster CA's (so an invite from any node works on every node).
    pub fn pin(&self) -> Fingerprint {
        match &self.cluster {
            Some(creds) => Fingerprint::of(&creds.ca),
            None => self.identity.fingerprint(),
        }
    }

    /// The invite URI for `token` into `network`, naming the relay as `relay`.
    pub fn invite(&self, relay: String, network: &str, token: String) -> Invite {
        Invite { relay, network: network.to_owned(), fingerprint: self.pin(), token: Secret::new(token) }
    }

    /// The default network's invite, for a relay reachable at `relay`.
    pub fn default_invite(&self, relay: String) -> Option<Invite> {
        self.default_token.clone().map(|token| self.invite(relay, DEFAULT_NETWORK, token))
    }
}

async fn prepare(config: RelayConfig) -> anyhow::Result<(Prepared, RelayInfo)> {
    let (lock, state) = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let lock = DataDirLock::acquire(&config.data_dir)?;
            Ok((lock, RelayState::open(&config)?))
        })
        .await??
    };

    let alpns: &[&[u8]] = if state.cluster.is_some() { &[ALPN_CLIENT, ALPN_PEER] } else { &[ALPN_CLIENT] };
    let crypto = tls::server_config(&state.identity, alpns)?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(crypto).context("QUIC TLS configuration")?,
    ));
    let mut local_config = server_config.clone();
    server_config.transport_config(Arc::new(preauth_transport_config(config.idle_timeout, INTERNET_MTU_BOUND)?));
    local_config.transport_config(Arc::new(preauth_transport_config(config.idle_timeout, MTU_BOUND)?));
    let server_configs = ServerConfigs { internet: Arc::new(server_config.clone()), local: Arc::new(local_config) };
    let socket =
        std::net::UdpSocket::bind(config.listen).with_context(|| format!("binding QUIC on {}", config.listen))?;
    // A large receive buffer: with UDP GRO every batch the kernel holds is one entry, so
    // an overflow of the default one loses dozens of packets at once (a TUN client's
    // TCP then backs off). The send buffer stays the kernel's default (BENCHMARKS.md,
    // "Unmodified programs").
    let granted = overlan_shared::udp::enlarge_receive_buffer(&socket).context("sizing the UDP receive buffer")?;
    if granted.recv_capped() {
        tracing::info!("{}", overlan_shared::udp::capped_hint(granted));
    }
    let endpoint = quinn::Endpoint::new(endpoint_config(), Some(server_config), socket, Arc::new(quinn::TokioRuntime))
        .with_context(|| format!("binding QUIC on {}", config.listen))?;
    let local_addr = endpoint.local_addr()?;
    let fingerprint = state.pin();
    let invite_addr = config.invite_addr(local_addr);
    // Operator commands run beside the relay print invites naming the address it runs on.
    if let Err(e) = std::fs::write(config.data_dir.join(INVITE_ADDR_FILE), format!("{invite_addr}\n{local_addr}\n")) {
        tracing::warn!(error = %e, "cannot record the relay's address for operator commands");
    }
    let default_invite = state.default_invite(invite_addr);

    let data_dir = config.data_dir.clone();
    let counters = Arc::new(Counters::default());
    let (max_instances, allocator_counters) = (config.limits.instances_per_identity, counters.clone());
    let slot = state.cluster.as_ref().map(|c| c.slot);
    let creds = state.cluster.clone();
    let allocator = SyncArbiter::start(1, move || {
        VipAllocatorActor::open(&data_dir, max_instances, creds.clone(), allocator_counters.clone())
            .expect("the lease database opened a moment ago")
    });
    let networks = state.store.networks()?;
    let peer_client = match &state.cluster {
        Some(creds) => {
            let crypto = overlan_shared::cluster::peer_client_config(creds, ALPN_PEER)?;
            let mut client = quinn::ClientConfig::new(Arc::new(
                quinn::crypto::rustls::QuicClientConfig::try_from(crypto).context("QUIC TLS configuration")?,
            ));
            client.transport_config(Arc::new(link::link_transport_config()));
            Some(client)
        }
        None => None,
    };
    let node = Arc::new(Node::new(config, allocator, counters, state.cluster));
    node.set_networks(networks);
    node.start_cluster();
    if let (Some(client), Some(cluster)) = (peer_client, &node.config.cluster) {
        tracing::info!(node = %cluster.node, slot, peers = ?cluster.peers, "running as a cluster node");
        for peer in &cluster.peers {
            actix_rt::spawn(link::dial(node.clone(), endpoint.clone(), client.clone(), peer.clone()));
        }
    }
    let prepared = Prepared { node, endpoint, server_configs, _lock: lock };
    Ok((prepared, RelayInfo { local_addr, fingerprint, default_invite }))
}

/// Concurrent QUIC streams (one per virtual socket) a new session may open. quinn
/// pre-allocates bookkeeping for every stream it allows (about 60 bytes each), so idle
/// sessions start small; a session raises its own limit as its sockets grow, up to
/// [`MAX_STREAMS_PER_SESSION`].
pub const INITIAL_STREAMS_PER_SESSION: u32 = 4;

/// Flow-control window of one virtual stream (bytes in flight per direction and hop).
/// Larger than quinn's 1.25 MB default: measured +15% relay throughput on loopback.
pub const STREAM_WINDOW: u32 = 4 << 20;
/// Flow-control window of a whole authenticated session. Sixteen stream windows: a
/// receiver that never reads holds one stream window of its sender's session per
/// socket (and is cut off after `limits.write_timeout`), so a few stalled sockets
/// leave the sender's other streams at full speed.
pub const SESSION_RECEIVE_WINDOW: u32 = 16 * STREAM_WINDOW;
/// What the relay keeps unacknowledged toward one session.
pub const SESSION_SEND_WINDOW: u64 = 16 << 20;
/// Connection window before authentication: enough for a hello, nothing more.
pub const PREAUTH_WINDOW: u32 = 8 * 1024;
/// Largest hello accepted before authentication.
pub const PREAUTH_MAX_FRAME: usize = 4 * 1024;
/// Longest a join may wait for the lease database.
pub const ALLOCATOR_DEADLINE: Duration = Duration::from_secs(5);
/// How often last-seen times are written.
const SEEN_FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// How often members online are recorded as seen.
const ONLINE_SEEN_INTERVAL: Duration = Duration::from_secs(60);
/// How often the networks in the database are read again (networks added by an
/// operator command while the relay runs).
const NETWORK_REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// How often a cluster node checks whether its networks and invites changed (an
/// operator command, or a peer's change taken in) and tells its peers.
const CATALOG_INTERVAL: Duration = Duration::from_millis(250);
/// How often a cluster node sends its whole catalog to its peers (changes go at once).
const FULL_CATALOG_INTERVAL: Duration = Duration::from_secs(600);
/// Longest a relay waits on shutdown for its sessions' and links' connections to drain.
const DRAIN_ON_SHUTDOWN: Duration = Duration::from_secs(2);
/// How often changed counters are logged.
const COUNTER_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Path-MTU discovery up to `bound` bytes of UDP payload (see
/// [`overlan_shared::udp::mtu_bound_toward`]).
pub fn mtu_discovery(bound: u16) -> quinn::MtuDiscoveryConfig {
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(bound);
    mtu
}

/// The relay endpoint's settings: it accepts UDP payloads up to
/// [`overlan_shared::udp::MTU_BOUND`] (quinn's default is 1,472), so clients and peer
/// nodes on paths that carry them send larger packets.
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    config.max_udp_payload_size(overlan_shared::udp::MTU_BOUND).expect("within QUIC's bounds");
    config
}

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
/// path-MTU discovery up to `mtu_bound` bytes of UDP payload (1,452-byte packets on
/// Ethernet paths instead of 1,200: a sixth fewer packets to seal, send and acknowledge
/// per byte relayed; up to 6,550 on loopback and jumbo-frame links, see
/// [`overlan_shared::udp::mtu_bound_toward`]; the datagram maximum stays fixed for the
/// minimum MTU). Discovery costs an idle session about 1 KiB with the internet's bound
/// (33.9 against 32.8 KiB at 10,000 sessions) and about 10 KiB with the larger one
/// (44 KiB on loopback): measured with `overlan-bench --only-idle`, see BENCHMARKS.md.
pub fn transport_config(idle_timeout: Duration, mtu_bound: u16) -> anyhow::Result<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(idle_timeout.try_into().context("idle timeout out of range")?))
        .keep_alive_interval(Some(idle_timeout / 3))
        .max_concurrent_bidi_streams(VarInt::from_u32(INITIAL_STREAMS_PER_SESSION))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(Some(1024 * 1024))
        .datagram_send_buffer_size(1024 * 1024)
        .mtu_discovery_config(Some(mtu_discovery(mtu_bound)))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(SESSION_RECEIVE_WINDOW))
        .send_window(SESSION_SEND_WINDOW)
        .ack_frequency_config(Some(ack_frequency()));
    Ok(transport)
}

/// The relay's transport settings as a new connection starts: one stream and a
/// connection window of [`PREAUTH_WINDOW`] until the session is welcomed, when the
/// session actor raises both to a member's ([`transport_config`]).
pub fn preauth_transport_config(idle_timeout: Duration, mtu_bound: u16) -> anyhow::Result<quinn::TransportConfig> {
    let mut transport = transport_config(idle_timeout, mtu_bound)?;
    transport.max_concurrent_bidi_streams(VarInt::from_u32(1)).receive_window(VarInt::from_u32(PREAUTH_WINDOW));
    Ok(transport)
}

/// The settings a new connection gets, by where it comes from.
struct ServerConfigs {
    /// Path-MTU discovery up to [`INTERNET_MTU_BOUND`].
    internet: Arc<quinn::ServerConfig>,
    /// Path-MTU discovery up to [`MTU_BOUND`], for paths that may carry jumbo frames.
    local: Arc<quinn::ServerConfig>,
}

impl ServerConfigs {
    fn toward(&self, peer: SocketAddr) -> Arc<quinn::ServerConfig> {
        if mtu_bound_toward(peer.ip()) == MTU_BOUND {
            self.local.clone()
        } else {
            self.internet.clone()
        }
    }
}

async fn serve(prepared: Prepared, mut shutdown: oneshot::Receiver<()>) {
    let Prepared { node, endpoint, server_configs, _lock } = prepared;
    let housekeeping = actix_rt::spawn(housekeeping(node.clone()));
    let max_unauth = node.config.limits.max_unauthenticated as usize;
    let unauthenticated = Arc::new(Semaphore::new(max_unauth));
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let Ok(permit) = unauthenticated.clone().try_acquire_owned() else {
                    node.count(Reason::UnauthenticatedLimit);
                    tracing::debug!(peer = %incoming.remote_address(), "refusing a connection: too many unauthenticated");
                    incoming.refuse();
                    continue;
                };
                // A spike of new connections: make each prove its address first, so
                // spoofed sources cannot hold places.
                if unauthenticated.available_permits() < max_unauth / 2 && !incoming.remote_address_validated() {
                    node.count(Reason::AddressValidation);
                    let _ = incoming.retry();
                    continue;
                }
                let config = server_configs.toward(incoming.remote_address());
                actix_rt::spawn(handshake(incoming, config, node.clone(), permit));
            }
            _ = &mut shutdown => break,
        }
    }
    tracing::info!("relay shutting down");
    node.stopping.cancel();
    housekeeping.abort();
    node.allocator.do_send(SeenOnline { online: node.router.online() });
    node.allocator.do_send(FlushSeen);
    // Sessions and links get their close, and a while to drain (quinn answers a peer
    // whose close was lost): about three round trips. With none open or joining, what is
    // left are dials to peers that never answered, which would take seconds to drain for
    // nothing.
    let served = !node.router.online().is_empty()
        || !node.router.links().is_empty()
        || unauthenticated.available_permits() < max_unauth
        || node.link_claims.any();
    endpoint.close(VarInt::from_u32(close_code::SHUTDOWN), b"relay shutting down");
    let drain = if served { DRAIN_ON_SHUTDOWN } else { Duration::from_millis(100) };
    let _ = tokio::time::timeout(drain, endpoint.wait_idle()).await;
    System::current().stop();
}

/// The file in a data directory that names the cluster node it belongs to.
const NODE_FILE: &str = "cluster-node";

/// Checks that `config` uses its data directory as what it is. A cluster node marks its
/// directory with its name on first use (its credentials loaded); then only that node
/// may use it, with its cluster credentials. Without them, a command on a node's directory would make a
/// standalone relay's certificate there and print invites no client could use.
pub fn check_data_dir(config: &RelayConfig) -> anyhow::Result<()> {
    let path = config.data_dir.join(NODE_FILE);
    let marked = std::fs::read_to_string(&path).ok().map(|text| text.trim().to_owned());
    match (&config.cluster, marked) {
        (None, Some(node)) => anyhow::bail!(
            "{} belongs to cluster node {node}: pass --cluster DIR --node {node} (or the node's config file) to use it",
            config.data_dir.display()
        ),
        (Some(cluster), Some(node)) if node != cluster.node => anyhow::bail!(
            "{} belongs to cluster node {node}, not {}: give each node its own --data-dir",
            config.data_dir.display(),
            cluster.node
        ),
        _ => Ok(()),
    }
}

/// Marks `config`'s data directory as its node's (once the node's credentials loaded:
/// a mistyped `--node` must not claim a directory).
fn mark_data_dir(config: &RelayConfig, node: &str) -> anyhow::Result<()> {
    let path = config.data_dir.join(NODE_FILE);
    if path.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(&config.data_dir)
        .and_then(|()| std::fs::write(&path, format!("{node}\n")))
        .with_context(|| format!("marking {} as node {node}'s", config.data_dir.display()))
}

/// Periodic chores: write last-seen times, expire unused leases (if configured), log
/// the counters that changed.
async fn housekeeping(node: Arc<Node>) {
    let mut flush = tokio::time::interval(SEEN_FLUSH_INTERVAL);
    let mut online = tokio::time::interval(ONLINE_SEEN_INTERVAL);
    let mut networks = tokio::time::interval(NETWORK_REFRESH_INTERVAL);
    let mut catalog = tokio::time::interval(CATALOG_INTERVAL);
    let mut full_catalog =
        tokio::time::interval_at(tokio::time::Instant::now() + FULL_CATALOG_INTERVAL, FULL_CATALOG_INTERVAL);
    let clustered = node.cluster.is_some();
    let mut log = tokio::time::interval(COUNTER_LOG_INTERVAL);
    let expiry = node.config.limits.lease_expiry.map(|d| d.0);
    let mut expire =
        tokio::time::interval(expiry.map_or(Duration::from_secs(3600), |d| (d / 10).max(Duration::from_secs(60))));
    let mut logged = Vec::new();
    loop {
        tokio::select! {
            _ = flush.tick() => node.allocator.do_send(FlushSeen),
            _ = online.tick() => node.allocator.do_send(SeenOnline { online: node.router.online() }),
            _ = networks.tick() => refresh_networks(&node).await,
            _ = catalog.tick(), if clustered => {
                if let Ok(Some(changed)) = node.allocator.send(CatalogIfChanged).await {
                    for link in node.router.links() {
                        link.addr.do_send(SendCatalog(changed.clone()));
                    }
                    refresh_networks(&node).await;
                    if let Some(cluster) = node.cluster_actor() {
                        cluster.do_send(VoidsChanged(changed.voided));
                    }
                }
            },
            // Now and then the whole catalog, releases included: whatever a peer missed
            // (a catalog its database could not take, an older node that keeps only the
            // latest of several) reaches it without waiting for the link to start over.
            _ = full_catalog.tick(), if clustered => {
                if let Ok(Ok(whole)) = node.allocator.send(GetCatalog).await {
                    for link in node.router.links() {
                        link.addr.do_send(SendCatalog(whole.clone()));
                    }
                }
            },
            _ = expire.tick() => if let Some(max_age) = expiry {
                node.allocator.do_send(ExpireLeases { max_age, online: node.router.online() });
            },
            _ = log.tick() => {
                let now = node.counters.snapshot();
                if now != logged {
                    let text: Vec<String> = now.iter().map(|(name, n)| format!("{name}={n}")).collect();
                    tracing::info!(counters = %text.join(" "), held_bytes = node.holds.held(), "refused, dropped or cut so far");
                    logged = now;
                }
            }
        }
    }
}

/// Reads the networks in the database again; new ones let waiting route announcements
/// of the cluster through.
async fn refresh_networks(node: &Node) {
    if let Ok(Ok(list)) = node.allocator.send(ListNetworks).await {
        let (new, removed) = node.set_networks(list);
        for network in removed {
            let sessions = node.router.local_sessions_in(network.key);
            tracing::info!(network = %network.name, sessions = sessions.len(), "network removed");
            for session in sessions {
                session.addr.do_send(NetworkRemoved);
            }
        }
        if new {
            if let Some(cluster) = node.cluster_actor() {
                cluster.do_send(NetworksChanged);
            }
        }
    }
}

/// The identity of the client certificate (its public key's fingerprint) and the
/// fingerprint of the whole certificate (what leases were keyed on before), if the
/// client presented one.
fn peer_identity(conn: &quinn::Connection) -> Option<(Fingerprint, Fingerprint)> {
    let certs = conn.peer_identity()?.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>().ok()?;
    let cert = certs.first()?;
    Some((tls::spki_fingerprint(cert)?, Fingerprint::of(cert)))
}

fn refuse(conn: &quinn::Connection, code: u32, reason: &str) {
    tracing::info!(peer = %conn.remote_address(), reason, "refusing client");
    conn.close(VarInt::from_u32(code), reason.as_bytes());
}

async fn handshake(
    incoming: quinn::Incoming,
    server_config: Arc<quinn::ServerConfig>,
    node: Arc<Node>,
    permit: OwnedSemaphorePermit,
) {
    let config = &node.config;
    let remote = incoming.remote_address();
    let connecting = match incoming.accept_with(server_config) {
        Ok(connecting) => connecting,
        Err(e) => {
            tracing::debug!(%remote, error = %e, "QUIC handshake failed");
            return;
        }
    };
    // The ALPN is known once the client's hello is in: a peer node whose handshake
    // fails (its certificate is not of this cluster, or it refused this node's) is
    // logged here too, not only on its own side.
    let mut connecting = connecting;
    let offered = connecting
        .handshake_data()
        .await
        .ok()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    let conn = match connecting.await {
        Ok(conn) => conn,
        Err(e) if offered.as_deref() == Some(ALPN_PEER) => {
            // A TLS failure (either side's certificate check) is a refusal; a handshake
            // that timed out or was cut off is not.
            let crypto = |code: u64| (0x100..0x200).contains(&code);
            let refused = match &e {
                quinn::ConnectionError::TransportError(t) => crypto(t.code.into()),
                quinn::ConnectionError::ConnectionClosed(c) => crypto(c.error_code.into()),
                _ => false,
            };
            if !refused {
                tracing::debug!(%remote, error = %e, "a peer's link handshake did not complete");
                return;
            }
            node.count(Reason::PeerRefused);
            if node.warn_once(format!("{} tls", remote.ip())) {
                tracing::warn!(%remote, error = %e, "refusing peer link: its TLS handshake failed (a node of another cluster?)");
            } else {
                tracing::debug!(%remote, error = %e, "refusing peer link: its TLS handshake failed");
            }
            return;
        }
        Err(e) => {
            tracing::debug!(%remote, error = %e, "QUIC handshake failed");
            return;
        }
    };
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    if alpn.as_deref() == Some(ALPN_PEER) {
        link::accept(conn, node).await;
        drop(permit);
        return;
    }
    let Some((identity, legacy)) = peer_identity(&conn) else {
        return refuse(
            &conn,
            close_code::UNAUTHORIZED,
            "unauthorized: a client certificate is required (overlan clients present their identity certificate)",
        );
    };
    let hello = tokio::time::timeout(config.hello_timeout, async {
        let read_hello = async {
            let (send, recv) = conn.accept_bi().await.ok()?;
            // Control frames are small; start the buffer small (it grows for a large frame).
            let mut framed = FramedRead::with_capacity(recv, RelaySideCodec::new(PREAUTH_MAX_FRAME), 128);
            let first = framed.next().await?;
            framed.decoder_mut().set_max_len(config.max_control_frame);
            Some((send, framed, first))
        };
        // Nobody reads datagrams before the session starts: drop them, do not buffer.
        let discard_datagrams = async {
            while conn.read_datagram().await.is_ok() {}
            std::future::pending().await
        };
        tokio::select! {
            hello = read_hello => hello,
            never = discard_datagrams => never,
        }
    })
    .await;
    let (send, framed, first) = match hello {
        Ok(Some(parts)) => parts,
        Ok(None) => return,
        Err(_) => return refuse(&conn, close_code::TIMED_OUT, "timed out: no hello received"),
    };
    let (protocol, token, instance, lease, network, tun, existing_only) = match first {
        Ok(ClientMessage::Hello { protocol, token, instance, lease, network, tun, existing_only }) => {
            (protocol, token, instance, lease, network, tun, existing_only)
        }
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
    let request = AllocateVip { token, identity, legacy, instance: instance.clone(), lease, network, existing_only };
    let admitted = tokio::time::timeout(ALLOCATOR_DEADLINE, node.allocator.send(request)).await;
    let admission = match admitted {
        Ok(Ok(Ok(a))) => a,
        Ok(Ok(Err(AdmitError::Token(problem)))) => {
            return refuse(&conn, close_code::UNAUTHORIZED, &format!("unauthorized: {}", problem.message()))
        }
        Ok(Ok(Err(e @ AdmitError::NetworkFull { .. }))) => {
            return refuse(&conn, close_code::NETWORK_FULL, &e.to_string())
        }
        Ok(Ok(Err(e @ AdmitError::InstanceLimit { .. }))) => return refuse(&conn, close_code::LIMIT, &e.to_string()),
        Ok(Ok(Err(e @ AdmitError::WrongNetwork { .. }))) => {
            return refuse(&conn, close_code::UNAUTHORIZED, &e.to_string())
        }
        Ok(Ok(Err(e @ AdmitError::NoLease { .. }))) => return refuse(&conn, close_code::NO_LEASE, &e.to_string()),
        Ok(Ok(Err(e))) => return refuse(&conn, close_code::INTERNAL, &e.to_string()),
        Ok(Err(_)) => return refuse(&conn, close_code::INTERNAL, "relay internal error: allocator unavailable"),
        Err(_) => {
            node.count(Reason::AllocatorTimeout);
            return refuse(
                &conn,
                close_code::INTERNAL,
                "relay busy: the lease database did not answer in time; retrying may work",
            );
        }
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
        proof: admission.proof,
        tun,
    };
    SessionActor::new(parts, node.clone()).start();
    drop(permit);
}
