//! The binary as a user runs it: `cargo run` and `causeway demo`.

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
