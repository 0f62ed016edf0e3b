//! Certificates: a cluster CA and the leaf certificates it signs, plus rustls configs.
//!
//! A node keeps its CA in its data dir (`ca.pem`, `ca-key.pem`); on first start it creates
//! one. At every start it issues itself a fresh leaf certificate for its names (written to
//! `node.pem` / `node-key.pem` for inspection). QUIC clients trust `ca.pem`. rustls rejects
//! a self-signed CA used directly as a server certificate, hence CA plus leaf.
//!
//! Configs are built with the ring provider passed explicitly, so nothing depends on the
//! process-wide default provider.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// File name of the CA certificate in a data or CA dir.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// File name of the node's leaf certificate.
pub const NODE_CERT_FILE: &str = "node.pem";
/// File name of the node's leaf private key.
pub const NODE_KEY_FILE: &str = "node-key.pem";

/// Certificate and TLS errors.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading or writing a PEM file failed.
    #[error("cannot read or write {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Generating or parsing a certificate failed.
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// rustls refused the configuration.
    #[error("tls config: {0}")]
    Rustls(#[from] rustls::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The ring crypto provider, used for every rustls config this crate builds.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate authority: its certificate and signing key, both PEM.
pub struct CertificateAuthority {
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A leaf certificate and its key, PEM.
pub struct IssuedCertificate {
    /// Certificate PEM.
    pub cert_pem: String,
    /// Private key PEM (PKCS#8).
    pub key_pem: String,
}

impl CertificateAuthority {
    /// Generates a new CA named `common_name`.
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A secret derived from the CA's private key and `purpose` (hex SHA-256): equal on
    /// every node holding this CA, unguessable without its key.
    pub fn derive_secret(&self, purpose: &[u8]) -> String {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(purpose);
        context.update(self.key_pem.as_bytes());
        context
            .finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Loads `ca.pem` and `ca-key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        // Validate now rather than at first use.
        let key = KeyPair::from_pem(&key_pem)?;
        Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(CertificateAuthority { cert_pem, key_pem })
    }

    /// Writes `ca.pem` and `ca-key.pem` (mode 0600) into `dir`, creating it.
    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        write_file(&dir.join(CA_CERT_FILE), &self.cert_pem, false)?;
        write_file(&dir.join(CA_KEY_FILE), &self.key_pem, true)
    }

    /// Loads the CA from `dir`, or creates and saves one if `dir` has none.
    pub fn load_or_create(dir: &Path, common_name: &str) -> Result<Self, TlsError> {
        if dir.join(CA_CERT_FILE).exists() {
            return Self::load(dir);
        }
        let ca = Self::generate(common_name)?;
        ca.save(dir)?;
        Ok(ca)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a leaf certificate for `names` (DNS names or IP addresses), usable as both
    /// TLS server and client certificate (nodes use it for mutual TLS).
    pub fn issue(
        &self,
        common_name: &str,
        names: &[String],
    ) -> Result<IssuedCertificate, TlsError> {
        let ca_key = KeyPair::from_pem(&self.key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, ca_key)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer)?;
        Ok(IssuedCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path).map_err(io_err(path))?;
    file.write_all(contents.as_bytes()).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

/// A node's TLS identity: its certificate chain and key, and the CA it trusts.
pub struct NodeIdentity {
    /// Leaf certificate (first) and CA.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// The CA certificate.
    pub ca: CertificateDer<'static>,
    /// A secret every node of the cluster derives alike from the CA's private key (never
    /// from anything public): the cookie of the actor mesh's handshake.
    pub cluster_secret: String,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("certificates", &self.cert_chain.len())
            .finish()
    }
}

/// Makes sure `ca_dir` holds a CA (creating one if absent), issues a fresh leaf for
/// `names` into `data_dir`, and returns the identity. `ca.pem` is also copied into
/// `data_dir` when the CA lives elsewhere, so clients find it there.
pub fn ensure_node_identity(
    ca_dir: &Path,
    data_dir: &Path,
    node_name: &str,
    names: &[String],
) -> Result<NodeIdentity, TlsError> {
    let ca = CertificateAuthority::load_or_create(ca_dir, "Chorus cluster CA")?;
    std::fs::create_dir_all(data_dir).map_err(io_err(data_dir))?;
    if ca_dir != data_dir {
        write_file(&data_dir.join(CA_CERT_FILE), ca.cert_pem(), false)?;
    }
    let leaf = ca.issue(node_name, names)?;
    write_file(&data_dir.join(NODE_CERT_FILE), &leaf.cert_pem, false)?;
    write_file(&data_dir.join(NODE_KEY_FILE), &leaf.key_pem, true)?;
    let leaf_path = data_dir.join(NODE_CERT_FILE);
    let leaf_der = parse_certs(&leaf.cert_pem, &leaf_path)?;
    let ca_path = ca_dir.join(CA_CERT_FILE);
    let mut ca_der = parse_certs(ca.cert_pem(), &ca_path)?;
    let key = parse_key(&leaf.key_pem, &data_dir.join(NODE_KEY_FILE))?;
    let ca_cert = ca_der.remove(0);
    let mut cert_chain = leaf_der;
    cert_chain.push(ca_cert.clone());
    Ok(NodeIdentity {
        cert_chain,
        key,
        ca: ca_cert,
        cluster_secret: ca.derive_secret(b"chorus actor mesh cookie/1"),
    })
}

/// Parses every certificate in a PEM text.
pub fn parse_certs(pem: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_err(path))?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "no certificate found".into(),
        });
    }
    Ok(certs)
}

fn parse_key(pem: &str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(io_err(path))?
        .ok_or_else(|| TlsError::Pem {
            path: path.to_path_buf(),
            what: "no private key found".into(),
        })
}

/// Reads a CA PEM file into a root store.
pub fn root_store_from_file(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let pem = std::fs::read_to_string(path).map_err(io_err(path))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in parse_certs(&pem, path)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// A TLS 1.3 server config for client-facing QUIC with the given ALPN.
pub fn server_config(
    identity: &NodeIdentity,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// A TLS 1.3 client config trusting `roots`, with the given ALPN.
pub fn client_config(
    roots: rustls::RootCertStore,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_once_and_leaf_is_signed_by_the_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        ensure_node_identity(dir.path(), dir.path(), "node-1", &names).expect("first");
        let ca_before = std::fs::read_to_string(dir.path().join(CA_CERT_FILE)).expect("ca");
        let identity =
            ensure_node_identity(dir.path(), dir.path(), "node-1", &names).expect("second");
        let ca_after = std::fs::read_to_string(dir.path().join(CA_CERT_FILE)).expect("ca");
        assert_eq!(ca_before, ca_after, "the CA must survive restarts");
        let roots = root_store_from_file(&dir.path().join(CA_CERT_FILE)).expect("roots");
        assert_eq!(roots.len(), 1);
        server_config(&identity, b"chorus/1").expect("server config");
        client_config(roots, b"chorus/1").expect("client config");
    }
}
