//! `causeway`: parse, build, run, drain. Everything else lives in the crates.

use causeway::cli::{self, Cli, Command, ConfigErrors, EXIT_CONFIG};
use clap::Parser;

fn main() {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(default_filter(&cli.command))
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::env::var_os("NO_COLOR").is_none())
        .init();
    let rt = runtime(&cli.command);
    let result = rt.block_on(async move {
        match cli.command {
            Command::Demo(a) => causeway::demo::run(a).await,
            Command::Controller(a) => cli::run_controller(a).await,
            Command::Gateway(a) => cli::run_gateway(a).await,
            Command::Dns(a) => cli::run_dns(a).await,
            Command::Ctl(a) => causeway::ctl::run(a).await,
            Command::Check(a) => match causeway::check::run(a).await {
                Ok(true) => Ok(()),
                Ok(false) => std::process::exit(1),
                Err(e) => Err(e),
            },
            Command::Install(a) => causeway::kubernetes::run_install(a),
            Command::Agent(a) => causeway::kubernetes::run_agent(a).await,
            Command::Join(a) => causeway::kubernetes::run_join(a).await,
            Command::Ui(a) => causeway::ui::run(a).await,
            Command::Ca(a) => match a.command {
                cli::CaCommand::Init { dir, admin } => {
                    causeway::creds::ca_init(&dir, &admin)?;
                    println!(
                        "wrote ca.pem, ca-key.pem, admin.pem, admin-key.pem to {}",
                        dir.display()
                    );
                    Ok(())
                }
                cli::CaCommand::RotateSite { state_dir, step } => {
                    println!("{}", causeway::rotate::run(&state_dir, step).await?);
                    Ok(())
                }
            },
        }
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        let code = if e.downcast_ref::<ConfigErrors>().is_some() {
            EXIT_CONFIG
        } else {
            1
        };
        std::process::exit(code);
    }
}

/// The tokio runtime: one worker per CPU by default (or
/// `TOKIO_WORKER_THREADS`). A gateway config's `worker_threads` overrides
/// it; a gateway with one thread, asked for or because it may use only one
/// CPU (a pod limited to one core), gets a current-thread runtime, as
/// linkerd2-proxy does for one core.
fn runtime(cmd: &Command) -> tokio::runtime::Runtime {
    let threads = match cmd {
        Command::Gateway(a) => match cli::gateway_worker_threads(a) {
            0 if std::env::var_os("TOKIO_WORKER_THREADS").is_none() => {
                std::thread::available_parallelism().map_or(0, |n| usize::from(n).min(1024))
            }
            n => n,
        },
        _ => 0,
    };
    let mut b = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if threads > 1 {
        b.worker_threads(threads);
    }
    b.enable_all().build().expect("building the tokio runtime")
}

fn default_filter(cmd: &Command) -> &'static str {
    match cmd {
        // The demo prints its own report; children log to files.
        Command::Demo(_)
        | Command::Ctl(_)
        | Command::Ca(_)
        | Command::Install(_)
        | Command::Join(_)
        | Command::Ui(_) => "warn",
        _ => "info,openraft=warn,quinn=warn,hickory_server=warn",
    }
}
