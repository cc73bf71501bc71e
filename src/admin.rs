//! The admin port: Prometheus metrics at `/metrics`, liveness at `/healthz`.
//! A deliberately tiny HTTP/1.1 responder (one request per connection,
//! request head bounded to 8 KiB) so the admin port pulls in no HTTP stack.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use causeway_api::sync::LockExt;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Installs the global metrics recorder; call once per process.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    PrometheusBuilder::new()
        // Histograms, not summaries, where Prometheus aggregates across
        // gateways (the p99 per service of deploy/prometheus).
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(
                "causeway_http_request_duration_seconds".into(),
            ),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )
        .map_err(|e| anyhow::anyhow!("metric buckets: {e}"))?
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("installing the metrics recorder: {e}"))
        .inspect(|_| {
            // Which release and protocol this process runs: during a
            // rolling upgrade, `count by (version) (causeway_build_info)`.
            metrics::gauge!(
                "causeway_build_info",
                "version" => causeway_api::version::VERSION,
                "protocol" => causeway_api::version::PROTOCOL.to_string(),
            )
            .set(1.0);
        })
}

/// Says why the process is not ready, or `None` when it is.
pub type Readiness = std::sync::Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// How long a client has to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long writing the answer may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once. Past it, the connection that has waited
/// longest without sending a request is closed for the new one, so idle
/// sockets can never lock a scraper out.
pub const MAX_CONNECTIONS: usize = 256;

/// Connections still waiting for their request head, oldest first; each
/// can be told to close.
#[derive(Default)]
struct Waiting {
    next: u64,
    queue: std::collections::VecDeque<(u64, tokio::sync::oneshot::Sender<()>)>,
}

/// Serves the admin endpoints on `addr` in the background: `/metrics`,
/// `/healthz` (alive) and `/ready` (503 with the reason until ready).
/// Bounded: a request head of 8 KiB within [`HEAD_TIMEOUT`], at most
/// [`MAX_CONNECTIONS`] at once (the longest idle is closed for a new one),
/// and a failing `accept` (e.g. out of file descriptors) backs off instead
/// of spinning.
pub async fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
    component: &'static str,
    ready: Option<Readiness>,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the admin port {addr}: {e}"))?;
    let local = listener.local_addr()?;
    metrics::gauge!("causeway_up", "component" => component).set(1.0);
    let waiting = Arc::new(Mutex::new(Waiting::default()));
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(10);
        loop {
            let mut sock = match listener.accept().await {
                Ok((sock, _)) => {
                    backoff = Duration::from_millis(10);
                    sock
                }
                Err(e) => {
                    metrics::counter!("causeway_admin_accept_errors_total").increment(1);
                    tracing::warn!(error = %e, retry_in = ?backoff, "admin port: accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            if open.load(Ordering::Acquire) >= MAX_CONNECTIONS {
                // Make room: close the connection idle the longest.
                metrics::counter!("causeway_admin_connections_evicted_total").increment(1);
                if let Some((_, close)) = waiting.locked().queue.pop_front() {
                    let _ = close.send(());
                }
            }
            let (close_tx, mut close) = tokio::sync::oneshot::channel();
            let id = {
                let mut w = waiting.locked();
                w.next += 1;
                let id = w.next;
                w.queue.push_back((id, close_tx));
                id
            };
            let handle = handle.clone();
            let ready = ready.clone();
            let waiting = waiting.clone();
            let open = open.clone();
            open.fetch_add(1, Ordering::AcqRel);
            tokio::spawn(async move {
                let head = tokio::select! {
                    h = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut sock)) => h.ok(),
                    _ = &mut close => None,
                };
                waiting.locked().queue.retain(|(i, _)| *i != id);
                if let Some(head) = head {
                    let answer = respond(&head, &handle, ready.as_ref());
                    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
                        let _ = sock.write_all(answer.as_bytes()).await;
                        let _ = sock.shutdown().await;
                    })
                    .await;
                }
                open.fetch_sub(1, Ordering::AcqRel);
            });
        }
    });
    Ok(local)
}

/// Reads up to the end of a request head (8 KiB at most).
async fn read_head(sock: &mut tokio::net::TcpStream) -> String {
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    while n < buf.len() {
        match sock.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(m) => n += m,
        }
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// The whole HTTP/1.1 answer to a request head.
fn respond(head: &str, handle: &PrometheusHandle, ready: Option<&Readiness>) -> String {
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let (status, ctype, body) = match path {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", handle.render()),
        "/healthz" | "/livez" => ("200 OK", "text/plain", "ok\n".to_string()),
        "/ready" | "/readyz" => match ready.and_then(|r| r()) {
            None => ("200 OK", "text/plain", "ready\n".to_string()),
            Some(why) => (
                "503 Service Unavailable",
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /healthz or /ready\n".to_string(),
        ),
    };
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}
