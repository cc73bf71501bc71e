//! `causeway demo`: a whole federation on loopback, used as a user would.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;

use crate::local::wait::until;
use crate::local::{call_banner, echo_server, Export, LocalFederation};

/// `causeway demo` flags.
#[derive(Args)]
pub struct DemoArgs {
    /// Stay up after the walkthrough and print commands to try.
    #[arg(long)]
    pub keep_running: bool,
    /// Working directory for data and logs (default: a new temporary one).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

const SERVICE: &str = "shop/payments";
const NAME: &str = "payments.shop.svc.clusterset.local";
const PORT: u16 = 8080;

/// Runs the demo: a federation on loopback, a call by name, a failover.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let tmp;
    let root = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("causeway-demo-")
                .tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let bin = std::env::current_exe()?;
    let mut fed = LocalFederation::new(bin, root.clone())?;
    let result = walkthrough(&mut fed, args.keep_running).await;
    if let Err(e) = &result {
        println!("\nFAILED: {e:#}");
        for (name, p) in fed.controllers.iter() {
            println!("--- controller-{name} log (tail) ---\n{}", p.log_tail(8));
        }
        for s in fed.sites.values() {
            println!(
                "--- gateway-{} log (tail) ---\n{}",
                s.name,
                s.gateway.log_tail(8)
            );
        }
        if args.dir.is_none() {
            println!("(rerun with --dir DIR to keep all logs)");
        }
    }
    fed.shutdown().await;
    result
}

async fn walkthrough(fed: &mut LocalFederation, keep_running: bool) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let step = |msg: &str| println!("[{:>5.1}s] {msg}", t0.elapsed().as_secs_f64());
    println!("causeway demo: 3 controller nodes, sites east, west and central, all on loopback");
    println!("working directory: {}\n", fed.root.display());

    fed.start_controllers(3)?;
    let leader = fed.wait_for_leader(Duration::from_secs(30)).await?;
    step(&format!(
        "controllers up (openraft over mTLS gRPC); node {leader} is the leader"
    ));

    let (east_addr, east_task) = echo_server(Some("hello from payments in east".into())).await?;
    let (west_addr, _west_task) = echo_server(Some("hello from payments in west".into())).await?;
    step(&format!(
        "sample service {SERVICE} runs in east ({east_addr}) and west ({west_addr})"
    ));

    let export = |a| Export {
        service: SERVICE.into(),
        port: PORT,
        endpoints: vec![a],
    };
    fed.add_site("east", "127.11.0.0/16", &[export(east_addr)])
        .await?;
    fed.add_site("west", "127.12.0.0/16", &[export(west_addr)])
        .await?;
    fed.add_site("central", "127.13.0.0/16", &[]).await?;
    step("sites joined with one-time tokens; each gateway pinned the controller CA and registered its own site CA");

    let vip = fed
        .wait_resolvable("central", NAME, Duration::from_secs(30))
        .await?;
    step(&format!(
        "central's DNS ({}) answers {NAME} -> {vip}",
        fed.sites["central"].dns
    ));

    let target = std::net::SocketAddr::new(vip, PORT);
    let first = retry_call(target, "ping-1", Duration::from_secs(20)).await?;
    step(&format!(
        "call from central through the QUIC mTLS tunnel: \"{first}\""
    ));
    if !first.contains("east") {
        anyhow::bail!(
            "expected east to answer first (healthy sites are tried by name), got {first:?}"
        );
    }

    east_task.abort();
    let _ = east_task.await;
    step("stopped the payments service in east");
    let t_fail = Instant::now();
    let second = retry_call(target, "ping-2", Duration::from_secs(20)).await?;
    step(&format!(
        "called again: \"{second}\" ({} ms, east's gateway could not connect, central's gateway tried west)",
        t_fail.elapsed().as_millis()
    ));
    if !second.contains("west") {
        anyhow::bail!("expected west to answer after east's service stopped, got {second:?}");
    }

    println!("\nresult: name resolved, call tunneled, failover east -> west worked.");
    if keep_running {
        let c = &fed.sites["central"];
        println!("\nThe federation stays up until Ctrl-C. Try:");
        println!("  dig @{} -p {} {NAME}", c.dns.ip(), c.dns.port());
        println!("  echo hi | nc -q1 {} {PORT}        # or: nc -N", vip);
        println!(
            "  causeway ctl --creds {} --controller {} status",
            fed.creds.display(),
            fed.endpoints().join(",")
        );
        println!(
            "  causeway ctl --creds {} --controller {} services",
            fed.creds.display(),
            fed.endpoints().join(",")
        );
        println!(
            "  curl -s http://{}/metrics | grep causeway_",
            c.gateway_admin
        );
        let gateways = fed
            .sites
            .iter()
            .map(|(n, s)| (n.clone(), s.gateway_admin))
            .collect();
        match crate::ui::serve(
            "127.0.0.1:0".parse()?,
            crate::ui::Sources {
                client: fed.admin_client(None)?,
                gateways,
            },
        )
        .await
        {
            Ok((ui, _task)) => println!("  web view of the federation: http://{ui}/"),
            Err(e) => println!("  (the web view did not start: {e:#})"),
        }
        println!("logs: {}/*.log", fed.root.display());
        crate::signal::shutdown_signal().await;
    }
    Ok(())
}

async fn retry_call(
    addr: std::net::SocketAddr,
    msg: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let banner = until(timeout, format_args!("an answer from {addr}"), async || {
        call_banner(addr, msg).await.map_err(|e| format!("{e:#}"))
    })
    .await?;
    Ok(banner)
}
