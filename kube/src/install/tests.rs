use super::*;

fn east() -> Options {
    let mut o = Options::new("east");
    o.image = "causeway:test".into();
    o.controllers = 3;
    o.advertise = vec!["203.0.113.10:15443".into()];
    o.dns_cluster_ip = Some("10.96.0.53".into());
    o
}

fn west() -> Options {
    let mut o = Options::new("west");
    o.image = "causeway:test".into();
    o.controller_endpoints = vec!["203.0.113.20:7001".into()];
    o.advertise = vec!["203.0.113.11:15443".into()];
    o
}

/// The rendered examples in deploy/install/ are what the code renders.
#[test]
fn the_rendered_examples_in_deploy_are_current() {
    for (name, o) in [("east.yaml", east()), ("west.yaml", west())] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/install")
            .join(name);
        let want = format!(
            "# causeway install for site {} (rendered by a test from kube/src/install.rs;\n# CAUSEWAY_BLESS=1 cargo test -p causeway-kube rewrites it).\n{}",
            o.site,
            to_yaml(&render(&o))
        );
        if std::env::var_os("CAUSEWAY_BLESS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(have == want, "deploy/install/{name} is stale: run CAUSEWAY_BLESS=1 cargo test -p causeway-kube and review the diff");
    }
}

fn kinds(objs: &[Value]) -> Vec<String> {
    objs.iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn a_site_with_controllers_gets_every_part() {
    let objs = render(&east());
    let k = kinds(&objs);
    for want in [
        "Namespace/causeway-system",
        "CustomResourceDefinition/serviceexports.multicluster.x-k8s.io",
        "CustomResourceDefinition/serviceimports.multicluster.x-k8s.io",
        "ClusterRole/causeway-agent",
        "Deployment/causeway-agent",
        "Deployment/causeway-gateway",
        "Service/causeway-gateway",
        "Deployment/causeway-dns",
        "Service/causeway-dns",
        "ConfigMap/causeway-coredns-stanza",
        "StatefulSet/causeway-controller",
        "Service/causeway-controller",
        "PodDisruptionBudget/causeway-controller",
        "NetworkPolicy/causeway-controller",
    ] {
        assert!(k.iter().any(|x| x == want), "{want} missing from {k:?}");
    }
    let pdb = objs
        .iter()
        .find(|o| o["kind"] == "PodDisruptionBudget")
        .unwrap();
    assert_eq!(pdb["spec"]["minAvailable"], 2, "a majority of 3");
    let stanza = objs
        .iter()
        .find(|o| o["metadata"]["name"] == "causeway-coredns-stanza")
        .unwrap();
    assert_eq!(
        stanza["data"]["clusterset.server"],
        "clusterset.local:53 {\n    forward . 10.96.0.53\n    cache 5\n}\n"
    );
    let gw = objs
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "causeway-gateway")
        .unwrap();
    assert!(
        gw["data"]["gateway.toml"]
            .as_str()
            .unwrap()
            .contains("tunnel_advertise = [\"203.0.113.10:15443\"]"),
        "{gw}"
    );
}

#[test]
fn a_site_without_controllers_has_none_and_points_at_the_given_ones() {
    let k = kinds(&render(&west()));
    assert!(
        !k.iter().any(|x| x.contains("causeway-controller")),
        "{k:?}"
    );
    assert_eq!(controller_endpoints(&west()), "203.0.113.20:7001");
    assert_eq!(
        controller_endpoints(&east()),
        "causeway-controller-0.causeway-controller.causeway-system.svc:7001,causeway-controller-1.causeway-controller.causeway-system.svc:7001,causeway-controller-2.causeway-controller.causeway-system.svc:7001"
    );
}

#[test]
fn every_container_is_hardened_and_probed() {
    for o in render(&east()) {
        let spec = if o["kind"] == "Deployment" || o["kind"] == "StatefulSet" {
            &o["spec"]["template"]["spec"]
        } else {
            continue;
        };
        assert_eq!(
            spec["securityContext"]["runAsNonRoot"], true,
            "{}",
            o["metadata"]["name"]
        );
        for c in spec["containers"].as_array().unwrap() {
            let sc = &c["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{}", c["name"]);
            assert_eq!(sc["allowPrivilegeEscalation"], false);
            assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
            assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
            assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/ready");
            assert!(c["resources"]["requests"]["cpu"].is_string());
            assert!(c["resources"]["limits"]["memory"].is_string());
        }
    }
}

#[test]
fn the_agent_and_gateway_may_do_only_what_they_do() {
    let objs = render(&east());
    let roles: Vec<&Value> = objs
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
        .collect();
    assert_eq!(
        roles.len(),
        3,
        "agent ClusterRole and Role, gateway ClusterRole"
    );
    let gateway = roles
        .iter()
        .find(|r| r["metadata"]["name"] == "causeway-gateway")
        .unwrap();
    for rule in gateway["rules"].as_array().unwrap() {
        assert_eq!(
            rule["verbs"],
            json!(["get", "list", "watch"]),
            "the gateway only reads: {rule}"
        );
    }
    for rule in roles.iter().flat_map(|r| r["rules"].as_array().unwrap()) {
        let verbs = rule["verbs"].as_array().unwrap();
        assert!(!verbs.contains(&json!("*")), "{rule}");
        assert!(
            !rule["resources"].as_array().unwrap().contains(&json!("*")),
            "{rule}"
        );
        assert!(
            !rule["resources"]
                .as_array()
                .unwrap()
                .contains(&json!("secrets")),
            "{rule}"
        );
    }
}

#[test]
fn bad_options_are_all_reported() {
    let mut o = Options::new("East_1");
    o.controllers = 2;
    o.gateway_replicas = 0;
    o.advertise = vec!["nowhere".into()];
    o.cluster_ip_range = "10.96.0.0".into();
    o.import_port_base = 80;
    let errs = o.check().unwrap_err();
    for want in [
        "site:",
        "controllers: 2",
        "gateway_replicas:",
        "advertise: \"nowhere\"",
        "cluster_ip_range:",
        "import_port_base: 80",
    ] {
        assert!(
            errs.iter().any(|e| e.starts_with(want)),
            "{want} not in {errs:?}"
        );
    }
    let mut o = west();
    o.controller_endpoints.clear();
    o.advertise.clear();
    let errs = o.check().unwrap_err();
    assert!(
        errs[0].starts_with("controller_endpoints: give the controllers"),
        "{errs:?}"
    );
    assert!(
        errs[1].starts_with("advertise: give the address"),
        "{errs:?}"
    );
    assert!(east().check().is_ok());
    assert!(west().check().is_ok());
}
