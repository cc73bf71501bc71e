//! `HTTPRoute`: per-request routing of an HTTP service, shaped like the
//! Kubernetes Gateway API's HTTPRoute so its users recognise it — ordered
//! rules, each with `matches` (path, method, headers, query parameters,
//! and, a causeway addition, the calling site in `from`), `backendRefs`
//! (a subset and/or a site instead of a Service, with weights) and
//! `filters` (header modifiers, URL rewrite, redirect, mirror, and the
//! causeway addition `FixedResponse`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::read::*;
use super::Spec;
use crate::model::check_label_value;

/// Largest compiled regular expression in a route (bytes of program); the
/// gateway compiles with the same bound.
pub const REGEX_SIZE_LIMIT: usize = 64 * 1024;

/// An `HTTPRoute`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    /// The service, in the policy's namespace.
    pub service: String,
    /// The rules, tried in order.
    pub rules: Vec<RouteRule>,
}

/// One rule: a request that meets any of `matches` (or every request,
/// when there are none) goes to `backend_refs` after `filters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteRule {
    /// A name for metrics and logs (a DNS label).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Any of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RouteMatch>,
    /// Where matching requests go, by weight (none: the service as usual).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<BackendRef>,
    /// What is done to them on the way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<RouteFilter>,
}

/// Conditions that must all hold.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    /// The path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// The method (upper case).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
    /// Query parameters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<ValueMatch>,
    /// The calling site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<SourceMatch>,
}

/// A path condition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathMatch {
    /// `Exact`, `PathPrefix` or `RegularExpression`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The path, prefix or expression.
    pub value: String,
}

/// A header or query parameter condition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValueMatch {
    /// `Exact`, `RegularExpression` or `Present`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The header (any case) or parameter (exact case) name.
    pub name: String,
    /// The value or expression; absent for `Present`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// The calling site: one of `sites`, and carrying every one of `labels`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SourceMatch {
    /// Site names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
    /// Site labels (e.g. `region: eu`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A destination: endpoints of a subset (version), of a site, or both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendRef {
    /// The subset (the version its endpoints carry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// The site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Relative weight, 0-10000 (default 1).
    pub weight: u32,
}

/// One filter; `type` names which of the other fields it has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteFilter {
    /// `RequestHeaderModifier`, `ResponseHeaderModifier`, `URLRewrite`,
    /// `RequestRedirect`, `RequestMirror` or `FixedResponse`.
    #[serde(rename = "type")]
    pub kind: String,
    /// For `RequestHeaderModifier`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    /// For `ResponseHeaderModifier`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
    /// For `URLRewrite`.
    #[serde(
        default,
        rename = "urlRewrite",
        skip_serializing_if = "Option::is_none"
    )]
    pub url_rewrite: Option<UrlRewrite>,
    /// For `RequestRedirect`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<RequestRedirect>,
    /// For `RequestMirror`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<RequestMirror>,
    /// For `FixedResponse`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed_response: Option<FixedResponse>,
}

/// Header edits.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HeaderModifier {
    /// Replaced or added.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HeaderValue>,
    /// Appended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HeaderValue>,
    /// Removed (names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// A header and its value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeaderValue {
    /// The name (lower case in canonical form).
    pub name: String,
    /// The value.
    pub value: String,
}

/// A new path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathModifier {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type")]
    pub kind: String,
    /// For `ReplaceFullPath`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_full_path: Option<String>,
    /// For `ReplacePrefixMatch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_prefix_match: Option<String>,
}

/// A rewrite of the forwarded request.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct UrlRewrite {
    /// A new host (authority).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// A new path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

/// A redirect answer instead of forwarding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRedirect {
    /// `http` or `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// The host to send the client to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    /// 301, 302 (default), 303, 307 or 308.
    pub status_code: u16,
}

/// Where mirrored copies go: a subset, a site, or both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MirrorRef {
    /// The subset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// The site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
}

/// Copies of a share of requests, sent elsewhere and forgotten.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestMirror {
    /// Where the copies go.
    pub backend_ref: MirrorRef,
    /// Percent of requests copied, 0-100 (default 100).
    pub percent: f64,
}

/// An answer the gateway gives itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FixedResponse {
    /// 200-599.
    pub status_code: u16,
    /// At most 4 KiB.
    #[serde(default)]
    pub body: String,
    /// Default `text/plain`.
    pub content_type: String,
}

/// The fields an `HTTPRoute` spec may have.
pub(super) const KEYS: &[&str] = &["service", "rules"];

const MAX_RULES: usize = 64;
const MAX_ITEMS: usize = 16;
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];
const FILTERS: &[&str] = &[
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "URLRewrite",
    "RequestRedirect",
    "RequestMirror",
    "FixedResponse",
];

/// The spec of an `HTTPRoute` (its `service` already read); problems go
/// to `errs`.
pub(super) fn parse(m: &Map<String, Value>, service: String, errs: &mut Errors) -> Spec {
    let mut rules = Vec::new();
    for (rp, r) in list(m, "rules", "spec", MAX_RULES, true, errs) {
        if let Some(r) = object(
            Some(r),
            &rp,
            &["name", "matches", "backendRefs", "filters"],
            errs,
        ) {
            rules.push(parse_rule(r, &rp, errs));
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, r) in rules.iter().enumerate() {
        if !r.name.is_empty() && !names.insert(r.name.as_str()) {
            errs.push(
                &format!("spec.rules[{i}].name"),
                format!("{:?} names another rule too; names must be unique", r.name),
            );
        }
    }
    Spec::HttpRoute(HttpRouteSpec { service, rules })
}

/// The items of the list `m[key]` with their paths; absent is empty (or an
/// error when `required`).
fn list<'a>(
    m: &'a Map<String, Value>,
    key: &str,
    path: &str,
    max: usize,
    required: bool,
    errs: &mut Errors,
) -> Vec<(String, &'a Value)> {
    let p = format!("{path}.{key}");
    match m.get(key) {
        None | Some(Value::Null) => {
            if required {
                errs.push(&p, format!("required: a list of 1 to {max} entries"));
            }
            Vec::new()
        }
        Some(Value::Array(items)) => {
            if items.len() > max || (required && items.is_empty()) {
                errs.push(&p, format!("list 1 to {max} entries"));
            }
            items
                .iter()
                .take(max)
                .enumerate()
                .map(|(i, v)| (format!("{p}[{i}]"), v))
                .collect()
        }
        Some(_) => {
            errs.push(&p, "must be a list");
            Vec::new()
        }
    }
}

/// An optional string field.
fn opt_string(m: &Map<String, Value>, key: &str, path: &str, errs: &mut Errors) -> Option<String> {
    match m.get(key) {
        None | Some(Value::Null) => None,
        Some(_) => string(m, key, path, errs),
    }
}

fn parse_rule(r: &Map<String, Value>, rp: &str, errs: &mut Errors) -> RouteRule {
    let name = match opt_string(r, "name", rp, errs) {
        Some(n) => match crate::model::check_dns_label("name", &n) {
            Ok(()) => n,
            Err(e) => {
                errs.push(&format!("{rp}.name"), e);
                String::new()
            }
        },
        None => String::new(),
    };
    let matches: Vec<RouteMatch> = list(r, "matches", rp, MAX_ITEMS, false, errs)
        .into_iter()
        .filter_map(|(mp, v)| parse_match(v, &mp, errs))
        .collect();
    let backend_refs: Vec<BackendRef> = list(r, "backendRefs", rp, MAX_ITEMS, false, errs)
        .into_iter()
        .filter_map(|(bp, v)| parse_backend(v, &bp, true, errs))
        .collect();
    if !backend_refs.is_empty() && backend_refs.iter().all(|b| b.weight == 0) {
        errs.push(
            &format!("{rp}.backendRefs"),
            "every weight is 0; give at least one backend a weight above 0",
        );
    }
    let filters: Vec<RouteFilter> = list(r, "filters", rp, MAX_ITEMS, false, errs)
        .into_iter()
        .filter_map(|(fp, v)| parse_filter(v, &fp, errs))
        .collect();
    // What the filters may be used with.
    let has = |k: &str| filters.iter().any(|f| f.kind == k);
    for (i, f) in filters.iter().enumerate() {
        if filters[..i].iter().any(|g| g.kind == f.kind) {
            errs.push(
                &format!("{rp}.filters[{i}].type"),
                format!("{} is used twice in this rule; merge them", f.kind),
            );
        }
    }
    let answers = has("RequestRedirect") || has("FixedResponse");
    if has("RequestRedirect") && has("FixedResponse") {
        errs.push(
            &format!("{rp}.filters"),
            "RequestRedirect and FixedResponse both answer the request; keep one",
        );
    }
    if answers && !backend_refs.is_empty() {
        errs.push(
            &format!("{rp}.backendRefs"),
            "a rule that answers itself (RequestRedirect or FixedResponse) forwards nowhere; remove backendRefs",
        );
    }
    if answers && (has("URLRewrite") || has("RequestMirror")) {
        errs.push(
            &format!("{rp}.filters"),
            "URLRewrite and RequestMirror need a forwarded request; they cannot go with RequestRedirect or FixedResponse",
        );
    }
    let prefix_rewrite = filters.iter().any(|f| {
        let path = f
            .url_rewrite
            .as_ref()
            .and_then(|u| u.path.as_ref())
            .or_else(|| f.request_redirect.as_ref().and_then(|r| r.path.as_ref()));
        path.is_some_and(|p| p.kind == "ReplacePrefixMatch")
    });
    if prefix_rewrite
        && (matches.is_empty()
            || matches
                .iter()
                .any(|m| m.path.as_ref().is_none_or(|p| p.kind != "PathPrefix")))
    {
        errs.push(
            &format!("{rp}.filters"),
            "ReplacePrefixMatch needs every match of the rule to have a PathPrefix path",
        );
    }
    RouteRule {
        name,
        matches,
        backend_refs,
        filters,
    }
}

/// One `match` at `mp` (also a rate limit's).
pub(super) fn parse_match(v: &Value, mp: &str, errs: &mut Errors) -> Option<RouteMatch> {
    let m = object(
        Some(v),
        mp,
        &["path", "method", "headers", "queryParams", "from"],
        errs,
    )?;
    let mut out = RouteMatch::default();
    if let Some(p) = m.get("path").filter(|v| !v.is_null()) {
        let pp = format!("{mp}.path");
        if let Some(p) = object(Some(p), &pp, &["type", "value"], errs) {
            let kind = one_of(
                p,
                "type",
                &pp,
                &["Exact", "PathPrefix", "RegularExpression"],
                Some("PathPrefix"),
                errs,
            );
            let value = string(p, "value", &pp, errs);
            if let (Some(kind), Some(value)) = (kind, value) {
                let vp = format!("{pp}.value");
                if kind == "RegularExpression" {
                    check_regex(&value, &vp, errs);
                } else if !value.starts_with('/')
                    || value.len() > 1024
                    || value.contains(['?', '#', ' '])
                {
                    errs.push(
                        &vp,
                        format!("{value:?} must start with / and hold no ?, # or spaces"),
                    );
                }
                out.path = Some(PathMatch { kind, value });
            }
        }
    }
    if let Some(method) = opt_string(m, "method", mp, errs) {
        if METHODS.contains(&method.as_str()) {
            out.method = Some(method);
        } else {
            errs.push(
                &format!("{mp}.method"),
                format!("{method:?} is not one of {}", METHODS.join(", ")),
            );
        }
    }
    out.headers = value_matches(m, "headers", mp, true, errs);
    out.query_params = value_matches(m, "queryParams", mp, false, errs);
    if let Some(f) = m.get("from").filter(|v| !v.is_null()) {
        let fp = format!("{mp}.from");
        if let Some(f) = object(Some(f), &fp, &["sites", "labels"], errs) {
            let sites = strings(f, "sites", &fp, 64, site_name, errs);
            let mut labels = BTreeMap::new();
            match f.get("labels") {
                None | Some(Value::Null) => {}
                Some(Value::Object(l)) => {
                    for (k, v) in l {
                        let lp = format!("{fp}.labels.{k}");
                        match v.as_str() {
                            Some(s) => match check_label_value("label", k)
                                .and_then(|()| check_label_value("label", s))
                            {
                                Ok(()) => {
                                    labels.insert(k.clone(), s.to_string());
                                }
                                Err(e) => errs.push(&lp, e),
                            },
                            None => errs.push(&lp, "must be a string"),
                        }
                    }
                }
                Some(_) => errs.push(
                    &format!("{fp}.labels"),
                    "must be a mapping of label to value",
                ),
            }
            if sites.is_empty() && labels.is_empty() {
                errs.push(&fp, "set sites, labels or both");
            }
            out.from = Some(SourceMatch { sites, labels });
        }
    }
    Some(out)
}

/// `m[key]` as one of `allowed`; absent is `default` (or an error).
fn one_of(
    m: &Map<String, Value>,
    key: &str,
    path: &str,
    allowed: &[&str],
    default: Option<&str>,
    errs: &mut Errors,
) -> Option<String> {
    let given = match (m.get(key), default) {
        (None | Some(Value::Null), Some(d)) => return Some(d.to_string()),
        _ => string(m, key, path, errs)?,
    };
    if allowed.contains(&given.as_str()) {
        Some(given)
    } else {
        errs.push(
            &format!("{path}.{key}"),
            format!("{given:?}: use {}", allowed.join(", ")),
        );
        None
    }
}

fn check_regex(pattern: &str, path: &str, errs: &mut Errors) {
    let built = regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build();
    if let Err(e) = built {
        let first = e.to_string();
        let first = first.lines().last().unwrap_or("invalid").trim().to_string();
        errs.push(path, format!("not a valid regular expression: {first}"));
    }
}

fn value_matches(
    m: &Map<String, Value>,
    key: &str,
    mp: &str,
    header: bool,
    errs: &mut Errors,
) -> Vec<ValueMatch> {
    let mut out = Vec::new();
    for (hp, v) in list(m, key, mp, MAX_ITEMS, false, errs) {
        let Some(h) = object(Some(v), &hp, &["type", "name", "value"], errs) else {
            continue;
        };
        let kind = one_of(
            h,
            "type",
            &hp,
            &["Exact", "RegularExpression", "Present"],
            Some("Exact"),
            errs,
        );
        let name = string(h, "name", &hp, errs).and_then(|n| {
            let ok = if header {
                is_header_name(&n)
            } else {
                !n.is_empty() && n.len() <= 256 && !n.contains(['&', '=', ' '])
            };
            if ok {
                Some(if header { n.to_ascii_lowercase() } else { n })
            } else {
                errs.push(&format!("{hp}.name"), format!("{n:?} is not a valid name"));
                None
            }
        });
        let value = opt_string(h, "value", &hp, errs);
        let Some(kind) = kind else { continue };
        match (kind.as_str(), &value) {
            ("Present", Some(_)) => {
                errs.push(&format!("{hp}.value"), "a Present match takes no value")
            }
            ("Present", None) => {}
            (_, None) => errs.push(&format!("{hp}.value"), format!("required with type {kind}")),
            ("RegularExpression", Some(v)) => check_regex(v, &format!("{hp}.value"), errs),
            (_, Some(v)) => {
                if v.len() > 4096 {
                    errs.push(&format!("{hp}.value"), "longer than 4096 bytes");
                }
            }
        }
        if let Some(name) = name {
            out.push(ValueMatch { kind, name, value });
        }
    }
    out
}

/// A header name: an HTTP token, at most 256 bytes.
fn is_header_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 256
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_header_value(v: &str) -> bool {
    v.len() <= 4096 && v.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
}

fn parse_backend(v: &Value, bp: &str, weighted: bool, errs: &mut Errors) -> Option<BackendRef> {
    let keys: &[&str] = if weighted {
        &["subset", "site", "weight"]
    } else {
        &["subset", "site"]
    };
    let b = object(Some(v), bp, keys, errs)?;
    let subset = opt_string(b, "subset", bp, errs).filter(|s| {
        let ok = !s.is_empty() && check_label_value("subset", s).is_ok();
        if !ok {
            errs.push(
                &format!("{bp}.subset"),
                format!("{s:?} is not a version name (a label value, e.g. v2)"),
            );
        }
        ok
    });
    let site = opt_string(b, "site", bp, errs).filter(|s| match site_name(s) {
        Ok(()) => true,
        Err(e) => {
            errs.push(&format!("{bp}.site"), e);
            false
        }
    });
    if !b.contains_key("subset") && !b.contains_key("site") {
        errs.push(bp, "set subset, site or both");
    }
    let weight = if weighted {
        bounded(b, "weight", bp, 0..=10_000u64, Some(1), errs)? as u32
    } else {
        0
    };
    Some(BackendRef {
        subset,
        site,
        weight,
    })
}

fn parse_filter(v: &Value, fp: &str, errs: &mut Errors) -> Option<RouteFilter> {
    let f = object(
        Some(v),
        fp,
        &[
            "type",
            "requestHeaderModifier",
            "responseHeaderModifier",
            "urlRewrite",
            "requestRedirect",
            "requestMirror",
            "fixedResponse",
        ],
        errs,
    )?;
    let kind = one_of(f, "type", fp, FILTERS, None, errs)?;
    let field = match kind.as_str() {
        "RequestHeaderModifier" => "requestHeaderModifier",
        "ResponseHeaderModifier" => "responseHeaderModifier",
        "URLRewrite" => "urlRewrite",
        "RequestRedirect" => "requestRedirect",
        "RequestMirror" => "requestMirror",
        _ => "fixedResponse",
    };
    for k in f.keys().filter(|k| *k != "type" && *k != field) {
        errs.push(
            &format!("{fp}.{k}"),
            format!("does not go with type {kind}; a {kind} filter takes {field}"),
        );
    }
    let body = f.get(field);
    let bp = format!("{fp}.{field}");
    let mut out = RouteFilter {
        kind: kind.clone(),
        request_header_modifier: None,
        response_header_modifier: None,
        url_rewrite: None,
        request_redirect: None,
        request_mirror: None,
        fixed_response: None,
    };
    match kind.as_str() {
        "RequestHeaderModifier" => out.request_header_modifier = parse_headers(body, &bp, errs),
        "ResponseHeaderModifier" => out.response_header_modifier = parse_headers(body, &bp, errs),
        "URLRewrite" => {
            let u = object(body, &bp, &["hostname", "path"], errs)?;
            let hostname =
                opt_string(u, "hostname", &bp, errs).filter(|h| check_host(h, &bp, errs));
            let path = u
                .get("path")
                .and_then(|p| parse_path_modifier(p, &format!("{bp}.path"), errs));
            if hostname.is_none()
                && path.is_none()
                && !u.contains_key("hostname")
                && !u.contains_key("path")
            {
                errs.push(&bp, "set hostname, path or both");
            }
            out.url_rewrite = Some(UrlRewrite { hostname, path });
        }
        "RequestRedirect" => {
            let r = object(
                body,
                &bp,
                &["scheme", "hostname", "port", "path", "statusCode"],
                errs,
            )?;
            let scheme = match r.get("scheme") {
                None | Some(Value::Null) => None,
                Some(_) => one_of(r, "scheme", &bp, &["http", "https"], None, errs),
            };
            let hostname =
                opt_string(r, "hostname", &bp, errs).filter(|h| check_host(h, &bp, errs));
            let port = match r.get("port") {
                None | Some(Value::Null) => None,
                Some(_) => bounded(r, "port", &bp, 1..=65_535u64, None, errs).map(|p| p as u16),
            };
            let path = r
                .get("path")
                .and_then(|p| parse_path_modifier(p, &format!("{bp}.path"), errs));
            let status_code = bounded(r, "statusCode", &bp, 301..=308u64, Some(302), errs)? as u16;
            if ![301, 302, 303, 307, 308].contains(&status_code) {
                errs.push(
                    &format!("{bp}.statusCode"),
                    format!("{status_code}: use 301, 302, 303, 307 or 308"),
                );
            }
            out.request_redirect = Some(RequestRedirect {
                scheme,
                hostname,
                port,
                path,
                status_code,
            });
        }
        "RequestMirror" => {
            let m = object(body, &bp, &["backendRef", "percent"], errs)?;
            let backend = match m.get("backendRef") {
                None | Some(Value::Null) => {
                    errs.push(
                        &format!("{bp}.backendRef"),
                        "required: a subset, a site or both",
                    );
                    None
                }
                Some(b) => parse_backend(b, &format!("{bp}.backendRef"), false, errs),
            };
            let percent = bounded(m, "percent", &bp, 0.0..=100.0f64, Some(100.0), errs)?;
            let backend = backend?;
            out.request_mirror = Some(RequestMirror {
                backend_ref: MirrorRef {
                    subset: backend.subset,
                    site: backend.site,
                },
                percent,
            });
        }
        _ => {
            let x = object(body, &bp, &["statusCode", "body", "contentType"], errs)?;
            let status_code = bounded(x, "statusCode", &bp, 200..=599u64, None, errs)? as u16;
            let body = opt_string(x, "body", &bp, errs).unwrap_or_default();
            if body.len() > 4096 {
                errs.push(&format!("{bp}.body"), "longer than 4096 bytes");
            }
            let content_type =
                opt_string(x, "contentType", &bp, errs).unwrap_or_else(|| "text/plain".into());
            if !is_header_value(&content_type) || content_type.is_empty() {
                errs.push(&format!("{bp}.contentType"), "not a header value");
            }
            out.fixed_response = Some(FixedResponse {
                status_code,
                body,
                content_type,
            });
        }
    }
    Some(out)
}

fn check_host(h: &str, path: &str, errs: &mut Errors) -> bool {
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b':');
    if !ok {
        errs.push(
            &format!("{path}.hostname"),
            format!("{h:?} is not a host name"),
        );
    }
    ok
}

fn parse_path_modifier(v: &Value, pp: &str, errs: &mut Errors) -> Option<PathModifier> {
    let p = object(
        Some(v),
        pp,
        &["type", "replaceFullPath", "replacePrefixMatch"],
        errs,
    )?;
    let kind = one_of(
        p,
        "type",
        pp,
        &["ReplaceFullPath", "ReplacePrefixMatch"],
        None,
        errs,
    )?;
    let key = if kind == "ReplaceFullPath" {
        "replaceFullPath"
    } else {
        "replacePrefixMatch"
    };
    let value = string(p, key, pp, errs)?;
    if !value.starts_with('/') || value.len() > 1024 || value.contains(['?', '#', ' ']) {
        errs.push(
            &format!("{pp}.{key}"),
            format!("{value:?} must start with / and hold no ?, # or spaces"),
        );
    }
    let (full, prefix) = if kind == "ReplaceFullPath" {
        (Some(value), None)
    } else {
        (None, Some(value))
    };
    Some(PathModifier {
        kind,
        replace_full_path: full,
        replace_prefix_match: prefix,
    })
}

fn parse_headers(v: Option<&Value>, hp: &str, errs: &mut Errors) -> Option<HeaderModifier> {
    let h = object(v, hp, &["set", "add", "remove"], errs)?;
    let pairs = |key: &str, errs: &mut Errors| -> Vec<HeaderValue> {
        let mut out = Vec::new();
        for (p, v) in list(h, key, hp, MAX_ITEMS, false, errs) {
            let Some(o) = object(Some(v), &p, &["name", "value"], errs) else {
                continue;
            };
            let name = string(o, "name", &p, errs);
            let value = string(o, "value", &p, errs);
            if let Some(n) = &name {
                if !is_header_name(n) {
                    errs.push(&format!("{p}.name"), format!("{n:?} is not a header name"));
                }
            }
            if let Some(v) = &value {
                if !is_header_value(v) {
                    errs.push(
                        &format!("{p}.value"),
                        "only printable ASCII, at most 4096 bytes",
                    );
                }
            }
            if let (Some(name), Some(value)) = (name, value) {
                out.push(HeaderValue {
                    name: name.to_ascii_lowercase(),
                    value,
                });
            }
        }
        out
    };
    let set = pairs("set", errs);
    let add = pairs("add", errs);
    let remove = strings(
        h,
        "remove",
        hp,
        MAX_ITEMS,
        |n| {
            if is_header_name(n) {
                Ok(())
            } else {
                Err(format!("{n:?} is not a header name"))
            }
        },
        errs,
    )
    .into_iter()
    .map(|n| n.to_ascii_lowercase())
    .collect::<Vec<_>>();
    if set.is_empty() && add.is_empty() && remove.is_empty() {
        errs.push(hp, "set, add or remove at least one header");
    }
    Some(HeaderModifier { set, add, remove })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::{parse_document, Spec, API_VERSION};

    fn doc(spec: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": API_VERSION, "kind": "HTTPRoute",
               "metadata": {"name": "web", "namespace": "shop"}, "spec": spec})
    }

    #[test]
    fn a_full_route_parses_and_round_trips() {
        let d = doc(json!({"service": "web", "rules": [
            {"name": "beta", "matches": [{"headers": [{"name": "X-User", "type": "RegularExpression", "value": "alice|bob"}]}],
             "backendRefs": [{"subset": "v2"}]},
            {"name": "eu", "matches": [{"from": {"labels": {"region": "eu"}}, "path": {"type": "PathPrefix", "value": "/api"}}],
             "backendRefs": [{"subset": "blue", "weight": 100}],
             "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}}},
                         {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "X-Route", "value": "eu"}], "remove": ["X-Debug"]}},
                         {"type": "RequestMirror", "requestMirror": {"backendRef": {"site": "west"}, "percent": 10}}]},
            {"matches": [{"path": {"value": "/old"}, "method": "GET", "queryParams": [{"name": "q", "type": "Present"}]}],
             "filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https", "statusCode": 301}}]},
            {"matches": [{"path": {"type": "Exact", "value": "/teapot"}}],
             "filters": [{"type": "FixedResponse", "fixedResponse": {"statusCode": 418, "body": "short and stout"}}]},
            {"backendRefs": [{"subset": "v1", "weight": 99}, {"subset": "v2", "weight": 1}]}
        ]}));
        let p = parse_document(&d).unwrap_or_else(|e| panic!("{e:?}"));
        let again = parse_document(&p.to_document()).unwrap();
        assert_eq!(again, p);
        let Spec::HttpRoute(r) = &p.spec else {
            panic!()
        };
        assert_eq!(r.rules.len(), 5);
        assert_eq!(
            r.rules[0].matches[0].headers[0].name, "x-user",
            "header names are lower-cased"
        );
        assert_eq!(r.rules[0].backend_refs[0].weight, 1, "weight defaults to 1");
        assert_eq!(
            r.rules[2].matches[0].path.as_ref().unwrap().kind,
            "PathPrefix"
        );
        assert_eq!(
            r.rules[3].filters[0]
                .fixed_response
                .as_ref()
                .unwrap()
                .content_type,
            "text/plain"
        );
        assert_eq!(p.to_document()["kind"], "HTTPRoute");
    }

    #[test]
    fn every_mistake_in_a_route_is_named_with_its_path() {
        let d = doc(json!({"service": "web", "rules": [
            {"name": "Bad Name", "matches": [{"path": {"type": "Glob", "value": "x"}, "method": "FETCH",
                "headers": [{"name": "x user", "value": "1"}, {"name": "a", "type": "RegularExpression", "value": "(unclosed"},
                            {"name": "p", "type": "Present", "value": "v"}],
                "from": {}}],
             "backendRefs": [{"weight": 0}, {"subset": "v 2", "weight": 20000}]},
            {"filters": [{"type": "RequestRedirect", "requestRedirect": {"statusCode": 304}},
                         {"type": "FixedResponse", "fixedResponse": {"statusCode": 200}},
                         {"type": "URLRewrite", "requestRedirect": {}}],
             "backendRefs": [{"site": "east"}]},
            {"filters": [{"type": "FixedResponse", "fixedResponse": {"statusCode": 99}}]},
            {"matches": [{"path": {"type": "Exact", "value": "/a"}}],
             "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/b"}}}]}
        ]}));
        let errs = parse_document(&d).unwrap_err();
        let text = errs.join("\n");
        for want in [
            "spec.rules[0].name:",
            "spec.rules[0].matches[0].path.type: \"Glob\": use Exact, PathPrefix, RegularExpression",
            "spec.rules[0].matches[0].method: \"FETCH\" is not one of",
            "spec.rules[0].matches[0].headers[0].name: \"x user\" is not a valid name",
            "spec.rules[0].matches[0].headers[1].value: not a valid regular expression",
            "spec.rules[0].matches[0].headers[2].value: a Present match takes no value",
            "spec.rules[0].matches[0].from: set sites, labels or both",
            "spec.rules[0].backendRefs[0]: set subset, site or both",
            "spec.rules[0].backendRefs[1].subset: \"v 2\" is not a version name",
            "spec.rules[0].backendRefs[1].weight: 20000 is not an integer from 0 to 10000",
            "spec.rules[1].filters[0].requestRedirect.statusCode: 304: use 301, 302, 303, 307 or 308",
            "spec.rules[2].filters[0].fixedResponse.statusCode: 99 is not an integer from 200 to 599",
            "spec.rules[1].filters[2].requestRedirect: does not go with type URLRewrite",
            "spec.rules[1].filters: RequestRedirect and FixedResponse both answer the request",
            "spec.rules[1].backendRefs: a rule that answers itself",
            "spec.rules[3].filters: ReplacePrefixMatch needs every match of the rule to have a PathPrefix path",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        let errs = parse_document(&doc(json!({"service": "web", "rules": []}))).unwrap_err();
        assert!(errs[0].starts_with("spec.rules: list 1 to 64"), "{errs:?}");
    }
}
