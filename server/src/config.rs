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
        self
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
    }

    #[test]
    fn invite_addr_prefers_public_addr() {
        let cfg = RelayConfig { public_addr: Some("relay.example.com:7700".into()), ..RelayConfig::default() };
        assert_eq!(cfg.invite_addr("0.0.0.0:7700".parse().unwrap()), "relay.example.com:7700");
        let cfg = RelayConfig::default();
        assert_eq!(cfg.invite_addr("127.0.0.1:4000".parse().unwrap()), "127.0.0.1:4000");
    }
}
