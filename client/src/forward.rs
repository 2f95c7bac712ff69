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
/// 127.0.0.1:8080 -> 10.77.0.3:80 tcp`), and the future that runs it (it ends only when
/// it fails for good, saying why).
pub struct Started {
    /// The line that says what runs.
    pub line: String,
    /// Runs it.
    pub run: BoxFuture<'static, String>,
}

impl PortMap {
    /// Takes the ports (binds the local socket or registers the virtual port) and returns
    /// what runs; a port in use or a target name no member holds is an error.
    pub async fn start(&self, client: &Client, log: Log) -> Result<Started, String> {
        let client = client.clone();
        match self {
            PortMap::Forward { local, target, udp, idle_secs } => {
                let target = resolve(&client, target).await?;
                let idle = Duration::from_secs((*idle_secs).max(1));
                if *udp {
                    let socket = UdpSocket::bind(local).await.map_err(|e| format!("udp {local}: {e}"))?;
                    let local = socket.local_addr().map_err(|e| e.to_string())?;
                    let run = forward_udp(client, socket, target, idle, log);
                    let run = run.map(move |r| format!("forward udp {local}: {}", ended(r.err()))).boxed();
                    Ok(Started { line: format!("forward {local} -> {target} udp"), run })
                } else {
                    let listener = TcpListener::bind(local).await.map_err(|e| format!("tcp {local}: {e}"))?;
                    let local = listener.local_addr().map_err(|e| e.to_string())?;
                    let run = forward_tcp(client, listener, target, log);
                    let run = run.map(move |r| format!("forward tcp {local}: {}", ended(r.err()))).boxed();
                    Ok(Started { line: format!("forward {local} -> {target} tcp"), run })
                }
            }
            PortMap::Expose { port, target, udp, idle_secs } => {
                let (target, idle) = (*target, Duration::from_secs((*idle_secs).max(1)));
                if *udp {
                    let socket = client.bind_datagram(*port).await.map_err(|e| format!("udp port {port}: {e}"))?;
                    let exposed = socket.local_addr();
                    let run = expose_udp(socket, target, idle, log);
                    let run = run.map(move |r| format!("expose udp {exposed}: {}", ended(r.err()))).boxed();
                    Ok(Started { line: format!("expose {exposed} -> {target} udp"), run })
                } else {
                    let listener =
                        client.listen_with_approval(*port).await.map_err(|e| format!("tcp port {port}: {e}"))?;
                    let exposed = listener.local_addr();
                    let run = expose_tcp(listener, target, log);
                    let run = run.map(move |r| format!("expose tcp {exposed}: {}", ended(r.err()))).boxed();
                    Ok(Started { line: format!("expose {exposed} -> {target} tcp"), run })
                }
            }
        }
    }
}

fn ended(error: Option<impl std::fmt::Display>) -> String {
    error.map_or_else(|| "ended".to_owned(), |e| e.to_string())
}

/// `VIP:PORT`, or `NAME:PORT` for the member of the network with that instance name.
async fn resolve(client: &Client, target: &str) -> Result<SocketAddrV4, String> {
    if let Ok(addr) = target.parse() {
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

/// How long a UDP flow lives without traffic, unless told otherwise.
pub const DEFAULT_UDP_IDLE: Duration = Duration::from_secs(60);
/// Largest UDP payload read from a local socket (the overlay carries at most the
/// client's max payload; larger ones are dropped and said once per flow).
const UDP_BUFFER: usize = 65_536;

/// Local TCP connections accepted on `listener` lead to `target`, each over a virtual
/// stream of its own. A target that refuses or cannot be reached resets the local
/// connection at once, and `log` says why. Ends only with an error of the listener.
pub async fn forward_tcp(client: Client, listener: TcpListener, target: SocketAddrV4, log: Log) -> std::io::Result<()> {
    let mut connections = JoinSet::new();
    loop {
        let (tcp, from) = tokio::select! {
            accepted = listener.accept() => accepted?,
            Some(_) = connections.join_next() => continue,
        };
        let (client, log) = (client.clone(), log.clone());
        connections.spawn(async move {
            let _ = tcp.set_nodelay(true);
            match client.connect(target).await {
                Ok(stream) => {
                    if let Err(why) = splice(tcp, stream).await {
                        log(format!("{from} → {target}: {why}"));
                    }
                }
                Err(e) => {
                    log(format!("connection from {from}: {e}"));
                    reset(tcp);
                }
            }
        });
    }
}

/// Virtual connections to `listener` (made with [`Client::listen_with_approval`]) lead
/// to the local service at `target`, each over a TCP connection of its own. A
/// connection the service refuses is denied (the connecting side reads "denied by the
/// peer"), and `log` says why. Ends only when the listener fails for good.
pub async fn expose_tcp(listener: Listener, target: SocketAddr, log: Log) -> Result<(), Error> {
    let mut connections = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            incoming = listener.incoming() => incoming?,
            Some(_) = connections.join_next() => continue,
        };
        let log = log.clone();
        connections.spawn(async move {
            let from = incoming.peer_addr();
            match TcpStream::connect(target).await {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    match incoming.accept().await {
                        Ok(stream) => {
                            if let Err(why) = splice(tcp, stream).await {
                                log(format!("{from} → {target}: {why}"));
                            }
                        }
                        Err(e) => {
                            log(format!("{from} → {target}: {e}"));
                            reset(tcp);
                        }
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
/// included. The first failure aborts both sides.
async fn splice(tcp: TcpStream, stream: VirtualStream) -> Result<(), String> {
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let (mut virtual_read, mut virtual_write) = stream.into_split();
    let outbound = async {
        tokio::io::copy(&mut tcp_read, &mut virtual_write).await.map_err(|e| format!("local side: {e}"))?;
        virtual_write.shutdown().await.map_err(|e| e.to_string())
    };
    let inbound = async {
        tokio::io::copy(&mut virtual_read, &mut tcp_write).await.map_err(|e| e.to_string())?;
        tcp_write.shutdown().await.map_err(|e| format!("local side: {e}"))
    };
    let result = tokio::try_join!(outbound, inbound);
    if result.is_err() {
        virtual_write.abort();
        virtual_read.abort();
        if let Ok(tcp) = tcp_read.reunite(tcp_write) {
            reset(tcp);
        }
    }
    result.map(|_| ())
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
/// source. Flows idle for `idle` are forgotten (their ports released).
pub async fn forward_udp(
    client: Client,
    socket: UdpSocket,
    target: SocketAddrV4,
    idle: Duration,
    log: Log,
) -> std::io::Result<()> {
    let socket = Arc::new(socket);
    let mut flows: HashMap<SocketAddr, Flow<DatagramSocket>> = HashMap::new();
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
            let virtual_socket = match client.bind_datagram(0).await {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    log(format!("{from} → {target}: {e}; datagram dropped"));
                    continue;
                }
            };
            let last = Arc::new(Mutex::new(Instant::now()));
            let task = tokio::spawn({
                let (virtual_socket, socket, last) = (virtual_socket.clone(), socket.clone(), last.clone());
                async move {
                    while let Ok(d) = virtual_socket.recv().await {
                        touch(&last);
                        let _ = socket.send_to(&d.payload, from).await;
                    }
                }
            });
            flows.insert(from, Flow { socket: virtual_socket, last, task });
        }
        let flow = &flows[&from];
        touch(&flow.last);
        match flow.socket.send_to(&buf[..n], target).await {
            Ok(_) => {}
            Err(e @ Error::MessageTooLarge { .. }) => log(format!("{from} → {target}: {n}-byte datagram dropped: {e}")),
            Err(e) => log(format!("{from} → {target}: {e}")),
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
                    loop {
                        match local.recv(&mut buf).await {
                            Ok(n) => {
                                touch(&last);
                                if let Err(e) = virtual_socket.send_to(&buf[..n], from).await {
                                    log(format!("{target} → {from}: {n}-byte datagram dropped: {e}"));
                                }
                            }
                            // ICMP port unreachable from the service: nothing listens
                            // (yet); keep the flow, the next datagram may find it.
                            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
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
