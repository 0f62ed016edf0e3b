//! `Voicemail`: voice messages (SPEC M1-M6) on this node: the user actors it owns, the
//! uploads it owns, the copies it keeps for other owners, and the routing between them.
//!
//! **Placement.** A user's actor lives on the ring owner of `user/<id>`, a message's upload
//! and audio on the owner of `vm/<id>`; any node takes a client's request and forwards it
//! to the owner ([`Voicemail::at_owner`]). Each owner serializes the work on one key
//! behind that key's cell (a `tokio` mutex), so keys never wait for each other.
//!
//! **User actors.** Activated on the first request after a start, a move or a failover:
//! the owner claims the key's ownership epoch through Raft, fences every live node (each
//! answers the copy it holds, `UserFence`), continues from the most advanced copy by
//! (epoch, revision) and copies it to the next node of the ring. Each operation that
//! changes the state is applied here, written to this node's sled, and sent (the operation,
//! with the revision it follows) to the next node of the ring before the answer; a replica
//! out of step gets the whole state. A replica refusing the epoch (a newer owner exists)
//! stops the actor. Alone, the owner waits for a flush of its own disk instead.
//!
//! **Messages.** The audio is append-only and written by one sender, so no epoch is
//! claimed: each piece of acknowledged audio is appended here and on the next node of the
//! ring at the exact offset where the held audio ends (a replica behind is sent what it
//! lacks), and only bytes on two nodes are acknowledged, pushed or served. A new owner
//! (after a failover or a ring change) gathers the records of every live node and pulls
//! the audio it lacks from the most advanced before it serves.
//!
//! **Delivery.** When the first bytes are acknowledged, the message enters every
//! participant's inbox (the user actors' `Deliver`, idempotent, retried until it holds);
//! when the upload ends, each inbox records the end. Progress (`vm.bytes`) goes to every
//! participant's sessions on every node without going through the inboxes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use chorus_actors::voicemail::inbox::{
    direct_conversation, InboxRefusal, MessageMeta, PlayPosition,
};
use chorus_actors::voicemail::upload::{Upload, UploadLimits, UploadStatus};
use chorus_actors::voicemail::user::{most_advanced, CopyRefused, UserEffect, UserOp, UserState};
use chorus_actors::voicemail::wire;
use chorus_cluster::metadata::{MetadataCommand, MetadataResponse, NodeId};
use chorus_protocol::{
    EncodedBody, Encoding, ErrorBody, Event, VmBytesEvent, VmChunkRequest, VmFetchRequest,
    VmFetchResponse, VmGroup, VmGroupCreateRequest, VmHistoryRequest, VmPage, VmPlayRequest,
    VmSendResponse, VmStateEvent, VmSyncRequest, VmUploadState, FETCH_BYTES_MAX, FETCH_WAIT_MS_MAX,
    GROUP_NAME_CHARS_MAX, MESSAGE_ID_BYTES_MAX, RECIPIENTS_MAX,
};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::server::common::codec::{decode, encode, request, Domain};
use crate::server::common::keys::{group_key, message_key, user_key, ActorKey};
use crate::server::context::NodeContext;
use crate::server::voicemail::messages::{OwnerReply, OwnerRequest, VoiceError, VoiceMessage};
use crate::server::voicemail::store::{MessageStore, StoredMessage, UserCopyRefused, UserStore};

/// A request forwarded to an owner waits at most this long (plus a fetch's own wait); the
/// inter-node call itself gives up after 5 s.
pub const OWNER_CALL_TIMEOUT_MS: u64 = 10_000;
/// A fetch's wait is sent to the owner in parts of at most this long, so that each fits
/// an inter-node call.
pub const OWNER_WAIT_PART_MS: u64 = 3_000;
/// A copy to a replica, a fence or a gather waits at most this long per node.
pub const COPY_TIMEOUT_MS: u64 = 1_000;
/// A new owner waits at most this long to apply its own ownership claim.
pub const CLAIM_APPLIED_TIMEOUT_MS: u64 = 5_000;
/// The nodes after the owner that a copy may go to, in ring order.
pub const REPLICA_CANDIDATES_MAX: usize = 2;
/// A user actor with no request for this long is released (its copies stay).
pub const USER_IDLE_RELEASE_MS: u64 = 300_000;
/// A finished message with no request for this long leaves memory (its audio stays).
pub const MESSAGE_IDLE_RELEASE_MS: u64 = 60_000;
/// The largest piece of audio pulled from another node at once.
pub const PULL_PIECE_BYTES: u32 = 64 * 1024;
/// Longest user id in a recipient list, bytes.
pub const USER_ID_BYTES_MAX: usize = 128;
/// Forwarding attempts for a request whose owner moved or could not serve.
const OWNER_ATTEMPTS: u32 = 3;
/// Every how often the upkeep runs (idle uploads, releases).
const UPKEEP_PERIOD_MS: u64 = 1_000;
/// Every how many upkeep rounds the sweeps run (retention, unsettled messages), at most;
/// a short retention sweeps more often (a quarter of it, at least every round).
const SWEEP_EVERY_ROUNDS_MAX: u64 = 30;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A user actor: its state at the epoch it was activated with.
struct ActiveUser {
    epoch: u64,
    state: UserState,
    used_ms: u64,
}

/// A message on its owner.
struct ActiveMessage {
    record: StoredMessage,
    upload: Upload,
    /// Bytes known to be on another node (alone: flushed): what may be acknowledged.
    replicated: u64,
    /// (acknowledged bytes, status), for fetches waiting for more.
    progress: watch::Sender<(u64, UploadStatus)>,
    used_ms: u64,
}

type Cell<T> = Arc<tokio::sync::Mutex<Option<T>>>;

/// Voice messages and user actors on this node.
pub struct Voicemail {
    ctx: Arc<NodeContext>,
    store: MessageStore,
    copies: UserStore,
    users: StdMutex<HashMap<String, Cell<ActiveUser>>>,
    messages: StdMutex<HashMap<String, Cell<ActiveMessage>>>,
    limits: UploadLimits,
}

fn lock<T>(mutex: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn inbox_error(refusal: InboxRefusal) -> VoiceError {
    match refusal {
        InboxRefusal::UnknownMessage(id) => VoiceError::NotFound(id),
        other => VoiceError::Invalid(other.to_string()),
    }
}

fn storage(error: impl std::fmt::Display) -> VoiceError {
    VoiceError::Internal(format!("storage: {error}"))
}

fn check_message_id(message_id: &str) -> Result<(), VoiceError> {
    if message_id.is_empty() || message_id.len() > MESSAGE_ID_BYTES_MAX {
        return Err(VoiceError::Invalid(format!(
            "message_id must be 1 to {MESSAGE_ID_BYTES_MAX} bytes"
        )));
    }
    Ok(())
}

impl OwnerRequest {
    /// The ring key whose owner serves it.
    fn key(&self) -> String {
        match self {
            OwnerRequest::User { user, .. } | OwnerRequest::History { user, .. } => user_key(user),
            OwnerRequest::Create { record } => message_key(&record.meta.message_id),
            OwnerRequest::Chunk { message_id, .. }
            | OwnerRequest::Status { message_id, .. }
            | OwnerRequest::Cancel { message_id, .. }
            | OwnerRequest::Fetch { message_id, .. } => message_key(message_id),
        }
    }
}

impl Voicemail {
    /// Opens the stores in the node's sled.
    ///
    /// # Errors
    ///
    /// sled's.
    pub fn open(ctx: Arc<NodeContext>) -> Result<Arc<Self>, sled::Error> {
        let voice = &ctx.config.voicemail;
        let limits = UploadLimits {
            bytes_max: voice.message_bytes_max,
            duration_ms_max: voice.message_duration_ms_max,
            idle_ms: voice.upload_idle_ms,
            chunk_bytes_max: voice.chunk_bytes_max,
        };
        Ok(Arc::new(Voicemail {
            store: MessageStore::open(&ctx.db)?,
            copies: UserStore::open(&ctx.db)?,
            users: StdMutex::new(HashMap::new()),
            messages: StdMutex::new(HashMap::new()),
            limits,
            ctx,
        }))
    }

    // ---- Client requests (any node) -------------------------------------------------

    /// `vm.send`: a new message from `user` to the users `to`, or to the other members of
    /// `group`.
    pub(crate) async fn send(
        &self,
        user: &str,
        to: Vec<String>,
        group: Option<String>,
    ) -> Result<VmSendResponse, VoiceError> {
        let (recipients, conversation) = match group {
            Some(group_id) => {
                if !to.is_empty() {
                    return Err(VoiceError::Invalid(
                        "give either to or group, not both".into(),
                    ));
                }
                let group = self.group(&group_id).await?;
                if !group.members.iter().any(|m| m == user) {
                    return Err(VoiceError::NotFound(format!("group {group_id}")));
                }
                let others: Vec<String> = group.members.into_iter().filter(|m| m != user).collect();
                (others, group.conversation)
            }
            None => {
                let recipients = check_users(user, to)?;
                let conversation = if recipients.len() == 1 {
                    direct_conversation(user, &recipients[0])
                } else {
                    let mut members: Vec<&str> = recipients.iter().map(String::as_str).collect();
                    members.push(user);
                    members.sort_unstable();
                    format!("group:{}", members.join(","))
                };
                (recipients, conversation)
            }
        };
        if recipients.is_empty() {
            return Err(VoiceError::Invalid("the group has no other member".into()));
        }
        let message_id = crate::server::sessions::session::random_id("vm-");
        let created_at_ms = now_ms();
        let mut participants = recipients;
        participants.push(user.to_string());
        let record = StoredMessage {
            meta: MessageMeta {
                message_id: message_id.clone(),
                sender: user.to_string(),
                conversation: conversation.clone(),
                created_at_ms,
                codec: "opus".into(),
            },
            recipients: participants,
            epoch: 0,
            status: UploadStatus::Uploading,
            bytes: 0,
            duration_ms: 0,
            delivered: false,
        };
        self.at_owner(OwnerRequest::Create { record }).await?;
        metrics::counter!("chorus_vm_messages_total").increment(1);
        Ok(VmSendResponse {
            message_id,
            conversation,
            created_at_ms,
        })
    }

    /// `vm.chunk`.
    pub(crate) async fn chunk(
        &self,
        user: &str,
        chunk: VmChunkRequest,
    ) -> Result<VmUploadState, VoiceError> {
        check_message_id(&chunk.message_id)?;
        let encoded_max = self.limits.chunk_bytes_max.div_ceil(3) * 4;
        if chunk.data.len() > encoded_max {
            return Err(VoiceError::TooLarge(format!(
                "a chunk holds at most {} bytes",
                self.limits.chunk_bytes_max
            )));
        }
        let data = base64::engine::general_purpose::STANDARD
            .decode(chunk.data.as_bytes())
            .map_err(|e| VoiceError::Invalid(format!("data is not base64: {e}")))?;
        self.upload_at_owner(OwnerRequest::Chunk {
            message_id: chunk.message_id,
            user: user.to_string(),
            offset: chunk.offset,
            data: Bytes::from(data),
            last: chunk.last,
        })
        .await
    }

    /// Serves an upload request (chunk, status, cancel) on the message's owner: its state.
    async fn upload_at_owner(&self, request: OwnerRequest) -> Result<VmUploadState, VoiceError> {
        match self.at_owner(request).await? {
            OwnerReply::Upload(state) => Ok(state),
            other => Err(unexpected(other)),
        }
    }

    /// `vm.status`.
    pub(crate) async fn status(
        &self,
        user: &str,
        message_id: String,
    ) -> Result<VmUploadState, VoiceError> {
        check_message_id(&message_id)?;
        self.upload_at_owner(OwnerRequest::Status {
            message_id,
            user: user.to_string(),
        })
        .await
    }

    /// `vm.cancel`.
    pub(crate) async fn cancel(
        &self,
        user: &str,
        message_id: String,
    ) -> Result<VmUploadState, VoiceError> {
        check_message_id(&message_id)?;
        self.upload_at_owner(OwnerRequest::Cancel {
            message_id,
            user: user.to_string(),
        })
        .await
    }

    /// `vm.fetch` (also the HTTP range endpoint).
    pub(crate) async fn fetch(
        &self,
        user: &str,
        fetch: VmFetchRequest,
    ) -> Result<VmFetchResponse, VoiceError> {
        check_message_id(&fetch.message_id)?;
        let length = fetch.length.unwrap_or(FETCH_BYTES_MAX);
        if length == 0 || length > FETCH_BYTES_MAX {
            return Err(VoiceError::Invalid(format!(
                "length must be 1 to {FETCH_BYTES_MAX}"
            )));
        }
        let wait_ms = fetch.wait_ms.unwrap_or(0);
        if wait_ms > FETCH_WAIT_MS_MAX {
            return Err(VoiceError::Invalid(format!(
                "wait_ms must be at most {FETCH_WAIT_MS_MAX}"
            )));
        }
        let started = std::time::Instant::now();
        let deadline = started + Duration::from_millis(wait_ms);
        // A long wait goes to the owner in parts that fit an inter-node call.
        let answer = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let part = (left.as_millis() as u64).min(OWNER_WAIT_PART_MS);
            let request = OwnerRequest::Fetch {
                message_id: fetch.message_id.clone(),
                user: user.to_string(),
                offset: fetch.offset,
                length,
                wait_ms: part,
            };
            let answer = match self.at_owner(request).await {
                Ok(OwnerReply::Fetch(answer)) => answer,
                Ok(other) => return Err(unexpected(other)),
                Err(error) => return Err(error),
            };
            let waiting = answer.data.is_empty()
                && answer.status == chorus_protocol::VmUploadStatus::Uploading
                && std::time::Instant::now() < deadline;
            if !waiting {
                break answer;
            }
        };
        metrics::histogram!("chorus_vm_fetch_seconds").record(started.elapsed().as_secs_f64());
        Ok(answer)
    }

    /// `vm.sync`.
    pub(crate) async fn sync(&self, user: &str, sync: VmSyncRequest) -> Result<VmPage, VoiceError> {
        metrics::counter!("chorus_vm_syncs_total").increment(1);
        let op = UserOp::Sync {
            device: sync.device,
            after: sync.after,
            limit: page_limit(sync.limit)?,
        };
        match self.user_op(user, op).await? {
            OwnerReply::Page(page) => Ok(page),
            other => Err(unexpected(other)),
        }
    }

    /// `vm.read`.
    pub(crate) async fn read(
        &self,
        user: &str,
        message_id: String,
    ) -> Result<VmStateEvent, VoiceError> {
        check_message_id(&message_id)?;
        match self.user_op(user, UserOp::Read { message_id }).await? {
            OwnerReply::State(state) => Ok(state),
            other => Err(unexpected(other)),
        }
    }

    /// `vm.play`.
    pub(crate) async fn play(
        &self,
        user: &str,
        play: VmPlayRequest,
    ) -> Result<VmStateEvent, VoiceError> {
        check_message_id(&play.message_id)?;
        let op = UserOp::Play {
            message_id: play.message_id,
            play: PlayPosition {
                position_ms: play.position_ms,
                at_ms: play.at_ms,
                device: play.device,
            },
        };
        match self.user_op(user, op).await? {
            OwnerReply::State(state) => Ok(state),
            other => Err(unexpected(other)),
        }
    }

    /// `vm.history`.
    pub(crate) async fn history(
        &self,
        user: &str,
        history: VmHistoryRequest,
    ) -> Result<VmPage, VoiceError> {
        if history.conversation.is_empty() || history.conversation.len() > 8 * 1024 {
            return Err(VoiceError::Invalid(
                "conversation must be 1 to 8192 bytes".into(),
            ));
        }
        let request = OwnerRequest::History {
            user: user.to_string(),
            conversation: history.conversation,
            before: history.before,
            limit: page_limit(history.limit)?,
        };
        match self.at_owner(request).await? {
            OwnerReply::Page(page) => Ok(page),
            other => Err(unexpected(other)),
        }
    }

    /// `vm.group_create`: a group of `user` and `members`, a definition in the cluster's
    /// metadata (Raft): every node reads its members from there.
    pub(crate) async fn group_create(
        &self,
        user: &str,
        request: VmGroupCreateRequest,
    ) -> Result<VmGroup, VoiceError> {
        let others = check_users(user, request.members)?;
        let name = request.name.unwrap_or_default();
        if name.chars().count() > GROUP_NAME_CHARS_MAX {
            return Err(VoiceError::Invalid(format!(
                "a group name has at most {GROUP_NAME_CHARS_MAX} characters"
            )));
        }
        let group_id = crate::server::sessions::session::random_id("g-");
        let mut members = others;
        members.push(user.to_string());
        members.sort();
        let group = VmGroup {
            conversation: format!("group:{group_id}"),
            group_id: group_id.clone(),
            name,
            members,
            created_by: user.to_string(),
            created_at_ms: now_ms(),
        };
        let value = rmp_serde::to_vec_named(&group)
            .map_err(|e| VoiceError::Internal(format!("encode a group: {e}")))?;
        let put = MetadataCommand::PutDefinition {
            key: group_key(&group_id),
            value,
        };
        match self.ctx.cluster.write(put).await {
            Ok(MetadataResponse::Ok) => Ok(group),
            Ok(other) => Err(VoiceError::Unavailable(format!(
                "group not stored: {other:?}"
            ))),
            Err(error) => Err(VoiceError::Unavailable(format!(
                "group not stored: {error}"
            ))),
        }
    }

    /// `vm.group_info`: the group, for its members.
    pub(crate) async fn group_info(
        &self,
        user: &str,
        group_id: &str,
    ) -> Result<VmGroup, VoiceError> {
        let group = self.group(group_id).await?;
        if !group.members.iter().any(|m| m == user) {
            return Err(VoiceError::NotFound(format!("group {group_id}")));
        }
        Ok(group)
    }

    /// The group's definition; one catch-up with the leader before "not found" (it may have
    /// just been created through another node).
    async fn group(&self, group_id: &str) -> Result<VmGroup, VoiceError> {
        if group_id.is_empty() || group_id.len() > MESSAGE_ID_BYTES_MAX {
            return Err(VoiceError::Invalid(format!(
                "group_id must be 1 to {MESSAGE_ID_BYTES_MAX} bytes"
            )));
        }
        let key = group_key(group_id);
        for attempt in 0..2 {
            let held = self.ctx.cluster.metadata().definitions.get(&key).cloned();
            if let Some(bytes) = held {
                return rmp_serde::from_slice(&bytes)
                    .map_err(|e| VoiceError::Internal(format!("group {group_id}: {e}")));
            }
            if attempt == 0 {
                let caught = tokio::time::timeout(
                    Duration::from_millis(CLAIM_APPLIED_TIMEOUT_MS),
                    self.ctx.cluster.catch_up(),
                )
                .await;
                if !matches!(caught, Ok(Ok(_))) {
                    return Err(VoiceError::Unavailable(
                        "cannot reach the cluster's leader to look the group up".into(),
                    ));
                }
            }
        }
        Err(VoiceError::NotFound(format!("group {group_id}")))
    }

    async fn user_op(&self, user: &str, op: UserOp) -> Result<OwnerReply, VoiceError> {
        self.at_owner(OwnerRequest::User {
            user: user.to_string(),
            op,
        })
        .await
    }

    // ---- Routing ----------------------------------------------------------------------

    /// Serves `request` on the owner of its key: here, or forwarded. A request the owner
    /// could not serve (it moved, a replica did not answer) is tried again, at most
    /// [`OWNER_ATTEMPTS`] times; every request kind is idempotent.
    async fn at_owner(&self, request: OwnerRequest) -> Result<OwnerReply, VoiceError> {
        let key = request.key();
        let wait_ms = match &request {
            OwnerRequest::Fetch { wait_ms, .. } => *wait_ms,
            _ => 0,
        };
        let self_id = self.ctx.cluster.node_id();
        let mut result = Err(VoiceError::Unavailable("no owner".into()));
        for attempt in 0..OWNER_ATTEMPTS {
            let owner = self.ctx.owner_of_key(&key);
            result = if owner == self_id {
                self.serve(request.clone()).await
            } else {
                self.forward(owner, &request, wait_ms).await
            };
            match &result {
                Err(VoiceError::Unavailable(why)) if attempt + 1 < OWNER_ATTEMPTS => {
                    tracing::debug!(%key, owner, why, "voice request: the owner could not serve; again");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt + 1))).await;
                }
                _ => break,
            }
        }
        result
    }

    async fn forward(
        &self,
        owner: NodeId,
        request: &OwnerRequest,
        wait_ms: u64,
    ) -> Result<OwnerReply, VoiceError> {
        let message = request_bytes(&VoiceMessage::AtOwner(request.clone()));
        let call = self.ctx.cluster.call_app(owner, message);
        let deadline = Duration::from_millis(OWNER_CALL_TIMEOUT_MS + wait_ms);
        match tokio::time::timeout(deadline, call).await {
            Ok(Ok(reply)) => match decode::<Result<OwnerReply, VoiceError>>(&reply) {
                Ok(answer) => answer,
                // A node that is stopping, or could not read the request, answers an
                // `ErrorBody`.
                Err(_) => match decode::<Result<(), ErrorBody>>(&reply) {
                    Ok(Err(error)) => Err(VoiceError::Unavailable(format!(
                        "the owner (node {owner}): {}",
                        error.message
                    ))),
                    _ => Err(VoiceError::Internal(format!(
                        "the owner (node {owner}) answered something unreadable"
                    ))),
                },
            },
            Ok(Err(error)) => Err(VoiceError::Unavailable(format!(
                "the owner (node {owner}) is unreachable: {error}"
            ))),
            Err(_) => Err(VoiceError::Unavailable(format!(
                "the owner (node {owner}) did not answer within {} ms",
                deadline.as_millis()
            ))),
        }
    }

    /// Serves a request as the owner of its key.
    async fn serve(&self, request: OwnerRequest) -> Result<OwnerReply, VoiceError> {
        let key = request.key();
        if self.ctx.owner_of_key(&key) != self.ctx.cluster.node_id() {
            return Err(VoiceError::Unavailable(format!(
                "this node no longer owns {key} (the ring moved)"
            )));
        }
        match request {
            OwnerRequest::User { user, op } => self.serve_user(&user, op).await,
            OwnerRequest::History {
                user,
                conversation,
                before,
                limit,
            } => {
                self.serve_history(&user, &conversation, before, limit)
                    .await
            }
            OwnerRequest::Create { record } => self.serve_create(record).await,
            OwnerRequest::Chunk {
                message_id,
                user,
                offset,
                data,
                last,
            } => {
                self.serve_chunk(&message_id, &user, offset, &data, last)
                    .await
            }
            OwnerRequest::Status { message_id, user } => {
                self.serve_status(&message_id, &user).await
            }
            OwnerRequest::Cancel { message_id, user } => {
                self.serve_cancel(&message_id, &user).await
            }
            OwnerRequest::Fetch {
                message_id,
                user,
                offset,
                length,
                wait_ms,
            } => {
                self.serve_fetch(&message_id, &user, offset, length, wait_ms)
                    .await
            }
        }
    }

    /// The nodes a copy of `key` goes to, in ring order after the owner.
    fn replica_candidates(&self, key: &str) -> Vec<NodeId> {
        let self_id = self.ctx.cluster.node_id();
        self.ctx
            .cluster
            .ring()
            .map(|ring| ring.owners_n(key, REPLICA_CANDIDATES_MAX + 1))
            .unwrap_or_default()
            .into_iter()
            .filter(|id| *id != self_id)
            .take(REPLICA_CANDIDATES_MAX)
            .collect()
    }

    /// Asks `node` with `message`; `None` if it did not answer in time.
    async fn ask(&self, node: NodeId, message: &VoiceMessage) -> Option<Bytes> {
        let call = self.ctx.cluster.call_app(node, request_bytes(message));
        match tokio::time::timeout(Duration::from_millis(COPY_TIMEOUT_MS), call).await {
            Ok(Ok(reply)) => Some(reply),
            Ok(Err(error)) => {
                tracing::debug!(node, %error, "voice copy: node unreachable");
                None
            }
            Err(_) => {
                tracing::debug!(node, "voice copy: node silent");
                None
            }
        }
    }

    // ---- User actors ------------------------------------------------------------------

    fn user_cell(&self, user: &str) -> Cell<ActiveUser> {
        lock(&self.users)
            .entry(user.to_string())
            .or_default()
            .clone()
    }

    async fn serve_user(&self, user: &str, op: UserOp) -> Result<OwnerReply, VoiceError> {
        let cell = self.user_cell(user);
        let mut guard = cell.lock().await;
        self.ensure_user(user, &mut guard).await?;
        let Some(active) = guard.as_mut() else {
            return Err(VoiceError::Internal("user actor not active".into()));
        };
        active.used_ms = now_ms();
        let base = active.state.revision;
        let effect = active.state.apply(&op).map_err(inbox_error)?;
        if effect.changed() {
            let (epoch, state) = (active.epoch, active.state.clone());
            if let Err(error) = self.persist_user(user, epoch, base, &op, state).await {
                // Fail-stop: the next request re-activates from the copies.
                *guard = None;
                return Err(error);
            }
        }
        let last_seq = active.state.inbox.last_seq();
        drop(guard);
        let users = [user.to_string()];
        Ok(match effect {
            UserEffect::Delivered(entry) => {
                let entry = wire::entry(&entry);
                self.notify(&users, Event::VmMessage(entry.clone()));
                OwnerReply::Delivered(entry)
            }
            UserEffect::State(message_id, state) => {
                let event = VmStateEvent {
                    message_id,
                    state: wire::state(&state),
                };
                self.notify(&users, Event::VmState(event.clone()));
                OwnerReply::State(event)
            }
            UserEffect::Unchanged(Some(state)) => match op {
                UserOp::Read { message_id }
                | UserOp::Play { message_id, .. }
                | UserOp::Upload { message_id, .. } => OwnerReply::State(VmStateEvent {
                    message_id,
                    state: wire::state(&state),
                }),
                _ => OwnerReply::Done,
            },
            UserEffect::Unchanged(None) | UserEffect::Forgot(_) => OwnerReply::Done,
            UserEffect::Page(page) => OwnerReply::Page(wire::page(&page, last_seq)),
        })
    }

    async fn serve_history(
        &self,
        user: &str,
        conversation: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<OwnerReply, VoiceError> {
        let cell = self.user_cell(user);
        let mut guard = cell.lock().await;
        self.ensure_user(user, &mut guard).await?;
        let Some(active) = guard.as_mut() else {
            return Err(VoiceError::Internal("user actor not active".into()));
        };
        active.used_ms = now_ms();
        let page = active.state.inbox.history(conversation, before, limit);
        Ok(OwnerReply::Page(wire::page(
            &page,
            active.state.inbox.last_seq(),
        )))
    }

    /// Activates the user's actor unless it is active at the committed epoch.
    async fn ensure_user(
        &self,
        user: &str,
        guard: &mut Option<ActiveUser>,
    ) -> Result<(), VoiceError> {
        let committed = self.ctx.committed_epoch_of(&user_key(user));
        if guard.as_ref().is_some_and(|a| a.epoch >= committed) {
            return Ok(());
        }
        *guard = None;
        let gauge = metrics::gauge!("chorus_vm_user_activations_in_progress");
        gauge.increment(1.0);
        let activated = self.activate_user(user).await;
        gauge.decrement(1.0);
        *guard = Some(activated?);
        Ok(())
    }

    /// Claim, fence and gather, continue from the most advanced copy, copy it on.
    async fn activate_user(&self, user: &str) -> Result<ActiveUser, VoiceError> {
        let key = user_key(user);
        let epoch = self.claim(&key).await?;
        let fence = VoiceMessage::UserFence {
            user: user.to_string(),
            epoch,
        };
        let peers = self.ctx.live_peers();
        let answers = futures_util::future::join_all(peers.iter().map(|&node| {
            let fence = &fence;
            async move {
                let reply = self.ask(node, fence).await?;
                decode::<Option<(u64, UserState)>>(&reply).ok().flatten()
            }
        }))
        .await;
        let own = self.copies.fence(user, epoch).map_err(storage)?;
        let mut copies: Vec<(u64, UserState)> = answers.into_iter().flatten().collect();
        copies.extend(own);
        let mut state = most_advanced(copies).map(|(_, s)| s).unwrap_or_default();
        // Retention: messages past it leave the inbox as the actor starts.
        let old = state.inbox.older_than(self.retention_cutoff());
        if !old.is_empty() {
            let _ = state.apply(&UserOp::Forget { message_ids: old });
        }
        self.copies
            .keep(user, epoch, state.clone())
            .map_err(storage)?;
        if let Err(error) = self.copy_user_state(user, epoch, &state).await {
            // Best effort: the next change copies again, and fails if it cannot.
            tracing::debug!(user, %error, "user actor: activation copy not kept");
        }
        metrics::counter!("chorus_vm_user_activations_total").increment(1);
        Ok(ActiveUser {
            epoch,
            state,
            used_ms: now_ms(),
        })
    }

    /// Claims `key`'s next ownership epoch through Raft and waits until this node applied
    /// it.
    async fn claim(&self, key: &str) -> Result<u64, VoiceError> {
        let claim = MetadataCommand::ClaimOwnership {
            key: key.to_string(),
            node: self.ctx.cluster.node_id(),
        };
        let epoch = match self.ctx.cluster.write(claim).await {
            Ok(MetadataResponse::OwnershipGranted(granted)) => granted.epoch,
            Ok(other) => {
                return Err(VoiceError::Unavailable(format!(
                    "ownership of {key} not granted: {other:?}"
                )))
            }
            Err(error) => {
                return Err(VoiceError::Unavailable(format!(
                    "ownership claim for {key}: {error}"
                )))
            }
        };
        let mut metadata = self.ctx.cluster.subscribe_metadata();
        let applied =
            tokio::time::timeout(Duration::from_millis(CLAIM_APPLIED_TIMEOUT_MS), async {
                while metadata
                    .borrow_and_update()
                    .owners
                    .get(key)
                    .map_or(0, |o| o.epoch)
                    < epoch
                {
                    if metadata.changed().await.is_err() {
                        return false;
                    }
                }
                true
            })
            .await;
        if !matches!(applied, Ok(true)) {
            return Err(VoiceError::Unavailable(format!(
                "the claim of {key} at epoch {epoch} was not applied here in time"
            )));
        }
        Ok(epoch)
    }

    /// Writes the owner's copy and sends the operation to a replica; `Ok` once a second
    /// node holds it (alone: once this node's disk does).
    async fn persist_user(
        &self,
        user: &str,
        epoch: u64,
        base: u64,
        op: &UserOp,
        state: UserState,
    ) -> Result<(), VoiceError> {
        self.copies
            .keep(user, epoch, state.clone())
            .map_err(|e| match e {
                UserCopyRefused::Refused(CopyRefused::Stale(fence)) => VoiceError::Unavailable(
                    format!("a newer owner of user {user} exists (epoch {fence})"),
                ),
                other => storage(other),
            })?;
        let candidates = self.replica_candidates(&user_key(user));
        if candidates.is_empty() {
            return self.own_disk().await;
        }
        let apply = VoiceMessage::UserApply {
            user: user.to_string(),
            epoch,
            base,
            op: op.clone(),
        };
        for node in candidates {
            let Some(reply) = self.ask(node, &apply).await else {
                continue;
            };
            match decode::<Result<(), UserCopyRefused>>(&reply) {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(UserCopyRefused::Refused(CopyRefused::OutOfStep))) => {
                    let keep = VoiceMessage::UserKeep {
                        user: user.to_string(),
                        epoch,
                        state: state.clone(),
                    };
                    match self
                        .ask(node, &keep)
                        .await
                        .map(|r| decode::<Result<(), UserCopyRefused>>(&r))
                    {
                        Some(Ok(Ok(()))) => return Ok(()),
                        Some(Ok(Err(UserCopyRefused::Refused(CopyRefused::Stale(fence))))) => {
                            return Err(stale_user(user, fence))
                        }
                        _ => continue,
                    }
                }
                Ok(Err(UserCopyRefused::Refused(CopyRefused::Stale(fence)))) => {
                    return Err(stale_user(user, fence))
                }
                Ok(Err(UserCopyRefused::Storage(error))) => {
                    tracing::warn!(node, user, error, "user copy: replica storage failed");
                }
                Err(error) => tracing::warn!(node, user, %error, "user copy: bad answer"),
            }
        }
        Err(VoiceError::Unavailable(format!(
            "no replica of user {user} answered"
        )))
    }

    /// Copies a user's whole state to a replica (activation).
    async fn copy_user_state(
        &self,
        user: &str,
        epoch: u64,
        state: &UserState,
    ) -> Result<(), VoiceError> {
        let candidates = self.replica_candidates(&user_key(user));
        if candidates.is_empty() {
            return self.own_disk().await;
        }
        let keep = VoiceMessage::UserKeep {
            user: user.to_string(),
            epoch,
            state: state.clone(),
        };
        for node in candidates {
            if let Some(reply) = self.ask(node, &keep).await {
                match decode::<Result<(), UserCopyRefused>>(&reply) {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(UserCopyRefused::Refused(CopyRefused::Stale(fence)))) => {
                        return Err(stale_user(user, fence))
                    }
                    _ => continue,
                }
            }
        }
        Err(VoiceError::Unavailable(format!(
            "no replica of user {user} answered"
        )))
    }

    async fn own_disk(&self) -> Result<(), VoiceError> {
        self.ctx
            .group_commit
            .durable()
            .await
            .map_err(|e| storage(format!("flush: {e}")))
    }

    // ---- Messages on their owner ------------------------------------------------------

    fn message_cell(&self, message_id: &str) -> Cell<ActiveMessage> {
        lock(&self.messages)
            .entry(message_id.to_string())
            .or_default()
            .clone()
    }

    /// Uploads in progress this node owns.
    pub fn uploads_in_progress(&self) -> usize {
        let cells: Vec<Cell<ActiveMessage>> = lock(&self.messages).values().cloned().collect();
        cells
            .iter()
            .filter(|cell| {
                cell.try_lock().map_or(true, |guard| {
                    guard
                        .as_ref()
                        .is_some_and(|a| a.upload.status() == UploadStatus::Uploading)
                })
            })
            .count()
    }

    async fn serve_create(&self, record: StoredMessage) -> Result<OwnerReply, VoiceError> {
        let message_id = record.meta.message_id.clone();
        if self.store.get(&message_id).is_some() {
            return Ok(OwnerReply::Done);
        }
        if self.uploads_in_progress() >= self.ctx.config.voicemail.uploads_max {
            metrics::counter!("chorus_vm_uploads_refused_total").increment(1);
            return Err(VoiceError::Unavailable(format!(
                "this node holds {} uploads in progress: try again later",
                self.ctx.config.voicemail.uploads_max
            )));
        }
        let cell = self.message_cell(&message_id);
        let mut guard = cell.lock().await;
        let record = self.store.put(&message_id, &record).map_err(storage)?;
        self.copy_piece(&record, 0, Bytes::new()).await?;
        let (progress, _) = watch::channel((0, UploadStatus::Uploading));
        *guard = Some(ActiveMessage {
            record,
            upload: Upload::new(now_ms(), self.limits),
            replicated: 0,
            progress,
            used_ms: now_ms(),
        });
        Ok(OwnerReply::Done)
    }

    /// Makes the message active here: from this node's store, or gathered from the live
    /// nodes when this node's copy is missing or may be behind.
    async fn ensure_message(
        &self,
        message_id: &str,
        guard: &mut Option<ActiveMessage>,
    ) -> Result<(), VoiceError> {
        if guard.is_some() {
            return Ok(());
        }
        let local = self.store.get(message_id);
        if local.as_ref().is_none_or(|r| !r.status.is_final()) {
            self.gather_message(message_id, local.as_ref()).await?;
        }
        let Some(record) = self.store.get(message_id) else {
            return Err(VoiceError::NotFound(message_id.to_string()));
        };
        if record.meta.created_at_ms < self.retention_cutoff() {
            return Err(VoiceError::NotFound(message_id.to_string()));
        }
        let audio = self.store.read(message_id, 0, record.bytes as usize);
        if audio.len() as u64 != record.bytes {
            return Err(VoiceError::Internal(format!(
                "message {message_id}: {} of {} bytes held",
                audio.len(),
                record.bytes
            )));
        }
        let upload = Upload::restore(now_ms(), self.limits, audio, record.status)
            .map_err(|e| VoiceError::Internal(format!("message {message_id}: {e}")))?;
        // Copy what this node holds on (a replica behind gets the rest); the bytes count as
        // acknowledged once a second node holds them.
        let replicated = match self
            .copy_piece(&record, 0, upload.bytes().to_vec().into())
            .await
        {
            Ok(()) => record.bytes,
            Err(error) => {
                tracing::debug!(message_id, %error, "message activation: copy not kept");
                0
            }
        };
        let (progress, _) = watch::channel((replicated, record.status));
        *guard = Some(ActiveMessage {
            record,
            upload,
            replicated,
            progress,
            used_ms: now_ms(),
        });
        metrics::counter!("chorus_vm_message_activations_total").increment(1);
        Ok(())
    }

    /// Brings this node's copy of a message up to the most advanced copy of the live nodes.
    async fn gather_message(
        &self,
        message_id: &str,
        local: Option<&StoredMessage>,
    ) -> Result<(), VoiceError> {
        let held = VoiceMessage::MessageHeld {
            message_id: message_id.to_string(),
        };
        let peers = self.ctx.live_peers();
        let answers = futures_util::future::join_all(peers.iter().map(|&node| {
            let held = &held;
            async move {
                let reply = self.ask(node, held).await?;
                decode::<Option<StoredMessage>>(&reply)
                    .ok()
                    .flatten()
                    .map(|record| (node, record))
            }
        }))
        .await;
        let rank = |r: &StoredMessage| (r.bytes, r.status.is_final(), r.delivered);
        let best = answers
            .into_iter()
            .flatten()
            .max_by_key(|(_, record)| rank(record));
        let Some((node, best)) = best else {
            return Ok(());
        };
        if local.is_some_and(|l| rank(l) >= rank(&best)) {
            return Ok(());
        }
        if local.is_none() {
            let fresh = StoredMessage {
                status: UploadStatus::Uploading,
                delivered: false,
                ..best.clone()
            };
            self.store.put(message_id, &fresh).map_err(storage)?;
        }
        let mut at = local.map_or(0, |l| l.bytes);
        while at < best.bytes {
            let read = VoiceMessage::MessageRead {
                message_id: message_id.to_string(),
                offset: at,
                len: PULL_PIECE_BYTES.min((best.bytes - at) as u32),
            };
            let piece = match self.ask(node, &read).await.map(|r| decode::<Bytes>(&r)) {
                Some(Ok(piece)) if !piece.is_empty() => piece,
                _ => {
                    return Err(VoiceError::Unavailable(format!(
                        "message {message_id}: node {node} did not give its audio"
                    )))
                }
            };
            self.store
                .append(message_id, 0, at, &piece, UploadStatus::Uploading, 0)
                .map_err(storage)?;
            at += piece.len() as u64;
        }
        self.store.put(message_id, &best).map_err(storage)?;
        Ok(())
    }

    /// Sends `record` and the audio from `offset` to a replica; `Ok` once one holds it
    /// (alone: once this node's disk does). A replica behind gets what it lacks.
    async fn copy_piece(
        &self,
        record: &StoredMessage,
        offset: u64,
        piece: Bytes,
    ) -> Result<(), VoiceError> {
        let message_id = &record.meta.message_id;
        let candidates = self.replica_candidates(&message_key(message_id));
        if candidates.is_empty() {
            return self.own_disk().await;
        }
        let end = offset + piece.len() as u64;
        for node in candidates {
            let mut from = offset;
            let mut bytes = piece.clone();
            for _ in 0..2 {
                let append = VoiceMessage::MessageAppend {
                    record: record.clone(),
                    offset: from,
                    piece: bytes.clone(),
                };
                let Some(reply) = self.ask(node, &append).await else {
                    break;
                };
                match decode::<Result<(), u64>>(&reply) {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(held)) if held < end => {
                        // Behind: send it what it lacks, from this node's store.
                        bytes =
                            Bytes::from(self.store.read(message_id, held, (end - held) as usize));
                        if bytes.len() as u64 != end - held {
                            break;
                        }
                        from = held;
                    }
                    _ => break,
                }
            }
        }
        Err(VoiceError::Unavailable(format!(
            "no replica of message {message_id} took its audio"
        )))
    }

    fn check_participant(record: &StoredMessage, user: &str) -> Result<(), VoiceError> {
        if record.recipients.iter().any(|r| r == user) || record.meta.sender == user {
            Ok(())
        } else {
            Err(VoiceError::NotFound(record.meta.message_id.clone()))
        }
    }

    async fn serve_chunk(
        &self,
        message_id: &str,
        user: &str,
        offset: u64,
        data: &[u8],
        last: bool,
    ) -> Result<OwnerReply, VoiceError> {
        let cell = self.message_cell(message_id);
        let mut guard = cell.lock().await;
        self.ensure_message(message_id, &mut guard).await?;
        let Some(active) = guard.as_mut() else {
            return Err(VoiceError::Internal("message not active".into()));
        };
        if active.record.meta.sender != user {
            Self::check_participant(&active.record, user)?;
            return Err(VoiceError::NotSender("upload its audio".into()));
        }
        active.used_ms = now_ms();
        let before = (active.replicated, active.record.status);
        let held = active.upload.acked();
        let accepted = active.upload.chunk(now_ms(), offset, data, last);
        let accepted = match accepted {
            Ok(accepted) => accepted,
            Err(refusal) => {
                metrics::counter!("chorus_vm_chunks_refused_total").increment(1);
                return Err(refusal.into());
            }
        };
        metrics::counter!("chorus_vm_chunks_total").increment(1);
        if accepted.acked > held || accepted.status != active.record.status {
            let piece = &active.upload.bytes()[held as usize..accepted.acked as usize];
            let appended = self.store.append(
                message_id,
                0,
                held,
                piece,
                accepted.status,
                active.upload.duration_ms(),
            );
            match appended {
                Ok(record) => active.record = record,
                Err(error) => {
                    // The upload in memory is ahead of the disk: start again from the disk.
                    *guard = None;
                    return Err(storage(error));
                }
            }
        }
        self.settle_active(active).await?;
        let after = (active.replicated, active.record.status);
        let state = upload_state(active);
        let participants = active.record.recipients.clone();
        drop(guard);
        if after != before {
            self.notify(
                &participants,
                Event::VmBytes(VmBytesEvent {
                    message_id: message_id.to_string(),
                    acked: state.acked,
                    duration_ms: state.duration_ms,
                    status: state.status,
                }),
            );
        }
        Ok(OwnerReply::Upload(state))
    }

    /// Brings an active message's copies, inboxes and waiters up to what this node holds:
    /// copies the bytes not yet on a replica, delivers the message to every inbox once it
    /// has bytes, and records the end of the upload in every inbox.
    async fn settle_active(&self, active: &mut ActiveMessage) -> Result<(), VoiceError> {
        let message_id = active.record.meta.message_id.clone();
        let acked = active.upload.acked();
        if active.replicated < acked || active.record.status != active.progress.borrow().1 {
            let from = active.replicated.min(acked);
            let piece = Bytes::copy_from_slice(&active.upload.bytes()[from as usize..]);
            self.copy_piece(&active.record, from, piece).await?;
            active.replicated = acked;
            active.progress.send_replace((acked, active.record.status));
            metrics::counter!("chorus_vm_bytes_stored_total").increment(acked - from);
        }
        if !active.record.delivered && active.replicated > 0 {
            let op = UserOp::Deliver {
                meta: active.record.meta.clone(),
                upload: active.record.status,
                bytes: active.replicated,
                duration_ms: active.upload.duration_ms(),
            };
            if self.to_every_inbox(&active.record.recipients, &op).await {
                active.record.delivered = true;
                active.record = self
                    .store
                    .put(&message_id, &active.record)
                    .map_err(storage)?;
                // The flag rides on the next copy; losing it only repeats a delivery.
                let _ = self.copy_piece(&active.record, acked, Bytes::new()).await;
            }
        }
        if active.record.delivered && active.record.status.is_final() {
            let op = UserOp::Upload {
                message_id: message_id.clone(),
                upload: active.record.status,
                bytes: active.replicated,
                duration_ms: active.upload.duration_ms(),
            };
            // Idempotent: an inbox that has the end already changes nothing.
            let _ = self.to_every_inbox(&active.record.recipients, &op).await;
        }
        Ok(())
    }

    /// Sends `op` to every participant's user actor at once; whether all took it.
    async fn to_every_inbox(&self, users: &[String], op: &UserOp) -> bool {
        let results =
            futures_util::future::join_all(users.iter().map(|user| self.user_op(user, op.clone())))
                .await;
        results.iter().all(|r| {
            if let Err(error) = r {
                tracing::debug!(%error, "voice message: an inbox did not take it yet");
            }
            r.is_ok()
        })
    }

    async fn serve_status(&self, message_id: &str, user: &str) -> Result<OwnerReply, VoiceError> {
        let cell = self.message_cell(message_id);
        let mut guard = cell.lock().await;
        self.ensure_message(message_id, &mut guard).await?;
        let Some(active) = guard.as_mut() else {
            return Err(VoiceError::Internal("message not active".into()));
        };
        Self::check_participant(&active.record, user)?;
        active.used_ms = now_ms();
        Ok(OwnerReply::Upload(upload_state(active)))
    }

    async fn serve_cancel(&self, message_id: &str, user: &str) -> Result<OwnerReply, VoiceError> {
        let cell = self.message_cell(message_id);
        let mut guard = cell.lock().await;
        self.ensure_message(message_id, &mut guard).await?;
        let Some(active) = guard.as_mut() else {
            return Err(VoiceError::Internal("message not active".into()));
        };
        if active.record.meta.sender != user {
            Self::check_participant(&active.record, user)?;
            return Err(VoiceError::NotSender("cancel it".into()));
        }
        if active.upload.status() == UploadStatus::Uploading {
            active.upload.cancel().map_err(VoiceError::from)?;
        }
        self.end_upload(message_id, active).await
    }

    /// Records an upload's end decided in `active.upload` (cancelled, failed) and tells
    /// the participants.
    async fn end_upload(
        &self,
        message_id: &str,
        active: &mut ActiveMessage,
    ) -> Result<OwnerReply, VoiceError> {
        let status = active.upload.status();
        if active.record.status != status {
            active.record.status = status;
            active.record = self
                .store
                .put(message_id, &active.record)
                .map_err(storage)?;
        }
        self.settle_active(active).await?;
        let state = upload_state(active);
        self.notify(
            &active.record.recipients,
            Event::VmBytes(VmBytesEvent {
                message_id: message_id.to_string(),
                acked: state.acked,
                duration_ms: state.duration_ms,
                status: state.status,
            }),
        );
        Ok(OwnerReply::Upload(state))
    }

    async fn serve_fetch(
        &self,
        message_id: &str,
        user: &str,
        offset: u64,
        length: u32,
        wait_ms: u64,
    ) -> Result<OwnerReply, VoiceError> {
        // A finished message this node holds whole is read from the store.
        let finished = self.store.get(message_id).filter(|r| r.status.is_final());
        if finished
            .as_ref()
            .is_some_and(|r| r.meta.created_at_ms < self.retention_cutoff())
        {
            return Err(VoiceError::NotFound(message_id.to_string()));
        }
        let (record, mut progress) = match finished {
            Some(record) => (record, None),
            None => {
                let cell = self.message_cell(message_id);
                let mut guard = cell.lock().await;
                self.ensure_message(message_id, &mut guard).await?;
                let Some(active) = guard.as_mut() else {
                    return Err(VoiceError::Internal("message not active".into()));
                };
                active.used_ms = now_ms();
                (active.record.clone(), Some(active.progress.subscribe()))
            }
        };
        Self::check_participant(&record, user)?;
        let current = |progress: &Option<watch::Receiver<(u64, UploadStatus)>>| match progress {
            Some(rx) => *rx.borrow(),
            None => (record.bytes, record.status),
        };
        let (mut acked, mut status) = current(&progress);
        if offset >= acked && status == UploadStatus::Uploading && wait_ms > 0 {
            if let Some(rx) = progress.as_mut() {
                let _ = tokio::time::timeout(Duration::from_millis(wait_ms), async {
                    loop {
                        let (a, s) = *rx.borrow_and_update();
                        if a > offset || s != UploadStatus::Uploading {
                            return;
                        }
                        if rx.changed().await.is_err() {
                            return;
                        }
                    }
                })
                .await;
            }
            (acked, status) = current(&progress);
        }
        let take = acked.saturating_sub(offset).min(u64::from(length)) as usize;
        let data = if take > 0 {
            self.store.read(message_id, offset, take)
        } else {
            Vec::new()
        };
        Ok(OwnerReply::Fetch(VmFetchResponse {
            message_id: message_id.to_string(),
            offset,
            data: base64::engine::general_purpose::STANDARD.encode(&data),
            acked,
            status: wire::status(status),
        }))
    }

    // ---- Notifications ----------------------------------------------------------------

    /// Pushes `event` to every session of `users`, on every node.
    fn notify(&self, users: &[String], event: Event) {
        let body = match event.encode_body() {
            Ok(body) => Arc::new(body),
            Err(error) => {
                metrics::counter!("chorus_encode_failures_total").increment(1);
                tracing::error!(%error, "cannot encode a voice-message notification");
                return;
            }
        };
        self.ctx.deliver_to_users(users, &body);
        let message = request_bytes(&VoiceMessage::Notify {
            users: users.to_vec(),
            kind: body.kind().to_string(),
            msgpack: body.body_bytes(Encoding::MsgPack).clone(),
            json: body.body_bytes(Encoding::Json).clone(),
        });
        for node in self.ctx.live_peers() {
            let ctx = self.ctx.clone();
            let message = message.clone();
            tokio::spawn(async move {
                let call = ctx.cluster.call_app(node, message);
                let _ = tokio::time::timeout(Duration::from_millis(COPY_TIMEOUT_MS), call).await;
            });
        }
    }

    // ---- Requests from other nodes ----------------------------------------------------

    /// Serves a request from another node.
    pub(crate) async fn handle_peer(&self, message: Bytes) -> Bytes {
        let message = match decode::<VoiceMessage>(&message) {
            Ok(message) => message,
            Err(error) => return encode(&Err::<(), ErrorBody>(error)),
        };
        match message {
            VoiceMessage::AtOwner(request) => encode(&self.serve(request).await),
            VoiceMessage::UserFence { user, epoch } => {
                encode(&self.copies.fence(&user, epoch).ok().flatten())
            }
            VoiceMessage::UserKeep { user, epoch, state } => {
                encode(&self.copies.keep(&user, epoch, state))
            }
            VoiceMessage::UserApply {
                user,
                epoch,
                base,
                op,
            } => encode(&self.copies.apply(&user, epoch, base, &op)),
            VoiceMessage::MessageHeld { message_id } => encode(&self.store.get(&message_id)),
            VoiceMessage::MessageRead {
                message_id,
                offset,
                len,
            } => encode(&Bytes::from(self.store.read(
                &message_id,
                offset,
                len.min(PULL_PIECE_BYTES) as usize,
            ))),
            VoiceMessage::MessageAppend {
                record,
                offset,
                piece,
            } => encode(&self.keep_piece(&record, offset, &piece)),
            VoiceMessage::MessageDelete { message_id } => {
                encode(&self.store.delete(&message_id).is_ok())
            }
            VoiceMessage::Notify {
                users,
                kind,
                msgpack,
                json,
            } => {
                if let Some(body) = EncodedBody::from_parts(&kind, msgpack, json) {
                    let users = &users[..users.len().min(RECIPIENTS_MAX + 1)];
                    self.ctx.deliver_to_users(users, &Arc::new(body));
                }
                encode(&())
            }
        }
    }

    /// A replica keeps a message's record and a piece of its audio; `Err` with the bytes
    /// held when they do not reach `offset`.
    fn keep_piece(&self, record: &StoredMessage, offset: u64, piece: &[u8]) -> Result<(), u64> {
        let message_id = &record.meta.message_id;
        let held = match self.store.get(message_id) {
            Some(held) => held,
            None => {
                let fresh = StoredMessage {
                    status: UploadStatus::Uploading,
                    delivered: false,
                    ..record.clone()
                };
                self.store.put(message_id, &fresh).map_err(|_| 0u64)?
            }
        };
        if !piece.is_empty() || offset > held.bytes {
            self.store
                .append(
                    message_id,
                    0,
                    offset,
                    piece,
                    UploadStatus::Uploading,
                    record.duration_ms,
                )
                .map_err(|refused| match refused {
                    crate::server::voicemail::store::StoreRefused::OutOfStep { held } => held,
                    _ => held.bytes,
                })?;
        }
        let now = self.store.get(message_id).map_or(0, |r| r.bytes);
        if now >= record.bytes {
            // The status and the delivery flag only once the bytes they speak of are here.
            self.store.put(message_id, record).map_err(|_| now)?;
        }
        Ok(())
    }

    // ---- Upkeep -----------------------------------------------------------------------

    /// Starts the upkeep loop: uploads idle too long fail, actors and messages not used
    /// (or no longer owned here) leave memory, and every 30 s the sweeps run: retention,
    /// and messages this node owns whose delivery or end is not yet in every inbox.
    pub(crate) fn start_upkeep(self: &Arc<Self>, tracker: &TaskTracker) {
        let weak = Arc::downgrade(self);
        let shutdown = self.ctx.shutdown.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(UPKEEP_PERIOD_MS));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut round: u64 = 0;
            let sweep_every = (weak
                .upgrade()
                .map_or(u64::MAX, |v| v.ctx.config.voicemail.retention_ms)
                / 4
                / UPKEEP_PERIOD_MS)
                .clamp(1, SWEEP_EVERY_ROUNDS_MAX);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(voicemail) = weak.upgrade() else {
                    return;
                };
                voicemail.upkeep().await;
                round += 1;
                if round.is_multiple_of(sweep_every) {
                    voicemail.sweep().await;
                }
            }
        });
    }

    async fn upkeep(&self) {
        let now = now_ms();
        let self_id = self.ctx.cluster.node_id();
        let cells: Vec<(String, Cell<ActiveMessage>)> = lock(&self.messages)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut release = Vec::new();
        for (message_id, cell) in cells {
            let Ok(mut guard) = cell.try_lock() else {
                continue;
            };
            let owned = self.ctx.owner_of_key(&message_key(&message_id)) == self_id;
            let Some(active) = guard.as_mut() else {
                release.push(message_id);
                continue;
            };
            if !owned {
                *guard = None;
                release.push(message_id);
                continue;
            }
            if active.upload.tick(now) {
                metrics::counter!("chorus_vm_uploads_failed_total").increment(1);
                if let Err(error) = self.end_upload(&message_id, active).await {
                    tracing::debug!(message_id, %error, "idle upload: end not recorded yet");
                }
            } else if active.record.status.is_final()
                && now.saturating_sub(active.used_ms) > MESSAGE_IDLE_RELEASE_MS
            {
                *guard = None;
                release.push(message_id);
            }
        }
        {
            let mut messages = lock(&self.messages);
            for message_id in release {
                if messages
                    .get(&message_id)
                    .is_some_and(|cell| Arc::strong_count(cell) == 1)
                {
                    messages.remove(&message_id);
                }
            }
        }
        let mut users = lock(&self.users);
        users.retain(|user, cell| {
            if Arc::strong_count(cell) > 1 {
                return true;
            }
            let Ok(guard) = cell.try_lock() else {
                return true;
            };
            let owned = self.ctx.owner_of_key(&user_key(user)) == self_id;
            guard
                .as_ref()
                .is_some_and(|a| owned && now.saturating_sub(a.used_ms) < USER_IDLE_RELEASE_MS)
        });
        metrics::gauge!("chorus_vm_users_active").set(users.len() as f64);
        drop(users);
        metrics::gauge!("chorus_vm_uploads_in_progress").set(self.uploads_in_progress() as f64);
    }

    /// Retention, and messages owned here whose inboxes are not yet settled.
    async fn sweep(&self) {
        let cutoff = self.retention_cutoff();
        // Inboxes of the user actors active here: messages past retention leave them.
        let users: Vec<(String, Cell<ActiveUser>)> = lock(&self.users)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (user, cell) in users {
            let old = match cell.try_lock() {
                Ok(guard) => guard
                    .as_ref()
                    .map(|a| a.state.inbox.older_than(cutoff))
                    .unwrap_or_default(),
                Err(_) => continue,
            };
            if !old.is_empty() {
                if let Err(error) = self
                    .serve_user(&user, UserOp::Forget { message_ids: old })
                    .await
                {
                    tracing::debug!(user, %error, "retention: inbox not trimmed yet");
                }
            }
        }
        for message_id in self.store.older_than(cutoff) {
            lock(&self.messages).remove(&message_id);
            if let Err(error) = self.store.delete(&message_id) {
                tracing::warn!(message_id, %error, "retention: cannot delete a voice message");
            } else {
                metrics::counter!("chorus_vm_messages_expired_total").increment(1);
            }
        }
        let self_id = self.ctx.cluster.node_id();
        for record in self.store.records() {
            let message_id = record.meta.message_id.clone();
            let unsettled = !record.status.is_final() || !record.delivered;
            if !unsettled
                || self.ctx.owner_of_key(&message_key(&message_id)) != self_id
                || self.ctx.shutdown.is_cancelled()
            {
                continue;
            }
            let cell = self.message_cell(&message_id);
            let Ok(mut guard) = cell.try_lock() else {
                continue;
            };
            if guard.is_some() {
                continue;
            }
            if let Err(error) = self.ensure_message(&message_id, &mut guard).await {
                tracing::debug!(message_id, %error, "sweep: message not activated");
                continue;
            }
            if let Some(active) = guard.as_mut() {
                if let Err(error) = self.settle_active(active).await {
                    tracing::debug!(message_id, %error, "sweep: message not settled");
                }
            }
        }
    }

    /// Messages created before this are past retention.
    fn retention_cutoff(&self) -> u64 {
        now_ms().saturating_sub(self.ctx.config.voicemail.retention_ms)
    }

    /// Whether the node runs `key`'s actor here (for `/admin/keys`).
    pub fn is_active(&self, key: &str) -> bool {
        match ActorKey::parse(key) {
            Some(ActorKey::User(user)) => lock(&self.users).contains_key(user),
            Some(ActorKey::Message(message_id)) => lock(&self.messages).contains_key(message_id),
            _ => false,
        }
    }
}

fn upload_state(active: &ActiveMessage) -> VmUploadState {
    let acked = active.replicated.min(active.upload.acked());
    // The status is the stored one: a completion counts once its bytes are on two nodes.
    let status = if acked == active.upload.acked() {
        active.record.status
    } else {
        UploadStatus::Uploading
    };
    VmUploadState {
        message_id: active.record.meta.message_id.clone(),
        acked,
        status: wire::status(status),
        duration_ms: active.upload.duration_ms(),
    }
}

/// The recipients of a message from `user`, checked: 1 to [`RECIPIENTS_MAX`] distinct
/// valid user ids, not `user`; in byte order.
fn check_users(user: &str, to: Vec<String>) -> Result<Vec<String>, VoiceError> {
    let mut recipients = to;
    recipients.sort();
    recipients.dedup();
    if recipients.is_empty() || recipients.len() > RECIPIENTS_MAX {
        return Err(VoiceError::Invalid(format!(
            "a voice message goes to 1 to {RECIPIENTS_MAX} users"
        )));
    }
    if let Some(bad) = recipients
        .iter()
        .find(|r| r.is_empty() || r.len() > USER_ID_BYTES_MAX)
    {
        return Err(VoiceError::Invalid(format!(
            "recipient {bad:?}: a user id has 1 to {USER_ID_BYTES_MAX} bytes"
        )));
    }
    if recipients.iter().any(|r| r == user) {
        return Err(VoiceError::Invalid(
            "the sender is not a recipient of their own message".into(),
        ));
    }
    Ok(recipients)
}

fn stale_user(user: &str, fence: u64) -> VoiceError {
    VoiceError::Unavailable(format!(
        "a newer owner of user {user} exists (epoch {fence})"
    ))
}

fn unexpected(reply: OwnerReply) -> VoiceError {
    VoiceError::Internal(format!("unexpected answer from the owner: {reply:?}"))
}

fn page_limit(limit: Option<u32>) -> Result<usize, VoiceError> {
    let max = chorus_actors::voicemail::inbox::PAGE_MAX;
    match limit {
        None => Ok(50),
        Some(n) if (1..=max as u32).contains(&n) => Ok(n as usize),
        Some(_) => Err(VoiceError::Invalid(format!("limit must be 1 to {max}"))),
    }
}

fn request_bytes(message: &VoiceMessage) -> Bytes {
    request(Domain::Voice, message)
}
