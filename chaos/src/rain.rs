//! The red-packet rain chaos scenario (SPEC Q8): real nodes, at least a thousand clients
//! tapping on one rain, the pool's owner SIGKILLed and, while it is down, another node
//! paused; then the audit from durable state with every grant the clients saw.
//!
//! Each client taps `taps` times, every `tap_interval_ms` (with jitter), each tap with its
//! own request id, retried with that id while the server answers `unavailable` or the
//! connection is being replaced (clients reconnect to the next node in their list). A tap
//! that never gets an answer within [`TAP_RETRY_MS`] counts as unanswered (not a
//! violation: the cluster may refuse to pay when it cannot reach a majority; the audit
//! covers whatever was paid).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chorus_node::client::{Client, ClientConfig, ClientError};
use chorus_protocol::{ErrorCode, GrabResult, RainGrabRequest, RoomCreateRequest};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::cluster::{self, Health, NodeProcess};
use crate::ChaosError;

/// How long one tap is retried (same request id) before it counts as unanswered.
pub const TAP_RETRY_MS: u64 = 30_000;
/// Most clients one run makes (file descriptors: one connection each).
pub const RAIN_CLIENTS_MAX: usize = 10_000;

const HEALTHY_TIMEOUT: Duration = Duration::from_secs(60);

/// One rain chaos run.
#[derive(Debug, Clone, Serialize)]
pub struct RainChaosConfig {
    /// The `chorus` binary.
    pub chorus_bin: PathBuf,
    /// Nodes (3-5).
    pub nodes: usize,
    /// Tapping clients.
    pub clients: usize,
    /// Taps per client.
    pub taps: u32,
    /// Mean time between two taps of a client, ms.
    pub tap_interval_ms: u64,
    /// Packets in the rain.
    pub packets: u32,
    /// Cents in the rain.
    pub total_cents: u64,
    /// Packets one user may get.
    pub cap: u32,
    /// How long the pool's node stays down before it is restarted, ms.
    pub down_ms: u64,
    /// How long the other node stays paused, ms.
    pub pause_ms: u64,
    /// Seed of the pacing.
    pub seed: u64,
    /// Work dir (CA, data dirs, logs, client log).
    pub work_dir: PathBuf,
    /// Node i listens on this address plus i.
    pub base_ip: Ipv4Addr,
}

impl RainChaosConfig {
    /// The defaults of the full form: 3 nodes, 1,000 clients × 12 taps.
    pub fn new(chorus_bin: PathBuf, work_dir: PathBuf, seed: u64) -> Self {
        RainChaosConfig {
            chorus_bin,
            nodes: 3,
            clients: 1_000,
            taps: 12,
            tap_interval_ms: 500,
            packets: 2_500,
            total_cents: 1_000_000,
            cap: 3,
            down_ms: 6_000,
            pause_ms: 3_000,
            seed,
            work_dir,
            base_ip: Ipv4Addr::new(127, 0, 2, 11),
        }
    }

    fn validate(&self) -> Result<(), ChaosError> {
        if !(crate::NODES_MIN..=crate::NODES_MAX).contains(&self.nodes) {
            return Err(ChaosError::Config(format!(
                "nodes must be {}-{}",
                crate::NODES_MIN,
                crate::NODES_MAX
            )));
        }
        if self.clients == 0 || self.clients > RAIN_CLIENTS_MAX {
            return Err(ChaosError::Config(format!(
                "clients must be 1-{RAIN_CLIENTS_MAX}"
            )));
        }
        if self.taps == 0 || self.taps > 1_000 || self.tap_interval_ms == 0 {
            return Err(ChaosError::Config(
                "taps must be 1-1000 and the interval above 0".into(),
            ));
        }
        if self.packets == 0 || self.total_cents < u64::from(self.packets) {
            return Err(ChaosError::Config(
                "a rain needs packets and at least a cent per packet".into(),
            ));
        }
        Ok(())
    }
}

/// What a rain chaos run saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RainChaosReport {
    /// The rain.
    pub rain_id: String,
    /// Taps answered (any result).
    pub grabs_answered: u64,
    /// Taps answered `granted`.
    pub granted: u64,
    /// Cents the clients saw granted.
    pub granted_cents_seen: u64,
    /// Taps answered `none_left`, `cap_reached`, `throttled`, `not_started`, `ended`.
    pub refused: u64,
    /// Taps never answered within the retry window.
    pub unanswered: u64,
    /// Answers that needed at least one retry.
    pub retried: u64,
    /// Latency of answered taps (first send to answer, retries included), ms.
    pub latency_p50_ms: u64,
    /// p99 of the same.
    pub latency_p99_ms: u64,
    /// The faults, in order: (what, node, at ms since the start of the tapping).
    pub faults: Vec<(String, String, u64)>,
    /// The audit's JSON report.
    pub audit: serde_json::Value,
    /// Whole run, ms.
    pub elapsed_ms: u64,
}

#[derive(Default)]
struct Tally {
    granted: Vec<(String, u64)>,
    refused: u64,
    unanswered: u64,
    retried: u64,
    latencies_ms: Vec<u64>,
}

fn say(start: Instant, line: impl std::fmt::Display) {
    eprintln!("[rain-chaos +{:>6} ms] {line}", start.elapsed().as_millis());
}

/// A client of `user` trying `urls` in turn (shared with the voice scenario).
pub(crate) fn client_config(
    urls: Vec<String>,
    ca: &Path,
    user: &str,
) -> Result<ClientConfig, ChaosError> {
    crate::workload::client_config_for(&urls, ca, user).map_err(ChaosError::Setup)
}

/// Connects, retrying for 5 s while the nodes come up (shared with the voice scenario).
pub(crate) async fn connect(config: ClientConfig) -> Result<Client, ChaosError> {
    let mut last = String::new();
    for _ in 0..20 {
        match Client::connect(config.clone()).await {
            Ok(client) => return Ok(client),
            Err(error) => {
                last = error.to_string();
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    Err(ChaosError::Setup(format!(
        "a client cannot connect: {last}"
    )))
}

/// One tap, retried with the same request id; (result, amount, retried, latency) or
/// `None` if unanswered.
async fn tap(
    client: &Client,
    rain_id: &str,
    request_id: &str,
) -> Option<(GrabResult, u64, bool, u64)> {
    let started = Instant::now();
    let deadline = started + Duration::from_millis(TAP_RETRY_MS);
    let mut retried = false;
    let mut backoff_ms = 100;
    loop {
        let request = RainGrabRequest {
            rain_id: rain_id.to_string(),
            request_id: request_id.to_string(),
        };
        match client.request(request).await {
            Ok(answer) => {
                return Some((
                    answer.result,
                    answer.amount.unwrap_or(0),
                    retried,
                    started.elapsed().as_millis() as u64,
                ))
            }
            Err(ClientError::Server(error)) if error.code != ErrorCode::Unavailable.as_u16() => {
                return None
            }
            Err(_) if Instant::now() < deadline => {
                retried = true;
                tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                backoff_ms = (backoff_ms * 2).min(1_000);
            }
            Err(_) => return None,
        }
    }
}

async fn chorus_admin(
    config: &RainChaosConfig,
    node: &NodeProcess,
    args: &[&str],
) -> Result<String, ChaosError> {
    let output = tokio::process::Command::new(&config.chorus_bin)
        .args(["admin", "--url", &format!("http://{}", node.http_addr())])
        .args(args)
        .output()
        .await
        .map_err(|e| ChaosError::Setup(format!("run chorus admin: {e}")))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() && !args.contains(&"audit") {
        return Err(ChaosError::Setup(format!(
            "chorus admin {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    Ok(stdout)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Runs the scenario. `Err(ChaosError::Violations)` if the audit fails.
pub async fn run_rain(config: RainChaosConfig) -> Result<RainChaosReport, ChaosError> {
    config.validate()?;
    let start = Instant::now();
    let ca_dir = cluster::prepare_work_dir(&config.chorus_bin, &config.work_dir).await?;
    let ca = ca_dir.join("ca.pem");

    let mut nodes = cluster::node_set(config.base_ip, config.nodes, &config.work_dir);
    let seed_addr = nodes[0].cluster_addr();
    for (i, node) in nodes.iter_mut().enumerate() {
        node.start(&config.chorus_bin, &ca_dir, (i > 0).then_some(seed_addr))
            .await?;
    }
    if let Health::Unhealthy(why) =
        cluster::wait_healthy(&nodes, tokio::time::Instant::now() + HEALTHY_TIMEOUT).await
    {
        return Err(ChaosError::Setup(format!(
            "the cluster did not converge: {why}"
        )));
    }
    say(start, format_args!("{} nodes healthy", nodes.len()));

    let host = connect(client_config(vec![nodes[0].ws_url()], &ca, "host")?).await?;
    let room = host
        .request(RoomCreateRequest {
            title: "Rain chaos".into(),
            scheduled_start_ms: None,
        })
        .await
        .map_err(|e| ChaosError::Setup(format!("create room: {e}")))?
        .room_id;
    // Long enough for every tap and the faults; it ends after the tapping.
    let tapping_ms = u64::from(config.taps) * config.tap_interval_ms;
    let duration_secs = (tapping_ms + config.down_ms + config.pause_ms) / 1000 + 40;
    let created = chorus_admin(
        &config,
        &nodes[0],
        &[
            "rain",
            "create",
            "--room",
            &room,
            "--total",
            &config.total_cents.to_string(),
            "--count",
            &config.packets.to_string(),
            "--cap",
            &config.cap.to_string(),
            "--duration",
            &duration_secs.to_string(),
        ],
    )
    .await?;
    let rain_id = serde_json::from_str::<serde_json::Value>(created.trim())
        .ok()
        .and_then(|v| v["rain_id"].as_str().map(str::to_string))
        .ok_or_else(|| ChaosError::Setup(format!("rain create answered {created}")))?;
    say(start, format_args!("rain {rain_id} in room {room}"));

    // Clients, each with every node in its list (its home first).
    let mut clients = Vec::with_capacity(config.clients);
    for i in 0..config.clients {
        let home = i % nodes.len();
        let urls = (0..nodes.len())
            .map(|k| {
                let node = &nodes[(home + k) % nodes.len()];
                if i % 2 == 1 {
                    node.quic_url()
                } else {
                    node.ws_url()
                }
            })
            .collect();
        clients.push(Arc::new(
            connect(client_config(urls, &ca, &format!("t{i:05}"))?).await?,
        ));
    }
    say(start, format_args!("{} clients connected", clients.len()));

    let tally = Arc::new(Mutex::new(Tally::default()));
    let answered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let tapping_start = Instant::now();
    let mut tappers = Vec::with_capacity(clients.len());
    for (i, client) in clients.iter().enumerate() {
        let client = client.clone();
        let rain_id = rain_id.clone();
        let tally = tally.clone();
        let answered = answered.clone();
        let taps = config.taps;
        let interval = config.tap_interval_ms;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(config.seed ^ (i as u64) << 20);
        tappers.push(tokio::spawn(async move {
            let user = format!("t{i:05}");
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..interval))).await;
            for t in 0..taps {
                let request_id = format!("{user}-{t}");
                let result = tap(&client, &rain_id, &request_id).await;
                {
                    let mut tally = tally.lock().unwrap_or_else(|e| e.into_inner());
                    match result {
                        Some((result, amount, retried, latency)) => {
                            answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tally.latencies_ms.push(latency);
                            tally.retried += u64::from(retried);
                            if result == GrabResult::Granted {
                                tally.granted.push((user.clone(), amount));
                            } else {
                                tally.refused += 1;
                            }
                        }
                        None => tally.unanswered += 1,
                    }
                }
                let jitter = rng.random_range(interval / 2..=interval + interval / 2);
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
        }));
    }

    // Faults: once a sixth of the taps are answered, SIGKILL the pool's node; while it is
    // down, pause another one; then bring both back.
    let mut faults = Vec::new();
    let total_taps = config.clients as u64 * u64::from(config.taps);
    let trigger_deadline = Instant::now() + Duration::from_millis(tapping_ms + 30_000);
    while answered.load(std::sync::atomic::Ordering::Relaxed) < total_taps / 6
        && Instant::now() < trigger_deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let owner_name = nodes[0]
        .admin(&format!("/admin/where?key=rain/{rain_id}"))
        .await
        .and_then(|v| v["owner_name"].as_str().map(str::to_string))
        .ok_or_else(|| ChaosError::Setup("cannot find the pool's owner".into()))?;
    let owner = nodes
        .iter()
        .position(|n| n.name == owner_name)
        .ok_or_else(|| ChaosError::Setup(format!("unknown owner {owner_name}")))?;
    let at = |start: Instant| start.elapsed().as_millis() as u64;
    nodes[owner].kill().await;
    faults.push(("sigkill".to_string(), owner_name.clone(), at(tapping_start)));
    say(
        start,
        format_args!("SIGKILLed the pool's node {owner_name}"),
    );
    tokio::time::sleep(Duration::from_millis(config.down_ms / 3)).await;
    let paused = (owner + 1) % nodes.len();
    nodes[paused].signal_stop(true).await?;
    faults.push((
        "sigstop".to_string(),
        nodes[paused].name.clone(),
        at(tapping_start),
    ));
    say(start, format_args!("paused {}", nodes[paused].name));
    tokio::time::sleep(Duration::from_millis(config.pause_ms)).await;
    nodes[paused].signal_stop(false).await?;
    faults.push((
        "sigcont".to_string(),
        nodes[paused].name.clone(),
        at(tapping_start),
    ));
    say(start, format_args!("resumed {}", nodes[paused].name));
    let rest = config
        .down_ms
        .saturating_sub(config.down_ms / 3 + config.pause_ms);
    tokio::time::sleep(Duration::from_millis(rest)).await;
    nodes[owner]
        .start(&config.chorus_bin, &ca_dir, Some(seed_addr))
        .await?;
    faults.push(("restart".to_string(), owner_name.clone(), at(tapping_start)));
    say(start, format_args!("restarted {owner_name}"));

    for tapper in tappers {
        let _ = tapper.await;
    }
    say(
        start,
        format_args!(
            "tapping done: {} answered",
            answered.load(std::sync::atomic::Ordering::Relaxed)
        ),
    );

    // The rain ends and refunds the rest; then the audit, with every grant clients saw.
    let ends_by = Instant::now() + Duration::from_secs(duration_secs + 60);
    loop {
        let mut ended = false;
        for node in &nodes {
            if let Some(status) = node.admin(&format!("/admin/rain?id={rain_id}")).await {
                ended |= status["ended"] == true;
            }
        }
        if ended {
            break;
        }
        if Instant::now() > ends_by {
            return Err(ChaosError::Setup("the rain did not end".into()));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let tally = std::mem::take(&mut *tally.lock().unwrap_or_else(|e| e.into_inner()));
    let log_path = config.work_dir.join("client-grants.jsonl");
    let log: String = tally
        .granted
        .iter()
        .map(|(user, amount)| {
            serde_json::json!({"user": user, "result": "granted", "amount": amount}).to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&log_path, log).map_err(|source| ChaosError::Io {
        path: log_path.clone(),
        source,
    })?;
    let auditor = nodes
        .iter()
        .find(|n| n.pid().is_some())
        .ok_or_else(|| ChaosError::Setup("no node to audit on".into()))?;
    let audit = chorus_admin(
        &config,
        auditor,
        &[
            "--json",
            "rain",
            "audit",
            &rain_id,
            "--client-log",
            log_path.to_str().unwrap_or_default(),
        ],
    )
    .await?;
    let audit: serde_json::Value = serde_json::from_str(audit.trim())
        .map_err(|e| ChaosError::Setup(format!("audit output: {e}: {audit}")))?;
    let mut latencies = tally.latencies_ms;
    latencies.sort_unstable();
    let report = RainChaosReport {
        rain_id,
        grabs_answered: latencies.len() as u64,
        granted: tally.granted.len() as u64,
        granted_cents_seen: tally.granted.iter().map(|(_, a)| a).sum(),
        refused: tally.refused,
        unanswered: tally.unanswered,
        retried: tally.retried,
        latency_p50_ms: percentile(&latencies, 0.50),
        latency_p99_ms: percentile(&latencies, 0.99),
        faults,
        audit: audit.clone(),
        elapsed_ms: start.elapsed().as_millis() as u64,
    };
    let _ = std::fs::write(
        config.work_dir.join("rain-report.json"),
        serde_json::to_vec_pretty(&report).unwrap_or_default(),
    );
    say(
        start,
        format_args!(
            "audit ok={} granted {} refunded {}",
            audit["ok"], audit["granted"], audit["refunded"]
        ),
    );
    if audit["ok"] != true {
        return Err(ChaosError::RainAudit {
            report: Box::new(report),
        });
    }
    Ok(report)
}
