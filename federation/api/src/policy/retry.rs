//! `RetryPolicy`: which failures are retried, how often, within a budget.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::read::*;
use super::Spec;

/// A failure a `RetryPolicy` may retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// The upstream could not be reached.
    ConnectFailure,
    /// The connection broke before an answer.
    Reset,
    /// Any 5xx answer.
    #[serde(rename = "5xx")]
    ServerError,
    /// 502, 503, 504 or a timeout.
    GatewayError,
}

const RETRY_ON: &[(&str, RetryOn)] = &[
    ("connect-failure", RetryOn::ConnectFailure),
    ("reset", RetryOn::Reset),
    ("5xx", RetryOn::ServerError),
    ("gateway-error", RetryOn::GatewayError),
];

/// How many retries a service may add.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    /// Retries may add at most this share of live requests...
    pub ratio: f64,
    /// ...but this many per second are always allowed.
    pub min_per_second: u32,
}

/// A `RetryPolicy`: which failures are retried and how often.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    /// The service, in the policy's namespace.
    pub service: String,
    /// Retries after the first try.
    pub attempts: u32,
    /// The failures retried.
    pub on: Vec<RetryOn>,
    /// The retry budget.
    pub budget: RetryBudget,
}

/// The fields a `RetryPolicy` spec may have.
pub(super) const KEYS: &[&str] = &["service", "attempts", "on", "budget"];

/// The spec of a `RetryPolicy` (its `service` already read); problems go to
/// `errs`.
pub(super) fn parse(m: &Map<String, Value>, service: String, errs: &mut Errors) -> Spec {
    let p = "spec";
    let attempts = bounded(m, "attempts", p, 1..=10, Some(2), errs);
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
        b => object(b, "spec.budget", &["ratio", "minPerSecond"], errs).map(|b| RetryBudget {
            ratio: bounded(b, "ratio", "spec.budget", 0.0..=1.0, Some(0.2), errs).unwrap_or(0.2),
            min_per_second: bounded(
                b,
                "minPerSecond",
                "spec.budget",
                0..=100_000,
                Some(10),
                errs,
            )
            .unwrap_or(10) as u32,
        }),
    };
    Spec::RetryPolicy(RetrySpec {
        service,
        attempts: attempts.unwrap_or(2) as u32,
        on,
        budget: budget.unwrap_or(RetryBudget {
            ratio: 0.2,
            min_per_second: 10,
        }),
    })
}
