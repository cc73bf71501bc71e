//! Durable Raft storage on redb: the log, the vote, the committed index and
//! the latest snapshot. Every write that openraft must be able to rely on is
//! committed with redb's immediate durability (fsync) before it is
//! acknowledged; the state machine itself lives in memory and is rebuilt on
//! start from the snapshot plus the committed log.

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
use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::hub::Hub;
use crate::state::{CatalogState, Outcome};
use crate::{NodeId, TypeConfig};

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("logs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

type Result<T> = std::result::Result<T, StorageError<NodeId>>;
type Node = openraft::BasicNode;

fn io_err<E: std::error::Error + 'static>(e: E) -> StorageError<NodeId> {
    StorageIOError::write(&e).into()
}

fn read_err<E: std::error::Error + 'static>(e: E) -> StorageError<NodeId> {
    StorageIOError::read(&e).into()
}

/// Opens (or creates) the node's database at `dir/raft.redb`.
pub fn open(dir: &Path) -> anyhow::Result<Arc<Database>> {
    std::fs::create_dir_all(dir)?;
    let db = Database::create(dir.join("raft.redb"))
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", dir.join("raft.redb").display()))?;
    let txn = db.begin_write()?;
    txn.open_table(LOGS)?;
    txn.open_table(META)?;
    txn.commit()?;
    Ok(Arc::new(db))
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
    let run = move || txn.commit().map_err(io_err);
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(run)
        }
        _ => run(),
    }
}

/// The Raft log. Each `append` is one redb transaction committed with
/// immediate durability (fsync) before openraft hears it is flushed; under
/// load, the proposer's batching (see `service::Batcher`) keeps the number
/// of appends, and so of fsyncs, far below the number of writes.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    pub fn new(db: Arc<Database>) -> Self {
        Self { db }
    }

    /// Whether this node has never voted nor logged anything.
    pub fn is_pristine(&self) -> anyhow::Result<bool> {
        let vote: Option<Vote<NodeId>> = meta_get(&self.db, "vote")?;
        let txn = self.db.begin_read()?;
        let logs = txn.open_table(LOGS)?;
        Ok(vote.is_none() && logs.first()?.is_none())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        let txn = self.db.begin_read().map_err(read_err)?;
        let t = txn.open_table(LOGS).map_err(read_err)?;
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x + 1,
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for item in t.range(start..).map_err(read_err)? {
            let (k, v) = item.map_err(read_err)?;
            let index = k.value();
            if !range.contains(&index) {
                break;
            }
            let entry: Entry<TypeConfig> = open_sealed(v.value(), || format!("log entry {index}"))?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let last_purged: Option<LogId<NodeId>> = meta_get(&self.db, "last_purged")?;
        let txn = self.db.begin_read().map_err(read_err)?;
        let t = txn.open_table(LOGS).map_err(read_err)?;
        let last = match t.last().map_err(read_err)? {
            Some((k, v)) => {
                let index = k.value();
                let e: Entry<TypeConfig> = open_sealed(v.value(), || format!("log entry {index}"))?;
                Some(e.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
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
        let res = (|| -> std::result::Result<(), StorageError<NodeId>> {
            let txn = self.db.begin_write().map_err(io_err)?;
            {
                let mut t = txn.open_table(LOGS).map_err(io_err)?;
                for e in entries {
                    let bytes = seal(&e)?;
                    t.insert(e.log_id.index, bytes.as_slice()).map_err(io_err)?;
                }
            }
            commit(txn)
        })();
        match &res {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
        res
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        let txn = self.db.begin_write().map_err(io_err)?;
        {
            let mut t = txn.open_table(LOGS).map_err(io_err)?;
            t.retain(|k, _| k < log_id.index).map_err(io_err)?;
        }
        commit(txn)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        meta_put(&self.db, "last_purged", &log_id, true)?;
        let txn = self.db.begin_write().map_err(io_err)?;
        {
            let mut t = txn.open_table(LOGS).map_err(io_err)?;
            t.retain(|k, _| k > log_id.index).map_err(io_err)?;
        }
        commit(txn)
    }
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

    #[tokio::test]
    async fn a_corrupt_log_entry_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path()).unwrap();
        let entry: Entry<TypeConfig> = Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Blank,
        };
        let mut bytes = seal(&entry).unwrap();
        {
            let txn = db.begin_write().unwrap();
            txn.open_table(LOGS)
                .unwrap()
                .insert(1, bytes.as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let mut log = LogStore::new(db.clone());
        assert_eq!(log.try_get_log_entries(1..2).await.unwrap().len(), 1);

        // Flip one bit of the stored JSON.
        let last = bytes.len() - 2;
        bytes[last] ^= 0x01;
        {
            let txn = db.begin_write().unwrap();
            txn.open_table(LOGS)
                .unwrap()
                .insert(1, bytes.as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let err = log.try_get_log_entries(1..2).await.unwrap_err().to_string();
        assert!(err.contains("log entry 1 is corrupt"), "{err}");
        let err = log.get_log_state().await.unwrap_err().to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
    }
}
