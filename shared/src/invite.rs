//! Invite URIs: `overlan://HOST:PORT/NETWORK?fp=SHA256HEX&token=TOKEN` bundles the relay
//! address, the relay certificate fingerprint to pin and a join token, for copy-paste.

use std::fmt;
use std::str::FromStr;

use percent_encoding::percent_decode_str;

use crate::config::Secret;
use crate::tls::Fingerprint;

/// URI scheme of invites.
pub const SCHEME: &str = "overlan://";
const SCHEME_NAME: &str = "overlan";

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

    /// Parses with the `url` crate: the network name and the query values may be
    /// percent-encoded, an IPv6 relay is written in brackets (`overlan://[::1]:7700/..`).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let url = url::Url::parse(text.trim()).map_err(|e| match e {
            url::ParseError::RelativeUrlWithoutBase => InviteError::Scheme,
            url::ParseError::InvalidDomainCharacter => InviteError::Charset("relay address"),
            _ => InviteError::Address,
        })?;
        if url.scheme() != SCHEME_NAME {
            return Err(InviteError::Scheme);
        }
        let (Some(host), Some(port)) = (url.host_str().filter(|h| !h.is_empty()), url.port()) else {
            return Err(InviteError::Address);
        };
        // `url` keeps the host of a non-http scheme as written, with `%`, `!`, `=`..; a
        // relay is a DNS name or an IP address.
        let name_ok = |h: &str| h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        let host_ok = matches!(url.host(), Some(url::Host::Ipv6(_)) | Some(url::Host::Ipv4(_))) || name_ok(host);
        if !url.username().is_empty() || url.password().is_some() || !host_ok {
            return Err(InviteError::Charset("relay address"));
        }
        let path = url.path().trim_matches('/');
        let network = percent_decode_str(path).decode_utf8().map_err(|_| InviteError::Charset("network name"))?;
        let network = if network.is_empty() { "default" } else { &network };
        if !valid_network_name(network) {
            return Err(InviteError::Charset("network name"));
        }
        let (mut fp, mut token) = (None, None);
        for (key, value) in url.query_pairs() {
            match &*key {
                "fp" => fp = Some(value),
                "token" => token = Some(value),
                _ => {}
            }
        }
        let fingerprint = fp
            .ok_or(InviteError::Missing("fp"))?
            .parse::<Fingerprint>()
            .map_err(|e| InviteError::Fingerprint(e.to_string()))?;
        let token = token.ok_or(InviteError::Missing("token"))?;
        if !token_ok(&token) {
            return Err(InviteError::Charset("token"));
        }
        Ok(Invite {
            relay: format!("{host}:{port}"),
            network: network.to_owned(),
            fingerprint,
            token: Secret::new(token),
        })
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
    fn percent_encoded_parts_are_decoded() {
        let text = format!("overlan://relay.example.com:7700/lan%2Dparty%5F2?fp={FP}&token=abc%5FDEF%2D123");
        let invite: Invite = text.parse().unwrap();
        assert_eq!(invite.network, "lan-party_2");
        assert_eq!(invite.token.expose(), "abc_DEF-123");
        assert_eq!(invite.fingerprint.to_string(), FP);
        assert_eq!(
            invite.to_string(),
            format!("overlan://relay.example.com:7700/lan-party_2?fp={FP}&token=abc_DEF-123")
        );
        let colons = format!(
            "sha256%3A{}",
            FP.as_bytes().chunks(2).map(|c| std::str::from_utf8(c).unwrap()).collect::<Vec<_>>().join("%3A")
        );
        let invite: Invite = format!("overlan://h:1/?fp={colons}&token=t").parse().unwrap();
        assert_eq!(invite.fingerprint.to_string(), FP);
        assert_eq!(
            format!("overlan://h:1/?fp={FP}&token=a%20b").parse::<Invite>(),
            Err(InviteError::Charset("token")),
            "what decodes to a character outside the token set is refused"
        );
        assert_eq!(
            format!("overlan://h:1/a%2Fb?fp={FP}&token=t").parse::<Invite>(),
            Err(InviteError::Charset("network name"))
        );
    }

    #[test]
    fn ipv6_relay() {
        let text = format!("overlan://[2001:db8::7]:7700/games?fp={FP}&token=t0k");
        let invite: Invite = text.parse().unwrap();
        assert_eq!(invite.relay, "[2001:db8::7]:7700");
        assert_eq!(invite.relay.parse::<std::net::SocketAddr>().unwrap().port(), 7700);
        assert_eq!(invite.to_string(), text);
        let loopback: Invite = format!("overlan://[::1]:9/?fp={FP}&token=t").parse().unwrap();
        assert_eq!(loopback.relay, "[::1]:9");
        assert_eq!(loopback.network, "default");
        assert_eq!(format!("overlan://[::1]/?fp={FP}&token=t").parse::<Invite>(), Err(InviteError::Address));
        assert_eq!(format!("overlan://[::1:9/?fp={FP}&token=t").parse::<Invite>(), Err(InviteError::Address));
    }

    #[test]
    fn relay_address_characters() {
        for bad in ["user@h:1", "h%41:1", "h st:1", "h=x:1", "hü:1"] {
            assert_eq!(
                format!("overlan://{bad}/?fp={FP}&token=t").parse::<Invite>(),
                Err(InviteError::Charset("relay address")),
                "{bad}"
            );
        }
        assert_eq!(format!("overlan://h:99999/?fp={FP}&token=t").parse::<Invite>(), Err(InviteError::Address));
    }

    #[test]
    fn errors() {
        assert_eq!("http://x:1/?fp=1".parse::<Invite>(), Err(InviteError::Scheme));
        assert_eq!(format!("overlan://host/default?fp={FP}&token=t").parse::<Invite>(), Err(InviteError::Address));
        assert_eq!("overlan://h:1/default?token=t".parse::<Invite>(), Err(InviteError::Missing("fp")));
        assert_eq!(format!("overlan://h:1/default?fp={FP}").parse::<Invite>(), Err(InviteError::Missing("token")));
        assert!(matches!("overlan://h:1/default?fp=zz&token=t".parse::<Invite>(), Err(InviteError::Fingerprint(_))));
    }

    proptest::proptest! {
        /// What parses prints back to text that parses to the same invite (the fuzz
        /// target's property, on invite-shaped text).
        #[test]
        fn printed_invites_parse_back(
            host in "([a-z0-9.-]{1,12}|\\[[0-9a-f:]{2,12}\\]|[%@!$&'()*+,;=~ ]{0,3})",
            port in "[0-9]{0,6}",
            path in "(/[a-z0-9%_/-]{0,12})?",
            query in "[a-z0-9=&%:_-]{0,20}",
        ) {
            let text = format!("overlan://{host}:{port}{path}?fp={FP}&{query}&token=t{query}");
            if let Ok(invite) = text.parse::<Invite>() {
                proptest::prop_assert_eq!(invite.to_string().parse::<Invite>(), Ok(invite));
            }
        }
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
