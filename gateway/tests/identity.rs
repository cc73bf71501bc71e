//! Tunnel identity, end to end over real QUIC on loopback: a gateway is
//! accepted only with a certificate that chains to the bundle of the site
//! its SPIFFE ID names.

use std::sync::Arc;
use std::time::Duration;

use causeway_api::identity::{CertificateAuthority, Credential};
use causeway_api::model::{SiteName, TrustDomain};
use causeway_api::trust::TrustStore;
use causeway_gateway::tunnel;

fn site(n: &str) -> SiteName {
    n.parse().unwrap()
}

fn td(n: &str) -> TrustDomain {
    format!("{n}.causeway").parse().unwrap()
}

fn leaf(ca: &CertificateAuthority, id: &str) -> Credential {
    ca.issue(&id.parse().unwrap(), &[], Duration::from_secs(3600))
        .unwrap()
}

struct Server {
    endpoint: quinn::Endpoint,
    accepted: tokio::sync::mpsc::UnboundedReceiver<Result<String, String>>,
}

/// A tunnel server for site "a" that trusts sites a and b.
fn server(a: &CertificateAuthority, b: &CertificateAuthority) -> (Server, Arc<TrustStore>) {
    let store = TrustStore::new();
    store.set_site(site("a"), td("a"), vec![a.cert_der.clone()]);
    store.set_site(site("b"), td("b"), vec![b.cert_der.clone()]);
    let cred = leaf(a, "spiffe://a.causeway/gateway/gw-0");
    let cfg = tunnel::server_config(&cred, store.clone(), &Default::default()).unwrap();
    let endpoint = tunnel::endpoint(
        tunnel::bind_udp("127.0.0.1:0".parse().unwrap()).unwrap(),
        cfg,
        &Default::default(),
    )
    .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let ep = endpoint.clone();
    tokio::spawn(async move {
        while let Some(inc) = ep.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                match inc.await {
                    Ok(c) => {
                        let certs = c
                            .peer_identity()
                            .and_then(|i| {
                                i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                                    .ok()
                            })
                            .unwrap();
                        let _ = tx.send(Ok(causeway_api::identity::spiffe_id_of(&certs[0])
                            .unwrap()
                            .to_string()));
                        // Echo one stream so the client sees a working tunnel.
                        while let Ok((mut send, mut recv)) = c.accept_bi().await {
                            let mut buf = [0u8; 1];
                            if recv.read_exact(&mut buf).await.is_ok() {
                                let _ = send.write_all(&buf).await;
                                let _ = send.finish();
                                let _ = send.stopped().await;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            });
        }
    });
    (
        Server {
            endpoint,
            accepted: rx,
        },
        store,
    )
}

/// Dials `server` as `cred`, expecting the server to be site `expect`.
async fn dial(
    server: &quinn::Endpoint,
    client_store: Arc<TrustStore>,
    cred: &Credential,
    expect: &str,
) -> Result<(), String> {
    let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let cfg = tunnel::client_config(cred, client_store, td(expect), &Default::default()).unwrap();
    let conn = client
        .connect_with(cfg, server.local_addr().unwrap(), "gateway")
        .unwrap()
        .await
        .map_err(|e| e.to_string())?;
    // With TLS 1.3 the client may finish before the server has checked its
    // certificate: a refusal then shows up on the first stream.
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(b"x").await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    let mut buf = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(2), recv.read_exact(&mut buf)).await {
        Ok(Ok(())) if buf == *b"x" => Ok(()),
        Ok(Ok(())) => Err("wrong echo".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(conn
            .close_reason()
            .map(|r| r.to_string())
            .unwrap_or_else(|| "no echo".into())),
    }
}

#[tokio::test]
async fn only_certificates_chained_to_their_own_sites_bundle_are_accepted() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let a = CertificateAuthority::generate("site a").unwrap();
    let b = CertificateAuthority::generate("site b").unwrap();
    let (mut srv, _store) = server(&a, &b);
    // The clients trust site a's bundle for the server side.
    let client_store = TrustStore::new();
    client_store.set_site(site("a"), td("a"), vec![a.cert_der.clone()]);

    // Positive control: site b's own CA, site b's own identity.
    let good = leaf(&b, "spiffe://b.causeway/gateway/gw-0");
    dial(&srv.endpoint, client_store.clone(), &good, "a")
        .await
        .unwrap();
    assert_eq!(
        srv.accepted.recv().await.unwrap().unwrap(),
        "spiffe://b.causeway/gateway/gw-0"
    );

    // A CA nobody trusts.
    let stranger = CertificateAuthority::generate("stranger").unwrap();
    let unknown = leaf(&stranger, "spiffe://b.causeway/gateway/gw-0");
    let _ = dial(&srv.endpoint, client_store.clone(), &unknown, "a").await;
    let refused = srv.accepted.recv().await.unwrap().unwrap_err();
    assert!(
        refused.contains("does not chain to the bundle of site b"),
        "{refused}"
    );

    // Site a's CA vouching for site b's identity.
    let forged = leaf(&a, "spiffe://b.causeway/gateway/gw-0");
    let _ = dial(&srv.endpoint, client_store.clone(), &forged, "a").await;
    let refused = srv.accepted.recv().await.unwrap().unwrap_err();
    assert!(
        refused.contains("does not chain to the bundle of site b"),
        "a cross-site claim must be refused: {refused}"
    );

    // An identity whose trust domain belongs to no member.
    let orphan = leaf(&stranger, "spiffe://x.causeway/gateway/gw-0");
    let _ = dial(&srv.endpoint, client_store.clone(), &orphan, "a").await;
    let refused = srv.accepted.recv().await.unwrap().unwrap_err();
    assert!(refused.contains("belongs to no member site"), "{refused}");

    // The dialer refuses a server that is not the site it meant to reach.
    let err = dial(&srv.endpoint, client_store.clone(), &good, "b")
        .await
        .unwrap_err();
    assert!(
        err.contains("trust domain") || err.contains("unknown"),
        "{err}"
    );

    // Positive control again: the refusals did not break the endpoint.
    dial(&srv.endpoint, client_store.clone(), &good, "a")
        .await
        .unwrap();
}

/// The certificate cases of the negative suite, each through a live QUIC
/// handshake: a client presenting the rogue leaf is refused by the server
/// for its own reason, and a good leaf still gets through afterwards.
#[tokio::test]
async fn rogue_client_certificates_are_refused_in_the_handshake() {
    use rcgen::{date_time_ymd, BasicConstraints, ExtendedKeyUsagePurpose, IsCa, SanType};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let a = CertificateAuthority::generate("site a").unwrap();
    let b = CertificateAuthority::generate("site b").unwrap();
    let (mut srv, store) = server(&a, &b);
    let client_store = TrustStore::new();
    client_store.set_site(site("a"), td("a"), vec![a.cert_der.clone()]);
    let id: causeway_api::model::SpiffeId = "spiffe://b.causeway/gateway/gw-0".parse().unwrap();
    let uri = |s: &str| SanType::URI(s.to_string().try_into().unwrap());
    type Forge = Box<dyn Fn(&mut rcgen::CertificateParams)>;
    let revoked = b.issue_forged(&id, |_| {}).unwrap();
    let serial = causeway_api::identity::serial_hex(&revoked.chain[0]).unwrap();
    store.set_revoked(&site("b"), [serial.clone()]);
    let cases: Vec<(&str, Credential, &str)> = [
        (
            "a leaf with CA:TRUE",
            Box::new(|p: &mut rcgen::CertificateParams| {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)
            }) as Forge,
            "is a CA certificate",
        ),
        (
            "a server-only leaf used as a client",
            Box::new(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]),
            "RequiredEkuNotFound",
        ),
        (
            "not yet valid",
            Box::new(|p| {
                p.not_before = date_time_ymd(2090, 1, 1);
                p.not_after = date_time_ymd(2091, 1, 1);
            }),
            "CertNotValidYet",
        ),
        (
            "expired",
            Box::new(|p| {
                p.not_before = date_time_ymd(2001, 1, 1);
                p.not_after = date_time_ymd(2002, 1, 1);
            }),
            "CertExpired",
        ),
        (
            "no URI SAN",
            Box::new(|p| p.subject_alt_names.clear()),
            "no valid SPIFFE ID",
        ),
        (
            "two URI SANs",
            Box::new(move |p| {
                p.subject_alt_names
                    .push(uri("spiffe://b.causeway/gateway/gw-1"))
            }),
            "no valid SPIFFE ID",
        ),
        (
            "a controller ID from a site CA",
            Box::new(move |p| {
                p.subject_alt_names = vec![uri("spiffe://controller.causeway/admin/root")]
            }),
            "belongs to no member site",
        ),
    ]
    .into_iter()
    .map(|(what, forge, want)| (what, b.issue_forged(&id, forge).unwrap(), want))
    .chain([("a revoked serial", revoked, "was revoked")])
    .collect();
    for (what, cred, want) in &cases {
        let _ = dial(&srv.endpoint, client_store.clone(), cred, "a").await;
        let refused = srv
            .accepted
            .recv()
            .await
            .unwrap()
            .expect_err(&format!("{what}: accepted"));
        assert!(refused.contains(want), "{what}: {refused}");
    }
    // The same CA's ordinary leaf still passes.
    let good = leaf(&b, "spiffe://b.causeway/gateway/gw-0");
    dial(&srv.endpoint, client_store, &good, "a").await.unwrap();
    assert!(srv.accepted.recv().await.unwrap().is_ok());
}
