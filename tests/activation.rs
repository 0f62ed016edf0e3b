//! A room whose activation is stuck waiting on an unreachable peer holds up that room
//! only: requests and voice frames for the other rooms of the node go on (issue 15).

mod common;

use std::time::Duration;

use chorus_protocol::audio::AudioHeader;
use chorus_protocol::RoomRef;
use common::{create_room, eventually, join, say, three_node_cluster_with, TestNode, DEADLINE};

/// The node ids of `node` and where `room` lives: (owner, first replica).
async fn placement(node: &TestNode, room: &str) -> (u64, Option<u64>) {
    let place = node.admin(&format!("/admin/where?key={room}")).await;
    (
        place["owner"].as_u64().expect("owner"),
        place["replicas"][0].as_u64(),
    )
}

async fn node_id(node: &TestNode) -> u64 {
    node.admin("/admin/status").await["self"]
        .as_u64()
        .expect("self")
}

fn signal(node: &TestNode, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &node.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {signal}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_activation_stuck_on_an_unreachable_peer_does_not_hold_up_other_rooms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("chorus.toml");
    // Empty rooms are let go quickly, so the test can make one activate again.
    std::fs::write(&config, "[limits]\nroom_idle_release_ms = 300\n").expect("config");
    let nodes =
        three_node_cluster_with(dir.path(), &["--config", config.to_str().expect("utf-8")]).await;
    let [a, b, c] = &nodes;
    let (a_id, b_id, c_id) = (node_id(a).await, node_id(b).await, node_id(c).await);

    // Two rooms owned by a: `stuck` replicates to c (which will not answer), `busy`
    // to b.
    let host = a.client(&a.ws_url(), "host").await;
    let (mut stuck, mut busy) = (None, None);
    for i in 0..200 {
        let room = create_room(&host, &format!("room {i}")).await;
        match placement(a, &room).await {
            (owner, Some(replica)) if owner == a_id && replica == c_id && stuck.is_none() => {
                stuck = Some(room)
            }
            (owner, Some(replica)) if owner == a_id && replica == b_id && busy.is_none() => {
                busy = Some(room)
            }
            _ => {}
        }
        if stuck.is_some() && busy.is_some() {
            break;
        }
    }
    let (stuck, busy) = (
        stuck.expect("a room owned by a with c as replica"),
        busy.expect("a room owned by a with b as replica"),
    );
    // `busy` is in use: the host speaks in it, a listener on a hears it.
    join(&host, &busy).await;
    let mut listener = a.client(&a.ws_url(), "listener").await;
    join(&listener, &busy).await;
    let mut audio = listener.take_audio().expect("audio stream");
    // `stuck` is empty: its actor is let go.
    eventually(
        "a to let the empty room go and keep the busy one",
        || async {
            let running = |room: String| async move {
                a.admin(&format!("/admin/where?key={room}")).await["running_here"] == true
            };
            !running(stuck.clone()).await && running(busy.clone()).await
        },
    )
    .await;

    // c stops answering (paused, not gone: nobody marks it down for a while).
    signal(c, "-STOP");
    let joiner = a.client(&a.ws_url(), "joiner").await;
    let stuck_join = {
        let room = stuck.clone();
        tokio::spawn(async move {
            let joined = joiner.request(RoomRef { room_id: room }).await;
            (joiner, joined)
        })
    };
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let under_way = a
            .metric("chorus_room_activations_in_progress")
            .await
            .unwrap_or(0.0);
        if under_way >= 1.0 {
            break;
        }
        if stuck_join.is_finished() {
            let (_, joined) = stuck_join.await.expect("join task");
            panic!("the join ended before its activation was seen: {joined:?}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stuck room's activation never started; /metrics: {:?}",
            a.http_get("/metrics")
                .await
                .lines()
                .filter(|l| l.contains("activation") || l.contains("rooms_"))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Meanwhile the busy room answers and carries voice.
    say(&host, &busy, "while another room activates").await;
    let mut seq = 0;
    let heard = tokio::time::timeout(DEADLINE, async {
        loop {
            seq += 1;
            let header = AudioHeader {
                seq,
                timestamp_ms: seq * 20,
                level: 20,
            };
            assert!(host
                .send_audio(&busy, header, &[0xf8, 1, 2, 3])
                .expect("encode"));
            tokio::select! {
                frame = audio.recv() => {
                    let frame = frame.expect("audio stream open");
                    if frame.room_id == busy {
                        return frame.header.seq;
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    })
    .await
    .expect("voice in the busy room while the other activates");
    assert!(
        !stuck_join.is_finished(),
        "the stuck room's activation was still waiting on c when the busy room answered"
    );
    eprintln!(
        "busy room: comment answered and voice frame {heard} heard while the other room activated"
    );
    let _ = common::expect_event(&mut listener, "the comment", |event| match event {
        chorus_protocol::Event::Comment(c) if c.text == "while another room activates" => Some(()),
        _ => None,
    })
    .await;

    // c comes back; the stuck room activates and the join is answered.
    signal(c, "-CONT");
    let (_joiner, joined) = tokio::time::timeout(DEADLINE * 2, stuck_join)
        .await
        .expect("the stuck join ends")
        .expect("join task");
    joined.expect("the room activates once c answers");
}
