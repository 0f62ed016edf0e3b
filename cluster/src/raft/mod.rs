//! The cluster metadata replicated with Raft (openraft), stored in sled.
//!
//! Start reading at [`MetadataRaft`]: one per node, it runs the Raft member for the metadata
//! group, turns [`MetadataCommand`]s into committed log entries applied to
//! [`ClusterMetadata`], and answers reads. openraft stays behind this module: callers see our
//! types ([`RaftConfig`], [`RaftError`], [`RaftNode`], [`RaftMetrics`]); openraft's types appear
//! only inside the opaque [`RaftRpc`] payloads that a transport carries as bytes.
//!
//! - `types`: the openraft type configuration ([`TypeConfig`]) and [`RaftNode`].
//! - `store`: the sled log and state machine (durability notes there).
//! - `network`: the [`RaftTransport`] seam, the RPC enums and [`RaftRpcHandler`]; the QUIC
//!   layer implements the transport.
//! - `memory`: [`InMemoryTransport`], the transport tests use.
//!
//! This module does not forward writes to the leader (a follower returns
//! [`RaftError::ForwardToLeader`] and the caller forwards), decide who is a voter (the caller
//! calls [`MetadataRaft::change_membership`]), or open sockets.

mod memory;
mod network;
mod store;
mod types;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::errors::{
    ClientWriteError, Fatal, ForwardToLeader, InitializeError, LinearizableReadError,
};
use openraft::metrics::WaitError;
use openraft::{ChangeMembers, Raft, ReadPolicy, ServerState, SnapshotPolicy};
use tokio::sync::watch;

pub use memory::InMemoryTransport;
pub use network::{
    RaftRpc, RaftRpcHandler, RaftRpcReply, RaftTransport, TransportError, RAFT_RPC_BYTES_MAX,
};
pub use store::{LOG_TREE, META_TREE, STATE_MACHINE_TREE};
pub use types::{RaftNode, TypeConfig};

use crate::metadata::{ClusterMetadata, MetadataCommand, MetadataResponse, NodeId};
use network::NetworkFactory;
use store::{LogStore, StateMachineStore};

/// Timing and size knobs of the metadata Raft group. Every node of a cluster should use the
/// same values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftConfig {
    /// How often the leader sends heartbeats, in milliseconds. Default 250. Must be below
    /// `election_timeout_min_ms`; a third or less keeps a slow heartbeat from causing an
    /// election.
    pub heartbeat_interval_ms: u64,
    /// Shortest time a follower waits without hearing from a leader before standing for
    /// election, in milliseconds. Default 1000. Together with the maximum, this is how long a
    /// dead leader goes unnoticed.
    pub election_timeout_min_ms: u64,
    /// Longest such wait, in milliseconds (each follower picks at random in between, so they
    /// rarely stand at once). Default 2000. Must exceed `election_timeout_min_ms`.
    pub election_timeout_max_ms: u64,
    /// Deadline for one client-facing operation (write, linearizable read, membership change,
    /// initialization), in milliseconds. Default 5000. On expiry the caller gets
    /// [`RaftError::Timeout`]; a write may still commit afterwards.
    pub request_timeout_ms: u64,
    /// Deadline for sending and installing a full snapshot, in milliseconds. Default 10000.
    pub install_snapshot_timeout_ms: u64,
    /// Log entries per AppendEntries RPC, at most. Default 300. Bounds replication messages.
    pub append_entries_max: u64,
    /// Build a snapshot after this many entries applied since the last one. Default 5000.
    /// Smaller means faster restarts and shorter logs, more snapshot work.
    pub snapshot_interval_entries: u64,
    /// Log entries kept after a snapshot covers them, so a briefly lagging member catches up
    /// from the log instead of a full snapshot. Default 1000.
    pub entries_kept_after_snapshot_max: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 250,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 2000,
            request_timeout_ms: 5000,
            install_snapshot_timeout_ms: 10_000,
            append_entries_max: 300,
            snapshot_interval_entries: 5000,
            entries_kept_after_snapshot_max: 1000,
        }
    }
}

impl RaftConfig {
    fn to_openraft(&self) -> Result<openraft::Config, RaftError> {
        let config = openraft::Config {
            cluster_name: "chorus-metadata".into(),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            install_snapshot_timeout: self.install_snapshot_timeout_ms,
            max_payload_entries: self.append_entries_max,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_interval_entries),
            max_in_snapshot_log_to_keep: self.entries_kept_after_snapshot_max,
            // A member that was cut off must not bump the term and depose a healthy leader
            // when it comes back.
            enable_pre_vote: Some(true),
            // A restarted leader must win an election again rather than resume its term: the
            // applied state and the committed index are written without a flush, so after a
            // crash they may be behind what this leader had acknowledged, and a resumed leader
            // could answer a read from that older state.
            enable_leader_restore: Some(false),
            ..openraft::Config::default()
        };
        config
            .validate()
            .map_err(|e| RaftError::Config(e.to_string()))
    }
}

/// What went wrong with a metadata Raft operation.
#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    /// This node is not the leader: send the request to `leader_id` at `leader_addr` (both
    /// `None` while no leader is known, e.g. during an election; retry later).
    #[error("not the leader; forward to node {leader_id:?} at {leader_addr:?}")]
    ForwardToLeader {
        /// The leader, if known.
        leader_id: Option<NodeId>,
        /// The leader's inter-node address, if known.
        leader_addr: Option<String>,
    },
    /// The write's log entry was dropped when leadership changed; it may or may not have been
    /// committed. Retry only commands that are safe to apply twice.
    #[error(
        "write outcome unknown (leadership changed; leader now {leader_id:?} at {leader_addr:?})"
    )]
    WriteOutcomeUnknown {
        /// The new leader, if known.
        leader_id: Option<NodeId>,
        /// Its inter-node address, if known.
        leader_addr: Option<String>,
    },
    /// The leader could not confirm its leadership with a quorum (for a linearizable read).
    #[error("no quorum confirmed the leadership: {0}")]
    QuorumUnreachable(String),
    /// A membership change was refused (another change in progress, unknown learner, …).
    #[error("membership change refused: {0}")]
    MembershipChange(String),
    /// [`MetadataRaft::initialize`] on a node that already has a log or a vote.
    #[error("raft group already initialized")]
    AlreadyInitialized,
    /// The operation did not finish within [`RaftConfig::request_timeout_ms`]. A write may
    /// still commit after this.
    #[error("{operation} timed out after {timeout_ms} ms")]
    Timeout {
        /// Which operation.
        operation: &'static str,
        /// The deadline that passed.
        timeout_ms: u64,
    },
    /// The [`RaftConfig`] is inconsistent (e.g. heartbeat not below the election timeout).
    #[error("invalid raft config: {0}")]
    Config(String),
    /// The sled store could not be opened or read.
    #[error("raft storage ({context}): {source}")]
    Storage {
        /// What was being done.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Raft was shut down.
    #[error("raft stopped")]
    Stopped,
    /// Raft stopped on an unrecoverable error (a storage failure, a panic in the core).
    #[error("raft failed: {0}")]
    Fatal(String),
}

impl From<Fatal<TypeConfig>> for RaftError {
    fn from(fatal: Fatal<TypeConfig>) -> Self {
        match fatal {
            Fatal::Stopped => RaftError::Stopped,
            other => RaftError::Fatal(other.to_string()),
        }
    }
}

fn forward_to_leader(forward: ForwardToLeader<TypeConfig>) -> RaftError {
    RaftError::ForwardToLeader {
        leader_id: forward.leader_id,
        leader_addr: forward.leader_node.map(|node| node.cluster_addr),
    }
}

impl From<openraft::errors::RaftError<TypeConfig, ClientWriteError<TypeConfig>>> for RaftError {
    fn from(error: openraft::errors::RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> Self {
        match error {
            openraft::errors::RaftError::Fatal(fatal) => fatal.into(),
            openraft::errors::RaftError::APIError(api) => match api {
                ClientWriteError::ForwardToLeader(forward) => forward_to_leader(forward),
                ClientWriteError::LogEntryDiscarded(forward) => RaftError::WriteOutcomeUnknown {
                    leader_id: forward.leader_id,
                    leader_addr: forward.leader_node.map(|node| node.cluster_addr),
                },
                ClientWriteError::ChangeMembershipError(e) => {
                    RaftError::MembershipChange(e.to_string())
                }
                ClientWriteError::PreconditionFailed(e) => {
                    RaftError::MembershipChange(e.to_string())
                }
            },
        }
    }
}

impl From<openraft::errors::RaftError<TypeConfig, LinearizableReadError<TypeConfig>>>
    for RaftError
{
    fn from(
        error: openraft::errors::RaftError<TypeConfig, LinearizableReadError<TypeConfig>>,
    ) -> Self {
        match error {
            openraft::errors::RaftError::Fatal(fatal) => fatal.into(),
            openraft::errors::RaftError::APIError(api) => match api {
                LinearizableReadError::ForwardToLeader(forward) => forward_to_leader(forward),
                LinearizableReadError::QuorumNotEnough(e) => {
                    RaftError::QuorumUnreachable(e.to_string())
                }
            },
        }
    }
}

impl From<openraft::errors::RaftError<TypeConfig, InitializeError<TypeConfig>>> for RaftError {
    fn from(error: openraft::errors::RaftError<TypeConfig, InitializeError<TypeConfig>>) -> Self {
        match error {
            openraft::errors::RaftError::Fatal(fatal) => fatal.into(),
            openraft::errors::RaftError::APIError(InitializeError::NotAllowed(_)) => {
                RaftError::AlreadyInitialized
            }
            openraft::errors::RaftError::APIError(InitializeError::NotInMembers(e)) => {
                RaftError::MembershipChange(e.to_string())
            }
        }
    }
}

/// A member's role in the Raft group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RaftRole {
    /// Receives the log, does not vote (a learner, or not yet part of any membership).
    Learner,
    /// A voter following a leader.
    Follower,
    /// A voter standing for election.
    Candidate,
    /// The leader: the only member that accepts writes.
    Leader,
    /// Shutting down or stopped.
    Shutdown,
}

/// A point-in-time view of this member's Raft state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftMetrics {
    /// This member.
    pub node_id: NodeId,
    /// Current term.
    pub term: u64,
    /// This member's role.
    pub role: RaftRole,
    /// The leader this member knows of.
    pub leader: Option<NodeId>,
    /// Index of the last entry in the local log.
    pub last_log_index: Option<u64>,
    /// Index of the last entry applied to the local metadata.
    pub applied_index: Option<u64>,
    /// Index of the last entry covered by the local snapshot.
    pub snapshot_index: Option<u64>,
    /// Index of the last entry removed from the local log (covered by the snapshot).
    pub purged_index: Option<u64>,
    /// Voters of the latest membership (for a joint membership during a change: the union).
    pub voters: BTreeSet<NodeId>,
    /// Learners of the latest membership.
    pub learners: BTreeSet<NodeId>,
    /// Every member of the latest membership with its address.
    pub nodes: BTreeMap<NodeId, RaftNode>,
}

/// This node's member of the metadata Raft group. Cheap to clone; clones share the member.
#[derive(Clone)]
pub struct MetadataRaft {
    node_id: NodeId,
    raft: Raft<TypeConfig, StateMachineStore>,
    metadata: watch::Receiver<Arc<ClusterMetadata>>,
    db: sled::Db,
    request_timeout: Duration,
}

impl std::fmt::Debug for MetadataRaft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetadataRaft")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl MetadataRaft {
    /// Starts this node's member with its state in `db` (trees [`LOG_TREE`], [`META_TREE`],
    /// [`STATE_MACHINE_TREE`]; whatever was there before is recovered), sending RPCs through
    /// `transport`. A fresh member does nothing until it is
    /// [`initialize`](Self::initialize)d or added to an existing group by its leader; a
    /// recovered one rejoins its group.
    ///
    /// `node_id` must be the id this node had before (it is part of every vote it cast).
    pub async fn start<T: RaftTransport>(
        node_id: NodeId,
        db: &sled::Db,
        transport: T,
        config: &RaftConfig,
    ) -> Result<Self, RaftError> {
        let openraft_config = Arc::new(config.to_openraft()?);
        let log_store = LogStore::open(db).map_err(|source| RaftError::Storage {
            context: "open log",
            source,
        })?;
        let state_machine = StateMachineStore::open(db).map_err(|source| RaftError::Storage {
            context: "open state machine",
            source,
        })?;
        let metadata = state_machine.subscribe();
        let network = NetworkFactory::new(node_id, transport);
        let raft = Raft::new(node_id, openraft_config, network, log_store, state_machine).await?;
        Ok(Self {
            node_id,
            raft,
            metadata,
            db: db.clone(),
            request_timeout: Duration::from_millis(config.request_timeout_ms),
        })
    }

    async fn bounded<F: Future>(
        &self,
        operation: &'static str,
        future: F,
    ) -> Result<F::Output, RaftError> {
        tokio::time::timeout(self.request_timeout, future)
            .await
            .map_err(|_| RaftError::Timeout {
                operation,
                timeout_ms: self.request_timeout_ms(),
            })
    }

    fn request_timeout_ms(&self) -> u64 {
        u64::try_from(self.request_timeout.as_millis()).unwrap_or(u64::MAX)
    }

    /// This member's id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// Where the transport's server side delivers incoming RPCs for this member.
    pub fn rpc_handler(&self) -> RaftRpcHandler {
        RaftRpcHandler::new(self.raft.clone())
    }

    /// Creates a new group with this node as its only voter, reached at `self_node`, and
    /// returns once this node leads it with the initial membership committed (so membership
    /// changes can follow at once). Only the first node of a cluster does this; the others
    /// join through the leader's [`add_learner`](Self::add_learner). Fails with
    /// [`RaftError::AlreadyInitialized`] if this member already has a log or a vote.
    pub async fn initialize(&self, self_node: RaftNode) -> Result<(), RaftError> {
        let members = BTreeMap::from([(self.node_id, self_node)]);
        self.bounded("initialize", self.raft.initialize(members))
            .await??;
        let leading = self
            .raft
            .wait(Some(self.request_timeout))
            .metrics(
                |m| {
                    m.state == ServerState::Leader
                        && m.committed_membership_config.log_id().is_some()
                        && m.committed_membership_config.log_id() == m.membership_config.log_id()
                },
                "initialized member leads with its membership committed",
            )
            .await;
        match leading {
            Ok(_) => Ok(()),
            Err(WaitError::ShuttingDown) => Err(RaftError::Stopped),
            Err(WaitError::Timeout(..)) => Err(RaftError::Timeout {
                operation: "initialize",
                timeout_ms: self.request_timeout_ms(),
            }),
        }
    }

    /// Whether this member already belongs to a group (has a log or a vote).
    pub async fn is_initialized(&self) -> Result<bool, RaftError> {
        Ok(self.raft.is_initialized().await?)
    }

    /// Adds member `id`, reached at `node`, as a learner and waits (within the request
    /// deadline) until it has caught up with the log. Leader only. Adding a current member
    /// again is harmless.
    pub async fn add_learner(&self, id: NodeId, node: RaftNode) -> Result<(), RaftError> {
        self.bounded("add_learner", self.raft.add_learner(id, node, true))
            .await??;
        Ok(())
    }

    /// Makes `voters` the voter set (they must already be members: voters or caught-up
    /// learners). Voters left out stay on as learners. Leader only; returns once the change
    /// is committed (through a joint membership when the set changes by more than one).
    pub async fn change_membership(&self, voters: BTreeSet<NodeId>) -> Result<(), RaftError> {
        self.bounded(
            "change_membership",
            self.raft
                .change_membership(ChangeMembers::ReplaceAllVoters(voters), true),
        )
        .await??;
        Ok(())
    }

    /// Makes learner `id` a voter too, keeping the other voters whatever they are now (two
    /// joins in a row never undo each other, as replacing the whole voter set from a stale
    /// view could). Leader only; returns once the change is committed.
    pub async fn add_voter(&self, id: NodeId) -> Result<(), RaftError> {
        self.bounded(
            "add_voter",
            self.raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false),
        )
        .await??;
        Ok(())
    }

    /// The voters of the membership this member acts on (on the leader: the latest, even
    /// if not yet committed).
    pub fn voter_ids(&self) -> BTreeSet<NodeId> {
        self.raft.voter_ids().collect()
    }

    /// Records that member `id` is now reached at `node` (it restarted at another address;
    /// same id, same log). Leader only; returns once the change is committed.
    pub async fn set_member_address(&self, id: NodeId, node: RaftNode) -> Result<(), RaftError> {
        let change = ChangeMembers::SetNodes(std::collections::BTreeMap::from([(id, node)]));
        self.bounded(
            "set_member_address",
            self.raft.change_membership(change, true),
        )
        .await??;
        Ok(())
    }

    /// Removes member `id` from the group entirely (as a voter or a learner). Leader only.
    /// Removing the leader itself makes it step down once the change commits.
    pub async fn remove_member(&self, id: NodeId) -> Result<(), RaftError> {
        let is_voter = self.raft.voter_ids().any(|voter| voter == id);
        let change = if is_voter {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        self.bounded("remove_member", self.raft.change_membership(change, false))
            .await??;
        Ok(())
    }

    /// Asks the leader (this node) to hand leadership to voter `to`, e.g. before draining.
    /// Returns once the request is issued; watch [`leader`](Self::leader) for the outcome.
    pub async fn transfer_leadership(&self, to: NodeId) -> Result<(), RaftError> {
        if !self.raft.is_leader() {
            return Err(RaftError::ForwardToLeader {
                leader_id: self.leader(),
                leader_addr: self.leader_addr(),
            });
        }
        Ok(self.raft.trigger().transfer_leader(to).await?)
    }

    /// Proposes `command` and returns the state machine's response once it is committed and
    /// applied here. On a follower: [`RaftError::ForwardToLeader`].
    pub async fn write(&self, command: MetadataCommand) -> Result<MetadataResponse, RaftError> {
        let written = self
            .bounded("write", self.raft.client_write(command))
            .await??;
        Ok(written.data)
    }

    /// The metadata as of a point after every write acknowledged before this call: the
    /// leader confirms its leadership with a quorum (ReadIndex) and waits until its state
    /// machine has applied up to the commit index. On a follower:
    /// [`RaftError::ForwardToLeader`]. Use for decisions such as room ownership.
    pub async fn linearizable_read(&self) -> Result<Arc<ClusterMetadata>, RaftError> {
        self.bounded(
            "linearizable_read",
            self.raft.ensure_linearizable(ReadPolicy::ReadIndex),
        )
        .await??;
        // The state machine publishes each batch before openraft counts it as applied, and
        // `ensure_linearizable` returned only after the read index was applied: this value is
        // at least that fresh.
        Ok(self.metadata.borrow().clone())
    }

    /// The metadata as applied on this node: no round trip, possibly behind the leader.
    pub fn metadata(&self) -> Arc<ClusterMetadata> {
        self.metadata.borrow().clone()
    }

    /// A receiver that sees every newly applied metadata (e.g. to rebuild the placement ring
    /// when members change).
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterMetadata>> {
        self.metadata.clone()
    }

    /// The leader this member knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow_watched().current_leader
    }

    fn leader_addr(&self) -> Option<String> {
        let metrics = self.raft.metrics().borrow_watched().clone();
        let leader = metrics.current_leader?;
        metrics
            .membership_config
            .get_node(&leader)
            .map(|node| node.cluster_addr.clone())
    }

    /// Resolves if this member's Raft core stops without [`shutdown`](Self::shutdown)
    /// being asked for (a storage error, a bug in the library), with what is known of why.
    /// A member in that state neither votes nor applies: the node should stop.
    pub async fn failed(&self) -> String {
        let mut metrics = self.raft.metrics();
        loop {
            if let Err(fatal) = &metrics.borrow_watched().running_state {
                return fatal.to_string();
            }
            if metrics.changed().await.is_err() {
                return "the raft core task ended".to_string();
            }
        }
    }

    /// This member's Raft state (term, role, leader, log and apply progress, membership).
    pub fn metrics(&self) -> RaftMetrics {
        let metrics = self.raft.metrics().borrow_watched().clone();
        let membership = metrics.membership_config.membership();
        RaftMetrics {
            node_id: self.node_id,
            term: metrics.current_term,
            role: match metrics.state {
                ServerState::Learner => RaftRole::Learner,
                ServerState::Follower => RaftRole::Follower,
                ServerState::Candidate => RaftRole::Candidate,
                ServerState::Leader => RaftRole::Leader,
                ServerState::Shutdown => RaftRole::Shutdown,
            },
            leader: metrics.current_leader,
            last_log_index: metrics.last_log_index,
            applied_index: metrics.last_applied.as_ref().map(|log_id| log_id.index()),
            snapshot_index: metrics.snapshot.as_ref().map(|log_id| log_id.index()),
            purged_index: metrics.purged.as_ref().map(|log_id| log_id.index()),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            nodes: membership
                .nodes()
                .map(|(id, node)| (*id, node.clone()))
                .collect(),
        }
    }

    /// Stops this member (it stops voting, replicating and answering RPCs), then flushes
    /// sled. Other clones then fail with [`RaftError::Stopped`].
    pub async fn shutdown(&self) -> Result<(), RaftError> {
        self.raft
            .shutdown()
            .await
            .map_err(|e| RaftError::Fatal(format!("raft task failed: {e}")))?;
        self.bounded("flush", store::flush(&self.db))
            .await?
            .map_err(|source| RaftError::Storage {
                context: "flush on shutdown",
                source,
            })?;
        Ok(())
    }
}
