//! The cluster's command-line contract as real processes: `overlan-server ca init` and
//! `ca issue`, three nodes started with `--cluster DIR --node NODE --peer HOST:PORT`,
//! an invite printed by one node used on another with `overlan --relay`, a stream
//! across the cluster through `overlan nc`, and a client that fails over to its next
//! `--relay` when its node is killed.

use std::time::Duration;

use overlan_integration_tests::*;
use overlan_shared::Invite;

async fn output(mut cmd: tokio::process::Command) -> (i32, String, String) {
    let out = within("command", cmd.output()).await.expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn server(args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(bin("overlan-server"));
    cmd.args(args)
        .env_remove("OVERLAN_CONFIG")
        .env_remove("OVERLAN_LISTEN")
        .env_remove("OVERLAN_CLUSTER")
        .env_remove("OVERLAN_NODE")
        .env("OVERLAN_LOG", "info");
    cmd
}

/// A started node: its process, address and invite.
struct NodeProc {
    proc: Proc,
    addr: String,
    invite: Invite,
}

async fn start_node(cluster: &std::path::Path, data: &std::path::Path, node: &str, peers: &[&str]) -> NodeProc {
    let mut cmd = server(&["--listen", "127.0.0.1:0", "--node", node]);
    cmd.arg("--data-dir").arg(data).arg("--cluster").arg(cluster);
    for peer in peers {
        cmd.args(["--peer", peer]);
    }
    let mut proc = Proc::spawn(cmd);
    let listen = proc.stdout_line().await;
    let fingerprint = proc.stdout_line().await;
    let invite = proc.stdout_line().await;
    let addr = listen.strip_prefix("listen ").expect("listen line").to_owned();
    assert!(fingerprint.starts_with("fingerprint "), "{fingerprint}");
    let invite: Invite = invite.strip_prefix("invite ").expect("invite line").parse().unwrap();
    assert_eq!(invite.fingerprint.to_string(), fingerprint.strip_prefix("fingerprint ").unwrap());
    NodeProc { proc, addr, invite }
}

/// A cluster CA made with `ca init` in a new directory, with `ca issue` for each of
/// `nodes`: the directory (kept while it lives) and the CA's path.
async fn issued(nodes: &[&str]) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("cluster");
    let ca_s = ca.to_str().unwrap();
    assert_eq!(output(server(&["ca", "init", "--dir", ca_s])).await.0, 0);
    for node in nodes {
        assert_eq!(output(server(&["ca", "issue", node, "--dir", ca_s])).await.0, 0);
    }
    (dir, ca)
}

/// Sends SIGTERM to a node and waits for it: its exit code and what it logged.
async fn terminate(node: &mut NodeProc) -> (i32, Vec<String>) {
    let pid = node.proc.child.id().unwrap().to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    node.proc.wait().await
}

#[tokio::test]
async fn three_nodes_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("cluster");
    let ca_s = ca.to_str().unwrap();

    // `ca`'s help lists what it takes, not the relay's options.
    for command in ["init", "issue"] {
        let (code, out, err) = output(server(&["ca", command, "--help"])).await;
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("--dir") && !out.contains("--listen") && !out.contains("--peer"), "{out}");
    }

    // ca init: the CA's certificate and fingerprint; a second init is refused.
    let (code, out, err) = output(server(&["ca", "init", "--dir", ca_s])).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], format!("ca {}", ca.join("ca.crt").display()));
    let ca_fp = lines[1].strip_prefix("fingerprint ").expect("fingerprint line").to_owned();
    let (code, _, err) = output(server(&["ca", "init", "--dir", ca_s])).await;
    assert_eq!(code, 1);
    assert!(err.contains("already holds a cluster CA"), "{err}");

    // ca issue at the same moment, as a script in parallel would (in a directory of
    // its own): still one slot each, every one recorded.
    let race = dir.path().join("race");
    let race_s = race.to_str().unwrap();
    assert_eq!(output(server(&["ca", "init", "--dir", race_s])).await.0, 0);
    let racing: Vec<_> = (0..6).map(|i| output(server(&["ca", "issue", &format!("r{i}"), "--dir", race_s]))).collect();
    let mut slots = std::collections::BTreeSet::new();
    for (code, out, err) in futures_util::future::join_all(racing).await {
        assert_eq!(code, 0, "{err}");
        assert!(slots.insert(out.split_whitespace().nth(3).unwrap().to_owned()), "a slot issued twice: {out}");
    }
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(race.join("cluster.json")).unwrap()).unwrap();
    assert_eq!(file["slots"].as_object().unwrap().len(), 6, "every issue recorded: {file}");

    // ca issue: one slot per node, kept on re-issue.
    for (i, node) in ["n1", "n2", "n3"].iter().enumerate() {
        let (code, out, err) = output(server(&["ca", "issue", node, "--dir", ca_s])).await;
        assert_eq!(code, 0, "{err}");
        assert_eq!(out.trim(), format!("issued {node} slot {i} {}", ca.join(format!("{node}.pem")).display()));
    }
    let (_, out, _) = output(server(&["ca", "issue", "n1", "--dir", ca_s])).await;
    assert!(out.starts_with("reissued n1 slot 0 "), "{out}");
    let (code, _, err) = output(server(&["ca", "issue", "Bad_Name", "--dir", ca_s])).await;
    assert_eq!(code, 1);
    assert!(err.contains("bad node name"), "{err}");

    // A line n1 — n2 — n3; n1 names no peer and accepts n2's link.
    // A mistyped --node fails on its credentials and claims no directory.
    let mut typo = server(&["--node", "n9", "info"]);
    typo.arg("--data-dir").arg(dir.path().join("d1")).arg("--cluster").arg(&ca);
    let (code, _, err) = output(typo).await;
    assert_eq!(code, 1);
    assert!(err.contains("no credentials for node n9"), "{err}");
    let n1 = start_node(&ca, &dir.path().join("d1"), "n1", &[]).await;
    let n2 = start_node(&ca, &dir.path().join("d2"), "n2", &[&n1.addr]).await;
    let mut n3 = start_node(&ca, &dir.path().join("d3"), "n3", &[&n2.addr]).await;
    assert_eq!(n1.invite.fingerprint.to_string(), ca_fp, "in a cluster the invite pins the cluster CA");
    // `info` on a node says what its start-up said: the CA's fingerprint.
    let mut info = server(&["--node", "n1", "info"]);
    info.arg("--data-dir").arg(dir.path().join("d1")).arg("--cluster").arg(&ca);
    let (code, out, err) = output(info).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().any(|l| l == format!("fingerprint {ca_fp}")), "{out}");
    // Without the cluster credentials, or as another node, a node's data directory is
    // refused (it would print invites no client could use), and nothing is made there.
    let mut bare = server(&["invite", "default"]);
    bare.arg("--data-dir").arg(dir.path().join("d1"));
    let (code, out, err) = output(bare).await;
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("belongs to cluster node n1: pass --cluster DIR --node n1"), "{err}");
    assert!(!dir.path().join("d1/relay.pem").exists());
    let mut other = server(&["--node", "n2", "info"]);
    other.arg("--data-dir").arg(dir.path().join("d1")).arg("--cluster").arg(&ca);
    let (code, _, err) = output(other).await;
    assert_eq!(code, 1);
    assert!(err.contains("belongs to cluster node n1, not n2"), "{err}");
    // A network too small to give every node a block is refused on a cluster node.
    let mut add = server(&["--node", "n1", "network", "add", "tiny", "--subnet", "10.91.0.0/25"]);
    add.arg("--data-dir").arg(dir.path().join("d1")).arg("--cluster").arg(&ca);
    let (code, _, err) = output(add).await;
    assert_eq!(code, 1);
    assert!(err.contains("too small for a cluster"), "{err}");
    assert_eq!(n1.invite.token.expose(), n3.invite.token.expose(), "every node prints the same default invite");
    within("n3 links to n2", n3.proc.stderr_until("peer link up")).await;

    // n1's invite on n3 (`--relay`): a listener there, reached from a client of n1.
    let ip = |invite: &Invite, relay: &str, name: &str| {
        let mut c = overlan_cmd(invite, dir.path(), name);
        c.args(["--relay", relay, "ip"]);
        c
    };
    let (code, vip, err) = output(ip(&n1.invite, &n3.addr, "listener")).await;
    assert_eq!(code, 0, "{err}");
    let vip = vip.trim().to_owned();
    // The lease is kept beside the identity: through n1 the same VIP again.
    let (code, again, err) = output(ip(&n1.invite, &n1.addr, "listener")).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(again.trim(), vip, "one VIP per identity on every node");
    assert!(dir.path().join("listener.leases.json").exists());
    let mut listener = Proc::spawn({
        let mut c = overlan_cmd(&n1.invite, dir.path(), "listener");
        c.args(["--relay", &n3.addr, "nc", "-l", "7000"]);
        c
    });
    // Nothing to send back: the sender sees the end of the stream and exits.
    listener.close_stdin();
    send_until_delivered(
        || {
            let mut c = overlan_cmd(&n1.invite, dir.path(), "sender");
            c.args(["nc", &vip, "7000"]);
            c
        },
        b"across three nodes\n",
    )
    .await;
    assert_eq!(within("received", listener.stdout_line()).await, "across three nodes");
    let (code, _) = listener.wait().await;
    assert_eq!(code, 0);
    let _ = n1;
}

#[tokio::test]
async fn a_client_fails_over_when_its_node_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("cluster");
    let cluster = overlan_shared::cluster::ClusterDir::new(&ca);
    cluster.init().unwrap();
    for node in ["n1", "n2", "n3"] {
        cluster.issue(node).unwrap();
    }
    let mut n1 = start_node(&ca, &dir.path().join("d1"), "n1", &[]).await;
    let n2 = start_node(&ca, &dir.path().join("d2"), "n2", &[&n1.addr]).await;
    let mut n3 = start_node(&ca, &dir.path().join("d3"), "n3", &[&n2.addr, &n1.addr]).await;
    within("n3 links", n3.proc.stderr_until("peer link up")).await;

    // A listener on n1 that knows n3 as its fallback.
    let relays = ["--relay", &n1.addr, "--relay", &n3.addr];
    let (code, vip, err) = output({
        let mut c = overlan_cmd(&n1.invite, dir.path(), "l");
        c.args(relays).arg("ip");
        c
    })
    .await;
    assert_eq!(code, 0, "{err}");
    let vip = vip.trim().to_owned();
    let mut listener = Proc::spawn({
        let mut c = overlan_cmd(&n1.invite, dir.path(), "l");
        c.args(relays).args(["nc", "-l", "7001"]);
        c
    });
    listener.close_stdin();
    // Let the listener register on n1 before n1 dies.
    tokio::time::sleep(Duration::from_millis(500)).await;
    n1.proc.child.start_kill().unwrap();
    let killed = std::time::Instant::now();
    let _ = n1.proc.child.wait().await;

    // A client of n2 reaches the same VIP and port: the listener moved to n3 with its VIP.
    send_until_delivered(
        || {
            let mut c = overlan_cmd(&n2.invite, dir.path(), "s");
            c.args(["nc", &vip, "7001"]);
            c
        },
        b"after failover\n",
    )
    .await;
    println!("reachable again {:?} after the kill", killed.elapsed());
    assert_eq!(within("received", listener.stdout_line()).await, "after failover");
}

#[tokio::test]
async fn a_node_dialing_a_dead_peer_stops_quietly() {
    let (dir, ca) = issued(&["n1"]).await;
    // A peer address where nothing answers: the dialer keeps retrying.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    let mut n1 = start_node(&ca, &dir.path().join("d1"), "n1", &[&dead_addr]).await;
    // Dialing for a moment: a connection attempt is in flight when the signal comes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signalled = std::time::Instant::now();
    let (code, err) = terminate(&mut n1).await;
    let took = signalled.elapsed();
    assert_eq!(code, 0, "{err:?}");
    let after: Vec<_> = err.iter().skip_while(|l| !l.contains("relay shutting down")).collect();
    assert!(!after.iter().any(|l| l.contains("cannot link")), "{after:?}");
    // The attempt that never got an answer is not waited on to drain (that took the
    // whole 2 s allowed for draining, every time).
    assert!(took < Duration::from_millis(1500), "exit took {took:?}");
    drop(dead);
}

/// A --peer that is a standalone relay is named as such, once, not as a protocol error.
#[tokio::test]
async fn a_peer_that_is_a_standalone_relay_is_said_as_such() {
    let (dir, ca) = issued(&["n1"]).await;
    let standalone = TestRelay::start();
    let mut n1 = start_node(&ca, &dir.path().join("d1"), "n1", &[&standalone.addr().to_string()]).await;
    let line = within("the dial failure", n1.proc.stderr_until("cannot link to peer")).await;
    assert!(line.contains("is not a node of a cluster (a standalone relay"), "{line}");
}

/// A second process run with a node's credentials is told why its link was refused,
/// on its own side too.
#[tokio::test]
async fn a_node_run_twice_is_told_why_on_both_sides() {
    let (dir, ca) = issued(&["n1", "n2"]).await;
    let mut n1 = start_node(&ca, &dir.path().join("d1"), "n1", &[]).await;
    let mut n2 = start_node(&ca, &dir.path().join("d2"), "n2", &[&n1.addr]).await;
    within("n2 links", n2.proc.stderr_until("peer link up")).await;
    let mut twin = start_node(&ca, &dir.path().join("d2b"), "n2", &[&n1.addr]).await;
    let line = within("the twin's refusal", twin.proc.stderr_until("cannot link to peer")).await;
    assert!(line.contains("linked already from"), "{line}");
    let line = within("n1's refusal", n1.proc.stderr_until("refusing peer link")).await;
    assert!(line.contains("linked already from"), "{line}");
    // Its retries are refused alike (a changed reason would make another line).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, err) = terminate(&mut twin).await;
    let failures: Vec<_> = err.iter().filter(|l| l.contains("cannot link to peer")).collect();
    assert!(failures.iter().all(|l| l.contains("linked already from")), "{failures:?}");
}
