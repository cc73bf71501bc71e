//! `bench/run dns`: causeway's mesh DNS side by side with Knot, NSD and
//! Unbound (local-data), all serving the same 10,000 names, each server
//! pinned to core 0 with the load on core 1.
//!
//! - `a-10k-names`: `qps` at saturation from `dnsperf`; `p50_us`/`p99_us`
//!   at a fixed offered rate from a driver here that times each query from
//!   its scheduled send (no coordinated omission).
//! - `mix-10k-names`: the same two measures for the query mix a pod's
//!   resolver sends: 60% A hits, 15% AAAA for the same names (no data: the
//!   VIPs are IPv4), 5% SRV for a named port, and 20% NXDOMAIN from the
//!   first search-path expansion (`s1.bench.bench.svc.clusterset.local`).
//!   Every answer the driver times is checked (rcode, answer or not); a
//!   wrong one fails the run's checks.
//! - `freshness`: a site publishes a new export at the controller (3 nodes,
//!   fsyncing); the time until causeway's DNS answers the new name, p99
//!   over the changes.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use causeway::local::{free_port, LocalFederation};
use causeway_api::catalog::CatalogView;
use causeway_api::client::ControllerClient;
use causeway_api::pb;
use tokio::process::{Child, Command};

use crate::controller::join;
use crate::report::{percentile, Report};

pub struct Params {
    /// Rounds over all systems (A B C D, A B C D, ...).
    rounds: usize,
    qps_secs: u32,
    latency_secs: f64,
    /// Offered rate of the latency case.
    latency_rate: u32,
    changes: usize,
}

impl Params {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                rounds: 1,
                qps_secs: 5,
                latency_secs: 2.0,
                latency_rate: 10_000,
                changes: 30,
            }
        } else {
            Self {
                rounds: 3,
                qps_secs: 10,
                latency_secs: 4.0,
                latency_rate: 10_000,
                changes: 100,
            }
        }
    }
}

const NAMES: usize = 10_000;
const PER_SITE: usize = 1_000;
const ZONE: &str = "clusterset.local";
const VIP_RANGE: &str = "127.10.0.0/16";
const CASE: &str = "a-10k-names";
const MIX: &str = "mix-10k-names";

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_SRV: u16 = 33;

/// What a right answer to a query looks like.
#[derive(Clone, Copy, PartialEq)]
enum Expect {
    /// NOERROR with at least one answer.
    Answer,
    /// NOERROR, no answer (the name exists, the type does not).
    NoData,
    /// NXDOMAIN.
    NxDomain,
}

/// One query of a mix.
#[derive(Clone)]
struct Q {
    name: String,
    qtype: u16,
    expect: Expect,
}

impl Q {
    fn a(name: String) -> Self {
        Self {
            name,
            qtype: TYPE_A,
            expect: Expect::Answer,
        }
    }

    /// The line dnsperf reads.
    fn line(&self) -> String {
        let t = match self.qtype {
            TYPE_AAAA => "AAAA",
            TYPE_SRV => "SRV",
            _ => "A",
        };
        format!("{} {t}\n", self.name)
    }

    fn right(&self, rcode: u8, answers: u16) -> bool {
        match self.expect {
            Expect::Answer => rcode == 0 && answers > 0,
            Expect::NoData => rcode == 0 && answers == 0,
            Expect::NxDomain => rcode == 3 && answers == 0,
        }
    }
}

/// The realistic mix over `names` (see the module docs), shuffled.
fn mix(names: &[String]) -> Vec<Q> {
    let mut out: Vec<Q> = names
        .iter()
        .enumerate()
        .map(|(i, n)| match i % 20 {
            0..12 => Q::a(n.clone()),
            12..15 => Q {
                name: n.clone(),
                qtype: TYPE_AAAA,
                expect: Expect::NoData,
            },
            15 => Q {
                name: format!("_http._tcp.{n}"),
                qtype: TYPE_SRV,
                expect: Expect::Answer,
            },
            _ => Q {
                // A pod in namespace bench asking for `sN.bench`: its
                // resolver tries `sN.bench.bench.svc.<zone>` first.
                name: n.replacen(".bench.svc.", ".bench.bench.svc.", 1),
                qtype: TYPE_A,
                expect: Expect::NxDomain,
            },
        })
        .collect();
    shuffle(&mut out);
    out
}

fn name_of(i: usize) -> String {
    format!("s{i}.bench.svc.{ZONE}")
}

/// A server under test, pinned to core 0.
struct Server {
    system: &'static str,
    addr: SocketAddr,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn pinned(core: u32, program: &Path) -> Command {
    let mut c = Command::new("taskset");
    c.arg("-c").arg(core.to_string()).arg(program);
    c.kill_on_drop(true);
    c
}

fn need(program: &str) -> anyhow::Result<PathBuf> {
    for dir in [
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
    ] {
        let p = Path::new(dir).join(program);
        if p.exists() {
            return Ok(p);
        }
    }
    anyhow::bail!("{program} is not installed (bench/run dns installs knot nsd unbound dnsperf)")
}

/// Pins a running process and all its threads to `core`.
fn pin_pid(pid: u32, core: u32) {
    let _ = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &core.to_string(), &pid.to_string()])
        .stdout(Stdio::null())
        .status();
}

/// A raw DNS query for `name` type A, id `id`.
fn query(id: u16, name: &str) -> Vec<u8> {
    query_typed(id, name, TYPE_A)
}

/// A raw DNS query for `name` type `qtype`, id `id`.
fn query_typed(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x00, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    q
}

/// `(rcode, answer count)` of a reply.
fn parse_reply(r: &[u8]) -> Option<(u16, u8, u16)> {
    if r.len() < 12 {
        return None;
    }
    Some((
        u16::from_be_bytes([r[0], r[1]]),
        r[3] & 0x0f,
        u16::from_be_bytes([r[6], r[7]]),
    ))
}

/// One query, answered with at least one record within `timeout`?
fn answers(addr: SocketAddr, name: &str, timeout: Duration) -> bool {
    let Ok(sock) = UdpSocket::bind("127.0.0.1:0") else {
        return false;
    };
    let _ = sock.set_read_timeout(Some(timeout));
    let id = rand_id();
    if sock.send_to(&query(id, name), addr).is_err() {
        return false;
    }
    let mut buf = [0u8; 1500];
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match sock.recv(&mut buf) {
            Ok(n) => {
                if let Some((rid, rcode, an)) = parse_reply(&buf[..n]) {
                    if rid == id {
                        return rcode == 0 && an > 0;
                    }
                }
            }
            Err(_) => return false,
        }
    }
    false
}

fn rand_id() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.subsec_nanos() ^ (t.subsec_nanos() >> 16)) as u16
}

async fn wait_answering(addr: SocketAddr, name: &str, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (a, n) = (addr, name.to_string());
        if tokio::task::spawn_blocking(move || answers(a, &n, Duration::from_millis(300))).await? {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what} did not answer {name} at {addr} within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn export(i: usize) -> pb::Export {
    pb::Export {
        service: format!("bench/s{i}"),
        ports: vec![pb::ServicePort {
            port: 80,
            protocol: "tcp".into(),
            // Named, so each service has an SRV record (`_http._tcp`).
            name: "http".into(),
        }],
        healthy_endpoints: 1,
        ..Default::default()
    }
}

async fn publish(
    client: &ControllerClient,
    site: &str,
    exports: Vec<pb::Export>,
) -> anyhow::Result<()> {
    client
        .federation()
        .await?
        .publish_exports(pb::PublishExportsRequest {
            site: site.into(),
            exports,
            tunnel_addrs: vec!["127.0.0.1:9".into()],
        })
        .await?;
    Ok(())
}

/// The `(name, address)` pairs causeway serves, from the catalog.
async fn records(client: &ControllerClient) -> anyhow::Result<Vec<(String, std::net::IpAddr)>> {
    let snap = client
        .federation()
        .await?
        .catalog(pb::CatalogRequest::default())
        .await?
        .into_inner();
    let view = CatalogView::from_snapshot(snap);
    let (base, prefix) = causeway_api::model::parse_cidr("vip_range", VIP_RANGE)?;
    let mut out = Vec::new();
    for (key, svc) in view.services() {
        if let Some(ip) = causeway_api::model::vip_for(base, prefix, svc.vip_index) {
            out.push((format!("{}.{}.svc.{ZONE}", key.name(), key.namespace()), ip));
        }
    }
    Ok(out)
}

fn zone_file(records: &[(String, std::net::IpAddr)]) -> String {
    let mut z = format!(
        "$ORIGIN {ZONE}.\n$TTL 5\n@ IN SOA ns.dns.{ZONE}. hostmaster.{ZONE}. 1 60 10 3600 5\n\
         @ IN NS ns.dns.{ZONE}.\nns.dns IN A 127.0.0.1\ndns-version IN TXT \"1.0.0\"\n"
    );
    for (name, ip) in records {
        let rr = if ip.is_ipv4() { "A" } else { "AAAA" };
        z.push_str(&format!("{name}. 5 IN {rr} {ip}\n"));
        z.push_str(&format!("_http._tcp.{name}. 5 IN SRV 0 100 80 {name}.\n"));
    }
    z
}

async fn start_knot(dir: &Path, zone: &str) -> anyhow::Result<Server> {
    let knotd = need("knotd")?;
    let dir = dir.join("knot");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("zone"), zone)?;
    let port = free_port()?;
    let d = dir.display();
    std::fs::write(
        dir.join("knot.conf"),
        format!(
            "server:\n  listen: 127.0.0.1@{port}\n  rundir: {d}\n  udp-workers: 1\n  tcp-workers: 1\n  background-workers: 1\n\
             database:\n  storage: {d}\n\
             log:\n  - target: stderr\n    any: warning\n\
             template:\n  - id: default\n    storage: {d}\n    semantic-checks: off\n    journal-content: none\n    zonefile-sync: -1\n\
             zone:\n  - domain: {ZONE}\n    file: {d}/zone\n"
        ),
    )?;
    let child = pinned(0, &knotd)
        .arg("-c")
        .arg(dir.join("knot.conf"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("log"))?)
        .spawn()?;
    Ok(Server {
        system: "knot",
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        child,
    })
}

async fn start_nsd(dir: &Path, zone: &str) -> anyhow::Result<Server> {
    let nsd = need("nsd")?;
    let dir = dir.join("nsd");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("zone"), zone)?;
    let port = free_port()?;
    let d = dir.display();
    std::fs::write(
        dir.join("nsd.conf"),
        format!(
            "server:\n  ip-address: 127.0.0.1@{port}\n  server-count: 1\n  username: \"\"\n  zonesdir: \"{d}\"\n\
             \x20 pidfile: \"{d}/nsd.pid\"\n  database: \"\"\n  xfrdfile: \"{d}/xfrd.state\"\n  zonelistfile: \"{d}/zone.list\"\n\
             \x20 xfrdir: \"{d}\"\n  verbosity: 0\n  hide-version: yes\n\
             \x20 rrl-ratelimit: 0\n  rrl-whitelist-ratelimit: 0\n\
             remote-control:\n  control-enable: no\n\
             zone:\n  name: {ZONE}\n  zonefile: \"{d}/zone\"\n"
        ),
    )?;
    let child = pinned(0, &nsd)
        .arg("-d")
        .arg("-c")
        .arg(dir.join("nsd.conf"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("log"))?)
        .spawn()?;
    Ok(Server {
        system: "nsd",
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        child,
    })
}

async fn start_unbound(
    dir: &Path,
    records: &[(String, std::net::IpAddr)],
) -> anyhow::Result<Server> {
    let unbound = need("unbound")?;
    let dir = dir.join("unbound");
    std::fs::create_dir_all(&dir)?;
    let port = free_port()?;
    let d = dir.display();
    let mut conf = format!(
        "server:\n  interface: 127.0.0.1@{port}\n  port: {port}\n  num-threads: 1\n  username: \"\"\n  chroot: \"\"\n\
         \x20 directory: \"{d}\"\n  pidfile: \"{d}/unbound.pid\"\n  do-daemonize: no\n  use-syslog: no\n  verbosity: 0\n\
         \x20 access-control: 127.0.0.0/8 allow\n  module-config: \"iterator\"\n  do-ip6: no\n\
         \x20 local-zone: \"{ZONE}.\" static\n"
    );
    for (name, ip) in records {
        let rr = if ip.is_ipv4() { "A" } else { "AAAA" };
        conf.push_str(&format!("  local-data: \"{name}. 5 IN {rr} {ip}\"\n"));
        conf.push_str(&format!(
            "  local-data: \"_http._tcp.{name}. 5 IN SRV 0 100 80 {name}.\"\n"
        ));
    }
    conf.push_str("remote-control:\n  control-enable: no\n");
    std::fs::write(dir.join("unbound.conf"), conf)?;
    let child = pinned(0, &unbound)
        .arg("-d")
        .arg("-c")
        .arg(dir.join("unbound.conf"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("log"))?)
        .spawn()?;
    Ok(Server {
        system: "unbound",
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        child,
    })
}

/// Queries per second at saturation, from dnsperf on core 1.
async fn dnsperf(addr: SocketAddr, queries: &Path, secs: u32) -> anyhow::Result<f64> {
    let bin = need("dnsperf")?;
    let out = pinned(1, &bin)
        .args(["-s", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .arg("-d")
        .arg(queries)
        .args([
            "-l",
            &secs.to_string(),
            "-c",
            "8",
            "-T",
            "1",
            "-q",
            "500",
            "-t",
            "2",
        ])
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let qps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Queries per second:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| anyhow::anyhow!("dnsperf printed no rate:\n{text}"))?;
    let lost = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Queries lost:"))
        .unwrap_or("")
        .trim()
        .to_string();
    println!("    dnsperf {addr}: {qps:.0} qps, lost {lost}");
    Ok(qps)
}

/// Latencies (µs) of queries sent at `rate` per second for `secs`, each
/// timed from its scheduled send; a query unanswered 1 s after the last
/// send counts as 1 s. One thread (pinned by the caller) sends what is due
/// and drains replies in a busy loop, so no scheduler sits between a reply
/// and its timestamp. Also the count of wrong or missing answers.
fn fixed_rate(addr: SocketAddr, rate: u32, secs: f64, queries: &[Q]) -> (Vec<f64>, usize) {
    let total = ((rate as f64 * secs) as usize).min(65_536);
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.connect(addr).expect("connect");
    sock.set_nonblocking(true).expect("nonblocking");
    let start = Instant::now() + Duration::from_millis(20);
    let sched: Vec<Instant> = (0..total)
        .map(|k| start + Duration::from_secs_f64(k as f64 / rate as f64))
        .collect();
    let mut lat = vec![f64::NAN; total];
    let (mut sent, mut got, mut wrong) = (0, 0, 0);
    let mut buf = [0u8; 1500];
    let end = sched[total - 1] + Duration::from_secs(1);
    while got < total && Instant::now() < end {
        let now = Instant::now();
        while sent < total && sched[sent] <= now {
            let q = &queries[sent % queries.len()];
            let _ = sock.send(&query_typed(sent as u16, &q.name, q.qtype));
            sent += 1;
        }
        while let Ok(n) = sock.recv(&mut buf) {
            if let Some((id, rcode, answers)) = parse_reply(&buf[..n]) {
                let k = id as usize;
                if k < sent && lat[k].is_nan() {
                    lat[k] = sched[k].elapsed().as_secs_f64() * 1e6;
                    got += 1;
                    if !queries[k % queries.len()].right(rcode, answers) {
                        wrong += 1;
                    }
                }
            }
        }
        std::hint::spin_loop();
    }
    // Unanswered queries are wrong too.
    let missing = lat.iter().filter(|l| l.is_nan()).count();
    let lat = lat
        .into_iter()
        .map(|l| if l.is_nan() { 1e6 } else { l })
        .collect();
    (lat, wrong + missing)
}

/// Busy share of core `core` (user, system, softirq ...: all but idle and
/// iowait) over the time `f` runs, in percent.
async fn core_busy<F, Fut, T>(core: u32, f: F) -> anyhow::Result<(T, f64)>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    fn sample(core: u32) -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat
            .lines()
            .find(|l| l.starts_with(&format!("cpu{core} ")))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let total: u64 = v.iter().sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        Some((total, idle))
    }
    let before = sample(core);
    let out = f().await?;
    let after = sample(core);
    let busy = match (before, after) {
        (Some((t0, i0)), Some((t1, i1))) if t1 > t0 => {
            100.0 * (1.0 - (i1 - i0) as f64 / (t1 - t0) as f64)
        }
        _ => f64::NAN,
    };
    Ok((out, busy))
}

fn pin_this_thread(core: u32) {
    // The calling thread's id, for taskset.
    let tid = std::fs::read_link("/proc/thread-self").ok().and_then(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
    });
    if let Some(tid) = tid {
        let _ = std::process::Command::new("taskset")
            .args(["-p", "-c", &core.to_string(), &tid.to_string()])
            .stdout(Stdio::null())
            .status();
    }
}

pub async fn run(report: &mut Report, root: &Path, params: &Params) -> anyhow::Result<()> {
    for p in ["knotd", "nsd", "unbound", "dnsperf", "taskset"] {
        need(p)?;
    }
    let bin = std::env::current_exe()?.with_file_name("causeway");
    let mut fed = LocalFederation::new(bin.clone(), root.join("causeway"))?;
    fed.start_controllers(3)?;
    fed.wait_for_leader(Duration::from_secs(30)).await?;
    for id in fed.controllers.keys().copied().collect::<Vec<_>>() {
        if let Some(pid) = fed.controller(id).pid() {
            pin_pid(pid, 1);
        }
    }

    println!("setup: {NAMES} services from {} sites", NAMES / PER_SITE);
    let mut sites = Vec::new();
    for s in 0..NAMES / PER_SITE {
        let name = format!("site-{s}");
        let site = join(&fed, &name).await?;
        let client = site.controller_client();
        publish(
            &client,
            &name,
            (s * PER_SITE..(s + 1) * PER_SITE).map(export).collect(),
        )
        .await?;
        let hb = tokio::spawn(causeway_gateway::publish::heartbeat(
            client.clone(),
            name.parse()?,
            Duration::from_secs(1),
        ));
        sites.push((name, site, client, hb));
    }
    // The freshness case publishes from a site of its own.
    let fresh = join(&fed, "fresh").await?;
    let fresh_client = fresh.controller_client();
    publish(&fresh_client, "fresh", vec![]).await?;
    let fresh_hb = tokio::spawn(causeway_gateway::publish::heartbeat(
        fresh_client.clone(),
        "fresh".parse()?,
        Duration::from_secs(1),
    ));

    let dns_port = free_port()?;
    let dns_addr = SocketAddr::from(([127, 0, 0, 1], dns_port));
    let dns_dir = root.join("causeway-dns");
    std::fs::create_dir_all(&dns_dir)?;
    let dns_child = pinned(0, &bin)
        .arg("dns")
        .arg("--state-dir")
        .arg(fed.root.join("site-site-0"))
        .args(["--listen", &dns_addr.to_string(), "--vip-range", VIP_RANGE])
        .args(["--udp-sockets", "1"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dns_dir.join("log"))?)
        .spawn()?;
    let causeway_dns = Server {
        system: "causeway",
        addr: dns_addr,
        child: dns_child,
    };
    wait_answering(dns_addr, &name_of(NAMES - 1), "causeway dns").await?;

    let records = records(&sites[0].2).await?;
    anyhow::ensure!(
        records.len() >= NAMES,
        "the catalog holds {} services, expected {NAMES}",
        records.len()
    );
    let zone = zone_file(&records);
    let peers_dir = root.join("peers");
    let servers = vec![
        causeway_dns,
        start_knot(&peers_dir, &zone).await?,
        start_nsd(&peers_dir, &zone).await?,
        start_unbound(&peers_dir, &records).await?,
    ];
    for s in &servers {
        wait_answering(s.addr, &name_of(NAMES - 1), s.system).await?;
        wait_answering(s.addr, &name_of(0), s.system).await?;
    }

    // The same queries for everyone: every name, shuffled (all hits), and
    // the realistic mix.
    let mut names: Vec<String> = (0..NAMES).map(name_of).collect();
    shuffle(&mut names);
    let hits: Vec<Q> = names.iter().cloned().map(Q::a).collect();
    let mixed = mix(&names);
    let qfile = root.join("queries.txt");
    std::fs::write(&qfile, hits.iter().map(Q::line).collect::<String>())?;
    let mfile = root.join("mix.txt");
    std::fs::write(&mfile, mixed.iter().map(Q::line).collect::<String>())?;

    println!(
        "{CASE}: dnsperf {} s at saturation, then {} q/s for {} s; {} round(s)",
        params.qps_secs, params.latency_rate, params.latency_secs, params.rounds
    );
    // Per case (all hits, mix) and server: qps and core busy at
    // saturation per round, latencies, wrong answers. Both cases run in
    // the same rounds, every server in turn.
    let n = servers.len();
    let mut qps = [vec![Vec::new(); n], vec![Vec::new(); n]];
    let mut busy = [vec![Vec::new(); n], vec![Vec::new(); n]];
    let mut lat = [vec![Vec::new(); n], vec![Vec::new(); n]];
    let mut wrong = [vec![0usize; n], vec![0usize; n]];
    for _ in 0..params.rounds {
        for (i, s) in servers.iter().enumerate() {
            for (c, (file, queries)) in [(&qfile, &hits), (&mfile, &mixed)].into_iter().enumerate()
            {
                let (q, b) = core_busy(0, || dnsperf(s.addr, file, params.qps_secs)).await?;
                qps[c][i].push(q);
                busy[c][i].push(b);
                let (addr, rate, secs, queries) = (
                    s.addr,
                    params.latency_rate,
                    params.latency_secs,
                    queries.clone(),
                );
                let (samples, bad) = tokio::task::spawn_blocking(move || {
                    pin_this_thread(1);
                    fixed_rate(addr, rate, secs, &queries)
                })
                .await?;
                lat[c][i].extend(samples);
                wrong[c][i] += bad;
            }
        }
    }
    let mut wrong_total = 0;
    for (c, case) in [CASE, MIX].into_iter().enumerate() {
        for (i, s) in servers.iter().enumerate() {
            report.add(case, s.system, "qps", median(&mut qps[c][i]));
            // How busy the server's core was at saturation: below ~95% the
            // load generator, not the server, set the rate.
            let b = median(&mut busy[c][i]) / 100.0;
            report.add(case, s.system, "server_core_busy_ratio", b);
            // The rate a fully busy core would serve, if it scales linearly.
            report.add(
                case,
                s.system,
                "qps_per_busy_core",
                report.get(case, s.system, "qps").unwrap_or(f64::NAN) / b,
            );
            report.add(case, s.system, "p50_us", percentile(&mut lat[c][i], 50.0));
            report.add(case, s.system, "p99_us", percentile(&mut lat[c][i], 99.0));
            report.add(case, s.system, "wrong_or_missing", wrong[c][i] as f64);
            wrong_total += wrong[c][i];
        }
    }

    println!(
        "freshness: {} exports published at the controller, timed until causeway answers",
        params.changes
    );
    let mut fresh_ms = Vec::new();
    let mut published: Vec<pb::Export> = Vec::new();
    for k in 0..params.changes {
        let i = 100_000 + k;
        published.push(export(i));
        let name = name_of(i);
        let t0 = Instant::now();
        publish(&fresh_client, "fresh", published.clone()).await?;
        let seen = tokio::task::spawn_blocking(move || {
            while t0.elapsed() < Duration::from_secs(10) {
                if answers(dns_addr, &name, Duration::from_millis(100)) {
                    return Some(t0.elapsed());
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            None
        })
        .await?;
        let ms = seen.map_or(10_000.0, |d| d.as_secs_f64() * 1e3);
        fresh_ms.push(ms);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report.add(
        "freshness",
        "causeway",
        "p50_ms",
        percentile(&mut fresh_ms, 50.0),
    );
    report.add(
        "freshness",
        "causeway",
        "p99_ms",
        percentile(&mut fresh_ms, 99.0),
    );

    let get = |sys: &str| report.get(CASE, sys, "qps").unwrap_or(f64::NAN);
    let (c, k, n) = (get("causeway"), get("knot"), get("nsd"));
    report.check("qps causeway/nsd", c / n, ">= 1.0");
    report.check("qps causeway/knot", c / k, ">= 0.8");
    let getm = |sys: &str| report.get(MIX, sys, "qps").unwrap_or(f64::NAN);
    let (cm, km, nm) = (getm("causeway"), getm("knot"), getm("nsd"));
    report.check("mix qps causeway/nsd", cm / nm, ">= 1.0");
    report.check("mix qps causeway/knot", cm / km, ">= 0.8");
    report.check(
        "wrong or missing answers (all servers, both cases)",
        wrong_total as f64,
        "<= 0",
    );
    let f = report
        .get("freshness", "causeway", "p99_ms")
        .unwrap_or(f64::NAN);
    report.check("freshness p99 ms (causeway)", f, "< 1000");

    drop(servers);
    fresh_hb.abort();
    for (_, _, _, hb) in sites {
        hb.abort();
    }
    fed.shutdown().await;
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    percentile(v, 50.0)
}

/// Fisher-Yates with a fixed seed: the same order every run.
fn shuffle<T>(v: &mut [T]) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}
