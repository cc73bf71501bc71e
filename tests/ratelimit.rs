//! RateLimit end to end: the exporting gateway counts requests (HTTP) and
//! new connections (L4) in token buckets per service, per calling site and
//! per route, and refuses the rest — 429 with `retry-after` for HTTP, a
//! refused stream for L4. Counts are checked against what a bucket can
//! allow over the time the test measured, never against a clock alone.

mod common;

use common::l7::*;
use common::*;

fn limits(rules: &str) -> String {
    format!("apiVersion: causeway.dev/v1alpha1\nkind: RateLimit\nmetadata: {{name: web, namespace: shop}}\nspec:\n  service: web\n  limits:\n{rules}")
}

/// `(allowed, refused)` of `n` requests to `path`, sent one after another
/// at `per_second` (0: as fast as they go); every refusal must be a 429
/// with `retry-after` naming `limit`. Also the seconds the run took.
async fn send(
    c: &mut Client,
    path: &str,
    n: usize,
    per_second: u32,
    limit: &str,
) -> (u32, u32, f64) {
    let start = Instant::now();
    let (mut ok, mut refused) = (0, 0);
    for i in 0..n {
        if per_second > 0 {
            // Pace: request i goes out at i / per_second.
            let due = start + Duration::from_secs_f64(i as f64 / f64::from(per_second));
            tokio::time::sleep_until(due.into()).await;
        }
        let a = c.get(path, &[]).await;
        match a.status {
            200 => ok += 1,
            429 => {
                assert_eq!(a.header("x-causeway-error"), "rate-limited");
                assert_eq!(a.header("x-causeway-limit"), limit);
                let secs: u64 = a
                    .header("retry-after")
                    .parse()
                    .expect("retry-after seconds");
                assert!(secs >= 1, "retry-after {secs}");
                refused += 1;
            }
            other => panic!("unexpected answer {other}: {}", a.body),
        }
    }
    (ok, refused, start.elapsed().as_secs_f64())
}

/// What a bucket of `rate`/s and `burst` may allow over `secs`: at most
/// the burst plus what refills; when demand outruns the rate, at least
/// what refills (less one for each end of the window).
fn assert_fits(allowed: u32, rate: f64, burst: u32, secs: f64, what: &str) {
    let most = f64::from(burst) + rate * secs + 1.0;
    // The bucket may start anywhere from empty to full.
    let least = rate * secs - 2.0;
    assert!(
        f64::from(allowed) <= most && f64::from(allowed) >= least,
        "{what}: {allowed} allowed in {secs:.2} s; a bucket of {rate}/s, burst {burst} allows {least:.1}..={most:.1}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_over_a_limit_get_429_per_service_per_site_and_per_route() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (web, _) = backend("web", Mode::Answer).await;
    for site in ["east", "central", "north"] {
        fed.add_site(site, &vip_range(), &[]).await.unwrap();
    }
    add_exports_and_restart(&mut fed, "east", &versioned_export(&[(web, "v1")])).await;
    let central = imported(&fed, "central", "web.shop.svc.clusterset.local", 8080).await;
    let north = imported(&fed, "north", "web.shop.svc.clusterset.local", 8080).await;
    let mut c = Client::connect(central, false).await;
    eventually(Duration::from_secs(30), "web to answer", async || {
        equals(c.get("/", &[]).await.status, &200)
    })
    .await;

    tracing::info!("phase: one bucket per calling site, 10/s with a burst of 5, on /checkout only");
    apply_policies(
        &fed,
        tmp.path(),
        &limits(
            "  - {name: checkout, requestsPerSecond: 10, burst: 5, per: site, matches: [{path: {type: PathPrefix, value: /checkout}}]}\n",
        ),
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the limit to apply at east",
        async || {
            let mut refused = false;
            for _ in 0..20 {
                refused |= c.get("/checkout", &[]).await.status == 429;
            }
            refused.then_some(()).ok_or("no 429 yet")
        },
    )
    .await;
    let explain = fed.ctl(&["explain", "shop/web"]).await.unwrap();
    assert!(
        explain.contains("checkout: 10 requests/s, burst 5, a bucket per calling site, at each exporting gateway, on path prefix /checkout"),
        "{explain}"
    );
    // Other paths are not limited.
    let (ok, refused, _) = send(&mut c, "/browse", 200, 0, "checkout").await;
    assert_eq!((ok, refused), (200, 0));
    // 40/s for 3 s from each site over HTTP/1.1 and HTTP/2: each site's
    // own bucket allows about 10/s.
    for h2 in [false, true] {
        let mut a = Client::connect(central, h2).await;
        let mut b = Client::connect(north, h2).await;
        let (ra, rb) = tokio::join!(
            send(&mut a, "/checkout/pay", 120, 40, "checkout"),
            send(&mut b, "/checkout/pay", 120, 40, "checkout"),
        );
        for (site, (ok, refused, secs)) in [("central", ra), ("north", rb)] {
            assert_eq!(ok + refused, 120);
            assert_fits(ok, 10.0, 5, secs, &format!("{site} (h2 {h2})"));
            assert!(
                refused >= 30,
                "{site}: only {refused} refused at 4x the rate"
            );
        }
    }

    tracing::info!("phase: one bucket for the whole service, 20/s");
    apply_policies(
        &fed,
        tmp.path(),
        &limits("  - {name: all, requestsPerSecond: 20, burst: 20}\n"),
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the new limit to apply",
        async || {
            let mut limited = false;
            for _ in 0..40 {
                let a = c.get("/browse", &[]).await;
                limited |= a.status == 429 && a.header("x-causeway-limit") == "all";
            }
            limited.then_some(()).ok_or("no request limited by \"all\"")
        },
    )
    .await;
    let mut a = Client::connect(central, false).await;
    let mut b = Client::connect(north, true).await;
    let (ra, rb) = tokio::join!(
        send(&mut a, "/x", 150, 50, "all"),
        send(&mut b, "/x", 150, 50, "all"),
    );
    // Both sites draw from one bucket: together they get about 20/s.
    let secs = ra.2.max(rb.2);
    assert_fits(ra.0 + rb.0, 20.0, 20, secs, "central and north together");
    let m = http_get(fed.sites["east"].gateway_admin, "/metrics").await;
    let limited = metric(
        &m,
        r#"causeway_ratelimit_total{service="shop/web",limit="all",kind="request",result="limited"}"#,
    );
    assert!(
        limited >= f64::from(ra.1 + rb.1),
        "the metric counts {limited} refusals, the callers saw {}",
        ra.1 + rb.1
    );
    fed.shutdown().await;
}

/// A connections limit refuses the streams over it: the caller's
/// connection is closed without reaching an endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l4_connections_over_a_limit_are_refused_at_the_exporting_gateway() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (echo, _task) = echo_server(None).await.unwrap();
    fed.add_site(
        "east",
        &vip_range(),
        &[Export {
            service: "shop/echo".into(),
            port: 7000,
            endpoints: vec![echo],
        }],
    )
    .await
    .unwrap();
    fed.add_site("central", &vip_range(), &[]).await.unwrap();
    let target = imported(&fed, "central", "echo.shop.svc.clusterset.local", 7000).await;
    eventually(Duration::from_secs(20), "echo to answer", async || {
        equals(
            try_echo_roundtrip(target, b"ping").await.ok(),
            &Some(b"ping".to_vec()),
        )
    })
    .await;
    apply_policies(
        &fed,
        tmp.path(),
        "apiVersion: causeway.dev/v1alpha1\nkind: RateLimit\nmetadata: {name: echo, namespace: shop}\nspec:\n  service: echo\n  limits: [{name: conns, connectionsPerSecond: 5, burst: 5}]\n",
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "a connection to be refused",
        async || {
            let mut refused = false;
            for _ in 0..10 {
                refused |= try_echo_roundtrip(target, b"ping").await.is_err();
            }
            refused.then_some(()).ok_or("all connections passed")
        },
    )
    .await;
    // 20 connections per second for 3 s: about 5/s get through.
    let start = Instant::now();
    let (mut ok, mut refused) = (0u32, 0u32);
    for i in 0..60u32 {
        tokio::time::sleep_until((start + Duration::from_millis(u64::from(i) * 50)).into()).await;
        match try_echo_roundtrip(target, b"ping").await {
            Ok(b) if b == b"ping" => ok += 1,
            _ => refused += 1,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    assert_fits(ok, 5.0, 5, secs, "echo connections");
    assert!(refused >= 30, "only {refused} of 60 refused at 4x the rate");
    let m = http_get(fed.sites["east"].gateway_admin, "/metrics").await;
    let limited = metric(
        &m,
        r#"causeway_ratelimit_total{service="shop/echo",limit="conns",kind="connection",result="limited"}"#,
    );
    assert!(
        limited >= f64::from(refused),
        "{limited} counted, {refused} refused"
    );
    fed.shutdown().await;
}
