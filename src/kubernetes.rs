//! `causeway install` (render a site's Kubernetes manifests) and
//! `causeway agent` (the site agent's Kubernetes side).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use causeway_gateway::config::LocalExport;
use causeway_kube::export::{SessionAffinity, SiteExport};

use anyhow::Context;
use causeway_kube::install::{self, Options};
use clap::Args;
use tokio::sync::watch;

use crate::admin;
use crate::cli::ConfigErrors;
use crate::signal::shutdown_signal;

/// `causeway install` flags.
#[derive(Args, Debug)]
pub struct InstallArgs {
    /// The site's name (a DNS label), as joined to the federation.
    #[arg(long)]
    pub site: String,
    /// Where other sites reach this site's gateways: ip:port of the tunnel
    /// LoadBalancer (repeat for several).
    #[arg(long = "advertise", required = true)]
    pub advertise: Vec<String>,
    /// Namespace to install into.
    #[arg(long, default_value = "causeway-system")]
    pub namespace: String,
    /// Container image of the causeway binary.
    #[arg(long)]
    pub image: Option<String>,
    /// Gateway replicas.
    #[arg(long, default_value_t = 1)]
    pub gateway_replicas: u32,
    /// Controller nodes this site hosts (0, 1, 3 or 5).
    #[arg(long, default_value_t = 0)]
    pub controllers: u32,
    /// Controller endpoints (host:port, comma-separated) when this site hosts none.
    #[arg(long, value_delimiter = ',')]
    pub controller: Vec<String>,
    /// ClusterIP to request for the mesh DNS Service (CoreDNS forwards
    /// clusterset.local to it).
    #[arg(long)]
    pub dns_cluster_ip: Option<String>,
    /// The ClusterSetIP range, inside the cluster's Service CIDR: derived
    /// Services take their ClusterIPs there and the mesh DNS answers them.
    #[arg(long, default_value = causeway_kube::install::DEFAULT_CLUSTER_IP_RANGE)]
    pub cluster_ip_range: String,
    /// The gateways' first import listener port.
    #[arg(long, default_value_t = causeway_gateway::config::DEFAULT_IMPORT_PORT_BASE)]
    pub import_port_base: u16,
}

/// Prints the site's manifests (multi-document YAML) on stdout.
pub fn run_install(args: InstallArgs) -> anyhow::Result<()> {
    let mut o = Options::new(&args.site);
    o.namespace = args.namespace;
    if let Some(image) = args.image {
        o.image = image;
    }
    o.gateway_replicas = args.gateway_replicas;
    o.controllers = args.controllers;
    o.controller_endpoints = args.controller;
    o.dns_cluster_ip = args.dns_cluster_ip;
    o.advertise = args.advertise;
    o.cluster_ip_range = args.cluster_ip_range;
    o.import_port_base = args.import_port_base;
    o.check().map_err(ConfigErrors)?;
    print!("{}", install::to_yaml(&install::render(&o)));
    Ok(())
}

/// `causeway agent` flags.
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The site's name.
    #[arg(long)]
    pub site: String,
    /// The site's state directory (its controller API credential).
    #[arg(long)]
    pub state_dir: PathBuf,
    /// The namespace causeway runs in (leader election).
    #[arg(long, default_value = "causeway-system")]
    pub namespace: String,
    /// Admin (metrics, /ready) listen address.
    #[arg(long)]
    pub admin_listen: Option<String>,
    /// This replica's name in leader election (default: the pod's hostname).
    #[arg(long, env = "HOSTNAME")]
    pub identity: Option<String>,
    /// The gateway's Service in --namespace: its ready endpoints are the
    /// gateway pods that imported services are fronted by.
    #[arg(long, default_value = "causeway-gateway")]
    pub gateway_service: String,
    /// The gateways' first import listener port (their
    /// `kubernetes.import_port_base`).
    #[arg(long, default_value_t = causeway_gateway::config::DEFAULT_IMPORT_PORT_BASE)]
    pub import_port_base: u16,
    /// The ClusterSetIP range: a part of the cluster's Service CIDR kept
    /// for causeway (e.g. 10.96.0.128/25, in the band Kubernetes does not
    /// allocate from first). Derived Services ask for their address
    /// there; the site's mesh DNS must use the same range as `vip_range`.
    /// Without it Kubernetes allocates, and DNS answers do not match.
    #[arg(long)]
    pub cluster_ip_range: Option<String>,
}

/// The Lease the agent replicas elect their leader on.
const LEASE: &str = "causeway-agent";
/// How long a leader's Lease lasts without renewal.
const LEASE_DURATION: std::time::Duration = std::time::Duration::from_secs(15);

/// Runs the agent against the cluster it runs in (or the kubeconfig's):
/// follows the federation's catalog with the site's credential; keeps
/// every ServiceExport's `Valid` and `Conflict` conditions current;
/// writes a ServiceImport, a derived Service and its EndpointSlices for
/// every imported service; and forwards the cluster's causeway policy
/// objects to the controllers. The replica holding the `causeway-agent` Lease
/// writes; the site's gateways publish the exports themselves.
pub async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let mut errs = ConfigErrors::new();
    let admin_listen: Option<SocketAddr> = args
        .admin_listen
        .as_deref()
        .and_then(|a| errs.addr("admin_listen", a));
    if causeway_api::model::check_dns_label("site", &args.site).is_err() {
        errs.push("site", format!("{:?} must be a DNS label", args.site));
    }
    let cluster_ip_range = match args.cluster_ip_range.as_deref() {
        None => None,
        Some(r) => match causeway_api::model::parse_cidr("cluster_ip_range", r) {
            Ok(r) => Some(r),
            Err(e) => {
                errs.push("cluster_ip_range", e.to_string());
                None
            }
        },
    };
    errs.into_result(|| ())?;
    let state = causeway_gateway::site::SiteState::load(&args.state_dir)?.ok_or_else(|| {
        anyhow::anyhow!(
            "{} holds no joined site: mount the causeway-site Secret there (see the README)",
            args.state_dir.display()
        )
    })?;
    if state.site.as_str() != args.site {
        anyhow::bail!(
            "--site {} but {} holds site {}: mount that site's causeway-site Secret",
            args.site,
            args.state_dir.display(),
            state.site
        );
    }
    let metrics = admin::install_metrics()?;
    if let Some(a) = admin_listen {
        admin::serve(a, metrics, "agent", None).await?;
    }
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or kubeconfig)")?;
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("agent-{}", std::process::id()));
    let (tx, mut rx) = watch::channel(Vec::new());
    let (stop_tx, stop) = watch::channel(false);
    let (leading_tx, leading) = watch::channel(false);
    let election = tokio::spawn({
        let (client, ns, stop) = (client.clone(), args.namespace.clone(), stop.clone());
        async move {
            causeway_kube::lease::run(
                client,
                &ns,
                LEASE,
                &identity,
                LEASE_DURATION,
                leading_tx,
                stop,
            )
            .await;
        }
    });
    let (cat_tx, cat_rx) = watch::channel(std::sync::Arc::new(
        causeway_api::catalog::CatalogView::default(),
    ));
    // One client for every call; the site's gateway renews the credential
    // and this follows the file.
    let controllers = state.controller_client();
    let follow_task = tokio::spawn({
        let (state, controllers) = (state.clone(), controllers.clone());
        async move { state.follow_api_credential(controllers).await }
    });
    let watch_task = tokio::spawn(causeway_api::client::run_watch(controllers.clone(), cat_tx));
    let task = tokio::spawn(causeway_kube::agent::run_exports(
        client.clone(),
        tx,
        leading.clone(),
        Some(causeway_kube::agent::Catalog {
            site: args.site.clone(),
            view: cat_rx.clone(),
        }),
        stop.clone(),
    ));
    let policies_task = tokio::spawn(causeway_kube::agent::run_policies(
        client.clone(),
        controllers,
        args.site.clone(),
        cat_rx.clone(),
        leading.clone(),
        stop.clone(),
    ));
    let imports_task = tokio::spawn(causeway_kube::agent::run_imports(
        client,
        args.site.clone(),
        causeway_kube::agent::GatewayPods {
            namespace: args.namespace.clone(),
            service: args.gateway_service.clone(),
            import_port_base: args.import_port_base,
            cluster_ip_range,
        },
        cat_rx,
        leading,
        stop,
    ));
    tracing::info!(site = %args.site, namespace = %args.namespace, "agent watching ServiceExports");
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            r = rx.changed() => {
                if r.is_err() { break }
                let keys: Vec<String> = rx.borrow().iter().map(|e| e.key.to_string()).collect();
                tracing::info!(exports = ?keys, "site exports changed");
            }
        }
    }
    let _ = stop_tx.send(true);
    watch_task.abort();
    follow_task.abort();
    let _ = task.await;
    let _ = imports_task.await;
    let _ = policies_task.await;
    let _ = election.await;
    Ok(())
}

/// The gateway's export table for what the site's ServiceExports say:
/// one entry per exported port, forwarding to the port's ready endpoints.
pub fn local_exports(site: &[SiteExport]) -> Vec<LocalExport> {
    let mut out = Vec::new();
    for e in site {
        let hostnames: BTreeMap<IpAddr, &String> = e
            .endpoints
            .iter()
            .filter_map(|r| Some((r.ip, r.hostname.as_ref()?)))
            .collect();
        for p in &e.ports {
            let endpoints = e.targets.get(&p.port).cloned().unwrap_or_default();
            let per = |f: &dyn Fn(&SocketAddr) -> Option<String>| {
                endpoints
                    .iter()
                    .filter_map(|a| Some((*a, f(a)?)))
                    .collect::<BTreeMap<SocketAddr, String>>()
            };
            out.push(LocalExport {
                service: e.key.clone(),
                port: p.port,
                port_name: p.name.clone(),
                protocol: p.protocol,
                hostnames: per(&|a| hostnames.get(&a.ip()).map(|h| (*h).clone())),
                zones: per(&|a| e.zone_of.get(&a.ip()).cloned()),
                // Versions come from pod labels, which this watch does not
                // read yet: Kubernetes endpoints are in no subset.
                versions: BTreeMap::new(),
                endpoints,
                headless: e.headless,
                health_path: None,
                exported_at_ms: e.exported_at_ms,
                client_ip_affinity: e.session_affinity == SessionAffinity::ClientIp,
            });
        }
    }
    out
}

/// Runs until dropped: keeps a gateway's `exports` equal to the cluster's
/// ServiceExports and their ready endpoints. Read-only: a gateway never
/// writes to the API server (the agent writes conditions).
pub struct FollowExports {
    stop: watch::Sender<bool>,
}

impl Drop for FollowExports {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Starts following the cluster's ServiceExports into `exports`.
pub async fn follow_exports(
    exports: std::sync::Arc<causeway_gateway::exports::Exports>,
) -> anyhow::Result<FollowExports> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or kubeconfig)")?;
    let (tx, mut rx) = watch::channel(Vec::new());
    let (stop_tx, stop) = watch::channel(false);
    let (never_leads, leading) = watch::channel(false);
    tokio::spawn(causeway_kube::agent::run_exports(
        client, tx, leading, None, stop,
    ));
    tokio::spawn(async move {
        let _never_leads = never_leads;
        while rx.changed().await.is_ok() {
            let table = local_exports(&rx.borrow_and_update());
            if exports.replace(table) {
                tracing::info!(
                    ports = exports.current().len(),
                    "exports changed (ServiceExports or their endpoints)"
                );
            }
        }
    });
    tracing::info!("following the cluster's ServiceExports");
    Ok(FollowExports { stop: stop_tx })
}

/// `causeway join` flags.
#[derive(Args, Debug)]
pub struct JoinArgs {
    /// Where the site's state goes (created if missing).
    #[arg(long)]
    pub state_dir: PathBuf,
    /// Where other sites reach this site's gateways: ip:port of the tunnel
    /// LoadBalancer (repeat for several).
    #[arg(long = "advertise", required = true)]
    pub advertise: Vec<String>,
    /// The one-time join token from `causeway ctl cluster add`.
    #[arg(long, env = "CAUSEWAY_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: String,
}

/// Joins once and exits; prints the site joined.
pub async fn run_join(args: JoinArgs) -> anyhow::Result<()> {
    let mut errs = ConfigErrors::new();
    for a in &args.advertise {
        if a.parse::<causeway_api::model::TunnelAddr>().is_err() {
            errs.push("advertise", format!("{a:?} is not ip:port[;weight=N]"));
        }
    }
    errs.into_result(|| ())?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    if let Some(s) = causeway_gateway::site::SiteState::load(&args.state_dir)? {
        anyhow::bail!(
            "{} already holds site {}: use another directory",
            args.state_dir.display(),
            s.site
        );
    }
    let ca = causeway_gateway::site::SiteState::site_ca(&args.state_dir, None)?;
    let s = causeway_gateway::site::SiteState::join(
        &args.state_dir,
        &args.join_token,
        &ca,
        args.advertise.clone(),
    )
    .await?;
    println!(
        "joined as site {} (trust domain {}); {} holds its state",
        s.site,
        s.trust_domain,
        args.state_dir.display()
    );
    Ok(())
}
