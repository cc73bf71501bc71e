//! causeway-kube: the site agent's Kubernetes side, speaking the
//! Multi-Cluster Services API (KEP-1645, `multicluster.x-k8s.io/v1alpha1`).
//!
//! The agent's decisions are pure functions over Kubernetes objects, tested
//! with exact outputs:
//! - [`crd`]: the `ServiceExport` and `ServiceImport` resources (the upstream
//!   mcs-api schema);
//! - [`export`]: a `ServiceExport`, its `Service` and `EndpointSlice`s → what
//!   the site publishes to the federation, the endpoints its gateway forwards
//!   to, and the export's `Valid` condition;
//! - [`conflict`]: sites exporting one name differently → the oldest export
//!   wins, and every export's `Conflict` condition says why;
//! - [`import`]: a service imported into this site → its `ServiceImport`, the
//!   derived ClusterIP `Service` and the `EndpointSlice`s fronting this
//!   site's gateway pods;
//! - [`condition`]: merging conditions so `lastTransitionTime` moves only
//!   when a status does;
//! - [`policy`]: causeway's policy objects → what to forward to the
//!   controllers, what to delete, and each object's `Accepted` condition.
//!
//! The kube-rs shells run them: [`agent`] (the export, import and policy
//! loops), [`sync`] (the import writer) and [`lease`] (leader election).
//! [`install`] and [`chart`] render a site's manifests and Helm chart. Like
//! the gateway, the crate depends on `causeway-api` only (the controllers
//! are reached through its client, with the site's credential).

#![warn(missing_docs)]
#![recursion_limit = "256"]

pub mod agent;
pub mod chart;
pub mod condition;
pub mod conflict;
pub mod crd;
pub mod export;
/// Test support only: compiled for this crate's tests and with the
/// `fake-api` feature (which only test builds enable), never into a release
/// `causeway` binary.
#[cfg(any(test, feature = "fake-api"))]
pub mod fake;
pub mod import;
pub mod install;
pub mod lease;
pub mod policy;
pub mod sync;

/// The label EndpointSlices carry to name their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label naming the multi-cluster service a derived object belongs to.
pub const MCS_SERVICE_NAME_LABEL: &str = "multicluster.kubernetes.io/service-name";
/// The label naming the cluster (site) an EndpointSlice's endpoints are in.
pub const MCS_SOURCE_CLUSTER_LABEL: &str = "multicluster.kubernetes.io/source-cluster";
/// The label naming the controller that manages an EndpointSlice.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// What causeway writes in [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "causeway.dev/agent";
/// The label on every object the agent creates (garbage collection and
/// least-privilege selectors use it).
pub const APP_MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// What causeway writes in [`APP_MANAGED_BY_LABEL`].
pub const APP_MANAGED_BY: &str = "causeway";
