//! Access logs: one JSON line per forwarded request (HTTP) or connection
//! (L4), on the calling gateway ("outbound") and on the exporting one
//! ("inbound"). A sampled request fills an [`Entry`] as it goes and sends
//! it when done over a bounded queue; a writer task serializes and writes
//! it. Nothing on the data path waits for the log: a full queue drops the
//! entry and counts it (`causeway_access_log_dropped_total`).
//!
//! The field names are stable (docs/observability.md lists them).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// `[access_log]` in the gateway config.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {
    /// Write access logs at all.
    pub enabled: bool,
    /// `stdout`, or a file appended to (created 0640).
    pub path: String,
    /// Share of requests and connections logged, 0 to 1.
    pub sample: f64,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            path: "stdout".into(),
            sample: 1.0,
        }
    }
}

impl AccessLogConfig {
    /// Every problem, each naming its field.
    pub fn check(&self, errs: &mut Vec<String>) {
        if !(0.0..=1.0).contains(&self.sample) {
            errs.push(format!(
                "access_log.sample: {} must be between 0 and 1 (the share of requests logged)",
                self.sample
            ));
        }
        if self.path.trim().is_empty() {
            errs.push("access_log.path: `stdout` or a file path".into());
        }
    }
}

/// Entries waiting for the writer; more are dropped and counted.
const QUEUE: usize = 16_384;

/// Where entries go, or nowhere.
pub struct AccessLog {
    tx: Option<mpsc::Sender<Entry>>,
    sample: f64,
    writer: Option<std::thread::JoinHandle<()>>,
}

/// One line of the access log.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// When the request or connection started, RFC 3339 UTC.
    pub time: String,
    /// `outbound` (this gateway forwarded a caller's request) or
    /// `inbound` (a peer gateway's stream to a local endpoint).
    pub direction: String,
    /// `http` or `tcp`.
    pub protocol: String,
    /// W3C trace id from the request's `traceparent`, or empty.
    pub trace_id: String,
    /// The calling site (inbound), or this site (outbound).
    pub source_site: String,
    /// The caller: the peer gateway's SPIFFE ID (inbound) or the client's
    /// address (outbound).
    pub source: String,
    /// `<namespace>/<name>`.
    pub service: String,
    /// The site that served it (outbound), or this site (inbound).
    pub destination_site: String,
    /// The endpoint address (inbound), or empty.
    pub endpoint: String,
    /// HTTP method, or empty.
    pub method: String,
    /// HTTP path, or empty.
    pub path: String,
    /// HTTP status, or 0 for L4.
    pub status: u16,
    /// `ok`, or why not (`no_site`, `refused`, `no_endpoints`, `forbidden`,
    /// `timeout`, the gateway's own error reason for HTTP, ...).
    pub outcome: String,
    /// Bytes from the caller.
    pub bytes_in: u64,
    /// Bytes to the caller.
    pub bytes_out: u64,
    /// Milliseconds from start to end.
    pub duration_ms: f64,
    /// Retries after the first try (HTTP).
    pub retries: u32,
    /// Sites skipped before the one that served, with why; empty if none.
    pub failover_reason: String,
    /// The HTTPRoute rule that routed the request (its name, or
    /// `rules[i]`); empty when none did.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub route_rule: String,
}

impl AccessLog {
    /// No access log.
    pub fn disabled() -> Arc<Self> {
        Arc::new(Self {
            tx: None,
            sample: 0.0,
            writer: None,
        })
    }

    /// Starts the writer for `cfg` (disabled when `cfg.enabled` is false).
    pub fn start(cfg: &AccessLogConfig) -> anyhow::Result<Arc<Self>> {
        if !cfg.enabled || cfg.sample <= 0.0 {
            return Ok(Self::disabled());
        }
        let out: Box<dyn Write + Send> = if cfg.path == "stdout" {
            Box::new(std::io::stdout())
        } else {
            let path = PathBuf::from(&cfg.path);
            let mut opts = std::fs::OpenOptions::new();
            opts.create(true).append(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o640);
            Box::new(opts.open(&path).map_err(|e| {
                anyhow::anyhow!("access_log.path: cannot open {}: {e}", path.display())
            })?)
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_entries(rx, out))?;
        Ok(Arc::new(Self {
            tx: Some(tx),
            sample: cfg.sample,
            writer: Some(writer),
        }))
    }

    /// Writes what is queued and stops the writer (at shutdown, once no
    /// request holds the log any more).
    pub fn finish(mut self) {
        self.tx.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }

    /// A new entry for a request or connection starting now, if this one
    /// is logged (sampled), else `None` — which costs nothing further.
    pub fn begin(
        self: &Arc<Self>,
        direction: &'static str,
        protocol: &'static str,
    ) -> Option<Pending> {
        self.tx.as_ref()?;
        if self.sample < 1.0 && rand::random::<f64>() >= self.sample {
            return None;
        }
        Some(Pending {
            log: self.clone(),
            started: Instant::now(),
            entry: Entry {
                time: rfc3339(SystemTime::now()),
                direction: direction.into(),
                protocol: protocol.into(),
                ..Default::default()
            },
        })
    }

    fn send(&self, entry: Entry) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send(entry).is_err() {
            metrics::counter!("causeway_access_log_dropped_total").increment(1);
        }
    }
}

/// An entry being filled; sent when dropped.
pub struct Pending {
    log: Arc<AccessLog>,
    started: Instant,
    /// The fields so far.
    pub entry: Entry,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut entry = std::mem::take(&mut self.entry);
        entry.duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        if entry.outcome.is_empty() {
            entry.outcome = "ok".into();
        }
        self.log.send(entry);
    }
}

/// Fills fields of an optional entry: `note(&mut log, |e| e.status = 200)`.
pub fn note(pending: &mut Option<Pending>, f: impl FnOnce(&mut Entry)) {
    if let Some(p) = pending {
        f(&mut p.entry);
    }
}

/// The trace id of a W3C `traceparent` header value (`00-<32 hex>-...`),
/// or empty when it is not one.
pub fn trace_id(traceparent: Option<&str>) -> String {
    let Some(v) = traceparent else {
        return String::new();
    };
    let mut parts = v.trim().split('-');
    let (Some(version), Some(id)) = (parts.next(), parts.next()) else {
        return String::new();
    };
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if hex(version, 2) && hex(id, 32) && id.bytes().any(|b| b != b'0') {
        id.to_ascii_lowercase()
    } else {
        String::new()
    }
}

/// Writes entries as JSON lines, flushing whenever the queue is empty.
fn write_entries(mut rx: mpsc::Receiver<Entry>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut failed = false;
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        while let Some(entry) = next {
            let line = serde_json::to_string(&entry).unwrap_or_default();
            let wrote = out
                .write_all(line.as_bytes())
                .and_then(|()| out.write_all(b"\n"));
            if let Err(e) = wrote {
                if !failed {
                    tracing::error!(error = %e, "cannot write the access log; dropping entries until it works again");
                }
                failed = true;
                metrics::counter!("causeway_access_log_dropped_total").increment(1);
            } else {
                failed = false;
            }
            next = rx.try_recv().ok();
        }
        let _ = out.flush();
    }
}

/// `2026-12-06T05:40:01.123Z`.
fn rfc3339(t: SystemTime) -> String {
    let d = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, dd) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Year, month, day of a count of days since 1970-01-01 (proleptic
/// Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_535_601_123);
        assert_eq!(rfc3339(t), "2026-12-06T05:40:01.123Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn trace_ids_come_only_from_valid_traceparents() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(trace_id(Some(&format!("00-{id}-00f067aa0ba902b7-01"))), id);
        assert_eq!(
            trace_id(Some(&format!(
                "00-{}-00f067aa0ba902b7-01",
                id.to_uppercase()
            ))),
            id
        );
        for bad in [
            "",
            "00",
            "00-xyz-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(trace_id(Some(bad)), "", "{bad}");
        }
        assert_eq!(trace_id(None), "");
    }

    #[test]
    fn bad_settings_name_their_field() {
        let mut errs = Vec::new();
        AccessLogConfig {
            enabled: true,
            path: " ".into(),
            sample: 1.5,
        }
        .check(&mut errs);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].starts_with("access_log.sample"), "{errs:?}");
        assert!(errs[1].starts_with("access_log.path"), "{errs:?}");
    }

    #[test]
    fn entries_are_written_as_json_lines_and_unsampled_ones_cost_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::start(&AccessLogConfig {
            enabled: true,
            path: path.display().to_string(),
            sample: 1.0,
        })
        .unwrap();
        for i in 0..3u16 {
            let mut p = log.begin("outbound", "http");
            note(&mut p, |e| {
                e.service = "shop/web".into();
                e.status = 200 + i;
            });
        }
        let off = AccessLog::start(&AccessLogConfig::default()).unwrap();
        assert!(off.begin("outbound", "http").is_none());
        Arc::try_unwrap(log)
            .ok()
            .expect("no entry pending")
            .finish();
        let text = std::fs::read_to_string(&path).unwrap();
        let entries: Vec<Entry> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            entries.iter().map(|e| e.status).collect::<Vec<_>>(),
            [200, 201, 202]
        );
        assert!(entries
            .iter()
            .all(|e| e.outcome == "ok" && e.service == "shop/web"));
    }
}
