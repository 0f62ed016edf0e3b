//! Command-line entry point: `chorus serve | token | client | loadgen`.
//!
//! Wiring only: parse flags, build config, start things, wait for signals.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::NodeConfig;

/// Chorus: a distributed actor cluster for live audio.
#[derive(Debug, Parser)]
#[command(name = "chorus", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node (with no flags: a working single-node cluster with development defaults).
    #[command(after_help = SERVE_EXIT_HELP)]
    Serve(Box<ServeArgs>),
    /// Print a client token (JWT, HS256) for development.
    Token(TokenArgs),
    /// Act as a client: rooms (rooms, create-room, join, info, members, end, summary), comments and
    /// reactions (say, react, bullet), the stage (raise-hand, invite, mute, kick, …), polls,
    /// voice (speak, listen), quiz answers, rain grabs and voice messages (vm send, vm inbox,
    /// vm fetch, …). `chorus client --help` lists all.
    Client(crate::client::cli::ClientArgs),
    /// Generate load: listeners and senders in one room; prints delivery latency.
    Loadgen(crate::loadgen::LoadgenArgs),
    /// Operate a cluster through a node's admin API (token: CHORUS_ADMIN_TOKEN, on
    /// loopback the development token): status, nodes, ready, where KEY, drain, remove,
    /// rain, audit-rain, quiz.
    Admin(crate::admin_cli::AdminArgs),
    /// Cluster certificate authority: `ca init DIR`, `ca issue` (a node's identity).
    Ca(crate::admin_cli::CaArgs),
}

/// How long the runtime's leftover tasks get once a command is done, in ms.
const RUNTIME_SHUTDOWN_TIMEOUT_MS: u64 = 1_000;

/// `chorus serve` flags; each overrides the config file, which overrides the defaults.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data directory (sled, certificates). Default ./chorus-data.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Directory with the cluster CA (ca.pem, ca-key.pem). Default: the data dir.
    #[arg(long = "ca")]
    pub ca_dir: Option<PathBuf>,
    /// HTTP address for /ws, /ws/echo, /healthz, /readyz (and /metrics, /admin/* unless
    /// --admin-addr is given). Default 127.0.0.1:7070.
    #[arg(long)]
    pub http_addr: Option<SocketAddr>,
    /// A separate HTTP address for /metrics and /admin/* (and /healthz, /readyz); they
    /// are then not served on --http-addr. Default: none.
    #[arg(long, env = "CHORUS_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// PEM certificate chain for clients on --http-addr (with --tls-key): the port then
    /// speaks only https:// and wss://. Reloaded on SIGHUP and when the file changes.
    #[arg(long, env = "CHORUS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "CHORUS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// QUIC address (ALPN chorus/1). Default 127.0.0.1:7071.
    #[arg(long)]
    pub quic_addr: Option<SocketAddr>,
    /// Inter-node QUIC address (mutual TLS). Default 127.0.0.1:7072.
    #[arg(long)]
    pub cluster_addr: Option<SocketAddr>,
    /// The IP other nodes and clients reach this node at (e.g. the pod IP when binding
    /// 0.0.0.0). Default: the bind addresses' IPs.
    #[arg(long)]
    pub advertise_ip: Option<std::net::IpAddr>,
    /// Join the cluster of the member at this cluster address (first start only). Any
    /// member will do, or a node that is itself still joining.
    #[arg(long)]
    pub join: Option<SocketAddr>,
    /// How long a first join may take before the node exits non-zero, e.g. 60s
    /// (the default), 2m.
    #[arg(long)]
    pub join_timeout: Option<humantime::Duration>,
    /// Raft voters: 3 (default) or 5.
    #[arg(long)]
    pub voters: Option<usize>,
    /// Admin API token. Default: the development admin token (with a warning).
    #[arg(long, env = "CHORUS_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Token secret. Default: the development secret (with a warning), on loopback
    /// addresses only. Prefer `CHORUS_SECRET` or `--secret-file`: flags show in the
    /// process list.
    #[arg(long, env = "CHORUS_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Read the token secret from this file (trailing newline ignored).
    #[arg(long, conflicts_with = "secret")]
    pub secret_file: Option<PathBuf>,
    /// Read the admin token from this file (trailing newline ignored).
    #[arg(long, conflicts_with = "admin_token")]
    pub admin_token_file: Option<PathBuf>,
    /// How long stopping may take, e.g. 30s, 2m (default 30s): the drain on SIGTERM and
    /// every step after it; then the node flushes storage and exits with status 3.
    #[arg(long)]
    pub drain_timeout: Option<humantime::Duration>,
    /// Node name (logs, certificates, auth responses).
    #[arg(long)]
    pub node_name: Option<String>,
    /// Log JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
    /// Server ping interval in ms (default 30000).
    #[arg(long)]
    pub ping_interval_ms: Option<u64>,
    /// Unanswered pings before a connection is closed (default 2).
    #[arg(long)]
    pub pings_missed_max: Option<u32>,
    /// Resume window in ms (default 60000).
    #[arg(long)]
    pub resume_window_ms: Option<u64>,
    /// Requests per second per connection (default 20).
    #[arg(long)]
    pub requests_per_sec: Option<u32>,
    /// Request burst per connection (default 40).
    #[arg(long)]
    pub requests_burst: Option<u32>,
    /// Outgoing queue per connection in frames (default 4096).
    #[arg(long)]
    pub outgoing_queue_frames_max: Option<usize>,
    /// Maximum client connections (default 50000).
    #[arg(long)]
    pub connections_max: Option<usize>,
    /// Sessions one user may hold on this node (default 16).
    #[arg(long)]
    pub sessions_per_user_max: Option<usize>,
    /// Rooms one user may create per minute through this node (default 20).
    #[arg(long)]
    pub room_creates_per_min: Option<u32>,
    /// Room creation burst per user (default 10).
    #[arg(long)]
    pub room_creates_burst: Option<u32>,
    /// Open rooms one user may hold, created through this node (default 20).
    #[arg(long)]
    pub open_rooms_per_user_max: Option<usize>,
    /// Maximum frame size in bytes (default 65536).
    #[arg(long)]
    pub frame_bytes_max: Option<usize>,
    /// Notifications kept per session for resume (default 1024; at most the outgoing queue).
    #[arg(long)]
    pub resume_buffer_frames_max: Option<usize>,
    /// Comments per second per user in a room (default 5).
    #[arg(long)]
    pub comment_rate_per_sec: Option<u32>,
    /// Comment burst per user in a room (default 10).
    #[arg(long)]
    pub comment_burst: Option<u32>,
    /// Bullet comments a room shows per second, across the cluster (default 20).
    #[arg(long)]
    pub bullet_rate_per_sec: Option<u32>,
    /// Bullet comments a user may send per second on this node (default 2).
    #[arg(long)]
    pub bullet_user_rate_per_sec: Option<u32>,
    /// Bullet burst per user on this node (default 4).
    #[arg(long)]
    pub bullet_user_burst: Option<u32>,
    /// Words refused in bullet comments, case-insensitive, comma-separated (default none;
    /// replaces the config file's `room.bullets.blocklist`).
    #[arg(long, value_delimiter = ',')]
    pub bullet_blocklist: Option<Vec<String>>,
}

impl ServeArgs {
    /// Builds the effective config.
    pub fn into_config(self) -> anyhow::Result<NodeConfig> {
        let mut config = match &self.config {
            Some(path) => NodeConfig::from_file(path)?,
            None => NodeConfig::default(),
        };
        macro_rules! set {
            ($($flag:ident => $($field:ident).+),* $(,)?) => {
                $( if let Some(value) = self.$flag { config.$($field).+ = value; } )*
            };
        }
        set! {
            data_dir => data_dir,
            cluster_addr => cluster_addr,
            voters => voters_max,
            http_addr => http_addr,
            quic_addr => quic_addr,
            node_name => node_name,
            ping_interval_ms => limits.ping_interval_ms,
            pings_missed_max => limits.pings_missed_max,
            resume_window_ms => limits.resume_window_ms,
            requests_per_sec => limits.requests_per_sec,
            requests_burst => limits.requests_burst,
            outgoing_queue_frames_max => limits.outgoing_queue_frames_max,
            connections_max => limits.connections_max,
            sessions_per_user_max => limits.sessions_per_user_max,
            room_creates_per_min => limits.room_creates_per_min,
            room_creates_burst => limits.room_creates_burst,
            open_rooms_per_user_max => limits.open_rooms_per_user_max,
            frame_bytes_max => limits.frame_bytes_max,
            resume_buffer_frames_max => limits.resume_buffer_frames_max,
            comment_rate_per_sec => room.comment_rate_per_sec,
            comment_burst => room.comment_burst,
            bullet_rate_per_sec => room.bullets.rate_per_sec,
            bullet_user_rate_per_sec => room.bullets.user_rate_per_sec,
            bullet_user_burst => room.bullets.user_burst,
            bullet_blocklist => room.bullets.blocklist,
        }
        if self.ca_dir.is_some() {
            config.ca_dir = self.ca_dir;
        }
        if self.secret.is_some() {
            config.secret = self.secret;
        }
        if let Some(path) = &self.secret_file {
            config.secret = Some(read_secret_file(path, "secret")?);
        }
        if let Some(path) = &self.admin_token_file {
            config.admin_token = Some(read_secret_file(path, "admin token")?);
        }
        if self.join.is_some() {
            config.join = self.join;
        }
        if let Some(timeout) = self.join_timeout {
            config.join_timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        }
        if self.advertise_ip.is_some() {
            config.advertise_ip = self.advertise_ip;
        }
        if self.admin_addr.is_some() {
            config.admin_addr = self.admin_addr;
        }
        if self.tls_cert.is_some() {
            config.tls_cert = self.tls_cert;
        }
        if self.tls_key.is_some() {
            config.tls_key = self.tls_key;
        }
        if self.admin_token.is_some() {
            config.admin_token = self.admin_token;
        }
        if self.log_json {
            config.log_json = true;
        }
        if let Some(timeout) = self.drain_timeout {
            config.drain_timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        }
        config.validate()?;
        Ok(config)
    }
}

/// A secret kept in a file: its content without the trailing newline.
fn read_secret_file(path: &std::path::Path, what: &str) -> anyhow::Result<String> {
    let text = anyhow::Context::with_context(std::fs::read_to_string(path), || {
        format!("cannot read the {what} file {}", path.display())
    })?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

/// `chorus token` flags.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// User id (the token's `sub`).
    #[arg(long)]
    pub user: String,
    /// Secret to sign with.
    #[arg(long, env = "CHORUS_SECRET", hide_env_values = true, default_value = crate::config::DEV_SECRET)]
    pub secret: String,
    /// Validity, e.g. 1h, 30m, 7d.
    #[arg(long, default_value = "1h")]
    pub ttl: humantime::Duration,
    /// Roles to include (repeatable), e.g. --role operator.
    #[arg(long = "role")]
    pub roles: Vec<String>,
}

fn init_tracing(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("CHORUS_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info,openraft=warn,sled=warn,ractor_cluster=warn"));
    // Colours only on a terminal: a log redirected to a file or a collector stays plain.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The signals that stop a node, SIGTERM and SIGINT, registered once for the process: the
/// first starts the drain, any later one cuts it short. (Once registered, a signal no
/// longer kills the process by default, so every later one must be listened for too.)
struct StopSignals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Registers the handlers.
    fn register() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(StopSignals {
                terminate: signal(SignalKind::terminate())?,
                interrupt: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(StopSignals {})
    }

    /// Waits for the next signal; its name.
    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.terminate.recv() => "SIGTERM",
                _ = self.interrupt.recv() => "SIGINT",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "ctrl-c"
        }
    }
}

/// `chorus serve`'s exit status when it stopped without a completed drain: the drain
/// deadline passed, a second signal cut it short, or the rooms could not be handed off.
pub const EXIT_DRAIN_INCOMPLETE: u8 = 3;

/// `chorus serve --help`: what the exit status says.
const SERVE_EXIT_HELP: &str = "\
Stopping: SIGTERM or SIGINT drains the node (its rooms move to other members) and stops it,
all within --drain-timeout; a second signal during the drain stops it at once (storage is
flushed first).

Exit status: 0 when the drain completed (a lone node has nothing to hand off: that counts);
3 when the node stopped without a completed drain (the deadline passed, a second signal,
or the rooms could not be handed off, e.g. without a Raft quorum); 1 on any error,
also when the node's Raft member stopped working while it ran (it stops itself then).";

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = args.into_config()?;
    init_tracing(config.log_json);
    let drain_timeout = std::time::Duration::from_millis(config.drain_timeout_ms);
    let mut signals = StopSignals::register()?;
    let node = tokio::select! {
        node = crate::server::start(config) => node?,
        signal = signals.next() => {
            tracing::warn!(signal, "signal received while starting: stopping now");
            return Ok(ExitCode::from(EXIT_DRAIN_INCOMPLETE));
        }
    };
    // One machine-readable line on stdout once serving (scripts and tests read the bound
    // addresses from it, e.g. when started with port 0); logs go to stderr.
    println!(
        "{}",
        serde_json::json!({
            "event": "serving",
            "node": node.node().ctx.config.node_name,
            "http_addr": node.http_addr.to_string(),
            "admin_addr": node.admin_addr.map(|a| a.to_string()),
            "quic_addr": node.quic_addr.to_string(),
            "cluster_addr": node.cluster_addr.to_string(),
        })
    );
    let raft_failed = tokio::select! {
        signal = signals.next() => {
            tracing::info!(
                signal,
                "signal received: draining, at most {}",
                humantime::format_duration(drain_timeout)
            );
            None
        }
        why = node.raft_failed() => {
            tracing::error!(
                %why,
                "the node's Raft member stopped working: stopping (restart the node; its \
                 data dir is kept)"
            );
            Some(why)
        }
    };
    let second = async {
        let signal = signals.next().await;
        tracing::info!(signal, "second signal received");
    };
    let outcome = node.shutdown(drain_timeout, second).await;
    if raft_failed.is_some() {
        return Ok(ExitCode::FAILURE);
    }
    Ok(if outcome.drain_completed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DRAIN_INCOMPLETE)
    })
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    let keys = crate::token::TokenKeys::new(args.secret.as_bytes());
    let token = keys.mint(
        &args.user,
        &args.roles,
        crate::token::unix_now_secs(),
        args.ttl.as_secs(),
    )?;
    println!("{token}");
    Ok(())
}

/// Runs the CLI; returns the process exit code.
pub fn main() -> ExitCode {
    // quinn uses ring; other dependencies may pull aws-lc-rs: pick one provider for the
    // whole process so rustls never has to guess (it panics if it must and cannot).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("chorus: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let done = match cli.command {
            Command::Serve(args) => return serve(*args).await,
            Command::Token(args) => token(args),
            Command::Client(args) => crate::client::cli::run(args).await,
            Command::Admin(args) => crate::admin_cli::run(args).await,
            Command::Ca(args) => crate::admin_cli::run_ca(args),
            Command::Loadgen(args) => {
                init_tracing(false);
                crate::loadgen::run(args).await
            }
        };
        done.map(|()| ExitCode::SUCCESS)
    });
    // Dropping a runtime waits for every blocking task without limit (a stuck disk, a
    // read of stdin): whatever a stopping node abandoned gets this long, then the process
    // exits.
    runtime.shutdown_timeout(std::time::Duration::from_millis(
        RUNTIME_SHUTDOWN_TIMEOUT_MS,
    ));
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("chorus: {error:#}");
            ExitCode::FAILURE
        }
    }
}
