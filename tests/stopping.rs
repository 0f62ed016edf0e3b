//! System tests: stopping a node is bounded. SIGTERM drains within `--drain-timeout` and
//! then stops anyway, also without a Raft quorum; a second signal stops at once; the exit
//! status says whether the drain completed (0) or not (3).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chorus_node::client::{Client, ClientConfig, ReconnectPolicy};
use chorus_protocol::{RoomCommentRequest, RoomRef};
use common::{create_room, eventually, join, say, token, try_http_get, TestNode, DEADLINE};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// `chorus serve`'s documented status for a stop without a completed drain.
const EXIT_DRAIN_INCOMPLETE: i32 = 3;
/// The drain deadline the cluster scenarios give their nodes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// What the issue allows beyond the drain deadline.
const EXIT_SLACK: Duration = Duration::from_secs(5);
/// How soon a node must be gone after a second signal ("at once": a bounded flush and
/// the runtime's shutdown, on a busy machine).
const STOP_NOW_MAX: Duration = Duration::from_secs(4);

/// A cluster member this file can signal and whose log it reads (`common::TestNode`
/// keeps its child process to itself).
struct Member {
    child: Child,
    http: SocketAddr,
    cluster: SocketAddr,
    name: String,
    /// stderr lines so far (also echoed to the test's stderr).
    log: Arc<Mutex<Vec<String>>>,
}

impl Member {
    /// Starts member `name` under `dir` with the shared CA, joining through `join`.
    async fn start(dir: &Path, name: &str, join: Option<&Member>, drain_timeout: &str) -> Member {
        let ca = dir.join("ca");
        let mut command = Command::new(env!("CARGO_BIN_EXE_chorus"));
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.join(name))
            .arg("--ca")
            .arg(&ca)
            .args(["--node-name", name, "--drain-timeout", drain_timeout])
            .args(["--http-addr", "127.0.0.1:0", "--quic-addr", "127.0.0.1:0"])
            .args(["--cluster-addr", "127.0.0.1:0"])
            .args(common::UNTHROTTLED);
        if let Some(seed) = join {
            command.args(["--join", &seed.cluster.to_string()]);
        }
        let mut child = command
            // The stop's own lines (info) and every warning.
            .env(
                "CHORUS_LOG",
                std::env::var("CHORUS_TEST_LOG").unwrap_or_else(|_| {
                    "warn,chorus_node::cli=info,chorus_node::server=info".into()
                }),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn chorus serve");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let lines = log.clone();
        let label = name.to_string();
        tokio::spawn(async move {
            let mut stderr = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = stderr.next_line().await {
                eprintln!("[{label}] {line}");
                lines.lock().expect("log lock").push(line);
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let line = tokio::time::timeout(DEADLINE, stdout.next_line())
            .await
            .expect("node did not report its addresses in time")
            .expect("read node stdout")
            .expect("node exited before serving");
        tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
        let ready: serde_json::Value = serde_json::from_str(&line).expect("ready line is JSON");
        let addr = |field: &str| -> SocketAddr {
            ready[field]
                .as_str()
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("{field} in {ready}"))
        };
        Member {
            http: addr("http_addr"),
            cluster: addr("cluster_addr"),
            child,
            name: name.to_string(),
            log,
        }
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.http)
    }

    /// GET an admin path; the JSON body, or `Null` if the node does not answer.
    async fn admin(&self, path: &str) -> serde_json::Value {
        try_http_get(self.http, path)
            .await
            .and_then(|(_, body)| serde_json::from_str(&body).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    /// This member's node id.
    async fn id(&self) -> u64 {
        self.admin("/admin/status").await["self"]
            .as_u64()
            .unwrap_or_else(|| panic!("{} has no node id", self.name))
    }

    /// Sends `signal` (`TERM`, `INT`) to the process.
    async fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("the node is running");
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .await
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// SIGKILL, and wait for the process to be gone.
    async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// Waits at most `limit` for the process to exit; its status and how long it took.
    async fn exit_within(&mut self, limit: Duration, what: &str) -> (ExitStatus, Duration) {
        let started = Instant::now();
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within {limit:?} {what}", self.name))
            .expect("wait");
        (status, started.elapsed())
    }

    /// Whether the node has logged a line containing `text`.
    fn logged(&self, text: &str) -> bool {
        self.log
            .lock()
            .expect("log lock")
            .iter()
            .any(|line| line.contains(text))
    }
}

/// `n` members (the rest join through the first), converged: `n` up, one leader, one
/// ring epoch.
async fn cluster(dir: &Path, n: usize, drain_timeout: &str) -> Vec<Member> {
    let mut members: Vec<Member> = Vec::new();
    for i in 0..n {
        let name = format!("n{}", i + 1);
        let member = Member::start(dir, &name, members.first(), drain_timeout).await;
        members.push(member);
    }
    eventually("the cluster to converge", || async {
        let mut statuses = Vec::new();
        for member in &members {
            statuses.push(member.admin("/admin/status").await);
        }
        statuses.iter().all(|s| {
            s["members"]
                .as_array()
                .is_some_and(|m| m.len() == n && m.iter().all(|m| m["state"] == "up"))
                && s["ring_epoch"] == statuses[0]["ring_epoch"]
                && !s["leader"].is_null()
                && s["leader"] == statuses[0]["leader"]
        })
    })
    .await;
    members
}

fn client_config(member: &Member, user: &str) -> ClientConfig {
    let mut config = ClientConfig::new(member.ws_url(), token(user));
    config.reconnect = ReconnectPolicy::disabled();
    config
}

async fn connect(member: &Member, user: &str) -> Client {
    Client::connect(client_config(member, user))
        .await
        .unwrap_or_else(|e| panic!("{user} cannot connect to {}: {e}", member.name))
}

/// Comments in `rooms` through `member` until the node stops answering, counting refused
/// comments in `refused`: a survivor keeps activating rooms (claims through Raft) while its
/// peers die and it stops.
fn keep_commenting(member: &Member, user: &str, rooms: Vec<String>, refused: Arc<AtomicU64>) {
    let mut config = client_config(member, user);
    // A survivor left without a quorum is cut off and closes its connections (4401): the
    // writer comes back (to the same node, its only one) and goes on writing.
    config.reconnect = ReconnectPolicy {
        enabled: true,
        initial_backoff_ms: 50,
        max_backoff_ms: 500,
        attempts_max: 100,
    };
    tokio::spawn(async move {
        let Ok(client) = Client::connect(config).await else {
            return;
        };
        for room in &rooms {
            // Errors are expected here (nodes are dying): only the load matters.
            let request = client.request(RoomRef {
                room_id: room.clone(),
            });
            let _ = tokio::time::timeout(Duration::from_secs(2), request).await;
        }
        for i in 0usize.. {
            let room = &rooms[i % rooms.len()];
            let request = client.request(RoomCommentRequest {
                room_id: room.clone(),
                text: format!("busy {i}"),
                request_id: None,
            });
            match tokio::time::timeout(Duration::from_secs(2), request).await {
                Ok(Err(chorus_node::client::ClientError::Closed { .. })) => return,
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

/// The scenario: the room's owner is SIGKILLed, then the Raft leader, then the
/// rest get SIGTERM while clients keep writing. Every survivor exits within the drain
/// deadline plus 5 s, with status 0 or 3.
/// SIGKILLs the member with node id `id`; `ids[i]` is `members[i]`'s id.
async fn kill_member(members: &mut Vec<Member>, ids: &mut Vec<u64>, id: u64) {
    let at = ids
        .iter()
        .position(|member| *member == id)
        .unwrap_or_else(|| panic!("node {id} is a member"));
    ids.remove(at);
    members.remove(at).kill().await;
}

async fn survivors_stop_in_time(n: usize) {
    let temp = tempfile::tempdir().expect("tempdir");
    let mut members = cluster(temp.path(), n, "5s").await;

    // A few rooms with traffic, made through the first member.
    let host = connect(&members[0], "host").await;
    let mut rooms = Vec::new();
    for i in 0..4 {
        let room = create_room(&host, &format!("stopping {i}")).await;
        join(&host, &room).await;
        say(&host, &room, "hello").await;
        rooms.push(room);
    }
    let owner = members[0]
        .admin(&format!("/admin/where?key={}", rooms[0]))
        .await["owner"]
        .as_u64()
        .expect("the room has an owner");
    let refused = Arc::new(AtomicU64::new(0));
    for (i, member) in members.iter().enumerate() {
        keep_commenting(
            member,
            &format!("writer{i}"),
            rooms.clone(),
            refused.clone(),
        );
    }
    drop(host);

    // SIGKILL the room's owner.
    let mut ids = Vec::new();
    for member in &members {
        ids.push(member.id().await);
    }
    kill_member(&mut members, &mut ids, owner).await;
    // The owner is marked down and its rooms move to the survivors (with claims in Raft).
    eventually(
        "the killed owner to be down and its room to move",
        || async {
            let status = members[0].admin("/admin/status").await;
            let down = status["members"].as_array().is_some_and(|m| {
                m.iter()
                    .any(|m| m["id"].as_u64() == Some(owner) && m["state"] == "down")
            });
            let moved = members[0]
                .admin(&format!("/admin/where?key={}", rooms[0]))
                .await["owner"]
                .as_u64()
                .is_some_and(|o| ids.contains(&o));
            down && moved
        },
    )
    .await;

    // SIGKILL the Raft leader (a new one, if the owner led).
    let deadline = Instant::now() + DEADLINE;
    let leader = loop {
        let mut seen = Vec::new();
        for member in &members {
            seen.push(member.admin("/admin/status").await["leader"].as_u64());
        }
        if let Some(leader) = seen[0].filter(|l| ids.contains(l)) {
            if seen.iter().all(|s| *s == Some(leader)) {
                break leader;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out: a live leader that the survivors agree on ({seen:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    kill_member(&mut members, &mut ids, leader).await;
    // The writers run into the lost quorum (a comment whose replica is gone stops its room;
    // the next one re-activates it, which claims the room through Raft and waits).
    let before = refused.load(Ordering::Relaxed);
    eventually("comments to be refused without a quorum", || async {
        refused.load(Ordering::Relaxed) >= before + 3
    })
    .await;

    // SIGTERM the rest, at once.
    for member in &members {
        member.signal("TERM").await;
    }
    let limit = DRAIN_TIMEOUT + EXIT_SLACK;
    for member in &mut members {
        let (status, took) = member.exit_within(limit, "after SIGTERM").await;
        eprintln!("{} exited with {status} after {took:?}", member.name);
        let code = status
            .code()
            .unwrap_or_else(|| panic!("killed by a signal: {status}"));
        assert!(
            code == 0 || code == EXIT_DRAIN_INCOMPLETE,
            "{} exit status {code}",
            member.name
        );
        if code == EXIT_DRAIN_INCOMPLETE {
            assert!(
                member.logged("drain deadline of 5s passed; stopping anyway")
                    || member.logged("drain did not complete"),
                "{} says why its drain did not complete",
                member.name
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_owner_and_the_leader_are_killed_the_survivor_stops_within_the_drain_deadline() {
    survivors_stop_in_time(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_owner_and_the_leader_are_killed_both_survivors_stop_within_the_drain_deadline() {
    survivors_stop_in_time(4).await;
}

/// A node whose drain cannot finish (its only peer is dead: no quorum to drain through)
/// gets `first`, starts draining, then `second`: it stops at once, with status 3.
async fn second_signal_stops_at_once(first: &str, second: &str) {
    let temp = tempfile::tempdir().expect("tempdir");
    // A deadline far beyond the test's: only the second signal can explain a quick exit.
    let mut members = cluster(temp.path(), 2, "120s").await;
    members.pop().expect("two members").kill().await;
    let mut node = members.pop().expect("two members");
    node.signal(first).await;
    eventually("the node to start draining", || async {
        node.logged("signal received: draining")
    })
    .await;
    let sent = Instant::now();
    node.signal(second).await;
    let (status, _) = node
        .exit_within(STOP_NOW_MAX, &format!("after SIG{first} then SIG{second}"))
        .await;
    eprintln!(
        "SIG{first} then SIG{second}: exited with {status} {:?} after the second",
        sent.elapsed()
    );
    assert_eq!(status.code(), Some(EXIT_DRAIN_INCOMPLETE), "{status}");
    assert!(node.logged("second signal: stopping now"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_during_the_drain_stops_the_node_at_once() {
    second_signal_stops_at_once("TERM", "TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigint_during_the_drain_stops_the_node_at_once() {
    second_signal_stops_at_once("TERM", "INT").await;
}

#[tokio::test]
async fn a_lone_node_drains_at_once_and_exits_zero_on_sigterm() {
    let node = TestNode::start(&["--drain-timeout", "5s"]).await;
    let client = node.client(&node.ws_url(), "host").await;
    let room = create_room(&client, "alone").await;
    join(&client, &room).await;
    say(&client, &room, "hello").await;
    let started = Instant::now();
    let status = node.terminate().await;
    eprintln!(
        "lone node exited with {status} after {:?}",
        started.elapsed()
    );
    assert!(status.success(), "a lone node's drain completes: {status}");
    assert!(
        started.elapsed() < DRAIN_TIMEOUT,
        "it did not wait for the deadline"
    );
}
