//! Steering: which sites a connection or request tries, in which order,
//! from the service's policies, the sites' health and labels, measured
//! RTTs and outlier state. L4 and HTTP forwarding both ask here; `ctl
//! explain` builds its answer from the same [`FailoverPlan`] and
//! [`site_views`], so what it prints is what the gateway does.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use causeway_api::model::{ServiceKey, SiteName};
use causeway_api::policy::{FailoverMode, FailoverSpec, DEFAULT_HEALTHY_THRESHOLD};
use causeway_gateway_core::traffic::{choose_site, Ejection, Outliers, SiteView, Tiering};
use causeway_gateway_core::{order_sites, Candidate};
use tokio::sync::watch;

use crate::pool::Pool;
use crate::routes::Routes;
use causeway_api::sync::LockExt;

/// How one try at one site went, as outlier detection counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tried {
    /// The site served it.
    Served,
    /// The site failed it (connect failure, reset, 5xx): counts against it.
    Failed,
    /// The site refused it for a reason every site would give (e.g.
    /// forbidden): says nothing about its health.
    Refused,
}

/// A service's failover tiering, from its FailoverPolicy or the default
/// without one (the calling site, then the others).
#[derive(Debug, Clone, PartialEq)]
pub struct FailoverPlan<'a> {
    /// The policy's mode, or `None` without a policy.
    pub mode: Option<FailoverMode>,
    /// The listed sites (ordered) or label keys (locality).
    pub keys: Vec<&'a str>,
    /// Below this healthy share a tier spills to the next.
    pub threshold: f64,
}

impl<'a> FailoverPlan<'a> {
    /// The plan of `policy` (or the default without one).
    pub fn new(policy: Option<&'a FailoverSpec>) -> Self {
        match policy {
            None => Self {
                mode: None,
                keys: Vec::new(),
                threshold: DEFAULT_HEALTHY_THRESHOLD,
            },
            Some(f) => Self {
                mode: Some(f.mode),
                keys: match f.mode {
                    FailoverMode::Ordered => f.sites.iter().map(String::as_str).collect(),
                    FailoverMode::Locality => {
                        f.locality_labels.iter().map(String::as_str).collect()
                    }
                    FailoverMode::Nearest => Vec::new(),
                },
                threshold: f.healthy_threshold,
            },
        }
    }

    /// The tiering the sans-IO core groups sites by.
    pub fn tiering(&self) -> Tiering<'_> {
        match self.mode {
            None | Some(FailoverMode::Ordered) => Tiering::Ordered(&self.keys),
            Some(FailoverMode::Locality) => Tiering::Locality(&self.keys),
            Some(FailoverMode::Nearest) => Tiering::Nearest,
        }
    }
}

/// Each exporter's labels, looked up by `labels_of`, in exporter order (the
/// storage [`site_views`] borrows from).
pub fn site_labels<'a>(
    exporters: &[(SiteName, u32)],
    labels_of: impl Fn(&SiteName) -> Vec<(&'a str, &'a str)>,
) -> Vec<Vec<(&'a str, &'a str)>> {
    exporters.iter().map(|(s, _)| labels_of(s)).collect()
}

/// The exporters of a service as the tiering sees them: healthy and total
/// endpoints, labels, RTT (0 for the calling site itself) and whether it
/// is ejected (or unreachable).
pub fn site_views<'a>(
    local: &str,
    exporters: &'a [(SiteName, u32)],
    totals: &BTreeMap<SiteName, u32>,
    labels: &'a [Vec<(&'a str, &'a str)>],
    rtt_us: impl Fn(&SiteName) -> Option<u64>,
    ejected: impl Fn(&str) -> bool,
) -> Vec<SiteView<'a>> {
    exporters
        .iter()
        .zip(labels)
        .map(|((s, h), l)| SiteView {
            site: s.as_str(),
            healthy: *h,
            total: totals.get(s).copied().unwrap_or(*h).max(*h),
            labels: l,
            rtt_us: if s.as_str() == local {
                Some(0)
            } else {
                rtt_us(s)
            },
            ejected: ejected(s.as_str()),
        })
        .collect()
}

/// This gateway's steering state: the sites' tunnels (for RTT and
/// reachability) and passive health per service.
pub struct Steering {
    /// The site this gateway serves.
    pub local_site: SiteName,
    /// Tunnels to the other sites.
    pub pool: Arc<Pool>,
    /// Passive health per service (only for services with an
    /// OutlierDetection policy).
    outliers: std::sync::Mutex<BTreeMap<ServiceKey, Outliers>>,
}

impl Steering {
    /// Steering for `local_site` over `pool`'s tunnels.
    pub fn new(local_site: SiteName, pool: Arc<Pool>) -> Self {
        Self {
            local_site,
            pool,
            outliers: Default::default(),
        }
    }

    /// The sites to try for one connection, in order. Without a
    /// FailoverPolicy or TrafficSplit: the local site, then sites with
    /// healthy endpoints by name, then the rest. With one: each next site
    /// as the policy would choose it among those not tried yet (tiers by
    /// order, locality or RTT, spilling below the healthy threshold; split
    /// weights), ejected sites last.
    pub fn order(&self, routes: &Routes, service: &ServiceKey) -> Vec<String> {
        let Some(svc) = routes.services.get(service) else {
            return Vec::new();
        };
        let now = causeway_api::clock::unix_ms();
        let mut ejected: Vec<String> = match &svc.policy.outlier {
            Some(_) => self
                .outliers
                .locked()
                .get(service)
                .map(|o| o.ejected(now).into_iter().map(str::to_string).collect())
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        // A site whose tunnels are all down and waiting for a redial takes
        // no traffic while another can: its first request would only fail
        // over. It comes back once a redial (or the warm-up below) works.
        ejected.extend(
            svc.exporters
                .iter()
                .filter(|(s, _)| *s != self.local_site && self.pool.down(s))
                .map(|(s, _)| s.to_string()),
        );
        if !svc.policy.steers() {
            let candidates: Vec<Candidate<'_>> = svc
                .exporters
                .iter()
                .map(|(s, h)| Candidate {
                    site: s.as_str(),
                    healthy_endpoints: if ejected.iter().any(|e| e == s.as_str()) {
                        0
                    } else {
                        *h
                    },
                })
                .collect();
            return order_sites(self.local_site.as_str(), &candidates)
                .into_iter()
                .map(str::to_string)
                .collect();
        }
        let labels = site_labels(&svc.exporters, |s| {
            routes
                .sites
                .get(s)
                .map(|r| {
                    r.labels
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect()
                })
                .unwrap_or_default()
        });
        let views = site_views(
            self.local_site.as_str(),
            &svc.exporters,
            &svc.totals,
            &labels,
            |s| self.pool.rtt(s).map(|d| d.as_micros() as u64),
            |s| ejected.iter().any(|e| e == s),
        );
        let plan = FailoverPlan::new(svc.policy.failover.as_ref());
        let mut order: Vec<&str> = Vec::new();
        while let Some(next) = choose_site(
            self.local_site.as_str(),
            &views,
            &plan.tiering(),
            plan.threshold,
            svc.policy.split.as_ref(),
            &order,
            rand::random::<f64>(),
            rand::random::<f64>(),
        ) {
            order.push(next);
        }
        order.into_iter().map(str::to_string).collect()
    }

    /// Every second, publishes what routing decisions rest on and only this
    /// gateway knows: `causeway_peer_rtt_seconds{site}` (QUIC's smoothed
    /// RTT) and `causeway_outlier_ejected{service,site}` (1 while ejected).
    /// `causeway ctl explain --gateway` reads them.
    pub async fn report(
        self: Arc<Self>,
        routes: watch::Receiver<Arc<Routes>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut shown: std::collections::BTreeSet<(String, String)> = Default::default();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
            let routes = routes.borrow().clone();
            // Keep a tunnel up to every site exporting something we import.
            let exporters: std::collections::BTreeSet<&SiteName> = routes
                .services
                .values()
                .flat_map(|s| s.exporters.iter().map(|(site, _)| site))
                .filter(|s| **s != self.local_site)
                .collect();
            for site in exporters {
                if let Some(route) = routes.sites.get(site) {
                    self.pool.warm(site, route);
                }
            }
            for site in routes.sites.keys() {
                if let Some(rtt) = self.pool.rtt(site) {
                    metrics::gauge!("causeway_peer_rtt_seconds", "site" => site.to_string())
                        .set(rtt.as_secs_f64());
                }
                if let Some(path) = self.pool.path(site) {
                    let site = site.to_string();
                    metrics::gauge!("causeway_peer_packets_sent", "site" => site.clone())
                        .set(path.sent as f64);
                    metrics::gauge!("causeway_peer_packets_lost", "site" => site.clone())
                        .set(path.lost as f64);
                    metrics::gauge!("causeway_peer_path_mtu_bytes", "site" => site.clone())
                        .set(f64::from(path.mtu));
                    metrics::gauge!("causeway_peer_congestion_window_bytes", "site" => site.clone())
                        .set(path.cwnd as f64);
                    metrics::gauge!("causeway_peer_congestion_events", "site" => site)
                        .set(path.congestion_events as f64);
                }
                let down = if self.pool.down(site) { 1.0 } else { 0.0 };
                metrics::gauge!("causeway_peer_unreachable", "site" => site.to_string()).set(down);
            }
            for (verdict, n) in [
                ("congestion", &crate::congestion::LOSS_EVENTS_PASSED),
                ("ignored", &crate::congestion::LOSS_EVENTS_IGNORED),
            ] {
                metrics::gauge!("causeway_tunnel_loss_events", "verdict" => verdict)
                    .set(n.load(std::sync::atomic::Ordering::Relaxed) as f64);
            }
            let now = causeway_api::clock::unix_ms();
            let ejected: std::collections::BTreeSet<(String, String)> = self
                .outliers
                .locked()
                .iter()
                .flat_map(|(svc, o)| {
                    o.ejected(now)
                        .into_iter()
                        .map(|site| (svc.to_string(), site.to_string()))
                        .collect::<Vec<_>>()
                })
                .collect();
            for (svc, site) in shown.difference(&ejected) {
                metrics::gauge!("causeway_outlier_ejected", "service" => svc.clone(), "site" => site.clone()).set(0.0);
            }
            for (svc, site) in &ejected {
                metrics::gauge!("causeway_outlier_ejected", "service" => svc.clone(), "site" => site.clone()).set(1.0);
            }
            shown.extend(ejected);
        }
    }

    /// Feeds one try's result at `site` to the service's outlier
    /// detection (if it has an OutlierDetection policy).
    pub fn observe(&self, routes: &Routes, service: &ServiceKey, site: &SiteName, tried: Tried) {
        let Some(params) = routes.services.get(service).and_then(|s| s.policy.outlier) else {
            return;
        };
        let count = routes
            .services
            .get(service)
            .map_or(1, |s| s.exporters.len());
        let mut all = self.outliers.locked();
        let o = all.entry(service.clone()).or_default();
        match tried {
            Tried::Served => o.on_success(site.as_str()),
            Tried::Refused => {}
            Tried::Failed => {
                if let Ejection::Ejected(until) = o.on_failure(
                    site.as_str(),
                    count,
                    &params,
                    causeway_api::clock::unix_ms(),
                ) {
                    metrics::counter!("causeway_outlier_ejections_total", "service" => service.to_string(), "site" => site.to_string()).increment(1);
                    tracing::warn!(%service, %site, until_ms = until, "site ejected after consecutive failures");
                }
            }
        }
    }
}
