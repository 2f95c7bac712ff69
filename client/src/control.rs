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
}

/// This instance's session, as `overlan status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Instance name (empty: the unnamed instance).
    pub instance: String,
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
}

impl Status {
    /// The status of `client`, instance `instance`.
    pub fn of(client: &Client, instance: &str) -> Self {
        let (state, reason) = match client.state() {
            SessionState::Up => ("up", None),
            SessionState::Reconnecting(why) => ("reconnecting", Some(why)),
            SessionState::Closed(why) => ("closed", Some(why)),
        };
        let (listeners, datagram_ports) = client.open_ports();
        Self {
            instance: instance.to_owned(),
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

/// The control socket `up` serves; removed when dropped.
pub struct ControlServer {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
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
    /// Another `up` of the same instance answers on the socket.
    #[error("another `overlan up` already runs this instance (control socket {0})")]
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

/// Serves `client`'s control socket at `path` (instance `instance`).
pub async fn serve(client: Client, path: PathBuf, instance: String) -> Result<ControlServer, ServeError> {
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
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer(stream, client.clone(), instance.clone()));
        }
    });
    Ok(ControlServer { path, task })
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

async fn answer(stream: UnixStream, client: Client, instance: String) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST));
    if reader.read_line(&mut line).await.is_err() {
        return;
    }
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Status) => Response::Status(Status::of(&client, &instance)),
        Ok(Request::Peers) => match client.peers().await {
            Ok(peers) => Response::Peers { peers },
            Err(e) => Response::Error { message: e.to_string() },
        },
        Err(e) => Response::Error { message: format!("bad request: {e}") },
    };
    let mut text = serde_json::to_string(&response).expect("plain data serializes");
    text.push('\n');
    let _ = write.write_all(text.as_bytes()).await;
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
