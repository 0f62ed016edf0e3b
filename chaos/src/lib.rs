//! The Chorus chaos harness: starts N real `chorus serve` processes on distinct loopback
//! addresses, runs a room workload through real clients on every node, injects faults from
//! a seed (SIGKILL then restart with the same data dir, SIGSTOP then SIGCONT), and checks
//! the SPEC S2 invariants a client can observe once the faults stop.
//!
//! Start reading at [`run`] and [`ChaosConfig`]; `cluster` drives the node processes,
//! `workload` the clients, `check` judges the clients' logs. The seed fixes the fault
//! schedule (which fault, which node, when, how long) and every client's pacing; the OS
//! scheduling of real processes is not replayable, so a replay repeats the same faults, not
//! the same interleaving.
//!
//! Link cuts between nodes (nftables, `netcut`) drive the partition scenario.

pub mod check;
pub mod cluster;
pub mod membership;
pub mod netcut;
pub mod rain;
pub mod voicemail;
pub mod workload;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use check::{CheckCounts, Violation, Violations};
use cluster::{Health, NodeProcess};
use workload::{lock, ClientHandle, ClientSpec};

/// Fewest nodes: a Raft quorum must survive one faulty node.
pub const NODES_MIN: usize = 3;
/// Most nodes (the cluster's voter limit with `--voters 5` is not used: 3 voters suffice).
pub const NODES_MAX: usize = 5;
/// Rooms whose owner the monitor samples on every node each round.
const MONITORED_ROOMS_MAX: usize = 16;
/// How long the cluster may take to become healthy: at start, after each fault, at the end.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(60);
/// Deliveries are considered complete once no comment has arrived for this long.
const QUIET_PERIOD: Duration = Duration::from_secs(2);
/// A node cut off from the others must say it is not ready within this long.
pub const CUT_OFF_NOTICED_MAX_MS: u64 = 5_000;

/// What a chaos run does. [`ChaosConfig::new`] gives the defaults documented per field.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChaosConfig {
    /// The `chorus` binary to run as `chorus serve`.
    pub chorus_bin: PathBuf,
    /// Nodes, 3-5. Default 3.
    pub nodes: usize,
    /// Rooms created before the faults. Default 6.
    pub rooms: usize,
    /// Clients, spread round-robin over the nodes (even ones on WebSocket, odd ones on
    /// QUIC). Default 9.
    pub clients: usize,
    /// Rooms each client joins and comments in (at most `rooms`). Default 2.
    pub rooms_per_client: usize,
    /// Mean time between two comments of one client, in milliseconds. Default 400.
    pub comment_interval_ms: u64,
    /// Length of the fault phase, in seconds; the workload runs throughout. Default 60.
    pub duration_secs: u64,
    /// SIGKILLs, each followed by a restart with the same data dir. Default 2.
    pub kills: usize,
    /// SIGSTOP / SIGCONT pauses. Default 1.
    pub pauses: usize,
    /// Link cuts: one node's links to every other node dropped (nftables), its clients
    /// still connected. Default 0 (needs `nft` and root).
    pub cuts: usize,
    /// Pair cuts: the links between two nodes dropped, both still reaching the rest.
    /// Default 0.
    pub pair_cuts: usize,
    /// One-way cuts: what one node sends to the others dropped. Default 0.
    pub one_way_cuts: usize,
    /// How long a cut lasts, in milliseconds: uniform in this range. Default 2000-5000.
    pub cut_ms: (u64, u64),
    /// How long a killed node stays down, in milliseconds: uniform in this range.
    /// Default 2000-5000.
    pub down_ms: (u64, u64),
    /// How long a paused node stays stopped, in milliseconds: uniform in this range.
    /// Default 2000-5000.
    pub pause_ms: (u64, u64),
    /// Longest wait for in-flight comments after the workload stops, in seconds. Default 20.
    pub settle_secs: u64,
    /// The fault schedule's and the clients' seed.
    pub seed: u64,
    /// Where the CA, node data dirs, node logs and `report.json` go. Must not hold a
    /// previous run's node data.
    pub work_dir: PathBuf,
    /// Node i listens on this address plus i (ports 7070-7072). Default 127.0.0.11.
    pub base_ip: Ipv4Addr,
}

impl ChaosConfig {
    /// The defaults: 3 nodes, 6 rooms, 9 clients, 60 s, 2 kills, 1 pause.
    pub fn new(chorus_bin: PathBuf, work_dir: PathBuf, seed: u64) -> ChaosConfig {
        ChaosConfig {
            chorus_bin,
            nodes: 3,
            rooms: 6,
            clients: 9,
            rooms_per_client: 2,
            comment_interval_ms: 400,
            duration_secs: 60,
            kills: 2,
            pauses: 1,
            cuts: 0,
            pair_cuts: 0,
            one_way_cuts: 0,
            cut_ms: (2_000, 5_000),
            down_ms: (2_000, 5_000),
            pause_ms: (2_000, 5_000),
            settle_secs: 20,
            seed,
            work_dir,
            base_ip: Ipv4Addr::new(127, 0, 0, 11),
        }
    }

    /// The partition scenario's defaults (issue 18): 3 nodes on 127.0.6.11+, no kills or
    /// pauses, 90 s with two cuts of each kind (a node isolated, two nodes cut from each
    /// other, a node whose packets to the others are dropped), each 6-10 s.
    pub fn partition(chorus_bin: PathBuf, work_dir: PathBuf, seed: u64) -> ChaosConfig {
        ChaosConfig {
            kills: 0,
            pauses: 0,
            cuts: 2,
            pair_cuts: 2,
            one_way_cuts: 2,
            cut_ms: (6_000, 10_000),
            duration_secs: 90,
            base_ip: Ipv4Addr::new(127, 0, 6, 11),
            ..ChaosConfig::new(chorus_bin, work_dir, seed)
        }
    }

    /// The `chorus-chaos` command line that repeats this run's schedule.
    pub fn replay_command(&self) -> String {
        format!(
            "chorus-chaos --chorus {} --seed {} --nodes {} --rooms {} --clients {} --rooms-per-client {} --comment-interval-ms {} --duration {} --kills {} --pauses {} --cuts {} --pair-cuts {} --one-way-cuts {} --cut-ms-min {} --cut-ms-max {} --base-ip {}",
            self.chorus_bin.display(),
            self.seed,
            self.nodes,
            self.rooms,
            self.clients,
            self.rooms_per_client,
            self.comment_interval_ms,
            self.duration_secs,
            self.kills,
            self.pauses,
            self.cuts,
            self.pair_cuts,
            self.one_way_cuts,
            self.cut_ms.0,
            self.cut_ms.1,
            self.base_ip
        )
    }

    fn validate(&self) -> Result<(), ChaosError> {
        let bad = |why: &str| Err(ChaosError::Config(why.to_string()));
        if !(NODES_MIN..=NODES_MAX).contains(&self.nodes) {
            return bad("nodes must be 3-5");
        }
        if self.rooms == 0 || self.clients == 0 || self.rooms_per_client == 0 {
            return bad("rooms, clients and rooms per client must be at least 1");
        }
        if self.rooms_per_client > self.rooms {
            return bad("rooms per client must be at most rooms");
        }
        if self.down_ms.0 > self.down_ms.1 || self.pause_ms.0 > self.pause_ms.1 {
            return bad("down and pause ranges must be low..high");
        }
        if u32::from(self.base_ip.octets()[3]) + self.nodes as u32 > 255
            || self.base_ip.octets()[0] != 127
        {
            return bad("base ip must be a 127.x.y.z address with room for every node");
        }
        if !self.chorus_bin.is_file() {
            return Err(ChaosError::Config(format!(
                "no chorus binary at {} (build it: cargo build --release --bin chorus)",
                self.chorus_bin.display()
            )));
        }
        Ok(())
    }
}

/// Kind of an injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// SIGKILL, then restart with the same data dir.
    Kill,
    /// SIGSTOP, then SIGCONT.
    Pause,
    /// The node's links to every other node cut, then restored.
    Cut,
    /// The links between the node and one other node cut (both still reach the rest).
    PairCut,
    /// What the node sends to the others dropped; what they send still arrives.
    OneWayCut,
}

/// One injected fault, as it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRecord {
    /// Kill or pause.
    pub kind: FaultKind,
    /// The node's name.
    pub node: String,
    /// When it began, in milliseconds since the run started.
    pub at_ms: u64,
    /// How long the node was down or stopped, in milliseconds.
    pub duration_ms: u64,
    /// From the fault's start to the cluster being healthy again, in milliseconds; `None`
    /// if it did not recover within the deadline.
    pub recovered_after_ms: Option<u64>,
    /// Clients that lost their connection between the fault's start and recovery.
    pub clients_disconnected: usize,
    /// Of those, how many reconnected afterwards.
    pub clients_reconnected: usize,
    /// For a cut: the other node of a pair cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// For a cut that isolates the node: how long after the cut its `/readyz` said not
    /// ready (`None`: it did not within the cut).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ready_after_ms: Option<u64>,
}

/// What the monitor sampled while the run went on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorCounts {
    /// Status samples taken (node answers).
    pub status_samples: usize,
    /// Distinct Raft terms seen.
    pub terms_seen: usize,
    /// Distinct ring epochs seen.
    pub ring_epochs_seen: usize,
    /// Owner samples taken (node answers).
    pub owner_samples: usize,
}

/// The outcome of a run, also written to `work_dir/report.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChaosReport {
    /// The seed.
    pub seed: u64,
    /// The command line that replays the schedule.
    pub replay: String,
    /// The configuration.
    pub config: ChaosConfig,
    /// Wall time of the whole run, in milliseconds.
    pub elapsed_ms: u64,
    /// Faults, in order.
    pub faults: Vec<FaultRecord>,
    /// Workload counts.
    pub counts: CheckCounts,
    /// Monitor counts.
    pub monitor: MonitorCounts,
    /// Violations (at most `check::VIOLATIONS_LISTED_MAX` listed).
    pub violations: Vec<Violation>,
    /// All violations, listed or not.
    pub violation_count: usize,
}

/// Why a run could not be done, or failed its checks.
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    /// The configuration is unusable.
    #[error("bad chaos configuration: {0}")]
    Config(String),
    /// The cluster could not be set up (CA, first convergence, rooms).
    #[error("chaos setup failed: {0}")]
    Setup(String),
    /// A node process did not start.
    #[error("node {node} did not start: {reason}")]
    NodeStart {
        /// Node name.
        node: String,
        /// Why.
        reason: String,
    },
    /// A link cut could not be made or healed.
    #[error("link cut: {0}")]
    Fault(String),
    /// A signal could not be sent.
    #[error("cannot signal node {node}: {reason}")]
    Signal {
        /// Node name.
        node: String,
        /// Why.
        reason: String,
    },
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The run completed and some invariant failed; the report lists them.
    #[error("{count} invariant violation(s), seed {}; first: {}", report.seed, report.violations.first().map(|v| format!("[{}] {}", v.invariant, v.detail)).unwrap_or_default())]
    Violations {
        /// All violations.
        count: usize,
        /// The full report.
        report: Box<ChaosReport>,
    },
    /// The membership scenario completed and some invariant failed; the report lists them.
    #[error("{} invariant violation(s), seed {}; first: {}", report.violation_count, report.config.base.seed, report.violations.first().map(|v| format!("[{}] {}", v.invariant, v.detail)).unwrap_or_default())]
    MembershipViolations {
        /// The full report.
        report: Box<membership::MembershipReport>,
    },
    /// The voice-message scenario completed and some check failed; the report lists them.
    #[error("{} voice-message violation(s), seed {}; first: {}", report.violations.len(), report.seed, report.violations.first().cloned().unwrap_or_default())]
    VoiceViolations {
        /// The run's report.
        report: Box<voicemail::VoiceChaosReport>,
    },
    /// The rain scenario's audit failed.
    #[error("the rain audit failed: {}", report.audit)]
    RainAudit {
        /// The run's report, with the audit's violations.
        report: Box<rain::RainChaosReport>,
    },
}

/// Prints a progress line with the time since `start`.
fn say(start: Instant, line: impl std::fmt::Display) {
    eprintln!("[chaos +{:7.2}s] {line}", start.elapsed().as_secs_f64());
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// One planned fault.
#[derive(Debug, Clone, Copy)]
struct PlannedFault {
    kind: FaultKind,
    node: usize,
    offset: Duration,
    length: Duration,
}

/// The fault schedule, a pure function of the config and its seed: faults in shuffled
/// order, one per equal slot of the fault phase, each starting in the first third of its
/// slot.
fn plan_faults(config: &ChaosConfig, rng: &mut SmallRng) -> Vec<PlannedFault> {
    let mut kinds: Vec<FaultKind> = std::iter::repeat_n(FaultKind::Kill, config.kills)
        .chain(std::iter::repeat_n(FaultKind::Pause, config.pauses))
        .chain(std::iter::repeat_n(FaultKind::Cut, config.cuts))
        .chain(std::iter::repeat_n(FaultKind::PairCut, config.pair_cuts))
        .chain(std::iter::repeat_n(
            FaultKind::OneWayCut,
            config.one_way_cuts,
        ))
        .collect();
    kinds.shuffle(rng);
    let count = kinds.len().max(1) as u64;
    let slot_ms = config.duration_secs * 1000 / count;
    kinds
        .into_iter()
        .enumerate()
        .map(|(i, kind)| {
            let (low, high) = match kind {
                FaultKind::Kill => config.down_ms,
                FaultKind::Pause => config.pause_ms,
                FaultKind::Cut | FaultKind::PairCut | FaultKind::OneWayCut => config.cut_ms,
            };
            PlannedFault {
                kind,
                node: rng.random_range(0..config.nodes),
                offset: Duration::from_millis(
                    i as u64 * slot_ms + rng.random_range(0..=slot_ms / 3),
                ),
                length: Duration::from_millis(rng.random_range(low..=high)),
            }
        })
        .collect()
}

/// Now, in milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs one chaos run; see the crate documentation. Returns the report, or
/// [`ChaosError::Violations`] (with the report) if an invariant failed. Every node process
/// is killed before it returns.
pub async fn run(config: ChaosConfig) -> Result<ChaosReport, ChaosError> {
    config.validate()?;
    let start = Instant::now();
    let start_unix_ms = unix_ms_now();
    say(
        start,
        format_args!("seed {}; replay: {}", config.seed, config.replay_command()),
    );
    let ca_dir = cluster::prepare_work_dir(&config.chorus_bin, &config.work_dir).await?;
    let mut violations = Violations::default();

    // 1. The cluster.
    let mut nodes = cluster::node_set(config.base_ip, config.nodes, &config.work_dir);
    let seed_addr = nodes[0].cluster_addr();
    for (i, node) in nodes.iter_mut().enumerate() {
        let join = (i > 0).then_some(seed_addr);
        node.start(&config.chorus_bin, &ca_dir, join).await?;
        say(start, format_args!("started {} on {}", node.name, node.ip));
    }
    if let Health::Unhealthy(why) =
        cluster::wait_healthy(&nodes, Instant::now() + HEALTHY_TIMEOUT).await
    {
        return Err(ChaosError::Setup(format!(
            "the cluster did not converge: {why}"
        )));
    }
    say(start, "cluster healthy");

    // 2. Rooms, clients and the monitor.
    let rooms = create_rooms(&config, &nodes.iter().collect::<Vec<_>>(), &ca_dir).await?;
    let urls: Vec<(String, String)> = nodes.iter().map(|n| (n.ws_url(), n.quic_url())).collect();
    let workload = Workload::start(
        &config,
        &rooms,
        &urls,
        urls.len(),
        &ca_dir,
        nodes.iter().map(NodeProcess::http_addr).collect(),
    );
    workload.wait_joined(Instant::now() + HEALTHY_TIMEOUT).await;
    say(
        start,
        format_args!("{} clients joined {} rooms", config.clients, rooms.len()),
    );

    // 4. Faults.
    let mut rng = SmallRng::seed_from_u64(config.seed);
    let plan = plan_faults(&config, &mut rng);
    let faults_start = Instant::now();
    let mut faults = Vec::with_capacity(plan.len());
    for planned in plan {
        tokio::time::sleep_until(faults_start + planned.offset).await;
        // Never more than one faulty node: the previous fault has healed.
        if let Health::Unhealthy(why) =
            cluster::wait_healthy(&nodes, Instant::now() + HEALTHY_TIMEOUT).await
        {
            violations.push(
                "cluster_healthy",
                format!("not healthy before the next fault: {why}"),
            );
            break;
        }
        let at = Instant::now();
        let mut peer = None;
        let mut not_ready_after_ms = None;
        let name = nodes[planned.node].name.clone();
        match planned.kind {
            FaultKind::Kill => {
                say(
                    start,
                    format_args!("SIGKILL {name} (down {:?})", planned.length),
                );
                let node = &mut nodes[planned.node];
                node.kill().await;
                tokio::time::sleep(planned.length).await;
                if let Err(error) = node.start(&config.chorus_bin, &ca_dir, None).await {
                    violations.push("cluster_healthy", format!("restart failed: {error}"));
                    break;
                }
                say(start, format_args!("restarted {name}"));
            }
            FaultKind::Pause => {
                say(
                    start,
                    format_args!("SIGSTOP {name} (for {:?})", planned.length),
                );
                let node = &mut nodes[planned.node];
                node.signal_stop(true).await?;
                tokio::time::sleep(planned.length).await;
                node.signal_stop(false).await?;
                say(start, format_args!("SIGCONT {name}"));
            }
            FaultKind::Cut | FaultKind::PairCut | FaultKind::OneWayCut => {
                let node = &nodes[planned.node];
                let ip = node.ip;
                let http = node.http_addr();
                let others: Vec<std::net::IpAddr> =
                    nodes.iter().map(|n| n.ip).filter(|a| *a != ip).collect();
                let cut = match planned.kind {
                    FaultKind::PairCut => {
                        let other = &nodes[(planned.node + 1) % nodes.len()];
                        peer = Some(other.name.clone());
                        say(
                            start,
                            format_args!(
                                "cut the links between {name} and {} (for {:?})",
                                other.name, planned.length
                            ),
                        );
                        netcut::LinkCut::between(ip, other.ip).await?
                    }
                    FaultKind::OneWayCut => {
                        say(
                            start,
                            format_args!(
                                "drop what {name} sends to the others (for {:?})",
                                planned.length
                            ),
                        );
                        netcut::LinkCut::one_way(ip, &others).await?
                    }
                    _ => {
                        say(
                            start,
                            format_args!("cut {name}'s links (for {:?})", planned.length),
                        );
                        netcut::LinkCut::isolate(ip, &others).await?
                    }
                };
                let cut_at = Instant::now();
                if matches!(planned.kind, FaultKind::Cut | FaultKind::OneWayCut) {
                    // An isolated node must notice and say so (issue 18: within 5 s).
                    let until = cut_at + planned.length;
                    while Instant::now() < until {
                        if cluster::says_not_ready(http).await {
                            not_ready_after_ms = Some(millis(cut_at.elapsed()));
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    match not_ready_after_ms {
                        Some(ms) if ms <= CUT_OFF_NOTICED_MAX_MS => {}
                        _ if planned.length < Duration::from_millis(CUT_OFF_NOTICED_MAX_MS) => {}
                        other => violations.push(
                            "cut_off_noticed",
                            format!(
                                "{name}, cut off, said it was not ready after {other:?} ms (at most {CUT_OFF_NOTICED_MAX_MS})"
                            ),
                        ),
                    }
                }
                tokio::time::sleep_until(cut_at + planned.length).await;
                cut.heal().await?;
                say(start, format_args!("links of {name} restored"));
            }
        }
        let health = cluster::wait_healthy(&nodes, Instant::now() + HEALTHY_TIMEOUT).await;
        let recovered_after_ms = match &health {
            Health::Healthy => Some(millis(at.elapsed())),
            Health::Unhealthy(why) => {
                violations.push(
                    "cluster_healthy",
                    format!("not healthy {HEALTHY_TIMEOUT:?} after {planned:?} of {name}: {why}"),
                );
                None
            }
        };
        say(
            start,
            format_args!("healthy again {:?} after the fault", at.elapsed()),
        );
        faults.push((
            FaultRecord {
                kind: planned.kind,
                node: name,
                at_ms: millis(at - start),
                duration_ms: millis(planned.length),
                recovered_after_ms,
                clients_disconnected: 0,
                clients_reconnected: 0,
                peer,
                not_ready_after_ms,
            },
            at,
            Instant::now(),
        ));
        if recovered_after_ms.is_none() {
            break;
        }
    }
    tokio::time::sleep_until(faults_start + Duration::from_secs(config.duration_secs)).await;

    // 5. Settle, then check.
    workload.stop_sending();
    say(start, "faults over; workload stopped; settling");
    if let Health::Unhealthy(why) =
        cluster::wait_healthy(&nodes, Instant::now() + HEALTHY_TIMEOUT).await
    {
        violations.push("cluster_healthy", format!("not healthy at the end: {why}"));
    }
    workload
        .wait_quiet(Instant::now() + Duration::from_secs(config.settle_secs))
        .await;
    let outcome = workload
        .finish(start, start_unix_ms, &config.work_dir, &mut violations)
        .await;
    for node in &mut nodes {
        node.kill().await;
    }
    let faults: Vec<FaultRecord> = faults
        .into_iter()
        .map(|(mut record, from, until)| {
            for (disconnects, reconnects) in &outcome.connections {
                if let Some(lost) = disconnects.iter().find(|t| **t >= from && **t <= until) {
                    record.clients_disconnected += 1;
                    if reconnects.iter().any(|t| t >= lost) {
                        record.clients_reconnected += 1;
                    }
                }
            }
            record
        })
        .collect();
    let (counts, monitor) = (outcome.counts, outcome.monitor);

    let report = ChaosReport {
        seed: config.seed,
        replay: config.replay_command(),
        elapsed_ms: millis(start.elapsed()),
        faults,
        counts,
        monitor,
        violation_count: violations.total,
        violations: violations.listed,
        config,
    };
    let path = report.config.work_dir.join("report.json");
    let json = serde_json::to_vec_pretty(&report).map_err(|e| ChaosError::Io {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(&path, json).map_err(|source| ChaosError::Io {
        path: path.clone(),
        source,
    })?;
    say(
        start,
        format_args!(
            "done: {} faults, {} comments acked of {} sent, {} deliveries checked, {} violation(s); report {}",
            report.faults.len(),
            report.counts.comments_acked,
            report.counts.comments_sent,
            report.counts.deliveries_checked,
            report.violation_count,
            path.display()
        ),
    );
    for violation in &report.violations {
        say(
            start,
            format_args!("VIOLATION [{}] {}", violation.invariant, violation.detail),
        );
    }
    if report.violation_count > 0 {
        say(
            start,
            format_args!("seed {}; replay: {}", report.seed, report.replay),
        );
        return Err(ChaosError::Violations {
            count: report.violation_count,
            report: Box::new(report),
        });
    }
    Ok(report)
}

/// Creates the rooms through the nodes in turn, retrying each (bounded).
async fn create_rooms(
    config: &ChaosConfig,
    nodes: &[&NodeProcess],
    ca_dir: &std::path::Path,
) -> Result<Vec<String>, ChaosError> {
    use chorus_node::client::{Client, ClientConfig, ReconnectPolicy};
    let mut creators = Vec::with_capacity(nodes.len());
    for node in nodes {
        let token = chorus_node::token::TokenKeys::new(workload::SECRET.as_bytes())
            .mint(
                &format!("host-{}", node.name),
                &[],
                chorus_node::token::unix_now_secs(),
                3600,
            )
            .map_err(|e| ChaosError::Setup(format!("mint: {e}")))?;
        let mut client_config = ClientConfig::new(node.ws_url(), token);
        client_config.ca_path = Some(ca_dir.join("ca.pem"));
        client_config.reconnect = ReconnectPolicy::disabled();
        let client = Client::connect(client_config)
            .await
            .map_err(|e| ChaosError::Setup(format!("connect to {}: {e}", node.name)))?;
        creators.push(client);
    }
    let mut rooms = Vec::with_capacity(config.rooms);
    for i in 0..config.rooms {
        let creator = &creators[i % creators.len()];
        let mut created = None;
        let mut last_error = String::new();
        for _ in 0..20 {
            match creator
                .request(chorus_protocol::RoomCreateRequest {
                    title: format!("chaos room {i}"),
                    scheduled_start_ms: None,
                })
                .await
            {
                Ok(response) => {
                    created = Some(response.room_id);
                    break;
                }
                Err(error) => {
                    last_error = error.to_string();
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        rooms.push(created.ok_or_else(|| {
            ChaosError::Setup(format!("could not create room {i}: {last_error}"))
        })?);
    }
    for mut creator in creators {
        creator.close().await;
    }
    Ok(rooms)
}

/// The room workload: clients spread over the nodes, each commenting in its rooms, and
/// the monitor sampling every node; started once the rooms exist.
pub(crate) struct Workload {
    clients: Vec<ClientHandle>,
    stop_sending: CancellationToken,
    stop_all: CancellationToken,
    monitor: tokio::task::JoinHandle<()>,
    monitor_state: Arc<Mutex<MonitorState>>,
}

/// What the workload recorded, judged by [`check::check_logs`] and the monitor.
pub(crate) struct WorkloadOutcome {
    /// The clients' counts.
    pub(crate) counts: CheckCounts,
    /// The monitor's counts.
    pub(crate) monitor: MonitorCounts,
    /// Per client: when it lost its connection, and when it got one back.
    pub(crate) connections: Vec<(Vec<Instant>, Vec<Instant>)>,
}

impl Workload {
    /// Starts `config.clients` clients: client i's home is node `i mod homes` (even
    /// clients on WebSocket, odd ones on QUIC; `urls` holds each node's pair), then the
    /// other nodes in turn; and the monitor over `monitor_addrs`.
    pub(crate) fn start(
        config: &ChaosConfig,
        rooms: &[String],
        urls: &[(String, String)],
        homes: usize,
        ca_dir: &std::path::Path,
        monitor_addrs: Vec<SocketAddr>,
    ) -> Workload {
        let stop_sending = CancellationToken::new();
        let stop_all = CancellationToken::new();
        let clients = (0..config.clients)
            .map(|i| {
                let home = i % homes.clamp(1, urls.len());
                let quic = i % 2 == 1;
                let urls = (0..urls.len())
                    .map(|k| {
                        let (ws, q) = &urls[(home + k) % urls.len()];
                        if quic {
                            q.clone()
                        } else {
                            ws.clone()
                        }
                    })
                    .collect();
                workload::spawn_client(
                    ClientSpec {
                        index: i,
                        urls,
                        ca_path: ca_dir.join("ca.pem"),
                        rooms: (0..config.rooms_per_client)
                            .map(|k| rooms[(i + k) % rooms.len()].clone())
                            .collect(),
                        comment_interval_ms: config.comment_interval_ms,
                        seed: config.seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(i as u64 + 1)),
                    },
                    stop_sending.clone(),
                    stop_all.clone(),
                )
            })
            .collect();
        let monitor_state = Arc::new(Mutex::new(MonitorState::default()));
        let monitor = tokio::spawn(run_monitor(
            monitor_addrs,
            rooms.iter().take(MONITORED_ROOMS_MAX).cloned().collect(),
            monitor_state.clone(),
            stop_all.clone(),
        ));
        Workload {
            clients,
            stop_sending,
            stop_all,
            monitor,
            monitor_state,
        }
    }

    /// Waits until every client has joined its rooms (or given up), bounded.
    pub(crate) async fn wait_joined(&self, deadline: Instant) {
        while Instant::now() < deadline {
            let done = self.clients.iter().all(|c| {
                let log = lock(&c.log);
                log.gave_up.is_some() || log.memberships.len() >= c.spec.rooms.len()
            });
            if done {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the clients' sending; they keep receiving.
    pub(crate) fn stop_sending(&self) {
        self.stop_sending.cancel();
    }

    /// Waits until every client is connected (or gave up) and none has received a comment
    /// for [`QUIET_PERIOD`], bounded: a client whose node was killed just before the
    /// workload stopped may still be noticing it (a QUIC idle timeout) and reconnecting.
    pub(crate) async fn wait_quiet(&self, deadline: Instant) {
        let state = || -> (usize, bool) {
            self.clients.iter().fold((0, true), |(received, all), c| {
                let log = lock(&c.log);
                (
                    received + log.received.len(),
                    all && (log.connected || log.gave_up.is_some()),
                )
            })
        };
        let (mut last, _) = state();
        let mut quiet_since = Instant::now();
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let (now, all_connected) = state();
            if now != last || !all_connected {
                last = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= QUIET_PERIOD {
                return;
            }
        }
    }

    /// Stops the clients and the monitor, writes `work_dir/clients.log`, and judges what
    /// they recorded into `violations`.
    pub(crate) async fn finish(
        self,
        start: Instant,
        start_unix_ms: u64,
        work_dir: &std::path::Path,
        violations: &mut Violations,
    ) -> WorkloadOutcome {
        self.stop_sending.cancel();
        self.stop_all.cancel();
        let mut logs = Vec::with_capacity(self.clients.len());
        for client in self.clients {
            logs.push(client.join(Duration::from_secs(5)).await);
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.monitor).await;
        let guards: Vec<_> = logs.iter().map(|(spec, log)| (spec, lock(log))).collect();
        let views: Vec<(ClientSpec, &workload::ClientLog)> = guards
            .iter()
            .map(|(spec, guard)| ((*spec).clone(), &**guard))
            .collect();
        let counts = check::check_logs(&views, start, start_unix_ms, violations);
        let clients_path = work_dir.join("clients.log");
        if let Err(error) = workload::dump_logs(&clients_path, start, start_unix_ms, &views) {
            say(
                start,
                format_args!("cannot write {}: {error}", clients_path.display()),
            );
        }
        let connections = views
            .iter()
            .map(|(_, log)| (log.disconnects.clone(), log.reconnects.clone()))
            .collect();
        let state = self
            .monitor_state
            .lock()
            .expect("the monitor panicked while holding its state");
        for (invariant, detail) in &state.violations {
            violations.push(invariant, detail.clone());
        }
        WorkloadOutcome {
            counts,
            monitor: state.counts(),
            connections,
        }
    }
}

/// What the monitor has seen: leaders per term and owners per (room, ring epoch), from
/// every node's point of view.
#[derive(Debug, Default)]
struct MonitorState {
    leaders: BTreeMap<u64, BTreeSet<u64>>,
    owners: BTreeMap<(String, u64), BTreeSet<u64>>,
    epochs: BTreeSet<u64>,
    status_samples: usize,
    owner_samples: usize,
    violations: Vec<(&'static str, String)>,
}

impl MonitorState {
    fn counts(&self) -> MonitorCounts {
        MonitorCounts {
            status_samples: self.status_samples,
            terms_seen: self.leaders.len(),
            ring_epochs_seen: self.epochs.len(),
            owner_samples: self.owner_samples,
        }
    }
}

/// Every second, asks every node (concurrently, each bounded by the admin timeout) for its
/// status and for the owner of the monitored rooms; flags two leaders in one term and two
/// owners of one room at one ring epoch.
async fn run_monitor(
    addrs: Vec<SocketAddr>,
    rooms: Vec<String>,
    state: Arc<Mutex<MonitorState>>,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let mut tasks = tokio::task::JoinSet::new();
        for addr in &addrs {
            let addr = *addr;
            let rooms = rooms.clone();
            tasks.spawn(async move {
                let status = cluster::admin_get(addr, "/admin/status").await;
                let mut owners = Vec::new();
                if status.is_some() {
                    for room in rooms {
                        if let Some(answer) =
                            cluster::admin_get(addr, &format!("/admin/where?key={room}")).await
                        {
                            owners.push((room, answer));
                        }
                    }
                }
                (addr, status, owners)
            });
        }
        while let Some(Ok((addr, status, owners))) = tasks.join_next().await {
            let mut state = state
                .lock()
                .expect("the monitor panicked while holding its state");
            if let Some(status) = status {
                state.status_samples += 1;
                if let (Some(term), Some(leader)) =
                    (status["term"].as_u64(), status["leader"].as_u64())
                {
                    let leaders = state.leaders.entry(term).or_default();
                    if leaders.insert(leader) && leaders.len() == 2 {
                        let detail =
                            format!("term {term} has two leaders {leaders:?} (seen from {addr})");
                        state.violations.push(("one_leader", detail));
                    }
                }
                if let Some(epoch) = status["ring_epoch"].as_u64() {
                    state.epochs.insert(epoch);
                }
            }
            for (room, answer) in owners {
                state.owner_samples += 1;
                if let (Some(epoch), Some(owner)) =
                    (answer["ring_epoch"].as_u64(), answer["owner"].as_u64())
                {
                    let key = (room.clone(), epoch);
                    let owners = state.owners.entry(key).or_default();
                    if owners.insert(owner) && owners.len() == 2 {
                        let detail = format!(
                            "room {room} has two owners {owners:?} at ring epoch {epoch} (seen from {addr})"
                        );
                        state.violations.push(("one_owner", detail));
                    }
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
