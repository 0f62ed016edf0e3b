//! How Raft RPCs leave and enter a node, with the transport left pluggable.
//!
//! Outgoing: openraft calls its network traits; [`PeerClient`] turns each call into a
//! [`RaftRpc`] and hands it to a [`RaftTransport`] (QUIC in production, [`InMemoryTransport`]
//! in tests), bounded by openraft's per-RPC deadline. Incoming: the transport decodes the
//! bytes into a [`RaftRpc`] and passes it to [`RaftRpcHandler::handle`], which feeds the local
//! `Raft` and returns the [`RaftRpcReply`] to send back.
//!
//! So a transport only moves bytes ([`RaftRpc::encode`] / [`RaftRpcReply::decode`] and back);
//! it never sees openraft's API. This module does not open sockets.
//!
//! [`InMemoryTransport`]: super::InMemoryTransport

use std::future::Future;
use std::time::Duration;

use openraft::errors::{
    NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, RPCTypes, Raft};
use serde::{Deserialize, Serialize};

use super::store::{decode_snapshot_data, StateMachineStore};
use super::types::{RaftNode, Snapshot, SnapshotMeta, TypeConfig, Vote};
use crate::metadata::NodeId;

/// Upper bound on one encoded RPC or reply, in bytes. The largest message is a full snapshot
/// of the metadata, so this also bounds the metadata a lagging member can catch up with; a
/// transport should refuse larger frames before reading them.
pub const RAFT_RPC_BYTES_MAX: usize = 128 * 1024 * 1024;

/// A Raft RPC from one member to another, as the transport carries it.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpc {
    /// Replicate log entries (also the heartbeat).
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Ask for a vote in an election.
    Vote(VoteRequest<TypeConfig>),
    /// Ask whether a vote would be granted, without disturbing the term (Pre-Vote).
    PreVote(VoteRequest<TypeConfig>),
    /// Replace the target's state with a full snapshot (a member too far behind the log).
    InstallSnapshot {
        /// The sending leader's vote.
        vote: Vote,
        /// What the snapshot covers.
        meta: SnapshotMeta,
        /// MessagePack bytes of the metadata.
        data: Vec<u8>,
    },
    /// Hand leadership to the target (the leader is draining).
    TransferLeader(TransferLeaderRequest<TypeConfig>),
}

/// The answer to a [`RaftRpc`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpcReply {
    /// Answer to [`RaftRpc::AppendEntries`].
    AppendEntries(AppendEntriesResponse<TypeConfig>),
    /// Answer to [`RaftRpc::Vote`].
    Vote(VoteResponse<TypeConfig>),
    /// Answer to [`RaftRpc::PreVote`].
    PreVote(VoteResponse<TypeConfig>),
    /// Answer to [`RaftRpc::InstallSnapshot`].
    InstallSnapshot(SnapshotResponse<TypeConfig>),
    /// Answer to [`RaftRpc::TransferLeader`].
    TransferLeader(TransferLeaderResponse<TypeConfig>),
    /// The target could not handle the RPC (its Raft is stopped or failed, or the request was
    /// malformed); the sender treats the target as unreachable and backs off.
    Refused(String),
}

fn encode_bounded<T: Serialize>(value: &T) -> Result<Vec<u8>, TransportError> {
    let bytes = rmp_serde::to_vec_named(value).map_err(|e| TransportError::Codec(e.to_string()))?;
    if bytes.len() > RAFT_RPC_BYTES_MAX {
        return Err(TransportError::Codec(format!(
            "{} bytes, more than {RAFT_RPC_BYTES_MAX}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

fn decode_bounded<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, TransportError> {
    if bytes.len() > RAFT_RPC_BYTES_MAX {
        return Err(TransportError::Codec(format!(
            "{} bytes, more than {RAFT_RPC_BYTES_MAX}",
            bytes.len()
        )));
    }
    rmp_serde::from_slice(bytes).map_err(|e| TransportError::Codec(e.to_string()))
}

impl RaftRpc {
    /// MessagePack bytes for the wire.
    pub fn encode(&self) -> Result<Vec<u8>, TransportError> {
        encode_bounded(self)
    }

    /// Parses bytes from the wire; malformed or oversized input is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Self, TransportError> {
        decode_bounded(bytes)
    }
}

impl RaftRpcReply {
    /// MessagePack bytes for the wire.
    pub fn encode(&self) -> Result<Vec<u8>, TransportError> {
        encode_bounded(self)
    }

    /// Parses bytes from the wire; malformed or oversized input is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Self, TransportError> {
        decode_bounded(bytes)
    }
}

/// Why a [`RaftTransport`] could not deliver an RPC or bring back its reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// No connection to the target (refused, closed, not known): Raft backs off before
    /// retrying this member.
    #[error("node {target} at {addr} is unreachable: {reason}")]
    Unreachable {
        /// The target member.
        target: NodeId,
        /// The address dialed.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// The RPC was sent but failed on the way (stream reset, connection lost mid-call): Raft
    /// retries soon.
    #[error("raft rpc to node {target} failed: {reason}")]
    Failed {
        /// The target member.
        target: NodeId,
        /// What went wrong.
        reason: String,
    },
    /// A message could not be encoded or decoded (or exceeds [`RAFT_RPC_BYTES_MAX`]).
    #[error("malformed raft rpc: {0}")]
    Codec(String),
}

/// Carries one Raft RPC to a member and brings back its reply. Implemented by the inter-node
/// QUIC layer; Raft owns retries, backoff and deadlines (the returned future is dropped when
/// the RPC's deadline passes), so an implementation makes one attempt per call.
pub trait RaftTransport: Clone + Send + Sync + 'static {
    /// Sends `rpc` to member `target` at `addr` (its [`RaftNode::cluster_addr`]) and waits for
    /// the reply.
    fn send(
        &self,
        target: NodeId,
        addr: &str,
        rpc: RaftRpc,
    ) -> impl Future<Output = Result<RaftRpcReply, TransportError>> + Send;
}

/// openraft's network factory over a [`RaftTransport`]: one [`PeerClient`] per target.
#[derive(Debug, Clone)]
pub(crate) struct NetworkFactory<T> {
    source: NodeId,
    transport: T,
}

impl<T> NetworkFactory<T> {
    pub(crate) fn new(source: NodeId, transport: T) -> Self {
        Self { source, transport }
    }
}

impl<T: RaftTransport> RaftNetworkFactory<TypeConfig> for NetworkFactory<T> {
    type Network = PeerClient<T>;

    async fn new_client(&mut self, target: NodeId, node: &RaftNode) -> Self::Network {
        PeerClient {
            source: self.source,
            target,
            addr: node.cluster_addr.clone(),
            transport: self.transport.clone(),
        }
    }
}

/// Sends openraft's RPCs to one member through the transport.
#[derive(Debug, Clone)]
pub(crate) struct PeerClient<T> {
    source: NodeId,
    target: NodeId,
    addr: String,
    transport: T,
}

impl<T: RaftTransport> PeerClient<T> {
    /// One round trip, bounded by `ttl`; the reply's kind is checked by the caller.
    async fn call(
        &self,
        rpc: RaftRpc,
        action: RPCTypes,
        ttl: Duration,
    ) -> Result<RaftRpcReply, RPCError<TypeConfig>> {
        let sent = tokio::time::timeout(ttl, self.transport.send(self.target, &self.addr, rpc));
        match sent.await {
            Err(_) => Err(RPCError::Timeout(Timeout {
                action,
                id: self.source,
                target: self.target,
                timeout: ttl,
            })),
            Ok(Err(e @ TransportError::Unreachable { .. })) => {
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Ok(Err(e)) => Err(RPCError::Network(NetworkError::new(&e))),
            Ok(Ok(RaftRpcReply::Refused(reason))) => Err(RPCError::Unreachable(
                Unreachable::from_string(format!("node {} refused: {reason}", self.target)),
            )),
            Ok(Ok(reply)) => Ok(reply),
        }
    }

    fn unexpected(&self, reply: &RaftRpcReply) -> RPCError<TypeConfig> {
        RPCError::Network(NetworkError::from_string(format!(
            "node {} answered with an unexpected reply: {reply:?}",
            self.target
        )))
    }
}

impl<T: RaftTransport> RaftNetworkV2<TypeConfig> for PeerClient<T> {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let reply = self
            .call(
                RaftRpc::AppendEntries(rpc),
                RPCTypes::AppendEntries,
                option.soft_ttl(),
            )
            .await?;
        match reply {
            RaftRpcReply::AppendEntries(response) => Ok(response),
            other => Err(self.unexpected(&other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let reply = self
            .call(RaftRpc::Vote(rpc), RPCTypes::Vote, option.soft_ttl())
            .await?;
        match reply {
            RaftRpcReply::Vote(response) => Ok(response),
            other => Err(self.unexpected(&other)),
        }
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let reply = self
            .call(RaftRpc::PreVote(rpc), RPCTypes::Vote, option.soft_ttl())
            .await?;
        match reply {
            RaftRpcReply::PreVote(response) => Ok(response),
            other => Err(self.unexpected(&other)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let rpc = RaftRpc::InstallSnapshot {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot,
        };
        let reply = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            reply = self.call(rpc, RPCTypes::InstallSnapshot, option.soft_ttl()) => reply?,
        };
        match reply {
            RaftRpcReply::InstallSnapshot(response) => Ok(response),
            other => Err(self.unexpected(&other).into()),
        }
    }

    async fn transfer_leader(
        &mut self,
        request: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let reply = self
            .call(
                RaftRpc::TransferLeader(request),
                RPCTypes::TransferLeader,
                option.soft_ttl(),
            )
            .await?;
        match reply {
            RaftRpcReply::TransferLeader(response) => Ok(response),
            other => Err(self.unexpected(&other)),
        }
    }
}

/// Feeds incoming RPCs to the local Raft. Cheap to clone; obtained from
/// [`MetadataRaft::rpc_handler`](super::MetadataRaft::rpc_handler) and handed to the transport's
/// server side.
#[derive(Clone)]
pub struct RaftRpcHandler {
    raft: Raft<TypeConfig, StateMachineStore>,
}

impl std::fmt::Debug for RaftRpcHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftRpcHandler")
            .field("node", self.raft.node_id())
            .finish()
    }
}

impl RaftRpcHandler {
    pub(crate) fn new(raft: Raft<TypeConfig, StateMachineStore>) -> Self {
        Self { raft }
    }

    /// Handles one RPC and returns the reply to send back. Never panics on malformed input:
    /// a snapshot whose bytes do not decode is refused before it reaches the state machine.
    /// (openraft itself still asserts that an accepted snapshot is consistent with the vote
    /// that carries it; peers are authenticated by mutual TLS, so only a buggy peer can send
    /// one that is not.)
    pub async fn handle(&self, rpc: RaftRpc) -> RaftRpcReply {
        match rpc {
            RaftRpc::AppendEntries(request) => match self.raft.append_entries(request).await {
                Ok(response) => RaftRpcReply::AppendEntries(response),
                Err(e) => RaftRpcReply::Refused(e.to_string()),
            },
            RaftRpc::Vote(request) => match self.raft.vote(request).await {
                Ok(response) => RaftRpcReply::Vote(response),
                Err(e) => RaftRpcReply::Refused(e.to_string()),
            },
            RaftRpc::PreVote(request) => match self.raft.pre_vote(request).await {
                Ok(response) => RaftRpcReply::PreVote(response),
                Err(e) => RaftRpcReply::Refused(e.to_string()),
            },
            RaftRpc::InstallSnapshot { vote, meta, data } => {
                if let Err(e) = decode_snapshot_data(&data) {
                    return RaftRpcReply::Refused(format!("malformed snapshot: {e}"));
                }
                let snapshot = Snapshot {
                    meta,
                    snapshot: data,
                };
                match self.raft.install_full_snapshot(vote, snapshot).await {
                    Ok(response) => RaftRpcReply::InstallSnapshot(response),
                    Err(e) => RaftRpcReply::Refused(e.to_string()),
                }
            }
            RaftRpc::TransferLeader(request) => {
                match self.raft.handle_transfer_leader(request).await {
                    Ok(response) => RaftRpcReply::TransferLeader(response),
                    Err(e) => RaftRpcReply::Refused(e.to_string()),
                }
            }
        }
    }

    /// [`handle`](Self::handle) on wire bytes: decodes the request, handles it, encodes the
    /// reply. A request that does not decode gets a [`RaftRpcReply::Refused`].
    pub async fn handle_bytes(&self, request: &[u8]) -> Result<Vec<u8>, TransportError> {
        let reply = match RaftRpc::decode(request) {
            Ok(rpc) => self.handle(rpc).await,
            Err(e) => RaftRpcReply::Refused(e.to_string()),
        };
        reply.encode()
    }
}
