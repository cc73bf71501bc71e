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
//! Data sources: `causeway_sites` (the member sites), `causeway_services`
//! (the exported services, each with the sites exporting it) and
//! `causeway_kubernetes_manifests` (a site's manifests, as `causeway
//! install` renders them).

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

/// The site resource's type name.
pub const SITE: &str = "causeway_site";
/// The policy resource's type name.
pub const POLICY: &str = "causeway_policy";
/// The sites data source's type name.
pub const SITES: &str = "causeway_sites";
/// The services data source's type name.
pub const SERVICES: &str = "causeway_services";
/// The trust bundle resource's type name.
pub const BUNDLE: &str = "causeway_site_trust_bundle";
/// The Kubernetes manifests data source's type name.
pub const MANIFESTS: &str = "causeway_kubernetes_manifests";

mod bundle;
mod manifests;
mod policy;
mod services;
mod site;
#[cfg(test)]
mod tests;

pub use bundle::bundle_schema;
pub use manifests::manifests_schema;
pub use policy::policy_schema;
pub use services::services_schema;
pub use site::{site_schema, sites_schema};

/// The provider block's schema.
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

// ---- the provider ----

type FedClient = api::federation_client::FederationClient<tonic::transport::Channel>;

/// The longest one controller call may take, endpoints tried included.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The provider's state between Terraform's calls.
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
    /// An unconfigured provider.
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

    async fn import(&self, type_name: &str, id: &str) -> Result<Value, pb::Diagnostic> {
        match type_name {
            SITE => self.import_site(id).await,
            BUNDLE => self.import_bundle(id).await,
            POLICY => self.import_policy(id).await,
            other => Err(unknown_type(other)),
        }
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
                (MANIFESTS.to_string(), manifests_schema().to_proto()),
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
        let diagnostics = match r.type_name.as_str() {
            SITES | SERVICES => Vec::new(),
            MANIFESTS => match decode(&r.config, "configuration") {
                Ok(config) => manifests::validate_manifests(&config),
                Err(d) => vec![d],
            },
            other => vec![unknown_type(other)],
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
            SITES => self.read_sites().await.map_err(|d| vec![d]),
            SERVICES => match decode(&r.config, "configuration") {
                Ok(config) => self.read_services(&config).await.map_err(|d| vec![d]),
                Err(d) => Err(vec![d]),
            },
            MANIFESTS => match decode(&r.config, "configuration") {
                Ok(config) => manifests::read_manifests(&config),
                Err(d) => Err(vec![d]),
            },
            other => Err(vec![unknown_type(other)]),
        };
        Ok(Response::new(match result {
            Ok(v) => pb::read_data_source::Response {
                state: dv(&v),
                diagnostics: Vec::new(),
            },
            Err(diagnostics) => pb::read_data_source::Response {
                state: None,
                diagnostics,
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
