//! Two Kubernetes sites end to end. No kube-apiserver can be had on the
//! machines causeway is built on, so each "cluster" is the test API server
//! (`causeway_kube::fake::FakeApi`: the real API's JSON for list, watch
//! with resource versions and bookmarks, create, apply, patch, delete)
//! served over HTTP on loopback, and each site's gateway and agent are real
//! `causeway` processes pointed at it with a kubeconfig. The controllers,
//! gateways, QUIC tunnels and mesh DNS are the real ones. "Pods" are local
//! processes: the exported service's endpoint is an echo server on
//! loopback, the gateway "pods" listen on a loopback address of their own,
//! and kube-proxy is stood in for by a relay on the derived Service's
//! ClusterIP that forwards to the endpoints its EndpointSlices list.

mod common;

use causeway_kube::fake::FakeApi;
use common::*;
use serde_json::{json, Value};

const SERVICES: &str = "api/v1/services";
const SLICES: &str = "apis/discovery.k8s.io/v1/endpointslices";
const EXPORTS: &str = "apis/multicluster.x-k8s.io/v1alpha1/serviceexports";
const IMPORTS: &str = "apis/multicluster.x-k8s.io/v1alpha1/serviceimports";
const NS: &str = "causeway-system";

/// One site's stand-in API server, served on loopback.
struct Cluster {
    api: FakeApi,
    kubeconfig: PathBuf,
    _server: tokio::task::JoinHandle<()>,
}

async fn cluster(tmp: &tempfile::TempDir, name: &str) -> Cluster {
    let api = FakeApi::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = api.serve(listener);
    let kubeconfig = tmp.path().join(format!("kubeconfig-{name}"));
    std::fs::write(&kubeconfig, FakeApi::kubeconfig(addr)).unwrap();
    Cluster {
        api,
        kubeconfig,
        _server: server,
    }
}

/// A fresh /24 in 127/8 (see `vip_range`), and its first address.
fn range_and_first() -> (String, IpAddr) {
    let range = vip_range();
    let first = format!("{}1", range.trim_end_matches("0/24"));
    (range, first.parse().unwrap())
}

fn echo_service() -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "echo", "namespace": "shop"},
           "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.20",
                    "ports": [{"name": "tcp", "port": 7000, "protocol": "TCP"}]}})
}

/// The EndpointSlice of `service` in `ns` with these ready endpoints.
fn slice(ns: &str, service: &str, port: Option<(&str, u16)>, ready: &[IpAddr]) -> Value {
    let endpoints: Vec<Value> = ready
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    let ports: Vec<Value> = port
        .map(|(name, p)| json!({"name": name, "port": p, "protocol": "TCP"}))
        .into_iter()
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{service}-x1"), "namespace": ns,
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "ports": ports, "endpoints": endpoints})
}

fn service_export() -> Value {
    json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
           "metadata": {"name": "echo", "namespace": "shop"}})
}

/// The condition `type_` of ServiceExport shop/echo, as (status, reason).
fn condition(api: &FakeApi, type_: &str) -> Option<(String, String)> {
    let se = api.get(EXPORTS, "shop", "echo")?;
    let c = se["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)?
        .clone();
    Some((
        c["status"].as_str()?.to_string(),
        c["reason"].as_str()?.to_string(),
    ))
}

/// The derived Service of `shop/<name>` (labelled with the MCS service
/// name), if written.
fn derived_service(api: &FakeApi, name: &str) -> Option<Value> {
    api.list(SERVICES).into_iter().find(|s| {
        s["metadata"]["namespace"] == "shop"
            && s["metadata"]["labels"]["multicluster.kubernetes.io/service-name"] == name
    })
}

/// What kube-proxy does for a ClusterIP Service, in userspace: listens on
/// the Service's ClusterIP and port, and relays each connection to a ready
/// endpoint its EndpointSlices list (looked up per connection).
async fn kube_proxy(api: FakeApi, svc: Value) -> tokio::task::JoinHandle<()> {
    let ip: IpAddr = svc["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
    let port = svc["spec"]["ports"][0]["port"].as_u64().unwrap() as u16;
    let port_name = svc["spec"]["ports"][0]["name"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let name = svc["metadata"]["name"].as_str().unwrap().to_string();
    let listener = tokio::net::TcpListener::bind((ip, port)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let target = api.list(SLICES).into_iter().find_map(|s| {
                if s["metadata"]["labels"]["kubernetes.io/service-name"] != name.as_str() {
                    return None;
                }
                let p = s["ports"]
                    .as_array()?
                    .iter()
                    .find(|p| p["name"].as_str().unwrap_or("") == port_name)?["port"]
                    .as_u64()?;
                let ip: IpAddr = s["endpoints"][0]["addresses"][0].as_str()?.parse().ok()?;
                Some(SocketAddr::new(ip, p as u16))
            });
            tokio::spawn(async move {
                let Some(target) = target else { return };
                if let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_exported_in_one_cluster_is_called_from_another_through_its_derived_service() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (east, west) = (cluster(&tmp, "east").await, cluster(&tmp, "west").await);

    // East runs the workload: a Service, its endpoints, a ServiceExport.
    let (pod, _pod_task) = echo_server(Some("east-pod-1".into())).await.unwrap();
    east.api.put(SERVICES, echo_service());
    east.api.put(
        SLICES,
        slice("shop", "echo", Some(("tcp", pod.port())), &[pod.ip()]),
    );
    east.api.put(EXPORTS, service_export());

    // Both sites' gateways run in Kubernetes mode, each "pod" on its own
    // loopback address; each site's ClusterSetIP range is a loopback /24
    // (the mesh DNS answers from it, derived Services ask for it).
    let mut sites = Vec::new();
    for (name, c) in [("east", &east), ("west", &west)] {
        let (range, _) = range_and_first();
        let (_, pod_ip) = range_and_first();
        fed.gateway_base.kubernetes = Some(causeway_gateway::config::KubernetesConfig {
            import_listen: pod_ip.to_string(),
            import_port_base: 20000,
        });
        fed.gateway_env = vec![("KUBECONFIG".into(), c.kubeconfig.display().to_string())];
        fed.add_site(name, &range, &[]).await.unwrap();
        // The gateway Service's endpoints: this site's gateway pod.
        c.api
            .put(SLICES, slice(NS, "causeway-gateway", None, &[pod_ip]));
        fed.start_agent(
            name,
            &c.kubeconfig,
            &["--namespace", NS, "--cluster-ip-range", &range],
        )
        .await
        .unwrap();
        sites.push((name, range, pod_ip));
    }
    fed.gateway_env.clear();
    fed.gateway_base.kubernetes = None;

    // East's agent says the export is valid and unopposed.
    eventually(
        Duration::from_secs(30),
        "east's ServiceExport to be Valid with no Conflict",
        async || match (
            condition(&east.api, "Valid"),
            condition(&east.api, "Conflict"),
        ) {
            (Some(v), Some(c)) if v.0 == "True" && c.0 == "False" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;

    // West's agent writes the ServiceImport and the derived Service, whose
    // ClusterIP is the service's address in west's range, and whose
    // EndpointSlice points at west's gateway pod.
    let svc = eventually(
        Duration::from_secs(30),
        "west's derived Service for shop/echo",
        async || derived_service(&west.api, "echo").ok_or("not written yet"),
    )
    .await;
    let cluster_ip: IpAddr = svc["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
    let west_range = &sites[1].1;
    assert!(
        cluster_ip
            .to_string()
            .starts_with(west_range.trim_end_matches("0/24")),
        "{cluster_ip} is in west's range {west_range}"
    );
    let si = eventually(
        Duration::from_secs(30),
        "west's ServiceImport to carry the ClusterIP and the exporting cluster",
        async || {
            let si = west
                .api
                .get(IMPORTS, "shop", "echo")
                .ok_or("no ServiceImport")?;
            (si["spec"]["ips"] == json!([cluster_ip.to_string()])
                && si["status"]["clusters"] == json!([{"cluster": "east"}]))
            .then_some(si.clone())
            .ok_or(format!("{si}"))
        },
    )
    .await;
    assert_eq!(si["spec"]["type"], "ClusterSetIP");
    let gw_slice = eventually(
        Duration::from_secs(30),
        "west's derived EndpointSlice to list the gateway pod",
        async || {
            west.api
                .list(SLICES)
                .into_iter()
                .find(|s| {
                    s["metadata"]["labels"]["kubernetes.io/service-name"] == svc["metadata"]["name"]
                })
                .ok_or("none yet")
        },
    )
    .await;
    assert_eq!(
        gw_slice["endpoints"][0]["addresses"][0],
        sites[1].2.to_string()
    );
    assert_eq!(
        gw_slice["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"],
        "west"
    );
    assert_eq!(
        gw_slice["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"],
        "causeway.dev/agent"
    );

    // West's mesh DNS answers the derived Service's ClusterIP.
    let answered = fed
        .wait_resolvable(
            "west",
            "echo.shop.svc.clusterset.local",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(answered, cluster_ip);

    // A client in west calls the name's address: kube-proxy → west's
    // gateway pod → QUIC → east's gateway → east's pod.
    let _proxy = kube_proxy(west.api.clone(), svc.clone()).await;
    let target = SocketAddr::new(answered, 7000);
    assert_eq!(wait_call(target).await, "east-pod-1");

    // The pod is replaced: east's gateway forwards to the new endpoint
    // without a restart.
    let (pod2, _pod2_task) = echo_server(Some("east-pod-2".into())).await.unwrap();
    east.api.put(
        SLICES,
        slice("shop", "echo", Some(("tcp", pod2.port())), &[pod2.ip()]),
    );
    eventually(
        Duration::from_secs(30),
        "calls to reach the replacement pod",
        async || match call_banner(target, "x").await {
            Ok(b) if b == "east-pod-2" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;

    // The export goes away: west's imported objects go with it.
    east.api.remove(EXPORTS, "shop", "echo");
    eventually(
        Duration::from_secs(30),
        "west's ServiceImport and derived Service to be deleted",
        async || match (
            west.api.get(IMPORTS, "shop", "echo"),
            derived_service(&west.api, "echo"),
        ) {
            (None, None) => Ok(()),
            other => Err(format!("still there: {other:?}")),
        },
    )
    .await;
    fed.shutdown().await;
}

const SPLITS: &str = "apis/causeway.dev/v1alpha1/trafficsplits";

fn traffic_split(name: &str, weights: Value) -> Value {
    json!({"apiVersion": "causeway.dev/v1alpha1", "kind": "TrafficSplit",
           "metadata": {"name": name, "namespace": "shop", "generation": 1},
           "spec": {"service": "web", "weights": weights}})
}

/// The `Accepted` condition of TrafficSplit shop/`name`, as (status,
/// reason, message).
fn accepted(api: &FakeApi, name: &str) -> Option<(String, String, String)> {
    let o = api.get(SPLITS, "shop", name)?;
    let c = o["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")?
        .clone();
    Some((
        c["status"].as_str()?.into(),
        c["reason"].as_str()?.into(),
        c["message"].as_str()?.into(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_objects_in_a_cluster_are_forwarded_to_the_federation() {
    use causeway_api::pb;
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let east = cluster(&tmp, "east").await;
    let (range, pod_ip) = range_and_first();
    fed.gateway_base.kubernetes = Some(causeway_gateway::config::KubernetesConfig {
        import_listen: pod_ip.to_string(),
        import_port_base: 20000,
    });
    fed.gateway_env = vec![("KUBECONFIG".into(), east.kubeconfig.display().to_string())];
    fed.add_site("east", &range, &[]).await.unwrap();
    let mut admin = pb::federation_client::FederationClient::new(
        fed.admin_client(None).unwrap().channel().await.unwrap(),
    );
    // An operator's policy, which the site may not take over.
    admin
        .apply_policies(pb::ApplyPoliciesRequest {
            documents_json: vec![{
                let mut doc = traffic_split("ops", json!({"east": 1}));
                doc["metadata"]
                    .as_object_mut()
                    .unwrap()
                    .remove("generation");
                doc.to_string()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    east.api.put(
        SPLITS,
        traffic_split("canary", json!({"east": 90, "west": 10})),
    );
    east.api
        .put(SPLITS, traffic_split("broken", json!({"east": "lots"})));
    east.api
        .put(SPLITS, traffic_split("ops", json!({"east": 5})));
    fed.start_agent(
        "east",
        &east.kubeconfig,
        &["--namespace", NS, "--cluster-ip-range", &range],
    )
    .await
    .unwrap();

    let policies = async |admin: &mut pb::federation_client::FederationClient<_>| {
        admin
            .list_policies(pb::ListPoliciesRequest::default())
            .await
            .map(|r| {
                r.into_inner()
                    .policies
                    .into_iter()
                    .map(|p| (p.name, p.owner_site, p.document_json))
                    .collect::<Vec<_>>()
            })
            .map_err(|e| e.to_string())
    };
    let held = eventually(
        Duration::from_secs(30),
        "the canary split to reach the federation, managed by east",
        async || {
            let all = policies(&mut admin.clone()).await?;
            all.iter()
                .any(|(n, o, _)| n == "canary" && o == "east")
                .then_some(all.clone())
                .ok_or(format!("{all:?}"))
        },
    )
    .await;
    let canary = held.iter().find(|(n, _, _)| n == "canary").unwrap();
    assert!(canary.2.contains("\"west\":10"), "{}", canary.2);
    let ops = held.iter().find(|(n, _, _)| n == "ops").unwrap();
    assert_eq!(ops.1, "", "the operator's policy is untouched");
    assert!(ops.2.contains("\"east\":1}"), "{}", ops.2);
    assert!(!held.iter().any(|(n, _, _)| n == "broken"));

    // Every object says what became of it.
    let verdicts = eventually(
        Duration::from_secs(30),
        "an Accepted condition on every TrafficSplit",
        async || match (
            accepted(&east.api, "canary"),
            accepted(&east.api, "broken"),
            accepted(&east.api, "ops"),
        ) {
            (Some(a), Some(b), Some(c)) => Ok((a, b, c)),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    assert_eq!(
        (verdicts.0 .0.as_str(), verdicts.0 .1.as_str()),
        ("True", "Accepted")
    );
    assert_eq!(
        (verdicts.1 .0.as_str(), verdicts.1 .1.as_str()),
        ("False", "Invalid")
    );
    assert!(
        verdicts.1 .2.contains("spec.weights.east"),
        "{}",
        verdicts.1 .2
    );
    assert_eq!(verdicts.2 .1, "NotManagedHere");
    assert!(
        verdicts.2 .2.contains("managed by an operator"),
        "{}",
        verdicts.2 .2
    );

    // The object goes: so does the site's policy, and only it.
    east.api.remove(SPLITS, "shop", "canary");
    eventually(
        Duration::from_secs(30),
        "the canary split to leave the federation",
        async || {
            let all = policies(&mut admin.clone()).await?;
            let names: Vec<&str> = all.iter().map(|(n, _, _)| n.as_str()).collect();
            (names == ["ops"]).then_some(()).ok_or(format!("{names:?}"))
        },
    )
    .await;
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn causeway_join_makes_the_state_a_cluster_secret_is_created_from() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let fed = federation(&tmp).await;
    let token = fed.create_token("east").await.unwrap();
    let state = tmp.path().join("east-state");
    let join = |advertise: &str| {
        std::process::Command::new(bin())
            .args(["join", "--state-dir"])
            .arg(&state)
            .args(["--advertise", advertise])
            .env("CAUSEWAY_JOIN_TOKEN", &token)
            .output()
            .unwrap()
    };
    let bad = join("nowhere");
    assert_eq!(bad.status.code(), Some(64));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("advertise: \"nowhere\" is not ip:port"),
        "{err}"
    );
    let ok = join("203.0.113.10:15443");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("joined as site east"));
    assert!(state.join("site.json").exists());
    let again = join("203.0.113.10:15443");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds site east"));
    // The controllers know the site and where its gateways are.
    let cat = fed.admin_client(None).unwrap().catalog(true).await.unwrap();
    let site = cat.sites.iter().find(|s| s.name == "east").unwrap();
    assert_eq!(site.tunnel_addrs, ["203.0.113.10:15443"]);
}
