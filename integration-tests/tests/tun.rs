//! TUN mode with unmodified programs only, on hosts made of network namespaces: a relay
//! host and client hosts on veth links, three of them running `overlan tun`, one an
//! ordinary client. ping, HTTP (python's http.server and curl), iperf3 over TCP and
//! UDP, a LAN discovery exchange with socat (a broadcast to 255.255.255.255 that every
//! other host answers by unicast), UDP between a TUN host and `overlan nc -u`, and the
//! interface gone after SIGTERM.
//!
//! A `harness = false` test (libtest-mimic): a machine that cannot make namespaces
//! lists it as ignored, so the runner reports it skipped; the programs it runs are
//! installed by .ci/run (a missing one fails the test, saying which).

use std::process::Command;
use std::time::Duration;

use overlan_integration_tests::netns::{run_namespace_tests, start_cluster, Hosts};
use overlan_integration_tests::*;
use overlan_shared::Invite;

fn main() {
    run_namespace_tests(
        vec![
            ("unmodified_programs_talk_across_tun_hosts", || Box::pin(unmodified_programs_talk_across_tun_hosts())),
            ("tun_hosts_behind_two_relay_nodes_talk_and_discover_each_other", || {
                Box::pin(tun_hosts_behind_two_relay_nodes_talk_and_discover_each_other())
            }),
            ("run_shares_its_session_and_leaves_nothing_behind", || {
                Box::pin(run_shares_its_session_and_leaves_nothing_behind())
            }),
        ],
        &["/dev/net/tun"],
    )
}

/// Broadcasts a question to 255.255.255.255:`port` from host `n` (socat, no interface
/// chosen) and gathers the answers; UDP may lose a datagram, so it asks again, as games
/// do, until `want` answers came (at most five rounds).
async fn discover(hosts: &Hosts, n: usize, port: u16, want: usize) -> Vec<String> {
    let mut answers = std::collections::BTreeSet::new();
    for _round in 0..5 {
        let mut asker = Proc::spawn({
            let mut s = hosts.cmd(n, std::path::Path::new("socat"));
            s.args(["-T", "2", "-", &format!("UDP-DATAGRAM:255.255.255.255:{port},broadcast")]);
            s
        });
        asker.write_stdin(b"who is there?\n").await;
        answers.extend(asker.stdout_rest().await);
        if answers.len() >= want {
            break;
        }
    }
    answers.into_iter().collect()
}

fn tools_present(tools: &[&str]) {
    for tool in tools {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output();
        assert!(found.is_ok_and(|o| o.status.success()), "`{tool}` is needed for this test; .ci/run installs it");
    }
}

/// Runs `program ARGS` in host `n` to its end: exit code, stdout, stderr.
async fn run_in(hosts: &Hosts, n: usize, program: &str, args: &[&str]) -> (i32, String, String) {
    let mut c = hosts.cmd(n, std::path::Path::new(program));
    c.args(args).stdin(std::process::Stdio::null());
    let out = within(&format!("{program} {args:?}"), c.output()).await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn unmodified_programs_talk_across_tun_hosts() {
    tools_present(&["ping", "python3", "curl", "iperf3", "socat"]);
    let (server, client) = (bin("overlan-server"), bin("overlan"));
    let dir = tempfile::tempdir().unwrap();
    let hosts = Hosts::star(4);
    let mut relay = Proc::spawn({
        let mut c = hosts.cmd(0, &server);
        c.args(["--listen", "0.0.0.0:7700"]).arg("--data-dir").arg(dir.path().join("relay"));
        c
    });
    let _listen = relay.stdout_line().await;
    let _fingerprint = relay.stdout_line().await;
    let invite: Invite = relay.stdout_line().await.strip_prefix("invite ").unwrap().parse().unwrap();
    let overlan = |n: usize, args: &[&str]| {
        let mut c = hosts.cmd(n, &client);
        let invite = Invite { relay: format!("10.231.{n}.1:7700"), ..invite.clone() };
        c.env("OVERLAN_INVITE", invite.to_string())
            .env("XDG_RUNTIME_DIR", dir.path().join(format!("run{n}")))
            .arg("--identity")
            .arg(dir.path().join(format!("host{n}.pem")))
            .args(args);
        c
    };

    // Hosts 1-3 hold their VIPs on interfaces.
    let mut tuns = Vec::new();
    let mut vips = vec![String::new()];
    for n in 1..=3 {
        let mut tun = Proc::spawn(overlan(n, &["tun", "--dev", "ovl0"]));
        let vip = tun.stdout_line().await.strip_prefix("vip ").expect("vip line").to_owned();
        let said = tun.stderr_until("interface ovl0 holds").await;
        assert!(said.contains(&format!("{vip}/16 (mtu 1112)")), "{said}");
        vips.push(vip);
        tuns.push(tun);
    }
    let (v2, v3) = (vips[2].clone(), vips[3].clone());

    // ping, both ways (exit 0: replies came back; like any IP path, one may be lost).
    let (code, out, err) = run_in(&hosts, 1, "ping", &["-c", "3", "-i", "0.2", "-W", "3", &v2]).await;
    assert_eq!(code, 0, "ping host 2: {out}{err}");
    let (code, out, _) = run_in(&hosts, 3, "ping", &["-c", "2", "-i", "0.2", "-W", "3", &vips[1]]).await;
    assert_eq!(code, 0, "ping host 1: {out}");
    // Sizes: the largest packet the MTU allows crosses whole; a larger one is refused
    // by the kernel at the interface (never dropped silently on the way), and one that
    // may be fragmented crosses in pieces.
    let (code, out, err) =
        run_in(&hosts, 1, "ping", &["-c", "2", "-i", "0.2", "-W", "3", "-M", "do", "-s", "1084", &v2]).await;
    assert_eq!(code, 0, "a 1112-byte ping: {out}{err}");
    let (code, out, err) = run_in(&hosts, 1, "ping", &["-c", "1", "-W", "3", "-M", "do", "-s", "1085", &v2]).await;
    assert_ne!(code, 0, "{out}");
    assert!(format!("{out}{err}").contains("mtu=1112"), "{out}{err}");
    let (code, out, err) = run_in(&hosts, 1, "ping", &["-c", "2", "-i", "0.2", "-W", "3", "-s", "3000", &v2]).await;
    assert_eq!(code, 0, "a fragmented ping: {out}{err}");

    // HTTP between python's server on host 2 and curl on host 1, by VIP.
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let body: String = (0..50_000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(www.join("big.txt"), &body).unwrap();
    let mut http = hosts.cmd(2, std::path::Path::new("python3"));
    http.args(["-m", "http.server", "8000", "--bind", &v2]).current_dir(&www);
    let _http = Proc::spawn(http);
    let url = format!("http://{v2}:8000/big.txt");
    let (code, out, err) =
        run_in(&hosts, 1, "curl", &["-sS", "--retry", "30", "--retry-connrefused", "--retry-delay", "1", &url]).await;
    assert_eq!(code, 0, "curl: {err}");
    assert!(out == body, "curl got {} bytes, not the file", out.len());

    // iperf3, TCP then UDP, host 1 to host 3.
    let mut iperf_server = hosts.cmd(3, std::path::Path::new("iperf3"));
    iperf_server.args(["-s", "--bind", &v3]);
    let _iperf = Proc::spawn(iperf_server);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stat = |n: usize, what: &'static str| {
        let hosts = &hosts;
        async move {
            let path = format!("/sys/class/net/ovl0/statistics/{what}");
            let (code, out, err) = run_in(hosts, n, "cat", &[&path]).await;
            assert_eq!(code, 0, "{path}: {err}");
            out.trim().parse::<u64>().unwrap()
        }
    };
    let (sent_before, sent_bytes_before) = (stat(1, "tx_packets").await, stat(1, "tx_bytes").await);
    let (got_before, got_bytes_before) = (stat(3, "rx_packets").await, stat(3, "rx_bytes").await);
    for udp in [false, true] {
        let mut args = vec!["-c", v3.as_str(), "-t", "2", "--connect-timeout", "5000"];
        if udp {
            args.extend(["-u", "-b", "20M"]);
        }
        let (code, out, err) = run_in(&hosts, 1, "iperf3", &args).await;
        assert_eq!(code, 0, "iperf3 (udp: {udp}): {out}{err}");
        assert!(out.contains("receiver"), "{out}");
        println!(
            "iperf3 udp={udp}: {}",
            out.lines().filter(|l| l.contains("receiver")).collect::<Vec<_>>().join(" | ")
        );
        if !udp {
            // The offloads at work: host 1's kernel handed its interface TCP segments
            // larger than the MTU (cut to it by `overlan tun`), and host 3's took packets
            // of the flow joined into segments larger than the MTU.
            let sent = (stat(1, "tx_packets").await - sent_before, stat(1, "tx_bytes").await - sent_bytes_before);
            let got = (stat(3, "rx_packets").await - got_before, stat(3, "rx_bytes").await - got_bytes_before);
            println!("TCP through ovl0: host 1 sent {sent:?}, host 3 got {got:?} (packets, bytes)");
            assert!(sent.1 / sent.0.max(1) > 2 * 1112, "no segments above the MTU were read: {sent:?}");
            assert!(got.1 / got.0.max(1) > 2 * 1112, "no packets were joined on writing: {got:?}");
        }
    }

    // LAN discovery: host 1 broadcasts to 255.255.255.255:4446 with no interface chosen;
    // hosts 2 and 3 answer by unicast; host 1 sees both answers.
    let mut answerers = Vec::new();
    for n in [2, 3] {
        let mut s = hosts.cmd(n, std::path::Path::new("socat"));
        s.args(["UDP-RECVFROM:4446,reuseaddr,fork", &format!("SYSTEM:echo here-is-host{n}")]);
        answerers.push(Proc::spawn(s));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(discover(&hosts, 1, 4446, 2).await, ["here-is-host2", "here-is-host3"]);

    // UDP between TUN host 2 and `overlan nc -u` on ordinary host 4.
    let mut echo = hosts.cmd(2, std::path::Path::new("socat"));
    echo.args(["UDP-RECVFROM:5000,reuseaddr,fork", "SYSTEM:read l; echo got-$l"]);
    let _echo = Proc::spawn(echo);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut nc = Proc::spawn(overlan(4, &["nc", "-u", &v2, "5000"]));
    nc.stderr_until("bound").await;
    let answer = within("the TUN host's answer", async {
        loop {
            nc.write_stdin(b"hello-tun\n").await;
            if let Ok(line) = tokio::time::timeout(Duration::from_millis(500), nc.stdout_line()).await {
                return line;
            }
        }
    })
    .await;
    assert_eq!(answer, "got-hello-tun");

    // `overlan run`: two copies of a "game" with the same hard-coded port on host 4, each
    // in its own namespace with its own VIP, answer host 1's broadcast; PROGRAM's exit
    // status is overlan's, and the namespace goes with it.
    let mut games = Vec::new();
    for name in ["g1", "g2"] {
        let answer = format!("SYSTEM:echo here-is-{name}");
        let mut game = Proc::spawn(overlan(
            4,
            &["--name", name, "run", "--", "socat", "UDP-RECVFROM:4447,reuseaddr,fork", &answer],
        ));
        game.stderr_until("in namespace overlan-").await;
        games.push(game);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let found = discover(&hosts, 1, 4447, 2).await;
    if found != ["here-is-g1", "here-is-g2"] {
        // What each game's overlan said, to tell why one did not answer.
        let mut said = Vec::new();
        for mut game in games {
            let _ = game.child.start_kill();
            said.push(game.wait().await);
        }
        panic!("the broadcast found {found:?}; the games said {said:?}");
    }
    let mut said = Vec::new();
    for mut game in games {
        let pid = game.child.id().unwrap().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let (code, err) = game.wait().await;
        assert_eq!(code, 143, "socat ends on SIGTERM: {err:?}");
        said.push(err);
    }
    let (code, _, err) = {
        let mut c = overlan(
            4,
            &["--name", "g1", "run", "--", "sh", "-c", "ip -o addr show overlan0 | grep -q 'inet 10.77.' && exit 7"],
        );
        c.stdin(std::process::Stdio::null());
        let out = within("overlan run", c.output()).await.unwrap();
        (out.status.code(), (), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    assert_eq!(code, Some(7), "{err}");
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let namespaces = String::from_utf8_lossy(&namespaces.stdout);
    assert!(
        !namespaces.lines().any(|l| l.starts_with("overlan-g")),
        "left behind: {namespaces}; the runs said {said:?} and {err}"
    );

    // SIGTERM: `overlan tun` leaves cleanly and its interface is gone.
    let pid = tuns[0].child.id().unwrap().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert_eq!(tuns[0].wait().await.0, 0);
    let (code, _, _) = run_in(&hosts, 1, "ip", &["link", "show", "ovl0"]).await;
    assert_ne!(code, 0, "the interface outlived overlan tun");
}

/// Two relay nodes on their own hosts, linked; a TUN host behind each (each reaching
/// only its own node): ping, HTTP and a broadcast discovery cross the cluster.
async fn tun_hosts_behind_two_relay_nodes_talk_and_discover_each_other() {
    tools_present(&["ping", "python3", "curl", "socat"]);
    let client = bin("overlan");
    let dir = tempfile::tempdir().unwrap();
    // r1 (0) — r2 (1); c1 (2) reaches r1, c2 (3) reaches r2.
    let hosts = Hosts::mesh(&["r1", "r2", "c1", "c2"], &[(0, 1, "10.234.12"), (2, 0, "10.235.1"), (3, 1, "10.235.2")]);
    let mut relays = start_cluster(&hosts, dir.path(), &[&[], &["10.234.12.1:7700"]]).await;
    relays[1].0.stderr_until("peer link up").await;
    let invite = relays[0].1.clone();
    let mut tuns = Vec::new();
    let mut vips = Vec::new();
    for (host, relay) in [(2, "10.235.1.1:7700"), (3, "10.235.2.2:7700")] {
        let mut c = hosts.cmd(host, &client);
        c.env("OVERLAN_INVITE", invite.to_string())
            .env("XDG_RUNTIME_DIR", dir.path().join(format!("run{host}")))
            .args(["--relay", relay, "--identity"])
            .arg(dir.path().join(format!("host{host}.pem")))
            .args(["tun", "--dev", "ovl0"]);
        let mut tun = Proc::spawn(c);
        vips.push(tun.stdout_line().await.strip_prefix("vip ").expect("vip line").to_owned());
        tun.stderr_until("interface ovl0 holds").await;
        tuns.push(tun);
    }
    let (v1, v2) = (vips[0].clone(), vips[1].clone());
    // Routes take a moment to reach the other node: ping until the first reply.
    let (code, out, err) = run_in(&hosts, 2, "ping", &["-c", "3", "-i", "0.2", "-W", "3", "-w", "10", &v2]).await;
    assert_eq!(code, 0, "ping across the cluster: {out}{err}");
    // HTTP: python's server behind n2, curl behind n1.
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let body: String = (0..20_000).map(|i| format!("row {i}\n")).collect();
    std::fs::write(www.join("data.txt"), &body).unwrap();
    let mut http = hosts.cmd(3, std::path::Path::new("python3"));
    http.args(["-m", "http.server", "8000", "--bind", &v2]).current_dir(&www);
    let _http = Proc::spawn(http);
    let url = format!("http://{v2}:8000/data.txt");
    let (code, out, err) =
        run_in(&hosts, 2, "curl", &["-sS", "--retry", "30", "--retry-connrefused", "--retry-delay", "1", &url]).await;
    assert_eq!(code, 0, "curl: {err}");
    assert!(out == body, "curl got {} bytes, not the file", out.len());
    // Discovery: c2 broadcasts, c1 answers by unicast, across the link.
    let mut answerer = hosts.cmd(2, std::path::Path::new("socat"));
    answerer.args(["UDP-RECVFROM:4446,reuseaddr,fork", "SYSTEM:echo here-is-c1"]);
    let _answerer = Proc::spawn(answerer);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(discover(&hosts, 3, 4446, 1).await, ["here-is-c1"], "c1 is {v1}");

    // Port forwarding across the nodes too: c2's web server exposed by another instance
    // of c2, reached from a forward on c1.
    let with_relay = |host: usize, relay: &str, args: &[&str]| {
        let mut c = hosts.cmd(host, &client);
        c.env("OVERLAN_INVITE", invite.to_string())
            .env("XDG_RUNTIME_DIR", dir.path().join(format!("run{host}")))
            .args(["--relay", relay, "--identity"])
            .arg(dir.path().join(format!("host{host}.pem")))
            .args(args);
        c
    };
    let mut expose =
        Proc::spawn(with_relay(3, "10.235.2.2:7700", &["--name", "web", "expose", "80", &format!("{v2}:8000")]));
    let exposed = expose.stdout_line().await.split(' ').nth(1).expect("expose VIP:PORT ...").to_owned();
    // By VIP: a member of another node is known here by its route, not its name.
    let mut forward =
        Proc::spawn(with_relay(2, "10.235.1.1:7700", &["--name", "fwd", "forward", "127.0.0.1:8080", &exposed]));
    assert_eq!(forward.stdout_line().await, format!("forward 127.0.0.1:8080 -> {exposed} tcp"));
    let (code, out, err) = run_in(&hosts, 2, "curl", &["-sS", "http://127.0.0.1:8080/data.txt"]).await;
    assert_eq!(code, 0, "curl through forward and expose: {err}");
    assert!(out == body, "curl got {} bytes, not the file", out.len());
}

/// Whether a process with exactly this command line runs (read from /proc).
fn running(cmdline: &[&str]) -> bool {
    let wanted = cmdline.iter().map(|a| format!("{a}\0")).collect::<String>();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .any(|entry| std::fs::read(entry.path().join("cmdline")).is_ok_and(|c| c == wanted.as_bytes()))
}

async fn run_shares_its_session_and_leaves_nothing_behind() {
    bin("overlan");
    let relay = TestRelay::start();
    let dir = tempfile::tempdir().unwrap();
    let cmd = |args: &[&str]| {
        let mut c = overlan_cmd(&relay.invite(), dir.path(), "me");
        c.env("XDG_RUNTIME_DIR", dir.path().join("run")).args(args).stdin(std::process::Stdio::null());
        c
    };
    // A program that leaves a process of its own behind in the namespace.
    let mut run = Proc::spawn(cmd(&["--name", "r1", "run", "--", "sh", "-c", "sleep 317 & exec sleep 316"]));
    let said = run.stderr_until("in namespace ").await;
    let namespace = said.rsplit(' ').next().unwrap().to_owned();
    let vip = said.split(" as ").nth(1).unwrap().split(' ').next().unwrap().to_owned();
    // The instance's other commands use the run's session instead of replacing it.
    let out = within("ip", cmd(&["--name", "r1", "ip"]).output()).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), vip);
    let out = within("status", cmd(&["--name", "r1", "status"]).output()).await.unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("(overlan run)"), "{out:?}");
    let out = within("tun beside run", cmd(&["--name", "r1", "tun"]).output()).await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`overlan run` runs instance r1"), "{out:?}");
    // SIGTERM: the program, what it left behind and the namespace are gone.
    let pid = run.child.id().unwrap().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let (code, err) = run.wait().await;
    assert_eq!(code, 143, "{err:?}");
    assert!(!running(&["sleep", "317"]), "a process the program left outlived overlan run");
    assert!(!std::path::Path::new("/run/netns").join(&namespace).exists(), "namespace {namespace} stays");

    // Replaced by a session of its instance joined elsewhere: it says so and stops the
    // program, instead of running on with no network.
    let mut run = Proc::spawn(cmd(&["--name", "r2", "run", "--", "sleep", "318"]));
    run.stderr_until("in namespace ").await;
    let identity = overlan_client::load_or_create_identity(&dir.path().join("me.pem")).unwrap();
    let options = overlan_client::JoinOptions::new(relay.invite(), identity).instance("r2");
    let _newer = within("join", overlan_client::Client::join(options)).await.unwrap();
    let line = run.stderr_until("stopping sleep").await;
    assert!(line.contains("replaced"), "{line}");
    let (code, err) = run.wait().await;
    assert_eq!(code, 143, "{err:?}");
}
