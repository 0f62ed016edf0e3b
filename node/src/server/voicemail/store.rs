//! Voice messages on disk (SPEC M2): each message's record and its acknowledged audio, in
//! sled, on the message's owner and on its replica.
//!
//! - `vm/meta`: message id → [`StoredMessage`] (who, to whom, status, bytes held, the
//!   ownership epoch that wrote it).
//! - `vm/audio`: message id, a zero byte, the piece's offset (u64 big-endian) → the
//!   piece's bytes. Pieces are appended in order, page-aligned (what the upload
//!   acknowledged), so a range read is a prefix scan.
//!
//! - `vm/users`: user id → [`UserCopy`] (a user actor's fenced copy).
//!
//! An append names the offset it continues from and is taken only there (in step): the
//! record's byte count and the piece are written in one sled transaction, so the two never
//! disagree after a crash. Deleting a message removes its record and every piece.

use chorus_actors::voicemail::inbox::MessageMeta;
use chorus_actors::voicemail::upload::UploadStatus;
use chorus_actors::voicemail::user::{CopyRefused, UserCopies, UserCopy, UserOp, UserState};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

/// The tree of message records.
pub const VM_META_TREE: &str = "vm/meta";
/// The tree of audio pieces.
pub const VM_AUDIO_TREE: &str = "vm/audio";

/// A message as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Who sent it, to which conversation, when.
    pub meta: MessageMeta,
    /// Every user whose inbox gets it (the sender included).
    pub recipients: Vec<String>,
    /// The ownership epoch of the owner that wrote it last.
    pub epoch: u64,
    /// The upload's status.
    pub status: UploadStatus,
    /// Audio bytes held (acknowledged).
    pub bytes: u64,
    /// Audio held, ms.
    pub duration_ms: u64,
    /// Every inbox in `recipients` has the message.
    #[serde(default)]
    pub delivered: bool,
}

/// Why a write was not taken. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreRefused {
    /// No record of the message here.
    #[error("no voice message {0:?} here")]
    Unknown(String),
    /// The append does not continue what is held.
    #[error("out of step: {held} bytes are held")]
    OutOfStep {
        /// Bytes held.
        held: u64,
    },
    /// A newer owner wrote the message.
    #[error("stale ownership epoch: the message is at epoch {0}")]
    Stale(u64),
    /// sled failed.
    #[error("storage: {0}")]
    Storage(String),
}

fn audio_key(message_id: &str, offset: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(message_id.len() + 9);
    key.extend_from_slice(message_id.as_bytes());
    key.push(0);
    key.extend_from_slice(&offset.to_be_bytes());
    key
}

fn audio_prefix(message_id: &str) -> Vec<u8> {
    let mut key = message_id.as_bytes().to_vec();
    key.push(0);
    key
}

/// The voice messages this node holds.
pub struct MessageStore {
    meta: sled::Tree,
    audio: sled::Tree,
}

impl MessageStore {
    /// The messages in `db`.
    ///
    /// # Errors
    ///
    /// sled's, opening the trees.
    pub fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        Ok(MessageStore {
            meta: db.open_tree(VM_META_TREE)?,
            audio: db.open_tree(VM_AUDIO_TREE)?,
        })
    }

    /// The record of `message_id`.
    pub fn get(&self, message_id: &str) -> Option<StoredMessage> {
        let bytes = self.meta.get(message_id.as_bytes()).ok()??;
        rmp_serde::from_slice(&bytes).ok()
    }

    /// Writes a message's record (a new message, a status change), written at
    /// `record.epoch`, merged with the record held: the status moves only forward from
    /// `uploading`, `delivered` only from false to true, and the byte count stays what the
    /// held audio says (only [`MessageStore::append`] changes it). The record now held.
    ///
    /// # Errors
    ///
    /// [`StoreRefused::Stale`] if a newer owner wrote it; [`StoreRefused::Storage`].
    pub fn put(
        &self,
        message_id: &str,
        record: &StoredMessage,
    ) -> Result<StoredMessage, StoreRefused> {
        let merged = match self.get(message_id) {
            Some(held) => {
                if held.epoch > record.epoch {
                    return Err(StoreRefused::Stale(held.epoch));
                }
                let mut merged = held.clone();
                merged.epoch = record.epoch;
                if !held.status.is_final() {
                    merged.status = record.status;
                }
                merged.delivered |= record.delivered;
                merged
            }
            None => StoredMessage {
                bytes: 0,
                ..record.clone()
            },
        };
        let bytes =
            rmp_serde::to_vec_named(&merged).map_err(|e| StoreRefused::Storage(e.to_string()))?;
        self.meta
            .insert(message_id.as_bytes(), bytes)
            .map_err(|e| StoreRefused::Storage(e.to_string()))?;
        Ok(merged)
    }

    /// Every message record held.
    pub fn records(&self) -> Vec<StoredMessage> {
        self.meta
            .iter()
            .values()
            .filter_map(Result::ok)
            .filter_map(|bytes| rmp_serde::from_slice::<StoredMessage>(&bytes).ok())
            .collect()
    }

    /// Appends `piece` at `offset` (where the held audio ends) and updates the record to
    /// `status` and `duration_ms`, written at `epoch`: both in one transaction.
    ///
    /// # Errors
    ///
    /// [`StoreRefused::Unknown`], [`StoreRefused::OutOfStep`] (the offset is not where the
    /// held audio ends; an append that ends within what is held is a retry and is taken
    /// as done: the owner's upload checked its bytes),
    /// [`StoreRefused::Stale`], [`StoreRefused::Storage`].
    pub fn append(
        &self,
        message_id: &str,
        epoch: u64,
        offset: u64,
        piece: &[u8],
        status: UploadStatus,
        duration_ms: u64,
    ) -> Result<StoredMessage, StoreRefused> {
        let result = (&self.meta, &self.audio).transaction(|(meta, audio)| {
            let abort = ConflictableTransactionError::Abort;
            let Some(bytes) = meta.get(message_id.as_bytes())? else {
                return Err(abort(StoreRefused::Unknown(message_id.to_string())));
            };
            let mut record: StoredMessage = rmp_serde::from_slice(&bytes)
                .map_err(|e| abort(StoreRefused::Storage(e.to_string())))?;
            if record.epoch > epoch {
                return Err(abort(StoreRefused::Stale(record.epoch)));
            }
            if offset.saturating_add(piece.len() as u64) <= record.bytes && offset <= record.bytes {
                // A repeat of what is held (a retry after a lost answer).
                return Ok(record);
            }
            if offset != record.bytes {
                return Err(abort(StoreRefused::OutOfStep { held: record.bytes }));
            }
            if !piece.is_empty() {
                audio.insert(audio_key(message_id, offset), piece)?;
            }
            record.bytes += piece.len() as u64;
            record.epoch = epoch;
            if !record.status.is_final() {
                record.status = status;
            }
            record.duration_ms = record.duration_ms.max(duration_ms);
            let encoded = rmp_serde::to_vec_named(&record)
                .map_err(|e| abort(StoreRefused::Storage(e.to_string())))?;
            meta.insert(message_id.as_bytes(), encoded)?;
            Ok(record)
        });
        result.map_err(|e| match e {
            TransactionError::Abort(refused) => refused,
            TransactionError::Storage(error) => StoreRefused::Storage(error.to_string()),
        })
    }

    /// Audio bytes of `message_id` from `offset`, at most `len`.
    pub fn read(&self, message_id: &str, offset: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let end = offset.saturating_add(len as u64);
        for entry in self.audio.scan_prefix(audio_prefix(message_id)) {
            let Ok((key, piece)) = entry else {
                break;
            };
            let Some(at) = key
                .get(key.len().saturating_sub(8)..)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
            else {
                continue;
            };
            let piece_end = at + piece.len() as u64;
            if piece_end <= offset {
                continue;
            }
            if at >= end {
                break;
            }
            let from = offset.saturating_sub(at) as usize;
            let to = (end.min(piece_end) - at) as usize;
            out.extend_from_slice(&piece[from..to]);
        }
        out
    }

    /// Removes `message_id`'s record and audio; whether it was held.
    ///
    /// # Errors
    ///
    /// sled's.
    pub fn delete(&self, message_id: &str) -> Result<bool, sled::Error> {
        let held = self.meta.remove(message_id.as_bytes())?.is_some();
        for key in self.audio.scan_prefix(audio_prefix(message_id)).keys() {
            self.audio.remove(key?)?;
        }
        Ok(held)
    }

    /// The messages created before `cutoff_ms` (for retention).
    pub fn older_than(&self, cutoff_ms: u64) -> Vec<String> {
        self.meta
            .iter()
            .values()
            .filter_map(Result::ok)
            .filter_map(|bytes| rmp_serde::from_slice::<StoredMessage>(&bytes).ok())
            .filter(|record| record.meta.created_at_ms < cutoff_ms)
            .map(|record| record.meta.message_id)
            .collect()
    }
}

/// The tree of user copies: user id → [`UserCopy`].
pub const VM_USERS_TREE: &str = "vm/users";

/// Why a user copy was not kept. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum UserCopyRefused {
    /// The core refused it (a newer owner, or out of step).
    #[error("{0:?}")]
    Refused(CopyRefused),
    /// sled failed.
    #[error("storage: {0}")]
    Storage(String),
}

/// The user copies this node holds (as owner or replica), in sled: each write reads the
/// user's copy, lets [`UserCopies`] decide, and writes it back, one user at a time.
pub struct UserStore {
    tree: sled::Tree,
    lock: std::sync::Mutex<()>,
}

impl UserStore {
    /// The user copies in `db`.
    ///
    /// # Errors
    ///
    /// sled's, opening the tree.
    pub fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        Ok(UserStore {
            tree: db.open_tree(VM_USERS_TREE)?,
            lock: std::sync::Mutex::new(()),
        })
    }

    fn load(&self, user: &str) -> Option<UserCopy> {
        let bytes = self.tree.get(user.as_bytes()).ok()??;
        rmp_serde::from_slice(&bytes).ok()
    }

    fn with_copy<T>(
        &self,
        user: &str,
        decide: impl FnOnce(&mut UserCopies) -> Result<T, CopyRefused>,
    ) -> Result<T, UserCopyRefused> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let held = self.load(user);
        let mut copies = UserCopies::from_copies(held.clone().map(|c| (user.to_string(), c)));
        let answer = decide(&mut copies).map_err(UserCopyRefused::Refused)?;
        let after = copies.copy(user).cloned();
        if after != held {
            if let Some(copy) = after {
                let bytes = rmp_serde::to_vec_named(&copy)
                    .map_err(|e| UserCopyRefused::Storage(e.to_string()))?;
                self.tree
                    .insert(user.as_bytes(), bytes)
                    .map_err(|e| UserCopyRefused::Storage(e.to_string()))?;
            }
        }
        Ok(answer)
    }

    /// Keeps `state` at `epoch` (see [`UserCopies::keep`]).
    ///
    /// # Errors
    ///
    /// The core's refusal, or sled's.
    pub fn keep(&self, user: &str, epoch: u64, state: UserState) -> Result<(), UserCopyRefused> {
        self.with_copy(user, |copies| copies.keep(user, epoch, state).map(|_| ()))
    }

    /// Applies `op` at `epoch` on revision `base` (see [`UserCopies::apply`]).
    ///
    /// # Errors
    ///
    /// The core's refusal, or sled's.
    pub fn apply(
        &self,
        user: &str,
        epoch: u64,
        base: u64,
        op: &UserOp,
    ) -> Result<(), UserCopyRefused> {
        self.with_copy(user, |copies| {
            copies.apply(user, epoch, base, op).map(|_| ())
        })
    }

    /// Raises the fence (a new owner's claim); the copy held.
    ///
    /// # Errors
    ///
    /// sled's.
    pub fn fence(
        &self,
        user: &str,
        epoch: u64,
    ) -> Result<Option<(u64, UserState)>, UserCopyRefused> {
        self.with_copy(user, |copies| Ok(copies.fence(user, epoch).0))
    }

    /// Every user with a copy here.
    pub fn users(&self) -> Vec<String> {
        self.tree
            .iter()
            .keys()
            .filter_map(Result::ok)
            .map(|key| String::from_utf8_lossy(&key).into_owned())
            .collect()
    }

    /// Forgets `user`'s copy (the user is owned and replicated elsewhere).
    ///
    /// # Errors
    ///
    /// sled's.
    pub fn forget(&self, user: &str) -> Result<(), sled::Error> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.tree.remove(user.as_bytes()).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_actors::voicemail::inbox::direct_conversation;

    fn record(id: &str) -> StoredMessage {
        StoredMessage {
            meta: MessageMeta {
                message_id: id.into(),
                sender: "ann".into(),
                conversation: direct_conversation("ann", "bob"),
                created_at_ms: 1_000,
                codec: "opus".into(),
            },
            recipients: vec!["ann".into(), "bob".into()],
            epoch: 1,
            status: UploadStatus::Uploading,
            bytes: 0,
            duration_ms: 0,
            delivered: false,
        }
    }

    #[test]
    fn pieces_append_in_step_read_by_range_and_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sled::open(dir.path()).expect("db");
        let store = MessageStore::open(&db).expect("open");
        store.put("m1", &record("m1")).expect("put");
        let audio: Vec<u8> = (0..250u8).collect();
        store
            .append("m1", 1, 0, &audio[..100], UploadStatus::Uploading, 20)
            .expect("first");
        assert_eq!(
            store.append("m1", 1, 150, &audio[150..], UploadStatus::Uploading, 40),
            Err(StoreRefused::OutOfStep { held: 100 })
        );
        // A retry of the first piece is taken as done.
        assert_eq!(
            store
                .append("m1", 1, 0, &audio[..100], UploadStatus::Uploading, 20)
                .map(|r| r.bytes),
            Ok(100)
        );
        let done = store
            .append("m1", 1, 100, &audio[100..], UploadStatus::Complete, 60)
            .expect("second");
        assert_eq!((done.bytes, done.status), (250, UploadStatus::Complete));
        assert_eq!(store.read("m1", 0, 1_000), audio);
        assert_eq!(store.read("m1", 90, 20), audio[90..110].to_vec());
        assert_eq!(store.read("m1", 240, 100), audio[240..].to_vec());
        assert!(store.read("m1", 250, 10).is_empty());
        drop(store);
        let store = MessageStore::open(&db).expect("reopen");
        assert_eq!(store.get("m1").map(|r| r.bytes), Some(250));
        assert_eq!(store.read("m1", 0, 1_000), audio);
    }

    #[test]
    fn a_stale_owner_is_refused_and_a_delete_removes_everything() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sled::open(dir.path()).expect("db");
        let store = MessageStore::open(&db).expect("open");
        let mut newer = record("m1");
        newer.epoch = 3;
        store.put("m1", &newer).expect("put");
        assert_eq!(
            store.put("m1", &record("m1")).err(),
            Some(StoreRefused::Stale(3))
        );
        assert_eq!(
            store.append("m1", 2, 0, b"x", UploadStatus::Uploading, 0),
            Err(StoreRefused::Stale(3))
        );
        assert_eq!(
            store.append("nope", 3, 0, b"x", UploadStatus::Uploading, 0),
            Err(StoreRefused::Unknown("nope".into()))
        );
        store
            .append("m1", 3, 0, b"abc", UploadStatus::Uploading, 0)
            .expect("append");
        assert_eq!(store.older_than(2_000), vec!["m1".to_string()]);
        assert_eq!(store.delete("m1"), Ok(true));
        assert_eq!(store.get("m1"), None);
        assert!(store.read("m1", 0, 10).is_empty());
        assert_eq!(db.open_tree(VM_AUDIO_TREE).expect("tree").len(), 0);
    }
}
