//! The `causeway_kubernetes_manifests` data source: the manifests that put
//! a site into a Kubernetes cluster, exactly as `causeway install` renders
//! them (same options, same code), for Terraform users who apply them with
//! the kubernetes provider (`kubernetes_manifest` over `yamldecode` of each
//! document). Pure: it reads nothing from the controllers.

use causeway_kube::install::{self, Options};

use super::*;

/// The data source's schema.
pub fn manifests_schema() -> Block {
    Block {
        description: "The Kubernetes manifests of one site, as `causeway install` renders them: apply each of `documents` (e.g. `kubernetes_manifest` with `yamldecode`).",
        attrs: vec![
            Attr::new("id", Ty::String, Mode::Computed, "The site's name."),
            Attr::new("site", Ty::String, Mode::Required, "The site's name (a DNS label), as joined to the federation."),
            Attr::new(
                "advertise",
                Ty::List(Box::new(Ty::String)),
                Mode::Required,
                "Where other sites reach this site's gateways: `ip:port` of the tunnel LoadBalancer, one per gateway replica.",
            ),
            Attr::new("namespace", Ty::String, Mode::Optional, "Namespace to install into. Default `causeway-system`."),
            Attr::new("image", Ty::String, Mode::Optional, "Container image of the causeway binary."),
            Attr::new("gateway_replicas", Ty::Number, Mode::Optional, "Gateway replicas. Default 1."),
            Attr::new("controllers", Ty::Number, Mode::Optional, "Controller nodes this site hosts: 0 (default), 1, 3 or 5."),
            Attr::new(
                "controller_endpoints",
                Ty::List(Box::new(Ty::String)),
                Mode::Optional,
                "The controllers' `host:port` when this site hosts none.",
            ),
            Attr::new("dns_cluster_ip", Ty::String, Mode::Optional, "A fixed ClusterIP for the mesh DNS Service."),
            Attr::new(
                "cluster_ip_range",
                Ty::String,
                Mode::Optional,
                "The ClusterSetIP range inside the cluster's Service CIDR. Default `10.96.0.128/25`.",
            ),
            Attr::new("import_port_base", Ty::Number, Mode::Optional, "The gateways' first import listener port. Default 20000."),
            Attr::new(
                "documents",
                Ty::List(Box::new(Ty::String)),
                Mode::Computed,
                "One YAML document per object, in apply order.",
            ),
        ],
    }
}

/// The options a configuration asks for; problems name their attribute.
fn options(config: &Value) -> Result<Options, Vec<pb::Diagnostic>> {
    let site = config.get("site").as_str().unwrap_or_default();
    let mut o = Options::new(site);
    let strings = |name: &str| -> Vec<String> {
        match config.get(name) {
            Value::List(items) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        }
    };
    o.advertise = strings("advertise");
    o.controller_endpoints = strings("controller_endpoints");
    if let Some(ns) = config.get("namespace").as_str() {
        o.namespace = ns.into();
    }
    if let Some(image) = config.get("image").as_str() {
        o.image = image.into();
    }
    if let Some(ip) = config.get("dns_cluster_ip").as_str() {
        o.dns_cluster_ip = Some(ip.into());
    }
    if let Some(r) = config.get("cluster_ip_range").as_str() {
        o.cluster_ip_range = r.into();
    }
    let mut diags = Vec::new();
    let mut number = |name: &str, max: f64| -> Option<f64> {
        let n = config.get(name).as_f64()?;
        if n.fract() != 0.0 || !(0.0..=max).contains(&n) {
            diags.push(attr_error(
                name,
                format!("{name} must be a whole number from 0 to {max}"),
                format!("got {n}"),
            ));
            return None;
        }
        Some(n)
    };
    if let Some(n) = number("gateway_replicas", 100.0) {
        o.gateway_replicas = n as u32;
    }
    if let Some(n) = number("controllers", 5.0) {
        o.controllers = n as u32;
    }
    if let Some(n) = number("import_port_base", 65535.0) {
        o.import_port_base = n as u16;
    }
    if let Err(errs) = o.check() {
        for e in errs {
            let attr = e.split(':').next().unwrap_or("site").to_string();
            diags.push(attr_error(&attr, format!("invalid {attr}"), e));
        }
    }
    if diags.is_empty() {
        Ok(o)
    } else {
        Err(diags)
    }
}

/// Checks a configuration at plan time (unknown values pass).
pub(super) fn validate_manifests(config: &Value) -> Vec<pb::Diagnostic> {
    let has_unknown = |v: &Value| match v {
        Value::Unknown => true,
        Value::List(items) => items.iter().any(|i| matches!(i, Value::Unknown)),
        _ => false,
    };
    if let Value::Map(m) = config {
        if m.values().any(has_unknown) {
            return Vec::new();
        }
    }
    options(config).err().unwrap_or_default()
}

/// The data source's state for a configuration.
pub(super) fn read_manifests(config: &Value) -> Result<Value, Vec<pb::Diagnostic>> {
    let o = options(config)?;
    let documents: Vec<String> = install::render(&o)
        .iter()
        .map(|obj| {
            install::to_yaml(std::slice::from_ref(obj))
                .trim_start_matches("---\n")
                .to_string()
        })
        .collect();
    let mut f = fields(config);
    f.insert("id".into(), Value::string(&o.site));
    f.insert("documents".into(), Value::string_list(&documents));
    Ok(manifests_schema().object(f))
}
