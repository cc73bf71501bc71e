use serde_json::json;

use super::*;

fn export() -> ServiceExport {
    serde_json::from_value(json!({
        "apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
        "metadata": {"name": "web", "namespace": "shop", "generation": 1,
                     "creationTimestamp": "2026-01-02T03:04:05Z"}
    }))
    .unwrap()
}

fn service(spec: serde_json::Value) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": spec
    }))
    .unwrap()
}

fn slice(
    name: &str,
    svc: &str,
    ports: serde_json::Value,
    endpoints: serde_json::Value,
) -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints
    }))
    .unwrap()
}

fn web_service() -> Service {
    service(json!({
        "type": "ClusterIP", "clusterIP": "10.96.0.10",
        "ports": [
            {"name": "http", "port": 80, "protocol": "TCP", "appProtocol": "http", "targetPort": 8080},
            {"name": "grpc", "port": 9090, "protocol": "TCP", "appProtocol": "kubernetes.io/h2c"},
            {"name": "raw", "port": 7000}
        ]
    }))
}

fn web_slices() -> Vec<EndpointSlice> {
    let ports = json!([{"name": "http", "port": 8080}, {"name": "grpc", "port": 9091}, {"name": "raw", "port": 7001}]);
    vec![
        slice(
            "web-a",
            "web",
            ports.clone(),
            json!([
                {"addresses": ["10.0.1.1"], "conditions": {"ready": true}, "zone": "zone-a"},
                {"addresses": ["10.0.1.2"], "conditions": {"ready": false}, "zone": "zone-a"},
                {"addresses": ["10.0.2.1"], "zone": "zone-b"}
            ]),
        ),
        // The same endpoint again (a handover) and one more without a zone.
        slice(
            "web-b",
            "web",
            ports,
            json!([
                {"addresses": ["10.0.2.1"], "conditions": {"ready": true}, "zone": "zone-b"},
                {"addresses": ["10.0.3.1"], "conditions": {"ready": true}}
            ]),
        ),
        // Another Service's slice is not read.
        slice(
            "db-a",
            "db",
            json!([{"name": "http", "port": 5432}]),
            json!([
                {"addresses": ["10.9.9.9"]}
            ]),
        ),
    ]
}

fn exported(d: Decision) -> SiteExport {
    match d {
        Decision::Export(e) => e,
        other => panic!("not exported: {other:?}"),
    }
}

#[test]
fn a_service_and_its_slices_become_an_export_with_per_zone_counts_and_targets() {
    let e = exported(decide(&export(), Some(&web_service()), &web_slices()));
    assert_eq!(e.key.to_string(), "shop/web");
    assert!(!e.headless);
    assert_eq!(e.session_affinity, SessionAffinity::None);
    assert_eq!(
        e.ports,
        vec![
            Port {
                name: "raw".into(),
                port: 7000,
                protocol: Protocol::Tcp
            },
            Port {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Http
            },
            Port {
                name: "grpc".into(),
                port: 9090,
                protocol: Protocol::Http2
            },
        ]
        .into_iter()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>()
    );
    assert_eq!((e.ready, e.total), (3, 4));
    assert_eq!(
        e.zones,
        vec![
            ZoneCount {
                zone: "".into(),
                ready: 1,
                total: 1
            },
            ZoneCount {
                zone: "zone-a".into(),
                ready: 1,
                total: 2
            },
            ZoneCount {
                zone: "zone-b".into(),
                ready: 1,
                total: 1
            },
        ]
    );
    assert!(
        e.endpoints.is_empty(),
        "only headless exports list endpoints"
    );
    assert_eq!(e.exported_at_ms, 1_767_323_045_000);
    let zone_of: Vec<(String, &str)> = e
        .zone_of
        .iter()
        .map(|(ip, z)| (ip.to_string(), z.as_str()))
        .collect();
    assert_eq!(
        zone_of,
        vec![
            ("10.0.1.1".to_string(), "zone-a"),
            ("10.0.1.2".to_string(), "zone-a"),
            ("10.0.2.1".to_string(), "zone-b"),
        ]
    );
    let addrs = |s: &[&str]| {
        s.iter()
            .map(|a| a.parse().unwrap())
            .collect::<Vec<SocketAddr>>()
    };
    assert_eq!(
        e.targets[&80],
        addrs(&["10.0.1.1:8080", "10.0.2.1:8080", "10.0.3.1:8080"])
    );
    assert_eq!(
        e.targets[&9090],
        addrs(&["10.0.1.1:9091", "10.0.2.1:9091", "10.0.3.1:9091"])
    );
    let pb = e.to_pb();
    assert_eq!(pb.service, "shop/web");
    assert_eq!((pb.healthy_endpoints, pb.total_endpoints), (3, 4));
    assert_eq!(pb.zones.len(), 3);
    let http = pb.ports.iter().find(|p| p.port == 80).unwrap();
    assert_eq!(
        (http.protocol.as_str(), http.name.as_str()),
        ("http", "http")
    );
    let want = Want {
        type_: "Valid",
        status: true,
        reason: "Valid",
        message: "Service shop/web is exported: 3 of 4 endpoints ready".into(),
    };
    assert_eq!(
        decide(&export(), Some(&web_service()), &web_slices()).valid_condition(),
        want
    );
}

#[test]
fn endpoints_scaling_to_zero_still_export_the_service_with_no_ready_endpoints() {
    let e = exported(decide(&export(), Some(&web_service()), &[]));
    assert_eq!((e.ready, e.total), (0, 0));
    assert!(e.zones.is_empty());
    assert!(e.targets.values().all(|t| t.is_empty()));
}

#[test]
fn a_headless_service_publishes_its_ready_endpoints_and_hostnames() {
    let svc = service(json!({
        "clusterIP": "None", "sessionAffinity": "ClientIP",
        "ports": [{"name": "pg", "port": 5432}]
    }));
    let slices = vec![slice(
        "web-a",
        "web",
        json!([{"name": "pg", "port": 5432}]),
        json!([
            {"addresses": ["10.0.1.1"], "hostname": "pg-0", "conditions": {"ready": true}},
            {"addresses": ["10.0.1.2"], "hostname": "pg-1", "conditions": {"ready": false}},
            {"addresses": ["10.0.1.3"]}
        ]),
    )];
    let e = exported(decide(&export(), Some(&svc), &slices));
    assert!(e.headless);
    assert_eq!(e.session_affinity, SessionAffinity::ClientIp);
    assert_eq!(
        e.endpoints,
        vec![
            ReadyEndpoint {
                ip: "10.0.1.1".parse().unwrap(),
                hostname: Some("pg-0".into())
            },
            ReadyEndpoint {
                ip: "10.0.1.3".parse().unwrap(),
                hostname: None
            },
        ]
    );
    let pb = e.to_pb();
    assert!(pb.headless);
    assert_eq!(pb.endpoints[0].hostname, "pg-0");
    assert_eq!(pb.endpoints[1].hostname, "");
}

#[test]
fn what_cannot_be_exported_says_why_in_the_valid_condition() {
    let cases: Vec<(Option<Service>, &str, &str)> = vec![
        (None, "ServiceNotFound", "Service shop/web does not exist: create it, or delete this ServiceExport"),
        (
            Some(service(json!({"type": "ExternalName", "externalName": "db.example.com"}))),
            "ServiceTypeInvalid",
            "Service shop/web is of type ExternalName, which has no endpoints to export (MCS KEP-1645 exports ClusterIP and headless Services)",
        ),
        (
            Some(service(json!({"ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}))),
            "ServicePortsInvalid",
            "Service shop/web port 53 is UDP: causeway tunnels carry TCP only; export a Service with TCP ports",
        ),
        (Some(service(json!({}))), "ServicePortsInvalid", "Service shop/web has no ports to export"),
    ];
    for (svc, reason, message) in cases {
        let d = decide(&export(), svc.as_ref(), &web_slices());
        assert_eq!(
            d.valid_condition(),
            Want {
                type_: "Valid",
                status: false,
                reason,
                message: message.into()
            }
        );
    }
}
