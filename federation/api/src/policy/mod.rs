//! Traffic policies as data: Kubernetes-style documents (`apiVersion`,
//! `kind`, `metadata`, `spec`), validated field by field so that one pass
//! reports every mistake with its path and the fix, then stored in Raft as
//! canonical JSON and streamed to gateways with the catalog.
//!
//! The same [`parse_document`] runs in `causeway ctl` (to report errors
//! before anything is sent) and in the controller (which trusts no client).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::model::ServiceKey;

mod authn;
mod authz;
mod breaker;
mod failover;
mod fault;
mod outlier;
mod ratelimit;
mod read;
mod retry;
mod route;
mod split;
mod timeout;

pub use authn::{JwtRule, RequestAuthnSpec};
pub use authz::{AuthzRule, AuthzSpec};
pub use breaker::CircuitBreakerSpec;
pub use failover::{
    FailoverMode, FailoverSpec, DEFAULT_HEALTHY_THRESHOLD, DEFAULT_LOCALITY_LABELS,
};
pub use fault::{FaultAbort, FaultDelay, FaultSpec};
pub use outlier::OutlierSpec;
pub use ratelimit::{Limit, Per, RateLimitSpec, Scope};
pub use retry::{RetryBudget, RetryOn, RetrySpec};
pub use route::{
    BackendRef, FixedResponse, HeaderModifier, HeaderValue, HttpRouteSpec, MirrorRef, PathMatch,
    PathModifier, RequestMirror, RequestRedirect, RouteFilter, RouteMatch, RouteRule, SourceMatch,
    UrlRewrite, ValueMatch, REGEX_SIZE_LIMIT,
};
pub use split::TrafficSplitSpec;
pub use timeout::TimeoutSpec;

use read::{label, object, Errors};

/// The `apiVersion` every policy document carries.
pub const API_VERSION: &str = "causeway.dev/v1alpha1";
/// Largest canonical spec stored (bytes of JSON).
pub const MAX_SPEC_BYTES: usize = 16 * 1024;
/// Most policies the federation holds.
pub const MAX_POLICIES: usize = 10_000;
/// Most documents one apply may carry.
pub const MAX_DOCUMENTS: usize = 256;

/// The kinds of traffic policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// Which sites take a service's traffic, in which order.
    FailoverPolicy,
    /// Weighted shares of traffic per site.
    TrafficSplit,
    /// Which failures are retried, within a budget.
    RetryPolicy,
    /// Deadlines per request and per try.
    TimeoutPolicy,
    /// Limits on what is in flight per site.
    CircuitBreaker,
    /// Ejection of sites that fail repeatedly.
    OutlierDetection,
    /// Injected delays and aborts.
    FaultInjection,
    /// Who may call a service.
    AuthorizationPolicy,
    /// Per-request routing: matches, subsets, rewrites, redirects.
    #[serde(rename = "HTTPRoute")]
    HttpRoute,
    /// Token-bucket limits on requests and connections.
    RateLimit,
    /// Which JSON Web Tokens are accepted.
    RequestAuthentication,
}

/// Every kind, in the order errors list them.
pub const KINDS: &[Kind] = &[
    Kind::FailoverPolicy,
    Kind::TrafficSplit,
    Kind::RetryPolicy,
    Kind::TimeoutPolicy,
    Kind::CircuitBreaker,
    Kind::OutlierDetection,
    Kind::FaultInjection,
    Kind::AuthorizationPolicy,
    Kind::HttpRoute,
    Kind::RateLimit,
    Kind::RequestAuthentication,
];

impl Kind {
    /// The kind as documents write it.
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
            Kind::HttpRoute => "HTTPRoute",
            Kind::RateLimit => "RateLimit",
            Kind::RequestAuthentication => "RequestAuthentication",
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

/// A validated spec, tagged with its kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "spec")]
pub enum Spec {
    /// See [`FailoverSpec`].
    FailoverPolicy(FailoverSpec),
    /// See [`TrafficSplitSpec`].
    TrafficSplit(TrafficSplitSpec),
    /// See [`RetrySpec`].
    RetryPolicy(RetrySpec),
    /// See [`TimeoutSpec`].
    TimeoutPolicy(TimeoutSpec),
    /// See [`CircuitBreakerSpec`].
    CircuitBreaker(CircuitBreakerSpec),
    /// See [`OutlierSpec`].
    OutlierDetection(OutlierSpec),
    /// See [`FaultSpec`].
    FaultInjection(FaultSpec),
    /// See [`AuthzSpec`].
    AuthorizationPolicy(AuthzSpec),
    /// See [`HttpRouteSpec`].
    #[serde(rename = "HTTPRoute")]
    HttpRoute(HttpRouteSpec),
    /// See [`RateLimitSpec`].
    RateLimit(RateLimitSpec),
    /// See [`RequestAuthnSpec`].
    RequestAuthentication(RequestAuthnSpec),
}

impl Spec {
    /// Its kind.
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
            Spec::HttpRoute(_) => Kind::HttpRoute,
            Spec::RateLimit(_) => Kind::RateLimit,
            Spec::RequestAuthentication(_) => Kind::RequestAuthentication,
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
            Spec::HttpRoute(s) => &s.service,
            Spec::RateLimit(s) => &s.service,
            Spec::RequestAuthentication(s) => &s.service,
        }
    }
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// `metadata.namespace`: also the namespace of the target service.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// The validated spec.
    pub spec: Spec,
}

impl Policy {
    /// Its kind.
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

    /// The canonical document as JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.to_document()).expect("json")
    }
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

/// The spec of a document of `kind`: its keys checked, then read by the
/// kind's own parser.
fn parse_spec(kind: Kind, v: Option<&Value>, errs: &mut Errors) -> Option<Spec> {
    type Parse = fn(&Map<String, Value>, String, &mut Errors) -> Spec;
    let (keys, parse): (&[&str], Parse) = match kind {
        Kind::FailoverPolicy => (failover::KEYS, failover::parse),
        Kind::TrafficSplit => (split::KEYS, split::parse),
        Kind::RetryPolicy => (retry::KEYS, retry::parse),
        Kind::TimeoutPolicy => (timeout::KEYS, timeout::parse),
        Kind::CircuitBreaker => (breaker::KEYS, breaker::parse),
        Kind::OutlierDetection => (outlier::KEYS, outlier::parse),
        Kind::FaultInjection => (fault::KEYS, fault::parse),
        Kind::AuthorizationPolicy => (authz::KEYS, authz::parse),
        Kind::HttpRoute => (route::KEYS, route::parse),
        Kind::RateLimit => (ratelimit::KEYS, ratelimit::parse),
        Kind::RequestAuthentication => (authn::KEYS, authn::parse),
    };
    let m = object(v, "spec", keys, errs)?;
    let before = errs.0.len();
    let service = label(m, "service", "spec", errs).unwrap_or_default();
    let spec = parse(m, service, errs);
    (errs.0.len() == before).then_some(spec)
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
