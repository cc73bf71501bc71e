//! The `Federation` service: joins, tokens, sites, policies, exports,
//! catalog reads and watches, heartbeats, status and controller membership.
//!
//! Trust boundary: `Join` is the one RPC open without a client certificate
//! (the join token authorizes it); every other RPC first checks the caller
//! with [`super::authz`], and a site may act only for itself.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use causeway_api::identity::{controller_trust_domain, SITE_TRUST_DOMAIN_SUFFIX};
use causeway_api::model::{check_dns_label, SiteName, SpiffeId};
use causeway_api::pb::{self, federation_server::Federation};
use causeway_api::token::{hash_secret, JoinToken, TokenError};
use futures::Stream;
use tonic::{Request, Response, Status};

use super::authz::{caller, denied, require_admin, require_site_or_admin, Caller};
use super::propose::{outcome_status, MembershipOp};
use super::validate::{
    invalid, parse_bundle, parse_exports, parse_labels, parse_policy_documents, parse_tunnel_addrs,
};
use super::watch::{serve_watch, WATCH_QUEUE};
use super::Shared;
use crate::state::Command;
use causeway_api::sync::LockExt;

const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 86400);
/// How often an open Watch checks that its credential still counts.
const CREDENTIAL_CHECK: Duration = Duration::from_secs(2);

/// The `Federation` gRPC service. Trust boundary: anyone may call `Join`
/// (the one-time token is the credential); admins may call everything;
/// a member site may publish, heartbeat and update the bundle for itself
/// only and read the catalog, policies and status; controller nodes may
/// read status. See the table in [`super`].
pub struct FederationService {
    /// What every service of this node shares.
    pub shared: Arc<Shared>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;
type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::SnapshotChunk, Status>> + Send>>;

/// Bytes per `SnapshotChunk`.
const SNAPSHOT_CHUNK: usize = 1 << 20;

#[tonic::async_trait]
impl Federation for FederationService {
    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        // Anonymous: a source that failed too often waits, and a token is
        // checked against the state locally, so a bad one costs no Raft
        // entry.
        let source = req.remote_addr().map(|a| a.ip());
        let now = std::time::Instant::now();
        if let Some(ip) = source {
            if let Err(wait) = self.shared.joins.check(ip, now) {
                metrics::counter!("causeway_controller_joins_refused_total", "why" => "rate")
                    .increment(1);
                return Err(Status::resource_exhausted(format!(
                    "too many failed joins from {ip}; try again in {} s",
                    wait.as_secs().max(1)
                )));
            }
        }
        let failed = |why: &'static str| {
            metrics::counter!("causeway_controller_joins_refused_total", "why" => why).increment(1);
            if let Some(ip) = source {
                self.shared.joins.failed(ip, now);
            }
        };
        let r = req.into_inner();
        let token = JoinToken::decode(&r.token).map_err(|e: TokenError| {
            failed("malformed");
            invalid("token", e)
        })?;
        let site = token.site.clone();
        let secret_sha256 = hash_secret(&token.secret);
        let checked = self.shared.hub.read(|s| {
            s.check_join_token(
                &token.id,
                &secret_sha256,
                &site,
                causeway_api::clock::unix_ms(),
            )
        });
        if let Err((code, message)) = checked {
            failed("token");
            outcome_status(crate::state::Outcome::Rejected { code, message })?;
        }
        parse_bundle(&r.trust_bundle_pem)?;
        let tunnel_addrs = parse_tunnel_addrs(&r.tunnel_addrs)?;
        let trust_domain = site.trust_domain(SITE_TRUST_DOMAIN_SUFFIX);
        let api_id = SpiffeId::new(controller_trust_domain(), &format!("/site/{site}"))
            .map_err(|e| Status::internal(e.to_string()))?;
        // Sign first: a bad CSR must not burn the token.
        let api_cert_pem = self
            .shared
            .ca
            .sign_csr(&r.csr_pem, &api_id, self.shared.credentials.site)
            .map_err(|e| invalid("csr_pem", e))?;
        // The credential is bound to the site: only this certificate acts
        // for it from now on (a re-invited name gets another one).
        let credential_sha256 =
            causeway_api::identity::parse_certs_pem("api_cert_pem", &api_cert_pem)
                .ok()
                .and_then(|c| c.first().map(causeway_api::identity::fingerprint));
        let outcome = self
            .shared
            .propose(Command::JoinSite {
                credential_sha256,
                token_id: token.id.clone(),
                secret_sha256,
                now_ms: causeway_api::clock::unix_ms(),
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
        if let Some(why) = causeway_api::identity::reserved_site_name(&site) {
            return Err(invalid("site", why));
        }
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
        let now = causeway_api::clock::unix_ms();
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
        // An operator, or a member site's agent forwarding the site's
        // policy objects: a site may create policies and change or delete
        // only those it manages (the state machine checks).
        let by = site_of(require_site_or_admin("ApplyPolicies", &req, &self.shared.hub).await?);
        let pb::ApplyPoliciesRequest {
            documents_json: docs,
            if_revisions,
        } = req.into_inner();
        if !if_revisions.is_empty() && if_revisions.len() != docs.len() {
            return Err(Status::invalid_argument(format!(
                "if_revisions: {} entries for {} documents; send one per document (0: no condition) or none",
                if_revisions.len(),
                docs.len()
            )));
        }
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
                .propose(Command::ApplyPolicies {
                    policies,
                    by,
                    if_revisions,
                })
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
        let by = site_of(require_site_or_admin("DeletePolicy", &req, &self.shared.hub).await?);
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
                    by,
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
                    now_ms: causeway_api::clock::unix_ms(),
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
    type SaveSnapshotStream = SnapshotStream;

    async fn save_snapshot(
        &self,
        req: Request<pb::SaveSnapshotRequest>,
    ) -> Result<Response<SnapshotStream>, Status> {
        require_admin("SaveSnapshot", &req)?;
        // Every write acknowledged before this call is in the state read.
        self.shared.linearizable_barrier().await?;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let node = self.shared.node_id;
        let file = self
            .shared
            .hub
            .read(|s| crate::backup::encode(s, node, now_ms))
            .map_err(|e| Status::internal(format!("encoding the snapshot: {e:#}")))?;
        metrics::counter!("causeway_snapshots_saved_total").increment(1);
        let chunks: Vec<Result<pb::SnapshotChunk, Status>> = file
            .chunks(SNAPSHOT_CHUNK)
            .map(|c| Ok(pb::SnapshotChunk { data: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let who = require_site_or_admin("Watch", &req, &self.shared.hub).await?;
        let site = match &who {
            Caller::Site(s) => Some(s.clone()),
            _ => None,
        };
        let leaf = req.peer_certs().and_then(|c| c.first().cloned());
        let sha256 = leaf
            .as_ref()
            .map(causeway_api::identity::fingerprint)
            .unwrap_or_default();
        let expires_ms = leaf
            .as_ref()
            .and_then(causeway_api::identity::validity_ms)
            .map_or(u64::MAX, |(_, to)| to);
        let pb::WatchRequest {
            from_revision,
            epoch,
        } = req.into_inner();
        // A client holding another cluster's catalog (this one was restored
        // from a backup since) starts over from a snapshot.
        let from = if epoch == self.shared.hub.read(|s| s.epoch) {
            from_revision
        } else {
            0
        };
        let hub = self.shared.hub.clone();
        let stall = self.shared.watch_stall;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::WatchEvent, Status>>(WATCH_QUEUE);
        let guard_tx = tx.clone();
        let serving = tokio::spawn({
            let hub = hub.clone();
            async move {
                metrics::gauge!("causeway_watchers").increment(1.0);
                serve_watch(hub, from, tx, stall, site).await;
                metrics::gauge!("causeway_watchers").decrement(1.0);
            }
        });
        // A credential revoked (or replaced) while it watches: the stream
        // ends within a check interval.
        tokio::spawn(async move {
            let mut every = tokio::time::interval(CREDENTIAL_CHECK);
            loop {
                every.tick().await;
                if serving.is_finished() {
                    return;
                }
                let ok = expires_ms > causeway_api::clock::unix_ms()
                    && hub.read(|st| super::authz::credential_ok_in(st, &who, &sha256));
                if !ok {
                    tracing::info!(caller = ?who, "credential revoked; ending its watch");
                    let _ = guard_tx.try_send(Err(Status::permission_denied(
                        "Watch needs a current credential: this one was revoked, replaced or has expired",
                    )));
                    serving.abort();
                    metrics::gauge!("causeway_watchers").decrement(1.0);
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn issue_admin(
        &self,
        req: Request<pb::IssueAdminRequest>,
    ) -> Result<Response<pb::IssueAdminResponse>, Status> {
        super::credentials::issue_admin(&self.shared, req).await
    }

    async fn list_admins(
        &self,
        req: Request<pb::ListAdminsRequest>,
    ) -> Result<Response<pb::ListAdminsResponse>, Status> {
        super::credentials::list_admins(&self.shared, req).await
    }

    async fn revoke_admin(
        &self,
        req: Request<pb::RevokeAdminRequest>,
    ) -> Result<Response<pb::RevokeAdminResponse>, Status> {
        super::credentials::revoke_admin(&self.shared, req).await
    }

    async fn renew_credential(
        &self,
        req: Request<pb::RenewCredentialRequest>,
    ) -> Result<Response<pb::RenewCredentialResponse>, Status> {
        super::credentials::renew_credential(&self.shared, req).await
    }

    async fn revoke_certificate(
        &self,
        req: Request<pb::RevokeCertificateRequest>,
    ) -> Result<Response<pb::RevokeCertificateResponse>, Status> {
        let who = require_site_or_admin("RevokeCertificate", &req, &self.shared.hub).await?;
        let r = req.into_inner();
        let site: SiteName = r.site.parse().map_err(|e| invalid("site", e))?;
        if let Caller::Site(own) = &who {
            if *own != site {
                return Err(denied(
                    "RevokeCertificate",
                    &who,
                    &format!("the credential of site {site} or an admin credential; site {own} may only revoke its own certificates"),
                ));
            }
        }
        let serial = if !r.cert_pem.is_empty() {
            let certs = causeway_api::identity::parse_certs_pem("cert_pem", &r.cert_pem)
                .map_err(|e| invalid("cert_pem", e))?;
            causeway_api::identity::serial_hex(&certs[0])
                .ok_or_else(|| invalid("cert_pem", "not an X.509 certificate"))?
        } else {
            causeway_api::identity::parse_serial(&r.serial).ok_or_else(|| {
                invalid(
                    "serial",
                    "a certificate serial number in hex (or give cert_pem)",
                )
            })?
        };
        let revision = outcome_status(
            self.shared
                .propose(Command::RevokeCertificate {
                    site: site.clone(),
                    serial: serial.clone(),
                })
                .await?,
        )?;
        tracing::info!(%site, %serial, caller = ?who, "certificate revoked");
        Ok(Response::new(pb::RevokeCertificateResponse {
            revision,
            serial,
        }))
    }

    async fn revoke_credential(
        &self,
        req: Request<pb::RevokeCredentialRequest>,
    ) -> Result<Response<pb::RevokeCredentialResponse>, Status> {
        require_admin("RevokeCredential", &req)?;
        let r = req.into_inner();
        let sha256 = if !r.cert_pem.is_empty() {
            let certs = causeway_api::identity::parse_certs_pem("cert_pem", &r.cert_pem)
                .map_err(|e| invalid("cert_pem", e))?;
            causeway_api::identity::fingerprint(&certs[0])
        } else {
            r.sha256.to_ascii_lowercase()
        };
        let revision = outcome_status(
            self.shared
                .propose(Command::RevokeCredential {
                    sha256: sha256.clone(),
                })
                .await?,
        )?;
        tracing::info!(%sha256, "credential revoked");
        Ok(Response::new(pb::RevokeCredentialResponse {
            revision,
            sha256,
        }))
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
        let lease_ms = self.shared.leases.locked().config().lease.as_millis() as u64;
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

/// The site a caller acts for: `None` for an operator (who may change any
/// policy).
fn site_of(c: Caller) -> Option<SiteName> {
    match c {
        Caller::Site(s) => Some(s),
        _ => None,
    }
}
