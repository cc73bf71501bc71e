//! The applied catalog and its watchers.
//!
//! The state machine applies entries into the hub; `Watch` handlers read a
//! starting point from it and then follow its broadcast. Subscribing happens
//! under the same lock that applying takes, so a watcher can never miss a
//! revision between its starting point and its first delta.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};

use causeway_api::pb;
use tokio::sync::broadcast;

use crate::state::{CatalogState, Command, Outcome};

/// Deltas kept for resuming watchers; older resume points get a snapshot.
const HISTORY: usize = 4096;
/// ...and at most this many encoded bytes of them, so big deltas (a site
/// publishing hundreds of services at once) cannot make the history large.
const HISTORY_BYTES: usize = 64 * 1024 * 1024;
/// Broadcast buffer; a watcher that falls further behind is resynced.
pub(crate) const BROADCAST: usize = 1024;

/// The applied catalog and its change feed: applies committed commands,
/// keeps a bounded history of deltas, and broadcasts them to watchers.
pub struct Hub {
    inner: RwLock<Inner>,
    tx: broadcast::Sender<Arc<pb::WatchEvent>>,
    tracing: std::sync::OnceLock<Arc<causeway_api::trace::Tracing>>,
}

struct Inner {
    state: CatalogState,
    history: VecDeque<Arc<pb::WatchEvent>>,
    history_bytes: usize,
}

/// Where a new watcher starts.
pub struct Start {
    /// The snapshot or deltas the watcher gets first.
    pub events: Vec<Arc<pb::WatchEvent>>,
    /// The deltas after those.
    pub rx: broadcast::Receiver<Arc<pb::WatchEvent>>,
}

impl Hub {
    /// An empty catalog.
    pub fn new() -> Arc<Self> {
        let (tx, _) = broadcast::channel(BROADCAST);
        Arc::new(Self {
            inner: RwLock::new(Inner {
                state: CatalogState::default(),
                history: VecDeque::new(),
                history_bytes: 0,
            }),
            tx,
            tracing: std::sync::OnceLock::new(),
        })
    }

    /// Applies one committed command and publishes what changed.
    pub fn apply(&self, cmd: Command) -> Outcome {
        if let Command::Batch(cmds) = cmd {
            return Outcome::Batch(
                cmds.into_iter()
                    .map(|c| match c {
                        Command::Batch(_) => Outcome::Rejected {
                            code: crate::state::RejectCode::Invalid,
                            message: "nested batch".into(),
                        },
                        c => self.apply(c),
                    })
                    .collect(),
            );
        }
        let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let (outcome, changes) = g.state.apply(cmd);
        if !changes.is_empty() {
            let ev = Arc::new(pb::WatchEvent {
                revision: g.state.revision,
                kind: Some(pb::watch_event::Kind::Delta(pb::Delta { changes })),
            });
            g.history_bytes += prost::Message::encoded_len(&*ev);
            g.history.push_back(ev.clone());
            while g.history.len() > HISTORY
                || (g.history_bytes > HISTORY_BYTES && g.history.len() > 1)
            {
                if let Some(old) = g.history.pop_front() {
                    g.history_bytes -= prost::Message::encoded_len(&*old);
                }
            }
            metrics::gauge!("causeway_catalog_revision").set(g.state.revision as f64);
            let watchers = self.tx.receiver_count();
            let n = ev_changes(&ev);
            let revision = g.state.revision;
            let _ = self.tx.send(ev);
            if let Some(t) = self.tracing.get() {
                // One span per change fanned out to the open watches.
                let _ = t.start_span(
                    "causeway.watch.fanout",
                    opentelemetry::trace::SpanKind::Producer,
                    None,
                    vec![
                        opentelemetry::KeyValue::new("causeway.revision", revision as i64),
                        opentelemetry::KeyValue::new("causeway.changes", n as i64),
                        opentelemetry::KeyValue::new("causeway.watchers", watchers as i64),
                    ],
                );
            }
        }
        outcome
    }

    /// Spans for each change fanned out (set once, when tracing is on).
    pub fn set_tracing(&self, tracing: Arc<causeway_api::trace::Tracing>) {
        if tracing.enabled() {
            let _ = self.tracing.set(tracing);
        }
    }

    /// Replaces the state (snapshot install or restart); watchers resync.
    pub fn replace(&self, state: CatalogState) {
        let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        g.history.clear();
        g.history_bytes = 0;
        let ev = Arc::new(pb::WatchEvent {
            revision: state.revision,
            kind: Some(pb::watch_event::Kind::Snapshot(state.snapshot_pb())),
        });
        g.state = state;
        let _ = self.tx.send(ev);
    }

    /// Reads the applied state.
    pub fn read<T>(&self, f: impl FnOnce(&CatalogState) -> T) -> T {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        f(&g.state)
    }

    /// Every change applied from now on (for waiting on one).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<pb::WatchEvent>> {
        self.tx.subscribe()
    }

    /// The revision of the last change applied.
    pub fn revision(&self) -> u64 {
        self.read(|s| s.revision)
    }

    /// Starting point for a watcher that has applied `from` (0: nothing).
    pub fn start(&self, from: u64) -> Start {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let rx = self.tx.subscribe();
        let current = g.state.revision;
        let events = if from != 0 && from >= current {
            // Up to date, or ahead of this node (it lags): deltas only.
            Vec::new()
        } else {
            let oldest = g.history.front().map(|e| e.revision);
            match oldest {
                Some(oldest) if from != 0 && from + 1 >= oldest => g
                    .history
                    .iter()
                    .filter(|e| e.revision > from)
                    .cloned()
                    .collect(),
                _ => vec![Arc::new(pb::WatchEvent {
                    revision: current,
                    kind: Some(pb::watch_event::Kind::Snapshot(g.state.snapshot_pb())),
                })],
            }
        };
        Start { events, rx }
    }
}

/// How many changes an event carries.
fn ev_changes(ev: &pb::WatchEvent) -> usize {
    match &ev.kind {
        Some(pb::watch_event::Kind::Delta(d)) => d.changes.len(),
        _ => 0,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::Command;

    /// Takes `hub` one revision on: a join token, then its site.
    pub(crate) fn grow(hub: &Hub, n: usize) {
        hub.apply(Command::CreateJoinToken {
            token_id: format!("t{n}"),
            secret_sha256: "h".into(),
            site: format!("s{n}").parse().unwrap(),
            labels: BTreeMap::new(),
            expires_at_ms: 10,
            now_ms: 0,
        });
        hub.apply(Command::JoinSite {
            token_id: format!("t{n}"),
            secret_sha256: "h".into(),
            now_ms: 1,
            site: format!("s{n}").parse().unwrap(),
            trust_domain: format!("s{n}.causeway").parse().unwrap(),
            trust_bundle_pem: String::new(),
            tunnel_addrs: vec![],
            credential_sha256: None,
        });
    }

    fn is_snapshot(e: &pb::WatchEvent) -> bool {
        matches!(e.kind, Some(pb::watch_event::Kind::Snapshot(_)))
    }

    #[test]
    fn watchers_start_from_a_snapshot_or_resume_with_exact_deltas() {
        let hub = Hub::new();
        for n in 0..5 {
            grow(&hub, n);
        }
        assert_eq!(hub.revision(), 5);

        let fresh = hub.start(0);
        assert_eq!(fresh.events.len(), 1);
        assert!(is_snapshot(&fresh.events[0]));
        assert_eq!(fresh.events[0].revision, 5);

        let resumed = hub.start(2);
        let revs: Vec<u64> = resumed.events.iter().map(|e| e.revision).collect();
        assert_eq!(revs, [3, 4, 5]);
        assert!(!resumed.events.iter().any(|e| is_snapshot(e)));

        let current = hub.start(5);
        assert!(current.events.is_empty());
        // A watcher ahead of this node (it lags) waits for deltas.
        let ahead = hub.start(9);
        assert!(ahead.events.is_empty());

        // Later changes arrive on the broadcast, in order.
        let mut rx = current.rx;
        grow(&hub, 5);
        assert_eq!(rx.try_recv().unwrap().revision, 6);
    }

    #[test]
    fn a_resume_point_older_than_the_history_gets_a_snapshot() {
        let hub = Hub::new();
        hub.replace(CatalogState {
            revision: 100,
            ..Default::default()
        });
        grow(&hub, 0);
        let old = hub.start(50);
        assert_eq!(old.events.len(), 1);
        assert!(is_snapshot(&old.events[0]));
        assert_eq!(old.events[0].revision, 101);
    }
}
