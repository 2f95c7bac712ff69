//! Several hosts on one machine: relays and clients each in their own network
//! namespace, joined by veth links with their own subnets, so nothing travels over
//! loopback and each side sees the others only through real interfaces. One relay
//! with two client hosts; and a cluster of three relay hosts (linked in a triangle)
//! with two client hosts, one of whose relay host is killed mid-test. Needs root
//! (`ip netns`); the namespaces are removed afterwards, also when the test fails.
//!
//! A `harness = false` test (libtest-mimic): whether namespaces can be made is decided
//! when the tests are listed, and a machine that cannot make them lists the test as
//! ignored, so the runner reports it as skipped instead of passing it.

use overlan_integration_tests::netns::{run_namespace_tests, start_cluster, Hosts};
use overlan_integration_tests::*;
use overlan_shared::Invite;

fn main() {
    run_namespace_tests(
        vec![
            ("clients_on_separate_hosts_talk_through_the_relay", || {
                Box::pin(clients_on_separate_hosts_talk_through_the_relay())
            }),
            ("a_cluster_of_three_relay_hosts_survives_losing_one", || {
                Box::pin(a_cluster_of_three_relay_hosts_survives_losing_one())
            }),
        ],
        &[],
    )
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

async fn a_cluster_of_three_relay_hosts_survives_losing_one() {
    let client = bin("overlan");
    let dir = tempfile::tempdir().unwrap();
    // Relay hosts r1 r2 r3 (indexes 0-2) in a triangle; client host c1 (3) reaches r1
    // and, as its fallback, r3; client host c2 (4) reaches only r2.
    let hosts = Hosts::mesh(
        &["r1", "r2", "r3", "c1", "c2"],
        &[
            (0, 1, "10.232.12"),
            (1, 2, "10.232.23"),
            (0, 2, "10.232.13"),
            (3, 0, "10.233.1"),
            (3, 2, "10.233.3"),
            (4, 1, "10.233.2"),
        ],
    );
    let mut relays =
        start_cluster(&hosts, dir.path(), &[&[], &["10.232.12.1:7700"], &["10.232.13.1:7700", "10.232.23.2:7700"]])
            .await;
    within("n3 links to n1 and n2", async {
        relays[2].0.stderr_until("peer link up").await;
        relays[2].0.stderr_until("peer link up").await;
    })
    .await;
    // Any node's invite works on every node; each client host names the relays it reaches.
    let invite = relays[0].1.clone();
    let overlan = |host: usize, name: &str, args: &[&str]| {
        let mut c = hosts.cmd(host, &client);
        c.env("OVERLAN_INVITE", invite.to_string()).arg("--identity").arg(dir.path().join(format!("{name}.pem")));
        match host {
            3 => c.args(["--relay", "10.233.1.1:7700", "--relay", "10.233.3.3:7700"]),
            _ => c.args(["--relay", "10.233.2.2:7700"]),
        };
        c.args(args);
        c
    };
    let out = within("overlan ip", overlan(3, "c1", &["ip"]).output()).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let vip1 = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    // c2's session on r2 must live through everything below undisturbed.
    let mut bystander = Proc::spawn(overlan(4, "c2-up", &["up"]));
    let _ = bystander.stdout_line().await;

    // A stream c2 → c1 across r2 and r1, and a broadcast from c1 heard on c2.
    let mut listener = Proc::spawn(overlan(3, "c1", &["nc", "-l", "7000"]));
    listener.close_stdin();
    listener.stderr_until("listening on").await;
    send_until_delivered(|| overlan(4, "c2", &["nc", &vip1, "7000"]), b"across the cluster\n").await;
    assert_eq!(listener.stdout_line().await, "across the cluster");
    let mut hearer = Proc::spawn(overlan(4, "c2-hear", &["nc", "-u", "-b", "--show-source", "4445"]));
    hearer.stderr_until("bound ").await;
    let mut caster = Proc::spawn(overlan(3, "c1-cast", &["nc", "-u", "-b", "4445"]));
    caster.stderr_until("bound ").await;
    let line = heard(&mut hearer, &mut caster, "lobby open").await;
    assert!(line.ends_with(":4445 lobby open"), "{line}");

    // A second listener on c1, then r1 is killed: c1's sessions move to r3 with the VIP.
    let mut second = Proc::spawn(overlan(3, "c1", &["nc", "-l", "7001"]));
    second.close_stdin();
    second.stderr_until("listening on").await;
    relays[0].0.child.start_kill().unwrap();
    let _ = relays[0].0.child.wait().await;
    let killed = std::time::Instant::now();
    send_until_delivered(|| overlan(4, "c2", &["nc", &vip1, "7001"]), b"after losing r1\n").await;
    println!("c1 reachable again {:?} after r1 was killed", killed.elapsed());
    assert_eq!(second.stdout_line().await, "after losing r1");
    let line = heard(&mut hearer, &mut caster, "still open").await;
    assert!(line.ends_with(":4445 still open"), "{line}");

    // The bystander on r2 never noticed.
    bystander.child.start_kill().unwrap();
    let (_, stderr) = bystander.wait().await;
    assert!(!stderr.iter().any(|l| l.contains("session lost") || l.contains("reconnected")), "{stderr:?}");
}

/// Writes `what` on the caster until the hearer prints a line (broadcasts are
/// unreliable, and the first may race the caster's port at the far node).
async fn heard(hearer: &mut Proc, caster: &mut Proc, what: &str) -> String {
    within("a broadcast heard", async {
        loop {
            caster.write_stdin(format!("{what}\n").as_bytes()).await;
            if let Ok(line) = tokio::time::timeout(std::time::Duration::from_millis(300), hearer.stdout_line()).await {
                return line;
            }
        }
    })
    .await
}
