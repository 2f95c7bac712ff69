//! `overlan-bench`: measures the relay against direct QUIC on loopback in one run, so
//! the ratios mean something on a shared, noisy machine. Build everything in release
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
use overlan_client::{Client, Identity, JoinOptions};
use overlan_shared::tls;
use overlan_shared::wire::control::{ClientMessage, RelayMessage};
use overlan_shared::wire::frame::ClientSideCodec;
use overlan_shared::wire::{ALPN_CLIENT, DEFAULT_MAX_CONTROL_FRAME, PROTOCOL_VERSION, RELAY_SERVER_NAME};
use overlan_shared::Invite;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const CHUNK: usize = 256 * 1024;
/// Bench-side sessions sharing one UDP socket.
const SESSIONS_PER_SOCKET: usize = 20;

struct Args {
    bytes: u64,
    rtt_iters: usize,
    datagram_secs: u64,
    idle_sessions: Vec<usize>,
    broadcast_members: usize,
    only_idle: bool,
    rathole: Option<PathBuf>,
    rounds: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        bytes: 1 << 30,
        rtt_iters: 5000,
        datagram_secs: 3,
        idle_sessions: vec![1000, 10_000],
        broadcast_members: 1000,
        only_idle: false,
        rathole: None,
        rounds: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--bytes" => args.bytes = value()?.parse()?,
            "--rtt-iters" => args.rtt_iters = value()?.parse()?,
            "--datagram-secs" => args.datagram_secs = value()?.parse()?,
            "--idle-sessions" => args.idle_sessions = value()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--broadcast-members" => args.broadcast_members = value()?.parse()?,
            "--only-idle" => args.only_idle = true,
            "--rathole" => args.rathole = Some(PathBuf::from(value()?)),
            "--rounds" => args.rounds = value()?.parse::<usize>()?.max(1),
            "--quick" => {
                args.bytes = 64 << 20;
                args.rtt_iters = 500;
                args.datagram_secs = 1;
                args.idle_sessions = vec![200];
                args.broadcast_members = 100;
                args.rounds = 1;
            }
            "-h" | "--help" => {
                println!("overlan-bench [--quick] [--bytes N] [--rtt-iters N] [--datagram-secs N] [--idle-sessions N,N] [--broadcast-members N] [--only-idle] [--rathole PATH] [--rounds N]");
                std::process::exit(0);
            }
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(args)
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

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
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
    async fn start() -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let server: PathBuf = exe.with_file_name("overlan-server");
        if !server.exists() {
            bail!("{} not found: run `cargo build --release --bins` first", server.display());
        }
        let dir = tempfile::tempdir()?;
        // OVERLAN_BENCH_RELAY_WRAPPER runs the relay under a tool, e.g. valgrind's massif.
        let wrapper = std::env::var("OVERLAN_BENCH_RELAY_WRAPPER").unwrap_or_default();
        let mut words: Vec<String> = wrapper.split_whitespace().map(str::to_owned).collect();
        words.push(server.display().to_string());
        let mut child = tokio::process::Command::new(&words[0])
            .args(&words[1..])
            .args(["--listen", "127.0.0.1:0", "--log", "warn", "--idle-timeout", "30s"])
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

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
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
/// (rathole, TLS transport, ECDSA P-256 certificate): bench → rathole server → TLS →
/// rathole client → a TCP sink in this process.
async fn rathole_throughput(rathole: &std::path::Path, total: u64) -> anyhow::Result<Throughput> {
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
    std::fs::write(
        d.join("server.toml"),
        format!(
            "[server]\nbind_addr = \"127.0.0.1:{control}\"\n[server.transport]\ntype = \"tls\"\n\
             [server.transport.tls]\npkcs12 = \"identity.pfx\"\npkcs12_password = \"bench\"\n\
             [server.services.bench]\ntoken = \"bench\"\nbind_addr = \"127.0.0.1:{public}\"\n"
        ),
    )?;
    std::fs::write(
        d.join("client.toml"),
        format!(
            "[client]\nremote_addr = \"localhost:{control}\"\n[client.transport]\ntype = \"tls\"\n\
             [client.transport.tls]\ntrusted_root = \"cert.pem\"\nhostname = \"localhost\"\n\
             [client.services.bench]\ntoken = \"bench\"\nlocal_addr = \"{}\"\n",
            sink.local_addr()?
        ),
    )?;
    let spawn = |mode: &str, config: &str| {
        tokio::process::Command::new(rathole)
            .arg(mode)
            .arg(config)
            .current_dir(d)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
    };
    let _server = spawn("--server", "server.toml")?;
    let _client = spawn("--client", "client.toml")?;
    // The public port answers once the client has registered the service.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (out, inn) = loop {
        if let Ok(out) = tokio::net::TcpStream::connect(("127.0.0.1", public)).await {
            if let Ok(Ok((inn, _))) = tokio::time::timeout(Duration::from_secs(2), sink.accept()).await {
                break (out, inn);
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "rathole tunnel did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    out.set_nodelay(true)?;
    inn.set_nodelay(true)?;
    let (_r, w) = out.into_split();
    let (r, _w) = inn.into_split();
    throughput(w, r, total).await
}

/// A direct quinn server and client on loopback, the baseline.
async fn direct_pair() -> anyhow::Result<(quinn::Connection, quinn::Connection)> {
    let id = Identity::generate(&[RELAY_SERVER_NAME])?;
    let server_crypto = tls::server_config(&id, ALPN_CLIENT)?;
    let server_config =
        quinn::ServerConfig::with_crypto(Arc::new(quinn::crypto::rustls::QuicServerConfig::try_from(server_crypto)?));
    // quinn's default transport settings: the baseline is plain quinn, as shipped.
    let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse()?)?;
    let client_crypto = tls::client_config(Some(&Identity::generate(&["c"])?), id.fingerprint(), ALPN_CLIENT)?;
    let client_config =
        quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(client_crypto)?));
    let client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let addr = server.local_addr()?;
    let accept = tokio::spawn(async move { server.accept().await.expect("incoming").await });
    let c = client.connect_with(client_config, addr, RELAY_SERVER_NAME)?.await?;
    let s = accept.await??;
    Ok((c, s))
}

/// Opens a bi stream on `c` and accepts it on `s` (a first byte makes it visible).
async fn direct_stream(
    c: &quinn::Connection,
    s: &quinn::Connection,
) -> anyhow::Result<(
    tokio::io::Join<quinn::RecvStream, quinn::SendStream>,
    tokio::io::Join<quinn::RecvStream, quinn::SendStream>,
)> {
    let (mut cs, cr) = c.open_bi().await?;
    cs.write_all(&[0]).await?;
    let (ss, mut sr) = s.accept_bi().await?;
    let mut one = [0u8; 1];
    sr.read_exact(&mut one).await?;
    Ok((tokio::io::join(cr, cs), tokio::io::join(sr, ss)))
}

async fn join(invite: &Invite, identity: &Identity, instance: &str) -> anyhow::Result<Client> {
    Ok(Client::join(JoinOptions::new(invite.clone(), identity.clone()).instance(instance)).await?)
}

/// A minimal idle session on a shared endpoint: handshake, hello, welcome, optional bind.
async fn raw_session(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    relay: SocketAddr,
    token: &str,
    instance: String,
    bind: Option<u16>,
) -> anyhow::Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream)> {
    let conn = endpoint.connect_with(config.clone(), relay, RELAY_SERVER_NAME)?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let codec = ClientSideCodec::new(DEFAULT_MAX_CONTROL_FRAME);
    let mut buf = bytes::BytesMut::new();
    codec.encode_into(
        &ClientMessage::Hello {
            protocol: PROTOCOL_VERSION,
            token: overlan_shared::config::Secret::new(token),
            instance,
        },
        &mut buf,
    )?;
    if let Some(port) = bind {
        codec.encode_into(&ClientMessage::Bind { req: 1, port }, &mut buf)?;
    }
    send.write_all(&buf).await?;
    let expected = if bind.is_some() { 2 } else { 1 };
    let mut inbuf = bytes::BytesMut::new();
    let mut got = 0;
    while got < expected {
        let mut tmp = [0u8; 1024];
        let n = recv.read(&mut tmp).await?.context("relay closed the control stream")?;
        inbuf.extend_from_slice(&tmp[..n]);
        while let Some(msg) = codec.decode_from(&mut inbuf)? {
            match msg {
                RelayMessage::Welcome { .. } | RelayMessage::Bound { .. } => got += 1,
                other => bail!("unexpected {other:?}"),
            }
        }
    }
    Ok((conn, send, recv))
}

async fn open_sessions(
    relay: &RelayProcess,
    n: usize,
    bind: Option<u16>,
    per_socket: usize,
) -> anyhow::Result<Vec<(quinn::Connection, quinn::SendStream, quinn::RecvStream)>> {
    let identity = Identity::generate(&["bench"])?;
    let crypto = tls::client_config(Some(&identity), relay.invite.fingerprint, ALPN_CLIENT)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(crypto)?));
    config.transport_config(Arc::new(overlan_server::relay::transport_config(Duration::from_secs(30))?));
    // Members are separate machines in real life: one UDP socket per 20 sessions keeps
    // a burst to all of them from overflowing a single socket's receive buffer here.
    let endpoints = (0..n.div_ceil(per_socket))
        .map(|_| quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")))
        .collect::<Result<Vec<_>, _>>()?;
    let relay_addr: SocketAddr = relay.invite.relay.parse()?;
    let token = relay.invite.token.expose().to_owned();
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let endpoint = endpoints[i / per_socket].clone();
        let (config, token, sem) = (config.clone(), token.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.expect("semaphore");
            raw_session(&endpoint, &config, relay_addr, &token, format!("s{i}-{}", bind.unwrap_or(0)), bind).await
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    println!("# overlan-bench  (relay process vs direct quinn on loopback, same run)");
    if !args.only_idle {
        data_path(&args).await?;
    }

    idle_memory(&args).await
}

async fn data_path(args: &Args) -> anyhow::Result<()> {
    let relay = RelayProcess::start().await?;
    let me = Identity::generate(&["bench"])?;
    // Stream throughput: rounds alternate direct, relay (and rathole), so a noisy
    // neighbour hits all of them alike; the median of the rounds is the figure.
    let (dc, ds) = direct_pair().await?;
    let a = join(&relay.invite, &me, "a").await?;
    let b = join(&relay.invite, &me, "b").await?;
    let listener = b.listen(9000).await?;
    let gib = args.bytes as f64 / (1u64 << 30) as f64;
    println!("stream throughput, {gib:.2} GiB one way per round, checksummed, {} rounds:", args.rounds);
    let (mut directs, mut relayeds, mut ratholes) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        let (c, s) = direct_stream(&dc, &ds).await?;
        let (_cr, cw) = c.into_inner();
        let (sr, _sw) = s.into_inner();
        let direct = throughput(cw, sr, args.bytes).await?;
        let out = a.connect(listener.local_addr()).await?;
        let (inn, _) = listener.accept().await?;
        let (_or, ow) = out.into_split();
        let (ir, _iw) = inn.into_split();
        let relayed = throughput(ow, ir, args.bytes).await?;
        print!("  round {round}: direct {:.1} MiB/s, relay {:.1} MiB/s", direct.mib_s, relayed.mib_s);
        if !direct.intact || !relayed.intact {
            bail!("bytes lost or changed (direct intact={}, relay intact={})", direct.intact, relayed.intact);
        }
        directs.push(direct.mib_s);
        relayeds.push(relayed.mib_s);
        if let Some(rathole) = &args.rathole {
            let forwarded = rathole_throughput(rathole, args.bytes).await?;
            print!(", rathole {:.1} MiB/s", forwarded.mib_s);
            anyhow::ensure!(forwarded.intact, "rathole lost or changed bytes");
            ratholes.push(forwarded.mib_s);
        }
        println!("  (all intact)");
    }
    let (direct, relayed) = (median(&mut directs), median(&mut relayeds));
    println!("  direct quinn   {direct:>9.1} MiB/s (median)");
    println!("  via relay      {relayed:>9.1} MiB/s (median)");
    println!("  ratio relay/direct  {:.2}  (target >= 0.50)", relayed / direct);
    if !ratholes.is_empty() {
        let forwarded = median(&mut ratholes);
        println!("  rathole (TLS transport), TCP A -> server -> client -> B  {forwarded:>9.1} MiB/s (median)");
        println!("  ratio relay/rathole  {:.2}  (stretch target >= 1.00)", relayed / forwarded);
    }

    // 64-byte request/response round trip.
    let (c, s) = direct_stream(&dc, &ds).await?;
    tokio::spawn(echo(s));
    let mut c = c;
    let (d50, d99) = rtt(&mut c, args.rtt_iters).await?;
    let l = b.listen(9001).await?;
    let mut out = a.connect(l.local_addr()).await?;
    let (inn, _) = l.accept().await?;
    tokio::spawn(echo(inn));
    let (r50, r99) = rtt(&mut out, args.rtt_iters).await?;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("64-byte round trip, {} iterations:", args.rtt_iters);
    println!("  direct quinn   p50 {:>7.1} us  p99 {:>7.1} us", us(d50), us(d99));
    println!("  via relay      p50 {:>7.1} us  p99 {:>7.1} us", us(r50), us(r99));
    println!(
        "  relay p50 budget 2 x direct + 50 us = {:.1} us: {}",
        2.0 * us(d50) + 50.0,
        if us(r50) <= 2.0 * us(d50) + 50.0 { "met" } else { "MISSED" }
    );

    // Datagrams per second through the relay.
    let sa = a.bind_datagram(0).await?;
    let sb = b.bind_datagram(7000).await?;
    let target = sb.local_addr();
    let payload = vec![1u8; 64];
    let stop = Instant::now() + Duration::from_secs(args.datagram_secs);
    let receiver = tokio::spawn(async move {
        let mut n = 0u64;
        while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), sb.recv()).await {
            n += 1;
        }
        n
    });
    let mut sent = 0u64;
    let t0 = Instant::now();
    while Instant::now() < stop {
        for _ in 0..64 {
            sa.send_to(&payload, target).await?;
            sent += 1;
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let received = receiver.await?;
    println!("datagrams (64-byte payload) through the relay for {}s:", args.datagram_secs);
    println!(
        "  sent {:.0}/s, delivered {:.0}/s ({:.1}% delivered)",
        sent as f64 / elapsed,
        received as f64 / elapsed,
        100.0 * received as f64 / sent.max(1) as f64
    );

    // Broadcast fan-out.
    let members = open_sessions(&relay, args.broadcast_members, Some(4445), SESSIONS_PER_SOCKET).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (conn, _, _) in &members {
        let (conn, tx) = (conn.clone(), tx.clone());
        tokio::spawn(async move {
            if conn.read_datagram().await.is_ok() {
                let _ = tx.send(Instant::now());
            }
        });
    }
    let caster = a.bind_datagram(4445).await?;
    let t0 = Instant::now();
    caster.send_to(b"lobby", SocketAddrV4::new(Ipv4Addr::BROADCAST, 4445)).await?;
    let mut last = t0;
    for _ in 0..members.len() {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(t)) => last = last.max(t),
            _ => bail!("a broadcast copy did not arrive"),
        }
    }
    println!("broadcast to {} members: all copies in {:.2} ms", members.len(), (last - t0).as_secs_f64() * 1e3);
    drop(members);

    a.leave().await;
    b.leave().await;
    Ok(())
}

/// Relay memory per idle session, each count on a fresh relay process.
async fn idle_memory(args: &Args) -> anyhow::Result<()> {
    for &n in &args.idle_sessions {
        let relay = RelayProcess::start().await?;
        // One session first, so start-up allocations (database, runtime) are not counted.
        let warm = open_sessions(&relay, 1, None, 1).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = relay.rss_kib()?;
        let own_before = rss_kib("self")?;
        let sessions = open_sessions(&relay, n, None, usize::MAX).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = relay.rss_kib()?;
        let own_after = rss_kib("self")?;
        let per = (after.saturating_sub(before)) as f64 / n as f64;
        let own = (own_after.saturating_sub(own_before)) as f64 / n as f64;
        println!(
            "relay RSS with {n} idle sessions: {before} KiB -> {after} KiB, {per:.1} KiB per session (target <= 32)"
        );
        println!("  baseline, same run: this process's side of the same connections (plain quinn client, one socket): {own:.1} KiB per connection");
        drop(sessions);
        drop(warm);
        relay.stop().await;
    }
    Ok(())
}
