//! Command-line interface: flags, config files, and what each subcommand runs.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use causeway_api::identity::CertificateAuthority;
use causeway_dns::config::DnsConfig;
use causeway_federation::config::ControllerConfig;
use causeway_federation::node::Controller;
use causeway_gateway::config::GatewayConfig;
use causeway_gateway::site::SiteState;
use clap::{Args, Parser, Subcommand};

use crate::admin;
use crate::signal::shutdown_signal;

#[derive(Parser)]
#[command(
    name = "causeway",
    version,
    about = "Multi-cluster federation gateway mesh"
)]
/// The `causeway` command line.
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
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
    /// What is wrong with the federation, each finding with a fix (exit 1
    /// when a check fails).
    Check(crate::check::CheckArgs),
    /// Create the controller CA and an admin credential.
    Ca(CaArgs),
    /// Print a site's Kubernetes manifests (apply them with kubectl).
    Install(crate::kubernetes::InstallArgs),
    /// Run a site's Kubernetes agent (Multi-Cluster Services API).
    Agent(crate::kubernetes::AgentArgs),
    /// Join a site with its one-time token and exit: the state directory
    /// then holds the site (for a Kubernetes Secret, or a gateway's
    /// `state_dir`).
    Join(crate::kubernetes::JoinArgs),
    /// Serve a read-only web view of the federation on loopback.
    Ui(crate::ui::UiArgs),
}

/// `causeway ca`.
#[derive(Args)]
pub struct CaArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: CaCommand,
}

/// CA operations.
#[derive(Subcommand)]
pub enum CaCommand {
    /// Write ca.pem, ca-key.pem, admin.pem and admin-key.pem into DIR.
    Init {
        /// Where to write them.
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
        /// Which step.
        #[arg(value_enum)]
        step: crate::rotate::Step,
    },
}

/// `causeway controller` flags.
#[derive(Args, Debug)]
pub struct ControllerArgs {
    /// TOML file with the same fields as the flags (flags then are not allowed).
    #[arg(long, conflicts_with_all = ["id", "listen", "peer", "data_dir", "ca_dir", "join", "site_lease_ms", "snapshot_every", "watch_stall_ms", "site_credential_lifetime_secs", "admin_credential_lifetime_secs", "otlp_endpoint", "trace_sample_ratio"])]
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
    /// Where the log, vote and snapshots live.
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
    /// Lifetime of a site's API credential, s (default a year; gateways
    /// renew it at two thirds).
    #[arg(long)]
    pub site_credential_lifetime_secs: Option<u64>,
    /// Longest lifetime of an admin credential, s (default 90 days).
    #[arg(long)]
    pub admin_credential_lifetime_secs: Option<u64>,
    /// OTLP/gRPC collector for traces, e.g. http://127.0.0.1:4317 (default:
    /// tracing off).
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// Share of new traces sampled, 0 to 1 (default 0.01).
    #[arg(long)]
    pub trace_sample_ratio: Option<f64>,
    /// A one-off action on a node's data instead of running it.
    #[command(subcommand)]
    pub action: Option<ControllerAction>,
}

/// `causeway controller restore|…`: offline actions on a node's data.
#[derive(clap::Subcommand, Debug)]
pub enum ControllerAction {
    /// Build this node's data directory for a NEW cluster from a backup
    /// (`causeway ctl snapshot save`), as `etcdutl snapshot restore` does:
    /// run it for every member with the same file and the same --peer
    /// list, then start them as usual. The state (sites, credentials'
    /// records, bundles, exports, policies, tokens) is the backup's; the
    /// membership is the --peer list.
    Restore {
        /// The backup file.
        #[arg(long)]
        snapshot: PathBuf,
        /// The node's data directory (must be empty or absent).
        #[arg(long)]
        data_dir: PathBuf,
        /// This node's id.
        #[arg(long)]
        id: u64,
        /// A member of the new cluster, ID=HOST:PORT; repeat for each, this
        /// node included.
        #[arg(long = "peer", required = true)]
        peer: Vec<String>,
    },
    /// After losing a majority of controllers for good: make this stopped,
    /// surviving node a new ONE-node cluster holding what its own data
    /// holds. Writes the lost nodes had and this one never received are
    /// LOST; entries it had that were never confirmed are kept. Its old
    /// data is moved aside. Then start it with `--peer ID=ADDR` (itself
    /// only) and grow it back with `causeway ctl controller add`.
    Recover {
        /// Required: this replaces the membership.
        #[arg(long, required = true)]
        force_new_cluster: bool,
        /// The node's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// This node's id.
        #[arg(long)]
        id: u64,
        /// The node's address (HOST:PORT), its only member's.
        #[arg(long)]
        advertise: String,
    },
}

/// `causeway gateway` flags.
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
    /// This replica's name, instead of the config's `replica` (on
    /// Kubernetes, the pod's name: each replica gets its own identity).
    #[arg(long, env = "CAUSEWAY_REPLICA")]
    pub replica: Option<String>,
}

/// `causeway dns` flags.
#[derive(Args, Debug)]
pub struct DnsArgs {
    /// TOML file with the same fields as the flags (`state_dir`
    /// required); followed for changes and on SIGHUP, which apply `ttl`,
    /// `negative_ttl`, `zone` and `vip_range` without a restart.
    #[arg(long = "config", conflicts_with_all = ["state_dir", "admin_listen", "upstream", "forward_allow"])]
    pub config_file: Option<PathBuf>,
    /// The site's state directory (written by the gateway when it joined).
    #[arg(long, required_unless_present = "config_file")]
    pub state_dir: Option<PathBuf>,
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
    /// Admin (metrics, /ready) listen address.
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
    /// Client network (CIDR) whose out-of-zone queries are forwarded;
    /// repeat for several. Default: loopback and --vip-range. Others get
    /// REFUSED.
    #[arg(long = "forward-allow")]
    pub forward_allow: Vec<String>,
    /// Forwards in flight at once (each holds a socket); more get SERVFAIL.
    #[arg(long, default_value_t = causeway_dns::handler::DEFAULT_MAX_FORWARDS)]
    pub max_forwards: usize,
}

/// Exit code for configuration errors (EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;

/// Every problem found in a configuration (the exit code is [`EXIT_CONFIG`]).
pub use causeway_api::config::ConfigErrors;

impl ControllerArgs {
    /// The config these flags (or the `--config` file) describe.
    pub fn config(&self) -> anyhow::Result<ControllerConfig> {
        if let Some(p) = &self.config {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            return Ok(ControllerConfig::from_toml(
                &p.display().to_string(),
                &text,
            )?);
        }
        Ok(ControllerConfig {
            id: self.id,
            listen: self.listen.clone(),
            advertise: self.advertise.clone(),
            peers: self
                .peer
                .iter()
                .map(|p| match p.split_once('=') {
                    Some((a, b)) => (a.to_string(), b.to_string()),
                    None => (p.clone(), String::new()),
                })
                .collect(),
            data_dir: self.data_dir.clone(),
            ca_dir: self.ca_dir.clone(),
            admin_listen: self.admin_listen.clone(),
            site_lease_ms: self.site_lease_ms,
            snapshot_every: self.snapshot_every,
            watch_stall_ms: self.watch_stall_ms,
            join: self.join,
            site_credential_lifetime_secs: self.site_credential_lifetime_secs,
            admin_credential_lifetime_secs: self.admin_credential_lifetime_secs,
            tracing: causeway_api::trace::TracingConfig {
                otlp_endpoint: self.otlp_endpoint.clone().unwrap_or_default(),
                sample_ratio: self
                    .trace_sample_ratio
                    .unwrap_or(causeway_api::trace::TracingConfig::default().sample_ratio),
                ..Default::default()
            },
            ..Default::default()
        })
    }
}

impl DnsArgs {
    /// The config these flags describe.
    pub fn config(&self) -> DnsConfig {
        DnsConfig {
            state_dir: self.state_dir.clone().unwrap_or_default(),
            listen: self.listen.clone(),
            zone: self.zone.clone(),
            vip_range: self.vip_range.clone(),
            ttl: self.ttl,
            negative_ttl: self.negative_ttl,
            admin_listen: self.admin_listen.clone(),
            udp_sockets: self.udp_sockets,
            upstream: self.upstream.clone(),
            edns_udp_size: self.edns_udp_size,
            forward_allow: self.forward_allow.clone(),
            max_forwards: self.max_forwards,
        }
    }
}

/// An `--admin-listen` flag as an address.
fn admin_addr(flag: &str) -> Result<SocketAddr, ConfigErrors> {
    let mut errs = ConfigErrors::new();
    let addr = errs.addr("admin_listen", flag);
    errs.into_result(|| addr.expect("checked"))
}

/// `causeway controller`: runs one node until SIGTERM.
pub async fn run_controller(args: ControllerArgs) -> anyhow::Result<()> {
    if let Some(action) = &args.action {
        return controller_action(action);
    }
    let settings = args.config()?.validate()?;
    let ca_dir = &settings.ca_dir;
    let ca = CertificateAuthority::load(&ca_dir.join("ca.pem"), &ca_dir.join("ca-key.pem"))
        .context("loading the controller CA")?;
    let plan = (settings.options(ca), settings.listen, settings.admin_listen);
    let (opts, listen, admin_listen) = plan;
    let metrics = admin::install_metrics()?;
    if let Some(a) = admin_listen {
        let bound = admin::serve(a, metrics, "controller", None).await?;
        tracing::info!(addr = %bound, "admin port up");
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let (controller, identity) = Controller::start(&opts).await?;
    tracing::info!(id = opts.node_id, %listen, "controller serving");
    // On a worker thread, not the main thread's `block_on`: the accept
    // loop and the stop watch then never need a cross-thread wake-up.
    tokio::spawn(controller.serve(identity, listener, shutdown_signal()))
        .await
        .context("controller server task")?
}

/// `causeway controller restore`.
fn controller_action(action: &ControllerAction) -> anyhow::Result<()> {
    let (snapshot, data_dir, id, peer) = match action {
        ControllerAction::Restore {
            snapshot,
            data_dir,
            id,
            peer,
        } => (snapshot, data_dir, id, peer),
        ControllerAction::Recover {
            force_new_cluster: _,
            data_dir,
            id,
            advertise,
        } => {
            if advertise.parse::<SocketAddr>().is_err() {
                anyhow::bail!("--advertise {advertise}: expected HOST:PORT, e.g. 10.0.0.1:7001");
            }
            let r = causeway_federation::backup::force_new_cluster(data_dir, *id, advertise)?;
            println!(
                "node {id} is now a one-node cluster at revision {} (log replayed to index {}); its old data is in {}. Start it with --id {id} --peer {id}={advertise}, then add nodes with `causeway ctl controller add`",
                r.revision,
                r.last_index,
                r.kept.display()
            );
            return Ok(());
        }
    };
    let mut members = std::collections::BTreeMap::new();
    for p in peer {
        let parsed = p
            .split_once('=')
            .and_then(|(i, a)| Some((i.parse::<u64>().ok()?, a.parse::<SocketAddr>().ok()?)));
        match parsed {
            Some((pid, _)) if pid > 0 => {
                members.insert(pid, p.split_once('=').expect("checked").1.to_string());
            }
            _ => anyhow::bail!(
                "--peer {p}: expected ID=HOST:PORT with a positive ID, e.g. 1=10.0.0.1:7001"
            ),
        }
    }
    let file = std::fs::read(snapshot)
        .with_context(|| format!("--snapshot: reading {}", snapshot.display()))?;
    let header = causeway_federation::backup::restore(data_dir, *id, &members, &file)
        .with_context(|| format!("--snapshot {}", snapshot.display()))?;
    println!(
        "restored revision {} (saved by controller {}) into {} as node {id} of a new cluster of {} node(s); start it with the same --id and --peer flags",
        header.revision,
        header.node_id,
        data_dir.display(),
        members.len()
    );
    Ok(())
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

/// `causeway gateway`: joins once if needed, then runs until SIGTERM
/// and drains.
pub async fn run_gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let mut config = GatewayConfig::from_toml(&text)?;
    if let Some(r) = &args.replica {
        config.replica = r.clone();
    }
    let mut settings = config.validate()?;
    // Followed from now on: a changed file, or SIGHUP, reloads what can
    // change live (docs/operations.md).
    settings.config_file = Some(args.config.clone());
    settings.replica_override = args.replica.clone();
    let metrics = admin::install_metrics()?;
    let ready = std::sync::Arc::new(causeway_gateway::Readiness::default());
    if let Some(a) = &args.admin_listen {
        let a = admin_addr(a)?;
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
    let exports = if settings.kubernetes {
        causeway_gateway::exports::Exports::unknown(settings.balancer)
    } else {
        causeway_gateway::exports::Exports::new(settings.exports.clone(), settings.balancer)
    };
    let _follow = if settings.kubernetes {
        Some(crate::kubernetes::follow_exports(exports.clone()).await?)
    } else {
        None
    };
    causeway_gateway::run(settings, state, udp, ready, exports, shutdown_signal()).await
}

/// Follows a DNS server's config file (a change, or SIGHUP): the zone's
/// options apply at once; an invalid file is refused and the running
/// config stays; other changed fields wait for a restart.
async fn follow_dns_config(
    path: PathBuf,
    mut running: DnsConfig,
    zone: tokio::sync::watch::Sender<causeway_dns::zone::ZoneOptions>,
) {
    let mut watch = causeway_api::reload::FileWatch::new(path.clone());
    loop {
        let why = watch.next().await;
        let new = std::fs::read_to_string(&path)
            .map_err(|e| format!("reading {}: {e}", path.display()))
            .and_then(|t| DnsConfig::from_toml(&t).map_err(|e| e.to_string()))
            .and_then(|c| {
                let s = c.validate().map_err(|e| e.to_string())?;
                Ok((c, s))
            });
        match new {
            Err(errors) => causeway_api::reload::refused(why, &errors),
            Ok((c, s)) => {
                let mut rest = c.clone();
                rest.zone = running.zone.clone();
                rest.vip_range = running.vip_range.clone();
                rest.ttl = running.ttl;
                rest.negative_ttl = running.negative_ttl;
                if format!("{rest:?}") != format!("{running:?}") {
                    tracing::warn!("changes other than zone, vip_range, ttl and negative_ttl take effect at the next restart");
                }
                running.zone = c.zone;
                running.vip_range = c.vip_range;
                running.ttl = c.ttl;
                running.negative_ttl = c.negative_ttl;
                zone.send_replace(s.zone);
                causeway_api::reload::applied(why, &["zone"]);
            }
        }
    }
}

/// `causeway dns`: serves the mesh zone until SIGTERM.
pub async fn run_dns(args: DnsArgs) -> anyhow::Result<()> {
    let config = match &args.config_file {
        Some(p) => DnsConfig::from_toml(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )?,
        None => args.config(),
    };
    let settings = config.validate()?;
    let (zone_tx, zone_rx) = tokio::sync::watch::channel(settings.zone.clone());
    if let Some(path) = args.config_file.clone() {
        tokio::spawn(follow_dns_config(path, config.clone(), zone_tx));
    }
    let metrics = admin::install_metrics()?;
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(a) = settings.admin_listen {
        let flag = ready.clone();
        let probe: admin::Readiness = std::sync::Arc::new(move || {
            (!flag.load(std::sync::atomic::Ordering::Acquire)).then(|| {
                "no catalog snapshot from the controllers yet (answering SERVFAIL)".to_string()
            })
        });
        admin::serve(a, metrics, "dns", Some(probe)).await?;
    }
    let state = SiteState::load(&settings.state_dir)?.ok_or_else(|| {
        anyhow::anyhow!(
            "{} holds no joined site; start the site's gateway with --join-token first",
            settings.state_dir.display()
        )
    })?;
    let listen = settings.listen;
    let udp = causeway_dns::bind_udp(listen, settings.udp_sockets)
        .with_context(|| format!("binding UDP {listen}"))?;
    let tcp = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding TCP {listen}"))?;
    tracing::info!(%listen, zone = %settings.zone.origin, site = %state.site, "dns serving");
    let client = state.controller_client();
    // The site's gateway renews the credential; this follows the file.
    tokio::spawn({
        let (state, client) = (state.clone(), client.clone());
        async move { state.follow_api_credential(client).await }
    });
    causeway_dns::run(
        zone_rx,
        client,
        udp,
        tcp,
        settings.serve,
        ready,
        shutdown_signal(),
    )
    .await
}
