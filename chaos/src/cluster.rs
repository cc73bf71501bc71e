//! The federation under test, placed on the run's hosts: five controllers
//! (`c1`–`c5`, each with its data on a tmpfs of its own so a disk can fill
//! up), and three sites (`a`, `b`, `c`: gateway and DNS server), all real
//! `causeway` processes started through [`causeway::local`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use causeway::local::{Export, Host, LocalFederation};
use causeway_api::pb;

use crate::net::{run, Net};

/// Controller ids.
pub const CONTROLLERS: [u64; 5] = [1, 2, 3, 4, 5];
/// Site names.
pub const SITES: [&str; 3] = ["a", "b", "c"];
/// The port every site's sample workload (an echo server) listens on, on
/// its host's loopback.
pub const ECHO_PORT: u16 = 7000;
/// Size of each controller's data disk.
const DISK_MB: u32 = 256;

/// The services each site exports: its own `echo-<site>`, and `shared`
/// from `b` and `c` (so `a`'s calls to it fail over when one is lost).
pub fn exports_of(site: &str) -> Vec<Export> {
    let ep = vec![std::net::SocketAddr::from(([127, 0, 0, 1], ECHO_PORT))];
    let mut out = vec![Export {
        service: format!("chaos/echo-{site}"),
        port: ECHO_PORT,
        endpoints: ep.clone(),
    }];
    if site != "a" {
        out.push(Export {
            service: "chaos/shared".into(),
            port: ECHO_PORT + 1,
            endpoints: ep,
        });
    }
    out
}

/// The DNS names (and ports) `site`'s workload calls.
pub fn targets_of(site: &str) -> Vec<(String, u16)> {
    let mut out: Vec<(String, u16)> = SITES
        .iter()
        .filter(|s| **s != site)
        .map(|s| (format!("echo-{s}.chaos.svc.clusterset.local"), ECHO_PORT))
        .collect();
    if site == "a" {
        out.push(("shared.chaos.svc.clusterset.local".into(), ECHO_PORT + 1));
    }
    out
}

/// Host name of controller `id`.
pub fn controller_host(id: u64) -> String {
    format!("c{id}")
}

/// The federation and what the harness changed under it.
pub struct Cluster {
    /// The processes.
    pub fed: LocalFederation,
    /// The controllers' tmpfs mounts.
    mounts: Vec<PathBuf>,
}

impl Cluster {
    /// Starts the controllers and waits for a leader.
    pub async fn start_controllers(net: &Net, bin: PathBuf, root: PathBuf) -> anyhow::Result<Self> {
        let mut fed = LocalFederation::new(bin, root.clone())?;
        let mut mounts = Vec::new();
        for id in CONTROLLERS {
            let h = net.host(&controller_host(id));
            fed.controller_hosts.insert(
                id,
                Host {
                    netns: h.netns.clone(),
                    ip: h.ip,
                },
            );
            let dir = root.join(format!("controller-{id}"));
            std::fs::create_dir_all(&dir)?;
            run(&[
                "mount",
                "-t",
                "tmpfs",
                "-o",
                &format!("size={DISK_MB}m"),
                "tmpfs",
                &dir.display().to_string(),
            ])?;
            mounts.push(dir);
        }
        let mut me = Self { fed, mounts };
        me.fed.start_controllers(CONTROLLERS.len() as u64)?;
        me.fed.wait_for_leader(Duration::from_secs(30)).await?;
        Ok(me)
    }

    /// Joins the three sites (their workloads must be listening already).
    pub async fn start_sites(&mut self, net: &Net) -> anyhow::Result<()> {
        for (i, site) in SITES.iter().enumerate() {
            let h = net.host(site);
            self.fed.site_hosts.insert(
                site.to_string(),
                Host {
                    netns: h.netns.clone(),
                    ip: h.ip,
                },
            );
            let range = format!("127.0.{}.0/24", 10 + i);
            self.fed
                .add_site(site, &range, &exports_of(site))
                .await
                .with_context(|| format!("joining site {site}"))?;
        }
        Ok(())
    }

    /// The controller a majority names leader, if any (asks each running
    /// node, one second each).
    pub async fn leader(&self) -> Option<u64> {
        let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
        for id in CONTROLLERS {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_secs(1), self.fed.status(id)).await
            {
                if s.leader_id != 0 {
                    *votes.entry(s.leader_id).or_default() += 1;
                }
            }
        }
        votes
            .into_iter()
            .find(|(_, n)| *n > CONTROLLERS.len() / 2)
            .map(|(id, _)| id)
    }

    /// SIGKILL of controller `id`.
    pub async fn kill(&mut self, id: u64) {
        self.fed.controller(id).kill().await;
    }

    /// Starts controller `id` again if it is not running (`failpoints`:
    /// the `CAUSEWAY_FAILPOINTS` it runs with, none when empty).
    pub fn start(&mut self, id: u64, failpoints: &str) -> anyhow::Result<()> {
        let bin = self.fed.bin.clone();
        let p = self.fed.controller(id);
        if alive(p) {
            return Ok(());
        }
        p.env.retain(|(k, _)| k != "CAUSEWAY_FAILPOINTS");
        if !failpoints.is_empty() {
            p.env
                .push(("CAUSEWAY_FAILPOINTS".into(), failpoints.to_string()));
        }
        p.start(&bin)
    }

    /// Sends `signal` (`STOP`, `CONT`) to controller `id`.
    pub fn signal(&mut self, id: u64, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .fed
            .controller(id)
            .pid()
            .context("the controller is not running")?;
        run(&["kill", &format!("-{signal}"), &pid.to_string()]).map(|_| ())
    }

    /// Controller `id`'s data directory (its tmpfs).
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.fed.root.join(format!("controller-{id}"))
    }

    /// Removes everything in controller `id`'s data directory (it must be
    /// stopped): a node that will join afresh.
    pub fn wipe(&self, id: u64) -> anyhow::Result<()> {
        for e in std::fs::read_dir(self.data_dir(id))? {
            let p = e?.path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p)?;
            } else {
                std::fs::remove_file(&p)?;
            }
        }
        Ok(())
    }

    /// Removes controller `id` from the membership (through the others).
    pub async fn remove_member(&self, id: u64) -> anyhow::Result<()> {
        let c = self.fed.admin_client(None)?;
        c.call(true, |mut f| async move {
            f.remove_controller(pb::RemoveControllerRequest { id })
                .await
        })
        .await?;
        Ok(())
    }

    /// Starts a wiped controller `id` as a joiner and adds it back.
    pub async fn rejoin(&mut self, id: u64) -> anyhow::Result<()> {
        self.fed.controller(id).kill().await;
        self.wipe(id)?;
        // The whole membership as its peers: a node that later finds its
        // own data damaged rebuilds from the peers it was started with.
        self.fed.spawn_controller(id, &CONTROLLERS, true)?;
        let addr = self.fed.controller_addrs[&id].clone();
        let c = self.fed.admin_client(None)?;
        // Adding waits until the new node has caught up; on a loaded
        // cluster that can outlast one call's deadline, and adding again
        // picks up where it was (a learner already there is promoted).
        causeway::local::wait::until(
            Duration::from_secs(120),
            format_args!("c{id} to be a voter again"),
            async || {
                let r = c
                    .call(true, |mut f| {
                        let addr = addr.clone();
                        async move {
                            f.add_controller(pb::AddControllerRequest { id, addr })
                                .await
                        }
                    })
                    .await;
                match r {
                    Ok(_) => Some(()),
                    Err(s) if s.code() == tonic::Code::AlreadyExists => Some(()),
                    Err(s) => {
                        tracing::info!("adding c{id} again: {}", s.message());
                        None
                    }
                }
            },
        )
        .await?;
        Ok(())
    }

    /// Voters as the leader sees them.
    pub async fn voters(&self) -> anyhow::Result<Vec<u64>> {
        let c = self.fed.admin_client(None)?;
        let s = c
            .call(
                true,
                |mut f| async move { f.status(pb::StatusRequest {}).await },
            )
            .await?;
        Ok(s.nodes.iter().filter(|n| n.voter).map(|n| n.id).collect())
    }

    /// The newest log segment of controller `id`.
    pub fn newest_segment(&self, id: u64) -> Option<PathBuf> {
        let mut found = Vec::new();
        collect_files(&self.data_dir(id), "wal", &mut found);
        found.sort_by_key(|p| p.file_name().map(|n| n.to_os_string()));
        found.pop()
    }

    /// Stops every process, then unmounts the controllers' disks.
    pub async fn shutdown(&mut self) {
        // A stopped process ignores SIGKILL until continued.
        for id in CONTROLLERS {
            let _ = self.signal(id, "CONT");
        }
        self.fed.shutdown().await;
        for m in self.mounts.drain(..) {
            let _ = run(&["umount", "-l", &m.display().to_string()]);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in self.mounts.drain(..) {
            let _ = run(&["umount", "-l", &m.display().to_string()]);
        }
    }
}

/// Started, and not exited on its own since.
pub fn alive(p: &mut causeway::local::Proc) -> bool {
    p.is_running() && p.exited().is_none()
}

fn collect_files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_files(&p, ext, out);
        } else if p.extension().is_some_and(|x| x == ext) {
            out.push(p);
        }
    }
}
