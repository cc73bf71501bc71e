//! Outbound listeners: one per imported service port, on that service's
//! VIP. Each accepted connection goes to the HTTP path (per request) when
//! the port is HTTP, else to the L4 path (one tunnel stream per
//! connection); the two are built side by side and never call each other.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use causeway_api::model::ServiceKey;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::forward::Forward;
use crate::http::HttpForward;
use crate::l4;
use crate::routes::Routes;

/// The outbound listeners and the protocol switch in front of the paths.
pub struct Outbound {
    /// What both paths share.
    pub fwd: Arc<Forward>,
    /// The HTTP path and its per-service state.
    pub http: Arc<HttpForward>,
    /// What `/ready` reports (listeners that could not bind).
    pub ready: Arc<crate::Readiness>,
    /// Bind with SO_REUSEPORT ([`crate::config::GatewayConfig::share_listeners`]).
    pub share: bool,
    /// Every caller connection counts as in flight until it closes, so a
    /// draining gateway waits for it (up to `drain_secs`); HTTP callers
    /// are told to go elsewhere when draining begins.
    pub drain: Arc<crate::drain::Drain>,
}

/// A listener on `addr`; with `share`, other processes of the same user
/// may bind it too (SO_REUSEPORT).
fn listen(addr: SocketAddr, share: bool) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    if share {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(1024)
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
                match listen(addr, self.share) {
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
        let cap = self.fwd.limits.max_connections_per_listener;
        let slots = Arc::new(tokio::sync::Semaphore::new(cap));
        loop {
            match listener.accept().await {
                Ok((tcp, _)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        metrics::counter!("causeway_outbound_connections_refused_total", "reason" => "cap").increment(1);
                        tracing::warn!(%service, port, cap, "listener at its connection cap (limits.max_connections_per_listener); closing a new connection");
                        drop(tcp);
                        continue;
                    };
                    let this = self.clone();
                    let service = service.clone();
                    let guard = self.drain.guard();
                    let http = this
                        .fwd
                        .routes
                        .borrow()
                        .services
                        .get(&service)
                        .and_then(|s| s.http_ports.get(&port).copied());
                    if let Some(upstream) = http {
                        let http = this.http.clone();
                        let drain = this.drain.clone();
                        tokio::spawn(async move {
                            crate::http::serve_connection(
                                http, tcp, service, port, upstream, &drain,
                            )
                            .await;
                            drop((slot, guard));
                        });
                    } else {
                        tokio::spawn(async move {
                            l4::serve(&this.fwd, tcp, service, port).await;
                            drop((slot, guard));
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}
