//! The physics of an end-to-end sealed data path, measured: two QUIC endpoints of this
//! process talk to each other through UDP forwarder processes on the relay host that
//! pass packets on without decrypting them, beside the relay, which decrypts and
//! re-seals every byte (docs/sealed-data-path.md). The forwarder routes as that design
//! would: by the packet's destination connection ID, which carries the destination's
//! slot ([`SlotCids`]), looked up per packet; it receives with GRO and recvmmsg and sends
//! each run of packets for one destination back out with GSO, on one thread. What it
//! lacks against a relay of that design (checking the sender's address and the pair
//! against the control plane, rate limits) is per-packet bookkeeping, not per-byte work.

use std::collections::HashMap;
use std::io::{IoSliceMut, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{ConnectionId, ConnectionIdGenerator};
use tokio::io::{AsyncBufReadExt, Interest};

use crate::net::net;

/// Receive slots per batch; each holds one GRO batch of up to 64 KiB.
const SLOTS: usize = 16;
const SLOT_LEN: usize = 65_536;

/// First byte of a connection ID that carries a slot.
const MARKER: u8 = 0xa5;
/// Connection ID length: the marker, the 4-byte slot, 3 bytes that tell the IDs of one
/// endpoint apart.
const CID_LEN: usize = 8;

/// Connection IDs for the endpoint holding `slot`: `[MARKER][slot][3 bytes]`, so that a
/// forwarder routes every packet addressed to this endpoint by its ID alone.
pub(crate) struct SlotCids {
    slot: u32,
}

impl SlotCids {
    pub(crate) fn new(slot: u32) -> Self {
        Self { slot }
    }
}

/// A connection ID for the endpoint holding `slot`.
pub(crate) fn slot_cid(slot: u32) -> ConnectionId {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    // Distinct per ID issued by this process; quinn draws again on a clash anyway.
    let n = NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut id = [0u8; CID_LEN];
    id[0] = MARKER;
    id[1..5].copy_from_slice(&slot.to_be_bytes());
    id[5..].copy_from_slice(&n.to_be_bytes()[..3]);
    ConnectionId::new(&id)
}

impl ConnectionIdGenerator for SlotCids {
    fn generate_cid(&mut self) -> ConnectionId {
        slot_cid(self.slot)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

/// The slot a connection ID carries, if it is one of [`SlotCids`]'.
fn slot_of(cid: &[u8]) -> Option<u32> {
    match cid {
        [MARKER, a, b, c, d, ..] if cid.len() == CID_LEN => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// The destination connection ID of a QUIC packet, and for a long-header packet its
/// source connection ID too.
fn cids(packet: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
    let first = *packet.first()?;
    if first & 0x80 == 0 {
        // Short header: the destination ID follows the first byte; its length is ours.
        return Some((packet.get(1..1 + CID_LEN)?, None));
    }
    // Long header: first byte, 4-byte version, then length-prefixed DCID and SCID.
    let dcid_len = usize::from(*packet.get(5)?);
    let dcid = packet.get(6..6 + dcid_len)?;
    let scid_len = usize::from(*packet.get(6 + dcid_len)?);
    let scid = packet.get(7 + dcid_len..7 + dcid_len + scid_len)?;
    Some((dcid, Some(scid)))
}

/// The forwarder's process body (`overlan-bench --udp-forwarder BIND DEFAULT`): binds
/// BIND, prints `forwarding ADDR`, then passes each packet to the address of the slot
/// in its destination connection ID. Slots are learnt from the source connection IDs of
/// long-header packets (a relay of this design would know them from its sessions); a
/// packet for a slot not yet seen goes to DEFAULT. Runs until killed.
pub(crate) fn serve(bind: SocketAddr, default: SocketAddr) -> anyhow::Result<()> {
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
        let mut routes: HashMap<u32, SocketAddr> = HashMap::new();
        loop {
            let n = socket
                .async_io(Interest::READABLE, || {
                    let mut bufs: Vec<IoSliceMut<'_>> = slots.iter_mut().map(|s| IoSliceMut::new(s)).collect();
                    state.recv((&socket).into(), &mut bufs, &mut meta)
                })
                .await?;
            for (m, buf) in meta.iter().zip(&slots).take(n) {
                let batch = &buf[..m.len];
                let route = |packet: &[u8]| {
                    let (dcid, scid) = cids(packet)?;
                    if let Some(slot) = scid.and_then(slot_of) {
                        routes.insert(slot, m.addr);
                    }
                    let to = slot_of(dcid).and_then(|slot| routes.get(&slot).copied()).unwrap_or(default);
                    // Never back where it came from.
                    (to != m.addr).then_some(to)
                };
                for (range, to) in runs(batch, m.stride, route) {
                    send(&socket, &state, to, m, &batch[range], m.stride).await;
                }
            }
        }
    })
}

/// Splits a received batch (packets of `stride` bytes, the last maybe shorter) into runs
/// of consecutive packets that `route` sends to the same address; packets it has no
/// address for are left out. A GRO batch holds packets of one sender, not necessarily
/// for one destination.
fn runs(
    batch: &[u8],
    stride: usize,
    mut route: impl FnMut(&[u8]) -> Option<SocketAddr>,
) -> Vec<(std::ops::Range<usize>, SocketAddr)> {
    let stride = stride.max(1);
    let mut out: Vec<(std::ops::Range<usize>, SocketAddr)> = Vec::new();
    for (i, packet) in batch.chunks(stride).enumerate() {
        let Some(to) = route(packet) else { continue };
        let at = i * stride;
        match out.last_mut() {
            Some((range, last)) if *last == to && range.end == at => range.end = at + packet.len(),
            _ => out.push((at..at + packet.len(), to)),
        }
    }
    out
}

/// Sends `packets` (segments of `stride` bytes, the last maybe shorter) to `to`, in one
/// segmented send.
async fn send(
    socket: &tokio::net::UdpSocket,
    state: &UdpSocketState,
    to: SocketAddr,
    m: &RecvMeta,
    packets: &[u8],
    stride: usize,
) {
    let stride = stride.max(1);
    let transmit = Transmit {
        destination: to,
        ecn: m.ecn,
        contents: packets,
        segment_size: (packets.len() > stride).then_some(stride),
        src_ip: None,
    };
    // Waits while the socket is full; other errors lose the packets, as any UDP hop may:
    // QUIC at the ends recovers them.
    let _ = socket.async_io(Interest::WRITABLE, || state.send(socket.into(), &transmit)).await;
}

/// A forwarder process on the relay host whose default route is `target`; killed on
/// drop.
pub(crate) struct Forwarder {
    child: tokio::process::Child,
    /// Where the ends send their packets (the first forwarder of the line).
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
    let field = |i: usize| -> anyhow::Result<f64> { Ok(fields.get(i).context("short /proc stat")?.parse()?) };
    let ticks = field(11)? + field(12)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A long-header packet from `scid` to `dcid`, `len` bytes in all.
    fn long(dcid: &[u8], scid: &[u8], len: usize) -> Vec<u8> {
        let mut p = vec![0xc0, 0, 0, 0, 1, dcid.len() as u8];
        p.extend_from_slice(dcid);
        p.push(scid.len() as u8);
        p.extend_from_slice(scid);
        p.resize(len, 0);
        p
    }

    fn short(dcid: &[u8], len: usize) -> Vec<u8> {
        let mut p = vec![0x40];
        p.extend_from_slice(dcid);
        p.resize(len, 0);
        p
    }

    #[test]
    fn connection_ids_carry_slots_and_are_found_in_both_header_forms() {
        let (a, b) = (slot_cid(7), slot_cid(9));
        assert_eq!((slot_of(&a), slot_of(&b)), (Some(7), Some(9)));
        assert_ne!(slot_cid(7), slot_cid(7), "each ID of one slot differs");
        assert_eq!(slot_of(&[1, 2, 3, 4, 5, 6, 7, 8]), None, "a random ID carries no slot");
        assert_eq!(cids(&long(&a, &b, 1200)), Some((&a[..], Some(&b[..]))));
        assert_eq!(cids(&short(&b, 100)), Some((&b[..], None)));
        // Cut short: nothing, rather than a panic.
        assert_eq!(cids(&long(&a, &b, 1200)[..10]), None);
        assert_eq!(cids(&short(&b, 100)[..4]), None);
        assert_eq!(cids(&[]), None);
    }

    #[test]
    fn a_batch_splits_into_runs_per_destination_and_keeps_a_short_last_packet() {
        let (x, y): (SocketAddr, SocketAddr) = ("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
        // Five packets of 10 bytes and a last one of 4, for x, x, y, nowhere, y, y.
        let batch: Vec<u8> =
            [0u8, 0, 1, 2, 1, 1].iter().enumerate().flat_map(|(i, &d)| vec![d; if i == 5 { 4 } else { 10 }]).collect();
        let to = |p: &[u8]| match p[0] {
            0 => Some(x),
            1 => Some(y),
            _ => None,
        };
        assert_eq!(runs(&batch, 10, to), vec![(0..20, x), (20..30, y), (40..54, y)]);
        // One packet, no GRO: the stride is its length.
        assert_eq!(runs(&batch[..7], 7, to), vec![(0..7, x)]);
    }
}
