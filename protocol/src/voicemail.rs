//! Voice messages on the wire (`docs/protocol.md` §14, SPEC M1-M6): request, response and
//! notification bodies of the `vm.*` kinds.
//!
//! Audio travels as standard base64 (with padding) in a string field in both encodings,
//! so the same body is valid JSON and MessagePack (a MessagePack `bin` is never a valid
//! string, §4.2). A chunk holds at most the node's `voicemail.chunk_bytes_max` decoded bytes
//! (32 KiB by default), which keeps its frame under the 64 KiB frame bound.

use serde::{Deserialize, Serialize};

/// Longest message id, bytes.
pub const MESSAGE_ID_BYTES_MAX: usize = 64;
/// Most recipients of one message (a group's size bound).
pub const RECIPIENTS_MAX: usize = 32;
/// Most audio bytes one `vm.fetch` returns.
pub const FETCH_BYTES_MAX: u32 = 32 * 1024;
/// Longest a `vm.fetch` may wait for more bytes, ms.
pub const FETCH_WAIT_MS_MAX: u64 = 30_000;

/// Where an upload is; the server decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmUploadStatus {
    /// Chunks are arriving.
    Uploading,
    /// Every byte is here.
    Complete,
    /// No chunk arrived for the node's `voicemail.upload_idle_ms`.
    Failed,
    /// The sender cancelled it.
    Cancelled,
}

/// `vm.send` body: starts a voice message to other users, or to a group the sender is in
/// (exactly one of `to` and `group`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSendRequest {
    /// The recipients' user ids: 1 to [`RECIPIENTS_MAX`], not the sender.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
    /// A group (`vm.group_create`): every other member receives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// Most characters in a group's name.
pub const GROUP_NAME_CHARS_MAX: usize = 100;

/// `vm.group_create` body: a group conversation of the sender and `members`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmGroupCreateRequest {
    /// The other members: 1 to [`RECIPIENTS_MAX`] user ids.
    pub members: Vec<String>,
    /// A name (at most [`GROUP_NAME_CHARS_MAX`] characters).
    #[serde(default)]
    pub name: Option<String>,
}

/// `vm.group_info` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmGroupInfoRequest {
    /// The group.
    pub group_id: String,
}

/// A group conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmGroup {
    /// Its id.
    pub group_id: String,
    /// Its conversation id (`group:<group_id>`), for `vm.history`.
    pub conversation: String,
    /// Its name (empty if none).
    pub name: String,
    /// Every member, the creator included, in byte order.
    pub members: Vec<String>,
    /// Who created it.
    pub created_by: String,
    /// When, ms since the epoch.
    pub created_at_ms: u64,
}

/// `vm.send` answer: the new message, with status `uploading` and no bytes yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSendResponse {
    /// The message's id (the server's).
    pub message_id: String,
    /// Its conversation (`direct:<a>:<b>` or `group:<sorted members>`).
    pub conversation: String,
    /// When the server started it, ms since the epoch.
    pub created_at_ms: u64,
}

/// `vm.chunk` body: audio bytes at `offset` of the message's Ogg Opus stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmChunkRequest {
    /// The message.
    pub message_id: String,
    /// Where the bytes go: at most the bytes held so far (see `vm.status`).
    pub offset: u64,
    /// The bytes, base64.
    pub data: String,
    /// The sender's last chunk: the upload completes when it ends on a page boundary.
    #[serde(default)]
    pub last: bool,
}

/// The answer to `vm.chunk`, `vm.status` and `vm.cancel`: where the upload stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmUploadState {
    /// The message.
    pub message_id: String,
    /// Bytes acknowledged: stored on two nodes (alone: flushed to disk). Resume here.
    pub acked: u64,
    /// The status.
    pub status: VmUploadStatus,
    /// Audio acknowledged, ms.
    pub duration_ms: u64,
}

/// `vm.status` body: where an upload stands (to resume it after a cut).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatusRequest {
    /// The message.
    pub message_id: String,
}

/// `vm.cancel` body: the sender gives up an upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmCancelRequest {
    /// The message.
    pub message_id: String,
}

/// `vm.fetch` body: audio bytes from `offset`; with `wait_ms`, waits for bytes not yet
/// uploaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmFetchRequest {
    /// The message.
    pub message_id: String,
    /// The first byte wanted.
    #[serde(default)]
    pub offset: u64,
    /// At most this many bytes (1 to [`FETCH_BYTES_MAX`]; default that).
    #[serde(default)]
    pub length: Option<u32>,
    /// When nothing is held at `offset` yet and the upload goes on, wait at most this long
    /// for bytes (0 to [`FETCH_WAIT_MS_MAX`]; default 0).
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

/// `vm.fetch` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmFetchResponse {
    /// The message.
    pub message_id: String,
    /// Where `data` starts.
    pub offset: u64,
    /// The bytes, base64 (empty when none are held at `offset` yet, or past the end).
    pub data: String,
    /// Bytes acknowledged so far.
    pub acked: u64,
    /// The upload's status: when `complete`, `acked` is the message's size.
    pub status: VmUploadStatus,
}

/// A message's state for one user (M5). A device keeps the state with the highest
/// `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// Raised by one on every change.
    pub version: u64,
    /// The upload's status, as the server last recorded it in the inbox (`uploading`
    /// until it ends; progress comes as `vm.bytes`).
    pub upload: VmUploadStatus,
    /// Bytes, when the upload ended (0 before).
    pub bytes: u64,
    /// Audio, ms, when the upload ended (0 before).
    pub duration_ms: u64,
    /// Read on some device of the user.
    pub read: bool,
    /// The latest play position, by the device's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub play: Option<VmPlay>,
}

/// A play position, as a device set it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPlay {
    /// Where, ms into the audio.
    pub position_ms: u64,
    /// The device's clock when it was set, ms since the epoch.
    pub at_ms: u64,
    /// The device that set it.
    pub device: String,
}

/// One message in a user's inbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEntry {
    /// Its number in the user's inbox: gapless from 1.
    pub seq: u64,
    /// The message.
    pub message_id: String,
    /// Who sent it.
    pub sender: String,
    /// Its conversation.
    pub conversation: String,
    /// When it was started, ms since the epoch (server clock).
    pub created_at_ms: u64,
    /// Always `opus` (in Ogg).
    pub codec: String,
    /// Its state for this user.
    pub state: VmState,
}

/// `vm.sync` body: a device reads its inbox after the last number it saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSyncRequest {
    /// The device's id (1 to 64 bytes; a user has at most 16 devices).
    pub device: String,
    /// The last inbox number the device has (0 for none).
    #[serde(default)]
    pub after: u64,
    /// At most this many entries (1 to 200; default 50).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// A page of the inbox or of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPage {
    /// Entries: in inbox order for `vm.sync`, newest first for `vm.history`.
    pub entries: Vec<VmEntry>,
    /// Where to continue (`after` for a sync, `before` for history); absent at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<u64>,
    /// The last inbox number given so far.
    pub last_seq: u64,
}

/// `vm.read` body: the user has heard the message (on any device: read everywhere).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmReadRequest {
    /// The message.
    pub message_id: String,
}

/// `vm.play` body: a device's play position (last writer by `at_ms` wins; ties by device).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPlayRequest {
    /// The message.
    pub message_id: String,
    /// The device.
    pub device: String,
    /// Where, ms into the audio.
    pub position_ms: u64,
    /// The device's clock now, ms since the epoch.
    pub at_ms: u64,
}

/// The answer to `vm.read` and `vm.play`: the message's state after the request (the same
/// as before when it changed nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStateEvent {
    /// The message.
    pub message_id: String,
    /// Its state for the user.
    pub state: VmState,
}

/// `vm.history` body: a conversation's messages, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmHistoryRequest {
    /// The conversation.
    pub conversation: String,
    /// Continue below this inbox number (the previous page's `next`); absent for the newest.
    #[serde(default)]
    pub before: Option<u64>,
    /// At most this many entries (1 to 200; default 50).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// `vm.message` notification: a message entered the user's inbox (sent to or by them).
pub type VmMessageEvent = VmEntry;

/// `vm.bytes` notification: more of a message's audio is stored (to its sender's other
/// devices and its recipients), or its upload ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmBytesEvent {
    /// The message.
    pub message_id: String,
    /// Bytes acknowledged so far.
    pub acked: u64,
    /// Audio acknowledged so far, ms.
    pub duration_ms: u64,
    /// The upload's status.
    pub status: VmUploadStatus,
}
