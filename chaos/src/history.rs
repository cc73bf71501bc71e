//! Operation histories: what each client asked, when, and what it was told.

use serde::{Deserialize, Serialize};

/// What one operation did to a register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "f", rename_all = "lowercase")]
pub enum Op {
    /// Set the value.
    Write {
        /// The value written.
        value: i64,
    },
    /// Read the value; `value` is what was returned (`None`: absent).
    /// Unknown for a read whose answer never came (it is then ignored).
    Read {
        /// What the read returned.
        value: Option<i64>,
    },
    /// Compare-and-set: if the value is `expect`, set `new`.
    Cas {
        /// The value compared against.
        expect: i64,
        /// The value set when it matches.
        new: i64,
    },
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// It took effect (for a CAS: it matched and set).
    Ok,
    /// It certainly did not take effect (for a CAS: it did not match; for
    /// others: refused before anything was written).
    Fail,
    /// Unknown: it may or may not have taken effect (timeout, lost
    /// connection).
    Info,
}

/// One operation of one client on one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Which client (a client runs one operation at a time).
    pub process: u32,
    /// The register.
    pub key: u32,
    /// What it did.
    pub op: Op,
    /// How it ended.
    pub outcome: Outcome,
    /// When it was invoked (ns from the run's start).
    pub invoke_ns: u64,
    /// When its answer came (ns); `None` for an operation that never
    /// completed (then `outcome` is `Info`).
    pub complete_ns: Option<u64>,
}
