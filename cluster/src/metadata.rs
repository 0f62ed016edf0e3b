//! The cluster metadata state machine (sans-IO): what Raft replicates.
//!
//! Members and their addresses and states, the placement ring's epoch, the owners of actor
//! keys (rooms, red-packet pools) with fencing epochs, and durable definitions (rooms,
//! rains, quiz shows and their committed state) as opaque bytes.
//! [`ClusterMetadata::apply`] is a pure function of the state and one [`MetadataCommand`]:
//! Raft feeds it committed log entries in order on every node, so every node holds the same
//! state at the same log index. The state is kept in memory (and in sled); what makes it
//! durable is the Raft log and snapshots: after a restart openraft re-applies the durable
//! log over whatever applied state survived (`raft::store`).
//!
//! **Fencing.** `ClaimOwnership` is granted only to the key's owner on the committed ring,
//! at an epoch one above the previous claim, so every activation of a room or a pool gets a
//! new, higher epoch and a stale owner is always older. The nodes refuse writes from an
//! epoch below the highest they have seen or below the committed one.
//!
//! **Ids.** The first member is [`BOOTSTRAP_NODE_ID`]; `AddNode` gives every joiner the next
//! id, never reused, and the same id again to a retried `AddNode` with the same join token.
//!
//! This module does not know about Raft, sockets or disks; `raft` wraps it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A node id: assigned by the metadata (monotonic), never reused.
pub type NodeId = u64;

/// The id of the member that initialized the cluster. Joiners get ids above it, so a
/// join that reaches the first member before it has registered itself can never take
/// its id.
pub const BOOTSTRAP_NODE_ID: NodeId = 1;
/// Upper bound on members, so a runaway join loop cannot grow the state without limit.
pub const MEMBERS_MAX: usize = 1024;
/// Upper bound on stored room definitions per cluster.
pub const ROOMS_MAX: usize = 10_000_000;

/// A member's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Added, not yet serving (not on the ring).
    Joining,
    /// Serving: on the ring.
    Up,
    /// Handing its actors away: off the ring, still reachable.
    Draining,
    /// Failed or removed: off the ring.
    Down,
}

/// What the cluster knows of a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Id.
    pub id: NodeId,
    /// Human-readable name.
    pub name: String,
    /// Inter-node QUIC address (Raft, actor messages, relay).
    pub cluster_addr: String,
    /// Client HTTP address (WebSocket, admin).
    pub http_addr: String,
    /// Client QUIC address.
    pub quic_addr: String,
    /// Lifecycle state.
    pub state: NodeState,
    /// The random token the member joined with (0: none, or a member that bootstrapped
    /// the cluster): a retried join with the same token gets the same id, while a new
    /// process at a known address (its data dir was lost) gets a new one.
    #[serde(default)]
    pub join_token: u64,
}

/// Who owns an actor (room, pool, …) and at which fencing epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ownership {
    /// The owning node.
    pub node: NodeId,
    /// Fencing epoch: strictly increases with every change of owner. A node acts as owner
    /// only with the epoch it was granted; messages with an older epoch are refused.
    pub epoch: u64,
}

/// A change to the metadata, proposed through Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetadataCommand {
    /// Register a new member (state `Joining`); the metadata assigns its id.
    AddNode {
        /// Name.
        name: String,
        /// Inter-node address.
        cluster_addr: String,
        /// Client HTTP address.
        http_addr: String,
        /// Client QUIC address.
        quic_addr: String,
        /// The joiner's random token, kept on its disk before it asks: a retried request
        /// (its answer was lost, or the joiner restarted half-way) gets the same id.
        /// 0 (older joiners): the same live address gets the same id.
        #[serde(default)]
        join_token: u64,
    },
    /// Register the first member, id [`BOOTSTRAP_NODE_ID`] (cluster initialization);
    /// applied once.
    Bootstrap {
        /// The member.
        node: NodeRecord,
    },
    /// Change a member's state; bumps the ring epoch when the set of `Up` members changes.
    SetNodeState {
        /// Which member.
        node: NodeId,
        /// New state.
        state: NodeState,
    },
    /// A member restarted at other addresses (its pod got a new IP): record them.
    SetAddresses {
        /// Which member.
        node: NodeId,
        /// Inter-node address.
        cluster_addr: String,
        /// Client HTTP address.
        http_addr: String,
        /// Client QUIC address.
        quic_addr: String,
    },
    /// Forget a member (its id is never reused).
    RemoveNode {
        /// Which member.
        node: NodeId,
    },
    /// Claim ownership of `key` for `node`, which is activating it: granted only if `node`
    /// owns `key` on the committed ring, at a new epoch one above the previous owner's
    /// (every activation is a new epoch, so a stale activation is always older).
    ClaimOwnership {
        /// Actor key (e.g. `room/r-…`).
        key: String,
        /// The claimant.
        node: NodeId,
    },
    /// Store (or replace) a durable definition: opaque bytes under a key.
    PutDefinition {
        /// Key (e.g. `room/r-…`).
        key: String,
        /// Encoded definition.
        value: Vec<u8>,
    },
    /// Delete a durable definition.
    DeleteDefinition {
        /// Key.
        key: String,
    },
}

/// The result of applying a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetadataResponse {
    /// Applied; nothing to report.
    Ok,
    /// A member was added with this id.
    NodeAdded(NodeId),
    /// Ownership granted at this epoch.
    OwnershipGranted(Ownership),
    /// The claim lost the race: this is the current owner.
    OwnershipConflict(Ownership),
    /// The command was refused (unknown node, bound reached, …).
    Refused(String),
}

/// The replicated metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMetadata {
    /// Members by id.
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// The next id to assign (ids are never reused).
    pub next_node_id: NodeId,
    /// Whether the first member has registered itself (`Bootstrap`, applied once).
    #[serde(default)]
    pub bootstrapped: bool,
    /// Placement ring epoch: bumped whenever the set of `Up` members changes.
    pub ring_epoch: u64,
    /// Current owners by actor key.
    pub owners: BTreeMap<String, Ownership>,
    /// Durable definitions by key.
    pub definitions: BTreeMap<String, Vec<u8>>,
}

impl ClusterMetadata {
    /// The ids of `Up` members, in order: the input of the placement ring.
    pub fn up_nodes(&self) -> Vec<NodeId> {
        self.nodes
            .values()
            .filter(|n| n.state == NodeState::Up)
            .map(|n| n.id)
            .collect()
    }

    /// Applies one committed command.
    pub fn apply(&mut self, command: MetadataCommand) -> MetadataResponse {
        let response = match command {
            MetadataCommand::Bootstrap { node } => {
                if self.bootstrapped
                    || node.id != BOOTSTRAP_NODE_ID
                    || self.nodes.contains_key(&node.id)
                {
                    MetadataResponse::Refused("cluster already initialized".into())
                } else {
                    self.bootstrapped = true;
                    self.next_node_id = self.next_node_id.max(node.id + 1);
                    let up = node.state == NodeState::Up;
                    self.nodes.insert(node.id, node);
                    if up {
                        self.ring_epoch += 1;
                    }
                    MetadataResponse::Ok
                }
            }
            MetadataCommand::AddNode {
                name,
                cluster_addr,
                http_addr,
                quic_addr,
                join_token,
            } => {
                let retried = self.nodes.values().find(|n| {
                    if join_token != 0 {
                        n.join_token == join_token
                    } else {
                        n.cluster_addr == cluster_addr && n.state != NodeState::Down
                    }
                });
                if let Some(existing) = retried {
                    // A retried join gets the same id.
                    MetadataResponse::NodeAdded(existing.id)
                } else if self.nodes.len() >= MEMBERS_MAX {
                    MetadataResponse::Refused(format!("at most {MEMBERS_MAX} members"))
                } else {
                    let id = self.next_node_id.max(BOOTSTRAP_NODE_ID + 1);
                    self.next_node_id = id + 1;
                    self.nodes.insert(
                        id,
                        NodeRecord {
                            id,
                            name,
                            cluster_addr,
                            http_addr,
                            quic_addr,
                            state: NodeState::Joining,
                            join_token,
                        },
                    );
                    MetadataResponse::NodeAdded(id)
                }
            }
            MetadataCommand::SetNodeState { node, state } => match self.nodes.get_mut(&node) {
                None => MetadataResponse::Refused(format!("no node {node}")),
                Some(record) => {
                    let was_up = record.state == NodeState::Up;
                    record.state = state;
                    if was_up != (state == NodeState::Up) {
                        self.ring_epoch += 1;
                    }
                    MetadataResponse::Ok
                }
            },
            MetadataCommand::SetAddresses {
                node,
                cluster_addr,
                http_addr,
                quic_addr,
            } => match self.nodes.get_mut(&node) {
                None => MetadataResponse::Refused(format!("no node {node}")),
                Some(record) => {
                    record.cluster_addr = cluster_addr;
                    record.http_addr = http_addr;
                    record.quic_addr = quic_addr;
                    MetadataResponse::Ok
                }
            },
            MetadataCommand::RemoveNode { node } => match self.nodes.remove(&node) {
                None => MetadataResponse::Refused(format!("no node {node}")),
                Some(record) => {
                    if record.state == NodeState::Up {
                        self.ring_epoch += 1;
                    }
                    MetadataResponse::Ok
                }
            },
            MetadataCommand::ClaimOwnership { key, node } => {
                let current = self.owners.get(&key).copied();
                let ring_owner = crate::ring::Ring::from_metadata(self)
                    .ok()
                    .and_then(|ring| ring.owner(&key));
                if ring_owner != Some(node) {
                    MetadataResponse::OwnershipConflict(current.unwrap_or(Ownership {
                        node: ring_owner.unwrap_or(0),
                        epoch: 0,
                    }))
                } else if current.is_none() && self.owners.len() >= ROOMS_MAX {
                    MetadataResponse::Refused(format!("at most {ROOMS_MAX} owned keys"))
                } else {
                    let granted = Ownership {
                        node,
                        epoch: current.map(|o| o.epoch).unwrap_or(0) + 1,
                    };
                    self.owners.insert(key, granted);
                    MetadataResponse::OwnershipGranted(granted)
                }
            }
            MetadataCommand::PutDefinition { key, value } => {
                if self.definitions.len() >= ROOMS_MAX && !self.definitions.contains_key(&key) {
                    MetadataResponse::Refused(format!("at most {ROOMS_MAX} definitions"))
                } else {
                    self.definitions.insert(key, value);
                    MetadataResponse::Ok
                }
            }
            MetadataCommand::DeleteDefinition { key } => {
                self.definitions.remove(&key);
                self.owners.remove(&key);
                MetadataResponse::Ok
            }
        };
        self.check_invariants();
        response
    }

    /// Checks the invariants (debug builds).
    pub fn check_invariants(&self) {
        #[cfg(debug_assertions)]
        {
            for (id, node) in &self.nodes {
                assert_eq!(*id, node.id);
                assert!(
                    node.id < self.next_node_id,
                    "ids are assigned below next_node_id"
                );
            }
            assert!(self.nodes.len() <= MEMBERS_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(meta: &mut ClusterMetadata, name: &str) -> NodeId {
        match meta.apply(MetadataCommand::AddNode {
            name: name.into(),
            cluster_addr: format!("{name}:7072"),
            http_addr: format!("{name}:7070"),
            quic_addr: format!("{name}:7071"),
            join_token: 0,
        }) {
            MetadataResponse::NodeAdded(id) => id,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ids_are_never_reused_and_the_ring_epoch_follows_up_members() {
        let mut meta = ClusterMetadata::default();
        let a = add(&mut meta, "a");
        let b = add(&mut meta, "b");
        assert_eq!(add(&mut meta, "a"), a, "a retried join keeps its id");
        assert_eq!(meta.ring_epoch, 0);
        meta.apply(MetadataCommand::SetNodeState {
            node: a,
            state: NodeState::Up,
        });
        meta.apply(MetadataCommand::SetNodeState {
            node: b,
            state: NodeState::Up,
        });
        assert_eq!(meta.ring_epoch, 2);
        assert_eq!(meta.up_nodes(), vec![a, b]);
        meta.apply(MetadataCommand::SetNodeState {
            node: b,
            state: NodeState::Draining,
        });
        assert_eq!(meta.ring_epoch, 3);
        meta.apply(MetadataCommand::RemoveNode { node: b });
        assert_eq!(
            meta.ring_epoch, 3,
            "removing a node that is not up keeps the ring"
        );
        let c = add(&mut meta, "b");
        assert!(c > b, "a removed id is not reused");
    }

    fn add_with_token(meta: &mut ClusterMetadata, name: &str, join_token: u64) -> NodeId {
        match meta.apply(MetadataCommand::AddNode {
            name: name.into(),
            cluster_addr: format!("{name}:7072"),
            http_addr: format!("{name}:7070"),
            quic_addr: format!("{name}:7071"),
            join_token,
        }) {
            MetadataResponse::NodeAdded(id) => id,
            other => panic!("{other:?}"),
        }
    }

    fn first(name: &str) -> NodeRecord {
        NodeRecord {
            id: BOOTSTRAP_NODE_ID,
            name: name.into(),
            cluster_addr: format!("{name}:7072"),
            http_addr: format!("{name}:7070"),
            quic_addr: format!("{name}:7071"),
            state: NodeState::Up,
            join_token: 0,
        }
    }

    #[test]
    fn a_join_before_the_bootstrap_never_takes_the_first_members_id() {
        let mut meta = ClusterMetadata::default();
        // A joiner reaches the first member between its Raft initialization and its own
        // registration.
        let early = add_with_token(&mut meta, "b", 7);
        assert_ne!(early, BOOTSTRAP_NODE_ID);
        assert_eq!(
            meta.apply(MetadataCommand::Bootstrap { node: first("a") }),
            MetadataResponse::Ok
        );
        assert_eq!(meta.nodes[&BOOTSTRAP_NODE_ID].name, "a");
        assert_eq!(meta.nodes[&early].name, "b");
        // Applied once: a second bootstrap changes nothing.
        assert!(matches!(
            meta.apply(MetadataCommand::Bootstrap { node: first("x") }),
            MetadataResponse::Refused(_)
        ));
        assert_eq!(meta.nodes[&BOOTSTRAP_NODE_ID].name, "a");
    }

    #[test]
    fn a_retried_join_keeps_its_id_and_a_new_process_at_the_same_address_gets_a_new_one() {
        let mut meta = ClusterMetadata::default();
        meta.apply(MetadataCommand::Bootstrap { node: first("a") });
        let b = add_with_token(&mut meta, "b", 41);
        assert_eq!(add_with_token(&mut meta, "b", 41), b, "same token, same id");
        let c = add_with_token(&mut meta, "c", 42);
        let b_again = add_with_token(&mut meta, "b", 43);
        assert!(b_again > c, "a new token at b's address is a new member");
        let ids: std::collections::BTreeSet<_> = meta.nodes.keys().copied().collect();
        assert_eq!(ids.len(), 4);
    }

    #[test]
    fn ownership_goes_only_to_the_ring_owner_at_ever_higher_epochs() {
        let mut meta = ClusterMetadata::default();
        let a = add(&mut meta, "a");
        let b = add(&mut meta, "b");
        for node in [a, b] {
            meta.apply(MetadataCommand::SetNodeState {
                node,
                state: NodeState::Up,
            });
        }
        let key = "room/r-1";
        let claim = |node| MetadataCommand::ClaimOwnership {
            key: key.into(),
            node,
        };
        let ring = crate::ring::Ring::from_metadata(&meta).expect("ring");
        let owner = ring.owner(key).expect("owner");
        let other = if owner == a { b } else { a };
        assert_eq!(
            meta.apply(claim(owner)),
            MetadataResponse::OwnershipGranted(Ownership {
                node: owner,
                epoch: 1
            })
        );
        // not the ring owner: refused, told the current owner
        assert_eq!(
            meta.apply(claim(other)),
            MetadataResponse::OwnershipConflict(Ownership {
                node: owner,
                epoch: 1
            })
        );
        // every activation is a new epoch
        assert_eq!(
            meta.apply(claim(owner)),
            MetadataResponse::OwnershipGranted(Ownership {
                node: owner,
                epoch: 2
            })
        );
        // the owner goes down: the other node takes over above the old epoch, and the
        // old owner can no longer claim
        meta.apply(MetadataCommand::SetNodeState {
            node: owner,
            state: NodeState::Down,
        });
        assert_eq!(
            meta.apply(claim(other)),
            MetadataResponse::OwnershipGranted(Ownership {
                node: other,
                epoch: 3
            })
        );
        assert!(matches!(
            meta.apply(claim(owner)),
            MetadataResponse::OwnershipConflict(_)
        ));
    }
}
