//! `chorus-chaos`: one chaos run from the command line; see `chaos/README.md`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use chorus_chaos::{ChaosConfig, ChaosError};
use clap::Parser;

/// Run Chorus nodes under seeded faults and check the invariants.
#[derive(Debug, Parser)]
#[command(name = "chorus-chaos", version)]
struct Args {
    /// `rooms` (comments, kills, pauses, cuts; the default), `rain` (a red-packet rain
    /// under a SIGKILL of the pool's node and a pause of another, then the audit) or
    /// `membership` (nodes join, leave, are replaced and killed, several at once, under the
    /// room workload) or `voice` (users send voice messages in chunks and sync on a second
    /// device while nodes are killed, restarted and paused; `--clients` is the number of
    /// users, default 12).
    #[arg(long, default_value = "rooms", value_parser = ["rooms", "rain", "membership", "partition", "voice"])]
    scenario: String,
    /// Membership: rounds of concurrent operations.
    #[arg(long, default_value_t = 6)]
    waves: usize,
    /// Membership: most members at once (3-5).
    #[arg(long, default_value_t = 5)]
    members_max: usize,
    /// Membership: addresses available (more than --members-max, at most 8).
    #[arg(long, default_value_t = 6)]
    slots: usize,
    /// Membership: every node's --drain-timeout, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    drain_timeout_ms: u64,
    /// Membership: pause between a healthy cluster and the next wave, in milliseconds.
    #[arg(long, default_value_t = 2_000)]
    wave_gap_ms: u64,
    /// Rain: taps per client.
    #[arg(long, default_value_t = 12)]
    taps: u32,
    /// Rain: mean milliseconds between two taps of a client.
    #[arg(long, default_value_t = 500)]
    tap_interval_ms: u64,
    /// Rain: packets.
    #[arg(long, default_value_t = 2_500)]
    packets: u32,
    /// The chorus binary. Default: `chorus` next to this executable.
    #[arg(long = "chorus")]
    chorus: Option<PathBuf>,
    /// Seed of the fault schedule and the clients' pacing. Default: random (printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Nodes, 3-5 (membership: members at the start).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Rooms.
    #[arg(long, default_value_t = 6)]
    rooms: usize,
    /// Clients (spread over the nodes; even ones on WebSocket, odd ones on QUIC). Default 9
    /// (rooms), 1,000 (rain).
    #[arg(long)]
    clients: Option<usize>,
    /// Rooms each client joins.
    #[arg(long, default_value_t = 2)]
    rooms_per_client: usize,
    /// Mean time between two comments of one client, in milliseconds.
    #[arg(long, default_value_t = 400)]
    comment_interval_ms: u64,
    /// Length of the fault phase, in seconds. Default 60 (partition: 90).
    #[arg(long)]
    duration: Option<u64>,
    /// SIGKILLs (each followed by a restart with the same data dir).
    #[arg(long, default_value_t = 2)]
    kills: usize,
    /// SIGSTOP/SIGCONT pauses.
    #[arg(long, default_value_t = 1)]
    pauses: usize,
    /// Link cuts: one node's links to all other nodes dropped with nftables (needs `nft`
    /// and root); its clients stay connected. Default 0 (partition: 2).
    #[arg(long)]
    cuts: Option<usize>,
    /// Pair cuts: the links between two nodes dropped (both still reach the rest).
    /// Default 0 (partition: 2).
    #[arg(long)]
    pair_cuts: Option<usize>,
    /// One-way cuts: what one node sends to the others dropped. Default 0 (partition: 2).
    #[arg(long)]
    one_way_cuts: Option<usize>,
    /// Shortest cut, in milliseconds. Default 2000 (partition: 6000).
    #[arg(long)]
    cut_ms_min: Option<u64>,
    /// Longest cut, in milliseconds. Default 5000 (partition: 10000).
    #[arg(long)]
    cut_ms_max: Option<u64>,
    /// Longest wait for in-flight comments after the workload stops, in seconds.
    #[arg(long, default_value_t = 20)]
    settle: u64,
    /// Node i listens on this address plus i. Default 127.0.0.11 (rooms), 127.0.2.11
    /// (rain), 127.0.3.11 (membership).
    #[arg(long, default_value = "127.0.0.11")]
    base_ip: std::net::Ipv4Addr,
    /// Work dir (CA, data dirs, node logs, report.json). Default: a new directory under
    /// the system temp dir, kept after the run.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Also write the JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn default_chorus() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("current exe")?;
    let dir = exe.parent().context("exe has a directory")?;
    Ok(dir.join(format!("chorus{}", std::env::consts::EXE_SUFFIX)))
}

async fn main_inner() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(rand::random);
    let chorus = match args.chorus.clone() {
        Some(path) => path,
        None => default_chorus()?,
    };
    let work_dir = match args.work_dir.clone() {
        Some(dir) => dir,
        None => std::env::temp_dir().join(format!("chorus-chaos-{seed}-{}", std::process::id())),
    };
    if args.scenario == "rain" {
        let mut config = chorus_chaos::rain::RainChaosConfig::new(chorus, work_dir, seed);
        config.nodes = args.nodes;
        config.clients = args.clients.unwrap_or(1_000);
        config.taps = args.taps;
        config.tap_interval_ms = args.tap_interval_ms;
        config.packets = args.packets;
        if args.base_ip != std::net::Ipv4Addr::new(127, 0, 0, 11) {
            config.base_ip = args.base_ip;
        }
        eprintln!(
            "chorus-chaos rain: seed {seed}, work dir {}",
            config.work_dir.display()
        );
        let (report, code) = match chorus_chaos::rain::run_rain(config).await {
            Ok(report) => (report, ExitCode::SUCCESS),
            Err(ChaosError::RainAudit { report }) => (*report, ExitCode::FAILURE),
            Err(error) => {
                eprintln!("chorus-chaos: {error} (seed {seed})");
                return Ok(ExitCode::from(2));
            }
        };
        let text = serde_json::to_string_pretty(&report)?;
        if let Some(json) = &args.json {
            std::fs::write(json, &text).with_context(|| format!("write {}", json.display()))?;
        }
        println!("{text}");
        return Ok(code);
    }
    if args.scenario == "voice" {
        let mut config = chorus_chaos::voicemail::VoiceChaosConfig::new(chorus, work_dir, seed);
        config.nodes = args.nodes;
        config.users = args.clients.unwrap_or(12);
        config.kills = args.kills;
        config.pauses = args.pauses;
        if args.base_ip != std::net::Ipv4Addr::new(127, 0, 0, 11) {
            config.base_ip = args.base_ip;
        }
        eprintln!(
            "chorus-chaos voice: seed {seed}, work dir {}",
            config.work_dir.display()
        );
        let (report, code) = match chorus_chaos::voicemail::run_voice(config).await {
            Ok(report) => (report, ExitCode::SUCCESS),
            Err(ChaosError::VoiceViolations { report }) => (*report, ExitCode::FAILURE),
            Err(error) => {
                eprintln!("chorus-chaos: {error} (seed {seed})");
                return Ok(ExitCode::from(2));
            }
        };
        let text = serde_json::to_string_pretty(&report)?;
        if let Some(json) = &args.json {
            std::fs::write(json, &text).with_context(|| format!("write {}", json.display()))?;
        }
        println!("{text}");
        return Ok(code);
    }
    if args.scenario == "membership" {
        let mut config = chorus_chaos::membership::MembershipConfig::new(chorus, work_dir, seed);
        apply_workload(&mut config.base, &args);
        config.waves = args.waves;
        config.members_max = args.members_max;
        config.slots = args.slots;
        config.drain_timeout_ms = args.drain_timeout_ms;
        config.wave_gap_ms = args.wave_gap_ms;
        eprintln!(
            "chorus-chaos membership: seed {seed}, work dir {}",
            config.base.work_dir.display()
        );
        let (report, code) = match chorus_chaos::membership::run_membership(config).await {
            Ok(report) => (report, ExitCode::SUCCESS),
            Err(ChaosError::MembershipViolations { report }) => (*report, ExitCode::FAILURE),
            Err(error) => {
                eprintln!("chorus-chaos: {error} (seed {seed})");
                return Ok(ExitCode::from(2));
            }
        };
        if let Some(json) = &args.json {
            std::fs::write(json, serde_json::to_vec_pretty(&report)?)
                .with_context(|| format!("write {}", json.display()))?;
        }
        println!(
            "{}",
            serde_json::json!({
                "seed": report.seed,
                "violations": report.violation_count,
                "operations": report.ops.len(),
                "ids": report.ids,
                "final_members": report.final_members,
                "final_ring_epoch": report.final_ring_epoch,
                "comments_acked": report.counts.comments_acked,
                "deliveries_checked": report.counts.deliveries_checked,
                "report": report.config.base.work_dir.join("report.json"),
                "replay": report.replay,
            })
        );
        return Ok(code);
    }
    if args.scenario == "partition" {
        let mut config = ChaosConfig::partition(chorus, work_dir, seed);
        apply_workload(&mut config, &args);
        apply_faults(&mut config, &args);
        return run_rooms(config, seed, args.json).await;
    }
    let mut config = ChaosConfig::new(chorus, work_dir, seed);
    apply_workload(&mut config, &args);
    config.kills = args.kills;
    config.pauses = args.pauses;
    apply_faults(&mut config, &args);
    run_rooms(config, seed, args.json).await
}

/// The cluster and workload flags (the scenario's own base address unless one is given).
fn apply_workload(config: &mut ChaosConfig, args: &Args) {
    config.nodes = args.nodes;
    config.rooms = args.rooms;
    config.clients = args.clients.unwrap_or(9);
    config.rooms_per_client = args.rooms_per_client;
    config.comment_interval_ms = args.comment_interval_ms;
    config.settle_secs = args.settle;
    if args.base_ip != std::net::Ipv4Addr::new(127, 0, 0, 11) {
        config.base_ip = args.base_ip;
    }
}

/// The fault flags given on the command line, over `config`'s defaults.
fn apply_faults(config: &mut ChaosConfig, args: &Args) {
    if let Some(duration) = args.duration {
        config.duration_secs = duration;
    }
    if let Some(cuts) = args.cuts {
        config.cuts = cuts;
    }
    if let Some(cuts) = args.pair_cuts {
        config.pair_cuts = cuts;
    }
    if let Some(cuts) = args.one_way_cuts {
        config.one_way_cuts = cuts;
    }
    let min = args.cut_ms_min.unwrap_or(config.cut_ms.0);
    let max = args.cut_ms_max.unwrap_or(config.cut_ms.1);
    config.cut_ms = (min, max.max(min));
}

/// Runs the rooms scenario (also the partition one) and prints its summary.
async fn run_rooms(
    config: ChaosConfig,
    seed: u64,
    json: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    eprintln!(
        "chorus-chaos: seed {seed}, work dir {}",
        config.work_dir.display()
    );
    let report_path = config.work_dir.join("report.json");
    let outcome = chorus_chaos::run(config).await;
    let (report, code) = match outcome {
        Ok(report) => (Some(report), ExitCode::SUCCESS),
        Err(ChaosError::Violations { report, .. }) => (Some(*report), ExitCode::FAILURE),
        Err(error) => {
            eprintln!("chorus-chaos: {error} (seed {seed})");
            (None, ExitCode::from(2))
        }
    };
    if let (Some(report), Some(json)) = (&report, &json) {
        std::fs::write(json, serde_json::to_vec_pretty(report)?)
            .with_context(|| format!("write {}", json.display()))?;
    }
    if let Some(report) = report {
        println!(
            "{}",
            serde_json::json!({
                "seed": report.seed,
                "violations": report.violation_count,
                "faults": report.faults.len(),
                "comments_acked": report.counts.comments_acked,
                "deliveries_checked": report.counts.deliveries_checked,
                "report": report_path,
                "replay": report.replay,
            })
        );
    }
    Ok(code)
}

#[tokio::main]
async fn main() -> ExitCode {
    match main_inner().await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("chorus-chaos: {error:#}");
            ExitCode::from(2)
        }
    }
}
