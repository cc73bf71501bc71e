//! Inbound stream robustness over real QUIC on loopback: a peer that never
//! sends its header is cut off, a garbage header gets BadRequest, a peer
//! cannot hold more streams open than the cap, and jumbo datagrams carry
//! bulk data without loss.

use std::sync::Arc;
use std::time::Duration;

use causeway_api::identity::CertificateAuthority;
use causeway_api::model::TrustDomain;
use causeway_api::trust::TrustStore;
use causeway_gateway::config::{Authorization, LocalExport, QuicConfig};
use causeway_gateway::drain::Drain;
use causeway_gateway::inbound::Inbound;
use causeway_gateway::tunnel;
use causeway_gateway_core::balance::Strategy;
use causeway_gateway_core::header::{OpenRequest, OpenResponse, Status, PREFIX_LEN};

struct Setup {
    server: quinn::Endpoint,
    client: quinn::Endpoint,
    client_cfg: quinn::ClientConfig,
}

async fn setup(quic: QuicConfig) -> Setup {
    setup_with(quic, None, Authorization::default()).await
}

/// `endpoint` replaces the echo endpoint of `shop/echo` when given.
async fn setup_with(
    quic: QuicConfig,
    endpoint: Option<std::net::SocketAddr>,
    authorization: Authorization,
) -> Setup {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let a = CertificateAuthority::generate("a").unwrap();
    let b = CertificateAuthority::generate("b").unwrap();
    let td = |n: &str| -> TrustDomain { format!("{n}.causeway").parse().unwrap() };
    let store = TrustStore::new();
    store.set_site("a".parse().unwrap(), td("a"), vec![a.cert_der.clone()]);
    store.set_site("b".parse().unwrap(), td("b"), vec![b.cert_der.clone()]);
    let server_cred = a
        .issue(
            &"spiffe://a.causeway/gateway/gw-0".parse().unwrap(),
            &[],
            Duration::from_secs(600),
        )
        .unwrap();
    let client_cred = b
        .issue(
            &"spiffe://b.causeway/gateway/gw-0".parse().unwrap(),
            &[],
            Duration::from_secs(600),
        )
        .unwrap();
    // An echo endpoint for the exported service.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let exports = vec![LocalExport {
        service: "shop/echo".parse().unwrap(),
        port: 7000,
        port_name: String::new(),
        protocol: Default::default(),
        endpoints: vec![endpoint.unwrap_or(echo_addr)],
        headless: false,
        hostnames: Default::default(),
        health_path: None,
        zones: Default::default(),
        versions: Default::default(),
        exported_at_ms: 0,
        client_ip_affinity: false,
    }];
    let mut inbound = Inbound::with_header_timeout(
        store.clone(),
        causeway_gateway::exports::Exports::new(exports, Strategy::RoundRobin),
        Drain::new(),
        authorization,
        Duration::from_millis(300),
    );
    inbound.max_streams = quic.max_streams_per_peer;
    let inbound = Arc::new(inbound);
    let server = tunnel::endpoint(
        tunnel::bind_udp("127.0.0.1:0".parse().unwrap()).unwrap(),
        tunnel::server_config(&server_cred, store.clone(), &quic).unwrap(),
        &quic,
    )
    .unwrap();
    tokio::spawn(inbound.run(server.clone(), quic.retry));
    // The dialing side is a gateway endpoint too (same socket settings).
    let client = tunnel::endpoint(
        tunnel::bind_udp("127.0.0.1:0".parse().unwrap()).unwrap(),
        tunnel::server_config(&client_cred, store.clone(), &quic).unwrap(),
        &quic,
    )
    .unwrap();
    let client_cfg = tunnel::client_config(&client_cred, store, td("a"), &quic).unwrap();
    Setup {
        server,
        client,
        client_cfg,
    }
}

impl Setup {
    /// A tunnel connection from the client endpoint to the server's.
    async fn connect(&self) -> quinn::Connection {
        self.client
            .connect_with(
                self.client_cfg.clone(),
                self.server.local_addr().unwrap(),
                "gateway",
            )
            .unwrap()
            .await
            .unwrap()
    }
}

async fn read_status(recv: &mut quinn::RecvStream) -> Result<Status, String> {
    let mut p = [0u8; PREFIX_LEN];
    recv.read_exact(&mut p).await.map_err(|e| e.to_string())?;
    let (status, len) = OpenResponse::decode_prefix(&p).map_err(|e| e.to_string())?;
    let mut msg = vec![0u8; len];
    recv.read_exact(&mut msg).await.map_err(|e| e.to_string())?;
    Ok(status)
}

/// Opens a stream to `shop/echo` and expects the gateway to accept it.
async fn open_stream(conn: &quinn::Connection) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&open_request()).await.unwrap();
    assert_eq!(read_status(&mut recv).await.unwrap(), Status::Opened);
    (send, recv)
}

fn open_request() -> Vec<u8> {
    OpenRequest {
        service: "shop/echo".into(),
        port: 7000,
        deadline_ms: 1000,
        trace: vec![],
        caller: "test".into(),
        subset: String::new(),
    }
    .encode()
}

#[tokio::test]
async fn silent_streams_time_out_and_garbage_headers_get_bad_request() {
    let s = setup(QuicConfig::default()).await;
    let conn = s.connect().await;

    // Opened, never a header: reset after the header timeout.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    // A stream is only announced with its first frame: send one byte of prefix.
    send.write_all(b"C").await.unwrap();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(5), recv.read(&mut buf))
        .await
        .expect("no reset within 5 s");
    assert!(r.is_err(), "expected a reset, got {r:?}");

    // Garbage: BadRequest.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert_eq!(read_status(&mut recv).await.unwrap(), Status::BadRequest);

    // The connection still serves a proper stream.
    let (mut send, mut recv) = open_stream(&conn).await;
    send.write_all(b"ping").await.unwrap();
    send.finish().unwrap();
    let got = recv.read_to_end(64).await.unwrap();
    assert_eq!(got, b"ping");
}

#[tokio::test]
async fn a_peer_cannot_open_more_streams_than_the_cap() {
    let quic = QuicConfig {
        max_streams_per_peer: 2,
        ..Default::default()
    };
    let s = setup(quic).await;
    let conn = s.connect().await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let (send, recv) = open_stream(&conn).await;
        held.push((send, recv));
    }
    // The third waits for credit.
    let third = tokio::time::timeout(Duration::from_millis(500), conn.open_bi()).await;
    assert!(third.is_err(), "a third concurrent stream was allowed");
    // Finishing one frees a slot.
    let (mut send, mut recv) = held.pop().unwrap();
    send.finish().unwrap();
    let _ = recv.read_to_end(64).await;
    drop((send, recv));
    let fourth = tokio::time::timeout(Duration::from_secs(5), conn.open_bi()).await;
    assert!(
        fourth.is_ok(),
        "no stream credit came back after one stream ended"
    );
}

/// A tunnel grants a few hundred streams at first and more as they fill:
/// far more than the first grant can be open at once, each answering.
#[tokio::test]
async fn streams_beyond_the_first_grant_are_granted_as_they_fill() {
    let s = setup(QuicConfig::default()).await;
    let conn = s.connect().await;
    let want = 4 * tunnel::INITIAL_STREAMS as usize;
    let mut held = Vec::new();
    for i in 0..want {
        let opened = tokio::time::timeout(Duration::from_secs(5), open_stream(&conn)).await;
        assert!(
            opened.is_ok(),
            "stream {i} of {want} waited over 5 s for credit"
        );
        held.push(opened.unwrap());
    }
    // Every one of them still carries its bytes.
    for (send, recv) in &mut held {
        send.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        recv.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"x");
    }
}

#[test]
fn the_stream_grant_doubles_at_three_quarters_up_to_the_cap() {
    use tunnel::next_stream_limit as next;
    assert_eq!(next(100, 256, 16384), 256);
    assert_eq!(next(192, 256, 16384), 512);
    assert_eq!(next(12_000, 16_000, 16384), 16384);
    assert_eq!(next(16_384, 16384, 16384), 16384);
    assert_eq!(next(2, 2, 2), 2, "never past the configured cap");
}

/// With a path MTU above ~6.5 kB, ten full datagrams (quinn's batch) no
/// longer fit one segmentation-offload send; the kernel refused such sends
/// and every batch was lost. Loopback carries 64 kB datagrams, so a bulk
/// echo over it must reach a large MTU and lose (almost) nothing.
#[tokio::test]
async fn jumbo_datagrams_carry_bulk_data_without_loss() {
    let quic = QuicConfig {
        max_udp_payload: 16_000,
        ..Default::default()
    };
    let s = setup(quic).await;
    let conn = s.connect().await;
    let (mut send, mut recv) = open_stream(&conn).await;
    const TOTAL: usize = 48 << 20;
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5au8; 64 * 1024];
        for _ in 0..TOTAL / chunk.len() {
            send.write_all(&chunk).await.unwrap();
        }
        send.finish().unwrap();
    });
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    let read = async {
        while let Some(n) = recv.read(&mut buf).await.unwrap() {
            assert!(buf[..n].iter().all(|b| *b == 0x5a));
            got += n;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("bulk echo did not finish in 60 s");
    writer.await.unwrap();
    assert_eq!(got, TOTAL);
    let path = conn.stats().path;
    assert!(
        path.current_mtu > 1452,
        "path-MTU discovery stayed at {}",
        path.current_mtu
    );
    assert!(
        path.lost_packets * 100 <= path.sent_packets,
        "{} of {} packets lost on loopback",
        path.lost_packets,
        path.sent_packets
    );
}

/// An endpoint that dies mid-response (RST) must reach the calling client
/// as a reset too — a clean FIN would pass a cut-off response for a whole
/// one. The exporting side turns the TCP error into a QUIC stream reset;
/// the calling side (the `splice` the outbound listener runs) turns that
/// into a TCP RST.
#[tokio::test]
async fn a_reset_endpoint_reaches_the_caller_as_a_reset_not_an_end() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dying = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dying_addr = dying.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = dying.accept().await {
            let _ = s.write_all(&[b'r'; 1000]).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            drop(s);
        }
    });
    let s = setup_with(
        QuicConfig::default(),
        Some(dying_addr),
        Authorization::default(),
    )
    .await;
    let conn = s.connect().await;
    // The calling gateway's side: a local listener spliced onto a stream.
    let local = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local_addr = local.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = local.accept().await.unwrap();
        let (send, recv) = open_stream(&conn).await;
        causeway_gateway::splice::splice(tcp, send, recv, Duration::from_secs(3600)).await;
    });
    let mut client = tokio::net::TcpStream::connect(local_addr).await.unwrap();
    let mut got = 0usize;
    let mut buf = [0u8; 4096];
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match client.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => got += n,
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the client saw neither an end nor a reset in 10 s");
    assert!(got <= 1000, "{got} bytes from a 1000-byte endpoint");
    let err = end.expect_err("a reset endpoint reached the client as a clean end of stream");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

/// The caller field of the stream header is what the calling gateway says
/// of its workload: it is never what authorization trusts. Site b's
/// gateway claiming site a's identity there is still site b.
#[tokio::test]
async fn a_forged_caller_field_in_the_stream_header_is_ignored() {
    let only_a = Authorization {
        deny_by_default: true,
        rules: [("shop/echo".parse().unwrap(), vec!["a".parse().unwrap()])]
            .into_iter()
            .collect(),
    };
    let s = setup_with(QuicConfig::default(), None, only_a).await;
    let conn = s.connect().await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let forged = OpenRequest {
        service: "shop/echo".into(),
        port: 7000,
        deadline_ms: 1000,
        trace: vec![],
        caller: "spiffe://a.causeway/gateway/gw-0".into(),
        subset: String::new(),
    };
    send.write_all(&forged.encode()).await.unwrap();
    assert_eq!(read_status(&mut recv).await.unwrap(), Status::Forbidden);
}

/// One QUIC Initial sent from an address that never answers (as a spoofed
/// source would be) gets at most three times its size back: the gateway
/// cannot be used to amplify a flood at a third party (RFC 9000 §8.1).
/// Everything the server sends to that address is counted until it has
/// been quiet for 3 s (its retransmission timers fire within that). The
/// gateway answers with a Retry (`quic.retry`, on by default): ~110 bytes.
/// Without it quinn answered 3,738 bytes (3.1×) here — over the limit.
#[tokio::test]
async fn an_initial_from_a_silent_address_gets_at_most_three_times_its_size_back() {
    let s = setup(QuicConfig::default()).await;
    // The real client dials a relay, which passes its first datagram (the
    // Initial, padded to at least 1,200 bytes) on from another socket that
    // never answers.
    let relay = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let _connecting = s
        .client
        .connect_with(s.client_cfg.clone(), relay.local_addr().unwrap(), "gateway")
        .unwrap();
    let mut buf = vec![0u8; 65_536];
    let (initial, _) = relay.recv_from(&mut buf).await.unwrap();
    assert!(initial >= 1200, "an Initial is padded: {initial} bytes");
    silent
        .send_to(&buf[..initial], s.server.local_addr().unwrap())
        .await
        .unwrap();
    let (mut back, mut datagrams) = (0, 0);
    while let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_secs(3), silent.recv_from(&mut buf)).await
    {
        back += n;
        datagrams += 1;
    }
    eprintln!("one {initial}-byte Initial from a silent address: {datagrams} datagrams, {back} bytes back");
    assert!(datagrams > 0, "the server never answered the Initial");
    assert!(
        back <= 3 * initial,
        "{back} bytes sent to an unvalidated address for {initial} received"
    );
}
