//! `RequestAuthentication`: which JSON Web Tokens a service's exporting
//! gateways accept — per issuer, its audiences, its key set (a JWKS file on
//! the gateway's host, or an `http://` URL on the site), and the clock skew
//! allowed. A request with an invalid token is refused (401); one without a
//! token passes unless `requireToken` is set or an AuthorizationPolicy
//! asks for claims.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::read::*;
use super::Spec;

/// A `RequestAuthentication`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthnSpec {
    /// The service, in the policy's namespace.
    pub service: String,
    /// The issuers accepted.
    pub jwt_rules: Vec<JwtRule>,
    /// Refuse requests that carry no token.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_token: bool,
}

/// One accepted issuer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    /// The `iss` its tokens carry.
    pub issuer: String,
    /// Tokens must name one of these in `aud` (none: any audience).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// An absolute path to a JWKS file on each exporting gateway's host
    /// (re-read when it changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<String>,
    /// An `http://` URL of a JWKS on the site (fetched every
    /// `jwksRefreshSeconds`, and again when a token names a key it lacks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// Seconds between fetches of `jwksUri` (default 300).
    pub jwks_refresh_seconds: u32,
    /// The header the token comes in (default `authorization`, as
    /// `Bearer <token>`; any other header holds the bare token).
    pub from_header: String,
    /// Seconds of clock difference allowed on `exp` and `nbf` (default 60).
    pub clock_skew_seconds: u32,
}

/// The fields a `RequestAuthentication` spec may have.
pub(super) const KEYS: &[&str] = &["service", "jwtRules", "requireToken"];

const RULE_KEYS: &[&str] = &[
    "issuer",
    "audiences",
    "jwksFile",
    "jwksUri",
    "jwksRefreshSeconds",
    "fromHeader",
    "clockSkewSeconds",
];

/// The spec of a `RequestAuthentication` (its `service` already read);
/// problems go to `errs`.
pub(super) fn parse(m: &Map<String, Value>, service: String, errs: &mut Errors) -> Spec {
    let mut jwt_rules = Vec::new();
    match m.get("jwtRules").and_then(Value::as_array) {
        None => errs.push(
            "spec.jwtRules",
            "required: a list of issuers, each with issuer and jwksFile or jwksUri",
        ),
        Some(rules) => {
            if rules.is_empty() || rules.len() > 8 {
                errs.push("spec.jwtRules", "list 1 to 8 issuers");
            }
            for (i, r) in rules.iter().take(8).enumerate() {
                let rp = format!("spec.jwtRules[{i}]");
                let Some(r) = object(Some(r), &rp, RULE_KEYS, errs) else {
                    continue;
                };
                if let Some(rule) = parse_rule(r, &rp, errs) {
                    if jwt_rules.iter().any(|o: &JwtRule| o.issuer == rule.issuer) {
                        errs.push(
                            &format!("{rp}.issuer"),
                            format!("{:?} is listed twice", rule.issuer),
                        );
                    }
                    jwt_rules.push(rule);
                }
            }
        }
    }
    let require_token = match m.get("requireToken") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            errs.push("spec.requireToken", "must be true or false");
            false
        }
    };
    Spec::RequestAuthentication(RequestAuthnSpec {
        service,
        jwt_rules,
        require_token,
    })
}

fn parse_rule(r: &Map<String, Value>, rp: &str, errs: &mut Errors) -> Option<JwtRule> {
    let issuer = string(r, "issuer", rp, errs)?;
    if issuer.is_empty() || issuer.len() > 512 {
        errs.push(&format!("{rp}.issuer"), "1 to 512 characters");
    }
    let audiences = strings(
        r,
        "audiences",
        rp,
        16,
        |a| {
            if a.is_empty() || a.len() > 256 {
                Err("1 to 256 characters".into())
            } else {
                Ok(())
            }
        },
        errs,
    );
    let opt = |key: &str, errs: &mut Errors| match r.get(key) {
        None | Some(Value::Null) => None,
        Some(_) => string(r, key, rp, errs),
    };
    let jwks_file = opt("jwksFile", errs);
    let jwks_uri = opt("jwksUri", errs);
    match (&jwks_file, &jwks_uri) {
        (Some(_), Some(_)) | (None, None) => errs.push(
            rp,
            "set exactly one of jwksFile (a path on the gateway's host) or jwksUri (an http:// URL)",
        ),
        (Some(f), None) if !f.starts_with('/') || f.len() > 1024 => errs.push(
            &format!("{rp}.jwksFile"),
            format!("{f:?} must be an absolute path"),
        ),
        (None, Some(u)) => {
            let ok = u
                .strip_prefix("http://")
                .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
                && u.len() <= 1024
                && !u.contains([' ', '#']);
            if !ok {
                errs.push(
                    &format!("{rp}.jwksUri"),
                    format!(
                        "{u:?} must be an http:// URL on the site (e.g. http://10.0.0.5:8080/jwks.json); \
                         for an https issuer, sync its keys to a jwksFile"
                    ),
                );
            }
        }
        _ => {}
    }
    let jwks_refresh_seconds =
        bounded(r, "jwksRefreshSeconds", rp, 5..=86_400u64, Some(300), errs)? as u32;
    let from_header = match opt("fromHeader", errs) {
        None => "authorization".to_string(),
        Some(h) => {
            let ok = !h.is_empty()
                && h.len() <= 128
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                errs.push(
                    &format!("{rp}.fromHeader"),
                    format!("{h:?} is not a header name"),
                );
            }
            h.to_ascii_lowercase()
        }
    };
    let clock_skew_seconds = bounded(r, "clockSkewSeconds", rp, 0..=600u64, Some(60), errs)? as u32;
    Some(JwtRule {
        issuer,
        audiences,
        jwks_file,
        jwks_uri,
        jwks_refresh_seconds,
        from_header,
        clock_skew_seconds,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::{parse_document, API_VERSION};

    fn doc(spec: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": API_VERSION, "kind": "RequestAuthentication",
               "metadata": {"name": "web", "namespace": "shop"}, "spec": spec})
    }

    #[test]
    fn issuers_parse_with_defaults_and_mistakes_are_named() {
        let p = parse_document(&doc(json!({"service": "web", "requireToken": true, "jwtRules": [
            {"issuer": "https://id.example", "audiences": ["web"], "jwksFile": "/etc/causeway/jwks.json"},
            {"issuer": "https://other", "jwksUri": "http://10.0.0.5:8080/keys", "fromHeader": "X-Token"}
        ]})))
        .unwrap();
        assert_eq!(parse_document(&p.to_document()).unwrap(), p);
        let super::super::Spec::RequestAuthentication(a) = &p.spec else {
            panic!()
        };
        assert_eq!(
            (
                a.jwt_rules[0].clock_skew_seconds,
                a.jwt_rules[0].from_header.as_str(),
                a.jwt_rules[1].from_header.as_str()
            ),
            (60, "authorization", "x-token")
        );
        let errs = parse_document(&doc(json!({"service": "web", "jwtRules": [
            {"issuer": "a", "jwksFile": "relative.json", "clockSkewSeconds": 9999},
            {"issuer": "b", "jwksUri": "https://id.example/keys"},
            {"issuer": "c"},
            {"issuer": "b", "jwksFile": "/k", "jwksUri": "http://h/k"}
        ]})))
        .unwrap_err()
        .join("\n");
        for want in [
            "spec.jwtRules[0].jwksFile: \"relative.json\" must be an absolute path",
            "spec.jwtRules[0].clockSkewSeconds: 9999 is not an integer from 0 to 600",
            "spec.jwtRules[1].jwksUri: \"https://id.example/keys\" must be an http:// URL",
            "spec.jwtRules[2]: set exactly one of jwksFile",
            "spec.jwtRules[3]: set exactly one of jwksFile",
            "spec.jwtRules[3].issuer: \"b\" is listed twice",
        ] {
            assert!(errs.contains(want), "missing {want:?} in:\n{errs}");
        }
    }
}
