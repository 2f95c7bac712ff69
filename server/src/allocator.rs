//! `VipAllocatorActor`: the one owner of the lease database at run time. It runs on its
//! own thread (a `SyncArbiter`), so SQLite never blocks the session arbiter. It checks
//! join tokens, finds or creates the permanent lease of (network, identity, instance)
//! and hands VIPs out of a per-network [`VipPool`].

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::Path;

use actix::prelude::*;
use overlan_shared::config::Secret;
use overlan_shared::pool::VipPool;
use overlan_shared::tls::Fingerprint;
use overlan_shared::Subnet;

use crate::store::{unix_now, Network, NetworkId, Store, StoreError, TokenProblem};

/// Owns the store and the VIP pools.
pub struct VipAllocatorActor {
    store: Store,
    pools: HashMap<NetworkId, VipPool>,
}

impl VipAllocatorActor {
    /// Opens the store in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        Ok(Self { store: Store::open(data_dir)?, pools: HashMap::new() })
    }

    fn pool(&mut self, network: &Network) -> Result<&mut VipPool, StoreError> {
        if !self.pools.contains_key(&network.id) {
            let mut pool = VipPool::new(network.subnet);
            for lease in self.store.leases(network.id)? {
                if !pool.handle_existing_lease(lease.vip) {
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
        if let Some(vip) = self.store.lease(network.id, &msg.identity, &msg.instance)? {
            self.store.touch_lease(network.id, &msg.identity, &msg.instance)?;
            return Ok(Admission { network, vip, new_lease: false });
        }
        if !invite.has_uses_left {
            return Err(AdmitError::Token(TokenProblem::UsedUp));
        }
        let pool = self.pool(&network)?;
        let Some(vip) = pool.poll_allocate() else {
            return Err(AdmitError::NetworkFull { network: network.name.clone(), subnet: network.subnet });
        };
        match self.store.create_lease(invite.id, network.id, &msg.identity, &msg.instance, vip) {
            Ok(true) => Ok(Admission { network, vip, new_lease: true }),
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
}

impl Actor for VipAllocatorActor {
    type Context = SyncContext<Self>;
}

/// Admit a client: check its token and return its permanent VIP, leasing one if needed.
#[derive(Message)]
#[rtype(result = "Result<Admission, AdmitError>")]
pub struct AllocateVip {
    /// The join token.
    pub token: Secret,
    /// The client's identity (certificate fingerprint).
    pub identity: Fingerprint,
    /// Instance name.
    pub instance: String,
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
