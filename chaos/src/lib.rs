//! causeway-chaos: fault testing the Jepsen way. A harness builds hosts as
//! network namespaces ([`net`]), runs a federation on them ([`cluster`]),
//! drives workloads that record what they were told ([`workload`]) while a
//! nemesis injects faults ([`nemesis`]), and judges the records: register
//! histories for linearizability ([`lin`]), watch streams for order
//! ([`watch`]), acknowledged writes for loss and data-plane calls for
//! attribution to a fault ([`runner`]).

#![warn(missing_docs)]

pub mod cluster;
pub mod history;
pub mod lin;
pub mod nemesis;
pub mod net;
pub mod runner;
pub mod sys;
pub mod watch;
pub mod workload;
