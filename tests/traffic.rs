//! Traffic policies end to end: validated, stored in Raft, streamed to
//! gateways, and followed by connections (failover, splits).

mod common;

use common::*;

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
            ..Default::default()
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
    eventually(
        Duration::from_secs(20),
        "the policies to be listed again after the restart",
        async || equals(list(&fed).await, &got),
    )
    .await;

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
    // Calls may fail while a policy change propagates (e.g. a widened
    // AuthorizationPolicy): wait for all ten to land on `site`.
    eventually(
        Duration::from_secs(30),
        format_args!("{what}: all of 10 calls answered by {site}"),
        async || {
            let (e, w, f) = banner_counts(target, 10).await;
            let got = if site == "east" { e } else { w };
            (got == 10)
                .then_some(())
                .ok_or_else(|| format!("east {e} / west {w} / failed {f} of 10"))
        },
    )
    .await;
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
    // The gateway reports RTTs once a second.
    let out = eventually(
        Duration::from_secs(20),
        "RTTs from the gateway",
        async || {
            let out = explain().await.unwrap();
            if out.contains("rtt unknown") {
                Err(out)
            } else {
                Ok(out)
            }
        },
    )
    .await;
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
    eventually(
        Duration::from_secs(30),
        "the split to take effect (a call to east)",
        async || banner_counts(target, 10).await.0 > 0,
    )
    .await;
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
    let out = eventually(
        Duration::from_secs(20),
        "west to report healthy 0/1",
        async || {
            let out = explain().await.unwrap();
            if out.contains("healthy 0/1") {
                Ok(out)
            } else {
                Err(out)
            }
        },
    )
    .await;
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
    eventually(
        Duration::from_secs(30),
        "central's calls to be refused",
        async || call_banner(target, "x").await.is_err(),
    )
    .await;
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
    eventually(
        Duration::from_secs(30),
        "traffic to settle on east (20 requests in a row)",
        async || {
            let mut c = HttpClient::connect(target).await;
            let mut all_east = true;
            for _ in 0..20 {
                all_east &= c.get("/").await.2 == "east";
            }
            all_east
        },
    )
    .await;

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
    let back = eventually(
        Duration::from_secs(45),
        "traffic to return to east",
        async || {
            log.lock()
                .unwrap()
                .iter()
                .find(|(at, g)| *at >= restored && *g == Got::Site("east".into()))
                .map(|(at, _)| *at)
        },
    )
    .await;
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
