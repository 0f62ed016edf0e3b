use std::io;

use futures_util::stream;
use openraft::entry::RaftEntry;
use openraft::storage::{
    IOFlushed, RaftLogReader, RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine,
};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::testing::log_id;
use openraft::type_config::TypeConfigExt;
use openraft::{EntryPayload, Membership, StorageError};
use tempfile::TempDir;

use super::*;
use crate::metadata::{MetadataCommand, NodeId, NodeState};
use crate::raft::tests::{add_node, open_db};
use crate::raft::types::RaftNode;

/// Each store of the suite gets its own sled database in its own temporary directory (the
/// guard removes it when the test is done).
struct SledStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for SledStoreBuilder {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let db = sled::open(dir.path()).expect("open sled");
        let log = LogStore::open(&db).expect("open log store");
        let state_machine = StateMachineStore::open(&db).expect("open state machine");
        Ok((dir, log, state_machine))
    }
}

#[tokio::test]
async fn sled_store_passes_the_openraft_storage_suite() {
    Suite::test_all(SledStoreBuilder)
        .await
        .expect("openraft storage suite");
}

fn entry(index: u64, payload: EntryPayload<MetadataCommand, NodeId, RaftNode>) -> Entry {
    Entry {
        log_id: log_id::<TypeConfig>(1, 1, index),
        payload,
    }
}

async fn append(log: &mut LogStore, entries: Vec<Entry>) -> io::Result<()> {
    let (tx, rx) = TypeConfig::oneshot();
    log.append(entries, IOFlushed::signal(tx)).await?;
    rx.await.expect("flush callback fired")
}

async fn apply(state_machine: &mut StateMachineStore, entries: Vec<Entry>) -> io::Result<()> {
    let items = entries.into_iter().map(|entry| Ok((entry, None)));
    state_machine.apply(stream::iter(items)).await
}

#[tokio::test]
async fn reopening_the_database_restores_vote_log_and_the_snapshot_state() {
    let dir = tempfile::tempdir().unwrap();
    let membership = Membership::new_with_defaults(vec![[1u64].into()], []);
    let entries = vec![
        entry(1, EntryPayload::Membership(membership.clone())),
        entry(2, EntryPayload::Normal(add_node("a"))),
        entry(3, EntryPayload::Normal(add_node("b"))),
        entry(
            4,
            EntryPayload::Normal(MetadataCommand::SetNodeState {
                node: 1,
                state: NodeState::Up,
            }),
        ),
    ];
    let vote = Vote::new_committed(1, 1);
    let expected_metadata;
    {
        let db = open_db(dir.path()).await;
        let mut log = LogStore::open(&db).unwrap();
        let mut state_machine = StateMachineStore::open(&db).unwrap();
        log.save_vote(&vote).await.unwrap();
        append(&mut log, entries.clone()).await.unwrap();
        log.save_committed(Some(log_id::<TypeConfig>(1, 1, 3)))
            .await
            .unwrap();
        apply(&mut state_machine, entries[..2].to_vec())
            .await
            .unwrap();
        // The state machine is durable through snapshots and the log: one built here,
        // then an entry applied after it.
        state_machine
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        apply(&mut state_machine, entries[2..3].to_vec())
            .await
            .unwrap();
        expected_metadata = state_machine.subscribe().borrow().clone();
        assert_eq!(expected_metadata.nodes.len(), 2);
        db.flush().unwrap();
    }

    let db = open_db(dir.path()).await;
    let mut log = LogStore::open(&db).unwrap();
    let mut state_machine = StateMachineStore::open(&db).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    assert_eq!(
        log.read_committed().await.unwrap(),
        Some(log_id::<TypeConfig>(1, 1, 3))
    );
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, None);
    assert_eq!(state.last_log_id, Some(log_id::<TypeConfig>(1, 1, 4)));
    let stored = log.try_get_log_entries(..).await.unwrap();
    assert_eq!(
        stored.iter().map(|e| e.log_id()).collect::<Vec<_>>(),
        entries.iter().map(|e| e.log_id()).collect::<Vec<_>>()
    );
    // The snapshot's state comes back; openraft re-applies the committed entries after it.
    let (last_applied, last_membership) = state_machine.applied_state().await.unwrap();
    assert_eq!(last_applied, Some(log_id::<TypeConfig>(1, 1, 2)));
    assert_eq!(last_membership.membership(), &membership);
    assert_eq!(
        last_membership.log_id(),
        &Some(log_id::<TypeConfig>(1, 1, 1))
    );
    apply(&mut state_machine, stored[2..3].to_vec())
        .await
        .unwrap();
    assert_eq!(*state_machine.subscribe().borrow(), expected_metadata);
}

#[tokio::test]
async fn a_built_snapshot_survives_a_reopen_and_installs_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let entries = vec![
        entry(
            1,
            EntryPayload::Membership(Membership::new_with_defaults(vec![[1u64].into()], [])),
        ),
        entry(2, EntryPayload::Normal(add_node("a"))),
    ];
    let built = {
        let db = open_db(dir.path()).await;
        let mut state_machine = StateMachineStore::open(&db).unwrap();
        apply(&mut state_machine, entries).await.unwrap();
        let mut builder = state_machine.get_snapshot_builder().await;
        builder.build_snapshot().await.unwrap()
    };

    let db = open_db(dir.path()).await;
    let mut state_machine = StateMachineStore::open(&db).unwrap();
    let current = state_machine.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, built.meta);
    assert_eq!(current.snapshot, built.snapshot);

    let other_dir = tempfile::tempdir().unwrap();
    let other_db = open_db(other_dir.path()).await;
    let mut other = StateMachineStore::open(&other_db).unwrap();
    other
        .install_snapshot(&current.meta, current.snapshot.clone())
        .await
        .unwrap();
    assert_eq!(
        other.applied_state().await.unwrap().0,
        Some(log_id::<TypeConfig>(1, 1, 2))
    );
    assert_eq!(
        other.subscribe().borrow().nodes.len(),
        1,
        "the installed snapshot replaced the (empty) state"
    );
}

#[tokio::test]
async fn a_malformed_snapshot_is_refused_without_touching_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(dir.path()).await;
    let mut state_machine = StateMachineStore::open(&db).unwrap();
    let meta = SnapshotMeta {
        last_log_id: Some(log_id::<TypeConfig>(1, 1, 9)),
        last_membership: StoredMembership::default(),
    };
    let refused = state_machine
        .install_snapshot(&meta, vec![0xc1, 0xff, 0x00])
        .await;
    assert_eq!(refused.unwrap_err().kind(), io::ErrorKind::InvalidData);
    assert_eq!(state_machine.applied_state().await.unwrap().0, None);
    assert!(state_machine
        .get_current_snapshot()
        .await
        .unwrap()
        .is_none());
}
