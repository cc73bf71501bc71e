//! Durable Raft storage. The log lives in append-only segment files
//! ([`crate::wal`]): one `write` and one `fdatasync` per append. The vote,
//! the purge point and the latest snapshot live in redb, committed with
//! immediate durability. Every write openraft relies on is on disk before
//! it is acknowledged. The state machine itself lives in memory and is
//! rebuilt on start from the snapshot plus the committed log.
//!
//! [`open`] reads and checks everything before Raft starts, so a node with
//! damaged data finds out before it can vote or lead.

// openraft's StorageError is large, and its storage traits return it.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, Durability, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::hub::Hub;
use crate::state::{CatalogState, Outcome};
use crate::wal::{Wal, WalError};
use crate::{NodeId, TypeConfig};
use causeway_api::sync::LockExt;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

type Result<T> = std::result::Result<T, StorageError<NodeId>>;
type Node = openraft::BasicNode;

fn io_err<E: std::error::Error + 'static>(e: E) -> StorageError<NodeId> {
    StorageIOError::write(&e).into()
}

fn read_err<E: std::error::Error + 'static>(e: E) -> StorageError<NodeId> {
    StorageIOError::read(&e).into()
}

/// A node's storage, opened and checked.
pub struct Storage {
    /// The vote, purge point and snapshot.
    pub db: Arc<Database>,
    /// The Raft log.
    pub log: LogStore,
}

/// Why storage could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The node's own data is damaged: it must not take part in Raft.
    #[error("{0}")]
    Corrupt(String),
    /// Anything else (I/O, a bad path).
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Opens (or creates) the node's storage under `dir` (`raft.redb` and the
/// `log/` segments) and checks all of it: every log record, the vote, the
/// purge point and the snapshot.
pub fn open(dir: &Path) -> std::result::Result<Storage, OpenError> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    let path = dir.join("raft.redb");
    let db = Database::create(&path).map_err(|e| match e {
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(why)) => {
            OpenError::Corrupt(format!("{} is corrupt: {why}", path.display()))
        }
        e => OpenError::Other(anyhow::anyhow!("cannot open {}: {e}", path.display())),
    })?;
    let txn = db.begin_write().map_err(anyhow::Error::from)?;
    txn.open_table(META).map_err(anyhow::Error::from)?;
    txn.commit().map_err(anyhow::Error::from)?;
    let corrupt = |e: StorageError<NodeId>| OpenError::Corrupt(e.to_string());
    check_format(&db, &path).map_err(|e| match e {
        FormatError::Storage(e) => corrupt(e),
        FormatError::TooNew(why) => OpenError::Other(anyhow::anyhow!(why)),
    })?;
    let _: Option<Vote<NodeId>> = meta_get(&db, "vote").map_err(corrupt)?;
    let purged: Option<LogId<NodeId>> = meta_get(&db, "last_purged").map_err(corrupt)?;
    let _: Option<StoredSnapshot> = meta_get(&db, "snapshot").map_err(corrupt)?;
    let mut wal = Wal::open(&dir.join("log")).map_err(|e| match e {
        WalError::Corrupt { .. } => OpenError::Corrupt(e.to_string()),
        e => OpenError::Other(e.into()),
    })?;
    if let Some(p) = purged {
        wal.purge(p.index).map_err(anyhow::Error::from)?;
    }
    // The log must continue right after the purge point.
    let next = purged.map_or(0, |p| p.index + 1);
    if let (Some(first), Some(_)) = (wal.first_index(), purged) {
        if first > next {
            return Err(OpenError::Corrupt(format!(
                "log entries {next}..{first} are missing from {}",
                dir.join("log").display()
            )));
        }
    }
    let db = Arc::new(db);
    let log = LogStore {
        db: db.clone(),
        wal: Arc::new(std::sync::Mutex::new(wal)),
    };
    Ok(Storage { db, log })
}

enum FormatError {
    Storage(StorageError<NodeId>),
    TooNew(String),
}

/// The data dir's storage format: a newer one than this build reads is
/// refused (not treated as damage: the data is fine, the build is old);
/// data without a format record (builds before 0.2.0) is format 1, and
/// gets the record.
fn check_format(db: &Database, path: &Path) -> std::result::Result<(), FormatError> {
    use causeway_api::version::{STORAGE_FORMAT, VERSION};
    match meta_get::<u32>(db, "format").map_err(FormatError::Storage)? {
        Some(f) if f > STORAGE_FORMAT => Err(FormatError::TooNew(format!(
            "{} holds storage format {f}, written by a newer causeway; this causeway {VERSION} reads up to format {STORAGE_FORMAT}. Run the newer release on this data dir (controllers are not downgraded), or restore a backup into an empty one",
            path.display()
        ))),
        Some(_) => Ok(()),
        None => meta_put(db, "format", &STORAGE_FORMAT, true).map_err(FormatError::Storage),
    }
}

/// Stored values are `crc32 (LE) | JSON`: redb checksums its pages, and
/// this catches what slips past it (a bad disk, a bad copy, a bug) at the
/// level of one entry, with a message that says which.
fn seal<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(value).map_err(io_err)?;
    let mut out = Vec::with_capacity(json.len() + 4);
    out.extend_from_slice(&crc32fast::hash(&json).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// A stored record failed its checksum.
#[derive(Debug, thiserror::Error)]
#[error("{what} is corrupt (checksum mismatch); this node stops. Rebuild it from its peers: stop it, move its data dir aside, start it with --join and `causeway ctl controller add` it again")]
pub struct Corrupt {
    what: String,
}

fn open_sealed<T: for<'de> Deserialize<'de>>(
    bytes: &[u8],
    what: impl Fn() -> String,
) -> std::result::Result<T, StorageIOError<NodeId>> {
    let corrupt = || StorageIOError::read(&Corrupt { what: what() });
    if bytes.len() < 4 {
        return Err(corrupt());
    }
    let (sum, json) = bytes.split_at(4);
    if crc32fast::hash(json).to_le_bytes() != sum {
        metrics::counter!("causeway_storage_corruption_total").increment(1);
        return Err(corrupt());
    }
    serde_json::from_slice(json).map_err(|_| corrupt())
}

fn meta_get<T: for<'de> Deserialize<'de>>(db: &Database, key: &str) -> Result<Option<T>> {
    let txn = db.begin_read().map_err(read_err)?;
    let t = txn.open_table(META).map_err(read_err)?;
    match t.get(key).map_err(read_err)? {
        Some(v) => Ok(Some(open_sealed(v.value(), || format!("stored {key}"))?)),
        None => Ok(None),
    }
}

fn meta_put<T: Serialize>(db: &Database, key: &str, value: &T, durable: bool) -> Result<()> {
    let bytes = seal(value)?;
    let mut txn = db.begin_write().map_err(io_err)?;
    if !durable {
        txn.set_durability(Durability::None);
    }
    {
        let mut t = txn.open_table(META).map_err(io_err)?;
        t.insert(key, bytes.as_slice()).map_err(io_err)?;
    }
    commit(txn)
}

/// Commits a write transaction. A durable commit waits for fsync, so it
/// runs with `block_in_place`: the runtime moves this worker's other tasks
/// (RPCs, replication) to another thread meanwhile.
fn commit(txn: redb::WriteTransaction) -> Result<()> {
    blocking(move || txn.commit().map_err(io_err))
}

fn wal_err(e: WalError) -> StorageError<NodeId> {
    match &e {
        WalError::Corrupt { .. } => StorageIOError::read(&e).into(),
        WalError::Io { .. } => StorageIOError::write(&e).into(),
    }
}

/// Runs blocking file work from async code: with `block_in_place` on the
/// multi-threaded runtime, so the worker's other tasks move elsewhere.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// The Raft log. Each `append` is one write to the newest segment and one
/// `fdatasync` before openraft hears it is flushed; under load the
/// proposer's batching (see `service::Batcher`) keeps the number of
/// appends, and so of syncs, far below the number of writes.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    wal: Arc<std::sync::Mutex<Wal>>,
}

impl LogStore {
    fn wal(&self) -> std::sync::MutexGuard<'_, Wal> {
        // A panic while holding the lock leaves the log as it was on disk
        // at worst; the data is still checked on every read.
        self.wal.locked()
    }

    /// Whether this node has never voted nor logged anything.
    pub fn is_pristine(&self) -> anyhow::Result<bool> {
        let vote: Option<Vote<NodeId>> = meta_get(&self.db, "vote")?;
        let purged: Option<LogId<NodeId>> = meta_get(&self.db, "last_purged")?;
        Ok(vote.is_none() && purged.is_none() && self.wal().last_index().is_none())
    }

    fn entry(&self, wal: &Wal, index: u64) -> Result<Option<Entry<TypeConfig>>> {
        match wal.read(index).map_err(wal_err)? {
            Some(bytes) => decode_entry(index, &bytes).map(Some),
            None => Ok(None),
        }
    }
}

fn decode_entry(index: u64, bytes: &[u8]) -> Result<Entry<TypeConfig>> {
    serde_json::from_slice(bytes).map_err(|_| {
        StorageIOError::read(&Corrupt {
            what: format!("log entry {index}"),
        })
        .into()
    })
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        let wal = self.wal();
        let (Some(first), Some(last)) = (wal.first_index(), wal.last_index()) else {
            return Ok(Vec::new());
        };
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x + 1,
            Bound::Unbounded => 0,
        }
        .max(first);
        let end = match range.end_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(0) => return Ok(Vec::new()),
            Bound::Excluded(x) => x - 1,
            Bound::Unbounded => last,
        }
        .min(last);
        let mut out = Vec::with_capacity(end.saturating_sub(start) as usize + 1);
        for index in start..=end {
            if let Some(e) = self.entry(&wal, index)? {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// What replication sends in one `AppendEntries`: entries from `start`
    /// up to about [`MAX_APPEND_BYTES`] (always at least one). openraft 0.9
    /// gives each `AppendEntries` one heartbeat interval to complete; a
    /// follower that fell behind by many large entries would otherwise be
    /// sent the whole backlog at once, time out, and be sent it again
    /// forever, never catching up.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        let wal = self.wal();
        let (Some(first), Some(last)) = (wal.first_index(), wal.last_index()) else {
            return Ok(Vec::new());
        };
        let end = end.min(last + 1);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for index in start.max(first)..end {
            let Some(raw) = wal.read(index).map_err(wal_err)? else {
                continue;
            };
            bytes += raw.len();
            if bytes > MAX_APPEND_BYTES && !out.is_empty() {
                break;
            }
            out.push(decode_entry(index, &raw)?);
        }
        Ok(out)
    }
}

/// About the most log bytes sent to a follower in one `AppendEntries`
/// (etcd's default `max-size-per-msg` is the same 1 MiB).
pub const MAX_APPEND_BYTES: usize = 1024 * 1024;

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let last_purged: Option<LogId<NodeId>> = meta_get(&self.db, "last_purged")?;
        let last = {
            let wal = self.wal();
            match wal.last_index() {
                Some(i) => self.entry(&wal, i)?.map(|e| e.log_id),
                None => None,
            }
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last.or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<()> {
        meta_put(&self.db, "vote", vote, true)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>> {
        meta_get(&self.db, "vote")
    }

    // save_committed/read_committed keep openraft's defaults (not stored):
    // storing the commit index would cost a write transaction per commit on
    // every node, and openraft re-learns it from the leader after a restart.

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let started = std::time::Instant::now();
        let res = (|| -> Result<()> {
            let mut records = Vec::new();
            for e in entries {
                records.push((e.log_id.index, serde_json::to_vec(&e).map_err(io_err)?));
            }
            let file = self.wal().append(&records).map_err(wal_err)?;
            if let Some(file) = file {
                blocking(|| file.sync_data()).map_err(io_err)?;
            }
            Ok(())
        })();
        metrics::histogram!("causeway_raft_log_append_seconds")
            .record(started.elapsed().as_secs_f64());
        match &res {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
        res
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        blocking(|| self.wal().truncate(log_id.index)).map_err(wal_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        // The purge point is durable first: entries still on disk below it
        // are dropped again at the next open.
        meta_put(&self.db, "last_purged", &log_id, true)?;
        blocking(|| self.wal().purge(log_id.index)).map_err(wal_err)
    }
}

/// Makes freshly opened storage the start of a new cluster of `members`
/// whose state is `state` (a restored backup): `state` becomes the
/// snapshot at log index 1, with `members` as its membership, and the log
/// continues after it. See [`crate::backup::restore`].
pub fn seed(
    db: &Database,
    state: &CatalogState,
    members: &std::collections::BTreeMap<NodeId, String>,
) -> anyhow::Result<()> {
    let vote: Option<Vote<NodeId>> = meta_get(db, "vote")?;
    let purged: Option<LogId<NodeId>> = meta_get(db, "last_purged")?;
    let snap: Option<StoredSnapshot> = meta_get(db, "snapshot")?;
    if vote.is_some() || purged.is_some() || snap.is_some() {
        anyhow::bail!("this storage holds a cluster already; restore into an empty directory");
    }
    let at = LogId::new(openraft::CommittedLeaderId::new(0, 0), 1);
    let voters: std::collections::BTreeSet<NodeId> = members.keys().copied().collect();
    let nodes: std::collections::BTreeMap<NodeId, Node> = members
        .iter()
        .map(|(id, addr)| (*id, Node { addr: addr.clone() }))
        .collect();
    let membership = openraft::Membership::new(vec![voters], nodes);
    let stored = StoredSnapshot {
        meta: SnapshotMeta {
            last_log_id: Some(at),
            last_membership: StoredMembership::new(Some(at), membership),
            snapshot_id: format!("restored-{}", state.revision),
        },
        data: serde_json::to_vec(state)?,
    };
    meta_put(db, "snapshot", &stored, true)?;
    meta_put(db, "last_purged", &at, true)?;
    Ok(())
}

/// The state a node's own data holds: its snapshot, then every entry of
/// its log after it applied in order — committed or not, since the commit
/// index is not stored (see `controller recover --force-new-cluster`).
/// The storage must not be in use by a running node.
pub fn replay(storage: &Storage) -> anyhow::Result<(CatalogState, u64)> {
    let snap: Option<StoredSnapshot> = meta_get(&storage.db, "snapshot")?;
    let (state, after) = match snap {
        Some(s) => (
            serde_json::from_slice::<CatalogState>(&s.data)?,
            s.meta.last_log_id.map_or(0, |l| l.index),
        ),
        None => (CatalogState::default(), 0),
    };
    // Applied the way a running node applies them (batches included).
    let hub = Hub::new();
    hub.replace(state);
    let wal = storage.log.wal();
    let mut last = after;
    if let (Some(first), Some(end)) = (wal.first_index(), wal.last_index()) {
        for index in first.max(after + 1)..=end {
            let Some(entry) = storage.log.entry(&wal, index)? else {
                anyhow::bail!("log entry {index} is missing");
            };
            if let EntryPayload::Normal(cmd) = entry.payload {
                hub.apply(cmd);
            }
            last = index;
        }
    }
    Ok((hub.read(CatalogState::clone), last))
}

#[derive(Serialize, Deserialize, Clone)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

#[derive(Clone, Serialize, Deserialize, Default)]
struct Applied {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
}

/// The state machine: the catalog lives in the [`Hub`].
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<Database>,
    hub: Arc<Hub>,
    applied: Applied,
    snapshot_seq: u64,
}

impl StateMachine {
    /// Restores the last snapshot, if any.
    pub fn new(db: Arc<Database>, hub: Arc<Hub>) -> anyhow::Result<Self> {
        let mut sm = Self {
            db,
            hub,
            applied: Applied::default(),
            snapshot_seq: 0,
        };
        if let Some(snap) = meta_get::<StoredSnapshot>(&sm.db, "snapshot")? {
            sm.load(&snap)?;
        }
        Ok(sm)
    }

    fn load(&mut self, snap: &StoredSnapshot) -> Result<()> {
        let state: CatalogState = serde_json::from_slice(&snap.data)
            .map_err(|e| StorageIOError::read_snapshot(Some(snap.meta.signature()), &e))?;
        self.applied = Applied {
            last_applied: snap.meta.last_log_id,
            membership: snap.meta.last_membership.clone(),
        };
        self.hub.replace(state);
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>> {
        let data = self
            .hub
            .read(serde_json::to_vec)
            .map_err(|e| StorageIOError::read_state_machine(&e))?;
        self.snapshot_seq += 1;
        let snapshot_id = match self.applied.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, self.snapshot_seq),
            None => format!("--{}", self.snapshot_seq),
        };
        let meta = SnapshotMeta {
            last_log_id: self.applied.last_applied,
            last_membership: self.applied.membership.clone(),
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        meta_put(&self.db, "snapshot", &stored, true)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>)> {
        Ok((self.applied.last_applied, self.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        for e in entries {
            self.applied.last_applied = Some(e.log_id);
            let outcome = match e.payload {
                EntryPayload::Blank => Outcome::Unchanged {
                    revision: self.hub.revision(),
                },
                EntryPayload::Normal(cmd) => self.hub.apply(cmd),
                EntryPayload::Membership(m) => {
                    self.applied.membership = StoredMembership::new(Some(e.log_id), m);
                    Outcome::Unchanged {
                        revision: self.hub.revision(),
                    }
                }
            };
            out.push(outcome);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<()> {
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: snapshot.into_inner(),
        };
        self.load(&stored)?;
        meta_put(&self.db, "snapshot", &stored, true)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>> {
        Ok(
            meta_get::<StoredSnapshot>(&self.db, "snapshot")?.map(|s| Snapshot {
                meta: s.meta,
                snapshot: Box::new(Cursor::new(s.data)),
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blank(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    #[tokio::test]
    async fn a_corrupt_log_entry_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path()).unwrap().log;
        let records: Vec<(u64, Vec<u8>)> = (1..=3)
            .map(|i| (i, serde_json::to_vec(&blank(i)).unwrap()))
            .collect();
        log.wal().append(&records).unwrap();
        assert_eq!(log.try_get_log_entries(1..4).await.unwrap().len(), 3);
        let segment = log.wal().segment_paths()[0].clone();
        drop(log);

        // Flip one bit inside the first entry, with good entries after it.
        let mut bytes = std::fs::read(&segment).unwrap();
        bytes[20] ^= 0x01;
        std::fs::write(&segment, &bytes).unwrap();
        match open(dir.path()) {
            Err(OpenError::Corrupt(why)) => {
                assert!(why.contains("checksum"), "{why}");
                assert!(why.contains(&segment.display().to_string()), "{why}");
            }
            Err(e) => panic!("expected corruption, got {e}"),
            Ok(_) => panic!("a corrupt log opened"),
        }
    }

    fn padded(index: u64, bytes: usize) -> (u64, Vec<u8>) {
        let e = Entry::<TypeConfig> {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(crate::state::Command::RemoveSite {
                site: "a".parse().unwrap(),
            }),
        };
        let mut raw = serde_json::to_vec(&e).unwrap();
        // Pad with JSON whitespace up to the size wanted.
        raw.resize(raw.len().max(bytes), b' ');
        (index, raw)
    }

    #[tokio::test]
    async fn replication_reads_at_most_about_a_megabyte_but_always_one_entry() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path()).unwrap().log;
        // Ten 300 kB entries, then one of 3 MB, then a small one.
        let mut records: Vec<(u64, Vec<u8>)> = (1..=10).map(|i| padded(i, 300_000)).collect();
        records.push(padded(11, 3_000_000));
        records.push(padded(12, 100));
        log.wal().append(&records).unwrap();

        let ids = |v: Vec<Entry<TypeConfig>>| v.iter().map(|e| e.log_id.index).collect::<Vec<_>>();
        // Three fit under 1 MiB, a fourth would not.
        assert_eq!(
            ids(log.limited_get_log_entries(1, 13).await.unwrap()),
            [1, 2, 3]
        );
        assert_eq!(
            ids(log.limited_get_log_entries(9, 13).await.unwrap()),
            [9, 10]
        );
        // An entry larger than the limit still goes, alone.
        assert_eq!(
            ids(log.limited_get_log_entries(11, 13).await.unwrap()),
            [11]
        );
        assert_eq!(
            ids(log.limited_get_log_entries(12, 13).await.unwrap()),
            [12]
        );
        // The end is exclusive and clamped to the log.
        assert_eq!(
            ids(log.limited_get_log_entries(12, 99).await.unwrap()),
            [12]
        );
        assert!(log
            .limited_get_log_entries(13, 20)
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn a_corrupt_snapshot_is_found_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path()).unwrap().db;
        let snap = StoredSnapshot {
            meta: SnapshotMeta::default(),
            data: b"{}".to_vec(),
        };
        let mut bytes = seal(&snap).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0x01;
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert("snapshot", bytes.as_slice())
            .unwrap();
        txn.commit().unwrap();
        drop(db);
        match open(dir.path()) {
            Err(OpenError::Corrupt(why)) => assert!(why.contains("snapshot is corrupt"), "{why}"),
            Err(e) => panic!("expected corruption, got {e}"),
            Ok(_) => panic!("a corrupt snapshot opened"),
        }
    }

    #[tokio::test]
    async fn data_from_a_newer_format_is_refused_not_rebuilt() {
        use causeway_api::version::STORAGE_FORMAT;
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path()).unwrap().db;
        // A new data dir says its format; one without the record (written
        // before 0.2.0) gets it at open.
        assert_eq!(
            meta_get::<u32>(&db, "format").unwrap(),
            Some(STORAGE_FORMAT)
        );
        let txn = db.begin_write().unwrap();
        txn.open_table(META).unwrap().remove("format").unwrap();
        txn.commit().unwrap();
        drop(db);
        let db = open(dir.path()).unwrap().db;
        assert_eq!(
            meta_get::<u32>(&db, "format").unwrap(),
            Some(STORAGE_FORMAT)
        );
        meta_put(&db, "format", &(STORAGE_FORMAT + 1), true).unwrap();
        drop(db);
        match open(dir.path()) {
            // Other, not Corrupt: the node must not set the data aside.
            Err(OpenError::Other(e)) => {
                let why = e.to_string();
                assert!(why.contains("written by a newer causeway"), "{why}");
                assert!(
                    why.contains(&format!("format {}", STORAGE_FORMAT + 1)),
                    "{why}"
                );
            }
            Err(e) => panic!("expected a refusal, got corruption: {e}"),
            Ok(_) => panic!("a newer format opened"),
        }
    }
}
