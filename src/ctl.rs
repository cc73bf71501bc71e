//! `causeway ctl`: the operator's client.

use std::path::PathBuf;

use anyhow::Context;
use causeway_api::client::ControllerClient;
use causeway_api::identity::{self, Credential};
use causeway_api::pb;
use clap::{Args, Subcommand, ValueEnum};

/// Where the controllers are and the admin credential to call them with
/// (`ctl`, `ui`, `check`).
#[derive(Args)]
pub struct ControllerFlags {
    /// Controller endpoints, comma-separated host:port.
    #[arg(
        long,
        env = "CAUSEWAY_CONTROLLERS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7001"
    )]
    pub controller: Vec<String>,
    /// Directory with ca.pem, admin.pem and admin-key.pem (from `causeway ca init`).
    #[arg(long, env = "CAUSEWAY_CREDS", default_value = "causeway-creds")]
    pub creds: PathBuf,
}

/// `causeway ctl` flags.
#[derive(Args)]
pub struct CtlArgs {
    /// Controllers and credential.
    #[command(flatten)]
    pub api: ControllerFlags,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Reads (cluster list, services, explain, policy list) show every write
    /// acknowledged before them: served by the leader after it confirms its
    /// leadership. Default: the answering node's applied state, which can
    /// lag briefly (e.g. right after the controllers restart).
    #[arg(long)]
    pub linearizable: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// How `ctl` prints.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    /// Tables for people.
    Text,
    /// JSON for programs.
    Json,
}

/// `ctl` subcommands.
#[derive(Subcommand)]
pub enum CtlCommand {
    /// Member sites (clusters).
    Cluster {
        /// What to do.
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Controller nodes: list, add, remove (the cluster keeps serving).
    Controller {
        /// What to do.
        #[command(subcommand)]
        command: ControllerCommand,
    },
    /// Backups of the federation state (see `causeway controller restore`).
    Snapshot {
        /// What to do.
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// Controller status: nodes, leader, term, indexes, catalog revision.
    Status,
    /// Exported services and the sites that export them.
    Services,
    /// How a name or service resolves, which sites could serve it, their
    /// health, and the order traffic takes now from a site — and why.
    Explain {
        /// `<svc>.<ns>.svc.clusterset.local` or `<ns>/<svc>`.
        target: String,
        /// The calling site (traffic order is per caller); default: none.
        #[arg(long)]
        from: Option<String>,
        /// Admin address of the calling site's gateway: adds what only it
        /// knows (round-trip times, outlier ejections).
        #[arg(long)]
        gateway: Option<String>,
    },
    /// Traffic policies: apply from YAML, list, delete.
    Policy {
        /// What to do.
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Admin credentials: issue, list, revoke, renew (recorded by the
    /// controllers; from the first recorded one on, only recorded ones count).
    Admin {
        /// What to do.
        #[command(subcommand)]
        command: crate::ctl_admin::AdminCommand,
    },
    /// A live view of what the gateways forward (requests per second, 5xx
    /// share, p99 per service; RTT, loss and state per link), from their
    /// metrics, refreshed every --interval seconds.
    Traffic {
        /// A gateway admin address, `SITE=HOST:PORT` (repeatable).
        #[arg(long = "gateway", required = true)]
        gateways: Vec<String>,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
        /// Stop after this many refreshes (default: run until interrupted).
        #[arg(long)]
        count: Option<u32>,
    },
    /// Credentials: revoke any credential, or a site's certificate by serial.
    Credential {
        /// What to do.
        #[command(subcommand)]
        command: CredentialCommand,
    },
}

/// `ctl credential` subcommands.
#[derive(Subcommand)]
pub enum CredentialCommand {
    /// Refuse a credential on every RPC from now on (open Watch streams of
    /// it end within seconds). Give its certificate or its SHA-256.
    Revoke {
        /// The credential's certificate (PEM file).
        #[arg(long, conflicts_with = "sha256", required_unless_present = "sha256")]
        cert: Option<PathBuf>,
        /// The SHA-256 of its certificate (hex, as `openssl x509 -fingerprint -sha256` prints it without colons).
        #[arg(long)]
        sha256: Option<String>,
    },
    /// Refuse one certificate a site's CA issued (a gateway's tunnel
    /// certificate, e.g. of a replica whose key leaked): every gateway
    /// refuses it and closes the tunnels it authenticated. The site's own
    /// gateway replaces its certificate at once if it was its own.
    RevokeCertificate {
        /// The site whose CA issued it.
        #[arg(long)]
        site: String,
        /// Its serial number (hex; `openssl x509 -serial` output works).
        #[arg(long, conflicts_with = "cert", required_unless_present = "cert")]
        serial: Option<String>,
        /// The certificate (PEM file).
        #[arg(long)]
        cert: Option<PathBuf>,
    },
}

/// `ctl policy` subcommands.
#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Create or replace the policies in FILE (YAML, several documents
    /// separated by `---`; `-` reads stdin). All or none are applied; every
    /// invalid field is reported before anything is sent.
    Apply {
        /// YAML or JSON documents; - reads stdin.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// List policies, optionally of one kind.
    List {
        /// Only policies of this kind.
        #[arg(long)]
        kind: Option<String>,
    },
    /// Delete the policy KIND NAMESPACE/NAME.
    Delete {
        /// The policy's kind (e.g. FailoverPolicy).
        kind: String,
        /// NAMESPACE/NAME.
        name: String,
    },
}

/// `ctl controller` subcommands.
#[derive(Subcommand)]
pub enum ControllerCommand {
    /// The nodes, their roles and replication state.
    List,
    /// Add node ID at ADDR (start it first with `causeway controller --join`).
    /// It joins as a learner and becomes a voter once it has caught up.
    Add {
        /// The new node's id.
        id: u64,
        /// Its address (HOST:PORT).
        addr: String,
    },
    /// Remove node ID from the cluster.
    Remove {
        /// The node's id.
        id: u64,
    },
}

/// `ctl snapshot` subcommands.
#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Write a backup of the whole federation state, as of every write
    /// acknowledged before the call, to FILE (checked, then renamed into
    /// place).
    Save {
        /// Where to write it.
        file: PathBuf,
    },
}

/// `ctl cluster` subcommands.
#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Reserve a site name and print a one-time join token for it.
    Add {
        /// The site's name (a DNS label).
        name: String,
        /// Label KEY=VALUE; repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Token lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// List member sites.
    List,
    /// Remove a site: its bundle, exports and tunnels go away.
    Remove {
        /// The site's name.
        name: String,
    },
    /// Replace a site's trust bundle with the CA certificates in FILE (PEM):
    /// for a site CA kept outside the gateway's state directory. Rotate by
    /// publishing old + new, moving the gateways, then the new one alone;
    /// peers retire tunnels a dropped CA authenticated. (Sites with the CA in
    /// their state directory: `causeway ca rotate-site`.)
    SetBundle {
        /// The site's name.
        name: String,
        /// PEM file with the CA certificates.
        file: PathBuf,
    },
    /// Replace a member site's labels with the given set (e.g. its region
    /// or zone, which locality failover reads); no --label clears them.
    SetLabels {
        /// The site's name.
        name: String,
        /// Label KEY=VALUE; repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
    },
}

/// `--label KEY=VALUE` arguments as a map.
fn label_args(labels: &[String]) -> anyhow::Result<std::collections::HashMap<String, String>> {
    labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow::anyhow!("--label {l:?}: expected KEY=VALUE"))
        })
        .collect()
}

/// An admin client for the controllers the flags name.
pub fn client(args: &CtlArgs) -> anyhow::Result<ControllerClient> {
    admin_client(&args.api.creds, args.api.controller.clone())
}

/// An admin client for `controllers` with the credentials in `creds`
/// (ca.pem, admin.pem, admin-key.pem).
pub fn admin_client(
    creds: &std::path::Path,
    controllers: Vec<String>,
) -> anyhow::Result<ControllerClient> {
    let ca = identity::read(&creds.join("ca.pem")).with_context(|| {
        format!(
            "reading credentials from {} (set --creds or CAUSEWAY_CREDS)",
            creds.display()
        )
    })?;
    let admin = Credential::load(&creds.join("admin.pem"), &creds.join("admin-key.pem"))?;
    Ok(ControllerClient::new(controllers, &ca, Some(&admin)))
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message(), s.code())
}

/// Runs one `ctl` command.
pub async fn run(args: CtlArgs) -> anyhow::Result<()> {
    // Validate a policy file before connecting: mistakes show even offline.
    let policy_docs = match &args.command {
        CtlCommand::Policy {
            command: PolicyCommand::Apply { file },
        } => read_policy_file(file)?,
        _ => Vec::new(),
    };
    if let CtlCommand::Admin { command } = &args.command {
        return crate::ctl_admin::run(&args, command).await;
    }
    if let CtlCommand::Traffic {
        gateways,
        interval,
        count,
    } = &args.command
    {
        if !(0.1..=3600.0).contains(interval) {
            anyhow::bail!("--interval {interval}: between 0.1 and 3600 seconds");
        }
        return crate::ctl_traffic::run(
            gateways,
            std::time::Duration::from_secs_f64(*interval),
            *count,
            args.output,
        )
        .await;
    }
    let c = client(&args)?;
    let mut fed = c.federation().await?;
    match &args.command {
        CtlCommand::Policy { command } => policy(&args, &c, &mut fed, command, policy_docs).await,
        CtlCommand::Credential {
            command: CredentialCommand::Revoke { cert, sha256 },
        } => {
            let cert_pem = match cert {
                Some(p) => std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?,
                None => String::new(),
            };
            let r = fed
                .revoke_credential(pb::RevokeCredentialRequest {
                    cert_pem,
                    sha256: sha256.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            println!("revoked {} (revision {})", r.sha256, r.revision);
            Ok(())
        }
        CtlCommand::Credential {
            command: CredentialCommand::RevokeCertificate { site, serial, cert },
        } => {
            let cert_pem = match cert {
                Some(p) => std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?,
                None => String::new(),
            };
            let serial = serial
                .as_deref()
                .map(|s| s.trim_start_matches("serial="))
                .unwrap_or_default()
                .to_string();
            let r = fed
                .revoke_certificate(pb::RevokeCertificateRequest {
                    site: site.clone(),
                    serial,
                    cert_pem,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            println!(
                "revoked certificate {} of site {site} (revision {})",
                r.serial, r.revision
            );
            Ok(())
        }
        CtlCommand::Admin { .. } | CtlCommand::Traffic { .. } => {
            unreachable!("run before connecting")
        }
        CtlCommand::Snapshot {
            command: SnapshotCommand::Save { file },
        } => snapshot_save(&c, file).await,
        CtlCommand::Cluster { command } => cluster(&args, &c, &mut fed, command).await,
        CtlCommand::Controller { command } => controller(&args, &mut fed, command).await,
        CtlCommand::Status => {
            let s = fed
                .status(pb::StatusRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            print_status(&s, args.output);
            Ok(())
        }
        CtlCommand::Explain {
            target,
            from,
            gateway,
        } => explain(&args, &c, target, from.as_deref(), gateway.as_deref()).await,
        CtlCommand::Services => services(&args, &c).await,
    }
}

type Federation = pb::federation_client::FederationClient<tonic::transport::Channel>;

/// A policy file (or `-` for stdin) read and validated: the documents as
/// JSON, or every problem.
fn read_policy_file(file: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    causeway_api::policy::read_documents(&text).map_err(|errs| {
        anyhow::anyhow!(
            "{} is invalid; nothing was applied:\n  {}",
            file.display(),
            errs.join("\n  ")
        )
    })
}

/// `ctl policy apply|list|delete`.
async fn policy(
    args: &CtlArgs,
    c: &ControllerClient,
    fed: &mut Federation,
    command: &PolicyCommand,
    policy_docs: Vec<String>,
) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Apply { .. } => {
            let r = fed
                .apply_policies(pb::ApplyPoliciesRequest {
                    documents_json: policy_docs.clone(),
                    ..Default::default()
                })
                .await
                .map_err(status_err)?
                .into_inner();
            for (doc, result) in policy_docs.iter().zip(&r.results) {
                let v: serde_json::Value = serde_json::from_str(doc)?;
                println!(
                    "{} {}/{} {result}",
                    v["kind"].as_str().unwrap_or("?"),
                    v["metadata"]["namespace"].as_str().unwrap_or("?"),
                    v["metadata"]["name"].as_str().unwrap_or("?"),
                );
            }
            if args.output == Output::Json {
                println!(
                    "{}",
                    serde_json::json!({"revision": r.revision, "results": r.results})
                );
            }
        }
        PolicyCommand::List { kind } => {
            let linearizable = args.linearizable;
            let r = c
                .call(linearizable, |mut f| {
                    let req = pb::ListPoliciesRequest {
                        kind: kind.clone().unwrap_or_default(),
                        linearizable,
                    };
                    async move { f.list_policies(req).await }
                })
                .await
                .map_err(status_err)?;
            if args.output == Output::Json {
                let list: Vec<serde_json::Value> = r
                    .policies
                    .iter()
                    .filter_map(|p| serde_json::from_str(&p.document_json).ok())
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"revision": r.revision, "policies": list})
                );
            } else {
                println!("{:<20} {:<32} {:>8}", "KIND", "NAMESPACE/NAME", "REVISION");
                for p in &r.policies {
                    println!(
                        "{:<20} {:<32} {:>8}",
                        p.kind,
                        format!("{}/{}", p.namespace, p.name),
                        p.revision
                    );
                }
            }
        }
        PolicyCommand::Delete { kind, name } => {
            let (namespace, name) = name
                .split_once('/')
                .ok_or_else(|| anyhow::anyhow!("{name:?}: write the policy as NAMESPACE/NAME"))?;
            fed.delete_policy(pb::DeletePolicyRequest {
                kind: kind.clone(),
                namespace: namespace.into(),
                name: name.into(),
            })
            .await
            .map_err(status_err)?;
            println!("{kind} {namespace}/{name} deleted");
        }
    }
    Ok(())
}

/// `ctl cluster add|list|remove|set-bundle|set-labels`.
async fn cluster(
    args: &CtlArgs,
    c: &ControllerClient,
    fed: &mut Federation,
    command: &ClusterCommand,
) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Add { name, labels, ttl } => {
            let r = fed
                .create_join_token(pb::CreateJoinTokenRequest {
                    site: name.clone(),
                    labels: label_args(labels)?,
                    ttl_seconds: *ttl,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if args.output == Output::Json {
                println!(
                    "{}",
                    serde_json::json!({"site": name, "token": r.token, "expires_at_unix_ms": r.expires_at_unix_ms})
                );
            } else {
                eprintln!("join token for site {name} (single use, expires in {ttl} s):");
                println!("{}", r.token);
            }
        }
        ClusterCommand::List => {
            let cat = c.catalog(args.linearizable).await.map_err(status_err)?;
            if args.output == Output::Json {
                let sites: Vec<_> = cat
                    .sites
                    .iter()
                    .map(|s| serde_json::json!({"name": s.name, "trust_domain": s.trust_domain, "tunnel_addrs": s.tunnel_addrs, "labels": s.labels, "available": s.available}))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"revision": cat.revision, "sites": sites})
                );
            } else {
                println!(
                    "{:<16} {:<28} {:<10} {:<8} {:<28} TUNNELS",
                    "SITE", "TRUST DOMAIN", "AVAILABLE", "EXPORTS", "LABELS"
                );
                for s in &cat.sites {
                    let n = cat
                        .exports
                        .iter()
                        .find(|e| e.site == s.name)
                        .map(|e| e.exports.len())
                        .unwrap_or(0);
                    let mut labels: Vec<String> =
                        s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    labels.sort();
                    let labels = if labels.is_empty() {
                        "-".to_string()
                    } else {
                        labels.join(",")
                    };
                    println!(
                        "{:<16} {:<28} {:<10} {:<8} {:<28} {}",
                        s.name,
                        s.trust_domain,
                        s.available,
                        n,
                        labels,
                        s.tunnel_addrs.join(",")
                    );
                }
            }
        }
        ClusterCommand::Remove { name } => {
            let r = fed
                .remove_site(pb::RemoveSiteRequest { site: name.clone() })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("removed site {name} (revision {})", r.revision);
        }
        ClusterCommand::SetBundle { name, file } => {
            let pem = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            let certs = pem.matches("-----BEGIN CERTIFICATE-----").count();
            let r = fed
                .update_trust_bundle(pb::UpdateTrustBundleRequest {
                    site: name.clone(),
                    trust_bundle_pem: pem,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            println!(
                "site {name} now trusts the {certs} CA certificate(s) in {} (revision {})",
                file.display(),
                r.revision
            );
        }
        ClusterCommand::SetLabels { name, labels } => {
            let r = fed
                .set_site_labels(pb::SetSiteLabelsRequest {
                    site: name.clone(),
                    labels: label_args(labels)?,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            println!(
                "site {name} now has {} label(s) (revision {})",
                labels.len(),
                r.revision
            );
        }
    }
    Ok(())
}

/// `ctl snapshot save FILE`: streams the backup from the leader, checks it
/// and moves it into place only when whole.
async fn snapshot_save(c: &ControllerClient, file: &std::path::Path) -> anyhow::Result<()> {
    let mut stream = c
        .call(true, |mut f| async move {
            f.save_snapshot(pb::SaveSnapshotRequest {}).await
        })
        .await
        .map_err(status_err)?;
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await.map_err(status_err)? {
        if bytes.len() as u64 + chunk.data.len() as u64
            > causeway_federation::backup::MAX_BODY + 8192
        {
            anyhow::bail!("the snapshot stream is larger than any backup can be; not written");
        }
        bytes.extend_from_slice(&chunk.data);
    }
    let (header, _) = causeway_federation::backup::decode(&bytes)
        .context("the snapshot received does not check out; nothing was written")?;
    let tmp = file.with_extension("partial");
    {
        use std::io::Write;
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, file).with_context(|| format!("writing {}", file.display()))?;
    println!(
        "saved revision {} ({} bytes, sha256 {}) from controller {} to {}",
        header.revision,
        bytes.len(),
        header.sha256,
        header.node_id,
        file.display()
    );
    Ok(())
}

/// `ctl controller list|add|remove`.
async fn controller(
    args: &CtlArgs,
    fed: &mut Federation,
    command: &ControllerCommand,
) -> anyhow::Result<()> {
    let s = match command {
        ControllerCommand::List => fed.status(pb::StatusRequest {}).await,
        ControllerCommand::Add { id, addr } => {
            fed.add_controller(pb::AddControllerRequest {
                id: *id,
                addr: addr.clone(),
            })
            .await
        }
        ControllerCommand::Remove { id } => {
            fed.remove_controller(pb::RemoveControllerRequest { id: *id })
                .await
        }
    }
    .map_err(status_err)?
    .into_inner();
    print_status(&s, args.output);
    Ok(())
}

/// `ctl explain NAME [--from SITE] [--gateway ADMIN]`.
async fn explain(
    args: &CtlArgs,
    c: &ControllerClient,
    target: &str,
    from: Option<&str>,
    gateway: Option<&str>,
) -> anyhow::Result<()> {
    let cat = c.catalog(args.linearizable).await.map_err(status_err)?;
    let view = causeway_api::catalog::CatalogView::from_snapshot(cat);
    let local = match gateway {
        Some(addr) => crate::explain::scrape_gateway(addr).await?,
        None => Default::default(),
    };
    let e = crate::explain::explain(&view, target, from, &local)?;
    if args.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&e.json)?);
    } else {
        print!("{}", e.text);
    }
    Ok(())
}

/// `ctl services`.
async fn services(args: &CtlArgs, c: &ControllerClient) -> anyhow::Result<()> {
    let cat = c.catalog(args.linearizable).await.map_err(status_err)?;
    let view = causeway_api::catalog::CatalogView::from_snapshot(cat);
    let svcs = view.services();
    if args.output == Output::Json {
        let list: Vec<_> = svcs
                .values()
                .map(|s| serde_json::json!({"service": s.key.to_string(), "vip_index": s.vip_index,
                    "ports": s.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
                    "exporters": s.exporters.iter().map(|(n, h)| serde_json::json!({"site": n.to_string(), "healthy_endpoints": h,
                        "total_endpoints": s.totals.get(n).copied().unwrap_or(*h),
                        "zones": s.zones.get(n).map(|zs| zs.iter().map(|z| serde_json::json!({"zone": z.zone, "healthy": z.healthy, "total": z.total})).collect::<Vec<_>>()).unwrap_or_default(),
                        "subsets": s.subsets.get(n).map(|gs| gs.iter().map(|g| serde_json::json!({"subset": g.name, "healthy": g.healthy, "total": g.total})).collect::<Vec<_>>()).unwrap_or_default()})).collect::<Vec<_>>(),
                    "headless": s.headless,
                    "endpoints": s.endpoints.iter().map(|(n, e)| serde_json::json!({"site": n.to_string(), "address": e.address, "hostname": e.hostname})).collect::<Vec<_>>()}))
                .collect();
        println!(
            "{}",
            serde_json::json!({"revision": view.revision.0, "services": list})
        );
    } else {
        println!(
            "{:<28} {:<12} SITES (healthy endpoints)",
            "SERVICE", "PORTS"
        );
        for s in svcs.values() {
            let ports: Vec<String> = s
                .ports
                .iter()
                .map(|p| format!("{}/{}", p.port, p.protocol))
                .collect();
            let sites: Vec<String> = s
                .exporters
                .iter()
                .map(|(n, h)| {
                    let mut parts = Vec::new();
                    if let Some(zs) = s.zones.get(n) {
                        parts.push(crate::explain::zone_summary(zs));
                    }
                    if let Some(gs) = s.subsets.get(n) {
                        parts.push(crate::explain::subset_summary(gs));
                    }
                    if parts.is_empty() {
                        format!("{n}({h})")
                    } else {
                        format!("{n}({h}: {})", parts.join("; "))
                    }
                })
                .collect();
            println!("{:<28} {:<12} {}", s.key, ports.join(","), sites.join(" "));
        }
    }
    Ok(())
}

fn print_status(s: &pb::StatusResponse, output: Output) {
    // Replication lag is known on the leader: its last index minus what
    // each node has matched.
    let lag = |n: &pb::NodeStatus| {
        (s.role == "leader").then(|| s.last_log_index.saturating_sub(n.matched_index))
    };
    if output == Output::Json {
        let nodes: Vec<_> = s
            .nodes
            .iter()
            .map(|n| serde_json::json!({"id": n.id, "addr": n.addr, "voter": n.voter, "matched_index": n.matched_index, "lag": lag(n)}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"node_id": s.node_id, "role": s.role, "term": s.term, "leader_id": s.leader_id,
                "last_log_index": s.last_log_index, "applied_index": s.applied_index, "revision": s.revision,
                "sites": s.sites, "nodes": nodes})
        );
        return;
    }
    println!(
        "answered by node {} ({}), term {}, leader {}",
        s.node_id, s.role, s.term, s.leader_id
    );
    println!(
        "log index {}, applied {}, catalog revision {}, {} sites",
        s.last_log_index, s.applied_index, s.revision, s.sites
    );
    println!(
        "{:<6} {:<24} {:<8} {:<8} LAG",
        "NODE", "ADDRESS", "ROLE", "MATCHED"
    );
    for n in &s.nodes {
        let role = if n.voter { "voter" } else { "learner" };
        let (matched, lag) = match lag(n) {
            Some(l) => (n.matched_index.to_string(), l.to_string()),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<6} {:<24} {:<8} {:<8} {}",
            n.id, n.addr, role, matched, lag
        );
    }
}
