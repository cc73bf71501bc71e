//! `FailoverPolicy`: which sites take a service's traffic, in which order,
//! and when a tier spills over to the next.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::read::*;
use super::Spec;

/// How a `FailoverPolicy` orders sites into tiers.
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

/// A `FailoverPolicy`: the tiers a service's traffic takes, and when a
/// tier spills over to the next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailoverSpec {
    /// The service, in the policy's namespace.
    pub service: String,
    /// How tiers are formed.
    pub mode: FailoverMode,
    /// With `ordered`: the sites, one tier each, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
    /// With `locality`: the site label keys compared, closest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locality_labels: Vec<String>,
    /// Below this share of healthy endpoints in a tier, the next tier gets
    /// traffic too.
    pub healthy_threshold: f64,
}

/// Below this share of healthy endpoints a tier spills to the next, unless
/// a policy says otherwise (and with no policy at all).
pub const DEFAULT_HEALTHY_THRESHOLD: f64 = 0.7;

/// The site labels `mode: locality` compares when a policy names none:
/// zone first, then region (the Kubernetes topology labels).
pub const DEFAULT_LOCALITY_LABELS: [&str; 2] = [
    "topology.kubernetes.io/zone",
    "topology.kubernetes.io/region",
];

/// The fields a `FailoverPolicy` spec may have.
pub(super) const KEYS: &[&str] = &[
    "service",
    "mode",
    "sites",
    "localityLabels",
    "healthyThreshold",
];

/// The spec of a `FailoverPolicy` (its `service` already read); problems go to
/// `errs`.
pub(super) fn parse(m: &Map<String, Value>, service: String, errs: &mut Errors) -> Spec {
    let p = "spec";
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
        Some(FailoverMode::Ordered) if sites.is_empty() && !m.contains_key("sites") => errs.push(
            "spec.sites",
            "required with mode ordered: the sites in the order traffic should take",
        ),
        Some(FailoverMode::Locality | FailoverMode::Nearest) if m.contains_key("sites") => errs
            .push(
                "spec.sites",
                "only with mode ordered; remove it or set mode: ordered",
            ),
        Some(FailoverMode::Ordered | FailoverMode::Nearest) if m.contains_key("localityLabels") => {
            errs.push("spec.localityLabels", "only with mode locality")
        }
        _ => {}
    }
    let threshold = bounded(
        m,
        "healthyThreshold",
        p,
        0.0..=1.0,
        Some(DEFAULT_HEALTHY_THRESHOLD),
        errs,
    );
    Spec::FailoverPolicy(FailoverSpec {
        service,
        mode: mode.unwrap_or(FailoverMode::Ordered),
        sites,
        locality_labels: if mode == Some(FailoverMode::Locality) && labels.is_empty() {
            DEFAULT_LOCALITY_LABELS.map(String::from).to_vec()
        } else {
            labels
        },
        healthy_threshold: threshold.unwrap_or(DEFAULT_HEALTHY_THRESHOLD),
    })
}
