//! The replicated catalog: what every Raft log entry does to it.
//!
//! `CatalogState::apply` is deterministic: all time it needs comes inside
//! the command (the leader's clock when the command was proposed), so every
//! node computes the same result. Each change that alters the catalog bumps
//! the revision by one and yields the `Change`s a watcher needs.

use std::collections::{BTreeMap, BTreeSet};

use causeway_api::model::{Protocol, ServiceKey, SiteName, TrustDomain};
use causeway_api::pb;
use serde::{Deserialize, Serialize};

/// Most services one site may export.
pub const MAX_EXPORTS_PER_SITE: usize = 1000;
/// Most ports one export may list.
pub const MAX_PORTS_PER_EXPORT: usize = causeway_api::model::MAX_PORTS_PER_SERVICE;
/// Ready endpoints a headless export may publish.
pub const MAX_ENDPOINTS_PER_EXPORT: usize = 256;
/// Most zones one export may report health for.
pub const MAX_ZONES_PER_EXPORT: usize = 64;
/// Most labels on a site.
pub const MAX_LABELS: usize = 64;
/// Most tunnel addresses a site may register.
pub const MAX_TUNNEL_ADDRS: usize = 16;
/// Largest trust bundle accepted (PEM bytes).
pub const MAX_BUNDLE_BYTES: usize = causeway_api::identity::MAX_TRUST_BUNDLE_BYTES;
/// How long used and expired tokens are remembered, so that a reused token
/// gets "already used" rather than "unknown".
const TOKEN_MEMORY_MS: u64 = 24 * 3600 * 1000;

/// A member site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRecord {
    /// Its name.
    pub name: SiteName,
    /// Its labels (region, zone, ...), from its join token or set later.
    pub labels: BTreeMap<String, String>,
    /// Its SPIFFE trust domain.
    pub trust_domain: TrustDomain,
    /// Its CA certificates, PEM: the roots its gateways chain to.
    pub trust_bundle_pem: String,
    /// Its gateway replicas' tunnel addresses, canonical.
    pub tunnel_addrs: Vec<String>,
    /// When it joined (proposer's clock), ms since the epoch.
    pub joined_at_ms: u64,
    /// False while the site's lease has lapsed (set by the leader).
    #[serde(default = "yes")]
    pub available: bool,
    /// SHA-256 of the API credential issued to it at join (hex): the only
    /// site credential accepted for it. A removed and re-invited name gets
    /// a new one, so the old credential stays refused. `None` for sites
    /// that joined before credentials were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_sha256: Option<String>,
    /// Serials (hex) of its certificates that are revoked: gateways refuse
    /// them even though they chain to the bundle.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub revoked_serials: BTreeSet<String>,
    /// Credentials issued to it by renewal (SHA-256 hex → when each
    /// expires, ms since the epoch): each is accepted, beside the one from
    /// its join, until it expires. Several replicas renew on their own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub renewed_credentials: BTreeMap<String, u64>,
}

fn yes() -> bool {
    true
}

/// One port of an exported service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRecord {
    /// The port callers use.
    pub port: u16,
    /// How it is forwarded.
    pub protocol: Protocol,
    /// Its name (for SRV records), or empty.
    #[serde(default)]
    pub name: String,
}

/// One service a site exports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRecord {
    /// `<namespace>/<name>`.
    pub service: ServiceKey,
    /// Its ports.
    pub ports: Vec<PortRecord>,
    /// Endpoints passing health checks.
    pub healthy_endpoints: u32,
    /// Filled in by the state machine; ignored in commands.
    #[serde(default)]
    pub vip_index: u32,
    /// Exported headless (no ClusterSetIP).
    #[serde(default)]
    pub headless: bool,
    /// Ready endpoints of a headless export (empty otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<EndpointRecord>,
    /// Endpoints in total, healthy or not.
    #[serde(default)]
    pub total_endpoints: u32,
    /// Healthy and total endpoints per zone ("" = the site's own zone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<ZoneRecord>,
    /// Healthy and total endpoints per subset (version); the `zone` field
    /// of each record holds the subset's name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<ZoneRecord>,
    /// When the site began exporting it, ms since the epoch (0 in a
    /// command: the state machine keeps the first time it saw it).
    #[serde(default)]
    pub exported_at_ms: u64,
    /// Sessions stick to one endpoint per client address.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub client_ip_affinity: bool,
}

/// Healthy and total endpoints in one zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneRecord {
    /// The zone (empty for the site's own), or a subset's name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub zone: String,
    /// Endpoints passing health checks.
    pub healthy: u32,
    /// Endpoints in total.
    pub total: u32,
}

/// A ready endpoint of a headless export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// Its address.
    pub address: std::net::IpAddr,
    /// Its DNS hostname, or empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hostname: String,
}

/// A join token as the controller keeps it (never the secret itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    /// The site it admits.
    pub site: SiteName,
    /// Labels the site gets.
    pub labels: BTreeMap<String, String>,
    /// When it expires, ms since the epoch.
    pub expires_at_ms: u64,
    /// Redeemed already.
    pub used: bool,
}

/// A Raft log entry's application payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Record a join token for a new site.
    CreateJoinToken {
        /// The token's public id.
        token_id: String,
        /// SHA-256 of its secret, hex.
        secret_sha256: String,
        /// The site it admits.
        site: SiteName,
        /// Labels the site gets.
        labels: BTreeMap<String, String>,
        /// When it expires, ms since the epoch.
        expires_at_ms: u64,
        /// The proposer's clock, ms since the epoch.
        now_ms: u64,
    },
    /// Admit a site with a token (marking the token used).
    JoinSite {
        /// The token's public id.
        token_id: String,
        /// SHA-256 of the secret presented.
        secret_sha256: String,
        /// The proposer's clock, ms since the epoch.
        now_ms: u64,
        /// The site joining.
        site: SiteName,
        /// Its trust domain.
        trust_domain: TrustDomain,
        /// Its CA certificates, PEM.
        trust_bundle_pem: String,
        /// Its gateways' tunnel addresses.
        tunnel_addrs: Vec<String>,
        /// SHA-256 of the API credential issued to it (hex).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        credential_sha256: Option<String>,
    },
    /// Record an admin credential the controllers issued (or, with
    /// `bootstrap`, the one `causeway ca init` wrote — only while no admin
    /// credential is recorded).
    RecordAdmin {
        /// SHA-256 of its certificate, hex.
        sha256: String,
        /// What was issued.
        record: AdminRecord,
        /// Only if no admin credential is recorded yet.
        #[serde(default)]
        bootstrap: bool,
        /// The proposer's clock, ms since the epoch (expired records go).
        now_ms: u64,
    },
    /// Revoke every admin credential named `name`.
    RevokeAdmin {
        /// The admin's name.
        name: String,
        /// The proposer's clock, ms since the epoch.
        now_ms: u64,
    },
    /// Accept another credential for a site until it expires (renewal).
    RenewSiteCredential {
        /// The site.
        site: SiteName,
        /// SHA-256 of the new certificate, hex.
        sha256: String,
        /// When it expires, ms since the epoch.
        expires_at_ms: u64,
        /// The proposer's clock, ms since the epoch (expired ones go).
        now_ms: u64,
    },
    /// Refuse one certificate a site's CA issued, by serial.
    RevokeCertificate {
        /// The site.
        site: SiteName,
        /// Its serial, lowercase hex.
        serial: String,
    },
    /// Refuse a credential from now on, on every RPC.
    RevokeCredential {
        /// SHA-256 of its certificate (hex).
        sha256: String,
    },
    /// Replace what a site exports.
    PublishExports {
        /// The site.
        site: SiteName,
        /// Everything it exports now.
        exports: Vec<ExportRecord>,
        /// Its tunnel addresses, if they changed (empty: unchanged).
        tunnel_addrs: Vec<String>,
        /// The proposer's clock, ms since the epoch (0 in older entries).
        #[serde(default)]
        now_ms: u64,
    },
    /// Remove a member site, its bundle and its exports.
    RemoveSite {
        /// The site.
        site: SiteName,
    },
    /// Replace a member site's trust bundle (CA rotation: old and new CA
    /// together first, then the new one alone). Validated by the proposer.
    SetTrustBundle {
        /// The site.
        site: SiteName,
        /// Its new CA certificates, PEM.
        trust_bundle_pem: String,
    },
    /// Replace a member site's labels. Validated by the proposer.
    SetSiteLabels {
        /// The site.
        site: SiteName,
        /// The whole new set.
        labels: BTreeMap<String, String>,
    },
    /// Proposed by the leader when a site's lease lapses or recovers.
    SetSiteAvailability {
        /// The site.
        site: SiteName,
        /// Whether it takes traffic.
        available: bool,
    },
    /// Create or replace policies (validated by the proposer), all or none.
    ApplyPolicies {
        /// The policies, canonical.
        policies: Vec<PolicyRecord>,
        /// The site applying them (its agent), or none (an operator): a
        /// site may only create policies or change its own.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<SiteName>,
        /// Empty, or per policy the revision it must have been last changed
        /// at (0: no condition); see `ApplyPoliciesRequest.if_revisions`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        if_revisions: Vec<u64>,
    },
    /// Delete one policy.
    DeletePolicy {
        /// Its kind.
        kind: String,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The site deleting it, or none (an operator): a site may only
        /// delete its own.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<SiteName>,
    },
    /// Several commands in one log entry (group commit at the proposer);
    /// applied in order, each with its own revision.
    Batch(Vec<Command>),
}

/// Why the state machine refused a command (mapped to a gRPC code in
/// one place, `service::outcome_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectCode {
    /// No token with that id and secret.
    TokenUnknown,
    /// The token was redeemed already.
    TokenUsed,
    /// The token expired.
    TokenExpired,
    /// The token is for another site.
    TokenWrongSite,
    /// The site (or its trust domain) is a member already.
    SiteExists,
    /// No such member site.
    SiteUnknown,
    /// The command breaks a rule.
    Invalid,
    /// The command would pass a limit.
    LimitExceeded,
    /// No such policy.
    NotFound,
    /// The caller may not change this (another site's or an operator's).
    Forbidden,
    /// A write's condition (the revision it expected) does not hold.
    Conflict,
}

/// The result of applying one entry, returned to the proposer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Applied; watchers see the change.
    Applied {
        /// The revision it made.
        revision: u64,
    },
    /// Applied, but nothing watchers see changed.
    Unchanged {
        /// The current revision.
        revision: u64,
    },
    /// Refused; nothing changed.
    Rejected {
        /// Why, for the gRPC code.
        code: RejectCode,
        /// Why, for the caller.
        message: String,
    },
    /// One outcome per command of a `Command::Batch`.
    Batch(Vec<Outcome>),
}

/// A refused command: its outcome, and no change for watchers.
fn refused(code: RejectCode, message: impl Into<String>) -> (Outcome, Vec<pb::Change>) {
    (reject(code, message), vec![])
}

fn reject(code: RejectCode, message: impl Into<String>) -> Outcome {
    Outcome::Rejected {
        code,
        message: message.into(),
    }
}

/// The replicated catalog: members, exports, VIP indexes, tokens and
/// policies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogState {
    /// Bumped by every change watchers see.
    pub revision: u64,
    /// 0 for a cluster as first built; a cluster restored from a backup
    /// gets a new one ([`crate::backup::restore`]), so watchers that
    /// resume from the old cluster's revisions start over from a snapshot.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
    /// Member sites.
    pub sites: BTreeMap<SiteName, SiteRecord>,
    /// What each site exports.
    pub exports: BTreeMap<SiteName, Vec<ExportRecord>>,
    /// Each service's VIP index (stable while it is exported anywhere).
    pub vips: BTreeMap<ServiceKey, u32>,
    /// The next VIP index to hand out.
    pub next_vip: u32,
    /// Join tokens by public id (expired ones are forgotten).
    pub tokens: BTreeMap<String, TokenRecord>,
    /// Traffic policies by `Kind/namespace/name`.
    #[serde(default)]
    pub policies: BTreeMap<String, PolicyRecord>,
    /// Revoked credentials (SHA-256 of the certificate, hex), refused on
    /// every RPC whatever their name.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub revoked: BTreeSet<String>,
    /// Admin credentials by the SHA-256 of their certificate (hex). While
    /// empty, any admin credential the controller CA signed is accepted
    /// (a new cluster, before the first is recorded); after that only
    /// these, unexpired and not revoked.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub admins: BTreeMap<String, AdminRecord>,
}

/// For `skip_serializing_if`.
fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// An admin credential as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminRecord {
    /// The admin's name (its SPIFFE ID ends in `/admin/<name>`).
    pub name: String,
    /// Its certificate's serial, hex.
    pub serial: String,
    /// When it was issued, ms since the epoch.
    pub issued_at_ms: u64,
    /// When it expires, ms since the epoch.
    pub expires_at_ms: u64,
    /// Who issued it: an admin's name, or `ca init`.
    pub issued_by: String,
}

/// Most admin credentials recorded.
pub const MAX_ADMINS: usize = 1_000;

/// Most renewed credentials a site holds at once.
pub const MAX_SITE_CREDENTIALS: usize = 64;

impl Command {
    /// The command's name, for spans and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::CreateJoinToken { .. } => "CreateJoinToken",
            Command::JoinSite { .. } => "JoinSite",
            Command::RecordAdmin { .. } => "RecordAdmin",
            Command::RevokeAdmin { .. } => "RevokeAdmin",
            Command::RenewSiteCredential { .. } => "RenewSiteCredential",
            Command::RevokeCertificate { .. } => "RevokeCertificate",
            Command::RevokeCredential { .. } => "RevokeCredential",
            Command::PublishExports { .. } => "PublishExports",
            Command::RemoveSite { .. } => "RemoveSite",
            Command::SetTrustBundle { .. } => "SetTrustBundle",
            Command::SetSiteLabels { .. } => "SetSiteLabels",
            Command::SetSiteAvailability { .. } => "SetSiteAvailability",
            Command::ApplyPolicies { .. } => "ApplyPolicies",
            Command::DeletePolicy { .. } => "DeletePolicy",
            Command::Batch(_) => "Batch",
        }
    }
}

/// Most revoked certificate serials remembered per site.
pub const MAX_REVOKED_SERIALS: usize = 1_000;

/// Most revoked credentials remembered.
pub const MAX_REVOKED: usize = 10_000;

impl CatalogState {
    /// Whether a credential (its certificate's SHA-256) may act for `site`:
    /// the site is a member, the credential is the one issued to it (when
    /// one was recorded), and it is not revoked.
    pub fn site_credential_ok(&self, site: &SiteName, sha256: &str) -> bool {
        let now = causeway_api::clock::unix_ms();
        let same = |c: &str| causeway_api::token::constant_time_eq(c.as_bytes(), sha256.as_bytes());
        !self.revoked.contains(sha256)
            && self.sites.get(site).is_some_and(|s| {
                s.credential_sha256.as_deref().is_none_or(same)
                    || s.renewed_credentials
                        .iter()
                        .any(|(c, expires)| *expires > now && same(c))
            })
    }

    /// Whether an admin credential (its certificate's SHA-256) is accepted:
    /// not revoked, and recorded and unexpired — or no admin credential is
    /// recorded yet.
    pub fn admin_credential_ok(&self, sha256: &str) -> bool {
        if self.revoked.contains(sha256) {
            return false;
        }
        if self.admins.is_empty() {
            return true;
        }
        let now = causeway_api::clock::unix_ms();
        self.admins
            .get(sha256)
            .is_some_and(|a| a.expires_at_ms > now)
    }
}

/// A traffic policy as stored: its canonical document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// Its kind, e.g. `FailoverPolicy`.
    pub kind: String,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The canonical document.
    pub document_json: String,
    /// Filled in by the state machine: the revision that last changed it.
    #[serde(default)]
    pub revision: u64,
    /// Filled in by the state machine: the site that manages it, or none
    /// (an operator's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<SiteName>,
}

impl PolicyRecord {
    /// `Kind/namespace/name`.
    pub fn key(&self) -> String {
        causeway_api::catalog::policy_key(&self.kind, &self.namespace, &self.name)
    }

    /// As the API sends it.
    pub fn to_pb(&self) -> pb::Policy {
        pb::Policy {
            kind: self.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            document_json: self.document_json.clone(),
            revision: self.revision,
            owner_site: self
                .owner
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
        }
    }
}

impl CatalogState {
    /// Applies a command; returns the outcome and the changes watchers see
    /// (empty unless the revision was bumped).
    pub fn apply(&mut self, cmd: Command) -> (Outcome, Vec<pb::Change>) {
        match cmd {
            Command::CreateJoinToken {
                token_id,
                secret_sha256,
                site,
                labels,
                expires_at_ms,
                now_ms,
            } => self.create_join_token(
                token_id,
                TokenRecord {
                    secret_sha256,
                    site,
                    labels,
                    expires_at_ms,
                    used: false,
                },
                now_ms,
            ),
            Command::JoinSite {
                token_id,
                secret_sha256,
                now_ms,
                site,
                trust_domain,
                trust_bundle_pem,
                tunnel_addrs,
                credential_sha256,
            } => self.join_site(
                &token_id,
                &secret_sha256,
                SiteRecord {
                    name: site,
                    labels: BTreeMap::new(),
                    trust_domain,
                    trust_bundle_pem,
                    tunnel_addrs,
                    joined_at_ms: now_ms,
                    available: true,
                    credential_sha256,
                    revoked_serials: BTreeSet::new(),
                    renewed_credentials: BTreeMap::new(),
                },
            ),
            Command::RevokeCredential { sha256 } => {
                if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return refused(
                        RejectCode::Invalid,
                        "sha256: 64 hex digits of a certificate's SHA-256",
                    );
                }
                if self.revoked.len() >= MAX_REVOKED {
                    return refused(
                        RejectCode::LimitExceeded,
                        format!("at most {MAX_REVOKED} revoked credentials"),
                    );
                }
                let sha256 = sha256.to_ascii_lowercase();
                if !self.revoked.insert(sha256) {
                    return (
                        Outcome::Unchanged {
                            revision: self.revision,
                        },
                        vec![],
                    );
                }
                // Not a catalog change watchers see; the revision still
                // moves so the write is ordered with the rest.
                self.revision += 1;
                (
                    Outcome::Applied {
                        revision: self.revision,
                    },
                    vec![],
                )
            }
            Command::PublishExports {
                site,
                exports,
                tunnel_addrs,
                now_ms,
            } => self.publish_exports(site, exports, tunnel_addrs, now_ms),
            Command::SetTrustBundle {
                site,
                trust_bundle_pem,
            } => {
                if trust_bundle_pem.is_empty() || trust_bundle_pem.len() > MAX_BUNDLE_BYTES {
                    return refused(
                        RejectCode::LimitExceeded,
                        format!("a trust bundle must hold 1 to {MAX_BUNDLE_BYTES} bytes"),
                    );
                }
                self.update_site(&site, |rec| {
                    let changed = rec.trust_bundle_pem != trust_bundle_pem;
                    rec.trust_bundle_pem = trust_bundle_pem;
                    changed
                })
            }
            Command::SetSiteLabels { site, labels } => {
                if labels.len() > MAX_LABELS {
                    return refused(
                        RejectCode::LimitExceeded,
                        format!("at most {MAX_LABELS} labels"),
                    );
                }
                self.update_site(&site, |rec| {
                    let changed = rec.labels != labels;
                    rec.labels = labels;
                    changed
                })
            }
            Command::RecordAdmin {
                sha256,
                record,
                bootstrap,
                now_ms,
            } => self.record_admin(sha256, record, bootstrap, now_ms),
            Command::RevokeAdmin { name, now_ms } => self.revoke_admin(&name, now_ms),
            Command::RenewSiteCredential {
                site,
                sha256,
                expires_at_ms,
                now_ms,
            } => {
                let Some(rec) = self.sites.get_mut(&site) else {
                    return refused(
                        RejectCode::SiteUnknown,
                        format!("site {site:?} is not a member"),
                    );
                };
                rec.renewed_credentials.retain(|_, e| *e > now_ms);
                if rec.renewed_credentials.len() >= MAX_SITE_CREDENTIALS {
                    return refused(
                        RejectCode::LimitExceeded,
                        format!("site {site} holds {MAX_SITE_CREDENTIALS} live renewed credentials; renew less often (a longer credential lifetime)"),
                    );
                }
                rec.renewed_credentials.insert(sha256, expires_at_ms);
                self.revision += 1;
                (
                    Outcome::Applied {
                        revision: self.revision,
                    },
                    vec![],
                )
            }
            Command::RevokeCertificate { site, serial } => {
                let Some(serial) = causeway_api::identity::parse_serial(&serial) else {
                    return refused(
                        RejectCode::Invalid,
                        "serial: a certificate serial number in hex (at most 20 octets)",
                    );
                };
                let full = self
                    .sites
                    .get(&site)
                    .is_some_and(|r| r.revoked_serials.len() >= MAX_REVOKED_SERIALS);
                if full {
                    return refused(
                        RejectCode::LimitExceeded,
                        format!("at most {MAX_REVOKED_SERIALS} revoked certificates per site; rotate the site's CA instead (causeway rotate)"),
                    );
                }
                self.update_site(&site, |rec| rec.revoked_serials.insert(serial))
            }
            Command::SetSiteAvailability { site, available } => self.update_site(&site, |rec| {
                let changed = rec.available != available;
                rec.available = available;
                changed
            }),
            Command::Batch(_) => refused(
                RejectCode::Invalid,
                "a batch is applied by the hub, one command at a time",
            ),
            Command::ApplyPolicies {
                policies,
                by,
                if_revisions,
            } => self.apply_policies(policies, by, &if_revisions),
            Command::DeletePolicy {
                kind,
                namespace,
                name,
                by,
            } => {
                let key = causeway_api::catalog::policy_key(&kind, &namespace, &name);
                let Some(old) = self.policies.get(&key) else {
                    return refused(
                        RejectCode::NotFound,
                        format!("no {kind} {namespace}/{name}"),
                    );
                };
                if let Some(site) = &by {
                    if old.owner.as_ref() != Some(site) {
                        return refused(RejectCode::Forbidden, not_yours(&old.owner, site, &key));
                    }
                }
                self.policies.remove(&key);
                self.bump(vec![pb::change::Kind::PolicyRemoved(pb::PolicyRef {
                    kind,
                    namespace,
                    name,
                })])
            }
            Command::RemoveSite { site } => {
                if self.sites.remove(&site).is_none() {
                    return refused(
                        RejectCode::SiteUnknown,
                        format!("site {site:?} is not a member"),
                    );
                }
                self.exports.remove(&site);
                self.bump(vec![pb::change::Kind::SiteRemoved(site.to_string())])
            }
        }
    }

    /// Records an admin credential (not part of the watched catalog).
    fn record_admin(
        &mut self,
        sha256: String,
        record: AdminRecord,
        bootstrap: bool,
        now_ms: u64,
    ) -> (Outcome, Vec<pb::Change>) {
        let unchanged = Outcome::Unchanged {
            revision: self.revision,
        };
        if bootstrap && !self.admins.is_empty() {
            return (unchanged, vec![]);
        }
        if self.revoked.contains(&sha256) || self.admins.contains_key(&sha256) {
            return (unchanged, vec![]);
        }
        if let Some(why) = admin_name_problem(&record.name) {
            return refused(RejectCode::Invalid, format!("name: {why}"));
        }
        self.admins.retain(|_, a| a.expires_at_ms > now_ms);
        if self.admins.len() >= MAX_ADMINS {
            return refused(
                RejectCode::LimitExceeded,
                format!("at most {MAX_ADMINS} admin credentials; revoke unused ones first"),
            );
        }
        self.admins.insert(sha256, record);
        self.revision += 1;
        (
            Outcome::Applied {
                revision: self.revision,
            },
            vec![],
        )
    }

    /// Revokes every credential of admin `name`, unless that would leave
    /// no admin credential at all.
    fn revoke_admin(&mut self, name: &str, now_ms: u64) -> (Outcome, Vec<pb::Change>) {
        let live =
            |sha: &String, a: &AdminRecord| a.expires_at_ms > now_ms && !self.revoked.contains(sha);
        let theirs: Vec<String> = self
            .admins
            .iter()
            .filter(|(sha, a)| a.name == name && live(sha, a))
            .map(|(sha, _)| sha.clone())
            .collect();
        if theirs.is_empty() {
            return refused(
                RejectCode::NotFound,
                format!("no live admin credential named {name:?} (see `causeway ctl admin list`)"),
            );
        }
        let others = self
            .admins
            .iter()
            .filter(|(sha, a)| a.name != name && live(sha, a))
            .count();
        if others == 0 {
            return refused(
                RejectCode::Invalid,
                format!("revoking {name:?} would leave no admin credential; issue another first (`causeway ctl admin issue`)"),
            );
        }
        if self.revoked.len() + theirs.len() > MAX_REVOKED {
            return refused(
                RejectCode::LimitExceeded,
                format!("at most {MAX_REVOKED} revoked credentials"),
            );
        }
        self.revoked.extend(theirs);
        self.revision += 1;
        (
            Outcome::Applied {
                revision: self.revision,
            },
            vec![],
        )
    }

    /// Records a join token (not part of the watched catalog).
    fn create_join_token(
        &mut self,
        token_id: String,
        token: TokenRecord,
        now_ms: u64,
    ) -> (Outcome, Vec<pb::Change>) {
        self.forget_old_tokens(now_ms);
        let site = &token.site;
        if let Some(why) = causeway_api::identity::reserved_site_name(site) {
            return refused(RejectCode::Invalid, why);
        }
        if self.sites.contains_key(site) {
            return refused(RejectCode::SiteExists, format!("site {site:?} is already a member; choose another name, or remove it first with `causeway ctl cluster remove {site}`"));
        }
        if token.labels.len() > MAX_LABELS {
            return refused(
                RejectCode::LimitExceeded,
                format!("at most {MAX_LABELS} labels"),
            );
        }
        self.tokens.insert(token_id, token);
        // Tokens are not part of the watched catalog.
        (
            Outcome::Unchanged {
                revision: self.revision,
            },
            vec![],
        )
    }

    /// Whether a join with this token (its id and the hash of the secret
    /// presented) for `site` at `now_ms` would be admitted as far as the
    /// token goes: known, the secret matching (compared in constant time),
    /// unused, unexpired, for this site. The API checks it on a read of
    /// the state before proposing, so a bad token never becomes a Raft
    /// entry; the state machine checks it again when applying.
    pub fn check_join_token(
        &self,
        token_id: &str,
        secret_sha256: &str,
        site: &SiteName,
        now_ms: u64,
    ) -> Result<(), (RejectCode, String)> {
        const UNKNOWN: &str = "join token is unknown to this federation; ask for a new one with `causeway ctl cluster add`";
        let Some(tok) = self.tokens.get(token_id) else {
            return Err((RejectCode::TokenUnknown, UNKNOWN.into()));
        };
        if !causeway_api::token::constant_time_eq(
            tok.secret_sha256.as_bytes(),
            secret_sha256.as_bytes(),
        ) {
            return Err((RejectCode::TokenUnknown, UNKNOWN.into()));
        }
        if tok.used {
            return Err((RejectCode::TokenUsed, "join token was already used; tokens are single-use, ask for a new one with `causeway ctl cluster add`".into()));
        }
        if tok.expires_at_ms <= now_ms {
            return Err((
                RejectCode::TokenExpired,
                "join token has expired; ask for a new one with `causeway ctl cluster add`".into(),
            ));
        }
        if &tok.site != site {
            return Err((
                RejectCode::TokenWrongSite,
                format!(
                    "join token was issued for site {:?}, not {:?}",
                    tok.site.as_str(),
                    site.as_str()
                ),
            ));
        }
        Ok(())
    }

    /// Admits `new` (labels come from its token) if the token is known,
    /// unused, unexpired and for this site, and the site and its trust
    /// domain are new.
    fn join_site(
        &mut self,
        token_id: &str,
        secret_sha256: &str,
        new: SiteRecord,
    ) -> (Outcome, Vec<pb::Change>) {
        if let Err((code, why)) =
            self.check_join_token(token_id, secret_sha256, &new.name, new.joined_at_ms)
        {
            return refused(code, why);
        }
        let Some(tok) = self.tokens.get(token_id) else {
            unreachable!("checked above");
        };
        let site = new.name.clone();
        if self.sites.contains_key(&site) {
            return refused(
                RejectCode::SiteExists,
                format!("site {site:?} is already a member"),
            );
        }
        if self
            .sites
            .values()
            .any(|s| s.trust_domain == new.trust_domain)
        {
            return refused(
                RejectCode::SiteExists,
                format!(
                    "trust domain {} already belongs to another site",
                    new.trust_domain
                ),
            );
        }
        if new.trust_bundle_pem.len() > MAX_BUNDLE_BYTES
            || new.tunnel_addrs.len() > MAX_TUNNEL_ADDRS
        {
            return refused(RejectCode::LimitExceeded, format!("trust bundle is limited to {MAX_BUNDLE_BYTES} bytes and tunnel addresses to {MAX_TUNNEL_ADDRS}"));
        }
        let rec = SiteRecord {
            labels: tok.labels.clone(),
            ..new
        };
        if let Some(t) = self.tokens.get_mut(token_id) {
            t.used = true;
        }
        self.sites.insert(site, rec.clone());
        self.bump(vec![pb::change::Kind::SiteUpserted(site_to_pb(&rec))])
    }

    /// Replaces what `site` exports (and its tunnel addresses, if given).
    fn publish_exports(
        &mut self,
        site: SiteName,
        mut exports: Vec<ExportRecord>,
        tunnel_addrs: Vec<String>,
        now_ms: u64,
    ) -> (Outcome, Vec<pb::Change>) {
        let Some(rec) = self.sites.get(&site) else {
            return refused(
                RejectCode::SiteUnknown,
                format!("site {site:?} is not a member"),
            );
        };
        if exports.len() > MAX_EXPORTS_PER_SITE {
            return refused(
                RejectCode::LimitExceeded,
                format!("a site may export at most {MAX_EXPORTS_PER_SITE} services"),
            );
        }
        if tunnel_addrs.len() > MAX_TUNNEL_ADDRS {
            return refused(
                RejectCode::LimitExceeded,
                format!("at most {MAX_TUNNEL_ADDRS} tunnel addresses"),
            );
        }
        exports.sort_by(|a, b| a.service.cmp(&b.service));
        for w in exports.windows(2) {
            if w[0].service == w[1].service {
                return refused(
                    RejectCode::Invalid,
                    format!(
                        "service {} is listed twice; list each service once with all its ports",
                        w[0].service
                    ),
                );
            }
        }
        if let Some(e) = exports
            .iter()
            .find(|e| e.ports.is_empty() || e.ports.len() > MAX_PORTS_PER_EXPORT)
        {
            return refused(
                RejectCode::Invalid,
                format!(
                    "service {} must list 1 to {MAX_PORTS_PER_EXPORT} ports",
                    e.service
                ),
            );
        }
        let mut changes = Vec::new();
        if !tunnel_addrs.is_empty() && rec.tunnel_addrs != tunnel_addrs {
            let mut rec = rec.clone();
            rec.tunnel_addrs = tunnel_addrs;
            changes.push(pb::change::Kind::SiteUpserted(site_to_pb(&rec)));
            self.sites.insert(site.clone(), rec);
        }
        let current = self.exports.get(&site).cloned().unwrap_or_default();
        for e in &mut exports {
            e.vip_index = self.vip(&e.service);
            if e.exported_at_ms == 0 {
                e.exported_at_ms = current
                    .iter()
                    .find(|c| c.service == e.service)
                    .map_or(now_ms, |c| c.exported_at_ms);
            }
        }
        if current != exports {
            changes.push(pb::change::Kind::ExportsReplaced(pb::SiteExports {
                site: site.to_string(),
                exports: exports.iter().map(export_to_pb).collect(),
            }));
            if exports.is_empty() {
                self.exports.remove(&site);
            } else {
                self.exports.insert(site, exports);
            }
        }
        if changes.is_empty() {
            (
                Outcome::Unchanged {
                    revision: self.revision,
                },
                vec![],
            )
        } else {
            self.bump(changes)
        }
    }

    /// Creates or updates policies; unchanged documents change nothing.
    fn apply_policies(
        &mut self,
        mut policies: Vec<PolicyRecord>,
        by: Option<SiteName>,
        if_revisions: &[u64],
    ) -> (Outcome, Vec<pb::Change>) {
        for (p, &want) in policies.iter().zip(if_revisions) {
            if want == 0 {
                continue;
            }
            let now = self.policies.get(&p.key()).map(|old| old.revision);
            if now != Some(want) {
                let found = match now {
                    Some(rev) => format!("was last changed at revision {rev}"),
                    None => "does not exist".to_string(),
                };
                return refused(
                    RejectCode::Conflict,
                    format!(
                        "{} {}/{} {found}, not at revision {want} as the write expected; read it again and retry",
                        p.kind, p.namespace, p.name
                    ),
                );
            }
        }
        if let Some(site) = &by {
            for p in &policies {
                if let Some(old) = self.policies.get(&p.key()) {
                    if old.owner.as_ref() != Some(site) {
                        return refused(
                            RejectCode::Forbidden,
                            not_yours(&old.owner, site, &p.key()),
                        );
                    }
                }
            }
        }
        for p in &mut policies {
            p.owner = by.clone();
        }
        let new = policies
            .iter()
            .filter(|p| !self.policies.contains_key(&p.key()))
            .count();
        if self.policies.len() + new > causeway_api::policy::MAX_POLICIES {
            return refused(
                RejectCode::LimitExceeded,
                format!(
                    "the federation holds at most {} policies",
                    causeway_api::policy::MAX_POLICIES
                ),
            );
        }
        let changed: Vec<PolicyRecord> = policies
            .into_iter()
            .filter(|p| {
                self.policies
                    .get(&p.key())
                    .is_none_or(|old| old.document_json != p.document_json || old.owner != p.owner)
            })
            .collect();
        if changed.is_empty() {
            return (
                Outcome::Unchanged {
                    revision: self.revision,
                },
                vec![],
            );
        }
        let revision = self.revision + 1;
        let mut kinds = Vec::with_capacity(changed.len());
        for mut p in changed {
            p.revision = revision;
            kinds.push(pb::change::Kind::PolicyUpserted(p.to_pb()));
            self.policies.insert(p.key(), p);
        }
        self.bump(kinds)
    }

    /// Changes one member site's record; `change` says whether anything
    /// changed. One `SiteUpserted`, or `Unchanged`.
    fn update_site(
        &mut self,
        site: &SiteName,
        change: impl FnOnce(&mut SiteRecord) -> bool,
    ) -> (Outcome, Vec<pb::Change>) {
        let Some(rec) = self.sites.get_mut(site) else {
            return refused(
                RejectCode::SiteUnknown,
                format!("site {site:?} is not a member"),
            );
        };
        if !change(rec) {
            return (
                Outcome::Unchanged {
                    revision: self.revision,
                },
                vec![],
            );
        }
        let pb = site_to_pb(rec);
        self.bump(vec![pb::change::Kind::SiteUpserted(pb)])
    }

    fn bump(&mut self, kinds: Vec<pb::change::Kind>) -> (Outcome, Vec<pb::Change>) {
        self.revision += 1;
        let changes = kinds
            .into_iter()
            .map(|k| pb::Change { kind: Some(k) })
            .collect();
        (
            Outcome::Applied {
                revision: self.revision,
            },
            changes,
        )
    }

    /// The stable VIP index of a service key; assigned once, never reused.
    fn vip(&mut self, key: &ServiceKey) -> u32 {
        if let Some(v) = self.vips.get(key) {
            return *v;
        }
        self.next_vip += 1;
        self.vips.insert(key.clone(), self.next_vip);
        self.next_vip
    }

    fn forget_old_tokens(&mut self, now_ms: u64) {
        self.tokens
            .retain(|_, t| t.expires_at_ms.saturating_add(TOKEN_MEMORY_MS) > now_ms);
    }

    /// The whole catalog as a watch snapshot.
    pub fn snapshot_pb(&self) -> pb::CatalogSnapshot {
        pb::CatalogSnapshot {
            revision: self.revision,
            epoch: self.epoch,
            sites: self.sites.values().map(site_to_pb).collect(),
            exports: self
                .exports
                .iter()
                .map(|(site, ex)| pb::SiteExports {
                    site: site.to_string(),
                    exports: ex.iter().map(export_to_pb).collect(),
                })
                .collect(),
            policies: self.policies.values().map(PolicyRecord::to_pb).collect(),
        }
    }
}

/// A member site as the API sends it.
pub fn site_to_pb(s: &SiteRecord) -> pb::Site {
    pb::Site {
        name: s.name.to_string(),
        labels: s.labels.clone().into_iter().collect(),
        tunnel_addrs: s.tunnel_addrs.clone(),
        trust_domain: s.trust_domain.to_string(),
        trust_bundle_pem: s.trust_bundle_pem.clone(),
        available: s.available,
        revoked_serials: s.revoked_serials.iter().cloned().collect(),
    }
}

/// Why `name` cannot name an admin, if it cannot: it becomes the last
/// segment of a SPIFFE ID.
pub fn admin_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > 63 {
        return Some("1 to 63 characters");
    }
    if !name.bytes().all(|b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.' || b == b'_'
    }) {
        return Some("lowercase letters, digits, '-', '.' and '_' only");
    }
    None
}

/// Why `site` may not change the policy `key` owned by `owner`.
fn not_yours(owner: &Option<SiteName>, site: &SiteName, key: &str) -> String {
    match owner {
        Some(o) => format!("{key} is managed by site {o}'s agent; site {site} may not change it (give it another name, or change it in site {o})"),
        None => format!("{key} was applied by an operator; site {site} may not change it (give it another name, or ask an operator to delete it)"),
    }
}

/// An export as the API sends it.
pub fn export_to_pb(e: &ExportRecord) -> pb::Export {
    pb::Export {
        service: e.service.to_string(),
        ports: e
            .ports
            .iter()
            .map(|p| pb::ServicePort {
                port: p.port as u32,
                protocol: p.protocol.as_str().to_string(),
                name: p.name.clone(),
            })
            .collect(),
        healthy_endpoints: e.healthy_endpoints,
        exported_at_unix_ms: e.exported_at_ms,
        client_ip_affinity: e.client_ip_affinity,
        vip_index: e.vip_index,
        headless: e.headless,
        total_endpoints: e.total_endpoints,
        zones: e
            .zones
            .iter()
            .map(|z| pb::ZoneHealth {
                zone: z.zone.clone(),
                healthy: z.healthy,
                total: z.total,
            })
            .collect(),
        subsets: e
            .subsets
            .iter()
            .map(|z| pb::SubsetHealth {
                name: z.zone.clone(),
                healthy: z.healthy,
                total: z.total,
            })
            .collect(),
        endpoints: e
            .endpoints
            .iter()
            .map(|ep| pb::Endpoint {
                address: ep.address.to_string(),
                hostname: ep.hostname.clone(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests;
