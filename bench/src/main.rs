//! Benchmark driver: `causeway-bench SUITE [--quick]`. Normally run through
//! `bench/run`, which builds in release mode and installs the peers.

mod controller;
mod dns;
mod etcd;
mod failover;
mod http;
mod l7;
mod pki;
mod report;
mod sys;
mod tunnel;
mod wan;

mod pb {
    pub mod etcd {
        tonic::include_proto!("etcdserverpb");
    }
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("echo-server") {
        // The suites' echo workload, in a process of its own so its sockets
        // do not count against the driver's file limit.
        return tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(tunnel::serve_echo());
    }
    if args.first().map(String::as_str) == Some("wan-link") {
        // The wide-area cases' link between two network namespaces.
        let [_, near, far] = &args[..] else {
            anyhow::bail!("usage: causeway-bench wan-link NEAR_NS FAR_NS");
        };
        return wan::serve_link(near, far);
    }
    let quick = args.iter().any(|a| a == "--quick");
    if args.first().map(String::as_str) == Some("wan-cases") {
        // Run by the tunnel suite inside the near namespace.
        let [_, near, far, dir, ..] = &args[..] else {
            anyhow::bail!("usage: causeway-bench wan-cases NEAR_NS FAR_NS DIR [--quick]");
        };
        return tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(wan::cases(near, far, std::path::Path::new(dir), quick));
    }
    let Some(suite) = args.iter().find(|a| !a.starts_with("--")) else {
        anyhow::bail!(
            "usage: causeway-bench SUITE [--quick]   (suites: controller, tunnel, http, l7, dns, failover)"
        );
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let results = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    rt.block_on(async {
        let mut tmp = tempfile::Builder::new()
            .prefix("causeway-bench-")
            .tempdir()?;
        // CAUSEWAY_BENCH_KEEP=1 keeps configs and logs for a look afterwards.
        if std::env::var_os("CAUSEWAY_BENCH_KEEP").is_some() {
            tmp.disable_cleanup(true);
            println!("keeping {}", tmp.path().display());
        }
        let mut report = report::Report::new(suite, quick);
        match suite.as_str() {
            "controller" => {
                controller::run(&mut report, tmp.path(), &controller::Params::new(quick)).await?
            }
            "tunnel" => tunnel::run(&mut report, tmp.path(), &tunnel::Params::new(quick)).await?,
            "dns" => dns::run(&mut report, tmp.path(), &dns::Params::new(quick)).await?,
            "failover" => {
                failover::run(&mut report, tmp.path(), &failover::Params::new(quick)).await?
            }
            "http" => http::run(&mut report, tmp.path(), &http::Params::new(quick)).await?,
            "l7" => l7::run(&mut report, tmp.path(), &l7::Params::new(quick)).await?,
            other => {
                anyhow::bail!(
                    "unknown suite {other:?} (suites: controller, tunnel, http, l7, dns, failover)"
                )
            }
        }
        report.finish(&results)
    })
}
