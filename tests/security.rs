//! Security end to end: least privilege per RPC, removed sites, deny-by-default
//! authorization and garbage on the public ports.

mod common;

use common::*;

/// Makes each call (`"what" => client.method(request)`) and asserts it is
/// refused with a permission error that says what the call needs.
macro_rules! refused {
    ($($what:expr => $client:ident . $method:ident ($req:expr)),+ $(,)?) => {
        $( denied($client.$method($req).await, $what); )+
    };
}

fn denied<T>(r: Result<tonic::Response<T>, tonic::Status>, what: &str) {
    let Err(e) = r else {
        panic!("{what}: allowed, expected a permission error")
    };
    assert_eq!(
        e.code(),
        tonic::Code::PermissionDenied,
        "{what}: {}",
        e.message()
    );
    assert!(e.message().contains("needs"), "{what}: {}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_tunnel_and_dns_ports_is_survived() {
    use rand::Rng;
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let name = "echo.shop.svc.clusterset.local";
    let (vip, _echo) = echo_sites_ready(&mut fed).await;
    let target = SocketAddr::new(vip, 7000);

    tracing::info!("phase: random datagrams at both tunnel ports and the DNS port");
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let targets = [
        fed.sites["east"].tunnel,
        fed.sites["west"].tunnel,
        fed.sites["west"].dns,
    ];
    let mut rng = rand::rng();
    for i in 0..600 {
        let len = rng.random_range(1..1500);
        let mut buf: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if i % 3 == 0 {
            // Looks like a QUIC long-header Initial.
            buf[0] = 0xc3;
            if buf.len() > 5 {
                buf[1..5].copy_from_slice(&1u32.to_be_bytes());
            }
        }
        sock.send_to(&buf, targets[i % targets.len()])
            .await
            .unwrap();
    }

    tracing::info!("phase: garbage over DNS TCP, including a huge length prefix");
    for i in 0..20 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(fed.sites["west"].dns).await {
            let garbage: Vec<u8> = if i == 0 {
                vec![0xff, 0xff, 1, 2, 3]
            } else {
                (0..rng.random_range(1..600))
                    .map(|_| rng.random())
                    .collect()
            };
            let _ = s.write_all(&garbage).await;
            let _ = s.shutdown().await;
        }
    }

    tracing::info!("phase: everything still works");
    let got = echo_roundtrip(target, b"still here").await;
    assert_eq!(got, b"still here");
    let short = dig(fed.sites["west"].dns, &["+short", name, "A"]);
    assert_eq!(short.trim(), vip.to_string());
    for s in fed.sites.values_mut() {
        assert!(s.gateway.exited().is_none(), "gateway {} died", s.name);
        assert!(s.dns_proc.exited().is_none(), "dns {} died", s.name);
    }
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_forbidden_call_gets_a_clear_permission_error() {
    use causeway_api::pb;
    use causeway_api::pb::raft_client::RaftClient;
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let fed = federation(&tmp).await;
    let alpha = join_in_process(&fed, "alpha").await;
    let _beta = join_in_process(&fed, "beta").await;
    let site_ch = alpha.controller_client().channel().await.unwrap();
    let mut site = pb::federation_client::FederationClient::new(site_ch.clone());
    let anon_ch = causeway_api::client::ControllerClient::new(
        fed.endpoints(),
        &alpha.controller_ca_pem,
        None,
    )
    .channel()
    .await
    .unwrap();
    let mut anon = pb::federation_client::FederationClient::new(anon_ch.clone());

    let mut raft_as_site = RaftClient::new(site_ch);
    let mut raft_as_admin =
        RaftClient::new(fed.admin_client(None).unwrap().channel().await.unwrap());
    let mut raft_anon = RaftClient::new(anon_ch);
    let payload = || pb::RaftPayload::new(b"{}".to_vec());
    tracing::info!("phase: a site may not act for another site or as an admin");
    refused! {
        "publish for beta" => site.publish_exports(pb::PublishExportsRequest {
            site: "beta".into(),
            ..Default::default()
        }),
        "heartbeat for beta" => site.heartbeat(pb::HeartbeatRequest { site: "beta".into() }),
        "token" => site.create_join_token(pb::CreateJoinTokenRequest {
            site: "gamma".into(),
            ..Default::default()
        }),
        "remove site" => site.remove_site(pb::RemoveSiteRequest { site: "beta".into() }),
        "add controller" => site.add_controller(pb::AddControllerRequest {
            id: 9,
            addr: "127.0.0.1:1".into(),
        }),
        "remove controller" => site.remove_controller(pb::RemoveControllerRequest { id: 1 }),
        "save a snapshot" => site.save_snapshot(pb::SaveSnapshotRequest {}),
        "trust bundle for beta" => site.update_trust_bundle(pb::UpdateTrustBundleRequest {
            site: "beta".into(),
            trust_bundle_pem: some_ca_pem(),
        }),
        "labels of its own site" => site.set_site_labels(pb::SetSiteLabelsRequest {
            site: "alpha".into(),
            labels: [("region".to_string(), "eu".to_string())].into(),
        }),
        "revoke beta's certificate" => site.revoke_certificate(pb::RevokeCertificateRequest {
            site: "beta".into(),
            serial: "01".into(),
            cert_pem: String::new(),
        }),
        "revoke a credential" => site.revoke_credential(pb::RevokeCredentialRequest {
            sha256: "0".repeat(64),
            cert_pem: String::new(),
        }),
    }

    tracing::info!("phase: a site manages only the policies it applied");
    let split = |name: &str| pb::ApplyPoliciesRequest {
        documents_json: vec![format!(
            r#"{{"apiVersion":"causeway.dev/v1alpha1","kind":"TrafficSplit","metadata":{{"name":"{name}","namespace":"shop"}},"spec":{{"service":"web","weights":{{"alpha":1}}}}}}"#
        )],
        ..Default::default()
    };
    let mut admin = pb::federation_client::FederationClient::new(
        fed.admin_client(None).unwrap().channel().await.unwrap(),
    );
    admin.apply_policies(split("ops")).await.unwrap();
    site.apply_policies(split("alpha-owned")).await.unwrap();
    let listed = site
        .list_policies(pb::ListPoliciesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .policies;
    let owners: Vec<(&str, &str)> = listed
        .iter()
        .map(|p| (p.name.as_str(), p.owner_site.as_str()))
        .collect();
    assert_eq!(owners, [("alpha-owned", "alpha"), ("ops", "")]);
    let e = site.apply_policies(split("ops")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    assert!(
        e.message().contains("applied by an operator"),
        "{}",
        e.message()
    );
    let e = site
        .delete_policy(pb::DeletePolicyRequest {
            kind: "TrafficSplit".into(),
            namespace: "shop".into(),
            name: "ops".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    site.delete_policy(pb::DeletePolicyRequest {
        kind: "TrafficSplit".into(),
        namespace: "shop".into(),
        name: "alpha-owned".into(),
    })
    .await
    .unwrap();

    tracing::info!("phase: only controller nodes speak Raft");
    refused! {
        "append as site" => raft_as_site.append_entries(payload()),
        "vote as site" => raft_as_site.vote(payload()),
        "snapshot as site" => raft_as_site.install_snapshot(payload()),
        "propose as site" => raft_as_site.propose(payload()),
        "membership as site" => raft_as_site.change_membership(payload()),
        "vote as admin" => raft_as_admin.vote(payload()),
    }

    tracing::info!("phase: without a certificate only Join is open");
    refused! {
        "anonymous catalog" => anon.catalog(pb::CatalogRequest::default()),
        "anonymous status" => anon.status(pb::StatusRequest {}),
        "anonymous watch" => anon.watch(pb::WatchRequest { from_revision: 0, ..Default::default() }),
        "anonymous append" => raft_anon.append_entries(payload()),
        "anonymous trust bundle" => anon.update_trust_bundle(pb::UpdateTrustBundleRequest {
            site: "alpha".into(),
            trust_bundle_pem: some_ca_pem(),
        }),
        "anonymous certificate revocation" => anon.revoke_certificate(pb::RevokeCertificateRequest {
            site: "alpha".into(),
            serial: "01".into(),
            cert_pem: String::new(),
        }),
    }

    tracing::info!("phase: a bundle must be CA certificates");
    let leaf = alpha.api.cert_pem.clone();
    for (bundle, why) in [
        (String::new(), "no CERTIFICATE block"),
        (
            "-----BEGIN CERTIFICATE-----\nnope\n".to_string(),
            "trust_bundle_pem",
        ),
        (leaf, "must be a CA certificate"),
        ("x".repeat(70_000), "64 KiB"),
    ] {
        let e = site
            .update_trust_bundle(pb::UpdateTrustBundleRequest {
                site: "alpha".into(),
                trust_bundle_pem: bundle,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains("trust_bundle_pem"), "{}", e.message());
        assert!(e.message().contains(why), "{}", e.message());
    }

    tracing::info!("phase: limits");
    let too_many: Vec<pb::Export> = (0..1001)
        .map(|i| pb::Export {
            service: format!("ns/s{i}"),
            ports: vec![pb::ServicePort {
                port: 80,
                protocol: "tcp".into(),
                name: String::new(),
            }],
            ..Default::default()
        })
        .collect();
    let e = site
        .publish_exports(pb::PublishExportsRequest {
            site: "alpha".into(),
            exports: too_many,
            tunnel_addrs: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("at most 1000"), "{}", e.message());
    let long = "a".repeat(64);
    let e = fed.create_token(&long).await.unwrap_err();
    assert!(e.to_string().contains("1-63 characters"), "{e}");
}

/// A CA certificate that is a valid bundle (the forbidden calls must be
/// refused for who calls, not for what they send).
fn some_ca_pem() -> String {
    causeway_api::identity::CertificateAuthority::generate("test CA")
        .unwrap()
        .cert_pem
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_site_tears_down_its_tunnels_and_refuses_its_credential() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (echo, _task) = echo_server(Some("east".into())).await.unwrap();
    add_echo_sites(&mut fed, echo).await;
    let vip = echo_vip(&fed, "west").await;
    let target = SocketAddr::new(vip, 7000);
    wait_call(target).await;

    tracing::info!("phase: a long-lived connection from west through east");
    let sock = tokio::net::TcpStream::connect(target).await.unwrap();
    let (r, _w) = sock.into_split();
    let mut r = tokio::io::BufReader::new(r);
    let mut line = String::new();
    use tokio::io::AsyncBufReadExt;
    r.read_line(&mut line).await.unwrap();
    assert_eq!(line.trim(), "east");

    tracing::info!("phase: a watch open with west's credential");
    let state = causeway_gateway::site::SiteState::load(&fed.sites["west"].state_dir)
        .unwrap()
        .unwrap();
    let mut c = state.controller_client().federation().await.unwrap();
    let mut watch = c
        .watch(causeway_api::pb::WatchRequest {
            from_revision: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().expect("a first snapshot");

    tracing::info!("phase: remove west");
    fed.ctl(&["cluster", "remove", "west"]).await.unwrap();

    tracing::info!("phase: west's open watch ends with a permission error");
    let end = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match watch.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("a removed site's watch kept streaming");
    match end {
        Err(s) => {
            assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
            assert!(s.message().contains("removed"), "{s:?}");
        }
        Ok(other) => panic!("watch ended without saying why: {other:?}"),
    }

    tracing::info!("phase: east tears the tunnel down; the connection ends");
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(15), r.read_to_end(&mut rest)).await;
    assert!(
        ended.is_ok(),
        "west's connection through east was not torn down"
    );
    let log = fed.sites["east"].gateway.log_tail(20);
    assert!(log.contains("site left the federation"), "{log}");

    tracing::info!("phase: west's credential is refused by the controllers");
    denied(
        c.catalog(causeway_api::pb::CatalogRequest::default()).await,
        "catalog by a removed site",
    );
    denied(
        c.heartbeat(causeway_api::pb::HeartbeatRequest {
            site: "west".into(),
        })
        .await,
        "heartbeat by a removed site",
    );

    tracing::info!("phase: new connections from west no longer reach east");
    let r = causeway::local::call_banner(target, "y").await;
    assert!(r.is_err(), "a removed site still reached east: {r:?}");
    fed.shutdown().await;
}

/// A gateway replica's key leaked: revoking its tunnel certificate by
/// serial ends the tunnels it authenticated within 10 s (measured), its own
/// gateway takes a fresh certificate, and traffic flows again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_gateway_certificate_loses_its_tunnels_within_seconds() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (echo, _task) = echo_server(Some("east".into())).await.unwrap();
    add_echo_sites(&mut fed, echo).await;
    let vip = echo_vip(&fed, "west").await;
    let target = SocketAddr::new(vip, 7000);
    wait_call(target).await;

    tracing::info!("phase: a long-lived connection from west through east");
    let sock = tokio::net::TcpStream::connect(target).await.unwrap();
    let (r, _w) = sock.into_split();
    let mut r = tokio::io::BufReader::new(r);
    let mut line = String::new();
    use tokio::io::AsyncBufReadExt;
    r.read_line(&mut line).await.unwrap();
    assert_eq!(line.trim(), "east");

    let cert_file = |site: &str| {
        std::fs::read_dir(&fed.sites[site].state_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                let n = p.file_name().unwrap().to_string_lossy().to_string();
                n.starts_with("tunnel-") && n.ends_with(".pem")
            })
            .expect("the gateway records its tunnel certificate")
    };
    let serial_of = |path: &std::path::Path| {
        let pem = std::fs::read_to_string(path).unwrap();
        let der = causeway_api::identity::parse_certs_pem("tunnel cert", &pem).unwrap();
        causeway_api::identity::serial_hex(&der[0]).unwrap()
    };
    let west_cert = cert_file("west");
    let old_serial = serial_of(&west_cert);

    tracing::info!("phase: a site may not revoke another site's certificate");
    let east = causeway_gateway::site::SiteState::load(&fed.sites["east"].state_dir)
        .unwrap()
        .unwrap();
    let mut as_east = east.controller_client().federation().await.unwrap();
    denied(
        as_east
            .revoke_certificate(causeway_api::pb::RevokeCertificateRequest {
                site: "west".into(),
                serial: old_serial.clone(),
                cert_pem: String::new(),
            })
            .await,
        "east revoking west's certificate",
    );
    let bad = fed
        .ctl(&[
            "credential",
            "revoke-certificate",
            "--site",
            "west",
            "--serial",
            "xyz",
        ])
        .await
        .unwrap_err();
    assert!(format!("{bad:#}").contains("serial"), "{bad:#}");

    tracing::info!(serial = %old_serial, "phase: revoke west's tunnel certificate");
    let started = std::time::Instant::now();
    fed.ctl(&[
        "credential",
        "revoke-certificate",
        "--site",
        "west",
        "--cert",
        west_cert.to_str().unwrap(),
    ])
    .await
    .unwrap();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut rest)).await;
    let took = started.elapsed();
    assert!(
        ended.is_ok(),
        "the tunnel of a revoked certificate was still up 10 s after the revocation"
    );
    tracing::info!(?took, "revocation to the tunnel's end");
    eventually(
        Duration::from_secs(10),
        "east to say why it closed west's tunnel",
        async || {
            let log = fed.sites["east"].gateway.log_tail(200);
            log.contains("retiring tunnels whose peer certificate")
                .then_some(())
                .ok_or(log)
        },
    )
    .await;

    tracing::info!("phase: west takes a fresh certificate and traffic flows again");
    eventually(
        Duration::from_secs(20),
        "west to replace its revoked certificate",
        async || {
            let now = serial_of(&west_cert);
            (now != old_serial).then_some(()).ok_or(now)
        },
    )
    .await;
    let got = wait_call(target).await;
    assert_eq!(got, "east");
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_by_default_lets_only_allowed_sites_call_and_says_why() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (echo, _t) = echo_server(Some("east".into())).await.unwrap();
    fed.gateway_base.authorization = "deny".into();
    fed.gateway_base.allow = vec![causeway_gateway::config::AllowConfig {
        service: "shop/echo".into(),
        sites: vec!["west".into()],
    }];
    fed.add_site(
        "east",
        &vip_range(),
        &[Export {
            service: "shop/echo".into(),
            port: 7000,
            endpoints: vec![echo],
        }],
    )
    .await
    .unwrap();
    fed.gateway_base = LocalFederation::default_gateway_config();
    fed.add_site("west", &vip_range(), &[]).await.unwrap();
    fed.add_site("central", &vip_range(), &[]).await.unwrap();
    let name = "echo.shop.svc.clusterset.local";
    let west_vip = fed
        .wait_resolvable("west", name, Duration::from_secs(30))
        .await
        .unwrap();
    let central_vip = fed
        .wait_resolvable("central", name, Duration::from_secs(30))
        .await
        .unwrap();

    tracing::info!("phase: west is allowed");
    wait_call(SocketAddr::new(west_vip, 7000)).await;

    tracing::info!(
        "phase: central is refused, with a reason in its gateway's log and a metric at east"
    );
    let r = causeway::local::call_banner(SocketAddr::new(central_vip, 7000), "y").await;
    assert!(r.is_err(), "central must be refused: {r:?}");
    let log = fed.sites["central"].gateway.log_tail(10);
    assert!(
        log.contains("forbidden: site central may not call shop/echo here"),
        "{log}"
    );
    let m = http_get(fed.sites["east"].gateway_admin, "/metrics").await;
    assert!(
        m.contains("status=\"forbidden\""),
        "no forbidden metric at east"
    );
    fed.shutdown().await;
}

/// Anonymous joins with bad tokens are checked before they reach Raft (the
/// log does not grow), a source failing often is held back, a wrong
/// secret for a real token's id does not burn it, and a site may not be
/// named so its trust domain is the controllers'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_joins_cost_no_raft_entry_are_rate_limited_and_burn_no_token() {
    use causeway_api::client::ControllerClient;
    use causeway_api::pb;
    use causeway_api::token::JoinToken;
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let (fed, leader) = controllers(&tmp, 1, &[]).await;
    let e = fed.create_token("controller").await.unwrap_err();
    assert!(format!("{e:#}").contains("is reserved"), "{e:#}");
    let token = fed.create_token("east").await.unwrap();
    let good = JoinToken::decode(&token).unwrap();
    // The attacker connects from its own loopback address.
    let attacker = ControllerClient::new(fed.endpoints(), &good.ca_pem, None)
        .bind_local("127.0.0.77".parse().unwrap());
    let mut anon = attacker.federation().await.unwrap();
    let join = |t: &JoinToken| pb::JoinRequest {
        token: t.encode(),
        trust_bundle_pem: some_ca_pem(),
        tunnel_addrs: vec!["127.0.0.1:1".into()],
        csr_pem: "not even a CSR".into(),
    };
    let before = fed.status(leader).await.unwrap().last_log_index;

    let mut wrong = good.clone();
    wrong.secret = "00".repeat(32);
    let e = anon.join(join(&wrong)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{}", e.message());
    let (mut refused, mut held_back) = (1, 0);
    for _ in 0..1000 {
        let mut t = good.clone();
        let hex = |n: usize| -> String {
            (0..n)
                .map(|_| format!("{:02x}", rand::random::<u8>()))
                .collect()
        };
        t.id = hex(8);
        t.secret = hex(32);
        match anon.join(join(&t)).await.unwrap_err().code() {
            tonic::Code::Unauthenticated => refused += 1,
            tonic::Code::ResourceExhausted => held_back += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(refused, 20, "20 failures a minute per source");
    assert_eq!(held_back, 981);
    assert_eq!(
        fed.status(leader).await.unwrap().last_log_index,
        before,
        "a bad join became a Raft entry"
    );

    // The owner, from another address, joins with the real token.
    let state = tmp.path().join("east-state");
    std::fs::create_dir_all(&state).unwrap();
    let ca = causeway_gateway::site::SiteState::site_ca(&state, None).unwrap();
    let site =
        causeway_gateway::site::SiteState::join(&state, &token, &ca, vec!["127.0.0.1:1".into()])
            .await
            .unwrap();
    assert_eq!(site.site.as_str(), "east");
}

/// 2,000 idle connections on a gateway's admin port neither lock out a
/// scrape of `/metrics` nor stop the gateway's real work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_on_an_admin_port_do_not_stop_metrics_or_traffic() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (vip, _echo) = echo_sites_ready(&mut fed).await;
    let admin = fed.sites["west"].gateway_admin;
    let mut idle = Vec::new();
    for _ in 0..2000 {
        idle.push(tokio::net::TcpStream::connect(admin).await.unwrap());
    }
    let metrics = http_get(admin, "/metrics").await;
    assert!(
        metrics.contains("causeway_admin_connections_evicted_total"),
        "{metrics}"
    );
    assert_eq!(
        echo_roundtrip(SocketAddr::new(vip, 7000), b"still working").await,
        b"still working"
    );
    // The idle ones were closed to make room (or by the head timeout).
    let mut closed = 0;
    for s in &mut idle {
        let mut b = [0u8; 1];
        if matches!(
            tokio::time::timeout(Duration::from_millis(1), s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        ) {
            closed += 1;
        }
    }
    assert!(
        closed >= 2000 - 256,
        "only {closed} of 2000 idle sockets were closed"
    );
    fed.shutdown().await;
}

/// An HTTP/1.1 endpoint that answers every request with the request's own
/// head as the body (to see which headers arrived).
async fn head_echo() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(1) => head.push(b[0]),
                        _ => return,
                    }
                }
                let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", head.len());
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.write_all(&head).await;
            });
        }
    });
    (addr, task)
}

/// Reads until the peer closes (or resets) the connection.
async fn closed(s: &mut tokio::net::TcpStream) -> Result<Vec<u8>, String> {
    let mut got = Vec::new();
    match s.read_to_end(&mut got).await {
        Ok(_) => Ok(got),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(got),
        Err(e) => Err(e.to_string()),
    }
}

/// Slowloris headers and bodies, idle L4 connections and more connections
/// than a listener allows are all cut; hop-by-hop headers, including the
/// ones `Connection` names, are not forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_idle_and_surplus_clients_are_cut_and_hop_headers_stay_behind() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (echo, _echo) = echo_server(None).await.unwrap();
    let (web, _web) = head_echo().await;
    let export = Export {
        service: "shop/echo".into(),
        port: 7000,
        endpoints: vec![echo],
    };
    fed.add_site("east", &vip_range(), &[export]).await.unwrap();
    add_exports_and_restart(&mut fed, "east", &web_http_export(web)).await;
    // West cuts slow and idle clients after a second; central serves at
    // most three connections per listener.
    fed.gateway_base = LocalFederation::gateway_config_with(
        "[limits]\nhttp_header_timeout_secs = 1\nhttp_body_timeout_secs = 1\nidle_timeout_secs = 1\n",
    )
    .unwrap();
    fed.add_site("west", &vip_range(), &[]).await.unwrap();
    fed.gateway_base =
        LocalFederation::gateway_config_with("[limits]\nmax_connections_per_listener = 3\n")
            .unwrap();
    fed.add_site("central", &vip_range(), &[]).await.unwrap();
    let http = imported(&fed, "west", "web.shop.svc.clusterset.local", 8080).await;
    let l4 = SocketAddr::new(echo_vip(&fed, "west").await, 7000);
    wait_tunnel(l4).await;

    tracing::info!("phase: Connection-named and hop-by-hop headers stay behind");
    let got = eventually(Duration::from_secs(20), "a request through west's HTTP VIP", async || {
        let mut s = tokio::net::TcpStream::connect(http).await.map_err(|e| e.to_string())?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close, X-Secret\r\nX-Secret: s\r\nTE: trailers\r\nX-Kept: k\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let got = String::from_utf8_lossy(&closed(&mut s).await?).to_ascii_lowercase();
        got.starts_with("http/1.1 200").then_some(got.clone()).ok_or(got)
    })
    .await;
    assert!(got.contains("x-kept: k"), "{got}");
    assert!(!got.contains("x-secret"), "x-secret was forwarded: {got}");
    assert!(!got.contains("te: trailers"), "{got}");

    tracing::info!("phase: slowloris headers are cut");
    let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n")
        .await
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "a half-sent head to be cut",
        async || closed(&mut s).await.map(|_| ()),
    )
    .await;

    tracing::info!("phase: a body that never arrives gets 408");
    let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let answer = eventually(
        Duration::from_secs(20),
        "an answer to a stalled body",
        async || {
            let mut b = vec![0u8; 64];
            let n = s.read(&mut b).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(String::from_utf8_lossy(&b[..n]).into_owned())
        },
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    tracing::info!("phase: an idle L4 connection is cut");
    let mut s = tokio::net::TcpStream::connect(l4).await.unwrap();
    s.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    eventually(
        Duration::from_secs(20),
        "an idle stream to be cut",
        async || closed(&mut s).await.map(|_| ()),
    )
    .await;

    tracing::info!("phase: a listener past its cap closes new connections");
    let capped = SocketAddr::new(echo_vip(&fed, "central").await, 7000);
    wait_tunnel(capped).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(capped).await.unwrap();
        s.write_all(b"y").await.unwrap();
        s.read_exact(&mut b).await.unwrap();
        held.push(s);
    }
    let mut extra = tokio::net::TcpStream::connect(capped).await.unwrap();
    let _ = extra.write_all(b"z").await;
    let rest = eventually(
        Duration::from_secs(20),
        "the fourth connection to be closed",
        async || closed(&mut extra).await,
    )
    .await;
    assert!(
        rest.is_empty(),
        "the fourth connection was served: {rest:?}"
    );
    let m = http_get(fed.sites["central"].gateway_admin, "/metrics").await;
    assert!(
        metric(
            &m,
            r#"causeway_outbound_connections_refused_total{reason="cap"}"#
        ) >= 1.0,
        "{m}"
    );
    drop(held);
    fed.shutdown().await;
}

fn dns_query(id: u16, name: &str, response: bool) -> Vec<u8> {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};
    let kind = if response {
        MessageType::Response
    } else {
        MessageType::Query
    };
    let mut m = Message::new(id, kind, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

fn dns_reply(bytes: &[u8]) -> hickory_proto::op::Message {
    hickory_proto::op::Message::from_vec(bytes).unwrap()
}

/// Forwarding is only for allowed clients, holds a bounded number of
/// sockets however many queries a silent upstream leaves waiting, and the
/// server never answers an answer; an upstream that is the server itself
/// is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_forwarding_is_private_and_bounded_and_answers_are_never_answered() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let upstream = silent.local_addr().unwrap().to_string();
    fed.dns_flags = vec![
        "--upstream".into(),
        upstream.clone(),
        "--max-forwards".into(),
        "64".into(),
    ];
    fed.add_site("west", &vip_range(), &[]).await.unwrap();
    fed.dns_flags = vec![
        "--upstream".into(),
        upstream.clone(),
        "--forward-allow".into(),
        "10.0.0.0/8".into(),
    ];
    fed.add_site("central", &vip_range(), &[]).await.unwrap();
    fed.dns_flags.clear();
    let (dns, admin) = (fed.sites["west"].dns, fed.sites["west"].dns_admin);
    let pid = fed.sites["west"].dns_proc.pid().unwrap();
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let before = fds();

    tracing::info!("phase: a client outside forward-allow is refused");
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.send_to(
        &dns_query(7, "example.org.", false),
        fed.sites["central"].dns,
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = udp.recv_from(&mut buf).await.unwrap();
    let r = dns_reply(&buf[..n]);
    assert_eq!(
        (r.metadata.id, r.metadata.response_code),
        (7, hickory_proto::op::ResponseCode::Refused)
    );

    tracing::info!("phase: 5,000 queries a silent upstream leaves waiting");
    for i in 0..5000u16 {
        let _ = udp
            .send_to(&dns_query(i, &format!("q{i}.example.org."), false), dns)
            .await;
    }
    let busy = eventually(
        Duration::from_secs(20),
        "forwards past the bound to be turned away",
        async || {
            let m = http_get(admin, "/metrics").await;
            let busy = metric(&m, r#"causeway_dns_forwarded_total{result="busy"}"#);
            (busy >= 100.0)
                .then_some(busy)
                .ok_or(format!("{busy} turned away so far"))
        },
    )
    .await;
    let during = fds();
    assert!(
        during <= before + 64 + 16,
        "{during} open files with forwards pending ({before} before, {busy} turned away)"
    );

    tracing::info!("phase: an answer sent as a query gets no answer (TCP)");
    let mut tcp = tokio::net::TcpStream::connect(dns).await.unwrap();
    for msg in [
        dns_query(1, "a.example.org.", true),
        dns_query(2, "nothing.shop.svc.clusterset.local.", false),
    ] {
        tcp.write_all(&(msg.len() as u16).to_be_bytes())
            .await
            .unwrap();
        tcp.write_all(&msg).await.unwrap();
    }
    let mut len = [0u8; 2];
    tcp.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
    tcp.read_exact(&mut body).await.unwrap();
    assert_eq!(
        dns_reply(&body).metadata.id,
        2,
        "the first reply answers the query, not the answer"
    );

    tracing::info!("phase: an upstream that is the server itself is refused");
    let (code, out) = run_bin(&[
        "dns",
        "--state-dir",
        "/nonexistent",
        "--listen",
        "127.0.0.1:5399",
        "--upstream",
        "127.0.0.1:5399",
    ]);
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("queries would loop"), "{out}");
    drop(silent);
    fed.shutdown().await;
}

/// Peak resident memory of a process, KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Before a body is read: an anonymous 60 MiB Raft message is refused
/// (the controller's peak memory does not grow by it), a site's 5 MiB
/// message is refused as too large, and a client that never finishes its
/// TLS handshake is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_refuses_large_and_slow_callers_before_reading_them() {
    use causeway_api::client::ControllerClient;
    use causeway_api::pb;
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let (mut fed, leader) = controllers(&tmp, 1, &[]).await;
    fed.add_site("alpha", &vip_range(), &[]).await.unwrap();
    let alpha = causeway_gateway::site::SiteState::load(&fed.sites["alpha"].state_dir)
        .unwrap()
        .unwrap();
    let pid = fed.controllers[&leader].pid().unwrap();

    tracing::info!("phase: an anonymous 60 MiB Raft message");
    let anon = ControllerClient::new(fed.endpoints(), &alpha.controller_ca_pem, None);
    let mut raft = pb::raft_client::RaftClient::new(anon.channel().await.unwrap())
        .max_encoding_message_size(128 * 1024 * 1024);
    let before = peak_rss_kib(pid);
    let e = raft
        .append_entries(pb::RaftPayload::new(vec![b'x'; 60 * 1024 * 1024]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    let grew = peak_rss_kib(pid).saturating_sub(before);
    assert!(
        grew < 20 * 1024,
        "the controller's peak memory grew by {grew} KiB"
    );

    tracing::info!("phase: a site's 5 MiB PublishExports");
    let mut site = alpha.controller_client().federation().await.unwrap();
    let e = site
        .publish_exports(pb::PublishExportsRequest {
            site: "alpha".into(),
            exports: vec![],
            tunnel_addrs: vec!["x".repeat(5 * 1024 * 1024)],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("at most 4194304"), "{}", e.message());

    tracing::info!("phase: a client that never finishes its TLS handshake is dropped");
    let addr: SocketAddr = fed.endpoints()[0].parse().unwrap();
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    eventually(
        Duration::from_secs(30),
        "the stalled handshake to be dropped",
        async || closed(&mut slow).await.map(|_| ()),
    )
    .await;
    fed.shutdown().await;
}

/// Credentials are bound to what was issued: a removed site's old
/// credential stays refused after its name is invited again (on every RPC,
/// Status included), and a revoked credential — an admin's or a site's —
/// is refused from then on, its open Watch ending within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_and_revoked_credentials_are_refused_everywhere() {
    use causeway_api::client::ControllerClient;
    use causeway_api::identity::Credential;
    use causeway_api::pb;
    use causeway_gateway::site::SiteState;
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let (mut fed, _) = controllers(&tmp, 1, &[]).await;
    fed.add_site("alpha", &vip_range(), &[]).await.unwrap();
    let old = SiteState::load(&fed.sites["alpha"].state_dir)
        .unwrap()
        .unwrap();
    let mut old_api = old.controller_client().federation().await.unwrap();
    old_api.status(pb::StatusRequest {}).await.unwrap();

    tracing::info!("phase: removed, then invited again under the same name");
    fed.sites.remove("alpha").unwrap().gateway.kill().await;
    fed.ctl(&["cluster", "remove", "alpha"]).await.unwrap();
    let token = fed.create_token("alpha").await.unwrap();
    let again = tmp.path().join("alpha-again");
    let ca = SiteState::site_ca(&again, None).unwrap();
    let new = SiteState::join(&again, &token, &ca, vec!["127.0.0.1:1".into()])
        .await
        .unwrap();
    let mut new_api = new.controller_client().federation().await.unwrap();
    new_api.status(pb::StatusRequest {}).await.unwrap();
    new_api
        .catalog(pb::CatalogRequest::default())
        .await
        .unwrap();
    let mut old_api = old.controller_client().federation().await.unwrap();
    for (rpc, r) in [
        (
            "Status",
            old_api.status(pb::StatusRequest {}).await.map(|_| ()),
        ),
        (
            "Catalog",
            old_api
                .catalog(pb::CatalogRequest::default())
                .await
                .map(|_| ()),
        ),
        (
            "Heartbeat",
            old_api
                .heartbeat(pb::HeartbeatRequest {
                    site: "alpha".into(),
                })
                .await
                .map(|_| ()),
        ),
    ] {
        let e = r.expect_err(rpc);
        assert_eq!(
            e.code(),
            tonic::Code::PermissionDenied,
            "{rpc}: {}",
            e.message()
        );
    }

    tracing::info!("phase: a second admin, issued by the controllers, then revoked by certificate");
    let ops = tmp.path().join("ops2");
    fed.ctl(&["admin", "issue", "ops2", "--out", ops.to_str().unwrap()])
        .await
        .unwrap();
    let cred = Credential::load(&ops.join("admin.pem"), &ops.join("admin-key.pem")).unwrap();
    let ops_client = ControllerClient::new(fed.endpoints(), &new.controller_ca_pem, Some(&cred));
    let mut ops_api = ops_client.federation().await.unwrap();
    ops_api.status(pb::StatusRequest {}).await.unwrap();
    fed.ctl(&[
        "credential",
        "revoke",
        "--cert",
        ops.join("admin.pem").to_str().unwrap(),
    ])
    .await
    .unwrap();
    let e = ops_api.status(pb::StatusRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    assert!(e.message().contains("revoked"), "{}", e.message());

    tracing::info!("phase: a site credential revoked while it watches");
    let mut watch = new_api
        .watch(pb::WatchRequest {
            from_revision: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().expect("the snapshot");
    let started = std::time::Instant::now();
    fed.ctl(&[
        "credential",
        "revoke",
        "--cert",
        again.join("api.pem").to_str().unwrap(),
    ])
    .await
    .unwrap();
    let ended = eventually(
        Duration::from_secs(20),
        "the revoked credential's watch to end",
        async || match watch.message().await {
            Ok(Some(_)) => Err("still streaming".to_string()),
            Ok(None) => Ok("ended".to_string()),
            Err(s) => Ok(format!("{:?}: {}", s.code(), s.message())),
        },
    )
    .await;
    eprintln!(
        "revocation ended the watch {:.1} s after the revoke ({ended})",
        started.elapsed().as_secs_f64()
    );
    assert!(
        ended.contains("PermissionDenied") || ended == "ended",
        "{ended}"
    );
    let e = new_api.status(pb::StatusRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    fed.shutdown().await;
}

/// Admin credentials are bound to what the controllers issued: the one
/// `ca init` wrote is recorded at start, others come from `ctl admin
/// issue`, a CA-signed admin credential nobody recorded is refused, and
/// `ctl admin list|revoke|renew` do what they say — never revoking the
/// last admin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_credentials_are_recorded_listed_revoked_and_renewed() {
    use causeway_api::client::ControllerClient;
    use causeway_api::identity::{CertificateAuthority, Credential};
    use causeway_api::pb;
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let (mut fed, _) = controllers(&tmp, 3, &["--admin-credential-lifetime-secs", "86400"]).await;
    let ca_pem = std::fs::read_to_string(fed.creds.join("ca.pem")).unwrap();
    let admins = async |fed: &causeway::local::LocalFederation| -> serde_json::Value {
        let out = fed
            .ctl(&["--output", "json", "admin", "list"])
            .await
            .unwrap();
        serde_json::from_str(&out).unwrap()
    };
    let state_of = |list: &serde_json::Value, name: &str| -> Vec<String> {
        list["admins"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["name"] == name)
            .map(|a| a["state"].as_str().unwrap().to_string())
            .collect()
    };

    tracing::info!("phase: the admin `ca init` wrote is recorded");
    eventually(
        Duration::from_secs(20),
        "the bootstrap admin to be recorded",
        async || {
            let list = admins(&fed).await;
            let demo = state_of(&list, "demo");
            (list["bootstrap"] == false && demo == ["active"])
                .then_some(())
                .ok_or(list.to_string())
        },
    )
    .await;

    tracing::info!("phase: an admin credential signed by the CA but never issued is refused");
    let ca = CertificateAuthority::load(&fed.creds.join("ca.pem"), &fed.creds.join("ca-key.pem"))
        .unwrap();
    let forged = causeway::creds::issue_admin(&ca, "mallory").unwrap();
    let mut forged_api = ControllerClient::new(fed.endpoints(), &ca_pem, Some(&forged))
        .federation()
        .await
        .unwrap();
    let e = forged_api.status(pb::StatusRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    assert!(e.message().contains("did not issue"), "{}", e.message());

    tracing::info!("phase: issue; bad names and lifetimes are refused with the field named");
    for (args, want) in [
        (vec!["Bad Name"], "name"),
        (
            vec!["ops", "--lifetime", "30d"],
            "lifetime_secs: at most 86400",
        ),
        (vec!["ops", "--lifetime", "3w"], "s, m, h or d"),
    ] {
        let out = tmp.path().join("never");
        let mut cmd = vec!["admin", "issue"];
        cmd.extend(args.iter().copied());
        cmd.extend(["--out", out.to_str().unwrap()]);
        let e = fed.ctl(&cmd).await.unwrap_err();
        assert!(format!("{e:#}").contains(want), "{cmd:?}: {e:#}");
    }
    let ops = tmp.path().join("ops");
    fed.ctl(&[
        "admin",
        "issue",
        "ops",
        "--out",
        ops.to_str().unwrap(),
        "--lifetime",
        "12h",
    ])
    .await
    .unwrap();
    let mode = |p: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&ops.join("admin-key.pem")), 0o600);
    assert_eq!(mode(&ops), 0o700);
    // The directory is a complete --creds directory.
    let as_ops = |dir: &std::path::Path| {
        run_bin(&[
            "ctl",
            "--creds",
            dir.to_str().unwrap(),
            "--controller",
            &fed.endpoints().join(","),
            "status",
        ])
    };
    let (code, out) = as_ops(&ops);
    assert_eq!(code, 0, "{out}");
    let list = admins(&fed).await;
    assert_eq!(state_of(&list, "ops"), ["active"], "{list}");
    let ops_rec = list["admins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "ops")
        .unwrap()
        .clone();
    assert_eq!(ops_rec["issued_by"], "demo");
    let lives = ops_rec["expires_at_unix_ms"].as_u64().unwrap() - causeway_api::clock::unix_ms();
    assert!(
        (11 * 3_600_000..=12 * 3_600_000 + 60_000).contains(&lives),
        "asked 12h, got {lives} ms"
    );

    tracing::info!("phase: renew keeps the old credential valid and records the new one");
    let old = Credential::load(&ops.join("admin.pem"), &ops.join("admin-key.pem")).unwrap();
    let (code, out) = run_bin(&[
        "ctl",
        "--creds",
        ops.to_str().unwrap(),
        "--controller",
        &fed.endpoints().join(","),
        "admin",
        "renew",
    ]);
    assert_eq!(code, 0, "{out}");
    let new = Credential::load(&ops.join("admin.pem"), &ops.join("admin-key.pem")).unwrap();
    assert_ne!(old.cert_pem, new.cert_pem);
    let (code, out) = as_ops(&ops);
    assert_eq!(code, 0, "{out}");
    let mut old_api = ControllerClient::new(fed.endpoints(), &ca_pem, Some(&old))
        .federation()
        .await
        .unwrap();
    old_api.status(pb::StatusRequest {}).await.unwrap();
    assert_eq!(state_of(&admins(&fed).await, "ops"), ["active", "active"]);

    tracing::info!("phase: revoke by name refuses every credential of that admin");
    fed.ctl(&["admin", "revoke", "ops"]).await.unwrap();
    let e = old_api.status(pb::StatusRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    let (code, out) = as_ops(&ops);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("revoked"), "{out}");
    assert_eq!(state_of(&admins(&fed).await, "ops"), ["revoked", "revoked"]);
    let e = fed.ctl(&["admin", "revoke", "ops"]).await.unwrap_err();
    assert!(
        format!("{e:#}").contains("no live admin credential"),
        "{e:#}"
    );

    tracing::info!("phase: the last admin cannot be revoked");
    let e = fed.ctl(&["admin", "revoke", "demo"]).await.unwrap_err();
    assert!(format!("{e:#}").contains("would leave no admin"), "{e:#}");
    fed.ctl(&["status"]).await.unwrap();
    fed.shutdown().await;
}

/// Site credentials live as long as the controllers say (15 s here): the
/// gateway renews before expiry, again and again, the DNS server follows
/// the renewed file, the site stays a member throughout, and the first
/// credential is refused once it has expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_credentials_expire_and_are_renewed_before_they_do() {
    use causeway_api::client::ControllerClient;
    use causeway_api::identity::Credential;
    use causeway_api::pb;
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let (mut fed, _) = controllers(&tmp, 1, &["--site-credential-lifetime-secs", "15"]).await;
    fed.add_site("alpha", &vip_range(), &[]).await.unwrap();
    let dir = fed.sites["alpha"].state_dir.clone();
    let load = || Credential::load(&dir.join("api.pem"), &dir.join("api-key.pem")).unwrap();
    let first = load();
    let (_, first_expires) = causeway_api::identity::validity_ms(&first.chain[0]).unwrap();
    let ca_pem = std::fs::read_to_string(dir.join("controller-ca.pem")).unwrap();
    let status_as = async |cred: &Credential| {
        let c = ControllerClient::new(fed.endpoints(), &ca_pem, Some(cred));
        match c.federation().await {
            Ok(mut f) => f
                .status(pb::StatusRequest {})
                .await
                .map(|_| ())
                .map_err(|s| format!("{:?}: {}", s.code(), s.message())),
            Err(e) => Err(e.to_string()),
        }
    };
    status_as(&first).await.unwrap();

    tracing::info!("phase: the gateway renews, and renews the renewed one");
    let second = eventually(Duration::from_secs(30), "a first renewal", async || {
        let now = load();
        (now.cert_pem != first.cert_pem)
            .then_some(now)
            .ok_or("not yet")
    })
    .await;
    status_as(&second).await.unwrap();
    let third = eventually(Duration::from_secs(30), "a second renewal", async || {
        let now = load();
        (now.cert_pem != second.cert_pem)
            .then_some(now)
            .ok_or("not yet")
    })
    .await;
    status_as(&third).await.unwrap();

    tracing::info!("phase: the first credential has expired and is refused");
    assert!(
        causeway_api::clock::unix_ms() > first_expires,
        "two renewals took under 15 s"
    );
    let refused = status_as(&first).await.unwrap_err();
    tracing::info!(%refused, "the expired credential");

    tracing::info!("phase: the site stayed a member; the DNS server follows the file");
    let list = fed
        .ctl(&["--output", "json", "cluster", "list"])
        .await
        .unwrap();
    assert!(list.contains("alpha"), "{list}");
    eventually(
        Duration::from_secs(20),
        "the DNS server to switch to a renewed credential",
        async || {
            let log = fed.sites["alpha"].dns_proc.log_tail(200);
            log.contains("using the renewed site API credential")
                .then_some(())
                .ok_or(log)
        },
    )
    .await;
    let metrics = http_get(fed.sites["alpha"].gateway_admin, "/metrics").await;
    assert!(
        metric(
            &metrics,
            "causeway_site_credential_renewals_total{result=\"ok\"}"
        ) >= 2.0,
        "{metrics}"
    );
    let alpha = fed.sites.get_mut("alpha").unwrap();
    assert!(alpha.gateway.exited().is_none());
    assert!(alpha.dns_proc.exited().is_none());
    fed.shutdown().await;
}

/// An HTTP/1.1 endpoint recording every request head it is sent (and
/// answering each with 200 and an empty body).
async fn recording_endpoint() -> (
    SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    tokio::task::JoinHandle<()>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut r = tokio::io::BufReader::new(r);
                loop {
                    use tokio::io::AsyncBufReadExt;
                    let mut head = String::new();
                    let mut len = 0usize;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        let end = line == "\r\n";
                        head.push_str(&line);
                        if end {
                            break;
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    record.lock().unwrap().push(head);
                    if w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen, task)
}

/// Request smuggling over raw TCP at an HTTP VIP: each ambiguous framing
/// gets 400, or exactly one correctly framed request reaches the endpoint
/// — never a second, smuggled one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggled_requests_never_reach_the_endpoint() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (web, seen, _web) = recording_endpoint().await;
    fed.add_site("east", &vip_range(), &[]).await.unwrap();
    add_exports_and_restart(&mut fed, "east", &web_http_export(web)).await;
    fed.add_site("west", &vip_range(), &[]).await.unwrap();
    let http = imported(&fed, "west", "web.shop.svc.clusterset.local", 8080).await;
    eventually(
        Duration::from_secs(20),
        "a plain request to pass",
        async || {
            let got = http_get_any(http, "/plain").await;
            got.starts_with("HTTP/1.1 200").then_some(()).ok_or(got)
        },
    )
    .await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n";
    let attacks = [
        ("CL then TE", format!("POST /a HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}")),
        ("TE then CL", format!("POST /a HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n{smuggled}")),
        ("two Content-Lengths", format!("POST /a HTTP/1.1\r\nHost: web\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{smuggled}", smuggled.len())),
        ("obs-fold", format!("POST /a HTTP/1.1\r\nHost: web\r\nContent-Length: 0\r\nX-Fold: a\r\n b\r\n\r\n{smuggled}")),
        ("Transfer-Encoding: xchunked", format!("POST /a HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: xchunked\r\nContent-Length: 0\r\n\r\n{smuggled}")),
        ("HTTP/1.0 with TE", format!("POST /a HTTP/1.0\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}")),
    ];
    for (what, attack) in attacks {
        let before = seen.lock().unwrap().len();
        let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
        s.write_all(attack.as_bytes()).await.unwrap();
        let _ = s.shutdown().await;
        let answer = eventually(
            Duration::from_secs(20),
            format_args!("an answer to {what}"),
            async || closed(&mut s).await,
        )
        .await;
        let answer = String::from_utf8_lossy(&answer).into_owned();
        let heads: Vec<String> = seen.lock().unwrap()[before..].to_vec();
        assert!(
            heads.iter().all(|h| !h.contains("/smuggled")),
            "{what}: a smuggled request reached the endpoint: {heads:?}"
        );
        if answer.starts_with("HTTP/1.1 400") {
            assert!(
                heads.is_empty(),
                "{what}: refused, yet forwarded: {heads:?}"
            );
        } else {
            // Served: exactly the one request, framed by the gateway.
            assert_eq!(heads.len(), 1, "{what}: {answer} {heads:?}");
            assert!(
                heads[0].starts_with("POST /a HTTP/1.1\r\n"),
                "{what}: {heads:?}"
            );
        }
        tracing::info!(what, answer = %answer.lines().next().unwrap_or(""), forwarded = heads.len(), "smuggling attempt");
    }
    fed.shutdown().await;
}

/// HTTP/2 rapid reset on an HTTP VIP: 10,000 requests opened and cancelled
/// at once on one connection. The gateway ends that connection (GOAWAY)
/// rather than keep working for it, and serves the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_and_endless_continuation_are_cut_off_and_the_gateway_stays_up() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    // An endpoint that answers everything but /hold at once.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let web = l.local_addr().unwrap();
    let _web = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                use tokio::io::AsyncBufReadExt;
                let (r, mut w) = s.into_split();
                let mut lines = tokio::io::BufReader::new(r).lines();
                let mut hold = false;
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.starts_with("GET /hold") {
                        hold = true;
                    }
                    if line.is_empty() && !hold {
                        let _ = w
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    }
                }
            });
        }
    });
    fed.add_site("east", &vip_range(), &[]).await.unwrap();
    add_exports_and_restart(&mut fed, "east", &web_http_export(web)).await;
    fed.add_site("west", &vip_range(), &[]).await.unwrap();
    let http = imported(&fed, "west", "web.shop.svc.clusterset.local", 8080).await;
    eventually(
        Duration::from_secs(20),
        "a plain request to pass",
        async || {
            let got = http_get_any(http, "/plain").await;
            got.starts_with("HTTP/1.1 200").then_some(()).ok_or(got)
        },
    )
    .await;

    let tcp = tokio::net::TcpStream::connect(http).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let driver = tokio::spawn(conn);
    // Batches of streams opened, left in flight a moment (the endpoint
    // never answers /hold), then reset (dropping a response future sends
    // RST_STREAM): the rapid-reset pattern, 10,000 streams in all.
    let mut sent = 0;
    'flood: while sent < 10_000 {
        let mut batch = Vec::new();
        for _ in 0..200 {
            if sender.ready().await.is_err() {
                break 'flood;
            }
            let req = hyper::Request::get(format!("http://{http}/hold"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            batch.push(Box::pin(sender.send_request(req)));
            sent += 1;
        }
        let _ = tokio::time::timeout(
            Duration::from_millis(20),
            futures::future::select_all(batch.iter_mut()),
        )
        .await;
        drop(batch);
    }
    eventually(
        Duration::from_secs(20),
        "the abusive connection to be ended",
        async || {
            if driver.is_finished() || sender.ready().await.is_err() {
                Ok(())
            } else {
                Err(format!("{sent} resets sent, connection still open"))
            }
        },
    )
    .await;
    tracing::info!(
        sent,
        "streams opened and reset before the gateway ended the connection"
    );
    assert!(sent < 10_000, "the gateway took all 10,000 resets");
    // The gateway still serves others.
    let got = http_get_any(http, "/after").await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");

    tracing::info!("phase: a HEADERS frame followed by CONTINUATION frames that never end");
    let (goaway, written) = endless_continuation(http).await;
    tracing::info!(
        goaway,
        written,
        "bytes of header block sent before the gateway closed the connection"
    );
    assert!(goaway, "the connection closed without a GOAWAY");
    assert!(
        written < 64 << 20,
        "the gateway read 64 MiB of one header block"
    );
    let got = http_get_any(http, "/after-continuation").await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    fed.shutdown().await;
}

/// Opens an HTTP/2 connection (prior knowledge) to `addr` and sends one
/// HEADERS frame without END_HEADERS, then 16 KiB CONTINUATION frames
/// (literal headers, never END_HEADERS) until the peer closes the
/// connection or 64 MiB went out. Returns whether a GOAWAY came back and
/// how many header-block bytes were written.
async fn endless_continuation(addr: SocketAddr) -> (bool, usize) {
    use tokio::io::AsyncReadExt;
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }
    // One literal header without indexing, new name: 0x00, name, value.
    fn literal(i: usize) -> Vec<u8> {
        let name = format!("x-h{i:06}");
        let value = "v".repeat(100);
        let mut b = vec![0x00, name.len() as u8];
        b.extend(name.as_bytes());
        b.push(value.len() as u8);
        b.extend(value.as_bytes());
        b
    }
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = tcp.into_split();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(0x4, 0, 0, &[])); // SETTINGS
                                         // :method GET, :scheme http, :path /, :authority (indexed / literal).
    let mut first = vec![0x82, 0x86, 0x84, 0x41, 0x09];
    first.extend(b"localhost");
    hello.extend(frame(0x1, 0x1, 1, &first)); // HEADERS, END_STREAM, no END_HEADERS
    w.write_all(&hello).await.unwrap();
    let reader = tokio::spawn(async move {
        let mut goaway = false;
        let mut buf = vec![0u8; 65536];
        let mut pending: Vec<u8> = Vec::new();
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return goaway,
                Ok(n) => {
                    pending.extend(&buf[..n]);
                    while pending.len() >= 9 {
                        let len =
                            u32::from_be_bytes([0, pending[0], pending[1], pending[2]]) as usize;
                        if pending.len() < 9 + len {
                            break;
                        }
                        goaway |= pending[3] == 0x7;
                        pending.drain(..9 + len);
                    }
                }
            }
        }
    });
    let mut written = 0;
    let mut i = 0;
    while written < 64 << 20 && !reader.is_finished() {
        let mut block = Vec::new();
        while block.len() < 16_000 {
            block.extend(literal(i));
            i += 1;
        }
        if w.write_all(&frame(0x9, 0, 1, &block)).await.is_err() {
            break;
        }
        written += block.len();
    }
    eventually(
        Duration::from_secs(20),
        "the gateway to close the connection",
        async || {
            if reader.is_finished() {
                Ok(())
            } else {
                Err(format!(
                    "{written} bytes of one header block sent, connection open"
                ))
            }
        },
    )
    .await;
    (reader.await.unwrap(), written)
}
