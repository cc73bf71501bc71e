//! The routing table a gateway serves from, rebuilt on every catalog change
//! and read without locks by connection handlers.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use causeway_api::catalog::{CatalogView, ServiceView};
use causeway_api::model::{
    import_port, vip_for, Protocol, ServiceKey, SiteName, TrustDomain, TunnelAddr,
};
use causeway_api::policy::{
    parse_document, AuthzSpec, FailoverSpec, FaultSpec, RetrySpec, Spec, TimeoutSpec,
};
use causeway_gateway_core::traffic::{Limits, OutlierParams};

use crate::config::ListenPlan;

/// How to reach one remote site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteRoute {
    /// The trust domain its gateways must prove.
    pub trust_domain: TrustDomain,
    /// The site's labels (locality: zone, region).
    pub labels: Vec<(String, String)>,
    /// One per gateway replica of the site, with its weight.
    pub tunnel_addrs: Vec<TunnelAddr>,
}

/// One imported (or local) service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRoute {
    /// Its ports, each with the address its outbound listener takes (on
    /// the service's VIP, or on Kubernetes the pod's address and the
    /// port's own listener port).
    pub listen: BTreeMap<u16, SocketAddr>,
    /// Exporting sites and their healthy endpoint counts.
    pub exporters: Vec<(SiteName, u32)>,
    /// Ports whose protocol is `http` or `http2`: proxied per request,
    /// speaking that protocol to the endpoints.
    pub http_ports: BTreeMap<u16, Protocol>,
    /// Each exporter's endpoints, healthy or not.
    pub totals: BTreeMap<SiteName, u32>,
    /// Each exporter's subsets (versions) with their healthy endpoints.
    pub subsets: BTreeMap<SiteName, Vec<(String, u32)>>,
    /// The policies that apply.
    pub policy: ServicePolicy,
}

/// The traffic policies that apply to one service (from the catalog).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServicePolicy {
    /// Site order.
    pub failover: Option<FailoverSpec>,
    /// Weights per site.
    pub split: Option<BTreeMap<String, u32>>,
    /// Passive health.
    pub outlier: Option<OutlierParams>,
    /// Retries (HTTP).
    pub retry: Option<RetrySpec>,
    /// Deadlines (HTTP).
    pub timeout: Option<TimeoutSpec>,
    /// Circuit breaker limits (HTTP).
    pub breaker: Option<Limits>,
    /// Injected faults (HTTP).
    pub fault: Option<FaultSpec>,
    /// Who may call (checked at the exporting gateway).
    pub authz: Option<AuthzSpec>,
    /// Per-request routing (HTTP).
    pub route: Option<crate::httproute::CompiledRoute>,
    /// Rate limits (checked at the exporting gateway).
    pub rate_limit: Option<crate::admission::CompiledLimits>,
    /// Accepted tokens (checked at the exporting gateway).
    pub authn: Option<causeway_api::policy::RequestAuthnSpec>,
}

impl ServicePolicy {
    /// Whether the exporting gateway must see this service's HTTP requests
    /// one by one (to check them) rather than splice its streams.
    pub fn checks_requests(&self) -> bool {
        self.rate_limit
            .as_ref()
            .is_some_and(|l| l.limits_requests())
            || self.authn.is_some()
            || self
                .authz
                .as_ref()
                .is_some_and(|a| a.has_request_conditions())
    }

    /// Identifies what the exporting gateway checks per request: callers
    /// keep upstream connections per value, so a change moves their next
    /// request onto a fresh stream that the new checks see.
    pub fn admission_epoch(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        if !self.checks_requests() {
            return 0;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        if let Some(l) = &self.rate_limit {
            serde_json::to_string(&l.spec)
                .unwrap_or_default()
                .hash(&mut h);
        }
        serde_json::to_string(&self.authn)
            .unwrap_or_default()
            .hash(&mut h);
        serde_json::to_string(&self.authz)
            .unwrap_or_default()
            .hash(&mut h);
        h.finish().max(1)
    }
}

impl ServicePolicy {
    /// Whether anything overrides the default order (local, then healthy
    /// sites by name).
    pub fn steers(&self) -> bool {
        self.failover.is_some() || self.split.is_some()
    }
}

/// Runs `log` the first time this process sees `key` (up to a bound):
/// a policy problem is logged once, not at every catalog change — with
/// thousands of policies, a warning per policy per change flooded the
/// logs (found by the chaos suite). `causeway_policies_ignored` counts
/// what the latest catalog ignores.
fn warn_once(key: String, log: impl FnOnce()) {
    static SEEN: std::sync::Mutex<Option<std::collections::HashSet<String>>> =
        std::sync::Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    let seen = seen.get_or_insert_with(Default::default);
    if seen.len() < 10_000 && seen.insert(key) {
        log();
    }
}

/// Policies by target service. Of several policies of one kind for one
/// service, the first by name applies (a warning, once, names the others).
fn policies_by_service(view: &CatalogView) -> BTreeMap<ServiceKey, ServicePolicy> {
    let mut out: BTreeMap<ServiceKey, ServicePolicy> = BTreeMap::new();
    let mut ignored = 0u64;
    for p in view.policies.values() {
        let parsed = serde_json::from_str::<serde_json::Value>(&p.document_json)
            .map_err(|e| vec![e.to_string()])
            .and_then(|v| parse_document(&v));
        let policy = match parsed {
            Ok(policy) => policy,
            Err(errs) => {
                ignored += 1;
                warn_once(
                    format!(
                        "unreadable {}/{}/{}/{}",
                        p.kind, p.namespace, p.name, p.revision
                    ),
                    || {
                        tracing::warn!(kind = %p.kind, namespace = %p.namespace, name = %p.name, errors = ?errs, "ignoring a policy this gateway cannot read");
                    },
                );
                continue;
            }
        };
        let target = policy.target();
        let entry = out.entry(target.clone()).or_default();
        let mut dup = |what: &str| {
            ignored += 1;
            warn_once(
                format!("dup {} {what} {}", policy.target(), policy.name),
                || {
                    tracing::warn!(service = %policy.target(), kind = what, ignored = %policy.name, "more than one policy of this kind; the first by name applies");
                },
            );
        };
        match policy.spec {
            Spec::FailoverPolicy(f) if entry.failover.is_none() => entry.failover = Some(f),
            Spec::TrafficSplit(t) if entry.split.is_none() => entry.split = Some(t.weights),
            Spec::OutlierDetection(o) if entry.outlier.is_none() => {
                entry.outlier = Some(OutlierParams {
                    consecutive_failures: o.consecutive_failures,
                    ejection_ms: u64::from(o.ejection_ms),
                    max_ejected_percent: o.max_ejected_percent,
                })
            }
            Spec::RetryPolicy(r) if entry.retry.is_none() => entry.retry = Some(r),
            Spec::TimeoutPolicy(t) if entry.timeout.is_none() => entry.timeout = Some(t),
            Spec::CircuitBreaker(c) if entry.breaker.is_none() => {
                entry.breaker = Some(Limits {
                    max_connections: c.max_connections,
                    max_pending: c.max_pending,
                    max_requests: c.max_requests,
                })
            }
            Spec::FaultInjection(f) if entry.fault.is_none() => entry.fault = Some(f),
            Spec::FailoverPolicy(_) => dup("FailoverPolicy"),
            Spec::TrafficSplit(_) => dup("TrafficSplit"),
            Spec::OutlierDetection(_) => dup("OutlierDetection"),
            Spec::RetryPolicy(_) => dup("RetryPolicy"),
            Spec::TimeoutPolicy(_) => dup("TimeoutPolicy"),
            Spec::CircuitBreaker(_) => dup("CircuitBreaker"),
            Spec::FaultInjection(_) => dup("FaultInjection"),
            Spec::AuthorizationPolicy(a) if entry.authz.is_none() => entry.authz = Some(a),
            Spec::AuthorizationPolicy(_) => dup("AuthorizationPolicy"),
            Spec::HttpRoute(r) if entry.route.is_none() => {
                match crate::httproute::CompiledRoute::compile(&policy.name, r) {
                    Ok(c) => entry.route = Some(c),
                    Err(e) => {
                        ignored += 1;
                        warn_once(
                            format!("route {target} {} {}", policy.name, p.revision),
                            || tracing::warn!(service = %target, name = %policy.name, error = %e, "ignoring an HTTPRoute this gateway cannot compile"),
                        );
                    }
                }
            }
            Spec::HttpRoute(_) => dup("HTTPRoute"),
            Spec::RateLimit(r) if entry.rate_limit.is_none() => {
                match crate::admission::CompiledLimits::compile(r) {
                    Ok(c) => entry.rate_limit = Some(c),
                    Err(e) => {
                        ignored += 1;
                        warn_once(
                            format!("limit {target} {} {}", policy.name, p.revision),
                            || tracing::warn!(service = %target, name = %policy.name, error = %e, "ignoring a RateLimit this gateway cannot compile"),
                        );
                    }
                }
            }
            Spec::RateLimit(_) => dup("RateLimit"),
            Spec::RequestAuthentication(a) if entry.authn.is_none() => entry.authn = Some(a),
            Spec::RequestAuthentication(_) => dup("RequestAuthentication"),
        }
    }
    metrics::gauge!("causeway_policies_ignored").set(ignored as f64);
    out
}

/// The routing table: services and how to reach the sites exporting them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Routes {
    /// The catalog revision it was built from.
    pub revision: u64,
    /// Every service available in the federation.
    pub services: BTreeMap<ServiceKey, ServiceRoute>,
    /// Every other available member site.
    pub sites: BTreeMap<SiteName, SiteRoute>,
}

impl Routes {
    /// The table for a catalog view, with listeners where `plan` puts
    /// them.
    pub fn build(view: &CatalogView, plan: ListenPlan) -> Self {
        let mut services = BTreeMap::new();
        let mut policies = policies_by_service(view);
        for (key, svc) in view.services() {
            if svc.headless {
                // No ClusterSetIP: callers reach the endpoints directly.
                continue;
            }
            let Some(listen) = listeners(plan, &svc) else {
                match plan {
                    ListenPlan::Vips { .. } => {
                        tracing::warn!(service = %key, index = svc.vip_index, "vip_range is too small for this service; enlarge it")
                    }
                    ListenPlan::Ports { .. } => {
                        tracing::warn!(service = %key, index = svc.vip_index, "this service's import ports fall outside 1-65535; lower kubernetes.import_port_base")
                    }
                }
                continue;
            };
            let policy = policies.remove(&key).unwrap_or_default();
            let http_ports = svc
                .ports
                .iter()
                .filter_map(|p| {
                    let proto = p.protocol.parse::<Protocol>().ok()?;
                    Some((u16::try_from(p.port).ok()?, proto))
                })
                .filter(|(_, proto)| proto.is_http())
                .collect();
            services.insert(
                key,
                ServiceRoute {
                    listen,
                    exporters: svc.exporters,
                    http_ports,
                    totals: svc.totals,
                    subsets: svc
                        .subsets
                        .into_iter()
                        .map(|(site, groups)| {
                            (
                                site,
                                groups.into_iter().map(|g| (g.name, g.healthy)).collect(),
                            )
                        })
                        .collect(),
                    policy,
                },
            );
        }
        let mut sites = BTreeMap::new();
        for (name, s) in &view.sites {
            let (Ok(name), Ok(td)) = (
                name.parse::<SiteName>(),
                s.trust_domain.parse::<TrustDomain>(),
            ) else {
                continue;
            };
            let tunnel_addrs = s
                .tunnel_addrs
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect();
            sites.insert(
                name,
                SiteRoute {
                    trust_domain: td,
                    labels: s
                        .labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    tunnel_addrs,
                },
            );
        }
        Self {
            revision: view.revision.0,
            services,
            sites,
        }
    }

    /// Every outbound listener address and the service behind it.
    pub fn listeners(&self) -> BTreeMap<SocketAddr, (ServiceKey, u16)> {
        let mut out = BTreeMap::new();
        for (key, svc) in &self.services {
            for (port, addr) in &svc.listen {
                out.insert(*addr, (key.clone(), *port));
            }
        }
        out
    }
}

/// Where each port of `svc` is served under `plan`; `None` when the
/// service does not fit.
fn listeners(plan: ListenPlan, svc: &ServiceView) -> Option<BTreeMap<u16, SocketAddr>> {
    let ports = svc.ports.iter().filter_map(|p| u16::try_from(p.port).ok());
    match plan {
        ListenPlan::Vips { base, prefix } => {
            let vip = vip_for(base, prefix, svc.vip_index)?;
            Some(ports.map(|p| (p, SocketAddr::new(vip, p))).collect())
        }
        ListenPlan::Ports { ip, base } => ports
            .enumerate()
            .map(|(i, p)| Some((p, SocketAddr::new(ip, import_port(base, svc.vip_index, i)?))))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use causeway_api::pb;

    use super::*;

    fn timeout(name: &str, ms: u32) -> pb::Policy {
        pb::Policy {
            kind: "TimeoutPolicy".into(),
            namespace: "shop".into(),
            name: name.into(),
            document_json: format!(
                r#"{{"apiVersion":"causeway.dev/v1alpha1","kind":"TimeoutPolicy","metadata":{{"name":"{name}","namespace":"shop"}},"spec":{{"service":"web","requestMs":{ms}}}}}"#
            ),
            revision: 1,
            owner_site: String::new(),
        }
    }

    #[test]
    fn the_first_policy_by_name_applies_and_each_ignored_one_is_logged_once() {
        let mut view = CatalogView::default();
        for (name, ms) in [("b", 200), ("a", 100), ("c", 300)] {
            let p = timeout(name, ms);
            view.policies.insert(
                causeway_api::catalog::policy_key(&p.kind, &p.namespace, name),
                p,
            );
        }
        let by = policies_by_service(&view);
        let web = &by[&"shop/web".parse::<ServiceKey>().unwrap()];
        assert_eq!(web.timeout.as_ref().unwrap().request_ms, 100);
        // The same catalog again (as at every change): the duplicates were
        // logged the first time and are not again.
        let mut logged = 0;
        warn_once(format!("dup {} TimeoutPolicy b", "shop/web"), || {
            logged += 1
        });
        warn_once(format!("dup {} TimeoutPolicy c", "shop/web"), || {
            logged += 1
        });
        assert_eq!(logged, 0, "already logged once by the first compile");
        warn_once("something new".into(), || logged += 1);
        warn_once("something new".into(), || logged += 1);
        assert_eq!(logged, 1);
    }
}
