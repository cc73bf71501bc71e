//! The routing table a gateway serves from, rebuilt on every catalog change
//! and read without locks by connection handlers.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use causeway_api::catalog::CatalogView;
use causeway_api::model::{vip_for, ServiceKey, SiteName, TrustDomain, TunnelAddr};

/// How to reach one remote site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteRoute {
    pub trust_domain: TrustDomain,
    /// One per gateway replica of the site, with its weight.
    pub tunnel_addrs: Vec<TunnelAddr>,
}

/// One imported (or local) service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRoute {
    pub vip: IpAddr,
    pub ports: Vec<u16>,
    /// Exporting sites and their healthy endpoint counts.
    pub exporters: Vec<(SiteName, u32)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    pub revision: u64,
    pub services: BTreeMap<ServiceKey, ServiceRoute>,
    pub sites: BTreeMap<SiteName, SiteRoute>,
}

impl Routes {
    pub fn build(view: &CatalogView, vip_base: IpAddr, vip_prefix: u8) -> Self {
        let mut services = BTreeMap::new();
        for (key, svc) in view.services() {
            if svc.headless {
                // No ClusterSetIP: callers reach the endpoints directly.
                continue;
            }
            let Some(vip) = vip_for(vip_base, vip_prefix, svc.vip_index) else {
                tracing::warn!(service = %key, index = svc.vip_index, "vip_range is too small for this service; enlarge it");
                continue;
            };
            let ports = svc
                .ports
                .iter()
                .filter_map(|p| u16::try_from(p.port).ok())
                .collect();
            services.insert(
                key,
                ServiceRoute {
                    vip,
                    ports,
                    exporters: svc.exporters,
                },
            );
        }
        let mut sites = BTreeMap::new();
        for (name, s) in &view.sites {
            let (Ok(name), Ok(td)) = (
                name.parse::<SiteName>(),
                s.trust_domain.parse::<TrustDomain>(),
            ) else {
                continue;
            };
            let tunnel_addrs = s
                .tunnel_addrs
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect();
            sites.insert(
                name,
                SiteRoute {
                    trust_domain: td,
                    tunnel_addrs,
                },
            );
        }
        Self {
            revision: view.revision.0,
            services,
            sites,
        }
    }

    /// Every outbound listener address and the service behind it.
    pub fn listeners(&self) -> BTreeMap<SocketAddr, (ServiceKey, u16)> {
        let mut out = BTreeMap::new();
        for (key, svc) in &self.services {
            for port in &svc.ports {
                out.insert(SocketAddr::new(svc.vip, *port), (key.clone(), *port));
            }
        }
        out
    }
}
