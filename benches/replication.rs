//! The cost of replicating one comment, in a room with 10 open polls and 0 or 10,000
//! votes: everything the owner and its replica do for it, in one process, with real sled
//! trees (no network: the message's bytes go straight to the replica's handler).
//!
//! - `whole`: how every change was replicated before the change deltas: the owner copies
//!   its whole durable state (every vote), encodes it, the replica decodes it and saves
//!   it, the owner saves its own copy. It grows with the votes.
//! - `change`: a change that left the polls alone: the state without the polls against
//!   the replica's revision; both sides save it without the polls. It does not.
//!
//! Run: `cargo bench --bench replication`.

use chorus_actors::polls::{PollConfig, Polls};
use chorus_actors::room::{RoomConfig, RoomCore, RoomDefinition, RoomDurable};
use chorus_node::server::common::codec::{request, split_request, Domain};
use chorus_node::server::rooms::messages::RoomMessage;
use chorus_node::server::rooms::replica::DurableStates;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;

const POLLS: u64 = 10;

/// A room whose members are `users`, with [`POLLS`] open polls and `votes` votes.
fn room(votes: usize, users: u64) -> RoomCore<u64> {
    let mut config = RoomConfig::default();
    config.polls = PollConfig {
        open_polls_max: POLLS as usize,
        ..config.polls
    };
    let definition = RoomDefinition::new("r-1".into(), "bench", "host".into(), None, 0, &config)
        .expect("definition");
    let mut polls = Polls::default();
    let options = vec!["yes".to_string(), "no".to_string(), "maybe".to_string()];
    for _ in 0..POLLS {
        polls
            .create(&config.polls, 0, "host", "what now?", &options)
            .expect("poll");
    }
    for vote in 0..votes {
        let poll = (vote as u64 % POLLS) + 1;
        polls
            .vote(&format!("voter-{vote}"), poll, (vote % 3) as u32)
            .expect("vote");
    }
    let mut core = RoomCore::<u64>::new(definition, config);
    core.restore_durable(
        0,
        RoomDurable {
            revision: 1,
            polls,
            ..RoomDurable::default()
        },
    );
    for m in 0..users {
        core.handle_join(0, m, &format!("user-{m}")).expect("join");
    }
    core.drain_effects();
    core
}

fn replicate_comment(c: &mut Criterion) {
    let mut group = c.benchmark_group("replicate_one_comment");
    group.throughput(Throughput::Elements(1));
    for votes in [0usize, 10_000] {
        for kind in ["whole", "change"] {
            let dir = tempfile::tempdir().expect("dir");
            let owner_db = sled::Config::new()
                .path(dir.path().join("owner"))
                .open()
                .expect("db");
            let replica_db = sled::Config::new()
                .path(dir.path().join("replica"))
                .open()
                .expect("db");
            let owner = DurableStates::open(&owner_db).expect("owner");
            let replica = DurableStates::open(&replica_db).expect("replica");
            let users = 1_000u64;
            let mut core = room(votes, users);
            let epoch = 1;
            owner.keep("r-1", epoch, core.durable()).expect("owner");
            replica.keep("r-1", epoch, core.durable()).expect("replica");
            let mut now_ms = 1_000u64;
            let mut author = 0u64;
            group.bench_function(format!("{kind}_{votes}_votes"), |b| {
                b.iter(|| {
                    author = (author + 1) % users;
                    now_ms += 1;
                    let base = core.revision();
                    core.handle_comment(now_ms, &author, "hello everyone")
                        .expect("comment");
                    core.drain_effects();
                    // Owner: the message.
                    let message = if kind == "whole" {
                        RoomMessage::Replicate {
                            room_id: "r-1".into(),
                            epoch,
                            durable: core.durable(),
                        }
                    } else {
                        RoomMessage::ReplicateChange {
                            room_id: "r-1".into(),
                            epoch,
                            base_revision: base,
                            durable: core.durable_without_polls(),
                        }
                    };
                    let bytes = request(Domain::Rooms, &message);
                    // Replica: decode and keep.
                    let (_, body) = split_request(&bytes).expect("tagged");
                    let received: RoomMessage = rmp_serde::from_slice(&body).expect("decode");
                    match received {
                        RoomMessage::Replicate {
                            room_id,
                            epoch,
                            durable,
                        } => replica.keep(&room_id, epoch, durable).expect("kept"),
                        RoomMessage::ReplicateChange {
                            room_id,
                            epoch,
                            base_revision,
                            durable,
                        } => replica
                            .apply_change(&room_id, epoch, base_revision, durable)
                            .expect("in step"),
                        _ => unreachable!(),
                    }
                    // Owner: its own copy.
                    match message {
                        RoomMessage::Replicate { durable, .. } => {
                            owner.keep("r-1", epoch, durable).expect("kept")
                        }
                        RoomMessage::ReplicateChange {
                            base_revision,
                            durable,
                            ..
                        } => owner
                            .apply_change("r-1", epoch, base_revision, durable)
                            .expect("in step"),
                        _ => unreachable!(),
                    }
                    black_box(bytes.len())
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, replicate_comment);
criterion_main!(benches);
