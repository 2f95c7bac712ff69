//! Before authentication the relay holds almost nothing: connections that never finish
//! a hello get one stream, a hello of at most 4 KiB within an 8 KiB window, cost a
//! bounded amount of relay memory, do not delay legitimate joins, and are capped in
//! number. (A hello frame announced larger than 4 KiB is refused at once: bad_input.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use overlan_client::{Client, JoinOptions};
use overlan_integration_tests::*;
use overlan_server::config::Limits;
use overlan_server::counters::Reason;
use overlan_server::relay::PREAUTH_MAX_FRAME;
use overlan_shared::tls;
use overlan_shared::wire::{ALPN_CLIENT, RELAY_SERVER_NAME};
use overlan_shared::Invite;

/// Relay memory one idle unauthenticated connection may cost (a quinn connection with
/// its TLS state is about 30 KiB; the window adds at most 8 KiB).
const MAX_RSS_PER_UNAUTHENTICATED: u64 = 64 * 1024;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// A client endpoint that connects with a throw-away certificate and says nothing.
fn silent_endpoint(invite: &Invite) -> quinn::Endpoint {
    let crypto = tls::client_config(Some(&identity()), invite.fingerprint, ALPN_CLIENT).expect("tls");
    let quic = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto).expect("quic tls"),
    ));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("endpoint");
    endpoint.set_default_client_config(quic);
    endpoint
}

/// Opens a connection and a stream, announces a hello of the largest size allowed
/// before authentication and sends all of it but the last byte, so the relay holds what
/// it can and waits (the whole of it fits in the pre-authentication window). Every
/// step is bounded; `None` if the relay refused or did not answer.
async fn silent_connection(endpoint: &quinn::Endpoint, relay: std::net::SocketAddr) -> Option<quinn::Connection> {
    let connecting = endpoint.connect(relay, RELAY_SERVER_NAME).ok()?;
    let conn = tokio::time::timeout(Duration::from_secs(10), connecting).await.ok()?.ok()?;
    let (mut send, _recv) = tokio::time::timeout(Duration::from_secs(5), conn.open_bi()).await.ok()?.ok()?;
    let body = PREAUTH_MAX_FRAME as u32;
    let mut bytes = body.to_be_bytes().to_vec();
    bytes.resize(4 + PREAUTH_MAX_FRAME - 1, b' ');
    tokio::time::timeout(Duration::from_secs(5), send.write_all(&bytes)).await.ok()?.ok()?;
    std::mem::forget(send); // keep the stream open (dropping would finish it)
    Some(conn)
}

async fn timed_join(invite: &Invite) -> Duration {
    let started = Instant::now();
    let client = within("a legitimate join", Client::join(JoinOptions::new(invite.clone(), identity())))
        .await
        .expect("a legitimate join succeeds");
    let took = started.elapsed();
    client.leave().await;
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_cost_little_and_do_not_delay_joins() {
    let server = bin("overlan-server");
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(server);
    cmd.args(["--listen", "127.0.0.1:0", "--data-dir"]).arg(dir.path()).env("OVERLAN_LOG", "warn");
    let mut relay = Proc::spawn(cmd);
    let addr: std::net::SocketAddr = relay.stdout_line().await.strip_prefix("listen ").unwrap().parse().unwrap();
    let _fingerprint = relay.stdout_line().await;
    let invite: Invite = relay.stdout_line().await.strip_prefix("invite ").unwrap().parse().unwrap();
    let invite = Invite { relay: addr.to_string(), ..invite };
    let pid = relay.child.id().unwrap();

    // Warm up, then the baseline.
    timed_join(&invite).await;
    let mut quiet = Duration::ZERO;
    for _ in 0..3 {
        quiet = quiet.max(timed_join(&invite).await);
    }
    let before = rss_bytes(pid);

    const SILENT: usize = 200;
    let endpoint = silent_endpoint(&invite);
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        silent.push(silent_connection(&endpoint, addr).await.expect("the relay accepts the handshake"));
    }
    // One stream only: a second one is not allowed before the hello.
    let second = tokio::time::timeout(Duration::from_millis(300), silent[0].open_bi()).await;
    assert!(second.is_err(), "a second stream before authentication");
    assert!(silent.iter().all(|c| c.close_reason().is_none()), "silent connections are held until the hello timeout");

    let during = timed_join(&invite).await;
    let after = rss_bytes(pid);
    let per_connection = after.saturating_sub(before) / SILENT as u64;
    eprintln!(
        "join: {quiet:?} quiet, {during:?} beside {SILENT} silent connections; relay RSS {} KiB -> {} KiB ({} B each)",
        before / 1024,
        after / 1024,
        per_connection
    );
    assert!(
        during < quiet + Duration::from_secs(1),
        "join took {during:?} beside silent connections ({quiet:?} alone)"
    );
    assert!(
        per_connection <= MAX_RSS_PER_UNAUTHENTICATED,
        "{per_connection} bytes of relay memory per unauthenticated connection (bound {MAX_RSS_PER_UNAUTHENTICATED})"
    );
    drop(silent);
    relay.child.start_kill().unwrap();
}

#[tokio::test]
async fn unauthenticated_connections_are_capped_and_validated_when_they_spike() {
    let relay = TestRelay::start_with(|c| c.limits = Limits { max_unauthenticated: 20, ..Limits::default() });
    let endpoint = silent_endpoint(&relay.invite());
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..30 {
        match silent_connection(&endpoint, relay.addr()).await {
            Some(conn) => held.push(conn),
            None => refused += 1,
        }
    }
    assert_eq!(held.len(), 20, "{refused} refused");
    assert_eq!(refused, 10);
    let counters = relay.counters();
    assert_eq!(counters.get(Reason::UnauthenticatedLimit), 10);
    assert!(counters.get(Reason::AddressValidation) >= 10, "past half of the cap, new connections are retried");
    // Places free up as the silent connections go: a member joins again.
    drop(held);
    endpoint.close(0u32.into(), b"done");
    within("a join once places are free", async {
        loop {
            match Client::join(JoinOptions::new(relay.invite(), identity())).await {
                Ok(client) => return client,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await;
}
