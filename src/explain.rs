//! `causeway ctl explain`: how a name resolves and where its traffic goes,
//! computed from the controller's catalog and policies with the same
//! decision functions the gateways use (`causeway_gateway_core::traffic`),
//! plus, from a gateway's metrics, what only that gateway measures.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::scrape::label;

use causeway_api::catalog::CatalogView;
use causeway_api::model::ServiceKey;
use causeway_api::policy::{parse_document, FailoverMode, Spec};
use causeway_gateway::steer::{site_labels, site_views, FailoverPlan};
use causeway_gateway_core::traffic::{tier_health, tier_loads, tiers};

/// What one gateway knows that the controller does not.
#[derive(Debug, Default, Clone)]
pub struct GatewayView {
    /// Smoothed QUIC round-trip time per site, µs.
    pub rtt_us: BTreeMap<String, u64>,
    /// `(service, site)` pairs ejected by outlier detection.
    pub ejected: Vec<(String, String)>,
    /// Sites whose tunnels are all down, waiting for a redial: they take
    /// traffic only when no other site can.
    pub unreachable: Vec<String>,
}

/// Reads a gateway's `/metrics` for RTTs and ejections.
pub async fn scrape_gateway(addr: &str) -> anyhow::Result<GatewayView> {
    Ok(parse_gateway_metrics(&crate::scrape::fetch(addr).await?))
}

/// What a gateway's metrics say about RTTs, ejections and unreachable
/// peers.
pub fn parse_gateway_metrics(text: &str) -> GatewayView {
    let mut v = GatewayView::default();
    for line in text.lines() {
        let value = crate::scrape::value(line);
        if line.starts_with("causeway_peer_rtt_seconds{") {
            if let (Some(site), Some(x)) = (label(line, "site"), value) {
                v.rtt_us.insert(site.to_string(), (x * 1e6) as u64);
            }
        } else if line.starts_with("causeway_peer_unreachable{") && value == Some(1.0) {
            if let Some(site) = label(line, "site") {
                v.unreachable.push(site.to_string());
            }
        } else if line.starts_with("causeway_outlier_ejected{") && value == Some(1.0) {
            if let (Some(svc), Some(site)) = (label(line, "service"), label(line, "site")) {
                v.ejected.push((svc.to_string(), site.to_string()));
            }
        }
    }
    v
}

/// An explanation, for people and programs.
pub struct Explanation {
    /// The text `ctl explain` prints.
    pub text: String,
    /// The same as JSON.
    pub json: serde_json::Value,
}

/// `<svc>.<ns>.svc.<zone>` or `<ns>/<svc>` to a service key.
fn service_key(target: &str) -> anyhow::Result<ServiceKey> {
    if target.contains('/') {
        return target
            .parse()
            .map_err(|e| anyhow::anyhow!("{target:?}: {e}"));
    }
    let labels: Vec<&str> = target.trim_end_matches('.').split('.').collect();
    match labels.as_slice() {
        [svc, ns, "svc", ..] => format!("{ns}/{svc}")
            .parse()
            .map_err(|e| anyhow::anyhow!("{target:?}: {e}")),
        _ => anyhow::bail!("{target:?}: give <svc>.<ns>.svc.clusterset.local or <ns>/<svc>"),
    }
}

/// How `target` resolves and where its traffic goes from site `from`,
/// computed from the catalog with the gateways' own decision functions.
pub fn explain(
    view: &CatalogView,
    target: &str,
    from: Option<&str>,
    gw: &GatewayView,
) -> anyhow::Result<Explanation> {
    let key = service_key(target)?;
    let mut t = String::new();
    let name = format!("{}.{}.svc.clusterset.local", key.name(), key.namespace());
    let services = view.services();
    let Some(svc) = services.get(&key) else {
        let exported_somewhere = view
            .exports
            .values()
            .flatten()
            .any(|e| e.service == key.to_string());
        let why = if exported_somewhere {
            "every site exporting it is unavailable (lease lapsed): the name is NXDOMAIN until one returns"
        } else {
            "no site exports it: the name is NXDOMAIN"
        };
        writeln!(t, "{name} -> {key}: {why}")?;
        return Ok(Explanation {
            text: t,
            json: serde_json::json!({"name": name, "service": key.to_string(), "exported": false, "why": why}),
        });
    };
    if svc.headless {
        writeln!(
            t,
            "{name} -> {key}: headless; DNS answers with {} ready endpoint address(es) of every site, callers connect directly",
            svc.endpoints.len()
        )?;
    } else {
        writeln!(
            t,
            "{name} -> {key}: ClusterSetIP; each site's DNS answers with address #{} of its gateway's vip_range, where the gateway listens on ports {:?}",
            svc.vip_index,
            svc.ports.iter().map(|p| p.port).collect::<Vec<_>>()
        )?;
    }

    // Policies that apply.
    let mut failover = None;
    let mut split = None;
    let mut l7 = crate::explain_l7::L7::default();
    let mut names = Vec::new();
    for p in view.policies.values() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&p.document_json) else {
            continue;
        };
        let Ok(policy) = parse_document(&v) else {
            continue;
        };
        if policy.target() != key {
            continue;
        }
        names.push(format!("{} {}/{}", p.kind, p.namespace, p.name));
        match policy.spec {
            Spec::FailoverPolicy(f) if failover.is_none() => {
                failover = Some((format!("{}/{}", p.namespace, p.name), f))
            }
            Spec::TrafficSplit(s) if split.is_none() => {
                split = Some((format!("{}/{}", p.namespace, p.name), s.weights))
            }
            Spec::HttpRoute(r) if l7.route.is_none() => {
                l7.route = Some((format!("{}/{}", p.namespace, p.name), r))
            }
            Spec::RateLimit(r) if l7.limits.is_none() => {
                l7.limits = Some((format!("{}/{}", p.namespace, p.name), r))
            }
            Spec::RequestAuthentication(a) if l7.authn.is_none() => {
                l7.authn = Some((format!("{}/{}", p.namespace, p.name), a))
            }
            Spec::AuthorizationPolicy(a) if l7.authz.is_none() => {
                l7.authz = Some((format!("{}/{}", p.namespace, p.name), a))
            }
            _ => {}
        }
    }
    writeln!(
        t,
        "policies: {}",
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    )?;

    // The exporting sites, as the caller's gateway sees them.
    let local = from.unwrap_or("");
    let labels = site_labels(&svc.exporters, |s| {
        view.sites
            .get(s.as_str())
            .map(|site| {
                site.labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect()
            })
            .unwrap_or_default()
    });
    let key_str = key.to_string();
    let sites = site_views(
        local,
        &svc.exporters,
        &svc.totals,
        &labels,
        |s| gw.rtt_us.get(s.as_str()).copied(),
        // The gateway's own order treats a site it cannot reach as
        // ejected; so does this explanation.
        |s| {
            gw.ejected
                .iter()
                .any(|(svc, site)| *svc == key_str && site == s)
                || gw.unreachable.iter().any(|u| u == s)
        },
    );
    writeln!(t, "sites that export it (available ones only):")?;
    let mut site_json = Vec::new();
    for s in &sites {
        let rtt = s
            .rtt_us
            .map(|r| format!("{:.2} ms", r as f64 / 1000.0))
            .unwrap_or_else(|| "unknown".into());
        let lbl: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let zones = s.site.parse().ok().and_then(|n| svc.zones.get(&n));
        let unreachable = gw.unreachable.iter().any(|u| u == s.site);
        writeln!(
            t,
            "  {:<16} healthy {}/{}  rtt {rtt}  ejected {}  labels [{}]{}",
            s.site,
            s.healthy,
            s.total,
            if unreachable {
                "yes (tunnel down, redialing)"
            } else if s.ejected {
                "yes"
            } else {
                "no"
            },
            lbl.join(", "),
            zones.map_or(String::new(), |z| format!("  zones [{}]", zone_summary(z)))
        )?;
        let zone_json: Vec<_> = zones
            .into_iter()
            .flatten()
            .map(|z| serde_json::json!({"zone": z.zone, "healthy": z.healthy, "total": z.total}))
            .collect();
        site_json.push(
            serde_json::json!({"site": s.site, "healthy": s.healthy, "total": s.total,
            "rtt_us": s.rtt_us, "ejected": s.ejected, "labels": lbl, "zones": zone_json}),
        );
    }
    let unavailable: Vec<&String> = view
        .exports
        .iter()
        .filter(|(site, ex)| {
            ex.iter().any(|e| e.service == key_str)
                && !view.sites.get(*site).is_some_and(|s| s.available)
        })
        .map(|(s, _)| s)
        .collect();
    if !unavailable.is_empty() {
        writeln!(
            t,
            "  (also exported by {}, unavailable: lease lapsed, no traffic)",
            unavailable
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )?;
    }

    // The order traffic takes now.
    let plan = FailoverPlan::new(failover.as_ref().map(|(_, f)| f));
    let how = match (&failover, plan.mode) {
        (Some((n, _)), Some(FailoverMode::Ordered)) => format!(
            "FailoverPolicy {n}: the calling site, then {} in order",
            plan.keys.join(", ")
        ),
        (Some((n, _)), Some(FailoverMode::Locality)) => format!(
            "FailoverPolicy {n}: sites sharing the caller's {}, in that order, then the rest",
            plan.keys.join(", then ")
        ),
        (Some((n, _)), Some(FailoverMode::Nearest)) => {
            format!("FailoverPolicy {n}: nearest first by measured round-trip time")
        }
        _ => "no FailoverPolicy: the calling site first, then the others (each connection tries the next on failure)".to_string(),
    };
    let threshold = plan.threshold;
    let tiering = plan.tiering();
    let tier_list = tiers(local, &sites, &tiering);
    let health: Vec<f64> = tier_list.iter().map(|t| tier_health(t, &sites)).collect();
    let loads = tier_loads(&health, threshold);
    writeln!(
        t,
        "traffic from {} now ({how}; a tier below {:.0}% healthy spills to the next):",
        from.unwrap_or("a site that does not export it"),
        threshold * 100.0
    )?;
    let mut tier_json = Vec::new();
    for (i, tier) in tier_list.iter().enumerate() {
        writeln!(
            t,
            "  tier {}: {:<24} health {:>5.1}%  share {:>5.1}%",
            i + 1,
            tier.join(", "),
            health[i] * 100.0,
            loads[i] * 100.0
        )?;
        tier_json.push(serde_json::json!({"sites": tier, "health": health[i], "share": loads[i]}));
    }
    if let Some((n, w)) = &split {
        let can: Vec<(&str, u32)> = sites
            .iter()
            .filter(|s| !s.ejected && s.healthy > 0)
            .filter_map(|s| w.get(s.site).map(|x| (s.site, *x)))
            .collect();
        let total: u32 = can.iter().map(|(_, x)| x).sum();
        if total > 0 {
            let shares: Vec<String> = can
                .iter()
                .map(|(s, x)| format!("{s} {:.1}%", f64::from(*x) * 100.0 / f64::from(total)))
                .collect();
            writeln!(
                t,
                "TrafficSplit {n} overrides the tiers: {} (among its sites that can serve)",
                shares.join(", ")
            )?;
        } else {
            writeln!(
                t,
                "TrafficSplit {n} applies, but none of its sites can serve now: the tiers above decide"
            )?;
        }
    }
    l7.write(svc, &mut t)?;
    Ok(Explanation {
        text: t,
        json: serde_json::json!({
            "name": name, "service": key_str, "headless": svc.headless, "vip_index": svc.vip_index,
            "policies": names, "sites": site_json, "tiers": tier_json,
            "split": split.map(|(n, w)| serde_json::json!({"policy": n, "weights": w})),
        }),
    })
}

/// `zone healthy/total` per zone, the site's own zone shown as `-`.
pub fn zone_summary(zones: &[causeway_api::pb::ZoneHealth]) -> String {
    zones
        .iter()
        .map(|z| {
            let name = if z.zone.is_empty() { "-" } else { &z.zone };
            format!("{name} {}/{}", z.healthy, z.total)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `subset=name healthy/total` per subset (version).
pub fn subset_summary(subsets: &[causeway_api::pb::SubsetHealth]) -> String {
    subsets
        .iter()
        .map(|g| format!("subset={} {}/{}", g.name, g.healthy, g.total))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_keys_map_to_the_service() {
        assert_eq!(
            service_key("payments.shop.svc.clusterset.local")
                .unwrap()
                .to_string(),
            "shop/payments"
        );
        assert_eq!(
            service_key("shop/payments").unwrap().to_string(),
            "shop/payments"
        );
        assert!(service_key("example.com").is_err());
    }

    #[test]
    fn gateway_metrics_give_rtts_and_ejections() {
        let text = "causeway_peer_rtt_seconds{site=\"east\"} 0.00042\n\
                    causeway_outlier_ejected{service=\"shop/p\",site=\"west\"} 1\n\
                    causeway_outlier_ejected{service=\"shop/p\",site=\"east\"} 0\n\
                    causeway_peer_unreachable{site=\"north\"} 1\n\
                    causeway_peer_unreachable{site=\"east\"} 0\n";
        let v = parse_gateway_metrics(text);
        assert_eq!(v.rtt_us["east"], 420);
        assert_eq!(v.ejected, [("shop/p".to_string(), "west".to_string())]);
        assert_eq!(v.unreachable, ["north".to_string()]);
    }
}
