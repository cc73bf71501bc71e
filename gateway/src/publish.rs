//! Local health checks and export publication: every interval, TCP-connect
//! to each local endpoint, and publish the site's exports with healthy
//! counts when they changed (and at least every 30 s).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use causeway_api::client::ControllerClient;
use causeway_api::model::SiteName;
use causeway_api::pb;
use tokio::net::TcpStream;

use crate::config::LocalExport;
use crate::exports::Exports;

const REFRESH: Duration = Duration::from_secs(30);

/// Publishes this site's exports (with their health, checked every
/// `interval`) whenever they change, and at least every 30 s.
pub async fn run(
    client: Arc<ControllerClient>,
    site: SiteName,
    exports: Arc<Exports>,
    advertise: Vec<causeway_api::model::TunnelAddr>,
    interval: Duration,
) {
    let tunnel_addrs: Vec<String> = advertise.iter().map(|a| a.to_string()).collect();
    let mut published: Option<(Vec<pb::Export>, Instant)> = None;
    let mut changes = exports.subscribe();
    // Exports not known yet (their source has not answered) are not
    // published: an empty list would withdraw what the site exported.
    if changes.wait_for(|t| t.known()).await.is_err() {
        return;
    }
    loop {
        changes.borrow_and_update();
        let table = exports.current().exports();
        let current = check(&table, interval.min(Duration::from_secs(1))).await;
        let stale = match &published {
            Some((p, at)) => *p != current || at.elapsed() >= REFRESH,
            None => true,
        };
        if stale {
            let req = pb::PublishExportsRequest {
                site: site.to_string(),
                exports: current.clone(),
                tunnel_addrs: tunnel_addrs.clone(),
            };
            let result = async {
                let mut fed = client.federation().await.map_err(|e| e.to_string())?;
                fed.publish_exports(req)
                    .await
                    .map_err(|s| format!("{}: {}", s.code(), s.message()))
            }
            .await;
            match result {
                Ok(r) => {
                    tracing::debug!(revision = r.get_ref().revision, "exports published");
                    published = Some((current, Instant::now()));
                }
                Err(e) => {
                    metrics::counter!("causeway_publish_errors_total").increment(1);
                    tracing::warn!(error = %e, "publishing exports failed; will retry");
                    client.rotate();
                }
            }
        }
        // A new export set is published at once; health every interval.
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            r = changes.changed() => if r.is_err() { return },
        }
    }
}

/// Health-checks every endpoint once and groups ports per service.
pub async fn check(exports: &[LocalExport], timeout: Duration) -> Vec<pb::Export> {
    type Entry<'a> = (
        Vec<pb::ServicePort>,
        BTreeSet<SocketAddr>,
        Vec<&'a LocalExport>,
    );
    let mut by_service: BTreeMap<String, Entry<'_>> = BTreeMap::new();
    let probes = exports
        .iter()
        .flat_map(|e| e.endpoints.iter().map(move |a| (e, *a)));
    let probes: Vec<_> = probes
        .map(|(e, a)| async move {
            let ok = match &e.health_path {
                None => matches!(
                    tokio::time::timeout(timeout, TcpStream::connect(a)).await,
                    Ok(Ok(_))
                ),
                Some(path) => matches!(
                    tokio::time::timeout(timeout, http_check(a, path)).await,
                    Ok(true)
                ),
            };
            (e, a, ok)
        })
        .collect();
    let results = futures::future::join_all(probes).await;
    for (e, addr, ok) in results {
        let entry = by_service.entry(e.service.to_string()).or_default();
        if !entry.0.iter().any(|p| p.port == e.port as u32) {
            entry.0.push(pb::ServicePort {
                port: e.port as u32,
                protocol: e.protocol.as_str().to_string(),
                name: e.port_name.clone(),
            });
        }
        if ok {
            entry.1.insert(addr);
        }
        if !entry.2.iter().any(|x| std::ptr::eq(*x, e)) {
            entry.2.push(e);
        }
    }
    by_service
        .into_iter()
        .map(|(service, (mut ports, healthy, entries))| {
            ports.sort_by_key(|p| p.port);
            metrics::gauge!("causeway_export_healthy_endpoints", "service" => service.clone())
                .set(healthy.len() as f64);
            let headless = entries.iter().any(|e| e.headless);
            let total: BTreeSet<SocketAddr> = entries
                .iter()
                .flat_map(|e| e.endpoints.iter().copied())
                .collect();
            let zones = zone_health(&entries, &total, &healthy);
            let subsets = subset_health(&entries, &total, &healthy);
            for g in &subsets {
                metrics::gauge!("causeway_export_subset_healthy_endpoints", "service" => service.clone(), "subset" => g.name.clone())
                    .set(f64::from(g.healthy));
            }
            for z in &zones {
                metrics::gauge!("causeway_export_zone_healthy_endpoints", "service" => service.clone(), "zone" => z.zone.clone())
                    .set(f64::from(z.healthy));
            }
            pb::Export {
                exported_at_unix_ms: entries.iter().map(|e| e.exported_at_ms).max().unwrap_or(0),
                client_ip_affinity: entries.iter().any(|e| e.client_ip_affinity),
                service,
                ports,
                healthy_endpoints: healthy.len() as u32,
                total_endpoints: total.len() as u32,
                zones,
                subsets,
                vip_index: 0,
                headless,
                endpoints: if headless {
                    ready_endpoints(&entries, &healthy)
                } else {
                    Vec::new()
                },
            }
        })
        .collect()
}

/// Healthy and total endpoints per zone; none when no endpoint of the
/// service names a zone (all are in the site's own zone).
fn zone_health(
    entries: &[&LocalExport],
    total: &BTreeSet<SocketAddr>,
    healthy: &BTreeSet<SocketAddr>,
) -> Vec<pb::ZoneHealth> {
    if entries.iter().all(|e| e.zones.is_empty()) {
        return Vec::new();
    }
    group_counts(entries, total, healthy, Some(""), |e, a| e.zones.get(a))
        .into_iter()
        .map(|(zone, (healthy, total))| pb::ZoneHealth {
            zone,
            healthy,
            total,
        })
        .collect()
}

/// Healthy and total endpoints per subset (version); endpoints without a
/// version are in none.
fn subset_health(
    entries: &[&LocalExport],
    total: &BTreeSet<SocketAddr>,
    healthy: &BTreeSet<SocketAddr>,
) -> Vec<pb::SubsetHealth> {
    group_counts(entries, total, healthy, None, |e, a| e.versions.get(a))
        .into_iter()
        .map(|(name, (healthy, total))| pb::SubsetHealth {
            name,
            healthy,
            total,
        })
        .collect()
}

/// (healthy, total) endpoints per group, an endpoint's group being the
/// first an entry gives it, else `default` (`None`: in no group).
fn group_counts<'a>(
    entries: &[&'a LocalExport],
    total: &BTreeSet<SocketAddr>,
    healthy: &BTreeSet<SocketAddr>,
    default: Option<&str>,
    group_of: impl Fn(&'a LocalExport, &SocketAddr) -> Option<&'a String>,
) -> BTreeMap<String, (u32, u32)> {
    let mut by_group: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    for a in total {
        let found = entries.iter().find_map(|e| group_of(e, a));
        let Some(g) = found.map(String::as_str).or(default) else {
            continue;
        };
        let c = by_group.entry(g.to_string()).or_default();
        c.1 += 1;
        if healthy.contains(a) {
            c.0 += 1;
        }
    }
    by_group
}

/// The ready endpoints of a headless service, one per address and
/// hostname: an endpoint serving several ports counts once.
fn ready_endpoints(entries: &[&LocalExport], healthy: &BTreeSet<SocketAddr>) -> Vec<pb::Endpoint> {
    let mut out: BTreeSet<(std::net::IpAddr, String)> = BTreeSet::new();
    for e in entries {
        for addr in e.endpoints.iter().filter(|a| healthy.contains(a)) {
            let host = e.hostnames.get(addr).cloned().unwrap_or_default();
            out.insert((addr.ip(), host));
        }
    }
    out.into_iter()
        .map(|(ip, hostname)| pb::Endpoint {
            address: ip.to_string(),
            hostname,
        })
        .collect()
}

/// `GET path` over HTTP/1.1: healthy on a 2xx status line.
async fn http_check(addr: SocketAddr, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return false;
    };
    let req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nuser-agent: causeway-health\r\nconnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    // The status line is all we need: at most 64 bytes of it.
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => return false,
            Ok(m) => n += m,
        }
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    let mut parts = line.split_whitespace();
    matches!(
        (parts.next(), parts.next()),
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") && code.len() == 3 && code.starts_with('2')
    )
}

/// Tells the controllers this site is alive, every `every`.
pub async fn heartbeat(client: Arc<ControllerClient>, site: SiteName, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // A controller that cannot pass the heartbeat on (cut off from the
        // leader, or a leader cut off from the rest) answers with an error
        // or not at all: the next one is tried at once, each briefly, so a
        // partition between controllers does not let the lease lapse while
        // some path to the leader exists.
        for _ in 0..client.endpoints().len().max(1) {
            let req = pb::HeartbeatRequest {
                site: site.to_string(),
            };
            let r = async {
                let mut fed = client.federation().await.map_err(|e| e.to_string())?;
                tokio::time::timeout(Duration::from_secs(1), fed.heartbeat(req))
                    .await
                    .map_err(|_| "timed out".to_string())?
                    .map_err(|s| s.message().to_string())
            }
            .await;
            match r {
                Ok(_) => {
                    metrics::counter!("causeway_heartbeats_total", "result" => "ok").increment(1);
                    break;
                }
                Err(e) => {
                    metrics::counter!("causeway_heartbeats_total", "result" => "error")
                        .increment(1);
                    tracing::debug!(error = %e, "heartbeat failed; trying the next controller");
                    client.rotate();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server answering every connection with `reply`.
    async fn server(reply: &'static str) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(reply.as_bytes()).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn http_health_checks_want_a_2xx_status() {
        let ok = server("HTTP/1.1 204 No Content\r\n\r\n").await;
        let sick = server("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        let junk = server("SSH-2.0-OpenSSH\r\n").await;
        assert!(http_check(ok, "/healthz").await);
        assert!(!http_check(sick, "/healthz").await);
        assert!(!http_check(junk, "/healthz").await);
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone = closed.local_addr().unwrap();
        drop(closed);
        assert!(!http_check(gone, "/healthz").await);
    }

    #[tokio::test]
    async fn healthy_endpoints_are_counted_per_zone_and_subset() {
        let up_a = server("HTTP/1.1 200 OK\r\n\r\n").await;
        let up_b = server("HTTP/1.1 200 OK\r\n\r\n").await;
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let down_b = closed.local_addr().unwrap();
        drop(closed);
        let own = server("HTTP/1.1 200 OK\r\n\r\n").await;
        let export = LocalExport {
            service: "shop/web".parse().unwrap(),
            port: 80,
            port_name: String::new(),
            protocol: causeway_api::model::Protocol::Tcp,
            endpoints: vec![up_a, up_b, down_b, own],
            headless: false,
            hostnames: Default::default(),
            health_path: None,
            zones: [(up_a, "zone-a"), (up_b, "zone-b"), (down_b, "zone-b")]
                .into_iter()
                .map(|(a, z)| (a, z.to_string()))
                .collect(),
            versions: [(up_a, "v1"), (up_b, "v2"), (down_b, "v2")]
                .into_iter()
                .map(|(a, z)| (a, z.to_string()))
                .collect(),
            exported_at_ms: 0,
            client_ip_affinity: false,
        };
        let out = check(std::slice::from_ref(&export), Duration::from_secs(1)).await;
        let e = &out[0];
        assert_eq!((e.healthy_endpoints, e.total_endpoints), (3, 4));
        let zones: Vec<(&str, u32, u32)> = e
            .zones
            .iter()
            .map(|z| (z.zone.as_str(), z.healthy, z.total))
            .collect();
        assert_eq!(zones, vec![("", 1, 1), ("zone-a", 1, 1), ("zone-b", 1, 2)]);
        // Subsets: the endpoint without a version is in none.
        let subsets: Vec<(&str, u32, u32)> = e
            .subsets
            .iter()
            .map(|z| (z.name.as_str(), z.healthy, z.total))
            .collect();
        assert_eq!(subsets, vec![("v1", 1, 1), ("v2", 1, 2)]);

        // No zones configured: nothing per zone is published.
        let plain = LocalExport {
            zones: Default::default(),
            ..export
        };
        assert!(check(&[plain], Duration::from_secs(1)).await[0]
            .zones
            .is_empty());
    }
}
