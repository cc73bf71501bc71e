//! Following a config file for a reload without a restart (gateways and
//! DNS servers): when to read it again, and the metrics of how it went.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// Says when a config file should be read again: on SIGHUP, or when its
/// modification time or size changed (looked at every two seconds).
pub struct FileWatch {
    path: PathBuf,
    seen: Option<(SystemTime, u64)>,
    hup: Option<tokio::signal::unix::Signal>,
    tick: tokio::time::Interval,
}

fn stamp(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl FileWatch {
    /// Starts watching `path` as it is now.
    pub fn new(path: PathBuf) -> Self {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        metrics::gauge!("causeway_config_reload_failed").set(0.0);
        Self {
            seen: stamp(&path),
            path,
            hup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
            tick,
        }
    }

    /// The file.
    pub fn path(&self) -> &PathBuf {
        &self.path
    }

    /// Waits until the file should be read again; why.
    pub async fn next(&mut self) -> &'static str {
        loop {
            let why = tokio::select! {
                Some(()) = async {
                    match self.hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => "SIGHUP",
                _ = self.tick.tick() => {
                    if stamp(&self.path) == self.seen {
                        continue;
                    }
                    "the file changed"
                }
            };
            self.seen = stamp(&self.path);
            return why;
        }
    }
}

/// Records a reload that was refused: the running config stays.
pub fn refused(why: &str, errors: &str) {
    metrics::counter!("causeway_config_reloads_total", "result" => "error").increment(1);
    metrics::gauge!("causeway_config_reload_failed").set(1.0);
    tracing::error!(reason = why, %errors, "config reload refused; the running config stays");
}

/// Records a reload that took effect.
pub fn applied(why: &str, what: &[&str]) {
    metrics::counter!("causeway_config_reloads_total", "result" => "ok").increment(1);
    metrics::gauge!("causeway_config_reload_failed").set(0.0);
    tracing::info!(reason = why, applied = ?what, "config reloaded");
}
