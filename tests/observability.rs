//! Observability end to end: a real Prometheus (the Debian `prometheus`
//! package, which `scripts/test-all` installs) scrapes a local federation
//! with the shipped rules and sees alerts go pending, then firing, after
//! the gateway of the exporting site stops.

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The shipped rules with every `for:` shortened to 2 s, so the test sees
/// pending turn into firing within seconds; the expressions are the
/// shipped ones.
fn rules_for_test() -> String {
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/prometheus/causeway-rules.yml"),
    )
    .unwrap();
    shipped
        .lines()
        .map(|l| match l.trim_start().strip_prefix("for: ") {
            Some(_) => format!("{}for: 2s", &l[..l.len() - l.trim_start().len()]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// GET `path` from Prometheus's HTTP API; the JSON it answers.
async fn prom(addr: std::net::SocketAddr, path: &str) -> Result<serde_json::Value, String> {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&body)))
}

/// The alerts Prometheus has now: (alertname, site label, state).
async fn alerts(addr: std::net::SocketAddr) -> Result<Vec<(String, String, String)>, String> {
    let v = prom(addr, "/api/v1/alerts").await?;
    Ok(v["data"]["alerts"]
        .as_array()
        .ok_or(v.to_string())?
        .iter()
        .map(|a| {
            let s = |k: &str| a["labels"][k].as_str().unwrap_or("").to_string();
            (
                s("alertname"),
                s("site"),
                a["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_fires_the_shipped_alerts_when_a_gateway_stops() {
    init_tracing();
    let Ok(prometheus) = which("prometheus") else {
        panic!("the `prometheus` binary is not on PATH: install the Debian package (`sudo apt-get install prometheus`) or run `sudo scripts/test-all`, which does");
    };
    let tmp = tempfile::tempdir().unwrap();
    let (mut fed, _) = controllers(&tmp, 1, &[]).await;
    let (vip, _echo) = echo_sites_ready(&mut fed).await;
    let _ = vip;

    let dir = tmp.path().join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("rules.yml"), rules_for_test()).unwrap();
    let mut targets = Vec::new();
    for (id, a) in &fed.controller_admin {
        targets.push((format!("controller-{id}"), *a));
    }
    for (name, s) in &fed.sites {
        targets.push((format!("gw-{name}"), s.gateway_admin));
        targets.push((format!("dns-{name}"), s.dns_admin));
    }
    let mut scrape = String::new();
    for (instance, addr) in &targets {
        scrape.push_str(&format!(
            "      - targets: ['{addr}']\n        labels: {{instance: '{instance}'}}\n"
        ));
    }
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [rules.yml]\nscrape_configs:\n  - job_name: causeway\n    static_configs:\n{scrape}"
        ),
    )
    .unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let mut server = tokio::process::Command::new(prometheus)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={port}"))
        .current_dir(&dir)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    tracing::info!("phase: Prometheus scrapes every part and nothing fires");
    eventually(
        Duration::from_secs(60),
        "Prometheus to scrape every target",
        async || {
            let v = prom(port, "/api/v1/targets").await?;
            let t = v["data"]["activeTargets"].as_array().ok_or(v.to_string())?;
            let up = t.iter().filter(|t| t["health"] == "up").count();
            (up == targets.len())
                .then_some(())
                .ok_or(format!("{up} of {} up: {v}", targets.len()))
        },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "east's availability to be recorded",
        async || {
            let v = prom(
                port,
                "/api/v1/query?query=causeway_site_available%7Bsite%3D%22east%22%7D",
            )
            .await?;
            let r = &v["data"]["result"];
            (r[0]["value"][1] == "1").then_some(()).ok_or(v.to_string())
        },
    )
    .await;
    let before = alerts(port).await.unwrap();
    assert!(
        before.is_empty(),
        "alerts before anything broke: {before:?}"
    );
    // Every query of the Grafana dashboard is valid PromQL to a real
    // Prometheus over the series this federation exports.
    for q in dashboard_queries() {
        let v = prom(port, &format!("/api/v1/query?query={}", urlencode(&q)))
            .await
            .unwrap();
        assert_eq!(v["status"], "success", "dashboard query {q}: {v}");
    }

    tracing::info!(
        "phase: east's gateway stops; the lease and tunnel alerts go pending, then fire"
    );
    fed.sites.get_mut("east").unwrap().gateway.kill().await;
    let mut seen_pending = false;
    eventually(
        Duration::from_secs(60),
        "CausewaySiteLeaseLost for east to fire",
        async || {
            let now = alerts(port).await?;
            seen_pending |= now
                .iter()
                .any(|(n, s, st)| n == "CausewaySiteLeaseLost" && s == "east" && st == "pending");
            now.iter()
                .any(|(n, s, st)| n == "CausewaySiteLeaseLost" && s == "east" && st == "firing")
                .then_some(())
                .ok_or(format!("{now:?}"))
        },
    )
    .await;
    eventually(
        Duration::from_secs(60),
        "CausewayTunnelDown from west to east to fire",
        async || {
            let now = alerts(port).await?;
            now.iter()
                .any(|(n, s, st)| n == "CausewayTunnelDown" && s == "east" && st == "firing")
                .then_some(())
                .ok_or(format!("{now:?}"))
        },
    )
    .await;
    tracing::info!(
        seen_pending,
        "the lease alert was seen pending before it fired"
    );
    let now = alerts(port).await.unwrap();
    assert!(
        now.iter().all(|(_, s, _)| s != "west"),
        "nothing about west fires: {now:?}"
    );
    let _ = server.start_kill();
    let _ = server.wait().await;
    fed.shutdown().await;
}

/// The path of `name` on PATH.
fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

/// Waits until `GET /traced` with this `traceparent` through `http`
/// answers 200.
async fn traced_get(http: std::net::SocketAddr, traceparent: &str) {
    eventually(Duration::from_secs(20), "a traced request to pass", async || {
        let mut s = tokio::net::TcpStream::connect(http).await.map_err(|e| e.to_string())?;
        s.write_all(
            format!("GET /traced HTTP/1.1\r\nhost: web\r\ntraceparent: {traceparent}\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.map_err(|e| e.to_string())?;
        out.starts_with("HTTP/1.1 200").then_some(()).ok_or(out)
    })
    .await;
}

/// The access log entries (JSON lines) in a process's output.
fn access_entries(log: &std::path::Path) -> Vec<causeway_gateway::access::Entry> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Access logs on both gateways: one JSON line per HTTP request and per
/// L4 connection on the calling gateway (with the caller's trace id, the
/// serving site, status and bytes), and one per tunnel stream on the
/// exporting gateway (with the peer's identity and the endpoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_logs_record_each_request_and_connection_on_both_gateways() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = new_federation(&tmp);
    fed.gateway_base.access_log = causeway_gateway::access::AccessLogConfig {
        enabled: true,
        path: "stdout".into(),
        sample: 1.0,
    };
    fed.start_controllers(1).unwrap();
    fed.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    let (echo, _echo_task) = causeway::local::echo_server(None).await.unwrap();
    add_echo_sites(&mut fed, echo).await;
    let (web, _web_task) = http_backend("127.0.0.1:0", "east-web").await;
    add_exports_and_restart(&mut fed, "east", &web_http_export(web)).await;
    let http = imported(&fed, "west", "web.shop.svc.clusterset.local", 8080).await;
    let vip = echo_vip(&fed, "west").await;

    tracing::info!("phase: a traced HTTP request and an L4 connection from west");
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    traced_get(http, &format!("00-{trace}-00f067aa0ba902b7-01")).await;
    let data = b"twelve bytes";
    let got = echo_roundtrip(std::net::SocketAddr::new(vip, 7000), data).await;
    assert_eq!(got, data);

    tracing::info!("phase: west logged both as outbound, east as inbound");
    let west_log = fed.sites["west"].gateway.log.clone();
    let east_log = fed.sites["east"].gateway.log.clone();
    let (http_entry, tcp_entry) = eventually(
        Duration::from_secs(20),
        "west's outbound entries",
        async || {
            let all = access_entries(&west_log);
            let h = all
                .iter()
                .find(|e| e.protocol == "http" && e.path == "/traced" && e.status == 200)
                .cloned();
            let t = all
                .iter()
                .find(|e| {
                    e.protocol == "tcp"
                        && e.service == "shop/echo"
                        && e.bytes_in == data.len() as u64
                })
                .cloned();
            match (h, t) {
                (Some(h), Some(t)) => Ok((h, t)),
                _ => Err(format!("{all:?}")),
            }
        },
    )
    .await;
    assert_eq!(http_entry.direction, "outbound");
    assert_eq!(http_entry.trace_id, trace);
    assert_eq!(http_entry.method, "GET");
    assert_eq!(http_entry.service, "shop/web");
    assert_eq!(http_entry.source_site, "west");
    assert_eq!(http_entry.destination_site, "east");
    assert_eq!(http_entry.outcome, "ok");
    assert!(http_entry.bytes_out > 0, "{http_entry:?}");
    assert!(
        http_entry.time.ends_with('Z') && http_entry.time.len() == 24,
        "{http_entry:?}"
    );
    assert_eq!(tcp_entry.direction, "outbound");
    assert_eq!(tcp_entry.destination_site, "east");
    assert_eq!(tcp_entry.bytes_out, data.len() as u64);
    assert_eq!(tcp_entry.outcome, "ok");
    assert!(tcp_entry.source.starts_with("127."), "{tcp_entry:?}");

    let inbound = eventually(
        Duration::from_secs(20),
        "east's inbound entries",
        async || {
            let all = access_entries(&east_log);
            all.iter()
                .find(|e| {
                    e.direction == "inbound"
                        && e.service == "shop/echo"
                        && e.bytes_in == data.len() as u64
                })
                .cloned()
                .ok_or(format!("{all:?}"))
        },
    )
    .await;
    assert_eq!(inbound.source_site, "west");
    assert!(
        inbound
            .source
            .starts_with("spiffe://west.causeway/gateway/"),
        "{inbound:?}"
    );
    assert_eq!(inbound.destination_site, "east");
    assert_eq!(inbound.endpoint, echo.to_string());
    assert_eq!(inbound.bytes_out, data.len() as u64);
    // HTTP requests reach east over pooled upstream streams: east logs a
    // stream when it ends (west logs every request). Stopping west ends it.
    fed.sites.get_mut("west").unwrap().gateway.kill().await;
    let web_stream = eventually(
        Duration::from_secs(30),
        "east's entry for the HTTP stream",
        async || {
            let all = access_entries(&east_log);
            all.iter()
                .find(|e| e.direction == "inbound" && e.service == "shop/web")
                .cloned()
                .ok_or(format!("{all:?}"))
        },
    )
    .await;
    assert_eq!(web_stream.endpoint, web.to_string());
    assert!(
        web_stream.bytes_in > 0 && web_stream.bytes_out > 0,
        "{web_stream:?}"
    );
    fed.shutdown().await;
}

/// docs/observability.md names every metric the code exports, every
/// shipped alert and every access log field.
#[test]
fn every_metric_alert_and_log_field_is_documented() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/observability.md")).unwrap();
    let mut missing = Vec::new();
    let mut seen = 0;
    let mut stack = vec![
        root.join("gateway"),
        root.join("federation"),
        root.join("dns"),
        root.join("src"),
        root.join("kube"),
    ];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                if !p.ends_with("target") {
                    stack.push(p);
                }
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            for mac in ["counter!(", "gauge!(", "histogram!("] {
                for (i, _) in text.match_indices(mac) {
                    let rest = text[i + mac.len()..].trim_start();
                    let Some(lit) = rest.strip_prefix('"') else {
                        continue;
                    };
                    let name = &lit[..lit.find('"').unwrap()];
                    if name.starts_with("causeway_") {
                        seen += 1;
                        if !doc.contains(&format!("`{name}`")) {
                            missing.push(format!("metric {name} ({})", p.display()));
                        }
                    }
                }
            }
        }
    }
    assert!(seen > 100, "the scan found only {seen} metric uses");
    let rules = std::fs::read_to_string(root.join("deploy/prometheus/causeway-rules.yml")).unwrap();
    for l in rules.lines() {
        if let Some(alert) = l.trim().strip_prefix("- alert: ") {
            if !doc.contains(&format!("`{alert}`")) {
                missing.push(format!("alert {alert}"));
            }
        }
    }
    let fields = serde_json::to_value(causeway_gateway::access::Entry::default()).unwrap();
    for key in fields.as_object().unwrap().keys() {
        if !doc.contains(&format!("`{key}`")) {
            missing.push(format!("access log field {key}"));
        }
    }
    assert!(
        missing.is_empty(),
        "not in docs/observability.md: {missing:#?}"
    );
}

/// One span as a collector received it.
#[derive(Debug, Clone)]
struct Got {
    site: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attrs: std::collections::BTreeMap<String, String>,
}

type Received = std::sync::Arc<std::sync::Mutex<Vec<Got>>>;

struct Collector(Received);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        req: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
            .as_ref()
            .and_then(|v| v.value.as_ref())
        {
            Some(Value::StringValue(s)) => s.clone(),
            Some(Value::IntValue(i)) => i.to_string(),
            Some(Value::BoolValue(b)) => b.to_string(),
            Some(Value::DoubleValue(d)) => d.to_string(),
            _ => String::new(),
        };
        let mut got = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let site = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "causeway.site"))
                .map(|a| text(&a.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Got {
                        site: site.clone(),
                        name: s.name.clone(),
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        attrs: s
                            .attributes
                            .iter()
                            .map(|a| (a.key.clone(), text(&a.value)))
                            .collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An in-process OTLP/gRPC trace receiver on loopback: its address, what
/// it received, and the sender that shuts it down (its connections close).
async fn collector() -> (
    std::net::SocketAddr,
    Received,
    tokio::sync::oneshot::Sender<()>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let got: Received = Default::default();
    let svc = opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(
        Collector(got.clone()),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(l),
                async move {
                    let _ = stopped.await;
                },
            )
            .await;
    });
    (addr, got, stop)
}

/// An HTTP/1.1 endpoint answering every request `200 ok` and keeping each
/// request head.
async fn recording_backend() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let heads: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let keep = heads.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let keep = keep.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncBufReadExt;
                let (r, mut w) = s.into_split();
                let mut r = tokio::io::BufReader::new(r);
                loop {
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        match r.read_line(&mut line).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push_str(&line);
                    }
                    keep.lock().unwrap().push(head);
                    if w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, heads)
}

/// One trace across two real gateways: the caller's traceparent is the
/// parent of the calling gateway's span, which is the parent of the
/// exporting gateway's span (the context crossed the tunnel in the stream
/// header) and of the request the endpoint got; L4 connections start
/// their own trace the same way. With the collector gone, exports fail,
/// are counted, and traffic goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_follows_a_request_from_the_calling_gateway_through_the_tunnel() {
    init_tracing();
    let (otlp, got, stop_collector) = collector().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = new_federation(&tmp);
    fed.gateway_base.tracing = causeway_gateway::trace::TracingConfig {
        otlp_endpoint: format!("http://{otlp}"),
        sample_ratio: 1.0,
        export_interval_ms: 100,
        ..Default::default()
    };
    fed.start_controllers(1).unwrap();
    fed.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    let (echo, _echo_task) = causeway::local::echo_server(None).await.unwrap();
    add_echo_sites(&mut fed, echo).await;
    let (web, heads) = recording_backend().await;
    add_exports_and_restart(&mut fed, "east", &web_http_export(web)).await;
    let http = imported(&fed, "west", "web.shop.svc.clusterset.local", 8080).await;
    let vip = echo_vip(&fed, "west").await;

    tracing::info!("phase: a request with the caller's traceparent");
    let (trace, caller_span) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    traced_get(http, &format!("00-{trace}-{caller_span}-01")).await;
    let data = b"traced bytes";
    assert_eq!(
        echo_roundtrip(std::net::SocketAddr::new(vip, 7000), data).await,
        data
    );

    let spans = |f: &dyn Fn(&Got) -> bool| -> Vec<Got> {
        got.lock()
            .unwrap()
            .iter()
            .filter(|g| f(g))
            .cloned()
            .collect()
    };
    let (out_span, in_span) = eventually(
        Duration::from_secs(20),
        "the caller's trace to reach the collector from both gateways",
        async || {
            let outs = spans(&|g| g.trace_id == trace && g.name == "causeway.outbound");
            let ins = spans(&|g| g.trace_id == trace && g.name == "causeway.inbound");
            match (outs.first(), ins.first()) {
                (Some(o), Some(i)) => Ok((o.clone(), i.clone())),
                _ => Err(format!("{:?}", got.lock().unwrap())),
            }
        },
    )
    .await;
    assert_eq!(out_span.site, "west");
    assert_eq!(
        out_span.parent, caller_span,
        "the calling gateway continues the caller's span"
    );
    assert_eq!(out_span.attrs["causeway.service"], "shop/web");
    assert_eq!(out_span.attrs["causeway.destination_site"], "east");
    assert_eq!(out_span.attrs["http.response.status_code"], "200");
    assert_eq!(out_span.attrs["causeway.attempts"], "1");
    assert_eq!(in_span.site, "east");
    assert_eq!(
        in_span.parent, out_span.span_id,
        "the exporting gateway's span is the calling one's child"
    );
    assert_eq!(in_span.attrs["causeway.peer.site"], "west");
    assert!(in_span.attrs["causeway.peer.identity"].starts_with("spiffe://west.causeway/gateway/"));
    let head = heads
        .lock()
        .unwrap()
        .iter()
        .find(|h| h.contains("/traced"))
        .cloned()
        .unwrap();
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("traceparent: 00-{trace}-{}-01", out_span.span_id)),
        "the endpoint continues the calling gateway's span: {head}"
    );

    tracing::info!("phase: an L4 connection starts a trace that crosses the tunnel");
    let (l4_out, l4_in) = eventually(Duration::from_secs(20), "the L4 trace", async || {
        let outs = spans(&|g| {
            g.name == "causeway.outbound"
                && g.attrs
                    .get("causeway.service")
                    .is_some_and(|s| s == "shop/echo")
                && g.attrs
                    .get("causeway.bytes_in")
                    .is_some_and(|b| b == &data.len().to_string())
        });
        for o in outs {
            if let Some(i) =
                spans(&|g| g.name == "causeway.inbound" && g.parent == o.span_id).first()
            {
                return Ok((o.clone(), i.clone()));
            }
        }
        Err(format!("{:?}", got.lock().unwrap()))
    })
    .await;
    assert_eq!(l4_out.parent, "", "an L4 connection is a new trace");
    assert_eq!(l4_in.trace_id, l4_out.trace_id);
    assert_eq!(l4_in.attrs["causeway.endpoint"], echo.to_string());
    assert_eq!(l4_in.attrs["causeway.bytes_out"], data.len().to_string());

    tracing::info!("phase: the collector goes away; exports fail, are counted, traffic goes on");
    let _ = stop_collector.send(());
    let metrics_addr = fed.sites["west"].gateway_admin;
    eventually(
        Duration::from_secs(30),
        "failed exports to be counted",
        async || {
            let _ = echo_roundtrip(std::net::SocketAddr::new(vip, 7000), b"x").await;
            let m = http_get(metrics_addr, "/metrics").await;
            (metric(&m, "causeway_trace_export_errors_total") > 0.0)
                .then_some(())
                .ok_or("no export error counted yet")
        },
    )
    .await;
    assert_eq!(
        echo_roundtrip(std::net::SocketAddr::new(vip, 7000), data).await,
        data
    );
    fed.shutdown().await;
}

/// The `rotel-agent` binary of the pip package `rotel` (a real
/// OpenTelemetry collector), which `scripts/test-all` installs.
fn rotel_agent() -> std::path::PathBuf {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, rotel; print(os.path.dirname(rotel.__file__))",
        ])
        .output();
    let dir = out
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match dir.map(|d| std::path::Path::new(&d).join("rotel-agent")) {
        Some(p) if p.is_file() => p,
        _ => panic!("the rotel collector is not installed: run `pip install --pre rotel==0.0.1a15` (scripts/test-all does)"),
    }
}

/// A span as rotel's debug log prints it.
#[derive(Debug, Clone, Default)]
struct Logged {
    trace: String,
    parent: String,
    id: String,
    name: String,
    body: String,
}

/// The spans in rotel's debug log (`Span #n` blocks).
fn rotel_spans(text: &str) -> Vec<Logged> {
    let mut out: Vec<Logged> = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("Span #") {
            out.push(Logged::default());
            continue;
        }
        let Some(cur) = out.last_mut() else { continue };
        let value = |k: &str| {
            t.strip_prefix(k)
                .map(|r| r.trim_start_matches([' ', ':']).trim().to_string())
        };
        if let Some(v) = value("Trace ID") {
            cur.trace = v;
        } else if let Some(v) = value("Parent ID") {
            cur.parent = v;
        } else if let Some(v) = value("ID") {
            cur.id = v;
        } else if let Some(v) = value("Name") {
            cur.name = v;
        } else {
            cur.body.push_str(t);
            cur.body.push('\n');
        }
    }
    out
}

/// The gateways' spans reach a real out-of-process collector (rotel) over
/// OTLP/HTTP on loopback, which logs them: both gateways' spans of one
/// connection, in one trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_collector_logs_both_gateways_spans() {
    init_tracing();
    let rotel = rotel_agent();
    let tmp = tempfile::tempdir().unwrap();
    let grpc = causeway::local::free_port().unwrap();
    let http = causeway::local::free_port().unwrap();
    let log_path = tmp.path().join("rotel.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut agent = tokio::process::Command::new(rotel)
        .args([
            "start",
            "--otlp-grpc-endpoint",
            &format!("127.0.0.1:{grpc}"),
            "--otlp-http-endpoint",
            &format!("127.0.0.1:{http}"),
            "--exporter",
            "blackhole",
            "--debug-log",
            "traces",
            "--debug-log-verbosity",
            "detailed",
        ])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_listening(format!("127.0.0.1:{grpc}").parse().unwrap()).await;

    let mut fed = new_federation(&tmp);
    fed.gateway_base.tracing = causeway_gateway::trace::TracingConfig {
        // OTLP over HTTP here; the other tracing tests use gRPC.
        otlp_endpoint: format!("http://127.0.0.1:{http}"),
        protocol: "http".into(),
        sample_ratio: 1.0,
        export_interval_ms: 100,
        ..Default::default()
    };
    fed.start_controllers(1).unwrap();
    fed.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    let (vip, _echo) = echo_sites_ready(&mut fed).await;
    let data = b"to a real collector";
    assert_eq!(
        echo_roundtrip(std::net::SocketAddr::new(vip, 7000), data).await,
        data
    );
    let len = format!("causeway.bytes_in: Int({})", data.len());
    let (out, inb) = eventually(
        Duration::from_secs(30),
        "rotel to log both spans",
        async || {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let spans = rotel_spans(&text);
            let out = spans
                .iter()
                .find(|s| s.name == "causeway.outbound" && s.body.contains(&len));
            let inb = out.and_then(|o| {
                spans
                    .iter()
                    .find(|s| s.name == "causeway.inbound" && s.parent == o.id)
            });
            match (out, inb) {
                (Some(o), Some(i)) => Ok((o.clone(), i.clone())),
                _ => Err(text),
            }
        },
    )
    .await;
    assert_eq!(out.trace, inb.trace);
    assert!(
        out.body.contains("causeway.destination_site: Str(east)"),
        "{}",
        out.body
    );
    assert!(
        inb.body
            .contains("causeway.peer.identity: Str(spiffe://west.causeway/gateway/"),
        "{}",
        inb.body
    );
    let _ = agent.start_kill();
    fed.shutdown().await;
}

/// The Grafana dashboard's panels and their queries.
fn dashboard() -> serde_json::Value {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/causeway.json")).unwrap(),
    )
    .unwrap()
}

fn dashboard_queries() -> Vec<String> {
    dashboard()["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().clone())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect()
}

/// The Grafana dashboard (Grafana itself cannot be installed here) is
/// checked for structure: unique panel ids, a type, a place and a query on
/// each panel, and only series the code exports or the shipped rules
/// record. (The Prometheus test also runs every query against a real
/// Prometheus.)
#[test]
fn the_grafana_dashboard_is_well_formed_and_queries_known_series() {
    let d = dashboard();
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(d["uid"].as_str().is_some_and(|t| !t.is_empty()));
    let panels = d["panels"].as_array().unwrap();
    assert!(panels.len() >= 8, "{} panels", panels.len());
    let mut ids = std::collections::BTreeSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate panel id: {p}"
        );
        assert!(p["type"].as_str().is_some(), "{p}");
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()), "{p}");
        for k in ["h", "w", "x", "y"] {
            assert!(p["gridPos"][k].as_u64().is_some(), "{p}");
        }
        assert!(!p["targets"].as_array().unwrap().is_empty(), "{p}");
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/observability.md")).unwrap();
    let rules = std::fs::read_to_string(root.join("deploy/prometheus/causeway-rules.yml")).unwrap();
    for q in dashboard_queries() {
        let names = q
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .filter(|w| w.starts_with("causeway_") || w.starts_with("causeway:"));
        for n in names {
            let known = if n.contains(':') {
                rules.contains(&format!("record: {n}"))
            } else {
                doc.contains(&format!("`{n}`"))
            };
            assert!(
                known,
                "{q}: {n} is neither an exported metric nor a recorded series"
            );
        }
    }
}

/// Percent-encodes a query parameter.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Controllers trace their API calls (one span per RPC), each write from
/// proposal to commit as a child of its call, and the fan-out of every
/// change to the open watches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controllers_trace_calls_proposals_and_fanout() {
    init_tracing();
    let (otlp, got, _stop) = collector().await;
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = format!("http://{otlp}");
    let (mut fed, _) = controllers(
        &tmp,
        1,
        &["--otlp-endpoint", &endpoint, "--trace-sample-ratio", "1"],
    )
    .await;
    let (echo, _echo_task) = causeway::local::echo_server(None).await.unwrap();
    add_echo_sites(&mut fed, echo).await;
    let spans = |f: &dyn Fn(&Got) -> bool| -> Vec<Got> {
        got.lock()
            .unwrap()
            .iter()
            .filter(|g| f(g))
            .cloned()
            .collect()
    };
    let rpc = |method: &'static str| {
        move |g: &Got| {
            g.name == "causeway.rpc"
                && g.attrs
                    .get("rpc.method")
                    .is_some_and(|m| m.ends_with(method))
        }
    };
    let (join, join_write) =
        eventually(Duration::from_secs(20), "Join and its write", async || {
            for j in spans(&rpc("/Join")) {
                if let Some(w) =
                    spans(&|g| g.name == "causeway.raft.propose" && g.parent == j.span_id).first()
                {
                    return Ok((j.clone(), w.clone()));
                }
            }
            Err(format!("{:?}", got.lock().unwrap()))
        })
        .await;
    assert_eq!(join.attrs["rpc.grpc.status_code"], "0");
    assert_eq!(join.attrs["causeway.caller"], "Anonymous");
    assert_eq!(join_write.attrs["causeway.command"], "JoinSite");
    assert_eq!(join_write.trace_id, join.trace_id);
    let publish = eventually(
        Duration::from_secs(20),
        "a PublishExports write",
        async || {
            spans(&|g| {
                g.name == "causeway.raft.propose"
                    && g.attrs
                        .get("causeway.command")
                        .is_some_and(|c| c == "PublishExports")
            })
            .first()
            .cloned()
            .ok_or("none yet")
        },
    )
    .await;
    let parent = spans(&|g| g.span_id == publish.parent);
    assert!(
        parent
            .first()
            .is_some_and(|p| p.attrs["rpc.method"].ends_with("/PublishExports")
                && p.attrs["causeway.caller"].contains("east")),
        "{parent:?}"
    );
    let fanout = eventually(
        Duration::from_secs(20),
        "a fan-out to watchers",
        async || {
            spans(&|g| {
                g.name == "causeway.watch.fanout"
                    && g.attrs.get("causeway.watchers").is_some_and(|w| w != "0")
            })
            .first()
            .cloned()
            .ok_or("none yet")
        },
    )
    .await;
    assert!(fanout.attrs["causeway.changes"].parse::<u32>().unwrap() >= 1);
    fed.shutdown().await;
}

/// `ctl traffic --output json` (the live view, one refresh): at the calling
/// gateway, the service's requests per second, 5xx share and p99 under
/// load, and the link to the exporting site with its round-trip time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_traffic_shows_request_rates_p99_and_links() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let (mut fed, _) = controllers(&tmp, 1, &[]).await;
    let (echo, _echo_task) = causeway::local::echo_server(None).await.unwrap();
    add_echo_sites(&mut fed, echo).await;
    let (web, _web_task) = http_backend("127.0.0.1:0", "east-web").await;
    add_exports_and_restart(&mut fed, "east", &web_http_export(web)).await;
    let http = imported(&fed, "west", "web.shop.svc.clusterset.local", 8080).await;
    eventually(Duration::from_secs(20), "a request to pass", async || {
        let got = http_get_any(http, "/warm").await;
        got.starts_with("HTTP/1.1 200").then_some(()).ok_or(got)
    })
    .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut c = HttpClient::connect(http).await;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (code, _, _) = c.get("/load").await;
                assert_eq!(code, 200);
            }
        }
    });
    let west_admin = fed.sites["west"].gateway_admin;
    let v = eventually(
        Duration::from_secs(30),
        "ctl traffic to show the load",
        async || {
            let out = tokio::process::Command::new(bin())
                .args(["ctl", "--output", "json", "traffic", "--gateway"])
                .arg(format!("west={west_admin}"))
                .args(["--interval", "1", "--count", "1"])
                .output()
                .await
                .map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let v: serde_json::Value = serde_json::from_str(text.trim())
                .map_err(|e| format!("{e}: {text} {}", String::from_utf8_lossy(&out.stderr)))?;
            let busy = v["services"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| s["service"] == "shop/web" && s["rps"].as_f64().unwrap_or(0.0) > 1.0);
            busy.then_some(v.clone()).ok_or(v.to_string())
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();
    let svc = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "shop/web")
        .unwrap();
    assert_eq!(svc["gateway"], "west");
    assert_eq!(svc["error_ratio"], 0.0);
    let p99 = svc["p99_ms"].as_f64().expect("a p99 under load");
    assert!(p99 > 0.0 && p99 < 10_000.0, "{svc}");
    let link = v["links"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["to"] == "east")
        .expect("the link to east");
    assert_eq!(link["up"], true);
    assert!(link["rtt_ms"].as_f64().is_some_and(|r| r > 0.0), "{link}");
    // Bad input names the flag and the fix.
    let (code, out) = run_bin(&["ctl", "traffic", "--gateway", "west"]);
    assert_ne!(code, 0);
    assert!(out.contains("SITE=HOST:PORT"), "{out}");
    fed.shutdown().await;
}
