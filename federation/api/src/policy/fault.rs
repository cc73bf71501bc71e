//! `FaultInjection`: delays and aborts injected into a share of requests.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::read::*;
use super::Spec;

/// A delay injected into a share of requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    /// Share of requests delayed, percent.
    pub percent: f64,
    /// How long, ms.
    pub ms: u32,
}

/// An error answer injected into a share of requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    /// Share of requests aborted, percent.
    pub percent: f64,
    /// The HTTP status they get (400-599).
    pub status: u16,
}

/// A `FaultInjection`: delays and aborts for testing resilience.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultSpec {
    /// The service, in the policy's namespace.
    pub service: String,
    /// The delay, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// The abort, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// The fields a `FaultInjection` spec may have.
pub(super) const KEYS: &[&str] = &["service", "delay", "abort"];

/// The spec of a `FaultInjection` (its `service` already read); problems go to
/// `errs`.
pub(super) fn parse(m: &Map<String, Value>, service: String, errs: &mut Errors) -> Spec {
    let delay = m.get("delay").filter(|v| !v.is_null()).map(|d| {
        object(Some(d), "spec.delay", &["percent", "ms"], errs).map(|d| FaultDelay {
            percent: bounded(d, "percent", "spec.delay", 0.0..=100.0, None, errs).unwrap_or(0.0),
            ms: bounded(d, "ms", "spec.delay", 1..=60_000, None, errs).unwrap_or(1) as u32,
        })
    });
    let abort = m.get("abort").filter(|v| !v.is_null()).map(|a| {
        object(Some(a), "spec.abort", &["percent", "status"], errs).map(|a| FaultAbort {
            percent: bounded(a, "percent", "spec.abort", 0.0..=100.0, None, errs).unwrap_or(0.0),
            status: bounded(a, "status", "spec.abort", 400..=599, None, errs).unwrap_or(503) as u16,
        })
    });
    if delay.is_none() && abort.is_none() {
        errs.push("spec", "set delay, abort or both");
    }
    Spec::FaultInjection(FaultSpec {
        service,
        delay: delay.flatten(),
        abort: abort.flatten(),
    })
}
