//! A 3-node etcd cluster on loopback (Debian's etcd-server), fsyncing as
//! by default, and a minimal gRPC client for it.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

use crate::pb::etcd::kv_client::KvClient;
use crate::pb::etcd::PutRequest;

pub struct Etcd {
    pub clients: Vec<String>,
    children: Vec<Child>,
    tls: tonic::transport::ClientTlsConfig,
}

/// Certificates for etcd's client and peer mTLS: a CA, a server/peer leaf
/// for 127.0.0.1, and a client leaf. Written to `dir`.
fn make_certs(dir: &Path) -> anyhow::Result<tonic::transport::ClientTlsConfig> {
    crate::pki::write(dir)?;
    let read = |n: &str| std::fs::read_to_string(dir.join(n));
    Ok(tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.pem")?))
        .identity(tonic::transport::Identity::from_pem(
            read("client.pem")?,
            read("client-key.pem")?,
        ))
        .domain_name("localhost"))
}

impl Etcd {
    pub async fn start(root: &Path) -> anyhow::Result<Self> {
        let bin = which("etcd")
            .context("etcd is not installed (bench/run installs Debian's etcd-server)")?;
        let mut clients = Vec::new();
        let mut peers = Vec::new();
        for _ in 0..3 {
            clients.push(format!("127.0.0.1:{}", causeway::local::free_port()?));
            peers.push(format!("127.0.0.1:{}", causeway::local::free_port()?));
        }
        let certs = root.join("etcd-certs");
        let tls = make_certs(&certs)?;
        let file = |n: &str| certs.join(n).display().to_string();
        let initial: Vec<String> = (0..3)
            .map(|i| format!("e{i}=https://{}", peers[i]))
            .collect();
        let mut children = Vec::new();
        for i in 0..3 {
            let log = std::fs::File::create(root.join(format!("etcd-{i}.log")))?;
            let child = Command::new(&bin)
                .args([
                    "--name",
                    &format!("e{i}"),
                    "--data-dir",
                    &root.join(format!("etcd-{i}")).display().to_string(),
                    "--listen-client-urls",
                    &format!("https://{}", clients[i]),
                    "--advertise-client-urls",
                    &format!("https://{}", clients[i]),
                    "--listen-peer-urls",
                    &format!("https://{}", peers[i]),
                    "--initial-advertise-peer-urls",
                    &format!("https://{}", peers[i]),
                    // Mutual TLS for clients and peers, like causeway's controllers.
                    "--cert-file",
                    &file("server.pem"),
                    "--key-file",
                    &file("server-key.pem"),
                    "--client-cert-auth",
                    "--trusted-ca-file",
                    &file("ca.pem"),
                    "--peer-cert-file",
                    &file("server.pem"),
                    "--peer-key-file",
                    &file("server-key.pem"),
                    "--peer-client-cert-auth",
                    "--peer-trusted-ca-file",
                    &file("ca.pem"),
                    "--initial-cluster",
                    &initial.join(","),
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    "causeway-bench",
                    "--log-level",
                    "error",
                ])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
                .spawn()?;
            children.push(child);
        }
        let etcd = Self {
            clients,
            children,
            tls,
        };
        // Ready once a put commits.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut c) = etcd.kv(0).await {
                if c.put(PutRequest {
                    key: b"ready".to_vec(),
                    value: b"1".to_vec(),
                    ..Default::default()
                })
                .await
                .is_ok()
                {
                    return Ok(etcd);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd did not become ready; see {}/etcd-*.log",
                    root.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn channel(&self, i: usize) -> anyhow::Result<tonic::transport::Channel> {
        Ok(
            tonic::transport::Channel::from_shared(format!("https://{}", self.clients[i]))?
                .tls_config(self.tls.clone())?
                .tcp_nodelay(true)
                .connect()
                .await?,
        )
    }

    pub async fn kv(&self, i: usize) -> anyhow::Result<KvClient<tonic::transport::Channel>> {
        Ok(KvClient::new(self.channel(i).await?))
    }

    /// The index of the current leader.
    pub async fn leader(&self) -> anyhow::Result<usize> {
        use crate::pb::etcd::maintenance_client::MaintenanceClient;
        let mut leader = None;
        let mut members = Vec::new();
        for i in 0..self.clients.len() {
            let r = MaintenanceClient::new(self.channel(i).await?)
                .status(crate::pb::etcd::StatusRequest {})
                .await?
                .into_inner();
            members.push(r.header.map(|h| h.member_id).unwrap_or(0));
            leader = Some(r.leader);
        }
        let leader = leader.context("etcd reports no leader")?;
        members
            .iter()
            .position(|m| *m == leader)
            .context("etcd leader is none of the members")
    }

    pub async fn stop(mut self) {
        for c in &mut self.children {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}
