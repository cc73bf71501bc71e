//! Per-request admission at the exporting gateway. A tunnel stream for an
//! `http`/`http2` service is, to the exporting gateway, normally an L4
//! stream it splices to an endpoint. When the service has request-level
//! policies that the exporter must enforce (request rate limits, request
//! authentication, authorization rules on request properties), the stream
//! is served as HTTP instead: each request the calling gateway sends on it
//! is checked, answered by the gateway when refused (429 with
//! `retry-after`, 401, 403 — each with `x-causeway-error` and a reason),
//! and otherwise forwarded on the stream's own endpoint connection, its
//! answer streamed back. The caller's gateway cannot skip
//! these checks: they run where the endpoints are.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use causeway_api::model::ServiceKey;
use causeway_gateway_core::jwt;
use causeway_gateway_core::ratelimit::retry_after_secs;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::admission::{Admit, RateLimiter};
use crate::routes::Routes;

type Body = BoxBody<Bytes, hyper::Error>;

/// What one stream's requests are checked against.
pub struct Checks {
    /// The service.
    pub service: ServiceKey,
    /// The calling site.
    pub caller: String,
    /// The calling gateway's SPIFFE ID.
    pub caller_id: String,
    /// The gateway's buckets.
    pub limiter: Arc<RateLimiter>,
    /// The gateway's JWKS cache.
    pub keys: Arc<crate::jwks::KeySets>,
    /// The live routing table (policies).
    pub routes: tokio::sync::watch::Receiver<Arc<Routes>>,
}

/// A gateway answer for a refused request.
fn refusal(status: StatusCode, error: &'static str, reason: &str) -> Response<Body> {
    let mut b = Response::builder()
        .status(status)
        .header("x-causeway-error", error);
    // The reason header holds what fits a header value; the body has it all.
    let short: String = reason
        .chars()
        .filter(|c| (' '..='~').contains(c))
        .take(256)
        .collect();
    b = b.header("x-causeway-reason", short);
    b.body(
        Full::new(Bytes::from(format!("{reason}\n")))
            .map_err(|e| match e {})
            .boxed(),
    )
    .expect("static response")
}

impl Checks {
    /// The gateway's answer when the request may not pass: over a rate
    /// limit (429), a bad or missing token (401), no allow rule (403).
    async fn refusal(&self, head: &hyper::http::request::Parts) -> Option<Response<Body>> {
        let routes = self.routes.borrow().clone();
        let svc = routes.services.get(&self.service)?;
        let policy = &svc.policy;
        let headers = crate::httproute::header_pairs(head);
        let view = crate::httproute::request_view(head, &headers, &self.caller, &[]);
        if let Err(limited) =
            self.limiter
                .check(&routes, &self.service, &self.caller, Admit::Request(&view))
        {
            let secs = retry_after_secs(limited.retry_ms);
            let mut resp = refusal(
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                &format!(
                    "rate limit {:?} of {} reached; retry in {secs} s",
                    limited.limit, self.service
                ),
            );
            let h = resp.headers_mut();
            h.insert("retry-after", secs.into());
            if let Ok(v) = hyper::header::HeaderValue::from_str(&limited.limit) {
                h.insert("x-causeway-limit", v);
            }
            return Some(resp);
        }
        let token = match &policy.authn {
            None => None,
            Some(authn) => match self.authenticate(authn, &head.headers).await {
                Ok(t) => t,
                Err(why) => {
                    let mut resp = refusal(StatusCode::UNAUTHORIZED, "unauthenticated", &why);
                    resp.headers_mut().insert(
                        "www-authenticate",
                        hyper::header::HeaderValue::from_static("Bearer error=\"invalid_token\""),
                    );
                    return Some(resp);
                }
            },
        };
        if let Some(authz) = policy.authz.as_ref().filter(|a| a.has_request_conditions()) {
            let allowed = authz
                .allow
                .iter()
                .any(|r| rule_allows(r, &self.caller, &self.caller_id, head, token.as_ref()));
            if !allowed {
                metrics::counter!("causeway_authz_denied_total", "service" => self.service.to_string()).increment(1);
                return Some(refusal(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    &format!(
                        "no allow rule of the AuthorizationPolicy for {} matches this request (site {}, {} {}{})",
                        self.service,
                        self.caller,
                        head.method,
                        head.uri.path(),
                        if token.is_some() { ", with a valid token" } else { ", no token" }
                    ),
                ));
            }
        }
        None
    }

    /// The request's verified token, `None` when it has none (and none is
    /// required), or why it is refused.
    async fn authenticate(
        &self,
        authn: &causeway_api::policy::RequestAuthnSpec,
        headers: &hyper::HeaderMap,
    ) -> Result<Option<jwt::Token>, String> {
        let outcome = |result: &'static str| {
            metrics::counter!("causeway_authn_total", "service" => self.service.to_string(), "result" => result).increment(1);
        };
        // The first configured header that is present carries the token.
        let found = authn.jwt_rules.iter().find_map(|r| {
            let v = headers.get(r.from_header.as_str())?.to_str().ok()?;
            let t = if r.from_header == "authorization" {
                let (scheme, rest) = v.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then_some(rest.trim())?
            } else {
                v.trim()
            };
            Some((r.from_header.as_str(), t))
        });
        let Some((header, raw)) = found else {
            if authn.require_token {
                outcome("missing");
                return Err(format!("{} requires a bearer token", self.service));
            }
            outcome("none");
            return Ok(None);
        };
        let refuse = |e: jwt::JwtError| {
            outcome(e.as_str());
            format!("token refused: {e}")
        };
        let token = jwt::parse(raw).map_err(refuse)?;
        let iss = token
            .claims
            .get("iss")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let Some(rule) = authn
            .jwt_rules
            .iter()
            .find(|r| r.issuer == iss && r.from_header == header)
        else {
            return Err(refuse(jwt::JwtError::Issuer(
                iss.chars().take(128).collect(),
            )));
        };
        let keys = self.keys.keys(rule, false).await;
        match token.verify(&keys) {
            Ok(()) => {}
            // A key the set lacks: maybe it was rotated in; look again.
            Err(jwt::JwtError::NoKey) => {
                let keys = self.keys.keys(rule, true).await;
                token.verify(&keys).map_err(refuse)?;
            }
            Err(e) => return Err(refuse(e)),
        }
        let now_s = causeway_api::clock::unix_ms() / 1000;
        token
            .check_claims(
                &rule.issuer,
                &rule.audiences,
                now_s,
                u64::from(rule.clock_skew_seconds),
            )
            .map_err(refuse)?;
        outcome("ok");
        Ok(Some(token))
    }
}

/// Whether one allow rule admits the request: the caller, and every
/// request condition the rule sets.
fn rule_allows(
    r: &causeway_api::policy::AuthzRule,
    site: &str,
    identity: &str,
    head: &hyper::http::request::Parts,
    token: Option<&jwt::Token>,
) -> bool {
    let path = head.uri.path();
    r.caller_matches(site, identity)
        && (r.methods.is_empty() || r.methods.iter().any(|m| m == head.method.as_str()))
        && (r.paths.is_empty()
            || r.paths.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => path.starts_with(prefix),
                None => path == p,
            }))
        && r.headers.iter().all(|(name, values)| {
            head.headers
                .get_all(name.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| values.iter().any(|w| w == v))
        })
        && r.claims.iter().all(|(claim, values)| {
            token.is_some_and(|t| {
                t.claim_values(claim)
                    .iter()
                    .any(|v| values.iter().any(|w| w == v))
            })
        })
}

/// The endpoint connection one stream forwards on.
#[derive(Clone)]
enum Upstream {
    /// HTTP/1.1: one request at a time, as the stream's own requests come.
    H1(Arc<tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Incoming>>>),
    /// HTTP/2: shared by the stream's concurrent requests.
    H2(hyper::client::conn::http2::SendRequest<Incoming>),
}

/// Serves `stream` as HTTP (`h2`: HTTP/2, else HTTP/1.1 — the endpoints'
/// protocol, which the calling gateway speaks on the stream), checking
/// each request and forwarding it on `endpoint`. Returns when either side
/// ends.
pub async fn serve(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    endpoint: TcpStream,
    h2: bool,
    checks: Checks,
) {
    let upstream = match handshake(endpoint, h2).await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %e, "endpoint connection for an admitted stream failed");
            return;
        }
    };
    let checks = Arc::new(checks);
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (checks, upstream) = (checks.clone(), upstream.clone());
        async move {
            let (head, body) = req.into_parts();
            if let Some(refused) = checks.refusal(&head).await {
                return Ok::<_, Infallible>(refused);
            }
            let req = Request::from_parts(head, body);
            let sent = match &upstream {
                Upstream::H1(s) => {
                    let mut s = s.lock().await;
                    match s.ready().await {
                        Ok(()) => s.send_request(req).await,
                        Err(e) => Err(e),
                    }
                }
                Upstream::H2(s) => s.clone().send_request(req).await,
            };
            Ok(match sent {
                Ok(resp) => resp.map(|b| b.boxed()),
                Err(e) => Response::builder()
                    .status(StatusCode::BAD_GATEWAY)
                    .header("x-causeway-error", "upstream-reset")
                    .body(
                        Full::new(Bytes::from(format!(
                            "the endpoint connection failed: {e}\n"
                        )))
                        .map_err(|e| match e {})
                        .boxed(),
                    )
                    .expect("static response"),
            })
        }
    });
    let io = TokioIo::new(tokio::io::join(recv, send));
    let served = if h2 {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .max_concurrent_streams(256)
            .serve_connection(io, svc)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .await
    };
    if let Err(e) = served {
        tracing::debug!(error = %e, "admitted HTTP stream ended with an error");
    }
}

async fn handshake(tcp: TcpStream, h2: bool) -> Result<Upstream, hyper::Error> {
    let io = TokioIo::new(tcp);
    if h2 {
        let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Upstream::H2(s))
    } else {
        let (s, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Upstream::H1(Arc::new(tokio::sync::Mutex::new(s))))
    }
}
