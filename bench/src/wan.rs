//! The tunnel suite's wide-area cases (`wan-…`): two network namespaces
//! joined by a link whose every packet passes this program, which delays,
//! jitters, rate-limits and drops them.
//!
//! The link: one TUN device in each namespace (`cwwan0`, MTU 1500, the
//! near side 10.77.0.1, the far side 10.77.0.2, point to point). `wan-link`
//! reads each IP packet one side's kernel sends into its TUN device and,
//! after the link's delay, writes it into the other side's, where the
//! kernel receives it as from a wire. TCP (haproxy, Envoy) and QUIC
//! (causeway) see the same packets lost and delayed; `tc netem` is not
//! available on these machines, and a TUN pair is a userspace relay at the
//! packet level, below both transports.
//!
//! The link model, per direction: the link serialises packets at `rate`
//! (a router's queue of at most `queue` bytes in front of it, tail drop),
//! then delays each by `delay` ± up to `jitter` (uniform; packets are not
//! reordered: a packet never leaves before the one ahead of it), and loses
//! each with probability `loss`, independently (a fixed-seed generator, so
//! runs are comparable).
//!
//! Placement: the controller, site west's gateway, the near halves of the
//! haproxy and Envoy pairs and the client run in the near namespace; site
//! east's gateway, the far halves and the echo server in the far one. The
//! east gateway's control-plane traffic crosses the link too.

use std::fs::File;
use std::io::{BufRead, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use causeway::local::{Export, LocalFederation};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::report::{percentile, Report};
use crate::tunnel::{self, Far, System};

const NEAR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const FAR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const DEVICE: &str = "cwwan0";

/// The link's shape; `wan-link` takes new values on its stdin.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// One way.
    pub delay: Duration,
    pub jitter: Duration,
    pub loss: f64,
    pub rate_bps: f64,
    pub queue_bytes: f64,
}

impl Shape {
    /// 30 ms round trip, ±2 ms each way, 100 Mbit/s with a queue of one
    /// bandwidth-delay product, `loss` per packet.
    pub fn wan(loss: f64) -> Self {
        Self {
            delay: Duration::from_millis(15),
            jitter: Duration::from_millis(2),
            loss,
            rate_bps: 100e6,
            queue_bytes: 100e6 / 8.0 * 0.030,
        }
    }

    fn command(&self) -> String {
        format!(
            "set {} {} {} {} {}\n",
            self.delay.as_secs_f64() * 1e3,
            self.jitter.as_secs_f64() * 1e3,
            self.loss,
            self.rate_bps,
            self.queue_bytes
        )
    }

    fn parse(line: &str) -> anyhow::Result<Self> {
        let f: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("bad link command {line:?}"))?;
        let [delay_ms, jitter_ms, loss, rate_bps, queue_bytes] = f[..] else {
            bail!("link command {line:?}: want set DELAY_MS JITTER_MS LOSS RATE_BPS QUEUE_BYTES");
        };
        Ok(Self {
            delay: Duration::from_secs_f64(delay_ms / 1e3),
            jitter: Duration::from_secs_f64(jitter_ms / 1e3),
            loss,
            rate_bps,
            queue_bytes,
        })
    }
}

/// Packets the link carried, lost on purpose, and dropped at a full queue.
#[derive(Default)]
struct Counters {
    packets: AtomicU64,
    lost: AtomicU64,
    overflow: AtomicU64,
}

/// Opens a TUN device named [`DEVICE`] in network namespace `ns`: a thread
/// of its own enters the namespace (a thread's namespace is its own), and
/// the device stays there when the descriptor is used from elsewhere.
fn open_tun_in(ns: &str) -> anyhow::Result<File> {
    let ns = ns.to_string();
    std::thread::spawn(move || -> anyhow::Result<File> {
        let nsf = File::open(format!("/var/run/netns/{ns}"))
            .with_context(|| format!("network namespace {ns}"))?;
        crate::sys::enter_netns(&nsf).context("setns")?;
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .context("/dev/net/tun")?;
        crate::sys::attach_tun(&tun, DEVICE).context("TUNSETIFF")?;
        Ok(tun)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the TUN thread panicked"))?
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip").args(args).output()?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A small fast generator; the link's losses and jitter come from it.
struct XorShift(u64);

impl XorShift {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One direction: reads packets from `from`, shapes them, writes them to
/// `to` when due.
fn carry(
    mut from: File,
    mut to: File,
    shape: Arc<Mutex<Shape>>,
    counters: Arc<Counters>,
    seed: u64,
) {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        for (due, packet) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            // A packet the far kernel refuses is a lost packet.
            let _ = to.write(&packet);
        }
    });
    std::thread::spawn(move || {
        let mut rng = XorShift(seed);
        let mut buf = vec![0u8; 65536];
        let (mut wire_free, mut last_due) = (Instant::now(), Instant::now());
        while let Ok(n) = from.read(&mut buf) {
            let now = Instant::now();
            let s = *shape.lock().unwrap_or_else(|e| e.into_inner());
            counters.packets.fetch_add(1, Ordering::Relaxed);
            if rng.unit() < s.loss {
                counters.lost.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let begin = wire_free.max(now);
            if (begin - now).as_secs_f64() * s.rate_bps / 8.0 > s.queue_bytes {
                counters.overflow.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            wire_free = begin + Duration::from_secs_f64(n as f64 * 8.0 / s.rate_bps);
            let jitter = s.jitter.mul_f64(rng.unit() * 2.0);
            let due = (wire_free + s.delay + jitter - s.jitter).max(last_due);
            last_due = due;
            if tx.send((due, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    });
}

/// `causeway-bench wan-link NEAR_NS FAR_NS`: makes the link between the two
/// namespaces and carries it until stdin closes. Stdin takes `set …` (see
/// [`Shape`]) and `stats`, which prints `packets N lost N overflow N`.
pub fn serve_link(near_ns: &str, far_ns: &str) -> anyhow::Result<()> {
    let near = open_tun_in(near_ns)?;
    let far = open_tun_in(far_ns)?;
    for (ns, me, peer) in [(near_ns, NEAR, FAR), (far_ns, FAR, NEAR)] {
        let (me, peer) = (me.to_string(), peer.to_string());
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "addr", "add", &me, "peer", &peer, "dev", DEVICE])?;
        ip(&["-n", ns, "link", "set", DEVICE, "mtu", "1500", "up"])?;
    }
    let shape = Arc::new(Mutex::new(Shape::wan(0.0)));
    let counters = Arc::new(Counters::default());
    carry(
        near.try_clone()?,
        far.try_clone()?,
        shape.clone(),
        counters.clone(),
        0x9e37_79b9_7f4a_7c15,
    );
    carry(
        far,
        near,
        shape.clone(),
        counters.clone(),
        0xd1b5_4a32_d192_ed03,
    );
    println!("ready");
    std::io::stdout().flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if line.starts_with("set ") {
            *shape.lock().unwrap_or_else(|e| e.into_inner()) = Shape::parse(&line)?;
            println!("ok");
        } else if line == "stats" {
            println!(
                "packets {} lost {} overflow {}",
                counters.packets.load(Ordering::Relaxed),
                counters.lost.load(Ordering::Relaxed),
                counters.overflow.load(Ordering::Relaxed)
            );
        } else {
            println!("error: unknown command {line:?}");
        }
        std::io::stdout().flush()?;
    }
    Ok(())
}

/// The link process, driven over its stdin.
struct Link {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Link {
    async fn start(near_ns: &str, far_ns: &str) -> anyhow::Result<Self> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["wan-link", near_ns, far_ns])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the link")?;
        let stdin = child.stdin.take().context("link stdin")?;
        let stdout = tokio::io::BufReader::new(child.stdout.take().context("link stdout")?).lines();
        let mut link = Self {
            child,
            stdin,
            stdout,
        };
        let first = link.reply().await?;
        anyhow::ensure!(first == "ready", "the link said {first:?}");
        Ok(link)
    }

    async fn reply(&mut self) -> anyhow::Result<String> {
        self.stdout
            .next_line()
            .await?
            .context("the link process exited")
    }

    async fn set(&mut self, shape: Shape) -> anyhow::Result<()> {
        self.stdin.write_all(shape.command().as_bytes()).await?;
        let r = self.reply().await?;
        anyhow::ensure!(r == "ok", "the link said {r:?}");
        Ok(())
    }

    /// (packets, lost, overflowed) so far.
    async fn stats(&mut self) -> anyhow::Result<(f64, f64, f64)> {
        self.stdin.write_all(b"stats\n").await?;
        let r = self.reply().await?;
        let f: Vec<f64> = r
            .split_whitespace()
            .skip(1)
            .step_by(2)
            .filter_map(|x| x.parse().ok())
            .collect();
        match f[..] {
            [p, l, o] => Ok((p, l, o)),
            _ => bail!("the link said {r:?}"),
        }
    }
}

/// What the wide-area cases run.
pub struct Params {
    /// Losses to run every case at.
    pub losses: Vec<f64>,
    pub rate_secs: f64,
    pub max_secs: f64,
    pub bulk_bytes: usize,
    pub rounds: usize,
    pub streams: usize,
}

impl Params {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                losses: vec![0.01],
                rate_secs: 8.0,
                max_secs: 4.0,
                bulk_bytes: 8 << 20,
                rounds: 2,
                streams: 100,
            }
        } else {
            Self {
                losses: vec![0.005, 0.02],
                rate_secs: 20.0,
                max_secs: 10.0,
                bulk_bytes: 24 << 20,
                rounds: 2,
                streams: 100,
            }
        }
    }
}

/// The tunnel suite's part: makes the two namespaces, runs the cases in
/// the near one (`causeway-bench wan-cases`), adds their rows to `report`
/// and removes the namespaces.
pub async fn run(report: &mut Report, root: &Path, quick: bool) -> anyhow::Result<()> {
    if !crate::sys::is_root() {
        bail!(
            "the wan-… cases build network namespaces and need root: run bench/run tunnel as root, or CAUSEWAY_BENCH_WAN=0 to skip them"
        );
    }
    let tag = std::process::id();
    let (near, far) = (format!("cwwan-a-{tag}"), format!("cwwan-b-{tag}"));
    for ns in [&near, &far] {
        ip(&["netns", "add", ns])?;
    }
    let result = async {
        let dir = root.join("wan");
        std::fs::create_dir_all(&dir)?;
        let mut cmd =
            tunnel::in_netns(Some(&near), &std::env::current_exe()?.display().to_string());
        cmd.args(["wan-cases", &near, &far])
            .arg(&dir)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        if quick {
            cmd.arg("--quick");
        }
        let mut child = cmd.spawn().context("starting the wan cases")?;
        let mut lines =
            tokio::io::BufReader::new(child.stdout.take().context("wan stdout")?).lines();
        while let Some(line) = lines.next_line().await? {
            match line.strip_prefix("ROW\t") {
                Some(row) => {
                    let f: Vec<&str> = row.split('\t').collect();
                    if let [case, system, metric, value] = f[..] {
                        report.add(case, system, metric, value.parse().unwrap_or(f64::NAN));
                    }
                }
                None => println!("{line}"),
            }
        }
        let status = child.wait().await?;
        anyhow::ensure!(status.success(), "the wan cases failed ({status})");
        Ok(())
    }
    .await;
    for ns in [&near, &far] {
        let _ = ip(&["netns", "del", ns]);
    }
    result
}

fn row(case: &str, system: &str, metric: &str, value: f64) {
    println!("ROW\t{case}\t{system}\t{metric}\t{value}");
}

/// `causeway-bench wan-cases NEAR_NS FAR_NS DIR [--quick]`, run inside the
/// near namespace: starts the link, the systems on both sides, runs every
/// case at every loss and prints `ROW` lines for the parent's report.
pub async fn cases(near_ns: &str, far_ns: &str, root: &Path, quick: bool) -> anyhow::Result<()> {
    let p = Params::new(quick);
    let mut link = Link::start(near_ns, far_ns).await?;
    // Set up on a clean link (joins and handshakes are not what is measured).
    link.set(Shape::wan(0.0)).await?;
    let mut children = Vec::new();
    let echo = tunnel::echo_server(&mut children, Some(far_ns)).await?;
    let certs = root.join("certs");
    crate::pki::write(&certs)?;

    let bin = std::env::current_exe()?.with_file_name("causeway");
    let mut fed = LocalFederation::new(bin, root.join("causeway"))?;
    fed.controller_host = IpAddr::V4(NEAR);
    fed.start_controllers(1)?;
    fed.wait_for_leader(Duration::from_secs(30)).await?;
    // One worker thread, like the peers' headline setting; datagrams of
    // the default size (1452 bytes of UDP payload fits a 1500-byte MTU).
    // CAUSEWAY_BENCH_WAN_GW replaces this (TOML, `\n` for newlines).
    fed.gateway_base = LocalFederation::gateway_config_with(
        &std::env::var("CAUSEWAY_BENCH_WAN_GW")
            .unwrap_or_else(|_| "worker_threads = 1\n".into())
            .replace("\\n", "\n"),
    )?;
    fed.gateway_netns = Some(far_ns.to_string());
    fed.gateway_tunnel_host = IpAddr::V4(FAR);
    fed.add_site(
        "east",
        "127.201.0.0/16",
        &[Export {
            service: "bench/echo".into(),
            port: 7000,
            endpoints: vec![echo],
        }],
    )
    .await?;
    fed.gateway_netns = None;
    fed.gateway_tunnel_host = IpAddr::V4(NEAR);
    fed.add_site("west", "127.202.0.0/16", &[]).await?;
    let vip = fed
        .wait_resolvable(
            "west",
            "echo.bench.svc.clusterset.local",
            Duration::from_secs(30),
        )
        .await?;
    let entry = SocketAddr::new(vip, 7000);
    tunnel::wait_echo(entry)
        .await
        .context("causeway over the link")?;
    let mut systems = vec![System {
        name: "causeway",
        entry,
        pids: ["west", "east"]
            .iter()
            .filter_map(|s| fed.sites[*s].gateway.pid())
            .collect(),
    }];
    let far = Far {
        netns: Some(far_ns.to_string()),
        host: IpAddr::V4(FAR),
    };
    systems.push(
        tunnel::haproxy_pair(&mut children, root, &certs, echo, "haproxy", Some(1), &far).await?,
    );
    let envoy = tunnel::envoy_binary()?;
    systems.push(
        tunnel::envoy_pair(
            &mut children,
            root,
            &envoy,
            &certs,
            echo,
            "envoy",
            Some(1),
            &far,
        )
        .await?,
    );

    if let Ok(names) = std::env::var("CAUSEWAY_BENCH_SYSTEMS") {
        systems.retain(|s| names.split(',').any(|n| n == s.name));
    }
    let losses = match std::env::var("CAUSEWAY_BENCH_WAN_LOSS") {
        Ok(l) => l
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<f64>, _>>()?,
        Err(_) => p.losses.clone(),
    };
    for &loss in &losses {
        link.set(Shape::wan(loss)).await?;
        let before = link.stats().await?;
        let tag = format!("wan-loss{}", loss * 100.0);
        let n = systems.len();
        // Fixed rate: `streams` connections, 10 echoes a second each.
        let rate = p.streams as f64 * 10.0;
        let case = format!("{tag}-rr-{}streams", p.streams);
        println!(
            "{case}: {rate} echoes/s for {} s each, in {} interleaved rounds",
            p.rate_secs, p.rounds
        );
        let mut lat = vec![Vec::new(); n];
        for _ in 0..p.rounds {
            for (i, s) in systems.iter().enumerate() {
                let secs = p.rate_secs / p.rounds as f64;
                lat[i].extend(tunnel::fixed_rate(s.entry, p.streams, rate, secs).await?);
            }
        }
        for (s, lat) in systems.iter().zip(&lat) {
            let mut sched: Vec<f64> = lat.iter().map(|l| l.0 / 1e3).collect();
            for (metric, q) in [
                ("p50_ms", 50.0),
                ("p90_ms", 90.0),
                ("p99_ms", 99.0),
                ("p999_ms", 99.9),
            ] {
                row(&case, s.name, metric, percentile(&mut sched, q));
            }
        }
        let case = format!("{tag}-max-{}streams", p.streams);
        println!(
            "{case}: {} s each, in {} interleaved rounds",
            p.max_secs, p.rounds
        );
        let mut sat = vec![(0.0, 0.0); n];
        for _ in 0..p.rounds {
            for (i, s) in systems.iter().enumerate() {
                let secs = p.max_secs / p.rounds as f64;
                let t = Instant::now();
                let rps = tunnel::saturate(s.entry, p.streams, secs).await?;
                let e = t.elapsed().as_secs_f64();
                sat[i].0 += rps * e;
                sat[i].1 += e;
            }
        }
        for (s, (reqs, secs)) in systems.iter().zip(&sat) {
            row(&case, s.name, "rps", reqs / secs);
        }
        let case = format!("{tag}-bulk-1flow");
        println!(
            "{case}: {} MiB each, in {} interleaved rounds",
            p.bulk_bytes >> 20,
            p.rounds
        );
        let mut flows = vec![(0.0, 0.0); n];
        for _ in 0..p.rounds {
            for (i, s) in systems.iter().enumerate() {
                let bytes = (p.bulk_bytes / p.rounds) & !((1 << 20) - 1);
                let mbps = match tunnel::bulk(s.entry, bytes).await {
                    Ok(m) => m,
                    Err(e) => {
                        println!("    {case} through {}: {e:#}", s.name);
                        tunnel::wrong(s.entry);
                        continue;
                    }
                };
                flows[i].0 += bytes as f64;
                flows[i].1 += bytes as f64 * 8.0 / 1e6 / mbps;
            }
        }
        for (s, (bytes, secs)) in systems.iter().zip(&flows) {
            row(&case, s.name, "throughput_mbps", bytes * 8.0 / 1e6 / secs);
        }
        // Sharing the link: a causeway flow and a haproxy flow (TCP+TLS) at
        // once, for the same time. A tunnel that ignored congestion would
        // take the link and starve the TCP flow.
        let find = |n: &str| systems.iter().find(|s| s.name == n).map(|s| s.entry);
        if let (Some(c), Some(h)) = (find("causeway"), find("haproxy")) {
            let case = format!("{tag}-share-2flows");
            println!(
                "{case}: a causeway and a haproxy flow together for {} s",
                p.max_secs
            );
            let (a, b) = tokio::join!(bulk_for(c, p.max_secs), bulk_for(h, p.max_secs));
            row(&case, "causeway", "throughput_mbps", a?);
            row(&case, "haproxy", "throughput_mbps", b?);
        }
        // What the link did in this loss setting.
        let after = link.stats().await?;
        let packets = after.0 - before.0;
        row(&format!("{tag}-link"), "link", "packets", packets);
        row(
            &format!("{tag}-link"),
            "link",
            "lost_pct",
            (after.1 - before.1) / packets * 100.0,
        );
        row(
            &format!("{tag}-link"),
            "link",
            "overflow_pct",
            (after.2 - before.2) / packets * 100.0,
        );
        link.set(Shape::wan(0.0)).await?;
    }
    for s in &systems {
        row(
            "wan-answers",
            s.name,
            "wrong_or_failed",
            tunnel::wrong_count(s.entry) as f64,
        );
    }
    fed.shutdown().await;
    for mut c in children {
        let _ = c.start_kill();
        let _ = c.wait().await;
    }
    drop(link.stdin);
    let _ = link.child.wait().await;
    Ok(())
}

/// One flow for `secs`: writes a pattern as fast as the system takes it,
/// reads the echo back; Mbit/s one way over the whole flow.
async fn bulk_for(entry: SocketAddr, secs: f64) -> anyhow::Result<f64> {
    use tokio::io::AsyncReadExt;
    let s = tokio::net::TcpStream::connect(entry).await?;
    let (mut r, mut w) = s.into_split();
    let t = Instant::now();
    let until = t + Duration::from_secs_f64(secs);
    let writer = tokio::spawn(async move {
        let chunk: Vec<u8> = (0..16 * 1024).map(|i| (i % 251) as u8).collect();
        while Instant::now() < until {
            w.write_all(&chunk).await?;
        }
        w.shutdown().await?;
        Ok::<_, anyhow::Error>(())
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0usize;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    writer.await??;
    Ok(got as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e6)
}
