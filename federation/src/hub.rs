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
/// Broadcast buffer; a watcher that falls further behind is resynced.
const BROADCAST: usize = 1024;

pub struct Hub {
    inner: RwLock<Inner>,
    tx: broadcast::Sender<Arc<pb::WatchEvent>>,
}

struct Inner {
    state: CatalogState,
    history: VecDeque<Arc<pb::WatchEvent>>,
}

/// Where a new watcher starts.
pub struct Start {
    pub events: Vec<Arc<pb::WatchEvent>>,
    pub rx: broadcast::Receiver<Arc<pb::WatchEvent>>,
}

impl Hub {
    pub fn new() -> Arc<Self> {
        let (tx, _) = broadcast::channel(BROADCAST);
        Arc::new(Self {
            inner: RwLock::new(Inner {
                state: CatalogState::default(),
                history: VecDeque::new(),
            }),
            tx,
        })
    }

    pub fn apply(&self, cmd: Command) -> Outcome {
        let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let (outcome, changes) = g.state.apply(cmd);
        if !changes.is_empty() {
            let ev = Arc::new(pb::WatchEvent {
                revision: g.state.revision,
                kind: Some(pb::watch_event::Kind::Delta(pb::Delta { changes })),
            });
            g.history.push_back(ev.clone());
            while g.history.len() > HISTORY {
                g.history.pop_front();
            }
            metrics::gauge!("causeway_catalog_revision").set(g.state.revision as f64);
            let _ = self.tx.send(ev);
        }
        outcome
    }

    /// Replaces the state (snapshot install or restart); watchers resync.
    pub fn replace(&self, state: CatalogState) {
        let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        g.history.clear();
        let ev = Arc::new(pb::WatchEvent {
            revision: state.revision,
            kind: Some(pb::watch_event::Kind::Snapshot(state.snapshot_pb())),
        });
        g.state = state;
        let _ = self.tx.send(ev);
    }

    pub fn read<T>(&self, f: impl FnOnce(&CatalogState) -> T) -> T {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        f(&g.state)
    }

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
