//! `OutlierDetection`: when a site is ejected after consecutive failures.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::read::*;
use super::Spec;

/// An `OutlierDetection`: when a failing site is ejected, and for how
/// long.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierSpec {
    /// The service, in the policy's namespace.
    pub service: String,
    /// Failures in a row that eject a site.
    pub consecutive_failures: u32,
    /// How often ejections are reconsidered, ms.
    pub interval_ms: u32,
    /// Base ejection time, ms (multiplied by the site's ejection count).
    pub ejection_ms: u32,
    /// Most sites ejected at once, percent (one may always be).
    pub max_ejected_percent: u32,
}

/// The fields a `OutlierDetection` spec may have.
pub(super) const KEYS: &[&str] = &[
    "service",
    "consecutiveFailures",
    "intervalMs",
    "ejectionMs",
    "maxEjectedPercent",
];

/// The spec of a `OutlierDetection` (its `service` already read); problems go to
/// `errs`.
pub(super) fn parse(m: &Map<String, Value>, service: String, errs: &mut Errors) -> Spec {
    let p = "spec";
    Spec::OutlierDetection(OutlierSpec {
        service,
        consecutive_failures: bounded(m, "consecutiveFailures", p, 1..=1000, Some(5), errs)
            .unwrap_or(5) as u32,
        interval_ms: bounded(m, "intervalMs", p, 100..=600_000, Some(1000), errs).unwrap_or(1000)
            as u32,
        ejection_ms: bounded(m, "ejectionMs", p, 1000..=3_600_000, Some(30_000), errs)
            .unwrap_or(30_000) as u32,
        max_ejected_percent: bounded(m, "maxEjectedPercent", p, 0..=100, Some(50), errs)
            .unwrap_or(50) as u32,
    })
}
