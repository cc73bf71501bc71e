//! `causeway ui`: a read-only web view of the federation — sites and the
//! tunnels between them, services and where their traffic goes now (the
//! same decision `ctl explain` prints), policies and controller nodes —
//! updated every second from the controllers and the gateways' metrics.
//!
//! It has no login of its own, so it listens on loopback only; it reads
//! the federation with an admin credential, like `ctl`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use causeway_api::catalog::CatalogView;
use causeway_api::client::ControllerClient;
use causeway_api::pb;
use clap::Args;

use crate::ctl_traffic::Sample;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The page: one file, no build step, no third-party code.
const PAGE: &str = include_str!("ui.html");

/// `causeway ui` flags.
#[derive(Args)]
pub struct UiArgs {
    /// Where to serve the page (loopback only: the view has no login).
    #[arg(long, default_value = "127.0.0.1:9900")]
    pub listen: SocketAddr,
    /// Controllers and credential.
    #[command(flatten)]
    pub api: crate::ctl::ControllerFlags,
    /// A site's gateway admin address, `SITE=HOST:PORT` (repeatable): its
    /// metrics give the links' round-trip times, loss and request rates.
    #[arg(long = "gateway")]
    pub gateways: Vec<String>,
}

/// What the view reads from.
pub struct Sources {
    /// An admin client for the controllers.
    pub client: ControllerClient,
    /// Gateway admin addresses by site.
    pub gateways: BTreeMap<String, SocketAddr>,
}

/// `causeway ui`: serves until interrupted.
pub async fn run(args: UiArgs) -> anyhow::Result<()> {
    let sources = Sources {
        client: crate::ctl::admin_client(&args.api.creds, args.api.controller.clone())?,
        gateways: crate::scrape::gateway_flags(&args.gateways)?,
    };
    let (addr, task) = serve(args.listen, sources).await?;
    println!("causeway ui: http://{addr}/");
    task.await?;
    Ok(())
}

/// Serves the view on `listen` (which must be a loopback address); the
/// bound address and the server's task.
pub async fn serve(
    listen: SocketAddr,
    sources: Sources,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    if !listen.ip().is_loopback() {
        anyhow::bail!(
            "--listen {listen}: the view has no login, so it serves loopback only; reach it from elsewhere through an SSH tunnel or an authenticating proxy"
        );
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    let state = Arc::new(View {
        sources,
        last: tokio::sync::Mutex::new(None),
    });
    let task = tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), handle(sock, &state)).await;
            });
        }
    });
    Ok((addr, task))
}

struct View {
    sources: Sources,
    /// The last state and when it was made: requests within a second share
    /// it, and counters turn into rates against it.
    last: tokio::sync::Mutex<Option<Snapshot>>,
}

/// A state as served, when it was made, and the counters it was made from.
type Snapshot = (Instant, serde_json::Value, BTreeMap<String, Sample>);

/// One request per connection: `GET /` or `GET /api/state`.
async fn handle(mut sock: tokio::net::TcpStream, view: &View) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        if n == buf.len() {
            return Ok(());
        }
        let r = sock.read(&mut buf[n..]).await?;
        if r == 0 {
            return Ok(());
        }
        n += r;
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let path = head.split_whitespace().nth(1).unwrap_or("/");
    let (status, kind, body) = match path {
        "/" | "/index.html" => ("200 OK", "text/html; charset=utf-8", PAGE.to_string()),
        "/api/state" => match view.state().await {
            Ok(v) => ("200 OK", "application/json", v.to_string()),
            Err(e) => (
                "503 Service Unavailable",
                "application/json",
                serde_json::json!({"error": format!("{e:#}")}).to_string(),
            ),
        },
        _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\ncache-control: no-store\r\nx-content-type-options: nosniff\r\ncontent-security-policy: default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(resp.as_bytes()).await?;
    Ok(())
}

impl View {
    async fn state(&self) -> anyhow::Result<serde_json::Value> {
        let mut last = self.last.lock().await;
        if let Some((at, v, _)) = last.as_ref() {
            if at.elapsed() < Duration::from_millis(900) {
                return Ok(v.clone());
            }
        }
        let prev = last.as_ref().map(|(at, _, c)| (*at, c.clone()));
        let (v, counters) = self.build(prev).await?;
        *last = Some((Instant::now(), v.clone(), counters));
        Ok(v)
    }

    async fn build(
        &self,
        prev: Option<(Instant, BTreeMap<String, Sample>)>,
    ) -> anyhow::Result<(serde_json::Value, BTreeMap<String, Sample>)> {
        let c = &self.sources.client;
        let status = c
            .call(false, |mut f| async move {
                f.status(pb::StatusRequest {}).await
            })
            .await
            .map_err(|s| anyhow::anyhow!("controllers: {}", s.message()))?;
        let snapshot = c
            .catalog(false)
            .await
            .map_err(|s| anyhow::anyhow!("catalog: {}", s.message()))?;
        let view = CatalogView::from_snapshot(snapshot);

        // What each gateway measures, and its rates since the last look
        // (the same as `ctl traffic` computes).
        let mut measured = BTreeMap::new();
        let mut samples = BTreeMap::new();
        for (site, addr) in &self.sources.gateways {
            let text = crate::scrape::fetch(&addr.to_string())
                .await
                .unwrap_or_default();
            measured.insert(site.clone(), crate::explain::parse_gateway_metrics(&text));
            samples.insert(site.clone(), crate::ctl_traffic::parse(&text));
        }
        let rates = match &prev {
            Some((at, before)) => {
                crate::ctl_traffic::interval(before, &samples, at.elapsed().as_secs_f64())
            }
            // No earlier look: every rate reads zero.
            None => crate::ctl_traffic::interval(&samples, &samples, 1.0),
        };
        let secs = prev
            .as_ref()
            .map_or(0.0, |(at, _)| at.elapsed().as_secs_f64());
        let bytes_rate = |site: &str| match (&prev, samples.get(site)) {
            (Some((_, before)), Some(now)) if secs > 0.0 => {
                let old = before.get(site).map_or(0.0, |b| b.tunnel_bytes);
                ((now.tunnel_bytes - old) / secs).max(0.0)
            }
            _ => 0.0,
        };

        let sites: Vec<serde_json::Value> = view
            .sites
            .iter()
            .map(|(name, s)| {
                serde_json::json!({
                    "name": name,
                    "available": s.available,
                    "labels": s.labels,
                    "trust_domain": s.trust_domain,
                    "gateways": s.tunnel_addrs,
                    "measured": self.sources.gateways.contains_key(name),
                    "tunnel_bytes_per_s": bytes_rate(name),
                })
            })
            .collect();
        let links: Vec<serde_json::Value> = rates["links"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|mut l| {
                // Tunnels to a site authenticate its gateways against the
                // bundle of this trust domain only.
                let to = l["to"].as_str().unwrap_or("").to_string();
                l["trust_domain"] = view
                    .sites
                    .get(&to)
                    .map(|s| s.trust_domain.clone())
                    .unwrap_or_default()
                    .into();
                l
            })
            .collect();
        let services: Vec<serde_json::Value> = view
            .services()
            .values()
            .map(|s| {
                let key = s.key.to_string();
                let traffic: BTreeMap<String, serde_json::Value> = view
                    .sites
                    .keys()
                    .filter_map(|from| {
                        let local = measured.get(from).cloned().unwrap_or_default();
                        crate::explain::explain(&view, &key, Some(from), &local)
                            .ok()
                            .map(|e| {
                                // Why, in the words `ctl explain` prints.
                                let mut json = e.json;
                                json["why"] = e.text.into();
                                (from.clone(), json)
                            })
                    })
                    .collect();
                let requests: BTreeMap<String, serde_json::Value> = rates["services"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|r| r["service"] == key.as_str())
                    .map(|r| {
                        (
                            r["gateway"].as_str().unwrap_or("").to_string(),
                            serde_json::json!({"rps": r["rps"], "error_ratio": r["error_ratio"], "p99_ms": r["p99_ms"]}),
                        )
                    })
                    .collect();
                serde_json::json!({
                    "name": key,
                    "exporters": s.exporters.iter().map(|(site, healthy)| serde_json::json!({
                        "site": site.to_string(), "healthy": healthy,
                        "total": s.totals.get(site).copied().unwrap_or(*healthy),
                        "zones": s.zones.get(site).map(|zs| zs.iter().map(|z| serde_json::json!({"zone": z.zone, "healthy": z.healthy, "total": z.total})).collect::<Vec<_>>()).unwrap_or_default(),
                    })).collect::<Vec<_>>(),
                    "traffic": traffic,
                    "requests": requests,
                })
            })
            .collect();
        let policies: Vec<serde_json::Value> = view
            .policies
            .values()
            .map(|p| {
                serde_json::json!({"kind": p.kind, "namespace": p.namespace, "name": p.name,
                    "owner": if p.owner_site.is_empty() { "operator".to_string() } else { p.owner_site.clone() }})
            })
            .collect();
        let nodes: Vec<serde_json::Value> = status
            .nodes
            .iter()
            .map(|n| {
                serde_json::json!({"id": n.id, "addr": n.addr, "voter": n.voter,
                    "leader": n.id == status.leader_id, "matched_index": n.matched_index,
                    "lag": status.last_log_index.saturating_sub(n.matched_index)})
            })
            .collect();
        let v = serde_json::json!({
            "revision": view.revision.0,
            "controllers": {"leader": status.leader_id, "term": status.term, "nodes": nodes},
            "sites": sites,
            "links": links,
            "services": services,
            "policies": policies,
        });
        Ok((v, samples))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_loopback_is_served() {
        let client = ControllerClient::new(vec![], "", None);
        let err = serve(
            "0.0.0.0:0".parse().unwrap(),
            Sources {
                client,
                gateways: BTreeMap::new(),
            },
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("loopback only"), "{err}");
    }
}
