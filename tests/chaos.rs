//! A short chaos run (see `kvstore::testkit::chaos`, or `cargo xtask chaos` for longer ones):
//! kills, restarts and partitions under load, then checks that nothing acknowledged was lost
//! and every node agrees.

use kvstore::testkit::chaos::{self, ChaosConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_chaos_run_finds_no_violation() {
    let dir = tempfile::tempdir().unwrap();
    let report = chaos::run(ChaosConfig {
        server: env!("CARGO_BIN_EXE_kvstore-server").into(),
        seconds: 8,
        seed: 20_261_127,
        clients: 6,
        root: dir.path().to_path_buf(),
    })
    .await
    .unwrap();
    println!("{report}");
    assert!(report.violations.is_empty(), "{report}");
    assert!(
        report.events.len() >= 4,
        "the schedule injected faults: {report}"
    );
    assert!(report.acked > 100, "the workload made progress: {report}");
}
