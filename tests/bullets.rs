//! System tests of bullet comments (SPEC Q6) on a three-node cluster of real `chorus
//! serve` processes: refusals by the rules, and under load (1,000 senders at 10/s each,
//! through `chorus loadgen` processes) a room shows at most its rate to viewers on every
//! node while every sender is shown in turn.
//!
//! Rate tolerance. A room's owner closes its windows (250 ms) at least a window apart and
//! shows at most `rate × 250 / 1000` bullets in one. A viewer measures by when it receives
//! them, so delivery jitter shifts windows: in any 1 s of receipts a viewer may see up to
//! two windows' share beyond the rate (one for the alignment of the second with the
//! windows, one for up to 250 ms of jitter between two windows' deliveries). Over a whole
//! run the total is at most the rate times (the span of receipts + 500 ms) plus one window.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chorus_node::client::{Client, ClientError, ClientEvent};
use chorus_protocol::{ErrorCode, Event, RoomBulletRequest};
use common::{create_room, join, three_node_cluster_with, TestNode};

/// The two tests each run a cluster under load: one at a time on a small machine.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The bullet window (the default `bullets.window_ms`).
const WINDOW_MS: u64 = 250;

/// What one viewer received.
#[derive(Default)]
struct Seen {
    /// Each `room.bullets`: when it arrived and how many bullets it held.
    receipts: Vec<(Instant, usize)>,
    /// Times each sender was shown.
    senders: BTreeMap<String, u32>,
    /// Why the viewer's connection ended, if it did.
    closed: Option<String>,
    /// The room's latest listener count.
    listeners: u64,
    /// Bullets received before [`Seen::restart`].
    before_restart: usize,
}

impl Seen {
    /// Most bullets received in any 1 s.
    fn max_per_sec(&self) -> usize {
        let mut max = 0;
        let mut sum = 0;
        let mut start = 0;
        for (end, (at, count)) in self.receipts.iter().enumerate() {
            sum += count;
            while *at - self.receipts[start].0 >= Duration::from_secs(1) {
                sum -= self.receipts[start].1;
                start += 1;
            }
            debug_assert!(start <= end);
            max = max.max(sum);
        }
        max
    }

    fn total(&self) -> usize {
        self.receipts.iter().map(|(_, count)| count).sum()
    }

    /// Forgets who was shown (the receipts stay for the rate): fairness is judged from
    /// here, once every sender is in the room.
    fn restart(&mut self) {
        self.senders.clear();
        self.before_restart = self.total();
    }

    fn span(&self) -> Duration {
        match (self.receipts.first(), self.receipts.last()) {
            (Some((first, _)), Some((last, _))) => *last - *first,
            _ => Duration::ZERO,
        }
    }

    /// Senders shown whose id `counts` accepts.
    fn shown(&self, counts: impl Fn(&str) -> bool) -> usize {
        self.senders.keys().filter(|s| counts(s)).count()
    }
}

/// Records every `room.bullets` the client receives until its connection ends.
fn watch(mut client: Client) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let record = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let event = client.next_event().await;
            let mut seen = record.lock().expect("seen");
            match event {
                Some(ClientEvent::Notification {
                    event: Event::Bullets(shown),
                    ..
                }) => {
                    seen.receipts.push((Instant::now(), shown.bullets.len()));
                    for bullet in shown.bullets {
                        *seen.senders.entry(bullet.user_id).or_default() += 1;
                    }
                }
                Some(ClientEvent::Notification {
                    event: Event::Listeners(listeners),
                    ..
                }) => seen.listeners = listeners.count,
                Some(ClientEvent::Closed { code, reason })
                | Some(ClientEvent::Disconnected { code, reason }) => {
                    seen.closed = Some(format!("{code:?}: {reason}"));
                    return;
                }
                Some(_) => {}
                None => {
                    seen.closed = Some("client ended".into());
                    return;
                }
            }
        }
    });
    (seen, task)
}

/// One viewer per node, in `room`.
async fn viewers(
    nodes: &[TestNode; 3],
    room: &str,
) -> Vec<(Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>)> {
    let mut watching = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let viewer = node.client(&node.ws_url(), &format!("viewer-{i}")).await;
        join(&viewer, room).await;
        watching.push(watch(viewer));
    }
    watching
}

/// Waits until every viewer was shown `senders` senders whose id `counts` accepts;
/// panics at `deadline` saying how far each got.
async fn until_every_sender_shown(
    watching: &[(Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>)],
    senders: usize,
    counts: impl Fn(&str) -> bool,
    deadline: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let progress: Vec<usize> = watching
            .iter()
            .map(|(seen, _)| {
                let seen = seen.lock().expect("seen");
                assert!(
                    seen.closed.is_none(),
                    "a viewer's connection ended: {:?}",
                    seen.closed
                );
                seen.shown(&counts)
            })
            .collect();
        if progress.iter().all(|shown| *shown >= senders) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < deadline,
            "not every sender was shown to every viewer in {deadline:?}: viewers saw {progress:?} of {senders}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks one viewer's receipts against a room rate of `rate_per_sec`; returns the most
/// bullets it received in any 1 s.
fn assert_at_most_the_rate(viewer: usize, seen: &Seen, rate_per_sec: usize) -> usize {
    let per_window = rate_per_sec * WINDOW_MS as usize / 1000;
    let largest = seen.receipts.iter().map(|(_, n)| *n).max().unwrap_or(0);
    assert!(
        largest <= per_window,
        "viewer {viewer}: {largest} bullets in one window, above {per_window}"
    );
    let max_per_sec = seen.max_per_sec();
    assert!(
        max_per_sec <= rate_per_sec + 2 * per_window,
        "viewer {viewer}: {max_per_sec} bullets in 1 s at a rate of {rate_per_sec}/s"
    );
    let total = seen.total();
    let bound = rate_per_sec as f64 * (seen.span().as_secs_f64() + 0.5) + per_window as f64;
    assert!(
        total as f64 <= bound,
        "viewer {viewer}: {total} bullets over {:?}, above {bound}",
        seen.span()
    );
    max_per_sec
}

fn refusal(result: Result<chorus_protocol::Empty, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Server(body)) => {
            ErrorCode::from_u16(body.code).unwrap_or_else(|| panic!("unknown code {}", body.code))
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn bullet(room: &str, text: &str) -> RoomBulletRequest {
    RoomBulletRequest {
        room_id: room.into(),
        text: text.into(),
    }
}

/// At the default rate (20/s), on a small scale: what breaks the rules is refused with
/// its code at the sender's node, and 60 senders at 10/s each on three nodes are all shown
/// to viewers on every node, at most 20 a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bullets_break_no_rule_and_a_room_shows_every_sender_at_most_20_per_sec() {
    const SENDERS: usize = 60;
    const RATE_PER_SEC: usize = 20;
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = three_node_cluster_with(dir.path(), &["--bullet-blocklist", "spam,scam"]).await;
    let host = nodes[0].client(&nodes[0].ws_url(), "host").await;
    let room = create_room(&host, "bullets").await;
    let watching = viewers(&nodes, &room).await;

    // The rules, checked at the sender's node (b).
    let outsider = nodes[1].client(&nodes[1].ws_url(), "outsider").await;
    assert_eq!(
        refusal(outsider.request(bullet(&room, "hi")).await),
        ErrorCode::NotInRoom
    );
    let tester = nodes[1].client(&nodes[1].ws_url(), "tester").await;
    join(&tester, &room).await;
    for bad in ["  ", &"x".repeat(51), "a\u{7}b", "what a SCAM"] {
        assert_eq!(
            refusal(tester.request(bullet(&room, bad)).await),
            ErrorCode::InvalidArgument,
            "{bad:?}"
        );
    }
    for i in 0..4 {
        tester
            .request(bullet(&room, &format!("hello {i}")))
            .await
            .expect("within the burst of 4");
    }
    assert_eq!(
        refusal(tester.request(bullet(&room, "one more")).await),
        ErrorCode::RateLimited
    );

    // A lone sender's latest bullet is shown to viewers on every node (a bullet is only
    // a candidate in its own window: with more senders it may not be).
    until_every_sender_shown(
        &watching,
        1,
        |user| user == "tester",
        Duration::from_secs(20),
    )
    .await;

    // 60 senders, 20 per node, each sending every 100 ms.
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        let node = &nodes[i % 3];
        let mut client = node.client(&node.ws_url(), &format!("s{i}")).await;
        join(&client, &room).await;
        let room = room.clone();
        let requester = client.requester();
        senders.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut n = 0u64;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        match requester.request(bullet(&room, &format!("s{i} #{n}"))).await {
                            Ok(_) => {}
                            Err(ClientError::Server(e)) if e.code == ErrorCode::RateLimited.as_u16() => {}
                            Err(e) => panic!("sender {i}: {e}"),
                        }
                        n += 1;
                    }
                    // Read (and drop) what the room sends, so the sender keeps up.
                    event = client.next_event() => if event.is_none() { return },
                }
            }
        }));
    }
    let is_sender = |user: &str| user.starts_with('s') && user[1..].parse::<usize>().is_ok();
    let took =
        until_every_sender_shown(&watching, SENDERS, is_sender, Duration::from_secs(40)).await;
    for sender in &senders {
        sender.abort();
    }
    for (i, (seen, task)) in watching.iter().enumerate() {
        task.abort();
        let seen = seen.lock().expect("seen");
        let max = assert_at_most_the_rate(i, &seen, RATE_PER_SEC);
        eprintln!(
            "viewer {i}: {} bullets in {:?} (at most {max} in 1 s), {} senders shown; all {SENDERS} in {took:?}",
            seen.total(),
            seen.span(),
            seen.senders.len()
        );
    }
}

/// The Done-when check: 1,000 bullet senders at 10/s each (two `chorus loadgen`
/// processes of 500 clients, spread over the three nodes) into one room. Viewers on every
/// node receive at most the room's rate, and every sender is shown within the run.
///
/// The room shows 100/s here, not the default 20/s: showing 1,000 senders once takes at
/// least 1,000 / rate seconds, 50 s at 20/s, too long for a test; at 100/s it takes 10 s
/// plus the tail of the fair rotation. The default rate is checked at a smaller scale
/// above; the selection is the same code at any rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_senders_at_10_per_sec_are_each_shown_and_viewers_get_at_most_the_rate() {
    const SENDERS_PER_PROCESS: usize = 500;
    const PROCESSES: usize = 2;
    const RATE_PER_SEC: usize = 100;
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = three_node_cluster_with(
        dir.path(),
        &["--bullet-rate-per-sec", &RATE_PER_SEC.to_string()],
    )
    .await;
    let host = nodes[0].client(&nodes[0].ws_url(), "host").await;
    let room = create_room(&host, "bullets under load").await;
    let watching = viewers(&nodes, &room).await;

    let mut loadgens = Vec::new();
    for _ in 0..PROCESSES {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_chorus"));
        command.arg("loadgen");
        for node in &nodes {
            command.args(["--url", &node.ws_url()]);
        }
        command
            .arg("--ca")
            .arg(nodes[0].ca_path())
            .args([
                "--room",
                &room,
                "--listeners",
                "0",
                "--senders",
                "0",
                "--bulleters",
                &SENDERS_PER_PROCESS.to_string(),
                "--bullet-rate",
                "10",
                // Longer than the test waits: it stops them once every sender was shown.
                "--duration",
                "120",
                "--drain-secs",
                "0",
            ])
            .env("CHORUS_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        loadgens.push(command.spawn().expect("spawn chorus loadgen"));
    }
    let is_sender = |user: &str| user.starts_with("lg-") && user.contains("-b");
    let senders = SENDERS_PER_PROCESS * PROCESSES;
    // Fairness is judged once every sender is in the room: until then the first to join
    // are shown again and again, rightly, since nobody else waits (how long joining
    // 1,000 clients takes depends on how busy the machine is).
    let in_room = Instant::now();
    loop {
        let listeners = watching[0].0.lock().expect("seen").listeners;
        if listeners as usize >= senders + watching.len() {
            break;
        }
        assert!(
            in_room.elapsed() < Duration::from_secs(60),
            "only {listeners} in the room after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (seen, _) in &watching {
        seen.lock().expect("seen").restart();
    }
    // Showing each of 1,000 senders once at 100/s: ~10 s.
    let took =
        until_every_sender_shown(&watching, senders, is_sender, Duration::from_secs(50)).await;
    for mut loadgen in loadgens {
        assert!(
            loadgen.try_wait().expect("loadgen status").is_none(),
            "a loadgen process ended early"
        );
        let _ = loadgen.kill().await;
    }
    for (i, (seen, task)) in watching.iter().enumerate() {
        task.abort();
        let seen = seen.lock().expect("seen");
        let max = assert_at_most_the_rate(i, &seen, RATE_PER_SEC);
        let most_shown = seen.senders.values().max().copied().unwrap_or(0);
        eprintln!(
            "viewer {i}: {} bullets in {:?} (at most {max} in 1 s, {} windows), {} of {senders} senders shown, none more than {most_shown} times; all in {took:?}",
            seen.total(),
            seen.span(),
            seen.receipts.len(),
            seen.shown(is_sender),
        );
        // Fair over time: the longest-unshown go first, so hardly anyone is shown much
        // more often than the average while another waits for its first. Not exactly: a
        // sender is a candidate only in the windows where its edge's token bucket (2/s)
        // let a bullet through, so the last few unshown are those whose candidacies were
        // scarcest, and meanwhile the least recently shown fill the other slots; a sender
        // whose candidacies keep falling in thin windows is picked more (CI saw one shown
        // 5 and one 7 times at an average of 2). So: at most 1% of the senders above
        // average + 4, and nobody above three times the average + 6.
        let average = (seen.total() - seen.before_restart).div_ceil(senders) as u32;
        let over = seen.senders.values().filter(|&&n| n > average + 4).count();
        assert!(
            over <= senders / 100,
            "viewer {i}: {over} senders were shown more than {} times (average {average}) before all were shown once",
            average + 4
        );
        assert!(
            most_shown <= 3 * average + 6,
            "viewer {i}: a sender was shown {most_shown} times (average {average}) before all were shown once"
        );
    }
}
