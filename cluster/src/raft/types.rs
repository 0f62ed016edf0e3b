//! The openraft type configuration of the metadata group: what its log carries and how a
//! member is addressed.
//!
//! The aliases name openraft's generic types at our configuration; they appear only inside
//! [`RaftRpc`](super::RaftRpc) payloads and the stores, never in the wrapper's API (so they
//! are not re-exported).

use std::fmt;

use openraft::type_config::alias;
use serde::{Deserialize, Serialize};

use crate::metadata::{MetadataCommand, MetadataResponse, NodeId};

/// How Raft reaches a member: stored in the Raft membership next to its id, so the leader
/// can dial a new member before the metadata state machine knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftNode {
    /// Inter-node (QUIC) address, `host:port`; the same as
    /// [`NodeRecord::cluster_addr`](crate::metadata::NodeRecord::cluster_addr).
    pub cluster_addr: String,
}

impl RaftNode {
    /// A member reached at `cluster_addr`.
    pub fn new(cluster_addr: impl Into<String>) -> Self {
        Self {
            cluster_addr: cluster_addr.into(),
        }
    }
}

impl fmt::Display for RaftNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.cluster_addr)
    }
}

openraft::declare_raft_types!(
    /// The openraft type configuration of the metadata group. Everything not named here is
    /// openraft's default: `u64` terms, the "advanced" leader id (one leader per term), the
    /// tokio runtime and oneshot-style responders.
    pub TypeConfig:
        D = MetadataCommand,
        R = MetadataResponse,
        NodeId = NodeId,
        Node = RaftNode,
);

/// A log position: (leader that wrote it, index).
pub type LogId = alias::LogIdOf<TypeConfig>;
/// A vote (term and the node voted for, committed once a quorum granted it).
pub type Vote = alias::VoteOf<TypeConfig>;
/// One log entry: blank, a membership change, or a [`MetadataCommand`].
pub type Entry = alias::EntryOf<TypeConfig>;
/// A membership (voters and learners with their [`RaftNode`]) and the log id it was written at.
pub type StoredMembership = alias::StoredMembershipOf<TypeConfig>;
/// What a snapshot covers: its last log id and the membership at that point.
pub type SnapshotMeta = alias::SnapshotMetaOf<TypeConfig>;
/// A snapshot: its meta and the MessagePack bytes of a
/// [`ClusterMetadata`](crate::metadata::ClusterMetadata).
pub type Snapshot = alias::SnapshotOf<TypeConfig, Vec<u8>>;

/// openraft requires log payloads to be `Display` (it logs them). Short on purpose: a
/// definition's bytes are never printed.
impl fmt::Display for MetadataCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetadataCommand::AddNode {
                name, cluster_addr, ..
            } => write!(f, "add_node({name} at {cluster_addr})"),
            MetadataCommand::Bootstrap { node } => write!(f, "bootstrap(node {})", node.id),
            MetadataCommand::SetNodeState { node, state } => {
                write!(f, "set_node_state(node {node}: {state:?})")
            }
            MetadataCommand::SetAddresses {
                node, cluster_addr, ..
            } => write!(f, "set_addresses(node {node} at {cluster_addr})"),
            MetadataCommand::RemoveNode { node } => write!(f, "remove_node({node})"),
            MetadataCommand::ClaimOwnership { key, node } => {
                write!(f, "claim_ownership({key} for node {node})")
            }
            MetadataCommand::PutDefinition { key, value } => {
                write!(f, "put_definition({key}, {} bytes)", value.len())
            }
            MetadataCommand::DeleteDefinition { key } => write!(f, "delete_definition({key})"),
        }
    }
}
