use super::*;

fn site(n: &str) -> SiteName {
    n.parse().unwrap()
}

fn token(state: &mut CatalogState, id: &str, name: &str, expires: u64) -> Outcome {
    state
        .apply(Command::CreateJoinToken {
            token_id: id.into(),
            secret_sha256: format!("hash-{id}"),
            site: site(name),
            labels: BTreeMap::new(),
            expires_at_ms: expires,
            now_ms: 0,
        })
        .0
}

fn join(state: &mut CatalogState, id: &str, name: &str, now: u64) -> Outcome {
    state
        .apply(Command::JoinSite {
            token_id: id.into(),
            secret_sha256: format!("hash-{id}"),
            now_ms: now,
            site: site(name),
            trust_domain: format!("{name}.causeway").parse().unwrap(),
            trust_bundle_pem: "pem".into(),
            tunnel_addrs: vec!["127.0.0.1:1".into()],
            credential_sha256: None,
        })
        .0
}

fn export(svc: &str, healthy: u32) -> ExportRecord {
    ExportRecord {
        service: svc.parse().unwrap(),
        ports: vec![PortRecord {
            port: 80,
            protocol: Protocol::Tcp,
            name: String::new(),
        }],
        healthy_endpoints: healthy,
        vip_index: 0,
        headless: false,
        endpoints: vec![],
        total_endpoints: healthy,
        zones: vec![],
        subsets: vec![],
        exported_at_ms: 0,
        client_ip_affinity: false,
    }
}

fn publish(
    state: &mut CatalogState,
    name: &str,
    ex: Vec<ExportRecord>,
) -> (Outcome, Vec<pb::Change>) {
    state.apply(Command::PublishExports {
        site: site(name),
        exports: ex,
        tunnel_addrs: vec![],
        now_ms: 1_000,
    })
}

#[test]
fn join_tokens_are_single_use_expiring_and_bound_to_their_site() {
    let mut s = CatalogState::default();
    assert_eq!(
        token(&mut s, "t1", "east", 100),
        Outcome::Unchanged { revision: 0 }
    );
    assert!(matches!(
        join(&mut s, "nope", "east", 1),
        Outcome::Rejected {
            code: RejectCode::TokenUnknown,
            ..
        }
    ));
    assert!(matches!(
        join(&mut s, "t1", "west", 1),
        Outcome::Rejected {
            code: RejectCode::TokenWrongSite,
            ..
        }
    ));
    assert!(matches!(
        join(&mut s, "t1", "east", 100),
        Outcome::Rejected {
            code: RejectCode::TokenExpired,
            ..
        }
    ));
    assert_eq!(
        join(&mut s, "t1", "east", 1),
        Outcome::Applied { revision: 1 }
    );
    assert!(matches!(
        join(&mut s, "t1", "east", 2),
        Outcome::Rejected {
            code: RejectCode::TokenUsed,
            ..
        }
    ));
    // The name is taken now.
    assert!(matches!(
        token(&mut s, "t2", "east", 100),
        Outcome::Rejected {
            code: RejectCode::SiteExists,
            ..
        }
    ));
}

#[test]
fn exports_get_stable_vips_and_only_real_changes_bump_the_revision() {
    let mut s = CatalogState::default();
    token(&mut s, "a", "east", 100);
    token(&mut s, "b", "west", 100);
    join(&mut s, "a", "east", 1);
    join(&mut s, "b", "west", 1);
    assert_eq!(s.revision, 2);

    let (o, ch) = publish(&mut s, "east", vec![export("shop/payments", 1)]);
    assert_eq!(o, Outcome::Applied { revision: 3 });
    assert_eq!(ch.len(), 1);
    let (o, ch) = publish(&mut s, "east", vec![export("shop/payments", 1)]);
    assert_eq!(o, Outcome::Unchanged { revision: 3 });
    assert!(ch.is_empty());

    publish(
        &mut s,
        "west",
        vec![export("shop/cart", 1), export("shop/payments", 2)],
    );
    assert_eq!(s.vips.get(&"shop/payments".parse().unwrap()), Some(&1));
    assert_eq!(s.vips.get(&"shop/cart".parse().unwrap()), Some(&2));
    assert_eq!(s.exports[&site("west")][1].vip_index, 1);

    let (o, _) = publish(
        &mut s,
        "west",
        vec![export("shop/cart", 1), export("shop/cart", 1)],
    );
    assert!(matches!(
        o,
        Outcome::Rejected {
            code: RejectCode::Invalid,
            ..
        }
    ));
    let (o, _) = publish(&mut s, "nowhere", vec![]);
    assert!(matches!(
        o,
        Outcome::Rejected {
            code: RejectCode::SiteUnknown,
            ..
        }
    ));

    let (o, ch) = s.apply(Command::RemoveSite { site: site("west") });
    assert_eq!(o, Outcome::Applied { revision: 5 });
    assert_eq!(ch.len(), 1);
    assert!(!s.exports.contains_key(&site("west")));
    // VIPs are never reused.
    assert_eq!(s.vips.len(), 2);
}

#[test]
fn an_export_keeps_the_time_it_was_first_seen_unless_the_site_names_one() {
    let mut s = CatalogState::default();
    token(&mut s, "a", "east", 100);
    join(&mut s, "a", "east", 1);
    let at = |s: &CatalogState, svc: &str| {
        s.exports[&site("east")]
            .iter()
            .find(|e| e.service.as_str() == svc)
            .map(|e| e.exported_at_ms)
    };
    let publish_at = |s: &mut CatalogState, now: u64, ex: Vec<ExportRecord>| {
        s.apply(Command::PublishExports {
            site: site("east"),
            exports: ex,
            tunnel_addrs: vec![],
            now_ms: now,
        })
        .0
    };
    publish_at(&mut s, 5_000, vec![export("shop/a", 1)]);
    assert_eq!(at(&s, "shop/a"), Some(5_000));
    // Published again later (health changed): still first seen at 5 s.
    let mut named = export("shop/b", 1);
    named.exported_at_ms = 1_234;
    let o = publish_at(&mut s, 9_000, vec![export("shop/a", 2), named]);
    assert!(matches!(o, Outcome::Applied { .. }));
    assert_eq!(at(&s, "shop/a"), Some(5_000));
    assert_eq!(at(&s, "shop/b"), Some(1_234), "a site's own time is kept");
    // The same exports at a later clock are no change.
    let o = publish_at(&mut s, 20_000, vec![export("shop/a", 2)]);
    assert!(matches!(o, Outcome::Applied { .. }), "shop/b went away");
    let o = publish_at(&mut s, 30_000, vec![export("shop/a", 2)]);
    assert!(matches!(o, Outcome::Unchanged { .. }));
    // Exported anew after going away: a new time.
    publish_at(&mut s, 40_000, vec![]);
    publish_at(&mut s, 50_000, vec![export("shop/a", 2)]);
    assert_eq!(at(&s, "shop/a"), Some(50_000));
}

#[test]
fn snapshot_round_trips_through_json() {
    let mut s = CatalogState::default();
    token(&mut s, "a", "east", 100);
    join(&mut s, "a", "east", 1);
    publish(&mut s, "east", vec![export("shop/payments", 1)]);
    let json = serde_json::to_vec(&s).unwrap();
    let back: CatalogState = serde_json::from_slice(&json).unwrap();
    assert_eq!(back, s);
    assert_eq!(back.snapshot_pb().revision, 2);
}

#[test]
fn availability_changes_bump_only_when_they_change_something() {
    let mut s = CatalogState::default();
    token(&mut s, "a", "east", 100);
    join(&mut s, "a", "east", 1);
    let (o, ch) = s.apply(Command::SetSiteAvailability {
        site: site("east"),
        available: false,
    });
    assert_eq!(o, Outcome::Applied { revision: 2 });
    assert_eq!(ch.len(), 1);
    assert!(!s.snapshot_pb().sites[0].available);
    let (o, _) = s.apply(Command::SetSiteAvailability {
        site: site("east"),
        available: false,
    });
    assert_eq!(o, Outcome::Unchanged { revision: 2 });
    let (o, _) = s.apply(Command::SetSiteAvailability {
        site: site("west"),
        available: true,
    });
    assert!(matches!(
        o,
        Outcome::Rejected {
            code: RejectCode::SiteUnknown,
            ..
        }
    ));
}

#[test]
fn a_trust_bundle_changes_only_for_a_member_and_only_when_it_differs() {
    let mut s = CatalogState::default();
    token(&mut s, "a", "east", 100);
    join(&mut s, "a", "east", 1);
    let set = |s: &mut CatalogState, name: &str, pem: &str| {
        s.apply(Command::SetTrustBundle {
            site: site(name),
            trust_bundle_pem: pem.into(),
        })
    };
    let (o, ch) = set(&mut s, "east", "old+new");
    assert_eq!(o, Outcome::Applied { revision: 2 });
    assert!(matches!(
        &ch[0].kind,
        Some(pb::change::Kind::SiteUpserted(site)) if site.trust_bundle_pem == "old+new"
    ));
    assert_eq!(s.snapshot_pb().sites[0].trust_bundle_pem, "old+new");
    assert_eq!(
        set(&mut s, "east", "old+new").0,
        Outcome::Unchanged { revision: 2 }
    );
    for (name, pem, code) in [
        ("west", "x", RejectCode::SiteUnknown),
        ("east", "", RejectCode::LimitExceeded),
    ] {
        let (o, ch) = set(&mut s, name, pem);
        assert!(
            matches!(&o, Outcome::Rejected { code: c, .. } if *c == code),
            "{o:?}"
        );
        assert!(ch.is_empty());
    }
    let big = "x".repeat(MAX_BUNDLE_BYTES + 1);
    assert!(matches!(
        set(&mut s, "east", &big).0,
        Outcome::Rejected {
            code: RejectCode::LimitExceeded,
            ..
        }
    ));
    assert_eq!(s.revision, 2);
}

#[test]
fn site_labels_are_replaced_whole_only_for_a_member_and_within_the_limit() {
    let mut s = CatalogState::default();
    token(&mut s, "a", "east", 100);
    join(&mut s, "a", "east", 1);
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let set = |s: &mut CatalogState, name: &str, l: BTreeMap<String, String>| {
        s.apply(Command::SetSiteLabels {
            site: site(name),
            labels: l,
        })
    };
    let (o, ch) = set(
        &mut s,
        "east",
        labels(&[("region", "eu"), ("zone", "eu-1a")]),
    );
    assert_eq!(o, Outcome::Applied { revision: 2 });
    assert!(matches!(
        &ch[0].kind,
        Some(pb::change::Kind::SiteUpserted(site)) if site.labels.get("zone").map(String::as_str) == Some("eu-1a")
    ));
    assert_eq!(
        set(
            &mut s,
            "east",
            labels(&[("region", "eu"), ("zone", "eu-1a")])
        )
        .0,
        Outcome::Unchanged { revision: 2 }
    );
    // The whole set: a label left out goes.
    set(&mut s, "east", labels(&[("region", "eu")]));
    assert_eq!(s.snapshot_pb().sites[0].labels.len(), 1);
    assert!(matches!(
        set(&mut s, "west", labels(&[])).0,
        Outcome::Rejected {
            code: RejectCode::SiteUnknown,
            ..
        }
    ));
    let many: BTreeMap<String, String> = (0..=MAX_LABELS)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    assert!(matches!(
        set(&mut s, "east", many).0,
        Outcome::Rejected {
            code: RejectCode::LimitExceeded,
            ..
        }
    ));
    assert_eq!(s.revision, 3);
}

fn policy(name: &str, doc: &str) -> PolicyRecord {
    PolicyRecord {
        kind: "TimeoutPolicy".into(),
        namespace: "shop".into(),
        name: name.into(),
        document_json: doc.into(),
        revision: 0,
        owner: None,
    }
}

#[test]
fn policies_apply_all_at_once_only_real_changes_bump_and_delete_needs_one() {
    let mut s = CatalogState::default();
    let (o, ch) = s.apply(Command::ApplyPolicies {
        policies: vec![policy("a", "{1}"), policy("b", "{2}")],
        by: None,
        if_revisions: vec![],
    });
    assert_eq!(o, Outcome::Applied { revision: 1 });
    assert_eq!(ch.len(), 2, "one change per policy, one revision");
    assert!(s.policies.values().all(|p| p.revision == 1));

    // The same documents again: nothing happens.
    let (o, ch) = s.apply(Command::ApplyPolicies {
        policies: vec![policy("a", "{1}"), policy("b", "{2}")],
        by: None,
        if_revisions: vec![],
    });
    assert_eq!((o, ch.len()), (Outcome::Unchanged { revision: 1 }, 0));

    // One changed: only it is streamed, with the new revision.
    let (o, ch) = s.apply(Command::ApplyPolicies {
        policies: vec![policy("a", "{1}"), policy("b", "{3}")],
        by: None,
        if_revisions: vec![],
    });
    assert_eq!(o, Outcome::Applied { revision: 2 });
    assert_eq!(ch.len(), 1);
    assert_eq!(s.policies["TimeoutPolicy/shop/a"].revision, 1);
    assert_eq!(s.policies["TimeoutPolicy/shop/b"].revision, 2);
    assert_eq!(s.snapshot_pb().policies.len(), 2);

    let (o, _) = s.apply(Command::DeletePolicy {
        kind: "TimeoutPolicy".into(),
        namespace: "shop".into(),
        name: "zzz".into(),
        by: None,
    });
    assert!(
        matches!(
            o,
            Outcome::Rejected {
                code: RejectCode::NotFound,
                ..
            }
        ),
        "{o:?}"
    );
    let (o, ch) = s.apply(Command::DeletePolicy {
        kind: "TimeoutPolicy".into(),
        namespace: "shop".into(),
        name: "a".into(),
        by: None,
    });
    assert_eq!((o, ch.len()), (Outcome::Applied { revision: 3 }, 1));
    assert_eq!(s.policies.len(), 1);

    // Policies survive a snapshot.
    let back: CatalogState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(back, s);
}

#[test]
fn a_conditional_apply_takes_effect_only_at_the_revision_it_expected() {
    let mut s = CatalogState::default();
    let apply = |s: &mut CatalogState, docs: &[(&str, &str)], ifs: Vec<u64>| {
        s.apply(Command::ApplyPolicies {
            policies: docs.iter().map(|(n, d)| policy(n, d)).collect(),
            by: None,
            if_revisions: ifs,
        })
        .0
    };
    let conflict = |o: &Outcome| {
        matches!(
            o,
            Outcome::Rejected {
                code: RejectCode::Conflict,
                ..
            }
        )
    };
    // A condition on an absent policy fails; 0 means none.
    let o = apply(&mut s, &[("a", "{1}")], vec![7]);
    assert!(conflict(&o), "{o:?}");
    assert!(format!("{o:?}").contains("does not exist"), "{o:?}");
    assert_eq!(
        apply(&mut s, &[("a", "{1}"), ("b", "{1}")], vec![0, 0]),
        Outcome::Applied { revision: 1 }
    );
    assert_eq!(
        apply(&mut s, &[("a", "{2}")], vec![1]),
        Outcome::Applied { revision: 2 }
    );
    // The same condition again: a has moved on to revision 2.
    let o = apply(&mut s, &[("a", "{3}")], vec![1]);
    assert!(conflict(&o), "{o:?}");
    assert!(format!("{o:?}").contains("revision 2"), "{o:?}");
    assert_eq!(s.policies["TimeoutPolicy/shop/a"].document_json, "{2}");
    // All or none: b's condition holds, a's does not, neither changes.
    let o = apply(&mut s, &[("b", "{9}"), ("a", "{9}")], vec![1, 1]);
    assert!(conflict(&o), "{o:?}");
    assert_eq!(s.policies["TimeoutPolicy/shop/b"].document_json, "{1}");
    assert_eq!(s.revision, 2);
}

#[test]
fn a_site_changes_and_deletes_only_the_policies_it_manages() {
    let mut s = CatalogState::default();
    let apply = |s: &mut CatalogState, name: &str, doc: &str, by: Option<&str>| {
        s.apply(Command::ApplyPolicies {
            policies: vec![policy(name, doc)],
            by: by.map(site),
            if_revisions: vec![],
        })
        .0
    };
    let delete = |s: &mut CatalogState, name: &str, by: Option<&str>| {
        s.apply(Command::DeletePolicy {
            kind: "TimeoutPolicy".into(),
            namespace: "shop".into(),
            name: name.into(),
            by: by.map(site),
        })
        .0
    };
    let forbidden = |o: Outcome| match o {
        Outcome::Rejected {
            code: RejectCode::Forbidden,
            message,
        } => message,
        other => panic!("not refused: {other:?}"),
    };
    assert!(matches!(
        apply(&mut s, "ops", "{1}", None),
        Outcome::Applied { .. }
    ));
    assert!(matches!(
        apply(&mut s, "east-p", "{1}", Some("east")),
        Outcome::Applied { .. }
    ));
    assert_eq!(
        s.policies["TimeoutPolicy/shop/east-p"].owner,
        Some(site("east"))
    );
    assert_eq!(
        s.policies["TimeoutPolicy/shop/east-p"].to_pb().owner_site,
        "east"
    );
    // East changes its own; west may neither change nor delete it, nor the
    // operator's.
    assert!(matches!(
        apply(&mut s, "east-p", "{2}", Some("east")),
        Outcome::Applied { .. }
    ));
    let m = forbidden(apply(&mut s, "east-p", "{3}", Some("west")));
    assert!(
        m.contains("managed by site east's agent; site west may not change it"),
        "{m}"
    );
    let m = forbidden(delete(&mut s, "east-p", Some("west")));
    assert!(m.contains("managed by site east"), "{m}");
    let m = forbidden(apply(&mut s, "ops", "{2}", Some("east")));
    assert!(m.contains("applied by an operator"), "{m}");
    forbidden(delete(&mut s, "ops", Some("east")));
    assert_eq!(s.policies["TimeoutPolicy/shop/east-p"].document_json, "{2}");
    // East deletes its own; an operator may do anything.
    assert!(matches!(
        delete(&mut s, "east-p", Some("east")),
        Outcome::Applied { .. }
    ));
    assert!(matches!(
        apply(&mut s, "east-q", "{1}", Some("east")),
        Outcome::Applied { .. }
    ));
    assert!(
        matches!(
            apply(&mut s, "east-q", "{1}", None),
            Outcome::Applied { .. }
        ),
        "the operator takes it over"
    );
    assert_eq!(s.policies["TimeoutPolicy/shop/east-q"].owner, None);
    assert!(matches!(
        delete(&mut s, "ops", None),
        Outcome::Applied { .. }
    ));
}

#[test]
fn a_site_credential_counts_only_while_it_is_the_issued_one_and_not_revoked() {
    let mut s = CatalogState::default();
    token(&mut s, "a", "east", 100);
    join(&mut s, "a", "east", 1);
    let fp = |c: char| c.to_string().repeat(64);
    // Joined before credentials were recorded: any credential of the name.
    assert!(s.site_credential_ok(&site("east"), &fp('1')));
    s.sites.get_mut(&site("east")).unwrap().credential_sha256 = Some(fp('a'));
    assert!(s.site_credential_ok(&site("east"), &fp('a')));
    assert!(
        !s.site_credential_ok(&site("east"), &fp('b')),
        "another certificate of the name"
    );
    assert!(
        !s.site_credential_ok(&site("west"), &fp('a')),
        "not a member"
    );
    let revoke = |s: &mut CatalogState, sha: &str| {
        s.apply(Command::RevokeCredential { sha256: sha.into() }).0
    };
    assert!(
        matches!(revoke(&mut s, &fp('A')), Outcome::Applied { .. }),
        "stored lowercase"
    );
    assert!(!s.site_credential_ok(&site("east"), &fp('a')));
    assert!(matches!(
        revoke(&mut s, &fp('a')),
        Outcome::Unchanged { .. }
    ));
    assert!(matches!(
        revoke(&mut s, "not hex"),
        Outcome::Rejected {
            code: RejectCode::Invalid,
            ..
        }
    ));
    let back: CatalogState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(back, s, "revocations survive a snapshot");
}

#[test]
fn a_revoked_certificate_serial_reaches_watchers_once_and_only_for_a_member() {
    let mut s = CatalogState::default();
    token(&mut s, "t1", "a", 100);
    join(&mut s, "t1", "a", 1);
    let revoke = |s: &mut CatalogState, site_name: &str, serial: &str| {
        s.apply(Command::RevokeCertificate {
            site: site(site_name),
            serial: serial.into(),
        })
    };
    let (out, changes) = revoke(&mut s, "a", "0A:1B");
    assert!(matches!(out, Outcome::Applied { .. }), "{out:?}");
    match &changes[..] {
        [pb::Change {
            kind: Some(pb::change::Kind::SiteUpserted(site)),
        }] => assert_eq!(site.revoked_serials, vec!["0a1b".to_string()]),
        other => panic!("{other:?}"),
    }
    // The same serial however it is written: nothing changes.
    let (out, changes) = revoke(&mut s, "a", "0x0a1b");
    assert!(matches!(out, Outcome::Unchanged { .. }), "{out:?}");
    assert!(changes.is_empty());
    for (site_name, serial, want) in [("a", "not-hex", "serial"), ("b", "01", "not a member")] {
        let (out, changes) = revoke(&mut s, site_name, serial);
        match out {
            Outcome::Rejected { message, .. } => assert!(message.contains(want), "{message}"),
            other => panic!("{site_name}/{serial}: {other:?}"),
        }
        assert!(changes.is_empty());
    }
    for i in 1..MAX_REVOKED_SERIALS {
        revoke(&mut s, "a", &format!("{i:x}"));
    }
    let (out, _) = revoke(&mut s, "a", "ffffff");
    assert!(
        matches!(
            out,
            Outcome::Rejected {
                code: RejectCode::LimitExceeded,
                ..
            }
        ),
        "{out:?}"
    );
}
