//! Real `chorus serve` processes on loopback and their admin API: start, SIGKILL, restart
//! with the same data dir, SIGSTOP / SIGCONT, and the health poll.
//!
//! It does not decide when to inject a fault (that is `run`'s seeded schedule) and does not
//! talk the client protocol (that is `workload`).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::ChaosError;

/// The admin token nodes use when started without one.
pub const ADMIN_TOKEN: &str = "chorus-dev-admin";
/// HTTP port on every node's own loopback address (client WebSocket and admin API).
pub const HTTP_PORT: u16 = 7070;
/// Client QUIC port on every node's own loopback address.
pub const QUIC_PORT: u16 = 7071;
/// Inter-node QUIC port on every node's own loopback address.
pub const CLUSTER_PORT: u16 = 7072;
/// How long a node may take to print its ready line after it is spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Starts of one node before giving up (a restart may race its old sockets' release).
const START_ATTEMPTS_MAX: u32 = 5;
/// One admin HTTP request, connect to last byte. A paused node simply times out.
const ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_millis(1500);
/// Largest admin response read, in bytes.
const ADMIN_RESPONSE_BYTES_MAX: u64 = 1 << 20;

/// One node of the chaos cluster: a fixed identity (name, address, data dir) and, while it
/// runs, its process. Dropping it kills the process (`kill_on_drop`).
pub struct NodeProcess {
    /// `n1`, `n2`, …
    pub name: String,
    /// The node's own loopback address; its ports are the fixed `*_PORT`s.
    pub ip: IpAddr,
    data_dir: PathBuf,
    child: Option<Child>,
    log_path: PathBuf,
    /// Further `chorus serve` arguments (e.g. `--drain-timeout 10s`).
    pub extra_args: Vec<String>,
    /// How long a start may take to print the ready line (a joining node prints it once
    /// it is a member). Default 20 s.
    pub ready_timeout: Duration,
}

impl NodeProcess {
    /// A node that is not started yet.
    pub fn new(name: String, ip: IpAddr, work_dir: &Path) -> NodeProcess {
        NodeProcess {
            data_dir: work_dir.join(&name),
            log_path: work_dir.join(format!("{name}.log")),
            name,
            ip,
            child: None,
            extra_args: Vec::new(),
            ready_timeout: READY_TIMEOUT,
        }
    }

    /// HTTP address (WebSocket `/ws`, admin API).
    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, HTTP_PORT)
    }

    /// Inter-node address (what `--join` takes).
    pub fn cluster_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, CLUSTER_PORT)
    }

    /// `ws://IP:7070/ws`
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.http_addr())
    }

    /// `quic://IP:7071`
    pub fn quic_url(&self) -> String {
        format!("quic://{}", SocketAddr::new(self.ip, QUIC_PORT))
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Starts `chorus serve` (retrying a few times) and waits for its ready line. `join` is
    /// only used on the first start: a node with an id ignores it.
    pub async fn start(
        &mut self,
        chorus_bin: &Path,
        ca_dir: &Path,
        join: Option<SocketAddr>,
    ) -> Result<(), ChaosError> {
        let mut last_error = String::new();
        for attempt in 1..=START_ATTEMPTS_MAX {
            match self.start_once(chorus_bin, ca_dir, join).await {
                Ok(child) => {
                    self.child = Some(child);
                    return Ok(());
                }
                Err(error) => {
                    last_error = error;
                    tokio::time::sleep(Duration::from_millis(300 * u64::from(attempt))).await;
                }
            }
        }
        Err(ChaosError::NodeStart {
            node: self.name.clone(),
            reason: last_error,
        })
    }

    async fn start_once(
        &self,
        chorus_bin: &Path,
        ca_dir: &Path,
        join: Option<SocketAddr>,
    ) -> Result<Child, String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| format!("open {}: {e}", self.log_path.display()))?;
        let mut command = Command::new(chorus_bin);
        command
            .arg("serve")
            .arg("--ca")
            .arg(ca_dir)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--node-name", &self.name])
            .args(["--http-addr", &self.http_addr().to_string()])
            .args([
                "--quic-addr",
                &SocketAddr::new(self.ip, QUIC_PORT).to_string(),
            ])
            .args(["--cluster-addr", &self.cluster_addr().to_string()])
            .args(["--requests-per-sec", "1000", "--requests-burst", "1000"])
            .args(&self.extra_args);
        if let Some(join) = join {
            command.args(["--join", &join.to_string()]);
        }
        let mut child = command
            .env(
                "CHORUS_LOG",
                std::env::var("CHORUS_CHAOS_LOG")
                    .unwrap_or_else(|_| "warn,chorus_node=info,chorus_cluster=info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", chorus_bin.display()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| "no stdout pipe".to_string())?;
        let mut lines = BufReader::new(stdout).lines();
        let line = match tokio::time::timeout(self.ready_timeout, lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => {
                let status = child.wait().await.map(|s| s.to_string());
                return Err(format!(
                    "exited before serving ({status:?}); see {}",
                    self.log_path.display()
                ));
            }
            Ok(Err(e)) => return Err(format!("read stdout: {e}")),
            Err(_) => {
                let _ = child.kill().await;
                return Err(format!("no ready line within {:?}", self.ready_timeout));
            }
        };
        serde_json::from_str::<serde_json::Value>(&line)
            .map_err(|e| format!("ready line is not JSON ({e}): {line}"))?;
        // Keep draining stdout so the node never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(child)
    }

    /// SIGKILL and reap. No-op if it is not running.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// The node's data dir.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Whether a process is running (started and not yet reaped).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGTERM, then waits up to `timeout` for the exit; SIGKILL after that. Returns the
    /// exit code and how long the stop took, or `None` if it had to be killed (or was not
    /// running).
    pub async fn terminate(&mut self, timeout: Duration) -> Option<(Option<i32>, Duration)> {
        let mut child = self.child.take()?;
        let began = std::time::Instant::now();
        if let Some(pid) = child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(status)) => Some((status.code(), began.elapsed())),
            _ => {
                let _ = child.kill().await;
                None
            }
        }
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`) through `kill(1)`: no extra dependency for two
    /// signals.
    pub async fn signal_stop(&self, stop: bool) -> Result<(), ChaosError> {
        let pid = self.pid().ok_or_else(|| ChaosError::Signal {
            node: self.name.clone(),
            reason: "not running".into(),
        })?;
        let signal = if stop { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .await
            .map_err(|e| ChaosError::Signal {
                node: self.name.clone(),
                reason: format!("kill {signal}: {e}"),
            })?;
        if status.success() {
            Ok(())
        } else {
            Err(ChaosError::Signal {
                node: self.name.clone(),
                reason: format!("kill {signal} {pid}: {status}"),
            })
        }
    }

    /// GET an admin path; `None` on any failure (down, paused, timeout, bad JSON).
    pub async fn admin(&self, path: &str) -> Option<serde_json::Value> {
        admin_get(self.http_addr(), path).await
    }
}

/// GET `path` on `addr` with the admin token, parsed as JSON, bounded in time and size.
pub async fn admin_get(addr: SocketAddr, path: &str) -> Option<serde_json::Value> {
    admin_request(addr, "GET", path, "HTTP/1.1 200").await
}

/// Whether the node at `addr` answers `/readyz` with 503 (not ready); `false` when it is
/// ready or does not answer.
pub async fn says_not_ready(addr: SocketAddr) -> bool {
    admin_request(addr, "GET", "/readyz", "HTTP/1.1 503")
        .await
        .is_some()
}

/// POST `path` (no body) on `addr` with the admin token; the JSON answer if it is
/// `202 Accepted`, `None` otherwise (down, paused, refused, timeout).
pub async fn admin_post(addr: SocketAddr, path: &str) -> Option<serde_json::Value> {
    admin_request(addr, "POST", path, "HTTP/1.1 202").await
}

async fn admin_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    status_line: &str,
) -> Option<serde_json::Value> {
    let request = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream
            .take(ADMIN_RESPONSE_BYTES_MAX)
            .read_to_string(&mut response)
            .await
            .ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        if !head.starts_with(status_line) {
            return None;
        }
        serde_json::from_str(body).ok()
    };
    tokio::time::timeout(ADMIN_REQUEST_TIMEOUT, request)
        .await
        .ok()
        .flatten()
}

/// What one poll of every node's `/admin/status` says about the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Every node answers, sees `nodes` members all `up`, a leader, and the same ring epoch.
    Healthy,
    /// Not yet; why.
    Unhealthy(String),
}

/// Polls every node's status once and judges it.
pub async fn health(nodes: &[NodeProcess]) -> Health {
    let mut epochs = std::collections::BTreeSet::new();
    let mut leaders = std::collections::BTreeSet::new();
    for node in nodes {
        let Some(status) = node.admin("/admin/status").await else {
            return Health::Unhealthy(format!("{} does not answer /admin/status", node.name));
        };
        let members = status["members"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let up = members.iter().filter(|m| m["state"] == "up").count();
        if members.len() != nodes.len() || up != nodes.len() {
            return Health::Unhealthy(format!(
                "{} sees {up} of {} members up (want {} up)",
                node.name,
                members.len(),
                nodes.len()
            ));
        }
        if status["leader"].is_null() {
            return Health::Unhealthy(format!("{} sees no leader", node.name));
        }
        leaders.insert(status["leader"].to_string());
        epochs.insert(status["ring_epoch"].to_string());
    }
    if leaders.len() > 1 {
        return Health::Unhealthy(format!("nodes see different leaders: {leaders:?}"));
    }
    if epochs.len() > 1 {
        return Health::Unhealthy(format!("nodes see different ring epochs: {epochs:?}"));
    }
    Health::Healthy
}

/// Polls [`health`] every 250 ms until healthy or `deadline` passes; returns the last
/// judgement.
pub async fn wait_healthy(nodes: &[NodeProcess], deadline: tokio::time::Instant) -> Health {
    loop {
        let health = health(nodes).await;
        if health == Health::Healthy || tokio::time::Instant::now() >= deadline {
            return health;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs `chorus ca init DIR`.
pub async fn init_ca(chorus_bin: &Path, ca_dir: &Path) -> Result<(), ChaosError> {
    let output = Command::new(chorus_bin)
        .arg("ca")
        .arg("init")
        .arg(ca_dir)
        .output()
        .await
        .map_err(|e| ChaosError::Setup(format!("run {} ca init: {e}", chorus_bin.display())))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(ChaosError::Setup(format!(
            "chorus ca init failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )))
    }
}

/// Creates `work_dir` (which must not hold a previous run) and a cluster CA in
/// `work_dir/ca`; returns the CA dir.
pub async fn prepare_work_dir(chorus_bin: &Path, work_dir: &Path) -> Result<PathBuf, ChaosError> {
    std::fs::create_dir_all(work_dir).map_err(|source| ChaosError::Io {
        path: work_dir.to_path_buf(),
        source,
    })?;
    let ca_dir = work_dir.join("ca");
    if ca_dir.exists() {
        return Err(ChaosError::Config(format!(
            "{} holds a previous run; use an empty work dir",
            work_dir.display()
        )));
    }
    init_ca(chorus_bin, &ca_dir).await?;
    Ok(ca_dir)
}

/// `count` nodes, not started: `n1`, `n2`, … on `base_ip`, `base_ip + 1`, ….
pub fn node_set(base_ip: std::net::Ipv4Addr, count: usize, work_dir: &Path) -> Vec<NodeProcess> {
    (0..count)
        .map(|i| {
            let o = base_ip.octets();
            let ip = std::net::Ipv4Addr::new(o[0], o[1], o[2], o[3] + i as u8);
            NodeProcess::new(format!("n{}", i + 1), IpAddr::V4(ip), work_dir)
        })
        .collect()
}
