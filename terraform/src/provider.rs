//! The provider: schemas, validation, plans and the calls to the controller.
//!
//! Resources:
//! - `causeway_site`: a member site. Creating it reserves the name and
//!   mints a one-time join token (`join_token`, sensitive) that the site's
//!   gateway redeems (`CAUSEWAY_JOIN_TOKEN`); refreshes then show it joined,
//!   its trust domain and tunnel addresses. Destroying it removes the site,
//!   its bundle and exports. A site removed behind Terraform's back, or an
//!   invitation that expired unused, reads as gone and is planned anew.
//! - `causeway_policy`: one traffic policy document (YAML or JSON, as
//!   `causeway ctl policy apply` takes), validated at plan time.
//!
//! - `causeway_site_trust_bundle`: the CA certificates a joined site's
//!   gateways are trusted through, for sites whose CA lives outside the
//!   gateway (rotate by listing old and new, then the new one alone).
//!
//! Data sources: `causeway_sites` (the member sites) and `causeway_services`
//! (the exported services, each with the sites exporting it).

use std::collections::BTreeMap;
use std::sync::Arc;

use causeway_api::client::ControllerClient;
use causeway_api::identity::{self, Credential};
use causeway_api::pb as api;
use tokio::sync::RwLock;
use tonic::{Request, Response, Status};

use crate::pb;
use crate::pb::provider_server;
use crate::schema::{Attr, Block, Mode, Ty};
use crate::value::Value;

pub const SITE: &str = "causeway_site";
pub const POLICY: &str = "causeway_policy";
pub const SITES: &str = "causeway_sites";
pub const SERVICES: &str = "causeway_services";
pub const BUNDLE: &str = "causeway_site_trust_bundle";

/// Join tokens live an hour unless the configuration says otherwise.
const DEFAULT_TOKEN_TTL: u64 = 3600;
/// The controller's limit (7 days).
const MAX_TOKEN_TTL: u64 = 7 * 24 * 3600;

pub fn provider_schema() -> Block {
    Block {
        description: "Manages a causeway federation through its controllers' admin API (gRPC over mutual TLS).",
        attrs: vec![
            Attr::new(
                "controllers",
                Ty::List(Box::new(Ty::String)),
                Mode::Optional,
                "Controller API endpoints, `host:port`. Default: `CAUSEWAY_CONTROLLERS` (comma-separated), else `127.0.0.1:7001`.",
            ),
            Attr::new(
                "credentials_dir",
                Ty::String,
                Mode::Optional,
                "Directory with `ca.pem`, `admin.pem` and `admin-key.pem` from `causeway ca init`. Default: `CAUSEWAY_CREDS`, else `causeway-creds`. Ignored when the three `*_pem` attributes are set.",
            ),
            Attr::new(
                "ca_pem",
                Ty::String,
                Mode::Optional,
                "The controllers' CA certificate (PEM), instead of `credentials_dir`.",
            ),
            Attr::new(
                "cert_pem",
                Ty::String,
                Mode::Optional,
                "The admin client certificate (PEM), instead of `credentials_dir`.",
            ),
            Attr::new(
                "key_pem",
                Ty::String,
                Mode::Optional,
                "The admin client key (PEM), instead of `credentials_dir`.",
            )
            .sensitive(),
        ],
    }
}

pub fn site_schema() -> Block {
    Block {
        description: "A member site (cluster). Creating it reserves the name and mints a one-time join token for the site's gateway; destroying it removes the site, its trust bundle and its exports.",
        attrs: vec![
            Attr::new("id", Ty::String, Mode::Computed, "The site name."),
            Attr::new(
                "name",
                Ty::String,
                Mode::Required,
                "Site name: a DNS label, unique in the federation. Changing it replaces the site.",
            ),
            Attr::new(
                "labels",
                Ty::Map(Box::new(Ty::String)),
                Mode::Optional,
                "Labels of the site (e.g. `region`, `zone`: locality failover reads them). Changing them updates a joined site in place; a site not joined yet gets a new invitation, whose token carries them.",
            ),
            Attr::new(
                "token_ttl_seconds",
                Ty::Number,
                Mode::OptionalComputed,
                "How long the join token stays valid, 1 s to 7 days. Default 3600.",
            ),
            Attr::new(
                "join_token",
                Ty::String,
                Mode::Computed,
                "One-time token the site's gateway joins with (`CAUSEWAY_JOIN_TOKEN`).",
            )
            .sensitive(),
            Attr::new(
                "join_token_expires_at",
                Ty::String,
                Mode::Computed,
                "When the join token expires (RFC 3339). An invitation that expires unused is planned anew.",
            ),
            Attr::new(
                "joined",
                Ty::Bool,
                Mode::Computed,
                "Whether the site's gateway has joined (as of the last refresh).",
            ),
            Attr::new(
                "trust_domain",
                Ty::String,
                Mode::Computed,
                "The site's SPIFFE trust domain, once joined.",
            ),
            Attr::new(
                "available",
                Ty::Bool,
                Mode::Computed,
                "Whether the site's gateways are heartbeating, once joined.",
            ),
            Attr::new(
                "tunnel_addrs",
                Ty::List(Box::new(Ty::String)),
                Mode::Computed,
                "The addresses the site's gateways take tunnels on, once joined.",
            ),
        ],
    }
}

pub fn policy_schema() -> Block {
    Block {
        description: "One traffic policy (FailoverPolicy, TrafficSplit, RetryPolicy, CircuitBreaker, AuthorizationPolicy, ...), as `causeway ctl policy apply` takes it.",
        attrs: vec![
            Attr::new(
                "id",
                Ty::String,
                Mode::Computed,
                "`KIND/NAMESPACE/NAME`, also the import ID.",
            ),
            Attr::new(
                "document",
                Ty::String,
                Mode::Required,
                "The policy document, YAML or JSON (`apiVersion`, `kind`, `metadata`, `spec`); e.g. `yamlencode({...})` or `file(\"policy.yaml\")`. Changing its kind, namespace or name replaces the policy.",
            ),
            Attr::new("kind", Ty::String, Mode::Computed, "The policy's kind."),
            Attr::new(
                "namespace",
                Ty::String,
                Mode::Computed,
                "The policy's namespace.",
            ),
            Attr::new("name", Ty::String, Mode::Computed, "The policy's name."),
            Attr::new(
                "revision",
                Ty::Number,
                Mode::Computed,
                "The catalog revision that last changed the policy.",
            ),
        ],
    }
}

pub fn bundle_schema() -> Block {
    Block {
        description: "The trust bundle of a site that has joined: the CA certificates its gateways' certificates chain to. For a site CA kept outside the gateway (cert-manager, Vault, ...). Destroying this resource leaves the site's last bundle in place (a site always has one; it goes with the site).",
        attrs: vec![
            Attr::new("id", Ty::String, Mode::Computed, "The site name."),
            Attr::new(
                "site",
                Ty::String,
                Mode::Required,
                "The site, which must have joined. Changing it manages another site's bundle.",
            ),
            Attr::new(
                "ca_pem",
                Ty::String,
                Mode::Required,
                "One or more CA certificates (PEM), at most 64 KiB. To rotate: list the old and the new CA, move the site's gateways to the new one, then list the new one alone; peers close tunnels a dropped CA authenticated.",
            ),
            Attr::new(
                "fingerprints",
                Ty::List(Box::new(Ty::String)),
                Mode::Computed,
                "SHA-256 of each CA certificate (hex), in order.",
            ),
        ],
    }
}

/// SHA-256 fingerprints of the certificates in a PEM bundle.
fn fingerprints(pem: &str) -> Option<Vec<String>> {
    let certs = identity::parse_certs_pem("ca_pem", pem).ok()?;
    Some(certs.iter().map(identity::fingerprint).collect())
}

fn site_entry_ty() -> Ty {
    Ty::Object(vec![
        ("name", Ty::String),
        ("trust_domain", Ty::String),
        ("available", Ty::Bool),
        ("tunnel_addrs", Ty::List(Box::new(Ty::String))),
        ("labels", Ty::Map(Box::new(Ty::String))),
        ("exports", Ty::Number),
    ])
}

pub fn sites_schema() -> Block {
    Block {
        description: "The federation's member sites.",
        attrs: vec![
            Attr::new(
                "id",
                Ty::String,
                Mode::Computed,
                "The catalog revision read.",
            ),
            Attr::new(
                "sites",
                Ty::List(Box::new(site_entry_ty())),
                Mode::Computed,
                "Each member: name, trust domain, availability, tunnel addresses, labels and how many services it exports.",
            ),
            Attr::new(
                "revision",
                Ty::Number,
                Mode::Computed,
                "The catalog revision read.",
            ),
        ],
    }
}

fn service_entry_ty() -> Ty {
    Ty::Object(vec![
        ("service", Ty::String),
        ("namespace", Ty::String),
        ("name", Ty::String),
        ("sites", Ty::List(Box::new(Ty::String))),
        ("ports", Ty::List(Box::new(Ty::Number))),
        ("healthy_endpoints", Ty::Number),
        ("total_endpoints", Ty::Number),
    ])
}

pub fn services_schema() -> Block {
    Block {
        description: "The services member sites export, each once with every site exporting it (e.g. to declare a FailoverPolicy per service with for_each).",
        attrs: vec![
            Attr::new(
                "id",
                Ty::String,
                Mode::Computed,
                "The catalog revision read.",
            ),
            Attr::new(
                "namespace",
                Ty::String,
                Mode::Optional,
                "Only services in this namespace.",
            ),
            Attr::new(
                "services",
                Ty::List(Box::new(service_entry_ty())),
                Mode::Computed,
                "Sorted by service: `service` (`NAMESPACE/NAME`), `namespace`, `name`, `sites` exporting it (sorted), `ports` (the union, sorted), and healthy and total endpoints summed over the sites.",
            ),
            Attr::new(
                "revision",
                Ty::Number,
                Mode::Computed,
                "The catalog revision read.",
            ),
        ],
    }
}

/// The catalog's exports grouped by service (optionally one namespace).
fn services_of(cat: &api::CatalogSnapshot, namespace: Option<&str>) -> Value {
    #[derive(Default)]
    struct Entry {
        sites: std::collections::BTreeSet<String>,
        ports: std::collections::BTreeSet<u32>,
        healthy: u64,
        total: u64,
    }
    let mut by_service: BTreeMap<&str, Entry> = BTreeMap::new();
    for site in &cat.exports {
        for e in &site.exports {
            let ns = e.service.split_once('/').map_or("", |(ns, _)| ns);
            if namespace.is_some_and(|want| want != ns) {
                continue;
            }
            let entry = by_service.entry(&e.service).or_default();
            entry.sites.insert(site.site.clone());
            entry.ports.extend(e.ports.iter().map(|p| p.port));
            entry.healthy += u64::from(e.healthy_endpoints);
            entry.total += u64::from(e.total_endpoints.max(e.healthy_endpoints));
        }
    }
    Value::List(
        by_service
            .into_iter()
            .map(|(service, e)| {
                let (ns, name) = service.split_once('/').unwrap_or(("", service));
                let mut m = BTreeMap::new();
                m.insert("service".to_string(), Value::string(service));
                m.insert("namespace".into(), Value::string(ns));
                m.insert("name".into(), Value::string(name));
                m.insert(
                    "sites".into(),
                    Value::List(e.sites.into_iter().map(Value::String).collect()),
                );
                m.insert(
                    "ports".into(),
                    Value::List(
                        e.ports
                            .into_iter()
                            .map(|p| Value::Number(f64::from(p)))
                            .collect(),
                    ),
                );
                m.insert("healthy_endpoints".into(), Value::Number(e.healthy as f64));
                m.insert("total_endpoints".into(), Value::Number(e.total as f64));
                Value::Map(m)
            })
            .collect(),
    )
}

fn resource_schema(type_name: &str) -> Option<Block> {
    match type_name {
        SITE => Some(site_schema()),
        POLICY => Some(policy_schema()),
        BUNDLE => Some(bundle_schema()),
        _ => None,
    }
}

// ---- diagnostics ----

fn error(summary: impl Into<String>, detail: impl Into<String>) -> pb::Diagnostic {
    pb::Diagnostic {
        severity: pb::diagnostic::Severity::Error as i32,
        summary: summary.into(),
        detail: detail.into(),
        attribute: None,
    }
}

fn attr_error(attr: &str, summary: impl Into<String>, detail: impl Into<String>) -> pb::Diagnostic {
    pb::Diagnostic {
        attribute: Some(path(attr)),
        ..error(summary, detail)
    }
}

fn path(attr: &str) -> pb::AttributePath {
    pb::AttributePath {
        steps: vec![pb::attribute_path::Step {
            selector: Some(pb::attribute_path::step::Selector::AttributeName(
                attr.into(),
            )),
        }],
    }
}

/// A controller refusal or failure, with what the controller said (its
/// messages name the field and the fix).
fn api_error(action: &str, s: &Status) -> pb::Diagnostic {
    let detail = match s.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
            "No controller answered. Set the provider's `controllers` (or CAUSEWAY_CONTROLLERS) to reachable controller API addresses, and check that a majority of the controllers is up.".to_string()
        }
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            "The controller refused the provider's credential: use the admin certificate from `causeway ca init` for this federation.".to_string()
        }
        tonic::Code::Cancelled => {
            "A change sent before the interruption may have taken effect: the next plan refreshes and shows it.".to_string()
        }
        code => format!("The controller answered {code:?}."),
    };
    error(format!("{action}: {}", s.message()), detail)
}

fn unknown_type(type_name: &str) -> pb::Diagnostic {
    error(
        format!("unknown type {type_name:?}"),
        format!(
            "This provider has resources {SITE}, {POLICY} and {BUNDLE}, and data sources {SITES} and {SERVICES}."
        ),
    )
}

// ---- values ----

fn decode(dv: &Option<pb::DynamicValue>, what: &str) -> Result<Value, pb::Diagnostic> {
    match dv {
        Some(d) if !d.msgpack.is_empty() => Value::decode(&d.msgpack).map_err(|e| {
            error(
                format!("could not read the {what} Terraform sent"),
                format!("{e}; this is a bug in the provider or in Terraform."),
            )
        }),
        Some(d) if !d.json.is_empty() => serde_json::from_slice::<serde_json::Value>(&d.json)
            .map(|j| Value::from_json(&j))
            .map_err(|e| {
                error(
                    format!("could not read the {what} Terraform sent"),
                    e.to_string(),
                )
            }),
        _ => Ok(Value::Null),
    }
}

fn dv(v: &Value) -> Option<pb::DynamicValue> {
    Some(pb::DynamicValue {
        msgpack: v.encode(),
        json: Vec::new(),
    })
}

fn fields(v: &Value) -> BTreeMap<String, Value> {
    match v {
        Value::Map(m) => m.clone(),
        _ => BTreeMap::new(),
    }
}

/// A policy document's identity and canonical JSON, or what is wrong with it.
struct PolicyDoc {
    kind: String,
    namespace: String,
    name: String,
    json: serde_json::Value,
}

impl PolicyDoc {
    fn parse(text: &str) -> Result<Self, Vec<String>> {
        let docs = causeway_api::policy::read_documents(text)?;
        if docs.len() != 1 {
            return Err(vec![format!(
                "holds {} documents; a causeway_policy manages exactly one (use one resource per document, e.g. with for_each)",
                docs.len()
            )]);
        }
        let json: serde_json::Value =
            serde_json::from_str(&docs[0]).map_err(|e| vec![e.to_string()])?;
        let s = |p: &str| {
            json.pointer(p)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        Ok(Self {
            kind: s("/kind"),
            namespace: s("/metadata/namespace"),
            name: s("/metadata/name"),
            json,
        })
    }

    fn id(&self) -> String {
        format!("{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

/// Every controller endpoint must be `host:port`, and there must be one.
fn check_controllers(controllers: &[String]) -> Vec<pb::Diagnostic> {
    let mut diags = Vec::new();
    if controllers.is_empty() {
        diags.push(attr_error(
            "controllers",
            "no controller endpoints",
            "List at least one controller API address, `host:port`, or leave `controllers` out.",
        ));
    }
    for c in controllers {
        let port = c.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok());
        if port.is_none() {
            diags.push(attr_error(
                "controllers",
                format!("{c:?} is not host:port"),
                "Write each controller endpoint as host:port, e.g. 10.0.0.5:7001.",
            ));
        }
    }
    diags
}

fn parse_policy_id(id: &str) -> Option<(&str, &str, &str)> {
    let mut parts = id.splitn(3, '/');
    let (k, ns, n) = (parts.next()?, parts.next()?, parts.next()?);
    (!k.is_empty() && !ns.is_empty() && !n.is_empty() && !n.contains('/')).then_some((k, ns, n))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// ---- the provider ----

type FedClient = api::federation_client::FederationClient<tonic::transport::Channel>;

/// The longest one controller call may take, endpoints tried included.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

pub struct Provider {
    client: RwLock<Option<Arc<ControllerClient>>>,
    /// Set when Terraform asks the provider to stop (an interrupted run):
    /// calls in flight and later ones return at once.
    stop: tokio::sync::watch::Sender<bool>,
}

impl Default for Provider {
    fn default() -> Self {
        Self::new()
    }
}

impl Provider {
    pub fn new() -> Self {
        Self {
            client: RwLock::new(None),
            stop: tokio::sync::watch::Sender::new(false),
        }
    }

    async fn client(&self) -> Result<Arc<ControllerClient>, pb::Diagnostic> {
        self.client.read().await.clone().ok_or_else(|| {
            error(
                "the causeway provider is not configured",
                "Terraform called the provider before configuring it; this is a bug.",
            )
        })
    }

    /// Runs `op` against whichever controller answers (see
    /// [`ControllerClient::call`]), bounded by [`CALL_TIMEOUT`] and ended
    /// at once if Terraform asks the provider to stop.
    async fn call<T, F, Fut>(&self, leader_only: bool, op: F) -> Result<T, Status>
    where
        F: Fn(FedClient) -> Fut,
        Fut: std::future::Future<Output = Result<Response<T>, Status>>,
    {
        let c = self
            .client()
            .await
            .map_err(|d| Status::failed_precondition(d.summary))?;
        self.guard(c.call(leader_only, op)).await
    }

    /// `fut`, unless it outlasts [`CALL_TIMEOUT`] or the provider is told
    /// to stop first.
    async fn guard<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let mut stop = self.stop.subscribe();
        tokio::select! {
            r = fut => r,
            _ = tokio::time::sleep(CALL_TIMEOUT) => Err(Status::deadline_exceeded(format!(
                "no answer from the controllers within {} s",
                CALL_TIMEOUT.as_secs()
            ))),
            _ = stop.wait_for(|s| *s) => Err(Status::cancelled(
                "interrupted: Terraform asked the provider to stop",
            )),
        }
    }

    async fn catalog(&self) -> Result<api::CatalogSnapshot, pb::Diagnostic> {
        // Linearizable: a refresh right after an apply sees it.
        self.call(true, |mut f| async move {
            f.catalog(api::CatalogRequest { linearizable: true }).await
        })
        .await
        .map_err(|s| api_error("reading the catalog", &s))
    }

    async fn find_policy(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<api::Policy>, pb::Diagnostic> {
        // Linearizable: the policy just applied (through any node) is seen.
        let r = self
            .call(true, |mut f| {
                let req = api::ListPoliciesRequest {
                    kind: kind.into(),
                    linearizable: true,
                };
                async move { f.list_policies(req).await }
            })
            .await
            .map_err(|s| api_error("listing policies", &s))?;
        Ok(r.policies
            .into_iter()
            .find(|p| p.kind == kind && p.namespace == namespace && p.name == name))
    }

    fn configure(config: &Value) -> Result<ControllerClient, Vec<pb::Diagnostic>> {
        if !config.is_wholly_known() {
            return Err(vec![error(
                "the causeway provider's configuration is not known until apply",
                "Give `controllers` and the credentials as values known at plan time (not from resources created in the same run).",
            )]);
        }
        let controllers = match config.get("controllers") {
            Value::Null => std::env::var("CAUSEWAY_CONTROLLERS")
                .map(|s| {
                    s.split(',')
                        .map(|e| e.trim().to_string())
                        .filter(|e| !e.is_empty())
                        .collect()
                })
                .unwrap_or_else(|_| vec!["127.0.0.1:7001".to_string()]),
            v => v.to_string_list().unwrap_or_default(),
        };
        let mut diags = check_controllers(&controllers);
        let pems: Vec<Option<&str>> = ["ca_pem", "cert_pem", "key_pem"]
            .iter()
            .map(|a| config.get(a).as_str())
            .collect();
        let (ca, cred) = if pems.iter().any(Option::is_some) {
            match (pems[0], pems[1], pems[2]) {
                (Some(ca), Some(cert), Some(key)) => match Credential::from_pem(cert, key) {
                    Ok(c) => (ca.to_string(), c),
                    Err(e) => {
                        diags.push(attr_error(
                            "cert_pem",
                            format!("the admin credential is not usable: {e}"),
                            "Give the PEM certificate and key from `causeway ca init` (admin.pem, admin-key.pem).",
                        ));
                        return Err(diags);
                    }
                },
                _ => {
                    diags.push(error(
                        "set all of ca_pem, cert_pem and key_pem, or none",
                        "Either give the three PEM attributes, or leave them out and point `credentials_dir` at the directory `causeway ca init` wrote.",
                    ));
                    return Err(diags);
                }
            }
        } else {
            let dir = match config.get("credentials_dir").as_str() {
                Some(d) => std::path::PathBuf::from(d),
                None => std::env::var_os("CAUSEWAY_CREDS")
                    .map(Into::into)
                    .unwrap_or_else(|| "causeway-creds".into()),
            };
            let loaded = identity::read(&dir.join("ca.pem")).and_then(|ca| {
                Credential::load(&dir.join("admin.pem"), &dir.join("admin-key.pem"))
                    .map(|c| (ca, c))
            });
            match loaded {
                Ok(pair) => pair,
                Err(e) => {
                    diags.push(attr_error(
                        "credentials_dir",
                        format!("cannot read the admin credentials in {}: {e}", dir.display()),
                        "Point `credentials_dir` (or CAUSEWAY_CREDS) at the directory `causeway ca init` wrote, with ca.pem, admin.pem and admin-key.pem.",
                    ));
                    return Err(diags);
                }
            }
        };
        if !diags.is_empty() {
            return Err(diags);
        }
        Ok(ControllerClient::new(controllers, &ca, Some(&cred)))
    }

    fn validate_site(config: &Value) -> Vec<pb::Diagnostic> {
        let mut diags = Vec::new();
        if let Some(name) = config.get("name").as_str() {
            if let Err(e) = name.parse::<causeway_api::model::SiteName>() {
                diags.push(attr_error(
                    "name",
                    format!("{name:?} is not a site name: {e}"),
                    "Use a DNS label: lower-case letters, digits and '-', at most 63 characters.",
                ));
            }
        }
        if let Some(ttl) = config.get("token_ttl_seconds").as_f64() {
            if ttl.fract() != 0.0 || ttl < 1.0 || ttl > MAX_TOKEN_TTL as f64 {
                diags.push(attr_error(
                    "token_ttl_seconds",
                    format!("{ttl} is not a whole number of seconds from 1 to {MAX_TOKEN_TTL}"),
                    "Join tokens live at most 7 days.",
                ));
            }
        }
        diags
    }

    fn validate_bundle(config: &Value) -> Vec<pb::Diagnostic> {
        let mut diags = Vec::new();
        if let Some(site) = config.get("site").as_str() {
            if let Err(e) = site.parse::<causeway_api::model::SiteName>() {
                diags.push(attr_error(
                    "site",
                    format!("{site:?} is not a site name: {e}"),
                    "Name a member site (e.g. causeway_site.x.name).",
                ));
            }
        }
        if let Some(pem) = config.get("ca_pem").as_str() {
            if let Err(e) = identity::check_trust_bundle("ca_pem", pem) {
                diags.push(attr_error(
                    "ca_pem",
                    "the trust bundle is invalid",
                    format!("{e}. Give the site CA's certificate (PEM), or the old and the new one during a rotation."),
                ));
            }
        }
        diags
    }

    fn validate_policy(config: &Value) -> Vec<pb::Diagnostic> {
        match config.get("document").as_str() {
            Some(text) => match PolicyDoc::parse(text) {
                Ok(_) => Vec::new(),
                Err(errs) => vec![attr_error(
                    "document",
                    "the policy document is invalid",
                    errs.join("\n"),
                )],
            },
            None => Vec::new(),
        }
    }

    fn plan_site(prior: &Value, proposed: &Value) -> (Value, Vec<pb::AttributePath>) {
        let mut f = fields(proposed);
        if f.get("token_ttl_seconds").is_none_or(Value::is_null) {
            f.insert(
                "token_ttl_seconds".into(),
                Value::Number(DEFAULT_TOKEN_TTL as f64),
            );
        }
        let mut replace = Vec::new();
        if prior.is_null() {
            let id = f.get("name").cloned().unwrap_or(Value::Unknown);
            f.insert("id".into(), id);
            for a in [
                "join_token",
                "join_token_expires_at",
                "trust_domain",
                "available",
                "tunnel_addrs",
            ] {
                f.insert(a.into(), Value::Unknown);
            }
            f.insert("joined".into(), Value::Bool(false));
        } else {
            if proposed.get("name") != prior.get("name") {
                replace.push(path("name"));
            }
            // A joined site's labels change in place; an invitation's are
            // in its token, so a new one is minted.
            let joined = prior.get("joined").as_bool() == Some(true);
            if proposed.get("labels") != prior.get("labels") && !joined {
                replace.push(path("labels"));
            }
        }
        (site_schema().object(f), replace)
    }

    fn plan_bundle(prior: &Value, proposed: &Value) -> (Value, Vec<pb::AttributePath>) {
        let mut f = fields(proposed);
        f.insert("id".into(), proposed.get("site").clone());
        let prints = match proposed.get("ca_pem") {
            Value::String(pem) => fingerprints(pem)
                .map(|p| Value::string_list(&p))
                .unwrap_or(Value::Unknown),
            _ => Value::Unknown,
        };
        f.insert("fingerprints".into(), prints);
        let mut replace = Vec::new();
        if !prior.is_null() && prior.get("site") != proposed.get("site") {
            replace.push(path("site"));
        }
        (bundle_schema().object(f), replace)
    }

    fn plan_policy(prior: &Value, proposed: &Value) -> (Value, Vec<pb::AttributePath>) {
        let mut f = fields(proposed);
        let mut replace = Vec::new();
        let doc = proposed.get("document").as_str().map(PolicyDoc::parse);
        match doc {
            Some(Ok(doc)) => {
                f.insert("id".into(), Value::string(doc.id()));
                f.insert("kind".into(), Value::string(&doc.kind));
                f.insert("namespace".into(), Value::string(&doc.namespace));
                f.insert("name".into(), Value::string(&doc.name));
                let before = prior.get("document").as_str().map(PolicyDoc::parse);
                let revision = match before {
                    Some(Ok(b)) if b.json == doc.json => prior.get("revision").clone(),
                    Some(Ok(b)) => {
                        if b.id() != doc.id() {
                            replace.push(path("document"));
                        }
                        Value::Unknown
                    }
                    _ => Value::Unknown,
                };
                f.insert("revision".into(), revision);
            }
            // Not known yet (or invalid: validation has said so).
            _ => {
                for a in ["id", "kind", "namespace", "name", "revision"] {
                    f.insert(a.into(), Value::Unknown);
                }
            }
        }
        (policy_schema().object(f), replace)
    }

    async fn apply_site(&self, prior: &Value, planned: &Value) -> Result<Value, pb::Diagnostic> {
        let name = planned
            .get("name")
            .as_str()
            .or(prior.get("name").as_str())
            .unwrap_or_default()
            .to_string();
        if planned.is_null() {
            let r = self
                .call(false, |mut f| {
                    let req = api::RemoveSiteRequest { site: name.clone() };
                    async move { f.remove_site(req).await }
                })
                .await;
            return match r {
                // Not joined yet (the token just expires), or already gone.
                Ok(_) => Ok(Value::Null),
                Err(s) if s.code() == tonic::Code::NotFound => Ok(Value::Null),
                Err(s) => Err(api_error(&format!("removing site {name}"), &s)),
            };
        }
        let mut f = fields(planned);
        if !prior.is_null() {
            // In place: the labels of a joined site (the plan replaces an
            // invitation whose labels change), and token_ttl_seconds, which
            // only a new invitation would use.
            if planned.get("labels") != prior.get("labels") {
                let labels = planned.get("labels").to_string_map().unwrap_or_default();
                self.call(false, |mut f| {
                    let req = api::SetSiteLabelsRequest {
                        site: name.clone(),
                        labels: labels.clone().into_iter().collect(),
                    };
                    async move { f.set_site_labels(req).await }
                })
                .await
                .map_err(|s| api_error(&format!("setting the labels of site {name}"), &s))?;
            }
            return Ok(site_schema().object(f));
        }
        let labels = planned.get("labels").to_string_map().unwrap_or_default();
        let ttl = planned
            .get("token_ttl_seconds")
            .as_f64()
            .unwrap_or(DEFAULT_TOKEN_TTL as f64) as u64;
        let req = api::CreateJoinTokenRequest {
            site: name.clone(),
            labels: labels.into_iter().collect(),
            ttl_seconds: ttl,
        };
        let r = self
            .call(false, |mut f| {
                let req = req.clone();
                async move { f.create_join_token(req).await }
            })
            .await
            .map_err(|s| {
                let mut d = api_error(&format!("inviting site {name}"), &s);
                if s.code() == tonic::Code::AlreadyExists {
                    d.detail = format!(
                        "Site {name} is already a member. To manage it with Terraform, import it: terraform import <address> {name}"
                    );
                }
                d
            })?;
        f.insert("id".into(), Value::string(&name));
        f.insert("join_token".into(), Value::string(r.token));
        f.insert(
            "join_token_expires_at".into(),
            Value::string(crate::time::rfc3339(r.expires_at_unix_ms)),
        );
        f.insert("joined".into(), Value::Bool(false));
        for a in ["trust_domain", "available", "tunnel_addrs"] {
            f.insert(a.into(), Value::Null);
        }
        Ok(site_schema().object(f))
    }

    async fn apply_bundle(&self, planned: &Value) -> Result<Value, pb::Diagnostic> {
        if planned.is_null() {
            // A site always has a bundle: it keeps its last one.
            return Ok(Value::Null);
        }
        let site = planned.get("site").as_str().unwrap_or_default();
        let pem = planned.get("ca_pem").as_str().unwrap_or_default();
        self.call(false, |mut f| {
            let req = api::UpdateTrustBundleRequest {
                site: site.into(),
                trust_bundle_pem: pem.into(),
            };
            async move { f.update_trust_bundle(req).await }
        })
        .await
        .map_err(|s| {
                let mut d = api_error(&format!("setting the trust bundle of site {site}"), &s);
                if s.code() == tonic::Code::NotFound {
                    d.detail = format!(
                        "Site {site} has not joined (or was removed). A bundle can be set once the site's gateway has joined with its token: apply again after it has."
                    );
                }
                d
            })?;
        let mut f = fields(planned);
        f.insert("id".into(), Value::string(site));
        f.insert(
            "fingerprints".into(),
            Value::string_list(&fingerprints(pem).unwrap_or_default()),
        );
        Ok(bundle_schema().object(f))
    }

    async fn read_bundle(&self, state: &Value) -> Result<Value, pb::Diagnostic> {
        let site = state.get("site").as_str().unwrap_or_default();
        let cat = self.catalog().await?;
        let Some(s) = cat.sites.iter().find(|s| s.name == site) else {
            return Ok(Value::Null);
        };
        Ok(Self::bundle_state(fields(state), s))
    }

    /// A bundle state from the catalog's site: the configured PEM text is
    /// kept while it holds the same certificates.
    fn bundle_state(mut f: BTreeMap<String, Value>, s: &api::Site) -> Value {
        let stored = fingerprints(&s.trust_bundle_pem).unwrap_or_default();
        let ours = f
            .get("ca_pem")
            .and_then(Value::as_str)
            .and_then(fingerprints);
        if ours.as_ref() != Some(&stored) {
            f.insert("ca_pem".into(), Value::string(&s.trust_bundle_pem));
        }
        f.insert("id".into(), Value::string(&s.name));
        f.insert("site".into(), Value::string(&s.name));
        f.insert("fingerprints".into(), Value::string_list(&stored));
        bundle_schema().object(f)
    }

    async fn apply_policy(&self, prior: &Value, planned: &Value) -> Result<Value, pb::Diagnostic> {
        if planned.is_null() {
            let (k, ns, n) = (
                prior.get("kind").as_str().unwrap_or_default(),
                prior.get("namespace").as_str().unwrap_or_default(),
                prior.get("name").as_str().unwrap_or_default(),
            );
            let r = self
                .call(false, |mut f| {
                    let req = api::DeletePolicyRequest {
                        kind: k.into(),
                        namespace: ns.into(),
                        name: n.into(),
                    };
                    async move { f.delete_policy(req).await }
                })
                .await;
            return match r {
                Ok(_) => Ok(Value::Null),
                Err(s) if s.code() == tonic::Code::NotFound => Ok(Value::Null),
                Err(s) => Err(api_error(&format!("deleting policy {k}/{ns}/{n}"), &s)),
            };
        }
        let text = planned.get("document").as_str().unwrap_or_default();
        let doc = PolicyDoc::parse(text).map_err(|errs| {
            attr_error(
                "document",
                "the policy document is invalid",
                errs.join("\n"),
            )
        })?;
        self.call(false, |mut f| {
            let req = api::ApplyPoliciesRequest {
                documents_json: vec![doc.json.to_string()],
            };
            async move { f.apply_policies(req).await }
        })
        .await
        .map_err(|s| api_error(&format!("applying policy {}", doc.id()), &s))?;
        let stored = self
            .find_policy(&doc.kind, &doc.namespace, &doc.name)
            .await?
            .ok_or_else(|| {
                error(
                    format!("policy {} was applied but is not listed", doc.id()),
                    "Another client deleted it at once; run terraform apply again.",
                )
            })?;
        let mut f = fields(planned);
        f.insert("id".into(), Value::string(doc.id()));
        f.insert("kind".into(), Value::string(&doc.kind));
        f.insert("namespace".into(), Value::string(&doc.namespace));
        f.insert("name".into(), Value::string(&doc.name));
        f.insert("revision".into(), Value::Number(stored.revision as f64));
        Ok(policy_schema().object(f))
    }

    fn site_from_catalog(mut f: BTreeMap<String, Value>, s: &api::Site) -> Value {
        f.insert("id".into(), Value::string(&s.name));
        f.insert("name".into(), Value::string(&s.name));
        let labels: BTreeMap<&String, &String> = s.labels.iter().collect();
        f.insert(
            "labels".into(),
            if labels.is_empty() {
                Value::Null
            } else {
                Value::string_map(labels)
            },
        );
        f.insert("joined".into(), Value::Bool(true));
        f.insert("trust_domain".into(), Value::string(&s.trust_domain));
        f.insert("available".into(), Value::Bool(s.available));
        f.insert("tunnel_addrs".into(), Value::string_list(&s.tunnel_addrs));
        site_schema().object(f)
    }

    async fn read_site(&self, state: &Value) -> Result<Value, pb::Diagnostic> {
        let name = state.get("name").as_str().unwrap_or_default();
        let cat = self.catalog().await?;
        if let Some(s) = cat.sites.iter().find(|s| s.name == name) {
            let mut f = fields(state);
            if f.get("labels").is_some_and(|l| l.is_null()) && s.labels.is_empty() {
                f.remove("labels");
            }
            return Ok(Self::site_from_catalog(f, s));
        }
        if state.get("joined").as_bool() == Some(true) {
            // Removed outside Terraform.
            return Ok(Value::Null);
        }
        let expired = state
            .get("join_token_expires_at")
            .as_str()
            .and_then(crate::time::parse_rfc3339)
            .is_some_and(|at| at <= now_ms());
        if expired {
            // The invitation lapsed unused: plan a new one.
            return Ok(Value::Null);
        }
        Ok(state.clone())
    }

    async fn read_policy(&self, state: &Value) -> Result<Value, pb::Diagnostic> {
        let (k, ns, n) = (
            state.get("kind").as_str().unwrap_or_default(),
            state.get("namespace").as_str().unwrap_or_default(),
            state.get("name").as_str().unwrap_or_default(),
        );
        let Some(stored) = self.find_policy(k, ns, n).await? else {
            return Ok(Value::Null);
        };
        let mut f = fields(state);
        let stored_json: serde_json::Value =
            serde_json::from_str(&stored.document_json).unwrap_or_default();
        let same = state
            .get("document")
            .as_str()
            .and_then(|t| PolicyDoc::parse(t).ok())
            .is_some_and(|d| d.json == stored_json);
        if !same {
            // Changed outside Terraform: show what is there now.
            f.insert(
                "document".into(),
                Value::string(serde_json::to_string_pretty(&stored_json).unwrap_or_default()),
            );
        }
        f.insert("revision".into(), Value::Number(stored.revision as f64));
        Ok(policy_schema().object(f))
    }

    async fn import(&self, type_name: &str, id: &str) -> Result<Value, pb::Diagnostic> {
        match type_name {
            SITE => {
                let cat = self.catalog().await?;
                let s = cat.sites.iter().find(|s| s.name == id).ok_or_else(|| {
                    error(
                        format!("site {id:?} is not a member"),
                        "Only a site that has joined can be imported; to invite a new one, declare it and apply.",
                    )
                })?;
                let mut f = BTreeMap::new();
                f.insert(
                    "token_ttl_seconds".into(),
                    Value::Number(DEFAULT_TOKEN_TTL as f64),
                );
                Ok(Self::site_from_catalog(f, s))
            }
            BUNDLE => {
                let cat = self.catalog().await?;
                let s = cat.sites.iter().find(|s| s.name == id).ok_or_else(|| {
                    error(
                        format!("site {id:?} is not a member"),
                        "Import a trust bundle by the name of a site that has joined.",
                    )
                })?;
                Ok(Self::bundle_state(BTreeMap::new(), s))
            }
            POLICY => {
                let (k, ns, n) = parse_policy_id(id).ok_or_else(|| {
                    error(
                        format!("{id:?} is not a policy ID"),
                        "Import a policy as KIND/NAMESPACE/NAME, e.g. FailoverPolicy/shop/payments.",
                    )
                })?;
                let stored = self.find_policy(k, ns, n).await?.ok_or_else(|| {
                    error(
                        format!("policy {id} does not exist"),
                        "List the stored policies with `causeway ctl policy list`.",
                    )
                })?;
                let json: serde_json::Value =
                    serde_json::from_str(&stored.document_json).unwrap_or_default();
                let mut f = BTreeMap::new();
                f.insert("id".into(), Value::string(id));
                f.insert("kind".into(), Value::string(k));
                f.insert("namespace".into(), Value::string(ns));
                f.insert("name".into(), Value::string(n));
                f.insert(
                    "document".into(),
                    Value::string(serde_json::to_string_pretty(&json).unwrap_or_default()),
                );
                f.insert("revision".into(), Value::Number(stored.revision as f64));
                Ok(policy_schema().object(f))
            }
            other => Err(unknown_type(other)),
        }
    }

    async fn read_services(&self, config: &Value) -> Result<Value, pb::Diagnostic> {
        let cat = self.catalog().await?;
        let namespace = config.get("namespace").as_str();
        let mut f = BTreeMap::new();
        f.insert("id".into(), Value::string(cat.revision.to_string()));
        if let Some(ns) = namespace {
            f.insert("namespace".into(), Value::string(ns));
        }
        f.insert("services".into(), services_of(&cat, namespace));
        f.insert("revision".into(), Value::Number(cat.revision as f64));
        Ok(services_schema().object(f))
    }

    async fn read_sites(&self) -> Result<Value, pb::Diagnostic> {
        let cat = self.catalog().await?;
        let entry = match site_entry_ty() {
            Ty::Object(fields) => fields,
            _ => unreachable!("an object type"),
        };
        let sites = cat
            .sites
            .iter()
            .map(|s| {
                let exports = cat
                    .exports
                    .iter()
                    .find(|e| e.site == s.name)
                    .map_or(0, |e| e.exports.len());
                let mut m = BTreeMap::new();
                m.insert("name".to_string(), Value::string(&s.name));
                m.insert("trust_domain".into(), Value::string(&s.trust_domain));
                m.insert("available".into(), Value::Bool(s.available));
                m.insert("tunnel_addrs".into(), Value::string_list(&s.tunnel_addrs));
                m.insert("labels".into(), Value::string_map(s.labels.iter()));
                m.insert("exports".into(), Value::Number(exports as f64));
                debug_assert!(entry.iter().all(|(n, _)| m.contains_key(*n)));
                Value::Map(m)
            })
            .collect();
        let mut f = BTreeMap::new();
        f.insert("id".into(), Value::string(cat.revision.to_string()));
        f.insert("sites".into(), Value::List(sites));
        f.insert("revision".into(), Value::Number(cat.revision as f64));
        Ok(sites_schema().object(f))
    }
}

type Rpc<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl provider_server::Provider for Provider {
    async fn get_metadata(
        &self,
        _: Request<pb::get_metadata::Request>,
    ) -> Rpc<pb::get_metadata::Response> {
        Ok(Response::new(pb::get_metadata::Response {
            server_capabilities: Some(pb::ServerCapabilities::default()),
            diagnostics: Vec::new(),
            data_sources: [SITES, SERVICES]
                .iter()
                .map(|t| pb::get_metadata::DataSourceMetadata {
                    type_name: t.to_string(),
                })
                .collect(),
            resources: [SITE, POLICY, BUNDLE]
                .iter()
                .map(|t| pb::get_metadata::ResourceMetadata {
                    type_name: t.to_string(),
                })
                .collect(),
        }))
    }

    async fn get_provider_schema(
        &self,
        _: Request<pb::get_provider_schema::Request>,
    ) -> Rpc<pb::get_provider_schema::Response> {
        Ok(Response::new(pb::get_provider_schema::Response {
            provider: Some(provider_schema().to_proto()),
            resource_schemas: [
                (SITE.to_string(), site_schema().to_proto()),
                (POLICY.to_string(), policy_schema().to_proto()),
                (BUNDLE.to_string(), bundle_schema().to_proto()),
            ]
            .into_iter()
            .collect(),
            data_source_schemas: [
                (SITES.to_string(), sites_schema().to_proto()),
                (SERVICES.to_string(), services_schema().to_proto()),
            ]
            .into_iter()
            .collect(),
            diagnostics: Vec::new(),
            server_capabilities: Some(pb::ServerCapabilities::default()),
        }))
    }

    async fn validate_provider_config(
        &self,
        req: Request<pb::validate_provider_config::Request>,
    ) -> Rpc<pb::validate_provider_config::Response> {
        let diagnostics = match decode(&req.into_inner().config, "provider configuration") {
            Ok(config) => match config.get("controllers") {
                Value::Null => Vec::new(),
                list => list
                    .to_string_list()
                    .map(|l| check_controllers(&l))
                    .unwrap_or_default(),
            },
            Err(d) => vec![d],
        };
        Ok(Response::new(pb::validate_provider_config::Response {
            diagnostics,
        }))
    }

    async fn validate_resource_config(
        &self,
        req: Request<pb::validate_resource_config::Request>,
    ) -> Rpc<pb::validate_resource_config::Response> {
        let r = req.into_inner();
        let diagnostics = match decode(&r.config, "configuration") {
            Ok(config) => match r.type_name.as_str() {
                SITE => Self::validate_site(&config),
                POLICY => Self::validate_policy(&config),
                BUNDLE => Self::validate_bundle(&config),
                other => vec![unknown_type(other)],
            },
            Err(d) => vec![d],
        };
        Ok(Response::new(pb::validate_resource_config::Response {
            diagnostics,
        }))
    }

    async fn validate_data_resource_config(
        &self,
        req: Request<pb::validate_data_resource_config::Request>,
    ) -> Rpc<pb::validate_data_resource_config::Response> {
        let r = req.into_inner();
        let diagnostics = if r.type_name == SITES || r.type_name == SERVICES {
            Vec::new()
        } else {
            vec![unknown_type(&r.type_name)]
        };
        Ok(Response::new(pb::validate_data_resource_config::Response {
            diagnostics,
        }))
    }

    async fn upgrade_resource_state(
        &self,
        req: Request<pb::upgrade_resource_state::Request>,
    ) -> Rpc<pb::upgrade_resource_state::Response> {
        let r = req.into_inner();
        let result = (|| {
            let block = resource_schema(&r.type_name).ok_or_else(|| unknown_type(&r.type_name))?;
            let raw = r.raw_state.unwrap_or_default();
            let json: serde_json::Value = serde_json::from_slice(&raw.json).map_err(|e| {
                error(
                    format!("the stored state of this {} is not JSON", r.type_name),
                    e.to_string(),
                )
            })?;
            // Schema version 0 is the only one so far: keep the attributes
            // the schema has, drop any others.
            Ok(block.object(fields(&Value::from_json(&json))))
        })();
        Ok(Response::new(match result {
            Ok(v) => pb::upgrade_resource_state::Response {
                upgraded_state: dv(&v),
                diagnostics: Vec::new(),
            },
            Err(d) => pb::upgrade_resource_state::Response {
                upgraded_state: None,
                diagnostics: vec![d],
            },
        }))
    }

    async fn configure_provider(
        &self,
        req: Request<pb::configure_provider::Request>,
    ) -> Rpc<pb::configure_provider::Response> {
        let diagnostics = match decode(&req.into_inner().config, "provider configuration") {
            Ok(config) => match Self::configure(&config) {
                Ok(client) => {
                    *self.client.write().await = Some(Arc::new(client));
                    Vec::new()
                }
                Err(d) => d,
            },
            Err(d) => vec![d],
        };
        Ok(Response::new(pb::configure_provider::Response {
            diagnostics,
        }))
    }

    async fn read_resource(
        &self,
        req: Request<pb::read_resource::Request>,
    ) -> Rpc<pb::read_resource::Response> {
        let r = req.into_inner();
        let result = async {
            let state = decode(&r.current_state, "state")?;
            if state.is_null() {
                return Ok(Value::Null);
            }
            match r.type_name.as_str() {
                SITE => self.read_site(&state).await,
                POLICY => self.read_policy(&state).await,
                BUNDLE => self.read_bundle(&state).await,
                other => Err(unknown_type(other)),
            }
        }
        .await;
        Ok(Response::new(match result {
            Ok(v) => pb::read_resource::Response {
                new_state: dv(&v),
                diagnostics: Vec::new(),
                private: r.private,
            },
            Err(d) => pb::read_resource::Response {
                new_state: r.current_state,
                diagnostics: vec![d],
                private: r.private,
            },
        }))
    }

    async fn plan_resource_change(
        &self,
        req: Request<pb::plan_resource_change::Request>,
    ) -> Rpc<pb::plan_resource_change::Response> {
        let r = req.into_inner();
        let result = (|| {
            let prior = decode(&r.prior_state, "prior state")?;
            let proposed = decode(&r.proposed_new_state, "proposed state")?;
            if proposed.is_null() {
                return Ok((Value::Null, Vec::new()));
            }
            match r.type_name.as_str() {
                SITE => Ok(Self::plan_site(&prior, &proposed)),
                POLICY => Ok(Self::plan_policy(&prior, &proposed)),
                BUNDLE => Ok(Self::plan_bundle(&prior, &proposed)),
                other => Err(unknown_type(other)),
            }
        })();
        Ok(Response::new(match result {
            Ok((planned, requires_replace)) => pb::plan_resource_change::Response {
                planned_state: dv(&planned),
                requires_replace,
                planned_private: r.prior_private,
                diagnostics: Vec::new(),
            },
            Err(d) => pb::plan_resource_change::Response {
                planned_state: None,
                requires_replace: Vec::new(),
                planned_private: Vec::new(),
                diagnostics: vec![d],
            },
        }))
    }

    async fn apply_resource_change(
        &self,
        req: Request<pb::apply_resource_change::Request>,
    ) -> Rpc<pb::apply_resource_change::Response> {
        let r = req.into_inner();
        let result = async {
            let prior = decode(&r.prior_state, "prior state")?;
            let planned = decode(&r.planned_state, "planned state")?;
            match r.type_name.as_str() {
                SITE => self.apply_site(&prior, &planned).await,
                POLICY => self.apply_policy(&prior, &planned).await,
                BUNDLE => self.apply_bundle(&planned).await,
                other => Err(unknown_type(other)),
            }
        }
        .await;
        Ok(Response::new(match result {
            Ok(v) => pb::apply_resource_change::Response {
                new_state: dv(&v),
                private: r.planned_private,
                diagnostics: Vec::new(),
            },
            // Nothing changed: the prior state stands.
            Err(d) => pb::apply_resource_change::Response {
                new_state: r.prior_state,
                private: Vec::new(),
                diagnostics: vec![d],
            },
        }))
    }

    async fn import_resource_state(
        &self,
        req: Request<pb::import_resource_state::Request>,
    ) -> Rpc<pb::import_resource_state::Response> {
        let r = req.into_inner();
        Ok(Response::new(
            match self.import(&r.type_name, &r.id).await {
                Ok(v) => pb::import_resource_state::Response {
                    imported_resources: vec![pb::import_resource_state::ImportedResource {
                        type_name: r.type_name,
                        state: dv(&v),
                        private: Vec::new(),
                    }],
                    diagnostics: Vec::new(),
                },
                Err(d) => pb::import_resource_state::Response {
                    imported_resources: Vec::new(),
                    diagnostics: vec![d],
                },
            },
        ))
    }

    async fn read_data_source(
        &self,
        req: Request<pb::read_data_source::Request>,
    ) -> Rpc<pb::read_data_source::Response> {
        let r = req.into_inner();
        let result = match r.type_name.as_str() {
            SITES => self.read_sites().await,
            SERVICES => match decode(&r.config, "configuration") {
                Ok(config) => self.read_services(&config).await,
                Err(d) => Err(d),
            },
            other => Err(unknown_type(other)),
        };
        Ok(Response::new(match result {
            Ok(v) => pb::read_data_source::Response {
                state: dv(&v),
                diagnostics: Vec::new(),
            },
            Err(d) => pb::read_data_source::Response {
                state: None,
                diagnostics: vec![d],
            },
        }))
    }

    async fn get_functions(
        &self,
        _: Request<pb::get_functions::Request>,
    ) -> Rpc<pb::get_functions::Response> {
        Ok(Response::new(pb::get_functions::Response::default()))
    }

    async fn stop_provider(
        &self,
        _: Request<pb::stop_provider::Request>,
    ) -> Rpc<pb::stop_provider::Response> {
        self.stop.send_replace(true);
        Ok(Response::new(pb::stop_provider::Response::default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(pairs: &[(&str, Value)]) -> Value {
        Value::Map(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    }

    const DOC: &str = "apiVersion: causeway.dev/v1alpha1\nkind: TrafficSplit\nmetadata: {name: canary, namespace: shop}\nspec:\n  service: payments\n  weights: {east: 99, west: 1}\n";

    #[test]
    fn a_new_site_is_planned_with_the_token_unknown_and_the_default_lifetime() {
        let proposed = site_schema().object(fields(&obj(&[("name", Value::string("east"))])));
        let (planned, replace) = Provider::plan_site(&Value::Null, &proposed);
        assert!(replace.is_empty());
        assert_eq!(planned.get("id").as_str(), Some("east"));
        assert_eq!(planned.get("join_token"), &Value::Unknown);
        assert_eq!(planned.get("token_ttl_seconds").as_f64(), Some(3600.0));
        assert_eq!(planned.get("joined").as_bool(), Some(false));
    }

    #[test]
    fn renaming_a_site_replaces_it_new_labels_replace_only_an_invitation_and_a_new_lifetime_neither(
    ) {
        let prior = site_schema().object(fields(&obj(&[
            ("name", Value::string("east")),
            ("token_ttl_seconds", Value::Number(3600.0)),
            ("join_token", Value::string("tok")),
        ])));
        let mut f = fields(&prior);
        f.insert("token_ttl_seconds".into(), Value::Number(60.0));
        let (planned, replace) = Provider::plan_site(&prior, &Value::Map(f.clone()));
        assert!(replace.is_empty());
        assert_eq!(planned.get("join_token").as_str(), Some("tok"));
        f.insert("name".into(), Value::string("west"));
        let (_, replace) = Provider::plan_site(&prior, &Value::Map(f.clone()));
        assert_eq!(replace, vec![path("name")]);
        f.insert("name".into(), Value::string("east"));
        f.insert("labels".into(), obj(&[("region", Value::string("eu"))]));
        let (_, replace) = Provider::plan_site(&prior, &Value::Map(f.clone()));
        assert_eq!(replace, vec![path("labels")]);
        // Once the site has joined, new labels are an update in place.
        let mut joined = fields(&prior);
        joined.insert("joined".into(), Value::Bool(true));
        let mut g = f.clone();
        g.insert("joined".into(), Value::Bool(true));
        let (_, replace) = Provider::plan_site(&Value::Map(joined), &Value::Map(g));
        assert!(replace.is_empty());
    }

    #[test]
    fn a_policy_plan_names_it_and_keeps_the_revision_only_while_the_content_is_the_same() {
        let proposed = policy_schema().object(fields(&obj(&[("document", Value::string(DOC))])));
        let (planned, _) = Provider::plan_policy(&Value::Null, &proposed);
        assert_eq!(planned.get("id").as_str(), Some("TrafficSplit/shop/canary"));
        assert_eq!(planned.get("revision"), &Value::Unknown);

        let mut prior = fields(&planned);
        prior.insert("revision".into(), Value::Number(7.0));
        let prior = Value::Map(prior);
        // The same policy written as JSON: same content, same revision.
        let as_json = PolicyDoc::parse(DOC).unwrap().json.to_string();
        let proposed =
            policy_schema().object(fields(&obj(&[("document", Value::string(&as_json))])));
        let (planned, replace) = Provider::plan_policy(&prior, &proposed);
        assert_eq!(planned.get("revision").as_f64(), Some(7.0));
        assert!(replace.is_empty());
        // New weights: an update in place.
        let changed = DOC.replace("east: 99, west: 1", "east: 50, west: 50");
        let proposed =
            policy_schema().object(fields(&obj(&[("document", Value::string(&changed))])));
        let (planned, replace) = Provider::plan_policy(&prior, &proposed);
        assert_eq!(planned.get("revision"), &Value::Unknown);
        assert!(replace.is_empty());
        // Another name: a different policy, so a replacement.
        let renamed = DOC.replace("name: canary", "name: canary2");
        let proposed =
            policy_schema().object(fields(&obj(&[("document", Value::string(&renamed))])));
        let (_, replace) = Provider::plan_policy(&prior, &proposed);
        assert_eq!(replace, vec![path("document")]);
    }

    #[test]
    fn invalid_configuration_is_named_by_attribute() {
        let d = Provider::validate_site(&obj(&[
            ("name", Value::string("East_1")),
            ("token_ttl_seconds", Value::Number(0.5)),
        ]));
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].attribute, Some(path("name")));
        assert_eq!(d[1].attribute, Some(path("token_ttl_seconds")));
        let bad = DOC.replace("weights: {east: 99, west: 1}", "weights: {}");
        let d = Provider::validate_policy(&obj(&[("document", Value::string(&bad))]));
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].attribute, Some(path("document")));
        assert!(d[0].detail.contains("spec.weights"), "{}", d[0].detail);
        let two = format!("{DOC}---\n{DOC}");
        let d = Provider::validate_policy(&obj(&[("document", Value::string(&two))]));
        assert!(d[0].detail.contains("exactly one"), "{}", d[0].detail);
    }

    #[test]
    fn provider_configuration_errors_name_the_attribute_and_the_fix() {
        let e = Provider::configure(&obj(&[
            ("controllers", Value::string_list(&["nowhere"])),
            ("credentials_dir", Value::string("/nonexistent")),
        ]))
        .err()
        .unwrap();
        assert_eq!(e[0].attribute, Some(path("controllers")));
        assert!(e[0].summary.contains("not host:port"));
        assert_eq!(e[1].attribute, Some(path("credentials_dir")));
        let e = Provider::configure(&obj(&[("ca_pem", Value::string("x"))]))
            .err()
            .unwrap();
        assert!(e[0].summary.contains("all of ca_pem, cert_pem and key_pem"));
        let e = Provider::configure(&obj(&[("controllers", Value::Unknown)]))
            .err()
            .unwrap();
        assert!(e[0].summary.contains("not known until apply"));
    }

    #[test]
    fn the_readme_example_is_a_valid_policy() {
        // terraform/README.md's FailoverPolicy, as yamlencode writes it.
        let doc = r#"{"apiVersion":"causeway.dev/v1alpha1","kind":"FailoverPolicy","metadata":{"name":"payments","namespace":"shop"},"spec":{"mode":"ordered","service":"payments","sites":["eu-west","us-east"]}}"#;
        assert!(include_str!("../README.md").contains(r#"spec       = { service = "payments", mode = "ordered", sites = ["eu-west", "us-east"] }"#));
        let d = Provider::validate_policy(&obj(&[("document", Value::string(doc))]));
        assert!(d.is_empty(), "{d:?}");
    }

    #[test]
    fn a_bundle_must_hold_ca_certificates_and_its_fingerprints_are_planned() {
        let ca = causeway_api::identity::CertificateAuthority::generate("east").unwrap();
        let leaf = ca
            .issue(
                &"spiffe://east.causeway.local/gw".parse().unwrap(),
                &[],
                std::time::Duration::from_secs(3600),
            )
            .unwrap();
        let ok = obj(&[
            ("site", Value::string("east")),
            ("ca_pem", Value::string(&ca.cert_pem)),
        ]);
        assert!(Provider::validate_bundle(&ok).is_empty());
        let (planned, replace) =
            Provider::plan_bundle(&Value::Null, &bundle_schema().object(fields(&ok)));
        assert!(replace.is_empty());
        let prints = planned.get("fingerprints").to_string_list().unwrap();
        assert_eq!(prints, vec![identity::fingerprint(&ca.cert_der)]);
        let d = Provider::validate_bundle(&obj(&[("ca_pem", Value::string(&leaf.cert_pem))]));
        assert_eq!(d[0].attribute, Some(path("ca_pem")));
        assert!(
            d[0].detail.contains("must be a CA certificate"),
            "{}",
            d[0].detail
        );
        let d = Provider::validate_bundle(&obj(&[("ca_pem", Value::string("not PEM"))]));
        assert_eq!(d.len(), 1);
        let moved = obj(&[
            ("site", Value::string("west")),
            ("ca_pem", Value::string(&ca.cert_pem)),
        ]);
        let (_, replace) = Provider::plan_bundle(&planned, &bundle_schema().object(fields(&moved)));
        assert_eq!(replace, vec![path("site")]);
    }

    #[tokio::test]
    async fn a_stop_ends_a_call_in_flight_and_the_ones_after_it() {
        let p = Provider::new();
        let hung = p.guard(std::future::pending::<Result<(), Status>>());
        let stop = async {
            tokio::task::yield_now().await;
            p.stop.send_replace(true);
        };
        let (r, ()) = tokio::join!(hung, stop);
        assert_eq!(r.unwrap_err().code(), tonic::Code::Cancelled);
        let r = p.guard(std::future::pending::<Result<(), Status>>()).await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::Cancelled);
        // Before any stop, a call's own answer comes through.
        let q = Provider::new();
        assert_eq!(q.guard(async { Ok::<_, Status>(7) }).await.unwrap(), 7);
    }

    proptest::proptest! {
        /// Whatever shape of value arrives (wrong types, unknowns, extra or
        /// missing attributes), validation and planning answer without
        /// panicking, and a plan has exactly the schema's attributes.
        #[test]
        fn validation_and_plans_take_any_value(
            prior in crate::value::tests::value(),
            proposed in crate::value::tests::value(),
        ) {
            let _ = Provider::validate_site(&proposed);
            let _ = Provider::validate_policy(&proposed);
            let _ = Provider::validate_bundle(&proposed);
            let _ = Provider::configure(&proposed);
            for (planned, block) in [
                (Provider::plan_site(&prior, &proposed).0, site_schema()),
                (Provider::plan_policy(&prior, &proposed).0, policy_schema()),
                (Provider::plan_bundle(&prior, &proposed).0, bundle_schema()),
            ] {
                let Value::Map(m) = planned else { panic!("a plan is an object") };
                let names: Vec<&str> = block.attrs.iter().map(|a| a.name).collect();
                proptest::prop_assert_eq!(m.keys().map(String::as_str).collect::<Vec<_>>().len(), names.len());
                proptest::prop_assert!(names.iter().all(|n| m.contains_key(*n)));
            }
        }
    }

    #[test]
    fn services_are_grouped_across_sites_with_ports_and_endpoints_summed() {
        let export = |svc: &str, port: u32, healthy: u32, total: u32| api::Export {
            service: svc.into(),
            ports: vec![api::ServicePort {
                port,
                protocol: "tcp".into(),
                name: String::new(),
            }],
            healthy_endpoints: healthy,
            total_endpoints: total,
            ..Default::default()
        };
        let cat = api::CatalogSnapshot {
            exports: vec![
                api::SiteExports {
                    site: "west".into(),
                    exports: vec![export("shop/pay", 443, 1, 3), export("ops/log", 9000, 2, 2)],
                },
                api::SiteExports {
                    site: "east".into(),
                    exports: vec![export("shop/pay", 8443, 2, 2)],
                },
            ],
            ..Default::default()
        };
        let all = services_of(&cat, None);
        let Value::List(list) = &all else { panic!() };
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].get("service").as_str(), Some("ops/log"));
        let pay = &list[1];
        assert_eq!(pay.get("name").as_str(), Some("pay"));
        assert_eq!(pay.get("sites").to_string_list().unwrap(), ["east", "west"]);
        assert_eq!(
            pay.get("ports"),
            &Value::List(vec![Value::Number(443.0), Value::Number(8443.0)])
        );
        assert_eq!(pay.get("healthy_endpoints").as_f64(), Some(3.0));
        assert_eq!(pay.get("total_endpoints").as_f64(), Some(5.0));
        let Value::List(shop) = services_of(&cat, Some("shop")) else {
            panic!()
        };
        assert_eq!(shop.len(), 1);
    }

    #[test]
    fn policy_ids_are_kind_namespace_name() {
        assert_eq!(
            parse_policy_id("FailoverPolicy/shop/payments"),
            Some(("FailoverPolicy", "shop", "payments"))
        );
        assert_eq!(parse_policy_id("FailoverPolicy/shop"), None);
        assert_eq!(parse_policy_id("a/b/c/d"), None);
        assert_eq!(parse_policy_id("//x"), None);
    }
}
