//! Trust rotation end to end: a site CA rotated in three steps, old tunnels
//! retired, certificates renewed in place.

mod common;

use common::*;

/// The CA certificates the controllers hold for `site`.
async fn published_bundle(fed: &LocalFederation, site: &str) -> Vec<String> {
    let mut c = fed.admin_client(None).unwrap().federation().await.unwrap();
    let cat = c
        .catalog(causeway_api::pb::CatalogRequest::default())
        .await
        .unwrap()
        .into_inner();
    let pem = &cat
        .sites
        .iter()
        .find(|s| s.name == site)
        .unwrap()
        .trust_bundle_pem;
    pem.split_inclusive("-----END CERTIFICATE-----")
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect()
}

/// Waits (up to 10 s) until `site`'s gateway has logged `needle`.
async fn wait_gateway_log(fed: &LocalFederation, site: &str, needle: &str) {
    eventually(
        Duration::from_secs(10),
        format_args!("{site}'s gateway to log {needle:?}"),
        async || {
            let log = fed.sites[site].gateway.log_tail(40);
            log.contains(needle).then_some(()).ok_or(log)
        },
    )
    .await;
}

/// `ca rotate-site finish` for `site`, then SIGHUP its gateway and wait
/// until it issues its tunnel certificate from the new CA.
async fn finish_rotation(fed: &LocalFederation, site: &str) {
    let dir = fed.sites[site].state_dir.to_str().unwrap().to_string();
    let (code, out) = run_bin(&["ca", "rotate-site", "--state-dir", &dir, "finish"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("SIGHUP"), "{out}");
    let pid = fed.sites[site].gateway.pid().unwrap();
    let st = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    wait_gateway_log(fed, site, "tunnel certificate renewed").await;
    let log = fed.sites[site].gateway.log_tail(40);
    assert!(log.contains("site CA on disk changed"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_ca_rotates_in_three_steps_and_prune_retires_old_tunnels() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    // A retired tunnel keeps its streams this long (default 10 s).
    fed.gateway_base.retire_grace_secs = 5.0;
    let (vip, _echo) = echo_sites_ready(&mut fed).await;
    let target = SocketAddr::new(vip, 7000);
    let east_dir = fed.sites["east"].state_dir.clone();
    let dir = east_dir.to_str().unwrap();
    let old_ca = std::fs::read_to_string(east_dir.join("site-ca.pem")).unwrap();
    assert_eq!(published_bundle(&fed, "east").await, [old_ca.trim()]);

    tracing::info!("phase: a connection from west through east, held open");
    let mut held = tokio::net::TcpStream::connect(target).await.unwrap();
    held.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    held.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"before");

    tracing::info!("phase: start: peers trust the old and the new CA");
    let (code, out) = run_bin(&["ca", "rotate-site", "--state-dir", dir, "start"]);
    assert_eq!(code, 0, "{out}");
    let new_ca = std::fs::read_to_string(east_dir.join("site-ca-next.pem")).unwrap();
    assert_eq!(
        published_bundle(&fed, "east").await,
        [old_ca.trim(), new_ca.trim()]
    );
    let (code, out) = run_bin(&["ca", "rotate-site", "--state-dir", dir, "start"]);
    assert_ne!(code, 0, "a second start was accepted: {out}");
    assert!(out.contains("already under way"), "{out}");

    tracing::info!("phase: finish, and SIGHUP east: it issues from the new CA");
    finish_rotation(&fed, "east").await;

    tracing::info!("phase: the held connection is still up");
    held.write_all(b"after!").await.unwrap();
    held.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"after!");

    tracing::info!("phase: prune: the new CA alone");
    let (code, out) = run_bin(&["ca", "rotate-site", "--state-dir", dir, "prune"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(published_bundle(&fed, "east").await, [new_ca.trim()]);
    assert!(!east_dir.join("site-ca-prev.pem").exists());

    // Once west has retired the tunnel, within the grace, the stream in
    // flight carries on.
    wait_gateway_log(&fed, "west", "retiring tunnels").await;
    held.write_all(b"grace!").await.unwrap();
    held.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"grace!");

    tracing::info!("phase: new streams take a fresh tunnel; the one made with the old CA is cut after its grace");
    wait_tunnel(target).await;
    let cut = tokio::time::timeout(Duration::from_secs(30), async {
        let mut rest = Vec::new();
        let _ = held.read_to_end(&mut rest).await;
    })
    .await;
    assert!(cut.is_ok(), "a tunnel made with the pruned CA stayed up");

    tracing::info!("phase: a restarted west makes a new tunnel, trusting only the new CA");
    let bin = fed.bin.clone();
    let west = &mut fed.sites.get_mut("west").unwrap().gateway;
    west.kill().await;
    west.start(&bin).unwrap();
    wait_tunnel(target).await;

    tracing::info!("phase: an admin sets a bundle from a file (a CA kept elsewhere)");
    let file = tmp.path().join("bundle.pem");
    std::fs::write(&file, format!("{old_ca}{new_ca}")).unwrap();
    let out = fed
        .ctl(&["cluster", "set-bundle", "east", file.to_str().unwrap()])
        .await
        .unwrap();
    assert!(out.contains("now trusts the 2 CA certificate(s)"), "{out}");
    assert_eq!(
        published_bundle(&fed, "east").await,
        [old_ca.trim(), new_ca.trim()]
    );
    std::fs::write(&file, "not a certificate").unwrap();
    let e = fed
        .ctl(&["cluster", "set-bundle", "east", file.to_str().unwrap()])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("trust_bundle_pem"), "{e}");
    fed.shutdown().await;
}

/// The calling site rotates its CA and prunes the old one. The exporting
/// site retires the tunnel the caller made with its old certificate: that
/// tunnel takes no new stream from then on (they are refused as
/// `Retired`), and the caller, told so, asks again over a fresh tunnel, so
/// no call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_caller_prunes_its_old_ca_no_new_stream_rides_its_old_tunnel() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (vip, _echo) = echo_sites_ready(&mut fed).await;
    let target = SocketAddr::new(vip, 7000);
    let west_dir = fed.sites["west"].state_dir.clone();
    let dir = west_dir.to_str().unwrap().to_string();

    tracing::info!("phase: west rotates to a new CA; its tunnel to east stays up");
    let (code, out) = run_bin(&["ca", "rotate-site", "--state-dir", &dir, "start"]);
    assert_eq!(code, 0, "{out}");
    finish_rotation(&fed, "west").await;
    wait_tunnel(target).await;
    let east_admin = fed.sites["east"].gateway_admin;
    let refused = r#"causeway_tunnel_streams_total{direction="in",status="retired"}"#;
    assert_eq!(
        metric(&http_get(east_admin, "/metrics").await, refused),
        0.0
    );

    tracing::info!("phase: west prunes the old CA; east retires the old tunnel");
    let (code, out) = run_bin(&["ca", "rotate-site", "--state-dir", &dir, "prune"]);
    assert_eq!(code, 0, "{out}");
    wait_gateway_log(&fed, "east", "retiring tunnels").await;

    tracing::info!("phase: within the grace, every call gets through, none over the old tunnel");
    for i in 0..5u8 {
        let msg = [b'a' + i; 8];
        let got = tokio::time::timeout(Duration::from_secs(5), try_echo_roundtrip(target, &msg))
            .await
            .expect("a call hung")
            .expect("a call failed");
        assert_eq!(got, msg);
    }
    let east = http_get(east_admin, "/metrics").await;
    assert_eq!(
        metric(&east, refused),
        1.0,
        "exactly the first new stream should have met the retired tunnel"
    );
    let west = http_get(fed.sites["west"].gateway_admin, "/metrics").await;
    assert_eq!(
        metric(&west, r#"causeway_tunnel_status_total{status="retired"}"#),
        1.0
    );
    assert!(
        fed.sites["west"]
            .gateway
            .log_tail(40)
            .contains("peer retired the tunnel"),
        "west never said why it redialed"
    );
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_certificates_renew_in_place_without_dropping_tunnels() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    // Three-second certificates: renewed every two seconds.
    fed.gateway_base.cert_ttl_secs = 3.0;
    let (vip, _echo) = echo_sites_ready(&mut fed).await;
    let target = SocketAddr::new(vip, 7000);
    let west_admin = fed.sites["west"].gateway_admin;
    let dials = || async move {
        metric(
            &http_get(west_admin, "/metrics").await,
            "causeway_tunnel_connections_total{direction=\"out\",result=\"ok\"}",
        )
    };

    tracing::info!("phase: hold a stream open across more than two certificate lifetimes");
    let mut held = tokio::net::TcpStream::connect(target).await.unwrap();
    let mut buf = [0u8; 5];
    held.write_all(b"first").await.unwrap();
    held.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"first");
    let dials_before = dials().await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    held.write_all(b"after").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), held.read_exact(&mut buf))
        .await
        .expect("the held stream stalled")
        .unwrap();
    assert_eq!(&buf, b"after");
    assert_eq!(dials().await, dials_before, "the tunnel was redialed");
    for site in ["east", "west"] {
        let m = http_get(fed.sites[site].gateway_admin, "/metrics").await;
        assert!(
            metric(&m, "causeway_gateway_cert_renewals_total{result=\"ok\"}") >= 2.0,
            "{site} did not renew:\n{m}"
        );
    }
    drop(held);

    tracing::info!("phase: new handshakes both ways use the renewed certificates");
    // West restarts: it dials east, whose first certificate expired long ago.
    let bin = fed.bin.clone();
    let west = &mut fed.sites.get_mut("west").unwrap().gateway;
    west.kill().await;
    west.start(&bin).unwrap();
    wait_listening(target).await;
    wait_tunnel(target).await;
    // East restarts after west's own first certificate expired: west redials
    // with its renewed client certificate.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let east = &mut fed.sites.get_mut("east").unwrap().gateway;
    east.kill().await;
    east.start(&bin).unwrap();
    wait_listening(target).await;
    wait_tunnel(target).await;
    assert_eq!(echo_roundtrip(target, b"renewed").await, b"renewed");
    fed.shutdown().await;
}
