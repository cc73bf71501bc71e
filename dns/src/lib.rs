//! causeway-dns: the mesh DNS server.
//!
//! [`zone`] builds the records from the catalog (pure); [`handler`]
//! answers one query from the zone (a leaf: it knows no sockets); [`serve`]
//! runs it on UDP (a thread per socket with the precomputed fast path,
//! [`fast`]) and TCP (hickory-server); [`run`] keeps the zone current from
//! the controller's Watch stream and serves it.

#![warn(missing_docs)]

pub mod config;
pub mod fast;
pub mod handler;
mod udp;
pub mod zone;

use std::sync::Arc;
use std::time::Duration;

use causeway_api::catalog::CatalogView;
use causeway_api::client::{run_watch, ControllerClient};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;

use crate::handler::{Handler, ServeOptions};
use crate::zone::{Zone, ZoneOptions};

/// Binds `n` UDP sockets to `addr` with SO_REUSEPORT (the kernel hashes
/// each client to one of them), or one plain socket when `n` is 1.
pub fn bind_udp(addr: std::net::SocketAddr, n: usize) -> std::io::Result<Vec<UdpSocket>> {
    use socket2::{Domain, Protocol, Socket, Type};
    (0..n.max(1))
        .map(|_| {
            let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
            if n > 1 {
                s.set_reuse_port(true)?;
            }
            s.set_nonblocking(true)?;
            s.bind(&addr.into())?;
            UdpSocket::from_std(s.into())
        })
        .collect()
}

/// Runs the DNS server: follows the catalog and answers from it.
pub async fn run(
    mut opts: watch::Receiver<ZoneOptions>,
    client: Arc<ControllerClient>,
    udp: Vec<UdpSocket>,
    tcp: TcpListener,
    serve_opts: ServeOptions,
    ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (cat_tx, mut cat_rx) = watch::channel(Arc::new(CatalogView::default()));
    let (zone_tx, zone_rx) = watch::channel(Arc::new(Zone::empty(&opts.borrow())?));
    let watch_task = tokio::spawn(run_watch(client, cat_tx));
    let build_task = tokio::spawn(async move {
        // Zone options change with a config reload; without one, only the
        // catalog does.
        let mut reloadable = true;
        loop {
            let view = cat_rx.borrow_and_update().clone();
            let current = opts.borrow_and_update().clone();
            match Zone::build(&current, &view) {
                Ok(z) => {
                    metrics::gauge!("causeway_dns_ready").set(if z.ready { 1.0 } else { 0.0 });
                    ready.store(z.ready, std::sync::atomic::Ordering::Release);
                    zone_tx.send_replace(Arc::new(z));
                }
                Err(e) => tracing::error!(error = %e, "building the DNS zone failed"),
            }
            tokio::select! {
                r = cat_rx.changed() => if r.is_err() {
                    return;
                },
                r = opts.changed(), if reloadable => if r.is_err() {
                    reloadable = false;
                },
            }
        }
    });
    let r = serve(zone_rx, udp, tcp, serve_opts, shutdown).await;
    watch_task.abort();
    build_task.abort();
    r
}

/// Serves DNS on the given sockets until `shutdown` resolves: UDP on a
/// thread per socket with the precomputed fast path ([`fast`]), TCP
/// with hickory-server.
pub async fn serve(
    zone: watch::Receiver<Arc<Zone>>,
    udp: Vec<UdpSocket>,
    tcp: TcpListener,
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let edns_udp_size = opts.edns_udp_size;
    let handler = Arc::new(Handler::new(zone.clone(), opts.clone()));
    metrics::gauge!("causeway_dns_udp_sockets").set(udp.len() as f64);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let udp = udp
        .into_iter()
        .map(|s| s.into_std())
        .collect::<std::io::Result<Vec<_>>>()?;
    let threads = crate::udp::spawn(udp, zone.clone(), handler, edns_udp_size, stop.clone())?;
    let mut server = hickory_server::Server::new(Handler::new(zone, opts));
    server.register_listener(tcp, Duration::from_secs(5), 64 * 1024);
    let result = tokio::select! {
        r = server.block_until_done() => r.map_err(|e| anyhow::anyhow!("dns server: {e}")),
        _ = shutdown => {
            let _ = server.shutdown_gracefully().await;
            Ok(())
        }
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    })
    .await;
    result
}
