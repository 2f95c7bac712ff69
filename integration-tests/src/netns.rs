//! Hosts for multi-host tests: network namespaces joined by veth links, made by a test
//! and removed when it ends (also when it fails). Needs root (`ip netns`); a test binary
//! asks [`can_make_namespaces`] when it lists its tests and marks them ignored if not,
//! so the runner reports them skipped rather than passed.

use std::process::Command;

/// Network namespaces created for one test and deleted on drop.
pub struct Hosts {
    /// The namespaces, in the order the constructor made them.
    pub names: Vec<String>,
}

/// Runs `ip ARGS`, panicking with its error if it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Hosts {
    /// `relay` with a link to each client host: relay side 10.231.N.1, client 10.231.N.2.
    pub fn star(clients: usize) -> Self {
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

    /// Hosts named `names` (their namespaces are made now), linked by `links`:
    /// `(a, b, subnet)` joins host `a` (address `subnet.A`) and host `b` (`subnet.B`),
    /// where A and B are the hosts' indexes plus one.
    pub fn mesh(names: &[&str], links: &[(usize, usize, &str)]) -> Self {
        let tag = std::process::id() % 100_000;
        let mut hosts = Hosts { names: Vec::new() };
        for name in names {
            let ns = format!("ovl{tag}{name}");
            ip(&["netns", "add", &ns]);
            hosts.names.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        for (i, &(a, b, subnet)) in links.iter().enumerate() {
            let (a_if, b_if) = (format!("l{i}a"), format!("l{i}b"));
            let (na, nb) = (&hosts.names[a], &hosts.names[b]);
            ip(&["link", "add", &a_if, "netns", na, "type", "veth", "peer", "name", &b_if, "netns", nb]);
            ip(&["-n", na, "addr", "add", &format!("{subnet}.{}/24", a + 1), "dev", &a_if]);
            ip(&["-n", nb, "addr", "add", &format!("{subnet}.{}/24", b + 1), "dev", &b_if]);
            ip(&["-n", na, "link", "set", &a_if, "up"]);
            ip(&["-n", nb, "link", "set", &b_if, "up"]);
        }
        hosts
    }

    /// `program` run in host `host`.
    pub fn cmd(&self, host: usize, program: &std::path::Path) -> tokio::process::Command {
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
pub fn can_make_namespaces() -> bool {
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

/// A namespace test: an async function run on its own single-threaded runtime.
pub type NamespaceTest = fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

/// Runs `tests` as a libtest-mimic harness; where namespaces cannot be made (or
/// `also_needs` does not exist), they are listed as ignored, so the runner reports
/// them skipped rather than passed.
pub fn run_namespace_tests(tests: Vec<(&'static str, NamespaceTest)>, also_needs: &[&str]) -> ! {
    let args = libtest_mimic::Arguments::from_args();
    let runnable = can_make_namespaces() && also_needs.iter().all(|p| std::path::Path::new(p).exists());
    let trials = tests
        .into_iter()
        .map(|(name, test)| {
            libtest_mimic::Trial::test(name, move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                runtime.block_on(test());
                Ok(())
            })
            .with_ignored_flag(!runnable)
        })
        .collect();
    libtest_mimic::run(&args, trials).exit()
}

/// Starts relay node `nI` (I from 1) on host I-1 of `hosts` for each entry of `peers`
/// (the peers it dials), with a cluster CA and credentials made in `dir/cluster`;
/// returns each node's process and its default invite.
pub async fn start_cluster(
    hosts: &Hosts,
    dir: &std::path::Path,
    peers: &[&[&str]],
) -> Vec<(crate::Proc, overlan_shared::Invite)> {
    let server = crate::bin("overlan-server");
    let ca = dir.join("cluster");
    let cluster = overlan_shared::cluster::ClusterDir::new(&ca);
    cluster.init().unwrap();
    let mut relays = Vec::new();
    for (i, peers) in peers.iter().enumerate() {
        let node = format!("n{}", i + 1);
        cluster.issue(&node).unwrap();
        let mut relay = crate::Proc::spawn({
            let mut c = hosts.cmd(i, &server);
            c.args(["--listen", "0.0.0.0:7700", "--node", &node, "--log", "info"])
                .arg("--cluster")
                .arg(&ca)
                .arg("--data-dir")
                .arg(dir.join(&node));
            for peer in *peers {
                c.args(["--peer", peer]);
            }
            c
        });
        let _listen = relay.stdout_line().await;
        let _fingerprint = relay.stdout_line().await;
        let invite = relay.stdout_line().await.strip_prefix("invite ").expect("invite line").parse().expect("invite");
        relays.push((relay, invite));
    }
    relays
}
