//! The export side of the agent, on kube-rs: reflectors over
//! `ServiceExport`s, `Service`s and `EndpointSlice`s; on every change the
//! pure [`crate::export::decide`] runs for each ServiceExport, the exports
//! go out on a channel (to the publisher and the gateway's forwarding), and
//! each ServiceExport's `Valid` condition is written when it changed.
//!
//! Level-triggered: every pass recomputes everything from the caches, so a
//! missed event or a restart changes nothing. Watch errors (including a
//! `410 Gone` after the API server compacted its history) back off and
//! re-list; they are logged and counted, never fatal.

use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;

use causeway_api::catalog::CatalogView;
use causeway_api::client::ControllerClient;
use causeway_api::pb;
use causeway_api::policy::KINDS;
use futures::{stream, StreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::DynamicObject;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::watch;

use crate::condition::{self, Want};
use crate::conflict::{self, Claim};
use crate::crd::ServiceExport;
use crate::export::{decide, Decision, SiteExport};
use crate::policy;
use crate::SERVICE_NAME_LABEL;

/// Changes arriving within this long of each other are handled in one pass.
const SETTLE: Duration = Duration::from_millis(50);

/// The caches the export side decides from.
struct Caches {
    exports: Store<ServiceExport>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
}

impl Caches {
    /// Whether every cache has its first full list.
    fn ready(&self) -> bool {
        use futures::FutureExt;
        let ready = |f: futures::future::BoxFuture<'_, _>| matches!(f.now_or_never(), Some(Ok(())));
        ready(self.exports.wait_until_ready().boxed())
            && ready(self.services.wait_until_ready().boxed())
            && ready(self.slices.wait_until_ready().boxed())
    }

    /// Every ServiceExport with its decision.
    fn decisions(&self) -> Vec<(std::sync::Arc<ServiceExport>, Decision)> {
        let slices = self.slices.state();
        let mut out: Vec<_> = self
            .exports
            .state()
            .into_iter()
            .map(|se| {
                let ns = se.namespace().unwrap_or_default();
                let name = se.name_any();
                let svc = self.services.get(&ObjectRef::new(&name).within(&ns));
                let own: Vec<EndpointSlice> = slices
                    .iter()
                    .filter(|s| s.namespace().as_deref() == Some(ns.as_str()))
                    .filter(|s| s.labels().get(SERVICE_NAME_LABEL) == Some(&name))
                    .map(|s| (**s).clone())
                    .collect();
                let d = decide(&se, svc.as_deref(), &own);
                (se, d)
            })
            .collect();
        out.sort_by_key(|(se, _)| (se.namespace(), se.name_any()));
        out
    }
}

/// The federation's catalog as this site sees it, for the `Conflict`
/// conditions.
pub struct Catalog {
    /// This site's name.
    pub site: String,
    /// The live catalog.
    pub view: watch::Receiver<Arc<CatalogView>>,
}

/// Runs the export side until `stop` changes: sends the site's exports on
/// `exports` whenever they change and, while `leading` says this replica
/// holds the agent's Lease, keeps each ServiceExport's `Valid` condition
/// current — and its `Conflict` condition, given the `catalog`. Every
/// replica (and every gateway, which never leads) watches; one writes.
pub async fn run_exports(
    client: Client,
    exports: watch::Sender<Vec<SiteExport>>,
    mut leading: watch::Receiver<bool>,
    mut catalog: Option<Catalog>,
    mut stop: watch::Receiver<bool>,
) {
    let (se_store, se_w) = reflector::store();
    let (svc_store, svc_w) = reflector::store();
    let (eps_store, eps_w) = reflector::store();
    let cfg = watcher::Config::default();
    let changes = stream::select_all([
        reflector::reflector(
            se_w,
            watcher(Api::<ServiceExport>::all(client.clone()), cfg.clone()),
        )
        .default_backoff()
        .map(note)
        .boxed(),
        reflector::reflector(
            svc_w,
            watcher(Api::<Service>::all(client.clone()), cfg.clone()),
        )
        .default_backoff()
        .map(note)
        .boxed(),
        reflector::reflector(
            eps_w,
            watcher(Api::<EndpointSlice>::all(client.clone()), cfg),
        )
        .default_backoff()
        .map(note)
        .boxed(),
    ]);
    let mut changes = changes.ready_chunks(1024);
    let caches = Caches {
        exports: se_store,
        services: svc_store,
        slices: eps_store,
    };
    let mut sent_once = false;
    loop {
        let catalog_changed = async {
            match catalog.as_mut() {
                Some(c) => c.view.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            batch = changes.next() => if batch.is_none() { return },
            // Becoming the leader is a reason to look again (and write).
            r = leading.changed() => if r.is_err() { return },
            // Another site's export may now conflict with ours.
            r = catalog_changed => if r.is_err() { return },
            _ = stop.changed() => return,
        }
        if !caches.ready() {
            continue;
        }
        tokio::time::sleep(SETTLE).await;
        let decisions = caches.decisions();
        let site: Vec<SiteExport> = decisions
            .iter()
            .filter_map(|(_, d)| match d {
                Decision::Export(e) => Some(e.clone()),
                Decision::Invalid { .. } => None,
            })
            .collect();
        // The first pass is always sent: "exports nothing" is news too.
        let first = !sent_once;
        sent_once = true;
        exports.send_if_modified(|cur| {
            let changed = first || *cur != site;
            if changed {
                *cur = site;
            }
            changed
        });
        if *leading.borrow() {
            let view = catalog
                .as_ref()
                .map(|c| (c.site.as_str(), c.view.borrow().clone()));
            for (se, d) in &decisions {
                let mut wants = vec![d.valid_condition()];
                if let (Some((site, view)), Decision::Export(e)) = (&view, d) {
                    if view.synced {
                        let local = Claim::local(site, e);
                        wants.push(conflict::condition(
                            site,
                            &conflict::claims(view, &e.key, &local),
                        ));
                    }
                }
                write_conditions(&client, se, &wants).await;
            }
        }
    }
}

/// Where this site's gateway pods are: the ready endpoints of the
/// gateway's Service (its EndpointSlices) in the causeway namespace.
#[derive(Debug, Clone)]
pub struct GatewayPods {
    /// The namespace causeway runs in.
    pub namespace: String,
    /// The gateway's Service (tunnel LoadBalancer) there.
    pub service: String,
    /// The first import listener port (the gateways' `kubernetes.
    /// import_port_base`).
    pub import_port_base: u16,
    /// The ClusterSetIP range (inside the cluster's Service CIDR): derived
    /// Services ask for their address there, which is what the site's
    /// mesh DNS answers. `None`: Kubernetes allocates.
    pub cluster_ip_range: Option<(std::net::IpAddr, u8)>,
}

/// Runs the import side until `stop` changes: while `leading`, makes the
/// ServiceImports, derived Services and EndpointSlices match the services
/// the `catalog` says this site imports, fronted by the ready gateway pods
/// of `gateways`. Nothing is written before the first catalog snapshot
/// (an empty view is not "import nothing"), and a pass that fails backs
/// off (up to 30 s) and runs again.
pub async fn run_imports(
    client: Client,
    site: String,
    gateways: GatewayPods,
    mut catalog: watch::Receiver<Arc<CatalogView>>,
    mut leading: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let (store, writer) = reflector::store();
    let cfg =
        watcher::Config::default().labels(&format!("{SERVICE_NAME_LABEL}={}", gateways.service));
    let mut changes = reflector::reflector(
        writer,
        watcher(
            Api::<EndpointSlice>::namespaced(client.clone(), &gateways.namespace),
            cfg,
        ),
    )
    .default_backoff()
    .map(note)
    .boxed()
    .ready_chunks(1024);
    let mut backoff = Duration::ZERO;
    let mut last: Option<(Vec<crate::import::Imported>, crate::import::Gateways)> = None;
    loop {
        let retry = !backoff.is_zero();
        tokio::select! {
            batch = changes.next() => if batch.is_none() { return },
            r = catalog.changed() => if r.is_err() { return },
            r = leading.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(backoff), if retry => {}
            _ = stop.changed() => return,
        }
        let view = catalog.borrow().clone();
        if !*leading.borrow() || !view.synced {
            last = None;
            continue;
        }
        if !matches!(
            futures::FutureExt::now_or_never(store.wait_until_ready()),
            Some(Ok(()))
        ) {
            continue;
        }
        tokio::time::sleep(SETTLE).await;
        let imports = crate::import::imports(&view, gateways.cluster_ip_range);
        let gw = crate::import::Gateways {
            site: site.clone(),
            pod_ips: ready_addresses(&store.state()),
            listen_ports: crate::import::listen_ports(&view, gateways.import_port_base),
        };
        let want = (imports, gw);
        if last.as_ref() == Some(&want) && !retry {
            continue;
        }
        match crate::sync::sync_imports(&client, &want.0, &want.1).await {
            Ok(report) => {
                backoff = Duration::ZERO;
                metrics::gauge!("causeway_agent_imports").set(want.0.len() as f64);
                if !report.written.is_empty() || !report.deleted.is_empty() {
                    tracing::info!(written = ?report.written, deleted = ?report.deleted, "imports synced");
                }
                last = Some(want);
            }
            Err(e) => {
                metrics::counter!("causeway_agent_sync_errors_total", "side" => "imports")
                    .increment(1);
                backoff = (backoff * 2).clamp(Duration::from_millis(200), Duration::from_secs(30));
                tracing::warn!(error = %e, retry_in = ?backoff, "syncing imports failed; retrying");
                // Also where `kubectl get events -n <causeway namespace>`
                // shows it: on the agent's Lease.
                let lease = k8s_openapi::api::core::v1::ObjectReference {
                    api_version: Some("coordination.k8s.io/v1".into()),
                    kind: Some("Lease".into()),
                    name: Some("causeway-agent".into()),
                    namespace: Some(gateways.namespace.clone()),
                    ..Default::default()
                };
                let want = Want {
                    type_: "Imports",
                    status: false,
                    reason: "ImportSyncFailed",
                    message: format!("{e}; retrying in {backoff:?}"),
                };
                warn_on_change(&client, &lease, &[], std::slice::from_ref(&want)).await;
                last = None;
            }
        }
    }
}

/// The ready addresses in `slices`, each once.
fn ready_addresses(slices: &[Arc<EndpointSlice>]) -> Vec<std::net::IpAddr> {
    let mut out: Vec<std::net::IpAddr> = slices
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .filter_map(|e| e.addresses.first()?.parse().ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Logs and counts a watch error; every item is a change to look at.
fn note<T>(item: Result<T, watcher::Error>) {
    if let Err(e) = item {
        metrics_error(&e);
    }
}

fn metrics_error(e: &watcher::Error) {
    metrics::counter!("causeway_agent_watch_errors_total").increment(1);
    tracing::warn!(error = %e, "Kubernetes watch failed; backing off and resuming");
}

/// Writes `se`'s conditions `wants` when they differ from what is there.
async fn write_conditions(client: &Client, se: &ServiceExport, wants: &[Want]) {
    let existing = se
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let now = Timestamp::now();
    let want = wants.iter().fold(existing.clone(), |conds, w| {
        condition::set(&conds, w, se.metadata.generation, now)
    });
    if condition::same(&existing, &want) {
        return;
    }
    let ns = se.namespace().unwrap_or_default();
    let api: Api<ServiceExport> = Api::namespaced(client.clone(), &ns);
    let patch = serde_json::json!({"status": {"conditions": want}});
    if let Err(e) = api
        .patch_status(
            &se.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        metrics::counter!("causeway_agent_sync_errors_total", "side" => "export-status")
            .increment(1);
        tracing::warn!(namespace = %ns, name = %se.name_any(), error = %e, "writing the ServiceExport status failed; retried on the next change");
        return;
    }
    warn_on_change(client, &se.object_ref(&()), &existing, wants).await;
}

/// Whether a condition needs a person's attention.
fn troubled(w: &Want) -> bool {
    match w.type_ {
        "Conflict" => w.status,
        _ => !w.status,
    }
}

/// Publishes a Warning event on `object` for each of `wants` that is
/// troubled and was not already so (`kubectl describe` and event
/// collectors show it; the condition says the same).
async fn warn_on_change(
    client: &Client,
    object: &k8s_openapi::api::core::v1::ObjectReference,
    existing: &[Condition],
    wants: &[Want],
) {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "causeway-agent".into(),
            instance: None,
        },
    );
    for w in wants.iter().filter(|w| troubled(w)) {
        let already = existing
            .iter()
            .any(|c| c.type_ == w.type_ && c.reason == w.reason && c.message == w.message);
        if already {
            continue;
        }
        let event = Event {
            type_: EventType::Warning,
            reason: w.reason.to_string(),
            note: Some(w.message.chars().take(1000).collect()),
            action: format!("Set{}", w.type_),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, object).await {
            metrics::counter!("causeway_agent_sync_errors_total", "side" => "events").increment(1);
            tracing::debug!(error = %e, "publishing an event failed");
        }
    }
}

#[cfg(test)]
mod tests;

/// Runs the policy side until `stop` changes: while `leading`, forwards
/// the causeway policy objects of every kind (`causeway.dev`) to the
/// controllers with the site's credential, deletes the site's policies
/// whose object is gone, and keeps each object's `Accepted` condition
/// current. Nothing is deleted before the first catalog snapshot; a
/// controller that cannot be reached backs off (up to 30 s) and is tried
/// again, and what it refused is not sent again until the object changes.
pub async fn run_policies(
    client: Client,
    controllers: Arc<ControllerClient>,
    site: String,
    mut catalog: watch::Receiver<Arc<CatalogView>>,
    mut leading: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut stores = Vec::new();
    let mut streams = Vec::new();
    for kind in KINDS.iter().copied() {
        let ar = policy::api_resource(kind);
        let writer = reflector::store::Writer::<DynamicObject>::new(ar.clone());
        stores.push((kind, writer.as_reader()));
        let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
        streams.push(
            reflector::reflector(writer, watcher(api, watcher::Config::default()))
                .default_backoff()
                .map(note)
                .boxed(),
        );
    }
    let mut changes = stream::select_all(streams).ready_chunks(1024);
    let mut backoff = Duration::ZERO;
    // What was sent and refused, by key: not sent again while unchanged.
    let mut refused: BTreeMap<String, (String, Want)> = BTreeMap::new();
    loop {
        let retry = !backoff.is_zero();
        tokio::select! {
            batch = changes.next() => if batch.is_none() { return },
            r = catalog.changed() => if r.is_err() { return },
            r = leading.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(backoff), if retry => {}
            _ = stop.changed() => return,
        }
        let view = catalog.borrow().clone();
        let ready = stores.iter().all(|(_, s)| {
            matches!(
                futures::FutureExt::now_or_never(s.wait_until_ready()),
                Some(Ok(()))
            )
        });
        if !*leading.borrow() || !view.synced || !ready {
            continue;
        }
        tokio::time::sleep(SETTLE).await;
        let live: Vec<(policy::Object, Arc<DynamicObject>)> = stores
            .iter()
            .flat_map(|(kind, s)| {
                s.state()
                    .into_iter()
                    .map(|o| (policy::Object::of(*kind, &o), o))
            })
            .collect();
        let objects: Vec<policy::Object> = live.iter().map(|(o, _)| o.clone()).collect();
        let mut plan = policy::plan(&objects, &view, &site);
        refused.retain(|k, (doc, _)| plan.apply.iter().any(|(key, d)| key == k && d == doc));
        let mut transient = false;
        for (key, doc) in std::mem::take(&mut plan.apply) {
            if let Some((_, why)) = refused.get(&key) {
                plan.conditions.insert(key, why.clone());
                continue;
            }
            match send(&controllers, |mut fed| {
                let doc = doc.clone();
                async move {
                    fed.apply_policies(pb::ApplyPoliciesRequest {
                        documents_json: vec![doc],
                        ..Default::default()
                    })
                    .await
                }
            })
            .await
            {
                Ok(()) => {
                    plan.conditions.insert(key, policy::accepted());
                }
                Err(Some(why)) => {
                    refused.insert(key.clone(), (doc, why.clone()));
                    plan.conditions.insert(key, why);
                }
                Err(None) => transient = true,
            }
        }
        for (kind, namespace, name) in std::mem::take(&mut plan.delete) {
            let r = send(&controllers, |mut fed| {
                let req = pb::DeletePolicyRequest {
                    kind: kind.clone(),
                    namespace: namespace.clone(),
                    name: name.clone(),
                };
                async move { fed.delete_policy(req).await }
            })
            .await;
            match r {
                Ok(()) => {
                    tracing::info!(%kind, %namespace, %name, "policy object gone; deleted the site's policy")
                }
                Err(_) => transient = true,
            }
        }
        for (o, obj) in &live {
            if let Some(want) = plan.conditions.get(&o.key()) {
                write_policy_condition(&client, o, obj, want).await;
            }
        }
        metrics::gauge!("causeway_agent_policies").set(objects.len() as f64);
        backoff = if transient {
            metrics::counter!("causeway_agent_sync_errors_total", "side" => "policies")
                .increment(1);
            (backoff * 2).clamp(Duration::from_millis(200), Duration::from_secs(30))
        } else {
            Duration::ZERO
        };
    }
}

/// One call to the controllers: `Ok` when done, `Err(Some(condition))`
/// when refused for the request itself, `Err(None)` when it may work
/// later (unreachable, no leader).
async fn send<F, Fut, T>(controllers: &ControllerClient, call: F) -> Result<(), Option<Want>>
where
    F: FnOnce(pb::federation_client::FederationClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let fed = match controllers.federation().await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, "controllers unreachable; policies are forwarded later");
            controllers.rotate();
            return Err(None);
        }
    };
    match call(fed).await {
        Ok(_) => Ok(()),
        Err(s) => match s.code() {
            tonic::Code::PermissionDenied => Err(Some(policy::refused(
                "NotManagedHere",
                s.message().to_string(),
            ))),
            tonic::Code::InvalidArgument
            | tonic::Code::ResourceExhausted
            | tonic::Code::NotFound => {
                Err(Some(policy::refused("Refused", s.message().to_string())))
            }
            _ => {
                tracing::warn!(code = ?s.code(), error = %s.message(), "forwarding a policy failed; retrying");
                controllers.rotate();
                Err(None)
            }
        },
    }
}

/// Writes a policy object's `Accepted` condition when it differs.
async fn write_policy_condition(
    client: &Client,
    o: &policy::Object,
    obj: &DynamicObject,
    want: &Want,
) {
    let existing: Vec<Condition> = obj
        .data
        .get("status")
        .and_then(|s| s.get("conditions"))
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .unwrap_or_default();
    let conds = condition::set(&existing, want, o.generation, Timestamp::now());
    if condition::same(&existing, &conds) {
        return;
    }
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &o.namespace, &policy::api_resource(o.kind));
    let patch = serde_json::json!({"status": {"conditions": conds}});
    if let Err(e) = api
        .patch_status(&o.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        metrics::counter!("causeway_agent_sync_errors_total", "side" => "policy-status")
            .increment(1);
        tracing::warn!(kind = %o.kind, namespace = %o.namespace, name = %o.name, error = %e, "writing a policy's status failed; retried on the next change");
        return;
    }
    let reference = obj.object_ref(&policy::api_resource(o.kind));
    warn_on_change(client, &reference, &existing, std::slice::from_ref(want)).await;
}
