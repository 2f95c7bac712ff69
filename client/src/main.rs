//! `overlan`: join an overlan network from the command line — `up`, `ip`, and `nc` for
//! streams, datagrams and broadcasts.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use futures_util::FutureExt;
use overlan_client::forward::PortMap;
use overlan_client::{
    control, default_identity_path, forget_lease, lease_file_path, load_lease, load_or_create_identity, save_lease,
    Client, Error, Invite, JoinOptions, SessionState,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

mod progress;
mod stdio;
use progress::{Counted, Progress};

/// overlan client: join a virtual LAN through a relay.
#[derive(Parser, Debug)]
#[command(name = "overlan", version, about, long_about = None)]
struct Cli {
    /// Invite URI from the relay operator (overlan://HOST:PORT/NETWORK?fp=..&token=..).
    #[arg(long, global = true, env = "OVERLAN_INVITE", value_name = "URI", hide_env_values = true)]
    invite: Option<String>,
    /// Identity file (certificate and key), created on first use [default: ~/.config/overlan/identity.pem].
    #[arg(long, global = true, env = "OVERLAN_IDENTITY", value_name = "PATH")]
    identity: Option<PathBuf>,
    /// Instance name: several instances on one machine each get their own VIP.
    #[arg(long, global = true, env = "OVERLAN_NAME", value_name = "INSTANCE")]
    name: Option<String>,
    /// Relay to use instead of the invite's address (HOST:PORT); repeat for several, in
    /// order of preference: the client moves to the next when its relay is unreachable
    /// or dies (any node of a cluster accepts the same invite).
    #[arg(long = "relay", global = true, value_name = "HOST:PORT")]
    relays: Vec<String>,
    /// Log filter for diagnostics on stderr, e.g. info or overlan_client=debug [default: warn].
    #[arg(long, global = true, env = "OVERLAN_LOG", value_name = "FILTER")]
    log: Option<String>,
    /// Client config file (TOML: invite, identity, name, relays, log); flags and
    /// environment variables override it [default: ~/.config/overlan/config.toml if it exists].
    #[arg(long, global = true, env = "OVERLAN_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The forwards and exposes of the config file (`up` runs them).
    #[arg(skip)]
    port_maps: Vec<PortMap>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Join, print `vip A.B.C.D`, and stay connected (reconnecting) until Ctrl-C or
    /// SIGTERM; other commands of this instance (ip, status, peers) use this session.
    Up,
    /// Print this instance's VIP alone (from its running `up`, else by joining).
    Ip,
    /// This instance's session: VIP, network, relay, state, since when, sockets open
    /// (from its running `up`; exit 1 if none runs).
    Status(JsonArg),
    /// The other members of the network: VIP, instance name, online or offline, last seen.
    Peers(JsonArg),
    /// Netcat over the overlay: streams, datagrams (-u) and broadcasts (-u -b).
    Nc(NcArgs),
    /// Give this instance's VIP back: the relay deletes its lease and the next join gets
    /// a new VIP (stop its `overlan up` first).
    Leave,
    /// A local port that leads to VIP:PORT across the overlay, like `ssh -L`; stays in
    /// the foreground (through the running `up` of this instance, if any).
    Forward(ForwardArgs),
    /// This client's VIP:PORT leads to a local service, like `ssh -R`; stays in the
    /// foreground (through the running `up` of this instance, if any).
    Expose(ExposeArgs),
    /// Linux, root or CAP_NET_ADMIN: join, print `vip A.B.C.D`, and hold the VIP on a
    /// network interface (LAN broadcasts included) until Ctrl-C or SIGTERM, which remove
    /// the interface. This instance's session: not beside its `up`.
    Tun {
        /// Interface name [default: the kernel's next overlanN].
        #[arg(long, value_name = "NAME")]
        dev: Option<String>,
    },
    /// Linux, root: run PROGRAM in a network namespace of its own whose only interfaces
    /// are loopback and an overlay interface holding this instance's VIP; PROGRAM's exit
    /// status is overlan's. Two instances (--name) run side by side with the same ports.
    Run {
        /// The program and its arguments.
        #[arg(value_name = "PROGRAM", required = true, num_args = 1.., trailing_var_arg = true, allow_hyphen_values = true)]
        program: Vec<String>,
    },
    /// Print a shell completion script: `overlan completions bash > /etc/bash_completion.d/overlan`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Args, Debug)]
struct ForwardArgs {
    /// UDP instead of TCP: each local source is a flow of its own; idle flows expire.
    #[arg(long)]
    udp: bool,
    /// With --udp: seconds a flow lives without traffic.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    idle: u64,
    /// Where to listen: PORT (on 127.0.0.1) or IP:PORT (0.0.0.0:PORT for every interface).
    #[arg(value_name = "LOCAL_ADDR", value_parser = overlan_client::forward::parse_local_addr)]
    local: std::net::SocketAddr,
    /// Where it leads: VIP:PORT, or NAME:PORT for a member's instance name.
    #[arg(value_name = "VIP:PORT", value_parser = parse_overlay_target)]
    target: String,
}

#[derive(Args, Debug)]
struct ExposeArgs {
    /// UDP instead of TCP: each remote source is a flow of its own; idle flows expire.
    #[arg(long)]
    udp: bool,
    /// With --udp: seconds a flow lives without traffic.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    idle: u64,
    /// The port of this client's VIP.
    #[arg(value_name = "PORT")]
    port: u16,
    /// The local service: PORT (on 127.0.0.1) or IP:PORT.
    #[arg(value_name = "TARGET_ADDR", value_parser = overlan_client::forward::parse_local_addr)]
    target: std::net::SocketAddr,
}

/// `VIP:PORT` or `NAME:PORT`, checked as the command line is read.
fn parse_overlay_target(text: &str) -> Result<String, String> {
    let (host, port) = text.rsplit_once(':').ok_or_else(|| format!("{text:?}: expected VIP:PORT or NAME:PORT"))?;
    if parse_port(port)? == 0 {
        return Err(format!("{text:?}: port 0 cannot be connected to"));
    }
    parse_target(&[host.to_owned(), port.to_owned()])?;
    Ok(text.to_owned())
}

#[derive(Args, Debug)]
struct JsonArg {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct NcArgs {
    /// Listen on PORT instead of connecting.
    #[arg(short = 'l', long)]
    listen: bool,
    /// Datagrams instead of a stream: one stdin line is one datagram, one received datagram one line.
    #[arg(short = 'u', long)]
    udp: bool,
    /// With -u: bind PORT and send every stdin line as a broadcast to PORT.
    #[arg(short = 'b', long, requires = "udp")]
    broadcast: bool,
    /// Quit SECS seconds after stdin ends (0: at once). A stream waits until its input
    /// was delivered, then reads the peer for at most SECS more; datagram modes stop
    /// receiving [default: a stream ends when the peer closes; -u runs until Ctrl-C].
    #[arg(short = 'q', long, value_name = "SECS")]
    quit_after: Option<u64>,
    /// Close the sending direction when stdin ends (as netcat's -N). A stream always does
    /// so, since the peer is owed an end; accepted so netcat command lines work unchanged.
    #[arg(short = 'N', long = "shutdown")]
    shutdown: bool,
    /// Prefix each received datagram line with its source, `A.B.C.D:PORT `.
    #[arg(long)]
    show_source: bool,
    /// `VIP PORT` to connect or send to, or `PORT` with -l / -b.
    #[arg(value_name = "ARGS", num_args = 1..=2, required = true)]
    args: Vec<String>,
}

fn init_logging(filter: Option<&str>) {
    let filter = filter.map(str::to_owned).unwrap_or_else(|| "warn".to_owned());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The command line, with each subcommand's help listing only the options it takes:
/// clap gives every subcommand the global options, except where the subcommand has an
/// argument of that id already, so those a subcommand ignores get a hidden copy there
/// (still accepted, as the global option, but not in its help or completions).
fn command() -> clap::Command {
    use clap::CommandFactory;
    const JOIN: [&str; 2] = ["invite", "relays"];
    const ALL: [&str; 6] = ["invite", "relays", "identity", "name", "log", "config"];
    let unused: [(&str, &[&str]); 2] = [("status", &JOIN), ("completions", &ALL)];
    let cmd = Cli::command();
    let hidden = |id: &str| {
        let arg = cmd.get_arguments().find(|a| a.get_id() == id).expect("a global option of Cli");
        arg.clone().hide(true)
    };
    let hide: Vec<(&str, Vec<clap::Arg>)> =
        unused.iter().map(|(sub, ids)| (*sub, ids.iter().map(|id| hidden(id)).collect())).collect();
    hide.into_iter().fold(cmd, |cmd, (sub, args)| cmd.mut_subcommand(sub, |c| c.args(args)))
}

fn main() -> ExitCode {
    use clap::FromArgMatches;
    let cli = Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit());
    let cli = match cli.with_config() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("overlan: {}", e.message.unwrap_or_default());
            return ExitCode::from(e.code);
        }
    };
    init_logging(cli.log.as_deref());
    // One-shot commands, `nc`, `tun` and `run` run on one thread, measured alternating
    // both builds: a stream through `nc` moved 1 GiB about 12% faster than on the
    // multi-threaded runtime, and through TUN the 64-byte round trip fell from 476-494
    // to 256-294 us at the same or better throughput (fewer cross-thread wake-ups per
    // packet). Commands that serve many connections at once keep a thread per core:
    // `forward` moved 0.91-0.94x socat's throughput this way, 0.82-0.84x on one thread.
    let serving = matches!(cli.command, Command::Up | Command::Forward(_) | Command::Expose(_));
    let mut builder = if serving {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("overlan: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            if let Some(message) = &e.message {
                eprintln!("overlan: {message}");
            }
            ExitCode::from(e.code)
        }
    };
    // Tasks still blocked on stdin (a tokio blocking read) must not hold the exit.
    rt.shutdown_background();
    code
}

/// Exit code when the relay refused this client for good (unauthorized, replaced by a
/// newer session of the same identity and instance, network full): restarting will not
/// help, so service managers can be told not to (`RestartPreventExitStatus=3`).
const EXIT_REFUSED: u8 = 3;

/// What ends the program early: the line for stderr (none for a signal) and the exit
/// status.
struct CliError {
    message: Option<String>,
    code: u8,
}

impl CliError {
    /// The relay refused this client for good.
    fn refused(message: String) -> Self {
        Self { message: Some(message), code: EXIT_REFUSED }
    }

    /// The command line is wrong (as clap's own usage errors: exit 2).
    fn usage(message: String) -> Self {
        Self { message: Some(message), code: 2 }
    }

    /// A signal ended the command.
    fn interrupted(signal: Signal) -> Self {
        Self { message: None, code: signal.exit_code() }
    }

    /// Whether a signal ended the command (a long-running session, `up` or `tun`, then
    /// ends with status 0 whatever stage it was at).
    fn is_interrupted(&self) -> bool {
        self.message.is_none()
    }
}

impl From<String> for CliError {
    fn from(message: String) -> Self {
        Self { message: Some(message), code: 1 }
    }
}

impl From<&str> for CliError {
    fn from(message: &str) -> Self {
        Self::from(message.to_owned())
    }
}

/// How long a join may go unanswered before the user is told what to check.
const JOIN_HINT_AFTER: Duration = Duration::from_secs(2);
/// Whether the hint was given (once per process: `up` retries a first join).
static HINTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

async fn join(cli: &Cli) -> Result<Client, CliError> {
    join_with(cli, |options| options).await
}

/// Joins with the options `mode` sets (TUN mode, only with a VIP held already).
async fn join_with(cli: &Cli, mode: impl FnOnce(JoinOptions) -> JoinOptions) -> Result<Client, CliError> {
    join_attempt(cli, mode).await?.map_err(join_failure)
}

/// Joins only with the VIP the instance holds ([`JoinOptions::existing_only`]). A relay
/// of an earlier version refuses the hello field it does not know: then the join is
/// plain (a VIP may be leased, as that version always did).
/// A signal ends it.
async fn join_holding(cli: &Cli, shutdown: &mut Shutdown) -> Result<Result<Client, Error>, CliError> {
    let joining = async {
        match join_attempt(cli, |options| options.existing_only(true)).await? {
            Err(Error::Relay { message, .. }) if message.contains("existing_only") => {
                tracing::debug!(%message, "the relay predates joins with a held VIP only; joining plainly");
                join_attempt(cli, |options| options).await
            }
            joined => Ok(joined),
        }
    };
    tokio::select! {
        joined = joining => joined,
        signal = shutdown.recv() => Err(CliError::interrupted(signal)),
    }
}

/// A failed join as the command's error: exit 3 when the relay refused for good.
fn join_failure(e: Error) -> CliError {
    let message = format!("join: {e}");
    if e.is_terminal() {
        CliError::refused(message)
    } else {
        CliError::from(message)
    }
}

/// Joins with the options `mode` sets; the outer error is the command line's (bad
/// usage, identity), the inner one the join's.
async fn join_attempt(
    cli: &Cli,
    mode: impl FnOnce(JoinOptions) -> JoinOptions,
) -> Result<Result<Client, overlan_client::Error>, CliError> {
    if !overlan_shared::wire::control::valid_instance(cli.name()) {
        return Err(CliError::usage(format!(
            "--name {:?}: an instance name is at most 64 of A-Z a-z 0-9 . _ -",
            cli.name()
        )));
    }
    // A missing or malformed invite is a usage error (exit 2), like a bad argument.
    let text = cli.invite.as_deref().ok_or_else(|| {
        CliError::usage(
            "no invite: pass --invite URI or set OVERLAN_INVITE (ask the relay operator; the relay prints one at start)"
                .into(),
        )
    })?;
    let invite: Invite = text.parse().map_err(|e| CliError::usage(format!("invite: {e}")))?;
    let path = identity_path(cli);
    let identity = load_or_create_identity(&path).map_err(|e| e.to_string())?;
    for relay in &cli.relays {
        if !relay.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) {
            return Err(CliError::usage(format!("--relay {relay:?}: expected HOST:PORT")));
        }
    }
    // In a cluster the VIP's signed lease is kept beside the identity, so joining any
    // node (another --relay, another day) gives the same VIP.
    let leases = lease_file_path(&path);
    let network = invite.network.clone();
    let lease = load_lease(&leases, &network, cli.name());
    let relay_hint = cli.relays.first().cloned().unwrap_or_else(|| invite.relay.clone());
    let options = mode(
        JoinOptions::new(invite, identity)
            .instance(cli.name().to_owned())
            .relays(cli.relays.clone())
            .lease(lease.clone()),
    );
    // A relay that does not answer is said at once, not after the handshake times out;
    // a name that does not resolve is said as such, not as a relay that does not answer.
    let lookup = relay_hint
        .parse::<std::net::SocketAddr>()
        .is_err()
        .then(|| tokio::spawn(tokio::net::lookup_host(relay_hint.clone())));
    let joining = Client::join(options);
    tokio::pin!(joining);
    let joined = tokio::select! {
        joined = &mut joining => joined,
        _ = tokio::time::sleep(JOIN_HINT_AFTER), if !HINTED.swap(true, std::sync::atomic::Ordering::Relaxed) => {
            eprintln!("overlan: {} (still trying)", join_hint(&relay_hint, lookup).await);
            joining.await
        }
    };
    let client = match joined {
        Ok(client) => client,
        Err(e) => return Ok(Err(e)),
    };
    if let Some(proof) = client.lease().filter(|p| Some(p) != lease.as_ref()) {
        if let Err(e) = save_lease(&leases, &network, cli.name(), &proof) {
            tracing::warn!(error = %e, "could not keep the lease; another node may give another VIP");
        }
    }
    Ok(Ok(client))
}

/// What to tell a user whose join has not been answered for [`JOIN_HINT_AFTER`]:
/// `lookup` resolves the relay's name, if it is one.
async fn join_hint(
    relay: &str,
    lookup: Option<tokio::task::JoinHandle<std::io::Result<impl Iterator<Item = std::net::SocketAddr>>>>,
) -> String {
    let host = relay.rsplit_once(':').map_or(relay, |(host, _)| host);
    match lookup {
        Some(lookup) if !lookup.is_finished() => {
            lookup.abort();
            format!("the relay's name {host} has not resolved yet: is DNS reachable from here?")
        }
        Some(lookup) => match lookup.await {
            Ok(Err(e)) => format!("cannot resolve the relay's name {host}: {e}"),
            _ => no_answer(relay),
        },
        None => no_answer(relay),
    }
}

fn no_answer(relay: &str) -> String {
    let port = relay.rsplit_once(':').map_or("7700", |(_, p)| p);
    format!("no answer from relay {relay} yet: is it running, and is UDP port {port} reachable from here?")
}

/// `up`'s first join: a relay that cannot be reached yet is retried (with backoff, said
/// once) until it answers, a refusal for good ends it, and so does a signal.
async fn join_until_up(cli: &Cli, shutdown: &mut Shutdown) -> Result<Client, CliError> {
    let mut delay = Duration::from_secs(1);
    let mut said = false;
    loop {
        let attempt = tokio::select! {
            joined = join(cli) => joined,
            signal = shutdown.recv() => return Err(CliError::interrupted(signal)),
        };
        match attempt {
            Ok(client) => return Ok(client),
            Err(e) if e.code != 1 => return Err(e),
            Err(e) => {
                if !said {
                    if let Some(message) = &e.message {
                        eprintln!("overlan: {message}; retrying until the relay answers (Ctrl-C to stop)");
                    }
                    said = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    signal = shutdown.recv() => return Err(CliError::interrupted(signal)),
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Joins, unless a signal comes first.
async fn join_or_signal(cli: &Cli, shutdown: &mut Shutdown) -> Result<Client, CliError> {
    tokio::select! {
        client = join(cli) => client,
        signal = shutdown.recv() => Err(CliError::interrupted(signal)),
    }
}

async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let mut shutdown = Shutdown::register();
    let control = control::socket_path(&identity_path(&cli), cli.name());
    match &cli.command {
        Command::Ip => {
            if let Some(status) = running_status(&control).await? {
                println!("{}", status.vip);
                return Ok(ExitCode::SUCCESS);
            }
            let client = join_or_signal(&cli, &mut shutdown).await?;
            println!("{}", client.vip());
            client.leave().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(args) => status(&cli, &control, args.json).await,
        Command::Peers(args) => peers(&cli, &control, args.json, &mut shutdown).await,
        Command::Up => {
            // A second `up` of this instance would replace the first one's session.
            if let Some(status) = running_status(&control).await? {
                return Err(format!(
                    "`overlan {}` already runs instance {} (control socket {})",
                    status.command,
                    instance_label(cli.name()),
                    control.display()
                )
                .into());
            }
            let client = match join_until_up(&cli, &mut shutdown).await {
                Err(e) if e.is_interrupted() => return Ok(ExitCode::SUCCESS),
                joined => joined?,
            };
            let server = control::serve(client.clone(), control, cli.name().to_owned(), "up")
                .await
                .map_err(|e| e.to_string())?;
            println!("vip {}", client.vip());
            // The config file's forwards: a port that cannot be had ends `up` at once.
            let mut maps = Maps { running: tokio::task::JoinSet::new(), stops: Vec::new(), server: Some(server) };
            for map in &cli.port_maps {
                let log: overlan_client::forward::Log = std::sync::Arc::new(|message| eprintln!("overlan: {message}"));
                match map.start(&client, log).await {
                    Ok(running) => {
                        println!("{}", running.line);
                        // Said only if it ends by itself, not when `up` stops it.
                        let stop = running.stop.clone();
                        maps.stops.push(running.stop);
                        maps.running.spawn(running.run.map(move |why| {
                            if !stop.is_cancelled() {
                                eprintln!("overlan: {why}");
                            }
                        }));
                    }
                    Err(why) => {
                        client.leave().await;
                        return Err(format!("config: {why}").into());
                    }
                }
            }
            let result = up(client, &mut shutdown, &mut maps, cli.relays.len() > 1).await;
            drop(maps);
            result
        }
        Command::Nc(args) => nc(&cli, args, &mut shutdown).await,
        Command::Leave => leave(&cli, &control, &mut shutdown).await,
        Command::Tun { dev } => tun(&cli, &control, dev.as_deref(), &mut shutdown).await,
        Command::Run { program } => run_program(&cli, &control, program, &mut shutdown).await,
        Command::Forward(args) => {
            let map = PortMap::Forward {
                local: args.local,
                target: args.target.clone(),
                udp: args.udp,
                idle_secs: args.idle,
            };
            run_port_map(&cli, &control, map, &mut shutdown).await
        }
        Command::Expose(args) => {
            let map = PortMap::Expose { port: args.port, target: args.target, udp: args.udp, idle_secs: args.idle };
            run_port_map(&cli, &control, map, &mut shutdown).await
        }
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut command(), "overlan", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    }
}

impl Cli {
    /// The instance name (empty: the unnamed instance).
    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }

    /// Fills what the command line and environment left open from the config file.
    fn with_config(mut self) -> Result<Self, CliError> {
        let (path, explicit) = match &self.config {
            Some(path) => (path.clone(), true),
            None => (default_config_path(), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => return Ok(self),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CliError::usage(format!("--config {}: no such file", path.display())))
            }
            Err(e) => return Err(format!("config {}: {e}", path.display()).into()),
        };
        let config: ClientConfig = toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))?;
        self.port_maps = config_port_maps(&config).map_err(|e| format!("config {}: {e}", path.display()))?;
        // A relative identity path is relative to the config file, not to where the
        // command happens to run.
        let base = path.parent().unwrap_or(std::path::Path::new("."));
        self.invite = self.invite.or(config.invite);
        self.identity = self.identity.or(config.identity.map(|p| base.join(p)));
        self.name = self.name.or(config.name);
        self.log = self.log.or(config.log);
        if self.relays.is_empty() {
            self.relays = config.relays;
        }
        Ok(self)
    }
}

/// The client config file: what `--invite`, `--identity`, `--name`, `--relay` and
/// `--log` say, for those who would rather not repeat them.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientConfig {
    invite: Option<String>,
    identity: Option<PathBuf>,
    name: Option<String>,
    #[serde(default)]
    relays: Vec<String>,
    log: Option<String>,
    /// Forwards `overlan up` runs: `[[forward]]` tables of `local`, `target`, `udp`, `idle`.
    #[serde(default)]
    forward: Vec<ForwardEntry>,
    /// Exposes `overlan up` runs: `[[expose]]` tables of `port`, `target`, `udp`, `idle`.
    #[serde(default)]
    expose: Vec<ExposeEntry>,
}

/// A `[[forward]]` of the config file.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ForwardEntry {
    local: String,
    target: String,
    #[serde(default)]
    udp: bool,
    idle: Option<u64>,
}

/// An `[[expose]]` of the config file.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ExposeEntry {
    port: u16,
    target: String,
    #[serde(default)]
    udp: bool,
    idle: Option<u64>,
}

/// The forwards and exposes of the config file, checked.
fn config_port_maps(config: &ClientConfig) -> Result<Vec<PortMap>, String> {
    let idle = |secs: Option<u64>| secs.unwrap_or(overlan_client::forward::DEFAULT_UDP_IDLE.as_secs()).max(1);
    let mut maps = Vec::new();
    for f in &config.forward {
        let local =
            overlan_client::forward::parse_local_addr(&f.local).map_err(|e| format!("[[forward]] local: {e}"))?;
        let target = parse_overlay_target(&f.target).map_err(|e| format!("[[forward]] target: {e}"))?;
        maps.push(PortMap::Forward { local, target, udp: f.udp, idle_secs: idle(f.idle) });
    }
    for e in &config.expose {
        let target =
            overlan_client::forward::parse_local_addr(&e.target).map_err(|why| format!("[[expose]] target: {why}"))?;
        maps.push(PortMap::Expose { port: e.port, target, udp: e.udp, idle_secs: idle(e.idle) });
    }
    Ok(maps)
}

fn default_config_path() -> PathBuf {
    dirs::config_dir().unwrap_or_else(|| PathBuf::from(".")).join("overlan").join("config.toml")
}

fn identity_path(cli: &Cli) -> PathBuf {
    cli.identity.clone().unwrap_or_else(default_identity_path)
}

fn instance_label(name: &str) -> &str {
    if name.is_empty() {
        "(unnamed)"
    } else {
        name
    }
}

/// The status of the running `up` of this instance, if one runs.
async fn running_status(control: &std::path::Path) -> Result<Option<control::Status>, CliError> {
    match control::ask(control, &control::Request::Status).await {
        Ok(Some(control::Response::Status(status))) => Ok(Some(status)),
        Ok(Some(other)) => Err(format!("`overlan up` answered unexpectedly: {other:?}").into()),
        Ok(None) => Ok(None),
        Err(e) => Err(format!("asking `overlan up` ({}): {e}", control.display()).into()),
    }
}

async fn status(cli: &Cli, control: &std::path::Path, json: bool) -> Result<ExitCode, CliError> {
    let Some(s) = running_status(control).await? else {
        if json {
            println!("{}", serde_json::json!({ "state": "stopped", "instance": cli.name() }));
        } else {
            println!("instance {} is not running (start it with `overlan up`)", instance_label(cli.name()));
        }
        return Ok(ExitCode::from(1));
    };
    if json {
        println!("{}", serde_json::to_string(&s).expect("plain data serializes"));
        return Ok(ExitCode::SUCCESS);
    }
    let state = match &s.reason {
        Some(why) => format!("{} ({why})", s.state),
        None => s.state.clone(),
    };
    println!("instance  {} (overlan {})", instance_label(&s.instance), s.command);
    println!("vip       {}", s.vip);
    println!("network   {} ({})", s.network, s.subnet);
    println!("relay     {}", s.relay);
    println!("state     {state}");
    println!("since     {} ({})", control::utc_minute(s.since), control::ago(s.since));
    println!("sockets   {} streams, {} listeners, {} datagram ports", s.streams, s.listeners, s.datagram_ports);
    if let (Some(mtu), Some(rtt)) = (s.path_mtu, s.rtt_us) {
        println!("path      {mtu}-byte packets, round trip {:.1} ms", rtt as f64 / 1000.0);
    }
    Ok(ExitCode::SUCCESS)
}

async fn peers(
    cli: &Cli,
    control: &std::path::Path,
    json: bool,
    shutdown: &mut Shutdown,
) -> Result<ExitCode, CliError> {
    let list = match control::ask(control, &control::Request::Peers).await {
        Ok(Some(control::Response::Peers { peers })) => peers,
        Ok(Some(control::Response::Error { message })) => return Err(format!("peers: {message}").into()),
        Ok(Some(other)) => return Err(format!("`overlan up` answered unexpectedly: {other:?}").into()),
        Ok(None) => {
            // Only with a VIP held already: a mistyped --name must not lease one.
            let client = match join_holding(cli, shutdown).await? {
                Ok(client) => client,
                Err(Error::NoLease(_)) => {
                    return Err(format!(
                        "instance {} has not joined this network: `overlan up` (or `overlan ip`) joins it",
                        instance_label(cli.name())
                    )
                    .into())
                }
                Err(e) => return Err(join_failure(e)),
            };
            let peers = client.peers().await.map_err(|e| format!("peers: {e}"))?;
            client.leave().await;
            peers
        }
        Err(e) => return Err(format!("asking `overlan up` ({}): {e}", control.display()).into()),
    };
    if json {
        println!("{}", serde_json::to_string(&list).expect("plain data serializes"));
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<15} {:<20} {:<8} LAST SEEN", "VIP", "INSTANCE", "STATE");
    for p in list {
        let instance = match &p.instance {
            Some(name) if name.is_empty() => "(unnamed)".to_owned(),
            Some(name) => name.clone(),
            None => "-".to_owned(),
        };
        let state = if p.online { "online" } else { "offline" };
        let seen = match (p.online, p.last_seen) {
            (true, _) => "now".to_owned(),
            (false, Some(t)) => format!("{} ({})", control::utc_minute(t as u64), control::ago(t as u64)),
            (false, None) => "-".to_owned(),
        };
        println!("{:<15} {instance:<20} {state:<8} {seen}", p.vip.to_string());
    }
    Ok(ExitCode::SUCCESS)
}

/// `overlan forward` and `overlan expose`: through the running `up` of this instance
/// (which then holds the ports for as long as this command runs), else on a session of
/// their own. Prints what runs on stdout and one line per failed connection or flow on
/// stderr; runs until a signal or until the forward fails for good.
async fn run_port_map(
    cli: &Cli,
    control: &std::path::Path,
    map: PortMap,
    shutdown: &mut Shutdown,
) -> Result<ExitCode, CliError> {
    let started = |line: String| {
        println!("{line}");
        eprintln!("Ctrl-C to stop");
    };
    let via_up = control::run_map(control, &map, started, |message| eprintln!("overlan: {message}"));
    let ended = tokio::select! {
        ended = via_up => ended.map_err(|e| format!("asking `overlan up` ({}): {e}", control.display()))?,
        signal = shutdown.recv() => return Err(CliError::interrupted(signal)),
    };
    if let Some(why) = ended {
        return Err(why.into());
    }
    // The local port first: a port in use must not cost the instance's session (a
    // join would replace a running one).
    let local = map.bind_local().await?;
    let client = join_or_signal(cli, shutdown).await?;
    let log: overlan_client::forward::Log = std::sync::Arc::new(|message| eprintln!("overlan: {message}"));
    let result = match map.start_with(&client, local, log).await {
        Ok(mut running) => {
            started(std::mem::take(&mut running.line));
            enum Outcome {
                Ended(String),
                Signal(Signal),
                SessionEnded(CliError),
            }
            let outcome = tokio::select! {
                why = &mut running.run => Outcome::Ended(why),
                signal = shutdown.recv() => Outcome::Signal(signal),
                why = session_ended(&client) => Outcome::SessionEnded(why),
            };
            match outcome {
                // A forward that failed because its session ended for good says that.
                Outcome::Ended(why) => Err(session_verdict(&client).unwrap_or_else(|| CliError::from(why))),
                Outcome::Signal(signal) => {
                    running.stop().await;
                    Err(CliError::interrupted(signal))
                }
                Outcome::SessionEnded(why) => {
                    running.stop().await;
                    Err(why)
                }
            }
        }
        Err(why) => Err(CliError::from(why)),
    };
    client.leave().await;
    result
}

/// Joins in TUN mode as this instance's session (`command`: tun or run), unless its
/// `up` runs: the new session would replace that one. Serves the instance's control
/// socket for as long as the returned server lives.
async fn join_tun_session(
    cli: &Cli,
    control: &std::path::Path,
    command: &'static str,
    shutdown: &mut Shutdown,
) -> Result<(Client, control::ControlServer), CliError> {
    // Checked before joining: a session that cannot bring up its interface would only
    // take the instance's VIP from another session for nothing.
    if !overlan_client::tun::may_create_interfaces() {
        return Err(format!(
            "overlan {command} creates a network interface, which needs root (CAP_NET_ADMIN): run it with sudo"
        )
        .into());
    }
    if let Some(status) = running_status(control).await? {
        return Err(format!(
            "`overlan {}` runs instance {} with VIP {}: a TUN session would replace it; stop it first, or give {command} another --name",
            status.command,
            instance_label(cli.name()),
            status.vip
        )
        .into());
    }
    let client = tokio::select! {
        client = join_with(cli, |options| options.tun(true)) => client?,
        signal = shutdown.recv() => return Err(CliError::interrupted(signal)),
    };
    // The instance's session from now on: its other commands (`ip`, `status`, `nc`,
    // `forward`, …) use it instead of joining (which would replace it).
    let path = control.to_path_buf();
    match control::serve(client.clone(), path, cli.name().to_owned(), command).await {
        Ok(server) => Ok((client, server)),
        Err(e) => {
            client.leave().await;
            Err(e.to_string().into())
        }
    }
}

/// `overlan tun`: the instance's session in TUN mode, holding the VIP on an interface.
/// Like `up`, it is a long-running session: a signal ends it cleanly with status 0.
async fn tun(
    cli: &Cli,
    control: &std::path::Path,
    dev: Option<&str>,
    shutdown: &mut Shutdown,
) -> Result<ExitCode, CliError> {
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (cli, control, dev, shutdown);
        return Err("overlan tun runs on Linux only (use forward/expose elsewhere)".into());
    }
    #[cfg(target_os = "linux")]
    {
        // A name the interface cannot have is said before joining: the join would
        // replace a running session of the instance for nothing.
        if let Some(dev) = dev {
            overlan_client::tun::check_name(dev).map_err(CliError::usage)?;
        }
        let (client, server) = match join_tun_session(cli, control, "tun", shutdown).await {
            Err(e) if e.is_interrupted() => return Ok(ExitCode::SUCCESS),
            joined => joined?,
        };
        let device = match overlan_client::tun::open(dev, client.vip(), client.subnet()) {
            Ok(device) => device,
            Err(why) => {
                client.leave().await;
                return Err(why.into());
            }
        };
        println!("vip {}", client.vip());
        eprintln!(
            "interface {} holds {}/{} (mtu {}) in network {}; Ctrl-C to leave",
            device.name,
            client.vip(),
            client.subnet().prefix(),
            overlan_client::tun::MAX_IP_PACKET,
            client.network()
        );
        let mut carried = Box::pin(overlan_client::tun::run(client.clone(), &device));
        let result = tokio::select! {
            ended = &mut carried => ended.map(|()| ExitCode::SUCCESS).map_err(CliError::from),
            _ = shutdown.recv() => Ok(ExitCode::SUCCESS),
            why = session_ended(&client) => Err(why),
        };
        drop(carried);
        drop(device); // the interface, its address and routes go with it
        server.stop().await;
        client.leave().await;
        result
    }
}

/// `overlan run -- PROGRAM`: the instance's session in TUN mode, its interface in a
/// namespace made for PROGRAM, which runs there; its exit status is returned. A signal
/// is passed on to PROGRAM (SIGTERM), which gets 5 s to end before it is killed.
async fn run_program(
    cli: &Cli,
    control: &std::path::Path,
    program: &[String],
    shutdown: &mut Shutdown,
) -> Result<ExitCode, CliError> {
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (cli, control, program, shutdown);
        return Err("overlan run runs on Linux only".into());
    }
    #[cfg(target_os = "linux")]
    {
        // A program that is not there is said before joining (and with the shell's
        // status for it), not by `ip netns exec` after the namespace was made.
        if !program_exists(&program[0]) {
            return Err(CliError { message: Some(format!("{}: command not found", program[0])), code: 127 });
        }
        let (client, server) = join_tun_session(cli, control, "run", shutdown).await?;
        let label = if cli.name().is_empty() { "default" } else { cli.name() };
        let ns_name = format!("overlan-{label}-{}", std::process::id());
        let (device, namespace) = match overlan_client::tun::open_in_namespace(&ns_name, client.vip(), client.subnet())
        {
            Ok(made) => made,
            Err(why) => {
                client.leave().await;
                return Err(why.into());
            }
        };
        eprintln!("overlan: running {} as {} in namespace {}", program[0], client.vip(), namespace.name);
        let mut child = match tokio::process::Command::new("ip")
            .args(["netns", "exec", &namespace.name])
            .args(program)
            .env("OVERLAN_VIP", client.vip().to_string())
            .kill_on_drop(true)
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                client.leave().await;
                return Err(format!("running {}: {e}", program[0]).into());
            }
        };
        let mut carried = Box::pin(overlan_client::tun::run(client.clone(), &device));
        let status = tokio::select! {
            status = child.wait() => status.map_err(|e| format!("waiting for {}: {e}", program[0])),
            ended = &mut carried => {
                // The session ended for good: the program has no network any more.
                let why = ended.err().unwrap_or_else(|| "the session ended".into());
                eprintln!("overlan: {why}; stopping {}", program[0]);
                stop_child(&mut child).await
            }
            why = session_ended(&client) => {
                let why = why.message.unwrap_or_else(|| "the session ended".into());
                eprintln!("overlan: {why}; stopping {}", program[0]);
                stop_child(&mut child).await
            }
            _ = shutdown.recv() => stop_child(&mut child).await,
        };
        drop(carried);
        // What PROGRAM left running in the namespace (its children, daemons) goes too:
        // it would outlive the namespace's name with no network.
        namespace.stop_processes().await;
        drop(device);
        drop(namespace);
        server.stop().await;
        client.leave().await;
        let status = status?;
        use std::os::unix::process::ExitStatusExt;
        let code = status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(1);
        Ok(ExitCode::from(code.clamp(0, 255) as u8))
    }
}

/// Whether `program` names an executable file: as a path, or found in `PATH`.
#[cfg(target_os = "linux")]
fn program_exists(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable =
        |path: &std::path::Path| path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.contains('/') {
        return executable(std::path::Path::new(program));
    }
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| executable(&dir.join(program))))
}

/// Asks a child to end (SIGTERM), kills it after 5 s, and returns how it ended.
#[cfg(target_os = "linux")]
async fn stop_child(child: &mut tokio::process::Child) -> Result<std::process::ExitStatus, String> {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    }
    match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        Ok(status) => status.map_err(|e| e.to_string()),
        Err(_) => {
            let _ = child.kill().await;
            child.wait().await.map_err(|e| e.to_string())
        }
    }
}

/// `overlan leave`: joins (unless `up` holds the session: then it must stop first, or
/// the lease would go while it runs), gives the VIP back and forgets the lease proof.
async fn leave(cli: &Cli, control: &std::path::Path, shutdown: &mut Shutdown) -> Result<ExitCode, CliError> {
    if let Some(status) = running_status(control).await? {
        return Err(format!(
            "`overlan {}` runs instance {} with VIP {}; stop it first, then leave",
            status.command,
            instance_label(cli.name()),
            status.vip
        )
        .into());
    }
    // Only with a VIP held already: leaving must not lease one first.
    let client = match join_holding(cli, shutdown).await? {
        Ok(client) => client,
        Err(Error::NoLease(_)) => {
            let network = cli.invite.as_deref().and_then(|i| i.parse::<Invite>().ok()).map(|i| i.network);
            let network = network.unwrap_or_default();
            // A proof kept for it is of a lease released already: nothing to show again.
            let _ = forget_lease(&lease_file_path(&identity_path(cli)), &network, cli.name());
            println!("instance {} holds no VIP in network {network}; nothing to give back", instance_label(cli.name()));
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(join_failure(e)),
    };
    let network = client.network().to_owned();
    let released = tokio::select! {
        released = client.release() => released,
        signal = shutdown.recv() => {
            client.close();
            return Err(CliError::interrupted(signal));
        }
    };
    let vip = released.map_err(|e| format!("leave: {e}"))?;
    let leases = lease_file_path(&identity_path(cli));
    if let Err(e) = forget_lease(&leases, &network, cli.name()) {
        // Another node would still honour the proof: say so, as the lease itself is gone.
        eprintln!("overlan: the VIP was released but its lease proof stays: {e}; delete {}", leases.display());
    }
    println!(
        "released {vip} in network {network}; instance {} gets a new VIP at its next join",
        instance_label(cli.name())
    );
    Ok(ExitCode::SUCCESS)
}

/// The forwards and exposes `up` runs from its config file, and its control socket
/// (with those it runs for other commands).
struct Maps {
    running: tokio::task::JoinSet<()>,
    stops: Vec<tokio_util::sync::CancellationToken>,
    server: Option<control::ControlServer>,
}

impl Maps {
    /// Stops them, their TCP connections reset, waiting at most a second or two.
    async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
        self.stops.iter().for_each(|stop| stop.cancel());
        let _ =
            tokio::time::timeout(Duration::from_secs(1), async { while self.running.join_next().await.is_some() {} })
                .await;
    }
}

/// `up` after the join. With several `--relay`s, `name_relay` says which one it joined.
async fn up(client: Client, shutdown: &mut Shutdown, maps: &mut Maps, name_relay: bool) -> Result<ExitCode, CliError> {
    let through = if name_relay { format!(" through relay {}", client.relay_addr()) } else { String::new() };
    eprintln!(
        "joined network {} ({}) as {}{through}; Ctrl-C to leave",
        client.network(),
        client.subnet(),
        client.vip()
    );
    let mut state = client.watch_state();
    loop {
        tokio::select! {
            // `up` is the instance's long-running session: asked to stop, it leaves
            // cleanly and reports success (as daemons do under a service manager).
            _ = shutdown.recv() => {
                maps.stop().await;
                client.leave().await;
                return Ok(ExitCode::SUCCESS);
            }
            changed = state.changed() => {
                if changed.is_err() {
                    return Err("client stopped".into());
                }
                match state.borrow_and_update().clone() {
                    SessionState::Up => eprintln!("reconnected as {} through relay {}", client.vip(), client.relay_addr()),
                    SessionState::Reconnecting(why) => eprintln!("{why}; reconnecting"),
                    SessionState::Closed(why) => return Err(CliError::refused(why)),
                }
            }
        }
    }
}

/// `-q SECS` as a duration.
fn quit_after(args: &NcArgs) -> Option<Duration> {
    args.quit_after.map(Duration::from_secs)
}

fn parse_port(text: &str) -> Result<u16, String> {
    text.parse().map_err(|_| format!("{text:?} is not a port (0-65535)"))
}

/// Where `nc` connects or sends: a VIP, or the instance name of a member of the network
/// (resolved through the relay's member list).
#[derive(Debug, Clone)]
enum Target {
    Addr(SocketAddrV4),
    Name(String, u16),
}

fn parse_target(args: &[String]) -> Result<Target, String> {
    match args {
        [host, port] => {
            let port = parse_port(port)?;
            if port == 0 {
                return Err(format!("{host}:0: port 0 cannot be connected to"));
            }
            if let Ok(ip) = host.parse::<Ipv4Addr>() {
                return Ok(Target::Addr(SocketAddrV4::new(ip, port)));
            }
            // Four dotted numbers are meant as a VIP (an instance may be named "42").
            if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') && host.matches('.').count() == 3 {
                return Err(format!("{host:?} is not a VIP (A.B.C.D, each part 0 to 255)"));
            }
            let name_like = !host.is_empty()
                && host.len() <= 64
                && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if name_like {
                Ok(Target::Name(host.clone(), port))
            } else {
                Err(format!("{host:?} is neither a VIP (A.B.C.D) nor an instance name"))
            }
        }
        [one] => one.parse().map(Target::Addr).map_err(|_| format!("expected VIP PORT, got {one:?}")),
        _ => Err("expected VIP PORT".into()),
    }
}

/// The VIP of the member named `name` among `peers`: online members first; a name held
/// by several (other identities may pick the same) must be given as a VIP.
fn pick_member(
    peers: &[overlan_shared::wire::control::PeerInfo],
    name: &str,
    network: &str,
) -> Result<Ipv4Addr, String> {
    let named: Vec<_> = peers.iter().filter(|p| p.instance.as_deref() == Some(name)).collect();
    let online: Vec<_> = named.iter().filter(|p| p.online).collect();
    let candidates: Vec<Ipv4Addr> =
        if online.is_empty() { named.iter().map(|p| p.vip).collect() } else { online.iter().map(|p| p.vip).collect() };
    match candidates.as_slice() {
        [vip] => Ok(*vip),
        [] => Err(format!("no member named {name:?} in network {network} (`overlan peers` lists them)")),
        many => {
            let vips: Vec<String> = many.iter().map(|v| v.to_string()).collect();
            Err(format!("{name:?} names several members ({}); give the VIP", vips.join(", ")))
        }
    }
}

/// `target` as an address, asking `client` for the member list if it is a name.
async fn resolve_with(client: &Client, target: &Target) -> Result<SocketAddrV4, String> {
    match target {
        Target::Addr(addr) => Ok(*addr),
        Target::Name(name, port) => {
            let peers = client.peers().await.map_err(|e| format!("looking up {name:?}: {e}"))?;
            Ok(SocketAddrV4::new(pick_member(&peers, name, client.network())?, *port))
        }
    }
}

async fn nc(cli: &Cli, args: &NcArgs, shutdown: &mut Shutdown) -> Result<ExitCode, CliError> {
    // The command line is checked before anything joins: a typo is a usage error.
    let (local_port, target) = if args.listen || args.broadcast {
        match args.args.as_slice() {
            [port] => (Some(parse_port(port).map_err(CliError::usage)?), None),
            _ => return Err(CliError::usage("with -l or -b give just PORT".into())),
        }
    } else {
        (None, Some(parse_target(&args.args).map_err(CliError::usage)?))
    };
    let control = control::socket_path(&identity_path(cli), cli.name());
    if !args.udp {
        if let Some(code) = nc_stream_via_up(cli, args, local_port, target.clone(), shutdown).await? {
            return Ok(code);
        }
    } else {
        let opening = control::open_datagrams(&control, local_port.unwrap_or(0));
        let opened = tokio::select! {
            opened = opening => opened,
            signal = shutdown.recv() => return Err(CliError::interrupted(signal)),
        };
        match opened.map_err(|e| format!("asking `overlan up` ({}): {e}", control.display()))? {
            Some(Ok(socket)) => {
                let target = match target {
                    None => None,
                    Some(Target::Addr(addr)) => Some(addr),
                    Some(Target::Name(name, port)) => {
                        let peers = match control::ask(&control, &control::Request::Peers).await {
                            Ok(Some(control::Response::Peers { peers })) => peers,
                            other => return Err(format!("looking up {name:?}: {other:?}").into()),
                        };
                        let network = running_status(&control).await?.map(|s| s.network).unwrap_or_default();
                        Some(SocketAddrV4::new(pick_member(&peers, &name, &network)?, port))
                    }
                };
                return nc_datagram(Dgram::Up(socket), target, args, shutdown).await.map(|()| ExitCode::SUCCESS);
            }
            Some(Err(message)) => return Err(message.into()),
            None => {}
        }
    }
    let client = join_or_signal(cli, shutdown).await?;
    // Say when the session is lost and back: a waiting listener or a datagram socket
    // carries on after the reconnect (re-registered), an open stream fails at once.
    let watcher = say_session_changes(&client);
    let result = if args.udp {
        let target = match &target {
            None => Ok(None),
            Some(target) => resolve_with(&client, target).await.map(Some),
        };
        match (target, client.bind_datagram(local_port.unwrap_or(0)).await) {
            (Err(e), _) => Err(e.into()),
            (Ok(target), Ok(socket)) => nc_datagram(Dgram::Own(socket), target, args, shutdown).await,
            (Ok(_), Err(e)) => Err(format!("bind: {e}").into()),
        }
    } else {
        nc_stream(&client, args, local_port, target, shutdown).await
    };
    watcher.abort();
    // A socket that failed because the session ended for good (replaced) says that.
    let result = result.map_err(|e| session_verdict(&client).unwrap_or(e));
    client.leave().await;
    result.map(|()| ExitCode::SUCCESS)
}

/// `what: error`, unless the error begins with `what` already (the relay's messages
/// often name what failed).
fn prefixed(what: &str, e: &dyn std::fmt::Display) -> String {
    let text = e.to_string();
    if text.starts_with(what) {
        text
    } else {
        format!("{what}: {text}")
    }
}

/// The exit for a session that has ended for good (status 3 and why), if it has.
fn session_verdict(client: &Client) -> Option<CliError> {
    match client.state() {
        SessionState::Closed(why) => Some(CliError::refused(why)),
        _ => None,
    }
}

/// Says on stderr when `client`'s session is lost (once per loss, not per failed
/// attempt) and when it is back; ends when the client closes.
fn say_session_changes(client: &Client) -> tokio::task::JoinHandle<()> {
    let client = client.clone();
    tokio::spawn(async move {
        let mut state = client.watch_state();
        let mut up = true;
        while state.changed().await.is_ok() {
            match state.borrow_and_update().clone() {
                SessionState::Reconnecting(why) if up => {
                    up = false;
                    eprintln!("overlan: {why}; reconnecting");
                }
                SessionState::Reconnecting(_) => {}
                SessionState::Up => {
                    up = true;
                    eprintln!("overlan: reconnected as {} through relay {}", client.vip(), client.relay_addr());
                }
                SessionState::Closed(_) => return,
            }
        }
    })
}

/// Says on stderr when `client`'s session is lost and back (as
/// [`say_session_changes`]); resolves when it has ended for good (replaced by a newer
/// session of the instance, or refused on reconnecting) with the error to exit with.
async fn session_ended(client: &Client) -> CliError {
    let mut state = client.watch_state();
    let mut up = true;
    // The state as it is first (a session replaced before this was polled counts), then
    // each change.
    let mut first = true;
    loop {
        let initial = std::mem::take(&mut first);
        if !initial && state.changed().await.is_err() {
            return "the client stopped".into();
        }
        match state.borrow_and_update().clone() {
            SessionState::Reconnecting(why) if up => {
                up = false;
                eprintln!("overlan: {why}; reconnecting");
            }
            SessionState::Reconnecting(_) => {}
            SessionState::Up if initial => {}
            SessionState::Up => {
                up = true;
                eprintln!("overlan: reconnected as {} through relay {}", client.vip(), client.relay_addr());
            }
            SessionState::Closed(why) => return CliError::refused(why),
        }
    }
}

/// Stream mode through the running `up` of this instance (so its session is shared,
/// not replaced); `None` if no `up` runs. The same promises as [`nc_stream`]: exit 0
/// only when everything from stdin was acknowledged by the relay and everything the peer
/// sent reached stdout; a signal aborts the stream.
async fn nc_stream_via_up(
    cli: &Cli,
    args: &NcArgs,
    listen: Option<u16>,
    target: Option<Target>,
    shutdown: &mut Shutdown,
) -> Result<Option<ExitCode>, CliError> {
    let control = control::socket_path(&identity_path(cli), cli.name());
    let request = match (listen, target) {
        (Some(port), _) => control::Request::Listen { port },
        (None, None) => unreachable!("nc checks its arguments: a target or a port"),
        (None, Some(target)) => {
            let to = match target {
                Target::Addr(addr) => addr,
                Target::Name(name, port) => match control::ask(&control, &control::Request::Peers).await {
                    Ok(Some(control::Response::Peers { peers })) => {
                        let network = running_status(&control).await?.map(|s| s.network).unwrap_or_default();
                        SocketAddrV4::new(pick_member(&peers, &name, &network)?, port)
                    }
                    Ok(Some(control::Response::Error { message })) => {
                        return Err(format!("looking up {name:?}: {message}").into())
                    }
                    Ok(_) => return Ok(None),
                    Err(e) => return Err(format!("asking `overlan up` ({}): {e}", control.display()).into()),
                },
            };
            control::Request::Connect { to }
        }
    };
    let opening = control::open_stream(&control, &request, |local| eprintln!("listening on {local}"));
    let opened = tokio::select! {
        opened = opening => opened,
        signal = shutdown.recv() => return Err(CliError::interrupted(signal)),
    };
    let stream = match opened.map_err(|e| format!("asking `overlan up` ({}): {e}", control.display()))? {
        None => return Ok(None),
        Some(Err(message)) => return Err(message.into()),
        Some(Ok(stream)) => stream,
    };
    if listen.is_some() {
        eprintln!("connection from {}", stream.peer);
    }
    // Dropping the transfer on a signal closes the connection unfinished: `up` aborts
    // the stream, so the peer sees an error rather than a clean end.
    let progress = Progress::start();
    let input = Counted::new(stdio::stdin(), progress.sent.clone());
    let output = Counted::new(tokio::io::stdout(), progress.received.clone());
    let ended = tokio::select! {
        ended = stream.transfer(input, output, quit_after(args)) => match ended {
            control::Ended::Clean => Ok(Some(ExitCode::SUCCESS)),
            control::Ended::Failed(why) => Err(why.into()),
        },
        signal = shutdown.recv() => Err(CliError::interrupted(signal)),
    };
    progress.finish();
    ended
}

/// Stream mode. Exit 0 promises: everything read from stdin was acknowledged by the
/// relay, which delivers it to the peer even after this process has gone (as a kernel
/// does after `close()`), and everything the peer sent was written to stdout and
/// flushed. A signal aborts the socket, so the peer sees an error, not a clean end.
async fn nc_stream(
    client: &Client,
    args: &NcArgs,
    listen: Option<u16>,
    target: Option<Target>,
    shutdown: &mut Shutdown,
) -> Result<(), CliError> {
    let open = async {
        match listen {
            Some(port) => {
                let listener = client.listen(port).await.map_err(|e| prefixed("listen", &e))?;
                eprintln!("listening on {}", listener.local_addr());
                let (stream, peer) = listener.accept().await.map_err(|e| format!("accept: {e}"))?;
                eprintln!("connection from {peer}");
                Ok::<_, String>(stream)
            }
            None => {
                let target = target.expect("nc checks its arguments: a target or a port");
                let target = resolve_with(client, &target).await?;
                client.connect(target).await.map_err(|e| e.to_string())
            }
        }
    };
    let stream = tokio::select! {
        stream = open => stream?,
        signal = shutdown.recv() => return Err(CliError::interrupted(signal)),
    };
    let gone = client.session_gone();
    let peer = stream.peer_addr();
    let (mut read, mut write) = stream.into_split();
    let progress = Progress::start();
    // Bulk both ways without a copy in this process: stdin is read into buffers that
    // are handed to the stream as they are, and what arrives goes to stdout as the
    // pieces it came in.
    let upload = async {
        let mut stdin = Counted::new(stdio::Input::open(), progress.sent.clone());
        let (mut buf, mut sent) = (bytes::BytesMut::new(), 0);
        let failed = |e: std::io::Error| control::about(peer, &e);
        while let Some(chunk) = stdio::read_chunk(&mut stdin, &mut buf).await.map_err(|e| e.to_string())? {
            sent += chunk.len();
            write.write_chunk(chunk).await.map_err(failed)?;
        }
        write.shutdown().await.map_err(failed)?;
        match write.delivered().await {
            // Nothing was sent, so nothing is lost if the peer stopped reading first.
            Err(_) if sent == 0 => Ok(()),
            other => other.map_err(|e| control::about(peer, &e)),
        }
    };
    let download = async {
        let mut stdout = Counted::new(stdio::stdout_for_chunks(), progress.received.clone());
        let mut chunks: [bytes::Bytes; 32] = Default::default();
        while let Some(n) = read.read_chunks(&mut chunks).await.map_err(|e| e.to_string())? {
            stdio::write_chunks(&mut stdout, &mut chunks[..n]).await.map_err(|e| e.to_string())?;
            // A terminal or a file shows what arrived as it arrives (a pipe has no buffer
            // here: this does nothing).
            stdout.flush().await.map_err(|e| e.to_string())?;
        }
        stdout.flush().await.map_err(|e| e.to_string())
    };
    // The first failure ends the command at once: a stream cut by a lost session must
    // not wait for the user to type before it says so. With -q the peer is read for at
    // most that long once stdin was delivered.
    let transfer = async {
        let Some(grace) = quit_after(args) else {
            return tokio::try_join!(upload, download).map(|_| ());
        };
        let mut download = std::pin::pin!(download);
        let mut upload = std::pin::pin!(upload);
        tokio::select! {
            done = &mut download => {
                done?;
                upload.await
            }
            sent = &mut upload => {
                sent?;
                tokio::time::timeout(grace, download).await.unwrap_or(Ok(()))
            }
        }
    };
    let outcome = tokio::select! {
        done = transfer => Ok(done),
        // The stream dies with its session, also while stdin has nothing to send.
        why = gone => Ok(Err(format!("connection to {peer}: session lost ({why})"))),
        signal = shutdown.recv() => Err(signal),
    };
    progress.finish();
    // A stream that did not end well is aborted, never left to be finished when it is
    // dropped: the peer must not mistake a failed or interrupted transfer for a clean end.
    let failed = match outcome {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(why)) => CliError::from(why),
        Err(signal) => CliError::interrupted(signal),
    };
    write.abort();
    read.abort();
    Err(failed)
}

/// A datagram socket of this command's own session, or of the running `up`.
enum Dgram {
    Own(overlan_client::DatagramSocket),
    Up(control::ProxiedDatagrams),
}

impl Dgram {
    fn local_addr(&self) -> SocketAddrV4 {
        match self {
            Dgram::Own(s) => s.local_addr(),
            Dgram::Up(s) => s.local,
        }
    }

    fn max_payload(&self) -> usize {
        match self {
            Dgram::Own(s) => s.max_payload(),
            Dgram::Up(s) => s.max_payload,
        }
    }

    async fn send_to(&self, payload: &[u8], to: SocketAddrV4) -> Result<(), Error> {
        match self {
            Dgram::Own(s) => s.send_to(payload, to).await.map(|_| ()),
            Dgram::Up(s) => s.send_to(payload, to).await,
        }
    }

    async fn recv(&self) -> Result<(SocketAddrV4, Vec<u8>), String> {
        match self {
            Dgram::Own(s) => s.recv().await.map(|d| (d.src, d.payload.to_vec())).map_err(|e| e.to_string()),
            Dgram::Up(s) => s.recv().await,
        }
    }
}

/// Datagram mode; `target` is where lines go (`None` for -l and -b).
async fn nc_datagram(
    socket: Dgram,
    target: Option<SocketAddrV4>,
    args: &NcArgs,
    shutdown: &mut Shutdown,
) -> Result<(), CliError> {
    let fixed_target =
        if args.broadcast { Some(SocketAddrV4::new(Ipv4Addr::BROADCAST, socket.local_addr().port())) } else { target };
    eprintln!("bound {} (max payload {} bytes)", socket.local_addr(), socket.max_payload());
    let last_peer = std::sync::Mutex::new(None::<SocketAddrV4>);
    let send = async {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Some(line) = lines.next_line().await.map_err(|e| format!("stdin: {e}"))? {
            let target = fixed_target.or(*last_peer.lock().expect("lock"));
            let Some(target) = target else {
                eprintln!("overlan: no peer yet to send to (a listener replies to the last sender)");
                continue;
            };
            match socket.send_to(line.as_bytes(), target).await {
                Ok(()) => {}
                Err(e @ Error::MessageTooLarge { .. }) => {
                    eprintln!("overlan: line of {} bytes not sent: {e}", line.len())
                }
                Err(e) => return Err(format!("send to {target}: {e}")),
            }
        }
        match args.quit_after {
            Some(secs) => tokio::time::sleep(Duration::from_secs(secs)).await,
            None => std::future::pending::<()>().await,
        }
        Ok::<(), String>(())
    };
    let recv = async {
        let mut stdout = tokio::io::stdout();
        loop {
            let (src, payload) = socket.recv().await?;
            *last_peer.lock().expect("lock") = Some(src);
            let mut line = Vec::with_capacity(payload.len() + 24);
            if args.show_source {
                line.extend_from_slice(format!("{src} ").as_bytes());
            }
            line.extend_from_slice(&payload);
            if line.last() != Some(&b'\n') {
                line.push(b'\n');
            }
            stdout.write_all(&line).await.map_err(|e| format!("stdout: {e}"))?;
            stdout.flush().await.map_err(|e| format!("stdout: {e}"))?;
        }
        #[allow(unreachable_code)]
        Ok::<(), String>(())
    };
    tokio::select! {
        r = send => r.map_err(CliError::from),
        r = recv => r.map_err(CliError::from),
        signal = shutdown.recv() => Err(CliError::interrupted(signal)),
    }
}

/// The signals that end a command.
#[derive(Debug, Clone, Copy)]
enum Signal {
    /// Ctrl-C.
    Interrupt,
    /// `kill`, `systemctl stop`, `docker stop`.
    Terminate,
}

impl Signal {
    /// The conventional exit status: 128 + the signal number.
    fn exit_code(self) -> u8 {
        match self {
            Signal::Interrupt => 130,
            Signal::Terminate => 143,
        }
    }
}

/// Ctrl-C (SIGINT) and SIGTERM (`systemctl stop`, `docker stop`), registered when made:
/// a signal that arrives before anything waits on it is kept, not fatal.
struct Shutdown {
    #[cfg(unix)]
    signals: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Shutdown {
    fn register() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let signals = signal(SignalKind::interrupt()).ok().zip(signal(SignalKind::terminate()).ok());
            Self { signals }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Resolves on the next signal, saying which.
    async fn recv(&mut self) -> Signal {
        #[cfg(unix)]
        if let Some((int, term)) = &mut self.signals {
            return tokio::select! {
                _ = int.recv() => Signal::Interrupt,
                _ = term.recv() => Signal::Terminate,
            };
        }
        let _ = tokio::signal::ctrl_c().await;
        Signal::Interrupt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Lookup = std::io::Result<std::vec::IntoIter<std::net::SocketAddr>>;

    #[tokio::test]
    async fn the_join_hint_names_what_is_slow() {
        // The name has not resolved: DNS is named, not the relay.
        let slow = tokio::spawn(std::future::pending::<Lookup>());
        let hint = join_hint("relay.example:7700", Some(slow)).await;
        assert_eq!(hint, "the relay's name relay.example has not resolved yet: is DNS reachable from here?");
        // It failed: said with the resolver's error.
        let failed = tokio::spawn(async { Lookup::Err(std::io::Error::other("no such name")) });
        while !failed.is_finished() {
            tokio::task::yield_now().await;
        }
        let hint = join_hint("relay.example:7700", Some(failed)).await;
        assert_eq!(hint, "cannot resolve the relay's name relay.example: no such name");
        // Resolved (or an address): the relay does not answer.
        let resolved = tokio::spawn(async { Lookup::Ok(Vec::new().into_iter()) });
        while !resolved.is_finished() {
            tokio::task::yield_now().await;
        }
        let expected =
            "no answer from relay relay.example:7700 yet: is it running, and is UDP port 7700 reachable from here?";
        assert_eq!(join_hint("relay.example:7700", Some(resolved)).await, expected);
        assert_eq!(join_hint("relay.example:7700", None::<tokio::task::JoinHandle<Lookup>>).await, expected);
    }
}
