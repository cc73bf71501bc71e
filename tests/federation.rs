//! End-to-end tests: real `causeway` processes (controllers, gateways, DNS
//! servers) on loopback, driven as a user would.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use causeway::local::{call_banner, echo_server, free_port, Export, LocalFederation};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_causeway"))
}

/// Site east exports `shop/echo` port 7000 served at `echo`; site west
/// imports it. The setup most end-to-end tests share.
async fn add_echo_sites(fed: &mut LocalFederation, echo: SocketAddr) {
    let export = Export {
        service: "shop/echo".into(),
        port: 7000,
        endpoints: vec![echo],
    };
    fed.add_site("east", &vip_range(), &[export]).await.unwrap();
    fed.add_site("west", &vip_range(), &[]).await.unwrap();
}

/// `add_echo_sites` with a fresh echo server, then waits until west
/// resolves the service and a probe crosses the tunnel. Returns west's VIP
/// for it and the echo server's task (keep it alive).
async fn echo_sites_ready(fed: &mut LocalFederation) -> (IpAddr, tokio::task::JoinHandle<()>) {
    let (echo, task) = echo_server(None).await.unwrap();
    add_echo_sites(fed, echo).await;
    let vip = fed
        .wait_resolvable(
            "west",
            "echo.shop.svc.clusterset.local",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    wait_tunnel(SocketAddr::new(vip, 7000)).await;
    (vip, task)
}

/// A VIP range unlikely to collide with other tests running at once.
fn vip_range() -> String {
    // 51 200 /24 ranges: tests running at once rarely draw the same one
    // (a /16 per site made that likely with a dozen sites up at a time).
    format!(
        "127.{}.{}.0/24",
        20 + rand::random::<u8>() % 200,
        rand::random::<u8>()
    )
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("info")
        .try_init();
}

async fn federation(tmp: &tempfile::TempDir) -> LocalFederation {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut fed = LocalFederation::new(bin(), tmp.path().to_path_buf()).unwrap();
    fed.start_controllers(3).unwrap();
    fed.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    fed
}

async fn resolve_with_hickory(server: SocketAddr, name: &str) -> Vec<IpAddr> {
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    use hickory_resolver::Resolver;
    let mut udp = ConnectionConfig::udp();
    udp.port = server.port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = server.port();
    let ns = NameServerConfig::new(server.ip(), true, vec![udp, tcp]);
    let resolver = Resolver::builder_with_config(
        ResolverConfig::from_parts(None, vec![], vec![ns]),
        TokioRuntimeProvider::default(),
    )
    .build()
    .unwrap();
    resolver.lookup_ip(name).await.unwrap().iter().collect()
}

fn dig(server: SocketAddr, args: &[&str]) -> String {
    try_dig(server, args).unwrap_or_else(|e| panic!("{e}"))
}

/// `dig @server args`: its output, or why it failed (a timeout, a refused
/// port) — dig reports most failures on stdout.
fn try_dig(server: SocketAddr, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .args(args)
        .output()
        .expect("`dig` is needed by this test: install it (Debian: apt-get install bind9-dnsutils); .ci/run does");
    if !out.status.success() {
        return Err(format!(
            "dig {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8(out.stdout).unwrap())
}

/// Sends `data`, half-closes, and reads everything back.
async fn echo_roundtrip(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    try_echo_roundtrip(addr, data).await.unwrap()
}

async fn try_echo_roundtrip(addr: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let sock = tokio::net::TcpStream::connect(addr).await?;
    let (mut r, mut w) = sock.into_split();
    let to_send = data.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&to_send).await?;
        w.shutdown().await
    });
    let mut got = Vec::with_capacity(data.len());
    r.read_to_end(&mut got).await?;
    writer.await.map_err(std::io::Error::other)??;
    Ok(got)
}

async fn wait_tunnel(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let probe =
            tokio::time::timeout(Duration::from_secs(5), try_echo_roundtrip(addr, b"probe")).await;
        if matches!(&probe, Ok(Ok(v)) if v == b"probe") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "tunnel to {addr} never carried a probe"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

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
    let east_cfg = fed.sites["east"].config.clone();
    let text = std::fs::read_to_string(&east_cfg).unwrap();
    let text = text.replace("port = 7000\n", "port = 7000\nport_name = \"echo\"\n");
    std::fs::write(&east_cfg, text).unwrap();
    let bin = fed.bin.clone();
    let east = &mut fed.sites.get_mut("east").unwrap().gateway;
    east.kill().await;
    east.start(&bin).unwrap();
    let srv_name = "_echo._tcp.echo.shop.svc.clusterset.local";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let srv = dig(west_dns, &["+short", srv_name, "SRV"]);
        if srv.trim() == "0 100 7000 echo.shop.svc.clusterset.local." {
            // The target's address rides along in the additional section.
            let full = dig(west_dns, &[srv_name, "SRV"]);
            let extra = full
                .split("ADDITIONAL SECTION")
                .nth(1)
                .unwrap_or_else(|| panic!("no additional section: {full}"));
            assert!(
                extra.contains("echo.shop.svc.clusterset.local.")
                    && extra.contains(&vip.to_string()),
                "{full}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no SRV record for {srv_name}: {srv:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    fed.shutdown().await;
}

/// Joins a site from the test process (no gateway): returns its state with
/// the site's API credential.
async fn join_in_process(fed: &LocalFederation, name: &str) -> causeway_gateway::site::SiteState {
    let token = fed.create_token(name).await.unwrap();
    let dir = fed.root.join(format!("inproc-{name}"));
    let ca = causeway_gateway::site::SiteState::site_ca(&dir, None).unwrap();
    causeway_gateway::site::SiteState::join(&dir, &token, &ca, vec!["127.0.0.1:9".into()])
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_relabels_a_site_with_ctl() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = LocalFederation::new(bin(), tmp.path().to_path_buf()).unwrap();
    fed.start_controllers(1).unwrap();
    fed.wait_for_leader(Duration::from_secs(20)).await.unwrap();
    let _site = join_in_process(&fed, "alpha").await;

    tracing::info!("phase: the whole set is replaced, and cluster list shows it");
    let out = fed
        .ctl(&[
            "cluster",
            "set-labels",
            "alpha",
            "--label",
            "zone=eu-1a",
            "--label",
            "region=eu",
        ])
        .await
        .unwrap();
    assert!(out.contains("2 label(s)"), "{out}");
    let list = fed.ctl(&["cluster", "list"]).await.unwrap();
    assert!(list.contains("region=eu,zone=eu-1a"), "{list}");
    assert!(
        !list.contains("env=demo"),
        "the token's label is replaced: {list}"
    );

    tracing::info!("phase: bad input is refused, naming the label");
    let e = fed
        .ctl(&["cluster", "set-labels", "alpha", "--label", "Bad Key=x"])
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("labels") && e.contains("Bad Key"), "{e}");
    let e = fed
        .ctl(&["cluster", "set-labels", "nobody", "--label", "a=b"])
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a member"), "{e}");

    tracing::info!("phase: no --label clears them");
    fed.ctl(&["cluster", "set-labels", "alpha"]).await.unwrap();
    let list = fed.ctl(&["cluster", "list"]).await.unwrap();
    assert!(!list.contains("region=eu"), "{list}");
    fed.shutdown().await;
}

fn exports(n: usize) -> Vec<causeway_api::pb::Export> {
    (0..n)
        .map(|i| causeway_api::pb::Export {
            service: format!("bench/svc-{i}"),
            ports: vec![causeway_api::pb::ServicePort {
                port: 80,
                protocol: "tcp".into(),
                name: String::new(),
            }],
            healthy_endpoints: 1,
            vip_index: 0,
            ..Default::default()
        })
        .collect()
}

async fn publish(
    client: &causeway_api::client::ControllerClient,
    site: &str,
    n: usize,
) -> Result<u64, String> {
    publish_within(client, site, n, Duration::from_secs(10)).await
}

/// `rounds` publishes by site alpha alternating between 1000 exports and
/// one (each a delta of ~1000 changes), each within
/// `limit`; the last revision. A failure panics with the controllers' state.
async fn publish_large_deltas(
    fed: &LocalFederation,
    client: &causeway_api::client::ControllerClient,
    rounds: usize,
    limit: Duration,
) -> u64 {
    let mut revision = 0;
    for round in 0..rounds {
        let n = if round % 2 == 0 { 1000 } else { 1 };
        revision = match publish_within(client, "alpha", n, limit).await {
            Ok(r) => r,
            Err(e) => panic!("write {round}: {e}\n{}", fed.diagnose(60).await),
        };
    }
    revision
}

async fn publish_within(
    client: &causeway_api::client::ControllerClient,
    site: &str,
    n: usize,
    limit: Duration,
) -> Result<u64, String> {
    let mut fed = client.federation().await.map_err(|e| e.to_string())?;
    let r = tokio::time::timeout(
        limit,
        fed.publish_exports(causeway_api::pb::PublishExportsRequest {
            site: site.into(),
            exports: exports(n),
            tunnel_addrs: vec![],
        }),
    )
    .await
    .map_err(|_| "timed out".to_string())?;
    match r {
        Ok(r) => Ok(r.into_inner().revision),
        Err(s) => {
            client.rotate();
            Err(s.message().to_string())
        }
    }
}

async fn catalog_services(fed: &LocalFederation, node: u64) -> Vec<String> {
    let mut c = fed
        .admin_client(Some(node))
        .unwrap()
        .federation()
        .await
        .unwrap();
    let cat = c
        .catalog(causeway_api::pb::CatalogRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut v: Vec<String> = cat
        .exports
        .iter()
        .flat_map(|e| e.exports.iter().map(|x| x.service.clone()))
        .collect();
    v.sort();
    v
}

/// The catalog as node `id` serves it to an admin.
async fn read(
    fed: &LocalFederation,
    id: u64,
    linearizable: bool,
) -> Result<tonic::Response<causeway_api::pb::CatalogSnapshot>, tonic::Status> {
    let c = fed.admin_client(Some(id)).unwrap();
    let mut f = c.federation().await.unwrap();
    f.catalog(causeway_api::pb::CatalogRequest { linearizable })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_reads_come_from_a_confirmed_leader() {
    init_tracing();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = LocalFederation::new(bin(), tmp.path().to_path_buf()).unwrap();
    fed.start_controllers(3).unwrap();
    let leader = fed.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let site = join_in_process(&fed, "alpha").await;
    publish(&site.controller_client(), "alpha", 4)
        .await
        .unwrap();

    tracing::info!("phase: the leader serves it, with every acknowledged write");
    let cat = read(&fed, leader, true).await.unwrap().into_inner();
    assert_eq!(
        cat.exports.iter().map(|e| e.exports.len()).sum::<usize>(),
        4
    );

    tracing::info!("phase: a follower refuses and names the leader");
    let e = read(&fed, follower, true).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains(&format!("leader: node {leader} at")),
        "{}",
        e.message()
    );
    assert!(read(&fed, follower, false).await.is_ok());
    // Policies too.
    let policies = |id: u64| {
        let c = fed.admin_client(Some(id)).unwrap();
        async move {
            let mut f = c.federation().await.unwrap();
            f.list_policies(causeway_api::pb::ListPoliciesRequest {
                kind: String::new(),
                linearizable: true,
            })
            .await
        }
    };
    assert!(policies(leader).await.is_ok());
    let e = policies(follower).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");

    tracing::info!("phase: ctl --linearizable finds the leader from any endpoint list");
    let order = [
        fed.controller_addrs[&follower].clone(),
        fed.controller_addrs[&leader].clone(),
    ];
    let ctl = |args: &'static [&'static str]| {
        tokio::process::Command::new(bin())
            .args(["ctl", "--creds"])
            .arg(&fed.creds)
            .args(["--controller", &order.join(","), "--linearizable"])
            .args(args)
            .output()
    };
    let out = ctl(&["--output", "json", "services"]).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("bench/svc-").count(), 4, "{text}");
    let out = ctl(&["policy", "list"]).await.unwrap();
    assert!(
        out.status.success(),
        "policy list: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    tracing::info!("phase: without a quorum it fails clearly; a local read still answers");
    for id in (1..=3).filter(|id| *id != leader) {
        fed.controller(id).kill().await;
    }
    let e = read(&fed, leader, true).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("majority"), "{}", e.message());
    let cat = read(&fed, leader, false).await.unwrap().into_inner();
    assert_eq!(
        cat.exports.iter().map(|e| e.exports.len()).sum::<usize>(),
        4
    );
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_acknowledged_export() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let site = join_in_process(&fed, "alpha").await;
    let client = site.controller_client();

    tracing::info!("phase: acknowledged writes before the kill");
    let mut acked = 0;
    for n in 1..=20 {
        publish(&client, "alpha", n).await.unwrap();
        acked = n;
    }

    tracing::info!("phase: a write sent to a follower is forwarded to the leader");
    let old = fed.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    let follower = *fed.controller_addrs.keys().find(|id| **id != old).unwrap();
    let via_follower = causeway_api::client::ControllerClient::new(
        vec![fed.controller_addrs[&follower].clone()],
        &site.controller_ca_pem,
        Some(&site.api),
    );
    publish(&via_follower, "alpha", 20).await.unwrap();

    tracing::info!("phase: SIGKILL the leader");
    let old_pid = fed.controller(old).pid().unwrap();
    fed.controller(old).kill().await;
    assert!(
        !std::path::Path::new(&format!("/proc/{old_pid}")).exists(),
        "the leader process is gone"
    );

    tracing::info!("phase: writes continue on a new leader");
    let killed_at = Instant::now();
    let mut first_ok = None;
    for n in 21..=40 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match publish(&client, "alpha", n).await {
                Ok(_) => {
                    first_ok.get_or_insert(killed_at.elapsed());
                    acked = n;
                    break;
                }
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "no write accepted for 20 s after the leader died: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    tracing::info!(after = ?first_ok, "first write after the kill was acknowledged");
    let survivors: Vec<u64> = fed
        .controller_addrs
        .keys()
        .copied()
        .filter(|id| *id != old)
        .collect();
    let status = fed.status(survivors[0]).await.unwrap();
    assert_ne!(status.leader_id, old, "a new leader must have taken over");
    assert_ne!(status.leader_id, 0);

    tracing::info!("phase: every acknowledged export is there");
    let want: Vec<String> = {
        let mut v: Vec<String> = (0..acked).map(|i| format!("bench/svc-{i}")).collect();
        v.sort();
        v
    };
    for id in &survivors {
        // Followers apply asynchronously: wait for this node to catch up.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = catalog_services(&fed, *id).await;
            if got == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} has {} of {} exports",
                got.len(),
                want.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    tracing::info!("phase: the killed node restarts from its data dir and catches up");
    let leader_rev = fed.status(status.leader_id).await.unwrap().revision;
    fed.restart(old).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), fed.status(old)).await {
            if s.revision >= leader_rev && s.leader_id != 0 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "restarted node {old} did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(catalog_services(&fed, old).await, want);
    fed.shutdown().await;
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_nothing_is_lost() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let fed = federation(&tmp).await;
    let token = fed.create_token("alpha").await.unwrap();
    let dir = fed.root.join("alpha");
    let ca = causeway_gateway::site::SiteState::site_ca(&dir, None).unwrap();
    let alpha =
        causeway_gateway::site::SiteState::join(&dir, &token, &ca, vec!["127.0.0.1:9".into()])
            .await
            .unwrap();
    let client = alpha.controller_client();
    publish(&client, "alpha", 3).await.unwrap();

    tracing::info!("phase: malformed join token");
    let mut anon = causeway_api::client::ControllerClient::new(
        fed.endpoints(),
        &alpha.controller_ca_pem,
        None,
    )
    .federation()
    .await
    .unwrap();
    let err = anon
        .join(causeway_api::pb::JoinRequest {
            token: "cwj1.bm90IGpzb24".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().starts_with("token:"), "{}", err.message());
    let (code, stderr) = run_bin(&[
        "gateway",
        "--config",
        &write_config(&tmp, "ok.toml", "state_dir = \"/nonexistent/x\"\n"),
        "--join-token",
        "hello",
    ]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("join token must start with 'cwj1.'"),
        "{stderr}"
    );
    let cut = &token[..token.len() / 2];
    let (code, stderr) = run_bin(&[
        "gateway",
        "--config",
        &write_config(
            &tmp,
            "ok2.toml",
            &format!(
                "state_dir = {:?}\n",
                tmp.path().join("cut").display().to_string()
            ),
        ),
        "--join-token",
        cut,
    ]);
    assert_ne!(code, 0);
    assert!(stderr.contains("join token is malformed"), "{stderr}");

    tracing::info!("phase: reused join token");
    let dir2 = fed.root.join("alpha-again");
    let ca2 = causeway_gateway::site::SiteState::site_ca(&dir2, None).unwrap();
    let err = causeway_gateway::site::SiteState::join(&dir2, &token, &ca2, vec![])
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("already used"), "{err}");
    assert!(
        !dir2.join("site.json").exists(),
        "a refused join must not leave a half-joined site"
    );

    tracing::info!("phase: duplicate site name");
    let err = fed.create_token("alpha").await.unwrap_err();
    assert!(err.to_string().contains("already a member"), "{err}");
    let err = fed.create_token("Not_A_Label").await.unwrap_err();
    assert!(err.to_string().contains("site name"), "{err}");

    tracing::info!("phase: invalid service key");
    let mut f = client.federation().await.unwrap();
    let mut bad = exports(1);
    bad[0].service = "payments".into();
    let err = f
        .publish_exports(causeway_api::pb::PublishExportsRequest {
            site: "alpha".into(),
            exports: bad,
            tunnel_addrs: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("exports[0].service")
            && err.message().contains("<namespace>/<name>"),
        "{}",
        err.message()
    );

    tracing::info!("phase: least privilege");
    let err = f
        .publish_exports(causeway_api::pb::PublishExportsRequest {
            site: "beta".into(),
            exports: exports(1),
            tunnel_addrs: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::PermissionDenied,
        "{}",
        err.message()
    );
    let err = f
        .create_join_token(causeway_api::pb::CreateJoinTokenRequest {
            site: "gamma".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::PermissionDenied,
        "{}",
        err.message()
    );
    assert!(err.message().contains("admin"), "{}", err.message());
    let err = anon
        .catalog(causeway_api::pb::CatalogRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    tracing::info!("phase: unknown and invalid config fields");
    let cfg = write_config(
        &tmp,
        "typo.toml",
        "state_dir = \"/x\"\ntunel_listen = \"127.0.0.1:1\"\n",
    );
    let (code, stderr) = run_bin(&["gateway", "--config", &cfg]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("unknown field `tunel_listen`"), "{stderr}");
    let cfg = write_config(&tmp, "badkey.toml", "state_dir = \"/x\"\n[[exports]]\nservice = \"payments\"\nport = 80\nendpoints = [\"127.0.0.1:1\"]\n");
    let (code, stderr) = run_bin(&["gateway", "--config", &cfg]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("exports[0].service"), "{stderr}");
    let cfg = write_config(
        &tmp,
        "ctrl.toml",
        "id = 1\nlisten = \"127.0.0.1:1\"\nbogus = true\n",
    );
    let (code, stderr) = run_bin(&["controller", "--config", &cfg]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("unknown field `bogus`"), "{stderr}");

    tracing::info!("phase: nothing acknowledged was lost, the controllers still serve");
    for id in fed.controller_addrs.keys() {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = catalog_services(&fed, *id).await;
            if got.len() == 3 {
                break;
            }
            assert!(Instant::now() < deadline, "node {id} lost exports: {got:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    publish(&client, "alpha", 4).await.unwrap();
}

fn write_config(tmp: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = tmp.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
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

/// The README's first command is `cargo run --release -- demo`: with more
/// than one binary in the package, cargo needs to be told which one runs.
#[test]
fn cargo_run_picks_the_causeway_binary() {
    let manifest = include_str!("../Cargo.toml");
    let bins = manifest.matches("[[bin]]").count();
    assert!(
        bins < 2 || manifest.contains("default-run = \"causeway\""),
        "Cargo.toml has {bins} binaries and no default-run = \"causeway\": `cargo run -- demo` fails"
    );
}

#[test]
fn the_demo_runs_end_to_end() {
    let out = std::process::Command::new(bin())
        .arg("demo")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("answers payments.shop.svc.clusterset.local -> 127.13."),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"hello from payments in east\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"hello from payments in west\""),
        "{stdout}"
    );
    assert!(stdout.contains("failover east -> west worked"), "{stdout}");
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
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Err(e) = causeway::local::dns_a(west_dns, name).await {
            if e.to_string().contains("NXDomain") || e.to_string().contains("NXDOMAIN") {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "east never left west's DNS answers"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

fn voters(s: &causeway_api::pb::StatusResponse) -> Vec<u64> {
    s.nodes.iter().filter(|n| n.voter).map(|n| n.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_grow_from_one_to_five_and_shrink_back_while_serving() {
    init_tracing();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = LocalFederation::new(bin(), tmp.path().to_path_buf()).unwrap();
    for id in 1..=5 {
        fed.reserve_controller(id).unwrap();
    }
    tracing::info!("phase: a one-node cluster");
    fed.spawn_controller(1, &[1], false).unwrap();
    fed.wait_for_leader(Duration::from_secs(20)).await.unwrap();
    let site = join_in_process(&fed, "alpha").await;

    tracing::info!("phase: a client writes the whole time");
    let client = std::sync::Arc::new(causeway_api::client::ControllerClient::new(
        fed.endpoints(),
        &site.controller_ca_pem,
        Some(&site.api),
    ));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut acked, mut failed) = (0usize, 0usize);
            let mut n = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match publish(&client, "alpha", n).await {
                    Ok(_) => {
                        acked = n;
                        n += 1;
                    }
                    // One retry after rotating: a client's normal behaviour.
                    Err(_) => match publish(&client, "alpha", n).await {
                        Ok(_) => {
                            acked = n;
                            n += 1;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "write failed");
                            failed += 1;
                        }
                    },
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            (acked, failed)
        })
    };

    tracing::info!("phase: grow to three");
    for id in [2, 3] {
        fed.spawn_controller(id, &[id], true).unwrap();
        let addr = fed.controller_addrs[&id].clone();
        fed.ctl(&["controller", "add", &id.to_string(), &addr])
            .await
            .unwrap();
    }
    assert_eq!(voters(&fed.status(1).await.unwrap()), [1, 2, 3]);

    tracing::info!("phase: grow to five");
    for id in [4, 5] {
        fed.spawn_controller(id, &[id], true).unwrap();
        let addr = fed.controller_addrs[&id].clone();
        fed.ctl(&["controller", "add", &id.to_string(), &addr])
            .await
            .unwrap();
    }
    let listed = fed
        .ctl(&["--output", "json", "controller", "list"])
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["voter"] == true)
            .count(),
        5,
        "{listed}"
    );

    tracing::info!("phase: shrink back to three");
    for id in [5, 4] {
        fed.ctl(&["controller", "remove", &id.to_string()])
            .await
            .unwrap();
        fed.controller(id).kill().await;
        fed.controllers.remove(&id);
    }
    let leader = fed.wait_for_leader(Duration::from_secs(20)).await.unwrap();
    assert_eq!(voters(&fed.status(leader).await.unwrap()), [1, 2, 3]);
    let err = fed.ctl(&["controller", "remove", "9"]).await.unwrap_err();
    assert!(err.to_string().contains("not a member"), "{err}");

    tracing::info!("phase: the writer never lost service, and nothing acknowledged is missing");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, failed) = writer.await.unwrap();
    assert_eq!(failed, 0, "writes failed during membership changes");
    assert!(acked > 5, "the writer made progress ({acked})");
    for id in [1, 2, 3] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = catalog_services(&fed, id).await;
            if got.len() == acked {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} has {} of {acked}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_corrupt_data_refuses_to_serve_and_rebuilds_from_peers() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let site = join_in_process(&fed, "alpha").await;
    let client = site.controller_client();
    for n in 1..=5 {
        publish(&client, "alpha", n).await.unwrap();
    }
    let leader = fed.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    let victim = *fed
        .controller_addrs
        .keys()
        .find(|id| **id != leader)
        .unwrap();
    // Let the victim apply everything before it stops.
    tokio::time::sleep(Duration::from_millis(500)).await;
    fed.controller(victim).kill().await;

    tracing::info!("phase: flip one bit in the victim's last log entry");
    let data_dir = fed.root.join(format!("controller-{victim}"));
    let mut segments: Vec<_> = std::fs::read_dir(data_dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segments.sort();
    let newest = segments
        .last()
        .expect("the victim has log segments")
        .clone();
    let mut bytes = std::fs::read(&newest).unwrap();
    let i = bytes.len() - 3;
    bytes[i] ^= 0x04;
    std::fs::write(&newest, &bytes).unwrap();

    tracing::info!(
        "phase: it says why, sets the data aside, and rebuilds from its peers on its own"
    );
    fed.restart(victim).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = fed.controller(victim).log_tail(200);
        if log.contains("rebuilt from peers") {
            assert!(log.contains("checksum"), "{log}");
            assert!(log.contains("will not vote, lead or serve"), "{log}");
            break;
        }
        assert!(
            fed.controller(victim).exited().is_none(),
            "the node exited instead of rebuilding:\n{log}"
        );
        assert!(Instant::now() < deadline, "no rebuild within 30 s:\n{log}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let kept: Vec<_> = std::fs::read_dir(&data_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("corrupt-"))
        .collect();
    assert_eq!(kept.len(), 1, "the damaged data is kept for inspection");

    tracing::info!("phase: the others kept serving; the rebuilt node catches up and votes again");
    publish(&client, "alpha", 6).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let leader = fed.wait_for_leader(Duration::from_secs(10)).await.unwrap();
        let st = fed.status(leader).await.unwrap();
        let voter = st.nodes.iter().any(|n| n.id == victim && n.voter);
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), fed.status(victim)).await {
            if voter && s.revision == st.revision && st.revision > 0 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the rebuilt node never caught up as a voter"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(catalog_services(&fed, victim).await.len(), 6);
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_never_see_revisions_go_backwards_across_leader_kills() {
    use causeway_api::pb::watch_event::Kind;
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let site = join_in_process(&fed, "alpha").await;
    let client = std::sync::Arc::new(site.controller_client());

    tracing::info!("phase: a watcher that reconnects from its last revision, checking order");
    let watch_client = site.controller_client();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut view = causeway_api::catalog::CatalogView::default();
            let (mut reconnects, mut events) = (0usize, 0usize);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(mut fedc) = watch_client.federation().await else {
                    watch_client.rotate();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let from = if view.synced { view.revision.0 } else { 0 };
                let Ok(resp) = fedc
                    .watch(causeway_api::pb::WatchRequest {
                        from_revision: from,
                    })
                    .await
                else {
                    watch_client.rotate();
                    continue;
                };
                reconnects += 1;
                let mut stream = resp.into_inner();
                loop {
                    let next =
                        tokio::time::timeout(Duration::from_millis(300), stream.message()).await;
                    let ev = match next {
                        Ok(Ok(Some(ev))) => ev,
                        Ok(_) => {
                            watch_client.rotate();
                            break;
                        }
                        Err(_) if stop.load(std::sync::atomic::Ordering::Relaxed) => break,
                        Err(_) => continue,
                    };
                    events += 1;
                    match &ev.kind {
                        Some(Kind::Delta(_)) => assert!(
                            ev.revision > view.revision.0,
                            "delta {} after revision {} (from {from})",
                            ev.revision,
                            view.revision.0
                        ),
                        Some(Kind::Snapshot(_)) => assert!(
                            ev.revision >= view.revision.0,
                            "snapshot {} after revision {}",
                            ev.revision,
                            view.revision.0
                        ),
                        None => panic!("empty event"),
                    }
                    view.apply(ev).unwrap();
                }
            }
            (view, reconnects, events)
        })
    };

    let mut n = 0;
    for round in 0..3 {
        tracing::info!(
            round,
            "phase: writes, then SIGKILL the leader, then restart it"
        );
        for _ in 0..5 {
            n += 1;
            let deadline = Instant::now() + Duration::from_secs(20);
            while publish(&client, "alpha", n).await.is_err() {
                assert!(Instant::now() < deadline, "writes stopped");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let leader = fed.wait_for_leader(Duration::from_secs(20)).await.unwrap();
        fed.controller(leader).kill().await;
        n += 1;
        let deadline = Instant::now() + Duration::from_secs(20);
        while publish(&client, "alpha", n).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "no write accepted after killing {leader}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        fed.restart(leader).unwrap();
    }

    tracing::info!("phase: the watcher converges on the final catalog");
    let leader = fed.wait_for_leader(Duration::from_secs(20)).await.unwrap();
    let want = fed.status(leader).await.unwrap().revision;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !watcher.is_finished() {
        // Give it time to reach the leader's revision, then stop it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        if Instant::now() > deadline {
            break;
        }
        let latest = catalog_services(&fed, leader).await.len();
        if latest == n {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (view, reconnects, events) = watcher.await.unwrap();
    tracing::info!(reconnects, events, "watcher done");
    assert!(
        reconnects >= 2,
        "the watcher should have reconnected across kills ({reconnects})"
    );
    assert_eq!(
        view.revision.0, want,
        "watcher stopped at {} but the catalog is at {want}",
        view.revision.0
    );
    // Raw exports: this in-process site sends no heartbeats, so its lease may lapse.
    let services = view.exports.get("alpha").map(|e| e.len()).unwrap_or(0);
    assert_eq!(
        services, n,
        "watcher sees {services} services, {n} were acknowledged"
    );
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_bound_the_log_and_a_restart_recovers_from_them() {
    init_tracing();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = LocalFederation::new(bin(), tmp.path().to_path_buf()).unwrap();
    fed.controller_flags = vec!["--snapshot-every".into(), "50".into()];
    fed.start_controllers(3).unwrap();
    fed.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    let site = join_in_process(&fed, "alpha").await;
    let client = site.controller_client();

    tracing::info!("phase: 400 writes with a snapshot every 50 entries");
    for n in 1..=400 {
        publish(&client, "alpha", 1 + n % 7).await.unwrap();
    }
    publish(&client, "alpha", 9).await.unwrap();
    let leader = fed.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    let s = fed.status(leader).await.unwrap();
    assert!(s.snapshot_index >= 300, "no recent snapshot: {s:?}");
    assert!(s.purged_index > 0, "log never compacted: {s:?}");
    assert!(
        s.last_log_index - s.purged_index <= 50 + 10 + 5,
        "log kept {} entries",
        s.last_log_index - s.purged_index
    );

    tracing::info!("phase: every node restarts from snapshot + log with the same catalog");
    for id in [1, 2, 3] {
        fed.controller(id).kill().await;
    }
    for id in [1, 2, 3] {
        fed.restart(id).unwrap();
    }
    let leader = fed.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = catalog_services(&fed, leader).await;
        if got.len() == 9 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after restart the catalog has {} services",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    publish(&client, "alpha", 3).await.unwrap();
    fed.shutdown().await;
}

/// A follower that missed megabytes of log is sent it a piece at a time:
/// one `AppendEntries` with the whole backlog could not finish within the
/// heartbeat interval openraft allows it, and would be retried forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_far_behind_on_large_entries_catches_up() {
    init_tracing();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = LocalFederation::new(bin(), tmp.path().to_path_buf()).unwrap();
    fed.start_controllers(3).unwrap();
    let leader = fed.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    let site = join_in_process(&fed, "alpha").await;
    let client = site.controller_client();
    let behind = (1..=3).find(|id| *id != leader).unwrap();

    tracing::info!(
        behind,
        "phase: one follower down while ~10 MB of log is written"
    );
    fed.controller(behind).kill().await;
    let revision = publish_large_deltas(&fed, &client, 80, Duration::from_secs(30)).await;

    tracing::info!("phase: it comes back and catches up on the whole backlog");
    fed.restart(behind).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match fed.status(behind).await {
            Ok(s) if s.revision >= revision => break,
            _ if Instant::now() > deadline => panic!(
                "the follower never caught up to revision {revision}\n{}",
                fed.diagnose(40).await
            ),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    // And the cluster still takes writes.
    publish(&client, "alpha", 3).await.unwrap();
    fed.shutdown().await;
}

/// Root only: mounts a small tmpfs as a controller's data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_gives_a_clear_error_and_loses_nothing_acknowledged() {
    init_tracing();
    assert!(
        nix_is_root(),
        "this test mounts a tmpfs and needs root: run `sudo scripts/test-all` (CI runs as root)"
    );
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = LocalFederation::new(bin(), tmp.path().to_path_buf()).unwrap();
    fed.reserve_controller(1).unwrap();
    let data = fed.root.join("controller-1");
    std::fs::create_dir_all(&data).unwrap();
    let mount = |opts: &str| {
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(&data)
            .status()
            .unwrap();
        assert!(st.success(), "mount {opts} failed");
    };
    mount("size=4m");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _guard = Unmount(data.clone());
    fed.spawn_controller(1, &[1], false).unwrap();
    fed.wait_for_leader(Duration::from_secs(20)).await.unwrap();
    let site = join_in_process(&fed, "alpha").await;
    let client = site.controller_client();

    tracing::info!("phase: write big export sets until the disk is full");
    let mut acked = 0;
    let mut error = String::new();
    for n in 1..=400 {
        match publish(&client, "alpha", 200 + n).await {
            Ok(_) => acked = 200 + n,
            Err(e) => {
                error = e;
                break;
            }
        }
    }
    assert!(!error.is_empty(), "4 MiB never filled up");
    tracing::info!(acked, %error, "write refused");
    let deadline = Instant::now() + Duration::from_secs(20);
    while fed.controller(1).exited().is_none() {
        assert!(
            Instant::now() < deadline,
            "the node kept running on a full disk:\n{}",
            fed.controller(1).log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = fed.controller(1).log_tail(60);
    assert!(log.contains("No space left on device"), "{log}");

    tracing::info!("phase: more space, restart: everything acknowledged is there");
    mount("remount,size=64m");
    fed.restart(1).unwrap();
    fed.wait_for_leader(Duration::from_secs(20)).await.unwrap();
    // Reads come from the node's applied state, which replays the log
    // after the election: wait for it (a loss would never get there).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = catalog_services(&fed, 1).await.len();
        if got >= acked {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acknowledged {acked} exports, found {got}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    publish(&client, "alpha", 5).await.unwrap();
    fed.shutdown().await;
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
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

    tracing::info!("phase: a site may not act for another site or as an admin");
    denied(
        site.publish_exports(pb::PublishExportsRequest {
            site: "beta".into(),
            ..Default::default()
        })
        .await,
        "publish for beta",
    );
    denied(
        site.heartbeat(pb::HeartbeatRequest {
            site: "beta".into(),
        })
        .await,
        "heartbeat for beta",
    );
    denied(
        site.create_join_token(pb::CreateJoinTokenRequest {
            site: "gamma".into(),
            ..Default::default()
        })
        .await,
        "token",
    );
    denied(
        site.remove_site(pb::RemoveSiteRequest {
            site: "beta".into(),
        })
        .await,
        "remove site",
    );
    denied(
        site.add_controller(pb::AddControllerRequest {
            id: 9,
            addr: "127.0.0.1:1".into(),
        })
        .await,
        "add controller",
    );
    denied(
        site.remove_controller(pb::RemoveControllerRequest { id: 1 })
            .await,
        "remove controller",
    );
    denied(
        site.update_trust_bundle(pb::UpdateTrustBundleRequest {
            site: "beta".into(),
            trust_bundle_pem: some_ca_pem(),
        })
        .await,
        "trust bundle for beta",
    );

    denied(
        site.set_site_labels(pb::SetSiteLabelsRequest {
            site: "alpha".into(),
            labels: [("region".to_string(), "eu".to_string())].into(),
        })
        .await,
        "labels of its own site",
    );

    tracing::info!("phase: only controller nodes speak Raft");
    let mut raft_as_site = RaftClient::new(site_ch);
    let payload = || pb::RaftPayload {
        data: b"{}".to_vec(),
    };
    denied(
        raft_as_site.append_entries(payload()).await,
        "append as site",
    );
    denied(raft_as_site.vote(payload()).await, "vote as site");
    denied(
        raft_as_site.install_snapshot(payload()).await,
        "snapshot as site",
    );
    denied(raft_as_site.propose(payload()).await, "propose as site");
    denied(
        raft_as_site.change_membership(payload()).await,
        "membership as site",
    );
    let admin_ch = fed.admin_client(None).unwrap().channel().await.unwrap();
    denied(
        RaftClient::new(admin_ch).vote(payload()).await,
        "vote as admin",
    );

    tracing::info!("phase: without a certificate only Join is open");
    denied(
        anon.catalog(pb::CatalogRequest::default()).await,
        "anonymous catalog",
    );
    denied(anon.status(pb::StatusRequest {}).await, "anonymous status");
    denied(
        anon.watch(pb::WatchRequest { from_revision: 0 }).await,
        "anonymous watch",
    );
    denied(
        RaftClient::new(anon_ch).append_entries(payload()).await,
        "anonymous append",
    );
    denied(
        anon.update_trust_bundle(pb::UpdateTrustBundleRequest {
            site: "alpha".into(),
            trust_bundle_pem: some_ca_pem(),
        })
        .await,
        "anonymous trust bundle",
    );

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
async fn sigterm_drains_streams_in_flight_and_new_connections_fail_over() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (target, _t1, _t2) = banner_sites(&mut fed).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while causeway::local::call_banner(target, "x")
        .await
        .ok()
        .as_deref()
        != Some("east")
    {
        assert!(Instant::now() < deadline, "east never answered first");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

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
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = fed.sites.get_mut("east").unwrap().gateway.exited() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "east did not exit after its last stream"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        status.success(),
        "drained gateway should exit 0, got {status}"
    );
    let log = fed.sites["east"].gateway.log_tail(5);
    assert!(log.contains("drained"), "{log}");
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_site_tears_down_its_tunnels_and_refuses_its_credential() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (echo, _task) = echo_server(Some("east".into())).await.unwrap();
    add_echo_sites(&mut fed, echo).await;
    let vip = fed
        .wait_resolvable(
            "west",
            "echo.shop.svc.clusterset.local",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let target = SocketAddr::new(vip, 7000);
    let deadline = Instant::now() + Duration::from_secs(20);
    while causeway::local::call_banner(target, "x").await.is_err() {
        assert!(Instant::now() < deadline, "tunnel never worked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

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
        .watch(causeway_api::pb::WatchRequest { from_revision: 0 })
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

/// `causeway ARGS`: exit code and stdout + stderr.
fn run_bin(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(bin())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

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
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = fed.sites[site].gateway.log_tail(40);
        if log.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{site}'s gateway never logged {needle:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    fed.gateway_extra = "retire_grace_secs = 5\n".into();
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
async fn streams_spread_over_a_sites_endpoints_and_skip_dead_ones() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    // These gateways also run single-threaded (worker_threads = 1).
    fed.gateway_extra = "balancer = \"round_robin\"\nworker_threads = 1\n".into();
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
    let vip = fed
        .wait_resolvable(
            "west",
            "echo.shop.svc.clusterset.local",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let target = SocketAddr::new(vip, 7000);
    let deadline = Instant::now() + Duration::from_secs(20);
    while causeway::local::call_banner(target, "x").await.is_err() {
        assert!(Instant::now() < deadline, "tunnel never worked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

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
async fn deny_by_default_lets_only_allowed_sites_call_and_says_why() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (echo, _t) = echo_server(Some("east".into())).await.unwrap();
    fed.gateway_extra =
        "authorization = \"deny\"\n[[allow]]\nservice = \"shop/echo\"\nsites = [\"west\"]\n".into();
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
    fed.gateway_extra.clear();
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
    let deadline = Instant::now() + Duration::from_secs(20);
    while causeway::local::call_banner(SocketAddr::new(west_vip, 7000), "x")
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "west never got through");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

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

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_open_and_close_without_leaking() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (vip, _echo) = echo_sites_ready(&mut fed).await;
    let target = SocketAddr::new(vip, 7000);
    let pids = [
        fed.sites["east"].gateway.pid().unwrap(),
        fed.sites["west"].gateway.pid().unwrap(),
    ];

    // Total connections; CAUSEWAY_LEAK_CONNS overrides (the issue asks for 100k).
    let total: usize = std::env::var("CAUSEWAY_LEAK_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let round = |n: usize| async move {
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let next = next.clone();
            tasks.push(tokio::spawn(async move {
                let mut failed = 0usize;
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                    let ok = async {
                        let mut s = tokio::net::TcpStream::connect(target).await.ok()?;
                        // Reset on close once the echo is back: no TIME_WAIT
                        // pile-up on the loopback's ephemeral ports.
                        #[allow(deprecated)]
                        let _ = s.set_linger(Some(Duration::ZERO));
                        s.write_all(b"ping").await.ok()?;
                        s.shutdown().await.ok()?;
                        let mut b = Vec::new();
                        s.read_to_end(&mut b).await.ok()?;
                        (b == b"ping").then_some(())
                    }
                    .await;
                    if ok.is_none() {
                        failed += 1;
                    }
                }
                failed
            }));
        }
        let mut failed = 0;
        for t in tasks {
            failed += t.await.unwrap();
        }
        failed
    };

    tracing::info!("phase: warm up with 2000 connections");
    assert_eq!(round(2000).await, 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds0: Vec<usize> = pids.iter().map(|p| open_fds(*p)).collect();
    let rss0: Vec<u64> = pids.iter().map(|p| rss_kb(*p)).collect();

    tracing::info!(total, "phase: open and close connections");
    let failed = round(total).await;
    assert_eq!(failed, 0, "{failed} of {total} connections failed");

    tracing::info!("phase: everything was released");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let fds: Vec<usize> = pids.iter().map(|p| open_fds(*p)).collect();
        let east = http_get(fed.sites["east"].gateway_admin, "/metrics").await;
        let west = http_get(fed.sites["west"].gateway_admin, "/metrics").await;
        let active = metric(&east, "causeway_tunnel_streams_active")
            + metric(&west, "causeway_tunnel_streams_active");
        let fds_ok = fds
            .iter()
            .zip(&fds0)
            .all(|(now, before)| *now <= before + 2);
        if active == 0.0 && fds_ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leak: {active} streams still active, fds {fds:?} (were {fds0:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rss1: Vec<u64> = pids.iter().map(|p| rss_kb(*p)).collect();
    tracing::info!(?rss0, ?rss1, "gateway RSS in KiB before and after");
    for (a, b) in rss0.iter().zip(&rss1) {
        assert!(
            *b < a + 32 * 1024,
            "gateway RSS grew from {a} KiB to {b} KiB"
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
async fn a_stalled_watcher_is_cut_off_and_never_slows_the_others() {
    use causeway_api::pb::{self, watch_event::Kind};
    init_tracing();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = LocalFederation::new(bin(), tmp.path().to_path_buf()).unwrap();
    fed.controller_flags = vec!["--watch-stall-ms".into(), "500".into()];
    fed.start_controllers(3).unwrap();
    let leader = fed.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    let site = join_in_process(&fed, "alpha").await;
    // Both watchers on the leader, so they share its hub and broadcast.
    let watch_client = causeway_api::client::ControllerClient::new(
        vec![fed.controller_addrs[&leader].clone()],
        &site.controller_ca_pem,
        Some(&site.api),
    );
    // Each watcher on its own connection, as separate clients would be.
    let watch = || async {
        let ch = causeway_api::client::ControllerClient::new(
            vec![fed.controller_addrs[&leader].clone()],
            &site.controller_ca_pem,
            Some(&site.api),
        )
        .channel()
        .await
        .unwrap();
        pb::federation_client::FederationClient::new(ch)
            .max_decoding_message_size(64 * 1024 * 1024)
            .watch(pb::WatchRequest { from_revision: 0 })
            .await
            .unwrap()
            .into_inner()
    };

    tracing::info!("phase: one watcher never reads, one reads everything");
    let mut stalled = watch().await;
    let mut healthy = watch().await;
    let (seen_tx, mut seen_rx) = tokio::sync::watch::channel(0u64);
    let follower = tokio::spawn(async move {
        let mut last = 0;
        while let Ok(Some(ev)) = healthy.message().await {
            if !matches!(ev.kind, Some(Kind::Snapshot(_))) {
                assert!(ev.revision > last, "{} after {last}", ev.revision);
            }
            last = ev.revision;
            let _ = seen_tx.send(last);
        }
    });

    tracing::info!("phase: large deltas, far more than the stalled stream can buffer");
    let client = site.controller_client();
    // Tens of MB in all (loopback socket buffers alone can hold 32 MB).
    let revision = publish_large_deltas(&fed, &client, 800, Duration::from_secs(10)).await;

    tracing::info!("phase: the healthy watcher is fully caught up");
    // A watcher held up by the stalled one would never catch up; the bound
    // only has to outlast a starved CI machine decoding tens of MB.
    tokio::time::timeout(
        Duration::from_secs(60),
        seen_rx.wait_for(|seen| *seen >= revision),
    )
    .await
    .expect("the healthy watcher fell behind")
    .unwrap();

    tracing::info!("phase: the stalled one was cut off: its stream ends after what was buffered");
    let m = http_get(fed.controller_admin[&leader], "/metrics").await;
    assert!(
        metric(&m, "causeway_watch_cutoffs_total") >= 1.0,
        "no cut-off recorded:\n{m}"
    );
    let mut last = 0;
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stalled.message().await {
                Ok(Some(ev)) => last = ev.revision,
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stalled stream was never cut off");
    assert!(
        last < revision,
        "the stalled watcher got everything, so it was never stalled"
    );

    tracing::info!("phase: it resumes where it stopped and converges on the same revision");
    let ch = watch_client.channel().await.unwrap();
    let mut resumed = pb::federation_client::FederationClient::new(ch)
        .max_decoding_message_size(64 * 1024 * 1024)
        .watch(pb::WatchRequest {
            from_revision: last,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = last;
    while got < revision {
        let ev = tokio::time::timeout(Duration::from_secs(10), resumed.message())
            .await
            .expect("resumed watch stalled")
            .unwrap()
            .expect("resumed watch ended");
        assert!(ev.revision > got || matches!(ev.kind, Some(Kind::Snapshot(_))));
        got = ev.revision;
    }
    assert_eq!(got, revision);
    follower.abort();
    fed.shutdown().await;
}

/// Opened inbound streams a gateway has counted.
async fn opened_in(admin: SocketAddr) -> f64 {
    let m = http_get(admin, "/metrics").await;
    metric(
        &m,
        "causeway_tunnel_streams_total{direction=\"in\",status=\"opened\"}",
    )
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
    let vip = fed
        .wait_resolvable(
            "west",
            "echo.shop.svc.clusterset.local",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
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
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let _ = call_banner(target, "warm").await;
        if out_conns().await >= 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "west never connected to both replicas:\n{}",
            fed.sites["west"].gateway.log_tail(400)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

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
    let deadline = Instant::now() + Duration::from_secs(10);
    while out_conns().await > 1.0 {
        assert!(
            Instant::now() < deadline,
            "the dead replica was never noticed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = opened_in(gw0_admin).await;
    for i in 0..20 {
        call_banner(target, &format!("failover {i}")).await.unwrap();
    }
    assert_eq!(opened_in(gw0_admin).await - before, 20.0);

    tracing::info!("phase: it comes back and is redialed on its own");
    replica.start(&fed.bin).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out_conns().await < 2.0 {
        assert!(
            Instant::now() < deadline,
            "the replica was never redialed:\n{}",
            fed.sites["west"].gateway.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
async fn tunnel_certificates_renew_in_place_without_dropping_tunnels() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    // Three-second certificates: renewed every two seconds.
    fed.gateway_extra = "cert_ttl_secs = 3\n".into();
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

/// Waits until something accepts TCP connections on `addr`.
async fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

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
    fed.wait_resolvable(
        "north",
        "echo.shop.svc.clusterset.local",
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let out = dig(north, &["+tries=1", "+time=5", "example.com", "A"]);
    assert!(out.contains("status: SERVFAIL"), "{out}");
    let m = http_get(fed.sites["north"].dns_admin, "/metrics").await;
    assert!(
        metric(&m, "causeway_dns_forwarded_total{result=\"error\"}") >= 1.0,
        "{m}"
    );
    fed.shutdown().await;
}

/// Appends `toml` (export tables) to a site's gateway config and restarts
/// the gateway with it.
async fn add_exports_and_restart(fed: &mut LocalFederation, site: &str, toml: &str) {
    let cfg = fed.sites[site].config.clone();
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(toml);
    std::fs::write(&cfg, text).unwrap();
    let bin = fed.bin.clone();
    let gw = &mut fed.sites.get_mut(site).unwrap().gateway;
    gw.kill().await;
    gw.start(&bin).unwrap();
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
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = dig_short(west_dns, &[svc, "A"]);
        if got == want {
            break;
        }
        assert!(Instant::now() < deadline, "{svc} A: {got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // dig asks with EDNS0 (1232 bytes), gets TC and retries over TCP.
        let got = dig_short(west_dns, &[big_name, "A"]);
        if got.len() == 100 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{big_name}: {} answers",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = dig_short(west_dns, &[svc, "A"]);
        if got == want {
            break;
        }
        assert!(Instant::now() < deadline, "{svc} A: {got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(dig(west_dns, &[&e2_name, "A"]).contains("status: NXDOMAIN"));
    fed.shutdown().await;
}

/// The raw HTTP response of a GET, whatever its status.
async fn http_get_any(addr: SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
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
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        // The admin port comes up before the DNS sockets are bound.
        let out = try_dig(dns, &[name, "A"]).unwrap_or_else(|e| e);
        if out.contains("status:") {
            break out;
        }
        assert!(Instant::now() < deadline, "no answer: {out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(out.contains("status: SERVFAIL"), "{out}");
    let ready = http_get_any(admin, "/ready").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.contains("no catalog snapshot"), "{ready}");

    tracing::info!("phase: the controllers return; the server becomes ready and answers");
    for id in fed.controllers.keys().copied().collect::<Vec<_>>() {
        fed.restart(id).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let short = dig(dns, &["+short", name, "A"]);
        if short.trim() == vip.to_string() {
            break;
        }
        assert!(Instant::now() < deadline, "still not answering: {short:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let ready = http_get_any(admin, "/ready").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    fed.shutdown().await;
}

async fn list(fed: &LocalFederation) -> Vec<serde_json::Value> {
    let out = fed
        .ctl(&["--output", "json", "policy", "list"])
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["policies"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_are_validated_stored_in_raft_and_streamed_to_sites() {
    use causeway_api::pb;
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let site = join_in_process(&fed, "alpha").await;
    let file = tmp.path().join("policies.yaml");
    let policies = |weight: u32| {
        format!(
            "apiVersion: causeway.dev/v1alpha1\nkind: TrafficSplit\nmetadata:\n  name: canary\n  namespace: shop\n\
             spec:\n  service: payments\n  weights:\n    east: 99\n    west: {weight}\n---\n\
             apiVersion: causeway.dev/v1alpha1\nkind: RetryPolicy\nmetadata: {{name: retry, namespace: shop}}\n\
             spec: {{service: payments, attempts: 2, on: [connect-failure, 5xx]}}\n"
        )
    };

    tracing::info!("phase: apply, re-apply, change one");
    std::fs::write(&file, policies(1)).unwrap();
    let path = file.to_str().unwrap();
    let out = fed.ctl(&["policy", "apply", "-f", path]).await.unwrap();
    assert!(out.contains("TrafficSplit shop/canary created"), "{out}");
    assert!(out.contains("RetryPolicy shop/retry created"), "{out}");
    let out = fed.ctl(&["policy", "apply", "-f", path]).await.unwrap();
    assert!(
        out.contains("canary unchanged") && out.contains("retry unchanged"),
        "{out}"
    );
    std::fs::write(&file, policies(5)).unwrap();
    let out = fed.ctl(&["policy", "apply", "-f", path]).await.unwrap();
    assert!(
        out.contains("canary configured") && out.contains("retry unchanged"),
        "{out}"
    );

    tracing::info!("phase: an invalid file is refused whole, every mistake named");
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(
        &bad,
        format!(
            "{}---\napiVersion: causeway.dev/v1alpha1\nkind: TimeoutPolicy\nmetadata: {{name: t, namespace: shop}}\n\
             spec: {{service: payments, requestMs: 100, perTryMs: 500, jitter: 3}}\n",
            policies(50)
        ),
    )
    .unwrap();
    let err = fed
        .ctl(&["policy", "apply", "-f", bad.to_str().unwrap()])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("nothing was applied"), "{err}");
    assert!(
        err.contains("spec.perTryMs: 500 exceeds requestMs 100"),
        "{err}"
    );
    assert!(err.contains("spec.jitter: unknown field"), "{err}");
    let got = list(&fed).await;
    assert_eq!(got.len(), 2, "{got:?}");
    let canary = got.iter().find(|p| p["kind"] == "TrafficSplit").unwrap();
    assert_eq!(canary["spec"]["weights"]["west"], 5, "{canary}");

    tracing::info!("phase: a site reads policies (and gets them with the catalog), may not write");
    let client = site.controller_client();
    let mut fed_site = client.federation().await.unwrap();
    let listed = fed_site
        .list_policies(pb::ListPoliciesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.policies.len(), 2);
    let snap = fed_site
        .catalog(pb::CatalogRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snap.policies.len(), 2);
    let denied = fed_site
        .apply_policies(pb::ApplyPoliciesRequest {
            documents_json: vec![listed.policies[0].document_json.clone()],
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");

    tracing::info!("phase: policies survive a restart of every controller");
    for id in fed.controllers.keys().copied().collect::<Vec<_>>() {
        fed.controller(id).kill().await;
    }
    for id in fed.controllers.keys().copied().collect::<Vec<_>>() {
        fed.restart(id).unwrap();
    }
    fed.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    // Reads are served from each node's applied state: a node that just
    // restarted catches up once the new leader commits (docs/architecture.md).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let again = list(&fed).await;
        if again == got {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the restart: {again:?}, want {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    tracing::info!("phase: delete");
    let out = fed
        .ctl(&["policy", "delete", "TrafficSplit", "shop/canary"])
        .await
        .unwrap();
    assert!(out.contains("deleted"), "{out}");
    assert_eq!(list(&fed).await.len(), 1);
    let err = fed
        .ctl(&["policy", "delete", "TrafficSplit", "shop/canary"])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no TrafficSplit shop/canary"), "{err}");
    fed.shutdown().await;
}

/// East and west export `shop/echo` (answering with their names), central
/// imports it: the VIP target at central and both echo servers' tasks.
async fn banner_sites(
    fed: &mut LocalFederation,
) -> (
    SocketAddr,
    tokio::task::JoinHandle<()>,
    tokio::task::JoinHandle<()>,
) {
    let (east_echo, east_task) = echo_server(Some("east".into())).await.unwrap();
    let (west_echo, west_task) = echo_server(Some("west".into())).await.unwrap();
    let svc = |a| Export {
        service: "shop/echo".into(),
        port: 7000,
        endpoints: vec![a],
    };
    fed.add_site("east", &vip_range(), &[svc(east_echo)])
        .await
        .unwrap();
    fed.add_site("west", &vip_range(), &[svc(west_echo)])
        .await
        .unwrap();
    fed.add_site("central", &vip_range(), &[]).await.unwrap();
    let vip = fed
        .wait_resolvable(
            "central",
            "echo.shop.svc.clusterset.local",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    (SocketAddr::new(vip, 7000), east_task, west_task)
}

/// Which banner answers `n` calls, as (east, west, failed) counts.
async fn banner_counts(target: SocketAddr, n: usize) -> (usize, usize, usize) {
    let (mut east, mut west, mut failed) = (0, 0, 0);
    for _ in 0..n {
        match call_banner(target, "x").await.as_deref() {
            Ok("east") => east += 1,
            Ok("west") => west += 1,
            _ => failed += 1,
        }
    }
    (east, west, failed)
}

async fn wait_all_to(target: SocketAddr, site: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Calls may fail while a policy change propagates (e.g. a widened
        // AuthorizationPolicy): wait for all ten to land on `site`.
        let (e, w, f) = banner_counts(target, 10).await;
        let got = if site == "east" { e } else { w };
        if got == 10 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still east {e} / west {w} / failed {f} of 10"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_follow_failover_and_split_policies() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (target, _t1, west_task) = banner_sites(&mut fed).await;
    wait_all_to(target, "east", "no policy: the first healthy site by name").await;

    let apply = |yaml: String| {
        let file = tmp.path().join(format!("p-{}.yaml", rand::random::<u32>()));
        std::fs::write(&file, yaml).unwrap();
        file
    };
    let head = |kind: &str, name: &str| {
        format!("apiVersion: causeway.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}, namespace: shop}}\n")
    };

    tracing::info!("phase: an ordered FailoverPolicy sends everything to west");
    let f = apply(format!(
        "{}spec: {{service: echo, mode: ordered, sites: [west, east]}}\n",
        head("FailoverPolicy", "west-first")
    ));
    fed.ctl(&["policy", "apply", "-f", f.to_str().unwrap()])
        .await
        .unwrap();
    wait_all_to(target, "west", "ordered [west, east]").await;
    let gw = fed.sites["central"].gateway_admin.to_string();
    let explain_args = [
        "explain",
        "echo.shop.svc.clusterset.local",
        "--from",
        "central",
        "--gateway",
        gw.as_str(),
    ];
    let explain = || fed.ctl(&explain_args);
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        let out = explain().await.unwrap();
        // The gateway reports RTTs once a second.
        if !out.contains("rtt unknown") {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "no RTTs from the gateway:\n{out}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(out.contains("-> shop/echo: ClusterSetIP"), "{out}");
    assert!(
        out.contains("policies: FailoverPolicy shop/west-first"),
        "{out}"
    );
    assert!(out.contains("tier 1: west"), "{out}");
    let tier1 = out.lines().find(|l| l.contains("tier 1:")).unwrap();
    assert!(tier1.contains("share 100.0%"), "{out}");

    tracing::info!("phase: a TrafficSplit of 80/20");
    let f = apply(format!(
        "{}spec: {{service: echo, weights: {{east: 80, west: 20}}}}\n",
        head("TrafficSplit", "split")
    ));
    fed.ctl(&["policy", "apply", "-f", f.to_str().unwrap()])
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while banner_counts(target, 10).await.0 == 0 {
        assert!(Instant::now() < deadline, "the split never took effect");
    }
    let (east, west, failed) = banner_counts(target, 400).await;
    assert_eq!(failed, 0, "calls failed under the split");
    let share = west as f64 / 400.0;
    // 20% of 400: standard deviation 2 points; allow 5 deviations.
    assert!(
        (0.10..=0.30).contains(&share),
        "west got {west} of 400 (east {east})"
    );

    tracing::info!("phase: without the split, west's endpoints stop: traffic fails over to east");
    fed.ctl(&["policy", "delete", "TrafficSplit", "shop/split"])
        .await
        .unwrap();
    wait_all_to(target, "west", "split deleted: back to ordered").await;
    west_task.abort();
    wait_all_to(target, "east", "west's endpoints down: the next tier").await;
    // Connections fail over at once; the health the tiers rest on follows
    // with west's next health report.
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        let out = explain().await.unwrap();
        if out.contains("healthy 0/1") {
            break out;
        }
        assert!(Instant::now() < deadline, "west still healthy:\n{out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let tier1 = out.lines().find(|l| l.contains("tier 1:")).unwrap();
    let tier2 = out.lines().find(|l| l.contains("tier 2:")).unwrap();
    assert!(
        tier1.contains("west") && tier1.contains("share   0.0%"),
        "{out}"
    );
    assert!(
        tier2.contains("east") && tier2.contains("share 100.0%"),
        "{out}"
    );
    let nope = fed.ctl(&["explain", "shop/nothing"]).await.unwrap();
    assert!(nope.contains("no site exports it"), "{nope}");

    tracing::info!("phase: an AuthorizationPolicy that does not name central refuses its calls");
    let authz = |sites: &str| {
        apply(format!(
            "{}spec: {{service: echo, allow: [{{sites: [{sites}]}}]}}\n",
            head("AuthorizationPolicy", "who")
        ))
    };
    let f = authz("west");
    fed.ctl(&["policy", "apply", "-f", f.to_str().unwrap()])
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while call_banner(target, "x").await.is_ok() {
        assert!(Instant::now() < deadline, "calls still allowed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = http_get(fed.sites["east"].gateway_admin, "/metrics").await;
    assert!(
        m.contains("status=\"forbidden\""),
        "east counted no forbidden stream"
    );
    let f = authz("west, central");
    fed.ctl(&["policy", "apply", "-f", f.to_str().unwrap()])
        .await
        .unwrap();
    wait_all_to(target, "east", "central allowed again").await;
    fed.shutdown().await;
}

/// Gateway TOML exporting `shop/web` port 8080 as HTTP/1.1 at `endpoint`.
fn web_http_export(endpoint: SocketAddr) -> String {
    format!("\n[[exports]]\nservice = \"shop/web\"\nport = 8080\nprotocol = \"http\"\nendpoints = [\"{endpoint}\"]\n")
}

/// `causeway::local::http_backend` on `addr` (port 0 picks one).
async fn http_backend(addr: &str, name: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    causeway::local::http_backend(addr.parse().unwrap(), name)
        .await
        .unwrap()
}

/// One keep-alive HTTP/1.1 client connection.
struct HttpClient {
    r: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl HttpClient {
    async fn connect(addr: SocketAddr) -> Self {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (r, w) = s.into_split();
        Self {
            r: tokio::io::BufReader::new(r),
            w,
        }
    }

    /// `(status, x-causeway-error header, body)`.
    async fn get(&mut self, path: &str) -> (u16, String, String) {
        use tokio::io::AsyncBufReadExt;
        self.w
            .write_all(format!("GET {path} HTTP/1.1\r\nhost: web\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut status = String::new();
        self.r.read_line(&mut status).await.unwrap();
        let code: u16 = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let (mut len, mut err) = (0usize, String::new());
        loop {
            let mut h = String::new();
            self.r.read_line(&mut h).await.unwrap();
            if h == "\r\n" || h.is_empty() {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            if let Some(v) = lower.strip_prefix("x-causeway-error:") {
                err = v.trim().to_string();
            }
        }
        let mut body = vec![0u8; len];
        self.r.read_exact(&mut body).await.unwrap();
        (code, err, String::from_utf8_lossy(&body).into_owned())
    }
}

/// The HTTP path keeps upstream connections: a run of requests reuses a
/// few tunnel streams (and endpoint connections) instead of one per
/// request, and when the endpoint goes away and comes back, the dead
/// connections are dropped and no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_upstream_connections_are_reused_and_dead_ones_dropped() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (east_addr, east_task, accepted) =
        causeway::local::http_backend_counting("127.0.0.1:0".parse().unwrap(), "east")
            .await
            .unwrap();
    fed.add_site("east", &vip_range(), &[]).await.unwrap();
    fed.add_site("central", &vip_range(), &[]).await.unwrap();
    add_exports_and_restart(&mut fed, "east", &web_http_export(east_addr)).await;
    let target = imported(&fed, "central", "web.shop.svc.clusterset.local", 8080).await;
    let mut c = HttpClient::connect(target).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.get("/").await.0 != 200 {
        assert!(Instant::now() < deadline, "web never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    tracing::info!("phase: 200 requests over a handful of upstream connections");
    let before = accepted.load(std::sync::atomic::Ordering::Relaxed);
    for _ in 0..200 {
        assert_eq!(c.get("/").await, (200, String::new(), "east".to_string()));
    }
    let opened = accepted.load(std::sync::atomic::Ordering::Relaxed) - before;
    // Health checks connect too (one every few seconds); without reuse
    // this would be 200.
    assert!(
        opened <= 10,
        "{opened} endpoint connections for 200 requests"
    );
    let m = http_get(fed.sites["central"].gateway_admin, "/metrics").await;
    let reused = metric(
        &m,
        r#"causeway_http_upstream_connections_total{use="reused"}"#,
    );
    assert!(reused >= 190.0, "{reused} requests reused a connection");

    tracing::info!("phase: the endpoint restarts; pooled connections to it are dead");
    east_task.abort();
    let _ = east_task.await;
    let (_again, _task) = http_backend(&east_addr.to_string(), "east").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..20 {
        assert_eq!(
            c.get("/").await,
            (200, String::new(), "east".to_string()),
            "request {i} after the restart"
        );
    }
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_are_routed_one_by_one_with_splits_faults_breakers_and_failover() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (east_addr, east_task) = http_backend("127.0.0.1:0", "east").await;
    let (west_addr, _west_task) = http_backend("127.0.0.1:0", "west").await;
    fed.add_site("east", &vip_range(), &[]).await.unwrap();
    fed.add_site("west", &vip_range(), &[]).await.unwrap();
    fed.add_site("central", &vip_range(), &[]).await.unwrap();
    add_exports_and_restart(&mut fed, "east", &web_http_export(east_addr)).await;
    add_exports_and_restart(&mut fed, "west", &web_http_export(west_addr)).await;
    let vip = fed
        .wait_resolvable(
            "central",
            "web.shop.svc.clusterset.local",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let target = SocketAddr::new(vip, 8080);
    wait_listening(target).await;
    let apply = |yaml: String| {
        let file = tmp.path().join(format!("p-{}.yaml", rand::random::<u32>()));
        std::fs::write(&file, yaml).unwrap();
        file
    };
    let doc = |kind: &str, name: &str, spec: &str| {
        format!("---\napiVersion: causeway.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}, namespace: shop}}\nspec: {spec}\n")
    };
    let f = apply(
        doc("FailoverPolicy", "order", "{service: web, mode: ordered, sites: [east, west]}")
            + &doc("TrafficSplit", "canary", "{service: web, weights: {east: 99, west: 1}}")
            + &doc("FaultInjection", "chaos", "{service: web, abort: {percent: 10, status: 503}}")
            + &doc("RetryPolicy", "retry", "{service: web, attempts: 2, on: [connect-failure, reset, 5xx], budget: {ratio: 0.5, minPerSecond: 100}}"),
    );
    fed.ctl(&["policy", "apply", "-f", f.to_str().unwrap()])
        .await
        .unwrap();

    tracing::info!("phase: 20,000 requests: a 1% split and 10% injected aborts");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = HttpClient::connect(target).await;
        let mut seen_fault = false;
        for _ in 0..100 {
            seen_fault |= c.get("/").await.1 == "fault-injected";
        }
        if seen_fault {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the policies never reached the gateway"
        );
    }
    let n = 20_000;
    let mut workers = Vec::new();
    for _ in 0..8 {
        workers.push(tokio::spawn(async move {
            let mut c = HttpClient::connect(target).await;
            let (mut east, mut west, mut aborted, mut other) = (0, 0, 0, Vec::new());
            for _ in 0..n / 8 {
                match c.get("/").await {
                    (200, _, b) if b == "east" => east += 1,
                    (200, _, b) if b == "west" => west += 1,
                    (503, e, _) if e == "fault-injected" => aborted += 1,
                    x => other.push(x),
                }
            }
            (east, west, aborted, other)
        }));
    }
    let (mut east, mut west, mut aborted) = (0, 0, 0);
    for w in workers {
        let (e, wv, a, other) = w.await.unwrap();
        assert!(other.is_empty(), "unexpected answers: {other:?}");
        east += e;
        west += wv;
        aborted += a;
    }
    let abort_pct = aborted as f64 * 100.0 / n as f64;
    let west_pct = west as f64 * 100.0 / (east + west) as f64;
    tracing::info!(east, west, aborted, abort_pct, west_pct, "split and faults");
    assert!(
        (9.0..=11.0).contains(&abort_pct),
        "aborts {abort_pct:.2}% of {n}"
    );
    assert!(
        (0.7..=1.3).contains(&west_pct),
        "west got {west_pct:.2}% ({west} of {})",
        east + west
    );

    tracing::info!("phase: a circuit breaker sheds load beyond its limit, then recovers");
    fed.ctl(&["policy", "delete", "FaultInjection", "shop/chaos"])
        .await
        .unwrap();
    fed.ctl(&["policy", "delete", "TrafficSplit", "shop/canary"])
        .await
        .unwrap();
    let f = apply(doc(
        "CircuitBreaker",
        "cb",
        "{service: web, maxRequests: 2}",
    ));
    fed.ctl(&["policy", "apply", "-f", f.to_str().unwrap()])
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let burst: Vec<_> = (0..12)
            .map(|_| {
                tokio::spawn(async move { HttpClient::connect(target).await.get("/slow").await })
            })
            .collect();
        let mut shed = 0;
        let mut ok = 0;
        for b in burst {
            match b.await.unwrap() {
                (200, _, _) => ok += 1,
                (503, e, _) if e == "circuit-open" => shed += 1,
                x => panic!("unexpected {x:?}"),
            }
        }
        if shed > 0 {
            assert!(ok >= 2, "the breaker let through only {ok}");
            break;
        }
        assert!(Instant::now() < deadline, "the breaker never opened");
    }
    let mut c = HttpClient::connect(target).await;
    for _ in 0..5 {
        assert_eq!(c.get("/slow").await.0, 200, "recovered after the burst");
    }
    fed.ctl(&["policy", "delete", "CircuitBreaker", "shop/cb"])
        .await
        .unwrap();

    tracing::info!("phase: under steady load east's endpoints stop: no request fails");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let mut c = HttpClient::connect(target).await;
            let (mut ok, mut bad, mut west_seen) = (0, Vec::new(), 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match c.get("/").await {
                    (200, _, b) => {
                        ok += 1;
                        if b == "west" {
                            west_seen += 1;
                        }
                    }
                    x => bad.push(x),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (ok, bad, west_seen)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    east_task.abort();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        let (ok, bad, west_seen) = l.await.unwrap();
        assert!(
            bad.is_empty(),
            "failed requests while east went down: {bad:?}"
        );
        assert!(ok > 50 && west_seen > 0, "ok {ok}, west {west_seen}");
    }
    let m = http_get(fed.sites["central"].gateway_admin, "/metrics").await;
    assert!(
        m.contains("causeway_http_requests_total{service=\"shop/web\",code=\"200\"}"),
        "no HTTP metrics"
    );
    assert!(
        m.contains("causeway_http_request_duration_seconds"),
        "no latency histogram"
    );
    fed.shutdown().await;
}

/// Waits until `site` resolves `name` and its gateway listens for it on
/// `port`; returns that address.
async fn imported(fed: &LocalFederation, site: &str, name: &str, port: u16) -> SocketAddr {
    let vip = fed
        .wait_resolvable(site, name, Duration::from_secs(30))
        .await
        .unwrap();
    let target = SocketAddr::new(vip, port);
    wait_listening(target).await;
    target
}

/// Writes `yaml` to a file under `dir` and applies it with `ctl policy apply`.
async fn apply_policies(fed: &LocalFederation, dir: &std::path::Path, yaml: &str) {
    let file = dir.join(format!("p-{}.yaml", rand::random::<u32>()));
    std::fs::write(&file, yaml).unwrap();
    fed.ctl(&["policy", "apply", "-f", file.to_str().unwrap()])
        .await
        .unwrap();
}

/// An HTTP/2-only (prior knowledge, no TLS) backend, as gRPC servers are:
/// it answers `<name> <version of the request>` and counts requests.
async fn h2_backend(
    name: &'static str,
) -> (
    SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
    tokio::task::JoinHandle<()>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = l.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = count.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let body = format!("{name} {:?} {}", req.version(), req.uri().path());
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from(body)),
                            ))
                        }
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
            });
        }
    });
    (at, count, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_services_reach_http2_endpoints_and_health_is_reported_per_zone() {
    use http_body_util::BodyExt;
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (east_addr, east_count, _e) = h2_backend("east").await;
    let (west_addr, west_count, _w) = h2_backend("west").await;
    fed.add_site("east", &vip_range(), &[]).await.unwrap();
    fed.add_site("west", &vip_range(), &[]).await.unwrap();
    fed.add_site("central", &vip_range(), &[]).await.unwrap();
    let export = |a: SocketAddr| {
        format!("\n[[exports]]\nservice = \"shop/grpc\"\nport = 9090\nprotocol = \"http2\"\nendpoints = [\"{a}\"]\n")
    };
    // East's endpoints are in two zones; the one in zone-b is down.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    add_exports_and_restart(
        &mut fed,
        "east",
        &format!("\n[[exports]]\nservice = \"shop/grpc\"\nport = 9090\nprotocol = \"http2\"\nendpoints = [\"{east_addr}\", \"{dead}\"]\nzones = {{ \"{east_addr}\" = \"zone-a\", \"{dead}\" = \"zone-b\" }}\n"),
    )
    .await;
    add_exports_and_restart(&mut fed, "west", &export(west_addr)).await;
    let target = imported(&fed, "central", "grpc.shop.svc.clusterset.local", 9090).await;
    apply_policies(
        &fed,
        tmp.path(),
        "apiVersion: causeway.dev/v1alpha1\nkind: TrafficSplit\nmetadata: {name: half, namespace: shop}\nspec: {service: grpc, weights: {east: 50, west: 50}}\n",
    )
    .await;

    // One HTTP/2 connection from the caller: its requests still spread over
    // both sites, and each reaches an endpoint as HTTP/2.
    let tcp = tokio::net::TcpStream::connect(target).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut east, mut west) = (0, 0);
    while east < 20 || west < 20 {
        assert!(
            Instant::now() < deadline,
            "one HTTP/2 connection did not spread: east {east}, west {west}"
        );
        let req = hyper::Request::builder()
            .uri("http://grpc.shop.svc.clusterset.local:9090/pkg.Svc/Call")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        match body.as_str() {
            "east HTTP/2.0 /pkg.Svc/Call" => east += 1,
            "west HTTP/2.0 /pkg.Svc/Call" => west += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    // An HTTP/1.1 caller is translated to HTTP/2 towards the endpoints.
    let mut c = HttpClient::connect(target).await;
    let (code, err, body) = c.get("/plain").await;
    assert_eq!((code, err.as_str()), (200, ""), "{body}");
    assert!(
        body == "east HTTP/2.0 /plain" || body == "west HTTP/2.0 /plain",
        "{body}"
    );
    let served = east_count.load(std::sync::atomic::Ordering::Relaxed)
        + west_count.load(std::sync::atomic::Ordering::Relaxed);
    assert!(served >= 41, "the endpoints saw {served} requests");

    // Health per zone reaches the catalog, `ctl services` and `ctl explain`.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = fed.ctl(&["--output", "json", "services"]).await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let east = v["services"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["service"] == "shop/grpc")
            .flat_map(|s| s["exporters"].as_array().unwrap().clone())
            .find(|e| e["site"] == "east");
        let zones = east.as_ref().map(|e| e["zones"].clone());
        let want = serde_json::json!([
            {"zone": "zone-a", "healthy": 1, "total": 1},
            {"zone": "zone-b", "healthy": 0, "total": 1}
        ]);
        if zones.as_ref() == Some(&want) {
            assert_eq!(east.unwrap()["total_endpoints"], 2);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "east's zones never showed: {zones:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = fed.ctl(&["services"]).await.unwrap();
    assert!(text.contains("east(1: zone-a 1/1, zone-b 0/1)"), "{text}");
    let explain = fed
        .ctl(&["explain", "shop/grpc", "--from", "central"])
        .await
        .unwrap();
    assert!(
        explain.contains("healthy 1/2") && explain.contains("zones [zone-a 1/1, zone-b 0/1]"),
        "{explain}"
    );
    fed.shutdown().await;
}

/// What one request of the steady load got: the site that answered, or why
/// it failed.
#[derive(Debug, Clone, PartialEq)]
enum Got {
    Site(String),
    Failed(u16, String, String),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_sends_traffic_to_the_next_site_and_its_return_brings_it_back_without_flapping(
) {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (east_addr, _e) = http_backend("127.0.0.1:0", "east").await;
    let (west_addr, _w) = http_backend("127.0.0.1:0", "west").await;
    for site in ["east", "west", "central"] {
        fed.add_site(site, &vip_range(), &[]).await.unwrap();
    }
    add_exports_and_restart(&mut fed, "east", &web_http_export(east_addr)).await;
    add_exports_and_restart(&mut fed, "west", &web_http_export(west_addr)).await;
    let target = imported(&fed, "central", "web.shop.svc.clusterset.local", 8080).await;
    apply_policies(
        &fed,
        tmp.path(),
        "apiVersion: causeway.dev/v1alpha1\nkind: FailoverPolicy\nmetadata: {name: order, namespace: shop}\nspec: {service: web, mode: ordered, sites: [east, west]}\n---\napiVersion: causeway.dev/v1alpha1\nkind: RetryPolicy\nmetadata: {name: retry, namespace: shop}\nspec: {service: web, attempts: 2, on: [connect-failure, reset, gateway-error], budget: {ratio: 0.5, minPerSecond: 50}}\n",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = HttpClient::connect(target).await;
        let mut all_east = true;
        for _ in 0..20 {
            all_east &= c.get("/").await.2 == "east";
        }
        if all_east {
            break;
        }
        assert!(Instant::now() < deadline, "traffic never settled on east");
    }

    // Steady load: 4 keep-alive clients, a request every ~5 ms each.
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(Instant, Got)>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (log, stop) = (log.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut c = HttpClient::connect(target).await;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let got = match c.get("/").await {
                    (200, _, body) => Got::Site(body),
                    (code, err, body) => Got::Failed(code, err, body),
                };
                log.lock().unwrap().push((Instant::now(), got));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let since = |t: Instant| -> Vec<Got> {
        log.lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| *at >= t)
            .map(|(_, g)| g.clone())
            .collect()
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    tracing::info!("phase: east's gateway is killed under load");
    let killed = Instant::now();
    fed.sites.get_mut("east").unwrap().gateway.kill().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after_kill = since(killed);
    let failed: Vec<&Got> = after_kill
        .iter()
        .filter(|g| matches!(g, Got::Failed(..)))
        .collect();
    // At most the requests in flight at the kill (one per client) may fail.
    assert!(
        failed.len() <= 4,
        "{} failed after the kill: {failed:?}",
        failed.len()
    );
    let settled = since(killed + Duration::from_secs(2));
    assert!(settled.len() > 100, "only {} requests", settled.len());
    assert!(
        settled.iter().all(|g| *g == Got::Site("west".into())),
        "not all traffic moved to west: {:?}",
        settled
            .iter()
            .filter(|g| **g != Got::Site("west".into()))
            .take(5)
            .collect::<Vec<_>>()
    );

    tracing::info!("phase: east's gateway comes back; traffic returns to it");
    let restored = Instant::now();
    let bin = fed.bin.clone();
    fed.sites
        .get_mut("east")
        .unwrap()
        .gateway
        .start(&bin)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(45);
    let back = loop {
        let at = log
            .lock()
            .unwrap()
            .iter()
            .find(|(at, g)| *at >= restored && *g == Got::Site("east".into()))
            .map(|(at, _)| *at);
        if let Some(at) = at {
            break at;
        }
        assert!(Instant::now() < deadline, "traffic never returned to east");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let during_restore = since(restored);
    let failed: Vec<&Got> = during_restore
        .iter()
        .filter(|g| matches!(g, Got::Failed(..)))
        .collect();
    assert!(failed.is_empty(), "failed while east came back: {failed:?}");
    // No flapping: once east answers again, it keeps the traffic.
    let after_back = since(back + Duration::from_secs(2));
    assert!(after_back.len() > 100, "only {} requests", after_back.len());
    let strays = after_back
        .iter()
        .filter(|g| **g != Got::Site("east".into()))
        .count();
    assert_eq!(
        strays,
        0,
        "traffic went back and forth after east returned ({} of {})",
        strays,
        after_back.len()
    );
    tracing::info!(
        back_after_ms = (back - restored).as_millis() as u64,
        "east took the traffic back"
    );
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
    let deadline = Instant::now() + Duration::from_secs(20);
    let ready = loop {
        let r = http_get_any(admin, "/ready").await;
        if r.starts_with("HTTP/1.1 503") {
            break r;
        }
        assert!(Instant::now() < deadline, "still ready: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        ready.contains(&next.to_string()) && ready.contains("shop/second"),
        "{ready}"
    );

    // Once the address is free the gateway binds it on its own.
    drop(squatter);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = http_get_any(admin, "/ready").await;
        if r.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // East's gateway restarted for the new export: west may still be
    // waiting out the redial backoff of its tunnel to east.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match call_banner(next, "hi").await {
            Ok(b) => {
                assert_eq!(b, "second");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no call got through: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = http_get(west_admin, "/metrics").await;
        if m.contains("causeway_peer_unreachable{site=\"east\"} 1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "west never saw east's tunnel down"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(east_admin).await {
            let _ = s.write_all(b"GET /ready HTTP/1.1\r\nhost: x\r\n\r\n").await;
            let mut out = String::new();
            let _ = s.read_to_string(&mut out).await;
            if out.starts_with("HTTP/1.1 200") {
                break;
            }
        }
        assert!(Instant::now() < deadline, "east never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
