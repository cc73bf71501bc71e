//! Command-line interface: flags, config files, and what each subcommand runs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use causeway_api::identity::CertificateAuthority;
use causeway_federation::node::{Controller, ControllerOptions, RaftTiming};
use causeway_gateway::config::GatewayConfig;
use causeway_gateway::site::SiteState;
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::admin;
use crate::signal::shutdown_signal;

#[derive(Parser)]
#[command(
    name = "causeway",
    version,
    about = "Multi-cluster federation gateway mesh"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run a whole federation on loopback: 3 controllers, 3 sites, a failover.
    Demo(crate::demo::DemoArgs),
    /// Run a federation controller node (openraft, gRPC over mTLS).
    Controller(ControllerArgs),
    /// Run a site's east-west gateway (QUIC mTLS tunnels).
    Gateway(GatewayArgs),
    /// Run a site's mesh DNS server for <svc>.<ns>.svc.clusterset.local.
    Dns(DnsArgs),
    /// Administer the federation.
    Ctl(crate::ctl::CtlArgs),
    /// Create the controller CA and an admin credential.
    Ca(CaArgs),
}

#[derive(Args)]
pub struct CaArgs {
    #[command(subcommand)]
    pub command: CaCommand,
}

#[derive(Subcommand)]
pub enum CaCommand {
    /// Write ca.pem, ca-key.pem, admin.pem and admin-key.pem into DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Name in the admin credential's SPIFFE ID.
        #[arg(long, default_value = "admin")]
        admin: String,
    },
    /// Rotate a site's CA without dropping tunnels, in three steps run
    /// one after the other: start (publish old + new CA), finish (switch
    /// to the new CA; then SIGHUP each gateway replica), prune (publish the
    /// new CA alone).
    RotateSite {
        /// The site gateway's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(value_enum)]
        step: crate::rotate::Step,
    },
}

#[derive(Args, Debug)]
pub struct ControllerArgs {
    /// TOML file with the same fields as the flags (flags then are not allowed).
    #[arg(long, conflicts_with_all = ["id", "listen", "peer", "data_dir", "ca_dir", "join", "site_lease_ms", "snapshot_every", "watch_stall_ms"])]
    pub config: Option<PathBuf>,
    /// This node's id (a positive integer, unique in the cluster).
    #[arg(long)]
    pub id: Option<u64>,
    /// gRPC listen address (API and Raft).
    #[arg(long)]
    pub listen: Option<String>,
    /// Address other nodes and clients use; defaults to --listen.
    #[arg(long)]
    pub advertise: Option<String>,
    /// An initial voter, ID=HOST:PORT; repeat for each node, this one included.
    #[arg(long = "peer")]
    pub peer: Vec<String>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Directory with the controller CA (ca.pem, ca-key.pem).
    #[arg(long)]
    pub ca_dir: Option<PathBuf>,
    /// Admin (metrics) listen address.
    #[arg(long)]
    pub admin_listen: Option<String>,
    /// A site whose gateways stop heartbeating for this long leaves routing and DNS.
    #[arg(long)]
    pub site_lease_ms: Option<u64>,
    /// Snapshot and compact the Raft log every this many entries.
    #[arg(long)]
    pub snapshot_every: Option<u64>,
    /// A watcher that reads nothing for this long is cut off (it resumes and
    /// resyncs); default 10000.
    #[arg(long)]
    pub watch_stall_ms: Option<u64>,
    /// Start empty and wait to be added with `causeway ctl controller add`
    /// (never initialize a new cluster).
    #[arg(long)]
    pub join: bool,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ControllerFile {
    pub id: Option<u64>,
    pub listen: Option<String>,
    pub advertise: Option<String>,
    #[serde(default)]
    pub peers: BTreeMap<String, String>,
    pub data_dir: Option<PathBuf>,
    pub ca_dir: Option<PathBuf>,
    pub admin_listen: Option<String>,
    pub heartbeat_ms: Option<u64>,
    pub election_timeout_min_ms: Option<u64>,
    pub election_timeout_max_ms: Option<u64>,
    pub site_lease_ms: Option<u64>,
    pub site_recover_ms: Option<u64>,
    pub snapshot_every: Option<u64>,
    pub watch_stall_ms: Option<u64>,
    #[serde(default)]
    pub join: bool,
}

#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// Gateway config file (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// One-time join token from `causeway ctl cluster add`; ignored once the site has joined.
    #[arg(long, env = "CAUSEWAY_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// Admin (metrics) listen address.
    #[arg(long)]
    pub admin_listen: Option<String>,
}

#[derive(Args, Debug)]
pub struct DnsArgs {
    /// The site's state directory (written by the gateway when it joined).
    #[arg(long)]
    pub state_dir: PathBuf,
    /// UDP and TCP listen address.
    #[arg(long, default_value = "127.0.0.1:5353")]
    pub listen: String,
    /// The zone to serve.
    #[arg(long, default_value = "clusterset.local")]
    pub zone: String,
    /// Must equal the gateway's vip_range.
    #[arg(long, default_value = "127.10.0.0/16")]
    pub vip_range: String,
    /// TTL of positive answers, seconds.
    #[arg(long, default_value_t = 5)]
    pub ttl: u32,
    /// TTL of negative answers (SOA minimum), seconds.
    #[arg(long, default_value_t = 5)]
    pub negative_ttl: u32,
    #[arg(long)]
    pub admin_listen: Option<String>,
    /// UDP sockets bound to the listen address with SO_REUSEPORT, so the
    /// kernel spreads queries over them and they are served in parallel;
    /// 0 means one per CPU.
    #[arg(long, default_value_t = 0)]
    pub udp_sockets: usize,
    /// Resolver to forward queries outside the zone to (UDP, ip:port);
    /// repeat for fallbacks. Without one they are REFUSED. Forwarding makes
    /// this server a resolver for whoever can reach it: keep it private.
    #[arg(long = "upstream")]
    pub upstream: Vec<String>,
    /// Largest UDP answer to an EDNS0 query, bytes (512-4096). Larger
    /// answers are truncated and clients retry over TCP.
    #[arg(long, default_value_t = causeway_dns::handler::DEFAULT_EDNS_UDP_SIZE)]
    pub edns_udp_size: u16,
}

/// Exit code for configuration errors (EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;

#[derive(Debug)]
pub struct ConfigError(pub Vec<String>);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid configuration:")?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

fn parse_addr(errs: &mut Vec<String>, field: &str, v: Option<&str>) -> Option<SocketAddr> {
    match v {
        None => {
            errs.push(format!("{field}: required"));
            None
        }
        Some(s) => s
            .parse()
            .map_err(|_| errs.push(format!("{field}: {s:?} is not an ip:port address")))
            .ok(),
    }
}

pub struct ControllerPlan {
    pub opts: ControllerOptions,
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
}

pub fn controller_plan(args: ControllerArgs) -> anyhow::Result<ControllerPlan> {
    let file = match &args.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str::<ControllerFile>(&text).map_err(|e| {
                ConfigError(vec![format!("{}: {}", p.display(), e.to_string().trim())])
            })?
        }
        None => ControllerFile {
            id: args.id,
            listen: args.listen.clone(),
            advertise: args.advertise.clone(),
            peers: args
                .peer
                .iter()
                .map(|p| match p.split_once('=') {
                    Some((a, b)) => (a.to_string(), b.to_string()),
                    None => (p.clone(), String::new()),
                })
                .collect(),
            data_dir: args.data_dir.clone(),
            ca_dir: args.ca_dir.clone(),
            admin_listen: args.admin_listen.clone(),
            site_lease_ms: args.site_lease_ms,
            snapshot_every: args.snapshot_every,
            watch_stall_ms: args.watch_stall_ms,
            join: args.join,
            ..Default::default()
        },
    };
    let mut errs = Vec::new();
    let id = match file.id {
        Some(0) | None => {
            errs.push("id: required, a positive integer".into());
            0
        }
        Some(i) => i,
    };
    let listen = parse_addr(&mut errs, "listen", file.listen.as_deref());
    let advertise = file
        .advertise
        .clone()
        .or_else(|| file.listen.clone())
        .unwrap_or_default();
    let mut peers = BTreeMap::new();
    for (k, v) in &file.peers {
        match (k.parse::<u64>(), v.parse::<SocketAddr>()) {
            (Ok(pid), Ok(_)) if pid > 0 => {
                peers.insert(pid, v.clone());
            }
            _ => errs.push(format!(
                "peer {k}={v}: expected ID=HOST:PORT with a positive ID, e.g. 1=127.0.0.1:7001"
            )),
        }
    }
    if peers.is_empty() {
        peers.insert(id, advertise.clone());
    }
    if !peers.contains_key(&id) {
        errs.push(format!("peer: the peers must include this node (id {id})"));
    }
    let data_dir = file.data_dir.clone().unwrap_or_else(|| {
        errs.push("data_dir: required".into());
        PathBuf::new()
    });
    let ca_dir = file.ca_dir.clone().unwrap_or_else(|| {
        errs.push("ca_dir: required (create one with `causeway ca init --dir DIR`)".into());
        PathBuf::new()
    });
    let admin_listen = file
        .admin_listen
        .as_deref()
        .and_then(|a| parse_addr(&mut errs, "admin_listen", Some(a)));
    let mut timing = RaftTiming::default();
    if let Some(h) = file.heartbeat_ms {
        timing.heartbeat_ms = h;
    }
    if let Some(m) = file.election_timeout_min_ms {
        timing.election_min_ms = m;
    }
    if let Some(m) = file.election_timeout_max_ms {
        timing.election_max_ms = m;
    }
    if let Some(n) = file.snapshot_every {
        if n < 10 {
            errs.push("snapshot_every: at least 10".into());
        }
        timing.snapshot_every = n;
    }
    if timing.election_min_ms <= timing.heartbeat_ms
        || timing.election_max_ms <= timing.election_min_ms
    {
        errs.push("election timeouts: need heartbeat_ms < election_timeout_min_ms < election_timeout_max_ms".into());
    }
    let mut leases = causeway_federation::lease::LeaseConfig::default();
    if let Some(ms) = file.site_lease_ms {
        leases.lease = std::time::Duration::from_millis(ms);
    }
    if let Some(ms) = file.site_recover_ms {
        leases.recover_after = std::time::Duration::from_millis(ms);
    }
    if leases.lease < std::time::Duration::from_millis(500) {
        errs.push("site_lease_ms: at least 500".into());
    }
    let watch_stall = std::time::Duration::from_millis(file.watch_stall_ms.unwrap_or(10_000));
    if watch_stall < std::time::Duration::from_millis(100) {
        errs.push("watch_stall_ms: at least 100".into());
    }
    if !errs.is_empty() {
        return Err(ConfigError(errs).into());
    }
    let ca = CertificateAuthority::load(&ca_dir.join("ca.pem"), &ca_dir.join("ca-key.pem"))
        .context("loading the controller CA")?;
    Ok(ControllerPlan {
        opts: ControllerOptions {
            node_id: id,
            advertise,
            peers,
            data_dir,
            ca: Arc::new(ca),
            timing,
            leases,
            watch_stall,
            join_existing: file.join,
        },
        listen: listen.expect("checked"),
        admin_listen,
    })
}

pub async fn run_controller(args: ControllerArgs) -> anyhow::Result<()> {
    let plan = controller_plan(args)?;
    let metrics = admin::install_metrics()?;
    if let Some(a) = plan.admin_listen {
        let bound = admin::serve(a, metrics, "controller", None).await?;
        tracing::info!(addr = %bound, "admin port up");
    }
    let listener = tokio::net::TcpListener::bind(plan.listen)
        .await
        .with_context(|| format!("binding {}", plan.listen))?;
    let (controller, identity) = Controller::start(&plan.opts).await?;
    tracing::info!(id = plan.opts.node_id, listen = %plan.listen, "controller serving");
    // On a worker thread, not the main thread's `block_on`: the accept
    // loop and the stop watch then never need a cross-thread wake-up.
    tokio::spawn(controller.serve(identity, listener, shutdown_signal()))
        .await
        .context("controller server task")?
}

/// `worker_threads` from the gateway config, read before the runtime is
/// built; 0 (one per CPU) when the file cannot be read or parsed — the
/// gateway then reports that error itself.
pub fn gateway_worker_threads(args: &GatewayArgs) -> usize {
    std::fs::read_to_string(&args.config)
        .ok()
        .and_then(|t| GatewayConfig::from_toml(&t).ok())
        .map(|c| c.worker_threads.min(1024))
        .unwrap_or(0)
}

pub async fn run_gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let cfg = GatewayConfig::from_toml(&text).map_err(|e| ConfigError(e.0))?;
    let settings = cfg.validate().map_err(|e| ConfigError(e.0))?;
    let metrics = admin::install_metrics()?;
    let ready = std::sync::Arc::new(causeway_gateway::Readiness::default());
    if let Some(a) = &args.admin_listen {
        let a: SocketAddr = a.parse().map_err(|_| {
            ConfigError(vec![format!(
                "admin_listen: {a:?} is not an ip:port address"
            )])
        })?;
        let probe_ready = ready.clone();
        let probe: admin::Readiness = std::sync::Arc::new(move || probe_ready.not_ready());
        admin::serve(a, metrics, "gateway", Some(probe)).await?;
    }
    let udp = causeway_gateway::tunnel::bind_udp(settings.tunnel_listen)?;
    let state = match SiteState::load(&settings.state_dir)? {
        Some(s) => {
            if args.join_token.is_some() {
                tracing::info!(site = %s.site, "already joined; ignoring --join-token");
            }
            s
        }
        None => {
            let Some(token) = &args.join_token else {
                anyhow::bail!(
                    "{} holds no site yet: start the gateway once with --join-token (from `causeway ctl cluster add NAME`)",
                    settings.state_dir.display()
                );
            };
            let ca = SiteState::site_ca(&settings.state_dir, settings.site_ca.as_ref())?;
            let addrs = settings
                .tunnel_advertise
                .iter()
                .map(|a| a.to_string())
                .collect();
            let s = SiteState::join(&settings.state_dir, token, &ca, addrs).await?;
            tracing::info!(site = %s.site, "joined the federation");
            s
        }
    };
    causeway_gateway::run(settings, state, udp, ready, shutdown_signal()).await
}

pub async fn run_dns(args: DnsArgs) -> anyhow::Result<()> {
    let mut errs = Vec::new();
    let listen: Option<SocketAddr> = parse_addr(&mut errs, "listen", Some(&args.listen));
    let vip = causeway_api::model::parse_cidr("vip_range", &args.vip_range)
        .map_err(|e| errs.push(format!("vip_range: {e}")))
        .ok();
    if hickory_proto::rr::Name::from_ascii(&args.zone).is_err() || args.zone.is_empty() {
        errs.push(format!("zone: {:?} is not a DNS name", args.zone));
    }
    let mut upstreams = Vec::new();
    for (i, u) in args.upstream.iter().enumerate() {
        match u.parse::<SocketAddr>() {
            Ok(a) => upstreams.push(a),
            Err(_) => errs.push(format!(
                "upstream[{i}]: {u:?} is not an ip:port address (e.g. 10.96.0.10:53)"
            )),
        }
    }
    if !(512..=4096).contains(&args.edns_udp_size) {
        errs.push(format!(
            "edns_udp_size: {} is outside 512-4096 (1232 avoids IP fragmentation)",
            args.edns_udp_size
        ));
    }
    if !errs.is_empty() {
        return Err(ConfigError(errs).into());
    }
    let listen = listen.expect("checked");
    let (vip_base, vip_prefix) = vip.expect("checked");
    let metrics = admin::install_metrics()?;
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(a) = &args.admin_listen {
        let a: SocketAddr = a.parse().map_err(|_| {
            ConfigError(vec![format!(
                "admin_listen: {a:?} is not an ip:port address"
            )])
        })?;
        let flag = ready.clone();
        let probe: admin::Readiness = std::sync::Arc::new(move || {
            (!flag.load(std::sync::atomic::Ordering::Acquire)).then(|| {
                "no catalog snapshot from the controllers yet (answering SERVFAIL)".to_string()
            })
        });
        admin::serve(a, metrics, "dns", Some(probe)).await?;
    }
    let state = SiteState::load(&args.state_dir)?.ok_or_else(|| {
        anyhow::anyhow!(
            "{} holds no joined site; start the site's gateway with --join-token first",
            args.state_dir.display()
        )
    })?;
    let n = match args.udp_sockets {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n.min(64),
    };
    let udp = causeway_dns::bind_udp(listen, n).with_context(|| format!("binding UDP {listen}"))?;
    let tcp = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding TCP {listen}"))?;
    tracing::info!(%listen, zone = %args.zone, site = %state.site, "dns serving");
    let opts = causeway_dns::zone::ZoneOptions {
        origin: args.zone,
        ttl: args.ttl,
        negative_ttl: args.negative_ttl,
        vip_base,
        vip_prefix,
    };
    causeway_dns::run(
        opts,
        state.controller_client(),
        udp,
        tcp,
        causeway_dns::handler::ServeOptions {
            upstreams,
            edns_udp_size: args.edns_udp_size,
        },
        ready,
        shutdown_signal(),
    )
    .await
}
