//! Cluster formation the way operators start nodes: all at once. Five `chorus serve`
//! processes start at the same moment (every one joining the first, or each joining the
//! previous one, which is itself still joining); each round must end with five distinct
//! ids, five members `up`, one ring epoch on every node, and `/readyz` true on a node only
//! once that node is an `up` member. The README's three-node commands run as written.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, try_http_get, TestNode};

/// Nodes per round.
const NODES: usize = 5;
/// Rounds per variant (the issue's "ten times in a row"); `CHORUS_FORMATION_ROUNDS`
/// overrides it.
const ROUNDS: usize = 10;

fn rounds() -> usize {
    std::env::var("CHORUS_FORMATION_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ROUNDS)
}

/// Node `i` (1-based) of a round: its own loopback IP, the default ports.
fn addresses(base: [u8; 3], i: usize) -> (String, String, String) {
    let ip = format!("{}.{}.{}.{}", base[0], base[1], base[2], i);
    (
        format!("{ip}:7070"),
        format!("{ip}:7071"),
        format!("{ip}:7072"),
    )
}

/// Runs `chorus ca init DIR`.
async fn ca_init(dir: &Path) {
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["ca", "init"])
        .arg(dir)
        .status()
        .await
        .expect("run chorus ca init");
    assert!(status.success(), "chorus ca init failed");
}

/// Watches `/readyz` of every node while they start: whenever a node says ready, its own
/// status must show it `up` on its ring with a leader (a node never claims readiness it
/// does not have). Returns the violations seen.
fn watch_readiness(
    http: Vec<SocketAddr>,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut violations = Vec::new();
        while !stop.is_cancelled() {
            for addr in &http {
                let Some((200, ready)) = try_http_get(*addr, "/readyz").await else {
                    continue;
                };
                let ready: serde_json::Value = serde_json::from_str(&ready).unwrap_or_default();
                let Some((200, status)) = try_http_get(*addr, "/admin/status").await else {
                    continue;
                };
                let status: serde_json::Value = serde_json::from_str(&status).unwrap_or_default();
                let self_id = &status["self"];
                let is_up = status["members"].as_array().is_some_and(|members| {
                    members
                        .iter()
                        .any(|m| &m["id"] == self_id && m["state"] == "up")
                });
                if ready["state"] != "up" || !is_up || status["leader"].is_null() {
                    violations.push(format!(
                        "{addr} said ready ({ready}) while its status was {status}"
                    ));
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        violations
    })
}

/// Starts five nodes at the same moment; `chained`: node i joins node i-1, else every
/// node joins node 1. Checks the cluster they form, then stops them.
async fn form_five(base: [u8; 3], chained: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    ca_init(&ca).await;
    let ca = ca.to_str().expect("utf8").to_string();

    let http: Vec<SocketAddr> = (1..=NODES)
        .map(|i| addresses(base, i).0.parse().expect("addr"))
        .collect();
    let stop = tokio_util::sync::CancellationToken::new();
    let watcher = watch_readiness(http.clone(), stop.clone());

    let dir_path = Arc::new(dir.path().to_path_buf());
    let starts = (1..=NODES).map(|i| {
        let ca = ca.clone();
        let dir_path = dir_path.clone();
        async move {
            let (http, quic, cluster) = addresses(base, i);
            let name = format!("n{i}");
            let mut args: Vec<String> = [
                "--ca",
                &ca,
                "--node-name",
                &name,
                "--http-addr",
                &http,
                "--quic-addr",
                &quic,
                "--cluster-addr",
                &cluster,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if i > 1 {
                let seed = if chained { i - 1 } else { 1 };
                args.push("--join".into());
                args.push(addresses(base, seed).2);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            TestNode::start_in(&dir_path.join(&name), &args).await
        }
    });
    let nodes: Vec<TestNode> = futures_util::future::join_all(starts).await;

    eventually(
        "five distinct ids, five members up, one ring epoch, every node ready",
        || async {
            let mut statuses = Vec::new();
            for node in &nodes {
                statuses.push(node.admin("/admin/status").await);
            }
            let ids: std::collections::BTreeSet<u64> =
                statuses.iter().filter_map(|s| s["self"].as_u64()).collect();
            let mut ready = 0;
            for node in &nodes {
                if let Some((200, _)) = try_http_get(node.http, "/readyz").await {
                    ready += 1;
                }
            }
            ids.len() == NODES
                && ready == NODES
                && statuses.iter().all(|s| {
                    s["members"].as_array().is_some_and(|members| {
                        members.len() == NODES && members.iter().all(|m| m["state"] == "up")
                    }) && s["ring_epoch"] == statuses[0]["ring_epoch"]
                        && !s["leader"].is_null()
                        && s["leader"] == statuses[0]["leader"]
                        && s["ready"] == true
                })
        },
    )
    .await;

    // Every member's record names the node that holds that id (no id taken twice).
    let status = nodes[0].admin("/admin/status").await;
    for node in &nodes {
        let own = node.admin("/admin/status").await;
        let record = status["members"]
            .as_array()
            .and_then(|members| members.iter().find(|m| m["id"] == own["self"]))
            .unwrap_or_else(|| panic!("no member record for {own}"));
        assert_eq!(record["http_addr"], node.http.to_string(), "{status}");
    }

    stop.cancel();
    let violations = watcher.await.expect("readiness watcher");
    assert!(violations.is_empty(), "{violations:#?}");
    for node in nodes {
        node.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_started_together_all_joining_the_first_form_one_cluster() {
    for round in 0..rounds() {
        eprintln!("round {round}: five nodes join node 1");
        form_five([127, 77, 10 + round as u8], false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_started_together_each_joining_the_previous_form_one_cluster() {
    for round in 0..rounds() {
        eprintln!("round {round}: each node joins the previous one");
        form_five([127, 77, 40 + round as u8], true).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_that_cannot_complete_exits_non_zero_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Nothing listens at the seed.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("n"))
        .args([
            "--http-addr",
            "127.0.0.1:0",
            "--quic-addr",
            "127.0.0.1:0",
            "--cluster-addr",
            "127.0.0.1:0",
            "--join",
            "127.77.99.1:7072",
            "--join-timeout",
            "3s",
        ])
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .expect("the node gave up on its join in time")
        .expect("run chorus serve");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("could not join the cluster through 127.77.99.1:7072 within 3 s"),
        "{stderr}"
    );
}

/// The README's "three-node cluster on one machine" block, run with bash exactly as
/// written (with `chorus` standing for the built binary), forms the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_three_node_commands_form_the_cluster() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let heading = "A three-node cluster on one machine";
    let after = &readme[readme.find(heading).expect("the README's cluster section")..];
    let start = after.find("```sh\n").expect("a sh block") + "```sh\n".len();
    let block = &after[start..start + after[start..].find("```").expect("block end")];
    // A line naming a room (`r-…`) needs a room id that the block does not create.
    let script: String = block
        .lines()
        .filter(|line| !line.contains('…'))
        .map(|line| format!("{line}\n"))
        .collect();
    for i in 1..=3 {
        let addr: SocketAddr = format!("127.0.0.1{i}:7070").parse().expect("addr");
        assert!(
            try_http_get(addr, "/healthz").await.is_none(),
            "{addr} is in use (a benches/cluster.sh cluster?): stop it first"
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = env!("CARGO_BIN_EXE_chorus");
    let full = format!(
        "set -e\nchorus() {{ \"{bin}\" \"$@\"; }}\nexport CHORUS_LOG=warn\n{script}\necho BLOCK-DONE\nwait\n"
    );
    let mut child = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(&full)
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .expect("bash");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let mut printed = Vec::new();
    let finished = tokio::time::timeout(Duration::from_secs(90), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line == "BLOCK-DONE" {
                return true;
            }
            printed.push(line);
        }
        false
    })
    .await;
    let pgid = child.id().expect("pid");
    let ok = matches!(finished, Ok(true));
    let outcome = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(async {
        assert!(ok, "the README block did not run to its end: {printed:#?}");
        // The block waits for n3's readiness; n2 may lag a moment behind.
        eventually("every README node to be ready", || async {
            let mut ready = 0;
            for i in 1..=3 {
                let addr: SocketAddr = format!("127.0.0.1{i}:7070").parse().expect("addr");
                if let Some((200, _)) = try_http_get(addr, "/readyz").await {
                    ready += 1;
                }
            }
            ready == 3
        })
        .await;
        for i in 1..=3 {
            let addr: SocketAddr = format!("127.0.0.1{i}:7070").parse().expect("addr");
            let (code, body) = try_http_get(addr, "/admin/status").await.expect("status");
            assert_eq!(code, 200, "{body}");
            let status: serde_json::Value = serde_json::from_str(&body).expect("json");
            let members = status["members"].as_array().cloned().unwrap_or_default();
            assert_eq!(members.len(), 3, "{status}");
            assert!(members.iter().all(|m| m["state"] == "up"), "{status}");
        }
    }))
    .await;
    // Stop every process the block started, whatever happened.
    let _ = tokio::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .status()
        .await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    assert!(
        printed.iter().any(|l| l.contains("ready")),
        "the block's readiness check printed nothing: {printed:#?}"
    );
}
