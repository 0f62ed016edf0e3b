//! The fan-out floor: a minimal WebSocket writer that speaks just enough of the Chorus
//! protocol for `chorus loadgen` (`auth`, `room.create`, `room.join`, `room.comment`) and
//! does nothing else. A comment's notification is encoded once, framed once, and written
//! to each listener's socket with one `write()`; there are no sessions, no resume buffer,
//! no queues, no rooms on other nodes, no replication. It is what the kernel's sockets cost,
//! the floor `benches/fanout.sh` compares a Chorus node with (issue: fan-out within 15%).
//!
//! Every member gets every notification from the first one on, so the same frame (the same
//! `seq`) is valid for every session: `chorus loadgen` joins all listeners before sending.
//!
//! Run: `cargo bench --bench fanout_floor -- ADDR PIDFILE` (serves until killed; writes
//! its process id to PIDFILE once listening).

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chorus_protocol::{
    decode_frame, encode_notification, AuthResponse, CommentEvent, Encoding, Frame, FrameLimits,
    ResumeOutcome, Role, RoomCommentRequest, RoomCommentResponse, RoomCreateRequest,
    RoomCreateResponse, RoomInfo, RoomJoinResponse, RoomState, StageInfo,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};

/// A client connection's writing half, shared by its reader (answers) and the fan-out.
struct Conn {
    write: Mutex<Option<OwnedWriteHalf>>,
    /// Bytes a full socket did not take yet, written by the connection's own task.
    pending: Mutex<Vec<u8>>,
    wake: tokio::sync::Notify,
}

impl Conn {
    /// One `write()`; what the socket does not take waits for the connection's task.
    fn send(&self, frame: &[u8]) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if !pending.is_empty() {
            pending.extend_from_slice(frame);
            return;
        }
        let guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let Some(write) = guard.as_ref() else {
            // The connection's task is writing what was left: after it, in order.
            pending.extend_from_slice(frame);
            self.wake.notify_one();
            return;
        };
        match write.try_write(frame) {
            Ok(n) if n == frame.len() => {}
            Ok(n) => {
                pending.extend_from_slice(&frame[n..]);
                self.wake.notify_one();
            }
            Err(_) => {
                pending.extend_from_slice(frame);
                self.wake.notify_one();
            }
        }
    }
}

struct Floor {
    members: Mutex<Vec<Arc<Conn>>>,
    seq: AtomicU64,
    comment_id: AtomicU64,
    sessions: AtomicU64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A binary WebSocket frame from the server (unmasked).
fn ws_binary(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 10);
    frame.push(0x82);
    match payload.len() {
        n if n < 126 => frame.push(n as u8),
        n if n < 65_536 => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    frame
}

fn room_info(room_id: &str) -> RoomInfo {
    RoomInfo {
        room_id: room_id.to_string(),
        title: "floor".into(),
        host: "host".into(),
        state: RoomState::Live,
        scheduled_start_ms: None,
        created_at_ms: now_ms(),
        listener_count: 0,
        comment_count: 0,
    }
}

async fn serve(floor: Arc<Floor>, stream: TcpStream) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (mut read, write) = stream.into_split();
    // The HTTP upgrade, by hand.
    let mut head = Vec::with_capacity(1024);
    let mut byte = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = read.read(&mut byte).await?;
        if n == 0 || head.len() > 8192 {
            return Ok(());
        }
        head.extend_from_slice(&byte[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let key = text
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim().to_string())
        })
        .unwrap_or_default();
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    let conn = Arc::new(Conn {
        write: Mutex::new(Some(write)),
        pending: Mutex::new(Vec::new()),
        wake: tokio::sync::Notify::new(),
    });
    conn.send(response.as_bytes());
    // Flushes what a full socket left, in this connection's own task.
    let flusher = {
        let conn = conn.clone();
        tokio::spawn(async move {
            loop {
                conn.wake.notified().await;
                loop {
                    // The socket first, then what waits: a sender that finds the socket
                    // taken queues behind what this task writes, so nothing overtakes.
                    let write = conn.write.lock().unwrap_or_else(|p| p.into_inner()).take();
                    let Some(mut write) = write else { return };
                    let rest = std::mem::take(
                        &mut *conn.pending.lock().unwrap_or_else(|p| p.into_inner()),
                    );
                    let written = write.write_all(&rest).await;
                    *conn.write.lock().unwrap_or_else(|p| p.into_inner()) = Some(write);
                    if written.is_err() || rest.is_empty() {
                        break;
                    }
                }
            }
        })
    };
    let limits = FrameLimits::default();
    let mut buffer: Vec<u8> = Vec::with_capacity(4096);
    let result = async {
        loop {
            // One client frame (masked; no fragmentation from this client).
            while buffer.len() < 2 || buffer.len() < frame_len(&buffer).unwrap_or(usize::MAX) {
                let n = read.read(&mut byte).await?;
                if n == 0 {
                    return Ok::<(), std::io::Error>(());
                }
                buffer.extend_from_slice(&byte[..n]);
            }
            let Some(len) = frame_len(&buffer) else {
                continue;
            };
            let frame: Vec<u8> = buffer.drain(..len).collect();
            let opcode = frame[0] & 0x0f;
            let payload = unmask(&frame);
            match opcode {
                0x8 => return Ok(()),
                0x9 => {
                    let mut pong = ws_binary(&payload);
                    pong[0] = 0x8a;
                    conn.send(&pong);
                }
                0x2 => handle(&floor, &conn, &payload, &limits),
                _ => {}
            }
        }
    }
    .await;
    flusher.abort();
    floor
        .members
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|m| !Arc::ptr_eq(m, &conn));
    result
}

/// The length of the first whole frame in `b`, if it is all there.
fn frame_len(b: &[u8]) -> Option<usize> {
    if b.len() < 2 {
        return None;
    }
    let masked = b[1] & 0x80 != 0;
    let (len, header) = match b[1] & 0x7f {
        126 => (u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as usize, 4),
        127 => (
            u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let total = header + if masked { 4 } else { 0 } + len;
    (b.len() >= total).then_some(total)
}

fn unmask(frame: &[u8]) -> Vec<u8> {
    let masked = frame[1] & 0x80 != 0;
    let header = match frame[1] & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    if !masked {
        return frame[header..].to_vec();
    }
    let key = &frame[header..header + 4];
    frame[header + 4..]
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ key[i % 4])
        .collect()
}

fn handle(floor: &Floor, conn: &Arc<Conn>, payload: &[u8], limits: &FrameLimits) {
    let Ok(Frame::Request(request)) = decode_frame(Encoding::MsgPack, payload, limits) else {
        return;
    };
    let answer = |ok: &dyn erased::Ok| {
        if let Ok(bytes) = ok.encode(request.seq) {
            conn.send(&ws_binary(&bytes));
        }
    };
    match request.kind.as_str() {
        "auth" => {
            let n = floor.sessions.fetch_add(1, Ordering::Relaxed);
            answer(&AuthResponse {
                protocol_version: 1,
                user_id: format!("user-{n}"),
                session_id: format!("s-{n}"),
                resume: ResumeOutcome::New,
                notification_seq: 0,
                node: "floor".into(),
                // No pings: the floor does nothing it need not do.
                ping_interval_ms: 3_600_000,
                resume_window_ms: 60_000,
            });
        }
        "room.create" => {
            let _ = request.body.decode::<RoomCreateRequest>("room.create");
            answer(&RoomCreateResponse {
                room_id: "r-floor".into(),
                room: room_info("r-floor"),
            });
        }
        "room.join" => {
            floor
                .members
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(conn.clone());
            answer(&RoomJoinResponse {
                room: room_info("r-floor"),
                role: Role::Listener,
                recent_comments: Vec::new(),
                stage: StageInfo::default(),
                polls: Vec::new(),
            });
        }
        "room.comment" => {
            let Ok(comment) = request.body.decode::<RoomCommentRequest>("room.comment") else {
                return;
            };
            let comment_id = floor.comment_id.fetch_add(1, Ordering::Relaxed) + 1;
            answer(&RoomCommentResponse { comment_id });
            // Encoded once, framed once, one write per member.
            let seq = floor.seq.fetch_add(1, Ordering::Relaxed) + 1;
            let event = CommentEvent {
                room_id: comment.room_id,
                comment_id,
                user_id: "sender".into(),
                text: comment.text,
                at_ms: now_ms(),
            };
            let Ok(body) = encode_notification(Encoding::MsgPack, seq, "room.comment", &event)
            else {
                return;
            };
            let frame = ws_binary(&body);
            let members = floor
                .members
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            for member in members {
                member.send(&frame);
            }
        }
        _ => {}
    }
}

/// Answers of different types through one closure.
mod erased {
    pub trait Ok {
        fn encode(&self, seq: u64) -> Result<bytes::Bytes, chorus_protocol::ProtocolError>;
    }
    impl<T: serde::Serialize> Ok for T {
        fn encode(&self, seq: u64) -> Result<bytes::Bytes, chorus_protocol::ProtocolError> {
            chorus_protocol::encode_response_ok(chorus_protocol::Encoding::MsgPack, seq, self)
        }
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:7600".into())
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let pid_file = args.next();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(addr).await?;
        if let Some(path) = pid_file {
            let mut file = std::fs::File::create(path)?;
            writeln!(file, "{}", std::process::id())?;
        }
        eprintln!("fanout_floor: listening on {addr}");
        let floor = Arc::new(Floor {
            members: Mutex::new(Vec::new()),
            seq: AtomicU64::new(0),
            comment_id: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
        });
        loop {
            let (stream, _) = listener.accept().await?;
            let floor = floor.clone();
            tokio::spawn(async move {
                let _ = serve(floor, stream).await;
            });
        }
    })
}
