//! `causeway install` (render a site's Kubernetes manifests) and
//! `causeway agent` (the site agent's Kubernetes side).

use std::net::SocketAddr;
use std::path::PathBuf;

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
}

/// The Lease the agent replicas elect their leader on.
const LEASE: &str = "causeway-agent";
/// How long a leader's Lease lasts without renewal.
const LEASE_DURATION: std::time::Duration = std::time::Duration::from_secs(15);

/// Runs the agent's export side against the cluster it runs in (or the
/// kubeconfig's): keeps every ServiceExport's `Valid` condition current
/// (the replica holding the `causeway-agent` Lease writes) and logs what
/// the site exports. Publishing to the controllers and imports are not
/// wired yet.
pub async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let mut errs = ConfigErrors::new();
    let admin_listen: Option<SocketAddr> = args
        .admin_listen
        .as_deref()
        .and_then(|a| errs.addr("admin_listen", a));
    if causeway_api::model::check_dns_label("site", &args.site).is_err() {
        errs.push("site", format!("{:?} must be a DNS label", args.site));
    }
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
    let task = tokio::spawn(causeway_kube::agent::run_exports(client, tx, leading, stop));
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
    let _ = task.await;
    let _ = election.await;
    Ok(())
}
