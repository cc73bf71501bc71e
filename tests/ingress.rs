//! North-south ingress end to end: a plain TLS client outside the mesh
//! reaches a service exported by another site through a gateway's ingress
//! listener — certificate chosen by SNI and reloaded when its files
//! change, HTTP/1.1 and HTTP/2 by ALPN, the service's HTTPRoute applied,
//! and client certificates when the ingress asks for them.

mod common;

use std::path::Path;
use std::sync::Arc;

use causeway_api::identity::{CertificateAuthority, Credential};
use causeway_gateway::ingress::{CertConfig, IngressConfig, IngressRoute};
use common::l7::*;
use common::*;
use http_body_util::Full;

/// A server certificate for `host`, written as `<dir>/<name>.pem|.key`.
fn write_cert(ca: &CertificateAuthority, dir: &Path, name: &str, host: &str) -> Credential {
    let id = format!("spiffe://ingress.test/{name}").parse().unwrap();
    let c = ca.issue(&id, &[host], Duration::from_secs(3600)).unwrap();
    // Written whole to a temporary name, then renamed: the gateway never
    // reads half a file.
    for (ext, text) in [("pem", &c.cert_pem), ("key", &c.key_pem)] {
        let tmp = dir.join(format!("{name}.{ext}.new"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(format!("{name}.{ext}"))).unwrap();
    }
    c
}

/// What a TLS connection to the ingress saw.
struct Tls {
    client: Client,
    leaf: Vec<u8>,
}

/// Connects with SNI `host`, offering HTTP/2 or HTTP/1.1 by ALPN, trusting
/// `ca`, presenting `client_cert` if given.
async fn connect(
    addr: SocketAddr,
    host: &str,
    h2: bool,
    ca: &CertificateAuthority,
    client_cert: Option<&Credential>,
) -> std::io::Result<Tls> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der.clone()).unwrap();
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut cfg = match client_cert {
        None => builder.with_no_client_auth(),
        Some(c) => builder
            .with_client_auth_cert(c.chain.clone(), c.key_der().unwrap())
            .unwrap(),
    };
    cfg.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    let tls = connector.connect(name, tcp).await?;
    let (_, session) = tls.get_ref();
    let leaf = session.peer_certificates().unwrap()[0].to_vec();
    assert_eq!(
        session.alpn_protocol(),
        Some(if h2 { &b"h2"[..] } else { &b"http/1.1"[..] })
    );
    let io = hyper_util::rt::TokioIo::new(tls);
    let client = if h2 {
        let (s, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Client::H2(s)
    } else {
        let (s, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Client::H1(s)
    };
    Ok(Tls { client, leaf })
}

/// `GET path` with `host` as Host/:authority: status and body.
async fn get(c: &mut Client, host: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let a = c.get_at("https", host, path, headers).await;
    (a.status, a.body)
}

/// Whether the ingress refuses a client presenting `cert` (or none): the
/// handshake fails, or (TLS 1.3) the first request on it does.
async fn refused(addr: SocketAddr, ca: &CertificateAuthority, cert: Option<&Credential>) -> bool {
    match connect(addr, "shop.example", false, ca, cert).await {
        Err(_) => true,
        Ok(mut t) => match &mut t.client {
            Client::H1(s) => {
                let req = hyper::Request::get("/")
                    .header("host", "shop.example")
                    .body(Full::new(bytes::Bytes::new()))
                    .unwrap();
                s.send_request(req).await.is_err()
            }
            Client::H2(_) => unreachable!("connected with HTTP/1.1"),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_outside_the_mesh_reaches_a_service_in_another_site() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (v1, _) = backend("v1", Mode::Answer).await;
    let (v2, _) = backend("v2", Mode::Answer).await;
    fed.add_site("east", &vip_range(), &[]).await.unwrap();
    fed.add_site("central", &vip_range(), &[]).await.unwrap();
    add_exports_and_restart(
        &mut fed,
        "east",
        &versioned_export(&[(v1, "v1"), (v2, "v2")]),
    )
    .await;
    apply_policies(
        &fed,
        tmp.path(),
        "apiVersion: causeway.dev/v1alpha1\nkind: HTTPRoute\nmetadata: {name: web, namespace: shop}\nspec:\n  service: web\n  rules:\n  - matches: [{headers: [{name: x-user, value: alice}]}]\n    backendRefs: [{subset: v2}]\n  - backendRefs: [{subset: v1}]\n",
    )
    .await;

    let ca = CertificateAuthority::generate("ingress test CA").unwrap();
    let certs = tmp.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let shop = write_cert(&ca, &certs, "shop", "shop.example");
    let admin = write_cert(&ca, &certs, "admin", "admin.example");
    let listen = free_port().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    let ingress = |client_ca: Option<std::path::PathBuf>| IngressConfig {
        listen: addr.to_string(),
        certificates: ["shop", "admin"]
            .iter()
            .map(|n| CertConfig {
                hosts: vec![format!("{n}.example")],
                cert: certs.join(format!("{n}.pem")),
                key: certs.join(format!("{n}.key")),
            })
            .collect(),
        client_ca,
        client_auth: None,
        routes: ["shop.example", "admin.example"]
            .iter()
            .map(|h| IngressRoute {
                host: h.to_string(),
                service: "shop/web".into(),
                port: 8080,
            })
            .collect(),
    };
    fed.edit_gateway_config("central", |cfg| cfg.ingress = Some(ingress(None)))
        .unwrap();
    fed.restart_gateway("central").await.unwrap();

    for h2 in [false, true] {
        tracing::info!(h2, "phase: routed through the ingress");
        let mut tls = eventually(
            Duration::from_secs(30),
            "the ingress to route to web",
            async || {
                let mut t = connect(addr, "shop.example", h2, &ca, None)
                    .await
                    .map_err(|e| e.to_string())?;
                let got = get(&mut t.client, "shop.example", "/", &[]).await;
                equals(got, &(200, "v1 /".to_string()))?;
                Ok::<_, String>(t)
            },
        )
        .await;
        assert_eq!(
            tls.leaf,
            shop.chain[0].to_vec(),
            "SNI shop.example gets its certificate"
        );
        assert_eq!(
            get(
                &mut tls.client,
                "shop.example",
                "/cart",
                &[("x-user", "alice")]
            )
            .await,
            (200, "v2 /cart".into()),
            "the service's HTTPRoute applies to ingress traffic"
        );
        let mut other = connect(addr, "admin.example", h2, &ca, None).await.unwrap();
        assert_eq!(
            other.leaf,
            admin.chain[0].to_vec(),
            "SNI admin.example gets its own"
        );
        assert_eq!(
            get(&mut other.client, "admin.example", "/", &[]).await.0,
            200
        );
        let (status, body) = get(&mut other.client, "nobody.example", "/", &[]).await;
        assert_eq!(status, 404, "{body}");
    }

    tracing::info!("phase: the certificate files change and the next handshake has the new one");
    let renewed = write_cert(&ca, &certs, "shop", "shop.example");
    eventually(
        Duration::from_secs(20),
        "the renewed certificate to be served",
        async || {
            let t = connect(addr, "shop.example", false, &ca, None)
                .await
                .map_err(|e| e.to_string())?;
            (t.leaf == renewed.chain[0].to_vec())
                .then_some(())
                .ok_or_else(|| "old certificate".to_string())
        },
    )
    .await;
    // A broken file keeps the last good certificate.
    std::fs::write(certs.join("shop.pem"), "not a certificate").unwrap();
    eventually(
        Duration::from_secs(20),
        "the bad file to be refused",
        async || {
            let m = http_get(fed.sites["central"].gateway_admin, "/metrics").await;
            let errors = metric(&m, r#"causeway_ingress_cert_reloads_total{result="error"}"#);
            (errors >= 1.0).then_some(()).ok_or(errors)
        },
    )
    .await;
    let mut t = connect(addr, "shop.example", true, &ca, None)
        .await
        .unwrap();
    assert_eq!(t.leaf, renewed.chain[0].to_vec());
    assert_eq!(get(&mut t.client, "shop.example", "/", &[]).await.0, 200);

    tracing::info!("phase: client certificates required");
    write_cert(&ca, &certs, "shop", "shop.example");
    let client_ca = CertificateAuthority::generate("clients").unwrap();
    let ca_file = certs.join("clients.pem");
    std::fs::write(&ca_file, &client_ca.cert_pem).unwrap();
    fed.edit_gateway_config("central", |cfg| cfg.ingress = Some(ingress(Some(ca_file))))
        .unwrap();
    fed.restart_gateway("central").await.unwrap();
    let member = client_ca
        .issue(
            &"spiffe://clients.test/app".parse().unwrap(),
            &[],
            Duration::from_secs(600),
        )
        .unwrap();
    let mut t = eventually(
        Duration::from_secs(30),
        "a client with a certificate to get through",
        async || {
            let mut t = connect(addr, "shop.example", false, &ca, Some(&member))
                .await
                .map_err(|e| e.to_string())?;
            equals(get(&mut t.client, "shop.example", "/", &[]).await.0, &200)?;
            Ok::<_, String>(t)
        },
    )
    .await;
    assert_eq!(
        get(&mut t.client, "shop.example", "/x", &[]).await,
        (200, "v1 /x".into())
    );
    assert!(
        refused(addr, &ca, None).await,
        "a client without a certificate is refused"
    );
    let stranger = CertificateAuthority::generate("strangers")
        .unwrap()
        .issue(
            &"spiffe://x.test/y".parse().unwrap(),
            &[],
            Duration::from_secs(600),
        )
        .unwrap();
    assert!(
        refused(addr, &ca, Some(&stranger)).await,
        "a certificate from another CA is refused"
    );
    fed.shutdown().await;
}

/// Bad ingress settings are refused with every mistake named.
#[test]
fn bad_ingress_settings_name_each_field() {
    let cfg = IngressConfig {
        listen: "nowhere".into(),
        certificates: vec![CertConfig {
            hosts: vec!["bad host".into()],
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
        }],
        client_ca: None,
        client_auth: Some("maybe".into()),
        routes: vec![IngressRoute {
            host: "a.example".into(),
            service: "noslash".into(),
            port: 0,
        }],
    };
    let mut errs = Vec::new();
    assert!(cfg.validate(&mut errs).is_none());
    let text = errs.join("\n");
    for want in [
        "ingress.listen: \"nowhere\" is not an ip:port address",
        "ingress.certificates[0].hosts: \"bad host\" is not a host name",
        "ingress.certificates[0]: cert /nonexistent/cert.pem:",
        "ingress.client_auth: needs client_ca",
        "ingress.routes[0].service:",
        "ingress.routes[0].port: must be 1-65535",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}
