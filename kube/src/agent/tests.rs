//! The export side against the fake API server: real kube-rs watchers and
//! reflectors, the real Kubernetes JSON, no API server process.

use std::time::Duration;

use serde_json::{json, Value};

use super::*;
use crate::fake::FakeApi;

const EXPORTS: &str = "apis/multicluster.x-k8s.io/v1alpha1/serviceexports";
const SERVICES: &str = "api/v1/services";
const SLICES: &str = "apis/discovery.k8s.io/v1/endpointslices";

fn service(name: &str, type_: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "shop"},
           "spec": {"type": type_, "clusterIP": "10.96.0.10",
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP", "appProtocol": "http"}]}})
}

fn slice(svc: &str, ready: &[&str]) -> Value {
    let endpoints: Vec<Value> = ready
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}, "zone": "zone-a"}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{svc}-abc"), "namespace": "shop",
                        "labels": {"kubernetes.io/service-name": svc}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
           "endpoints": endpoints})
}

fn service_export(name: &str) -> Value {
    json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
           "metadata": {"name": name, "namespace": "shop"}})
}

struct Running {
    api: FakeApi,
    exports: watch::Receiver<Vec<SiteExport>>,
    _leading: watch::Sender<bool>,
    _stop: watch::Sender<bool>,
}

fn start(api: &FakeApi) -> Running {
    let (tx, rx) = watch::channel(Vec::new());
    let (stop_tx, stop) = watch::channel(false);
    let (leading_tx, leading) = watch::channel(true);
    tokio::spawn(run_exports(api.client(), tx, leading, None, stop));
    Running {
        api: api.clone(),
        exports: rx,
        _leading: leading_tx,
        _stop: stop_tx,
    }
}

impl Running {
    /// Waits (event-driven, bounded) until the published exports satisfy `f`.
    async fn exports_where(&mut self, what: &str, f: impl Fn(&[SiteExport]) -> bool) {
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(10), self.exports.wait_for(|e| f(e))).await,
            Ok(Ok(_))
        );
        assert!(
            ok,
            "waited 10 s for {what}; last: {:?}",
            *self.exports.borrow()
        );
    }

    /// The `Valid` condition written on ServiceExport `name`, once it has
    /// `status`.
    async fn valid(&self, name: &str, status: &str) -> Value {
        self.condition(name, "Valid", status).await
    }

    /// The condition `type_` written on ServiceExport `name`, once it has
    /// `status` (looked up in the server's own store on every change: the
    /// agent writes it after publishing).
    async fn condition(&self, name: &str, type_: &str, status: &str) -> Value {
        let mut changes = self.api.events.subscribe();
        let look = || {
            self.api.get(EXPORTS, "shop", name).and_then(|o| {
                o["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .find(|c| c["type"] == type_ && c["status"] == status)
                    .cloned()
            })
        };
        let found = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(c) = look() {
                    return c;
                }
                let _ = changes.recv().await;
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "waited 10 s for {type_}={status} on {name}: {:?}",
                self.api.get(EXPORTS, "shop", name)
            )
        })
    }
}

fn ready(e: &[SiteExport]) -> Option<(u32, u32)> {
    e.iter()
        .find(|e| e.key.to_string() == "shop/web")
        .map(|e| (e.ready, e.total))
}

#[tokio::test]
async fn an_export_appears_follows_its_endpoints_and_disappears() {
    let api = FakeApi::new();
    api.put(SERVICES, service("web", "ClusterIP"));
    api.put(SLICES, slice("web", &["10.0.0.1", "10.0.0.2", "10.0.0.3"]));
    let mut run = start(&api);

    tracing::info!("phase: the ServiceExport appears");
    api.put(EXPORTS, service_export("web"));
    run.exports_where("shop/web exported with 3 ready", |e| {
        ready(e) == Some((3, 3))
    })
    .await;
    let valid = run.valid("web", "True").await;
    assert_eq!(valid["reason"], "Valid");
    assert_eq!(valid["observedGeneration"], 1);
    let targets = run.exports.borrow()[0].targets[&80].clone();
    assert_eq!(targets.len(), 3);
    assert_eq!(targets[0], "10.0.0.1:8080".parse().unwrap());

    tracing::info!("phase: endpoints scale 3 -> 0 -> 5");
    api.put(SLICES, slice("web", &[]));
    run.exports_where("0 ready", |e| ready(e) == Some((0, 0)))
        .await;
    api.put(
        SLICES,
        slice(
            "web",
            &["10.0.1.1", "10.0.1.2", "10.0.1.3", "10.0.1.4", "10.0.1.5"],
        ),
    );
    run.exports_where("5 ready", |e| ready(e) == Some((5, 5)))
        .await;

    tracing::info!("phase: the Service goes away: no export, Valid=False says why");
    api.remove(SERVICES, "shop", "web");
    run.exports_where("no export", |e| e.is_empty()).await;
    let invalid = run.valid("web", "False").await;
    assert_eq!(invalid["reason"], "ServiceNotFound");
    assert_eq!(
        invalid["message"],
        "Service shop/web does not exist: create it, or delete this ServiceExport"
    );

    tracing::info!("phase: the ServiceExport goes away");
    api.put(SERVICES, service("web", "ClusterIP"));
    run.exports_where("exported again", |e| ready(e) == Some((5, 5)))
        .await;
    api.remove(EXPORTS, "shop", "web");
    run.exports_where("unexported", |e| e.is_empty()).await;
}

#[tokio::test]
async fn an_external_name_service_is_refused_and_others_are_not_disturbed() {
    let api = FakeApi::new();
    api.put(SERVICES, service("web", "ClusterIP"));
    api.put(SLICES, slice("web", &["10.0.0.1"]));
    api.put(SERVICES, service("ext", "ExternalName"));
    api.put(EXPORTS, service_export("web"));
    api.put(EXPORTS, service_export("ext"));
    let mut run = start(&api);
    run.exports_where("only shop/web", |e| {
        e.len() == 1 && ready(e) == Some((1, 1))
    })
    .await;
    let c = run.valid("ext", "False").await;
    assert_eq!(c["reason"], "ServiceTypeInvalid");
    run.valid("web", "True").await;
    // A Warning event on the refused export says the same.
    api_where(&api, "a Warning event on ServiceExport ext", |api| {
        api.list("apis/events.k8s.io/v1/events").iter().any(|e| {
            e["type"] == "Warning"
                && e["reason"] == "ServiceTypeInvalid"
                && e["regarding"]["kind"] == "ServiceExport"
                && e["regarding"]["name"] == "ext"
                && e["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("ExternalName"))
        })
    })
    .await;
    assert!(
        !api.list("apis/events.k8s.io/v1/events")
            .iter()
            .any(|e| e["regarding"]["name"] == "web"),
        "no event for the valid export"
    );
}

#[tokio::test]
async fn a_watch_that_expires_relists_and_misses_nothing() {
    let api = FakeApi::new();
    api.put(SERVICES, service("web", "ClusterIP"));
    api.put(SLICES, slice("web", &["10.0.0.1"]));
    api.put(EXPORTS, service_export("web"));
    let mut run = start(&api);
    run.exports_where("1 ready", |e| ready(e) == Some((1, 1)))
        .await;

    tracing::info!("phase: history compacted, watches cut: resuming gets 410 Gone");
    let before = api.served();
    // Something none of the watches follows moves the history past what
    // each has seen, so every resume is older than the compaction.
    api.put(
        "api/v1/configmaps",
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "shop"}}),
    );
    api.compact();
    // A change made before the watches resume is seen after the re-list.
    api.put(SLICES, slice("web", &["10.0.0.1", "10.0.0.2"]));
    api.end_watches();
    run.exports_where("2 ready after the re-list", |e| ready(e) == Some((2, 2)))
        .await;
    let relisted = api
        .served_where(Duration::from_secs(10), |s| {
            s.gone - before.gone >= 3 && s.lists - before.lists >= 3
        })
        .await;
    assert!(
        relisted.is_ok(),
        "each of the three watches should resume into a 410 and list again: {relisted:?}"
    );

    tracing::info!("phase: API errors back off and recover");
    api.fail_next(5);
    api.end_watches();
    api.put(SLICES, slice("web", &["10.0.0.1", "10.0.0.2", "10.0.0.3"]));
    run.exports_where("3 ready after the errors", |e| ready(e) == Some((3, 3)))
        .await;
    assert_eq!(api.served().failed, 5, "the injected errors were served");
    assert_eq!(api.served().gone - before.gone, 3, "no further 410s");
}

#[tokio::test]
async fn only_the_leader_writes_status() {
    let api = FakeApi::new();
    api.put(SERVICES, service("web", "ClusterIP"));
    api.put(SLICES, slice("web", &["10.0.0.1"]));
    api.put(EXPORTS, service_export("web"));
    let (tx, mut rx) = watch::channel(Vec::new());
    let (_stop_tx, stop) = watch::channel(false);
    let (leading_tx, leading) = watch::channel(false);
    tokio::spawn(run_exports(api.client(), tx, leading, None, stop));
    let published = matches!(
        tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|e| ready(e) == Some((1, 1))),
        )
        .await,
        Ok(Ok(_))
    );
    assert!(published, "a follower still publishes");
    // A second pass published means the first one finished (writing, or not).
    api.put(SLICES, slice("web", &["10.0.0.1", "10.0.0.2"]));
    let again = matches!(
        tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|e| ready(e) == Some((2, 2))),
        )
        .await,
        Ok(Ok(_))
    );
    assert!(again, "the follower follows its endpoints");
    assert!(
        api.get(EXPORTS, "shop", "web")
            .unwrap()
            .get("status")
            .is_none(),
        "a follower wrote the status"
    );
    leading_tx.send_replace(true);
    let run = Running {
        api: api.clone(),
        exports: rx,
        _leading: leading_tx,
        _stop: _stop_tx,
    };
    run.valid("web", "True").await;
}

#[tokio::test]
async fn a_restarted_agent_changes_nothing() {
    let api = FakeApi::new();
    api.put(SERVICES, service("web", "ClusterIP"));
    api.put(SLICES, slice("web", &["10.0.0.1"]));
    api.put(EXPORTS, service_export("web"));
    let mut first = start(&api);
    first
        .exports_where("exported", |e| ready(e) == Some((1, 1)))
        .await;
    let written = first.valid("web", "True").await;
    let rv = api.get(EXPORTS, "shop", "web").unwrap()["metadata"]["resourceVersion"].clone();
    drop(first);

    let mut second = start(&api);
    second
        .exports_where("exported again", |e| ready(e) == Some((1, 1)))
        .await;
    // Give it a pass to write anything it would: nothing differs.
    api.put(SLICES, slice("web", &["10.0.0.1"]));
    second
        .exports_where("still exported", |e| ready(e) == Some((1, 1)))
        .await;
    let now = api.get(EXPORTS, "shop", "web").unwrap();
    assert_eq!(
        now["metadata"]["resourceVersion"], rv,
        "the restarted agent rewrote the status"
    );
    assert_eq!(second.valid("web", "True").await, written);
}

/// A synced catalog where `site` exports shop/web port 80 with `protocol`,
/// exported at `at_ms`, as the controllers would send it (vip index 3).
fn catalog_with(site: &str, protocol: &str, at_ms: u64) -> Arc<CatalogView> {
    use causeway_api::pb;
    Arc::new(CatalogView::from_snapshot(pb::CatalogSnapshot {
        revision: 7,
        epoch: 0,
        sites: vec![pb::Site {
            name: site.into(),
            available: true,
            ..Default::default()
        }],
        exports: vec![pb::SiteExports {
            site: site.into(),
            exports: vec![pb::Export {
                service: "shop/web".into(),
                ports: vec![pb::ServicePort {
                    port: 80,
                    protocol: protocol.into(),
                    name: "http".into(),
                }],
                healthy_endpoints: 2,
                total_endpoints: 2,
                vip_index: 3,
                exported_at_unix_ms: at_ms,
                ..Default::default()
            }],
        }],
        policies: vec![],
    }))
}

#[tokio::test]
async fn an_export_differing_from_an_older_one_elsewhere_gets_a_conflict_condition() {
    let api = FakeApi::new();
    api.put(SERVICES, service("web", "ClusterIP"));
    api.put(SLICES, slice("web", &["10.0.0.1"]));
    api.put(EXPORTS, service_export("web"));
    // East exported shop/web long ago, with port "http" as plain TCP.
    let (cat_tx, view) = watch::channel(catalog_with("east", "tcp", 1_000));
    let (tx, rx) = watch::channel(Vec::new());
    let (stop_tx, stop) = watch::channel(false);
    let (leading_tx, leading) = watch::channel(true);
    let catalog = Catalog {
        site: "west".into(),
        view,
    };
    tokio::spawn(run_exports(api.client(), tx, leading, Some(catalog), stop));
    let run = Running {
        api: api.clone(),
        exports: rx,
        _leading: leading_tx,
        _stop: stop_tx,
    };
    let c = run.condition("web", "Conflict", "True").await;
    assert_eq!(c["reason"], "PortConflict");
    let msg = c["message"].as_str().unwrap();
    assert!(
        msg.starts_with(
            "port \"http\" is 80/tcp in east but 80/http in west; the oldest export wins: east's"
        ),
        "{msg}"
    );
    run.valid("web", "True").await;

    tracing::info!("phase: east now agrees: the conflict clears");
    cat_tx.send_replace(catalog_with("east", "http", 1_000));
    let c = run.condition("web", "Conflict", "False").await;
    assert_eq!(c["reason"], "NoConflicts");
}

const GW_NS: &str = "causeway-system";

fn gateway_slice(ips: &[&str]) -> Value {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "causeway-gateway-1", "namespace": GW_NS,
                        "labels": {"kubernetes.io/service-name": "causeway-gateway"}},
           "addressType": "IPv4", "ports": [{"name": "tunnel", "port": 15443, "protocol": "UDP"}],
           "endpoints": endpoints})
}

fn start_imports(
    api: &FakeApi,
    view: watch::Receiver<Arc<CatalogView>>,
    leading: watch::Receiver<bool>,
) -> watch::Sender<bool> {
    let (stop_tx, stop) = watch::channel(false);
    let gateways = GatewayPods {
        namespace: GW_NS.into(),
        service: "causeway-gateway".into(),
        import_port_base: 20000,
        cluster_ip_range: Some(("10.96.0.128".parse().unwrap(), 25)),
    };
    tokio::spawn(run_imports(
        api.client(),
        "west".into(),
        gateways,
        view,
        leading,
        stop,
    ));
    stop_tx
}

/// Waits for the API server's objects to satisfy `f` (checked on every
/// change it makes).
async fn api_where(api: &FakeApi, what: &str, f: impl Fn(&FakeApi) -> bool) {
    let mut changes = api.events.subscribe();
    let ok = tokio::time::timeout(Duration::from_secs(10), async {
        while !f(api) {
            let _ = changes.recv().await;
        }
    })
    .await
    .is_ok();
    assert!(ok, "waited 10 s for {what}");
}

const IMPORTS: &str = "apis/multicluster.x-k8s.io/v1alpha1/serviceimports";

#[tokio::test]
async fn an_import_appears_fronted_by_the_gateway_pods_and_goes_away() {
    let api = FakeApi::new();
    api.put(SLICES, gateway_slice(&["10.3.0.4", "10.3.0.5"]));
    let (cat_tx, view) = watch::channel(Arc::new(CatalogView::default()));
    let (leading_tx, leading) = watch::channel(false);
    let _stop = start_imports(&api, view, leading);

    tracing::info!("phase: a follower writes nothing, nor does a leader before the first snapshot");
    cat_tx.send_replace(catalog_with("east", "http", 1_000));
    // The fake server counts what it served: the import side's list and
    // watch of the gateway slices, and nothing else.
    let listed = api
        .served_where(Duration::from_secs(10), |s| s.watches >= 1)
        .await;
    assert!(listed.is_ok(), "{listed:?}");
    cat_tx.send_replace(Arc::new(CatalogView::default()));
    leading_tx.send_replace(true);
    assert!(api.get(IMPORTS, "shop", "web").is_none());

    tracing::info!("phase: the snapshot arrives: the objects are written");
    cat_tx.send_replace(catalog_with("east", "http", 1_000));
    api_where(&api, "the ServiceImport with its ClusterIP", |api| {
        api.get(IMPORTS, "shop", "web")
            .is_some_and(|si| si["spec"]["ips"] == json!(["10.96.0.131"]))
    })
    .await;
    let svc = api
        .list(SERVICES)
        .into_iter()
        .find(|s| s["metadata"]["labels"]["multicluster.kubernetes.io/service-name"] == "web")
        .unwrap();
    assert_eq!(
        svc["spec"]["clusterIP"], "10.96.0.131",
        "vip index 3 in 10.96.0.128/25"
    );
    assert_eq!(
        svc["spec"]["ports"][0]["targetPort"], 20064,
        "block 3 of 32 from 20000"
    );
    let slice = api
        .list(SLICES)
        .into_iter()
        .find(|s| s["metadata"]["labels"]["kubernetes.io/service-name"] == svc["metadata"]["name"])
        .unwrap();
    assert_eq!(
        slice["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["addresses"][0].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["10.3.0.4", "10.3.0.5"]
    );

    tracing::info!("phase: a gateway pod goes: the slice follows");
    api.put(SLICES, gateway_slice(&["10.3.0.5"]));
    api_where(&api, "the derived slice to list one pod", |api| {
        api.list(SLICES).iter().any(|s| {
            s["metadata"]["labels"]["kubernetes.io/service-name"] == svc["metadata"]["name"]
                && s["endpoints"].as_array().map(Vec::len) == Some(1)
        })
    })
    .await;

    tracing::info!("phase: API errors: the pass backs off and completes");
    api.fail_next(3);
    api.put(SLICES, gateway_slice(&["10.3.0.5", "10.3.0.6"]));
    api_where(
        &api,
        "the derived slice to list two pods after the errors",
        |api| {
            api.list(SLICES).iter().any(|s| {
                s["metadata"]["labels"]["kubernetes.io/service-name"] == svc["metadata"]["name"]
                    && s["endpoints"].as_array().map(Vec::len) == Some(2)
            })
        },
    )
    .await;
    assert_eq!(api.served().failed, 3);
    api_where(&api, "a Warning event saying the sync failed", |api| {
        api.list("apis/events.k8s.io/v1/events").iter().any(|e| {
            e["reason"] == "ImportSyncFailed" && e["regarding"]["name"] == "causeway-agent"
        })
    })
    .await;

    tracing::info!("phase: the export goes away: so do the objects");
    cat_tx.send_replace(Arc::new(CatalogView::from_snapshot(Default::default())));
    api_where(&api, "the import's objects to be deleted", |api| {
        api.get(IMPORTS, "shop", "web").is_none()
            && !api
                .list(SERVICES)
                .iter()
                .any(|s| s["metadata"]["name"] == svc["metadata"]["name"])
            && !api.list(SLICES).iter().any(|s| {
                s["metadata"]["labels"]["kubernetes.io/service-name"] == svc["metadata"]["name"]
            })
    })
    .await;
    assert!(
        api.get(SLICES, GW_NS, "causeway-gateway-1").is_some(),
        "nothing else is touched"
    );
}
