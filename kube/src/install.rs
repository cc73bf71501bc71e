//! `causeway install`: the manifests that put one site into Kubernetes —
//! namespace, the MCS CRDs, service accounts with least-privilege RBAC,
//! the gateway (Deployment, its QUIC Service and config), the mesh DNS
//! server (Deployment, Service, and the CoreDNS stanza that forwards
//! `clusterset.local` to it), the agent (Deployment, leader election on a
//! Lease) and, where the site hosts them, the controllers (StatefulSet with
//! stable ids and volumes, headless Service, PodDisruptionBudget); every
//! pod non-root with a read-only root filesystem, resources and probes on
//! the admin ports, and NetworkPolicies admitting only what each part
//! serves.
//!
//! The site's state — its CA, its controller API credential and the pinned
//! controller CA, as a gateway writes them when it joins — is the Secret
//! `causeway-site` (created once from a joined state directory, see the
//! README), mounted read-only by the gateway, the DNS server and the agent;
//! the controllers' CA is the Secret `causeway-controller-ca`.
//!
//! Rendering is pure: [`render`] turns [`Options`] into a list of objects.
//! `deploy/validate` checks the output against the Kubernetes 1.33 schemas.

use serde_json::{json, Value};

use crate::crd::{ServiceExport, ServiceImport};

/// What a site's manifests are rendered from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The site's name (a DNS label).
    pub site: String,
    /// The namespace causeway runs in.
    pub namespace: String,
    /// The container image of the `causeway` binary.
    pub image: String,
    /// Gateway replicas.
    pub gateway_replicas: u32,
    /// Controller nodes hosted by this site (0: none; else 3 or 5).
    pub controllers: u32,
    /// Controller API endpoints (`host:port`) the site's parts call.
    pub controller_endpoints: Vec<String>,
    /// The ClusterIP to request for the mesh DNS Service (CoreDNS forwards
    /// `clusterset.local` to it), if fixed.
    pub dns_cluster_ip: Option<String>,
    /// The zone the mesh DNS serves.
    pub zone: String,
    /// Where other sites reach this site's gateways (`ip:port`, e.g. the
    /// tunnel Service's LoadBalancer address).
    pub advertise: Vec<String>,
    /// The ClusterSetIP range: a part of the cluster's Service CIDR kept
    /// for causeway. Derived Services ask for their ClusterIP there and
    /// the mesh DNS answers from it. Pick it in the band Kubernetes
    /// allocates from last (the start of the Service CIDR) and clear of
    /// addresses already taken (e.g. kube-dns's).
    pub cluster_ip_range: String,
    /// The gateways' first import listener port.
    pub import_port_base: u16,
}

impl Options {
    /// Defaults for site `site`.
    pub fn new(site: &str) -> Self {
        Self {
            site: site.into(),
            namespace: "causeway-system".into(),
            image: format!("causeway:{}", env!("CARGO_PKG_VERSION")),
            gateway_replicas: 1,
            controllers: 0,
            controller_endpoints: Vec::new(),
            dns_cluster_ip: None,
            zone: "clusterset.local".into(),
            advertise: Vec::new(),
            cluster_ip_range: DEFAULT_CLUSTER_IP_RANGE.into(),
            import_port_base: 20000,
        }
    }

    /// Every problem with the options, at once.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let mut errs = Vec::new();
        if causeway_api::model::check_dns_label("site", &self.site).is_err() {
            errs.push(format!("site: {:?} must be a DNS label", self.site));
        }
        if causeway_api::model::check_dns_label("namespace", &self.namespace).is_err() {
            errs.push(format!(
                "namespace: {:?} must be a DNS label",
                self.namespace
            ));
        }
        if !matches!(self.controllers, 0 | 1 | 3 | 5) {
            errs.push(format!(
                "controllers: {} — run 3 or 5 (a majority must survive a failure), 1 for a trial, or 0",
                self.controllers
            ));
        }
        if self.controllers == 0 && self.controller_endpoints.is_empty() {
            errs.push(
                "controller_endpoints: give the controllers' host:port when this site hosts none"
                    .into(),
            );
        }
        if self.gateway_replicas == 0 {
            errs.push("gateway_replicas: at least 1".into());
        }
        if self.advertise.is_empty() {
            errs.push(format!(
                "advertise: give the address other sites reach this site's gateways at (the tunnel LoadBalancer's ip:{TUNNEL})"
            ));
        }
        for a in &self.advertise {
            if a.parse::<causeway_api::model::TunnelAddr>().is_err() {
                errs.push(format!("advertise: {a:?} is not ip:port[;weight=N]"));
            }
        }
        if self.image.is_empty() {
            errs.push("image: required".into());
        }
        if let Err(e) = causeway_api::model::parse_cidr("cluster_ip_range", &self.cluster_ip_range)
        {
            errs.push(format!("cluster_ip_range: {e} inside the cluster's Service CIDR (default {DEFAULT_CLUSTER_IP_RANGE})"));
        }
        if self.import_port_base < 1024 {
            errs.push(format!(
                "import_port_base: {} is a privileged port; use 1024 or above (default 20000)",
                self.import_port_base
            ));
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }
}

/// The default ClusterSetIP range: the upper half of the first /24 of
/// kubeadm's default Service CIDR (10.96.0.0/12), which Kubernetes
/// allocates from only when the rest is full, clear of kube-dns's
/// 10.96.0.10.
pub const DEFAULT_CLUSTER_IP_RANGE: &str = "10.96.0.128/25";

const GATEWAY_ADMIN: u16 = 9201;
const DNS_ADMIN: u16 = 9301;
const AGENT_ADMIN: u16 = 9401;
const CONTROLLER_ADMIN: u16 = 9101;
const CONTROLLER_API: u16 = 7001;
const TUNNEL: u16 = 15443;
const DNS_PORT: u16 = 5353;

fn labels(o: &Options, component: &str) -> Value {
    json!({
        "app.kubernetes.io/name": "causeway",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/instance": o.site,
        "app.kubernetes.io/managed-by": "causeway",
    })
}

fn selector(component: &str) -> Value {
    json!({"app.kubernetes.io/name": "causeway", "app.kubernetes.io/component": component})
}

fn meta(o: &Options, name: &str, component: &str) -> Value {
    json!({"name": name, "namespace": o.namespace, "labels": labels(o, component)})
}

/// The hardened security context of every causeway container.
fn container_security() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "readOnlyRootFilesystem": true,
        "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"}
    })
}

fn probes(port: u16) -> Value {
    json!({
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": port}, "periodSeconds": 10, "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": port}, "periodSeconds": 5, "failureThreshold": 2}
    })
}

fn container(
    o: &Options,
    name: &str,
    args: Vec<String>,
    admin: u16,
    ports: Value,
    resources: Value,
) -> Value {
    let mut c = json!({
        "name": name,
        "image": o.image,
        "args": args,
        "ports": ports,
        "resources": resources,
        "securityContext": container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]
    });
    let p = probes(admin);
    c["livenessProbe"] = p["livenessProbe"].clone();
    c["readinessProbe"] = p["readinessProbe"].clone();
    c
}

fn pod_spec(account: &str, containers: Value, volumes: Value) -> Value {
    let mut vols = vec![json!({"name": "tmp", "emptyDir": {}})];
    vols.extend(volumes.as_array().cloned().unwrap_or_default());
    json!({
        "serviceAccountName": account,
        "automountServiceAccountToken": matches!(account, "causeway-agent" | "causeway-gateway"),
        "securityContext": {"runAsNonRoot": true, "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": containers,
        "volumes": vols
    })
}

fn resources(cpu: &str, mem: &str, mem_limit: &str) -> Value {
    json!({"requests": {"cpu": cpu, "memory": mem}, "limits": {"memory": mem_limit}})
}

fn service_account(o: &Options, name: &str, component: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(o, name, component),
           "automountServiceAccountToken": false})
}

fn controllers_csv(o: &Options) -> String {
    if o.controllers > 0 {
        (0..o.controllers)
            .map(|i| {
                format!(
                    "causeway-controller-{i}.causeway-controller.{}.svc:{CONTROLLER_API}",
                    o.namespace
                )
            })
            .collect::<Vec<_>>()
            .join(",")
    } else {
        o.controller_endpoints.join(",")
    }
}

/// Every object of the site, in apply order.
pub fn render(o: &Options) -> Vec<Value> {
    let mut out = vec![json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": o.namespace, "labels": {
            "app.kubernetes.io/name": "causeway",
            "pod-security.kubernetes.io/enforce": "restricted"}}
    })];
    use kube::CustomResourceExt;
    out.push(serde_json::to_value(ServiceExport::crd()).expect("CRD JSON"));
    out.push(serde_json::to_value(ServiceImport::crd()).expect("CRD JSON"));
    out.extend(crate::policy::crds());
    out.extend(agent(o));
    out.extend(gateway(o));
    out.extend(dns(o));
    if o.controllers > 0 {
        out.extend(controllers(o));
    }
    out.extend(network_policies(o));
    out
}

/// The policy resources (with a subresource `suffix`), for RBAC rules.
fn policy_resources(suffix: &str) -> Vec<String> {
    causeway_api::policy::KINDS
        .iter()
        .map(|k| format!("{}{suffix}", crate::policy::plural(*k)))
        .collect()
}

fn agent(o: &Options) -> Vec<Value> {
    let rules = json!([
        {"apiGroups": ["multicluster.x-k8s.io"], "resources": ["serviceexports"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["multicluster.x-k8s.io"], "resources": ["serviceexports/status"], "verbs": ["patch"]},
        {"apiGroups": ["multicluster.x-k8s.io"], "resources": ["serviceimports"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
        {"apiGroups": ["multicluster.x-k8s.io"], "resources": ["serviceimports/status"], "verbs": ["patch"]},
        {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
        {"apiGroups": [crate::policy::GROUP], "resources": policy_resources(""), "verbs": ["get", "list", "watch"]},
        {"apiGroups": [crate::policy::GROUP], "resources": policy_resources("/status"), "verbs": ["patch"]},
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]}
    ]);
    let args = vec![
        "agent".into(),
        "--site".into(),
        o.site.clone(),
        "--state-dir".into(),
        "/var/lib/causeway".into(),
        "--namespace".into(),
        o.namespace.clone(),
        "--admin-listen".into(),
        format!("0.0.0.0:{AGENT_ADMIN}"),
        "--gateway-service".into(),
        "causeway-gateway".into(),
        "--cluster-ip-range".into(),
        o.cluster_ip_range.clone(),
        "--import-port-base".into(),
        o.import_port_base.to_string(),
    ];
    vec![
        service_account(o, "causeway-agent", "agent"),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": "causeway-agent", "labels": labels(o, "agent")}, "rules": rules}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "causeway-agent", "labels": labels(o, "agent")},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "causeway-agent"},
               "subjects": [{"kind": "ServiceAccount", "name": "causeway-agent", "namespace": o.namespace}]}),
        // Leader election: this namespace only.
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": meta(o, "causeway-agent", "agent"),
        "rules": [
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]}
        ]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": meta(o, "causeway-agent", "agent"),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "causeway-agent"},
               "subjects": [{"kind": "ServiceAccount", "name": "causeway-agent", "namespace": o.namespace}]}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": meta(o, "causeway-agent", "agent"),
               "spec": {"replicas": 2, "selector": {"matchLabels": selector("agent")},
                        "template": {"metadata": {"labels": labels(o, "agent")},
                                     "spec": pod_spec("causeway-agent", json!([container(o, "agent", args,
                                          AGENT_ADMIN, json!([{"name": "admin", "containerPort": AGENT_ADMIN}]),
                                          resources("50m", "64Mi", "256Mi"))]),
                                       json!([{"name": "state", "secret": {"secretName": "causeway-site", "defaultMode": 288}}]))}}}),
    ]
}

fn gateway(o: &Options) -> Vec<Value> {
    let advertise: Vec<String> = o.advertise.iter().map(|a| format!("{a:?}")).collect();
    let config = format!(
        "state_dir = \"/var/lib/causeway\"\ntunnel_listen = \"0.0.0.0:{TUNNEL}\"\ntunnel_advertise = [{}]\n\n[kubernetes]\nimport_listen = \"0.0.0.0\"\nimport_port_base = {}\n",
        advertise.join(", "),
        o.import_port_base
    );
    let mut c = container(
        o,
        "gateway",
        vec![
            "gateway".into(),
            "--config".into(),
            "/etc/causeway/gateway.toml".into(),
            "--admin-listen".into(),
            format!("0.0.0.0:{GATEWAY_ADMIN}"),
        ],
        GATEWAY_ADMIN,
        json!([{"name": "tunnel", "containerPort": TUNNEL, "protocol": "UDP"},
               {"name": "admin", "containerPort": GATEWAY_ADMIN}]),
        resources("250m", "64Mi", "512Mi"),
    );
    // Each replica's identity is its pod's name.
    c["env"] = json!([{"name": "CAUSEWAY_REPLICA", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]);
    c["volumeMounts"] = json!([{"name": "tmp", "mountPath": "/tmp"},
                               {"name": "config", "mountPath": "/etc/causeway", "readOnly": true},
                               {"name": "state", "mountPath": "/var/lib/causeway", "readOnly": true}]);
    // The gateway reads what the site exports and where its endpoints are;
    // it writes nothing.
    let rules = json!([
        {"apiGroups": ["multicluster.x-k8s.io"], "resources": ["serviceexports"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
    ]);
    vec![
        service_account(o, "causeway-gateway", "gateway"),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": "causeway-gateway", "labels": labels(o, "gateway")}, "rules": rules}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "causeway-gateway", "labels": labels(o, "gateway")},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "causeway-gateway"},
               "subjects": [{"kind": "ServiceAccount", "name": "causeway-gateway", "namespace": o.namespace}]}),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(o, "causeway-gateway", "gateway"),
               "data": {"gateway.toml": config}}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(o, "causeway-gateway", "gateway"),
               "spec": {"replicas": o.gateway_replicas,
                        "selector": {"matchLabels": selector("gateway")},
                        "template": {"metadata": {"labels": labels(o, "gateway")},
                                     "spec": pod_spec("causeway-gateway", json!([c]), json!([
                                         {"name": "config", "configMap": {"name": "causeway-gateway"}},
                                         {"name": "state", "secret": {"secretName": "causeway-site", "defaultMode": 288}}]))}}}),
        // Other sites' gateways dial this one over QUIC (UDP).
        json!({"apiVersion": "v1", "kind": "Service", "metadata": meta(o, "causeway-gateway", "gateway"),
               "spec": {"type": "LoadBalancer", "selector": selector("gateway"),
                        "ports": [{"name": "tunnel", "port": TUNNEL, "targetPort": TUNNEL, "protocol": "UDP"}]}}),
    ]
}

fn dns(o: &Options) -> Vec<Value> {
    let args = vec![
        "dns".into(),
        "--state-dir".into(),
        "/var/lib/causeway".into(),
        "--listen".into(),
        format!("0.0.0.0:{DNS_PORT}"),
        "--zone".into(),
        o.zone.clone(),
        "--vip-range".into(),
        o.cluster_ip_range.clone(),
        "--admin-listen".into(),
        format!("0.0.0.0:{DNS_ADMIN}"),
    ];
    let mut c = container(
        o,
        "dns",
        args,
        DNS_ADMIN,
        json!([{"name": "dns-udp", "containerPort": DNS_PORT, "protocol": "UDP"},
               {"name": "dns-tcp", "containerPort": DNS_PORT, "protocol": "TCP"},
               {"name": "admin", "containerPort": DNS_ADMIN}]),
        resources("100m", "32Mi", "256Mi"),
    );
    c["volumeMounts"] = json!([{"name": "tmp", "mountPath": "/tmp"},
                               {"name": "state", "mountPath": "/var/lib/causeway", "readOnly": true}]);
    let mut svc_spec = json!({"selector": selector("dns"), "ports": [
        {"name": "dns-udp", "port": 53, "targetPort": DNS_PORT, "protocol": "UDP"},
        {"name": "dns-tcp", "port": 53, "targetPort": DNS_PORT, "protocol": "TCP"}]});
    if let Some(ip) = &o.dns_cluster_ip {
        svc_spec["clusterIP"] = json!(ip);
    }
    let target = o
        .dns_cluster_ip
        .clone()
        .unwrap_or_else(|| "<causeway-dns ClusterIP>".into());
    vec![
        service_account(o, "causeway-dns", "dns"),
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(o, "causeway-dns", "dns"),
               "spec": {"replicas": 2, "selector": {"matchLabels": selector("dns")},
                        "template": {"metadata": {"labels": labels(o, "dns")},
                                     "spec": pod_spec("causeway-dns", json!([c]), json!([
                                         {"name": "state", "secret": {"secretName": "causeway-site", "defaultMode": 288}}]))}}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": meta(o, "causeway-dns", "dns"), "spec": svc_spec}),
        // Add this stanza to CoreDNS's Corefile (kube-system/coredns):
        // pods then resolve <svc>.<ns>.svc.clusterset.local through causeway.
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(o, "causeway-coredns-stanza", "dns"),
               "data": {"clusterset.server": format!("{}:53 {{\n    forward . {target}\n    cache 5\n}}\n", o.zone)}}),
    ]
}

fn controllers(o: &Options) -> Vec<Value> {
    let n = o.controllers;
    let peers: Vec<String> = (0..n)
        .flat_map(|i| {
            vec![
                "--peer".to_string(),
                format!(
                    "{}=causeway-controller-{i}.causeway-controller.{}.svc:{CONTROLLER_API}",
                    i + 1,
                    o.namespace
                ),
            ]
        })
        .collect();
    // The node id is the StatefulSet ordinal + 1, read from the pod name.
    let mut script =
        String::from("id=$(( ${HOSTNAME##*-} + 1 )); exec causeway controller --id \"$id\"");
    script.push_str(&format!(
        " --listen 0.0.0.0:{CONTROLLER_API} --advertise \"$HOSTNAME.causeway-controller.{}.svc:{CONTROLLER_API}\" --data-dir /var/lib/causeway/data --ca-dir /etc/causeway/ca --admin-listen 0.0.0.0:{CONTROLLER_ADMIN} {}",
        o.namespace,
        peers.join(" ")
    ));
    let mut c = container(
        o,
        "controller",
        vec![],
        CONTROLLER_ADMIN,
        json!([{"name": "api", "containerPort": CONTROLLER_API}, {"name": "admin", "containerPort": CONTROLLER_ADMIN}]),
        resources("250m", "128Mi", "1Gi"),
    );
    c["command"] = json!(["/bin/sh", "-c", script]);
    c.as_object_mut().map(|m| m.remove("args"));
    c["volumeMounts"] = json!([{"name": "tmp", "mountPath": "/tmp"},
                               {"name": "data", "mountPath": "/var/lib/causeway"},
                               {"name": "ca", "mountPath": "/etc/causeway/ca", "readOnly": true}]);
    vec![
        service_account(o, "causeway-controller", "controller"),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": meta(o, "causeway-controller", "controller"),
               "spec": {"clusterIP": "None", "publishNotReadyAddresses": true, "selector": selector("controller"),
                        "ports": [{"name": "api", "port": CONTROLLER_API}]}}),
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta(o, "causeway-controller", "controller"),
               "spec": {"replicas": n, "serviceName": "causeway-controller", "podManagementPolicy": "Parallel",
                        "selector": {"matchLabels": selector("controller")},
                        "template": {"metadata": {"labels": labels(o, "controller")},
                                     "spec": pod_spec("causeway-controller", json!([c]), json!([
                                         {"name": "ca", "secret": {"secretName": "causeway-controller-ca"}}]))},
                        "volumeClaimTemplates": [{"metadata": {"name": "data"},
                            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]}}),
        json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta(o, "causeway-controller", "controller"),
               "spec": {"minAvailable": n / 2 + 1, "selector": {"matchLabels": selector("controller")}}}),
    ]
}

fn network_policies(o: &Options) -> Vec<Value> {
    let admin_from_namespace = |port: u16| json!({"from": [{"namespaceSelector": {}}], "ports": [{"port": port, "protocol": "TCP"}]});
    let mut out = vec![
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta(o, "causeway-gateway", "gateway"),
               "spec": {"podSelector": {"matchLabels": selector("gateway")}, "policyTypes": ["Ingress"],
                        "ingress": [{"ports": [{"port": TUNNEL, "protocol": "UDP"}]},
                                    {"from": [{"namespaceSelector": {}}], "ports": [{"port": o.import_port_base, "endPort": 65535, "protocol": "TCP"}]},
                                    admin_from_namespace(GATEWAY_ADMIN)]}}),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta(o, "causeway-dns", "dns"),
               "spec": {"podSelector": {"matchLabels": selector("dns")}, "policyTypes": ["Ingress"],
                        "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [
                            {"port": DNS_PORT, "protocol": "UDP"}, {"port": DNS_PORT, "protocol": "TCP"}]},
                            admin_from_namespace(DNS_ADMIN)]}}),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta(o, "causeway-agent", "agent"),
               "spec": {"podSelector": {"matchLabels": selector("agent")}, "policyTypes": ["Ingress"],
                        "ingress": [admin_from_namespace(AGENT_ADMIN)]}}),
    ];
    if o.controllers > 0 {
        out.push(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta(o, "causeway-controller", "controller"),
            "spec": {"podSelector": {"matchLabels": selector("controller")}, "policyTypes": ["Ingress"],
                     "ingress": [{"ports": [{"port": CONTROLLER_API, "protocol": "TCP"}]}, admin_from_namespace(CONTROLLER_ADMIN)]}}));
    }
    out
}

/// The objects as one multi-document YAML text.
pub fn to_yaml(objects: &[Value]) -> String {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(o).expect("JSON values serialize as YAML"));
    }
    out
}

/// The controllers' endpoints as the site's parts are given them.
pub fn controller_endpoints(o: &Options) -> String {
    controllers_csv(o)
}

#[cfg(test)]
mod tests;
