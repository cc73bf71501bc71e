use serde_json::json;

use super::*;

fn key() -> ServiceKey {
    "shop/web".parse().unwrap()
}

fn imported(headless: bool) -> Imported {
    Imported {
        key: key(),
        headless,
        session_affinity: SessionAffinity::None,
        ports: vec![
            Port {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Http,
            },
            Port {
                name: "grpc".into(),
                port: 9090,
                protocol: Protocol::Http2,
            },
        ],
        clusters: vec!["east".into(), "west".into()],
        requested_ip: None,
        cluster_ip: Some("10.96.3.4".into()),
        endpoints: vec![
            (
                "east".into(),
                ReadyEndpoint {
                    ip: "10.1.0.7".parse().unwrap(),
                    hostname: Some("web-0".into()),
                },
            ),
            (
                "west".into(),
                ReadyEndpoint {
                    ip: "10.2.0.9".parse().unwrap(),
                    hostname: None,
                },
            ),
        ],
    }
}

fn gateways() -> Gateways {
    Gateways {
        site: "central".into(),
        pod_ips: vec![
            "10.3.0.5".parse().unwrap(),
            "10.3.0.4".parse().unwrap(),
            "fd00::5".parse().unwrap(),
        ],
        listen_ports: BTreeMap::from([((key(), 80), 20080), ((key(), 9090), 20081)]),
    }
}

#[test]
fn the_derived_name_is_a_stable_dns_label() {
    let n = derived_name(&key());
    assert!(n.starts_with("cw-") && n.ends_with("-web"), "{n}");
    assert_eq!(n, derived_name(&key()));
    assert_ne!(n, derived_name(&"other/web".parse().unwrap()));
    let long: ServiceKey = format!("shop/{}", "a".repeat(63)).parse().unwrap();
    assert!(derived_name(&long).len() <= 63);
}

#[test]
fn a_clusterset_ip_import_is_the_mcs_service_import() {
    let si = serde_json::to_value(service_import(&imported(false))).unwrap();
    assert_eq!(
        si,
        json!({
            "apiVersion": "multicluster.x-k8s.io/v1alpha1",
            "kind": "ServiceImport",
            "metadata": {"name": "web", "namespace": "shop",
                "labels": {"app.kubernetes.io/managed-by": "causeway", "multicluster.kubernetes.io/service-name": "web"}},
            "spec": {
                "ports": [
                    {"name": "http", "protocol": "TCP", "appProtocol": "http", "port": 80},
                    {"name": "grpc", "protocol": "TCP", "appProtocol": "kubernetes.io/h2c", "port": 9090}
                ],
                "ips": ["10.96.3.4"],
                "type": "ClusterSetIP"
            },
            "status": {"clusters": [{"cluster": "east"}, {"cluster": "west"}]}
        })
    );
}

#[test]
fn a_clusterset_ip_import_fronts_the_gateway_pods_on_their_listen_ports() {
    let owner = OwnerReference {
        api_version: "multicluster.x-k8s.io/v1alpha1".into(),
        kind: "ServiceImport".into(),
        name: "web".into(),
        uid: "u-1".into(),
        controller: Some(true),
        ..Default::default()
    };
    let svc = derived_service(&imported(false), &gateways(), Some(owner.clone()));
    let spec = svc.spec.as_ref().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(spec.cluster_ip, None, "Kubernetes allocates it");
    assert!(spec.selector.is_none(), "the agent writes its endpoints");
    let targets: Vec<(i32, IntOrString)> = spec
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| (p.port, p.target_port.clone().unwrap()))
        .collect();
    assert_eq!(
        targets,
        vec![
            (80, IntOrString::Int(20080)),
            (9090, IntOrString::Int(20081))
        ]
    );
    assert_eq!(svc.metadata.owner_references, Some(vec![owner]));

    let slices = endpoint_slices(&imported(false), &gateways(), None);
    assert_eq!(slices.len(), 2, "one per address family");
    let v4 = &slices[0];
    assert_eq!(v4.address_type, "IPv4");
    let name = derived_name(&key());
    assert_eq!(
        v4.metadata.name.as_deref(),
        Some(format!("{name}-central-ipv4").as_str())
    );
    let labels = v4.metadata.labels.as_ref().unwrap();
    assert_eq!(labels["kubernetes.io/service-name"], name);
    assert_eq!(labels["multicluster.kubernetes.io/service-name"], "web");
    assert_eq!(
        labels["multicluster.kubernetes.io/source-cluster"],
        "central"
    );
    assert_eq!(
        labels["endpointslice.kubernetes.io/managed-by"],
        "causeway.dev/agent"
    );
    let addrs: Vec<&str> = v4
        .endpoints
        .iter()
        .map(|e| e.addresses[0].as_str())
        .collect();
    assert_eq!(addrs, ["10.3.0.4", "10.3.0.5"]);
    let ports: Vec<(Option<&str>, Option<i32>)> = v4
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| (p.name.as_deref(), p.port))
        .collect();
    assert_eq!(
        ports,
        [(Some("http"), Some(20080)), (Some("grpc"), Some(20081))]
    );
    assert_eq!(slices[1].address_type, "IPv6");
    assert_eq!(slices[1].endpoints[0].addresses, ["fd00::5"]);
}

#[test]
fn a_headless_import_lists_each_sites_ready_endpoints() {
    let imp = imported(true);
    let si = service_import(&imp);
    assert_eq!(si.spec.type_, ImportType::Headless);
    assert!(si.spec.ips.is_empty());
    let svc = derived_service(&imp, &gateways(), None);
    assert_eq!(
        svc.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("None")
    );
    let slices = endpoint_slices(&imp, &gateways(), None);
    let by_site: Vec<(String, Vec<String>, Option<String>)> = slices
        .iter()
        .map(|s| {
            (
                s.metadata.labels.as_ref().unwrap()["multicluster.kubernetes.io/source-cluster"]
                    .clone(),
                s.endpoints.iter().map(|e| e.addresses[0].clone()).collect(),
                s.endpoints[0].hostname.clone(),
            )
        })
        .collect();
    assert_eq!(
        by_site,
        vec![
            ("east".into(), vec!["10.1.0.7".into()], Some("web-0".into())),
            ("west".into(), vec!["10.2.0.9".into()], None),
        ]
    );
    // Callers reach headless endpoints on the service's own ports.
    assert_eq!(slices[0].ports.as_ref().unwrap()[0].port, Some(80));
}
