//! Sites of the local federation: a gateway and a DNS server each, joined
//! with a token, their gateway config written from a [`GatewayConfig`]
//! value.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use causeway_gateway::config::{ExportConfig, GatewayConfig};

use super::probe::{dns_a, wait_dns_ready};
use super::process::{free_port, Proc};
use super::wait::until;
use super::LocalFederation;

/// A local export: service key, port, endpoints.
#[derive(Clone, Debug)]
pub struct Export {
    /// `<namespace>/<name>`.
    pub service: String,
    /// The port callers use.
    pub port: u16,
    /// Where it is served in the exporting site.
    pub endpoints: Vec<SocketAddr>,
}

/// One running site: its processes and the addresses they serve.
pub struct Site {
    /// The site's name.
    pub name: String,
    /// The gateway's state directory (site CA, credential).
    pub state_dir: PathBuf,
    /// The gateway's config file.
    pub config: PathBuf,
    /// The gateway's QUIC address.
    pub tunnel: SocketAddr,
    /// The DNS server's address.
    pub dns: SocketAddr,
    /// The gateway's admin/metrics port.
    pub gateway_admin: SocketAddr,
    /// The DNS server's admin/metrics port.
    pub dns_admin: SocketAddr,
    /// The range the site's outbound listeners take addresses from.
    pub vip_range: String,
    /// The gateway process.
    pub gateway: Proc,
    /// The DNS server process.
    pub dns_proc: Proc,
    /// The Kubernetes agent, on a site that runs one.
    pub agent: Option<Proc>,
}

/// `causeway gateway` arguments for a config file and admin address.
fn gateway_args(config: &std::path::Path, admin: SocketAddr) -> Vec<String> {
    vec![
        "gateway".into(),
        "--config".into(),
        config.display().to_string(),
        "--admin-listen".into(),
        admin.to_string(),
    ]
}

/// A fresh loopback address for one of a site's sockets.
fn loopback_port() -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
}

impl LocalFederation {
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

    /// The gateway config of a new site: [`Self::gateway_base`] with the
    /// site's own state, ports and exports.
    fn site_gateway_config(
        &self,
        state_dir: PathBuf,
        tunnel: SocketAddr,
        vip_range: &str,
        exports: &[Export],
    ) -> GatewayConfig {
        let mut cfg = self.gateway_base.clone();
        cfg.state_dir = state_dir;
        cfg.tunnel_listen = tunnel.to_string();
        cfg.vip_range = vip_range.to_string();
        cfg.exports.extend(
            exports
                .iter()
                .map(|e| ExportConfig::tcp(&e.service, e.port, &e.endpoints)),
        );
        cfg
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
        let config = self.root.join(format!("gateway-{name}.toml"));
        let (gateway, tunnel, gateway_admin) = self
            .start_joining_gateway(name, &config, &state_dir, vip_range, exports, &token)
            .await?;
        let (dns_proc, dns, dns_admin) = self.start_dns(name, &state_dir, vip_range).await?;
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
                agent: None,
            },
        );
        Ok(())
    }

    /// Starts `causeway agent` for a joined site, against the API server
    /// `kubeconfig` names, with `flags` added; waits until its admin port
    /// answers.
    pub async fn start_agent(
        &mut self,
        site: &str,
        kubeconfig: &std::path::Path,
        flags: &[&str],
    ) -> anyhow::Result<SocketAddr> {
        let admin = loopback_port()?;
        let s = self.site(site)?;
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--site".into(),
            site.into(),
            "--state-dir".into(),
            s.state_dir.display().to_string(),
            "--admin-listen".into(),
            admin.to_string(),
            "--identity".into(),
            format!("agent-{site}"),
        ];
        args.extend(flags.iter().map(|f| f.to_string()));
        let mut agent = Proc::spawn_with_env(
            &self.bin,
            &self.root,
            &format!("agent-{site}"),
            args,
            vec![("KUBECONFIG".into(), kubeconfig.display().to_string())],
        )?;
        let up = until(
            Duration::from_secs(20),
            format_args!("agent of {site} to serve {admin}"),
            async || match agent.exited() {
                Some(status) => Some(Err(status)),
                None => tokio::net::TcpStream::connect(admin)
                    .await
                    .ok()
                    .map(|_| Ok(())),
            },
        )
        .await;
        match up {
            Ok(Ok(())) => {}
            Ok(Err(status)) => bail!("agent of {site} exited ({status}):\n{}", agent.log_tail(20)),
            Err(e) => bail!("{e}:\n{}", agent.log_tail(20)),
        }
        self.site_mut(site)?.agent = Some(agent);
        Ok(admin)
    }

    /// Starts a site's first gateway with its join token and waits until it
    /// has joined. The gateway binds its ports before it joins, so one that
    /// lost a port race to another test exits with its token unused: it gets
    /// fresh ports and the same token, up to three tries.
    async fn start_joining_gateway(
        &self,
        name: &str,
        config: &std::path::Path,
        state_dir: &std::path::Path,
        vip_range: &str,
        exports: &[Export],
        token: &str,
    ) -> anyhow::Result<(Proc, SocketAddr, SocketAddr)> {
        for tries in 1.. {
            let (mut tunnel, mut admin) = (loopback_port()?, loopback_port()?);
            tunnel.set_ip(self.gateway_tunnel_host);
            let mut wrap = match &self.gateway_netns {
                Some(ns) => ["ip", "netns", "exec", ns.as_str()]
                    .map(String::from)
                    .to_vec(),
                None => Vec::new(),
            };
            if let Some(h) = self.site_hosts.get(name) {
                tunnel = SocketAddr::new(h.ip, 7300);
                admin = SocketAddr::new(h.ip, 7301);
                wrap = h.wrap();
            }
            let cfg = self.site_gateway_config(state_dir.to_path_buf(), tunnel, vip_range, exports);
            std::fs::write(config, cfg.to_toml())?;
            let mut env = vec![("CAUSEWAY_JOIN_TOKEN".into(), token.to_string())];
            env.extend(self.gateway_env.iter().cloned());
            let mut gateway = Proc::spawn_wrapped(
                &self.bin,
                &self.root,
                &format!("gateway-{name}"),
                gateway_args(config, admin),
                env,
                wrap,
            )?;
            // The DNS server reads the credential the gateway stores on joining.
            let joined = until(
                Duration::from_secs(20),
                format_args!("gateway {name} to join"),
                async || match gateway.exited() {
                    Some(status) => Some(Err(status)),
                    None => state_dir.join("site.json").exists().then_some(Ok(())),
                },
            )
            .await;
            match joined {
                Ok(Ok(())) => return Ok((gateway, tunnel, admin)),
                Ok(Err(status)) => {
                    let log = gateway.log_tail(20);
                    if tries < 3 && log.contains("Address already in use") {
                        tracing::warn!(
                            site = name,
                            "gateway lost a port race; retrying on new ports"
                        );
                        continue;
                    }
                    bail!("gateway {name} exited ({status}) before joining:\n{log}");
                }
                Err(e) => bail!("{e}:\n{}", gateway.log_tail(20)),
            }
        }
        unreachable!("the loop returns or bails by the third try")
    }

    /// Starts a site's DNS server and waits until it is ready. Another test
    /// may take a port between `free_port` and the bind: a DNS server that
    /// cannot bind gets fresh ports, up to three tries.
    async fn start_dns(
        &self,
        name: &str,
        state_dir: &std::path::Path,
        vip_range: &str,
    ) -> anyhow::Result<(Proc, SocketAddr, SocketAddr)> {
        for tries in 1.. {
            let (mut dns, mut admin) = (loopback_port()?, loopback_port()?);
            let mut wrap = Vec::new();
            if let Some(h) = self.site_hosts.get(name) {
                dns = SocketAddr::new(h.ip, 5353);
                admin = SocketAddr::new(h.ip, 7302);
                wrap = h.wrap();
            }
            let mut args: Vec<String> = vec![
                "dns".into(),
                "--state-dir".into(),
                state_dir.display().to_string(),
                "--listen".into(),
                dns.to_string(),
                "--vip-range".into(),
                vip_range.to_string(),
                "--admin-listen".into(),
                admin.to_string(),
            ];
            args.extend(self.dns_flags.iter().cloned());
            let mut dns_proc = Proc::spawn_wrapped(
                &self.bin,
                &self.root,
                &format!("dns-{name}"),
                args,
                Vec::new(),
                wrap,
            )?;
            match wait_dns_ready(&mut dns_proc, admin).await {
                Ok(()) => return Ok((dns_proc, dns, admin)),
                Err(why) if tries < 3 && why.contains("Address already in use") => {
                    tracing::warn!(
                        site = name,
                        "DNS server lost a port race; retrying on new ports"
                    );
                }
                Err(why) => {
                    dns_proc.kill().await;
                    bail!("DNS server of {name}: {why}");
                }
            }
        }
        unreachable!("the loop returns or bails by the third try")
    }

    /// Reads a site's gateway config, lets `edit` change it and writes it
    /// back (the gateway reads it at its next start).
    pub fn edit_gateway_config(
        &self,
        site: &str,
        edit: impl FnOnce(&mut GatewayConfig),
    ) -> anyhow::Result<()> {
        let path = &self.site(site)?.config;
        let mut cfg = GatewayConfig::from_toml(&std::fs::read_to_string(path)?)?;
        edit(&mut cfg);
        std::fs::write(path, cfg.to_toml())?;
        Ok(())
    }

    /// Kills a site's gateway and starts it again (with its config as it
    /// is now on disk).
    pub async fn restart_gateway(&mut self, site: &str) -> anyhow::Result<()> {
        let bin = self.bin.clone();
        let s = self.site_mut(site)?;
        s.gateway.kill().await;
        s.gateway.start(&bin)
    }

    /// Sets the site's `tunnel_advertise` (one entry per gateway replica,
    /// `ip:port[;weight=N]`) in its gateway config and restarts the gateway.
    pub async fn set_tunnel_advertise(
        &mut self,
        site: &str,
        advertise: &[String],
    ) -> anyhow::Result<()> {
        self.edit_gateway_config(site, |cfg| cfg.tunnel_advertise = advertise.to_vec())?;
        self.restart_gateway(site).await
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
        self.spawn_gateway_replica_with(site, replica, tunnel, admin, |_| {})
    }

    /// [`Self::spawn_gateway_replica`] with its config changed by `edit`
    /// (e.g. a VIP range of its own).
    pub fn spawn_gateway_replica_with(
        &self,
        site: &str,
        replica: &str,
        tunnel: SocketAddr,
        admin: SocketAddr,
        edit: impl FnOnce(&mut GatewayConfig),
    ) -> anyhow::Result<Proc> {
        let s = self.site(site)?;
        let mut cfg = GatewayConfig::from_toml(&std::fs::read_to_string(&s.config)?)?;
        cfg.replica = replica.to_string();
        cfg.tunnel_listen = tunnel.to_string();
        edit(&mut cfg);
        let config = self.root.join(format!("gateway-{site}-{replica}.toml"));
        std::fs::write(&config, cfg.to_toml())?;
        Proc::spawn(
            &self.bin,
            &self.root,
            &format!("gateway-{site}-{replica}"),
            gateway_args(&config, admin),
        )
    }

    /// Asks a site's DNS server until `name` has an A record.
    pub async fn wait_resolvable(
        &self,
        site: &str,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<IpAddr> {
        let server = self.site(site)?.dns;
        let what = format!("{name} to resolve at {site}'s DNS ({server})");
        let addr = until(timeout, what, async || match dns_a(server, name).await {
            Ok(addrs) => addrs
                .first()
                .copied()
                .ok_or_else(|| "no A record yet".into()),
            Err(e) => Err(e.to_string()),
        })
        .await?;
        Ok(addr)
    }

    fn site(&self, site: &str) -> anyhow::Result<&Site> {
        self.sites
            .get(site)
            .ok_or_else(|| anyhow::anyhow!("no site {site}"))
    }

    fn site_mut(&mut self, site: &str) -> anyhow::Result<&mut Site> {
        self.sites
            .get_mut(site)
            .ok_or_else(|| anyhow::anyhow!("no site {site}"))
    }
}
