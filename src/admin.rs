//! The admin port: Prometheus metrics at `/metrics`, liveness at `/healthz`.
//! A deliberately tiny HTTP/1.1 responder (one request per connection,
//! request head bounded to 8 KiB) so the admin port pulls in no HTTP stack.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Installs the global metrics recorder; call once per process.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("installing the metrics recorder: {e}"))
}

/// Says why the process is not ready, or `None` when it is.
pub type Readiness = std::sync::Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Serves the admin endpoints on `addr` in the background: `/metrics`,
/// `/healthz` (alive) and `/ready` (503 with the reason until ready).
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
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let handle = handle.clone();
            let ready = ready.clone();
            tokio::spawn(async move {
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
                let head = String::from_utf8_lossy(&buf[..n]);
                let path = head.split_whitespace().nth(1).unwrap_or("");
                let (status, ctype, body) = match path {
                    "/metrics" => ("200 OK", "text/plain; version=0.0.4", handle.render()),
                    "/healthz" | "/livez" => ("200 OK", "text/plain", "ok\n".to_string()),
                    "/ready" | "/readyz" => match ready.as_ref().and_then(|r| r()) {
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
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok(local)
}
