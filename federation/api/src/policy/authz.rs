//! `AuthorizationPolicy`: which sites and identities may call a service.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use std::collections::BTreeMap;

use super::read::*;
use super::Spec;
use crate::model::SpiffeId;

/// One allow rule. Who: a caller that is one of the listed sites or
/// identities (either list matches; none listed: any caller). What, for
/// HTTP services: every request condition set must hold — the method is
/// one of `methods`, the path one of `paths` (exact, or a prefix ending in
/// `*`), each header in `headers` has one of its values, and each claim in
/// `claims` of the request's verified token has one of its values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzRule {
    /// Sites whose gateways may call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
    /// SPIFFE IDs that may call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// HTTP methods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Paths: exact, or a prefix written with a trailing `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Header name (lower case) to accepted values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, Vec<String>>,
    /// Claim (dots for nested claims) to accepted values; needs a
    /// RequestAuthentication for the service.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub claims: BTreeMap<String, Vec<String>>,
}

impl AuthzRule {
    /// Whether the rule looks at requests (not only at who calls).
    pub fn has_request_conditions(&self) -> bool {
        !(self.methods.is_empty()
            && self.paths.is_empty()
            && self.headers.is_empty()
            && self.claims.is_empty())
    }

    /// Whether the rule names callers, and `site`/`identity` is one.
    pub fn caller_matches(&self, site: &str, identity: &str) -> bool {
        (self.sites.is_empty() && self.identities.is_empty())
            || self.sites.iter().any(|s| s == site)
            || self.identities.iter().any(|i| i == identity)
    }
}

impl AuthzSpec {
    /// Whether any rule looks at requests.
    pub fn has_request_conditions(&self) -> bool {
        self.allow.iter().any(AuthzRule::has_request_conditions)
    }
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
                if let Some(r) = object(
                    Some(r),
                    &rp,
                    &[
                        "sites",
                        "identities",
                        "methods",
                        "paths",
                        "headers",
                        "claims",
                    ],
                    errs,
                ) {
                    let sites = strings(r, "sites", &rp, 64, site_name, errs);
                    let identities = strings(
                        r,
                        "identities",
                        &rp,
                        64,
                        |s| s.parse::<SpiffeId>().map(|_| ()).map_err(|e| e.to_string()),
                        errs,
                    );
                    let methods = strings(
                        r,
                        "methods",
                        &rp,
                        16,
                        |m| {
                            if METHODS.contains(&m) {
                                Ok(())
                            } else {
                                Err(format!("{m:?} is not one of {}", METHODS.join(", ")))
                            }
                        },
                        errs,
                    );
                    let paths = strings(
                        r,
                        "paths",
                        &rp,
                        64,
                        |p| {
                            let body = p.strip_suffix('*').unwrap_or(p);
                            if body.starts_with('/') && !body.contains('*') && p.len() <= 1024 {
                                Ok(())
                            } else {
                                Err(format!(
                                    "{p:?}: write an exact path (/api/items) or a prefix ending in * (/api/*)"
                                ))
                            }
                        },
                        errs,
                    );
                    let headers = value_lists(r, "headers", &rp, true, errs);
                    let claims = value_lists(r, "claims", &rp, false, errs);
                    let rule = AuthzRule {
                        sites,
                        identities,
                        methods,
                        paths,
                        headers,
                        claims,
                    };
                    if rule.sites.is_empty()
                        && rule.identities.is_empty()
                        && !rule.has_request_conditions()
                    {
                        errs.push(
                            &rp,
                            "set at least one of sites, identities, methods, paths, headers or claims",
                        );
                    }
                    allow.push(rule);
                }
            }
        }
    }
    Spec::AuthorizationPolicy(AuthzSpec { service, allow })
}

const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// A mapping of name to a list of accepted values (`headers`, `claims`).
fn value_lists(
    r: &Map<String, Value>,
    key: &str,
    rp: &str,
    header: bool,
    errs: &mut Errors,
) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    let p = format!("{rp}.{key}");
    match r.get(key) {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            if m.len() > 16 {
                errs.push(&p, "at most 16 entries");
            }
            for (name, values) in m {
                let np = format!("{p}.{name}");
                let name_ok = !name.is_empty()
                    && name.len() <= 256
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b));
                if !name_ok {
                    errs.push(&np, "not a valid name");
                    continue;
                }
                let Some(list) = values.as_array() else {
                    errs.push(&np, "must be a list of accepted values");
                    continue;
                };
                if list.is_empty() || list.len() > 64 {
                    errs.push(&np, "list 1 to 64 values");
                }
                let vals: Vec<String> = list
                    .iter()
                    .filter_map(|v| {
                        let s = v.as_str();
                        if s.is_none() {
                            errs.push(&np, "values must be strings");
                        }
                        s.map(str::to_string)
                    })
                    .collect();
                let name = if header {
                    name.to_ascii_lowercase()
                } else {
                    name.clone()
                };
                out.insert(name, vals);
            }
        }
        Some(_) => errs.push(&p, "must be a mapping of name to a list of values"),
    }
    out
}
