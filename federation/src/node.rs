//! One controller node: storage, Raft, the gRPC server, metrics.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use causeway_api::identity::{
    controller_trust_domain, CertificateAuthority, CONTROLLER_SERVER_NAME,
};
use causeway_api::model::SpiffeId;
use causeway_api::pb::{federation_server::FederationServer, raft_server::RaftServer};
use openraft::{BasicNode, Config, ServerState, SnapshotPolicy};
use tokio::net::TcpListener;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, Server, ServerTlsConfig};

use crate::hub::Hub;
use crate::lease::{LeaseConfig, Leases};
use crate::network::{Network, PeerChannels};
use crate::service::{FederationService, RaftService, Shared};
use crate::state::Command;
use crate::store::{self, StateMachine};
use crate::{NodeId, Raft};
use causeway_api::sync::LockExt;

/// Raft timing. Defaults suit a LAN or loopback; raise them for WANs.
#[derive(Debug, Clone)]
pub struct RaftTiming {
    /// Heartbeat interval, ms.
    pub heartbeat_ms: u64,
    /// Shortest election timeout, ms.
    pub election_min_ms: u64,
    /// Longest election timeout, ms.
    pub election_max_ms: u64,
    /// Take a snapshot (and compact the log) every this many entries.
    pub snapshot_every: u64,
}

impl Default for RaftTiming {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            election_min_ms: 500,
            election_max_ms: 1000,
            snapshot_every: 5000,
        }
    }
}

/// What a controller node is started with.
pub struct ControllerOptions {
    /// This node's id.
    pub node_id: NodeId,
    /// Address other nodes and clients use for this node (`host:port`).
    pub advertise: String,
    /// The initial voters, including this node.
    pub peers: BTreeMap<NodeId, String>,
    /// Where the log, vote and snapshots live.
    pub data_dir: PathBuf,
    /// The controller CA (issues this node's certificate and sites' credentials).
    pub ca: Arc<CertificateAuthority>,
    /// Raft timing.
    pub timing: RaftTiming,
    /// Site leases.
    pub leases: LeaseConfig,
    /// A watcher whose stream accepts nothing for this long is cut off.
    pub watch_stall: Duration,
    /// Never initialize a cluster: wait to be added by `ctl controller add`.
    pub join_existing: bool,
    /// Lifetimes of the credentials this node issues.
    pub credentials: crate::config::CredentialLifetimes,
    /// The admin certificate `causeway ca init` wrote (PEM), recorded as
    /// the first admin credential while none is.
    pub bootstrap_admin_pem: Option<String>,
    /// Distributed tracing.
    pub tracing: causeway_api::trace::TracingConfig,
}

/// Gives the hub the tracer for its fan-out spans.
fn hub_tracing(hub: &crate::hub::Hub, tracing: Arc<causeway_api::trace::Tracing>) {
    hub.set_tracing(tracing);
}

/// Records the admin credential `causeway ca init` wrote as the first one,
/// once this node can write and while no admin credential is recorded
/// (every node tries; the state machine takes only the first).
async fn record_bootstrap_admin(shared: Arc<Shared>, pem: String) {
    let record = match crate::service::admin_record_of(&pem, "ca init") {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "the admin.pem beside the CA is not an admin credential; not recording it");
            return;
        }
    };
    let (sha256, record) = record;
    let mut wait = Duration::from_millis(200);
    loop {
        if !shared.hub.read(|s| s.admins.is_empty()) {
            return;
        }
        let cmd = Command::RecordAdmin {
            sha256: sha256.clone(),
            record: record.clone(),
            bootstrap: true,
            now_ms: causeway_api::clock::unix_ms(),
        };
        match shared.propose(cmd).await {
            Ok(_) => {
                tracing::info!(name = %record.name, "recorded the bootstrap admin credential");
                return;
            }
            Err(e) => tracing::debug!(error = %e, "bootstrap admin not recorded yet; retrying"),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

/// A running controller node.
pub struct Controller {
    /// What its services share.
    pub shared: Arc<Shared>,
}

impl Controller {
    /// Opens storage and starts Raft; initializes the cluster if this is the
    /// lowest-numbered initial voter starting on empty storage.
    pub async fn start(opts: &ControllerOptions) -> anyhow::Result<(Self, Identity)> {
        let node_spiffe = SpiffeId::new(
            controller_trust_domain(),
            &format!("/node/{}", opts.node_id),
        )?;
        // Node certificates are short-lived and re-issued at every start.
        let node_cred = opts.ca.issue(
            &node_spiffe,
            &[CONTROLLER_SERVER_NAME],
            Duration::from_secs(30 * 86400),
        )?;
        let cert_not_after_ms = node_cred
            .chain
            .first()
            .and_then(causeway_api::identity::validity_ms)
            .map_or(0, |(_, to)| to);
        if let Some((_, to)) = node_cred
            .chain
            .first()
            .and_then(causeway_api::identity::validity_ms)
        {
            metrics::gauge!("causeway_certificate_expiry_timestamp_seconds", "credential" => "node")
                .set(to as f64 / 1000.0);
        }
        let identity = Identity::from_pem(&node_cred.cert_pem, &node_cred.key_pem);
        let peer_tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&opts.ca.cert_pem))
            .domain_name(CONTROLLER_SERVER_NAME)
            .identity(identity.clone());
        let peers = PeerChannels::new(peer_tls);
        let tracing_ = causeway_api::trace::Tracing::start(
            &opts.tracing,
            "causeway-controller",
            "",
            &format!("controller-{}", opts.node_id),
        )
        .map_err(anyhow::Error::msg)?;

        let (store::Storage { db, log }, rebuilding) = match store::open(&opts.data_dir) {
            Ok(s) => (s, false),
            Err(store::OpenError::Other(e)) => return Err(e),
            Err(store::OpenError::Corrupt(why)) => {
                metrics::counter!("causeway_storage_corruption_total").increment(1);
                tracing::error!(%why, "this node's own data is corrupt: it will not vote, lead or serve from it");
                let others: BTreeMap<NodeId, String> = opts
                    .peers
                    .iter()
                    .filter(|(id, _)| **id != opts.node_id)
                    .map(|(id, a)| (*id, a.clone()))
                    .collect();
                if others.is_empty() {
                    anyhow::bail!(
                        "{why}; no other controller node is known to rebuild from: restore {} from a backup, or start this node with --peer for the other nodes",
                        opts.data_dir.display()
                    );
                }
                let kept = quarantine(&opts.data_dir)?;
                tracing::warn!(kept = %kept.display(), "damaged data moved aside; rebuilding from peers: leaving the cluster, then rejoining empty as a learner");
                leave_cluster(&peers, opts.node_id, &others).await;
                (
                    store::open(&opts.data_dir).map_err(|e| anyhow::anyhow!("{e}"))?,
                    true,
                )
            }
        };
        let pristine = log.is_pristine()?;
        let hub = Hub::new();
        let sm = StateMachine::new(db, hub.clone())?;

        let config = Config {
            cluster_name: "causeway".into(),
            heartbeat_interval: opts.timing.heartbeat_ms,
            election_timeout_min: opts.timing.election_min_ms,
            election_timeout_max: opts.timing.election_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(opts.timing.snapshot_every),
            // Keep some log behind the snapshot so a briefly lagging follower
            // catches up from the log rather than a full snapshot.
            max_in_snapshot_log_to_keep: (opts.timing.snapshot_every / 5).max(10),
            ..Default::default()
        }
        .validate()
        .context("raft configuration")?;
        let raft = Raft::new(
            opts.node_id,
            Arc::new(config),
            Network::new(peers.clone()),
            log,
            sm,
        )
        .await
        .context("starting raft")?;

        let lowest = opts.peers.keys().next().copied();
        if pristine && lowest == Some(opts.node_id) && !opts.join_existing && !rebuilding {
            let members: BTreeMap<NodeId, BasicNode> = opts
                .peers
                .iter()
                .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
                .collect();
            tracing::info!(?members, "initializing a new controller cluster");
            if let Err(e) = raft.initialize(members).await {
                tracing::warn!(error = %e, "initialize");
            }
        } else if rebuilding {
            tracing::info!("empty storage; asking the cluster to add this node back");
        } else if pristine {
            tracing::info!("empty storage; waiting for the initial leader to replicate");
        } else {
            tracing::info!("restarting from existing storage");
        }

        let shared = Arc::new(Shared {
            node_id: opts.node_id,
            raft: raft.clone(),
            hub,
            ca: opts.ca.clone(),
            peers,
            leases: std::sync::Mutex::new(Leases::new(opts.leases)),
            watch_stall: opts.watch_stall,
            batcher: crate::service::Batcher::start(raft.clone()),
            peer_clients: Default::default(),
            joins: Default::default(),
            credentials: opts.credentials,
            tracing: tracing_.clone(),
            data_dir: opts.data_dir.clone(),
            cert_not_after_ms,
            lead_confirmed: Default::default(),
        });
        hub_tracing(&shared.hub, tracing_);
        tokio::spawn(export_raft_metrics(shared.raft.clone()));
        if let Some(pem) = &opts.bootstrap_admin_pem {
            tokio::spawn(record_bootstrap_admin(shared.clone(), pem.clone()));
        }
        tokio::spawn(run_leases(shared.clone()));
        if rebuilding {
            let others = opts
                .peers
                .iter()
                .filter(|(id, _)| **id != opts.node_id)
                .map(|(id, a)| (*id, a.clone()))
                .collect();
            tokio::spawn(rejoin_cluster(
                shared.peers.clone(),
                opts.node_id,
                opts.advertise.clone(),
                others,
            ));
        }
        Ok((Self { shared }, identity))
    }

    /// Serves the API and Raft RPCs on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        identity: Identity,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let tls = ServerTlsConfig::new()
            .identity(identity)
            // A client that does not finish its handshake is dropped.
            .timeout(Duration::from_secs(10))
            .client_ca_root(Certificate::from_pem(&self.shared.ca.cert_pem))
            // Join is the one RPC without a client certificate; every other
            // RPC checks the caller's identity itself.
            .client_auth_optional(true);
        let fed = FederationServer::new(FederationService {
            shared: self.shared.clone(),
        })
        .max_decoding_message_size(4 * 1024 * 1024);
        let raft_svc = RaftServer::new(RaftService {
            shared: self.shared.clone(),
        })
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024);
        // Small RPCs and watch events must not wait for Nagle's algorithm.
        // At most MAX_CONNECTIONS at once: past it, closed on accept.
        let slots = Arc::new(tokio::sync::Semaphore::new(
            crate::service::gate::MAX_CONNECTIONS,
        ));
        // A failing accept (out of file descriptors) backs off instead of
        // spinning.
        let incoming = futures::stream::unfold(
            (listener, slots, Duration::from_millis(10)),
            |(listener, slots, mut backoff)| async move {
                loop {
                    match listener.accept().await {
                        Ok((s, _)) => {
                            backoff = Duration::from_millis(10);
                            let _ = s.set_nodelay(true);
                            if let Some(s) = crate::service::gate::Slotted::admit(s, &slots) {
                                return Some((
                                    Ok::<_, std::io::Error>(s),
                                    (listener, slots, backoff),
                                ));
                            }
                        }
                        Err(e) => {
                            metrics::counter!("causeway_api_accept_errors_total").increment(1);
                            tracing::warn!(error = %e, retry_in = ?backoff, "accept failed");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(1));
                        }
                    }
                }
            },
        );
        // If Raft stops on a storage error, stop serving rather than answer
        // from a node that can no longer keep its promises.
        // Watched through the server metrics, which change only with the
        // vote, role, leader or membership (the full metrics change with
        // every write, and would wake this task each time); the Raft core
        // drops their sender when it stops, with the reason in `metrics()`.
        let raft = self.shared.raft.clone();
        let fatal = async move {
            let mut server_rx = raft.server_metrics();
            while server_rx.changed().await.is_ok() {}
            match &raft.metrics().borrow().running_state {
                Err(e) => e.to_string(),
                Ok(()) => "raft stopped".to_string(),
            }
        };
        let (fatal_tx, fatal_rx) = tokio::sync::oneshot::channel::<String>();
        let (began_tx, began_rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            tokio::select! {
                _ = shutdown => {}
                why = fatal => {
                    tracing::error!(reason = %why, "raft stopped; this node stops serving");
                    let _ = fatal_tx.send(why);
                }
            }
            let _ = began_tx.send(());
        };
        // A graceful stop: Raft stops first, so a leader hands over at
        // once (the others elect within an election timeout) rather than
        // keep leading while it takes no new connection — sites could not
        // renew their leases with it. Calls in flight then finish; Watch
        // streams never end by themselves, so after SHUTDOWN_GRACE the
        // connections still open are closed (watchers resume elsewhere).
        let raft = self.shared.raft.clone();
        let grace = async move {
            if began_rx.await.is_err() {
                std::future::pending::<()>().await;
            }
            if let Err(e) = raft.shutdown().await {
                tracing::warn!(error = %e, "stopping raft");
            }
            tracing::info!("raft stopped; finishing the calls in flight");
            tokio::time::sleep(SHUTDOWN_GRACE).await;
            tracing::info!(grace = ?SHUTDOWN_GRACE, "closing the connections still open (watch streams)");
        };
        let server = Server::builder()
            .tls_config(tls)?
            .timeout(Duration::from_secs(30))
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            // Per connection: header size, and streams open at once (h2
            // clients queue past it; tonic's default is unbounded).
            .http2_max_header_list_size(Some(16 * 1024))
            .max_concurrent_streams(Some(1024))
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .layer(crate::service::gate::GateLayer {
                hub: self.shared.hub.clone(),
                tracing: self.shared.tracing.clone(),
            })
            .add_service(fed)
            .add_service(raft_svc)
            .serve_with_incoming_shutdown(incoming, shutdown);
        tokio::select! {
            r = server => r.context("controller gRPC server")?,
            _ = grace => {}
        }
        let _ = self.shared.raft.shutdown().await;
        if let Ok(why) = fatal_rx.await {
            anyhow::bail!("raft stopped: {why}");
        }
        Ok(())
    }
}

/// How long a stopping node waits for calls in flight before it closes
/// the connections still open.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Moves a node's damaged Raft data (the redb file and the log segments)
/// into `corrupt-<unix seconds>/` inside the data dir, kept for inspection.
/// Moving within the directory works when the data dir is a mount point.
fn quarantine(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let kept = dir.join(format!("corrupt-{secs}"));
    std::fs::create_dir_all(&kept).with_context(|| format!("creating {}", kept.display()))?;
    for name in ["raft.redb", "log"] {
        let from = dir.join(name);
        if from.exists() {
            std::fs::rename(&from, kept.join(name))
                .with_context(|| format!("moving {} aside", from.display()))?;
        }
    }
    Ok(kept)
}

/// Tries a membership change on each known peer until one (the leader)
/// takes it. Returns `Ok(())` on success, or when `done` says the answer
/// means there is nothing to do.
async fn change_via_peers(
    peers: &PeerChannels,
    others: &BTreeMap<NodeId, String>,
    op: &crate::service::MembershipOp,
    done: impl Fn(&tonic::Status) -> bool,
) -> Result<(), String> {
    let data = serde_json::to_vec(op).map_err(|e| e.to_string())?;
    let mut last = String::new();
    for (id, addr) in others {
        let mut client = match peers.raft_client(addr) {
            Ok(c) => c,
            Err(e) => {
                last = format!("node {id} at {addr}: {e}");
                continue;
            }
        };
        match client
            .change_membership(causeway_api::pb::RaftPayload::new(data.clone()))
            .await
        {
            Ok(_) => return Ok(()),
            Err(st) if done(&st) => return Ok(()),
            Err(st) => last = format!("node {id} at {addr}: {}", st.message()),
        }
    }
    Err(last)
}

/// Retries a membership change through the known peers until a leader
/// takes it (or answers `done_code`: nothing left to do), backing off.
async fn retry_via_peers(
    peers: &PeerChannels,
    others: &BTreeMap<NodeId, String>,
    op: crate::service::MembershipOp,
    done_code: tonic::Code,
    what: &str,
) {
    let mut wait = Duration::from_millis(200);
    loop {
        match change_via_peers(peers, others, &op, |st| st.code() == done_code).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, "{what}; retrying"),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

/// Before a node with corrupt data takes any part in Raft, the others
/// remove it from the membership: an empty node that still counted as a
/// voter could vote for a candidate missing entries it had acknowledged.
async fn leave_cluster(peers: &PeerChannels, id: NodeId, others: &BTreeMap<NodeId, String>) {
    let op = crate::service::MembershipOp::Remove { id };
    let what = "asking the cluster to remove this node";
    retry_via_peers(peers, others, op, tonic::Code::NotFound, what).await;
    tracing::info!("removed from the membership; rejoining with empty storage");
}

/// Asks the leader to add this (empty) node back as a learner; the leader
/// promotes it to voter once it has caught up from the log or a snapshot.
async fn rejoin_cluster(
    peers: PeerChannels,
    id: NodeId,
    addr: String,
    others: BTreeMap<NodeId, String>,
) {
    let op = crate::service::MembershipOp::Add { id, addr };
    let what = "asking the cluster to add this node back";
    retry_via_peers(&peers, &others, op, tonic::Code::AlreadyExists, what).await;
    metrics::counter!("causeway_storage_rebuilds_total").increment(1);
    tracing::info!("rebuilt from peers: caught up and a voter again");
}

/// Raft gauges, refreshed once a second and on every change of role or
/// leader — not on every write, which would wake this task per commit.
async fn export_raft_metrics(raft: Raft) {
    let rx = raft.metrics();
    let mut server_rx = raft.server_metrics();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_leader = None;
    loop {
        {
            let m = rx.borrow();
            metrics::gauge!("causeway_raft_term").set(m.current_term as f64);
            metrics::gauge!("causeway_raft_last_log_index")
                .set(m.last_log_index.unwrap_or(0) as f64);
            metrics::gauge!("causeway_raft_commit_index")
                .set(m.last_applied.map(|l| l.index).unwrap_or(0) as f64);
            for (state, label) in [
                (ServerState::Leader, "leader"),
                (ServerState::Follower, "follower"),
                (ServerState::Candidate, "candidate"),
                (ServerState::Learner, "learner"),
            ] {
                metrics::gauge!("causeway_raft_role", "role" => label).set(if m.state == state {
                    1.0
                } else {
                    0.0
                });
            }
            if m.current_leader != last_leader {
                tracing::info!(leader = ?m.current_leader, term = m.current_term, "raft leader changed");
                if m.current_leader.is_some() {
                    metrics::counter!("causeway_raft_leader_changes_total").increment(1);
                }
                last_leader = m.current_leader;
            }
        }
        tokio::select! {
            changed = server_rx.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
    }
}

/// Sets `causeway_site_available` for every member, and NaN for the sites
/// exported before that are members no more.
fn export_availability(
    sites: &[(causeway_api::model::SiteName, bool)],
    exported: &mut std::collections::BTreeSet<String>,
) {
    let now: std::collections::BTreeSet<String> =
        sites.iter().map(|(n, _)| n.to_string()).collect();
    for gone in exported.difference(&now) {
        metrics::gauge!("causeway_site_available", "site" => gone.clone()).set(f64::NAN);
    }
    for (n, available) in sites {
        metrics::gauge!("causeway_site_available", "site" => n.to_string()).set(if *available {
            1.0
        } else {
            0.0
        });
    }
    *exported = now;
}

/// On the leader, turns lapsed and recovered leases into Raft writes.
/// Every node also exports each member's availability as this node's
/// applied state has it (`causeway_site_available`: 1, 0 while its lease
/// has lapsed, NaN once removed).
async fn run_leases(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut exported = std::collections::BTreeSet::new();
    loop {
        tick.tick().await;
        let now = std::time::Instant::now();
        let leader = shared.raft.metrics().borrow().current_leader == Some(shared.node_id);
        let changes = {
            let mut l = shared.leases.locked();
            l.handle_leadership(leader, now);
            let sites: Vec<_> = shared.hub.read(|s| {
                s.sites
                    .iter()
                    .map(|(n, r)| (n.clone(), r.available))
                    .collect()
            });
            export_availability(&sites, &mut exported);
            l.decide(now, &sites)
        };
        for (site, available) in changes {
            if available {
                tracing::info!(%site, "site heartbeats are steady again; marking it available");
            } else {
                tracing::warn!(%site, "site lease lapsed; marking it unavailable (its exports are kept)");
            }
            metrics::counter!("causeway_site_lease_transitions_total", "to" => if available { "available" } else { "unavailable" })
                .increment(1);
            if let Err(e) = shared
                .raft
                .client_write(Command::SetSiteAvailability { site, available })
                .await
            {
                tracing::info!(error = %e, "could not commit a lease change (leadership moved?)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// When the Raft core stops (here: shut down; in production: a storage
    /// error), the node stops serving and says why. The watch behind this
    /// listens to the rarely changing server metrics, not to every write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_whose_raft_stops_stops_serving() {
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let opts = ControllerOptions {
            node_id: 1,
            advertise: addr.clone(),
            peers: BTreeMap::from([(1, addr)]),
            data_dir: dir.path().to_path_buf(),
            ca: Arc::new(CertificateAuthority::generate("test controller CA").unwrap()),
            timing: RaftTiming::default(),
            leases: LeaseConfig::default(),
            watch_stall: Duration::from_secs(5),
            join_existing: false,
            credentials: Default::default(),
            bootstrap_admin_pem: None,
            tracing: Default::default(),
        };
        let (controller, identity) = Controller::start(&opts).await.unwrap();
        let raft = controller.shared.raft.clone();
        let serving = tokio::spawn(controller.serve(identity, listener, std::future::pending()));
        raft.wait(Some(Duration::from_secs(10)))
            .state(ServerState::Leader, "single node leads")
            .await
            .unwrap();
        // Writes change the full metrics many times; serving goes on.
        for i in 0..20 {
            raft.client_write(Command::DeletePolicy {
                kind: "ServiceAccess".into(),
                namespace: "shop".into(),
                name: format!("p{i}"),
                by: None,
            })
            .await
            .expect("a write commits on a single node");
        }
        assert!(!serving.is_finished(), "serving stopped while Raft runs");
        raft.shutdown().await.unwrap();
        let res = tokio::time::timeout(Duration::from_secs(10), serving)
            .await
            .expect("serving did not stop within 10 s of Raft stopping")
            .unwrap();
        let err = res.expect_err("serving ended without an error").to_string();
        assert!(err.contains("raft stopped"), "{err}");
    }
}
