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

pub const ALPN: &[u8] = b"causeway-tunnel/1";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Transport settings from the tuning config: windows sized from the
/// bandwidth-delay product, keepalives, dead-peer timeout, stream cap.
pub fn transport(q: &QuicConfig) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    let bdp = q.bdp_bytes().clamp(256 * 1024, 64 * 1024 * 1024);
    // One stream may fill the path; the connection may carry two such.
    t.stream_receive_window(VarInt::from_u64(bdp).unwrap_or(VarInt::MAX));
    t.receive_window(VarInt::from_u64(bdp * 2).unwrap_or(VarInt::MAX));
    t.send_window(bdp * 2);
    t.keep_alive_interval(Some(Duration::from_millis(q.keepalive_ms)));
    t.max_idle_timeout(VarInt::from_u64(q.idle_timeout_ms).ok().map(Into::into));
    t.max_concurrent_bidi_streams(VarInt::from_u32(q.max_streams_per_peer));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(q.max_udp_payload);
    t.mtu_discovery_config(Some(mtu));
    match q.congestion.as_str() {
        "bbr" => t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default())),
        "newreno" => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()))
        }
        _ => t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default())),
    };
    Arc::new(t)
}

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
    cfg.transport_config(transport(q));
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
    cfg.transport_config(transport(q));
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
    let inner = quinn::Runtime::wrap_udp_socket(&*runtime, socket)?;
    let socket = Arc::new(GsoCapped {
        max_segments: gso_segments(q.max_udp_payload),
        inner,
    });
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

/// The tokio UDP socket, with segmentation offload batches capped so that
/// a batch of full-size datagrams stays under [`GSO_MAX_BYTES`]. quinn
/// batches up to 10 datagrams of the current path MTU; with jumbo or
/// loopback MTUs (above ~6.5 kB) that would exceed the kernel's limit and
/// every full batch would be dropped on the floor.
#[derive(Debug)]
struct GsoCapped {
    max_segments: usize,
    inner: Arc<dyn quinn::AsyncUdpSocket>,
}

impl quinn::AsyncUdpSocket for GsoCapped {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments().min(self.max_segments)
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

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
