//! Where the bench's two sides live. By default both are on loopback. With `--veth`
//! the relay host (the relay process, the servers of the direct baselines, rathole's
//! server) is a network namespace of its own, joined to the client host's by a veth
//! link with MTU 1500, the size of real links: every packet the clients send to the
//! relay crosses a real interface.
//!
//! The client host is a namespace too. The bench enters it before its runtime starts,
//! so every runtime thread and every child process (`overlan nc`, rathole's client)
//! inherits it. Sockets of the relay host are opened from a short-lived thread that
//! enters the relay's namespace. A socket stays in the namespace it was made in.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::Context as _;
use nix::sched::CloneFlags;
use overlan_integration_tests::netns::{self, Hosts};

/// The subnet of the veth link: client host `.1`, relay host `.2`.
const VETH_SUBNET: &str = "10.234.0";

/// The two hosts of this run.
pub(crate) struct Net {
    /// The address the client side binds.
    pub(crate) client_ip: Ipv4Addr,
    /// The address the relay side listens on.
    pub(crate) relay_ip: Ipv4Addr,
    /// The relay host's namespace, when it is not this one.
    relay_ns: Option<String>,
}

static NET: OnceLock<Net> = OnceLock::new();

/// This run's hosts; loopback unless [`enter_veth`] ran first.
pub(crate) fn net() -> &'static Net {
    NET.get_or_init(|| Net { client_ip: Ipv4Addr::LOCALHOST, relay_ip: Ipv4Addr::LOCALHOST, relay_ns: None })
}

/// Makes the two hosts and moves the calling thread into the client host. Call it
/// before any other thread starts; the namespaces go when the returned value drops.
pub(crate) fn enter_veth() -> anyhow::Result<Hosts> {
    anyhow::ensure!(
        netns::can_make_namespaces(),
        "--veth makes network namespaces, which needs root (CAP_SYS_ADMIN) and the `ip` tool"
    );
    let hosts = Hosts::mesh(&["c", "r"], &[(0, 1, VETH_SUBNET)]);
    let (client_ns, relay_ns) = (hosts.names[0].clone(), hosts.names[1].clone());
    // veth's default, said explicitly: the figure is for 1500-byte links.
    netns::ip(&["-n", &client_ns, "link", "set", "l0a", "mtu", "1500"]);
    netns::ip(&["-n", &relay_ns, "link", "set", "l0b", "mtu", "1500"]);
    enter(&client_ns)?;
    let net = Net {
        client_ip: format!("{VETH_SUBNET}.1").parse()?,
        relay_ip: format!("{VETH_SUBNET}.2").parse()?,
        relay_ns: Some(relay_ns),
    };
    anyhow::ensure!(NET.set(net).is_ok(), "the hosts were chosen before --veth made them");
    Ok(hosts)
}

/// Moves the calling thread into the namespace `name`.
fn enter(name: &str) -> anyhow::Result<()> {
    let path = Path::new("/var/run/netns").join(name);
    let ns = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    nix::sched::setns(ns, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering network namespace {name}"))
}

impl Net {
    /// Whether the two sides are on a veth link.
    pub(crate) fn is_veth(&self) -> bool {
        self.relay_ns.is_some()
    }

    /// The setting, for the bench's heading.
    pub(crate) fn describe(&self) -> &'static str {
        if self.is_veth() {
            "on veth between two network namespaces, MTU 1500"
        } else {
            "on loopback"
        }
    }

    /// The words that run a program on the relay host (none on loopback).
    pub(crate) fn relay_host_prefix(&self) -> Vec<String> {
        match &self.relay_ns {
            Some(ns) => ["ip", "netns", "exec", ns].map(str::to_owned).to_vec(),
            None => Vec::new(),
        }
    }

    /// `program` run on the relay host.
    pub(crate) fn relay_host_command(&self, program: &Path) -> tokio::process::Command {
        let mut words = self.relay_host_prefix();
        words.push(program.display().to_string());
        let mut command = tokio::process::Command::new(&words[0]);
        command.args(&words[1..]);
        command
    }

    /// Runs `open` on the relay host: sockets it makes stay there.
    pub(crate) fn on_relay_host<T: Send + 'static>(
        &self,
        open: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let Some(ns) = self.relay_ns.clone() else { return Ok(open()?) };
        std::thread::spawn(move || -> anyhow::Result<T> {
            enter(&ns)?;
            Ok(open()?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread opening a relay-host socket panicked"))?
    }
}
