//! A whole federation on this machine, as separate processes on loopback:
//! what `causeway demo` runs and what the integration tests drive.
//!
//! Every process is the real `causeway` binary with real sockets; logs go
//! to `<root>/<name>.log`. Dropping a [`LocalFederation`] kills them all.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use causeway_api::client::ControllerClient;
use causeway_api::identity::{self, Credential};
use causeway_api::pb;
use causeway_gateway::config::GatewayConfig;
use tokio::process::Command;

mod backends;
mod probe;
mod process;
mod site;
pub mod wait;

pub use backends::{echo_server, http_backend, http_backend_counting};
pub use probe::{call_banner, dns_a};
pub use process::{free_port, Proc};
pub use site::{Export, Site};

/// A host of the federation other than this one: a network namespace and
/// the address its processes listen on.
#[derive(Clone, Debug)]
pub struct Host {
    /// The namespace's name (as `ip netns` knows it).
    pub netns: String,
    /// Its address.
    pub ip: std::net::IpAddr,
}

impl Host {
    /// The command prefix that runs a process there.
    pub fn wrap(&self) -> Vec<String> {
        ["ip", "netns", "exec", self.netns.as_str()]
            .map(String::from)
            .to_vec()
    }
}

/// A federation of controllers and sites, each a child process.
pub struct LocalFederation {
    /// Extra flags for every controller started from now on.
    pub controller_flags: Vec<String>,
    /// The gateway config every site started from now on begins from (its
    /// state, ports and exports are filled in per site).
    pub gateway_base: GatewayConfig,
    /// Extra flags for every DNS server started from now on.
    pub dns_flags: Vec<String>,
    /// Extra environment for every gateway started from now on (e.g. a
    /// `KUBECONFIG` for a Kubernetes site's gateway).
    pub gateway_env: Vec<(String, String)>,
    /// The address controllers started from now on listen on for their
    /// API (default loopback; the benchmarks' wide-area case puts them on
    /// a link between network namespaces).
    pub controller_host: std::net::IpAddr,
    /// The network namespace gateways started from now on run in (none:
    /// this one).
    pub gateway_netns: Option<String>,
    /// The address gateways started from now on bind their tunnel to
    /// (default loopback).
    pub gateway_tunnel_host: std::net::IpAddr,
    /// Controllers placed on their own host (a network namespace and its
    /// address) instead of this one's loopback.
    pub controller_hosts: BTreeMap<u64, Host>,
    /// Sites placed on their own host: gateway and DNS server run in its
    /// namespace and listen on its address.
    pub site_hosts: BTreeMap<String, Host>,
    /// The working directory (data and logs).
    pub root: PathBuf,
    /// The `causeway` binary every process runs.
    pub bin: PathBuf,
    /// The controller CA and admin credential.
    pub creds: PathBuf,
    /// Each controller's API address.
    pub controller_addrs: BTreeMap<u64, String>,
    /// The controller processes.
    pub controllers: BTreeMap<u64, Proc>,
    /// Each controller's admin port.
    pub controller_admin: BTreeMap<u64, SocketAddr>,
    /// The sites by name.
    pub sites: BTreeMap<String, Site>,
}

impl LocalFederation {
    /// Creates the controller CA and admin credential under `root`.
    pub fn new(bin: PathBuf, root: PathBuf) -> anyhow::Result<Self> {
        let creds = root.join("creds");
        crate::creds::ca_init(&creds, "demo")?;
        Ok(Self {
            controller_flags: Vec::new(),
            dns_flags: Vec::new(),
            gateway_env: Vec::new(),
            gateway_base: Self::default_gateway_config(),
            controller_host: std::net::Ipv4Addr::LOCALHOST.into(),
            gateway_netns: None,
            gateway_tunnel_host: std::net::Ipv4Addr::LOCALHOST.into(),
            controller_hosts: BTreeMap::new(),
            site_hosts: BTreeMap::new(),
            root,
            bin,
            creds,
            controller_addrs: BTreeMap::new(),
            controllers: BTreeMap::new(),
            controller_admin: BTreeMap::new(),
            sites: BTreeMap::new(),
        })
    }

    /// Starts `n` controller nodes forming one cluster.
    /// Starts `n` controllers as one new cluster. Their ports are picked
    /// free, but another test can take one before a controller binds it;
    /// then every controller is stopped, its data wiped (a node may have
    /// formed the cluster with the old addresses) and all start again on
    /// fresh ports, up to three times.
    pub fn start_controllers(&mut self, n: u64) -> anyhow::Result<()> {
        let peers: Vec<u64> = (1..=n).collect();
        for attempt in 1.. {
            for id in 1..=n {
                self.reserve_controller(id)?;
            }
            for id in 1..=n {
                self.spawn_controller(id, &peers, false)?;
            }
            let Some(lost) = self.controller_lost_port_race(&peers) else {
                return Ok(());
            };
            if attempt == 3 {
                bail!("controller {lost} could not bind its ports three times");
            }
            tracing::warn!(
                controller = lost,
                "a controller lost a port race at start; restarting all on fresh ports"
            );
            for id in &peers {
                if let Some(c) = self.controllers.get_mut(id) {
                    c.kill_blocking();
                }
                let _ = std::fs::remove_dir_all(self.root.join(format!("controller-{id}")));
            }
        }
        unreachable!("the loop returns or bails by the third attempt")
    }

    /// Waits (blocking, up to 20 s) until each of `ids` accepts on its API
    /// port; the first that exited saying its address was in use, if any.
    /// Any other exit is left for the caller's checks to report.
    fn controller_lost_port_race(&mut self, ids: &[u64]) -> Option<u64> {
        let mut waiting: Vec<u64> = ids.to_vec();
        let looked = wait::until_blocking(
            Duration::from_secs(20),
            "the controllers to accept on their API ports",
            || {
                let mut still = Vec::new();
                for id in std::mem::take(&mut waiting) {
                    let proc = self.controllers.get_mut(&id).expect("just spawned");
                    if proc.exited().is_some() {
                        if proc.log_tail(20).contains("Address already in use") {
                            return Some(Some(id));
                        }
                        continue;
                    }
                    let addr: SocketAddr = self.controller_addrs[&id].parse().expect("ip:port");
                    let timeout = Duration::from_millis(200);
                    if std::net::TcpStream::connect_timeout(&addr, timeout).is_err() {
                        still.push(id);
                    }
                }
                waiting = still;
                waiting.is_empty().then_some(None)
            },
        );
        if let Ok(Some(lost)) = looked {
            return Some(lost);
        }
        // A port held by another process also accepts: a controller that
        // failed to bind it exits at once, so look once more.
        std::thread::sleep(Duration::from_millis(100));
        ids.iter().copied().find(|id| {
            let proc = self.controllers.get_mut(id).expect("just spawned");
            proc.exited().is_some() && proc.log_tail(20).contains("Address already in use")
        })
    }

    /// Picks a listen address for controller `id`.
    pub fn reserve_controller(&mut self, id: u64) -> anyhow::Result<String> {
        if let Some(h) = self.controller_hosts.get(&id) {
            // A host of its own: fixed ports, nobody else binds there.
            let addr = SocketAddr::new(h.ip, 7100).to_string();
            self.controller_addrs.insert(id, addr.clone());
            self.controller_admin
                .insert(id, SocketAddr::new(h.ip, 7101));
            return Ok(addr);
        }
        let addr = SocketAddr::new(self.controller_host, free_port()?).to_string();
        self.controller_addrs.insert(id, addr.clone());
        self.controller_admin
            .insert(id, format!("127.0.0.1:{}", free_port()?).parse()?);
        Ok(addr)
    }

    /// Starts controller `id` with `peers` as the initial voters; with
    /// `join`, it waits to be added instead of forming a cluster.
    pub fn spawn_controller(&mut self, id: u64, peers: &[u64], join: bool) -> anyhow::Result<()> {
        let mut args = vec![
            "controller".to_string(),
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            self.controller_addrs[&id].clone(),
            "--data-dir".into(),
            self.root
                .join(format!("controller-{id}"))
                .display()
                .to_string(),
            "--ca-dir".into(),
            self.creds.display().to_string(),
            "--admin-listen".into(),
            self.controller_admin[&id].to_string(),
        ];
        for pid in peers {
            args.push("--peer".into());
            args.push(format!("{pid}={}", self.controller_addrs[pid]));
        }
        if join {
            args.push("--join".into());
        }
        args.extend(self.controller_flags.iter().cloned());
        let wrap = self
            .controller_hosts
            .get(&id)
            .map(Host::wrap)
            .unwrap_or_default();
        let p = Proc::spawn_wrapped(
            &self.bin,
            &self.root,
            &format!("controller-{id}"),
            args,
            Vec::new(),
            wrap,
        )?;
        self.controllers.insert(id, p);
        Ok(())
    }

    /// Runs `causeway ctl ARGS` against the controllers; stdout, or stderr as the error.
    pub async fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.bin)
            .args(["ctl", "--creds"])
            .arg(&self.creds)
            .arg("--controller")
            .arg(self.endpoints().join(","))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .context("running causeway ctl")?;
        if !out.status.success() {
            bail!(
                "causeway ctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// The controllers' API addresses.
    pub fn endpoints(&self) -> Vec<String> {
        self.controller_addrs.values().cloned().collect()
    }

    /// An admin client for all controllers, or for one node only.
    pub fn admin_client(&self, only: Option<u64>) -> anyhow::Result<ControllerClient> {
        let ca = identity::read(&self.creds.join("ca.pem"))?;
        let admin = Credential::load(
            &self.creds.join("admin.pem"),
            &self.creds.join("admin-key.pem"),
        )?;
        let eps = match only {
            Some(id) => vec![self.controller_addrs[&id].clone()],
            None => self.endpoints(),
        };
        Ok(ControllerClient::new(eps, &ca, Some(&admin)))
    }

    /// Status as seen by one node.
    pub async fn status(&self, id: u64) -> anyhow::Result<pb::StatusResponse> {
        let mut fed = self.admin_client(Some(id))?.federation().await?;
        Ok(fed.status(pb::StatusRequest {}).await?.into_inner())
    }

    /// What [`Self::gateway_base`] starts as: a gateway's defaults, with
    /// health checks every half second so tests see changes soon.
    pub fn default_gateway_config() -> GatewayConfig {
        let mut cfg = GatewayConfig::new(PathBuf::new());
        cfg.health_interval_secs = 0.5;
        cfg
    }

    /// [`Self::default_gateway_config`] with the fields `overrides` (gateway
    /// TOML, e.g. `worker_threads = 1` or a `[quic]` table) sets replaced;
    /// a field it names that no gateway knows is an error.
    pub fn gateway_config_with(overrides: &str) -> anyhow::Result<GatewayConfig> {
        let mut table: toml::Table = toml::from_str(&Self::default_gateway_config().to_toml())?;
        let extra: toml::Table = toml::from_str(overrides).context("gateway overrides")?;
        merge_tables(&mut table, extra);
        let text = toml::to_string(&table)?;
        Ok(GatewayConfig::from_toml(&text)?)
    }

    /// Waits until a majority agrees on a leader among the running nodes.
    pub async fn wait_for_leader(&self, timeout: Duration) -> anyhow::Result<u64> {
        let found = wait::until(timeout, "a controller leader", async || {
            self.agreed_leader().await
        })
        .await;
        match found {
            Ok(leader) => Ok(leader),
            Err(e) => bail!("{e}:\n{}", self.diagnose(20).await),
        }
    }

    /// The leader a majority of the nodes names, if it is one of ours and
    /// running.
    async fn agreed_leader(&self) -> Option<u64> {
        let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
        for id in self.controllers.keys() {
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(1), self.status(*id)).await
            {
                if s.leader_id != 0 {
                    *votes.entry(s.leader_id).or_default() += 1;
                }
            }
        }
        let majority = self.controllers.len() / 2 + 1;
        let (leader, _) = votes.into_iter().find(|(_, n)| *n >= majority)?;
        let proc = self.controllers.get(&leader)?;
        proc.is_running().then_some(leader)
    }

    /// What a failing test should print: each controller's view (leader,
    /// term, indexes) and the tail of its log.
    pub async fn diagnose(&self, log_lines: usize) -> String {
        let mut out = String::new();
        for (id, proc) in &self.controllers {
            let view = match tokio::time::timeout(Duration::from_secs(2), self.status(*id)).await {
                Ok(Ok(s)) => format!(
                    "{} leader {} term {} last log {} applied {} revision {}",
                    s.role, s.leader_id, s.term, s.last_log_index, s.applied_index, s.revision
                ),
                Ok(Err(e)) => format!("status failed: {e:#}"),
                Err(_) => "status: no answer within 2 s".into(),
            };
            // An exited child stays a zombie until reaped: its state says so.
            let state = match proc.pid() {
                None => "stopped",
                Some(pid) => match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                    Ok(stat) if !stat.contains(") Z ") => "running",
                    _ => "exited",
                },
            };
            out += &format!(
                "--- controller {id} ({state}): {view}\n{}\n",
                proc.log_tail(log_lines)
            );
        }
        out
    }

    /// Controller `id`'s process.
    pub fn controller(&mut self, id: u64) -> &mut Proc {
        self.controllers.get_mut(&id).expect("known controller id")
    }

    /// Starts controller `id` again (same data).
    pub fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        let bin = self.bin.clone();
        self.controller(id).start(&bin)
    }

    /// Kills every process.
    pub async fn shutdown(&mut self) {
        for s in self.sites.values_mut() {
            if let Some(a) = s.agent.as_mut() {
                a.kill().await;
            }
            s.dns_proc.kill().await;
            s.gateway.kill().await;
        }
        for c in self.controllers.values_mut() {
            c.kill().await;
        }
    }
}

/// Sets every key of `extra` in `into`, merging tables key by key.
fn merge_tables(into: &mut toml::Table, extra: toml::Table) {
    for (key, value) in extra {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(mine)), toml::Value::Table(theirs)) => {
                merge_tables(mine, theirs)
            }
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_overrides_replace_only_the_fields_they_name() {
        let cfg = LocalFederation::gateway_config_with(
            "worker_threads = 1\n[quic]\nmax_udp_payload = 8952\n",
        )
        .unwrap();
        assert_eq!(cfg.worker_threads, 1);
        assert_eq!(cfg.quic.max_udp_payload, 8952);
        assert_eq!(
            cfg.quic.rtt_ms, 50.0,
            "other quic fields keep their defaults"
        );
        assert_eq!(cfg.health_interval_secs, 0.5);
        let err = LocalFederation::gateway_config_with("no_such_field = 1").unwrap_err();
        assert!(format!("{err:#}").contains("no_such_field"), "{err:#}");
    }
}
