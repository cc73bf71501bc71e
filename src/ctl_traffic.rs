//! `causeway ctl traffic`: a `top`-style live view of what the gateways
//! forward — per gateway and service, requests per second, the 5xx share
//! and p99; per link, round-trip time, loss and whether it is up — from
//! the gateways' metrics, refreshed every interval.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use crate::ctl::Output;
use crate::scrape::{label, value};

/// What one scrape of a gateway says.
#[derive(Debug, Default, Clone)]
pub struct Sample {
    /// Requests by service, and those answered 5xx.
    pub requests: BTreeMap<String, (f64, f64)>,
    /// Request duration histogram buckets by service: upper bound → count.
    pub buckets: BTreeMap<String, Vec<(f64, f64)>>,
    /// Round-trip time per peer site, seconds.
    pub rtt: BTreeMap<String, f64>,
    /// Packets sent and lost per peer site.
    pub packets: BTreeMap<String, (f64, f64)>,
    /// Peer sites whose tunnels are all down.
    pub unreachable: Vec<String>,
    /// Bytes spliced through tunnels, both directions.
    pub tunnel_bytes: f64,
}

/// Parses a gateway's metrics.
pub fn parse(text: &str) -> Sample {
    let mut s = Sample::default();
    for line in text.lines() {
        let Some(v) = value(line) else { continue };
        let name = line.split(['{', ' ']).next().unwrap_or("");
        match name {
            "causeway_http_requests_total" => {
                if let (Some(svc), Some(code)) = (label(line, "service"), label(line, "code")) {
                    let e = s.requests.entry(svc.to_string()).or_default();
                    e.0 += v;
                    if code.starts_with('5') {
                        e.1 += v;
                    }
                }
            }
            "causeway_http_request_duration_seconds_bucket" => {
                if let (Some(svc), Some(le)) = (label(line, "service"), label(line, "le")) {
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap_or(f64::INFINITY)
                    };
                    s.buckets.entry(svc.to_string()).or_default().push((le, v));
                }
            }
            "causeway_peer_rtt_seconds" => {
                if let Some(site) = label(line, "site") {
                    s.rtt.insert(site.to_string(), v);
                }
            }
            "causeway_peer_packets_sent" | "causeway_peer_packets_lost" => {
                if let Some(site) = label(line, "site") {
                    let e = s.packets.entry(site.to_string()).or_default();
                    if name.ends_with("sent") {
                        e.0 = v;
                    } else {
                        e.1 = v;
                    }
                }
            }
            "causeway_tunnel_bytes_total" => s.tunnel_bytes += v,
            "causeway_peer_unreachable" if v == 1.0 => {
                if let Some(site) = label(line, "site") {
                    s.unreachable.push(site.to_string());
                }
            }
            _ => {}
        }
    }
    for b in s.buckets.values_mut() {
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
    }
    s
}

/// The `q` quantile of the requests between two cumulative histograms
/// (Prometheus's `histogram_quantile` over a delta): linear within the
/// bucket it falls in; `None` without requests.
pub fn quantile(q: f64, before: &[(f64, f64)], now: &[(f64, f64)]) -> Option<f64> {
    let delta: Vec<(f64, f64)> = now
        .iter()
        .map(|(le, c)| {
            let old = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, (c - old).max(0.0))
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, c) in &delta {
        if c >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let within = if c > prev.1 {
                (rank - prev.1) / (c - prev.1)
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * within);
        }
        prev = (le, c);
    }
    Some(prev.0)
}

/// One interval's view, as JSON.
pub fn interval(
    before: &BTreeMap<String, Sample>,
    now: &BTreeMap<String, Sample>,
    secs: f64,
) -> serde_json::Value {
    let mut services = Vec::new();
    let mut links = Vec::new();
    for (gw, s) in now {
        let old = before.get(gw).cloned().unwrap_or_default();
        for (svc, (n, errs)) in &s.requests {
            let (n0, e0) = old.requests.get(svc).copied().unwrap_or((0.0, 0.0));
            let rps = ((n - n0) / secs).max(0.0);
            let err = (errs - e0).max(0.0);
            let p99 = quantile(
                0.99,
                old.buckets.get(svc).map_or(&[][..], |b| b),
                s.buckets.get(svc).map_or(&[][..], |b| b),
            );
            services.push(serde_json::json!({
                "gateway": gw, "service": svc, "rps": rps,
                "error_ratio": if n > &n0 { err / (n - n0) } else { 0.0 },
                "p99_ms": p99.map(|x| x * 1000.0),
            }));
        }
        let mut peers: Vec<&String> = s.rtt.keys().chain(s.unreachable.iter()).collect();
        peers.sort();
        peers.dedup();
        for to in peers {
            let (sent, lost) = s.packets.get(to).copied().unwrap_or_default();
            let (sent0, lost0) = old.packets.get(to).copied().unwrap_or_default();
            let ds = (sent - sent0).max(0.0);
            links.push(serde_json::json!({
                "from": gw, "to": to,
                "up": !s.unreachable.contains(to),
                "rtt_ms": s.rtt.get(to).map(|r| r * 1000.0),
                "loss_ratio": if ds > 0.0 { (lost - lost0).max(0.0) / ds } else { 0.0 },
            }));
        }
    }
    serde_json::json!({"interval_s": secs, "services": services, "links": links})
}

/// The text `ctl traffic` prints for one interval.
pub fn table(v: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<12} {:<28} {:>9} {:>7} {:>9}",
        "GATEWAY", "SERVICE", "REQ/S", "5XX%", "P99 MS"
    );
    for s in v["services"].as_array().into_iter().flatten() {
        let _ = writeln!(
            t,
            "{:<12} {:<28} {:>9.1} {:>7.1} {:>9}",
            s["gateway"].as_str().unwrap_or(""),
            s["service"].as_str().unwrap_or(""),
            s["rps"].as_f64().unwrap_or(0.0),
            s["error_ratio"].as_f64().unwrap_or(0.0) * 100.0,
            s["p99_ms"]
                .as_f64()
                .map_or("-".to_string(), |x| format!("{x:.2}")),
        );
    }
    let _ = writeln!(
        t,
        "\n{:<12} {:<12} {:<6} {:>9} {:>7}",
        "FROM", "TO", "STATE", "RTT MS", "LOSS%"
    );
    for l in v["links"].as_array().into_iter().flatten() {
        let _ = writeln!(
            t,
            "{:<12} {:<12} {:<6} {:>9} {:>7.2}",
            l["from"].as_str().unwrap_or(""),
            l["to"].as_str().unwrap_or(""),
            if l["up"].as_bool().unwrap_or(false) {
                "up"
            } else {
                "down"
            },
            l["rtt_ms"]
                .as_f64()
                .map_or("-".to_string(), |x| format!("{x:.2}")),
            l["loss_ratio"].as_f64().unwrap_or(0.0) * 100.0,
        );
    }
    t
}

/// Runs `ctl traffic`: `count` intervals (for ever when `None`).
pub async fn run(
    gateways: &[String],
    every: Duration,
    count: Option<u32>,
    output: Output,
) -> anyhow::Result<()> {
    if gateways.is_empty() {
        anyhow::bail!("--gateway SITE=HOST:PORT: name at least one gateway admin address");
    }
    let addrs = crate::scrape::gateway_flags(gateways)?;
    let sample = async || -> anyhow::Result<BTreeMap<String, Sample>> {
        let mut all = BTreeMap::new();
        for (site, addr) in &addrs {
            all.insert(
                site.clone(),
                parse(&crate::scrape::fetch(&addr.to_string()).await?),
            );
        }
        Ok(all)
    };
    let clear = output == Output::Text && std::io::stdout().is_terminal() && count != Some(1);
    let mut before = sample().await?;
    let mut at = Instant::now();
    let mut shown = 0;
    while count.is_none_or(|c| shown < c) {
        tokio::time::sleep(every).await;
        let now = sample().await?;
        let secs = at.elapsed().as_secs_f64();
        at = Instant::now();
        let v = interval(&before, &now, secs);
        match output {
            Output::Json => println!("{v}"),
            Output::Text => {
                if clear {
                    print!("\x1b[2J\x1b[H");
                }
                print!("{}", table(&v));
            }
        }
        before = now;
        shown += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_p99_falls_in_its_bucket() {
        let before = [(0.01, 0.0), (0.1, 0.0), (1.0, 0.0), (f64::INFINITY, 0.0)];
        // 90 requests under 10 ms, 10 between 100 ms and 1 s.
        let now = [
            (0.01, 90.0),
            (0.1, 90.0),
            (1.0, 100.0),
            (f64::INFINITY, 100.0),
        ];
        let p99 = quantile(0.99, &before, &now).unwrap();
        assert!((p99 - 0.91).abs() < 1e-9, "{p99}");
        let p50 = quantile(0.5, &before, &now).unwrap();
        assert!(p50 > 0.0 && p50 <= 0.01, "{p50}");
        assert_eq!(quantile(0.99, &now, &now), None);
    }

    #[test]
    fn an_interval_turns_counters_into_rates() {
        let text = |n: u32, e: u32| {
            format!(
                "causeway_http_requests_total{{service=\"shop/web\",code=\"200\"}} {n}\n\
                 causeway_http_requests_total{{service=\"shop/web\",code=\"503\"}} {e}\n\
                 causeway_peer_rtt_seconds{{site=\"east\"}} 0.002\n\
                 causeway_peer_packets_sent{{site=\"east\"}} {}\n\
                 causeway_peer_packets_lost{{site=\"east\"}} {e}\n\
                 causeway_peer_unreachable{{site=\"north\"}} 1\n",
                n * 10
            )
        };
        let before = BTreeMap::from([("west".to_string(), parse(&text(10, 0)))]);
        let now = BTreeMap::from([("west".to_string(), parse(&text(28, 2)))]);
        let v = interval(&before, &now, 2.0);
        let s = &v["services"][0];
        assert_eq!(s["rps"], 10.0);
        assert_eq!(s["error_ratio"], 0.1);
        let links = v["links"].as_array().unwrap();
        assert_eq!(links.len(), 2);
        assert_eq!(links[0]["to"], "east");
        assert_eq!(links[0]["rtt_ms"], 2.0);
        assert!((links[0]["loss_ratio"].as_f64().unwrap() - 2.0 / 180.0).abs() < 1e-9);
        assert_eq!(links[1]["to"], "north");
        assert_eq!(links[1]["up"], false);
        assert!(table(&v).contains("shop/web"));
    }
}
