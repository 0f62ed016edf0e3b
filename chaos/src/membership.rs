//! The membership scenario: nodes join, leave (drain, remove, stop), are replaced (killed
//! and removed while down) and are killed and restarted, several of these at once, while
//! the room workload runs; then the room invariants plus the membership ones:
//!
//! - `ids_unique`: every node process started with a fresh data dir got an id no other
//!   ever had, and kept it across restarts;
//! - `members_up` / `cluster_healthy`: after every wave and at the end, every node that
//!   should be a member answers, is `up` and ready, and every one of them sees exactly
//!   those members, one leader and one ring epoch;
//! - `drain_moves_rooms`: a drained node owns no room once its drain is applied;
//! - `removed`: a removed node disappears from the members;
//! - `stops_bounded`: a removed node stops within its drain deadline plus 5 s of SIGTERM.
//!
//! The schedule is a pure function of the seed: `waves` rounds, each with at most one
//! member leaving for good (a leave or a replacement: two at once could take two of three
//! Raft voters, which no cluster survives), a leave half the time together with a kill and
//! restart of another member (or a kill alone), and up to two joins, each starting within the
//! wave's first 3 s (the second one, half the time, through the first, which is itself
//! still joining). Members stay between 3 and `members_max`. At most one member crashes
//! per wave (a kill, or the kill that starts a replacement): a room's state is on two
//! nodes, its owner and its replica, which survives one crash at a time, not two at once.
//! The wave after runs once the cluster is healthy again.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::check::{CheckCounts, Violation, Violations};
use crate::cluster::{self, admin_get, admin_post, Health, NodeProcess};
use crate::{
    create_rooms, millis, say, unix_ms_now, ChaosConfig, ChaosError, MonitorCounts, Workload,
};

/// Most addresses (slots) a run uses; a removed node's slot is reused by a later joiner.
pub const SLOTS_MAX: usize = 8;
/// How long a wave's cluster may take to be healthy once its operations are done.
const WAVE_HEALTHY_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest wait for one step of an operation (the drain applied, the rooms moved, a
/// removal applied, a killed node seen down).
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a start may take to print its ready line: a joiner prints it once it is a
/// member, and its join may wait for a killed seed to come back.
const JOIN_READY_TIMEOUT: Duration = Duration::from_secs(90);
/// A joiner starts up to this long after its wave began.
const JOIN_DELAY_MAX_MS: u64 = 3_000;

/// What a membership run does. [`MembershipConfig::new`] gives the defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MembershipConfig {
    /// The room workload and the run's basics: `nodes` is the number of members at the
    /// start, `base_ip` the first slot's address, `down_ms` how long a killed node stays
    /// down; `duration_secs`, `kills`, `pauses` and `cuts` are not used.
    pub base: ChaosConfig,
    /// Rounds of concurrent operations. Default 6.
    pub waves: usize,
    /// Most members at once, 3-5. Default 5.
    pub members_max: usize,
    /// Addresses available (a slot is free again once its node was removed). Default 6.
    pub slots: usize,
    /// `--drain-timeout` of every node, in milliseconds. Default 10,000.
    pub drain_timeout_ms: u64,
    /// Pause between two waves (the workload runs on), in milliseconds. Default 2,000.
    pub wave_gap_ms: u64,
}

impl MembershipConfig {
    /// The defaults: 3 members at the start (at most 5), 6 slots, 6 waves, the room
    /// workload of [`ChaosConfig::new`] on base `127.0.3.11`.
    pub fn new(chorus_bin: PathBuf, work_dir: PathBuf, seed: u64) -> MembershipConfig {
        let mut base = ChaosConfig::new(chorus_bin, work_dir, seed);
        base.base_ip = Ipv4Addr::new(127, 0, 3, 11);
        base.kills = 0;
        base.pauses = 0;
        MembershipConfig {
            base,
            waves: 6,
            members_max: 5,
            slots: 6,
            drain_timeout_ms: 10_000,
            wave_gap_ms: 2_000,
        }
    }

    /// The `chorus-chaos` command line that repeats this run's schedule.
    pub fn replay_command(&self) -> String {
        format!(
            "chorus-chaos --scenario membership --chorus {} --seed {} --nodes {} --waves {} --members-max {} --slots {} --rooms {} --clients {} --rooms-per-client {} --comment-interval-ms {} --base-ip {} --drain-timeout-ms {} --wave-gap-ms {}",
            self.base.chorus_bin.display(),
            self.base.seed,
            self.base.nodes,
            self.waves,
            self.members_max,
            self.slots,
            self.base.rooms,
            self.base.clients,
            self.base.rooms_per_client,
            self.base.comment_interval_ms,
            self.base.base_ip,
            self.drain_timeout_ms,
            self.wave_gap_ms
        )
    }

    fn validate(&self) -> Result<(), ChaosError> {
        let bad = |why: &str| Err(ChaosError::Config(why.to_string()));
        if !(3..=5).contains(&self.members_max) {
            return bad("members max must be 3-5");
        }
        if self.base.nodes < 3 || self.base.nodes > self.members_max {
            return bad("nodes (members at the start) must be 3..=members max");
        }
        if self.slots <= self.members_max || self.slots > SLOTS_MAX {
            return bad("slots must be more than members max and at most 8");
        }
        if self.base.rooms == 0 || self.base.clients == 0 || self.base.rooms_per_client == 0 {
            return bad("rooms, clients and rooms per client must be at least 1");
        }
        if self.base.rooms_per_client > self.base.rooms {
            return bad("rooms per client must be at most rooms");
        }
        if self.base.down_ms.0 > self.base.down_ms.1 {
            return bad("the down range must be low..high");
        }
        let octets = self.base.base_ip.octets();
        if octets[0] != 127 || usize::from(octets[3]) + self.slots > 255 {
            return bad("base ip must be a 127.x.y.z address with room for every slot");
        }
        if !self.base.chorus_bin.is_file() {
            return Err(ChaosError::Config(format!(
                "no chorus binary at {} (build it: cargo build --release --bin chorus)",
                self.base.chorus_bin.display()
            )));
        }
        Ok(())
    }
}

/// Kind of a membership operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// A new node (fresh data dir) joins.
    Join,
    /// `admin drain`, rooms move, `admin remove`, SIGTERM; the slot is free again.
    Leave,
    /// SIGKILL, `admin remove` while it is down; the data dir is gone with the machine.
    Replace,
    /// SIGKILL, then restart with the same data dir after the down time.
    Kill,
}

/// One operation, as it happened.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpRecord {
    /// The wave it belonged to (from 1).
    pub wave: usize,
    /// What it was.
    pub kind: OpKind,
    /// The node's name.
    pub node: String,
    /// The node's id (for a join: the one it got).
    pub id: Option<u64>,
    /// For a join: the address it was told to join through, and whether that node was
    /// itself joining at that moment.
    pub via: Option<String>,
    /// When it began, in milliseconds since the run started.
    pub at_ms: u64,
    /// How long it took, in milliseconds.
    pub took_ms: u64,
    /// For a leave: how long the node took to exit after SIGTERM, and its exit code.
    pub stop: Option<(u64, Option<i32>)>,
    /// Whether it completed; else why not (also listed as a violation).
    pub outcome: String,
}

/// The outcome of a membership run, also written to `work_dir/report.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MembershipReport {
    /// The seed.
    pub seed: u64,
    /// The command line that replays the schedule.
    pub replay: String,
    /// The configuration.
    pub config: MembershipConfig,
    /// Wall time of the whole run, in milliseconds.
    pub elapsed_ms: u64,
    /// Operations, in the order they finished within each wave.
    pub ops: Vec<OpRecord>,
    /// Every node process with a fresh data dir, and the id it got.
    pub ids: BTreeMap<String, u64>,
    /// The members at the end (ids).
    pub final_members: Vec<u64>,
    /// The ring epoch all members agreed on at the end.
    pub final_ring_epoch: Option<u64>,
    /// Workload counts.
    pub counts: CheckCounts,
    /// Monitor counts.
    pub monitor: MonitorCounts,
    /// Violations (at most `check::VIOLATIONS_LISTED_MAX` listed).
    pub violations: Vec<Violation>,
    /// All violations, listed or not.
    pub violation_count: usize,
}

/// One planned wave.
#[derive(Debug, Clone, Default)]
struct WavePlan {
    /// The disruptive operation and its target slot.
    disrupt: Option<(OpKind, usize)>,
    /// With a leave, sometimes a kill of another member at the same time (it comes back,
    /// so a quorum always returns; never with a replacement, which is a crash already).
    also_kill: Option<usize>,
    /// New nodes: their slot, whether to join through the wave's first joiner, and how
    /// long after the wave's start (so that joins land while a node is down or draining).
    joins: Vec<(usize, bool, Duration)>,
    /// The slot every joiner that does not join through the first joiner uses as seed.
    seed_slot: usize,
    /// For a kill: how long the node stays down.
    down: Duration,
}

/// Plans one wave from the members (slots) before it. Pure: the seed fixes every wave.
fn plan_wave(config: &MembershipConfig, members: &BTreeSet<usize>, rng: &mut SmallRng) -> WavePlan {
    let member_list: Vec<usize> = members.iter().copied().collect();
    let m = members.len();
    let mut kinds = vec![None, Some(OpKind::Kill)];
    if m > 3 {
        kinds.extend([Some(OpKind::Leave), Some(OpKind::Replace)]);
    }
    let mut disrupt = kinds
        .choose(rng)
        .copied()
        .flatten()
        .map(|kind| (kind, *member_list.choose(rng).unwrap_or(&0)));
    let capacity = config.members_max - m;
    let mut join_count = rng.random_range(0..=capacity.min(2));
    if disrupt.is_none() && join_count == 0 {
        let target = *member_list.choose(rng).unwrap_or(&0);
        if capacity > 0 {
            join_count = 1;
        } else if m > 3 {
            disrupt = Some((OpKind::Leave, target));
        } else {
            disrupt = Some((OpKind::Kill, target));
        }
    }
    let also_kill = match disrupt {
        // A replacement starts with a kill: a second crash at the same moment could take a
        // room's owner and its replica together.
        Some((OpKind::Leave, target)) if rng.random_bool(0.5) => member_list
            .iter()
            .copied()
            .filter(|s| *s != target)
            .collect::<Vec<_>>()
            .choose(rng)
            .copied(),
        _ => None,
    };
    let free: Vec<usize> = (0..config.slots).filter(|s| !members.contains(s)).collect();
    let joins = free
        .iter()
        .take(join_count)
        .enumerate()
        .map(|(i, slot)| {
            (
                *slot,
                i > 0 && rng.random_bool(0.5),
                Duration::from_millis(rng.random_range(0..=JOIN_DELAY_MAX_MS)),
            )
        })
        .collect();
    // Join through any member but the one leaving or being replaced (a killed one comes
    // back; joins wait for it).
    let seeds: Vec<usize> = member_list
        .iter()
        .copied()
        .filter(|s| !matches!(disrupt, Some((OpKind::Leave | OpKind::Replace, t)) if t == *s))
        .collect();
    let (low, high) = config.base.down_ms;
    WavePlan {
        disrupt,
        also_kill,
        joins,
        seed_slot: *seeds.choose(rng).unwrap_or(&member_list[0]),
        down: Duration::from_millis(rng.random_range(low..=high)),
    }
}

/// One address of the run, and the node on it.
struct Slot {
    ip: IpAddr,
    /// Incarnations started on it so far (names `n{slot}`, `n{slot}-2`, …).
    incarnations: usize,
    /// The node, while this slot is a member (or joining).
    node: Option<NodeProcess>,
    /// Its id, once known.
    id: Option<u64>,
}

/// What a wave's operation hands back.
struct OpDone {
    slot: usize,
    node: Option<NodeProcess>,
    id: Option<u64>,
    record: OpRecord,
    violations: Vec<(&'static str, String)>,
}

/// Everything an operation needs besides its node.
#[derive(Clone)]
struct OpContext {
    chorus_bin: PathBuf,
    ca_dir: PathBuf,
    /// HTTP addresses of members not disturbed in this wave (admin calls go there).
    steady: Vec<SocketAddr>,
    rooms: Vec<String>,
    drain_timeout: Duration,
    start: Instant,
    wave: usize,
}

impl OpContext {
    fn record(&self, kind: OpKind, node: &str, began: Instant) -> OpRecord {
        OpRecord {
            wave: self.wave,
            kind,
            node: node.to_string(),
            id: None,
            via: None,
            at_ms: millis(began - self.start),
            took_ms: 0,
            stop: None,
            outcome: String::new(),
        }
    }

    /// POSTs `path` to the steady members in turn until one accepts, bounded.
    async fn post(&self, path: &str) -> bool {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while Instant::now() < deadline {
            for addr in &self.steady {
                if admin_post(*addr, path).await.is_some() {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        false
    }

    /// Polls the steady members' `/admin/status` until `done` holds for one that answers,
    /// bounded.
    async fn wait_status(&self, done: impl Fn(&serde_json::Value) -> bool) -> bool {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while Instant::now() < deadline {
            for addr in &self.steady {
                if let Some(status) = admin_get(*addr, "/admin/status").await {
                    if done(&status) {
                        return true;
                    }
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    /// Waits until no room's ownership (as a steady member sees it) is at node `id`.
    async fn wait_rooms_moved(&self, id: u64) -> Result<(), String> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let mut stuck = Vec::new();
        while Instant::now() < deadline {
            stuck.clear();
            let Some(addr) = self.steady.first() else {
                return Err("no steady member to ask".into());
            };
            for room in &self.rooms {
                match admin_get(*addr, &format!("/admin/where?key={room}")).await {
                    Some(answer) if answer["ownership"]["node"].as_u64() == Some(id) => {
                        stuck.push(room.clone())
                    }
                    Some(answer) if answer["owner"].as_u64() == Some(id) => {
                        stuck.push(room.clone())
                    }
                    Some(_) => {}
                    None => stuck.push(format!("{room} (no answer)")),
                }
            }
            if stuck.is_empty() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(format!("still at node {id}: {stuck:?}"))
    }
}

fn member_state(status: &serde_json::Value, id: u64) -> Option<String> {
    status["members"].as_array().and_then(|members| {
        members
            .iter()
            .find(|m| m["id"].as_u64() == Some(id))
            .map(|m| m["state"].as_str().unwrap_or("?").to_string())
    })
}

async fn self_id(node: &NodeProcess) -> Option<u64> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while Instant::now() < deadline {
        if let Some(id) = node
            .admin("/admin/status")
            .await
            .and_then(|s| s["self"].as_u64())
        {
            return Some(id);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

async fn op_join(
    ctx: OpContext,
    slot: usize,
    mut node: NodeProcess,
    via: SocketAddr,
    via_joining: bool,
) -> OpDone {
    let began = Instant::now();
    let mut record = ctx.record(OpKind::Join, &node.name, began);
    record.via = Some(format!(
        "{via}{}",
        if via_joining { " (joining itself)" } else { "" }
    ));
    let mut violations = Vec::new();
    let mut id = None;
    match node.start(&ctx.chorus_bin, &ctx.ca_dir, Some(via)).await {
        Ok(()) => {
            id = self_id(&node).await;
            record.outcome = match id {
                Some(_) => "ok".into(),
                None => {
                    violations.push(("members_up", format!("{} answers no status", node.name)));
                    "no status".into()
                }
            };
        }
        Err(error) => {
            violations.push(("members_up", format!("join of {}: {error}", node.name)));
            record.outcome = error.to_string();
        }
    }
    record.id = id;
    record.took_ms = millis(began.elapsed());
    OpDone {
        slot,
        node: Some(node),
        id,
        record,
        violations,
    }
}

async fn op_kill(
    ctx: OpContext,
    slot: usize,
    mut node: NodeProcess,
    id: u64,
    down: Duration,
) -> OpDone {
    let began = Instant::now();
    let mut record = ctx.record(OpKind::Kill, &node.name, began);
    record.id = Some(id);
    let mut violations = Vec::new();
    node.kill().await;
    tokio::time::sleep(down).await;
    match node.start(&ctx.chorus_bin, &ctx.ca_dir, None).await {
        Ok(()) => match self_id(&node).await {
            Some(again) if again == id => record.outcome = "ok".into(),
            other => {
                violations.push((
                    "ids_unique",
                    format!("{} had id {id}, after a restart {other:?}", node.name),
                ));
                record.outcome = format!("id changed to {other:?}");
            }
        },
        Err(error) => {
            violations.push(("members_up", format!("restart of {}: {error}", node.name)));
            record.outcome = error.to_string();
        }
    }
    record.took_ms = millis(began.elapsed());
    OpDone {
        slot,
        node: Some(node),
        id: Some(id),
        record,
        violations,
    }
}

async fn op_leave(ctx: OpContext, slot: usize, mut node: NodeProcess, id: u64) -> OpDone {
    let began = Instant::now();
    let mut record = ctx.record(OpKind::Leave, &node.name, began);
    record.id = Some(id);
    let mut violations = Vec::new();
    let outcome = async {
        if !ctx.post(&format!("/admin/drain?node={id}")).await {
            return Err(("removed", format!("no member accepted the drain of {id}")));
        }
        if !ctx
            .wait_status(|s| member_state(s, id).as_deref() == Some("draining"))
            .await
        {
            return Err(("removed", format!("node {id} never seen draining")));
        }
        if let Err(why) = ctx.wait_rooms_moved(id).await {
            // Not fatal to the operation: the removal goes on, the violation stays.
            violations.push(("drain_moves_rooms", format!("{}: {why}", node.name)));
        }
        if !ctx.post(&format!("/admin/remove?node={id}")).await {
            return Err(("removed", format!("no member accepted the removal of {id}")));
        }
        if !ctx.wait_status(|s| member_state(s, id).is_none()).await {
            return Err(("removed", format!("node {id} still a member after removal")));
        }
        Ok(())
    }
    .await;
    record.outcome = match outcome {
        Ok(()) => "ok".into(),
        Err((invariant, why)) => {
            violations.push((invariant, why.clone()));
            why
        }
    };
    let limit = ctx.drain_timeout + Duration::from_secs(5);
    match node.terminate(limit).await {
        Some((code, took)) => record.stop = Some((millis(took), code)),
        None => violations.push((
            "stops_bounded",
            format!("{} did not exit within {limit:?} of SIGTERM", node.name),
        )),
    }
    let _ = std::fs::remove_dir_all(node.data_dir());
    record.took_ms = millis(began.elapsed());
    OpDone {
        slot,
        node: None,
        id: Some(id),
        record,
        violations,
    }
}

async fn op_replace(ctx: OpContext, slot: usize, mut node: NodeProcess, id: u64) -> OpDone {
    let began = Instant::now();
    let mut record = ctx.record(OpKind::Replace, &node.name, began);
    record.id = Some(id);
    let mut violations = Vec::new();
    node.kill().await;
    let _ = std::fs::remove_dir_all(node.data_dir());
    let outcome = async {
        if !ctx
            .wait_status(|s| member_state(s, id).as_deref() == Some("down"))
            .await
        {
            return Err(format!("killed node {id} never seen down"));
        }
        if !ctx.post(&format!("/admin/remove?node={id}")).await {
            return Err(format!("no member accepted the removal of {id}"));
        }
        if !ctx.wait_status(|s| member_state(s, id).is_none()).await {
            return Err(format!("node {id} still a member after removal"));
        }
        Ok(())
    }
    .await;
    record.outcome = match outcome {
        Ok(()) => "ok".into(),
        Err(why) => {
            violations.push(("removed", why.clone()));
            why
        }
    };
    record.took_ms = millis(began.elapsed());
    OpDone {
        slot,
        node: None,
        id: Some(id),
        record,
        violations,
    }
}

/// Polls every expected member once: each answers, is ready, sees exactly `expected` as
/// members, all up, a leader among them, and all see one leader and one ring epoch.
async fn membership_health(nodes: &[&NodeProcess], expected: &BTreeSet<u64>) -> (Health, u64) {
    let mut epochs = BTreeSet::new();
    let mut leaders = BTreeSet::new();
    for node in nodes {
        let Some(status) = node.admin("/admin/status").await else {
            return (
                Health::Unhealthy(format!("{} does not answer /admin/status", node.name)),
                0,
            );
        };
        let members = status["members"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let seen: BTreeSet<u64> = members.iter().filter_map(|m| m["id"].as_u64()).collect();
        if &seen != expected {
            return (
                Health::Unhealthy(format!(
                    "{} sees members {seen:?}, want {expected:?}",
                    node.name
                )),
                0,
            );
        }
        if let Some(m) = members.iter().find(|m| m["state"] != "up") {
            return (
                Health::Unhealthy(format!(
                    "{} sees member {} {}",
                    node.name, m["id"], m["state"]
                )),
                0,
            );
        }
        if status["ready"] != true {
            return (
                Health::Unhealthy(format!(
                    "{} is not ready: {}",
                    node.name, status["not_ready"]
                )),
                0,
            );
        }
        match status["leader"].as_u64() {
            Some(leader) if expected.contains(&leader) => {
                leaders.insert(leader);
            }
            other => {
                return (
                    Health::Unhealthy(format!("{} sees leader {other:?}", node.name)),
                    0,
                )
            }
        }
        epochs.insert(status["ring_epoch"].as_u64().unwrap_or(0));
    }
    if leaders.len() > 1 {
        return (
            Health::Unhealthy(format!("members see different leaders: {leaders:?}")),
            0,
        );
    }
    if epochs.len() > 1 {
        return (
            Health::Unhealthy(format!("members see different ring epochs: {epochs:?}")),
            0,
        );
    }
    (Health::Healthy, epochs.into_iter().next().unwrap_or(0))
}

/// Polls [`membership_health`] until healthy or `deadline`; the last judgement and the
/// agreed ring epoch.
async fn wait_members(slots: &[Slot], deadline: Instant) -> (Health, u64) {
    loop {
        let nodes: Vec<&NodeProcess> = slots.iter().filter_map(|s| s.node.as_ref()).collect();
        let expected: BTreeSet<u64> = slots
            .iter()
            .filter(|s| s.node.is_some())
            .filter_map(|s| s.id)
            .collect();
        let judged = if expected.len() == nodes.len() {
            membership_health(&nodes, &expected).await
        } else {
            (Health::Unhealthy("a member's id is not known".into()), 0)
        };
        if judged.0 == Health::Healthy || Instant::now() >= deadline {
            return judged;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn slot_ip(base: Ipv4Addr, slot: usize) -> IpAddr {
    let o = base.octets();
    IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], o[3] + slot as u8))
}

fn new_incarnation(config: &MembershipConfig, slots: &mut [Slot], slot: usize) -> NodeProcess {
    let entry = &mut slots[slot];
    entry.incarnations += 1;
    let name = if entry.incarnations == 1 {
        format!("n{}", slot + 1)
    } else {
        format!("n{}-{}", slot + 1, entry.incarnations)
    };
    let mut node = NodeProcess::new(name, entry.ip, &config.base.work_dir);
    node.ready_timeout = JOIN_READY_TIMEOUT;
    node.extra_args = vec![
        "--drain-timeout".into(),
        format!("{}ms", config.drain_timeout_ms),
    ];
    node
}

/// Runs one membership run; see the module documentation. Returns the report, or
/// [`ChaosError::MembershipViolations`] (with the report) if an invariant failed. Every
/// node process is killed before it returns.
pub async fn run_membership(config: MembershipConfig) -> Result<MembershipReport, ChaosError> {
    config.validate()?;
    let start = Instant::now();
    let start_unix_ms = unix_ms_now();
    say(
        start,
        format_args!(
            "membership seed {}; replay: {}",
            config.base.seed,
            config.replay_command()
        ),
    );
    let ca_dir = cluster::prepare_work_dir(&config.base.chorus_bin, &config.base.work_dir).await?;
    let bin = config.base.chorus_bin.clone();
    let mut violations = Violations::default();
    let mut slots: Vec<Slot> = (0..config.slots)
        .map(|i| Slot {
            ip: slot_ip(config.base.base_ip, i),
            incarnations: 0,
            node: None,
            id: None,
        })
        .collect();
    // Every id ever given, and to whom.
    let mut ids: BTreeMap<String, u64> = BTreeMap::new();
    let mut record_id = |name: &str, id: u64, violations: &mut Violations| {
        if let Some((other, _)) = ids.iter().find(|(n, i)| **i == id && n.as_str() != name) {
            violations.push(
                "ids_unique",
                format!("{name} got id {id}, which {other} had"),
            );
        }
        ids.insert(name.to_string(), id);
    };

    // 1. The first members, started one after another (the formation test covers starting
    //    them together).
    let seed_addr = SocketAddr::new(slots[0].ip, cluster::CLUSTER_PORT);
    for slot in 0..config.base.nodes {
        let mut node = new_incarnation(&config, &mut slots, slot);
        node.start(&bin, &ca_dir, (slot > 0).then_some(seed_addr))
            .await?;
        let id = self_id(&node)
            .await
            .ok_or_else(|| ChaosError::Setup(format!("{} answers no status", node.name)))?;
        record_id(&node.name, id, &mut violations);
        say(
            start,
            format_args!("started {} on {} as {id}", node.name, node.ip),
        );
        slots[slot].node = Some(node);
        slots[slot].id = Some(id);
    }
    if let (Health::Unhealthy(why), _) =
        wait_members(&slots, Instant::now() + WAVE_HEALTHY_TIMEOUT).await
    {
        return Err(ChaosError::Setup(format!(
            "the cluster did not converge: {why}"
        )));
    }
    say(start, "cluster healthy");

    // 2. Rooms and the workload. Clients live on the first members and fail over to every
    //    slot's address.
    let rooms = {
        let nodes: Vec<&NodeProcess> = slots.iter().filter_map(|s| s.node.as_ref()).collect();
        create_rooms(&config.base, &nodes, &ca_dir).await?
    };
    let urls: Vec<(String, String)> = slots
        .iter()
        .map(|s| {
            (
                format!("ws://{}/ws", SocketAddr::new(s.ip, cluster::HTTP_PORT)),
                format!("quic://{}", SocketAddr::new(s.ip, cluster::QUIC_PORT)),
            )
        })
        .collect();
    let workload = Workload::start(
        &config.base,
        &rooms,
        &urls,
        config.base.nodes,
        &ca_dir,
        slots
            .iter()
            .map(|s| SocketAddr::new(s.ip, cluster::HTTP_PORT))
            .collect(),
    );
    workload
        .wait_joined(Instant::now() + WAVE_HEALTHY_TIMEOUT)
        .await;
    say(
        start,
        format_args!(
            "{} clients joined {} rooms",
            config.base.clients,
            rooms.len()
        ),
    );

    // 3. Waves.
    let mut rng = SmallRng::seed_from_u64(config.base.seed);
    let mut ops = Vec::new();
    for wave in 1..=config.waves {
        let members: BTreeSet<usize> = (0..slots.len())
            .filter(|s| slots[*s].node.is_some())
            .collect();
        let plan = plan_wave(&config, &members, &mut rng);
        let disturbed: Vec<usize> = plan
            .disrupt
            .map(|(_, slot)| slot)
            .into_iter()
            .chain(plan.also_kill)
            .collect();
        let ctx = OpContext {
            chorus_bin: bin.clone(),
            ca_dir: ca_dir.clone(),
            steady: members
                .iter()
                .filter(|s| !disturbed.contains(s))
                .map(|s| SocketAddr::new(slots[*s].ip, cluster::HTTP_PORT))
                .collect(),
            rooms: rooms.clone(),
            drain_timeout: Duration::from_millis(config.drain_timeout_ms),
            start,
            wave,
        };
        let mut tasks = tokio::task::JoinSet::new();
        let mut summary = Vec::new();
        if let Some((kind, slot)) = plan.disrupt {
            let node = slots[slot].node.take().expect("a member slot has its node");
            let id = slots[slot].id.expect("a member has an id");
            summary.push(format!("{kind:?} {}", node.name));
            let ctx = ctx.clone();
            match kind {
                OpKind::Kill => tasks.spawn(op_kill(ctx, slot, node, id, plan.down)),
                OpKind::Leave => tasks.spawn(op_leave(ctx, slot, node, id)),
                OpKind::Replace => tasks.spawn(op_replace(ctx, slot, node, id)),
                OpKind::Join => unreachable!("a join is never the disruptive operation"),
            };
        }
        if let Some(slot) = plan.also_kill {
            let node = slots[slot].node.take().expect("a member slot has its node");
            let id = slots[slot].id.expect("a member has an id");
            summary.push(format!("Kill {}", node.name));
            tasks.spawn(op_kill(ctx.clone(), slot, node, id, plan.down));
        }
        let seed_addr = SocketAddr::new(slots[plan.seed_slot].ip, cluster::CLUSTER_PORT);
        let first_joiner = plan
            .joins
            .first()
            .map(|(slot, _, _)| SocketAddr::new(slots[*slot].ip, cluster::CLUSTER_PORT));
        for (slot, through_first, delay) in plan.joins.iter().copied() {
            let node = new_incarnation(&config, &mut slots, slot);
            let via = match (through_first, first_joiner) {
                (true, Some(first)) => first,
                _ => seed_addr,
            };
            summary.push(format!("Join {} via {via} after {delay:?}", node.name));
            let ctx = ctx.clone();
            tasks.spawn(async move {
                tokio::time::sleep(delay).await;
                op_join(ctx, slot, node, via, through_first).await
            });
        }
        say(start, format_args!("wave {wave}: {}", summary.join(", ")));
        while let Some(done) = tasks.join_next().await {
            let done = match done {
                Ok(done) => done,
                Err(error) => {
                    violations.push("harness", format!("an operation panicked: {error}"));
                    continue;
                }
            };
            for (invariant, detail) in done.violations {
                violations.push(invariant, detail);
            }
            if done.record.kind == OpKind::Join {
                if let Some(id) = done.id {
                    record_id(&done.record.node, id, &mut violations);
                }
            }
            say(
                start,
                format_args!(
                    "  {:?} {} ({:?}) {} in {} ms{}",
                    done.record.kind,
                    done.record.node,
                    done.id,
                    done.record.outcome,
                    done.record.took_ms,
                    done.record
                        .stop
                        .map(|(ms, code)| format!("; exited {code:?} {ms} ms after SIGTERM"))
                        .unwrap_or_default()
                ),
            );
            slots[done.slot].node = done.node;
            slots[done.slot].id = done.id.filter(|_| slots[done.slot].node.is_some());
            ops.push(done.record);
        }
        let (health, epoch) = wait_members(&slots, Instant::now() + WAVE_HEALTHY_TIMEOUT).await;
        match health {
            Health::Healthy => say(
                start,
                format_args!(
                    "wave {wave} settled: members {:?}, ring epoch {epoch}",
                    slots
                        .iter()
                        .filter(|s| s.node.is_some())
                        .filter_map(|s| s.id)
                        .collect::<Vec<_>>()
                ),
            ),
            Health::Unhealthy(why) => {
                violations.push(
                    "cluster_healthy",
                    format!("not healthy {WAVE_HEALTHY_TIMEOUT:?} after wave {wave}: {why}"),
                );
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(config.wave_gap_ms)).await;
    }

    // 4. Settle, then check.
    workload.stop_sending();
    say(start, "waves over; workload stopped; settling");
    let (health, final_epoch) = wait_members(&slots, Instant::now() + WAVE_HEALTHY_TIMEOUT).await;
    let final_ring_epoch = match health {
        Health::Healthy => Some(final_epoch),
        Health::Unhealthy(why) => {
            violations.push("cluster_healthy", format!("not healthy at the end: {why}"));
            None
        }
    };
    workload
        .wait_quiet(Instant::now() + Duration::from_secs(config.base.settle_secs))
        .await;
    let outcome = workload
        .finish(start, start_unix_ms, &config.base.work_dir, &mut violations)
        .await;
    let final_members = slots
        .iter()
        .filter(|s| s.node.is_some())
        .filter_map(|s| s.id)
        .collect();
    for slot in &mut slots {
        if let Some(node) = slot.node.as_mut() {
            node.kill().await;
        }
    }
    let report = MembershipReport {
        seed: config.base.seed,
        replay: config.replay_command(),
        elapsed_ms: millis(start.elapsed()),
        ops,
        ids,
        final_members,
        final_ring_epoch,
        counts: outcome.counts,
        monitor: outcome.monitor,
        violation_count: violations.total,
        violations: violations.listed,
        config,
    };
    write_report(&report.config.base.work_dir, &report)?;
    say(
        start,
        format_args!(
            "done: {} operations in {} waves, {} ids, {} comments acked of {} sent, {} deliveries checked, {} violation(s)",
            report.ops.len(),
            report.config.waves,
            report.ids.len(),
            report.counts.comments_acked,
            report.counts.comments_sent,
            report.counts.deliveries_checked,
            report.violation_count,
        ),
    );
    for violation in &report.violations {
        say(
            start,
            format_args!("VIOLATION [{}] {}", violation.invariant, violation.detail),
        );
    }
    if report.violation_count > 0 {
        say(start, format_args!("replay: {}", report.replay));
        return Err(ChaosError::MembershipViolations {
            report: Box::new(report),
        });
    }
    Ok(report)
}

fn write_report(work_dir: &Path, report: &MembershipReport) -> Result<(), ChaosError> {
    let path = work_dir.join("report.json");
    let json = serde_json::to_vec_pretty(report).map_err(|e| ChaosError::Io {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(&path, json).map_err(|source| ChaosError::Io { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> MembershipConfig {
        MembershipConfig::new(PathBuf::from("/bin/true"), PathBuf::from("/tmp/x"), 1)
    }

    #[test]
    fn a_wave_keeps_members_between_three_and_the_maximum() {
        let config = config();
        for seed in 0..200 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut members: BTreeSet<usize> = (0..3).collect();
            for _ in 0..10 {
                let plan = plan_wave(&config, &members, &mut rng);
                assert!(plan.disrupt.is_some() || !plan.joins.is_empty());
                for (slot, _, _) in &plan.joins {
                    assert!(!members.contains(slot), "a joiner takes a free slot");
                }
                if let Some(other) = plan.also_kill {
                    assert!(members.contains(&other));
                    assert_ne!(Some(other), plan.disrupt.map(|(_, s)| s));
                }
                if let Some((kind, slot)) = plan.disrupt {
                    assert!(members.contains(&slot));
                    if matches!(kind, OpKind::Leave | OpKind::Replace) {
                        assert_ne!(plan.seed_slot, slot, "never join through a leaving node");
                        members.remove(&slot);
                    }
                }
                members.extend(plan.joins.iter().map(|(s, _, _)| *s));
                assert!(
                    (3..=config.members_max).contains(&members.len()),
                    "{members:?}"
                );
            }
        }
    }
}
