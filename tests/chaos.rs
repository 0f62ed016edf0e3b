//! The short chaos run: three real nodes, two SIGKILLs with restarts and one SIGSTOP pause
//! under a room workload, then the invariant checks (see `chaos/README.md`). The long run is
//! `chorus-chaos` with more nodes, faults and time.

use std::path::PathBuf;

use chorus_chaos::{ChaosConfig, ChaosError};

/// Fixed so a failure names a schedule to replay with `chorus-chaos --seed`.
const SEED: u64 = 20_240_611;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_comments_survive_kills_and_pauses_in_one_order_and_the_cluster_heals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ChaosConfig::new(
        PathBuf::from(env!("CARGO_BIN_EXE_chorus")),
        dir.path().join("chaos"),
        SEED,
    );
    config.nodes = 3;
    config.kills = 2;
    config.pauses = 1;
    config.duration_secs = 45;
    config.settle_secs = 15;
    // Its own loopback range: other system tests use 127.0.0.1 and the default 127.0.0.11+.
    config.base_ip = "127.0.1.11".parse().expect("ip");
    match chorus_chaos::run(config).await {
        Ok(report) => {
            assert_eq!(report.faults.len(), 3, "{:#?}", report.faults);
            assert!(report.counts.comments_acked > 0, "{:#?}", report.counts);
            assert!(report.counts.deliveries_checked > 0, "{:#?}", report.counts);
        }
        Err(ChaosError::Violations { report, .. }) => panic!(
            "{} invariant violation(s), seed {}:\n{:#?}\nfaults: {:#?}",
            report.violation_count, report.seed, report.violations, report.faults
        ),
        Err(error) => panic!("chaos run failed: {error}"),
    }
}
