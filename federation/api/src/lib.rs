//! causeway-api: the contract between causeway's parts.
//!
//! - [`pb`]: the gRPC API (generated from `proto/causeway.proto` with protox,
//!   no `protoc`);
//! - [`model`]: domain newtypes (`SiteName`, `ServiceKey`, `TrustDomain`,
//!   `SpiffeId`, `Revision`) that validate at the edge;
//! - [`identity`] and [`trust`]: certificates, CSRs, and the SPIFFE
//!   verifiers that bind each trust domain to its own site's bundle;
//! - [`token`]: one-time join tokens;
//! - [`catalog`] and [`client`]: the Watch client and the live catalog view;
//! - [`trace`]: OpenTelemetry spans over OTLP, for gateways and controllers.
//! - [`version`]: the release and the protocol every wire format carries.
//!
//! It does not run Raft or serve anything: gateways, DNS servers and the
//! Terraform provider depend on this crate and never on the controller.

#![warn(missing_docs)]

pub mod catalog;
pub mod client;
pub mod clock;
pub mod config;
pub mod identity;
pub mod model;
pub mod policy;
pub mod reload;
pub mod sync;
pub mod token;
pub mod trace;
pub mod trust;
pub mod version;

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("causeway.v1");
}
