//! The shell around the core's request routing (`causeway_gateway_core::
//! route`): compiles a service's `HTTPRoute` into the core's rules once per
//! catalog change, and per request turns hyper's request into the core's
//! view, and the core's decision back into what the HTTP path does —
//! answer (redirect, fixed response), or forward to a backend with the
//! request rewritten and headers edited.

use std::sync::Arc;

use bytes::Bytes;
use causeway_api::policy::{HeaderModifier, HttpRouteSpec, PathModifier, RouteRule};
use causeway_gateway_core::route::{
    self as core, mirrored, redirect_location, rewrite_path, whole_regex, Action, Backend,
    HeaderEdits, Match, PathRewrite, RequestView, Rule, ValueMatch,
};
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{HeaderMap, Response, StatusCode};

/// A service's compiled route, compared by the spec it came from.
#[derive(Debug, Clone)]
pub struct CompiledRoute {
    /// The policy's name.
    pub name: String,
    /// What it was compiled from.
    pub spec: HttpRouteSpec,
    /// The core's rules.
    pub route: Arc<core::Route>,
}

impl PartialEq for CompiledRoute {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.spec == other.spec
    }
}

impl CompiledRoute {
    /// Compiles `spec` (already validated: an error here means a pattern
    /// this gateway's engine refuses though the controller accepted it).
    pub fn compile(name: &str, spec: HttpRouteSpec) -> Result<Self, String> {
        let rules = spec
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| rule(r).map_err(|e| format!("rules[{i}]: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            name: name.to_string(),
            spec,
            route: Arc::new(core::Route { rules }),
        })
    }
}

fn value_match(kind: &str, value: Option<&str>) -> Result<ValueMatch, String> {
    Ok(match kind {
        "Present" => ValueMatch::Present,
        "RegularExpression" => ValueMatch::Regex(whole_regex(value.unwrap_or_default())?),
        _ => ValueMatch::Exact(value.unwrap_or_default().to_string()),
    })
}

fn path_rewrite(p: &PathModifier) -> PathRewrite {
    match (&p.replace_full_path, &p.replace_prefix_match) {
        (Some(full), _) => PathRewrite::Full(full.clone()),
        (None, prefix) => PathRewrite::Prefix(prefix.clone().unwrap_or_default()),
    }
}

fn edits(h: Option<&HeaderModifier>) -> HeaderEdits {
    let Some(h) = h else {
        return HeaderEdits::default();
    };
    let pairs = |v: &[causeway_api::policy::HeaderValue]| {
        v.iter()
            .map(|p| (p.name.clone(), p.value.clone()))
            .collect::<Vec<_>>()
    };
    HeaderEdits {
        set: pairs(&h.set),
        add: pairs(&h.add),
        remove: h.remove.clone(),
    }
}

/// The core's form of one `match` (also a rate limit's).
pub(crate) fn compile_match(m: &causeway_api::policy::RouteMatch) -> Result<Match, String> {
    let path = match &m.path {
        None => None,
        Some(p) => Some(match p.kind.as_str() {
            "Exact" => core::PathMatch::Exact(p.value.clone()),
            "RegularExpression" => core::PathMatch::Regex(whole_regex(&p.value)?),
            _ => core::PathMatch::Prefix(p.value.clone()),
        }),
    };
    let values = |v: &[causeway_api::policy::ValueMatch]| {
        v.iter()
            .map(|h| Ok((h.name.clone(), value_match(&h.kind, h.value.as_deref())?)))
            .collect::<Result<Vec<_>, String>>()
    };
    Ok(Match {
        path,
        method: m.method.clone(),
        headers: values(&m.headers)?,
        query: values(&m.query_params)?,
        from_sites: m.from.as_ref().map(|f| f.sites.clone()).unwrap_or_default(),
        from_labels: m
            .from
            .as_ref()
            .map(|f| f.labels.clone().into_iter().collect())
            .unwrap_or_default(),
    })
}

fn rule(r: &RouteRule) -> Result<Rule, String> {
    let matches = r
        .matches
        .iter()
        .map(compile_match)
        .collect::<Result<Vec<_>, _>>()?;
    let filter = |kind: &str| r.filters.iter().find(|f| f.kind == kind);
    let action = if let Some(x) = filter("FixedResponse").and_then(|f| f.fixed_response.as_ref()) {
        Action::Fixed(core::FixedResponse {
            status: x.status_code,
            body: x.body.clone(),
            content_type: x.content_type.clone(),
        })
    } else if let Some(x) = filter("RequestRedirect").and_then(|f| f.request_redirect.as_ref()) {
        Action::Redirect(core::Redirect {
            scheme: x.scheme.clone(),
            hostname: x.hostname.clone(),
            port: x.port,
            path: x.path.as_ref().map(path_rewrite),
            status: x.status_code,
        })
    } else {
        Action::Forward(
            r.backend_refs
                .iter()
                .map(|b| Backend {
                    subset: b.subset.clone(),
                    site: b.site.clone(),
                    weight: b.weight,
                })
                .collect(),
        )
    };
    let rewrite = filter("URLRewrite").and_then(|f| f.url_rewrite.as_ref());
    Ok(Rule {
        name: r.name.clone(),
        matches,
        action,
        request_headers: edits(
            filter("RequestHeaderModifier").and_then(|f| f.request_header_modifier.as_ref()),
        ),
        response_headers: edits(
            filter("ResponseHeaderModifier").and_then(|f| f.response_header_modifier.as_ref()),
        ),
        rewrite_host: rewrite.and_then(|u| u.hostname.clone()),
        rewrite_path: rewrite.and_then(|u| u.path.as_ref()).map(path_rewrite),
        mirror: filter("RequestMirror")
            .and_then(|f| f.request_mirror.as_ref())
            .map(|m| core::Mirror {
                backend: Backend {
                    subset: m.backend_ref.subset.clone(),
                    site: m.backend_ref.site.clone(),
                    weight: 1,
                },
                percent: m.percent,
            }),
    })
}

/// What routing decided for one request, owned (the request is then
/// read and forwarded without holding the route).
#[derive(Debug, Default)]
pub struct Routed {
    /// The rule's name (or `rules[i]`), for metrics and logs.
    pub rule: String,
    /// The backend, when the rule named one.
    pub backend: Option<Backend>,
    /// Request header edits.
    pub request_headers: HeaderEdits,
    /// Response header edits.
    pub response_headers: HeaderEdits,
    /// The new authority, if rewritten.
    pub host: Option<String>,
    /// The new path and query, if rewritten.
    pub path_and_query: Option<String>,
    /// Where a copy of this request goes, if it is mirrored.
    pub mirror: Option<Backend>,
}

/// The outcome of routing one request.
pub enum Outcome {
    /// No rule matched (or the service has no route): route as usual.
    Unrouted,
    /// The rule answers the request itself.
    Answer(Response<Full<Bytes>>),
    /// Forward, as decided.
    Forward(Routed),
}

/// Runs the route for a request's head. `labels` are the calling site's;
/// `rand` two numbers in `[0, 1)` (backend, mirror).
pub fn decide(
    route: &CompiledRoute,
    head: &hyper::http::request::Parts,
    source_site: &str,
    labels: &[(&str, &str)],
    rand: (f64, f64),
) -> Outcome {
    let headers = header_pairs(head);
    let view = request_view(head, &headers, source_site, labels);
    let Some(d) = route.route.decide(&view, rand.0) else {
        return Outcome::Unrouted;
    };
    let rule = if d.rule.name.is_empty() {
        format!("rules[{}]", d.index)
    } else {
        d.rule.name.clone()
    };
    let host = authority(head);
    match &d.rule.action {
        Action::Fixed(x) => {
            metrics::counter!("causeway_http_route_total", "route" => route.name.clone(), "rule" => rule, "action" => "fixed").increment(1);
            let mut resp = Response::new(Full::new(Bytes::from(x.body.clone())));
            *resp.status_mut() =
                StatusCode::from_u16(x.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if let Ok(v) = HeaderValue::from_str(&x.content_type) {
                resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
            }
            edit_headers(resp.headers_mut(), &d.rule.response_headers);
            Outcome::Answer(resp)
        }
        Action::Redirect(r) => {
            metrics::counter!("causeway_http_route_total", "route" => route.name.clone(), "rule" => rule, "action" => "redirect").increment(1);
            let (host_only, port) = split_host_port(&host);
            let location =
                redirect_location(r, d.matched, "http", host_only, port, view.path, view.query);
            let mut resp = Response::new(Full::new(Bytes::new()));
            *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND);
            if let Ok(v) = HeaderValue::from_str(&location) {
                resp.headers_mut().insert(hyper::header::LOCATION, v);
            }
            edit_headers(resp.headers_mut(), &d.rule.response_headers);
            Outcome::Answer(resp)
        }
        Action::Forward(_) => {
            metrics::counter!("causeway_http_route_total", "route" => route.name.clone(), "rule" => rule.clone(), "action" => "forward").increment(1);
            Outcome::Forward(Routed {
                rule,
                backend: d.backend.cloned(),
                request_headers: d.rule.request_headers.clone(),
                response_headers: d.rule.response_headers.clone(),
                host: d.rule.rewrite_host.clone(),
                path_and_query: d
                    .rule
                    .rewrite_path
                    .as_ref()
                    .map(|p| rewrite_path(p, d.matched, view.path, view.query)),
                mirror: d
                    .rule
                    .mirror
                    .as_ref()
                    .filter(|m| mirrored(m, rand.1))
                    .map(|m| m.backend.clone()),
            })
        }
    }
}

/// The headers of `head` whose values are text, in order.
pub(crate) fn header_pairs(head: &hyper::http::request::Parts) -> Vec<(&str, &str)> {
    head.headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)))
        .collect()
}

/// The core's view of a request head (`headers` from [`header_pairs`]).
pub(crate) fn request_view<'a>(
    head: &'a hyper::http::request::Parts,
    headers: &'a [(&'a str, &'a str)],
    source_site: &'a str,
    source_labels: &'a [(&'a str, &'a str)],
) -> RequestView<'a> {
    RequestView {
        method: head.method.as_str(),
        path: head.uri.path(),
        query: head.uri.query(),
        headers,
        source_site,
        source_labels,
    }
}

/// The request's authority: the URI's (HTTP/2), else its Host header.
fn authority(head: &hyper::http::request::Parts) -> String {
    head.uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            head.headers
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default()
}

fn split_host_port(host: &str) -> (&str, Option<u16>) {
    match host.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (host, None),
        },
        _ => (host, None),
    }
}

impl Routed {
    /// Applies the rule's request edits to the head about to be forwarded.
    pub fn apply(&self, head: &mut hyper::http::request::Parts) {
        edit_headers(&mut head.headers, &self.request_headers);
        if self.host.is_none() && self.path_and_query.is_none() {
            return;
        }
        let mut uri = hyper::http::uri::Parts::from(head.uri.clone());
        if let Some(pq) = &self.path_and_query {
            if let Ok(pq) = pq.parse() {
                uri.path_and_query = Some(pq);
            }
        }
        if let Some(h) = &self.host {
            if let Ok(v) = HeaderValue::from_str(h) {
                head.headers.insert(hyper::header::HOST, v);
            }
            if uri.authority.is_some() {
                if let Ok(a) = h.parse() {
                    uri.authority = Some(a);
                }
            }
        }
        if let Ok(u) = hyper::Uri::from_parts(uri) {
            head.uri = u;
        }
    }
}

/// Applies header edits: remove, then set, then add.
pub fn edit_headers(map: &mut HeaderMap, e: &HeaderEdits) {
    for name in &e.remove {
        map.remove(name.as_str());
    }
    for (k, v) in &e.set {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::from_str(v)) {
            map.insert(k, v);
        }
    }
    for (k, v) in &e.add {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::from_str(v)) {
            map.append(k, v);
        }
    }
}

/// An answer of the gateway's own, as the HTTP path's body type.
pub fn boxed<E>(
    resp: Response<Full<Bytes>>,
) -> Response<http_body_util::combinators::BoxBody<Bytes, E>> {
    resp.map(|b| b.map_err(|never| match never {}).boxed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn compiled(rules: serde_json::Value) -> CompiledRoute {
        let doc = json!({"apiVersion": causeway_api::policy::API_VERSION, "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"service": "web", "rules": rules}});
        let p = causeway_api::policy::parse_document(&doc).unwrap();
        let causeway_api::policy::Spec::HttpRoute(spec) = p.spec else {
            panic!()
        };
        CompiledRoute::compile("web", spec).unwrap()
    }

    fn head(uri: &str, headers: &[(&str, &str)]) -> hyper::http::request::Parts {
        let mut b = hyper::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn a_matching_rule_rewrites_edits_and_picks_its_backend() {
        let r = compiled(json!([
            {"name": "api", "matches": [{"path": {"type": "PathPrefix", "value": "/api"}, "headers": [{"name": "x-user", "value": "alice"}]}],
             "backendRefs": [{"subset": "v2", "site": "west"}],
             "filters": [{"type": "URLRewrite", "urlRewrite": {"hostname": "internal.web", "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}}},
                         {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-route", "value": "api"}], "remove": ["x-debug"]}},
                         {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"add": [{"name": "x-served-by", "value": "v2"}]}}]}
        ]));
        let mut h = head(
            "/api/items?x=1",
            &[("host", "web:80"), ("x-user", "alice"), ("x-debug", "1")],
        );
        let Outcome::Forward(routed) = decide(&r, &h, "east", &[], (0.0, 0.0)) else {
            panic!("forwarded")
        };
        assert_eq!(routed.rule, "api");
        let b = routed.backend.as_ref().unwrap();
        assert_eq!(
            (b.subset.as_deref(), b.site.as_deref()),
            (Some("v2"), Some("west"))
        );
        routed.apply(&mut h);
        assert_eq!(h.uri, "/v2/items?x=1");
        assert_eq!(h.headers["host"], "internal.web");
        assert_eq!(h.headers["x-route"], "api");
        assert!(h.headers.get("x-debug").is_none());
        let mut resp = HeaderMap::new();
        edit_headers(&mut resp, &routed.response_headers);
        assert_eq!(resp["x-served-by"], "v2");

        let other = head("/api/items", &[("x-user", "bob")]);
        assert!(matches!(
            decide(&r, &other, "east", &[], (0.0, 0.0)),
            Outcome::Unrouted
        ));
    }

    #[test]
    fn redirects_and_fixed_responses_answer_at_once() {
        let r = compiled(json!([
            {"matches": [{"path": {"value": "/old"}}],
             "filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https", "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}, "statusCode": 301}}]},
            {"matches": [{"path": {"type": "Exact", "value": "/teapot"}}],
             "filters": [{"type": "FixedResponse", "fixedResponse": {"statusCode": 418, "body": "short and stout"}}]}
        ]));
        let Outcome::Answer(resp) = decide(
            &r,
            &head("/old/a?b=c", &[("host", "shop.example:8080")]),
            "east",
            &[],
            (0.0, 0.0),
        ) else {
            panic!()
        };
        assert_eq!(resp.status(), 301);
        assert_eq!(resp.headers()["location"], "https://shop.example/new/a?b=c");
        let Outcome::Answer(resp) = decide(&r, &head("/teapot", &[]), "east", &[], (0.0, 0.0))
        else {
            panic!()
        };
        assert_eq!(resp.status(), 418);
        assert_eq!(resp.headers()["content-type"], "text/plain");
    }

    #[test]
    fn callers_are_matched_by_site_and_labels_and_mirrors_take_their_share() {
        let r = compiled(json!([
            {"matches": [{"from": {"labels": {"region": "eu"}}}], "backendRefs": [{"subset": "blue"}],
             "filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"subset": "shadow"}, "percent": 25}}]}
        ]));
        let h = head("/", &[]);
        assert!(matches!(
            decide(&r, &h, "east", &[("region", "us")], (0.0, 0.0)),
            Outcome::Unrouted
        ));
        let Outcome::Forward(f) = decide(&r, &h, "east", &[("region", "eu")], (0.0, 0.2)) else {
            panic!()
        };
        assert_eq!(f.backend.unwrap().subset.as_deref(), Some("blue"));
        assert_eq!(f.mirror.unwrap().subset.as_deref(), Some("shadow"));
        let Outcome::Forward(f) = decide(&r, &h, "east", &[("region", "eu")], (0.0, 0.3)) else {
            panic!()
        };
        assert!(f.mirror.is_none(), "30 is above the 25% share");
    }
}
