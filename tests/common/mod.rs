//! Shared helpers for system tests: start real `chorus` node processes on loopback, make
//! clients, poll with deadlines.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use chorus_node::client::{Client, ClientConfig, ClientEvent, ReconnectPolicy};
use chorus_node::token::{unix_now_secs, TokenKeys};
use chorus_protocol::{Event, RoomCommentRequest, RoomCreateRequest, RoomRef};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// The development secret nodes use when started without one.
pub const SECRET: &str = "chorus-dev-secret";
/// The development admin token nodes use when started without one.
pub const ADMIN_TOKEN: &str = "chorus-dev-admin";

/// Default deadline for anything a test waits for. Generous: CI machines are busy.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A `chorus serve` process with its own data dir and OS-assigned ports.
pub struct TestNode {
    child: Child,
    /// Bound HTTP address.
    pub http: SocketAddr,
    /// Bound QUIC address.
    pub quic: SocketAddr,
    /// Inter-node address (as bound; see `advertised`).
    pub cluster: SocketAddr,
    /// The admin HTTP address, when started with `--admin-addr`.
    pub admin_http: Option<SocketAddr>,
    data_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl TestNode {
    /// Starts a node with extra `serve` flags.
    pub async fn start(extra: &[&str]) -> TestNode {
        let temp = tempfile::tempdir().expect("tempdir");
        let data_dir = temp.path().join("data");
        let mut node = Self::start_in(&data_dir, extra).await;
        node._temp = Some(temp);
        node
    }

    /// Starts a node on an existing data dir (for restart tests).
    pub async fn start_in(data_dir: &Path, extra: &[&str]) -> TestNode {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chorus"))
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(
                [
                    ("--http-addr", "127.0.0.1:0"),
                    ("--quic-addr", "127.0.0.1:0"),
                    ("--cluster-addr", "127.0.0.1:0"),
                ]
                .into_iter()
                // `extra` may bind an address itself.
                .filter(|(flag, _)| !extra.contains(flag))
                .flat_map(|(flag, addr)| [flag, addr]),
            )
            // Tests create many rooms as one host; tests of these bounds set them.
            .args(
                [
                    ("--room-creates-per-min", "100000"),
                    ("--room-creates-burst", "100000"),
                    ("--open-rooms-per-user-max", "100000"),
                ]
                .into_iter()
                .filter(|(flag, _)| !extra.contains(flag))
                .flat_map(|(flag, value)| [flag, value]),
            )
            .args(extra)
            .env(
                "CHORUS_LOG",
                std::env::var("CHORUS_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn chorus serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .expect("node did not report its addresses in time")
            .expect("read node stdout")
            .expect("node exited before serving");
        let ready: serde_json::Value = serde_json::from_str(&line).expect("ready line is JSON");
        let http = ready["http_addr"]
            .as_str()
            .expect("http_addr")
            .parse()
            .expect("addr");
        let quic = ready["quic_addr"]
            .as_str()
            .expect("quic_addr")
            .parse()
            .expect("addr");
        let cluster = ready["cluster_addr"]
            .as_str()
            .expect("cluster_addr")
            .parse()
            .expect("addr");
        let admin_http = ready["admin_addr"]
            .as_str()
            .map(|addr| addr.parse().expect("admin addr"));
        // Keep draining stdout so the node never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        TestNode {
            child,
            http,
            quic,
            cluster,
            admin_http,
            data_dir: data_dir.to_path_buf(),
            _temp: None,
        }
    }

    /// The node's process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the node is running")
    }

    /// The node process's resident memory, in bytes (`VmRSS` in `/proc/PID/status`).
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmRSS in /proc/PID/status")
            * 1024
    }

    /// `ws://…/ws`
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.http)
    }

    /// `quic://…`
    pub fn quic_url(&self) -> String {
        format!("quic://{}", self.quic)
    }

    /// The CA clients trust for QUIC.
    pub fn ca_path(&self) -> PathBuf {
        self.data_dir.join("ca.pem")
    }

    /// The data dir.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// A client config for `url` as `user`, without reconnects.
    pub fn config(&self, url: &str, user: &str) -> ClientConfig {
        let mut config = ClientConfig::new(url, token(user));
        config.ca_path = Some(self.ca_path());
        config.reconnect = ReconnectPolicy::disabled();
        config
    }

    /// A connected, authenticated client.
    pub async fn client(&self, url: &str, user: &str) -> Client {
        Client::connect(self.config(url, user))
            .await
            .unwrap_or_else(|e| panic!("{user} cannot connect to {url}: {e}"))
    }

    /// GET a path on the HTTP port; returns the body.
    pub async fn http_get(&self, path: &str) -> String {
        self.http_get_with(path, "").await
    }

    /// GET an admin path with the development admin token; returns the JSON body.
    pub async fn admin(&self, path: &str) -> serde_json::Value {
        let body = self
            .http_get_with(path, &format!("Authorization: Bearer {ADMIN_TOKEN}\r\n"))
            .await;
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("admin {path}: {e}: {body}"))
    }

    async fn http_get_with(&self, path: &str, headers: &str) -> String {
        // With `--admin-addr`, admin and metrics are served only there.
        let addr = match self.admin_http {
            Some(admin) if path.starts_with("/admin/") || path == "/metrics" => admin,
            _ => self.http,
        };
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect http");
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or_default()
    }

    /// The value of a metric line (first sample whose line starts with `prefix`).
    pub async fn metric(&self, prefix: &str) -> Option<f64> {
        let body = self.http_get("/metrics").await;
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("pid");
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("node did not exit after SIGTERM")
            .expect("wait")
    }

    /// SIGKILL.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

/// GET `path` on `addr` with the development admin token: (status, body), or `None` if
/// nothing answers within 5 s (a node starting, stopped or paused).
pub async fn try_http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some((status, body.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
}

/// Reads a CLI's JSON output lines until one that `pick` accepts and returns it; panics
/// naming `what` if the output ends first or the deadline passes.
pub async fn expect_line<R>(
    lines: &mut tokio::io::Lines<R>,
    what: &str,
    pick: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value
where
    R: tokio::io::AsyncBufRead + Unpin,
{
    tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            let value: serde_json::Value = serde_json::from_str(&line).expect("every line is JSON");
            if pick(&value) {
                return value;
            }
        }
        panic!("the output ended without {what}");
    })
    .await
    .unwrap_or_else(|_| panic!("{what} was not printed in time"))
}

/// Runs `chorus admin --url http://NODE ARGS…`: (success, stdout, stderr).
pub async fn admin_cli(node: &TestNode, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["admin", "--url", &format!("http://{}", node.http)])
        .args(args)
        .output()
        .await
        .expect("run chorus admin");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A development token for `user`.
pub fn token(user: &str) -> String {
    TokenKeys::new(SECRET.as_bytes())
        .mint(user, &[], unix_now_secs(), 3600)
        .expect("mint")
}

/// Waits for the next notification that `pick` accepts, skipping others; panics with
/// `what` at the deadline or if the client closes.
pub async fn expect_event<T>(
    client: &mut Client,
    what: &str,
    mut pick: impl FnMut(&Event) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let event = tokio::time::timeout_at(deadline, client.next_event())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
        match event {
            Some(ClientEvent::Notification { event, .. }) => {
                if let Some(found) = pick(&event) {
                    return found;
                }
            }
            Some(ClientEvent::Closed { code, reason })
            | Some(ClientEvent::Disconnected { code, reason }) => {
                panic!("connection closed ({code:?}: {reason}) while waiting for {what}")
            }
            Some(_) => {}
            None => panic!("client ended while waiting for {what}"),
        }
    }
}

/// Collects comment texts until `count` have arrived.
pub async fn collect_comments(
    client: &mut Client,
    room_id: &str,
    count: usize,
) -> Vec<(u64, String)> {
    let mut comments = Vec::with_capacity(count);
    while comments.len() < count {
        let found = expect_event(
            client,
            &format!("comment {} of {count}", comments.len() + 1),
            |event| match event {
                Event::Comment(c) if c.room_id == room_id => Some((c.comment_id, c.text.clone())),
                _ => None,
            },
        )
        .await;
        comments.push(found);
    }
    comments
}

/// Polls `check` until it returns true or the deadline passes.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out: {what}");
}

/// Creates a room; returns its id.
pub async fn create_room(client: &Client, title: &str) -> String {
    client
        .request(RoomCreateRequest {
            title: title.into(),
            scheduled_start_ms: None,
        })
        .await
        .expect("create room")
        .room_id
}

/// Creates a room scheduled to start at `starts_at_ms`; returns its id.
pub async fn create_scheduled_room(client: &Client, title: &str, starts_at_ms: u64) -> String {
    client
        .request(RoomCreateRequest {
            title: title.into(),
            scheduled_start_ms: Some(starts_at_ms),
        })
        .await
        .expect("create a scheduled room")
        .room_id
}

/// Joins a room.
pub async fn join(client: &Client, room_id: &str) {
    client
        .request(RoomRef {
            room_id: room_id.into(),
        })
        .await
        .expect("join room");
}

/// Comments; returns the comment id.
pub async fn say(client: &Client, room_id: &str, text: &str) -> u64 {
    client
        .request(RoomCommentRequest {
            room_id: room_id.into(),
            text: text.into(),
            request_id: None,
        })
        .await
        .expect("comment")
        .comment_id
}

/// Reads raw frames until a response with `seq` arrives; returns its result.
pub async fn raw_response(
    conn: &mut chorus_node::client::Connection,
    seq: u64,
) -> Result<chorus_protocol::Body, chorus_protocol::ErrorBody> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let frame = tokio::time::timeout_at(deadline, conn.recv())
            .await
            .unwrap_or_else(|_| panic!("no response to seq {seq}"))
            .expect("connection alive");
        if let chorus_protocol::Frame::Response(response) = frame {
            if response.seq == seq {
                return response.result;
            }
        }
    }
}

/// Reads until the server closes the connection; returns the close code.
pub async fn close_code(conn: &mut chorus_node::client::Connection, when: &str) -> Option<u16> {
    tokio::time::timeout(DEADLINE, async {
        loop {
            if let Err(chorus_node::client::ClientError::Closed { code, .. }) = conn.recv().await {
                return code;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("connection not closed {when}"))
}

/// Three members (b and c join through a), converged: 3 up, one leader, one ring epoch.
pub async fn three_node_cluster(dir: &Path) -> [TestNode; 3] {
    three_node_cluster_with(dir, &[]).await
}

/// [`three_node_cluster`] with `extra` flags for every node.
pub async fn three_node_cluster_with(dir: &Path, extra: &[&str]) -> [TestNode; 3] {
    let a = start_member_with(dir, "a", None, extra).await;
    let b = start_member_with(dir, "b", Some(&a), extra).await;
    let c = start_member_with(dir, "c", Some(&a), extra).await;
    let nodes = [a, b, c];
    wait_converged(&nodes).await;
    nodes
}

/// Waits until every one of `nodes` sees them all `up`, one ring epoch and a leader.
pub async fn wait_converged(nodes: &[TestNode]) {
    eventually("the cluster to converge", || async {
        let mut statuses = Vec::new();
        for node in nodes {
            statuses.push(node.admin("/admin/status").await);
        }
        statuses.iter().all(|s| {
            s["members"]
                .as_array()
                .is_some_and(|m| m.len() == nodes.len() && m.iter().all(|m| m["state"] == "up"))
                && s["ring_epoch"] == statuses[0]["ring_epoch"]
                && !s["leader"].is_null()
        })
    })
    .await;
}

/// Node arguments that lift the per-connection request limits.
pub const UNTHROTTLED: &[&str] = &["--requests-per-sec", "100000", "--requests-burst", "100000"];

/// Starts member `name` under `dir` with the shared CA, joining through `join`.
pub async fn start_member(dir: &Path, name: &str, join: Option<&TestNode>) -> TestNode {
    start_member_with(dir, name, join, &[]).await
}

/// [`start_member`] with `extra` flags.
pub async fn start_member_with(
    dir: &Path,
    name: &str,
    join: Option<&TestNode>,
    extra: &[&str],
) -> TestNode {
    let ca = dir.join("ca");
    let ca = ca.to_str().expect("utf8 path");
    let mut args = vec!["--ca", ca, "--node-name", name];
    args.extend_from_slice(UNTHROTTLED);
    let seed;
    if let Some(seed_node) = join {
        seed = seed_node.cluster.to_string();
        args.extend(["--join", seed.as_str()]);
    }
    args.extend_from_slice(extra);
    TestNode::start_in(&dir.join(name), &args).await
}
