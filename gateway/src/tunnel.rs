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

pub const ALPN: &[u8] = b"causeway-tunnel/1";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_millis(500)));
    t.max_idle_timeout(Some(VarInt::from_u32(2_000).into()));
    t.max_concurrent_bidi_streams(VarInt::from_u32(4096));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    Arc::new(t)
}

pub fn server_config(
    cred: &Credential,
    store: Arc<TrustStore>,
) -> anyhow::Result<quinn::ServerConfig> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(SpiffeClientVerifier::new(store))
        .with_single_cert(cred.chain.clone(), cred.key_der()?)
        .context("gateway certificate")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// Client settings for dialing the gateways of the site that owns `expected`.
pub fn client_config(
    cred: &Credential,
    store: Arc<TrustStore>,
    expected: TrustDomain,
) -> anyhow::Result<quinn::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(store, expected))
        .with_client_auth_cert(cred.chain.clone(), cred.key_der()?)
        .context("gateway certificate")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// A QUIC endpoint on an already-bound UDP socket.
pub fn endpoint(
    socket: std::net::UdpSocket,
    server: quinn::ServerConfig,
) -> anyhow::Result<quinn::Endpoint> {
    socket.set_nonblocking(true)?;
    Ok(quinn::Endpoint::new(
        EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?)
}

pub fn bind_udp(addr: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    std::net::UdpSocket::bind(addr).with_context(|| format!("binding the tunnel UDP socket {addr}"))
}
