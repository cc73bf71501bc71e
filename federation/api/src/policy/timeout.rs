//! `TimeoutPolicy`: a deadline per request and per try.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::read::*;
use super::Spec;

/// A `TimeoutPolicy`: how long a request, and each try, may take.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimeoutSpec {
    /// The service, in the policy's namespace.
    pub service: String,
    /// The whole request, retries included, ms.
    pub request_ms: u32,
    /// One try, ms (at most `request_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_ms: Option<u32>,
}

/// The fields a `TimeoutPolicy` spec may have.
pub(super) const KEYS: &[&str] = &["service", "requestMs", "perTryMs"];

/// The spec of a `TimeoutPolicy` (its `service` already read); problems go to
/// `errs`.
pub(super) fn parse(m: &Map<String, Value>, service: String, errs: &mut Errors) -> Spec {
    let p = "spec";
    let request = bounded(m, "requestMs", p, 1..=3_600_000, None, errs);
    let per_try = m
        .contains_key("perTryMs")
        .then(|| bounded(m, "perTryMs", p, 1..=3_600_000, None, errs))
        .flatten();
    if let (Some(r), Some(t)) = (request, per_try) {
        if t > r {
            errs.push(
                "spec.perTryMs",
                format!("{t} exceeds requestMs {r}; a try cannot outlast the request"),
            );
        }
    }
    Spec::TimeoutPolicy(TimeoutSpec {
        service,
        request_ms: request.unwrap_or(1) as u32,
        per_try_ms: per_try.map(|t| t as u32),
    })
}
