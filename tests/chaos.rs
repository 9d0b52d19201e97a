//! A short chaos run (see `kvstore_testkit::chaos`, or `cargo xtask chaos` for longer ones):
//! kills, restarts and partitions under load, then checks that nothing acknowledged was lost
//! and every node agrees.

use kvstore_testkit::chaos::{self, ChaosConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_chaos_run_finds_no_violation() {
    let dir = tempfile::tempdir().unwrap();
    let report = chaos::run(ChaosConfig {
        server: env!("CARGO_BIN_EXE_kvstore-server").into(),
        seconds: 8,
        seed: 20_261_127,
        clients: 6,
        root: dir.path().to_path_buf(),
        netns: false,
        ring: false,
    })
    .await
    .unwrap();
    println!("{report}");
    assert!(report.violations.is_empty(), "{report}");
    // Faults, not the restarts and heals that end them: with a fault at most every 1.2-3 s,
    // 8 s hold at least two.
    let faults = report
        .events
        .iter()
        .filter(|e| e.contains("kill -9") || e.contains("partition"))
        .count();
    assert!(faults >= 2, "the schedule injected faults: {report}");
    // Progress, whatever the machine's speed: some writes were acknowledged, so the check
    // that none was lost checked something.
    assert!(report.acked > 0, "the workload made progress: {report}");
}

/// A ring of five holding three copies of each key, with nodes joining and leaving among the
/// kills: no acknowledged write is lost, the ring settles, and every key ends on three nodes
/// that agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_chaos_run_on_a_ring_with_joins_and_leaves_finds_no_violation() {
    let dir = tempfile::tempdir().unwrap();
    let report = chaos::run(ChaosConfig {
        server: env!("CARGO_BIN_EXE_kvstore-server").into(),
        seconds: 12,
        seed: 20_261_206,
        clients: 4,
        root: dir.path().to_path_buf(),
        netns: false,
        ring: true,
    })
    .await
    .unwrap();
    println!("{report}");
    assert!(report.violations.is_empty(), "{report}");
    assert!(report.ring_changes() >= 1, "the ring changed: {report}");
    assert!(report.acked > 0, "the workload made progress: {report}");
}
