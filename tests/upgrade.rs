//! Rolling upgrades between two real builds: the previous release (pinned
//! in release/PREVIOUS, built from git history by scripts/previous-build)
//! and this commit. A federation runs the old build, then its controllers
//! and then its gateways are replaced one process at a time under steady
//! cross-site HTTP load and a stream of writes; one gateway is then
//! downgraded. No request fails and no acknowledged write is lost.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use causeway::local::Proc;
use common::*;

/// The previous release's binary (built on first use).
fn previous_build() -> PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(root.join("scripts/previous-build"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building the previous release failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Steady HTTP load through a site's gateway replicas, the way callers in
/// a cluster reach them through a Service: each request goes to one of the
/// replicas currently listed as ready, on a connection of its own. A
/// replica is taken out of the list before it is stopped (as Kubernetes
/// takes a terminating pod out of a Service's endpoints).
struct Load {
    fronts: Mutex<Vec<SocketAddr>>,
    ok: AtomicU64,
    failed: Mutex<Vec<String>>,
    /// Requests finished per worker.
    done: Vec<AtomicU64>,
    stop: AtomicBool,
    /// What the test is doing now, recorded with each failure.
    phase: Mutex<String>,
    started: Instant,
}

const WORKERS: usize = 4;

impl Load {
    /// Starts the workers sending `method` requests.
    fn start(
        fronts: Vec<SocketAddr>,
        method: &'static str,
    ) -> (Arc<Self>, Vec<tokio::task::JoinHandle<()>>) {
        let load = Arc::new(Load {
            fronts: Mutex::new(fronts),
            ok: AtomicU64::new(0),
            failed: Mutex::new(Vec::new()),
            done: (0..WORKERS).map(|_| AtomicU64::new(0)).collect(),
            stop: AtomicBool::new(false),
            phase: Mutex::new("start".into()),
            started: Instant::now(),
        });
        let tasks = (0..WORKERS)
            .map(|w| {
                let load = load.clone();
                tokio::spawn(async move {
                    let mut n = w;
                    while !load.stop.load(Ordering::Relaxed) {
                        let front = {
                            let f = load.fronts.lock().unwrap();
                            f[n % f.len()]
                        };
                        n += 1;
                        match call(front, method).await {
                            Ok(()) => {
                                load.ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                let phase = load.phase.lock().unwrap().clone();
                                let at = load.started.elapsed().as_secs_f64();
                                load.failed
                                    .lock()
                                    .unwrap()
                                    .push(format!("{at:.1}s ({phase}) {front}: {e}"))
                            }
                        }
                        load.done[w].fetch_add(1, Ordering::Relaxed);
                        // About 100 requests a second over all workers.
                        tokio::time::sleep(Duration::from_millis(40)).await;
                    }
                })
            })
            .collect();
        (load, tasks)
    }

    /// Takes `front` out of the ready list and waits until no request to
    /// it can still be in flight: every worker has finished one request it
    /// began after the change.
    async fn remove(&self, front: SocketAddr) {
        self.fronts.lock().unwrap().retain(|f| *f != front);
        assert!(!self.fronts.lock().unwrap().is_empty());
        let seen: Vec<u64> = self
            .done
            .iter()
            .map(|d| d.load(Ordering::Relaxed))
            .collect();
        eventually(
            Duration::from_secs(20),
            format_args!("every load worker to move off {front}"),
            async || {
                self.done
                    .iter()
                    .zip(&seen)
                    .all(|(d, s)| d.load(Ordering::Relaxed) >= s + 2)
            },
        )
        .await;
    }

    fn phase(&self, what: &str) {
        tracing::info!("phase: {what}");
        *self.phase.lock().unwrap() = what.to_string();
    }

    fn add(&self, front: SocketAddr) {
        self.fronts.lock().unwrap().push(front);
    }

    /// Stops the workers and fails the test if any request failed;
    /// returns the number answered.
    async fn finish(&self, tasks: Vec<tokio::task::JoinHandle<()>>) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        let ok = self.ok.load(Ordering::Relaxed);
        let failed = self.failed.lock().unwrap().clone();
        assert!(
            failed.is_empty(),
            "{} of {} requests failed: {:?}",
            failed.len(),
            ok as usize + failed.len(),
            &failed[..failed.len().min(20)]
        );
        ok
    }

    /// Waits until `n` more requests have been answered (the load goes on
    /// through whatever just changed).
    async fn more(&self, n: u64) {
        let from = self.ok.load(Ordering::Relaxed);
        eventually(
            Duration::from_secs(30),
            format_args!("{n} more answered requests"),
            async || self.ok.load(Ordering::Relaxed) >= from + n,
        )
        .await;
    }
}

/// One request on a connection of its own; `Ok` on a 200 from a backend.
async fn call(front: SocketAddr, method: &str) -> Result<(), String> {
    let go = async {
        let mut s = tokio::net::TcpStream::connect(front)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let head = format!(
            "{method} / HTTP/1.1\r\nhost: web\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        s.write_all(head.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let status = answer.lines().next().unwrap_or("").to_string();
        if status.starts_with("HTTP/1.1 200")
            && (answer.ends_with("east") || answer.ends_with("south"))
        {
            Ok(())
        } else {
            Err(format!("answer {answer:?}"))
        }
    };
    tokio::time::timeout(Duration::from_secs(10), go)
        .await
        .unwrap_or_else(|_| Err("no answer within 10 s".into()))
}

/// A TimeoutPolicy per write, each with its own name.
fn write_doc(n: u64) -> String {
    serde_json::json!({
        "apiVersion": "causeway.dev/v1alpha1",
        "kind": "TimeoutPolicy",
        "metadata": {"name": format!("w{n}"), "namespace": "upgrade"},
        "spec": {"service": "web", "requestMs": 1000 + n},
    })
    .to_string()
}

/// Stops process `p` the way Kubernetes stops a pod: SIGTERM, then
/// SIGKILL if it is still running after `grace`. Whether it exited by
/// itself, and cleanly.
async fn stop(p: &mut Proc, what: &str, grace: Duration) -> bool {
    p.terminate();
    let exited = until(
        grace,
        format_args!("{what} to exit after SIGTERM"),
        async || p.exited(),
    )
    .await;
    match exited {
        Ok(status) => status.success(),
        Err(e) => {
            tracing::warn!("{e}; SIGKILL");
            p.kill().await;
            false
        }
    }
}

/// Replaces a calling gateway replica serving `front` with `bin`, the way
/// a rolling update does: out of the ready list, stopped, started again,
/// back in once it listens; then the load goes on through it.
async fn swap(load: &Load, p: &mut Proc, front: SocketAddr, bin: &std::path::Path) {
    load.remove(front).await;
    assert!(stop(p, &format!("the gateway at {front}"), GATEWAY_GRACE).await);
    p.start(bin).unwrap();
    wait_listening(front).await;
    load.add(front);
    load.more(50).await;
}

/// A gateway drains for up to `drain_secs` (10 s by default).
const GATEWAY_GRACE: Duration = Duration::from_secs(20);
/// Kubernetes' default termination grace period is 30 s; a controller of
/// this build stops in about two (the previous release waited for its
/// watch streams, which never end by themselves).
const CONTROLLER_GRACE: Duration = Duration::from_secs(10);

/// Waits until controller `id` serves again and has applied what the
/// leader had committed when it came back.
async fn caught_up(fed: &LocalFederation, id: u64) {
    let target = eventually(Duration::from_secs(30), "a leader to answer", async || {
        let leader = fed.wait_for_leader(Duration::from_secs(5)).await?;
        fed.status(leader).await.map(|s| s.last_log_index)
    })
    .await;
    eventually(
        Duration::from_secs(60),
        format_args!("controller {id} to apply index {target}"),
        async || {
            let s = fed.status(id).await.map_err(|e| e.to_string())?;
            if s.applied_index >= target && (s.role == "follower" || s.role == "leader") {
                Ok(s)
            } else {
                Err(format!("{} applied {}", s.role, s.applied_index))
            }
        },
    )
    .await;
}

/// `causeway check --output json` (this build) against the controllers:
/// the `versions` finding.
fn versions_check(fed: &LocalFederation) -> serde_json::Value {
    let endpoints = fed.endpoints().join(",");
    let creds = fed.creds.display().to_string();
    let (_, out) = run_bin(&[
        "check",
        "--creds",
        &creds,
        "--controller",
        &endpoints,
        "--output",
        "json",
    ]);
    let start = out.find('{').unwrap_or(0);
    let v: serde_json::Value = serde_json::Deserializer::from_str(&out[start..])
        .into_iter()
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("check printed no JSON:\n{out}"));
    v["checks"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["check"] == "versions").cloned())
        .unwrap_or_else(|| panic!("no versions finding:\n{out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federation_upgrades_one_process_at_a_time_with_no_failed_request() {
    init_tracing();
    let old = previous_build();
    let new = bin();
    let tmp = tempfile::tempdir().unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut fed = LocalFederation::new(old.clone(), tmp.path().to_path_buf()).unwrap();

    tracing::info!("phase: the previous release runs everything");
    // Snapshots every 10 entries: upgraded nodes start from snapshots the
    // old release wrote, and the writes below take many more.
    fed.controller_flags = vec!["--snapshot-every".into(), "10".into()];
    fed.start_controllers(3).unwrap();
    fed.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    let (east_web, _east_task) = http_backend("127.0.0.1:0", "east").await;
    let (south_web, _south_task) = http_backend("127.0.0.1:0", "south").await;
    for (site, web) in [("east", east_web), ("south", south_web)] {
        fed.add_site(site, &vip_range(), &[]).await.unwrap();
        add_exports_and_restart(&mut fed, site, &web_http_export(web)).await;
    }
    fed.add_site("west", &vip_range(), &[]).await.unwrap();
    // Idempotent requests are retried when a connection breaks under them:
    // a gateway that stops cuts the tunnel streams still open at the end
    // of its drain, and requests on them then (a 0.1.0 caller keeps using
    // its pooled connections to a draining gateway) are sent again.
    apply_policies(
        &fed,
        tmp.path(),
        "apiVersion: causeway.dev/v1alpha1\nkind: RetryPolicy\nmetadata: {name: retry, namespace: shop}\nspec: {service: web, attempts: 2, on: [connect-failure, reset, gateway-error]}\n",
    )
    .await;
    // West runs two replicas, each with its own VIP range: callers reach
    // the one that is up.
    let west_range_1 = vip_range();
    let gw1_tunnel: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let gw1_admin: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let range_1 = west_range_1.clone();
    let mut west_1 = fed
        .spawn_gateway_replica_with("west", "gw-1", gw1_tunnel, gw1_admin, move |c| {
            c.vip_range = range_1
        })
        .unwrap();
    let front_0 = imported(&fed, "west", "web.shop.svc.clusterset.local", 8080).await;
    // The same service's VIP in the second replica's range: the same
    // offset from its base.
    let base = |range: &str| -> u32 {
        let ip: std::net::Ipv4Addr = range.split('/').next().unwrap().parse().unwrap();
        u32::from(ip)
    };
    let IpAddr::V4(v0) = front_0.ip() else {
        panic!("an IPv4 VIP")
    };
    let offset = u32::from(v0) - base(&fed.sites["west"].vip_range);
    let front_1 = SocketAddr::new(
        std::net::Ipv4Addr::from(base(&west_range_1) + offset).into(),
        8080,
    );
    wait_listening(front_1).await;
    for front in [front_0, front_1] {
        eventually(
            Duration::from_secs(30),
            format_args!("a request through {front} to be answered"),
            async || call(front, "GET").await,
        )
        .await;
    }
    let before = fed.status(1).await.unwrap();
    assert_eq!(before.version, "", "the previous release does not say");

    tracing::info!("phase: steady load and writes begin");
    let (load, load_tasks) = Load::start(vec![front_0, front_1], "GET");
    let admin = Arc::new(fed.admin_client(None).unwrap());
    let acked = Arc::new(Mutex::new(Vec::<u64>::new()));
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (admin, acked, writing) = (admin.clone(), acked.clone(), writing.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while writing.load(Ordering::Relaxed) {
                // An error (a leader restarting) leaves the outcome open:
                // only acknowledged writes are checked.
                if apply_policy(&admin, write_doc(n)).await.is_ok() {
                    acked.lock().unwrap().push(n);
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    load.more(50).await;

    load.phase("controllers, one at a time");
    for id in 1..=3 {
        eventually(
            Duration::from_secs(30),
            format_args!("controller {id} (previous release) to have taken a snapshot"),
            async || fed.status(id).await.is_ok_and(|s| s.snapshot_index > 0),
        )
        .await;
    }
    for id in 1..=3 {
        load.phase(&format!("controller {id} to this build"));
        // 0.1.0 controllers are stopped with SIGKILL (docs/operations.md,
        // Upgrades): on SIGTERM a leader kept leading while it took no new
        // connection, and sites' leases lapsed. Their data is fsynced.
        fed.controller(id).kill().await;
        fed.controller(id).start(&new).unwrap();
        let s = {
            caught_up(&fed, id).await;
            fed.status(id).await.unwrap()
        };
        assert_eq!(s.version, causeway_api::version::VERSION);
        assert_eq!(s.protocol, causeway_api::version::PROTOCOL);
        if id == 1 {
            // Old and new side by side: check says an upgrade is under way.
            let v = versions_check(&fed);
            assert_eq!(v["result"], "warn", "{v}");
            assert!(
                v["detail"]
                    .as_str()
                    .unwrap()
                    .contains("before 0.2.0 on 2, 3"),
                "{v}"
            );
        }
        load.more(30).await;
    }
    let v = versions_check(&fed);
    assert_eq!(v["result"], "ok", "{v}");
    fed.bin = new.clone();
    load.phase("controller 2 restarted gracefully");
    // This build's controllers stop by themselves on SIGTERM.
    assert!(
        stop(fed.controller(2), "controller 2", CONTROLLER_GRACE).await,
        "an upgraded controller needed SIGKILL:\n{}",
        fed.controller(2).log_tail(20)
    );
    fed.controller(2).start(&new).unwrap();
    caught_up(&fed, 2).await;
    load.more(30).await;

    for site in ["east", "south"] {
        load.phase(&format!("{site}'s gateway and DNS server to this build"));
        let s = fed.sites.get_mut(site).unwrap();
        assert!(stop(&mut s.gateway, &format!("{site}'s gateway"), GATEWAY_GRACE).await);
        s.gateway.start(&new).unwrap();
        s.dns_proc.kill().await;
        s.dns_proc.start(&new).unwrap();
        // Before the next site goes down, this one is ready to take its
        // traffic (while it was down, the other site served everything).
        let admin_addr = fed.sites[site].gateway_admin;
        eventually(
            Duration::from_secs(30),
            format_args!("{site}'s new gateway to be ready"),
            async || ready(admin_addr).await,
        )
        .await;
        load.more(30).await;
    }

    load.phase("west gw-0 to this build");
    load.remove(front_0).await;
    {
        let s = fed.sites.get_mut("west").unwrap();
        assert!(stop(&mut s.gateway, "west gw-0", GATEWAY_GRACE).await);
        s.gateway.start(&new).unwrap();
        s.dns_proc.kill().await;
        s.dns_proc.start(&new).unwrap();
    }
    wait_listening(front_0).await;
    load.add(front_0);
    load.more(30).await;
    load.phase("west gw-1 to this build");
    swap(&load, &mut west_1, front_1, &new).await;
    // The upgraded DNS server answers for the service.
    let vip = fed
        .wait_resolvable(
            "west",
            "web.shop.svc.clusterset.local",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(vip, front_0.ip());

    load.phase("west gw-1 back to the previous release");
    swap(&load, &mut west_1, front_1, &old).await;
    load.phase("east's gateway back to the previous release");
    {
        let s = fed.sites.get_mut("east").unwrap();
        assert!(stop(&mut s.gateway, "east's gateway", GATEWAY_GRACE).await);
        s.gateway.start(&old).unwrap();
    }
    // While it was down south served everything: the upgraded south.
    let admin_addr = fed.sites["east"].gateway_admin;
    eventually(
        Duration::from_secs(30),
        "east's downgraded gateway to be ready",
        async || ready(admin_addr).await,
    )
    .await;
    load.more(50).await;
    // And the downgraded east serves what the others send it: with south
    // stopped, everything goes there.
    load.phase("south stopped: everything to the downgraded east");
    {
        let s = fed.sites.get_mut("south").unwrap();
        assert!(stop(&mut s.gateway, "south's gateway", GATEWAY_GRACE).await);
    }
    load.more(50).await;
    fed.sites
        .get_mut("south")
        .unwrap()
        .gateway
        .start(&new)
        .unwrap();

    load.phase("done: nothing failed, nothing acknowledged was lost");
    writing.store(false, Ordering::Relaxed);
    let ok = load.finish(load_tasks).await;
    writer.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 20,
        "only {} writes acknowledged",
        acked.len()
    );
    let listed = policies_of_kind(&admin, "TimeoutPolicy").await.unwrap();
    let names: std::collections::BTreeSet<String> = listed
        .iter()
        .filter(|p| p.namespace == "upgrade")
        .map(|p| p.name.clone())
        .collect();
    let lost: Vec<u64> = acked
        .iter()
        .copied()
        .filter(|n| !names.contains(&format!("w{n}")))
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    tracing::info!(
        requests = ok,
        writes = acked.len(),
        "upgrade and downgrade done"
    );
    west_1.kill().await;
    fed.shutdown().await;
}

/// Whether a gateway's admin port says it is ready.
async fn ready(admin: SocketAddr) -> bool {
    let look = async {
        let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
        s.write_all(b"GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        Some(out.starts_with("HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), look).await,
        Ok(Some(true))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_replica_moves_its_callers_to_the_others_without_a_failed_request() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    // Long enough that a drain held up by its callers would hit it.
    fed.gateway_base.drain_secs = 60.0;
    let (web, _web_task) = http_backend("127.0.0.1:0", "east").await;
    fed.add_site("east", &vip_range(), &[]).await.unwrap();
    add_exports_and_restart(&mut fed, "east", &web_http_export(web)).await;
    fed.add_site("west", &vip_range(), &[]).await.unwrap();

    tracing::info!("phase: east runs two replicas");
    let gw0 = fed.sites["east"].tunnel;
    let gw1: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let gw1_admin: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    fed.set_tunnel_advertise("east", &[gw0.to_string(), gw1.to_string()])
        .await
        .unwrap();
    let mut replica = fed
        .spawn_gateway_replica("east", "gw-1", gw1, gw1_admin)
        .unwrap();
    let front = imported(&fed, "west", "web.shop.svc.clusterset.local", 8080).await;
    eventually(
        Duration::from_secs(30),
        "a request through west to be answered",
        async || call(front, "POST").await,
    )
    .await;

    tracing::info!("phase: steady POSTs (never retried) while a replica drains and exits");
    let (load, tasks) = Load::start(vec![front], "POST");
    load.more(50).await;
    // The replica carrying west's pooled connections drains (they stay on
    // the tunnel their first stream took).
    let gw0_admin = fed.sites["east"].gateway_admin;
    let on_gw0 = eventually(
        Duration::from_secs(30),
        "west's streams on one of east's replicas",
        async || {
            let (a, b) = (opened_in(gw0_admin).await, opened_in(gw1_admin).await);
            (a + b > 0.0).then_some(a > 0.0)
        },
    )
    .await;
    load.phase("east's busy replica draining");
    let (draining, name) = if on_gw0 {
        (&mut fed.sites.get_mut("east").unwrap().gateway, "east gw-0")
    } else {
        (&mut replica, "east gw-1")
    };
    assert!(stop(draining, name, Duration::from_secs(90)).await);
    // Its callers let go of its streams: the drain ended with none cut.
    let log = draining.log_tail(40);
    assert!(log.contains("drained"), "{log}");
    assert!(!log.contains("drain deadline passed"), "{log}");
    load.more(50).await;
    load.phase("done");
    load.finish(tasks).await;
    // West heard the notice.
    let metrics = http_get(fed.sites["west"].gateway_admin, "/metrics").await;
    assert!(
        metric(&metrics, "causeway_drain_notices_total{result=\"heard\"}") >= 1.0,
        "{metrics}"
    );
    replica.kill().await;
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_gateway_shares_the_vips_of_the_one_it_replaces() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    fed.gateway_base.share_listeners = true;
    let (web, _web_task) = http_backend("127.0.0.1:0", "east").await;
    fed.add_site("east", &vip_range(), &[]).await.unwrap();
    add_exports_and_restart(&mut fed, "east", &web_http_export(web)).await;
    fed.add_site("west", &vip_range(), &[]).await.unwrap();
    let front = imported(&fed, "west", "web.shop.svc.clusterset.local", 8080).await;

    tracing::info!("phase: a second west gateway binds the same VIPs beside the first");
    let tunnel: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let mut next = fed
        .spawn_gateway_replica("west", "gw-next", tunnel, admin)
        .unwrap();
    // Ready means every outbound listener is bound (an address in use
    // would keep it unready and say so).
    eventually(
        Duration::from_secs(30),
        "the second gateway to be ready with its listeners bound",
        async || ready(admin).await,
    )
    .await;
    let metrics = http_get(admin, "/metrics").await;
    assert!(
        metric(&metrics, "causeway_outbound_listeners") >= 1.0,
        "{metrics}"
    );

    tracing::info!("phase: the first drains and exits; the VIP still answers");
    let first = &mut fed.sites.get_mut("west").unwrap().gateway;
    assert!(stop(first, "the first west gateway", GATEWAY_GRACE).await);
    for _ in 0..20 {
        call(front, "GET").await.unwrap();
    }
    next.kill().await;
    fed.shutdown().await;
}
