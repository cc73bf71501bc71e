use super::*;
use crate::fake::FakeApi;

fn at(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).unwrap()
}

const D: Duration = Duration::from_secs(15);

fn held_by(who: &str, renewed: i64, transitions: i32) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(who.into()),
        renew_time: Some(MicroTime(at(renewed))),
        acquire_time: Some(MicroTime(at(0))),
        lease_duration_seconds: Some(15),
        lease_transitions: Some(transitions),
        ..Default::default()
    }
}

#[test]
fn no_lease_is_acquired() {
    let Decision::Lead(s) = decide(None, "a", at(0), D) else {
        panic!("should lead")
    };
    assert_eq!(s.holder_identity.as_deref(), Some("a"));
    assert_eq!(s.lease_transitions, Some(0));
    assert_eq!(s.renew_time, Some(MicroTime(at(0))));
}

#[test]
fn the_holder_renews_and_keeps_its_acquire_time() {
    let Decision::Lead(s) = decide(Some(&held_by("a", 0, 3)), "a", at(5), D) else {
        panic!("should lead")
    };
    assert_eq!(s.renew_time, Some(MicroTime(at(5))));
    assert_eq!(s.acquire_time, Some(MicroTime(at(0))));
    assert_eq!(s.lease_transitions, Some(3));
}

#[test]
fn another_replica_waits_until_expiry_then_takes_over() {
    let lease = held_by("a", 0, 3);
    assert_eq!(
        decide(Some(&lease), "b", at(14), D),
        Decision::Follow { holder: "a".into() }
    );
    let Decision::Lead(s) = decide(Some(&lease), "b", at(15), D) else {
        panic!("an expired lease is taken over")
    };
    assert_eq!(s.holder_identity.as_deref(), Some("b"));
    assert_eq!(s.lease_transitions, Some(4));
    assert_eq!(s.acquire_time, Some(MicroTime(at(15))));
}

struct Elector {
    leading: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
}

fn elector(api: &FakeApi, me: &str) -> Elector {
    let (tx, leading) = watch::channel(false);
    let (stop, stop_rx) = watch::channel(false);
    let client = api.client();
    let me = me.to_string();
    tokio::spawn(async move {
        run(
            client,
            "causeway-system",
            "causeway-agent",
            &me,
            Duration::from_secs(1),
            tx,
            stop_rx,
        )
        .await;
    });
    Elector { leading, stop }
}

async fn leads(e: &mut Elector) {
    let ok = matches!(
        tokio::time::timeout(Duration::from_secs(10), e.leading.wait_for(|l| *l)).await,
        Ok(Ok(_))
    );
    assert!(ok, "never became the leader");
}

#[tokio::test]
async fn one_replica_leads_and_another_takes_over_when_it_stops() {
    let api = FakeApi::new();
    let mut a = elector(&api, "agent-a");
    leads(&mut a).await;
    let mut b = elector(&api, "agent-b");
    // b keeps following while a renews (a's renewals are what b reads).
    let mut changes = api.events.subscribe();
    for _ in 0..3 {
        let _ = tokio::time::timeout(Duration::from_secs(5), changes.recv()).await;
        assert!(
            !*b.leading.borrow() || !*a.leading.borrow(),
            "two leaders at once"
        );
    }
    assert!(*a.leading.borrow() && !*b.leading.borrow());

    let _ = a.stop.send(true);
    leads(&mut b).await;
    assert!(!*a.leading.borrow(), "a stepped down when it stopped");
    let lease = api
        .get(
            "apis/coordination.k8s.io/v1/leases",
            "causeway-system",
            "causeway-agent",
        )
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "agent-b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
}

#[tokio::test]
async fn a_stale_replace_is_refused() {
    let api = FakeApi::new();
    let leases: Api<Lease> = Api::namespaced(api.client(), "ns");
    let first = leases
        .create(
            &PostParams::default(),
            &Lease {
                metadata: ObjectMeta {
                    name: Some("l".into()),
                    ..Default::default()
                },
                spec: Some(held_by("a", 0, 0)),
            },
        )
        .await
        .unwrap();
    let mut newer = first.clone();
    newer.spec = Some(held_by("a", 1, 0));
    leases
        .replace("l", &PostParams::default(), &newer)
        .await
        .unwrap();
    // Written from the first read: the API server refuses it.
    let mut stale = first;
    stale.spec = Some(held_by("b", 2, 1));
    let err = leases
        .replace("l", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 409),
        "{err:?}"
    );
}
