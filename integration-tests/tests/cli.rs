//! The command-line contract, exercised as real processes: `overlan-server` (start-up
//! lines, invite and network commands) and `overlan` (`up`, `ip`, `nc` for streams,
//! datagrams and broadcasts, with one-line errors and non-zero exits).

use std::time::Duration;

use overlan_integration_tests::*;
use overlan_shared::Invite;

fn server_cmd(data_dir: &std::path::Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(bin("overlan-server"));
    cmd.arg("--data-dir").arg(data_dir).env_remove("OVERLAN_CONFIG").env_remove("OVERLAN_LISTEN");
    cmd
}

/// Runs `overlan-server ARGS` on `data`: exit code, stdout, stderr.
async fn server_run(data: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let mut cmd = server_cmd(data);
    cmd.args(args);
    output(cmd).await
}

async fn output(mut cmd: tokio::process::Command) -> (i32, String, String) {
    let out = within("command", cmd.output()).await.expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A relay process on 127.0.0.1 with its data in `dir/data`, and its default invite.
async fn relay_process(dir: &std::path::Path) -> (Proc, Invite) {
    let mut relay = Proc::spawn({
        let mut cmd = server_cmd(&dir.join("data"));
        cmd.args(["--listen", "127.0.0.1:0"]);
        cmd
    });
    let _listen = relay.stdout_line().await;
    let _fingerprint = relay.stdout_line().await;
    let invite = relay.stdout_line().await.strip_prefix("invite ").expect("invite line").parse().expect("invite");
    (relay, invite)
}

/// Starts `overlan up` and waits until it has joined; returns it and its VIP.
async fn start_up(cmd: tokio::process::Command) -> (Proc, String) {
    let mut up = Proc::spawn(cmd);
    let vip = up.stdout_line().await.strip_prefix("vip ").expect("vip line").to_owned();
    up.stderr_until("joined network").await;
    (up, vip)
}

/// `overlan ARGS` as identity `name`, with its control sockets under `runtime`.
fn instance_cmd(
    invite: &Invite,
    dir: &std::path::Path,
    runtime: &std::path::Path,
    name: &str,
    args: &[&str],
) -> tokio::process::Command {
    let mut c = overlan_cmd(invite, dir, name);
    c.env("XDG_RUNTIME_DIR", runtime).args(args);
    c
}

#[tokio::test]
async fn server_prints_its_address_fingerprint_and_invite_and_clients_join() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Proc::spawn({
        let mut cmd = server_cmd(&dir.path().join("data"));
        cmd.args(["--listen", "127.0.0.1:0"]);
        cmd
    });
    let listen = relay.stdout_line().await;
    let fingerprint = relay.stdout_line().await;
    let invite_line = relay.stdout_line().await;
    assert!(listen.starts_with("listen 127.0.0.1:"), "{listen}");
    let fp = fingerprint.strip_prefix("fingerprint ").expect("fingerprint line");
    assert_eq!(fp.len(), 64);
    let uri = invite_line.strip_prefix("invite ").expect("invite line");
    assert!(uri.starts_with("overlan://") && uri.contains("token="), "{uri}");
    let invite: Invite = uri.parse().unwrap();
    assert_eq!(invite.fingerprint.to_string(), fp);
    assert_eq!(invite.relay, listen.strip_prefix("listen ").unwrap());

    // `overlan ip` prints the VIP alone; the same identity gets it again.
    let (code, out1, err) = output({
        let mut c = overlan_cmd(&invite, dir.path(), "me");
        c.arg("ip");
        c
    })
    .await;
    assert_eq!(code, 0, "{err}");
    let vip = out1.trim().to_owned();
    assert!(vip.parse::<std::net::Ipv4Addr>().is_ok(), "{out1:?}");
    assert_eq!(out1, format!("{vip}\n"));
    let (_, out2, _) = output({
        let mut c = overlan_cmd(&invite, dir.path(), "me");
        c.arg("ip");
        c
    })
    .await;
    assert_eq!(out2.trim(), vip);
    // Another instance of the same identity: another VIP.
    let (_, out3, _) = output({
        let mut c = overlan_cmd(&invite, dir.path(), "me");
        c.args(["--name", "second", "ip"]);
        c
    })
    .await;
    assert_ne!(out3.trim(), vip);

    // `overlan up` prints `vip A.B.C.D` and stays up until interrupted; exit 0.
    let mut up = Proc::spawn({
        let mut c = overlan_cmd(&invite, dir.path(), "me");
        c.arg("up");
        c
    });
    assert_eq!(up.stdout_line().await, format!("vip {vip}"));
    up.stderr_until("Ctrl-C").await;
    nix_signal(&up.child, "INT");
    let (code, stderr) = up.wait().await;
    assert_eq!(code, 0, "{stderr:?}");

    // A wrong token: one clear line, non-zero exit.
    let bad = Invite { token: overlan_shared::config::Secret::new("nope"), ..invite.clone() };
    let (code, _, err) = output({
        let mut c = overlan_cmd(&bad, dir.path(), "me");
        c.arg("ip");
        c
    })
    .await;
    assert_eq!(code, 3, "a permanent refusal has its own exit code");
    assert!(err.contains("join token not recognised"), "{err}");

    nix_signal(&relay.child, "TERM");
    let (code, _) = relay.wait().await;
    assert_eq!(code, 0);

    // `info` prints the relay's three lines without running it: the addresses it last
    // ran with (not the configured default listen address beside them).
    let (code, out, err) = output({
        let mut cmd = server_cmd(&dir.path().join("data"));
        cmd.arg("info");
        cmd
    })
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("{listen}\n{fingerprint}\n{invite_line}\n"));
    // With --public-addr, the invite names it; the listen line is still the relay's.
    let (code, out, err) = output({
        let mut cmd = server_cmd(&dir.path().join("data"));
        cmd.args(["--public-addr", &invite.relay, "info"]);
        cmd
    })
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with(&format!("{listen}\n")), "{out}");
    assert!(out.contains(&format!("fingerprint {fp}\n")), "{out}");
    assert!(out.contains(&format!("invite {uri}\n")), "{out}");
}

/// Sends a signal by name to a child (the test harness has no signal crate).
fn nix_signal(child: &tokio::process::Child, sig: &str) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill").args([&format!("-{sig}"), &pid]).status().unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn server_manages_invites_and_networks() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["invite", "default", "--uses", "2", "--expires", "1h", "--label", "for-bob"];
    let (code, out, err) = server_run(&data, &args).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.trim().parse::<Invite>().is_ok(), "{out}");
    let (_, list, _) = server_run(&data, &["invite", "list"]).await;
    assert!(list.contains("0/2") && list.contains("in 1h") && list.contains("active"), "{list}");
    // Label and creation time (UTC, to the minute) are listed.
    let header = list.lines().next().unwrap();
    assert!(header.contains("LABEL") && header.contains("CREATED (UTC)"), "{list}");
    let row = list.lines().find(|l| l.contains("0/2")).unwrap();
    assert!(row.contains("for-bob"), "{list}");
    let year = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()[..4].to_owned();
    assert!(row.contains(&format!(" {year}-")), "{list}");
    let id = list.lines().find(|l| l.contains("0/2")).unwrap().split_whitespace().next().unwrap().to_owned();
    let (code, out, _) = server_run(&data, &["invite", "revoke", &id]).await;
    assert_eq!(code, 0);
    assert!(out.contains("revoked"), "{out}");
    let (_, list, _) = server_run(&data, &["invite", "list"]).await;
    assert!(list.contains("revoked"), "{list}");
    let (code, _, err) = server_run(&data, &["invite", "revoke", "999"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("no invite with id 999"), "{err}");
    // By token (the same on every node of a cluster, unlike ids).
    let (_, uri, _) = server_run(&data, &["invite", "default", "--label", "by-token"]).await;
    assert!(uri.trim().parse::<Invite>().is_ok(), "{uri}");
    let (_, list, _) = server_run(&data, &["invite", "list"]).await;
    let row = list.lines().find(|l| l.contains("by-token")).unwrap();
    let token = row.split_whitespace().last().unwrap().to_owned();
    assert_eq!(token.len(), 8, "{list}");
    let (code, out, err) = server_run(&data, &["invite", "revoke", "--token", &token[..6]]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("revoked invite "), "{out}");
    let (_, list, _) = server_run(&data, &["invite", "list"]).await;
    assert!(list.lines().find(|l| l.contains("by-token")).unwrap().contains("revoked"), "{list}");
    let (code, _, err) = server_run(&data, &["invite", "revoke", "--token", "zz"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no invite with token zz"), "{err}");
    let (code, _, _) = server_run(&data, &["invite", "revoke"]).await;
    assert_eq!(code, 2, "an id or a token is needed");

    let (code, out, err) = server_run(&data, &["network", "add", "games", "--subnet", "10.88.0.0/24"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("added network games 10.88.0.0/24"), "{out}");
    let (code, _, err) = server_run(&data, &["network", "add", "clash", "--subnet", "10.77.1.0/24"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("overlaps network \"default\""), "{err}");
    let (code, _, err) = server_run(&data, &["network", "add", "bad", "--subnet", "10.90.0.1/24"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("did you mean 10.90.0.0/24"), "{err}");
    let (code, _, err) = server_run(&data, &["network", "add", "Bad Name", "--subnet", "10.91.0.0/24"]).await;
    assert_eq!(code, 2, "a bad name is a usage error: {err}");
    assert!(err.contains("use 1-32 of a-z"), "{err}");
    let (_, list, _) = server_run(&data, &["network", "list"]).await;
    assert!(list.contains("default") && list.contains("games") && list.contains("10.88.0.0/24"), "{list}");
    let (code, _, err) = server_run(&data, &["invite", "nosuch"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("no network named \"nosuch\""), "{err}");
}

#[tokio::test]
async fn nc_streams_both_ways_and_exits_when_both_directions_end() {
    bin("overlan");
    let relay = TestRelay::start();
    let dir = tempfile::tempdir().unwrap();
    let invite = relay.invite();
    let vip_of = |name: &str| {
        let mut c = overlan_cmd(&invite, dir.path(), name);
        c.arg("ip");
        c
    };
    let (_, server_vip, _) = output(vip_of("server")).await;
    let mut server = Proc::spawn({
        let mut c = overlan_cmd(&invite, dir.path(), "server");
        c.args(["nc", "-l", "7000"]);
        c
    });
    server.stderr_until("listening on").await;
    let mut client = Proc::spawn({
        let mut c = overlan_cmd(&invite, dir.path(), "client");
        c.args(["nc", server_vip.trim(), "7000"]);
        c
    });
    client.write_stdin(b"hello from the client\n").await;
    assert_eq!(server.stdout_line().await, "hello from the client");
    server.write_stdin(b"hello back\n").await;
    assert_eq!(client.stdout_line().await, "hello back");
    client.close_stdin();
    server.close_stdin();
    let (code, err) = client.wait().await;
    assert_eq!(code, 0, "{err:?}");
    let (code, err) = server.wait().await;
    assert_eq!(code, 0, "{err:?}");
}

#[tokio::test]
async fn nc_errors_are_one_line_with_the_cause() {
    bin("overlan");
    let relay = TestRelay::start();
    let dir = tempfile::tempdir().unwrap();
    let member = join(&relay.invite()).await;
    for (target, cause) in [
        (member.vip().to_string(), "refused (nothing listening)"),
        ("10.77.123.45".to_owned(), "unreachable (no session has that VIP)"),
    ] {
        let (code, out, err) = output({
            let mut c = overlan_cmd(&relay.invite(), dir.path(), "c");
            c.args(["nc", &target, "9"]).stdin(std::process::Stdio::null());
            c
        })
        .await;
        assert_eq!(code, 1);
        assert!(out.is_empty());
        let lines: Vec<_> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(lines[0].starts_with("overlan: connect ") && lines[0].ends_with(cause), "{err}");
    }
    let (code, _, err) = output({
        let mut c = tokio::process::Command::new(bin("overlan"));
        c.args(["ip"]).env_remove("OVERLAN_INVITE");
        c
    })
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no invite"), "{err}");
    let (code, _, err) = output({
        let mut c = tokio::process::Command::new(bin("overlan"));
        c.args(["--invite", "garbage", "ip"]).env_remove("OVERLAN_INVITE");
        c
    })
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("invite must start with"), "{err}");
}

#[tokio::test]
async fn nc_datagrams_and_broadcasts_between_processes() {
    bin("overlan");
    let relay = TestRelay::start();
    let dir = tempfile::tempdir().unwrap();
    let invite = relay.invite();
    let spawn = |name: &str, args: &[&str]| {
        let mut c = overlan_cmd(&invite, dir.path(), name);
        c.arg("nc").args(args);
        Proc::spawn(c)
    };
    // Three game instances on one machine, each its own VIP, all on the lobby port.
    let mut players: Vec<Proc> = Vec::new();
    for i in 0..3 {
        let mut p = {
            let mut c = overlan_cmd(&invite, dir.path(), "player");
            c.args(["--name", &format!("game{i}"), "nc", "-u", "-b", "--show-source", "4445"]);
            Proc::spawn(c)
        };
        p.stderr_until("bound ").await;
        players.push(p);
    }
    // The last instance hosts: its broadcast reaches the other two, not itself.
    players[2].write_stdin(b"lobby open\n").await;
    let mut host = None;
    for p in players.iter_mut().take(2) {
        let line = p.stdout_line().await;
        let (src, text) = line.split_once(' ').unwrap();
        assert_eq!(text, "lobby open");
        host.get_or_insert(src.to_owned());
        assert_eq!(host.as_deref(), Some(src));
    }
    // A unicast datagram to the host's VIP, answered by a listener process.
    let host_vip = host.unwrap().split(':').next().unwrap().to_owned();
    let mut listener = {
        let mut c = overlan_cmd(&invite, dir.path(), "player");
        c.args(["--name", "game2", "nc", "-u", "-l", "5000"]);
        Proc::spawn(c)
    };
    listener.stderr_until("bound ").await;
    // game2's identity+instance is now the listener process; the -b process was replaced.
    let mut sender = spawn("sender", &["-u", "-q", "1", &host_vip, "5000"]);
    sender.stderr_until("bound ").await;
    sender.write_stdin(b"join request\n").await;
    assert_eq!(listener.stdout_line().await, "join request");
    listener.write_stdin(b"welcome\n").await;
    assert_eq!(sender.stdout_line().await, "welcome");
    // An over-long line is refused with the maximum, and the tool goes on.
    let long = vec![b'x'; 2000];
    sender.write_stdin(&long).await;
    sender.write_stdin(b"\nafter\n").await;
    sender.stderr_until("exceeds the maximum of 1100 bytes").await;
    assert_eq!(listener.stdout_line().await, "after");
    sender.close_stdin();
    let (code, err) = within("sender quits after -q", sender.wait()).await;
    assert_eq!(code, 0, "{err:?}");
    let _ = Duration::ZERO;
}

#[tokio::test]
async fn server_config_file_with_flag_and_env_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    let data = dir.path().join("from-file");
    std::fs::write(
        &config,
        format!("listen = \"127.0.0.1:7801\"\ndata_dir = {:?}\npublic_addr = \"relay.example.com:7801\"\n", data),
    )
    .unwrap();
    let run = |envs: &[(&str, &str)], args: &[&str]| {
        let mut c = tokio::process::Command::new(bin("overlan-server"));
        c.env_remove("OVERLAN_LISTEN").env_remove("OVERLAN_DATA_DIR").env_remove("OVERLAN_PUBLIC_ADDR");
        c.arg("--config").arg(&config).args(args).envs(envs.iter().copied());
        output(c)
    };
    let (code, out, err) = run(&[], &["info"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("listen 127.0.0.1:7801\n"), "{out}");
    assert!(out.contains("overlan://relay.example.com:7801/default?"), "{out}");
    assert!(data.join("relay.pem").exists(), "data_dir from the file is used");
    // The environment overrides the file, and a flag overrides the environment.
    let (_, out, _) = run(&[("OVERLAN_PUBLIC_ADDR", "env.example.com:1")], &["info"]).await;
    assert!(out.contains("overlan://env.example.com:1/"), "{out}");
    let (_, out, _) =
        run(&[("OVERLAN_PUBLIC_ADDR", "env.example.com:1")], &["--public-addr", "flag.example.com:2", "info"]).await;
    assert!(out.contains("overlan://flag.example.com:2/"), "{out}");
    // Unknown keys and bad values are clear errors.
    std::fs::write(&config, "lisen = \"127.0.0.1:1\"\n").unwrap();
    let (code, _, err) = run(&[], &["info"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("unknown field `lisen`"), "{err}");
    std::fs::write(&config, "idle_timeout = \"forever\"\n").unwrap();
    let (code, _, err) = run(&[], &["info"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("duration \"forever\""), "{err}");
}

#[tokio::test]
async fn server_lists_and_releases_leases_and_caps_instances() {
    bin("overlan");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (code, out, err) =
        server_run(&data, &["network", "add", "lan", "--subnet", "10.66.0.0/24", "--max-instances", "2"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("added network lan"), "{out}");
    let (_, list, _) = server_run(&data, &["network", "list"]).await;
    let lan = list.lines().find(|l| l.starts_with("lan")).unwrap_or_default();
    assert!(lan.split_whitespace().nth(2) == Some("2"), "{list}");
    let (code, _, err) = server_run(&data, &["network", "set", "lan", "--max-instances", "0"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("at least 1"), "{err}");
    let (code, out, _) = server_run(&data, &["invite", "lan"]).await;
    assert_eq!(code, 0);
    let invite: Invite = out.trim().parse().unwrap();

    // A relay on that data directory; two instances of one identity join, a third is
    // refused for good (exit 3) with the limit named.
    let mut relay = Proc::spawn({
        let mut cmd = server_cmd(&data);
        cmd.args(["--listen", "127.0.0.1:0"]);
        cmd
    });
    let addr = relay.stdout_line().await.strip_prefix("listen ").unwrap().to_owned();
    let invite = Invite { relay: addr, ..invite };
    let ip = |name: &str| {
        let mut cmd = overlan_cmd(&invite, dir.path(), "me");
        cmd.args(["--name", name, "ip"]);
        output(cmd)
    };
    let (code, first, err) = ip("one").await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(ip("two").await.0, 0);
    let (code, _, err) = ip("three").await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("already holds as many instances in network \"lan\" as it allows (2)"), "{err}");

    let (code, list, err) = server_run(&data, &["lease", "list", "lan"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(list.lines().count(), 3, "a header and two leases: {list}");
    assert!(list.contains(first.trim()) && list.contains(" one ") && list.contains(" two "), "{list}");
    let (code, _, err) = server_run(&data, &["lease", "list", "nosuch"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("no network named"), "{err}");
    let (code, out, err) = server_run(&data, &["lease", "release", "lan", first.trim()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("released {} in network lan", first.trim())), "{out}");
    let (code, _, err) = server_run(&data, &["lease", "release", "lan", first.trim()]).await;
    assert_ne!(code, 0);
    assert!(err.contains("no lease holds"), "{err}");
    // The place is free: the third instance joins now.
    assert_eq!(ip("three").await.0, 0);
    // A second relay on the same data directory is refused, naming the holder.
    let (code, _, err) = {
        let mut cmd = server_cmd(&data);
        cmd.args(["--listen", "127.0.0.1:0"]);
        output(cmd).await
    };
    assert_eq!(code, 1);
    assert!(err.contains("in use by another relay") && err.contains("pid"), "{err}");
    nix_signal(&relay.child, "TERM");
    assert_eq!(relay.wait().await.0, 0);
}

#[tokio::test]
async fn invites_that_cannot_work_are_refused_and_invites_name_the_running_relay() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (args, why) in [
        (&["invite", "default", "--uses", "0"][..], "0 is not in 1.."),
        (&["invite", "default", "--expires", "0s"][..], "expires at once"),
        (&["invite", "default", "--expires", "7"][..], "add a unit"),
    ] {
        let (code, _, err) = server_run(&data, args).await;
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
    // Beside a relay started with --listen 127.0.0.1:PORT, an invite names that address.
    let mut relay = Proc::spawn({
        let mut cmd = server_cmd(&data);
        cmd.args(["--listen", "127.0.0.1:0"]);
        cmd
    });
    let listen = relay.stdout_line().await;
    let addr = listen.strip_prefix("listen ").unwrap().to_owned();
    let (code, out, err) = server_run(&data, &["invite", "default", "--expires", "2w"]).await;
    assert_eq!(code, 0, "{err}");
    let invite: Invite = out.trim().parse().unwrap();
    assert_eq!(invite.relay, addr);
}

#[tokio::test]
async fn commands_share_the_running_up_and_status_and_peers_report_it() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("run");
    let (_relay, invite) = relay_process(dir.path()).await;
    let cmd = |name: &str, args: &[&str]| instance_cmd(&invite, dir.path(), &runtime, name, args);
    let (mut up, vip) = start_up(cmd("me", &["up"])).await;

    // `ip` of the same instance asks the running up: same VIP, and up lives on.
    let (code, out, err) = output(cmd("me", &["ip"])).await;
    assert_eq!((code, out.trim()), (0, vip.as_str()), "{err}");
    let (code, _, err) = output(cmd("bob", &["--name", "bob", "ip"])).await;
    assert_eq!(code, 0, "{err}");

    let (code, out, err) = output(cmd("me", &["status", "--json"])).await;
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(status["vip"], vip.as_str());
    assert_eq!(status["state"], "up", "the up session was not replaced: {status}");
    assert_eq!(status["network"], "default");
    // The path to the relay: between the QUIC minimum and the discovery bound.
    let mtu = status["path_mtu"].as_u64().expect("path_mtu while up");
    assert!((1200..=u64::from(overlan_shared::udp::MTU_BOUND)).contains(&mtu), "{status}");
    assert!(status["rtt_us"].as_u64().is_some(), "{status}");
    let (code, out, _) = output(cmd("me", &["status"])).await;
    assert_eq!(code, 0);
    assert!(out.contains(&format!("vip       {vip}")) && out.contains("state     up"), "{out}");
    assert!(out.contains("path      ") && out.contains("-byte packets, round trip "), "{out}");

    let (code, out, err) = output(cmd("me", &["peers", "--json"])).await;
    assert_eq!(code, 0, "{err}");
    let peers: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let bob = peers.as_array().unwrap().iter().find(|p| p["instance"] == "bob").expect("bob is listed");
    assert_eq!(bob["online"], false);
    let (_, out, _) = output(cmd("me", &["peers"])).await;
    assert!(out.lines().next().unwrap().starts_with("VIP") && out.contains("bob"), "{out}");
    // Without an `up`: bob's own session; a mistyped name is told, and leases nothing.
    let (code, out, err) = output(cmd("bob", &["--name", "bob", "peers"])).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&vip), "{out}");
    let (code, _, err) = output(cmd("bob", &["--name", "bbo", "peers"])).await;
    assert_eq!(code, 1);
    assert!(err.contains("instance bbo has not joined this network"), "{err}");
    let (_, out, _) = output(cmd("me", &["peers"])).await;
    assert!(!out.contains("bbo"), "{out}");

    // A second `up` of the instance is refused instead of replacing the first.
    let (code, _, err) = output(cmd("me", &["up"])).await;
    assert_eq!(code, 1);
    assert!(err.contains("already runs instance"), "{err}");
    assert!(up.child.try_wait().unwrap().is_none(), "the first up still runs");

    nix_signal(&up.child, "TERM");
    let (code, _) = up.wait().await;
    assert_eq!(code, 0);
    let (code, out, _) = output(cmd("me", &["status"])).await;
    assert_eq!(code, 1);
    assert!(out.contains("is not running"), "{out}");
}

#[tokio::test]
async fn nc_streams_go_through_the_running_up_and_leave_it_up() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("run");
    let (_relay, invite) = relay_process(dir.path()).await;
    let cmd = |name: &str, args: &[&str]| instance_cmd(&invite, dir.path(), &runtime, name, args);
    let (mut up, my_vip) = start_up(cmd("me", &["up"])).await;
    let (_, bob_vip, _) = output(cmd("bob", &["ip"])).await;
    let bob_vip = bob_vip.trim().to_owned();

    // me → bob, through up: 20,000 lines, all of them, exit 0 on both sides.
    let mut bob = Proc::spawn(cmd("bob", &["nc", "-l", "7000"]));
    bob.close_stdin();
    bob.stderr_until("listening on").await;
    let lines: Vec<String> = (0..20_000).map(|i| format!("line {i}")).collect();
    let mut me = Proc::spawn(cmd("me", &["nc", &bob_vip, "7000"]));
    me.write_stdin(format!("{}\n", lines.join("\n")).as_bytes()).await;
    me.close_stdin();
    let (code, err) = me.wait().await;
    assert_eq!(code, 0, "{err:?}");
    let got = bob.stdout_rest().await;
    assert!(got == lines, "bob got {} of {} lines", got.len(), lines.len());
    assert_eq!(bob.wait().await.0, 0);

    // bob → me: a listener through up, announced as usual.
    let mut mine = Proc::spawn(cmd("me", &["nc", "-l", "7001"]));
    mine.close_stdin();
    mine.stderr_until(&format!("listening on {my_vip}:7001")).await;
    let mut talker = Proc::spawn(cmd("bob", &["nc", &my_vip, "7001"]));
    talker.write_stdin(b"through up\n").await;
    talker.close_stdin();
    assert_eq!(within("line via up", mine.stdout_line()).await, "through up");
    assert_eq!(talker.wait().await.0, 0);
    assert_eq!(mine.wait().await.0, 0);

    // The up session was shared, never replaced.
    let (code, out, _) = output(cmd("me", &["status", "--json"])).await;
    assert_eq!(code, 0);
    let status: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(status["state"], "up", "{status}");
    assert!(up.child.try_wait().unwrap().is_none());
    assert!(!up.stderr_seen.iter().any(|l| l.contains("replaced")), "{:?}", up.stderr_seen);
}

#[tokio::test]
async fn datagram_nc_goes_through_the_running_up_too() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("run");
    let (_relay, invite) = relay_process(dir.path()).await;
    let cmd = |name: &str, args: &[&str]| instance_cmd(&invite, dir.path(), &runtime, name, args);
    let (_up, my_vip) = start_up(cmd("me", &["up"])).await;

    let mut bob = Proc::spawn(cmd("bob", &["nc", "-u", "-b", "--show-source", "4445"]));
    bob.stderr_until("bound ").await;
    let mut me = Proc::spawn(cmd("me", &["nc", "-u", "-b", "--show-source", "4445"]));
    let bound = me.stderr_until("bound ").await;
    assert!(bound.contains(&format!("{my_vip}:4445")), "bound through up, on up's VIP: {bound}");
    // Broadcasts are unreliable: repeat until one is heard, each way.
    let heard = within("bob hears me", async {
        loop {
            me.write_stdin(b"lobby open\n").await;
            if let Ok(line) = tokio::time::timeout(Duration::from_millis(300), bob.stdout_line()).await {
                return line;
            }
        }
    })
    .await;
    assert_eq!(heard, format!("{my_vip}:4445 lobby open"));
    let heard = within("me hears bob", async {
        loop {
            bob.write_stdin(b"joining\n").await;
            if let Ok(line) = tokio::time::timeout(Duration::from_millis(300), me.stdout_line()).await {
                return line;
            }
        }
    })
    .await;
    assert!(heard.ends_with(":4445 joining"), "{heard}");
    // Too large for a datagram: refused here with the maximum, the socket lives on.
    me.write_stdin(format!("{}\n", "x".repeat(2000)).as_bytes()).await;
    me.stderr_until("not sent").await;
    nix_signal(&me.child, "INT");
    assert_eq!(me.wait().await.0, 130);
    let (code, out, _) = output(cmd("me", &["status", "--json"])).await;
    assert_eq!(code, 0);
    assert!(out.contains("\"state\":\"up\""), "{out}");
}

#[tokio::test]
async fn nc_takes_an_instance_name_where_a_vip_goes() {
    let dir = tempfile::tempdir().unwrap();
    let (_relay, invite) = relay_process(dir.path()).await;
    let runtime = dir.path().join("run");
    let cmd = |identity: &str, args: &[&str]| instance_cmd(&invite, dir.path(), &runtime, identity, args);
    let mut bob = Proc::spawn(cmd("b", &["--name", "bob", "nc", "-l", "7000"]));
    bob.close_stdin();
    bob.stderr_until("listening on").await;
    let mut me = Proc::spawn(cmd("m", &["nc", "bob", "7000"]));
    me.write_stdin(b"hello bob\n").await;
    me.close_stdin();
    assert_eq!(within("bob's line", bob.stdout_line()).await, "hello bob");
    assert_eq!(me.wait().await.0, 0);
    let (code, _, err) = output(cmd("m", &["nc", "nobody", "7000"])).await;
    assert_eq!(code, 1);
    assert!(err.contains("no member named \"nobody\""), "{err}");
}

#[tokio::test]
async fn shell_completions_are_printed_for_each_shell() {
    for (shell, marker) in [("bash", "_overlan()"), ("zsh", "#compdef overlan"), ("fish", "complete -c overlan")] {
        let mut cmd = tokio::process::Command::new(bin("overlan"));
        cmd.args(["completions", shell]).env_remove("OVERLAN_INVITE");
        let (code, out, err) = output(cmd).await;
        assert_eq!(code, 0, "{shell}: {err}");
        assert!(out.contains(marker) && out.contains("peers") && out.contains("relay"), "{shell}: {out}");
    }
    let mut cmd = tokio::process::Command::new(bin("overlan"));
    cmd.args(["completions", "tcsh"]);
    assert_eq!(output(cmd).await.0, 2, "an unknown shell is a usage error");
}

#[tokio::test]
async fn a_relay_that_is_not_running_is_named_at_once_and_up_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // An invite for the relay that will run on `port` (its fingerprint and token are
    // made now, from its data directory, before it runs).
    let data = dir.path().join("data");
    let (code, out, err) = server_run(&data, &["--listen", &format!("127.0.0.1:{port}"), "info"]).await;
    assert_eq!(code, 0, "{err}");
    let invite: Invite = out.lines().find_map(|l| l.strip_prefix("invite ")).unwrap().parse().unwrap();
    let cmd = |args: &[&str]| {
        let mut c = overlan_cmd(&invite, dir.path(), "me");
        c.env("XDG_RUNTIME_DIR", dir.path().join("run")).args(args);
        c
    };

    // A bad instance name is a usage error, found before anything is sent.
    let (code, _, err) = output(cmd(&["--name", "bad name!", "ip"])).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("instance name"), "{err}");

    // Nothing answers: said within about 2 s, with what to check.
    let mut up = Proc::spawn(cmd(&["up"]));
    let started = std::time::Instant::now();
    let hint = up.stderr_until("no answer from relay").await;
    assert!(started.elapsed() < Duration::from_secs(5), "said after {:?}", started.elapsed());
    assert!(hint.contains(&format!("UDP port {port}")), "{hint}");
    // `up` keeps trying; once the relay runs, it joins.
    let mut relay = Proc::spawn({
        let mut c = server_cmd(&data);
        c.args(["--listen", &format!("127.0.0.1:{port}")]);
        c
    });
    let _ = relay.stdout_line().await;
    let vip = within("up joins once the relay runs", up.stdout_line()).await;
    assert!(vip.starts_with("vip "), "{vip}");
    nix_signal(&up.child, "TERM");
    assert_eq!(up.wait().await.0, 0);
}

/// A relay name that does not resolve is said as a name problem (DNS), not as a relay
/// that does not answer; `up` keeps trying, and a signal ends it cleanly.
#[tokio::test]
async fn a_relay_name_that_does_not_resolve_is_said_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start();
    let mut invite = relay.invite();
    // `.invalid` never resolves (RFC 2606); how fast the resolver says so depends on
    // the machine, and either way the hint must be about the name.
    invite.relay = "no-such-relay.invalid:7700".into();
    let mut up = Proc::spawn({
        let mut c = overlan_cmd(&invite, dir.path(), "me");
        c.env("XDG_RUNTIME_DIR", dir.path().join("run")).arg("up");
        c
    });
    // A resolver that answers at once fails the join ("cannot resolve", retrying); a
    // slow one gets the hint after 2 s ("has not resolved yet").
    let hint = up.stderr_until("resolve").await;
    assert!(hint.contains("no-such-relay.invalid"), "{hint}");
    assert!(!up.stderr_seen.iter().any(|l| l.contains("no answer from relay")), "{:?}", up.stderr_seen);
    nix_signal(&up.child, "TERM");
    assert_eq!(up.wait().await.0, 0);
}

#[tokio::test]
async fn nc_takes_netcat_options_and_checks_its_arguments_before_joining() {
    let dir = tempfile::tempdir().unwrap();
    let (_relay, invite) = relay_process(dir.path()).await;
    let runtime = dir.path().join("run");
    let cmd = |identity: &str, args: &[&str]| instance_cmd(&invite, dir.path(), &runtime, identity, args);

    // Usage errors: exit 2, one line, nothing joined.
    for (args, says) in [
        (&["nc", "10.77.0.2", "99999"][..], "is not a port"),
        (&["nc", "-l", "7000", "7001"][..], "give just PORT"),
        (&["nc", "bad/name", "7000"][..], "neither a VIP"),
        (&["nc", "-b", "7000"][..], "--udp"),
    ] {
        let (code, out, err) = output(cmd("m", args)).await;
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty() && err.contains(says), "{args:?}: {err}");
    }
    assert!(!dir.path().join("m.pem").exists(), "a usage error must not join (nor make an identity)");

    // -q SECS: the peer never closes, so without -q this would wait forever; with it,
    // nc ends once its input was delivered and SECS more have passed, exit 0.
    let mut bob = Proc::spawn(cmd("b", &["--name", "bob", "nc", "-l", "7000"]));
    bob.stderr_until("listening on").await;
    bob.write_stdin(b"from bob\n").await;
    let mut me = Proc::spawn(cmd("m", &["nc", "-N", "-q", "1", "bob", "7000"]));
    me.write_stdin(b"from me\n").await;
    me.close_stdin();
    assert_eq!(within("bob reads", bob.stdout_line()).await, "from me");
    let started = std::time::Instant::now();
    let (code, err) = me.wait().await;
    assert_eq!(code, 0, "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(8), "-q 1 took {:?}", started.elapsed());
    assert_eq!(me.stdout_rest().await, ["from bob"]);
}

#[tokio::test]
async fn nc_shows_progress_on_a_terminal_when_stdout_is_a_file() {
    // `script` (util-linux; .ci/run installs it) gives the command a terminal for stderr
    // while stdout goes to a file, as a user's `overlan nc … > file` in a shell.
    assert!(
        std::process::Command::new("script").arg("--version").output().is_ok_and(|o| o.status.success()),
        "`script` (util-linux) is needed; .ci/run installs it"
    );
    let dir = tempfile::tempdir().unwrap();
    let (_relay, invite) = relay_process(dir.path()).await;
    let runtime = dir.path().join("run");
    // 3 MiB of 64-byte lines.
    let lines: Vec<String> = (0..49_152).map(|i| format!("{i:063}")).collect();
    let data = lines.iter().map(|l| format!("{l}\n")).collect::<String>();
    assert_eq!(data.len(), 3 << 20);
    std::fs::write(dir.path().join("input"), &data).unwrap();
    let mut bob = Proc::spawn(instance_cmd(&invite, dir.path(), &runtime, "b", &["--name", "bob", "nc", "-l", "7000"]));
    bob.close_stdin();
    bob.stderr_until("listening on").await;
    let nc = instance_cmd(&invite, dir.path(), &runtime, "m", &["nc", "bob", "7000"]);
    let std = nc.as_std();
    let envs: Vec<String> =
        std.get_envs().filter_map(|(k, v)| Some(format!("{}='{}'", k.to_str()?, v?.to_str()?))).collect();
    let args: Vec<String> = std.get_args().map(|a| format!("'{}'", a.to_str().unwrap())).collect();
    let line = format!(
        "env {} {} {} < {} > {}",
        envs.join(" "),
        bin("overlan").display(),
        args.join(" "),
        dir.path().join("input").display(),
        dir.path().join("out").display()
    );
    let mut script = tokio::process::Command::new("script");
    script.args(["-qec", &line, "/dev/null"]);
    let (code, terminal, err) = output(script).await;
    assert_eq!(code, 0, "{terminal}{err}");
    let received = bob.stdout_rest().await;
    assert!(received == lines, "bob got {} lines, not the file", received.len());
    let last = terminal.rsplit('\r').find(|l| !l.trim().is_empty()).unwrap_or_default().to_owned();
    assert!(last.contains("sent 3.0 MiB, received 0 B in "), "progress line: {terminal:?}");
    // Without a terminal (this test's own pipes) there is no progress line.
    let mut me = Proc::spawn(instance_cmd(&invite, dir.path(), &runtime, "m", &["nc", "bob", "7000"]));
    me.close_stdin();
    let (_, err) = me.wait().await;
    assert!(err.iter().all(|l| !l.contains("sent ")), "{err:?}");
}

#[tokio::test]
async fn a_client_config_file_gives_invite_identity_and_name_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_relay, invite) = relay_process(dir.path()).await;
    let bare = |args: &[&str]| {
        let mut c = tokio::process::Command::new(bin("overlan"));
        c.env_remove("OVERLAN_INVITE")
            .env_remove("OVERLAN_NAME")
            .env_remove("OVERLAN_IDENTITY")
            .env_remove("OVERLAN_CONFIG")
            .env("XDG_CONFIG_HOME", dir.path().join("xdg"))
            .env("XDG_RUNTIME_DIR", dir.path().join("run"))
            .args(args);
        c
    };
    let config = dir.path().join("client.toml");
    std::fs::write(&config, format!("invite = \"{invite}\"\nidentity = \"me.pem\"\nname = \"carol\"\n")).unwrap();
    let config = config.to_str().unwrap();
    let (code, vip, err) = output(bare(&["--config", config, "ip"])).await;
    assert_eq!(code, 0, "{err}");
    assert!(dir.path().join("me.pem").exists(), "the identity path is relative to the config file");
    // The same instance again: the same VIP; --name overrides the file's name.
    assert_eq!(output(bare(&["--config", config, "ip"])).await.1, vip);
    let (code, other, _) = output(bare(&["--config", config, "--name", "dave", "ip"])).await;
    assert_eq!(code, 0);
    assert_ne!(other, vip);
    // The default place: $XDG_CONFIG_HOME/overlan/config.toml.
    std::fs::create_dir_all(dir.path().join("xdg/overlan")).unwrap();
    std::fs::copy(config, dir.path().join("xdg/overlan/config.toml")).unwrap();
    std::fs::copy(dir.path().join("me.pem"), dir.path().join("xdg/overlan/me.pem")).unwrap();
    assert_eq!(output(bare(&["ip"])).await.1, vip);
    // A config file named but missing is a usage error; an unknown key is named.
    let (code, _, err) = output(bare(&["--config", "/nonexistent/overlan.toml", "ip"])).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no such file"), "{err}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "invite = \"x\"\nrelay = \"typo\"\n").unwrap();
    let (code, _, err) = output(bare(&["--config", bad.to_str().unwrap(), "ip"])).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("unknown field `relay`"), "{err}");
}

#[tokio::test]
async fn each_subcommand_help_lists_only_the_options_it_takes() {
    let help = |args: &[&str]| {
        let mut c = tokio::process::Command::new(bin("overlan"));
        c.args(args).arg("--help");
        output(c)
    };
    let (code, completions, _) = help(&["completions"]).await;
    assert_eq!(code, 0);
    for absent in ["--invite", "--relay", "--name", "--identity", "--config"] {
        assert!(!completions.contains(absent), "completions --help lists {absent}: {completions}");
    }
    let (_, status, _) = help(&["status"]).await;
    assert!(status.contains("--name") && status.contains("--json"), "{status}");
    assert!(!status.contains("--invite") && !status.contains("--relay"), "{status}");
    let (_, nc, _) = help(&["nc"]).await;
    for present in ["--invite", "--relay", "--name", "-q, --quit-after", "-N, --shutdown"] {
        assert!(nc.contains(present), "nc --help lacks {present}: {nc}");
    }
    // A global option a subcommand ignores is still accepted (scripts set them all).
    let mut c = tokio::process::Command::new(bin("overlan"));
    c.args(["completions", "bash", "--invite", "overlan://x"]);
    assert_eq!(output(c).await.0, 0);
}

/// A wrong fingerprint in the invite ends `ip` and `up` at once with status 3 (`up`
/// does not retry what cannot work), saying what is wrong.
#[tokio::test]
async fn a_relay_that_is_not_the_pinned_one_ends_commands_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let (_relay, mut invite) = relay_process(dir.path()).await;
    invite.fingerprint = overlan_shared::tls::Fingerprint::of(b"another relay");
    let runtime = dir.path().join("run");
    for command in ["ip", "up"] {
        let (code, out, err) = output(instance_cmd(&invite, dir.path(), &runtime, "a", &[command])).await;
        assert_eq!(code, 3, "{command}: {out} {err}");
        assert!(err.contains("does not match the pinned"), "{command}: {err}");
    }
}

#[tokio::test]
async fn leave_gives_the_vip_back_and_network_remove_ends_its_members() {
    let dir = tempfile::tempdir().unwrap();
    let (_relay, invite) = relay_process(dir.path()).await;
    let data = dir.path().join("data");
    let runtime = dir.path().join("run");
    let cmd = |identity: &str, args: &[&str]| instance_cmd(&invite, dir.path(), &runtime, identity, args);

    // leave: the lease goes, the next join gets another VIP.
    let (_, first, _) = output(cmd("a", &["ip"])).await;
    let (code, out, err) = output(cmd("a", &["leave"])).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        format!("released {} in network default; instance (unnamed) gets a new VIP at its next join", first.trim())
    );
    let (_, list, _) = server_run(&data, &["lease", "list"]).await;
    assert!(!list.contains(&format!(" {} ", first.trim())), "{list}");
    // Again, and by an identity that never joined: nothing is held, and no VIP is
    // leased just to be given back.
    for identity in ["a", "never-joined"] {
        let (code, out, err) = output(cmd(identity, &["leave"])).await;
        assert_eq!(code, 0, "{err}");
        assert_eq!(out.trim(), "instance (unnamed) holds no VIP in network default; nothing to give back");
        let (_, after, _) = server_run(&data, &["lease", "list"]).await;
        assert_eq!(after, list, "a leave leases nothing");
    }
    let (_, second, _) = output(cmd("a", &["ip"])).await;
    assert_ne!(second, first);
    // Not while `up` holds the instance's session.
    let (mut up, vip) = start_up(cmd("a", &["up"])).await;
    assert_eq!(vip, second.trim());
    let (code, _, err) = output(cmd("a", &["leave"])).await;
    assert_eq!(code, 1);
    assert!(err.contains("stop it first"), "{err}");
    assert_eq!(output(cmd("a", &["status"])).await.0, 0, "up is untouched");

    // network remove: its member's `up` ends for good (exit 3, saying why); the default
    // network's member stays; `default` itself cannot be removed.
    let (code, _, err) = server_run(&data, &["network", "add", "games", "--subnet", "10.88.0.0/24"]).await;
    assert_eq!(code, 0, "{err}");
    let (_, games, _) = server_run(&data, &["invite", "games"]).await;
    let games: Invite = games.trim().parse().unwrap();
    let mut gamer = Proc::spawn({
        let mut c = instance_cmd(&games, dir.path(), &runtime, "g", &["up"]);
        c.env("XDG_RUNTIME_DIR", dir.path().join("run-g"));
        c
    });
    assert!(gamer.stdout_line().await.starts_with("vip 10.88.0."));
    let (code, out, err) = server_run(&data, &["network", "remove", "games"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "removed network games (1 leases released, 1 invites deleted)");
    let (code, err) = within("the member's up ends", gamer.wait()).await;
    assert_eq!(code, 3, "{err:?}");
    assert!(err.iter().any(|l| l.contains("network games was removed by the relay operator")), "{err:?}");
    let (_, list, _) = server_run(&data, &["network", "list"]).await;
    assert!(!list.contains("games"), "{list}");
    let (code, _, err) = server_run(&data, &["network", "remove", "default"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("default network cannot be removed"), "{err}");
    let (code, _, err) = server_run(&data, &["network", "remove", "games"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no network named \"games\""), "{err}");
    assert_eq!(output(cmd("a", &["status"])).await.0, 0, "the default network's member stays");
    nix_signal(&up.child, "TERM");
    assert_eq!(up.wait().await.0, 0);
}

/// `overlan tun` and `overlan run` without CAP_NET_ADMIN say what they need at once,
/// before joining: the relay here is not even running, so a join would have said "no
/// answer from relay" instead.
#[tokio::test]
async fn tun_and_run_without_net_admin_say_so_before_joining() {
    bin("overlan");
    let relay = TestRelay::start();
    let dir = tempfile::tempdir().unwrap();
    let mut invite = relay.invite();
    invite.relay = {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap().to_string()
    };
    let root = std::process::Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
    for args in [&["tun"][..], &["run", "--", "true"][..]] {
        let plain = overlan_cmd(&invite, dir.path(), "tun");
        // Root holds CAP_NET_ADMIN: drop it from the bounding set, which caps what the
        // program gets on exec (setpriv is in util-linux, on every Debian).
        let mut cmd = if root {
            let mut c = tokio::process::Command::new("setpriv");
            c.args(["--bounding-set", "-net_admin", "--"]).arg(plain.as_std().get_program());
            c.args(plain.as_std().get_args());
            for (key, value) in plain.as_std().get_envs() {
                match value {
                    Some(value) => c.env(key, value),
                    None => c.env_remove(key),
                };
            }
            c
        } else {
            plain
        };
        cmd.args(args);
        let started = std::time::Instant::now();
        let (code, stdout, stderr) = output(cmd).await;
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert!(stderr.contains("needs root (CAP_NET_ADMIN)"), "{args:?}: {stderr}");
        assert!(!stderr.contains("no answer from relay") && stdout.is_empty(), "{args:?}: {stdout} {stderr}");
        assert!(started.elapsed() < Duration::from_secs(2), "{args:?} took {:?}", started.elapsed());
    }
}

#[tokio::test]
async fn nc_output_to_a_file_shows_each_line_as_it_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let (_relay, invite) = relay_process(dir.path()).await;
    let runtime = dir.path().join("run");
    let out = dir.path().join("out");
    // The listener's stdout is a file, not a pipe: its writes are buffered.
    let mut listen = instance_cmd(&invite, dir.path(), &runtime, "b", &["--name", "bob", "nc", "-l", "7000"]);
    listen.stdout(std::fs::File::create(&out).unwrap()).stderr(std::process::Stdio::piped()).kill_on_drop(true);
    let mut bob = listen.spawn().unwrap();
    let mut err = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(bob.stderr.take().unwrap()));
    within("bob listens", async {
        while !err.next_line().await.unwrap().expect("bob's stderr ended before it listened").contains("listening on") {
        }
    })
    .await;
    // Waits until bob's file holds exactly `text`.
    let shows = |text: &'static str| {
        let out = out.clone();
        within(text, async move {
            while std::fs::read_to_string(&out).unwrap() != text {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut me = Proc::spawn(instance_cmd(&invite, dir.path(), &runtime, "m", &["nc", "bob", "7000"]));
    // The connection stays open: the line must show without waiting for the end.
    me.write_stdin(b"first line\n").await;
    shows("first line\n").await;
    me.write_stdin(b"second\n").await;
    shows("first line\nsecond\n").await;
    me.close_stdin();
    let (code, err) = me.wait().await;
    assert_eq!(code, 0, "{err:?}");
    assert_eq!(within("bob ends", bob.wait()).await.unwrap().code(), Some(0));
}

#[tokio::test]
async fn targets_and_programs_that_cannot_work_are_said_before_joining() {
    bin("overlan");
    let relay = TestRelay::start();
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let mut c = overlan_cmd(&relay.invite(), dir.path(), "me");
        c.env("XDG_RUNTIME_DIR", dir.path().join("run")).args(args);
        output(c)
    };
    for (args, why) in [
        (&["forward", "0", "10.77.0.300:80"][..], "is not a VIP"),
        (&["forward", "0", "10.77.0.3:0"][..], "port 0"),
        (&["nc", "10.77.0.300", "80"][..], "is not a VIP"),
        (&["nc", "10.77.0.2", "0"][..], "port 0"),
    ] {
        let (code, _, err) = run(args).await;
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
    // Outside the network: known only once joined.
    let (code, _, err) = run(&["forward", "0", "8.8.8.8:80"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("8.8.8.8 is not in network default"), "{err}");
    // A program that is not there: the shell's status for it, before anything else.
    let (code, _, err) = run(&["run", "--", "no-such-program-here"]).await;
    assert_eq!(code, 127, "{err}");
    assert!(err.contains("no-such-program-here: command not found"), "{err}");
}
