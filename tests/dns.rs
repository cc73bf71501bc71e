//! Mesh DNS end to end: upstream forwarding, headless services, and a server
//! that has no catalog yet.

mod common;

use common::*;

/// A stand-in upstream resolver on a real UDP socket: answers every A query
/// with 192.0.2.7 (TEST-NET-1), with recursion available.
async fn fake_upstream() -> SocketAddr {
    use hickory_proto::op::{Message, MessageType};
    use hickory_proto::rr::{rdata::A, RData, Record};
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut r = Message::new(q.metadata.id, MessageType::Response, q.metadata.op_code);
            r.metadata.recursion_desired = q.metadata.recursion_desired;
            r.metadata.recursion_available = true;
            r.queries = q.queries.clone();
            if let Some(query) = q.queries.first() {
                r.answers.push(Record::from_rdata(
                    query.name().clone(),
                    60,
                    RData::A(A("192.0.2.7".parse().unwrap())),
                ));
            }
            let _ = sock.send_to(&r.to_vec().unwrap(), from).await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_outside_the_zone_go_upstream_when_one_is_set() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let upstream = fake_upstream().await;
    fed.dns_flags = vec!["--upstream".into(), upstream.to_string()];
    let (vip, _echo) = echo_sites_ready(&mut fed).await;
    let dns = fed.sites["west"].dns;

    tracing::info!("phase: an outside name is answered by the upstream, not refused");
    let out = dig(dns, &["example.com", "A"]);
    assert!(out.contains("status: NOERROR"), "{out}");
    assert!(out.contains("192.0.2.7"), "{out}");
    assert!(
        !out.contains(" aa"),
        "a forwarded answer is not authoritative: {out}"
    );
    assert_eq!(
        resolve_with_hickory(dns, "www.example.org.").await,
        vec!["192.0.2.7".parse::<IpAddr>().unwrap()]
    );

    tracing::info!("phase: the mesh zone is still answered locally");
    assert_eq!(
        resolve_with_hickory(dns, "echo.shop.svc.clusterset.local.").await,
        vec![vip]
    );

    tracing::info!("phase: a dead upstream gives SERVFAIL, not a hang or a crash");
    let dead = format!("127.0.0.1:{}", free_port().unwrap());
    fed.dns_flags = vec!["--upstream".into(), dead];
    fed.add_site("north", &vip_range(), &[]).await.unwrap();
    let north = fed.sites["north"].dns;
    // Ready first (before its first snapshot it answers SERVFAIL anyway).
    echo_vip(&fed, "north").await;
    let out = dig(north, &["+tries=1", "+time=5", "example.com", "A"]);
    assert!(out.contains("status: SERVFAIL"), "{out}");
    let m = http_get(fed.sites["north"].dns_admin, "/metrics").await;
    assert!(
        metric(&m, "causeway_dns_forwarded_total{result=\"error\"}") >= 1.0,
        "{m}"
    );
    fed.shutdown().await;
}

/// `dig +short` lines, sorted.
fn dig_short(server: SocketAddr, args: &[&str]) -> Vec<String> {
    let mut a = vec!["+short"];
    a.extend_from_slice(args);
    let mut lines: Vec<String> = dig(server, &a)
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with(';'))
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_services_resolve_to_ready_endpoints_with_truncation_and_tcp() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    fed.add_site("east", &vip_range(), &[]).await.unwrap();
    fed.add_site("west", &vip_range(), &[]).await.unwrap();
    let west_dns = fed.sites["west"].dns;

    // Endpoints are real listeners (only ready ones are published), all on
    // the service port, on addresses of their own.
    let port = causeway::local::free_port().unwrap();
    let (a, b) = (20 + rand::random::<u8>() % 200, rand::random::<u8>());
    let ip = |third: u8, host: u8| format!("127.{a}.{}.{host}", b.wrapping_add(third));
    let mut listeners = std::collections::BTreeMap::new();
    let mut listen = |addr: String| {
        let l = std::net::TcpListener::bind(format!("{addr}:{port}")).unwrap();
        listeners.insert(addr, l);
    };
    for h in 1..=2 {
        listen(ip(0, h));
    }
    listen(ip(1, 1));
    for h in 1..=100 {
        listen(ip(2, h));
    }
    let (e1, e2, w1) = (ip(0, 1), ip(0, 2), ip(1, 1));
    add_exports_and_restart(
        &mut fed,
        "east",
        &format!(
            "\n[[exports]]\nservice = \"db/pg\"\nport = {port}\nport_name = \"pg\"\nheadless = true\n\
             endpoints = [\"{e1}:{port}\", \"{e2}:{port}\"]\nhostnames = {{ \"{e1}:{port}\" = \"pg-0\" }}\n"
        ),
    )
    .await;
    let big: Vec<String> = (1..=100)
        .map(|h| format!("\"{}:{port}\"", ip(2, h)))
        .collect();
    add_exports_and_restart(
        &mut fed,
        "west",
        &format!(
            "\n[[exports]]\nservice = \"db/pg\"\nport = {port}\nport_name = \"pg\"\nheadless = true\n\
             endpoints = [\"{w1}:{port}\"]\nhostnames = {{ \"{w1}:{port}\" = \"pg-0\" }}\n\
             \n[[exports]]\nservice = \"db/big\"\nport = {port}\nheadless = true\nendpoints = [{}]\n",
            big.join(", ")
        ),
    )
    .await;

    tracing::info!("phase: the service name answers with every site's ready endpoints");
    let svc = "pg.db.svc.clusterset.local";
    let mut want = vec![e1.clone(), e2.clone(), w1.clone()];
    want.sort();
    eventually(
        Duration::from_secs(30),
        format_args!("{svc} A to list every site's ready endpoints"),
        async || equals(dig_short(west_dns, &[svc, "A"]), &want),
    )
    .await;
    assert_eq!(
        dig_short(west_dns, &[&format!("pg-0.east.{svc}"), "A"]),
        vec![e1.clone()]
    );
    assert_eq!(
        dig_short(west_dns, &[&format!("pg-0.west.{svc}"), "A"]),
        vec![w1.clone()]
    );
    let e2_name = format!("{}.east.{svc}", e2.replace('.', "-"));
    assert_eq!(dig_short(west_dns, &[&e2_name, "A"]), vec![e2.clone()]);
    let mut srv_want = vec![
        format!("0 100 {port} pg-0.east.{svc}."),
        format!("0 100 {port} pg-0.west.{svc}."),
        format!("0 100 {port} {e2_name}."),
    ];
    srv_want.sort();
    assert_eq!(
        dig_short(west_dns, &[&format!("_pg._tcp.{svc}"), "SRV"]),
        srv_want
    );
    assert_eq!(
        dig_short(west_dns, &["-x", &e1]),
        [format!("pg-0.east.{svc}.")]
    );
    // No record names one site's share of the service.
    let share = dig(west_dns, &[&format!("east.{svc}"), "A"]);
    assert!(
        share.contains("status: NOERROR") && share.contains("ANSWER: 0"),
        "{share}"
    );

    tracing::info!("phase: an answer too big for UDP is truncated and dig retries over TCP");
    let big_name = "big.db.svc.clusterset.local";
    eventually(
        Duration::from_secs(30),
        format_args!("100 answers for {big_name}"),
        // dig asks with EDNS0 (1232 bytes), gets TC and retries over TCP.
        async || equals(dig_short(west_dns, &[big_name, "A"]).len(), &100),
    )
    .await;
    let plain = dig(west_dns, &["+noedns", "+ignore", big_name, "A"]);
    let flags = plain
        .lines()
        .find(|l| l.contains(";; flags:"))
        .unwrap_or_default();
    assert!(flags.contains(" tc"), "no TC without EDNS0: {plain}");
    assert!(!plain.contains("OPT PSEUDOSECTION"), "{plain}");
    let edns = dig(west_dns, &["+bufsize=4096", "+ignore", big_name, "A"]);
    assert!(
        edns.contains("OPT PSEUDOSECTION"),
        "no OPT in the answer: {edns}"
    );
    assert!(
        edns.contains("udp: 1232"),
        "the server's limit is 1232: {edns}"
    );
    let flags = edns
        .lines()
        .find(|l| l.contains(";; flags:"))
        .unwrap_or_default();
    assert!(
        flags.contains(" tc"),
        "1.7 KB does not fit 1232 bytes: {edns}"
    );
    assert_eq!(dig_short(west_dns, &["+tcp", big_name, "A"]).len(), 100);
    let badvers = dig(west_dns, &["+edns=1", "+noednsneg", svc, "A"]);
    assert!(badvers.contains("status: BADVERS"), "{badvers}");

    tracing::info!("phase: an endpoint that stops leaves the answers");
    drop(listeners.remove(&e2));
    let mut want = vec![e1.clone(), w1.clone()];
    want.sort();
    eventually(
        Duration::from_secs(20),
        format_args!("the stopped endpoint to leave {svc} A"),
        async || equals(dig_short(west_dns, &[svc, "A"]), &want),
    )
    .await;
    assert!(dig(west_dns, &[&e2_name, "A"]).contains("status: NXDOMAIN"));
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_server_without_a_first_snapshot_says_servfail_and_why() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let name = "echo.shop.svc.clusterset.local";
    let (vip, _echo) = echo_sites_ready(&mut fed).await;

    tracing::info!("phase: every controller down, west's DNS server restarts");
    for id in fed.controllers.keys().copied().collect::<Vec<_>>() {
        fed.controller(id).kill().await;
    }
    let bin = fed.bin.clone();
    let west = fed.sites.get_mut("west").unwrap();
    west.dns_proc.kill().await;
    west.dns_proc.start(&bin).unwrap();
    let (dns, admin) = (west.dns, west.dns_admin);
    wait_listening(admin).await;
    // The admin port comes up before the DNS sockets are bound.
    let out = eventually(Duration::from_secs(20), "an answer to dig", async || {
        let out = try_dig(dns, &[name, "A"]).unwrap_or_else(|e| e);
        if out.contains("status:") {
            Ok(out)
        } else {
            Err(out)
        }
    })
    .await;
    assert!(out.contains("status: SERVFAIL"), "{out}");
    let ready = http_get_any(admin, "/ready").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.contains("no catalog snapshot"), "{ready}");

    tracing::info!("phase: the controllers return; the server becomes ready and answers");
    for id in fed.controllers.keys().copied().collect::<Vec<_>>() {
        fed.restart(id).unwrap();
    }
    eventually(
        Duration::from_secs(60),
        format_args!("{name} to answer {vip}"),
        async || {
            equals(
                dig(dns, &["+short", name, "A"]).trim().to_string(),
                &vip.to_string(),
            )
        },
    )
    .await;
    let ready = http_get_any(admin, "/ready").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    fed.shutdown().await;
}
