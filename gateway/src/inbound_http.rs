//! Per-request admission at the exporting gateway. A tunnel stream for an
//! `http`/`http2` service is, to the exporting gateway, normally an L4
//! stream it splices to an endpoint. When the service has request-level
//! policies that the exporter must enforce (request rate limits), the
//! stream is served as HTTP instead: each request the calling gateway sends
//! on it is checked, answered by the gateway when refused (429 with
//! `retry-after`), and otherwise forwarded on the stream's own endpoint
//! connection, its answer streamed back. The caller's gateway cannot skip
//! these checks: they run where the endpoints are.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use causeway_api::model::ServiceKey;
use causeway_gateway_core::ratelimit::retry_after_secs;
use causeway_gateway_core::route::RequestView;
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
    /// The gateway's buckets.
    pub limiter: Arc<RateLimiter>,
    /// The live routing table (policies).
    pub routes: tokio::sync::watch::Receiver<Arc<Routes>>,
}

impl Checks {
    /// The gateway's answer when the request may not pass.
    fn refusal(&self, head: &hyper::http::request::Parts) -> Option<Response<Body>> {
        let routes = self.routes.borrow().clone();
        let headers: Vec<(&str, &str)> = head
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)))
            .collect();
        let view = RequestView {
            method: head.method.as_str(),
            path: head.uri.path(),
            query: head.uri.query(),
            headers: &headers,
            source_site: &self.caller,
            source_labels: &[],
        };
        let limited = self
            .limiter
            .check(&routes, &self.service, &self.caller, Admit::Request(&view))
            .err()?;
        let secs = retry_after_secs(limited.retry_ms);
        let body = format!(
            "rate limit {:?} of {} reached; retry in {secs} s\n",
            limited.limit, self.service
        );
        let resp = Response::builder()
            .status(StatusCode::TOO_MANY_REQUESTS)
            .header("retry-after", secs.to_string())
            .header("x-causeway-error", "rate-limited")
            .header("x-causeway-limit", limited.limit)
            .body(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed())
            .expect("static response");
        Some(resp)
    }
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
            if let Some(refused) = checks.refusal(&head) {
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
