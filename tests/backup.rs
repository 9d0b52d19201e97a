//! Backup and restore: a backup taken while a node takes writes holds every write acknowledged
//! before it began, deletes included, at their versions; a new node restored from it serves
//! them and its peers get them; a damaged, cut-short or misplaced restore is refused whole,
//! naming the byte, before anything is restored.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{TestCluster, cli};
use kvstore::client::Client;
use kvstore::pb::Consistency;
use tonic::Code;

const SERVER: &str = env!("CARGO_BIN_EXE_kvstore-server");
const PATIENCE: Duration = Duration::from_secs(60);

fn cluster(dir: &Path, restore: Option<&Path>) -> TestCluster {
    TestCluster::start_with(3, |i| kvstore::NodeConfig {
        data_dir: Some(dir.join(format!("node{i}"))),
        restore: restore.filter(|_| i == 0).map(Path::to_path_buf),
        ..common::patient()
    })
}

/// Puts fresh keys to `client` until told to stop, adding each acknowledged one to `acked`.
async fn write_until(client: Client, acked: Arc<Mutex<Vec<String>>>, stop: Arc<AtomicBool>) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("live{n:06}");
        if client.put(&key, &key).await.is_ok_and(|ack| ack.ok) {
            acked.lock().unwrap().push(key);
        }
        n += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_writes_restores_every_acknowledged_write_into_a_new_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let old = cluster(&dir.path().join("old"), None);
    let client = old.client(0);
    // Written, overwritten and deleted before the backup begins.
    let mut before: BTreeMap<String, Option<String>> = BTreeMap::new();
    for i in 0..300 {
        let key = format!("k{i:04}");
        assert!(client.put(&key, "first").await.unwrap().ok);
        before.insert(key, Some("first".into()));
    }
    for i in (0..300).step_by(3) {
        let key = format!("k{i:04}");
        assert!(client.put(&key, "second").await.unwrap().ok);
        before.insert(key, Some("second".into()));
    }
    for i in (1..300).step_by(7) {
        let key = format!("k{i:04}");
        assert!(client.delete(&key).await.unwrap().ok);
        before.insert(key, None);
    }
    // And a writer to the same node that goes on through the backup.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writer = tokio::spawn(write_until(old.client(0), acked.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Everything acknowledged before the backup begins.
    let live_before = acked.lock().unwrap().clone();
    let file = dir.path().join("old.backup");
    let summary = kvstore::backup::write(&client, &file).await.unwrap();
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let acked_in_all = acked.lock().unwrap().len();
    assert!(!live_before.is_empty() && acked_in_all > live_before.len());
    assert!(
        summary.entries >= 300 + live_before.len() as u64,
        "{summary:?}"
    );
    assert_eq!(
        summary.tombstones,
        before.values().filter(|v| v.is_none()).count() as u64
    );
    assert!(!dir.path().join("old.backup.partial").exists());

    // A new cluster: node 0 restored from the backup, its peers empty.
    let new = cluster(&dir.path().join("new"), Some(&file));
    let restored = new.client(0);
    for (key, value) in &before {
        let got = restored.get(key).await;
        match value {
            Some(value) => assert_eq!(&got.unwrap(), value, "{key}"),
            None => assert_eq!(got.unwrap_err().code(), Code::NotFound, "{key} was deleted"),
        }
    }
    for key in &live_before {
        assert_eq!(&restored.get(key).await.unwrap(), key);
    }
    // At the versions they had: a restored value merges with copies elsewhere by the usual
    // rule, as if it had never left.
    for key in ["k0000", "k0001", "k0002"] {
        let was = old.client(0).get_with(key, Consistency::Local).await;
        let now = restored.get_with(key, Consistency::Local).await;
        match (was, now) {
            (Ok(was), Ok(now)) => assert_eq!(was.version, now.version, "{key}"),
            (Err(was), Err(now)) => assert_eq!(was.code(), now.code()),
            (was, now) => panic!("{key}: {was:?} then {now:?}"),
        }
    }
    let status = restored.status().await.unwrap();
    assert_eq!(status.tombstones, summary.tombstones);

    // Its peers get everything from it through anti-entropy.
    let started = Instant::now();
    for i in 1..3 {
        loop {
            let listed = new.client(i).list().await.unwrap();
            if listed.len() == restored.list().await.unwrap().len() {
                break;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "node {i} has {} keys",
                listed.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A backup of a small cluster, in `dir`.
async fn small_backup(dir: &Path) -> std::path::PathBuf {
    let cluster = cluster(&dir.join("cluster"), None);
    for i in 0..50 {
        cluster.client(0).put(&format!("k{i}"), "v").await.unwrap();
    }
    let file = dir.join("small.backup");
    kvstore::backup::write(&cluster.client(0), &file)
        .await
        .unwrap();
    file
}

/// Runs `kvstore-server --restore FILE` on an empty data dir; returns its stderr if it refused
/// to start, or None if it started.
fn restore_with_server(file: &Path, data: &Path) -> Option<String> {
    let mut server = Command::new(SERVER)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .arg("--restore")
        .arg(file)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if let Some(status) = server.try_wait().unwrap() {
            assert!(!status.success());
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut server.stderr.take().unwrap(), &mut stderr).unwrap();
            return Some(stderr);
        }
        if started.elapsed() > Duration::from_secs(5) {
            let _ = server.kill();
            let _ = server.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_cut_short_backup_is_refused_naming_the_byte() {
    let dir = tempfile::tempdir().unwrap();
    let file = small_backup(dir.path()).await;
    let good = std::fs::read(&file).unwrap();
    assert_eq!(kvstore::backup::verify(&file).unwrap().entries, 50);

    // One byte flipped, anywhere: refused, naming a place at or before the flip (the start
    // of the record or field it spoils).
    let at_of = |err: &str| -> u64 {
        let after = err
            .split("at byte ")
            .nth(1)
            .unwrap_or_else(|| panic!("{err}"));
        after.split(':').next().unwrap().parse().unwrap()
    };
    let damaged = dir.path().join("damaged.backup");
    for flip in (0..good.len()).step_by(23) {
        let mut bytes = good.clone();
        bytes[flip] ^= 0x40;
        std::fs::write(&damaged, &bytes).unwrap();
        let err = kvstore::backup::verify(&damaged).unwrap_err().to_string();
        assert!(err.contains("nothing was restored"), "{err}");
        let at = at_of(&err);
        assert!(
            at <= flip as u64 && flip as u64 - at < 200,
            "flip at {flip}: {err}"
        );
    }
    let middle = good.len() / 2;
    let mut flipped = good.clone();
    flipped[middle] ^= 0x40;
    std::fs::write(&damaged, &flipped).unwrap();
    let at = at_of(&kvstore::backup::verify(&damaged).unwrap_err().to_string());

    // Cut short, anywhere: at the end, in a record, in the header.
    for keep in [good.len() - 1, good.len() - 13, middle, 5] {
        let cut = dir.path().join("cut.backup");
        std::fs::write(&cut, &good[..keep]).unwrap();
        let err = kvstore::backup::verify(&cut).unwrap_err().to_string();
        assert!(
            err.contains("at byte") && err.contains("cut short"),
            "{keep}: {err}"
        );
    }
    // Trailing bytes, and a file that is no backup.
    let mut longer = good.clone();
    longer.extend_from_slice(b"more");
    let extra = dir.path().join("extra.backup");
    std::fs::write(&extra, &longer).unwrap();
    assert!(
        kvstore::backup::verify(&extra)
            .unwrap_err()
            .to_string()
            .contains("after the end")
    );
    let other = dir.path().join("other.backup");
    std::fs::write(&other, b"{\"not\": \"a backup\"}").unwrap();
    assert!(
        kvstore::backup::verify(&other)
            .unwrap_err()
            .to_string()
            .contains("KVBACKUP")
    );

    // The server refuses to start from the damaged file, says where, and restores nothing.
    let data = dir.path().join("restored");
    let said =
        restore_with_server(&damaged, &data).expect("the node started from a damaged backup");
    assert!(said.contains(&format!("at byte {at}")), "{said}");
    let left: Vec<_> = std::fs::read_dir(&data)
        .map(|d| d.collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "it wrote {left:?}");

    // Nor into a data dir that holds data: a restore seeds a new node.
    let used = dir.path().join("cluster/node1");
    let said = restore_with_server(&file, &used).expect("the node restored over data");
    assert!(
        said.contains("--restore needs an empty --data-dir"),
        "{said}"
    );
    // The good file starts a node.
    assert!(restore_with_server(&file, &dir.path().join("fresh")).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_repl_backs_a_node_up() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(1);
    cluster.client(0).put("name", "Adnan").await.unwrap();
    cluster.client(0).put("gone", "x").await.unwrap();
    cluster.client(0).delete("gone").await.unwrap();
    let file = dir.path().join("repl.backup");
    let (addr, path) = (cluster.addr(0).to_string(), file.display().to_string());
    let (ok, out, err) = tokio::task::spawn_blocking(move || cli(&[&addr, "backup", &path], ""))
        .await
        .unwrap();
    assert!(ok, "{err}");
    let size = std::fs::metadata(&file).unwrap().len();
    assert_eq!(
        out,
        format!(
            "Backed up 2 entries (1 tombstones, {size} bytes) to {}\n",
            file.display()
        )
    );
    // A place it cannot write is an error naming it, and leaves nothing behind.
    let nowhere = dir
        .path()
        .join("no/such/dir/x.backup")
        .display()
        .to_string();
    let addr = cluster.addr(0).to_string();
    let (ok, _, err) = tokio::task::spawn_blocking(move || cli(&[&addr, "backup", &nowhere], ""))
        .await
        .unwrap();
    assert!(!ok && err.contains("no/such/dir"), "{err}");
    // No file, or a directory: refused before anything is fetched.
    let (here, addr) = (
        dir.path().display().to_string(),
        cluster.addr(0).to_string(),
    );
    let session = format!("backup ''\nbackup '{here}'\n");
    let (_, out, err) = tokio::task::spawn_blocking(move || cli(&[&addr], &session))
        .await
        .unwrap();
    assert!(
        err.contains("backup needs a file to write, and '' names none")
            && err.contains(&format!(
                "backup needs a file to write, and {} is a directory",
                dir.path().display()
            ))
            && !out.contains("Backed up"),
        "{out}\n{err}"
    );
}
