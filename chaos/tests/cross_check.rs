//! The linearizability checker against an independent one: stateright's
//! `LinearizabilityTester`, on many small random histories of a
//! compare-and-set register (some linearizable, most not). Both must reach
//! the same verdict on every one.

use causeway_chaos::history::{Entry, Op, Outcome};
use causeway_chaos::lin::{check_key, Verdict};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use stateright::semantics::{ConsistencyTester, LinearizabilityTester, SequentialSpec};

/// The register as stateright's reference object.
#[derive(Clone, Debug, Default, Hash, PartialEq)]
struct CasRegister(Option<i64>);

#[derive(Clone, Debug, Hash, PartialEq)]
enum RegOp {
    Write(i64),
    Read,
    Cas(i64, i64),
}

#[derive(Clone, Debug, Hash, PartialEq)]
enum RegRet {
    WriteOk,
    ReadOk(Option<i64>),
    CasOk,
    CasFail,
}

impl SequentialSpec for CasRegister {
    type Op = RegOp;
    type Ret = RegRet;
    fn invoke(&mut self, op: &RegOp) -> RegRet {
        match op {
            RegOp::Write(v) => {
                self.0 = Some(*v);
                RegRet::WriteOk
            }
            RegOp::Read => RegRet::ReadOk(self.0),
            RegOp::Cas(expect, new) => {
                if self.0 == Some(*expect) {
                    self.0 = Some(*new);
                    RegRet::CasOk
                } else {
                    RegRet::CasFail
                }
            }
        }
    }
}

/// One step of a generated run: which process acts, and the random
/// choices it uses (what to call, or what its call returns).
#[derive(Debug, Clone)]
struct Step {
    process: u32,
    kind: u8,
    a: i64,
    b: i64,
    ret: u8,
}

fn step() -> impl Strategy<Value = Step> {
    (0u32..3, 0u8..3, 1i64..4, 1i64..4, 0u8..4).prop_map(|(process, kind, a, b, ret)| Step {
        process,
        kind,
        a,
        b,
        ret,
    })
}

/// Plays the steps: a process with nothing in flight calls an operation;
/// one with an operation in flight gets its (random) answer. Operations
/// still in flight at the end are unknown. Time is the step's index.
fn build(steps: &[Step]) -> Vec<(Entry, Option<RegRet>)> {
    let mut out: Vec<(Entry, Option<RegRet>)> = Vec::new();
    let mut open: [Option<usize>; 3] = [None; 3];
    for (t, s) in steps.iter().enumerate() {
        let t = t as u64;
        let p = s.process as usize;
        match open[p] {
            None => {
                let op = match s.kind {
                    0 => Op::Write { value: s.a },
                    1 => Op::Read { value: None },
                    _ => Op::Cas {
                        expect: s.a,
                        new: s.b,
                    },
                };
                out.push((
                    Entry {
                        process: s.process,
                        key: 0,
                        op,
                        outcome: Outcome::Info,
                        invoke_ns: t,
                        complete_ns: None,
                    },
                    None,
                ));
                open[p] = Some(out.len() - 1);
            }
            Some(i) => {
                open[p] = None;
                let (e, ret) = &mut out[i];
                e.complete_ns = Some(t);
                e.outcome = Outcome::Ok;
                *ret = Some(match &mut e.op {
                    Op::Write { .. } => RegRet::WriteOk,
                    Op::Read { value } => {
                        *value = (s.ret > 0).then_some(i64::from(s.ret));
                        RegRet::ReadOk(*value)
                    }
                    Op::Cas { .. } => {
                        if s.ret % 2 == 0 {
                            RegRet::CasOk
                        } else {
                            e.outcome = Outcome::Fail;
                            RegRet::CasFail
                        }
                    }
                });
            }
        }
    }
    out
}

/// stateright's verdict on the same history, events replayed in time order.
fn stateright_says(h: &[(Entry, Option<RegRet>)]) -> bool {
    let mut events: Vec<(u64, bool, usize)> = Vec::new();
    for (i, (e, _)) in h.iter().enumerate() {
        events.push((e.invoke_ns, true, i));
        if let Some(c) = e.complete_ns {
            events.push((c, false, i));
        }
    }
    events.sort();
    let mut tester = LinearizabilityTester::new(CasRegister::default());
    for (_, call, i) in events {
        let (e, ret) = &h[i];
        if call {
            let op = match e.op {
                Op::Write { value } => RegOp::Write(value),
                Op::Read { .. } => RegOp::Read,
                Op::Cas { expect, new } => RegOp::Cas(expect, new),
            };
            tester.on_invoke(e.process, op).expect("a valid history");
        } else {
            let ret = ret.clone().expect("a completed operation has its answer");
            tester.on_return(e.process, ret).expect("a valid history");
        }
    }
    tester.is_consistent()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn both_checkers_agree_on_small_histories(steps in prop::collection::vec(step(), 1..16)) {
        let h = build(&steps);
        let entries: Vec<Entry> = h.iter().map(|(e, _)| *e).collect();
        let ours = check_key(&entries, 1_000_000);
        prop_assert!(!matches!(ours, Verdict::Unknown(_)), "small histories are decided");
        let theirs = stateright_says(&h);
        prop_assert_eq!(
            ours == Verdict::Linearizable,
            theirs,
            "ours: {:?}; stateright linearizable: {}; history: {:#?}",
            ours,
            theirs,
            entries
        );
    }
}

/// The generator yields both verdicts, so agreement is not agreement on
/// "always linearizable".
#[test]
fn the_generator_makes_both_kinds_of_history() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut yes, mut no) = (0, 0);
    for _ in 0..500 {
        let steps = prop::collection::vec(step(), 1..16)
            .new_tree(&mut runner)
            .expect("a value")
            .current();
        let entries: Vec<Entry> = build(&steps).iter().map(|(e, _)| *e).collect();
        if check_key(&entries, 1_000_000) == Verdict::Linearizable {
            yes += 1;
        } else {
            no += 1;
        }
    }
    assert!(yes > 50 && no > 50, "linearizable {yes}, not {no}");
}
