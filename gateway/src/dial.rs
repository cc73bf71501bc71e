//! Dialing for one attempt at one site: a connection to a local endpoint,
//! or a stream through a pooled tunnel to the site's gateway, opened with
//! the stream header and answered with a status before any payload. L4 and
//! HTTP forwarding both dial through here.

use std::sync::Arc;
use std::time::Duration;

use causeway_api::model::{ServiceKey, SiteName};
use causeway_gateway_core::header::{OpenRequest, OpenResponse, Status};
use tokio::net::TcpStream;

use crate::exports::Exports;
use crate::pool::Pool;
use crate::routes::Routes;

/// How long the caller waits for the remote gateway's status.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// Replicas of one site that may answer `Draining` to one stream before it
/// goes to the next site: each such tunnel is retired and the stream asks
/// another replica (a site's replicas restart one at a time in an upgrade).
const MAX_DRAINING: u32 = 3;

/// Why one attempt at one site failed.
#[derive(Debug)]
pub enum Attempt {
    /// Try the next site.
    Retry(String),
    /// Stop: the answer would be the same everywhere (e.g. forbidden).
    Fatal(String),
    /// Stop: the site's rate limit refused it (an HTTP caller answers 429).
    Limited(String),
}

impl Attempt {
    /// What went wrong, for logs and error bodies.
    pub fn reason(&self) -> &str {
        match self {
            Attempt::Retry(s) | Attempt::Fatal(s) | Attempt::Limited(s) => s,
        }
    }
}

/// Opens connections and tunnel streams for this gateway.
pub struct Dialer {
    /// This gateway's SPIFFE ID, sent in every stream header.
    pub caller_id: String,
    /// Tunnels to the other sites' gateways.
    pub pool: Arc<Pool>,
    /// Services this site exports, with their endpoints.
    pub local_exports: Arc<Exports>,
}

impl Dialer {
    /// A connection to a local endpoint of the service (of `subset`, when
    /// one is asked for).
    pub async fn local(
        &self,
        service: &ServiceKey,
        port: u16,
        subset: Option<&str>,
    ) -> Result<TcpStream, Attempt> {
        let table = self.local_exports.current();
        let Some(entry) = table.find(service.as_str(), port) else {
            return Err(Attempt::Retry("not exported on this port here".into()));
        };
        let endpoints = entry.endpoints.clone();
        drop(table);
        match endpoints.connect_subset(subset).await {
            Some((tcp, _in_flight)) => Ok(tcp),
            None => Err(Attempt::Retry(match subset {
                Some(v) => format!("no local endpoint of subset {v:?} accepted"),
                None => "no local endpoint accepted".into(),
            })),
        }
    }

    /// An opened tunnel stream to `site` for the service: the remote
    /// gateway has answered `Opened`. `trace` (a W3C traceparent, or empty)
    /// goes in the stream header: the remote gateway's span is its child.
    /// With the streams, the `stable_id` of the tunnel that carries them
    /// (see [`Pool::is_retired`]).
    pub async fn remote(
        &self,
        routes: &Routes,
        site: &SiteName,
        service: &ServiceKey,
        port: u16,
        subset: Option<&str>,
        trace: &[u8],
    ) -> Result<(quinn::SendStream, quinn::RecvStream, usize), Attempt> {
        let route = routes
            .sites
            .get(site)
            .ok_or_else(|| Attempt::Retry("site unknown".into()))?;
        // A peer that retired the tunnel (it no longer trusts the
        // certificate this gateway made it with) answers Retired: the
        // stream is asked again once, over a fresh tunnel. A replica that
        // is draining answers Draining: its tunnel is retired and another
        // replica asked (the site's other replicas are up; when none is,
        // the dial fails and the stream fails over to the next site).
        let mut fresh = false;
        let mut draining = 0;
        loop {
            let conn = self
                .pool
                .connection(site, route)
                .await
                .map_err(|e| Attempt::Retry(e.to_string()))?;
            let (send, recv, resp) = self.open_on(&conn, service, port, subset, trace).await?;
            metrics::counter!("causeway_tunnel_status_total", "status" => resp.status.as_str())
                .increment(1);
            return match resp.status {
                Status::Opened => Ok((send, recv, conn.stable_id())),
                Status::Retired if !fresh => {
                    tracing::info!(%site, reason = %resp.message, "peer retired the tunnel; asking again over a fresh one");
                    self.pool.retire(site, &conn);
                    fresh = true;
                    continue;
                }
                Status::Draining if draining < MAX_DRAINING => {
                    tracing::debug!(%site, "peer replica is draining; asking another");
                    self.pool.retire(site, &conn);
                    draining += 1;
                    continue;
                }
                Status::RateLimited => Err(Attempt::Limited(resp.message)),
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
        subset: Option<&str>,
        trace: &[u8],
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
            // The header field holds at most 255 bytes; a traceparent is 55.
            trace: if trace.len() <= 255 {
                trace.to_vec()
            } else {
                Vec::new()
            },
            caller: self.caller_id.clone(),
            subset: subset.unwrap_or_default().to_string(),
        };
        send.write_all(&header.encode())
            .await
            .map_err(|e| Attempt::Retry(format!("send header: {e}")))?;
        let resp = tokio::time::timeout(STATUS_TIMEOUT, crate::stream::read_response(&mut recv))
            .await
            .map_err(|_| Attempt::Retry("no status within the deadline".into()))?
            .map_err(|e| Attempt::Retry(e.to_string()))?;
        Ok((send, recv, resp))
    }
}
