//! causeway-chaos: fault testing the Jepsen way. This crate holds what
//! judges a run — operation histories and the checkers that decide them
//! (linearizability of registers, per key) — as pure code with its own
//! tests; the harness that builds hosts in network namespaces and injects
//! faults drives a federation and records histories for it.

#![warn(missing_docs)]

pub mod history;
pub mod lin;
pub mod watch;
