//! A whole federation on this machine, as separate processes on loopback:
//! what `causeway demo` runs and what the integration tests drive.
//!
//! Every process is the real `causeway` binary with real sockets; logs go
//! to `<root>/<name>.log`. Dropping a [`LocalFederation`] kills them all.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use causeway_api::client::ControllerClient;
use causeway_api::identity::{self, Credential};
use causeway_api::pb;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::process::{Child, Command};

/// One child process and how to start it again.
pub struct Proc {
    pub name: String,
    pub args: Vec<String>,
    /// Environment for the child on top of ours (secrets go here, not in
    /// the arguments other users can read from the process list).
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn spawn(bin: &Path, root: &Path, name: &str, args: Vec<String>) -> anyhow::Result<Self> {
        Self::spawn_with_env(bin, root, name, args, Vec::new())
    }

    fn spawn_with_env(
        bin: &Path,
        root: &Path,
        name: &str,
        args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<Self> {
        let mut p = Self {
            name: name.to_string(),
            args,
            env,
            log: root.join(format!("{name}.log")),
            child: None,
        };
        p.start(bin)?;
        Ok(p)
    }

    pub fn start(&mut self, bin: &Path) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(bin);
        // CAUSEWAY_CHILD_THREADS sets the runtime threads of every child
        // (tokio's TOKIO_WORKER_THREADS), for experiments.
        if let Ok(n) = std::env::var("CAUSEWAY_CHILD_THREADS") {
            cmd.env("TOKIO_WORKER_THREADS", n);
        }
        let child = cmd
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env(
                "RUST_LOG",
                std::env::var("CAUSEWAY_CHILD_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, no goodbye.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// SIGKILL, and wait (blocking, up to 5 s) until it is gone.
    fn kill_blocking(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGTERM: ask for a graceful stop.
    pub fn terminate(&self) {
        if let Some(pid) = self.pid() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Whether the process exited on its own (with its status).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// A local export: service key, port, endpoints.
#[derive(Clone, Debug)]
pub struct Export {
    pub service: String,
    pub port: u16,
    pub endpoints: Vec<SocketAddr>,
}

pub struct Site {
    pub name: String,
    pub state_dir: PathBuf,
    pub config: PathBuf,
    pub tunnel: SocketAddr,
    pub dns: SocketAddr,
    pub gateway_admin: SocketAddr,
    pub dns_admin: SocketAddr,
    pub vip_range: String,
    pub gateway: Proc,
    pub dns_proc: Proc,
}

pub struct LocalFederation {
    /// Extra flags for every controller started from now on.
    pub controller_flags: Vec<String>,
    /// Extra TOML appended to every gateway config written from now on.
    pub gateway_extra: String,
    /// Extra flags for every DNS server started from now on.
    pub dns_flags: Vec<String>,
    pub root: PathBuf,
    pub bin: PathBuf,
    pub creds: PathBuf,
    pub controller_addrs: BTreeMap<u64, String>,
    pub controllers: BTreeMap<u64, Proc>,
    pub controller_admin: BTreeMap<u64, SocketAddr>,
    pub sites: BTreeMap<String, Site>,
}

/// A loopback port free for both TCP and UDP right now.
pub fn free_port() -> anyhow::Result<u16> {
    // Below the kernel's ephemeral range when we can: a port handed out by
    // bind(0) is from that range, and any outgoing connection of a test
    // running alongside may take it before our process binds it.
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if ephemeral_start > 20_000 {
        for _ in 0..200 {
            let port = rand::random_range(20_000..ephemeral_start);
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
                && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
            {
                return Ok(port);
            }
        }
    }
    for _ in 0..50 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port found")
}

impl LocalFederation {
    /// Creates the controller CA and admin credential under `root`.
    pub fn new(bin: PathBuf, root: PathBuf) -> anyhow::Result<Self> {
        let creds = root.join("creds");
        crate::cli::ca_init(&creds, "demo")?;
        Ok(Self {
            controller_flags: Vec::new(),
            dns_flags: Vec::new(),
            gateway_extra: String::new(),
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
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut waiting: Vec<u64> = ids.to_vec();
        while !waiting.is_empty() && Instant::now() < deadline {
            let mut still = Vec::new();
            for id in waiting {
                let proc = self.controllers.get_mut(&id).expect("just spawned");
                if proc.exited().is_some() {
                    if proc.log_tail(20).contains("Address already in use") {
                        return Some(id);
                    }
                    continue;
                }
                let addr: SocketAddr = self.controller_addrs[&id].parse().expect("ip:port");
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err()
                {
                    still.push(id);
                }
            }
            waiting = still;
            if !waiting.is_empty() {
                std::thread::sleep(Duration::from_millis(50));
            }
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
        let addr = format!("127.0.0.1:{}", free_port()?);
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
        let p = Proc::spawn(&self.bin, &self.root, &format!("controller-{id}"), args)?;
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

    /// Waits until a majority agrees on a leader among the running nodes.
    pub async fn wait_for_leader(&self, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
            for id in self.controllers.keys() {
                if let Ok(Ok(s)) =
                    tokio::time::timeout(Duration::from_secs(1), self.status(*id)).await
                {
                    if s.leader_id != 0 {
                        *votes.entry(s.leader_id).or_default() += 1;
                    }
                }
            }
            let majority = self.controllers.len() / 2 + 1;
            if let Some((leader, _)) = votes.iter().find(|(_, n)| **n >= majority) {
                if self.controllers.contains_key(leader) && self.controllers[leader].child.is_some()
                {
                    return Ok(*leader);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "no controller leader within {timeout:?}:\n{}",
                    self.diagnose(20).await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `causeway ctl cluster add SITE`, as an operator would run it.
    pub async fn create_token(&self, site: &str) -> anyhow::Result<String> {
        let out = self
            .ctl(&[
                "cluster", "add", site, "--label", "env=demo", "--ttl", "600",
            ])
            .await?;
        Ok(out.trim().to_string())
    }

    /// Joins a site: a gateway (with the token) and a DNS server.
    pub async fn add_site(
        &mut self,
        name: &str,
        vip_range: &str,
        exports: &[Export],
    ) -> anyhow::Result<()> {
        let token = self.create_token(name).await?;
        self.add_site_with_token(name, vip_range, exports, token)
            .await
    }

    /// Joins a site with a join token minted elsewhere (e.g. by Terraform).
    pub async fn add_site_with_token(
        &mut self,
        name: &str,
        vip_range: &str,
        exports: &[Export],
        token: String,
    ) -> anyhow::Result<()> {
        let state_dir = self.root.join(format!("site-{name}"));
        std::fs::create_dir_all(&state_dir)?;
        let mut tunnel: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let dns: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let mut gateway_admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let dns_admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let config = self.root.join(format!("gateway-{name}.toml"));
        // The gateway binds its ports before it joins, so one that lost a
        // port race to another test exits with its token unused: it gets
        // fresh ports and the same token, up to three tries.
        let mut tries = 0;
        let gateway = loop {
            tries += 1;
            let mut cfg = format!(
                "state_dir = {:?}\ntunnel_listen = \"{tunnel}\"\nvip_range = \"{vip_range}\"\nreplica = \"gw-0\"\nhealth_interval_secs = 0.5\n",
                state_dir.display().to_string()
            );
            cfg.push_str(&self.gateway_extra);
            for e in exports {
                let eps: Vec<String> = e.endpoints.iter().map(|a| format!("\"{a}\"")).collect();
                cfg.push_str(&format!(
                    "\n[[exports]]\nservice = \"{}\"\nport = {}\nendpoints = [{}]\n",
                    e.service,
                    e.port,
                    eps.join(", ")
                ));
            }
            std::fs::write(&config, cfg)?;
            let mut gateway = Proc::spawn_with_env(
                &self.bin,
                &self.root,
                &format!("gateway-{name}"),
                vec![
                    "gateway".into(),
                    "--config".into(),
                    config.display().to_string(),
                    "--admin-listen".into(),
                    gateway_admin.to_string(),
                ],
                vec![("CAUSEWAY_JOIN_TOKEN".into(), token.clone())],
            )?;
            // The DNS server reads the credential the gateway stores on joining.
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut lost_race = false;
            while !state_dir.join("site.json").exists() {
                if let Some(status) = gateway.exited() {
                    let log = gateway.log_tail(20);
                    if tries < 3 && log.contains("Address already in use") {
                        lost_race = true;
                        break;
                    }
                    bail!("gateway {name} exited ({status}) before joining:\n{log}");
                }
                if Instant::now() > deadline {
                    bail!(
                        "gateway {name} did not join within 20 s:\n{}",
                        gateway.log_tail(20)
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if !lost_race {
                break gateway;
            }
            tracing::warn!(
                site = name,
                "gateway lost a port race; retrying on new ports"
            );
            tunnel = format!("127.0.0.1:{}", free_port()?).parse()?;
            gateway_admin = format!("127.0.0.1:{}", free_port()?).parse()?;
        };
        // Another test may take a port between `free_port` and the bind: a
        // DNS server that cannot bind gets fresh ports, up to three tries.
        let (mut dns, mut dns_admin) = (dns, dns_admin);
        let mut tries = 0;
        let dns_proc = loop {
            tries += 1;
            let mut dns_args: Vec<String> = vec![
                "dns".into(),
                "--state-dir".into(),
                state_dir.display().to_string(),
                "--listen".into(),
                dns.to_string(),
                "--vip-range".into(),
                vip_range.to_string(),
                "--admin-listen".into(),
                dns_admin.to_string(),
            ];
            dns_args.extend(self.dns_flags.iter().cloned());
            let mut dns_proc =
                Proc::spawn(&self.bin, &self.root, &format!("dns-{name}"), dns_args)?;
            match wait_dns_ready(&mut dns_proc, dns_admin).await {
                Ok(()) => break dns_proc,
                Err(why) if tries < 3 && why.contains("Address already in use") => {
                    tracing::warn!(
                        site = name,
                        "DNS server lost a port race; retrying on new ports"
                    );
                    dns = format!("127.0.0.1:{}", free_port()?).parse()?;
                    dns_admin = format!("127.0.0.1:{}", free_port()?).parse()?;
                }
                Err(why) => {
                    dns_proc.kill().await;
                    bail!("DNS server of {name}: {why}");
                }
            }
        };
        self.sites.insert(
            name.to_string(),
            Site {
                name: name.to_string(),
                state_dir,
                config,
                tunnel,
                dns,
                gateway_admin,
                dns_admin,
                vip_range: vip_range.to_string(),
                gateway,
                dns_proc,
            },
        );
        Ok(())
    }

    /// Sets the site's `tunnel_advertise` (one entry per gateway replica,
    /// `ip:port[;weight=N]`) in its gateway config and restarts the gateway.
    pub async fn set_tunnel_advertise(
        &mut self,
        site: &str,
        advertise: &[String],
    ) -> anyhow::Result<()> {
        let s = self
            .sites
            .get_mut(site)
            .ok_or_else(|| anyhow::anyhow!("no site {site}"))?;
        let text = std::fs::read_to_string(&s.config)?;
        let list: Vec<String> = advertise.iter().map(|a| format!("{a:?}")).collect();
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("tunnel_advertise"))
            .collect();
        let text = format!(
            "tunnel_advertise = [{}]\n{}\n",
            list.join(", "),
            kept.join("\n")
        );
        std::fs::write(&s.config, text)?;
        s.gateway.kill().await;
        s.gateway.start(&self.bin)?;
        Ok(())
    }

    /// Starts another gateway replica of `site`: the same state and exports
    /// (as replicas sharing a mounted secret would), its own replica name,
    /// tunnel port and admin port. Its config is the site's with those changed.
    pub fn spawn_gateway_replica(
        &self,
        site: &str,
        replica: &str,
        tunnel: SocketAddr,
        admin: SocketAddr,
    ) -> anyhow::Result<Proc> {
        let s = &self.sites[site];
        let text = std::fs::read_to_string(&s.config)?;
        let text: Vec<String> = text
            .lines()
            .map(|l| {
                if l.starts_with("replica =") {
                    format!("replica = {replica:?}")
                } else if l.starts_with("tunnel_listen =") {
                    format!("tunnel_listen = \"{tunnel}\"")
                } else {
                    l.to_string()
                }
            })
            .collect();
        let config = self.root.join(format!("gateway-{site}-{replica}.toml"));
        std::fs::write(&config, text.join("\n"))?;
        Proc::spawn(
            &self.bin,
            &self.root,
            &format!("gateway-{site}-{replica}"),
            vec![
                "gateway".into(),
                "--config".into(),
                config.display().to_string(),
                "--admin-listen".into(),
                admin.to_string(),
            ],
        )
    }

    /// Asks a site's DNS server until `name` has an A record.
    pub async fn wait_resolvable(
        &self,
        site: &str,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<IpAddr> {
        let server = self.sites[site].dns;
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            match dns_a(server, name).await {
                Ok(addrs) if !addrs.is_empty() => return Ok(addrs[0]),
                Ok(_) => last = "no A record yet".into(),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} did not resolve at {site}'s DNS ({server}) within {timeout:?}: {last}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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

    pub fn controller(&mut self, id: u64) -> &mut Proc {
        self.controllers.get_mut(&id).expect("known controller id")
    }

    pub fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        let bin = self.bin.clone();
        self.controller(id).start(&bin)
    }

    pub async fn shutdown(&mut self) {
        for s in self.sites.values_mut() {
            s.dns_proc.kill().await;
            s.gateway.kill().await;
        }
        for c in self.controllers.values_mut() {
            c.kill().await;
        }
    }
}

/// Waits until a just-started DNS server has bound its sockets and holds
/// the first catalog snapshot (its /ready says so); why not, with its log.
async fn wait_dns_ready(dns: &mut Proc, admin: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = dns.exited() {
            return Err(format!("exited ({status}) at start:\n{}", dns.log_tail(20)));
        }
        match admin_get(admin, "/ready").await {
            Ok(r) if r.starts_with("HTTP/1.1 200") => return Ok(()),
            _ if Instant::now() > deadline => {
                return Err(format!("not ready within 20 s:\n{}", dns.log_tail(20)))
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The raw response to `GET path` on an admin port.
async fn admin_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::other("no answer within 2 s"))??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// One A query over UDP; the addresses answered, or the response code.
pub async fn dns_a(server: SocketAddr, name: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut msg = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    msg.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    sock.send_to(&msg.to_vec()?, server).await?;
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf))
        .await
        .context("no DNS answer within 1 s")??;
    let resp = Message::from_vec(&buf[..n]).map_err(|e| anyhow::anyhow!("bad DNS answer: {e}"))?;
    if resp.metadata.response_code != ResponseCode::NoError {
        bail!("DNS answered {:?}", resp.metadata.response_code);
    }
    Ok(resp
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect())
}

/// A sample workload: optionally writes `banner` and a newline, then echoes
/// every byte back until the client half-closes.
pub async fn echo_server(
    banner: Option<String>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let banner = banner.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                if let Some(b) = banner {
                    if sock.write_all(format!("{b}\n").as_bytes()).await.is_err() {
                        return;
                    }
                }
                let (mut r, mut w) = sock.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok((addr, task))
}

/// A tiny HTTP/1.1 backend on `addr` (port 0 picks one) answering every
/// request with `name`, keep-alive; a path containing `/slow` waits 300 ms
/// first. Returns the bound address and the task (abort it to stop).
pub async fn http_backend(
    addr: SocketAddr,
    name: &'static str,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let (at, task, _) = http_backend_counting(addr, name).await?;
    Ok((at, task))
}

/// [`http_backend`], also counting the connections it accepted.
pub async fn http_backend_counting(
    addr: SocketAddr,
    name: &'static str,
) -> anyhow::Result<(
    SocketAddr,
    tokio::task::JoinHandle<()>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
)> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind(addr).await?;
    let at = l.local_addr()?;
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            conns.spawn(async move {
                let (r, mut w) = s.into_split();
                let mut r = tokio::io::BufReader::new(r);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let slow = line.contains("/slow");
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if h == "\r\n" {
                            break;
                        }
                    }
                    if slow {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{name}",
                        name.len()
                    );
                    if w.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok((at, task, accepted))
}

/// Connects to `addr`, reads the banner line, sends `msg` and reads it back.
pub async fn call_banner(addr: SocketAddr, msg: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let sock = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    let (r, mut w) = sock.into_split();
    let mut r = tokio::io::BufReader::new(r);
    let mut banner = String::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut banner))
        .await
        .context("no answer within 10 s")??;
    if banner.is_empty() {
        bail!("the connection closed without an answer");
    }
    w.write_all(msg.as_bytes()).await?;
    w.shutdown().await?;
    let mut echoed = String::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_to_string(&mut echoed))
        .await
        .context("echo timed out")??;
    if echoed != msg {
        bail!("echo mismatch: sent {msg:?}, got {echoed:?}");
    }
    Ok(banner.trim_end().to_string())
}
