//! L4 forwarding: one caller TCP connection becomes one stream to the
//! first site that takes it (or a local endpoint), spliced both ways with
//! backpressure and half-close. Built beside the HTTP path, never on it.

use causeway_api::model::{ServiceKey, SiteName};
use tokio::net::TcpStream;

use crate::access::note;
use crate::dial::Attempt;
use crate::forward::Forward;
use crate::splice::splice;
use crate::steer::Tried;
use crate::trace::set;
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;

enum Stream {
    Remote(quinn::SendStream, quinn::RecvStream),
    Local(TcpStream),
}

/// What outlier detection makes of one attempt.
fn outcome(attempt: &Result<Stream, Attempt>) -> Tried {
    match attempt {
        Ok(_) => Tried::Served,
        Err(Attempt::Retry(_)) => Tried::Failed,
        Err(Attempt::Fatal(_) | Attempt::Limited(_)) => Tried::Refused,
    }
}

/// Forwards one caller connection of `service` on `port`: each site in the
/// steering order is tried until one opens a stream (or a local endpoint
/// connection); then bytes flow both ways until both sides close.
pub async fn serve(fwd: &Forward, tcp: TcpStream, service: ServiceKey, port: u16) {
    let mut log = fwd.access.begin("outbound", "tcp");
    note(&mut log, |e| {
        e.service = service.to_string();
        e.source_site = fwd.steer.local_site.to_string();
        e.source = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    });
    let mut span = fwd.tracing.start_span(
        "causeway.outbound",
        SpanKind::Client,
        None,
        vec![
            KeyValue::new("causeway.service", service.to_string()),
            KeyValue::new("network.protocol.name", "tcp"),
        ],
    );
    let traceparent = span.as_ref().map(|s| s.traceparent()).unwrap_or_default();
    let routes = fwd.routes.borrow().clone();
    if !routes.services.contains_key(&service) {
        note(&mut log, |e| e.outcome = "unknown_service".into());
        if let Some(s) = &mut span {
            s.error("unknown service");
        }
        metrics::counter!("causeway_outbound_failures_total", "reason" => "unknown_service")
            .increment(1);
        return;
    }
    let order = fwd.steer.order(&routes, &service);
    let mut tried = Vec::new();
    for site in order {
        let Ok(site) = site.parse::<SiteName>() else {
            continue;
        };
        let attempt = if site == fwd.steer.local_site {
            fwd.dial
                .local(&service, port, None)
                .await
                .map(Stream::Local)
        } else {
            fwd.dial
                .remote(&routes, &site, &service, port, None, traceparent.as_bytes())
                .await
                .map(|(s, r, _)| Stream::Remote(s, r))
        };
        fwd.steer
            .observe(&routes, &service, &site, outcome(&attempt));
        match attempt {
            Ok(stream) => {
                metrics::counter!("causeway_tunnel_streams_total", "direction" => "out", "status" => "opened").increment(1);
                if !tried.is_empty() {
                    metrics::counter!("causeway_failovers_total").increment(1);
                    tracing::info!(%service, %site, skipped = ?tried, "failed over");
                }
                metrics::gauge!("causeway_tunnel_streams_active", "direction" => "out")
                    .increment(1.0);
                note(&mut log, |e| {
                    e.destination_site = site.to_string();
                    e.failover_reason = tried.join("; ");
                });
                let (from_caller, to_caller) = match stream {
                    Stream::Remote(send, recv) => {
                        splice(tcp, send, recv, fwd.limits.idle_timeout).await
                    }
                    Stream::Local(local) => {
                        if let (Some(p), Ok(a)) = (log.as_mut(), local.peer_addr()) {
                            p.entry.endpoint = a.to_string();
                        }
                        let mut a = tcp;
                        let mut b = local;
                        tokio::io::copy_bidirectional(&mut a, &mut b)
                            .await
                            .unwrap_or((0, 0))
                    }
                };
                note(&mut log, |e| {
                    e.bytes_in = from_caller;
                    e.bytes_out = to_caller;
                });
                set(&mut span, || {
                    vec![
                        KeyValue::new("causeway.destination_site", site.to_string()),
                        KeyValue::new("causeway.attempts", tried.len() as i64 + 1),
                        KeyValue::new("causeway.failover", tried.join("; ")),
                        KeyValue::new("causeway.bytes_in", from_caller as i64),
                        KeyValue::new("causeway.bytes_out", to_caller as i64),
                    ]
                });
                metrics::gauge!("causeway_tunnel_streams_active", "direction" => "out")
                    .decrement(1.0);
                return;
            }
            Err(Attempt::Retry(why)) => {
                tracing::debug!(%service, %site, %why, "site did not take the stream; trying the next");
                tried.push(format!("{site}: {why}"));
            }
            Err(Attempt::Fatal(why) | Attempt::Limited(why)) => {
                tracing::info!(%service, %site, %why, "stream refused");
                tried.push(format!("{site}: {why}"));
                break;
            }
        }
    }
    metrics::counter!("causeway_outbound_failures_total", "reason" => "no_site").increment(1);
    note(&mut log, |e| {
        e.outcome = "no_site".into();
        e.failover_reason = tried.join("; ");
    });
    if let Some(s) = &mut span {
        s.set([KeyValue::new("causeway.failover", tried.join("; "))]);
        s.error("no site could serve the connection");
    }
    tracing::warn!(%service, attempts = ?tried, "no site could serve the connection; closing it");
}
