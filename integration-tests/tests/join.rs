//! Joining: permanent VIPs keyed on identity and instance, across reconnects and relay
//! restarts; tokens (wrong, revoked, expired, used up); full subnets; replacement.

use std::time::Duration;

use overlan_client::{Error, SessionState};
use overlan_integration_tests::*;
use overlan_shared::wire::close_code;
use tokio::io::AsyncReadExt;

#[tokio::test]
async fn same_identity_same_vip_across_rejoin_and_restart() {
    let relay = TestRelay::start();
    let alice = identity();
    let bob = identity();
    let a1 = join_as(&relay.invite(), &alice, "").await;
    let b1 = join_as(&relay.invite(), &bob, "").await;
    let (vip_a, vip_b) = (a1.vip(), b1.vip());
    assert_ne!(vip_a, vip_b);
    assert!(a1.subnet().is_assignable(vip_a));
    a1.leave().await;
    b1.leave().await;

    let a2 = join_as(&relay.invite(), &alice, "").await;
    assert_eq!(a2.vip(), vip_a, "rejoin keeps the VIP");
    a2.leave().await;

    let invite_before = relay.invite();
    let relay = relay.restart();
    // The default invite survives a restart (same token; the port is new here).
    assert_eq!(relay.invite().token, invite_before.token);
    assert_eq!(relay.invite().fingerprint, invite_before.fingerprint);
    let b3 = join_as(&relay.invite(), &bob, "").await;
    let a3 = join_as(&relay.invite(), &alice, "").await;
    assert_eq!(a3.vip(), vip_a, "lease kept across relay restart");
    assert_eq!(b3.vip(), vip_b, "lease kept across relay restart");
}

#[tokio::test]
async fn instances_of_one_identity_get_their_own_vips() {
    let relay = TestRelay::start();
    let me = identity();
    let mut vips = Vec::new();
    let mut clients = Vec::new();
    for name in ["", "game-1", "game-2", "game-3"] {
        let c = join_as(&relay.invite(), &me, name).await;
        vips.push(c.vip());
        clients.push(c);
    }
    let mut unique = vips.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 4, "{vips:?}");
    // All four are online at once and reach each other.
    let listener = clients[1].listen(5000).await.unwrap();
    let _stream = clients[3].connect(listener.local_addr()).await.unwrap();
    let (_s, peer) = within("accept", listener.accept()).await.unwrap();
    assert_eq!(*peer.ip(), vips[3]);
}

#[tokio::test]
async fn bad_tokens_are_refused_clearly_and_harm_nobody() {
    let relay = TestRelay::start();
    let member = join(&relay.invite()).await;
    let listener = member.listen(80).await.unwrap();

    let err = join_err(&relay.bogus_invite(), &identity(), "").await;
    assert!(matches!(&err, Error::Unauthorized(m) if m.contains("not recognised")), "{err}");

    let revoked = relay.new_invite("default", None, None);
    let id = relay.store().invites().unwrap().last().unwrap().id;
    relay.store().revoke_invite(id).unwrap();
    let err = join_err(&revoked, &identity(), "").await;
    assert!(matches!(&err, Error::Unauthorized(m) if m.contains("revoked")), "{err}");

    let expired = relay.new_invite("default", None, Some(Duration::ZERO));
    let err = join_err(&expired, &identity(), "").await;
    assert!(matches!(&err, Error::Unauthorized(m) if m.contains("expired")), "{err}");

    let once = relay.new_invite("default", Some(1), None);
    let first = identity();
    let c = join_as(&once, &first, "").await;
    // The member who used it may come back; a new identity may not.
    c.leave().await;
    join_as(&once, &first, "").await;
    let err = join_err(&once, &identity(), "").await;
    assert!(matches!(&err, Error::Unauthorized(m) if m.contains("no uses left")), "{err}");

    // The member joined before is untouched.
    assert_eq!(member.state(), SessionState::Up);
    within("ping", member.ping()).await.unwrap();
    let other = join(&relay.invite()).await;
    let _s = other.connect(listener.local_addr()).await.unwrap();
    within("accept", listener.accept()).await.unwrap();
}

#[tokio::test]
async fn a_client_without_certificate_is_told_why() {
    let relay = TestRelay::start();
    let conn = raw_connect(&relay, None).await;
    let (code, reason) = close_reason(&conn).await;
    assert_eq!(code, u64::from(close_code::UNAUTHORIZED));
    assert!(reason.contains("client certificate is required"), "{reason}");
}

/// An invite pinning another certificate: the join fails at once, says why, and
/// counts as a refusal for good (retrying cannot make the certificate match).
#[tokio::test]
async fn a_relay_whose_certificate_is_not_the_pinned_one_is_not_trusted() {
    let relay = TestRelay::start();
    let mut invite = relay.invite();
    invite.fingerprint = identity().fingerprint();
    let err = join_err(&invite, &identity(), "").await;
    assert!(
        matches!(&err, Error::Untrusted { message, .. }
            if message.starts_with("relay certificate fingerprint") && message.contains("does not match the pinned")),
        "{err}"
    );
    assert!(err.is_terminal());
}

#[tokio::test]
async fn a_full_subnet_is_a_clear_error() {
    let relay = TestRelay::start();
    // A /30 holds network, relay, one client and broadcast.
    relay.store().add_network("tiny", "10.99.0.0/30".parse().unwrap()).unwrap();
    let invite = relay.new_invite("tiny", None, None);
    let first = join(&invite).await;
    assert_eq!(first.vip().to_string(), "10.99.0.2");
    let err = join_err(&invite, &identity(), "").await;
    assert!(matches!(&err, Error::NetworkFull(m) if m.contains("no free VIP")), "{err}");
    assert_eq!(first.state(), SessionState::Up);
}

#[tokio::test]
async fn the_newer_session_of_an_identity_wins() {
    let relay = TestRelay::start();
    let me = identity();
    let old = join_as(&relay.invite(), &me, "box").await;
    let old_listener = old.listen(7).await.unwrap();
    let new = join_as(&relay.invite(), &me, "box").await;
    assert_eq!(new.vip(), old.vip());
    let why = within("old session closed", old.closed()).await;
    assert!(why.contains("replaced"), "{why}");
    // The new session can take the same port, and is reachable.
    let listener = new.listen(7).await.unwrap();
    let peer = join(&relay.invite()).await;
    let _s = peer.connect(listener.local_addr()).await.unwrap();
    within("accept on the new session", listener.accept()).await.unwrap();
    drop(old_listener);
}

#[tokio::test]
async fn a_client_reconnects_after_a_relay_restart() {
    let relay = TestRelay::start();
    let server = join(&relay.invite()).await;
    let vip = server.vip();
    let listener = server.listen(9000).await.unwrap();
    // A stream open when the relay goes away must fail, not hang.
    let other = join(&relay.invite()).await;
    let mut open = other.connect(listener.local_addr()).await.unwrap();
    let (_accepted, _) = within("accept before restart", listener.accept()).await.unwrap();
    let mut state = server.watch_state();
    let relay = relay.restart_same_port();
    let mut buf = [0u8; 1];
    let err = within("the open stream to fail", open.read(&mut buf)).await.unwrap_err();
    assert!(matches!(err.kind(), std::io::ErrorKind::NotConnected | std::io::ErrorKind::ConnectionReset), "{err}");
    within("session lost", state.wait_for(|s| matches!(s, SessionState::Reconnecting(_)))).await.unwrap();
    within("session back", state.wait_for(|s| *s == SessionState::Up)).await.unwrap();
    assert_eq!(server.vip(), vip);
    // The listener was registered again on the new session.
    let client = join(&relay.invite()).await;
    let connected = loop {
        match client.connect(listener.local_addr()).await {
            Ok(s) => break s,
            // Re-registration races the first connect by a round trip.
            Err(Error::Refused { .. }) => tokio::task::yield_now().await,
            Err(e) => panic!("{e}"),
        }
    };
    let (_s, peer) = within("accept after reconnect", listener.accept()).await.unwrap();
    assert_eq!(peer, connected.local_addr());
}

#[tokio::test]
async fn an_invite_whose_uri_names_another_network_is_refused_naming_both() {
    let relay = TestRelay::start();
    relay.store().add_network("games", "10.88.0.0/24".parse().unwrap()).unwrap();
    let edited = overlan_shared::Invite { network: "games".into(), ..relay.invite() };
    let err = join_err(&edited, &identity(), "").await;
    let text = err.to_string();
    assert!(matches!(err, overlan_client::Error::Unauthorized(_)), "{text}");
    assert!(text.contains("\"games\"") && text.contains("\"default\""), "{text}");
}
