//! The federation controller end to end: Raft leadership and membership,
//! durability (corruption, full disk, snapshots), linearizable reads and watches.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_relabels_a_site_with_ctl() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let (mut fed, _) = controllers(&tmp, 1, &[]).await;
    let _site = join_in_process(&fed, "alpha").await;

    tracing::info!("phase: the whole set is replaced, and cluster list shows it");
    let out = fed
        .ctl(&[
            "cluster",
            "set-labels",
            "alpha",
            "--label",
            "zone=eu-1a",
            "--label",
            "region=eu",
        ])
        .await
        .unwrap();
    assert!(out.contains("2 label(s)"), "{out}");
    let list = fed.ctl(&["cluster", "list"]).await.unwrap();
    assert!(list.contains("region=eu,zone=eu-1a"), "{list}");
    assert!(
        !list.contains("env=demo"),
        "the token's label is replaced: {list}"
    );

    tracing::info!("phase: bad input is refused, naming the label");
    let e = fed
        .ctl(&["cluster", "set-labels", "alpha", "--label", "Bad Key=x"])
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("labels") && e.contains("Bad Key"), "{e}");
    let e = fed
        .ctl(&["cluster", "set-labels", "nobody", "--label", "a=b"])
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a member"), "{e}");

    tracing::info!("phase: no --label clears them");
    fed.ctl(&["cluster", "set-labels", "alpha"]).await.unwrap();
    let list = fed.ctl(&["cluster", "list"]).await.unwrap();
    assert!(!list.contains("region=eu"), "{list}");
    fed.shutdown().await;
}

/// `rounds` publishes by site alpha alternating between 1000 exports and
/// one (each a delta of ~1000 changes), each within
/// `limit`; the last revision. A failure panics with the controllers' state.
async fn publish_large_deltas(
    fed: &LocalFederation,
    client: &causeway_api::client::ControllerClient,
    rounds: usize,
    limit: Duration,
) -> u64 {
    let mut revision = 0;
    for round in 0..rounds {
        let n = if round % 2 == 0 { 1000 } else { 1 };
        revision = match publish_within(client, "alpha", n, limit).await {
            Ok(r) => r,
            Err(e) => panic!("write {round}: {e}\n{}", fed.diagnose(60).await),
        };
    }
    revision
}

async fn catalog_services(fed: &LocalFederation, node: u64) -> Vec<String> {
    let mut c = fed
        .admin_client(Some(node))
        .unwrap()
        .federation()
        .await
        .unwrap();
    let cat = c
        .catalog(causeway_api::pb::CatalogRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut v: Vec<String> = cat
        .exports
        .iter()
        .flat_map(|e| e.exports.iter().map(|x| x.service.clone()))
        .collect();
    v.sort();
    v
}

/// Waits (up to 10 s) until node `id` lists `n` exported services: followers
/// apply asynchronously.
async fn wait_catalog_len(fed: &LocalFederation, id: u64, n: usize) {
    eventually(
        Duration::from_secs(10),
        format_args!("node {id} to hold {n} exports"),
        async || equals(catalog_services(fed, id).await.len(), &n),
    )
    .await;
}

/// The catalog as node `id` serves it to an admin.
async fn read(
    fed: &LocalFederation,
    id: u64,
    linearizable: bool,
) -> Result<tonic::Response<causeway_api::pb::CatalogSnapshot>, tonic::Status> {
    let c = fed.admin_client(Some(id)).unwrap();
    let mut f = c.federation().await.unwrap();
    f.catalog(causeway_api::pb::CatalogRequest { linearizable })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_reads_come_from_a_confirmed_leader() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let (mut fed, leader) = controllers(&tmp, 3, &[]).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let site = join_in_process(&fed, "alpha").await;
    publish(&site.controller_client(), "alpha", 4)
        .await
        .unwrap();

    tracing::info!("phase: the leader serves it, with every acknowledged write");
    let cat = read(&fed, leader, true).await.unwrap().into_inner();
    assert_eq!(
        cat.exports.iter().map(|e| e.exports.len()).sum::<usize>(),
        4
    );

    tracing::info!("phase: a follower refuses and, once it has heard from the leader, names it");
    // A follower that has not yet had the new term's first append says
    // "none elected yet"; it must still refuse, and name the leader later.
    eventually(
        Duration::from_secs(10),
        format_args!("follower {follower} to refuse and name leader {leader}"),
        async || {
            let e = read(&fed, follower, true).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
            if e.message().contains(&format!("leader: node {leader} at")) {
                Ok(())
            } else {
                Err(e.message().to_string())
            }
        },
    )
    .await;
    assert!(read(&fed, follower, false).await.is_ok());
    // Policies too.
    let policies = |id: u64| {
        let c = fed.admin_client(Some(id)).unwrap();
        async move {
            let mut f = c.federation().await.unwrap();
            f.list_policies(causeway_api::pb::ListPoliciesRequest {
                kind: String::new(),
                linearizable: true,
            })
            .await
        }
    };
    assert!(policies(leader).await.is_ok());
    let e = policies(follower).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");

    tracing::info!("phase: ctl --linearizable finds the leader from any endpoint list");
    let order = [
        fed.controller_addrs[&follower].clone(),
        fed.controller_addrs[&leader].clone(),
    ];
    let ctl = |args: &'static [&'static str]| {
        tokio::process::Command::new(bin())
            .args(["ctl", "--creds"])
            .arg(&fed.creds)
            .args(["--controller", &order.join(","), "--linearizable"])
            .args(args)
            .output()
    };
    let out = ctl(&["--output", "json", "services"]).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("bench/svc-").count(), 4, "{text}");
    let out = ctl(&["policy", "list"]).await.unwrap();
    assert!(
        out.status.success(),
        "policy list: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    tracing::info!("phase: without a quorum it fails clearly; a local read still answers");
    for id in (1..=3).filter(|id| *id != leader) {
        fed.controller(id).kill().await;
    }
    let e = read(&fed, leader, true).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("majority"), "{}", e.message());
    let cat = read(&fed, leader, false).await.unwrap().into_inner();
    assert_eq!(
        cat.exports.iter().map(|e| e.exports.len()).sum::<usize>(),
        4
    );
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_acknowledged_export() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let site = join_in_process(&fed, "alpha").await;
    let client = site.controller_client();

    tracing::info!("phase: acknowledged writes before the kill");
    let mut acked = 0;
    for n in 1..=20 {
        publish(&client, "alpha", n).await.unwrap();
        acked = n;
    }

    tracing::info!("phase: a write sent to a follower is forwarded to the leader");
    let old = fed.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    let follower = *fed.controller_addrs.keys().find(|id| **id != old).unwrap();
    let via_follower = causeway_api::client::ControllerClient::new(
        vec![fed.controller_addrs[&follower].clone()],
        &site.controller_ca_pem,
        Some(&site.api),
    );
    publish(&via_follower, "alpha", 20).await.unwrap();

    tracing::info!("phase: SIGKILL the leader");
    let old_pid = fed.controller(old).pid().unwrap();
    fed.controller(old).kill().await;
    assert!(
        !std::path::Path::new(&format!("/proc/{old_pid}")).exists(),
        "the leader process is gone"
    );

    tracing::info!("phase: writes continue on a new leader");
    let killed_at = Instant::now();
    let mut first_ok = None;
    for n in 21..=40 {
        eventually(
            Duration::from_secs(20),
            format_args!("write {n} to be accepted after the leader died"),
            async || publish(&client, "alpha", n).await,
        )
        .await;
        first_ok.get_or_insert(killed_at.elapsed());
        acked = n;
    }
    tracing::info!(after = ?first_ok, "first write after the kill was acknowledged");
    let survivors: Vec<u64> = fed
        .controller_addrs
        .keys()
        .copied()
        .filter(|id| *id != old)
        .collect();
    let status = fed.status(survivors[0]).await.unwrap();
    assert_ne!(status.leader_id, old, "a new leader must have taken over");
    assert_ne!(status.leader_id, 0);

    tracing::info!("phase: every acknowledged export is there");
    let want: Vec<String> = {
        let mut v: Vec<String> = (0..acked).map(|i| format!("bench/svc-{i}")).collect();
        v.sort();
        v
    };
    for id in &survivors {
        // Followers apply asynchronously: wait for this node to catch up.
        eventually(
            Duration::from_secs(10),
            format_args!("node {id} to hold all {} exports", want.len()),
            async || equals(catalog_services(&fed, *id).await, &want),
        )
        .await;
    }

    tracing::info!("phase: the killed node restarts from its data dir and catches up");
    let leader_rev = fed.status(status.leader_id).await.unwrap().revision;
    fed.restart(old).unwrap();
    eventually(
        Duration::from_secs(30),
        format_args!("restarted node {old} to catch up to revision {leader_rev}"),
        async || {
            let s = tokio::time::timeout(Duration::from_secs(2), fed.status(old))
                .await
                .ok()?
                .ok()?;
            (s.revision >= leader_rev && s.leader_id != 0).then_some(())
        },
    )
    .await;
    assert_eq!(catalog_services(&fed, old).await, want);
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_nothing_is_lost() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let fed = federation(&tmp).await;
    let token = fed.create_token("alpha").await.unwrap();
    let dir = fed.root.join("alpha");
    let ca = causeway_gateway::site::SiteState::site_ca(&dir, None).unwrap();
    let alpha =
        causeway_gateway::site::SiteState::join(&dir, &token, &ca, vec!["127.0.0.1:9".into()])
            .await
            .unwrap();
    let client = alpha.controller_client();
    publish(&client, "alpha", 3).await.unwrap();

    tracing::info!("phase: malformed join token");
    let mut anon = causeway_api::client::ControllerClient::new(
        fed.endpoints(),
        &alpha.controller_ca_pem,
        None,
    )
    .federation()
    .await
    .unwrap();
    let err = anon
        .join(causeway_api::pb::JoinRequest {
            token: "cwj1.bm90IGpzb24".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().starts_with("token:"), "{}", err.message());
    let (code, stderr) = run_bin(&[
        "gateway",
        "--config",
        &write_config(&tmp, "ok.toml", "state_dir = \"/nonexistent/x\"\n"),
        "--join-token",
        "hello",
    ]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("join token must start with 'cwj1.'"),
        "{stderr}"
    );
    let cut = &token[..token.len() / 2];
    let (code, stderr) = run_bin(&[
        "gateway",
        "--config",
        &write_config(
            &tmp,
            "ok2.toml",
            &format!(
                "state_dir = {:?}\n",
                tmp.path().join("cut").display().to_string()
            ),
        ),
        "--join-token",
        cut,
    ]);
    assert_ne!(code, 0);
    assert!(stderr.contains("join token is malformed"), "{stderr}");

    tracing::info!("phase: reused join token");
    let dir2 = fed.root.join("alpha-again");
    let ca2 = causeway_gateway::site::SiteState::site_ca(&dir2, None).unwrap();
    let err = causeway_gateway::site::SiteState::join(&dir2, &token, &ca2, vec![])
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("already used"), "{err}");
    assert!(
        !dir2.join("site.json").exists(),
        "a refused join must not leave a half-joined site"
    );

    tracing::info!("phase: duplicate site name");
    let err = fed.create_token("alpha").await.unwrap_err();
    assert!(err.to_string().contains("already a member"), "{err}");
    let err = fed.create_token("Not_A_Label").await.unwrap_err();
    assert!(err.to_string().contains("site name"), "{err}");

    tracing::info!("phase: invalid service key");
    let mut f = client.federation().await.unwrap();
    let mut bad = exports(1);
    bad[0].service = "payments".into();
    let err = f
        .publish_exports(causeway_api::pb::PublishExportsRequest {
            site: "alpha".into(),
            exports: bad,
            tunnel_addrs: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("exports[0].service")
            && err.message().contains("<namespace>/<name>"),
        "{}",
        err.message()
    );

    tracing::info!("phase: least privilege");
    let err = f
        .publish_exports(causeway_api::pb::PublishExportsRequest {
            site: "beta".into(),
            exports: exports(1),
            tunnel_addrs: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::PermissionDenied,
        "{}",
        err.message()
    );
    let err = f
        .create_join_token(causeway_api::pb::CreateJoinTokenRequest {
            site: "gamma".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::PermissionDenied,
        "{}",
        err.message()
    );
    assert!(err.message().contains("admin"), "{}", err.message());
    let err = anon
        .catalog(causeway_api::pb::CatalogRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    tracing::info!("phase: unknown and invalid config fields");
    for (command, file, text, want) in [
        (
            "gateway",
            "typo.toml",
            "state_dir = \"/x\"\ntunel_listen = \"127.0.0.1:1\"\n",
            "unknown field `tunel_listen`",
        ),
        (
            "gateway",
            "badkey.toml",
            "state_dir = \"/x\"\n[[exports]]\nservice = \"payments\"\nport = 80\nendpoints = [\"127.0.0.1:1\"]\n",
            "exports[0].service",
        ),
        (
            "controller",
            "ctrl.toml",
            "id = 1\nlisten = \"127.0.0.1:1\"\nbogus = true\n",
            "unknown field `bogus`",
        ),
    ] {
        let cfg = write_config(&tmp, file, text);
        let (code, stderr) = run_bin(&[command, "--config", &cfg]);
        assert_eq!(code, 64, "{file}: {stderr}");
        assert!(stderr.contains(want), "{file}: {stderr}");
    }

    tracing::info!("phase: nothing acknowledged was lost, the controllers still serve");
    for id in fed.controller_addrs.keys() {
        wait_catalog_len(&fed, *id, 3).await;
    }
    publish(&client, "alpha", 4).await.unwrap();
}

fn write_config(tmp: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = tmp.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn voters(s: &causeway_api::pb::StatusResponse) -> Vec<u64> {
    s.nodes.iter().filter(|n| n.voter).map(|n| n.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_grow_from_one_to_five_and_shrink_back_while_serving() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = new_federation(&tmp);
    for id in 1..=5 {
        fed.reserve_controller(id).unwrap();
    }
    tracing::info!("phase: a one-node cluster");
    fed.spawn_controller(1, &[1], false).unwrap();
    fed.wait_for_leader(Duration::from_secs(20)).await.unwrap();
    let site = join_in_process(&fed, "alpha").await;

    tracing::info!("phase: a client writes the whole time");
    let client = std::sync::Arc::new(causeway_api::client::ControllerClient::new(
        fed.endpoints(),
        &site.controller_ca_pem,
        Some(&site.api),
    ));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut acked, mut failed) = (0usize, 0usize);
            let mut n = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match publish(&client, "alpha", n).await {
                    Ok(_) => {
                        acked = n;
                        n += 1;
                    }
                    // One retry after rotating: a client's normal behaviour.
                    Err(_) => match publish(&client, "alpha", n).await {
                        Ok(_) => {
                            acked = n;
                            n += 1;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "write failed");
                            failed += 1;
                        }
                    },
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            (acked, failed)
        })
    };

    tracing::info!("phase: grow to three");
    for id in [2, 3] {
        fed.spawn_controller(id, &[id], true).unwrap();
        let addr = fed.controller_addrs[&id].clone();
        fed.ctl(&["controller", "add", &id.to_string(), &addr])
            .await
            .unwrap();
    }
    assert_eq!(voters(&fed.status(1).await.unwrap()), [1, 2, 3]);

    tracing::info!("phase: grow to five");
    for id in [4, 5] {
        fed.spawn_controller(id, &[id], true).unwrap();
        let addr = fed.controller_addrs[&id].clone();
        fed.ctl(&["controller", "add", &id.to_string(), &addr])
            .await
            .unwrap();
    }
    let listed = fed
        .ctl(&["--output", "json", "controller", "list"])
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["voter"] == true)
            .count(),
        5,
        "{listed}"
    );

    tracing::info!("phase: shrink back to three");
    for id in [5, 4] {
        fed.ctl(&["controller", "remove", &id.to_string()])
            .await
            .unwrap();
        fed.controller(id).kill().await;
        fed.controllers.remove(&id);
    }
    let leader = fed.wait_for_leader(Duration::from_secs(20)).await.unwrap();
    assert_eq!(voters(&fed.status(leader).await.unwrap()), [1, 2, 3]);
    let err = fed.ctl(&["controller", "remove", "9"]).await.unwrap_err();
    assert!(err.to_string().contains("not a member"), "{err}");

    tracing::info!("phase: the writer never lost service, and nothing acknowledged is missing");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, failed) = writer.await.unwrap();
    assert_eq!(failed, 0, "writes failed during membership changes");
    assert!(acked > 5, "the writer made progress ({acked})");
    for id in [1, 2, 3] {
        wait_catalog_len(&fed, id, acked).await;
    }
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_corrupt_data_refuses_to_serve_and_rebuilds_from_peers() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let site = join_in_process(&fed, "alpha").await;
    let client = site.controller_client();
    for n in 1..=5 {
        publish(&client, "alpha", n).await.unwrap();
    }
    let leader = fed.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    let victim = *fed
        .controller_addrs
        .keys()
        .find(|id| **id != leader)
        .unwrap();
    // Let the victim apply everything before it stops.
    tokio::time::sleep(Duration::from_millis(500)).await;
    fed.controller(victim).kill().await;

    tracing::info!("phase: flip one bit in the victim's last log entry");
    let data_dir = fed.root.join(format!("controller-{victim}"));
    let mut segments: Vec<_> = std::fs::read_dir(data_dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segments.sort();
    let newest = segments
        .last()
        .expect("the victim has log segments")
        .clone();
    let mut bytes = std::fs::read(&newest).unwrap();
    let i = bytes.len() - 3;
    bytes[i] ^= 0x04;
    std::fs::write(&newest, &bytes).unwrap();

    tracing::info!(
        "phase: it says why, sets the data aside, and rebuilds from its peers on its own"
    );
    fed.restart(victim).unwrap();
    let log = eventually(
        Duration::from_secs(30),
        "the corrupt node to rebuild from its peers",
        async || {
            let log = fed.controller(victim).log_tail(200);
            assert!(
                fed.controller(victim).exited().is_none(),
                "the node exited instead of rebuilding:\n{log}"
            );
            if log.contains("rebuilt from peers") {
                Ok(log)
            } else {
                Err(log)
            }
        },
    )
    .await;
    assert!(log.contains("checksum"), "{log}");
    assert!(log.contains("will not vote, lead or serve"), "{log}");
    let kept: Vec<_> = std::fs::read_dir(&data_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("corrupt-"))
        .collect();
    assert_eq!(kept.len(), 1, "the damaged data is kept for inspection");

    tracing::info!("phase: the others kept serving; the rebuilt node catches up and votes again");
    publish(&client, "alpha", 6).await.unwrap();
    eventually(
        Duration::from_secs(30),
        "the rebuilt node to catch up as a voter",
        async || {
            let leader = fed.wait_for_leader(Duration::from_secs(10)).await.unwrap();
            let st = fed.status(leader).await.unwrap();
            let voter = st.nodes.iter().any(|n| n.id == victim && n.voter);
            let s = tokio::time::timeout(Duration::from_secs(2), fed.status(victim))
                .await
                .ok()?
                .ok()?;
            (voter && s.revision == st.revision && st.revision > 0).then_some(())
        },
    )
    .await;
    assert_eq!(catalog_services(&fed, victim).await.len(), 6);
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_never_see_revisions_go_backwards_across_leader_kills() {
    use causeway_api::pb::watch_event::Kind;
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let site = join_in_process(&fed, "alpha").await;
    let client = std::sync::Arc::new(site.controller_client());

    tracing::info!("phase: a watcher that reconnects from its last revision, checking order");
    let watch_client = site.controller_client();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut view = causeway_api::catalog::CatalogView::default();
            let (mut reconnects, mut events) = (0usize, 0usize);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(mut fedc) = watch_client.federation().await else {
                    watch_client.rotate();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let from = if view.synced { view.revision.0 } else { 0 };
                let Ok(resp) = fedc
                    .watch(causeway_api::pb::WatchRequest {
                        from_revision: from,
                        ..Default::default()
                    })
                    .await
                else {
                    watch_client.rotate();
                    continue;
                };
                reconnects += 1;
                let mut stream = resp.into_inner();
                loop {
                    let next =
                        tokio::time::timeout(Duration::from_millis(300), stream.message()).await;
                    let ev = match next {
                        Ok(Ok(Some(ev))) => ev,
                        Ok(_) => {
                            watch_client.rotate();
                            break;
                        }
                        Err(_) if stop.load(std::sync::atomic::Ordering::Relaxed) => break,
                        Err(_) => continue,
                    };
                    events += 1;
                    match &ev.kind {
                        Some(Kind::Delta(_)) => assert!(
                            ev.revision > view.revision.0,
                            "delta {} after revision {} (from {from})",
                            ev.revision,
                            view.revision.0
                        ),
                        Some(Kind::Snapshot(_)) => assert!(
                            ev.revision >= view.revision.0,
                            "snapshot {} after revision {}",
                            ev.revision,
                            view.revision.0
                        ),
                        None => panic!("empty event"),
                    }
                    view.apply(ev).unwrap();
                }
            }
            (view, reconnects, events)
        })
    };

    let mut n = 0;
    for round in 0..3 {
        tracing::info!(
            round,
            "phase: writes, then SIGKILL the leader, then restart it"
        );
        for _ in 0..5 {
            n += 1;
            eventually(
                Duration::from_secs(20),
                format_args!("write {n} to be accepted"),
                async || publish(&client, "alpha", n).await,
            )
            .await;
        }
        let leader = fed.wait_for_leader(Duration::from_secs(20)).await.unwrap();
        fed.controller(leader).kill().await;
        n += 1;
        eventually(
            Duration::from_secs(20),
            format_args!("a write to be accepted after killing {leader}"),
            async || publish(&client, "alpha", n).await,
        )
        .await;
        fed.restart(leader).unwrap();
    }

    tracing::info!("phase: the watcher converges on the final catalog");
    let leader = fed.wait_for_leader(Duration::from_secs(20)).await.unwrap();
    let want = fed.status(leader).await.unwrap().revision;
    // Give it time to reach the leader's revision, then stop it (the
    // assertions below say what it missed, so a timeout here is no failure).
    let _ = until(
        Duration::from_secs(20),
        "the leader to list every write",
        async || watcher.is_finished() || catalog_services(&fed, leader).await.len() == n,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (view, reconnects, events) = watcher.await.unwrap();
    tracing::info!(reconnects, events, "watcher done");
    assert!(
        reconnects >= 2,
        "the watcher should have reconnected across kills ({reconnects})"
    );
    assert_eq!(
        view.revision.0, want,
        "watcher stopped at {} but the catalog is at {want}",
        view.revision.0
    );
    // Raw exports: this in-process site sends no heartbeats, so its lease may lapse.
    let services = view.exports.get("alpha").map(|e| e.len()).unwrap_or(0);
    assert_eq!(
        services, n,
        "watcher sees {services} services, {n} were acknowledged"
    );
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_bound_the_log_and_a_restart_recovers_from_them() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let (mut fed, _) = controllers(&tmp, 3, &["--snapshot-every", "50"]).await;
    let site = join_in_process(&fed, "alpha").await;
    let client = site.controller_client();

    tracing::info!("phase: 400 writes with a snapshot every 50 entries");
    for n in 1..=400 {
        publish(&client, "alpha", 1 + n % 7).await.unwrap();
    }
    publish(&client, "alpha", 9).await.unwrap();
    let leader = fed.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    let s = fed.status(leader).await.unwrap();
    assert!(s.snapshot_index >= 300, "no recent snapshot: {s:?}");
    assert!(s.purged_index > 0, "log never compacted: {s:?}");
    assert!(
        s.last_log_index - s.purged_index <= 50 + 10 + 5,
        "log kept {} entries",
        s.last_log_index - s.purged_index
    );

    tracing::info!("phase: every node restarts from snapshot + log with the same catalog");
    for id in [1, 2, 3] {
        fed.controller(id).kill().await;
    }
    for id in [1, 2, 3] {
        fed.restart(id).unwrap();
    }
    let leader = fed.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    eventually(
        Duration::from_secs(20),
        "the restarted catalog to list 9 services",
        async || equals(catalog_services(&fed, leader).await.len(), &9),
    )
    .await;
    publish(&client, "alpha", 3).await.unwrap();
    fed.shutdown().await;
}

/// A follower that missed megabytes of log is sent it a piece at a time:
/// one `AppendEntries` with the whole backlog could not finish within the
/// heartbeat interval openraft allows it, and would be retried forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_far_behind_on_large_entries_catches_up() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let (mut fed, leader) = controllers(&tmp, 3, &[]).await;
    let site = join_in_process(&fed, "alpha").await;
    let client = site.controller_client();
    let behind = (1..=3).find(|id| *id != leader).unwrap();

    tracing::info!(
        behind,
        "phase: one follower down while ~10 MB of log is written"
    );
    fed.controller(behind).kill().await;
    let revision = publish_large_deltas(&fed, &client, 80, Duration::from_secs(30)).await;

    tracing::info!("phase: it comes back and catches up on the whole backlog");
    fed.restart(behind).unwrap();
    let caught_up = until(
        Duration::from_secs(60),
        format_args!("the follower to catch up to revision {revision}"),
        async || match fed.status(behind).await {
            Ok(s) => equals(s.revision >= revision, &true),
            Err(e) => Err(e.to_string()),
        },
    )
    .await;
    if let Err(e) = caught_up {
        panic!("{e}\n{}", fed.diagnose(40).await);
    }
    // And the cluster still takes writes.
    publish(&client, "alpha", 3).await.unwrap();
    fed.shutdown().await;
}

/// Root only: mounts a small tmpfs as a controller's data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_gives_a_clear_error_and_loses_nothing_acknowledged() {
    init_tracing();
    assert!(
        nix_is_root(),
        "this test mounts a tmpfs and needs root: run `sudo scripts/test-all` (CI runs as root)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = new_federation(&tmp);
    fed.reserve_controller(1).unwrap();
    let data = fed.root.join("controller-1");
    std::fs::create_dir_all(&data).unwrap();
    let mount = |opts: &str| {
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(&data)
            .status()
            .unwrap();
        assert!(st.success(), "mount {opts} failed");
    };
    mount("size=4m");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _guard = Unmount(data.clone());
    fed.spawn_controller(1, &[1], false).unwrap();
    fed.wait_for_leader(Duration::from_secs(20)).await.unwrap();
    let site = join_in_process(&fed, "alpha").await;
    let client = site.controller_client();

    tracing::info!("phase: write big export sets until the disk is full");
    let mut acked = 0;
    let mut error = String::new();
    for n in 1..=400 {
        match publish(&client, "alpha", 200 + n).await {
            Ok(_) => acked = 200 + n,
            Err(e) => {
                error = e;
                break;
            }
        }
    }
    assert!(!error.is_empty(), "4 MiB never filled up");
    tracing::info!(acked, %error, "write refused");
    eventually(
        Duration::from_secs(20),
        "the node to stop on a full disk",
        async || {
            let c = fed.controller(1);
            c.exited()
                .ok_or_else(|| format!("still running:\n{}", c.log_tail(30)))
        },
    )
    .await;
    let log = fed.controller(1).log_tail(60);
    assert!(log.contains("No space left on device"), "{log}");

    tracing::info!("phase: more space, restart: everything acknowledged is there");
    mount("remount,size=64m");
    fed.restart(1).unwrap();
    fed.wait_for_leader(Duration::from_secs(20)).await.unwrap();
    // Reads come from the node's applied state, which replays the log
    // after the election: wait for it (a loss would never get there).
    eventually(
        Duration::from_secs(20),
        format_args!("node 1 to list all {acked} acknowledged exports"),
        async || {
            let got = catalog_services(&fed, 1).await.len();
            (got >= acked)
                .then_some(())
                .ok_or_else(|| format!("found {got}"))
        },
    )
    .await;
    publish(&client, "alpha", 5).await.unwrap();
    fed.shutdown().await;
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_watcher_is_cut_off_and_never_slows_the_others() {
    use causeway_api::pb::{self, watch_event::Kind};
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let (mut fed, leader) = controllers(&tmp, 3, &["--watch-stall-ms", "500"]).await;
    let site = join_in_process(&fed, "alpha").await;
    // Both watchers on the leader, so they share its hub and broadcast.
    let watch_client = causeway_api::client::ControllerClient::new(
        vec![fed.controller_addrs[&leader].clone()],
        &site.controller_ca_pem,
        Some(&site.api),
    );
    // Each watcher on its own connection, as separate clients would be.
    let watch = || async {
        let ch = causeway_api::client::ControllerClient::new(
            vec![fed.controller_addrs[&leader].clone()],
            &site.controller_ca_pem,
            Some(&site.api),
        )
        .channel()
        .await
        .unwrap();
        pb::federation_client::FederationClient::new(ch)
            .max_decoding_message_size(64 * 1024 * 1024)
            .watch(pb::WatchRequest {
                from_revision: 0,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    };

    tracing::info!("phase: one watcher never reads, one reads everything");
    let mut stalled = watch().await;
    let mut healthy = watch().await;
    let (seen_tx, mut seen_rx) = tokio::sync::watch::channel(0u64);
    let follower = tokio::spawn(async move {
        let mut last = 0;
        while let Ok(Some(ev)) = healthy.message().await {
            if !matches!(ev.kind, Some(Kind::Snapshot(_))) {
                assert!(ev.revision > last, "{} after {last}", ev.revision);
            }
            last = ev.revision;
            let _ = seen_tx.send(last);
        }
    });

    tracing::info!("phase: large deltas, far more than the stalled stream can buffer");
    let client = site.controller_client();
    // Tens of MB in all (loopback socket buffers alone can hold 32 MB).
    let revision = publish_large_deltas(&fed, &client, 800, Duration::from_secs(10)).await;

    tracing::info!("phase: the healthy watcher is fully caught up");
    // A watcher held up by the stalled one would never catch up; the bound
    // only has to outlast a starved CI machine decoding tens of MB.
    tokio::time::timeout(
        Duration::from_secs(60),
        seen_rx.wait_for(|seen| *seen >= revision),
    )
    .await
    .expect("the healthy watcher fell behind")
    .unwrap();

    tracing::info!("phase: the stalled one was cut off: its stream ends after what was buffered");
    let m = http_get(fed.controller_admin[&leader], "/metrics").await;
    assert!(
        metric(&m, "causeway_watch_cutoffs_total") >= 1.0,
        "no cut-off recorded:\n{m}"
    );
    let mut last = 0;
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stalled.message().await {
                Ok(Some(ev)) => last = ev.revision,
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stalled stream was never cut off");
    assert!(
        last < revision,
        "the stalled watcher got everything, so it was never stalled"
    );

    tracing::info!("phase: it resumes where it stopped and converges on the same revision");
    let ch = watch_client.channel().await.unwrap();
    let mut resumed = pb::federation_client::FederationClient::new(ch)
        .max_decoding_message_size(64 * 1024 * 1024)
        .watch(pb::WatchRequest {
            from_revision: last,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = last;
    while got < revision {
        let ev = tokio::time::timeout(Duration::from_secs(10), resumed.message())
            .await
            .expect("resumed watch stalled")
            .unwrap()
            .expect("resumed watch ended");
        assert!(ev.revision > got || matches!(ev.kind, Some(Kind::Snapshot(_))));
        got = ev.revision;
    }
    assert_eq!(got, revision);
    follower.abort();
    fed.shutdown().await;
}

/// Found by the chaos suite (docs/reliability.md): after every controller
/// was killed, the old leader came back as leader of the same term and
/// answered a linearizable read from its snapshot, before applying the
/// entries it had committed (and acknowledged) before the crash. Its read
/// index was the first entry of its term; the commit index is not stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_restarted_in_its_term_reads_every_acknowledged_write() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let (mut fed, _) = controllers(&tmp, 3, &["--snapshot-every", "1000"]).await;
    let admin = fed.admin_client(None).unwrap();
    let doc = |ms: u32| {
        format!(
            r#"{{"apiVersion":"causeway.dev/v1alpha1","kind":"TimeoutPolicy","metadata":{{"name":"reg","namespace":"chaos"}},"spec":{{"service":"reg","requestMs":{ms}}}}}"#
        )
    };
    let last = 1900;
    for ms in 1..=last {
        apply_policy(&admin, doc(ms)).await.unwrap();
    }
    for id in [1, 2, 3] {
        fed.controller(id).kill().await;
    }
    for id in [1, 2, 3] {
        fed.restart(id).unwrap();
    }
    // The first linearizable answer after the restart must hold the last
    // acknowledged write.
    let answer = until(
        Duration::from_secs(30),
        "a linearizable read after the restart",
        async || policies_of_kind(&admin, "TimeoutPolicy").await.ok(),
    )
    .await
    .unwrap();
    let doc: serde_json::Value = serde_json::from_str(&answer[0].document_json).unwrap();
    assert_eq!(doc["spec"]["requestMs"], last, "a stale linearizable read");
    fed.shutdown().await;
}
