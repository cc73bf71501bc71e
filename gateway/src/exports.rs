//! The site's exports as this gateway serves them. A static configuration
//! fills the table once; on Kubernetes the agent side replaces it whenever
//! a ServiceExport, its Service or its EndpointSlices change. Inbound
//! streams, local dials and the publisher read whatever table is current;
//! replacing it never disturbs a stream in flight (the stream holds the
//! endpoint set it was opened on).

use std::sync::Arc;

use causeway_gateway_core::balance::Strategy;
use tokio::sync::watch;

use crate::config::LocalExport;
use crate::endpoints::EndpointSet;

/// One exported service port and the endpoints serving it.
pub struct Entry {
    /// The export.
    pub export: LocalExport,
    /// Its endpoints, with their balancing state.
    pub endpoints: Arc<EndpointSet>,
}

/// The exports at one moment.
#[derive(Default)]
pub struct Table {
    entries: Vec<Entry>,
    known: bool,
}

impl Table {
    /// The entry for `service` port `port`, if exported here.
    pub fn find(&self, service: &str, port: u16) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| e.export.service.as_str() == service && e.export.port == port)
    }

    /// Every export.
    pub fn exports(&self) -> Vec<LocalExport> {
        self.entries.iter().map(|e| e.export.clone()).collect()
    }

    /// How many service ports are exported.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is exported.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the source has said what the site exports (a table not yet
    /// known is not "exports nothing": it is not published).
    pub fn known(&self) -> bool {
        self.known
    }
}

/// The live table.
pub struct Exports {
    tx: watch::Sender<Arc<Table>>,
    strategy: Strategy,
}

impl Exports {
    /// A table holding `exports`, balanced by `strategy`.
    pub fn new(exports: Vec<LocalExport>, strategy: Strategy) -> Arc<Self> {
        let this = Self::unknown(strategy);
        this.replace(exports);
        this
    }

    /// A table whose exports are not known yet (they come from a source
    /// that has not answered, e.g. the Kubernetes API): nothing is
    /// published until the first [`Exports::replace`].
    pub fn unknown(strategy: Strategy) -> Arc<Self> {
        Arc::new(Self {
            tx: watch::Sender::new(Arc::new(Table::default())),
            strategy,
        })
    }

    /// The current table.
    pub fn current(&self) -> Arc<Table> {
        self.tx.borrow().clone()
    }

    /// Told of every replacement.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Table>> {
        self.tx.subscribe()
    }

    /// Replaces the table; returns whether anything changed. An export
    /// whose endpoints did not change keeps its endpoint set, so its
    /// in-flight counts and latency estimates carry over.
    pub fn replace(&self, exports: Vec<LocalExport>) -> bool {
        self.tx.send_if_modified(|cur| {
            if cur.known
                && cur.entries.len() == exports.len()
                && cur
                    .entries
                    .iter()
                    .zip(&exports)
                    .all(|(e, x)| e.export == *x)
            {
                return false;
            }
            let entries = exports
                .into_iter()
                .map(|export| {
                    let endpoints = cur
                        .find(export.service.as_str(), export.port)
                        .filter(|e| {
                            e.endpoints.addrs() == export.endpoints.as_slice()
                                && e.endpoints.same_versions(&export.versions)
                        })
                        .map(|e| e.endpoints.clone())
                        .unwrap_or_else(|| {
                            Arc::new(EndpointSet::with_versions(
                                export.endpoints.clone(),
                                &export.versions,
                                self.strategy,
                            ))
                        });
                    Entry { export, endpoints }
                })
                .collect();
            *cur = Arc::new(Table {
                entries,
                known: true,
            });
            metrics::gauge!("causeway_gateway_exported_ports").set(cur.len() as f64);
            true
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_api::model::Protocol;

    fn export(service: &str, port: u16, endpoints: &[&str]) -> LocalExport {
        LocalExport {
            service: service.parse().unwrap(),
            port,
            port_name: String::new(),
            protocol: Protocol::Tcp,
            endpoints: endpoints.iter().map(|a| a.parse().unwrap()).collect(),
            headless: false,
            hostnames: Default::default(),
            health_path: None,
            zones: Default::default(),
            versions: Default::default(),
            exported_at_ms: 0,
            client_ip_affinity: false,
        }
    }

    #[test]
    fn replacing_keeps_unchanged_endpoint_sets_and_reports_changes() {
        let t = Exports::new(
            vec![
                export("shop/a", 80, &["10.0.0.1:8080"]),
                export("shop/b", 80, &["10.0.0.2:8080"]),
            ],
            Strategy::default(),
        );
        let before = t.current();
        let a0 = before.find("shop/a", 80).unwrap().endpoints.clone();
        let b0 = before.find("shop/b", 80).unwrap().endpoints.clone();
        assert!(
            !t.replace(before.exports()),
            "the same exports are no change"
        );
        assert!(t.replace(vec![
            export("shop/a", 80, &["10.0.0.1:8080"]),
            export("shop/b", 80, &["10.0.0.2:8080", "10.0.0.3:8080"]),
        ]));
        let after = t.current();
        assert!(Arc::ptr_eq(
            &a0,
            &after.find("shop/a", 80).unwrap().endpoints
        ));
        assert!(!Arc::ptr_eq(
            &b0,
            &after.find("shop/b", 80).unwrap().endpoints
        ));
        assert_eq!(after.find("shop/b", 80).unwrap().endpoints.addrs().len(), 2);
        // The table held by a stream opened earlier is untouched.
        assert_eq!(
            before.find("shop/b", 80).unwrap().endpoints.addrs().len(),
            1
        );
        assert!(t.replace(Vec::new()));
        assert!(t.current().find("shop/a", 80).is_none());
        assert!(t.current().is_empty());
    }

    #[test]
    fn a_table_from_a_source_is_unknown_until_it_first_answers() {
        let t = Exports::unknown(Strategy::default());
        assert!(!t.current().known());
        assert!(
            t.replace(Vec::new()),
            "learning it exports nothing is a change"
        );
        assert!(t.current().known() && t.current().is_empty());
        assert!(!t.replace(Vec::new()));
    }
}
