//! TLS and certificate helpers: identities (a key pair and self-signed certificate made
//! with rcgen, stored as one PEM file), SHA-256 fingerprints, and the rustls
//! configurations of both ends — the client pins the relay's fingerprint, the relay
//! accepts any client certificate whose key signs the handshake and keys leases on the
//! certificate's fingerprint.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// SHA-256 of a DER certificate; printed as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Fingerprint of a DER-encoded certificate.
    pub fn of(cert_der: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, cert_der);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Self(out)
    }
}

/// The identity of a client: the SHA-256 of its certificate's public key (SPKI), so a
/// certificate re-issued for the same key is the same identity. `None` if the
/// certificate does not parse.
pub fn spki_fingerprint(cert_der: &CertificateDer<'_>) -> Option<Fingerprint> {
    let cert = webpki::EndEntityCert::try_from(cert_der).ok()?;
    Some(Fingerprint::of(cert.subject_public_key_info().as_ref()))
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// A fingerprint text was not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected 64 hex digits (SHA-256), optionally prefixed with sha256: and with colons")]
pub struct FingerprintError;

impl FromStr for Fingerprint {
    type Err = FingerprintError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let s = s.strip_prefix("sha256:").unwrap_or(s);
        let digits: Vec<u8> = s.bytes().filter(|&b| b != b':').collect();
        let mut out = [0u8; 32];
        hex::decode_to_slice(digits, &mut out).map_err(|_| FingerprintError)?;
        Ok(Self(out))
    }
}

/// Errors making, loading or using an identity or TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Key or certificate generation failed.
    #[error("generating certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The identity file could not be read or written.
    #[error("identity file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The identity file does not hold a certificate and a private key.
    #[error("identity file {path}: {what}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A certificate and its private key: a relay's or a client's identity.
#[derive(Clone)]
pub struct Identity {
    cert: CertificateDer<'static>,
    /// Certificates presented after `cert` (a cluster node's CA); empty when self-signed.
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("fingerprint", &self.fingerprint()).field("key", &"***").finish()
    }
}

impl Identity {
    /// Makes a new ECDSA P-256 key pair and a self-signed certificate naming `names`.
    pub fn generate(names: &[&str]) -> Result<Self, TlsError> {
        let key = rcgen::KeyPair::generate()?;
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names.clone())?;
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, names.first().cloned().unwrap_or_default());
        params.distinguished_name = dn;
        let cert = params.self_signed(&key)?;
        Ok(Self { cert: cert.der().clone(), chain: Vec::new(), key_der: key.serialize_der() })
    }

    /// An identity presenting `cert` followed by `chain`, with the PKCS#8 key `key_der`.
    pub fn with_chain(cert: CertificateDer<'static>, chain: Vec<CertificateDer<'static>>, key_der: Vec<u8>) -> Self {
        Self { cert, chain, key_der }
    }

    /// The certificate followed by its chain.
    pub fn chain_der(&self) -> Vec<CertificateDer<'static>> {
        std::iter::once(self.cert.clone()).chain(self.chain.iter().cloned()).collect()
    }

    /// The certificate in DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The private key in PKCS#8 DER.
    pub fn key_der(&self) -> &[u8] {
        &self.key_der
    }

    pub(crate) fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// SHA-256 fingerprint of the certificate (what a client pins of a relay).
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert)
    }

    /// SHA-256 of the certificate's public key: what a relay keys this client's leases on.
    pub fn key_fingerprint(&self) -> Fingerprint {
        spki_fingerprint(&self.cert).expect("overlan's own certificates parse")
    }

    /// The identity as PEM: the certificate then the private key.
    pub fn to_pem(&self) -> String {
        pem::encode_many(&[
            pem::Pem::new("CERTIFICATE", self.cert.to_vec()),
            pem::Pem::new("PRIVATE KEY", self.key_der.clone()),
        ])
    }

    /// Parses an identity from PEM text holding a certificate and a PKCS#8 private key.
    pub fn from_pem(pem: &[u8], path: &str) -> Result<Self, TlsError> {
        let format = |what: &str| TlsError::Format { path: path.to_owned(), what: what.to_owned() };
        let cert = CertificateDer::from_pem_slice(pem).map_err(|_| format("no CERTIFICATE block"))?;
        let key = PrivatePkcs8KeyDer::from_pem_slice(pem).map_err(|_| format("no PRIVATE KEY (PKCS#8) block"))?;
        Ok(Self { cert, chain: Vec::new(), key_der: key.secret_pkcs8_der().to_vec() })
    }

    /// Loads the identity at `path`, or makes one and stores it there (mode 0600) if the
    /// file does not exist. Returns the identity and whether it was created.
    pub fn load_or_create(path: &Path, names: &[&str]) -> Result<(Self, bool), TlsError> {
        let shown = path.display().to_string();
        let io = |source| TlsError::Io { path: shown.clone(), source };
        match std::fs::read(path) {
            Ok(pem) => Ok((Self::from_pem(&pem, &shown)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let identity = Self::generate(names)?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                if create_private(path, identity.to_pem().as_bytes()).map_err(io)? {
                    Ok((identity, true))
                } else {
                    // Another process (a second instance starting at the same moment)
                    // created it first: use that one, so both run as the same identity.
                    let pem = std::fs::read(path).map_err(io)?;
                    Ok((Self::from_pem(&pem, &shown)?, false))
                }
            }
            Err(e) => Err(io(e)),
        }
    }
}

/// Creates `path` readable only by its owner with `contents`, atomically and only if it
/// does not exist yet: the contents go to a temporary file in the same directory that
/// is then moved into place without replacing anything, so a reader never sees a
/// half-written file and two creators never overwrite each other. Returns false if
/// `path` already existed; the temporary file is removed in every case.
pub fn create_private(path: &Path, contents: &[u8]) -> std::io::Result<bool> {
    use std::io::Write;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let prefix = format!(".{}.", path.file_name().and_then(|n| n.to_str()).unwrap_or("file"));
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o600));
    }
    let mut file = builder.tempfile_in(dir)?;
    file.write_all(contents)?;
    file.as_file().sync_all()?;
    // On failure the temporary file comes back inside the error and is deleted with it.
    match file.persist_noclobber(path) {
        Ok(_) => Ok(true),
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e.error),
    }
}

/// The crypto provider overlan uses everywhere (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Client-side verifier: the relay's certificate must have the pinned fingerprint, or
/// be a node certificate signed by the pinned cluster CA (which the node sends after
/// its own); its key must sign the handshake.
#[derive(Debug)]
struct PinnedServer {
    pin: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = Fingerprint::of(end_entity);
        if seen == self.pin {
            return Ok(ServerCertVerified::assertion());
        }
        // A node of a cluster: the pin is the cluster CA, sent after the node's certificate.
        if let Some(ca) = intermediates.iter().find(|c| Fingerprint::of(c) == self.pin) {
            return match crate::cluster::verify_chain(end_entity, &[], ca) {
                Ok(()) => Ok(ServerCertVerified::assertion()),
                Err(e) => Err(rustls::Error::General(format!("relay certificate: {e}"))),
            };
        }
        {
            Err(rustls::Error::General(format!(
                "relay certificate fingerprint {seen} does not match the pinned {}; the invite is for another relay, or the relay's key changed",
                self.pin
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Relay-side verifier: any self-signed client certificate is an identity; possession of
/// its key is proven by the handshake signature. A client may connect without one, so
/// the relay can tell it clearly what is missing instead of failing the handshake.
#[derive(Debug)]
struct AnyClientCert {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// rustls configuration of a client: TLS 1.3, pins the relay fingerprint, presents
/// `identity` (if any) as its client certificate, speaks `alpn`.
pub fn client_config(
    identity: Option<&Identity>,
    pin: Fingerprint,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer { pin, provider }));
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain_der(), id.private_key())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// rustls configuration of a relay: TLS 1.3, presents `identity`, asks clients for a
/// certificate, speaks the protocols in `alpns` (clients; peer nodes in a cluster).
pub fn server_config(identity: &Identity, alpns: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(AnyClientCert { provider }))
        .with_single_cert(identity.chain_der(), identity.private_key())?;
    config.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    Ok(config)
}

/// A random token of `bytes` random bytes, as URL-safe hex.
pub fn random_token(bytes: usize) -> String {
    use ring::rand::SecureRandom;
    let mut buf = vec![0u8; bytes];
    ring::rand::SystemRandom::new().fill(&mut buf).expect("the system random generator failed");
    hex::encode(buf)
}

/// SHA-256 of a token, as hex; tokens are stored only as this hash.
pub fn hash_token(token: &str) -> String {
    Fingerprint::of(token.as_bytes()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_text_round_trip() {
        let fp = Fingerprint::of(b"hello");
        let text = fp.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(format!("sha256:{text}").parse::<Fingerprint>().unwrap(), fp);
        assert!("abc".parse::<Fingerprint>().is_err());
        assert_eq!(format!("{text}0").parse::<Fingerprint>(), Err(FingerprintError));
        assert_eq!(format!("{}zz", &text[2..]).parse::<Fingerprint>(), Err(FingerprintError));
        let colons: Vec<&str> = (0..32).map(|i| &text[2 * i..2 * i + 2]).collect();
        let upper = format!(" sha256:{} ", colons.join(":").to_uppercase());
        assert_eq!(upper.parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(Fingerprint([0xab; 32]).to_string(), "ab".repeat(32));
    }

    #[test]
    fn tokens_are_lowercase_hex() {
        let token = random_token(20);
        assert_eq!(token.len(), 40);
        assert!(token.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{token}");
        assert_ne!(token, random_token(20));
    }

    #[test]
    fn identity_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id.pem");
        let (first, created) = Identity::load_or_create(&path, &["c"]).unwrap();
        assert!(created);
        let (again, created) = Identity::load_or_create(&path, &["c"]).unwrap();
        assert!(!created);
        assert_eq!(first.fingerprint(), again.fingerprint());
        let before = std::fs::read(&path).unwrap();
        assert!(!create_private(&path, b"other").unwrap(), "an existing file is never replaced");
        assert_eq!(std::fs::read(&path).unwrap(), before);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary files left behind");
    }

    #[test]
    fn one_of_racing_creators_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("race.pem");
        let wins: usize = std::thread::scope(|scope| {
            let racers: Vec<_> = (0..8u8)
                .map(|i| {
                    let path = &path;
                    scope.spawn(move || create_private(path, &[i; 64]).unwrap())
                })
                .collect();
            racers.into_iter().map(|r| usize::from(r.join().unwrap())).sum()
        });
        assert_eq!(wins, 1);
        let contents = std::fs::read(&path).unwrap();
        assert!(contents.iter().all(|&b| b == contents[0]) && contents.len() == 64, "one writer's whole file");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary files left behind");
    }

    #[test]
    fn reissued_certificate_keeps_the_key_fingerprint() {
        let id = Identity::generate(&["overlan-client"]).unwrap();
        let key = rcgen::KeyPair::try_from(id.key_der()).unwrap();
        let again = rcgen::CertificateParams::new(vec!["renamed".to_owned()]).unwrap().self_signed(&key).unwrap();
        let reissued = Identity { cert: again.der().clone(), chain: Vec::new(), key_der: id.key_der().to_vec() };
        assert_ne!(reissued.fingerprint(), id.fingerprint(), "a new certificate");
        assert_eq!(reissued.key_fingerprint(), id.key_fingerprint(), "the same key, so the same identity");
        assert_ne!(Identity::generate(&["x"]).unwrap().key_fingerprint(), id.key_fingerprint());
    }

    #[test]
    fn identity_pem_round_trip() {
        let id = Identity::generate(&["overlan-client"]).unwrap();
        let back = Identity::from_pem(id.to_pem().as_bytes(), "mem").unwrap();
        assert_eq!(back.fingerprint(), id.fingerprint());
        assert_eq!(back.key_der(), id.key_der());
        assert!(Identity::from_pem(b"garbage", "mem").is_err());
    }
}
