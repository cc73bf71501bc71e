//! `RateLimit`: token-bucket limits on a service's requests (HTTP) and new
//! connections (every stream), enforced by the gateways that export it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::read::*;
use super::route::{parse_match, RouteMatch};
use super::Spec;

/// A `RateLimit`: the service's limits, each checked on its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSpec {
    /// The service, in the policy's namespace.
    pub service: String,
    /// The limits; a request or connection must fit every one that applies.
    pub limits: Vec<Limit>,
}

/// Who shares one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    /// Every caller of the service shares it.
    Service,
    /// Each calling site has its own.
    Site,
}

/// How a limit is counted across the service's gateways.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Each exporting gateway allows the full rate.
    Local,
    /// The rate is shared: each exporting gateway allows its share (the
    /// rate divided among the gateway replicas of the available sites
    /// exporting the service, as the catalog lists them).
    Global,
}

/// One limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Limit {
    /// A name for metrics and answers (a DNS label); default `limits[i]`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// HTTP requests per second (for `http`/`http2` services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<f64>,
    /// New connections (tunnel streams) per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_per_second: Option<f64>,
    /// How many may come at once above the rate (the bucket's size);
    /// default the rate (at least 1).
    pub burst: u32,
    /// One bucket for the service, or one per calling site.
    pub per: Per,
    /// Local or global.
    pub scope: Scope,
    /// Only requests matching one of these count (a limit per route);
    /// none: every request. Requests limits only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RouteMatch>,
}

impl Limit {
    /// The rate, whichever kind it is.
    pub fn rate(&self) -> f64 {
        self.requests_per_second
            .or(self.connections_per_second)
            .unwrap_or(0.0)
    }
}

/// The fields a `RateLimit` spec may have.
pub(super) const KEYS: &[&str] = &["service", "limits"];

const MAX_LIMITS: usize = 16;

/// The spec of a `RateLimit` (its `service` already read); problems go to
/// `errs`.
pub(super) fn parse(m: &Map<String, Value>, service: String, errs: &mut Errors) -> Spec {
    let mut limits = Vec::new();
    match m.get("limits").and_then(Value::as_array) {
        None => errs.push(
            "spec.limits",
            "required: a list of limits, each with requestsPerSecond or connectionsPerSecond",
        ),
        Some(items) => {
            if items.is_empty() || items.len() > MAX_LIMITS {
                errs.push("spec.limits", format!("list 1 to {MAX_LIMITS} limits"));
            }
            for (i, v) in items.iter().take(MAX_LIMITS).enumerate() {
                let lp = format!("spec.limits[{i}]");
                let Some(l) = object(
                    Some(v),
                    &lp,
                    &[
                        "name",
                        "requestsPerSecond",
                        "connectionsPerSecond",
                        "burst",
                        "per",
                        "scope",
                        "matches",
                    ],
                    errs,
                ) else {
                    continue;
                };
                if let Some(limit) = parse_limit(l, &lp, errs) {
                    limits.push(limit);
                }
            }
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, l) in limits.iter().enumerate() {
        if !l.name.is_empty() && !names.insert(l.name.as_str()) {
            errs.push(
                &format!("spec.limits[{i}].name"),
                format!("{:?} names another limit too; names must be unique", l.name),
            );
        }
    }
    Spec::RateLimit(RateLimitSpec { service, limits })
}

fn parse_limit(l: &Map<String, Value>, lp: &str, errs: &mut Errors) -> Option<Limit> {
    let name = match l.get("name") {
        None | Some(Value::Null) => String::new(),
        Some(_) => label(l, "name", lp, errs).unwrap_or_default(),
    };
    let rate = |key: &str, errs: &mut Errors| match l.get(key) {
        None | Some(Value::Null) => None,
        Some(_) => bounded(l, key, lp, 0.001..=1_000_000.0f64, None, errs),
    };
    let requests_per_second = rate("requestsPerSecond", errs);
    let connections_per_second = rate("connectionsPerSecond", errs);
    let both = l.contains_key("requestsPerSecond") && l.contains_key("connectionsPerSecond");
    let neither = !l.contains_key("requestsPerSecond") && !l.contains_key("connectionsPerSecond");
    if both || neither {
        errs.push(
            lp,
            "set exactly one of requestsPerSecond (HTTP requests) or connectionsPerSecond (new connections); use two limits for both",
        );
    }
    let default_burst = requests_per_second
        .or(connections_per_second)
        .map(|r| r.ceil().clamp(1.0, 1_000_000.0) as u64);
    let burst = bounded(
        l,
        "burst",
        lp,
        1..=1_000_000u64,
        default_burst.or(Some(1)),
        errs,
    )? as u32;
    let per = match l.get("per").and_then(Value::as_str) {
        None if l.get("per").is_none_or(Value::is_null) => Per::Service,
        Some("service") => Per::Service,
        Some("site") => Per::Site,
        _ => {
            errs.push(
                &format!("{lp}.per"),
                "use service (one bucket) or site (one per calling site)",
            );
            Per::Service
        }
    };
    let scope = match l.get("scope").and_then(Value::as_str) {
        None if l.get("scope").is_none_or(Value::is_null) => Scope::Local,
        Some("local") => Scope::Local,
        Some("global") => Scope::Global,
        _ => {
            errs.push(
                &format!("{lp}.scope"),
                "use local (each exporting gateway allows the rate) or global (the rate is shared among them)",
            );
            Scope::Local
        }
    };
    let mut matches = Vec::new();
    match l.get("matches") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            if items.len() > 16 {
                errs.push(&format!("{lp}.matches"), "at most 16 matches");
            }
            if connections_per_second.is_some() && !items.is_empty() {
                errs.push(
                    &format!("{lp}.matches"),
                    "a connections limit sees no requests to match; use requestsPerSecond",
                );
            }
            for (j, v) in items.iter().take(16).enumerate() {
                let mp = format!("{lp}.matches[{j}]");
                if let Some(m) = parse_match(v, &mp, errs) {
                    if m.from.is_some() {
                        errs.push(
                            &format!("{mp}.from"),
                            "a limit chooses callers with per: site, not with from",
                        );
                    }
                    matches.push(m);
                }
            }
        }
        Some(_) => errs.push(&format!("{lp}.matches"), "must be a list"),
    }
    Some(Limit {
        name,
        requests_per_second,
        connections_per_second,
        burst,
        per,
        scope,
        matches,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::{parse_document, Spec, API_VERSION};
    use super::*;

    fn doc(spec: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": API_VERSION, "kind": "RateLimit",
               "metadata": {"name": "web", "namespace": "shop"}, "spec": spec})
    }

    #[test]
    fn limits_parse_with_their_defaults_and_round_trip() {
        let p = parse_document(&doc(json!({"service": "web", "limits": [
            {"requestsPerSecond": 100},
            {"name": "per-caller", "requestsPerSecond": 2.5, "burst": 10, "per": "site", "scope": "global",
             "matches": [{"path": {"type": "PathPrefix", "value": "/checkout"}, "method": "POST"}]},
            {"connectionsPerSecond": 20}
        ]})))
        .unwrap();
        assert_eq!(parse_document(&p.to_document()).unwrap(), p);
        let Spec::RateLimit(r) = &p.spec else {
            panic!()
        };
        assert_eq!(
            (r.limits[0].burst, r.limits[0].per, r.limits[0].scope),
            (100, Per::Service, Scope::Local)
        );
        assert_eq!((r.limits[1].burst, r.limits[1].per), (10, Per::Site));
        assert_eq!(r.limits[2].rate(), 20.0);
        assert_eq!(p.to_document()["kind"], "RateLimit");
    }

    #[test]
    fn every_mistake_in_a_limit_is_named() {
        let errs = parse_document(&doc(json!({"service": "web", "limits": [
            {"requestsPerSecond": 0, "per": "caller"},
            {"requestsPerSecond": 5, "connectionsPerSecond": 5, "scope": "planet"},
            {"burst": 0},
            {"connectionsPerSecond": 1, "matches": [{"method": "GET"}]},
            {"requestsPerSecond": 1, "matches": [{"from": {"sites": ["east"]}}]}
        ]})))
        .unwrap_err();
        let text = errs.join("\n");
        for want in [
            "spec.limits[0].requestsPerSecond: 0 is not a number from 0.001 to 1000000",
            "spec.limits[0].per: use service (one bucket) or site",
            "spec.limits[1]: set exactly one of requestsPerSecond",
            "spec.limits[1].scope: use local",
            "spec.limits[2]: set exactly one of requestsPerSecond",
            "spec.limits[2].burst: 0 is not an integer from 1 to 1000000",
            "spec.limits[3].matches: a connections limit sees no requests to match",
            "spec.limits[4].matches[0].from: a limit chooses callers with per: site",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }
}
