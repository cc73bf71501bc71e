//! Status conditions as the Kubernetes API conventions want them: one per
//! type, `lastTransitionTime` moving only when the status changes, and
//! `observedGeneration` saying which spec they describe.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// A condition to set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    /// `Valid`, `Conflict`, ...
    pub type_: &'static str,
    /// True or False.
    pub status: bool,
    /// One CamelCase word.
    pub reason: &'static str,
    /// For people: what is wrong and how to fix it.
    pub message: String,
}

/// `existing` with `want` set for the object's `generation` at `now`: the
/// condition of the same type is replaced (keeping its
/// `lastTransitionTime` when the status is the same); others are kept.
pub fn set(
    existing: &[Condition],
    want: &Want,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let status = if want.status { "True" } else { "False" };
    let since = existing
        .iter()
        .find(|c| c.type_ == want.type_ && c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    let mut out: Vec<Condition> = existing
        .iter()
        .filter(|c| c.type_ != want.type_)
        .cloned()
        .collect();
    out.push(Condition {
        type_: want.type_.to_string(),
        status: status.to_string(),
        reason: want.reason.to_string(),
        message: want.message.clone(),
        observed_generation: generation,
        last_transition_time: since,
    });
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

/// Whether `existing` already says everything `wanted` says (so nothing
/// needs writing): the same conditions apart from transition times.
pub fn same(existing: &[Condition], wanted: &[Condition]) -> bool {
    let key = |c: &Condition| {
        (
            c.type_.clone(),
            c.status.clone(),
            c.reason.clone(),
            c.message.clone(),
            c.observed_generation,
        )
    };
    let mut a: Vec<_> = existing.iter().map(key).collect();
    let mut b: Vec<_> = wanted.iter().map(key).collect();
    a.sort();
    b.sort();
    a == b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn valid(status: bool, reason: &'static str) -> Want {
        Want {
            type_: "Valid",
            status,
            reason,
            message: format!("{reason}."),
        }
    }

    #[test]
    fn the_transition_time_moves_only_with_the_status() {
        let c1 = set(&[], &valid(false, "ServiceNotFound"), Some(1), at(0));
        assert_eq!(c1.len(), 1);
        assert_eq!(c1[0].status, "False");
        assert_eq!(c1[0].last_transition_time, Time(at(0)));
        // Same status, new reason and generation: the time stays.
        let c2 = set(&c1, &valid(false, "ServiceTypeInvalid"), Some(2), at(5));
        assert_eq!(c2[0].reason, "ServiceTypeInvalid");
        assert_eq!(c2[0].observed_generation, Some(2));
        assert_eq!(c2[0].last_transition_time, Time(at(0)));
        // The status flips: the time moves.
        let c3 = set(&c2, &valid(true, "Valid"), Some(2), at(9));
        assert_eq!(c3[0].status, "True");
        assert_eq!(c3[0].last_transition_time, Time(at(9)));
    }

    #[test]
    fn other_types_are_kept_and_sorted() {
        let c = set(&[], &valid(true, "Valid"), Some(1), at(0));
        let conflict = Want {
            type_: "Conflict",
            status: false,
            reason: "NoConflicts",
            message: "No conflicts.".into(),
        };
        let c = set(&c, &conflict, Some(1), at(1));
        let types: Vec<&str> = c.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Conflict", "Valid"]);
        assert!(same(&c, &c.iter().rev().cloned().collect::<Vec<_>>()));
        let changed = set(&c, &valid(false, "ServiceNotFound"), Some(1), at(2));
        assert!(!same(&c, &changed));
    }
}
