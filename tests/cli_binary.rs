//! The real binaries: `kvstore-cli` driven through stdin and argv against a real cluster, and
//! `kvstore-server` started as a process and stopped with SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{TestCluster, cli};

const CLI: &str = env!("CARGO_BIN_EXE_kvstore-cli");
const SERVER: &str = env!("CARGO_BIN_EXE_kvstore-server");

/// A `kvstore-server` process, killed by its PID when dropped: a test that fails halfway must
/// not leave it running.
struct Server(std::process::Child);

impl std::ops::Deref for Server {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Once the process has been waited for, std sends no signal (its PID may be reused).
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `kvstore-server` on a free port with `data` as its data dir and reads its stderr up
/// to the "node started" line, which it returns with the rest of the stream.
fn start_server(data: &std::path::Path) -> (Server, BufReader<std::process::ChildStderr>, String) {
    start_server_with(data, &[])
}

/// [`start_server`], with `extra` flags.
fn start_server_with(
    data: &std::path::Path,
    extra: &[&std::ffi::OsStr],
) -> (Server, BufReader<std::process::ChildStderr>, String) {
    let mut server = Command::new(SERVER)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .args(extra)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .map(Server)
        .unwrap();
    let mut stderr = BufReader::new(server.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("node started") {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "server exited before starting"
        );
    }
    (server, stderr, line)
}

/// Sends SIGTERM to `server` by its PID.
fn sigterm(server: &std::process::Child) {
    let status = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_reads_a_script_from_stdin_without_a_prompt() {
    let cluster = TestCluster::start(3);
    let port = cluster.addr(0).rsplit_once(':').unwrap().1.to_string();
    let script = "put name Adnan\nget name\nget nobody\nlist\nexit\nput never run\n";
    let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || cli(&[&port], script))
        .await
        .unwrap();
    assert_eq!(
        stdout,
        "Stored and replicated\nname = Adnan\nname = Adnan\n"
    );
    assert_eq!(stderr, "error: key not found: nobody\n");
    assert!(
        !ok,
        "a failed command in a script makes the exit status non-zero"
    );
    // `exit` stopped the script: the last line never ran.
    assert!(cluster.client(1).get("never").await.is_err());
    assert_eq!(cluster.client(2).get("name").await.unwrap(), "Adnan");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_runs_one_command_and_reports_failure_in_its_exit_status() {
    let cluster = TestCluster::start(3);
    let addr = cluster.addr(1).to_string();
    let (ok, stdout, _) = {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || {
            cli(&["--addr", &addr, "put", "greeting", "hello world"], "")
        })
        .await
        .unwrap()
    };
    assert!(ok);
    assert_eq!(stdout, "Stored and replicated\n");
    let (ok, stdout, _) = {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || cli(&[&addr, "get", "greeting"], ""))
            .await
            .unwrap()
    };
    assert!(ok);
    assert_eq!(stdout, "greeting = hello world\n");
    let (ok, _, stderr) = tokio::task::spawn_blocking(move || cli(&[&addr, "get", "nope"], ""))
        .await
        .unwrap();
    assert!(!ok);
    assert_eq!(stderr, "error: key not found: nope\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_against_a_dead_node_errors_and_keeps_going() {
    // A port bound but not listening: it refuses connections, and no one else can take it.
    let (_closed, addr) = common::closed_port();
    let port = addr.rsplit_once(':').unwrap().1.to_string();
    let (ok, stdout, stderr) =
        tokio::task::spawn_blocking(move || cli(&["--timeout", "2s", &port], "get a\nhelp\n"))
            .await
            .unwrap();
    assert!(!ok);
    assert!(
        stderr.starts_with("error: cannot reach node 127.0.0.1:"),
        "{stderr}"
    );
    assert!(
        stdout.contains("put KEY VALUE"),
        "the REPL went on after the error: {stdout}"
    );
}

/// The address in a start line.
fn listen_addr(line: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("listen="))
        .expect("listen= in the start line")
        .to_string()
}

/// `--cluster-token-file` on the CLI sends the cluster's token with `leave` and `remove`, which
/// a node with a token refuses without it: past the check, the one node is refused for
/// being the ring's last member.
#[test]
fn the_cli_sends_the_cluster_token_with_a_ring_change() {
    let data = tempfile::tempdir().unwrap();
    let token = data.path().join("token");
    std::fs::write(&token, "a secret of the cluster\n").unwrap();
    let flag = std::ffi::OsStr::new("--cluster-token-file");
    let (_server, _stderr, line) =
        start_server_with(&data.path().join("node"), &[flag, token.as_os_str()]);
    let addr = listen_addr(&line);
    let (ok, _, stderr) = cli(&[&addr, "leave"], "");
    assert!(!ok);
    assert!(stderr.contains("needs the cluster's token"), "{stderr}");
    let token = token.to_str().unwrap();
    let (ok, _, stderr) = cli(&["--cluster-token-file", token, &addr, "leave"], "");
    assert!(!ok);
    assert!(stderr.contains("the ring's last member"), "{stderr}");
    let missing = data.path().join("missing");
    let (ok, _, stderr) = cli(
        &[
            "--cluster-token-file",
            missing.to_str().unwrap(),
            &addr,
            "leave",
        ],
        "",
    );
    assert!(!ok);
    assert!(stderr.contains("--cluster-token-file"), "{stderr}");
}

/// A node whose gossip port is taken does not start, says why, and never said it started.
#[test]
fn a_taken_gossip_port_stops_the_node_before_it_says_it_started() {
    let data = tempfile::tempdir().unwrap();
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = Command::new(SERVER)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--gossip-port",
            &port,
            "--data-dir",
        ])
        .arg(data.path())
        .env("RUST_LOG", "info")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot gossip on udp 127.0.0.1:{port}"))
            && stderr.contains("choose another --gossip-port"),
        "{stderr}"
    );
    assert!(!stderr.contains("node started"), "{stderr}");
}

#[test]
fn server_binary_serves_and_exits_zero_on_sigterm() {
    let data = tempfile::tempdir().unwrap();
    // The start line names the address it bound.
    let (mut server, stderr, line) = start_server(data.path());
    let addr = listen_addr(&line);
    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        for l in stderr.lines() {
            rest.push_str(&l.unwrap());
            rest.push('\n');
        }
        rest
    });

    let (ok, stdout, _) = cli(&[&addr, "put", "k", "v"], "");
    assert!(ok);
    assert_eq!(stdout, "Stored and replicated\n");

    sigterm(&server);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = server.try_wait().unwrap() {
            break exit;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "server did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "exit status {exit}");
    let logs = drain.join().unwrap();
    assert!(
        logs.contains("shutdown requested") && logs.contains("node stopped"),
        "{logs}"
    );
}

#[test]
fn sigterm_right_after_start_is_a_clean_stop() {
    // The signal handlers must be in place before the node announces itself: a SIGTERM sent the
    // moment it has started stops it gracefully (exit 0), not by the default disposition.
    for _ in 0..5 {
        let data = tempfile::tempdir().unwrap();
        let (mut server, mut stderr, _) = start_server(data.path());
        sigterm(&server);
        let drain = std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        let exit = server.wait().unwrap();
        let _ = drain.join();
        assert!(exit.success(), "exit status {exit}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_output_into_a_closed_pipe_ends_quietly() {
    // `kvstore-cli 5001 list | head -1`: the reader goes away before the output is written.
    let cluster = TestCluster::start(3);
    for k in ["a", "b", "c"] {
        cluster.client(0).put(k, "v").await.unwrap();
    }
    let addr = cluster.addr(0).to_string();
    let out = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(CLI)
            .args([&addr, "list"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Closed before the call can have answered: the list meets a broken pipe.
        drop(child.stdout.take());
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {stderr}", out.status);
    assert_eq!(stderr, "", "nothing to say when the reader has gone");
}

#[test]
fn both_binaries_say_their_version() {
    for binary in [SERVER, CLI] {
        let out = Command::new(binary).arg("--version").output().unwrap();
        assert!(out.status.success(), "{binary}");
        let said = String::from_utf8(out.stdout).unwrap();
        assert!(
            said.trim_end().ends_with(env!("CARGO_PKG_VERSION")),
            "{binary}: {said}"
        );
    }
}

/// `--log-format json`: one JSON object a line, the start line holding the version and every
/// setting in effect (the cluster token only as set), inside the node's span.
#[test]
fn json_logs_are_one_object_a_line_and_the_start_says_every_setting() {
    let data = tempfile::tempdir().unwrap();
    let token = data.path().join("token");
    std::fs::write(&token, "a secret of the cluster\n").unwrap();
    let mut server = Command::new(SERVER)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--node-id",
            "json-node",
            "--log-format",
            "json",
        ])
        .arg("--data-dir")
        .arg(data.path().join("node"))
        .arg("--cluster-token-file")
        .arg(&token)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .map(Server)
        .unwrap();
    let mut stderr = BufReader::new(server.stderr.take().unwrap());
    let start = loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "exited before starting"
        );
        assert!(
            !line.contains("a secret"),
            "the token reached the log: {line}"
        );
        let json: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not one JSON object: {e}: {line}"));
        if json["fields"]["message"] == "node started" {
            break json;
        }
    };
    let fields = &start["fields"];
    assert_eq!(fields["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(fields["cluster_token"], "set (1 accepted)");
    assert_eq!(fields["tls"], "none");
    assert_eq!(fields["node_id"], "json-node");
    for setting in [
        "listen",
        "peers",
        "data_dir",
        "write_quorum",
        "replication_deadline",
        "peer_connect_timeout",
        "peer_mailbox",
        "handoff_capacity",
        "anti_entropy_interval",
        "max_key_bytes",
        "max_value_bytes",
        "sync",
        "compact_after_bytes",
        "repair_truncate",
        "tombstone_grace",
        "max_clock_offset",
        "shutdown_grace",
    ] {
        assert!(!fields[setting].is_null(), "{setting} missing: {start}");
    }
    assert_eq!(start["span"]["id"], "json-node", "{start}");
    sigterm(&server);
    assert!(server.wait().unwrap().success());
}
