//! Day-2 operations end to end: backing up the federation and restoring a
//! new controller cluster from the backup.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use causeway_api::pb;
use common::*;

fn timeout_doc(name: &str, ms: u64) -> String {
    format!(
        r#"{{"apiVersion":"causeway.dev/v1alpha1","kind":"TimeoutPolicy","metadata":{{"name":"{name}","namespace":"load"}},"spec":{{"service":"load","requestMs":{ms}}}}}"#
    )
}

async fn list_policies(fed: &LocalFederation) -> Vec<String> {
    let admin = fed.admin_client(None).unwrap();
    let r = admin
        .call(true, |mut f| async move {
            f.list_policies(pb::ListPoliciesRequest {
                kind: String::new(),
                linearizable: true,
            })
            .await
        })
        .await
        .unwrap();
    r.policies.into_iter().map(|p| p.name).collect()
}

/// Waits until the process behind admin port `admin` has refused a config
/// reload and says its file on disk is invalid.
async fn wait_reload_refused(admin: std::net::SocketAddr) {
    eventually(
        std::time::Duration::from_secs(20),
        format_args!("{admin} to refuse the invalid config file"),
        async || {
            let m = http_get(admin, "/metrics").await;
            metric(&m, "causeway_config_reloads_total{result=\"error\"}") >= 1.0
                && metric(&m, "causeway_config_reload_failed") == 1.0
        },
    )
    .await;
}

/// Every controller's disk is lost; the federation comes back from a backup
/// taken under write load: restored into three fresh data directories, the
/// new cluster holds every write acknowledged before the backup began, the
/// sites and their exports, and the old cluster's gateways and DNS servers
/// reconnect by themselves (a change made after the restore reaches them).
/// A damaged or cut backup is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federation_that_lost_every_controller_disk_comes_back_from_a_backup() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (vip, _echo) = echo_sites_ready(&mut fed).await;

    tracing::info!("phase: a backup under write load");
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<u64>::new()));
    let writer = tokio::spawn({
        let admin = fed.admin_client(None).unwrap();
        let (stop, acked) = (stop.clone(), acked.clone());
        async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let doc = timeout_doc(&format!("p{n}"), n + 1);
                let r = apply_policy(&admin, doc).await;
                if r.is_ok() {
                    acked.lock().unwrap().push(n);
                }
                n += 1;
            }
        }
    });
    eventually(
        std::time::Duration::from_secs(30),
        "20 writes acknowledged",
        async || acked.lock().unwrap().len() >= 20,
    )
    .await;
    let before: Vec<u64> = acked.lock().unwrap().clone();
    let backup = tmp.path().join("federation.snap");
    let out = fed
        .ctl(&["snapshot", "save", &backup.display().to_string()])
        .await
        .unwrap();
    assert!(out.contains("saved revision"), "{out}");
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let sites_before = fed.admin_client(None).unwrap().catalog(true).await.unwrap();

    tracing::info!("phase: every controller and its disk lost");
    for id in [1, 2, 3] {
        fed.controller(id).kill().await;
        std::fs::remove_dir_all(tmp.path().join(format!("controller-{id}"))).unwrap();
    }
    let peers: Vec<String> = fed
        .controller_addrs
        .iter()
        .flat_map(|(id, addr)| ["--peer".to_string(), format!("{id}={addr}")])
        .collect();
    let restore = |file: &std::path::Path, dir: &std::path::Path, id: u64| {
        let mut args = vec![
            "controller".to_string(),
            "restore".into(),
            "--snapshot".into(),
            file.display().to_string(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--id".into(),
            id.to_string(),
        ];
        args.extend(peers.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_bin(&args)
    };

    tracing::info!("phase: damaged and cut backups are refused");
    let good = std::fs::read(&backup).unwrap();
    let mut flipped = good.clone();
    let at = flipped.len() - 10;
    flipped[at] ^= 0x01;
    let bad = tmp.path().join("flipped.snap");
    std::fs::write(&bad, &flipped).unwrap();
    let scratch = tmp.path().join("scratch");
    let (code, out) = restore(&bad, &scratch, 1);
    assert!(code != 0 && out.contains("damaged"), "{code}: {out}");
    let cut = tmp.path().join("cut.snap");
    std::fs::write(&cut, &good[..good.len() / 2]).unwrap();
    let (code, out) = restore(&cut, &scratch, 1);
    assert!(code != 0 && out.contains("truncated"), "{code}: {out}");

    tracing::info!("phase: restore three fresh nodes and start them");
    for id in [1, 2, 3] {
        let dir = tmp.path().join(format!("controller-{id}"));
        let (code, out) = restore(&backup, &dir, id);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("restored revision"), "{out}");
        // Once restored, a second restore into it is refused.
        if id == 1 {
            let (code, out) = restore(&backup, &dir, id);
            assert!(code != 0 && out.contains("not empty"), "{out}");
        }
    }
    for id in [1, 2, 3] {
        fed.restart(id).unwrap();
    }
    fed.wait_for_leader(std::time::Duration::from_secs(30))
        .await
        .unwrap();

    tracing::info!("phase: the catalog is whole");
    let names = list_policies(&fed).await;
    for n in &before {
        assert!(
            names.contains(&format!("p{n}")),
            "write p{n}, acknowledged before the backup, is missing"
        );
    }
    let now = fed.admin_client(None).unwrap().catalog(true).await.unwrap();
    let site_names = |c: &pb::CatalogSnapshot| -> Vec<String> {
        c.sites.iter().map(|s| s.name.clone()).collect()
    };
    assert_eq!(site_names(&now), site_names(&sites_before));
    assert_eq!(now.exports, sites_before.exports);
    assert_ne!(now.epoch, 0, "a restored cluster has a new epoch");

    tracing::info!("phase: the old gateways and DNS servers follow the new cluster");
    let (echo2, _echo2) = causeway::local::echo_server(None).await.unwrap();
    let export = causeway::local::Export {
        service: "shop/after".into(),
        port: 7000,
        endpoints: vec![echo2],
    };
    fed.add_site("north", &vip_range(), &[export])
        .await
        .unwrap();
    let after = fed
        .wait_resolvable(
            "west",
            "after.shop.svc.clusterset.local",
            std::time::Duration::from_secs(30),
        )
        .await
        .unwrap();
    wait_tunnel(std::net::SocketAddr::new(after, 7000)).await;
    // And what was there still works.
    assert_eq!(
        echo_roundtrip(std::net::SocketAddr::new(vip, 7000), b"still here").await,
        b"still here"
    );
    fed.shutdown().await;
}

/// Quorum loss: of five controllers three are destroyed for good. A
/// survivor is forced into a new one-node cluster from its own data, grown
/// back to three, and nothing acknowledged before the loss is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_majority_lost_for_good_is_recovered_from_a_survivor() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let (mut fed, _) = controllers(&tmp, 5, &["--snapshot-every", "30"]).await;
    let admin = fed.admin_client(None).unwrap();
    let mut acked = Vec::new();
    for n in 0..80u64 {
        let doc = timeout_doc(&format!("q{n}"), n + 1);
        apply_policy(&admin, doc).await.unwrap();
        acked.push(n);
    }
    // Everyone has everything before the loss (what is acknowledged is on
    // a majority; the survivors hold it once they have caught up).
    let leader = fed
        .wait_for_leader(std::time::Duration::from_secs(10))
        .await
        .unwrap();
    let target = fed.status(leader).await.unwrap().last_log_index;
    eventually(
        std::time::Duration::from_secs(20),
        "every node to apply the last write",
        async || {
            for id in 1..=5 {
                match fed.status(id).await {
                    Ok(s) if s.applied_index >= target => {}
                    _ => return false,
                }
            }
            true
        },
    )
    .await;

    tracing::info!("phase: nodes 3, 4, 5 destroyed; 1 and 2 stopped");
    for id in 1..=5 {
        fed.controller(id).kill().await;
    }
    for id in 3..=5 {
        std::fs::remove_dir_all(tmp.path().join(format!("controller-{id}"))).unwrap();
    }
    let addr1 = fed.controller_addrs[&1].clone();
    let dir1 = tmp.path().join("controller-1");
    let (code, out) = run_bin(&[
        "controller",
        "recover",
        "--data-dir",
        &dir1.display().to_string(),
        "--id",
        "1",
        "--advertise",
        &addr1,
    ]);
    assert!(code != 0 && out.contains("--force-new-cluster"), "{out}");
    let (code, out) = run_bin(&[
        "controller",
        "recover",
        "--force-new-cluster",
        "--data-dir",
        &dir1.display().to_string(),
        "--id",
        "1",
        "--advertise",
        &addr1,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("one-node cluster"), "{out}");

    tracing::info!("phase: node 1 alone, then grown back to three");
    for id in 2..=5 {
        fed.controllers.remove(&id);
        fed.controller_addrs.remove(&id);
    }
    fed.spawn_controller(1, &[1], false).unwrap();
    fed.wait_for_leader(std::time::Duration::from_secs(30))
        .await
        .unwrap();
    for id in [2u64, 3] {
        let dir = tmp.path().join(format!("controller-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        fed.reserve_controller(id).unwrap();
        fed.spawn_controller(id, &[id], true).unwrap();
        let addr = fed.controller_addrs[&id].clone();
        let out = fed
            .ctl(&["controller", "add", &id.to_string(), &addr])
            .await
            .unwrap();
        assert!(out.contains(&format!("{id}")), "{out}");
    }
    let voters = eventually(
        std::time::Duration::from_secs(30),
        "three voters",
        async || {
            let s = fed.status(1).await.ok()?;
            let v: Vec<u64> = s.nodes.iter().filter(|n| n.voter).map(|n| n.id).collect();
            (v.len() == 3).then_some(v)
        },
    )
    .await;
    assert_eq!(voters, vec![1, 2, 3]);

    tracing::info!("phase: nothing acknowledged is missing, and writes go on");
    let names = list_policies(&fed).await;
    for n in &acked {
        assert!(
            names.contains(&format!("q{n}")),
            "q{n} was acknowledged and is gone"
        );
    }
    apply_policy(&fed.admin_client(None).unwrap(), timeout_doc("after", 1))
        .await
        .unwrap();
    // Every member holds it (node 3 caught up by snapshot or log).
    eventually(
        std::time::Duration::from_secs(20),
        "node 3 to apply the write made after the recovery",
        async || {
            let c = fed.admin_client(Some(3)).ok()?;
            let mut f = c.federation().await.ok()?;
            let r = f
                .list_policies(pb::ListPoliciesRequest {
                    kind: String::new(),
                    linearizable: false,
                })
                .await
                .ok()?;
            r.into_inner()
                .policies
                .iter()
                .any(|p| p.name == "after")
                .then_some(())
        },
    )
    .await;
    fed.shutdown().await;
}

/// `causeway check` on a healthy federation passes every check; then each
/// thing broken in turn fails its check, with a fix, and the exit code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_says_what_is_broken_and_how_to_fix_it() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let (mut fed, _) = controllers(&tmp, 3, &["--site-lease-ms", "3000"]).await;
    let (vip, _echo) = echo_sites_ready(&mut fed).await;
    // Traffic, so west has a tunnel to east to report.
    echo_roundtrip(std::net::SocketAddr::new(vip, 7000), b"x").await;
    let check = |fed: &LocalFederation, extra: &[&str]| {
        let mut args: Vec<String> = vec![
            "check".into(),
            "--creds".into(),
            fed.creds.display().to_string(),
            "--controller".into(),
            fed.endpoints().join(","),
            "--gateway".into(),
            format!("east={}", fed.sites["east"].gateway_admin),
            "--gateway".into(),
            format!("west={}", fed.sites["west"].gateway_admin),
            "--dns".into(),
            format!("west={}", fed.sites["west"].dns),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_bin(&args)
    };

    tracing::info!("phase: healthy");
    // A gateway reports a tunnel's round-trip time once it has sampled it.
    let out = eventually(
        std::time::Duration::from_secs(30),
        "check to pass and report west's tunnel to east",
        async || {
            let (code, out) = check(&fed, &[]);
            (code == 0 && out.contains("✓ tunnels from west: up: east")).then_some(out)
        },
    )
    .await;
    for line in [
        "✓ controllers reachable: 3 of 3",
        "✓ leader:",
        "✓ quorum: 3 voters",
        "✓ clock skew:",
        "✓ controller CA:",
        "✓ node certificates:",
        "✓ site leases: all 2 sites heartbeat",
        "✓ tunnels from west: up: east",
        "✓ VIP range of east:",
        "✓ DNS of west: echo.shop.svc.clusterset.local ->",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    // This machine's disk may be nearly full: fine or a warning, never a failure.
    assert!(
        out.contains("✓ data disks:") || out.contains("! data disks:"),
        "{out}"
    );
    let (code, json) = check(&fed, &["--output", "json"]);
    assert_eq!(code, 0, "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["ok"], true);
    assert!(v["checks"].as_array().unwrap().len() >= 12);

    // On a gateway host, with the site's own credential.
    let state_dir = fed.sites["east"].state_dir.display().to_string();
    let (code, out) = run_bin(&["check", "--state-dir", &state_dir]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("✓ controllers reachable: 3 of 3"), "{out}");
    assert!(
        out.contains("✓ site leases: all 2 sites heartbeat"),
        "{out}"
    );

    tracing::info!("phase: a policy naming a site that is not a member");
    let doc = r#"{"apiVersion":"causeway.dev/v1alpha1","kind":"FailoverPolicy","metadata":{"name":"f","namespace":"shop"},"spec":{"service":"echo","mode":"ordered","sites":["nowhere","east"]}}"#;
    apply_policy(&fed.admin_client(None).unwrap(), doc.to_string())
        .await
        .unwrap();
    let (code, out) = check(&fed, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("✗ policies: FailoverPolicy shop/f: names site \"nowhere\""),
        "{out}"
    );
    assert!(out.contains("fix: fix the policy"), "{out}");

    tracing::info!("phase: west's DNS server down");
    fed.sites.get_mut("west").unwrap().dns_proc.kill().await;
    let (_, out) = check(&fed, &[]);
    assert!(out.contains("✗ DNS of west:"), "{out}");
    assert!(out.contains("start west's DNS server"), "{out}");

    tracing::info!("phase: east's gateway down: its lease lapses");
    fed.sites.get_mut("east").unwrap().gateway.kill().await;
    let out = eventually(
        std::time::Duration::from_secs(30),
        "check to see east's lease lapse",
        async || {
            let (_, out) = check(&fed, &[]);
            out.contains("✗ site leases: lapsed (out of routing and DNS): east")
                .then_some(out)
        },
    )
    .await;
    assert!(out.contains("✗ tunnels from east:"), "{out}");
    assert!(out.contains("start east's gateway"), "{out}");

    tracing::info!("phase: a controller down");
    fed.controller(3).kill().await;
    let (code, out) = check(&fed, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("✗ controllers reachable: 2 of 3 answer"),
        "{out}"
    );
    assert!(
        out.contains("fix: start the controllers that do not answer"),
        "{out}"
    );
    fed.shutdown().await;
}

/// A gateway picks up its edited config without a restart: a new export
/// when the file changes, allow rules on SIGHUP; an invalid file is refused
/// and the running config stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_reloads_its_config_without_a_restart() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (vip, _echo) = echo_sites_ready(&mut fed).await;
    let echo = std::net::SocketAddr::new(vip, 7000);
    let gateway_pid = fed.sites["east"].gateway.pid().unwrap();
    let admin = fed.sites["east"].gateway_admin;
    let config = fed.sites["east"].config.clone();

    tracing::info!("phase: a new export, by editing the file");
    let (echo2, _echo2) = causeway::local::echo_server(Some("second".into()))
        .await
        .unwrap();
    fed.edit_gateway_config("east", |c| {
        c.exports.push(causeway_gateway::config::ExportConfig::tcp(
            "shop/second",
            7000,
            &[echo2],
        ))
    })
    .unwrap();
    let second = fed
        .wait_resolvable(
            "west",
            "second.shop.svc.clusterset.local",
            std::time::Duration::from_secs(30),
        )
        .await
        .unwrap();
    let banner = eventually(
        std::time::Duration::from_secs(20),
        "a call to the new export",
        async || causeway::local::call_banner(std::net::SocketAddr::new(second, 7000), "hi").await,
    )
    .await;
    assert_eq!(banner, "second");
    assert_eq!(
        fed.sites["east"].gateway.pid(),
        Some(gateway_pid),
        "no restart"
    );

    tracing::info!("phase: an invalid file is refused, the running config stays");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{good}\nno_such_field = 1\n")).unwrap();
    wait_reload_refused(admin).await;
    assert_eq!(echo_roundtrip(echo, b"still").await, b"still");

    tracing::info!("phase: allow rules, on SIGHUP alone");
    std::fs::write(&config, &good).unwrap();
    eventually(
        std::time::Duration::from_secs(20),
        "the good config to be back",
        async || {
            metric(
                &http_get(admin, "/metrics").await,
                "causeway_config_reload_failed",
            ) == 0.0
        },
    )
    .await;
    // Deny everyone, in a file of the same size and modification time, so
    // only the signal can make the gateway read it.
    let reference = tmp.path().join("reference.toml");
    let denied = {
        let mut t = good.replace(
            "authorization = \"allow_members\"",
            "authorization = \"deny\"",
        );
        assert_ne!(t, good, "the config names its authorization");
        while t.len() < good.len() {
            t.push('#');
        }
        t.truncate(good.len());
        t
    };
    assert!(std::process::Command::new("cp")
        .args([
            "-p",
            &config.display().to_string(),
            &reference.display().to_string()
        ])
        .status()
        .unwrap()
        .success());
    std::fs::write(&config, &denied).unwrap();
    assert!(std::process::Command::new("touch")
        .args([
            "-r",
            &reference.display().to_string(),
            &config.display().to_string()
        ])
        .status()
        .unwrap()
        .success());
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &gateway_pid.to_string()])
        .status()
        .unwrap()
        .success());
    eventually(
        std::time::Duration::from_secs(20),
        "west's calls to be refused by east's new rules",
        async || {
            try_echo_roundtrip(echo, b"x")
                .await
                .map_or(true, |r| r.is_empty())
        },
    )
    .await;
    std::fs::write(&config, &good).unwrap();
    eventually(
        std::time::Duration::from_secs(20),
        "calls to be allowed again",
        async || {
            try_echo_roundtrip(echo, b"y")
                .await
                .is_ok_and(|r| r == b"y")
        },
    )
    .await;
    assert_eq!(
        fed.sites["east"].gateway.pid(),
        Some(gateway_pid),
        "no restart"
    );
    fed.shutdown().await;
}

/// A DNS server started from a config file follows it: a new TTL applies
/// without a restart; an invalid file is refused and the server keeps
/// answering with the running config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_server_reloads_its_config_file() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (_vip, _echo) = echo_sites_ready(&mut fed).await;
    let west = &fed.sites["west"];
    let listen =
        std::net::SocketAddr::from(([127, 0, 0, 1], causeway::local::free_port().unwrap()));
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], causeway::local::free_port().unwrap()));
    let file = tmp.path().join("dns-west.toml");
    let write = |ttl: &str| {
        std::fs::write(
            &file,
            format!(
                "state_dir = {:?}\nlisten = \"{listen}\"\nvip_range = \"{}\"\nadmin_listen = \"{admin}\"\nttl = {ttl}\n",
                west.state_dir.display().to_string(),
                west.vip_range
            ),
        )
        .unwrap()
    };
    write("5");
    let mut dns = tokio::process::Command::new(bin())
        .args(["dns", "--config", &file.display().to_string()])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let answer = |ttl: u32| {
        move |out: &str| {
            out.lines().any(|l| {
                l.starts_with("echo.shop.svc.clusterset.local.")
                    && l.split_whitespace().nth(1) == Some(&ttl.to_string())
            })
        }
    };
    let query = || {
        try_dig(
            listen,
            &["echo.shop.svc.clusterset.local", "A", "+noall", "+answer"],
        )
    };
    eventually(
        std::time::Duration::from_secs(20),
        "the DNS server to answer with TTL 5",
        async || query().is_ok_and(|o| answer(5)(&o)),
    )
    .await;

    write("77");
    eventually(
        std::time::Duration::from_secs(20),
        "answers with the reloaded TTL 77",
        async || query().is_ok_and(|o| answer(77)(&o)),
    )
    .await;

    write("\"seventy\"");
    wait_reload_refused(admin).await;
    let out = query().unwrap();
    assert!(answer(77)(&out), "the running config stays: {out}");
    assert!(dns.try_wait().unwrap().is_none(), "no restart, no exit");
    dns.kill().await.unwrap();
    fed.shutdown().await;
}
