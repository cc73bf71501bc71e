//! Conflict resolution between sites that export the same service
//! differently (MCS KEP-1645, "Constraints and conflict resolution"): the
//! oldest export wins, ports are merged by name, and every export involved
//! gets a `Conflict` condition naming the field, the winner and why.

use std::collections::BTreeMap;

use causeway_api::catalog::CatalogView;
use causeway_api::model::{Protocol, ServiceKey};
use causeway_api::pb;
use k8s_openapi::jiff::Timestamp;

use crate::condition::Want;
use crate::export::{Port, SessionAffinity, SiteExport};

/// One site's export of a service, as conflict resolution compares them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The exporting site.
    pub site: String,
    /// When its ServiceExport was created, ms since the epoch.
    pub exported_at_ms: u64,
    /// Headless or not (the service's type).
    pub headless: bool,
    /// The service's session affinity.
    pub session_affinity: SessionAffinity,
    /// Its ports.
    pub ports: Vec<Port>,
}

impl Claim {
    /// This site's own claim, from what its ServiceExport decided.
    pub fn local(site: &str, e: &SiteExport) -> Self {
        Self {
            site: site.to_string(),
            exported_at_ms: e.exported_at_ms,
            headless: e.headless,
            session_affinity: e.session_affinity,
            ports: e.ports.clone(),
        }
    }

    /// A site's claim as the federation's catalog holds it.
    pub fn published(site: &str, e: &pb::Export) -> Self {
        let mut ports: Vec<Port> = e.ports.iter().filter_map(Port::from_pb).collect();
        ports.sort();
        Self {
            site: site.to_string(),
            exported_at_ms: e.exported_at_unix_ms,
            headless: e.headless,
            session_affinity: if e.client_ip_affinity {
                SessionAffinity::ClientIp
            } else {
                SessionAffinity::None
            },
            ports,
        }
    }
}

/// Every site's claim on `key`: the catalog's, with this site's own
/// (`local`) in place of what the catalog last heard from it.
pub fn claims(view: &CatalogView, key: &ServiceKey, local: &Claim) -> Vec<Claim> {
    let mut out: Vec<Claim> = view
        .exports
        .iter()
        .filter(|(site, _)| **site != local.site)
        .filter_map(|(site, exports)| {
            let e = exports.iter().find(|e| e.service == key.as_str())?;
            Some(Claim::published(site, e))
        })
        .collect();
    out.push(local.clone());
    out.sort_by(|a, b| a.site.cmp(&b.site));
    out
}

/// Which export wins: the oldest, then the first site by name.
pub fn winner(claims: &[Claim]) -> Option<&Claim> {
    claims
        .iter()
        .min_by(|a, b| (a.exported_at_ms, &a.site).cmp(&(b.exported_at_ms, &b.site)))
}

/// The first way `a` and `b` disagree, as (reason, what differs).
fn difference(a: &Claim, b: &Claim) -> Option<(&'static str, String)> {
    let by_name = |c: &Claim| -> BTreeMap<String, (u16, Protocol)> {
        c.ports
            .iter()
            .map(|p| (p.name.clone(), (p.port, p.protocol)))
            .collect()
    };
    let (pa, pb) = (by_name(a), by_name(b));
    for (name, (port, proto)) in &pa {
        if let Some((port_b, proto_b)) = pb.get(name) {
            if (port, proto) != (port_b, proto_b) {
                let label = if name.is_empty() {
                    "the unnamed port".to_string()
                } else {
                    format!("port {name:?}")
                };
                return Some((
                    "PortConflict",
                    format!(
                        "{label} is {port}/{} in {} but {port_b}/{} in {}",
                        proto.as_str(),
                        a.site,
                        proto_b.as_str(),
                        b.site
                    ),
                ));
            }
        }
    }
    if a.headless != b.headless {
        let kind = |h: bool| if h { "Headless" } else { "ClusterSetIP" };
        return Some((
            "TypeConflict",
            format!(
                "the type is {} in {} but {} in {}",
                kind(a.headless),
                a.site,
                kind(b.headless),
                b.site
            ),
        ));
    }
    if a.session_affinity != b.session_affinity {
        let aff = |s: SessionAffinity| match s {
            SessionAffinity::None => "None",
            SessionAffinity::ClientIp => "ClientIP",
        };
        return Some((
            "SessionAffinityConflict",
            format!(
                "sessionAffinity is {} in {} but {} in {}",
                aff(a.session_affinity),
                a.site,
                aff(b.session_affinity),
                b.site
            ),
        ));
    }
    None
}

fn when(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| Timestamp::from_millisecond(ms).ok())
        .map_or_else(|| format!("{ms} ms"), |t| t.to_string())
}

/// The `Conflict` condition of `local`'s export among `claims` (which
/// include it).
pub fn condition(local: &str, claims: &[Claim]) -> Want {
    let no_conflict = |others: &str| Want {
        type_: "Conflict",
        status: false,
        reason: "NoConflicts",
        message: others.to_string(),
    };
    let (Some(mine), Some(win)) = (claims.iter().find(|c| c.site == local), winner(claims)) else {
        return no_conflict("No other site exports this service");
    };
    if win.site != mine.site {
        return match difference(win, mine) {
            Some((reason, what)) => Want {
                type_: "Conflict",
                status: true,
                reason,
                message: format!(
                    "{what}; the oldest export wins: {}'s (exported {}), so this site's differing properties are not used. Make this Service match it, or stop exporting it in {}",
                    win.site,
                    when(win.exported_at_ms),
                    win.site
                ),
            },
            None => no_conflict(&format!(
                "This export agrees with the oldest one ({}'s)",
                win.site
            )),
        };
    }
    let differing: Vec<(&str, (&'static str, String))> = claims
        .iter()
        .filter(|c| c.site != local)
        .filter_map(|c| difference(mine, c).map(|d| (c.site.as_str(), d)))
        .collect();
    match differing.first() {
        None => no_conflict("No other site exports this service differently"),
        Some((_, (reason, what))) => Want {
            type_: "Conflict",
            status: true,
            reason,
            message: format!(
                "{what}; this export is the oldest (exported {}) and wins; differing sites: {}",
                when(mine.exported_at_ms),
                differing
                    .iter()
                    .map(|(s, _)| *s)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(site: &str, at: u64, ports: &[(&str, u16, Protocol)]) -> Claim {
        Claim {
            site: site.into(),
            exported_at_ms: at,
            headless: false,
            session_affinity: SessionAffinity::None,
            ports: ports
                .iter()
                .map(|(n, p, proto)| Port {
                    name: n.to_string(),
                    port: *p,
                    protocol: *proto,
                })
                .collect(),
        }
    }

    const T0: u64 = 1_800_000_000_000;

    #[test]
    fn the_oldest_export_wins_and_ties_go_by_site_name() {
        let c = [
            claim("west", T0 + 5, &[]),
            claim("east", T0 + 5, &[]),
            claim("north", T0 + 9, &[]),
        ];
        assert_eq!(winner(&c).unwrap().site, "east");
        assert!(winner(&[]).is_none());
    }

    #[test]
    fn a_port_conflict_names_the_port_the_winner_and_the_fix() {
        let claims = [
            claim("east", T0, &[("http", 80, Protocol::Http)]),
            claim(
                "west",
                T0 + 60_000,
                &[("http", 80, Protocol::Tcp), ("admin", 9000, Protocol::Tcp)],
            ),
        ];
        let west = condition("west", &claims);
        assert_eq!(
            west,
            Want {
                type_: "Conflict",
                status: true,
                reason: "PortConflict",
                message: "port \"http\" is 80/http in east but 80/tcp in west; the oldest export wins: east's (exported 2027-01-15T08:00:00Z), so this site's differing properties are not used. Make this Service match it, or stop exporting it in east".into(),
            }
        );
        let east = condition("east", &claims);
        assert!(east.status);
        assert_eq!(east.reason, "PortConflict");
        assert!(
            east.message.contains("this export is the oldest"),
            "{}",
            east.message
        );
        assert!(
            east.message.ends_with("differing sites: west"),
            "{}",
            east.message
        );
    }

    #[test]
    fn ports_on_one_site_only_are_merged_not_a_conflict() {
        let claims = [
            claim("east", T0, &[("http", 80, Protocol::Http)]),
            claim(
                "west",
                T0 + 1,
                &[("http", 80, Protocol::Http), ("admin", 9000, Protocol::Tcp)],
            ),
        ];
        for site in ["east", "west"] {
            let c = condition(site, &claims);
            assert!(!c.status, "{site}: {c:?}");
            assert_eq!(c.reason, "NoConflicts");
        }
    }

    #[test]
    fn type_and_session_affinity_conflicts_are_named() {
        let mut headless = claim("west", T0 + 1, &[]);
        headless.headless = true;
        let c = condition("west", &[claim("east", T0, &[]), headless]);
        assert_eq!(c.reason, "TypeConflict");
        assert!(
            c.message
                .starts_with("the type is ClusterSetIP in east but Headless in west"),
            "{}",
            c.message
        );
        let mut sticky = claim("west", T0 + 1, &[]);
        sticky.session_affinity = SessionAffinity::ClientIp;
        let c = condition("west", &[claim("east", T0, &[]), sticky]);
        assert_eq!(c.reason, "SessionAffinityConflict");
        assert!(
            c.message
                .starts_with("sessionAffinity is None in east but ClientIP in west"),
            "{}",
            c.message
        );
    }

    #[test]
    fn a_lone_export_has_no_conflict() {
        let c = condition("east", &[claim("east", T0, &[])]);
        assert_eq!((c.status, c.reason), (false, "NoConflicts"));
    }
}
