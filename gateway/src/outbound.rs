//! Outbound listeners: one per imported service port, on that service's
//! VIP. Each accepted TCP connection becomes one QUIC stream to a site that
//! exports the service, trying sites in failover order.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use causeway_api::model::{ServiceKey, SiteName};
use causeway_gateway_core::header::{OpenRequest, OpenResponse, Status, PREFIX_LEN};
use causeway_gateway_core::traffic::{choose_site, Ejection, Outliers, SiteView, Tiering};
use causeway_gateway_core::{order_sites, Candidate};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::LocalExport;
use crate::pool::Pool;
use crate::routes::Routes;
use crate::splice::splice;

/// How long the caller waits for the remote gateway's status.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Outbound {
    pub local_site: SiteName,
    pub caller_id: String,
    pub pool: Arc<Pool>,
    pub routes: watch::Receiver<Arc<Routes>>,
    pub local_exports: Vec<LocalExport>,
    pub drain: Arc<crate::drain::Drain>,
    /// Passive health per service (only for services with an
    /// OutlierDetection policy).
    pub outliers: std::sync::Mutex<BTreeMap<ServiceKey, Outliers>>,
    /// State of the per-request HTTP path.
    pub http: crate::http::HttpState,
    /// What `/ready` reports (listeners that could not bind).
    pub ready: Arc<crate::Readiness>,
}

/// Why one attempt at one site failed.
#[derive(Debug)]
pub(crate) enum Attempt {
    /// Try the next site.
    Retry(String),
    /// Stop: the answer would be the same everywhere (e.g. forbidden).
    Fatal(String),
}

impl Outbound {
    /// Keeps the set of listeners equal to the routing table's.
    pub async fn run(
        self: Arc<Self>,
        mut routes: watch::Receiver<Arc<Routes>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut running: BTreeMap<SocketAddr, ((ServiceKey, u16), JoinHandle<()>)> =
            BTreeMap::new();
        loop {
            let want = routes.borrow_and_update().listeners();
            running.retain(|addr, (svc, task)| {
                let keep = want.get(addr) == Some(svc) && !task.is_finished();
                if !keep {
                    task.abort();
                }
                keep
            });
            self.ready.keep_unbound(|a| want.contains_key(a));
            for (addr, svc) in want {
                if running.contains_key(&addr) {
                    continue;
                }
                match TcpListener::bind(addr).await {
                    Ok(l) => {
                        self.ready.set_unbound(addr, None);
                        tracing::info!(%addr, service = %svc.0, "outbound listener up");
                        let this = self.clone();
                        let task = tokio::spawn(this.clone().accept_loop(l, svc.0.clone(), svc.1));
                        running.insert(addr, (svc, task));
                    }
                    Err(e) => {
                        metrics::counter!("causeway_outbound_listener_errors_total").increment(1);
                        tracing::error!(%addr, service = %svc.0, error = %e, "cannot bind outbound listener (is another process using this VIP range?); retrying in 2 s");
                        self.ready
                            .set_unbound(addr, Some(format!("{}: {e}", svc.0)));
                    }
                }
            }
            metrics::gauge!("causeway_outbound_listeners").set(running.len() as f64);
            let retry = self.ready.unbound_any();
            tokio::select! {
                r = routes.changed() => if r.is_err() { break },
                _ = stop.changed() => break,
                _ = tokio::time::sleep(Duration::from_secs(2)), if retry => {}
            }
        }
        // Draining: stop accepting; connections already accepted go on.
        for (_, (_, t)) in running {
            t.abort();
        }
        metrics::gauge!("causeway_outbound_listeners").set(0.0);
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener, service: ServiceKey, port: u16) {
        loop {
            match listener.accept().await {
                Ok((tcp, _)) => {
                    let this = self.clone();
                    let service = service.clone();
                    let http = this
                        .routes
                        .borrow()
                        .services
                        .get(&service)
                        .and_then(|s| s.http_ports.get(&port).copied());
                    if let Some(upstream) = http {
                        tokio::spawn(crate::http::serve_connection(
                            this, tcp, service, port, upstream,
                        ));
                    } else {
                        tokio::spawn(async move { this.handle(tcp, service, port).await });
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn handle(&self, tcp: TcpStream, service: ServiceKey, port: u16) {
        let routes = self.routes.borrow().clone();
        if !routes.services.contains_key(&service) {
            metrics::counter!("causeway_outbound_failures_total", "reason" => "unknown_service")
                .increment(1);
            return;
        }
        let order = self.order(&routes, &service);
        let mut tried = Vec::new();
        for site in order {
            let Ok(site) = site.parse::<SiteName>() else {
                continue;
            };
            let attempt = if site == self.local_site {
                self.try_local(&service, port).await.map(Stream::Local)
            } else {
                self.try_remote(&routes, &site, &service, port)
                    .await
                    .map(|(s, r)| Stream::Remote(s, r))
            };
            self.observe(&routes, &service, &site, &attempt);
            match attempt {
                Ok(stream) => {
                    metrics::counter!("causeway_tunnel_streams_total", "direction" => "out", "status" => "opened").increment(1);
                    if !tried.is_empty() {
                        metrics::counter!("causeway_failovers_total").increment(1);
                        tracing::info!(%service, %site, skipped = ?tried, "failed over");
                    }
                    metrics::gauge!("causeway_tunnel_streams_active", "direction" => "out")
                        .increment(1.0);
                    match stream {
                        Stream::Remote(send, recv) => {
                            splice(tcp, send, recv).await;
                        }
                        Stream::Local(local) => {
                            let mut a = tcp;
                            let mut b = local;
                            let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                        }
                    }
                    metrics::gauge!("causeway_tunnel_streams_active", "direction" => "out")
                        .decrement(1.0);
                    return;
                }
                Err(Attempt::Retry(why)) => {
                    tracing::debug!(%service, %site, %why, "site did not take the stream; trying the next");
                    tried.push(format!("{site}: {why}"));
                }
                Err(Attempt::Fatal(why)) => {
                    tracing::info!(%service, %site, %why, "stream refused");
                    tried.push(format!("{site}: {why}"));
                    break;
                }
            }
        }
        metrics::counter!("causeway_outbound_failures_total", "reason" => "no_site").increment(1);
        tracing::warn!(%service, attempts = ?tried, "no site could serve the connection; closing it");
    }

    /// The sites to try for one connection, in order. Without a
    /// FailoverPolicy or TrafficSplit: the local site, then sites with
    /// healthy endpoints by name, then the rest. With one: each next site
    /// as the policy would choose it among those not tried yet (tiers by
    /// order, locality or RTT, spilling below the healthy threshold; split
    /// weights), ejected sites last.
    pub(crate) fn order(&self, routes: &Routes, service: &ServiceKey) -> Vec<String> {
        let Some(svc) = routes.services.get(service) else {
            return Vec::new();
        };
        let now = causeway_api::clock::unix_ms();
        let mut ejected: Vec<String> = match (&svc.policy.outlier, self.outliers.lock()) {
            (Some(_), Ok(o)) => o
                .get(service)
                .map(|o| o.ejected(now).into_iter().map(str::to_string).collect())
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        // A site whose tunnels are all down and waiting for a redial takes
        // no traffic while another can: its first request would only fail
        // over. It comes back once a redial (or the warm-up below) works.
        ejected.extend(
            svc.exporters
                .iter()
                .filter(|(s, _)| *s != self.local_site && self.pool.down(s))
                .map(|(s, _)| s.to_string()),
        );
        if !svc.policy.steers() {
            let candidates: Vec<Candidate<'_>> = svc
                .exporters
                .iter()
                .map(|(s, h)| Candidate {
                    site: s.as_str(),
                    healthy_endpoints: if ejected.iter().any(|e| e == s.as_str()) {
                        0
                    } else {
                        *h
                    },
                })
                .collect();
            return order_sites(self.local_site.as_str(), &candidates)
                .into_iter()
                .map(str::to_string)
                .collect();
        }
        let labels: Vec<Vec<(&str, &str)>> = svc
            .exporters
            .iter()
            .map(|(s, _)| {
                routes
                    .sites
                    .get(s)
                    .map(|r| {
                        r.labels
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.as_str()))
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .collect();
        let views: Vec<SiteView<'_>> = svc
            .exporters
            .iter()
            .zip(&labels)
            .map(|((s, h), l)| SiteView {
                site: s.as_str(),
                healthy: *h,
                total: svc.totals.get(s).copied().unwrap_or(*h).max(*h),
                labels: l,
                rtt_us: if *s == self.local_site {
                    Some(0)
                } else {
                    self.pool.rtt(s).map(|d| d.as_micros() as u64)
                },
                ejected: ejected.iter().any(|e| e == s.as_str()),
            })
            .collect();
        let keys: Vec<&str>;
        let sites: Vec<&str>;
        let (tiering, threshold) = match &svc.policy.failover {
            Some(f) => match f.mode {
                causeway_api::policy::FailoverMode::Ordered => {
                    sites = f.sites.iter().map(String::as_str).collect();
                    (Tiering::Ordered(&sites), f.healthy_threshold)
                }
                causeway_api::policy::FailoverMode::Locality => {
                    keys = f.locality_labels.iter().map(String::as_str).collect();
                    (Tiering::Locality(&keys), f.healthy_threshold)
                }
                causeway_api::policy::FailoverMode::Nearest => {
                    (Tiering::Nearest, f.healthy_threshold)
                }
            },
            None => (Tiering::Ordered(&[]), 0.7),
        };
        let mut order: Vec<&str> = Vec::new();
        while let Some(next) = choose_site(
            self.local_site.as_str(),
            &views,
            &tiering,
            threshold,
            svc.policy.split.as_ref(),
            &order,
            rand::random::<f64>(),
            rand::random::<f64>(),
        ) {
            order.push(next);
        }
        order.into_iter().map(str::to_string).collect()
    }

    /// Every second, publishes what routing decisions rest on and only this
    /// gateway knows: `causeway_peer_rtt_seconds{site}` (QUIC's smoothed
    /// RTT) and `causeway_outlier_ejected{service,site}` (1 while ejected).
    /// `causeway ctl explain --gateway` reads them.
    pub async fn report(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut shown: std::collections::BTreeSet<(String, String)> = Default::default();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
            let routes = self.routes.borrow().clone();
            // Keep a tunnel up to every site exporting something we import.
            let exporters: std::collections::BTreeSet<&SiteName> = routes
                .services
                .values()
                .flat_map(|s| s.exporters.iter().map(|(site, _)| site))
                .filter(|s| **s != self.local_site)
                .collect();
            for site in exporters {
                if let Some(route) = routes.sites.get(site) {
                    self.pool.warm(site, route);
                }
            }
            for site in routes.sites.keys() {
                if let Some(rtt) = self.pool.rtt(site) {
                    metrics::gauge!("causeway_peer_rtt_seconds", "site" => site.to_string())
                        .set(rtt.as_secs_f64());
                }
                if let Some(path) = self.pool.path(site) {
                    let site = site.to_string();
                    metrics::gauge!("causeway_peer_packets_sent", "site" => site.clone())
                        .set(path.sent as f64);
                    metrics::gauge!("causeway_peer_packets_lost", "site" => site.clone())
                        .set(path.lost as f64);
                    metrics::gauge!("causeway_peer_path_mtu_bytes", "site" => site)
                        .set(f64::from(path.mtu));
                }
                let down = if self.pool.down(site) { 1.0 } else { 0.0 };
                metrics::gauge!("causeway_peer_unreachable", "site" => site.to_string()).set(down);
            }
            let now = causeway_api::clock::unix_ms();
            let ejected: std::collections::BTreeSet<(String, String)> = match self.outliers.lock() {
                Ok(all) => all
                    .iter()
                    .flat_map(|(svc, o)| {
                        o.ejected(now)
                            .into_iter()
                            .map(|site| (svc.to_string(), site.to_string()))
                            .collect::<Vec<_>>()
                    })
                    .collect(),
                Err(_) => continue,
            };
            for (svc, site) in shown.difference(&ejected) {
                metrics::gauge!("causeway_outlier_ejected", "service" => svc.clone(), "site" => site.clone()).set(0.0);
            }
            for (svc, site) in &ejected {
                metrics::gauge!("causeway_outlier_ejected", "service" => svc.clone(), "site" => site.clone()).set(1.0);
            }
            shown.extend(ejected);
        }
    }

    /// A connection to a local endpoint of the service (HTTP path).
    pub(crate) async fn connect_local(
        &self,
        service: &ServiceKey,
        port: u16,
    ) -> Result<TcpStream, Attempt> {
        self.try_local(service, port).await
    }

    /// An opened tunnel stream to `site` for the service (HTTP path).
    pub(crate) async fn open_remote(
        &self,
        routes: &Routes,
        site: &SiteName,
        service: &ServiceKey,
        port: u16,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), Attempt> {
        self.try_remote(routes, site, service, port).await
    }

    /// Feeds one HTTP try's result to outlier detection.
    pub(crate) fn observe_http(
        &self,
        routes: &Routes,
        service: &ServiceKey,
        site: &SiteName,
        ok: bool,
    ) {
        let attempt: Result<(), Attempt> = if ok {
            Ok(())
        } else {
            Err(Attempt::Retry(String::new()))
        };
        self.observe_result(routes, service, site, attempt.as_ref().map(|_| ()));
    }

    /// Feeds one attempt's result to outlier detection.
    fn observe(
        &self,
        routes: &Routes,
        service: &ServiceKey,
        site: &SiteName,
        attempt: &Result<Stream, Attempt>,
    ) {
        self.observe_result(routes, service, site, attempt.as_ref().map(|_| ()));
    }

    fn observe_result(
        &self,
        routes: &Routes,
        service: &ServiceKey,
        site: &SiteName,
        attempt: Result<(), &Attempt>,
    ) {
        let Some(params) = routes.services.get(service).and_then(|s| s.policy.outlier) else {
            return;
        };
        let count = routes
            .services
            .get(service)
            .map_or(1, |s| s.exporters.len());
        let Ok(mut all) = self.outliers.lock() else {
            return;
        };
        let o = all.entry(service.clone()).or_default();
        match attempt {
            Ok(_) => o.on_success(site.as_str()),
            Err(Attempt::Fatal(_)) => {}
            Err(Attempt::Retry(_)) => {
                if let Ejection::Ejected(until) = o.on_failure(
                    site.as_str(),
                    count,
                    &params,
                    causeway_api::clock::unix_ms(),
                ) {
                    metrics::counter!("causeway_outlier_ejections_total", "service" => service.to_string(), "site" => site.to_string()).increment(1);
                    tracing::warn!(%service, %site, until_ms = until, "site ejected after consecutive failures");
                }
            }
        }
    }

    async fn try_local(&self, service: &ServiceKey, port: u16) -> Result<TcpStream, Attempt> {
        let Some(export) = self
            .local_exports
            .iter()
            .find(|e| &e.service == service && e.port == port)
        else {
            return Err(Attempt::Retry("not exported on this port here".into()));
        };
        for addr in &export.endpoints {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await
            {
                return Ok(s);
            }
        }
        Err(Attempt::Retry("no local endpoint accepted".into()))
    }

    async fn try_remote(
        &self,
        routes: &Routes,
        site: &SiteName,
        service: &ServiceKey,
        port: u16,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), Attempt> {
        let route = routes
            .sites
            .get(site)
            .ok_or_else(|| Attempt::Retry("site unknown".into()))?;
        // A peer that retired the tunnel (it no longer trusts the
        // certificate this gateway made it with) answers Retired: the
        // stream is asked again once, over a fresh tunnel.
        let mut fresh = false;
        loop {
            let conn = self
                .pool
                .connection(site, route)
                .await
                .map_err(|e| Attempt::Retry(e.to_string()))?;
            let (send, recv, resp) = self.open_on(&conn, service, port).await?;
            metrics::counter!("causeway_tunnel_status_total", "status" => resp.status.as_str())
                .increment(1);
            return match resp.status {
                Status::Opened => Ok((send, recv)),
                Status::Retired if !fresh => {
                    tracing::info!(%site, reason = %resp.message, "peer retired the tunnel; asking again over a fresh one");
                    self.pool.retire(site, &conn);
                    fresh = true;
                    continue;
                }
                s if s.is_retryable() => {
                    Err(Attempt::Retry(format!("{}: {}", s.as_str(), resp.message)))
                }
                s => Err(Attempt::Fatal(format!("{}: {}", s.as_str(), resp.message))),
            };
        }
    }

    /// Opens a stream on `conn`, sends the header and reads the status.
    async fn open_on(
        &self,
        conn: &quinn::Connection,
        service: &ServiceKey,
        port: u16,
    ) -> Result<(quinn::SendStream, quinn::RecvStream, OpenResponse), Attempt> {
        // At the peer's stream cap, open_bi waits for a stream to end.
        let (mut send, mut recv) = match tokio::time::timeout(STATUS_TIMEOUT, conn.open_bi()).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.pool.evict(conn);
                return Err(Attempt::Retry(format!("open stream: {e}")));
            }
            Err(_) => {
                metrics::counter!("causeway_outbound_failures_total", "reason" => "stream_cap")
                    .increment(1);
                return Err(Attempt::Retry(
                    "the peer's concurrent stream cap (quic.max_streams_per_peer) stayed full"
                        .into(),
                ));
            }
        };
        let header = OpenRequest {
            service: service.to_string(),
            port,
            deadline_ms: STATUS_TIMEOUT.as_millis() as u32,
            trace: Vec::new(),
            caller: self.caller_id.clone(),
        };
        send.write_all(&header.encode())
            .await
            .map_err(|e| Attempt::Retry(format!("send header: {e}")))?;
        let resp = tokio::time::timeout(STATUS_TIMEOUT, read_response(&mut recv))
            .await
            .map_err(|_| Attempt::Retry("no status within the deadline".into()))?
            .map_err(Attempt::Retry)?;
        Ok((send, recv, resp))
    }
}

enum Stream {
    Remote(quinn::SendStream, quinn::RecvStream),
    Local(TcpStream),
}

async fn read_response(recv: &mut quinn::RecvStream) -> Result<OpenResponse, String> {
    let mut prefix = [0u8; PREFIX_LEN];
    recv.read_exact(&mut prefix)
        .await
        .map_err(|e| format!("read status: {e}"))?;
    let (status, len) = OpenResponse::decode_prefix(&prefix).map_err(|e| e.to_string())?;
    let mut msg = vec![0u8; len];
    recv.read_exact(&mut msg)
        .await
        .map_err(|e| format!("read status: {e}"))?;
    Ok(OpenResponse {
        status,
        message: String::from_utf8_lossy(&msg).into_owned(),
    })
}
