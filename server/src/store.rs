//! The relay's on-disk state in SQLite: networks, invites (token hashes only) and VIP
//! leases. Synchronous; the relay calls it from the allocator's own thread, the CLI
//! subcommands call it directly. WAL mode lets `overlan-server invite …` run beside a
//! live relay.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use overlan_shared::invite::valid_network_name;
use overlan_shared::tls::{hash_token, Fingerprint};
use overlan_shared::Subnet;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "overlan.db";
/// Name of the network that exists out of the box.
pub const DEFAULT_NETWORK: &str = "default";

/// Database id of a network.
pub type NetworkId = i64;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The data directory could not be created.
    #[error("creating data dir {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No network of that name.
    #[error("no network named {0:?} (see `overlan-server network list`)")]
    NoSuchNetwork(String),
    /// The network already exists.
    #[error("network {0:?} already exists")]
    NetworkExists(String),
    /// The network name is not allowed.
    #[error("network name {0:?}: use 1-32 of a-z, 0-9, - and _, starting with a letter or digit")]
    BadNetworkName(String),
    /// The subnet overlaps another network's.
    #[error("subnet {subnet} overlaps network {other:?} ({other_subnet})")]
    Overlap {
        /// The new subnet.
        subnet: Subnet,
        /// The network it overlaps.
        other: String,
        /// That network's subnet.
        other_subnet: Subnet,
    },
    /// No invite with that id.
    #[error("no invite with id {0} (see `overlan-server invite list`)")]
    NoSuchInvite(i64),
    /// Stored data does not parse (hand-edited database?).
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

/// A virtual network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// Database id.
    pub id: NetworkId,
    /// Name.
    pub name: String,
    /// Subnet.
    pub subnet: Subnet,
}

/// An invite as listed (the token itself is not stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InviteRow {
    /// Id for `invite revoke`.
    pub id: i64,
    /// Network name.
    pub network: String,
    /// Maximum number of new members, `None` for unlimited.
    pub max_uses: Option<i64>,
    /// New members admitted so far.
    pub uses: i64,
    /// Expiry as unix seconds, `None` for never.
    pub expires_at: Option<i64>,
    /// Revoked by the operator.
    pub revoked: bool,
    /// `default` for the relay's built-in invite, `issued` otherwise.
    pub kind: String,
}

/// A lease: who holds which VIP in which network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Network id.
    pub network: NetworkId,
    /// Client identity fingerprint.
    pub identity: String,
    /// Instance name.
    pub instance: String,
    /// The VIP.
    pub vip: Ipv4Addr,
}

/// Why a token does not admit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenProblem {
    /// No invite has this token.
    Unknown,
    /// The operator revoked it.
    Revoked,
    /// Its expiry passed.
    Expired,
    /// All its uses are spent.
    UsedUp,
}

impl TokenProblem {
    /// What the client is told.
    pub fn message(self) -> &'static str {
        match self {
            TokenProblem::Unknown => "join token not recognised by this relay; ask the operator for a new invite",
            TokenProblem::Revoked => "join token was revoked; ask the operator for a new invite",
            TokenProblem::Expired => "join token has expired; ask the operator for a new invite",
            TokenProblem::UsedUp => "join token has no uses left; ask the operator for a new invite",
        }
    }
}

/// A valid invite looked up by token.
#[derive(Debug, Clone)]
pub struct ValidInvite {
    /// Invite id.
    pub id: i64,
    /// Its network.
    pub network: Network,
    /// Whether it may still admit a new member.
    pub has_uses_left: bool,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// The database.
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating if needed) the database in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|source| StoreError::DataDir { path: data_dir.display().to_string(), source })?;
        let conn = Connection::open(data_dir.join(DB_FILE))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Leases are read once per join; a 512 KiB page cache is plenty and keeps the
        // relay's memory flat as the lease table grows.
        conn.pragma_update(None, "cache_size", -512)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS networks (
                id INTEGER PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                subnet TEXT NOT NULL,
                created_at INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS invites (
                id INTEGER PRIMARY KEY,
                network_id INTEGER NOT NULL REFERENCES networks(id),
                token_hash TEXT NOT NULL UNIQUE,
                kind TEXT NOT NULL DEFAULT 'issued',
                max_uses INTEGER,
                uses INTEGER NOT NULL DEFAULT 0,
                expires_at INTEGER,
                revoked INTEGER NOT NULL DEFAULT 0,
                created_at INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS leases (
                network_id INTEGER NOT NULL REFERENCES networks(id),
                identity TEXT NOT NULL,
                instance TEXT NOT NULL,
                vip INTEGER NOT NULL,
                created_at INTEGER NOT NULL,
                last_seen INTEGER NOT NULL,
                PRIMARY KEY (network_id, identity, instance),
                UNIQUE (network_id, vip)
            );",
        )?;
        Ok(Self { conn })
    }

    /// Creates the `default` network if there is none.
    pub fn ensure_default_network(&self, subnet: Subnet) -> Result<Network, StoreError> {
        match self.network(DEFAULT_NETWORK) {
            Ok(n) => Ok(n),
            Err(StoreError::NoSuchNetwork(_)) => self.add_network(DEFAULT_NETWORK, subnet),
            Err(e) => Err(e),
        }
    }

    /// Adds a network; its subnet may not overlap another's.
    pub fn add_network(&self, name: &str, subnet: Subnet) -> Result<Network, StoreError> {
        if !valid_network_name(name) {
            return Err(StoreError::BadNetworkName(name.to_owned()));
        }
        for other in self.networks()? {
            if other.name == name {
                return Err(StoreError::NetworkExists(name.to_owned()));
            }
            if other.subnet.contains(subnet.network()) || subnet.contains(other.subnet.network()) {
                return Err(StoreError::Overlap { subnet, other: other.name, other_subnet: other.subnet });
            }
        }
        self.conn.execute(
            "INSERT INTO networks (name, subnet, created_at) VALUES (?1, ?2, ?3)",
            params![name, subnet.to_string(), unix_now()],
        )?;
        self.network(name)
    }

    fn network_from_row(id: i64, name: String, subnet: String) -> Result<Network, StoreError> {
        let subnet = subnet.parse().map_err(|e| StoreError::Corrupt(format!("network {name}: {e}")))?;
        Ok(Network { id, name, subnet })
    }

    /// Looks a network up by name.
    pub fn network(&self, name: &str) -> Result<Network, StoreError> {
        let row = self
            .conn
            .query_row("SELECT id, name, subnet FROM networks WHERE name = ?1", [name], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let (id, name, subnet) = row.ok_or_else(|| StoreError::NoSuchNetwork(name.to_owned()))?;
        Self::network_from_row(id, name, subnet)
    }

    /// All networks, by name.
    pub fn networks(&self) -> Result<Vec<Network>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT id, name, subnet FROM networks ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.map(|r| {
            let (id, name, subnet) = r?;
            Self::network_from_row(id, name, subnet)
        })
        .collect()
    }

    /// Number of leases in a network.
    pub fn lease_count(&self, network: NetworkId) -> Result<i64, StoreError> {
        Ok(self.conn.query_row("SELECT COUNT(*) FROM leases WHERE network_id = ?1", [network], |r| r.get(0))?)
    }

    /// Stores an invite for `token` (hashed). `kind` is `default` or `issued`. Inserting
    /// a token that exists already leaves the stored row alone (so a revoked default
    /// invite stays revoked). Returns the invite id.
    pub fn add_invite(
        &self,
        network: &str,
        token: &str,
        kind: &str,
        max_uses: Option<u32>,
        expires_in: Option<Duration>,
    ) -> Result<i64, StoreError> {
        let net = self.network(network)?;
        let hash = hash_token(token);
        let expires_at = expires_in.map(|d| unix_now() + d.as_secs() as i64);
        self.conn.execute(
            "INSERT OR IGNORE INTO invites (network_id, token_hash, kind, max_uses, expires_at, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![net.id, hash, kind, max_uses, expires_at, unix_now()],
        )?;
        Ok(self.conn.query_row("SELECT id FROM invites WHERE token_hash = ?1", [hash], |r| r.get(0))?)
    }

    /// Whether the invite for `token` exists and is revoked.
    pub fn invite_revoked(&self, token: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT revoked FROM invites WHERE token_hash = ?1", [hash_token(token)], |r| {
                r.get::<_, bool>(0)
            })
            .optional()?
            .unwrap_or(false))
    }

    /// All invites.
    pub fn invites(&self) -> Result<Vec<InviteRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT i.id, n.name, i.max_uses, i.uses, i.expires_at, i.revoked, i.kind
             FROM invites i JOIN networks n ON n.id = i.network_id ORDER BY i.id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(InviteRow {
                id: r.get(0)?,
                network: r.get(1)?,
                max_uses: r.get(2)?,
                uses: r.get(3)?,
                expires_at: r.get(4)?,
                revoked: r.get(5)?,
                kind: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Revokes an invite; members it admitted keep their leases, new joins with it fail.
    pub fn revoke_invite(&self, id: i64) -> Result<(), StoreError> {
        let n = self.conn.execute("UPDATE invites SET revoked = 1 WHERE id = ?1", [id])?;
        if n == 0 {
            return Err(StoreError::NoSuchInvite(id));
        }
        Ok(())
    }

    /// Checks a token: which network it admits to, or why not.
    pub fn check_token(&self, token: &str, now: i64) -> Result<Result<ValidInvite, TokenProblem>, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT i.id, i.max_uses, i.uses, i.expires_at, i.revoked, n.id, n.name, n.subnet
                 FROM invites i JOIN networks n ON n.id = i.network_id WHERE i.token_hash = ?1",
                [hash_token(token)],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, Option<i64>>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                        r.get::<_, bool>(4)?,
                        r.get::<_, i64>(5)?,
                        r.get::<_, String>(6)?,
                        r.get::<_, String>(7)?,
                    ))
                },
            )
            .optional()?;
        let Some((id, max_uses, uses, expires_at, revoked, net_id, name, subnet)) = row else {
            return Ok(Err(TokenProblem::Unknown));
        };
        if revoked {
            return Ok(Err(TokenProblem::Revoked));
        }
        if expires_at.is_some_and(|t| now >= t) {
            return Ok(Err(TokenProblem::Expired));
        }
        Ok(Ok(ValidInvite {
            id,
            network: Self::network_from_row(net_id, name, subnet)?,
            has_uses_left: max_uses.is_none_or(|max| uses < max),
        }))
    }

    /// The lease of (network, identity, instance), if any.
    pub fn lease(
        &self,
        network: NetworkId,
        identity: &Fingerprint,
        instance: &str,
    ) -> Result<Option<Ipv4Addr>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT vip FROM leases WHERE network_id = ?1 AND identity = ?2 AND instance = ?3",
                params![network, identity.to_string(), instance],
                |r| r.get::<_, u32>(0),
            )
            .optional()?
            .map(Ipv4Addr::from))
    }

    /// All leases of a network.
    pub fn leases(&self, network: NetworkId) -> Result<Vec<Lease>, StoreError> {
        let mut stmt =
            self.conn.prepare("SELECT identity, instance, vip FROM leases WHERE network_id = ?1 ORDER BY vip")?;
        let rows = stmt.query_map([network], |r| {
            Ok(Lease { network, identity: r.get(0)?, instance: r.get(1)?, vip: Ipv4Addr::from(r.get::<_, u32>(2)?) })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records a join of an existing lease.
    pub fn touch_lease(&self, network: NetworkId, identity: &Fingerprint, instance: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE leases SET last_seen = ?4 WHERE network_id = ?1 AND identity = ?2 AND instance = ?3",
            params![network, identity.to_string(), instance, unix_now()],
        )?;
        Ok(())
    }

    /// Stores a new lease and counts one use of the invite, atomically. Fails (without
    /// storing anything) if the invite's last use was taken meanwhile.
    pub fn create_lease(
        &mut self,
        invite: i64,
        network: NetworkId,
        identity: &Fingerprint,
        instance: &str,
        vip: Ipv4Addr,
    ) -> Result<bool, StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let used = tx.execute(
            "UPDATE invites SET uses = uses + 1 WHERE id = ?1 AND (max_uses IS NULL OR uses < max_uses)",
            [invite],
        )?;
        if used == 0 {
            return Ok(false);
        }
        let now = unix_now();
        tx.execute(
            "INSERT INTO leases (network_id, identity, instance, vip, created_at, last_seen) VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            params![network, identity.to_string(), instance, u32::from(vip), now],
        )?;
        tx.commit()?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invites_and_leases_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let fp = Fingerprint::of(b"client");
        {
            let mut store = Store::open(dir.path()).unwrap();
            let net = store.ensure_default_network("10.77.0.0/16".parse().unwrap()).unwrap();
            let id = store.add_invite("default", "tok", "issued", Some(1), None).unwrap();
            let valid = store.check_token("tok", unix_now()).unwrap().unwrap();
            assert!(valid.has_uses_left);
            assert!(store.create_lease(id, net.id, &fp, "", "10.77.0.2".parse().unwrap()).unwrap());
            // The single use is spent.
            assert!(!store.check_token("tok", unix_now()).unwrap().unwrap().has_uses_left);
            assert!(!store.create_lease(id, net.id, &fp, "b", "10.77.0.3".parse().unwrap()).unwrap());
        }
        let store = Store::open(dir.path()).unwrap();
        let net = store.network("default").unwrap();
        assert_eq!(store.lease(net.id, &fp, "").unwrap(), Some("10.77.0.2".parse().unwrap()));
        assert_eq!(store.lease(net.id, &fp, "b").unwrap(), None);
    }

    #[test]
    fn token_problems() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.ensure_default_network("10.77.0.0/16".parse().unwrap()).unwrap();
        assert_eq!(store.check_token("nope", 0).unwrap().unwrap_err(), TokenProblem::Unknown);
        store.add_invite("default", "exp", "issued", None, Some(Duration::from_secs(60))).unwrap();
        assert!(store.check_token("exp", unix_now()).unwrap().is_ok());
        assert_eq!(store.check_token("exp", unix_now() + 61).unwrap().unwrap_err(), TokenProblem::Expired);
        let id = store.add_invite("default", "rev", "issued", None, None).unwrap();
        store.revoke_invite(id).unwrap();
        assert_eq!(store.check_token("rev", 0).unwrap().unwrap_err(), TokenProblem::Revoked);
        // Re-adding a revoked token does not revive it.
        store.add_invite("default", "rev", "default", None, None).unwrap();
        assert!(store.invite_revoked("rev").unwrap());
        assert!(matches!(store.revoke_invite(999), Err(StoreError::NoSuchInvite(999))));
    }

    #[test]
    fn networks_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.ensure_default_network("10.77.0.0/16".parse().unwrap()).unwrap();
        store.add_network("games", "10.88.0.0/24".parse().unwrap()).unwrap();
        assert!(matches!(
            store.add_network("games", "10.89.0.0/24".parse().unwrap()),
            Err(StoreError::NetworkExists(_))
        ));
        assert!(matches!(store.add_network("other", "10.77.3.0/24".parse().unwrap()), Err(StoreError::Overlap { .. })));
        assert!(matches!(
            store.add_network("Bad Name", "10.90.0.0/24".parse().unwrap()),
            Err(StoreError::BadNetworkName(_))
        ));
        assert_eq!(store.networks().unwrap().len(), 2);
    }
}
