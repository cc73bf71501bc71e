//! What an exporting gateway checks before a caller reaches a local
//! endpoint, beyond who the caller is: the service's rate limits, per new
//! connection (every tunnel stream) and per HTTP request. The buckets are
//! the core's token buckets; this shell keeps them per service, limit and
//! (for `per: site`) calling site, and reads the clock.

use std::collections::HashMap;
use std::sync::Mutex;

use causeway_api::model::ServiceKey;
use causeway_api::policy::{Per, RateLimitSpec, Scope};
use causeway_api::sync::LockExt;
use causeway_gateway_core::ratelimit::{global_share, TokenBucket};
use causeway_gateway_core::route::{Match, RequestView};

use crate::routes::Routes;

/// A service's `RateLimit`, compiled (compared by its spec).
#[derive(Debug, Clone)]
pub struct CompiledLimits {
    /// What it was compiled from.
    pub spec: RateLimitSpec,
    /// Each limit's request matches (empty: every request).
    matches: Vec<Vec<Match>>,
}

impl PartialEq for CompiledLimits {
    fn eq(&self, other: &Self) -> bool {
        self.spec == other.spec
    }
}

impl CompiledLimits {
    /// Compiles `spec`'s matches.
    pub fn compile(spec: RateLimitSpec) -> Result<Self, String> {
        let matches = spec
            .limits
            .iter()
            .enumerate()
            .map(|(i, l)| {
                l.matches
                    .iter()
                    .map(crate::httproute::compile_match)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("limits[{i}]: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { spec, matches })
    }

    /// Whether any limit counts HTTP requests.
    pub fn limits_requests(&self) -> bool {
        self.spec
            .limits
            .iter()
            .any(|l| l.requests_per_second.is_some())
    }
}

/// A refusal: which limit, and milliseconds until it would allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    /// The limit's name.
    pub limit: String,
    /// Wait this long before trying again.
    pub retry_ms: u64,
}

/// Bucket key: service, limit name, calling site (empty for `per:
/// service`), and the limit's own rate and burst (a changed limit starts a
/// fresh bucket).
type Key = (ServiceKey, String, String, u64, u32);

/// Most buckets kept; past it, idle ones are dropped.
const MAX_BUCKETS: usize = 100_000;

/// The buckets of every service this gateway exports.
#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<Key, TokenBucket>>,
}

/// What is being admitted.
#[derive(Clone, Copy)]
pub enum Admit<'a> {
    /// A new connection (tunnel stream).
    Connection,
    /// An HTTP request.
    Request(&'a RequestView<'a>),
}

impl RateLimiter {
    /// Checks every limit of `service` that applies to `what` from
    /// `caller` (a site); takes a token from each, or names the first
    /// that refuses. `routes` gives the service's limits and, for global
    /// ones, how many gateways share them.
    pub fn check(
        &self,
        routes: &Routes,
        service: &ServiceKey,
        caller: &str,
        what: Admit<'_>,
    ) -> Result<(), Limited> {
        let Some(svc) = routes.services.get(service) else {
            return Ok(());
        };
        let Some(limits) = &svc.policy.rate_limit else {
            return Ok(());
        };
        let now = causeway_api::clock::unix_ms();
        let mut buckets = self.buckets.locked();
        if buckets.len() > MAX_BUCKETS {
            buckets.clear();
        }
        for (i, (limit, matches)) in limits.spec.limits.iter().zip(&limits.matches).enumerate() {
            let applies = match what {
                Admit::Connection => limit.connections_per_second.is_some(),
                Admit::Request(req) => {
                    limit.requests_per_second.is_some()
                        && (matches.is_empty() || matches.iter().any(|m| m.matches(req)))
                }
            };
            if !applies {
                continue;
            }
            let name = if limit.name.is_empty() {
                format!("limits[{i}]")
            } else {
                limit.name.clone()
            };
            let (rate, burst) = match limit.scope {
                Scope::Local => (limit.rate(), limit.burst),
                Scope::Global => global_share(limit.rate(), limit.burst, gateways(routes, service)),
            };
            let who = match limit.per {
                Per::Service => String::new(),
                Per::Site => caller.to_string(),
            };
            let key = (service.clone(), name.clone(), who, rate.to_bits(), burst);
            let bucket = buckets
                .entry(key)
                .or_insert_with(|| TokenBucket::new(rate, burst, now));
            let kind = match what {
                Admit::Connection => "connection",
                Admit::Request(_) => "request",
            };
            match bucket.try_take(now) {
                Ok(()) => {
                    metrics::counter!("causeway_ratelimit_total", "service" => service.to_string(), "limit" => name, "kind" => kind, "result" => "allowed").increment(1);
                }
                Err(retry_ms) => {
                    metrics::counter!("causeway_ratelimit_total", "service" => service.to_string(), "limit" => name.clone(), "kind" => kind, "result" => "limited").increment(1);
                    return Err(Limited {
                        limit: name,
                        retry_ms,
                    });
                }
            }
        }
        Ok(())
    }
}

/// How many gateways share a global limit of `service`: the gateway
/// replicas of every available site exporting it (at least one each).
fn gateways(routes: &Routes, service: &ServiceKey) -> usize {
    let Some(svc) = routes.services.get(service) else {
        return 1;
    };
    svc.exporters
        .iter()
        .map(|(site, _)| {
            routes
                .sites
                .get(site)
                .map_or(1, |s| s.tunnel_addrs.len().max(1))
        })
        .sum::<usize>()
        .max(1)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::routes::{ServicePolicy, ServiceRoute, SiteRoute};

    fn routes(limits: serde_json::Value, replicas: &[(&str, usize)]) -> Routes {
        let doc = serde_json::json!({"apiVersion": causeway_api::policy::API_VERSION,
            "kind": "RateLimit", "metadata": {"name": "l", "namespace": "shop"},
            "spec": {"service": "web", "limits": limits}});
        let causeway_api::policy::Spec::RateLimit(spec) =
            causeway_api::policy::parse_document(&doc).unwrap().spec
        else {
            panic!()
        };
        let mut r = Routes::default();
        r.services.insert(
            "shop/web".parse().unwrap(),
            ServiceRoute {
                listen: BTreeMap::new(),
                exporters: replicas
                    .iter()
                    .map(|(s, _)| (s.parse().unwrap(), 1))
                    .collect(),
                http_ports: BTreeMap::new(),
                totals: BTreeMap::new(),
                subsets: BTreeMap::new(),
                policy: ServicePolicy {
                    rate_limit: Some(CompiledLimits::compile(spec).unwrap()),
                    ..ServicePolicy::default()
                },
            },
        );
        for (site, n) in replicas {
            r.sites.insert(
                site.parse().unwrap(),
                SiteRoute {
                    trust_domain: format!("{site}.causeway").parse().unwrap(),
                    labels: vec![],
                    tunnel_addrs: (0..*n)
                        .map(|i| format!("127.0.0.1:{}", 4000 + i).parse().unwrap())
                        .collect(),
                },
            );
        }
        r
    }

    fn request(path: &str) -> RequestView<'_> {
        RequestView {
            method: "GET",
            path,
            query: None,
            headers: &[],
            source_site: "central",
            source_labels: &[],
        }
    }

    /// Burst allowed now, then refused: the count a bucket admits at once.
    fn admitted(l: &RateLimiter, r: &Routes, caller: &str, what: Admit<'_>) -> u32 {
        let svc = "shop/web".parse().unwrap();
        let mut n = 0;
        while l.check(r, &svc, caller, what).is_ok() {
            n += 1;
            assert!(n < 1000, "never refused");
        }
        n
    }

    #[test]
    fn global_limits_are_shared_among_the_exporting_replicas() {
        // Three replicas in two sites share 30/s with a burst of 9.
        let r = routes(
            serde_json::json!([{"requestsPerSecond": 30, "burst": 9, "scope": "global"}]),
            &[("east", 2), ("west", 1)],
        );
        let l = RateLimiter::default();
        assert_eq!(
            admitted(&l, &r, "central", Admit::Request(&request("/"))),
            3
        );
        let r = routes(
            serde_json::json!([{"requestsPerSecond": 30, "burst": 9}]),
            &[("east", 2), ("west", 1)],
        );
        assert_eq!(
            admitted(
                &RateLimiter::default(),
                &r,
                "central",
                Admit::Request(&request("/"))
            ),
            9,
            "a local limit is the whole burst at every gateway"
        );
    }

    #[test]
    fn per_site_buckets_matches_and_kinds_are_kept_apart() {
        let r = routes(
            serde_json::json!([
                {"name": "pay", "requestsPerSecond": 1, "burst": 2, "per": "site",
                 "matches": [{"path": {"type": "PathPrefix", "value": "/pay"}}]},
                {"name": "conns", "connectionsPerSecond": 1, "burst": 1}
            ]),
            &[("east", 1)],
        );
        let l = RateLimiter::default();
        assert_eq!(
            admitted(&l, &r, "central", Admit::Request(&request("/pay/1"))),
            2
        );
        assert_eq!(
            admitted(&l, &r, "north", Admit::Request(&request("/pay/1"))),
            2
        );
        let svc = "shop/web".parse().unwrap();
        assert!(
            l.check(&r, &svc, "central", Admit::Request(&request("/browse")))
                .is_ok(),
            "a request the limit does not match is not counted"
        );
        assert_eq!(admitted(&l, &r, "central", Admit::Connection), 1);
        let refused = l.check(&r, &svc, "central", Admit::Connection).unwrap_err();
        assert_eq!(refused.limit, "conns");
        assert!(refused.retry_ms > 0 && refused.retry_ms <= 1000);
    }
}
