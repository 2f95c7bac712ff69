//! The physics of an end-to-end sealed data path, measured: two QUIC endpoints of this
//! process talk to each other through a UDP forwarder process on the relay host that
//! passes packets on without decrypting them (as a TURN-style relay would, with a
//! lookup and no cryptography), beside the relay, which decrypts and re-seals every
//! byte. The forwarder is as lean as a relay of that design could be: it receives with
//! GRO and recvmmsg and sends each batch back out with GSO, on one thread. What it lacks (authentication of who sends, rate limits, routing by VIP) is
//! per-packet bookkeeping, not per-byte work.

use std::io::{IoSliceMut, Write};
use std::net::SocketAddr;

use anyhow::Context as _;
use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::{AsyncBufReadExt, Interest};

use crate::net::net;

/// Receive slots per batch; each holds one GRO batch of up to 64 KiB.
const SLOTS: usize = 16;
const SLOT_LEN: usize = 65_536;

/// The forwarder's process body (`overlan-bench --udp-forwarder BIND TARGET`): binds
/// BIND, prints `forwarding ADDR`, then passes every packet from TARGET to the last
/// other address heard from, and every packet from anyone else to TARGET. Runs until
/// killed.
pub(crate) fn serve(bind: SocketAddr, target: SocketAddr) -> anyhow::Result<()> {
    let socket = std::net::UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
    // A client's buffers, so bursts are not dropped at the forwarder.
    overlan_shared::udp::enlarge_buffers(&socket)?;
    let state = UdpSocketState::new((&socket).into())?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "forwarding {}", socket.local_addr()?)?;
        out.flush()?;
    }
    // One thread: the socket's readiness from tokio's reactor, the work in this loop.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    runtime.block_on(async {
        let socket = tokio::net::UdpSocket::from_std(socket)?;
        let mut slots = vec![vec![0u8; SLOT_LEN]; SLOTS];
        let mut meta = [RecvMeta::default(); SLOTS];
        let mut other: Option<SocketAddr> = None;
        loop {
            let n = socket
                .async_io(Interest::READABLE, || {
                    let mut bufs: Vec<IoSliceMut<'_>> = slots.iter_mut().map(|s| IoSliceMut::new(s)).collect();
                    state.recv((&socket).into(), &mut bufs, &mut meta)
                })
                .await?;
            for (m, slot) in meta.iter().zip(&slots).take(n) {
                let destination = if m.addr == target {
                    match other {
                        Some(addr) => addr,
                        None => continue,
                    }
                } else {
                    other = Some(m.addr);
                    target
                };
                let transmit = Transmit {
                    destination,
                    ecn: m.ecn,
                    contents: &slot[..m.len],
                    segment_size: (m.len > m.stride).then_some(m.stride),
                    src_ip: None,
                };
                // Waits while the socket is full; other errors lose the packet, as any
                // UDP hop may: QUIC at the ends recovers it.
                let _ = socket.async_io(Interest::WRITABLE, || state.send((&socket).into(), &transmit)).await;
            }
        }
    })
}

/// A forwarder process on the relay host, passing packets to `target`; killed on drop.
pub(crate) struct Forwarder {
    child: tokio::process::Child,
    /// Where to send packets meant for `target`.
    pub(crate) addr: SocketAddr,
}

impl Forwarder {
    pub(crate) async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut child = net()
            .relay_host_command(&exe)
            .arg("--udp-forwarder")
            .arg(SocketAddr::from((net().relay_ip, 0)).to_string())
            .arg(target.to_string())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let line = tokio::time::timeout(std::time::Duration::from_secs(10), lines.next_line())
            .await
            .context("the UDP forwarder did not start within 10 s")??
            .context("the UDP forwarder exited before it started")?;
        let addr = line.strip_prefix("forwarding ").context("the UDP forwarder said something else")?.parse()?;
        Ok(Self { child, addr })
    }

    /// CPU seconds (user + system) the forwarder has used so far.
    pub(crate) fn cpu_secs(&self) -> anyhow::Result<f64> {
        cpu_secs(self.child.id().context("the UDP forwarder exited")?)
    }
}

/// CPU seconds (user + system) process `pid` has used so far.
pub(crate) fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from the state on: utime
    // and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').context("malformed /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / clock_ticks())
}

/// Clock ticks per second, the unit of /proc's CPU times (`getconf CLK_TCK`; 100 on
/// Linux where that cannot be asked).
fn clock_ticks() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&hz: &f64| hz > 0.0)
            .unwrap_or(100.0)
    })
}
