//! `chorus client` alone is enough to use a room: two users on different transports, one
//! speaks, the other prints it as a JSON line.

mod common;

use std::process::Stdio;

use common::{admin_cli, expect_line, TestNode, DEADLINE};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
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
    let (mut bob, mut lines, first) = join_in_background(&node, "bob", &room_id).await;
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

    let comment = expect_line(&mut lines, "bob's comment", |e| e["kind"] == "room.comment").await;
    assert_eq!(comment["body"]["text"], "hello from the CLI");
    assert_eq!(comment["body"]["user_id"], "alice");

    // carol sends a bullet comment; bob prints the window that shows it
    let sent = run(&node, "carol", &["bullet", &room_id, " 666 "], true).await;
    // Only the bullet's answer: the moment's join is not printed.
    assert_eq!(sent, [serde_json::json!({})], "answered Empty alone");
    run(
        &node,
        "carol",
        &["bullet", &room_id, &"x".repeat(51)],
        false,
    )
    .await;
    let bullets = expect_line(&mut lines, "bob's bullets", |e| e["kind"] == "room.bullets").await;
    assert_eq!(bullets["body"]["bullets"][0]["text"], "666");
    assert_eq!(bullets["body"]["bullets"][0]["user_id"], "carol");
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

/// `chorus client join ROOM --for 30` as `user` over QUIC, in the background: the
/// process, its remaining stdout lines, and its first line (the join response).
async fn join_in_background(
    node: &TestNode,
    user: &str,
    room: &str,
) -> (
    tokio::process::Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    serde_json::Value,
) {
    let mut child = client(node, &node.quic_url(), user)
        .args(["join", room, "--for", "30"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn join");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("join response")
        .expect("read")
        .expect("line");
    let first = serde_json::from_str(&first).expect("JSON line");
    (child, lines, first)
}

/// Runs a one-shot `chorus client` command; returns its stdout lines as JSON, or panics
/// with its stderr if `ok` and it failed (or it succeeded and `ok` is false).
async fn run(node: &TestNode, user: &str, args: &[&str], ok: bool) -> Vec<serde_json::Value> {
    let output = client(node, &node.ws_url(), user)
        .args(args)
        .output()
        .await
        .expect("run chorus client");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.success(), ok, "{args:?}: {stderr}");
    if !ok {
        assert!(!stderr.trim().is_empty(), "a refusal says why on stderr");
    }
    String::from_utf8(output.stdout)
        .expect("utf8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect()
}

#[tokio::test]
async fn the_stage_is_run_from_the_cli() {
    let node = TestNode::start(&[]).await;
    let created = run(&node, "alice", &["create-room", "CLI stage"], true).await;
    let room = created[0]["room_id"].as_str().expect("room_id").to_string();
    // bob stays in the room with one session; his one-shot commands are other sessions of
    // the same user, so his hand keeps its place when they end.
    let (mut bob, mut bob_lines, _) = join_in_background(&node, "bob", &room).await;

    run(&node, "bob", &["raise-hand", &room], true).await;
    let stage = run(&node, "alice", &["stage", &room], true).await;
    let stage = stage.last().expect("stage line");
    assert_eq!(stage["hands"], serde_json::json!(["bob"]), "{stage}");
    run(&node, "carol", &["invite", &room, "bob"], false).await;
    run(&node, "alice", &["invite", &room, "bob"], true).await;
    run(&node, "bob", &["accept", &room], true).await;
    run(&node, "alice", &["mute", &room, "--speaker", "bob"], true).await;
    let stage = run(&node, "carol", &["stage", &room], true).await;
    let stage = stage.last().expect("stage line");
    assert_eq!(stage["speakers"], serde_json::json!(["bob"]), "{stage}");
    assert_eq!(stage["muted"], serde_json::json!(["bob"]), "{stage}");
    run(&node, "carol", &["kick", &room, "bob"], false).await;
    run(
        &node,
        "alice",
        &["set-role", &room, "carol", "moderator"],
        true,
    )
    .await;
    run(&node, "carol", &["block", &room, "bob"], true).await;

    // bob's listening session printed the block, then the room refuses him.
    expect_line(&mut bob_lines, "bob's block", |e| {
        e["kind"] == "room.stage" && e["body"]["action"] == "blocked"
    })
    .await;
    run(&node, "bob", &["say", &room, "let me in"], false).await;
    run(&node, "alice", &["unblock", &room, "bob"], true).await;
    run(&node, "bob", &["say", &room, "thanks"], true).await;

    // Polls (R8): only moderators create and close; members vote.
    run(
        &node,
        "bob",
        &["poll-create", &room, "Again?", "yes", "no"],
        false,
    )
    .await;
    let created = run(
        &node,
        "alice",
        &["poll-create", &room, "Again?", "yes", "no"],
        true,
    )
    .await;
    let poll = created
        .iter()
        .find_map(|l| l["poll_id"].as_u64().filter(|_| l["question"] == "Again?"))
        .expect("the poll")
        .to_string();
    run(&node, "bob", &["vote", &room, &poll, "0"], true).await;
    run(&node, "carol", &["vote", &room, &poll, "7"], false).await;
    let closed = run(&node, "alice", &["poll-close", &room, &poll], true).await;
    let result = closed
        .iter()
        .find(|l| l["state"] == "closed" && l["poll_id"].is_u64())
        .expect("the final result");
    assert_eq!(result["tallies"], serde_json::json!([1, 0]), "{result}");
    let _ = bob.kill().await;
}

/// The host's and moderators' commands and the views do not join the room: the one
/// listener is the only user the room ever counts, and sees nobody else come and go. A
/// one-shot comment prints its own answer alone.
#[tokio::test]
async fn operators_commands_do_not_join_the_room() {
    let node = TestNode::start(&[]).await;
    let created = run(&node, "alice", &["create-room", "Quiet host"], true).await;
    let room = created[0]["room_id"].as_str().expect("room_id").to_string();
    let (mut bob, mut bob_lines, _) = join_in_background(&node, "bob", &room).await;

    // The host and a moderator, from outside the room: a moderator made, a poll opened
    // and closed, the views read by anyone.
    run(
        &node,
        "alice",
        &["set-role", &room, "carol", "moderator"],
        true,
    )
    .await;
    let poll = run(
        &node,
        "alice",
        &["poll-create", &room, "Go?", "yes", "no"],
        true,
    )
    .await;
    assert_eq!(poll.len(), 1, "the poll alone: {poll:?}");
    let poll_id = poll[0]["poll_id"].as_u64().expect("poll_id").to_string();
    let members = run(&node, "carol", &["members", &room], true).await;
    assert_eq!(members.len(), 1, "one page: {members:?}");
    assert_eq!(
        members[0]["count"], 1,
        "bob alone is in the room: {members:?}"
    );
    let stage = run(&node, "dave", &["stage", &room], true).await;
    assert_eq!(stage[0]["hands"], serde_json::json!([]), "{stage:?}");
    run(&node, "carol", &["poll-close", &room, &poll_id], true).await;
    // A listener outside the room can't act as a moderator.
    run(
        &node,
        "dave",
        &["poll-create", &room, "Me?", "a", "b"],
        false,
    )
    .await;

    // bob comments from a one-shot session: its answer alone is printed.
    let said = run(&node, "bob", &["say", &room, "only me"], true).await;
    assert_eq!(said.len(), 1, "the comment's answer alone: {said:?}");
    assert!(said[0]["comment_id"].is_u64(), "{said:?}");
    // Everything bob's listening session saw up to that comment: nobody else came.
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let line = tokio::time::timeout_at(deadline, bob_lines.next_line())
            .await
            .expect("bob's comment in time")
            .expect("read")
            .expect("a line");
        let event: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
        let done = event["kind"] == "room.comment" && event["body"]["text"] == "only me";
        seen.push(event);
        if done {
            break;
        }
    }
    for event in &seen {
        if event["kind"] == "room.listeners" {
            assert_eq!(event["body"]["count"], 1, "{seen:?}");
            assert!(
                event["body"]["joined"].is_null()
                    || event["body"]["joined"] == serde_json::json!(["bob"]),
                "{seen:?}"
            );
        }
    }

    let summary = run(&node, "alice", &["summary", &room], true).await;
    assert_eq!(summary[0]["unique_listeners"], 1, "{summary:?}");
    assert_eq!(summary[0]["peak_listeners"], 1, "{summary:?}");
    let _ = bob.kill().await;
}

/// Runs `chorus admin --url http://NODE ARGS…`; returns (success, stdout, stderr).
/// Q7: an operator creates a red-packet rain in a room; its definition (with the seed of
/// its split) is committed, and its split sums to the total; bad rains are refused.
#[tokio::test]
async fn an_operator_creates_a_rain_whose_split_sums_to_the_total() {
    let node = TestNode::start(&[]).await;
    let created = run(&node, "alice", &["create-room", "Rain room"], true).await;
    let room = created[0]["room_id"].as_str().expect("room_id").to_string();
    let (ok, stdout, stderr) = admin_cli(
        &node,
        &[
            "rain",
            "create",
            "--room",
            &room,
            "--total",
            "10000",
            "--count",
            "250",
            "--start-in",
            "5",
            "--duration",
            "30",
        ],
    )
    .await;
    assert!(ok, "{stderr}");
    let rain: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON");
    let rain_id = rain["rain_id"].as_str().expect("rain_id").to_string();
    assert_eq!(rain["creator"], "alice", "the room's host pays");
    assert_eq!(rain["cap"], 3);
    assert_eq!(
        rain["end_ms"].as_u64().expect("end") - rain["start_ms"].as_u64().expect("start"),
        30_000
    );
    let (ok, stdout, stderr) = admin_cli(&node, &["rain", "status", &rain_id]).await;
    assert!(ok, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON");
    assert_eq!(status["total"], 10_000);
    assert_eq!(status["count"], 250);
    assert_eq!(status["split_sum"], 10_000, "the split is exact");
    assert!(status["smallest"].as_u64().expect("smallest") >= 1);

    for bad in [
        vec![
            "--room",
            room.as_str(),
            "--total",
            "10",
            "--count",
            "11",
            "--duration",
            "5",
        ],
        vec![
            "--room",
            "r-nope",
            "--total",
            "100",
            "--count",
            "5",
            "--duration",
            "5",
        ],
        vec![
            "--room",
            room.as_str(),
            "--total",
            "100",
            "--count",
            "5",
            "--duration",
            "-1",
        ],
        vec![
            "--room",
            room.as_str(),
            "--total",
            "100",
            "--count",
            "5",
            "--cap",
            "0",
            "--duration",
            "5",
        ],
    ] {
        let mut args = vec!["rain", "create"];
        args.extend(bad.iter().copied());
        let (ok, _, stderr) = admin_cli(&node, &args).await;
        assert!(!ok, "{bad:?} was accepted");
        assert!(!stderr.trim().is_empty(), "a refusal says why");
    }
    let (ok, _, _) = admin_cli(&node, &["rain", "status", "rain-unknown"]).await;
    assert!(!ok);
}

/// `chorus serve` with `extra` flags and `env`; the exit status and stderr if it exits
/// within the deadline, `None` if it is still running (it started serving).
async fn serve_outcome(extra: &[&str], env: &[(&str, &str)]) -> Option<(bool, String)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut command = Command::new(env!("CARGO_BIN_EXE_chorus"));
    command
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args([
            "--quic-addr",
            "127.0.0.1:0",
            "--cluster-addr",
            "127.0.0.1:0",
        ])
        .args(extra)
        .env_remove("CHORUS_SECRET")
        .env_remove("CHORUS_ADMIN_TOKEN")
        .env("CHORUS_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("spawn chorus serve");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = tokio::time::timeout(DEADLINE, stdout.next_line())
        .await
        .expect("the node neither served nor exited in time")
        .expect("stdout");
    if first.is_some_and(|line| line.contains("serving")) {
        return None;
    }
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("the node did not exit in time")
        .expect("wait");
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr).await;
    }
    Some((status.success(), stderr))
}

/// Secure by default (issue 12): the published development credentials only on loopback
/// addresses; secrets empty or shorter than 16 bytes are refused; secrets come from the
/// environment or files, never needing the command line.
#[tokio::test]
async fn a_node_refuses_public_addresses_without_real_credentials_and_short_secrets() {
    let public = ["--http-addr", "0.0.0.0:0"];
    let (ok, stderr) = serve_outcome(&public, &[]).await.expect("it must refuse");
    assert!(
        !ok && stderr.contains("refusing to serve on 0.0.0.0"),
        "{stderr}"
    );
    assert!(
        stderr.contains("CHORUS_SECRET") && stderr.contains("CHORUS_ADMIN_TOKEN"),
        "{stderr}"
    );

    let loopback = ["--http-addr", "127.0.0.1:0"];
    for (secret, why) in [("", "empty"), ("short", "5 bytes")] {
        let (ok, stderr) = serve_outcome(&loopback, &[("CHORUS_SECRET", secret)])
            .await
            .expect("it must refuse");
        assert!(!ok && stderr.contains(why), "{secret:?}: {stderr}");
    }

    // Real credentials from the environment: it serves on every interface.
    let env = [
        ("CHORUS_SECRET", "0123456789abcdef-secret"),
        ("CHORUS_ADMIN_TOKEN", "0123456789abcdef-admin"),
    ];
    assert!(serve_outcome(&public, &env).await.is_none());
    // And from files.
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("secret");
    let admin = dir.path().join("admin");
    std::fs::write(&secret, "0123456789abcdef-secret\n").expect("write");
    std::fs::write(&admin, "0123456789abcdef-admin\n").expect("write");
    let files = [
        "--http-addr",
        "0.0.0.0:0",
        "--secret-file",
        secret.to_str().expect("utf8"),
        "--admin-token-file",
        admin.to_str().expect("utf8"),
    ];
    assert!(serve_outcome(&files, &[]).await.is_none());
}

/// A node's log written to a pipe or file (not a terminal) has no colour codes.
#[tokio::test]
async fn a_redirected_log_has_no_colour_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--http-addr", "127.0.0.1:0", "--quic-addr", "127.0.0.1:0"])
        .args(["--cluster-addr", "127.0.0.1:0"])
        .env_remove("CHORUS_SECRET")
        .env_remove("CHORUS_ADMIN_TOKEN")
        .env("CHORUS_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn chorus serve");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let serving = tokio::time::timeout(DEADLINE, stdout.next_line())
        .await
        .expect("serving in time")
        .expect("stdout");
    assert!(serving.is_some_and(|line| line.contains("serving")));
    let _ = child.start_kill();
    let _ = child.wait().await;
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr).await;
    }
    assert!(
        stderr.contains("no secret configured"),
        "a warning was logged: {stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "ANSI escapes in a redirected log: {stderr}"
    );
}
