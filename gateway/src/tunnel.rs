//! QUIC endpoint and TLS settings for the tunnels. TLS 1.3 only, mutual
//! authentication by SPIFFE ID (see `causeway_api::trust`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use causeway_api::identity::Credential;
use causeway_api::model::TrustDomain;
use causeway_api::trust::{SpiffeClientVerifier, SpiffeServerVerifier, TrustStore};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{EndpointConfig, TransportConfig, VarInt};

use crate::config::QuicConfig;

/// The ALPN protocol of causeway tunnels.
pub const ALPN: &[u8] = b"causeway-tunnel/1";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Streams a peer may open at first on a tunnel this gateway accepts; the
/// inbound side raises it as they fill (see [`next_stream_limit`]), up to
/// `quic.max_streams_per_peer`. quinn keeps an entry in two maps for every
/// stream a peer may open, so a cap of 16,384 up front cost about 1.1 MB
/// per tunnel whether streams were open or not.
pub const INITIAL_STREAMS: u32 = 256;

/// The stream limit to grant a peer with `open` streams under `current`:
/// double it once three quarters are in use, up to `max`.
pub fn next_stream_limit(open: u64, current: u32, max: u32) -> u32 {
    if open * 4 >= u64::from(current) * 3 && current < max {
        current.saturating_mul(2).min(max)
    } else {
        current
    }
}

/// Transport settings from the tuning config: windows sized from the
/// bandwidth-delay product, keepalives, dead-peer timeout, stream cap.
/// Only dialers open streams: a tunnel this gateway dialed allows the peer
/// none (`accepts` false); one it accepts starts at [`INITIAL_STREAMS`].
pub fn transport(q: &QuicConfig, accepts: bool) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    let bdp = q.bdp_bytes().clamp(256 * 1024, 64 * 1024 * 1024);
    // One stream may fill the path; the connection may carry two such.
    t.stream_receive_window(VarInt::from_u64(bdp).unwrap_or(VarInt::MAX));
    t.receive_window(VarInt::from_u64(bdp * 2).unwrap_or(VarInt::MAX));
    t.send_window(bdp * 2);
    t.keep_alive_interval(Some(Duration::from_millis(q.keepalive_ms)));
    t.max_idle_timeout(VarInt::from_u64(q.idle_timeout_ms).ok().map(Into::into));
    let streams = if accepts {
        INITIAL_STREAMS.min(q.max_streams_per_peer)
    } else {
        0
    };
    t.max_concurrent_bidi_streams(VarInt::from_u32(streams));
    // A dialing gateway takes one unidirectional stream: the drain notice
    // of the gateway it dialed (header::DRAIN_NOTICE).
    t.max_concurrent_uni_streams(VarInt::from_u32(u32::from(!accepts)));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(q.max_udp_payload);
    t.mtu_discovery_config(Some(mtu));
    let inner: Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> =
        match q.congestion.as_str() {
            "bbr" => Arc::new(quinn::congestion::BbrConfig::default()),
            "newreno" => Arc::new(quinn::congestion::NewRenoConfig::default()),
            _ => Arc::new(quinn::congestion::CubicConfig::default()),
        };
    // BBR does not treat loss as congestion; the filter is for the others.
    if q.loss_tolerance == 0 || q.congestion == "bbr" {
        t.congestion_controller_factory(inner);
    } else {
        t.congestion_controller_factory(Arc::new(crate::congestion::LossFilterConfig {
            inner,
            tolerance: q.loss_tolerance,
        }));
    }
    Arc::new(t)
}

/// The QUIC server config: this replica's certificate, peers verified
/// against their own site's bundle.
pub fn server_config(
    cred: &Credential,
    store: Arc<TrustStore>,
    q: &QuicConfig,
) -> anyhow::Result<quinn::ServerConfig> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(SpiffeClientVerifier::new(store))
        .with_single_cert(cred.chain.clone(), cred.key_der()?)
        .context("gateway certificate")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    cfg.transport_config(transport(q, true));
    Ok(cfg)
}

/// Client settings for dialing the gateways of the site that owns `expected`.
pub fn client_config(
    cred: &Credential,
    store: Arc<TrustStore>,
    expected: TrustDomain,
    q: &QuicConfig,
) -> anyhow::Result<quinn::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(store, expected))
        .with_client_auth_cert(cred.chain.clone(), cred.key_der()?)
        .context("gateway certificate")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    cfg.transport_config(transport(q, false));
    Ok(cfg)
}

/// A QUIC endpoint on an already-bound UDP socket, with its buffers sized
/// from `udp_buffer_bytes`. It accepts datagrams up to `max_udp_payload`
/// and tells peers so (the transport parameter caps what path-MTU
/// discovery on the peer's side may reach).
pub fn endpoint(
    socket: std::net::UdpSocket,
    server: quinn::ServerConfig,
    q: &QuicConfig,
) -> anyhow::Result<quinn::Endpoint> {
    socket.set_nonblocking(true)?;
    size_udp_buffers(&socket, q.udp_buffer_bytes);
    let mut config = EndpointConfig::default();
    config
        .max_udp_payload_size(q.max_udp_payload)
        .map_err(|e| anyhow::anyhow!("quic.max_udp_payload: {e}"))?;
    let runtime = Arc::new(quinn::TokioRuntime);
    let socket = Arc::new(TunnelSocket::new(socket, gso_segments(q.max_udp_payload))?);
    Ok(quinn::Endpoint::new_with_abstract_socket(
        config,
        Some(server),
        socket,
        runtime,
    )?)
}

/// Largest UDP payload one segmentation-offload send may carry: Linux
/// refuses a `UDP_SEGMENT` send whose total exceeds one IP datagram
/// (EMSGSIZE, which the UDP layer treats as a lost packet).
const GSO_MAX_BYTES: usize = 65_000;

/// How many datagrams of `max_udp_payload` bytes fit one offloaded send.
pub fn gso_segments(max_udp_payload: u16) -> usize {
    (GSO_MAX_BYTES / usize::from(max_udp_payload.max(1200))).max(1)
}

/// The tunnel's UDP socket as quinn sees it, tuned for latency:
///
/// - it is registered with the runtime for reads only. A socket registered
///   for writes too gets a write-readiness event after nearly every send
///   (the kernel frees the datagram at once on a fast path), and each one
///   wakes the runtime for nothing. Writes are tried directly; only a send
///   that would block registers a second handle of the socket for write
///   readiness, until it is writable again.
/// - a receive batch that came back short of the buffers offered drained
///   the socket, so read readiness is cleared then and there instead of by
///   one more `recvmmsg` that would only say `EAGAIN`. (A datagram that
///   lands in between raises readiness again: the runtime keeps readiness
///   newer than what it cleared.)
/// - segmentation-offload batches are capped so a batch of full-size
///   datagrams stays under [`GSO_MAX_BYTES`]: quinn batches up to 10
///   datagrams of the current path MTU, and with jumbo or loopback MTUs
///   (above ~6.5 kB) the kernel would refuse every full batch.
#[derive(Debug)]
struct TunnelSocket {
    io: tokio::io::unix::AsyncFd<std::net::UdpSocket>,
    state: quinn::udp::UdpSocketState,
    max_segments: usize,
    /// The last send found the socket's buffer full: wait for write
    /// readiness before the next (until then quinn may just send).
    blocked: std::sync::atomic::AtomicBool,
}

impl TunnelSocket {
    fn new(socket: std::net::UdpSocket, max_segments: usize) -> std::io::Result<Self> {
        let state = quinn::udp::UdpSocketState::new((&socket).into())?;
        let io = register(socket, tokio::io::Interest::READABLE)?;
        Ok(Self {
            io,
            state,
            max_segments,
            blocked: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

impl quinn::AsyncUdpSocket for TunnelSocket {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        Box::pin(WritablePoller {
            socket: self,
            wait: None,
        })
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        let sent = self.state.send(self.io.get_ref().into(), transmit);
        if matches!(&sent, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
            self.blocked
                .store(true, std::sync::atomic::Ordering::Release);
        }
        sent
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::{ready, Poll};
        let offered = bufs.len().min(meta.len());
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            let mut short = 0;
            let got = guard.try_io(|io| {
                let n = self.state.recv(io.get_ref().into(), bufs, meta)?;
                if n > 0 && n < offered {
                    // Drained: clear readiness now (see the type's docs).
                    short = n;
                    return Err(std::io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            match got {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) if short > 0 => return Poll::Ready(Ok(short)),
                Err(_would_block) => continue,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments().min(self.max_segments)
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }
}

/// Registers `socket` with the runtime for `interest` only.
///
/// tokio deprecated this safe constructor for types whose `as_raw_fd` may
/// change or close under it (its replacement is `unsafe`, which this
/// workspace forbids). A `std::net::UdpSocket` owns its descriptor, and
/// the `AsyncFd` owns the socket until both are dropped, so here it is sound.
#[allow(deprecated)]
fn register(
    socket: std::net::UdpSocket,
    interest: tokio::io::Interest,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::net::UdpSocket>> {
    tokio::io::unix::AsyncFd::with_interest(socket, interest)
}

type WaitWritable =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send + Sync>>;

/// Waits until the socket can take a send again, through a second handle
/// registered for write readiness only while someone waits.
struct WritablePoller {
    socket: Arc<TunnelSocket>,
    wait: Option<WaitWritable>,
}

impl std::fmt::Debug for WritablePoller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WritablePoller").finish_non_exhaustive()
    }
}

impl quinn::UdpPoller for WritablePoller {
    fn poll_writable(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::sync::atomic::Ordering;
        let this = self.get_mut();
        if this.wait.is_none() && !this.socket.blocked.load(Ordering::Acquire) {
            // quinn asks before every send; only a full buffer makes it wait.
            return std::task::Poll::Ready(Ok(()));
        }
        let wait = this.wait.get_or_insert_with(|| {
            let dup = this.socket.io.get_ref().try_clone();
            Box::pin(async move {
                let fd = register(dup?, tokio::io::Interest::WRITABLE)?;
                // Registering reports a socket that is writable already.
                let _ready = fd.writable().await?;
                Ok(())
            })
        });
        let result = wait.as_mut().poll(cx);
        if result.is_ready() {
            this.wait = None;
            this.socket.blocked.store(false, Ordering::Release);
        }
        result
    }
}

/// Binds the tunnel's UDP socket.
pub fn bind_udp(addr: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    std::net::UdpSocket::bind(addr).with_context(|| format!("binding the tunnel UDP socket {addr}"))
}

/// Sets the UDP socket's buffers (the kernel may cap them at net.core.*mem_max).
fn size_udp_buffers(socket: &std::net::UdpSocket, bytes: usize) {
    if bytes == 0 {
        return;
    }
    let s = socket2::SockRef::from(socket);
    if let Err(e) = s
        .set_recv_buffer_size(bytes)
        .and_then(|_| s.set_send_buffer_size(bytes))
    {
        tracing::warn!(error = %e, bytes, "could not size the UDP buffers");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Receives until `bytes` have arrived (GRO may coalesce datagrams).
    async fn recv_bytes(sock: &TunnelSocket, bytes: usize) -> usize {
        use quinn::AsyncUdpSocket;
        let mut got = 0;
        let mut storage = vec![vec![0u8; 65_536]; 8];
        while got < bytes {
            let mut bufs: Vec<std::io::IoSliceMut<'_>> = storage
                .iter_mut()
                .map(|b| std::io::IoSliceMut::new(b))
                .collect();
            let mut meta = vec![quinn::udp::RecvMeta::default(); bufs.len()];
            let n = tokio::time::timeout(
                Duration::from_secs(2),
                std::future::poll_fn(|cx| sock.poll_recv(cx, &mut bufs, &mut meta)),
            )
            .await
            .expect("a datagram that arrived never woke the receiver")
            .unwrap();
            got += meta[..n].iter().map(|m| m.len).sum::<usize>();
        }
        got
    }

    #[tokio::test]
    async fn a_drained_socket_still_wakes_for_the_next_datagram() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let to = rx.local_addr().unwrap();
        let sock = TunnelSocket::new(rx, 4).unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for round in 0..60usize {
            // Short batches (readiness cleared without a last recvmmsg),
            // then datagrams that land after the drain, sent from another
            // thread while the receiver waits.
            let n = round % 5 + 1;
            let late = round % 3 == 0;
            let tx2 = tx.try_clone().unwrap();
            let send = move || {
                for i in 0..n {
                    tx2.send_to(&[i as u8; 100], to).unwrap();
                }
            };
            let sender = if late {
                Some(std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(2));
                    send()
                }))
            } else {
                send();
                None
            };
            assert_eq!(recv_bytes(&sock, n * 100).await, n * 100, "round {round}");
            if let Some(t) = sender {
                t.join().unwrap();
            }
        }
    }

    #[test]
    fn an_offloaded_batch_of_full_datagrams_fits_one_ip_datagram() {
        assert_eq!(gso_segments(1452), 44);
        assert_eq!(gso_segments(8952), 7);
        assert_eq!(gso_segments(16_000), 4);
        assert_eq!(gso_segments(65_000), 1);
        for payload in [
            1200u16, 1452, 6000, 6501, 8952, 9000, 32_500, 32_501, 65_000,
        ] {
            assert!(gso_segments(payload) * usize::from(payload) <= 65_000);
            assert!(gso_segments(payload) >= 1);
        }
    }
}
