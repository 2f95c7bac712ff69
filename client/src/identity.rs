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

/// Where the CLI keeps the lease proofs of the identity at `identity` (beside it):
/// `identity.pem` → `identity.leases.json`.
pub fn lease_file_path(identity: &Path) -> PathBuf {
    identity.with_extension("leases.json")
}

/// The lease proof stored for `network` and `instance` in `file`, if any.
pub fn load_lease(file: &Path, network: &str, instance: &str) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    let map: std::collections::BTreeMap<String, String> = serde_json::from_str(&text).ok()?;
    map.get(&format!("{network}/{instance}")).cloned()
}

/// Stores `proof` for `network` and `instance` in `file` (owner-only, replaced
/// atomically), keeping the others.
pub fn save_lease(file: &Path, network: &str, instance: &str, proof: &str) -> Result<(), Error> {
    let _lock = lock_leases(file)?;
    let mut map = read_leases(file);
    let key = format!("{network}/{instance}");
    if map.get(&key).map(String::as_str) == Some(proof) {
        return Ok(());
    }
    map.insert(key, proof.to_owned());
    write_leases(file, &map)
}

/// Forgets the lease proof of `network` and `instance` in `file` (the VIP was given
/// back), keeping the others.
pub fn forget_lease(file: &Path, network: &str, instance: &str) -> Result<(), Error> {
    let _lock = lock_leases(file)?;
    let mut map = read_leases(file);
    if map.remove(&format!("{network}/{instance}")).is_none() {
        return Ok(());
    }
    write_leases(file, &map)
}

/// Holds the lease file's lock (a file beside it) while one command reads, changes and
/// writes it: instances of one identity starting at once must not lose each other's
/// proofs.
fn lock_leases(file: &Path) -> Result<std::fs::File, Error> {
    let path = file.with_extension("leases.json.lock");
    let io = |e: std::io::Error| Error::Config(format!("lease file lock {}: {e}", path.display()));
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io)?;
    lock.lock().map_err(io)?;
    Ok(lock)
}

fn read_leases(file: &Path) -> std::collections::BTreeMap<String, String> {
    std::fs::read_to_string(file).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

fn write_leases(file: &Path, map: &std::collections::BTreeMap<String, String>) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(&map).expect("plain data serializes");
    let tmp = file.with_extension("leases.json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let io = |e: std::io::Error| Error::Config(format!("lease file {}: {e}", file.display()));
    overlan_shared::tls::create_private(&tmp, text.as_bytes()).map_err(io)?;
    std::fs::rename(&tmp, file).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_kept_per_network_and_instance() {
        let dir = tempfile::tempdir().unwrap();
        let file = lease_file_path(&dir.path().join("identity.pem"));
        assert_eq!(file.file_name().unwrap(), "identity.leases.json");
        assert_eq!(load_lease(&file, "default", ""), None);
        save_lease(&file, "default", "", "p1").unwrap();
        save_lease(&file, "games", "laptop", "p2").unwrap();
        save_lease(&file, "default", "", "p3").unwrap();
        assert_eq!(load_lease(&file, "default", "").as_deref(), Some("p3"));
        assert_eq!(load_lease(&file, "games", "laptop").as_deref(), Some("p2"));
        forget_lease(&file, "games", "laptop").unwrap();
        assert_eq!(load_lease(&file, "games", "laptop"), None);
        // Many instances saving at once keep every proof.
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let file = file.clone();
                std::thread::spawn(move || save_lease(&file, "race", &format!("r{i}"), &format!("p{i}")).unwrap())
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        for i in 0..16 {
            assert_eq!(load_lease(&file, "race", &format!("r{i}")), Some(format!("p{i}")));
        }
        assert_eq!(load_lease(&file, "default", "").as_deref(), Some("p3"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
