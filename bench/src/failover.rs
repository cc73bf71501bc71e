//! `bench/run failover`: steady HTTP load through a caller site's gateway
//! to a service exported by two sites, while the preferred site's
//! endpoints stop, its gateway is killed, and it comes back. Per event:
//! the failed requests, the time until 99% of traffic has moved, and the
//! latency (from each request's due time) of the requests due in it. The
//! client gives a request [`CLIENT_TIMEOUT`]: one that hangs longer fails.
//!
//! Policies in force (the ones a platform team would set): FailoverPolicy
//! ordered [east, west]; RetryPolicy (2 attempts on connect-failure, reset,
//! 5xx, gateway-error); TimeoutPolicy (per try 250 ms); OutlierDetection
//! (3 consecutive failures).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use causeway::local::{free_port, LocalFederation};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::report::Report;

/// How long the client waits for an answer before it counts the request
/// as failed (a caller's own timeout; the TimeoutPolicy allows 5 s).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Params {
    pub rate: u32,
    pub settle: Duration,
    pub after: Duration,
}

impl Params {
    pub fn new(quick: bool) -> Self {
        Self {
            rate: 500,
            settle: Duration::from_secs(if quick { 3 } else { 5 }),
            after: Duration::from_secs(if quick { 6 } else { 10 }),
        }
    }
}

/// An HTTP/1.1 backend on `addr` answering its name, keep-alive.
async fn backend(
    addr: SocketAddr,
    name: &'static str,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    Ok(causeway::local::http_backend(addr, name).await?.1)
}

/// One finished request: when it was due, how it ended.
#[derive(Clone)]
struct Sample {
    due: Instant,
    /// When it ended (answered, failed or timed out).
    done: Instant,
    /// The answering site, or `None` for a failure.
    site: Option<String>,
}

pub(crate) async fn get(
    conn: &mut Option<(
        tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
        tokio::net::tcp::OwnedWriteHalf,
    )>,
    target: SocketAddr,
) -> Option<String> {
    if conn.is_none() {
        let s = tokio::net::TcpStream::connect(target).await.ok()?;
        let (r, w) = s.into_split();
        *conn = Some((tokio::io::BufReader::new(r), w));
    }
    let (r, w) = conn.as_mut()?;
    let result = async {
        w.write_all(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")
            .await
            .ok()?;
        let mut status = String::new();
        r.read_line(&mut status).await.ok()?;
        let code = status.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).await.ok()? == 0 {
                return None;
            }
            if h == "\r\n" {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().ok()?;
            }
            if h.to_ascii_lowercase().starts_with("x-causeway-error") {
                tracing_note(&format!("{code} {}", h.trim()));
            }
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await.ok()?;
        if code != "200" {
            tracing_note(&format!(
                "{code}: {}",
                String::from_utf8_lossy(&body).trim()
            ));
        }
        (code == "200").then(|| String::from_utf8_lossy(&body).into_owned())
    }
    .await;
    if result.is_none() {
        *conn = None;
    }
    result
}

/// Prints why a request failed (the first few), so a failure count comes
/// with its cause.
fn tracing_note(what: &str) {
    static SHOWN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    if SHOWN.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 10 {
        println!("    failed request: {what}");
    }
}

/// Open-loop load: a request due every 1/rate s, each on a free client
/// connection (new ones opened as needed), until `stop`.
fn start_load(
    target: SocketAddr,
    rate: u32,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..32 {
            tx.send(None).ok();
        }
        let start = Instant::now();
        let mut k: u64 = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let due = start + Duration::from_secs_f64(k as f64 / f64::from(rate));
            k += 1;
            tokio::time::sleep_until(due.into()).await;
            let conn = rx.lock().await.try_recv().ok().flatten();
            let (tx, samples) = (tx.clone(), samples.clone());
            tokio::spawn(async move {
                let mut conn = conn;
                let site = match tokio::time::timeout(CLIENT_TIMEOUT, get(&mut conn, target)).await
                {
                    Ok(site) => site,
                    Err(_) => {
                        tracing_note("no answer within the client timeout");
                        conn = None;
                        None
                    }
                };
                let done = Instant::now();
                samples
                    .lock()
                    .expect("samples")
                    .push(Sample { due, done, site });
                let _ = tx.send(conn);
            });
        }
    })
}

/// Failures among requests due in `[from, to)`, the time from `from`
/// until 99% of 200 consecutive requests (by due time) go to `to_site`,
/// and the p99 latency (ms, from the due time, failures included) of the
/// requests due in the first second from `from`, where the event lands.
fn measure(samples: &[Sample], from: Instant, to: Instant, to_site: &str) -> (usize, f64, f64) {
    let mut window: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.due >= from && s.due < to)
        .collect();
    window.sort_by_key(|s| s.due);
    let failed = window.iter().filter(|s| s.site.is_none()).count();
    let mut during: Vec<f64> = window
        .iter()
        .filter(|s| s.due < from + Duration::from_secs(1))
        .map(|s| s.done.saturating_duration_since(s.due).as_secs_f64() * 1e3)
        .collect();
    let p99 = crate::report::percentile(&mut during, 99.0);
    let n = 200;
    let mut shift = f64::NAN;
    for i in 0..window.len().saturating_sub(n) {
        let moved = window[i..i + n]
            .iter()
            .filter(|s| s.site.as_deref() == Some(to_site))
            .count();
        if moved * 100 >= n * 99 {
            shift = window[i].due.saturating_duration_since(from).as_secs_f64() * 1e3;
            break;
        }
    }
    (failed, shift, p99)
}

/// What the failover events stop and start on the preferred site: its
/// gateway, the way each system runs it.
pub(crate) enum Preferred<'a> {
    /// Site east's gateway in a local federation.
    Causeway {
        fed: &'a mut LocalFederation,
        bin: std::path::PathBuf,
    },
    /// A process started (again) by `start`.
    Process {
        child: Option<tokio::process::Child>,
        start: Box<dyn Fn() -> anyhow::Result<tokio::process::Child> + Send + 'a>,
    },
}

impl Preferred<'_> {
    async fn kill(&mut self) {
        match self {
            Preferred::Causeway { fed, .. } => {
                fed.sites
                    .get_mut("east")
                    .expect("east")
                    .gateway
                    .kill()
                    .await
            }
            Preferred::Process { child, .. } => {
                if let Some(mut c) = child.take() {
                    let _ = c.kill().await;
                }
            }
        }
    }

    fn start(&mut self) -> anyhow::Result<()> {
        match self {
            Preferred::Causeway { fed, bin } => {
                fed.sites.get_mut("east").expect("east").gateway.start(bin)
            }
            Preferred::Process { child, start } => {
                *child = Some(start()?);
                Ok(())
            }
        }
    }
}

/// Site east's HTTP backend, stopped and started by the events.
pub(crate) struct Backend {
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
}

/// Sites east, west and central in `fed` (started), east and west
/// exporting `shop/web` (HTTP) from `east_addr` and `west_addr`, with the
/// policies of the module docs; central's VIP:port for it once it answers
/// from east.
pub(crate) async fn causeway_setup(
    fed: &mut LocalFederation,
    bin: &std::path::Path,
    root: &std::path::Path,
    east_addr: SocketAddr,
    west_addr: SocketAddr,
) -> anyhow::Result<SocketAddr> {
    fed.add_site("east", "127.61.0.0/24", &[]).await?;
    fed.add_site("west", "127.62.0.0/24", &[]).await?;
    fed.add_site("central", "127.63.0.0/24", &[]).await?;
    for (site, addr) in [("east", east_addr), ("west", west_addr)] {
        let cfg = fed.sites[site].config.clone();
        let mut text = std::fs::read_to_string(&cfg)?;
        text.push_str(&format!(
            "\n[[exports]]\nservice = \"shop/web\"\nport = 8080\nprotocol = \"http\"\nendpoints = [\"{addr}\"]\n"
        ));
        std::fs::write(&cfg, text)?;
        let gw = &mut fed.sites.get_mut(site).expect("site").gateway;
        gw.kill().await;
        gw.start(bin)?;
    }
    let doc = |kind: &str, name: &str, spec: &str| {
        format!("---\napiVersion: causeway.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}, namespace: shop}}\nspec: {spec}\n")
    };
    let policies = root.join("policies.yaml");
    std::fs::write(
        &policies,
        doc("FailoverPolicy", "order", "{service: web, mode: ordered, sites: [east, west]}")
            + &doc("RetryPolicy", "retry", "{service: web, attempts: 2, on: [connect-failure, reset, 5xx, gateway-error], budget: {ratio: 0.5, minPerSecond: 100}}")
            + &doc("TimeoutPolicy", "timeout", "{service: web, requestMs: 5000, perTryMs: 250}")
            + &doc("OutlierDetection", "outliers", "{service: web, consecutiveFailures: 3, ejectionMs: 3000}"),
    )?;
    fed.ctl(&["policy", "apply", "-f", &policies.display().to_string()])
        .await?;
    let vip = fed
        .wait_resolvable(
            "central",
            "web.shop.svc.clusterset.local",
            Duration::from_secs(30),
        )
        .await?;
    let target = SocketAddr::new(vip, 8080);
    wait_answer(target, "east").await?;
    Ok(target)
}

/// Waits (up to 30 s) until a GET through `target` is answered by `site`.
pub(crate) async fn wait_answer(target: SocketAddr, site: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = None;
        if get(&mut c, target).await.as_deref() == Some(site) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{target} never answered from {site}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Steady load through `target` while east's endpoints stop and return,
/// then its gateway (`preferred`) dies and returns; per event, rows for
/// `system`: failed requests, shift time, p99 in the first second.
pub(crate) async fn events(
    report: &mut Report,
    system: &str,
    target: SocketAddr,
    east: &mut Backend,
    preferred: &mut Preferred<'_>,
    params: &Params,
) -> anyhow::Result<()> {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = start_load(target, params.rate, samples.clone(), stop.clone());
    println!(
        "failover ({system}): {} req/s of HTTP; east preferred, west next",
        params.rate
    );
    tokio::time::sleep(params.settle).await;

    // 1. East's endpoints stop.
    let t1 = Instant::now();
    east.task.abort();
    tokio::time::sleep(params.after).await;
    // East's endpoints return (traffic goes back to east before event 2).
    east.task = backend(east.addr, "east").await?;
    let t1b = Instant::now();
    tokio::time::sleep(params.after).await;
    // 2. East's gateway is killed.
    let t2 = Instant::now();
    preferred.kill().await;
    tokio::time::sleep(params.after).await;
    // 3. East's gateway comes back.
    let t3 = Instant::now();
    preferred.start()?;
    tokio::time::sleep(params.after * 2).await;
    let t_end = Instant::now();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = load.await;
    // Every request still out ends within the client timeout.
    tokio::time::sleep(CLIENT_TIMEOUT + Duration::from_secs(1)).await;
    let samples = samples.lock().expect("samples").clone();

    // Requests already under way when the gateway died may fail with it;
    // they are counted apart. Every request due from the kill on must
    // succeed.
    let in_flight_failed = samples
        .iter()
        .filter(|s| s.due < t2 && s.done >= t2 && s.site.is_none())
        .count();
    for (case, from, to, site) in [
        ("endpoints-down", t1, t1b, "west"),
        ("endpoints-restore", t1b, t2, "east"),
        ("gateway-down", t2, t3, "west"),
        ("restore", t3, t_end, "east"),
    ] {
        let (failed, shift, p99) = measure(&samples, from, to, site);
        report.add(case, system, "failed_count", failed as f64);
        report.add(case, system, "shift_ms", shift);
        report.add(case, system, "p99_first_s_ms", p99);
    }
    report.add(
        "gateway-down",
        system,
        "in_flight_failed_count",
        in_flight_failed as f64,
    );
    Ok(())
}

pub async fn run(
    report: &mut Report,
    root: &std::path::Path,
    params: &Params,
) -> anyhow::Result<()> {
    let bin = std::env::current_exe()?.with_file_name("causeway");
    let mut fed = LocalFederation::new(bin.clone(), root.join("causeway"))?;
    fed.start_controllers(3)?;
    fed.wait_for_leader(Duration::from_secs(30)).await?;
    let east_addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let west_addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let mut east = Backend {
        addr: east_addr,
        task: backend(east_addr, "east").await?,
    };
    let _west = backend(west_addr, "west").await?;
    let target = causeway_setup(&mut fed, &bin, root, east_addr, west_addr).await?;
    let mut preferred = Preferred::Causeway {
        fed: &mut fed,
        bin: bin.clone(),
    };
    events(
        report,
        "causeway",
        target,
        &mut east,
        &mut preferred,
        params,
    )
    .await?;
    drop(preferred);
    let get = |r: &Report, case: &str, m: &str| r.get(case, "causeway", m).unwrap_or(f64::NAN);
    let ed_failed = get(report, "endpoints-down", "failed_count");
    let re_failed = get(report, "restore", "failed_count");
    let gd_failed = get(report, "gateway-down", "failed_count");
    let ed_shift = get(report, "endpoints-down", "shift_ms");
    let gd_shift = get(report, "gateway-down", "shift_ms");
    report.check("endpoints-down failed requests", ed_failed, "<= 0");
    report.check("restore failed requests", re_failed, "<= 0");
    report.check(
        "gateway-down failed (due after the kill)",
        gd_failed,
        "<= 0",
    );
    report.check("endpoints-down shift ms", ed_shift, "< 1000");
    report.check("gateway-down shift ms", gd_shift, "< 2000");
    east.task.abort();
    fed.shutdown().await;
    Ok(())
}
