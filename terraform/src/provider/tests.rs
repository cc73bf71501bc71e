//! The provider's unit and property tests.

use causeway_api::pb as api;

use super::policy::{parse_policy_id, PolicyDoc};
use super::services::services_of;
use super::*;
use crate::value::Value;

fn obj(pairs: &[(&str, Value)]) -> Value {
    Value::Map(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    )
}

const DOC: &str = "apiVersion: causeway.dev/v1alpha1\nkind: TrafficSplit\nmetadata: {name: canary, namespace: shop}\nspec:\n  service: payments\n  weights: {east: 99, west: 1}\n";

#[test]
fn a_new_site_is_planned_with_the_token_unknown_and_the_default_lifetime() {
    let proposed = site_schema().object(fields(&obj(&[("name", Value::string("east"))])));
    let (planned, replace) = Provider::plan_site(&Value::Null, &proposed);
    assert!(replace.is_empty());
    assert_eq!(planned.get("id").as_str(), Some("east"));
    assert_eq!(planned.get("join_token"), &Value::Unknown);
    assert_eq!(planned.get("token_ttl_seconds").as_f64(), Some(3600.0));
    assert_eq!(planned.get("joined").as_bool(), Some(false));
}

#[test]
fn renaming_a_site_replaces_it_new_labels_replace_only_an_invitation_and_a_new_lifetime_neither() {
    let prior = site_schema().object(fields(&obj(&[
        ("name", Value::string("east")),
        ("token_ttl_seconds", Value::Number(3600.0)),
        ("join_token", Value::string("tok")),
    ])));
    let mut f = fields(&prior);
    f.insert("token_ttl_seconds".into(), Value::Number(60.0));
    let (planned, replace) = Provider::plan_site(&prior, &Value::Map(f.clone()));
    assert!(replace.is_empty());
    assert_eq!(planned.get("join_token").as_str(), Some("tok"));
    f.insert("name".into(), Value::string("west"));
    let (_, replace) = Provider::plan_site(&prior, &Value::Map(f.clone()));
    assert_eq!(replace, vec![path("name")]);
    f.insert("name".into(), Value::string("east"));
    f.insert("labels".into(), obj(&[("region", Value::string("eu"))]));
    let (_, replace) = Provider::plan_site(&prior, &Value::Map(f.clone()));
    assert_eq!(replace, vec![path("labels")]);
    // Once the site has joined, new labels are an update in place.
    let mut joined = fields(&prior);
    joined.insert("joined".into(), Value::Bool(true));
    let mut g = f.clone();
    g.insert("joined".into(), Value::Bool(true));
    let (_, replace) = Provider::plan_site(&Value::Map(joined), &Value::Map(g));
    assert!(replace.is_empty());
}

#[test]
fn a_policy_plan_names_it_and_keeps_the_revision_only_while_the_content_is_the_same() {
    let proposed = policy_schema().object(fields(&obj(&[("document", Value::string(DOC))])));
    let (planned, _) = Provider::plan_policy(&Value::Null, &proposed);
    assert_eq!(planned.get("id").as_str(), Some("TrafficSplit/shop/canary"));
    assert_eq!(planned.get("revision"), &Value::Unknown);

    let mut prior = fields(&planned);
    prior.insert("revision".into(), Value::Number(7.0));
    let prior = Value::Map(prior);
    // The same policy written as JSON: same content, same revision.
    let as_json = PolicyDoc::parse(DOC).unwrap().json.to_string();
    let proposed = policy_schema().object(fields(&obj(&[("document", Value::string(&as_json))])));
    let (planned, replace) = Provider::plan_policy(&prior, &proposed);
    assert_eq!(planned.get("revision").as_f64(), Some(7.0));
    assert!(replace.is_empty());
    // New weights: an update in place.
    let changed = DOC.replace("east: 99, west: 1", "east: 50, west: 50");
    let proposed = policy_schema().object(fields(&obj(&[("document", Value::string(&changed))])));
    let (planned, replace) = Provider::plan_policy(&prior, &proposed);
    assert_eq!(planned.get("revision"), &Value::Unknown);
    assert!(replace.is_empty());
    // Another name: a different policy, so a replacement.
    let renamed = DOC.replace("name: canary", "name: canary2");
    let proposed = policy_schema().object(fields(&obj(&[("document", Value::string(&renamed))])));
    let (_, replace) = Provider::plan_policy(&prior, &proposed);
    assert_eq!(replace, vec![path("document")]);
}

#[test]
fn invalid_configuration_is_named_by_attribute() {
    let d = Provider::validate_site(&obj(&[
        ("name", Value::string("East_1")),
        ("token_ttl_seconds", Value::Number(0.5)),
    ]));
    assert_eq!(d.len(), 2);
    assert_eq!(d[0].attribute, Some(path("name")));
    assert_eq!(d[1].attribute, Some(path("token_ttl_seconds")));
    let bad = DOC.replace("weights: {east: 99, west: 1}", "weights: {}");
    let d = Provider::validate_policy(&obj(&[("document", Value::string(&bad))]));
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].attribute, Some(path("document")));
    assert!(d[0].detail.contains("spec.weights"), "{}", d[0].detail);
    let two = format!("{DOC}---\n{DOC}");
    let d = Provider::validate_policy(&obj(&[("document", Value::string(&two))]));
    assert!(d[0].detail.contains("exactly one"), "{}", d[0].detail);
}

#[test]
fn provider_configuration_errors_name_the_attribute_and_the_fix() {
    let e = Provider::configure(&obj(&[
        ("controllers", Value::string_list(&["nowhere"])),
        ("credentials_dir", Value::string("/nonexistent")),
    ]))
    .err()
    .unwrap();
    assert_eq!(e[0].attribute, Some(path("controllers")));
    assert!(e[0].summary.contains("not host:port"));
    assert_eq!(e[1].attribute, Some(path("credentials_dir")));
    let e = Provider::configure(&obj(&[("ca_pem", Value::string("x"))]))
        .err()
        .unwrap();
    assert!(e[0].summary.contains("all of ca_pem, cert_pem and key_pem"));
    let e = Provider::configure(&obj(&[("controllers", Value::Unknown)]))
        .err()
        .unwrap();
    assert!(e[0].summary.contains("not known until apply"));
}

#[test]
fn the_readme_example_is_a_valid_policy() {
    // terraform/README.md's FailoverPolicy, as yamlencode writes it.
    let doc = r#"{"apiVersion":"causeway.dev/v1alpha1","kind":"FailoverPolicy","metadata":{"name":"payments","namespace":"shop"},"spec":{"mode":"ordered","service":"payments","sites":["eu-west","us-east"]}}"#;
    assert!(include_str!("../../README.md").contains(
        r#"spec       = { service = "payments", mode = "ordered", sites = ["eu-west", "us-east"] }"#
    ));
    let d = Provider::validate_policy(&obj(&[("document", Value::string(doc))]));
    assert!(d.is_empty(), "{d:?}");
}

#[test]
fn a_bundle_must_hold_ca_certificates_and_its_fingerprints_are_planned() {
    let ca = causeway_api::identity::CertificateAuthority::generate("east").unwrap();
    let leaf = ca
        .issue(
            &"spiffe://east.causeway.local/gw".parse().unwrap(),
            &[],
            std::time::Duration::from_secs(3600),
        )
        .unwrap();
    let ok = obj(&[
        ("site", Value::string("east")),
        ("ca_pem", Value::string(&ca.cert_pem)),
    ]);
    assert!(Provider::validate_bundle(&ok).is_empty());
    let (planned, replace) =
        Provider::plan_bundle(&Value::Null, &bundle_schema().object(fields(&ok)));
    assert!(replace.is_empty());
    let prints = planned.get("fingerprints").to_string_list().unwrap();
    assert_eq!(prints, vec![identity::fingerprint(&ca.cert_der)]);
    let d = Provider::validate_bundle(&obj(&[("ca_pem", Value::string(&leaf.cert_pem))]));
    assert_eq!(d[0].attribute, Some(path("ca_pem")));
    assert!(
        d[0].detail.contains("must be a CA certificate"),
        "{}",
        d[0].detail
    );
    let d = Provider::validate_bundle(&obj(&[("ca_pem", Value::string("not PEM"))]));
    assert_eq!(d.len(), 1);
    let moved = obj(&[
        ("site", Value::string("west")),
        ("ca_pem", Value::string(&ca.cert_pem)),
    ]);
    let (_, replace) = Provider::plan_bundle(&planned, &bundle_schema().object(fields(&moved)));
    assert_eq!(replace, vec![path("site")]);
}

#[tokio::test]
async fn a_stop_ends_a_call_in_flight_and_the_ones_after_it() {
    let p = Provider::new();
    let hung = p.guard(std::future::pending::<Result<(), Status>>());
    let stop = async {
        tokio::task::yield_now().await;
        p.stop.send_replace(true);
    };
    let (r, ()) = tokio::join!(hung, stop);
    assert_eq!(r.unwrap_err().code(), tonic::Code::Cancelled);
    let r = p.guard(std::future::pending::<Result<(), Status>>()).await;
    assert_eq!(r.unwrap_err().code(), tonic::Code::Cancelled);
    // Before any stop, a call's own answer comes through.
    let q = Provider::new();
    assert_eq!(q.guard(async { Ok::<_, Status>(7) }).await.unwrap(), 7);
}

proptest::proptest! {
    /// Whatever shape of value arrives (wrong types, unknowns, extra or
    /// missing attributes), validation and planning answer without
    /// panicking, and a plan has exactly the schema's attributes.
    #[test]
    fn validation_and_plans_take_any_value(
        prior in crate::value::tests::value(),
        proposed in crate::value::tests::value(),
    ) {
        let _ = Provider::validate_site(&proposed);
        let _ = Provider::validate_policy(&proposed);
        let _ = Provider::validate_bundle(&proposed);
        let _ = Provider::configure(&proposed);
        for (planned, block) in [
            (Provider::plan_site(&prior, &proposed).0, site_schema()),
            (Provider::plan_policy(&prior, &proposed).0, policy_schema()),
            (Provider::plan_bundle(&prior, &proposed).0, bundle_schema()),
        ] {
            let Value::Map(m) = planned else { panic!("a plan is an object") };
            let names: Vec<&str> = block.attrs.iter().map(|a| a.name).collect();
            proptest::prop_assert_eq!(m.keys().map(String::as_str).collect::<Vec<_>>().len(), names.len());
            proptest::prop_assert!(names.iter().all(|n| m.contains_key(*n)));
        }
    }
}

#[test]
fn services_are_grouped_across_sites_with_ports_and_endpoints_summed() {
    let export = |svc: &str, port: u32, healthy: u32, total: u32| api::Export {
        service: svc.into(),
        ports: vec![api::ServicePort {
            port,
            protocol: "tcp".into(),
            name: String::new(),
        }],
        healthy_endpoints: healthy,
        total_endpoints: total,
        ..Default::default()
    };
    let cat = api::CatalogSnapshot {
        exports: vec![
            api::SiteExports {
                site: "west".into(),
                exports: vec![export("shop/pay", 443, 1, 3), export("ops/log", 9000, 2, 2)],
            },
            api::SiteExports {
                site: "east".into(),
                exports: vec![export("shop/pay", 8443, 2, 2)],
            },
        ],
        ..Default::default()
    };
    let all = services_of(&cat, None);
    let Value::List(list) = &all else { panic!() };
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].get("service").as_str(), Some("ops/log"));
    let pay = &list[1];
    assert_eq!(pay.get("name").as_str(), Some("pay"));
    assert_eq!(pay.get("sites").to_string_list().unwrap(), ["east", "west"]);
    assert_eq!(
        pay.get("ports"),
        &Value::List(vec![Value::Number(443.0), Value::Number(8443.0)])
    );
    assert_eq!(pay.get("healthy_endpoints").as_f64(), Some(3.0));
    assert_eq!(pay.get("total_endpoints").as_f64(), Some(5.0));
    let Value::List(shop) = services_of(&cat, Some("shop")) else {
        panic!()
    };
    assert_eq!(shop.len(), 1);
}

#[test]
fn policy_ids_are_kind_namespace_name() {
    assert_eq!(
        parse_policy_id("FailoverPolicy/shop/payments"),
        Some(("FailoverPolicy", "shop", "payments"))
    );
    assert_eq!(parse_policy_id("FailoverPolicy/shop"), None);
    assert_eq!(parse_policy_id("a/b/c/d"), None);
    assert_eq!(parse_policy_id("//x"), None);
}
