//! Committing commands through Raft: on this node if it leads, else
//! forwarded to the leader; membership changes and site heartbeats the same
//! way. State-machine rejections map to gRPC codes here, in one place.

use std::time::{Duration, Instant};

use causeway_api::model::SiteName;
use causeway_api::pb::{self, raft_client::RaftClient};
use openraft::error::{ClientWriteError, RaftError};
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::Shared;
use crate::network::PeerError;
use crate::state::{Command, Outcome, RejectCode};
use crate::NodeId;
use causeway_api::sync::LockExt;

/// Why a write forwarded to the leader got no outcome.
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error("encoding the command: {0}")]
    Encode(serde_json::Error),
    #[error("{}", .0.message())]
    Rpc(#[from] Status),
    #[error("decoding the leader's answer: {0}")]
    Decode(serde_json::Error),
}

/// How long a write may wait for a leader before the caller gets UNAVAILABLE.
const WRITE_DEADLINE: Duration = Duration::from_secs(8);

/// A membership change, run on the leader.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum MembershipOp {
    /// Add node `id` at `addr`: as a learner, promoted to voter once it
    /// has caught up.
    Add {
        /// The new node's id.
        id: NodeId,
        /// Its Raft/API address (`host:port`).
        addr: String,
    },
    /// Remove node `id` (voter or learner).
    Remove {
        /// The node's id.
        id: NodeId,
    },
}

/// Maps a state-machine rejection to a gRPC status, in one place.
pub fn outcome_status(outcome: Outcome) -> Result<u64, Status> {
    match outcome {
        Outcome::Applied { revision } | Outcome::Unchanged { revision } => Ok(revision),
        Outcome::Batch(_) => Err(Status::internal("unexpected batch outcome")),
        Outcome::Rejected { code, message } => {
            let code = match code {
                RejectCode::TokenUnknown => Code::Unauthenticated,
                RejectCode::TokenUsed | RejectCode::TokenExpired => Code::FailedPrecondition,
                RejectCode::TokenWrongSite => Code::PermissionDenied,
                RejectCode::SiteExists => Code::AlreadyExists,
                RejectCode::SiteUnknown => Code::NotFound,
                RejectCode::Invalid => Code::InvalidArgument,
                RejectCode::LimitExceeded => Code::ResourceExhausted,
                RejectCode::NotFound => Code::NotFound,
                RejectCode::Forbidden => Code::PermissionDenied,
                RejectCode::Conflict => Code::Aborted,
            };
            Err(Status::new(code, message))
        }
    }
}

impl Shared {
    /// Commits a command through Raft, forwarding to the leader if needed.
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, Status> {
        // A child of the RPC's span (the gate runs the call in its context).
        let mut span = self.tracing.start_child(
            "causeway.raft.propose",
            opentelemetry::trace::SpanKind::Internal,
            vec![opentelemetry::KeyValue::new("causeway.command", cmd.kind())],
        );
        let r = self.propose_untraced(cmd).await;
        if let Some(s) = &mut span {
            match &r {
                Ok(Outcome::Applied { revision }) | Ok(Outcome::Unchanged { revision }) => {
                    s.set([opentelemetry::KeyValue::new(
                        "causeway.revision",
                        *revision as i64,
                    )])
                }
                Ok(Outcome::Rejected { message, .. }) => s.error(message.clone()),
                Ok(Outcome::Batch(_)) => {}
                Err(e) => s.error(e.message().to_string()),
            }
        }
        r
    }

    async fn propose_untraced(&self, cmd: Command) -> Result<Outcome, Status> {
        let started = Instant::now();
        let deadline = started + WRITE_DEADLINE;
        let mut last;
        loop {
            match self.batcher.write(cmd.clone()).await {
                Ok(outcome) => {
                    metrics::histogram!("causeway_raft_write_seconds")
                        .record(started.elapsed().as_secs_f64());
                    return Ok(outcome);
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    match f.leader_node {
                        Some(node) if f.leader_id != Some(self.node_id) => {
                            match self.forward(&node.addr, &cmd).await {
                                Ok(o) => return Ok(o),
                                Err(e) => {
                                    last = format!("forwarding to the leader at {}: {e}", node.addr)
                                }
                            }
                        }
                        _ => last = "no leader is elected yet".into(),
                    }
                }
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                return Err(Status::unavailable(format!(
                    "the controllers could not commit the write ({last}); check that a majority of controller nodes is up, then retry"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Returns once this node's applied state holds every write
    /// acknowledged before the call: only the leader can say so (it
    /// confirms its leadership with a quorum first); any other node refuses
    /// and names the leader.
    pub async fn linearizable_barrier(&self) -> Result<(), Status> {
        use openraft::error::CheckIsLeaderError;
        let started = Instant::now();
        // openraft's read index is the later of the leader's commit index
        // and the first entry of its term. A leader that restarts without
        // losing its term (its vote is stored) has forgotten its commit
        // index (it is not stored) and its term's first entry may be long
        // before entries it committed — and acknowledged — before the
        // restart: it would answer from a state missing them (the chaos
        // suite caught this). A confirmed leader's log holds every committed
        // entry and it commits all of its log, so the read also waits until
        // everything the log held when the read came in is applied.
        let in_log = self.raft.metrics().borrow().last_log_index;
        let read = tokio::time::timeout(Duration::from_secs(5), self.raft.ensure_linearizable());
        match read.await {
            Ok(Ok(_)) => {
                let left = Duration::from_secs(5).saturating_sub(started.elapsed());
                self.raft
                    .wait(Some(left))
                    .applied_index_at_least(in_log, "linearizable read")
                    .await
                    .map(|_| ())
                    .map_err(|_| {
                        Status::unavailable(
                            "linearizable: the leader did not apply its log within 5 s; check that a majority of controller nodes is up, then retry",
                        )
                    })
            }
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                let leader = match (f.leader_id, f.leader_node) {
                    (Some(id), Some(n)) => format!("node {id} at {}", n.addr),
                    _ => "none elected yet".into(),
                };
                Err(Status::failed_precondition(format!(
                    "linearizable: node {} is not the leader (leader: {leader}); ask the leader, or read without linearizable",
                    self.node_id
                )))
            }
            Ok(Err(e)) => Err(Status::unavailable(format!(
                "linearizable: could not confirm leadership with a quorum ({e}); check that a majority of controller nodes is up"
            ))),
            Err(_) => Err(Status::unavailable(
                "linearizable: no quorum confirmed this node's leadership within 5 s; check that a majority of controller nodes is up",
            )),
        }
    }

    /// Runs a membership change here if this node leads, else on the leader.
    pub async fn change_membership(&self, op: MembershipOp) -> Result<(), Status> {
        let (leader, addr) = self.leader();
        if leader != Some(self.node_id) {
            let addr =
                addr.ok_or_else(|| Status::unavailable("no leader is elected yet; retry"))?;
            let mut client = self
                .peer(&addr)
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let data = serde_json::to_vec(&op).map_err(|e| Status::internal(e.to_string()))?;
            client.change_membership(pb::RaftPayload::new(data)).await?;
            return Ok(());
        }
        self.change_membership_here(op).await
    }

    /// Runs a membership change on this node, which must be the leader.
    pub async fn change_membership_here(&self, op: MembershipOp) -> Result<(), Status> {
        use std::collections::BTreeSet;

        use openraft::ChangeMembers;
        let fail = |e: RaftError<NodeId, ClientWriteError<NodeId, openraft::BasicNode>>| {
            Status::failed_precondition(format!("membership change failed: {e}"))
        };
        match op {
            MembershipOp::Add { id, addr } => {
                let voters: Vec<NodeId> = self
                    .raft
                    .metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .voter_ids()
                    .collect();
                if voters.contains(&id) {
                    return Err(Status::already_exists(format!(
                        "node {id} is already a voter"
                    )));
                }
                tracing::info!(id, %addr, "adding a learner; it is promoted once caught up");
                // Blocking: returns once the learner has caught up with the log.
                self.raft
                    .add_learner(id, openraft::BasicNode { addr }, true)
                    .await
                    .map_err(fail)?;
                self.raft
                    .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                    .await
                    .map_err(fail)?;
            }
            MembershipOp::Remove { id } => {
                let m = self.raft.metrics().borrow().membership_config.clone();
                let voters: Vec<NodeId> = m.membership().voter_ids().collect();
                if !m.nodes().any(|(n, _)| *n == id) {
                    return Err(Status::not_found(format!("node {id} is not a member")));
                }
                if voters.contains(&id) && voters.len() == 1 {
                    return Err(Status::failed_precondition("cannot remove the last voter"));
                }
                tracing::info!(id, "removing a controller node");
                if voters.contains(&id) {
                    self.raft
                        .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                        .await
                        .map_err(fail)?;
                } else {
                    self.raft
                        .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                        .await
                        .map_err(fail)?;
                }
            }
        }
        Ok(())
    }

    /// The leader this node knows of, and its address.
    fn leader(&self) -> (Option<NodeId>, Option<String>) {
        let m = self.raft.metrics();
        let m = m.borrow();
        let addr = m.current_leader.and_then(|l| {
            m.membership_config
                .membership()
                .get_node(&l)
                .map(|n| n.addr.clone())
        });
        (m.current_leader, addr)
    }

    /// A cached channel to a peer node.
    fn peer(&self, addr: &str) -> Result<RaftClient<Channel>, PeerError> {
        let mut m = self.peer_clients.locked();
        if let Some(c) = m.get(addr) {
            return Ok(c.clone());
        }
        let c = self.peers.raft_client(addr)?;
        m.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Records a site heartbeat at the leader (forwarding if needed).
    pub async fn record_heartbeat(&self, site: SiteName) -> Result<(), Status> {
        let (leader, addr) = self.leader();
        if leader == Some(self.node_id) {
            // A leader cut off from the other controllers still thinks it
            // leads while a majority elects another; heartbeats it took
            // would keep the site alive only where nothing can commit, and
            // the new leader would let the site's lease lapse (the chaos
            // suite saw sites drop out of DNS during a leader partition).
            // So the leader confirms it still leads (a quorum round, at
            // most once per election timeout); if it cannot, the gateway
            // is told to try another controller.
            self.confirm_leadership().await?;
            self.leases.locked().handle_heartbeat(site, Instant::now());
            return Ok(());
        }
        let Some(addr) = addr else {
            return Err(Status::unavailable("no leader is elected yet; retry"));
        };
        let mut client = self
            .peer(&addr)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let data = serde_json::to_vec(&site).map_err(|e| Status::internal(e.to_string()))?;
        match tokio::time::timeout(
            Duration::from_secs(2),
            client.forward_heartbeat(pb::RaftPayload::new(data)),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(s)) => Err(Status::unavailable(format!(
                "forwarding the heartbeat to the leader: {}",
                s.message()
            ))),
            Err(_) => Err(Status::unavailable(
                "forwarding the heartbeat to the leader timed out",
            )),
        }
    }

    /// Ok when a quorum confirmed this node's leadership within the last
    /// election timeout (asking again if not).
    async fn confirm_leadership(&self) -> Result<(), Status> {
        let fresh = Duration::from_millis(self.raft.config().election_timeout_min);
        if self
            .lead_confirmed
            .locked()
            .is_some_and(|t| t.elapsed() < fresh)
        {
            return Ok(());
        }
        match tokio::time::timeout(Duration::from_secs(1), self.raft.get_read_log_id()).await {
            Ok(Ok(_)) => {
                *self.lead_confirmed.locked() = Some(Instant::now());
                Ok(())
            }
            _ => Err(Status::unavailable(format!(
                "node {} cannot confirm its leadership with a majority of controllers; try another controller",
                self.node_id
            ))),
        }
    }

    async fn forward(&self, addr: &str, cmd: &Command) -> Result<Outcome, ForwardError> {
        let mut client = self.peer(addr)?;
        let data = serde_json::to_vec(cmd).map_err(ForwardError::Encode)?;
        let reply = client.propose(pb::RaftPayload::new(data)).await?;
        serde_json::from_slice(&reply.into_inner().data).map_err(ForwardError::Decode)
    }

    pub(super) fn controller_endpoints(&self) -> Vec<String> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.nodes().map(|(_, n)| n.addr.clone()).collect()
    }
}
