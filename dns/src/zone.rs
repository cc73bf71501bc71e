//! The mesh DNS zone, built from the catalog (pure; no sockets).
//!
//! Per the Kubernetes Multi-Cluster Services DNS specification (KEP-1645):
//! `<svc>.<ns>.svc.<zone>` has an A record with the ClusterSetIP, which on
//! causeway is the local gateway's outbound VIP for that service; each
//! named port has an SRV record `_<port>._<proto>.<svc>.<ns>.svc.<zone>`
//! (priority 0, weight 100, the port, target the service name); and
//! `dns-version.<zone>` has a TXT record with the spec version. Names that
//! exist (including empty non-terminals such as `svc.<zone>`) answer other
//! types with NODATA; unknown names inside the zone get NXDOMAIN with the
//! SOA; names outside it are REFUSED.
//!
//! A headless service (every exporter exports it headless) has no
//! ClusterSetIP: its name answers with the ready endpoint addresses of all
//! sites, each endpoint also has `<hostname>.<site>.<svc>.<ns>.svc.<zone>`
//! (the site name is the cluster ID), and each named port has one SRV
//! record per endpoint name. No record names a site's share of a service
//! (`<site>.<svc>...` has no records of its own), as the spec requires.
//! ClusterSetIPs and headless endpoints have PTR records.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::str::FromStr;

use causeway_api::catalog::CatalogView;
use causeway_api::model::vip_for;
use hickory_proto::rr::rdata::{A, AAAA, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};

fn address(ip: IpAddr) -> RData {
    match ip {
        IpAddr::V4(a) => RData::A(A(a)),
        IpAddr::V6(a) => RData::AAAA(AAAA(a)),
    }
}

/// The system-assigned hostname of an endpoint without one: its address
/// with dashes (`10-0-0-5`; IPv6 written out in full, `fd00-0-0-0-0-0-0-5`).
pub fn address_label(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.to_string().replace('.', "-"),
        IpAddr::V6(a) => a
            .segments()
            .iter()
            .map(|s| format!("{s:x}"))
            .collect::<Vec<_>>()
            .join("-"),
    }
}

/// MCS DNS specification version served in `dns-version.<zone>`.
pub const SPEC_VERSION: &str = "1.0.0";

/// What a zone is built with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneOptions {
    /// The zone's apex, e.g. `clusterset.local`.
    pub origin: String,
    /// TTL of positive answers, seconds.
    pub ttl: u32,
    /// TTL of negative answers (the SOA minimum).
    pub negative_ttl: u32,
    /// First address of the VIP range (the gateway's `vip_range`).
    pub vip_base: IpAddr,
    /// Prefix length of the VIP range.
    pub vip_prefix: u8,
}

/// The answer to one question.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer<'a> {
    /// These records.
    Records(&'a [Record]),
    /// The name exists, but has no records of the type asked.
    NoData,
    /// The name does not exist in the zone.
    NxDomain,
    /// The name is outside the zone (and nothing forwards it).
    Refused,
}

/// The records of the mesh zone, built from one catalog view.
#[derive(Debug, Clone)]
pub struct Zone {
    origin: LowerName,
    soa: Record,
    records: HashMap<(LowerName, RecordType), Vec<Record>>,
    /// Every name that exists: owners and their ancestors inside the zone.
    names: HashSet<LowerName>,
    /// PTR records of ClusterSetIPs and headless endpoints, by reverse name
    /// (outside the zone: only these names are answered there).
    reverse: HashMap<LowerName, Vec<Record>>,
    /// False until the first catalog snapshot arrived: answer SERVFAIL.
    pub ready: bool,
    /// The same answers, encoded for the fast path.
    pub wire: crate::fast::WireZone,
}

impl Zone {
    /// An empty zone that is not ready yet.
    pub fn empty(opts: &ZoneOptions) -> Result<Self, hickory_proto::ProtoError> {
        Self::with_serial(opts, 0)
    }

    fn with_serial(opts: &ZoneOptions, serial: u32) -> Result<Self, hickory_proto::ProtoError> {
        let origin = Name::from_str(&opts.origin)?.to_lowercase();
        let mut origin_fqdn = origin.clone();
        origin_fqdn.set_fqdn(true);
        let soa = Record::from_rdata(
            origin_fqdn.clone(),
            opts.negative_ttl,
            RData::SOA(SOA::new(
                Name::from_str("ns.dns")?.append_domain(&origin_fqdn)?,
                Name::from_str("hostmaster")?.append_domain(&origin_fqdn)?,
                serial,
                60,
                10,
                3600,
                opts.negative_ttl,
            )),
        );
        let mut names = HashSet::new();
        names.insert(LowerName::from(&origin_fqdn));
        Ok(Self {
            origin: LowerName::from(&origin_fqdn),
            soa,
            records: HashMap::new(),
            names,
            reverse: HashMap::new(),
            ready: false,
            wire: Default::default(),
        })
    }

    /// The zone for a catalog view.
    pub fn build(
        opts: &ZoneOptions,
        view: &CatalogView,
    ) -> Result<Self, hickory_proto::ProtoError> {
        let mut zone = Self::with_serial(opts, view.revision.0 as u32)?;
        zone.ready = view.synced;
        let origin: Name = zone.origin.clone().into();
        let version = Name::from_str("dns-version")?.append_domain(&origin)?;
        zone.add(Record::from_rdata(
            version,
            opts.ttl,
            RData::TXT(TXT::new(vec![SPEC_VERSION.to_string()])),
        ));
        for (key, svc) in view.services() {
            let owner = Name::from_str(&format!("{}.{}.svc", key.name(), key.namespace()))?
                .append_domain(&origin)?;
            // `(SRV owner, port)` of each named port.
            let mut named = Vec::new();
            for p in &svc.ports {
                let Ok(port) = u16::try_from(p.port) else {
                    continue;
                };
                if p.name.is_empty() {
                    continue;
                }
                // Names were checked as DNS labels by the controller; skip
                // rather than fail the zone if one is not.
                // The spec's <proto> is the transport: HTTP services are
                // `_<name>._tcp` too.
                let transport = if p.protocol.eq_ignore_ascii_case("udp") {
                    "udp"
                } else {
                    "tcp"
                };
                let Ok(srv_owner) = Name::from_str(&format!("_{}._{transport}", p.name))
                    .and_then(|n| n.append_domain(&owner))
                else {
                    continue;
                };
                named.push((srv_owner, port));
            }
            if svc.headless {
                zone.add_headless(opts, &owner, &named, &svc.endpoints);
                continue;
            }
            let Some(vip) = vip_for(opts.vip_base, opts.vip_prefix, svc.vip_index) else {
                continue;
            };
            for (srv_owner, port) in named {
                zone.add(Record::from_rdata(
                    srv_owner,
                    opts.ttl,
                    RData::SRV(SRV::new(0, 100, port, owner.clone())),
                ));
            }
            zone.add_ptr(opts, vip, &owner);
            zone.add(Record::from_rdata(owner, opts.ttl, address(vip)));
        }
        zone.wire = crate::fast::WireZone::build(
            &zone.origin,
            &zone.soa,
            zone.records.iter().map(|((n, t), r)| (n, *t, r.as_slice())),
            zone.names.iter(),
        );
        Ok(zone)
    }

    /// A headless service: its owner name answers with every ready
    /// endpoint's address; each endpoint gets
    /// `<hostname>.<site>.<svc>.<ns>.svc.<zone>`, and each named port an
    /// SRV record per endpoint name. With no ready endpoint nothing is
    /// added, so the name is NXDOMAIN, as the spec asks.
    fn add_headless(
        &mut self,
        opts: &ZoneOptions,
        owner: &Name,
        named: &[(Name, u16)],
        endpoints: &[(causeway_api::model::SiteName, causeway_api::pb::Endpoint)],
    ) {
        let mut addresses = std::collections::BTreeSet::new();
        let mut hosts = std::collections::BTreeSet::new();
        for (site, ep) in endpoints {
            let Ok(ip) = ep.address.parse::<IpAddr>() else {
                continue;
            };
            let label = if ep.hostname.is_empty() {
                address_label(ip)
            } else {
                ep.hostname.to_ascii_lowercase()
            };
            let Ok(host) =
                Name::from_str(&format!("{label}.{site}")).and_then(|n| n.append_domain(owner))
            else {
                continue;
            };
            if hosts.insert((host.clone(), ip)) {
                self.add(Record::from_rdata(host.clone(), opts.ttl, address(ip)));
                self.add_ptr(opts, ip, &host);
            }
            if addresses.insert(ip) {
                self.add(Record::from_rdata(owner.clone(), opts.ttl, address(ip)));
            }
        }
        let targets: std::collections::BTreeSet<&Name> = hosts.iter().map(|(h, _)| h).collect();
        for (srv_owner, port) in named {
            for target in &targets {
                self.add(Record::from_rdata(
                    srv_owner.clone(),
                    opts.ttl,
                    RData::SRV(SRV::new(0, 100, *port, (*target).clone())),
                ));
            }
        }
    }

    /// The PTR record for `ip` (the first name to claim an address keeps
    /// it: an address has one PTR).
    fn add_ptr(&mut self, opts: &ZoneOptions, ip: IpAddr, target: &Name) {
        let reverse = LowerName::from(Name::from(ip));
        self.reverse.entry(reverse.clone()).or_insert_with(|| {
            vec![Record::from_rdata(
                reverse.into(),
                opts.ttl,
                RData::PTR(PTR(target.clone())),
            )]
        });
    }

    fn add(&mut self, record: Record) {
        let owner = LowerName::from(&record.name);
        let mut n: Name = owner.clone().into();
        while n.num_labels() >= self.origin.num_labels() {
            self.names.insert(LowerName::from(&n));
            if n.num_labels() == 0 {
                break;
            }
            n = n.base_name();
        }
        self.records
            .entry((owner, record.record_type()))
            .or_default()
            .push(record);
    }

    /// The zone's SOA record (sent with negative answers).
    pub fn soa(&self) -> &Record {
        &self.soa
    }

    /// The answer to `qtype` for `name`.
    pub fn answer(&self, name: &LowerName, qtype: RecordType) -> Answer<'_> {
        if !self.origin.zone_of(name) {
            return match self.reverse.get(name) {
                Some(r) if qtype == RecordType::PTR => Answer::Records(r),
                Some(_) => Answer::NoData,
                None => Answer::Refused,
            };
        }
        if *name == self.origin && qtype == RecordType::SOA {
            return Answer::Records(std::slice::from_ref(&self.soa));
        }
        if let Some(r) = self.records.get(&(name.clone(), qtype)) {
            return Answer::Records(r);
        }
        if self.names.contains(name) {
            Answer::NoData
        } else {
            Answer::NxDomain
        }
    }
}

#[cfg(test)]
mod tests {
    use causeway_api::pb;

    use super::*;

    fn opts() -> ZoneOptions {
        ZoneOptions {
            origin: "clusterset.local".into(),
            ttl: 5,
            negative_ttl: 5,
            vip_base: "127.10.0.0".parse().unwrap(),
            vip_prefix: 16,
        }
    }

    fn view() -> CatalogView {
        CatalogView::from_snapshot(pb::CatalogSnapshot {
            revision: 3,
            sites: vec![pb::Site {
                name: "east".into(),
                available: true,
                ..Default::default()
            }],
            exports: vec![pb::SiteExports {
                site: "east".into(),
                exports: vec![pb::Export {
                    service: "shop/payments".into(),
                    ports: vec![
                        pb::ServicePort {
                            port: 9001,
                            protocol: "tcp".into(),
                            name: String::new(),
                        },
                        pb::ServicePort {
                            port: 8443,
                            protocol: "tcp".into(),
                            name: "https".into(),
                        },
                        pb::ServicePort {
                            port: 8080,
                            protocol: "http".into(),
                            name: "web".into(),
                        },
                    ],
                    healthy_endpoints: 1,
                    vip_index: 7,
                    ..Default::default()
                }],
            }],
            ..Default::default()
        })
    }

    fn name(s: &str) -> LowerName {
        LowerName::from(Name::from_str(s).unwrap())
    }

    #[test]
    fn answers_follow_the_mcs_rules() {
        let z = Zone::build(&opts(), &view()).unwrap();
        assert!(z.ready);
        match z.answer(&name("payments.shop.svc.clusterset.local."), RecordType::A) {
            Answer::Records(r) => {
                assert_eq!(r.len(), 1);
                assert_eq!(&r[0].data, &RData::A(A("127.10.0.7".parse().unwrap())));
                assert_eq!(r[0].ttl, 5);
            }
            other => panic!("{other:?}"),
        }
        // Case-insensitive.
        assert!(matches!(
            z.answer(&name("PAYMENTS.Shop.svc.clusterset.local."), RecordType::A),
            Answer::Records(_)
        ));
        assert_eq!(
            z.answer(
                &name("payments.shop.svc.clusterset.local."),
                RecordType::AAAA
            ),
            Answer::NoData
        );
        assert_eq!(
            z.answer(&name("shop.svc.clusterset.local."), RecordType::A),
            Answer::NoData
        );
        assert_eq!(
            z.answer(&name("cart.shop.svc.clusterset.local."), RecordType::A),
            Answer::NxDomain
        );
        assert_eq!(
            z.answer(&name("example.com."), RecordType::A),
            Answer::Refused
        );
        assert!(matches!(
            z.answer(&name("dns-version.clusterset.local."), RecordType::TXT),
            Answer::Records(_)
        ));
        assert!(matches!(
            z.answer(&name("clusterset.local."), RecordType::SOA),
            Answer::Records(_)
        ));
    }

    #[test]
    fn named_ports_get_srv_records() {
        let z = Zone::build(&opts(), &view()).unwrap();
        match z.answer(
            &name("_https._tcp.payments.shop.svc.clusterset.local."),
            RecordType::SRV,
        ) {
            Answer::Records(r) => {
                assert_eq!(r.len(), 1);
                let RData::SRV(srv) = &r[0].data else {
                    panic!("{:?}", r[0]);
                };
                assert_eq!((srv.priority, srv.weight, srv.port), (0, 100, 8443));
                assert_eq!(
                    srv.target.to_string(),
                    "payments.shop.svc.clusterset.local."
                );
            }
            other => panic!("{other:?}"),
        }
        // An HTTP port's transport is TCP.
        assert!(matches!(
            z.answer(
                &name("_web._tcp.payments.shop.svc.clusterset.local."),
                RecordType::SRV
            ),
            Answer::Records(_)
        ));
        // The SRV owner's parents exist (empty non-terminals), unnamed
        // ports have no SRV, and the A record still answers.
        assert_eq!(
            z.answer(
                &name("_tcp.payments.shop.svc.clusterset.local."),
                RecordType::SRV
            ),
            Answer::NoData
        );
        assert_eq!(
            z.answer(
                &name("_9001._tcp.payments.shop.svc.clusterset.local."),
                RecordType::SRV
            ),
            Answer::NxDomain
        );
        assert_eq!(
            z.answer(
                &name("_https._tcp.payments.shop.svc.clusterset.local."),
                RecordType::A
            ),
            Answer::NoData
        );
    }

    fn headless_view() -> CatalogView {
        let mut v = view();
        let ep = |address: &str, hostname: &str| pb::Endpoint {
            address: address.into(),
            hostname: hostname.into(),
        };
        let pg = |endpoints| pb::Export {
            service: "db/pg".into(),
            ports: vec![pb::ServicePort {
                port: 5432,
                protocol: "tcp".into(),
                name: "pg".into(),
            }],
            healthy_endpoints: 2,
            vip_index: 8,
            headless: true,
            endpoints,
            ..Default::default()
        };
        v.sites.insert(
            "west".into(),
            pb::Site {
                name: "west".into(),
                available: true,
                ..Default::default()
            },
        );
        v.exports
            .get_mut("east")
            .unwrap()
            .push(pg(vec![ep("10.1.0.5", "pg-0"), ep("10.1.0.6", "")]));
        v.exports
            .insert("west".into(), vec![pg(vec![ep("fd00::7", "pg-0")])]);
        v
    }

    fn rdata(a: Answer<'_>) -> Vec<String> {
        let Answer::Records(r) = a else {
            panic!("{a:?}")
        };
        let mut out: Vec<String> = r.iter().map(|r| r.data.to_string()).collect();
        out.sort();
        out
    }

    #[test]
    fn headless_services_answer_with_every_ready_endpoint() {
        let z = Zone::build(&opts(), &headless_view()).unwrap();
        let svc = "pg.db.svc.clusterset.local.";
        assert_eq!(
            rdata(z.answer(&name(svc), RecordType::A)),
            ["10.1.0.5", "10.1.0.6"]
        );
        assert_eq!(rdata(z.answer(&name(svc), RecordType::AAAA)), ["fd00::7"]);
        // Per-endpoint names, with the site as cluster ID; an endpoint
        // without a hostname is named after its address.
        assert_eq!(
            rdata(z.answer(&name(&format!("pg-0.east.{svc}")), RecordType::A)),
            ["10.1.0.5"]
        );
        assert_eq!(
            rdata(z.answer(&name(&format!("10-1-0-6.east.{svc}")), RecordType::A)),
            ["10.1.0.6"]
        );
        assert_eq!(
            rdata(z.answer(&name(&format!("pg-0.west.{svc}")), RecordType::AAAA)),
            ["fd00::7"]
        );
        // One SRV per endpoint name and named port.
        assert_eq!(
            rdata(z.answer(&name(&format!("_pg._tcp.{svc}")), RecordType::SRV)),
            [
                format!("0 100 5432 10-1-0-6.east.{svc}"),
                format!("0 100 5432 pg-0.east.{svc}"),
                format!("0 100 5432 pg-0.west.{svc}"),
            ]
        );
        // No record for a site's share of the service, for either kind.
        assert_eq!(
            z.answer(&name(&format!("east.{svc}")), RecordType::A),
            Answer::NoData
        );
        assert_eq!(
            z.answer(
                &name("east.payments.shop.svc.clusterset.local."),
                RecordType::A
            ),
            Answer::NxDomain
        );
        // PTR records for endpoints and ClusterSetIPs; other reverse names
        // are not ours.
        assert_eq!(
            rdata(z.answer(&name("5.0.1.10.in-addr.arpa."), RecordType::PTR)),
            [format!("pg-0.east.{svc}")]
        );
        assert_eq!(
            rdata(z.answer(&name("7.0.10.127.in-addr.arpa."), RecordType::PTR)),
            ["payments.shop.svc.clusterset.local."]
        );
        assert_eq!(
            z.answer(&name("9.9.9.9.in-addr.arpa."), RecordType::PTR),
            Answer::Refused
        );
        // A headless service with no ready endpoint does not exist.
        let mut v = headless_view();
        v.exports.remove("west");
        v.exports.get_mut("east").unwrap()[1].endpoints.clear();
        let z = Zone::build(&opts(), &v).unwrap();
        assert_eq!(z.answer(&name(svc), RecordType::A), Answer::NxDomain);
        assert_eq!(
            z.answer(&name(&format!("_pg._tcp.{svc}")), RecordType::SRV),
            Answer::NxDomain
        );
    }

    #[test]
    fn address_labels_are_dns_labels() {
        assert_eq!(address_label("10.0.0.5".parse().unwrap()), "10-0-0-5");
        assert_eq!(address_label("::1".parse().unwrap()), "0-0-0-0-0-0-0-1");
    }

    #[test]
    fn not_ready_before_the_first_snapshot() {
        let z = Zone::build(&opts(), &CatalogView::default()).unwrap();
        assert!(!z.ready);
    }
}
