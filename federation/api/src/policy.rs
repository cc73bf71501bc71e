//! Traffic policies as data: Kubernetes-style documents (`apiVersion`,
//! `kind`, `metadata`, `spec`), validated field by field so that one pass
//! reports every mistake with its path and the fix, then stored in Raft as
//! canonical JSON and streamed to gateways with the catalog.
//!
//! The same [`parse_document`] runs in `causeway ctl` (to report errors
//! before anything is sent) and in the controller (which trusts no client).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::model::{check_dns_label, ServiceKey, SiteName, SpiffeId};

pub const API_VERSION: &str = "causeway.dev/v1alpha1";
/// Largest canonical spec stored (bytes of JSON).
pub const MAX_SPEC_BYTES: usize = 16 * 1024;
/// Most policies the federation holds.
pub const MAX_POLICIES: usize = 10_000;
/// Most documents one apply may carry.
pub const MAX_DOCUMENTS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    FailoverPolicy,
    TrafficSplit,
    RetryPolicy,
    TimeoutPolicy,
    CircuitBreaker,
    OutlierDetection,
    FaultInjection,
    AuthorizationPolicy,
}

pub const KINDS: &[Kind] = &[
    Kind::FailoverPolicy,
    Kind::TrafficSplit,
    Kind::RetryPolicy,
    Kind::TimeoutPolicy,
    Kind::CircuitBreaker,
    Kind::OutlierDetection,
    Kind::FaultInjection,
    Kind::AuthorizationPolicy,
];

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::FailoverPolicy => "FailoverPolicy",
            Kind::TrafficSplit => "TrafficSplit",
            Kind::RetryPolicy => "RetryPolicy",
            Kind::TimeoutPolicy => "TimeoutPolicy",
            Kind::CircuitBreaker => "CircuitBreaker",
            Kind::OutlierDetection => "OutlierDetection",
            Kind::FaultInjection => "FaultInjection",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        KINDS
            .iter()
            .copied()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown kind {s:?}; expected one of {}", kind_list()))
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn kind_list() -> String {
    KINDS
        .iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailoverMode {
    /// The listed sites in order.
    Ordered,
    /// Same zone, then same region, then any (by site labels).
    Locality,
    /// By measured round-trip time.
    Nearest,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailoverSpec {
    pub service: String,
    pub mode: FailoverMode,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locality_labels: Vec<String>,
    /// Below this share of healthy endpoints in a tier, the next tier gets
    /// traffic too.
    pub healthy_threshold: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficSplitSpec {
    pub service: String,
    pub weights: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    ConnectFailure,
    Reset,
    #[serde(rename = "5xx")]
    ServerError,
    GatewayError,
}

const RETRY_ON: &[(&str, RetryOn)] = &[
    ("connect-failure", RetryOn::ConnectFailure),
    ("reset", RetryOn::Reset),
    ("5xx", RetryOn::ServerError),
    ("gateway-error", RetryOn::GatewayError),
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    /// Retries may add at most this share of live requests...
    pub ratio: f64,
    /// ...but this many per second are always allowed.
    pub min_per_second: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    pub service: String,
    /// Retries after the first try.
    pub attempts: u32,
    pub on: Vec<RetryOn>,
    pub budget: RetryBudget,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimeoutSpec {
    pub service: String,
    pub request_ms: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_ms: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreakerSpec {
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierSpec {
    pub service: String,
    pub consecutive_failures: u32,
    pub interval_ms: u32,
    pub ejection_ms: u32,
    pub max_ejected_percent: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    pub percent: f64,
    pub ms: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    pub percent: f64,
    pub status: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultSpec {
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzSpec {
    pub service: String,
    pub allow: Vec<AuthzRule>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "spec")]
pub enum Spec {
    FailoverPolicy(FailoverSpec),
    TrafficSplit(TrafficSplitSpec),
    RetryPolicy(RetrySpec),
    TimeoutPolicy(TimeoutSpec),
    CircuitBreaker(CircuitBreakerSpec),
    OutlierDetection(OutlierSpec),
    FaultInjection(FaultSpec),
    AuthorizationPolicy(AuthzSpec),
}

impl Spec {
    pub fn kind(&self) -> Kind {
        match self {
            Spec::FailoverPolicy(_) => Kind::FailoverPolicy,
            Spec::TrafficSplit(_) => Kind::TrafficSplit,
            Spec::RetryPolicy(_) => Kind::RetryPolicy,
            Spec::TimeoutPolicy(_) => Kind::TimeoutPolicy,
            Spec::CircuitBreaker(_) => Kind::CircuitBreaker,
            Spec::OutlierDetection(_) => Kind::OutlierDetection,
            Spec::FaultInjection(_) => Kind::FaultInjection,
            Spec::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
        }
    }

    /// The `service` field: a name in the policy's namespace.
    pub fn service(&self) -> &str {
        match self {
            Spec::FailoverPolicy(s) => &s.service,
            Spec::TrafficSplit(s) => &s.service,
            Spec::RetryPolicy(s) => &s.service,
            Spec::TimeoutPolicy(s) => &s.service,
            Spec::CircuitBreaker(s) => &s.service,
            Spec::OutlierDetection(s) => &s.service,
            Spec::FaultInjection(s) => &s.service,
            Spec::AuthorizationPolicy(s) => &s.service,
        }
    }
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub spec: Spec,
}

impl Policy {
    pub fn kind(&self) -> Kind {
        self.spec.kind()
    }

    /// The service it applies to.
    pub fn target(&self) -> ServiceKey {
        format!("{}/{}", self.namespace, self.spec.service())
            .parse()
            .expect("validated")
    }

    /// The document in canonical form (stable field order; what is stored
    /// and streamed).
    pub fn to_document(&self) -> Value {
        let mut doc = serde_json::to_value(&self.spec).expect("specs serialize");
        let obj = doc.as_object_mut().expect("tagged enum is an object");
        obj.insert("apiVersion".into(), Value::String(API_VERSION.into()));
        obj.insert(
            "metadata".into(),
            serde_json::json!({"name": self.name, "namespace": self.namespace}),
        );
        doc
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.to_document()).expect("json")
    }
}

/// Collects every problem in a document, each as `path: what is wrong`.
struct Errors(Vec<String>);

impl Errors {
    fn push(&mut self, path: &str, msg: impl std::fmt::Display) {
        self.0.push(format!("{path}: {msg}"));
    }
}

fn object<'a>(
    v: Option<&'a Value>,
    path: &str,
    allowed: &[&str],
    errs: &mut Errors,
) -> Option<&'a Map<String, Value>> {
    let v = match v {
        None | Some(Value::Null) => {
            errs.push(path, "required");
            return None;
        }
        Some(v) => v,
    };
    let Some(m) = v.as_object() else {
        errs.push(path, "must be a mapping");
        return None;
    };
    for k in m.keys() {
        if !allowed.contains(&k.as_str()) {
            errs.push(
                &format!("{path}.{k}"),
                format!("unknown field; expected one of {}", allowed.join(", ")),
            );
        }
    }
    Some(m)
}

fn string(m: &Map<String, Value>, key: &str, path: &str, errs: &mut Errors) -> Option<String> {
    match m.get(key) {
        None | Some(Value::Null) => {
            errs.push(&format!("{path}.{key}"), "required");
            None
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            errs.push(&format!("{path}.{key}"), "must be a string");
            None
        }
    }
}

fn label(
    m: &Map<String, Value>,
    key: &'static str,
    path: &str,
    errs: &mut Errors,
) -> Option<String> {
    let s = string(m, key, path, errs)?;
    match check_dns_label(key, &s) {
        Ok(()) => Some(s),
        Err(e) => {
            errs.push(&format!("{path}.{key}"), e);
            None
        }
    }
}

fn integer(
    m: &Map<String, Value>,
    key: &str,
    path: &str,
    range: std::ops::RangeInclusive<u64>,
    default: Option<u64>,
    errs: &mut Errors,
) -> Option<u64> {
    let p = format!("{path}.{key}");
    match m.get(key) {
        None | Some(Value::Null) => {
            if default.is_none() {
                errs.push(
                    &p,
                    format!(
                        "required (an integer from {} to {})",
                        range.start(),
                        range.end()
                    ),
                );
            }
            default
        }
        Some(v) => match v.as_u64().filter(|n| range.contains(n)) {
            Some(n) => Some(n),
            None => {
                errs.push(
                    &p,
                    format!(
                        "{v} is not an integer from {} to {}",
                        range.start(),
                        range.end()
                    ),
                );
                None
            }
        },
    }
}

fn number(
    m: &Map<String, Value>,
    key: &str,
    path: &str,
    range: std::ops::RangeInclusive<f64>,
    default: Option<f64>,
    errs: &mut Errors,
) -> Option<f64> {
    let p = format!("{path}.{key}");
    match m.get(key) {
        None | Some(Value::Null) => {
            if default.is_none() {
                errs.push(
                    &p,
                    format!(
                        "required (a number from {} to {})",
                        range.start(),
                        range.end()
                    ),
                );
            }
            default
        }
        Some(v) => match v.as_f64().filter(|n| range.contains(n)) {
            Some(n) => Some(n),
            None => {
                errs.push(
                    &p,
                    format!(
                        "{v} is not a number from {} to {}",
                        range.start(),
                        range.end()
                    ),
                );
                None
            }
        },
    }
}

/// A list of strings, each checked by `check`; absent is empty.
fn strings(
    m: &Map<String, Value>,
    key: &str,
    path: &str,
    max: usize,
    check: impl Fn(&str) -> Result<(), String>,
    errs: &mut Errors,
) -> Vec<String> {
    let p = format!("{path}.{key}");
    let Some(v) = m.get(key).filter(|v| !v.is_null()) else {
        return Vec::new();
    };
    let Some(items) = v.as_array() else {
        errs.push(&p, "must be a list");
        return Vec::new();
    };
    if items.len() > max {
        errs.push(&p, format!("at most {max} entries"));
    }
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let ip = format!("{p}[{i}]");
        match item.as_str() {
            None => errs.push(&ip, "must be a string"),
            Some(s) => match check(s) {
                Err(e) => errs.push(&ip, e),
                Ok(()) if out.iter().any(|o| o == s) => {
                    errs.push(&ip, format!("{s:?} is listed twice"))
                }
                Ok(()) => out.push(s.to_string()),
            },
        }
    }
    out
}

fn site_name(s: &str) -> Result<(), String> {
    s.parse::<SiteName>().map(|_| ()).map_err(|e| e.to_string())
}

/// ` (<metadata.name>)` of a document, or nothing: names a document in
/// error messages even when it is invalid.
pub fn document_label(doc: &Value) -> String {
    doc.get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .map(|n| format!(" ({n})"))
        .unwrap_or_default()
}

/// Validates one document (already decoded from YAML or JSON), reporting
/// every problem at once.
pub fn parse_document(doc: &Value) -> Result<Policy, Vec<String>> {
    let mut errs = Errors(Vec::new());
    let top = object(
        Some(doc),
        "document",
        &["apiVersion", "kind", "metadata", "spec"],
        &mut errs,
    );
    let Some(top) = top else {
        return Err(errs.0);
    };
    match top.get("apiVersion").and_then(Value::as_str) {
        Some(API_VERSION) => {}
        Some(other) => errs.push(
            "apiVersion",
            format!("{other:?} is not supported; use {API_VERSION}"),
        ),
        None => errs.push("apiVersion", format!("required; use {API_VERSION}")),
    }
    let kind = match top.get("kind").and_then(Value::as_str) {
        None => {
            errs.push("kind", format!("required; one of {}", kind_list()));
            None
        }
        Some(k) => match k.parse::<Kind>() {
            Ok(kind) if kind.as_str() == k => Some(kind),
            Ok(kind) => {
                errs.push("kind", format!("{k:?}: write it {:?}", kind.as_str()));
                None
            }
            Err(e) => {
                errs.push("kind", e);
                None
            }
        },
    };
    let (mut name, mut namespace) = (None, None);
    if let Some(meta) = object(
        top.get("metadata"),
        "metadata",
        &["name", "namespace", "labels", "annotations"],
        &mut errs,
    ) {
        name = label(meta, "name", "metadata", &mut errs);
        namespace = label(meta, "namespace", "metadata", &mut errs);
    }
    let spec = kind.and_then(|k| parse_spec(k, top.get("spec"), &mut errs));
    if !errs.0.is_empty() {
        return Err(errs.0);
    }
    let policy = Policy {
        namespace: namespace.expect("no errors"),
        name: name.expect("no errors"),
        spec: spec.expect("no errors"),
    };
    if policy.to_json().len() > MAX_SPEC_BYTES {
        return Err(vec![format!("spec: larger than {MAX_SPEC_BYTES} bytes")]);
    }
    Ok(policy)
}

fn parse_spec(kind: Kind, v: Option<&Value>, errs: &mut Errors) -> Option<Spec> {
    let p = "spec";
    let allowed: &[&str] = match kind {
        Kind::FailoverPolicy => &[
            "service",
            "mode",
            "sites",
            "localityLabels",
            "healthyThreshold",
        ],
        Kind::TrafficSplit => &["service", "weights"],
        Kind::RetryPolicy => &["service", "attempts", "on", "budget"],
        Kind::TimeoutPolicy => &["service", "requestMs", "perTryMs"],
        Kind::CircuitBreaker => &["service", "maxConnections", "maxPending", "maxRequests"],
        Kind::OutlierDetection => &[
            "service",
            "consecutiveFailures",
            "intervalMs",
            "ejectionMs",
            "maxEjectedPercent",
        ],
        Kind::FaultInjection => &["service", "delay", "abort"],
        Kind::AuthorizationPolicy => &["service", "allow"],
    };
    let m = object(v, p, allowed, errs)?;
    let before = errs.0.len();
    let service = label(m, "service", p, errs);
    let spec = match kind {
        Kind::FailoverPolicy => {
            let mode = match m.get("mode").and_then(Value::as_str) {
                Some("ordered") => Some(FailoverMode::Ordered),
                Some("locality") => Some(FailoverMode::Locality),
                Some("nearest") => Some(FailoverMode::Nearest),
                Some(other) => {
                    errs.push(
                        "spec.mode",
                        format!("{other:?}: use ordered, locality or nearest"),
                    );
                    None
                }
                None => {
                    errs.push("spec.mode", "required: ordered, locality or nearest");
                    None
                }
            };
            let sites = strings(m, "sites", p, 64, site_name, errs);
            let labels = strings(
                m,
                "localityLabels",
                p,
                8,
                |s| {
                    if s.is_empty() || s.len() > 253 {
                        Err("must be a label key of 1 to 253 characters".into())
                    } else {
                        Ok(())
                    }
                },
                errs,
            );
            match mode {
                Some(FailoverMode::Ordered) if sites.is_empty() && !m.contains_key("sites") => errs
                    .push(
                        "spec.sites",
                        "required with mode ordered: the sites in the order traffic should take",
                    ),
                Some(FailoverMode::Locality | FailoverMode::Nearest) if m.contains_key("sites") => {
                    errs.push(
                        "spec.sites",
                        "only with mode ordered; remove it or set mode: ordered",
                    )
                }
                Some(FailoverMode::Ordered | FailoverMode::Nearest)
                    if m.contains_key("localityLabels") =>
                {
                    errs.push("spec.localityLabels", "only with mode locality")
                }
                _ => {}
            }
            let threshold = number(m, "healthyThreshold", p, 0.0..=1.0, Some(0.7), errs);
            Some(Spec::FailoverPolicy(FailoverSpec {
                service: service.clone().unwrap_or_default(),
                mode: mode.unwrap_or(FailoverMode::Ordered),
                sites,
                locality_labels: if mode == Some(FailoverMode::Locality) && labels.is_empty() {
                    vec![
                        "topology.kubernetes.io/zone".into(),
                        "topology.kubernetes.io/region".into(),
                    ]
                } else {
                    labels
                },
                healthy_threshold: threshold.unwrap_or(0.7),
            }))
        }
        Kind::TrafficSplit => {
            let mut weights = BTreeMap::new();
            match m.get("weights").and_then(Value::as_object) {
                None => errs.push(
                    "spec.weights",
                    "required: a mapping of site name to weight (e.g. east: 99, west: 1)",
                ),
                Some(w) => {
                    if w.is_empty() || w.len() > 64 {
                        errs.push("spec.weights", "list 1 to 64 sites");
                    }
                    for (site, weight) in w {
                        let wp = format!("spec.weights.{site}");
                        if let Err(e) = site_name(site) {
                            errs.push(&wp, e);
                        }
                        match weight.as_u64().filter(|n| *n <= 10_000) {
                            Some(n) => {
                                weights.insert(site.clone(), n as u32);
                            }
                            None => errs
                                .push(&wp, format!("{weight} is not an integer from 0 to 10000")),
                        }
                    }
                    if !w.is_empty()
                        && weights.values().all(|w| *w == 0)
                        && weights.len() == w.len()
                    {
                        errs.push("spec.weights", "at least one weight must be above 0");
                    }
                }
            }
            Some(Spec::TrafficSplit(TrafficSplitSpec {
                service: service.clone().unwrap_or_default(),
                weights,
            }))
        }
        Kind::RetryPolicy => {
            let attempts = integer(m, "attempts", p, 1..=10, Some(2), errs);
            let on: Vec<RetryOn> = if m.contains_key("on") {
                let names = strings(
                    m,
                    "on",
                    p,
                    4,
                    |s| {
                        if RETRY_ON.iter().any(|(n, _)| *n == s) {
                            Ok(())
                        } else {
                            Err(format!(
                                "{s:?}: use connect-failure, reset, 5xx or gateway-error"
                            ))
                        }
                    },
                    errs,
                );
                if names.is_empty()
                    && m.get("on")
                        .and_then(Value::as_array)
                        .is_some_and(|a| a.is_empty())
                {
                    errs.push("spec.on", "list at least one condition");
                }
                names
                    .iter()
                    .filter_map(|n| RETRY_ON.iter().find(|(k, _)| k == n).map(|(_, v)| *v))
                    .collect()
            } else {
                vec![RetryOn::ConnectFailure, RetryOn::Reset]
            };
            let budget = match m.get("budget") {
                None | Some(Value::Null) => Some(RetryBudget {
                    ratio: 0.2,
                    min_per_second: 10,
                }),
                b => object(b, "spec.budget", &["ratio", "minPerSecond"], errs).map(|b| {
                    RetryBudget {
                        ratio: number(b, "ratio", "spec.budget", 0.0..=1.0, Some(0.2), errs)
                            .unwrap_or(0.2),
                        min_per_second: integer(
                            b,
                            "minPerSecond",
                            "spec.budget",
                            0..=100_000,
                            Some(10),
                            errs,
                        )
                        .unwrap_or(10) as u32,
                    }
                }),
            };
            Some(Spec::RetryPolicy(RetrySpec {
                service: service.clone().unwrap_or_default(),
                attempts: attempts.unwrap_or(2) as u32,
                on,
                budget: budget.unwrap_or(RetryBudget {
                    ratio: 0.2,
                    min_per_second: 10,
                }),
            }))
        }
        Kind::TimeoutPolicy => {
            let request = integer(m, "requestMs", p, 1..=3_600_000, None, errs);
            let per_try = m
                .contains_key("perTryMs")
                .then(|| integer(m, "perTryMs", p, 1..=3_600_000, None, errs))
                .flatten();
            if let (Some(r), Some(t)) = (request, per_try) {
                if t > r {
                    errs.push(
                        "spec.perTryMs",
                        format!("{t} exceeds requestMs {r}; a try cannot outlast the request"),
                    );
                }
            }
            Some(Spec::TimeoutPolicy(TimeoutSpec {
                service: service.clone().unwrap_or_default(),
                request_ms: request.unwrap_or(1) as u32,
                per_try_ms: per_try.map(|t| t as u32),
            }))
        }
        Kind::CircuitBreaker => {
            let get = |k: &str, errs: &mut Errors| {
                m.contains_key(k)
                    .then(|| integer(m, k, p, 1..=1_000_000, None, errs))
                    .flatten()
                    .map(|n| n as u32)
            };
            let (c, pe, r) = (
                get("maxConnections", errs),
                get("maxPending", errs),
                get("maxRequests", errs),
            );
            if !["maxConnections", "maxPending", "maxRequests"]
                .iter()
                .any(|k| m.contains_key(*k))
            {
                errs.push(
                    "spec",
                    "set at least one of maxConnections, maxPending, maxRequests",
                );
            }
            Some(Spec::CircuitBreaker(CircuitBreakerSpec {
                service: service.clone().unwrap_or_default(),
                max_connections: c,
                max_pending: pe,
                max_requests: r,
            }))
        }
        Kind::OutlierDetection => Some(Spec::OutlierDetection(OutlierSpec {
            service: service.clone().unwrap_or_default(),
            consecutive_failures: integer(m, "consecutiveFailures", p, 1..=1000, Some(5), errs)
                .unwrap_or(5) as u32,
            interval_ms: integer(m, "intervalMs", p, 100..=600_000, Some(1000), errs)
                .unwrap_or(1000) as u32,
            ejection_ms: integer(m, "ejectionMs", p, 1000..=3_600_000, Some(30_000), errs)
                .unwrap_or(30_000) as u32,
            max_ejected_percent: integer(m, "maxEjectedPercent", p, 0..=100, Some(50), errs)
                .unwrap_or(50) as u32,
        })),
        Kind::FaultInjection => {
            let delay = m.get("delay").filter(|v| !v.is_null()).map(|d| {
                object(Some(d), "spec.delay", &["percent", "ms"], errs).map(|d| FaultDelay {
                    percent: number(d, "percent", "spec.delay", 0.0..=100.0, None, errs)
                        .unwrap_or(0.0),
                    ms: integer(d, "ms", "spec.delay", 1..=60_000, None, errs).unwrap_or(1) as u32,
                })
            });
            let abort = m.get("abort").filter(|v| !v.is_null()).map(|a| {
                object(Some(a), "spec.abort", &["percent", "status"], errs).map(|a| FaultAbort {
                    percent: number(a, "percent", "spec.abort", 0.0..=100.0, None, errs)
                        .unwrap_or(0.0),
                    status: integer(a, "status", "spec.abort", 400..=599, None, errs).unwrap_or(503)
                        as u16,
                })
            });
            if delay.is_none() && abort.is_none() {
                errs.push("spec", "set delay, abort or both");
            }
            Some(Spec::FaultInjection(FaultSpec {
                service: service.clone().unwrap_or_default(),
                delay: delay.flatten(),
                abort: abort.flatten(),
            }))
        }
        Kind::AuthorizationPolicy => {
            let mut allow = Vec::new();
            match m.get("allow").and_then(Value::as_array) {
                None => errs.push(
                    "spec.allow",
                    "required: a list of rules, each with sites and/or identities",
                ),
                Some(rules) => {
                    if rules.is_empty() || rules.len() > 64 {
                        errs.push("spec.allow", "list 1 to 64 rules");
                    }
                    for (i, r) in rules.iter().enumerate() {
                        let rp = format!("spec.allow[{i}]");
                        if let Some(r) = object(Some(r), &rp, &["sites", "identities"], errs) {
                            let sites = strings(r, "sites", &rp, 64, site_name, errs);
                            let identities = strings(
                                r,
                                "identities",
                                &rp,
                                64,
                                |s| s.parse::<SpiffeId>().map(|_| ()).map_err(|e| e.to_string()),
                                errs,
                            );
                            if !r.contains_key("sites") && !r.contains_key("identities") {
                                errs.push(&rp, "set sites, identities or both");
                            }
                            allow.push(AuthzRule { sites, identities });
                        }
                    }
                }
            }
            Some(Spec::AuthorizationPolicy(AuthzSpec {
                service: service.clone().unwrap_or_default(),
                allow,
            }))
        }
    };
    (errs.0.len() == before).then_some(spec).flatten()
}

/// Reads YAML (or JSON) policy documents and validates each: JSON texts
/// ready to send, or every problem found, each with its document and path.
pub fn read_documents(text: &str) -> Result<Vec<String>, Vec<String>> {
    use serde::Deserialize;
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_json::Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                // The parser cannot resynchronise after a syntax error.
                errors.push(format!("document {}: not valid YAML: {e}", i + 1));
                break;
            }
        };
        if value.is_null() {
            continue; // an empty document (e.g. a trailing `---`)
        }
        match parse_document(&value) {
            Ok(p) => docs.push(p.to_json()),
            Err(errs) => {
                let who = document_label(&value);
                errors.extend(
                    errs.into_iter()
                        .map(|e| format!("document {}{who}: {e}", i + 1)),
                );
            }
        }
    }
    if docs.is_empty() && errors.is_empty() {
        errors.push("no policy documents found".into());
    }
    if errors.is_empty() {
        Ok(docs)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(kind: &str, spec: Value) -> Value {
        json!({"apiVersion": API_VERSION, "kind": kind,
               "metadata": {"name": "p1", "namespace": "shop"}, "spec": spec})
    }

    #[test]
    fn every_kind_parses_and_round_trips_through_its_canonical_form() {
        let docs = [
            doc(
                "FailoverPolicy",
                json!({"service": "payments", "mode": "ordered", "sites": ["east", "west"]}),
            ),
            doc(
                "FailoverPolicy",
                json!({"service": "payments", "mode": "locality", "healthyThreshold": 0.5}),
            ),
            doc(
                "TrafficSplit",
                json!({"service": "payments", "weights": {"east": 99, "west": 1}}),
            ),
            doc(
                "RetryPolicy",
                json!({"service": "payments", "attempts": 3, "on": ["5xx", "reset"],
                                      "budget": {"ratio": 0.1, "minPerSecond": 5}}),
            ),
            doc(
                "TimeoutPolicy",
                json!({"service": "payments", "requestMs": 2000, "perTryMs": 500}),
            ),
            doc(
                "CircuitBreaker",
                json!({"service": "payments", "maxRequests": 100}),
            ),
            doc("OutlierDetection", json!({"service": "payments"})),
            doc(
                "FaultInjection",
                json!({"service": "payments", "abort": {"percent": 10, "status": 503}}),
            ),
            doc(
                "AuthorizationPolicy",
                json!({"service": "payments", "allow": [{"sites": ["east"]},
                {"identities": ["spiffe://west.causeway/gateway"]}]}),
            ),
        ];
        for d in docs {
            let p = parse_document(&d).unwrap_or_else(|e| panic!("{d}: {e:?}"));
            assert_eq!(p.target().to_string(), "shop/payments");
            let again = parse_document(&p.to_document()).unwrap();
            assert_eq!(again, p, "canonical form re-parses to the same policy");
        }
        let p = parse_document(&doc("OutlierDetection", json!({"service": "payments"}))).unwrap();
        let Spec::OutlierDetection(o) = p.spec else {
            panic!()
        };
        assert_eq!(
            (
                o.consecutive_failures,
                o.interval_ms,
                o.ejection_ms,
                o.max_ejected_percent
            ),
            (5, 1000, 30_000, 50)
        );
    }

    #[test]
    fn every_invalid_field_is_reported_at_once() {
        let d = json!({
            "apiVersion": "v9", "kind": "RetryPolicy",
            "metadata": {"name": "Bad_Name"},
            "spec": {"service": "payments", "attempts": 50, "on": ["5xx", "timeout"],
                     "budget": {"ratio": 2}, "color": "red"}
        });
        let errs = parse_document(&d).unwrap_err();
        let text = errs.join("\n");
        for want in [
            "apiVersion: \"v9\" is not supported; use causeway.dev/v1alpha1",
            "metadata.name:",
            "metadata.namespace: required",
            "spec.attempts: 50 is not an integer from 1 to 10",
            "spec.on[1]: \"timeout\": use connect-failure, reset, 5xx or gateway-error",
            "spec.budget.ratio: 2 is not a number from 0 to 1",
            "spec.color: unknown field",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert_eq!(errs.len(), 7, "{text}");

        let errs = parse_document(&doc(
            "TimeoutPolicy",
            json!({"service": "payments", "requestMs": 100, "perTryMs": 500}),
        ))
        .unwrap_err();
        assert!(
            errs[0].contains("spec.perTryMs: 500 exceeds requestMs 100"),
            "{errs:?}"
        );
        let errs = parse_document(&doc(
            "FailoverPolicy",
            json!({"service": "payments", "mode": "ordered"}),
        ))
        .unwrap_err();
        assert!(
            errs[0].starts_with("spec.sites: required with mode ordered"),
            "{errs:?}"
        );
        let errs = parse_document(&doc(
            "TrafficSplit",
            json!({"service": "payments", "weights": {"east": 0}}),
        ))
        .unwrap_err();
        assert!(
            errs[0].contains("at least one weight must be above 0"),
            "{errs:?}"
        );
        let errs = parse_document(&doc("Nonsense", json!({}))).unwrap_err();
        assert!(
            errs[0].starts_with("kind: unknown kind \"Nonsense\""),
            "{errs:?}"
        );
        let errs = parse_document(&doc(
            "AuthorizationPolicy",
            json!({"service": "payments", "allow": [{"identities": ["http://x"]}]}),
        ))
        .unwrap_err();
        assert!(
            errs[0].starts_with("spec.allow[0].identities[0]:"),
            "{errs:?}"
        );
    }

    #[test]
    fn a_policy_file_is_checked_whole_and_every_problem_named() {
        let good = "apiVersion: causeway.dev/v1alpha1\nkind: TrafficSplit\nmetadata: {name: canary, namespace: shop}\nspec:\n  service: payments\n  weights: {east: 99, west: 1}\n";
        let docs = read_documents(&format!("{good}---\n{good}")).unwrap();
        assert_eq!(docs.len(), 2);
        let bad = format!(
            "{good}---\napiVersion: causeway.dev/v1alpha1\nkind: RetryPolicy\nmetadata: {{name: r, namespace: shop}}\nspec: {{service: payments, attempts: 0}}\n---\nkind: CircuitBreaker\nmetadata: {{name: cb, namespace: shop}}\nspec: {{service: payments}}\n---\n: : :\n"
        );
        let errs = read_documents(&bad).unwrap_err();
        let text = errs.join("\n");
        assert!(
            text.contains("document 2 (r): spec.attempts: 0 is not an integer from 1 to 10"),
            "{text}"
        );
        assert!(
            text.contains("document 3 (cb): apiVersion: required"),
            "{text}"
        );
        assert!(
            text.contains("document 3 (cb): spec: set at least one of maxConnections"),
            "{text}"
        );
        assert!(text.contains("document 4: not valid YAML"), "{text}");
        assert!(read_documents("").is_err());
    }
}
