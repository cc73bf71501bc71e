//! Sample workloads the demo and tests export: an echo server (with an
//! optional banner naming its site) and a tiny HTTP/1.1 backend.

use std::net::SocketAddr;
use std::time::Duration;

/// A sample workload: optionally writes `banner` and a newline, then echoes
/// every byte back until the client half-closes.
pub async fn echo_server(
    banner: Option<String>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let banner = banner.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                if let Some(b) = banner {
                    if sock.write_all(format!("{b}\n").as_bytes()).await.is_err() {
                        return;
                    }
                }
                let (mut r, mut w) = sock.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok((addr, task))
}

/// A tiny HTTP/1.1 backend on `addr` (port 0 picks one) answering every
/// request with `name`, keep-alive; a path containing `/slow` waits 300 ms
/// first. Returns the bound address and the task (abort it to stop).
pub async fn http_backend(
    addr: SocketAddr,
    name: &'static str,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let (at, task, _) = http_backend_counting(addr, name).await?;
    Ok((at, task))
}

/// [`http_backend`], also counting the connections it accepted.
pub async fn http_backend_counting(
    addr: SocketAddr,
    name: &'static str,
) -> anyhow::Result<(
    SocketAddr,
    tokio::task::JoinHandle<()>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
)> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind(addr).await?;
    let at = l.local_addr()?;
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            conns.spawn(async move {
                let (r, mut w) = s.into_split();
                let mut r = tokio::io::BufReader::new(r);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let slow = line.contains("/slow");
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if h == "\r\n" {
                            break;
                        }
                    }
                    if slow {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{name}",
                        name.len()
                    );
                    if w.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok((at, task, accepted))
}
