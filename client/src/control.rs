//! The local control socket of an instance. `overlan up` is the long-running session of
//! an instance (identity + instance name) and serves a Unix socket, readable and
//! writable by its owner only, in the user's runtime directory; other commands of the
//! same instance (`ip`, `status`, `peers`) ask it instead of joining on their own, so
//! they share its VIP and never replace its session. Protocol: one JSON line each way.

use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use overlan_shared::wire::control::PeerInfo;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::client::{Client, SessionState};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a command waits for `up` to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// What a command asks the running `up`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// This instance's session.
    Status,
    /// The other members of the network.
    Peers,
    /// Connect to `to`; the connection then carries the stream.
    Connect {
        /// The address.
        to: std::net::SocketAddrV4,
    },
    /// Listen on `port` for one connection; the connection then carries it.
    Listen {
        /// The port (0: ephemeral).
        port: u16,
    },
    /// Bind datagram port `port`; the connection then carries its datagrams.
    Bind {
        /// The port (0: ephemeral).
        port: u16,
    },
    /// Run a forward or expose for as long as the connection stays open; `Mapped`, then
    /// `Log` lines, follow.
    Map {
        /// What to run.
        map: crate::forward::PortMap,
    },
}

/// This instance's session, as `overlan status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Instance name (empty: the unnamed instance).
    pub instance: String,
    /// The command holding the session: `up`, `tun` or `run`.
    #[serde(default = "default_command")]
    pub command: String,
    /// The VIP.
    pub vip: Ipv4Addr,
    /// Network name.
    pub network: String,
    /// Its subnet.
    pub subnet: String,
    /// The relay in use, `HOST:PORT` as dialed.
    pub relay: String,
    /// `up`, `reconnecting` or `closed`.
    pub state: String,
    /// Why it is reconnecting or closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the current session was established, unix seconds.
    pub since: u64,
    /// Stream sockets open.
    pub streams: usize,
    /// Stream listeners.
    pub listeners: usize,
    /// Bound datagram ports.
    pub datagram_ports: usize,
    /// The largest UDP payload the path to the relay carries (path-MTU discovery);
    /// absent between sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_mtu: Option<u16>,
    /// Smoothed round-trip time to the relay, microseconds; absent between sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_us: Option<u64>,
}

fn default_command() -> String {
    "up".to_owned()
}

impl Status {
    /// The status of `client`, instance `instance`, whose session `command` holds.
    pub fn of(client: &Client, instance: &str, command: &str) -> Self {
        let (state, reason) = match client.state() {
            SessionState::Up => ("up", None),
            SessionState::Reconnecting(why) => ("reconnecting", Some(why)),
            SessionState::Closed(why) => ("closed", Some(why)),
        };
        let (listeners, datagram_ports) = client.open_ports();
        let path = client.path();
        Self {
            instance: instance.to_owned(),
            command: command.to_owned(),
            vip: client.vip(),
            network: client.network().to_owned(),
            subnet: client.subnet().to_string(),
            relay: client.relay_addr().to_string(),
            state: state.to_owned(),
            reason,
            since: client.since().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            streams: client.open_streams(),
            listeners,
            datagram_ports,
            path_mtu: path.map(|p| p.mtu),
            rtt_us: path.map(|p| p.rtt.as_micros() as u64),
        }
    }
}

/// The answer of `up`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::Status`].
    Status(Status),
    /// Answer to [`Request::Peers`].
    Peers {
        /// The members.
        peers: Vec<PeerInfo>,
    },
    /// A stream is connected (answer to `Connect`, or the connection a `Listen` took);
    /// frames follow.
    Connected {
        /// This side's address.
        local: std::net::SocketAddrV4,
        /// The peer's address.
        peer: std::net::SocketAddrV4,
    },
    /// Bound (answer to `Bind`); datagram frames follow.
    Bound {
        /// The address bound.
        local: std::net::SocketAddrV4,
        /// The exact largest payload.
        max_payload: usize,
    },
    /// Listening (answer to `Listen`); `Connected` follows when a connection comes.
    Listening {
        /// The address listened on.
        local: std::net::SocketAddrV4,
    },
    /// The forward or expose runs (answer to `Map`).
    Mapped {
        /// What runs, e.g. `forward 127.0.0.1:8080 -> 10.77.0.3:80 tcp`.
        line: String,
    },
    /// Something went wrong with one connection or flow of a running `Map`.
    Log {
        /// What.
        message: String,
    },
    /// The request failed.
    Error {
        /// Why.
        message: String,
    },
}

/// Where the control socket of `instance` of the identity at `identity` lives:
/// `$XDG_RUNTIME_DIR/overlan/` (else a per-user directory in the temporary directory),
/// named after the instance and a hash of the identity file's path.
pub fn socket_path(identity: &Path, instance: &str) -> PathBuf {
    let dir = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("overlan"),
        _ => std::env::temp_dir().join(format!("overlan-{}", user_id())),
    };
    // Absolute, not canonical: the identity file may not exist yet when `up` starts.
    let identity = std::path::absolute(identity).unwrap_or_else(|_| identity.to_path_buf());
    let hash = overlan_shared::tls::Fingerprint::of(identity.as_os_str().as_encoded_bytes()).to_string();
    let name = if instance.is_empty() { "default" } else { instance };
    dir.join(format!("{name}-{}.sock", &hash[..12]))
}

/// The user's numeric id (from /proc; "user" where that is not available).
fn user_id() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let uid = s.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.to_owned();
            Some(uid)
        })
        .unwrap_or_else(|| "user".to_owned())
}

/// The control socket `up` (or `tun`, `run`) serves; removed when dropped.
pub struct ControlServer {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
    stopping: tokio_util::sync::CancellationToken,
}

impl ControlServer {
    /// Stops answering, and stops what it runs for other commands (their forwards
    /// reset the connections they carry), waiting at most two seconds. Call before the
    /// client leaves.
    pub async fn stop(mut self) {
        self.stopping.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.task).await;
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Why the control socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another `up` (or `tun`, `run`) of the same instance answers on the socket.
    #[error("another overlan command already holds this instance's session (control socket {0})")]
    AlreadyRunning(String),
    /// The socket could not be made.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket.
        path: String,
        /// The error.
        source: io::Error,
    },
}

/// Serves `client`'s control socket at `path` (instance `instance`, its session held by
/// `overlan COMMAND`: up, tun or run), so the instance's other commands share it.
pub async fn serve(
    client: Client,
    path: PathBuf,
    instance: String,
    command: &'static str,
) -> Result<ControlServer, ServeError> {
    let shown = path.display().to_string();
    let io_err = |source| ServeError::Io { path: shown.clone(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err)?;
        set_mode(dir, 0o700).map_err(io_err)?;
    }
    if path.exists() {
        if UnixStream::connect(&path).await.is_ok() {
            return Err(ServeError::AlreadyRunning(shown));
        }
        // Left behind by an `up` that was killed.
        let _ = std::fs::remove_file(&path);
    }
    let listener = UnixListener::bind(&path).map_err(io_err)?;
    set_mode(&path, 0o600).map_err(io_err)?;
    let stopping = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn({
        let stopping = stopping.clone();
        async move {
            let mut answers = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            answers.spawn(answer(stream, client.clone(), instance.clone(), command, stopping.clone()));
                        }
                        Err(_) => break,
                    },
                    Some(_) = answers.join_next() => {}
                    _ = stopping.cancelled() => break,
                }
            }
            // What runs for other commands stops on the token; the rest (a status
            // answer, a carried stream) is dropped.
            let _ =
                tokio::time::timeout(Duration::from_secs(1), async { while answers.join_next().await.is_some() {} })
                    .await;
            answers.shutdown().await;
        }
    });
    Ok(ControlServer { path, task, stopping })
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

async fn send_line(stream: &mut UnixStream, response: &Response) -> io::Result<()> {
    let mut text = serde_json::to_string(response).expect("plain data serializes");
    text.push('\n');
    stream.write_all(text.as_bytes()).await
}

async fn answer(
    stream: UnixStream,
    client: Client,
    instance: String,
    command: &'static str,
    stopping: tokio_util::sync::CancellationToken,
) {
    let mut line = String::new();
    // A command sends nothing after its request line until it is answered, so the
    // reader holds nothing beyond the line when it is taken apart again.
    let mut reader = BufReader::new(stream);
    let read = tokio::io::AsyncBufReadExt::read_line(&mut reader, &mut line).await;
    let mut stream = reader.into_inner();
    if read.is_err() || line.len() as u64 > MAX_REQUEST {
        return;
    }
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Status) => Response::Status(Status::of(&client, &instance, command)),
        Ok(Request::Peers) => match client.peers().await {
            Ok(peers) => Response::Peers { peers },
            Err(e) => Response::Error { message: e.to_string() },
        },
        Ok(Request::Connect { to }) => match client.connect(to).await {
            Ok(virtual_stream) => {
                let connected = Response::Connected { local: virtual_stream.local_addr(), peer: to };
                if send_line(&mut stream, &connected).await.is_ok() {
                    carry(stream, virtual_stream, &client, &stopping).await;
                }
                return;
            }
            Err(e) => Response::Error { message: e.to_string() },
        },
        Ok(Request::Listen { port }) => match client.listen(port).await {
            Ok(listener) => {
                if send_line(&mut stream, &Response::Listening { local: listener.local_addr() }).await.is_err() {
                    return;
                }
                // One connection, as `nc -l` takes; a command that goes away while
                // waiting gives the port back.
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = stream.readable() => return,
                };
                match accepted {
                    Ok((virtual_stream, peer)) => {
                        let connected = Response::Connected { local: listener.local_addr(), peer };
                        drop(listener);
                        if send_line(&mut stream, &connected).await.is_ok() {
                            carry(stream, virtual_stream, &client, &stopping).await;
                        }
                        return;
                    }
                    Err(e) => Response::Error { message: format!("accept: {e}") },
                }
            }
            Err(e) => Response::Error { message: format!("listen: {e}") },
        },
        Ok(Request::Bind { port }) => match client.bind_datagram(port).await {
            Ok(socket) => {
                let bound = Response::Bound { local: socket.local_addr(), max_payload: socket.max_payload() };
                if send_line(&mut stream, &bound).await.is_ok() {
                    carry_datagrams(stream, socket).await;
                }
                return;
            }
            Err(e) => Response::Error { message: format!("bind: {e}") },
        },
        Ok(Request::Map { map }) => {
            let (tx, mut logged) = tokio::sync::mpsc::unbounded_channel::<String>();
            let log: crate::forward::Log = std::sync::Arc::new(move |line| {
                let _ = tx.send(line);
            });
            match map.start(&client, log).await {
                Ok(started) => {
                    if send_line(&mut stream, &Response::Mapped { line: started.line }).await.is_err() {
                        return;
                    }
                    let (mut run, stop) = (started.run, started.stop);
                    loop {
                        tokio::select! {
                            why = &mut run => {
                                let _ = send_line(&mut stream, &Response::Error { message: why }).await;
                                return;
                            }
                            Some(message) = logged.recv() => {
                                if send_line(&mut stream, &Response::Log { message }).await.is_err() {
                                    return;
                                }
                            }
                            // The command went away (Ctrl-C), or this session ends: the
                            // forward stops, its connections reset.
                            _ = stream.readable() => {
                                stop.cancel();
                                let _ = tokio::time::timeout(Duration::from_secs(1), run).await;
                                return;
                            }
                            _ = stopping.cancelled() => {
                                stop.cancel();
                                let _ = tokio::time::timeout(Duration::from_secs(1), run).await;
                                return;
                            }
                        }
                    }
                }
                Err(message) => Response::Error { message },
            }
        }
        Err(e) => Response::Error { message: format!("bad request: {e}") },
    };
    let _ = send_line(&mut stream, &response).await;
}

/// Asks the `up` serving `path` to run `map` for as long as this call runs (drop it to
/// stop). `Ok(None)` if no `up` runs; otherwise why it ended or could not start.
/// `on_started` is told what runs, `on_log` each line about a connection or flow.
pub async fn run_map(
    path: &Path,
    map: &crate::forward::PortMap,
    on_started: impl FnOnce(String),
    mut on_log: impl FnMut(String),
) -> io::Result<Option<String>> {
    let mut stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut text = serde_json::to_string(&Request::Map { map: map.clone() }).expect("plain data serializes");
    text.push('\n');
    stream.write_all(text.as_bytes()).await?;
    let mut on_started = Some(on_started);
    let mut lines = BufReader::new(stream).lines();
    loop {
        let Some(line) = lines.next_line().await? else {
            return Ok(Some("`overlan up` went away".to_owned()));
        };
        match serde_json::from_str::<Response>(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))? {
            Response::Mapped { line } => {
                if let Some(tell) = on_started.take() {
                    tell(line);
                }
            }
            Response::Log { message } => on_log(message),
            Response::Error { message } => return Ok(Some(message)),
            other => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected {other:?}"))),
        }
    }
}

fn addr_bytes(addr: std::net::SocketAddrV4) -> [u8; 6] {
    let mut out = [0u8; 6];
    out[..4].copy_from_slice(&addr.ip().octets());
    out[4..].copy_from_slice(&addr.port().to_be_bytes());
    out
}

fn addr_from(bytes: &[u8]) -> Option<std::net::SocketAddrV4> {
    let ip: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
    let port = u16::from_be_bytes(bytes.get(4..6)?.try_into().ok()?);
    Some(std::net::SocketAddrV4::new(Ipv4Addr::from(ip), port))
}

/// Up's side of a datagram socket handed to a command: its datagrams go to the command
/// and the command's to the overlay, until the command goes away (the port is then
/// released).
async fn carry_datagrams(conn: UnixStream, socket: crate::datagram::DatagramSocket) {
    let (mut cread, mut cwrite) = conn.into_split();
    loop {
        tokio::select! {
            frame = read_frame(&mut cread) => match frame {
                Ok(Some((frame::DATAGRAM, body))) => {
                    let Some(to) = addr_from(&body) else { return };
                    // Unreliable by contract; a failure that is not about this datagram
                    // alone (the session is gone) ends the socket for the command.
                    match socket.send_to(&body[6..], to).await {
                        Ok(_) | Err(crate::error::Error::MessageTooLarge { .. }) => {}
                        Err(e) => {
                            let _ = write_frame(&mut cwrite, frame::ERROR, format!("send to {to}: {e}").as_bytes()).await;
                            return;
                        }
                    }
                }
                _ => return,
            },
            received = socket.recv() => match received {
                Ok(d) => {
                    let mut body = addr_bytes(d.src).to_vec();
                    body.extend_from_slice(&d.payload);
                    if write_frame(&mut cwrite, frame::DATAGRAM, &body).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = write_frame(&mut cwrite, frame::ERROR, e.to_string().as_bytes()).await;
                    return;
                }
            },
        }
    }
}

/// A datagram socket of the running `up`, as a command sees it.
pub struct ProxiedDatagrams {
    read: tokio::sync::Mutex<tokio::net::unix::OwnedReadHalf>,
    write: tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>,
    /// The address bound.
    pub local: std::net::SocketAddrV4,
    /// The exact largest payload.
    pub max_payload: usize,
}

impl ProxiedDatagrams {
    /// Sends `payload` to `to` (checked against the maximum here, as a socket would).
    pub async fn send_to(&self, payload: &[u8], to: std::net::SocketAddrV4) -> Result<(), crate::error::Error> {
        if payload.len() > self.max_payload {
            return Err(crate::error::Error::MessageTooLarge { max: self.max_payload });
        }
        let mut body = addr_bytes(to).to_vec();
        body.extend_from_slice(payload);
        write_frame(&mut *self.write.lock().await, frame::DATAGRAM, &body)
            .await
            .map_err(|e| crate::error::Error::SessionLost(format!("`overlan up`: {e}")))
    }

    /// The next datagram: its source and payload.
    pub async fn recv(&self) -> Result<(std::net::SocketAddrV4, Vec<u8>), String> {
        match read_frame(&mut *self.read.lock().await).await {
            Ok(Some((frame::DATAGRAM, body))) => {
                let src = addr_from(&body).ok_or("`overlan up` sent a malformed datagram")?;
                Ok((src, body[6..].to_vec()))
            }
            Ok(Some((frame::ERROR, why))) => Err(String::from_utf8_lossy(&why).into_owned()),
            Ok(_) => Err("`overlan up` went away".to_owned()),
            Err(e) => Err(format!("`overlan up`: {e}")),
        }
    }
}

/// Asks the `up` serving `path` to bind a datagram port for this command. `Ok(None)`
/// if none runs; otherwise the socket, or why not.
pub async fn open_datagrams(path: &Path, port: u16) -> io::Result<Option<Result<ProxiedDatagrams, String>>> {
    let mut stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut text = serde_json::to_string(&Request::Bind { port }).expect("plain data serializes");
    text.push('\n');
    stream.write_all(text.as_bytes()).await?;
    let line = read_line_unbuffered(&mut stream).await?;
    match serde_json::from_str::<Response>(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))? {
        Response::Bound { local, max_payload } => {
            let (read, write) = stream.into_split();
            let (read, write) = (tokio::sync::Mutex::new(read), tokio::sync::Mutex::new(write));
            Ok(Some(Ok(ProxiedDatagrams { read, write, local, max_payload })))
        }
        Response::Error { message } => Ok(Some(Err(message))),
        other => Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected {other:?}"))),
    }
}

/// Asks the `up` serving `path` for a stream (`Connect` or `Listen`). `Ok(None)` if
/// none runs; otherwise the stream, or why not. `on_listening` is told the address a
/// `Listen` listens on before the connection comes.
pub async fn open_stream(
    path: &Path,
    request: &Request,
    on_listening: impl FnOnce(std::net::SocketAddrV4),
) -> io::Result<Option<Result<ProxiedStream, String>>> {
    let mut stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut text = serde_json::to_string(request).expect("plain data serializes");
    text.push('\n');
    stream.write_all(text.as_bytes()).await?;
    let mut on_listening = Some(on_listening);
    loop {
        let line = read_line_unbuffered(&mut stream).await?;
        match serde_json::from_str::<Response>(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))? {
            Response::Connected { local, peer } => {
                let (read, write) = stream.into_split();
                return Ok(Some(Ok(ProxiedStream { read, write, peer, local })));
            }
            Response::Listening { local } => {
                if let Some(tell) = on_listening.take() {
                    tell(local);
                }
            }
            Response::Error { message } => return Ok(Some(Err(message))),
            other => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected {other:?}"))),
        }
    }
}

/// One line, read a byte at a time, so nothing after it (the frames) is consumed.
async fn read_line_unbuffered(stream: &mut UnixStream) -> io::Result<String> {
    use tokio::io::AsyncReadExt;
    let mut line = Vec::new();
    loop {
        let byte = stream.read_u8().await?;
        if byte == b'\n' {
            return String::from_utf8(line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
        }
        if line.len() as u64 >= MAX_REQUEST {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "answer line too long"));
        }
        line.push(byte);
    }
}

/// Asks the `up` serving `path`; `Ok(None)` if none runs.
pub async fn ask(path: &Path, request: &Request) -> io::Result<Option<Response>> {
    let stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => return Ok(None),
        Err(e) => return Err(e),
    };
    let exchange = async {
        let (read, mut write) = stream.into_split();
        let mut text = serde_json::to_string(request).expect("plain data serializes");
        text.push('\n');
        write.write_all(text.as_bytes()).await?;
        let mut line = String::new();
        BufReader::new(read).read_line(&mut line).await?;
        serde_json::from_str(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    };
    match tokio::time::timeout(ANSWER_TIMEOUT, exchange).await {
        Ok(answer) => answer.map(Some),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "`overlan up` did not answer")),
    }
}

/// `unix` seconds as `YYYY-MM-DD HH:MM UTC`.
pub fn utc_minute(unix: u64) -> String {
    let text = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string();
    format!("{} UTC", text.get(..16).unwrap_or(&text).replacen('T', " ", 1))
}

/// How long ago `unix` seconds was, roughly (`5m ago`).
pub fn ago(unix: u64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let secs = now.saturating_sub(unix);
    let (n, unit) = match secs {
        s if s < 60 => (s, "s"),
        s if s < 3600 => (s / 60, "m"),
        s if s < 86_400 => (s / 3600, "h"),
        s => (s / 86_400, "d"),
    };
    format!("{n}{unit} ago")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_differ_by_instance_and_identity() {
        let a = socket_path(Path::new("/x/identity.pem"), "");
        let b = socket_path(Path::new("/x/identity.pem"), "game");
        let c = socket_path(Path::new("/y/identity.pem"), "game");
        assert!(a.file_name().unwrap().to_str().unwrap().starts_with("default-"));
        assert_ne!(a, b);
        assert_ne!(b, c);
        assert_eq!(b, socket_path(Path::new("/x/identity.pem"), "game"));
    }

    #[test]
    fn requests_and_answers_are_json_lines_with_a_tag() {
        assert_eq!(serde_json::to_string(&Request::Status).unwrap(), r#"{"op":"status"}"#);
        let err = Response::Error { message: "x".into() };
        let text = serde_json::to_string(&err).unwrap();
        assert_eq!(text, r#"{"result":"error","message":"x"}"#);
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), err);
    }
}

/// Frames on a control connection once it carries a stream (after the JSON answer).
mod frame {
    /// Bytes of the stream.
    pub(super) const DATA: u8 = 1;
    /// The sender's direction ended cleanly.
    pub(super) const FIN: u8 = 2;
    /// Client → up: abort the stream (the peer sees an error, not a clean end).
    pub(super) const ABORT: u8 = 3;
    /// Up → client: the relay acknowledged everything, the finish included.
    pub(super) const DELIVERED: u8 = 4;
    /// Up → client: the stream failed; the payload says why.
    pub(super) const ERROR: u8 = 5;
    /// A datagram: the peer's address (4 + 2 bytes: to, from the command; from, to it),
    /// then the payload.
    pub(super) const DATAGRAM: u8 = 6;
    /// Largest payload of one frame.
    pub(super) const MAX: usize = 64 * 1024;
}

/// Reads one frame: kind and payload. `None` at a clean end of the connection.
async fn read_frame(r: &mut (impl tokio::io::AsyncRead + Unpin)) -> io::Result<Option<(u8, Vec<u8>)>> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 5];
    match r.read_exact(&mut head[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut head[1..]).await?;
    let len = u32::from_be_bytes(head[1..].try_into().expect("4 bytes")) as usize;
    if len > frame::MAX {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "control frame too large"));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some((head[0], payload)))
}

async fn write_frame(w: &mut (impl tokio::io::AsyncWrite + Unpin), kind: u8, payload: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    w.write_all(&out).await
}

/// Up's side of a stream handed to a command: frames from the command go to the
/// virtual stream and back. The command learns when its data is delivered, when the
/// peer finished, and why it failed; a command that goes away without finishing aborts
/// the stream.
async fn carry(
    conn: UnixStream,
    stream: crate::stream::VirtualStream,
    client: &Client,
    stopping: &tokio_util::sync::CancellationToken,
) {
    use futures_util::FutureExt;
    use tokio::io::AsyncReadExt;
    // The session the stream lives on: when it goes, so does the stream, also while
    // neither side has anything to carry. Each direction watches it between frames, so
    // a frame to the command is never cut short.
    let gone = client.session_gone().shared();
    let peer = stream.peer_addr();
    let (mut vread, mut vwrite) = stream.into_split();
    let (mut cread, cwrite) = conn.into_split();
    let cwrite = std::sync::Arc::new(tokio::sync::Mutex::new(cwrite));
    let error = |e: &dyn std::fmt::Display| about(peer, e);
    let lost = |why: String| format!("connection to {peer}: session lost ({why})");
    // The instance's session is stopping (`up` asked to end): the stream is aborted,
    // so the peer sees an error, never a clean end of a transfer cut short.
    let ending = || format!("connection to {peer}: the instance's session is ending");
    let up = {
        let (cwrite, gone) = (cwrite.clone(), gone.clone());
        async move {
            let mut sent = 0usize;
            loop {
                let frame = tokio::select! {
                    frame = read_frame(&mut cread) => frame,
                    why = gone.clone() => {
                        let _ = write_frame(&mut *cwrite.lock().await, frame::ERROR, lost(why).as_bytes()).await;
                        return false;
                    }
                    _ = stopping.cancelled() => {
                        vwrite.abort();
                        let _ = write_frame(&mut *cwrite.lock().await, frame::ERROR, ending().as_bytes()).await;
                        return false;
                    }
                };
                match frame {
                    Ok(Some((frame::DATA, data))) => {
                        sent += data.len();
                        if let Err(e) = vwrite.write_all(&data).await {
                            let _ = write_frame(&mut *cwrite.lock().await, frame::ERROR, error(&e).as_bytes()).await;
                            return false;
                        }
                    }
                    Ok(Some((frame::FIN, _))) => {
                        let delivered = match vwrite.shutdown().await.and(vwrite.delivered().await) {
                            // Nothing was sent, so nothing is lost if the peer stopped first.
                            Err(_) if sent == 0 => Ok(()),
                            other => other,
                        };
                        let mut w = cwrite.lock().await;
                        let _ = match delivered {
                            Ok(()) => write_frame(&mut *w, frame::DELIVERED, &[]).await,
                            Err(e) => write_frame(&mut *w, frame::ERROR, error(&e).as_bytes()).await,
                        };
                        return true;
                    }
                    // ABORT, a broken frame, or the command gone without finishing.
                    _ => {
                        vwrite.abort();
                        return false;
                    }
                }
            }
        }
    };
    let down = {
        let cwrite = cwrite.clone();
        async move {
            let mut buf = vec![0u8; frame::MAX];
            loop {
                let read = tokio::select! {
                    read = vread.read(&mut buf) => read,
                    why = gone.clone() => {
                        let _ = write_frame(&mut *cwrite.lock().await, frame::ERROR, lost(why).as_bytes()).await;
                        return;
                    }
                    _ = stopping.cancelled() => {
                        vread.abort();
                        return;
                    }
                };
                match read {
                    Ok(0) => {
                        let _ = write_frame(&mut *cwrite.lock().await, frame::FIN, &[]).await;
                        return;
                    }
                    Ok(n) => {
                        if write_frame(&mut *cwrite.lock().await, frame::DATA, &buf[..n]).await.is_err() {
                            vread.abort();
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = write_frame(&mut *cwrite.lock().await, frame::ERROR, error(&e).as_bytes()).await;
                        return;
                    }
                }
            }
        }
    };
    tokio::join!(up, down);
}

/// How long a command waits for `up`'s reason once `up` closed the connection under it.
const REASON_WAIT: Duration = Duration::from_secs(1);

/// A stream of the running `up`, as a command sees it over its control connection.
pub struct ProxiedStream {
    read: tokio::net::unix::OwnedReadHalf,
    write: tokio::net::unix::OwnedWriteHalf,
    /// The peer's address.
    pub peer: std::net::SocketAddrV4,
    /// This side's address.
    pub local: std::net::SocketAddrV4,
}

/// What a proxied transfer ended with.
#[derive(Debug)]
pub enum Ended {
    /// Everything sent was delivered (if anything was finished) and the peer finished.
    Clean,
    /// It failed; why.
    Failed(String),
}

impl ProxiedStream {
    /// Copies `input` to the stream and the stream to `output` until both directions end:
    /// `Clean` only if everything from `input` was acknowledged by the relay and the
    /// peer finished cleanly (and `output` was flushed). With `quit_after`, the peer is
    /// read for at most that long once `input` was delivered (netcat's `-q`).
    pub async fn transfer(
        self,
        mut input: impl tokio::io::AsyncRead + Unpin,
        mut output: impl tokio::io::AsyncWrite + Unpin,
        quit_after: Option<Duration>,
    ) -> Ended {
        use tokio::io::AsyncReadExt;
        let ProxiedStream { mut read, mut write, .. } = self;
        // Why the upload stopped: the input failed, or `up` closed the connection (after
        // saying why on it, as a rule: the download reads that).
        enum Stopped {
            Input(String),
            Up(String),
        }
        let upload = async move {
            let mut buf = vec![0u8; frame::MAX];
            loop {
                match input.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        write_frame(&mut write, frame::DATA, &buf[..n]).await.map_err(|e| Stopped::Up(e.to_string()))?
                    }
                    Err(e) => return Err(Stopped::Input(format!("reading input: {e}"))),
                }
            }
            write_frame(&mut write, frame::FIN, &[]).await.map_err(|e| Stopped::Up(e.to_string()))?;
            Ok(write)
        };
        let download = async move {
            let (mut fin, mut delivered) = (false, false);
            let mut deadline = None;
            while !(fin && delivered) {
                let frame = match deadline {
                    Some(deadline) => match tokio::time::timeout_at(deadline, read_frame(&mut read)).await {
                        Ok(frame) => frame,
                        Err(_) => break,
                    },
                    None => read_frame(&mut read).await,
                };
                match frame {
                    Ok(Some((frame::DATA, data))) => {
                        output.write_all(&data).await.map_err(|e| format!("writing output: {e}"))?
                    }
                    Ok(Some((frame::FIN, _))) => fin = true,
                    Ok(Some((frame::DELIVERED, _))) => {
                        delivered = true;
                        deadline = quit_after.map(|grace| tokio::time::Instant::now() + grace);
                    }
                    Ok(Some((frame::ERROR, why))) => return Err(String::from_utf8_lossy(&why).into_owned()),
                    Ok(_) => return Err("`overlan up` went away during the transfer".to_owned()),
                    Err(e) => {
                        return Err(format!(
                            "the instance's session (`overlan up`) went away during the transfer ({e})"
                        ))
                    }
                }
            }
            output.flush().await.map_err(|e| format!("writing output: {e}"))
        };
        let went_away =
            |e: String| format!("the instance's session (`overlan up`) went away during the transfer ({e})");
        // The first failure ends the transfer at once (it must not wait for input); when
        // `up` closed the connection under the upload, what it said last is the cause.
        tokio::pin!(upload, download);
        let outcome = tokio::select! {
            uploaded = &mut upload => match uploaded {
                // The write half stays open until the download ends (`up` takes a closed
                // one for a command gone without finishing).
                Ok(_write) => download.await,
                Err(Stopped::Input(e)) => Err(e),
                Err(Stopped::Up(e)) => match tokio::time::timeout(REASON_WAIT, &mut download).await {
                    Ok(Err(why)) => Err(why),
                    _ => Err(went_away(e)),
                },
            },
            downloaded = &mut download => match downloaded {
                Err(e) => Err(e),
                Ok(()) => upload.await.map(drop).map_err(|(Stopped::Input(e) | Stopped::Up(e))| e),
            },
        };
        match outcome {
            Ok(()) => Ended::Clean,
            Err(e) => Ended::Failed(e),
        }
    }

    /// Aborts the stream: the peer sees an error, not a clean end.
    pub async fn abort(mut self) {
        let _ = write_frame(&mut self.write, frame::ABORT, &[]).await;
    }
}

/// `connection to PEER: error`, unless the error names the connection already (the
/// library's stream errors do).
pub fn about(peer: std::net::SocketAddrV4, e: &dyn std::fmt::Display) -> String {
    let text = e.to_string();
    if text.starts_with("connection to ") {
        text
    } else {
        format!("connection to {peer}: {text}")
    }
}
