//! `overlan-server`: the relay node. A relay admits clients by join token, leases each
//! a permanent VIP keyed on its certificate identity, and carries virtual streams,
//! datagrams and broadcasts between them, stamping the source of everything it forwards.
//!
//! Shape: [`relay`] starts everything; [`session::SessionActor`] (one per client),
//! [`network::NetworkActor`] (one per virtual network: membership),
//! [`pair::SocketPairActor`] (one per virtual stream) and
//! [`allocator::VipAllocatorActor`] (the lease database) decide; [`router::Router`]
//! holds the lookup tables the data path ([`datagram`], the splice in [`pair`]) reads;
//! [`node::Node`] is what they all share, with the relay-wide [`holds`] budget and the
//! [`counters`] of what was refused or cut.

pub mod allocator;
pub mod cluster;
pub mod config;
pub mod control;
pub mod counters;
pub mod datagram;
pub mod holds;
pub mod link;
pub mod network;
pub mod node;
pub mod pair;
pub mod relay;
pub mod router;
pub mod session;
pub mod store;

pub use config::RelayConfig;
pub use relay::{RelayHandle, RelayInfo};
