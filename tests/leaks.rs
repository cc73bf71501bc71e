//! Resource leaks: many connections open and close, and the gateways give
//! back their streams, descriptors and memory.

mod common;

use common::*;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_open_and_close_without_leaking() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (vip, _echo) = echo_sites_ready(&mut fed).await;
    let target = SocketAddr::new(vip, 7000);
    let pids = [
        fed.sites["east"].gateway.pid().unwrap(),
        fed.sites["west"].gateway.pid().unwrap(),
    ];

    // Total connections; CAUSEWAY_LEAK_CONNS overrides (the issue asks for 100k).
    let total: usize = std::env::var("CAUSEWAY_LEAK_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let round = |n: usize| async move {
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let next = next.clone();
            tasks.push(tokio::spawn(async move {
                let mut failed = 0usize;
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                    let ok = async {
                        let mut s = tokio::net::TcpStream::connect(target).await.ok()?;
                        // Reset on close once the echo is back: no TIME_WAIT
                        // pile-up on the loopback's ephemeral ports.
                        #[allow(deprecated)]
                        let _ = s.set_linger(Some(Duration::ZERO));
                        s.write_all(b"ping").await.ok()?;
                        s.shutdown().await.ok()?;
                        let mut b = Vec::new();
                        s.read_to_end(&mut b).await.ok()?;
                        (b == b"ping").then_some(())
                    }
                    .await;
                    if ok.is_none() {
                        failed += 1;
                    }
                }
                failed
            }));
        }
        let mut failed = 0;
        for t in tasks {
            failed += t.await.unwrap();
        }
        failed
    };

    tracing::info!("phase: warm up with 2000 connections");
    assert_eq!(round(2000).await, 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds0: Vec<usize> = pids.iter().map(|p| open_fds(*p)).collect();
    let rss0: Vec<u64> = pids.iter().map(|p| rss_kb(*p)).collect();

    tracing::info!(total, "phase: open and close connections");
    let failed = round(total).await;
    assert_eq!(failed, 0, "{failed} of {total} connections failed");

    tracing::info!("phase: everything was released");
    eventually(
        Duration::from_secs(15),
        "every stream and descriptor to be released",
        async || {
            let fds: Vec<usize> = pids.iter().map(|p| open_fds(*p)).collect();
            let east = http_get(fed.sites["east"].gateway_admin, "/metrics").await;
            let west = http_get(fed.sites["west"].gateway_admin, "/metrics").await;
            let active = metric(&east, "causeway_tunnel_streams_active")
                + metric(&west, "causeway_tunnel_streams_active");
            let fds_ok = fds
                .iter()
                .zip(&fds0)
                .all(|(now, before)| *now <= before + 2);
            (active == 0.0 && fds_ok).then_some(()).ok_or_else(|| {
                format!("leak: {active} streams still active, fds {fds:?} (were {fds0:?})")
            })
        },
    )
    .await;
    let rss1: Vec<u64> = pids.iter().map(|p| rss_kb(*p)).collect();
    tracing::info!(?rss0, ?rss1, "gateway RSS in KiB before and after");
    for (a, b) in rss0.iter().zip(&rss1) {
        assert!(
            *b < a + 32 * 1024,
            "gateway RSS grew from {a} KiB to {b} KiB"
        );
    }
    fed.shutdown().await;
}
