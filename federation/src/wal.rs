//! The Raft log as append-only segment files, the way etcd and most Raft
//! implementations keep it: an append is one `write` plus one `fdatasync`,
//! nothing else (no B-tree pages, no allocator state).
//!
//! A segment is named after the index of its first entry
//! (`00000000000000000042.wal`) and holds records back to back:
//!
//! ```text
//! | payload length u32 LE | crc32 u32 LE | index u64 LE | payload |
//! ```
//!
//! The checksum covers the index and the payload. On open every record of
//! every segment is read and checked, so a node learns about bad data before
//! it takes part in Raft, not when a follower asks for an old entry. An
//! incomplete record at the very end of the newest segment is an append that
//! never finished — it was never acknowledged, since the acknowledgement
//! waits for `fdatasync`, which makes the whole record durable — and is cut
//! off. Anything else that does not check out, including a complete final
//! record with a bad checksum, is corruption, reported with the segment and
//! offset: dropping it could drop an acknowledged entry, so the node rebuilds
//! from its peers instead (see `node.rs`).
//!
//! Segments are preallocated (`fallocate`) to their full size when they are
//! started, as etcd does: an `fdatasync` after an append then flushes data
//! only, with no file-size change to journal, which takes about a third off
//! its latency on ext4. The unwritten rest of a segment reads as zeros, so a
//! segment ends where its bytes turn all-zero, and a damaged final record
//! with nothing but zeros after it is an unfinished append, like one cut
//! short.
//!
//! This module is synchronous and knows nothing of openraft: `store.rs` maps
//! Raft entries onto it.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes before a record's payload.
const HEADER: usize = 16;

/// The fault-injection switch `CAUSEWAY_FAILPOINTS=wal-torn-append@N`
/// (for the chaos suite, never set in production): the Nth append after
/// start writes its records, loses part of them as an unsynced write
/// would, and aborts the process before `fdatasync`.
fn torn_append_due() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    static APPENDS: AtomicU64 = AtomicU64::new(0);
    let at = AT.get_or_init(|| {
        std::env::var("CAUSEWAY_FAILPOINTS")
            .ok()?
            .split(',')
            .find_map(|f| f.trim().strip_prefix("wal-torn-append@")?.parse().ok())
    });
    match at {
        Some(n) => APPENDS.fetch_add(1, Ordering::Relaxed) + 1 == *n,
        None => false,
    }
}
/// A new segment is started once the newest one reaches this size.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Largest payload a record may claim; a longer claimed length is damage.
pub const MAX_RECORD: usize = 512 * 1024 * 1024;

/// Why the log could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// A record failed its checks.
    #[error("log segment {segment} is corrupt at byte {offset}: {why} (checksum mismatch or damaged record)")]
    Corrupt {
        /// The segment file.
        segment: String,
        /// Where in it.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// The file system failed.
    #[error("log directory {dir}: {source}")]
    Io {
        /// The log directory.
        dir: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

struct Segment {
    first: u64,
    path: PathBuf,
    file: Arc<File>,
    len: u64,
}

#[derive(Clone, Copy)]
struct Loc {
    /// `first` of the segment holding the record.
    segment: u64,
    offset: u64,
    len: u32,
}

/// The open log. Indexes held are contiguous: `first ..= first + locs.len() - 1`.
pub struct Wal {
    dir: PathBuf,
    segments: Vec<Segment>,
    first: u64,
    locs: VecDeque<Loc>,
}

fn checksum(index: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&index.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Appends one record to `out`.
pub fn encode_record(out: &mut Vec<u8>, index: u64, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&checksum(index, payload).to_le_bytes());
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(payload);
}

/// What `parse_segment` found.
#[derive(Debug, PartialEq)]
pub struct Parsed {
    /// `(index, payload offset, payload length)` of each good record.
    pub records: Vec<(u64, u64, u32)>,
    /// Where the good records end.
    pub good_len: u64,
    /// Why parsing stopped before the end, if it did.
    pub damage: Option<String>,
    /// Whether the damage is an incomplete final record (an append cut
    /// short), rather than bytes that are present but wrong.
    pub torn_tail: bool,
}

/// Whether nothing was ever written in `bytes` (preallocated space).
fn unwritten(bytes: &[u8]) -> bool {
    bytes.iter().all(|b| *b == 0)
}

/// The unit a disk writes whole: a write cut short by a crash leaves some
/// of these never written (zeros in preallocated space), not random bits.
const SECTOR: usize = 512;

/// Whether the record at `bytes[start..end]` (offsets in the segment) shows
/// the mark of a write cut short: a sector's share of it all zeros. Shares
/// under 16 bytes count only at the record's end, since a record's header
/// holds short runs of zeros by itself (the high bytes of small numbers);
/// payloads are JSON and never hold a zero byte.
fn torn_record(bytes: &[u8], start: usize, end: usize) -> bool {
    let mut at = start;
    while at < end {
        let next = ((at / SECTOR + 1) * SECTOR).min(end);
        if (next - at >= 16 || next == end) && unwritten(&bytes[at..next]) {
            return true;
        }
        at = next;
    }
    false
}

/// Reads the records of one segment. Never panics and never allocates more
/// than the input, whatever the bytes.
pub fn parse_segment(bytes: &[u8]) -> Parsed {
    let mut records = Vec::new();
    let mut off = 0usize;
    let stop = |records, off: usize, why: String, torn| Parsed {
        records,
        good_len: off as u64,
        damage: Some(why),
        torn_tail: torn,
    };
    while off < bytes.len() {
        let rest = &bytes[off..];
        if unwritten(rest) {
            // The preallocated, never-written end of the segment.
            break;
        }
        if rest.len() < HEADER {
            return stop(records, off, "incomplete record header".into(), true);
        }
        let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        let index = u64::from_le_bytes(rest[8..16].try_into().expect("8 bytes"));
        if len > MAX_RECORD {
            return stop(records, off, format!("record claims {len} bytes"), false);
        }
        if rest.len() < HEADER + len {
            return stop(records, off, "record runs past the end".into(), true);
        }
        let payload = &rest[HEADER..HEADER + len];
        if checksum(index, payload) != crc {
            // With only unwritten space after it and a sector of it never
            // written, this is the last append, and it never completed. A
            // flipped bit, or damage anywhere else, is corruption.
            let torn =
                unwritten(&rest[HEADER + len..]) && torn_record(bytes, off, off + HEADER + len);
            let why = format!("record for index {index} fails its checksum");
            return stop(records, off, why, torn);
        }
        records.push((index, (off + HEADER) as u64, len as u32));
        off += HEADER + len;
    }
    Parsed {
        records,
        good_len: off as u64,
        damage: None,
        torn_tail: false,
    }
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.wal")
}

/// Reserves blocks for `file` up to `SEGMENT_BYTES` from `from` on, reading
/// as zeros. Filesystems without `fallocate`, and disks without 64 MiB to
/// spare, just go without: appends then grow the file, which is correct,
/// only slower to sync (and a full disk is reported by the append itself).
fn preallocate(file: &File, from: u64) -> std::io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    use rustix::io::Errno;
    if from >= SEGMENT_BYTES {
        return Ok(());
    }
    match fallocate(file, FallocateFlags::empty(), from, SEGMENT_BYTES - from) {
        Ok(()) | Err(Errno::OPNOTSUPP) | Err(Errno::NOSYS) => Ok(()),
        Err(Errno::NOSPC) => {
            tracing::warn!("too little disk space to preallocate a log segment; appending without");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Cuts `file` back to `len` bytes and preallocates again after that, so
/// the bytes past `len` read as zeros (unwritten).
fn cut_to(file: &File, len: u64) -> std::io::Result<()> {
    file.set_len(len)?;
    preallocate(file, len)?;
    file.sync_all()
}

impl Wal {
    fn io(&self, source: std::io::Error) -> WalError {
        WalError::Io {
            dir: self.dir.display().to_string(),
            source,
        }
    }

    /// Opens the log in `dir`, creating the directory if needed, and checks
    /// every record.
    pub fn open(dir: &Path) -> Result<Self, WalError> {
        let io = |source| WalError::Io {
            dir: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for ent in std::fs::read_dir(dir).map_err(io)? {
            let path = ent.map_err(io)?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if let Some(stem) = name.strip_suffix(".wal") {
                if let Ok(first) = stem.parse::<u64>() {
                    names.push((first, path));
                }
            }
        }
        names.sort();
        let mut wal = Wal {
            dir: dir.to_path_buf(),
            segments: Vec::new(),
            first: 0,
            locs: VecDeque::new(),
        };
        let count = names.len();
        for (i, (first, path)) in names.into_iter().enumerate() {
            let newest = i + 1 == count;
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io)?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes).map_err(io)?;
            let parsed = parse_segment(&bytes);
            let corrupt = |offset: u64, why: String| WalError::Corrupt {
                segment: path.display().to_string(),
                offset,
                why,
            };
            if let Some(why) = &parsed.damage {
                if !(newest && parsed.torn_tail) {
                    return Err(corrupt(parsed.good_len, why.clone()));
                }
                tracing::warn!(
                    segment = %path.display(),
                    offset = parsed.good_len,
                    %why,
                    "cutting off an unfinished append at the end of the log"
                );
                cut_to(&file, parsed.good_len).map_err(io)?;
            }
            if parsed.records.is_empty() {
                // Created but never written: nothing to keep.
                drop(file);
                std::fs::remove_file(&path).map_err(io)?;
                continue;
            }
            for (k, (index, offset, len)) in parsed.records.iter().enumerate() {
                let expected = match (k, wal.locs.is_empty()) {
                    (0, _) => first,
                    (_, false) => wal.first + wal.locs.len() as u64,
                    (_, true) => unreachable!("the first record was pushed"),
                };
                let continues =
                    k > 0 || wal.locs.is_empty() || first == wal.first + wal.locs.len() as u64;
                if *index != expected || !continues {
                    return Err(corrupt(
                        offset - HEADER as u64,
                        format!(
                            "holds index {index} where {expected} belongs, after {:?}",
                            wal.last_index()
                        ),
                    ));
                }
                if wal.locs.is_empty() {
                    wal.first = *index;
                }
                wal.locs.push_back(Loc {
                    segment: first,
                    offset: *offset,
                    len: *len,
                });
            }
            wal.segments.push(Segment {
                first,
                path,
                file: Arc::new(file),
                len: parsed.good_len,
            });
        }
        Ok(wal)
    }

    /// Index of the oldest entry held, if any.
    pub fn first_index(&self) -> Option<u64> {
        (!self.locs.is_empty()).then_some(self.first)
    }

    /// Index of the newest entry held, if any.
    pub fn last_index(&self) -> Option<u64> {
        (!self.locs.is_empty()).then(|| self.first + self.locs.len() as u64 - 1)
    }

    fn segment(&self, first: u64) -> &Segment {
        let i = self.segments.partition_point(|s| s.first <= first) - 1;
        &self.segments[i]
    }

    /// The payload of entry `index`, checked against its checksum.
    pub fn read(&self, index: u64) -> Result<Option<Vec<u8>>, WalError> {
        if index < self.first || index >= self.first + self.locs.len() as u64 {
            return Ok(None);
        }
        let loc = self.locs[(index - self.first) as usize];
        let seg = self.segment(loc.segment);
        let mut buf = vec![0u8; HEADER + loc.len as usize];
        let start = loc.offset - HEADER as u64;
        seg.file
            .read_exact_at(&mut buf, start)
            .map_err(|e| self.io(e))?;
        let parsed = parse_segment(&buf);
        match parsed.records.first() {
            Some((i, _, _)) if *i == index && parsed.damage.is_none() => {
                buf.drain(..HEADER);
                Ok(Some(buf))
            }
            _ => {
                metrics::counter!("causeway_storage_corruption_total").increment(1);
                Err(WalError::Corrupt {
                    segment: seg.path.display().to_string(),
                    offset: start,
                    why: parsed
                        .damage
                        .unwrap_or_else(|| format!("record for index {index} is not where it was")),
                })
            }
        }
    }

    /// Writes entries `(index, payload)`, which must continue the log, and
    /// returns the file to `fdatasync` before they may be acknowledged.
    /// On a failed write the segment is cut back to where it was.
    pub fn append(&mut self, entries: &[(u64, Vec<u8>)]) -> Result<Option<Arc<File>>, WalError> {
        let Some((first_new, _)) = entries.first() else {
            return Ok(None);
        };
        if let Some(last) = self.last_index() {
            if *first_new != last + 1 {
                return Err(self.io(std::io::Error::other(format!(
                    "append at index {first_new} does not follow the last entry {last}"
                ))));
            }
        }
        let full = self.segments.last().is_none_or(|s| s.len >= SEGMENT_BYTES);
        if full {
            self.start_segment(*first_new)?;
        }
        let mut buf = Vec::with_capacity(entries.iter().map(|(_, p)| HEADER + p.len()).sum());
        let mut added = Vec::with_capacity(entries.len());
        let seg = self
            .segments
            .last_mut()
            .expect("a segment was just ensured");
        for (index, payload) in entries {
            added.push(Loc {
                segment: seg.first,
                offset: seg.len + (buf.len() + HEADER) as u64,
                len: payload.len() as u32,
            });
            encode_record(&mut buf, *index, payload);
        }
        if let Err(e) = seg.file.write_all_at(&buf, seg.len) {
            // Leave no half record behind for a reopen to stumble on.
            let _ = cut_to(&seg.file, seg.len);
            let dir = self.dir.display().to_string();
            return Err(WalError::Io { dir, source: e });
        }
        if torn_append_due() {
            // A crash between the write and its fdatasync, where the device
            // kept only a prefix of what was written: the rest reads as the
            // preallocated zeros again. Nothing here was acknowledged.
            let keep = buf.len() * 3 / 7;
            let _ = seg
                .file
                .write_all_at(&vec![0; buf.len() - keep], seg.len + keep as u64);
            tracing::error!(
                "failpoint wal-torn-append: kept {keep} of {} unsynced bytes, aborting",
                buf.len()
            );
            std::process::abort();
        }
        seg.len += buf.len() as u64;
        let file = seg.file.clone();
        if self.locs.is_empty() {
            self.first = *first_new;
        }
        self.locs.extend(added);
        Ok(Some(file))
    }

    fn start_segment(&mut self, first: u64) -> Result<(), WalError> {
        let path = self.dir.join(segment_name(first));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| self.io(e))?;
        // A leftover file of this name (from before a truncation) holds
        // nothing we still want.
        file.set_len(0).map_err(|e| self.io(e))?;
        preallocate(&file, 0).map_err(|e| self.io(e))?;
        file.sync_all().map_err(|e| self.io(e))?;
        self.sync_dir()?;
        self.segments.push(Segment {
            first,
            path,
            file: Arc::new(file),
            len: 0,
        });
        Ok(())
    }

    fn sync_dir(&self) -> Result<(), WalError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.io(e))
    }

    /// Removes entries `index..` (a leader overwrote them), durably.
    pub fn truncate(&mut self, index: u64) -> Result<(), WalError> {
        let Some(last) = self.last_index() else {
            return Ok(());
        };
        if index > last {
            return Ok(());
        }
        let keep = index.saturating_sub(self.first) as usize;
        // Whole segments that start at or after `index` go.
        while let Some(seg) = self.segments.last() {
            if seg.first < index {
                break;
            }
            let seg = self.segments.pop().expect("checked");
            drop(seg.file);
            std::fs::remove_file(&seg.path).map_err(|e| self.io(e))?;
        }
        if keep < self.locs.len() {
            let cut = self.locs[keep];
            if let Some(seg) = self.segments.last_mut() {
                if seg.first == cut.segment {
                    let at = cut.offset - HEADER as u64;
                    cut_to(&seg.file, at).map_err(|e| WalError::Io {
                        dir: self.dir.display().to_string(),
                        source: e,
                    })?;
                    seg.len = at;
                }
            }
            self.locs.truncate(keep);
        }
        self.sync_dir()
    }

    /// Forgets entries `..=upto` (they are in a snapshot) and deletes the
    /// segments that hold nothing newer.
    pub fn purge(&mut self, upto: u64) -> Result<(), WalError> {
        if self.locs.is_empty() || upto < self.first {
            return Ok(());
        }
        let drop_n = ((upto - self.first + 1) as usize).min(self.locs.len());
        self.locs.drain(..drop_n);
        self.first = upto + 1;
        // A segment can go when the next one starts at or below `upto + 1`
        // (everything in it is purged), or when nothing at all is left.
        let mut removed = false;
        while !self.segments.is_empty() {
            let all_gone = match self.segments.get(1) {
                Some(next) => next.first <= upto + 1,
                None => self.locs.is_empty(),
            };
            if !all_gone {
                break;
            }
            let seg = self.segments.remove(0);
            drop(seg.file);
            std::fs::remove_file(&seg.path).map_err(|e| self.io(e))?;
            removed = true;
        }
        if removed {
            self.sync_dir()?;
        }
        Ok(())
    }

    /// Segment files on disk, oldest first.
    pub fn segment_paths(&self) -> Vec<PathBuf> {
        self.segments.iter().map(|s| s.path.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entries(range: std::ops::RangeInclusive<u64>) -> Vec<(u64, Vec<u8>)> {
        range
            .map(|i| {
                (
                    i,
                    format!("entry {i} {}", "x".repeat(i as usize % 7)).into_bytes(),
                )
            })
            .collect()
    }

    fn all(wal: &Wal) -> Vec<u64> {
        let (Some(a), Some(b)) = (wal.first_index(), wal.last_index()) else {
            return vec![];
        };
        for i in a..=b {
            let p = wal.read(i).unwrap().unwrap();
            let text = String::from_utf8(p).unwrap();
            assert!(text.starts_with(&format!("entry {i} ")), "{text}");
        }
        (a..=b).collect()
    }

    #[test]
    fn appends_truncates_purges_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.last_index(), None);
        wal.append(&entries(1..=10))
            .unwrap()
            .unwrap()
            .sync_data()
            .unwrap();
        wal.truncate(8).unwrap();
        assert_eq!(wal.last_index(), Some(7));
        wal.append(&entries(8..=12)).unwrap();
        assert!(wal.append(&entries(20..=21)).is_err(), "a gap is refused");
        wal.purge(4).unwrap();
        assert_eq!(all(&wal), (5..=12).collect::<Vec<_>>());
        drop(wal);
        let mut wal = Wal::open(dir.path()).unwrap();
        // Purged records of a partly purged segment come back on open;
        // the store purges again from its durable `last_purged`.
        assert_eq!(wal.last_index(), Some(12));
        wal.purge(4).unwrap();
        assert_eq!(all(&wal), (5..=12).collect::<Vec<_>>());
        wal.purge(12).unwrap();
        assert_eq!(wal.first_index(), None);
        assert!(wal.segment_paths().is_empty());
        wal.append(&entries(13..=14)).unwrap();
        drop(wal);
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(all(&wal), vec![13, 14]);
    }

    #[test]
    fn an_unfinished_append_is_cut_off_but_damage_inside_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path()).unwrap();
        wal.append(&entries(1..=4)).unwrap();
        // A last record long enough to span sectors.
        let long = format!("entry 5 {}", "y".repeat(3 * SECTOR)).into_bytes();
        wal.append(&[(5, long)]).unwrap();
        let path = wal.segment_paths()[0].clone();
        drop(wal);
        let full = std::fs::read(&path).unwrap();
        let written = parse_segment(&full).good_len as usize;
        assert!(full.len() > written, "the segment is preallocated");
        assert!(unwritten(&full[written..]));

        // Half of the last record made it to disk, and the file ends there
        // (no preallocation).
        std::fs::write(&path, &full[..written - 3]).unwrap();
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.last_index(), Some(4));
        drop(wal);

        // The same in preallocated space: the sectors after the first one
        // of the last record were never written. The log stays whole after
        // the cut: appends go on from index 5.
        let mut torn = full.clone();
        let second_sector = (written - 2 * SECTOR) / SECTOR * SECTOR;
        torn[second_sector..written].fill(0);
        std::fs::write(&path, &torn).unwrap();
        let mut wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.last_index(), Some(4));
        wal.append(&entries(5..=6)).unwrap();
        drop(wal);
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(all(&wal), (1..=6).collect::<Vec<_>>());
        drop(wal);
        std::fs::write(&path, &full).unwrap();

        // A flipped bit in the first record, with good records after it.
        let mut bad = full.clone();
        bad[HEADER + 2] ^= 0x10;
        std::fs::write(&path, &bad).unwrap();
        let err = Wal::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("corrupt at byte 0"), "{err}");
        assert!(err.contains("checksum"), "{err}");

        // A flipped bit in the last, complete record: it may have been
        // acknowledged, so it is corruption too, not an unfinished append.
        let mut bad = full.clone();
        bad[written - 1] ^= 0x10;
        std::fs::write(&path, &bad).unwrap();
        let err = Wal::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("index 5 fails its checksum"), "{err}");
    }

    #[test]
    fn rolls_segments_and_truncates_across_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path()).unwrap();
        for i in 1..=6u64 {
            wal.append(&entries(i..=i)).unwrap();
            // Force a new segment after every second entry.
            if i % 2 == 0 {
                wal.segments.last_mut().unwrap().len = SEGMENT_BYTES;
            }
        }
        assert_eq!(wal.segment_paths().len(), 3);
        wal.truncate(3).unwrap();
        assert_eq!(wal.segment_paths().len(), 1);
        wal.append(&entries(3..=4)).unwrap();
        wal.purge(2).unwrap();
        drop(wal);
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(all(&wal), vec![3, 4]);
    }

    proptest! {
        /// Whatever the bytes, parsing neither panics nor reports records
        /// beyond the input, and a clean prefix of records is always kept.
        #[test]
        fn parsing_arbitrary_damage_is_bounded(
            n in 0u64..8,
            cut in 0usize..400,
            flips in proptest::collection::vec((0usize..400, any::<u8>()), 0..4),
            junk in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut bytes = Vec::new();
            for (i, p) in entries(1..=n) { encode_record(&mut bytes, i, &p); }
            let clean = parse_segment(&bytes);
            prop_assert!(clean.damage.is_none());
            prop_assert_eq!(clean.records.len() as u64, n);
            for (at, x) in &flips {
                if !bytes.is_empty() { let i = at % bytes.len(); bytes[i] ^= x; }
            }
            bytes.truncate(bytes.len().saturating_sub(cut % 64));
            bytes.extend_from_slice(&junk);
            let p = parse_segment(&bytes);
            prop_assert!(p.good_len as usize <= bytes.len());
            for (_, off, len) in &p.records {
                prop_assert!(*off as usize + *len as usize <= bytes.len());
            }
            if flips.is_empty() && cut % 64 == 0 {
                prop_assert!(p.records.len() as u64 >= n);
            }
        }
    }
}
