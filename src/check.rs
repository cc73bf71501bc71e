//! `causeway check`: what is wrong with a federation, each finding with a
//! one-line fix (like `linkerd check`). It asks the controllers (with an
//! admin credential, or a site's own from a gateway host), and, when told
//! where they are, gateways' metrics and sites' DNS servers.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use causeway_api::identity;
use causeway_api::pb;
use clap::Args;
use serde::Serialize;

use crate::ctl::Output;

/// `causeway check` flags.
#[derive(Args)]
pub struct CheckArgs {
    /// Controllers and credential.
    #[command(flatten)]
    pub api: crate::ctl::ControllerFlags,
    /// On a gateway host: the site's state directory, whose credential and
    /// controller list are used instead of --creds and --controller.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// A gateway's admin port, SITE=HOST:PORT (repeatable): checks its
    /// tunnels and outbound listeners.
    #[arg(long = "gateway")]
    pub gateways: Vec<String>,
    /// A site's DNS server, SITE=HOST:PORT (repeatable): checks it answers
    /// for an exported service.
    #[arg(long = "dns")]
    pub dns: Vec<String>,
    /// Warn about certificates expiring within this many days.
    #[arg(long, default_value_t = 30)]
    pub warn_days: u64,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Fine.
    Ok,
    /// Works now, needs attention soon.
    Warn,
    /// Broken.
    Fail,
}

/// One check's finding.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// What was checked.
    pub check: String,
    /// How it came out.
    pub result: Verdict,
    /// What was found.
    pub detail: String,
    /// What to do (empty when fine).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

fn ok(check: &str, detail: impl Into<String>) -> Finding {
    Finding {
        check: check.into(),
        result: Verdict::Ok,
        detail: detail.into(),
        fix: String::new(),
    }
}

fn bad(check: &str, result: Verdict, detail: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        check: check.into(),
        result,
        detail: detail.into(),
        fix: fix.into(),
    }
}

/// Clock skew beyond which a node is flagged, and failed.
const SKEW_WARN_MS: i64 = 500;
const SKEW_FAIL_MS: i64 = 2_000;
/// Log entries a voter may trail the leader by before it is flagged.
const LAG_WARN: u64 = 1_000;
/// Free space below which a data disk is flagged (either bound), and
/// failed: the state is megabytes, so what matters is room for the log to
/// grow and a snapshot to be written.
const DISK_WARN_SHARE: f64 = 0.05;
const DISK_WARN_BYTES: u64 = 1 << 30;
const DISK_FAIL_BYTES: u64 = 256 << 20;

/// One node's answer, and the local clock around it.
struct NodeView {
    addr: String,
    status: Result<pb::StatusResponse, String>,
    skew_ms: i64,
}

/// Runs every check; prints them; `Ok(false)` when one failed.
pub async fn run(args: CheckArgs) -> anyhow::Result<bool> {
    // On a gateway host the site's own credential; else the admin's.
    let (all, admin_pem) = match &args.state_dir {
        Some(dir) => {
            let state = causeway_gateway::site::SiteState::load(dir)?
                .with_context(|| format!("--state-dir {}: no joined site there", dir.display()))?;
            let c = state.controller_client();
            (c.with_endpoints(c.endpoints().to_vec()), None)
        }
        None => {
            let all = crate::ctl::admin_client(&args.api.creds, args.api.controller.clone())
                .with_context(|| "or pass --state-dir on a gateway host")?;
            let admin = identity::read(&args.api.creds.join("admin.pem"))?;
            (all, Some(admin))
        }
    };
    let ca_pem = match &args.state_dir {
        Some(_) => None,
        None => Some(identity::read(&args.api.creds.join("ca.pem"))?),
    };
    let endpoints = all.endpoints().to_vec();
    let per_node = |ep: &String| all.with_endpoints(vec![ep.clone()]);

    let mut nodes = Vec::new();
    for ep in &endpoints {
        let c = per_node(ep);
        let sent = causeway_api::clock::unix_ms();
        let started = Instant::now();
        let status = tokio::time::timeout(Duration::from_secs(3), async {
            let mut f = c.federation().await.map_err(|e| e.to_string())?;
            f.status(pb::StatusRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|s| s.message().to_string())
        })
        .await
        .unwrap_or_else(|_| Err("no answer within 3 s".into()));
        let mid = sent + started.elapsed().as_millis() as u64 / 2;
        let skew_ms = status.as_ref().map_or(0, |s| s.now_ms as i64 - mid as i64);
        nodes.push(NodeView {
            addr: ep.clone(),
            status,
            skew_ms,
        });
    }
    let catalog = all.catalog(true).await.ok();

    let mut findings = vec![
        reachable(&nodes),
        leader(&nodes),
        quorum(&nodes),
        skew(&nodes),
    ];
    findings.extend(certificates(
        &nodes,
        ca_pem.as_deref(),
        admin_pem.as_deref(),
        args.warn_days,
    ));
    findings.push(disks(&nodes));
    findings.push(versions(&nodes));
    match &catalog {
        Some(c) => {
            findings.push(leases(c));
            findings.push(policies(c));
        }
        None => findings.push(bad(
            "catalog",
            Verdict::Fail,
            "no controller served a linearizable catalog read",
            "make a majority of controllers reachable (see above), then check again",
        )),
    }
    findings.extend(gateways(&args.gateways).await?);
    findings.extend(dns(&args.dns, catalog.as_ref()).await?);

    let failed = findings.iter().any(|f| f.result == Verdict::Fail);
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "ok": !failed,
                "checks": findings,
            }))?
        ),
        Output::Text => {
            for f in &findings {
                let mark = match f.result {
                    Verdict::Ok => "✓",
                    Verdict::Warn => "!",
                    Verdict::Fail => "✗",
                };
                println!("{mark} {}: {}", f.check, f.detail);
                if !f.fix.is_empty() {
                    println!("    fix: {}", f.fix);
                }
            }
            let (w, x) = (
                findings
                    .iter()
                    .filter(|f| f.result == Verdict::Warn)
                    .count(),
                findings
                    .iter()
                    .filter(|f| f.result == Verdict::Fail)
                    .count(),
            );
            println!("{} checks: {} failed, {} warnings", findings.len(), x, w);
        }
    }
    Ok(!failed)
}

fn reachable(nodes: &[NodeView]) -> Finding {
    let down: Vec<String> = nodes
        .iter()
        .filter_map(|n| n.status.as_ref().err().map(|e| format!("{} ({e})", n.addr)))
        .collect();
    if down.is_empty() {
        ok(
            "controllers reachable",
            format!("{} of {}", nodes.len(), nodes.len()),
        )
    } else {
        bad(
            "controllers reachable",
            Verdict::Fail,
            format!(
                "{} of {} answer; not: {}",
                nodes.len() - down.len(),
                nodes.len(),
                down.join(", ")
            ),
            "start the controllers that do not answer (`causeway controller …`), or fix the network path to them (TCP to their API port)",
        )
    }
}

fn leader(nodes: &[NodeView]) -> Finding {
    let leaders: std::collections::BTreeSet<u64> = nodes
        .iter()
        .filter_map(|n| n.status.as_ref().ok())
        .map(|s| s.leader_id)
        .collect();
    match leaders.iter().copied().collect::<Vec<_>>().as_slice() {
        [l] if *l != 0 => ok("leader", format!("every node that answers names node {l}")),
        [] => bad(
            "leader",
            Verdict::Fail,
            "no node answered",
            "see `controllers reachable`",
        ),
        many => bad(
            "leader",
            Verdict::Fail,
            format!("the nodes name different leaders or none: {many:?} (0: none)"),
            "a majority of voters must reach each other: check the network between controllers and that a majority runs",
        ),
    }
}

fn quorum(nodes: &[NodeView]) -> Finding {
    let Some(leader) = nodes
        .iter()
        .filter_map(|n| n.status.as_ref().ok())
        .find(|s| s.role == "leader")
    else {
        return bad(
            "quorum",
            Verdict::Fail,
            "no node that answers is the leader",
            "start enough controllers for a majority of the voters; if a majority is gone for good, see docs/operations.md (quorum loss)",
        );
    };
    let voters: Vec<&pb::NodeStatus> = leader.nodes.iter().filter(|n| n.voter).collect();
    let lagging: Vec<String> = voters
        .iter()
        .filter(|n| n.id != leader.node_id)
        .filter(|n| leader.last_log_index.saturating_sub(n.matched_index) > LAG_WARN)
        .map(|n| {
            format!(
                "node {} ({} entries behind)",
                n.id,
                leader.last_log_index.saturating_sub(n.matched_index)
            )
        })
        .collect();
    let healthy = voters.len() - lagging.len();
    let need = voters.len() / 2 + 1;
    if healthy < need {
        bad(
            "quorum",
            Verdict::Fail,
            format!(
                "{healthy} of {} voters keep up; a majority is {need}",
                voters.len()
            ),
            "bring the lagging or stopped voters back; writes stall without a majority",
        )
    } else if !lagging.is_empty() {
        bad(
            "quorum",
            Verdict::Warn,
            format!(
                "{healthy} of {} voters keep up; behind: {}",
                voters.len(),
                lagging.join(", ")
            ),
            "check the lagging nodes' disks and network; one more failure would stop writes",
        )
    } else {
        ok(
            "quorum",
            format!(
                "{} voters, all within {LAG_WARN} entries of the leader (node {})",
                voters.len(),
                leader.node_id
            ),
        )
    }
}

fn skew(nodes: &[NodeView]) -> Finding {
    let worst = nodes
        .iter()
        .filter(|n| n.status.is_ok())
        .max_by_key(|n| n.skew_ms.abs());
    let Some(w) = worst else {
        return bad(
            "clock skew",
            Verdict::Fail,
            "no node answered",
            "see `controllers reachable`",
        );
    };
    let detail = format!("largest: {} at {} ms from this host", w.addr, w.skew_ms);
    let fix = "synchronize the clocks (chrony or systemd-timesyncd) on the controller hosts and this one; join tokens and credentials are checked against them";
    match w.skew_ms.abs() {
        s if s > SKEW_FAIL_MS => bad("clock skew", Verdict::Fail, detail, fix),
        s if s > SKEW_WARN_MS => bad("clock skew", Verdict::Warn, detail, fix),
        _ => ok("clock skew", detail),
    }
}

/// The validity of the first certificate of a PEM text.
fn first_validity(pem: &str) -> Option<(u64, u64)> {
    let certs = identity::parse_certs_pem("certificate", pem).ok()?;
    identity::validity_ms(certs.first()?)
}

fn expiry(check: &str, what: &str, not_after_ms: u64, warn_days: u64, fix: &str) -> Finding {
    let now = causeway_api::clock::unix_ms();
    let days = (not_after_ms as i64 - now as i64) / 86_400_000;
    if not_after_ms <= now {
        bad(check, Verdict::Fail, format!("{what} has expired"), fix)
    } else if days < warn_days as i64 {
        bad(
            check,
            Verdict::Warn,
            format!("{what} expires in {days} days"),
            fix,
        )
    } else {
        ok(check, format!("{what} valid for {days} more days"))
    }
}

fn certificates(
    nodes: &[NodeView],
    ca: Option<&str>,
    admin_cert: Option<&str>,
    warn_days: u64,
) -> Vec<Finding> {
    let mut out = Vec::new();
    if let Some(ca_pem) = ca {
        if let Some((_, to)) = first_validity(ca_pem) {
            out.push(expiry(
                "controller CA",
                "the controller CA",
                to,
                warn_days,
                "rotate the controller CA before it expires (docs/operations.md: rotation)",
            ));
        }
    }
    if let Some(pem) = admin_cert {
        if let Some((_, to)) = first_validity(pem) {
            out.push(expiry(
                "admin credential",
                "this admin credential",
                to,
                warn_days,
                "issue a new one (`causeway ctl admin issue`) and use it",
            ));
        }
    }
    let mut worst: Option<(u64, u64)> = None;
    for s in nodes.iter().filter_map(|n| n.status.as_ref().ok()) {
        if s.cert_not_after_ms != 0 && worst.is_none_or(|(_, t)| s.cert_not_after_ms < t) {
            worst = Some((s.node_id, s.cert_not_after_ms));
        }
    }
    if let Some((id, to)) = worst {
        out.push(expiry(
            "node certificates",
            &format!("the soonest, node {id}'s,"),
            to,
            warn_days.min(10),
            &format!(
                "restart controller {id} (a node issues itself a new certificate at every start)"
            ),
        ));
    }
    out
}

/// Which release each controller runs: one is fine; two (an upgrade under
/// way) is a warning; more, or one this client's build does not work with,
/// fails.
fn versions(nodes: &[NodeView]) -> Finding {
    use causeway_api::version;
    let mut by: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut too_old = Vec::new();
    for s in nodes.iter().filter_map(|n| n.status.as_ref().ok()) {
        // Builds before 0.2.0 did not say (protocol 1).
        let v = if s.version.is_empty() {
            "before 0.2.0".to_string()
        } else {
            s.version.clone()
        };
        by.entry(v).or_default().push(s.node_id);
        if version::check_peer("", version::protocol_of_payload(s.protocol)).is_err() {
            too_old.push(s.node_id);
        }
    }
    let list = by
        .iter()
        .map(|(v, ids)| {
            let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
            format!("{v} on {}", ids.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ");
    if !too_old.is_empty() || by.len() > 2 {
        return bad(
            "versions",
            Verdict::Fail,
            format!("controllers run {list}"),
            "upgrade one release at a time: every controller to the same release before the next (docs/operations.md, Upgrades)",
        );
    }
    match by.len() {
        0 => bad(
            "versions",
            Verdict::Warn,
            "no node reported its version",
            "see `controllers reachable`",
        ),
        1 => ok("versions", format!("controllers run {list}")),
        _ => bad(
            "versions",
            Verdict::Warn,
            format!("controllers run {list} (an upgrade under way)"),
            "finish the upgrade: the rest of the controllers one at a time, then the gateways (docs/operations.md, Upgrades)",
        ),
    }
}

fn disks(nodes: &[NodeView]) -> Finding {
    let mut worst: Option<(u64, f64, u64)> = None;
    for s in nodes.iter().filter_map(|n| n.status.as_ref().ok()) {
        if s.data_total_bytes == 0 {
            continue;
        }
        let share = s.data_free_bytes as f64 / s.data_total_bytes as f64;
        if worst.is_none_or(|(_, w, _)| share < w) {
            worst = Some((s.node_id, share, s.data_free_bytes));
        }
    }
    let Some((id, share, free)) = worst else {
        return bad(
            "data disks",
            Verdict::Warn,
            "no node reported its disk",
            "see `controllers reachable`",
        );
    };
    let detail = format!(
        "the fullest, node {id}'s, has {:.0}% free ({} MB)",
        share * 100.0,
        free / 1_000_000
    );
    let fix = format!(
        "free space on controller {id}'s data disk: the log and snapshots need room, and a full disk stops its writes"
    );
    if free < DISK_FAIL_BYTES {
        bad("data disks", Verdict::Fail, detail, fix)
    } else if share < DISK_WARN_SHARE || free < DISK_WARN_BYTES {
        bad("data disks", Verdict::Warn, detail, fix)
    } else {
        ok("data disks", detail)
    }
}

fn leases(c: &pb::CatalogSnapshot) -> Finding {
    let lapsed: Vec<&str> = c
        .sites
        .iter()
        .filter(|s| !s.available)
        .map(|s| s.name.as_str())
        .collect();
    if lapsed.is_empty() {
        ok(
            "site leases",
            format!("all {} sites heartbeat", c.sites.len()),
        )
    } else {
        bad(
            "site leases",
            Verdict::Fail,
            format!(
                "lapsed (out of routing and DNS): {}",
                lapsed.join(", ")
            ),
            "check that those sites' gateways run and reach the controllers (`causeway check --state-dir` on the gateway host)",
        )
    }
}

fn policies(c: &pb::CatalogSnapshot) -> Finding {
    let sites: std::collections::BTreeSet<&str> = c.sites.iter().map(|s| s.name.as_str()).collect();
    let exported: std::collections::BTreeSet<&str> = c
        .exports
        .iter()
        .flat_map(|e| e.exports.iter().map(|x| x.service.as_str()))
        .collect();
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    for p in &c.policies {
        let label = format!("{} {}/{}", p.kind, p.namespace, p.name);
        let Ok(doc) = serde_json::from_str::<serde_json::Value>(&p.document_json) else {
            problems.push(format!("{label}: unreadable document"));
            continue;
        };
        let Ok(policy) = causeway_api::policy::parse_document(&doc) else {
            problems.push(format!("{label}: no longer valid"));
            continue;
        };
        let service = format!("{}/{}", policy.namespace, policy.spec.service());
        if !exported.contains(service.as_str()) {
            warnings.push(format!("{label}: no site exports {service}"));
        }
        let named: Vec<String> = match &policy.spec {
            causeway_api::policy::Spec::FailoverPolicy(f) => f.sites.clone(),
            causeway_api::policy::Spec::TrafficSplit(t) => t.weights.keys().cloned().collect(),
            _ => Vec::new(),
        };
        for s in named {
            if !sites.contains(s.as_str()) {
                problems.push(format!("{label}: names site {s:?}, which is not a member"));
            }
        }
    }
    if !problems.is_empty() {
        bad(
            "policies",
            Verdict::Fail,
            problems.join("; "),
            "fix the policy (`causeway ctl policy apply`) or delete it (`causeway ctl policy delete`)",
        )
    } else if !warnings.is_empty() {
        bad(
            "policies",
            Verdict::Warn,
            warnings.join("; "),
            "export the service, or delete the policy if it is stale",
        )
    } else {
        ok(
            "policies",
            format!(
                "{} policies, each names exported services and member sites",
                c.policies.len()
            ),
        )
    }
}

async fn gateways(flags: &[String]) -> anyhow::Result<Vec<Finding>> {
    let mut out = Vec::new();
    if flags.is_empty() {
        out.push(bad(
            "tunnels",
            Verdict::Warn,
            "not checked",
            "pass --gateway SITE=ADMIN_HOST:PORT for each site's gateway to check its tunnels and listeners",
        ));
        return Ok(out);
    }
    for (site, addr) in crate::scrape::gateway_flags(flags)? {
        let text = match crate::scrape::fetch(&addr.to_string()).await {
            Ok(t) => t,
            Err(e) => {
                out.push(bad(
                    &format!("tunnels from {site}"),
                    Verdict::Fail,
                    format!("{e:#}"),
                    format!("start {site}'s gateway, or pass its admin address (--admin-listen)"),
                ));
                continue;
            }
        };
        let s = crate::ctl_traffic::parse(&text);
        let rtts: Vec<String> = s
            .rtt
            .iter()
            .map(|(peer, r)| format!("{peer} {:.1} ms", r * 1000.0))
            .collect();
        if s.unreachable.is_empty() {
            out.push(ok(
                &format!("tunnels from {site}"),
                if rtts.is_empty() {
                    "no peer in use yet".to_string()
                } else {
                    format!("up: {}", rtts.join(", "))
                },
            ));
        } else {
            out.push(bad(
                &format!("tunnels from {site}"),
                Verdict::Fail,
                format!("down to {}", s.unreachable.join(", ")),
                format!(
                    "check that {site} reaches those sites' tunnel addresses over UDP (firewalls, `tunnel_advertise`) and that their gateways run"
                ),
            ));
        }
        let listener_errors: f64 = text
            .lines()
            .filter(|l| l.starts_with("causeway_outbound_listener_errors_total"))
            .filter_map(crate::scrape::value)
            .sum();
        if listener_errors > 0.0 {
            out.push(bad(
                &format!("VIP range of {site}"),
                Verdict::Fail,
                format!("{listener_errors} outbound listeners could not bind"),
                format!(
                    "choose a `vip_range` for {site}'s gateway whose addresses nothing else uses"
                ),
            ));
        } else {
            out.push(ok(
                &format!("VIP range of {site}"),
                "every outbound listener bound",
            ));
        }
    }
    Ok(out)
}

async fn dns(
    flags: &[String],
    catalog: Option<&pb::CatalogSnapshot>,
) -> anyhow::Result<Vec<Finding>> {
    let mut out = Vec::new();
    if flags.is_empty() {
        return Ok(out);
    }
    let servers = crate::scrape::gateway_flags(flags)
        .map_err(|e| anyhow::anyhow!("{}", e.to_string().replace("--gateway", "--dns")))?;
    for (site, server) in servers {
        // An exported service, preferably another site's.
        let name = catalog.and_then(|c| {
            let pick = c
                .exports
                .iter()
                .find(|e| e.site != site && !e.exports.is_empty())
                .or_else(|| c.exports.iter().find(|e| !e.exports.is_empty()))?;
            let svc = &pick.exports[0].service;
            let (ns, n) = svc.split_once('/')?;
            Some(format!("{n}.{ns}.svc.clusterset.local"))
        });
        let Some(name) = name else {
            out.push(bad(
                &format!("DNS of {site}"),
                Verdict::Warn,
                "no exported service to ask for",
                "export a service, then check again",
            ));
            continue;
        };
        match crate::local::dns_a(server, &name).await {
            Ok(a) if !a.is_empty() => out.push(ok(
                &format!("DNS of {site}"),
                format!("{name} -> {}", a[0]),
            )),
            Ok(_) => out.push(bad(
                &format!("DNS of {site}"),
                Verdict::Fail,
                format!("{name}: no address"),
                format!("check {site}'s DNS server has the catalog (its /ready) and the service's lease"),
            )),
            Err(e) => out.push(bad(
                &format!("DNS of {site}"),
                Verdict::Fail,
                format!("{name} at {server}: {e:#}"),
                format!("start {site}'s DNS server (`causeway dns`), or fix the address"),
            )),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, f: impl FnOnce(&mut pb::StatusResponse), skew_ms: i64) -> NodeView {
        let mut s = pb::StatusResponse {
            node_id: id,
            ..Default::default()
        };
        f(&mut s);
        NodeView {
            addr: format!("10.0.0.{id}:7001"),
            status: Ok(s),
            skew_ms,
        }
    }

    #[test]
    fn skew_warns_then_fails_with_the_worst_node_named() {
        let f = skew(&[node(1, |_| {}, 20), node(2, |_| {}, -30)]);
        assert_eq!(f.result, Verdict::Ok);
        let f = skew(&[node(1, |_| {}, 20), node(2, |_| {}, -900)]);
        assert_eq!(f.result, Verdict::Warn);
        assert!(
            f.detail.contains("10.0.0.2:7001 at -900 ms"),
            "{}",
            f.detail
        );
        let f = skew(&[node(1, |_| {}, 5_000)]);
        assert_eq!(f.result, Verdict::Fail);
        assert!(f.fix.contains("chrony"), "{}", f.fix);
    }

    #[test]
    fn expiry_warns_inside_the_window_and_fails_once_past() {
        let now = causeway_api::clock::unix_ms();
        let day = 86_400_000;
        assert_eq!(
            expiry("c", "x", now + 90 * day, 30, "f").result,
            Verdict::Ok
        );
        let w = expiry("c", "x", now + 12 * day + 1000, 30, "renew it");
        assert_eq!(w.result, Verdict::Warn);
        assert!(w.detail.contains("12 days") && w.fix == "renew it", "{w:?}");
        assert_eq!(expiry("c", "x", now - 1, 30, "f").result, Verdict::Fail);
    }

    #[test]
    fn mixed_releases_warn_during_an_upgrade() {
        let v = |ver: &'static str| move |s: &mut pb::StatusResponse| s.version = ver.into();
        let f = versions(&[node(1, v("0.2.0"), 0), node(2, v("0.2.0"), 0)]);
        assert_eq!(f.result, Verdict::Ok, "{f:?}");
        let f = versions(&[node(1, v("0.2.0"), 0), node(2, v(""), 0)]);
        assert_eq!(f.result, Verdict::Warn, "{f:?}");
        assert!(f.detail.contains("before 0.2.0 on 2"), "{}", f.detail);
        assert!(f.fix.contains("finish the upgrade"), "{}", f.fix);
        let f = versions(&[
            node(1, v("0.2.0"), 0),
            node(2, v(""), 0),
            node(3, v("0.3.0"), 0),
        ]);
        assert_eq!(f.result, Verdict::Fail, "{f:?}");
    }

    #[test]
    fn disks_are_judged_by_the_fullest_node() {
        let gb = 1u64 << 30;
        let disk = |free: u64, total: u64| {
            move |s: &mut pb::StatusResponse| {
                s.data_free_bytes = free;
                s.data_total_bytes = total;
            }
        };
        let f = disks(&[
            node(1, disk(50 * gb, 100 * gb), 0),
            node(2, disk(40 * gb, 100 * gb), 0),
        ]);
        assert_eq!(f.result, Verdict::Ok);
        assert!(f.detail.contains("node 2"), "{}", f.detail);
        // A big disk 3% free has room: a warning, not a failure.
        let f = disks(&[node(1, disk(8 * gb, 250 * gb), 0)]);
        assert_eq!(f.result, Verdict::Warn);
        let f = disks(&[node(3, disk(100 << 20, 10 * gb), 0)]);
        assert_eq!(f.result, Verdict::Fail);
        assert!(f.fix.contains("controller 3"), "{}", f.fix);
    }

    #[test]
    fn quorum_fails_without_a_keeping_up_majority() {
        let leader = |lags: &[u64]| {
            node(
                1,
                |s| {
                    s.role = "leader".into();
                    s.last_log_index = 5_000;
                    s.nodes = lags
                        .iter()
                        .enumerate()
                        .map(|(i, lag)| pb::NodeStatus {
                            id: i as u64 + 1,
                            voter: true,
                            matched_index: 5_000 - lag,
                            ..Default::default()
                        })
                        .collect();
                },
                0,
            )
        };
        assert_eq!(quorum(&[leader(&[0, 3, 10])]).result, Verdict::Ok);
        assert_eq!(quorum(&[leader(&[0, 3, 4_000])]).result, Verdict::Warn);
        assert_eq!(quorum(&[leader(&[0, 4_000, 4_000])]).result, Verdict::Fail);
    }
}
