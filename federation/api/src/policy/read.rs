//! Readers for the fields of a policy document: each checks one field,
//! records what is wrong with its path, and goes on, so that one pass
//! reports every mistake.

use serde_json::{Map, Value};

use crate::model::{check_dns_label, SiteName};

/// Collects every problem in a document, each as `path: what is wrong`.
pub(super) struct Errors(pub(super) Vec<String>);

impl Errors {
    pub(super) fn push(&mut self, path: &str, msg: impl std::fmt::Display) {
        self.0.push(format!("{path}: {msg}"));
    }
}

pub(super) fn object<'a>(
    v: Option<&'a Value>,
    path: &str,
    allowed: &[&str],
    errs: &mut Errors,
) -> Option<&'a Map<String, Value>> {
    let v = match v {
        None | Some(Value::Null) => {
            errs.push(path, "required");
            return None;
        }
        Some(v) => v,
    };
    let Some(m) = v.as_object() else {
        errs.push(path, "must be a mapping");
        return None;
    };
    for k in m.keys() {
        if !allowed.contains(&k.as_str()) {
            errs.push(
                &format!("{path}.{k}"),
                format!("unknown field; expected one of {}", allowed.join(", ")),
            );
        }
    }
    Some(m)
}

pub(super) fn string(
    m: &Map<String, Value>,
    key: &str,
    path: &str,
    errs: &mut Errors,
) -> Option<String> {
    match m.get(key) {
        None | Some(Value::Null) => {
            errs.push(&format!("{path}.{key}"), "required");
            None
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            errs.push(&format!("{path}.{key}"), "must be a string");
            None
        }
    }
}

pub(super) fn label(
    m: &Map<String, Value>,
    key: &'static str,
    path: &str,
    errs: &mut Errors,
) -> Option<String> {
    let s = string(m, key, path, errs)?;
    match check_dns_label(key, &s) {
        Ok(()) => Some(s),
        Err(e) => {
            errs.push(&format!("{path}.{key}"), e);
            None
        }
    }
}

/// A number type a document field may hold, named as the errors say it.
pub(super) trait Bounded: Copy + PartialOrd + std::fmt::Display {
    /// "an integer" or "a number".
    const WHAT: &'static str;
    /// The value, if the JSON holds one of this type.
    fn from_json(v: &Value) -> Option<Self>;
}

impl Bounded for u64 {
    const WHAT: &'static str = "an integer";
    fn from_json(v: &Value) -> Option<Self> {
        v.as_u64()
    }
}

impl Bounded for f64 {
    const WHAT: &'static str = "a number";
    fn from_json(v: &Value) -> Option<Self> {
        v.as_f64()
    }
}

/// `m[key]` as a `T` within `range`; absent is `default` (or an error
/// when there is none).
pub(super) fn bounded<T: Bounded>(
    m: &Map<String, Value>,
    key: &str,
    path: &str,
    range: std::ops::RangeInclusive<T>,
    default: Option<T>,
    errs: &mut Errors,
) -> Option<T> {
    let p = format!("{path}.{key}");
    let (lo, hi, what) = (range.start(), range.end(), T::WHAT);
    match m.get(key) {
        None | Some(Value::Null) => {
            if default.is_none() {
                errs.push(&p, format!("required ({what} from {lo} to {hi})"));
            }
            default
        }
        Some(v) => match T::from_json(v).filter(|n| range.contains(n)) {
            Some(n) => Some(n),
            None => {
                errs.push(&p, format!("{v} is not {what} from {lo} to {hi}"));
                None
            }
        },
    }
}

/// A list of strings, each checked by `check`; absent is empty.
pub(super) fn strings(
    m: &Map<String, Value>,
    key: &str,
    path: &str,
    max: usize,
    check: impl Fn(&str) -> Result<(), String>,
    errs: &mut Errors,
) -> Vec<String> {
    let p = format!("{path}.{key}");
    let Some(v) = m.get(key).filter(|v| !v.is_null()) else {
        return Vec::new();
    };
    let Some(items) = v.as_array() else {
        errs.push(&p, "must be a list");
        return Vec::new();
    };
    if items.len() > max {
        errs.push(&p, format!("at most {max} entries"));
    }
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let ip = format!("{p}[{i}]");
        match item.as_str() {
            None => errs.push(&ip, "must be a string"),
            Some(s) => match check(s) {
                Err(e) => errs.push(&ip, e),
                Ok(()) if out.iter().any(|o| o == s) => {
                    errs.push(&ip, format!("{s:?} is listed twice"))
                }
                Ok(()) => out.push(s.to_string()),
            },
        }
    }
    out
}

pub(super) fn site_name(s: &str) -> Result<(), String> {
    s.parse::<SiteName>().map(|_| ()).map_err(|e| e.to_string())
}
