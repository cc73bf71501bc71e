use causeway_api::pb;

use super::*;

fn split(name: &str, weights: Value) -> Object {
    Object {
        kind: Kind::TrafficSplit,
        namespace: "shop".into(),
        name: name.into(),
        generation: Some(1),
        spec: json!({"service": "web", "weights": weights}),
    }
}

fn held(o: &Object, owner: &str) -> pb::Policy {
    pb::Policy {
        kind: o.kind.as_str().into(),
        namespace: o.namespace.clone(),
        name: o.name.clone(),
        document_json: parse_document(&o.document()).unwrap().to_json(),
        revision: 1,
        owner_site: owner.into(),
    }
}

fn catalog(policies: Vec<pb::Policy>) -> CatalogView {
    CatalogView::from_snapshot(pb::CatalogSnapshot {
        revision: 1,
        policies,
        ..Default::default()
    })
}

#[test]
fn plurals_and_crds_follow_kubernetes_naming() {
    assert_eq!(plural(Kind::FailoverPolicy), "failoverpolicies");
    assert_eq!(plural(Kind::TrafficSplit), "trafficsplits");
    assert_eq!(plural(Kind::CircuitBreaker), "circuitbreakers");
    assert_eq!(plural(Kind::AuthorizationPolicy), "authorizationpolicies");
    let crds = crds();
    assert_eq!(crds.len(), KINDS.len());
    let c = &crds[1];
    assert_eq!(c["metadata"]["name"], "trafficsplits.causeway.dev");
    assert_eq!(c["spec"]["names"]["kind"], "TrafficSplit");
    assert_eq!(
        c["spec"]["versions"][0]["subresources"],
        json!({"status": {}})
    );
}

#[test]
fn new_and_changed_objects_are_applied_and_held_ones_are_accepted() {
    let a = split("a", json!({"east": 1}));
    let b = split("b", json!({"east": 1}));
    let b2 = split("b", json!({"east": 2, "west": 1}));
    let view = catalog(vec![held(&a, "west"), held(&b, "west")]);
    let p = plan(
        &[a.clone(), b2.clone(), split("c", json!({"west": 1}))],
        &view,
        "west",
    );
    assert_eq!(
        p.apply.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["TrafficSplit/shop/b", "TrafficSplit/shop/c"]
    );
    assert_eq!(
        p.apply[0].1,
        parse_document(&b2.document()).unwrap().to_json()
    );
    assert_eq!(p.conditions["TrafficSplit/shop/a"], accepted());
    assert!(p.delete.is_empty());
}

#[test]
fn the_sites_policies_without_an_object_are_deleted_and_no_others() {
    let mine = split("mine", json!({"east": 1}));
    let theirs = split("theirs", json!({"east": 1}));
    let ops = split("ops", json!({"east": 1}));
    let view = catalog(vec![
        held(&mine, "west"),
        held(&theirs, "east"),
        held(&ops, ""),
    ]);
    let p = plan(&[], &view, "west");
    assert_eq!(
        p.delete,
        [(
            "TrafficSplit".to_string(),
            "shop".to_string(),
            "mine".to_string()
        )]
    );
    assert!(p.apply.is_empty());
}

#[test]
fn an_invalid_or_foreign_object_gets_a_condition_saying_why() {
    let bad = split("bad", json!({"east": "lots"}));
    let ops = split("ops", json!({"east": 1}));
    let east = split("east-owned", json!({"east": 1}));
    let view = catalog(vec![held(&ops, ""), held(&east, "east")]);
    let p = plan(&[bad, ops, east], &view, "west");
    assert!(p.apply.is_empty());
    let c = &p.conditions["TrafficSplit/shop/bad"];
    assert_eq!((c.status, c.reason), (false, "Invalid"));
    assert!(c.message.contains("spec.weights.east"), "{}", c.message);
    assert!(
        c.message.ends_with("fix the spec and apply it again"),
        "{}",
        c.message
    );
    let c = &p.conditions["TrafficSplit/shop/ops"];
    assert_eq!(c.reason, "NotManagedHere");
    assert_eq!(
        c.message,
        "TrafficSplit shop/ops is managed by an operator; rename this object, or change the policy there"
    );
    assert!(p.conditions["TrafficSplit/shop/east-owned"]
        .message
        .contains("managed by site east"));
}

/// The examples in deploy/ are policies the controllers accept.
#[test]
fn the_example_policy_objects_are_valid_documents() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/policies.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let mut n = 0;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc).unwrap();
        let kind: Kind = v["kind"].as_str().unwrap().parse().unwrap();
        let o = Object {
            kind,
            namespace: v["metadata"]["namespace"].as_str().unwrap().into(),
            name: v["metadata"]["name"].as_str().unwrap().into(),
            generation: None,
            spec: v["spec"].clone(),
        };
        if let Err(e) = parse_document(&o.document()) {
            panic!("{}: {e:?}", o.key());
        }
        n += 1;
    }
    assert_eq!(n, 6);
}
