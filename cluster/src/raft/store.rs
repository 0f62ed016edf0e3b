//! The sled-backed Raft log and state machine.
//!
//! One `sled::Db` per node (the caller's), three trees in it:
//! - [`LOG_TREE`]: the log, key = big-endian `u64` index (so sled's byte order is log order),
//!   value = MessagePack [`Entry`];
//! - [`META_TREE`]: the vote, the last committed log id and the last purged log id;
//! - [`STATE_MACHINE_TREE`]: the applied state (the [`ClusterMetadata`], the last applied log
//!   id and the last membership, as one value so they change atomically) and the current
//!   snapshot.
//!
//! Durability: sled is flushed where openraft needs it: a vote before `save_vote` returns, log
//! entries before the append callback fires, a snapshot before it is reported built or
//! installed. The applied state and the committed log id are written without a flush: after a
//! crash openraft re-applies the durable log from whatever applied state survived.
//!
//! **sled 0.34's flush is not an fsync on Linux**: it is `sync_file_range`, which survives a
//! process crash (SIGKILL) but not necessarily a power loss or a disk that lies about its write
//! cache. What protects an acknowledged metadata write against a lost machine is replication:
//! a write is acknowledged only once a quorum of voters has it, so one lost disk loses nothing.
//!
//! Cost: every applied batch clones and rewrites the whole metadata (one sled value). That
//! is cheap for thousands of members, rooms and definitions; at millions of definitions they
//! would want a tree of their own, keyed like the log.
//!
//! This module does not know about the network or about `MetadataRaft`; it only implements
//! openraft's storage traits.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use futures_util::{Stream, TryStreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{
    EntryResponder, IOFlushed, LogState, RaftLogReader, RaftLogStorage, RaftSnapshotBuilder,
    RaftStateMachine,
};
use openraft::{EntryPayload, OptionalSend};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::types::{Entry, LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig, Vote};
use crate::metadata::{ClusterMetadata, MetadataResponse};

/// The sled tree holding the Raft log.
pub const LOG_TREE: &str = "raft/log";
/// The sled tree holding the vote, committed and last purged log ids.
pub const META_TREE: &str = "raft/meta";
/// The sled tree holding the applied state and the current snapshot.
pub const STATE_MACHINE_TREE: &str = "raft/state_machine";

const VOTE_KEY: &[u8] = b"vote";
const COMMITTED_KEY: &[u8] = b"committed";
const LAST_PURGED_KEY: &[u8] = b"last_purged";
const APPLIED_KEY: &[u8] = b"applied";
const SNAPSHOT_KEY: &[u8] = b"snapshot";

/// Bound on compare-and-swap retries when storing a snapshot: only a snapshot build racing a
/// snapshot install contend for the key, so more than a few rounds means something is wrong.
const SNAPSHOT_STORE_ATTEMPTS_MAX: usize = 16;

fn encode<T: Serialize + ?Sized>(value: &T) -> io::Result<Vec<u8>> {
    rmp_serde::to_vec_named(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    rmp_serde::from_slice(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Flushes `tree` on the blocking pool. sled's `flush_async` blocks the calling thread
/// while it writes; with two runtime workers, two flushes at once stalled every task
/// (including the timers that bound Raft requests).
pub(crate) async fn flush(tree: &sled::Tree) -> io::Result<()> {
    let tree = tree.clone();
    tokio::task::spawn_blocking(move || tree.flush().map(|_| ()).map_err(sled_error))
        .await
        .map_err(|e| io::Error::other(format!("flush task: {e}")))?
}

fn sled_error(e: sled::Error) -> io::Error {
    io::Error::other(e)
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn key_index(key: &[u8]) -> io::Result<u64> {
    <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("raft log key of {} bytes, expected 8", key.len()),
            )
        })
}

/// The Raft log and vote, in sled. Cloning is cheap (sled trees are shared handles); a clone
/// is also the log reader used by replication tasks.
#[derive(Debug, Clone)]
pub struct LogStore {
    log: sled::Tree,
    meta: sled::Tree,
}

impl LogStore {
    /// Opens (creating if absent) the log trees of `db`.
    pub fn open(db: &sled::Db) -> io::Result<Self> {
        Ok(Self {
            log: db.open_tree(LOG_TREE).map_err(sled_error)?,
            meta: db.open_tree(META_TREE).map_err(sled_error)?,
        })
    }

    fn meta_value<T: DeserializeOwned>(&self, key: &[u8]) -> io::Result<Option<T>> {
        match self.meta.get(key).map_err(sled_error)? {
            Some(bytes) => decode(&bytes).map(Some),
            None => Ok(None),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &[u8], value: &T) -> io::Result<()> {
        self.meta.insert(key, encode(value)?).map_err(sled_error)?;
        Ok(())
    }

    fn last_entry_log_id(&self) -> io::Result<Option<LogId>> {
        match self.log.last().map_err(sled_error)? {
            Some((_, bytes)) => Ok(Some(decode::<Entry>(&bytes)?.log_id())),
            None => Ok(None),
        }
    }

    /// Removes every entry with index >= `from`, atomically (one sled batch), so no hole is
    /// ever visible.
    fn remove_from(&self, from: u64) -> io::Result<()> {
        let mut batch = sled::Batch::default();
        for item in self.log.range(index_key(from)..).keys() {
            batch.remove(item.map_err(sled_error)?);
        }
        self.log.apply_batch(batch).map_err(sled_error)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(index) => *index,
            Bound::Excluded(index) => match index.checked_add(1) {
                Some(start) => start,
                None => return Ok(Vec::new()),
            },
            Bound::Unbounded => 0,
        };
        // Exclusive end; `None` is unbounded.
        let end = match range.end_bound() {
            Bound::Included(index) => index.checked_add(1),
            Bound::Excluded(index) => Some(*index),
            Bound::Unbounded => None,
        };
        let items = match end {
            Some(end) if end <= start => return Ok(Vec::new()),
            Some(end) => self.log.range(index_key(start)..index_key(end)),
            None => self.log.range(index_key(start)..),
        };
        let mut entries = Vec::new();
        for item in items {
            let (key, bytes) = item.map_err(sled_error)?;
            let index = key_index(&key)?;
            let entry: Entry = decode(&bytes)?;
            if entry.index() != index {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("raft log key {index} holds entry {}", entry.log_id()),
                ));
            }
            if let Some(previous) = entries.last().map(|e: &Entry| e.index()) {
                if previous + 1 != index {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("hole in the raft log between {previous} and {index}"),
                    ));
                }
            }
            entries.push(entry);
        }
        Ok(entries)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.meta_value(VOTE_KEY)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id: Option<LogId> = self.meta_value(LAST_PURGED_KEY)?;
        let last_log_id = match self.last_entry_log_id()? {
            Some(last) => Some(last),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.put_meta(VOTE_KEY, vote)?;
        // A vote must be durable before it is acted upon: a node that forgets its vote could
        // vote twice in one term.
        flush(&self.meta).await?;
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Not flushed: losing it only means waiting for the leader to re-announce the commit
        // index before the state machine catches up after a restart.
        match committed {
            Some(log_id) => self.put_meta(COMMITTED_KEY, &log_id),
            None => self
                .meta
                .remove(COMMITTED_KEY)
                .map(|_| ())
                .map_err(sled_error),
        }
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        self.meta_value(COMMITTED_KEY)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            batch.insert(&index_key(entry.index()), encode(&entry)?);
        }
        // Readable from here on (openraft requires it before we return) ...
        self.log.apply_batch(batch).map_err(sled_error)?;
        // ... durable only once flushed: report that from a task so the Raft core is not
        // blocked on the disk. A flush covers every earlier write, so completions may arrive
        // out of order without acknowledging anything unflushed.
        let log = self.log.clone();
        tokio::spawn(async move {
            let flushed = flush(&log).await;
            callback.io_completed(flushed);
        });
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = match last_log_id {
            Some(log_id) => log_id.index() + 1,
            None => 0,
        };
        self.remove_from(from)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // Record the purge point first: entries at or below it are then ignored even if the
        // removal below is interrupted.
        self.put_meta(LAST_PURGED_KEY, &log_id)?;
        let mut batch = sled::Batch::default();
        for key in self.log.range(..=index_key(log_id.index())).keys() {
            batch.remove(key.map_err(sled_error)?);
        }
        self.log.apply_batch(batch).map_err(sled_error)
    }
}

/// The applied state as stored: one value so metadata, last applied and membership never
/// disagree on disk.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AppliedState {
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    metadata: Arc<ClusterMetadata>,
}

/// A snapshot as stored in [`STATE_MACHINE_TREE`].
#[derive(Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// Stores `meta`/`data` as the current snapshot unless a snapshot at or beyond it is already
/// stored (a build that started before an install must not overwrite the installed one).
fn store_snapshot(tree: &sled::Tree, meta: &SnapshotMeta, data: &[u8]) -> io::Result<()> {
    let new = encode(&StoredSnapshot {
        meta: meta.clone(),
        data: data.to_vec(),
    })?;
    for _ in 0..SNAPSHOT_STORE_ATTEMPTS_MAX {
        let current = tree.get(SNAPSHOT_KEY).map_err(sled_error)?;
        if let Some(bytes) = &current {
            let stored: StoredSnapshot = decode(bytes)?;
            if stored.meta.last_log_id >= meta.last_log_id {
                return Ok(());
            }
        }
        let swapped = tree
            .compare_and_swap(SNAPSHOT_KEY, current, Some(new.as_slice()))
            .map_err(sled_error)?;
        if swapped.is_ok() {
            return Ok(());
        }
    }
    Err(io::Error::other(format!(
        "snapshot key still contended after {SNAPSHOT_STORE_ATTEMPTS_MAX} attempts"
    )))
}

/// The metadata state machine: [`ClusterMetadata`] in memory, published on a watch channel
/// for local (possibly stale) reads. It is durable through the log and snapshots: a
/// snapshot (built every `snapshot_interval_entries`) is stored in sled before the log it
/// covers is purged, and a restart loads it and re-applies the committed entries after it
/// (writing the whole state after every batch made each write cost O(metadata size)).
#[derive(Debug)]
pub struct StateMachineStore {
    tree: sled::Tree,
    state: AppliedState,
    published: watch::Sender<Arc<ClusterMetadata>>,
}

impl StateMachineStore {
    /// Opens (creating if absent) the state-machine tree of `db` and loads the state of the
    /// latest snapshot; openraft re-applies the committed log entries after it.
    pub fn open(db: &sled::Db) -> io::Result<Self> {
        let tree = db.open_tree(STATE_MACHINE_TREE).map_err(sled_error)?;
        let from_snapshot = match tree.get(SNAPSHOT_KEY).map_err(sled_error)? {
            Some(bytes) => {
                let stored: StoredSnapshot = decode(&bytes)?;
                Some(AppliedState {
                    last_applied: stored.meta.last_log_id,
                    last_membership: stored.meta.last_membership,
                    metadata: Arc::new(decode(&stored.data)?),
                })
            }
            None => None,
        };
        // Data dirs from before snapshots alone held the state may have a full state saved
        // after every batch: take whichever is further along.
        let legacy: Option<AppliedState> = match tree.get(APPLIED_KEY).map_err(sled_error)? {
            Some(bytes) => Some(decode(&bytes)?),
            None => None,
        };
        let state = match (from_snapshot, legacy) {
            (Some(a), Some(b)) => {
                if b.last_applied > a.last_applied {
                    b
                } else {
                    a
                }
            }
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => AppliedState::default(),
        };
        state.metadata.check_invariants();
        let (published, _) = watch::channel(state.metadata.clone());
        Ok(Self {
            tree,
            state,
            published,
        })
    }

    /// A receiver of the applied metadata: updated after every applied batch, before openraft
    /// learns the batch is applied (so a linearizable read that waited for the apply sees it).
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterMetadata>> {
        self.published.subscribe()
    }

    fn current_snapshot(&self) -> io::Result<Option<Snapshot>> {
        match self.tree.get(SNAPSHOT_KEY).map_err(sled_error)? {
            Some(bytes) => {
                let stored: StoredSnapshot = decode(&bytes)?;
                Ok(Some(Snapshot {
                    meta: stored.meta,
                    snapshot: stored.data,
                }))
            }
            None => Ok(None),
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.state.last_applied, self.state.last_membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        // Bounded by the batch openraft hands us (at most the committed, unapplied entries).
        let mut responders = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            let log_id = entry.log_id();
            let response = match entry.payload {
                EntryPayload::Blank => MetadataResponse::Ok,
                EntryPayload::Normal(command) => {
                    Arc::make_mut(&mut self.state.metadata).apply(command)
                }
                EntryPayload::Membership(membership) => {
                    self.state.last_membership = StoredMembership::new(Some(log_id), membership);
                    MetadataResponse::Ok
                }
            };
            self.state.last_applied = Some(log_id);
            if let Some(responder) = responder {
                responders.push((responder, response));
            }
        }
        self.published.send_replace(self.state.metadata.clone());
        for (responder, response) in responders {
            responder.send(response);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            tree: self.tree.clone(),
            last_applied: self.state.last_applied,
            last_membership: self.state.last_membership.clone(),
            metadata: self.state.metadata.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Self::SnapshotData,
    ) -> Result<(), io::Error> {
        let metadata: ClusterMetadata = decode(&snapshot)?;
        metadata.check_invariants();
        self.state = AppliedState {
            last_applied: meta.last_log_id,
            last_membership: meta.last_membership.clone(),
            metadata: Arc::new(metadata),
        };
        store_snapshot(&self.tree, meta, &snapshot)?;
        flush(&self.tree).await?;
        self.published.send_replace(self.state.metadata.clone());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        self.current_snapshot()
    }
}

/// A point-in-time view of the state machine that serializes itself into a snapshot off the
/// state-machine task.
#[derive(Debug)]
pub struct SnapshotBuilder {
    tree: sled::Tree,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    metadata: Arc<ClusterMetadata>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let data = encode(&*self.metadata)?;
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.last_membership.clone(),
        };
        store_snapshot(&self.tree, &meta, &data)?;
        // Durable before openraft purges the log entries it covers.
        flush(&self.tree).await?;
        Ok(Snapshot {
            meta,
            snapshot: data,
        })
    }
}

/// Decodes snapshot bytes into metadata: used to refuse a malformed snapshot from the network
/// before it reaches the state machine (where a decode failure would stop the node).
pub(crate) fn decode_snapshot_data(data: &[u8]) -> io::Result<ClusterMetadata> {
    decode(data)
}

#[cfg(test)]
mod tests;
