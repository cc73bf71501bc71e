//! The client's live view of the catalog, built from a `Watch` stream: a
//! snapshot, then ordered deltas. Pure: applying an event is a function of
//! the view and the event.

use std::collections::BTreeMap;

use crate::model::{Revision, ServiceKey, SiteName};
use crate::pb;

/// Why a watch event could not be applied to a view.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApplyError {
    /// The delta does not follow the view's revision.
    #[error("delta for revision {got} does not follow revision {have}; resync from a snapshot")]
    Gap {
        /// The revision the view is at.
        have: u64,
        /// The revision the delta is for.
        got: u64,
    },
    /// The event carried neither a snapshot nor a delta.
    #[error("watch event has no body")]
    Empty,
}

/// One service as seen across the federation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceView {
    /// `<namespace>/<name>`.
    pub key: ServiceKey,
    /// Its index in every site's VIP range (its ClusterSetIP there).
    pub vip_index: u32,
    /// Its ports (the union over the exporting sites).
    pub ports: Vec<pb::ServicePort>,
    /// Sites that export it, with their healthy endpoint counts, by name.
    pub exporters: Vec<(SiteName, u32)>,
    /// True when every exporting site exports it headless: it then has no
    /// ClusterSetIP, and DNS answers with `endpoints`. A service exported
    /// headless by some sites and not by others is a ClusterSetIP service.
    pub headless: bool,
    /// Ready endpoints of the headless exports, by site.
    pub endpoints: Vec<(SiteName, pb::Endpoint)>,
    /// Each exporter's endpoint count, healthy or not.
    pub totals: BTreeMap<SiteName, u32>,
    /// Each exporter's healthy and total endpoints per zone, when it
    /// reports them ("" is the site's own zone).
    pub zones: BTreeMap<SiteName, Vec<pb::ZoneHealth>>,
    /// Each exporter's healthy and total endpoints per subset (version),
    /// when its endpoints carry one.
    pub subsets: BTreeMap<SiteName, Vec<pb::SubsetHealth>>,
}

impl ServiceView {
    /// Healthy endpoints of `subset` at `site`; `None` when the site has no
    /// endpoint of that subset.
    pub fn subset_healthy(&self, site: &SiteName, subset: &str) -> Option<u32> {
        self.subsets
            .get(site)?
            .iter()
            .find(|s| s.name == subset)
            .map(|s| s.healthy)
    }
}

/// The catalog as one watcher holds it: a snapshot plus the deltas
/// since, applied in revision order.
#[derive(Debug, Clone, Default)]
pub struct CatalogView {
    /// The revision of the last change applied.
    pub revision: Revision,
    /// Set once the first snapshot arrived.
    pub synced: bool,
    /// The cluster's epoch (see `CatalogSnapshot.epoch`).
    pub epoch: u64,
    /// Member sites by name.
    pub sites: BTreeMap<String, pb::Site>,
    /// What each site exports, by site name.
    pub exports: BTreeMap<String, Vec<pb::Export>>,
    /// Traffic policies by `policy_key`.
    pub policies: BTreeMap<String, pb::Policy>,
}

/// How policies are keyed: `Kind/namespace/name`.
pub fn policy_key(kind: &str, namespace: &str, name: &str) -> String {
    format!("{kind}/{namespace}/{name}")
}

impl CatalogView {
    /// The view a snapshot describes (e.g. a `Catalog` RPC's answer).
    pub fn from_snapshot(snap: pb::CatalogSnapshot) -> Self {
        let mut v = Self::default();
        v.replace(snap);
        v
    }

    /// Applies one event. A snapshot replaces everything; a delta must be
    /// newer than the view (older or equal ones are ignored, so a watcher
    /// never goes backwards).
    pub fn apply(&mut self, event: pb::WatchEvent) -> Result<bool, ApplyError> {
        match event.kind.ok_or(ApplyError::Empty)? {
            pb::watch_event::Kind::Snapshot(snap) => {
                // An older snapshot of the same cluster changes nothing; a
                // cluster restored from a backup has a new epoch, and its
                // revisions start again below ours.
                if self.synced && snap.epoch == self.epoch && snap.revision < self.revision.0 {
                    return Ok(false);
                }
                self.replace(snap);
                Ok(true)
            }
            pb::watch_event::Kind::Delta(delta) => {
                if event.revision <= self.revision.0 {
                    return Ok(false);
                }
                if !self.synced {
                    return Err(ApplyError::Gap {
                        have: self.revision.0,
                        got: event.revision,
                    });
                }
                for change in delta.changes {
                    self.apply_change(change);
                }
                self.revision = Revision(event.revision);
                Ok(true)
            }
        }
    }

    fn replace(&mut self, snap: pb::CatalogSnapshot) {
        self.revision = Revision(snap.revision);
        self.epoch = snap.epoch;
        self.synced = true;
        self.sites = snap
            .sites
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        self.exports = snap
            .exports
            .into_iter()
            .map(|e| (e.site, e.exports))
            .collect();
        self.policies = snap
            .policies
            .into_iter()
            .map(|p| (policy_key(&p.kind, &p.namespace, &p.name), p))
            .collect();
    }

    fn apply_change(&mut self, change: pb::Change) {
        use pb::change::Kind;
        match change.kind {
            Some(Kind::SiteUpserted(site)) => {
                self.sites.insert(site.name.clone(), site);
            }
            Some(Kind::SiteRemoved(name)) => {
                self.sites.remove(&name);
                self.exports.remove(&name);
            }
            Some(Kind::ExportsReplaced(se)) => {
                if se.exports.is_empty() {
                    self.exports.remove(&se.site);
                } else {
                    self.exports.insert(se.site, se.exports);
                }
            }
            Some(Kind::PolicyUpserted(p)) => {
                self.policies
                    .insert(policy_key(&p.kind, &p.namespace, &p.name), p);
            }
            Some(Kind::PolicyRemoved(r)) => {
                self.policies
                    .remove(&policy_key(&r.kind, &r.namespace, &r.name));
            }
            None => {}
        }
    }

    /// Every exported service, with the available sites that export it.
    pub fn services(&self) -> BTreeMap<ServiceKey, ServiceView> {
        let mut out: BTreeMap<ServiceKey, ServiceView> = BTreeMap::new();
        for (site, exports) in &self.exports {
            let available = self.sites.get(site).map(|s| s.available).unwrap_or(false);
            let Ok(site_name) = site.parse::<SiteName>() else {
                continue;
            };
            if !available {
                continue;
            }
            for e in exports {
                let Ok(key) = e.service.parse::<ServiceKey>() else {
                    continue;
                };
                let view = out.entry(key.clone()).or_insert_with(|| ServiceView {
                    key,
                    vip_index: e.vip_index,
                    ports: Vec::new(),
                    exporters: Vec::new(),
                    headless: true,
                    endpoints: Vec::new(),
                    totals: BTreeMap::new(),
                    zones: BTreeMap::new(),
                    subsets: BTreeMap::new(),
                });
                if !e.zones.is_empty() {
                    view.zones.insert(site_name.clone(), e.zones.clone());
                }
                if !e.subsets.is_empty() {
                    view.subsets.insert(site_name.clone(), e.subsets.clone());
                }
                view.totals.insert(
                    site_name.clone(),
                    e.total_endpoints.max(e.healthy_endpoints),
                );
                view.headless &= e.headless;
                if e.headless {
                    view.endpoints
                        .extend(e.endpoints.iter().map(|ep| (site_name.clone(), ep.clone())));
                }
                for p in &e.ports {
                    if !view.ports.iter().any(|q| q.port == p.port) {
                        view.ports.push(p.clone());
                    }
                }
                view.exporters
                    .push((site_name.clone(), e.healthy_endpoints));
            }
        }
        for v in out.values_mut() {
            v.ports.sort_by_key(|p| p.port);
            if !v.headless {
                v.endpoints.clear();
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(name: &str) -> pb::Site {
        pb::Site {
            name: name.into(),
            available: true,
            ..Default::default()
        }
    }

    fn export(svc: &str, vip: u32, healthy: u32) -> pb::Export {
        pb::Export {
            service: svc.into(),
            ports: vec![pb::ServicePort {
                port: 80,
                protocol: "tcp".into(),
                name: String::new(),
            }],
            healthy_endpoints: healthy,
            vip_index: vip,
            ..Default::default()
        }
    }

    fn delta(rev: u64, changes: Vec<pb::change::Kind>) -> pb::WatchEvent {
        pb::WatchEvent {
            revision: rev,
            kind: Some(pb::watch_event::Kind::Delta(pb::Delta {
                changes: changes
                    .into_iter()
                    .map(|k| pb::Change { kind: Some(k) })
                    .collect(),
            })),
        }
    }

    #[test]
    fn a_restored_cluster_replaces_the_view_even_at_a_lower_revision() {
        let snap = |rev: u64, epoch: u64, name: &str| pb::WatchEvent {
            revision: rev,
            kind: Some(pb::watch_event::Kind::Snapshot(pb::CatalogSnapshot {
                revision: rev,
                epoch,
                sites: vec![site(name)],
                ..Default::default()
            })),
        };
        let mut v = CatalogView::default();
        assert!(v.apply(snap(40, 0, "old")).unwrap());
        // The same cluster, an older snapshot: nothing changes.
        assert!(!v.apply(snap(30, 0, "older")).unwrap());
        assert!(v.sites.contains_key("old"));
        // A cluster restored from a backup: new epoch, lower revision.
        assert!(v.apply(snap(30, 9, "restored")).unwrap());
        assert_eq!((v.revision.0, v.epoch), (30, 9));
        assert!(v.sites.contains_key("restored") && !v.sites.contains_key("old"));
    }

    #[test]
    fn snapshot_then_deltas_and_never_backwards() {
        let mut view = CatalogView::default();
        // A delta before any snapshot is a gap.
        assert!(view.apply(delta(1, vec![])).is_err());
        let snap = pb::CatalogSnapshot {
            revision: 5,
            sites: vec![site("east"), site("west")],
            exports: vec![pb::SiteExports {
                site: "east".into(),
                exports: vec![export("shop/payments", 1, 2)],
            }],
            ..Default::default()
        };
        view.apply(pb::WatchEvent {
            revision: 5,
            kind: Some(pb::watch_event::Kind::Snapshot(snap)),
        })
        .unwrap();
        let svcs = view.services();
        assert_eq!(svcs.len(), 1);
        assert_eq!(svcs.values().next().unwrap().exporters.len(), 1);

        let d = delta(
            6,
            vec![pb::change::Kind::ExportsReplaced(pb::SiteExports {
                site: "west".into(),
                exports: vec![export("shop/payments", 1, 3)],
            })],
        );
        assert!(view.apply(d.clone()).unwrap());
        // Replaying an old revision changes nothing.
        assert!(!view.apply(d).unwrap());
        let v = view.services();
        let names: Vec<_> = v
            .values()
            .next()
            .unwrap()
            .exporters
            .iter()
            .map(|(s, n)| (s.as_str(), *n))
            .collect();
        assert_eq!(names, [("east", 2), ("west", 3)]);

        assert!(!v.values().next().unwrap().headless);

        // Headless only when every exporter says so.
        let headless = |ip: &str| pb::Export {
            headless: true,
            endpoints: vec![pb::Endpoint {
                address: ip.into(),
                hostname: String::new(),
            }],
            ..export("db/pg", 2, 1)
        };
        let mut hv = view.clone();
        hv.exports.insert("east".into(), vec![headless("10.0.0.1")]);
        hv.exports.insert("west".into(), vec![headless("10.0.1.1")]);
        let s = hv.services().remove(&"db/pg".parse().unwrap()).unwrap();
        assert!(s.headless);
        let eps: Vec<_> = s
            .endpoints
            .iter()
            .map(|(site, e)| (site.as_str(), e.address.as_str()))
            .collect();
        assert_eq!(eps, [("east", "10.0.0.1"), ("west", "10.0.1.1")]);
        hv.exports
            .insert("west".into(), vec![export("db/pg", 2, 1)]);
        let s = hv.services().remove(&"db/pg".parse().unwrap()).unwrap();
        assert!(!s.headless && s.endpoints.is_empty());

        view.apply(delta(7, vec![pb::change::Kind::SiteRemoved("east".into())]))
            .unwrap();
        assert_eq!(view.revision, Revision(7));
        let v = view.services();
        assert_eq!(v.values().next().unwrap().exporters.len(), 1);
    }
}
