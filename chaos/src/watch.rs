//! The watch checker (etcd's watch validator is the model): each watcher's
//! stream of catalog events must move forward — revisions strictly
//! increasing, every delta the one after what the watcher had (a snapshot
//! may restart it at any later revision: a resync, counted), and every
//! watcher that saw revision `r` saw the same change there.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One event a watcher received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchEvent {
    /// The whole catalog at this revision.
    Snapshot {
        /// Its revision.
        revision: u64,
    },
    /// The change that made this revision, and a digest of its content.
    Delta {
        /// Its revision.
        revision: u64,
        /// A digest of the change (equal changes, equal digests).
        digest: u64,
    },
}

impl WatchEvent {
    fn revision(&self) -> u64 {
        match self {
            WatchEvent::Snapshot { revision } | WatchEvent::Delta { revision, .. } => *revision,
        }
    }
}

/// A rule a watcher's stream broke.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchViolation {
    /// The watcher.
    pub watcher: String,
    /// The event's position in its stream.
    pub index: usize,
    /// What is wrong.
    pub what: String,
}

/// What the checker found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchReport {
    /// Events checked.
    pub events: usize,
    /// Snapshots after the first (resyncs), per watcher.
    pub resyncs: BTreeMap<String, usize>,
    /// Broken rules (must be none).
    pub violations: Vec<WatchViolation>,
}

/// Checks every watcher's stream.
pub fn check(streams: &BTreeMap<String, Vec<WatchEvent>>) -> WatchReport {
    let mut report = WatchReport::default();
    // Revision -> (digest, first watcher that saw it).
    let mut agreed: BTreeMap<u64, (u64, String)> = BTreeMap::new();
    for (watcher, events) in streams {
        let mut last: Option<u64> = None;
        for (i, ev) in events.iter().enumerate() {
            report.events += 1;
            let bad = |what: String| WatchViolation {
                watcher: watcher.clone(),
                index: i,
                what,
            };
            let r = ev.revision();
            match (ev, last) {
                (WatchEvent::Snapshot { .. }, None) => {}
                (WatchEvent::Delta { .. }, None) => report
                    .violations
                    .push(bad(format!("delta {r} before any snapshot"))),
                (_, Some(prev)) if r <= prev => report.violations.push(bad(format!(
                    "revision {r} after {prev}: a watcher never goes back or repeats"
                ))),
                (WatchEvent::Snapshot { .. }, Some(_)) => {
                    *report.resyncs.entry(watcher.clone()).or_default() += 1;
                }
                (WatchEvent::Delta { .. }, Some(prev)) if r != prev + 1 => {
                    report.violations.push(bad(format!(
                        "delta {r} after {prev}: revisions {} to {} are missing",
                        prev + 1,
                        r - 1
                    )))
                }
                _ => {}
            }
            if let WatchEvent::Delta { digest, .. } = ev {
                match agreed.get(&r) {
                    None => {
                        agreed.insert(r, (*digest, watcher.clone()));
                    }
                    Some((d, first)) if d != digest => report.violations.push(bad(format!(
                        "revision {r} differs from what {first} saw there"
                    ))),
                    Some(_) => {}
                }
            }
            last = Some(last.map_or(r, |l| l.max(r)));
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(r: u64) -> WatchEvent {
        WatchEvent::Snapshot { revision: r }
    }
    fn delta(r: u64, d: u64) -> WatchEvent {
        WatchEvent::Delta {
            revision: r,
            digest: d,
        }
    }

    #[test]
    fn good_streams_pass_and_resyncs_are_counted() {
        let streams: BTreeMap<String, Vec<WatchEvent>> = [
            (
                "a".to_string(),
                vec![snap(3), delta(4, 40), delta(5, 50), snap(9), delta(10, 100)],
            ),
            (
                "b".to_string(),
                vec![
                    snap(1),
                    delta(2, 20),
                    delta(3, 30),
                    delta(4, 40),
                    delta(5, 50),
                ],
            ),
        ]
        .into_iter()
        .collect();
        let r = check(&streams);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.resyncs.get("a"), Some(&1));
        assert_eq!(r.events, 10);
    }

    #[test]
    fn gaps_reordering_repeats_and_disagreement_are_violations() {
        let streams: BTreeMap<String, Vec<WatchEvent>> = [
            ("gap".to_string(), vec![snap(1), delta(2, 20), delta(4, 40)]),
            (
                "back".to_string(),
                vec![snap(5), delta(6, 60), delta(6, 60), snap(3)],
            ),
            ("early".to_string(), vec![delta(2, 20)]),
            ("other".to_string(), vec![snap(1), delta(2, 21)]),
        ]
        .into_iter()
        .collect();
        let r = check(&streams);
        let text: Vec<String> = r
            .violations
            .iter()
            .map(|v| format!("{}[{}]: {}", v.watcher, v.index, v.what))
            .collect();
        for want in [
            "gap[2]: delta 4 after 2: revisions 3 to 3 are missing",
            "back[2]: revision 6 after 6",
            "back[3]: revision 3 after 6",
            "early[0]: delta 2 before any snapshot",
            "revision 2 differs from what",
        ] {
            assert!(
                text.iter().any(|t| t.contains(want)),
                "missing {want:?} in {text:?}"
            );
        }
    }
}
