//! `bench/run http`: per-request HTTP through causeway's gateways side by
//! side with Envoy set up the same way, then the failover events for both.
//!
//! Both systems carry `shop/web`, served by a backend in site east
//! (preferred) and one in site west (next), and enforce the same policy:
//! ordered failover east then west, 2 attempts on connect failure, reset,
//! 5xx and gateway errors, a 250 ms per-try timeout inside a 5 s request
//! timeout, and outlier detection ejecting after 3 consecutive failures
//! for 3 s.
//!
//! - causeway: the client calls site central's gateway (VIP), which
//!   forwards each request over QUIC (mutual TLS) to east's or west's
//!   gateway, which calls the backend.
//! - envoy: the client calls a caller-side Envoy (HTTP connection manager;
//!   route retry policy with `previous_priorities`, so a retry goes to the
//!   next site as causeway's does; outlier detection), whose cluster holds
//!   east's Envoy at priority 0 and west's at priority 1, reached over
//!   HTTP/2 with mutual TLS; each site's Envoy calls its backend. Every
//!   Envoy runs one worker (`--concurrency 1`), like causeway's gateways
//!   (`worker_threads = 1`).
//!
//! Cases: `h1-1000rps` and `h2-1000rps` (p50/p99 from each request's
//! scheduled time; HTTP/1.1 on 16 connections, HTTP/2 on 4 connections with
//! 4 requests each in flight at most), `h1-max` and `h2-max` (16 closed
//! loops; requests per second and CPU per 1k requests), interleaved in
//! rounds; then the failover events (see `failover.rs`) through each.

use std::io::{BufRead, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use causeway::local::{free_port, LocalFederation};
use http_body_util::{BodyExt, Empty};
use tokio::process::Child;

use crate::failover::{self, Backend, Preferred};
use crate::report::{percentile, Report};
use crate::tunnel::{cpu_ticks, envoy_binary, envoy_tls, join_threads, Pace, System};

pub struct Params {
    rate_secs: f64,
    max_secs: f64,
    rounds: usize,
    failover: failover::Params,
}

impl Params {
    pub fn new(quick: bool) -> Self {
        Self {
            rate_secs: if quick { 4.0 } else { 15.0 },
            max_secs: if quick { 3.0 } else { 10.0 },
            rounds: if quick { 2 } else { 3 },
            failover: failover::Params::new(quick),
        }
    }
}

/// Wrong answers (not 200 from east) and failed requests per entry.
static WRONG: std::sync::LazyLock<std::sync::Mutex<std::collections::BTreeMap<SocketAddr, u64>>> =
    std::sync::LazyLock::new(Default::default);

fn wrong(entry: SocketAddr) {
    *WRONG
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(entry)
        .or_default() += 1;
}

fn wrong_count(entry: SocketAddr) -> u64 {
    WRONG
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&entry)
        .copied()
        .unwrap_or(0)
}

/// One HTTP/1.1 GET on a blocking connection; the body if the answer was
/// 200.
fn h1_get(r: &mut std::io::BufReader<std::net::TcpStream>) -> std::io::Result<Option<String>> {
    h1_request(r, b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")
}

/// Sends `request` (a whole HTTP/1.1 request without a body) on a blocking
/// connection; the body of the answer if it was 200.
pub(crate) fn h1_request(
    r: &mut std::io::BufReader<std::net::TcpStream>,
    request: &[u8],
) -> std::io::Result<Option<String>> {
    r.get_mut().write_all(request)?;
    let mut line = String::new();
    r.read_line(&mut line)?;
    let ok = line.split_whitespace().nth(1) == Some("200");
    let mut len = 0usize;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(ok.then(|| String::from_utf8_lossy(&body).into_owned()))
}

pub(crate) fn h1_connect(
    entry: SocketAddr,
) -> std::io::Result<std::io::BufReader<std::net::TcpStream>> {
    let s = std::net::TcpStream::connect(entry)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(std::io::BufReader::new(s))
}

/// HTTP/1.1 at `rate` requests a second over `conns` connections (one OS
/// thread each, sleeping until each request's time); latencies in µs from
/// the scheduled time. Answers other than 200 from east count as wrong.
async fn h1_fixed(
    entry: SocketAddr,
    conns: usize,
    rate: f64,
    secs: f64,
) -> anyhow::Result<Vec<f64>> {
    let samples = h1_samples(
        entry,
        conns,
        rate,
        secs,
        b"GET / HTTP/1.1\r\nhost: web\r\n\r\n",
    )
    .await?;
    Ok(samples
        .into_iter()
        .map(|(_, us, body)| {
            if body.as_deref() != Some("east") {
                wrong(entry);
            }
            us
        })
        .collect())
}

/// One request's outcome at a fixed rate: when it was due (s from the
/// start), its latency from then (µs), and the body of a 200 (`None`:
/// another status, or the connection failed).
pub(crate) type Sample = (f64, f64, Option<String>);

/// `request` (a whole HTTP/1.1 request without a body) at `rate` a second
/// over `conns` connections, one OS thread each, for `secs`; every
/// request's outcome.
pub(crate) async fn h1_samples(
    entry: SocketAddr,
    conns: usize,
    rate: f64,
    secs: f64,
    request: &'static [u8],
) -> anyhow::Result<Vec<Sample>> {
    let period = Duration::from_secs_f64(conns as f64 / rate);
    let ready = Arc::new(std::sync::Barrier::new(conns));
    let start_at = Arc::new(std::sync::OnceLock::new());
    let threads: Vec<_> = (0..conns)
        .map(|c| {
            let (ready, start_at) = (ready.clone(), start_at.clone());
            std::thread::spawn(move || {
                // Open and warm every connection before the schedule.
                let opened =
                    h1_connect(entry).and_then(|mut r| h1_request(&mut r, request).map(|_| r));
                ready.wait();
                let mut r = opened?;
                let start: Instant =
                    *start_at.get_or_init(|| Instant::now() + Duration::from_millis(100));
                let end = start + Duration::from_secs_f64(secs);
                let mut out = Vec::new();
                for (_, at) in Pace::new(start, end, period, c, conns) {
                    let body = match h1_request(&mut r, request) {
                        Ok(b) => b,
                        Err(_) => {
                            r = h1_connect(entry)?;
                            None
                        }
                    };
                    let due = at.duration_since(start).as_secs_f64();
                    out.push((due, at.elapsed().as_secs_f64() * 1e6, body));
                }
                Ok::<_, anyhow::Error>(out)
            })
        })
        .collect();
    join_threads(threads).await
}

/// An HTTP/2 connection (prior knowledge) to `entry`.
async fn h2_connect(
    entry: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http2::SendRequest<Empty<Bytes>>> {
    let tcp = tokio::net::TcpStream::connect(entry).await?;
    tcp.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await?;
    tokio::spawn(conn);
    Ok(send)
}

/// One HTTP/2 GET; whether east answered 200.
async fn h2_get(send: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>) -> bool {
    let req = hyper::Request::get("http://web/")
        .body(Empty::new())
        .expect("a valid request");
    let Ok(resp) = send.send_request(req).await else {
        return false;
    };
    let ok = resp.status() == 200;
    match resp.into_body().collect().await {
        Ok(b) => ok && b.to_bytes().as_ref() == b"east",
        Err(_) => false,
    }
}

/// HTTP/2 at `rate` over 4 connections, 16 OS threads (4 per connection)
/// each sleeping until its requests' times; latencies in µs.
async fn h2_fixed(entry: SocketAddr, rate: f64, secs: f64) -> anyhow::Result<Vec<f64>> {
    let senders = {
        let mut v = Vec::new();
        for _ in 0..4 {
            let mut s = h2_connect(entry).await?;
            if !h2_get(&mut s).await {
                wrong(entry);
            }
            v.push(s);
        }
        v
    };
    let handle = tokio::runtime::Handle::current();
    let threads = 16;
    let period = Duration::from_secs_f64(threads as f64 / rate);
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..threads)
        .map(|c| {
            let mut send = senders[c % senders.len()].clone();
            let handle = handle.clone();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                for (_, at) in Pace::new(start, end, period, c, threads) {
                    if !handle.block_on(h2_get(&mut send)) {
                        wrong(entry);
                    }
                    out.push(at.elapsed().as_secs_f64() * 1e6);
                }
                Ok::<_, anyhow::Error>(out)
            })
        })
        .collect();
    join_threads(handles).await
}

/// 16 closed loops for `secs`: HTTP/1.1 on a connection each, or HTTP/2
/// over 4 connections; requests per second.
async fn max(entry: SocketAddr, h2: bool, secs: f64) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    if h2 {
        for _ in 0..4 {
            senders.push(h2_connect(entry).await?);
        }
    }
    let mut tasks = Vec::new();
    for c in 0..16 {
        let (stop, done) = (stop.clone(), done.clone());
        if h2 {
            let mut send = senders[c % 4].clone();
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if h2_get(&mut send).await {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        wrong(entry);
                    }
                }
            }));
        } else {
            tasks.push(tokio::task::spawn_blocking(move || {
                let Ok(mut r) = h1_connect(entry) else {
                    wrong(entry);
                    return;
                };
                while !stop.load(Ordering::Relaxed) {
                    match h1_get(&mut r) {
                        Ok(Some(b)) if b == "east" => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => wrong(entry),
                        Err(_) => {
                            wrong(entry);
                            match h1_connect(entry) {
                                Ok(n) => r = n,
                                Err(_) => return,
                            }
                        }
                    }
                }
            }));
        }
    }
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    Ok(n)
}

/// The Envoy at a site: mutual TLS in (a client certificate required),
/// HTTP/1.1 or 2, every request to the local `backend`.
fn envoy_site_config(listen: u16, backend: SocketAddr, certs: &Path) -> String {
    format!(
        r#"static_resources:
  listeners:
  - name: in
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - transport_socket: {tls}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: in
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: "/"}}, route: {{cluster: local, timeout: 5s}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: local
    connect_timeout: 1s
    type: STATIC
    circuit_breakers: {{thresholds: [{{max_connections: 1000000, max_pending_requests: 1000000, max_requests: 1000000}}]}}
    load_assignment:
      cluster_name: local
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {port}}}}}}}}}]}}]
"#,
        tls = envoy_tls(certs, false, "h2, http/1.1"),
        ip = backend.ip(),
        port = backend.port(),
    )
}

/// The caller's Envoy: HTTP/1.1 or 2 in, the policy of the module docs,
/// the sites' Envoys over HTTP/2 with mutual TLS (east priority 0, west 1).
fn envoy_caller_config(listen: u16, east: u16, west: u16, certs: &Path) -> String {
    format!(
        r#"static_resources:
  listeners:
  - name: in
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: in
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: web
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route:
                  cluster: web
                  timeout: 5s
                  retry_policy:
                    retry_on: "5xx,connect-failure,reset,gateway-error"
                    num_retries: 1
                    per_try_timeout: 0.25s
                    retry_host_predicate:
                    - name: envoy.retry_host_predicates.previous_hosts
                      typed_config: {{"@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}}
                    retry_priority:
                      name: envoy.retry_priorities.previous_priorities
                      typed_config:
                        "@type": type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig
                        update_frequency: 1
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: web
    connect_timeout: 1s
    type: STATIC
    circuit_breakers: {{thresholds: [{{max_connections: 1000000, max_pending_requests: 1000000, max_requests: 1000000, max_retries: 1000000}}]}}
    outlier_detection: {{consecutive_5xx: 3, base_ejection_time: 3s, interval: 1s, max_ejection_percent: 100}}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: web
      endpoints:
      - priority: 0
        lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {east}}}}}}}}}]
      - priority: 1
        lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {west}}}}}}}}}]
    transport_socket: {tls}
"#,
        tls = envoy_tls(certs, true, "h2"),
    )
}

/// Starts Envoy with `config` (one worker, no hot restart), its config and
/// log in `root` under `name`.
pub(crate) fn start_envoy(
    envoy: &str,
    root: &Path,
    name: &str,
    config: &str,
) -> anyhow::Result<Child> {
    let path = root.join(format!("{name}.yaml"));
    std::fs::write(&path, config)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join(format!("{name}.log")))?;
    tokio::process::Command::new(envoy)
        .arg("-c")
        .arg(&path)
        .args([
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ])
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name}"))
}

pub async fn run(report: &mut Report, root: &Path, p: &Params) -> anyhow::Result<()> {
    let certs = root.join("certs");
    crate::pki::write(&certs)?;
    let east_addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let west_addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let mut east = Backend {
        addr: east_addr,
        task: causeway::local::http_backend(east_addr, "east").await?.1,
    };
    let _west = causeway::local::http_backend(west_addr, "west").await?;

    // causeway: one controller (not on the request path), three sites,
    // gateways on one thread.
    let bin = std::env::current_exe()?.with_file_name("causeway");
    let mut fed = LocalFederation::new(bin.clone(), root.join("causeway"))?;
    fed.start_controllers(1)?;
    fed.wait_for_leader(Duration::from_secs(30)).await?;
    fed.gateway_base = LocalFederation::gateway_config_with("worker_threads = 1\n")?;
    let target = failover::causeway_setup(&mut fed, &bin, root, east_addr, west_addr).await?;
    let causeway = System {
        name: "causeway",
        entry: target,
        pids: ["central", "east"]
            .iter()
            .filter_map(|s| fed.sites[*s].gateway.pid())
            .collect(),
    };

    // Envoy: the caller's and one per site.
    let envoy = envoy_binary()?;
    let edir = root.join("envoy");
    std::fs::create_dir_all(&edir)?;
    let (pa, pe, pw) = (free_port()?, free_port()?, free_port()?);
    let east_cfg = envoy_site_config(pe, east_addr, &certs);
    let east_envoy = start_envoy(&envoy, &edir, "envoy-east", &east_cfg)?;
    let west_envoy = start_envoy(
        &envoy,
        &edir,
        "envoy-west",
        &envoy_site_config(pw, west_addr, &certs),
    )?;
    let caller = start_envoy(
        &envoy,
        &edir,
        "envoy-caller",
        &envoy_caller_config(pa, pe, pw, &certs),
    )?;
    let entry: SocketAddr = format!("127.0.0.1:{pa}").parse()?;
    failover::wait_answer(entry, "east")
        .await
        .context("the Envoy path")?;
    let envoy_sys = System {
        name: "envoy",
        entry,
        pids: [caller.id(), east_envoy.id()]
            .into_iter()
            .flatten()
            .collect(),
    };
    let systems = [causeway, envoy_sys];

    println!(
        "h1/h2 1000 rps for {} s and max for {} s each, in {} interleaved rounds",
        p.rate_secs, p.max_secs, p.rounds
    );
    let n = systems.len();
    let mut lat = [vec![Vec::new(); n], vec![Vec::new(); n]];
    // (requests, seconds, CPU ticks) per protocol and system.
    let mut sat = [vec![(0.0, 0.0, 0u64); n], vec![(0.0, 0.0, 0u64); n]];
    let per = |x: f64| (x / p.rounds as f64).max(1.0);
    for _ in 0..p.rounds {
        for (i, s) in systems.iter().enumerate() {
            lat[0][i].extend(h1_fixed(s.entry, 16, 1000.0, per(p.rate_secs)).await?);
            lat[1][i].extend(h2_fixed(s.entry, 1000.0, per(p.rate_secs)).await?);
            for (proto, h2) in [(0, false), (1, true)] {
                let before = cpu_ticks(&s.pids);
                let t = Instant::now();
                let rps = max(s.entry, h2, per(p.max_secs)).await?;
                let secs = t.elapsed().as_secs_f64();
                sat[proto][i].0 += rps * secs;
                sat[proto][i].1 += secs;
                sat[proto][i].2 += cpu_ticks(&s.pids) - before;
            }
        }
    }
    for (proto, name) in ["h1", "h2"].into_iter().enumerate() {
        for (i, s) in systems.iter().enumerate() {
            let case = format!("{name}-1000rps");
            for (metric, q) in [("p50_us", 50.0), ("p90_us", 90.0), ("p99_us", 99.0)] {
                report.add(&case, s.name, metric, percentile(&mut lat[proto][i], q));
            }
            let (reqs, secs, ticks) = sat[proto][i];
            let case = format!("{name}-max");
            report.add(&case, s.name, "rps", reqs / secs);
            report.add(
                &case,
                s.name,
                "cpu_ms_per_1k",
                ticks as f64 * 10.0 / (reqs / 1000.0),
            );
        }
    }
    let mut wrong_total = 0;
    for s in &systems {
        let w = wrong_count(s.entry);
        wrong_total += w;
        report.add("answers", s.name, "wrong_or_failed", w as f64);
    }

    // The failover events, one system after the other (they share the
    // backends).
    let mut preferred = Preferred::Causeway {
        fed: &mut fed,
        bin: bin.clone(),
    };
    failover::events(
        report,
        "causeway",
        target,
        &mut east,
        &mut preferred,
        &p.failover,
    )
    .await?;
    drop(preferred);
    failover::wait_answer(entry, "east").await?;
    let (envoy_bin, edir2) = (envoy.clone(), edir.clone());
    let mut preferred = Preferred::Process {
        child: Some(east_envoy),
        start: Box::new(move || start_envoy(&envoy_bin, &edir2, "envoy-east", &east_cfg)),
    };
    failover::events(
        report,
        "envoy",
        entry,
        &mut east,
        &mut preferred,
        &p.failover,
    )
    .await?;

    drop(preferred);
    let get = |case: &str, sys: &str, m: &str| report.get(case, sys, m).unwrap_or(f64::NAN);
    let mut checks: Vec<(String, f64, &str)> = vec![(
        "wrong or failed answers (both systems)".into(),
        wrong_total as f64,
        "<= 0",
    )];
    for proto in ["h1", "h2"] {
        let r = |case: String, m: &str| get(&case, "causeway", m) / get(&case, "envoy", m);
        checks.push((
            format!("{proto} p99 causeway/envoy"),
            r(format!("{proto}-1000rps"), "p99_us"),
            "<= 0.8",
        ));
        checks.push((
            format!("{proto} rps causeway/envoy"),
            r(format!("{proto}-max"), "rps"),
            ">= 1.0",
        ));
        checks.push((
            format!("{proto} cpu per 1k causeway/envoy"),
            r(format!("{proto}-max"), "cpu_ms_per_1k"),
            "<= 1.0",
        ));
    }
    for case in ["endpoints-down", "gateway-down", "restore"] {
        let d = |m: &str| get(case, "causeway", m) - get(case, "envoy", m);
        checks.push((
            format!("{case} failed causeway-envoy"),
            d("failed_count"),
            "<= 0",
        ));
        // Shift is only as fine as the load's request spacing: compare
        // in whole request intervals (a shift inside the first interval is
        // 0 for both).
        let spacing = 1e3 / f64::from(p.failover.rate);
        let steps = |sys: &str| (get(case, sys, "shift_ms") / spacing).floor();
        checks.push((
            format!("{case} shift causeway-envoy (in {spacing} ms request intervals)"),
            steps("causeway") - steps("envoy"),
            "<= 0",
        ));
    }
    for (name, value, goal) in checks {
        report.check(&name, value, goal);
    }
    east.task.abort();
    fed.shutdown().await;
    drop(west_envoy);
    Ok(())
}
