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
        let initial: Vec<String> = (0..3)
            .map(|i| format!("e{i}=http://{}", peers[i]))
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
                    &format!("http://{}", clients[i]),
                    "--advertise-client-urls",
                    &format!("http://{}", clients[i]),
                    "--listen-peer-urls",
                    &format!("http://{}", peers[i]),
                    "--initial-advertise-peer-urls",
                    &format!("http://{}", peers[i]),
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
        let etcd = Self { clients, children };
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
            tonic::transport::Channel::from_shared(format!("http://{}", self.clients[i]))?
                .tcp_nodelay(true)
                .connect()
                .await?,
        )
    }

    pub async fn kv(&self, i: usize) -> anyhow::Result<KvClient<tonic::transport::Channel>> {
        Ok(KvClient::new(self.channel(i).await?))
    }

    /// The index of the current leader, from etcd's JSON status endpoint.
    pub async fn leader(&self) -> anyhow::Result<usize> {
        let mut leader = None;
        let mut members = Vec::new();
        for c in &self.clients {
            let body = http_post(c, "/v3/maintenance/status", "{}").await?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            members.push(v["header"]["member_id"].as_str().unwrap_or("").to_string());
            leader = v["leader"].as_str().map(|s| s.to_string());
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

async fn http_post(addr: &str, path: &str, body: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    // etcd may answer chunked; the JSON object is the first {...} line.
    Ok(body
        .lines()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or("")
        .to_string())
}
