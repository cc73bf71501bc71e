//! Layer-7 routing end to end: endpoint versions as subsets, HTTPRoute
//! rules (headers, paths, the calling site, weights, rewrites, redirects,
//! fixed answers), a blue/green switch under load, and mirroring — with
//! HTTP/1.1 and HTTP/2 callers.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::l7::*;
use common::*;

fn route(name: &str, rules: &str) -> String {
    format!("apiVersion: causeway.dev/v1alpha1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  service: web\n  rules:\n{rules}")
}

/// Versions publish as subsets (`ctl services`), and an HTTPRoute sends
/// requests by header, by the calling site's region, by path (rewritten),
/// by weight (a 1% canary), to a subset at a named site; redirects and
/// fixed answers come from the gateway — for HTTP/1.1 and HTTP/2 callers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subsets_and_http_routes_send_each_request_where_its_rule_says() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (v1, _) = backend("v1", Mode::Answer).await;
    let (v2, _) = backend("v2", Mode::Answer).await;
    let (west_v2, _) = backend("west-v2", Mode::Answer).await;
    for site in ["east", "west", "central", "north"] {
        fed.add_site(site, &vip_range(), &[]).await.unwrap();
    }
    add_exports_and_restart(
        &mut fed,
        "east",
        &versioned_export(&[(v1, "v1"), (v2, "v2")]),
    )
    .await;
    add_exports_and_restart(&mut fed, "west", &versioned_export(&[(west_v2, "v2")])).await;
    fed.ctl(&["cluster", "set-labels", "north", "--label", "region=eu"])
        .await
        .unwrap();

    // Subsets reach the catalog.
    eventually(
        Duration::from_secs(20),
        "subsets in ctl services",
        async || {
            let text = fed.ctl(&["services"]).await.unwrap();
            (text.contains("east(2: subset=v1 1/1, subset=v2 1/1)")
                && text.contains("west(1: subset=v2 1/1)"))
            .then_some(())
            .ok_or(text)
        },
    )
    .await;

    apply_policies(
        &fed,
        tmp.path(),
        &route(
            "web",
            r#"
  - name: beta-users
    matches: [{headers: [{name: X-User, type: RegularExpression, value: "alice|bob"}]}]
    backendRefs: [{subset: v2}]
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-route, value: beta}]}}
    - {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-rule, value: beta-users}]}}
  - name: west-pinned
    matches: [{headers: [{name: x-site, value: west}]}]
    backendRefs: [{subset: v2, site: west}]
  - name: eu-callers
    matches: [{from: {labels: {region: eu}}}]
    backendRefs: [{subset: v2}]
  - name: legacy
    matches: [{path: {type: PathPrefix, value: /old}}]
    backendRefs: [{subset: v1}]
    filters: [{type: URLRewrite, urlRewrite: {hostname: legacy.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]
  - name: moved
    matches: [{path: {type: Exact, value: /moved}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: shop.example, scheme: https, statusCode: 301}}]
  - name: teapot
    matches: [{path: {type: Exact, value: /teapot}, method: GET}]
    filters: [{type: FixedResponse, fixedResponse: {statusCode: 418, body: short and stout}}]
  - name: canary
    backendRefs: [{subset: v1, weight: 99}, {subset: v2, weight: 1}]
"#,
        ),
    )
    .await;
    let central = imported(&fed, "central", "web.shop.svc.clusterset.local", 8080).await;
    let north = imported(&fed, "north", "web.shop.svc.clusterset.local", 8080).await;

    for h2 in [false, true] {
        tracing::info!(h2, "phase: each rule");
        let mut c = Client::connect(central, h2).await;
        eventually(
            Duration::from_secs(30),
            "the route to reach central's gateway",
            async || {
                let a = c.get("/teapot", &[]).await;
                equals((a.status, a.body), &(418, "short and stout".to_string()))
            },
        )
        .await;
        for user in ["alice", "bob"] {
            for _ in 0..20 {
                let a = c.get("/cart", &[("x-user", user)]).await;
                assert_eq!((a.status, a.backend()), (200, "v2"), "{user}: {}", a.body);
                assert_eq!(
                    a.header("x-saw-route"),
                    "beta",
                    "the request header was set"
                );
                assert_eq!(
                    a.header("x-rule"),
                    "beta-users",
                    "the response header was added"
                );
            }
        }
        for _ in 0..20 {
            let a = c.get("/x", &[("x-site", "west")]).await;
            assert_eq!((a.status, a.body.as_str()), (200, "west-v2 /x"));
        }
        let a = c.get("/old/items?page=2", &[]).await;
        assert_eq!((a.status, a.body.as_str()), (200, "v1 /new/items?page=2"));
        assert_eq!(a.header("x-saw-host"), "legacy.internal");
        let a = c.get("/moved", &[]).await;
        assert_eq!(a.status, 301);
        assert_eq!(a.header("location"), "https://shop.example/moved");
        assert_eq!(
            a.header("x-causeway-error"),
            "",
            "a redirect is an answer, not an error"
        );

        tracing::info!(h2, "phase: callers in region eu get v2");
        let mut n = Client::connect(north, h2).await;
        for _ in 0..30 {
            let a = n.get("/", &[]).await;
            assert_eq!((a.status, a.backend()), (200, "v2"), "{}", a.body);
        }
    }

    tracing::info!("phase: the 1% canary over 10,000 requests from HTTP/1.1 and HTTP/2 callers");
    let mut workers = Vec::new();
    for i in 0..4 {
        workers.push(tokio::spawn(async move {
            let mut c = Client::connect(central, i % 2 == 1).await;
            let (mut one, mut two) = (0u32, 0u32);
            for _ in 0..2_500 {
                let a = c.get("/", &[("x-user", "carol")]).await;
                match (a.status, a.backend()) {
                    (200, "v1") => one += 1,
                    (200, "v2") => two += 1,
                    _ => panic!("unexpected answer {} {}", a.status, a.body),
                }
            }
            (one, two)
        }));
    }
    let (mut one, mut two) = (0, 0);
    for w in workers {
        let (a, b) = w.await.unwrap();
        one += a;
        two += b;
    }
    assert_eq!(one + two, 10_000);
    // 1% of 10,000 is 100, with a binomial spread of about 10.
    assert!(
        (55..=150).contains(&two),
        "v2 took {two} of 10,000 (want about 100)"
    );

    let m = http_get(fed.sites["central"].gateway_admin, "/metrics").await;
    assert!(
        metric(
            &m,
            r#"causeway_http_route_total{route="web",rule="canary",action="forward"}"#
        ) >= 10_000.0,
        "per-rule counts are exported"
    );
    let explain = fed
        .ctl(&["explain", "shop/web", "--from", "central"])
        .await
        .unwrap();
    for want in [
        "HTTPRoute shop/web (the calling gateway decides per request, first match wins):",
        "1. beta-users: header x-user ~ alice|bob -> 100.0% to subset v2 (at east 1/1, west 1/1)",
        "3. eu-callers: from region=eu -> 100.0% to subset v2",
        "7. canary: every request -> 99.0% to subset v1 (at east 1/1); 1.0% to subset v2",
    ] {
        assert!(explain.contains(want), "missing {want:?} in:\n{explain}");
    }
    fed.shutdown().await;
}

/// A blue/green switch: all traffic on blue, then one apply moves it to
/// green while HTTP/1.1 and HTTP/2 callers keep sending — not one request
/// fails, and the callers' connections stay up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blue_green_switch_under_load_fails_no_request() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (blue, _) = backend("blue", Mode::Answer).await;
    let (green, _) = backend("green", Mode::Answer).await;
    fed.add_site("east", &vip_range(), &[]).await.unwrap();
    fed.add_site("central", &vip_range(), &[]).await.unwrap();
    add_exports_and_restart(
        &mut fed,
        "east",
        &versioned_export(&[(blue, "blue"), (green, "green")]),
    )
    .await;
    let to = |subset: &str| {
        route(
            "switch",
            &format!("  - name: live\n    backendRefs: [{{subset: {subset}}}]\n"),
        )
    };
    apply_policies(&fed, tmp.path(), &to("blue")).await;
    let target = imported(&fed, "central", "web.shop.svc.clusterset.local", 8080).await;
    let mut probe = Client::connect(target, false).await;
    eventually(Duration::from_secs(30), "all traffic on blue", async || {
        for _ in 0..20 {
            let a = probe.get("/", &[]).await;
            equals(
                (a.status, a.backend().to_string()),
                &(200, "blue".to_string()),
            )?;
        }
        Ok::<_, String>(())
    })
    .await;

    // Callers on long-lived connections, counting answers by backend until
    // told to stop; any other answer is a failure.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let green_seen = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for i in 0..4 {
        let (stop, green_seen) = (stop.clone(), green_seen.clone());
        workers.push(tokio::spawn(async move {
            let mut c = Client::connect(target, i % 2 == 1).await;
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let a = c.get("/", &[]).await;
                match (a.status, a.backend()) {
                    (200, "blue") => ok += 1,
                    (200, "green") => {
                        ok += 1;
                        green_seen.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => failed.push(format!("{} {}", a.status, a.body)),
                }
            }
            (ok, failed)
        }));
    }
    apply_policies(&fed, tmp.path(), &to("green")).await;
    eventually(
        Duration::from_secs(30),
        "the callers to reach green",
        async || {
            let before = green_seen.load(Ordering::Relaxed);
            tokio::task::yield_now().await;
            (before >= 200).then_some(()).ok_or(before)
        },
    )
    .await;
    // After the switch, nothing goes to blue any more.
    for _ in 0..50 {
        let a = probe.get("/", &[]).await;
        assert_eq!((a.status, a.backend()), (200, "green"), "{}", a.body);
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        let (ok, failed) = w.await.unwrap();
        assert!(
            failed.is_empty(),
            "failed requests during the switch: {failed:?}"
        );
        total += ok;
    }
    assert!(total > 200, "{total} requests during the switch");
    fed.shutdown().await;
}

/// Mirrored copies go to their subset and are forgotten: a mirror that
/// never answers neither slows nor fails the requests it copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_copies_never_hold_up_or_fail_the_original() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (live, live_count) = backend("live", Mode::Answer).await;
    let (shadow, shadow_count) = backend("shadow", Mode::Hang).await;
    fed.add_site("east", &vip_range(), &[]).await.unwrap();
    fed.add_site("central", &vip_range(), &[]).await.unwrap();
    add_exports_and_restart(
        &mut fed,
        "east",
        &versioned_export(&[(live, "live"), (shadow, "shadow")]),
    )
    .await;
    apply_policies(
        &fed,
        tmp.path(),
        &route(
            "mirror",
            "  - backendRefs: [{subset: live}]\n    filters: [{type: RequestMirror, requestMirror: {backendRef: {subset: shadow}, percent: 50}}]\n",
        ),
    )
    .await;
    let target = imported(&fed, "central", "web.shop.svc.clusterset.local", 8080).await;
    for h2 in [false, true] {
        let mut c = Client::connect(target, h2).await;
        eventually(
            Duration::from_secs(30),
            "copies to reach the shadow",
            async || {
                // The shadow never answers: were the original waiting on its
                // copy, this would hang past the wait's deadline.
                let a = c.get("/pay", &[]).await;
                equals((a.status, a.body.as_str()), &(200, "live /pay"))?;
                let copies = shadow_count.load(Ordering::Relaxed);
                (copies >= 10)
                    .then_some(())
                    .ok_or(format!("{copies} copies"))
            },
        )
        .await;
        for _ in 0..100 {
            let a = c.get("/pay", &[]).await;
            assert_eq!((a.status, a.body.as_str()), (200, "live /pay"));
        }
    }
    let (live_n, copies) = (
        live_count.load(Ordering::Relaxed),
        shadow_count.load(Ordering::Relaxed),
    );
    // About half of the requests are copied (the share is 50%).
    assert!(
        copies * 4 >= live_n && copies <= live_n,
        "{copies} copies of {live_n} requests"
    );
    fed.shutdown().await;
}
