//! causeway's Terraform provider: member sites (join invitations), traffic
//! policies and the member list, managed through the federation
//! controller's admin API over mutual TLS. See terraform/README.md.

#![warn(missing_docs)]

pub mod plugin;
pub mod provider;
pub mod schema;
pub mod time;
pub mod tls;
pub mod value;

/// Terraform's plugin protocol 6 (the part this provider speaks).
#[allow(missing_docs)]
pub mod pb {
    tonic::include_proto!("tfplugin6");
}

/// The plugin host's controller service.
#[allow(missing_docs)]
pub mod host {
    tonic::include_proto!("plugin");
}
