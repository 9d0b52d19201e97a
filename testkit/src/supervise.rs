//! The local cluster behind `cargo xtask cluster`: N `kvstore-server` processes on consecutive
//! loopback ports, each peered with all the others, every line they log prefixed with their
//! name.
//!
//! A node that exits does not take the others down: the supervisor says which node stopped
//! and how (its exit status or the signal that killed it), and the others go on, as they would
//! on separate machines. `restart N` typed into the cluster's terminal starts node N again (or
//! restarts it, if it runs); `stop`, or Ctrl-C, stops them all with SIGTERM and waits for them.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::Error;
use crate::tls::ClusterPki;

/// How long a node gets to stop after SIGTERM before it is killed: its shutdown grace (10 s by
/// default) and the drain after it.
pub const STOP_GRACE: Duration = Duration::from_secs(15);

/// What the cluster runs.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The `kvstore-server` binary.
    pub server: PathBuf,
    /// One node per port, on 127.0.0.1.
    pub ports: Vec<u16>,
    /// Node N keeps its data in `data_root/nodeN`.
    pub data_root: PathBuf,
    /// Flags added to every node's command line.
    pub extra_args: Vec<String>,
    /// Serve TLS, node N with its own certificate and every node with the CA.
    pub tls: Option<ClusterPki>,
}

impl Plan {
    /// The arguments of `kvstore-cli` that open a REPL on the first node, e.g.
    /// `--tls-ca target/cluster/tls/ca.pem 5001`.
    pub fn repl_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(pki) = &self.tls {
            args.push("--tls-ca".to_string());
            args.push(pki.ca.display().to_string());
        }
        args.push(self.ports.first().map_or(0, |p| *p).to_string());
        args
    }
}

/// Where the cluster's output goes (its own lines and the nodes'), shared with the threads
/// that forward the nodes' output.
pub type Output = Arc<Mutex<dyn Write + Send>>;

/// Something the person at the cluster's terminal asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Start node N (1-based) again, stopping it first if it runs.
    Restart(usize),
    /// Stop every node and leave.
    Stop,
    Help,
}

/// What the cluster's terminal takes.
pub const HELP: &str = "type `restart N` to restart node N, `stop` (or Ctrl-C) to stop all";

/// Reads one line typed into the cluster's terminal; `None` for a blank line.
pub fn parse_request(line: &str, nodes: usize) -> Result<Option<Request>, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words[..] {
        [] => Ok(None),
        ["restart", n] => match n.parse::<usize>() {
            Ok(n) if (1..=nodes).contains(&n) => Ok(Some(Request::Restart(n))),
            _ => Err(format!("no node {n}: nodes are 1 to {nodes}")),
        },
        ["stop" | "quit" | "exit"] => Ok(Some(Request::Stop)),
        ["help"] => Ok(Some(Request::Help)),
        _ => Err(format!("unknown command '{}'; {HELP}", line.trim())),
    }
}

/// A running cluster.
pub struct Supervisor {
    plan: Plan,
    nodes: Vec<Option<Child>>,
    out: Output,
}

impl Supervisor {
    /// Starts every node of `plan`.
    pub fn start(plan: Plan, out: Output) -> Result<Self, Error> {
        let mut supervisor = Self {
            nodes: plan.ports.iter().map(|_| None).collect(),
            plan,
            out,
        };
        for i in 0..supervisor.nodes.len() {
            supervisor.spawn(i)?;
        }
        Ok(supervisor)
    }

    /// Writes a line of the cluster's own. Never fails: if the output is gone (the terminal
    /// closed, a pager quit), the nodes must still be stopped.
    pub fn say(&self, line: &str) {
        let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = writeln!(out, "cluster: {line}");
        let _ = out.flush();
    }

    /// How many nodes the cluster has.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`'s process id (0-based), while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].as_ref().map(Child::id)
    }

    fn spawn(&mut self, i: usize) -> Result<(), Error> {
        let plan = &self.plan;
        let port = plan.ports[i];
        let mut cmd = Command::new(&plan.server);
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--node-id")
            .arg(format!("node{}", i + 1))
            .arg("--data-dir")
            .arg(plan.data_root.join(format!("node{}", i + 1)));
        for peer in plan.ports.iter().filter(|p| **p != port) {
            cmd.arg("--peer").arg(format!("127.0.0.1:{peer}"));
        }
        if let Some(pki) = &plan.tls {
            cmd.args(pki.node_args(i));
        }
        cmd.args(&plan.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::Node(format!("starting {}: {e}", plan.server.display())))?;
        let prefix = format!("[node{}]", i + 1);
        forward(child.stdout.take(), prefix.clone(), self.out.clone());
        forward(child.stderr.take(), prefix, self.out.clone());
        self.nodes[i] = Some(child);
        Ok(())
    }

    /// Checks on every node; reports, and forgets, those that have exited. Returns them
    /// (0-based) with how they ended.
    pub fn poll(&mut self) -> Vec<(usize, ExitStatus)> {
        let mut exited = Vec::new();
        for (i, node) in self.nodes.iter_mut().enumerate() {
            let Some(child) = node else { continue };
            if let Ok(Some(status)) = child.try_wait() {
                *node = None;
                exited.push((i, status));
            }
        }
        for (i, status) in &exited {
            let running = self.nodes.iter().flatten().count();
            self.say(&format!(
                "node{} exited ({status}); {running} of {} nodes still running; \
                 `restart {}` starts it again",
                i + 1,
                self.nodes.len(),
                i + 1
            ));
        }
        exited
    }

    /// Does what was asked. Returns false when the cluster should end.
    pub fn handle(&mut self, request: Request) -> Result<bool, Error> {
        match request {
            Request::Restart(n) => {
                let i = n - 1;
                if self.nodes[i].is_some() {
                    self.say(&format!("stopping node{n}"));
                    self.stop(&[i]);
                }
                self.spawn(i)?;
                self.say(&format!("node{n} started again"));
                Ok(true)
            }
            Request::Help => {
                self.say(HELP);
                Ok(true)
            }
            Request::Stop => {
                self.stop_all();
                Ok(false)
            }
        }
    }

    /// Stops every running node with SIGTERM, by PID, and waits for them; a node still
    /// running after [`STOP_GRACE`] is killed. Returns whether every node stopped cleanly.
    pub fn stop_all(&mut self) -> bool {
        self.say("stopping");
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        self.stop(&all)
    }

    fn stop(&mut self, which: &[usize]) -> bool {
        for &i in which {
            if let Some(child) = &self.nodes[i] {
                // By PID, never by name: only the processes this cluster started.
                let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        let mut clean = true;
        for &i in which {
            let Some(mut child) = self.nodes[i].take() else {
                continue;
            };
            let status = loop {
                match child.try_wait() {
                    Ok(Some(status)) => break Some(status),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break None;
                    }
                }
            };
            match status {
                Some(status) => {
                    clean &= status.success();
                    self.say(&format!("node{} stopped ({status})", i + 1));
                }
                None => {
                    clean = false;
                    self.say(&format!("node{} did not stop in time; killed it", i + 1));
                }
            }
        }
        clean
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        for child in self.nodes.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Copies each line of a node's output to the cluster's, prefixed with the node's name.
fn forward(stream: Option<impl std::io::Read + Send + 'static>, prefix: String, out: Output) {
    let Some(stream) = stream else { return };
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let mut out = out.lock().unwrap_or_else(PoisonError::into_inner);
            let _ = writeln!(out, "{prefix} {line}");
            let _ = out.flush();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_typed_into_the_terminal() {
        assert_eq!(parse_request("restart 2", 3), Ok(Some(Request::Restart(2))));
        assert_eq!(
            parse_request("  restart   3 ", 3),
            Ok(Some(Request::Restart(3)))
        );
        assert_eq!(parse_request("stop", 3), Ok(Some(Request::Stop)));
        assert_eq!(parse_request("", 3), Ok(None));
        assert_eq!(parse_request("help", 3), Ok(Some(Request::Help)));
        assert_eq!(
            parse_request("restart 4", 3),
            Err("no node 4: nodes are 1 to 3".into())
        );
        assert_eq!(
            parse_request("restart 0", 3),
            Err("no node 0: nodes are 1 to 3".into())
        );
        let err = parse_request("reboot 1", 3).unwrap_err();
        assert!(
            err.contains("unknown command 'reboot 1'") && err.contains("restart N"),
            "{err}"
        );
    }
}
