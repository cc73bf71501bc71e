//! The JSON and the table every suite produces (see shared BENCHMARKS.md).

use std::path::Path;

use serde_json::json;

pub struct Case {
    pub case: String,
    pub system: String,
    pub metric: String,
    pub value: f64,
}

pub struct Check {
    pub name: String,
    pub value: f64,
    pub goal: String,
    pub met: bool,
    /// Why it is not met when no number could be had.
    pub reason: Option<String>,
}

pub struct Report {
    pub suite: String,
    pub quick: bool,
    pub cases: Vec<Case>,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn new(suite: &str, quick: bool) -> Self {
        Self {
            suite: suite.into(),
            quick,
            cases: Vec::new(),
            checks: Vec::new(),
        }
    }

    pub fn add(&mut self, case: &str, system: &str, metric: &str, value: f64) {
        println!("  {case:<22} {system:<10} {metric:<14} {value:>12.2}");
        self.cases.push(Case {
            case: case.into(),
            system: system.into(),
            metric: metric.into(),
            value,
        });
    }

    pub fn get(&self, case: &str, system: &str, metric: &str) -> Option<f64> {
        self.cases
            .iter()
            .find(|c| c.case == case && c.system == system && c.metric == metric)
            .map(|c| c.value)
    }

    /// `goal` is "<= X", ">= X" or "< X".
    pub fn check(&mut self, name: &str, value: f64, goal: &str) {
        let (op, x) = goal.split_once(' ').expect("goal is 'OP X'");
        let x: f64 = x.parse().expect("goal number");
        let met = match op {
            "<=" => value <= x,
            ">=" => value >= x,
            "<" => value < x,
            ">" => value > x,
            _ => false,
        };
        // A ratio over a case or system this run skipped (or that failed)
        // is NaN: not met, and said why, never written as NaN.
        let reason = (!value.is_finite()).then(|| {
            "not measured in this run: a system or case it needs was skipped or failed".to_string()
        });
        self.checks.push(Check {
            name: name.into(),
            value,
            goal: goal.into(),
            met: met && reason.is_none(),
            reason,
        });
    }

    pub fn finish(&self, dir: &Path) -> anyhow::Result<()> {
        println!("\n{:<40} {:>10}  {:<10} MET", "CHECK", "VALUE", "GOAL");
        for c in &self.checks {
            println!(
                "{:<40} {:>10.3}  {:<10} {}",
                c.name,
                c.value,
                c.goal,
                match (&c.reason, c.met) {
                    (Some(r), _) => format!("NO ({r})"),
                    (None, true) => "yes".into(),
                    (None, false) => "NO".into(),
                }
            );
        }
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let doc = json!({
            "suite": self.suite,
            "quick": self.quick,
            "cores": cores,
            "cases": self.cases.iter().map(|c| json!({"case": c.case, "system": c.system, "metric": c.metric, "value": finite(c.value)})).collect::<Vec<_>>(),
            "checks": self.checks.iter().map(|c| json!({"name": c.name, "value": finite(c.value), "goal": c.goal, "met": c.met, "reason": c.reason})).collect::<Vec<_>>(),
        });
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{}.json", self.suite));
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
        println!("\nwrote {}", path.display());
        Ok(())
    }
}

/// A number for the JSON: `null` when it is not finite (never NaN).
fn finite(v: f64) -> serde_json::Value {
    if v.is_finite() {
        json!(v)
    } else {
        serde_json::Value::Null
    }
}

/// The p-th percentile (0-100) of samples, nearest-rank.
pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

/// How far the ratio `percentile(a, p) / percentile(b, p)` moves when the
/// run is resampled: a paired bootstrap (sample `i` of `a` and of `b` were
/// taken one right after the other, so they are drawn together and a slow
/// spell of the machine stays shared). Returns the 5th and 95th percentile
/// of the ratio over `rounds` resamples; the generator is seeded, so the
/// same samples give the same interval.
pub fn paired_ratio_interval(a: &[f64], b: &[f64], p: f64, rounds: usize) -> (f64, f64) {
    let n = a.len().min(b.len());
    if n == 0 || rounds == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let (mut ra, mut rb) = (vec![0.0; n], vec![0.0; n]);
    let mut ratios = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        for k in 0..n {
            let i = (next() % n as u64) as usize;
            ra[k] = a[i];
            rb[k] = b[i];
        }
        ratios.push(percentile(&mut ra, p) / percentile(&mut rb, p));
    }
    (percentile(&mut ratios, 5.0), percentile(&mut ratios, 95.0))
}

/// Resident set size of a process, MiB.
pub fn rss_mb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for {pid}"))?;
    Ok(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_without_a_number_is_not_met_and_says_why_and_no_nan_is_written() {
        let mut r = Report::new("t", true);
        r.add("case", "sys", "rps", f64::NAN);
        r.check("ratio", f64::NAN / 2.0, ">= 1.0");
        r.check("fine", 2.0, ">= 1.0");
        assert!(!r.checks[0].met && r.checks[0].reason.is_some());
        assert!(r.checks[1].met && r.checks[1].reason.is_none());
        let dir = tempfile::tempdir().unwrap();
        r.finish(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join("t.json")).unwrap();
        assert!(!text.contains("NaN"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(v["checks"][0]["value"].is_null());
        assert_eq!(v["checks"][0]["met"], false);
        assert!(v["checks"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("not measured"));
        assert!(v["cases"][0]["value"].is_null());
    }

    #[test]
    fn the_bootstrap_interval_brackets_the_ratio_and_narrows_with_more_samples() {
        // b is a shifted copy of a: the true p99 ratio is known.
        let a: Vec<f64> = (0..2000)
            .map(|i| 100.0 + (i * 7919 % 2000) as f64)
            .collect();
        let b: Vec<f64> = a.iter().map(|x| x * 2.0).collect();
        let (lo, hi) = paired_ratio_interval(&a, &b, 99.0, 200);
        assert!(lo <= 0.5 && 0.5 <= hi, "{lo}..{hi}");
        assert!(
            hi - lo < 1e-9,
            "paired samples keep the exact ratio: {lo}..{hi}"
        );
        // Independent noise: the interval is wider with fewer samples.
        let noisy = |n: usize, seed: u64| -> Vec<f64> {
            let mut x = seed;
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    1000.0 + (x % 1000) as f64
                })
                .collect()
        };
        let (a_s, b_s) = (noisy(300, 1), noisy(300, 2));
        let (lo_s, hi_s) = paired_ratio_interval(&a_s, &b_s, 99.0, 200);
        let (lo_l, hi_l) = paired_ratio_interval(&noisy(5000, 1), &noisy(5000, 2), 99.0, 200);
        // The run's own ratio lies inside its interval.
        let own = percentile(&mut a_s.clone(), 99.0) / percentile(&mut b_s.clone(), 99.0);
        assert!(lo_s <= own && own <= hi_s, "{own} outside {lo_s}..{hi_s}");
        assert!(lo_s < hi_s, "resampling noisy samples moves the ratio");
        assert!(
            hi_l - lo_l < hi_s - lo_s,
            "{lo_l}..{hi_l} vs {lo_s}..{hi_s}"
        );
    }
}
