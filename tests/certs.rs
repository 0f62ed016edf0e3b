//! Node identities without the CA key, and nodes of different CAs, with real `chorus`
//! processes on loopback (127.0.8.11-19, reserved for these tests).
//!
//! `chorus ca issue` writes a node's identity where the CA key is; a node started with
//! `--ca` on that directory serves and joins without ever seeing the key, side by side
//! with nodes that hold it. A node of another CA is told so when it tries to join.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use chorus_protocol::Event;
use common::{create_room, eventually, expect_event, join, say, TestNode, UNTHROTTLED};

/// Runs `chorus ARGS…` to its end (at most 60 s).
async fn chorus(args: &[&str]) -> Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(args)
        .env("CHORUS_LOG", "warn")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap_or_else(|_| panic!("chorus {args:?} did not end within 60 s"))
        .expect("run chorus")
}

/// Runs `chorus ARGS…` and asserts it succeeded.
async fn chorus_ok(args: &[&str]) {
    let output = chorus(args).await;
    assert!(
        output.status.success(),
        "chorus {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// `chorus ca init DIR`.
async fn ca_init(dir: &Path) {
    chorus_ok(&["ca", "init", path(dir)]).await;
}

/// `chorus ca issue` for node `name` reached at `ip` (and the config's `tls_names`) from
/// the CA in `ca`; returns the identity's directory.
async fn ca_issue(ca: &Path, out: &Path, name: &str, ip: &str, config: &Path) -> PathBuf {
    chorus_ok(&[
        "ca",
        "issue",
        "--ca",
        path(ca),
        "--out",
        path(out),
        "--node-name",
        name,
        "--name",
        ip,
        "--config",
        path(config),
    ])
    .await;
    out.to_path_buf()
}

/// `serve` flags for node `name` on `ip` (OS-assigned ports) with its CA dir `ca`.
fn serve_args<'a>(ca: &'a str, name: &'a str, ip: &'a str, config: &'a str) -> Vec<String> {
    let mut args: Vec<String> = [
        "--ca",
        ca,
        "--node-name",
        name,
        "--config",
        config,
        "--http-addr",
        &format!("{ip}:0"),
        "--quic-addr",
        &format!("{ip}:0"),
        "--cluster-addr",
        &format!("{ip}:0"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(UNTHROTTLED.iter().map(|s| s.to_string()));
    args
}

async fn start(data: &Path, args: &[String]) -> TestNode {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    TestNode::start_in(data, &args).await
}

/// A node config whose `tls_names` both `ca issue --config` and the nodes read.
fn write_config(dir: &Path) -> PathBuf {
    let config = dir.join("chorus.toml");
    std::fs::write(&config, "tls_names = [\"chorus.test\"]\n").expect("write config");
    config
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn nodes_with_issued_identities_form_a_cluster_without_seeing_the_ca_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    ca_init(&ca).await;
    let config = write_config(dir.path());
    let id1 = ca_issue(&ca, &dir.path().join("id1"), "n1", "127.0.8.11", &config).await;
    let id2 = ca_issue(&ca, &dir.path().join("id2"), "n2", "127.0.8.12", &config).await;
    for id in [&id1, &id2] {
        for file in ["ca.pem", "node.pem", "node-key.pem", "mesh-cookie"] {
            assert!(id.join(file).exists(), "{} lacks {file}", id.display());
        }
        assert!(
            !id.join("ca-key.pem").exists(),
            "no CA key in an issued identity"
        );
        #[cfg(unix)]
        for secret in ["node-key.pem", "mesh-cookie"] {
            assert_eq!(mode(&id.join(secret)), 0o600, "{secret}");
        }
    }

    let n1 = start(
        &dir.path().join("n1"),
        &serve_args(path(&id1), "n1", "127.0.8.11", path(&config)),
    )
    .await;
    let mut n2_args = serve_args(path(&id2), "n2", "127.0.8.12", path(&config));
    n2_args.extend(["--join".to_string(), n1.cluster.to_string()]);
    let n2 = start(&dir.path().join("n2"), &n2_args).await;
    // A node holding the CA key joins them: it derives the actor-mesh cookie from the key,
    // the others read theirs from the issued identity, and all must agree.
    let mut n3_args = serve_args(path(&ca), "n3", "127.0.8.13", path(&config));
    n3_args.extend(["--join".to_string(), n2.cluster.to_string()]);
    let n3 = start(&dir.path().join("n3"), &n3_args).await;
    let nodes = [&n1, &n2, &n3];

    // mesh_peers: actor sessions, whose handshake needs the same cookie on both ends.
    eventually(
        "every node to see 3 members up, one leader, one ring epoch, and actor sessions \
         with the 2 others",
        || async {
            let mut statuses = Vec::new();
            for node in nodes {
                statuses.push(node.admin("/admin/status").await);
            }
            statuses.iter().all(|s| {
                s["members"]
                    .as_array()
                    .is_some_and(|m| m.len() == 3 && m.iter().all(|m| m["state"] == "up"))
                    && !s["leader"].is_null()
                    && s["ring_epoch"] == statuses[0]["ring_epoch"]
                    && s["mesh_peers"].as_array().is_some_and(|p| p.len() == 2)
            })
        },
    )
    .await;
    for (node, data) in [(&n1, "n1"), (&n2, "n2")] {
        let data = dir.path().join(data);
        assert!(
            !data.join("ca-key.pem").exists(),
            "no CA key in {}",
            data.display()
        );
        assert!(
            !data.join("node-key.pem").exists(),
            "no leaf key on the data volume"
        );
        assert_eq!(
            std::fs::read_to_string(node.ca_path()).expect("ca.pem in the data dir"),
            std::fs::read_to_string(ca.join("ca.pem")).expect("ca.pem"),
            "clients find the cluster CA in the data dir"
        );
    }

    // A room created through n1 is joined through n2 (QUIC: the client checks n2's
    // issued certificate for 127.0.8.12) and n3; a comment reaches both.
    let host = n1.client(&n1.ws_url(), "alice").await;
    let room = create_room(&host, "issued identities").await;
    join(&host, &room).await;
    let mut listeners = Vec::new();
    for (node, user) in [(&n2, "bob"), (&n3, "carol")] {
        let listener = node.client(&node.quic_url(), user).await;
        join(&listener, &room).await;
        listeners.push(listener);
    }
    let comment_id = say(&host, &room, "hello across nodes").await;
    for listener in &mut listeners {
        let text = expect_event(
            listener,
            "the comment on another node",
            |event| match event {
                Event::Comment(c) if c.room_id == room && c.comment_id == comment_id => {
                    Some(c.text.clone())
                }
                _ => None,
            },
        )
        .await;
        assert_eq!(text, "hello across nodes");
    }
}

#[tokio::test]
async fn a_node_of_another_ca_is_told_the_certificate_is_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let ca = dir.path().join("ca");
    ca_init(&ca).await;
    let id1 = ca_issue(&ca, &dir.path().join("id1"), "n1", "127.0.8.14", &config).await;
    let n1 = start(
        &dir.path().join("n1"),
        &serve_args(path(&id1), "n1", "127.0.8.14", path(&config)),
    )
    .await;

    let other_ca = dir.path().join("other-ca");
    ca_init(&other_ca).await;
    let id2 = ca_issue(
        &other_ca,
        &dir.path().join("id2"),
        "n2",
        "127.0.8.15",
        &config,
    )
    .await;
    let data2 = dir.path().join("n2");
    let mut args = vec![
        "serve".to_string(),
        "--data-dir".into(),
        path(&data2).into(),
    ];
    args.extend(serve_args(path(&id2), "n2", "127.0.8.15", path(&config)));
    // Far beyond the test's patience: the refusal must end the join, not the timeout.
    args.extend([
        "--join".into(),
        n1.cluster.to_string(),
        "--join-timeout".into(),
        "5m".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = chorus(&args).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "the foreign node must not run: {stderr}"
    );
    let expected = format!(
        "the peer at {} presented a certificate not signed by this node's CA ({})",
        n1.cluster,
        id2.join("ca.pem").display()
    );
    assert!(
        stderr.contains(&expected),
        "expected «{expected}» in: {stderr}"
    );
    assert!(
        stderr.contains("every node of a cluster must use the same CA"),
        "{stderr}"
    );
    assert!(!stderr.contains("no leader reachable"), "{stderr}");

    // n1 is unharmed and still alone.
    let status = n1.admin("/admin/status").await;
    assert_eq!(
        status["members"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
}

#[tokio::test]
async fn a_ca_certificate_without_key_or_issued_identity_is_refused_naming_chorus_ca_issue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let ca = dir.path().join("ca");
    ca_init(&ca).await;
    let public_only = dir.path().join("public");
    std::fs::create_dir_all(&public_only).expect("dir");
    std::fs::copy(ca.join("ca.pem"), public_only.join("ca.pem")).expect("copy ca.pem");
    let data = dir.path().join("n1");
    let mut args = vec!["serve".to_string(), "--data-dir".into(), path(&data).into()];
    args.extend(serve_args(
        path(&public_only),
        "n1",
        "127.0.8.16",
        path(&config),
    ));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = chorus(&args).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("chorus ca issue"), "{stderr}");
    assert!(
        !public_only.join("ca-key.pem").exists(),
        "no new CA is made over an existing ca.pem"
    );
}

#[tokio::test]
async fn ca_issue_refuses_a_directory_without_a_ca_key_and_an_output_holding_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    ca_init(&ca).await;
    let issue = |ca_dir: PathBuf, out: PathBuf| async move {
        chorus(&[
            "ca",
            "issue",
            "--ca",
            path(&ca_dir),
            "--out",
            path(&out),
            "--node-name",
            "n1",
        ])
        .await
    };
    let no_ca = issue(dir.path().join("nothing"), dir.path().join("out")).await;
    assert!(!no_ca.status.success());
    assert!(
        String::from_utf8_lossy(&no_ca.stderr).contains("chorus ca init"),
        "{}",
        String::from_utf8_lossy(&no_ca.stderr)
    );
    let into_ca = issue(ca.clone(), ca.clone()).await;
    assert!(
        !into_ca.status.success(),
        "an identity is not written next to the key"
    );
    let issued = issue(ca.clone(), dir.path().join("out")).await;
    assert!(issued.status.success());
    let printed: serde_json::Value = serde_json::from_slice(&issued.stdout).expect("json");
    assert_eq!(
        printed["names"],
        serde_json::json!(["127.0.0.1", "localhost"])
    );
}
