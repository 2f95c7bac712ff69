//! `overlan forward` and `overlan expose` as processes, with programs that know nothing
//! of overlan on both ends: python's http.server and curl; a TCP service that answers
//! only after the client's half-close, under many connections at once; a UDP service
//! that tells each flow apart; refused, unreachable and dead targets; forwards run by
//! the running `up` (asked by the command, or listed in its config file).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use overlan_integration_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// `overlan ARGS` as identity `name`, control sockets under `dir/run`.
fn cmd(relay: &TestRelay, dir: &std::path::Path, name: &str, args: &[&str]) -> tokio::process::Command {
    let mut c = overlan_cmd(&relay.invite(), dir, name);
    c.env("XDG_RUNTIME_DIR", dir.join("run")).args(args);
    c
}

/// Starts a forward or expose and returns it with the line it printed
/// (`forward LOCAL -> TARGET tcp`).
async fn start(command: tokio::process::Command) -> (Proc, String) {
    let mut p = Proc::spawn(command);
    let line = p.stdout_line().await;
    (p, line)
}

/// The local address a `forward` line names.
fn forwarded(line: &str) -> SocketAddr {
    line.strip_prefix("forward ")
        .and_then(|l| l.split(' ').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{line}"))
}

/// A TCP service that reads until the client's half-close, then answers with the
/// reversed bytes and closes: only a carried half-close gets an answer.
async fn reverse_after_eof() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut data = Vec::new();
                if tcp.read_to_end(&mut data).await.is_ok() {
                    data.reverse();
                    let _ = tcp.write_all(&data).await;
                    let _ = tcp.shutdown().await;
                }
            });
        }
    });
    addr
}

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_mul(2_654_435_761) ^ seed).rotate_left(7) as u8).collect()
}

fn tools_present(tools: &[&str]) {
    for tool in tools {
        let found = std::process::Command::new("sh").args(["-c", &format!("command -v {tool}")]).output();
        assert!(found.is_ok_and(|o| o.status.success()), "`{tool}` is needed for this test; .ci/run installs it");
    }
}

#[tokio::test]
async fn http_between_python_and_curl_through_expose_and_forward() {
    tools_present(&["python3", "curl"]);
    bin("overlan");
    let relay = TestRelay::start();
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let body: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(www.join("big.txt"), &body).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = tokio::process::Command::new("python3");
    server.args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1"]).current_dir(&www);
    let _server = Proc::spawn(server);
    within("http.server listens", async {
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let (_expose, line) =
        start(cmd(&relay, dir.path(), "web", &["--name", "web", "expose", "80", &port.to_string()])).await;
    assert!(line.starts_with("expose 10.77.") && line.ends_with(&format!(":80 -> 127.0.0.1:{port} tcp")), "{line}");
    let (_forward, line) = start(cmd(&relay, dir.path(), "me", &["forward", "127.0.0.1:0", "web:80"])).await;
    let local = forwarded(&line);
    let out =
        within("curl", tokio::process::Command::new("curl").arg("-sS").arg(format!("http://{local}/big.txt")).output())
            .await
            .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout == body.as_bytes(), "curl got {} bytes, not the file", out.stdout.len());
}

#[tokio::test]
async fn many_connections_at_once_carry_half_closes_both_ways() {
    bin("overlan");
    let relay = TestRelay::start();
    let dir = tempfile::tempdir().unwrap();
    let service = reverse_after_eof().await;
    let (_expose, _) =
        start(cmd(&relay, dir.path(), "svc", &["--name", "svc", "expose", "7000", &service.to_string()])).await;
    let (_forward, line) = start(cmd(&relay, dir.path(), "me", &["forward", "0", "svc:7000"])).await;
    let local = forwarded(&line);
    let mut clients = Vec::new();
    for seed in 0..24u32 {
        clients.push(tokio::spawn(async move {
            let data = pattern(seed, 150_000 + seed as usize * 1000);
            let mut tcp = TcpStream::connect(local).await.unwrap();
            tcp.write_all(&data).await.unwrap();
            tcp.shutdown().await.unwrap();
            let mut back = Vec::new();
            tcp.read_to_end(&mut back).await.unwrap();
            back.reverse();
            assert!(back == data, "connection {seed}: {} bytes back of {}", back.len(), data.len());
        }));
    }
    for c in clients {
        within("a connection", c).await.unwrap();
    }
}

#[tokio::test]
async fn a_refused_unreachable_or_dead_target_resets_the_local_connection_at_once() {
    bin("overlan");
    let relay = TestRelay::start();
    let dir = tempfile::tempdir().unwrap();
    let member = join(&relay.invite()).await; // online, nothing listening
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap(); // closed on drop
    let (_expose, line) =
        start(cmd(&relay, dir.path(), "svc", &["--name", "svc", "expose", "7001", &dead.to_string()])).await;
    let exposed = line.split(' ').nth(1).unwrap().to_owned();
    for (target, says) in [
        (format!("{}:9", member.vip()), "refused (nothing listening)"),
        ("10.77.200.1:9".to_owned(), "unreachable (no session has that VIP)"),
        (exposed, "denied by the peer"),
    ] {
        let (mut forward, line) = start(cmd(&relay, dir.path(), "me", &["forward", "0", &target])).await;
        let mut tcp = TcpStream::connect(forwarded(&line)).await.unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 16];
        let read = within("the local connection ends", tcp.read(&mut buf)).await;
        assert!(matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset), "{target}: {read:?}");
        assert!(started.elapsed() < Duration::from_secs(3), "{target}: took {:?}", started.elapsed());
        let logged = forward.stderr_until(says).await;
        assert!(logged.starts_with("overlan: connection from 127.0.0.1:"), "{logged}");
    }
    // The expose said why it denied.
    let mut expose = _expose;
    let logged = expose.stderr_until("denied").await;
    assert!(logged.contains(&format!("{dead}: ")) && logged.contains("refused"), "{logged}");
}

/// A UDP service that answers each datagram with `PAYLOAD from PORT`, PORT being the
/// source port it saw.
async fn udp_echo_with_source() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let answer = format!("{} from {}", String::from_utf8_lossy(&buf[..n]), from.port());
            let _ = socket.send_to(answer.as_bytes(), from).await;
        }
    });
    addr
}

async fn ask_udp(socket: &UdpSocket, to: SocketAddr, what: &str) -> (String, u16) {
    within("a UDP answer", async {
        loop {
            socket.send_to(what.as_bytes(), to).await.unwrap();
            let mut buf = [0u8; 2048];
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), socket.recv(&mut buf)).await {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let (payload, port) = text.rsplit_once(" from ").expect("answer format");
                return (payload.to_owned(), port.parse().unwrap());
            }
        }
    })
    .await
}

#[tokio::test]
async fn udp_keeps_a_flow_per_source_and_forgets_idle_ones() {
    bin("overlan");
    let relay = TestRelay::start();
    let dir = tempfile::tempdir().unwrap();
    let service = udp_echo_with_source().await;
    let (_expose, line) = start(cmd(
        &relay,
        dir.path(),
        "svc",
        &["--name", "svc", "expose", "--udp", "--idle", "1", "5353", &service.to_string()],
    ))
    .await;
    assert!(line.ends_with(&format!(":5353 -> {service} udp")), "{line}");
    let (_forward, line) =
        start(cmd(&relay, dir.path(), "me", &["forward", "--udp", "--idle", "1", "127.0.0.1:0", "svc:5353"])).await;
    assert!(line.ends_with(" udp"), "{line}");
    let local = forwarded(&line);
    let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (answer_a, port_a) = ask_udp(&a, local, "from a").await;
    let (answer_b, port_b) = ask_udp(&b, local, "from b").await;
    assert_eq!((answer_a.as_str(), answer_b.as_str()), ("from a", "from b"), "each source gets its own answers");
    assert_ne!(port_a, port_b, "two sources are two flows at the service");
    assert_eq!(ask_udp(&a, local, "again").await, ("again".to_owned(), port_a), "a live flow is kept");
    // Idle for longer than --idle: the flow is gone, the next datagram makes a new one.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, port_again) = ask_udp(&a, local, "later").await;
    assert_ne!(port_again, port_a, "an idle flow expires");
}

#[tokio::test]
async fn forwards_run_in_the_running_up_when_asked_or_listed_in_its_config() {
    bin("overlan");
    let relay = TestRelay::start();
    let dir = tempfile::tempdir().unwrap();
    let service = reverse_after_eof().await;
    // svc's `up` exposes the service from its config file.
    let config = dir.path().join("svc.toml");
    std::fs::write(&config, format!("name = \"svc\"\n[[expose]]\nport = 7002\ntarget = \"{service}\"\n")).unwrap();
    let mut svc_up = Proc::spawn(cmd(&relay, dir.path(), "svc", &["--config", config.to_str().unwrap(), "up"]));
    let vip = svc_up.stdout_line().await;
    assert_eq!(
        svc_up.stdout_line().await,
        format!("expose {}:7002 -> {service} tcp", vip.strip_prefix("vip ").unwrap())
    );
    // My `up` runs; `forward` goes through it (one session: up's status counts the stream).
    let mut my_up = Proc::spawn(cmd(&relay, dir.path(), "me", &["up"]));
    my_up.stdout_line().await;
    let (mut forward, line) = start(cmd(&relay, dir.path(), "me", &["forward", "0", "svc:7002"])).await;
    let local = forwarded(&line);
    let mut tcp = TcpStream::connect(local).await.unwrap();
    tcp.write_all(b"abc").await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut back = Vec::new();
    within("the answer", tcp.read_to_end(&mut back)).await.unwrap();
    assert_eq!(back, b"cba");
    let (code, out, _) = {
        let out = cmd(&relay, dir.path(), "me", &["status", "--json"]).output().await.unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), ())
    };
    assert_eq!(code, Some(0));
    assert!(out.contains("\"state\":\"up\""), "{out}");
    // Ctrl-C on the forward: up gives the local port back, and up itself goes on.
    let pid = forward.child.id().unwrap().to_string();
    std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert_eq!(forward.wait().await.0, 130);
    within("the port is given back", async {
        while TcpStream::connect(local).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(my_up.child.try_wait().unwrap().is_none(), "up still runs");
    assert!(svc_up.child.try_wait().unwrap().is_none(), "svc's up still runs");
}

#[tokio::test]
async fn a_slow_reader_behind_a_forward_gets_every_byte() {
    bin("overlan");
    let relay = TestRelay::start();
    let dir = tempfile::tempdir().unwrap();
    // A service that sends 12 MB at once and closes.
    let data = pattern(99, 12 << 20);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service = listener.local_addr().unwrap();
    tokio::spawn({
        let data = data.clone();
        async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tcp.write_all(&data).await.unwrap();
            tcp.shutdown().await.unwrap();
        }
    });
    let (_expose, _) =
        start(cmd(&relay, dir.path(), "svc", &["--name", "svc", "expose", "7003", &service.to_string()])).await;
    let (_forward, line) = start(cmd(&relay, dir.path(), "me", &["forward", "0", "svc:7003"])).await;
    let mut tcp = TcpStream::connect(forwarded(&line)).await.unwrap();
    // The reader does not read for a while, then reads in small bites.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut got = Vec::with_capacity(data.len());
    let mut bite = [0u8; 4096];
    within("the slow read", async {
        loop {
            let n = tcp.read(&mut bite).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&bite[..n]);
        }
    })
    .await;
    assert!(got == data, "{} bytes of {}", got.len(), data.len());
}

/// A service that sends without end, a little at a time.
async fn endless_service() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let chunk = pattern(7, 16 << 10);
                while tcp.write_all(&chunk).await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_forward_or_expose_stopped_mid_transfer_resets_the_connection() {
    bin("overlan");
    let relay = TestRelay::start();
    let dir = tempfile::tempdir().unwrap();
    let service = endless_service().await;
    // The forward alone, the expose, and the instance's `up` running the forward for
    // the command.
    for stopped in ["forward", "expose", "up"] {
        let (expose, _) =
            start(cmd(&relay, dir.path(), "svc", &["--name", "svc", "expose", "7005", &service.to_string()])).await;
        let mut up = (stopped == "up").then(|| Proc::spawn(cmd(&relay, dir.path(), "me", &["--name", "u", "up"])));
        if let Some(up) = &mut up {
            within("up", up.stdout_line()).await;
        }
        let name = if stopped == "up" { "u" } else { "" };
        let (forward, line) = start(cmd(&relay, dir.path(), "me", &["--name", name, "forward", "0", "svc:7005"])).await;
        let mut tcp = TcpStream::connect(forwarded(&line)).await.unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0;
        while got < 256 << 10 {
            got += within("data flows", tcp.read(&mut buf)).await.unwrap();
        }
        let (mut victim, mut other) = match stopped {
            "forward" => (forward, expose),
            "expose" => (expose, forward),
            _ => (up.take().expect("started"), forward),
        };
        let pid = victim.child.id().unwrap().to_string();
        std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        // The reader sees a failure, never a clean end that would pass for a complete
        // transfer.
        let end = within("the end of the connection", async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => continue,
                    Err(e) => return Err(e),
                }
            }
        })
        .await;
        let e = end.expect_err(&format!("{stopped} stopped: the reader saw a clean end"));
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{stopped} stopped: {e}");
        let _ = within("the stopped command ends", victim.child.wait()).await;
        let _ = other.child.kill().await;
    }
}

#[tokio::test]
async fn a_port_in_use_replaces_no_session_and_a_replaced_forward_ends_with_status_3() {
    bin("overlan");
    let relay = TestRelay::start();
    let dir = tempfile::tempdir().unwrap();
    let service = reverse_after_eof().await;
    let (_expose, _) =
        start(cmd(&relay, dir.path(), "svc", &["--name", "svc", "expose", "7006", &service.to_string()])).await;
    let (mut forward, line) = start(cmd(&relay, dir.path(), "me", &["forward", "0", "svc:7006"])).await;
    let local = forwarded(&line);
    // The same forward again: its port is taken, so it ends at once, before joining
    // (which would have replaced the first one's session).
    let mut again = Proc::spawn(cmd(&relay, dir.path(), "me", &["forward", &local.to_string(), "svc:7006"]));
    let (code, err) = again.wait().await;
    assert_eq!(code, 1, "{err:?}");
    assert!(err.iter().any(|l| l.contains("in use")), "{err:?}");
    let mut tcp = TcpStream::connect(local).await.unwrap();
    tcp.write_all(b"first").await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut back = Vec::new();
    within("the first forward still works", tcp.read_to_end(&mut back)).await.unwrap();
    assert_eq!(back, b"tsrif");
    // A command of the instance that joins on its own (no `up` runs) replaces the
    // forward's session: the forward says so and ends with 3, not carrying on dead.
    let mut ip = Proc::spawn(cmd(&relay, dir.path(), "me", &["ip"]));
    assert_eq!(ip.wait().await.0, 0);
    let (code, err) = within("the replaced forward ends", forward.wait()).await;
    assert_eq!(code, 3, "{err:?}");
    assert!(err.iter().any(|l| l.contains("replaced")), "{err:?}");
    // An expose too, whose listener closes with its session.
    let (mut expose, _) =
        start(cmd(&relay, dir.path(), "ex", &["--name", "ex", "expose", "7007", &service.to_string()])).await;
    let mut ip = Proc::spawn(cmd(&relay, dir.path(), "ex", &["--name", "ex", "ip"]));
    assert_eq!(ip.wait().await.0, 0);
    let (code, err) = within("the replaced expose ends", expose.wait()).await;
    assert_eq!(code, 3, "{err:?}");
    assert!(err.iter().any(|l| l.contains("replaced")), "{err:?}");
}

#[tokio::test]
async fn forward_and_expose_outlive_a_relay_restart_and_say_so() {
    bin("overlan");
    let relay = TestRelay::start();
    let dir = tempfile::tempdir().unwrap();
    let service = reverse_after_eof().await;
    let (mut expose, _) =
        start(cmd(&relay, dir.path(), "svc", &["--name", "svc", "expose", "7004", &service.to_string()])).await;
    let (mut forward, line) = start(cmd(&relay, dir.path(), "me", &["forward", "0", "svc:7004"])).await;
    let local = forwarded(&line);
    let ask = |what: &'static [u8]| async move {
        let mut tcp = TcpStream::connect(local).await.unwrap();
        tcp.write_all(what).await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut back = Vec::new();
        let _ = tcp.read_to_end(&mut back).await;
        back
    };
    assert_eq!(ask(b"before").await, b"erofeb");
    let _relay = relay.restart_same_port();
    for p in [&mut expose, &mut forward] {
        p.stderr_until("; reconnecting").await;
        p.stderr_until("reconnected as").await;
    }
    // The expose's listener was registered again: a new connection goes through.
    let back = within("a connection after the restart", async {
        loop {
            let back = ask(b"after").await;
            if !back.is_empty() {
                return back;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(back, b"retfa");
}
