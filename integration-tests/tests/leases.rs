//! Leases: a per-identity cap on instances per network, the operator's lease list and
//! release, identities keyed on the public key (a re-issued certificate keeps its VIPs),
//! one relay per data directory, and a busy database that does not turn returning
//! members away.

use std::time::Duration;

use overlan_client::{Error, Identity};
use overlan_integration_tests::*;
use overlan_server::counters::Reason;
use overlan_server::RelayHandle;

#[tokio::test]
async fn an_identity_holds_at_most_the_networks_instance_cap() {
    let relay = TestRelay::start();
    relay.store().set_max_instances("default", Some(3)).unwrap();
    let me = identity();
    let mut held = Vec::new();
    for name in ["a", "b", "c"] {
        held.push(join_as(&relay.invite(), &me, name).await);
    }
    let err = join_err(&relay.invite(), &me, "d").await;
    assert!(matches!(&err, Error::Limit(m) if m.contains("as it allows (3)") && m.contains("\"default\"")), "{err}");
    assert!(err.is_terminal(), "joining again will not help");
    assert_eq!(relay.counters().get(Reason::InstanceLimit), 1);
    // An instance it holds comes back with its VIP; another identity is not affected.
    let c = held.pop().unwrap();
    let vip = c.vip();
    c.leave().await;
    assert_eq!(join_as(&relay.invite(), &me, "c").await.vip(), vip);
    join(&relay.invite()).await;
}

/// `identity` with a new certificate for the same key.
fn reissued(identity: &Identity) -> Identity {
    let key = rcgen::KeyPair::try_from(identity.key_der()).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["reissued".to_owned()]).unwrap().self_signed(&key).unwrap();
    let pem = format!("{}{}", cert.pem(), key.serialize_pem());
    Identity::from_pem(pem.as_bytes(), "reissued").unwrap()
}

#[tokio::test]
async fn a_reissued_certificate_for_the_same_key_keeps_the_vip() {
    let relay = TestRelay::start();
    let me = identity();
    let first = join_as(&relay.invite(), &me, "game").await;
    let vip = first.vip();
    first.leave().await;
    let again = reissued(&me);
    assert_ne!(again.fingerprint(), me.fingerprint(), "another certificate");
    assert_eq!(join_as(&relay.invite(), &again, "game").await.vip(), vip, "same key, same VIP");
}

#[tokio::test]
async fn leases_of_the_first_release_are_migrated_on_the_next_join() {
    let me = identity();
    let relay = TestRelay::start();
    let data_dir = relay.data_dir().to_path_buf();
    let vip = join_as(&relay.invite(), &me, "old").await.vip();
    let relay = {
        // Turn the database back into the first release's: leases keyed on the hash of
        // the whole certificate, no schema version.
        let conn = rusqlite::Connection::open(data_dir.join("overlan.db")).unwrap();
        conn.execute("UPDATE leases SET identity = ?1", [me.fingerprint().to_string()]).unwrap();
        conn.execute_batch(
            "ALTER TABLE networks DROP COLUMN max_instances;
             ALTER TABLE leases DROP COLUMN legacy_identity;
             ALTER TABLE leases DROP COLUMN proof;
             ALTER TABLE invites DROP COLUMN label;
             DROP TABLE removed_networks;
             DROP TABLE voided_leases;
             DROP TABLE invite_uses;
             ALTER TABLE leases DROP COLUMN issued_ms;
             ALTER TABLE invites DROP COLUMN local_uses;
             ALTER TABLE networks DROP COLUMN cap_set_ms;
             PRAGMA user_version = 0;",
        )
        .unwrap();
        relay.restart()
    };
    assert_eq!(join_as(&relay.invite(), &me, "old").await.vip(), vip, "the old lease is found and re-keyed");
    let rows = relay.store().lease_rows(None).unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_ne!(rows[0].identity, me.fingerprint().to_string(), "now keyed on the public key");
}

#[tokio::test]
async fn a_second_relay_on_the_same_data_directory_is_refused() {
    let relay = TestRelay::start();
    let config = overlan_server::RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: relay.data_dir().to_path_buf(),
        ..Default::default()
    };
    let err = RelayHandle::start(config).err().expect("a second relay is refused").to_string();
    assert!(err.contains("in use by another relay"), "{err}");
    // The first one is untouched.
    let a = join(&relay.invite()).await;
    assert!(relay.store().lease_rows(Some("default")).unwrap().iter().any(|l| l.vip == a.vip()));
}

#[tokio::test]
async fn a_busy_database_does_not_turn_returning_members_away() {
    let relay = TestRelay::start();
    let me = identity();
    let vip = join_as(&relay.invite(), &me, "").await.vip();
    // An operator command holds the database's write lock for a while.
    let conn = rusqlite::Connection::open(relay.data_dir().join("overlan.db")).unwrap();
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    let back = join_as(&relay.invite(), &me, "").await;
    assert_eq!(back.vip(), vip, "a returning member is served");
    // A new member needs a write: refused with a clear, retryable error.
    let err = join_err(&relay.invite(), &identity(), "").await;
    assert!(!err.is_terminal(), "{err}");
    assert!(err.to_string().contains("database") || err.to_string().contains("busy"), "{err}");
    // Recording when members were seen fails meanwhile; it is counted, not fatal.
    within("a failed last-seen write to be counted", async {
        while relay.counters().get(Reason::LastSeenFailed) == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    conn.execute_batch("COMMIT").unwrap();
    join(&relay.invite()).await;
}
