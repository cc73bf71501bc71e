//! Leader election on a `coordination.k8s.io/v1` Lease, so several agent
//! replicas can run and exactly one writes: the holder renews the Lease
//! well within its duration; another replica takes it over only once it
//! has expired. Writes carry the Lease's `resourceVersion`, so of two
//! replicas racing for an expired Lease the API server lets one win.
//!
//! [`decide`] is the pure rule; [`run`] is the loop around it.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;

/// What this replica should do about the Lease.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Write this spec (acquire or renew): this replica leads if the write
    /// goes through.
    Lead(LeaseSpec),
    /// Another replica holds an unexpired Lease.
    Follow {
        /// Who holds it.
        holder: String,
    },
}

/// The rule, given the Lease's current spec (none: no Lease yet), this
/// replica's identity, the time and the Lease duration.
pub fn decide(
    current: Option<&LeaseSpec>,
    me: &str,
    now: Timestamp,
    duration: Duration,
) -> Decision {
    let secs = i32::try_from(duration.as_secs()).unwrap_or(i32::MAX).max(1);
    let holder = current
        .and_then(|l| l.holder_identity.clone())
        .filter(|h| !h.is_empty());
    let expired = current.is_none_or(|l| {
        let renewed = l.renew_time.as_ref().map(|t| t.0);
        let lasts = SignedDuration::from_secs(i64::from(l.lease_duration_seconds.unwrap_or(secs)));
        renewed.is_none_or(|r| r + lasts <= now)
    });
    match holder {
        Some(h) if h == me => Decision::Lead(LeaseSpec {
            renew_time: Some(MicroTime(now)),
            lease_duration_seconds: Some(secs),
            ..current.cloned().unwrap_or_default()
        }),
        Some(h) if !expired => Decision::Follow { holder: h },
        _ => Decision::Lead(LeaseSpec {
            holder_identity: Some(me.to_string()),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_duration_seconds: Some(secs),
            lease_transitions: Some(
                current.and_then(|l| l.lease_transitions).unwrap_or(0)
                    + i32::from(current.and_then(|l| l.holder_identity.as_ref()).is_some()),
            ),
            ..Default::default()
        }),
    }
}

/// Takes part in the election for Lease `ns/name` as `me` until `stop`
/// changes: `leading` says whether this replica leads now. It renews every
/// third of `duration`, steps down when a renewal fails, and releases
/// nothing on exit (the Lease expires; a successor waits at most
/// `duration`).
pub async fn run(
    client: Client,
    ns: &str,
    name: &str,
    me: &str,
    duration: Duration,
    leading: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, ns);
    loop {
        let leads = match step(&api, name, me, duration).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(lease = %name, error = %e, "leader election: the Lease could not be read or written; stepping down until it can");
                false
            }
        };
        leading.send_if_modified(|l| std::mem::replace(l, leads) != leads);
        tokio::select! {
            _ = tokio::time::sleep(duration / 3) => {}
            _ = stop.changed() => {
                leading.send_replace(false);
                return;
            }
        }
    }
}

/// One round: read the Lease, decide, write if leading. Whether this
/// replica leads after it.
async fn step(
    api: &Api<Lease>,
    name: &str,
    me: &str,
    duration: Duration,
) -> Result<bool, kube::Error> {
    let current = api.get_opt(name).await?;
    let spec = current.as_ref().and_then(|l| l.spec.clone());
    match decide(spec.as_ref(), me, Timestamp::now(), duration) {
        Decision::Follow { .. } => Ok(false),
        Decision::Lead(spec) => {
            let written = match current {
                None => {
                    let lease = Lease {
                        metadata: ObjectMeta {
                            name: Some(name.into()),
                            ..Default::default()
                        },
                        spec: Some(spec),
                    };
                    api.create(&PostParams::default(), &lease).await
                }
                Some(mut lease) => {
                    // Carries the resourceVersion read above: a replica that
                    // wrote in between makes this a 409 Conflict.
                    lease.spec = Some(spec);
                    api.replace(name, &PostParams::default(), &lease).await
                }
            };
            match written {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests;
