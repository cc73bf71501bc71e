//! `TrafficSplit`: weighted shares of a service's traffic per site.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::read::*;
use super::Spec;

/// A `TrafficSplit`: shares of a service's traffic per site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficSplitSpec {
    /// The service, in the policy's namespace.
    pub service: String,
    /// Weight per site name (0-10000); shares are weight / sum.
    pub weights: BTreeMap<String, u32>,
}

/// The fields a `TrafficSplit` spec may have.
pub(super) const KEYS: &[&str] = &["service", "weights"];

/// The spec of a `TrafficSplit` (its `service` already read); problems go to
/// `errs`.
pub(super) fn parse(m: &Map<String, Value>, service: String, errs: &mut Errors) -> Spec {
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
                    None => errs.push(&wp, format!("{weight} is not an integer from 0 to 10000")),
                }
            }
            if !w.is_empty() && weights.values().all(|w| *w == 0) && weights.len() == w.len() {
                errs.push("spec.weights", "at least one weight must be above 0");
            }
        }
    }
    Spec::TrafficSplit(TrafficSplitSpec { service, weights })
}
