//! One chaos run: build the federation on the hosts, start the workloads,
//! let the nemesis work for the given time, heal everything, wait for
//! recovery, then check what was recorded and write the report.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::cluster::{targets_of, Cluster, CONTROLLERS, SITES};
use crate::history::Entry;
use crate::lin::{self, Verdict};
use crate::nemesis::{self, Kind};
use crate::net::Net;
use crate::watch;
use crate::workload::{self, Recorder};

/// How long after a data-plane fault heals its failed calls are still
/// attributed to it.
pub const GRACE: Duration = Duration::from_secs(15);
/// The stated bound: once the last fault is healed, every call succeeds
/// within this.
pub const RECOVERY_BOUND: Duration = Duration::from_secs(30);
/// Search steps the linearizability checker may take per register.
const MAX_STEPS: u64 = 20_000_000;

/// How faults are scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Each chosen kind once, alone, in order (the CI set).
    Each,
    /// Kinds at random, sometimes two at once, until the time is up.
    Mixed,
}

/// What a run is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The fault kinds to use.
    pub kinds: Vec<Kind>,
    /// The schedule.
    pub mode: Mode,
    /// For `Mixed`: how long the nemesis works.
    pub seconds: u64,
    /// For `Each`: how long each fault lasts.
    pub fault_secs: u64,
    /// The seed of every random choice.
    pub seed: u64,
    /// Where data, logs, history and report go.
    pub out: PathBuf,
    /// The `causeway` binary.
    pub bin: PathBuf,
}

/// One fault as it happened.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultRecord {
    /// Its kind.
    pub kind: Kind,
    /// What was done.
    pub detail: String,
    /// Seconds since the start when it began.
    pub start_s: f64,
    /// When it was healed.
    pub end_s: f64,
    /// Whether it could be applied (else why not).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The report of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// The seed; `--seed` replays the same choices.
    pub seed: u64,
    /// The schedule.
    pub mode: Mode,
    /// Seconds from the workloads' start to the end of the checks' window.
    pub duration_s: f64,
    /// Faults as injected.
    pub faults: Vec<FaultRecord>,
    /// How many of each kind were applied.
    pub faults_by_kind: BTreeMap<String, usize>,
    /// Register operations: total, ok, fail, unknown.
    pub operations: BTreeMap<String, usize>,
    /// Registers whose history is not linearizable (must be none).
    pub linearizability_violations: Vec<String>,
    /// Registers the checker could not decide within its step bound.
    pub linearizability_unknown: Vec<u32>,
    /// Watch events checked.
    pub watch_events: usize,
    /// Watch resyncs (snapshots after the first), per watcher.
    pub watch_resyncs: BTreeMap<String, usize>,
    /// Watch-order violations (must be none).
    pub watch_violations: Vec<String>,
    /// Set elements acknowledged.
    pub set_acknowledged: usize,
    /// Acknowledged set elements missing at the end (must be 0).
    pub acknowledged_writes_lost: usize,
    /// Data-plane calls made.
    pub calls: usize,
    /// Calls that failed.
    pub calls_failed: usize,
    /// Failed calls inside no fault window (must be 0).
    pub calls_failed_unattributed: usize,
    /// Failed calls during faults that hit only the control plane (the
    /// sites should ride those out: static stability).
    pub calls_failed_control_plane_faults: usize,
    /// Stretches (start, end seconds) in which some call failed.
    pub unavailability_windows: Vec<(f64, f64)>,
    /// Seconds from the last heal to the last failed call (0: none failed
    /// after it).
    pub recovery_s: f64,
    /// Whether every controller agreed on the leader and applied state at
    /// the end.
    pub controllers_converged: bool,
    /// The problems that fail the run (empty: it passed).
    pub failures: Vec<String>,
}

fn secs(ns: u64) -> f64 {
    (ns as f64 / 1e9 * 1000.0).round() / 1000.0
}

/// Runs the whole thing; the report (also written to `out`).
pub async fn run(opts: &Options, net: &Net) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&opts.out)?;
    let mut rng = StdRng::seed_from_u64(opts.seed);
    tracing::info!(seed = opts.seed, out = %opts.out.display(), "chaos run");
    let mut cluster = Cluster::start_controllers(net, opts.bin.clone(), opts.out.clone()).await?;
    let result = run_with(opts, net, &mut cluster, &mut rng).await;
    if result.is_err() {
        eprintln!("{}", cluster.fed.diagnose(15).await);
    }
    cluster.shutdown().await;
    result
}

async fn run_with(
    opts: &Options,
    net: &Net,
    cluster: &mut Cluster,
    rng: &mut StdRng,
) -> anyhow::Result<Report> {
    let rec = Recorder::new();
    // Site workloads first: the exports' health checks need their servers.
    let calling = Arc::new(AtomicBool::new(false));
    let mut dns_of = BTreeMap::new();
    let mut threads = Vec::new();
    for site in SITES {
        let dns = Arc::new(Mutex::new(None));
        dns_of.insert(site, dns.clone());
        threads.push(workload::site_workload(
            site.into(),
            net.host(site).netns.clone(),
            dns,
            targets_of(site),
            rec.clone(),
            calling.clone(),
        )?);
    }
    cluster.start_sites(net).await?;
    for site in SITES {
        let server = cluster.fed.sites[site].dns;
        *dns_of[site].lock().expect("dns") = Some(server);
        for (name, _) in targets_of(site) {
            cluster
                .fed
                .wait_resolvable(site, &name, Duration::from_secs(60))
                .await
                .with_context(|| format!("{name} from site {site} before any fault"))?;
        }
    }
    calling.store(true, Ordering::Relaxed);

    let nodes: workload::Nodes = Arc::new(
        CONTROLLERS
            .iter()
            .map(|id| Ok((*id, cluster.fed.admin_client(Some(*id))?)))
            .collect::<anyhow::Result<Vec<_>>>()?,
    );
    let mut tasks = Vec::new();
    let clients = 6;
    for i in 0..clients {
        tasks.push(tokio::spawn(workload::register_client(
            i,
            clients,
            nodes.clone(),
            rec.clone(),
            opts.seed,
        )));
    }
    tasks.push(tokio::spawn(workload::set_client(
        nodes.clone(),
        rec.clone(),
        opts.seed,
    )));
    for id in [1u64, 3, 5] {
        tasks.push(tokio::spawn(workload::watcher(
            format!("c{id}"),
            cluster.fed.admin_client(Some(id))?,
            rec.clone(),
        )));
    }

    // A quiet start: the workloads settle before the first fault.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let faults = schedule(opts, net, cluster, rng, &rec).await;
    let last_heal = rec.now();

    // Recovery: every controller back, and calls succeeding again.
    net.heal_all()?;
    for id in CONTROLLERS {
        let _ = cluster.signal(id, "CONT");
        cluster.start(id, "")?;
    }
    let converged = converge(cluster).await;
    // Let the workloads run on a while, so failures after the last heal
    // have time to show and recovery can be measured.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let end = rec.now();
    rec.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    for t in threads {
        let _ = t.join();
    }
    let present = workload::set_present(&nodes).await;

    let report = judge(opts, &rec, faults, last_heal, end, present, converged);
    write_outputs(opts, &rec, &report)?;
    Ok(report)
}

/// Waits (up to the recovery bound) until all five nodes name the same
/// leader and have applied the same index.
async fn converge(cluster: &Cluster) -> bool {
    causeway::local::wait::until(RECOVERY_BOUND, "the controllers to converge", async || {
        let mut seen = BTreeSet::new();
        for id in CONTROLLERS {
            let s = tokio::time::timeout(Duration::from_secs(1), cluster.fed.status(id))
                .await
                .ok()?
                .ok()?;
            if s.leader_id == 0 {
                return None;
            }
            seen.insert((s.leader_id, s.applied_index));
        }
        (seen.len() == 1).then_some(())
    })
    .await
    .is_ok()
}

/// Injects and heals faults as `opts` says; what happened.
async fn schedule(
    opts: &Options,
    net: &Net,
    cluster: &mut Cluster,
    rng: &mut StdRng,
    rec: &Recorder,
) -> Vec<FaultRecord> {
    let mut out = Vec::new();
    match opts.mode {
        Mode::Each => {
            for kind in &opts.kinds {
                let hold = Duration::from_secs(opts.fault_secs);
                let batch = apply(&[*kind], hold, net, cluster, rng, rec).await;
                out.extend(batch);
                // Quiet until the federation is whole again, at most the
                // recovery bound, before the next fault.
                let _ = converge(cluster).await;
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
        }
        Mode::Mixed => {
            let until = rec.now() + opts.seconds * 1_000_000_000;
            while rec.now() < until {
                let mut chosen: Vec<Kind> = vec![*opts.kinds.choose(rng).expect("kinds")];
                if rng.random_bool(0.4) {
                    let second = *opts.kinds.choose(rng).expect("kinds");
                    let active: BTreeSet<Kind> = chosen.iter().copied().collect();
                    if nemesis::can_add(second, &active) {
                        chosen.push(second);
                    }
                }
                let hold = Duration::from_millis(rng.random_range(3_000..10_000));
                out.extend(apply(&chosen, hold, net, cluster, rng, rec).await);
                let _ = converge(cluster).await;
                let quiet = rng.random_range(2_000..6_000);
                tokio::time::sleep(Duration::from_millis(quiet)).await;
            }
        }
    }
    out
}

/// Puts `kinds` in force for `hold`, then heals them (last first).
async fn apply(
    kinds: &[Kind],
    hold: Duration,
    net: &Net,
    cluster: &mut Cluster,
    rng: &mut StdRng,
    rec: &Recorder,
) -> Vec<FaultRecord> {
    let mut active = Vec::new();
    let mut records = Vec::new();
    for kind in kinds {
        let start = rec.now();
        match nemesis::inject(*kind, cluster, net, rng).await {
            Ok(f) => {
                tracing::info!(fault = kind.name(), detail = %f.detail, "inject");
                records.push(FaultRecord {
                    kind: *kind,
                    detail: f.detail.clone(),
                    start_s: secs(start),
                    end_s: 0.0,
                    error: None,
                });
                active.push((records.len() - 1, f));
            }
            Err(e) => {
                tracing::warn!(fault = kind.name(), "could not inject: {e:#}");
                records.push(FaultRecord {
                    kind: *kind,
                    detail: String::new(),
                    start_s: secs(start),
                    end_s: secs(rec.now()),
                    error: Some(format!("{e:#}")),
                });
            }
        }
    }
    tokio::time::sleep(hold).await;
    while let Some((i, f)) = active.pop() {
        let kind = f.kind;
        if let Err(e) = nemesis::heal(f, cluster, net).await {
            tracing::warn!(fault = kind.name(), "heal failed: {e:#}");
            records[i].error = Some(format!("heal: {e:#}"));
        }
        records[i].end_s = secs(rec.now());
        tracing::info!(fault = kind.name(), "healed");
    }
    records
}

/// Checks the records and builds the report.
fn judge(
    opts: &Options,
    rec: &Recorder,
    faults: Vec<FaultRecord>,
    last_heal: u64,
    end: u64,
    present: Result<Vec<u64>, tonic::Status>,
    converged: bool,
) -> Report {
    let mut failures = Vec::new();
    let history = rec.history.lock().expect("recorder").clone();
    let mut operations = BTreeMap::new();
    for e in &history {
        let o = match e.outcome {
            crate::history::Outcome::Ok => "ok",
            crate::history::Outcome::Fail => "fail",
            crate::history::Outcome::Info => "unknown",
        };
        *operations.entry(o.to_string()).or_insert(0) += 1;
    }
    operations.insert("total".into(), history.len());

    let verdicts = lin::check(&history, MAX_STEPS);
    let mut lin_violations = Vec::new();
    let mut lin_unknown = Vec::new();
    for (key, v) in &verdicts {
        match v {
            Verdict::Violation { .. } => {
                let h: Vec<Entry> = history.iter().filter(|e| e.key == *key).copied().collect();
                let msg = format!(
                    "register k{key}: not linearizable; the last operations placed, then the one that could not be:\n  {}",
                    excerpt(&h, v)
                );
                failures.push(msg.clone());
                lin_violations.push(msg);
            }
            Verdict::Unknown(steps) => {
                // Undecided in full; what the narrowed history shows is a
                // likely violation (unless a write nobody saw explains it).
                let h: Vec<Entry> = history.iter().filter(|e| e.key == *key).copied().collect();
                let t = lin::tighten(&h);
                let likely = lin::check_key(&t, MAX_STEPS);
                let msg = match likely {
                    Verdict::Violation { .. } => format!(
                        "register k{key}: undecided after {steps} steps; without the unknown writes nobody saw it is not linearizable:\n  {}",
                        excerpt(&t, &likely)
                    ),
                    _ => format!("register k{key}: undecided after {steps} steps"),
                };
                tracing::warn!("{msg}");
                failures.push(msg);
                lin_unknown.push(*key);
            }
            Verdict::Linearizable => {}
        }
    }

    let streams = rec.watches.lock().expect("recorder").clone();
    let w = watch::check(&streams);
    let watch_violations: Vec<String> = w
        .violations
        .iter()
        .map(|v| format!("watcher {} event {}: {}", v.watcher, v.index, v.what))
        .collect();
    failures.extend(watch_violations.iter().cloned());
    if streams.values().map(Vec::len).sum::<usize>() == 0 {
        failures.push("no watcher received anything".into());
    }

    let acked = rec.set_acked.lock().expect("recorder").clone();
    let lost = match &present {
        Ok(present) => {
            let have: BTreeSet<u64> = present.iter().copied().collect();
            let lost: Vec<u64> = acked
                .iter()
                .copied()
                .filter(|e| !have.contains(e))
                .collect();
            if !lost.is_empty() {
                failures.push(format!(
                    "{} acknowledged set elements lost: {:?}",
                    lost.len(),
                    &lost[..lost.len().min(20)]
                ));
            }
            lost.len()
        }
        Err(e) => {
            failures.push(format!("the final read of the set failed: {e}"));
            0
        }
    };

    let calls = rec.calls.lock().expect("recorder").clone();
    let grace = GRACE.as_nanos() as u64;
    let window_of = |f: &FaultRecord| {
        let s = (f.start_s * 1e9) as u64;
        let e = (f.end_s * 1e9) as u64 + grace;
        (s, e)
    };
    let in_any = |t: u64, data_plane_only: bool| {
        faults.iter().any(|f| {
            let (s, e) = window_of(f);
            (!data_plane_only || f.kind.hits_data_plane()) && t >= s && t <= e
        })
    };
    let failed: Vec<&workload::Call> = calls.iter().filter(|c| !c.ok).collect();
    let unattributed: Vec<&&workload::Call> =
        failed.iter().filter(|c| !in_any(c.t_ns, false)).collect();
    let control_only = failed
        .iter()
        .filter(|c| in_any(c.t_ns, false) && !in_any(c.t_ns, true))
        .count();
    if !unattributed.is_empty() {
        let ex: Vec<String> = unattributed
            .iter()
            .take(5)
            .map(|c| {
                format!(
                    "{:.3}s {} -> {}: {}",
                    secs(c.t_ns),
                    c.from,
                    c.to,
                    c.error.clone().unwrap_or_default()
                )
            })
            .collect();
        failures.push(format!(
            "{} failed calls outside every fault window, e.g.\n  {}",
            unattributed.len(),
            ex.join("\n  ")
        ));
    }
    if calls.is_empty() {
        failures.push("no data-plane call was made".into());
    }
    let mut windows: Vec<(f64, f64)> = Vec::new();
    for c in &failed {
        let t = secs(c.t_ns);
        match windows.last_mut() {
            Some((_, e)) if t - *e < 1.0 => *e = t,
            _ => windows.push((t, t)),
        }
    }
    let recovery = failed
        .iter()
        .map(|c| c.t_ns)
        .filter(|t| *t > last_heal)
        .max()
        .map_or(0, |t| t - last_heal);
    if recovery > RECOVERY_BOUND.as_nanos() as u64 {
        failures.push(format!(
            "calls still failed {:.1}s after the last heal (bound: {}s)",
            secs(recovery),
            RECOVERY_BOUND.as_secs()
        ));
    }
    if !converged {
        failures.push("the controllers did not converge after the last heal".into());
    }
    let mut by_kind = BTreeMap::new();
    for f in faults.iter().filter(|f| f.error.is_none()) {
        *by_kind.entry(f.kind.name()).or_insert(0) += 1;
    }
    for f in faults.iter().filter(|f| f.error.is_some()) {
        tracing::warn!(
            fault = f.kind.name(),
            "not applied: {}",
            f.error.clone().unwrap_or_default()
        );
    }
    Report {
        seed: opts.seed,
        mode: opts.mode,
        duration_s: secs(end),
        faults,
        faults_by_kind: by_kind,
        operations,
        linearizability_violations: lin_violations,
        linearizability_unknown: lin_unknown,
        watch_events: w.events,
        watch_resyncs: w.resyncs,
        watch_violations,
        set_acknowledged: acked.len(),
        acknowledged_writes_lost: lost,
        calls: calls.len(),
        calls_failed: failed.len(),
        calls_failed_unattributed: unattributed.len(),
        calls_failed_control_plane_faults: control_only,
        unavailability_windows: windows,
        recovery_s: secs(recovery),
        controllers_converged: converged,
        failures,
    }
}

/// The operations a violation names (the last few placed, then the one
/// that could not be), one JSON line each.
pub fn excerpt(h: &[Entry], v: &Verdict) -> String {
    let Verdict::Violation {
        linearized,
        stuck_at,
    } = v
    else {
        return String::new();
    };
    linearized
        .iter()
        .rev()
        .take(6)
        .rev()
        .chain(std::iter::once(stuck_at))
        .filter_map(|i| h.get(*i))
        .map(|e| serde_json::to_string(e).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n  ")
}

/// `history.jsonl`, `calls.jsonl`, `watches.json`, `report.json`,
/// `summary.txt` under the run's directory.
fn write_outputs(opts: &Options, rec: &Recorder, report: &Report) -> anyhow::Result<()> {
    use std::io::Write;
    let mut h = std::io::BufWriter::new(std::fs::File::create(opts.out.join("history.jsonl"))?);
    for e in rec.history.lock().expect("recorder").iter() {
        writeln!(h, "{}", serde_json::to_string(e)?)?;
    }
    let mut c = std::io::BufWriter::new(std::fs::File::create(opts.out.join("calls.jsonl"))?);
    for e in rec.calls.lock().expect("recorder").iter() {
        writeln!(c, "{}", serde_json::to_string(e)?)?;
    }
    std::fs::write(
        opts.out.join("watches.json"),
        serde_json::to_string(&*rec.watches.lock().expect("recorder"))?,
    )?;
    std::fs::write(
        opts.out.join("report.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    std::fs::write(opts.out.join("summary.txt"), summary(report))?;
    Ok(())
}

/// The human summary.
pub fn summary(r: &Report) -> String {
    let mut s = String::new();
    let verdict = if r.failures.is_empty() {
        "PASS"
    } else {
        "FAIL"
    };
    s += &format!(
        "chaos run {verdict}: seed {} ({:?}), {:.0}s\n",
        r.seed, r.mode, r.duration_s
    );
    let kinds: Vec<String> = r
        .faults_by_kind
        .iter()
        .map(|(k, n)| format!("{k}×{n}"))
        .collect();
    s += &format!(
        "faults: {} applied ({} kinds): {}\n",
        r.faults_by_kind.values().sum::<usize>(),
        r.faults_by_kind.len(),
        kinds.join(" ")
    );
    let not_applied = r.faults.iter().filter(|f| f.error.is_some()).count();
    if not_applied > 0 {
        s +=
            &format!("faults not applied or not healed cleanly: {not_applied} (see report.json)\n");
    }
    let op = |k: &str| r.operations.get(k).copied().unwrap_or(0);
    s += &format!(
        "register ops: {} (ok {}, fail {}, unknown {}); linearizability violations: {}; undecided: {}\n",
        op("total"),
        op("ok"),
        op("fail"),
        op("unknown"),
        r.linearizability_violations.len(),
        r.linearizability_unknown.len()
    );
    s += &format!(
        "watch events: {} (resyncs {:?}); violations: {}\n",
        r.watch_events,
        r.watch_resyncs,
        r.watch_violations.len()
    );
    s += &format!(
        "set: {} acknowledged, {} lost\n",
        r.set_acknowledged, r.acknowledged_writes_lost
    );
    s += &format!(
        "data plane: {} calls, {} failed ({} outside any fault window, {} during control-plane-only faults); {} unavailability windows; recovered {:.1}s after the last heal (bound {}s)\n",
        r.calls,
        r.calls_failed,
        r.calls_failed_unattributed,
        r.calls_failed_control_plane_faults,
        r.unavailability_windows.len(),
        r.recovery_s,
        RECOVERY_BOUND.as_secs()
    );
    s += &format!("controllers converged: {}\n", r.controllers_converged);
    for f in &r.failures {
        s += &format!("FAILURE: {f}\n");
    }
    if !r.failures.is_empty() {
        s += &format!(
            "replay with: causeway-chaos run --seed {} (same options)\n",
            r.seed
        );
    }
    s
}
