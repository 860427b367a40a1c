//! A private network for one chaos scenario: every process in its own network namespace, joined
//! to a bridge in a hub namespace by a veth pair, each with its own address (inside the namespaces
//! only; the host's own network is never touched).
//!
//! Faults, each reversible by [`Net::heal`]:
//! - a cut between two hosts (both directions) or in one direction: a blackhole route for the
//!   other's address in the sending host's namespace;
//! - isolating a host: its port on the bridge goes down, so nothing passes either way and nobody
//!   gets an error, as when a cable is pulled;
//! - a partition: cuts between every pair across two sides.
//!
//! Dropping a [`Net`] deletes every namespace it created, which removes their links with them;
//! namespaces left by a test process that died are removed the next time one is created.

use std::collections::BTreeSet;
use std::fs::File;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use nix::sched::{setns, CloneFlags};

/// First three octets of every address; hosts get .10 upwards.
const SUBNET: &str = "10.77.0";

/// One host of the network.
#[derive(Debug, Clone)]
pub struct Host {
    /// Short name ("client", "a1", "n1").
    pub name: String,
    /// Namespace name.
    pub ns: String,
    /// Address inside the network.
    pub ip: String,
    /// Port of its veth on the bridge (in the hub namespace).
    hub_port: String,
}

/// The network of one scenario.
pub struct Net {
    hub: String,
    hosts: Vec<Host>,
    /// Network namespace of the calling thread before [`Net::enter`], restored on drop.
    original: Option<File>,
    /// Cuts in place, as (from, to): `from` cannot send to `to`.
    cuts: BTreeSet<(String, String)>,
    /// Hosts whose bridge port is down.
    isolated: BTreeSet<String>,
}

/// Why namespaces cannot be used here, if they cannot (probed once per test process).
pub fn unavailable_reason() -> Option<String> {
    static PROBE: OnceLock<Option<String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            if !nix::unistd::Uid::effective().is_root() {
                return Some("network namespaces need root (run as root, as CI does)".into());
            }
            let probe = format!("fcprobe-{}", std::process::id());
            match ip(&["netns", "add", &probe]) {
                Ok(()) => {
                    let _ = ip(&["netns", "del", &probe]);
                    None
                }
                Err(e) => Some(format!("cannot create a network namespace: {e}")),
            }
        })
        .clone()
}

/// Runs `ip` with arguments; the error holds its stderr.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip` (Debian package iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `ip` and panics on failure (set-up and faults must not fail silently).
fn ip_ok(args: &[&str]) {
    if let Err(e) = ip(args) {
        panic!("{e}");
    }
}

/// Removes namespaces of chaos runs whose test process is gone.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("fcc") else {
            continue;
        };
        let pid: Option<u32> = rest.split('-').next().and_then(|p| p.parse().ok());
        if let Some(pid) = pid {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = ip(&["netns", "del", name]);
            }
        }
    }
}

impl Net {
    /// Creates the hub and one namespace per host name, all linked to the bridge.
    pub fn create(names: &[&str]) -> Net {
        static RUN: AtomicUsize = AtomicUsize::new(0);
        remove_stale();
        let run = RUN.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("fcc{}-{run}", std::process::id());
        let hub = format!("{prefix}-hub");
        let mut net = Net {
            hub: hub.clone(),
            hosts: Vec::new(),
            original: None,
            cuts: BTreeSet::new(),
            isolated: BTreeSet::new(),
        };
        ip_ok(&["netns", "add", &hub]);
        ip_ok(&["-n", &hub, "link", "set", "lo", "up"]);
        ip_ok(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip_ok(&["-n", &hub, "link", "set", "br0", "up"]);
        for (i, name) in names.iter().enumerate() {
            let ns = format!("{prefix}-{name}");
            let hub_port = format!("h{i}");
            let host_ip = format!("{SUBNET}.{}", 10 + i);
            ip_ok(&["netns", "add", &ns]);
            net.hosts.push(Host {
                name: name.to_string(),
                ns: ns.clone(),
                ip: host_ip.clone(),
                hub_port: hub_port.clone(),
            });
            ip_ok(&["-n", &ns, "link", "set", "lo", "up"]);
            ip_ok(&[
                "-n", &hub, "link", "add", &hub_port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip_ok(&["-n", &hub, "link", "set", &hub_port, "master", "br0", "up"]);
            ip_ok(&["-n", &ns, "addr", "add", &format!("{host_ip}/24"), "dev", "eth0"]);
            ip_ok(&["-n", &ns, "link", "set", "eth0", "up"]);
        }
        net
    }

    /// A host by name.
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in this network"))
    }

    /// Address of a host.
    pub fn ip(&self, name: &str) -> String {
        self.host(name).ip.clone()
    }

    /// Moves the calling thread into a host's namespace (threads it starts afterwards, such as a
    /// tokio runtime's workers, inherit it). The thread goes back where it was when the net drops.
    pub fn enter(&mut self, name: &str) {
        if self.original.is_none() {
            self.original = Some(File::open("/proc/thread-self/ns/net").expect("open own netns"));
        }
        let target = File::open(format!("/run/netns/{}", self.host(name).ns)).expect("open netns");
        setns(&target, CloneFlags::CLONE_NEWNET).expect("setns into the client namespace");
    }

    /// A command that runs `program` inside a host's namespace (`ip netns exec` executes the
    /// program itself, so the child's pid is the program's).
    pub fn command(&self, name: &str, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host(name).ns]).arg(program);
        c
    }

    /// `from` can no longer send to `to` (replies the other way still arrive).
    pub fn cut_one_way(&mut self, from: &str, to: &str) {
        if self.cuts.insert((from.to_string(), to.to_string())) {
            let (ns, dst) = (self.host(from).ns.clone(), self.ip(to));
            ip_ok(&["-n", &ns, "route", "add", "blackhole", &format!("{dst}/32")]);
        }
    }

    /// Cuts the link between two hosts in both directions.
    pub fn cut(&mut self, a: &str, b: &str) {
        self.cut_one_way(a, b);
        self.cut_one_way(b, a);
    }

    /// Cuts every link between the two sides.
    pub fn partition(&mut self, side_a: &[&str], side_b: &[&str]) {
        for a in side_a {
            for b in side_b {
                self.cut(a, b);
            }
        }
    }

    /// Takes a host off the bridge: nothing passes either way, silently.
    pub fn isolate(&mut self, name: &str) {
        if self.isolated.insert(name.to_string()) {
            let port = self.host(name).hub_port.clone();
            ip_ok(&["-n", &self.hub, "link", "set", &port, "down"]);
        }
    }

    /// Removes every cut and isolation.
    pub fn heal(&mut self) {
        for (from, to) in std::mem::take(&mut self.cuts) {
            let (ns, dst) = (self.host(&from).ns.clone(), self.ip(&to));
            ip_ok(&["-n", &ns, "route", "del", "blackhole", &format!("{dst}/32")]);
        }
        for name in std::mem::take(&mut self.isolated) {
            let port = self.host(&name).hub_port.clone();
            ip_ok(&["-n", &self.hub, "link", "set", &port, "up"]);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(original) = self.original.take() {
            let _ = setns(&original, CloneFlags::CLONE_NEWNET);
        }
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["netns", "del", &self.hub]);
    }
}
