//! The local cluster of `cargo xtask cluster`, driven as its terminal drives it: a node that
//! dies is reported and does not take the others down, `restart N` brings it back, and a stop
//! ends every node cleanly.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Printed;
use kvstore::client::Client;
use kvstore_testkit::supervise::{Plan, Request, Supervisor, parse_request};

/// Generous: a node on a busy machine.
const WAIT: Duration = Duration::from_secs(30);

/// Free loopback ports: bound, read and let go (the nodes must be told each other's ports
/// before any of them starts, as `cargo xtask cluster` tells them).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

async fn answers(port: u16) -> bool {
    let client = Client::new(&port.to_string(), Duration::from_secs(2)).unwrap();
    client.status().await.is_ok()
}

async fn wait_until_serving(port: u16) {
    let started = Instant::now();
    while !answers(port).await {
        assert!(started.elapsed() < WAIT, "port {port} never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_dies_is_reported_the_others_go_on_and_restart_brings_it_back() {
    let data = tempfile::tempdir().unwrap();
    let ports = free_ports(3);
    let printed = Printed::default();
    let mut cluster = Supervisor::start(
        Plan {
            server: env!("CARGO_BIN_EXE_kvstore-server").into(),
            ports: ports.clone(),
            data_root: data.path().to_path_buf(),
            extra_args: Vec::new(),
            tls: None,
        },
        Arc::new(Mutex::new(printed.clone())),
    )
    .unwrap();
    for &port in &ports {
        wait_until_serving(port).await;
    }
    let pids: Vec<u32> = (0..3).map(|i| cluster.pid(i).unwrap()).collect();

    // Node 2 dies as a crash or an OOM kill would end it.
    let killed = std::process::Command::new("kill")
        .args(["-9", &pids[1].to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let started = Instant::now();
    let exited = loop {
        let exited = cluster.poll();
        if !exited.is_empty() {
            break exited;
        }
        assert!(started.elapsed() < WAIT, "the death was never noticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(exited.len(), 1);
    assert_eq!(exited[0].0, 1);
    let said = printed.text();
    assert!(
        said.contains("cluster: node2 exited (signal: 9 (SIGKILL)); 2 of 3 nodes still running"),
        "{said}"
    );
    assert!(said.contains("`restart 2`"), "{said}");
    // Every node's log lines carry its name.
    assert!(
        said.contains("[node1] ") && said.contains("[node3] "),
        "{said}"
    );

    // The others go on, the same processes, serving.
    for i in [0, 2] {
        assert_eq!(cluster.pid(i), Some(pids[i]));
        assert!(answers(ports[i]).await, "node{} stopped serving", i + 1);
    }
    assert_eq!(cluster.pid(1), None);

    // `restart 2`, as typed into the cluster's terminal.
    let request = parse_request("restart 2", cluster.len()).unwrap().unwrap();
    assert_eq!(request, Request::Restart(2));
    assert!(cluster.handle(request).unwrap());
    wait_until_serving(ports[1]).await;
    assert_ne!(cluster.pid(1), Some(pids[1]), "a new process");

    // A stop ends every node cleanly (SIGTERM, exit 0), and the cluster with them.
    assert!(!cluster.handle(Request::Stop).unwrap());
    for i in 0..3 {
        assert_eq!(cluster.pid(i), None);
    }
    let said = printed.text();
    for n in 1..=3 {
        assert!(
            said.contains(&format!("cluster: node{n} stopped (exit status: 0)")),
            "{said}"
        );
    }
}

/// `cargo xtask cluster --tls`: the nodes serve TLS with the plan's certificates and replicate
/// to each other over it, and the REPL command the cluster prints works as printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_serves_tls_and_the_printed_repl_command_works() {
    let data = tempfile::tempdir().unwrap();
    let ports = free_ports(3);
    let pki = kvstore_testkit::tls::ClusterPki::create(&data.path().join("tls"), 3).unwrap();
    let plan = Plan {
        server: env!("CARGO_BIN_EXE_kvstore-server").into(),
        ports: ports.clone(),
        data_root: data.path().to_path_buf(),
        extra_args: Vec::new(),
        tls: Some(pki.clone()),
    };
    let repl_args = plan.repl_args();
    let mut cluster = Supervisor::start(plan, Arc::new(Mutex::new(Printed::default()))).unwrap();
    let tls = kvstore::tls::client_config(&pki.ca, None).unwrap();
    let started = Instant::now();
    for &port in &ports {
        let client = Client::with_tls(&port.to_string(), Duration::from_secs(2), Some(&tls));
        while client.as_ref().unwrap().status().await.is_err() {
            assert!(started.elapsed() < WAIT, "port {port} never served TLS");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!answers(port).await, "port {port} answers in the clear");
    }

    let repl = tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kvstore-cli"))
            .args(&repl_args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"put name Adnan\n").unwrap();
        drop(stdin);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&repl.stderr);
    assert!(repl.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&repl.stdout),
        "Stored and replicated\n"
    );
    assert!(cluster.stop_all(), "a node did not stop cleanly");
}
