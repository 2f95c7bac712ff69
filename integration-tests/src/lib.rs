//! Test harness: real relays (in-process on port 0 with a temporary data directory, or
//! as processes), real clients, raw QUIC connections for feeding the relay bad input,
//! and helpers that wait on events with a timeout instead of sleeping.

pub mod netns;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Once};
use std::time::Duration;

use overlan_client::{Client, Identity, JoinOptions};
use overlan_server::store::Store;
use overlan_server::{RelayConfig, RelayHandle};
use overlan_shared::config::Secret;
use overlan_shared::tls;
use overlan_shared::wire::control::{ClientMessage, RelayMessage};
use overlan_shared::wire::frame::ClientSideCodec;
use overlan_shared::wire::{ALPN_CLIENT, DEFAULT_MAX_CONTROL_FRAME, PROTOCOL_VERSION, RELAY_SERVER_NAME};
use overlan_shared::Invite;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Default limit for one awaited event in tests.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

/// Idle timeout test relays use, so session-death tests finish quickly.
pub const TEST_IDLE_TIMEOUT: Duration = Duration::from_secs(3);

/// Awaits `fut`, panicking with `what` if it takes longer than [`EVENT_TIMEOUT`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(EVENT_TIMEOUT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {EVENT_TIMEOUT:?} waiting for {what}"),
    }
}

/// Installs a test log subscriber once (RUST_LOG controls it).
pub fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
            .with_test_writer()
            .try_init();
    });
}

/// A relay running in this process on 127.0.0.1:0 with its own data directory.
pub struct TestRelay {
    handle: Option<RelayHandle>,
    dir: Arc<TempDir>,
    config: RelayConfig,
}

impl TestRelay {
    /// Starts a relay with test defaults.
    pub fn start() -> Self {
        Self::start_with(|_| {})
    }

    /// Starts a relay after `adjust` has changed the test defaults.
    pub fn start_with(adjust: impl FnOnce(&mut RelayConfig)) -> Self {
        init_logging();
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let mut config = RelayConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            data_dir: dir.path().to_path_buf(),
            idle_timeout: TEST_IDLE_TIMEOUT,
            ..RelayConfig::default()
        };
        adjust(&mut config);
        let handle = RelayHandle::start(config.clone()).expect("relay starts");
        Self { handle: Some(handle), dir, config }
    }

    /// The running relay.
    pub fn handle(&self) -> &RelayHandle {
        self.handle.as_ref().expect("relay running")
    }

    /// Stops the relay (as a killed node would vanish for its peers and clients).
    pub fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
    }

    /// Waits until this node routes `vip` of the default network (a route learned
    /// from peers, or a session here), returning the next hop.
    pub async fn routed(&self, vip: std::net::Ipv4Addr) -> String {
        self.routed_in(overlan_server::store::DEFAULT_NETWORK, vip).await
    }

    /// Waits until this node routes `vip` of `network`, returning the next hop.
    pub async fn routed_in(&self, network: &str, vip: std::net::Ipv4Addr) -> String {
        let what = format!("a route to {vip} in {network} at {}", self.addr());
        within(&what, async {
            loop {
                if let Some(hop) = self.handle().next_hop(network, vip) {
                    return hop;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }

    /// Waits until this node has no route to `vip` of the default network.
    pub async fn unrouted(&self, vip: std::net::Ipv4Addr) {
        let what = format!("the route to {vip} at {} to be withdrawn", self.addr());
        within(&what, async {
            while self.handle().next_hop(overlan_server::store::DEFAULT_NETWORK, vip).is_some() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }

    /// Stops the relay and starts it again on the same data directory (a new port).
    pub fn restart(mut self) -> Self {
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
        let handle = RelayHandle::start(self.config.clone()).expect("relay restarts");
        self.handle = Some(handle);
        self
    }

    /// Restarts on the same UDP port (so clients can reconnect to the address they know).
    pub fn restart_same_port(mut self) -> Self {
        let addr = self.addr();
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
        self.config.listen = addr;
        let handle = RelayHandle::start(self.config.clone()).expect("relay restarts on the same port");
        self.handle = Some(handle);
        self
    }

    /// What the relay refused, dropped or cut so far.
    pub fn counters(&self) -> &overlan_server::counters::Counters {
        self.handle().counters()
    }

    /// The relay's UDP address.
    pub fn addr(&self) -> SocketAddr {
        self.handle().local_addr()
    }

    /// The default network's invite.
    pub fn invite(&self) -> Invite {
        self.handle().info().default_invite.clone().expect("default invite")
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Opens the relay's database (as the `overlan-server` admin commands do).
    pub fn store(&self) -> Store {
        Store::open(self.dir.path()).expect("store opens")
    }

    /// Creates an invite for `network` and returns it.
    pub fn new_invite(&self, network: &str, uses: Option<u32>, expires: Option<Duration>) -> Invite {
        let token = tls::random_token(20);
        self.store().add_invite(network, &token, "issued", uses, expires).expect("invite stored");
        Invite {
            relay: self.addr().to_string(),
            network: network.to_owned(),
            fingerprint: self.handle().info().fingerprint,
            token: Secret::new(token),
        }
    }

    /// An invite with a token the relay never issued.
    pub fn bogus_invite(&self) -> Invite {
        Invite { token: Secret::new("0000deadbeef"), ..self.invite() }
    }
}

/// Relay nodes of one cluster, in-process, each on its own port and data directory,
/// named `n0`, `n1`, … and linked as the test says.
pub struct TestCluster {
    /// The nodes, by index.
    pub nodes: Vec<TestRelay>,
    ca: Arc<TempDir>,
}

impl TestCluster {
    /// Starts `n` nodes; each `(i, j)` in `dials` (with `j < i`) makes node `i` dial
    /// node `j`. Returns once every link is up.
    pub async fn start(n: usize, dials: &[(usize, usize)]) -> Self {
        init_logging();
        let ca = Arc::new(tempfile::tempdir().expect("temp dir"));
        let dir = overlan_shared::cluster::ClusterDir::new(ca.path());
        dir.init().expect("ca init");
        let mut nodes: Vec<TestRelay> = Vec::new();
        for i in 0..n {
            let name = format!("n{i}");
            dir.issue(&name).expect("ca issue");
            let peers = dials.iter().filter(|(a, _)| *a == i).map(|(_, j)| nodes[*j].addr().to_string()).collect();
            let cluster = overlan_server::config::ClusterConfig { dir: ca.path().to_path_buf(), node: name, peers };
            nodes.push(TestRelay::start_with(|c| c.cluster = Some(cluster)));
        }
        let cluster = Self { nodes, ca };
        for &(i, j) in dials {
            cluster.linked(i, j).await;
        }
        cluster
    }

    /// `n0 — n1 — n2`.
    pub async fn line() -> Self {
        Self::start(3, &[(1, 0), (2, 1)]).await
    }

    /// `n0`, `n1`, `n2`, each linked to both others.
    pub async fn triangle() -> Self {
        Self::start(3, &[(1, 0), (2, 1), (2, 0)]).await
    }

    /// Waits until nodes `i` and `j` have a link to each other.
    pub async fn linked(&self, i: usize, j: usize) {
        let (a, b) = (&self.nodes[i], &self.nodes[j]);
        let (na, nb) = (format!("n{i}"), format!("n{j}"));
        within(&format!("link {na} — {nb}"), async {
            while !(a.handle().peer_links().contains(&nb) && b.handle().peer_links().contains(&na)) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }

    /// Another relay process running as node `name` of this cluster (credentials
    /// issued already), dialing node `peer`: a restarted node, or the same credentials
    /// run twice.
    pub fn process_as(&self, name: &str, peer: usize) -> TestRelay {
        let cluster = overlan_server::config::ClusterConfig {
            dir: self.dir().to_path_buf(),
            node: name.to_owned(),
            peers: vec![self.nodes[peer].addr().to_string()],
        };
        TestRelay::start_with(|c| c.cluster = Some(cluster))
    }

    /// The cluster directory (CA and node credentials).
    pub fn dir(&self) -> &Path {
        self.ca.path()
    }

    /// Node `i`'s default invite (pins the cluster CA; names node `i`'s address).
    pub fn invite(&self, i: usize) -> Invite {
        self.nodes[i].invite()
    }
}

/// A fresh client identity (in memory).
pub fn identity() -> Identity {
    Identity::generate(&["overlan-client"]).expect("identity")
}

/// Joins `invite` with a fresh identity.
pub async fn join(invite: &Invite) -> Client {
    join_as(invite, &identity(), "").await
}

/// Joins `invite` as `identity`/`instance`.
pub async fn join_as(invite: &Invite, identity: &Identity, instance: &str) -> Client {
    let options = JoinOptions::new(invite.clone(), identity.clone()).instance(instance);
    within("join", Client::join(options)).await.expect("join succeeds")
}

/// Joins and expects an error.
pub async fn join_err(invite: &Invite, identity: &Identity, instance: &str) -> overlan_client::Error {
    let options = JoinOptions::new(invite.clone(), identity.clone()).instance(instance);
    within("join", Client::join(options)).await.expect_err("join must fail")
}

/// A raw QUIC connection to a relay, for speaking bad protocol on purpose.
pub async fn raw_connect(relay: &TestRelay, identity: Option<&Identity>) -> quinn::Connection {
    let crypto = tls::client_config(identity, relay.invite().fingerprint, ALPN_CLIENT).expect("tls config");
    let quic = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto).expect("quic tls"),
    ));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    endpoint.set_default_client_config(quic);
    let conn = within("raw QUIC handshake", endpoint.connect(relay.addr(), RELAY_SERVER_NAME).expect("connect"))
        .await
        .expect("QUIC handshake");
    conn
}

/// Waits until the relay closes `conn`, returning the close code and reason.
pub async fn close_reason(conn: &quinn::Connection) -> (u64, String) {
    match within("the relay to close the connection", conn.closed()).await {
        quinn::ConnectionError::ApplicationClosed(c) => {
            (c.error_code.into_inner(), String::from_utf8_lossy(&c.reason).into_owned())
        }
        other => panic!("expected an application close, got {other}"),
    }
}

/// Path of a workspace binary (`overlan`, `overlan-server`), built on first use with
/// `cargo build --workspace --tests --bins`: `--tests` makes features resolve as in the
/// suite's own build, so only the two binaries are compiled (`cargo test` alone does not
/// build binaries of packages without integration tests). The
/// first call blocks the calling thread for the build: call it before joining clients
/// on a single-threaded test runtime, or their keep-alives stall.
pub fn bin(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf();
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // The test process carries the variables cargo sets for tests (CARGO_PKG_NAME,
        // CARGO_MANIFEST_DIR, OUT_DIR, …); build scripts such as ring's re-run when those
        // change, which would rebuild half the tree. Hand cargo the caller's environment.
        let for_tests = |key: &str| {
            let keep = ["CARGO_HOME", "CARGO_TARGET_DIR"].contains(&key)
                || ["CARGO_BUILD_", "CARGO_TERM_", "CARGO_NET_", "CARGO_HTTP_", "CARGO_REGISTRIES_", "CARGO_PROFILE_"]
                    .iter()
                    .any(|p| key.starts_with(p));
            !keep
                && (key.starts_with("CARGO")
                    || key.contains("NEXTEST")
                    || ["OUT_DIR", "LD_LIBRARY_PATH"].contains(&key))
        };
        let mut command = std::process::Command::new(cargo);
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(for_tests) {
                command.env_remove(&key);
            }
        }
        let status = command
            .args(["build", "--quiet", "--workspace", "--tests", "--bins"])
            .current_dir(&root)
            .status()
            .expect("running cargo build for the binaries");
        assert!(status.success(), "building the binaries failed");
    });
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    target.join("debug").join(name)
}

/// A child process with its stdout and stderr read line by line.
pub struct Proc {
    /// The child.
    pub child: tokio::process::Child,
    stdout: tokio::sync::mpsc::UnboundedReceiver<String>,
    stderr: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Every stderr line seen so far.
    pub stderr_seen: Vec<String>,
}

impl Proc {
    /// Spawns `cmd` with piped stdio.
    pub fn spawn(mut cmd: tokio::process::Command) -> Self {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn process");
        let stdout = lines(child.stdout.take().expect("stdout"));
        let stderr = lines(child.stderr.take().expect("stderr"));
        Self { child, stdout, stderr, stderr_seen: Vec::new() }
    }

    /// The next stdout line.
    pub async fn stdout_line(&mut self) -> String {
        within("a stdout line", self.stdout.recv())
            .await
            .unwrap_or_else(|| panic!("stdout ended; stderr: {:?}", self.stderr_seen))
    }

    /// Waits for a stderr line containing `needle` and returns it.
    pub async fn stderr_until(&mut self, needle: &str) -> String {
        loop {
            let line = within(&format!("stderr line with {needle:?}"), self.stderr.recv())
                .await
                .unwrap_or_else(|| panic!("stderr ended before {needle:?}; seen: {:?}", self.stderr_seen));
            self.stderr_seen.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// Writes to stdin.
    pub async fn write_stdin(&mut self, data: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let stdin = self.child.stdin.as_mut().expect("stdin open");
        stdin.write_all(data).await.expect("write stdin");
        stdin.flush().await.expect("flush stdin");
    }

    /// Closes stdin.
    pub fn close_stdin(&mut self) {
        self.child.stdin.take();
    }

    /// Waits for exit; returns the exit code and the rest of stderr.
    ///
    /// Closes the child's stdin first (tokio's `Child::wait` does): a test that needs
    /// stdin open to the end (a stream `nc` that must not see EOF and half-close) takes
    /// `child.stdin` and holds it.
    pub async fn wait(&mut self) -> (i32, Vec<String>) {
        let status = within("process exit", self.child.wait()).await.expect("wait");
        while let Ok(line) = self.stderr.try_recv() {
            self.stderr_seen.push(line);
        }
        // Give the reader a moment to deliver the last lines.
        while let Ok(Some(line)) = tokio::time::timeout(Duration::from_millis(200), self.stderr.recv()).await {
            self.stderr_seen.push(line);
        }
        (status.code().unwrap_or(-1), self.stderr_seen.clone())
    }

    /// All remaining stdout lines until the stream ends.
    pub async fn stdout_rest(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(line) = within("stdout to end", self.stdout.recv()).await {
            out.push(line);
        }
        out
    }
}

fn lines(reader: impl tokio::io::AsyncRead + Unpin + Send + 'static) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// An `overlan` CLI command joined to `invite` with its own identity file in `dir`.
pub fn overlan_cmd(invite: &Invite, dir: &Path, identity_name: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(bin("overlan"));
    // No config file of the machine's user leaks in: the default one is looked for
    // under XDG_CONFIG_HOME.
    cmd.env("OVERLAN_INVITE", invite.to_string())
        .env_remove("OVERLAN_NAME")
        .env_remove("OVERLAN_CONFIG")
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .arg("--identity")
        .arg(dir.join(format!("{identity_name}.pem")));
    cmd
}

/// A session spoken by hand (raw QUIC and control frames), for sending what the client
/// library never would.
pub struct RawSession {
    /// The QUIC connection.
    pub conn: quinn::Connection,
    control: quinn::SendStream,
    frames: tokio_util::codec::FramedRead<quinn::RecvStream, ClientSideCodec>,
    /// The VIP from the welcome.
    pub vip: std::net::Ipv4Addr,
}

impl RawSession {
    /// Connects with a fresh identity, says hello with `invite`'s token, reads the welcome.
    pub async fn join(relay: &TestRelay, invite: &Invite) -> Self {
        let conn = raw_connect(relay, Some(&identity())).await;
        let (control, recv) = conn.open_bi().await.expect("control stream");
        let frames = tokio_util::codec::FramedRead::new(recv, ClientSideCodec::new(DEFAULT_MAX_CONTROL_FRAME));
        let mut me = Self { conn, control, frames, vip: std::net::Ipv4Addr::UNSPECIFIED };
        me.send(&ClientMessage::Hello {
            protocol: PROTOCOL_VERSION,
            token: invite.token.clone(),
            instance: String::new(),
            lease: None,
            network: None,
            tun: false,
            existing_only: false,
        })
        .await;
        match me.next().await {
            RelayMessage::Welcome { vip, .. } => me.vip = vip,
            other => panic!("expected welcome, got {other:?}"),
        }
        me
    }

    /// Sends one control message.
    pub async fn send(&mut self, msg: &ClientMessage) {
        let mut buf = bytes::BytesMut::new();
        ClientSideCodec::new(DEFAULT_MAX_CONTROL_FRAME).encode_into(msg, &mut buf).expect("encode");
        self.send_raw(&buf).await;
    }

    /// Writes raw bytes on the control stream.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.control.write_all(bytes).await.expect("control write");
    }

    /// The next control message from the relay.
    pub async fn next(&mut self) -> RelayMessage {
        use futures_util::StreamExt;
        within("a control message", self.frames.next()).await.expect("control stream open").expect("valid frame")
    }

    /// Skips messages until an `Error` notice arrives; returns its code and message.
    pub async fn next_error(&mut self) -> (overlan_shared::ErrorCode, String) {
        loop {
            if let RelayMessage::Error { code, message } = self.next().await {
                return (code, message);
            }
        }
    }
}

/// Sends `line` with `overlan nc` from a fresh process made by `make` until one exits 0
/// (in a cluster a listener may not be registered yet, its route still on its way, or
/// moving after a failover), within [`EVENT_TIMEOUT`].
pub async fn send_until_delivered(mut make: impl FnMut() -> tokio::process::Command, line: &[u8]) {
    within("a stream delivered", async {
        loop {
            let mut sender = Proc::spawn(make());
            sender.write_stdin(line).await;
            sender.close_stdin();
            let (code, err) = sender.wait().await;
            if code == 0 {
                return;
            }
            tracing::debug!(code, ?err, "sender failed; retrying");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}
