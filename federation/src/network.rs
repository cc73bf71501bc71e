//! Raft RPCs between controller nodes: openraft's serde types as JSON in a
//! `RaftPayload`, over gRPC with mutual TLS (the caller presents its node
//! certificate; the server only serves node identities).

use std::time::Duration;

use causeway_api::pb::raft_client::RaftClient;
use causeway_api::pb::RaftPayload;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, ClientTlsConfig};

use crate::store::MAX_APPEND_BYTES;
use crate::{NodeId, TypeConfig};

/// Builds channels to peer nodes with this node's credential.
#[derive(Clone)]
pub struct PeerChannels {
    tls: ClientTlsConfig,
}

impl PeerChannels {
    /// Channels secured with `tls` (the node's own controller credential).
    pub fn new(tls: ClientTlsConfig) -> Self {
        Self { tls }
    }

    /// A Raft client for the node at `addr` (connects lazily).
    pub fn raft_client(&self, addr: &str) -> Result<RaftClient<Channel>, PeerError> {
        let ch = Channel::from_shared(format!("https://{addr}"))
            .map_err(|e| PeerError(format!("bad peer address {addr:?}: {e}")))?
            .tls_config(self.tls.clone())
            .map_err(|e| PeerError(format!("TLS setup for {addr}: {e}")))?
            .connect_timeout(Duration::from_millis(500))
            .user_agent(causeway_api::version::user_agent())
            .map_err(|e| PeerError(format!("user agent for {addr}: {e}")))?
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(RaftClient::new(ch)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024))
    }
}

/// A peer channel could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PeerError(pub String);

/// openraft's network factory: one [`Connection`] per peer.
pub struct Network {
    channels: PeerChannels,
}

impl Network {
    /// A factory over `channels`.
    pub fn new(channels: PeerChannels) -> Self {
        Self { channels }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Connection {
        Connection {
            target,
            addr: node.addr.clone(),
            channels: self.channels.clone(),
            client: None,
            append_budget: MAX_APPEND_BYTES,
            append_in_flight: false,
        }
    }
}

/// openraft's connection to one peer node.
pub struct Connection {
    target: NodeId,
    addr: String,
    channels: PeerChannels,
    client: Option<RaftClient<Channel>>,
    /// Most entry bytes in the next `AppendEntries` to this peer. openraft
    /// 0.9 gives each one a heartbeat interval to finish; when one does not
    /// (a slow or busy peer, large entries), the next carries a quarter as
    /// much, and each success doubles it again, so a follower far behind
    /// still gains ground instead of being resent the same backlog forever.
    append_budget: usize,
    /// An `AppendEntries` was started and never returned: openraft's
    /// timeout dropped it.
    append_in_flight: bool,
}

/// Never less than one entry per `AppendEntries`, whatever the budget.
const MIN_APPEND_BUDGET: usize = 16 * 1024;

/// Keeps the first entries of `req` that fit in `budget` bytes (at least
/// one); the last one kept, if any were left out.
fn trim_to_budget(
    req: &mut AppendEntriesRequest<TypeConfig>,
    budget: usize,
) -> Option<openraft::LogId<NodeId>> {
    if req.entries.len() < 2 || budget >= MAX_APPEND_BYTES {
        return None;
    }
    let mut bytes = 0;
    let mut keep = 0;
    for e in &req.entries {
        bytes += crate::json_len(e);
        if bytes > budget && keep > 0 {
            break;
        }
        keep += 1;
    }
    if keep == req.entries.len() {
        return None;
    }
    req.entries.truncate(keep);
    req.entries.last().map(|e| e.log_id)
}

#[derive(Clone, Copy)]
enum Method {
    Append,
    Vote,
    Snapshot,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Append => "append_entries",
            Method::Vote => "vote",
            Method::Snapshot => "install_snapshot",
        }
    }
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl Connection {
    async fn call<Req, Resp, E>(
        &mut self,
        method: Method,
        req: &Req,
        ttl: Duration,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let data = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut client = match &self.client {
            Some(c) => c.clone(),
            None => {
                let c = self
                    .channels
                    .raft_client(&self.addr)
                    .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
                self.client = Some(c.clone());
                c
            }
        };
        let payload = RaftPayload::new(data);
        let started = std::time::Instant::now();
        let fut = async {
            match method {
                Method::Append => client.append_entries(payload).await,
                Method::Vote => client.vote(payload).await,
                Method::Snapshot => client.install_snapshot(payload).await,
            }
        };
        let resp = match tokio::time::timeout(ttl, fut).await {
            Ok(Ok(r)) => {
                metrics::histogram!("causeway_raft_rpc_seconds", "rpc" => method.name())
                    .record(started.elapsed().as_secs_f64());
                r.into_inner()
            }
            Ok(Err(status)) => {
                self.client = None;
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
            Err(elapsed) => return Err(RPCError::Network(NetworkError::new(&elapsed))),
        };
        let result: Result<Resp, RaftError<NodeId, E>> = serde_json::from_slice(&resp.data)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl Connection {
    fn shrink_append_budget(&mut self) {
        self.append_budget = (self.append_budget / 4).max(MIN_APPEND_BUDGET);
        metrics::counter!("causeway_raft_append_timeouts_total").increment(1);
        tracing::debug!(
            target = self.target,
            budget = self.append_budget,
            "AppendEntries did not finish in time; sending less per request"
        );
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        mut req: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        if self.append_in_flight {
            self.shrink_append_budget();
        }
        let sent_up_to = trim_to_budget(&mut req, self.append_budget);
        self.append_in_flight = true;
        let resp = self.call(Method::Append, &req, option.hard_ttl()).await;
        self.append_in_flight = false;
        match resp {
            Err(RPCError::Network(e)) => {
                // Our own deadline (or an undecodable answer).
                self.shrink_append_budget();
                Err(RPCError::Network(e))
            }
            Ok(AppendEntriesResponse::Success) => {
                // Only a request that carried entries says the link keeps up.
                if !req.entries.is_empty() {
                    self.append_budget = (self.append_budget * 2).min(MAX_APPEND_BYTES);
                }
                Ok(match sent_up_to {
                    // The follower matches the leader up to the last entry
                    // it was sent; openraft sends the rest next.
                    Some(last) => AppendEntriesResponse::PartialSuccess(Some(last)),
                    None => AppendEntriesResponse::Success,
                })
            }
            other => other,
        }
    }

    async fn install_snapshot(
        &mut self,
        req: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(Method::Snapshot, &req, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        req: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call(Method::Vote, &req, option.hard_ttl()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};

    fn request(sizes: &[usize]) -> AppendEntriesRequest<TypeConfig> {
        let entries = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), i as u64 + 1),
                payload: EntryPayload::Normal(crate::state::Command::PublishExports {
                    site: "a".parse().unwrap(),
                    exports: vec![],
                    tunnel_addrs: vec!["x".repeat(*n)],
                    now_ms: 0,
                }),
            })
            .collect();
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            leader_commit: None,
            entries,
        }
    }

    #[test]
    fn a_shrunk_budget_sends_a_prefix_of_at_least_one_entry() {
        // A full budget never trims (the log reader already bounds it).
        let mut r = request(&[600_000, 600_000]);
        assert_eq!(trim_to_budget(&mut r, MAX_APPEND_BYTES), None);
        assert_eq!(r.entries.len(), 2);

        let mut r = request(&[100_000, 100_000, 100_000, 10]);
        let last = trim_to_budget(&mut r, 250_000).expect("trimmed");
        assert_eq!(last.index, 2);
        assert_eq!(r.entries.len(), 2);

        // One entry over the budget still goes.
        let mut r = request(&[300_000, 10]);
        assert_eq!(trim_to_budget(&mut r, MIN_APPEND_BUDGET).unwrap().index, 1);
        assert_eq!(r.entries.len(), 1);

        // Everything fits: nothing to report.
        let mut r = request(&[10, 10]);
        assert_eq!(trim_to_budget(&mut r, MIN_APPEND_BUDGET), None);
        assert_eq!(r.entries.len(), 2);
    }
}
