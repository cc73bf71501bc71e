//! Request routing, sans IO: which rule of a service's `HTTPRoute` a
//! request matches (path, method, headers, query parameters, the calling
//! site), and what the rule does with it — send it to a backend (a subset
//! and/or a site, chosen by weight), rewrite it, redirect it, or answer
//! it. The caller brings the request's parts and a random number in
//! `[0, 1)`; every function here has one exact answer for its inputs.
//!
//! Rules are tried in order; the first rule with a matching `match` (or
//! with no matches at all) wins. A request no rule matches is routed as
//! if the service had no route.

use regex::Regex;

/// Largest compiled regular expression (bytes of program): a route is
/// data from the federation, so its cost is bounded. Matching is linear
/// in the input with this engine whatever the pattern.
pub const REGEX_SIZE_LIMIT: usize = 64 * 1024;

/// Compiles `pattern` to match a whole value (it is anchored at both
/// ends), within [`REGEX_SIZE_LIMIT`].
pub fn whole_regex(pattern: &str) -> Result<Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| e.to_string())
}

/// How a request path is matched.
#[derive(Debug, Clone)]
pub enum PathMatch {
    /// The whole path (without the query) equals this.
    Exact(String),
    /// The path starts with this, ending at a `/` boundary: `/api` matches
    /// `/api`, `/api/` and `/api/v1`, not `/apis`.
    Prefix(String),
    /// The whole path matches this expression.
    Regex(Regex),
}

impl PathMatch {
    /// Whether `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => prefix_matches(p, path),
            PathMatch::Regex(r) => r.is_match(path),
        }
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true; // "/" matches everything
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// How a header or query parameter value is matched.
#[derive(Debug, Clone)]
pub enum ValueMatch {
    /// Equals this.
    Exact(String),
    /// Matches this expression whole.
    Regex(Regex),
    /// Present, with any value.
    Present,
}

impl ValueMatch {
    fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(v) => value == v,
            ValueMatch::Regex(r) => r.is_match(value),
            ValueMatch::Present => true,
        }
    }
}

/// One `match`: every condition set must hold.
#[derive(Debug, Clone, Default)]
pub struct Match {
    /// The path condition.
    pub path: Option<PathMatch>,
    /// The method, upper case.
    pub method: Option<String>,
    /// Header conditions; names lower case.
    pub headers: Vec<(String, ValueMatch)>,
    /// Query parameter conditions; names as written (case matters).
    pub query: Vec<(String, ValueMatch)>,
    /// The calling site is one of these (empty: any).
    pub from_sites: Vec<String>,
    /// The calling site has all these labels (e.g. `region = eu`).
    pub from_labels: Vec<(String, String)>,
}

/// What a match is tried against.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// The method, as sent (upper case).
    pub method: &'a str,
    /// The path, without the query.
    pub path: &'a str,
    /// The raw query (after `?`), if any.
    pub query: Option<&'a str>,
    /// Every header (name lower case, value), in order; a name may repeat.
    pub headers: &'a [(&'a str, &'a str)],
    /// The calling site.
    pub source_site: &'a str,
    /// The calling site's labels.
    pub source_labels: &'a [(&'a str, &'a str)],
}

impl Match {
    /// Whether the request meets every condition.
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        if let Some(p) = &self.path {
            if !p.matches(req.path) {
                return false;
            }
        }
        if let Some(m) = &self.method {
            if m != req.method {
                return false;
            }
        }
        if !self.from_sites.is_empty() && !self.from_sites.iter().any(|s| s == req.source_site) {
            return false;
        }
        for (k, v) in &self.from_labels {
            if !req.source_labels.iter().any(|(lk, lv)| lk == k && lv == v) {
                return false;
            }
        }
        // A repeated header matches when any of its values does.
        for (name, want) in &self.headers {
            let any = req
                .headers
                .iter()
                .filter(|(k, _)| k == name)
                .any(|(_, v)| want.matches(v));
            if !any {
                return false;
            }
        }
        for (name, want) in &self.query {
            let any = query_pairs(req.query.unwrap_or(""))
                .filter(|(k, _)| k == name)
                .any(|(_, v)| want.matches(v));
            if !any {
                return false;
            }
        }
        true
    }
}

/// `k=v` pairs of a query string (`k` alone is an empty value). Values are
/// compared as sent: no percent-decoding, so `a%20b` is not `a b`.
fn query_pairs(q: &str) -> impl Iterator<Item = (&str, &str)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// Where a request goes: a subset, a site, or both; weights among a rule's
/// backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Endpoints of this version only (`None`: any endpoint).
    pub subset: Option<String>,
    /// This site only (`None`: the usual site order).
    pub site: Option<String>,
    /// Relative weight; 0 takes nothing.
    pub weight: u32,
}

/// Header edits, applied in the order remove, set, add.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    /// Replace (or insert) these; names lower case.
    pub set: Vec<(String, String)>,
    /// Append these.
    pub add: Vec<(String, String)>,
    /// Remove these names.
    pub remove: Vec<String>,
}

impl HeaderEdits {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// How a path is rewritten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathRewrite {
    /// The whole path becomes this.
    Full(String),
    /// The part the rule's `PathPrefix` matched becomes this.
    Prefix(String),
}

/// A redirect answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// `http` or `https`; `None` keeps the request's.
    pub scheme: Option<String>,
    /// `None` keeps the request's host.
    pub hostname: Option<String>,
    /// `None` keeps the request's port (none written for the scheme's
    /// default).
    pub port: Option<u16>,
    /// `None` keeps the path.
    pub path: Option<PathRewrite>,
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
}

/// An answer the gateway gives itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedResponse {
    /// The status code.
    pub status: u16,
    /// The body.
    pub body: String,
    /// Its content type.
    pub content_type: String,
}

/// A copy of a share of requests sent elsewhere.
#[derive(Debug, Clone, PartialEq)]
pub struct Mirror {
    /// Where the copies go.
    pub backend: Backend,
    /// Percent of requests copied (0-100).
    pub percent: f64,
}

/// What a rule does with a request it matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Forward to one of these backends, by weight (empty: the service as
    /// usual).
    Forward(Vec<Backend>),
    /// Answer with a redirect.
    Redirect(Redirect),
    /// Answer with this.
    Fixed(FixedResponse),
}

/// One rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Its name (for metrics and logs); may be empty.
    pub name: String,
    /// Any of these (empty: every request).
    pub matches: Vec<Match>,
    /// What it does.
    pub action: Action,
    /// Edits to the request's headers.
    pub request_headers: HeaderEdits,
    /// Edits to the response's headers.
    pub response_headers: HeaderEdits,
    /// A new host (authority) for the request.
    pub rewrite_host: Option<String>,
    /// A new path for the request.
    pub rewrite_path: Option<PathRewrite>,
    /// Copies of some requests.
    pub mirror: Option<Mirror>,
}

/// A service's rules, in order.
#[derive(Debug, Clone, Default)]
pub struct Route {
    /// The rules; the first that matches applies.
    pub rules: Vec<Rule>,
}

/// What routing decided for one request.
#[derive(Debug, Clone, Copy)]
pub struct Decision<'r> {
    /// Index of the rule that matched.
    pub index: usize,
    /// The rule.
    pub rule: &'r Rule,
    /// Which of its matches held (`None`: the rule has none).
    pub matched: Option<&'r Match>,
    /// The backend chosen, for a `Forward` rule with backends.
    pub backend: Option<&'r Backend>,
}

impl Route {
    /// The first rule the request matches, with its backend chosen by
    /// weight using `rand` in `[0, 1)`; `None` when no rule matches.
    pub fn decide<'r>(&'r self, req: &RequestView<'_>, rand: f64) -> Option<Decision<'r>> {
        self.rules.iter().enumerate().find_map(|(index, rule)| {
            let matched = if rule.matches.is_empty() {
                None
            } else {
                Some(rule.matches.iter().find(|m| m.matches(req))?)
            };
            let backend = match &rule.action {
                Action::Forward(b) => pick_weighted(b, rand),
                _ => None,
            };
            Some(Decision {
                index,
                rule,
                matched,
                backend,
            })
        })
    }
}

/// One backend by weight: `rand` in `[0, 1)` falls in the backend whose
/// share of the total it lands in. `None` when every weight is 0.
pub fn pick_weighted(backends: &[Backend], rand: f64) -> Option<&Backend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut point = (rand.clamp(0.0, 1.0) * total as f64) as u64;
    point = point.min(total - 1);
    for b in backends {
        let w = u64::from(b.weight);
        if point < w {
            return Some(b);
        }
        point -= w;
    }
    None
}

/// The request's new path (and query) after `rewrite`, given the match that
/// selected the rule. `ReplacePrefixMatch` replaces the matched prefix; with
/// no `PathPrefix` match it replaces the whole path.
pub fn rewrite_path(
    rewrite: &PathRewrite,
    matched: Option<&Match>,
    path: &str,
    query: Option<&str>,
) -> String {
    let new_path = match rewrite {
        PathRewrite::Full(p) => p.clone(),
        PathRewrite::Prefix(to) => {
            let prefix = match matched.and_then(|m| m.path.as_ref()) {
                Some(PathMatch::Prefix(p)) => p.trim_end_matches('/'),
                _ => path,
            };
            let rest = path.strip_prefix(prefix).unwrap_or("");
            let to = to.trim_end_matches('/');
            match (to.is_empty(), rest.is_empty()) {
                (true, true) => "/".to_string(),
                (true, false) => rest.to_string(),
                (false, _) => format!("{to}{rest}"),
            }
        }
    };
    match query {
        Some(q) => format!("{new_path}?{q}"),
        None => new_path,
    }
}

/// The `Location` of a redirect for a request to `scheme://host[:port]path`.
pub fn redirect_location(
    r: &Redirect,
    matched: Option<&Match>,
    scheme: &str,
    host: &str,
    port: Option<u16>,
    path: &str,
    query: Option<&str>,
) -> String {
    let scheme = r.scheme.as_deref().unwrap_or(scheme);
    let host = r.hostname.as_deref().unwrap_or(host);
    // A new scheme without a new port drops the port (its default).
    let port = r
        .port
        .or(if r.scheme.is_some() { None } else { port })
        .filter(|p| !matches!((scheme, *p), ("http", 80) | ("https", 443)));
    let path_and_query = match &r.path {
        Some(rw) => rewrite_path(rw, matched, path, query),
        None => match query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        },
    };
    match port {
        Some(p) => format!("{scheme}://{host}:{p}{path_and_query}"),
        None => format!("{scheme}://{host}{path_and_query}"),
    }
}

/// Whether a request is mirrored: `rand` in `[0, 1)` under the share.
pub fn mirrored(m: &Mirror, rand: f64) -> bool {
    rand * 100.0 < m.percent
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn req<'a>(
        method: &'a str,
        path: &'a str,
        query: Option<&'a str>,
        headers: &'a [(&'a str, &'a str)],
    ) -> RequestView<'a> {
        RequestView {
            method,
            path,
            query,
            headers,
            source_site: "east",
            source_labels: &[("region", "us")],
        }
    }

    fn backend(subset: &str, weight: u32) -> Backend {
        Backend {
            subset: Some(subset.into()),
            site: None,
            weight,
        }
    }

    fn rule(name: &str, matches: Vec<Match>, action: Action) -> Rule {
        Rule {
            name: name.into(),
            matches,
            action,
            request_headers: HeaderEdits::default(),
            response_headers: HeaderEdits::default(),
            rewrite_host: None,
            rewrite_path: None,
            mirror: None,
        }
    }

    #[test]
    fn path_prefixes_match_on_segment_boundaries() {
        let p = PathMatch::Prefix("/api".into());
        for (path, want) in [
            ("/api", true),
            ("/api/", true),
            ("/api/v1", true),
            ("/apis", false),
            ("/ap", false),
            ("/", false),
        ] {
            assert_eq!(p.matches(path), want, "{path}");
        }
        assert!(PathMatch::Prefix("/api/".into()).matches("/api/v1"));
        assert!(PathMatch::Prefix("/".into()).matches("/anything"));
        assert!(PathMatch::Exact("/a".into()).matches("/a"));
        assert!(!PathMatch::Exact("/a".into()).matches("/a/"));
        let r = PathMatch::Regex(whole_regex("/users/[0-9]+").unwrap());
        assert!(r.matches("/users/42"));
        assert!(!r.matches("/users/42/x"), "anchored at the end");
        assert!(!r.matches("/x/users/42"), "anchored at the start");
    }

    #[test]
    fn every_condition_of_a_match_must_hold() {
        let m = Match {
            path: Some(PathMatch::Prefix("/cart".into())),
            method: Some("POST".into()),
            headers: vec![
                (
                    "x-user".into(),
                    ValueMatch::Regex(whole_regex("alice|bob").unwrap()),
                ),
                ("x-beta".into(), ValueMatch::Present),
            ],
            query: vec![("debug".into(), ValueMatch::Exact("1".into()))],
            from_sites: vec!["east".into(), "west".into()],
            from_labels: vec![("region".into(), "us".into())],
        };
        let h: &[(&str, &str)] = &[("x-user", "carol"), ("x-user", "bob"), ("x-beta", "")];
        assert!(m.matches(&req("POST", "/cart/1", Some("a=2&debug=1"), h)));
        assert!(!m.matches(&req("GET", "/cart/1", Some("debug=1"), h)));
        assert!(!m.matches(&req("POST", "/carts", Some("debug=1"), h)));
        assert!(!m.matches(&req("POST", "/cart", Some("debug=10"), h)));
        assert!(!m.matches(&req("POST", "/cart", None, h)));
        let no_beta: &[(&str, &str)] = &[("x-user", "alice")];
        assert!(!m.matches(&req("POST", "/cart", Some("debug=1"), no_beta)));
        let mut other_site = req("POST", "/cart", Some("debug=1"), h);
        other_site.source_site = "south";
        assert!(!m.matches(&other_site));
        let mut eu = req("POST", "/cart", Some("debug=1"), h);
        eu.source_labels = &[("region", "eu")];
        assert!(!m.matches(&eu));
    }

    #[test]
    fn the_first_matching_rule_applies_and_weights_pick_its_backend() {
        let route = Route {
            rules: vec![
                rule(
                    "beta-users",
                    vec![Match {
                        headers: vec![("x-user".into(), ValueMatch::Exact("alice".into()))],
                        ..Match::default()
                    }],
                    Action::Forward(vec![backend("v2", 1)]),
                ),
                rule(
                    "canary",
                    vec![],
                    Action::Forward(vec![backend("v1", 99), backend("v2", 1)]),
                ),
            ],
        };
        let alice: &[(&str, &str)] = &[("x-user", "alice")];
        let d = route.decide(&req("GET", "/", None, alice), 0.0).unwrap();
        assert_eq!(
            (d.index, d.backend.unwrap().subset.as_deref()),
            (0, Some("v2"))
        );
        let d = route.decide(&req("GET", "/", None, &[]), 0.5).unwrap();
        assert_eq!(
            (d.index, d.backend.unwrap().subset.as_deref()),
            (1, Some("v1"))
        );
        let d = route.decide(&req("GET", "/", None, &[]), 0.995).unwrap();
        assert_eq!(d.backend.unwrap().subset.as_deref(), Some("v2"));
        // Exactly 1% of the unit interval goes to v2.
        let v2 = (0..10_000)
            .filter(|i| {
                let d = route
                    .decide(&req("GET", "/", None, &[]), f64::from(*i) / 10_000.0)
                    .unwrap();
                d.backend.unwrap().subset.as_deref() == Some("v2")
            })
            .count();
        assert_eq!(v2, 100);
        let only = Route {
            rules: vec![rule(
                "r",
                vec![Match {
                    method: Some("DELETE".into()),
                    ..Match::default()
                }],
                Action::Forward(vec![]),
            )],
        };
        assert!(only.decide(&req("GET", "/", None, &[]), 0.1).is_none());
    }

    #[test]
    fn paths_are_rewritten_and_redirects_located() {
        let m = Match {
            path: Some(PathMatch::Prefix("/old".into())),
            ..Match::default()
        };
        let pre = PathRewrite::Prefix("/new".into());
        assert_eq!(
            rewrite_path(&pre, Some(&m), "/old/a", Some("x=1")),
            "/new/a?x=1"
        );
        assert_eq!(rewrite_path(&pre, Some(&m), "/old", None), "/new");
        let to_root = PathRewrite::Prefix("/".into());
        assert_eq!(rewrite_path(&to_root, Some(&m), "/old/a", None), "/a");
        assert_eq!(rewrite_path(&to_root, Some(&m), "/old", None), "/");
        let full = PathRewrite::Full("/static".into());
        assert_eq!(rewrite_path(&full, Some(&m), "/old/a", None), "/static");

        let r = Redirect {
            scheme: Some("https".into()),
            hostname: None,
            port: None,
            path: None,
            status: 301,
        };
        assert_eq!(
            redirect_location(
                &r,
                None,
                "http",
                "shop.example",
                Some(8080),
                "/a",
                Some("q=1")
            ),
            "https://shop.example/a?q=1"
        );
        let r = Redirect {
            scheme: None,
            hostname: Some("new.example".into()),
            port: Some(8443),
            path: Some(pre),
            status: 302,
        };
        assert_eq!(
            redirect_location(&r, Some(&m), "http", "shop.example", None, "/old/x", None),
            "http://new.example:8443/new/x"
        );
    }

    #[test]
    fn expensive_patterns_are_refused() {
        assert!(whole_regex("(a|b").is_err());
        assert!(
            whole_regex("[a-z]{1000}{1000}").is_err(),
            "over the size limit"
        );
    }

    proptest! {
        #[test]
        fn weights_split_the_unit_interval_in_proportion(
            weights in proptest::collection::vec(0u32..1000, 1..8),
            r in 0.0f64..1.0,
        ) {
            let bs: Vec<Backend> = weights.iter().map(|w| backend("s", *w)).collect();
            let total: u32 = weights.iter().sum();
            match pick_weighted(&bs, r) {
                None => prop_assert_eq!(total, 0),
                Some(b) => prop_assert!(b.weight > 0),
            }
        }

        #[test]
        fn matching_never_panics_on_any_request(
            path in "\\PC{0,64}",
            query in proptest::option::of("\\PC{0,64}"),
            value in "\\PC{0,32}",
        ) {
            let m = Match {
                path: Some(PathMatch::Prefix("/a".into())),
                headers: vec![("h".into(), ValueMatch::Regex(whole_regex("[a-z]+").unwrap()))],
                query: vec![("q".into(), ValueMatch::Present)],
                ..Match::default()
            };
            let h = [("h", value.as_str())];
            let _ = m.matches(&req("GET", &path, query.as_deref(), &h));
            let pre = PathRewrite::Prefix("/b".into());
            let out = rewrite_path(&pre, Some(&m), &path, None);
            prop_assert!(out.starts_with("/b"));
        }
    }
}
