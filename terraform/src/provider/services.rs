//! The `causeway_services` data source: exports grouped by service.

use std::collections::BTreeMap;

use causeway_api::pb as api;

use super::*;
use crate::schema::{Attr, Block, Mode, Ty};
use crate::value::Value;

pub(super) fn service_entry_ty() -> Ty {
    Ty::Object(vec![
        ("service", Ty::String),
        ("namespace", Ty::String),
        ("name", Ty::String),
        ("sites", Ty::List(Box::new(Ty::String))),
        ("ports", Ty::List(Box::new(Ty::Number))),
        ("healthy_endpoints", Ty::Number),
        ("total_endpoints", Ty::Number),
    ])
}

/// The `causeway_services` data source's schema.
pub fn services_schema() -> Block {
    Block {
        description: "The services member sites export, each once with every site exporting it (e.g. to declare a FailoverPolicy per service with for_each).",
        attrs: vec![
            Attr::new(
                "id",
                Ty::String,
                Mode::Computed,
                "The catalog revision read.",
            ),
            Attr::new(
                "namespace",
                Ty::String,
                Mode::Optional,
                "Only services in this namespace.",
            ),
            Attr::new(
                "services",
                Ty::List(Box::new(service_entry_ty())),
                Mode::Computed,
                "Sorted by service: `service` (`NAMESPACE/NAME`), `namespace`, `name`, `sites` exporting it (sorted), `ports` (the union, sorted), and healthy and total endpoints summed over the sites.",
            ),
            Attr::new(
                "revision",
                Ty::Number,
                Mode::Computed,
                "The catalog revision read.",
            ),
        ],
    }
}

/// The catalog's exports grouped by service (optionally one namespace).
pub(super) fn services_of(cat: &api::CatalogSnapshot, namespace: Option<&str>) -> Value {
    #[derive(Default)]
    struct Entry {
        sites: std::collections::BTreeSet<String>,
        ports: std::collections::BTreeSet<u32>,
        healthy: u64,
        total: u64,
    }
    let mut by_service: BTreeMap<&str, Entry> = BTreeMap::new();
    for site in &cat.exports {
        for e in &site.exports {
            let ns = e.service.split_once('/').map_or("", |(ns, _)| ns);
            if namespace.is_some_and(|want| want != ns) {
                continue;
            }
            let entry = by_service.entry(&e.service).or_default();
            entry.sites.insert(site.site.clone());
            entry.ports.extend(e.ports.iter().map(|p| p.port));
            entry.healthy += u64::from(e.healthy_endpoints);
            entry.total += u64::from(e.total_endpoints.max(e.healthy_endpoints));
        }
    }
    Value::List(
        by_service
            .into_iter()
            .map(|(service, e)| {
                let (ns, name) = service.split_once('/').unwrap_or(("", service));
                let mut m = BTreeMap::new();
                m.insert("service".to_string(), Value::string(service));
                m.insert("namespace".into(), Value::string(ns));
                m.insert("name".into(), Value::string(name));
                m.insert(
                    "sites".into(),
                    Value::List(e.sites.into_iter().map(Value::String).collect()),
                );
                m.insert(
                    "ports".into(),
                    Value::List(
                        e.ports
                            .into_iter()
                            .map(|p| Value::Number(f64::from(p)))
                            .collect(),
                    ),
                );
                m.insert("healthy_endpoints".into(), Value::Number(e.healthy as f64));
                m.insert("total_endpoints".into(), Value::Number(e.total as f64));
                Value::Map(m)
            })
            .collect(),
    )
}

impl Provider {
    pub(super) async fn read_services(&self, config: &Value) -> Result<Value, pb::Diagnostic> {
        let cat = self.catalog().await?;
        let namespace = config.get("namespace").as_str();
        let mut f = BTreeMap::new();
        f.insert("id".into(), Value::string(cat.revision.to_string()));
        if let Some(ns) = namespace {
            f.insert("namespace".into(), Value::string(ns));
        }
        f.insert("services".into(), services_of(&cat, namespace));
        f.insert("revision".into(), Value::Number(cat.revision as f64));
        Ok(services_schema().object(f))
    }
}
