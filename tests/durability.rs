//! Durability and catch-up with real node processes: SIGKILL during writes, whole-cluster
//! crashes, a node down while others take writes, an emptied data dir, a partition, torn and
//! corrupted logs, and deletes that must stay deleted through all of it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kvstore::pb::Consistency;
use kvstore_testkit::ProcessCluster;
use kvstore_testkit::process::ClusterSpec;
use tonic::Code;

/// Generous bound for the cluster to converge: speed is the benchmark's business.
const CONVERGE: Duration = Duration::from_secs(60);

async fn cluster(nodes: usize, root: &std::path::Path) -> ProcessCluster {
    ProcessCluster::start(ClusterSpec {
        server: env!("CARGO_BIN_EXE_kvstore-server").into(),
        nodes,
        root: root.to_path_buf(),
        // A patient deadline: dead and cut-off peers fail at once through their proxies, and a
        // live one on a busy machine must not be reported as missing a write.
        extra_args: [
            "--replication-deadline",
            "10s",
            "--anti-entropy-interval",
            "1s",
        ]
        .map(String::from)
        .to_vec(),
        proxied: true,
        tls: None,
        netns: None,
    })
    .await
    .unwrap()
}

async fn list(c: &ProcessCluster, i: usize) -> Vec<(String, String)> {
    c.client(i).list().await.unwrap()
}

/// Polls until every running node lists the same pairs; returns them.
async fn converged(c: &ProcessCluster) -> Vec<(String, String)> {
    let started = Instant::now();
    loop {
        let mut lists = Vec::new();
        for i in 0..c.len() {
            lists.push(c.client(i).list().await);
        }
        if let Ok(first) = &lists[0]
            && lists.iter().all(|l| l.as_ref().ok() == Some(first))
        {
            return first.clone();
        }
        assert!(
            started.elapsed() < CONVERGE,
            "no convergence within {CONVERGE:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_writes_loses_nothing_the_node_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(3, dir.path()).await;
    let client = c.client(2);
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = tokio::spawn({
        let progress = progress.clone();
        async move {
            let mut acked = Vec::new();
            for i in 0.. {
                match client.put(&format!("w{i:05}"), &format!("value {i}")).await {
                    Ok(_) => acked.push(i),
                    Err(_) => break,
                }
                progress.store(acked.len(), std::sync::atomic::Ordering::Relaxed);
            }
            acked
        }
    });
    // Killed mid-stream once the workload is under way, however fast the machine is.
    let started = std::time::Instant::now();
    while progress.load(std::sync::atomic::Ordering::Relaxed) < 50 {
        assert!(
            started.elapsed() < CONVERGE,
            "the workload did not get going"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.kill(2);
    let acked = writer.await.unwrap();
    assert!(
        acked.len() >= 50,
        "the workload ran: {} writes",
        acked.len()
    );

    c.restart(2).await.unwrap();
    let node = c.client(2);
    for i in &acked {
        let got = node.get(&format!("w{i:05}")).await;
        assert_eq!(
            got.ok(),
            Some(format!("value {i}")),
            "acknowledged write w{i:05} lost"
        );
    }
    let all = converged(&c).await;
    assert!(all.len() >= acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_all_three_nodes_keeps_every_acknowledged_write_on_every_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(3, dir.path()).await;
    let n = 300;
    for i in 0..n {
        let ack = c
            .client(i % 3)
            .put(&format!("k{i:04}"), &format!("v{i}"))
            .await
            .unwrap();
        assert!(ack.ok && ack.failed_peers.is_empty(), "{}", ack.message);
    }
    for i in 0..3 {
        c.kill(i);
    }
    for i in 0..3 {
        c.restart(i).await.unwrap();
    }
    // No waiting for repair: each node logged every write before it acknowledged it.
    for node in 0..3 {
        let pairs = list(&c, node).await;
        assert_eq!(pairs.len(), n, "node{}", node + 1);
        for (i, (k, v)) in pairs.iter().enumerate() {
            assert_eq!(
                (k.as_str(), v.as_str()),
                (format!("k{i:04}").as_str(), format!("v{i}").as_str())
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_through_thousands_of_puts_and_deletes_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(3, dir.path()).await;
    c.client(0).put("deleted-while-down", "old").await.unwrap();
    c.kill(2);

    let mut tasks = Vec::new();
    for t in 0..8 {
        let client = c.client(t % 2);
        tasks.push(tokio::spawn(async move {
            for i in 0..300 {
                let key = format!("t{t}-k{i:03}");
                let ack = client.put(&key, &format!("v{i}")).await.unwrap();
                assert!(ack.ok, "{}", ack.message);
                if i % 4 == 0 {
                    assert!(client.delete(&key).await.unwrap().ok);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(c.client(1).delete("deleted-while-down").await.unwrap().ok);

    c.restart(2).await.unwrap();
    let all = converged(&c).await;
    assert_eq!(all.len(), 8 * 300 - 8 * 75);
    assert!(
        all.iter()
            .all(|(k, _)| !k.ends_with("k000") && k != "deleted-while-down")
    );
    let err = c.client(2).get("deleted-while-down").await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::NotFound,
        "a delete made while the node was down reached it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_with_an_empty_data_dir_gets_everything_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(3, dir.path()).await;
    for i in 0..500 {
        c.client(i % 2).put(&format!("k{i:04}"), "v").await.unwrap();
    }
    c.client(0).delete("k0000").await.unwrap();
    c.kill(2);
    std::fs::remove_dir_all(c.data_dir(2)).unwrap();
    c.restart(2).await.unwrap();
    let all = converged(&c).await;
    assert_eq!(all.len(), 499);
    assert_eq!(list(&c, 2).await, all);
    assert!(c.log(2).contains("anti-entropy repaired differences"));
}

/// A write as its client saw it: (version, value, whether the write quorum was met).
type Written = ((u64, String), String, bool);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healed_partition_converges_to_the_newest_version_losing_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(3, dir.path()).await;
    c.isolate(2).unwrap();
    // Both sides take writes, on the same keys too. Each write's version comes back in its Ack.
    let mut writes: BTreeMap<String, Vec<Written>> = BTreeMap::new();
    for round in 0..20 {
        for (node, tag) in [(0, "majority"), (2, "minority")] {
            for k in 0..10 {
                let key = format!("k{k}");
                let value = format!("{tag}-{round}");
                let ack = c.client(node).put(&key, &value).await.unwrap();
                let v = ack.version.unwrap();
                writes
                    .entry(key)
                    .or_default()
                    .push(((v.hlc, v.node_id), value, ack.ok));
            }
        }
    }
    // The minority side cannot meet a majority quorum; the majority side can.
    assert!(
        writes
            .values()
            .flatten()
            .filter(|w| w.2)
            .all(|w| w.1.starts_with("majority"))
    );

    c.heal().unwrap();
    let all: BTreeMap<String, String> = converged(&c).await.into_iter().collect();
    for (key, ws) in &writes {
        // The survivor is the newest write made, acknowledged or not, so no write a quorum
        // acknowledged was lost (each is that one or older).
        let newest = ws.iter().max_by(|a, b| a.0.cmp(&b.0)).unwrap();
        assert_eq!(all[key], newest.1, "{key}: newest version wins");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_log_tail_is_cut_off_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(1, dir.path()).await;
    for i in 0..10 {
        c.client(0).put(&format!("k{i}"), "v").await.unwrap();
    }
    assert!(c.stop(0).unwrap().success());
    let log = newest_log(c.data_dir(0));
    // Half a record: what a crash in the middle of an append leaves.
    let mut data = std::fs::read(&log).unwrap();
    let len = data.len();
    data.extend_from_slice(&[40, 0, 0, 0, 1, 2, 3, 4, 1, 0, 0]);
    std::fs::write(&log, &data).unwrap();

    c.restart(0).await.unwrap();
    let logs = c.log(0);
    assert!(logs.contains("cut off a damaged log tail"), "{logs}");
    assert!(logs.contains(&format!("offset={len}")), "{logs}");
    assert_eq!(list(&c, 0).await.len(), 10);
    assert!(c.client(0).put("after", "v").await.unwrap().ok);
    c.restart(0).await.unwrap();
    assert_eq!(list(&c, 0).await.len(), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mid_log_corruption_refuses_to_start_and_repair_refetches_from_peers() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(3, dir.path()).await;
    for i in 0..100 {
        c.client(0)
            .put(&format!("k{i:03}"), &"x".repeat(50))
            .await
            .unwrap();
    }
    assert!(c.stop(2).unwrap().success());
    let log = newest_log(c.data_dir(2));
    let mut data = std::fs::read(&log).unwrap();
    let middle = data.len() / 2;
    data[middle] ^= 0xFF;
    std::fs::write(&log, &data).unwrap();

    let status = c.run_to_exit(2, &[]).unwrap();
    assert!(!status.success());
    let logs = c.log(2);
    assert!(
        logs.contains(&log.display().to_string()),
        "names the file: {logs}"
    );
    assert!(
        logs.contains("corrupt at offset"),
        "names the offset: {logs}"
    );
    assert!(
        logs.contains("--repair-truncate"),
        "says how to recover: {logs}"
    );

    c.restart_with(2, &["--repair-truncate"]).await.unwrap();
    let all = converged(&c).await;
    assert_eq!(
        all.len(),
        100,
        "what followed the damage came back from the peers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_stay_deleted_through_restarts_handoff_and_quorum_reads() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(3, dir.path()).await;
    let ack = c.client(0).put("k", "v").await.unwrap();
    assert!(
        ack.failed_peers.is_empty(),
        "node 3 holds k: {}",
        ack.message
    );
    c.kill(2);
    // The delete reaches node 1 and 2; node 3 is down and holds the old value.
    assert!(c.client(0).delete("k").await.unwrap().ok);
    c.kill(0);
    c.restart(0).await.unwrap();
    assert_eq!(
        c.client(0).get("k").await.unwrap_err().code(),
        Code::NotFound,
        "log replay"
    );
    c.restart(2).await.unwrap();
    converged(&c).await;
    for i in 0..3 {
        assert_eq!(
            c.client(i).get("k").await.unwrap_err().code(),
            Code::NotFound,
            "node{}",
            i + 1
        );
        let quorum = c
            .client(i)
            .get_with("k", Consistency::Quorum)
            .await
            .unwrap_err();
        assert_eq!(quorum.code(), Code::NotFound);
    }
}

/// The log file with the highest generation in `dir`.
fn newest_log(dir: &std::path::Path) -> std::path::PathBuf {
    let mut logs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    logs.sort();
    logs.pop().expect("a log file")
}

/// A small tmpfs mounted for one test, unmounted when dropped. Mounting needs root: the tests
/// that use it are ignored by default, and `cargo test -- --include-ignored` (as root) runs
/// them; a failure to mount then fails the test rather than skipping it.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    /// Gives the disk `size` of room (tmpfs takes a new size while mounted).
    fn grow(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "remounting {} with {size}",
            self.0.display()
        );
    }

    fn mount(path: &std::path::Path, size: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mounting a tmpfs at {} (needs root)",
            path.display()
        );
        Self(path.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: mounts a small tmpfs to fill its disk"]
async fn a_full_disk_fails_writes_clearly_and_keeps_serving_reads() {
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&dir.path().join("node1"), "256k");
    let mut c = cluster(1, dir.path()).await;
    assert!(c.client(0).put("before", "v").await.unwrap().ok);
    let value = "x".repeat(8 * 1024);
    let mut refused = None;
    for i in 0..200 {
        match c.client(0).put(&format!("fill{i}"), &value).await {
            Ok(ack) => assert!(ack.ok),
            Err(status) => {
                refused = Some((i, status));
                break;
            }
        }
    }
    let (kept, status) = refused.expect("a 256 KiB disk fills up");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("not durable"),
        "{}",
        status.message()
    );
    // Reads go on, and writes are refused, clearly, while the disk is full.
    assert_eq!(c.client(0).get("before").await.unwrap(), "v");
    assert!(c.client(0).list().await.unwrap().len() > 1);
    let status = c.client(0).put("during", "v").await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // Room again: writes resume by themselves, without a restart.
    disk.grow("4m");
    let resumed = Instant::now();
    while c.client(0).put("after", "v").await.is_err() {
        assert!(resumed.elapsed() < CONVERGE, "writes never resumed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The failed appends were cut back out of the log: it recovers cleanly, without a torn
    // tail, and holds everything acknowledged.
    c.kill(0);
    c.restart(0).await.unwrap();
    assert!(
        !c.log(0).contains("cut off a damaged log tail"),
        "{}",
        c.log(0)
    );
    assert_eq!(c.client(0).get("before").await.unwrap(), "v");
    assert_eq!(c.client(0).get("after").await.unwrap(), "v");
    // The write whose append met the full disk was kept by the log, and written once there
    // was room: its client was told it was not durable, and it is now.
    assert_eq!(
        c.client(0).get(&format!("fill{kept}")).await.unwrap(),
        value
    );
    c.kill(0);
}
