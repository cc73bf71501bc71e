//! `causeway-chaos`: runs a federation on network namespaces under a
//! nemesis and checks what happened. See docs/reliability.md.

use std::path::PathBuf;

use anyhow::Context;
use causeway_chaos::nemesis::Kind;
use causeway_chaos::net::{self, Net};
use causeway_chaos::runner::{self, Mode, Options};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "causeway-chaos",
    about = "Jepsen-style fault testing of a causeway federation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One run: 5 controllers and 3 sites on network namespaces, workloads,
    /// faults, checks. Exits 1 when a check fails.
    Run {
        /// Fault kinds, comma-separated, or `all`.
        #[arg(long, default_value = "all")]
        nemesis: String,
        /// `each`: every kind once, alone; `mixed`: at random, sometimes
        /// two at once, for --seconds.
        #[arg(long, default_value = "mixed")]
        mode: String,
        /// How long the nemesis works (mixed mode).
        #[arg(long, default_value_t = 120)]
        seconds: u64,
        /// How long each fault lasts (each mode).
        #[arg(long, default_value_t = 6)]
        fault_seconds: u64,
        /// Seed of every random choice (default: from the clock; printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Where data, logs, history and the report go (default
        /// target/chaos/<seed>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The causeway binary (default: next to this one).
        #[arg(long)]
        bin: Option<PathBuf>,
    },
    /// Checks a finished run's records again (its history.jsonl and
    /// watches.json), e.g. after a checker change. Needs no root.
    Check {
        /// The run's output directory.
        dir: PathBuf,
    },
    /// Removes what an interrupted run left (namespaces, processes).
    Clean,
}

/// The hosts: five controllers, three sites, the harness's own client.
const HOSTS: [(&str, u8); 9] = [
    ("c1", 1),
    ("c2", 2),
    ("c3", 3),
    ("c4", 4),
    ("c5", 5),
    ("a", 11),
    ("b", 12),
    ("c", 13),
    ("client", 100),
];

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match real_main() {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("causeway-chaos: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn real_main() -> anyhow::Result<bool> {
    let cli = Cli::parse();
    let (nemesis, mode, seconds, fault_seconds, seed, out, bin) = match cli.command {
        Command::Run {
            nemesis,
            mode,
            seconds,
            fault_seconds,
            seed,
            out,
            bin,
        } => (nemesis, mode, seconds, fault_seconds, seed, out, bin),
        Command::Check { dir } => return check_again(&dir),
        Command::Clean => {
            net::preflight()?;
            let _lock = net::RunLock::take()?;
            net::sweep();
            return Ok(true);
        }
    };
    let kinds: Vec<Kind> = if nemesis == "all" {
        Kind::ALL.to_vec()
    } else {
        nemesis
            .split(',')
            .map(|k| Kind::parse(k.trim()))
            .collect::<anyhow::Result<_>>()
            .context("--nemesis")?
    };
    let mode = match mode.as_str() {
        "each" => Mode::Each,
        "mixed" => Mode::Mixed,
        other => anyhow::bail!("--mode: {other:?} is neither `each` nor `mixed`"),
    };
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let here = std::env::current_exe()?;
    let bin = match bin {
        Some(b) => b,
        None => here.with_file_name("causeway"),
    };
    anyhow::ensure!(
        bin.exists(),
        "--bin: no causeway binary at {} (build it: cargo build --bin causeway)",
        bin.display()
    );
    let out = match out {
        Some(o) => o,
        None => std::env::current_dir()?
            .join("target/chaos")
            .join(seed.to_string()),
    };
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("clearing {}", out.display()))?;
    }
    let opts = Options {
        kinds,
        mode,
        seconds,
        fault_secs: fault_seconds,
        seed,
        out: std::path::absolute(&out)?,
        bin: std::path::absolute(&bin)?,
    };
    eprintln!(
        "causeway-chaos: seed {seed} (replay: --seed {seed}), output in {}",
        opts.out.display()
    );

    net::preflight()?;
    let _lock = net::RunLock::take()?;
    let net = Net::build(&HOSTS)?;
    // This thread, and the runtime's threads it starts, live on the client
    // host: every socket the harness opens goes over the bridge.
    causeway_chaos::sys::enter_netns(&net.host("client").netns)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        anyhow::Ok(tokio::select! {
            r = runner::run(&opts, &net) => Some(r),
            _ = tokio::signal::ctrl_c() => None,
            _ = term.recv() => None,
        })
    })?;
    // Whatever happened, the runtime's children die with it and the
    // namespaces go with `net`.
    drop(rt);
    drop(net);
    match result {
        None => {
            eprintln!("causeway-chaos: interrupted; cleaned up");
            Ok(false)
        }
        Some(Err(e)) => Err(e),
        Some(Ok(report)) => {
            let text = runner::summary(&report);
            print!("{text}");
            Ok(report.failures.is_empty())
        }
    }
}

/// `causeway-chaos check DIR`.
fn check_again(dir: &std::path::Path) -> anyhow::Result<bool> {
    use causeway_chaos::{history::Entry, lin, watch};
    let path = dir.join("history.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let history: Vec<Entry> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1))
        })
        .collect::<anyhow::Result<_>>()?;
    let verdicts = lin::check(&history, 20_000_000);
    println!(
        "{} operations; {} registers not linearizable or undecided",
        history.len(),
        verdicts.len()
    );
    for (key, v) in &verdicts {
        let h: Vec<Entry> = history.iter().filter(|e| e.key == *key).copied().collect();
        let (shown, on) = match v {
            lin::Verdict::Unknown(_) => {
                let t = lin::tighten(&h);
                (lin::check_key(&t, 20_000_000), t)
            }
            other => (other.clone(), h),
        };
        println!(
            "  k{key}: {v:?}\n  {}",
            causeway_chaos::runner::excerpt(&on, &shown)
        );
    }
    let wpath = dir.join("watches.json");
    let streams = serde_json::from_str(
        &std::fs::read_to_string(&wpath).with_context(|| format!("reading {}", wpath.display()))?,
    )?;
    let w = watch::check(&streams);
    println!(
        "{} watch events; {} violations",
        w.events,
        w.violations.len()
    );
    for v in w.violations.iter().take(10) {
        println!("  watcher {} event {}: {}", v.watcher, v.index, v.what);
    }
    Ok(verdicts.is_empty() && w.violations.is_empty())
}
