//! A linearizability checker for registers (read, write, compare-and-set),
//! after Wing & Gong with Lowe's memoization (the algorithm Porcupine and
//! Knossos build on), one key at a time: a history is linearizable when
//! the registers are independent and each key's history is.
//!
//! The search walks the history's call and return events in time order.
//! At a call it tries to linearize that operation now (the register's
//! model must accept it); at a return of an operation not yet linearized it
//! backtracks — that operation had to take effect before it returned. A
//! set of (operations linearized, register state) already explored is
//! remembered, so each is tried once. Operations whose outcome is unknown
//! (`Info`) return at infinity: they may take effect at any point after
//! their call, including after everything else (which is "never" for an
//! observer); a failed operation (`Fail`) took no effect and is left out,
//! except a failed CAS, which observed a value other than the expected one.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use crate::history::{Entry, Op, Outcome};

/// A register's value: `None` before the first write.
type State = Option<i64>;

/// What the model says about `op` ending with `outcome` in `state`: the
/// state after it, or `None` when that cannot happen.
fn step(state: State, op: Op, outcome: Outcome) -> Option<State> {
    match (op, outcome) {
        (Op::Write { value }, _) => Some(Some(value)),
        (Op::Read { value }, _) => (state == value).then_some(state),
        (Op::Cas { expect, new }, Outcome::Ok) => (state == Some(expect)).then_some(Some(new)),
        (Op::Cas { expect, .. }, Outcome::Fail) => (state != Some(expect)).then_some(state),
        (Op::Cas { expect, new }, Outcome::Info) => Some(if state == Some(expect) {
            Some(new)
        } else {
            state
        }),
    }
}

/// One call or return event of the walk, in a doubly linked list whose
/// node 0 is a sentinel before the first event.
#[derive(Debug, Clone, Copy, Default)]
struct Event {
    op: usize,
    call: bool,
    /// For a call: the node of its return.
    matching: usize,
    prev: usize,
    next: Option<usize>,
}

/// The verdict on one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A linearization exists.
    Linearizable,
    /// None exists; the operations (indices into the key's history) of
    /// the longest prefix that could be linearized, and an operation that
    /// had to come next but could not.
    Violation {
        /// Operations of the deepest partial linearization, in order.
        linearized: Vec<usize>,
        /// The operation whose return came before it could be placed.
        stuck_at: usize,
    },
    /// The search gave up after this many steps (too large a history).
    Unknown(u64),
}

fn unlink(events: &mut [Event], k: usize) {
    let (p, nx) = (events[k].prev, events[k].next);
    events[p].next = nx;
    if let Some(nx) = nx {
        events[nx].prev = p;
    }
}

fn relink(events: &mut [Event], k: usize) {
    let (p, nx) = (events[k].prev, events[k].next);
    events[p].next = Some(k);
    if let Some(nx) = nx {
        events[nx].prev = k;
    }
}

/// Checks one key's history (operations that certainly took no effect —
/// failed writes, and reads without an answer — may be in it; they are
/// left out).
///
/// The history is cut where nothing is in flight (every operation so far
/// has returned before the next is called) and the pieces are searched in
/// turn, each from every state the pieces before it can end in: a long
/// history of short operations costs the sum of its pieces, not their
/// product.
pub fn check_key(history: &[Entry], max_steps: u64) -> Verdict {
    let mut ops: Vec<(usize, &Entry)> = history
        .iter()
        .enumerate()
        .filter(|(_, e)| match (e.op, e.outcome) {
            (Op::Cas { .. }, _) => true,
            (Op::Read { .. }, outcome) => outcome == Outcome::Ok,
            (Op::Write { .. }, outcome) => outcome != Outcome::Fail,
        })
        .collect();
    ops.sort_by_key(|(i, e)| (e.invoke_ns, *i));
    let mut pieces: Vec<&[(usize, &Entry)]> = Vec::new();
    let (mut from, mut last_return) = (0, 0u64);
    for (k, (_, e)) in ops.iter().enumerate() {
        if k > from && e.invoke_ns > last_return {
            pieces.push(&ops[from..k]);
            from = k;
        }
        last_return = last_return.max(return_time(e));
    }
    if from < ops.len() {
        pieces.push(&ops[from..]);
    }
    let mut states: BTreeSet<State> = BTreeSet::from([None]);
    let mut budget = max_steps;
    for (n, piece) in pieces.iter().enumerate() {
        let last = n + 1 == pieces.len();
        let mut next = BTreeSet::new();
        let mut violation = None;
        for s in &states {
            match search(piece, *s, !last, &mut budget) {
                Ok(finals) => {
                    next.extend(finals);
                    if last {
                        return Verdict::Linearizable;
                    }
                }
                Err(Verdict::Unknown(_)) => return Verdict::Unknown(max_steps),
                Err(v) => violation = Some(v),
            }
        }
        if next.is_empty() {
            return violation.unwrap_or(Verdict::Unknown(max_steps - budget));
        }
        states = next;
    }
    Verdict::Linearizable
}

/// When an operation returned, for the search: never, for an unknown
/// outcome.
fn return_time(e: &Entry) -> u64 {
    match (e.outcome, e.complete_ns) {
        (Outcome::Info, _) | (_, None) => u64::MAX,
        (_, Some(t)) => t.max(e.invoke_ns),
    }
}

/// Searches linearizations of `ops` from `init`: the states they can end
/// in (all of them with `all`, else the first found), or why none exists.
/// Takes steps from `budget`.
fn search(
    ops: &[(usize, &Entry)],
    init: State,
    all: bool,
    budget: &mut u64,
) -> Result<BTreeSet<State>, Verdict> {
    let n = ops.len();
    let mut finals = BTreeSet::new();
    if n == 0 {
        finals.insert(init);
        return Ok(finals);
    }
    // Events by time; at equal times calls first (the more permissive
    // order: operations that touch may go either way).
    let mut times: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, (_, e)) in ops.iter().enumerate() {
        times.push((e.invoke_ns, true, i));
        times.push((return_time(e), false, i));
    }
    times.sort_by_key(|(t, call, i)| (*t, !*call, *i));
    let mut events = vec![Event::default(); 2 * n + 1];
    let mut ret_node = vec![0usize; n];
    for (k, (_, call, i)) in times.iter().enumerate() {
        let node = k + 1;
        if !call {
            ret_node[*i] = node;
        }
        events[node] = Event {
            op: *i,
            call: *call,
            matching: 0,
            prev: node - 1,
            next: (node < 2 * n).then_some(node + 1),
        };
    }
    events[0].next = Some(1);
    for node in 1..=2 * n {
        if events[node].call {
            events[node].matching = ret_node[events[node].op];
        }
    }

    let mut linearized = vec![0u64; n.div_ceil(64)];
    let mut seen: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut state: State = init;
    let mut cursor = events[0].next;
    let mut deepest: Vec<usize> = Vec::new();
    let mut stuck_at = 0usize;
    loop {
        let backtrack = if events[0].next.is_none() {
            // Everything placed: one linearization, ending in `state`.
            finals.insert(state);
            if !all {
                break;
            }
            true
        } else {
            if *budget == 0 {
                return Err(Verdict::Unknown(u64::MAX));
            }
            *budget -= 1;
            // The list ends with a return, so a call always has a next event.
            let k = cursor.expect("a call is followed by its return");
            let ev = events[k];
            let (_, entry) = ops[ev.op];
            if ev.call {
                if let Some(s) = step(state, entry.op, entry.outcome) {
                    let bit = 1u64 << (ev.op % 64);
                    linearized[ev.op / 64] |= bit;
                    if seen.insert((linearized.clone(), s)) {
                        stack.push((k, state));
                        state = s;
                        unlink(&mut events, k);
                        unlink(&mut events, ev.matching);
                        cursor = events[0].next;
                        continue;
                    }
                    linearized[ev.op / 64] &= !bit;
                }
                cursor = ev.next;
                false
            } else {
                // The return of an operation not linearized: it had to take
                // effect before now. Undo the last choice and try the next.
                if stack.len() >= deepest.len() {
                    deepest = stack.iter().map(|(c, _)| events[*c].op).collect();
                    stuck_at = ev.op;
                }
                true
            }
        };
        if backtrack {
            let Some((c, s)) = stack.pop() else {
                break;
            };
            let call = events[c];
            relink(&mut events, call.matching);
            relink(&mut events, c);
            linearized[call.op / 64] &= !(1u64 << (call.op % 64));
            state = s;
            cursor = events[c].next;
        }
    }
    if finals.is_empty() {
        return Err(Verdict::Violation {
            linearized: deepest.iter().map(|i| ops[*i].0).collect(),
            stuck_at: ops[stuck_at].0,
        });
    }
    Ok(finals)
}

/// What an operation wrote, if it writes.
fn written(op: &Op) -> Option<i64> {
    match op {
        Op::Write { value } => Some(*value),
        Op::Cas { new, .. } => Some(*new),
        Op::Read { .. } => None,
    }
}

/// Narrows the unknown operations of a history whose written values are
/// unique (each write its own value), which is what makes big histories
/// with many timeouts checkable:
///
/// - an unknown write whose value some answer saw (a read returned it, or
///   a compare-and-set expecting it succeeded) certainly took effect, and
///   before the first of those answers completed: it becomes a completed
///   write with that completion time;
/// - an unknown write whose value nobody saw is left out, i.e. taken not
///   to have happened — one of the two outcomes it may have had.
///
/// A linearization of the result is one of the original history, so
/// "linearizable" here is a sound verdict for the original. (The reverse
/// does not hold for left-out writes; [`check`] then decides the original.)
pub fn tighten(history: &[Entry]) -> Vec<Entry> {
    let mut seen_by: BTreeMap<i64, u64> = BTreeMap::new();
    for e in history {
        let observed = match (e.op, e.outcome) {
            (Op::Read { value: Some(v) }, Outcome::Ok) => Some(v),
            (Op::Cas { expect, .. }, Outcome::Ok) => Some(expect),
            _ => None,
        };
        if let (Some(v), Some(done)) = (observed, e.complete_ns) {
            let first = seen_by.entry(v).or_insert(done);
            *first = (*first).min(done);
        }
    }
    history
        .iter()
        .filter_map(|e| {
            if e.outcome != Outcome::Info {
                return Some(*e);
            }
            let seen = seen_by.get(&written(&e.op)?)?;
            Some(Entry {
                outcome: Outcome::Ok,
                complete_ns: Some(e.complete_ns.map_or(*seen, |c| c.min(*seen))),
                ..*e
            })
        })
        .collect()
}

/// Checks a whole history whose written values are unique, key by key: the
/// verdict of every key that is not linearizable (or could not be decided),
/// by key. Each key is first checked [`tighten`]ed; only when that finds no
/// linearization is the original searched.
pub fn check(history: &[Entry], max_steps: u64) -> BTreeMap<u32, Verdict> {
    let mut by_key: BTreeMap<u32, Vec<Entry>> = BTreeMap::new();
    for e in history {
        by_key.entry(e.key).or_default().push(*e);
    }
    by_key
        .into_iter()
        .map(|(k, h)| {
            let v = match check_key(&tighten(&h), max_steps) {
                Verdict::Linearizable => Verdict::Linearizable,
                _ => check_key(&h, max_steps),
            };
            (k, v)
        })
        .filter(|(_, v)| *v != Verdict::Linearizable)
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn e(process: u32, op: Op, outcome: Outcome, invoke: u64, complete: Option<u64>) -> Entry {
        Entry {
            process,
            key: 0,
            op,
            outcome,
            invoke_ns: invoke,
            complete_ns: complete,
        }
    }
    fn w(p: u32, v: i64, a: u64, b: u64) -> Entry {
        e(p, Op::Write { value: v }, Outcome::Ok, a, Some(b))
    }
    fn r(p: u32, v: Option<i64>, a: u64, b: u64) -> Entry {
        e(p, Op::Read { value: v }, Outcome::Ok, a, Some(b))
    }
    fn ok(h: &[Entry]) -> bool {
        check_key(h, 1_000_000) == Verdict::Linearizable
    }

    #[test]
    fn tightening_bounds_seen_unknown_writes_and_drops_unseen_ones() {
        let info = |p, v, a| e(p, Op::Write { value: v }, Outcome::Info, a, None);
        let h = vec![
            info(0, 1, 0),
            r(1, Some(1), 5, 9),
            r(2, Some(1), 6, 7),
            info(3, 2, 10),
        ];
        let t = tighten(&h);
        assert_eq!(t.len(), 3, "the unseen write 2 is left out: {t:?}");
        assert_eq!(t[0].outcome, Outcome::Ok);
        assert_eq!(
            t[0].complete_ns,
            Some(7),
            "before the first read that saw it"
        );
        assert!(ok(&t));
        assert!(check(&h, 1_000_000).is_empty());
    }

    #[test]
    fn tightening_keeps_a_violation_a_violation() {
        // 2 is written after 1 was acknowledged, then 1 is read back after
        // a read of 2 completed: no order explains it, with or without
        // the unknown write of 3.
        let h = vec![
            w(0, 1, 0, 1),
            w(0, 2, 2, 3),
            r(1, Some(2), 4, 5),
            r(1, Some(1), 6, 7),
            e(2, Op::Write { value: 3 }, Outcome::Info, 0, None),
        ];
        let v = check(&h, 1_000_000);
        assert!(
            matches!(v.get(&0), Some(Verdict::Violation { .. })),
            "{v:?}"
        );
    }

    #[test]
    fn sequential_and_overlapping_histories_that_can_be_ordered_pass() {
        assert!(ok(&[]));
        assert!(ok(&[w(0, 1, 0, 10), r(1, Some(1), 20, 30)]));
        assert!(ok(&[r(1, None, 0, 5), w(0, 1, 10, 20)]));
        // A read overlapping a write may see either value.
        assert!(ok(&[
            w(0, 1, 0, 10),
            w(0, 2, 20, 40),
            r(1, Some(1), 25, 30)
        ]));
        assert!(ok(&[
            w(0, 1, 0, 10),
            w(0, 2, 20, 40),
            r(1, Some(2), 25, 30)
        ]));
        // A write whose answer never came may show up later, or never.
        let lost = e(0, Op::Write { value: 9 }, Outcome::Info, 0, None);
        assert!(ok(&[lost, r(1, Some(9), 50, 60)]));
        assert!(ok(&[lost, r(1, None, 50, 60)]));
        // A failed write took no effect.
        let refused = e(0, Op::Write { value: 9 }, Outcome::Fail, 0, Some(5));
        assert!(ok(&[refused, r(1, None, 50, 60)]));
        // CAS: a match sets, a miss observes another value.
        let cas = |p, x, y, out, a, b| e(p, Op::Cas { expect: x, new: y }, out, a, Some(b));
        assert!(ok(&[
            w(0, 1, 0, 10),
            cas(1, 1, 2, Outcome::Ok, 20, 30),
            cas(2, 1, 3, Outcome::Fail, 40, 50),
            r(0, Some(2), 60, 70)
        ]));
    }

    #[test]
    fn known_violations_are_flagged() {
        // A stale read after a completed write.
        let h = [w(0, 1, 0, 10), r(1, None, 20, 30)];
        assert!(matches!(
            check_key(&h, 1_000_000),
            Verdict::Violation { stuck_at: 1, .. }
        ));
        // An acknowledged write lost: the later read sees the one before.
        assert!(!ok(&[
            w(0, 1, 0, 10),
            w(0, 2, 20, 30),
            r(1, Some(1), 40, 50)
        ]));
        // Two reads that order the same writes both ways.
        assert!(!ok(&[
            w(0, 1, 0, 100),
            w(1, 2, 0, 100),
            r(2, Some(1), 110, 120),
            r(3, Some(2), 130, 140),
            r(2, Some(1), 150, 160),
        ]));
        // Two CAS from the same expected value both succeeding.
        let cas = |p, out, a, b| {
            e(
                p,
                Op::Cas {
                    expect: 1,
                    new: 2 + i64::from(p),
                },
                out,
                a,
                Some(b),
            )
        };
        assert!(!ok(&[
            w(0, 1, 0, 10),
            cas(1, Outcome::Ok, 20, 30),
            cas(2, Outcome::Ok, 40, 50)
        ]));
        // A value nobody wrote.
        assert!(!ok(&[w(0, 1, 0, 10), r(1, Some(7), 20, 30)]));
    }

    #[test]
    fn keys_are_checked_apart_and_big_searches_give_up() {
        let mut h = vec![w(0, 1, 0, 10), r(1, Some(1), 20, 30)];
        let mut other = r(2, Some(5), 40, 50);
        other.key = 7;
        h.push(other);
        let bad = check(&h, 1_000_000);
        assert_eq!(bad.keys().copied().collect::<Vec<_>>(), vec![7]);
        // Many concurrent writes and a read of none of them: the search
        // space is large; a tiny budget says so instead of hanging.
        let mut h: Vec<Entry> = (0..40).map(|i| w(i, i64::from(i), 0, 1000)).collect();
        h.push(r(99, Some(-1), 2000, 2001));
        assert!(matches!(check_key(&h, 50), Verdict::Unknown(_)));
    }

    proptest! {
        /// A history made by running operations one at a time against a
        /// real register, each given an interval around its effect, is
        /// always linearizable; a read changed to a value never written is
        /// not.
        #[test]
        fn histories_from_a_real_register_pass_and_corrupted_ones_fail(
            ops in proptest::collection::vec((0u8..3, 0i64..4, 0u64..150, 0u64..150), 1..14),
        ) {
            let mut value: Option<i64> = None;
            let mut h = Vec::new();
            for (i, (kind, v, before, after)) in ops.iter().enumerate() {
                // The effect happens at time 100 * i; the interval around it
                // (neighbours overlap, so the checker must find the order).
                let at = 100 * i as u64 + 200;
                let (op, outcome) = match kind {
                    0 => { value = Some(*v); (Op::Write { value: *v }, Outcome::Ok) }
                    1 => (Op::Read { value }, Outcome::Ok),
                    _ => {
                        let hit = value == Some(*v);
                        if hit { value = Some(v + 1); }
                        (Op::Cas { expect: *v, new: v + 1 }, if hit { Outcome::Ok } else { Outcome::Fail })
                    }
                };
                h.push(e(i as u32, op, outcome, at - before, Some(at + after)));
            }
            prop_assert_eq!(check_key(&h, 10_000_000), Verdict::Linearizable);
            if let Some(i) = h.iter().rposition(|x| matches!(x.op, Op::Read { .. })) {
                // Make the read return a value no operation ever wrote, and
                // move it after everything else.
                h[i].op = Op::Read { value: Some(1_000) };
                let ok_now = check_key(&h, 10_000_000) == Verdict::Linearizable;
                prop_assert!(!ok_now);
            }
        }
    }
}
