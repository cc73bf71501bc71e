//! HTTP services end to end: per-request routing, pooled upstream
//! connections, HTTP/2 endpoints and per-zone health.

mod common;

use common::*;

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
    eventually(Duration::from_secs(20), "web to answer 200", async || {
        equals(c.get("/").await.0, &200)
    })
    .await;

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
    eventually(
        Duration::from_secs(30),
        "the policies to reach the gateway (an injected fault in 100 requests)",
        async || {
            let mut c = HttpClient::connect(target).await;
            let mut seen_fault = false;
            for _ in 0..100 {
                seen_fault |= c.get("/").await.1 == "fault-injected";
            }
            seen_fault
        },
    )
    .await;
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
    // 1% by the split, plus any east try the RetryPolicy sent on to west:
    // on a loaded CI machine that added up to half a percent once (1.54%
    // of 17,978; the binomial spread alone is ±0.07%). The bound still
    // fails a split that is off (0%) or mis-weighted (several %).
    assert!(
        (0.7..=2.5).contains(&west_pct),
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
    let ok = eventually(
        Duration::from_secs(30),
        "the breaker to open (a burst of 12 with one shed)",
        async || {
            let burst: Vec<_> = (0..12)
                .map(|_| {
                    tokio::spawn(
                        async move { HttpClient::connect(target).await.get("/slow").await },
                    )
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
            (shed > 0).then_some(ok)
        },
    )
    .await;
    assert!(ok >= 2, "the breaker let through only {ok}");
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
    let (mut east, mut west) = (0, 0);
    eventually(
        Duration::from_secs(30),
        "one HTTP/2 connection to spread (20 answers from each site)",
        async || {
            for _ in 0..10 {
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
            (east >= 20 && west >= 20)
                .then_some(())
                .ok_or_else(|| format!("east {east}, west {west}"))
        },
    )
    .await;
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
    let want = serde_json::json!([
        {"zone": "zone-a", "healthy": 1, "total": 1},
        {"zone": "zone-b", "healthy": 0, "total": 1}
    ]);
    let east = eventually(
        Duration::from_secs(20),
        "east's zones to show in ctl services",
        async || {
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
            equals(zones, &Some(want.clone()))?;
            Ok::<_, String>(east)
        },
    )
    .await;
    assert_eq!(east.unwrap()["total_endpoints"], 2);
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
