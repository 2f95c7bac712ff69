//! Invite URIs: `overlan://HOST:PORT/NETWORK?fp=SHA256HEX&token=TOKEN` bundles the relay
//! address, the relay certificate fingerprint to pin and a join token, for copy-paste.

use std::fmt;
use std::str::FromStr;

use crate::config::Secret;
use crate::tls::Fingerprint;

/// URI scheme of invites.
pub const SCHEME: &str = "overlan://";

/// A parsed invite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invite {
    /// Relay address as `host:port` (a name or an IP; IPv6 in brackets).
    pub relay: String,
    /// Network the token admits to (informational; the token decides).
    pub network: String,
    /// SHA-256 fingerprint of the relay certificate.
    pub fingerprint: Fingerprint,
    /// The join token.
    pub token: Secret,
}

/// Why an invite URI was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InviteError {
    /// Does not start with `overlan://`.
    #[error("invite must start with {SCHEME}")]
    Scheme,
    /// No `host:port`.
    #[error("invite has no relay address (expected {SCHEME}HOST:PORT/NETWORK?fp=..&token=..)")]
    Address,
    /// A required query parameter is missing.
    #[error("invite lacks the {0}= parameter")]
    Missing(&'static str),
    /// The fingerprint is not 64 hex digits.
    #[error("invite fingerprint: {0}")]
    Fingerprint(String),
    /// A character outside the allowed set.
    #[error("invite {0} contains characters that are not allowed")]
    Charset(&'static str),
}

fn token_ok(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether `name` is a valid network name: 1-32 of `a-z 0-9 - _`, starting alphanumeric.
pub fn valid_network_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl FromStr for Invite {
    type Err = InviteError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let rest = text.trim().strip_prefix(SCHEME).ok_or(InviteError::Scheme)?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (relay, network) = path.split_once('/').unwrap_or((path, ""));
        let relay = relay.trim_end_matches('/');
        if relay.is_empty() || !relay.contains(':') {
            return Err(InviteError::Address);
        }
        if relay.bytes().any(|b| b.is_ascii_whitespace() || b == b'@') {
            return Err(InviteError::Charset("relay address"));
        }
        let network = network.trim_end_matches('/');
        let network = if network.is_empty() { "default" } else { network };
        if !valid_network_name(network) {
            return Err(InviteError::Charset("network name"));
        }
        let mut fp = None;
        let mut token = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("fp", v)) => fp = Some(v),
                Some(("token", v)) => token = Some(v),
                _ => {}
            }
        }
        let fingerprint = fp
            .ok_or(InviteError::Missing("fp"))?
            .parse::<Fingerprint>()
            .map_err(|e| InviteError::Fingerprint(e.to_string()))?;
        let token = token.ok_or(InviteError::Missing("token"))?;
        if !token_ok(token) {
            return Err(InviteError::Charset("token"));
        }
        Ok(Invite { relay: relay.to_owned(), network: network.to_owned(), fingerprint, token: Secret::new(token) })
    }
}

impl fmt::Display for Invite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}?fp={}&token={}", self.relay, self.network, self.fingerprint, self.token.expose())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn round_trip() {
        let text = format!("overlan://relay.example.com:7700/games?fp={FP}&token=abc_DEF-123");
        let invite: Invite = text.parse().unwrap();
        assert_eq!(invite.relay, "relay.example.com:7700");
        assert_eq!(invite.network, "games");
        assert_eq!(invite.token.expose(), "abc_DEF-123");
        assert_eq!(invite.to_string(), text);
        assert!(!format!("{invite:?}").contains("abc_DEF"));
    }

    #[test]
    fn errors() {
        assert_eq!("http://x:1/?fp=1".parse::<Invite>(), Err(InviteError::Scheme));
        assert_eq!(format!("overlan://host/default?fp={FP}&token=t").parse::<Invite>(), Err(InviteError::Address));
        assert_eq!("overlan://h:1/default?token=t".parse::<Invite>(), Err(InviteError::Missing("fp")));
        assert_eq!(format!("overlan://h:1/default?fp={FP}").parse::<Invite>(), Err(InviteError::Missing("token")));
        assert!(matches!("overlan://h:1/default?fp=zz&token=t".parse::<Invite>(), Err(InviteError::Fingerprint(_))));
    }

    #[test]
    fn network_names() {
        assert!(valid_network_name("default"));
        assert!(valid_network_name("lan-party_2"));
        assert!(!valid_network_name(""));
        assert!(!valid_network_name("-x"));
        assert!(!valid_network_name("Upper"));
    }
}
