//! The cores' voice-message types as the wire shows them (`chorus_protocol::voicemail`).

use chorus_protocol::{VmEntry, VmPage, VmPlay, VmState, VmUploadStatus};

use super::inbox::{InboxEntry, MessageState, Page};
use super::upload::UploadStatus;

/// An upload status on the wire.
pub fn status(status: UploadStatus) -> VmUploadStatus {
    match status {
        UploadStatus::Uploading => VmUploadStatus::Uploading,
        UploadStatus::Complete => VmUploadStatus::Complete,
        UploadStatus::Failed => VmUploadStatus::Failed,
        UploadStatus::Cancelled => VmUploadStatus::Cancelled,
    }
}

/// A message's state on the wire.
pub fn state(state: &MessageState) -> VmState {
    VmState {
        version: state.version,
        upload: status(state.upload),
        bytes: state.bytes,
        duration_ms: state.duration_ms,
        read: state.read,
        play: state.play.as_ref().map(|p| VmPlay {
            position_ms: p.position_ms,
            at_ms: p.at_ms,
            device: p.device.clone(),
        }),
    }
}

/// An inbox entry on the wire.
pub fn entry(entry: &InboxEntry) -> VmEntry {
    VmEntry {
        seq: entry.seq,
        message_id: entry.meta.message_id.clone(),
        sender: entry.meta.sender.clone(),
        conversation: entry.meta.conversation.clone(),
        created_at_ms: entry.meta.created_at_ms,
        codec: entry.meta.codec.clone(),
        state: state(&entry.state),
    }
}

/// A page on the wire.
pub fn page(page: &Page, last_seq: u64) -> VmPage {
    VmPage {
        entries: page.entries.iter().map(entry).collect(),
        next: page.next,
        last_seq,
    }
}
