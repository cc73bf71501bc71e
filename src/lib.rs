//! The `causeway` binary's library: command-line handling, the admin port,
//! the operator client, and the local federation used by `causeway demo`
//! and the integration tests.

#![warn(missing_docs)]

pub mod admin;
pub mod check;
pub mod cli;
pub mod creds;
pub mod ctl;
pub mod ctl_admin;
pub mod ctl_traffic;
pub mod demo;
pub mod explain;
pub mod explain_l7;
pub mod kubernetes;
pub mod local;
pub mod rotate;
pub mod scrape;
pub mod signal;
pub mod ui;
