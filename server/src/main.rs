//! `overlan-server`: run a relay (the default), or manage its networks, invites and
//! leases.

use std::io::Write as _;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use overlan_server::config::{ClusterFileConfig, FileConfig, RelayConfig};
use overlan_server::relay::{open_store, operator_invite_addr, operator_listen_addr, RelayState};
use overlan_server::store::unix_now;
use overlan_server::RelayHandle;
use overlan_shared::cluster::ClusterDir;
use overlan_shared::config::{format_duration, HumanDuration};
use overlan_shared::tls::random_token;
use overlan_shared::Subnet;

/// overlan relay node: clients join it, get a permanent virtual IP, and talk through
/// virtual streams, datagrams and LAN broadcasts.
#[derive(Parser, Debug)]
#[command(name = "overlan-server", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args, Debug)]
struct Global {
    /// TOML config file; flags and environment variables override it.
    #[arg(long, global = true, env = "OVERLAN_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// QUIC listen address [default: 0.0.0.0:7700].
    #[arg(long, global = true, env = "OVERLAN_LISTEN", value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// State directory: lease database and relay certificate [default: ./overlan-data].
    #[arg(long, global = true, env = "OVERLAN_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// HOST:PORT written into invites [default: this host's address and the listen port].
    #[arg(long, global = true, env = "OVERLAN_PUBLIC_ADDR", value_name = "HOST:PORT")]
    public_addr: Option<String>,
    /// Session idle timeout, e.g. 10s [default: 10s].
    #[arg(long, global = true, env = "OVERLAN_IDLE_TIMEOUT", value_name = "DURATION")]
    idle_timeout: Option<HumanDuration>,
    /// Log filter, e.g. info or overlan_server=debug [default: info].
    #[arg(long, global = true, env = "OVERLAN_LOG", value_name = "FILTER")]
    log: Option<String>,
    /// Run as a node of the cluster whose credentials are in DIR (from `ca issue`).
    #[arg(long, global = true, env = "OVERLAN_CLUSTER", value_name = "DIR")]
    cluster: Option<PathBuf>,
    /// This node's name in the cluster.
    #[arg(long, global = true, env = "OVERLAN_NODE", value_name = "NODE")]
    node: Option<String>,
    /// A peer node to link to (its client port); repeat for several. Links are
    /// bidirectional: a node without --peer accepts links from nodes that name it.
    #[arg(long = "peer", global = true, value_name = "HOST:PORT")]
    peers: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the relay (what happens with no command).
    Run,
    /// Print the relay's `listen`, `fingerprint` and default `invite` lines without
    /// running it (creates the certificate and database on first use).
    Info,
    /// Print a new invite URI for NETWORK, or list/revoke invites.
    Invite(InviteCmd),
    /// Manage virtual networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// List or release VIP leases.
    #[command(subcommand)]
    Lease(LeaseCmd),
    /// Make the cluster CA and node credentials.
    #[command(subcommand)]
    Ca(CaCmd),
}

#[derive(Subcommand, Debug)]
enum CaCmd {
    /// Create a cluster CA in DIR.
    Init {
        /// The cluster directory.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Issue NODE's certificate and key into DIR, with a slot of its own (its block of
    /// every network's subnet); issuing again keeps the slot.
    Issue {
        /// Node name: 1-63 of a-z 0-9 -.
        node: String,
        /// The cluster directory.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum LeaseCmd {
    /// List leases: network, VIP, identity, instance, when made and last seen.
    List {
        /// Only this network's leases.
        network: Option<String>,
    },
    /// Release a lease: its VIP goes back to the pool (reused after the relay restarts),
    /// and its holder gets a new VIP at its next join.
    Release {
        /// The network.
        network: String,
        /// The VIP to release.
        vip: std::net::Ipv4Addr,
    },
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct InviteCmd {
    #[command(subcommand)]
    action: Option<InviteAction>,
    /// Network the invite admits to.
    network: Option<String>,
    /// How many new members may join with it, at least 1 [default: unlimited].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    uses: Option<u32>,
    /// How long it stays valid, e.g. 30m, 12h, 7d, 2w (a unit is required) [default: forever].
    #[arg(long, value_name = "DURATION", value_parser = positive_duration)]
    expires: Option<HumanDuration>,
    /// What the invite is for or whom it went to, shown by `invite list`.
    #[arg(long, value_name = "TEXT")]
    label: Option<String>,
}

/// A name a network may have (a bad one is a usage error, as every other bad argument).
fn network_name(text: &str) -> Result<String, String> {
    match overlan_shared::invite::valid_network_name(text) {
        true => Ok(text.to_owned()),
        false => Err("use 1-32 of a-z, 0-9, - and _, starting with a letter or digit".into()),
    }
}

/// A duration longer than zero (an invite that expires at once could never be used).
fn positive_duration(text: &str) -> Result<HumanDuration, String> {
    let d: HumanDuration = text.parse().map_err(|e| format!("{e}"))?;
    if d.0.is_zero() {
        return Err("an invite that expires at once could never be used; give a duration above 0".into());
    }
    Ok(d)
}

#[derive(Subcommand, Debug)]
enum InviteAction {
    /// List invites (tokens are stored hashed and cannot be shown again).
    List,
    /// Revoke an invite by id (or token); members it admitted keep their VIPs.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["id", "token"])))]
    Revoke {
        /// Invite id from `invite list` (each node of a cluster numbers invites its own way).
        id: Option<i64>,
        /// The invite's token as `invite list` shows it (the same on every node).
        #[arg(long, value_name = "HEX")]
        token: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum NetworkCmd {
    /// Add a virtual network.
    Add {
        /// Name: 1-32 of a-z, 0-9, - and _.
        #[arg(value_parser = network_name)]
        name: String,
        /// Subnet in CIDR form, e.g. 10.88.0.0/24.
        #[arg(long)]
        subnet: Subnet,
        /// Instances (VIPs) one identity may hold here [default: the relay's
        /// limits.instances_per_identity, 16].
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        max_instances: Option<u32>,
    },
    /// Change a network's settings.
    Set {
        /// The network.
        name: String,
        /// Instances (VIPs) one identity may hold here; `default` for the relay's default.
        #[arg(long, value_name = "N|default")]
        max_instances: String,
    },
    /// List networks with their subnets, instance caps and lease counts.
    List,
    /// Remove a network with its invites and leases: a running relay disconnects its
    /// members within a second, and so does every node of the cluster. `default` stays.
    Remove {
        /// The network.
        name: String,
    },
}

fn resolve_config(global: &Global) -> anyhow::Result<(RelayConfig, Option<String>)> {
    let file = match &global.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    // Flags and environment variables (clap merges those two) are one more layer of the
    // same shape, over the file.
    let flags = FileConfig {
        listen: global.listen,
        data_dir: global.data_dir.clone(),
        public_addr: global.public_addr.clone(),
        idle_timeout: global.idle_timeout,
        log: global.log.clone(),
        ..FileConfig::default()
    };
    let cluster_flags =
        ClusterFileConfig { dir: global.cluster.clone(), node: global.node.clone(), peers: global.peers.clone() };
    let config = RelayConfig::default()
        .with_file(&file)
        .with_file(&flags)
        .with_cluster(&[&file.cluster.clone().unwrap_or_default(), &cluster_flags])?;
    config.validate()?;
    Ok((config, flags.log.or(file.log)))
}

fn init_logging(filter: Option<&str>) {
    let filter =
        filter.map(str::to_owned).or_else(|| std::env::var("RUST_LOG").ok()).unwrap_or_else(|| "info".to_owned());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// `overlan-server ca …` parsed on its own: it makes credentials, and the relay's
/// options (global, so that they may follow any other command) mean nothing to it, so
/// its help does not list them.
#[derive(Parser, Debug)]
#[command(name = "overlan-server")]
struct CaCli {
    #[command(subcommand)]
    command: CaTop,
}

#[derive(Subcommand, Debug)]
enum CaTop {
    /// Make the cluster CA and node credentials.
    #[command(subcommand)]
    Ca(CaCmd),
}

/// The start-up `invite` line when the operator revoked the default invite.
const DEFAULT_INVITE_REVOKED: &str =
    "invite none (the default invite was revoked; make one with `overlan-server invite default`)";

fn main() {
    if std::env::args_os().nth(1).is_some_and(|a| a == "ca") {
        let CaTop::Ca(cmd) = CaCli::parse().command;
        if let Err(e) = ca(cmd) {
            eprintln!("overlan-server: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("overlan-server: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::Ca(cmd)) = cli.command {
        return ca(cmd);
    }
    let (config, log) = resolve_config(&cli.global)?;
    overlan_server::relay::check_data_dir(&config)?;
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            init_logging(log.as_deref());
            run_relay(config)
        }
        Command::Info => info(&config),
        Command::Invite(cmd) => invite(&config, cmd),
        Command::Network(cmd) => network(&config, cmd),
        Command::Lease(cmd) => lease(&config, cmd),
        Command::Ca(_) => unreachable!("handled above"),
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM` (UTC).
fn utc_minute(unix: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix.max(0) as u64);
    let text = humantime::format_rfc3339_seconds(at).to_string(); // 2026-11-22T08:40:00Z
    text.get(..16).unwrap_or(&text).replacen('T', " ", 1)
}

fn ca(cmd: CaCmd) -> anyhow::Result<()> {
    match cmd {
        CaCmd::Init { dir } => {
            let fingerprint = ClusterDir::new(&dir).init()?;
            println!("ca {}", ClusterDir::new(&dir).ca_cert_path().display());
            println!("fingerprint {fingerprint}");
        }
        CaCmd::Issue { node, dir } => {
            let issued = ClusterDir::new(&dir).issue(&node)?;
            let verb = if issued.reissued { "reissued" } else { "issued" };
            println!("{verb} {} slot {} {}", issued.node, issued.slot, issued.path.display());
        }
    }
    Ok(())
}

fn run_relay(config: RelayConfig) -> anyhow::Result<()> {
    // Signals are registered before the start-up lines go out, so a supervisor that
    // stops the relay as soon as it has read them is obeyed, not fatal.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    #[cfg(unix)]
    let (mut int, mut term) = {
        use tokio::signal::unix::{signal, SignalKind};
        let _entered = rt.enter();
        (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?)
    };
    let relay = RelayHandle::start(config)?;
    let info = relay.info().clone();
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listen {}", info.local_addr)?;
        writeln!(out, "fingerprint {}", info.fingerprint)?;
        match &info.default_invite {
            Some(invite) => writeln!(out, "invite {invite}")?,
            None => writeln!(out, "{DEFAULT_INVITE_REVOKED}")?,
        }
        out.flush()?;
    }
    rt.block_on(async {
        #[cfg(unix)]
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        #[cfg(not(unix))]
        tokio::signal::ctrl_c().await?;
        anyhow::Ok(())
    })?;
    relay.shutdown();
    Ok(())
}

fn info(config: &RelayConfig) -> anyhow::Result<()> {
    let state = RelayState::open(config)?;
    println!("listen {}", operator_listen_addr(config));
    println!("fingerprint {}", state.pin());
    match state.default_invite(operator_invite_addr(config)) {
        Some(invite) => println!("invite {invite}"),
        None => println!("{DEFAULT_INVITE_REVOKED}"),
    }
    Ok(())
}

fn invite(config: &RelayConfig, cmd: InviteCmd) -> anyhow::Result<()> {
    match (cmd.action, cmd.network) {
        (Some(InviteAction::List), _) => {
            let store = open_store(config)?;
            println!(
                "{:<5} {:<16} {:<16} {:<8} {:<8} {:<17} {:<12} {:<8} TOKEN",
                "ID", "NETWORK", "LABEL", "KIND", "USES", "CREATED (UTC)", "EXPIRES", "STATUS"
            );
            let now = unix_now();
            for row in store.invites()? {
                let uses = match row.max_uses {
                    Some(max) => format!("{}/{max}", row.uses),
                    None => format!("{}/-", row.uses),
                };
                let expires = match row.expires_at {
                    Some(t) if t <= now => "expired".to_owned(),
                    Some(t) => {
                        // Whole minutes past the first: a second gone since `--expires 1h`
                        // still reads "in 1h", not "in 3599s".
                        let secs = (t - now) as u64;
                        let shown = if secs >= 60 { (secs + 30) / 60 * 60 } else { secs };
                        format!("in {}", format_duration(std::time::Duration::from_secs(shown)))
                    }
                    None => "never".to_owned(),
                };
                let status = if row.revoked {
                    "revoked"
                } else if row.expires_at.is_some_and(|t| t <= now) {
                    "expired"
                } else if row.max_uses.is_some_and(|m| row.uses >= m) {
                    "used up"
                } else {
                    "active"
                };
                let label = if row.label.is_empty() { "-" } else { row.label.as_str() };
                println!(
                    "{:<5} {:<16} {:<16} {:<8} {:<8} {:<17} {:<12} {status:<8} {}",
                    row.id,
                    row.network,
                    label,
                    row.kind,
                    uses,
                    utc_minute(row.created_at),
                    expires,
                    row.token
                );
            }
            Ok(())
        }
        (Some(InviteAction::Revoke { id, token }), _) => {
            let store = open_store(config)?;
            let id = match (id, token) {
                (Some(id), _) => id,
                (None, Some(token)) => store.invite_by_token(&token)?,
                (None, None) => unreachable!("clap requires one"),
            };
            if store.revoke_invite(id)? {
                println!("revoked invite {id}");
            } else {
                println!("invite {id} was revoked already");
            }
            Ok(())
        }
        (None, Some(network)) => {
            let state = RelayState::open(config)?;
            state.store.network(&network)?;
            let token = random_token(20);
            let id = state.store.add_invite(&network, &token, "issued", cmd.uses, cmd.expires.map(|d| d.0))?;
            if let Some(label) = &cmd.label {
                state.store.set_invite_label(id, label)?;
            }
            println!("{}", state.invite(operator_invite_addr(config), &network, token));
            Ok(())
        }
        (None, None) => {
            anyhow::bail!("invite: name a NETWORK (e.g. `invite default`), or use `invite list` / `invite revoke ID`")
        }
    }
}

fn network(config: &RelayConfig, cmd: NetworkCmd) -> anyhow::Result<()> {
    let mut store = open_store(config)?;
    let default_cap = config.limits.instances_per_identity;
    let cap_text = |max: Option<u32>| match max {
        Some(n) => n.to_string(),
        None => format!("{default_cap} (default)"),
    };
    match cmd {
        NetworkCmd::Add { name, subnet, max_instances } => {
            // Each node of a cluster hands out VIPs from its sixteenth of the subnet.
            if config.cluster.is_some() && overlan_shared::cluster::slot_block(subnet, 0).is_none() {
                anyhow::bail!(
                    "network {name}: {subnet} is too small for a cluster, whose nodes each take a sixteenth of it: give a /24 or larger"
                );
            }
            let mut net = store.add_network(&name, subnet)?;
            if max_instances.is_some() {
                net = store.set_max_instances(&name, max_instances)?;
            }
            println!("added network {} {}", net.name, net.subnet);
            println!("make an invite with: overlan-server invite {}", net.name);
        }
        NetworkCmd::Set { name, max_instances } => {
            let max = match max_instances.as_str() {
                "default" => None,
                text => match text.parse::<u32>() {
                    Ok(n) if n > 0 => Some(n),
                    _ => anyhow::bail!("--max-instances {text:?}: give a number of at least 1, or `default`"),
                },
            };
            let net = store.set_max_instances(&name, max)?;
            println!("network {}: max instances per identity {}", net.name, cap_text(net.max_instances));
        }
        NetworkCmd::Remove { name } => {
            let removed = store.remove_network(&name)?;
            println!(
                "removed network {name} ({} leases released, {} invites deleted)",
                removed.leases, removed.invites
            );
        }
        NetworkCmd::List => {
            println!("{:<16} {:<18} {:<14} LEASES", "NETWORK", "SUBNET", "MAX-INSTANCES");
            for net in store.networks()? {
                let count = store.lease_count(net.id)?;
                println!("{:<16} {:<18} {:<14} {count}", net.name, net.subnet.to_string(), cap_text(net.max_instances));
            }
        }
    }
    Ok(())
}

/// A unix time as an age, e.g. "3h ago".
fn ago(now: i64, t: i64) -> String {
    let secs = (now - t).max(0) as u64;
    let rounded = match secs {
        0..60 => secs,
        60..3600 => secs / 60 * 60,
        3600..86_400 => secs / 3600 * 3600,
        _ => secs / 86_400 * 86_400,
    };
    format!("{} ago", format_duration(std::time::Duration::from_secs(rounded)))
}

fn lease(config: &RelayConfig, cmd: LeaseCmd) -> anyhow::Result<()> {
    let mut store = open_store(config)?;
    match cmd {
        LeaseCmd::List { network } => {
            let now = unix_now();
            println!(
                "{:<16} {:<15} {:<16} {:<16} {:<12} LAST-SEEN",
                "NETWORK", "VIP", "IDENTITY", "INSTANCE", "CREATED"
            );
            for l in store.lease_rows(network.as_deref())? {
                let identity = l.identity.get(..16).unwrap_or(&l.identity);
                let instance = if l.instance.is_empty() { "-" } else { &l.instance };
                let (created, seen) = (ago(now, l.created_at), ago(now, l.last_seen));
                println!(
                    "{:<16} {:<15} {identity:<16} {instance:<16} {created:<12} {seen}",
                    l.network,
                    l.vip.to_string()
                );
            }
        }
        LeaseCmd::Release { network, vip } => {
            let l = store.release_lease(&network, vip)?;
            let instance = if l.instance.is_empty() { "(none)" } else { &l.instance };
            println!("released {} in network {} (identity {}, instance {instance})", l.vip, l.network, l.identity);
        }
    }
    Ok(())
}
