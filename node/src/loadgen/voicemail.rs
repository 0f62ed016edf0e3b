//! `chorus loadgen --vm-users N`: voice messages under load (SPEC M1-M4).
//!
//! N users are spread over the `--url`s (user i on URL i mod the count); for `--duration`
//! seconds each sends voice messages of `--vm-message-secs` seconds to the next user (on
//! the next URL: another node), one page (1 s of audio) per chunk, as fast as the cluster
//! acknowledges them. The recipients listen. Reported: messages completed per second,
//! chunks acknowledged per second, the chunk latency (send to acknowledgement: stored on
//! two nodes), and the time from a chunk's acknowledgement to its recipient, on another
//! node, being told (`vm.bytes`), p50/p99.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use chorus_actors::voicemail::ogg::build_stream;
use chorus_protocol::{Event, VmChunkRequest, VmSendRequest, VmUploadStatus};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{
    latency_report, quic_endpoints, raise_open_files_limit, LatencyReport, LoadgenArgs, Plan,
    LATENCY_US_MAX, SHUTDOWN_WAIT_SECS,
};
use crate::client::{Client, ClientEvent};
use crate::token::TokenKeys;

/// Most users one run starts.
pub const VM_USERS_MAX: u32 = 10_000;
/// Longest message, seconds (the node's default bound is 60 s).
pub const VM_MESSAGE_SECS_MAX: u32 = 60;
/// Opus packets per page (and so per chunk): 1 s of 20 ms packets.
const PACKETS_PER_PAGE: usize = 50;
/// Bytes of each synthetic 20 ms packet (about 24 kbit/s).
const PACKET_BYTES: usize = 60;

/// The voice-message run's report.
#[derive(Debug, Clone, Serialize)]
pub struct VoiceLoadReport {
    /// Users connected (senders and recipients at once).
    pub users_connected: u64,
    /// Seconds of sending.
    pub sending_secs: f64,
    /// Bytes of each message.
    pub message_bytes: u64,
    /// Messages started.
    pub messages_started: u64,
    /// Messages whose upload completed.
    pub messages_completed: u64,
    /// Completed per second.
    pub messages_per_sec: f64,
    /// Chunks acknowledged.
    pub chunks_acked: u64,
    /// Acknowledged per second.
    pub chunks_per_sec: f64,
    /// Requests that failed.
    pub errors: u64,
    /// From sending a chunk to its acknowledgement (stored on two nodes).
    pub chunk_latency: LatencyReport,
    /// From a chunk's acknowledgement to the recipient (on another node) getting
    /// `vm.bytes` for it.
    pub chunk_to_recipient: LatencyReport,
}

/// When a chunk was acknowledged and when its recipient was told (in either order).
type Times = (Option<Instant>, Option<Instant>);

#[derive(Default)]
struct VoiceStats {
    started: AtomicU64,
    completed: AtomicU64,
    chunks: AtomicU64,
    errors: AtomicU64,
    /// (message, acked) → (acknowledged at, recipient told at).
    pending: Mutex<HashMap<(String, u64), Times>>,
    /// Message → its sender's index (the sender's own sessions get `vm.bytes` too).
    senders: Mutex<HashMap<String, usize>>,
}

fn record(
    stats: &VoiceStats,
    histogram: &Mutex<Histogram<u64>>,
    key: (String, u64),
    acked: Option<Instant>,
    told: Option<Instant>,
) {
    let mut pending = stats.pending.lock().unwrap_or_else(|e| e.into_inner());
    let entry = pending.entry(key.clone()).or_default();
    entry.0 = entry.0.or(acked);
    entry.1 = entry.1.or(told);
    if let (Some(acked), Some(told)) = *entry {
        pending.remove(&key);
        let us = told.saturating_duration_since(acked).as_micros() as u64;
        let _ = histogram
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(us.clamp(1, LATENCY_US_MAX));
    }
}

/// The message every user sends: `secs` seconds of synthetic 20 ms packets in Ogg.
fn message(secs: u32, serial: u32) -> Vec<u8> {
    let packets: Vec<Vec<u8>> = (0..secs as usize * 50)
        .map(|i| {
            let mut packet = vec![0xfc];
            packet.extend((0..PACKET_BYTES - 1).map(|k| (i + k) as u8));
            packet
        })
        .collect();
    build_stream(serial, &packets, PACKETS_PER_PAGE)
}

/// The ends of the pages in `stream` (chunk boundaries).
fn page_ends(stream: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut at = 0;
    while at + 27 <= stream.len() {
        let segments = stream[at + 26] as usize;
        let table = &stream[at + 27..at + 27 + segments];
        let body: usize = table.iter().map(|&n| n as usize).sum();
        at += 27 + segments + body;
        ends.push(at.min(stream.len()));
    }
    ends
}

/// Runs the voice-message scenario.
pub(super) async fn run(args: &LoadgenArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (2..=VM_USERS_MAX).contains(&args.vm_users),
        "--vm-users must be 2-{VM_USERS_MAX}"
    );
    anyhow::ensure!(
        (1..=VM_MESSAGE_SECS_MAX).contains(&args.vm_message_secs),
        "--vm-message-secs must be 1-{VM_MESSAGE_SECS_MAX}"
    );
    anyhow::ensure!(!args.urls.is_empty(), "give at least one --url");
    anyhow::ensure!(
        (1..=3600).contains(&args.duration),
        "--duration must be 1-3600 seconds"
    );
    raise_open_files_limit(u64::from(args.vm_users) + 64);
    let plan = Arc::new(Plan {
        urls: args.urls.clone(),
        ca: args.ca.clone(),
        encoding: chorus_protocol::Encoding::MsgPack,
        keys: TokenKeys::new(args.secret.as_bytes()),
        token_ttl_secs: 3600 * 4,
        run_id: format!("{:08x}", rand::random::<u32>()),
        room_id: String::new(),
        endpoints: quic_endpoints(args).await?,
    });
    let audio = Arc::new(message(args.vm_message_secs, 7));
    let ends = Arc::new(page_ends(&audio));
    eprintln!(
        "loadgen voice: {} users, {} s messages ({} bytes), {} s, on {} (run {})",
        args.vm_users,
        args.vm_message_secs,
        audio.len(),
        args.duration,
        args.urls.join(", "),
        plan.run_id
    );
    // Connect every user (at `--connect-rate`).
    let mut clients = Vec::with_capacity(args.vm_users as usize);
    let gap = Duration::from_secs_f64(1.0 / args.connect_rate.max(1.0));
    for i in 0..args.vm_users as usize {
        let user = format!("lg-{}-vm{i}", plan.run_id);
        let config = plan.config(&user, i)?;
        let client = Client::connect(config)
            .await
            .with_context(|| format!("user {i} cannot connect"))?;
        clients.push(client);
        tokio::time::sleep(gap).await;
    }
    let users: Vec<String> = (0..clients.len())
        .map(|i| format!("lg-{}-vm{i}", plan.run_id))
        .collect();
    let stats = Arc::new(VoiceStats::default());
    let chunk_latency = Arc::new(Mutex::new(Histogram::<u64>::new_with_max(
        LATENCY_US_MAX,
        3,
    )?));
    let to_recipient = Arc::new(Mutex::new(Histogram::<u64>::new_with_max(
        LATENCY_US_MAX,
        3,
    )?));
    let stop = CancellationToken::new();
    let listening = CancellationToken::new();
    let tracker = TaskTracker::new();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration);
    for (i, mut client) in clients.into_iter().enumerate() {
        let requester = client.requester();
        // The recipient side: every `vm.bytes` for a message to this user.
        let stats_r = stats.clone();
        let to_recipient_s = to_recipient.clone();
        let to_recipient = to_recipient.clone();
        let listening = listening.clone();
        tracker.spawn(async move {
            loop {
                let event = tokio::select! {
                    _ = listening.cancelled() => break,
                    event = client.next_event() => event,
                };
                match event {
                    Some(ClientEvent::Notification {
                        event: Event::VmBytes(bytes),
                        ..
                    }) if stats_r
                        .senders
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&bytes.message_id)
                        .is_some_and(|&sender| sender != i) =>
                    {
                        record(
                            &stats_r,
                            &to_recipient,
                            (bytes.message_id, bytes.acked),
                            None,
                            Some(Instant::now()),
                        )
                    }
                    Some(_) => {}
                    None => break,
                }
            }
            client.close().await;
        });
        // The sender side.
        let recipient = users[(i + 1) % users.len()].clone();
        let stats = stats.clone();
        let chunk_latency = chunk_latency.clone();
        let told = to_recipient_s.clone();
        let audio = audio.clone();
        let ends = ends.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            while Instant::now() < deadline && !stop.is_cancelled() {
                let Ok(sent) = requester
                    .request(VmSendRequest {
                        to: vec![recipient.clone()],
                        group: None,
                    })
                    .await
                else {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                stats.started.fetch_add(1, Ordering::Relaxed);
                stats
                    .senders
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(sent.message_id.clone(), i);
                let mut from = 0;
                for (k, &end) in ends.iter().enumerate() {
                    let sent_at = Instant::now();
                    let answer = requester
                        .request(VmChunkRequest {
                            message_id: sent.message_id.clone(),
                            offset: from as u64,
                            data: base64::engine::general_purpose::STANDARD
                                .encode(&audio[from..end]),
                            last: k + 1 == ends.len(),
                        })
                        .await;
                    match answer {
                        Ok(state) => {
                            let now = Instant::now();
                            let us = now.duration_since(sent_at).as_micros() as u64;
                            let _ = chunk_latency
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .record(us.clamp(1, LATENCY_US_MAX));
                            stats.chunks.fetch_add(1, Ordering::Relaxed);
                            record(
                                &stats,
                                &told,
                                (sent.message_id.clone(), state.acked),
                                Some(now),
                                None,
                            );
                            if state.status == VmUploadStatus::Complete {
                                stats.completed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            stats.errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                    from = end;
                }
            }
        });
    }
    tracker.close();
    tokio::time::sleep_until(deadline).await;
    stop.cancel();
    let sending_secs = started.elapsed().as_secs_f64();
    // The last notifications, then the listeners stop.
    tokio::time::sleep(Duration::from_secs(args.drain_secs.min(30))).await;
    listening.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(SHUTDOWN_WAIT_SECS), tracker.wait()).await;
    let completed = stats.completed.load(Ordering::Relaxed);
    let chunks = stats.chunks.load(Ordering::Relaxed);
    let report = VoiceLoadReport {
        users_connected: users.len() as u64,
        sending_secs,
        message_bytes: audio.len() as u64,
        messages_started: stats.started.load(Ordering::Relaxed),
        messages_completed: completed,
        messages_per_sec: completed as f64 / sending_secs,
        chunks_acked: chunks,
        chunks_per_sec: chunks as f64 / sending_secs,
        errors: stats.errors.load(Ordering::Relaxed),
        chunk_latency: latency_report(&chunk_latency.lock().unwrap_or_else(|e| e.into_inner())),
        chunk_to_recipient: latency_report(&to_recipient.lock().unwrap_or_else(|e| e.into_inner())),
    };
    let text = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &args.json {
        std::fs::write(path, &text).with_context(|| format!("write {}", path.display()))?;
    }
    println!("{text}");
    Ok(())
}
