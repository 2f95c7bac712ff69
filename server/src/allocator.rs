//! `VipAllocatorActor`: the one owner of the lease database at run time. It runs on its
//! own thread (a `SyncArbiter`), so SQLite never blocks the session arbiter. It checks
//! join tokens, finds or creates the permanent lease of (network, identity, instance),
//! hands VIPs out of a per-network [`VipPool`], and enforces the per-identity instance
//! cap. A lease is written synchronously before the client is told about it; when a
//! member was last seen is only bookkeeping, collected in memory and written in batches,
//! so a busy or full disk never turns a returning member away.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use overlan_shared::cluster::{
    in_slot, sign_lease, slot_block, verify_lease, ClusterError, LeaseClaim, NodeCredentials,
};
use overlan_shared::config::Secret;
use overlan_shared::pool::VipPool;
use overlan_shared::route::NetKey;
use overlan_shared::tls::Fingerprint;
use overlan_shared::wire::peer::{Catalog, CatalogVoid};
use overlan_shared::Subnet;

use crate::counters::{Counters, Reason};
use crate::store::{unix_now, LeaseKey, LeaseRow, Network, NetworkId, Store, StoreError, TokenProblem};

/// How long the allocator waits for another connection's write lock (an operator
/// command) before failing a new lease; returning members do not write.
const BUSY_TIMEOUT: Duration = Duration::from_secs(1);

/// Owns the store and the VIP pools.
pub struct VipAllocatorActor {
    store: Store,
    pools: HashMap<NetworkId, VipPool>,
    default_max_instances: u32,
    /// In a cluster, this node's credentials: it hands out VIPs from its slot's block of
    /// each subnet, signs the leases it issues and checks those other nodes issued.
    cluster: Option<NodeCredentials>,
    /// Last-seen times not written yet.
    seen: HashMap<LeaseKey, i64>,
    /// What was last sent to the cluster's other nodes, and the database version then.
    catalog: CatalogState,
    counters: Arc<Counters>,
}

impl VipAllocatorActor {
    /// Opens the store in `data_dir`; identities hold at most `default_max_instances`
    /// instances in networks that set no cap of their own. A cluster node (`cluster`)
    /// hands out only its slot's block of each subnet.
    pub fn open(
        data_dir: &Path,
        default_max_instances: u32,
        cluster: Option<NodeCredentials>,
        counters: Arc<Counters>,
    ) -> Result<Self, StoreError> {
        let mut store = Store::open(data_dir)?;
        store.set_busy_timeout(BUSY_TIMEOUT)?;
        if let Some(creds) = &cluster {
            store.set_node_name(&creds.name);
        }
        Ok(Self {
            store,
            pools: HashMap::new(),
            default_max_instances,
            cluster,
            seen: HashMap::new(),
            counters,
            catalog: CatalogState::default(),
        })
    }

    fn pool(&mut self, network: &Network) -> Result<&mut VipPool, StoreError> {
        // A network removed and another added may share a database id: a pool of
        // another subnet is of the removed one.
        if self.pools.get(&network.id).is_some_and(|p| p.subnet() != network.subnet) {
            self.pools.remove(&network.id);
        }
        if !self.pools.contains_key(&network.id) {
            let mut pool = match self.cluster.as_ref().map(|c| c.slot) {
                None => VipPool::new(network.subnet),
                Some(slot) => match slot_block(network.subnet, slot) {
                    Some(block) => VipPool::for_block(network.subnet, block),
                    None => {
                        tracing::warn!(network = %network.name, subnet = %network.subnet,
                            "subnet too small to share among cluster nodes (needs /24 or larger); no VIPs to hand out");
                        VipPool::empty(network.subnet)
                    }
                },
            };
            for lease in self.store.leases(network.id)? {
                // Leases adopted from other nodes lie outside this node's block.
                if !pool.handle_existing_lease(lease.vip) && self.cluster.is_none() {
                    tracing::warn!(network = %network.name, vip = %lease.vip, "stored lease outside the network's assignable range");
                }
            }
            self.pools.insert(network.id, pool);
        }
        Ok(self.pools.get_mut(&network.id).expect("inserted above"))
    }

    fn admit(&mut self, msg: AllocateVip) -> Result<Admission, AdmitError> {
        let invite = match self.store.check_token(msg.token.expose(), unix_now())? {
            Ok(invite) => invite,
            Err(problem) => return Err(AdmitError::Token(problem)),
        };
        let network = invite.network;
        if let Some(named) = msg.network.as_ref().filter(|n| **n != network.name) {
            return Err(AdmitError::WrongNetwork { uri: named.clone(), token: network.name });
        }
        if let Some(proof) = &msg.lease {
            if let Some(vip) = self.adopt(&network, &msg, proof)? {
                let proof = Some(proof.clone());
                self.mark_seen(LeaseKey { network: network.id, identity: msg.identity, instance: msg.instance });
                return Ok(Admission { network, vip, new_lease: false, proof });
            }
        }
        if let Some(vip) = self.store.lease_or_migrate(network.id, &msg.identity, &msg.legacy, &msg.instance)? {
            let proof = self.proof(&network, vip, &msg)?;
            self.mark_seen(LeaseKey { network: network.id, identity: msg.identity, instance: msg.instance });
            return Ok(Admission { network, vip, new_lease: false, proof });
        }
        if msg.existing_only {
            return Err(AdmitError::NoLease { network: network.name, instance: msg.instance });
        }
        if !invite.has_uses_left {
            return Err(AdmitError::Token(TokenProblem::UsedUp));
        }
        let limit = network.max_instances.unwrap_or(self.default_max_instances);
        if self.store.instances(network.id, &msg.identity)? >= limit {
            self.counters.add(Reason::InstanceLimit);
            return Err(AdmitError::InstanceLimit { network: network.name, limit });
        }
        let pool = self.pool(&network)?;
        let Some(vip) = pool.poll_allocate() else {
            return Err(AdmitError::NetworkFull { network: network.name.clone(), subnet: network.subnet });
        };
        match self.store.create_lease(invite.id, network.id, &msg.identity, &msg.instance, vip) {
            Ok(true) => {
                // The invite's use count moved: peers hear it with the next catalog (this
                // connection's own writes do not move SQLite's data_version).
                self.catalog.dirty = true;
                let proof = self.proof(&network, vip, &msg)?;
                Ok(Admission { network, vip, new_lease: true, proof })
            }
            Ok(false) => {
                self.pool(&network)?.handle_release(vip);
                Err(AdmitError::Token(TokenProblem::UsedUp))
            }
            Err(e) => {
                self.pool(&network)?.handle_release(vip);
                Err(e.into())
            }
        }
    }

    /// A lease another node issued, presented by its holder: adopted (recorded here,
    /// so this node serves it too) if the proof holds up. An invalid proof is logged and
    /// ignored; the client is then admitted as if it had none. A proof of this node's
    /// own lease adds nothing: its database has the lease.
    fn adopt(&mut self, network: &Network, msg: &AllocateVip, proof: &str) -> Result<Option<Ipv4Addr>, StoreError> {
        let Some(creds) = &self.cluster else { return Ok(None) };
        let checked = verify_lease(proof, &creds.ca).and_then(|(claim, issuer)| {
            let fits = claim.network == network.name
                && claim.identity == msg.identity.to_string()
                && claim.instance == msg.instance
                && in_slot(network.subnet, issuer.slot, claim.vip);
            match fits {
                true => Ok((claim, issuer)),
                false => Err(ClusterError::Untrusted("the lease is another client's, network's or slot's".into())),
            }
        });
        let (claim, issuer) = match checked {
            Ok(checked) => checked,
            Err(e) => {
                tracing::warn!(network = %network.name, error = %e, "ignoring a lease proof");
                return Ok(None);
            }
        };
        if issuer.name == creds.name {
            return Ok(None);
        }
        if self.store.voided_before(&network.name, claim.vip)?.is_some_and(|before| claim.issued < before) {
            tracing::warn!(network = %network.name, vip = %claim.vip, issuer = %issuer.name,
                "ignoring a lease proof: the lease was released after it was issued");
            return Ok(None);
        }
        if self.store.lease(network.id, &msg.identity, &msg.instance)? != Some(claim.vip) {
            self.store.adopt_lease(network.id, &msg.identity, &msg.instance, claim.vip, proof, claim.issued)?;
            tracing::info!(network = %network.name, vip = %claim.vip, issuer = %issuer.name, "adopted a lease issued by another node");
        }
        Ok(Some(claim.vip))
    }

    /// The proof to give the holder of `vip`: the issuer's, for an adopted lease; else
    /// this node signs one (only in a cluster).
    fn proof(&self, network: &Network, vip: Ipv4Addr, msg: &AllocateVip) -> Result<Option<String>, StoreError> {
        let Some(creds) = &self.cluster else { return Ok(None) };
        if let Some(proof) = self.store.lease_proof(network.id, &msg.identity, &msg.instance)? {
            return Ok(Some(proof));
        }
        let claim = LeaseClaim {
            network: network.name.clone(),
            vip,
            identity: msg.identity.to_string(),
            instance: msg.instance.clone(),
            issuer: creds.name.clone(),
            issued: self.store.lease_issued_ms(network.id, vip)?.unwrap_or_else(crate::store::unix_now_ms),
        };
        match sign_lease(creds, &claim) {
            Ok(proof) => Ok(Some(proof)),
            Err(e) => {
                tracing::error!(error = %e, "cannot sign a lease");
                Ok(None)
            }
        }
    }

    fn mark_seen(&mut self, key: LeaseKey) {
        self.seen.insert(key, unix_now());
    }

    /// Writes the collected last-seen times; a failure is logged and counted, and the
    /// times are kept for the next try.
    fn flush_seen(&mut self) {
        if self.seen.is_empty() {
            return;
        }
        match self.store.touch_leases(self.seen.iter().map(|(k, at)| (k, *at))) {
            Ok(()) => self.seen.clear(),
            Err(e) => {
                self.counters.add(Reason::LastSeenFailed);
                tracing::warn!(error = %e, pending = self.seen.len(), "could not record when members were last seen; will retry");
            }
        }
    }
}

impl Actor for VipAllocatorActor {
    type Context = SyncContext<Self>;

    fn stopping(&mut self, _ctx: &mut Self::Context) -> Running {
        self.flush_seen();
        Running::Stop
    }
}

/// Admit a client: check its token and return its permanent VIP, leasing one if needed.
#[derive(Message)]
#[rtype(result = "Result<Admission, AdmitError>")]
pub struct AllocateVip {
    /// The join token.
    pub token: Secret,
    /// The client's identity: the SHA-256 of its certificate's public key.
    pub identity: Fingerprint,
    /// The SHA-256 of its whole certificate, which schema version 1 keyed leases on.
    pub legacy: Fingerprint,
    /// Instance name.
    pub instance: String,
    /// A lease proof the client presents (it joined another node of the cluster before).
    pub lease: Option<String>,
    /// The network the client's invite URI names, if it said.
    pub network: Option<String>,
    /// Admit only with a lease held already (`overlan leave`), never make one.
    pub existing_only: bool,
}

/// A successful admission.
#[derive(Debug, Clone)]
pub struct Admission {
    /// The network joined.
    pub network: Network,
    /// The client's VIP.
    pub vip: Ipv4Addr,
    /// Whether the lease was created now.
    pub new_lease: bool,
    /// In a cluster: the signed lease, for the client to present to other nodes.
    pub proof: Option<String>,
}

/// Why a client was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// The token does not admit.
    #[error("{}", .0.message())]
    Token(TokenProblem),
    /// No VIP left.
    #[error(
        "network {network:?} ({subnet}) has no free VIP left; ask the operator to widen it or use another network"
    )]
    NetworkFull {
        /// Network name.
        network: String,
        /// Its subnet.
        subnet: Subnet,
    },
    /// The identity holds as many instances as the network allows.
    #[error(
        "this identity already holds as many instances in network {network:?} as it allows ({limit}); reuse an instance name, or ask the operator to release a lease (`overlan-server lease release`) or raise the limit (`overlan-server network set {network} --max-instances N`)"
    )]
    InstanceLimit {
        /// Network name.
        network: String,
        /// The cap.
        limit: u32,
    },
    /// The invite URI names another network than its token admits to.
    #[error(
        "unauthorized: the invite names network {uri:?} but its token is for network {token:?}; use the invite exactly as the operator gave it"
    )]
    WrongNetwork {
        /// The network in the URI.
        uri: String,
        /// The token's network.
        token: String,
    },
    /// The client asked to join only with a VIP it holds, and it holds none.
    #[error("instance {instance:?} of this identity holds no VIP in network {network:?}")]
    NoLease {
        /// Network name.
        network: String,
        /// The instance name.
        instance: String,
    },
    /// The database failed.
    #[error("relay database error: {0}")]
    Store(#[from] StoreError),
}

impl Handler<AllocateVip> for VipAllocatorActor {
    type Result = Result<Admission, AdmitError>;

    fn handle(&mut self, msg: AllocateVip, _ctx: &mut Self::Context) -> Self::Result {
        let result = self.admit(msg);
        if let Err(AdmitError::Store(e)) = &result {
            tracing::error!(error = %e, "lease database error");
        }
        result
    }
}

/// A member left: remember when it was last seen.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LeaseSeen {
    /// Network id.
    pub network: NetworkId,
    /// Identity.
    pub identity: Fingerprint,
    /// Instance name.
    pub instance: String,
}

impl Handler<LeaseSeen> for VipAllocatorActor {
    type Result = ();
    fn handle(&mut self, msg: LeaseSeen, _ctx: &mut Self::Context) {
        self.mark_seen(LeaseKey { network: msg.network, identity: msg.identity, instance: msg.instance });
    }
}

/// Members online now were seen now (sent every minute: `lease list` shows an online
/// member as seen within the minute, not at its join).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SeenOnline {
    /// The VIPs online, by network.
    pub online: HashSet<(NetKey, Ipv4Addr)>,
}

impl Handler<SeenOnline> for VipAllocatorActor {
    type Result = ();
    fn handle(&mut self, msg: SeenOnline, _ctx: &mut Self::Context) {
        let ids: HashMap<NetKey, NetworkId> = match self.store.networks() {
            Ok(networks) => networks.into_iter().map(|n| (n.key, n.id)).collect(),
            Err(e) => return tracing::warn!(error = %e, "could not record when members were last seen"),
        };
        let online = msg.online.iter().filter_map(|(key, vip)| Some((*ids.get(key)?, *vip)));
        if let Err(e) = self.store.touch_vips(online, unix_now()) {
            self.counters.add(Reason::LastSeenFailed);
            tracing::warn!(error = %e, "could not record when members were last seen");
        }
    }
}

/// Write the collected last-seen times now (sent periodically by the relay).
#[derive(Message)]
#[rtype(result = "()")]
pub struct FlushSeen;

impl Handler<FlushSeen> for VipAllocatorActor {
    type Result = ();
    fn handle(&mut self, _: FlushSeen, _ctx: &mut Self::Context) {
        self.flush_seen();
    }
}

/// Replication of networks and invites: what was sent last, and whether the database
/// changed since.
#[derive(Default)]
struct CatalogState {
    sent: Option<Catalog>,
    data_version: Option<i64>,
    /// A merge changed the database (its own writes do not move `data_version`).
    dirty: bool,
    /// Conflicts reported already (each is logged once).
    reported: HashSet<String>,
}

/// This node's catalog of networks and invites, for a link that just came up.
#[derive(Message)]
#[rtype(result = "Result<Catalog, StoreError>")]
pub struct GetCatalog;

impl Handler<GetCatalog> for VipAllocatorActor {
    type Result = Result<Catalog, StoreError>;
    fn handle(&mut self, _: GetCatalog, _ctx: &mut Self::Context) -> Self::Result {
        self.store.catalog()
    }
}

/// The catalog, if it changed since it was last returned (an operator command or a
/// merge changed the database): networks, invites and removals whole, and of the
/// releases only those new since (a network of 65,536 VIPs can hold as many; a link
/// that comes up gets them all, [`GetCatalog`]).
#[derive(Message)]
#[rtype(result = "Option<Catalog>")]
pub struct CatalogIfChanged;

impl Handler<CatalogIfChanged> for VipAllocatorActor {
    type Result = Option<Catalog>;
    fn handle(&mut self, _: CatalogIfChanged, _ctx: &mut Self::Context) -> Self::Result {
        let version = self.store.data_version().ok();
        let state = &mut self.catalog;
        if version == state.data_version && !state.dirty && state.sent.is_some() {
            return None;
        }
        state.data_version = version;
        state.dirty = false;
        let catalog = self.store.catalog().map_err(|e| tracing::warn!(error = %e, "cannot read the catalog")).ok()?;
        let news = match &state.sent {
            Some(sent) if *sent == catalog => return None,
            Some(sent) => {
                let known: HashSet<&CatalogVoid> = sent.voided.iter().collect();
                Catalog {
                    voided: catalog.voided.iter().filter(|v| !known.contains(v)).cloned().collect(),
                    ..catalog.clone()
                }
            }
            None => catalog.clone(),
        };
        state.sent = Some(catalog);
        Some(news)
    }
}

/// Another node's catalog. Given back if it could not be recorded (the database was
/// busy or failing), for the link to try again: a catalog's releases come only once.
#[derive(Message)]
#[rtype(result = "Result<(), Catalog>")]
pub struct MergeCatalog(pub Catalog);

impl Handler<MergeCatalog> for VipAllocatorActor {
    type Result = Result<(), Catalog>;
    fn handle(&mut self, msg: MergeCatalog, _ctx: &mut Self::Context) -> Self::Result {
        match self.store.merge_catalog(&msg.0) {
            Ok((changed, conflicts)) => {
                self.catalog.dirty |= changed;
                for conflict in conflicts {
                    if self.catalog.reported.insert(conflict.clone()) {
                        tracing::warn!(%conflict, "networks disagree between nodes; keeping this node's");
                    }
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot take in a peer's networks and invites; will retry");
                Err(msg.0)
            }
        }
    }
}

/// The leases of one network.
#[derive(Message)]
#[rtype(result = "Result<Vec<LeaseRow>, StoreError>")]
pub struct ListLeases(pub String);

impl Handler<ListLeases> for VipAllocatorActor {
    type Result = Result<Vec<LeaseRow>, StoreError>;
    fn handle(&mut self, msg: ListLeases, _ctx: &mut Self::Context) -> Self::Result {
        self.store.lease_rows(Some(&msg.0))
    }
}

/// A member gives its VIP back (`overlan leave`): its lease is deleted. As with the
/// operator's `lease release`, the VIP returns to the pool when the relay restarts, so
/// nothing still in flight from the old holder can reach a new one.
#[derive(Message)]
#[rtype(result = "Result<LeaseRow, StoreError>")]
pub struct ReleaseLease {
    /// The network's name.
    pub network: String,
    /// The VIP.
    pub vip: Ipv4Addr,
}

impl Handler<ReleaseLease> for VipAllocatorActor {
    type Result = Result<LeaseRow, StoreError>;
    fn handle(&mut self, msg: ReleaseLease, _ctx: &mut Self::Context) -> Self::Result {
        self.flush_seen();
        let released = self.store.release_lease(&msg.network, msg.vip)?;
        // Peers hear of the release with the next catalog: its proofs are void.
        self.catalog.dirty = true;
        Ok(released)
    }
}

/// The networks in the database.
#[derive(Message)]
#[rtype(result = "Result<Vec<Network>, StoreError>")]
pub struct ListNetworks;

impl Handler<ListNetworks> for VipAllocatorActor {
    type Result = Result<Vec<Network>, StoreError>;
    fn handle(&mut self, _: ListNetworks, _ctx: &mut Self::Context) -> Self::Result {
        let networks = self.store.networks()?;
        // Pools of removed networks go (their leases went with them).
        self.pools.retain(|id, _| networks.iter().any(|n| n.id == *id));
        Ok(networks)
    }
}

/// Release leases whose holders have not been seen for `max_age`, except those online.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ExpireLeases {
    /// Unused for longer than this.
    pub max_age: Duration,
    /// VIPs online now (their last-seen time is their join, which may be old).
    pub online: HashSet<(NetKey, Ipv4Addr)>,
}

impl Handler<ExpireLeases> for VipAllocatorActor {
    type Result = ();
    fn handle(&mut self, msg: ExpireLeases, _ctx: &mut Self::Context) {
        self.flush_seen();
        let before = unix_now() - msg.max_age.as_secs() as i64;
        let ids: HashMap<NetKey, NetworkId> = match self.store.networks() {
            Ok(networks) => networks.into_iter().map(|n| (n.key, n.id)).collect(),
            Err(e) => return tracing::warn!(error = %e, "could not expire leases; will retry"),
        };
        let online = msg.online.iter().filter_map(|(key, vip)| Some((*ids.get(key)?, *vip))).collect();
        match self.store.expire_leases(before, &online) {
            Ok(expired) => {
                self.catalog.dirty |= !expired.is_empty();
                for (net, vip) in expired {
                    tracing::info!(network = net, %vip, "lease expired (unused for longer than limits.lease_expiry)");
                    self.counters.add(Reason::LeaseExpired);
                    if let Some(pool) = self.pools.get_mut(&net) {
                        pool.handle_release(vip);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not expire leases; will retry"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DEFAULT_NETWORK;

    /// A join of the unnamed instance of identity `name` with `token`.
    fn admit(token: &str, name: &str) -> AllocateVip {
        AllocateVip {
            token: Secret::new(token),
            identity: Fingerprint::of(name.as_bytes()),
            legacy: Fingerprint::of(b"none"),
            instance: String::new(),
            lease: None,
            network: None,
            existing_only: false,
        }
    }

    #[test]
    fn unused_leases_expire_and_their_vips_return_to_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let token = "tok";
        {
            let mut store = Store::open(dir.path()).unwrap();
            store.ensure_default_network("10.9.0.0/29".parse().unwrap()).unwrap();
            store.add_invite(DEFAULT_NETWORK, token, "issued", None, None).unwrap();
        }
        let counters = Arc::new(Counters::default());
        let system = actix::System::new();
        system.block_on(async {
            let dir_path = dir.path().to_path_buf();
            let c = counters.clone();
            let allocator =
                SyncArbiter::start(1, move || VipAllocatorActor::open(&dir_path, 16, None, c.clone()).unwrap());
            let admit = |name: &str| admit(token, name);
            // The /29 has five VIPs: fill it.
            let mut vips = Vec::new();
            for name in ["a", "b", "c", "d", "e"] {
                vips.push(allocator.send(admit(name)).await.unwrap().unwrap().vip);
            }
            assert!(matches!(allocator.send(admit("f")).await.unwrap(), Err(AdmitError::NetworkFull { .. })));
            // Everyone was last seen long ago; "a" is online now.
            let net = Store::open(dir.path()).unwrap().network(DEFAULT_NETWORK).unwrap();
            allocator.send(FlushSeen).await.unwrap();
            let conn = rusqlite::Connection::open(dir.path().join(crate::store::DB_FILE)).unwrap();
            conn.execute("UPDATE leases SET last_seen = 0", []).unwrap();
            let online = HashSet::from([(net.key, vips[0])]);
            allocator.send(ExpireLeases { max_age: Duration::from_secs(3600), online }).await.unwrap();
            assert_eq!(counters.get(Reason::LeaseExpired), 4);
            // "a" kept its VIP; a newcomer gets one of the released ones.
            assert_eq!(allocator.send(admit("a")).await.unwrap().unwrap().vip, vips[0]);
            let newcomer = allocator.send(admit("f")).await.unwrap().unwrap();
            assert!(newcomer.new_lease && vips[1..].contains(&newcomer.vip));
        });
    }

    /// Catalogs sent on a change carry only the releases new since the last one; a link
    /// that comes up gets them all.
    #[test]
    fn a_changed_catalog_carries_only_new_releases() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = Store::open(dir.path()).unwrap();
            store.ensure_default_network("10.9.0.0/24".parse().unwrap()).unwrap();
            store.add_invite(DEFAULT_NETWORK, "tok", "issued", None, None).unwrap();
        }
        let system = actix::System::new();
        system.block_on(async {
            let dir_path = dir.path().to_path_buf();
            let allocator = SyncArbiter::start(1, move || {
                VipAllocatorActor::open(&dir_path, 16, None, Arc::new(Counters::default())).unwrap()
            });
            let mut vips = Vec::new();
            for name in ["a", "b", "c"] {
                vips.push(allocator.send(admit("tok", name)).await.unwrap().unwrap().vip);
            }
            let release = |vip| ReleaseLease { network: DEFAULT_NETWORK.into(), vip };
            let released = |c: &Catalog| c.voided.iter().map(|v| v.vip).collect::<Vec<_>>();
            allocator.send(release(vips[0])).await.unwrap().unwrap();
            let first = allocator.send(CatalogIfChanged).await.unwrap().expect("the first catalog");
            assert_eq!(released(&first), [vips[0]]);
            assert!(allocator.send(CatalogIfChanged).await.unwrap().is_none(), "nothing changed");
            allocator.send(release(vips[1])).await.unwrap().unwrap();
            allocator.send(release(vips[2])).await.unwrap().unwrap();
            let next = allocator.send(CatalogIfChanged).await.unwrap().expect("a release changes it");
            assert_eq!(released(&next), [vips[1], vips[2]], "only the new releases");
            assert_eq!(next.networks, first.networks, "networks whole every time");
            let all = allocator.send(GetCatalog).await.unwrap().unwrap();
            assert_eq!(released(&all), vips, "a new link gets every release");
        });
    }
}
