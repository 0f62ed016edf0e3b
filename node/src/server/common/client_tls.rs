//! TLS for clients on the public HTTP listener (`https://`, `wss://`), from a certificate
//! chain and a private key in PEM files (`tls_cert`, `tls_key`).
//!
//! The files are read again on SIGHUP and whenever their size or modification time
//! changes (checked every `tls_reload_interval_ms`), so a renewed certificate (certbot, a
//! Kubernetes Secret updated by cert-manager) is served to new connections without a
//! restart; open connections keep the one they shook hands with. A reload that fails (a
//! file half-written, a key that does not match the certificate) keeps serving the
//! previous certificate and says why in the log and in `chorus_tls_reloads_total`.
//!
//! This is separate from the cluster's own TLS (the cluster CA, QUIC to clients and
//! between nodes), which `crate::server::node` sets up.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

/// A certificate and key that can be swapped while the listener runs.
#[derive(Debug)]
pub(crate) struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// (size, modification time) of both files when last loaded.
    stamp: RwLock<Option<FileStamps>>,
}

type FileStamps = [(u64, Option<SystemTime>); 2];

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

impl ReloadingCert {
    /// Loads the pair once; an error names the file and what is wrong with it.
    pub(crate) fn load(cert_path: &Path, key_path: &Path) -> Result<Self, String> {
        let stamp = stamps(cert_path, key_path);
        let key = read_pair(cert_path, key_path)?;
        Ok(ReloadingCert {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: RwLock::new(Arc::new(key)),
            stamp: RwLock::new(stamp),
        })
    }

    /// Reads the files again; on success new handshakes use them.
    pub(crate) fn reload(&self, why: &str) -> Result<(), String> {
        let stamp = stamps(&self.cert_path, &self.key_path);
        match read_pair(&self.cert_path, &self.key_path) {
            Ok(key) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
                *self.stamp.write().unwrap_or_else(|p| p.into_inner()) = stamp;
                metrics::counter!("chorus_tls_reloads_total", "result" => "ok").increment(1);
                tracing::info!(cert = %self.cert_path.display(), why, "client TLS certificate reloaded");
                Ok(())
            }
            Err(error) => {
                // Not again for the same files: the next change or SIGHUP tries again.
                *self.stamp.write().unwrap_or_else(|p| p.into_inner()) = stamp;
                metrics::counter!("chorus_tls_reloads_total", "result" => "error").increment(1);
                tracing::error!(%error, why, "client TLS certificate not reloaded: still serving the previous one");
                Err(error)
            }
        }
    }

    /// Whether either file changed (size or modification time) since the last load.
    fn changed(&self) -> bool {
        let now = stamps(&self.cert_path, &self.key_path);
        now.is_some() && now != *self.stamp.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The server configuration for the public listener: HTTP/1.1 over TLS 1.2 or 1.3,
    /// this certificate.
    pub(crate) fn server_config(self: &Arc<Self>) -> rustls::ServerConfig {
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config
    }

    /// Reloads on SIGHUP and when the files change, until `shutdown`.
    pub(crate) async fn watch(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(hangup) => Some(hangup),
            Err(error) => {
                tracing::warn!(%error, "no SIGHUP handler: the certificate reloads on file changes only");
                None
            }
        };
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = async {
                    match hangup.as_mut() {
                        Some(h) => { h.recv().await; }
                        None => std::future::pending::<()>().await,
                    }
                } => { let _ = self.reload("SIGHUP"); }
                _ = tick.tick() => {
                    if self.changed() {
                        let _ = self.reload("the files changed");
                    }
                }
            }
        }
    }
}

fn stamps(cert_path: &Path, key_path: &Path) -> Option<FileStamps> {
    let stamp = |path: &Path| {
        std::fs::metadata(path)
            .ok()
            .map(|m| (m.len(), m.modified().ok()))
    };
    Some([stamp(cert_path)?, stamp(key_path)?])
}

/// Reads a PEM certificate chain (leaf first) and its private key, checking that they
/// belong together.
fn read_pair(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, String> {
    let cert_pem = std::fs::read(cert_path).map_err(|e| {
        format!(
            "cannot read the TLS certificate {}: {e}",
            cert_path.display()
        )
    })?;
    let chain = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "{} is not a PEM certificate chain: {e}",
                cert_path.display()
            )
        })?;
    if chain.is_empty() {
        return Err(format!(
            "{} holds no certificate (expected PEM, BEGIN CERTIFICATE)",
            cert_path.display()
        ));
    }
    let key_pem = std::fs::read(key_path)
        .map_err(|e| format!("cannot read the TLS key {}: {e}", key_path.display()))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| format!("{} is not a PEM private key: {e}", key_path.display()))?
        .ok_or_else(|| {
            format!(
                "{} holds no private key (expected PEM, BEGIN PRIVATE KEY)",
                key_path.display()
            )
        })?;
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
        format!(
            "the key {} does not fit the certificate {}: {e}",
            key_path.display(),
            cert_path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        let cert = params.self_signed(&key).expect("cert");
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert_path, cert.pem()).expect("write");
        std::fs::write(&key_path, key.serialize_pem()).expect("write");
        (cert_path, key_path)
    }

    #[test]
    fn a_pair_loads_and_a_bad_reload_keeps_the_previous_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = pair(dir.path(), "a");
        let loaded = ReloadingCert::load(&cert, &key).expect("loads");
        let before = loaded.current.read().expect("lock").cert.clone();
        assert!(!loaded.changed());
        // Another key under the same certificate: refused, the old pair stays.
        let (_, other_key) = pair(dir.path(), "b");
        std::fs::copy(&other_key, &key).expect("copy");
        assert!(loaded.changed());
        let error = loaded.reload("test").expect_err("mismatch");
        assert!(error.contains("does not fit"), "{error}");
        assert_eq!(loaded.current.read().expect("lock").cert, before);
        assert!(
            !loaded.changed(),
            "a failed reload is not retried for the same files"
        );
        // A new matching pair: served.
        let (new_cert, new_key) = pair(dir.path(), "c");
        std::fs::copy(&new_cert, &cert).expect("copy");
        std::fs::copy(&new_key, &key).expect("copy");
        loaded.reload("test").expect("reloads");
        assert_ne!(loaded.current.read().expect("lock").cert, before);
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = pair(dir.path(), "a");
        let missing = dir.path().join("missing.pem");
        let error = ReloadingCert::load(&missing, &key).expect_err("missing");
        assert!(error.contains("cannot read the TLS certificate"), "{error}");
        let error = ReloadingCert::load(&key, &key).expect_err("a key as the cert");
        assert!(error.contains("holds no certificate"), "{error}");
        let error = ReloadingCert::load(&cert, &cert).expect_err("a cert as the key");
        assert!(error.contains("holds no private key"), "{error}");
    }
}
