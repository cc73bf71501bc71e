//! A service imported into this site → its `ServiceImport`, a derived
//! `Service` and the `EndpointSlice`s behind it (MCS KEP-1645: importing
//! clusters get a ServiceImport; the implementation chooses how traffic
//! reaches the exporters).
//!
//! A ClusterSetIP import gets a selector-less ClusterIP Service whose
//! EndpointSlices point at this site's gateway pods, on the port each
//! gateway listens on for that service port: an ordinary pod reaches the
//! remote service through its own cluster's Service network, and the mesh
//! DNS answers the derived Service's ClusterIP. A headless import gets a
//! headless derived Service with one EndpointSlice per exporting site
//! holding that site's ready endpoints.

use std::collections::BTreeMap;
use std::net::IpAddr;

use causeway_api::catalog::CatalogView;
use causeway_api::model::{import_port, vip_for, Protocol, ServiceKey};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sha2::{Digest, Sha256};

use crate::conflict::{winner, Claim};
use crate::crd::{
    ClusterStatus, ImportPort, ImportType, ServiceImport, ServiceImportSpec, ServiceImportStatus,
};
use crate::export::{Port, ReadyEndpoint, SessionAffinity};
use crate::{
    APP_MANAGED_BY, APP_MANAGED_BY_LABEL, MANAGED_BY, MANAGED_BY_LABEL, MCS_SERVICE_NAME_LABEL,
    MCS_SOURCE_CLUSTER_LABEL, SERVICE_NAME_LABEL,
};

/// A service of the clusterset, as this site imports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// `<namespace>/<name>`.
    pub key: ServiceKey,
    /// No ClusterSetIP: callers reach the endpoints directly.
    pub headless: bool,
    /// Session affinity (the winning export's).
    pub session_affinity: SessionAffinity,
    /// The ports (merged across the exporting sites).
    pub ports: Vec<Port>,
    /// The exporting sites, by name.
    pub clusters: Vec<String>,
    /// The ClusterIP the derived Service asks for: the service's address
    /// in the site's ClusterSetIP range (the same address the mesh DNS
    /// answers), or none to let Kubernetes allocate one.
    pub requested_ip: Option<IpAddr>,
    /// The derived Service's ClusterIP once Kubernetes has allocated it.
    pub cluster_ip: Option<String>,
    /// For a headless import: each exporting site's ready endpoints.
    pub endpoints: Vec<(String, ReadyEndpoint)>,
}

/// This site's gateway pods, where imported ClusterSetIP services are
/// served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gateways {
    /// This site's name.
    pub site: String,
    /// The ready gateway pods' IPs.
    pub pod_ips: Vec<IpAddr>,
    /// The port each gateway listens on for an imported service port.
    pub listen_ports: BTreeMap<(ServiceKey, u16), u16>,
}

/// The services imported into this site: every service an available
/// member site exports, with the ports merged across the exporting sites,
/// and the session affinity of the oldest export (the one that wins a
/// conflict). With a ClusterSetIP `range` (`base`, prefix length), each
/// ClusterSetIP service asks for its address there (see
/// [`causeway_api::model::vip_for`]).
pub fn imports(view: &CatalogView, range: Option<(IpAddr, u8)>) -> Vec<Imported> {
    view.services()
        .into_values()
        .map(|svc| {
            let claims: Vec<Claim> = svc
                .exporters
                .iter()
                .filter_map(|(site, _)| {
                    let e = view
                        .exports
                        .get(site.as_str())?
                        .iter()
                        .find(|e| e.service == svc.key.as_str())?;
                    Some(Claim::published(site.as_str(), e))
                })
                .collect();
            let session_affinity =
                winner(&claims).map_or_else(Default::default, |c| c.session_affinity);
            Imported {
                headless: svc.headless,
                session_affinity,
                ports: svc.ports.iter().filter_map(Port::from_pb).collect(),
                clusters: svc.exporters.iter().map(|(s, _)| s.to_string()).collect(),
                requested_ip: range
                    .filter(|_| !svc.headless)
                    .and_then(|(base, prefix)| vip_for(base, prefix, svc.vip_index)),
                cluster_ip: None,
                endpoints: svc
                    .endpoints
                    .iter()
                    .filter_map(|(site, e)| {
                        Some((
                            site.to_string(),
                            ReadyEndpoint {
                                ip: e.address.parse().ok()?,
                                hostname: (!e.hostname.is_empty()).then(|| e.hostname.clone()),
                            },
                        ))
                    })
                    .collect(),
                key: svc.key,
            }
        })
        .collect()
}

/// The port this site's gateways listen on for each imported ClusterSetIP
/// service port (the same rule the gateway follows,
/// [`causeway_api::model::import_port`]).
pub fn listen_ports(view: &CatalogView, base: u16) -> BTreeMap<(ServiceKey, u16), u16> {
    let mut out = BTreeMap::new();
    for svc in view.services().into_values().filter(|s| !s.headless) {
        for (i, p) in svc.ports.iter().enumerate() {
            let (Ok(port), Some(listen)) =
                (u16::try_from(p.port), import_port(base, svc.vip_index, i))
            else {
                continue;
            };
            out.insert((svc.key.clone(), port), listen);
        }
    }
    out
}

/// The derived Service's name: `cw-<hash>-<name>`, a DNS label of at most
/// 63 characters that no user Service is likely to have.
pub fn derived_name(key: &ServiceKey) -> String {
    let hash = hex::encode(Sha256::digest(key.to_string().as_bytes()));
    let mut name = format!("cw-{}-{}", &hash[..8], key.name());
    name.truncate(63);
    name.trim_end_matches('-').to_string()
}

fn labels(key: &ServiceKey) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MCS_SERVICE_NAME_LABEL.to_string(), key.name().to_string()),
        (APP_MANAGED_BY_LABEL.to_string(), APP_MANAGED_BY.to_string()),
    ])
}

fn app_protocol(p: Protocol) -> Option<String> {
    match p {
        Protocol::Tcp => None,
        Protocol::Http => Some("http".into()),
        Protocol::Http2 => Some("kubernetes.io/h2c".into()),
    }
}

fn affinity(s: SessionAffinity) -> Option<String> {
    match s {
        SessionAffinity::None => None,
        SessionAffinity::ClientIp => Some("ClientIP".into()),
    }
}

/// The `ServiceImport` for `imp` (named after the service).
pub fn service_import(imp: &Imported) -> ServiceImport {
    let mut si = ServiceImport::new(
        imp.key.name(),
        ServiceImportSpec {
            ports: imp
                .ports
                .iter()
                .map(|p| ImportPort {
                    name: (!p.name.is_empty()).then(|| p.name.clone()),
                    protocol: "TCP".into(),
                    app_protocol: app_protocol(p.protocol),
                    port: i32::from(p.port),
                })
                .collect(),
            ips: if imp.headless {
                Vec::new()
            } else {
                imp.cluster_ip.iter().cloned().collect()
            },
            type_: if imp.headless {
                ImportType::Headless
            } else {
                ImportType::ClusterSetIP
            },
            session_affinity: affinity(imp.session_affinity),
        },
    );
    si.metadata.namespace = Some(imp.key.namespace().to_string());
    si.metadata.labels = Some(labels(&imp.key));
    si.status = Some(ServiceImportStatus {
        clusters: imp
            .clusters
            .iter()
            .map(|c| ClusterStatus { cluster: c.clone() })
            .collect(),
    });
    si
}

/// The derived Service: selector-less, owned by the ServiceImport
/// (`owner`), ClusterIP (targeting the gateways' listen ports) or headless.
pub fn derived_service(imp: &Imported, gw: &Gateways, owner: Option<OwnerReference>) -> Service {
    let ports = imp
        .ports
        .iter()
        .map(|p| ServicePort {
            name: (!p.name.is_empty()).then(|| p.name.clone()),
            port: i32::from(p.port),
            protocol: Some("TCP".into()),
            app_protocol: app_protocol(p.protocol),
            target_port: Some(IntOrString::Int(i32::from(target_port(imp, gw, p)))),
            ..Default::default()
        })
        .collect();
    Service {
        metadata: ObjectMeta {
            name: Some(derived_name(&imp.key)),
            namespace: Some(imp.key.namespace().to_string()),
            labels: Some(labels(&imp.key)),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: if imp.headless {
                Some("None".to_string())
            } else {
                imp.requested_ip.map(|ip| ip.to_string())
            },
            ports: Some(ports),
            session_affinity: affinity(imp.session_affinity),
            ..Default::default()
        }),
        status: None,
    }
}

/// Where a port's traffic goes: the gateway's listen port for a
/// ClusterSetIP import, the port itself for a headless one (callers reach
/// the endpoints directly).
fn target_port(imp: &Imported, gw: &Gateways, p: &Port) -> u16 {
    if imp.headless {
        p.port
    } else {
        gw.listen_ports
            .get(&(imp.key.clone(), p.port))
            .copied()
            .unwrap_or(p.port)
    }
}

/// The derived Service's EndpointSlices, owned by it (`owner`): the
/// gateway pods (one slice per address family) for a ClusterSetIP import,
/// one slice per exporting site and family for a headless one.
pub fn endpoint_slices(
    imp: &Imported,
    gw: &Gateways,
    owner: Option<OwnerReference>,
) -> Vec<EndpointSlice> {
    let groups: BTreeMap<(String, &'static str), Vec<ReadyEndpoint>> = if imp.headless {
        let mut g: BTreeMap<(String, &'static str), Vec<ReadyEndpoint>> = BTreeMap::new();
        for (site, e) in &imp.endpoints {
            g.entry((site.clone(), family(e.ip)))
                .or_default()
                .push(e.clone());
        }
        g
    } else {
        let mut g: BTreeMap<(String, &'static str), Vec<ReadyEndpoint>> = BTreeMap::new();
        for ip in &gw.pod_ips {
            g.entry((gw.site.clone(), family(*ip)))
                .or_default()
                .push(ReadyEndpoint {
                    ip: *ip,
                    hostname: None,
                });
        }
        g
    };
    let derived = derived_name(&imp.key);
    groups
        .into_iter()
        .map(|((site, fam), mut eps)| {
            eps.sort();
            let mut l = labels(&imp.key);
            l.insert(SERVICE_NAME_LABEL.into(), derived.clone());
            l.insert(MCS_SOURCE_CLUSTER_LABEL.into(), site.clone());
            l.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
            let mut name = format!("{derived}-{site}-{}", fam.to_ascii_lowercase());
            name.truncate(253);
            EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(name),
                    namespace: Some(imp.key.namespace().to_string()),
                    labels: Some(l),
                    owner_references: owner.clone().map(|o| vec![o]),
                    ..Default::default()
                },
                address_type: fam.to_string(),
                endpoints: eps
                    .into_iter()
                    .map(|e| Endpoint {
                        addresses: vec![e.ip.to_string()],
                        hostname: e.hostname,
                        conditions: Some(EndpointConditions {
                            ready: Some(true),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
                ports: Some(
                    imp.ports
                        .iter()
                        .map(|p| EndpointPort {
                            name: Some(p.name.clone()),
                            port: Some(i32::from(target_port(imp, gw, p))),
                            protocol: Some("TCP".into()),
                            app_protocol: app_protocol(p.protocol),
                        })
                        .collect(),
                ),
            }
        })
        .collect()
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

#[cfg(test)]
mod tests;
