//! Test hosts with real links on one machine: one network namespace per
//! host, joined by veth pairs to a bridge in a switch namespace, each host's
//! egress shaped with `tc tbf` (netem is not available on these kernels).
//! Needs root. Everything is removed on drop; namespaces left by an
//! interrupted run (same prefix) are removed at the next start.

use super::TestbedError;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

const PREFIX: &str = "dcm-";

/// Network namespaces for test hosts on a shared bridge; removed on drop.
pub struct Net {
    tag: String,
    /// The hosts, in the order their names were given.
    pub hosts: Vec<NetHost>,
}

/// One host's namespace and address.
pub struct NetHost {
    /// The host's name (its agent's `--name`).
    pub name: String,
    /// Its network namespace (for `ip netns exec`).
    pub ns: String,
    /// Its address on the bridge: 10.77.0.N/24, N counted from 1.
    pub ip: IpAddr,
}

fn run(args: &[&str]) -> Result<(), TestbedError> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| TestbedError(format!("{}: {e}", args[0])))?;
    if !out.status.success() {
        return Err(TestbedError(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Removes namespaces a previous run with this tag prefix left behind.
pub fn cleanup_stale(tag_prefix: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let ns = line.split_whitespace().next().unwrap_or("");
        if ns.starts_with(&format!("{PREFIX}{tag_prefix}")) {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

impl Net {
    /// Creates the hosts with egress (and, if given, ingress) shaped to
    /// `egress_mbit` / `ingress_mbit` Mbit/s. `tag` keeps concurrent runs apart.
    pub fn create(
        tag: &str,
        names: &[&str],
        egress_mbit: u64,
        ingress_mbit: Option<u64>,
    ) -> Result<Self, TestbedError> {
        let sw = format!("{PREFIX}{tag}-sw");
        let mut net = Net { tag: tag.to_owned(), hosts: vec![] };
        run(&["ip", "netns", "add", &sw])?;
        run(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        // tbf needs a bucket of at least rate/HZ; 1 ms of traffic, 64 KiB minimum.
        let burst = |mbit: u64| format!("{}", (mbit * 1_000_000 / 8 / 1000).max(64 * 1024));
        for (i, n) in names.iter().enumerate() {
            let ns = format!("{PREFIX}{tag}-{n}");
            let (h, s) = (format!("dh{i}{tag}"), format!("ds{i}{tag}"));
            let ip = IpAddr::V4(Ipv4Addr::new(10, 77, 0, i as u8 + 1));
            run(&["ip", "netns", "add", &ns])?;
            net.hosts.push(NetHost { name: n.to_string(), ns: ns.clone(), ip });
            run(&["ip", "link", "add", &h, "type", "veth", "peer", "name", &s])?;
            run(&["ip", "link", "set", &h, "netns", &ns])?;
            run(&["ip", "link", "set", &s, "netns", &sw])?;
            run(&["ip", "-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", &h])?;
            run(&["ip", "-n", &ns, "link", "set", &h, "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            run(&["ip", "-n", &sw, "link", "set", &s, "master", "br0"])?;
            run(&["ip", "-n", &sw, "link", "set", &s, "up"])?;
            let rate = format!("{egress_mbit}mbit");
            run(&[
                "tc",
                "-n",
                &ns,
                "qdisc",
                "add",
                "dev",
                &h,
                "root",
                "tbf",
                "rate",
                &rate,
                "burst",
                &burst(egress_mbit),
                "latency",
                "50ms",
            ])?;
            if let Some(mbit) = ingress_mbit {
                let rate = format!("{mbit}mbit");
                run(&[
                    "tc",
                    "-n",
                    &sw,
                    "qdisc",
                    "add",
                    "dev",
                    &s,
                    "root",
                    "tbf",
                    "rate",
                    &rate,
                    "burst",
                    &burst(mbit),
                    "latency",
                    "50ms",
                ])?;
            }
        }
        Ok(net)
    }

    /// Takes `name`'s port on the bridge down (the link is cut: nothing
    /// passes either way, no error is seen) or up again.
    pub fn set_link(&self, name: &str, up: bool) -> Result<(), TestbedError> {
        let i = self.index(name)?;
        let sw = format!("{PREFIX}{}-sw", self.tag);
        run(&["ip", "-n", &sw, "link", "set", &format!("ds{i}{}", self.tag), if up { "up" } else { "down" }])
    }

    /// Shapes what reaches `name` (its port on the bridge) to `mbit`
    /// Mbit/s from now on, whatever it was.
    pub fn shape_ingress(&self, name: &str, mbit: u64) -> Result<(), TestbedError> {
        let i = self.index(name)?;
        let (sw, dev) = (format!("{PREFIX}{}-sw", self.tag), format!("ds{i}{}", self.tag));
        let (rate, burst) = (format!("{mbit}mbit"), format!("{}", (mbit * 1_000_000 / 8 / 1000).max(64 * 1024)));
        let args = ["tc", "-n", &sw, "qdisc", "replace", "dev", &dev, "root", "tbf", "rate", &rate, "burst", &burst];
        run(&[&args[..], &["latency", "50ms"]].concat())
    }

    /// Where `name` is among the hosts (its veth pair's number).
    fn index(&self, name: &str) -> Result<usize, TestbedError> {
        self.hosts
            .iter()
            .position(|h| h.name == name)
            .ok_or_else(|| TestbedError(format!("no host {name} in this network")))
    }

    /// The host named `name`, if it is one of these.
    pub fn host(&self, name: &str) -> Option<&NetHost> {
        self.hosts.iter().find(|h| h.name == name)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of each veth pair, and so the pair.
        for h in &self.hosts {
            let _ = run(&["ip", "netns", "del", &h.ns]);
        }
        let _ = run(&["ip", "netns", "del", &format!("{PREFIX}{}-sw", self.tag)]);
    }
}
