//! Tunnels end to end: a name resolves, bytes cross a QUIC mTLS tunnel intact,
//! streams spread over endpoints and replicas, gateways die, drain and come back.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_resolves_and_bytes_cross_the_tunnel_intact() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;

    tracing::info!("phase: start an echo service in east, join east and west");
    let (echo, _task) = echo_server(None).await.unwrap();
    let range_e = vip_range();
    let range_w = vip_range();
    // Four UDP sockets on the DNS port (SO_REUSEPORT), served in parallel.
    fed.dns_flags = vec!["--udp-sockets".into(), "4".into()];
    fed.add_site(
        "east",
        &range_e,
        &[Export {
            service: "shop/echo".into(),
            port: 7000,
            endpoints: vec![echo],
        }],
    )
    .await
    .unwrap();
    fed.add_site("west", &range_w, &[]).await.unwrap();

    tracing::info!("phase: resolve with a real resolver and with dig");
    let name = "echo.shop.svc.clusterset.local";
    let vip = fed
        .wait_resolvable("west", name, Duration::from_secs(30))
        .await
        .unwrap();
    let west_dns = fed.sites["west"].dns;
    let ips = resolve_with_hickory(west_dns, name).await;
    assert_eq!(ips, vec![vip]);
    let (base, prefix) = causeway_api::model::parse_cidr("vip", &range_w).unwrap();
    assert_eq!(
        Some(vip),
        causeway_api::model::vip_for(base, prefix, 1),
        "first service gets index 1 in west's range"
    );
    let short = dig(west_dns, &["+short", name, "A"]);
    assert_eq!(short.trim(), vip.to_string());
    let nx = dig(west_dns, &["nothere.shop.svc.clusterset.local", "A"]);
    assert!(
        nx.contains("status: NXDOMAIN") && nx.contains("SOA"),
        "{nx}"
    );
    let refused = dig(west_dns, &["example.com", "A"]);
    assert!(refused.contains("status: REFUSED"), "{refused}");
    let tcp = dig(west_dns, &["+tcp", "+short", name, "A"]);
    assert_eq!(tcp.trim(), vip.to_string());
    // Queries from many client sockets (spread by the kernel over the four
    // server sockets) are all answered.
    for _ in 0..64 {
        assert_eq!(resolve_with_hickory(west_dns, name).await, vec![vip]);
    }

    tracing::info!("phase: 10 MiB through the tunnel, byte for byte");
    let target = SocketAddr::new(vip, 7000);
    wait_tunnel(target).await;
    let data: Vec<u8> = (0..10 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let got = echo_roundtrip(target, &data).await;
    assert_eq!(got.len(), data.len());
    assert!(got == data, "10 MiB echo differs");

    tracing::info!("phase: 50 concurrent connections");
    let mut tasks = Vec::new();
    for i in 0..50u32 {
        tasks.push(tokio::spawn(async move {
            let payload: Vec<u8> = (0..64 * 1024u32).map(|j| (i ^ j) as u8).collect();
            let got = echo_roundtrip(target, &payload).await;
            got == payload
        }));
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap() {
            ok += 1;
        }
    }
    assert_eq!(
        ok, 50,
        "every concurrent connection must echo its own bytes"
    );

    tracing::info!("phase: the admin ports expose the promised metrics");
    let gw = http_get(fed.sites["east"].gateway_admin, "/metrics").await;
    for m in [
        "causeway_tunnel_connections",
        "causeway_tunnel_streams_total",
        "causeway_tunnel_bytes_total",
    ] {
        assert!(gw.contains(m), "gateway metrics lack {m}");
    }
    let bytes: f64 = gw
        .lines()
        .filter(|l| l.starts_with("causeway_tunnel_bytes_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        bytes >= 2.0 * 10.0 * 1024.0 * 1024.0,
        "east counted {bytes} tunnel bytes"
    );
    let dm = http_get(fed.sites["west"].dns_admin, "/metrics").await;
    assert!(dm.contains("causeway_dns_udp_sockets 4"), "{dm}");
    let ready = http_get(fed.sites["west"].dns_admin, "/ready").await;
    assert!(ready.contains("ready"), "{ready}");
    let dm = http_get(fed.sites["west"].dns_admin, "/metrics").await;
    assert!(
        dm.contains("causeway_catalog_stale_seconds 0"),
        "a connected DNS server is not stale"
    );
    assert!(
        dm.contains("causeway_dns_queries_total{rcode=\"noerror\"}"),
        "{dm}"
    );
    assert!(
        dm.contains("causeway_dns_queries_total{rcode=\"nxdomain\"}"),
        "{dm}"
    );
    let ctrl = http_get(fed.controller_admin[&1], "/metrics").await;
    for m in [
        "causeway_raft_term",
        "causeway_raft_commit_index",
        "causeway_raft_role{role=\"leader\"}",
    ] {
        assert!(ctrl.contains(m), "controller metrics lack {m}");
    }

    tracing::info!("phase: a named port gets an SRV record, answered to dig");
    fed.edit_gateway_config("east", |cfg| {
        cfg.exports[0].port_name = Some("echo".into());
    })
    .unwrap();
    fed.restart_gateway("east").await.unwrap();
    let srv_name = "_echo._tcp.echo.shop.svc.clusterset.local";
    eventually(
        Duration::from_secs(20),
        format_args!("an SRV record for {srv_name}"),
        async || {
            let srv = dig(west_dns, &["+short", srv_name, "SRV"]);
            (srv.trim() == "0 100 7000 echo.shop.svc.clusterset.local.")
                .then_some(())
                .ok_or(srv)
        },
    )
    .await;
    // The target's address rides along in the additional section.
    let full = dig(west_dns, &[srv_name, "SRV"]);
    let extra = full
        .split("ADDITIONAL SECTION")
        .nth(1)
        .unwrap_or_else(|| panic!("no additional section: {full}"));
    assert!(
        extra.contains("echo.shop.svc.clusterset.local.") && extra.contains(&vip.to_string()),
        "{full}"
    );
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_whose_gateway_dies_leaves_routing_and_dns_then_returns() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let name = "echo.shop.svc.clusterset.local";
    let (vip, _echo) = echo_sites_ready(&mut fed).await;

    tracing::info!("phase: SIGKILL east's gateway; its lease lapses");
    fed.sites.get_mut("east").unwrap().gateway.kill().await;
    let west_dns = fed.sites["west"].dns;
    eventually(
        Duration::from_secs(20),
        "east to leave west's DNS answers (NXDOMAIN)",
        async || match causeway::local::dns_a(west_dns, name).await {
            Err(e) => e.to_string().to_uppercase().contains("NXDOMAIN"),
            Ok(_) => false,
        },
    )
    .await;
    let mut admin = fed.admin_client(None).unwrap().federation().await.unwrap();
    let cat = admin
        .catalog(causeway_api::pb::CatalogRequest::default())
        .await
        .unwrap()
        .into_inner();
    let east = cat.sites.iter().find(|s| s.name == "east").unwrap();
    assert!(!east.available, "east must be marked unavailable");
    let kept = cat
        .exports
        .iter()
        .find(|e| e.site == "east")
        .map(|e| e.exports.len())
        .unwrap_or(0);
    assert_eq!(kept, 1, "an unavailable site keeps its exports");

    tracing::info!(
        "phase: east's gateway restarts from its state dir (no new token) and comes back"
    );
    let bin = fed.bin.clone();
    fed.sites
        .get_mut("east")
        .unwrap()
        .gateway
        .start(&bin)
        .unwrap();
    let back = fed
        .wait_resolvable("west", name, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(back, vip, "the VIP is stable across the outage");
    wait_tunnel(SocketAddr::new(vip, 7000)).await;
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_streams_in_flight_and_new_connections_fail_over() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (target, _t1, _t2) = banner_sites(&mut fed).await;
    eventually(
        Duration::from_secs(20),
        "east to answer first",
        async || call_banner(target, "x").await.ok().as_deref() == Some("east"),
    )
    .await;

    tracing::info!("phase: a long-lived connection through east");
    let sock = tokio::net::TcpStream::connect(target).await.unwrap();
    let (r, mut w) = sock.into_split();
    let mut r = tokio::io::BufReader::new(r);
    let mut line = String::new();
    use tokio::io::AsyncBufReadExt;
    r.read_line(&mut line).await.unwrap();
    assert_eq!(line.trim(), "east");

    tracing::info!("phase: SIGTERM east's gateway");
    fed.sites["east"].gateway.terminate();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        fed.sites
            .get_mut("east")
            .unwrap()
            .gateway
            .exited()
            .is_none(),
        "east must wait for its stream"
    );

    tracing::info!("phase: new connections go to west meanwhile");
    assert_eq!(
        causeway::local::call_banner(target, "y").await.unwrap(),
        "west"
    );

    tracing::info!("phase: the old stream still works, then closes; east exits cleanly");
    w.write_all(b"still flowing").await.unwrap();
    w.shutdown().await.unwrap();
    let mut rest = String::new();
    r.read_to_string(&mut rest).await.unwrap();
    assert_eq!(
        rest,
        "still flowing",
        "east log:\n{}\ncentral log:\n{}",
        fed.sites["east"].gateway.log_tail(15),
        fed.sites["central"].gateway.log_tail(8)
    );
    let east = &mut fed.sites.get_mut("east").unwrap().gateway;
    let status = eventually(
        Duration::from_secs(10),
        "east to exit after its last stream",
        async || east.exited(),
    )
    .await;
    assert!(
        status.success(),
        "drained gateway should exit 0, got {status}"
    );
    let log = fed.sites["east"].gateway.log_tail(5);
    assert!(log.contains("drained"), "{log}");
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_spread_over_a_sites_endpoints_and_skip_dead_ones() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    // These gateways also run single-threaded (worker_threads = 1).
    fed.gateway_base.balancer = "round_robin".into();
    fed.gateway_base.worker_threads = 1;
    let (e1, _t1) = echo_server(Some("e1".into())).await.unwrap();
    let (e2, t2) = echo_server(Some("e2".into())).await.unwrap();
    fed.add_site(
        "east",
        &vip_range(),
        &[Export {
            service: "shop/echo".into(),
            port: 7000,
            endpoints: vec![e1, e2],
        }],
    )
    .await
    .unwrap();
    fed.add_site("west", &vip_range(), &[]).await.unwrap();
    let vip = echo_vip(&fed, "west").await;
    let target = SocketAddr::new(vip, 7000);
    wait_call(target).await;

    tracing::info!("phase: round robin alternates endpoints per stream");
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(causeway::local::call_banner(target, "y").await.unwrap());
    }
    let e1n = seen.iter().filter(|b| *b == "e1").count();
    assert_eq!(e1n, 3, "{seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0] != w[1]),
        "round robin must alternate: {seen:?}"
    );

    tracing::info!("phase: a dead endpoint is skipped without failing the stream");
    t2.abort();
    let _ = t2.await;
    for _ in 0..4 {
        assert_eq!(
            causeway::local::call_banner(target, "z").await.unwrap(),
            "e1"
        );
    }
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_controller_down_sites_keep_serving_their_last_view() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let name = "echo.shop.svc.clusterset.local";
    let (vip, _echo) = echo_sites_ready(&mut fed).await;

    tracing::info!("phase: SIGKILL every controller");
    for id in [1, 2, 3] {
        fed.controller(id).kill().await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;

    tracing::info!(
        "phase: DNS still answers, the tunnel still carries, and both say how stale they are"
    );
    assert_eq!(
        causeway::local::dns_a(fed.sites["west"].dns, name)
            .await
            .unwrap(),
        vec![vip]
    );
    assert_eq!(
        echo_roundtrip(SocketAddr::new(vip, 7000), b"static").await,
        b"static"
    );
    let dm = http_get(fed.sites["west"].dns_admin, "/metrics").await;
    assert!(
        metric(&dm, "causeway_catalog_stale_seconds") >= 1.0,
        "DNS does not report staleness"
    );
    assert_eq!(metric(&dm, "causeway_watch_connected"), 0.0);
    let gm = http_get(fed.sites["west"].gateway_admin, "/metrics").await;
    assert!(
        metric(&gm, "causeway_catalog_stale_seconds") >= 1.0,
        "gateway does not report staleness"
    );
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_spread_over_a_sites_replicas_by_weight_and_fail_over_between_them() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (echo, _t) = echo_server(Some("echo".into())).await.unwrap();
    add_echo_sites(&mut fed, echo).await;

    tracing::info!("phase: east runs two gateway replicas, weights 1 and 3");
    let gw0 = fed.sites["east"].tunnel;
    let gw1: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let gw1_admin: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let advertise = vec![gw0.to_string(), format!("{gw1};weight=3")];
    fed.set_tunnel_advertise("east", &advertise).await.unwrap();
    let mut replica = fed
        .spawn_gateway_replica("east", "gw-1", gw1, gw1_admin)
        .unwrap();
    let vip = echo_vip(&fed, "west").await;
    let target = SocketAddr::new(vip, 7000);
    let gw0_admin = fed.sites["east"].gateway_admin;
    let west_admin = fed.sites["west"].gateway_admin;
    let out_conns = || async move {
        metric(
            &http_get(west_admin, "/metrics").await,
            "causeway_tunnel_connections{direction=\"out\"}",
        )
    };
    // West learns both replicas and holds a connection to each.
    let west_gw = &fed.sites["west"].gateway;
    eventually(
        Duration::from_secs(30),
        "west to connect to both replicas",
        async || {
            let _ = call_banner(target, "warm").await;
            let n = out_conns().await;
            (n >= 2.0)
                .then_some(())
                .ok_or_else(|| format!("{n} connections; west's log:\n{}", west_gw.log_tail(400)))
        },
    )
    .await;

    tracing::info!("phase: 80 connections split about 1:3");
    let (a0, a1) = (opened_in(gw0_admin).await, opened_in(gw1_admin).await);
    for i in 0..80 {
        if let Err(e) = call_banner(target, &format!("spread {i}")).await {
            panic!(
                "call {i}: {e}\nwest:\n{}\neast gw-0:\n{}\neast gw-1:\n{}",
                fed.sites["west"].gateway.log_tail(30),
                fed.sites["east"].gateway.log_tail(30),
                replica.log_tail(30)
            );
        }
    }
    let (d0, d1) = (
        opened_in(gw0_admin).await - a0,
        opened_in(gw1_admin).await - a1,
    );
    assert_eq!(d0 + d1, 80.0, "every stream landed on a replica");
    assert!(
        (15.0..=25.0).contains(&d0) && (55.0..=65.0).contains(&d1),
        "weights 1:3 gave {d0}:{d1}"
    );

    tracing::info!("phase: the heavy replica dies; its peers notice and streams go to the other");
    replica.kill().await;
    eventually(
        Duration::from_secs(10),
        "west to notice the dead replica",
        async || out_conns().await <= 1.0,
    )
    .await;
    let before = opened_in(gw0_admin).await;
    for i in 0..20 {
        call_banner(target, &format!("failover {i}")).await.unwrap();
    }
    assert_eq!(opened_in(gw0_admin).await - before, 20.0);

    tracing::info!("phase: it comes back and is redialed on its own");
    replica.start(&fed.bin).unwrap();
    let west_gw = &fed.sites["west"].gateway;
    eventually(
        Duration::from_secs(30),
        "west to redial the replica",
        async || {
            (out_conns().await >= 2.0)
                .then_some(())
                .ok_or_else(|| format!("west's log:\n{}", west_gw.log_tail(20)))
        },
    )
    .await;
    let before = opened_in(gw1_admin).await;
    for i in 0..8 {
        call_banner(target, &format!("back {i}")).await.unwrap();
    }
    assert!(
        opened_in(gw1_admin).await > before,
        "no stream reached the returning replica"
    );
    replica.kill().await;
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_cannot_bind_a_listener_says_so_on_ready_and_retries() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (vip, _echo) = echo_sites_ready(&mut fed).await;
    let admin = fed.sites["west"].gateway_admin;
    let ready = http_get_any(admin, "/ready").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

    // Something else on west's host holds the address the next service
    // will get (VIPs are handed out in order).
    let IpAddr::V4(v4) = vip else {
        panic!("an IPv4 VIP range")
    };
    let next = SocketAddr::new(IpAddr::V4((u32::from(v4) + 1).into()), 7100);
    let squatter = std::net::TcpListener::bind(next).unwrap();
    let (echo2, _e2) = echo_server(Some("second".into())).await.unwrap();
    add_exports_and_restart(
        &mut fed,
        "east",
        &format!(
            "\n[[exports]]\nservice = \"shop/second\"\nport = 7100\nendpoints = [\"{echo2}\"]\n"
        ),
    )
    .await;
    let got = fed
        .wait_resolvable(
            "west",
            "second.shop.svc.clusterset.local",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(got, next.ip(), "VIPs are no longer handed out in order");
    let ready = eventually(
        Duration::from_secs(20),
        "west's /ready to say 503",
        async || {
            let r = http_get_any(admin, "/ready").await;
            if r.starts_with("HTTP/1.1 503") {
                Ok(r)
            } else {
                Err(format!("still ready: {r}"))
            }
        },
    )
    .await;
    assert!(
        ready.contains(&next.to_string()) && ready.contains("shop/second"),
        "{ready}"
    );

    // Once the address is free the gateway binds it on its own.
    drop(squatter);
    eventually(
        Duration::from_secs(20),
        "west's /ready to recover",
        async || {
            let r = http_get_any(admin, "/ready").await;
            r.starts_with("HTTP/1.1 200").then_some(()).ok_or(r)
        },
    )
    .await;
    // East's gateway restarted for the new export: west may still be
    // waiting out the redial backoff of its tunnel to east.
    let b = eventually(
        Duration::from_secs(20),
        "a call to get through",
        async || call_banner(next, "hi").await,
    )
    .await;
    assert_eq!(b, "second");
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_is_redialed_at_once_when_no_other_site_can_serve() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (vip, _echo) = echo_sites_ready(&mut fed).await;
    let target = SocketAddr::new(vip, 7000);
    let west_admin = fed.sites["west"].gateway_admin;

    tracing::info!("phase: east's gateway dies; west's redials back off");
    fed.sites.get_mut("east").unwrap().gateway.kill().await;
    eventually(
        Duration::from_secs(20),
        "west to see east's tunnel down",
        async || {
            let m = http_get(west_admin, "/metrics").await;
            m.contains("causeway_peer_unreachable{site=\"east\"} 1")
        },
    )
    .await;
    // Long enough for the backoff to grow past a few seconds.
    tokio::time::sleep(Duration::from_secs(4)).await;

    tracing::info!("phase: east's gateway is back; the first call from west gets through");
    let bin = fed.bin.clone();
    fed.sites
        .get_mut("east")
        .unwrap()
        .gateway
        .start(&bin)
        .unwrap();
    let east_admin = fed.sites["east"].gateway_admin;
    eventually(
        Duration::from_secs(20),
        "east to become ready",
        async || {
            let mut s = tokio::net::TcpStream::connect(east_admin).await.ok()?;
            let _ = s.write_all(b"GET /ready HTTP/1.1\r\nhost: x\r\n\r\n").await;
            let mut out = String::new();
            let _ = s.read_to_string(&mut out).await;
            out.starts_with("HTTP/1.1 200").then_some(())
        },
    )
    .await;
    // East's lease lapsed during the outage: the controller lists it again
    // after its heartbeats resume, and west routes to it again.
    let back = imported(&fed, "west", "echo.shop.svc.clusterset.local", 7000).await;
    assert_eq!(back, target, "the VIP is stable across the outage");
    let got = try_echo_roundtrip(target, b"back").await;
    assert_eq!(
        got.as_deref().ok(),
        Some(&b"back"[..]),
        "the first call after east came back failed: {got:?}"
    );
    let m = http_get(west_admin, "/metrics").await;
    tracing::info!(
        early = m
            .lines()
            .filter(|l| l.starts_with("causeway_tunnel_early_dials_total"))
            .collect::<Vec<_>>()
            .join(" "),
        "early dials"
    );
    fed.shutdown().await;
}
