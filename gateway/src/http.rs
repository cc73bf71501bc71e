//! Per-request HTTP for services exported with protocol `http` or `http2`:
//! the outbound listener speaks HTTP/1.1 and HTTP/2 (hyper) to callers, and
//! each request is routed on its own — site choice with tiers and splits,
//! fault injection, circuit breaking, timeouts and retries within a budget
//! — then sent over a tunnel stream (or a connection to a local
//! endpoint) in the endpoints' protocol: HTTP/1.1 for `http`, HTTP/2
//! without TLS (prior knowledge, as gRPC servers expect) for `http2`. The
//! exporting gateway needs nothing new: to it the stream is an ordinary L4
//! stream to an endpoint.
//!
//! Request bodies are buffered (up to 1 MiB) so that a retry can resend
//! them; responses stream through. Upstream connections are kept for reuse
//! (see `Upstreams`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use causeway_api::model::{Protocol, ServiceKey, SiteName};
use causeway_api::policy::RetryOn;
use causeway_gateway_core::traffic::{breaker, faults, InFlight, RetryBudget};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::access::note;
use crate::forward::Forward;
use crate::routes::{Routes, ServicePolicy};
use crate::steer::Tried;
use causeway_api::sync::LockExt;
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;

/// Largest request body buffered for retries.
pub const MAX_BODY: usize = 1024 * 1024;
/// Default time for one request when no TimeoutPolicy says otherwise.
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The body of the HTTP path's answers.
pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

/// The HTTP path: what forwarding shares, and this path's own state.
pub struct HttpForward {
    /// Routing, steering and dialing.
    pub fwd: Arc<Forward>,
    /// Retry budgets, in-flight counts and kept upstream connections.
    pub state: HttpState,
}

/// Per-service state of the HTTP path.
#[derive(Default)]
pub struct HttpState {
    budgets: Mutex<BTreeMap<ServiceKey, RetryBudget>>,
    inflight: Mutex<BTreeMap<(ServiceKey, String), InFlight>>,
    upstreams: Arc<Upstreams>,
    /// Mirrored copies in flight.
    mirrors: std::sync::atomic::AtomicUsize,
}

/// Idle HTTP/1.1 connections kept per site, service and port.
const MAX_IDLE: usize = 16;
/// An upstream connection unused this long is closed: servers close idle
/// keep-alive connections too, and a request must not race that; and an
/// idle connection holds a stream that a draining gateway waits for.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where an upstream connection leads: site, service, port, whether it
/// speaks HTTP/2, the subset its endpoint belongs to, and the exporter's
/// admission epoch when it was opened (see
/// `ServicePolicy::admission_epoch`).
type UpstreamKey = (SiteName, ServiceKey, u16, bool, Option<String>, u64);

/// A connection to a service's endpoints (over a tunnel stream, or to a
/// local endpoint) that can carry another request.
enum Upstream {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Upstream {
    fn is_closed(&self) -> bool {
        match self {
            Upstream::H1(s) => s.is_closed(),
            Upstream::H2(s) => s.is_closed(),
        }
    }
}

/// Upstream connections of the HTTP path, kept for reuse instead of a new
/// tunnel stream (and a new connection to an endpoint) per request:
/// HTTP/1.1 connections while idle, at most [`MAX_IDLE`] per key and none
/// older than [`IDLE_TIMEOUT`]; one HTTP/2 connection per key, shared by
/// concurrent requests while it stays open. A connection whose far end
/// closed (the endpoint, its gateway, the tunnel) is dropped, and a request
/// a reused connection could not send goes out on another one.
#[derive(Default)]
struct Upstreams {
    idle: Mutex<BTreeMap<UpstreamKey, Vec<Idle>>>,
    /// A task closes expired idle connections while any are kept.
    sweeping: std::sync::atomic::AtomicBool,
}

/// An upstream connection kept for reuse: since when, and the tunnel
/// that carries it (`stable_id`; none to a local endpoint).
struct Idle {
    up: Upstream,
    since: Instant,
    tunnel: Option<usize>,
}

impl Idle {
    fn usable(&self, now: Instant) -> bool {
        !self.up.is_closed() && now.duration_since(self.since) <= IDLE_TIMEOUT
    }
}

impl Upstreams {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<UpstreamKey, Vec<Idle>>> {
        self.idle.locked()
    }

    /// A live connection for `key`, the most recently used first, with its
    /// tunnel. One whose tunnel `retired` says was retired (its gateway is
    /// draining, or no longer trusted) is dropped, not reused: closing it
    /// ends its stream, so the far gateway's drain is not held up by it.
    fn take(
        &self,
        key: &UpstreamKey,
        retired: impl Fn(usize) -> bool,
    ) -> Option<(Upstream, Option<usize>)> {
        let mut all = self.lock();
        let kept = all.get_mut(key)?;
        let now = Instant::now();
        let mut found = None;
        while let Some(idle) = kept.pop() {
            if !idle.usable(now) || idle.tunnel.is_some_and(&retired) {
                continue;
            }
            let tunnel = idle.tunnel;
            found = Some(match idle.up {
                // Shared: it stays in the pool.
                Upstream::H2(s) => {
                    kept.push(Idle {
                        up: Upstream::H2(s.clone()),
                        since: now,
                        tunnel,
                    });
                    (Upstream::H2(s), tunnel)
                }
                h1 => (h1, tunnel),
            });
            break;
        }
        if kept.is_empty() {
            all.remove(key);
        }
        found
    }

    /// Keeps `up` (over `tunnel`) for the next request to `key`.
    fn put(self: &Arc<Self>, key: UpstreamKey, up: Upstream, tunnel: Option<usize>) {
        let mut all = self.lock();
        let kept = all.entry(key).or_default();
        let now = Instant::now();
        kept.retain(|i| i.usable(now));
        if let Upstream::H2(_) = up {
            kept.retain(|i| !matches!(i.up, Upstream::H2(_)));
        }
        if kept.len() < MAX_IDLE {
            kept.push(Idle {
                up,
                since: now,
                tunnel,
            });
        }
        drop(all);
        self.sweep_soon();
    }

    /// Starts the sweeper unless it runs: once a second it drops (and so
    /// closes) idle connections past [`IDLE_TIMEOUT`], until none are kept.
    fn sweep_soon(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(pool) = pool.upgrade() else { return };
                let mut all = pool.lock();
                let now = Instant::now();
                all.retain(|_, kept| {
                    kept.retain(|i| i.usable(now));
                    !kept.is_empty()
                });
                if all.is_empty() {
                    pool.sweeping.store(false, Ordering::Release);
                    return;
                }
            }
        });
    }

    /// Sends `req` over `up`; an HTTP/1.1 connection goes back to the pool
    /// once its response has been read to the end (if it is still open).
    /// On failure, the request comes back when it was never sent.
    async fn send(
        self: &Arc<Self>,
        key: &UpstreamKey,
        up: Upstream,
        tunnel: Option<usize>,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, (hyper::Error, Option<Request<Full<Bytes>>>)> {
        let sent = match up {
            Upstream::H1(mut s) => {
                let sent = s.try_send_request(req).await;
                if sent.is_ok() {
                    let (pool, key) = (self.clone(), key.clone());
                    tokio::spawn(async move {
                        // Ready again = the response was read to its end
                        // and the connection stays open.
                        if s.ready().await.is_ok() {
                            pool.put(key, Upstream::H1(s), tunnel);
                        }
                    });
                }
                sent
            }
            Upstream::H2(mut s) => s.try_send_request(req).await,
        };
        sent.map_err(|mut e| {
            let unsent = e.take_message();
            (e.into_error(), unsent)
        })
    }
}

/// An answer of the gateway's own: `why` as the body, `reason` in
/// `x-causeway-error`.
pub(crate) fn full(status: StatusCode, why: &str, reason: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{why}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(reason) {
        r.headers_mut().insert("x-causeway-error", v);
    }
    r
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Why one try failed, for the retry decision.
enum TryError {
    /// The request never reached an endpoint (safe to retry any method).
    Connect(String),
    /// The connection broke after the request was sent.
    Reset(String),
    /// The per-try timeout passed.
    Timeout,
    /// The site's rate limit refused the connection.
    Limited(String),
}

/// Counts one request in flight to a site until dropped.
struct InFlightGuard<'a> {
    state: &'a HttpState,
    key: (ServiceKey, String),
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.state.inflight.locked().get_mut(&self.key) {
            f.requests = f.requests.saturating_sub(1);
        }
    }
}

/// Serves one caller connection (HTTP/1.1 or HTTP/2, detected); requests
/// go to the endpoints in `upstream` (`http` or `http2`). When `drain`
/// begins, the connection ends gracefully: requests in flight finish, an
/// HTTP/1.1 connection closes after its current answer (`Connection:
/// close`) and an HTTP/2 one gets a GOAWAY, so callers move to another
/// gateway without a failed request.
pub async fn serve_connection(
    out: Arc<HttpForward>,
    tcp: TcpStream,
    service: ServiceKey,
    port: u16,
    upstream: Protocol,
    drain: &crate::drain::Drain,
) {
    // HTTP/2 writes a response as several frames; without this the later
    // ones wait for the client's delayed ACK (Nagle).
    let _ = tcp.set_nodelay(true);
    let limits = out.fwd.limits;
    // Requests the client cancels before their answer (HTTP/2 RST_STREAM,
    // or a dropped connection): past MAX_CANCELLED on one connection it is
    // ended (GOAWAY), so a rapid-reset flood cannot keep the gateway
    // starting work it never finishes.
    let cancels = Arc::new(Cancels::default());
    let client: Arc<str> = tcp
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default()
        .into();
    let svc = {
        let cancels = cancels.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let out = out.clone();
            let service = service.clone();
            let client = client.clone();
            let guard = CancelGuard {
                cancels: cancels.clone(),
                done: false,
            };
            async move {
                let mut guard = guard;
                let resp = proxy(&out, req, &service, port, upstream, &client).await;
                guard.done = true;
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let builder = server_builder(&limits);
    let conn = builder.serve_connection(TokioIo::new(tcp), svc);
    tokio::pin!(conn);
    let mut shutting = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            _ = cancels.too_many.notified(), if !shutting => {
                shutting = true;
                metrics::counter!("causeway_http_connections_cut_total", "why" => "cancels").increment(1);
                tracing::warn!(cancelled = MAX_CANCELLED, "client cancelled too many requests on one connection (rapid reset?); ending it");
                conn.as_mut().graceful_shutdown();
            }
            _ = drain.begun(), if !shutting => {
                shutting = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The HTTP server settings for callers (outbound listeners and the
/// ingress): HTTP/1.1 and HTTP/2 detected, a header-read timeout against
/// slowloris (hence the timers), and HTTP/2 bounds on streams, header size
/// and resets.
pub(crate) fn server_builder(
    limits: &crate::config::Limits,
) -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.http_header_timeout);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024)
        .max_pending_accept_reset_streams(64)
        .max_local_error_reset_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

/// Requests one connection may cancel before it is ended.
pub const MAX_CANCELLED: usize = 1000;

/// Cancelled requests on one connection.
#[derive(Default)]
struct Cancels {
    count: std::sync::atomic::AtomicUsize,
    too_many: tokio::sync::Notify,
}

/// Counts its request as cancelled when dropped before the answer.
struct CancelGuard {
    cancels: Arc<Cancels>,
    done: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.done {
            let n = self
                .cancels
                .count
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            if n == MAX_CANCELLED {
                self.cancels.too_many.notify_one();
            }
        }
    }
}

/// What records one request: its access log entry and its span.
struct Seen {
    log: Option<crate::access::Pending>,
    span: Option<crate::trace::Span>,
}

/// One request through the HTTP path to `service` port `port`, its
/// endpoints speaking `upstream`; `client` names the caller in logs.
pub(crate) async fn proxy(
    out: &Arc<HttpForward>,
    req: Request<Incoming>,
    service: &ServiceKey,
    port: u16,
    upstream: Protocol,
    client: &str,
) -> Response<Body> {
    let start = Instant::now();
    let mut log = out.fwd.access.begin("outbound", "http");
    note(&mut log, |e| {
        e.service = service.to_string();
        e.source_site = out.fwd.steer.local_site.to_string();
        e.source = client.to_string();
        e.method = req.method().to_string();
        e.path = req.uri().path().to_string();
        e.trace_id = crate::access::trace_id(
            req.headers()
                .get("traceparent")
                .and_then(|v| v.to_str().ok()),
        );
    });
    let span = out.fwd.tracing.start_span(
        "causeway.outbound",
        SpanKind::Client,
        req.headers().get("traceparent").map(|v| v.as_bytes()),
        vec![
            KeyValue::new("causeway.service", service.to_string()),
            KeyValue::new("network.protocol.name", "http"),
            KeyValue::new("http.request.method", req.method().to_string()),
            KeyValue::new("url.path", req.uri().path().to_string()),
        ],
    );
    let mut seen = Seen { log, span };
    let resp = route(out, req, service, port, upstream, start, &mut seen).await;
    let Seen { mut log, mut span } = seen;
    if let Some(s) = &mut span {
        let status = resp.status();
        s.set([KeyValue::new(
            "http.response.status_code",
            i64::from(status.as_u16()),
        )]);
        if let Some(why) = resp.headers().get("x-causeway-error") {
            s.error(why.to_str().unwrap_or("error").to_string());
        } else if status.is_server_error() {
            s.error(status.to_string());
        }
    }
    note(&mut log, |e| {
        e.status = resp.status().as_u16();
        // The gateway's own answers say why; an endpoint's answer is "ok"
        // whatever its status.
        if let Some(why) = resp.headers().get("x-causeway-error") {
            e.outcome = why.to_str().unwrap_or("error").to_string();
        }
        e.bytes_out = hyper::body::Body::size_hint(resp.body())
            .exact()
            .unwrap_or(0);
    });
    let code = resp.status().as_u16().to_string();
    metrics::counter!("causeway_http_requests_total", "service" => service.to_string(), "code" => code)
        .increment(1);
    metrics::histogram!("causeway_http_request_duration_seconds", "service" => service.to_string())
        .record(start.elapsed().as_secs_f64());
    resp
}

async fn route(
    out: &Arc<HttpForward>,
    req: Request<Incoming>,
    service: &ServiceKey,
    port: u16,
    upstream: Protocol,
    start: Instant,
    seen: &mut Seen,
) -> Response<Body> {
    let Seen { log, span } = seen;
    let routes = out.fwd.routes.borrow().clone();
    let policy = routes
        .services
        .get(service)
        .map(|s| s.policy.clone())
        .unwrap_or_default();
    // The service's HTTPRoute first: a rule may answer the request itself,
    // and it picks the backend (subset, site) the request goes to.
    let (req, routed) = match &policy.route {
        None => (req, None),
        Some(route) => match apply_route(out, &routes, route, req) {
            Err(answer) => return *answer,
            Ok(r) => r,
        },
    };
    // Faults next: they stand for a sick upstream.
    if let Some(aborted) = inject_fault(&policy, service).await {
        return aborted;
    }
    let (mut parts, body) = match read_body(req, out.fwd.limits.http_body_timeout).await {
        Ok(r) => r,
        Err(refused) => return refused,
    };
    note(log, |e| e.bytes_in = body.len() as u64);
    let backend = routed.as_ref().and_then(|r| r.backend.clone());
    if let Some(r) = &routed {
        r.apply(&mut parts);
        note(log, |e| e.route_rule.clone_from(&r.rule));
        if let Some(m) = &r.mirror {
            mirror(
                out,
                &routes,
                service,
                port,
                upstream,
                m,
                &parts,
                body.clone(),
            );
        }
    }
    let (deadline, per_try) = deadlines(&policy, start);
    let retries = policy.retry.as_ref().map_or(0, |r| r.attempts);
    note_request(out, &policy, service);

    let mut order = out.fwd.steer.order(&routes, service);
    if let Some(b) = &backend {
        order = restrict(&routes, service, order, b);
        if order.is_empty() {
            return full(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("no available site has {} of {service}", describe(b)),
                "no-backend",
            );
        }
    }
    let subset = backend.as_ref().and_then(|b| b.subset.as_deref());
    let mut resp: Response<Body> = 'tries: {
        let mut tried: Vec<String> = Vec::new();
        let mut last: Option<Response<Body>> = None;
        let mut tries = 0u32;
        // The last try never reached an endpoint: the next site is
        // failover, as for an L4 connection, not a retry (no attempt, no
        // budget).
        let mut failing_over = false;
        for site in order {
            if tries > retries && !failing_over {
                break;
            }
            let Ok(site) = site.parse::<SiteName>() else {
                continue;
            };
            // A retry: allowed by the policy's conditions (checked when the
            // last try was judged) and by the budget.
            if tries > 0 && !failing_over && !retry_allowed(out, service) {
                break;
            }
            if !failing_over {
                tries += 1;
            }
            failing_over = false;
            let _guard = match admit(out, &policy, service, &site) {
                Ok(g) => g,
                Err(which) => {
                    last = Some(full(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!("circuit breaker: {which} reached for {service} at site {site}"),
                        "circuit-open",
                    ));
                    tried.push(site.to_string());
                    continue;
                }
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            let req = match rebuild(&parts, body.clone(), upstream, service) {
                Ok(mut r) => {
                    // The endpoint continues this gateway's span.
                    if let Some(s) = span.as_ref() {
                        if let Ok(v) = hyper::header::HeaderValue::from_str(&s.traceparent()) {
                            r.headers_mut().insert("traceparent", v);
                        }
                    }
                    r
                }
                Err(e) => {
                    return full(
                        StatusCode::BAD_REQUEST,
                        &format!("the request cannot be forwarded: {e} (check the Host header)"),
                        "bad-request",
                    )
                }
            };
            let budget_for_try = per_try.map_or(remaining, |t| t.min(remaining));
            let target = Target {
                site: &site,
                service,
                port,
                upstream,
                subset,
            };
            let result =
                tokio::time::timeout(budget_for_try, send_once(out, &routes, &target, req))
                    .await
                    .unwrap_or(Err(TryError::Timeout));
            let verdict = judge(result, &policy, &parts.method, &mut tried, &site);
            let outcome = if verdict.served {
                Tried::Served
            } else {
                Tried::Failed
            };
            out.fwd.steer.observe(&routes, service, &site, outcome);
            note(log, |e| {
                e.destination_site = site.to_string();
                e.retries = tries.saturating_sub(1);
                e.failover_reason = tried.join("; ");
            });
            crate::trace::set(span, || {
                vec![
                    KeyValue::new("causeway.destination_site", site.to_string()),
                    KeyValue::new("causeway.attempts", i64::from(tries)),
                    KeyValue::new("causeway.failover", tried.join("; ")),
                ]
            });
            match verdict.next {
                Next::Answer(resp) => break 'tries resp,
                Next::Retry(resp) => last = Some(resp),
                Next::FailOver(resp) => {
                    last = Some(resp);
                    failing_over = true;
                }
                Next::Stop(resp) => {
                    last = Some(resp);
                    break;
                }
            }
        }
        if Instant::now() >= deadline && last.is_none() {
            break 'tries full(
                StatusCode::GATEWAY_TIMEOUT,
                "request timeout (TimeoutPolicy)",
                "timeout",
            );
        }
        last.unwrap_or_else(|| {
            full(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("no site exports {service} or can take the request"),
                "no-upstream",
            )
        })
    };
    if let Some(r) = &routed {
        crate::httproute::edit_headers(resp.headers_mut(), &r.response_headers);
    }
    resp
}

/// A request back from routing with what was decided, or the rule's own
/// answer.
type RouteResult =
    Result<(Request<Incoming>, Option<crate::httproute::Routed>), Box<Response<Body>>>;

/// Runs the service's route on the request's head: the request back with
/// what was decided, or the rule's own answer.
fn apply_route(
    out: &HttpForward,
    routes: &Routes,
    route: &crate::httproute::CompiledRoute,
    req: Request<Incoming>,
) -> RouteResult {
    use crate::httproute::{boxed, decide, Outcome};
    let (head, incoming) = req.into_parts();
    let local = &out.fwd.steer.local_site;
    let labels: Vec<(&str, &str)> = routes
        .sites
        .get(local)
        .map(|s| {
            s.labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect()
        })
        .unwrap_or_default();
    let rand = (rand::random::<f64>(), rand::random::<f64>());
    let routed = match decide(route, &head, local.as_str(), &labels, rand) {
        Outcome::Answer(resp) => return Err(Box::new(boxed(resp))),
        Outcome::Unrouted => None,
        Outcome::Forward(f) => Some(f),
    };
    Ok((Request::from_parts(head, incoming), routed))
}

/// `subset "v2"`, `site "west"` or both, for messages.
fn describe(b: &causeway_gateway_core::route::Backend) -> String {
    match (&b.subset, &b.site) {
        (Some(s), Some(site)) => format!("subset {s:?} at site {site:?}"),
        (Some(s), None) => format!("subset {s:?}"),
        (None, Some(site)) => format!("site {site:?}"),
        (None, None) => "any endpoint".into(),
    }
}

/// The sites of `order` that can serve `backend`: its site only, if it
/// names one; with a subset, the sites exporting that subset — those with
/// healthy endpoints of it first, each group in `order`'s order.
fn restrict(
    routes: &Routes,
    service: &ServiceKey,
    order: Vec<String>,
    backend: &causeway_gateway_core::route::Backend,
) -> Vec<String> {
    let subsets = routes.services.get(service).map(|s| &s.subsets);
    let subset_health = |site: &str| -> Option<u32> {
        let subset = backend.subset.as_deref()?;
        let site: SiteName = site.parse().ok()?;
        subsets?
            .get(&site)?
            .iter()
            .find(|(n, _)| n == subset)
            .map(|(_, h)| *h)
    };
    let eligible: Vec<String> = order
        .into_iter()
        .filter(|s| backend.site.as_deref().is_none_or(|want| want == s))
        .filter(|s| backend.subset.is_none() || subset_health(s).is_some())
        .collect();
    let (healthy, rest): (Vec<String>, Vec<String>) = eligible
        .into_iter()
        .partition(|s| backend.subset.is_none() || subset_health(s).unwrap_or(0) > 0);
    healthy.into_iter().chain(rest).collect()
}

/// Sends a copy of the request to `backend`, fire and forget: its answer
/// is read and dropped, it counts in no budget, breaker or outlier
/// state, and the original never waits for it. Copies in flight are
/// bounded; past the bound a copy is skipped (counted).
#[allow(clippy::too_many_arguments)]
fn mirror(
    out: &Arc<HttpForward>,
    routes: &Arc<Routes>,
    service: &ServiceKey,
    port: u16,
    upstream: Protocol,
    backend: &causeway_gateway_core::route::Backend,
    parts: &hyper::http::request::Parts,
    body: Bytes,
) {
    use std::sync::atomic::Ordering;
    let service_label = service.to_string();
    if out.state.mirrors.fetch_add(1, Ordering::Relaxed) >= MAX_MIRRORS {
        out.state.mirrors.fetch_sub(1, Ordering::Relaxed);
        metrics::counter!("causeway_http_mirrored_total", "service" => service_label, "result" => "skipped").increment(1);
        return;
    }
    let order = restrict(
        routes,
        service,
        out.fwd.steer.order(routes, service),
        backend,
    );
    let Some(site) = order.first().and_then(|s| s.parse::<SiteName>().ok()) else {
        out.state.mirrors.fetch_sub(1, Ordering::Relaxed);
        metrics::counter!("causeway_http_mirrored_total", "service" => service_label, "result" => "no_backend").increment(1);
        return;
    };
    let Ok(req) = rebuild(parts, body, upstream, service) else {
        out.state.mirrors.fetch_sub(1, Ordering::Relaxed);
        return;
    };
    let (out, routes, service, subset) = (
        out.clone(),
        routes.clone(),
        service.clone(),
        backend.subset.clone(),
    );
    tokio::spawn(async move {
        let target = Target {
            site: &site,
            service: &service,
            port,
            upstream,
            subset: subset.as_deref(),
        };
        let sent = tokio::time::timeout(MIRROR_TIMEOUT, async {
            let resp = send_once(&out, &routes, &target, req).await?;
            // Read the answer so the connection can carry the next request.
            let _ = resp.into_body().collect().await;
            Ok::<_, TryError>(())
        })
        .await;
        let result = match sent {
            Ok(Ok(())) => "sent",
            Ok(Err(_)) => "failed",
            Err(_) => "timeout",
        };
        metrics::counter!("causeway_http_mirrored_total", "service" => service_label, "result" => result).increment(1);
        out.state.mirrors.fetch_sub(1, Ordering::Relaxed);
    });
}

/// Most mirrored copies in flight at once.
const MAX_MIRRORS: usize = 1024;
/// A mirrored copy gets this long.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// Applies the service's FaultInjection policy: maybe a delay, then maybe
/// the abort answer.
async fn inject_fault(policy: &ServicePolicy, service: &ServiceKey) -> Option<Response<Body>> {
    let f = policy.fault.as_ref()?;
    let decided = faults(
        f.delay.as_ref().map(|d| (d.percent, d.ms)),
        f.abort.as_ref().map(|a| (a.percent, a.status)),
        rand::random::<f64>(),
        rand::random::<f64>(),
    );
    if let Some(ms) = decided.delay_ms {
        metrics::counter!("causeway_http_faults_total", "service" => service.to_string(), "fault" => "delay").increment(1);
        tokio::time::sleep(Duration::from_millis(u64::from(ms))).await;
    }
    let status = decided.abort_status?;
    metrics::counter!("causeway_http_faults_total", "service" => service.to_string(), "fault" => "abort").increment(1);
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    Some(full(
        status,
        "fault injected by FaultInjection policy",
        "fault-injected",
    ))
}

/// The request's head and its whole body (kept for retries), or the
/// answer when the body is unreadable or over [`MAX_BODY`].
async fn read_body(
    req: Request<Incoming>,
    within: Duration,
) -> Result<(hyper::http::request::Parts, Bytes), Response<Body>> {
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(within, Limited::new(body, MAX_BODY).collect()).await {
        Ok(Ok(b)) => Ok((parts, b.to_bytes())),
        Ok(Err(e)) => Err(full(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request body not readable or over {MAX_BODY} bytes: {e}"),
            "body-too-large",
        )),
        Err(_) => {
            metrics::counter!("causeway_http_body_timeouts_total").increment(1);
            Err(full(
                StatusCode::REQUEST_TIMEOUT,
                &format!("the request body did not arrive within {within:?}"),
                "body-timeout",
            ))
        }
    }
}

/// When the whole request must be done, and how long one try may take.
fn deadlines(policy: &ServicePolicy, start: Instant) -> (Instant, Option<Duration>) {
    let request_timeout = policy
        .timeout
        .as_ref()
        .map_or(DEFAULT_REQUEST_TIMEOUT, |t| {
            Duration::from_millis(u64::from(t.request_ms))
        });
    let per_try = policy
        .timeout
        .as_ref()
        .and_then(|t| t.per_try_ms)
        .map(|ms| Duration::from_millis(u64::from(ms)));
    (start + request_timeout, per_try)
}

/// Counts a request in the service's retry budget.
fn note_request(out: &HttpForward, policy: &ServicePolicy, service: &ServiceKey) {
    let Some(r) = &policy.retry else {
        return;
    };
    out.state
        .budgets
        .locked()
        .entry(service.clone())
        .or_insert_with(|| RetryBudget::new(r.budget.ratio, r.budget.min_per_second))
        .on_request(causeway_api::clock::unix_ms());
}

/// Whether the service's retry budget allows one more retry now.
fn retry_allowed(out: &HttpForward, service: &ServiceKey) -> bool {
    let ok = out
        .state
        .budgets
        .locked()
        .get_mut(service)
        .is_some_and(|b| b.try_retry(causeway_api::clock::unix_ms()));
    let result = if ok { "sent" } else { "over_budget" };
    metrics::counter!("causeway_http_retries_total", "service" => service.to_string(), "result" => result).increment(1);
    ok
}

/// Lets a try at `site` in (counted as in flight until the guard drops), or
/// names the limit when the service's circuit breaker for that site is open.
fn admit<'a>(
    out: &'a HttpForward,
    policy: &ServicePolicy,
    service: &ServiceKey,
    site: &SiteName,
) -> Result<InFlightGuard<'a>, &'static str> {
    let key = (service.clone(), site.to_string());
    let mut m = out.state.inflight.locked();
    let f = m.entry(key.clone()).or_default();
    if let Some(which) = policy.breaker.as_ref().and_then(|l| breaker(l, f)) {
        metrics::counter!("causeway_http_circuit_open_total", "service" => service.to_string(), "site" => site.to_string(), "limit" => which).increment(1);
        return Err(which);
    }
    f.requests += 1;
    Ok(InFlightGuard {
        state: &out.state,
        key,
    })
}

/// What to do after one try.
enum Next {
    /// Give the caller this answer.
    Answer(Response<Body>),
    /// Retry at the next site, if the retry policy and budget allow.
    Retry(Response<Body>),
    /// The try never reached an endpoint: the next site, as failover.
    FailOver(Response<Body>),
    /// Stop trying; this is the answer.
    Stop(Response<Body>),
}

/// One try judged: whether the site served it (for outlier detection), and
/// what comes next under the retry policy.
struct Verdict {
    served: bool,
    next: Next,
}

fn judge(
    result: Result<Response<Incoming>, TryError>,
    policy: &ServicePolicy,
    method: &Method,
    tried: &mut Vec<String>,
    site: &SiteName,
) -> Verdict {
    let retryable = |on: RetryOn| policy.retry.as_ref().is_some_and(|r| r.on.contains(&on));
    let failed = |next| Verdict {
        served: false,
        next,
    };
    match result {
        Ok(resp) => {
            let s = resp.status();
            let gateway_error = matches!(s.as_u16(), 502..=504);
            let again = idempotent(method)
                && ((s.is_server_error() && retryable(RetryOn::ServerError))
                    || (gateway_error && retryable(RetryOn::GatewayError)));
            let mut resp = resp.map(|b| b.boxed());
            strip_hop_by_hop(resp.headers_mut());
            let next = if again {
                tried.push(format!("{site}: {s}"));
                Next::Retry(resp)
            } else {
                Next::Answer(resp)
            };
            Verdict {
                served: !s.is_server_error(),
                next,
            }
        }
        Err(TryError::Connect(why)) => {
            tried.push(format!("{site}: {why}"));
            let resp = full(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("no site could take the request: {}", tried.join("; ")),
                "no-upstream",
            );
            // Never reached an endpoint: always safe to try the next site
            // when the policy retries connect failures, and when there is
            // no retry policy at all (as L4 does). Each site is tried once,
            // so this ends with the order.
            if policy.retry.is_some() && !retryable(RetryOn::ConnectFailure) {
                failed(Next::Stop(resp))
            } else {
                failed(Next::FailOver(resp))
            }
        }
        Err(TryError::Reset(why)) => {
            tried.push(format!("{site}: {why}"));
            let resp = full(
                StatusCode::BAD_GATEWAY,
                &format!("the upstream connection failed: {why}"),
                "upstream-reset",
            );
            if idempotent(method) && retryable(RetryOn::Reset) {
                failed(Next::Retry(resp))
            } else {
                failed(Next::Stop(resp))
            }
        }
        Err(TryError::Limited(why)) => {
            tried.push(format!("{site}: {why}"));
            let mut resp = full(
                StatusCode::TOO_MANY_REQUESTS,
                &format!("the service's rate limit refused a new connection: {why}"),
                "rate-limited",
            );
            resp.headers_mut()
                .insert("retry-after", hyper::header::HeaderValue::from_static("1"));
            // Shedding load: no retry, no other site.
            failed(Next::Stop(resp))
        }
        Err(TryError::Timeout) => {
            tried.push(format!("{site}: timed out"));
            let resp = full(
                StatusCode::GATEWAY_TIMEOUT,
                "the upstream did not answer in time (TimeoutPolicy)",
                "timeout",
            );
            if idempotent(method) && retryable(RetryOn::GatewayError) {
                failed(Next::Retry(resp))
            } else {
                failed(Next::Stop(resp))
            }
        }
    }
}

/// A copy of the request for one try: HTTP/1.1 with a Host header, or
/// HTTP/2 with the authority in the URI (and no connection-specific
/// headers, which HTTP/2 forbids).
/// `service` names the authority when the caller gave none (HTTP/1.0).
fn rebuild(
    parts: &hyper::http::request::Parts,
    body: Bytes,
    upstream: Protocol,
    service: &ServiceKey,
) -> Result<Request<Full<Bytes>>, hyper::http::Error> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            parts
                .headers
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| {
            format!(
                "{}.{}.svc.clusterset.local",
                service.name(),
                service.namespace()
            )
        });
    let h2 = upstream == Protocol::Http2;
    let uri = if h2 {
        format!("http://{authority}{path}")
    } else {
        path.to_string()
    };
    let mut b = Request::builder()
        .method(parts.method.clone())
        .uri(uri)
        .version(if h2 {
            hyper::Version::HTTP_2
        } else {
            hyper::Version::HTTP_11
        });
    let hop = hop_by_hop(&parts.headers);
    for (k, v) in &parts.headers {
        if hop(k) || (h2 && k == hyper::header::HOST) {
            continue;
        }
        b = b.header(k, v);
    }
    if !h2 && !parts.headers.contains_key(hyper::header::HOST) {
        b = b.header(hyper::header::HOST, authority.as_str());
    }
    b.body(Full::new(body))
}

/// Whether a header belongs to one connection only and must not be
/// forwarded: the hop-by-hop set (RFC 9110 §7.6.1) and every header the
/// message's own `Connection` header names (so `Connection: close,
/// x-secret` does not pass `x-secret` on).
fn hop_by_hop(headers: &hyper::HeaderMap) -> impl Fn(&hyper::header::HeaderName) -> bool {
    let named: Vec<String> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    move |k| {
        matches!(
            k.as_str(),
            "connection"
                | "keep-alive"
                | "proxy-connection"
                | "proxy-authenticate"
                | "proxy-authorization"
                | "te"
                | "trailer"
                | "transfer-encoding"
                | "upgrade"
        ) || named.iter().any(|n| n == k.as_str())
    }
}

/// Removes the hop-by-hop headers from a message about to be forwarded.
fn strip_hop_by_hop(headers: &mut hyper::HeaderMap) {
    let hop = hop_by_hop(headers);
    let drop: Vec<hyper::header::HeaderName> = headers.keys().filter(|k| hop(k)).cloned().collect();
    for k in drop {
        headers.remove(&k);
    }
}

/// Where one try goes.
struct Target<'a> {
    site: &'a SiteName,
    service: &'a ServiceKey,
    port: u16,
    upstream: Protocol,
    /// Endpoints of this subset only.
    subset: Option<&'a str>,
}

async fn send_once(
    out: &HttpForward,
    routes: &Routes,
    target: &Target<'_>,
    req: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, TryError> {
    let Target {
        site,
        service,
        port,
        upstream,
        subset,
    } = *target;
    let h2 = upstream == Protocol::Http2;
    let epoch = routes
        .services
        .get(service)
        .map_or(0, |s| s.policy.admission_epoch());
    let key = (
        site.clone(),
        service.clone(),
        port,
        h2,
        subset.map(str::to_string),
        epoch,
    );
    let pool = &out.state.upstreams;
    let mut req = req;
    let tunnels = &out.fwd.dial.pool;
    while let Some((up, tunnel)) = pool.take(&key, |id| tunnels.is_retired(id)) {
        match pool.send(&key, up, tunnel, req).await {
            Ok(resp) => {
                metrics::counter!("causeway_http_upstream_connections_total", "use" => "reused")
                    .increment(1);
                return Ok(resp);
            }
            // Never sent (the connection closed first): the next one.
            Err((_, Some(unsent))) => req = unsent,
            Err((e, None)) => return Err(TryError::Reset(e.to_string())),
        }
    }
    let (up, tunnel) = if *site == out.fwd.steer.local_site {
        let tcp = out
            .fwd
            .dial
            .local(service, port, subset)
            .await
            .map_err(try_error)?;
        (handshake(TokioIo::new(tcp), h2).await?, None)
    } else {
        // The stream carries the trace context of the request that opened
        // it (its traceparent, which this gateway set when tracing).
        let trace = req
            .headers()
            .get("traceparent")
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default();
        let (send, recv, tunnel) = out
            .fwd
            .dial
            .remote(routes, site, service, port, subset, &trace)
            .await
            .map_err(try_error)?;
        (
            handshake(TokioIo::new(tokio::io::join(recv, send)), h2).await?,
            Some(tunnel),
        )
    };
    metrics::counter!("causeway_http_upstream_connections_total", "use" => "new").increment(1);
    if let Upstream::H2(s) = &up {
        pool.put(key.clone(), Upstream::H2(s.clone()), tunnel);
    }
    pool.send(&key, up, tunnel, req)
        .await
        .map_err(|(e, _)| TryError::Reset(e.to_string()))
}

/// A dial that failed, as a try's error.
fn try_error(a: crate::dial::Attempt) -> TryError {
    match a {
        crate::dial::Attempt::Limited(why) => TryError::Limited(why),
        other => TryError::Connect(other.reason().to_string()),
    }
}

/// A new upstream connection over `io`, in the endpoints' protocol.
async fn handshake<T>(io: TokioIo<T>, h2: bool) -> Result<Upstream, TryError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let failed = |e: hyper::Error| TryError::Connect(e.to_string());
    if h2 {
        let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(failed)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
            }
        });
        Ok(Upstream::H2(sender))
    } else {
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(failed)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP connection ended with an error");
            }
        });
        Ok(Upstream::H1(sender))
    }
}

impl ServicePolicy {
    /// Whether the service has per-request behaviour configured.
    pub fn per_request(&self) -> bool {
        self.retry.is_some()
            || self.timeout.is_some()
            || self.breaker.is_some()
            || self.fault.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_the_connection_header_names_are_not_forwarded() {
        let mut h = hyper::HeaderMap::new();
        h.append("connection", "close, X-Secret".parse().unwrap());
        h.append("connection", "x-other".parse().unwrap());
        h.insert("x-secret", "s".parse().unwrap());
        h.insert("x-other", "o".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("proxy-authorization", "p".parse().unwrap());
        h.insert("x-kept", "k".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }

    fn parts(req: Request<()>) -> hyper::http::request::Parts {
        req.into_parts().0
    }

    #[test]
    fn requests_are_rebuilt_for_the_endpoints_protocol() {
        let svc: ServiceKey = "shop/web".parse().unwrap();
        let from_h1 = parts(
            Request::builder()
                .uri("/a?b=1")
                .header("host", "web.example:8080")
                .header("connection", "keep-alive")
                .header("x-keep", "yes")
                .body(())
                .unwrap(),
        );
        let h1 = rebuild(&from_h1, Bytes::new(), Protocol::Http, &svc).unwrap();
        assert_eq!(h1.version(), hyper::Version::HTTP_11);
        assert_eq!(h1.uri(), "/a?b=1");
        assert_eq!(h1.headers()["host"], "web.example:8080");
        assert!(h1.headers().get("connection").is_none());
        assert_eq!(h1.headers()["x-keep"], "yes");

        let h2 = rebuild(&from_h1, Bytes::new(), Protocol::Http2, &svc).unwrap();
        assert_eq!(h2.version(), hyper::Version::HTTP_2);
        assert_eq!(h2.uri(), "http://web.example:8080/a?b=1");
        assert!(
            h2.headers().get("host").is_none(),
            "HTTP/2 carries :authority"
        );
        assert!(h2.headers().get("connection").is_none());

        // No authority at all (HTTP/1.0): the service's mesh name.
        let bare = parts(Request::builder().uri("/x").body(()).unwrap());
        let h2 = rebuild(&bare, Bytes::new(), Protocol::Http2, &svc).unwrap();
        assert_eq!(h2.uri(), "http://web.shop.svc.clusterset.local/x");
        let h1 = rebuild(&bare, Bytes::new(), Protocol::Http, &svc).unwrap();
        assert_eq!(h1.headers()["host"], "web.shop.svc.clusterset.local");

        // A Host header that is no authority is refused, not a panic.
        let bad = parts(
            Request::builder()
                .uri("/x")
                .header("host", "a b")
                .body(())
                .unwrap(),
        );
        assert!(rebuild(&bad, Bytes::new(), Protocol::Http2, &svc).is_err());
    }
}
