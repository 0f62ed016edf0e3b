//! The room workload: real clients (WebSocket and QUIC) on every node, each a member of some
//! rooms, sending uniquely named comments at a bounded rate and recording what they send,
//! what is acknowledged, what they receive, and when their room memberships begin and end.
//!
//! It does not judge anything; `check` reads the logs afterwards.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chorus_node::client::{Client, ClientConfig, ClientEvent, ReconnectPolicy, Requester};
use chorus_node::token::{unix_now_secs, TokenKeys};
use chorus_protocol::{Event, ResumeOutcome, RoomCommentRequest, RoomRef};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The secret nodes use when started without one.
pub const SECRET: &str = "chorus-dev-secret";
/// Attempts to (re-)join one room before the client gives up on it for this session.
const JOIN_ATTEMPTS_MAX: u32 = 60;
/// Pause between join attempts.
const JOIN_RETRY_DELAY: Duration = Duration::from_millis(250);
/// Attempts at the first connection.
const CONNECT_ATTEMPTS_MAX: u32 = 20;

/// What one client does.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    /// Index, also its user id `u{index}` and the prefix of its comment texts.
    pub index: usize,
    /// Its node's URL first, then the others': it fails over in that order.
    pub urls: Vec<String>,
    /// CA for `quic://` URLs.
    pub ca_path: PathBuf,
    /// Rooms it joins and comments in.
    pub rooms: Vec<String>,
    /// Mean time between two of its comments, in milliseconds (jittered ±50%).
    pub comment_interval_ms: u64,
    /// Seed of its jitter.
    pub seed: u64,
}

/// One comment this client sent.
#[derive(Debug, Clone)]
pub struct SentComment {
    /// Room.
    pub room: String,
    /// Unique text `c{client}-{n}`.
    pub text: String,
    /// When the request was handed to the client library.
    pub sent_at: Instant,
    /// The comment id from the acknowledgement, if acknowledged.
    pub acked_id: Option<u64>,
}

/// One comment this client received.
#[derive(Debug, Clone)]
pub struct ReceivedComment {
    /// Room.
    pub room: String,
    /// Position in the room's order.
    pub comment_id: u64,
    /// Text.
    pub text: String,
    /// `false` for a live notification, `true` for one listed in a join response.
    pub from_join: bool,
    /// Fetched with `room.comments` after a `room.gap` notice (not live, not in order).
    pub fetched: bool,
    /// When the room ordered it (server clock), ms since the Unix epoch.
    pub ordered_at_ms: u64,
    /// The membership interval (index into `ClientLog::memberships`) it arrived in, for a
    /// live one.
    pub membership: Option<usize>,
    /// When it arrived.
    pub at: Instant,
}

/// Fetches the comments a `room.gap` notice names, page by page (retrying a failed page a
/// few times), into the log as received.
async fn fetch_gap(
    requester: &Requester,
    log: &Arc<Mutex<ClientLog>>,
    gap: &chorus_protocol::GapEvent,
    membership: Option<usize>,
) {
    let mut after = gap.after;
    let mut failures = 0;
    while after + 1 < gap.next && failures < GAP_FETCH_ATTEMPTS_MAX {
        let limit = (gap.next - after - 1).min(u64::from(chorus_protocol::COMMENTS_PAGE_MAX));
        let page = requester
            .request(chorus_protocol::RoomCommentsRequest {
                room_id: gap.room_id.clone(),
                after,
                limit: Some(limit as u32),
            })
            .await;
        match page {
            Ok(page) if !page.comments.is_empty() => {
                let mut log = lock(log);
                for comment in page.comments {
                    after = comment.comment_id;
                    log.received.push(ReceivedComment {
                        room: comment.room_id,
                        comment_id: comment.comment_id,
                        text: comment.text,
                        from_join: false,
                        fetched: true,
                        membership,
                        ordered_at_ms: comment.at_ms,
                        at: Instant::now(),
                    });
                }
            }
            _ => {
                failures += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Tries to fetch one page of a gap before giving up on the rest.
const GAP_FETCH_ATTEMPTS_MAX: u32 = 10;

/// A stretch of time in which this client's session was a member of a room: from the
/// join's acknowledgement to the end of that session (a reconnect that was not `Resumed`,
/// or the client giving up). `end: None` means it lasted until the workload stopped.
#[derive(Debug, Clone)]
pub struct Membership {
    /// Room.
    pub room: String,
    /// When the join was acknowledged.
    pub start: Instant,
    /// When the session was lost (the `Disconnected` that preceded the `Resync`).
    pub end: Option<Instant>,
}

/// Everything one client recorded.
#[derive(Debug, Default)]
pub struct ClientLog {
    /// Comments sent (acknowledged or not).
    pub sent: Vec<SentComment>,
    /// Comments received.
    pub received: Vec<ReceivedComment>,
    /// Membership intervals.
    pub memberships: Vec<Membership>,
    /// Times of `Disconnected` events.
    pub disconnects: Vec<Instant>,
    /// Times of `Reconnected` events.
    pub reconnects: Vec<Instant>,
    /// `room.gap` notices: (room, after, next).
    pub gaps: Vec<(String, u64, u64)>,
    /// Reconnects that resumed the session.
    pub resumed: usize,
    /// Reconnects that started a new session (rooms re-joined).
    pub resynced: usize,
    /// Comment requests refused or failed.
    pub send_failures: usize,
    /// The client gave up (`Closed`) or never connected: why.
    pub gave_up: Option<String>,
    /// Connected at the end (no `Disconnected` without a later `Reconnected`).
    pub connected: bool,
    /// Session generation: bumped on each `Resync`, so a late join from an older session
    /// does not open a membership.
    generation: u64,
    /// Time of the `Disconnected` not yet followed by a `Reconnected`.
    pending_break: Option<Instant>,
}

impl ClientLog {
    /// Ends every open membership at `at`.
    fn end_memberships(&mut self, at: Instant) {
        for membership in &mut self.memberships {
            if membership.end.is_none() {
                membership.end = Some(at);
            }
        }
    }

    /// The open membership of `room`, if any.
    fn open_membership(&self, room: &str) -> Option<usize> {
        self.memberships
            .iter()
            .rposition(|m| m.room == room && m.end.is_none())
    }
}

/// A running client task.
pub struct ClientHandle {
    /// Its spec.
    pub spec: ClientSpec,
    /// What it recorded so far.
    pub log: Arc<Mutex<ClientLog>>,
    task: tokio::task::JoinHandle<()>,
}

impl ClientHandle {
    /// Waits for the task to end (after `stop_all`), bounded.
    pub async fn join(self, timeout: Duration) -> (ClientSpec, Arc<Mutex<ClientLog>>) {
        let abort = self.task.abort_handle();
        if tokio::time::timeout(timeout, self.task).await.is_err() {
            abort.abort();
        }
        (self.spec, self.log)
    }
}

/// Locks a log. A poisoned lock means a client task panicked: a harness bug.
pub fn lock(log: &Mutex<ClientLog>) -> std::sync::MutexGuard<'_, ClientLog> {
    log.lock()
        .expect("a client task panicked while holding its log")
}

/// Starts a client task: connect, join, send until `stop_sending`, receive until
/// `stop_all`.
pub fn spawn_client(
    spec: ClientSpec,
    stop_sending: CancellationToken,
    stop_all: CancellationToken,
) -> ClientHandle {
    let log = Arc::new(Mutex::new(ClientLog::default()));
    let task = tokio::spawn(run_client(
        spec.clone(),
        log.clone(),
        stop_sending,
        stop_all,
    ));
    ClientHandle { spec, log, task }
}

fn client_config(spec: &ClientSpec) -> Result<ClientConfig, String> {
    client_config_for(&spec.urls, &spec.ca_path, &format!("u{}", spec.index))
}

/// A chaos client's configuration: `urls` in order (the first is home), the cluster CA,
/// a development token for `user`, short timeouts, and about two minutes of reconnects
/// (longer than any fault the harness injects).
pub(crate) fn client_config_for(
    urls: &[String],
    ca_path: &std::path::Path,
    user: &str,
) -> Result<ClientConfig, String> {
    let token = TokenKeys::new(SECRET.as_bytes())
        .mint(user, &[], unix_now_secs(), 24 * 3600)
        .map_err(|e| format!("mint token: {e}"))?;
    let mut config = ClientConfig::new(urls[0].clone(), token);
    config.urls = urls.to_vec();
    config.ca_path = Some(ca_path.to_path_buf());
    config.request_timeout_ms = 4_000;
    config.connect_timeout_ms = 2_000;
    config.quic_idle_timeout_ms = 6_000;
    config.reconnect = ReconnectPolicy {
        enabled: true,
        initial_backoff_ms: 100,
        max_backoff_ms: 1_000,
        attempts_max: 240,
    };
    Ok(config)
}

async fn run_client(
    spec: ClientSpec,
    log: Arc<Mutex<ClientLog>>,
    stop_sending: CancellationToken,
    stop_all: CancellationToken,
) {
    let config = match client_config(&spec) {
        Ok(config) => config,
        Err(error) => {
            lock(&log).gave_up = Some(error);
            return;
        }
    };
    let mut client = None;
    let mut last_error = String::new();
    for _ in 0..CONNECT_ATTEMPTS_MAX {
        match Client::connect(config.clone()).await {
            Ok(c) => {
                client = Some(c);
                break;
            }
            Err(error) => {
                last_error = error.to_string();
                tokio::time::sleep(JOIN_RETRY_DELAY).await;
            }
        }
    }
    let Some(mut client) = client else {
        lock(&log).gave_up = Some(format!("could not connect: {last_error}"));
        return;
    };
    lock(&log).connected = true;
    let requester = client.requester();
    join_rooms(&requester, &spec.rooms, &log, 0).await;

    let sender = tokio::spawn(send_comments(
        spec.clone(),
        requester.clone(),
        log.clone(),
        stop_sending,
    ));
    let mut rejoin: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let event = tokio::select! {
            _ = stop_all.cancelled() => break,
            event = client.next_event() => event,
        };
        let now = Instant::now();
        match event {
            Some(ClientEvent::Notification {
                event: Event::Comment(comment),
                ..
            }) => {
                let mut log = lock(&log);
                let membership = log.open_membership(&comment.room_id);
                log.received.push(ReceivedComment {
                    room: comment.room_id,
                    comment_id: comment.comment_id,
                    text: comment.text,
                    from_join: false,
                    fetched: false,
                    membership,
                    ordered_at_ms: comment.at_ms,
                    at: Instant::now(),
                });
            }
            Some(ClientEvent::Notification {
                event: Event::Gap(gap),
                ..
            }) => {
                let membership = {
                    let mut log = lock(&log);
                    log.gaps.push((gap.room_id.clone(), gap.after, gap.next));
                    log.open_membership(&gap.room_id)
                };
                let requester = requester.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    fetch_gap(&requester, &log, &gap, membership).await;
                });
            }
            Some(ClientEvent::Disconnected { .. }) => {
                let mut log = lock(&log);
                log.disconnects.push(now);
                log.connected = false;
                if log.pending_break.is_none() {
                    log.pending_break = Some(now);
                }
            }
            Some(ClientEvent::Reconnected { outcome }) => {
                let generation = {
                    let mut log = lock(&log);
                    log.connected = true;
                    log.reconnects.push(now);
                    let broke_at = log.pending_break.take().unwrap_or(now);
                    if outcome == ResumeOutcome::Resumed {
                        log.resumed += 1;
                        continue;
                    }
                    log.resynced += 1;
                    log.end_memberships(broke_at);
                    log.generation += 1;
                    log.generation
                };
                if let Some(old) = rejoin.take() {
                    old.abort();
                }
                let requester = requester.clone();
                let rooms = spec.rooms.clone();
                let log = log.clone();
                rejoin = Some(tokio::spawn(async move {
                    join_rooms(&requester, &rooms, &log, generation).await;
                }));
            }
            Some(ClientEvent::Closed { code, reason }) => {
                let mut log = lock(&log);
                let broke_at = log.pending_break.take().unwrap_or(now);
                log.end_memberships(broke_at);
                log.connected = false;
                log.gave_up = Some(format!("closed ({code:?}): {reason}"));
                break;
            }
            Some(_) => {}
            None => break,
        }
    }
    sender.abort();
    if let Some(rejoin) = rejoin {
        rejoin.abort();
    }
    client.close().await;
}

/// Joins every room (retrying each, bounded) and opens a membership for each join
/// acknowledged while the session of `generation` is still the current one.
async fn join_rooms(
    requester: &Requester,
    rooms: &[String],
    log: &Arc<Mutex<ClientLog>>,
    generation: u64,
) {
    for room in rooms {
        for _ in 0..JOIN_ATTEMPTS_MAX {
            let result = requester
                .request(RoomRef {
                    room_id: room.clone(),
                })
                .await;
            let acked_at = Instant::now();
            match result {
                Ok(response) => {
                    let mut log = lock(log);
                    if log.generation != generation {
                        return;
                    }
                    log.memberships.push(Membership {
                        room: room.clone(),
                        start: acked_at,
                        end: None,
                    });
                    for comment in response.recent_comments {
                        log.received.push(ReceivedComment {
                            room: comment.room_id,
                            comment_id: comment.comment_id,
                            text: comment.text,
                            from_join: true,
                            fetched: false,
                            membership: None,
                            ordered_at_ms: comment.at_ms,
                            at: Instant::now(),
                        });
                    }
                    break;
                }
                Err(_) => {
                    if lock(log).generation != generation {
                        return;
                    }
                    tokio::time::sleep(JOIN_RETRY_DELAY).await;
                }
            }
        }
    }
}

/// Sends `c{index}-{n}` to its rooms in turn, one at a time, until cancelled.
async fn send_comments(
    spec: ClientSpec,
    requester: Requester,
    log: Arc<Mutex<ClientLog>>,
    stop: CancellationToken,
) {
    let mut rng = SmallRng::seed_from_u64(spec.seed);
    let interval = spec.comment_interval_ms.max(1);
    for n in 1u64.. {
        let delay = rng.random_range(interval / 2..=interval + interval / 2);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
        }
        let room = spec.rooms[(n as usize) % spec.rooms.len()].clone();
        let text = format!("c{}-{n}", spec.index);
        let sent_at = Instant::now();
        let result = requester
            .request(RoomCommentRequest {
                room_id: room.clone(),
                text: text.clone(),
                request_id: None,
            })
            .await;
        let mut log = lock(&log);
        let acked_id = match result {
            Ok(response) => Some(response.comment_id),
            Err(_) => {
                log.send_failures += 1;
                None
            }
        };
        log.sent.push(SentComment {
            room,
            text,
            sent_at,
            acked_id,
        });
    }
}

/// Writes every client's log, times in ms since `start` (wall clock `start_unix_ms`), for
/// reading a failed run next to the node logs.
pub fn dump_logs(
    path: &std::path::Path,
    start: Instant,
    start_unix_ms: u64,
    logs: &[(ClientSpec, &ClientLog)],
) -> std::io::Result<()> {
    use std::fmt::Write as _;
    let ms = |t: Instant| t.saturating_duration_since(start).as_millis();
    let mut out = format!("# run start: unix ms {start_unix_ms}\n");
    for (spec, log) in logs {
        let _ = writeln!(out, "client {} urls {:?}", spec.index, spec.urls);
        for (i, m) in log.memberships.iter().enumerate() {
            let _ = writeln!(
                out,
                "  membership {i} room {} from {} to {:?}",
                m.room,
                ms(m.start),
                m.end.map(ms)
            );
        }
        for (what, times) in [
            ("disconnected", &log.disconnects),
            ("reconnected", &log.reconnects),
        ] {
            for t in times {
                let _ = writeln!(out, "  {what} at {}", ms(*t));
            }
        }
        for r in &log.received {
            let _ = writeln!(
                out,
                "  {} got {} #{} {:?}{} membership {:?}",
                ms(r.at),
                r.room,
                r.comment_id,
                r.text,
                if r.from_join {
                    " (join)"
                } else if r.fetched {
                    " (fetched)"
                } else {
                    ""
                },
                r.membership
            );
        }
        for c in &log.sent {
            let _ = writeln!(
                out,
                "  {} sent {} {:?} acked {:?}",
                ms(c.sent_at),
                c.room,
                c.text,
                c.acked_id
            );
        }
    }
    std::fs::write(path, out)
}
