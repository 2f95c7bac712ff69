//! The relay's on-disk state in SQLite: networks, invites (token hashes only) and VIP
//! leases. Synchronous; the relay calls it from the allocator's own thread, the CLI
//! subcommands call it directly. WAL mode lets `overlan-server invite …` run beside a
//! live relay. Writes are synchronous to the disk (`synchronous=FULL`): a lease a client
//! was told about survives a crash or a power loss. The schema carries a version
//! (`PRAGMA user_version`), checked and migrated at open.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use overlan_shared::invite::valid_network_name;
use overlan_shared::route::NetKey;
use overlan_shared::tls::{hash_token, Fingerprint};
use overlan_shared::wire::peer::{Catalog, CatalogInvite, CatalogNetwork, CatalogRemoval, CatalogVoid};
use overlan_shared::Subnet;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "overlan.db";
/// Name of the network that exists out of the box.
pub const DEFAULT_NETWORK: &str = "default";

/// File name of the lock a running relay holds on its data directory.
pub const LOCK_FILE: &str = "relay.lock";
/// Schema version this build reads and writes. 1: the first release (no version
/// recorded); 2: leases keyed on the client's public key, per-network instance caps;
/// 3: proofs of adopted leases; 4: invite labels; 5: removed networks remembered; 6: invite ids never reused.
pub const SCHEMA_VERSION: i64 = 8;

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
    /// The default network is where a relay's first invite leads; it stays.
    #[error("the default network cannot be removed (its invite is the relay's own); revoke its invites instead")]
    DefaultNetworkStays,
    /// No invite with that id.
    #[error("no invite with id {0} (see `overlan-server invite list`)")]
    NoSuchInvite(i64),
    /// No invite whose token starts so.
    #[error("no invite with token {0} (at least 4 of the hex digits `overlan-server invite list` shows)")]
    NoSuchToken(String),
    /// Several invites' tokens start so.
    #[error("token {0} matches several invites; give more of its digits")]
    AmbiguousToken(String),
    /// Stored data does not parse (hand-edited database?).
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// The database was written by a newer overlan-server (or is not overlan's).
    #[error("database {path} has schema version {found}, but this overlan-server reads version {SCHEMA_VERSION}; upgrade overlan-server or point --data-dir elsewhere")]
    SchemaVersion {
        /// The database file.
        path: String,
        /// The version found.
        found: i64,
    },
    /// Another relay runs on this data directory.
    #[error("data directory {path} is in use by another relay ({holder}); stop it first, or give this one its own --data-dir")]
    Locked {
        /// The data directory.
        path: String,
        /// Who holds the lock, as its lock file says.
        holder: String,
    },
    /// The lock file could not be made.
    #[error("locking data directory {path}: {source}")]
    Lock {
        /// The lock file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No lease holds that VIP.
    #[error("no lease holds {vip} in network {network:?} (see `overlan-server lease list`)")]
    NoSuchLease {
        /// The network.
        network: String,
        /// The VIP.
        vip: Ipv4Addr,
    },
}

/// A virtual network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// Database id (this node's).
    pub id: NetworkId,
    /// Cluster-wide id, derived from the name.
    pub key: NetKey,
    /// Name.
    pub name: String,
    /// Subnet.
    pub subnet: Subnet,
    /// Instances one identity may hold here; `None`: the relay's default.
    pub max_instances: Option<u32>,
}

/// A lease as listed by the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    /// Network name.
    pub network: String,
    /// The VIP.
    pub vip: Ipv4Addr,
    /// The holder's identity (SHA-256 of its public key; of its certificate for a lease
    /// made before version 2 and not used since).
    pub identity: String,
    /// Instance name.
    pub instance: String,
    /// When the lease was made, unix seconds.
    pub created_at: i64,
    /// When its holder last joined or left, unix seconds.
    pub last_seen: i64,
}

/// The key of a lease: network, identity, instance.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseKey {
    /// Network id.
    pub network: NetworkId,
    /// Identity (public-key fingerprint).
    pub identity: Fingerprint,
    /// Instance name.
    pub instance: String,
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
    /// The operator's label (`invite NETWORK --label TEXT`), may be empty.
    pub label: String,
    /// When made, unix seconds.
    pub created_at: i64,
    /// The first 8 hex digits of the token's hash: the same on every node of a cluster
    /// (ids are each node's own), for `invite revoke --token`.
    pub token: String,
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

/// Unix time in milliseconds (when leases are issued and released: a lease released and
/// another of the same VIP made within one second must be told apart).
pub fn unix_now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The database.
pub struct Store {
    conn: Connection,
    /// This node's name in a cluster ("" for a standalone relay): its own invite uses
    /// go into catalogs under it.
    node: String,
}

impl Store {
    /// Names this node of a cluster: its own invite uses go into catalogs under it.
    pub fn set_node_name(&mut self, node: &str) {
        self.node = node.to_owned();
    }

    /// Opens (creating if needed) the database in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|source| StoreError::DataDir { path: data_dir.display().to_string(), source })?;
        let path = data_dir.join(DB_FILE);
        let mut conn = Connection::open(&path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Leases are read once per join; a 512 KiB page cache is plenty and keeps the
        // relay's memory flat as the lease table grows.
        conn.pragma_update(None, "cache_size", -512)?;
        migrate(&mut conn, &path)?;
        Ok(Self { conn, node: String::new() })
    }

    /// How long a statement waits for another connection's write lock before failing.
    pub fn set_busy_timeout(&self, timeout: Duration) -> Result<(), StoreError> {
        Ok(self.conn.busy_timeout(timeout)?)
    }
}

/// The invites table's columns (ids are never given again).
const INVITES_COLUMNS: &str = "(
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                network_id INTEGER NOT NULL REFERENCES networks(id),
                token_hash TEXT NOT NULL UNIQUE,
                kind TEXT NOT NULL DEFAULT 'issued',
                max_uses INTEGER,
                uses INTEGER NOT NULL DEFAULT 0,
                expires_at INTEGER,
                revoked INTEGER NOT NULL DEFAULT 0,
                created_at INTEGER NOT NULL,
                label TEXT NOT NULL DEFAULT ''
            )";

/// Leases released (by their holder, the operator or expiry), by network name and VIP,
/// with when (unix milliseconds): a lease proof issued before then no longer keeps the
/// VIP (a cluster's nodes share these in their catalogs).
const VOIDED_LEASES: &str = "CREATE TABLE voided_leases (
    network TEXT NOT NULL,
    vip INTEGER NOT NULL,
    before INTEGER NOT NULL,
    PRIMARY KEY (network, vip)
);";

/// How far ahead of this node's clock a peer's void, or a network's cap setting, may be
/// (clocks of nodes differ).
const VOID_AHEAD_MS: i64 = 3_600_000;

/// Records that proofs of `vip` in `network` issued before `before` are void (the
/// latest release counts).
fn void_lease(tx: &Connection, network: &str, vip: Ipv4Addr, before: i64) -> Result<bool, StoreError> {
    Ok(tx.execute(
        "INSERT INTO voided_leases (network, vip, before) VALUES (?1, ?2, ?3)
         ON CONFLICT (network, vip) DO UPDATE SET before = excluded.before WHERE before < excluded.before",
        params![network, u32::from(vip), before],
    )? > 0)
}

/// Brings the schema to [`SCHEMA_VERSION`] in one transaction, or refuses a database of
/// a newer version.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let has_tables: bool =
        tx.query_row("SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'networks'", [], |r| {
            r.get(0)
        })?;
    if version == 0 && has_tables {
        version = 1; // the first release recorded no version
    }
    if version > SCHEMA_VERSION {
        return Err(StoreError::SchemaVersion { path: path.display().to_string(), found: version });
    }
    if version == 0 {
        tx.execute_batch(&format!(
            "CREATE TABLE networks (
                id INTEGER PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                subnet TEXT NOT NULL,
                created_at INTEGER NOT NULL,
                max_instances INTEGER
            );
            CREATE TABLE invites {INVITES_COLUMNS};
            CREATE TABLE leases (
                network_id INTEGER NOT NULL REFERENCES networks(id),
                identity TEXT NOT NULL,
                instance TEXT NOT NULL,
                vip INTEGER NOT NULL,
                created_at INTEGER NOT NULL,
                last_seen INTEGER NOT NULL,
                legacy_identity INTEGER NOT NULL DEFAULT 0,
                proof TEXT,
                PRIMARY KEY (network_id, identity, instance),
                UNIQUE (network_id, vip)
            );
            CREATE TABLE removed_networks (
                name TEXT PRIMARY KEY,
                removed_at INTEGER NOT NULL
            );"
        ))?;
        version = 6;
    }
    if version == 1 {
        // Version 1 keyed leases on the hash of the whole client certificate. Those rows
        // are marked; each is re-keyed on its holder's public key at its next join.
        tx.execute_batch(
            "ALTER TABLE networks ADD COLUMN max_instances INTEGER;
             ALTER TABLE leases ADD COLUMN legacy_identity INTEGER NOT NULL DEFAULT 0;
             UPDATE leases SET legacy_identity = 1;",
        )?;
        version = 2;
    }
    if version == 2 {
        // Version 3: a lease another node of the cluster issued keeps that node's proof.
        tx.execute_batch("ALTER TABLE leases ADD COLUMN proof TEXT;")?;
        version = 3;
    }
    if version == 3 {
        // Version 4: invites carry the operator's label.
        tx.execute_batch("ALTER TABLE invites ADD COLUMN label TEXT NOT NULL DEFAULT '';")?;
        version = 4;
    }
    if version == 4 {
        // Version 5: a removed network is remembered, so a cluster peer's older catalog
        // does not bring it back.
        tx.execute_batch("CREATE TABLE removed_networks (name TEXT PRIMARY KEY, removed_at INTEGER NOT NULL);")?;
        version = 5;
    }
    if version == 5 {
        // Version 6: invite ids are never given again (an operator's noted `invite
        // revoke ID` must not hit a later invite after a network's were deleted).
        tx.execute_batch(&format!(
            "CREATE TABLE invites_new {INVITES_COLUMNS};
            INSERT INTO invites_new (id, network_id, token_hash, kind, max_uses, uses, expires_at, revoked, created_at, label)
                SELECT id, network_id, token_hash, kind, max_uses, uses, expires_at, revoked, created_at, label FROM invites;
            DROP TABLE invites;
            ALTER TABLE invites_new RENAME TO invites;"
        ))?;
        version = 6;
    }
    if version == 6 {
        // Version 7: released leases are remembered, so their proofs no longer keep
        // the VIP on other nodes of a cluster; a lease knows when it was issued, to the
        // millisecond (its issuer's time, for an adopted one).
        // Uses of an invite are counted per node (the total is their sum): this node's
        // own, and the other nodes' as their catalogs said.
        tx.execute_batch(VOIDED_LEASES)?;
        tx.execute_batch(
            "ALTER TABLE leases ADD COLUMN issued_ms INTEGER NOT NULL DEFAULT 0;
             UPDATE leases SET issued_ms = created_at * 1000;
             ALTER TABLE invites ADD COLUMN local_uses INTEGER NOT NULL DEFAULT 0;
             CREATE TABLE invite_uses (
                token_hash TEXT NOT NULL,
                node TEXT NOT NULL,
                uses INTEGER NOT NULL,
                PRIMARY KEY (token_hash, node)
             );
             INSERT INTO invite_uses (token_hash, node, uses) SELECT token_hash, '(schema 6)', uses FROM invites WHERE uses > 0;",
        )?;
        version = 7;
    }
    if version == 7 {
        // Version 8: when a network's instance cap was last set (unix ms), so the
        // latest setting wins on every node of a cluster.
        tx.execute_batch("ALTER TABLE networks ADD COLUMN cap_set_ms INTEGER NOT NULL DEFAULT 0;")?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

/// The exclusive lock a running relay holds on its data directory, so a second relay on
/// the same directory is refused instead of running with a diverging VIP pool. The
/// operator commands (`invite`, `network`, `lease`) do not take it: they run beside a
/// live relay. Released when dropped (or when the process dies).
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Takes the lock of `data_dir` (creating the directory), or says who holds it.
    pub fn acquire(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|source| StoreError::DataDir { path: data_dir.display().to_string(), source })?;
        let path: PathBuf = data_dir.join(LOCK_FILE);
        let lock_err = |source| StoreError::Lock { path: path.display().to_string(), source };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(lock_err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                let holder = if holder.is_empty() { "a running overlan-server".to_owned() } else { holder.to_owned() };
                return Err(StoreError::Locked { path: data_dir.display().to_string(), holder });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(lock_err(e)),
        }
        file.set_len(0).map_err(lock_err)?;
        writeln!(file, "overlan-server pid {}", std::process::id()).map_err(lock_err)?;
        Ok(Self { _file: file })
    }
}

impl Store {
    /// Creates the `default` network if there is none.
    pub fn ensure_default_network(&mut self, subnet: Subnet) -> Result<Network, StoreError> {
        match self.network(DEFAULT_NETWORK) {
            Ok(n) => Ok(n),
            Err(StoreError::NoSuchNetwork(_)) => self.add_network(DEFAULT_NETWORK, subnet),
            Err(e) => Err(e),
        }
    }

    /// Adds a network; its subnet may not overlap another's. The check and the insert
    /// are one transaction, so two concurrent adds cannot both pass the check.
    pub fn add_network(&mut self, name: &str, subnet: Subnet) -> Result<Network, StoreError> {
        if !valid_network_name(name) {
            return Err(StoreError::BadNetworkName(name.to_owned()));
        }
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for other in networks_in(&tx)? {
            if other.name == name {
                return Err(StoreError::NetworkExists(name.to_owned()));
            }
            if other.subnet.contains(subnet.network()) || subnet.contains(other.subnet.network()) {
                return Err(StoreError::Overlap { subnet, other: other.name, other_subnet: other.subnet });
            }
        }
        tx.execute(
            "INSERT INTO networks (name, subnet, created_at) VALUES (?1, ?2, ?3)",
            params![name, subnet.to_string(), unix_now()],
        )?;
        // Added again after a removal: this network is newer than the removal.
        tx.execute("DELETE FROM removed_networks WHERE name = ?1", [name])?;
        tx.commit()?;
        self.network(name)
    }

    /// Removes a network with its invites and leases (its members' VIPs are released;
    /// a running relay disconnects them within a second). The removal is remembered, so
    /// the cluster's other nodes remove it too and do not bring it back. The `default`
    /// network stays.
    pub fn remove_network(&mut self, name: &str) -> Result<RemovedNetwork, StoreError> {
        if name == DEFAULT_NETWORK {
            return Err(StoreError::DefaultNetworkStays);
        }
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id: Option<i64> =
            tx.query_row("SELECT id FROM networks WHERE name = ?1", [name], |r| r.get(0)).optional()?;
        let id = id.ok_or_else(|| StoreError::NoSuchNetwork(name.to_owned()))?;
        let removed = delete_network(&tx, id)?;
        tx.execute(
            "INSERT INTO removed_networks (name, removed_at) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET removed_at = MAX(removed_at, excluded.removed_at)",
            params![name, unix_now()],
        )?;
        tx.commit()?;
        Ok(removed)
    }

    /// Sets how many instances one identity may hold in a network (`None`: the relay's
    /// default). Existing leases over a lowered cap are kept.
    pub fn set_max_instances(&self, name: &str, max: Option<u32>) -> Result<Network, StoreError> {
        let n = self.conn.execute(
            "UPDATE networks SET max_instances = ?2, cap_set_ms = MAX(?3, cap_set_ms + 1) WHERE name = ?1",
            params![name, max, unix_now_ms()],
        )?;
        if n == 0 {
            return Err(StoreError::NoSuchNetwork(name.to_owned()));
        }
        self.network(name)
    }

    /// Looks a network up by name.
    pub fn network(&self, name: &str) -> Result<Network, StoreError> {
        let row = self
            .conn
            .query_row("SELECT id, name, subnet, max_instances FROM networks WHERE name = ?1", [name], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()?;
        let (id, name, subnet, max) = row.ok_or_else(|| StoreError::NoSuchNetwork(name.to_owned()))?;
        network_from_row(id, name, subnet, max)
    }

    /// All networks, by name.
    pub fn networks(&self) -> Result<Vec<Network>, StoreError> {
        networks_in(&self.conn)
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
        // Not `INSERT OR IGNORE`: an ignored insert still spends an AUTOINCREMENT id.
        self.conn.execute(
            "INSERT INTO invites (network_id, token_hash, kind, max_uses, expires_at, created_at)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE NOT EXISTS (SELECT 1 FROM invites WHERE token_hash = ?2)",
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
            "SELECT i.id, n.name, i.max_uses, i.uses, i.expires_at, i.revoked, i.kind, i.label, i.created_at,
                    substr(i.token_hash, 1, 8)
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
                label: r.get(7)?,
                created_at: r.get(8)?,
                token: r.get(9)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The id of the invite whose token hash starts with `prefix` (as `invite list`
    /// shows it: the same on every node of a cluster).
    pub fn invite_by_token(&self, prefix: &str) -> Result<i64, StoreError> {
        let prefix = prefix.to_ascii_lowercase();
        if prefix.len() < 4 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::NoSuchToken(prefix));
        }
        let mut stmt = self.conn.prepare("SELECT id FROM invites WHERE substr(token_hash, 1, ?2) = ?1")?;
        let ids: Vec<i64> = stmt.query_map(params![prefix, prefix.len()], |r| r.get(0))?.collect::<Result<_, _>>()?;
        match ids[..] {
            [id] => Ok(id),
            [] => Err(StoreError::NoSuchToken(prefix)),
            _ => Err(StoreError::AmbiguousToken(prefix)),
        }
    }

    /// Revokes an invite; members it admitted keep their leases, new joins with it fail.
    pub fn revoke_invite(&self, id: i64) -> Result<bool, StoreError> {
        if self.conn.execute("UPDATE invites SET revoked = 1 WHERE id = ?1 AND revoked = 0", [id])? == 1 {
            return Ok(true);
        }
        let exists: bool = self.conn.query_row("SELECT COUNT(*) > 0 FROM invites WHERE id = ?1", [id], |r| r.get(0))?;
        if exists {
            Ok(false)
        } else {
            Err(StoreError::NoSuchInvite(id))
        }
    }

    /// The networks and invites, for the other nodes of a cluster.
    pub fn catalog(&self) -> Result<Catalog, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, subnet, max_instances, created_at, cap_set_ms FROM networks ORDER BY name")?;
        let networks = stmt
            .query_map([], |r| {
                Ok(CatalogNetwork {
                    name: r.get(0)?,
                    subnet: r.get(1)?,
                    max_instances: r.get(2)?,
                    created_at: r.get(3)?,
                    cap_set_ms: r.get(4)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut stmt = self.conn.prepare("SELECT name, removed_at FROM removed_networks ORDER BY name")?;
        let removed = stmt
            .query_map([], |r| Ok(CatalogRemoval { name: r.get(0)?, removed_at: r.get(1)? }))?
            .collect::<Result<_, _>>()?;
        let mut stmt = self.conn.prepare(
            "SELECT i.token_hash, n.name, i.kind, i.max_uses, i.uses, i.expires_at, i.revoked, i.created_at, i.label,
                    i.local_uses
             FROM invites i JOIN networks n ON n.id = i.network_id ORDER BY i.id",
        )?;
        let mut invites: Vec<CatalogInvite> = stmt
            .query_map([], |r| {
                let local: i64 = r.get(9)?;
                Ok(CatalogInvite {
                    token_hash: r.get(0)?,
                    network: r.get(1)?,
                    kind: r.get(2)?,
                    max_uses: r.get(3)?,
                    uses: r.get(4)?,
                    expires_at: r.get(5)?,
                    revoked: r.get(6)?,
                    created_at: r.get(7)?,
                    label: r.get(8)?,
                    uses_by: [(self.node.clone(), local)].into_iter().filter(|(_, n)| *n > 0).collect(),
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut stmt = self.conn.prepare("SELECT token_hash, node, uses FROM invite_uses")?;
        let others =
            stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))?;
        let by_hash: HashMap<String, usize> =
            invites.iter().enumerate().map(|(i, inv)| (inv.token_hash.clone(), i)).collect();
        for row in others {
            let (hash, node, uses) = row?;
            if let Some(&i) = by_hash.get(&hash) {
                invites[i].uses_by.insert(node, uses);
            }
        }
        let mut stmt = self.conn.prepare("SELECT network, vip, before FROM voided_leases ORDER BY network, vip")?;
        let voided = stmt
            .query_map([], |r| {
                Ok(CatalogVoid { network: r.get(0)?, vip: Ipv4Addr::from(r.get::<_, u32>(1)?), before: r.get(2)? })
            })?
            .collect::<Result<_, _>>()?;
        Ok(Catalog { networks, invites, removed, voided })
    }

    /// Takes in another node's catalog: networks and invites this node lacks are added,
    /// revocations are taken, use counts rise to the other's. A network whose subnet
    /// differs from this node's network of the same name is kept as it is here (and
    /// reported). A removal newer than a network's creation removes it (the later of
    /// the two wins, so a network removed and added again stays). Returns whether
    /// anything changed.
    pub fn merge_catalog(&mut self, catalog: &Catalog) -> Result<(bool, Vec<String>), StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut changed = false;
        let mut conflicts = Vec::new();
        for removal in &catalog.removed {
            if removal.name == DEFAULT_NETWORK {
                continue;
            }
            let here: Option<(i64, i64)> = tx
                .query_row("SELECT id, created_at FROM networks WHERE name = ?1", [&removal.name], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()?;
            if here.is_some_and(|(_, created)| created > removal.removed_at) {
                continue;
            }
            if let Some((id, _)) = here {
                let gone = delete_network(&tx, id)?;
                tracing::info!(network = %removal.name, leases = gone.leases, invites = gone.invites,
                    "network removed on another node of the cluster");
            }
            changed |= tx.execute(
                "INSERT INTO removed_networks (name, removed_at) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET removed_at = excluded.removed_at WHERE removed_at < excluded.removed_at",
                params![removal.name, removal.removed_at],
            )? > 0
                || here.is_some();
        }
        let known = networks_in(&tx)?;
        for net in &catalog.networks {
            let Ok(subnet) = net.subnet.parse::<Subnet>() else { continue };
            let removed_at: Option<i64> = tx
                .query_row("SELECT removed_at FROM removed_networks WHERE name = ?1", [&net.name], |r| r.get(0))
                .optional()?;
            if removed_at.is_some_and(|at| at >= net.created_at) {
                continue; // removed after the peer made it: the peer will remove it too
            }
            match known.iter().find(|k| k.name == net.name) {
                Some(k) if k.subnet != subnet => {
                    conflicts.push(format!("network {} is {} here but {} on a peer", net.name, k.subnet, subnet))
                }
                // The cap set last, on whichever node, wins (one set far ahead of this
                // node's clock, a broken clock's, is not taken).
                Some(_) if net.cap_set_ms <= unix_now_ms() + VOID_AHEAD_MS => {
                    changed |= tx.execute(
                        "UPDATE networks SET max_instances = ?2, cap_set_ms = ?3 WHERE name = ?1 AND cap_set_ms < ?3",
                        params![net.name, net.max_instances, net.cap_set_ms],
                    )? > 0;
                }
                Some(_) => {}
                None if valid_network_name(&net.name) => {
                    // The creation time travels with the network, so every node
                    // compares it with a removal alike.
                    let created = if net.created_at > 0 { net.created_at } else { unix_now() };
                    tx.execute(
                        "INSERT INTO networks (name, subnet, created_at, max_instances, cap_set_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![net.name, subnet.to_string(), created, net.max_instances, net.cap_set_ms],
                    )?;
                    tx.execute("DELETE FROM removed_networks WHERE name = ?1", [&net.name])?;
                    changed = true;
                }
                None => {}
            }
        }
        for inv in &catalog.invites {
            let network: Option<i64> =
                tx.query_row("SELECT id FROM networks WHERE name = ?1", [&inv.network], |r| r.get(0)).optional()?;
            let Some(network) = network else { continue };
            let inserted = tx.execute(
                "INSERT INTO invites (network_id, token_hash, kind, max_uses, uses, expires_at, revoked, created_at, label)
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9
                 WHERE NOT EXISTS (SELECT 1 FROM invites WHERE token_hash = ?2)",
                params![network, inv.token_hash, inv.kind, inv.max_uses, inv.uses, inv.expires_at, inv.revoked, inv.created_at, inv.label],
            )?;
            let revoked = tx.execute(
                "UPDATE invites SET revoked = ?2 WHERE token_hash = ?1 AND revoked < ?2",
                params![inv.token_hash, inv.revoked],
            )?;
            // Every node's own count, the highest heard (counts only grow); the total is
            // their sum. A peer that counts no uses per node gives its total.
            let counted = if inv.uses_by.is_empty() {
                tx.execute(
                    "UPDATE invites SET uses = ?2 WHERE token_hash = ?1 AND uses < ?2",
                    params![inv.token_hash, inv.uses],
                )?
            } else {
                for (node, uses) in inv.uses_by.iter().filter(|(_, uses)| **uses >= 0) {
                    if *node == self.node {
                        // More of this node's own than it counts: its database was
                        // restored from a backup. The peers' count stands.
                        tx.execute(
                            "UPDATE invites SET local_uses = ?2 WHERE token_hash = ?1 AND local_uses < ?2",
                            params![inv.token_hash, uses],
                        )?;
                        continue;
                    }
                    tx.execute(
                        "INSERT INTO invite_uses (token_hash, node, uses) VALUES (?1, ?2, ?3)
                         ON CONFLICT (token_hash, node) DO UPDATE SET uses = excluded.uses WHERE uses < excluded.uses",
                        params![inv.token_hash, node, uses],
                    )?;
                }
                tx.execute(
                    "UPDATE invites SET uses = local_uses + (SELECT COALESCE(SUM(uses), 0) FROM invite_uses WHERE token_hash = ?1)
                     WHERE token_hash = ?1 AND uses < local_uses + (SELECT COALESCE(SUM(uses), 0) FROM invite_uses WHERE token_hash = ?1)",
                    [&inv.token_hash],
                )?
            };
            changed |= inserted + revoked + counted > 0;
        }
        for void in &catalog.voided {
            // A time far ahead (a node's broken clock) would void every later lease of
            // the VIP for good: not taken.
            if void.before > unix_now_ms() + VOID_AHEAD_MS {
                continue;
            }
            if !void_lease(&tx, &void.network, void.vip, void.before)? {
                continue;
            }
            changed = true;
            // The lease here goes too if the release is of it (it was made, or its
            // adopted proof issued, before): its holder gets a new VIP at its next join,
            // as on the node that released it.
            let issued: Option<i64> = tx
                .query_row(
                    "SELECT l.issued_ms FROM leases l JOIN networks n ON n.id = l.network_id
                     WHERE n.name = ?1 AND l.vip = ?2",
                    params![void.network, u32::from(void.vip)],
                    |r| r.get(0),
                )
                .optional()?;
            if issued.is_some_and(|issued| issued < void.before) {
                tx.execute(
                    "DELETE FROM leases WHERE vip = ?2 AND network_id = (SELECT id FROM networks WHERE name = ?1)",
                    params![void.network, u32::from(void.vip)],
                )?;
                tracing::info!(network = %void.network, vip = %void.vip, "lease released on another node of the cluster");
            }
        }
        tx.commit()?;
        Ok((changed, conflicts))
    }

    /// A number that changes whenever another connection commits to the database (an
    /// operator command): the relay then sends its catalog again.
    pub fn data_version(&self) -> Result<i64, StoreError> {
        Ok(self.conn.pragma_query_value(None, "data_version", |r| r.get(0))?)
    }

    /// Labels invite `id` (what it is for, whom it was given to).
    pub fn set_invite_label(&self, id: i64, label: &str) -> Result<(), StoreError> {
        if self.conn.execute("UPDATE invites SET label = ?2 WHERE id = ?1", params![id, label])? == 0 {
            return Err(StoreError::NoSuchInvite(id));
        }
        Ok(())
    }

    /// Checks a token: which network it admits to, or why not.
    pub fn check_token(&self, token: &str, now: i64) -> Result<Result<ValidInvite, TokenProblem>, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT i.id, i.max_uses, i.uses, i.expires_at, i.revoked, n.id, n.name, n.subnet, n.max_instances
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
                        r.get::<_, Option<u32>>(8)?,
                    ))
                },
            )
            .optional()?;
        let Some((id, max_uses, uses, expires_at, revoked, net_id, name, subnet, max_instances)) = row else {
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
            network: network_from_row(net_id, name, subnet, max_instances)?,
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

    /// Records a lease another node of the cluster issued (the client roamed here with
    /// its `proof`), replacing this identity and instance's own lease and any lease of
    /// the same VIP.
    pub fn adopt_lease(
        &mut self,
        network: NetworkId,
        identity: &Fingerprint,
        instance: &str,
        vip: Ipv4Addr,
        proof: &str,
        issued_ms: i64,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "DELETE FROM leases WHERE network_id = ?1 AND (vip = ?2 OR (identity = ?3 AND instance = ?4))",
            params![network, u32::from(vip), identity.to_string(), instance],
        )?;
        let now = unix_now();
        tx.execute(
            "INSERT INTO leases (network_id, identity, instance, vip, created_at, last_seen, proof, issued_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7)",
            params![network, identity.to_string(), instance, u32::from(vip), now, proof, issued_ms],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The proof of an adopted lease (one another node issued), if it is one.
    pub fn lease_proof(
        &self,
        network: NetworkId,
        identity: &Fingerprint,
        instance: &str,
    ) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT proof FROM leases WHERE network_id = ?1 AND identity = ?2 AND instance = ?3",
                params![network, identity.to_string(), instance],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()?
            .flatten())
    }

    /// The lease of (network, `identity`, instance); failing that, a lease made before
    /// version 2 under `legacy` (the hash of the client's whole certificate), which is
    /// then re-keyed on `identity`, so clients keep their VIPs across the upgrade.
    pub fn lease_or_migrate(
        &self,
        network: NetworkId,
        identity: &Fingerprint,
        legacy: &Fingerprint,
        instance: &str,
    ) -> Result<Option<Ipv4Addr>, StoreError> {
        if let Some(vip) = self.lease(network, identity, instance)? {
            return Ok(Some(vip));
        }
        let moved = self.conn.execute(
            "UPDATE leases SET identity = ?2, legacy_identity = 0
             WHERE network_id = ?1 AND identity = ?3 AND instance = ?4 AND legacy_identity = 1",
            params![network, identity.to_string(), legacy.to_string(), instance],
        )?;
        if moved == 0 {
            return Ok(None);
        }
        self.lease(network, identity, instance)
    }

    /// How many instances `identity` holds leases for in `network`.
    pub fn instances(&self, network: NetworkId, identity: &Fingerprint) -> Result<u32, StoreError> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM leases WHERE network_id = ?1 AND identity = ?2",
            params![network, identity.to_string()],
            |r| r.get(0),
        )?)
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

    /// Records when leases' holders were last seen, all in one transaction.
    pub fn touch_leases<'a>(&mut self, seen: impl IntoIterator<Item = (&'a LeaseKey, i64)>) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare(
                "UPDATE leases SET last_seen = MAX(last_seen, ?4) WHERE network_id = ?1 AND identity = ?2 AND instance = ?3",
            )?;
            for (key, at) in seen {
                stmt.execute(params![key.network, key.identity.to_string(), key.instance, at])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Marks the leases of `vips` (network id, VIP) as seen at `at`.
    pub fn touch_vips(
        &mut self,
        vips: impl IntoIterator<Item = (NetworkId, Ipv4Addr)>,
        at: i64,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt =
                tx.prepare("UPDATE leases SET last_seen = MAX(last_seen, ?3) WHERE network_id = ?1 AND vip = ?2")?;
            for (network, vip) in vips {
                stmt.execute(params![network, u32::from(vip), at])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Leases of one network (or all), by network and VIP.
    pub fn lease_rows(&self, network: Option<&str>) -> Result<Vec<LeaseRow>, StoreError> {
        if let Some(name) = network {
            self.network(name)?;
        }
        let mut stmt = self.conn.prepare(
            "SELECT n.name, l.vip, l.identity, l.instance, l.created_at, l.last_seen
             FROM leases l JOIN networks n ON n.id = l.network_id
             WHERE ?1 IS NULL OR n.name = ?1 ORDER BY n.name, l.vip",
        )?;
        let rows = stmt.query_map([network], |r| {
            Ok(LeaseRow {
                network: r.get(0)?,
                vip: Ipv4Addr::from(r.get::<_, u32>(1)?),
                identity: r.get(2)?,
                instance: r.get(3)?,
                created_at: r.get(4)?,
                last_seen: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes the lease of `vip` in `network`; returns what it was.
    pub fn release_lease(&mut self, network: &str, vip: Ipv4Addr) -> Result<LeaseRow, StoreError> {
        let row = self
            .lease_rows(Some(network))?
            .into_iter()
            .find(|l| l.vip == vip)
            .ok_or_else(|| StoreError::NoSuchLease { network: network.to_owned(), vip })?;
        let net = self.network(network)?;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let issued: i64 = tx.query_row(
            "SELECT issued_ms FROM leases WHERE network_id = ?1 AND vip = ?2",
            params![net.id, u32::from(vip)],
            |r| r.get(0),
        )?;
        tx.execute("DELETE FROM leases WHERE network_id = ?1 AND vip = ?2", params![net.id, u32::from(vip)])?;
        void_lease(&tx, network, vip, issued + 1)?;
        tx.commit()?;
        Ok(row)
    }

    /// Proofs of `vip` in `network` issued before this (unix ms, the issuer's clock) are
    /// void: a lease of it issued then or earlier was released.
    pub fn voided_before(&self, network: &str, vip: Ipv4Addr) -> Result<Option<i64>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT before FROM voided_leases WHERE network = ?1 AND vip = ?2",
                params![network, u32::from(vip)],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// When the lease of `vip` in `network` was issued, unix milliseconds.
    pub fn lease_issued_ms(&self, network: NetworkId, vip: Ipv4Addr) -> Result<Option<i64>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT issued_ms FROM leases WHERE network_id = ?1 AND vip = ?2",
                params![network, u32::from(vip)],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Deletes leases last seen before `before` (unix seconds), except those in `keep`
    /// (online now). Returns the VIPs released. The proofs of this node's own leases are
    /// voided with them; a copy adopted here just goes (its holder may use the lease on
    /// its issuing node every day).
    pub fn expire_leases(
        &mut self,
        before: i64,
        keep: &HashSet<(NetworkId, Ipv4Addr)>,
    ) -> Result<Vec<(NetworkId, Ipv4Addr)>, StoreError> {
        let tx = self.conn.transaction()?;
        let stale: Vec<(NetworkId, Ipv4Addr, bool, i64)> = {
            let mut stmt =
                tx.prepare("SELECT network_id, vip, proof IS NULL, issued_ms FROM leases WHERE last_seen < ?1")?;
            let rows = stmt
                .query_map([before], |r| Ok((r.get(0)?, Ipv4Addr::from(r.get::<_, u32>(1)?), r.get(2)?, r.get(3)?)))?;
            rows.collect::<Result<Vec<_>, _>>()?.into_iter().filter(|(n, v, _, _)| !keep.contains(&(*n, *v))).collect()
        };
        for (net, vip, own, issued) in &stale {
            tx.execute("DELETE FROM leases WHERE network_id = ?1 AND vip = ?2", params![net, u32::from(*vip)])?;
            if *own {
                let name: String = tx.query_row("SELECT name FROM networks WHERE id = ?1", [net], |r| r.get(0))?;
                void_lease(&tx, &name, *vip, issued + 1)?;
            }
        }
        tx.commit()?;
        Ok(stale.into_iter().map(|(net, vip, _, _)| (net, vip)).collect())
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
            "UPDATE invites SET uses = uses + 1, local_uses = local_uses + 1
             WHERE id = ?1 AND (max_uses IS NULL OR uses < max_uses)",
            [invite],
        )?;
        if used == 0 {
            return Ok(false);
        }
        let now = unix_now();
        tx.execute(
            "INSERT INTO leases (network_id, identity, instance, vip, created_at, last_seen, issued_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5, MAX(?6, COALESCE((SELECT v.before FROM voided_leases v
                 JOIN networks n ON n.name = v.network WHERE n.id = ?1 AND v.vip = ?4), 0)))",
            params![network, identity.to_string(), instance, u32::from(vip), now, unix_now_ms()],
        )?;
        tx.commit()?;
        Ok(true)
    }
}

fn network_from_row(id: i64, name: String, subnet: String, max_instances: Option<u32>) -> Result<Network, StoreError> {
    let subnet = subnet.parse().map_err(|e| StoreError::Corrupt(format!("network {name}: {e}")))?;
    Ok(Network { id, key: NetKey::of(&name), name, subnet, max_instances })
}

/// What removing a network took with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemovedNetwork {
    /// Leases released.
    pub leases: usize,
    /// Invites deleted.
    pub invites: usize,
}

/// Deletes network `id` with its leases and invites (inside the caller's transaction).
fn delete_network(tx: &Connection, id: i64) -> Result<RemovedNetwork, StoreError> {
    let leases = tx.execute("DELETE FROM leases WHERE network_id = ?1", [id])?;
    let invites = tx.execute("DELETE FROM invites WHERE network_id = ?1", [id])?;
    tx.execute("DELETE FROM networks WHERE id = ?1", [id])?;
    Ok(RemovedNetwork { leases, invites })
}

fn networks_in(conn: &Connection) -> Result<Vec<Network>, StoreError> {
    let mut stmt = conn.prepare("SELECT id, name, subnet, max_instances FROM networks ORDER BY name")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
    rows.map(|r| {
        let (id, name, subnet, max) = r?;
        network_from_row(id, name, subnet, max)
    })
    .collect()
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
        let mut store = Store::open(dir.path()).unwrap();
        store.ensure_default_network("10.77.0.0/16".parse().unwrap()).unwrap();
        assert_eq!(store.check_token("nope", 0).unwrap().unwrap_err(), TokenProblem::Unknown);
        store.add_invite("default", "exp", "issued", None, Some(Duration::from_secs(60))).unwrap();
        assert!(store.check_token("exp", unix_now()).unwrap().is_ok());
        assert_eq!(store.check_token("exp", unix_now() + 61).unwrap().unwrap_err(), TokenProblem::Expired);
        let id = store.add_invite("default", "rev", "issued", None, None).unwrap();
        assert!(store.revoke_invite(id).unwrap(), "revoked now");
        assert!(!store.revoke_invite(id).unwrap(), "revoked already");
        assert_eq!(store.check_token("rev", 0).unwrap().unwrap_err(), TokenProblem::Revoked);
        // Re-adding a revoked token does not revive it.
        store.add_invite("default", "rev", "default", None, None).unwrap();
        assert!(store.invite_revoked("rev").unwrap());
        assert!(matches!(store.revoke_invite(999), Err(StoreError::NoSuchInvite(999))));
    }

    #[test]
    fn invite_ids_are_never_given_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.ensure_default_network("10.77.0.0/16".parse().unwrap()).unwrap();
        store.add_network("games", "10.90.0.0/16".parse().unwrap()).unwrap();
        let a = store.add_invite("games", "token-a", "issued", None, None).unwrap();
        let b = store.add_invite("games", "token-b", "issued", None, None).unwrap();
        store.remove_network("games").unwrap();
        let c = store.add_invite(DEFAULT_NETWORK, "token-c", "issued", None, None).unwrap();
        assert!(c > a.max(b), "invite {c} reuses an id of the deleted ones ({a}, {b})");
        // A token stored already keeps its id and spends none.
        assert_eq!(store.add_invite(DEFAULT_NETWORK, "token-c", "issued", None, None).unwrap(), c);
        // Also across a restart.
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let d = store.add_invite(DEFAULT_NETWORK, "token-d", "issued", None, None).unwrap();
        assert_eq!(d, c + 1);
    }

    #[test]
    fn networks_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
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

#[cfg(test)]
mod schema_tests {
    use super::*;

    /// The first release's schema, as it created it.
    const VERSION_1: &str = "CREATE TABLE networks (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
            subnet TEXT NOT NULL, created_at INTEGER NOT NULL);
        CREATE TABLE invites (id INTEGER PRIMARY KEY, network_id INTEGER NOT NULL REFERENCES networks(id),
            token_hash TEXT NOT NULL UNIQUE, kind TEXT NOT NULL DEFAULT 'issued', max_uses INTEGER,
            uses INTEGER NOT NULL DEFAULT 0, expires_at INTEGER, revoked INTEGER NOT NULL DEFAULT 0,
            created_at INTEGER NOT NULL);
        CREATE TABLE leases (network_id INTEGER NOT NULL REFERENCES networks(id), identity TEXT NOT NULL,
            instance TEXT NOT NULL, vip INTEGER NOT NULL, created_at INTEGER NOT NULL, last_seen INTEGER NOT NULL,
            PRIMARY KEY (network_id, identity, instance), UNIQUE (network_id, vip));";

    #[test]
    fn version_1_leases_are_migrated_to_the_public_key() {
        let dir = tempfile::tempdir().unwrap();
        let cert = Fingerprint::of(b"whole certificate");
        let key = Fingerprint::of(b"public key");
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute_batch(VERSION_1).unwrap();
            conn.execute("INSERT INTO networks VALUES (1, 'default', '10.77.0.0/16', 0)", []).unwrap();
            let vip = u32::from(Ipv4Addr::new(10, 77, 0, 9));
            conn.execute("INSERT INTO leases VALUES (1, ?1, 'game', ?2, 0, 0)", params![cert.to_string(), vip])
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let version: i64 = store.conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(store.lease(1, &key, "game").unwrap(), None);
        let vip = store.lease_or_migrate(1, &key, &cert, "game").unwrap();
        assert_eq!(vip, Some(Ipv4Addr::new(10, 77, 0, 9)), "the old lease is found through the certificate hash");
        assert_eq!(store.lease(1, &key, "game").unwrap(), vip, "and re-keyed on the public key");
        assert_eq!(store.lease_or_migrate(1, &Fingerprint::of(b"other"), &cert, "game").unwrap(), None, "only once");
        drop(store);
        Store::open(dir.path()).unwrap(); // opening a current database again is a no-op
    }

    #[test]
    fn version_2_gains_lease_proofs_and_adopted_leases_replace_their_holders_own() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute_batch(VERSION_1).unwrap();
            conn.execute_batch(
                "ALTER TABLE networks ADD COLUMN max_instances INTEGER;
                 ALTER TABLE leases ADD COLUMN legacy_identity INTEGER NOT NULL DEFAULT 0;
                 PRAGMA user_version = 2;",
            )
            .unwrap();
            conn.execute("INSERT INTO networks VALUES (1, 'default', '10.77.0.0/16', 0, NULL)", []).unwrap();
        }
        let mut store = Store::open(dir.path()).unwrap();
        let me = Fingerprint::of(b"me");
        let own = Ipv4Addr::new(10, 77, 0, 9);
        store
            .conn
            .execute("INSERT INTO leases (network_id, identity, instance, vip, created_at, last_seen) VALUES (1, ?1, 'game', ?2, 0, 0)", params![me.to_string(), u32::from(own)])
            .unwrap();
        assert_eq!(store.lease(1, &me, "game").unwrap(), Some(own));
        assert_eq!(store.lease_proof(1, &me, "game").unwrap(), None, "a node's own lease has no proof stored");
        let roamed = Ipv4Addr::new(10, 77, 16, 4);
        store.adopt_lease(1, &me, "game", roamed, "proof-text", 0).unwrap();
        assert_eq!(store.lease(1, &me, "game").unwrap(), Some(roamed));
        assert_eq!(store.lease_proof(1, &me, "game").unwrap().as_deref(), Some("proof-text"));
        assert_eq!(store.lease_proof(1, &Fingerprint::of(b"other"), "game").unwrap(), None);
    }

    #[test]
    fn writes_reach_the_disk_before_they_are_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let sync: i64 = store.conn.pragma_query_value(None, "synchronous", |r| r.get(0)).unwrap();
        assert_eq!(sync, 2, "synchronous=FULL");
    }

    #[test]
    fn a_newer_schema_is_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        Connection::open(dir.path().join(DB_FILE)).unwrap().pragma_update(None, "user_version", 99).unwrap();
        let err = Store::open(dir.path()).err().expect("refused").to_string();
        assert!(err.contains("schema version 99") && err.contains(DB_FILE), "{err}");
    }

    #[test]
    fn one_relay_per_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let lock = DataDirLock::acquire(dir.path()).unwrap();
        let err = DataDirLock::acquire(dir.path()).err().expect("second lock refused").to_string();
        assert!(err.contains("in use by another relay") && err.contains("pid"), "{err}");
        drop(lock);
        DataDirLock::acquire(dir.path()).expect("free again once released");
    }

    #[test]
    fn a_removed_network_goes_everywhere_and_the_later_of_removal_and_creation_wins() {
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut a = Store::open(a_dir.path()).unwrap();
        let mut b = Store::open(b_dir.path()).unwrap();
        a.ensure_default_network("10.77.0.0/16".parse().unwrap()).unwrap();
        assert!(matches!(a.remove_network(DEFAULT_NETWORK), Err(StoreError::DefaultNetworkStays)));
        let lan = a.add_network("lan", "10.88.0.0/24".parse().unwrap()).unwrap();
        let invite = a.add_invite("lan", "tok", "issued", None, None).unwrap();
        assert!(a.create_lease(invite, lan.id, &Fingerprint::of(b"m"), "", "10.88.0.2".parse().unwrap()).unwrap());
        b.merge_catalog(&a.catalog().unwrap()).unwrap();
        assert!(b.network("lan").is_ok());
        // Made a second ago, so the removal (now) is later.
        a.conn.execute("UPDATE networks SET created_at = created_at - 1", []).unwrap();
        b.conn.execute("UPDATE networks SET created_at = created_at - 1", []).unwrap();
        let stale = b.catalog().unwrap();
        assert_eq!(a.remove_network("lan").unwrap(), RemovedNetwork { leases: 1, invites: 1 });
        assert!(matches!(a.remove_network("lan"), Err(StoreError::NoSuchNetwork(_))));
        assert!(a.check_token("tok", unix_now()).unwrap().is_err(), "its invites went with it");
        // An older catalog does not bring it back; the removal reaches the other node.
        assert!(!a.merge_catalog(&stale).unwrap().0);
        assert!(a.network("lan").is_err());
        assert!(b.merge_catalog(&a.catalog().unwrap()).unwrap().0);
        assert!(b.network("lan").is_err());
        assert!(b.check_token("tok", unix_now()).unwrap().is_err());
        // Added again later (on b): the new network wins over the old removal on a.
        b.conn.execute("UPDATE removed_networks SET removed_at = removed_at - 1", []).unwrap();
        a.conn.execute("UPDATE removed_networks SET removed_at = removed_at - 1", []).unwrap();
        b.add_network("lan", "10.99.0.0/24".parse().unwrap()).unwrap();
        assert!(a.merge_catalog(&b.catalog().unwrap()).unwrap().0);
        assert_eq!(a.network("lan").unwrap().subnet, "10.99.0.0/24".parse().unwrap());
        assert!(a.catalog().unwrap().removed.is_empty());
    }

    #[test]
    fn leases_are_listed_released_and_expired() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let net = store.ensure_default_network("10.77.0.0/16".parse().unwrap()).unwrap();
        let invite = store.add_invite("default", "tok", "issued", None, None).unwrap();
        let (a, b) = (Fingerprint::of(b"a"), Fingerprint::of(b"b"));
        let (va, vb): (Ipv4Addr, Ipv4Addr) = ("10.77.0.2".parse().unwrap(), "10.77.0.3".parse().unwrap());
        store.create_lease(invite, net.id, &a, "", va).unwrap();
        store.create_lease(invite, net.id, &b, "x", vb).unwrap();
        assert_eq!(store.instances(net.id, &a).unwrap(), 1);
        let rows = store.lease_rows(Some("default")).unwrap();
        assert_eq!(rows.iter().map(|r| r.vip).collect::<Vec<_>>(), vec![va, vb]);
        assert!(matches!(store.lease_rows(Some("nope")), Err(StoreError::NoSuchNetwork(_))));

        // Seen online (every minute, by VIP): a, as long as it is online.
        let online_at = unix_now() + 500;
        store.touch_vips([(net.id, va)], online_at).unwrap();
        assert_eq!(store.lease_rows(None).unwrap()[0].last_seen, online_at);
        let key = LeaseKey { network: net.id, identity: b, instance: "x".into() };
        store.touch_leases([(&key, unix_now() + 1000)]).unwrap();
        let keep: HashSet<_> = HashSet::new();
        let expired = store.expire_leases(unix_now() + 600, &keep).unwrap();
        assert_eq!(expired, vec![(net.id, va)], "only the lease not seen since");

        let released = store.release_lease("default", vb).unwrap();
        assert_eq!(released.instance, "x");
        assert!(matches!(store.release_lease("default", vb), Err(StoreError::NoSuchLease { .. })));
        assert!(store.lease_rows(None).unwrap().is_empty());
        // Both releases void the leases' proofs, expiry too.
        let now = unix_now_ms();
        for vip in [va, vb] {
            assert!(store.voided_before("default", vip).unwrap().is_some_and(|t| t >= now - 2000 && t <= now));
        }
        assert_eq!(store.voided_before("default", "10.77.0.4".parse().unwrap()).unwrap(), None);
    }

    /// Uses of one invite on different nodes add up: each node counts its own, catalogs
    /// carry every node's count, and the total is their sum (the highest total any
    /// node saw would let each node admit up to the limit).
    #[test]
    fn invite_uses_on_different_nodes_add_up() {
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut nodes: Vec<Store> = dirs.iter().map(|d| Store::open(d.path()).unwrap()).collect();
        for (node, name) in nodes.iter_mut().zip(["a", "b", "c"]) {
            node.set_node_name(name);
            node.ensure_default_network("10.77.0.0/16".parse().unwrap()).unwrap();
        }
        nodes[0].add_invite("default", "tok", "issued", Some(2), None).unwrap();
        let catalog = nodes[0].catalog().unwrap();
        nodes[1].merge_catalog(&catalog).unwrap();
        nodes[2].merge_catalog(&catalog).unwrap();
        // One member on a, one on b, at the same moment.
        for (i, who) in [(0, "m1"), (1, "m2")] {
            let valid = nodes[i].check_token("tok", unix_now()).unwrap().unwrap();
            assert!(valid.has_uses_left);
            let net = nodes[i].network("default").unwrap();
            let vip = Ipv4Addr::new(10, 77, 0, 2 + i as u8);
            assert!(nodes[i].create_lease(valid.id, net.id, &Fingerprint::of(who.as_bytes()), "", vip).unwrap());
        }
        let (from_a, from_b) = (nodes[0].catalog().unwrap(), nodes[1].catalog().unwrap());
        for node in nodes.iter_mut() {
            node.merge_catalog(&from_a).unwrap();
            node.merge_catalog(&from_b).unwrap();
        }
        for (i, node) in nodes.iter().enumerate() {
            let valid = node.check_token("tok", unix_now()).unwrap().unwrap();
            assert!(!valid.has_uses_left, "node {i}: both uses count");
            assert_eq!(node.catalog().unwrap().invites[0].uses, 2, "node {i}");
        }
        // Hearing a count again, or an older one, changes nothing.
        assert!(!nodes[2].merge_catalog(&from_a).unwrap().0);
        assert!(!nodes[0].merge_catalog(&catalog).unwrap().0);
    }

    /// Schema 6 kept one count per invite, the highest any node saw: it carries over as
    /// a count every node shares (not as each node's own, which would add it up once
    /// per node).
    #[test]
    fn version_6_use_counts_carry_over_once() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = Store::open(dir.path()).unwrap();
            store.ensure_default_network("10.77.0.0/16".parse().unwrap()).unwrap();
            store.add_invite("default", "tok", "issued", Some(5), None).unwrap();
            store
                .conn
                .execute_batch(
                    "UPDATE invites SET uses = 3;
                     DROP TABLE voided_leases;
                     DROP TABLE invite_uses;
                     ALTER TABLE leases DROP COLUMN issued_ms;
                     ALTER TABLE invites DROP COLUMN local_uses;
                     ALTER TABLE networks DROP COLUMN cap_set_ms;
                     PRAGMA user_version = 6;",
                )
                .unwrap();
        }
        let mut store = Store::open(dir.path()).unwrap();
        store.set_node_name("n1");
        let invite = &store.catalog().unwrap().invites[0];
        assert_eq!(invite.uses, 3);
        assert_eq!(invite.uses_by.get("(schema 6)"), Some(&3));
        assert_eq!(invite.uses_by.get("n1"), None, "none of them this node's own");
        // The same carried-over count from a peer adds nothing.
        let from_peer = store.catalog().unwrap();
        assert!(!store.merge_catalog(&from_peer).unwrap().0);
        let valid = store.check_token("tok", unix_now()).unwrap().unwrap();
        let net = store.network("default").unwrap();
        store.create_lease(valid.id, net.id, &Fingerprint::of(b"m"), "", "10.77.0.2".parse().unwrap()).unwrap();
        assert_eq!(store.catalog().unwrap().invites[0].uses, 4);
    }

    /// A network's instance cap set on one node reaches the others: the latest setting
    /// wins, whichever node made it; one from far ahead of the clock is not taken.
    #[test]
    fn the_latest_instance_cap_set_on_any_node_wins() {
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut a = Store::open(a_dir.path()).unwrap();
        let mut b = Store::open(b_dir.path()).unwrap();
        a.add_network("games", "10.90.0.0/16".parse().unwrap()).unwrap();
        a.set_max_instances("games", Some(2)).unwrap();
        b.merge_catalog(&a.catalog().unwrap()).unwrap();
        assert_eq!(b.network("games").unwrap().max_instances, Some(2), "made with its cap");
        // Set again on b, later: a takes it; a's older catalog does not undo it on b.
        let older = a.catalog().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        b.set_max_instances("games", None).unwrap();
        let (changed, _) = a.merge_catalog(&b.catalog().unwrap()).unwrap();
        assert!(changed);
        assert_eq!(a.network("games").unwrap().max_instances, None);
        let (changed, _) = b.merge_catalog(&older).unwrap();
        assert!(!changed);
        assert_eq!(b.network("games").unwrap().max_instances, None);
        // A setting from a clock an hour and more ahead is not taken.
        let mut ahead = a.catalog().unwrap();
        let games = ahead.networks.iter_mut().find(|n| n.name == "games").unwrap();
        games.max_instances = Some(9);
        games.cap_set_ms = unix_now_ms() + 2 * VOID_AHEAD_MS;
        b.merge_catalog(&ahead).unwrap();
        assert_eq!(b.network("games").unwrap().max_instances, None);
    }

    /// A release on one node voids the lease's proofs on every node: the void travels in
    /// the catalog, and the lease goes where it was adopted (or made) before the
    /// release; a lease made after it stays, and the latest release counts.
    #[test]
    fn released_leases_travel_in_catalogs_and_take_their_adopted_copies() {
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut a = Store::open(a_dir.path()).unwrap();
        let mut b = Store::open(b_dir.path()).unwrap();
        let net_a = a.ensure_default_network("10.77.0.0/16".parse().unwrap()).unwrap();
        let net_b = b.ensure_default_network("10.77.0.0/16".parse().unwrap()).unwrap();
        let invite = a.add_invite("default", "tok", "issued", None, None).unwrap();
        let (me, other) = (Fingerprint::of(b"me"), Fingerprint::of(b"other"));
        let (v, w): (Ipv4Addr, Ipv4Addr) = ("10.77.0.9".parse().unwrap(), "10.77.0.10".parse().unwrap());
        // `me` holds v on a, and b adopted it (a proof issued a second ago); `other`
        // holds w on b, adopted from a proof issued later (a lease made after a release).
        a.create_lease(invite, net_a.id, &me, "", v).unwrap();
        let now = unix_now_ms();
        b.adopt_lease(net_b.id, &me, "", v, "proof", now - 1000).unwrap();
        b.adopt_lease(net_b.id, &other, "", w, "proof", now + 100_000).unwrap();

        a.release_lease("default", v).unwrap();
        let catalog = a.catalog().unwrap();
        assert_eq!(catalog.voided.len(), 1);
        assert!(b.merge_catalog(&catalog).unwrap().0);
        assert_eq!(b.lease(net_b.id, &me, "").unwrap(), None, "the adopted copy goes");
        assert!(b.voided_before("default", v).unwrap().is_some());
        assert!(!b.merge_catalog(&catalog).unwrap().0, "nothing new the second time");
        // A void of w older than its lease leaves it.
        let old = Catalog {
            voided: vec![CatalogVoid { network: "default".into(), vip: w, before: unix_now_ms() }],
            ..Catalog::default()
        };
        assert!(b.merge_catalog(&old).unwrap().0);
        assert_eq!(b.lease(net_b.id, &other, "").unwrap(), Some(w));
        // An earlier release does not move the time back.
        let earlier = Catalog {
            voided: vec![CatalogVoid { network: "default".into(), vip: w, before: 5 }],
            ..Catalog::default()
        };
        assert!(!b.merge_catalog(&earlier).unwrap().0);
        assert!(b.voided_before("default", w).unwrap().is_some_and(|t| t > 5));
        // A time far ahead (a broken clock) is not taken.
        let ahead = Catalog {
            voided: vec![CatalogVoid { network: "default".into(), vip: w, before: unix_now_ms() + 86_400_000 }],
            ..Catalog::default()
        };
        assert!(!b.merge_catalog(&ahead).unwrap().0);
        assert_eq!(b.lease(net_b.id, &other, "").unwrap(), Some(w));
        // An adopted copy that expires here just goes: its holder may use the lease on
        // its issuing node every day.
        let keep = HashSet::new();
        assert_eq!(b.expire_leases(unix_now() + 10, &keep).unwrap(), vec![(net_b.id, w)]);
        assert!(b.catalog().unwrap().voided.iter().all(|v| v.vip != w || v.before < unix_now_ms()));
        // A lease made again after a release is issued after it (whatever the clock).
        a.conn.execute("UPDATE voided_leases SET before = before + 60000", []).unwrap();
        let before = a.voided_before("default", v).unwrap().unwrap();
        a.create_lease(invite, net_a.id, &other, "", v).unwrap();
        assert!(a.lease_issued_ms(net_a.id, v).unwrap().unwrap() >= before);
    }
}
