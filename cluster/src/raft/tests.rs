//! Raft groups of real members (sled in temporary directories) over the in-memory transport.
//! Conditions are polled with a deadline; nothing waits a fixed time.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::*;
use crate::metadata::{MetadataCommand, MetadataResponse, NodeState};

/// How long any condition may take to hold: several election timeouts of [`test_config`].
const CONDITION_DEADLINE: Duration = Duration::from_secs(15);
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Short timeouts so elections happen in well under a second.
fn test_config() -> RaftConfig {
    RaftConfig {
        // Short enough for quick tests, long enough that a busy 2-core CI machine does not
        // trigger spurious elections.
        heartbeat_interval_ms: 100,
        election_timeout_min_ms: 800,
        election_timeout_max_ms: 1600,
        ..RaftConfig::default()
    }
}

fn address(id: NodeId) -> RaftNode {
    RaftNode::new(format!("node-{id}:7072"))
}

/// Polls `probe` until it returns `Some`, failing with `what` after [`CONDITION_DEADLINE`].
async fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + CONDITION_DEADLINE;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {CONDITION_DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Opens a sled database, retrying while a previous incarnation's handles (held by tasks
/// that are still winding down, or by sled's flush thread) keep its lock.
pub(crate) async fn open_db(path: &Path) -> sled::Db {
    let deadline = Instant::now() + CONDITION_DEADLINE;
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(e) => assert!(
                Instant::now() < deadline,
                "could not reopen sled at {path:?}: {e}"
            ),
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

struct Member {
    raft: MetadataRaft,
    dir: TempDir,
}

/// A group of members sharing one in-memory transport.
struct Group {
    transport: InMemoryTransport,
    members: BTreeMap<NodeId, Member>,
    config: RaftConfig,
}

impl Group {
    fn new(config: RaftConfig) -> Self {
        Self {
            transport: InMemoryTransport::new(),
            members: BTreeMap::new(),
            config,
        }
    }

    async fn start(&mut self, id: NodeId) -> MetadataRaft {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path()).await;
        let raft = MetadataRaft::start(id, &db, self.transport.clone(), &self.config)
            .await
            .unwrap();
        self.transport.register(id, raft.rpc_handler());
        self.members.insert(
            id,
            Member {
                raft: raft.clone(),
                dir,
            },
        );
        raft
    }

    fn raft(&self, id: NodeId) -> &MetadataRaft {
        &self.members[&id].raft
    }

    /// Starts members `ids`, initializes the first, and makes all of them voters.
    async fn start_voters(config: RaftConfig, ids: &[NodeId]) -> Self {
        let mut group = Self::new(config);
        for &id in ids {
            group.start(id).await;
        }
        let first = group.raft(ids[0]).clone();
        first.initialize(address(ids[0])).await.unwrap();
        assert_eq!(first.metrics().role, RaftRole::Leader);
        for &id in &ids[1..] {
            first.add_learner(id, address(id)).await.unwrap();
        }
        first
            .change_membership(ids.iter().copied().collect())
            .await
            .unwrap();
        let voters: BTreeSet<NodeId> = ids.iter().copied().collect();
        for &id in ids {
            let raft = group.raft(id).clone();
            eventually(&format!("node {id} to see voters {voters:?}"), || {
                let metrics = raft.metrics();
                (metrics.voters == voters && metrics.leader == Some(ids[0])).then_some(())
            })
            .await;
        }
        group
    }

    /// Kills member `id`: its Raft stops and the transport no longer reaches it. Returns its
    /// data directory, for a restart.
    async fn kill(&mut self, id: NodeId) -> TempDir {
        self.transport.disconnect(id);
        let member = self.members.remove(&id).unwrap();
        member.raft.shutdown().await.unwrap();
        member.dir
    }

    /// Waits until the running members agree on one leader, and returns it.
    async fn agreed_leader(&self) -> NodeId {
        eventually("the running members to agree on a leader", || {
            let leaders: BTreeSet<Option<NodeId>> = self
                .members
                .values()
                .map(|m| m.raft.metrics().leader)
                .collect();
            match leaders.into_iter().collect::<Vec<_>>()[..] {
                [Some(leader)] => self
                    .members
                    .get(&leader)
                    .filter(|m| m.raft.metrics().role == RaftRole::Leader)
                    .map(|_| leader),
                _ => None,
            }
        })
        .await
    }

    /// Waits until every running member has applied the same metadata as `reference`.
    async fn wait_converged(&self, reference: &ClusterMetadata) {
        for (id, member) in &self.members {
            eventually(
                &format!("node {id} to apply the reference metadata"),
                || (*member.raft.metadata() == *reference).then_some(()),
            )
            .await;
        }
    }
}

/// A command adding a member named `name` (addresses derived from the name).
pub(crate) fn add_node(name: &str) -> MetadataCommand {
    MetadataCommand::AddNode {
        name: name.into(),
        cluster_addr: format!("{name}:7072"),
        http_addr: format!("{name}:7070"),
        quic_addr: format!("{name}:7071"),
        join_token: 0,
    }
}

async fn add_and_bring_up(raft: &MetadataRaft, name: &str) -> NodeId {
    let id = match raft.write(add_node(name)).await.unwrap() {
        MetadataResponse::NodeAdded(id) => id,
        other => panic!("AddNode answered {other:?}"),
    };
    let up = MetadataCommand::SetNodeState {
        node: id,
        state: NodeState::Up,
    };
    assert_eq!(raft.write(up).await.unwrap(), MetadataResponse::Ok);
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_elect_a_leader_and_apply_the_same_metadata() {
    let group = Group::start_voters(test_config(), &[1, 2, 3]).await;
    let leader = group.raft(1);

    let a = add_and_bring_up(leader, "a").await;
    let b = add_and_bring_up(leader, "b").await;
    let c = add_and_bring_up(leader, "c").await;

    let read = leader.linearizable_read().await.unwrap();
    assert_eq!(read.up_nodes(), vec![a, b, c]);
    assert_eq!(read.ring_epoch, 3);
    group.wait_converged(&read).await;
    for id in [1, 2, 3] {
        let raft = group.raft(id);
        assert_eq!(raft.metrics().leader, Some(1), "node {id}");
        // Metrics follow the published metadata by a moment, on the leader too.
        eventually(
            &format!("node {id} to report the leader's applied index"),
            || {
                let applied = raft.metrics().applied_index;
                (applied.is_some() && applied == leader.metrics().applied_index).then_some(())
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_refuses_writes_and_reads_and_names_the_leader() {
    let group = Group::start_voters(test_config(), &[1, 2, 3]).await;
    let follower = group.raft(2);

    match follower.write(add_node("a")).await {
        Err(RaftError::ForwardToLeader {
            leader_id,
            leader_addr,
        }) => {
            assert_eq!(leader_id, Some(1));
            assert_eq!(leader_addr, Some(address(1).cluster_addr));
        }
        other => panic!("a follower's write answered {other:?}"),
    }
    assert!(matches!(
        follower.linearizable_read().await,
        Err(RaftError::ForwardToLeader {
            leader_id: Some(1),
            ..
        })
    ));
    assert!(
        follower.metadata().nodes.is_empty(),
        "the refused write was not applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leader_dies_another_is_elected_and_writes_continue() {
    let mut group = Group::start_voters(test_config(), &[1, 2, 3]).await;
    add_and_bring_up(group.raft(1), "a").await;
    let term_before = group.raft(1).metrics().term;

    group.kill(1).await;
    let new_leader = group.agreed_leader().await;
    assert_ne!(new_leader, 1);
    assert!(group.raft(new_leader).metrics().term > term_before);

    // Leadership may move again on a loaded machine: retry on the current leader (AddNode
    // and SetNodeState are idempotent, so a retried write is safe).
    let mut attempts = 0;
    let (b, new_leader) = loop {
        let leader = group.agreed_leader().await;
        let attempt = async {
            let raft = group.raft(leader);
            let id = match raft.write(add_node("b")).await? {
                MetadataResponse::NodeAdded(id) => id,
                other => panic!("AddNode answered {other:?}"),
            };
            raft.write(MetadataCommand::SetNodeState {
                node: id,
                state: NodeState::Up,
            })
            .await?;
            Ok::<_, RaftError>(id)
        };
        match attempt.await {
            Ok(id) => break (id, leader),
            Err(error) if attempts < 10 => {
                attempts += 1;
                eprintln!("write on node {leader} failed ({error}); retrying");
            }
            Err(error) => panic!("writes did not continue after the failover: {error}"),
        }
    };
    let read = group.raft(new_leader).linearizable_read().await.unwrap();
    assert_eq!(
        read.nodes.len(),
        2,
        "the write before the failover survived"
    );
    assert_eq!(read.up_nodes().last(), Some(&b));
    group.wait_converged(&read).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_catches_up_and_is_promoted_to_voter() {
    let mut group = Group::start_voters(test_config(), &[1, 2, 3]).await;
    let leader = group.raft(1).clone();
    add_and_bring_up(&leader, "a").await;
    add_and_bring_up(&leader, "b").await;

    let learner = group.start(4).await;
    leader.add_learner(4, address(4)).await.unwrap();
    let reference = leader.linearizable_read().await.unwrap();
    eventually("the learner to catch up", || {
        (*learner.metadata() == *reference).then_some(())
    })
    .await;
    let metrics = learner.metrics();
    assert_eq!(metrics.role, RaftRole::Learner);
    assert!(metrics.learners.contains(&4));
    assert_eq!(
        metrics.nodes.get(&4).map(|n| n.cluster_addr.as_str()),
        Some("node-4:7072")
    );

    leader
        .change_membership(BTreeSet::from([1, 2, 3, 4]))
        .await
        .unwrap();
    eventually("node 4 to become a follower", || {
        let metrics = learner.metrics();
        (metrics.role == RaftRole::Follower && metrics.voters.contains(&4)).then_some(())
    })
    .await;
    assert!(leader.metrics().learners.is_empty());

    // The promoted voter counts towards quorums: with voter 3 gone, a write commits only
    // with node 4's acknowledgement (three of four).
    group.kill(3).await;
    add_and_bring_up(&leader, "c").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_far_behind_catches_up_from_a_snapshot() {
    // Snapshot every few entries and keep no log behind it, so a late learner cannot be
    // sent the log and must install a snapshot through the transport.
    let config = RaftConfig {
        snapshot_interval_entries: 4,
        entries_kept_after_snapshot_max: 0,
        ..test_config()
    };
    let mut group = Group::start_voters(config, &[1]).await;
    let leader = group.raft(1).clone();
    for name in ["a", "b", "c", "d", "e", "f"] {
        add_and_bring_up(&leader, name).await;
    }
    let purged = eventually("the leader to purge its log behind a snapshot", || {
        leader.metrics().purged_index.filter(|&index| index > 1)
    })
    .await;

    let learner = group.start(2).await;
    leader.add_learner(2, address(2)).await.unwrap();
    let reference = leader.linearizable_read().await.unwrap();
    eventually("the learner to install the snapshot", || {
        (*learner.metadata() == *reference).then_some(())
    })
    .await;
    assert_eq!(learner.metadata().up_nodes().len(), 6);
    eventually(
        "the learner to report a snapshot covering the purged log",
        || (learner.metrics().snapshot_index >= Some(purged)).then_some(()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_member_recovers_its_vote_log_and_metadata_from_sled() {
    let mut group = Group::start_voters(test_config(), &[1]).await;
    let raft = group.raft(1).clone();
    add_and_bring_up(&raft, "a").await;
    add_and_bring_up(&raft, "b").await;
    let before = raft.metrics();
    let metadata_before = raft.linearizable_read().await.unwrap();

    let dir = group.kill(1).await;
    drop(raft);
    let db = open_db(dir.path()).await;
    let restarted = MetadataRaft::start(1, &db, group.transport.clone(), &test_config())
        .await
        .unwrap();
    assert!(restarted.is_initialized().await.unwrap());
    eventually("the restarted member to lead again", || {
        (restarted.metrics().role == RaftRole::Leader).then_some(())
    })
    .await;

    let after = restarted.metrics();
    assert!(after.term > before.term, "it voted in a later term");
    assert!(after.last_log_index >= before.last_log_index);
    assert_eq!(after.voters, BTreeSet::from([1]));
    assert_eq!(
        *restarted.linearizable_read().await.unwrap(),
        *metadata_before
    );
    add_and_bring_up(&restarted, "c").await;
    assert_eq!(restarted.metadata().nodes.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initializing_an_initialized_member_is_refused() {
    let group = Group::start_voters(test_config(), &[1]).await;
    assert!(matches!(
        group.raft(1).initialize(address(1)).await,
        Err(RaftError::AlreadyInitialized)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_rpc_bytes_are_refused_not_panicked_on() {
    let group = Group::start_voters(test_config(), &[1]).await;
    let handler = group.raft(1).rpc_handler();
    let reply = handler.handle_bytes(&[0xc1, 0x00, 0xff]).await.unwrap();
    assert!(matches!(
        RaftRpcReply::decode(&reply).unwrap(),
        RaftRpcReply::Refused(_)
    ));
    let oversized = vec![0u8; RAFT_RPC_BYTES_MAX + 1];
    assert!(matches!(
        RaftRpc::decode(&oversized),
        Err(TransportError::Codec(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_member_reports_stopped() {
    let mut group = Group::start_voters(test_config(), &[1]).await;
    let raft = group.raft(1).clone();
    group.kill(1).await;
    assert!(matches!(
        raft.write(add_node("a")).await,
        Err(RaftError::Stopped)
    ));
}

#[test]
fn an_inconsistent_config_is_refused() {
    let config = RaftConfig {
        heartbeat_interval_ms: 2000,
        ..RaftConfig::default()
    };
    assert!(matches!(config.to_openraft(), Err(RaftError::Config(_))));
    assert!(RaftConfig::default().to_openraft().is_ok());
}
