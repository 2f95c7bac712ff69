//! The client identity: a key pair and self-signed certificate made on first run and
//! kept in the user's config directory; the relay keys this client's VIP on it.

use std::path::{Path, PathBuf};

use overlan_shared::tls::Identity;

use crate::error::Error;

/// Common name put in client certificates.
pub const CLIENT_CERT_NAME: &str = "overlan-client";

/// `$XDG_CONFIG_HOME/overlan/identity.pem` (or the platform's equivalent).
pub fn default_identity_path() -> PathBuf {
    dirs::config_dir().unwrap_or_else(|| PathBuf::from(".")).join("overlan").join("identity.pem")
}

/// Loads the identity at `path`, creating it on first use.
pub fn load_or_create_identity(path: &Path) -> Result<Identity, Error> {
    let (identity, created) =
        Identity::load_or_create(path, &[CLIENT_CERT_NAME]).map_err(|e| Error::Config(e.to_string()))?;
    if created {
        tracing::info!(path = %path.display(), fingerprint = %identity.fingerprint(), "created a new client identity");
    }
    Ok(identity)
}
