//! `AuthorizationPolicy`: which sites and identities may call a service.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::read::*;
use super::Spec;
use crate::model::SpiffeId;

/// One allow rule: callers that match any listed site or identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzRule {
    /// Sites whose gateways may call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
    /// SPIFFE IDs that may call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
}

/// An `AuthorizationPolicy`: who may call a service; everyone else is
/// refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzSpec {
    /// The service, in the policy's namespace.
    pub service: String,
    /// The rules; a caller that matches one is allowed.
    pub allow: Vec<AuthzRule>,
}

/// The fields a `AuthorizationPolicy` spec may have.
pub(super) const KEYS: &[&str] = &["service", "allow"];

/// The spec of a `AuthorizationPolicy` (its `service` already read); problems go to
/// `errs`.
pub(super) fn parse(m: &Map<String, Value>, service: String, errs: &mut Errors) -> Spec {
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
    Spec::AuthorizationPolicy(AuthzSpec { service, allow })
}
