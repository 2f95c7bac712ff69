//! Several hosts on one machine: the relay and two clients each in their own network
//! namespace, joined by veth links with their own subnets, so nothing travels over
//! loopback and each side sees the others only through real interfaces. Needs root
//! (`ip netns`); the namespaces are removed afterwards, also when the test fails.
//!
//! A `harness = false` test (libtest-mimic): whether namespaces can be made is decided
//! when the tests are listed, and a machine that cannot make them lists the test as
//! ignored, so the runner reports it as skipped instead of passing it.

use std::process::Command;

use libtest_mimic::{Arguments, Trial};
use overlan_integration_tests::*;
use overlan_shared::Invite;

fn main() {
    let args = Arguments::from_args();
    let runnable = can_make_namespaces();
    let trials = vec![Trial::test("clients_on_separate_hosts_talk_through_the_relay", || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(clients_on_separate_hosts_talk_through_the_relay());
        Ok(())
    })
    .with_ignored_flag(!runnable)];
    libtest_mimic::run(&args, trials).exit();
}

/// Network namespaces created for one test and deleted on drop.
struct Hosts {
    names: Vec<String>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Hosts {
    /// `relay` with a link to each client host: relay side 10.231.N.1, client 10.231.N.2.
    fn star(clients: usize) -> Self {
        let tag = std::process::id() % 100_000;
        let relay = format!("ovl{tag}r");
        let mut names = vec![relay.clone()];
        let hosts = Hosts { names: names.clone() };
        ip(&["netns", "add", &relay]);
        ip(&["-n", &relay, "link", "set", "lo", "up"]);
        let mut hosts = hosts;
        for n in 1..=clients {
            let host = format!("ovl{tag}c{n}");
            ip(&["netns", "add", &host]);
            names.push(host.clone());
            hosts.names = names.clone();
            let (r_if, c_if) = (format!("r{n}"), format!("c{n}"));
            ip(&["link", "add", &r_if, "netns", &relay, "type", "veth", "peer", "name", &c_if, "netns", &host]);
            ip(&["-n", &relay, "addr", "add", &format!("10.231.{n}.1/24"), "dev", &r_if]);
            ip(&["-n", &host, "addr", "add", &format!("10.231.{n}.2/24"), "dev", &c_if]);
            ip(&["-n", &relay, "link", "set", &r_if, "up"]);
            ip(&["-n", &host, "link", "set", &c_if, "up"]);
            ip(&["-n", &host, "link", "set", "lo", "up"]);
        }
        hosts
    }

    fn cmd(&self, host: usize, program: &std::path::Path) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &self.names[host]]).arg(program);
        c
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Whether this process may make network namespaces (root, and `ip netns` works).
fn can_make_namespaces() -> bool {
    let probe = format!("ovlprobe{}", std::process::id());
    // Quietly: this runs whenever the tests are listed.
    let ok = Command::new("ip")
        .args(["netns", "add", &probe])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    }
    ok
}

async fn clients_on_separate_hosts_talk_through_the_relay() {
    let (server, client) = (bin("overlan-server"), bin("overlan"));
    let dir = tempfile::tempdir().unwrap();
    let hosts = Hosts::star(2);
    let mut relay = Proc::spawn({
        let mut c = hosts.cmd(0, &server);
        c.args(["--listen", "0.0.0.0:7700", "--idle-timeout", "3s"]).arg("--data-dir").arg(dir.path().join("relay"));
        c
    });
    let _listen = relay.stdout_line().await;
    let _fingerprint = relay.stdout_line().await;
    let invite: Invite = relay.stdout_line().await.strip_prefix("invite ").unwrap().parse().unwrap();
    // Each host reaches the relay at the relay's address on its own link.
    let invite_for = |n: usize| Invite { relay: format!("10.231.{n}.1:7700"), ..invite.clone() };
    let overlan = |n: usize, args: &[&str]| {
        let mut c = hosts.cmd(n, &client);
        c.env("OVERLAN_INVITE", invite_for(n).to_string())
            .arg("--identity")
            .arg(dir.path().join(format!("host{n}.pem")))
            .args(args);
        c
    };

    let vip_of = |n: usize| {
        let mut c = overlan(n, &["ip"]);
        async move {
            let out = within("overlan ip", c.output()).await.unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).unwrap().trim().to_owned()
        }
    };
    let (vip1, vip2) = (vip_of(1).await, vip_of(2).await);
    assert_ne!(vip1, vip2);

    // A stream from host 1 to host 2.
    let mut listener = Proc::spawn(overlan(2, &["nc", "-l", "7000"]));
    listener.stderr_until("listening on").await;
    let mut talker = Proc::spawn(overlan(1, &["nc", &vip2, "7000"]));
    talker.write_stdin(b"across hosts\n").await;
    assert_eq!(listener.stdout_line().await, "across hosts");
    listener.write_stdin(b"and back\n").await;
    assert_eq!(talker.stdout_line().await, "and back");
    talker.close_stdin();
    listener.close_stdin();
    let (code, stderr) = talker.wait().await;
    assert_eq!(code, 0, "{stderr:?}");
    let (code, stderr) = listener.wait().await;
    assert_eq!(code, 0, "{stderr:?}");

    // A LAN broadcast from host 1 reaches host 2, with host 1's VIP as its source.
    let mut hearer = Proc::spawn(overlan(2, &["nc", "-u", "-b", "--show-source", "4445"]));
    hearer.stderr_until("bound ").await;
    let mut caster = Proc::spawn(overlan(1, &["nc", "-u", "-b", "4445"]));
    caster.stderr_until("bound ").await;
    caster.write_stdin(b"lobby open\n").await;
    assert_eq!(hearer.stdout_line().await, format!("{vip1}:4445 lobby open"));
}
