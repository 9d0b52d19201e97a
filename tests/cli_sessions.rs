//! Whole REPL sessions against real clusters, stored as insta snapshots in `snapshots/`. Each
//! snapshot reads as a transcript: `> ` lines are what the user typed, then what the REPL
//! printed. Node addresses are redacted to `[nodeN]`, so snapshots hold nothing run-dependent.

mod common;

use std::fmt::Write as _;

use common::TestCluster;
use kvstore::config::{Limits, NodeConfig};
use kvstore::shell::{Shell, escape_controls};

/// Runs `script` through a REPL on node `node` (0-based) and renders the transcript. Lines
/// starting with `@nodeN` in the script switch to a REPL on node N (1-based), as a user
/// opening another terminal would.
async fn session(cluster: &TestCluster, script: &str) -> String {
    let mut transcript = String::new();
    let mut shell = Shell::new(cluster.client(0));
    writeln!(transcript, "$ kvstore-cli [node1]").unwrap();
    for line in script.lines() {
        if let Some(n) = line.strip_prefix("@node") {
            let n: usize = n.trim().parse().unwrap();
            shell = Shell::new(cluster.client(n - 1));
            writeln!(transcript, "$ kvstore-cli [node{n}]").unwrap();
            continue;
        }
        // What was typed, escaped as the REPL escapes what it prints.
        writeln!(transcript, "> {}", escape_controls(line)).unwrap();
        let out = shell.execute(line).await;
        for l in out.stdout.iter().chain(&out.stderr) {
            writeln!(transcript, "{l}").unwrap();
        }
        if out.exit {
            writeln!(transcript, "(exit)").unwrap();
        }
    }
    cluster.redact(&transcript)
}

macro_rules! assert_session {
    ($name:literal, $transcript:expr) => {
        insta::with_settings!({
            snapshot_path => "../snapshots",
            prepend_module_to_snapshot => false,
            omit_expression => true,
        }, {
            insta::assert_snapshot!($name, $transcript);
        })
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_example_session() {
    let cluster = TestCluster::start(3);
    let t = session(&cluster, "put name Adnan\nget name\nlist\nexit").await;
    assert_session!("seed_example_session", t);
}

/// Six nodes holding three copies of each key: any node serves any key, and `cluster` shows
/// each node's share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_of_six_with_three_copies() {
    let cluster = TestCluster::start_with(6, |_| NodeConfig {
        replicas: 3,
        ..common::patient()
    });
    cluster.settle().await;
    let t = session(
        &cluster,
        "put name Adnan\nput city Lahore\nput lang Urdu\nput fruit mango\ncluster\n\
         @node5\nget name\nget -q city\nlist\nstatus\ncluster",
    )
    .await;
    // Contact times and clock offsets vary from run to run.
    let t: Vec<String> = (t.lines())
        .map(|l| match l.find(", last contact") {
            Some(i) if l.starts_with("peer ") => l[..i].to_string(),
            _ => l.to_string(),
        })
        .collect();
    assert_session!("ring_of_six", realign_tables(&t));
}

/// A fourth node joins three that each hold every key: it takes its share, each key keeps
/// three copies, and `cluster` shows the new shares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_and_takes_its_share() {
    let config = || NodeConfig {
        replicas: 3,
        replication_deadline: std::time::Duration::from_secs(2),
        ..NodeConfig::default()
    };
    let mut cluster = TestCluster::start_with(3, |_| config());
    cluster.settle().await;
    let before = session(
        &cluster,
        "put name Adnan\nput city Lahore\nput lang Urdu\nput fruit mango\ncluster",
    )
    .await;
    let new = cluster.join(config(), 1);
    // Until the join has settled everywhere: the new node and every other at ring version 2.
    let started = std::time::Instant::now();
    loop {
        let mut settled = true;
        for i in 0..cluster.nodes.len() {
            let status = cluster.client(i).status().await.unwrap();
            settled &= status.ring_version == 2 && status.ring_phase == "settled";
            settled &= status.peers.iter().all(|p| p.state == "up");
        }
        if settled && cluster.client(new).status().await.unwrap().keys > 0 {
            break;
        }
        assert!(started.elapsed().as_secs() < 60, "the join did not settle");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let after = session(&cluster, "cluster\n@node4\nget name\nlist\nstatus\ncluster").await;
    let t: Vec<String> = (before.lines().chain(after.lines()))
        .map(|l| match l.find(", last contact") {
            Some(i) if l.starts_with("peer ") => l[..i].to_string(),
            _ => l.to_string(),
        })
        .collect();
    assert_session!("a_node_joins", realign_tables(&t));
}

/// The transcript with each `cluster` table aligned again: redacting its addresses shortened
/// the cells of its first column.
fn realign_tables(lines: &[String]) -> String {
    let mut out = String::new();
    let mut table: Vec<Vec<String>> = Vec::new();
    let flush = |table: &mut Vec<Vec<String>>, out: &mut String| {
        let widths: Vec<usize> = (0..table.first().map_or(0, Vec::len))
            .map(|c| table.iter().map(|r| r[c].len()).max().unwrap())
            .collect();
        for row in table.drain(..) {
            let cells: Vec<String> = (row.iter().zip(&widths))
                .map(|(cell, &w)| format!("{cell:w$}"))
                .collect();
            writeln!(out, "{}", cells.join("  ").trim_end()).unwrap();
        }
    };
    for line in lines {
        let in_table = !table.is_empty() || line.starts_with("address ");
        if in_table && !line.starts_with('>') && !line.starts_with('$') {
            table.push(
                line.split("  ")
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(String::from)
                    .collect(),
            );
            continue;
        }
        flush(&mut table, &mut out);
        writeln!(out, "{line}").unwrap();
    }
    flush(&mut table, &mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_on_one_node_get_on_another() {
    let cluster = TestCluster::start(3);
    let t = session(
        &cluster,
        "put name Adnan\nput city Lahore\n@node2\nget name\nlist\n@node3\nget city\nexit",
    )
    .await;
    assert_session!("put_on_node1_get_on_node2", t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_key_session() {
    let cluster = TestCluster::start(3);
    let t = session(
        &cluster,
        "get nobody\nlist\nput somebody here\nget nobody\nget somebody",
    )
    .await;
    assert_session!("missing_key", t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_session() {
    let cluster = TestCluster::start(3);
    let t = session(
        &cluster,
        "put a 1\nput b 2\ndelete a\nget a\nlist\n@node3\nget a\nlist\ndelete a\nput a again\nget a",
    )
    .await;
    assert_session!("delete", t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spaces_and_unicode_session() {
    let cluster = TestCluster::start(3);
    let t = session(
        &cluster,
        concat!(
            "put greeting hello world\n",
            "get greeting\n",
            "put spaced \"two  spaces  kept\"\n",
            "get spaced\n",
            "put 'key with spaces' value\n",
            "get 'key with spaces'\n",
            "put crab 🦀 Grüße 日本語\n",
            "put note call me #1, or C:\\tmp\\new's owner\n",
            "get note\n",
            "@node2\n",
            "get crab\n",
            "list",
        ),
    )
    .await;
    assert_session!("spaces_and_unicode", t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_session() {
    // Small limits, so the over-limit inputs fit on a line.
    let cluster = TestCluster::start_with(3, |_| NodeConfig {
        limits: Limits {
            max_key_bytes: 8,
            max_value_bytes: 16,
        },
        ..common::patient()
    });
    let t = session(
        &cluster,
        concat!(
            "put\n",
            "put lonely\n",
            "put \"\" value\n",
            "get \"\"\n",
            "put waytoolongkey v\n",
            "put k this value is too long\n",
            "put k \"unbalanced\n",
            "get a b\n",
            "get -q\n",
            "frobnicate\n",
            "list extra\n",
            "leave now\n",
            "# a comment does nothing\n",
            "\n",
            "list\n",
            "put k fine\n",
            "help\n",
            "quit",
        ),
    )
    .await;
    assert_session!("bad_input", t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_while_one_node_is_down() {
    let mut cluster = TestCluster::start(3);
    // Killed before anyone connected to it, so every attempt meets a refused connection.
    cluster.nodes[2].kill().await;
    let t = session(
        &cluster,
        "put name Adnan\nget name\n@node3\nget name\nput x y\n@node2\nget name\nlist\ndelete name",
    )
    .await;
    assert_session!("one_node_down", t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_read_session() {
    let mut cluster = TestCluster::start(3);
    let t1 = session(
        &cluster,
        "put name Adnan\nget -q name\nget name --quorum\nget -q nobody",
    )
    .await;
    cluster.nodes[1].kill().await;
    cluster.nodes[2].kill().await;
    let t2 = session(&cluster, "get name\nget -q name").await;
    assert_session!("quorum_read", format!("{t1}{}", redact_reasons(&t2)));
}

/// Replaces the cause in each "(unreachable: CAUSE)": a peer killed while connected may be
/// found refusing new connections or resetting the old one, whichever the read meets first.
fn redact_reasons(transcript: &str) -> String {
    const OPEN: &str = "(unreachable: ";
    let mut out = String::new();
    let mut rest = transcript;
    while let Some(at) = rest.find(OPEN) {
        out.push_str(&rest[..at + OPEN.len()]);
        rest = &rest[at + OPEN.len()..];
        let end = rest.find(')').unwrap_or(rest.len());
        out.push_str("[cause]");
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Keys and values are anyone's bytes: printed, their control characters are escaped, so a
/// value cannot retitle or recolour the terminal, and a key cannot fake lines of `list`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_session() {
    let cluster = TestCluster::start(3);
    let client = cluster.client(0);
    let faked = "real\nfake = looks like another pair";
    assert!(client.put(faked, "v").await.unwrap().ok);
    let t = session(
        &cluster,
        "put title \u{1b}]0;pwned\u{7}\u{1b}[31mred\nget title\nlist\nget nobody\u{1b}[2J",
    )
    .await;
    assert!(!t.contains('\u{1b}'), "{t}");
    assert_session!("control_characters", t);
}

/// A node that goes away while the REPL is connected to it: the next put says it cannot reach
/// the node, as a get would, with the cause, and that the write may or may not have been
/// stored (the connection broke under the call), not tonic's "Unknown error: transport error".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_to_a_node_that_went_away_says_it_cannot_reach_it() {
    let mut cluster = TestCluster::start(3);
    let mut shell = Shell::new(cluster.client(2));
    assert_eq!(
        shell.execute("put before v").await.stdout,
        ["Stored and replicated"]
    );
    cluster.nodes[2].kill().await;
    for line in ["put after v", "get before", "put again v"] {
        let out = shell.execute(line).await;
        let said = cluster.redact(&out.stderr.join("\n"));
        assert!(out.failed, "{line}: {said}");
        assert!(
            said.starts_with("error: cannot reach node [node3] ("),
            "{line}: {said}"
        );
        assert!(!said.contains("Unknown"), "{line}: {said}");
    }
}
