//! The Multi-Cluster Services resources, as the upstream mcs-api defines
//! them (`multicluster.x-k8s.io/v1alpha1`), derived from Rust types so the
//! CRD YAML is generated, not hand-written.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `ServiceExport`: marks the Service of the same name and namespace for
/// export to the clusterset. Upstream it has no spec at all (users write
/// just the metadata), which kube's derive cannot express, so the resource
/// is spelled out here; the agent writes only its status.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ServiceExport {
    /// Name, namespace, generation, creation time.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// What the agent reports.
    #[serde(default)]
    pub status: Option<ServiceExportStatus>,
}

impl ServiceExport {
    /// A ServiceExport for `name` (its namespace unset).
    pub fn new(name: &str) -> Self {
        Self {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            status: None,
        }
    }

    /// The CustomResourceDefinition, as upstream mcs-api ships it.
    pub fn crd() -> CustomResourceDefinition {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "serviceexports.multicluster.x-k8s.io"},
            "spec": {
                "group": "multicluster.x-k8s.io",
                "scope": "Namespaced",
                "names": {"kind": "ServiceExport", "listKind": "ServiceExportList",
                          "plural": "serviceexports", "singular": "serviceexport",
                          "shortNames": ["svcex"]},
                "versions": [{
                    "name": "v1alpha1", "served": true, "storage": true,
                    "subresources": {"status": {}},
                    "schema": {"openAPIV3Schema": {
                        "type": "object",
                        "description": "ServiceExport declares that the Service with the same name and namespace as this export should be consumable from other clusters.",
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "metadata": {"type": "object"},
                            "status": {
                                "type": "object",
                                "properties": {"conditions": {
                                    "type": "array",
                                    "x-kubernetes-list-type": "map",
                                    "x-kubernetes-list-map-keys": ["type"],
                                    "items": {
                                        "type": "object",
                                        "required": ["type", "status", "lastTransitionTime", "reason", "message"],
                                        "properties": {
                                            "type": {"type": "string", "maxLength": 316},
                                            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                                            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
                                            "lastTransitionTime": {"type": "string", "format": "date-time"},
                                            "reason": {"type": "string", "maxLength": 1024},
                                            "message": {"type": "string", "maxLength": 32768}
                                        }
                                    }
                                }}
                            }
                        }
                    }}
                }]
            }
        }))
        .expect("a well-formed CRD")
    }
}

impl k8s_openapi::Resource for ServiceExport {
    const API_VERSION: &'static str = "multicluster.x-k8s.io/v1alpha1";
    const GROUP: &'static str = "multicluster.x-k8s.io";
    const KIND: &'static str = "ServiceExport";
    const VERSION: &'static str = "v1alpha1";
    const URL_PATH_SEGMENT: &'static str = "serviceexports";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for ServiceExport {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl Serialize for ServiceExport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("ServiceExport", 4)?;
        st.serialize_field("apiVersion", <Self as k8s_openapi::Resource>::API_VERSION)?;
        st.serialize_field("kind", <Self as k8s_openapi::Resource>::KIND)?;
        st.serialize_field("metadata", &self.metadata)?;
        if let Some(status) = &self.status {
            st.serialize_field("status", status)?;
        }
        st.end()
    }
}

/// What the agent reports on a `ServiceExport`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceExportStatus {
    /// `Valid` and `Conflict` (see [`crate::export`] and [`crate::conflict`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// `ServiceImport`: a service of the clusterset, as this cluster sees it.
/// Written by the agent only.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "multicluster.x-k8s.io",
    version = "v1alpha1",
    kind = "ServiceImport",
    namespaced,
    status = "ServiceImportStatus",
    shortname = "svcim"
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportSpec {
    /// The service's ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ImportPort>,
    /// The clusterset IP(s): for causeway, the derived Service's ClusterIP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    /// `ClusterSetIP` or `Headless`.
    #[serde(rename = "type")]
    pub type_: ImportType,
    /// `None` or `ClientIP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<String>,
}

/// How a `ServiceImport` is reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ImportType {
    /// One virtual IP for the whole clusterset.
    #[default]
    ClusterSetIP,
    /// No virtual IP: DNS answers with the endpoints.
    Headless,
}

/// One port of a `ServiceImport`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImportPort {
    /// The port's name (required when there are several).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `TCP` (causeway tunnels carry TCP only).
    pub protocol: String,
    /// The application protocol (`http`, `kubernetes.io/h2c`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    /// The port number.
    pub port: i32,
}

/// What the agent reports on a `ServiceImport`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportStatus {
    /// The clusters (sites) that export the service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<ClusterStatus>,
}

/// One exporting cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    /// The cluster's (site's) name.
    pub cluster: String,
}

/// Where the generated CRDs are kept (relative to the repository root).
pub const CRDS_FILE: &str = "deploy/crds/multicluster.x-k8s.io.yaml";

/// The MCS CRDs as one multi-document YAML file, as `deploy/` ships it.
pub fn crds_yaml() -> String {
    use kube::CustomResourceExt;
    let docs = [ServiceExport::crd(), ServiceImport::crd()];
    let mut out = String::from(
        "# The Multi-Cluster Services CRDs (multicluster.x-k8s.io/v1alpha1).\n# Generated from kube/src/crd.rs: do not edit; a test fails when this is stale\n# (CAUSEWAY_BLESS=1 cargo test -p causeway-kube rewrites it).\n",
    );
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&d).expect("CRDs serialize"));
    }
    out
}

/// Where causeway's policy CRDs are kept.
pub const POLICY_CRDS_FILE: &str = "deploy/crds/causeway.dev.yaml";

/// causeway's policy CRDs (`causeway.dev/v1alpha1`) as YAML.
pub fn policy_crds_yaml() -> String {
    let mut out = String::from(
        "# causeway's traffic policy CRDs (causeway.dev/v1alpha1): the agent forwards\n# these objects to the federation.\n# Generated from kube/src/policy.rs: do not edit; a test fails when this is stale\n# (CAUSEWAY_BLESS=1 cargo test -p causeway-kube rewrites it).\n",
    );
    out.push_str(&crate::install::to_yaml(&crate::policy::crds()));
    out
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    #[test]
    fn the_crds_in_deploy_are_current() {
        for (file, want) in [
            (CRDS_FILE, crds_yaml()),
            (POLICY_CRDS_FILE, policy_crds_yaml()),
        ] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(file);
            if std::env::var_os("CAUSEWAY_BLESS").is_some() {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &want).unwrap();
            }
            let have = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                have == want,
                "{file} is stale: run CAUSEWAY_BLESS=1 cargo test -p causeway-kube, and review the diff"
            );
        }
    }

    use super::*;

    #[test]
    fn a_service_export_without_spec_reads_and_writes() {
        let json = serde_json::json!({
            "apiVersion": "multicluster.x-k8s.io/v1alpha1",
            "kind": "ServiceExport",
            "metadata": {"name": "web", "namespace": "shop"}
        });
        let se: ServiceExport = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(se.metadata.name.as_deref(), Some("web"));
        assert_eq!(serde_json::to_value(&se).unwrap(), json);
        use kube::Resource;
        assert_eq!(ServiceExport::plural(&()), "serviceexports");
        assert_eq!(
            ServiceExport::api_version(&()),
            "multicluster.x-k8s.io/v1alpha1"
        );
    }

    #[test]
    fn the_crds_are_the_mcs_api_ones() {
        let crd = ServiceExport::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("serviceexports.multicluster.x-k8s.io")
        );
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.versions[0].name, "v1alpha1");
        let crd = ServiceImport::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("serviceimports.multicluster.x-k8s.io")
        );
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"];
        assert_eq!(
            spec["type"]["enum"],
            serde_json::json!(["ClusterSetIP", "Headless"])
        );
        assert!(
            spec["ports"].is_object() && spec["ips"].is_object(),
            "{spec}"
        );
    }

    #[test]
    fn a_service_import_reads_and_writes_the_upstream_json() {
        let json = serde_json::json!({
            "apiVersion": "multicluster.x-k8s.io/v1alpha1",
            "kind": "ServiceImport",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "ClusterSetIP", "ips": ["10.96.0.7"],
                     "ports": [{"name": "http", "protocol": "TCP", "port": 80}]},
            "status": {"clusters": [{"cluster": "east"}]}
        });
        let si: ServiceImport = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(si.spec.type_, ImportType::ClusterSetIP);
        assert_eq!(si.spec.ports[0].port, 80);
        assert_eq!(si.status.as_ref().unwrap().clusters[0].cluster, "east");
        assert_eq!(serde_json::to_value(&si).unwrap(), json);
    }
}
