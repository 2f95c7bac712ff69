//! `overlan nc` as a user runs it, with slow consumers and signals: exit 0 means every
//! byte of stdin reached the relay (and so the peer) and everything received was
//! written out; SIGINT and SIGTERM end it at any stage with 130 and 143.

use std::process::Stdio;
use std::time::{Duration, Instant};

use overlan_integration_tests::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(11) as u8).collect()
}

/// Sends `sig` once the process has installed its handler for it (its caught-signal
/// mask in /proc says so), so a slow start is not mistaken for an ignored signal.
async fn signal(child: &tokio::process::Child, sig: &str) {
    let number = match sig {
        "INT" => 2,
        "TERM" => 15,
        other => panic!("no signal number for {other}"),
    };
    let pid = child.id().expect("running");
    within(&format!("the process to handle SIG{sig}"), async {
        loop {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let caught = status
                .lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))
                .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
                .unwrap_or(0);
            if caught & (1 << (number - 1)) != 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let pid = pid.to_string();
    let status = std::process::Command::new("kill").args([&format!("-{sig}"), &pid]).status().expect("kill");
    assert!(status.success());
}

/// An `overlan nc` process whose stdout the test reads itself (slowly), with stderr
/// lines collected, and stdin from `input` (a file) or empty.
struct Nc {
    child: tokio::process::Child,
    stderr: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Nc {
    fn spawn(
        relay: &TestRelay,
        dir: &std::path::Path,
        name: &str,
        args: &[&str],
        input: Option<&std::path::Path>,
    ) -> Self {
        let mut cmd = overlan_cmd(&relay.invite(), dir, name);
        cmd.arg("nc").args(args);
        cmd.stdin(match input {
            Some(path) => Stdio::from(std::fs::File::open(path).expect("input file")),
            None => Stdio::null(),
        });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn overlan nc");
        let (tx, stderr) = tokio::sync::mpsc::unbounded_channel();
        let err = child.stderr.take().expect("stderr");
        tokio::spawn(async move {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line);
            }
        });
        Self { child, stderr }
    }

    async fn stderr_until(&mut self, needle: &str) -> String {
        loop {
            let line = within(&format!("stderr line with {needle:?}"), self.stderr.recv())
                .await
                .unwrap_or_else(|| panic!("stderr ended before {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// Reads stdout to its end slowly: waits first, then pauses after every 256 KiB.
    async fn read_stdout_slowly(&mut self) -> Vec<u8> {
        let mut out = self.child.stdout.take().expect("stdout");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = within("stdout", out.read(&mut buf)).await.expect("read stdout");
            if n == 0 {
                return got;
            }
            got.extend_from_slice(&buf[..n]);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn exit_code(&mut self) -> i32 {
        within("process exit", self.child.wait()).await.expect("wait").code().unwrap_or(-1)
    }
}

async fn transfer_to_a_slow_reader(listener_sends: bool) {
    bin("overlan");
    let relay = TestRelay::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("input");
    let data = pattern(12 << 20);
    std::fs::write(&file, &data).unwrap();
    let listener_input = listener_sends.then_some(file.as_path());
    let mut listener = Nc::spawn(&relay, dir.path(), "listener", &["-l", "7000"], listener_input);
    let line = listener.stderr_until("listening on").await;
    let addr = line.rsplit(' ').next().unwrap().to_owned();
    let (vip, port) = addr.split_once(':').unwrap();
    let connector_input = (!listener_sends).then_some(file.as_path());
    let connector = Nc::spawn(&relay, dir.path(), "connector", &[vip, port], connector_input);
    let (mut sender, mut receiver) = if listener_sends { (listener, connector) } else { (connector, listener) };

    let reading = tokio::spawn(async move {
        let got = receiver.read_stdout_slowly().await;
        (got, receiver.exit_code().await)
    });
    let code = sender.exit_code().await;
    assert_eq!(code, 0, "the sender succeeded");
    assert!(!reading.is_finished(), "the scenario: the sender exits while the receiver is still reading");
    let (got, code) = within("the slow receiver", reading).await.unwrap();
    assert_eq!(got.len(), data.len(), "every byte of the file arrives after the sender exited 0");
    assert!(got == data, "bytes changed in transit");
    assert_eq!(code, 0, "the receiver succeeded");
}

#[tokio::test]
async fn a_file_reaches_a_slow_reader_after_the_sending_nc_exits() {
    transfer_to_a_slow_reader(false).await;
}

#[tokio::test]
async fn a_listening_nc_that_sends_a_file_and_exits_reaches_a_slow_connector() {
    transfer_to_a_slow_reader(true).await;
}

#[tokio::test]
async fn signals_end_nc_at_every_stage_with_the_conventional_status() {
    bin("overlan");
    let relay = TestRelay::start();
    let dir = tempfile::tempdir().unwrap();

    // Listening, nobody connected yet: SIGTERM → 143.
    let mut waiting = Nc::spawn(&relay, dir.path(), "waiting", &["-l", "7100"], None);
    waiting.stderr_until("listening on").await;
    signal(&waiting.child, "TERM").await;
    assert_eq!(waiting.exit_code().await, 143);

    // Connected, mid-transfer (stdin never ends): SIGINT → 130, and the peer sees an
    // error, not a clean end that would pass for a complete transfer.
    let peer = join(&relay.invite()).await;
    let listener = peer.listen(7101).await.unwrap();
    let mut cmd = overlan_cmd(&relay.invite(), dir.path(), "talker");
    cmd.args(["nc", &peer.vip().to_string(), "7101"]);
    let mut talker = Proc::spawn(cmd);
    let (mut stream, _) = within("accept", listener.accept()).await.unwrap();
    talker.write_stdin(b"some bytes\n").await;
    let mut buf = [0u8; 11];
    within("the first bytes", stream.read_exact(&mut buf)).await.unwrap();
    // Held: `wait` would close stdin, and an nc that reads EOF before the signal
    // rightly half-closes its direction.
    let _stdin = talker.child.stdin.take();
    signal(&talker.child, "INT").await;
    let (code, _) = talker.wait().await;
    assert_eq!(code, 130);
    let mut rest = Vec::new();
    let err = within("the peer's read", stream.read_to_end(&mut rest)).await.unwrap_err();
    assert!(err.to_string().contains("aborted"), "{err}");

    // Datagram mode, no Enter pressed: SIGINT → 130 at once.
    let mut cmd = overlan_cmd(&relay.invite(), dir.path(), "udp");
    cmd.args(["nc", "-u", "-l", "7102"]);
    let mut udp = Proc::spawn(cmd);
    udp.stderr_until("bound").await;
    signal(&udp.child, "INT").await;
    assert_eq!(udp.wait().await.0, 130);

    // Joining a relay that is not running: SIGINT ends the wait at once.
    let dead = {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap()
    };
    let mut invite = relay.invite();
    invite.relay = dead.to_string();
    let mut cmd = overlan_cmd(&invite, dir.path(), "nowhere");
    cmd.args(["nc", "10.77.0.2", "7000"]);
    let mut nowhere = Proc::spawn(cmd);
    // Well into the wait (and past start-up, where the signal handlers are set).
    nowhere.stderr_until("no answer from relay").await;
    signal(&nowhere.child, "INT").await;
    let sent = Instant::now();
    assert_eq!(nowhere.wait().await.0, 130);
    assert!(sent.elapsed() < Duration::from_secs(3), "took {:?} to obey Ctrl-C", sent.elapsed());
}

/// A relay, the running `up` of instance "me", and a member to talk to: commands of the
/// instance ([`ThroughUp::cmd`]) go through that `up`.
struct ThroughUp {
    relay: TestRelay,
    dir: tempfile::TempDir,
    peer: overlan_client::Client,
}

impl ThroughUp {
    async fn start() -> (Self, Proc) {
        bin("overlan");
        let relay = TestRelay::start();
        let dir = tempfile::tempdir().unwrap();
        let peer = join(&relay.invite()).await;
        let me = Self { relay, dir, peer };
        let mut up = Proc::spawn(me.cmd(&["up"]));
        let _ = up.stdout_line().await;
        up.stderr_until("joined network").await;
        (me, up)
    }

    fn cmd(&self, args: &[&str]) -> tokio::process::Command {
        let mut c = overlan_cmd(&self.relay.invite(), self.dir.path(), "me");
        c.env("XDG_RUNTIME_DIR", self.dir.path().join("run")).args(args);
        c
    }
}

#[tokio::test]
async fn a_signal_aborts_a_stream_running_through_up_and_up_lives_on() {
    let (t, mut up) = ThroughUp::start().await;
    let (cmd, peer) = (|args: &[&str]| t.cmd(args), &t.peer);
    let listener = peer.listen(7103).await.unwrap();
    let mut talker = Proc::spawn(cmd(&["nc", &peer.vip().to_string(), "7103"]));
    let (mut stream, _) = within("accept", listener.accept()).await.unwrap();
    talker.write_stdin(b"some bytes\n").await;
    let mut buf = [0u8; 11];
    within("the first bytes", stream.read_exact(&mut buf)).await.unwrap();
    let _stdin = talker.child.stdin.take(); // held open: see the test above
    signal(&talker.child, "INT").await;
    assert_eq!(talker.wait().await.0, 130);
    let mut rest = Vec::new();
    let err = within("the peer's read", stream.read_to_end(&mut rest)).await.unwrap_err();
    assert!(err.to_string().contains("aborted"), "{err}");
    assert!(up.child.try_wait().unwrap().is_none(), "up still runs");
}

#[tokio::test]
async fn up_stopped_under_a_stream_it_carries_aborts_it() {
    let (t, mut up) = ThroughUp::start().await;
    let (cmd, peer) = (|args: &[&str]| t.cmd(args), &t.peer);
    let listener = peer.listen(7106).await.unwrap();
    let mut talker = Proc::spawn(cmd(&["nc", &peer.vip().to_string(), "7106"]));
    let (mut stream, _) = within("accept", listener.accept()).await.unwrap();
    talker.write_stdin(b"some bytes\n").await;
    let mut buf = [0u8; 11];
    within("the first bytes", stream.read_exact(&mut buf)).await.unwrap();
    // stdin held open: the transfer is not over. The session that carries the stream
    // stops: the peer sees an error, not a clean end of a transfer that was cut short,
    // and the nc fails.
    let _stdin = talker.child.stdin.take();
    signal(&up.child, "TERM").await;
    assert_eq!(up.wait().await.0, 0);
    let mut rest = Vec::new();
    let err = within("the peer's read", stream.read_to_end(&mut rest)).await.unwrap_err();
    assert!(err.to_string().contains("aborted"), "{err}");
    let code = within("the nc ends", talker.child.wait()).await.unwrap().code();
    assert!(code.is_some_and(|c| c != 0), "{code:?}");
}

/// A peer that aborts a stream an `nc` sends through `up`: the nc says so (the reason
/// `up` sends before it closes the command's connection), never a bare "Broken pipe"
/// from writing to the connection `up` closed. The race showed in about one try of five.
#[tokio::test]
async fn an_abort_under_an_nc_sending_through_up_is_said_as_such() {
    let (t, mut up) = ThroughUp::start().await;
    let (cmd, peer) = (|args: &[&str]| t.cmd(args), &t.peer);
    for round in 0..8u16 {
        let port = 7110 + round;
        let listener = peer.listen(port).await.unwrap();
        let mut talker = cmd(&["nc", &peer.vip().to_string(), &port.to_string()]);
        talker.stdin(Stdio::from(std::fs::File::open("/dev/zero").unwrap()));
        talker.stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true);
        let talker = talker.spawn().unwrap();
        let (mut stream, _) = within("accept", listener.accept()).await.unwrap();
        let mut buf = vec![0u8; 1 << 20];
        within("the first bytes", stream.read_exact(&mut buf)).await.unwrap();
        stream.abort();
        let out = within("the nc ends", talker.wait_with_output()).await.unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "round {round}: {err}");
        assert!(err.contains("aborted by the peer"), "round {round}: {err}");
    }
    assert!(up.child.try_wait().unwrap().is_none(), "up still runs");
}

#[tokio::test]
async fn after_a_relay_restart_a_connected_nc_ends_at_once_and_a_listening_one_says_it_reconnected() {
    bin("overlan");
    let mut relay = TestRelay::start();
    let dir = tempfile::tempdir().unwrap();
    // A waiting listener, and a connected stream whose stdin stays open.
    let mut cmd = overlan_cmd(&relay.invite(), dir.path(), "waiting");
    cmd.args(["nc", "-l", "7104"]);
    let mut waiting = Proc::spawn(cmd);
    waiting.stderr_until("listening on").await;
    let peer = join(&relay.invite()).await;
    let listener = peer.listen(7105).await.unwrap();
    let mut cmd = overlan_cmd(&relay.invite(), dir.path(), "talker");
    cmd.args(["nc", &peer.vip().to_string(), "7105"]);
    let mut talker = Proc::spawn(cmd);
    let (_stream, _) = within("accept", listener.accept()).await.unwrap();
    // One whose peer has finished already: only its stdin is left, and it stays open.
    let mut cmd = overlan_cmd(&relay.invite(), dir.path(), "finished");
    cmd.args(["nc", &peer.vip().to_string(), "7105"]);
    let mut finished = Proc::spawn(cmd);
    let (mut done, _) = within("accept", listener.accept()).await.unwrap();
    tokio::io::AsyncWriteExt::shutdown(&mut done).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    relay = relay.restart_same_port();
    let stopped = Instant::now();
    for nc in [&mut talker, &mut finished] {
        // Not `wait`: it closes stdin, which would end the waiting one by itself.
        let code = within("the cut nc ends", async {
            loop {
                if let Some(status) = nc.child.try_wait().unwrap() {
                    return status.code();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(code.is_some_and(|c| c != 0), "a cut stream is not a success: {code:?}");
        assert!(stopped.elapsed() < Duration::from_secs(5), "ended {:?} after the restart", stopped.elapsed());
    }
    let (_, stderr) = talker.wait().await;
    assert!(stderr.iter().any(|l| l.starts_with("overlan: ")), "{stderr:?}");
    let (_, stderr) = finished.wait().await;
    assert!(stderr.iter().any(|l| l.contains("session lost")), "{stderr:?}");
    waiting.stderr_until("session lost").await;
    waiting.stderr_until("reconnected as").await;
    drop(relay);
}

/// A failed nc aborts its own direction too: the peer reads an error, never a clean
/// end. (nc's stdin stays open throughout: an nc whose stdin ended has rightly sent a
/// FIN already, and `Proc::wait` closes stdin, as tokio's `Child::wait` does.)
#[tokio::test]
async fn an_nc_that_fails_aborts_its_stream_so_the_peer_never_sees_a_clean_end() {
    bin("overlan");
    let relay = TestRelay::start();
    let dir = tempfile::tempdir().unwrap();
    // stdin stays open: nc has not finished sending when its transfer fails.
    let mut listening = Proc::spawn({
        let mut c = overlan_cmd(&relay.invite(), dir.path(), "listening");
        c.args(["--log", "overlan_client=debug", "nc", "-l", "7104"]);
        c
    });
    let line = listening.stderr_until("listening on").await;
    let addr: std::net::SocketAddrV4 = line.rsplit(' ').next().unwrap().parse().unwrap();
    let peer = join(&relay.invite()).await;
    let stream = within("connect", peer.connect(addr)).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    {
        use tokio::io::AsyncWriteExt;
        write.write_all(b"partial\n").await.unwrap();
    }
    assert_eq!(listening.stdout_line().await, "partial");
    // The peer aborts its sending direction: nc's transfer fails (exit 1), and nc's own
    // direction toward the peer must end with an error too, not a clean end.
    write.abort();
    // `wait` would close nc's stdin (tokio does, before waiting); held here, stdin stays open.
    let _stdin = listening.child.stdin.take();
    let (code, said) = listening.wait().await;
    assert_eq!(code, 1, "{said:?}");
    let mut rest = Vec::new();
    let read = within("the peer's read", read.read_to_end(&mut rest)).await;
    assert!(read.as_ref().is_err_and(|e| e.to_string().contains("aborted")), "{read:?}; nc said {said:#?}");
}
