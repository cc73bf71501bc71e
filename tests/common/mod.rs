//! What the end-to-end tests share: a federation on loopback, sites that
//! export an echo service, probes (DNS, echo, HTTP, metrics) and test
//! back-ends. Each topic's test crate (`tests/<topic>.rs`) uses the part it
//! needs, so the rest is unused there.
#![allow(dead_code, unused_imports)]

pub use std::net::{IpAddr, SocketAddr};
pub use std::path::PathBuf;
pub use std::time::{Duration, Instant};

pub use causeway::local::wait::{equals, eventually, until};
pub use causeway::local::{call_banner, echo_server, free_port, Export, LocalFederation};
pub use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub mod jwt;
pub mod l7;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_causeway"))
}

/// Site east exports `shop/echo` port 7000 served at `echo`; site west
/// imports it. The setup most end-to-end tests share.
pub async fn add_echo_sites(fed: &mut LocalFederation, echo: SocketAddr) {
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
pub async fn echo_sites_ready(fed: &mut LocalFederation) -> (IpAddr, tokio::task::JoinHandle<()>) {
    let (echo, task) = echo_server(None).await.unwrap();
    add_echo_sites(fed, echo).await;
    let vip = echo_vip(fed, "west").await;
    wait_tunnel(SocketAddr::new(vip, 7000)).await;
    (vip, task)
}

/// A VIP range unlikely to collide with other tests running at once.
pub fn vip_range() -> String {
    // 51 200 /24 ranges: tests running at once rarely draw the same one
    // (a /16 per site made that likely with a dozen sites up at a time).
    format!(
        "127.{}.{}.0/24",
        20 + rand::random::<u8>() % 200,
        rand::random::<u8>()
    )
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("info")
        .try_init();
}

/// Three controllers in `tmp`, once they have a leader.
pub async fn federation(tmp: &tempfile::TempDir) -> LocalFederation {
    controllers(tmp, 3, &[]).await.0
}

/// A local federation in `tmp` with nothing started yet.
pub fn new_federation(tmp: &tempfile::TempDir) -> LocalFederation {
    let _ = rustls::crypto::ring::default_provider().install_default();
    LocalFederation::new(bin(), tmp.path().to_path_buf()).unwrap()
}

/// `n` controllers in `tmp` started with the extra `flags`, once they have
/// a leader; the federation and the leader's id.
pub async fn controllers(
    tmp: &tempfile::TempDir,
    n: u64,
    flags: &[&str],
) -> (LocalFederation, u64) {
    let mut fed = new_federation(tmp);
    fed.controller_flags = flags.iter().map(|f| f.to_string()).collect();
    fed.start_controllers(n).unwrap();
    let leader = fed.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    (fed, leader)
}

/// Waits until `site`'s DNS resolves the shared test service
/// `echo.shop.svc.clusterset.local`; its VIP there.
pub async fn echo_vip(fed: &LocalFederation, site: &str) -> IpAddr {
    fed.wait_resolvable(
        site,
        "echo.shop.svc.clusterset.local",
        Duration::from_secs(30),
    )
    .await
    .unwrap()
}

pub async fn resolve_with_hickory(server: SocketAddr, name: &str) -> Vec<IpAddr> {
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

pub fn dig(server: SocketAddr, args: &[&str]) -> String {
    try_dig(server, args).unwrap_or_else(|e| panic!("{e}"))
}

/// `dig @server args`: its output, or why it failed (a timeout, a refused
/// port) — dig reports most failures on stdout.
pub fn try_dig(server: SocketAddr, args: &[&str]) -> Result<String, String> {
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
pub async fn echo_roundtrip(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    try_echo_roundtrip(addr, data).await.unwrap()
}

pub async fn try_echo_roundtrip(addr: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
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

pub async fn wait_tunnel(addr: SocketAddr) {
    eventually(
        Duration::from_secs(20),
        format_args!("the tunnel to {addr} to carry a probe"),
        async || {
            let probe =
                tokio::time::timeout(Duration::from_secs(5), try_echo_roundtrip(addr, b"probe"))
                    .await;
            matches!(&probe, Ok(Ok(v)) if v == b"probe")
        },
    )
    .await;
}

/// Joins a site from the test process (no gateway): returns its state with
/// the site's API credential.
pub async fn join_in_process(
    fed: &LocalFederation,
    name: &str,
) -> causeway_gateway::site::SiteState {
    let token = fed.create_token(name).await.unwrap();
    let dir = fed.root.join(format!("inproc-{name}"));
    let ca = causeway_gateway::site::SiteState::site_ca(&dir, None).unwrap();
    causeway_gateway::site::SiteState::join(&dir, &token, &ca, vec!["127.0.0.1:9".into()])
        .await
        .unwrap()
}

pub fn exports(n: usize) -> Vec<causeway_api::pb::Export> {
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

pub async fn publish(
    client: &causeway_api::client::ControllerClient,
    site: &str,
    n: usize,
) -> Result<u64, String> {
    publish_within(client, site, n, Duration::from_secs(10)).await
}

pub async fn publish_within(
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

/// The raw HTTP response of a GET, which must be a 200.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    let out = http_get_any(addr, path).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// `causeway ARGS`: exit code and stdout + stderr.
pub fn run_bin(args: &[&str]) -> (i32, String) {
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

pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_listening(addr: SocketAddr) {
    eventually(
        Duration::from_secs(20),
        format_args!("something to listen on {addr}"),
        async || tokio::net::TcpStream::connect(addr).await,
    )
    .await;
}

/// Adds the `[[exports]]` tables in `toml` to a site's gateway config and
/// restarts the gateway with it.
pub async fn add_exports_and_restart(fed: &mut LocalFederation, site: &str, toml: &str) {
    #[derive(serde::Deserialize)]
    struct More {
        exports: Vec<causeway_gateway::config::ExportConfig>,
    }
    let more: More = toml::from_str(toml).unwrap();
    fed.edit_gateway_config(site, |cfg| cfg.exports.extend(more.exports))
        .unwrap();
    fed.restart_gateway(site).await.unwrap();
}

/// The raw HTTP response of a GET, whatever its status.
pub async fn http_get_any(addr: SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

pub async fn list(fed: &LocalFederation) -> Vec<serde_json::Value> {
    let out = fed
        .ctl(&["--output", "json", "policy", "list"])
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["policies"].as_array().unwrap().clone()
}

/// East and west export `shop/echo` (answering with their names), central
/// imports it: the VIP target at central and both echo servers' tasks.
pub async fn banner_sites(
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

/// Gateway TOML exporting `shop/web` port 8080 as HTTP/1.1 at `endpoint`.
pub fn web_http_export(endpoint: SocketAddr) -> String {
    format!("\n[[exports]]\nservice = \"shop/web\"\nport = 8080\nprotocol = \"http\"\nendpoints = [\"{endpoint}\"]\n")
}

/// `causeway::local::http_backend` on `addr` (port 0 picks one).
pub async fn http_backend(
    addr: &str,
    name: &'static str,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    causeway::local::http_backend(addr.parse().unwrap(), name)
        .await
        .unwrap()
}

/// One keep-alive HTTP/1.1 client connection.
pub struct HttpClient {
    r: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl HttpClient {
    pub async fn connect(addr: SocketAddr) -> Self {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (r, w) = s.into_split();
        Self {
            r: tokio::io::BufReader::new(r),
            w,
        }
    }

    /// `(status, x-causeway-error header, body)`.
    pub async fn get(&mut self, path: &str) -> (u16, String, String) {
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

/// Waits until `site` resolves `name` and its gateway listens for it on
/// `port`; returns that address.
pub async fn imported(fed: &LocalFederation, site: &str, name: &str, port: u16) -> SocketAddr {
    let vip = fed
        .wait_resolvable(site, name, Duration::from_secs(30))
        .await
        .unwrap();
    let target = SocketAddr::new(vip, port);
    wait_listening(target).await;
    target
}

/// Writes `yaml` to a file under `dir` and applies it with `ctl policy apply`.
pub async fn apply_policies(fed: &LocalFederation, dir: &std::path::Path, yaml: &str) {
    let file = dir.join(format!("p-{}.yaml", rand::random::<u32>()));
    std::fs::write(&file, yaml).unwrap();
    fed.ctl(&["policy", "apply", "-f", file.to_str().unwrap()])
        .await
        .unwrap();
}

/// Waits until a banner call through `target` gets an answer; the banner.
pub async fn wait_call(target: SocketAddr) -> String {
    eventually(
        Duration::from_secs(20),
        format_args!("a call through {target} to get an answer"),
        async || call_banner(target, "x").await,
    )
    .await
}

/// Applies one policy document through `client` (the leader answers).
pub async fn apply_policy(
    client: &causeway_api::client::ControllerClient,
    doc: String,
) -> Result<causeway_api::pb::ApplyPoliciesResponse, tonic::Status> {
    client
        .call(true, |mut f| {
            let doc = doc.clone();
            async move {
                f.apply_policies(causeway_api::pb::ApplyPoliciesRequest {
                    documents_json: vec![doc],
                    ..Default::default()
                })
                .await
            }
        })
        .await
}

/// The policies of `kind`, read linearizably from the leader.
pub async fn policies_of_kind(
    client: &causeway_api::client::ControllerClient,
    kind: &str,
) -> Result<Vec<causeway_api::pb::Policy>, tonic::Status> {
    let kind = kind.to_string();
    client
        .call(true, |mut f| {
            let kind = kind.clone();
            async move {
                f.list_policies(causeway_api::pb::ListPoliciesRequest {
                    kind,
                    linearizable: true,
                })
                .await
            }
        })
        .await
        .map(|r| r.policies)
}

/// Opened inbound streams a gateway has counted.
pub async fn opened_in(admin: SocketAddr) -> f64 {
    let m = http_get(admin, "/metrics").await;
    metric(
        &m,
        "causeway_tunnel_streams_total{direction=\"in\",status=\"opened\"}",
    )
}
