//! The controller's gRPC services, one per file, and what they share.
//!
//! - [`federation`]: the `Federation` service that sites, DNS servers and
//!   operators call;
//! - [`raft`]: the `Raft` service, between controller nodes only;
//! - [`authz`]: who the caller is and what it may call (the trust boundary);
//! - [`validate`]: request fields checked before anything is proposed;
//! - [`propose`]: committing through Raft, forwarding to the leader;
//! - [`batcher`]: group commit of concurrent writes;
//! - [`watch`]: status and the catalog watch stream;
//! - `credentials`: admin credentials and renewal;
//! - [`gate`]: before any RPC, the credential's standing (recorded, not
//!   revoked, not expired) and size bounds for unauthenticated callers.
//!
//! Every RPC checks the caller's SPIFFE ID first:
//!
//! | caller                                   | may call                      |
//! |------------------------------------------|-------------------------------|
//! | no certificate                           | `Join` (the token authorizes) |
//! | `spiffe://controller.causeway/admin/*`   | all `Federation` RPCs (once any admin credential is recorded, only recorded ones) |
//! | `spiffe://controller.causeway/site/<s>`  | `PublishExports`, `Heartbeat`, `UpdateTrustBundle` and `RevokeCertificate` for `<s>`, `RenewCredential` (its own), `Catalog`, `Watch`, `ListPolicies`, its own policies, `Status` |
//! | `spiffe://controller.causeway/node/<id>` | `Raft` RPCs, `Status`         |
//!
//! Rejections from the state machine map to gRPC codes in [`outcome_status`].

use std::sync::Arc;
use std::time::Duration;

use causeway_api::identity::CertificateAuthority;
use causeway_api::pb::raft_client::RaftClient;
use tonic::transport::Channel;

use crate::hub::Hub;
use crate::network::PeerChannels;
use crate::{NodeId, Raft};

pub mod authz;
pub mod batcher;
mod credentials;
pub mod federation;
pub mod gate;
pub mod limit;
pub mod propose;
pub mod raft;
pub mod validate;
pub mod watch;

pub use authz::{caller, classify, Caller};
pub use batcher::Batcher;
pub use federation::FederationService;
pub use propose::{outcome_status, MembershipOp};
pub use raft::RaftService;
pub use validate::{parse_exports, parse_policy_documents};

/// What the services share.
pub struct Shared {
    /// This node's Raft id.
    pub node_id: NodeId,
    /// This node's openraft handle.
    pub raft: Raft,
    /// The applied catalog and its change feed.
    pub hub: Arc<Hub>,
    /// The controller CA (signs site credentials at join).
    pub ca: Arc<CertificateAuthority>,
    /// mTLS settings for channels to peer nodes.
    pub peers: PeerChannels,
    /// Site leases (meaningful on the leader only).
    pub leases: std::sync::Mutex<crate::lease::Leases>,
    /// Group commit of this node's writes.
    pub batcher: Batcher,
    /// A watcher whose stream accepts nothing for this long is cut off.
    pub watch_stall: Duration,
    /// Channels to peer nodes for forwarding, by address.
    pub peer_clients: std::sync::Mutex<std::collections::HashMap<String, RaftClient<Channel>>>,
    /// Failed anonymous joins per source address.
    pub joins: limit::JoinLimiter,
    /// Lifetimes of the credentials this node issues.
    pub credentials: crate::config::CredentialLifetimes,
    /// Spans, when tracing is on.
    pub tracing: Arc<causeway_api::trace::Tracing>,
    /// Where this node's data lives (its free space is in `Status`).
    pub data_dir: std::path::PathBuf,
    /// When this node's certificate expires (ms since the epoch).
    pub cert_not_after_ms: u64,
    /// When a quorum last confirmed this node's leadership (heartbeats).
    pub lead_confirmed: std::sync::Mutex<Option<std::time::Instant>>,
}

/// The record of an admin certificate (PEM) issued by `issued_by`, with
/// its SHA-256: what `Command::RecordAdmin` stores.
pub fn admin_record_of(
    cert_pem: &str,
    issued_by: &str,
) -> Result<(String, crate::state::AdminRecord), String> {
    let der = causeway_api::identity::parse_certs_pem("admin certificate", cert_pem)
        .map_err(|e| e.to_string())?;
    admin_record_of_der(der.first().ok_or("no certificate")?, issued_by)
}

/// [`admin_record_of`] for a certificate in DER.
pub fn admin_record_of_der(
    leaf: &tonic::transport::CertificateDer<'_>,
    issued_by: &str,
) -> Result<(String, crate::state::AdminRecord), String> {
    let id = causeway_api::identity::spiffe_id_of(leaf).map_err(|e| e.to_string())?;
    let Caller::Admin(name) = classify(&id) else {
        return Err(format!("{id} is not an admin identity"));
    };
    let (issued, expires) =
        causeway_api::identity::validity_ms(leaf).ok_or("unreadable validity")?;
    Ok((
        causeway_api::identity::fingerprint(leaf),
        crate::state::AdminRecord {
            name,
            serial: causeway_api::identity::serial_hex(leaf).unwrap_or_default(),
            issued_at_ms: issued,
            expires_at_ms: expires,
            issued_by: issued_by.to_string(),
        },
    ))
}
