//! One pooled QUIC connection per remote site, reused by every stream to
//! that site, redialed when it has closed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use causeway_api::identity::Credential;
use causeway_api::model::SiteName;
use causeway_api::trust::TrustStore;

use crate::routes::SiteRoute;
use crate::tunnel;

const DIAL_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Pool {
    quic: crate::config::QuicConfig,
    endpoint: quinn::Endpoint,
    cred: Credential,
    store: Arc<TrustStore>,
    conns: Mutex<HashMap<SiteName, quinn::Connection>>,
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("site {0} advertises no tunnel address")]
    NoAddress(SiteName),
    #[error("could not reach site {site} at any of its tunnel addresses: {last}")]
    Unreachable { site: SiteName, last: String },
}

impl Pool {
    pub fn new(
        endpoint: quinn::Endpoint,
        cred: Credential,
        store: Arc<TrustStore>,
        quic: crate::config::QuicConfig,
    ) -> Self {
        Self {
            quic,
            endpoint,
            cred,
            store,
            conns: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, site: &SiteName) -> Option<quinn::Connection> {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns
            .get(site)
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    /// A live connection to `site`, dialing if there is none.
    pub async fn connection(
        &self,
        site: &SiteName,
        route: &SiteRoute,
    ) -> Result<quinn::Connection, DialError> {
        if let Some(c) = self.cached(site) {
            return Ok(c);
        }
        if route.tunnel_addrs.is_empty() {
            return Err(DialError::NoAddress(site.clone()));
        }
        let cfg = tunnel::client_config(
            &self.cred,
            self.store.clone(),
            route.trust_domain.clone(),
            &self.quic,
        )
        .map_err(|e| DialError::Unreachable {
            site: site.clone(),
            last: e.to_string(),
        })?;
        let mut last = String::new();
        for addr in &route.tunnel_addrs {
            let connecting = match self.endpoint.connect_with(cfg.clone(), *addr, "gateway") {
                Ok(c) => c,
                Err(e) => {
                    last = format!("{addr}: {e}");
                    continue;
                }
            };
            match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
                Ok(Ok(conn)) => {
                    metrics::counter!("causeway_tunnel_connections_total", "direction" => "out", "result" => "ok").increment(1);
                    tracing::info!(%site, %addr, "tunnel connected");
                    let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
                    conns.insert(site.clone(), conn.clone());
                    metrics::gauge!("causeway_tunnel_connections", "direction" => "out")
                        .set(conns.len() as f64);
                    return Ok(conn);
                }
                Ok(Err(e)) => last = format!("{addr}: {e}"),
                Err(_) => last = format!("{addr}: handshake timed out"),
            }
            metrics::counter!("causeway_tunnel_connections_total", "direction" => "out", "result" => "error").increment(1);
        }
        Err(DialError::Unreachable {
            site: site.clone(),
            last,
        })
    }

    /// Closes and forgets connections to sites no longer in `keep`.
    pub fn retain(&self, keep: impl Fn(&SiteName) -> bool) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|site, c| {
            let k = keep(site);
            if !k {
                tracing::info!(%site, "closing tunnel to a removed site");
                c.close(quinn::VarInt::from_u32(2), b"site removed");
            }
            k
        });
        metrics::gauge!("causeway_tunnel_connections", "direction" => "out")
            .set(conns.len() as f64);
    }

    /// Forgets a connection that failed, so the next stream redials.
    pub fn evict(&self, site: &SiteName) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.remove(site);
    }
}
