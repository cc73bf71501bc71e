//! The gRPC services: `Federation` (sites, DNS, operators) and `Raft`
//! (controller nodes). Every RPC checks the caller's SPIFFE ID first:
//!
//! | caller                                   | may call                      |
//! |------------------------------------------|-------------------------------|
//! | no certificate                           | `Join` (the token authorizes) |
//! | `spiffe://controller.causeway/admin/*`   | all `Federation` RPCs         |
//! | `spiffe://controller.causeway/site/<s>`  | `PublishExports` for `<s>`, `Heartbeat` for `<s>`, `Catalog`, `Watch`, `ListPolicies`, `Status` |
//! | `spiffe://controller.causeway/node/<id>` | `Raft` RPCs, `Status`         |
//!
//! Rejections from the state machine map to gRPC codes in [`outcome_status`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use causeway_api::identity::{
    controller_trust_domain, spiffe_id_of, CertificateAuthority, SITE_TRUST_DOMAIN_SUFFIX,
};
use causeway_api::model::{check_dns_label, Protocol, ServiceKey, SiteName, SpiffeId};
use causeway_api::pb::{self, federation_server::Federation, raft_server::Raft as RaftRpc};
use causeway_api::token::{hash_secret, JoinToken, TokenError};
use futures::Stream;
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::broadcast::error::RecvError;
use tonic::{Code, Request, Response, Status};

use causeway_api::pb::raft_client::RaftClient;
use tonic::transport::Channel;

use crate::hub::Hub;
use crate::network::PeerChannels;
use crate::state::{
    Command, EndpointRecord, ExportRecord, Outcome, PolicyRecord, PortRecord, RejectCode,
};
use crate::{NodeId, Raft};

/// How long a write may wait for a leader before the caller gets UNAVAILABLE.
const WRITE_DEADLINE: Duration = Duration::from_secs(8);
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 86400);
const SITE_CREDENTIAL_LIFETIME: Duration = Duration::from_secs(365 * 86400);

/// What the services share.
pub struct Shared {
    pub node_id: NodeId,
    pub raft: Raft,
    pub hub: Arc<Hub>,
    pub ca: Arc<CertificateAuthority>,
    pub peers: PeerChannels,
    pub leases: std::sync::Mutex<crate::lease::Leases>,
    pub batcher: Batcher,
    /// A watcher whose stream accepts nothing for this long is cut off.
    pub watch_stall: Duration,
    /// Channels to peer nodes for forwarding, by address.
    pub peer_clients: std::sync::Mutex<std::collections::HashMap<String, RaftClient<Channel>>>,
}

type WriteResult =
    Result<Outcome, RaftError<NodeId, ClientWriteError<NodeId, openraft::BasicNode>>>;

/// Group commit at the proposer: commands that arrive while earlier ones
/// are being committed travel together in one log entry, so a burst of
/// writes costs a few appends and fsyncs instead of one each.
#[derive(Clone)]
pub struct Batcher {
    tx: tokio::sync::mpsc::Sender<Queued>,
    raft: Raft,
    /// Writes being committed right now; when none are, a write goes
    /// straight to Raft (nothing to batch with, no hand-offs).
    busy: Arc<std::sync::atomic::AtomicUsize>,
}

struct Decrement(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Most commands in one entry.
const MAX_BATCH: usize = 256;
/// Most encoded bytes of commands batched into one entry (a single larger
/// command still goes, alone): an entry then fits in one `AppendEntries`
/// (see [`crate::store::MAX_APPEND_BYTES`]).
const MAX_BATCH_BYTES: usize = crate::store::MAX_APPEND_BYTES;
/// Most batches being committed at once.
const BATCHES_IN_FLIGHT: usize = 4;

/// A command waiting for a batch: its encoded size and who to answer.
struct Queued {
    cmd: Command,
    bytes: usize,
    reply: tokio::sync::oneshot::Sender<WriteResult>,
}

/// The next batch: `first`, then whatever is already queued, up to
/// [`MAX_BATCH`] commands and [`MAX_BATCH_BYTES`]. A command that would
/// overflow the batch is handed back to start the next one.
fn fill_batch(
    first: Queued,
    rx: &mut tokio::sync::mpsc::Receiver<Queued>,
) -> (Vec<Queued>, Option<Queued>) {
    let mut bytes = first.bytes;
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(next) if bytes + next.bytes > MAX_BATCH_BYTES => return (batch, Some(next)),
            Ok(next) => {
                bytes += next.bytes;
                batch.push(next);
            }
            Err(_) => break,
        }
    }
    (batch, None)
}

impl Batcher {
    pub fn start(raft: Raft) -> Self {
        let raft_handle = raft.clone();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Queued>(4096);
        let slots = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
        tokio::spawn(async move {
            let mut carried = None;
            loop {
                let first = match carried.take() {
                    Some(q) => q,
                    None => match rx.recv().await {
                        Some(q) => q,
                        None => return,
                    },
                };
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (batch, next) = fill_batch(first, &mut rx);
                carried = next;
                metrics::histogram!("causeway_raft_proposal_batch").record(batch.len() as f64);
                let mut batch: Vec<_> = batch.into_iter().map(|q| (q.cmd, q.reply)).collect();
                let raft = raft.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    if batch.len() == 1 {
                        let (cmd, reply) = batch.pop().expect("one");
                        let _ = reply.send(raft.client_write(cmd).await.map(|r| r.data));
                        return;
                    }
                    let (cmds, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                    match raft.client_write(Command::Batch(cmds)).await {
                        Ok(resp) => match resp.data {
                            Outcome::Batch(outs) if outs.len() == replies.len() => {
                                for (reply, out) in replies.into_iter().zip(outs) {
                                    let _ = reply.send(Ok(out));
                                }
                            }
                            other => {
                                for reply in replies {
                                    let _ = reply.send(Ok(other.clone()));
                                }
                            }
                        },
                        Err(e) => {
                            for reply in replies {
                                let _ = reply.send(Err(e.clone()));
                            }
                        }
                    }
                });
            }
        });
        Self {
            tx,
            raft: raft_handle,
            busy: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        }
    }

    pub async fn write(&self, cmd: Command) -> WriteResult {
        use std::sync::atomic::Ordering;
        if self
            .busy
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let r = self.raft.client_write(cmd).await.map(|r| r.data);
            self.busy.fetch_sub(1, Ordering::AcqRel);
            return r;
        }
        self.busy.fetch_add(1, Ordering::AcqRel);
        let _guard = Decrement(self.busy.clone());
        let (reply, rx) = tokio::sync::oneshot::channel();
        let bytes = crate::json_len(&cmd);
        if self.tx.send(Queued { cmd, bytes, reply }).await.is_err() {
            return Err(RaftError::Fatal(openraft::error::Fatal::Stopped));
        }
        rx.await
            .unwrap_or(Err(RaftError::Fatal(openraft::error::Fatal::Stopped)))
    }
}

/// A membership change, run on the leader.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum MembershipOp {
    Add { id: NodeId, addr: String },
    Remove { id: NodeId },
}

/// Who is calling, from the client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Anonymous,
    Node(NodeId),
    Admin(String),
    Site(SiteName),
    /// A certificate from the controller CA whose role we do not know.
    Other(SpiffeId),
}

pub fn caller<T>(req: &Request<T>) -> Caller {
    let Some(certs) = req.peer_certs() else {
        return Caller::Anonymous;
    };
    let Some(leaf) = certs.first() else {
        return Caller::Anonymous;
    };
    let Ok(id) = spiffe_id_of(leaf) else {
        return Caller::Anonymous;
    };
    classify(&id)
}

pub fn classify(id: &SpiffeId) -> Caller {
    if *id.trust_domain() != controller_trust_domain() {
        return Caller::Other(id.clone());
    }
    let segs: Vec<&str> = id.segments().collect();
    match segs.as_slice() {
        ["node", n] => n
            .parse()
            .map(Caller::Node)
            .unwrap_or(Caller::Other(id.clone())),
        ["admin", name] => Caller::Admin(name.to_string()),
        ["site", s] => s
            .parse()
            .map(Caller::Site)
            .unwrap_or(Caller::Other(id.clone())),
        _ => Caller::Other(id.clone()),
    }
}

fn denied(rpc: &str, who: &Caller, need: &str) -> Status {
    metrics::counter!("causeway_api_denied_total", "rpc" => rpc.to_string()).increment(1);
    Status::permission_denied(format!(
        "{rpc} needs {need}; the caller is {}",
        describe(who)
    ))
}

fn describe(c: &Caller) -> String {
    match c {
        Caller::Anonymous => "not authenticated (no client certificate)".into(),
        Caller::Node(n) => format!("controller node {n}"),
        Caller::Admin(a) => format!("admin {a}"),
        Caller::Site(s) => format!("site {s}"),
        Caller::Other(id) => format!("{id}"),
    }
}

fn require_admin<T>(rpc: &str, req: &Request<T>) -> Result<Caller, Status> {
    match caller(req) {
        c @ Caller::Admin(_) => Ok(c),
        c => Err(denied(rpc, &c, "an admin credential")),
    }
}

/// How long a node waits for its own state to show a site as a member
/// before refusing the site's credential: a follower can be a moment behind
/// the join that issued the credential.
const MEMBERSHIP_CATCH_UP: Duration = Duration::from_secs(2);

async fn require_site_or_admin<T>(
    rpc: &str,
    req: &Request<T>,
    hub: &Hub,
) -> Result<Caller, Status> {
    match caller(req) {
        c @ Caller::Admin(_) => Ok(c),
        Caller::Site(s) => {
            // A removed site's credential is still a valid certificate until
            // it expires; membership is what makes it worth anything.
            if is_member_soon(hub, &s).await {
                Ok(Caller::Site(s))
            } else {
                let c = Caller::Site(s);
                Err(denied(
                    rpc,
                    &c,
                    "a member site (this site was removed) or admin credential",
                ))
            }
        }
        c => Err(denied(rpc, &c, "a site or admin credential")),
    }
}

/// Whether `site` is a member here, now or once this node has applied the
/// changes arriving within [`MEMBERSHIP_CATCH_UP`].
async fn is_member_soon(hub: &Hub, site: &SiteName) -> bool {
    // Subscribed before the first look, so no change falls in between.
    let mut changes = hub.subscribe();
    let member = || hub.read(|st| st.sites.contains_key(site));
    if member() {
        return true;
    }
    let give_up = tokio::time::sleep(MEMBERSHIP_CATCH_UP);
    tokio::pin!(give_up);
    loop {
        tokio::select! {
            _ = &mut give_up => return false,
            change = changes.recv() => match change {
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    if member() {
                        return true;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return false,
            },
        }
    }
}

fn require_node<T>(rpc: &str, req: &Request<T>) -> Result<NodeId, Status> {
    match caller(req) {
        Caller::Node(n) => Ok(n),
        c => Err(denied(rpc, &c, "a controller node credential")),
    }
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
            };
            Err(Status::new(code, message))
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn invalid(field: &str, detail: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {detail}"))
}

impl Shared {
    /// Commits a command through Raft, forwarding to the leader if needed.
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, Status> {
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
        let read = tokio::time::timeout(Duration::from_secs(5), self.raft.ensure_linearizable());
        match read.await {
            Ok(Ok(_)) => Ok(()),
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
        let (leader, addr) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let addr = m.current_leader.and_then(|l| {
                m.membership_config
                    .membership()
                    .get_node(&l)
                    .map(|n| n.addr.clone())
            });
            (m.current_leader, addr)
        };
        if leader != Some(self.node_id) {
            let addr =
                addr.ok_or_else(|| Status::unavailable("no leader is elected yet; retry"))?;
            let mut client = self.peer(&addr).map_err(Status::unavailable)?;
            let data = serde_json::to_vec(&op).map_err(|e| Status::internal(e.to_string()))?;
            client.change_membership(pb::RaftPayload { data }).await?;
            return Ok(());
        }
        self.change_membership_here(op).await
    }

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

    /// A cached channel to a peer node.
    fn peer(&self, addr: &str) -> Result<RaftClient<Channel>, String> {
        let mut m = self.peer_clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = m.get(addr) {
            return Ok(c.clone());
        }
        let c = self.peers.raft_client(addr).map_err(|e| e.to_string())?;
        m.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Records a site heartbeat at the leader (forwarding if needed).
    pub async fn record_heartbeat(&self, site: SiteName) -> Result<(), Status> {
        let (leader, addr) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let addr = m.current_leader.and_then(|l| {
                m.membership_config
                    .membership()
                    .get_node(&l)
                    .map(|n| n.addr.clone())
            });
            (m.current_leader, addr)
        };
        if leader == Some(self.node_id) {
            self.leases
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .handle_heartbeat(site, Instant::now());
            return Ok(());
        }
        let Some(addr) = addr else {
            return Err(Status::unavailable("no leader is elected yet; retry"));
        };
        let mut client = self.peer(&addr).map_err(Status::unavailable)?;
        let data = serde_json::to_vec(&site).map_err(|e| Status::internal(e.to_string()))?;
        match tokio::time::timeout(
            Duration::from_secs(2),
            client.forward_heartbeat(pb::RaftPayload { data }),
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

    async fn forward(&self, addr: &str, cmd: &Command) -> Result<Outcome, String> {
        let mut client = self.peer(addr)?;
        let data = serde_json::to_vec(cmd).map_err(|e| e.to_string())?;
        let reply = client
            .propose(pb::RaftPayload { data })
            .await
            .map_err(|s| s.message().to_string())?;
        serde_json::from_slice(&reply.into_inner().data).map_err(|e| e.to_string())
    }

    fn controller_endpoints(&self) -> Vec<String> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.nodes().map(|(_, n)| n.addr.clone()).collect()
    }
}

fn parse_labels(
    labels: &std::collections::HashMap<String, String>,
) -> Result<BTreeMap<String, String>, Status> {
    if labels.len() > crate::state::MAX_LABELS {
        return Err(invalid(
            "labels",
            format!("at most {} labels", crate::state::MAX_LABELS),
        ));
    }
    let mut out = BTreeMap::new();
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'/'));
        if !key_ok {
            return Err(invalid(
                "labels",
                format!("key {k:?} must be 1-63 characters of letters, digits, '-', '_', '.', '/'"),
            ));
        }
        causeway_api::model::check_label_value("label value", v)
            .map_err(|e| invalid(&format!("labels[{k}]"), e))?;
        out.insert(k.clone(), v.clone());
    }
    Ok(out)
}

fn parse_tunnel_addrs(addrs: &[String]) -> Result<Vec<String>, Status> {
    if addrs.len() > crate::state::MAX_TUNNEL_ADDRS {
        return Err(invalid(
            "tunnel_addrs",
            format!("at most {}", crate::state::MAX_TUNNEL_ADDRS),
        ));
    }
    let mut out = Vec::with_capacity(addrs.len());
    for a in addrs {
        let t: causeway_api::model::TunnelAddr =
            a.parse().map_err(|e| invalid("tunnel_addrs", e))?;
        // Stored in canonical form, so equal sets compare equal.
        out.push(t.to_string());
    }
    Ok(out)
}

fn parse_bundle(pem: &str) -> Result<(), Status> {
    causeway_api::identity::check_trust_bundle("trust_bundle_pem", pem)
        .map(drop)
        .map_err(Status::invalid_argument)
}

pub fn parse_exports(exports: &[pb::Export]) -> Result<Vec<ExportRecord>, Status> {
    let mut out = Vec::with_capacity(exports.len());
    for (i, e) in exports.iter().enumerate() {
        let service: ServiceKey = e
            .service
            .parse()
            .map_err(|err| invalid(&format!("exports[{i}].service"), err))?;
        let mut ports = Vec::with_capacity(e.ports.len());
        for (j, p) in e.ports.iter().enumerate() {
            let field = format!("exports[{i}].ports[{j}]");
            let port = u16::try_from(p.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| invalid(&field, format!("port {} is not in 1-65535", p.port)))?;
            let protocol: Protocol = p.protocol.parse().map_err(|err| invalid(&field, err))?;
            if !p.name.is_empty() {
                check_dns_label("port name", &p.name).map_err(|err| invalid(&field, err))?;
            }
            ports.push(PortRecord {
                port,
                protocol,
                name: p.name.clone(),
            });
        }
        let field = format!("exports[{i}].endpoints");
        if !e.headless && !e.endpoints.is_empty() {
            return Err(invalid(
                &field,
                "only headless exports publish endpoint addresses; set headless or send none",
            ));
        }
        if e.endpoints.len() > crate::state::MAX_ENDPOINTS_PER_EXPORT {
            return Err(invalid(
                &field,
                format!(
                    "{} endpoints; a headless export may publish at most {}",
                    e.endpoints.len(),
                    crate::state::MAX_ENDPOINTS_PER_EXPORT
                ),
            ));
        }
        let mut endpoints: Vec<EndpointRecord> = Vec::with_capacity(e.endpoints.len());
        for (j, ep) in e.endpoints.iter().enumerate() {
            let field = format!("exports[{i}].endpoints[{j}]");
            let address: std::net::IpAddr = ep.address.parse().map_err(|_| {
                invalid(
                    &format!("{field}.address"),
                    format!("{:?} is not an IPv4 or IPv6 address", ep.address),
                )
            })?;
            if !ep.hostname.is_empty() {
                check_dns_label("hostname", &ep.hostname)
                    .map_err(|err| invalid(&format!("{field}.hostname"), err))?;
            }
            let record = EndpointRecord {
                address,
                hostname: ep.hostname.clone(),
            };
            if endpoints.contains(&record) {
                return Err(invalid(&field, "listed twice"));
            }
            endpoints.push(record);
        }
        let zones = parse_zones(i, e)?;
        out.push(ExportRecord {
            service,
            ports,
            healthy_endpoints: e.healthy_endpoints,
            vip_index: 0,
            headless: e.headless,
            endpoints,
            total_endpoints: e.total_endpoints.max(e.healthy_endpoints),
            zones,
        });
    }
    Ok(out)
}

/// Per-zone health of export `i`: valid zone labels, each once, healthy
/// within total, adding up to the export's own counts.
fn parse_zones(i: usize, e: &pb::Export) -> Result<Vec<crate::state::ZoneRecord>, Status> {
    let field = format!("exports[{i}].zones");
    if e.zones.len() > crate::state::MAX_ZONES_PER_EXPORT {
        return Err(invalid(
            &field,
            format!(
                "{} zones; an export may report at most {}",
                e.zones.len(),
                crate::state::MAX_ZONES_PER_EXPORT
            ),
        ));
    }
    let mut out: Vec<crate::state::ZoneRecord> = Vec::with_capacity(e.zones.len());
    let (mut healthy, mut total) = (0u64, 0u64);
    for (j, z) in e.zones.iter().enumerate() {
        let f = format!("{field}[{j}]");
        causeway_api::model::check_label_value("zone", &z.zone)
            .map_err(|err| invalid(&format!("{f}.zone"), err))?;
        if out.iter().any(|o| o.zone == z.zone) {
            return Err(invalid(&f, format!("zone {:?} listed twice", z.zone)));
        }
        if z.healthy > z.total {
            return Err(invalid(
                &f,
                format!("{} healthy of {} endpoints", z.healthy, z.total),
            ));
        }
        healthy += u64::from(z.healthy);
        total += u64::from(z.total);
        out.push(crate::state::ZoneRecord {
            zone: z.zone.clone(),
            healthy: z.healthy,
            total: z.total,
        });
    }
    if !out.is_empty()
        && (healthy != u64::from(e.healthy_endpoints)
            || total != u64::from(e.total_endpoints.max(e.healthy_endpoints)))
    {
        return Err(invalid(
            &field,
            format!(
                "zones add up to {healthy} healthy of {total}, but the export says {} of {}",
                e.healthy_endpoints, e.total_endpoints
            ),
        ));
    }
    Ok(out)
}

/// Validates every document; the error lists every invalid field of every
/// document, each prefixed with the document's position and name.
pub fn parse_policy_documents(docs: &[String]) -> Result<Vec<PolicyRecord>, Status> {
    use causeway_api::policy::{parse_document, MAX_DOCUMENTS, MAX_SPEC_BYTES};
    if docs.is_empty() {
        return Err(invalid(
            "documents_json",
            "send at least one policy document",
        ));
    }
    if docs.len() > MAX_DOCUMENTS {
        return Err(invalid(
            "documents_json",
            format!("at most {MAX_DOCUMENTS} documents per apply"),
        ));
    }
    let mut errors = Vec::new();
    let mut out: Vec<PolicyRecord> = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        if d.len() > 4 * MAX_SPEC_BYTES {
            errors.push(format!(
                "documents[{i}]: larger than {} bytes",
                4 * MAX_SPEC_BYTES
            ));
            continue;
        }
        let value: serde_json::Value = match serde_json::from_str(d) {
            Ok(v) => v,
            Err(e) => {
                errors.push(format!("documents[{i}]: not JSON: {e}"));
                continue;
            }
        };
        match parse_document(&value) {
            Ok(p) => {
                let rec = PolicyRecord {
                    kind: p.kind().as_str().to_string(),
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    document_json: p.to_json(),
                    revision: 0,
                };
                if out.iter().any(|o| o.key() == rec.key()) {
                    errors.push(format!(
                        "documents[{i}] ({} {}/{}): listed twice in one apply",
                        rec.kind, rec.namespace, rec.name
                    ));
                }
                out.push(rec);
            }
            Err(errs) => {
                let who = causeway_api::policy::document_label(&value);
                errors.extend(
                    errs.into_iter()
                        .map(|e| format!("documents[{i}]{who}: {e}")),
                );
            }
        }
    }
    if !errors.is_empty() {
        return Err(Status::invalid_argument(errors.join("\n")));
    }
    Ok(out)
}

pub struct FederationService {
    pub shared: Arc<Shared>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Federation for FederationService {
    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let r = req.into_inner();
        let token = JoinToken::decode(&r.token).map_err(|e: TokenError| invalid("token", e))?;
        parse_bundle(&r.trust_bundle_pem)?;
        let tunnel_addrs = parse_tunnel_addrs(&r.tunnel_addrs)?;
        let site = token.site.clone();
        let trust_domain = site.trust_domain(SITE_TRUST_DOMAIN_SUFFIX);
        let api_id = SpiffeId::new(controller_trust_domain(), &format!("/site/{site}"))
            .map_err(|e| Status::internal(e.to_string()))?;
        // Sign first: a bad CSR must not burn the token.
        let api_cert_pem = self
            .shared
            .ca
            .sign_csr(&r.csr_pem, &api_id, SITE_CREDENTIAL_LIFETIME)
            .map_err(|e| invalid("csr_pem", e))?;
        let outcome = self
            .shared
            .propose(Command::JoinSite {
                token_id: token.id.clone(),
                secret_sha256: hash_secret(&token.secret),
                now_ms: now_ms(),
                site: site.clone(),
                trust_domain: trust_domain.clone(),
                trust_bundle_pem: r.trust_bundle_pem,
                tunnel_addrs,
            })
            .await?;
        let revision = outcome_status(outcome)?;
        tracing::info!(%site, "site joined");
        Ok(Response::new(pb::JoinResponse {
            site: site.to_string(),
            trust_domain: trust_domain.to_string(),
            api_cert_pem,
            controller_ca_pem: self.shared.ca.cert_pem.clone(),
            controller_endpoints: self.shared.controller_endpoints(),
            revision,
        }))
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        require_admin("CreateJoinToken", &req)?;
        let r = req.into_inner();
        let site: SiteName = r.site.parse().map_err(|e| invalid("site", e))?;
        let labels = parse_labels(&r.labels)?;
        let ttl = if r.ttl_seconds == 0 {
            DEFAULT_TOKEN_TTL
        } else {
            Duration::from_secs(r.ttl_seconds)
        };
        if ttl > MAX_TOKEN_TTL {
            return Err(invalid("ttl_seconds", "at most 7 days"));
        }
        let token = JoinToken::generate(
            site.clone(),
            self.shared.controller_endpoints(),
            self.shared.ca.cert_pem.clone(),
        );
        let now = now_ms();
        let expires_at_ms = now + ttl.as_millis() as u64;
        let outcome = self
            .shared
            .propose(Command::CreateJoinToken {
                token_id: token.id.clone(),
                secret_sha256: token.secret_hash(),
                site,
                labels,
                expires_at_ms,
                now_ms: now,
            })
            .await?;
        outcome_status(outcome)?;
        Ok(Response::new(pb::CreateJoinTokenResponse {
            token: token.encode(),
            expires_at_unix_ms: expires_at_ms,
        }))
    }

    async fn remove_site(
        &self,
        req: Request<pb::RemoveSiteRequest>,
    ) -> Result<Response<pb::RemoveSiteResponse>, Status> {
        require_admin("RemoveSite", &req)?;
        let site: SiteName = req
            .into_inner()
            .site
            .parse()
            .map_err(|e| invalid("site", e))?;
        let revision = outcome_status(self.shared.propose(Command::RemoveSite { site }).await?)?;
        Ok(Response::new(pb::RemoveSiteResponse { revision }))
    }

    async fn set_site_labels(
        &self,
        req: Request<pb::SetSiteLabelsRequest>,
    ) -> Result<Response<pb::SetSiteLabelsResponse>, Status> {
        require_admin("SetSiteLabels", &req)?;
        let r = req.into_inner();
        let site: SiteName = r.site.parse().map_err(|e| invalid("site", e))?;
        let labels = parse_labels(&r.labels)?;
        let revision = outcome_status(
            self.shared
                .propose(Command::SetSiteLabels { site, labels })
                .await?,
        )?;
        Ok(Response::new(pb::SetSiteLabelsResponse { revision }))
    }

    async fn apply_policies(
        &self,
        req: Request<pb::ApplyPoliciesRequest>,
    ) -> Result<Response<pb::ApplyPoliciesResponse>, Status> {
        require_admin("ApplyPolicies", &req)?;
        let docs = req.into_inner().documents_json;
        let policies = parse_policy_documents(&docs)?;
        let results: Vec<String> = self.shared.hub.read(|s| {
            policies
                .iter()
                .map(|p| match s.policies.get(&p.key()) {
                    None => "created".to_string(),
                    Some(old) if old.document_json == p.document_json => "unchanged".into(),
                    Some(_) => "configured".into(),
                })
                .collect()
        });
        let revision = outcome_status(
            self.shared
                .propose(Command::ApplyPolicies { policies })
                .await?,
        )?;
        Ok(Response::new(pb::ApplyPoliciesResponse {
            revision,
            results,
        }))
    }

    async fn list_policies(
        &self,
        req: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        require_site_or_admin("ListPolicies", &req, &self.shared.hub).await?;
        if req.get_ref().linearizable {
            self.shared.linearizable_barrier().await?;
        }
        let kind = req.into_inner().kind;
        let kind = if kind.is_empty() {
            None
        } else {
            Some(
                kind.parse::<causeway_api::policy::Kind>()
                    .map_err(|e| invalid("kind", e))?,
            )
        };
        Ok(Response::new(self.shared.hub.read(|s| {
            pb::ListPoliciesResponse {
                revision: s.revision,
                policies: s
                    .policies
                    .values()
                    .filter(|p| kind.is_none_or(|k| p.kind == k.as_str()))
                    .map(crate::state::PolicyRecord::to_pb)
                    .collect(),
            }
        })))
    }

    async fn delete_policy(
        &self,
        req: Request<pb::DeletePolicyRequest>,
    ) -> Result<Response<pb::DeletePolicyResponse>, Status> {
        require_admin("DeletePolicy", &req)?;
        let r = req.into_inner();
        let kind = r
            .kind
            .parse::<causeway_api::policy::Kind>()
            .map_err(|e| invalid("kind", e))?;
        check_dns_label("namespace", &r.namespace).map_err(|e| invalid("namespace", e))?;
        check_dns_label("name", &r.name).map_err(|e| invalid("name", e))?;
        let revision = outcome_status(
            self.shared
                .propose(Command::DeletePolicy {
                    kind: kind.as_str().to_string(),
                    namespace: r.namespace,
                    name: r.name,
                })
                .await?,
        )?;
        Ok(Response::new(pb::DeletePolicyResponse { revision }))
    }

    async fn update_trust_bundle(
        &self,
        req: Request<pb::UpdateTrustBundleRequest>,
    ) -> Result<Response<pb::UpdateTrustBundleResponse>, Status> {
        let who = require_site_or_admin("UpdateTrustBundle", &req, &self.shared.hub).await?;
        let r = req.into_inner();
        let site: SiteName = r.site.parse().map_err(|e| invalid("site", e))?;
        match &who {
            Caller::Site(own) if *own != site => {
                return Err(denied(
                    "UpdateTrustBundle",
                    &who,
                    &format!("the credential of site {site} or an admin credential; site {own} may only change its own bundle"),
                ))
            }
            _ => {}
        }
        parse_bundle(&r.trust_bundle_pem)?;
        let revision = outcome_status(
            self.shared
                .propose(Command::SetTrustBundle {
                    site,
                    trust_bundle_pem: r.trust_bundle_pem,
                })
                .await?,
        )?;
        Ok(Response::new(pb::UpdateTrustBundleResponse { revision }))
    }

    async fn publish_exports(
        &self,
        req: Request<pb::PublishExportsRequest>,
    ) -> Result<Response<pb::PublishExportsResponse>, Status> {
        let who = require_site_or_admin("PublishExports", &req, &self.shared.hub).await?;
        let r = req.into_inner();
        let site: SiteName = r.site.parse().map_err(|e| invalid("site", e))?;
        match &who {
            Caller::Site(own) if *own == site => {}
            Caller::Site(own) => {
                return Err(denied(
                    "PublishExports",
                    &who,
                    &format!(
                    "the credential of site {site}; site {own} may only publish its own exports"
                ),
                ))
            }
            _ => return Err(denied("PublishExports", &who, "a site credential")),
        }
        if r.exports.len() > crate::state::MAX_EXPORTS_PER_SITE {
            return Err(Status::resource_exhausted(format!(
                "exports: a site may export at most {} services",
                crate::state::MAX_EXPORTS_PER_SITE
            )));
        }
        let exports = parse_exports(&r.exports)?;
        let tunnel_addrs = parse_tunnel_addrs(&r.tunnel_addrs)?;
        let revision = outcome_status(
            self.shared
                .propose(Command::PublishExports {
                    site,
                    exports,
                    tunnel_addrs,
                })
                .await?,
        )?;
        Ok(Response::new(pb::PublishExportsResponse { revision }))
    }

    async fn catalog(
        &self,
        req: Request<pb::CatalogRequest>,
    ) -> Result<Response<pb::CatalogSnapshot>, Status> {
        require_site_or_admin("Catalog", &req, &self.shared.hub).await?;
        if req.get_ref().linearizable {
            self.shared.linearizable_barrier().await?;
        }
        Ok(Response::new(self.shared.hub.read(|s| s.snapshot_pb())))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let site = match require_site_or_admin("Watch", &req, &self.shared.hub).await? {
            Caller::Site(s) => Some(s),
            _ => None,
        };
        let from = req.into_inner().from_revision;
        let hub = self.shared.hub.clone();
        let stall = self.shared.watch_stall;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::WatchEvent, Status>>(WATCH_QUEUE);
        tokio::spawn(async move {
            metrics::gauge!("causeway_watchers").increment(1.0);
            serve_watch(hub, from, tx, stall, site).await;
            metrics::gauge!("causeway_watchers").decrement(1.0);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let who = caller(&req);
        let site: SiteName = req.get_ref().site.parse().map_err(|e| invalid("site", e))?;
        let member = self.shared.hub.read(|st| st.sites.contains_key(&site));
        match &who {
            Caller::Site(own) if *own == site && member => {}
            _ => {
                return Err(denied(
                    "Heartbeat",
                    &who,
                    &format!("the credential of site {site}"),
                ))
            }
        }
        self.shared.record_heartbeat(site).await?;
        let lease_ms = self
            .shared
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .config()
            .lease
            .as_millis() as u64;
        Ok(Response::new(pb::HeartbeatResponse { lease_ms }))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        match caller(&req) {
            Caller::Anonymous | Caller::Other(_) => {
                return Err(denied("Status", &caller(&req), "any causeway credential"))
            }
            _ => {}
        }
        Ok(Response::new(self.shared.status()))
    }

    async fn add_controller(
        &self,
        req: Request<pb::AddControllerRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        require_admin("AddController", &req)?;
        let r = req.into_inner();
        if r.id == 0 {
            return Err(invalid("id", "must be a positive integer"));
        }
        r.addr
            .parse::<SocketAddr>()
            .map_err(|_| invalid("addr", format!("{:?} is not an ip:port address", r.addr)))?;
        self.shared
            .change_membership(MembershipOp::Add {
                id: r.id,
                addr: r.addr,
            })
            .await?;
        Ok(Response::new(self.shared.status()))
    }

    async fn remove_controller(
        &self,
        req: Request<pb::RemoveControllerRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        require_admin("RemoveController", &req)?;
        let id = req.into_inner().id;
        self.shared
            .change_membership(MembershipOp::Remove { id })
            .await?;
        Ok(Response::new(self.shared.status()))
    }
}

impl Shared {
    pub fn status(&self) -> pb::StatusResponse {
        let m = self.raft.metrics().borrow().clone();
        let role = format!("{:?}", m.state).to_lowercase();
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
        }
    }
}

/// Streams a starting point, then every later revision in order. A watcher
/// that falls behind the broadcast buffer is resynced with a snapshot.
/// Events queued per watcher beyond what HTTP/2 flow control holds.
const WATCH_QUEUE: usize = 64;

/// Follows the hub for one watcher. What a watcher can hold is bounded: its
/// queue of `WATCH_QUEUE` events plus the HTTP/2 window; the broadcast ring
/// is shared. A watcher that falls behind the ring is resynced with a
/// snapshot; one whose stream accepts nothing for `stall` is cut off, and
/// its client resumes (getting a snapshot if the history no longer reaches
/// back). Either way it never slows the hub or other watchers.
/// Streams catalog changes to one watcher from revision `from`. A site's
/// watch lasts only while the site is a member: once it is removed, the
/// stream ends with a permission error instead of the next change.
async fn serve_watch(
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
                        let snapshot = matches!(ev.kind, Some(pb::watch_event::Kind::Snapshot(_)));
                        if ev.revision <= last && !snapshot {
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
                        // Force a snapshot: history may not reach back.
                        last = 0;
                        continue 'outer;
                    }
                    Err(RecvError::Closed) => return,
                },
                _ = tx.closed() => return,
            }
        }
    }
}

pub struct RaftService {
    pub shared: Arc<Shared>,
}

fn decode<T: serde::de::DeserializeOwned>(p: &pb::RaftPayload) -> Result<T, Status> {
    serde_json::from_slice(&p.data)
        .map_err(|e| Status::invalid_argument(format!("raft payload: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Response<pb::RaftPayload>, Status> {
    serde_json::to_vec(v)
        .map(|data| Response::new(pb::RaftPayload { data }))
        .map_err(|e| Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        require_node("AppendEntries", &req)?;
        let r = decode(req.get_ref())?;
        encode(&self.shared.raft.append_entries(r).await)
    }

    async fn vote(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        require_node("Vote", &req)?;
        let r = decode(req.get_ref())?;
        encode(&self.shared.raft.vote(r).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        require_node("InstallSnapshot", &req)?;
        let r = decode(req.get_ref())?;
        encode(&self.shared.raft.install_snapshot(r).await)
    }

    async fn change_membership(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        require_node("ChangeMembership", &req)?;
        let op: MembershipOp = decode(req.get_ref())?;
        self.shared.change_membership_here(op).await?;
        encode(&())
    }

    async fn forward_heartbeat(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        require_node("ForwardHeartbeat", &req)?;
        let site: SiteName = decode(req.get_ref())?;
        // Only the leader keeps leases; a stale forward is dropped.
        let leader = self.shared.raft.metrics().borrow().current_leader;
        if leader == Some(self.shared.node_id) {
            self.shared
                .leases
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .handle_heartbeat(site, Instant::now());
        }
        encode(&())
    }

    async fn propose(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        require_node("Propose", &req)?;
        let cmd: Command = decode(req.get_ref())?;
        match self.shared.batcher.write(cmd).await {
            Ok(outcome) => encode(&outcome),
            Err(e) => Err(Status::unavailable(format!("not committed here: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_site_joining_while_its_first_call_waits_is_let_in_and_an_unknown_one_is_not() {
        let hub = Hub::new();
        let site: SiteName = "alpha".parse().unwrap();
        hub.apply(Command::CreateJoinToken {
            token_id: "t".into(),
            secret_sha256: "h".into(),
            site: site.clone(),
            labels: BTreeMap::new(),
            expires_at_ms: u64::MAX,
            now_ms: 0,
        });
        // This node applies the join 100 ms into the call.
        let later = hub.clone();
        let joiner = site.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            later.apply(Command::JoinSite {
                token_id: "t".into(),
                secret_sha256: "h".into(),
                now_ms: 1,
                site: joiner,
                trust_domain: "alpha.causeway".parse().unwrap(),
                trust_bundle_pem: "pem".into(),
                tunnel_addrs: vec!["127.0.0.1:1".into()],
            });
        });
        assert!(is_member_soon(&hub, &site).await);
        assert!(!is_member_soon(&hub, &"beta".parse().unwrap()).await);
    }

    fn queued(site: &str, padding: usize) -> (Queued, tokio::sync::oneshot::Receiver<WriteResult>) {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let cmd = Command::PublishExports {
            site: site.parse().unwrap(),
            exports: vec![],
            tunnel_addrs: vec!["x".repeat(padding)],
        };
        let bytes = crate::json_len(&cmd);
        assert_eq!(bytes, serde_json::to_vec(&cmd).unwrap().len());
        (Queued { cmd, bytes, reply }, rx)
    }

    #[tokio::test]
    async fn batches_stop_at_the_byte_limit_and_carry_the_rest_over() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let mut keep = vec![];
        for site in ["b", "c", "d"] {
            let (q, r) = queued(site, 400_000);
            keep.push(r);
            tx.send(q).await.unwrap();
        }
        let (first, _r) = queued("a", 100);
        let (batch, carried) = fill_batch(first, &mut rx);
        let sites = |b: &[Queued]| {
            b.iter()
                .map(|q| match &q.cmd {
                    Command::PublishExports { site, .. } => site.to_string(),
                    _ => unreachable!(),
                })
                .collect::<Vec<_>>()
        };
        // a + b + c is about 800 kB; d would pass 1 MiB and starts the next.
        assert_eq!(sites(&batch), ["a", "b", "c"]);
        let carried = carried.expect("d is carried over");
        let (next, none) = fill_batch(carried, &mut rx);
        assert_eq!(sites(&next), ["d"]);
        assert!(none.is_none());

        // One command over the limit still makes a batch of its own.
        let (big, _r) = queued("e", 2 * MAX_BATCH_BYTES);
        let (small, _r2) = queued("f", 10);
        tx.send(small).await.unwrap();
        let (batch, carried) = fill_batch(big, &mut rx);
        assert_eq!(sites(&batch), ["e"]);
        assert_eq!(sites(&[carried.unwrap()]), ["f"]);
    }

    fn export(healthy: u32, total: u32, zones: &[(&str, u32, u32)]) -> pb::Export {
        pb::Export {
            service: "shop/web".into(),
            ports: vec![pb::ServicePort {
                port: 80,
                protocol: "http2".into(),
                name: String::new(),
            }],
            healthy_endpoints: healthy,
            total_endpoints: total,
            zones: zones
                .iter()
                .map(|(z, h, t)| pb::ZoneHealth {
                    zone: z.to_string(),
                    healthy: *h,
                    total: *t,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn zone_health_is_checked_and_kept() {
        let ok = parse_exports(&[export(3, 4, &[("", 1, 1), ("us-east-1a", 2, 3)])]).unwrap();
        assert_eq!(ok[0].zones.len(), 2);
        assert_eq!(ok[0].zones[1].zone, "us-east-1a");
        assert_eq!(ok[0].ports[0].protocol, Protocol::Http2);
        assert!(parse_exports(&[export(1, 1, &[])]).unwrap()[0]
            .zones
            .is_empty());

        let err = |e: pb::Export| parse_exports(&[e]).unwrap_err().message().to_string();
        let m = err(export(3, 4, &[("a", 1, 1), ("b", 1, 3)]));
        assert!(
            m.contains("exports[0].zones") && m.contains("add up to 2 healthy of 4"),
            "{m}"
        );
        let m = err(export(1, 1, &[("a", 1, 1), ("a", 0, 0)]));
        assert!(
            m.contains("exports[0].zones[1]") && m.contains("twice"),
            "{m}"
        );
        let m = err(export(2, 1, &[("a", 2, 1)]));
        assert!(
            m.contains("exports[0].zones[0]") && m.contains("2 healthy of 1"),
            "{m}"
        );
        let m = err(export(1, 1, &[("-bad", 1, 1)]));
        assert!(
            m.contains("exports[0].zones[0].zone") && m.contains("label value"),
            "{m}"
        );
        let many: Vec<(String, u32, u32)> = (0..=crate::state::MAX_ZONES_PER_EXPORT)
            .map(|i| (format!("z{i}"), 0, 0))
            .collect();
        let many: Vec<(&str, u32, u32)> =
            many.iter().map(|(z, h, t)| (z.as_str(), *h, *t)).collect();
        let m = err(export(0, 0, &many));
        assert!(m.contains("at most 64"), "{m}");
    }
}
