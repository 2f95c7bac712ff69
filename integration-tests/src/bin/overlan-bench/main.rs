//! `overlan-bench`: measures the relay against direct QUIC in one run, so the ratios
//! mean something on a shared, noisy machine, on loopback or (`--veth`, as root) over a
//! veth link with MTU 1500 between two network namespaces. Build everything in release
//! first; the relay runs as its own `overlan-server` process next to this binary:
//!
//! ```text
//! cargo build --release --bins && target/release/overlan-bench
//! ```

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::Parser;
use overlan_client::{Client, Identity, JoinOptions};
use overlan_shared::config::format_duration;
use overlan_shared::tls;
use overlan_shared::wire::control::{ClientMessage, RelayMessage};
use overlan_shared::wire::frame::ClientSideCodec;
use overlan_shared::wire::{ALPN_CLIENT, DEFAULT_MAX_CONTROL_FRAME, PROTOCOL_VERSION, RELAY_SERVER_NAME};
use overlan_shared::Invite;
use quinn::VarInt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

mod cluster;
mod forwarder;
mod net;

use net::net;

const CHUNK: usize = 256 * 1024;
/// The `[limits]` the bench's relay runs with: rates, the cap on joins in progress and
/// the per-identity instance cap (the bench's members are instances of one identity)
/// raised far above what the bench uses; every other limit at its default.
const BENCH_RELAY_LIMITS: &str = "[limits]
datagram_rate = 100000000
datagram_burst = 10000000
broadcast_rate = 1000000
broadcast_burst = 1000000
control_rate = 1000000
control_burst = 1000000
max_unauthenticated = 100000
instances_per_identity = 1000000
";

/// Bench-side sessions sharing one UDP socket.
const SESSIONS_PER_SOCKET: usize = 20;
/// Idle timeout of the relay in the data-path measurements (the idle-memory one runs the
/// relay with its default).
const DATA_PATH_IDLE: Duration = Duration::from_secs(30);
/// Ports every bench-side member session binds (datagrams) and listens on (streams).
const MEMBER_DATAGRAM_PORT: u16 = 4445;
const MEMBER_STREAM_PORT: u16 = 7000;

/// Measures the relay against direct QUIC, in one run.
#[derive(Debug, Parser)]
#[command(name = "overlan-bench")]
struct Cli {
    /// Small sizes, to check the bench end to end in seconds; flags given explicitly win.
    #[arg(long)]
    quick: bool,
    /// Bytes sent one way per throughput round [default: 1 GiB; --quick: 64 MiB].
    #[arg(long, value_name = "N")]
    bytes: Option<u64>,
    /// Throughput rounds; the median is the figure [default: 3; --quick: 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    rounds: Option<u32>,
    /// 64-byte round trips per path [default: 5000; --quick: 500].
    #[arg(long, value_name = "N")]
    rtt_iters: Option<usize>,
    /// Seconds of datagram sending [default: 3; --quick: 1].
    #[arg(long, value_name = "SECS")]
    datagram_secs: Option<u64>,
    /// Member sessions that get each broadcast [default: 1000; --quick: 100].
    #[arg(long, value_name = "N")]
    broadcast_members: Option<usize>,
    /// Broadcasts timed, at least 5; the median is the figure.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(5..))]
    broadcast_samples: u32,
    /// Idle session counts, each on a fresh relay [default: 1000,10000; --quick: 200].
    #[arg(long, value_name = "N,N", value_delimiter = ',')]
    idle_sessions: Option<Vec<usize>>,
    /// Only the idle-memory measurement.
    #[arg(long)]
    only_idle: bool,
    /// Only the cluster measurements (three relay nodes).
    #[arg(long, conflicts_with = "only_idle")]
    only_cluster: bool,
    /// Leave out the cluster measurements.
    #[arg(long, conflicts_with = "only_cluster")]
    skip_cluster: bool,
    /// Only the one-relay data path (throughput, round trip, datagrams, broadcast).
    #[arg(long, conflicts_with_all = ["only_idle", "only_cluster"])]
    only_data_path: bool,
    /// Failover samples in the cluster measurements (each kills and restarts a node).
    #[arg(long, value_name = "N", default_value_t = 3)]
    failover_samples: usize,
    /// A rathole binary, for the stretch comparison with an encrypted TCP forwarder.
    #[arg(long, value_name = "PATH")]
    rathole: Option<PathBuf>,
    /// Run the relay host in a network namespace of its own, joined to the clients' by a
    /// veth link with MTU 1500, instead of loopback (needs root; no cluster measurements).
    #[arg(long, conflicts_with = "only_cluster")]
    veth: bool,
    /// Internal: run as the bench's UDP forwarder on BIND (routing by connection ID;
    /// packets for slots it has not seen go to DEFAULT).
    #[arg(long, num_args = 2, value_names = ["BIND", "DEFAULT"], hide = true)]
    udp_forwarder: Option<Vec<SocketAddr>>,
}

/// The settings of one run: the flags, with --quick or the defaults filled in.
struct Args {
    bytes: u64,
    rounds: usize,
    rtt_iters: usize,
    datagram_secs: u64,
    broadcast_members: usize,
    broadcast_samples: usize,
    idle_sessions: Vec<usize>,
    only_idle: bool,
    only_cluster: bool,
    skip_cluster: bool,
    only_data_path: bool,
    failover_samples: usize,
    rathole: Option<PathBuf>,
}

impl From<Cli> for Args {
    fn from(cli: Cli) -> Self {
        let quick = cli.quick;
        Args {
            bytes: cli.bytes.unwrap_or(if quick { 64 << 20 } else { 1 << 30 }),
            rounds: cli.rounds.unwrap_or(if quick { 1 } else { 3 }) as usize,
            rtt_iters: cli.rtt_iters.unwrap_or(if quick { 500 } else { 5000 }),
            datagram_secs: cli.datagram_secs.unwrap_or(if quick { 1 } else { 3 }),
            broadcast_members: cli.broadcast_members.unwrap_or(if quick { 100 } else { 1000 }),
            broadcast_samples: cli.broadcast_samples as usize,
            idle_sessions: cli.idle_sessions.unwrap_or_else(|| if quick { vec![200] } else { vec![1000, 10_000] }),
            only_idle: cli.only_idle,
            only_cluster: cli.only_cluster,
            skip_cluster: cli.skip_cluster || cli.veth,
            only_data_path: cli.only_data_path,
            failover_samples: cli.failover_samples,
            rathole: cli.rathole,
        }
    }
}

/// The client library's transport settings toward the relay host, for the clients of
/// each path.
fn client_transport(idle_timeout: Duration) -> anyhow::Result<quinn::TransportConfig> {
    let mtu_bound = overlan_shared::udp::mtu_bound_toward(net().relay_ip.into());
    Ok(overlan_client::transport_config(idle_timeout, mtu_bound)?)
}

/// How the direct quinn baseline is configured.
#[derive(Debug, Clone, Copy)]
enum Baseline {
    /// quinn's defaults on both ends: plain quinn, as shipped.
    Default,
    /// The server end with the relay's transport settings, the client end with the
    /// client library's: one hop of the relay path, without the relay.
    RelaySettings,
    /// As `RelaySettings`, both ends on the client host, through `hops` UDP forwarder
    /// processes in a line on the relay host: an end-to-end sealed path (see
    /// `forwarder`), through one relay or two.
    Forwarded { hops: usize },
}

impl Baseline {
    fn label(self) -> &'static str {
        match self {
            Baseline::Default => "direct quinn (default settings)",
            Baseline::RelaySettings => "direct quinn (relay's settings)",
            Baseline::Forwarded { hops: 1 } => "end to end via a UDP forwarder",
            Baseline::Forwarded { .. } => "end to end via two UDP forwarders",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Baseline::Default => "direct default",
            Baseline::RelaySettings => "direct relay-set",
            Baseline::Forwarded { hops: 1 } => "forwarded",
            Baseline::Forwarded { .. } => "forwarded x2",
        }
    }
}

/// A direct quinn connection between two endpoints of this process.
struct Direct {
    baseline: Baseline,
    client: quinn::Connection,
    server: quinn::Connection,
    /// The forwarders between the ends (`Baseline::Forwarded`), the client's first.
    forwarders: Vec<forwarder::Forwarder>,
}

/// Order-sensitive checksum: every 8-byte word is mixed with its offset.
#[derive(Default)]
struct Checksum {
    offset: u64,
    state: u64,
    tail: Vec<u8>,
}

impl Checksum {
    fn update(&mut self, mut data: &[u8]) {
        if !self.tail.is_empty() {
            let need = 8 - self.tail.len();
            let take = need.min(data.len());
            self.tail.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.tail.len() == 8 {
                let w = u64::from_le_bytes(self.tail[..].try_into().expect("8 bytes"));
                self.word(w);
                self.tail.clear();
            }
        }
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            self.word(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        self.tail.extend_from_slice(chunks.remainder());
    }

    fn word(&mut self, w: u64) {
        let x = (w ^ self.offset).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.state = (self.state ^ x).rotate_left(23).wrapping_add(0x632B_E59B_D9B4_E019);
        self.offset += 8;
    }

    fn finish(mut self) -> u64 {
        let tail = std::mem::take(&mut self.tail);
        for b in tail {
            self.word(u64::from(b));
        }
        self.state ^ self.offset
    }
}

fn pattern() -> Bytes {
    let mut v = vec![0u8; CHUNK];
    let mut x: u64 = 0x1234_5678_9abc_def0;
    for b in v.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    Bytes::from(v)
}

/// Sends `total` bytes (the pattern, repeatedly) and returns the checksum of what was sent.
async fn send_bytes(w: &mut (impl AsyncWriteExt + Unpin), total: u64) -> anyhow::Result<u64> {
    let chunk = pattern();
    let mut sum = Checksum::default();
    let mut left = total;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        w.write_all(&chunk[..n]).await?;
        sum.update(&chunk[..n]);
        left -= n as u64;
    }
    w.shutdown().await?;
    Ok(sum.finish())
}

async fn recv_bytes(r: &mut (impl AsyncReadExt + Unpin)) -> anyhow::Result<(u64, u64)> {
    let mut buf = vec![0u8; CHUNK];
    let mut sum = Checksum::default();
    let mut n_total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        sum.update(&buf[..n]);
        n_total += n as u64;
    }
    Ok((n_total, sum.finish()))
}

struct Throughput {
    mib_s: f64,
    intact: bool,
}

async fn throughput<W, R>(mut w: W, mut r: R, total: u64) -> anyhow::Result<Throughput>
where
    W: AsyncWriteExt + Unpin + Send + 'static,
    R: AsyncReadExt + Unpin + Send + 'static,
{
    let start = Instant::now();
    let sender = tokio::spawn(async move { send_bytes(&mut w, total).await });
    let (got, recv_sum) = recv_bytes(&mut r).await?;
    let sent_sum = sender.await??;
    let secs = start.elapsed().as_secs_f64();
    Ok(Throughput { mib_s: got as f64 / secs / (1 << 20) as f64, intact: got == total && recv_sum == sent_sum })
}

/// The median; of an even count, the mean of the middle two.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn rtt<S: AsyncReadExt + AsyncWriteExt + Unpin>(
    client: &mut S,
    iters: usize,
) -> anyhow::Result<(Duration, Duration)> {
    let mut samples = Vec::with_capacity(iters);
    let req = [7u8; 64];
    let mut resp = [0u8; 64];
    for _ in 0..iters {
        let t = Instant::now();
        client.write_all(&req).await?;
        client.read_exact(&mut resp).await?;
        samples.push(t.elapsed());
    }
    samples.sort();
    Ok((percentile(&samples, 0.5), percentile(&samples, 0.99)))
}

async fn echo<S: AsyncReadExt + AsyncWriteExt + Unpin>(mut s: S) {
    let mut buf = [0u8; 64];
    while s.read_exact(&mut buf).await.is_ok() {
        if s.write_all(&buf).await.is_err() {
            break;
        }
    }
}

/// A relay process started from the `overlan-server` binary next to this one.
struct RelayProcess {
    child: tokio::process::Child,
    invite: Invite,
    _dir: tempfile::TempDir,
}

impl RelayProcess {
    /// Starts the relay with `args` after its listen, log and data-dir flags.
    async fn start(args: &[&str]) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let server: PathBuf = exe.with_file_name("overlan-server");
        if !server.exists() {
            bail!("{} not found: run `cargo build --release --bins` first", server.display());
        }
        let dir = tempfile::tempdir()?;
        // OVERLAN_BENCH_RELAY_WRAPPER runs the relay under a tool, e.g. valgrind's massif.
        let wrapper = std::env::var("OVERLAN_BENCH_RELAY_WRAPPER").unwrap_or_default();
        let mut words = net().relay_host_prefix();
        words.extend(wrapper.split_whitespace().map(str::to_owned));
        words.push(server.display().to_string());
        // The relay's per-session rates (datagrams, broadcasts, control messages) and its
        // cap on joins in progress protect members from each other; the bench measures
        // the data path, so it raises them above what it sends and says so.
        let config = dir.path().join("bench-relay.toml");
        std::fs::write(&config, BENCH_RELAY_LIMITS)?;
        eprintln!(
            "relay limits raised for the bench: {}",
            BENCH_RELAY_LIMITS.lines().skip(1).collect::<Vec<_>>().join(", ")
        );
        let mut child = tokio::process::Command::new(&words[0])
            .args(&words[1..])
            .args(["--listen", &format!("{}:0", net().relay_ip), "--log", "warn"])
            .arg("--config")
            .arg(&config)
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut invite = None;
        while let Some(line) = lines.next_line().await? {
            if let Some(uri) = line.strip_prefix("invite ") {
                invite = Some(uri.parse()?);
                break;
            }
        }
        let invite = invite.context("relay printed no invite")?;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self { child, invite, _dir: dir })
    }

    /// Stops the relay with SIGTERM, so a profiling wrapper can write its report.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
            let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        }
    }

    fn rss_kib(&self) -> anyhow::Result<u64> {
        rss_kib(&self.child.id().context("relay exited")?.to_string())
    }
}

fn rss_kib(pid: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

/// A TCP port free on the relay host.
fn free_port() -> anyhow::Result<u16> {
    let ip = net().relay_ip;
    net().on_relay_host(move || std::net::TcpListener::bind((ip, 0))?.local_addr().map(|a| a.port()))
}

fn run_quiet(program: &str, args: &[&str], dir: &std::path::Path) -> anyhow::Result<()> {
    let status = std::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running {program}"))?;
    anyhow::ensure!(status.success(), "{program} {args:?} failed");
    Ok(())
}

/// The stretch baseline: an encrypted TCP port forwarder through a relay on this machine
/// (rathole, TLS transport, ECDSA P-256 certificate): bench → rathole server (on the
/// relay host) → TLS → rathole client (on the client host) → a TCP sink in this process.
async fn rathole_throughput(rathole: &std::path::Path, total: u64) -> anyhow::Result<Throughput> {
    let tunnel = RatholeTunnel::start(rathole).await?;
    let (_r, w) = tunnel.out.into_split();
    let (r, _w) = tunnel.inn.into_split();
    throughput(w, r, total).await
}

/// The same transfer through the command line: `overlan nc -l` (stdout read by the
/// bench) and `overlan nc VIP PORT` (stdin written by the bench), each its own process
/// and session, as a user pipes a file. Timed from the listener's "connection from" to
/// the listener's end of output, so the joins are not counted.
async fn nc_throughput(relay: &RelayProcess, total: u64) -> anyhow::Result<Throughput> {
    let exe = std::env::current_exe()?.with_file_name("overlan");
    anyhow::ensure!(exe.exists(), "{} not found: run `cargo build --release --bins` first", exe.display());
    let dir = tempfile::tempdir()?;
    let invite = relay.invite.to_string();
    let command = |name: &str, args: &[&str]| {
        let mut c = tokio::process::Command::new(&exe);
        c.env("XDG_RUNTIME_DIR", dir.path()) // no `up` of the user's is used
            .env_remove("OVERLAN_INVITE")
            .args(["--invite", &invite, "--name", name, "--log", "warn", "--identity"])
            .arg(dir.path().join(format!("{name}.pem")))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        c
    };
    // The listener sends nothing back: its stdin ends at once, as `< /dev/null` would.
    let mut listener = command("nc-in", &["nc", "-l", "9100"]).stdin(std::process::Stdio::null()).spawn()?;
    let mut said = BufReader::new(listener.stderr.take().context("stderr")?).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = said.next_line().await? {
            if line.starts_with("listening on ") {
                return Ok(line);
            }
        }
        anyhow::bail!("overlan nc -l ended before listening")
    })
    .await
    .context("overlan nc -l did not listen within 20 s")??;
    let addr: SocketAddrV4 = line.rsplit(' ').next().context("address")?.parse()?;
    let mut sender = command("nc-out", &["nc", &addr.ip().to_string(), &addr.port().to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = said.next_line().await? {
            if line.starts_with("connection from ") {
                return Ok(());
            }
        }
        anyhow::bail!("overlan nc -l ended before a connection")
    })
    .await
    .context("no connection within 20 s")??;
    tokio::spawn(async move { while let Ok(Some(_)) = said.next_line().await {} });
    let w = sender.stdin.take().context("stdin")?;
    let r = listener.stdout.take().context("stdout")?;
    let measured = throughput(w, r, total).await?;
    for (name, child) in [("overlan nc", &mut sender), ("overlan nc -l", &mut listener)] {
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.context("exit")??;
        anyhow::ensure!(status.success(), "{name} failed: {status}");
    }
    Ok(measured)
}

/// A rathole server and client (TLS transport) across the two hosts, and one TCP connection
/// through them: `out` enters at the server's public port, `inn` arrives at the sink.
struct RatholeTunnel {
    out: tokio::net::TcpStream,
    inn: tokio::net::TcpStream,
    _processes: [tokio::process::Child; 2],
    _dir: tempfile::TempDir,
}

impl RatholeTunnel {
    async fn start(rathole: &std::path::Path) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        run_quiet(
            "openssl",
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "key.pem",
                "-out",
                "cert.pem",
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost",
            ],
            d,
        )?;
        run_quiet(
            "openssl",
            &[
                "pkcs12",
                "-export",
                "-out",
                "identity.pfx",
                "-inkey",
                "key.pem",
                "-in",
                "cert.pem",
                "-passout",
                "pass:bench",
            ],
            d,
        )?;
        let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let (control, public) = (free_port()?, free_port()?);
        let relay_ip = net().relay_ip;
        std::fs::write(
            d.join("server.toml"),
            format!(
                "[server]\nbind_addr = \"{relay_ip}:{control}\"\n[server.transport]\ntype = \"tls\"\n\
             [server.transport.tls]\npkcs12 = \"identity.pfx\"\npkcs12_password = \"bench\"\n\
             [server.services.bench]\ntoken = \"bench\"\nbind_addr = \"{relay_ip}:{public}\"\n"
            ),
        )?;
        std::fs::write(
            d.join("client.toml"),
            format!(
                "[client]\nremote_addr = \"{relay_ip}:{control}\"\n[client.transport]\ntype = \"tls\"\n\
             [client.transport.tls]\ntrusted_root = \"cert.pem\"\nhostname = \"localhost\"\n\
             [client.services.bench]\ntoken = \"bench\"\nlocal_addr = \"{}\"\n",
                sink.local_addr()?
            ),
        )?;
        let spawn = |mode: &str, config: &str| {
            let mut command = match mode {
                "--server" => net().relay_host_command(rathole),
                _ => tokio::process::Command::new(rathole),
            };
            command
                .arg(mode)
                .arg(config)
                .current_dir(d)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
        };
        let server = spawn("--server", "server.toml")?;
        let client = spawn("--client", "client.toml")?;
        // The public port answers once the client has registered the service.
        let deadline = Instant::now() + Duration::from_secs(20);
        let (out, inn) = loop {
            if let Ok(out) = tokio::net::TcpStream::connect((relay_ip, public)).await {
                if let Ok(Ok((inn, _))) = tokio::time::timeout(Duration::from_secs(2), sink.accept()).await {
                    break (out, inn);
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "rathole tunnel did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        out.set_nodelay(true)?;
        inn.set_nodelay(true)?;
        Ok(Self { out, inn, _processes: [server, client], _dir: dir })
    }
}

/// A direct quinn server (on the relay host) and client, the baseline.
async fn direct_pair(baseline: Baseline) -> anyhow::Result<Direct> {
    let id = Identity::generate(&[RELAY_SERVER_NAME])?;
    let server_crypto = tls::server_config(&id, &[ALPN_CLIENT])?;
    let mut server_config =
        quinn::ServerConfig::with_crypto(Arc::new(quinn::crypto::rustls::QuicServerConfig::try_from(server_crypto)?));
    let client_crypto = tls::client_config(Some(&Identity::generate(&["c"])?), id.fingerprint(), ALPN_CLIENT)?;
    let mut client_config =
        quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(client_crypto)?));
    let like_relay = matches!(baseline, Baseline::RelaySettings | Baseline::Forwarded { .. });
    if like_relay {
        // The server end's peer: the client host, or the forwarder on the relay host.
        let peer = if let Baseline::Forwarded { .. } = baseline { net().relay_ip } else { net().client_ip };
        let mtu_bound = overlan_shared::udp::mtu_bound_toward(peer.into());
        server_config.transport_config(Arc::new(overlan_server::relay::transport_config(DATA_PATH_IDLE, mtu_bound)?));
        client_config.transport_config(Arc::new(client_transport(DATA_PATH_IDLE)?));
    }
    let runtime = Arc::new(quinn::TokioRuntime);
    // Like the relay path: the client end takes the client library's socket buffers,
    // the server end the relay's (a large receive buffer, the default send buffer).
    let relay_ip = net().relay_ip;
    let server_socket = match baseline {
        Baseline::Forwarded { .. } => std::net::UdpSocket::bind((net().client_ip, 0))?,
        _ => net().on_relay_host(move || std::net::UdpSocket::bind((relay_ip, 0)))?,
    };
    let client_socket = std::net::UdpSocket::bind((net().client_ip, 0))?;
    if like_relay {
        overlan_shared::udp::enlarge_buffers(&client_socket)?;
        overlan_shared::udp::enlarge_receive_buffer(&server_socket)?;
    }
    let (mut server_endpoint, mut client_endpoint) = match baseline {
        Baseline::RelaySettings | Baseline::Forwarded { .. } => {
            (overlan_server::relay::endpoint_config(), overlan_client::endpoint_config())
        }
        Baseline::Default => Default::default(),
    };
    if let Baseline::Forwarded { .. } = baseline {
        // Each end's connection IDs carry its slot, and the first packet the server's:
        // the forwarders route by them.
        const SERVER_SLOT: u32 = 1;
        const CLIENT_SLOT: u32 = 2;
        server_endpoint.cid_generator(|| Box::new(forwarder::SlotCids::new(SERVER_SLOT)));
        client_endpoint.cid_generator(|| Box::new(forwarder::SlotCids::new(CLIENT_SLOT)));
        client_config.initial_dst_cid_provider(Arc::new(|| forwarder::slot_cid(SERVER_SLOT)));
    }
    let server = quinn::Endpoint::new(server_endpoint, Some(server_config), server_socket, runtime.clone())?;
    let client = quinn::Endpoint::new(client_endpoint, None, client_socket, runtime)?;
    // A line of forwarders, started from the server's end: each passes to the next.
    let mut forwarders = Vec::new();
    let mut addr = server.local_addr()?;
    if let Baseline::Forwarded { hops } = baseline {
        for _ in 0..hops {
            let hop = forwarder::Forwarder::start(addr).await?;
            addr = hop.addr;
            forwarders.insert(0, hop);
        }
    }
    let accept = tokio::spawn(async move { server.accept().await.expect("incoming").await });
    let c = client.connect_with(client_config, addr, RELAY_SERVER_NAME)?.await?;
    let s = accept.await??;
    // The relay raises a session's stream limit as its sockets grow; this pair opens one
    // stream per round and one for the round trips, so allow them all from the start.
    s.set_max_concurrent_bi_streams(VarInt::from_u32(64));
    Ok(Direct { baseline, client: c, server: s, forwarders })
}

/// Opens a bi stream from the client end and accepts it on the server end (a first
/// byte makes it visible).
async fn direct_stream(
    direct: &Direct,
) -> anyhow::Result<(
    tokio::io::Join<quinn::RecvStream, quinn::SendStream>,
    tokio::io::Join<quinn::RecvStream, quinn::SendStream>,
)> {
    let (mut cs, cr) = direct.client.open_bi().await?;
    cs.write_all(&[0]).await?;
    let (ss, mut sr) = direct.server.accept_bi().await?;
    let mut one = [0u8; 1];
    sr.read_exact(&mut one).await?;
    Ok((tokio::io::join(cr, cs), tokio::io::join(sr, ss)))
}

async fn join(invite: &Invite, identity: &Identity, instance: &str) -> anyhow::Result<Client> {
    Ok(Client::join(JoinOptions::new(invite.clone(), identity.clone()).instance(instance)).await?)
}

/// A bench-side member session, held open: the QUIC connection and its control stream.
struct RawSession {
    conn: quinn::Connection,
    /// The session's idle timeout, from the relay's welcome.
    idle_timeout: Duration,
    _control: (quinn::SendStream, quinn::RecvStream),
}

/// A minimal member session on a shared endpoint, shaped like a real member: handshake,
/// hello, welcome, then a datagram port bound and a stream port listened on.
async fn raw_session(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    relay: SocketAddr,
    token: &str,
    instance: String,
) -> anyhow::Result<RawSession> {
    let conn = endpoint.connect_with(config.clone(), relay, RELAY_SERVER_NAME)?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let codec = ClientSideCodec::new(DEFAULT_MAX_CONTROL_FRAME);
    let mut buf = bytes::BytesMut::new();
    let hello = ClientMessage::Hello {
        protocol: PROTOCOL_VERSION,
        token: overlan_shared::config::Secret::new(token),
        instance,
        lease: None,
        network: None,
        tun: false,
        existing_only: false,
    };
    codec.encode_into(&hello, &mut buf)?;
    codec.encode_into(&ClientMessage::Bind { req: 1, port: MEMBER_DATAGRAM_PORT }, &mut buf)?;
    codec.encode_into(&ClientMessage::Listen { req: 2, port: MEMBER_STREAM_PORT }, &mut buf)?;
    send.write_all(&buf).await?;
    let mut inbuf = bytes::BytesMut::new();
    let (mut idle_timeout, mut bound, mut listening) = (None, false, false);
    while idle_timeout.is_none() || !bound || !listening {
        let mut tmp = [0u8; 1024];
        let n = recv.read(&mut tmp).await?.context("relay closed the control stream")?;
        inbuf.extend_from_slice(&tmp[..n]);
        while let Some(msg) = codec.decode_from(&mut inbuf)? {
            match msg {
                RelayMessage::Welcome { idle_timeout_ms, .. } => {
                    idle_timeout = Some(Duration::from_millis(idle_timeout_ms))
                }
                RelayMessage::Bound { .. } => bound = true,
                RelayMessage::Listening { .. } => listening = true,
                other => bail!("unexpected {other:?}"),
            }
        }
    }
    let idle_timeout = idle_timeout.expect("welcome received");
    Ok(RawSession { conn, idle_timeout, _control: (send, recv) })
}

/// Handshakes of [`open_sessions`] that timed out and were tried again.
static HANDSHAKES_RETRIED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Opens `n` member sessions with the client library's transport settings, `per_socket`
/// of them on each UDP socket.
async fn open_sessions(
    invite: &Invite,
    n: usize,
    per_socket: usize,
    idle_timeout: Duration,
) -> anyhow::Result<Vec<RawSession>> {
    let identity = Identity::generate(&["bench"])?;
    let crypto = tls::client_config(Some(&identity), invite.fingerprint, ALPN_CLIENT)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(crypto)?));
    config.transport_config(Arc::new(client_transport(idle_timeout)?));
    // Members are separate machines in real life: one UDP socket per 20 sessions keeps
    // a burst to all of them from overflowing a single socket's receive buffer here.
    let endpoints = (0..n.div_ceil(per_socket))
        .map(|_| {
            let socket = std::net::UdpSocket::bind((net().client_ip, 0))?;
            // As the client library's sockets.
            overlan_shared::udp::enlarge_buffers(&socket)?;
            quinn::Endpoint::new(overlan_client::endpoint_config(), None, socket, Arc::new(quinn::TokioRuntime))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let relay_addr: SocketAddr = invite.relay.parse()?;
    let token = invite.token.expose().to_owned();
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let endpoint = endpoints[i / per_socket].clone();
        let (config, token, sem) = (config.clone(), token.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.expect("semaphore");
            // Thousands of sessions share a bench socket and two cores; a handshake
            // that times out is tried again, as a real client would, and counted.
            let mut tries = 0;
            loop {
                match raw_session(&endpoint, &config, relay_addr, &token, format!("s{i}")).await {
                    Err(e) if tries < 2 && matches!(e.downcast_ref(), Some(quinn::ConnectionError::TimedOut)) => {
                        tries += 1;
                        HANDSHAKES_RETRIED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    other => break other,
                }
            }
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(addrs) = &cli.udp_forwarder {
        return forwarder::serve(addrs[0], addrs[1]);
    }
    // Before the runtime's threads start, so that they all live on the client host.
    let hosts = if cli.veth { Some(net::enter_veth()?) } else { None };
    let args = Args::from(cli);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = run(&args) => outcome,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
            _ = terminated() => bail!("terminated"),
        }
    });
    // Child processes first (they are killed on drop), then the namespaces.
    drop(runtime);
    drop(hosts);
    outcome
}

/// Resolves on SIGTERM.
async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            term.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

async fn run(args: &Args) -> anyhow::Result<()> {
    if args.only_cluster {
        return cluster::run(args).await;
    }
    println!("# overlan-bench  (relay process vs direct quinn {}, same run)", net().describe());
    if !args.only_idle {
        data_path(args).await?;
        if args.only_data_path {
            return Ok(());
        }
        if !args.skip_cluster {
            cluster::run(args).await?;
        }
    }
    idle_memory(args).await
}

async fn data_path(args: &Args) -> anyhow::Result<()> {
    let relay = RelayProcess::start(&["--idle-timeout", &format_duration(DATA_PATH_IDLE)]).await?;
    let me = Identity::generate(&["bench"])?;
    let a = join(&relay.invite, &me, "a").await?;
    let b = join(&relay.invite, &me, "b").await?;
    let directs = [
        direct_pair(Baseline::Default).await?,
        direct_pair(Baseline::RelaySettings).await?,
        direct_pair(Baseline::Forwarded { hops: 1 }).await?,
        direct_pair(Baseline::Forwarded { hops: 2 }).await?,
    ];
    stream_throughput(args, &relay, &a, &b, &directs).await?;
    round_trip(args, &a, &b, &directs).await?;
    datagrams(args, &a, &b).await?;
    broadcast(args, &relay, &a).await?;
    a.leave().await;
    b.leave().await;
    // SIGTERM, not a kill on drop: a profiling wrapper writes its report on the way out.
    relay.stop().await;
    Ok(())
}

/// Stream throughput: rounds alternate the direct baselines, the relay (and rathole), so
/// a noisy neighbour hits all of them alike; the medians of the rounds are the figures.
async fn stream_throughput(
    args: &Args,
    relay: &RelayProcess,
    a: &Client,
    b: &Client,
    directs: &[Direct],
) -> anyhow::Result<()> {
    let listener = b.listen(9000).await?;
    let size = match args.bytes {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
    };
    let rounds = if args.rounds == 1 { "1 round".to_owned() } else { format!("{} rounds", args.rounds) };
    println!("stream throughput, {size} one way per round, checksummed, {rounds}:");
    let (mut direct, mut relayed, mut ratholes) = (vec![Vec::new(); directs.len()], Vec::new(), Vec::new());
    let mut ncs = Vec::new();
    // CPU seconds per GiB passed on, by the relay and by the UDP forwarder.
    let (mut relay_cpu, mut forwarder_cpu) = (Vec::new(), Vec::new());
    let gib = args.bytes as f64 / (1u64 << 30) as f64;
    let relay_pid = relay.child.id().context("the relay exited")?;
    for round in 1..=args.rounds {
        print!("  round {round}:");
        for (pair, rounds) in directs.iter().zip(&mut direct) {
            let (c, s) = direct_stream(pair).await?;
            let (_cr, cw) = c.into_inner();
            let (sr, _sw) = s.into_inner();
            let one = match pair.forwarders.as_slice() {
                [one] => Some(one),
                _ => None,
            };
            let cpu_before = one.map(|f| f.cpu_secs()).transpose()?;
            let measured = throughput(cw, sr, args.bytes).await?;
            if let (Some(f), Some(before)) = (one, cpu_before) {
                forwarder_cpu.push((f.cpu_secs()? - before) / gib);
            }
            anyhow::ensure!(measured.intact, "{} lost or changed bytes", pair.baseline.label());
            print!(
                " {} {:.1} MiB/s (mtu {}, lost {}),",
                pair.baseline.short(),
                measured.mib_s,
                pair.client.stats().path.current_mtu,
                pair.client.stats().path.lost_packets
            );
            rounds.push(measured.mib_s);
        }
        let out = a.connect(listener.local_addr()).await?;
        let (inn, _) = listener.accept().await?;
        let (_or, ow) = out.into_split();
        let (ir, _iw) = inn.into_split();
        let cpu_before = forwarder::cpu_secs(relay_pid)?;
        let measured = throughput(ow, ir, args.bytes).await?;
        relay_cpu.push((forwarder::cpu_secs(relay_pid)? - cpu_before) / gib);
        anyhow::ensure!(measured.intact, "the relay lost or changed bytes");
        print!(" relay {:.1} MiB/s", measured.mib_s);
        relayed.push(measured.mib_s);
        let piped = nc_throughput(relay, args.bytes).await?;
        anyhow::ensure!(piped.intact, "overlan nc lost or changed bytes");
        print!(", overlan nc {:.1} MiB/s", piped.mib_s);
        ncs.push(piped.mib_s);
        if let Some(rathole) = &args.rathole {
            let forwarded = rathole_throughput(rathole, args.bytes).await?;
            anyhow::ensure!(forwarded.intact, "rathole lost or changed bytes");
            print!(", rathole {:.1} MiB/s", forwarded.mib_s);
            ratholes.push(forwarded.mib_s);
        }
        println!("  (all intact)");
    }
    let relay_median = median(&relayed);
    for (pair, rounds) in directs.iter().zip(&direct) {
        println!("  {:<34} {:>9.1} MiB/s (median)", pair.baseline.label(), median(rounds));
    }
    println!("  {:<34} {relay_median:>9.1} MiB/s (median)", "via relay");
    // Each round's ratio is against the baseline measured beside it; the figure is
    // their median.
    let mut like_configured = None;
    for (pair, rounds) in directs.iter().zip(&direct) {
        let ratios: Vec<f64> = relayed.iter().zip(rounds).map(|(r, d)| r / d).collect();
        let shown: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        let ratio = median(&ratios);
        println!("  ratio relay / {:<34} {ratio:.2} (median of rounds: {})", pair.baseline.label(), shown.join(", "));
        if let Baseline::RelaySettings = pair.baseline {
            like_configured = Some(ratio);
        }
    }
    // The end-to-end path's own two-node ratio, beside the cluster's (issue 7).
    let hops = |n: usize| directs.iter().position(|d| matches!(d.baseline, Baseline::Forwarded { hops } if hops == n));
    if let (Some(one), Some(two)) = (hops(1), hops(2)) {
        let ratios: Vec<f64> = direct[two].iter().zip(&direct[one]).map(|(t, o)| t / o).collect();
        println!(
            "  ratio two forwarders / one  {:.2} (median of rounds: {}; the cluster's two-node/one-node in another shape)",
            median(&ratios),
            ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", ")
        );
    }
    if !forwarder_cpu.is_empty() {
        println!(
            "  CPU per GiB passed on (median): relay {:.2} s, UDP forwarder {:.2} s",
            median(&relay_cpu),
            median(&forwarder_cpu)
        );
    }
    let ratio = like_configured.expect("the like-configured baseline ran");
    println!(
        "  target relay >= 0.50 x direct quinn (relay's settings), median ratio {ratio:.2}: {}",
        if ratio >= 0.50 { "met" } else { "not met" }
    );
    let nc_ratios: Vec<f64> = ncs.iter().zip(&relayed).map(|(n, r)| n / r).collect();
    let nc_ratio = median(&nc_ratios);
    println!("  {:<34} {:>9.1} MiB/s (median)", "overlan nc -> relay -> overlan nc", median(&ncs));
    println!(
        "  ratio overlan nc / library via relay  {nc_ratio:.2} (median of rounds: {}); target >= 0.90: {}",
        nc_ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", "),
        if nc_ratio >= 0.90 { "met" } else { "not met" }
    );
    if !ratholes.is_empty() {
        let forwarded = median(&ratholes);
        println!("  ratio overlan nc/rathole  {:.2}  (stretch target >= 1.00)", median(&ncs) / forwarded);
        println!("  rathole (TLS transport), TCP A -> server -> client -> B  {forwarded:>9.1} MiB/s (median)");
        println!("  ratio relay/rathole  {:.2}  (stretch target >= 1.00)", relay_median / forwarded);
        for (pair, rounds) in directs.iter().zip(&direct) {
            if let Baseline::Forwarded { .. } = pair.baseline {
                println!("  ratio {}/rathole  {:.2}", pair.baseline.short(), median(rounds) / forwarded);
            }
        }
    }
    Ok(())
}

/// 64-byte request/response round trips on one stream, each direct baseline and the
/// relay; the relay's budget is against the like-configured baseline.
async fn round_trip(args: &Args, a: &Client, b: &Client, directs: &[Direct]) -> anyhow::Result<()> {
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("64-byte round trip, {} iterations:", args.rtt_iters);
    let mut like_configured = None;
    for pair in directs {
        let (mut c, s) = direct_stream(pair).await?;
        tokio::spawn(echo(s));
        let (p50, p99) = rtt(&mut c, args.rtt_iters).await?;
        println!("  {:<34} p50 {:>7.1} us  p99 {:>7.1} us", pair.baseline.label(), us(p50), us(p99));
        if let Baseline::RelaySettings = pair.baseline {
            like_configured = Some(p50);
        }
    }
    let l = b.listen(9001).await?;
    let mut out = a.connect(l.local_addr()).await?;
    let (inn, _) = l.accept().await?;
    tokio::spawn(echo(inn));
    let (r50, r99) = rtt(&mut out, args.rtt_iters).await?;
    println!("  {:<34} p50 {:>7.1} us  p99 {:>7.1} us", "via relay", us(r50), us(r99));
    if let Some(rathole) = &args.rathole {
        let mut tunnel = RatholeTunnel::start(rathole).await?;
        tokio::spawn(echo(tunnel.inn));
        let (t50, t99) = rtt(&mut tunnel.out, args.rtt_iters).await?;
        println!("  {:<34} p50 {:>7.1} us  p99 {:>7.1} us", "rathole (TLS)", us(t50), us(t99));
        println!("  relay p50 <= rathole p50 ({:.1} us): {}", us(t50), if r50 <= t50 { "met" } else { "MISSED" });
    }
    let budget = 2.0 * us(like_configured.expect("the like-configured baseline ran")) + 50.0;
    println!(
        "  relay p50 budget 2 x direct (relay's settings) + 50 us = {budget:.1} us: {}",
        if us(r50) <= budget { "met" } else { "MISSED" }
    );
    Ok(())
}

/// Datagrams A -> relay -> B as fast as `send_to` takes them. The receive rate counts
/// what B got, over B's receive window (first to last datagram received).
async fn datagrams(args: &Args, a: &Client, b: &Client) -> anyhow::Result<()> {
    let sa = a.bind_datagram(0).await?;
    let sb = b.bind_datagram(7000).await?;
    let target = sb.local_addr();
    let payload = vec![1u8; 64];
    let receiver = tokio::spawn(async move {
        let (mut count, mut first, mut last) = (0u64, None, None);
        // The sender stops after datagram_secs; half a second of silence ends the count.
        while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), sb.recv()).await {
            let now = Instant::now();
            first.get_or_insert(now);
            last = Some(now);
            count += 1;
        }
        (count, first.zip(last).map(|(f, l)| l - f))
    });
    let mut sent = 0u64;
    let t0 = Instant::now();
    let stop = t0 + Duration::from_secs(args.datagram_secs);
    while Instant::now() < stop {
        for _ in 0..64 {
            sa.send_to(&payload, target).await?;
            sent += 1;
        }
    }
    let send_secs = t0.elapsed().as_secs_f64();
    let (received, window) = receiver.await?;
    println!("datagrams (64-byte payload) A -> relay -> B, sent for {}s:", args.datagram_secs);
    println!("  sent       {:>10.0}/s  ({sent} in {send_secs:.2} s)", sent as f64 / send_secs);
    match window.filter(|w| received > 1 && !w.is_zero()) {
        Some(w) => println!(
            "  received   {:>10.0}/s  ({received} in {:.2} s, first to last received)",
            (received - 1) as f64 / w.as_secs_f64(),
            w.as_secs_f64()
        ),
        None => println!("  received   {received} (too few for a rate)"),
    }
    println!("  delivered  {:>10.1}%", 100.0 * received as f64 / sent.max(1) as f64);
    Ok(())
}

/// One broadcast to every member, several times: how long until the last member has
/// its copy. Each member forwards the sample number it got and when.
async fn broadcast(args: &Args, relay: &RelayProcess, a: &Client) -> anyhow::Result<()> {
    let members = open_sessions(&relay.invite, args.broadcast_members, SESSIONS_PER_SOCKET, DATA_PATH_IDLE).await?;
    println!(
        "broadcast to {} members, {} samples (time until the last member got its copy):",
        members.len(),
        args.broadcast_samples
    );
    broadcast_to(&members, a, args.broadcast_samples).await
}

/// Times broadcasts from `a` until every one of `members` has its copy; prints each
/// sample and the median.
async fn broadcast_to(members: &[RawSession], a: &Client, samples_wanted: usize) -> anyhow::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for member in members {
        let (conn, tx) = (member.conn.clone(), tx.clone());
        tokio::spawn(async move {
            while let Ok(datagram) = conn.read_datagram().await {
                // The payload ends with the sample number.
                let Some(tail) = datagram.len().checked_sub(4).map(|at| &datagram[at..]) else { continue };
                let sample = u32::from_be_bytes(tail.try_into().expect("4 bytes"));
                if tx.send((sample, Instant::now())).is_err() {
                    break;
                }
            }
        });
    }
    let caster = a.bind_datagram(MEMBER_DATAGRAM_PORT).await?;
    let to = SocketAddrV4::new(Ipv4Addr::BROADCAST, MEMBER_DATAGRAM_PORT);
    let mut samples = Vec::new();
    for sample in 0..samples_wanted as u32 {
        let mut payload = b"lobby".to_vec();
        payload.extend_from_slice(&sample.to_be_bytes());
        let t0 = Instant::now();
        caster.send_to(&payload, to).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let (mut got, mut last) = (0, t0);
        while got < members.len() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((n, at))) if n == sample => {
                    got += 1;
                    last = last.max(at);
                }
                Ok(Some(_)) => {} // a late copy of an earlier sample
                Ok(None) | Err(_) => break,
            }
        }
        let ms = (last - t0).as_secs_f64() * 1e3;
        if got == members.len() {
            println!("  sample {}: {ms:.2} ms", sample + 1);
            samples.push(ms);
        } else {
            println!(
                "  sample {}: only {got} of {} copies within 10 s (left out of the median)",
                sample + 1,
                members.len()
            );
        }
    }
    if samples.is_empty() {
        println!("  median: none (no sample reached every member)");
    } else {
        println!("  median of {} samples: {:.2} ms", samples.len(), median(&samples));
    }
    // The forwarding tasks hold the connections; closing ends them.
    for member in members {
        member.conn.close(VarInt::from_u32(0), b"bench done");
    }
    Ok(())
}

/// Relay memory per idle member session, each count on a fresh relay process with its
/// default idle timeout. RSS is read once the sessions have run at least two keep-alive
/// rounds (steady state), and again one keep-alive interval later.
async fn idle_memory(args: &Args) -> anyhow::Result<()> {
    for &n in &args.idle_sessions {
        let relay = RelayProcess::start(&[]).await?;
        // One session first, so start-up allocations (database, runtime) are not counted.
        let warm = open_sessions(&relay.invite, 1, 1, overlan_client::DEFAULT_IDLE_TIMEOUT).await?;
        let idle = warm[0].idle_timeout;
        let keep_alive = idle / 3;
        let settle = (keep_alive * 2 + Duration::from_secs(1)).max(Duration::from_secs(7));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = relay.rss_kib()?;
        let own_before = rss_kib("self")?;
        let sessions = open_sessions(&relay.invite, n, usize::MAX, overlan_client::DEFAULT_IDLE_TIMEOUT).await?;
        tokio::time::sleep(settle).await;
        let first = relay.rss_kib()?;
        tokio::time::sleep(keep_alive).await;
        let after = relay.rss_kib()?;
        let own_after = rss_kib("self")?;
        let open = sessions.iter().filter(|s| s.conn.close_reason().is_none()).count();
        let per = (after.saturating_sub(before)) as f64 / n as f64;
        let own = (own_after.saturating_sub(own_before)) as f64 / n as f64;
        println!(
            "relay RSS with {n} idle member sessions (each bound to a datagram port and listening on a stream port; \
             idle timeout {:.1} s, keep-alive every {:.1} s):",
            idle.as_secs_f64(),
            keep_alive.as_secs_f64()
        );
        println!(
            "  {before} KiB before; {first} KiB {:.1} s after the last opened; {after} KiB {:.1} s later; {open} of {n} still open",
            settle.as_secs_f64(),
            keep_alive.as_secs_f64()
        );
        println!("  {per:.1} KiB per session (target <= 32; issue 10: <= 16)");
        let retried = HANDSHAKES_RETRIED.swap(0, std::sync::atomic::Ordering::Relaxed);
        if retried > 0 {
            println!("  ({retried} handshakes timed out and were tried again)");
        }
        println!("  baseline, same run: this process's side of the same connections (plain quinn client, one socket): {own:.1} KiB per connection");
        anyhow::ensure!(open == n, "{} sessions closed while idle: keep-alives did not hold them", n - open);
        drop(sessions);
        drop(warm);
        relay.stop().await;
    }
    Ok(())
}
