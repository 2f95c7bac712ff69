//! `overlan-shared`: everything the relay and the client agree on, as plain data and
//! sans-IO logic — addresses, the wire protocol and its codecs, the VIP pool, the
//! socket-pair lifecycle, invite URIs, configuration helpers and TLS/certificate helpers. Nothing here opens a socket.

pub mod addr;
pub mod cluster;
pub mod config;
pub mod invite;
pub mod pair;
pub mod pool;
pub mod ports;
pub mod route;
pub mod session;
pub mod tls;
pub mod udp;
pub mod wire;

pub use addr::{Subnet, SubnetError, VirtualAddr};
pub use invite::{Invite, InviteError};
pub use wire::ErrorCode;
