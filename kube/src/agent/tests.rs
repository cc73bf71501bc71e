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
    /// `status` (polled through the server's own store: the agent writes
    /// it after publishing).
    async fn valid(&self, name: &str, status: &str) -> Value {
        let mut changes = self.api.events.subscribe();
        let look = || {
            self.api.get(EXPORTS, "shop", name).and_then(|o| {
                o["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .find(|c| c["type"] == "Valid" && c["status"] == status)
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
                "waited 10 s for Valid={status} on {name}: {:?}",
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
