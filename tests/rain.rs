//! Red-packet rain on a cluster (SPEC Q7-Q8): real node processes, real clients, the pool's
//! owner killed mid-rain, and the audit run from durable state with the clients' log.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chorus_node::client::{Client, ClientError};
use chorus_protocol::{ErrorCode, GrabResult, RainGrabRequest};
use common::{admin_cli, create_room, eventually, join, three_node_cluster, TestNode, DEADLINE};

/// Creates a rain through the CLI; returns its id.
async fn create_rain(node: &TestNode, room: &str, args: &[&str]) -> String {
    let mut all = vec!["rain", "create", "--room", room];
    all.extend_from_slice(args);
    let (ok, stdout, stderr) = admin_cli(node, &all).await;
    assert!(ok, "rain create failed: {stderr}");
    let rain: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON");
    rain["rain_id"].as_str().expect("rain_id").to_string()
}

/// One tap with its own request id, retried with that id while the server is
/// unavailable (as `chorus client grab` does). `None` if it never got an answer.
async fn tap(client: &Client, rain_id: &str, request_id: &str) -> Option<(GrabResult, u64)> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let request = RainGrabRequest {
            rain_id: rain_id.to_string(),
            request_id: request_id.to_string(),
        };
        match client.request(request).await {
            Ok(answer) => return Some((answer.result, answer.amount.unwrap_or(0))),
            Err(ClientError::Server(error)) if error.code != ErrorCode::Unavailable.as_u16() => {
                panic!("grab refused: {error}")
            }
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(_) => return None,
        }
    }
}

/// Q7/Q8: users on two nodes grab from a rain whose pool runs on the third; the pool's
/// node is SIGKILLed mid-rain. Every grab a client saw granted is in the ledger, no packet
/// is paid twice, no user exceeds the cap, and granted + refunded is the total to the cent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rain_stays_exact_when_its_pool_node_is_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = three_node_cluster(dir.path()).await;
    let host = nodes[0].client(&nodes[0].ws_url(), "host").await;
    let room = create_room(&host, "Rain room").await;
    let rain_id = create_rain(
        &nodes[0],
        &room,
        &[
            "--total",
            "100000",
            "--count",
            "240",
            "--cap",
            "3",
            "--duration",
            "25",
        ],
    )
    .await;
    let owner = nodes[0]
        .admin(&format!("/admin/where?key=rain/{rain_id}"))
        .await["owner_name"]
        .as_str()
        .expect("owner_name")
        .to_string();
    let owner_index = ["a", "b", "c"]
        .iter()
        .position(|n| *n == owner)
        .expect("owner is a member");
    let [a, b, c] = nodes;
    let mut nodes: Vec<Option<TestNode>> = vec![Some(a), Some(b), Some(c)];
    // Users connect to the two other nodes.
    let edges: Vec<usize> = (0..3).filter(|i| *i != owner_index).collect();
    let users = 60;
    let mut clients = Vec::new();
    for u in 0..users {
        let edge = nodes[edges[u % 2]].as_ref().expect("edge");
        let client = edge.client(&edge.ws_url(), &format!("u{u:03}")).await;
        join(&client, &room).await;
        clients.push(Arc::new(client));
    }
    // (user, amount) of every grant a client saw.
    let seen: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tappers = Vec::new();
    for (u, client) in clients.iter().enumerate() {
        let client = client.clone();
        let rain_id = rain_id.clone();
        let seen = seen.clone();
        let answered = answered.clone();
        tappers.push(tokio::spawn(async move {
            let user = format!("u{u:03}");
            for t in 0..40 {
                let request_id = format!("{user}-{t}");
                match tap(&client, &rain_id, &request_id).await {
                    Some((GrabResult::Granted, amount)) => {
                        // A repeat of the same request id gets the same packet back.
                        let again = tap(&client, &rain_id, &request_id).await;
                        assert_eq!(again, Some((GrabResult::Granted, amount)));
                        seen.lock().expect("lock").push((user.clone(), amount));
                    }
                    Some((
                        GrabResult::CapReached | GrabResult::NoneLeft | GrabResult::Ended,
                        _,
                    )) => break,
                    _ => {}
                }
                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }));
    }
    eventually("some grabs to be answered", || {
        let seen = seen.clone();
        async move { seen.lock().expect("lock").len() >= 40 }
    })
    .await;
    nodes[owner_index].take().expect("owner").kill().await;
    for tapper in tappers {
        tokio::time::timeout(Duration::from_secs(120), tapper)
            .await
            .expect("tappers finish")
            .expect("tapper");
    }
    let seen = seen.lock().expect("lock").clone();
    assert!(seen.len() >= 100, "only {} grants seen", seen.len());
    let mut per_user: BTreeMap<&str, u32> = BTreeMap::new();
    for (user, _) in &seen {
        *per_user.entry(user).or_default() += 1;
    }
    assert!(per_user.values().all(|n| *n <= 3), "a user above the cap");

    // The rain ends (25 s after it started) and refunds the rest on a surviving node.
    let survivor = nodes[edges[0]].as_ref().expect("survivor");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let status = survivor.admin(&format!("/admin/rain?id={rain_id}")).await;
        if status["ended"] == true {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rain did not end: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log_path = dir.path().join("client.log");
    let log: String = seen
        .iter()
        .map(|(user, amount)| {
            format!("{{\"user\":\"{user}\",\"result\":\"granted\",\"amount\":{amount}}}\n")
        })
        .collect();
    std::fs::write(&log_path, log).expect("write client log");
    let log_arg = log_path.to_str().expect("utf8");
    let (ok, stdout, stderr) = admin_cli(
        survivor,
        &["rain", "audit", &rain_id, "--client-log", log_arg, "--json"],
    )
    .await;
    assert!(ok, "audit failed: {stdout} {stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON");
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["total"], 100_000);
    let granted = report["granted"].as_u64().expect("granted");
    let refunded = report["refunded"].as_u64().expect("refunded");
    assert_eq!(granted + refunded, 100_000, "{report}");
    let seen_cents: u64 = seen.iter().map(|(_, amount)| amount).sum();
    assert!(granted >= seen_cents);

    // A forged client log fails the audit with a non-zero exit.
    let forged = dir.path().join("forged.log");
    std::fs::write(
        &forged,
        "{\"user\":\"u000\",\"result\":\"granted\",\"amount\":99999999}\n",
    )
    .expect("write");
    let (ok, stdout, _) = admin_cli(
        survivor,
        &[
            "--json",
            "rain",
            "audit",
            &rain_id,
            "--client-log",
            forged.to_str().expect("utf8"),
        ],
    )
    .await;
    assert!(!ok, "a forged grant must fail the audit: {stdout}");

    // The ledger: one line per grant, then the refund, summing to the total.
    let (ok, stdout, stderr) = admin_cli(survivor, &["rain", "ledger", &rain_id]).await;
    assert!(ok, "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let sum: u64 = lines
        .iter()
        .map(|l| l["amount"].as_u64().expect("amount"))
        .sum();
    assert_eq!(sum, 100_000);
    assert_eq!(lines.last().expect("refund")["kind"], "refund");
    assert_eq!(lines.last().expect("refund")["user"], "host");
}
