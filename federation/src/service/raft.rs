//! The `Raft` service: openraft's RPCs between controller nodes, writes
//! and membership changes forwarded to the leader, forwarded heartbeats.
//!
//! Trust boundary: only controller node identities
//! (`spiffe://controller.causeway/node/<id>`) may call any of it; every
//! handler takes the one decode/authorize/encode path, [`RaftService::serve`].

use std::sync::Arc;
use std::time::Instant;

use causeway_api::model::SiteName;
use causeway_api::pb::{self, raft_server::Raft as RaftRpc};
use tonic::{Request, Response, Status};

use super::authz::require_node;
use super::propose::MembershipOp;
use super::Shared;
use crate::state::Command;
use causeway_api::sync::LockExt;

/// The `Raft` gRPC service. Trust boundary: controller nodes only.
pub struct RaftService {
    /// What every service of this node shares.
    pub shared: Arc<Shared>,
}

type Reply = Result<Response<pb::RaftPayload>, Status>;

impl RaftService {
    /// The one path of every Raft RPC: the caller must be a controller
    /// node, the payload decodes as `Req`, `handle` answers, and the answer
    /// is encoded. Payloads are JSON, bounded by the server's message limit,
    /// and name the sender's protocol: one too old is refused.
    async fn serve<Req, Resp>(
        &self,
        rpc: &str,
        req: Request<pb::RaftPayload>,
        handle: impl AsyncFnOnce(&Shared, Req) -> Result<Resp, Status>,
    ) -> Reply
    where
        Req: serde::de::DeserializeOwned,
        Resp: serde::Serialize,
    {
        require_node(rpc, &req)?;
        let protocol = causeway_api::version::protocol_of_payload(req.get_ref().protocol);
        causeway_api::version::check_peer("the calling controller", protocol)
            .map_err(Status::failed_precondition)?;
        let r: Req = serde_json::from_slice(&req.get_ref().data)
            .map_err(|e| Status::invalid_argument(format!("raft payload: {e}")))?;
        let answer = handle(&self.shared, r).await?;
        serde_json::to_vec(&answer)
            .map(|data| Response::new(pb::RaftPayload::new(data)))
            .map_err(|e| Status::internal(e.to_string()))
    }
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(&self, req: Request<pb::RaftPayload>) -> Reply {
        self.serve("AppendEntries", req, async |s: &Shared, r| {
            Ok(s.raft.append_entries(r).await)
        })
        .await
    }

    async fn vote(&self, req: Request<pb::RaftPayload>) -> Reply {
        self.serve("Vote", req, async |s: &Shared, r| Ok(s.raft.vote(r).await))
            .await
    }

    async fn install_snapshot(&self, req: Request<pb::RaftPayload>) -> Reply {
        self.serve("InstallSnapshot", req, async |s: &Shared, r| {
            Ok(s.raft.install_snapshot(r).await)
        })
        .await
    }

    async fn change_membership(&self, req: Request<pb::RaftPayload>) -> Reply {
        self.serve(
            "ChangeMembership",
            req,
            async |s: &Shared, op: MembershipOp| s.change_membership_here(op).await,
        )
        .await
    }

    async fn forward_heartbeat(&self, req: Request<pb::RaftPayload>) -> Reply {
        self.serve(
            "ForwardHeartbeat",
            req,
            async |s: &Shared, site: SiteName| {
                // Only the leader keeps leases; a stale forward is dropped.
                if s.raft.metrics().borrow().current_leader == Some(s.node_id) {
                    s.leases.locked().handle_heartbeat(site, Instant::now());
                }
                Ok(())
            },
        )
        .await
    }

    async fn propose(&self, req: Request<pb::RaftPayload>) -> Reply {
        self.serve("Propose", req, async |s: &Shared, cmd: Command| {
            s.batcher
                .write(cmd)
                .await
                .map_err(|e| Status::unavailable(format!("not committed here: {e}")))
        })
        .await
    }
}
