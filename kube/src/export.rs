//! A `ServiceExport`, its `Service` and the Service's `EndpointSlice`s →
//! what this site publishes to the federation (ports, ready endpoints per
//! zone, the ready endpoints of a headless service), the endpoints its
//! gateway forwards to, and the export's `Valid` condition (MCS KEP-1645:
//! a ServiceExport names a Service of the same name and namespace).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use causeway_api::model::{Protocol, ServiceKey};
use causeway_api::pb;
use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;

use crate::condition::Want;
use crate::crd::ServiceExport;
use crate::SERVICE_NAME_LABEL;

/// Most ready endpoints a headless export publishes (the controller's
/// bound on one export).
pub const MAX_HEADLESS_ENDPOINTS: usize = 256;

/// Whether callers stick to one endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum SessionAffinity {
    /// Each connection may go anywhere.
    #[default]
    None,
    /// Connections from one client address go to one endpoint.
    ClientIp,
}

/// One exported port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Port {
    /// The port's name, or empty (allowed when it is the only one).
    pub name: String,
    /// The port callers use.
    pub port: u16,
    /// How causeway forwards it (from the port's `appProtocol`).
    pub protocol: Protocol,
}

impl Port {
    /// A port as the federation's catalog holds it; `None` when it is not
    /// a valid port or protocol.
    pub fn from_pb(p: &causeway_api::pb::ServicePort) -> Option<Self> {
        Some(Port {
            name: p.name.clone(),
            port: u16::try_from(p.port).ok()?,
            protocol: p.protocol.parse().ok()?,
        })
    }
}

/// Ready and total endpoints in one zone ("" when the endpoints name none:
/// the site's own zone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneCount {
    /// The zone.
    pub zone: String,
    /// Endpoints ready to serve.
    pub ready: u32,
    /// All endpoints.
    pub total: u32,
}

/// A ready endpoint of a headless export.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReadyEndpoint {
    /// Its address.
    pub ip: IpAddr,
    /// Its hostname (a StatefulSet pod's), if any.
    pub hostname: Option<String>,
}

/// What this site exports for one `ServiceExport`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteExport {
    /// `<namespace>/<name>`.
    pub key: ServiceKey,
    /// The Service has no cluster IP (`clusterIP: None`).
    pub headless: bool,
    /// The Service's session affinity.
    pub session_affinity: SessionAffinity,
    /// The ports, by number.
    pub ports: Vec<Port>,
    /// Ready endpoints.
    pub ready: u32,
    /// All endpoints.
    pub total: u32,
    /// The same per zone, by zone name.
    pub zones: Vec<ZoneCount>,
    /// Ready endpoints, for a headless export (empty otherwise).
    pub endpoints: Vec<ReadyEndpoint>,
    /// The zone of each endpoint that names one.
    pub zone_of: BTreeMap<IpAddr, String>,
    /// When the ServiceExport was created, ms since the epoch (0 when the
    /// API server did not say): the oldest export wins a conflict.
    pub exported_at_ms: u64,
    /// Where the gateway forwards each port: the ready endpoints on the
    /// EndpointSlice port of the same name.
    pub targets: BTreeMap<u16, Vec<SocketAddr>>,
}

/// What the agent makes of one `ServiceExport`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Export it.
    Export(SiteExport),
    /// It cannot be exported; the `Valid` condition says why.
    Invalid {
        /// One CamelCase word.
        reason: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
}

impl Decision {
    /// The export's `Valid` condition.
    pub fn valid_condition(&self) -> Want {
        match self {
            Decision::Export(e) => Want {
                type_: "Valid",
                status: true,
                reason: "Valid",
                message: format!(
                    "Service {} is exported: {} of {} endpoints ready",
                    e.key, e.ready, e.total
                ),
            },
            Decision::Invalid { reason, message } => Want {
                type_: "Valid",
                status: false,
                reason,
                message: message.clone(),
            },
        }
    }
}

/// Decides what to export for `export`, given the Service of the same name
/// (if any) and EndpointSlices (only those labelled with the Service's name
/// are read; the same endpoint in two slices counts once).
pub fn decide(
    export: &ServiceExport,
    service: Option<&Service>,
    slices: &[EndpointSlice],
) -> Decision {
    let ns = export.namespace().unwrap_or_default();
    let name = export.name_any();
    let key: ServiceKey = match format!("{ns}/{name}").parse() {
        Ok(k) => k,
        Err(e) => return invalid("NameInvalid", format!("{e}")),
    };
    let Some(service) = service else {
        return invalid(
            "ServiceNotFound",
            format!("Service {key} does not exist: create it, or delete this ServiceExport"),
        );
    };
    let spec = service.spec.clone().unwrap_or_default();
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    if type_ == "ExternalName" {
        return invalid(
            "ServiceTypeInvalid",
            format!("Service {key} is of type ExternalName, which has no endpoints to export (MCS KEP-1645 exports ClusterIP and headless Services)"),
        );
    }
    let ports = match export_ports(&key, spec.ports.as_deref().unwrap_or_default()) {
        Ok(p) => p,
        Err(message) => return invalid("ServicePortsInvalid", message),
    };
    let headless = spec.cluster_ip.as_deref() == Some("None");
    let session_affinity = match spec.session_affinity.as_deref() {
        Some("ClientIP") => SessionAffinity::ClientIp,
        _ => SessionAffinity::None,
    };
    let own: Vec<&EndpointSlice> = slices
        .iter()
        .filter(|s| s.labels().get(SERVICE_NAME_LABEL) == Some(&name))
        .filter(|s| s.namespace().as_deref() == Some(ns.as_str()))
        .filter(|s| matches!(s.address_type.as_str(), "IPv4" | "IPv6"))
        .collect();
    let seen = endpoints(&own);
    let mut zones: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    for e in seen.values() {
        let z = zones.entry(e.zone.clone()).or_default();
        z.1 += 1;
        if e.ready {
            z.0 += 1;
        }
    }
    let ready = zones.values().map(|z| z.0).sum();
    let total = zones.values().map(|z| z.1).sum();
    let endpoints = if headless {
        seen.iter()
            .filter(|(_, e)| e.ready)
            .map(|(ip, e)| ReadyEndpoint {
                ip: *ip,
                hostname: e.hostname.clone(),
            })
            .take(MAX_HEADLESS_ENDPOINTS)
            .collect()
    } else {
        Vec::new()
    };
    let targets = ports
        .iter()
        .map(|p| (p.port, targets(&own, &p.name)))
        .collect();
    Decision::Export(SiteExport {
        key,
        headless,
        session_affinity,
        ports,
        ready,
        total,
        zones: zones
            .into_iter()
            .map(|(zone, (ready, total))| ZoneCount { zone, ready, total })
            .collect(),
        endpoints,
        zone_of: seen
            .iter()
            .filter(|(_, e)| !e.zone.is_empty())
            .map(|(ip, e)| (*ip, e.zone.clone()))
            .collect(),
        exported_at_ms: export
            .metadata
            .creation_timestamp
            .as_ref()
            .and_then(|t| u64::try_from(t.0.as_millisecond()).ok())
            .unwrap_or(0),
        targets,
    })
}

fn invalid(reason: &'static str, message: String) -> Decision {
    Decision::Invalid { reason, message }
}

/// The Service's ports as causeway exports them: TCP only (the tunnels
/// carry TCP), the protocol from `appProtocol`.
fn export_ports(key: &ServiceKey, ports: &[ServicePort]) -> Result<Vec<Port>, String> {
    if ports.is_empty() {
        return Err(format!("Service {key} has no ports to export"));
    }
    let mut out = Vec::with_capacity(ports.len());
    for p in ports {
        let name = p.name.clone().unwrap_or_default();
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        if proto != "TCP" {
            return Err(format!("Service {key} port {} is {proto}: causeway tunnels carry TCP only; export a Service with TCP ports", p.port));
        }
        let Ok(port) = u16::try_from(p.port) else {
            return Err(format!("Service {key} port {} is not in 1-65535", p.port));
        };
        let protocol = match p.app_protocol.as_deref() {
            Some("http") => Protocol::Http,
            Some("kubernetes.io/h2c") | Some("h2c") | Some("grpc") => Protocol::Http2,
            _ => Protocol::Tcp,
        };
        out.push(Port {
            name,
            port,
            protocol,
        });
    }
    out.sort();
    Ok(out)
}

/// One endpoint as the slices describe it.
#[derive(Debug, Clone)]
struct Seen {
    ready: bool,
    zone: String,
    hostname: Option<String>,
}

/// Every endpoint of the slices, by address (one per endpoint: its first
/// address); ready unless it says otherwise (the API's rule for a missing
/// `ready`).
fn endpoints(slices: &[&EndpointSlice]) -> BTreeMap<IpAddr, Seen> {
    let mut out = BTreeMap::new();
    for s in slices {
        for e in &s.endpoints {
            let Some(ip) = e.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            let ready = e.conditions.as_ref().and_then(|c| c.ready) != Some(false);
            let seen = out.entry(ip).or_insert(Seen {
                ready,
                zone: e.zone.clone().unwrap_or_default(),
                hostname: e.hostname.clone(),
            });
            // During a slice handover an endpoint may appear twice: ready
            // in either counts.
            seen.ready |= ready;
        }
    }
    out
}

/// The ready endpoints on the slice port named `port_name`.
fn targets(slices: &[&EndpointSlice], port_name: &str) -> Vec<SocketAddr> {
    let mut out = BTreeSet::new();
    for s in slices {
        let Some(port) = s
            .ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|p| p.name.as_deref().unwrap_or_default() == port_name)
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for e in &s.endpoints {
            if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            if let Some(ip) = e.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) {
                out.insert(SocketAddr::new(ip, port));
            }
        }
    }
    out.into_iter().collect()
}

impl SiteExport {
    /// The export as the federation API publishes it.
    pub fn to_pb(&self) -> pb::Export {
        pb::Export {
            service: self.key.to_string(),
            ports: self
                .ports
                .iter()
                .map(|p| pb::ServicePort {
                    port: u32::from(p.port),
                    protocol: p.protocol.as_str().to_string(),
                    name: p.name.clone(),
                })
                .collect(),
            healthy_endpoints: self.ready,
            total_endpoints: self.total,
            // Kubernetes endpoints carry no version here yet.
            subsets: Vec::new(),
            headless: self.headless,
            endpoints: self
                .endpoints
                .iter()
                .map(|e| pb::Endpoint {
                    address: e.ip.to_string(),
                    hostname: e.hostname.clone().unwrap_or_default(),
                })
                .collect(),
            zones: self
                .zones
                .iter()
                .map(|z| pb::ZoneHealth {
                    zone: z.zone.clone(),
                    healthy: z.ready,
                    total: z.total,
                })
                .collect(),
            vip_index: 0,
            exported_at_unix_ms: self.exported_at_ms,
            client_ip_affinity: self.session_affinity == SessionAffinity::ClientIp,
        }
    }
}

#[cfg(test)]
mod tests;
