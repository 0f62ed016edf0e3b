//! What nodes say to each other about voice messages and users (`Domain::Voice`), and the
//! typed error the voice-message layer returns (the wire `ErrorBody` is built from it only
//! at the edge).

use bytes::Bytes;
use chorus_actors::voicemail::upload::ChunkRefusal;
use chorus_actors::voicemail::user::{CopyRefused, UserOp, UserState};
use chorus_protocol::{
    ErrorBody, ErrorCode, VmEntry, VmFetchResponse, VmPage, VmStateEvent, VmUploadState,
};
use serde::{Deserialize, Serialize};

use super::store::StoredMessage;

/// Why a voice-message request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum VoiceError {
    /// No such message, or the user may not see it.
    #[error("no voice message {0:?}")]
    NotFound(String),
    /// Only the sender may do this.
    #[error("only the sender may {0}")]
    NotSender(String),
    /// A chunk past the bytes held.
    #[error("out of order: the upload continues at byte {expected}")]
    OutOfOrder {
        /// Where to continue.
        expected: u64,
    },
    /// A chunk's bytes differ from those already uploaded.
    #[error("the chunk's bytes at {at} differ from the bytes already uploaded there")]
    Conflict {
        /// The first differing byte.
        at: u64,
    },
    /// A bound was passed (bytes, chunk bytes, duration).
    #[error("{0}")]
    TooLarge(String),
    /// Not Opus in Ogg.
    #[error("not Opus in Ogg: {0}")]
    NotOpus(String),
    /// The upload is over.
    #[error("the upload is {0}")]
    Closed(String),
    /// A bad argument.
    #[error("{0}")]
    Invalid(String),
    /// The owner cannot serve now (moved, unreachable, replication failed): retry.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or a storage failure.
    #[error("{0}")]
    Internal(String),
}

impl From<ChunkRefusal> for VoiceError {
    fn from(refusal: ChunkRefusal) -> Self {
        match refusal {
            ChunkRefusal::OutOfOrder { expected } => VoiceError::OutOfOrder { expected },
            ChunkRefusal::Mismatch { at } => VoiceError::Conflict { at },
            ChunkRefusal::TooLarge { .. }
            | ChunkRefusal::TooLong { .. }
            | ChunkRefusal::ChunkTooLarge { .. } => VoiceError::TooLarge(refusal.to_string()),
            ChunkRefusal::NotOpus(error) => VoiceError::NotOpus(error.to_string()),
            ChunkRefusal::Incomplete(why) => {
                VoiceError::NotOpus(format!("the upload cannot end here: {why}"))
            }
            ChunkRefusal::Over(status) => VoiceError::Closed(status.name().to_string()),
        }
    }
}

impl From<VoiceError> for ErrorBody {
    fn from(error: VoiceError) -> Self {
        let code = match &error {
            VoiceError::NotFound(_) => ErrorCode::MessageNotFound,
            VoiceError::NotSender(_) => ErrorCode::Forbidden,
            VoiceError::OutOfOrder { .. } => ErrorCode::UploadOutOfOrder,
            VoiceError::Conflict { .. } => ErrorCode::UploadConflict,
            VoiceError::TooLarge(_) => ErrorCode::MessageTooLarge,
            VoiceError::NotOpus(_) => ErrorCode::NotOpus,
            VoiceError::Closed(_) => ErrorCode::UploadClosed,
            VoiceError::Invalid(_) => ErrorCode::InvalidArgument,
            VoiceError::Unavailable(_) => ErrorCode::Unavailable,
            VoiceError::Internal(_) => ErrorCode::Internal,
        };
        ErrorBody::new(code, error.to_string())
    }
}

/// A request served by the owner of its key (a user's or a message's): the node that
/// receives it from a client forwards it there.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum OwnerRequest {
    /// An operation on a user's inbox.
    User {
        /// The user.
        user: String,
        /// The operation.
        op: UserOp,
    },
    /// A conversation's history for a user.
    History {
        /// The user.
        user: String,
        /// The conversation.
        conversation: String,
        /// Below this inbox number.
        before: Option<u64>,
        /// At most this many.
        limit: usize,
    },
    /// A new message.
    Create {
        /// Its record (status `uploading`, no bytes).
        record: StoredMessage,
    },
    /// A chunk of a message's audio, from `user`.
    Chunk {
        /// The message.
        message_id: String,
        /// Who sends it.
        user: String,
        /// Where it goes.
        offset: u64,
        /// The bytes.
        data: Bytes,
        /// The sender's last chunk.
        last: bool,
    },
    /// Where an upload stands.
    Status {
        /// The message.
        message_id: String,
        /// Who asks.
        user: String,
    },
    /// The sender cancels.
    Cancel {
        /// The message.
        message_id: String,
        /// Who asks.
        user: String,
    },
    /// Audio bytes.
    Fetch {
        /// The message.
        message_id: String,
        /// Who asks.
        user: String,
        /// From.
        offset: u64,
        /// At most.
        length: u32,
        /// Wait at most this long for bytes not yet uploaded, ms.
        wait_ms: u64,
    },
}

/// The owner's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum OwnerReply {
    /// A new inbox entry.
    Delivered(VmEntry),
    /// A message's state for the user.
    State(VmStateEvent),
    /// A page.
    Page(VmPage),
    /// Done, nothing to say.
    Done,
    /// Where an upload stands.
    Upload(VmUploadState),
    /// Audio.
    Fetch(VmFetchResponse),
}

/// What nodes say about voice messages and users.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum VoiceMessage {
    /// For the owner of the request's key.
    AtOwner(OwnerRequest),
    /// A new owner of a user claimed `epoch`: raise the fence, answer the copy held
    /// (`Option<(u64, UserState)>`).
    UserFence {
        /// The user.
        user: String,
        /// The new owner's epoch.
        epoch: u64,
    },
    /// Keep this copy of a user (`Result<(), CopyRefused>`).
    UserKeep {
        /// The user.
        user: String,
        /// Its owner's epoch.
        epoch: u64,
        /// The state.
        state: UserState,
    },
    /// Apply an operation to the copy of a user (`Result<(), CopyRefused>`).
    UserApply {
        /// The user.
        user: String,
        /// Its owner's epoch.
        epoch: u64,
        /// The revision the operation follows.
        base: u64,
        /// The operation.
        op: UserOp,
    },
    /// The record held of a message (`Option<StoredMessage>`).
    MessageHeld {
        /// The message.
        message_id: String,
    },
    /// Audio held of a message (`Bytes`).
    MessageRead {
        /// The message.
        message_id: String,
        /// From.
        offset: u64,
        /// At most.
        len: u32,
    },
    /// Keep a message's record and the audio at `offset` (`Result<(), u64>`: `Err` with
    /// the bytes held when they do not reach `offset`).
    MessageAppend {
        /// The record (status, duration) after the piece.
        record: StoredMessage,
        /// Where the piece starts.
        offset: u64,
        /// The piece.
        piece: Bytes,
    },
    /// Delete a message's copy (`()`).
    MessageDelete {
        /// The message.
        message_id: String,
    },
    /// Deliver a notification to these users' sessions on this node (`()`).
    Notify {
        /// The users.
        users: Vec<String>,
        /// The notification kind.
        kind: String,
        /// Its MessagePack body.
        msgpack: Bytes,
        /// Its JSON body.
        json: Bytes,
    },
}

/// A replica's answer to a user copy.
pub type CopyAnswer = Result<(), CopyRefused>;
