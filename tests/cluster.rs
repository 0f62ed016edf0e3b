//! System tests of a cluster of real `chorus serve` processes on loopback.

mod common;

use std::path::Path;

use common::{eventually, TestNode};

async fn start_member(dir: &Path, name: &str, join: Option<&TestNode>) -> TestNode {
    let ca = dir.join("ca");
    let ca = ca.to_str().expect("utf8 path");
    let mut args = vec!["--ca", ca, "--node-name", name];
    let seed;
    if let Some(seed_node) = join {
        seed = seed_node.cluster.to_string();
        args.extend(["--join", seed.as_str()]);
    }
    TestNode::start_in(&dir.join(name), &args).await
}

#[tokio::test]
async fn three_nodes_form_a_cluster_with_one_leader_and_one_ring_epoch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start_member(dir.path(), "a", None).await;
    let b = start_member(dir.path(), "b", Some(&a)).await;
    let c = start_member(dir.path(), "c", Some(&b)).await;
    let nodes = [&a, &b, &c];

    eventually(
        "every node to see 3 members up, one leader, one ring epoch",
        || async {
            let mut statuses = Vec::new();
            for node in nodes {
                statuses.push(node.admin("/admin/status").await);
            }
            statuses.iter().all(|s| {
                let members = s["members"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                members.len() == 3
                    && members.iter().all(|m| m["state"] == "up")
                    && !s["leader"].is_null()
                    && s["leader"] == statuses[0]["leader"]
                    && s["ring_epoch"] == statuses[0]["ring_epoch"]
            })
        },
    )
    .await;
    let ids: std::collections::BTreeSet<u64> = {
        let mut ids = std::collections::BTreeSet::new();
        for node in nodes {
            ids.insert(
                node.admin("/admin/status").await["self"]
                    .as_u64()
                    .expect("self id"),
            );
        }
        ids
    };
    assert_eq!(ids.len(), 3, "every node has its own id");

    // Every node agrees where a room lives.
    for i in 0..20 {
        let path = format!("/admin/where?key=r-{i}");
        let owner = a.admin(&path).await["owner"].clone();
        assert!(!owner.is_null());
        for node in [&b, &c] {
            assert_eq!(node.admin(&path).await["owner"], owner, "{path}");
        }
    }

    // The admin CLI shows the same thing.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args([
            "admin",
            "--url",
            &format!("http://{}", c.http),
            "--json",
            "status",
        ])
        .output()
        .await
        .expect("run chorus admin");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(status["members"].as_array().map(Vec::len), Some(3));

    // A wrong admin token is refused.
    let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args([
            "admin",
            "--url",
            &format!("http://{}", c.http),
            "--token",
            "wrong",
            "status",
        ])
        .output()
        .await
        .expect("run chorus admin");
    assert!(!refused.status.success());
}
