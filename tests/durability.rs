//! System test of a single node's durability (issue 11): a node with no other member
//! acknowledges a comment only once it is on its own disk, so SIGKILL and a restart on the
//! same data dir lose no acknowledged comment and never give a comment id twice.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chorus_node::client::Client;
use chorus_protocol::{RoomCommentRequest, RoomJoinResponse, RoomRef};
use common::{create_room, TestNode, DEADLINE};

const WRITERS: usize = 5;
const ROOMS: usize = 6;
const CYCLES: usize = 10;
/// Comments acknowledged per room and cycle at most: with the few in flight at the kill
/// they stay within the join response's recent comments (50), so all are read back.
const ROOM_CYCLE_ACKS_MAX: usize = 40;
/// Acknowledged comments per cycle after which the node is killed: drawn from this range.
const KILL_AFTER_ACKS: std::ops::Range<u64> = 10..200;
/// Pause before a writer tries again after a refusal (a room activating after a restart).
const RETRY_PAUSE_MS: u64 = 20;

/// No rate limit gets in the way of the writers.
const NODE_FLAGS: &[&str] = &[
    "--requests-per-sec",
    "100000",
    "--requests-burst",
    "100000",
    "--comment-rate-per-sec",
    "100000",
    "--comment-burst",
    "100000",
];

/// A small seeded generator (xorshift64*), so a failing run can be told apart by its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, range: std::ops::Range<u64>) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        range.start + self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % (range.end - range.start)
    }
}

/// What one cycle's writers had acknowledged: (room, comment id, text).
type Acks = Arc<Mutex<Vec<(String, u64, String)>>>;

/// Joins `room_id`, trying again while the room is not yet available (a restart).
async fn join_until_ok(client: &Client, room_id: &str) -> RoomJoinResponse {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match client
            .request(RoomRef {
                room_id: room_id.into(),
            })
            .await
        {
            Ok(response) => return response,
            Err(error) if tokio::time::Instant::now() < deadline => {
                verbose(&format!("join {room_id}: {error}; trying again"));
                tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await;
            }
            Err(error) => panic!("cannot join {room_id} after a restart: {error}"),
        }
    }
}

fn verbose(line: &str) {
    if std::env::var_os("CHORUS_TEST_VERBOSE").is_some() {
        eprintln!("{line}");
    }
}

/// One writer: joins every room, then comments in them in turn, as fast as it is
/// answered, until the node is killed. Every acknowledged comment goes to `acks`.
async fn write_until_killed(
    client: Client,
    writer: usize,
    cycle: usize,
    rooms: Arc<Vec<String>>,
    acks: Acks,
    per_room: Arc<Vec<AtomicUsize>>,
    killed: Arc<AtomicBool>,
) {
    for room_id in rooms.iter() {
        if killed.load(Ordering::SeqCst) {
            return;
        }
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while let Err(error) = client
            .request(RoomRef {
                room_id: room_id.clone(),
            })
            .await
        {
            if killed.load(Ordering::SeqCst) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "writer {writer} cannot join {room_id}: {error}"
            );
            tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await;
        }
    }
    let mut attempt = 0u64;
    let mut idle_rounds = 0u32;
    loop {
        let mut wrote = false;
        for (index, room_id) in rooms.iter().enumerate() {
            if killed.load(Ordering::SeqCst) {
                return;
            }
            if per_room[index].load(Ordering::SeqCst) >= ROOM_CYCLE_ACKS_MAX {
                continue;
            }
            attempt += 1;
            let text = format!("cycle {cycle} writer {writer} comment {attempt}");
            let answer = client
                .request(RoomCommentRequest {
                    room_id: room_id.clone(),
                    text: text.clone(),
                    request_id: None,
                })
                .await;
            match answer {
                Ok(response) => {
                    wrote = true;
                    per_room[index].fetch_add(1, Ordering::SeqCst);
                    acks.lock()
                        .expect("acks")
                        .push((room_id.clone(), response.comment_id, text));
                }
                Err(_) if killed.load(Ordering::SeqCst) => return,
                Err(error) => {
                    verbose(&format!("writer {writer}: {error}; trying again"));
                    tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await;
                }
            }
        }
        if !wrote {
            // Every room is at its cap for this cycle: wait for the kill.
            idle_rounds += 1;
            assert!(
                u64::from(idle_rounds) * RETRY_PAUSE_MS < DEADLINE.as_millis() as u64,
                "writer {writer} waited too long for the kill"
            );
            tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await;
        }
    }
}

/// Everything known about the comments of every room, across cycles.
#[derive(Default)]
struct Ledger {
    /// Room → comment id → text, as acknowledged to a writer.
    acknowledged: BTreeMap<String, BTreeMap<u64, String>>,
    /// Room → comment id → text, as read back after a restart.
    read_back: BTreeMap<String, BTreeMap<u64, String>>,
    /// Acknowledged comments missing after a restart: (room, id, text).
    lost: BTreeSet<(String, u64, String)>,
    /// What was found about each lost comment, when it was first missed.
    lost_reports: Vec<String>,
    /// Comment ids that named two different texts.
    reused: Vec<String>,
    total_acknowledged: usize,
}

impl Ledger {
    /// Records an acknowledgement; an id already known with another text is a reuse.
    fn acknowledge(&mut self, cycle: usize, room_id: &str, id: u64, text: &str) {
        self.total_acknowledged += 1;
        for (what, known) in [
            ("acknowledged", &self.acknowledged),
            ("read back", &self.read_back),
        ] {
            if let Some(other) = known.get(room_id).and_then(|room| room.get(&id)) {
                if other != text {
                    self.reused.push(format!(
                        "cycle {cycle}: room {room_id} id {id} acknowledged for {text:?}, {what} earlier as {other:?}"
                    ));
                }
            }
        }
        self.acknowledged
            .entry(room_id.to_string())
            .or_default()
            .insert(id, text.to_string());
    }

    /// Checks one room's join response after a restart against what was acknowledged.
    fn check_room(&mut self, cycle: usize, room_id: &str, joined: &RoomJoinResponse) {
        let recent: BTreeMap<u64, &str> = joined
            .recent_comments
            .iter()
            .map(|c| (c.comment_id, c.text.as_str()))
            .collect();
        let count = joined.room.comment_count;
        let oldest_shown = recent.keys().next().copied().unwrap_or(count + 1);
        for (&id, text) in self.acknowledged.get(room_id).into_iter().flatten() {
            if id > count {
                if self.lost.insert((room_id.to_string(), id, text.clone())) {
                    self.lost_reports.push(format!(
                        "cycle {cycle}: room {room_id} id {id} ({text:?}) acknowledged, but the room counts {count} comments"
                    ));
                }
            } else if id >= oldest_shown {
                match recent.get(&id) {
                    Some(shown) if shown == text => {}
                    Some(shown) => self.reused.push(format!(
                        "cycle {cycle}: room {room_id} id {id} acknowledged for {text:?}, read back as {shown:?}"
                    )),
                    None => {
                        if self.lost.insert((room_id.to_string(), id, text.clone())) {
                            self.lost_reports.push(format!(
                                "cycle {cycle}: room {room_id} id {id} ({text:?}) missing from the recent comments"
                            ));
                        }
                    }
                }
            }
        }
        let read_back = self.read_back.entry(room_id.to_string()).or_default();
        for (&id, &text) in &recent {
            match read_back.get(&id) {
                Some(earlier) if earlier != text => self.reused.push(format!(
                    "cycle {cycle}: room {room_id} id {id} read back as {text:?}, earlier as {earlier:?}"
                )),
                _ => {
                    read_back.insert(id, text.to_string());
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_single_node_keeps_every_acknowledged_comment_across_kills_and_never_reuses_an_id() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    eprintln!("durability seed {seed}");
    let mut rng = Rng(seed);
    let temp = tempfile::tempdir().expect("tempdir");
    let data_dir = temp.path().join("data");

    let mut node = TestNode::start_in(&data_dir, NODE_FLAGS).await;
    let rooms = {
        let host = node.client(&node.ws_url(), "host").await;
        let mut rooms = Vec::with_capacity(ROOMS);
        for index in 0..ROOMS {
            rooms.push(create_room(&host, &format!("durable {index}")).await);
        }
        Arc::new(rooms)
    };

    let mut ledger = Ledger::default();
    for cycle in 0..CYCLES {
        let acks: Acks = Arc::default();
        let per_room: Arc<Vec<AtomicUsize>> =
            Arc::new((0..ROOMS).map(|_| AtomicUsize::new(0)).collect());
        let killed = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::with_capacity(WRITERS);
        for writer in 0..WRITERS {
            let client = node
                .client(&node.ws_url(), &format!("writer-{writer}"))
                .await;
            writers.push(tokio::spawn(write_until_killed(
                client,
                writer,
                cycle,
                rooms.clone(),
                acks.clone(),
                per_room.clone(),
                killed.clone(),
            )));
        }

        // Kill at a random point while the writers are busy.
        let kill_after = rng.below(KILL_AFTER_ACKS) as usize;
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while acks.lock().expect("acks").len() < kill_after {
            assert!(
                tokio::time::Instant::now() < deadline,
                "cycle {cycle}: only {} of {kill_after} comments acknowledged in time",
                acks.lock().expect("acks").len()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        killed.store(true, Ordering::SeqCst);
        node.kill().await;
        for writer in writers {
            tokio::time::timeout(DEADLINE, writer)
                .await
                .expect("a writer did not stop after the kill")
                .expect("writer");
        }
        let acks = std::mem::take(&mut *acks.lock().expect("acks"));
        for (room_id, id, text) in &acks {
            ledger.acknowledge(cycle, room_id, *id, text);
        }

        node = TestNode::start_in(&data_dir, NODE_FLAGS).await;
        let reader = node.client(&node.ws_url(), "reader").await;
        for room_id in rooms.iter() {
            let joined = join_until_ok(&reader, room_id).await;
            ledger.check_room(cycle, room_id, &joined);
        }
        eprintln!(
            "cycle {cycle}: {} acknowledged (killed after {kill_after}); so far {} lost, {} ids reused",
            acks.len(),
            ledger.lost.len(),
            ledger.reused.len()
        );
    }

    let per_room: HashMap<&String, usize> = ledger
        .acknowledged
        .iter()
        .map(|(room, ids)| (room, ids.len()))
        .collect();
    eprintln!("acknowledged per room: {per_room:?}");
    assert!(
        ledger.lost.is_empty() && ledger.reused.is_empty(),
        "of {} acknowledged comments, {} were lost and {} ids were given twice (seed {seed}):\n{}\n{}",
        ledger.total_acknowledged,
        ledger.lost.len(),
        ledger.reused.len(),
        ledger.lost_reports.join("\n"),
        ledger.reused.join("\n"),
    );
}
