//! causeway's traffic policies as Kubernetes objects (group `causeway.dev`,
//! one CRD per kind: FailoverPolicy, TrafficSplit, ...), so GitOps users
//! need no `ctl`: the agent forwards them to the controllers with the
//! site's credential. A site manages only the policies it forwarded (the
//! controllers refuse changes to an operator's or another site's), and
//! each object's `Accepted` condition says whether the federation took it
//! and, if not, why.
//!
//! [`plan`] is the pure decision: which objects to apply, which of the
//! site's policies to delete, and every object's condition.

use std::collections::{BTreeMap, BTreeSet};

use causeway_api::catalog::{policy_key, CatalogView};
use causeway_api::policy::{parse_document, Kind, API_VERSION, KINDS};
use kube::api::{ApiResource, DynamicObject};
use kube::ResourceExt;
use serde_json::{json, Value};

use crate::condition::Want;

/// The API group of causeway's own resources.
pub const GROUP: &str = "causeway.dev";
/// Their version.
pub const VERSION: &str = "v1alpha1";

/// The resource's plural name for a kind.
pub fn plural(kind: Kind) -> String {
    let k = kind.as_str().to_ascii_lowercase();
    match k.strip_suffix('y') {
        Some(stem) => format!("{stem}ies"),
        None => format!("{k}s"),
    }
}

/// How kube-rs addresses a kind's objects.
pub fn api_resource(kind: Kind) -> ApiResource {
    ApiResource {
        group: GROUP.into(),
        version: VERSION.into(),
        api_version: API_VERSION.into(),
        kind: kind.as_str().into(),
        plural: plural(kind),
    }
}

/// The CustomResourceDefinition of one kind. The spec is checked by the
/// controllers (the same rules as `causeway ctl policy apply`), whose
/// verdict the object's `Accepted` condition carries.
pub fn crd(kind: Kind) -> Value {
    let condition = json!({
        "type": "object",
        "required": ["type", "status", "reason", "message", "lastTransitionTime"],
        "properties": {
            "type": {"type": "string", "maxLength": 316},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string", "maxLength": 1024},
            "message": {"type": "string", "maxLength": 32768},
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
            "lastTransitionTime": {"type": "string", "format": "date-time"}
        }
    });
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{}.{GROUP}", plural(kind))},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind.as_str(),
                "listKind": format!("{}List", kind.as_str()),
                "plural": plural(kind),
                "singular": kind.as_str().to_ascii_lowercase(),
                "categories": ["causeway"]
            },
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION,
                "served": true,
                "storage": true,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Service", "type": "string", "jsonPath": ".spec.service"},
                    {"name": "Accepted", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
                ],
                "schema": {"openAPIV3Schema": {
                    "description": format!("A causeway {} (see the README's traffic policies); the agent forwards it to the federation.", kind.as_str()),
                    "type": "object",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                        "status": {"type": "object", "properties": {
                            "conditions": {"type": "array", "maxItems": 8, "items": condition,
                                           "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}
                        }}
                    }
                }}
            }]
        }
    })
}

/// Every policy CRD, by kind.
pub fn crds() -> Vec<Value> {
    KINDS.iter().map(|k| crd(*k)).collect()
}

/// One policy object as the agent sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// Its kind.
    pub kind: Kind,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// Its spec.
    pub spec: Value,
}

impl Object {
    /// A watched object of `kind`.
    pub fn of(kind: Kind, o: &DynamicObject) -> Self {
        Self {
            kind,
            namespace: o.namespace().unwrap_or_default(),
            name: o.name_any(),
            generation: o.metadata.generation,
            spec: o.data.get("spec").cloned().unwrap_or(Value::Null),
        }
    }

    /// `Kind/namespace/name`, as the catalog keys policies.
    pub fn key(&self) -> String {
        policy_key(self.kind.as_str(), &self.namespace, &self.name)
    }

    /// The policy document the federation API takes.
    pub fn document(&self) -> Value {
        json!({"apiVersion": API_VERSION, "kind": self.kind.as_str(),
               "metadata": {"namespace": self.namespace, "name": self.name},
               "spec": self.spec})
    }
}

/// What one pass does.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Objects whose document the federation lacks or holds differently:
    /// (key, document JSON).
    pub apply: Vec<(String, String)>,
    /// This site's policies no object asks for any more: (kind,
    /// namespace, name).
    pub delete: Vec<(String, String, String)>,
    /// The `Accepted` condition of every object whose verdict is known
    /// without asking (invalid here, or already held as written), by key.
    pub conditions: BTreeMap<String, Want>,
}

/// The condition of an object the federation holds as written.
pub fn accepted() -> Want {
    Want {
        type_: "Accepted",
        status: true,
        reason: "Accepted",
        message: "The federation holds this policy as written".into(),
    }
}

/// The condition of an object the federation refused.
pub fn refused(reason: &'static str, message: String) -> Want {
    Want {
        type_: "Accepted",
        status: false,
        reason,
        message,
    }
}

/// The pass for `objects` against what the `catalog` holds for `site`.
pub fn plan(objects: &[Object], catalog: &CatalogView, site: &str) -> Plan {
    let mut out = Plan::default();
    let mut wanted = BTreeSet::new();
    for o in objects {
        let key = o.key();
        wanted.insert(key.clone());
        let parsed = match parse_document(&o.document()) {
            Ok(p) => p,
            Err(errs) => {
                out.conditions.insert(
                    key,
                    refused(
                        "Invalid",
                        format!("{}; fix the spec and apply it again", errs.join("; ")),
                    ),
                );
                continue;
            }
        };
        let doc = parsed.to_json();
        match catalog.policies.get(&key) {
            Some(held) if held.owner_site != site => {
                let by = if held.owner_site.is_empty() {
                    "an operator".to_string()
                } else {
                    format!("site {}", held.owner_site)
                };
                out.conditions.insert(
                    key,
                    refused(
                        "NotManagedHere",
                        format!("{} {}/{} is managed by {by}; rename this object, or change the policy there", o.kind, o.namespace, o.name),
                    ),
                );
            }
            Some(held) if held.document_json == doc => {
                out.conditions.insert(key, accepted());
            }
            _ => out.apply.push((key, doc)),
        }
    }
    for p in catalog.policies.values() {
        let key = policy_key(&p.kind, &p.namespace, &p.name);
        if p.owner_site == site && !wanted.contains(&key) {
            out.delete
                .push((p.kind.clone(), p.namespace.clone(), p.name.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests;
