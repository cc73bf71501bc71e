//! `bench/run controller`: the 3-node causeway controller side by side with
//! a 3-node etcd, both fsyncing, on loopback.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use causeway::local::LocalFederation;
use causeway_api::client::ControllerClient;
use causeway_api::pb;
use causeway_gateway::site::SiteState;
use tokio_stream::StreamExt;

use crate::etcd::Etcd;
use crate::pb::etcd::{watch_client::WatchClient, PutRequest, WatchCreateRequest, WatchRequest};
use crate::report::{percentile, rss_mb, Report};

pub struct Params {
    pub seq_writes: usize,
    pub concurrent_secs: u64,
    pub fanout_rounds: usize,
    pub sites: usize,
    pub services: usize,
}

impl Params {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                seq_writes: 300,
                concurrent_secs: 4,
                fanout_rounds: 10,
                sites: 200,
                services: 300,
            }
        } else {
            Self {
                seq_writes: 5000,
                concurrent_secs: 15,
                fanout_rounds: 30,
                sites: 1000,
                services: 300,
            }
        }
        .with_env()
    }

    /// `CAUSEWAY_BENCH_SEQ_WRITES=N` sets the single-client writes per
    /// system (a longer run narrows the p99 interval).
    fn with_env(mut self) -> Self {
        if let Some(n) = std::env::var("CAUSEWAY_BENCH_SEQ_WRITES")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            self.seq_writes = n;
        }
        self
    }
}

/// `CAUSEWAY_BENCH_CASES=write-1client,fanout-100,...` runs only those
/// cases (for experiments; checks whose inputs were skipped read NaN).
fn wanted(case: &str) -> bool {
    std::env::var("CAUSEWAY_BENCH_CASES")
        .map(|o| o.split(',').any(|c| c == case))
        .unwrap_or(true)
}

fn export_set(n: usize, tag: u32) -> Vec<pb::Export> {
    (0..n)
        .map(|i| pb::Export {
            service: format!("ns-{}/svc-{i}", i % 20),
            ports: vec![pb::ServicePort {
                port: 8080,
                protocol: "tcp".into(),
                name: String::new(),
            }],
            healthy_endpoints: tag,
            vip_index: 0,
            ..Default::default()
        })
        .collect()
}

pub(crate) async fn join(fed: &LocalFederation, name: &str) -> anyhow::Result<SiteState> {
    let token = {
        let mut c = fed.admin_client(None)?.federation().await?;
        c.create_join_token(pb::CreateJoinTokenRequest {
            site: name.into(),
            labels: Default::default(),
            ttl_seconds: 600,
        })
        .await?
        .into_inner()
        .token
    };
    let dir = fed.root.join(format!("site-{name}"));
    let ca = SiteState::site_ca(&dir, None)?;
    SiteState::join(&dir, &token, &ca, vec!["127.0.0.1:9".into()]).await
}

pub async fn run(
    report: &mut Report,
    root: &std::path::Path,
    params: &Params,
) -> anyhow::Result<()> {
    let bin = std::env::current_exe()?.with_file_name("causeway");
    let mut fed = LocalFederation::new(bin, root.join("causeway"))?;
    fed.start_controllers(3)?;
    let leader = fed.wait_for_leader(Duration::from_secs(30)).await?;
    let site = join(&fed, "bench").await?;
    // Clients talk to the leader directly, for both systems.
    let client = ControllerClient::new(
        vec![fed.controller_addrs[&leader].clone()],
        &site.controller_ca_pem,
        Some(&site.api),
    );
    let fed_client = client.federation().await?;

    let etcd = Etcd::start(root).await?;
    let etcd_leader = etcd.leader().await?;
    let etcd_kv = etcd.kv(etcd_leader).await?;
    let value = vec![b'x'; 100];

    let seq_writes = if wanted("write-1client") {
        params.seq_writes
    } else {
        0
    };
    println!("write-1client: {seq_writes} sequential writes each, interleaved");
    let (mut cw, mut ew) = (Vec::new(), Vec::new());
    for i in 0..seq_writes {
        let mut c = fed_client.clone();
        let t = Instant::now();
        c.publish_exports(pb::PublishExportsRequest {
            site: "bench".into(),
            exports: export_set(1, i as u32),
            tunnel_addrs: vec![],
        })
        .await?;
        cw.push(t.elapsed().as_secs_f64() * 1e6);
        let mut e = etcd_kv.clone();
        let t = Instant::now();
        e.put(PutRequest {
            key: b"bench".to_vec(),
            value: value.clone(),
            ..Default::default()
        })
        .await?;
        ew.push(t.elapsed().as_secs_f64() * 1e6);
    }
    // Where a causeway commit spends its time, from the nodes' own metrics.
    for (id, addr) in &fed.controller_admin {
        let text = scrape(*addr).await.unwrap_or_default();
        for l in text.lines() {
            let wanted = [
                "causeway_raft_write_seconds",
                "causeway_raft_log_append_seconds",
                "causeway_raft_rpc_seconds{rpc=\"append_entries\"",
            ];
            if wanted.iter().any(|w| l.starts_with(w)) && l.contains("quantile=\"0.5\"") {
                let (name, v) = l.rsplit_once(' ').unwrap_or((l, "0"));
                let us = v.parse::<f64>().unwrap_or(0.0) * 1e6;
                println!("    node {id} p50 {us:>7.0} us  {name}");
            }
        }
    }
    if seq_writes > 0 {
        // How much of the p99 ratio is this run's luck: pairs resampled
        // together (before the sorting below breaks the pairing).
        let (lo, hi) = crate::report::paired_ratio_interval(&cw, &ew, 99.0, 200);
        println!("    p99 causeway/etcd: 90% of resampled runs read {lo:.2}..{hi:.2}");
        report.add("write-1client", "causeway", "p99_vs_etcd_p05_ratio", lo);
        report.add("write-1client", "causeway", "p99_vs_etcd_p95_ratio", hi);
        for (sys, s) in [("causeway", &mut cw), ("etcd", &mut ew)] {
            report.add("write-1client", sys, "p50_us", percentile(s, 50.0));
            report.add("write-1client", sys, "p99_us", percentile(s, 99.0));
        }
    }

    let (mut causeway_rate, mut etcd_rate) = (f64::NAN, f64::NAN);
    if wanted("write-64clients") {
        println!("write-64clients: {} s each", params.concurrent_secs);
        let dur = Duration::from_secs(params.concurrent_secs);
        // 64 clients over 8 connections, for both systems.
        let mut conns = Vec::new();
        for _ in 0..8 {
            let cc = ControllerClient::new(
                vec![fed.controller_addrs[&leader].clone()],
                &site.controller_ca_pem,
                Some(&site.api),
            );
            conns.push(cc.federation().await?);
        }
        let mut econns = Vec::new();
        for _ in 0..8 {
            econns.push(etcd.kv(etcd_leader).await?);
        }
        causeway_rate = saturate(64, dur, {
            let conns = conns.clone();
            move |i| {
                let mut c = conns[i as usize % conns.len()].clone();
                async move {
                    c.publish_exports(pb::PublishExportsRequest {
                        site: "bench".into(),
                        exports: export_set(1, i),
                        tunnel_addrs: vec![],
                    })
                    .await
                    .is_ok()
                }
            }
        })
        .await;
        etcd_rate = saturate(64, dur, {
            let econns = econns.clone();
            let value = value.clone();
            move |i| {
                let mut e = econns[i as usize % econns.len()].clone();
                let value = value.clone();
                async move {
                    e.put(PutRequest {
                        key: format!("k{}", i % 64).into_bytes(),
                        value,
                        ..Default::default()
                    })
                    .await
                    .is_ok()
                }
            }
        })
        .await;
        report.add("write-64clients", "causeway", "writes_per_s", causeway_rate);
        report.add("write-64clients", "etcd", "writes_per_s", etcd_rate);
    }

    let admin = fed.admin_client(Some(leader))?;
    let mut c_fan = f64::NAN;
    if wanted("fanout-100") {
        println!(
            "fanout-100: {} changes, 100 watchers each",
            params.fanout_rounds
        );
        c_fan = fanout_causeway(&admin, &fed_client, params.fanout_rounds).await?;
        let e_fan = fanout_etcd(&etcd, etcd_leader, &etcd_kv, params.fanout_rounds).await?;
        report.add("fanout-100", "causeway", "p99_ms", c_fan);
        report.add("fanout-100", "etcd", "p99_ms", e_fan);
    }
    etcd.stop().await;
    if !wanted("scale-1000sites") {
        fed.shutdown().await;
        return finish(report, causeway_rate, etcd_rate, c_fan, f64::NAN);
    }

    println!(
        "scale: {} sites x {} services",
        params.sites, params.services
    );
    let pid = fed.controller(leader).pid().unwrap_or(0);
    let base = rss_mb(pid)?;
    let t = Instant::now();
    load_sites(&fed, params.sites, params.services).await?;
    let load_s = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = rss_mb(pid)?;
    let case = format!("scale-{}sites", params.sites);
    report.add(&case, "causeway", "rss_mb", rss);
    report.add(&case, "causeway", "rss_baseline_mb", base);
    report.add(&case, "causeway", "load_s", load_s);
    let per_site = rss / params.sites as f64;

    println!("catchup: a new node joins and catches up");
    fed.reserve_controller(4)?;
    fed.spawn_controller(4, &[4], true)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut adm = admin.federation().await?;
    let want = adm
        .status(pb::StatusRequest {})
        .await?
        .into_inner()
        .revision;
    let t = Instant::now();
    adm.add_controller(pb::AddControllerRequest {
        id: 4,
        addr: fed.controller_addrs[&4].clone(),
    })
    .await?;
    // Caught up = the new node serves the leader's catalog revision.
    while fed.status(4).await.map(|s| s.revision).unwrap_or(0) < want {
        if t.elapsed() > Duration::from_secs(300) {
            anyhow::bail!("node 4 did not catch up within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let catchup = t.elapsed().as_secs_f64();
    report.add(
        &format!("catchup-{}sites", params.sites),
        "causeway",
        "s",
        catchup,
    );
    fed.shutdown().await;
    finish(report, causeway_rate, etcd_rate, c_fan, per_site)
}

/// The suite's checks (an input from a skipped case reads NaN).
fn finish(
    report: &mut Report,
    causeway_rate: f64,
    etcd_rate: f64,
    c_fan: f64,
    per_site: f64,
) -> anyhow::Result<()> {
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    report.check(
        "p99 commit causeway/etcd",
        ratio(
            report
                .get("write-1client", "causeway", "p99_us")
                .unwrap_or(f64::NAN),
            report
                .get("write-1client", "etcd", "p99_us")
                .unwrap_or(f64::NAN),
        ),
        "<= 1.0",
    );
    report.check(
        "writes/s causeway/etcd (64 clients)",
        ratio(causeway_rate, etcd_rate),
        ">= 1.0",
    );
    report.check("fanout-100 p99 ms (causeway)", c_fan, "< 100");
    report.check("rss MB per site (causeway)", per_site, "<= 2.0");
    Ok(())
}

/// Runs `clients` loops of `op` for `dur`; successful operations per second.
async fn saturate<F, Fut>(clients: usize, dur: Duration, op: F) -> f64
where
    F: Fn(u32) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (done, stop, op) = (done.clone(), stop.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = c as u32;
            while !stop.load(Ordering::Relaxed) {
                if op(i).await {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                i = i.wrapping_add(clients as u32);
            }
        }));
    }
    let t = Instant::now();
    tokio::time::sleep(dur).await;
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed);
    let secs = t.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    n as f64 / secs
}

async fn fanout_causeway(
    admin: &ControllerClient,
    writer: &causeway_api::pb::federation_client::FederationClient<tonic::transport::Channel>,
    rounds: usize,
) -> anyhow::Result<f64> {
    let ch = admin.channel().await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let mut streams = Vec::new();
    for _ in 0..100 {
        let mut c = causeway_api::pb::federation_client::FederationClient::new(ch.clone());
        let rev = c.status(pb::StatusRequest {}).await?.into_inner().revision;
        let mut s = c
            .watch(pb::WatchRequest {
                from_revision: rev,
                ..Default::default()
            })
            .await?
            .into_inner();
        let tx = tx.clone();
        streams.push(tokio::spawn(async move {
            while let Some(Ok(_ev)) = s.next().await {
                let _ = tx.send(Instant::now());
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    while rx.try_recv().is_ok() {}
    let mut samples = Vec::new();
    for r in 0..rounds {
        let mut w = writer.clone();
        let t = Instant::now();
        w.publish_exports(pb::PublishExportsRequest {
            site: "bench".into(),
            exports: export_set(1, 1_000_000 + r as u32),
            tunnel_addrs: vec![],
        })
        .await?;
        for _ in 0..100 {
            let at = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await?
                .unwrap_or(t);
            samples.push(at.duration_since(t).as_secs_f64() * 1e3);
        }
    }
    for s in streams {
        s.abort();
    }
    Ok(percentile(&mut samples, 99.0))
}

async fn fanout_etcd(
    etcd: &Etcd,
    leader: usize,
    kv: &crate::pb::etcd::kv_client::KvClient<tonic::transport::Channel>,
    rounds: usize,
) -> anyhow::Result<f64> {
    let ch = etcd.channel(leader).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let mut streams = Vec::new();
    for _ in 0..100 {
        let mut w = WatchClient::new(ch.clone());
        let (req_tx, req_rx) = tokio::sync::mpsc::channel(1);
        req_tx
            .send(WatchRequest {
                request_union: Some(crate::pb::etcd::watch_request::RequestUnion::CreateRequest(
                    WatchCreateRequest {
                        key: b"fanout".to_vec(),
                        ..Default::default()
                    },
                )),
            })
            .await?;
        let mut s = w
            .watch(tokio_stream::wrappers::ReceiverStream::new(req_rx))
            .await?
            .into_inner();
        let tx = tx.clone();
        streams.push(tokio::spawn(async move {
            let _keep = req_tx;
            while let Some(Ok(resp)) = s.next().await {
                if !resp.events.is_empty() {
                    let _ = tx.send(Instant::now());
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut samples = Vec::new();
    for r in 0..rounds {
        let mut k = kv.clone();
        let t = Instant::now();
        k.put(PutRequest {
            key: b"fanout".to_vec(),
            value: format!("{r}").into_bytes(),
            ..Default::default()
        })
        .await?;
        for _ in 0..100 {
            let at = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await?
                .unwrap_or(t);
            samples.push(at.duration_since(t).as_secs_f64() * 1e3);
        }
    }
    for s in streams {
        s.abort();
    }
    Ok(percentile(&mut samples, 99.0))
}

async fn load_sites(fed: &LocalFederation, sites: usize, services: usize) -> anyhow::Result<()> {
    let names: Vec<String> = (0..sites).map(|i| format!("sim-{i}")).collect();
    let stream = futures::stream::iter(names.into_iter().map(|name| async move {
        let site = join(fed, &name).await?;
        let client = site.controller_client();
        let mut c = client.federation().await?;
        c.publish_exports(pb::PublishExportsRequest {
            site: name.clone(),
            exports: export_set(services, 1),
            tunnel_addrs: vec!["127.0.0.1:9".into()],
        })
        .await?;
        Ok::<(), anyhow::Error>(())
    }));
    let results: Vec<_> =
        futures::StreamExt::collect(futures::StreamExt::buffer_unordered(stream, 16)).await;
    for r in results {
        r?;
    }
    Ok(())
}

/// The Prometheus text of an admin port.
async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}
