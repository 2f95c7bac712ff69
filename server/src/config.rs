//! Relay configuration: one typed struct, read once from an optional TOML file and then
//! overridden by flags and environment variables (clap merges those two).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use overlan_shared::config::HumanDuration;
use overlan_shared::wire::DEFAULT_MAX_CONTROL_FRAME;
use overlan_shared::Subnet;
use serde::Deserialize;

/// Default QUIC listen address.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 7700);
/// Default state directory.
pub const DEFAULT_DATA_DIR: &str = "./overlan-data";
/// Default idle timeout: a session that sends nothing for this long is dead.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default subnet of the `default` network.
pub const DEFAULT_SUBNET: &str = "10.77.0.0/16";
/// Longest idle timeout accepted (the issue caps cleanup at 15 s by default; operators
/// may choose longer for flaky links, up to this).
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a connecting client has to send its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a listener's application has to accept or deny a connection.
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long both sides of an accepted socket have to open their data streams.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);

/// Stream sockets (established and waiting) one session may hold at once.
pub const DEFAULT_MAX_SOCKETS: u32 = 1024;
/// Connects one session may have waiting for an answer at once.
pub const DEFAULT_MAX_PENDING_CONNECTS: u32 = 256;
/// Offers one listening session may have waiting for its application's answer.
pub const DEFAULT_MAX_PENDING_OFFERS: u32 = 1024;
/// Stream listeners one session may hold.
pub const DEFAULT_MAX_LISTENERS: u32 = 256;
/// Datagram ports one session may bind.
pub const DEFAULT_MAX_BOUND_PORTS: u32 = 256;
/// Control messages per second one session may send (a token bucket of
/// [`DEFAULT_CONTROL_BURST`]); faster senders are slowed down, not cut off.
pub const DEFAULT_CONTROL_RATE: u32 = 200;
/// Control messages one session may send in a burst (a reconnect re-registers every
/// listener and port at once, so this covers both caps).
pub const DEFAULT_CONTROL_BURST: u32 = 1024;
/// Unicast datagrams per second one session may send; more are dropped and counted.
/// A TUN session sends one datagram per IP packet: at full size (1,112 bytes) this is
/// about 4.4 Gbit/s. (100,000 capped TUN TCP at 0.89 Gbit/s, below what a relay on two
/// cores carries.)
pub const DEFAULT_DATAGRAM_RATE: u32 = 500_000;
/// Unicast datagrams one session may send in a burst.
pub const DEFAULT_DATAGRAM_BURST: u32 = 50_000;
/// Broadcasts per second one session may send (each one costs a copy per member).
pub const DEFAULT_BROADCAST_RATE: u32 = 200;
/// Broadcasts one session may send in a burst.
pub const DEFAULT_BROADCAST_BURST: u32 = 400;
/// New connections that may be between QUIC handshake and a successful join at once.
pub const DEFAULT_MAX_UNAUTHENTICATED: u32 = 256;
/// A receiver that takes no data for this long while data waits for it is cut off.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a socket may keep delivering after its sender's session has gone.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Relay-wide cap on bytes held for stalled receivers.
pub const DEFAULT_MAX_HELD_BYTES: u64 = 1 << 30;
/// Instances (so VIPs) one identity may hold in a network unless the network says
/// otherwise (`overlan-server network set NAME --max-instances N`).
pub const DEFAULT_INSTANCES_PER_IDENTITY: u32 = 16;

/// What one member may cost the others: per-session caps and rates, and the relay-wide
/// bounds on unauthenticated connections and held bytes. The `[limits]` table of the
/// config file; every key is optional.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Stream sockets (established and waiting) per session.
    pub max_sockets: u32,
    /// Unanswered connects per session.
    pub max_pending_connects: u32,
    /// Unanswered offers per listening session.
    pub max_pending_offers: u32,
    /// Stream listeners per session.
    pub max_listeners: u32,
    /// Bound datagram ports per session.
    pub max_bound_ports: u32,
    /// Control messages per second per session.
    pub control_rate: u32,
    /// Control message burst per session.
    pub control_burst: u32,
    /// Unicast datagrams per second per session.
    pub datagram_rate: u32,
    /// Unicast datagram burst per session.
    pub datagram_burst: u32,
    /// Broadcasts per second per session.
    pub broadcast_rate: u32,
    /// Broadcast burst per session.
    pub broadcast_burst: u32,
    /// Connections between handshake and join, relay-wide; past half of it new
    /// connections must validate their address (QUIC retry), past all of it they are
    /// refused.
    pub max_unauthenticated: u32,
    /// A receiver that takes no data for this long while data waits is cut off.
    pub write_timeout: HumanDuration,
    /// How long a socket keeps delivering after its sender's session has gone.
    pub drain_timeout: HumanDuration,
    /// Relay-wide cap on bytes held for stalled receivers.
    pub max_held_bytes: u64,
    /// Default cap on instances per identity and network.
    pub instances_per_identity: u32,
    /// Release leases unused for this long (off by default: VIPs are permanent).
    pub lease_expiry: Option<HumanDuration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_sockets: DEFAULT_MAX_SOCKETS,
            max_pending_connects: DEFAULT_MAX_PENDING_CONNECTS,
            max_pending_offers: DEFAULT_MAX_PENDING_OFFERS,
            max_listeners: DEFAULT_MAX_LISTENERS,
            max_bound_ports: DEFAULT_MAX_BOUND_PORTS,
            control_rate: DEFAULT_CONTROL_RATE,
            control_burst: DEFAULT_CONTROL_BURST,
            datagram_rate: DEFAULT_DATAGRAM_RATE,
            datagram_burst: DEFAULT_DATAGRAM_BURST,
            broadcast_rate: DEFAULT_BROADCAST_RATE,
            broadcast_burst: DEFAULT_BROADCAST_BURST,
            max_unauthenticated: DEFAULT_MAX_UNAUTHENTICATED,
            write_timeout: HumanDuration(DEFAULT_WRITE_TIMEOUT),
            drain_timeout: HumanDuration(DEFAULT_DRAIN_TIMEOUT),
            max_held_bytes: DEFAULT_MAX_HELD_BYTES,
            instances_per_identity: DEFAULT_INSTANCES_PER_IDENTITY,
            lease_expiry: None,
        }
    }
}

impl Limits {
    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> anyhow::Result<()> {
        let positive = [
            ("max_sockets", self.max_sockets),
            ("max_pending_connects", self.max_pending_connects),
            ("max_pending_offers", self.max_pending_offers),
            ("max_listeners", self.max_listeners),
            ("max_bound_ports", self.max_bound_ports),
            ("control_rate", self.control_rate),
            ("control_burst", self.control_burst),
            ("datagram_rate", self.datagram_rate),
            ("datagram_burst", self.datagram_burst),
            ("broadcast_rate", self.broadcast_rate),
            ("broadcast_burst", self.broadcast_burst),
            ("max_unauthenticated", self.max_unauthenticated),
            ("instances_per_identity", self.instances_per_identity),
        ];
        for (name, value) in positive {
            anyhow::ensure!(value > 0, "limits.{name} must be at least 1");
        }
        anyhow::ensure!(self.max_sockets <= 65_536, "limits.max_sockets must be at most 65536");
        anyhow::ensure!(self.write_timeout.0 >= Duration::from_secs(1), "limits.write_timeout must be at least 1s");
        anyhow::ensure!(self.drain_timeout.0 >= Duration::from_secs(1), "limits.drain_timeout must be at least 1s");
        anyhow::ensure!(self.max_held_bytes >= 1 << 20, "limits.max_held_bytes must be at least 1048576");
        if let Some(expiry) = self.lease_expiry {
            anyhow::ensure!(expiry.0 >= Duration::from_secs(60), "limits.lease_expiry must be at least 1m");
        }
        Ok(())
    }
}

/// The relay configuration file (`--config FILE`); every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// QUIC listen address.
    pub listen: Option<SocketAddr>,
    /// State directory (database, certificate).
    pub data_dir: Option<PathBuf>,
    /// Address put into invites (`host:port`); derived from the listen address if unset.
    pub public_addr: Option<String>,
    /// Session idle timeout, e.g. "10s".
    pub idle_timeout: Option<HumanDuration>,
    /// Cap on one control frame in bytes.
    pub max_control_frame: Option<usize>,
    /// Subnet of the `default` network created on first start.
    pub default_subnet: Option<Subnet>,
    /// Log filter (tracing `EnvFilter` syntax), e.g. "info" or "overlan_server=debug".
    pub log: Option<String>,
    /// Per-session caps and rates, relay-wide bounds.
    pub limits: Option<Limits>,
    /// Membership of a cluster of relay nodes.
    pub cluster: Option<ClusterFileConfig>,
}

/// The `[cluster]` table: run as node `node` of the cluster whose credentials are in
/// `dir`, linking to `peers`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFileConfig {
    /// Cluster directory (`ca.crt` and `NODE.pem`, from `overlan-server ca issue`).
    pub dir: Option<PathBuf>,
    /// This node's name.
    pub node: Option<String>,
    /// Peers to link to, `HOST:PORT` (their client port).
    #[serde(default)]
    pub peers: Vec<String>,
}

/// A node of a cluster: who it is and whom it links to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Cluster directory.
    pub dir: PathBuf,
    /// This node's name.
    pub node: String,
    /// Peers to dial, `HOST:PORT`.
    pub peers: Vec<String>,
}

impl FileConfig {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
    }
}

/// The resolved relay configuration.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// State directory.
    pub data_dir: PathBuf,
    /// Address put into invites; `None`: derive from the bound address.
    pub public_addr: Option<String>,
    /// Session idle timeout; keep-alives go out at a third of it.
    pub idle_timeout: Duration,
    /// Cap on one control frame in bytes.
    pub max_control_frame: usize,
    /// Subnet of the `default` network created on first start.
    pub default_subnet: Subnet,
    /// How long a listener has to accept or deny.
    pub accept_timeout: Duration,
    /// How long both sides have to attach their streams.
    pub attach_timeout: Duration,
    /// How long a new connection has to send its hello.
    pub hello_timeout: Duration,
    /// What one member may cost the others.
    pub limits: Limits,
    /// Cluster membership; `None`: a standalone relay.
    pub cluster: Option<ClusterConfig>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            public_addr: None,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_control_frame: DEFAULT_MAX_CONTROL_FRAME,
            default_subnet: DEFAULT_SUBNET.parse().expect("valid default subnet"),
            accept_timeout: ACCEPT_TIMEOUT,
            attach_timeout: ATTACH_TIMEOUT,
            hello_timeout: HELLO_TIMEOUT,
            limits: Limits::default(),
            cluster: None,
        }
    }
}

impl RelayConfig {
    /// Applies a file's values over the defaults.
    pub fn with_file(mut self, file: &FileConfig) -> Self {
        if let Some(v) = file.listen {
            self.listen = v;
        }
        if let Some(v) = &file.data_dir {
            self.data_dir = v.clone();
        }
        if let Some(v) = &file.public_addr {
            self.public_addr = Some(v.clone());
        }
        if let Some(v) = file.idle_timeout {
            self.idle_timeout = v.0;
        }
        if let Some(v) = file.max_control_frame {
            self.max_control_frame = v;
        }
        if let Some(v) = file.default_subnet {
            self.default_subnet = v;
        }
        if let Some(v) = &file.limits {
            self.limits = v.clone();
        }
        self
    }

    /// Sets the cluster membership from `layers` (file, then flags; later layers win
    /// key by key). No layer naming a directory or node: a standalone relay.
    pub fn with_cluster(mut self, layers: &[&ClusterFileConfig]) -> anyhow::Result<Self> {
        let (mut dir, mut node, mut peers) = (None, None, Vec::new());
        for layer in layers {
            dir = layer.dir.clone().or(dir);
            node = layer.node.clone().or(node);
            if !layer.peers.is_empty() {
                peers = layer.peers.clone();
            }
        }
        self.cluster = match (dir, node) {
            (Some(dir), Some(node)) => Some(ClusterConfig { dir, node, peers }),
            (None, None) if peers.is_empty() => None,
            (None, _) => anyhow::bail!("a cluster node needs the cluster directory: --cluster DIR (or [cluster] dir)"),
            (Some(_), None) => anyhow::bail!("a cluster node needs its name: --node NODE (or [cluster] node)"),
        };
        Ok(self)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.idle_timeout >= Duration::from_millis(500) && self.idle_timeout <= MAX_IDLE_TIMEOUT,
            "idle_timeout must be between 500ms and {}s",
            MAX_IDLE_TIMEOUT.as_secs()
        );
        anyhow::ensure!(
            (1024..=16 * 1024 * 1024).contains(&self.max_control_frame),
            "max_control_frame must be between 1024 and 16777216 bytes"
        );
        self.limits.validate()?;
        if let Some(cluster) = &self.cluster {
            anyhow::ensure!(
                overlan_shared::cluster::valid_node_name(&cluster.node),
                "bad node name {:?}: use 1-63 of a-z 0-9 - (not starting or ending with -)",
                cluster.node
            );
            for peer in &cluster.peers {
                anyhow::ensure!(
                    peer.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()),
                    "peer {peer:?} must be HOST:PORT"
                );
            }
        }
        if let Some(addr) = &self.public_addr {
            anyhow::ensure!(
                addr.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()),
                "public_addr {addr:?} must be HOST:PORT"
            );
        }
        Ok(())
    }

    /// The address to put into invites for a relay bound at `bound`.
    pub fn invite_addr(&self, bound: SocketAddr) -> String {
        if let Some(addr) = &self.public_addr {
            return addr.clone();
        }
        let ip = if bound.ip().is_unspecified() {
            outbound_ip().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
        } else {
            bound.ip()
        };
        SocketAddr::new(ip, bound.port()).to_string()
    }
}

/// The local address this host would use to reach the internet, found without sending a
/// packet (a connected UDP socket's local address); `None` without a route.
fn outbound_ip() -> Option<IpAddr> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_keys() {
        let file: FileConfig = toml::from_str("listen = \"127.0.0.1:9000\"\nidle_timeout = \"5s\"\n").unwrap();
        let cfg = RelayConfig::default().with_file(&file);
        assert_eq!(cfg.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(cfg.idle_timeout, Duration::from_secs(5));
        cfg.validate().unwrap();
        assert!(toml::from_str::<FileConfig>("listn = \"x\"").is_err());
        let file: FileConfig = toml::from_str("[limits]\nmax_sockets = 8\nwrite_timeout = \"5s\"\n").unwrap();
        let cfg = RelayConfig::default().with_file(&file);
        assert_eq!(cfg.limits.max_sockets, 8);
        assert_eq!(cfg.limits.write_timeout.0, Duration::from_secs(5));
        assert_eq!(cfg.limits.max_listeners, DEFAULT_MAX_LISTENERS, "unset keys keep their defaults");
        assert!(toml::from_str::<FileConfig>("[limits]\nmax_sokets = 8\n").is_err());
        let zero = RelayConfig { limits: Limits { max_listeners: 0, ..Limits::default() }, ..RelayConfig::default() };
        assert!(zero.validate().unwrap_err().to_string().contains("limits.max_listeners"));
    }

    #[test]
    fn half_a_cluster_setting_is_an_error_naming_what_is_missing() {
        let node_only = ClusterFileConfig { node: Some("eu".into()), ..Default::default() };
        let err = RelayConfig::default().with_cluster(&[&node_only]).unwrap_err().to_string();
        assert!(err.contains("--cluster DIR"), "{err}");
        let dir_only = ClusterFileConfig { dir: Some("/x".into()), ..Default::default() };
        let err = RelayConfig::default().with_cluster(&[&dir_only]).unwrap_err().to_string();
        assert!(err.contains("--node NODE"), "{err}");
        // Flags over the file, key by key.
        let file = ClusterFileConfig { dir: Some("/x".into()), node: Some("eu".into()), peers: vec!["a:1".into()] };
        let flags = ClusterFileConfig { node: Some("us".into()), ..Default::default() };
        let cfg = RelayConfig::default().with_cluster(&[&file, &flags]).unwrap();
        let cluster = cfg.cluster.clone().unwrap();
        assert_eq!((cluster.node.as_str(), cluster.peers), ("us", vec!["a:1".to_owned()]));
        let bad = RelayConfig { cluster: Some(ClusterConfig { node: "Bad".into(), ..cfg.cluster.unwrap() }), ..cfg };
        assert!(bad.validate().unwrap_err().to_string().contains("bad node name"));
        assert!(RelayConfig::default().with_cluster(&[&ClusterFileConfig::default()]).unwrap().cluster.is_none());
    }

    #[test]
    fn the_example_config_parses_with_every_default_uncommented() {
        let example = include_str!("../../deploy/config/server.toml");
        let file: FileConfig = toml::from_str(example).unwrap();
        assert!(file.limits.is_none() && file.cluster.is_none());
        // `#key = value` and `#[table]` lines are the documented defaults.
        let uncommented: String = example
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest)
                    if rest.starts_with('[') || rest.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')) =>
                {
                    rest
                }
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let file: FileConfig = toml::from_str(&uncommented).expect("every documented key exists");
        let cluster = file.cluster.clone().expect("the example documents [cluster]");
        let config = RelayConfig::default().with_file(&file).with_cluster(&[&cluster]).unwrap();
        config.validate().unwrap();
        assert_eq!(config.cluster.as_ref().map(|c| c.node.as_str()), Some("eu"));
        assert_eq!(
            Limits { lease_expiry: None, ..config.limits.clone() },
            Limits::default(),
            "the documented defaults are the defaults"
        );
    }

    #[test]
    fn invite_addr_prefers_public_addr() {
        let cfg = RelayConfig { public_addr: Some("relay.example.com:7700".into()), ..RelayConfig::default() };
        assert_eq!(cfg.invite_addr("0.0.0.0:7700".parse().unwrap()), "relay.example.com:7700");
        let cfg = RelayConfig::default();
        assert_eq!(cfg.invite_addr("127.0.0.1:4000".parse().unwrap()), "127.0.0.1:4000");
    }
}
