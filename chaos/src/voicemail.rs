//! The voice-message chaos scenario (SPEC M1-M5): real nodes, users on every node sending
//! each other voice messages in paced chunks and syncing, reading and playing on a second
//! device, while a seeded schedule SIGKILLs (and restarts) and pauses nodes one at a time.
//! Then the checks, from fresh clients:
//!
//! - every acknowledged byte can be fetched, bit-exact (`fetch`);
//! - every completed message is in the sender's and each recipient's inbox exactly once,
//!   with its upload `complete` (`inbox-once`, `inbox-state`);
//! - each inbox is numbered 1, 2, 3, … without a gap (`gapless`);
//! - every device ends with the same state for every message, and no device was ever
//!   shown a newer state than the one the cluster ends with (`same-state`, `no-regress`).
//!
//! A sender retries a chunk while the cluster answers `unavailable` or its connection is
//! being replaced (clients reconnect to the next node in their list), and continues from
//! `vm.status` when the owner changed under it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use chorus_node::client::{Client, ClientError, ClientEvent};
use chorus_protocol::{
    ErrorCode, Event, VmChunkRequest, VmFetchRequest, VmPlayRequest, VmReadRequest, VmSendRequest,
    VmStatusRequest, VmSyncRequest, VmUploadStatus,
};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::cluster::{self, Health};
use crate::rain::{client_config, connect};
use crate::ChaosError;

/// The message every user sends: one second of Opus in Ogg (opusenc output).
pub const SAMPLE: &[u8] = include_bytes!("../../actors/src/voicemail/testdata/sine-1s.opus");
/// How long one request is retried while the cluster is unavailable.
pub const RETRY_MS: u64 = 30_000;
/// Most users one run makes.
pub const USERS_MAX: usize = 200;

const HEALTHY_TIMEOUT: Duration = Duration::from_secs(60);

/// One voice chaos run.
#[derive(Debug, Clone, Serialize)]
pub struct VoiceChaosConfig {
    /// The `chorus` binary.
    pub chorus_bin: PathBuf,
    /// Nodes (3-5).
    pub nodes: usize,
    /// Users (each with a sending device and a second device).
    pub users: usize,
    /// Messages each user sends.
    pub messages_per_user: usize,
    /// Bytes per chunk.
    pub chunk_bytes: usize,
    /// Pause between two chunks of a message, ms.
    pub chunk_pace_ms: u64,
    /// SIGKILLs (each followed by a restart after `down_ms`).
    pub kills: usize,
    /// SIGSTOP pauses (each `pause_ms`).
    pub pauses: usize,
    /// How long a killed node stays down, ms.
    pub down_ms: u64,
    /// How long a paused node stays paused, ms.
    pub pause_ms: u64,
    /// Seed of the schedule and the pacing.
    pub seed: u64,
    /// Work dir (CA, data dirs, logs).
    pub work_dir: PathBuf,
    /// Node i listens on this address plus i.
    pub base_ip: Ipv4Addr,
}

impl VoiceChaosConfig {
    /// The defaults of the full form: 3 nodes, 12 users × 4 messages, 3 kills, 2 pauses.
    pub fn new(chorus_bin: PathBuf, work_dir: PathBuf, seed: u64) -> Self {
        VoiceChaosConfig {
            chorus_bin,
            nodes: 3,
            users: 12,
            messages_per_user: 4,
            chunk_bytes: 200,
            chunk_pace_ms: 150,
            kills: 3,
            pauses: 2,
            down_ms: 5_000,
            pause_ms: 2_500,
            seed,
            work_dir,
            base_ip: Ipv4Addr::new(127, 0, 10, 11),
        }
    }

    fn validate(&self) -> Result<(), ChaosError> {
        if !(3..=5).contains(&self.nodes) {
            return Err(ChaosError::Config("voice chaos runs 3 to 5 nodes".into()));
        }
        if !(2..=USERS_MAX).contains(&self.users) || self.messages_per_user == 0 {
            return Err(ChaosError::Config(format!(
                "voice chaos needs 2 to {USERS_MAX} users and at least a message each"
            )));
        }
        if self.chunk_bytes == 0 || self.chunk_bytes > 32 * 1024 {
            return Err(ChaosError::Config("chunk bytes: 1 to 32768".into()));
        }
        Ok(())
    }
}

/// What a run did and found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VoiceChaosReport {
    /// The seed.
    pub seed: u64,
    /// Messages started (`vm.send` answered).
    pub messages_started: u64,
    /// Messages whose sender saw `complete`.
    pub messages_completed: u64,
    /// Bytes acknowledged to senders (the most each message got).
    pub bytes_acked: u64,
    /// Requests sent again after `unavailable` or a lost connection.
    pub retries: u64,
    /// Read and play requests answered.
    pub state_changes: u64,
    /// Faults: (kind, node, ms since the workload started).
    pub faults: Vec<(String, String, u64)>,
    /// Broken invariants: `[invariant] detail`.
    pub violations: Vec<String>,
    /// Run time, ms.
    pub elapsed_ms: u64,
}

/// One message as its sender saw it.
#[derive(Debug, Clone)]
struct Sent {
    message_id: String,
    sender: String,
    recipient: String,
    acked: u64,
    complete: bool,
}

#[derive(Default)]
struct Tally {
    sent: Vec<Sent>,
    retries: u64,
    state_changes: u64,
    /// Per (user, message): the highest version and whether `read` was seen, from
    /// notifications and answers.
    seen: BTreeMap<(String, String), (u64, bool)>,
}

fn say(start: Instant, line: impl std::fmt::Display) {
    eprintln!(
        "[voice-chaos +{:>6} ms] {line}",
        start.elapsed().as_millis()
    );
}

fn transient(error: &ClientError) -> bool {
    match error {
        ClientError::Server(body) => body.code == ErrorCode::Unavailable.as_u16(),
        ClientError::Timeout { .. }
        | ClientError::ConnectionLost { .. }
        | ClientError::Closed { .. } => true,
        _ => false,
    }
}

/// Sends `request` until it is answered or fails for good (or [`RETRY_MS`] pass).
async fn retry<T, F, Fut>(tally: &Mutex<Tally>, mut request: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let deadline = Instant::now() + Duration::from_millis(RETRY_MS);
    let mut backoff = 100;
    loop {
        match request().await {
            Err(error) if transient(&error) && Instant::now() < deadline => {
                lock(tally).retries += 1;
                tokio::time::sleep(Duration::from_millis(backoff)).await;
                backoff = (backoff * 2).min(1_000);
            }
            other => return other,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap_or_default()
}

/// One user's sending: each message in paced chunks, continuing where the upload stands.
async fn send_messages(
    client: Arc<Client>,
    user: String,
    users: usize,
    config: VoiceChaosConfig,
    index: usize,
    tally: Arc<Mutex<Tally>>,
) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(config.seed ^ ((index as u64) << 24));
    for _ in 0..config.messages_per_user {
        let mut other = rng.random_range(0..users - 1);
        if other >= index {
            other += 1;
        }
        let recipient = format!("u{other:03}");
        let started = retry(&tally, || {
            client.request(VmSendRequest {
                to: vec![recipient.clone()],
                group: None,
            })
        })
        .await;
        let Ok(started) = started else {
            continue;
        };
        let mut sent = Sent {
            message_id: started.message_id.clone(),
            sender: user.clone(),
            recipient,
            acked: 0,
            complete: false,
        };
        let mut at = 0usize;
        let give_up = Instant::now() + Duration::from_millis(RETRY_MS * 2);
        while Instant::now() < give_up {
            let end = (at + config.chunk_bytes).min(SAMPLE.len());
            let last = end == SAMPLE.len();
            let answer = retry(&tally, || {
                client.request(VmChunkRequest {
                    message_id: sent.message_id.clone(),
                    offset: at as u64,
                    data: b64(&SAMPLE[at..end]),
                    last,
                })
            })
            .await;
            match answer {
                Ok(state) => {
                    sent.acked = sent.acked.max(state.acked);
                    if state.status == VmUploadStatus::Complete {
                        sent.complete = true;
                        break;
                    }
                    if state.status != VmUploadStatus::Uploading {
                        break;
                    }
                    at = end;
                    if last {
                        // Everything sent but not complete: ask where it stands.
                        at = sent.acked as usize;
                    }
                }
                Err(ClientError::Server(body))
                    if body.code == ErrorCode::UploadOutOfOrder.as_u16() =>
                {
                    // The owner changed and lost an open page: continue from what is stored.
                    let status = retry(&tally, || {
                        client.request(VmStatusRequest {
                            message_id: sent.message_id.clone(),
                        })
                    })
                    .await;
                    match status {
                        Ok(status) => {
                            sent.acked = sent.acked.max(status.acked);
                            at = status.acked as usize;
                        }
                        Err(_) => break,
                    }
                }
                Err(_) => break,
            }
            tokio::time::sleep(Duration::from_millis(config.chunk_pace_ms)).await;
        }
        lock(&tally).sent.push(sent);
    }
}

/// A user's second device: records what it is told, and now and then reads or plays a
/// message it has.
async fn second_device(
    mut client: Client,
    user: String,
    seed: u64,
    stop: tokio_util::sync::CancellationToken,
    tally: Arc<Mutex<Tally>>,
) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut known: Vec<String> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(700));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            event = client.next_event() => {
                let Some(event) = event else { return };
                let ClientEvent::Notification { event, .. } = event else { continue };
                let (id, version, read) = match event {
                    Event::VmMessage(entry) => (entry.message_id, entry.state.version, entry.state.read),
                    Event::VmState(state) => (state.message_id, state.state.version, state.state.read),
                    _ => continue,
                };
                if !known.contains(&id) {
                    known.push(id.clone());
                }
                let mut tally = lock(&tally);
                let seen = tally.seen.entry((user.clone(), id)).or_default();
                seen.0 = seen.0.max(version);
                seen.1 |= read;
            }
            _ = tick.tick() => {
                if known.is_empty() {
                    continue;
                }
                let id = known[rng.random_range(0..known.len())].clone();
                let answer = if rng.random_bool(0.5) {
                    client.request(VmReadRequest { message_id: id.clone() }).await
                } else {
                    client
                        .request(VmPlayRequest {
                            message_id: id.clone(),
                            device: "tablet".into(),
                            position_ms: rng.random_range(0..1_000),
                            at_ms: rng.random_range(1..1_000_000),
                        })
                        .await
                };
                if let Ok(answer) = answer {
                    let mut tally = lock(&tally);
                    tally.state_changes += 1;
                    let seen = tally.seen.entry((user.clone(), id)).or_default();
                    seen.0 = seen.0.max(answer.state.version);
                    seen.1 |= answer.state.read;
                }
            }
        }
    }
}

/// Runs the scenario; `Err(ChaosError::VoiceViolations)` when a check fails.
pub async fn run_voice(config: VoiceChaosConfig) -> Result<VoiceChaosReport, ChaosError> {
    config.validate()?;
    let start = Instant::now();
    let ca_dir = cluster::prepare_work_dir(&config.chorus_bin, &config.work_dir).await?;
    let ca = ca_dir.join("ca.pem");
    let mut nodes = cluster::node_set(config.base_ip, config.nodes, &config.work_dir);
    let seed_addr = nodes[0].cluster_addr();
    for (i, node) in nodes.iter_mut().enumerate() {
        node.start(&config.chorus_bin, &ca_dir, (i > 0).then_some(seed_addr))
            .await?;
    }
    if let Health::Unhealthy(why) =
        cluster::wait_healthy(&nodes, tokio::time::Instant::now() + HEALTHY_TIMEOUT).await
    {
        return Err(ChaosError::Setup(format!(
            "the cluster did not converge: {why}"
        )));
    }
    say(start, format_args!("{} nodes healthy", nodes.len()));
    let urls_from = |home: usize, quic: bool| -> Vec<String> {
        (0..nodes.len())
            .map(|k| {
                let node = &nodes[(home + k) % nodes.len()];
                if quic {
                    node.quic_url()
                } else {
                    node.ws_url()
                }
            })
            .collect()
    };

    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut senders = Vec::new();
    let mut devices = Vec::new();
    for i in 0..config.users {
        let user = format!("u{i:03}");
        let sender = connect(client_config(urls_from(i, i % 2 == 1), &ca, &user)?).await?;
        let second = connect(client_config(urls_from(i + 1, i % 2 == 0), &ca, &user)?).await?;
        devices.push(tokio::spawn(second_device(
            second,
            user.clone(),
            config.seed ^ ((i as u64) << 40),
            stop.clone(),
            tally.clone(),
        )));
        senders.push(tokio::spawn(send_messages(
            Arc::new(sender),
            user,
            config.users,
            config.clone(),
            i,
            tally.clone(),
        )));
    }
    say(start, format_args!("{} users sending", config.users));

    // Faults, one node at a time, while the users send.
    let workload_start = Instant::now();
    let mut faults = Vec::new();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(config.seed);
    let mut schedule: Vec<bool> = std::iter::repeat_n(true, config.kills)
        .chain(std::iter::repeat_n(false, config.pauses))
        .collect();
    for i in (1..schedule.len()).rev() {
        schedule.swap(i, rng.random_range(0..=i));
    }
    let at = || workload_start.elapsed().as_millis() as u64;
    for kill in schedule {
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2_000))).await;
        let victim = rng.random_range(0..nodes.len());
        let name = nodes[victim].name.clone();
        if kill {
            nodes[victim].kill().await;
            faults.push(("sigkill".to_string(), name.clone(), at()));
            say(start, format_args!("SIGKILLed {name}"));
            tokio::time::sleep(Duration::from_millis(config.down_ms)).await;
            nodes[victim]
                .start(&config.chorus_bin, &ca_dir, Some(seed_addr))
                .await?;
            faults.push(("restart".to_string(), name.clone(), at()));
            say(start, format_args!("restarted {name}"));
        } else {
            nodes[victim].signal_stop(true).await?;
            faults.push(("sigstop".to_string(), name.clone(), at()));
            tokio::time::sleep(Duration::from_millis(config.pause_ms)).await;
            nodes[victim].signal_stop(false).await?;
            faults.push(("sigcont".to_string(), name.clone(), at()));
            say(start, format_args!("paused and resumed {name}"));
        }
        if let Health::Unhealthy(why) =
            cluster::wait_healthy(&nodes, tokio::time::Instant::now() + HEALTHY_TIMEOUT).await
        {
            say(start, format_args!("not healthy after a fault: {why}"));
        }
    }
    for sender in senders {
        let _ = sender.await;
    }
    say(start, "sending done");
    if let Health::Unhealthy(why) =
        cluster::wait_healthy(&nodes, tokio::time::Instant::now() + HEALTHY_TIMEOUT).await
    {
        return Err(ChaosError::Setup(format!(
            "the cluster did not recover: {why}"
        )));
    }
    // The second devices see the last notifications, then stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    for device in devices {
        let _ = device.await;
    }

    let tally = std::mem::take(&mut *lock(&tally));
    let mut report = VoiceChaosReport {
        seed: config.seed,
        messages_started: tally.sent.len() as u64,
        messages_completed: tally.sent.iter().filter(|s| s.complete).count() as u64,
        bytes_acked: tally.sent.iter().map(|s| s.acked).sum(),
        retries: tally.retries,
        state_changes: tally.state_changes,
        faults,
        ..VoiceChaosReport::default()
    };
    check(&config, &nodes_urls(&nodes), &ca, &tally, &mut report).await?;
    report.elapsed_ms = start.elapsed().as_millis() as u64;
    let _ = std::fs::write(
        config.work_dir.join("voice-report.json"),
        serde_json::to_vec_pretty(&report).unwrap_or_default(),
    );
    say(
        start,
        format_args!(
            "{} messages, {} complete, {} bytes acknowledged, {} violations",
            report.messages_started,
            report.messages_completed,
            report.bytes_acked,
            report.violations.len()
        ),
    );
    for node in &mut nodes {
        node.kill().await;
    }
    if report.violations.is_empty() {
        Ok(report)
    } else {
        Err(ChaosError::VoiceViolations {
            report: Box::new(report),
        })
    }
}

fn nodes_urls(nodes: &[cluster::NodeProcess]) -> Vec<String> {
    nodes.iter().map(|n| n.ws_url()).collect()
}

/// The checks, from fresh clients on every node.
async fn check(
    config: &VoiceChaosConfig,
    urls: &[String],
    ca: &Path,
    tally: &Tally,
    report: &mut VoiceChaosReport,
) -> Result<(), ChaosError> {
    let scratch = Mutex::new(Tally::default());
    let mut violation = |invariant: &str, detail: String| {
        report.violations.push(format!("[{invariant}] {detail}"));
    };
    // Fetch: every acknowledged byte, bit-exact, through the recipient on some node.
    for (i, sent) in tally.sent.iter().enumerate() {
        if sent.acked == 0 {
            continue;
        }
        let url = urls[i % urls.len()].clone();
        let mut rotated: Vec<String> = urls.iter().filter(|u| **u != url).cloned().collect();
        rotated.insert(0, url);
        let reader = connect(client_config(rotated, ca, &sent.recipient)?).await?;
        let mut bytes = Vec::new();
        let mut status = VmUploadStatus::Uploading;
        loop {
            let answer = retry(&scratch, || {
                reader.request(VmFetchRequest {
                    message_id: sent.message_id.clone(),
                    offset: bytes.len() as u64,
                    length: None,
                    wait_ms: None,
                })
            })
            .await;
            match answer {
                Ok(answer) => {
                    let piece = unb64(&answer.data);
                    bytes.extend_from_slice(&piece);
                    status = answer.status;
                    if piece.is_empty() || bytes.len() as u64 >= answer.acked {
                        break;
                    }
                }
                Err(error) => {
                    violation("fetch", format!("{}: {error}", sent.message_id));
                    break;
                }
            }
        }
        if (bytes.len() as u64) < sent.acked {
            violation(
                "fetch",
                format!(
                    "{}: {} bytes acknowledged, {} fetched",
                    sent.message_id,
                    sent.acked,
                    bytes.len()
                ),
            );
        }
        if bytes[..] != SAMPLE[..bytes.len().min(SAMPLE.len())] || bytes.len() > SAMPLE.len() {
            violation("fetch", format!("{}: the bytes differ", sent.message_id));
        }
        if sent.complete && (status != VmUploadStatus::Complete || bytes != SAMPLE) {
            violation(
                "fetch",
                format!(
                    "{}: complete for its sender, {status:?} with {} bytes",
                    sent.message_id,
                    bytes.len()
                ),
            );
        }
    }
    // Inboxes: each user from two nodes (two devices), compared.
    let deadline = Instant::now() + Duration::from_secs(60);
    for u in 0..config.users {
        let user = format!("u{u:03}");
        let mut views = Vec::new();
        for (k, device) in ["checker-a", "checker-b"].iter().enumerate() {
            let home = (u + k) % urls.len();
            let mut list: Vec<String> = urls[home..].to_vec();
            list.extend_from_slice(&urls[..home]);
            let client = connect(client_config(list, ca, &user)?).await?;
            // Ends of uploads reach inboxes at once or on the owner's next sweep (30 s).
            let entries = loop {
                let entries = sync_all(&client, device, &scratch).await;
                let pending = tally
                    .sent
                    .iter()
                    .filter(|s| s.complete && (s.sender == user || s.recipient == user))
                    .any(|s| {
                        entries.iter().any(|e| {
                            e.message_id == s.message_id
                                && e.state.upload != VmUploadStatus::Complete
                        })
                    });
                if !pending || Instant::now() > deadline {
                    break entries;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            };
            views.push(entries);
        }
        let entries = &views[0];
        let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
        let gapless: Vec<u64> = (1..=seqs.len() as u64).collect();
        if seqs != gapless {
            violation("gapless", format!("{user}: inbox numbers {seqs:?}"));
        }
        for sent in tally
            .sent
            .iter()
            .filter(|s| s.sender == user || s.recipient == user)
        {
            let found: Vec<_> = entries
                .iter()
                .filter(|e| e.message_id == sent.message_id)
                .collect();
            if found.len() > 1 || (sent.complete && found.len() != 1) {
                violation(
                    "inbox-once",
                    format!(
                        "{user}: {} is in the inbox {} times",
                        sent.message_id,
                        found.len()
                    ),
                );
            }
            if sent.complete {
                if let Some(entry) = found.first() {
                    if entry.state.upload != VmUploadStatus::Complete {
                        violation(
                            "inbox-state",
                            format!(
                                "{user}: {} is {:?} in the inbox",
                                sent.message_id, entry.state.upload
                            ),
                        );
                    }
                }
            }
        }
        let strip =
            |entries: &[chorus_protocol::VmEntry]| -> Vec<(String, u64, chorus_protocol::VmState)> {
                entries
                    .iter()
                    .map(|e| (e.message_id.clone(), e.seq, e.state.clone()))
                    .collect()
            };
        if strip(&views[0]) != strip(&views[1]) {
            violation(
                "same-state",
                format!("{user}: two devices see different inboxes"),
            );
        }
        for entry in entries {
            if let Some((version, read)) = tally.seen.get(&(user.clone(), entry.message_id.clone()))
            {
                if *version > entry.state.version || (*read && !entry.state.read) {
                    violation(
                        "no-regress",
                        format!(
                            "{user}: {} was shown at version {version} (read {read}), ends at {} (read {})",
                            entry.message_id, entry.state.version, entry.state.read
                        ),
                    );
                }
            }
        }
    }
    report.retries += lock(&scratch).retries;
    Ok(())
}

/// The whole inbox, page by page.
async fn sync_all(
    client: &Client,
    device: &str,
    scratch: &Mutex<Tally>,
) -> Vec<chorus_protocol::VmEntry> {
    let mut entries = Vec::new();
    let mut after = 0;
    loop {
        let page = retry(scratch, || {
            client.request(VmSyncRequest {
                device: device.to_string(),
                after,
                limit: Some(200),
            })
        })
        .await;
        let Ok(page) = page else {
            return entries;
        };
        entries.extend(page.entries);
        match page.next {
            Some(next) => after = next,
            None => return entries,
        }
    }
}
