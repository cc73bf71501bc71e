//! causeway-gateway: the east-west gateway of one site.
//!
//! - a QUIC endpoint (quinn, rustls, TLS 1.3, mutual SPIFFE auth) that
//!   accepts streams from other sites' gateways ([`inbound`]);
//! - outbound listeners on per-service VIPs that turn each TCP connection
//!   into a stream to an exporting site, with failover ([`outbound`]);
//! - health checks of local endpoints and export publication ([`publish`]);
//! - a live catalog view from the controller's Watch stream, which also
//!   feeds the per-site trust bundles.
//!
//! Remote sites are reached through [`pool`]: a QUIC connection per gateway
//! replica of each site, streams spread by weight. Services with protocol
//! `http`/`http2` are proxied per request ([`http`]); traffic policies from
//! the catalog steer both paths ([`routes`]).

#![warn(missing_docs)]

pub mod access;
pub mod admission;
pub mod config;
pub mod congestion;
pub mod dial;
pub mod drain;
pub mod endpoints;
pub mod exports;
pub mod forward;
pub mod http;
pub mod httproute;
pub mod inbound;
pub mod inbound_http;
pub mod ingress;
pub mod jwks;
pub mod l4;
pub mod outbound;
pub mod pool;
pub mod publish;
pub mod reload;
pub mod routes;
pub mod site;
pub mod splice;
pub mod steer;
pub mod stream;
pub use causeway_api::trace;
pub mod tunnel;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use causeway_api::catalog::CatalogView;
use causeway_api::client::run_watch;
use causeway_api::identity::parse_certs_pem;
use causeway_api::model::{SiteName, TrustDomain};
use causeway_api::trust::TrustStore;
use tokio::sync::watch;

use crate::config::Settings;
use crate::dial::Dialer;
use crate::forward::Forward;
use crate::http::HttpForward;
use crate::inbound::Inbound;
use crate::outbound::Outbound;
use crate::pool::Pool;
use crate::routes::Routes;
use crate::site::SiteState;
use crate::steer::Steering;
use causeway_api::sync::LockExt;

/// Whether the gateway can do its job, for `/ready`: it has routes from a
/// first catalog snapshot, and every outbound listener is bound.
#[derive(Default)]
pub struct Readiness {
    synced: std::sync::atomic::AtomicBool,
    /// Outbound listeners that failed to bind, with why.
    unbound: std::sync::Mutex<std::collections::BTreeMap<std::net::SocketAddr, String>>,
}

impl Readiness {
    /// Why the gateway is not ready, or `None` when it is.
    pub fn not_ready(&self) -> Option<String> {
        if !self.synced.load(std::sync::atomic::Ordering::Acquire) {
            return Some("no catalog snapshot from the controllers yet".into());
        }
        let unbound = self.unbound.locked();
        if unbound.is_empty() {
            return None;
        }
        let list: Vec<String> = unbound
            .iter()
            .map(|(addr, why)| format!("{addr} ({why})"))
            .collect();
        Some(format!(
            "outbound listeners not bound, retried every 2 s: {}",
            list.join("; ")
        ))
    }

    pub(crate) fn set_unbound(&self, addr: std::net::SocketAddr, why: Option<String>) {
        let mut unbound = self.unbound.locked();
        match why {
            Some(w) => {
                unbound.insert(addr, w);
            }
            None => {
                unbound.remove(&addr);
            }
        }
    }

    pub(crate) fn unbound_any(&self) -> bool {
        !self.unbound.locked().is_empty()
    }

    pub(crate) fn keep_unbound(&self, keep: impl Fn(&std::net::SocketAddr) -> bool) {
        self.unbound.locked().retain(|a, _| keep(a));
    }
}

/// Runs a gateway until `shutdown` resolves, then closes its tunnels.
/// `ready` tracks what `/ready` reports; `exports` is what the site
/// exports (from the configuration, or kept current by the Kubernetes
/// side), published and served from as it changes.
pub async fn run(
    settings: Settings,
    state: SiteState,
    udp: std::net::UdpSocket,
    ready: Arc<Readiness>,
    exports: Arc<exports::Exports>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let site_ca = Arc::new(SiteState::site_ca(
        &settings.state_dir,
        settings.site_ca.as_ref(),
    )?);
    let cred = state.gateway_credential(&site_ca, &settings.replica, settings.cert_ttl)?;
    record_tunnel_certificate(&settings, &cred);
    let store = TrustStore::new();
    store.set_site(
        state.site.clone(),
        state.trust_domain.clone(),
        vec![site_ca.cert_der.clone()],
    );
    let endpoint = tunnel::endpoint(
        udp,
        tunnel::server_config(&cred, store.clone(), &settings.quic)?,
        &settings.quic,
    )?;
    tracing::info!(site = %state.site, addr = %endpoint.local_addr()?, id = %cred.spiffe_id()?, "gateway tunnel endpoint up");

    let client = state.controller_client();
    let api_renew_task = tokio::spawn({
        let (state, client) = (state.clone(), client.clone());
        async move { state.renew_api_credential(client).await }
    });
    let (cat_tx, cat_rx) = watch::channel(Arc::new(CatalogView::default()));
    let watch_task = tokio::spawn(run_watch(client.clone(), cat_tx));

    let (routes_tx, routes_rx) = watch::channel(Arc::new(Routes::default()));
    let drain = drain::Drain::new();
    let access = access::AccessLog::start(&settings.access_log)?;
    let tracing_ = trace::Tracing::start(
        &settings.tracing,
        "causeway-gateway",
        state.site.as_str(),
        &settings.replica,
    )
    .map_err(anyhow::Error::msg)?;
    let inbound = Inbound::new(
        store.clone(),
        exports.clone(),
        drain.clone(),
        settings.authorization.clone(),
        settings.limits.idle_timeout,
        settings.quic.max_streams_per_peer,
        forward::Observers {
            access: access.clone(),
            tracing: tracing_.clone(),
            site: state.site.to_string(),
        },
        settings.retire_grace,
    );
    let pool = Pool::new(
        endpoint.clone(),
        cred.clone(),
        store.clone(),
        settings.quic.clone(),
        settings.retire_grace,
    );
    let renew_now = Arc::new(tokio::sync::Notify::new());
    let sync_task = tokio::spawn(sync_catalog(
        cat_rx,
        routes_tx,
        store.clone(),
        pool.clone(),
        inbound.clone(),
        state.site.clone(),
        settings.clone(),
        ready.clone(),
        renew_now.clone(),
    ));
    inbound.set_routes(routes_rx.clone());
    let inbound_task = tokio::spawn(inbound.clone().run(endpoint.clone(), settings.quic.retry));
    let steer = Arc::new(Steering::new(state.site.clone(), pool.clone()));
    let fwd = Arc::new(Forward {
        routes: routes_rx.clone(),
        steer: steer.clone(),
        dial: Dialer {
            caller_id: cred.spiffe_id()?.to_string(),
            pool: pool.clone(),
            local_exports: exports.clone(),
        },
        limits: settings.limits,
        access,
        tracing: tracing_.clone(),
    });
    let http = Arc::new(HttpForward {
        fwd: fwd.clone(),
        state: Default::default(),
    });
    let outbound = Arc::new(Outbound {
        fwd,
        http: http.clone(),
        ready,
        share: settings.share_listeners,
        drain: drain.clone(),
    });
    let reload_task = settings.config_file.clone().and_then(|path| {
        let text = std::fs::read_to_string(&path).ok()?;
        let mut started = config::GatewayConfig::from_toml(&text).ok()?;
        if let Some(r) = &settings.replica_override {
            started.replica = r.clone();
        }
        let live = reload::Live {
            path,
            replica: settings.replica_override.clone(),
            exports: exports.clone(),
            inbound: inbound.clone(),
            pool: pool.clone(),
            endpoint: endpoint.clone(),
            store: store.clone(),
        };
        Some(tokio::spawn(reload::follow(
            live,
            started,
            settings.clone(),
        )))
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let ingress_task = settings.ingress.clone().map(|ingress| {
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            if let Err(e) = ingress::run(ingress, http, stop).await {
                tracing::error!(error = %e, "the ingress failed; clients outside the mesh are not served");
            }
        })
    });
    let report_task = tokio::spawn(steer.report(routes_rx.clone(), stop_rx.clone()));
    let outbound_task = tokio::spawn(outbound.run(routes_rx, stop_rx));
    let heartbeat_task = tokio::spawn(publish::heartbeat(
        client.clone(),
        state.site.clone(),
        settings.health_interval.min(Duration::from_secs(1)),
    ));
    let renew_task = tokio::spawn(renew_credential(
        state.trust_domain.clone(),
        site_ca.clone(),
        settings.clone(),
        endpoint.clone(),
        pool.clone(),
        store.clone(),
        renew_now,
    ));
    let publish_task = tokio::spawn(publish::run(
        client,
        state.site.clone(),
        exports.clone(),
        settings.tunnel_advertise.clone(),
        settings.health_interval,
    ));

    shutdown.await;
    tracing::info!(deadline = ?settings.drain_timeout, active = drain.active(), "gateway draining: no new connections or streams");
    let _ = stop_tx.send(true);
    // No new tunnels either: a peer redialing this replica finds it
    // refusing and uses the site's others; connected peers hear it. A
    // certificate renewal or a config reload would give the endpoint a
    // server config again, so neither runs during the drain.
    renew_task.abort();
    if let Some(t) = &reload_task {
        t.abort();
    }
    endpoint.set_server_config(None);
    inbound.announce_drain();
    let _ = outbound_task.await;
    if let Some(t) = ingress_task {
        let _ = t.await;
    }
    report_task.abort();
    let left = drain.drain(settings.drain_timeout).await;
    if left > 0 {
        tracing::warn!(
            streams = left,
            "drain deadline passed; closing streams still open"
        );
    } else {
        tracing::info!("drained");
    }
    publish_task.abort();
    api_renew_task.abort();
    heartbeat_task.abort();
    watch_task.abort();
    sync_task.abort();
    endpoint.close(quinn::VarInt::from_u32(0), b"shutdown");
    // Spans still queued go out now (bounded by the exporter's timeout).
    let _ = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::task::spawn_blocking(move || tracing_.shutdown()),
    )
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    inbound_task.abort();
    Ok(())
}

/// Renews this replica's tunnel certificate at two thirds of its lifetime,
/// and at once on SIGHUP. The new certificate serves handshakes from then
/// on (`set_server_config`, and the pool's dials); tunnels already up keep
/// running — TLS authenticated them when they were made. Each renewal
/// reads the site CA from disk again, so after a CA rotation (`causeway ca
/// rotate-site`) a SIGHUP moves the replica to the new CA.
async fn renew_credential(
    td: TrustDomain,
    mut site_ca: Arc<causeway_api::identity::CertificateAuthority>,
    settings: Settings,
    endpoint: quinn::Endpoint,
    pool: Arc<Pool>,
    store: Arc<TrustStore>,
    renew_now: Arc<tokio::sync::Notify>,
) {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let every = settings.cert_ttl.mul_f64(2.0 / 3.0);
    metrics::gauge!("causeway_gateway_cert_ttl_seconds").set(settings.cert_ttl.as_secs_f64());
    loop {
        let why = tokio::select! {
            _ = tokio::time::sleep(every) => "two thirds of its lifetime passed",
            _ = renew_now.notified() => "a certificate of this site was revoked",
            Some(()) = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => "SIGHUP",
        };
        match SiteState::reload_site_ca(&settings.state_dir, settings.site_ca.as_ref()) {
            Ok(ca) if ca.cert_der != site_ca.cert_der => {
                tracing::info!("the site CA on disk changed; issuing from the new one");
                site_ca = Arc::new(ca);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "keeping the site CA loaded at start"
                )
            }
        }
        let renewed = site::gateway_credential(&td, &site_ca, &settings.replica, settings.cert_ttl)
            .and_then(|cred| {
                // The QUIC tuning in force (a config reload may have changed it).
                let server = tunnel::server_config(&cred, store.clone(), &pool.quic())?;
                Ok((cred, server))
            });
        match renewed {
            Ok((cred, server)) => {
                record_tunnel_certificate(&settings, &cred);
                endpoint.set_server_config(Some(server));
                pool.set_credential(cred);
                metrics::counter!("causeway_gateway_cert_renewals_total", "result" => "ok")
                    .increment(1);
                tracing::info!(reason = why, ttl = ?settings.cert_ttl, "tunnel certificate renewed; tunnels up are kept");
            }
            Err(e) => {
                metrics::counter!("causeway_gateway_cert_renewals_total", "result" => "error")
                    .increment(1);
                tracing::error!(error = %e, "could not renew the tunnel certificate; retrying in 10 s");
                tokio::time::sleep(Duration::from_secs(10).min(every)).await;
            }
        }
    }
}

/// Sets `causeway_certificate_expiry_timestamp_seconds{credential}` to
/// when `cred` expires.
pub fn export_expiry(credential: &'static str, cred: &causeway_api::identity::Credential) {
    if let Some((_, to)) = cred
        .chain
        .first()
        .and_then(causeway_api::identity::validity_ms)
    {
        metrics::gauge!("causeway_certificate_expiry_timestamp_seconds", "credential" => credential)
            .set(to as f64 / 1000.0);
    }
}

/// Writes this replica's current tunnel certificate (public, no key) to
/// `tunnel-<replica>.pem` in the state directory and logs its serial: what
/// an operator gives `ctl credential revoke-certificate` if the replica's
/// key leaks.
fn record_tunnel_certificate(settings: &Settings, cred: &causeway_api::identity::Credential) {
    let serial = cred
        .chain
        .first()
        .and_then(causeway_api::identity::serial_hex)
        .unwrap_or_default();
    let path = settings
        .state_dir
        .join(format!("tunnel-{}.pem", settings.replica));
    // Atomic (a rename over the old one): a reader never sees it missing.
    if let Err(e) = causeway_api::identity::write(&path, &cred.cert_pem, false) {
        tracing::warn!(path = %path.display(), error = %e, "could not record the tunnel certificate");
    }
    export_expiry("tunnel", cred);
    tracing::info!(%serial, path = %path.display(), "tunnel certificate in use");
}

/// After `site`'s bundle or revoked serials changed: retires the tunnels
/// with it whose peer certificate is no longer trusted (a CA was pruned
/// from the bundle, or the certificate was revoked): new streams take
/// fresh tunnels at once, the old ones close after `grace`.
fn retire_untrusted(
    site: &SiteName,
    store: &TrustStore,
    pool: &Pool,
    inbound: &Inbound,
    grace: Duration,
) {
    let untrusted = |conn: &quinn::Connection, client: bool| {
        conn.peer_identity()
            .and_then(|i| {
                i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .is_some_and(|chain| !store.still_trusted(&chain, client))
    };
    let reason = b"peer certificate no longer trusted";
    let retired = pool.retire_where(site, |c| untrusted(c, false), reason, grace)
        + inbound.retire_where(site, |c| untrusted(c, true), reason, grace);
    if retired > 0 {
        metrics::counter!("causeway_tunnels_untrusted_retired_total").increment(retired as u64);
        tracing::warn!(%site, retired, ?grace, "retiring tunnels whose peer certificate no longer chains to the site's trust bundle");
    }
}

/// On every catalog change: refresh trust bundles, tear down tunnels of
/// removed sites, and publish a new routing table.
#[allow(clippy::too_many_arguments)]
async fn sync_catalog(
    mut cat: watch::Receiver<Arc<CatalogView>>,
    routes_tx: watch::Sender<Arc<Routes>>,
    store: Arc<TrustStore>,
    pool: Arc<Pool>,
    inbound: Arc<Inbound>,
    own_site: SiteName,
    settings: Settings,
    ready: Arc<Readiness>,
    renew_now: Arc<tokio::sync::Notify>,
) {
    // The bundle and revoked serials last applied per site: a change may
    // drop a CA, or revoke a certificate, that live tunnels were
    // authenticated with.
    let mut applied: std::collections::HashMap<SiteName, (String, Vec<String>)> =
        Default::default();
    loop {
        let view = cat.borrow_and_update().clone();
        if view.synced {
            let mut members = Vec::new();
            for (name, site) in &view.sites {
                let (Ok(n), Ok(td)) = (
                    name.parse::<SiteName>(),
                    site.trust_domain.parse::<TrustDomain>(),
                ) else {
                    continue;
                };
                // Parse and apply a bundle only when it changed: catalog
                // changes are mostly exports, and bundles are up to 64 KiB.
                let before = applied.get(&n);
                let bundle_changed = before.map(|b| &b.0) != Some(&site.trust_bundle_pem);
                let revoked_changed = before.map_or(!site.revoked_serials.is_empty(), |b| {
                    b.1 != site.revoked_serials
                });
                let had = before.is_some();
                if revoked_changed {
                    store.set_revoked(&n, site.revoked_serials.iter().cloned());
                    if n == own_site {
                        // One of this site's certificates was revoked: it
                        // may be this replica's, so take a fresh one.
                        renew_now.notify_one();
                    }
                }
                if bundle_changed {
                    match parse_certs_pem("trust bundle", &site.trust_bundle_pem) {
                        Ok(roots) => store.set_site(n.clone(), td, roots),
                        Err(e) => {
                            tracing::warn!(site = %n, error = %e, "ignoring an unreadable trust bundle");
                            members.push(n);
                            continue;
                        }
                    }
                }
                if bundle_changed || revoked_changed {
                    applied.insert(
                        n.clone(),
                        (site.trust_bundle_pem.clone(), site.revoked_serials.clone()),
                    );
                    if had {
                        // A revoked certificate is cut at once; a pruned CA's
                        // tunnels get the grace a planned rotation expects.
                        let grace = if revoked_changed {
                            Duration::ZERO
                        } else {
                            settings.retire_grace
                        };
                        retire_untrusted(&n, &store, &pool, &inbound, grace);
                    }
                }
                members.push(n);
            }
            applied.retain(|s, _| members.contains(s));
            for s in store.sites() {
                if !members.contains(&s) && s != own_site {
                    tracing::info!(site = %s, "site left the federation; removing its trust bundle");
                    store.remove_site(&s);
                }
            }
            pool.retain(|s| members.contains(s));
            inbound.retain(|s| members.contains(s) || *s == own_site);
            let routes = Routes::build(&view, settings.listen);
            metrics::gauge!("causeway_imported_services").set(routes.services.len() as f64);
            routes_tx.send_replace(Arc::new(routes));
            ready
                .synced
                .store(true, std::sync::atomic::Ordering::Release);
        }
        if cat.changed().await.is_err() {
            return;
        }
    }
}
