//! Cluster trust: the cluster CA, node certificates and slots. `overlan-server ca init`
//! makes a CA in a directory; `ca issue NODE` gives NODE a slot (its delegated block of
//! every network's subnet) and a certificate signed by the CA that names both, so a
//! peer can check who a node is and which VIPs it may announce without asking anyone.
//!
//! Layout of the directory: `ca.pem` (CA certificate and key; keep it off the relay
//! hosts if you can), `ca.crt` (the CA certificate alone), `cluster.json` (cluster id
//! and the slots taken) and `NODE.pem` per node (its certificate, the CA certificate and
//! its key). A node needs only `ca.crt` and its own `NODE.pem`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, UnixTime};
use serde::{Deserialize, Serialize};

use crate::addr::Subnet;
use crate::tls::{create_private, provider, Fingerprint, Identity};
use crate::wire::RELAY_SERVER_NAME;

/// Slots a cluster has: every network's subnet is cut into this many equal blocks.
pub const SLOTS: u8 = 16;
const SLOT_BITS: u8 = 4;
/// Suffix of the certificate name that carries a node's name.
const NODE_SUFFIX: &str = ".node.overlan";
/// Suffix of the certificate name that carries a node's slot.
const SLOT_SUFFIX: &str = ".slot.overlan";

/// A node's delegated block index.
pub type Slot = u8;

/// The block of `subnet` that slot `slot` hands out, or `None` if the subnet is too
/// small to cut into [`SLOTS`] blocks of a /28 or more (a prefix longer than /24).
pub fn slot_block(subnet: Subnet, slot: Slot) -> Option<Subnet> {
    let prefix = subnet.prefix() + SLOT_BITS;
    if prefix > 28 || slot >= SLOTS {
        return None;
    }
    let size = 1u32 << (32 - prefix);
    let start = u32::from(subnet.network()) + u32::from(slot) * size;
    Subnet::new(Ipv4Addr::from(start), prefix).ok()
}

/// Whether `vip` lies in `slot`'s block of `subnet`.
pub fn in_slot(subnet: Subnet, slot: Slot, vip: Ipv4Addr) -> bool {
    slot_block(subnet, slot).is_some_and(|block| block.contains(vip))
}

/// Errors of the cluster CA and of checking node certificates.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// The error (said in the message, so not a `source` that would be said twice).
        error: std::io::Error,
    },
    /// A file's contents are wrong.
    #[error("{path}: {what}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// `ca init` found a CA already.
    #[error("{0} already holds a cluster CA; use it, or choose another directory")]
    Exists(String),
    /// No CA in the directory.
    #[error("{0} holds no cluster CA: run `overlan-server ca init --dir {0}` first")]
    NoCa(String),
    /// A node name is not a DNS label.
    #[error("bad node name {0:?}: use 1-63 of a-z 0-9 - (not starting or ending with -)")]
    BadNodeName(String),
    /// Every slot is taken.
    #[error("all {SLOTS} slots of the cluster are taken")]
    Full,
    /// Certificate generation failed.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A node certificate does not chain to the cluster CA.
    #[error("certificate does not chain to the cluster CA ({0})")]
    Untrusted(String),
    /// A node certificate lacks its node name or slot.
    #[error("certificate names no overlan node and slot")]
    NotANode,
}

/// Whether `name` is a valid node name (a DNS label, lower case).
pub fn valid_node_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    /// Random id, part of the CA's name.
    id: String,
    /// Random secret every node gets: keys what all nodes must derive alike (the
    /// default network's invite token).
    secret: String,
    /// Slots taken, by node.
    slots: BTreeMap<String, Slot>,
}

/// A cluster directory.
#[derive(Debug, Clone)]
pub struct ClusterDir {
    dir: PathBuf,
}

/// What `ca issue` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The node.
    pub node: String,
    /// Its slot.
    pub slot: Slot,
    /// Where its credentials are.
    pub path: PathBuf,
    /// Whether the node had a slot already (a re-issue keeps it).
    pub reissued: bool,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError + '_ {
    move |error| ClusterError::Io { path: path.display().to_string(), error }
}

impl ClusterDir {
    /// The cluster directory `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn ca_key_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Where the CA certificate is.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    fn cluster_path(&self) -> PathBuf {
        self.dir.join("cluster.json")
    }

    /// Where `node`'s credentials are.
    pub fn node_path(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.pem"))
    }

    fn ca_params(id: &str) -> Result<rcgen::CertificateParams, ClusterError> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "overlan cluster CA");
        dn.push(rcgen::DnType::OrganizationName, format!("overlan cluster {id}"));
        params.distinguished_name = dn;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        Ok(params)
    }

    /// Creates the CA. Returns its certificate's fingerprint.
    pub fn init(&self) -> Result<Fingerprint, ClusterError> {
        let shown = self.dir.display().to_string();
        if self.ca_key_path().exists() {
            return Err(ClusterError::Exists(shown));
        }
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let id = crate::tls::random_token(8);
        let key = rcgen::KeyPair::generate()?;
        let cert = Self::ca_params(&id)?.self_signed(&key)?;
        let both = format!("{}{}", cert.pem(), key.serialize_pem());
        let path = self.ca_key_path();
        if !create_private(&path, both.as_bytes()).map_err(io(&path))? {
            return Err(ClusterError::Exists(shown));
        }
        let crt = self.ca_cert_path();
        std::fs::write(&crt, cert.pem()).map_err(io(&crt))?;
        let secret = crate::tls::random_token(32);
        self.write_cluster(&ClusterFile { id, secret, slots: BTreeMap::new() })?;
        Ok(Fingerprint::of(cert.der()))
    }

    fn read_cluster(&self) -> Result<ClusterFile, ClusterError> {
        let path = self.cluster_path();
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound if self.ca_cert_path().exists() => ClusterError::Format {
                path: path.display().to_string(),
                what: "missing, beside the CA: it holds the cluster's id, secret and the slots taken; restore it from a backup"
                    .into(),
            },
            std::io::ErrorKind::NotFound => ClusterError::NoCa(self.dir.display().to_string()),
            _ => io(&path)(e),
        })?;
        serde_json::from_str(&text)
            .map_err(|e| ClusterError::Format { path: path.display().to_string(), what: e.to_string() })
    }

    fn write_cluster(&self, file: &ClusterFile) -> Result<(), ClusterError> {
        let path = self.cluster_path();
        let tmp = self.dir.join(".cluster.json.tmp");
        let text = serde_json::to_string_pretty(file).expect("plain data serializes");
        std::fs::write(&tmp, text).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }

    /// The CA certificate.
    pub fn ca_cert(&self) -> Result<CertificateDer<'static>, ClusterError> {
        read_cert(&self.ca_cert_path())
    }

    /// Issues `node`'s certificate and key, giving it the lowest free slot (or the one
    /// it has).
    pub fn issue(&self, node: &str) -> Result<Issued, ClusterError> {
        if !valid_node_name(node) {
            return Err(ClusterError::BadNodeName(node.to_owned()));
        }
        // One issue at a time (several `ca issue` at once must not pick one slot): an
        // exclusive lock on the directory's lock file, held until this returns.
        let lock_path = self.dir.join(".lock");
        let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(
            |e| match e.kind() {
                std::io::ErrorKind::NotFound => ClusterError::NoCa(self.dir.display().to_string()),
                _ => io(&lock_path)(e),
            },
        )?;
        lock.lock().map_err(io(&lock_path))?;
        let mut cluster = self.read_cluster()?;
        let ca_path = self.ca_key_path();
        let ca_pem = std::fs::read_to_string(&ca_path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ClusterError::NoCa(self.dir.display().to_string()),
            _ => io(&ca_path)(e),
        })?;
        let ca_key = PrivatePkcs8KeyDer::from_pem_slice(ca_pem.as_bytes()).map_err(|_| ClusterError::Format {
            path: ca_path.display().to_string(),
            what: "no PRIVATE KEY (PKCS#8) block".into(),
        })?;
        let ca_key = rcgen::KeyPair::try_from(&ca_key)?;
        let ca_cert = self.ca_cert()?;
        let (slot, reissued) = match cluster.slots.get(node) {
            Some(&slot) => (slot, true),
            None => {
                let taken: Vec<Slot> = cluster.slots.values().copied().collect();
                let slot = (0..SLOTS).find(|s| !taken.contains(s)).ok_or(ClusterError::Full)?;
                (slot, false)
            }
        };
        let issuer = rcgen::Issuer::new(Self::ca_params(&cluster.id)?, &ca_key);
        let key = rcgen::KeyPair::generate()?;
        let names = vec![RELAY_SERVER_NAME.to_owned(), format!("{node}{NODE_SUFFIX}"), format!("{slot}{SLOT_SUFFIX}")];
        let mut params = rcgen::CertificateParams::new(names)?;
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, format!("overlan node {node}"));
        params.distinguished_name = dn;
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &issuer)?;
        let pem = format!(
            "{}{}{}{}",
            cert.pem(),
            pem::encode(&pem::Pem::new("CERTIFICATE", ca_cert.to_vec())),
            key.serialize_pem(),
            pem::encode(&pem::Pem::new(SECRET_LABEL, cluster.secret.as_bytes().to_vec())),
        );
        let path = self.node_path(node);
        // Replace atomically: a node restarting mid-issue sees the old or the new file.
        let _ = std::fs::remove_file(path.with_extension("pem.new"));
        create_private(&path.with_extension("pem.new"), pem.as_bytes()).map_err(io(&path))?;
        std::fs::rename(path.with_extension("pem.new"), &path).map_err(io(&path))?;
        cluster.slots.insert(node.to_owned(), slot);
        self.write_cluster(&cluster)?;
        Ok(Issued { node: node.to_owned(), slot, path, reissued })
    }

    /// Loads `node`'s credentials and the CA certificate, checking that they agree.
    pub fn load_node(&self, node: &str) -> Result<NodeCredentials, ClusterError> {
        // On a node's host the credentials are copied in; the CA is made (and its key
        // kept) on the admin machine, so the hints say where they come from.
        let ca = self.ca_cert().map_err(|e| match e {
            ClusterError::Io { error, .. } if error.kind() == std::io::ErrorKind::NotFound => ClusterError::Format {
                path: self.ca_cert_path().display().to_string(),
                what: "no cluster CA certificate: copy ca.crt here from the cluster directory made by `overlan-server ca init` (on the admin machine; never copy ca.pem)".into(),
            },
            other => other,
        })?;
        let path = self.node_path(node);
        let pem = std::fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ClusterError::Format {
                path: path.display().to_string(),
                what: format!(
                    "no credentials for node {node}: copy {node}.pem here from the cluster directory, where `overlan-server ca issue {node} --dir DIR` makes it (on the admin machine)"
                ),
            },
            _ => io(&path)(e),
        })?;
        let shown = path.display().to_string();
        let format = |what: &str| ClusterError::Format { path: shown.clone(), what: what.to_owned() };
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&pem).collect::<Result<_, _>>().map_err(|_| format("bad CERTIFICATE"))?;
        let key = PrivatePkcs8KeyDer::from_pem_slice(&pem).map_err(|_| format("no PRIVATE KEY (PKCS#8) block"))?;
        let Some(cert) = chain.first().cloned() else { return Err(format("no CERTIFICATE block")) };
        let info = verify_node(&chain, &ca)?;
        if info.name != node {
            return Err(format(&format!("the certificate is node {}'s, not {node}'s", info.name)));
        }
        let secret = pem::parse_many(&pem)
            .map_err(|_| format("bad PEM"))?
            .into_iter()
            .find(|p| p.tag() == SECRET_LABEL)
            .map(|p| p.into_contents())
            .ok_or_else(|| format(&format!("no {SECRET_LABEL} block: re-issue the node's credentials")))?;
        let identity = Identity::with_chain(cert, chain[1..].to_vec(), key.secret_pkcs8_der().to_vec());
        Ok(NodeCredentials { identity, ca, slot: info.slot, name: info.name, secret })
    }
}

fn read_cert(path: &Path) -> Result<CertificateDer<'static>, ClusterError> {
    let pem = std::fs::read(path).map_err(io(path))?;
    CertificateDer::from_pem_slice(&pem)
        .map_err(|_| ClusterError::Format { path: path.display().to_string(), what: "no CERTIFICATE block".into() })
}

/// PEM label of the cluster secret in a node's credentials.
const SECRET_LABEL: &str = "OVERLAN CLUSTER SECRET";

/// What a node runs with in a cluster.
#[derive(Clone)]
pub struct NodeCredentials {
    /// Its name.
    pub name: String,
    /// The cluster secret (see `ClusterFile::secret`).
    pub secret: Vec<u8>,
    /// Its certificate (with the CA's after it) and key.
    pub identity: Identity,
    /// The cluster CA certificate.
    pub ca: CertificateDer<'static>,
    /// Its slot.
    pub slot: Slot,
}

impl std::fmt::Debug for NodeCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCredentials").field("name", &self.name).field("slot", &self.slot).finish_non_exhaustive()
    }
}

/// Who a verified node certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// Its slot.
    pub slot: Slot,
}

/// Checks that `chain` (end entity first) chains to `ca`, and reads the node name and
/// slot it names.
pub fn verify_node(chain: &[CertificateDer<'_>], ca: &CertificateDer<'_>) -> Result<NodeInfo, ClusterError> {
    let end = chain.first().ok_or(ClusterError::NotANode)?;
    verify_chain(end, &chain[1..], ca)?;
    node_info(end)
}

/// Checks that `end` chains to `ca` through `intermediates`, for any use.
pub fn verify_chain(
    end: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    ca: &CertificateDer<'_>,
) -> Result<(), ClusterError> {
    let anchor = webpki::anchor_from_trusted_cert(ca).map_err(|e| ClusterError::Untrusted(e.to_string()))?;
    let cert = webpki::EndEntityCert::try_from(end).map_err(|e| ClusterError::Untrusted(e.to_string()))?;
    let algs = provider().signature_verification_algorithms.all;
    cert.verify_for_usage(algs, &[anchor], intermediates, UnixTime::now(), webpki::KeyUsage::client_auth(), None, None)
        .map_err(|e| ClusterError::Untrusted(e.to_string()))?;
    Ok(())
}

/// The node name and slot a node certificate names (unverified: check the chain first).
pub fn node_info(end: &CertificateDer<'_>) -> Result<NodeInfo, ClusterError> {
    let cert = webpki::EndEntityCert::try_from(end).map_err(|_| ClusterError::NotANode)?;
    let (mut name, mut slot) = (None, None);
    for dns in cert.valid_dns_names() {
        if let Some(n) = dns.strip_suffix(NODE_SUFFIX) {
            name = Some(n.to_owned());
        } else if let Some(s) = dns.strip_suffix(SLOT_SUFFIX) {
            slot = s.parse::<Slot>().ok().filter(|s| *s < SLOTS);
        }
    }
    match (name, slot) {
        (Some(name), Some(slot)) => Ok(NodeInfo { name, slot }),
        _ => Err(ClusterError::NotANode),
    }
}

/// A lease as its issuing node vouches for it: `identity` (SPKI fingerprint, hex) and
/// `instance` hold `vip` in `network`. Signed by the issuer's node key and carried by
/// the client, so any node of the cluster can check it — also while the issuer is down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseClaim {
    /// Network name.
    pub network: String,
    /// The VIP.
    pub vip: Ipv4Addr,
    /// The holder's identity (SPKI SHA-256, hex).
    pub identity: String,
    /// The holder's instance name.
    pub instance: String,
    /// The issuing node.
    pub issuer: String,
    /// When the issuer made the lease, unix milliseconds (0 in proofs made before it
    /// was recorded). A release of the lease voids every proof issued before it.
    #[serde(default)]
    pub issued: i64,
}

/// Signs `claim` with `creds`' node key. The proof is text: the claim, the signature and
/// the issuer's certificate, each hex, joined by dots.
pub fn sign_lease(creds: &NodeCredentials, claim: &LeaseClaim) -> Result<String, ClusterError> {
    let rng = ring::rand::SystemRandom::new();
    let bad = |what: &str| ClusterError::Format { path: "node key".into(), what: what.to_owned() };
    let key = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        creds.identity.key_der(),
        &rng,
    )
    .map_err(|_| bad("not an ECDSA P-256 key"))?;
    let body = serde_json::to_vec(claim).expect("plain data serializes");
    let sig = key.sign(&rng, &body).map_err(|_| bad("signing failed"))?;
    Ok(format!("{}.{}.{}", hex::encode(&body), hex::encode(sig.as_ref()), hex::encode(creds.identity.cert_der())))
}

/// Checks a lease proof: the issuer's certificate chains to `ca` and names a node, and
/// its key signed the claim. Returns the claim and the issuer. (Whether the VIP lies in
/// the issuer's slot of the network is the caller's check: it knows the subnet.)
pub fn verify_lease(proof: &str, ca: &CertificateDer<'_>) -> Result<(LeaseClaim, NodeInfo), ClusterError> {
    let bad = |what: &str| ClusterError::Untrusted(format!("lease proof: {what}"));
    let mut parts = proof.split('.');
    let (Some(body), Some(sig), Some(cert), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(bad("not three dot-separated parts"));
    };
    let body = hex::decode(body).map_err(|_| bad("claim is not hex"))?;
    let sig = hex::decode(sig).map_err(|_| bad("signature is not hex"))?;
    let cert = CertificateDer::from(hex::decode(cert).map_err(|_| bad("certificate is not hex"))?);
    verify_chain(&cert, &[], ca)?;
    let issuer = node_info(&cert)?;
    let end = webpki::EndEntityCert::try_from(&cert).map_err(|e| bad(&e.to_string()))?;
    let algs = provider().signature_verification_algorithms;
    let (_, candidates) = algs
        .mapping
        .iter()
        .find(|(scheme, _)| *scheme == rustls::SignatureScheme::ECDSA_NISTP256_SHA256)
        .ok_or_else(|| bad("no ECDSA P-256 verifier"))?;
    if !candidates.iter().any(|alg| end.verify_signature(*alg, &body, &sig).is_ok()) {
        return Err(bad("bad signature"));
    }
    let claim: LeaseClaim = serde_json::from_slice(&body).map_err(|e| bad(&e.to_string()))?;
    if claim.issuer != issuer.name {
        return Err(bad("claim names another issuer than its certificate"));
    }
    Ok((claim, issuer))
}

/// Dialing side of a peer link: the peer's certificate must chain to the cluster CA and
/// name a node; its key must sign the handshake.
#[derive(Debug)]
struct ClusterServer {
    ca: CertificateDer<'static>,
    provider: std::sync::Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for ClusterServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        verify_chain(end_entity, intermediates, &self.ca)
            .and_then(|()| node_info(end_entity))
            .map(|_| rustls::client::danger::ServerCertVerified::assertion())
            .map_err(|e| rustls::Error::General(format!("peer node certificate: {e}")))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// rustls configuration for dialing a peer node: TLS 1.3, presents this node's
/// certificate, accepts a peer whose certificate chains to the cluster CA, speaks `alpn`.
pub fn peer_client_config(creds: &NodeCredentials, alpn: &[u8]) -> Result<rustls::ClientConfig, crate::tls::TlsError> {
    let provider = provider();
    let verifier = std::sync::Arc::new(ClusterServer { ca: creds.ca.clone(), provider: provider.clone() });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(creds.identity.chain_der(), creds.identity.private_key())?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cut_the_subnet_into_sixteen_blocks() {
        let subnet: Subnet = "10.77.0.0/16".parse().unwrap();
        assert_eq!(slot_block(subnet, 0).unwrap().to_string(), "10.77.0.0/20");
        assert_eq!(slot_block(subnet, 15).unwrap().to_string(), "10.77.240.0/20");
        assert!(in_slot(subnet, 1, "10.77.16.5".parse().unwrap()));
        assert!(!in_slot(subnet, 0, "10.77.16.5".parse().unwrap()));
        assert_eq!(slot_block(subnet, 16), None);
        assert!(slot_block("10.0.0.0/29".parse().unwrap(), 0).is_none());
        assert!(slot_block("10.0.0.0/24".parse().unwrap(), 3).is_some());
    }

    #[test]
    fn issued_nodes_get_distinct_slots_and_verify_against_their_ca() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = ClusterDir::new(dir.path().join("ca"));
        cluster.init().unwrap();
        assert!(matches!(cluster.init(), Err(ClusterError::Exists(_))));
        let a = cluster.issue("n1").unwrap();
        let b = cluster.issue("n2").unwrap();
        assert_ne!(a.slot, b.slot);
        let again = cluster.issue("n1").unwrap();
        assert!(again.reissued);
        assert_eq!(again.slot, a.slot);
        assert!(matches!(cluster.issue("Bad_Name"), Err(ClusterError::BadNodeName(_))));

        let creds = cluster.load_node("n2").unwrap();
        assert_eq!(creds.slot, b.slot);
        let chain = creds.identity.chain_der();
        assert_eq!(verify_node(&chain, &creds.ca).unwrap(), NodeInfo { name: "n2".into(), slot: b.slot });

        // Another cluster's CA does not vouch for this node.
        let other = ClusterDir::new(dir.path().join("other"));
        other.init().unwrap();
        assert!(matches!(verify_node(&chain, &other.ca_cert().unwrap()), Err(ClusterError::Untrusted(_))));
        // A lease signed by n2 verifies against the CA, and not once changed.
        let claim = LeaseClaim {
            network: "default".into(),
            vip: "10.77.16.9".parse().unwrap(),
            identity: "ab".repeat(32),
            instance: "laptop".into(),
            issuer: "n2".into(),
            issued: 1_700_000_000_000,
        };
        let proof = sign_lease(&creds, &claim).unwrap();
        let (back, issuer) = verify_lease(&proof, &creds.ca).unwrap();
        assert_eq!((back, issuer.name.as_str(), issuer.slot), (claim.clone(), "n2", b.slot));
        assert!(verify_lease(&proof, &other.ca_cert().unwrap()).is_err(), "another cluster's CA");
        let forged = LeaseClaim { vip: "10.77.16.10".parse().unwrap(), ..claim };
        let forged_body = hex::encode(serde_json::to_vec(&forged).unwrap());
        let tampered = format!("{forged_body}.{}", proof.split_once('.').unwrap().1);
        assert!(verify_lease(&tampered, &creds.ca).is_err(), "a changed claim fails the signature");
        assert!(verify_lease("zz", &creds.ca).is_err());
        // Nor does a self-signed certificate pass as a node.
        let stranger = Identity::generate(&["n3.node.overlan", "0.slot.overlan"]).unwrap();
        assert!(verify_node(&stranger.chain_der(), &creds.ca).is_err());
        assert!(matches!(ClusterDir::new(dir.path().join("none")).issue("n1"), Err(ClusterError::NoCa(_))));
    }
}
