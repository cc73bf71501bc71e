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

use crate::{NodeId, TypeConfig};

/// Builds channels to peer nodes with this node's credential.
#[derive(Clone)]
pub struct PeerChannels {
    tls: ClientTlsConfig,
}

impl PeerChannels {
    pub fn new(tls: ClientTlsConfig) -> Self {
        Self { tls }
    }

    pub fn raft_client(&self, addr: &str) -> Result<RaftClient<Channel>, PeerError> {
        let ch = Channel::from_shared(format!("https://{addr}"))
            .map_err(|e| PeerError(format!("bad peer address {addr:?}: {e}")))?
            .tls_config(self.tls.clone())
            .map_err(|e| PeerError(format!("TLS setup for {addr}: {e}")))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(RaftClient::new(ch)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PeerError(pub String);

pub struct Network {
    channels: PeerChannels,
}

impl Network {
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
        }
    }
}

pub struct Connection {
    target: NodeId,
    addr: String,
    channels: PeerChannels,
    client: Option<RaftClient<Channel>>,
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
        let payload = RaftPayload { data };
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

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        self.call(Method::Append, &req, option.hard_ttl()).await
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
