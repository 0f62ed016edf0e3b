//! Inter-node links: QUIC with mutual TLS from the cluster CA.
//!
//! Each node binds one [`ClusterEndpoint`] on its cluster address. Both sides present a
//! certificate signed by the cluster CA and verify the other's (a node with a foreign CA
//! cannot connect, nor be connected to). One connection per peer is kept and reused; each
//! RPC is one bidirectional stream: the request bytes, then the reply bytes, each bounded.
//! A stream whose first byte is [`ACTOR_STREAM_TAG`] is not an RPC but a long-lived
//! byte stream handed whole to [`RpcHandler::actor_stream`] (the actor mesh runs
//! ractor_cluster over it). Datagrams are enabled for voice. QUIC keep-alive and idle
//! timeout are the failure detector's input: a peer that stops answering is noticed within
//! [`LinkConfig::idle_timeout_ms`].
//!
//! Both QUIC endpoints of a node (this one and the clients') keep the secret of their
//! stateless resets and connection ids in the data dir ([`stateless_reset_secret`]): a peer
//! or client still sending on a connection to a killed node's previous run gets a reset
//! from the restarted node at its next packet and reconnects at once, instead of waiting
//! out its idle timeout.
//!
//! This module moves bytes; what they mean (Raft, routing, relay) is decided above it.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quinn::VarInt;

use crate::tls::{crypto_provider, NodeIdentity, TlsError};

/// ALPN of inter-node connections (distinct from the client protocol's `chorus/1`).
pub const CLUSTER_ALPN: &[u8] = b"chorus-cluster/1";
/// Largest RPC request or reply, in bytes (Raft snapshots travel as one reply).
pub const RPC_MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// First byte of a stream that carries the actor mesh rather than one RPC. `0xc1` is the
/// one byte MessagePack never uses, so no RPC request can begin with it.
pub const ACTOR_STREAM_TAG: u8 = 0xc1;
/// Kernel buffer asked for on the endpoint's UDP socket, each way.
pub const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// Concurrent RPC streams a peer may open on one connection.
pub const RPC_STREAMS_CONCURRENT_MAX: u32 = 1024;

/// Link timing. Every field has its unit last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConfig {
    /// A peer silent for this long is considered gone (QUIC idle timeout). Default 3,000.
    pub idle_timeout_ms: u64,
    /// Keep-alive interval; well under the idle timeout. Default 500.
    pub keep_alive_ms: u64,
    /// Time to establish a connection. Default 2,000.
    pub connect_timeout_ms: u64,
    /// Time for one RPC (request sent to reply read). Default 5,000.
    pub rpc_timeout_ms: u64,
    /// The secret QUIC stateless-reset tokens are derived from (see
    /// [`stateless_reset_secret`]). Kept across restarts, it lets a restarted node answer a
    /// peer still sending on a connection from before the restart with a reset the peer
    /// accepts, so the peer drops the dead connection at its next packet instead of after
    /// the idle timeout. `None` (default): a random one per process.
    pub stateless_reset_secret: Option<[u8; 32]>,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            idle_timeout_ms: 3_000,
            keep_alive_ms: 500,
            connect_timeout_ms: 2_000,
            rpc_timeout_ms: 5_000,
            stateless_reset_secret: None,
        }
    }
}

/// Key under which [`stateless_reset_secret`] keeps its secret in the identity tree.
const RESET_SECRET_KEY: &str = "quic_reset_secret";

/// This node's secret for QUIC stateless resets on the endpoint named `purpose` (e.g.
/// `"cluster"`, `"clients"`): derived from one random secret kept in the node's data dir
/// (created and flushed on first use), so it is the same after a restart and differs
/// between endpoints and nodes.
pub fn stateless_reset_secret(db: &sled::Db, purpose: &str) -> Result<[u8; 32], LinkError> {
    let storage = |e: &dyn std::fmt::Display| LinkError::Storage(e.to_string());
    let tree = db
        .open_tree(crate::service::IDENTITY_TREE)
        .map_err(|e| storage(&e))?;
    let root: Vec<u8> = match tree.get(RESET_SECRET_KEY).map_err(|e| storage(&e))? {
        Some(stored) if stored.len() == 32 => stored.to_vec(),
        _ => {
            let mut fresh = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut fresh)
                .map_err(|_| storage(&"the system random generator failed"))?;
            tree.insert(RESET_SECRET_KEY, &fresh[..])
                .map_err(|e| storage(&e))?;
            tree.flush().map_err(|e| storage(&e))?;
            fresh.to_vec()
        }
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &root);
    let tag = ring::hmac::sign(&key, purpose.as_bytes());
    let mut secret = [0u8; 32];
    secret.copy_from_slice(&tag.as_ref()[..32]);
    Ok(secret)
}

/// The QUIC endpoint configuration for a stateless-reset secret (`None`: quinn's random
/// per-process key).
///
/// With a secret, the connection ids the endpoint hands out are keyed by it too: a
/// restarted endpoint only answers packets with a reset when it recognises their
/// connection id as one of its own.
pub fn endpoint_config(stateless_reset_secret: Option<[u8; 32]>) -> quinn::EndpointConfig {
    let Some(secret) = stateless_reset_secret else {
        return quinn::EndpointConfig::default();
    };
    let mut config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &secret,
    )));
    let cid_key = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
        b"connection ids",
    );
    let mut cid_key_bytes = [0u8; 8];
    cid_key_bytes.copy_from_slice(&cid_key.as_ref()[..8]);
    let cid_key = u64::from_be_bytes(cid_key_bytes);
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
            as Box<dyn quinn::ConnectionIdGenerator>
    });
    config
}

/// Link errors.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The node's stored link secret could not be read or written.
    #[error("link secret storage: {0}")]
    Storage(String),
    /// The endpoint could not be bound.
    #[error("cannot bind the cluster endpoint on {addr}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The connection could not be established.
    #[error("cannot connect to {peer}: {reason}")]
    Connect {
        /// Peer.
        peer: SocketAddr,
        /// Cause.
        reason: String,
    },
    /// The RPC failed on the wire.
    #[error("rpc to {peer} failed: {reason}")]
    Rpc {
        /// Peer.
        peer: SocketAddr,
        /// Cause.
        reason: String,
    },
    /// The RPC took longer than allowed.
    #[error("rpc to {peer} timed out after {timeout_ms} ms")]
    Timeout {
        /// Peer.
        peer: SocketAddr,
        /// The limit.
        timeout_ms: u64,
    },
    /// The TLS handshake with `peer` failed on a certificate: the two nodes do not share
    /// a CA (or a certificate lacks the address it is reached by). Not transient.
    #[error(
        "{}",
        match refused {
            CertificateRefusal::Theirs => format!(
                "the peer at {peer} presented a certificate not signed by this node's CA \
                 ({}): every node of a cluster must use the same CA ({detail})",
                ca_path.display()
            ),
            CertificateRefusal::Ours => format!(
                "the peer at {peer} refused our certificate (signed by the CA in {}): every \
                 node of a cluster must use the same CA ({detail})",
                ca_path.display()
            ),
        }
    )]
    Certificate {
        /// Peer.
        peer: SocketAddr,
        /// Whose certificate was refused.
        refused: CertificateRefusal,
        /// This node's CA certificate.
        ca_path: std::path::PathBuf,
        /// The TLS error.
        detail: String,
    },
}

/// Which side of a handshake refused the other's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateRefusal {
    /// This node refused the peer's certificate.
    Theirs,
    /// The peer refused this node's certificate.
    Ours,
}

/// TLS alerts that mean a certificate was refused (RFC 8446 6.2): bad_certificate,
/// unsupported_certificate, certificate_revoked, certificate_expired,
/// certificate_unknown, unknown_ca, access_denied, decrypt_error (rustls sends it for a
/// chain whose signature does not verify: the issuer's name matches, its key does not,
/// as with two CAs both named "Chorus cluster CA") and certificate_required.
const CERTIFICATE_ALERTS: [u8; 9] = [42, 43, 44, 45, 46, 48, 49, 51, 116];

/// Whether a failed handshake was a certificate refusal, and by whom: a crypto error
/// raised here is this node refusing the peer's certificate, one the peer closed the
/// connection with is the peer refusing ours.
pub fn certificate_refusal(error: &quinn::ConnectionError) -> Option<CertificateRefusal> {
    let is_certificate_alert = |code: quinn::TransportErrorCode| {
        CERTIFICATE_ALERTS
            .iter()
            .any(|alert| code == quinn::TransportErrorCode::crypto(*alert))
    };
    match error {
        quinn::ConnectionError::TransportError(error) if is_certificate_alert(error.code) => {
            Some(CertificateRefusal::Theirs)
        }
        quinn::ConnectionError::ConnectionClosed(close)
            if is_certificate_alert(close.error_code) =>
        {
            Some(CertificateRefusal::Ours)
        }
        _ => None,
    }
}

/// Serves RPCs arriving from peers.
pub trait RpcHandler: Send + Sync + 'static {
    /// Answers one request from `peer`.
    fn handle(&self, peer: SocketAddr, request: Bytes) -> impl Future<Output = Bytes> + Send;

    /// Takes a stream `peer` opened with [`ClusterEndpoint::open_actor_stream`] (its tag
    /// already read). The default refuses it by dropping both halves.
    fn actor_stream(&self, peer: SocketAddr, send: quinn::SendStream, recv: quinn::RecvStream) {
        let _ = (peer, send, recv);
    }

    /// Takes one datagram from `peer` (voice). Datagrams of one connection are handed over
    /// one at a time, in arrival order. The default drops it.
    fn datagram(&self, peer: SocketAddr, datagram: Bytes) -> impl Future<Output = ()> + Send {
        let _ = (peer, datagram);
        async {}
    }
}

/// One node's inter-node QUIC endpoint.
#[derive(Clone)]
pub struct ClusterEndpoint {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    config: LinkConfig,
    /// This node's CA certificate file, named in certificate errors.
    ca_path: Arc<std::path::PathBuf>,
    connections: Arc<Mutex<HashMap<SocketAddr, quinn::Connection>>>,
}

impl std::fmt::Debug for ClusterEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterEndpoint")
            .field("local", &self.endpoint.local_addr().ok())
            .finish()
    }
}

fn transport(config: &LinkConfig) -> Result<quinn::TransportConfig, LinkError> {
    let mut transport = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(Duration::from_millis(config.idle_timeout_ms))
        .map_err(|e| LinkError::Rpc {
            peer: SocketAddr::from(([0, 0, 0, 0], 0)),
            reason: format!("idle timeout out of range: {e}"),
        })?;
    transport.max_idle_timeout(Some(idle));
    transport.keep_alive_interval(Some(Duration::from_millis(config.keep_alive_ms)));
    transport.max_concurrent_bidi_streams(VarInt::from_u32(RPC_STREAMS_CONCURRENT_MAX));
    transport.max_concurrent_uni_streams(VarInt::from_u32(RPC_STREAMS_CONCURRENT_MAX));
    // Voice between nodes: the oldest datagrams are dropped beyond these, so relayed
    // audio stays current when a link falls behind.
    transport.datagram_receive_buffer_size(Some(1024 * 1024));
    transport.datagram_send_buffer_size(256 * 1024);
    Ok(transport)
}

impl ClusterEndpoint {
    /// Binds the endpoint on `addr` with this node's identity (mutual TLS).
    pub fn bind(
        addr: SocketAddr,
        identity: &NodeIdentity,
        config: LinkConfig,
    ) -> Result<Self, LinkError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(identity.ca.clone()).map_err(TlsError::from)?;
        let roots = Arc::new(roots);

        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            crypto_provider(),
        )
        .build()
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
        let mut server_tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::from)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())
            .map_err(TlsError::from)?;
        server_tls.alpn_protocols = vec![CLUSTER_ALPN.to_vec()];

        let mut client_tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::from)?
            .with_root_certificates(roots)
            .with_client_auth_cert(identity.cert_chain.clone(), identity.key.clone_key())
            .map_err(TlsError::from)?;
        client_tls.alpn_protocols = vec![CLUSTER_ALPN.to_vec()];

        let transport = Arc::new(transport(&config)?);
        let server_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)
            .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport.clone());
        let client_crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)
            .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport);

        let socket =
            std::net::UdpSocket::bind(addr).map_err(|source| LinkError::Bind { addr, source })?;
        // Voice fans out through this one socket: ask for large kernel buffers (best
        // effort; the kernel caps them).
        if let Ok(state) = quinn::udp::UdpSocketState::new((&socket).into()) {
            let _ = state.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER_BYTES);
            let _ = state.set_send_buffer_size((&socket).into(), SOCKET_BUFFER_BYTES);
        }
        let mut endpoint = quinn::Endpoint::new(
            endpoint_config(config.stateless_reset_secret),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| LinkError::Bind { addr, source })?;
        endpoint.set_default_client_config(client.clone());
        Ok(ClusterEndpoint {
            endpoint,
            client,
            config,
            ca_path: Arc::new(identity.ca_path.clone()),
            connections: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// The timing in force.
    pub fn config(&self) -> &LinkConfig {
        &self.config
    }

    /// The live connection to `peer`, connecting if needed.
    pub async fn connection(&self, peer: SocketAddr) -> Result<quinn::Connection, LinkError> {
        if let Some(connection) = self.cached(peer) {
            return Ok(connection);
        }
        // The certificate carries the node's IP addresses as SANs; verify against the IP.
        let server_name = peer.ip().to_string();
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), peer, &server_name)
            .map_err(|e| LinkError::Connect {
                peer,
                reason: e.to_string(),
            })?;
        let connection = tokio::time::timeout(
            Duration::from_millis(self.config.connect_timeout_ms),
            connecting,
        )
        .await
        .map_err(|_| LinkError::Connect {
            peer,
            reason: format!("no handshake within {} ms", self.config.connect_timeout_ms),
        })?
        .map_err(|e| match certificate_refusal(&e) {
            Some(refused) => LinkError::Certificate {
                peer,
                refused,
                ca_path: self.ca_path.to_path_buf(),
                detail: e.to_string(),
            },
            None => LinkError::Connect {
                peer,
                reason: e.to_string(),
            },
        })?;
        if let Ok(mut map) = self.connections.lock() {
            map.insert(peer, connection.clone());
        }
        Ok(connection)
    }

    fn cached(&self, peer: SocketAddr) -> Option<quinn::Connection> {
        let mut map = self.connections.lock().ok()?;
        match map.get(&peer) {
            Some(connection) if connection.close_reason().is_none() => Some(connection.clone()),
            Some(_) => {
                map.remove(&peer);
                None
            }
            None => None,
        }
    }

    /// Sends `request` to `peer` and returns its reply.
    pub async fn call(&self, peer: SocketAddr, request: Bytes) -> Result<Bytes, LinkError> {
        let timeout_ms = self.config.rpc_timeout_ms;
        tokio::time::timeout(
            Duration::from_millis(timeout_ms),
            self.call_inner(peer, request),
        )
        .await
        .map_err(|_| LinkError::Timeout { peer, timeout_ms })?
    }

    /// The error for a stream on `connection` that failed with `reason`: a certificate
    /// refusal if that is why the connection closed (in TLS 1.3 the client's handshake
    /// ends before the server has checked the client's certificate, so a peer refusing
    /// ours shows up on the first stream), else [`LinkError::Rpc`].
    fn stream_error(
        &self,
        peer: SocketAddr,
        connection: &quinn::Connection,
        reason: String,
    ) -> LinkError {
        match connection.close_reason() {
            Some(closed) => match certificate_refusal(&closed) {
                Some(refused) => LinkError::Certificate {
                    peer,
                    refused,
                    ca_path: self.ca_path.to_path_buf(),
                    detail: closed.to_string(),
                },
                None => LinkError::Rpc { peer, reason },
            },
            None => LinkError::Rpc { peer, reason },
        }
    }

    async fn call_inner(&self, peer: SocketAddr, request: Bytes) -> Result<Bytes, LinkError> {
        let connection = self.connection(peer).await?;
        let rpc_err = |reason: String| self.stream_error(peer, &connection, reason);
        let (mut send, mut recv) = connection
            .open_bi()
            .await
            .map_err(|e| rpc_err(e.to_string()))?;
        send.write_all(&request)
            .await
            .map_err(|e| rpc_err(e.to_string()))?;
        send.finish().map_err(|e| rpc_err(e.to_string()))?;
        let reply = recv
            .read_to_end(RPC_MESSAGE_BYTES_MAX)
            .await
            .map_err(|e| rpc_err(e.to_string()))?;
        Ok(Bytes::from(reply))
    }

    /// Opens a long-lived bidirectional stream to `peer` for the actor mesh: its first
    /// byte, [`ACTOR_STREAM_TAG`], tells the peer it is not an RPC.
    pub async fn open_actor_stream(
        &self,
        peer: SocketAddr,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), LinkError> {
        let connection = self.connection(peer).await?;
        let rpc_err = |reason: String| self.stream_error(peer, &connection, reason);
        let (mut send, recv) = tokio::time::timeout(
            Duration::from_millis(self.config.connect_timeout_ms),
            connection.open_bi(),
        )
        .await
        .map_err(|_| LinkError::Timeout {
            peer,
            timeout_ms: self.config.connect_timeout_ms,
        })?
        .map_err(|e| rpc_err(e.to_string()))?;
        send.write_all(&[ACTOR_STREAM_TAG])
            .await
            .map_err(|e| rpc_err(e.to_string()))?;
        Ok((send, recv))
    }

    /// Opens a connection to `peer` in the background unless one is open (so that the
    /// first datagrams to it are not lost).
    pub fn ensure_connected(&self, peer: SocketAddr) {
        if self.cached(peer).is_some() {
            return;
        }
        let endpoint = self.clone();
        tokio::spawn(async move {
            let _ = endpoint.connection(peer).await;
        });
    }

    /// Sends a datagram to `peer` (unreliable; for voice) without waiting: on the cached
    /// connection if there is one; otherwise this datagram is dropped and a connection is
    /// opened in the background for the next ones.
    ///
    /// # Errors
    ///
    /// [`LinkError::Connect`] when there is no connection yet, [`LinkError::Rpc`] when the
    /// datagram is too large or the peer does not take datagrams.
    pub fn try_send_datagram(&self, peer: SocketAddr, datagram: Bytes) -> Result<(), LinkError> {
        let Some(connection) = self.cached(peer) else {
            self.ensure_connected(peer);
            return Err(LinkError::Connect {
                peer,
                reason: "not connected yet".into(),
            });
        };
        connection
            .send_datagram(datagram)
            .map_err(|e| LinkError::Rpc {
                peer,
                reason: e.to_string(),
            })
    }

    /// Serves incoming connections until `shutdown` resolves: each request stream is
    /// handed to `handler`, concurrently.
    pub async fn serve<H: RpcHandler>(
        &self,
        handler: Arc<H>,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        tokio::pin!(shutdown);
        // A foreign node retries its join: one warning per interval is enough.
        let warned_at = Arc::new(WarnInterval::new(CERTIFICATE_WARNING_INTERVAL));
        loop {
            let incoming = tokio::select! {
                _ = &mut shutdown => break,
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) => incoming,
                    None => break,
                },
            };
            let handler = handler.clone();
            let ca_path = self.ca_path.clone();
            let warned_at = warned_at.clone();
            tokio::spawn(async move {
                let peer = incoming.remote_address();
                let connection = match incoming.await {
                    Ok(connection) => connection,
                    Err(error) => {
                        let ca = ca_path.display();
                        match certificate_refusal(&error) {
                            Some(CertificateRefusal::Theirs) if warned_at.due() => {
                                tracing::warn!(
                                    %peer, %error, %ca,
                                    "refused a node whose certificate is not signed by this \
                                     node's CA: every node of a cluster must use the same CA"
                                )
                            }
                            Some(CertificateRefusal::Ours) if warned_at.due() => {
                                tracing::warn!(
                                    %peer, %error, %ca,
                                    "a node refused this node's certificate: it trusts \
                                     another CA; every node of a cluster must use the same CA"
                                )
                            }
                            _ => tracing::debug!(%peer, %error, "cluster handshake refused"),
                        }
                        return;
                    }
                };
                serve_connection(connection, handler).await;
            });
        }
    }

    /// Closes every connection and the endpoint.
    pub fn close(&self) {
        self.endpoint
            .close(VarInt::from_u32(0), b"node shutting down");
    }
}

/// Least time between two warnings about refused certificates on one endpoint.
const CERTIFICATE_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// Says when a repeated warning is due again: at most once per interval.
struct WarnInterval {
    interval: Duration,
    last: Mutex<Option<std::time::Instant>>,
}

impl WarnInterval {
    fn new(interval: Duration) -> Self {
        WarnInterval {
            interval,
            last: Mutex::new(None),
        }
    }

    /// True (and the interval restarts) if no warning was due within the interval.
    fn due(&self) -> bool {
        let Ok(mut last) = self.last.lock() else {
            return false;
        };
        let now = std::time::Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < self.interval) {
            return false;
        }
        *last = Some(now);
        true
    }
}

async fn serve_connection<H: RpcHandler>(connection: quinn::Connection, handler: Arc<H>) {
    let peer = connection.remote_address();
    let datagrams = connection.clone();
    let datagram_handler = handler.clone();
    tokio::spawn(async move {
        while let Ok(datagram) = datagrams.read_datagram().await {
            datagram_handler.datagram(peer, datagram).await;
        }
    });
    loop {
        let (mut send, mut recv) = match connection.accept_bi().await {
            Ok(streams) => streams,
            Err(_) => return,
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let mut first = [0u8; 1];
            if let Err(error) = recv.read_exact(&mut first).await {
                tracing::debug!(%peer, %error, "empty rpc stream");
                return;
            }
            if first[0] == ACTOR_STREAM_TAG {
                handler.actor_stream(peer, send, recv);
                return;
            }
            let request = match recv.read_to_end(RPC_MESSAGE_BYTES_MAX - 1).await {
                Ok(rest) => {
                    let mut request = Vec::with_capacity(rest.len() + 1);
                    request.push(first[0]);
                    request.extend_from_slice(&rest);
                    Bytes::from(request)
                }
                Err(error) => {
                    tracing::debug!(%peer, %error, "bad rpc request");
                    return;
                }
            };
            let reply = handler.handle(peer, request).await;
            if send.write_all(&reply).await.is_ok() {
                let _ = send.finish();
                // Wait for the reply to be acknowledged so dropping the stream does not
                // cut it short.
                let _ = send.stopped().await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{ensure_node_identity, CertificateAuthority};

    struct Echo;
    impl RpcHandler for Echo {
        async fn handle(&self, _peer: SocketAddr, request: Bytes) -> Bytes {
            let mut reply = b"echo:".to_vec();
            reply.extend_from_slice(&request);
            Bytes::from(reply)
        }
    }

    fn identity(ca_dir: &std::path::Path, data: &std::path::Path, name: &str) -> NodeIdentity {
        ensure_node_identity(ca_dir, data, name, &["127.0.0.1".to_string()]).expect("identity")
    }

    #[tokio::test]
    async fn nodes_of_one_ca_talk_and_a_foreign_node_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        CertificateAuthority::load_or_create(&ca, "test CA").expect("ca");
        let a = ClusterEndpoint::bind(
            "127.0.0.1:0".parse().expect("addr"),
            &identity(&ca, &dir.path().join("a"), "a"),
            LinkConfig::default(),
        )
        .expect("bind a");
        let b = ClusterEndpoint::bind(
            "127.0.0.1:0".parse().expect("addr"),
            &identity(&ca, &dir.path().join("b"), "b"),
            LinkConfig::default(),
        )
        .expect("bind b");
        let b_addr = b.local_addr().expect("addr");
        let server = b.clone();
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        let serving = tokio::spawn(async move {
            server
                .serve(Arc::new(Echo), stopped.cancelled_owned())
                .await
        });

        for i in 0..3 {
            let reply = a
                .call(b_addr, Bytes::from(format!("hi {i}")))
                .await
                .expect("rpc");
            assert_eq!(&reply[..], format!("echo:hi {i}").as_bytes());
        }

        // A node whose certificate comes from another CA cannot call.
        let foreign_ca = dir.path().join("foreign-ca");
        let mallory = ClusterEndpoint::bind(
            "127.0.0.1:0".parse().expect("addr"),
            &identity(&foreign_ca, &dir.path().join("m"), "m"),
            LinkConfig::default(),
        )
        .expect("bind mallory");
        let error = mallory
            .call(b_addr, Bytes::from_static(b"let me in"))
            .await
            .expect_err("a foreign CA is refused");
        assert!(
            matches!(
                error,
                LinkError::Certificate {
                    refused: CertificateRefusal::Theirs,
                    ..
                }
            ),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(
            message.contains("not signed by this node's CA")
                && message.contains(&foreign_ca.join("ca.pem").display().to_string())
                && message.contains("every node of a cluster must use the same CA"),
            "{message}"
        );

        // A node that trusts b's CA but holds a leaf from another CA: b refuses it.
        let mallory_identity = identity(&foreign_ca, &dir.path().join("m2"), "m2");
        let b_ca = identity(&ca, &dir.path().join("b2"), "b2").ca;
        let trusting = NodeIdentity {
            ca: b_ca,
            ..mallory_identity
        };
        let mallory = ClusterEndpoint::bind(
            "127.0.0.1:0".parse().expect("addr"),
            &trusting,
            LinkConfig::default(),
        )
        .expect("bind mallory");
        let error = mallory
            .call(b_addr, Bytes::from_static(b"let me in"))
            .await
            .expect_err("a leaf of a foreign CA is refused");
        assert!(
            matches!(
                error,
                LinkError::Certificate {
                    refused: CertificateRefusal::Ours,
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(
            error.to_string().contains("refused our certificate"),
            "{error}"
        );

        stop.cancel();
        let _ = serving.await;
    }

    #[tokio::test]
    async fn a_node_with_an_issued_identity_talks_to_a_node_holding_the_ca_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_dir = dir.path().join("ca");
        let ca = CertificateAuthority::load_or_create(&ca_dir, "test CA").expect("ca");
        let issued = dir.path().join("issued");
        crate::tls::issue_node_identity(&ca, &issued, "b", &["127.0.0.1".to_string()])
            .expect("issue");
        let a_identity = identity(&ca_dir, &dir.path().join("a"), "a");
        let b_identity = identity(&issued, &dir.path().join("b"), "b");
        assert_eq!(a_identity.cluster_secret, b_identity.cluster_secret);
        let a = ClusterEndpoint::bind(
            "127.0.0.1:0".parse().expect("addr"),
            &a_identity,
            LinkConfig::default(),
        )
        .expect("bind a");
        let b = ClusterEndpoint::bind(
            "127.0.0.1:0".parse().expect("addr"),
            &b_identity,
            LinkConfig::default(),
        )
        .expect("bind b");
        let stop = tokio_util::sync::CancellationToken::new();
        let mut serving = Vec::new();
        for server in [a.clone(), b.clone()] {
            let stopped = stop.clone();
            serving.push(tokio::spawn(async move {
                server
                    .serve(Arc::new(Echo), stopped.cancelled_owned())
                    .await
            }));
        }
        for (from, to) in [(&a, &b), (&b, &a)] {
            let reply = from
                .call(to.local_addr().expect("addr"), Bytes::from_static(b"hi"))
                .await
                .expect("rpc");
            assert_eq!(&reply[..], b"echo:hi");
        }
        stop.cancel();
        for task in serving {
            let _ = task.await;
        }
    }
}
