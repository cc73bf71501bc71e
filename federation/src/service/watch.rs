//! Status of this node, and the catalog watch stream: a snapshot, then one
//! message per revision, bounded per watcher.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use causeway_api::model::SiteName;
use causeway_api::pb;
use tokio::sync::broadcast::error::RecvError;
use tonic::Status;

use super::Shared;
use crate::hub::Hub;
use crate::NodeId;

impl Shared {
    /// This node's view: role, leader, term, log indexes, membership and
    /// replication, revision.
    pub fn status(&self) -> pb::StatusResponse {
        let m = self.raft.metrics().borrow().clone();
        let role = format!("{:?}", m.state).to_lowercase();
        let disk = rustix::fs::statvfs(&self.data_dir).ok().map(|s| {
            (
                s.f_bavail.saturating_mul(s.f_frsize),
                s.f_blocks.saturating_mul(s.f_frsize),
            )
        });
        let matched: BTreeMap<NodeId, u64> = m
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .map(|(id, l)| (*id, l.map(|l| l.index).unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        let nodes = m
            .membership_config
            .nodes()
            .map(|(id, n)| pb::NodeStatus {
                id: *id,
                addr: n.addr.clone(),
                voter: voters.contains(id),
                matched_index: matched.get(id).copied().unwrap_or(0),
            })
            .collect();
        pb::StatusResponse {
            node_id: self.node_id,
            role,
            term: m.current_term,
            leader_id: m.current_leader.unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            revision: self.hub.revision(),
            nodes,
            sites: self.hub.read(|s| s.sites.len() as u32),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            purged_index: m.purged.map(|l| l.index).unwrap_or(0),
            now_ms: causeway_api::clock::unix_ms(),
            cert_not_after_ms: self.cert_not_after_ms,
            data_free_bytes: disk.map_or(0, |d| d.0),
            data_total_bytes: disk.map_or(0, |d| d.1),
            version: causeway_api::version::VERSION.to_string(),
            protocol: causeway_api::version::PROTOCOL,
        }
    }
}

/// Streams a starting point, then every later revision in order. A watcher
/// that falls behind the broadcast buffer is resynced with a snapshot.
/// Events queued per watcher beyond what HTTP/2 flow control holds.
pub(super) const WATCH_QUEUE: usize = 64;

/// Follows the hub for one watcher. What a watcher can hold is bounded: its
/// queue of `WATCH_QUEUE` events plus the HTTP/2 window; the broadcast ring
/// is shared. A watcher that falls behind the ring is resynced with a
/// snapshot; one whose stream accepts nothing for `stall` is cut off, and
/// its client resumes (getting a snapshot if the history no longer reaches
/// back). Either way it never slows the hub or other watchers.
/// Streams catalog changes to one watcher from revision `from`. A site's
/// watch lasts only while the site is a member: once it is removed, the
/// stream ends with a permission error instead of the next change.
pub(super) async fn serve_watch(
    hub: Arc<Hub>,
    from: u64,
    tx: tokio::sync::mpsc::Sender<Result<pb::WatchEvent, Status>>,
    stall: Duration,
    site: Option<SiteName>,
) {
    let (hub_ref, site) = (&hub, site.as_ref());
    let send = |ev: pb::WatchEvent| {
        let tx = tx.clone();
        let hub = hub_ref;
        async move {
            if let Some(site) = site {
                if !hub.read(|st| st.sites.contains_key(site)) {
                    tracing::info!(%site, "site removed; ending its watch");
                    let _ = tx
                        .send(Err(Status::permission_denied(format!(
                            "site {site} was removed from the federation; its credential no longer grants Watch"
                        ))))
                        .await;
                    return false;
                }
            }
            match tokio::time::timeout(stall, tx.send(Ok(ev))).await {
                Ok(Ok(())) => true,
                Ok(Err(_)) => false,
                Err(_) => {
                    tracing::info!(
                        stall_ms = stall.as_millis() as u64,
                        "watcher read nothing for too long; cutting it off (it resumes and resyncs)"
                    );
                    metrics::counter!("causeway_watch_cutoffs_total").increment(1);
                    false
                }
            }
        }
    };
    let mut last = from;
    'outer: loop {
        let start = hub.start(last);
        let mut rx = start.rx;
        for ev in start.events {
            last = ev.revision;
            if !send((*ev).clone()).await {
                return;
            }
        }
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    Ok(ev) => {
                        // Nothing at or before what the watcher has, not
                        // even a snapshot: a node that restarts or installs
                        // a snapshot may be behind a watcher that resumed
                        // on it, and replaying its older state would move
                        // the watcher back in time. Committed revisions are
                        // the same on every node, so the watcher just waits
                        // until this node passes it.
                        if ev.revision <= last {
                            continue;
                        }
                        last = ev.revision;
                        if !send((*ev).clone()).await {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        tracing::info!(skipped = n, "slow watcher resynced");
                        metrics::counter!("causeway_watch_resyncs_total").increment(1);
                        // Start again from what the watcher has: the
                        // history's deltas when it reaches back, else a
                        // snapshot — never one older than the watcher's
                        // revision (a restarted node replaying its log
                        // lags watchers that are ahead of it).
                        continue 'outer;
                    }
                    Err(RecvError::Closed) => return,
                },
                _ = tx.closed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::tests::grow as token;
    use crate::state::CatalogState;

    /// Found by the chaos suite: a watcher resumed at revision 5 on a node
    /// that then installed an older snapshot (revision 2) was sent that
    /// snapshot and the deltas after it — its view went back in time.
    #[tokio::test]
    async fn a_resumed_watcher_never_gets_an_older_snapshot_or_delta() {
        let hub = Hub::new();
        for n in 0..5 {
            token(&hub, n);
        }
        assert_eq!(hub.revision(), 5);
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let serve = tokio::spawn(serve_watch(
            hub.clone(),
            5,
            tx,
            Duration::from_secs(5),
            None,
        ));
        // Let the watch subscribe (the test's runtime has one thread: the
        // task runs until it waits for the hub's next event).
        tokio::task::yield_now().await;
        // The node restarts from an older snapshot and replays forward.
        hub.replace(CatalogState {
            revision: 2,
            ..Default::default()
        });
        for n in 10..14 {
            token(&hub, n);
        }
        // Revisions 3, 4 and 5 are what the watcher had; 6 is new.
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an event")
            .expect("open")
            .expect("ok");
        assert_eq!(ev.revision, 6, "{ev:?}");
        assert!(matches!(ev.kind, Some(pb::watch_event::Kind::Delta(_))));
        serve.abort();
    }

    /// Also found by the chaos suite: the same, when the restarted node
    /// replays faster than the watcher reads, so the watcher lags the
    /// broadcast: its resync was a snapshot of the node's (older) state.
    #[tokio::test]
    async fn a_lagging_watcher_ahead_of_a_replaying_node_is_not_sent_back() {
        let hub = Hub::new();
        let ahead = crate::hub::BROADCAST + 100;
        for n in 0..ahead {
            token(&hub, n);
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let serve = tokio::spawn(serve_watch(
            hub.clone(),
            ahead as u64,
            tx,
            Duration::from_secs(5),
            None,
        ));
        tokio::task::yield_now().await;
        hub.replace(CatalogState::default());
        // More than the broadcast holds, while the watcher does not run:
        // it lags, at a point still behind what it has.
        for n in 0..crate::hub::BROADCAST + 10 {
            token(&hub, 100_000 + n);
        }
        assert!(hub.revision() < ahead as u64);
        // The watcher sees it has lagged, and resyncs here.
        tokio::task::yield_now().await;
        // Catch up past the watcher.
        for n in 0..100 {
            token(&hub, 200_000 + n);
        }
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an event")
            .expect("open")
            .expect("ok");
        assert!(ev.revision > ahead as u64, "went back to {}", ev.revision);
        serve.abort();
    }
}
