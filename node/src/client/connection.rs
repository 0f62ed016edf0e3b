//! One transport connection to a node: WebSocket or QUIC, frames in and out.
//!
//! [`Connection`] is deliberately low level: it does not answer pings, does not
//! reconnect, does not check sequence numbers, and lets the caller send anything,
//! including malformed, oversized and out-of-order frames and raw WebSocket messages. The
//! integration tests use it to play a misbehaving client; [`Client`](super::Client) builds
//! the well-behaved one on top of it.
//!
//! Framing (see `docs/protocol.md`): on WebSocket one message carries one frame (binary =
//! MessagePack, text = JSON); on QUIC the client opens one bidirectional stream and every
//! frame is a 4-byte big-endian length followed by that many bytes of MessagePack.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use chorus_protocol::{
    decode_frame, encode_request, encode_response_error, encode_response_ok, AuthRequest,
    AuthResponse, Encoding, ErrorBody, Frame, FrameLimits, ProtocolError, RequestKind,
    ResumeRequest, ALPN, LENGTH_PREFIX_BYTES, PROTOCOL_VERSION,
};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{ClientConfig, ClientError};

/// Largest message the client accepts from the server, in bytes (1 MiB: the transport
/// cap the server enforces too). Frames up to this size are decoded; a QUIC length
/// prefix above it ends the connection, since the stream cannot be trusted after it.
pub const TRANSPORT_MESSAGE_BYTES_MAX: usize = 1 << 20;

/// Frames held back by [`Connection::request`] while it waits for its response (pings,
/// notifications, other responses), returned later by [`Connection::recv`]. A server that
/// sends more than this before answering is misbehaving; the request then fails.
pub const BACKLOG_FRAMES_MAX: usize = 4096;

/// WebSocket read buffer per connection. tungstenite's default (128 KiB, allocated
/// eagerly) would cost 1.3 GB for 10,000 load-generator connections; frames are small.
const WS_READ_BUFFER_BYTES: usize = 8 * 1024;

/// Largest chunk taken from the QUIC stream per read.
const QUIC_READ_CHUNK_BYTES: usize = 64 * 1024;

/// How long [`Connection::close`] waits for the peer's side of the close handshake.
const CLOSE_HANDSHAKE_MS: u64 = 1000;

/// How long a QUIC connection whose stream the server finished waits for the server's
/// connection close (which carries the close code).
const STREAM_END_CLOSE_WAIT_MS: u64 = 2000;

/// Default QUIC port when a `quic://` URL names none.
pub const QUIC_PORT_DEFAULT: u16 = 7071;

/// Which transport a URL selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// WebSocket over TCP (`ws://`).
    WebSocket,
    /// QUIC (`quic://`).
    Quic,
}

/// A parsed server URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerUrl {
    /// `ws://HOST:PORT/PATH` or `wss://…`, kept as given (tungstenite parses it again).
    WebSocket {
        /// The URL.
        url: String,
        /// `wss://`: TLS, trusting the CA file and the system's roots.
        tls: bool,
    },
    /// `quic://HOST:PORT`.
    Quic {
        /// Host name or IP address.
        host: String,
        /// UDP port.
        port: u16,
        /// The TLS server name to verify: the host if it is a DNS name, else `localhost`
        /// (node certificates carry `localhost` and their IP addresses).
        server_name: String,
    },
}

impl ServerUrl {
    /// Parses `ws://…`, `wss://…` or `quic://HOST[:PORT]`.
    pub fn parse(url: &str) -> Result<Self, ClientError> {
        let invalid = |reason: &str| ClientError::InvalidUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        for (scheme, tls) in [("ws://", false), ("wss://", true)] {
            if let Some(rest) = url.strip_prefix(scheme) {
                if rest.is_empty() {
                    return Err(invalid("no host"));
                }
                url.into_client_request()
                    .map_err(|e| invalid(&e.to_string()))?;
                return Ok(ServerUrl::WebSocket {
                    url: url.to_string(),
                    tls,
                });
            }
        }
        let Some(rest) = url.strip_prefix("quic://") else {
            return Err(invalid(
                "expected ws://HOST:PORT/ws, wss://HOST:PORT/ws or quic://HOST:PORT",
            ));
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = split_host_port(authority).ok_or_else(|| invalid("bad host:port"))?;
        if host.is_empty() {
            return Err(invalid("no host"));
        }
        let server_name = match host.parse::<IpAddr>() {
            Ok(_) => "localhost".to_string(),
            Err(_) => host.clone(),
        };
        Ok(ServerUrl::Quic {
            host,
            port: port.unwrap_or(QUIC_PORT_DEFAULT),
            server_name,
        })
    }

    /// The transport this URL selects.
    pub fn transport(&self) -> TransportKind {
        match self {
            ServerUrl::WebSocket { .. } => TransportKind::WebSocket,
            ServerUrl::Quic { .. } => TransportKind::Quic,
        }
    }
}

/// Splits `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(authority: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host.to_string(), Some(port.parse().ok()?))),
        None => Some((authority.to_string(), None)),
    }
}

/// Bytes of voice datagrams a QUIC connection buffers each way before dropping the oldest
/// (about a second of four speakers' frames).
pub const VOICE_DATAGRAM_BUFFER_BYTES: usize = 64 * 1024;

/// A raw message for [`Connection::send_raw`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawMessage {
    /// A WebSocket text message (on QUIC: its bytes, written to the stream as is).
    Text(String),
    /// A WebSocket binary message (on QUIC: written to the stream as is, no length prefix).
    Binary(Bytes),
}

/// Opens connections with one configuration; holds the parsed QUIC/TLS settings so that
/// reconnects do not reread the CA file.
#[derive(Clone)]
pub struct Connector {
    encoding: Encoding,
    connect_timeout: Duration,
    quic: Option<quinn::ClientConfig>,
    /// TLS for `wss://` URLs.
    ws_tls: Option<Arc<rustls::ClientConfig>>,
    quic_endpoint: Option<quinn::Endpoint>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("encoding", &self.encoding)
            .field("connect_timeout", &self.connect_timeout)
            .field("quic", &self.quic.is_some())
            .field("wss", &self.ws_tls.is_some())
            .finish()
    }
}

impl Connector {
    /// Validates every URL of `config` and, if one of them is QUIC, loads the CA file.
    pub fn new(config: &ClientConfig) -> Result<Self, ClientError> {
        if config.urls.is_empty() {
            return Err(ClientError::Config("no server URL given".into()));
        }
        let mut needs_quic = false;
        let mut needs_tls_ws = false;
        for url in &config.urls {
            match ServerUrl::parse(url)? {
                ServerUrl::Quic { .. } => needs_quic = true,
                ServerUrl::WebSocket { tls, .. } => needs_tls_ws |= tls,
            }
        }
        let ws_tls = if needs_tls_ws {
            Some(wss_client_config(config.ca_path.as_deref())?)
        } else {
            None
        };
        let quic = if needs_quic {
            let ca_path = config.ca_path.as_deref().ok_or_else(|| {
                ClientError::Config("a quic:// URL needs a CA file to trust (--ca)".into())
            })?;
            Some(quic_client_config(ca_path, config.quic_idle_timeout_ms)?)
        } else {
            None
        };
        Ok(Connector {
            encoding: config.encoding,
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            quic,
            ws_tls,
            quic_endpoint: config.quic_endpoint.clone(),
        })
    }

    /// Opens a transport connection to `url` (no `auth` is sent), within the connect
    /// timeout.
    pub async fn connect(&self, url: &str) -> Result<Connection, ClientError> {
        let parsed = ServerUrl::parse(url)?;
        let timeout_ms = self.connect_timeout.as_millis() as u64;
        match tokio::time::timeout(self.connect_timeout, self.connect_parsed(url, parsed)).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout {
                what: format!("connect to {url}"),
                timeout_ms,
            }),
        }
    }

    async fn connect_parsed(
        &self,
        url: &str,
        parsed: ServerUrl,
    ) -> Result<Connection, ClientError> {
        let connect_error = |reason: String| ClientError::Connect {
            url: url.to_string(),
            reason,
        };
        let transport = match parsed {
            ServerUrl::WebSocket { url: ws_url, tls } => {
                let config = WebSocketConfig::default()
                    .read_buffer_size(WS_READ_BUFFER_BYTES)
                    // Write each frame at once: latency matters more than syscalls here.
                    .write_buffer_size(0)
                    .max_message_size(Some(TRANSPORT_MESSAGE_BYTES_MAX))
                    .max_frame_size(Some(TRANSPORT_MESSAGE_BYTES_MAX));
                let connector = match (tls, &self.ws_tls) {
                    (true, Some(tls)) => Some(tokio_tungstenite::Connector::Rustls(tls.clone())),
                    (true, None) => {
                        return Err(ClientError::Config(
                            "no TLS configuration for wss://".into(),
                        ))
                    }
                    (false, _) => Some(tokio_tungstenite::Connector::Plain),
                };
                let (stream, _response) = tokio_tungstenite::connect_async_tls_with_config(
                    ws_url,
                    Some(config),
                    true,
                    connector,
                )
                .await
                .map_err(|e| ws_connect_error(url, tls, e))?;
                Transport::WebSocket(Box::new(stream))
            }
            ServerUrl::Quic {
                host,
                port,
                server_name,
            } => {
                let config = self
                    .quic
                    .clone()
                    .ok_or_else(|| ClientError::Config("no QUIC configuration (CA file)".into()))?;
                let addr = tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .map_err(|e| connect_error(format!("cannot resolve {host}: {e}")))?
                    .next()
                    .ok_or_else(|| connect_error(format!("{host} resolves to no address")))?;
                let (endpoint, owned) = match &self.quic_endpoint {
                    Some(endpoint) => (endpoint.clone(), false),
                    None => (
                        client_endpoint(addr).map_err(|e| connect_error(e.to_string()))?,
                        true,
                    ),
                };
                let connecting = endpoint
                    .connect_with(config, addr, &server_name)
                    .map_err(|e| connect_error(e.to_string()))?;
                let connection = connecting.await.map_err(|e| match &e {
                    quinn::ConnectionError::TransportError(t) if is_crypto_error(t.code) => {
                        ClientError::Tls(format!("{url}: {e}"))
                    }
                    quinn::ConnectionError::ConnectionClosed(c)
                        if is_crypto_error(c.error_code) =>
                    {
                        ClientError::Tls(format!("{url}: {e}"))
                    }
                    _ => connect_error(e.to_string()),
                })?;
                let (send, recv) = connection
                    .open_bi()
                    .await
                    .map_err(|e| connect_error(e.to_string()))?;
                Transport::Quic(Box::new(QuicStream {
                    connection,
                    send,
                    recv,
                    buffer: BytesMut::new(),
                    owned_endpoint: owned.then_some(endpoint),
                }))
            }
        };
        let encoding = match transport {
            Transport::WebSocket(_) => self.encoding,
            // JSON is not used on QUIC.
            Transport::Quic(_) => Encoding::MsgPack,
        };
        Ok(Connection {
            transport,
            encoding,
            limits: FrameLimits {
                frame_bytes_max: TRANSPORT_MESSAGE_BYTES_MAX,
                ..FrameLimits::default()
            },
            backlog: VecDeque::new(),
            closed: None,
        })
    }
}

fn is_crypto_error(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

/// A client endpoint bound to an ephemeral port of the same address family as `remote`.
pub fn client_endpoint(remote: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let bind: SocketAddr = if remote.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        udp_socket(bind)?,
        Arc::new(quinn::TokioRuntime),
    )
}

/// Socket buffer asked for on QUIC sockets, each way (the kernel caps it at
/// `net.core.rmem_max` / `wmem_max`).
pub const UDP_SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// A UDP socket for a QUIC endpoint, bound to `bind`, with large kernel buffers: one
/// socket carries every connection of its endpoint, and a fan-out of voice datagrams
/// arrives in bursts that overflow the default buffer (about 200 KiB).
pub fn udp_socket(bind: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(bind)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    // Best effort: a smaller buffer still works.
    if let Err(error) = state.set_recv_buffer_size((&socket).into(), UDP_SOCKET_BUFFER_BYTES) {
        tracing::debug!(%error, "cannot enlarge the UDP receive buffer");
    }
    if let Err(error) = state.set_send_buffer_size((&socket).into(), UDP_SOCKET_BUFFER_BYTES) {
        tracing::debug!(%error, "cannot enlarge the UDP send buffer");
    }
    Ok(socket)
}

/// The system's CA bundle: `SSL_CERT_FILE`, else Debian's and Red Hat's usual paths.
const SYSTEM_CA_FILES: [&str; 2] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

/// Adds every certificate of the PEM file `ca_path` to `roots`; errors if it has none.
fn add_ca_file(roots: &mut rustls::RootCertStore, ca_path: &Path) -> Result<(), ClientError> {
    let pem = std::fs::read(ca_path)
        .map_err(|e| ClientError::Tls(format!("cannot read CA file {}: {e}", ca_path.display())))?;
    let mut found = 0usize;
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert =
            cert.map_err(|e| ClientError::Tls(format!("bad PEM in {}: {e}", ca_path.display())))?;
        roots.add(cert).map_err(|e| {
            ClientError::Tls(format!("bad CA certificate in {}: {e}", ca_path.display()))
        })?;
        found += 1;
    }
    if found == 0 {
        return Err(ClientError::Tls(format!(
            "no certificate in CA file {}",
            ca_path.display()
        )));
    }
    Ok(())
}

/// The TLS configuration for `wss://`: TLS 1.2 or 1.3 with the ring provider, trusting the
/// CA file `ca_path` when it exists (a private CA, or the test's) and the system's roots
/// (a public certificate), ALPN `http/1.1`.
pub fn wss_client_config(ca_path: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca_path.filter(|p| p.exists()) {
        add_ca_file(&mut roots, path)?;
    }
    let system = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain(SYSTEM_CA_FILES.iter().map(PathBuf::from))
        .find(|p| p.exists());
    if let Some(bundle) = system {
        if let Ok(pem) = std::fs::read(&bundle) {
            // A bundle may hold certificates this TLS library refuses: skip those.
            let mut reader = pem.as_slice();
            let certs = rustls_pemfile::certs(&mut reader).filter_map(Result::ok);
            roots.add_parsable_certificates(certs);
        }
    }
    if roots.is_empty() {
        return Err(ClientError::Tls(
            "no CA to trust for wss://: give --ca FILE (no system CA bundle either)".into(),
        ));
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ClientError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// A failed WebSocket connect, with the likely cause for TLS mix-ups.
fn ws_connect_error(
    url: &str,
    tls: bool,
    error: tokio_tungstenite::tungstenite::Error,
) -> ClientError {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let text = error.to_string();
    match (&error, tls) {
        (WsError::Tls(_), _) | (WsError::Io(_), true)
            if text.contains("certificate") || text.contains("UnknownIssuer") =>
        {
            ClientError::Tls(format!(
                "{url}: {text}: the server's certificate is not one this client trusts \
                 (give its CA with --ca FILE, or use a certificate from a public CA)"
            ))
        }
        (WsError::Io(_), true)
            if text.contains("InvalidContentType") || text.contains("corrupt message") =>
        {
            ClientError::Tls(format!(
                "{url}: {text}: the server does not speak TLS on this port (try ws://)"
            ))
        }
        (WsError::Protocol(_) | WsError::Io(_) | WsError::Http(_), false)
            if text.contains("reset")
                || text.contains("Handshake not finished")
                || text.contains("HttpFormat")
                || text.contains("httparse") =>
        {
            ClientError::Connect {
                url: url.to_string(),
                reason: format!("{text} (does the server expect TLS? try wss://)"),
            }
        }
        _ => ClientError::Connect {
            url: url.to_string(),
            reason: text,
        },
    }
}

/// Builds the QUIC client configuration: TLS 1.3 with the ring provider, trusting only the
/// CA certificates in `ca_path`, ALPN `chorus/1`, keep-alive well inside the idle timeout.
pub fn quic_client_config(
    ca_path: &Path,
    idle_timeout_ms: u64,
) -> Result<quinn::ClientConfig, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    add_ca_file(&mut roots, ca_path)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| ClientError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    let idle = Duration::from_millis(idle_timeout_ms.max(1000));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(idle).map_err(|e| ClientError::Config(e.to_string()))?,
    ));
    // Four keep-alives per idle period: a lost packet or two does not kill the connection.
    transport.keep_alive_interval(Some(idle / 4));
    // Voice: bounded buffers that drop the oldest datagrams, so audio stays current.
    transport.datagram_receive_buffer_size(Some(VOICE_DATAGRAM_BUFFER_BYTES));
    transport.datagram_send_buffer_size(VOICE_DATAGRAM_BUFFER_BYTES);
    config.transport_config(Arc::new(transport));
    Ok(config)
}

enum Transport {
    WebSocket(Box<WebSocketStream<MaybeTlsStream<TcpStream>>>),
    Quic(Box<QuicStream>),
}

struct QuicStream {
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// Bytes read from the stream and not yet returned as frames.
    buffer: BytesMut,
    /// The endpoint, when this connection has its own (so close can wait for it to drain).
    owned_endpoint: Option<quinn::Endpoint>,
}

/// Splits one complete length-prefixed frame off the front of `buffer`, if there is one.
/// A length above [`TRANSPORT_MESSAGE_BYTES_MAX`] is an error.
fn split_length_prefixed(buffer: &mut BytesMut) -> Result<Option<Bytes>, ProtocolError> {
    let Some(prefix) = buffer.get(..LENGTH_PREFIX_BYTES) else {
        return Ok(None);
    };
    let mut len_bytes = [0u8; LENGTH_PREFIX_BYTES];
    len_bytes.copy_from_slice(prefix);
    let len = u32::from_be_bytes(len_bytes) as usize;
    if len > TRANSPORT_MESSAGE_BYTES_MAX {
        return Err(ProtocolError::FrameTooLarge {
            size_bytes: len,
            limit_bytes: TRANSPORT_MESSAGE_BYTES_MAX,
        });
    }
    if buffer.len() < LENGTH_PREFIX_BYTES + len {
        buffer.reserve(LENGTH_PREFIX_BYTES + len - buffer.len());
        return Ok(None);
    }
    buffer.advance(LENGTH_PREFIX_BYTES);
    Ok(Some(buffer.split_to(len).freeze()))
}

/// What one read from the wire produced.
enum Wire {
    Frame(Result<Frame, ProtocolError>),
    Audio(Bytes),
    Closed(Option<u16>, String),
}

/// What [`Connection::recv_any`] received.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    /// A protocol frame.
    Frame(Frame),
    /// A voice frame (a QUIC datagram or a binary WebSocket message starting with `0xc1`),
    /// still encoded: see [`chorus_protocol::audio::decode_frame`].
    Audio(Bytes),
}

/// One open transport connection. See the module documentation.
pub struct Connection {
    transport: Transport,
    encoding: Encoding,
    limits: FrameLimits,
    backlog: VecDeque<Frame>,
    closed: Option<(Option<u16>, String)>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("transport", &self.transport_kind())
            .field("encoding", &self.encoding)
            .field("closed", &self.closed)
            .finish()
    }
}

impl Connection {
    /// Opens a connection to one URL with the settings of `config` (encoding, CA file,
    /// timeouts); `config.urls` is ignored. No `auth` is sent.
    pub async fn connect(url: &str, config: &ClientConfig) -> Result<Self, ClientError> {
        let mut config = config.clone();
        config.urls = vec![url.to_string()];
        Connector::new(&config)?.connect(url).await
    }

    /// The encoding frames are sent in (always MessagePack on QUIC).
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// The transport in use.
    pub fn transport_kind(&self) -> TransportKind {
        match self.transport {
            Transport::WebSocket(_) => TransportKind::WebSocket,
            Transport::Quic(_) => TransportKind::Quic,
        }
    }

    /// The close code and reason, once the connection has ended.
    pub fn close_status(&self) -> Option<(Option<u16>, &str)> {
        self.closed.as_ref().map(|(c, r)| (*c, r.as_str()))
    }

    /// Sends one already encoded frame: as a binary (MessagePack) or text (JSON) WebSocket
    /// message according to [`Connection::encoding`], or length-prefixed on QUIC. The
    /// bytes are not checked: tests send malformed and oversized frames this way.
    pub async fn send_frame(&mut self, frame: &[u8]) -> Result<(), ClientError> {
        let message = match (&self.transport, self.encoding) {
            (Transport::Quic(_), _) => {
                let len = u32::try_from(frame.len()).map_err(|_| ProtocolError::FrameTooLarge {
                    size_bytes: frame.len(),
                    limit_bytes: u32::MAX as usize,
                })?;
                let mut out = Vec::with_capacity(LENGTH_PREFIX_BYTES + frame.len());
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(frame);
                RawMessage::Binary(out.into())
            }
            (Transport::WebSocket(_), Encoding::MsgPack) => {
                RawMessage::Binary(Bytes::copy_from_slice(frame))
            }
            (Transport::WebSocket(_), Encoding::Json) => RawMessage::Text(
                String::from_utf8(frame.to_vec())
                    .map_err(|e| ProtocolError::Encode(format!("JSON frame is not UTF-8: {e}")))?,
            ),
        };
        self.send_raw(message).await
    }

    /// Sends exactly this message: on WebSocket a text or binary message as given; on
    /// QUIC the bytes go onto the stream as they are, without a length prefix (so a test
    /// can write a lying prefix or half a frame).
    pub async fn send_raw(&mut self, message: RawMessage) -> Result<(), ClientError> {
        if let Some((code, reason)) = &self.closed {
            return Err(ClientError::Closed {
                code: *code,
                reason: reason.clone(),
            });
        }
        let result = match &mut self.transport {
            Transport::WebSocket(ws) => {
                let message = match message {
                    RawMessage::Text(text) => Message::text(text),
                    RawMessage::Binary(bytes) => Message::Binary(bytes),
                };
                ws.send(message).await.map_err(|e| e.to_string())
            }
            Transport::Quic(q) => {
                let bytes = match message {
                    RawMessage::Text(text) => Bytes::from(text.into_bytes()),
                    RawMessage::Binary(bytes) => bytes,
                };
                q.send.write_all(&bytes).await.map_err(|e| e.to_string())
            }
        };
        result.map_err(|reason| {
            self.closed = Some((None, reason.clone()));
            ClientError::Closed { code: None, reason }
        })
    }

    /// Encodes and sends a typed request with sequence number `seq`.
    pub async fn send_request<R: RequestKind>(
        &mut self,
        seq: u64,
        body: &R,
    ) -> Result<(), ClientError> {
        self.send_request_kind(seq, R::KIND, body).await
    }

    /// Encodes and sends a request of any kind (also unknown ones) with any body.
    pub async fn send_request_kind<B: Serialize + ?Sized>(
        &mut self,
        seq: u64,
        kind: &str,
        body: &B,
    ) -> Result<(), ClientError> {
        let frame = encode_request(self.encoding, seq, kind, body)?;
        self.send_frame(&frame).await
    }

    /// Answers a server request (e.g. `ping`) with an ok body.
    pub async fn send_response_ok<B: Serialize + ?Sized>(
        &mut self,
        seq: u64,
        ok: &B,
    ) -> Result<(), ClientError> {
        let frame = encode_response_ok(self.encoding, seq, ok)?;
        self.send_frame(&frame).await
    }

    /// Answers a server request with an error.
    pub async fn send_response_error(
        &mut self,
        seq: u64,
        error: &ErrorBody,
    ) -> Result<(), ClientError> {
        let frame = encode_response_error(self.encoding, seq, error)?;
        self.send_frame(&frame).await
    }

    /// Receives the next frame: first any held back by [`Connection::request`], then from
    /// the wire. A frame that cannot be decoded gives [`ClientError::Protocol`] and the
    /// connection stays usable (except for an oversized QUIC length prefix, which ends it).
    /// The end of the connection gives [`ClientError::Closed`] with the server's close code
    /// and reason, and so does every call after it.
    ///
    /// Cancel safe: if the future is dropped before it completes, no frame is lost.
    pub async fn recv(&mut self) -> Result<Frame, ClientError> {
        loop {
            if let Received::Frame(frame) = self.recv_any().await? {
                return Ok(frame);
            }
        }
    }

    /// As [`Connection::recv`], but voice frames are returned too, in arrival order.
    ///
    /// Cancel safe.
    pub async fn recv_any(&mut self) -> Result<Received, ClientError> {
        if let Some(frame) = self.backlog.pop_front() {
            return Ok(Received::Frame(frame));
        }
        if let Some((code, reason)) = &self.closed {
            return Err(ClientError::Closed {
                code: *code,
                reason: reason.clone(),
            });
        }
        match self.recv_wire().await {
            Wire::Frame(result) => result.map(Received::Frame).map_err(ClientError::Protocol),
            Wire::Audio(bytes) => Ok(Received::Audio(bytes)),
            Wire::Closed(code, reason) => {
                self.closed = Some((code, reason.clone()));
                Err(ClientError::Closed { code, reason })
            }
        }
    }

    /// Sends one voice frame (encoded with [`chorus_protocol::audio::encode_uplink`]): a
    /// QUIC datagram, or a binary WebSocket message. Unreliable on QUIC: a datagram the
    /// path cannot carry now is dropped and reported as an error, the connection stays.
    pub async fn send_audio(&mut self, frame: Bytes) -> Result<(), ClientError> {
        if let Transport::Quic(q) = &self.transport {
            if self.closed.is_none() {
                return q.connection.send_datagram(frame).map_err(|e| {
                    ClientError::Protocol(ProtocolError::BadAudio(format!(
                        "datagram not sent: {e}"
                    )))
                });
            }
        }
        self.send_raw(RawMessage::Binary(frame)).await
    }

    async fn recv_wire(&mut self) -> Wire {
        let limits = self.limits;
        match &mut self.transport {
            Transport::WebSocket(ws) => loop {
                match ws.next().await {
                    None => {
                        return Wire::Closed(None, "connection ended without a close frame".into())
                    }
                    Some(Err(e)) => return Wire::Closed(None, e.to_string()),
                    Some(Ok(Message::Binary(bytes)))
                        if chorus_protocol::audio::is_audio(&bytes) =>
                    {
                        return Wire::Audio(bytes)
                    }
                    Some(Ok(Message::Binary(bytes))) => {
                        return Wire::Frame(decode_frame(Encoding::MsgPack, &bytes, &limits))
                    }
                    Some(Ok(Message::Text(text))) => {
                        return Wire::Frame(decode_frame(Encoding::Json, text.as_bytes(), &limits))
                    }
                    Some(Ok(Message::Close(frame))) => {
                        return match frame {
                            Some(f) => Wire::Closed(Some(u16::from(f.code)), f.reason.to_string()),
                            None => Wire::Closed(None, "closed without a code".into()),
                        }
                    }
                    // Control frames: tungstenite answers pings itself.
                    Some(Ok(_)) => continue,
                }
            },
            Transport::Quic(q) => loop {
                match split_length_prefixed(&mut q.buffer) {
                    Ok(Some(bytes)) => {
                        return Wire::Frame(decode_frame(Encoding::MsgPack, &bytes, &limits))
                    }
                    Ok(None) => {}
                    Err(e) => {
                        // The stream cannot be resynchronized after a bogus length.
                        let reason = e.to_string();
                        q.connection.close(
                            quinn::VarInt::from_u32(u32::from(
                                chorus_protocol::ErrorCode::FrameTooLarge.close_code(),
                            )),
                            reason.as_bytes(),
                        );
                        return Wire::Closed(None, reason);
                    }
                }
                // Voice comes as datagrams beside the stream; both reads are cancel safe.
                let chunk = tokio::select! {
                    chunk = q.recv.read_chunk(QUIC_READ_CHUNK_BYTES, true) => chunk,
                    datagram = q.connection.read_datagram() => match datagram {
                        Ok(datagram) => return Wire::Audio(datagram),
                        Err(_) => q.recv.read_chunk(QUIC_READ_CHUNK_BYTES, true).await,
                    },
                };
                match chunk {
                    Ok(Some(chunk)) => q.buffer.extend_from_slice(&chunk.bytes),
                    Ok(None) => {
                        // A server finishes the stream before closing the connection (so
                        // its last frames flush): wait briefly for the close and its code.
                        let wait = Duration::from_millis(STREAM_END_CLOSE_WAIT_MS);
                        return match tokio::time::timeout(wait, q.connection.closed()).await {
                            Ok(error) => {
                                let (code, reason) = connection_error_status(&error);
                                Wire::Closed(code, reason)
                            }
                            Err(_) => Wire::Closed(None, "server finished the stream".into()),
                        };
                    }
                    Err(quinn::ReadError::ConnectionLost(e)) => {
                        let (code, reason) = connection_error_status(&e);
                        return Wire::Closed(code, reason);
                    }
                    Err(e) => return Wire::Closed(None, e.to_string()),
                }
            },
        }
    }

    /// Sends a request and waits for its response (matched by `seq`). Frames that arrive
    /// meanwhile (pings, notifications, other responses) are held back, in order, for
    /// [`Connection::recv`]; nothing is answered automatically. An error response gives
    /// [`ClientError::Server`].
    pub async fn request<R: RequestKind>(
        &mut self,
        seq: u64,
        body: &R,
    ) -> Result<R::Response, ClientError> {
        self.send_request(seq, body).await?;
        let ok = self
            .await_response(seq)
            .await?
            .map_err(ClientError::Server)?;
        ok.decode::<R::Response>(R::KIND)
            .map_err(ClientError::Protocol)
    }

    /// Sends `auth` (optionally resuming a session) and waits for the response. A refusal
    /// gives [`ClientError::Auth`].
    pub async fn authenticate(
        &mut self,
        seq: u64,
        token: &str,
        resume: Option<ResumeRequest>,
    ) -> Result<AuthResponse, ClientError> {
        let body = AuthRequest {
            token: token.to_string(),
            protocol_version: Some(PROTOCOL_VERSION),
            resume,
        };
        self.send_request(seq, &body).await?;
        let ok = self.await_response(seq).await?.map_err(ClientError::Auth)?;
        ok.decode::<AuthResponse>(AuthRequest::KIND)
            .map_err(ClientError::Protocol)
    }

    async fn await_response(
        &mut self,
        seq: u64,
    ) -> Result<Result<chorus_protocol::Body, ErrorBody>, ClientError> {
        // Only frames from the wire can answer; the backlog holds older ones.
        loop {
            let frame = match self.recv_wire().await {
                Wire::Frame(result) => result?,
                // Voice arriving while a request waits is late by the time it is read.
                Wire::Audio(_) => continue,
                Wire::Closed(code, reason) => {
                    self.closed = Some((code, reason.clone()));
                    return Err(ClientError::Closed { code, reason });
                }
            };
            match frame {
                Frame::Response(response) if response.seq == seq => return Ok(response.result),
                other => {
                    if self.backlog.len() >= BACKLOG_FRAMES_MAX {
                        return Err(ClientError::Protocol(ProtocolError::Malformed(format!(
                            "more than {BACKLOG_FRAMES_MAX} frames before the response to request {seq}"
                        ))));
                    }
                    self.backlog.push_back(other);
                }
            }
        }
    }

    /// Closes the connection with a close code (1000 = normal) and reason, waiting a
    /// bounded time for the close handshake. Errors are ignored: the connection is gone
    /// either way.
    pub async fn close(&mut self, code: u16, reason: &str) {
        if self.closed.is_some() {
            return;
        }
        self.closed = Some((Some(code), reason.to_string()));
        let handshake = Duration::from_millis(CLOSE_HANDSHAKE_MS);
        match &mut self.transport {
            Transport::WebSocket(ws) => {
                let frame = CloseFrame {
                    code: CloseCode::from(code),
                    reason: reason.to_string().into(),
                };
                let _ = tokio::time::timeout(handshake, async {
                    if WebSocketStream::close(ws.as_mut(), Some(frame))
                        .await
                        .is_ok()
                    {
                        // Read until the server's close frame (or the end).
                        while let Some(Ok(_)) = ws.next().await {}
                    }
                })
                .await;
            }
            Transport::Quic(q) => {
                let _ = q.send.finish();
                q.connection
                    .close(quinn::VarInt::from_u32(u32::from(code)), reason.as_bytes());
                if let Some(endpoint) = &q.owned_endpoint {
                    // Let the CONNECTION_CLOSE go out before the endpoint is dropped.
                    let _ = tokio::time::timeout(handshake, endpoint.wait_idle()).await;
                }
            }
        }
    }
}

/// The close code and reason of a lost QUIC connection.
fn connection_error_status(error: &quinn::ConnectionError) -> (Option<u16>, String) {
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => (
            u16::try_from(close.error_code.into_inner()).ok(),
            String::from_utf8_lossy(&close.reason).into_owned(),
        ),
        other => (None, other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_urls_are_kept_as_given() {
        let url = ServerUrl::parse("ws://127.0.0.1:7070/ws").expect("valid");
        assert_eq!(
            url,
            ServerUrl::WebSocket {
                url: "ws://127.0.0.1:7070/ws".into(),
                tls: false,
            }
        );
        assert_eq!(url.transport(), TransportKind::WebSocket);
        let url = ServerUrl::parse("wss://chorus.example:443/ws").expect("valid");
        assert_eq!(
            url,
            ServerUrl::WebSocket {
                url: "wss://chorus.example:443/ws".into(),
                tls: true,
            }
        );
    }

    #[test]
    fn quic_urls_verify_localhost_for_ip_hosts_and_the_name_otherwise() {
        assert_eq!(
            ServerUrl::parse("quic://127.0.0.1:7071").expect("valid"),
            ServerUrl::Quic {
                host: "127.0.0.1".into(),
                port: 7071,
                server_name: "localhost".into()
            }
        );
        assert_eq!(
            ServerUrl::parse("quic://node-2.chorus.svc:9000/").expect("valid"),
            ServerUrl::Quic {
                host: "node-2.chorus.svc".into(),
                port: 9000,
                server_name: "node-2.chorus.svc".into()
            }
        );
        assert_eq!(
            ServerUrl::parse("quic://[::1]:7171").expect("valid"),
            ServerUrl::Quic {
                host: "::1".into(),
                port: 7171,
                server_name: "localhost".into()
            }
        );
        assert_eq!(
            ServerUrl::parse("quic://localhost").expect("valid"),
            ServerUrl::Quic {
                host: "localhost".into(),
                port: QUIC_PORT_DEFAULT,
                server_name: "localhost".into()
            }
        );
    }

    #[test]
    fn bad_urls_are_refused_with_a_reason() {
        for url in [
            "",
            "http://x/ws",
            "ws://",
            "wss://",
            "quic://",
            "quic://host:notaport",
            "quic://[::1",
            "quic://h:99999",
        ] {
            let err = ServerUrl::parse(url).expect_err(url);
            assert!(
                matches!(err, ClientError::InvalidUrl { .. }),
                "{url}: {err}"
            );
        }
    }

    #[test]
    fn quic_length_prefixed_frames_are_split_incrementally() {
        let mut buffer = BytesMut::new();
        buffer.extend_from_slice(&3u32.to_be_bytes());
        buffer.extend_from_slice(b"ab");
        let (frames, rest) = split_all(buffer.clone());
        assert!(frames.is_empty());
        assert_eq!(rest, 6);
        buffer.extend_from_slice(b"c");
        buffer.extend_from_slice(&0u32.to_be_bytes());
        let (frames, rest) = split_all(buffer);
        assert_eq!(frames, vec![Bytes::from_static(b"abc"), Bytes::new()]);
        assert_eq!(rest, 0);
    }

    #[test]
    fn quic_length_prefix_above_the_cap_is_refused() {
        let mut buffer = BytesMut::new();
        buffer.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(split_length_prefixed(&mut buffer).is_err());
    }

    fn split_all(mut buffer: BytesMut) -> (Vec<Bytes>, usize) {
        let mut frames = Vec::new();
        while let Some(f) = split_length_prefixed(&mut buffer).expect("valid") {
            frames.push(f);
        }
        (frames, buffer.len())
    }
}
