//! The Helm chart in `deploy/helm/causeway`, generated from the same
//! [`crate::install::render`] that `causeway install` prints, so the two
//! cannot drift: the site is rendered once with a marker in every place a
//! value goes, and each marker becomes the Helm expression for that value.
//! `deploy/validate` lints the chart with a real `helm`, renders it, and
//! checks the rendering equals `causeway install` for the same values.
//!
//! The chart hosts no controllers or three (`controllers.enabled`); one or
//! five controller nodes are `causeway install --controllers N`.

use serde_json::Value;

use crate::install::{render, to_yaml, Options};

/// Where the chart lives in the repository.
pub const CHART_DIR: &str = "deploy/helm/causeway";

const SITE: &str = "cwsitemarker";
const NAMESPACE: &str = "cwnamespacemarker";
const IMAGE: &str = "cwimagemarker:0";
const ZONE: &str = "cwzonemarker.local";
const REPLICAS: u32 = 7771;
const ADVERTISE: &str = "192.0.2.77:15443";
const DNS_IP: &str = "192.0.2.53";
const RANGE: &str = "192.0.2.128/25";
const PORT_BASE: u16 = 27771;

fn marked() -> Options {
    let mut o = Options::new(SITE);
    o.namespace = NAMESPACE.into();
    o.image = IMAGE.into();
    o.zone = ZONE.into();
    o.gateway_replicas = REPLICAS;
    o.controllers = 3;
    o.advertise = vec![ADVERTISE.into()];
    o.dns_cluster_ip = Some(DNS_IP.into());
    o.cluster_ip_range = RANGE.into();
    o.import_port_base = PORT_BASE;
    o
}

/// Every marker and the Helm expression it becomes.
fn expressions() -> Vec<(String, &'static str)> {
    vec![
        (
            format!("[{ADVERTISE:?}]"),
            r#"{{ required "set advertise: the ip:port other sites reach this site's gateways at" .Values.advertise | toJson }}"#,
        ),
        (
            SITE.into(),
            r#"{{ required "set site: the site's name as joined to the federation" .Values.site }}"#,
        ),
        (NAMESPACE.into(), "{{ .Release.Namespace }}"),
        (IMAGE.into(), "{{ .Values.image }}"),
        (ZONE.into(), "{{ .Values.zone }}"),
        (
            format!("replicas: {REPLICAS}"),
            "replicas: {{ .Values.gateway.replicas }}",
        ),
        (
            format!("forward . {DNS_IP}"),
            r#"forward . {{ .Values.dns.clusterIP | default "<causeway-dns ClusterIP>" }}"#,
        ),
        (RANGE.into(), "{{ .Values.clusterIPRange }}"),
        (
            format!("'{PORT_BASE}'"),
            "'{{ .Values.gateway.importPortBase }}'",
        ),
        (
            PORT_BASE.to_string(),
            "{{ .Values.gateway.importPortBase }}",
        ),
    ]
}

/// One object as template text: markers replaced, and the DNS Service's
/// fixed ClusterIP only when one is set.
fn template(obj: &Value) -> String {
    let mut text = to_yaml(std::slice::from_ref(obj));
    let mut out = String::new();
    for line in text.lines() {
        if line.trim() == format!("clusterIP: {DNS_IP}") {
            let indent = &line[..line.len() - line.trim_start().len()];
            out.push_str(&format!(
                "{{{{- with .Values.dns.clusterIP }}}}\n{indent}clusterIP: {{{{ . }}}}\n{{{{- end }}}}\n"
            ));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    text = out;
    for (marker, expr) in expressions() {
        text = text.replace(&marker, expr);
    }
    text
}

const HEADER: &str = "# Generated from kube/src/install.rs by kube/src/chart.rs; do not edit\n# (CAUSEWAY_BLESS=1 cargo test -p causeway-kube rewrites it).\n";

const CHART_YAML: &str = "apiVersion: v2
name: causeway
description: A causeway site — east-west gateways over QUIC with mutual TLS, mesh DNS for clusterset.local, the Multi-Cluster Services agent, and optionally three federation controllers
type: application
version: 0.1.0
appVersion: \"0.1.0\"
kubeVersion: \">=1.29.0-0\"
";

const VALUES_YAML: &str = "# The site's name (a DNS label), as joined to the federation. Required.
site: \"\"
# Container image of the causeway binary.
image: \"causeway:0.1.0\"
# Where other sites reach this site's gateways: ip:port of the tunnel
# LoadBalancer, one per gateway replica (ip:port;weight=N to weigh them).
# Required.
advertise: []
# The zone the mesh DNS serves.
zone: clusterset.local
# The ClusterSetIP range: a part of the cluster's Service CIDR kept for
# causeway (derived Services take their ClusterIPs there; the mesh DNS
# answers them). Keep it clear of addresses already in use.
clusterIPRange: 10.96.0.128/25
gateway:
  replicas: 1
  # The first port of the gateways' import listeners (one per imported
  # service port).
  importPortBase: 20000
dns:
  # A fixed ClusterIP for the mesh DNS Service (the CoreDNS stanza
  # forwards clusterset.local to it); empty: Kubernetes picks one.
  clusterIP: \"\"
controllers:
  # Host three federation controllers in this site (a StatefulSet with
  # persistent volumes). For one or five use `causeway install`.
  enabled: false
";

const NOTES: &str = "causeway site {{ .Values.site }} is installed in {{ .Release.Namespace }}.

Before the pods start, create the site's state Secret from a joined state
directory (see the README, \"Install into Kubernetes\"):

  kubectl -n {{ .Release.Namespace }} create secret generic causeway-site --from-file=STATE_DIR

Then add the ConfigMap causeway-coredns-stanza's clusterset.server to
CoreDNS's Corefile, and export a Service with a ServiceExport of the same
name and namespace.
";

/// The chart's files: (path under the chart directory, contents).
pub fn files() -> Vec<(String, String)> {
    let mut out = vec![
        ("Chart.yaml".to_string(), CHART_YAML.to_string()),
        ("values.yaml".to_string(), VALUES_YAML.to_string()),
        ("templates/NOTES.txt".to_string(), NOTES.to_string()),
    ];
    let mut parts: std::collections::BTreeMap<String, String> = Default::default();
    let mut crds = String::new();
    for obj in render(&marked()) {
        match obj["kind"].as_str() {
            // Helm installs into an existing namespace (--create-namespace).
            Some("Namespace") => continue,
            // CRDs go in crds/: installed first, never templated.
            Some("CustomResourceDefinition") => {
                crds.push_str(&to_yaml(std::slice::from_ref(&obj)));
                continue;
            }
            _ => {}
        }
        let component = obj["metadata"]["labels"]["app.kubernetes.io/component"]
            .as_str()
            .unwrap_or("site")
            .to_string();
        parts
            .entry(component)
            .or_default()
            .push_str(&template(&obj));
    }
    out.push(("crds/crds.yaml".to_string(), format!("{HEADER}{crds}")));
    for (component, text) in parts {
        let text = if component == "controller" {
            format!("{{{{- if .Values.controllers.enabled }}}}\n{text}{{{{- end }}}}\n")
        } else {
            text
        };
        out.push((
            format!("templates/{component}.yaml"),
            format!("{HEADER}{text}"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chart in deploy/ is what this module generates.
    #[test]
    fn the_chart_in_deploy_is_current() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(CHART_DIR);
        let bless = std::env::var_os("CAUSEWAY_BLESS").is_some();
        for (path, want) in files() {
            let path = root.join(path);
            if bless {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &want).unwrap();
            }
            let have = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                have == want,
                "{} is stale: run CAUSEWAY_BLESS=1 cargo test -p causeway-kube and review the diff",
                path.display()
            );
        }
    }

    #[test]
    fn no_marker_is_left_in_the_templates() {
        for (path, text) in files() {
            for marker in [
                SITE, NAMESPACE, IMAGE, ZONE, ADVERTISE, DNS_IP, RANGE, "7771", "27771",
            ] {
                assert!(!text.contains(marker), "{marker} left in {path}");
            }
        }
    }
}
