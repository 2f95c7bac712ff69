//! Port forwarding for programs that know nothing of overlan, like `ssh -L` and `ssh -R`:
//! a local TCP or UDP port that leads to a VIP's port ([`forward_tcp`], [`forward_udp`]),
//! and a port of this client's VIP that leads to a local service ([`expose_tcp`],
//! [`expose_udp`]). Each runs until its future is dropped; `overlan forward`/`expose`
//! and `overlan up` (for the forwards in its config file) drive them.
//!
//! Streams carry half-closes through (a TCP `shutdown(SHUT_WR)` becomes the end of the
//! virtual stream and back), and a failure on either side aborts the other: the local
//! side gets a reset, the virtual peer an error — never a clean end that would pass for
//! a complete transfer. UDP keeps one flow per source (a NAT-like table): each local
//! source gets a virtual datagram port of its own (forward), each virtual source a local
//! socket of its own (expose), so replies find their way back; idle flows expire.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{Client, DatagramSocket, Error, Listener, VirtualStream};

/// A forward or an expose, as `overlan forward`/`expose` and the config file give it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PortMap {
    /// A local port that leads to `target` (`VIP:PORT`, or `NAME:PORT` for a member's
    /// instance name).
    Forward {
        /// Local address to listen on.
        local: SocketAddr,
        /// Where it leads.
        target: String,
        /// UDP instead of TCP.
        #[serde(default)]
        udp: bool,
        /// Seconds a UDP flow lives without traffic.
        #[serde(default = "default_idle_secs")]
        idle_secs: u64,
    },
    /// This client's `port` leads to the local service at `target`.
    Expose {
        /// The port of this client's VIP.
        port: u16,
        /// The local service.
        target: SocketAddr,
        /// UDP instead of TCP.
        #[serde(default)]
        udp: bool,
        /// Seconds a UDP flow lives without traffic.
        #[serde(default = "default_idle_secs")]
        idle_secs: u64,
    },
}

fn default_idle_secs() -> u64 {
    DEFAULT_UDP_IDLE.as_secs()
}

/// A forward or expose that has its ports: what it is, in one line (`forward
/// 127.0.0.1:8080 -> 10.77.0.3:80 tcp`), and the future that runs it (it ends when it
/// fails for good, saying why, or once stopped).
pub struct Started {
    /// The line that says what runs.
    pub line: String,
    /// Runs it.
    pub run: BoxFuture<'static, String>,
    /// Stops it: `run` resets the TCP connections it carries (the local program and the
    /// virtual peer see an error, not a clean end) and then ends. Dropping `run` instead
    /// leaves that to the runtime, which a process about to exit may never do.
    pub stop: CancellationToken,
}

impl Started {
    /// Stops it and waits (at most a second) until its connections are reset.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.run).await;
    }
}

/// A forward's local socket, bound before the forward starts (an expose has none).
pub enum LocalSocket {
    /// A TCP forward's listener.
    Tcp(TcpListener),
    /// A UDP forward's socket.
    Udp(UdpSocket),
    /// An expose.
    None,
}

impl PortMap {
    /// Binds a forward's local socket (a port in use is an error).
    pub async fn bind_local(&self) -> Result<LocalSocket, String> {
        match self {
            PortMap::Forward { local, udp: true, .. } => {
                UdpSocket::bind(local).await.map(LocalSocket::Udp).map_err(|e| format!("udp {local}: {e}"))
            }
            PortMap::Forward { local, .. } => {
                TcpListener::bind(local).await.map(LocalSocket::Tcp).map_err(|e| format!("tcp {local}: {e}"))
            }
            PortMap::Expose { .. } => Ok(LocalSocket::None),
        }
    }

    /// Takes the ports (binds the local socket or registers the virtual port) and returns
    /// what runs; a port in use or a target name no member holds is an error.
    pub async fn start(&self, client: &Client, log: Log) -> Result<Started, String> {
        let local = self.bind_local().await?;
        self.start_with(client, local, log).await
    }

    /// As [`PortMap::start`], with the local socket [`PortMap::bind_local`] bound.
    pub async fn start_with(&self, client: &Client, local: LocalSocket, log: Log) -> Result<Started, String> {
        let client = client.clone();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        match self {
            PortMap::Forward { target, idle_secs, .. } => {
                let target = resolve(&client, target).await?;
                let idle = Duration::from_secs((*idle_secs).max(1));
                if let LocalSocket::Udp(socket) = local {
                    let local = socket.local_addr().map_err(|e| e.to_string())?;
                    let run = forward_udp(client, socket, target, idle, log);
                    let run = until(stopped, run);
                    let run = run.map(move |r| format!("forward udp {local}: {}", ended(r.err()))).boxed();
                    Ok(Started { line: format!("forward {local} -> {target} udp"), run, stop })
                } else {
                    let LocalSocket::Tcp(listener) = local else {
                        return Err("a TCP forward needs its listener".into());
                    };
                    let local = listener.local_addr().map_err(|e| e.to_string())?;
                    let run = forward_tcp(client, listener, target, log, stopped);
                    let run = run.map(move |r| format!("forward tcp {local}: {}", ended(r.err()))).boxed();
                    Ok(Started { line: format!("forward {local} -> {target} tcp"), run, stop })
                }
            }
            PortMap::Expose { port, target, udp, idle_secs } => {
                let (target, idle) = (*target, Duration::from_secs((*idle_secs).max(1)));
                if *udp {
                    let socket = client.bind_datagram(*port).await.map_err(|e| on_port("udp", *port, e))?;
                    let exposed = socket.local_addr();
                    let run = until(stopped, expose_udp(socket, target, idle, log));
                    let run = run.map(move |r| format!("expose udp {exposed}: {}", ended(r.err()))).boxed();
                    Ok(Started { line: format!("expose {exposed} -> {target} udp"), run, stop })
                } else {
                    let listener = client.listen_with_approval(*port).await.map_err(|e| on_port("tcp", *port, e))?;
                    let exposed = listener.local_addr();
                    let run = expose_tcp(listener, target, log, stopped);
                    let run = run.map(move |r| format!("expose tcp {exposed}: {}", ended(r.err()))).boxed();
                    Ok(Started { line: format!("expose {exposed} -> {target} tcp"), run, stop })
                }
            }
        }
    }
}

/// `tcp port 80: why`, without saying the port twice (`port 80: address in use`).
fn on_port(kind: &str, port: u16, e: Error) -> String {
    let text = e.to_string();
    match text.strip_prefix(&format!("port {port}: ")) {
        Some(rest) => format!("{kind} port {port}: {rest}"),
        None => format!("{kind} port {port}: {text}"),
    }
}

fn ended(error: Option<impl std::fmt::Display>) -> String {
    error.map_or_else(|| "stopped".to_owned(), |e| e.to_string())
}

/// Runs `run` until `stop` is cancelled (UDP flows have no end to carry: they stop).
async fn until<E>(stop: CancellationToken, run: impl std::future::Future<Output = Result<(), E>>) -> Result<(), E> {
    tokio::select! {
        ended = run => ended,
        _ = stop.cancelled() => Ok(()),
    }
}

/// `VIP:PORT`, or `NAME:PORT` for the member of the network with that instance name.
async fn resolve(client: &Client, target: &str) -> Result<SocketAddrV4, String> {
    if let Ok(addr) = target.parse::<SocketAddrV4>() {
        if !client.subnet().contains(*addr.ip()) {
            return Err(format!("{} is not in network {} ({})", addr.ip(), client.network(), client.subnet()));
        }
        return Ok(addr);
    }
    let (name, port) = target.rsplit_once(':').ok_or_else(|| format!("{target:?}: expected VIP:PORT or NAME:PORT"))?;
    let port: u16 = port.parse().map_err(|_| format!("{target:?}: {port:?} is not a port"))?;
    let peers = client.peers().await.map_err(|e| format!("looking up {name:?}: {e}"))?;
    let named: Vec<Ipv4Addr> = {
        let all: Vec<_> = peers.iter().filter(|p| p.instance.as_deref() == Some(name)).collect();
        let online: Vec<_> = all.iter().filter(|p| p.online).map(|p| p.vip).collect();
        if online.is_empty() {
            all.iter().map(|p| p.vip).collect()
        } else {
            online
        }
    };
    match named.as_slice() {
        [vip] => Ok(SocketAddrV4::new(*vip, port)),
        [] => Err(format!("no member named {name:?} in network {}", client.network())),
        _ => Err(format!("{name:?} names several members; give the VIP")),
    }
}

/// Where a forward tells what went wrong with one connection or flow (the forward goes
/// on): `overlan` prints these lines on stderr.
pub type Log = Arc<dyn Fn(String) + Send + Sync>;

/// How long `expose` waits for its local service to take a connection before it denies
/// it (below the relay's wait for the answer, so the connecting side hears "denied").
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Datagrams of one UDP flow waiting for its port or for the overlay.
const FLOW_QUEUE: usize = 256;
/// How long a forward waits before accepting again after a failed accept.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// How long a UDP flow lives without traffic, unless told otherwise.
pub const DEFAULT_UDP_IDLE: Duration = Duration::from_secs(60);
/// Largest UDP payload read from a local socket (the overlay carries at most the
/// client's max payload; larger ones are dropped and said once per flow).
const UDP_BUFFER: usize = 65_536;

/// Local TCP connections accepted on `listener` lead to `target`, each over a virtual
/// stream of its own. A target that refuses or cannot be reached resets the local
/// connection at once, and `log` says why. A failed accept (out of file descriptors,
/// say) is logged and tried again a moment later. Ends when `stop` is cancelled,
/// resetting the connections it carries.
pub async fn forward_tcp(
    client: Client,
    listener: TcpListener,
    target: SocketAddrV4,
    log: Log,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let mut connections = JoinSet::new();
    loop {
        let (tcp, from) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    log(format!("accepting a connection: {e}; trying again"));
                    tokio::select! {
                        _ = tokio::time::sleep(ACCEPT_RETRY) => continue,
                        _ = stop.cancelled() => {}
                    }
                    connections.shutdown().await;
                    return Ok(());
                }
            },
            Some(_) = connections.join_next() => continue,
            _ = stop.cancelled() => {
                connections.shutdown().await;
                return Ok(());
            }
        };
        let (client, log) = (client.clone(), log.clone());
        connections.spawn(async move {
            let _ = tcp.set_nodelay(true);
            // Reset, not closed, if the forward stops while the connect is under way.
            let tcp = Unspliced(Some(tcp));
            match client.connect(target).await {
                Ok(stream) => {
                    if let Err(why) = splice(tcp.take(), stream).await {
                        log(format!("{from} → {target}: {why}"));
                    }
                }
                Err(e) => log(format!("connection from {from}: {e}")),
            }
        });
    }
}

/// Virtual connections to `listener` (made with [`Client::listen_with_approval`]) lead
/// to the local service at `target`, each over a TCP connection of its own. A
/// connection the service refuses is denied (the connecting side reads "denied by the
/// peer"), and so is one it does not answer within [`CONNECT_TIMEOUT`]; `log` says
/// why. Ends when the listener fails for good, or when `stop` is cancelled, resetting
/// the connections it carries.
pub async fn expose_tcp(
    listener: Listener,
    target: SocketAddr,
    log: Log,
    stop: CancellationToken,
) -> Result<(), Error> {
    let mut connections = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            incoming = listener.incoming() => incoming?,
            Some(_) = connections.join_next() => continue,
            _ = stop.cancelled() => {
                connections.shutdown().await;
                return Ok(());
            }
        };
        let log = log.clone();
        connections.spawn(async move {
            let from = incoming.peer_addr();
            let connected = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await;
            let connected = connected.unwrap_or_else(|_| {
                Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer within {CONNECT_TIMEOUT:?}")))
            });
            match connected {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    let tcp = Unspliced(Some(tcp));
                    match incoming.accept().await {
                        Ok(stream) => {
                            if let Err(why) = splice(tcp.take(), stream).await {
                                log(format!("{from} → {target}: {why}"));
                            }
                        }
                        Err(e) => log(format!("{from} → {target}: {e}")),
                    }
                }
                Err(e) => {
                    log(format!("{from} → {target}: {e}; denied"));
                    incoming.deny();
                }
            }
        });
    }
}

/// Carries `tcp` and `stream` both ways until both directions have ended, half-closes
/// included. The first failure aborts both sides, and so does dropping the future
/// before it ends (the forward stopped by a signal): a transfer cut short never looks
/// complete at either end.
async fn splice(tcp: TcpStream, stream: VirtualStream) -> Result<(), String> {
    let (tcp_read, tcp_write) = tcp.into_split();
    let (virtual_read, virtual_write) = stream.into_split();
    let mut spliced = Spliced {
        tcp_read,
        tcp_write: Some(tcp_write),
        virtual_read: Some(virtual_read),
        virtual_write: Some(virtual_write),
        done: false,
    };
    let result = {
        let Spliced { tcp_read, tcp_write, virtual_read, virtual_write, .. } = &mut spliced;
        let virtual_read = virtual_read.as_mut().expect("taken only on drop");
        let virtual_write = virtual_write.as_mut().expect("taken only on drop");
        let tcp_write = tcp_write.as_mut().expect("taken only on drop");
        // Errors of the overlay side say which connection they are; the kernel's do not.
        let outbound = async {
            tokio::io::copy(tcp_read, virtual_write).await.map_err(|e| e.to_string())?;
            virtual_write.shutdown().await.map_err(|e| e.to_string())
        };
        let inbound = async {
            tokio::io::copy(virtual_read, tcp_write).await.map_err(|e| e.to_string())?;
            tcp_write.shutdown().await.map_err(|e| format!("local side: {e}"))
        };
        tokio::try_join!(outbound, inbound)
    };
    spliced.done = result.is_ok();
    result.map(|_| ())
}

/// Both sides of a connection being spliced; dropped before both directions ended, it
/// aborts the virtual stream and resets the local connection.
struct Spliced {
    tcp_read: tokio::net::tcp::OwnedReadHalf,
    tcp_write: Option<tokio::net::tcp::OwnedWriteHalf>,
    virtual_read: Option<crate::VirtualReadHalf>,
    virtual_write: Option<crate::VirtualWriteHalf>,
    done: bool,
}

impl Drop for Spliced {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(write) = self.virtual_write.take() {
            write.abort();
        }
        if let Some(read) = self.virtual_read.take() {
            read.abort();
        }
        // The socket closes with the read half, right after this: with a reset, and no
        // FIN before it (a dropped write half would shut the write side down first).
        let _ = self.tcp_read.as_ref().set_zero_linger();
        if let Some(write) = self.tcp_write.take() {
            write.forget();
        }
    }
}

/// A local connection not spliced yet: reset when dropped (a failed connect, or the
/// forward stopped meanwhile), unless taken for the splice.
struct Unspliced(Option<TcpStream>);

impl Unspliced {
    fn take(mut self) -> TcpStream {
        self.0.take().expect("taken once")
    }
}

impl Drop for Unspliced {
    fn drop(&mut self) {
        if let Some(tcp) = self.0.take() {
            reset(tcp);
        }
    }
}

/// Closes `tcp` with a reset, so the local program sees a failure, not an end.
fn reset(tcp: TcpStream) {
    // A zero linger makes close() send RST at once; it never blocks.
    let _ = tcp.set_zero_linger();
}

/// One UDP flow: its socket toward the other side, and when it last carried anything.
struct Flow<S> {
    socket: Arc<S>,
    last: Arc<Mutex<Instant>>,
    task: tokio::task::JoinHandle<()>,
}

impl<S> Drop for Flow<S> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn touch(last: &Mutex<Instant>) {
    *last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
}

fn idle_for(last: &Mutex<Instant>) -> Duration {
    last.lock().unwrap_or_else(|e| e.into_inner()).elapsed()
}

/// Datagrams to the local UDP `socket` lead to `target`: each local source gets a
/// virtual datagram port of its own, and what comes back to that port goes to that
/// source. Flows idle for `idle` are forgotten (their ports released). A new flow's
/// port is bound by the flow's own task, so the local socket is read on meanwhile (a
/// burst of new sources does not overflow it); the flow's first datagrams wait for it
/// in a small queue.
pub async fn forward_udp(
    client: Client,
    socket: UdpSocket,
    target: SocketAddrV4,
    idle: Duration,
    log: Log,
) -> std::io::Result<()> {
    let socket = Arc::new(socket);
    let mut flows: HashMap<SocketAddr, Flow<tokio::sync::mpsc::Sender<bytes::Bytes>>> = HashMap::new();
    let mut buf = vec![0u8; UDP_BUFFER];
    let mut sweep = tokio::time::interval(idle.min(Duration::from_secs(5)).max(Duration::from_millis(100)));
    loop {
        let (n, from) = tokio::select! {
            received = socket.recv_from(&mut buf) => received?,
            _ = sweep.tick() => {
                flows.retain(|_, f| idle_for(&f.last) < idle);
                continue;
            }
        };
        if !flows.contains_key(&from) || flows[&from].task.is_finished() {
            let (queue, mut queued) = tokio::sync::mpsc::channel::<bytes::Bytes>(FLOW_QUEUE);
            let last = Arc::new(Mutex::new(Instant::now()));
            let task = tokio::spawn({
                let (client, socket, last, log) = (client.clone(), socket.clone(), last.clone(), log.clone());
                async move {
                    let virtual_socket = match client.bind_datagram(0).await {
                        Ok(s) => s,
                        Err(e) => return log(format!("{from} → {target}: {e}; datagrams dropped")),
                    };
                    let back = async {
                        while let Ok(d) = virtual_socket.recv().await {
                            touch(&last);
                            let _ = socket.send_to(&d.payload, from).await;
                        }
                    };
                    let out = async {
                        while let Some(payload) = queued.recv().await {
                            match virtual_socket.send_to(&payload, target).await {
                                Ok(_) => {}
                                Err(e @ Error::MessageTooLarge { .. }) => {
                                    log(format!("{from} → {target}: {}-byte datagram dropped: {e}", payload.len()))
                                }
                                Err(e) => log(format!("{from} → {target}: {e}")),
                            }
                        }
                    };
                    tokio::select! {
                        _ = back => {}
                        _ = out => {}
                    }
                }
            });
            flows.insert(from, Flow { socket: Arc::new(queue), last, task });
        }
        let flow = &flows[&from];
        touch(&flow.last);
        if flow.socket.try_send(bytes::Bytes::copy_from_slice(&buf[..n])).is_err() {
            // The flow's port is still being bound, or the overlay cannot keep up: UDP
            // drops, as a full socket buffer would.
            tracing::debug!(%from, "datagram dropped: the flow's queue is full");
        }
    }
}

/// Datagrams to `socket` (a port of this client's VIP) lead to the local service at
/// `target`: each virtual source gets a local UDP socket of its own, and what the
/// service answers on it goes back to that source. Flows idle for `idle` are forgotten.
pub async fn expose_udp(socket: DatagramSocket, target: SocketAddr, idle: Duration, log: Log) -> Result<(), Error> {
    let virtual_socket = Arc::new(socket);
    let mut flows: HashMap<SocketAddrV4, Flow<UdpSocket>> = HashMap::new();
    let mut sweep = tokio::time::interval(idle.min(Duration::from_secs(5)).max(Duration::from_millis(100)));
    let unspecified: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("an address");
    loop {
        let datagram = tokio::select! {
            received = virtual_socket.recv() => received?,
            _ = sweep.tick() => {
                flows.retain(|_, f| idle_for(&f.last) < idle);
                continue;
            }
        };
        let from = datagram.src;
        if !flows.contains_key(&from) || flows[&from].task.is_finished() {
            let local = match UdpSocket::bind(unspecified).await {
                Ok(s) => s,
                Err(e) => {
                    log(format!("{from} → {target}: local socket: {e}; datagram dropped"));
                    continue;
                }
            };
            if let Err(e) = local.connect(target).await {
                log(format!("{from} → {target}: {e}; datagram dropped"));
                continue;
            }
            let local = Arc::new(local);
            let last = Arc::new(Mutex::new(Instant::now()));
            let task = tokio::spawn({
                let (local, virtual_socket, last, log) =
                    (local.clone(), virtual_socket.clone(), last.clone(), log.clone());
                async move {
                    let mut buf = vec![0u8; UDP_BUFFER];
                    let mut refused_said = false;
                    loop {
                        match local.recv(&mut buf).await {
                            Ok(n) => {
                                touch(&last);
                                refused_said = false;
                                if let Err(e) = virtual_socket.send_to(&buf[..n], from).await {
                                    log(format!("{target} → {from}: {n}-byte datagram dropped: {e}"));
                                }
                            }
                            // ICMP port unreachable from the service: nothing listens
                            // (yet); keep the flow, the next datagram may find it. Said
                            // once until the service answers again.
                            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                                if !refused_said {
                                    log(format!("{from} → {target}: nothing listens there; datagrams dropped"));
                                    refused_said = true;
                                }
                            }
                            Err(_) => return,
                        }
                    }
                }
            });
            flows.insert(from, Flow { socket: local, last, task });
        }
        let flow = &flows[&from];
        touch(&flow.last);
        if let Err(e) = flow.socket.send(&datagram.payload).await {
            if e.kind() != std::io::ErrorKind::ConnectionRefused {
                log(format!("{from} → {target}: {e}"));
            }
        }
    }
}

/// `HOST:PORT`, or a bare `PORT` on 127.0.0.1 (the way `ssh -L` takes a port alone).
pub fn parse_local_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse().map_err(|_| format!("{text:?} is not a local address (PORT, or IP:PORT such as 127.0.0.1:8080)"))
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_port_is_said_once() {
        assert_eq!(on_port("tcp", 8000, Error::AddrInUse { port: 8000 }), "tcp port 8000: address in use");
        assert_eq!(on_port("udp", 9, Error::Limit("too many ports".into())), "udp port 9: too many ports");
    }

    use super::*;

    #[test]
    fn local_addresses_take_a_bare_port_or_an_ip_and_port() {
        assert_eq!(parse_local_addr("8080").unwrap(), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(parse_local_addr("0.0.0.0:53").unwrap(), "0.0.0.0:53".parse().unwrap());
        assert_eq!(parse_local_addr("[::1]:22").unwrap(), "[::1]:22".parse().unwrap());
        assert!(parse_local_addr("localhost:80").unwrap_err().contains("not a local address"));
        assert!(parse_local_addr("70000").is_err());
    }
}
