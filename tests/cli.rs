//! `chorus client` alone is enough to use a room: two users on different transports, one
//! speaks, the other prints it as a JSON line.

mod common;

use std::process::Stdio;

use common::{TestNode, DEADLINE};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn client(node: &TestNode, url: &str, user: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_chorus"));
    command
        .args(["client", "--url", url, "--user", user, "--ca"])
        .arg(node.ca_path())
        .env("CHORUS_LOG", "warn")
        .kill_on_drop(true);
    command
}

#[tokio::test]
async fn two_cli_users_on_different_transports_talk_in_a_room() {
    let node = TestNode::start(&[]).await;
    let created = client(&node, &node.ws_url(), "alice")
        .args(["create-room", "CLI tour"])
        .output()
        .await
        .expect("run create-room");
    assert!(
        created.status.success(),
        "create-room failed: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    let line = String::from_utf8(created.stdout).expect("utf8");
    let created: serde_json::Value = serde_json::from_str(line.trim()).expect("one JSON line");
    let room_id = created["room_id"].as_str().expect("room_id").to_string();

    // bob listens over QUIC and prints events as JSON lines
    let mut bob = client(&node, &node.quic_url(), "bob")
        .args(["join", &room_id, "--for", "30"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn join");
    let mut lines = BufReader::new(bob.stdout.take().expect("stdout")).lines();
    // the first line is the join response
    let first = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("join response")
        .expect("read")
        .expect("line");
    let first: serde_json::Value = serde_json::from_str(&first).expect("JSON line");
    assert_eq!(
        first["room"]["room_id"],
        room_id.as_str(),
        "join response: {first}"
    );

    // alice speaks over WebSocket
    let said = client(&node, &node.ws_url(), "alice")
        .args(["say", &room_id, "hello from the CLI"])
        .output()
        .await
        .expect("run say");
    assert!(
        said.status.success(),
        "say failed: {}",
        String::from_utf8_lossy(&said.stderr)
    );

    let comment = tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            let event: serde_json::Value = serde_json::from_str(&line).expect("every line is JSON");
            if event["kind"] == "room.comment" {
                return event;
            }
        }
        panic!("bob's output ended without the comment");
    })
    .await
    .expect("bob did not print the comment");
    assert_eq!(comment["body"]["text"], "hello from the CLI");
    assert_eq!(comment["body"]["user_id"], "alice");
    let _ = bob.kill().await;

    // errors: non-zero exit with a message
    let missing = client(&node, &node.ws_url(), "alice")
        .args(["say", "r-does-not-exist", "hi"])
        .output()
        .await
        .expect("run say");
    assert!(!missing.status.success());
    assert!(!missing.stderr.is_empty(), "a clear message on stderr");
}
