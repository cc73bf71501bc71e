//! The import side against the fake API server.

use std::collections::BTreeMap;

use causeway_api::model::Protocol;
use serde_json::json;

use super::*;
use crate::export::{Port, SessionAffinity};
use crate::fake::FakeApi;
use crate::import::derived_name;

const IMPORTS: &str = "apis/multicluster.x-k8s.io/v1alpha1/serviceimports";
const SERVICES: &str = "api/v1/services";
const SLICES: &str = "apis/discovery.k8s.io/v1/endpointslices";

fn key(s: &str) -> ServiceKey {
    s.parse().unwrap()
}

fn web() -> Imported {
    Imported {
        key: key("shop/web"),
        headless: false,
        session_affinity: SessionAffinity::None,
        ports: vec![Port {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Http,
        }],
        clusters: vec!["east".into(), "west".into()],
        requested_ip: None,
        cluster_ip: None,
        endpoints: vec![],
    }
}

fn gateways() -> Gateways {
    Gateways {
        site: "central".into(),
        pod_ips: vec!["10.3.0.4".parse().unwrap(), "10.3.0.5".parse().unwrap()],
        listen_ports: BTreeMap::from([((key("shop/web"), 80), 20080)]),
    }
}

#[tokio::test]
async fn an_import_gets_its_objects_wired_together_and_a_clusterset_ip() {
    let api = FakeApi::new();
    let client = api.client();
    let report = sync_imports(&client, &[web()], &gateways()).await.unwrap();
    assert!(report.deleted.is_empty(), "{report:?}");

    let si = api.get(IMPORTS, "shop", "web").expect("a ServiceImport");
    let derived = derived_name(&key("shop/web"));
    let svc = api
        .get(SERVICES, "shop", &derived)
        .expect("a derived Service");
    let ip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
    assert!(
        ip.starts_with("10.96."),
        "allocated by the API server: {ip}"
    );
    assert_eq!(
        si["spec"]["ips"],
        json!([ip]),
        "the ServiceImport carries the ClusterIP"
    );
    assert_eq!(si["spec"]["type"], "ClusterSetIP");
    assert_eq!(
        si["status"]["clusters"],
        json!([{"cluster": "east"}, {"cluster": "west"}])
    );
    assert_eq!(
        svc["metadata"]["ownerReferences"][0]["kind"],
        "ServiceImport"
    );
    assert_eq!(
        svc["metadata"]["ownerReferences"][0]["uid"],
        si["metadata"]["uid"]
    );
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 20080);
    let slice = api
        .get(SLICES, "shop", &format!("{derived}-central-ipv4"))
        .expect("an EndpointSlice of the gateway pods");
    assert_eq!(
        slice["metadata"]["labels"]["kubernetes.io/service-name"],
        json!(derived)
    );
    assert_eq!(
        slice["metadata"]["ownerReferences"][0]["uid"],
        svc["metadata"]["uid"]
    );
    let addrs: Vec<&str> = slice["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["addresses"][0].as_str().unwrap())
        .collect();
    assert_eq!(addrs, ["10.3.0.4", "10.3.0.5"]);
}

#[tokio::test]
async fn a_second_pass_and_a_restarted_agent_change_nothing() {
    let api = FakeApi::new();
    sync_imports(&api.client(), &[web()], &gateways())
        .await
        .unwrap();
    let before: Vec<_> = [IMPORTS, SERVICES, SLICES]
        .iter()
        .flat_map(|c| api.list(c))
        .collect();
    // A new client stands for a restarted agent.
    let report = sync_imports(&api.client(), &[web()], &gateways())
        .await
        .unwrap();
    assert_eq!(report, Report::default());
    let after: Vec<_> = [IMPORTS, SERVICES, SLICES]
        .iter()
        .flat_map(|c| api.list(c))
        .collect();
    assert_eq!(before, after);
}

#[tokio::test]
async fn gateway_pods_coming_and_going_update_the_slices() {
    let api = FakeApi::new();
    let client = api.client();
    sync_imports(&client, &[web()], &gateways()).await.unwrap();
    let mut gw = gateways();
    gw.pod_ips = vec!["10.3.0.9".parse().unwrap(), "fd00::9".parse().unwrap()];
    let report = sync_imports(&client, &[web()], &gw).await.unwrap();
    let derived = derived_name(&key("shop/web"));
    let v4 = api
        .get(SLICES, "shop", &format!("{derived}-central-ipv4"))
        .unwrap();
    assert_eq!(
        v4["endpoints"],
        json!([{"addresses": ["10.3.0.9"], "conditions": {"ready": true}}])
    );
    assert!(api
        .get(SLICES, "shop", &format!("{derived}-central-ipv6"))
        .is_some());
    assert_eq!(report.written.len(), 2, "{report:?}");
    gw.pod_ips.pop();
    let report = sync_imports(&client, &[web()], &gw).await.unwrap();
    assert_eq!(
        report.deleted,
        [format!("EndpointSlice shop/{derived}-central-ipv6")]
    );
}

#[tokio::test]
async fn an_import_that_goes_away_takes_its_objects_and_nothing_else() {
    let api = FakeApi::new();
    let client = api.client();
    // A user's own Service is never touched.
    api.put(
        SERVICES,
        json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "mine", "namespace": "shop"}, "spec": {"ports": [{"port": 1}]}}),
    );
    let mut db = web();
    db.key = key("data/db");
    sync_imports(&client, &[web(), db.clone()], &gateways())
        .await
        .unwrap();
    assert_eq!(api.list(IMPORTS).len(), 2);
    let report = sync_imports(&client, &[db], &gateways()).await.unwrap();
    let derived = derived_name(&key("shop/web"));
    let mut deleted = report.deleted.clone();
    deleted.sort();
    assert_eq!(
        deleted,
        [
            format!("EndpointSlice shop/{derived}-central-ipv4"),
            format!("Service shop/{derived}"),
            "ServiceImport shop/web".to_string(),
        ]
    );
    assert!(api.get(SERVICES, "shop", "mine").is_some());
    assert!(api.get(IMPORTS, "data", "db").is_some());
}

#[tokio::test]
async fn an_api_error_stops_the_pass_and_the_next_one_completes() {
    let api = FakeApi::new();
    let client = api.client();
    api.fail_next(1);
    let err = sync_imports(&client, &[web()], &gateways())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ServiceImport shop/web"), "{err}");
    sync_imports(&client, &[web()], &gateways()).await.unwrap();
    assert!(api.get(IMPORTS, "shop", "web").is_some());
}
