//! Node configuration: embedded defaults, an optional TOML file, then flags and env.
//!
//! `chorus serve` with no flags is a working single-node cluster: data in `./chorus-data`,
//! HTTP (WebSocket, metrics, health) on 127.0.0.1:7070, QUIC on 127.0.0.1:7071, and a
//! development secret (logged as a warning).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The token secret used when none is configured. Development only: anyone can mint
/// tokens with it.
pub const DEV_SECRET: &str = "chorus-dev-secret";

/// The admin token used when none is configured. Development only.
pub const DEV_ADMIN_TOKEN: &str = "chorus-dev-admin";
/// Shortest token secret or admin token accepted.
pub const SECRET_BYTES_MIN: usize = 16;

/// Everything a node needs to start.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Directory for sled, certificates and exports. Default `./chorus-data`.
    pub data_dir: PathBuf,
    /// Directory holding the cluster CA (`ca.pem`, `ca-key.pem`). Default: the data dir.
    pub ca_dir: Option<PathBuf>,
    /// HTTP listen address (`/ws`, `/ws/echo`, `/healthz`, `/readyz`, and `/metrics` and
    /// `/admin/*` unless `admin_addr` is set). Default 127.0.0.1:7070.
    pub http_addr: SocketAddr,
    /// A separate HTTP listener for `/metrics` and `/admin/*` (and `/healthz`, `/readyz`):
    /// when set, those two are served only there, so the public port carries only `/ws`
    /// and health. Its connections do not count against `connections_max`. Default: none.
    pub admin_addr: Option<SocketAddr>,
    /// QUIC listen address (ALPN `chorus/1`). Default 127.0.0.1:7071.
    pub quic_addr: SocketAddr,
    /// Inter-node QUIC address (Raft, routing, relay; mutual TLS from the cluster CA).
    /// Default 127.0.0.1:7072.
    pub cluster_addr: SocketAddr,
    /// The IP other nodes and clients reach this node at, recorded in the cluster metadata
    /// with the bound ports (e.g. the pod IP when binding `0.0.0.0`). Default: the bind
    /// addresses' own IPs; required when the cluster address binds an unspecified IP. A
    /// node restarted at another IP records its new addresses itself.
    pub advertise_ip: Option<std::net::IpAddr>,
    /// A member's cluster address to join on first start. Default: none (a new cluster).
    pub join: Option<SocketAddr>,
    /// Raft voters: 3 (default) or 5; further nodes are learners.
    pub voters_max: usize,
    /// How long a first join may take (ms) before the node exits with an error. Default
    /// 60000.
    pub join_timeout_ms: u64,
    /// Token for the HTTP admin API (`Authorization: Bearer …`). Default: the development
    /// admin token, with a warning. Also `CHORUS_ADMIN_TOKEN`.
    #[serde(skip_serializing)]
    pub admin_token: Option<String>,
    /// Token secret (HS256). Default: [`DEV_SECRET`], with a warning. Also `CHORUS_SECRET`.
    #[serde(skip_serializing)]
    pub secret: Option<String>,
    /// The node's name in logs, certificates and `auth` responses. Default `node-1`.
    pub node_name: String,
    /// Extra names (DNS or IP) for the node's certificate. localhost, 127.0.0.1 and the
    /// QUIC listen IP are always included.
    pub tls_names: Vec<String>,
    /// PEM certificate chain (leaf first) for clients on `http_addr`: with `tls_key`, the
    /// public listener speaks only TLS (`https://`, `wss://`). Read again on SIGHUP and
    /// when the file changes. Separate from the cluster CA (QUIC, inter-node). Default:
    /// none (plain `http://`, `ws://`; put TLS at a proxy or ingress instead).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `tls_cert`. Default: none.
    pub tls_key: Option<PathBuf>,
    /// How often the node checks `tls_cert` and `tls_key` for a change (size or
    /// modification time), ms; a changed pair is loaded for new connections (a pair that
    /// fails to load leaves the previous one in use). 100 to 3,600,000. Default 10,000.
    pub tls_reload_interval_ms: u64,
    /// Protocol limits.
    pub limits: LimitsConfig,
    /// Room limits (comment length and rate, reaction window, listener-count interval,
    /// bullet comments under `[room.bullets]`, …).
    pub room: chorus_actors::room::RoomConfig,
    /// Red-packet rains.
    pub rain: RainConfig,
    /// Voice messages (`[voicemail]`).
    pub voicemail: VoicemailConfig,
    /// Emit logs as JSON lines.
    pub log_json: bool,
    /// How long stopping may take, in ms: on SIGTERM the node drains (its rooms move to
    /// other members) and stops every part in order within this; when it passes (e.g. no
    /// Raft quorum to drain through) the node flushes storage and exits anyway, with
    /// status 3. Default 30,000; 1 to [`DRAIN_TIMEOUT_MS_MAX`].
    pub drain_timeout_ms: u64,
}

/// The longest drain deadline accepted (`drain_timeout_ms`): one hour.
pub const DRAIN_TIMEOUT_MS_MAX: u64 = 3_600_000;

/// Red-packet rain settings (`[rain]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RainConfig {
    /// Grabs per second one rain's pool serves (its token bucket; the rest are answered
    /// `throttled`), also what the throttle factor pushed at the start aims at. Default
    /// 20,000.
    pub grabs_per_sec: u32,
}

impl Default for RainConfig {
    fn default() -> Self {
        RainConfig {
            grabs_per_sec: 20_000,
        }
    }
}

/// Voice-message settings (`[voicemail]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct VoicemailConfig {
    /// Largest voice message, bytes of Ogg Opus. Default 262,144 (256 KiB).
    pub message_bytes_max: u64,
    /// Longest voice message, ms of audio. Default 60,000.
    pub message_duration_ms_max: u64,
    /// Largest chunk of a `vm.chunk`, bytes (before base64); at most 40,960 so that a chunk
    /// fits the frame bound. Default 32,768.
    pub chunk_bytes_max: usize,
    /// An upload with no chunk for this long fails, ms. Default 120,000.
    pub upload_idle_ms: u64,
    /// Uploads in progress this node owns at once (each holds its bytes in memory, at most
    /// `message_bytes_max`); past it `vm.send` and the first chunk get `5001`. Default 2,048.
    pub uploads_max: usize,
    /// How long voice messages are kept, ms, from when they were sent; then they are
    /// deleted from every node and every inbox. Default 2,592,000,000 (30 days).
    pub retention_ms: u64,
}

impl Default for VoicemailConfig {
    fn default() -> Self {
        VoicemailConfig {
            message_bytes_max: 256 * 1024,
            message_duration_ms_max: 60_000,
            chunk_bytes_max: 32 * 1024,
            upload_idle_ms: 120_000,
            uploads_max: 2_048,
            retention_ms: 30 * 24 * 3_600_000,
        }
    }
}

/// Protocol and resource limits. Every bound has a unit in its name.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Maximum frame size in bytes. Default 65,536. Larger frames get `frame_too_large`.
    pub frame_bytes_max: usize,
    /// Hard transport cap on one message in bytes. Default 1 MiB; above it the connection
    /// is closed (WebSocket 1009, QUIC 4001).
    pub transport_message_bytes_max: usize,
    /// Connections per node. Default 50,000; more are closed with `too_many_connections`.
    pub connections_max: usize,
    /// Outgoing frames queued per connection. Default 4,096; a connection that lets its
    /// queue fill is closed with `slow_consumer`.
    pub outgoing_queue_frames_max: usize,
    /// Bytes of a client's TCP connection the kernel may hold not yet sent
    /// (`TCP_NOTSENT_LOWAT`). Default 16,384. What a client does not read waits in the
    /// node's own queue instead, where it counts toward `outgoing_queue_frames_max` and
    /// toward the node taking no more comments than it delivers; bytes sent and not yet
    /// acknowledged are not limited, so a far client's throughput is not either.
    pub socket_unsent_bytes_max: u32,
    /// Sustained requests per second per connection. Default 20.
    pub requests_per_sec: u32,
    /// Request burst per connection. Default 40.
    pub requests_burst: u32,
    /// Rooms one session may be in. Default 16.
    pub rooms_per_session_max: usize,
    /// Server ping interval in ms. Default 30,000.
    pub ping_interval_ms: u64,
    /// Unanswered pings before closing. Default 2.
    pub pings_missed_max: u32,
    /// Time to authenticate after connecting, in ms. Default 10,000.
    pub auth_timeout_ms: u64,
    /// How long a disconnected session can be resumed, in ms. Default 60,000.
    pub resume_window_ms: u64,
    /// Notifications buffered per session for resume. Default 1,024.
    pub resume_buffer_frames_max: usize,
    /// Sessions (attached or resumable) per node. Default 100,000; beyond it new sessions
    /// are refused with `unavailable`.
    pub sessions_max: usize,
    /// Voice frames queued per connection for sending. Default 64; when full the oldest
    /// frame is dropped (a slow listener loses audio, it never slows the room). On a plain
    /// WebSocket, voice and frames wait in one queue: a voice frame is dropped while this
    /// many frames wait.
    pub audio_queue_frames_max: usize,
    /// Sustained voice frames a connection may send per second. Default 200 (four rooms'
    /// worth of 20 ms frames); frames beyond it are dropped.
    pub audio_frames_per_sec: u32,
    /// Voice frame burst per connection. Default 100.
    pub audio_frames_burst: u32,
    /// Bytes an unauthenticated connection may send toward one message. Default 8,192
    /// (an `auth` frame is a few hundred bytes); beyond it the connection is closed with
    /// `frame_too_large` (WebSocket 1009, QUIC 4001).
    pub preauth_message_bytes_max: usize,
    /// Bytes the node holds in partial inbound messages across all connections, beyond
    /// the first `preauth_message_bytes_max` of each. Default 64 MiB; the connection whose
    /// read would pass it is closed with `unavailable` (4401).
    pub inbound_partial_bytes_max: usize,
    /// Time a client has to send a whole HTTP request head (headers, upgrade), in ms.
    /// Default 10,000; then the connection is closed.
    pub http_header_timeout_ms: u64,
    /// Sessions (attached or resumable) one user may hold on a node. Default 16; at `auth`
    /// beyond it the user's oldest detached session is ended to make room, and if all are
    /// connected the new one is refused with `too_many_sessions` (3005).
    pub sessions_per_user_max: usize,
    /// Rooms one user may be in at once through the sessions on a node. Default 32;
    /// beyond it `room.join` gets `too_many_rooms` (3001).
    pub memberships_per_user_max: usize,
    /// Rooms one user may create per minute through a node (token bucket). Default 20,
    /// burst [`Self::room_creates_burst`]; beyond it `rate_limited` (3000).
    pub room_creates_per_min: u32,
    /// Room creation burst per user. Default 10.
    pub room_creates_burst: u32,
    /// Rooms created through a node that one user may hold open (not ended). Default 20;
    /// beyond it `room.create` gets `quota_exceeded` (3006).
    pub open_rooms_per_user_max: usize,
    /// Polls one user may create per minute through a node (token bucket, burst 5).
    /// Default 10; beyond it `rate_limited` (3000).
    pub poll_creates_per_min: u32,
    /// A room no one has been in for this long (ms) has its actor stopped on its owner;
    /// its state stays stored and the next request starts it again. Default 600,000
    /// (10 minutes).
    pub room_idle_release_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            frame_bytes_max: chorus_protocol::limits::FRAME_BYTES_MAX_DEFAULT,
            transport_message_bytes_max: 1024 * 1024,
            connections_max: 50_000,
            outgoing_queue_frames_max: 4096,
            socket_unsent_bytes_max: 16 * 1024,
            requests_per_sec: 20,
            requests_burst: 40,
            rooms_per_session_max: 16,
            ping_interval_ms: 30_000,
            pings_missed_max: 2,
            auth_timeout_ms: 10_000,
            resume_window_ms: 60_000,
            resume_buffer_frames_max: 1024,
            sessions_max: 100_000,
            audio_queue_frames_max: 64,
            audio_frames_per_sec: 200,
            audio_frames_burst: 100,
            preauth_message_bytes_max: 8 * 1024,
            inbound_partial_bytes_max: 64 * 1024 * 1024,
            http_header_timeout_ms: 10_000,
            sessions_per_user_max: 16,
            memberships_per_user_max: 32,
            room_creates_per_min: 20,
            room_creates_burst: 10,
            open_rooms_per_user_max: 20,
            poll_creates_per_min: 10,
            room_idle_release_ms: 600_000,
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            data_dir: PathBuf::from("chorus-data"),
            ca_dir: None,
            http_addr: SocketAddr::from(([127, 0, 0, 1], 7070)),
            admin_addr: None,
            quic_addr: SocketAddr::from(([127, 0, 0, 1], 7071)),
            cluster_addr: SocketAddr::from(([127, 0, 0, 1], 7072)),
            join: None,
            voters_max: 3,
            join_timeout_ms: 60_000,
            admin_token: None,
            secret: None,
            node_name: "node-1".to_string(),
            tls_names: Vec::new(),
            tls_cert: None,
            tls_key: None,
            tls_reload_interval_ms: 10_000,
            advertise_ip: None,
            limits: LimitsConfig::default(),
            room: chorus_actors::room::RoomConfig::default(),
            rain: RainConfig::default(),
            voicemail: VoicemailConfig::default(),
            log_json: false,
            drain_timeout_ms: 30_000,
        }
    }
}

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl NodeConfig {
    /// Reads a TOML config file (same field names as this struct; `[limits]` table).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    /// The effective secret and whether it is the development default.
    pub fn effective_secret(&self) -> (String, bool) {
        match &self.secret {
            Some(secret) => (secret.clone(), false),
            None => (DEV_SECRET.to_string(), true),
        }
    }

    /// The effective admin token and whether it is the development default.
    pub fn effective_admin_token(&self) -> (String, bool) {
        match &self.admin_token {
            Some(token) => (token.clone(), false),
            None => (DEV_ADMIN_TOKEN.to_string(), true),
        }
    }

    /// The CA directory (the data dir unless set).
    pub fn ca_dir(&self) -> PathBuf {
        self.ca_dir.clone().unwrap_or_else(|| self.data_dir.clone())
    }

    /// The address recorded for a bound address: [`Self::advertise_ip`] with the bound
    /// port, or the bound address itself.
    pub fn advertised(&self, bound: std::net::SocketAddr) -> std::net::SocketAddr {
        match self.advertise_ip {
            Some(ip) => std::net::SocketAddr::new(ip, bound.port()),
            None => bound,
        }
    }

    /// Secrets: a configured secret or admin token is at least [`SECRET_BYTES_MIN`] bytes;
    /// the development ones are allowed only while every address the node binds or
    /// advertises is a loopback address (nobody else can reach it).
    fn check_secrets(&self) -> Result<(), ConfigError> {
        for (name, value) in [("secret", &self.secret), ("admin token", &self.admin_token)] {
            match value {
                Some(v) if v.is_empty() => {
                    return Err(ConfigError::Invalid(format!(
                        "the {name} is empty: give one of at least {SECRET_BYTES_MIN} bytes"
                    )))
                }
                Some(v) if v.len() < SECRET_BYTES_MIN => {
                    return Err(ConfigError::Invalid(format!(
                        "the {name} is {} bytes: at least {SECRET_BYTES_MIN} are needed",
                        v.len()
                    )))
                }
                _ => {}
            }
        }
        let public = [self.http_addr, self.quic_addr, self.cluster_addr]
            .into_iter()
            .chain(self.admin_addr)
            .map(|a| a.ip())
            .chain(self.advertise_ip)
            .find(|ip| !ip.is_loopback());
        if let Some(ip) = public {
            let missing: Vec<&str> = [
                (
                    self.secret.is_none(),
                    "a token secret (CHORUS_SECRET or --secret-file)",
                ),
                (
                    self.admin_token.is_none(),
                    "an admin token (CHORUS_ADMIN_TOKEN or --admin-token-file)",
                ),
            ]
            .into_iter()
            .filter_map(|(missing, what)| missing.then_some(what))
            .collect();
            if !missing.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "refusing to serve on {ip} with the published development credentials: \
                     give {} (at least {SECRET_BYTES_MIN} bytes each); the development ones \
                     are only for loopback addresses",
                    missing.join(" and ")
                )));
            }
        }
        Ok(())
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let checks: [(bool, &str); 17] = [
            (l.frame_bytes_max >= 1024, "frame_bytes_max must be at least 1024"),
            (
                l.transport_message_bytes_max >= l.frame_bytes_max,
                "transport_message_bytes_max must be at least frame_bytes_max",
            ),
            (l.connections_max > 0, "connections_max must be positive"),
            (
                (512..=l.transport_message_bytes_max).contains(&l.preauth_message_bytes_max),
                "preauth_message_bytes_max must be between 512 and transport_message_bytes_max",
            ),
            (
                l.inbound_partial_bytes_max >= l.transport_message_bytes_max,
                "inbound_partial_bytes_max must be at least transport_message_bytes_max",
            ),
            (l.http_header_timeout_ms >= 100, "http_header_timeout_ms must be at least 100"),
            (l.sessions_per_user_max >= 1, "sessions_per_user_max must be at least 1"),
            (
                l.memberships_per_user_max >= l.rooms_per_session_max,
                "memberships_per_user_max must be at least rooms_per_session_max",
            ),
            (
                l.room_creates_per_min > 0 && l.room_creates_burst > 0 && l.open_rooms_per_user_max > 0,
                "room_creates_per_min, room_creates_burst and open_rooms_per_user_max must be positive",
            ),
            (l.poll_creates_per_min > 0, "poll_creates_per_min must be positive"),
            (l.room_idle_release_ms >= 100, "room_idle_release_ms must be at least 100"),
            (l.outgoing_queue_frames_max >= 16, "outgoing_queue_frames_max must be at least 16"),
            (l.socket_unsent_bytes_max >= 4096, "socket_unsent_bytes_max must be at least 4096"),
            (l.requests_per_sec > 0 && l.requests_burst > 0, "request rate and burst must be positive"),
            (l.ping_interval_ms >= 10, "ping_interval_ms must be at least 10"),
            (l.pings_missed_max >= 1, "pings_missed_max must be at least 1"),
            (
                l.resume_buffer_frames_max <= l.outgoing_queue_frames_max,
                "resume_buffer_frames_max must not exceed outgoing_queue_frames_max (a replay must fit the queue)",
            ),
        ];
        for (ok, message) in checks {
            if !ok {
                return Err(ConfigError::Invalid(message.to_string()));
            }
        }
        self.room.bullets.validate().map_err(ConfigError::Invalid)?;
        let v = &self.voicemail;
        let voice_checks: [(bool, &str); 5] = [
            (
                (1024..=16 * 1024 * 1024).contains(&v.message_bytes_max),
                "voicemail.message_bytes_max must be between 1024 and 16777216",
            ),
            (
                v.message_duration_ms_max >= 1000,
                "voicemail.message_duration_ms_max must be at least 1000",
            ),
            (
                (1024..=40 * 1024).contains(&v.chunk_bytes_max),
                "voicemail.chunk_bytes_max must be between 1024 and 40960 (a chunk must fit a frame)",
            ),
            (
                v.upload_idle_ms >= 1000,
                "voicemail.upload_idle_ms must be at least 1000",
            ),
            (
                v.uploads_max >= 1 && v.retention_ms >= 1_000,
                "voicemail.uploads_max must be positive and voicemail.retention_ms at least 1000",
            ),
        ];
        for (ok, message) in voice_checks {
            if !ok {
                return Err(ConfigError::Invalid(message.to_string()));
            }
        }
        if self.join_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "join_timeout_ms must be above 0".into(),
            ));
        }
        if self.voters_max != 3 && self.voters_max != 5 {
            return Err(ConfigError::Invalid("voters_max must be 3 or 5".into()));
        }
        if self.cluster_addr.ip().is_unspecified() && self.advertise_ip.is_none() {
            return Err(ConfigError::Invalid(format!(
                "cluster_addr {} binds every interface: set advertise_ip (--advertise-ip) to the IP other nodes reach this one at",
                self.cluster_addr
            )));
        }
        if self.advertise_ip.is_some_and(|ip| ip.is_unspecified()) {
            return Err(ConfigError::Invalid(
                "advertise_ip must be a reachable address, not 0.0.0.0 or ::".into(),
            ));
        }
        self.check_secrets()?;
        if !(1..=DRAIN_TIMEOUT_MS_MAX).contains(&self.drain_timeout_ms) {
            return Err(ConfigError::Invalid(format!(
                "drain_timeout_ms must be between 1 and {DRAIN_TIMEOUT_MS_MAX}"
            )));
        }
        if self.node_name.is_empty() {
            return Err(ConfigError::Invalid("node_name must not be empty".into()));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::Invalid(
                "client TLS needs both tls_cert and tls_key (--tls-cert, --tls-key)".into(),
            ));
        }
        if !(100..=3_600_000).contains(&self.tls_reload_interval_ms) {
            return Err(ConfigError::Invalid(format!(
                "tls_reload_interval_ms must be 100 to 3600000, not {}",
                self.tls_reload_interval_ms
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_a_file_overrides_them() {
        NodeConfig::default().validate().expect("defaults");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("chorus.toml");
        std::fs::write(
            &path,
            "http_addr = \"127.0.0.1:9000\"\n[limits]\nping_interval_ms = 500\n",
        )
        .expect("write");
        let config = NodeConfig::from_file(&path).expect("parse");
        assert_eq!(config.http_addr.port(), 9000);
        assert_eq!(config.limits.ping_interval_ms, 500);
        assert_eq!(config.limits.requests_per_sec, 20);
        std::fs::write(
            &path,
            "[room.bullets]\nrate_per_sec = 40\nblocklist = [\"spam\"]\n",
        )
        .expect("write");
        let config = NodeConfig::from_file(&path).expect("parse");
        assert_eq!(config.room.bullets.rate_per_sec, 40);
        assert_eq!(config.room.bullets.blocklist, ["spam"]);
        assert_eq!(config.room.bullets.window_ms, 250, "the rest defaults");
        config.validate().expect("valid");
        std::fs::write(&path, "[room.bullets]\nrate_per_sec = 0\n").expect("write");
        let config = NodeConfig::from_file(&path).expect("parse");
        assert!(config.validate().is_err(), "a room must show bullets");
        std::fs::write(&path, "drain_timeout_ms = 5000\n").expect("write");
        let config = NodeConfig::from_file(&path).expect("parse");
        assert_eq!(config.drain_timeout_ms, 5_000);
        config.validate().expect("valid");
        std::fs::write(&path, "drain_timeout_ms = 0\n").expect("write");
        let config = NodeConfig::from_file(&path).expect("parse");
        assert!(config.validate().is_err(), "stopping needs some time");
        std::fs::write(&path, "no_such_field = 1\n").expect("write");
        assert!(NodeConfig::from_file(&path).is_err());
    }

    #[test]
    fn a_cluster_address_on_every_interface_needs_an_advertised_ip() {
        let mut config = NodeConfig {
            cluster_addr: "0.0.0.0:7072".parse().expect("addr"),
            secret: Some("0123456789abcdef".into()),
            admin_token: Some("0123456789abcdef".into()),
            ..NodeConfig::default()
        };
        let error = config.validate().expect_err("no advertised IP");
        assert!(error.to_string().contains("advertise_ip"), "{error}");
        config.advertise_ip = Some("10.1.2.3".parse().expect("ip"));
        config.validate().expect("advertised");
        assert_eq!(
            config.advertised(config.cluster_addr).to_string(),
            "10.1.2.3:7072"
        );
        config.advertise_ip = Some("0.0.0.0".parse().expect("ip"));
        assert!(config.validate().is_err());
    }

    #[test]
    fn development_credentials_only_on_loopback_and_secrets_have_a_minimum_length() {
        let mut config = NodeConfig::default();
        config
            .validate()
            .expect("loopback with the development credentials");
        config.advertise_ip = Some("10.1.2.3".parse().expect("ip"));
        let error = config.validate().expect_err("advertised beyond loopback");
        assert!(
            error.to_string().contains("refusing to serve on 10.1.2.3"),
            "{error}"
        );
        config.secret = Some("0123456789abcdef".into());
        let error = config.validate().expect_err("admin token still missing");
        assert!(error.to_string().contains("admin token"), "{error}");
        config.admin_token = Some("0123456789abcdef".into());
        config.validate().expect("real credentials");
        config.admin_token = Some("0123456789abcde".into());
        assert!(config.validate().is_err(), "15 bytes");
        config.admin_token = Some(String::new());
        assert!(config.validate().is_err(), "empty");
    }
}
