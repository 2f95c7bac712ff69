//! `overlan-server`: run a relay (the default), or manage its networks and invites.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use overlan_server::config::{FileConfig, RelayConfig};
use overlan_server::relay::{default_invite_token, load_identity};
use overlan_server::store::{unix_now, Store, DEFAULT_NETWORK};
use overlan_server::RelayHandle;
use overlan_shared::config::{format_duration, HumanDuration, Secret};
use overlan_shared::tls::random_token;
use overlan_shared::{Invite, Subnet};

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
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct InviteCmd {
    #[command(subcommand)]
    action: Option<InviteAction>,
    /// Network the invite admits to.
    network: Option<String>,
    /// How many new members may join with it [default: unlimited].
    #[arg(long, value_name = "N")]
    uses: Option<u32>,
    /// How long it stays valid, e.g. 30m, 12h, 7d [default: forever].
    #[arg(long, value_name = "DURATION")]
    expires: Option<HumanDuration>,
}

#[derive(Subcommand, Debug)]
enum InviteAction {
    /// List invites (tokens are stored hashed and cannot be shown again).
    List,
    /// Revoke an invite by id; members it admitted keep their VIPs.
    Revoke {
        /// Invite id from `invite list`.
        id: i64,
    },
}

#[derive(Subcommand, Debug)]
enum NetworkCmd {
    /// Add a virtual network.
    Add {
        /// Name: 1-32 of a-z, 0-9, - and _.
        name: String,
        /// Subnet in CIDR form, e.g. 10.88.0.0/24.
        #[arg(long)]
        subnet: Subnet,
    },
    /// List networks with their subnets and lease counts.
    List,
}

fn resolve_config(global: &Global) -> anyhow::Result<(RelayConfig, Option<String>)> {
    let file = match &global.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let mut config = RelayConfig::default().with_file(&file);
    if let Some(v) = global.listen {
        config.listen = v;
    }
    if let Some(v) = &global.data_dir {
        config.data_dir = v.clone();
    }
    if let Some(v) = &global.public_addr {
        config.public_addr = Some(v.clone());
    }
    if let Some(v) = global.idle_timeout {
        config.idle_timeout = v.0;
    }
    config.validate()?;
    let log = global.log.clone().or(file.log);
    Ok((config, log))
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

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("overlan-server: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let (config, log) = resolve_config(&cli.global)?;
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            init_logging(log.as_deref());
            run_relay(config)
        }
        Command::Info => info(&config),
        Command::Invite(cmd) => invite(&config, cmd),
        Command::Network(cmd) => network(&config, cmd),
    }
}

fn run_relay(config: RelayConfig) -> anyhow::Result<()> {
    let relay = RelayHandle::start(config)?;
    let info = relay.info().clone();
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listen {}", info.local_addr)?;
        writeln!(out, "fingerprint {}", info.fingerprint)?;
        match &info.default_invite {
            Some(invite) => writeln!(out, "invite {invite}")?,
            None => writeln!(
                out,
                "invite none (the default invite was revoked; make one with `overlan-server invite default`)"
            )?,
        }
        out.flush()?;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        #[cfg(unix)]
        {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r?,
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        tokio::signal::ctrl_c().await?;
        anyhow::Ok(())
    })?;
    relay.shutdown();
    Ok(())
}

fn info(config: &RelayConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let identity = load_identity(&config.data_dir)?;
    let store = Store::open(&config.data_dir)?;
    store.ensure_default_network(config.default_subnet)?;
    let token = default_invite_token(&identity, DEFAULT_NETWORK);
    store.add_invite(DEFAULT_NETWORK, &token, "default", None, None)?;
    println!("listen {}", config.listen);
    println!("fingerprint {}", identity.fingerprint());
    if store.invite_revoked(&token)? {
        println!("invite none (the default invite was revoked; make one with `overlan-server invite default`)");
    } else {
        println!("invite {}", invite_uri(config, DEFAULT_NETWORK, token)?);
    }
    Ok(())
}

fn invite_uri(config: &RelayConfig, network: &str, token: String) -> anyhow::Result<Invite> {
    let identity = load_identity(&config.data_dir)?;
    Ok(Invite {
        relay: config.invite_addr(config.listen),
        network: network.to_owned(),
        fingerprint: identity.fingerprint(),
        token: Secret::new(token),
    })
}

fn invite(config: &RelayConfig, cmd: InviteCmd) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let store = Store::open(&config.data_dir)?;
    store.ensure_default_network(config.default_subnet)?;
    match (cmd.action, cmd.network) {
        (Some(InviteAction::List), _) => {
            println!("{:<5} {:<16} {:<9} {:<8} {:<22} STATUS", "ID", "NETWORK", "KIND", "USES", "EXPIRES");
            let now = unix_now();
            for row in store.invites()? {
                let uses = match row.max_uses {
                    Some(max) => format!("{}/{max}", row.uses),
                    None => format!("{}/-", row.uses),
                };
                let expires = match row.expires_at {
                    Some(t) if t <= now => "expired".to_owned(),
                    Some(t) => format!("in {}", format_duration(std::time::Duration::from_secs((t - now) as u64))),
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
                println!("{:<5} {:<16} {:<9} {:<8} {:<22} {status}", row.id, row.network, row.kind, uses, expires);
            }
            Ok(())
        }
        (Some(InviteAction::Revoke { id }), _) => {
            store.revoke_invite(id)?;
            println!("revoked invite {id}");
            Ok(())
        }
        (None, Some(network)) => {
            let token = random_token(20);
            store.network(&network)?;
            store.add_invite(&network, &token, "issued", cmd.uses, cmd.expires.map(|d| d.0))?;
            println!("{}", invite_uri(config, &network, token)?);
            Ok(())
        }
        (None, None) => {
            anyhow::bail!("invite: name a NETWORK (e.g. `invite default`), or use `invite list` / `invite revoke ID`")
        }
    }
}

fn network(config: &RelayConfig, cmd: NetworkCmd) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let store = Store::open(&config.data_dir)?;
    store.ensure_default_network(config.default_subnet)?;
    match cmd {
        NetworkCmd::Add { name, subnet } => {
            let net = store.add_network(&name, subnet)?;
            println!("added network {} {}", net.name, net.subnet);
            println!("make an invite with: overlan-server invite {}", net.name);
        }
        NetworkCmd::List => {
            println!("{:<16} {:<18} LEASES", "NETWORK", "SUBNET");
            for net in store.networks()? {
                println!("{:<16} {:<18} {}", net.name, net.subnet.to_string(), store.lease_count(net.id)?);
            }
        }
    }
    Ok(())
}
