//! The accepting side of the tunnels: verify the peer site, read the stream
//! header, connect to a local endpoint, answer with a status, splice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use causeway_api::identity::spiffe_id_of;
use causeway_api::model::SiteName;
use causeway_api::trust::{Peer, TrustStore};
use causeway_gateway_core::header::{OpenResponse, Status};
use rustls::pki_types::{CertificateDer, UnixTime};

use crate::access::note;
use crate::exports::Exports;
use crate::splice::splice;
use causeway_api::sync::LockExt;

/// A peer must send its header within this time after opening a stream.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// An inbound connection and its retired flag.
type InboundConn = (quinn::Connection, Arc<AtomicBool>);

/// The exporting side of the tunnels: accepts streams from peer gateways,
/// checks who calls and what, and connects them to local endpoints.
pub struct Inbound {
    /// The member sites' trust bundles.
    pub store: Arc<TrustStore>,
    /// What this site exports (live).
    pub exports: Arc<Exports>,
    /// Counts streams for graceful shutdown.
    pub drain: Arc<crate::drain::Drain>,
    /// Who may call which export (the `[[allow]]` rules; replaced by a
    /// config reload).
    authorization: std::sync::RwLock<Arc<crate::config::Authorization>>,
    /// How long a peer has to send the stream header.
    pub header_timeout: Duration,
    /// How long a stream may carry nothing before it is closed.
    pub idle_timeout: Duration,
    /// The most streams one peer connection may have open
    /// (`quic.max_streams_per_peer`); granted in steps as they fill.
    pub max_streams: u32,
    /// Access log, spans and this site's name.
    pub observers: crate::forward::Observers,
    /// Live inbound connections per peer site, to tear down on removal,
    /// each with its retired flag (set: it takes no new streams).
    conns: Mutex<HashMap<SiteName, Vec<InboundConn>>>,
    /// The routing table, for AuthorizationPolicy (set once running).
    routes: std::sync::OnceLock<tokio::sync::watch::Receiver<Arc<crate::routes::Routes>>>,
    /// The buckets of the exported services' RateLimits.
    limiter: Arc<crate::admission::RateLimiter>,
    /// The key sets of the exported services' RequestAuthentications.
    keys: Arc<crate::jwks::KeySets>,
    /// How long a spliced HTTP stream lives on once its service needs
    /// per-request checks (`retire_grace_secs`).
    pub retire_grace: Duration,
}

impl Inbound {
    /// Checks streams against `rules` from now on (streams open keep
    /// going).
    pub fn set_authorization(&self, rules: crate::config::Authorization) {
        *self
            .authorization
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(rules);
    }

    /// Follows the catalog's AuthorizationPolicies from now on.
    pub fn set_routes(&self, routes: tokio::sync::watch::Receiver<Arc<crate::routes::Routes>>) {
        let _ = self.routes.set(routes);
    }

    /// An AuthorizationPolicy for the service, if one exists, decides: the
    /// caller's site or its SPIFFE ID must match a rule. `None`: no policy.
    fn policy_allows(
        &self,
        peer: &causeway_api::trust::Peer,
        service: &causeway_api::model::ServiceKey,
        http: bool,
    ) -> Option<bool> {
        let routes = self.routes.get()?.borrow().clone();
        let authz = routes.services.get(service)?.policy.authz.as_ref()?;
        let id = peer.id.to_string();
        // Rules that also look at requests admit an HTTP stream here and
        // are checked in full per request (`inbound_http`); a TCP stream
        // has no requests to check, so such rules never admit it.
        Some(authz.allow.iter().any(|r| {
            r.caller_matches(peer.site.as_str(), &id) && (http || !r.has_request_conditions())
        }))
    }

    /// An inbound side with the default header timeout.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<TrustStore>,
        exports: Arc<Exports>,
        drain: Arc<crate::drain::Drain>,
        authorization: crate::config::Authorization,
        idle_timeout: Duration,
        max_streams: u32,
        observers: crate::forward::Observers,
        retire_grace: Duration,
    ) -> Arc<Self> {
        let mut this =
            Self::with_header_timeout(store, exports, drain, authorization, HEADER_TIMEOUT);
        this.retire_grace = retire_grace;
        this.idle_timeout = idle_timeout;
        this.max_streams = max_streams;
        this.observers = observers;
        Arc::new(this)
    }

    /// An inbound side whose peers have `header_timeout` to send a stream's
    /// header.
    pub fn with_header_timeout(
        store: Arc<TrustStore>,
        exports: Arc<Exports>,
        drain: Arc<crate::drain::Drain>,
        authorization: crate::config::Authorization,
        header_timeout: Duration,
    ) -> Self {
        Self {
            max_streams: crate::config::QuicConfig::default().max_streams_per_peer,
            routes: std::sync::OnceLock::new(),
            authorization: std::sync::RwLock::new(Arc::new(authorization)),
            header_timeout,
            idle_timeout: crate::config::Limits::default().idle_timeout,
            observers: crate::forward::Observers::off(),
            store,
            drain,
            exports,
            conns: Mutex::new(HashMap::new()),
            limiter: Arc::default(),
            keys: Arc::default(),
            retire_grace: Duration::from_secs(10),
        }
    }

    /// Accepts connections until the endpoint closes. With `retry`, a
    /// connection attempt from an address not yet validated is answered
    /// with a Retry and nothing else (see `QuicConfig::retry`).
    pub async fn run(self: Arc<Self>, endpoint: quinn::Endpoint, retry: bool) {
        while let Some(incoming) = endpoint.accept().await {
            if retry && !incoming.remote_address_validated() && incoming.may_retry() {
                metrics::counter!("causeway_tunnel_retries_total").increment(1);
                if let Err(e) = incoming.retry() {
                    tracing::debug!(error = %e, "could not send a Retry");
                }
                continue;
            }
            let this = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => this.serve_connection(conn).await,
                    Err(e) => {
                        metrics::counter!("causeway_tunnel_connections_total", "direction" => "in", "result" => "refused").increment(1);
                        tracing::info!(%remote, error = %e, "tunnel handshake failed");
                    }
                }
            });
        }
    }

    /// Tells every connected gateway that this one is draining (the drain
    /// notice, on a unidirectional stream of each connection): a 0.2.0
    /// peer then opens no new stream on it and lets its pooled requests
    /// finish, so the drain ends early and cuts nothing. Older peers allow
    /// no such stream; the attempt gives up after a second.
    pub fn announce_drain(&self) {
        let conns: Vec<quinn::Connection> = self
            .conns
            .locked()
            .values()
            .flatten()
            .map(|(c, _)| c.clone())
            .filter(|c| c.close_reason().is_none())
            .collect();
        for conn in conns {
            tokio::spawn(async move {
                let send = async {
                    let mut s = conn.open_uni().await.map_err(|e| e.to_string())?;
                    s.write_all(&causeway_gateway_core::header::DRAIN_NOTICE)
                        .await
                        .map_err(|e| e.to_string())?;
                    s.finish().map_err(|e| e.to_string())
                };
                match tokio::time::timeout(Duration::from_secs(1), send).await {
                    Ok(Ok(())) => {
                        metrics::counter!("causeway_drain_notices_total", "result" => "sent")
                            .increment(1)
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(remote = %conn.remote_address(), error = %e, "drain notice not sent")
                    }
                    Err(_) => {
                        // A peer before 0.2.0 takes no unidirectional stream.
                        metrics::counter!("causeway_drain_notices_total", "result" => "not_taken")
                            .increment(1)
                    }
                }
            });
        }
    }

    fn identify(&self, conn: &quinn::Connection) -> Option<Peer> {
        let certs = conn
            .peer_identity()?
            .downcast::<Vec<CertificateDer<'static>>>()
            .ok()?;
        let (leaf, rest) = certs.split_first()?;
        // The handshake already verified the chain; this names the site.
        let _ = spiffe_id_of(leaf).ok()?;
        self.store
            .verify(leaf, rest, UnixTime::now(), true, None)
            .ok()
    }

    async fn serve_connection(self: Arc<Self>, conn: quinn::Connection) {
        let Some(peer) = self.identify(&conn) else {
            conn.close(quinn::VarInt::from_u32(3), b"unidentified peer");
            return;
        };
        metrics::counter!("causeway_tunnel_connections_total", "direction" => "in", "result" => "ok").increment(1);
        metrics::gauge!("causeway_tunnel_connections", "direction" => "in").increment(1.0);
        tracing::info!(site = %peer.site, id = %peer.id, remote = %conn.remote_address(), "tunnel accepted");
        let retired = Arc::new(AtomicBool::new(false));
        {
            let mut m = self.conns.locked();
            let v = m.entry(peer.site.clone()).or_default();
            v.retain(|(c, _)| c.close_reason().is_none());
            v.push((conn.clone(), retired.clone()));
        }
        // Streams open on this connection, and how many the peer may open.
        let open = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut limit = crate::tunnel::INITIAL_STREAMS.min(self.max_streams);
        loop {
            match conn.accept_bi().await {
                Ok((send, recv)) => {
                    let now_open = open.fetch_add(1, Ordering::Relaxed) + 1;
                    let next = crate::tunnel::next_stream_limit(now_open, limit, self.max_streams);
                    if next != limit {
                        limit = next;
                        conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(limit));
                    }
                    let this = self.clone();
                    let peer = peer.clone();
                    let retired = retired.clone();
                    let open = open.clone();
                    tokio::spawn(async move {
                        this.serve_stream(peer, &retired, send, recv).await;
                        open.fetch_sub(1, Ordering::Relaxed);
                    });
                }
                Err(e) => {
                    tracing::debug!(site = %peer.site, error = %e, "tunnel closed");
                    break;
                }
            }
        }
        metrics::gauge!("causeway_tunnel_connections", "direction" => "in").decrement(1.0);
    }

    async fn serve_stream(
        &self,
        peer: Peer,
        retired: &AtomicBool,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let mut log = self.observers.access.begin("inbound", "tcp");
        note(&mut log, |e| {
            e.source_site = peer.site.to_string();
            e.source = peer.id.to_string();
            e.destination_site.clone_from(&self.observers.site);
        });
        let req = match tokio::time::timeout(
            self.header_timeout,
            crate::stream::read_request(&mut recv),
        )
        .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                note(&mut log, |e| e.outcome = "bad_request".into());
                refuse(&mut send, Status::BadRequest, &e.to_string()).await;
                return;
            }
            Err(_) => {
                note(&mut log, |e| e.outcome = "header_timeout".into());
                metrics::counter!("causeway_tunnel_streams_total", "direction" => "in", "status" => "header_timeout").increment(1);
                let _ = send.reset(quinn::VarInt::from_u32(4));
                return;
            }
        };
        note(&mut log, |e| e.service = req.service.clone());
        let mut span = self.observers.tracing.start_span(
            "causeway.inbound",
            opentelemetry::trace::SpanKind::Server,
            (!req.trace.is_empty()).then_some(&req.trace[..]),
            vec![
                opentelemetry::KeyValue::new("causeway.service", req.service.clone()),
                opentelemetry::KeyValue::new("causeway.peer.site", peer.site.to_string()),
                opentelemetry::KeyValue::new("causeway.peer.identity", peer.id.to_string()),
            ],
        );
        if retired.load(Ordering::Relaxed) {
            note(&mut log, |e| e.outcome = "retired".into());
            if let Some(s) = &mut span {
                s.error("retired");
            }
            // The peer's certificate no longer chains to its site's bundle:
            // streams in flight finish within the grace, new ones are
            // refused: the caller opens a fresh tunnel and tries again.
            refuse(
                &mut send,
                Status::Retired,
                "this tunnel is retired (its certificate is no longer trusted); open a new one",
            )
            .await;
            return;
        }
        if self.drain.is_draining() {
            note(&mut log, |e| e.outcome = "draining".into());
            if let Some(s) = &mut span {
                s.error("draining");
            }
            refuse(
                &mut send,
                Status::Draining,
                "this gateway is draining; try another site",
            )
            .await;
            return;
        }
        let table = self.exports.current();
        let Some(entry) = table.find(&req.service, req.port) else {
            note(&mut log, |e| e.outcome = "unknown_service".into());
            if let Some(s) = &mut span {
                s.error("unknown_service");
            }
            refuse(
                &mut send,
                Status::UnknownService,
                &format!(
                    "this site does not export {} port {}",
                    req.service, req.port
                ),
            )
            .await;
            return;
        };
        let service = entry.export.service.clone();
        let protocol = entry.export.protocol;
        let endpoints = entry.endpoints.clone();
        drop(table);
        let service = &service;
        // Both must allow: the gateway's own [[allow]] rules and, when one
        // exists, the federation's AuthorizationPolicy for the service.
        let rules = self
            .authorization
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if !rules.allows(&peer.site, service)
            || self.policy_allows(&peer, service, protocol.is_http()) == Some(false)
        {
            tracing::info!(site = %peer.site, service = %req.service, "stream refused by authorization");
            note(&mut log, |e| e.outcome = "forbidden".into());
            if let Some(s) = &mut span {
                s.error("forbidden");
            }
            refuse(
                &mut send,
                Status::Forbidden,
                &format!("site {} may not call {} here", peer.site, req.service),
            )
            .await;
            return;
        }
        // The service's RateLimit: new connections, and whether requests
        // must be checked one by one on this stream.
        let routes = self.routes.get().map(|r| r.borrow().clone());
        let mut check_requests = false;
        if let Some(routes) = &routes {
            use crate::admission::Admit;
            if let Err(l) =
                self.limiter
                    .check(routes, service, peer.site.as_str(), Admit::Connection)
            {
                note(&mut log, |e| e.outcome = "rate_limited".into());
                if let Some(s) = &mut span {
                    s.error("rate_limited");
                }
                refuse(
                    &mut send,
                    Status::RateLimited,
                    &format!(
                        "rate limit {:?} of {} reached; retry in {} ms",
                        l.limit, req.service, l.retry_ms
                    ),
                )
                .await;
                return;
            }
            check_requests = protocol.is_http()
                && routes
                    .services
                    .get(service)
                    .is_some_and(|s| s.policy.checks_requests());
        }
        let subset = (!req.subset.is_empty()).then_some(req.subset.as_str());
        let Some((tcp, _in_flight)) = endpoints.connect_subset(subset).await else {
            note(&mut log, |e| e.outcome = "no_endpoints".into());
            if let Some(s) = &mut span {
                s.error("no_endpoints");
            }
            let what = match subset {
                Some(v) if !endpoints.has_subset(v) => {
                    format!("{} has no endpoint of subset {v:?} here", req.service)
                }
                Some(v) => format!(
                    "no endpoint of {} subset {v:?} accepted a connection",
                    req.service
                ),
                None => format!("no endpoint of {} accepted a connection", req.service),
            };
            refuse(&mut send, Status::NoEndpoints, &what).await;
            return;
        };
        if respond(&mut send, Status::Opened, "").await.is_err() {
            return;
        }
        metrics::counter!("causeway_tunnel_streams_total", "direction" => "in", "status" => "opened").increment(1);
        metrics::gauge!("causeway_tunnel_streams_active", "direction" => "in").increment(1.0);
        let _guard = self.drain.guard();
        tracing::debug!(site = %peer.site, service = %req.service, "stream opened");
        let endpoint_addr = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        note(&mut log, |e| e.endpoint.clone_from(&endpoint_addr));
        if check_requests {
            if let Some(routes) = self.routes.get() {
                let checks = crate::inbound_http::Checks {
                    service: service.clone(),
                    caller: peer.site.to_string(),
                    caller_id: peer.id.to_string(),
                    limiter: self.limiter.clone(),
                    keys: self.keys.clone(),
                    routes: routes.clone(),
                };
                note(&mut log, |e| e.protocol = "http".into());
                let h2 = protocol == causeway_api::model::Protocol::Http2;
                crate::inbound_http::serve(send, recv, tcp, h2, checks).await;
                metrics::gauge!("causeway_tunnel_streams_active", "direction" => "in")
                    .decrement(1.0);
                return;
            }
        }
        let spliced = splice(tcp, send, recv, self.idle_timeout);
        // A spliced HTTP stream sees no requests: when the service starts
        // to need per-request checks, callers move to fresh streams at
        // their next request (their connections are kept per admission
        // epoch), and this one is cut after the grace, so no caller keeps
        // an unchecked path.
        let (to_caller, from_caller) = match self.routes.get() {
            Some(routes) if protocol.is_http() => {
                let mut routes = routes.clone();
                let svc = service.clone();
                let needs_checks = async move {
                    loop {
                        if routes
                            .borrow_and_update()
                            .services
                            .get(&svc)
                            .is_some_and(|s| s.policy.checks_requests())
                        {
                            return;
                        }
                        if routes.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                };
                let grace = self.retire_grace;
                tokio::select! {
                    r = spliced => r,
                    _ = async { needs_checks.await; tokio::time::sleep(grace).await } => {
                        metrics::counter!("causeway_tunnel_streams_cut_total", "why" => "admission").increment(1);
                        tracing::info!(site = %peer.site, %service, "cut a spliced stream: the service now checks requests");
                        (0, 0)
                    }
                }
            }
            _ => spliced.await,
        };
        note(&mut log, |e| {
            e.bytes_in = from_caller;
            e.bytes_out = to_caller;
        });
        crate::trace::set(&mut span, || {
            vec![
                opentelemetry::KeyValue::new("causeway.bytes_in", from_caller as i64),
                opentelemetry::KeyValue::new("causeway.bytes_out", to_caller as i64),
                opentelemetry::KeyValue::new("causeway.endpoint", endpoint_addr),
            ]
        });
        metrics::gauge!("causeway_tunnel_streams_active", "direction" => "in").decrement(1.0);
    }

    /// Retires the connections from `site` that `reject` picks (their
    /// peer's certificate no longer chains to the site's bundle): from now
    /// on they refuse new streams with `Retired`, which makes the caller
    /// open a fresh tunnel, and they close after
    /// `grace`, so streams in flight get that long.
    /// How many.
    pub fn retire_where(
        &self,
        site: &SiteName,
        reject: impl Fn(&quinn::Connection) -> bool,
        reason: &'static [u8],
        grace: Duration,
    ) -> usize {
        let m = self.conns.locked();
        let Some(conns) = m.get(site) else { return 0 };
        let mut retired = 0;
        for (c, flag) in conns {
            if c.close_reason().is_none() && !flag.load(Ordering::Relaxed) && reject(c) {
                flag.store(true, Ordering::Relaxed);
                crate::pool::close_after(c.clone(), grace, reason);
                retired += 1;
            }
        }
        retired
    }

    /// Closes the connections of sites `keep` rejects (removed members).
    pub fn retain(&self, keep: impl Fn(&SiteName) -> bool) {
        let mut m = self.conns.locked();
        m.retain(|site, conns| {
            let k = keep(site);
            if !k {
                for (c, _) in conns.iter() {
                    c.close(quinn::VarInt::from_u32(2), b"site removed");
                }
            }
            k
        });
    }
}

/// Answers a stream with a refusal `status` (why in `msg`) and counts it.
async fn refuse(send: &mut quinn::SendStream, status: Status, msg: &str) {
    metrics::counter!("causeway_tunnel_streams_total", "direction" => "in", "status" => status.as_str()).increment(1);
    let _ = respond(send, status, msg).await;
}

async fn respond(send: &mut quinn::SendStream, status: Status, msg: &str) -> std::io::Result<()> {
    send.write_all(&OpenResponse::new(status, msg).encode())
        .await?;
    if status != Status::Opened {
        let _ = send.finish();
    }
    Ok(())
}
