//! The short chaos runs: three real nodes, SIGKILLs with restarts and SIGSTOP pauses
//! under a room workload, then the invariant checks (see `chaos/README.md`). The long run is
//! `chorus-chaos` with more nodes, faults and time.

use std::path::PathBuf;

use chorus_chaos::{ChaosConfig, ChaosError};

/// Fixed so a failure names a schedule to replay with `chorus-chaos --seed`.
const SEED: u64 = 20_240_611;

/// Runs 3 nodes with `seed` on `base_ip`+; panics listing any violation.
async fn chaos_run(seed: u64, base_ip: &str, duration_secs: u64, kills: usize, pauses: usize) {
    chaos_run_with_cuts(seed, base_ip, duration_secs, kills, pauses, 0).await;
}

/// One chaos run at a time: each runs three nodes and nine clients, and two or three at
/// once on a 2-core CI machine measure the machine more than the cluster.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn chaos_run_with_cuts(
    seed: u64,
    base_ip: &str,
    duration_secs: u64,
    kills: usize,
    pauses: usize,
    cuts: usize,
) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ChaosConfig::new(
        PathBuf::from(env!("CARGO_BIN_EXE_chorus")),
        dir.path().join("chaos"),
        seed,
    );
    config.nodes = 3;
    config.kills = kills;
    config.pauses = pauses;
    config.cuts = cuts;
    config.duration_secs = duration_secs;
    config.settle_secs = 15;
    config.base_ip = base_ip.parse().expect("ip");
    match chorus_chaos::run(config).await {
        Ok(report) => {
            assert_eq!(
                report.faults.len(),
                kills + pauses + cuts,
                "{:#?}",
                report.faults
            );
            assert!(report.counts.comments_acked > 0, "{:#?}", report.counts);
            assert!(report.counts.deliveries_checked > 0, "{:#?}", report.counts);
        }
        Err(ChaosError::Violations { report, .. }) => {
            // Keep the node logs, clients.log and report.json for the post-mortem.
            let kept = dir.keep();
            panic!(
                "{} invariant violation(s), seed {} (work dir kept: {}):\n{:#?}\nfaults: {:#?}",
                report.violation_count,
                report.seed,
                kept.display(),
                report.violations,
                report.faults
            )
        }
        Err(error) => panic!("chaos run failed: {error}"),
    }
}

/// Seed 7 (3 kills and 2 pauses in 40 s: `chorus-chaos --seed 7 --duration 40 --kills 3
/// --pauses 2`) once found two node bugs, kept here as a regression run: an owner dropped
/// a relay batch to a SIGSTOPped edge, so that edge's members missed acknowledged comments
/// without losing their session; and a node killed long enough to be marked down,
/// restarted with its data dir, never came back `up`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_edge_misses_nothing_and_a_node_marked_down_comes_back_up() {
    chaos_run(7, "127.0.1.31", 40, 3, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_comments_survive_kills_and_pauses_in_one_order_and_the_cluster_heals() {
    // Its own loopback range: other system tests use 127.0.0.1 and the default 127.0.0.11+.
    // Its kills (2.8 s, 2.3 s) are shorter than failure detection, so it does not reach
    // the restart-after-down bug seed 7 shows.
    chaos_run(SEED, "127.0.1.11", 45, 2, 1).await;
}

/// Link cuts (nftables; needs `nft` and root, which `.ci/run` provides and requires with
/// `CHORUS_CHAOS_REQUIRE_CUTS=1`): a node cut off from the others keeps its clients; its
/// rooms move, its stale room actors are fenced, and it comes back and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_the_others_is_fenced_and_catches_up_when_the_links_return() {
    if !chorus_chaos::netcut::LinkCut::available().await {
        assert!(
            std::env::var_os("CHORUS_CHAOS_REQUIRE_CUTS").is_none(),
            "link cuts are required here but nft cannot change the ruleset"
        );
        eprintln!("skipped: nft is not available or not allowed (link cuts need root)");
        return;
    }
    chaos_run_with_cuts(11, "127.0.1.51", 30, 1, 1, 2).await;
}

/// Q8 short form: 300 clients tap a rain (8 taps each) while the pool's node is SIGKILLed
/// and, while it is down, another node is paused; the audit from durable state, with every
/// grant the clients saw, passes. The full form (1,000 clients × 12 taps) is
/// `chorus-chaos --scenario rain`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rain_stays_exact_through_a_kill_and_a_pause() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = chorus_chaos::rain::RainChaosConfig::new(
        PathBuf::from(env!("CARGO_BIN_EXE_chorus")),
        dir.path().join("rain"),
        SEED,
    );
    config.clients = 300;
    config.taps = 8;
    config.tap_interval_ms = 400;
    config.packets = 600;
    config.down_ms = 5_000;
    config.pause_ms = 2_000;
    config.base_ip = "127.0.1.71".parse().expect("ip");
    match chorus_chaos::rain::run_rain(config).await {
        Ok(report) => {
            assert_eq!(report.faults.len(), 4, "{:#?}", report.faults);
            assert!(report.granted > 0, "{report:#?}");
            assert_eq!(report.audit["ok"], true, "{report:#?}");
            assert_eq!(
                report.audit["granted"].as_u64().expect("granted")
                    + report.audit["refunded"].as_u64().expect("refunded"),
                1_000_000
            );
        }
        Err(ChaosError::RainAudit { report }) => {
            let kept = dir.keep();
            panic!(
                "the rain audit failed (work dir kept: {}): {report:#?}",
                kept.display()
            )
        }
        Err(error) => panic!("rain chaos run failed: {error}"),
    }
}

/// The membership scenario's short form (`chorus-chaos --scenario membership --seed 5
/// --waves 6`): nodes join (some through a node that is itself still joining), leave
/// (drain, remove, SIGTERM), are replaced and are killed, several at once, under the room
/// workload; every invariant holds, every node got its own id, and all kinds of operation
/// ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_leave_and_crash_concurrently_without_losing_a_comment_or_an_id() {
    use chorus_chaos::membership::{run_membership, MembershipConfig, OpKind};
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = MembershipConfig::new(
        PathBuf::from(env!("CARGO_BIN_EXE_chorus")),
        dir.path().join("membership"),
        5,
    );
    config.waves = 6;
    config.base.base_ip = "127.0.3.111".parse().expect("ip");
    match run_membership(config).await {
        Ok(report) => {
            for kind in [OpKind::Join, OpKind::Leave, OpKind::Replace, OpKind::Kill] {
                assert!(
                    report.ops.iter().any(|op| op.kind == kind),
                    "no {kind:?} in {:#?}",
                    report.ops
                );
            }
            let ids: std::collections::BTreeSet<u64> = report.ids.values().copied().collect();
            assert_eq!(
                ids.len(),
                report.ids.len(),
                "an id given twice: {:?}",
                report.ids
            );
            assert!(report.final_members.len() >= 3, "{report:#?}");
            assert!(report.final_ring_epoch.is_some(), "{report:#?}");
            assert!(report.counts.comments_acked > 0, "{:#?}", report.counts);
            assert!(report.counts.deliveries_checked > 0, "{:#?}", report.counts);
        }
        Err(ChaosError::MembershipViolations { report }) => {
            let kept = dir.keep();
            panic!(
                "{} violation(s), seed {} (work dir kept: {}):\n{:#?}\nops: {:#?}",
                report.violation_count,
                report.seed,
                kept.display(),
                report.violations,
                report.ops
            )
        }
        Err(error) => panic!("membership run failed: {error}"),
    }
}

/// The partition scenario's short form (`chorus-chaos --scenario partition --seed 3
/// --duration 30 --cuts 1 --pair-cuts 1 --one-way-cuts 1`): one node isolated, two nodes
/// cut from each other, one node whose packets to the others are dropped, under the room
/// workload. Every invariant holds (no silent gap, no comment posted twice), and a node cut
/// off says it is not ready within 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_lose_nothing_post_nothing_twice_and_a_cut_off_node_says_so() {
    if !chorus_chaos::netcut::LinkCut::available().await {
        assert!(
            std::env::var_os("CHORUS_CHAOS_REQUIRE_CUTS").is_none(),
            "link cuts are required here but nft cannot change the ruleset"
        );
        eprintln!("skipped: nft is not available or not allowed (link cuts need root)");
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ChaosConfig::partition(
        PathBuf::from(env!("CARGO_BIN_EXE_chorus")),
        dir.path().join("partition"),
        3,
    );
    config.duration_secs = 30;
    config.cuts = 1;
    config.pair_cuts = 1;
    config.one_way_cuts = 1;
    config.settle_secs = 15;
    config.base_ip = "127.0.6.111".parse().expect("ip");
    match chorus_chaos::run(config).await {
        Ok(report) => {
            assert_eq!(report.faults.len(), 3, "{:#?}", report.faults);
            for fault in &report.faults {
                if fault.kind == chorus_chaos::FaultKind::Cut {
                    assert!(
                        fault.not_ready_after_ms.is_some_and(|ms| ms <= 5_000),
                        "{fault:#?}"
                    );
                }
            }
            assert!(report.counts.deliveries_checked > 0, "{:#?}", report.counts);
        }
        Err(ChaosError::Violations { report, .. }) => {
            let kept = dir.keep();
            panic!(
                "{} invariant violation(s), seed {} (work dir kept: {}):\n{:#?}\nfaults: {:#?}",
                report.violation_count,
                report.seed,
                kept.display(),
                report.violations,
                report.faults
            )
        }
        Err(error) => panic!("partition run failed: {error}"),
    }
}

/// M (voice messages) short form: 8 users send voice messages in paced chunks and read and
/// play them on a second device while a node is SIGKILLed and restarted and another
/// paused; every acknowledged byte is fetched bit-exact, every completed message is in
/// each inbox once, inboxes are gapless and every device ends with the same state. The
/// full form: `chorus-chaos --scenario voice`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voice_messages_survive_kills_and_pauses() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = chorus_chaos::voicemail::VoiceChaosConfig::new(
        PathBuf::from(env!("CARGO_BIN_EXE_chorus")),
        dir.path().join("voice"),
        SEED,
    );
    config.users = 8;
    config.messages_per_user = 3;
    config.kills = 1;
    config.pauses = 1;
    config.down_ms = 4_000;
    config.base_ip = "127.0.11.11".parse().expect("ip");
    match chorus_chaos::voicemail::run_voice(config).await {
        Ok(report) => {
            assert_eq!(report.faults.len(), 4, "{:#?}", report.faults);
            assert!(report.messages_completed > 0, "{report:#?}");
        }
        Err(chorus_chaos::ChaosError::VoiceViolations { report }) => {
            let kept = dir.keep();
            panic!(
                "voice chaos found violations (work dir kept: {}): {report:#?}",
                kept.display()
            );
        }
        Err(error) => panic!("voice chaos run failed: {error}"),
    }
}
