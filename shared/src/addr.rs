//! Virtual addresses: a VIP is an IPv4 address inside a virtual network's subnet, a
//! virtual socket address is a VIP plus a 16-bit port (the same shape as `SocketAddrV4`).

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A virtual socket address: VIP and virtual port.
pub type VirtualAddr = SocketAddrV4;

/// The limited broadcast address; a datagram sent to it reaches the whole virtual network.
pub const LIMITED_BROADCAST: Ipv4Addr = Ipv4Addr::BROADCAST;

/// Smallest prefix length a virtual network may use (a /8 holds 16M VIPs).
pub const MIN_PREFIX: u8 = 8;
/// Largest prefix length a virtual network may use (a /30 holds one client beside the relay).
pub const MAX_PREFIX: u8 = 30;

/// An IPv4 subnet in CIDR form, normalised so that host bits are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

/// Why a subnet string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetError {
    /// The text is not `A.B.C.D/N`.
    #[error("subnet {0:?}: expected CIDR form like 10.77.0.0/16")]
    Syntax(String),
    /// The prefix is outside the supported range.
    #[error("subnet {text:?}: prefix /{prefix} is outside /{MIN_PREFIX}../{MAX_PREFIX}")]
    Prefix {
        /// The text as given.
        text: String,
        /// The prefix length found.
        prefix: u8,
    },
    /// Host bits are set, e.g. `10.77.0.5/16`.
    #[error("subnet {text:?}: host bits are set; did you mean {normalised}?")]
    HostBits {
        /// The text as given.
        text: String,
        /// The subnet with host bits cleared.
        normalised: String,
    },
}

impl Subnet {
    /// Builds a subnet; fails if the prefix is out of range or host bits are set.
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Self, SubnetError> {
        let text = format!("{network}/{prefix}");
        if !(MIN_PREFIX..=MAX_PREFIX).contains(&prefix) {
            return Err(SubnetError::Prefix { text, prefix });
        }
        let mask = Self::mask_of(prefix);
        let bits = u32::from(network);
        if bits & !mask != 0 {
            let normalised = format!("{}/{prefix}", Ipv4Addr::from(bits & mask));
            return Err(SubnetError::HostBits { text, normalised });
        }
        Ok(Self { network, prefix })
    }

    fn mask_of(prefix: u8) -> u32 {
        u32::MAX << (32 - u32::from(prefix))
    }

    /// The network address (all host bits zero); never handed out.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The directed broadcast address (all host bits one); never handed out.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !Self::mask_of(self.prefix))
    }

    /// The relay's own address in this network: the first host address.
    pub fn relay_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Whether `ip` lies inside the subnet (network and broadcast included).
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask_of(self.prefix) == u32::from(self.network)
    }

    /// Whether `ip` is a broadcast destination for this network: its directed
    /// broadcast or 255.255.255.255.
    pub fn is_broadcast(&self, ip: Ipv4Addr) -> bool {
        ip == LIMITED_BROADCAST || ip == self.broadcast()
    }

    /// Whether `ip` may be leased to a client: inside the subnet and neither the network,
    /// broadcast nor relay address.
    pub fn is_assignable(&self, ip: Ipv4Addr) -> bool {
        self.contains(ip) && ip != self.network && ip != self.broadcast() && ip != self.relay_addr()
    }

    /// How many client VIPs the subnet holds.
    pub fn assignable_count(&self) -> u32 {
        (1u32 << (32 - u32::from(self.prefix))) - 3
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = SubnetError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax = || SubnetError::Syntax(text.to_owned());
        let (ip, prefix) = text.trim().split_once('/').ok_or_else(syntax)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| syntax())?;
        let prefix: u8 = prefix.parse().map_err(|_| syntax())?;
        Subnet::new(ip, prefix).map_err(|e| match e {
            SubnetError::Prefix { prefix, .. } => SubnetError::Prefix { text: text.to_owned(), prefix },
            SubnetError::HostBits { normalised, .. } => SubnetError::HostBits { text: text.to_owned(), normalised },
            other => other,
        })
    }
}

impl TryFrom<String> for Subnet {
    type Error = SubnetError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<Subnet> for String {
    fn from(value: Subnet) -> Self {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_addresses() {
        let s: Subnet = "10.77.0.0/16".parse().unwrap();
        assert_eq!(s.broadcast(), Ipv4Addr::new(10, 77, 255, 255));
        assert_eq!(s.relay_addr(), Ipv4Addr::new(10, 77, 0, 1));
        assert!(s.is_assignable(Ipv4Addr::new(10, 77, 0, 2)));
        assert!(!s.is_assignable(Ipv4Addr::new(10, 77, 0, 1)));
        assert!(!s.is_assignable(Ipv4Addr::new(10, 77, 0, 0)));
        assert!(!s.is_assignable(Ipv4Addr::new(10, 77, 255, 255)));
        assert!(!s.is_assignable(Ipv4Addr::new(10, 78, 0, 2)));
        assert!(s.is_broadcast(Ipv4Addr::BROADCAST));
        assert_eq!(s.assignable_count(), 65533);
    }

    #[test]
    fn subnet_errors_name_the_fix() {
        let e = "10.77.0.5/16".parse::<Subnet>().unwrap_err();
        assert!(e.to_string().contains("10.77.0.0/16"), "{e}");
        assert!(matches!("10.0.0.0/31".parse::<Subnet>(), Err(SubnetError::Prefix { .. })));
        assert!(matches!("bogus".parse::<Subnet>(), Err(SubnetError::Syntax(_))));
    }
}
