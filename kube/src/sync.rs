//! The import side of the agent: makes the objects in Kubernetes match the
//! services imported into this site — a `ServiceImport` each, its derived
//! `Service` and `EndpointSlice`s (built by [`crate::import`]) — and deletes
//! what causeway made for services no longer imported.
//!
//! One pass is level-triggered and idempotent: objects are written with
//! server-side apply under the field manager [`FIELD_MANAGER`], so a pass
//! that finds everything as wanted changes nothing; a pass after a restart
//! is just another pass. Derived objects carry owner references (the
//! derived Service is owned by its ServiceImport, the slices by the
//! Service), and are also deleted explicitly by label, so nothing is left
//! behind even where garbage collection lags.

use std::collections::BTreeSet;

use causeway_api::model::ServiceKey;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::crd::ServiceImport;
use crate::import::{derived_service, endpoint_slices, service_import, Gateways, Imported};
use crate::{APP_MANAGED_BY, APP_MANAGED_BY_LABEL, MCS_SERVICE_NAME_LABEL};

/// The field manager of everything the agent writes.
pub const FIELD_MANAGER: &str = "causeway-agent";

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Objects written (created or changed), as `Kind ns/name`.
    pub written: Vec<String>,
    /// Objects deleted, as `Kind ns/name`.
    pub deleted: Vec<String>,
}

/// Why a pass stopped short (the next pass tries again).
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct SyncError {
    /// What was being done.
    pub what: String,
    /// What the API server said.
    #[source]
    pub source: kube::Error,
}

fn failed(what: String) -> impl FnOnce(kube::Error) -> SyncError {
    move |source| SyncError { what, source }
}

/// Applies `obj` (server-side) unless the live object already says the
/// same; records the write.
async fn apply<K>(api: &Api<K>, obj: &K, report: &mut Report) -> Result<K, SyncError>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let name = obj.name_any();
    let label = format!(
        "{} {}/{}",
        K::kind(&Default::default()),
        obj.namespace().unwrap_or_default(),
        name
    );
    let before = api
        .get_opt(&name)
        .await
        .map_err(failed(format!("reading {label}")))?;
    let after = api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await
        .map_err(failed(format!("applying {label}")))?;
    if before.map(|b| b.resource_version()) != Some(after.resource_version()) {
        report.written.push(label);
    }
    Ok(after)
}

/// One pass: every import's objects as wanted, stale ones deleted.
pub async fn sync_imports(
    client: &Client,
    imports: &[Imported],
    gw: &Gateways,
) -> Result<Report, SyncError> {
    let mut report = Report::default();
    for imp in imports {
        sync_one(client, imp, gw, &mut report).await?;
    }
    delete_stale(client, imports, &mut report).await?;
    Ok(report)
}

async fn sync_one(
    client: &Client,
    imp: &Imported,
    gw: &Gateways,
    report: &mut Report,
) -> Result<(), SyncError> {
    let ns = imp.key.namespace();
    let imports: Api<ServiceImport> = Api::namespaced(client.clone(), ns);
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);

    // The ServiceImport first: it owns the rest.
    let si = apply(&imports, &without_status(service_import(imp)), report).await?;
    let svc = apply(
        &services,
        &derived_service(imp, gw, si.controller_owner_ref(&())),
        report,
    )
    .await?;
    // Once Kubernetes has allocated the derived Service's ClusterIP, the
    // ServiceImport carries it (and DNS answers it).
    let ip = svc
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .filter(|ip| !ip.is_empty() && ip != "None");
    let mut with_ip = imp.clone();
    with_ip.cluster_ip = ip;
    let wanted_si = service_import(&with_ip);
    let si = apply(&imports, &without_status(wanted_si.clone()), report).await?;
    if si.status != wanted_si.status {
        let patch = serde_json::json!({"status": wanted_si.status});
        imports
            .patch_status(
                &si.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(failed(format!(
                "writing the status of ServiceImport {}",
                imp.key
            )))?;
        report
            .written
            .push(format!("ServiceImport status {}", imp.key));
    }
    let wanted = endpoint_slices(&with_ip, gw, svc.controller_owner_ref(&()));
    let names: BTreeSet<String> = wanted.iter().map(|s| s.name_any()).collect();
    for slice in &wanted {
        apply(&slices, slice, report).await?;
    }
    // Slices of this import that are no longer wanted (e.g. a family gone).
    let live = slices
        .list(&ListParams::default().labels(&managed_selector(Some(imp.key.name()))))
        .await
        .map_err(failed(format!("listing the EndpointSlices of {}", imp.key)))?;
    for s in live.items.iter().filter(|s| !names.contains(&s.name_any())) {
        delete(&slices, &s.name_any(), "EndpointSlice", ns, report).await?;
    }
    Ok(())
}

fn without_status(mut si: ServiceImport) -> ServiceImport {
    si.status = None;
    si
}

/// The selector of what the agent made (for one service name, or all).
fn managed_selector(service: Option<&str>) -> String {
    match service {
        Some(s) => format!("{APP_MANAGED_BY_LABEL}={APP_MANAGED_BY},{MCS_SERVICE_NAME_LABEL}={s}"),
        None => format!("{APP_MANAGED_BY_LABEL}={APP_MANAGED_BY}"),
    }
}

async fn delete<K>(
    api: &Api<K>,
    name: &str,
    kind: &str,
    ns: &str,
    report: &mut Report,
) -> Result<(), SyncError>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => {
            report.deleted.push(format!("{kind} {ns}/{name}"));
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(SyncError {
            what: format!("deleting {kind} {ns}/{name}"),
            source: e,
        }),
    }
}

/// Deletes the ServiceImports, derived Services and EndpointSlices the agent
/// made for services not in `imports`.
async fn delete_stale(
    client: &Client,
    imports: &[Imported],
    report: &mut Report,
) -> Result<(), SyncError> {
    let keep: BTreeSet<ServiceKey> = imports.iter().map(|i| i.key.clone()).collect();
    delete_stale_of::<ServiceImport>(client, &keep, "ServiceImport", report).await?;
    delete_stale_of::<Service>(client, &keep, "Service", report).await?;
    delete_stale_of::<EndpointSlice>(client, &keep, "EndpointSlice", report).await
}

/// Deletes the objects of kind `K` labelled as the agent's whose service is
/// not in `keep`.
async fn delete_stale_of<K>(
    client: &Client,
    keep: &BTreeSet<ServiceKey>,
    kind: &str,
    report: &mut Report,
) -> Result<(), SyncError>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let lp = ListParams::default().labels(&managed_selector(None));
    let all = Api::<K>::all(client.clone())
        .list(&lp)
        .await
        .map_err(failed(format!("listing {kind}s the agent made")))?;
    for obj in all {
        let ns = obj.namespace().unwrap_or_default();
        let service = obj
            .labels()
            .get(MCS_SERVICE_NAME_LABEL)
            .cloned()
            .unwrap_or_default();
        let stale = format!("{ns}/{service}")
            .parse::<ServiceKey>()
            .map_or(true, |k| !keep.contains(&k));
        if stale {
            let api = Api::<K>::namespaced(client.clone(), &ns);
            delete(&api, &obj.name_any(), kind, &ns, report).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
