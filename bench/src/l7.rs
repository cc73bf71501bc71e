//! `bench/run l7`: what layer-7 features cost, and a canary shift, side by
//! side with Envoy configured to do the same.
//!
//! Both systems carry `shop/web` with two versions, `v1` and `v2`, each a
//! backend of site east. The client calls the caller side (causeway: site
//! central's gateway; Envoy: a caller Envoy), which forwards over mutual
//! TLS to east (causeway: QUIC to east's gateway, which picks the subset's
//! endpoint; Envoy: HTTP/2 to east's Envoy, one listener per version).
//! Every process runs one worker thread.
//!
//! - `route-plain`, `route-rules`, `route-ratelimit`: p50/p99 of HTTP/1.1
//!   at 1,000 requests/s (16 connections) with (1) one rule sending all to
//!   v1, (2) ten header rules that do not match before that rule, and (3)
//!   the same plus a request rate limit far above the load (causeway: a
//!   RateLimit, checked at east per request; Envoy: the local rate limit
//!   filter on the caller). Interleaved in rounds.
//! - `canary-shift`: 500 requests/s while v2's weight goes 0 → 1 → 10 → 50
//!   → 100% every 2 s (causeway: `ctl policy apply` of the HTTPRoute;
//!   Envoy: `runtime_modify` of a route's `runtime_fraction`): v2's share
//!   in each step (the second after the change), and failed requests.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use causeway::local::{free_port, LocalFederation};

use crate::http::start_envoy;
use crate::report::{percentile, Report};
use crate::tunnel::{envoy_binary, envoy_tls};

pub struct Params {
    rate_secs: f64,
    rounds: usize,
    step_secs: f64,
}

impl Params {
    pub fn new(quick: bool) -> Self {
        Self {
            rate_secs: if quick { 3.0 } else { 10.0 },
            rounds: if quick { 1 } else { 3 },
            step_secs: if quick { 1.5 } else { 2.0 },
        }
    }
}

/// The load's request: a user no route rule picks out.
const REQUEST: &[u8] = b"GET /item HTTP/1.1\r\nhost: web\r\nx-user: carol\r\n\r\n";

fn connect(entry: SocketAddr) -> std::io::Result<std::io::BufReader<std::net::TcpStream>> {
    crate::http::h1_connect(entry)
}

fn get(r: &mut std::io::BufReader<std::net::TcpStream>) -> std::io::Result<Option<String>> {
    crate::http::h1_request(r, REQUEST)
}

/// HTTP/1.1 at `rate` over `conns` connections for `secs`; every request.
async fn fixed(
    entry: SocketAddr,
    conns: usize,
    rate: f64,
    secs: f64,
) -> anyhow::Result<Vec<crate::http::Sample>> {
    crate::http::h1_samples(entry, conns, rate, secs, REQUEST).await
}

/// Ten rules matching a header the load never sends, then the rule that
/// serves it, as an HTTPRoute; `v2` is the share of the last rule's
/// traffic for v2 (percent).
fn route(rules: bool, v2: u32) -> String {
    let mut out = String::from(
        "apiVersion: causeway.dev/v1alpha1\nkind: HTTPRoute\nmetadata: {name: web, namespace: shop}\nspec:\n  service: web\n  rules:\n",
    );
    if rules {
        for i in 0..10 {
            out.push_str(&format!(
                "  - matches: [{{headers: [{{name: x-tenant, value: tenant-{i}}}]}}]\n    backendRefs: [{{subset: v2}}]\n"
            ));
        }
    }
    out.push_str(&format!(
        "  - backendRefs: [{{subset: v1, weight: {}}}, {{subset: v2, weight: {v2}}}]\n",
        100 - v2
    ));
    out
}

const LIMIT: &str = "---\napiVersion: causeway.dev/v1alpha1\nkind: RateLimit\nmetadata: {name: web, namespace: shop}\nspec:\n  service: web\n  limits: [{requestsPerSecond: 1000000, burst: 1000000}]\n";

/// East's Envoy: one listener per version.
fn envoy_east(v1: (u16, SocketAddr), v2: (u16, SocketAddr), certs: &Path) -> String {
    let listener = |name: &str, port: u16| {
        format!(
            r#"  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - transport_socket: {tls}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          codec_type: AUTO
          route_config:
            virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: {name}, timeout: 5s}}}}]}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#,
            tls = envoy_tls(certs, false, "h2, http/1.1"),
        )
    };
    let cluster = |name: &str, backend: SocketAddr| {
        format!(
            r#"  - name: {name}
    connect_timeout: 1s
    type: STATIC
    circuit_breakers: {{thresholds: [{{max_connections: 1000000, max_pending_requests: 1000000, max_requests: 1000000}}]}}
    load_assignment:
      cluster_name: {name}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {port}}}}}}}}}]}}]
"#,
            ip = backend.ip(),
            port = backend.port()
        )
    };
    format!(
        "static_resources:\n  listeners:\n{}{}  clusters:\n{}{}",
        listener("v1", v1.0),
        listener("v2", v2.0),
        cluster("v1", v1.1),
        cluster("v2", v2.1)
    )
}

/// The caller's Envoy: optional ten header routes first, then `/` split by
/// the runtime fraction `canary.v2` (percent, default `v2`), with an
/// optional local rate limit far above the load; admin on `admin`.
fn envoy_caller(
    listen: u16,
    admin: u16,
    east: (u16, u16),
    rules: bool,
    limit: bool,
    v2: u32,
    certs: &Path,
) -> String {
    let mut routes = String::new();
    if rules {
        for i in 0..10 {
            routes.push_str(&format!(
                "              - match: {{prefix: \"/\", headers: [{{name: x-tenant, string_match: {{exact: tenant-{i}}}}}]}}\n                route: {{cluster: v2, timeout: 5s}}\n"
            ));
        }
    }
    routes.push_str(&format!(
        "              - match: {{prefix: \"/\", runtime_fraction: {{default_value: {{numerator: {v2}, denominator: HUNDRED}}, runtime_key: canary.v2}}}}\n                route: {{cluster: v2, timeout: 5s}}\n              - match: {{prefix: \"/\"}}\n                route: {{cluster: v1, timeout: 5s}}\n"
    ));
    let limit_filter = if limit {
        r#"          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              stat_prefix: limit
              token_bucket: {max_tokens: 1000000, tokens_per_fill: 1000000, fill_interval: 1s}
              filter_enabled: {default_value: {numerator: 100, denominator: HUNDRED}, runtime_key: limit_enabled}
              filter_enforced: {default_value: {numerator: 100, denominator: HUNDRED}, runtime_key: limit_enforced}
"#
    } else {
        ""
    };
    let cluster = |name: &str, port: u16| {
        format!(
            r#"  - name: {name}
    connect_timeout: 1s
    type: STATIC
    circuit_breakers: {{thresholds: [{{max_connections: 1000000, max_pending_requests: 1000000, max_requests: 1000000}}]}}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: {name}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]
    transport_socket: {tls}
"#,
            tls = envoy_tls(certs, true, "h2"),
        )
    };
    format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
layered_runtime:
  layers: [{{name: admin, admin_layer: {{}}}}]
static_resources:
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
{routes}          http_filters:
{limit_filter}          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
{}{}"#,
        cluster("v1", east.0),
        cluster("v2", east.1),
    )
}

/// Waits until a request through `entry` answers 200 with a body in `want`.
async fn wait_for(entry: SocketAddr, want: &[&str]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = tokio::task::spawn_blocking(move || connect(entry).and_then(|mut r| get(&mut r)))
            .await?;
        if let Ok(Some(b)) = &got {
            if want.contains(&b.as_str()) {
                return Ok(());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{entry} never answered {want:?}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `POST /runtime_modify?canary.v2=<v2>` on Envoy's admin port.
fn envoy_weight(admin: u16, v2: u32) -> anyhow::Result<()> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", admin))?;
    s.write_all(
        format!("POST /runtime_modify?canary.v2={v2} HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .as_bytes(),
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    anyhow::ensure!(out.starts_with("HTTP/1.1 200"), "runtime_modify: {out}");
    Ok(())
}

pub async fn run(report: &mut Report, root: &Path, p: &Params) -> anyhow::Result<()> {
    let certs = root.join("certs");
    crate::pki::write(&certs)?;
    let v1: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let v2: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let _v1 = causeway::local::http_backend(v1, "v1").await?;
    let _v2 = causeway::local::http_backend(v2, "v2").await?;

    // causeway: one controller, east (v1 and v2) and central (the caller).
    let bin = std::env::current_exe()?.with_file_name("causeway");
    let mut fed = LocalFederation::new(bin.clone(), root.join("causeway"))?;
    fed.start_controllers(1)?;
    fed.wait_for_leader(Duration::from_secs(30)).await?;
    fed.gateway_base = LocalFederation::gateway_config_with("worker_threads = 1\n")?;
    fed.add_site("east", "127.71.0.0/24", &[]).await?;
    fed.add_site("central", "127.73.0.0/24", &[]).await?;
    fed.edit_gateway_config("east", |cfg| {
        let mut e = causeway_gateway::config::ExportConfig::tcp("shop/web", 8080, &[v1, v2]);
        e.protocol = "http".into();
        e.versions = [
            (v1.to_string(), "v1".to_string()),
            (v2.to_string(), "v2".to_string()),
        ]
        .into_iter()
        .collect();
        cfg.exports.push(e);
    })?;
    fed.restart_gateway("east").await?;
    let policies = root.join("policies.yaml");
    let apply = |yaml: String| {
        let (fed, policies) = (&fed, policies.clone());
        async move {
            std::fs::write(&policies, yaml)?;
            fed.ctl(&["policy", "apply", "-f", &policies.display().to_string()])
                .await
                .map(|_| ())
        }
    };
    apply(route(false, 0)).await?;
    let vip = fed
        .wait_resolvable(
            "central",
            "web.shop.svc.clusterset.local",
            Duration::from_secs(30),
        )
        .await?;
    let cw = SocketAddr::new(vip, 8080);
    wait_for(cw, &["v1"]).await.context("the causeway path")?;

    // Envoy: east's (one listener per version) and the caller's.
    let envoy = envoy_binary()?;
    let edir = root.join("envoy");
    std::fs::create_dir_all(&edir)?;
    let (e1, e2) = (free_port()?, free_port()?);
    let _east = start_envoy(
        &envoy,
        &edir,
        "envoy-east",
        &envoy_east((e1, v1), (e2, v2), &certs),
    )?;
    let (listen, admin) = (free_port()?, free_port()?);
    let entry: SocketAddr = format!("127.0.0.1:{listen}").parse()?;
    let mut caller: Option<tokio::process::Child> = None;
    let mut envoy_with = |rules: bool, limit: bool| -> anyhow::Result<()> {
        drop(caller.take());
        caller = Some(start_envoy(
            &envoy,
            &edir,
            "envoy-caller",
            &envoy_caller(listen, admin, (e1, e2), rules, limit, 0, &certs),
        )?);
        Ok(())
    };

    println!(
        "route cost: h1 1000 rps for {} s per config and system, {} rounds",
        p.rate_secs, p.rounds
    );
    let configs = [
        ("route-plain", false, false),
        ("route-rules", true, false),
        ("route-ratelimit", true, true),
    ];
    let mut lat: Vec<[Vec<f64>; 2]> = vec![[Vec::new(), Vec::new()]; configs.len()];
    let mut failed = [0u64; 2];
    let per = (p.rate_secs / p.rounds as f64).max(1.0);
    for _ in 0..p.rounds {
        for (i, (_, rules, limit)) in configs.iter().enumerate() {
            let mut yaml = route(*rules, 0);
            if *limit {
                yaml.push_str(LIMIT);
            } else {
                let _ = fed
                    .ctl(&["policy", "delete", "RateLimit", "shop/web"])
                    .await;
            }
            apply(yaml).await?;
            envoy_with(*rules, *limit)?;
            // The new policy has reached central's and east's gateways once
            // answers keep coming from v1 (the route always serves v1); the
            // new Envoy has started. Both are warmed, then left to settle
            // (catalog fan-out, Envoy's start) before either is measured.
            wait_for(cw, &["v1"]).await?;
            wait_for(entry, &["v1"]).await.context("the Envoy path")?;
            for at in [cw, entry] {
                fixed(at, 16, 1000.0, 0.5).await?;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            for (s, at) in [(0, cw), (1, entry)] {
                for (_, us, body) in fixed(at, 16, 1000.0, per).await? {
                    lat[i][s].push(us);
                    if body.as_deref() != Some("v1") {
                        failed[s] += 1;
                    }
                }
            }
        }
    }
    for (i, (case, _, _)) in configs.iter().enumerate() {
        for (s, name) in ["causeway", "envoy"].into_iter().enumerate() {
            for (metric, q) in [("p50_us", 50.0), ("p99_us", 99.0)] {
                report.add(case, name, metric, percentile(&mut lat[i][s], q));
            }
        }
    }

    // The canary shift.
    let steps = [0u32, 1, 10, 50, 100];
    println!(
        "canary shift: 500 rps while v2 goes {steps:?}% every {} s",
        p.step_secs
    );
    let _ = fed
        .ctl(&["policy", "delete", "RateLimit", "shop/web"])
        .await;
    apply(route(false, 0)).await?;
    envoy_with(false, false)?;
    wait_for(entry, &["v1"]).await?;
    wait_for(cw, &["v1"]).await?;
    let total = p.step_secs * steps.len() as f64;
    for (s, name) in ["causeway", "envoy"].into_iter().enumerate() {
        let at = if s == 0 { cw } else { entry };
        let load = tokio::spawn(fixed(at, 8, 500.0, total));
        let t0 = Instant::now() + Duration::from_millis(100);
        for (k, v2share) in steps.iter().enumerate().skip(1) {
            tokio::time::sleep_until((t0 + Duration::from_secs_f64(p.step_secs * k as f64)).into())
                .await;
            if s == 0 {
                apply(route(false, *v2share)).await?;
            } else {
                envoy_weight(admin, *v2share)?;
            }
        }
        let samples = load.await??;
        let bad = samples.iter().filter(|(_, _, b)| b.is_none()).count();
        report.add("canary-shift", name, "failed_count", bad as f64);
        for (k, v2share) in steps.iter().enumerate() {
            // The second half of each step: the change has landed.
            let (from, to) = (
                p.step_secs * (k as f64 + 0.5),
                p.step_secs * (k as f64 + 1.0),
            );
            let in_step: Vec<_> = samples
                .iter()
                .filter(|(due, _, _)| *due >= from && *due < to)
                .collect();
            let v2n = in_step
                .iter()
                .filter(|(_, _, b)| b.as_deref() == Some("v2"))
                .count();
            let share = 100.0 * v2n as f64 / in_step.len().max(1) as f64;
            report.add("canary-shift", name, &format!("v2_pct_at_{v2share}"), share);
        }
    }
    envoy_with(false, false)?;
    drop(caller);

    let get = |case: &str, sys: &str, m: &str| report.get(case, sys, m).unwrap_or(f64::NAN);
    let mut checks: Vec<(String, f64, &str)> = vec![
        (
            "failed requests in the route-cost runs (causeway)".into(),
            failed[0] as f64,
            "<= 0",
        ),
        (
            "failed requests in the canary shift (causeway)".into(),
            get("canary-shift", "causeway", "failed_count"),
            "<= 0",
        ),
    ];
    for case in ["route-plain", "route-rules", "route-ratelimit"] {
        checks.push((
            format!("{case} p99 causeway/envoy"),
            get(case, "causeway", "p99_us") / get(case, "envoy", "p99_us"),
            "<= 1.0",
        ));
    }
    let mut added = Vec::new();
    for case in ["route-rules", "route-ratelimit"] {
        for sys in ["causeway", "envoy"] {
            added.push((
                case,
                sys,
                get(case, sys, "p99_us") - get("route-plain", sys, "p99_us"),
            ));
        }
    }
    for (case, sys, us) in added {
        report.add(case, sys, "p99_added_us", us);
    }
    for (name, value, goal) in checks {
        report.check(&name, value, goal);
    }
    fed.shutdown().await;
    Ok(())
}
