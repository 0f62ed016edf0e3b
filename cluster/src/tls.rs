//! Certificates: a cluster CA and the leaf certificates it signs, plus rustls configs.
//!
//! A node finds its identity in its CA dir (`--ca`, the data dir unless set), in one of
//! three shapes ([`ensure_node_identity`]):
//! - **The CA itself** (`ca.pem`, `ca-key.pem`): at every start the node issues itself a
//!   fresh leaf certificate for its names (written to `node.pem` / `node-key.pem` in the
//!   data dir for inspection) and derives the actor-mesh cookie from the CA key.
//! - **An issued identity** (`ca.pem`, `node.pem`, `node-key.pem`, `mesh-cookie`), written
//!   by `chorus ca issue` ([`issue_node_identity`]) where the CA key is, so the serving
//!   node never sees that key (in `k8s/`, an init container issues it).
//! - **Nothing** (development): the node creates a CA there first.
//!
//! QUIC clients trust `ca.pem`. rustls rejects a self-signed CA used directly as a server
//! certificate, hence CA plus leaf.
//!
//! Configs are built with the ring provider passed explicitly, so nothing depends on the
//! process-wide default provider.
//!
//! Boundary: files in the CA and data dirs, and certificate checks; no network.

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
/// File name of the actor-mesh cookie in an issued identity (see
/// [`CertificateAuthority::mesh_cookie`]).
pub const MESH_COOKIE_FILE: &str = "mesh-cookie";
/// What the actor-mesh cookie is derived for (with the CA key); changing it splits
/// clusters whose nodes derive it from the key from nodes given an issued cookie.
const MESH_COOKIE_PURPOSE: &[u8] = b"chorus actor mesh cookie/1";
/// Length of the actor-mesh cookie: hex SHA-256.
const MESH_COOKIE_CHARS: usize = 64;

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
    /// The CA dir holds the CA certificate but neither its key nor an issued identity.
    #[error(
        "{ca_dir} holds {CA_CERT_FILE} but neither the CA key ({CA_KEY_FILE}) nor an issued \
         node identity (missing: {missing}); issue one where the CA key is with \
         `chorus ca issue --ca CA_DIR --out {ca_dir} --node-name NAME [--name DNS_OR_IP]...`, \
         or point --ca at the directory holding {CA_KEY_FILE}"
    )]
    NoIdentity {
        /// The CA dir.
        ca_dir: PathBuf,
        /// The files of an issued identity that are absent.
        missing: String,
    },
    /// An issued certificate does not chain to the CA next to it.
    #[error(
        "{cert_path} is not a node certificate signed by the CA in {ca_path} ({reason}); \
         issue it again with `chorus ca issue` from that CA"
    )]
    NotIssuedByCa {
        /// The leaf certificate.
        cert_path: PathBuf,
        /// The CA certificate.
        ca_path: PathBuf,
        /// What the verification said.
        reason: String,
    },
    /// The actor-mesh cookie file is malformed.
    #[error(
        "{path}: not an actor-mesh cookie ({MESH_COOKIE_CHARS} hex characters, as written \
         by `chorus ca issue`)"
    )]
    Cookie {
        /// The file.
        path: PathBuf,
    },
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

    /// The actor mesh's cookie for this CA: [`Self::derive_secret`] for a fixed purpose, so
    /// nodes holding the key and nodes given an issued identity agree on it.
    pub fn mesh_cookie(&self) -> String {
        self.derive_secret(MESH_COOKIE_PURPOSE)
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
    let mut file = options.open(path).map_err(io_err(path))?;
    // `mode` applies only to a new file: an existing one is narrowed before it is written.
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(path))?;
    }
    #[cfg(not(unix))]
    let _ = secret;
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
    /// Where the CA certificate was read (`CA_DIR/ca.pem`), for messages about peers whose
    /// certificates it does not accept.
    pub ca_path: PathBuf,
    /// A secret every node of the cluster has alike, derived from the CA's private key
    /// (never from anything public), or read from an issued identity derived the same
    /// way: the cookie of the actor mesh's handshake.
    pub cluster_secret: String,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("certificates", &self.cert_chain.len())
            .field("ca_path", &self.ca_path)
            .finish()
    }
}

/// The files of an issued identity (besides `ca.pem`), in the order they are checked.
const ISSUED_FILES: [&str; 3] = [NODE_CERT_FILE, NODE_KEY_FILE, MESH_COOKIE_FILE];

/// The node's identity from `ca_dir` (see the module docs for its three shapes):
/// - with the CA key there: issues a fresh leaf for `names` into `data_dir`;
/// - with an issued identity there (no key): loads it, checks that the leaf chains to the
///   CA and matches its key, and warns about any of `names` the leaf lacks;
/// - with no `ca.pem` there: creates a CA first (development);
/// - otherwise ([`TlsError::NoIdentity`]): `ca.pem` alone is not enough.
///
/// `ca.pem` is also copied into `data_dir` when the CA lives elsewhere, so clients find it
/// there.
pub fn ensure_node_identity(
    ca_dir: &Path,
    data_dir: &Path,
    node_name: &str,
    names: &[String],
) -> Result<NodeIdentity, TlsError> {
    let ca_path = ca_dir.join(CA_CERT_FILE);
    let has_key = ca_dir.join(CA_KEY_FILE).exists();
    if has_key || !ca_path.exists() {
        let ca = if has_key {
            CertificateAuthority::load(ca_dir)?
        } else {
            tracing::info!(ca_dir = %ca_dir.display(), "no CA found: creating one");
            let ca = CertificateAuthority::generate("Chorus cluster CA")?;
            ca.save(ca_dir)?;
            ca
        };
        return identity_from_ca(&ca, ca_dir, data_dir, node_name, names);
    }
    let missing: Vec<&str> = ISSUED_FILES
        .into_iter()
        .filter(|file| !ca_dir.join(file).exists())
        .collect();
    if !missing.is_empty() {
        return Err(TlsError::NoIdentity {
            ca_dir: ca_dir.to_path_buf(),
            missing: missing.join(", "),
        });
    }
    let identity = load_issued_identity(ca_dir, names)?;
    std::fs::create_dir_all(data_dir).map_err(io_err(data_dir))?;
    if ca_dir != data_dir {
        let ca_pem = std::fs::read_to_string(&ca_path).map_err(io_err(&ca_path))?;
        write_file(&data_dir.join(CA_CERT_FILE), &ca_pem, false)?;
        // A leaf written into the data dir while this node held the CA key would still be
        // a valid cluster identity, on a volume that outlives the pod: remove it.
        for file in [NODE_CERT_FILE, NODE_KEY_FILE] {
            let stale = data_dir.join(file);
            match std::fs::remove_file(&stale) {
                Ok(()) => tracing::info!(path = %stale.display(), "removed an old leaf file"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&stale)(e)),
            }
        }
    }
    Ok(identity)
}

/// Issues a fresh leaf from `ca` for `names` into `data_dir`.
fn identity_from_ca(
    ca: &CertificateAuthority,
    ca_dir: &Path,
    data_dir: &Path,
    node_name: &str,
    names: &[String],
) -> Result<NodeIdentity, TlsError> {
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
        ca_path,
        cluster_secret: ca.mesh_cookie(),
    })
}

/// Writes an issued identity for a node named `node_name` into `out_dir` (created if
/// absent): `ca.pem`, a leaf for `names` in `node.pem`, its key in `node-key.pem` (mode
/// 0600) and the actor-mesh cookie in `mesh-cookie` (mode 0600). A node started with
/// `--ca OUT_DIR` uses it without ever seeing the CA key. `names` are used as given (the
/// caller adds `localhost` and `127.0.0.1`, as a node does for itself).
pub fn issue_node_identity(
    ca: &CertificateAuthority,
    out_dir: &Path,
    node_name: &str,
    names: &[String],
) -> Result<(), TlsError> {
    std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    let leaf = ca.issue(node_name, names)?;
    write_file(&out_dir.join(CA_CERT_FILE), ca.cert_pem(), false)?;
    write_file(&out_dir.join(NODE_CERT_FILE), &leaf.cert_pem, false)?;
    write_file(&out_dir.join(NODE_KEY_FILE), &leaf.key_pem, true)?;
    write_file(
        &out_dir.join(MESH_COOKIE_FILE),
        &format!("{}\n", ca.mesh_cookie()),
        true,
    )
}

/// Loads and checks an issued identity in `dir`: the leaf must verify against `ca.pem`
/// (webpki, for both server and client use, as peers check it) and match its key; names
/// in `names` that the leaf does not cover are logged as a warning (a peer or client
/// connecting by one of them would refuse the node), not refused.
fn load_issued_identity(dir: &Path, names: &[String]) -> Result<NodeIdentity, TlsError> {
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read_to_string(&path)
            .map(|text| (text, path.clone()))
            .map_err(io_err(&path))
    };
    let (ca_pem, ca_path) = read(CA_CERT_FILE)?;
    let (cert_pem, cert_path) = read(NODE_CERT_FILE)?;
    let (key_pem, key_path) = read(NODE_KEY_FILE)?;
    let (cookie, cookie_path) = read(MESH_COOKIE_FILE)?;

    let ca_cert = parse_certs(&ca_pem, &ca_path)?.remove(0);
    // The leaf file may hold the chain (leaf first); only the leaf is used.
    let leaf = parse_certs(&cert_pem, &cert_path)?.remove(0);
    let key = parse_key(&key_pem, &key_path)?;
    let not_issued = |reason: String| TlsError::NotIssuedByCa {
        cert_path: cert_path.clone(),
        ca_path: ca_path.clone(),
        reason,
    };
    verify_leaf(&leaf, &ca_cert).map_err(not_issued)?;
    let provider = crypto_provider();
    rustls::sign::CertifiedKey::from_der(vec![leaf.clone()], key.clone_key(), &provider).map_err(
        |e| TlsError::Pem {
            path: key_path.clone(),
            what: format!("not the key of {}: {e}", cert_path.display()),
        },
    )?;
    let missing = names_not_covered(&leaf, names);
    if !missing.is_empty() {
        tracing::warn!(
            cert = %cert_path.display(),
            ?missing,
            "the issued node certificate lacks names this node uses: peers or clients that \
             connect by them will refuse it; issue it again with `chorus ca issue --name …`"
        );
    }

    let cookie = cookie.trim();
    if cookie.len() != MESH_COOKIE_CHARS || !cookie.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TlsError::Cookie { path: cookie_path });
    }
    Ok(NodeIdentity {
        cert_chain: vec![leaf, ca_cert.clone()],
        key,
        ca: ca_cert,
        ca_path,
        cluster_secret: cookie.to_string(),
    })
}

/// Checks that `leaf` chains to `ca` and may be used both as a TLS server and as a TLS
/// client certificate (nodes use one certificate for both in mutual TLS); the error
/// says why not.
fn verify_leaf(leaf: &CertificateDer<'static>, ca: &CertificateDer<'static>) -> Result<(), String> {
    let provider = crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| format!("the CA certificate is unusable: {e}"))?;
    let roots = Arc::new(roots);
    let parsed = rustls::server::ParsedCertificate::try_from(leaf).map_err(|e| e.to_string())?;
    let now = rustls::pki_types::UnixTime::now();
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        &[],
        now,
        provider.signature_verification_algorithms.all,
    )
    .map_err(|e| format!("as a server certificate: {e}"))?;
    let client_verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| e.to_string())?;
    client_verifier
        .verify_client_cert(leaf, &[], now)
        .map_err(|e| format!("as a client certificate: {e}"))?;
    Ok(())
}

/// The names in `names` that `leaf` is not valid for (DNS names and IP addresses; a name
/// that is neither counts as not covered).
fn names_not_covered(leaf: &CertificateDer<'static>, names: &[String]) -> Vec<String> {
    let Ok(parsed) = rustls::server::ParsedCertificate::try_from(leaf) else {
        return names.to_vec();
    };
    names
        .iter()
        .filter(|name| {
            let Ok(server_name) = rustls::pki_types::ServerName::try_from(name.as_str()) else {
                return true;
            };
            rustls::client::verify_server_name(&parsed, &server_name).is_err()
        })
        .cloned()
        .collect()
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

    fn names() -> Vec<String> {
        vec!["127.0.0.1".to_string(), "localhost".to_string()]
    }

    /// A CA in `dir/ca` and an identity issued from it into `dir/issued`.
    fn issued(dir: &Path, names: &[String]) -> CertificateAuthority {
        let ca = CertificateAuthority::generate("test CA").expect("ca");
        ca.save(&dir.join("ca")).expect("save ca");
        issue_node_identity(&ca, &dir.join("issued"), "node-1", names).expect("issue");
        ca
    }

    #[test]
    fn identity_is_created_once_and_leaf_is_signed_by_the_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let names = names();
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

    #[test]
    fn a_node_with_the_ca_key_issues_itself_a_leaf_and_derives_the_cookie_from_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::generate("test CA").expect("ca");
        ca.save(&dir.path().join("ca")).expect("save");
        let data = dir.path().join("data");
        let identity =
            ensure_node_identity(&dir.path().join("ca"), &data, "node-1", &names()).expect("id");
        assert_eq!(identity.cluster_secret, ca.mesh_cookie());
        assert_eq!(identity.ca_path, dir.path().join("ca").join(CA_CERT_FILE));
        assert_eq!(
            std::fs::read_to_string(data.join(CA_CERT_FILE)).expect("copied ca"),
            ca.cert_pem()
        );
        assert!(
            data.join(NODE_KEY_FILE).exists(),
            "the leaf is written for inspection"
        );
        verify_leaf(&identity.cert_chain[0], &identity.ca).expect("leaf chains to the CA");
    }

    #[test]
    fn a_node_with_an_issued_identity_uses_it_and_agrees_on_the_cookie() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = issued(dir.path(), &names());
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        // Leaves from a time this node held the key.
        std::fs::write(data.join(NODE_CERT_FILE), "old").expect("old leaf");
        std::fs::write(data.join(NODE_KEY_FILE), "old").expect("old key");

        let issued_dir = dir.path().join("issued");
        let identity =
            ensure_node_identity(&issued_dir, &data, "node-1", &names()).expect("identity");
        assert_eq!(
            identity.cluster_secret,
            ca.mesh_cookie(),
            "one cookie per CA"
        );
        assert_eq!(identity.ca_path, issued_dir.join(CA_CERT_FILE));
        let issued_leaf =
            std::fs::read_to_string(issued_dir.join(NODE_CERT_FILE)).expect("issued leaf");
        assert_eq!(
            identity.cert_chain[0],
            parse_certs(&issued_leaf, Path::new("node.pem")).expect("pem")[0],
            "the issued leaf is used as it is, not re-issued"
        );
        assert_eq!(
            std::fs::read_to_string(data.join(CA_CERT_FILE)).expect("copied ca"),
            ca.cert_pem()
        );
        assert!(
            !data.join(NODE_KEY_FILE).exists(),
            "an old leaf key is removed"
        );
        assert!(!data.join(NODE_CERT_FILE).exists());
        assert!(!issued_dir.join(CA_KEY_FILE).exists());
        server_config(&identity, b"chorus/1").expect("server config");
    }

    #[cfg(unix)]
    #[test]
    fn an_issued_key_and_cookie_are_readable_by_their_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("issued");
        std::fs::create_dir_all(&out).expect("out");
        // Issuing again over files that were world-readable narrows them.
        std::fs::write(out.join(NODE_KEY_FILE), "old").expect("old");
        std::fs::set_permissions(
            out.join(NODE_KEY_FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        issued(dir.path(), &names());
        for file in [NODE_KEY_FILE, MESH_COOKIE_FILE] {
            let mode = std::fs::metadata(out.join(file))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
    }

    #[test]
    fn an_empty_ca_dir_gets_a_new_ca_for_development() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_dir = dir.path().join("ca");
        let identity = ensure_node_identity(&ca_dir, &dir.path().join("data"), "n", &names())
            .expect("identity");
        assert!(ca_dir.join(CA_CERT_FILE).exists() && ca_dir.join(CA_KEY_FILE).exists());
        let ca = CertificateAuthority::load(&ca_dir).expect("load");
        assert_eq!(identity.cluster_secret, ca.mesh_cookie());
    }

    #[test]
    fn a_ca_certificate_alone_is_refused_naming_chorus_ca_issue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::generate("test CA").expect("ca");
        let ca_dir = dir.path().join("ca");
        std::fs::create_dir_all(&ca_dir).expect("dir");
        std::fs::write(ca_dir.join(CA_CERT_FILE), ca.cert_pem()).expect("ca.pem");
        let error = ensure_node_identity(&ca_dir, &dir.path().join("data"), "n", &names())
            .expect_err("no key, no identity");
        assert!(matches!(error, TlsError::NoIdentity { .. }), "{error:?}");
        let message = error.to_string();
        assert!(message.contains("chorus ca issue"), "{message}");
        assert!(
            message.contains("node.pem, node-key.pem, mesh-cookie"),
            "{message}"
        );
        assert!(
            !ca_dir.join(CA_KEY_FILE).exists(),
            "no CA is created over an existing ca.pem"
        );
    }

    #[test]
    fn an_identity_issued_by_another_ca_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        issued(dir.path(), &names());
        let other = CertificateAuthority::generate("test CA").expect("other ca");
        let issued_dir = dir.path().join("issued");
        std::fs::write(issued_dir.join(CA_CERT_FILE), other.cert_pem()).expect("swap ca");
        let error = ensure_node_identity(&issued_dir, &dir.path().join("data"), "n", &names())
            .expect_err("foreign leaf");
        assert!(matches!(error, TlsError::NotIssuedByCa { .. }), "{error:?}");
    }

    #[test]
    fn an_issued_certificate_with_another_key_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = issued(dir.path(), &names());
        let issued_dir = dir.path().join("issued");
        let other = ca.issue("node-1", &names()).expect("other leaf");
        std::fs::write(issued_dir.join(NODE_KEY_FILE), other.key_pem).expect("swap key");
        let error = ensure_node_identity(&issued_dir, &dir.path().join("data"), "n", &names())
            .expect_err("key of another leaf");
        assert!(
            matches!(&error, TlsError::Pem { path, .. } if path.ends_with(NODE_KEY_FILE)),
            "{error:?}"
        );
    }

    #[test]
    fn a_malformed_cookie_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        issued(dir.path(), &names());
        let issued_dir = dir.path().join("issued");
        std::fs::write(issued_dir.join(MESH_COOKIE_FILE), "short\n").expect("cookie");
        let error = ensure_node_identity(&issued_dir, &dir.path().join("data"), "n", &names())
            .expect_err("bad cookie");
        assert!(matches!(error, TlsError::Cookie { .. }), "{error:?}");
    }

    #[test]
    fn names_the_issued_certificate_lacks_are_reported_but_not_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let given = vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
            "10.1.2.3".to_string(),
            "chorus.example.com".to_string(),
        ];
        issued(dir.path(), &given);
        let issued_dir = dir.path().join("issued");
        let mut wanted = given.clone();
        wanted.extend(["10.9.9.9".to_string(), "other.example.com".to_string()]);
        let identity = ensure_node_identity(&issued_dir, &dir.path().join("data"), "n", &wanted)
            .expect("missing names only warn");
        assert_eq!(
            names_not_covered(&identity.cert_chain[0], &wanted),
            vec!["10.9.9.9".to_string(), "other.example.com".to_string()]
        );
        assert!(names_not_covered(&identity.cert_chain[0], &given).is_empty());
    }
}
