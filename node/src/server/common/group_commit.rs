//! Group commit of the node's own disk: a change acknowledged by a node that has no other
//! member to copy it to is acknowledged only after a flush of the node's sled that began
//! after the change was written.
//!
//! One flusher task per node. A writer inserts into sled, then waits with
//! [`GroupCommit::durable`], which registers a waiter with the flusher. The flusher takes
//! every waiter registered so far, runs one flush for all of them on the blocking pool
//! (never on a runtime worker), answers them all, and loops; waiters that arrive while a
//! flush runs wait for the next one. So a burst of writers costs one flush, not one each,
//! and throughput follows the flush time rather than the number of writes.
//!
//! What a flush survives (sled 0.34 on Linux): the write reaches the file (the OS page
//! cache) and `sync_file_range` waits for it to be written out, so the data survives the
//! process being killed (SIGKILL, a crash). It is not a full `fsync` (no file metadata, no
//! device cache flush): a power loss or a kernel crash can still lose the last writes. A
//! copy on a second node is the guarantee against losing a machine.
//!
//! **Boundary:** this module only flushes; it never reads or writes keys, and it does not
//! decide which changes need a flush (the replication paths do: `rooms::replicate`, `rain`).
//! Waiters are bounded by [`FLUSH_WAITERS_MAX`]: beyond it, [`GroupCommit::durable`] waits
//! for room in the queue (each waiter is an actor or task awaiting its own change).

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

/// Waiters queued for the next flush before registering waits for room.
pub const FLUSH_WAITERS_MAX: usize = 65_536;

/// Why a change could not be made durable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlushError {
    /// The flush failed (the storage's message).
    #[error("storage flush failed: {0}")]
    Storage(String),
    /// The flusher is gone (the node is stopping).
    #[error("the storage flusher has stopped")]
    Stopped,
}

type Waiter = oneshot::Sender<Result<(), FlushError>>;

/// The handle to a node's flusher (cheap to clone). The flusher stops when the last
/// handle is dropped, after answering every waiter it took.
#[derive(Clone)]
pub struct GroupCommit {
    waiters: mpsc::Sender<Waiter>,
}

impl GroupCommit {
    /// Starts a flusher that calls `flush` (on the blocking pool) once per group of
    /// waiters. Needs a tokio runtime.
    pub fn start<F>(flush: F) -> Self
    where
        F: Fn() -> Result<(), String> + Send + Sync + 'static,
    {
        let (waiters, queue) = mpsc::channel(FLUSH_WAITERS_MAX);
        tokio::spawn(run_flusher(Arc::new(flush), queue));
        GroupCommit { waiters }
    }

    /// A flusher for `db` (every tree of it: sled flushes the whole database at once).
    pub fn for_db(db: sled::Db) -> Self {
        Self::start(move || db.flush().map(|_| ()).map_err(|e| e.to_string()))
    }

    /// Resolves once a flush that started after this call was made has completed: every
    /// write made before the call is then on disk (see the module docs for what that
    /// survives).
    ///
    /// # Errors
    ///
    /// [`FlushError::Storage`] if that flush failed (the change must not be
    /// acknowledged); [`FlushError::Stopped`] if the flusher is gone.
    pub async fn durable(&self) -> Result<(), FlushError> {
        let (waiter, answer) = oneshot::channel();
        self.waiters
            .send(waiter)
            .await
            .map_err(|_| FlushError::Stopped)?;
        answer.await.map_err(|_| FlushError::Stopped)?
    }
}

/// The flusher: one flush per group of waiters, in a loop, until every handle is gone.
async fn run_flusher<F>(flush: Arc<F>, mut queue: mpsc::Receiver<Waiter>)
where
    F: Fn() -> Result<(), String> + Send + Sync + 'static,
{
    let mut group = Vec::new();
    while queue.recv_many(&mut group, FLUSH_WAITERS_MAX).await > 0 {
        // Every write the group's waiters made happened before they registered, hence
        // before this flush starts.
        let started = Instant::now();
        let flush = flush.clone();
        let result = match tokio::task::spawn_blocking(move || flush()).await {
            Ok(result) => result.map_err(FlushError::Storage),
            Err(error) => Err(FlushError::Storage(format!("flush task failed: {error}"))),
        };
        metrics::counter!("chorus_storage_flushes_total").increment(1);
        metrics::counter!("chorus_storage_flush_waiters_total").increment(group.len() as u64);
        metrics::histogram!("chorus_storage_flush_seconds").record(started.elapsed().as_secs_f64());
        if let Err(error) = &result {
            tracing::error!(%error, waiters = group.len(), "storage flush failed");
        }
        for waiter in group.drain(..) {
            let _ = waiter.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    /// Polls `condition` every few milliseconds until it holds or 10 s pass.
    async fn eventually(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn queued(commit: &GroupCommit) -> usize {
        commit.waiters.max_capacity() - commit.waiters.capacity()
    }

    #[tokio::test]
    async fn writers_waiting_during_a_flush_share_the_next_one() {
        let flushes = Arc::new(AtomicU64::new(0));
        let gate = Arc::new(AtomicBool::new(false));
        let commit = {
            let (flushes, gate) = (flushes.clone(), gate.clone());
            GroupCommit::start(move || {
                flushes.fetch_add(1, Ordering::SeqCst);
                while !gate.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(())
            })
        };
        // The first writer starts a flush, which holds until the gate opens.
        let first = tokio::spawn({
            let commit = commit.clone();
            async move { commit.durable().await }
        });
        eventually("the first flush", || flushes.load(Ordering::SeqCst) == 1).await;
        let writers: Vec<_> = (0..50)
            .map(|_| {
                let commit = commit.clone();
                tokio::spawn(async move { commit.durable().await })
            })
            .collect();
        eventually("50 waiters queued", || queued(&commit) == 50).await;
        gate.store(true, Ordering::SeqCst);
        assert_eq!(first.await.expect("first writer"), Ok(()));
        for writer in writers {
            assert_eq!(writer.await.expect("writer"), Ok(()));
        }
        assert_eq!(
            flushes.load(Ordering::SeqCst),
            2,
            "the 50 writers queued during the first flush share one more"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_is_answered_only_after_a_flush_that_covers_its_write() {
        // A toy store: writes go to `pending`; a flush copies `pending` to `disk`.
        let pending = Arc::new(Mutex::new(Vec::<u64>::new()));
        let disk = Arc::new(Mutex::new(Vec::<u64>::new()));
        let flushes = Arc::new(AtomicU64::new(0));
        let commit = {
            let (pending, disk, flushes) = (pending.clone(), disk.clone(), flushes.clone());
            GroupCommit::start(move || {
                let snapshot = pending.lock().expect("pending").clone();
                std::thread::sleep(Duration::from_millis(2));
                *disk.lock().expect("disk") = snapshot;
                flushes.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
        };
        let writers: Vec<_> = (0..200u64)
            .map(|value| {
                let (commit, pending, disk) = (commit.clone(), pending.clone(), disk.clone());
                tokio::spawn(async move {
                    for round in 0..5 {
                        let value = value * 10 + round;
                        pending.lock().expect("pending").push(value);
                        commit.durable().await.expect("durable");
                        assert!(
                            disk.lock().expect("disk").contains(&value),
                            "write {value} answered before a flush covered it"
                        );
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.expect("writer");
        }
        let flushes = flushes.load(Ordering::SeqCst);
        assert!(
            flushes < 1_000,
            "1,000 writes took {flushes} flushes: group commit did not group"
        );
    }

    #[tokio::test]
    async fn a_failed_flush_fails_its_waiters_and_the_next_flush_is_tried_again() {
        let calls = Arc::new(AtomicU64::new(0));
        let commit = {
            let calls = calls.clone();
            GroupCommit::start(move || {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    Err("disk full".into())
                } else {
                    Ok(())
                }
            })
        };
        assert_eq!(
            commit.durable().await,
            Err(FlushError::Storage("disk full".into()))
        );
        assert_eq!(commit.durable().await, Ok(()));
    }

    #[tokio::test]
    async fn a_sled_write_is_on_disk_once_durable_resolves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path()).expect("open");
        let commit = GroupCommit::for_db(db.clone());
        db.insert(b"comment", b"hello").expect("insert");
        commit.durable().await.expect("durable");
        // sled's own flush counter: nothing dirty is left after our flush.
        assert_eq!(db.flush().expect("flush again"), 0);
    }
}
