//! The cluster part of the bench: three relay node processes on loopback, linked in a
//! triangle (n2 dials n1, n3 dials n1 and n2). Measured in one run: stream throughput
//! and 64-byte round trips client → n1 → n2 → client beside the one-node path
//! client → n1 → client; route convergence (a client joins n1 → reachable from a
//! client of n3); failover (n1 killed → its client, which also names n3, reachable
//! again from a client of n2); and a broadcast to members spread over the three nodes.

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use overlan_client::{Client, Error, Identity, JoinOptions};
use overlan_shared::Invite;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{
    broadcast_to, echo, median, open_sessions, rtt, throughput, Args, BENCH_RELAY_LIMITS, DATA_PATH_IDLE,
    SESSIONS_PER_SOCKET,
};

/// One node process; restartable on the same port and data directory.
struct Node {
    name: &'static str,
    port: u16,
    peers: Vec<u16>,
    data: PathBuf,
    child: Option<tokio::process::Child>,
    invite: Option<Invite>,
}

fn udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Node {
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn invite(&self) -> &Invite {
        self.invite.as_ref().expect("node started")
    }

    async fn start(&mut self, cluster: &Path, config: &Path) -> anyhow::Result<()> {
        let server = std::env::current_exe()?.with_file_name("overlan-server");
        if !server.exists() {
            bail!("{} not found: run `cargo build --release --bins` first", server.display());
        }
        let mut cmd = tokio::process::Command::new(server);
        cmd.args(["--listen", &self.addr(), "--log", "warn", "--node", self.name, "--idle-timeout"])
            .arg(overlan_shared::config::format_duration(DATA_PATH_IDLE))
            .arg("--config")
            .arg(config)
            .arg("--cluster")
            .arg(cluster)
            .arg("--data-dir")
            .arg(&self.data);
        for peer in &self.peers {
            cmd.args(["--peer", &format!("127.0.0.1:{peer}")]);
        }
        let mut child = cmd.stdout(std::process::Stdio::piped()).kill_on_drop(true).spawn()?;
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        while let Some(line) = lines.next_line().await? {
            if let Some(uri) = line.strip_prefix("invite ") {
                self.invite = Some(uri.parse()?);
                break;
            }
        }
        anyhow::ensure!(self.invite.is_some(), "node {} printed no invite", self.name);
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL: the node vanishes without a word to anyone.
    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
}

async fn join(invite: &Invite, relays: &[String], name: &str) -> anyhow::Result<Client> {
    let identity = Identity::generate(&["bench"])?;
    let options = JoinOptions::new(invite.clone(), identity).instance(name).relays(relays.to_vec());
    Ok(Client::join(options).await?)
}

/// Connects until the target answers (routes converge, a failed-over listener comes
/// back); `Unreachable` and `Refused` are retried at once, for at most `within`.
async fn connect_when_reachable(
    client: &Client,
    to: SocketAddrV4,
    within: Duration,
) -> anyhow::Result<overlan_client::VirtualStream> {
    let deadline = Instant::now() + within;
    loop {
        match client.connect(to).await {
            Ok(s) => return Ok(s),
            Err(Error::Unreachable { .. } | Error::Refused { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_micros(200)).await
            }
            Err(e) => return Err(e).with_context(|| format!("connect {to}")),
        }
    }
}

pub(crate) async fn run(args: &Args) -> anyhow::Result<()> {
    println!("# cluster: three relay node processes on loopback, n2 -> n1, n3 -> n1 and n2 (a triangle)");
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("cluster");
    let creds = overlan_shared::cluster::ClusterDir::new(&ca);
    creds.init()?;
    let config = dir.path().join("bench-relay.toml");
    std::fs::write(&config, BENCH_RELAY_LIMITS)?;
    let ports = [udp_port()?, udp_port()?, udp_port()?];
    let mut nodes = Vec::new();
    for (i, (name, peers)) in
        [("n1", vec![]), ("n2", vec![ports[0]]), ("n3", vec![ports[0], ports[1]])].into_iter().enumerate()
    {
        creds.issue(name)?;
        let data = dir.path().join(name);
        let mut node = Node { name, port: ports[i], peers, data, child: None, invite: None };
        node.start(&ca, &config).await?;
        nodes.push(node);
    }
    let addrs: Vec<String> = nodes.iter().map(Node::addr).collect();
    let relays = |i: usize| vec![addrs[i].clone()];
    let a = join(nodes[0].invite(), &relays(0), "a").await?;
    let same = join(nodes[0].invite(), &relays(0), "same-node").await?;
    let b = join(nodes[1].invite(), &relays(1), "b").await?;
    let l_same = same.listen(9000).await?;
    let l_b = b.listen(9000).await?;
    // The links are up once a stream crosses them.
    drop(connect_when_reachable(&a, l_b.local_addr(), Duration::from_secs(20)).await?);
    drop(l_b.accept().await?);

    // Throughput: rounds alternate the one-node and the two-node path.
    println!("stream throughput, {} MiB one way per round, checksummed, {} rounds:", args.bytes >> 20, args.rounds);
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        let mut figures = Vec::new();
        for (listener, out) in [(&l_same, &mut one), (&l_b, &mut two)] {
            let s = a.connect(listener.local_addr()).await?;
            let (inn, _) = listener.accept().await?;
            let (_sr, sw) = s.into_split();
            let (ir, _iw) = inn.into_split();
            let measured = throughput(sw, ir, args.bytes).await?;
            anyhow::ensure!(measured.intact, "bytes lost or changed in the cluster");
            figures.push(measured.mib_s);
            out.push(measured.mib_s);
        }
        println!("  round {round}: one node {:.1} MiB/s, two nodes {:.1} MiB/s  (all intact)", figures[0], figures[1]);
    }
    let ratios: Vec<f64> = two.iter().zip(&one).map(|(t, o)| t / o).collect();
    let ratio = median(&ratios);
    println!("  {:<34} {:>9.1} MiB/s (median)", "client -> n1 -> client", median(&one));
    println!("  {:<34} {:>9.1} MiB/s (median)", "client -> n1 -> n2 -> client", median(&two));
    println!(
        "  target two nodes >= 0.70 x one node, median ratio {ratio:.2}: {}",
        if ratio >= 0.70 { "met" } else { "not met" }
    );

    // Round trips.
    println!("64-byte round trip, {} iterations:", args.rtt_iters);
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    for (label, listener) in [("client -> n1 -> client", &l_same), ("client -> n1 -> n2 -> client", &l_b)] {
        let mut s = a.connect(listener.local_addr()).await?;
        let (inn, _) = listener.accept().await?;
        tokio::spawn(echo(inn));
        let (p50, p99) = rtt(&mut s, args.rtt_iters).await?;
        println!("  {label:<34} p50 {:>7.1} us  p99 {:>7.1} us", us(p50), us(p99));
    }

    // Convergence: a client joins n1; how long until a client of n3 reaches it.
    let d = join(nodes[2].invite(), &relays(2), "d").await?;
    println!("route convergence (a client joins n1 -> a client of n3 reaches it), 5 samples:");
    let mut samples = Vec::new();
    for i in 0..5 {
        let fresh = join(nodes[0].invite(), &relays(0), &format!("conv{i}")).await?;
        let joined = Instant::now();
        let l = fresh.listen(9100).await?;
        let s = connect_when_reachable(&d, l.local_addr(), Duration::from_secs(10)).await?;
        let ms = joined.elapsed().as_secs_f64() * 1e3;
        println!("  sample {}: {ms:.2} ms", i + 1);
        samples.push(ms);
        drop(s);
        fresh.close();
    }
    let conv = median(&samples);
    println!(
        "  median {conv:.2} ms; target <= 100 ms: {}  (includes the listen request and a refused-then-retried connect)",
        if conv <= 100.0 { "met" } else { "not met" }
    );

    // Broadcast to members spread over the three nodes.
    let per_node = args.broadcast_members / 3;
    let mut members = Vec::new();
    for node in &nodes {
        members.extend(open_sessions(node.invite(), per_node, SESSIONS_PER_SOCKET, DATA_PATH_IDLE).await?);
    }
    println!(
        "broadcast from a client of n1 to {} members, {per_node} on each node, {} samples:",
        members.len(),
        args.broadcast_samples
    );
    broadcast_to(&members, &a, args.broadcast_samples).await?;
    drop(members);

    // Failover: a client of n1 that also names n3; n1 is killed.
    println!("failover (n1 killed -> its client, which names n1 then n3, reachable again from a client of n2):");
    let mut samples = Vec::new();
    for i in 0..args.failover_samples {
        let both = vec![addrs[0].clone(), addrs[2].clone()];
        let x = join(nodes[0].invite(), &both, &format!("x{i}")).await?;
        let l = x.listen(9200).await?;
        drop(connect_when_reachable(&b, l.local_addr(), Duration::from_secs(10)).await?);
        drop(l.accept().await?);
        nodes[0].kill().await;
        let killed = Instant::now();
        let s = connect_when_reachable(&b, l.local_addr(), Duration::from_secs(30)).await;
        let secs = killed.elapsed().as_secs_f64();
        match s {
            Ok(_) => {
                println!("  sample {}: {secs:.2} s (client on {})", i + 1, x.relay_addr());
                samples.push(secs);
            }
            Err(e) => println!("  sample {}: not reachable within 30 s: {e:#}", i + 1),
        }
        x.close();
        nodes[0].start(&ca, &config).await?;
        // n1 is back; wait until its links are (a stream from n1 to n2 crosses).
        let probe = join(nodes[0].invite(), &relays(0), &format!("probe{i}")).await?;
        drop(connect_when_reachable(&probe, l_b.local_addr(), Duration::from_secs(30)).await?);
        drop(l_b.accept().await?);
        probe.close();
    }
    if !samples.is_empty() {
        let m = median(&samples);
        println!("  median {m:.2} s; target <= 5 s: {}", if m <= 5.0 { "met" } else { "not met" });
    }
    for client in [&a, &same, &b, &d] {
        client.close();
    }
    for node in &mut nodes {
        node.kill().await;
    }
    Ok(())
}
