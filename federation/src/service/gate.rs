//! The gate in front of every RPC: who may send what is decided from the
//! request's head and the connection's client certificate, before a body is
//! read. Raft RPCs are for controller nodes only (an anonymous or site
//! caller cannot make a node buffer a 64 MiB Raft message), and a caller
//! without a certificate may only `Join`, with a small body. The RPC
//! handlers still check their callers themselves; this gate only makes the
//! refusal cheap.

use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;

use super::authz::{classify, Caller};

/// The one RPC open to callers without a certificate.
pub const JOIN_PATH: &str = "/causeway.v1.Federation/Join";
/// The Raft service's RPCs.
const RAFT_PREFIX: &str = "/causeway.v1.Raft/";
/// Largest body an anonymous `Join` may send: a token, a trust bundle of
/// at most 64 KiB, tunnel addresses and a CSR.
pub const MAX_ANONYMOUS_BODY: usize = 128 * 1024;

/// The layer.
#[derive(Clone)]
pub struct GateLayer {
    /// The applied state: which credentials are bound or revoked.
    pub hub: std::sync::Arc<crate::hub::Hub>,
    /// Spans for API calls (Raft between nodes is not traced).
    pub tracing: std::sync::Arc<causeway_api::trace::Tracing>,
}

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gate<S>;
    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            hub: self.hub.clone(),
            tracing: self.tracing.clone(),
        }
    }
}

/// The service.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    hub: std::sync::Arc<crate::hub::Hub>,
    tracing: std::sync::Arc<causeway_api::trace::Tracing>,
}

/// Who is on the other end of the connection, and the SHA-256 of its
/// certificate.
fn connection_caller(req: &http::Request<Body>) -> (Caller, String, u64) {
    let leaf = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.peer_certs())
        .and_then(|certs| certs.first().cloned());
    let Some(leaf) = leaf else {
        return (Caller::Anonymous, String::new(), u64::MAX);
    };
    let fp = causeway_api::identity::fingerprint(&leaf);
    let expires = causeway_api::identity::validity_ms(&leaf).map_or(0, |(_, to)| to);
    match causeway_api::identity::spiffe_id_of(&leaf) {
        Ok(id) => (classify(&id), fp, expires),
        Err(_) => (Caller::Anonymous, fp, expires),
    }
}

/// Largest request message of the federation API (the service's own
/// decoding limit is the same).
pub const MAX_API_MESSAGE: usize = 4 * 1024 * 1024;
/// Largest Raft message between nodes.
pub const MAX_RAFT_MESSAGE: usize = 64 * 1024 * 1024;

/// What the gate decides for a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Pass it on untouched (controller nodes among themselves: tonic's
    /// own decoding limit applies).
    Pass,
    /// Pass it on if its message declares at most this many bytes.
    Bounded(usize),
    /// Refuse it at once.
    Refuse(tonic::Code, &'static str),
}

/// The decision for `path` from `caller` (pure).
pub fn decide(path: &str, caller: &Caller) -> Verdict {
    let node = matches!(caller, Caller::Node(_));
    if node {
        return Verdict::Pass;
    }
    if path.starts_with(RAFT_PREFIX) {
        return if node {
            Verdict::Bounded(MAX_RAFT_MESSAGE)
        } else {
            Verdict::Refuse(
                tonic::Code::PermissionDenied,
                "this Raft RPC needs a controller node (a node certificate from the controller CA)",
            )
        };
    }
    match caller {
        Caller::Anonymous if path == JOIN_PATH => Verdict::Bounded(MAX_ANONYMOUS_BODY),
        Caller::Anonymous => Verdict::Refuse(
            tonic::Code::PermissionDenied,
            "this RPC needs a client certificate; the caller is not authenticated (only Join is open without one)",
        ),
        _ => Verdict::Bounded(MAX_API_MESSAGE),
    }
}

/// Reads the start of a gRPC request body until its first message's
/// 5-byte prefix (flag, length) is in: the frames read, and the declared
/// length (`None` when the body ends first).
async fn first_message_len(body: &mut Body) -> (Vec<bytes::Bytes>, Option<usize>) {
    use http_body_util::BodyExt;
    let mut frames = Vec::new();
    let mut head = Vec::with_capacity(5);
    while head.len() < 5 {
        match body.frame().await {
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    head.extend(data.iter().take(5 - head.len()));
                    frames.push(data);
                }
            }
            _ => return (frames, None),
        }
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    (frames, Some(len))
}

impl<S> tower::Service<http::Request<Body>> for Gate<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        use causeway_api::version;
        // Callers name their protocol in the user agent; one this build no
        // longer works with is told to upgrade. Every answer names ours.
        let protocol = req
            .headers()
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map_or(1, version::protocol_of_user_agent);
        let call = match version::check_peer("this client", protocol) {
            Ok(()) => self.call_traced(req),
            Err(why) => {
                metrics::counter!("causeway_api_gate_refused_total", "code" => "Protocol")
                    .increment(1);
                let resp = Status::failed_precondition(why).into_http();
                Box::pin(async move { Ok(resp) })
            }
        };
        Box::pin(async move {
            let mut r = call.await;
            if let Ok(resp) = &mut r {
                let h = resp.headers_mut();
                h.insert(
                    version::PROTOCOL_HEADER,
                    http::HeaderValue::from(version::PROTOCOL),
                );
                h.insert(
                    version::VERSION_HEADER,
                    http::HeaderValue::from_static(version::VERSION),
                );
            }
            r
        })
    }
}

impl<S> Gate<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    /// Gates one call, in a span of its own unless it is Raft traffic.
    fn call_traced(
        &mut self,
        req: http::Request<Body>,
    ) -> futures::future::BoxFuture<'static, Result<http::Response<Body>, S::Error>> {
        let (caller, sha256, expires_ms) = connection_caller(&req);
        let path = req.uri().path().to_string();
        let verdict = decide(&path, &caller);
        // One span per API call, continuing the caller's traceparent.
        let span = if path.starts_with(RAFT_PREFIX) {
            None
        } else {
            self.tracing.start_span(
                "causeway.rpc",
                opentelemetry::trace::SpanKind::Server,
                req.headers().get("traceparent").map(|v| v.as_bytes()),
                vec![
                    opentelemetry::KeyValue::new("rpc.system", "grpc"),
                    opentelemetry::KeyValue::new("rpc.method", path.clone()),
                    opentelemetry::KeyValue::new("causeway.caller", format!("{caller:?}")),
                ],
            )
        };
        let call = self.call_gated(req, caller, sha256, expires_ms, verdict);
        let Some(mut span) = span else { return call };
        Box::pin(async move {
            use opentelemetry::context::FutureExt;
            let r = call.with_context(span.as_parent()).await;
            if let Ok(resp) = &r {
                // Unary answers carry the status in the headers when they
                // fail; a success's status comes in the trailers (0).
                let code = resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or(0);
                span.set([opentelemetry::KeyValue::new("rpc.grpc.status_code", code)]);
                if code != 0 {
                    let why = resp
                        .headers()
                        .get("grpc-message")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("error")
                        .to_string();
                    span.error(why);
                }
            }
            r
        })
    }

    fn call_gated(
        &mut self,
        req: http::Request<Body>,
        caller: Caller,
        sha256: String,
        expires_ms: u64,
        verdict: Verdict,
    ) -> futures::future::BoxFuture<'static, Result<http::Response<Body>, S::Error>> {
        // The service that was polled ready serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let hub = self.hub.clone();
        Box::pin(async move {
            // TLS checked the certificate's dates at the handshake; a
            // connection may outlive them.
            if expires_ms <= causeway_api::clock::unix_ms() && !matches!(caller, Caller::Node(_)) {
                metrics::counter!("causeway_api_gate_refused_total", "code" => "Expired")
                    .increment(1);
                return Ok(Status::permission_denied(
                    "this RPC needs a current credential: this one has expired (sites renew theirs; admins run `causeway ctl admin renew` before it expires)",
                )
                .into_http());
            }
            // A credential counts only while it is the one issued to its
            // site, and not revoked: a removed site's old credential stays
            // refused after its name is invited again.
            if !super::authz::credential_ok(&hub, &caller, &sha256).await {
                metrics::counter!("causeway_api_gate_refused_total", "code" => "Revoked")
                    .increment(1);
                return Ok(Status::permission_denied(
                    "this RPC needs a current credential: this one was revoked, has expired, was replaced when its site was removed or invited again, or is an admin credential the controllers did not issue (`causeway ctl admin issue`)",
                )
                .into_http());
            }
            let max = match verdict {
                Verdict::Refuse(code, why) => {
                    metrics::counter!("causeway_api_gate_refused_total", "code" => format!("{code:?}"))
                        .increment(1);
                    return Ok(Status::new(code, why).into_http());
                }
                Verdict::Bounded(max) => max,
                Verdict::Pass => return inner.call(req).await,
            };
            // The message's declared length is checked before its body is
            // read: an oversized one is refused without being buffered.
            let (parts, mut body) = req.into_parts();
            let (read, len) = first_message_len(&mut body).await;
            if let Some(len) = len.filter(|l| *l > max) {
                metrics::counter!("causeway_api_gate_refused_total", "code" => "ResourceExhausted")
                    .increment(1);
                return Ok(Status::resource_exhausted(format!(
                    "the request message is {len} bytes; this RPC takes at most {max} from this caller"
                ))
                .into_http());
            }
            let prefix = futures::stream::iter(
                read.into_iter()
                    .map(|b| Ok::<_, Status>(http_body::Frame::data(b))),
            );
            let rest = http_body_util::BodyStream::new(body);
            let body = Body::new(http_body_util::StreamBody::new(futures::StreamExt::chain(
                prefix, rest,
            )));
            inner.call(http::Request::from_parts(parts, body)).await
        })
    }
}

/// Connections a controller serves at once; past it new ones are closed
/// on accept (before any handshake work) and counted.
pub const MAX_CONNECTIONS: usize = 4096;

/// A client connection holding one of the [`MAX_CONNECTIONS`] slots for
/// its life.
pub struct Slotted {
    inner: tokio::net::TcpStream,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Slotted {
    /// Takes a slot for `tcp`, or `None` when all are in use.
    pub fn admit(
        tcp: tokio::net::TcpStream,
        slots: &std::sync::Arc<tokio::sync::Semaphore>,
    ) -> Option<Self> {
        match slots.clone().try_acquire_owned() {
            Ok(slot) => Some(Self {
                inner: tcp,
                _slot: slot,
            }),
            Err(_) => {
                metrics::counter!("causeway_api_connections_refused_total").increment(1);
                None
            }
        }
    }
}

impl tonic::transport::server::Connected for Slotted {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

impl tokio::io::AsyncRead for Slotted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Slotted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raft_is_for_nodes_and_anonymous_callers_may_only_join_small() {
        let site = Caller::Site("east".parse().unwrap());
        let node = Caller::Node(1);
        let raft = "/causeway.v1.Raft/AppendEntries";
        assert_eq!(decide(raft, &node), Verdict::Pass);
        for who in [&Caller::Anonymous, &site, &Caller::Admin("ops".into())] {
            assert!(matches!(
                decide(raft, who),
                Verdict::Refuse(tonic::Code::PermissionDenied, _)
            ));
        }
        assert_eq!(
            decide(JOIN_PATH, &Caller::Anonymous),
            Verdict::Bounded(MAX_ANONYMOUS_BODY)
        );
        assert!(matches!(
            decide("/causeway.v1.Federation/Catalog", &Caller::Anonymous),
            Verdict::Refuse(tonic::Code::PermissionDenied, _)
        ));
        assert_eq!(
            decide("/causeway.v1.Federation/Catalog", &site),
            Verdict::Bounded(MAX_API_MESSAGE)
        );
    }
}
