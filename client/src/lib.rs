//! `overlan-client`: join an overlan relay and talk to other members through virtual
//! sockets that feel like tokio's: [`Client::listen`] → [`Listener::accept`],
//! [`Client::connect`] → a [`VirtualStream`] (`AsyncRead + AsyncWrite`), and
//! [`Client::bind_datagram`] → a [`DatagramSocket`] with `send_to`/`recv_from` and
//! broadcasts. Every source address you see was stamped by the relay.
//!
//! ```no_run
//! # async fn demo() -> Result<(), overlan_client::Error> {
//! use overlan_client::{Client, JoinOptions, load_or_create_identity, default_identity_path};
//! let invite = "overlan://relay.example.com:7700/default?fp=..&token=..".parse().map_err(|e| overlan_client::Error::Config(format!("{e}")))?;
//! let identity = load_or_create_identity(&default_identity_path())?;
//! let client = Client::join(JoinOptions::new(invite, identity)).await?;
//! println!("my VIP is {}", client.vip());
//! # Ok(()) }
//! ```

mod client;
pub mod control;
mod datagram;
mod error;
pub mod forward;
mod identity;
mod stream;
pub mod tun;

pub use client::{
    endpoint_config, transport_config, Client, JoinOptions, Notice, PathInfo, SessionState, DEFAULT_IDLE_TIMEOUT,
    FAILOVER_IDLE_TIMEOUT, LEAVE_LINGER, MAX_BACKOFF, MIN_BACKOFF, REQUEST_TIMEOUT,
};
pub use datagram::{Datagram, DatagramSocket};
pub use error::Error;
pub use identity::{
    default_identity_path, forget_lease, lease_file_path, load_lease, load_or_create_identity, save_lease,
    CLIENT_CERT_NAME,
};
pub use overlan_shared::tls::Identity;
pub use overlan_shared::{Invite, Subnet};
pub use stream::{IncomingConnection, Listener, VirtualReadHalf, VirtualStream, VirtualWriteHalf};
