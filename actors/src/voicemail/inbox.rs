//! A user's inbox (SPEC M3, M5, M6), sans-IO: the core of the user actor.
//!
//! - **Inbox.** Every message to or from the user gets the next inbox sequence number,
//!   once (delivering the same message again changes nothing): numbers are gapless from
//!   1 and never reused. A device syncs from the last number it saw, in pages.
//! - **State (M5).** Per message: the upload status and size the server reports (status
//!   only moves forward from `uploading`, size only grows), `read` (read on any device is
//!   read everywhere: it only goes from false to true), and the play position
//!   (last-writer-wins by the device's timestamp, ties broken by the device id, so every
//!   copy converges whatever the order of updates). Each change that changes something
//!   raises the message's version by one; the shell pushes the new state with its version
//!   to every device, and a device keeps the state with the highest version.
//! - **History (M6).** A conversation's messages newest first, in pages with a cursor (the
//!   inbox number to continue below).
//! - **Bounds.** Devices per user, messages kept per user (the oldest are forgotten first
//!   by retention; their numbers are never reused).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::upload::UploadStatus;

/// Devices one user may have.
pub const DEVICES_MAX: usize = 16;
/// Longest device id, bytes.
pub const DEVICE_ID_BYTES_MAX: usize = 64;
/// Most entries a sync or history page returns.
pub const PAGE_MAX: usize = 200;

/// A message as every recipient's inbox records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageMeta {
    /// The message's id.
    pub message_id: String,
    /// Its sender.
    pub sender: String,
    /// Its conversation: `direct:<a>:<b>` (the two users in order) or `group:<id>`.
    pub conversation: String,
    /// When the sender started it, ms since the epoch (server clock).
    pub created_at_ms: u64,
    /// Always `opus` (in Ogg).
    pub codec: String,
}

/// The conversation id of two users (the same from either side).
pub fn direct_conversation(a: &str, b: &str) -> String {
    let (first, second) = if a <= b { (a, b) } else { (b, a) };
    format!("direct:{first}:{second}")
}

/// A play position, as a device set it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlayPosition {
    /// Where, ms into the audio.
    pub position_ms: u64,
    /// The device's clock when it was set, ms since the epoch.
    pub at_ms: u64,
    /// The device that set it.
    pub device: String,
}

/// A message's state for one user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageState {
    /// Raised by one on every change.
    pub version: u64,
    /// The upload's status (the server's).
    pub upload: UploadStatus,
    /// Bytes acknowledged so far.
    pub bytes: u64,
    /// Audio acknowledged so far, ms.
    pub duration_ms: u64,
    /// Read on some device.
    pub read: bool,
    /// The latest play position.
    pub play: Option<PlayPosition>,
}

/// One inbox entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxEntry {
    /// Its inbox number.
    pub seq: u64,
    /// The message.
    pub meta: MessageMeta,
    /// Its state for this user.
    pub state: MessageState,
}

/// Why an inbox request was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InboxRefusal {
    /// No such message in this inbox.
    #[error("no message {0:?} in this inbox")]
    UnknownMessage(String),
    /// Too many devices.
    #[error("a user has at most {0} devices")]
    TooManyDevices(usize),
    /// A device id that is empty or too long.
    #[error("a device id has 1 to {DEVICE_ID_BYTES_MAX} bytes")]
    BadDevice,
}

/// A page of the inbox (sync) or of a conversation (history).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    /// Entries: in inbox order for a sync, newest first for history.
    pub entries: Vec<InboxEntry>,
    /// Where to continue (`after` for a sync, `before` for history); `None` at the end.
    pub next: Option<u64>,
}

/// A user's inbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inbox {
    /// The last inbox number given.
    last_seq: u64,
    /// Entries kept, by number.
    entries: BTreeMap<u64, InboxEntry>,
    /// Message id to number.
    by_message: BTreeMap<String, u64>,
    /// Conversation to its numbers.
    conversations: BTreeMap<String, BTreeSet<u64>>,
    /// Device to the last number it synced.
    devices: BTreeMap<String, u64>,
}

impl Inbox {
    /// The last inbox number given (0 for none).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The entry of `message_id`, if the inbox holds it.
    pub fn entry(&self, message_id: &str) -> Option<&InboxEntry> {
        self.by_message
            .get(message_id)
            .and_then(|seq| self.entries.get(seq))
    }

    /// The devices and the last number each synced.
    pub fn devices(&self) -> &BTreeMap<String, u64> {
        &self.devices
    }

    /// Records `meta` with its first `state` (version 1); its entry, and whether it is new
    /// (a message already here is not numbered again).
    pub fn deliver(
        &mut self,
        meta: MessageMeta,
        upload: UploadStatus,
        bytes: u64,
        duration_ms: u64,
    ) -> (&InboxEntry, bool) {
        if let Some(&seq) = self.by_message.get(&meta.message_id) {
            return (&self.entries[&seq], false);
        }
        self.last_seq += 1;
        let seq = self.last_seq;
        self.by_message.insert(meta.message_id.clone(), seq);
        self.conversations
            .entry(meta.conversation.clone())
            .or_default()
            .insert(seq);
        let entry = InboxEntry {
            seq,
            meta,
            state: MessageState {
                version: 1,
                upload,
                bytes,
                duration_ms,
                read: false,
                play: None,
            },
        };
        self.entries.insert(seq, entry);
        self.checked();
        (&self.entries[&seq], true)
    }

    fn state_mut(&mut self, message_id: &str) -> Result<&mut MessageState, InboxRefusal> {
        let seq = self
            .by_message
            .get(message_id)
            .ok_or_else(|| InboxRefusal::UnknownMessage(message_id.to_string()))?;
        self.entries
            .get_mut(seq)
            .map(|entry| &mut entry.state)
            .ok_or_else(|| InboxRefusal::UnknownMessage(message_id.to_string()))
    }

    /// The server's news of the upload: `Some(new state)` if it changed anything (status
    /// forward from `uploading`, more bytes or audio).
    ///
    /// # Errors
    ///
    /// [`InboxRefusal::UnknownMessage`].
    pub fn upload_changed(
        &mut self,
        message_id: &str,
        upload: UploadStatus,
        bytes: u64,
        duration_ms: u64,
    ) -> Result<Option<MessageState>, InboxRefusal> {
        let state = self.state_mut(message_id)?;
        let status_moves = state.upload == UploadStatus::Uploading && upload.is_final();
        if !status_moves && bytes <= state.bytes && duration_ms <= state.duration_ms {
            return Ok(None);
        }
        if status_moves {
            state.upload = upload;
        }
        state.bytes = state.bytes.max(bytes);
        state.duration_ms = state.duration_ms.max(duration_ms);
        state.version += 1;
        Ok(Some(state.clone()))
    }

    /// A device read the message: `Some(new state)` the first time.
    ///
    /// # Errors
    ///
    /// [`InboxRefusal::UnknownMessage`].
    pub fn mark_read(&mut self, message_id: &str) -> Result<Option<MessageState>, InboxRefusal> {
        let state = self.state_mut(message_id)?;
        if state.read {
            return Ok(None);
        }
        state.read = true;
        state.version += 1;
        Ok(Some(state.clone()))
    }

    /// A device set the play position at its time `at_ms`: `Some(new state)` if it is
    /// later than the one held (by `(at_ms, device)`).
    ///
    /// # Errors
    ///
    /// [`InboxRefusal::UnknownMessage`], [`InboxRefusal::BadDevice`].
    pub fn set_play(
        &mut self,
        message_id: &str,
        play: PlayPosition,
    ) -> Result<Option<MessageState>, InboxRefusal> {
        check_device(&play.device)?;
        let state = self.state_mut(message_id)?;
        let later = match &state.play {
            None => true,
            Some(held) => (play.at_ms, &play.device) > (held.at_ms, &held.device),
        };
        if !later {
            return Ok(None);
        }
        state.play = Some(play);
        state.version += 1;
        Ok(Some(state.clone()))
    }

    /// Device `device` syncs the entries after `after` (at most `limit`, bounded by
    /// [`PAGE_MAX`]); what it has now seen is recorded.
    ///
    /// # Errors
    ///
    /// [`InboxRefusal::BadDevice`], [`InboxRefusal::TooManyDevices`] for a new device past
    /// the bound.
    pub fn sync(&mut self, device: &str, after: u64, limit: usize) -> Result<Page, InboxRefusal> {
        check_device(device)?;
        if !self.devices.contains_key(device) && self.devices.len() >= DEVICES_MAX {
            return Err(InboxRefusal::TooManyDevices(DEVICES_MAX));
        }
        let limit = limit.clamp(1, PAGE_MAX);
        let entries: Vec<InboxEntry> = self
            .entries
            .range(after + 1..)
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect();
        let seen = entries.last().map_or(after, |e| e.seq).min(self.last_seq);
        let held = self.devices.entry(device.to_string()).or_insert(0);
        *held = (*held).max(seen);
        let next = entries
            .last()
            .filter(|e| e.seq < self.last_seq && self.entries.range(e.seq + 1..).next().is_some())
            .map(|e| e.seq);
        Ok(Page { entries, next })
    }

    /// A conversation's messages newest first: those numbered below `before` (all if
    /// `None`), at most `limit` (bounded by [`PAGE_MAX`]).
    pub fn history(&self, conversation: &str, before: Option<u64>, limit: usize) -> Page {
        let limit = limit.clamp(1, PAGE_MAX);
        let Some(seqs) = self.conversations.get(conversation) else {
            return Page {
                entries: Vec::new(),
                next: None,
            };
        };
        let below = before.unwrap_or(u64::MAX);
        let entries: Vec<InboxEntry> = seqs
            .range(..below)
            .rev()
            .take(limit)
            .filter_map(|seq| self.entries.get(seq).cloned())
            .collect();
        let next = entries
            .last()
            .filter(|e| seqs.range(..e.seq).next().is_some())
            .map(|e| e.seq);
        Page { entries, next }
    }

    /// Forgets messages (retention or deletion); how many were held. Their numbers are
    /// not reused.
    pub fn forget(&mut self, message_ids: &[String]) -> usize {
        let mut forgotten = 0;
        for message_id in message_ids {
            if let Some(seq) = self.by_message.remove(message_id) {
                if let Some(entry) = self.entries.remove(&seq) {
                    if let Some(seqs) = self.conversations.get_mut(&entry.meta.conversation) {
                        seqs.remove(&seq);
                        if seqs.is_empty() {
                            self.conversations.remove(&entry.meta.conversation);
                        }
                    }
                    forgotten += 1;
                }
            }
        }
        self.checked();
        forgotten
    }

    /// The messages created before `cutoff_ms` (for retention).
    pub fn older_than(&self, cutoff_ms: u64) -> Vec<String> {
        self.entries
            .values()
            .filter(|e| e.meta.created_at_ms < cutoff_ms)
            .map(|e| e.meta.message_id.clone())
            .collect()
    }

    /// Panics if the indexes disagree or a number is above the last given.
    pub fn check_invariants(&self) {
        assert_eq!(self.entries.len(), self.by_message.len());
        for (seq, entry) in &self.entries {
            assert_eq!(*seq, entry.seq);
            assert!(*seq >= 1 && *seq <= self.last_seq, "number out of range");
            assert_eq!(self.by_message.get(&entry.meta.message_id), Some(seq));
            assert!(self
                .conversations
                .get(&entry.meta.conversation)
                .is_some_and(|s| s.contains(seq)));
            assert!(entry.state.version >= 1);
        }
        let indexed: usize = self.conversations.values().map(BTreeSet::len).sum();
        assert_eq!(indexed, self.entries.len());
        assert!(self.devices.len() <= DEVICES_MAX);
    }

    fn checked(&self) {
        #[cfg(debug_assertions)]
        self.check_invariants();
    }
}

fn check_device(device: &str) -> Result<(), InboxRefusal> {
    if device.is_empty() || device.len() > DEVICE_ID_BYTES_MAX {
        return Err(InboxRefusal::BadDevice);
    }
    Ok(())
}

/// Of two copies of a message's state, the one a device keeps: the higher version.
pub fn newer<'a>(a: &'a MessageState, b: &'a MessageState) -> &'a MessageState {
    if b.version > a.version {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: &str, from: &str, to: &str, at: u64) -> MessageMeta {
        MessageMeta {
            message_id: id.into(),
            sender: from.into(),
            conversation: direct_conversation(from, to),
            created_at_ms: at,
            codec: "opus".into(),
        }
    }

    fn play(position_ms: u64, at_ms: u64, device: &str) -> PlayPosition {
        PlayPosition {
            position_ms,
            at_ms,
            device: device.into(),
        }
    }

    #[test]
    fn messages_are_numbered_once_gaplessly_and_synced_in_pages() {
        let mut inbox = Inbox::default();
        for i in 0..5 {
            let (entry, new) = inbox.deliver(
                meta(&format!("m{i}"), "ann", "bob", i),
                UploadStatus::Uploading,
                0,
                0,
            );
            assert!(new);
            assert_eq!(entry.seq, i + 1);
        }
        let (again, new) = inbox.deliver(meta("m2", "ann", "bob", 2), UploadStatus::Complete, 9, 9);
        assert!(!new);
        assert_eq!(again.seq, 3);
        assert_eq!(inbox.last_seq(), 5);
        let page = inbox.sync("phone", 0, 2).expect("sync");
        assert_eq!(
            page.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(page.next, Some(2));
        let page = inbox.sync("phone", 2, 10).expect("sync");
        assert_eq!(
            page.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(page.next, None);
        assert_eq!(inbox.devices()["phone"], 5);
    }

    #[test]
    fn read_merges_and_raises_the_version_once() {
        let mut inbox = Inbox::default();
        inbox.deliver(meta("m", "ann", "bob", 1), UploadStatus::Uploading, 0, 0);
        let read = inbox.mark_read("m").expect("known").expect("changed");
        assert_eq!((read.read, read.version), (true, 2));
        assert_eq!(inbox.mark_read("m"), Ok(None));
        assert_eq!(
            inbox.mark_read("x"),
            Err(InboxRefusal::UnknownMessage("x".into()))
        );
    }

    /// Two devices set positions in every interleaving: every order ends with the latest
    /// by (timestamp, device), and versions only rise.
    #[test]
    fn play_positions_converge_on_the_latest_in_every_order() {
        let updates = [
            play(1_000, 50, "phone"),
            play(2_000, 70, "laptop"),
            play(3_000, 70, "phone"),
            play(500, 60, "laptop"),
        ];
        let mut orders = vec![vec![]];
        for _ in 0..updates.len() {
            let mut next = Vec::new();
            for order in &orders {
                for i in 0..updates.len() {
                    if !order.contains(&i) {
                        let mut o = order.clone();
                        o.push(i);
                        next.push(o);
                    }
                }
            }
            orders = next;
        }
        for order in orders {
            let mut inbox = Inbox::default();
            inbox.deliver(meta("m", "ann", "bob", 1), UploadStatus::Complete, 10, 10);
            let mut version = 1;
            for i in order {
                if let Some(state) = inbox.set_play("m", updates[i].clone()).expect("set") {
                    assert!(state.version > version);
                    version = state.version;
                }
            }
            // (70, "phone") > (70, "laptop") > (60, …) > (50, …).
            assert_eq!(
                inbox.entry("m").and_then(|e| e.state.play.clone()),
                Some(play(3_000, 70, "phone"))
            );
        }
    }

    #[test]
    fn the_upload_status_only_moves_forward_and_sizes_only_grow() {
        let mut inbox = Inbox::default();
        inbox.deliver(meta("m", "ann", "bob", 1), UploadStatus::Uploading, 100, 20);
        let grew = inbox
            .upload_changed("m", UploadStatus::Uploading, 300, 60)
            .expect("known")
            .expect("changed");
        assert_eq!((grew.bytes, grew.version), (300, 2));
        assert_eq!(
            inbox.upload_changed("m", UploadStatus::Uploading, 200, 40),
            Ok(None)
        );
        let done = inbox
            .upload_changed("m", UploadStatus::Complete, 300, 60)
            .expect("known")
            .expect("changed");
        assert_eq!(done.upload, UploadStatus::Complete);
        // A late, stale report does not move it back.
        assert_eq!(
            inbox.upload_changed("m", UploadStatus::Failed, 300, 60),
            Ok(None)
        );
        assert_eq!(
            inbox.entry("m").map(|e| e.state.upload),
            Some(UploadStatus::Complete)
        );
    }

    #[test]
    fn history_pages_are_complete_and_newest_first() {
        let mut inbox = Inbox::default();
        for i in 0..7u64 {
            let other = if i % 2 == 0 { "ann" } else { "cat" };
            inbox.deliver(
                meta(&format!("m{i}"), other, "bob", i),
                UploadStatus::Complete,
                1,
                1,
            );
        }
        let conversation = direct_conversation("bob", "ann");
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let page = inbox.history(&conversation, before, 2);
            seen.extend(page.entries.iter().map(|e| e.meta.message_id.clone()));
            match page.next {
                Some(next) => before = Some(next),
                None => break,
            }
        }
        assert_eq!(seen, vec!["m6", "m4", "m2", "m0"]);
        assert!(inbox.history("direct:x:y", None, 5).entries.is_empty());
    }

    #[test]
    fn devices_are_bounded_and_forgetting_keeps_the_numbers() {
        let mut inbox = Inbox::default();
        for d in 0..DEVICES_MAX {
            inbox.sync(&format!("d{d}"), 0, 1).expect("device");
        }
        assert_eq!(
            inbox.sync("one-more", 0, 1),
            Err(InboxRefusal::TooManyDevices(DEVICES_MAX))
        );
        assert_eq!(inbox.sync("", 0, 1), Err(InboxRefusal::BadDevice));
        inbox.deliver(meta("old", "ann", "bob", 1), UploadStatus::Complete, 1, 1);
        inbox.deliver(
            meta("new", "ann", "bob", 1_000),
            UploadStatus::Complete,
            1,
            1,
        );
        assert_eq!(inbox.older_than(500), vec!["old".to_string()]);
        assert_eq!(inbox.forget(&["old".into()]), 1);
        let (entry, _) = inbox.deliver(
            meta("newer", "ann", "bob", 2_000),
            UploadStatus::Complete,
            1,
            1,
        );
        assert_eq!(entry.seq, 3, "numbers are never reused");
        inbox.check_invariants();
    }

    #[test]
    fn a_device_keeps_the_higher_version() {
        let a = MessageState {
            version: 3,
            upload: UploadStatus::Complete,
            bytes: 1,
            duration_ms: 1,
            read: true,
            play: None,
        };
        let b = MessageState {
            version: 2,
            ..a.clone()
        };
        assert_eq!(newer(&a, &b).version, 3);
        assert_eq!(newer(&b, &a).version, 3);
    }
}
