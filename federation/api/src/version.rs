//! What version of causeway a process is, and which protocol it speaks.
//!
//! Every wire and disk format carries a version:
//!
//! | format | where the version is | this build |
//! |---|---|---|
//! | tunnel stream header | its version byte | 1 |
//! | gRPC API (incl. the catalog watch) | `protocol/N` in the user agent; `causeway-protocol` on answers | [`PROTOCOL`] |
//! | Raft messages between controllers | `RaftPayload.protocol` | [`PROTOCOL`] |
//! | Raft log and snapshots on disk | the data dir's `format` record | [`STORAGE_FORMAT`] |
//! | backups | the file's first line (`causeway-snapshot v1`) | 1 |
//! | policy documents | `apiVersion` | `causeway.dev/v1alpha1` |
//!
//! The promise (docs/operations.md, "Upgrades"): a build speaking protocol
//! N works with builds speaking N−1 ([`MIN_PROTOCOL`]) in both directions,
//! so a federation upgrades one process at a time. Something N−1 cannot
//! read is written only once nothing older than N runs: it is added in two
//! releases, read by one and written by the next.

/// This build's release version (the workspace version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The protocol this build speaks.
///
/// 1: every release up to 0.1.0 (which did not yet say so: a peer that
/// names no protocol speaks 1). 2: 0.2.0 — peers say their protocol.
pub const PROTOCOL: u32 = 2;

/// The oldest protocol this build works with.
pub const MIN_PROTOCOL: u32 = 1;

/// The storage format of a controller's data dir this build writes, and
/// the newest it reads.
pub const STORAGE_FORMAT: u32 = 1;

/// Response header naming the answering controller's protocol.
pub const PROTOCOL_HEADER: &str = "causeway-protocol";

/// Response header naming the answering controller's release.
pub const VERSION_HEADER: &str = "causeway-version";

/// The user agent causeway's gRPC clients send (tonic appends its own).
pub fn user_agent() -> String {
    format!("causeway/{VERSION} protocol/{PROTOCOL}")
}

/// The protocol a caller speaks, from its user agent: the number after
/// `protocol/`; 1 when it names none (builds before 0.2.0, other tools).
pub fn protocol_of_user_agent(ua: &str) -> u32 {
    ua.split_ascii_whitespace()
        .find_map(|t| t.strip_prefix("protocol/"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

/// A Raft payload's protocol: proto3 reads an absent field as 0, which is
/// what builds before 0.2.0 send.
pub fn protocol_of_payload(field: u32) -> u32 {
    field.max(1)
}

/// `Err` with what to do when a peer speaks a protocol this build no
/// longer works with. `who` names the peer ("this client", "controller 3").
pub fn check_peer(who: &str, protocol: u32) -> Result<(), String> {
    if protocol < MIN_PROTOCOL {
        return Err(format!(
            "{who} speaks causeway protocol {protocol}; this causeway {VERSION} (protocol {PROTOCOL}) works with {MIN_PROTOCOL} and newer: upgrade it first, one release at a time (docs/operations.md, Upgrades)"
        ));
    }
    Ok(())
}

impl crate::pb::RaftPayload {
    /// A payload from this build.
    pub fn new(data: Vec<u8>) -> Self {
        Self {
            data,
            protocol: PROTOCOL,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocol_is_read_from_the_user_agent() {
        assert_eq!(protocol_of_user_agent(&user_agent()), PROTOCOL);
        assert_eq!(
            protocol_of_user_agent("causeway/0.2.0 protocol/7 tonic/0.14"),
            7
        );
        // Builds before 0.2.0 sent tonic's own agent only.
        assert_eq!(protocol_of_user_agent("tonic/0.14.2"), 1);
        assert_eq!(protocol_of_user_agent("protocol/x"), 1);
        assert_eq!(protocol_of_user_agent(""), 1);
    }

    proptest::proptest! {
        /// Any user agent a client sends (HTTP bounds its size) names a
        /// protocol of at least 1, without panicking; one we wrote is read
        /// back wherever it sits among other tokens.
        #[test]
        fn any_user_agent_reads_as_some_protocol(
            before in "[ -~]{0,40}",
            after in "[ -~]{0,40}",
            n in 1u32..1000,
        ) {
            proptest::prop_assert!(protocol_of_user_agent(&before) >= 1 || before.contains("protocol/0"));
            let ua = format!("{} protocol/{n} {}", before.replace("protocol/", "p/"), after.replace("protocol/", "p/"));
            proptest::prop_assert_eq!(protocol_of_user_agent(&ua), n);
        }
    }

    #[test]
    fn an_absent_payload_protocol_is_one() {
        assert_eq!(protocol_of_payload(0), 1);
        assert_eq!(protocol_of_payload(2), 2);
    }

    #[test]
    fn a_peer_too_old_is_told_what_to_do() {
        assert!(check_peer("x", MIN_PROTOCOL).is_ok());
        assert!(
            check_peer("x", PROTOCOL + 1).is_ok(),
            "newer peers are served"
        );
        if MIN_PROTOCOL > 0 {
            let e = check_peer("this client", MIN_PROTOCOL - 1).unwrap_err();
            assert!(e.contains("upgrade it first"), "{e}");
        }
    }
}
