//! The web view (`causeway ui`) in a real headless Chromium (Debian's
//! `chromium`, driven by `playwright-core` from Node; `scripts/test-all`
//! installs both): the page loads with no console error, shows the three
//! sites and the service, and after a site's gateway stops it shows that
//! site unhealthy and the traffic moved to the other site, without a
//! reload.

mod common;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// Node and the playwright-core module, or a panic saying how to get them.
fn browser_driver() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    if !dir.join("node_modules/playwright-core").is_dir() {
        panic!("playwright-core is not installed: run `npm install --no-save --no-package-lock playwright-core@1.64.1` in tests/browser (scripts/test-all does)");
    }
    if !std::path::Path::new("/usr/bin/chromium").exists() && std::env::var_os("CHROMIUM").is_none()
    {
        panic!("chromium is not installed: `sudo apt-get install chromium` (scripts/test-all does), or set CHROMIUM to a Chromium binary");
    }
    dir.join("ui.mjs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_view_shows_the_federation_and_follows_a_failure_live() {
    init_tracing();
    let script = browser_driver();
    let tmp = tempfile::tempdir().unwrap();
    let (mut fed, _) = controllers(&tmp, 1, &[]).await;
    let (target, _east, _west) = banner_sites(&mut fed).await;
    assert_eq!(wait_call(target).await, "east");

    let gateways = fed
        .sites
        .iter()
        .map(|(n, s)| (n.clone(), s.gateway_admin))
        .collect();
    let (ui, _task) = causeway::ui::serve(
        "127.0.0.1:0".parse().unwrap(),
        causeway::ui::Sources {
            client: fed.admin_client(None).unwrap(),
            gateways,
        },
    )
    .await
    .unwrap();

    // The page's data: links carry RTT and loss, services where their
    // traffic goes and the rates each calling gateway measures.
    let state: serde_json::Value =
        eventually(Duration::from_secs(20), "the view's state", async || {
            let raw = http_get_any(ui, "/api/state").await;
            let body = raw.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
            let v: serde_json::Value =
                serde_json::from_str(&body).map_err(|e| format!("{e}: {raw}"))?;
            let linked = v["links"].as_array().is_some_and(|l| {
                l.iter().any(|l| {
                    l["from"] == "central" && l["to"] == "east" && l["loss_ratio"].is_number()
                })
            });
            linked.then_some(v.clone()).ok_or(raw)
        })
        .await;
    let service = state["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "shop/echo")
        .unwrap();
    assert_eq!(
        service["exporters"].as_array().unwrap().len(),
        2,
        "{service}"
    );
    assert!(
        service["traffic"]["central"]["tiers"].is_array(),
        "{service}"
    );
    assert_eq!(state["controllers"]["nodes"].as_array().unwrap().len(), 1);
    let not_found = http_get_any(ui, "/nope").await;
    assert!(not_found.starts_with("HTTP/1.1 404"), "{not_found}");

    let shot = tmp.path().join("ui.png");
    let mut node = tokio::process::Command::new("node")
        .arg(&script)
        .arg(format!("http://{ui}/"))
        .arg(&shot)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node (Node.js) runs the browser test");
    let mut lines = tokio::io::BufReader::new(node.stdout.take().unwrap()).lines();
    let mut stdin = node.stdin.take().unwrap();
    let first = eventually(
        Duration::from_secs(90),
        "the page to load",
        async || match lines.next_line().await {
            Ok(Some(l)) if l.starts_with("LOADED") => Ok(l),
            Ok(Some(l)) if l.starts_with("FAIL") => panic!("{l}"),
            Ok(None) => panic!("the browser test ended early (its error is above)"),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    tracing::info!(%first, "the page shows the federation");

    tracing::info!("phase: east's gateway stops; the page follows without a reload");
    fed.sites.get_mut("east").unwrap().gateway.kill().await;
    stdin.write_all(b"STOPPED east\n").await.unwrap();
    let updated = eventually(
        Duration::from_secs(120),
        "the page to show east down",
        async || match lines.next_line().await {
            Ok(Some(l)) if l.starts_with("UPDATED") => Ok(l),
            Ok(Some(l)) if l.starts_with("FAIL") => panic!("{l}"),
            Ok(None) => panic!("the browser test ended early (its error is above)"),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    tracing::info!(%updated, "the page followed");
    assert!(updated.contains("traffic from central: west"), "{updated}");
    let status = node.wait().await.unwrap();
    assert!(status.success(), "the browser test ended with {status}");
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "no screenshot"
    );
    if let Ok(keep) = std::env::var("CAUSEWAY_UI_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
    fed.shutdown().await;
}
