//! Admin credentials (issue, list, revoke) and credential renewal for
//! sites and admins. Each credential the controllers sign is recorded in
//! Raft by the SHA-256 of its certificate; from the first recorded admin
//! credential on, an admin credential counts only if it is recorded.

use std::time::Duration;

use causeway_api::identity::{controller_trust_domain, fingerprint, parse_certs_pem};
use causeway_api::model::SpiffeId;
use causeway_api::pb;
use tonic::{Request, Response, Status};

use super::authz::{require_admin, require_site_or_admin, Caller};
use super::propose::outcome_status;
use super::validate::invalid;
use super::{admin_record_of, Shared};
use crate::state::{admin_name_problem, Command};

/// The caller's client certificate (DER).
fn caller_cert<T>(req: &Request<T>) -> Option<tonic::transport::CertificateDer<'static>> {
    req.peer_certs().and_then(|c| c.first().cloned())
}

/// Signs `csr_pem` for `id` for `lifetime`: the certificate (PEM), its
/// SHA-256 and when it expires (ms since the epoch).
fn sign(
    shared: &Shared,
    csr_pem: &str,
    id: &SpiffeId,
    lifetime: Duration,
) -> Result<(String, String, u64), Status> {
    let cert_pem = shared
        .ca
        .sign_csr(csr_pem, id, lifetime)
        .map_err(|e| invalid("csr_pem", e))?;
    let der = parse_certs_pem("issued certificate", &cert_pem)
        .map_err(|e| Status::internal(e.to_string()))?;
    let expires = causeway_api::identity::validity_ms(&der[0])
        .map(|(_, to)| to)
        .unwrap_or_default();
    Ok((cert_pem.clone(), fingerprint(&der[0]), expires))
}

/// Signs and records an admin credential `name` for `csr_pem`, issued by
/// `by` (an admin's name).
async fn issue_admin_credential(
    shared: &Shared,
    name: &str,
    csr_pem: &str,
    lifetime: Duration,
    by: &str,
    by_cert: Option<tonic::transport::CertificateDer<'static>>,
) -> Result<(String, String, u64), Status> {
    let id = SpiffeId::new(controller_trust_domain(), &format!("/admin/{name}"))
        .map_err(|e| invalid("name", e))?;
    let (cert_pem, sha256, expires) = sign(shared, csr_pem, &id, lifetime)?;
    let (_, record) = admin_record_of(&cert_pem, by).map_err(Status::internal)?;
    let now_ms = causeway_api::clock::unix_ms();
    // The first credential issued through the controllers ends the
    // bootstrap, when any CA-signed admin credential counted: the issuer's
    // own is recorded with it, so issuing does not lock the issuer out.
    let mut cmds = Vec::new();
    if shared.hub.read(|s| s.admins.is_empty()) {
        if let Some(Ok((own, record))) = by_cert
            .as_ref()
            .map(|c| super::admin_record_of_der(c, "bootstrap (recorded when it first issued one)"))
        {
            cmds.push(Command::RecordAdmin {
                sha256: own,
                record,
                bootstrap: true,
                now_ms,
            });
        }
    }
    cmds.push(Command::RecordAdmin {
        sha256: sha256.clone(),
        record,
        bootstrap: false,
        now_ms,
    });
    let mut revision = 0;
    for cmd in cmds {
        revision = outcome_status(shared.propose(cmd).await?)?;
    }
    tracing::info!(%name, by, %sha256, revision, "admin credential issued");
    Ok((cert_pem, sha256, expires))
}

pub(super) async fn issue_admin(
    shared: &Shared,
    req: Request<pb::IssueAdminRequest>,
) -> Result<Response<pb::IssueAdminResponse>, Status> {
    let Caller::Admin(by) = require_admin("IssueAdmin", &req)? else {
        unreachable!("require_admin returns an admin")
    };
    let by_cert = caller_cert(&req);
    let r = req.into_inner();
    if let Some(why) = admin_name_problem(&r.name) {
        return Err(invalid("name", why));
    }
    let max = shared.credentials.admin;
    let lifetime = match r.lifetime_secs {
        0 => max,
        s if Duration::from_secs(s) > max => {
            return Err(invalid(
                "lifetime_secs",
                format!(
                    "at most {} (admin_credential_lifetime_secs of the controllers)",
                    max.as_secs()
                ),
            ))
        }
        s if s < 10 => return Err(invalid("lifetime_secs", "at least 10")),
        s => Duration::from_secs(s),
    };
    let (cert_pem, sha256, expires) =
        issue_admin_credential(shared, &r.name, &r.csr_pem, lifetime, &by, by_cert).await?;
    Ok(Response::new(pb::IssueAdminResponse {
        cert_pem,
        sha256,
        expires_at_unix_ms: expires,
        controller_ca_pem: shared.ca.cert_pem.clone(),
    }))
}

pub(super) async fn list_admins(
    shared: &Shared,
    req: Request<pb::ListAdminsRequest>,
) -> Result<Response<pb::ListAdminsResponse>, Status> {
    require_admin("ListAdmins", &req)?;
    let now = causeway_api::clock::unix_ms();
    let (admins, bootstrap) = shared.hub.read(|s| {
        let list = s
            .admins
            .iter()
            .map(|(sha, a)| pb::AdminCredential {
                name: a.name.clone(),
                sha256: sha.clone(),
                serial: a.serial.clone(),
                issued_at_unix_ms: a.issued_at_ms,
                expires_at_unix_ms: a.expires_at_ms,
                issued_by: a.issued_by.clone(),
                state: if s.revoked.contains(sha) {
                    "revoked"
                } else if a.expires_at_ms <= now {
                    "expired"
                } else {
                    "active"
                }
                .into(),
            })
            .collect();
        (list, s.admins.is_empty())
    });
    Ok(Response::new(pb::ListAdminsResponse { admins, bootstrap }))
}

pub(super) async fn revoke_admin(
    shared: &Shared,
    req: Request<pb::RevokeAdminRequest>,
) -> Result<Response<pb::RevokeAdminResponse>, Status> {
    let who = require_admin("RevokeAdmin", &req)?;
    let r = req.into_inner();
    if let Some(why) = admin_name_problem(&r.name) {
        return Err(invalid("name", why));
    }
    let revision = outcome_status(
        shared
            .propose(Command::RevokeAdmin {
                name: r.name.clone(),
                now_ms: causeway_api::clock::unix_ms(),
            })
            .await?,
    )?;
    tracing::info!(name = %r.name, caller = ?who, "admin credentials revoked");
    Ok(Response::new(pb::RevokeAdminResponse { revision }))
}

pub(super) async fn renew_credential(
    shared: &Shared,
    req: Request<pb::RenewCredentialRequest>,
) -> Result<Response<pb::RenewCredentialResponse>, Status> {
    let who = require_site_or_admin("RenewCredential", &req, &shared.hub).await?;
    let own_cert = caller_cert(&req);
    let r = req.into_inner();
    let (cert_pem, expires) = match &who {
        Caller::Site(site) => {
            let id = SpiffeId::new(controller_trust_domain(), &format!("/site/{site}"))
                .map_err(|e| Status::internal(e.to_string()))?;
            let (cert_pem, sha256, expires) =
                sign(shared, &r.csr_pem, &id, shared.credentials.site)?;
            outcome_status(
                shared
                    .propose(Command::RenewSiteCredential {
                        site: site.clone(),
                        sha256,
                        expires_at_ms: expires,
                        now_ms: causeway_api::clock::unix_ms(),
                    })
                    .await?,
            )?;
            tracing::info!(%site, "site credential renewed");
            (cert_pem, expires)
        }
        Caller::Admin(name) => {
            let (cert_pem, _, expires) = issue_admin_credential(
                shared,
                name,
                &r.csr_pem,
                shared.credentials.admin,
                name,
                own_cert,
            )
            .await?;
            (cert_pem, expires)
        }
        other => unreachable!("require_site_or_admin let {other:?} through"),
    };
    Ok(Response::new(pb::RenewCredentialResponse {
        cert_pem,
        expires_at_unix_ms: expires,
    }))
}
