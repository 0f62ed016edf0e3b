//! `chorus loadgen`: many virtual clients in one room, measuring comment delivery (and,
//! with `--reactors`, `--speakers` or `--bulleters`, reactions, voice or bullet comments).
//!
//! N listeners join one room (ramped at `--connect-rate`), then M senders post comments at
//! `--rate` per second each for `--duration` seconds. Each comment's text carries its send
//! time in microseconds since the epoch, so every listener measures delivery latency on
//! receipt (same machine, same clock). Latencies go into sharded HDR histograms; counters
//! into atomics. Progress is printed on stderr once per second; the final report on stdout
//! and, with `--json FILE`, as JSON.
//!
//! Every loop is bounded by a count and a deadline: the ramp by N, sending by the
//! duration, the senders' outstanding answers by the request timeout, the drain by
//! `--drain-secs` from the moment the last sender finished, shutdown by
//! [`SHUTDOWN_WAIT_SECS`].
//!
//! Accounting: a comment counts as sent only once the server acknowledged it, no comment
//! leaves at or after the end of a sender's run, and the drain starts only once every
//! sender has finished (its count is final), so the expected deliveries (acknowledged
//! comments × listeners) cannot grow after the listeners stop counting.
//!
//! Open files: every connection is one socket (WebSocket) and the process needs a few
//! more. At start the soft `RLIMIT_NOFILE` is raised to the hard limit; with the usual hard
//! limit of 20,000 (or more), 10,000 listeners fit in one process. If the hard limit is
//! lower, raise it (`ulimit -Hn` as root) or split the load over several processes.
//! QUIC clients share one UDP socket per [`QUIC_CLIENTS_PER_ENDPOINT`] connections.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use chorus_protocol::{
    Encoding, ErrorCode, Event, RoomBulletRequest, RoomCommentRequest, RoomCreateRequest,
    RoomReactRequest, RoomRef,
};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod quiz;
mod rain;
mod stage;
mod voicemail;

use crate::client::{
    client_endpoint, Client, ClientConfig, ClientError, ClientEvent, ReconnectPolicy, ServerUrl,
    TransportKind,
};
use crate::config::DEV_SECRET;
use crate::token::{unix_now_secs, TokenKeys};

/// Most listeners one run may start.
pub const LISTENERS_MAX: u32 = 100_000;
/// Most senders one run may start.
pub const SENDERS_MAX: u32 = 1_000;
/// Highest comment rate per sender, per second.
pub const RATE_PER_SEC_MAX: f64 = 1_000.0;
/// Longest run, in seconds.
pub const DURATION_SECS_MAX: u64 = 86_400;
/// QUIC connections per shared client endpoint (UDP socket).
pub const QUIC_CLIENTS_PER_ENDPOINT: usize = 500;
/// How long stopped tasks get to close their connections.
pub const SHUTDOWN_WAIT_SECS: u64 = 10;
/// How long a virtual client's request (join, comment) waits for its answer.
const REQUEST_TIMEOUT_MS: u64 = 10_000;
/// Slack beyond the duration and the request timeout for the senders to finish; after it
/// they are told to stop, and answers still outstanding are not counted.
const SENDER_FINISH_SLACK_SECS: u64 = 5;
/// Comments one sender may have waiting for an answer; a tick beyond it is skipped and
/// counted as an error (the server is not keeping up).
const SENDER_IN_FLIGHT_MAX: usize = 64;
/// Latency histogram shards (listeners record into `index % shards`).
const HISTOGRAM_SHARDS: usize = 16;
/// Highest latency the histograms track, in microseconds (60 s); larger values saturate.
const LATENCY_US_MAX: u64 = 60_000_000;
/// Prefix of every load-generator comment: `lg RUN SENDER N SENT_US`.
const COMMENT_PREFIX: &str = "lg";
/// The emoji reactors send.
const REACTION_EMOJI: &str = "👏";
/// Distinct bullet senders a run tells apart in its report; beyond, shown senders are not
/// recorded (the count saturates).
const BULLET_SENDERS_TRACKED_MAX: usize = 100_000;
/// Most speakers one run may put on stage (the room's default stage size).
pub const SPEAKERS_MAX: u32 = 50;

/// Options of `chorus loadgen`.
#[derive(Debug, clap::Args)]
pub struct LoadgenArgs {
    /// Server URL: `ws://HOST:PORT/ws`, `wss://HOST:PORT/ws` or `quic://HOST:PORT`. Repeat it to spread the
    /// clients over several nodes (client `i` uses URL `i mod n`).
    #[arg(long = "url", default_value = "ws://127.0.0.1:7070/ws")]
    pub urls: Vec<String>,
    /// CA certificate (PEM) trusted for QUIC, and for `wss://` besides the system's roots.
    #[arg(long, default_value = "./chorus-data/ca.pem")]
    pub ca: PathBuf,
    /// Secret to mint the virtual users' tokens with.
    #[arg(long, env = "CHORUS_SECRET", default_value = DEV_SECRET, hide_env_values = true, hide_default_value = true)]
    pub secret: String,
    /// Listening clients (each its own user and connection).
    #[arg(long, default_value_t = 100)]
    pub listeners: u32,
    /// Commenting clients (0 for none). The server limits each user to 5 comments/s
    /// (burst 10).
    #[arg(long, default_value_t = 1)]
    pub senders: u32,
    /// Reacting clients: each sends `--reaction-rate` reactions per second. The server
    /// limits requests per connection (`--requests-per-sec` on the nodes, default 20).
    #[arg(long, default_value_t = 0)]
    pub reactors: u32,
    /// Reactions per second per reacting client.
    #[arg(long, default_value_t = 10.0)]
    pub reaction_rate: f64,
    /// Bullet-comment clients: each sends `--bullet-rate` bullets per second. Nodes
    /// let 2/s per user through (burst 4) and refuse the rest as rate limited (counted,
    /// not errors); a room shows 20/s chosen from all senders.
    #[arg(long, default_value_t = 0)]
    pub bulleters: u32,
    /// Bullets per second per bullet-comment client.
    #[arg(long, default_value_t = 10.0)]
    pub bullet_rate: f64,
    /// Speaking clients: the room's host invites each to the stage; each sends one
    /// voice frame every `--frame-ms`, carrying its send time, for `--duration` seconds.
    #[arg(long, default_value_t = 0)]
    pub speakers: u32,
    /// Milliseconds of audio per voice frame (10-60): 20 is 50 frames/s.
    #[arg(long, default_value_t = 20)]
    pub frame_ms: u64,
    /// Bytes of each voice frame's Opus packet (9-1000).
    #[arg(long, default_value_t = 100)]
    pub frame_bytes: usize,
    /// Comments per second per sender.
    #[arg(long, default_value_t = 2.0)]
    pub rate: f64,
    /// Seconds of sending, after all listeners have joined.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// New listener connections per second during the ramp.
    #[arg(long, default_value_t = 500.0)]
    pub connect_rate: f64,
    /// Room to use (default: create one).
    #[arg(long)]
    pub room: Option<String>,
    /// Write the final report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Use JSON text frames on WebSocket instead of MessagePack.
    #[arg(long)]
    pub json_text: bool,
    /// Seconds to wait after sending stops for deliveries still in flight.
    #[arg(long, default_value_t = 5)]
    pub drain_secs: u64,
    /// Red-packet rain: grabbing clients. With grabbers the run is a rain run: they
    /// join the room, a rain is created through `--admin-url` and they tap on it for
    /// `--duration` seconds (listeners, senders, reactors and speakers are not started).
    #[arg(long, default_value_t = 0)]
    pub grabbers: u32,
    /// Taps per second per grabber (each sent with the pushed throttle's probability).
    #[arg(long, default_value_t = 5.0)]
    pub grab_rate: f64,
    /// Packets of the rain.
    #[arg(long, default_value_t = 100_000)]
    pub rain_packets: u64,
    /// Cents of the rain.
    #[arg(long, default_value_t = 10_000_000)]
    pub rain_total: u64,
    /// Packets one grabber may get.
    #[arg(long, default_value_t = 3)]
    pub rain_cap: u64,
    /// Run a live quiz instead: this many viewers join a new room, answer every
    /// question as it arrives; reports answers/s and the time for each announcement to
    /// reach every viewer.
    #[arg(long, default_value_t = 0)]
    pub quiz_viewers: u32,
    /// Questions of the quiz.
    #[arg(long, default_value_t = 3)]
    pub quiz_questions: u32,
    /// Seconds to answer each quiz question.
    #[arg(long, default_value_t = 10)]
    pub quiz_window_secs: u64,
    /// The admin API for the quiz, e.g. http://127.0.0.11:7070 (default: from the first
    /// WebSocket `--url`).
    #[arg(long)]
    pub admin_url: Option<String>,
    /// Run voice messages instead: this many users, spread over the `--url`s, each sending
    /// voice messages to the next user (on the next URL) for `--duration` seconds; reports
    /// messages/s and the time from a chunk's acknowledgement to its recipient.
    #[arg(long, default_value_t = 0)]
    pub vm_users: u32,
    /// Seconds of audio in each voice message of `--vm-users`.
    #[arg(long, default_value_t = 10)]
    pub vm_message_secs: u32,
    /// Admin token for the quiz.
    #[arg(long, env = "CHORUS_ADMIN_TOKEN", hide_env_values = true, default_value = crate::config::DEV_ADMIN_TOKEN)]
    pub admin_token: String,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyReport {
    /// Samples recorded.
    pub samples: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
}

/// Reactions (with `--reactors`): what was sent and what the listeners got.
#[derive(Debug, Clone, Serialize)]
pub struct ReactionsReport {
    /// Reacting clients that connected and joined.
    pub reactors_connected: u64,
    /// Reactions the server acknowledged.
    pub reactions_sent: u64,
    /// Acknowledged reactions per second over the run.
    pub reactions_per_sec: f64,
    /// `room.reactions` notifications the listeners received, in all.
    pub notifications: u64,
    /// Of those, per listener per second: bounded by the window (200 ms: at most 5/s),
    /// whatever the reaction rate.
    pub notifications_per_listener_per_sec: f64,
    /// Reactions counted in the notifications, summed over the listeners.
    pub reactions_counted: u64,
    /// reactions_sent × listeners_connected.
    pub reactions_expected: u64,
}

/// Bullet comments (with `--bulleters`): what was sent, refused and shown.
#[derive(Debug, Clone, Serialize)]
pub struct BulletsReport {
    /// Bullet-comment clients that connected and joined.
    pub bulleters_connected: u64,
    /// Bullets the server accepted.
    pub bullets_sent: u64,
    /// Bullets refused as rate limited (the per-user limit; expected above 2/s).
    pub bullets_rate_limited: u64,
    /// `room.bullets` notifications the listeners received, in all.
    pub notifications: u64,
    /// Bullets shown per listener per second: at most the room's rate (20/s by default).
    pub shown_per_listener_per_sec: f64,
    /// Most bullets in one notification (one window's share of the rate).
    pub per_notification_max: u64,
    /// Distinct senders any listener was shown.
    pub senders_shown: u64,
}

/// Voice (with `--speakers`): frames sent and delivered, and the time they took.
#[derive(Debug, Clone, Serialize)]
pub struct VoiceReport {
    /// Speaking clients on stage.
    pub speakers_connected: u64,
    /// Frames per second per speaker.
    pub frames_per_sec_per_speaker: f64,
    /// Frames the speakers sent.
    pub frames_sent: u64,
    /// Frames the listeners received.
    pub frames_received: u64,
    /// frames_sent × listeners_connected.
    pub frames_expected: u64,
    /// frames_received / frames_expected.
    pub delivery_ratio: f64,
    /// Frames a listener received with a sequence number not after the speaker's
    /// previous one.
    pub order_violations: u64,
    /// Time from the speaker's send to the listener's receipt (the relay's added latency).
    pub latency: LatencyReport,
}

/// The final report (also the `--json` file).
#[derive(Debug, Clone, Serialize)]
pub struct LoadgenReport {
    /// Server URLs (clients spread over them).
    pub urls: Vec<String>,
    /// `websocket` or `quic`.
    pub transport: String,
    /// Room used.
    pub room_id: String,
    /// Listeners asked for.
    pub listeners_target: u32,
    /// Listeners that connected and joined.
    pub listeners_connected: u64,
    /// Senders asked for.
    pub senders_target: u32,
    /// Senders that connected and joined.
    pub senders_connected: u64,
    /// Comments per second per sender asked for.
    pub rate_per_sender: f64,
    /// Seconds of sending.
    pub duration_secs: u64,
    /// Seconds the listener ramp took.
    pub ramp_secs: f64,
    /// Comments the server accepted.
    pub comments_sent: u64,
    /// Comments received by listeners.
    pub deliveries: u64,
    /// comments_sent × listeners_connected.
    pub expected_deliveries: u64,
    /// deliveries / expected_deliveries.
    pub delivery_ratio: f64,
    /// Deliveries per second, from the first send to the last delivery.
    pub deliveries_per_sec: f64,
    /// Delivery latency (send to receipt).
    pub latency: LatencyReport,
    /// Comments a listener received with a comment id not above the previous one.
    pub order_violations: u64,
    /// Connections lost during the run.
    pub disconnects: u64,
    /// Errors of any kind.
    pub errors: u64,
    /// Errors by stage and kind.
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Notifications of any kind per listener per second, while sending.
    pub notifications_per_listener_per_sec: f64,
    /// With `--reactors`.
    pub reactions: Option<ReactionsReport>,
    /// With `--speakers`.
    pub voice: Option<VoiceReport>,
    /// With `--bulleters`.
    pub bullets: Option<BulletsReport>,
    /// Acknowledged comments against what each listener received (with `--senders`).
    pub acknowledged: Option<AckReport>,
    /// Requests the server refused, by error code (`"3000 rate_limited"`: count).
    pub refusals_by_code: BTreeMap<String, u64>,
    /// Requests that got no answer within the client's request timeout.
    pub timeouts: u64,
    /// Comments from send to their `ok` answer (the sender's view of an acknowledgement).
    pub answer_latency: LatencyReport,
    /// Comments from send to a refusal by the server (an error answer).
    pub refusal_latency: LatencyReport,
    /// Sends a sender skipped because 64 of its requests were still unanswered: the load
    /// generator's own bound, not a refusal by the server.
    pub skipped_in_flight: u64,
}

/// Acknowledged comments against deliveries, listener by listener.
#[derive(Debug, Clone, Serialize)]
pub struct AckReport {
    /// Comments the server acknowledged.
    pub acknowledged: u64,
    /// Listeners whose deliveries were checked (those that joined and ran to the end).
    pub listeners_checked: u64,
    /// Of the acknowledged comments, the fewest one listener received.
    pub delivered_acknowledged_min: u64,
    /// Of the acknowledged comments, the most one listener received.
    pub delivered_acknowledged_max: u64,
    /// Listeners that missed at least one acknowledged comment.
    pub listeners_missing_acknowledged: u64,
    /// Acknowledged comments missed, summed over the listeners.
    pub acknowledged_missed_total: u64,
    /// Deliveries of comments whose sender got no acknowledgement (a timeout or a lost
    /// connection after the comment was ordered), summed over the listeners.
    pub delivered_unacknowledged_total: u64,
}

/// Counters shared by every task.
struct Stats {
    listeners_joined: AtomicU64,
    listeners_settled: AtomicU64,
    senders_joined: AtomicU64,
    senders_settled: AtomicU64,
    /// Senders done sending and collecting answers (or that never joined): their part of
    /// `sent` is final.
    senders_finished: AtomicU64,
    /// When the last sender finished.
    last_sender_finished: Mutex<Option<Instant>>,
    /// Comments the server acknowledged (counted on the ok response).
    sent: AtomicU64,
    /// Reactions the server acknowledged.
    reactions_sent: AtomicU64,
    reactors_joined: AtomicU64,
    reaction_notifications: AtomicU64,
    reactions_counted: AtomicU64,
    bulleters_joined: AtomicU64,
    bullets_sent: AtomicU64,
    bullets_rate_limited: AtomicU64,
    bullet_notifications: AtomicU64,
    bullets_shown: AtomicU64,
    bullets_per_notification_max: AtomicU64,
    /// Senders shown to any listener (at most [`BULLET_SENDERS_TRACKED_MAX`]).
    bullet_senders_shown: Mutex<std::collections::HashSet<String>>,
    /// Notifications of any kind the listeners received.
    notifications: AtomicU64,
    speakers_joined: AtomicU64,
    audio_sent: AtomicU64,
    audio_received: AtomicU64,
    audio_order_violations: AtomicU64,
    audio_latency_us: Vec<Mutex<Histogram<u64>>>,
    /// When sending started and ended (for rates).
    sending_started: Mutex<Option<Instant>>,
    deliveries: AtomicU64,
    order_violations: AtomicU64,
    disconnects: AtomicU64,
    errors: AtomicU64,
    first_send_us: AtomicU64,
    last_delivery_us: AtomicU64,
    /// Keys are `stage: label` with a bounded set of labels ([`ClientError::label`]).
    errors_by_kind: Mutex<BTreeMap<String, u64>>,
    latency_us: Vec<Mutex<Histogram<u64>>>,
    /// Comment send to `ok` answer.
    answer_us: Vec<Mutex<Histogram<u64>>>,
    /// Comment send to an error answer from the server.
    refusal_us: Vec<Mutex<Histogram<u64>>>,
    /// Sends skipped at [`SENDER_IN_FLIGHT_MAX`].
    skipped_in_flight: AtomicU64,
    /// The comment ids the server acknowledged.
    acked: Mutex<IdSet>,
    /// The comment ids of this run each listener received, one set per listener.
    delivered: Mutex<Vec<IdSet>>,
    /// Requests the server refused, by error code.
    refusals: Mutex<BTreeMap<u16, u64>>,
    /// Requests that got no answer in time.
    timeouts: AtomicU64,
}

/// A set of comment ids (they run 1, 2, … in a room): one bit each, at most
/// [`IdSet::ID_MAX`] (an id above it is counted in `untracked`).
#[derive(Debug, Default, Clone)]
struct IdSet {
    bits: Vec<u64>,
    len: u64,
    untracked: u64,
}

impl IdSet {
    /// Ids above this are not tracked: 2^24 bits, 2 MiB per set at most.
    const ID_MAX: u64 = 1 << 24;

    fn insert(&mut self, id: u64) {
        if id > Self::ID_MAX {
            self.untracked += 1;
            return;
        }
        let (word, bit) = ((id / 64) as usize, id % 64);
        if self.bits.len() <= word {
            self.bits.resize(word + 1, 0);
        }
        if self.bits[word] & (1 << bit) == 0 {
            self.bits[word] |= 1 << bit;
            self.len += 1;
        }
    }

    /// (in both, in `self` only).
    fn compare(&self, other: &IdSet) -> (u64, u64) {
        let mut both = 0u64;
        let mut only_self = 0u64;
        for (i, word) in self.bits.iter().enumerate() {
            let theirs = other.bits.get(i).copied().unwrap_or(0);
            both += u64::from((word & theirs).count_ones());
            only_self += u64::from((word & !theirs).count_ones());
        }
        (both, only_self)
    }
}

impl Stats {
    fn new() -> anyhow::Result<Self> {
        let shards = || -> anyhow::Result<Vec<Mutex<Histogram<u64>>>> {
            (0..HISTOGRAM_SHARDS)
                .map(|_| {
                    Ok(Mutex::new(
                        Histogram::new_with_bounds(1, LATENCY_US_MAX, 3)
                            .context("histogram bounds")?,
                    ))
                })
                .collect()
        };
        let latency_us = shards()?;
        Ok(Stats {
            reactions_sent: AtomicU64::new(0),
            reactors_joined: AtomicU64::new(0),
            reaction_notifications: AtomicU64::new(0),
            reactions_counted: AtomicU64::new(0),
            bulleters_joined: AtomicU64::new(0),
            bullets_sent: AtomicU64::new(0),
            bullets_rate_limited: AtomicU64::new(0),
            bullet_notifications: AtomicU64::new(0),
            bullets_shown: AtomicU64::new(0),
            bullets_per_notification_max: AtomicU64::new(0),
            bullet_senders_shown: Mutex::new(std::collections::HashSet::new()),
            notifications: AtomicU64::new(0),
            speakers_joined: AtomicU64::new(0),
            audio_sent: AtomicU64::new(0),
            audio_received: AtomicU64::new(0),
            audio_order_violations: AtomicU64::new(0),
            audio_latency_us: shards()?,
            sending_started: Mutex::new(None),
            listeners_joined: AtomicU64::new(0),
            listeners_settled: AtomicU64::new(0),
            senders_joined: AtomicU64::new(0),
            senders_settled: AtomicU64::new(0),
            senders_finished: AtomicU64::new(0),
            last_sender_finished: Mutex::new(None),
            sent: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            order_violations: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_send_us: AtomicU64::new(0),
            last_delivery_us: AtomicU64::new(0),
            errors_by_kind: Mutex::new(BTreeMap::new()),
            latency_us,
            answer_us: shards()?,
            refusal_us: shards()?,
            skipped_in_flight: AtomicU64::new(0),
            acked: Mutex::new(IdSet::default()),
            delivered: Mutex::new(Vec::new()),
            refusals: Mutex::new(BTreeMap::new()),
            timeouts: AtomicU64::new(0),
        })
    }

    fn error(&self, stage: &str, error: &ClientError) {
        tracing::debug!(stage, %error, "loadgen error");
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut map) = self.errors_by_kind.lock() {
            *map.entry(format!("{stage}: {}", error.label()))
                .or_insert(0) += 1;
        }
    }

    /// A listener was shown `bullets` (one `room.bullets`).
    fn bullets_shown(&self, bullets: &[chorus_protocol::Bullet]) {
        self.bullet_notifications.fetch_add(1, Ordering::Relaxed);
        let count = bullets.len() as u64;
        self.bullets_shown.fetch_add(count, Ordering::Relaxed);
        self.bullets_per_notification_max
            .fetch_max(count, Ordering::Relaxed);
        if let Ok(mut shown) = self.bullet_senders_shown.lock() {
            for bullet in bullets {
                if shown.len() >= BULLET_SENDERS_TRACKED_MAX {
                    break;
                }
                if !shown.contains(&bullet.user_id) {
                    shown.insert(bullet.user_id.clone());
                }
            }
        }
    }

    fn record_latency(&self, shard: usize, latency_us: u64) {
        record_into(&self.latency_us, shard, latency_us);
    }

    fn merged_latency(&self) -> anyhow::Result<Histogram<u64>> {
        merge(&self.latency_us)
    }
}

fn record_into(shards: &[Mutex<Histogram<u64>>], shard: usize, latency_us: u64) {
    if let Some(histogram) = shards.get(shard % HISTOGRAM_SHARDS) {
        if let Ok(mut h) = histogram.lock() {
            h.saturating_record(latency_us.clamp(1, LATENCY_US_MAX));
        }
    }
}

fn merge(shards: &[Mutex<Histogram<u64>>]) -> anyhow::Result<Histogram<u64>> {
    let mut merged = Histogram::new_with_bounds(1, LATENCY_US_MAX, 3)?;
    for shard in shards {
        if let Ok(h) = shard.lock() {
            merged.add(&*h).context("merge histograms")?;
        }
    }
    Ok(merged)
}

fn latency_report(histogram: &Histogram<u64>) -> LatencyReport {
    let ms = |us: u64| us as f64 / 1000.0;
    LatencyReport {
        samples: histogram.len(),
        p50_ms: ms(histogram.value_at_quantile(0.5)),
        p90_ms: ms(histogram.value_at_quantile(0.9)),
        p99_ms: ms(histogram.value_at_quantile(0.99)),
        p999_ms: ms(histogram.value_at_quantile(0.999)),
        max_ms: ms(histogram.max()),
        mean_ms: histogram.mean() / 1000.0,
    }
}

/// Everything a virtual client task needs.
struct Plan {
    urls: Vec<String>,
    ca: PathBuf,
    encoding: Encoding,
    keys: TokenKeys,
    token_ttl_secs: u64,
    run_id: String,
    room_id: String,
    endpoints: Vec<quinn::Endpoint>,
}

impl Plan {
    fn config(&self, user: &str, index: usize) -> anyhow::Result<ClientConfig> {
        let token = self
            .keys
            .mint(user, &[], unix_now_secs(), self.token_ttl_secs)
            .context("mint token")?;
        let url = self.urls[index % self.urls.len().max(1)].clone();
        let mut config = ClientConfig::new(url, token);
        config.ca_path = Some(self.ca.clone());
        config.encoding = self.encoding;
        // Measure the server, not the reconnect logic: a lost connection is an error.
        config.reconnect = ReconnectPolicy::disabled();
        config.connect_timeout_ms = 15_000;
        config.request_timeout_ms = REQUEST_TIMEOUT_MS;
        config.quic_endpoint = match self.endpoints.len() {
            0 => None,
            n => self.endpoints.get(index % n).cloned(),
        };
        Ok(config)
    }
}

/// Runs `chorus loadgen`.
pub async fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    if args.quiz_viewers > 0 {
        return quiz::run(&args).await;
    }
    if args.vm_users > 0 {
        return voicemail::run(&args).await;
    }
    validate(&args)?;
    raise_open_files_limit(
        u64::from(args.listeners)
            + u64::from(args.grabbers)
            + u64::from(args.senders)
            + u64::from(args.reactors)
            + u64::from(args.speakers)
            + u64::from(args.bulleters)
            + 64,
    );
    let mut transports = Vec::new();
    for url in &args.urls {
        transports.push(ServerUrl::parse(url)?.transport());
    }
    let endpoints = quic_endpoints(&args).await?;
    let keys = TokenKeys::new(args.secret.as_bytes());
    let ramp_estimate_secs = f64::from(args.listeners) / args.connect_rate;
    let mut plan = Plan {
        urls: args.urls.clone(),
        ca: args.ca.clone(),
        encoding: if args.json_text {
            Encoding::Json
        } else {
            Encoding::MsgPack
        },
        keys,
        token_ttl_secs: 3600 + args.duration + ramp_estimate_secs as u64 * 2,
        run_id: format!("{:08x}", rand::random::<u32>()),
        room_id: String::new(),
        endpoints,
    };
    // The host stays in the room for the run: it invites the speakers to the stage.
    let mut host = None;
    plan.room_id = match &args.room {
        Some(room) => room.clone(),
        None => {
            let (room, client) = create_room(&plan).await?;
            host = Some(client);
            room
        }
    };
    let plan = Arc::new(plan);
    let stats = Arc::new(Stats::new()?);
    if args.grabbers > 0 {
        let report = rain::run(&args, plan.clone(), stats.clone()).await?;
        let text = serde_json::to_string_pretty(&report)?;
        println!("{text}");
        if let Some(path) = &args.json {
            std::fs::write(path, &text)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        if let Some(host) = host {
            host.close().await;
        }
        return Ok(());
    }
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    eprintln!(
        "loadgen: {} listeners, {} senders × {}/s, {} reactors × {}/s, {} bulleters × {}/s, {} speakers × {} ms frames, for {} s on {} (room {}, run {})",
        args.listeners,
        args.senders,
        args.rate,
        args.reactors,
        args.reaction_rate,
        args.bulleters,
        args.bullet_rate,
        args.speakers,
        args.frame_ms,
        args.duration,
        args.urls.join(" "),
        plan.room_id,
        plan.run_id
    );

    let progress = tokio::spawn(progress(
        stats.clone(),
        args.listeners,
        args.senders,
        stop.clone(),
    ));

    // Listeners run on threads of their own: they stand for clients on other machines, so
    // the senders' share of the work (each sender receives the room's comments too) must
    // not starve them, or the server would see slow listeners where it has none.
    let listener_runtime = ListenerRuntime::new()?;
    let ramp_started = Instant::now();
    ramp(args.listeners, args.connect_rate, |index| {
        tracker.spawn_on(
            listener(index, plan.clone(), stats.clone(), stop.clone()),
            listener_runtime.handle(),
        );
    })
    .await;
    let settle_deadline = Instant::now() + Duration::from_secs(30);
    wait_until(settle_deadline, || {
        stats.listeners_settled.load(Ordering::Relaxed) >= u64::from(args.listeners)
    })
    .await;
    let ramp_secs = ramp_started.elapsed().as_secs_f64();

    // Speakers: each joins and is invited to the stage by the host.
    let mut speakers = Vec::new();
    if args.speakers > 0 {
        let host = host
            .as_ref()
            .context("--speakers needs a room this run creates (no --room)")?;
        for index in 0..args.speakers as usize {
            match stage::put_on_stage(&plan, host, index, &stats).await {
                Some(client) => speakers.push(client),
                None => eprintln!("loadgen: speaker {index} did not get on stage"),
            }
        }
    }

    // Senders, reactors and speakers: connect and join, then start together. `finish`
    // (also cancelled by `stop`) tells those that overrun their time to stop sending and
    // stop counting.
    let start = CancellationToken::new();
    let finish = stop.child_token();
    let duration = Duration::from_secs(args.duration);
    let kinds = [
        (SendKind::Comment, args.senders, args.rate),
        (SendKind::Reaction, args.reactors, args.reaction_rate),
        (SendKind::Bullet, args.bulleters, args.bullet_rate),
    ];
    for (kind, count, rate_per_sec) in kinds {
        for index in 0..count as usize {
            tracker.spawn(sender(
                index,
                plan.clone(),
                stats.clone(),
                SendSchedule {
                    kind,
                    rate_per_sec,
                    senders: count,
                    duration,
                },
                start.clone(),
                finish.clone(),
                stop.clone(),
            ));
        }
    }
    let speakers_started = speakers.len() as u64;
    for client in speakers {
        tracker.spawn(stage::speaker(
            client,
            plan.clone(),
            stats.clone(),
            stage::Voice {
                frame_ms: args.frame_ms,
                frame_bytes: args.frame_bytes,
                duration,
            },
            start.clone(),
            finish.clone(),
            stop.clone(),
        ));
    }
    // Speakers that did not get on stage will never finish: count them now.
    for _ in speakers_started..u64::from(args.speakers) {
        drop(SenderFinished(stats.clone()));
    }
    let sending_clients =
        u64::from(args.senders) + u64::from(args.reactors) + u64::from(args.bulleters);
    wait_until(Instant::now() + Duration::from_secs(30), || {
        stats.senders_settled.load(Ordering::Relaxed) >= sending_clients
    })
    .await;
    if let Ok(mut started) = stats.sending_started.lock() {
        *started = Some(Instant::now());
    }
    start.cancel();

    // Wait for every sender to finish: sending ends at its own `duration`, then it collects
    // the answers still outstanding. Only then is the count of acknowledged comments final.
    let senders = sending_clients + u64::from(args.speakers);
    let all_finished = || stats.senders_finished.load(Ordering::Relaxed) >= senders;
    let senders_deadline = Instant::now()
        + Duration::from_secs(args.duration + SENDER_FINISH_SLACK_SECS)
        + Duration::from_millis(REQUEST_TIMEOUT_MS);
    wait_until(senders_deadline, all_finished).await;
    if !all_finished() {
        eprintln!(
            "loadgen: some senders overran their time; their outstanding comments are not counted"
        );
        finish.cancel();
        wait_until(
            Instant::now() + Duration::from_secs(SENDER_FINISH_SLACK_SECS),
            all_finished,
        )
        .await;
    }
    let last_send_finished = stats
        .last_sender_finished
        .lock()
        .ok()
        .and_then(|last| *last)
        .unwrap_or_else(Instant::now);

    // Drain: wait for every acknowledged comment to reach every listener, at most
    // `--drain-secs` from the moment the last sender finished.
    let listeners_joined = stats.listeners_joined.load(Ordering::Relaxed);
    let drain_deadline = last_send_finished + Duration::from_secs(args.drain_secs);
    wait_until(drain_deadline, || {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        load(&stats.deliveries) >= load(&stats.sent) * listeners_joined
            && load(&stats.reactions_counted) >= load(&stats.reactions_sent) * listeners_joined
            && load(&stats.audio_received) >= load(&stats.audio_sent) * listeners_joined
    })
    .await;
    let sending_secs = stats
        .sending_started
        .lock()
        .ok()
        .and_then(|started| *started)
        .map(|started| {
            last_send_finished
                .saturating_duration_since(started)
                .as_secs_f64()
        })
        .unwrap_or(0.0);

    stop.cancel();
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(SHUTDOWN_WAIT_SECS), tracker.wait())
        .await
        .is_err()
    {
        eprintln!("loadgen: some clients did not close within {SHUTDOWN_WAIT_SECS} s");
    }
    let _ = progress.await;
    if let Some(host) = host {
        host.close().await;
    }

    let report = report(
        &args,
        &plan,
        &transports,
        &stats,
        listeners_joined,
        ramp_secs,
        sending_secs,
    )?;
    print_report(&report);
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("loadgen: report written to {}", path.display());
    }
    for endpoint in &plan.endpoints {
        endpoint.close(quinn::VarInt::from_u32(1000), b"loadgen done");
    }
    Ok(())
}

fn validate(args: &LoadgenArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.listeners <= LISTENERS_MAX,
        "--listeners must be at most {LISTENERS_MAX}"
    );
    anyhow::ensure!(!args.urls.is_empty(), "give at least one --url");
    if args.grabbers > 0 {
        rain::validate(args)?;
    }
    anyhow::ensure!(
        args.senders <= SENDERS_MAX
            && args.reactors <= SENDERS_MAX
            && args.bulleters <= SENDERS_MAX,
        "--senders, --reactors and --bulleters must be at most {SENDERS_MAX}"
    );
    anyhow::ensure!(
        args.speakers <= SPEAKERS_MAX,
        "--speakers must be at most {SPEAKERS_MAX}"
    );
    anyhow::ensure!(
        args.senders + args.reactors + args.bulleters + args.speakers + args.grabbers > 0,
        "give --senders, --reactors, --bulleters, --speakers or --grabbers"
    );
    for (name, rate) in [
        ("--rate", args.rate),
        ("--reaction-rate", args.reaction_rate),
        ("--bullet-rate", args.bullet_rate),
    ] {
        anyhow::ensure!(
            rate > 0.0 && rate <= RATE_PER_SEC_MAX,
            "{name} must be in (0, {RATE_PER_SEC_MAX}]"
        );
    }
    anyhow::ensure!(
        (10..=60).contains(&args.frame_ms),
        "--frame-ms must be 10-60 (Opus frame sizes)"
    );
    anyhow::ensure!(
        (stage::FRAME_HEADER_BYTES..=chorus_protocol::audio::AUDIO_PAYLOAD_BYTES_MAX)
            .contains(&args.frame_bytes),
        "--frame-bytes must be {}-{}",
        stage::FRAME_HEADER_BYTES,
        chorus_protocol::audio::AUDIO_PAYLOAD_BYTES_MAX
    );
    anyhow::ensure!(
        (1..=DURATION_SECS_MAX).contains(&args.duration),
        "--duration must be 1-{DURATION_SECS_MAX} seconds"
    );
    anyhow::ensure!(
        args.connect_rate >= 1.0 && args.connect_rate.is_finite(),
        "--connect-rate must be at least 1"
    );
    anyhow::ensure!(args.drain_secs <= 600, "--drain-secs must be at most 600");
    Ok(())
}

/// Raises the soft open-files limit to the hard limit; warns if it stays below `needed`.
fn raise_open_files_limit(needed: u64) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < needed => eprintln!(
            "loadgen: warning: open-files limit is {limit}, {needed} are needed; raise the hard limit (ulimit -Hn) or use fewer clients"
        ),
        Ok(_) => {}
        Err(e) => eprintln!("loadgen: warning: cannot raise the open-files limit: {e}"),
    }
}

/// Shared QUIC endpoints, one per [`QUIC_CLIENTS_PER_ENDPOINT`] clients (an endpoint
/// connects to any server of the address family of the first QUIC URL).
async fn quic_endpoints(args: &LoadgenArgs) -> anyhow::Result<Vec<quinn::Endpoint>> {
    let mut quic = None;
    for url in &args.urls {
        if let ServerUrl::Quic { host, port, .. } = ServerUrl::parse(url)? {
            quic = Some((host, port));
            break;
        }
    }
    let Some((host, port)) = quic else {
        return Ok(Vec::new());
    };
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await?
        .next()
        .with_context(|| format!("{host} resolves to no address"))?;
    let clients = args.listeners as usize
        + args.grabbers as usize
        + args.senders as usize
        + args.reactors as usize
        + args.speakers as usize
        + args.bulleters as usize
        + 1;
    let count = clients.div_ceil(QUIC_CLIENTS_PER_ENDPOINT).max(1);
    (0..count)
        .map(|_| client_endpoint(addr).context("cannot bind a UDP socket"))
        .collect()
}

/// The room's host, in the room for the run: a task drains its events; requests go
/// through `requester`.
struct Host {
    requester: crate::client::Requester,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Host {
    async fn close(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(SHUTDOWN_WAIT_SECS), self.task).await;
    }
}

/// Creates the room and joins its host, which stays for the run.
async fn create_room(plan: &Plan) -> anyhow::Result<(String, Host)> {
    let mut host = Client::connect(plan.config(&format!("lg-host-{}", plan.run_id), 0)?)
        .await
        .context("cannot connect to create the room")?;
    let created = host
        .request(RoomCreateRequest {
            title: format!("loadgen {}", plan.run_id),
            scheduled_start_ms: None,
        })
        .await
        .context("room.create failed")?;
    host.request(RoomRef {
        room_id: created.room_id.clone(),
    })
    .await
    .context("the host cannot join the room")?;
    let requester = host.requester();
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    // The host's own notifications are not measured: drain them.
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stopped.cancelled() => break,
                event = host.next_event() => if event.is_none() { break },
            }
        }
        host.close().await;
    });
    Ok((
        created.room_id,
        Host {
            requester,
            stop,
            task,
        },
    ))
}

/// The runtime the listeners run on (see [`run`]); shut down without waiting when
/// dropped (its tasks have ended by then, or are abandoned with the run).
struct ListenerRuntime {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl ListenerRuntime {
    fn new() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name("loadgen-listeners")
            .enable_all()
            .build()
            .context("cannot start the listeners' runtime")?;
        Ok(ListenerRuntime {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

impl Drop for ListenerRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Calls `spawn(i)` for `i` in `0..count`, `per_sec` a second, in 10 ms steps (the ramp of
/// a run's connections).
async fn ramp(count: u32, per_sec: f64, mut spawn: impl FnMut(usize)) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut spawned: u32 = 0;
    while spawned < count {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * per_sec).ceil() as u64;
        let due = due.clamp(1, u64::from(count)) as u32;
        while spawned < due {
            spawn(spawned as usize);
            spawned += 1;
        }
    }
}

/// The admin API of the run: `--admin-url`, else the first WebSocket `--url`'s host.
fn admin_url(args: &LoadgenArgs) -> anyhow::Result<String> {
    if let Some(url) = &args.admin_url {
        return Ok(url.clone());
    }
    let url = ServerUrl::parse(&args.urls[0])?;
    anyhow::ensure!(
        url.transport() == TransportKind::WebSocket,
        "give --admin-url (http://HOST:PORT) with QUIC URLs"
    );
    Ok(args.urls[0]
        .replacen("ws://", "http://", 1)
        .trim_end_matches("/ws")
        .to_string())
}

async fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) {
    while !done() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Connects and joins; counts a failure under `stage`.
async fn connect_and_join(
    plan: &Plan,
    user: &str,
    index: usize,
    stats: &Stats,
    stage: &str,
) -> Option<Client> {
    let config = match plan.config(user, index) {
        Ok(config) => config,
        Err(e) => {
            tracing::warn!(error = %e, "cannot build client configuration");
            stats.errors.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    let mut client = match Client::connect(config).await {
        Ok(client) => client,
        Err(e) => {
            stats.error(&format!("{stage} connect"), &e);
            return None;
        }
    };
    match client
        .request(RoomRef {
            room_id: plan.room_id.clone(),
        })
        .await
    {
        Ok(_) => Some(client),
        Err(e) => {
            stats.error(&format!("{stage} join"), &e);
            client.close().await;
            None
        }
    }
}

async fn listener(index: usize, plan: Arc<Plan>, stats: Arc<Stats>, stop: CancellationToken) {
    let user = format!("lg-{}-l{index}", plan.run_id);
    let joined = tokio::select! {
        _ = stop.cancelled() => None,
        client = connect_and_join(&plan, &user, index, &stats, "listener") => client,
    };
    stats.listeners_settled.fetch_add(1, Ordering::Relaxed);
    let Some(mut client) = joined else { return };
    stats.listeners_joined.fetch_add(1, Ordering::Relaxed);
    let mut audio = client.take_audio();
    let mut voice = stage::Heard::default();
    let prefix = format!("{COMMENT_PREFIX} {} ", plan.run_id);
    let mut last_comment_id = 0u64;
    let mut received = IdSet::default();
    // One wait for the end of the run, not one per event.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let event = tokio::select! {
            _ = &mut stopped => break,
            Some(frame) = async {
                match audio.as_mut() {
                    Some(audio) => audio.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                voice.frame(index, &frame, &stats);
                continue;
            }
            event = client.next_event() => event,
        };
        if let Some(ClientEvent::Notification { .. }) = &event {
            stats.notifications.fetch_add(1, Ordering::Relaxed);
        }
        match event {
            Some(ClientEvent::Notification {
                event: Event::Comment(comment),
                ..
            }) => {
                if comment.comment_id <= last_comment_id {
                    stats.order_violations.fetch_add(1, Ordering::Relaxed);
                }
                last_comment_id = comment.comment_id;
                let Some(rest) = comment.text.strip_prefix(&prefix) else {
                    continue;
                };
                received.insert(comment.comment_id);
                let now_us = unix_now_us();
                if let Some(sent_us) = rest.rsplit(' ').next().and_then(|t| t.parse::<u64>().ok()) {
                    stats.record_latency(index, now_us.saturating_sub(sent_us));
                }
                stats.deliveries.fetch_add(1, Ordering::Relaxed);
                stats.last_delivery_us.fetch_max(now_us, Ordering::Relaxed);
            }
            Some(ClientEvent::Notification {
                event: Event::Reactions(reactions),
                ..
            }) => {
                stats.reaction_notifications.fetch_add(1, Ordering::Relaxed);
                let counted: u64 = reactions
                    .counts
                    .iter()
                    .filter(|(emoji, _)| emoji.as_str() == REACTION_EMOJI)
                    .map(|(_, count)| *count)
                    .sum();
                stats
                    .reactions_counted
                    .fetch_add(counted, Ordering::Relaxed);
            }
            Some(ClientEvent::Notification {
                event: Event::Bullets(shown),
                ..
            }) => stats.bullets_shown(&shown.bullets),
            Some(ClientEvent::Disconnected { code, reason }) => {
                stats.disconnects.fetch_add(1, Ordering::Relaxed);
                stats.error("listener", &ClientError::Closed { code, reason });
            }
            Some(ClientEvent::Closed { .. }) | None => break,
            Some(_) => {}
        }
    }
    if let Ok(mut delivered) = stats.delivered.lock() {
        delivered.push(received);
    }
    client.close().await;
}

/// What a sending client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendKind {
    /// Comments carrying their send time (`--senders`).
    Comment,
    /// Reactions (`--reactors`).
    Reaction,
    /// Bullet comments (`--bulleters`).
    Bullet,
}

impl SendKind {
    /// The user id letter and the error stage name.
    fn names(self) -> (&'static str, &'static str) {
        match self {
            SendKind::Comment => ("s", "sender comment"),
            SendKind::Reaction => ("r", "reactor reaction"),
            SendKind::Bullet => ("b", "bulleter bullet"),
        }
    }
}

/// When and how fast a sender sends.
#[derive(Debug, Clone, Copy)]
struct SendSchedule {
    kind: SendKind,
    rate_per_sec: f64,
    senders: u32,
    duration: Duration,
}

/// Marks a sender finished when dropped (on every way out of its sending phase): from then
/// on it counts nothing more.
struct SenderFinished(Arc<Stats>);

impl Drop for SenderFinished {
    fn drop(&mut self) {
        if let Ok(mut last) = self.0.last_sender_finished.lock() {
            let now = Instant::now();
            *last = Some(last.map_or(now, |t| t.max(now)));
        }
        self.0.senders_finished.fetch_add(1, Ordering::Relaxed);
    }
}

/// One sender. `finish` (a child of `stop`) ends sending and counting early; `stop` ends
/// the task.
async fn sender(
    index: usize,
    plan: Arc<Plan>,
    stats: Arc<Stats>,
    schedule: SendSchedule,
    start: CancellationToken,
    finish: CancellationToken,
    stop: CancellationToken,
) {
    let finished = SenderFinished(stats.clone());
    let (letter, _) = schedule.kind.names();
    let user = format!("lg-{}-{letter}{index}", plan.run_id);
    let joined = tokio::select! {
        _ = finish.cancelled() => None,
        client = connect_and_join(&plan, &user, index, &stats, "sender") => client,
    };
    stats.senders_settled.fetch_add(1, Ordering::Relaxed);
    let Some(mut client) = joined else { return };
    match schedule.kind {
        SendKind::Comment => stats.senders_joined.fetch_add(1, Ordering::Relaxed),
        SendKind::Reaction => stats.reactors_joined.fetch_add(1, Ordering::Relaxed),
        SendKind::Bullet => stats.bulleters_joined.fetch_add(1, Ordering::Relaxed),
    };
    // Senders also receive the room's comments: drain them while waiting.
    loop {
        tokio::select! {
            _ = finish.cancelled() => { client.close().await; return; }
            _ = start.cancelled() => break,
            event = client.next_event() => if event.is_none() { return },
        }
    }
    let period = Duration::from_secs_f64(1.0 / schedule.rate_per_sec);
    // Spread the senders over one period so their comments do not arrive in bursts.
    let offset = period.mul_f64(index as f64 / f64::from(schedule.senders.max(1)));
    let started = Instant::now();
    let end = started + schedule.duration;
    let mut tick = tokio::time::interval_at(started + offset, period);
    // Burst: a tick delayed by a busy CPU is made up at once, so the rate is the one asked for.
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    // Open loop: comments leave on schedule whether or not earlier ones were answered, so
    // a slow server shows up as latency, not as a lower send rate.
    let requester = client.requester();
    let mut in_flight = tokio::task::JoinSet::new();
    let mut n = 0u64;
    let run_end = tokio::time::sleep_until(end);
    tokio::pin!(run_end);
    let finished_early = finish.cancelled();
    tokio::pin!(finished_early);
    loop {
        // Biased: the end of the run wins over a tick that is ready at the same time.
        tokio::select! {
            biased;
            _ = &mut finished_early => break,
            _ = &mut run_end => break,
            Some(done) = in_flight.join_next() => record_send(&stats, schedule.kind, index, done),
            scheduled = tick.tick() => {
                // No comment at or after the end: neither a tick due at the end itself nor
                // a late (made-up) tick that fires after it.
                if !may_send(scheduled, Instant::now(), end) {
                    break;
                }
                if in_flight.len() >= SENDER_IN_FLIGHT_MAX {
                    stats.skipped_in_flight.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let requester = requester.clone();
                let room_id = plan.room_id.clone();
                match schedule.kind {
                    SendKind::Comment => {
                        let sent_us = unix_now_us();
                        let text = format!("{COMMENT_PREFIX} {} {index} {n} {sent_us}", plan.run_id);
                        let _ = stats.first_send_us.compare_exchange(0, sent_us, Ordering::Relaxed, Ordering::Relaxed);
                        let sent = Instant::now();
                        in_flight.spawn(async move {
                            (sent, requester.request(RoomCommentRequest { room_id, text, request_id: None }).await.map(|r| Some(r.comment_id)))
                        });
                    }
                    SendKind::Reaction => {
                        let emoji = REACTION_EMOJI.to_string();
                        let sent = Instant::now();
                        in_flight.spawn(async move {
                            (sent, requester.request(RoomReactRequest { room_id, emoji }).await.map(|_| None))
                        });
                    }
                    SendKind::Bullet => {
                        let text = format!("{COMMENT_PREFIX} {index} {n}");
                        let sent = Instant::now();
                        in_flight.spawn(async move {
                            (sent, requester.request(RoomBulletRequest { room_id, text }).await.map(|_| None))
                        });
                    }
                }
                n += 1;
            }
            event = client.next_event() => match event {
                Some(ClientEvent::Disconnected { code, reason }) => {
                    stats.disconnects.fetch_add(1, Ordering::Relaxed);
                    stats.error("sender", &ClientError::Closed { code, reason });
                }
                Some(ClientEvent::Closed { .. }) | None => break,
                Some(_) => {}
            },
        }
    }
    // Collect the answers still outstanding (each bounded by the request timeout).
    while !in_flight.is_empty() {
        tokio::select! {
            biased;
            _ = finish.cancelled() => break,
            Some(done) = in_flight.join_next() => record_send(&stats, schedule.kind, index, done),
            event = client.next_event() => if event.is_none() { break },
        }
    }
    // Answers already in count; the rest are abandoned uncounted (told to finish early, or
    // the connection closed).
    while let Some(done) = in_flight.try_join_next() {
        record_send(&stats, schedule.kind, index, done);
    }
    in_flight.abort_all();
    drop(in_flight);
    drop(finished);
    drain_then_close(client, &stop).await;
}

/// Reads (and drops) the client's events until the run stops, so the server never sees
/// a slow consumer; then closes it.
async fn drain_then_close(mut client: Client, stop: &CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            event = client.next_event() => if event.is_none() { break },
        }
    }
    client.close().await;
}

/// Whether a tick scheduled at `scheduled` and firing at `now` may still send: both must
/// be before the end of the run.
fn may_send(scheduled: Instant, now: Instant, end: Instant) -> bool {
    scheduled < end && now < end
}

/// Counts an acknowledged comment or reaction as sent; a failed one as an error.
fn record_send(
    stats: &Stats,
    kind: SendKind,
    index: usize,
    done: Result<(Instant, Result<Option<u64>, ClientError>), tokio::task::JoinError>,
) {
    let done = done.map(|(sent, result)| {
        if kind == SendKind::Comment {
            let us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
            match &result {
                Ok(_) => record_into(&stats.answer_us, index, us),
                Err(ClientError::Server(_)) => record_into(&stats.refusal_us, index, us),
                Err(_) => {}
            }
        }
        result
    });
    match &done {
        Ok(Err(ClientError::Server(error))) => {
            if let Ok(mut refusals) = stats.refusals.lock() {
                *refusals.entry(error.code).or_insert(0) += 1;
            }
        }
        Ok(Err(ClientError::Timeout { .. })) => {
            stats.timeouts.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
    match done {
        Ok(Ok(comment_id)) => {
            let counter = match kind {
                SendKind::Comment => &stats.sent,
                SendKind::Reaction => &stats.reactions_sent,
                SendKind::Bullet => &stats.bullets_sent,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            if let (Some(id), Ok(mut acked)) = (comment_id, stats.acked.lock()) {
                acked.insert(id);
            }
        }
        // Bullets above the per-user rate are refused by design: counted, not errors.
        Ok(Err(ClientError::Server(error)))
            if kind == SendKind::Bullet && error.code == ErrorCode::RateLimited.as_u16() =>
        {
            stats.bullets_rate_limited.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Err(e)) => stats.error(kind.names().1, &e),
        Err(e) => {
            tracing::warn!(error = %e, "comment task failed");
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn progress(stats: Arc<Stats>, listeners: u32, senders: u32, stop: CancellationToken) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick.tick().await;
    let (mut last_sent, mut last_deliveries) = (0u64, 0u64);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let sent = stats.sent.load(Ordering::Relaxed);
        let deliveries = stats.deliveries.load(Ordering::Relaxed);
        eprintln!(
            "[{:>4}s] listeners {}/{} · senders {}/{} · sent {} (+{}/s) · deliveries {} (+{}/s) · errors {}",
            started.elapsed().as_secs(),
            stats.listeners_joined.load(Ordering::Relaxed),
            listeners,
            stats.senders_joined.load(Ordering::Relaxed),
            senders,
            sent,
            sent - last_sent,
            deliveries,
            deliveries - last_deliveries,
            stats.errors.load(Ordering::Relaxed),
        );
        (last_sent, last_deliveries) = (sent, deliveries);
    }
}

fn report(
    args: &LoadgenArgs,
    plan: &Plan,
    transports: &[TransportKind],
    stats: &Stats,
    listeners_joined: u64,
    ramp_secs: f64,
    sending_secs: f64,
) -> anyhow::Result<LoadgenReport> {
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    let ratio = |got: u64, expected: u64| {
        if expected > 0 {
            got as f64 / expected as f64
        } else {
            0.0
        }
    };
    let per_listener_per_sec = |count: u64| {
        if listeners_joined > 0 && sending_secs > 0.0 {
            count as f64 / listeners_joined as f64 / sending_secs
        } else {
            0.0
        }
    };
    let sent = load(&stats.sent);
    let deliveries = load(&stats.deliveries);
    let expected = sent * listeners_joined;
    let first = load(&stats.first_send_us);
    let last = load(&stats.last_delivery_us);
    let window_secs = if last > first && first > 0 {
        (last - first) as f64 / 1e6
    } else {
        0.0
    };
    let label = |t: &TransportKind| match t {
        TransportKind::WebSocket => "websocket",
        TransportKind::Quic => "quic",
    };
    let transport = match transports.split_first() {
        Some((first, rest)) if rest.iter().all(|t| t == first) => label(first).to_string(),
        _ => "mixed".to_string(),
    };
    let reactions = (args.reactors > 0).then(|| {
        let reactions_sent = load(&stats.reactions_sent);
        let notifications = load(&stats.reaction_notifications);
        ReactionsReport {
            reactors_connected: load(&stats.reactors_joined),
            reactions_sent,
            reactions_per_sec: if sending_secs > 0.0 {
                reactions_sent as f64 / sending_secs
            } else {
                0.0
            },
            notifications,
            notifications_per_listener_per_sec: per_listener_per_sec(notifications),
            reactions_counted: load(&stats.reactions_counted),
            reactions_expected: reactions_sent * listeners_joined,
        }
    });
    let bullets = (args.bulleters > 0).then(|| {
        let notifications = load(&stats.bullet_notifications);
        BulletsReport {
            bulleters_connected: load(&stats.bulleters_joined),
            bullets_sent: load(&stats.bullets_sent),
            bullets_rate_limited: load(&stats.bullets_rate_limited),
            notifications,
            shown_per_listener_per_sec: per_listener_per_sec(load(&stats.bullets_shown)),
            per_notification_max: load(&stats.bullets_per_notification_max),
            senders_shown: stats
                .bullet_senders_shown
                .lock()
                .map(|s| s.len() as u64)
                .unwrap_or(0),
        }
    });
    let voice = if args.speakers > 0 {
        let frames_sent = load(&stats.audio_sent);
        let frames_received = load(&stats.audio_received);
        Some(VoiceReport {
            speakers_connected: load(&stats.speakers_joined),
            frames_per_sec_per_speaker: 1000.0 / args.frame_ms as f64,
            frames_sent,
            frames_received,
            frames_expected: frames_sent * listeners_joined,
            delivery_ratio: ratio(frames_received, frames_sent * listeners_joined),
            order_violations: load(&stats.audio_order_violations),
            latency: latency_report(&merge(&stats.audio_latency_us)?),
        })
    } else {
        None
    };
    let acknowledged = if args.senders > 0 {
        let acked = stats.acked.lock().map(|a| a.clone()).unwrap_or_default();
        let delivered = stats
            .delivered
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default();
        let mut report = AckReport {
            acknowledged: acked.len,
            listeners_checked: delivered.len() as u64,
            delivered_acknowledged_min: u64::MAX,
            delivered_acknowledged_max: 0,
            listeners_missing_acknowledged: 0,
            acknowledged_missed_total: 0,
            delivered_unacknowledged_total: 0,
        };
        for listener in &delivered {
            let (both, missed) = acked.compare(listener);
            let (_, unacked) = listener.compare(&acked);
            report.delivered_acknowledged_min = report.delivered_acknowledged_min.min(both);
            report.delivered_acknowledged_max = report.delivered_acknowledged_max.max(both);
            if missed > 0 {
                report.listeners_missing_acknowledged += 1;
            }
            report.acknowledged_missed_total += missed;
            report.delivered_unacknowledged_total += unacked;
        }
        if delivered.is_empty() {
            report.delivered_acknowledged_min = 0;
        }
        Some(report)
    } else {
        None
    };
    let refusals_by_code = stats
        .refusals
        .lock()
        .map(|r| {
            r.iter()
                .map(|(code, count)| {
                    let name = chorus_protocol::ErrorCode::from_u16(*code)
                        .map_or("unknown", chorus_protocol::ErrorCode::name);
                    (format!("{code} {name}"), *count)
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(LoadgenReport {
        acknowledged,
        refusals_by_code,
        timeouts: load(&stats.timeouts),
        answer_latency: latency_report(&merge(&stats.answer_us)?),
        refusal_latency: latency_report(&merge(&stats.refusal_us)?),
        skipped_in_flight: load(&stats.skipped_in_flight),
        urls: args.urls.clone(),
        transport,
        room_id: plan.room_id.clone(),
        listeners_target: args.listeners,
        listeners_connected: listeners_joined,
        senders_target: args.senders,
        senders_connected: load(&stats.senders_joined),
        rate_per_sender: args.rate,
        duration_secs: args.duration,
        ramp_secs,
        comments_sent: sent,
        deliveries,
        expected_deliveries: expected,
        delivery_ratio: ratio(deliveries, expected),
        deliveries_per_sec: if window_secs > 0.0 {
            deliveries as f64 / window_secs
        } else {
            0.0
        },
        latency: latency_report(&stats.merged_latency()?),
        order_violations: load(&stats.order_violations),
        disconnects: load(&stats.disconnects),
        errors: load(&stats.errors),
        errors_by_kind: stats
            .errors_by_kind
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default(),
        notifications_per_listener_per_sec: per_listener_per_sec(load(&stats.notifications)),
        reactions,
        voice,
        bullets,
    })
}

fn print_report(r: &LoadgenReport) {
    println!(
        "loadgen report ({} {}, room {})",
        r.transport,
        r.urls.join(" "),
        r.room_id
    );
    println!(
        "  listeners connected   {}/{} (ramp {:.1} s)",
        r.listeners_connected, r.listeners_target, r.ramp_secs
    );
    // Only the lines of what this run did: a run without senders has no comments.
    if r.senders_target > 0 {
        println!(
            "  senders connected     {}/{} at {}/s for {} s",
            r.senders_connected, r.senders_target, r.rate_per_sender, r.duration_secs
        );
        println!("  comments sent         {}", r.comments_sent);
        println!(
            "  deliveries            {} of {} expected ({:.2}%)",
            r.deliveries,
            r.expected_deliveries,
            r.delivery_ratio * 100.0
        );
        println!("  deliveries/s          {:.0}", r.deliveries_per_sec);
        println!(
            "  latency ms            p50 {:.2} · p90 {:.2} · p99 {:.2} · p999 {:.2} · max {:.2} · mean {:.2}",
            r.latency.p50_ms,
            r.latency.p90_ms,
            r.latency.p99_ms,
            r.latency.p999_ms,
            r.latency.max_ms,
            r.latency.mean_ms
        );
        println!("  order violations      {}", r.order_violations);
        for (what, l) in [
            ("answered ok", &r.answer_latency),
            ("refused", &r.refusal_latency),
        ] {
            if l.samples > 0 {
                println!(
                    "  {what:<21} {} comments, ms p50 {:.2} · p99 {:.2} · max {:.2}",
                    l.samples, l.p50_ms, l.p99_ms, l.max_ms
                );
            }
        }
        if r.skipped_in_flight > 0 {
            println!(
                "  skipped               {} sends: {SENDER_IN_FLIGHT_MAX} of the sender's requests unanswered",
                r.skipped_in_flight
            );
        }
        if let Some(a) = &r.acknowledged {
            println!(
                "  acknowledged          {} comments; each of {} listeners received {}-{} of them; {} listeners missed {} in all; {} deliveries of comments never acknowledged",
                a.acknowledged,
                a.listeners_checked,
                a.delivered_acknowledged_min,
                a.delivered_acknowledged_max,
                a.listeners_missing_acknowledged,
                a.acknowledged_missed_total,
                a.delivered_unacknowledged_total
            );
        }
    }
    if !r.refusals_by_code.is_empty() || r.timeouts > 0 {
        let refusals: Vec<String> = r
            .refusals_by_code
            .iter()
            .map(|(code, count)| format!("{code}: {count}"))
            .collect();
        println!(
            "  refused               {} · timeouts {}",
            if refusals.is_empty() {
                "none".to_string()
            } else {
                refusals.join(", ")
            },
            r.timeouts
        );
    }
    println!(
        "  notifications/listener/s {:.2}",
        r.notifications_per_listener_per_sec
    );
    if let Some(x) = &r.reactions {
        println!(
            "  reactions             {} sent by {} reactors ({:.0}/s); {} room.reactions notifications ({:.2} per listener per s); counted {} of {} expected",
            x.reactions_sent,
            x.reactors_connected,
            x.reactions_per_sec,
            x.notifications,
            x.notifications_per_listener_per_sec,
            x.reactions_counted,
            x.reactions_expected
        );
    }
    if let Some(b) = &r.bullets {
        println!(
            "  bullets               {} sent by {} bulleters, {} rate limited; {} room.bullets notifications, {:.2} bullets per listener per s (at most {} in one), {} senders shown",
            b.bullets_sent,
            b.bulleters_connected,
            b.bullets_rate_limited,
            b.notifications,
            b.shown_per_listener_per_sec,
            b.per_notification_max,
            b.senders_shown
        );
    }
    if let Some(v) = &r.voice {
        println!(
            "  voice                 {} speakers × {:.0} frames/s: {} sent, {} of {} expected received ({:.2}%), {} out of order",
            v.speakers_connected,
            v.frames_per_sec_per_speaker,
            v.frames_sent,
            v.frames_received,
            v.frames_expected,
            v.delivery_ratio * 100.0,
            v.order_violations
        );
        println!(
            "  voice latency ms      p50 {:.2} · p90 {:.2} · p99 {:.2} · p999 {:.2} · max {:.2} · mean {:.2}",
            v.latency.p50_ms,
            v.latency.p90_ms,
            v.latency.p99_ms,
            v.latency.p999_ms,
            v.latency.max_ms,
            v.latency.mean_ms
        );
    }
    println!("  disconnects           {}", r.disconnects);
    println!("  errors                {}", r.errors);
    for (kind, count) in &r.errors_by_kind {
        println!("    {kind}: {count}");
    }
}

/// Microseconds since the Unix epoch.
fn unix_now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn id_sets_tell_acknowledged_from_delivered() {
        let mut acked = IdSet::default();
        let mut got = IdSet::default();
        for id in [1, 2, 3, 64, 65, 200] {
            acked.insert(id);
        }
        for id in [1, 3, 64, 65, 200, 201, 201] {
            got.insert(id);
        }
        assert_eq!(acked.len, 6);
        assert_eq!(got.len, 6, "a repeat counts once");
        assert_eq!(acked.compare(&got), (5, 1), "5 delivered, comment 2 missed");
        assert_eq!(
            got.compare(&acked),
            (5, 1),
            "201 delivered, never acknowledged"
        );
        got.insert(IdSet::ID_MAX + 1);
        assert_eq!(got.untracked, 1);
    }

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: LoadgenArgs,
    }

    fn parse(extra: &[&str]) -> LoadgenArgs {
        let mut argv = vec!["loadgen"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).expect("parses").args
    }

    #[test]
    fn defaults_are_valid() {
        validate(&parse(&[])).expect("defaults");
    }

    #[test]
    fn out_of_range_options_are_refused() {
        assert!(validate(&parse(&["--listeners", "100001"])).is_err());
        assert!(validate(&parse(&["--senders", "0"])).is_err());
        assert!(validate(&parse(&["--rate", "0"])).is_err());
        assert!(validate(&parse(&["--rate", "NaN"])).is_err());
        assert!(validate(&parse(&["--duration", "0"])).is_err());
        assert!(validate(&parse(&["--connect-rate", "0.5"])).is_err());
    }

    #[test]
    fn no_tick_is_sent_at_or_after_the_end() {
        let start = Instant::now();
        let end = start + Duration::from_secs(20);
        let before = end - Duration::from_millis(1);
        assert!(may_send(start, start, end));
        assert!(may_send(before, before, end));
        // A tick due exactly at the end (duration × rate ticks fit exactly) is not sent.
        assert!(!may_send(end, end, end));
        // Nor is a made-up tick that was due before the end but fires after it.
        assert!(!may_send(before, end + Duration::from_millis(5), end));
        assert!(!may_send(end + Duration::from_millis(500), end, end));
    }

    #[test]
    fn a_finished_sender_is_counted_once_with_its_time() {
        let stats = Arc::new(Stats::new().expect("stats"));
        drop(SenderFinished(stats.clone()));
        let first = stats
            .last_sender_finished
            .lock()
            .expect("lock")
            .expect("set");
        drop(SenderFinished(stats.clone()));
        let last = stats
            .last_sender_finished
            .lock()
            .expect("lock")
            .expect("set");
        assert_eq!(stats.senders_finished.load(Ordering::Relaxed), 2);
        assert!(last >= first);
    }

    #[test]
    fn shards_merge_into_one_histogram() {
        let stats = Stats::new().expect("stats");
        for i in 0..1000u64 {
            stats.record_latency(i as usize, 1000 + i);
        }
        stats.record_latency(3, u64::MAX);
        let merged = stats.merged_latency().expect("merge");
        assert_eq!(merged.len(), 1001);
        assert!(merged.max() >= LATENCY_US_MAX);
        let p50 = merged.value_at_quantile(0.5);
        assert!((1490..=1510).contains(&p50), "p50 {p50}");
    }
}
