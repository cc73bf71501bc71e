//! causeway-federation: the federation controller.
//!
//! An openraft node whose state machine is the catalog ([`state`]), with a
//! durable log in segment files ([`wal`]) and vote, snapshot and metadata in
//! redb ([`store`]), Raft RPCs over mTLS gRPC ([`network`]), and
//! the `Federation` API ([`service`]) that sites, DNS servers and operators
//! call. [`node`] wires them together for `causeway controller`.

#![warn(missing_docs)]

use std::io::Cursor;

pub mod backup;
pub mod config;
pub mod hub;
pub mod lease;
pub mod network;
pub mod node;
pub mod service;
pub mod state;
pub mod store;
pub mod wal;

/// A controller node's Raft id.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// openraft's type configuration for the catalog.
    pub TypeConfig:
        D = state::Command,
        R = state::Outcome,
);

/// An openraft node over the catalog.
pub type Raft = openraft::Raft<TypeConfig>;

/// How many bytes `value` takes as JSON (the encoding of log entries and
/// Raft RPCs), counted without building it.
pub fn json_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    // Serializing plain data into a counter cannot fail.
    let _ = serde_json::to_writer(&mut c, value);
    c.0
}
