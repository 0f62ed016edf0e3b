//! The errors a new user meets in the first hour say what went wrong and what to do
//! (issue 17): a data dir another node uses, a data dir that is a file, a port clash, a
//! token signed with another secret, a grab on a rain that does not exist, a client
//! command without credentials.

mod common;

use std::process::Output;

use common::{TestNode, DEADLINE};
use tokio::process::Command;

/// Runs `chorus ARGS` to completion (bounded); returns its output.
async fn chorus(args: &[&str]) -> Output {
    let run = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(args)
        .env("CHORUS_LOG", "warn")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(DEADLINE, run)
        .await
        .unwrap_or_else(|_| panic!("chorus {args:?} did not finish in time"))
        .expect("run chorus")
}

/// Runs `chorus serve` on `data_dir` with the cluster endpoint on `cluster_addr` (the
/// other listeners on free ports) until it exits; the tests here expect it to refuse.
async fn serve(data_dir: &str, cluster_addr: &str) -> Output {
    chorus(&[
        "serve",
        "--data-dir",
        data_dir,
        "--http-addr",
        "127.0.0.1:0",
        "--quic-addr",
        "127.0.0.1:0",
        "--cluster-addr",
        cluster_addr,
    ])
    .await
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn a_second_node_on_the_same_data_dir_is_told_another_node_uses_it() {
    let node = TestNode::start(&[]).await;
    let dir = node.data_dir().to_str().expect("utf-8").to_string();
    let output = serve(&dir, "127.0.0.1:0").await;
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(
        text.contains("another chorus node is using this data dir") && text.contains("--data-dir"),
        "{text}"
    );
    assert!(!text.contains("WouldBlock"), "no debug format: {text}");
}

#[tokio::test]
async fn a_data_dir_that_is_a_file_is_named_as_such() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("data");
    std::fs::write(&file, "not a directory").expect("file");
    let output = serve(file.to_str().expect("utf-8"), "127.0.0.1:0").await;
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(text.contains("is a file, not a directory"), "{text}");
}

#[tokio::test]
async fn a_port_clash_names_the_flag_and_the_cause() {
    let node = TestNode::start(&[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = node.cluster.to_string();
    let output = serve(dir.path().join("data").to_str().expect("utf-8"), &taken).await;
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(
        text.contains(&format!("cannot listen on {taken} (--cluster-addr)"))
            && text.contains("another process")
            && text.to_lowercase().contains("address"),
        "{text}"
    );
}

#[tokio::test]
async fn client_errors_say_what_to_do() {
    let node = TestNode::start(&[]).await;
    let url = node.ws_url();
    // No credentials.
    let output = chorus(&["client", "--url", &url, "info", "r-x"]).await;
    assert!(!output.status.success());
    assert!(stderr(&output).contains("--user"), "{}", stderr(&output));
    // A token minted with another secret.
    let output = chorus(&[
        "client",
        "--url",
        &url,
        "--user",
        "alice",
        "--secret",
        "a secret that is not the node's",
        "info",
        "r-x",
    ])
    .await;
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(
        text.contains("signed with another secret than this node's"),
        "{text}"
    );
    assert!(
        !text.contains("InvalidSignature"),
        "no debug format: {text}"
    );
    // A grab on a rain that does not exist fails.
    let output = chorus(&[
        "client",
        "--url",
        &url,
        "--user",
        "alice",
        "grab",
        "no-such-rain",
    ])
    .await;
    assert!(
        !output.status.success(),
        "a grab nobody answered exits non-zero"
    );
    assert!(
        stderr(&output).contains("no-such-rain"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test]
async fn a_room_scheduled_from_the_cli_is_started_from_the_cli() {
    let node = TestNode::start(&[]).await;
    let url = node.ws_url();
    // A start time in the past is refused, not silently made live.
    let output = chorus(&[
        "client",
        "--url",
        &url,
        "--user",
        "alice",
        "create-room",
        "Friday panel",
        "--scheduled-start-ms",
        "1000",
    ])
    .await;
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("is in the past"),
        "{}",
        stderr(&output)
    );
    // Ten minutes from now.
    let output = chorus(&[
        "client",
        "--url",
        &url,
        "--user",
        "alice",
        "create-room",
        "Friday panel",
        "--starts-in",
        "10m",
    ])
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    let created: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("create-room prints JSON");
    assert_eq!(created["room"]["state"], "scheduled", "{created}");
    let room = created["room_id"].as_str().expect("room_id").to_string();
    let mut fan = node.client(&url, "carol").await;
    fan.request(chorus_protocol::RoomInterestRequest {
        room_id: room.clone(),
        interested: true,
    })
    .await
    .expect("interest");
    let output = chorus(&["client", "--url", &url, "--user", "alice", "start", &room]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    common::expect_event(&mut fan, "room.live", |event| match event {
        chorus_protocol::Event::Live(live) if live.room_id == room => Some(()),
        _ => None,
    })
    .await;
}
