//! The layer-7 part of `causeway ctl explain`: a service's HTTPRoute
//! rules (and which sites can serve each backend), its rate limits, the
//! tokens it accepts and its request-level authorization rules, in words.

use std::fmt::Write as _;

use causeway_api::catalog::ServiceView;
use causeway_api::policy::{
    AuthzSpec, HttpRouteSpec, Per, RateLimitSpec, RequestAuthnSpec, RouteMatch, Scope,
};

/// The layer-7 policies of one service, as `ctl explain` reads them.
#[derive(Default)]
pub struct L7 {
    /// `(policy name, spec)` of its HTTPRoute.
    pub route: Option<(String, HttpRouteSpec)>,
    /// Its RateLimit.
    pub limits: Option<(String, RateLimitSpec)>,
    /// Its RequestAuthentication.
    pub authn: Option<(String, RequestAuthnSpec)>,
    /// Its AuthorizationPolicy.
    pub authz: Option<(String, AuthzSpec)>,
}

fn describe_match(m: &RouteMatch) -> String {
    let mut parts = Vec::new();
    if let Some(p) = &m.path {
        let op = match p.kind.as_str() {
            "Exact" => "=",
            "RegularExpression" => "~",
            _ => "prefix",
        };
        parts.push(format!("path {op} {}", p.value));
    }
    if let Some(method) = &m.method {
        parts.push(format!("method {method}"));
    }
    for (what, list) in [("header", &m.headers), ("query", &m.query_params)] {
        for h in list {
            parts.push(match (h.kind.as_str(), &h.value) {
                ("Present", _) => format!("{what} {} present", h.name),
                ("RegularExpression", Some(v)) => format!("{what} {} ~ {v}", h.name),
                (_, v) => format!("{what} {} = {}", h.name, v.as_deref().unwrap_or("")),
            });
        }
    }
    if let Some(f) = &m.from {
        if !f.sites.is_empty() {
            parts.push(format!("from sites {}", f.sites.join("|")));
        }
        for (k, v) in &f.labels {
            parts.push(format!("from {k}={v}"));
        }
    }
    parts.join(", ")
}

/// Sites that export `subset` (with healthy endpoints of it / in total).
fn subset_sites(svc: &ServiceView, subset: &str) -> String {
    let sites: Vec<String> = svc
        .subsets
        .iter()
        .filter_map(|(site, groups)| {
            let g = groups.iter().find(|g| g.name == subset)?;
            Some(format!("{site} {}/{}", g.healthy, g.total))
        })
        .collect();
    if sites.is_empty() {
        "no site exports it: such requests fail with 503".into()
    } else {
        format!("at {}", sites.join(", "))
    }
}

impl L7 {
    /// The explanation's lines (nothing when the service has none).
    pub fn write(&self, svc: &ServiceView, t: &mut String) -> std::fmt::Result {
        if let Some((name, r)) = &self.route {
            writeln!(
                t,
                "HTTPRoute {name} (the calling gateway decides per request, first match wins):"
            )?;
            for (i, rule) in r.rules.iter().enumerate() {
                let label = if rule.name.is_empty() {
                    format!("rules[{i}]")
                } else {
                    rule.name.clone()
                };
                let when = if rule.matches.is_empty() {
                    "every request".to_string()
                } else {
                    rule.matches
                        .iter()
                        .map(describe_match)
                        .collect::<Vec<_>>()
                        .join(" OR ")
                };
                let total: u32 = rule.backend_refs.iter().map(|b| b.weight).sum();
                let mut then: Vec<String> = rule
                    .backend_refs
                    .iter()
                    .map(|b| {
                        let share = if total > 0 {
                            f64::from(b.weight) * 100.0 / f64::from(total)
                        } else {
                            0.0
                        };
                        let target = match (&b.subset, &b.site) {
                            (Some(s), Some(site)) => format!("subset {s} at site {site}"),
                            (Some(s), None) => format!("subset {s} ({})", subset_sites(svc, s)),
                            (None, Some(site)) => format!("site {site}"),
                            (None, None) => "any endpoint".into(),
                        };
                        format!("{share:.1}% to {target}")
                    })
                    .collect();
                for f in &rule.filters {
                    then.push(match f.kind.as_str() {
                        "RequestRedirect" => "answer with a redirect".into(),
                        "FixedResponse" => format!(
                            "answer {}",
                            f.fixed_response.as_ref().map_or(0, |x| x.status_code)
                        ),
                        "RequestMirror" => format!(
                            "mirror {:.0}% to {}",
                            f.request_mirror.as_ref().map_or(0.0, |m| m.percent),
                            f.request_mirror
                                .as_ref()
                                .map(|m| match (&m.backend_ref.subset, &m.backend_ref.site) {
                                    (Some(s), _) => format!("subset {s}"),
                                    (None, Some(site)) => format!("site {site}"),
                                    _ => String::new(),
                                })
                                .unwrap_or_default()
                        ),
                        other => other.to_string(),
                    });
                }
                if then.is_empty() {
                    then.push("the service as usual".into());
                }
                writeln!(t, "  {}. {label}: {when} -> {}", i + 1, then.join("; "))?;
            }
            writeln!(t, "  (no match: the service as usual)")?;
        }
        if let Some((name, l)) = &self.limits {
            writeln!(t, "RateLimit {name} (each exporting gateway counts):")?;
            for (i, limit) in l.limits.iter().enumerate() {
                let label = if limit.name.is_empty() {
                    format!("limits[{i}]")
                } else {
                    limit.name.clone()
                };
                let what = if limit.requests_per_second.is_some() {
                    "requests"
                } else {
                    "connections"
                };
                let per = match limit.per {
                    Per::Service => "one bucket for all callers",
                    Per::Site => "a bucket per calling site",
                };
                let scope = match limit.scope {
                    Scope::Local => "at each exporting gateway",
                    Scope::Global => "shared among the exporting gateways",
                };
                let on = if limit.matches.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", on {}",
                        limit
                            .matches
                            .iter()
                            .map(describe_match)
                            .collect::<Vec<_>>()
                            .join(" OR ")
                    )
                };
                writeln!(
                    t,
                    "  {label}: {} {what}/s, burst {}, {per}, {scope}{on}; over it: 429 (HTTP) or a refused stream",
                    limit.rate(),
                    limit.burst
                )?;
            }
        }
        if let Some((name, a)) = &self.authn {
            writeln!(
                t,
                "RequestAuthentication {name}: tokens {} (invalid ones get 401)",
                if a.require_token {
                    "required"
                } else {
                    "checked when present"
                }
            )?;
            for r in &a.jwt_rules {
                let keys = r
                    .jwks_file
                    .as_deref()
                    .map(|f| format!("keys from file {f}"))
                    .or_else(|| r.jwks_uri.as_deref().map(|u| format!("keys from {u}")))
                    .unwrap_or_default();
                writeln!(
                    t,
                    "  issuer {}: audiences [{}], {keys}, header {}, skew {} s",
                    r.issuer,
                    r.audiences.join(", "),
                    r.from_header,
                    r.clock_skew_seconds
                )?;
            }
        }
        if let Some((name, a)) = &self.authz {
            writeln!(
                t,
                "AuthorizationPolicy {name} (a request needs one matching rule; else 403):"
            )?;
            for (i, r) in a.allow.iter().enumerate() {
                let mut parts = Vec::new();
                if !r.sites.is_empty() {
                    parts.push(format!("sites {}", r.sites.join("|")));
                }
                if !r.identities.is_empty() {
                    parts.push(format!("identities {}", r.identities.join("|")));
                }
                if !r.methods.is_empty() {
                    parts.push(format!("methods {}", r.methods.join("|")));
                }
                if !r.paths.is_empty() {
                    parts.push(format!("paths {}", r.paths.join("|")));
                }
                for (h, v) in &r.headers {
                    parts.push(format!("header {h} in [{}]", v.join(", ")));
                }
                for (c, v) in &r.claims {
                    parts.push(format!("claim {c} in [{}]", v.join(", ")));
                }
                writeln!(t, "  allow[{i}]: {}", parts.join(", "))?;
            }
        }
        Ok(())
    }
}
