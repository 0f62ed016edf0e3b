//! The README's tour, run as written: a node started as the README's "Two commands" start
//! it (`chorus serve`, no flags, in a fresh directory), then the tour's `sh` block, read
//! from README.md itself, run by bash with `set -e` (so every command must succeed), with
//! `chorus` standing for the built binary. Then what the tour says each step prints is
//! checked in what it printed.
//!
//! Uses the node's default addresses (127.0.0.1:7070-7072), as the README does.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{eventually, try_http_get};

/// The `sh` block after the README heading `heading`.
fn readme_block(heading: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let after = &readme[readme.find(heading).expect("the README's section")..];
    let start = after.find("```sh\n").expect("a sh block") + "```sh\n".len();
    after[start..start + after[start..].find("```").expect("block end")].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "uses the README's fixed addresses (127.0.0.1:7070-7072): .ci/run runs it in its own \
            network and PID namespaces (`cargo test --test readme_tour -- --ignored`)"]
async fn the_readme_tour_runs_as_written() {
    let http: SocketAddr = "127.0.0.1:7070".parse().expect("addr");
    assert!(
        try_http_get(http, "/healthz").await.is_none(),
        "{http} is in use (a `chorus serve` left running?): stop it first"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = env!("CARGO_BIN_EXE_chorus");
    let mut node = tokio::process::Command::new(bin)
        .arg("serve")
        .env("CHORUS_LOG", "warn")
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chorus serve");
    eventually("the node to be ready", || async {
        matches!(try_http_get(http, "/readyz").await, Some((200, _)))
    })
    .await;

    let block = readme_block("## A short tour with `chorus client`");
    assert!(
        block.starts_with("alias chorus=target/release/chorus\n"),
        "{block}"
    );
    // `alias` does not reach a script's commands: a function stands for it.
    let script = block.replacen(
        "alias chorus=target/release/chorus\n",
        &format!("chorus() {{ \"{bin}\" \"$@\"; }}\n"),
        1,
    );
    let full = format!("set -e\nexport CHORUS_LOG=warn\n{script}\necho TOUR-DONE\n");
    let out_path = dir.path().join("tour.out");
    let out = std::fs::File::create(&out_path).expect("out");
    let mut tour = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(&full)
        .current_dir(dir.path())
        // Not the test's stdin: a command that reads it must see it closed.
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .expect("bash");
    let printed = || std::fs::read_to_string(&out_path).unwrap_or_default();
    let done = tokio::time::timeout(Duration::from_secs(180), async {
        loop {
            if printed().contains("TOUR-DONE") {
                return true;
            }
            if let Ok(Some(_)) = tour.try_wait() {
                return printed().contains("TOUR-DONE");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    // The answer waits for the announcement (done by now); give background jobs a moment
    // to print what they received, then stop them (bob's `join --for 60` would run on).
    if matches!(done, Ok(true)) {
        eventually("the quiz answer to open its verdict", || async {
            printed().contains("\"verdict\"")
        })
        .await;
    }
    if let Some(pgid) = tour.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &format!("-{pgid}")])
            .status();
    }
    let stderr = match tokio::time::timeout(Duration::from_secs(10), tour.wait_with_output()).await
    {
        Ok(Ok(output)) => String::from_utf8_lossy(&output.stderr).into_owned(),
        _ => String::new(),
    };
    let printed = printed();
    assert!(
        matches!(done, Ok(true)),
        "the tour did not run to its end.\nstdout:\n{printed}\nstderr:\n{stderr}"
    );
    // What the tour's comments say each step prints.
    for (what, expected) in [
        ("bob hears alice's comment", "\"text\":\"hello, everyone\""),
        ("bob sees carol's bullet", "\"text\":\"666\""),
        ("alice sees bob's hand", "\"hands\":[\"bob\"]"),
        (
            "the poll's result reaches the room",
            "\"kind\":\"room.poll\"",
        ),
        ("the rain's audit passes", "\"violations\":[]"),
        (
            "the quiz pays its survivor",
            "1 winners, 100000 of 100000 cents paid",
        ),
        (
            "bob's sealed verdict opens at the announcement",
            "\"verdict\":\"correct\"",
        ),
        (
            "bob's inbox has alice's voice message",
            "\"sender\":\"alice\",\"conversation\":\"direct:alice:bob\"",
        ),
        ("bob reads it on every device", "\"read\":true"),
    ] {
        assert!(
            printed.contains(expected),
            "{what}: {expected:?} not in\n{printed}"
        );
    }
    // bob fetched alice's voice message as she sent it.
    let sent = std::fs::read(dir.path().join("hello.opus")).expect("hello.opus");
    let fetched = std::fs::read(dir.path().join("from-alice.opus")).expect("from-alice.opus");
    assert_eq!(
        fetched, sent,
        "bob's copy of the voice message is alice's file"
    );
    // dave recorded alice's voice: a valid Ogg Opus file, finished when his `listen` was
    // stopped (SIGTERM, as above).
    eventually("dave's recording to be a whole Ogg Opus file", || async {
        let recorded = std::fs::read(dir.path().join("dave.opus")).unwrap_or_default();
        let mut stream = chorus_actors::voicemail::ogg::OpusStream::default();
        stream.read(&recorded) == Ok(recorded.len()) && stream.ended
    })
    .await;
    let recorded = std::fs::read(dir.path().join("dave.opus")).expect("dave.opus");
    let mut stream = chorus_actors::voicemail::ogg::OpusStream::default();
    stream.read(&recorded).expect("Ogg Opus");
    assert!(
        stream.duration_ms() > 500,
        "dave heard alice speak: {} ms recorded",
        stream.duration_ms()
    );
    let _ = node.kill().await;
}
