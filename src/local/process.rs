//! Child processes of the local federation: start, stop, restart, read
//! their logs; and free loopback ports for them to bind.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

/// One child process and how to start it again.
pub struct Proc {
    /// Its name, also its log file's stem.
    pub name: String,
    /// Its arguments, without the binary.
    pub args: Vec<String>,
    /// Environment for the child on top of ours (secrets go here, not in
    /// the arguments other users can read from the process list).
    pub env: Vec<(String, String)>,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
    /// A command it runs under, e.g. `ip netns exec NS` (empty: none).
    pub wrap: Vec<String>,
    child: Option<Child>,
}

impl Proc {
    pub(super) fn spawn(
        bin: &Path,
        root: &Path,
        name: &str,
        args: Vec<String>,
    ) -> anyhow::Result<Self> {
        Self::spawn_with_env(bin, root, name, args, Vec::new())
    }

    pub(super) fn spawn_with_env(
        bin: &Path,
        root: &Path,
        name: &str,
        args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<Self> {
        Self::spawn_wrapped(bin, root, name, args, env, Vec::new())
    }

    /// Like [`Self::spawn_with_env`], run under `wrap` (see [`Proc::wrap`]).
    pub(super) fn spawn_wrapped(
        bin: &Path,
        root: &Path,
        name: &str,
        args: Vec<String>,
        env: Vec<(String, String)>,
        wrap: Vec<String>,
    ) -> anyhow::Result<Self> {
        let mut p = Self {
            name: name.to_string(),
            args,
            env,
            log: root.join(format!("{name}.log")),
            wrap,
            child: None,
        };
        p.start(bin)?;
        Ok(p)
    }

    /// Starts it (again), appending to its log.
    pub fn start(&mut self, bin: &Path) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = match self.wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        // CAUSEWAY_CHILD_THREADS sets the runtime threads of every child
        // (tokio's TOKIO_WORKER_THREADS), for experiments.
        if let Ok(n) = std::env::var("CAUSEWAY_CHILD_THREADS") {
            cmd.env("TOKIO_WORKER_THREADS", n);
        }
        let child = cmd
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env(
                "RUST_LOG",
                std::env::var("CAUSEWAY_CHILD_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, no goodbye.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// SIGKILL, and wait (blocking, up to 5 s) until it is gone.
    pub(super) fn kill_blocking(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = super::wait::until_blocking(
                Duration::from_secs(5),
                format_args!("{} to exit", self.name),
                || !matches!(c.try_wait(), Ok(None)),
            );
        }
    }

    /// SIGTERM: ask for a graceful stop.
    pub fn terminate(&self) {
        if let Some(pid) = self.pid() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }

    /// Whether it was started and not killed since (it may have exited on
    /// its own: see [`Self::exited`]).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Its process id, while started.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Whether the process exited on its own (with its status).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// A loopback port free for both TCP and UDP right now.
pub fn free_port() -> anyhow::Result<u16> {
    // Below the kernel's ephemeral range when we can: a port handed out by
    // bind(0) is from that range, and any outgoing connection of a test
    // running alongside may take it before our process binds it.
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if ephemeral_start > 20_000 {
        for _ in 0..200 {
            let port = rand::random_range(20_000..ephemeral_start);
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
                && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
            {
                return Ok(port);
            }
        }
    }
    for _ in 0..50 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port found")
}
