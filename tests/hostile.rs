//! Hostile clients against a real node (`../shared/SPEC.md` S3, S4): connections that
//! stall before `auth` with most of a large message sent, HTTP heads trickled a byte at a
//! time, one user opening session after session, a room-creation flood. Each probe runs
//! beside a well-behaved client and checks that it is unaffected and that the node's
//! memory stays within its budget.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use chorus_protocol::{ErrorCode, RoomCommentRequest, RoomCreateRequest, RoomEndRequest};
use common::{create_room, eventually, join, TestNode, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connections in each stall probe.
const STALLED: usize = 300;
/// How much each stalled connection declares, and how much of it it sends.
const DECLARED_BYTES: usize = 1_000_000;
const SENT_BYTES: usize = 960_000;
/// RSS the stalled connections may add (Done-when of issue 12).
const STALL_RSS_GROWTH_MAX: u64 = 32 * 1024 * 1024;

/// A user who comments every 200 ms in their own room while a probe runs; counts what
/// failed.
struct Bystander {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<(u32, u32)>,
}

impl Bystander {
    async fn start(node: &TestNode) -> Bystander {
        let client = node.client(&node.ws_url(), "bystander").await;
        let room = create_room(&client, "bystander's room").await;
        join(&client, &room).await;
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, 0u32);
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            while !token.is_cancelled() {
                tick.tick().await;
                let sent = client
                    .request(RoomCommentRequest {
                        room_id: room.clone(),
                        text: format!("still here {ok}"),
                        request_id: None,
                    })
                    .await;
                match sent {
                    Ok(_) => ok += 1,
                    Err(error) => {
                        eprintln!("bystander: {error}");
                        failed += 1;
                    }
                }
            }
            (ok, failed)
        });
        Bystander { stop, task }
    }

    /// Stops; asserts every comment went through.
    async fn finish(self) {
        self.stop.cancel();
        let (ok, failed) = self.task.await.expect("bystander task");
        assert_eq!(failed, 0, "the well-behaved client saw errors ({ok} ok)");
        assert!(ok > 0, "the well-behaved client commented");
    }
}

/// The node's RSS once it settled: the lowest of a few samples.
async fn settled_rss(node: &TestNode) -> u64 {
    let mut lowest = u64::MAX;
    for _ in 0..10 {
        lowest = lowest.min(node.rss_bytes());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lowest
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Waits until RSS is back within 10 % of `baseline`; returns the RSS seen.
async fn rss_returns(node: &TestNode, baseline: u64) -> u64 {
    let limit = baseline + baseline / 10;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let rss = node.rss_bytes();
        if rss <= limit {
            return rss;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "RSS stayed at {:.1} MiB after the connections closed (baseline {:.1} MiB)",
            mib(rss),
            mib(baseline)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A node started with `toml` as its config file (read at start-up, before the node
/// reports its addresses, so the file need not outlive this call).
async fn start_with_config(toml: impl AsRef<str>) -> TestNode {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("chorus.toml");
    std::fs::write(&config, toml.as_ref()).expect("config");
    TestNode::start(&["--config", config.to_str().expect("utf-8")]).await
}

/// The verdict on a node-budget probe: the expected share of the connections was
/// refused, and memory stayed bounded.
fn assert_budget_held(
    transport: &str,
    connections: usize,
    refused: usize,
    baseline: u64,
    held: u64,
) {
    eprintln!(
        "node budget, {transport}: {connections} authenticated connections each sending {SENT_BYTES} of a {DECLARED_BYTES}-byte message: {refused} closed with 4401; RSS {:.1} → {:.1} MiB",
        mib(baseline),
        mib(held)
    );
    assert!(
        (connections - 5..connections).contains(&refused),
        "with a 4 MiB budget about four hold their message and the rest are refused ({refused} refused)"
    );
    assert!(
        held.saturating_sub(baseline) <= 16 * 1024 * 1024,
        "RSS grew by {:.1} MiB",
        mib(held.saturating_sub(baseline))
    );
}

/// A WebSocket upgrade on a raw TCP stream; returns the stream after the 101 response.
async fn ws_upgrade(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
                   Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                   Sec-WebSocket-Version: 13\r\n\r\n";
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.expect("read the 101");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "upgrade refused: {}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// A masked client frame header for `opcode` declaring `length` payload bytes (mask key
/// zero, so the payload goes as is).
fn ws_header(opcode: u8, length: usize) -> Vec<u8> {
    let mut header = vec![0x80 | opcode];
    match length {
        0..=125 => header.push(0x80 | length as u8),
        126..=65_535 => {
            header.push(0x80 | 126);
            header.extend_from_slice(&(length as u16).to_be_bytes());
        }
        _ => {
            header.push(0x80 | 127);
            header.extend_from_slice(&(length as u64).to_be_bytes());
        }
    }
    header.extend_from_slice(&[0, 0, 0, 0]);
    header
}

/// Writes `bytes` in 64 KiB pieces until done, an error, or a piece blocks for 2 s
/// (the node stopped reading); how many were written.
async fn write_until_stalled(stream: &mut (impl AsyncWriteExt + Unpin), bytes: usize) -> usize {
    let chunk = vec![b'x'; 64 * 1024];
    let mut written = 0;
    while written < bytes {
        let n = chunk.len().min(bytes - written);
        match tokio::time::timeout(Duration::from_secs(2), stream.write_all(&chunk[..n])).await {
            Ok(Ok(())) => written += n,
            _ => break,
        }
    }
    written
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_preauth_websocket_messages_hold_little_memory_and_it_returns() {
    let node = TestNode::start(&[]).await;
    let bystander = Bystander::start(&node).await;
    let baseline = settled_rss(&node).await;

    let mut streams = Vec::with_capacity(STALLED);
    let mut accepted_bytes = 0usize;
    for _ in 0..STALLED {
        let mut stream = ws_upgrade(node.http).await;
        stream
            .write_all(&ws_header(0x2, DECLARED_BYTES))
            .await
            .expect("header");
        accepted_bytes += write_until_stalled(&mut stream, SENT_BYTES).await;
        streams.push(stream);
    }
    let held = settled_rss(&node).await;
    let growth = held.saturating_sub(baseline);
    eprintln!(
        "websocket: {STALLED} stalled pre-auth connections (clients wrote {:.1} MiB): RSS {:.1} → {:.1} MiB (+{:.1} MiB)",
        mib(accepted_bytes as u64),
        mib(baseline),
        mib(held),
        mib(growth)
    );
    assert!(
        growth <= STALL_RSS_GROWTH_MAX,
        "stalled connections grew RSS by {:.1} MiB",
        mib(growth)
    );
    // Every one of them was closed by the node: a read sees the close frame, then EOF.
    for stream in &mut streams {
        let mut buf = vec![0u8; 256];
        let closed = tokio::time::timeout(DEADLINE, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a stalled connection was not closed");
    }
    drop(streams);
    let after = rss_returns(&node, baseline).await;
    eprintln!("websocket: after closing: {:.1} MiB", mib(after));
    bystander.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_preauth_quic_messages_hold_little_memory_and_it_returns() {
    let node = TestNode::start(&[]).await;
    let bystander = Bystander::start(&node).await;
    let config = chorus_node::client::quic_client_config(&node.ca_path(), 30_000).expect("config");
    let mut endpoint = chorus_node::client::client_endpoint(node.quic).expect("endpoint");
    endpoint.set_default_client_config(config);
    // The first burst leaves about 40 KB a connection with the allocator (fragmented
    // pages it reuses for the next burst: bursts after it do not add to it), so the
    // return is measured on the second, from the RSS after the first.
    for round in ["first", "second"] {
        let baseline = settled_rss(&node).await;
        let mut held_connections = Vec::with_capacity(STALLED);
        let mut accepted_bytes = 0usize;
        let mut refused_at_once = 0usize;
        for i in 0..STALLED {
            let connection = endpoint
                .connect(node.quic, "localhost")
                .expect("connect")
                .await
                .expect("handshake");
            let (mut send, recv) = connection.open_bi().await.expect("stream");
            // Half declare the whole message (refused at the length prefix), half
            // declare just under the pre-auth limit and stall with half of it sent.
            let declared = if i % 2 == 0 { DECLARED_BYTES } else { 8_000 };
            send.write_all(&(declared as u32).to_be_bytes())
                .await
                .expect("length");
            accepted_bytes += write_until_stalled(&mut send, declared.min(SENT_BYTES) / 2).await;
            if connection.close_reason().is_some() {
                refused_at_once += 1;
            }
            held_connections.push((connection, send, recv));
        }
        let held = settled_rss(&node).await;
        let growth = held.saturating_sub(baseline);
        eprintln!(
            "quic, {round} burst: {STALLED} stalled pre-auth connections (clients wrote {:.1} MiB, {refused_at_once} closed at once): RSS {:.1} → {:.1} MiB (+{:.1} MiB)",
            mib(accepted_bytes as u64),
            mib(baseline),
            mib(held),
            mib(growth)
        );
        assert!(
            growth <= STALL_RSS_GROWTH_MAX,
            "stalled QUIC connections grew RSS by {:.1} MiB",
            mib(growth)
        );
        for (connection, _, _) in &held_connections {
            connection.close(0u32.into(), b"done");
        }
        drop(held_connections);
        endpoint.wait_idle().await;
        eventually("the node closed every QUIC connection", || async {
            node.metric("chorus_connections{transport=\"quic\"}").await == Some(0.0)
        })
        .await;
        if round == "second" {
            let after = rss_returns(&node, baseline).await;
            eprintln!("quic: after closing: {:.1} MiB", mib(after));
        }
    }
    bystander.finish().await;
}

/// Reads until EOF or an error; whether that happened before `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 512];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Opens `count` connections that send the start of an HTTP head and no more.
async fn start_trickles(addr: SocketAddr, count: usize) -> Vec<TcpStream> {
    let mut tricklers = Vec::with_capacity(count);
    for _ in 0..count {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        tricklers.push(stream);
    }
    tricklers
}

#[tokio::test]
async fn unfinished_http_heads_count_against_the_connection_limit() {
    const TRICKLERS: usize = 40;
    // A long head deadline: the node stays full for as long as the test holds them.
    let node =
        start_with_config("[limits]\nhttp_header_timeout_ms = 120000\nconnections_max = 41\n")
            .await;
    let bystander = Bystander::start(&node).await;
    let tricklers = start_trickles(node.http, TRICKLERS).await;
    // The bystander and the tricklers fill the node: a newcomer is refused with 503.
    eventually("a newcomer is refused while the node is full", || async {
        matches!(
            common::try_http_get(node.http, "/healthz").await,
            Some((503, _))
        )
    })
    .await;
    drop(tricklers);
    eventually("a newcomer is served again", || async {
        matches!(
            common::try_http_get(node.http, "/healthz").await,
            Some((200, _))
        )
    })
    .await;
    let client = node.client(&node.ws_url(), "newcomer").await;
    create_room(&client, "after the trickle").await;
    bystander.finish().await;
}

#[tokio::test]
async fn trickled_http_heads_are_closed_at_the_deadline() {
    const TRICKLERS: usize = 40;
    let node = start_with_config("[limits]\nhttp_header_timeout_ms = 2000\n").await;
    let bystander = Bystander::start(&node).await;
    let started = tokio::time::Instant::now();
    let mut tricklers = start_trickles(node.http, TRICKLERS).await;
    // They keep sending a header byte at a time; the node closes them anyway once the
    // head is 2 s late.
    let mut closed = 0;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while closed < tricklers.len() && tokio::time::Instant::now() < deadline {
        closed = 0;
        for stream in &mut tricklers {
            if stream.write_all(b"X").await.is_err()
                || closed_within(stream, Duration::from_millis(1)).await
            {
                closed += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let took = started.elapsed();
    assert_eq!(closed, TRICKLERS, "every trickling connection was closed");
    assert!(
        took >= Duration::from_millis(1_900),
        "closed after {took:?}, before the 2 s deadline"
    );
    eprintln!("header trickle: {TRICKLERS} connections closed {took:?} after they started");
    bystander.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_user_cannot_hold_more_sessions_than_its_bound_while_others_sign_in() {
    // The probe: one token opens 1,000 sessions on a node with room for 1,000 and drops
    // them without a goodbye (so they stay resumable for the resume window).
    const FLOOD: usize = 1_000;
    const BOUND: usize = 16;
    let node = start_with_config(format!("[limits]\nsessions_max = {FLOOD}\n")).await;
    let bystander = Bystander::start(&node).await;
    let mut signed_in_meanwhile = 0;
    for i in 0..FLOOD {
        let mut stream = ws_upgrade(node.http).await;
        ws_auth(&mut stream, "mallory").await;
        drop(stream);
        if i % 100 == 99 {
            // Others sign in as ever.
            let alice = node.client(&node.ws_url(), &format!("alice-{i}")).await;
            drop(alice);
            signed_in_meanwhile += 1;
        }
    }
    let sessions = node.metric("chorus_sessions ").await.unwrap_or(0.0) as usize;
    eprintln!(
        "session flood: {FLOOD} sessions opened by one user; the node holds {sessions}; {signed_in_meanwhile} others signed in meanwhile"
    );
    // mallory's 16, the bystander, and the ten alices (resumable for a minute).
    assert!(
        sessions <= BOUND + 1 + 10,
        "the node holds {sessions} sessions"
    );
    node.client(&node.ws_url(), "bob").await;

    // With all of them connected, a further session is refused with too_many_sessions.
    let mut connected = Vec::new();
    for _ in 0..BOUND {
        connected.push(node.client(&node.ws_url(), "mallory").await);
    }
    let Err(refused) =
        chorus_node::client::Client::connect(node.config(&node.ws_url(), "mallory")).await
    else {
        panic!("a 17th connected session is refused");
    };
    assert_eq!(
        refused.error_code(),
        Some(ErrorCode::TooManySessions),
        "refused with {refused}"
    );
    // Another user still signs in.
    node.client(&node.ws_url(), "carol").await;
    bystander.finish().await;
}

#[tokio::test]
async fn a_room_creation_flood_gets_the_documented_refusals_with_memory_bounded() {
    let node = TestNode::start(&[
        "--room-creates-per-min",
        "20",
        "--room-creates-burst",
        "10",
        "--open-rooms-per-user-max",
        "20",
    ])
    .await;
    let bystander = Bystander::start(&node).await;
    let baseline = settled_rss(&node).await;
    let url = node.ws_url();
    let mut flooders = Vec::new();
    for _ in 0..5 {
        flooders.push(node.client(&url, "flooder").await);
    }
    let (mut created, mut rate_limited, mut other) = (Vec::new(), 0, Vec::new());
    for i in 0..1_000 {
        let result = flooders[i % flooders.len()]
            .request(RoomCreateRequest {
                title: format!("flood {i}"),
                scheduled_start_ms: None,
            })
            .await;
        match result {
            Ok(room) => created.push(room.room_id),
            Err(error) if error.error_code() == Some(ErrorCode::RateLimited) => rate_limited += 1,
            Err(error) => other.push(error.to_string()),
        }
    }
    eprintln!(
        "room flood: 1000 attempts: {} created, {rate_limited} rate_limited, others: {:?}",
        created.len(),
        other.first()
    );
    assert_eq!(created.len(), 10, "the burst of 10, then the rate");
    assert_eq!(rate_limited, 990);
    assert!(other.is_empty());

    // The open-room bound: at 20 open rooms the next gets quota_exceeded (its own
    // clock-free check: a user with room in the rate but not in the quota).
    let quota_node = TestNode::start(&["--open-rooms-per-user-max", "3"]).await;
    let host = quota_node.client(&quota_node.ws_url(), "host").await;
    let mut open = Vec::new();
    for i in 0..3 {
        open.push(create_room(&host, &format!("open {i}")).await);
    }
    let refused = host
        .request(RoomCreateRequest {
            title: "one too many".into(),
            scheduled_start_ms: None,
        })
        .await
        .expect_err("a fourth open room is refused");
    assert_eq!(
        refused.error_code(),
        Some(ErrorCode::QuotaExceeded),
        "{refused}"
    );
    host.request(RoomEndRequest {
        room_id: open[0].clone(),
    })
    .await
    .expect("end a room");
    eventually("an ended room frees its place", || async {
        host.request(RoomCreateRequest {
            title: "after ending one".into(),
            scheduled_start_ms: None,
        })
        .await
        .is_ok()
    })
    .await;

    let after = settled_rss(&node).await;
    eprintln!(
        "room flood: RSS {:.1} → {:.1} MiB",
        mib(baseline),
        mib(after)
    );
    assert!(
        after.saturating_sub(baseline) <= 16 * 1024 * 1024,
        "the flood grew RSS by {:.1} MiB",
        mib(after.saturating_sub(baseline))
    );
    bystander.finish().await;
}

#[tokio::test]
async fn invalid_utf8_in_a_text_message_closes_with_1007() {
    let node = TestNode::start(&[]).await;
    let mut stream = ws_upgrade(node.http).await;
    let mut frame = ws_header(0x1, 2);
    frame.extend_from_slice(&[0xff, 0xfe]);
    stream.write_all(&frame).await.expect("write");
    let mut head = [0u8; 4];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut head))
        .await
        .expect("a close frame in time")
        .expect("read");
    assert_eq!(head[0], 0x88, "a close frame");
    assert_eq!(u16::from_be_bytes([head[2], head[3]]), 1007);
}

#[tokio::test]
async fn admin_and_metrics_can_have_their_own_listener() {
    let node = TestNode::start(&["--admin-addr", "127.0.0.1:0"]).await;
    let admin = node.admin_http.expect("the node reports its admin address");
    for path in ["/metrics", "/admin/status"] {
        let (status, _) = common::try_http_get(node.http, path)
            .await
            .expect("http answers");
        assert_eq!(status, 404, "{path} is not on the public port");
    }
    let (status, _) = common::try_http_get(admin, "/metrics")
        .await
        .expect("admin");
    assert_eq!(status, 200);
    let (status, _) = common::try_http_get(admin, "/ws").await.expect("admin");
    assert_eq!(status, 404, "clients are not served on the admin port");
    for addr in [node.http, admin] {
        let (status, _) = common::try_http_get(addr, "/healthz")
            .await
            .expect("health");
        assert_eq!(status, 200);
    }
    assert!(node.admin("/admin/status").await.is_object());
    let client = node.client(&node.ws_url(), "alice").await;
    create_room(&client, "served").await;
}

#[tokio::test]
async fn a_room_no_one_is_in_is_released_and_comes_back_with_its_history() {
    let node = start_with_config("[limits]\nroom_idle_release_ms = 1000\n").await;
    let host = node.client(&node.ws_url(), "host").await;
    let mut rooms = Vec::new();
    for i in 0..5 {
        rooms.push(create_room(&host, &format!("left empty {i}")).await);
    }
    // One room is used, then left.
    join(&host, &rooms[0]).await;
    common::say(&host, &rooms[0], "before the release").await;
    host.request(chorus_protocol::RoomLeaveRequest {
        room_id: rooms[0].clone(),
    })
    .await
    .expect("leave");
    // A room someone is in stays.
    let stayer = node.client(&node.ws_url(), "stayer").await;
    let kept = create_room(&stayer, "occupied").await;
    join(&stayer, &kept).await;
    eventually("the empty rooms are released", || async {
        node.metric("chorus_rooms_released_idle_total")
            .await
            .unwrap_or(0.0)
            >= 5.0
            && node.metric("chorus_rooms_running").await == Some(1.0)
    })
    .await;
    // The next request starts the room again, with what it had.
    let joined = host
        .request(chorus_protocol::RoomRef {
            room_id: rooms[0].clone(),
        })
        .await
        .expect("join a released room");
    assert!(
        joined
            .recent_comments
            .iter()
            .any(|c| c.text == "before the release"),
        "the history came back: {:?}",
        joined.recent_comments
    );
    common::say(&stayer, &kept, "still here").await;
}

/// Sends `auth` as a JSON text frame on a raw WebSocket and reads the answer.
async fn ws_auth(stream: &mut TcpStream, user: &str) {
    let auth = serde_json::json!({
        "type": "req", "seq": 1, "kind": "auth",
        "body": {"token": common::token(user)},
    })
    .to_string();
    let mut frame = ws_header(0x1, auth.len());
    frame.extend_from_slice(auth.as_bytes());
    stream.write_all(&frame).await.expect("auth");
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await.expect("auth answer");
    assert_eq!(head[0], 0x81, "a text frame answers auth");
    let length = match head[1] & 0x7f {
        126 => {
            let mut ext = [0u8; 2];
            stream.read_exact(&mut ext).await.expect("length");
            usize::from(u16::from_be_bytes(ext))
        }
        n => usize::from(n),
    };
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.expect("auth body");
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("\"ok\":true") || text.contains("session_id"),
        "auth: {text}"
    );
}

/// The close code of the next close frame, skipping other frames; `None` at EOF.
async fn ws_close_code(stream: &mut TcpStream) -> Option<u16> {
    loop {
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).await.ok()?;
        let length = match head[1] & 0x7f {
            126 => {
                let mut ext = [0u8; 2];
                stream.read_exact(&mut ext).await.ok()?;
                u64::from(u16::from_be_bytes(ext))
            }
            127 => {
                let mut ext = [0u8; 8];
                stream.read_exact(&mut ext).await.ok()?;
                u64::from_be_bytes(ext)
            }
            n => u64::from(n),
        };
        let mut body = vec![0u8; usize::try_from(length).ok()?];
        stream.read_exact(&mut body).await.ok()?;
        if head[0] & 0x0f == 0x8 && body.len() >= 2 {
            return Some(u16::from_be_bytes([body[0], body[1]]));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn authenticated_partial_messages_are_bounded_by_the_node_budget() {
    const CONNECTIONS: usize = 12;
    // A budget of 4 MiB: four of the connections below fill it.
    let node = start_with_config("[limits]\ninbound_partial_bytes_max = 4194304\n").await;
    let bystander = Bystander::start(&node).await;
    let baseline = settled_rss(&node).await;
    let mut streams = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        let mut stream = ws_upgrade(node.http).await;
        ws_auth(&mut stream, &format!("staller-{i}")).await;
        stream
            .write_all(&ws_header(0x2, DECLARED_BYTES))
            .await
            .expect("header");
        write_until_stalled(&mut stream, SENT_BYTES).await;
        streams.push(stream);
    }
    let held = settled_rss(&node).await;
    // Those that got through hold their partial message; the others are closed. Wait
    // for all of them at once, a while each (a busy machine may be slow to close).
    let closes = futures_util::future::join_all(
        streams
            .iter_mut()
            .map(|stream| tokio::time::timeout(Duration::from_secs(5), ws_close_code(stream))),
    )
    .await;
    let mut refused = 0;
    for code in closes.into_iter().flatten() {
        assert_eq!(
            code,
            Some(ErrorCode::Unavailable.close_code()),
            "closed with 4401"
        );
        refused += 1;
    }
    assert_budget_held("ws", CONNECTIONS, refused, baseline, held);
    drop(streams);
    bystander.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn authenticated_partial_quic_messages_are_bounded_by_the_node_budget() {
    const CONNECTIONS: usize = 12;
    let node = start_with_config("[limits]\ninbound_partial_bytes_max = 4194304\n").await;
    let bystander = Bystander::start(&node).await;
    let baseline = settled_rss(&node).await;
    let client_config =
        chorus_node::client::quic_client_config(&node.ca_path(), 30_000).expect("config");
    let mut endpoint = chorus_node::client::client_endpoint(node.quic).expect("endpoint");
    endpoint.set_default_client_config(client_config);
    let mut held = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        let connection = endpoint
            .connect(node.quic, "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        let (mut send, mut recv) = connection.open_bi().await.expect("stream");
        let auth = chorus_protocol::encode_request(
            chorus_protocol::Encoding::MsgPack,
            1,
            "auth",
            &chorus_protocol::AuthRequest {
                token: common::token(&format!("quic-staller-{i}")),
                protocol_version: None,
                resume: None,
            },
        )
        .expect("encode");
        send.write_all(&(auth.len() as u32).to_be_bytes())
            .await
            .expect("length");
        send.write_all(&auth).await.expect("auth");
        // The answer: a length prefix and the frame.
        let mut length = [0u8; 4];
        recv.read_exact(&mut length).await.expect("auth answer");
        let mut answer = vec![0u8; u32::from_be_bytes(length) as usize];
        recv.read_exact(&mut answer).await.expect("auth answer");
        send.write_all(&(DECLARED_BYTES as u32).to_be_bytes())
            .await
            .expect("length");
        write_until_stalled(&mut send, SENT_BYTES).await;
        held.push((connection, send, recv));
    }
    let rss = settled_rss(&node).await;
    let closes = futures_util::future::join_all(held.iter().map(|(connection, _, _)| {
        tokio::time::timeout(Duration::from_secs(5), connection.closed())
    }))
    .await;
    let mut refused = 0;
    for closed in closes {
        if let Ok(quinn::ConnectionError::ApplicationClosed(close)) = closed {
            assert_eq!(
                close.error_code.into_inner(),
                u64::from(ErrorCode::Unavailable.close_code()),
                "closed with 4401"
            );
            refused += 1;
        }
    }
    assert_budget_held("quic", CONNECTIONS, refused, baseline, rss);
    drop(held);
    bystander.finish().await;
}

#[tokio::test]
async fn one_user_is_in_a_bounded_number_of_rooms_across_its_sessions() {
    let node =
        start_with_config("[limits]\nrooms_per_session_max = 2\nmemberships_per_user_max = 3\n")
            .await;
    let host = node.client(&node.ws_url(), "host").await;
    let mut rooms = Vec::new();
    for i in 0..4 {
        rooms.push(create_room(&host, &format!("room {i}")).await);
    }
    let first = node.client(&node.ws_url(), "mallory").await;
    let second = node.client(&node.ws_url(), "mallory").await;
    join(&first, &rooms[0]).await;
    join(&first, &rooms[1]).await;
    join(&second, &rooms[2]).await;
    let refused = second
        .request(chorus_protocol::RoomRef {
            room_id: rooms[3].clone(),
        })
        .await
        .expect_err("a fourth room for the user is refused");
    assert_eq!(
        refused.error_code(),
        Some(ErrorCode::TooManyRooms),
        "{refused}"
    );
    // Another user is not affected, and leaving one makes room.
    let other = node.client(&node.ws_url(), "other").await;
    join(&other, &rooms[3]).await;
    first
        .request(chorus_protocol::RoomLeaveRequest {
            room_id: rooms[0].clone(),
        })
        .await
        .expect("leave");
    join(&second, &rooms[3]).await;
}

#[tokio::test]
async fn poll_creation_is_rate_limited_per_user() {
    let node = TestNode::start(&[]).await;
    let host = node.client(&node.ws_url(), "host").await;
    // Three polls may be open per room: spread them over rooms.
    let mut rooms = Vec::new();
    for i in 0..3 {
        let room = create_room(&host, &format!("polls {i}")).await;
        join(&host, &room).await;
        rooms.push(room);
    }
    let mut results = Vec::new();
    for i in 0..7 {
        results.push(
            host.request(chorus_protocol::RoomPollCreateRequest {
                room_id: rooms[i / 3].clone(),
                question: format!("question {i}?"),
                options: vec!["yes".into(), "no".into()],
            })
            .await
            .map_err(|e| e.error_code()),
        );
    }
    let created = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(created, 5, "a burst of five: {results:?}");
    assert!(results[5..]
        .iter()
        .all(|r| *r == Err(Some(ErrorCode::RateLimited))));
}
