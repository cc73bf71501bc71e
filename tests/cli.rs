//! The binary as a user runs it: `cargo run`, `causeway demo`, `causeway install`, `causeway agent`.

mod common;

use common::*;

/// The README's first command is `cargo run --release -- demo`: with more
/// than one binary in the package, cargo needs to be told which one runs.
#[test]
fn cargo_run_picks_the_causeway_binary() {
    let manifest = include_str!("../Cargo.toml");
    let bins = manifest.matches("[[bin]]").count();
    assert!(
        bins < 2 || manifest.contains("default-run = \"causeway\""),
        "Cargo.toml has {bins} binaries and no default-run = \"causeway\": `cargo run -- demo` fails"
    );
}

#[test]
fn the_demo_runs_end_to_end() {
    let out = std::process::Command::new(bin())
        .arg("demo")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("answers payments.shop.svc.clusterset.local -> 127.13."),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"hello from payments in east\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"hello from payments in west\""),
        "{stdout}"
    );
    assert!(stdout.contains("failover east -> west worked"), "{stdout}");
}

/// `causeway install` prints what deploy/install/east.yaml holds (the
/// reviewed rendering) and refuses bad flags with every reason at once.
#[test]
fn install_renders_the_reviewed_manifests_and_refuses_bad_flags() {
    let (code, out) = run_bin(&[
        "install",
        "--site",
        "east",
        "--advertise",
        "203.0.113.10:15443",
        "--controllers",
        "3",
        "--image",
        "causeway:test",
        "--dns-cluster-ip",
        "10.96.0.53",
    ]);
    assert_eq!(code, 0, "{out}");
    let reviewed = include_str!("../deploy/install/east.yaml");
    let body = reviewed
        .split_once("\n---\n")
        .map(|(_, rest)| format!("---\n{rest}"))
        .unwrap();
    assert_eq!(
        out, body,
        "causeway install differs from deploy/install/east.yaml"
    );

    let (code, out) = run_bin(&["install", "--site", "East_1", "--advertise", "nowhere"]);
    assert_eq!(code, 64, "{out}");
    for want in [
        "site: \"East_1\"",
        "controller_endpoints:",
        "advertise: \"nowhere\"",
    ] {
        assert!(out.contains(want), "{want:?} not in {out}");
    }
}

/// The agent refuses to start without a joined site's state, saying where
/// it looked and what to mount.
#[test]
fn the_agent_needs_a_joined_sites_state() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = run_bin(&[
        "agent",
        "--site",
        "east",
        "--state-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("holds no joined site") && out.contains("causeway-site"),
        "{out}"
    );
    let (code, out) = run_bin(&[
        "agent",
        "--site",
        "East",
        "--state-dir",
        "/x",
        "--admin-listen",
        "nope",
    ]);
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("admin_listen: \"nope\"") && out.contains("site: \"East\""),
        "{out}"
    );
}

/// A replica name from the flag (or `CAUSEWAY_REPLICA`, a pod's name on
/// Kubernetes) is checked like the config's, before anything starts.
#[test]
fn a_gateway_replica_name_from_the_environment_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.toml");
    std::fs::write(
        &config,
        format!("state_dir = {:?}\n", dir.path().display().to_string()),
    )
    .unwrap();
    let (code, out) = run_bin(&[
        "gateway",
        "--config",
        config.to_str().unwrap(),
        "--replica",
        "no spaces allowed",
    ]);
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("replica: \"no spaces allowed\" must be"),
        "{out}"
    );
}
