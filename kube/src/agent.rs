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

use std::time::Duration;

use futures::{stream, StreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;

use crate::condition;
use crate::crd::ServiceExport;
use crate::export::{decide, Decision, SiteExport};
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

/// Runs the export side until `stop` changes: sends the site's exports on
/// `exports` whenever they change and keeps each ServiceExport's `Valid`
/// condition current while `leading` says this replica holds the agent's
/// Lease (every replica watches and publishes; one writes).
pub async fn run_exports(
    client: Client,
    exports: watch::Sender<Vec<SiteExport>>,
    mut leading: watch::Receiver<bool>,
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
    loop {
        tokio::select! {
            batch = changes.next() => if batch.is_none() { return },
            // Becoming the leader is a reason to look again (and write).
            r = leading.changed() => if r.is_err() { return },
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
        exports.send_if_modified(|cur| {
            let changed = *cur != site;
            if changed {
                *cur = site;
            }
            changed
        });
        if *leading.borrow() {
            for (se, d) in &decisions {
                write_valid(&client, se, d).await;
            }
        }
    }
}

/// Logs and counts a watch error; every item is a change to look at.
fn note<T>(item: Result<T, watcher::Error>) {
    if let Err(e) = item {
        metrics_error(&e);
    }
}

fn metrics_error(e: &watcher::Error) {
    tracing::warn!(error = %e, "Kubernetes watch failed; backing off and resuming");
}

/// Writes `se`'s `Valid` condition when it differs from what is there.
async fn write_valid(client: &Client, se: &ServiceExport, d: &Decision) {
    let existing = se
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let want = condition::set(
        &existing,
        &d.valid_condition(),
        se.metadata.generation,
        Timestamp::now(),
    );
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
        tracing::warn!(namespace = %ns, name = %se.name_any(), error = %e, "writing the ServiceExport status failed; retried on the next change");
    }
}

#[cfg(test)]
mod tests;
