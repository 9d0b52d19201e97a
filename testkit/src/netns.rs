//! Hosts with a real network between them, on one machine: each node gets a network namespace
//! of its own with one address, joined to the others by a veth pair on a bridge. The bridge
//! lives in the caller's namespace with an address of its own, so the test (and the proxies it
//! runs there) reach every host across it. Faults are the network's: a link set down, nftables
//! rules that drop the traffic between hosts, or a share of every host's packets.
//!
//! Needs root (and `ip` and `nft`). Everything is named after the process and a counter, so
//! topologies of parallel tests do not meet, and all of it is removed on drop.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::Error;

/// Topologies made by this process so far, for unique names.
static MADE: AtomicU32 = AtomicU32::new(0);

/// The nftables table a topology's rules go in, in each host's namespace.
const TABLE: &str = "kvstore_test";

/// A bridge and the hosts on it.
#[derive(Debug)]
pub struct Topology {
    /// Prefix of every name made here.
    id: String,
    bridge: String,
    /// The bridge's subnet: 10.77.`subnet`.0/24.
    subnet: u8,
    hosts: usize,
    /// What was made so far, and is removed on drop (never what someone else made).
    made_bridge: bool,
    made_hosts: usize,
}

/// Runs `program args` and fails, with what it printed, if it does.
fn run(program: &str, args: &[&str]) -> Result<(), Error> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Node(format!("{program}: {e} (is it installed?)")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Node(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A subnet 10.77.N.0/24 that no route of this namespace uses yet (another topology's, say).
fn free_subnet(pid: u32, made: u32) -> Result<u8, Error> {
    let out = Command::new("ip")
        .args(["-4", "route", "show"])
        .output()
        .map_err(|e| Error::Node(format!("ip: {e} (is it installed?)")))?;
    let routes = String::from_utf8_lossy(&out.stdout);
    let first = (pid as u64 * 31 + made as u64) % 200;
    (0..200)
        .map(|n| ((first + n) % 200 + 20) as u8)
        .find(|s| !routes.contains(&format!("10.77.{s}.")))
        .ok_or_else(|| Error::Node("no free 10.77.N.0/24 subnet for a topology".into()))
}

impl Topology {
    /// Makes `hosts` namespaces on a new bridge.
    pub fn create(hosts: usize) -> Result<Self, Error> {
        assert!(hosts < 100, "one /24 per topology");
        let made = MADE.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let id = format!("kv{}x{made}", pid % 100_000);
        let mut topology = Self {
            bridge: format!("{id}br"),
            id,
            subnet: free_subnet(pid, made)?,
            hosts,
            made_bridge: false,
            made_hosts: 0,
        };
        // From here on, a failure removes what was made (Drop).
        run("ip", &["link", "add", &topology.bridge, "type", "bridge"])?;
        topology.made_bridge = true;
        let bridge = &topology.bridge.clone();
        let host_cidr = format!("{}/24", topology.host_addr());
        run("ip", &["addr", "add", &host_cidr, "dev", bridge])?;
        run("ip", &["link", "set", bridge, "up"])?;
        for i in 0..hosts {
            let ns = topology.namespace(i);
            let outside = topology.veth(i);
            run("ip", &["netns", "add", &ns])?;
            topology.made_hosts = i + 1;
            run(
                "ip",
                &[
                    "link", "add", &outside, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            )?;
            run("ip", &["link", "set", &outside, "master", bridge])?;
            run("ip", &["link", "set", &outside, "up"])?;
            let cidr = format!("{}/24", topology.addr(i));
            run("ip", &["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            topology.nft(i, &format!("add table inet {TABLE}"))?;
            // Partitions in `input` and `output`, loss in `loss`: each is undone alone.
            for (chain, hook) in [("input", "input"), ("output", "output"), ("loss", "input")] {
                topology.nft(
                    i,
                    &format!(
                        "add chain inet {TABLE} {chain} {{ type filter hook {hook} priority 0; }}"
                    ),
                )?;
            }
        }
        Ok(topology)
    }

    pub fn len(&self) -> usize {
        self.hosts
    }

    pub fn is_empty(&self) -> bool {
        self.hosts == 0
    }

    /// Host `i`'s namespace.
    pub fn namespace(&self, i: usize) -> String {
        format!("{}n{i}", self.id)
    }

    /// The bridge's end of host `i`'s link.
    fn veth(&self, i: usize) -> String {
        format!("{}v{i}", self.id)
    }

    /// Host `i`'s address.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, i as u8 + 1)
    }

    /// The bridge's own address, in the caller's namespace: where proxies between hosts
    /// listen.
    pub fn host_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, 254)
    }

    /// A command that runs `program` in host `i`'s namespace. `ip netns exec` execs the
    /// program, so the child's PID is the program's.
    pub fn command(&self, i: usize, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.namespace(i)]).arg(program);
        cmd
    }

    fn nft(&self, i: usize, rule: &str) -> Result<(), Error> {
        let ns = self.namespace(i);
        let mut args = vec!["netns", "exec", &ns, "nft"];
        args.extend(rule.split_whitespace());
        run("ip", &args)
    }

    /// Sets host `i`'s link down (`up` false) or up: it is cut off from everyone, clients
    /// included, as by a pulled cable.
    pub fn set_link(&self, i: usize, up: bool) -> Result<(), Error> {
        let state = if up { "up" } else { "down" };
        run("ip", &["link", "set", &self.veth(i), state])
    }

    /// Drops every packet between the hosts of different `sides` (nftables, both directions,
    /// in every host's namespace). Hosts on no side are left alone; the bridge's own address
    /// (clients, proxies) is never blocked.
    pub fn partition(&self, sides: &[&[usize]]) -> Result<(), Error> {
        for (s, side) in sides.iter().enumerate() {
            let others: Vec<String> = (sides.iter().enumerate())
                .filter(|(o, _)| *o != s)
                .flat_map(|(_, other)| other.iter().map(|&j| self.addr(j).to_string()))
                .collect();
            if others.is_empty() {
                continue;
            }
            let set = others.join(", ");
            for &i in side.iter() {
                self.nft(
                    i,
                    &format!("add rule inet {TABLE} input ip saddr {{ {set} }} drop"),
                )?;
                self.nft(
                    i,
                    &format!("add rule inet {TABLE} output ip daddr {{ {set} }} drop"),
                )?;
            }
        }
        Ok(())
    }

    /// Drops `percent` % of the packets every host receives, at random (nftables `numgen`),
    /// from everyone: other hosts, clients and proxies. Replaces any earlier loss; 0 ends it.
    pub fn set_loss(&self, percent: u32) -> Result<(), Error> {
        for i in 0..self.hosts {
            self.nft(i, &format!("flush chain inet {TABLE} loss"))?;
            if percent > 0 {
                self.nft(
                    i,
                    &format!("add rule inet {TABLE} loss numgen random mod 100 < {percent} drop"),
                )?;
            }
        }
        Ok(())
    }

    /// Removes every partition and sets every link up (loss stays: see `set_loss`).
    pub fn heal(&self) -> Result<(), Error> {
        for i in 0..self.hosts {
            for chain in ["input", "output"] {
                self.nft(i, &format!("flush chain inet {TABLE} {chain}"))?;
            }
            self.set_link(i, true)?;
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Removing a namespace removes its end of the veth pair, and with it the other end.
        for i in 0..self.made_hosts {
            let _ = run("ip", &["netns", "del", &self.namespace(i)]);
            let _ = run("ip", &["link", "del", &self.veth(i)]);
        }
        if self.made_bridge {
            let _ = run("ip", &["link", "del", &self.bridge]);
        }
    }
}
