//! Who is calling, from the client certificate, and what each kind of
//! caller may do. This is the trust boundary of every RPC: the services
//! call one of the `require_*` checks before they read the request.

use std::time::Duration;

use causeway_api::identity::{controller_trust_domain, spiffe_id_of};
use causeway_api::model::{SiteName, SpiffeId};
use tonic::{Request, Status};

use crate::hub::Hub;
use crate::NodeId;

/// Who is calling, from the client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No client certificate.
    Anonymous,
    /// A controller node.
    Node(NodeId),
    /// An operator with an admin credential.
    Admin(String),
    /// A member site's gateway, DNS server or agent.
    Site(SiteName),
    /// A certificate from the controller CA whose role we do not know.
    Other(SpiffeId),
}

/// Who is calling, from the request's client certificate.
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

/// The role a controller-domain SPIFFE ID names.
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

pub(super) fn denied(rpc: &str, who: &Caller, need: &str) -> Status {
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

pub(super) fn require_admin<T>(rpc: &str, req: &Request<T>) -> Result<Caller, Status> {
    match caller(req) {
        c @ Caller::Admin(_) => Ok(c),
        c => Err(denied(rpc, &c, "an admin credential")),
    }
}

/// How long a node waits for its own state to show a site as a member
/// before refusing the site's credential: a follower can be a moment behind
/// the join that issued the credential.
const MEMBERSHIP_CATCH_UP: Duration = Duration::from_secs(2);

pub(super) async fn require_site_or_admin<T>(
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
    holds_soon(hub, |st| st.sites.contains_key(site)).await
}

/// Whether a certificate (its SHA-256) may act as `caller` in `st`: not
/// revoked; for a site one issued to it while it is a member; for an admin
/// one recorded and unexpired (or none recorded yet).
pub fn credential_ok_in(st: &crate::state::CatalogState, caller: &Caller, sha256: &str) -> bool {
    match caller {
        Caller::Site(s) => st.site_credential_ok(s, sha256),
        Caller::Admin(_) => st.admin_credential_ok(sha256),
        Caller::Anonymous => true,
        _ => !st.revoked.contains(sha256),
    }
}

/// [`credential_ok_in`] on this node's state now, or — for sites and
/// admins — once this node has applied the changes arriving within
/// [`MEMBERSHIP_CATCH_UP`] (a follower may be a moment behind the join or
/// issue that made the credential).
pub async fn credential_ok(hub: &Hub, caller: &Caller, sha256: &str) -> bool {
    match caller {
        Caller::Site(_) | Caller::Admin(_) => {
            holds_soon(hub, |st| credential_ok_in(st, caller, sha256)).await
        }
        _ => hub.read(|st| credential_ok_in(st, caller, sha256)),
    }
}

/// Whether `check` holds on this node's state now or within
/// [`MEMBERSHIP_CATCH_UP`].
async fn holds_soon(hub: &Hub, check: impl Fn(&crate::state::CatalogState) -> bool) -> bool {
    // Subscribed before the first look, so no change falls in between.
    let mut changes = hub.subscribe();
    let member = || hub.read(|st| check(st));
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

pub(super) fn require_node<T>(rpc: &str, req: &Request<T>) -> Result<NodeId, Status> {
    match caller(req) {
        Caller::Node(n) => Ok(n),
        c => Err(denied(rpc, &c, "a controller node credential")),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::Command;

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
                credential_sha256: None,
            });
        });
        assert!(is_member_soon(&hub, &site).await);
        assert!(!is_member_soon(&hub, &"beta".parse().unwrap()).await);
    }
}
