//! `CircuitBreaker`: limits on connections, pending and active requests.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::read::*;
use super::Spec;

/// A `CircuitBreaker`: per-site limits on what is in flight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreakerSpec {
    /// The service, in the policy's namespace.
    pub service: String,
    /// Most upstream connections per site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Most requests waiting for a connection per site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending: Option<u32>,
    /// Most requests in flight per site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
}

/// The fields a `CircuitBreaker` spec may have.
pub(super) const KEYS: &[&str] = &["service", "maxConnections", "maxPending", "maxRequests"];

/// The spec of a `CircuitBreaker` (its `service` already read); problems go to
/// `errs`.
pub(super) fn parse(m: &Map<String, Value>, service: String, errs: &mut Errors) -> Spec {
    let p = "spec";
    let get = |k: &str, errs: &mut Errors| {
        m.contains_key(k)
            .then(|| bounded(m, k, p, 1..=1_000_000, None, errs))
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
    Spec::CircuitBreaker(CircuitBreakerSpec {
        service,
        max_connections: c,
        max_pending: pe,
        max_requests: r,
    })
}
