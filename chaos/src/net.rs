//! The hosts of a chaos run: one Linux network namespace per host, each
//! joined by a veth pair to a bridge in a router namespace, on the private
//! range 10.77.0.0/24. Faults on links are nftables rules in the receiving
//! host's namespace (drop by source, `numgen` loss, a byte-rate limit);
//! healing flushes them. Everything is named with one prefix, so a run's
//! leftovers (after a crash of the harness itself) are found and removed.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use anyhow::{bail, Context};

/// Every namespace of a run starts with this.
pub const PREFIX: &str = "cwx-";

/// The router's namespace (the bridge lives there).
const ROUTER: &str = "cwx-router";

/// One host: its name in the run, its namespace and address.
#[derive(Debug, Clone)]
pub struct Host {
    /// The host's name (`c1`, `a`, `client`).
    pub name: String,
    /// Its namespace.
    pub netns: String,
    /// Its address on the bridge.
    pub ip: IpAddr,
}

/// The run's network: hosts by name. Dropping it removes every namespace
/// (with its interfaces and rules) and kills what still runs in them.
pub struct Net {
    /// The hosts.
    pub hosts: BTreeMap<String, Host>,
}

/// Runs a command, failing with its stderr.
pub fn run(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What a host needs that this machine may lack, as an error that says how
/// to get it.
pub fn preflight() -> anyhow::Result<()> {
    if !crate::sys::is_root() {
        bail!(
            "the chaos suite builds network namespaces and needs root: run it as root (CI does: scripts/chaos), e.g. `sudo scripts/chaos`"
        );
    }
    for (tool, package) in [("ip", "iproute2"), ("nft", "nftables")] {
        if Command::new(tool).arg("-V").output().is_err()
            && Command::new(tool).arg("--version").output().is_err()
        {
            bail!("`{tool}` is missing: install the Debian package {package} (scripts/chaos does)");
        }
    }
    Ok(())
}

/// The one run on this machine: held while a run lives, so a second run
/// (or `clean`) cannot sweep away the first one's hosts.
pub struct RunLock(std::path::PathBuf);

impl RunLock {
    /// Takes the lock, or says which run holds it. A lock whose process is
    /// gone is taken over.
    pub fn take() -> anyhow::Result<Self> {
        let path = std::path::PathBuf::from("/run/causeway-chaos.pid");
        if let Ok(pid) = std::fs::read_to_string(&path) {
            let pid = pid.trim();
            if !pid.is_empty() && std::path::Path::new(&format!("/proc/{pid}")).exists() {
                bail!(
                    "another chaos run (pid {pid}) is using the namespaces; wait for it, or stop it (it cleans up on Ctrl-C)"
                );
            }
        }
        std::fs::write(&path, std::process::id().to_string())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Removes every namespace a run left behind, killing what runs there.
pub fn sweep() {
    let Ok(list) = run(&["ip", "netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if name.starts_with(PREFIX) {
            remove_netns(name);
        }
    }
}

fn remove_netns(name: &str) {
    if let Ok(pids) = run(&["ip", "netns", "pids", name]) {
        let me = std::process::id().to_string();
        // The harness itself lives on the client host: never itself.
        for pid in pids.split_whitespace().filter(|p| *p != me) {
            let _ = run(&["kill", "-CONT", pid]);
            let _ = run(&["kill", "-KILL", pid]);
        }
    }
    let _ = run(&["ip", "netns", "del", name]);
}

impl Net {
    /// Builds the router and one host per `(name, last octet)`.
    pub fn build(hosts: &[(&str, u8)]) -> anyhow::Result<Self> {
        sweep();
        let mut net = Net {
            hosts: BTreeMap::new(),
        };
        run(&["ip", "netns", "add", ROUTER])?;
        run(&["ip", "-n", ROUTER, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", ROUTER, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", ROUTER, "link", "set", "br0", "up"])?;
        for (name, octet) in hosts {
            let netns = format!("{PREFIX}{name}");
            let ip = IpAddr::V4(Ipv4Addr::new(10, 77, 0, *octet));
            let peer = format!("cwv-{name}");
            run(&["ip", "netns", "add", &netns])?;
            net.hosts.insert(
                name.to_string(),
                Host {
                    name: name.to_string(),
                    netns: netns.clone(),
                    ip,
                },
            );
            run(&[
                "ip", "link", "add", &peer, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ])?;
            run(&["ip", "link", "set", &peer, "netns", ROUTER])?;
            run(&["ip", "-n", ROUTER, "link", "set", &peer, "master", "br0"])?;
            run(&["ip", "-n", ROUTER, "link", "set", &peer, "up"])?;
            let cidr = format!("{ip}/24");
            run(&["ip", "-n", &netns, "addr", "add", &cidr, "dev", "eth0"])?;
            run(&["ip", "-n", &netns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &netns, "link", "set", "lo", "up"])?;
            nft(
                &netns,
                "add table inet chaos; add chain inet chaos input { type filter hook input priority 0; policy accept; }",
            )?;
        }
        Ok(net)
    }

    /// A host by name.
    pub fn host(&self, name: &str) -> &Host {
        &self.hosts[name]
    }

    /// Drops, at `to`, every packet from the hosts `from`.
    pub fn drop_from(&self, to: &str, from: &[&str]) -> anyhow::Result<()> {
        if from.is_empty() {
            return Ok(());
        }
        let set: Vec<String> = from.iter().map(|h| self.host(h).ip.to_string()).collect();
        nft(
            &self.host(to).netns,
            &format!(
                "add rule inet chaos input ip saddr {{ {} }} drop",
                set.join(", ")
            ),
        )
    }

    /// Drops `percent`% of the packets `to` receives from `from`, at random.
    pub fn lose(&self, to: &str, from: &[&str], percent: u8) -> anyhow::Result<()> {
        let set: Vec<String> = from.iter().map(|h| self.host(h).ip.to_string()).collect();
        nft(
            &self.host(to).netns,
            &format!(
                "add rule inet chaos input ip saddr {{ {} }} numgen random mod 100 < {percent} drop",
                set.join(", ")
            ),
        )
    }

    /// Caps what `to` receives from `from` at `kbytes` per second (the
    /// excess is dropped, as a policer does).
    pub fn cap(&self, to: &str, from: &[&str], kbytes: u32) -> anyhow::Result<()> {
        let set: Vec<String> = from.iter().map(|h| self.host(h).ip.to_string()).collect();
        nft(
            &self.host(to).netns,
            &format!(
                "add rule inet chaos input ip saddr {{ {} }} limit rate over {kbytes} kbytes/second drop",
                set.join(", ")
            ),
        )
    }

    /// Removes every link fault at `host`.
    pub fn heal(&self, host: &str) -> anyhow::Result<()> {
        nft(&self.host(host).netns, "flush chain inet chaos input")
    }

    /// Removes every link fault everywhere.
    pub fn heal_all(&self) -> anyhow::Result<()> {
        for h in self.hosts.keys() {
            self.heal(h)?;
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in self.hosts.values() {
            remove_netns(&h.netns);
        }
        remove_netns(ROUTER);
    }
}

/// Runs an nft script in a namespace.
fn nft(netns: &str, script: &str) -> anyhow::Result<()> {
    run(&["ip", "netns", "exec", netns, "nft", script]).map(|_| ())
}
