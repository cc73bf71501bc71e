//! causeway-dns: the mesh DNS server.
//!
//! [`zone`] builds the records from the catalog (pure); [`server`] answers
//! them with hickory-server on UDP and TCP; [`run`] keeps the zone current
//! from the controller's Watch stream.

pub mod fast;
pub mod server;
mod udp;
pub mod zone;

use std::sync::Arc;

use causeway_api::catalog::CatalogView;
use causeway_api::client::{run_watch, ControllerClient};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;

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
    opts: ZoneOptions,
    client: Arc<ControllerClient>,
    udp: Vec<UdpSocket>,
    tcp: TcpListener,
    serve: server::ServeOptions,
    ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (cat_tx, mut cat_rx) = watch::channel(Arc::new(CatalogView::default()));
    let (zone_tx, zone_rx) = watch::channel(Arc::new(Zone::empty(&opts)?));
    let watch_task = tokio::spawn(run_watch(client, cat_tx));
    let build_task = tokio::spawn(async move {
        loop {
            let view = cat_rx.borrow_and_update().clone();
            match Zone::build(&opts, &view) {
                Ok(z) => {
                    metrics::gauge!("causeway_dns_ready").set(if z.ready { 1.0 } else { 0.0 });
                    ready.store(z.ready, std::sync::atomic::Ordering::Release);
                    zone_tx.send_replace(Arc::new(z));
                }
                Err(e) => tracing::error!(error = %e, "building the DNS zone failed"),
            }
            if cat_rx.changed().await.is_err() {
                return;
            }
        }
    });
    let r = server::serve(zone_rx, udp, tcp, serve, shutdown).await;
    watch_task.abort();
    build_task.abort();
    r
}
