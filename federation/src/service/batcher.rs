//! Group commit at the proposer: commands that arrive while earlier ones
//! are being committed travel together in one log entry.

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};

use crate::state::{Command, Outcome};
use crate::{NodeId, Raft};

type WriteResult =
    Result<Outcome, RaftError<NodeId, ClientWriteError<NodeId, openraft::BasicNode>>>;

/// Group commit at the proposer: commands that arrive while earlier ones
/// are being committed travel together in one log entry, so a burst of
/// writes costs a few appends and fsyncs instead of one each.
#[derive(Clone)]
pub struct Batcher {
    tx: tokio::sync::mpsc::Sender<Queued>,
    raft: Raft,
    /// Writes being committed right now; when none are, a write goes
    /// straight to Raft (nothing to batch with, no hand-offs).
    busy: Arc<std::sync::atomic::AtomicUsize>,
}

struct Decrement(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Most commands in one entry.
const MAX_BATCH: usize = 256;
/// Most encoded bytes of commands batched into one entry (a single larger
/// command still goes, alone): an entry then fits in one `AppendEntries`
/// (see [`crate::store::MAX_APPEND_BYTES`]).
const MAX_BATCH_BYTES: usize = crate::store::MAX_APPEND_BYTES;
/// Most batches being committed at once.
const BATCHES_IN_FLIGHT: usize = 4;

/// A command waiting for a batch: its encoded size and who to answer.
struct Queued {
    cmd: Command,
    bytes: usize,
    reply: tokio::sync::oneshot::Sender<WriteResult>,
}

/// The next batch: `first`, then whatever is already queued, up to
/// [`MAX_BATCH`] commands and [`MAX_BATCH_BYTES`]. A command that would
/// overflow the batch is handed back to start the next one.
fn fill_batch(
    first: Queued,
    rx: &mut tokio::sync::mpsc::Receiver<Queued>,
) -> (Vec<Queued>, Option<Queued>) {
    let mut bytes = first.bytes;
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(next) if bytes + next.bytes > MAX_BATCH_BYTES => return (batch, Some(next)),
            Ok(next) => {
                bytes += next.bytes;
                batch.push(next);
            }
            Err(_) => break,
        }
    }
    (batch, None)
}

impl Batcher {
    /// Starts the batching task in front of `raft`.
    pub fn start(raft: Raft) -> Self {
        let raft_handle = raft.clone();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Queued>(4096);
        let slots = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
        tokio::spawn(async move {
            let mut carried = None;
            loop {
                let first = match carried.take() {
                    Some(q) => q,
                    None => match rx.recv().await {
                        Some(q) => q,
                        None => return,
                    },
                };
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (batch, next) = fill_batch(first, &mut rx);
                carried = next;
                metrics::histogram!("causeway_raft_proposal_batch").record(batch.len() as f64);
                let mut batch: Vec<_> = batch.into_iter().map(|q| (q.cmd, q.reply)).collect();
                let raft = raft.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    if batch.len() == 1 {
                        let (cmd, reply) = batch.pop().expect("one");
                        let _ = reply.send(raft.client_write(cmd).await.map(|r| r.data));
                        return;
                    }
                    let (cmds, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                    match raft.client_write(Command::Batch(cmds)).await {
                        Ok(resp) => match resp.data {
                            Outcome::Batch(outs) if outs.len() == replies.len() => {
                                for (reply, out) in replies.into_iter().zip(outs) {
                                    let _ = reply.send(Ok(out));
                                }
                            }
                            other => {
                                for reply in replies {
                                    let _ = reply.send(Ok(other.clone()));
                                }
                            }
                        },
                        Err(e) => {
                            for reply in replies {
                                let _ = reply.send(Err(e.clone()));
                            }
                        }
                    }
                });
            }
        });
        Self {
            tx,
            raft: raft_handle,
            busy: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        }
    }

    /// Commits `cmd` (batched with others when some are in flight).
    pub async fn write(&self, cmd: Command) -> WriteResult {
        use std::sync::atomic::Ordering;
        if self
            .busy
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let r = self.raft.client_write(cmd).await.map(|r| r.data);
            self.busy.fetch_sub(1, Ordering::AcqRel);
            return r;
        }
        self.busy.fetch_add(1, Ordering::AcqRel);
        let _guard = Decrement(self.busy.clone());
        let (reply, rx) = tokio::sync::oneshot::channel();
        let bytes = crate::json_len(&cmd);
        if self.tx.send(Queued { cmd, bytes, reply }).await.is_err() {
            return Err(RaftError::Fatal(openraft::error::Fatal::Stopped));
        }
        rx.await
            .unwrap_or(Err(RaftError::Fatal(openraft::error::Fatal::Stopped)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(site: &str, padding: usize) -> (Queued, tokio::sync::oneshot::Receiver<WriteResult>) {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let cmd = Command::PublishExports {
            site: site.parse().unwrap(),
            exports: vec![],
            tunnel_addrs: vec!["x".repeat(padding)],
            now_ms: 0,
        };
        let bytes = crate::json_len(&cmd);
        assert_eq!(bytes, serde_json::to_vec(&cmd).unwrap().len());
        (Queued { cmd, bytes, reply }, rx)
    }

    #[tokio::test]
    async fn batches_stop_at_the_byte_limit_and_carry_the_rest_over() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let mut keep = vec![];
        for site in ["b", "c", "d"] {
            let (q, r) = queued(site, 400_000);
            keep.push(r);
            tx.send(q).await.unwrap();
        }
        let (first, _r) = queued("a", 100);
        let (batch, carried) = fill_batch(first, &mut rx);
        let sites = |b: &[Queued]| {
            b.iter()
                .map(|q| match &q.cmd {
                    Command::PublishExports { site, .. } => site.to_string(),
                    _ => unreachable!(),
                })
                .collect::<Vec<_>>()
        };
        // a + b + c is about 800 kB; d would pass 1 MiB and starts the next.
        assert_eq!(sites(&batch), ["a", "b", "c"]);
        let carried = carried.expect("d is carried over");
        let (next, none) = fill_batch(carried, &mut rx);
        assert_eq!(sites(&next), ["d"]);
        assert!(none.is_none());

        // One command over the limit still makes a batch of its own.
        let (big, _r) = queued("e", 2 * MAX_BATCH_BYTES);
        let (small, _r2) = queued("f", 10);
        tx.send(small).await.unwrap();
        let (batch, carried) = fill_batch(big, &mut rx);
        assert_eq!(sites(&batch), ["e"]);
        assert_eq!(sites(&[carried.unwrap()]), ["f"]);
    }
}
