//! Voice relay (SPEC R11) over real node processes: speakers' frames cross nodes as QUIC
//! datagrams, listeners receive them over QUIC datagrams and binary WebSocket messages.

mod common;

use std::collections::VecDeque;
use std::time::Duration;

use chorus_node::client::ogg_opus::OpusFile;
use chorus_node::client::{AudioFrame, AudioHeader, Client};
use chorus_protocol::{Event, RoomMuteRequest};
use common::{create_room, eventually, join, three_node_cluster, TestNode, DEADLINE};
use tokio::sync::mpsc;

/// Frame spacing of a 20 ms Opus stream.
const FRAME_MS: u64 = 20;

fn packet(seq: u32) -> Vec<u8> {
    // A plausible Opus packet: TOC byte for 20 ms CELT mono, then bytes naming the seq.
    let mut packet = vec![0xf8];
    packet.extend_from_slice(&seq.to_be_bytes());
    packet
}

fn header(seq: u32, level: u8) -> AudioHeader {
    AudioHeader {
        seq,
        timestamp_ms: seq.wrapping_mul(FRAME_MS as u32),
        level,
    }
}

/// Sends frames `seqs` from `speaker` at the real-time pace.
async fn speak(speaker: &Client, room: &str, seqs: std::ops::Range<u32>) {
    let mut tick = tokio::time::interval(Duration::from_millis(FRAME_MS));
    for seq in seqs {
        tick.tick().await;
        assert!(speaker
            .send_audio(room, header(seq, 20), &packet(seq))
            .expect("encode"));
    }
}

/// Receives frames until one with `seq` from `speaker` arrives; returns all of them.
async fn receive_until(
    audio: &mut mpsc::Receiver<AudioFrame>,
    speaker: &str,
    seq: u32,
) -> Vec<AudioFrame> {
    let mut frames = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while let Some(frame) = audio.recv().await {
            let last = frame.speaker == speaker && frame.header.seq == seq;
            frames.push(frame);
            if last {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no frame {seq} from {speaker} in time; got {}",
            frames.len()
        )
    });
    frames
}

/// Sums a counter over the nodes.
async fn total(nodes: &[TestNode], metric: &str) -> f64 {
    let mut sum = 0.0;
    for node in nodes {
        sum += node.metric(metric).await.unwrap_or(0.0);
    }
    sum
}

#[tokio::test]
async fn a_speaker_is_heard_on_every_node_in_order_and_listeners_and_the_muted_are_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = three_node_cluster(dir.path()).await;
    let [a, b, c] = &nodes;
    let alice = a.client(&a.quic_url(), "alice").await;
    let room = create_room(&alice, "Voice across nodes").await;
    join(&alice, &room).await;
    // Listeners on the two other nodes: one on WebSocket, one on QUIC.
    let mut bob = b.client(&b.ws_url(), "bob").await;
    join(&bob, &room).await;
    let mut carol = c.client(&c.quic_url(), "carol").await;
    join(&carol, &room).await;
    let mut bob_audio = bob.take_audio().expect("audio stream");
    let mut carol_audio = carol.take_audio().expect("audio stream");

    // Warm up until both hear alice (the first frames may find an inter-node QUIC
    // connection still opening), then start counting.
    let mut seq = 0;
    eventually("both listeners to hear alice", || {
        seq += 1;
        let sent = alice.send_audio(&room, header(seq, 20), &packet(seq));
        let heard = !bob_audio.is_empty() && !carol_audio.is_empty();
        async move {
            sent.expect("encode");
            heard
        }
    })
    .await;
    let first = seq + 1_000;
    let last = first + 99;
    speak(&alice, &room, first..last + 1).await;
    for (name, audio) in [("bob", &mut bob_audio), ("carol", &mut carol_audio)] {
        let frames = receive_until(audio, "alice", last).await;
        let counted: Vec<u32> = frames
            .iter()
            .map(|f| f.header.seq)
            .filter(|s| *s >= first)
            .collect();
        let expected: Vec<u32> = (first..=last).collect();
        assert_eq!(counted, expected, "{name} heard every frame, in order");
        let frame = frames.last().expect("a frame");
        assert_eq!(frame.room_id, room);
        assert_eq!(&frame.payload[..], &packet(last)[..], "payload intact");
        assert_eq!(frame.header.level, 20);
    }

    // The active speaker is announced.
    common::expect_event(
        &mut bob,
        "room.speaking naming alice",
        |event| match event {
            Event::Speaking(s) if s.speakers.first().is_some_and(|s| s.user_id == "alice") => {
                Some(())
            }
            _ => None,
        },
    )
    .await;

    // bob is a listener: his frames are dropped by the room, not relayed.
    let before = total(
        &nodes,
        "chorus_audio_dropped_total{reason=\"not_on_stage\"}",
    )
    .await;
    for seq in 0..10 {
        bob.send_audio(&room, header(seq, 20), &packet(seq))
            .expect("encode");
    }
    eventually("the room to drop bob's frames", || async {
        total(
            &nodes,
            "chorus_audio_dropped_total{reason=\"not_on_stage\"}",
        )
        .await
            >= before + 10.0
    })
    .await;

    // alice mutes herself: her frames stop too.
    alice
        .request(RoomMuteRequest {
            room_id: room.clone(),
            user_id: None,
            muted: true,
        })
        .await
        .expect("mute");
    let before = total(&nodes, "chorus_audio_dropped_total{reason=\"muted\"}").await;
    speak(&alice, &room, last + 1..last + 11).await;
    eventually("the room to drop alice's muted frames", || async {
        total(&nodes, "chorus_audio_dropped_total{reason=\"muted\"}").await >= before + 10.0
    })
    .await;
    let mut leftover = VecDeque::new();
    while let Ok(frame) = carol_audio.try_recv() {
        leftover.push_back(frame);
    }
    assert!(
        leftover
            .iter()
            .all(|f| f.speaker == "alice" && f.header.seq <= last),
        "nothing relayed from a listener or a muted speaker: {leftover:?}"
    );
    // The muted speaker leaves the active list.
    common::expect_event(
        &mut carol,
        "room.speaking without alice",
        |event| match event {
            Event::Speaking(s) if s.speakers.is_empty() => Some(()),
            _ => None,
        },
    )
    .await;
}

/// Runs a tool that must be installed (`.ci/run` installs espeak-ng and opus-tools).
async fn tool(program: &str, args: &[&std::ffi::OsStr]) -> std::process::Output {
    let output = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {program} (install espeak-ng and opus-tools): {e}"));
    assert!(
        output.status.success(),
        "{program} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn chorus_client(node: &TestNode, url: &str, user: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_chorus"));
    command
        .args(["client", "--url", url, "--user", user, "--ca"])
        .arg(node.ca_path())
        .env("CHORUS_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    command
}

#[tokio::test]
async fn an_ogg_opus_file_spoken_on_one_node_is_recorded_packet_for_packet_on_two_others() {
    use std::ffi::OsStr;
    use tokio::io::AsyncBufReadExt;

    let dir = tempfile::tempdir().expect("tempdir");
    let wav = dir.path().join("speech.wav");
    let spoken = dir.path().join("speech.opus");
    tool(
        "espeak-ng",
        &[
            OsStr::new("-w"),
            wav.as_os_str(),
            OsStr::new("Welcome to the room. Every packet arrives in order."),
        ],
    )
    .await;
    tool(
        "opusenc",
        &[OsStr::new("--quiet"), wav.as_os_str(), spoken.as_os_str()],
    )
    .await;
    let sent = OpusFile::read(&spoken).expect("read the spoken file");
    assert!(sent.packets.len() > 50, "{} packets", sent.packets.len());

    let nodes = three_node_cluster(&dir.path().join("cluster")).await;
    let [a, b, c] = &nodes;
    let alice = a.client(&a.quic_url(), "alice").await;
    let room = create_room(&alice, "Spoken word").await;

    // Listeners on the other two nodes, one per transport, recording.
    let mut listeners = Vec::new();
    for (node, url, user) in [(b, b.ws_url(), "bob"), (c, c.quic_url(), "carol")] {
        let out = dir.path().join(format!("{user}.opus"));
        let mut child = chorus_client(node, &url, user)
            .args(["listen", &room, "--for", "60", "--record"])
            .arg(&out)
            .spawn()
            .expect("spawn listen");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        // The first line is the join response: the listener is in the room.
        let first = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .expect("listen joined in time")
            .expect("read")
            .expect("a line");
        assert!(first.contains("\"role\":\"listener\""), "{first}");
        listeners.push((child, lines, out));
    }

    let speak = chorus_client(a, &a.quic_url(), "alice")
        .args(["speak", &room])
        .arg(&spoken)
        .output();
    let speak = tokio::time::timeout(Duration::from_secs(120), speak)
        .await
        .expect("speak finished")
        .expect("run speak");
    let stdout = String::from_utf8_lossy(&speak.stdout);
    assert!(speak.status.success(), "speak failed: {stdout}");
    assert!(
        stdout.contains(&format!("\"sent\":{}", sent.packets.len())),
        "{stdout}"
    );

    // Ending the room ends the listeners.
    alice
        .request(chorus_protocol::RoomEndRequest {
            room_id: room.clone(),
        })
        .await
        .expect("end");
    for (mut child, mut lines, out) in listeners {
        let mut summary = String::new();
        tokio::time::timeout(DEADLINE, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("\"recorded\"") {
                    summary = line;
                }
            }
        })
        .await
        .expect("listener output ended");
        let status = tokio::time::timeout(DEADLINE, child.wait())
            .await
            .expect("listener exited")
            .expect("wait");
        assert!(status.success(), "listen failed; last summary {summary}");
        assert!(summary.contains("\"speaker\":\"alice\""), "{summary}");
        let recorded = OpusFile::read(&out).expect("read the recording");
        assert_eq!(recorded.packets.len(), sent.packets.len(), "{summary}");
        assert!(
            recorded.packets == sent.packets,
            "the recorded packets equal the sent ones, in order"
        );
        assert_eq!(recorded.channels, sent.channels);
        // An independent reader accepts the file.
        let info = tool("opusinfo", &[out.as_os_str()]).await;
        let report = String::from_utf8_lossy(&info.stdout);
        assert!(!report.to_lowercase().contains("warning"), "{report}");
    }
}
