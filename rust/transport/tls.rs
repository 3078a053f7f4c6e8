//! The cluster CA, node certificates, the join token and the rustls
//! configurations built from them.
//!
//! The first node makes a CA with rcgen and signs its own node certificate.
//! The join token, like k3s's, carries the sha256 of the CA certificate and a
//! secret: the joiner pins the CA with it (the server's chain must hold that
//! CA and the server certificate must verify against it), and the member checks
//! the secret. Only voters hold the CA key (`ca.key`): a learner has the CA
//! certificate and its own, and passes joins on to a voter (`crate::cluster`).

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

/// Every node certificate names this DNS SAN, and every client checks it:
/// nodes are told apart by the id they prove in the Hello, not by host name.
pub const SERVER_NAME: &str = "node.ollama-distributed.cluster";
/// ALPN of this protocol; a different major version will not connect.
pub const ALPN: &[u8] = b"ollama-distributed/1";
const TOKEN_PREFIX: &str = "OD1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("tls configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad pem in {0}")]
    Pem(PathBuf),
    #[error("malformed join token (expected OD1:<ca sha256 hex>:<secret>)")]
    Token,
    #[error("this node does not hold the cluster CA key (only voters do)")]
    NoCaKey,
    #[error("the CA key does not match the CA certificate")]
    CaKeyMismatch,
    #[error("{0}")]
    Other(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The crypto provider: ring only, so aws-lc-sys is never built.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The parameters of the CA certificate. They are rebuilt the same way when the
/// CA is loaded, so rcgen can sign with it without parsing the certificate.
fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "ollama-distributed cluster CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    p
}

/// A node's certificate and key, in PEM.
#[derive(Clone)]
pub struct NodeCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl NodeCert {
    /// Hex sha256 of the certificate, as a peer presenting it is seen.
    pub fn fingerprint(&self) -> Result<String, TlsError> {
        let der = CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|_| TlsError::Pem(NODE_CERT.into()))?;
        Ok(cert_fingerprint(&der))
    }
}

impl fmt::Debug for NodeCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeCert { .. }")
    }
}

/// The cluster certificate authority: its certificate, and its key on the
/// nodes that hold it (voters).
pub struct ClusterCa {
    pub cert_pem: String,
    /// None on a node that does not hold the key.
    pub key_pem: Option<String>,
    cert_der: CertificateDer<'static>,
    key: Option<KeyPair>,
}

impl ClusterCa {
    pub fn generate() -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let cert = ca_params().self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: Some(key.serialize_pem()),
            cert_der: cert.der().clone(),
            key: Some(key),
        })
    }

    /// The CA from its certificate and, on a node that holds it, its key,
    /// which must be the certificate's (a key from a peer is checked here).
    pub fn from_pem(cert_pem: &str, key_pem: Option<&str>) -> Result<Self, TlsError> {
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| TlsError::Pem(PathBuf::from(CA_CERT)))?;
        let key = match key_pem {
            None => None,
            Some(pem) => {
                let key = KeyPair::from_pem(pem)?;
                let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
                    .map_err(|_| TlsError::Pem(PathBuf::from(CA_CERT)))?;
                if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                    return Err(TlsError::CaKeyMismatch);
                }
                Some(key)
            }
        };
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.map(str::to_owned),
            cert_der,
            key,
        })
    }

    /// Whether this copy can sign certificates.
    pub fn has_key(&self) -> bool {
        self.key.is_some()
    }

    /// Move the key out: `self` keeps the certificate alone, the answer is
    /// the whole CA (None when there was no key).
    pub fn take_key(&mut self) -> Option<ClusterCa> {
        let key = self.key.take()?;
        let key_pem = self.key_pem.take();
        Some(ClusterCa {
            cert_pem: self.cert_pem.clone(),
            key_pem,
            cert_der: self.cert_der.clone(),
            key: Some(key),
        })
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Hex sha256 of the CA certificate: what a token pins.
    pub fn fingerprint(&self) -> String {
        hex::encode(sha256(&self.cert_der))
    }

    /// Sign a fresh key pair for `node_id`, usable as both server and client.
    /// [`TlsError::NoCaKey`] on a node that does not hold the CA key.
    pub fn issue(&self, node_id: &str) -> Result<NodeCert, TlsError> {
        let ca_key = self.key.as_ref().ok_or(TlsError::NoCaKey)?;
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node_id);
        p.distinguished_name = dn;
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.not_before = rcgen::date_time_ymd(2024, 1, 1);
        p.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let issuer = Issuer::new(ca_params(), ca_key);
        let cert = p.signed_by(&key, &issuer)?;
        Ok(NodeCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The node id a certificate names (its subject CommonName): what a peer
/// proves, and so the only id it may claim in a Hello, an advert or a Raft
/// message. None for a certificate that does not parse or names none.
pub fn cert_node_id(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// Hex sha256 of a certificate (DER): what the deny list holds.
pub fn cert_fingerprint(der: &[u8]) -> String {
    hex::encode(sha256(der))
}

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_sha256: [u8; 32],
    pub secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "JoinToken {{ ca: {}, secret: <hidden> }}",
            hex::encode(self.ca_sha256)
        )
    }
}

impl JoinToken {
    pub fn parse(s: &str) -> Result<Self, TlsError> {
        let mut parts = s.trim().splitn(3, ':');
        let (Some(TOKEN_PREFIX), Some(ca), Some(secret)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(TlsError::Token);
        };
        let bytes = hex::decode(ca).map_err(|_| TlsError::Token)?;
        let ca_sha256: [u8; 32] = bytes.try_into().map_err(|_| TlsError::Token)?;
        if secret.is_empty() {
            return Err(TlsError::Token);
        }
        Ok(Self {
            ca_sha256,
            secret: secret.to_owned(),
        })
    }

    pub fn render(&self) -> String {
        format!(
            "{TOKEN_PREFIX}:{}:{}",
            hex::encode(self.ca_sha256),
            self.secret
        )
    }
}

/// A new random secret for a token: 128 bits.
pub fn new_secret() -> String {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Compare secrets without leaking where they differ through timing.
pub fn secrets_match(a: &str, b: &str) -> bool {
    let (a, b) = (sha256(a.as_bytes()), sha256(b.as_bytes()));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The TLS material a node keeps in `data_dir/tls`, every file mode 0600.
/// `ca.key` only on a voter: the rest is every member's.
pub struct TlsMaterial {
    pub ca: ClusterCa,
    pub node: NodeCert,
    pub secret: String,
}

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
const NODE_CERT: &str = "node.pem";
const NODE_KEY: &str = "node.key";
const SECRET: &str = "join-secret";

impl TlsMaterial {
    /// A new cluster: CA, this node's certificate and a join secret.
    pub fn create(node_id: &str) -> Result<Self, TlsError> {
        let ca = ClusterCa::generate()?;
        let node = ca.issue(node_id)?;
        Ok(Self {
            ca,
            node,
            secret: new_secret(),
        })
    }

    pub fn exists(dir: &Path) -> bool {
        [CA_CERT, NODE_CERT, NODE_KEY, SECRET]
            .iter()
            .all(|f| dir.join(f).is_file())
    }

    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let read = |name: &str| -> Result<String, TlsError> {
            let p = dir.join(name);
            fs::read_to_string(&p).map_err(io_err(&p))
        };
        let ca_key = dir.join(CA_KEY);
        let ca_key = match fs::read_to_string(&ca_key) {
            Ok(k) => Some(k),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&ca_key)(e)),
        };
        let ca = ClusterCa::from_pem(&read(CA_CERT)?, ca_key.as_deref())?;
        let node = NodeCert {
            cert_pem: read(NODE_CERT)?,
            key_pem: read(NODE_KEY)?,
        };
        Ok(Self {
            ca,
            node,
            secret: read(SECRET)?.trim().to_owned(),
        })
    }

    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        set_mode(dir, 0o700)?;
        write_private(&dir.join(CA_CERT), self.ca.cert_pem.as_bytes())?;
        if let Some(key) = &self.ca.key_pem {
            write_private(&dir.join(CA_KEY), key.as_bytes())?;
        }
        write_private(&dir.join(NODE_CERT), self.node.cert_pem.as_bytes())?;
        write_private(&dir.join(NODE_KEY), self.node.key_pem.as_bytes())?;
        write_private(&dir.join(SECRET), self.secret.as_bytes())?;
        Ok(())
    }

    /// Keep the CA key in `dir` (a node that became a voter).
    pub fn save_ca_key(dir: &Path, ca: &ClusterCa) -> Result<(), TlsError> {
        let key = ca.key_pem.as_deref().ok_or(TlsError::NoCaKey)?;
        write_private(&dir.join(CA_KEY), key.as_bytes())
    }

    /// Delete the CA key from `dir` (a node that is not a voter); whether
    /// there was one.
    pub fn remove_ca_key(dir: &Path) -> Result<bool, TlsError> {
        let path = dir.join(CA_KEY);
        match fs::remove_file(&path) {
            Ok(()) => {
                if let Ok(d) = fs::File::open(dir) {
                    let _ = d.sync_all();
                }
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Where the CA key is kept, for messages.
    pub fn ca_key_path(dir: &Path) -> PathBuf {
        dir.join(CA_KEY)
    }

    pub fn token(&self) -> JoinToken {
        JoinToken {
            ca_sha256: sha256(self.ca.cert_der()),
            secret: self.secret.clone(),
        }
    }

    fn node_chain(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let cert = CertificateDer::from_pem_slice(self.node.cert_pem.as_bytes())
            .map_err(|_| TlsError::Pem(NODE_CERT.into()))?;
        let key = PrivateKeyDer::from_pem_slice(self.node.key_pem.as_bytes())
            .map_err(|_| TlsError::Pem(NODE_KEY.into()))?;
        Ok((vec![cert, self.ca.cert_der().clone()], key))
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.cert_der().clone())?;
        Ok(Arc::new(roots))
    }

    /// Server side: presents the node certificate, and asks for a client
    /// certificate signed by the CA without requiring one, so a joiner can
    /// reach the join handler. Everything else checks
    /// [`quinn::Connection::peer_identity`] and refuses connections without one.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let p = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, p.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Other(e.to_string()))?;
        let (chain, key) = self.node_chain()?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }

    /// Client side between members: verify the peer against the CA, present
    /// our node certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let (chain, key) = self.node_chain()?;
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(chain, key)?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }
}

/// Client side for a joiner: no client certificate, and the server must chain
/// to the CA the token pins.
pub fn join_client_config(token: &JoinToken) -> Result<rustls::ClientConfig, TlsError> {
    let p = provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            pin: token.ca_sha256,
            provider: p,
        }))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// Client config with a client certificate that is not from the cluster CA,
/// or none at all; only tests use it, to prove such peers are refused.
pub fn untrusted_client_config(
    server_ca: &ClusterCa,
    own: Option<&TlsMaterial>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(server_ca.cert_der().clone())?;
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(Arc::new(roots));
    let mut cfg = match own {
        Some(m) => {
            let (chain, key) = m.node_chain()?;
            b.with_client_auth_cert(chain, key)?
        }
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

#[derive(Debug)]
struct PinnedCa {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| sha256(c) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(
                    "server does not present the CA pinned by the join token".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), TlsError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

/// Write a secret file atomically: a 0600 temp file, fsync, rename, fsync the
/// directory. A crash leaves the old file or the new one, never half of one.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let written = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        });
    if let Err(e) = written {
        // a full disk must not keep a half-written temp file using the space
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&tmp)(e));
    }
    fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Private key DER from PEM, for tests that build their own endpoints.
pub fn key_der(pem: &str) -> Option<PrivateKeyDer<'static>> {
    PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(PrivateKeyDer::Pkcs8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip_and_rejects_garbage() {
        let m = TlsMaterial::create("a").unwrap();
        let t = m.token();
        assert_eq!(JoinToken::parse(&t.render()).unwrap(), t);
        for bad in [
            "",
            "OD1:zz:s",
            "OD2:00:s",
            &format!("OD1:{}:", hex::encode([0u8; 32])),
            "OD1:abcd:s",
        ] {
            assert!(JoinToken::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn material_persists_with_private_modes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let m = TlsMaterial::create("a").unwrap();
        m.save(dir.path()).unwrap();
        for f in [CA_CERT, CA_KEY, NODE_CERT, NODE_KEY, SECRET] {
            let mode = fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        let back = TlsMaterial::load(dir.path()).unwrap();
        assert_eq!(back.token(), m.token());
        // the reloaded CA still signs certificates that verify against it
        let issued = back.ca.issue("b").unwrap();
        assert!(issued.cert_pem.contains("BEGIN CERTIFICATE"));
        back.server_config().unwrap();
        back.client_config().unwrap();
    }

    #[test]
    fn node_id_comes_from_the_certificate() {
        let m = TlsMaterial::create("node-a").unwrap();
        let der = CertificateDer::from_pem_slice(m.node.cert_pem.as_bytes()).unwrap();
        assert_eq!(cert_node_id(&der).as_deref(), Some("node-a"));
        assert_eq!(cert_node_id(b"garbage"), None);
        assert_eq!(cert_fingerprint(&der).len(), 64);
    }

    #[test]
    fn a_node_without_the_ca_key_cannot_issue_and_keeps_no_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = TlsMaterial::create("a").unwrap();
        let full = m.ca.take_key().unwrap();
        assert!(full.has_key() && !m.ca.has_key());
        assert!(matches!(m.ca.issue("x"), Err(TlsError::NoCaKey)));
        m.save(dir.path()).unwrap();
        assert!(!dir.path().join(CA_KEY).exists());
        assert!(TlsMaterial::exists(dir.path()));
        let back = TlsMaterial::load(dir.path()).unwrap();
        assert!(!back.ca.has_key());
        back.server_config().unwrap();
        // the key comes back (a promotion), then goes again (not a voter)
        TlsMaterial::save_ca_key(dir.path(), &full).unwrap();
        assert!(TlsMaterial::load(dir.path()).unwrap().ca.has_key());
        assert!(TlsMaterial::remove_ca_key(dir.path()).unwrap());
        assert!(!TlsMaterial::remove_ca_key(dir.path()).unwrap());
        assert!(!TlsMaterial::load(dir.path()).unwrap().ca.has_key());
    }

    #[test]
    fn a_ca_key_must_be_the_certificates() {
        let a = ClusterCa::generate().unwrap();
        let b = ClusterCa::generate().unwrap();
        let mismatch = ClusterCa::from_pem(&a.cert_pem, b.key_pem.as_deref());
        assert!(matches!(mismatch, Err(TlsError::CaKeyMismatch)));
        let ok = ClusterCa::from_pem(&a.cert_pem, a.key_pem.as_deref()).unwrap();
        assert!(ok.issue("n").is_ok());
    }

    #[test]
    fn secrets_compare() {
        assert!(secrets_match("abc", "abc"));
        assert!(!secrets_match("abc", "abd"));
    }
}
