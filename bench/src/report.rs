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
        self.checks.push(Check {
            name: name.into(),
            value,
            goal: goal.into(),
            met,
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
                if c.met { "yes" } else { "NO" }
            );
        }
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let doc = json!({
            "suite": self.suite,
            "quick": self.quick,
            "cores": cores,
            "cases": self.cases.iter().map(|c| json!({"case": c.case, "system": c.system, "metric": c.metric, "value": c.value})).collect::<Vec<_>>(),
            "checks": self.checks.iter().map(|c| json!({"name": c.name, "value": c.value, "goal": c.goal, "met": c.met})).collect::<Vec<_>>(),
        });
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{}.json", self.suite));
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
        println!("\nwrote {}", path.display());
        Ok(())
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
