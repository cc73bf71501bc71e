//! Backups of the federation state, and restoring a new cluster from one
//! (as `etcdctl snapshot save` and `etcdutl snapshot restore` do).
//!
//! A backup file is a header line, a JSON line describing the body, and the
//! body — the whole catalog state (sites and their trust bundles, credential
//! records and revocations, exports, policies, join tokens) as JSON:
//!
//! ```text
//! causeway-snapshot v1
//! {"format":1,"revision":812,"created_ms":…,"node_id":2,"bytes":40211,"sha256":"…"}
//! <bytes of state>
//! ```
//!
//! [`decode`] checks everything before anything is used: the magic, a
//! header of bounded size, the body's exact length and its SHA-256, and
//! that the body is a state this version understands. A damaged or cut
//! file is refused with what is wrong and what to do.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::state::CatalogState;
use crate::NodeId;

/// The first line of every backup.
pub const MAGIC: &[u8] = b"causeway-snapshot v1\n";
/// The longest description line accepted.
const MAX_HEADER: usize = 4096;
/// The largest body accepted (a federation's state is megabytes; this
/// bounds what a damaged length field can make a reader allocate).
pub const MAX_BODY: u64 = 1 << 30;
/// The body format this version writes and reads.
const FORMAT: u32 = 1;

/// What a backup says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The body's format.
    pub format: u32,
    /// The catalog revision the state is at.
    pub revision: u64,
    /// When it was taken (ms since the epoch).
    pub created_ms: u64,
    /// The controller node that served it (the leader).
    pub node_id: u64,
    /// The body's length.
    pub bytes: u64,
    /// The body's SHA-256, hex.
    pub sha256: String,
}

/// Why a file is not a usable backup.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// No magic line.
    #[error("not a causeway snapshot (it does not start with \"causeway-snapshot v1\"); pass a file written by `causeway ctl snapshot save`")]
    NotASnapshot,
    /// The description line is missing, too long or not understood.
    #[error("the snapshot's header is damaged ({0}); use another copy of the backup")]
    BadHeader(String),
    /// A format this version does not know.
    #[error("the snapshot has format {0}, this causeway reads format {FORMAT}; restore it with the causeway version that saved it")]
    Format(u32),
    /// The body is longer than any state can be.
    #[error("the snapshot claims a body of {0} bytes, over the {MAX_BODY}-byte bound; the header is damaged")]
    TooLarge(u64),
    /// Fewer or more bytes than the header says.
    #[error("the snapshot is truncated or padded: the header says {want} bytes of state, the file has {have}; copy the whole file again")]
    Length {
        /// What the header says.
        want: u64,
        /// What the file has.
        have: u64,
    },
    /// The body's checksum does not match.
    #[error("the snapshot is damaged: its SHA-256 is {have}, the header says {want}; use another copy of the backup")]
    Checksum {
        /// What the header says.
        want: String,
        /// What the body hashes to.
        have: String,
    },
    /// The body is not a state.
    #[error("the snapshot's state cannot be read ({0})")]
    State(String),
}

/// The backup of `state`.
pub fn encode(state: &CatalogState, node_id: NodeId, created_ms: u64) -> anyhow::Result<Vec<u8>> {
    let body = serde_json::to_vec(state).context("encoding the state")?;
    let header = Header {
        format: FORMAT,
        revision: state.revision,
        created_ms,
        node_id,
        bytes: body.len() as u64,
        sha256: hex::encode(Sha256::digest(&body)),
    };
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&serde_json::to_vec(&header)?);
    out.push(b'\n');
    out.extend_from_slice(&body);
    Ok(out)
}

/// Checks a backup and reads its state.
pub fn decode(file: &[u8]) -> Result<(Header, CatalogState), BackupError> {
    let rest = file.strip_prefix(MAGIC).ok_or(BackupError::NotASnapshot)?;
    let window = &rest[..rest.len().min(MAX_HEADER + 1)];
    let end = window
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| BackupError::BadHeader("no end of the header line".into()))?;
    let header: Header =
        serde_json::from_slice(&rest[..end]).map_err(|e| BackupError::BadHeader(e.to_string()))?;
    if header.format != FORMAT {
        return Err(BackupError::Format(header.format));
    }
    if header.bytes > MAX_BODY {
        return Err(BackupError::TooLarge(header.bytes));
    }
    let body = &rest[end + 1..];
    if body.len() as u64 != header.bytes {
        return Err(BackupError::Length {
            want: header.bytes,
            have: body.len() as u64,
        });
    }
    let have = hex::encode(Sha256::digest(body));
    if have != header.sha256 {
        return Err(BackupError::Checksum {
            want: header.sha256.clone(),
            have,
        });
    }
    let state: CatalogState =
        serde_json::from_slice(body).map_err(|e| BackupError::State(e.to_string()))?;
    if state.revision != header.revision {
        return Err(BackupError::State(format!(
            "its revision {} is not the header's {}",
            state.revision, header.revision
        )));
    }
    Ok((header, state))
}

/// Builds node `node_id`'s data directory `dir` for a new cluster of
/// `members` (id → address) whose state starts as the backup's: the
/// backup becomes the node's snapshot, its log starts empty after it, and
/// the membership is `members` (a new cluster: nothing of the old one's
/// membership or log is kept). Every member is restored from the same file;
/// started, they elect a leader among themselves. `dir` must not hold data.
pub fn restore(
    dir: &Path,
    node_id: NodeId,
    members: &BTreeMap<NodeId, String>,
    file: &[u8],
) -> anyhow::Result<Header> {
    let (header, mut state) = decode(file)?;
    // A new cluster identity, the same on every member restored from this
    // file for this membership: watchers of the old cluster start over.
    let mut h = Sha256::new();
    h.update(header.sha256.as_bytes());
    for (id, addr) in members {
        h.update(format!("{id}={addr};").as_bytes());
    }
    let digest = h.finalize();
    let mut epoch = [0u8; 8];
    epoch.copy_from_slice(&digest[..8]);
    state.epoch = u64::from_le_bytes(epoch) | 1;
    if !members.contains_key(&node_id) {
        anyhow::bail!("--peer: the members must include this node (id {node_id})");
    }
    if let Ok(mut entries) = std::fs::read_dir(dir) {
        if entries.next().is_some() {
            anyhow::bail!(
                "--data-dir {} is not empty; restore into an empty directory (move the old one aside first)",
                dir.display()
            );
        }
    }
    let storage = crate::store::open(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::store::seed(&storage.db, &state, members)?;
    Ok(header)
}

/// What [`force_new_cluster`] did.
#[derive(Debug)]
pub struct Recovered {
    /// The catalog revision the new cluster starts at.
    pub revision: u64,
    /// The last log index that was replayed.
    pub last_index: u64,
    /// Where the node's old data was moved.
    pub kept: std::path::PathBuf,
}

/// Quorum loss: makes node `node_id`'s data directory `dir` the start of a
/// new one-node cluster at `addr`, holding what its own data holds (its
/// snapshot and every entry of its log, applied — entries the lost
/// majority never confirmed included; writes it never received are gone).
/// The old data is moved aside, not deleted. The node must be stopped.
pub fn force_new_cluster(dir: &Path, node_id: NodeId, addr: &str) -> anyhow::Result<Recovered> {
    let storage = crate::store::open(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    if storage.log.is_pristine()? {
        anyhow::bail!(
            "--data-dir {} holds no cluster data; recover from a node that was a member",
            dir.display()
        );
    }
    let (mut state, last_index) = crate::store::replay(&storage)?;
    drop(storage);
    state.epoch = rand::random::<u64>() | 1;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    let kept = dir.with_file_name(format!("{name}.pre-recover-{stamp}"));
    std::fs::rename(dir, &kept)
        .with_context(|| format!("moving {} aside to {}", dir.display(), kept.display()))?;
    let storage = crate::store::open(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let members: BTreeMap<NodeId, String> = [(node_id, addr.to_string())].into();
    crate::store::seed(&storage.db, &state, &members)?;
    Ok(Recovered {
        revision: state.revision,
        last_index,
        kept,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::state::Command;

    fn state() -> CatalogState {
        let mut s = CatalogState::default();
        s.apply(Command::CreateJoinToken {
            token_id: "t".into(),
            secret_sha256: "h".into(),
            site: "east".parse().unwrap(),
            labels: BTreeMap::new(),
            expires_at_ms: 10,
            now_ms: 0,
        });
        s.apply(Command::JoinSite {
            token_id: "t".into(),
            secret_sha256: "h".into(),
            now_ms: 1,
            site: "east".parse().unwrap(),
            trust_domain: "east.causeway".parse().unwrap(),
            trust_bundle_pem: String::new(),
            tunnel_addrs: vec![],
            credential_sha256: None,
        });
        s
    }

    #[test]
    fn a_backup_round_trips_and_damage_is_named() {
        let s = state();
        let file = encode(&s, 2, 99).unwrap();
        let (h, back) = decode(&file).unwrap();
        assert_eq!((h.revision, h.node_id, h.created_ms), (s.revision, 2, 99));
        assert_eq!(back, s);

        let cut = &file[..file.len() - 3];
        assert!(matches!(decode(cut), Err(BackupError::Length { .. })));
        let mut flipped = file.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0x20;
        let e = decode(&flipped).unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
        assert!(matches!(
            decode(b"{\"sites\":{}}"),
            Err(BackupError::NotASnapshot)
        ));
        let mut big = MAGIC.to_vec();
        big.extend_from_slice(br#"{"format":1,"revision":0,"created_ms":0,"node_id":1,"bytes":99999999999,"sha256":""}"#);
        big.push(b'\n');
        assert!(matches!(decode(&big), Err(BackupError::TooLarge(_))));
    }

    #[test]
    fn restore_refuses_a_used_directory_and_a_foreign_member_list() {
        let tmp = tempfile::tempdir().unwrap();
        let file = encode(&state(), 1, 0).unwrap();
        let members: BTreeMap<NodeId, String> = [(1, "127.0.0.1:1".to_string())].into();
        let e = restore(tmp.path(), 2, &members, &file).unwrap_err();
        assert!(e.to_string().contains("must include this node"), "{e}");
        std::fs::write(tmp.path().join("x"), b"").unwrap();
        let e = restore(tmp.path(), 1, &members, &file).unwrap_err();
        assert!(e.to_string().contains("not empty"), "{e}");
    }

    proptest! {
        /// Whatever bytes arrive, decoding answers (never panics), and a
        /// change to any single byte of a good backup is refused — the
        /// checksum and length leave no byte unchecked.
        #[test]
        fn any_damage_is_refused(at in any::<prop::sample::Index>(), xor in 1u8..=255) {
            let file = encode(&state(), 1, 0).unwrap();
            let mut bad = file.clone();
            let i = at.index(bad.len());
            bad[i] ^= xor;
            // Only a flip in the description line's fields that do not
            // guard the body (e.g. a digit of created_ms) may still read,
            // and then the state read is the original.
            if let Ok((_, s)) = decode(&bad) {
                let line_end = MAGIC.len()
                    + file[MAGIC.len()..].iter().position(|b| *b == b'\n').unwrap();
                prop_assert!(i < line_end, "a changed body byte {} was accepted", i);
                prop_assert_eq!(s, state());
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut file = MAGIC.to_vec();
            file.extend_from_slice(&bytes);
            let _ = decode(&file);
            let _ = decode(&bytes);
        }
    }
}
