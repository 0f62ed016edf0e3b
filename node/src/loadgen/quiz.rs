//! `chorus loadgen --quiz-viewers N`: a live quiz (SPEC Q5). N viewers join one room
//! (ramped at `--connect-rate`, spread over the `--url`s); the load generator creates a
//! show through the admin API and runs `--quiz-questions` questions. Every viewer answers
//! each question as soon as it arrives (every tenth answers the first one wrong and is
//! out); the report gives, per question, the answers judged per second (from the push to
//! the last verdict) and the time from the announce request until the announcement had
//! reached every viewer (with percentiles over viewers).
//!
//! Every wait is bounded: the ramp by N and 30 s to settle, each question by its window
//! plus [`QUESTION_SLACK_SECS`], each announcement by [`ANNOUNCE_WAIT_SECS`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use chorus_protocol::{Event, QuizAnswerRequest, RoomRef};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{
    create_room, latency_report, quic_endpoints, raise_open_files_limit, LatencyReport,
    LoadgenArgs, Plan, LATENCY_US_MAX, LISTENERS_MAX, SHUTDOWN_WAIT_SECS,
};
use crate::client::{Client, ClientEvent};
use crate::token::TokenKeys;

/// Most questions one run asks.
pub const QUIZ_QUESTIONS_MAX: u32 = 50;
/// Options per generated question.
const OPTIONS: u8 = 4;
/// Time after a question's window for the last verdicts.
const QUESTION_SLACK_SECS: u64 = 5;
/// Longest wait for an announcement to reach every viewer.
const ANNOUNCE_WAIT_SECS: u64 = 60;

fn correct(k: u32) -> u8 {
    (k % u32::from(OPTIONS)) as u8
}

#[derive(Default)]
struct QuizStats {
    joined: AtomicU64,
    settled: AtomicU64,
    answered: AtomicU64,
    refused: AtomicU64,
    errors: AtomicU64,
    announces: AtomicU64,
    /// Microseconds since the run's start of the latest verdict.
    last_verdict_us: AtomicU64,
    /// Microseconds since the run's start of the latest announce request.
    announced_us: AtomicU64,
    /// From the announce request to each viewer's receipt, microseconds.
    announce_latency: Mutex<Option<Histogram<u64>>>,
}

/// One question's numbers.
#[derive(Debug, Serialize)]
pub struct QuestionReport {
    /// The question.
    pub question: u32,
    /// Verdicts received.
    pub answers: u64,
    /// Answers refused (out viewers never answer, so: errors of the run).
    pub refused: u64,
    /// Seconds from the push request to the last verdict.
    pub answer_secs: f64,
    /// Verdicts per second over that time.
    pub answers_per_sec: f64,
    /// Viewers the announcement reached within the wait.
    pub announce_reached: u64,
    /// From the announce request to each viewer, ms (max: to every viewer).
    pub announce_latency: Option<LatencyReport>,
}

/// `chorus loadgen --quiz-viewers` report.
#[derive(Debug, Serialize)]
pub struct QuizReport {
    /// Viewers that joined.
    pub viewers_joined: u64,
    /// Seconds to connect and join them.
    pub ramp_secs: f64,
    /// Per question.
    pub questions: Vec<QuestionReport>,
    /// From `quiz finish`.
    pub winners: u64,
    /// Cents paid (the prize).
    pub paid_cents: u64,
    /// Connection and request errors.
    pub errors: u64,
}

/// Runs the quiz scenario.
pub(super) async fn run(args: &LoadgenArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.quiz_viewers <= LISTENERS_MAX,
        "--quiz-viewers must be at most {LISTENERS_MAX}"
    );
    anyhow::ensure!(
        (1..=QUIZ_QUESTIONS_MAX).contains(&args.quiz_questions),
        "--quiz-questions must be 1-{QUIZ_QUESTIONS_MAX}"
    );
    anyhow::ensure!(
        (1..=600).contains(&args.quiz_window_secs),
        "--quiz-window-secs must be 1-600"
    );
    anyhow::ensure!(!args.urls.is_empty(), "give at least one --url");
    anyhow::ensure!(
        args.connect_rate >= 1.0 && args.connect_rate.is_finite(),
        "--connect-rate must be at least 1"
    );
    raise_open_files_limit(u64::from(args.quiz_viewers) + 64);
    let admin_url = super::admin_url(args)?;
    let mut plan = Plan {
        urls: args.urls.clone(),
        ca: args.ca.clone(),
        encoding: chorus_protocol::Encoding::MsgPack,
        keys: TokenKeys::new(args.secret.as_bytes()),
        token_ttl_secs: 3600 * 4,
        run_id: format!("{:08x}", rand::random::<u32>()),
        room_id: String::new(),
        endpoints: quic_endpoints(args).await?,
    };
    let (room, host) = create_room(&plan).await?;
    plan.room_id = room;
    let plan = Arc::new(plan);
    let stats = Arc::new(QuizStats {
        announce_latency: Mutex::new(Some(Histogram::new_with_max(LATENCY_US_MAX, 3)?)),
        ..QuizStats::default()
    });
    let started = Instant::now();
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    eprintln!(
        "loadgen quiz: {} viewers, {} questions, {} s window, on {} (room {}, run {})",
        args.quiz_viewers,
        args.quiz_questions,
        args.quiz_window_secs,
        args.urls.join(" "),
        plan.room_id,
        plan.run_id
    );

    super::ramp(args.quiz_viewers, args.connect_rate, |index| {
        tracker.spawn(viewer(
            index,
            plan.clone(),
            stats.clone(),
            started,
            stop.clone(),
        ));
    })
    .await;
    let settle = Instant::now() + Duration::from_secs(30);
    while stats.settled.load(Ordering::Relaxed) < u64::from(args.quiz_viewers)
        && Instant::now() < settle
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ramp_secs = started.elapsed().as_secs_f64();
    let joined = stats.joined.load(Ordering::Relaxed);
    eprintln!("loadgen quiz: {joined} viewers joined in {ramp_secs:.1} s");

    let token = args.admin_token.as_str();
    let questions: Vec<serde_json::Value> = (0..args.quiz_questions)
        .map(|k| {
            serde_json::json!({
                "text": format!("loadgen question {k}"),
                "options": ["a", "b", "c", "d"],
                "correct": correct(k),
            })
        })
        .collect();
    let body = serde_json::json!({
        "room": plan.room_id,
        "prize_cents": 1_000_000,
        "questions": questions,
        "window_ms": args.quiz_window_secs * 1000,
    });
    let created = crate::admin_cli::call(
        &admin_url,
        token,
        hyper::Method::POST,
        "/admin/quiz",
        Some(body.to_string().into_bytes()),
    )
    .await
    .context("creating the quiz")?;
    let quiz = created["quiz_id"]
        .as_str()
        .context("no quiz_id")?
        .to_string();
    let step = |what: &'static str| {
        let admin_url = admin_url.clone();
        let quiz = quiz.clone();
        async move {
            crate::admin_cli::call(
                &admin_url,
                token,
                hyper::Method::POST,
                &format!("/admin/quiz/{what}?id={quiz}"),
                None,
            )
            .await
        }
    };

    let mut reports = Vec::new();
    for k in 0..args.quiz_questions {
        let (answered, refused) = (
            stats.answered.load(Ordering::Relaxed),
            stats.refused.load(Ordering::Relaxed),
        );
        let pushed_at = started.elapsed().as_micros() as u64;
        let pushed = step("push").await.context("push")?;
        let deadline_ms = pushed["deadline_ms"].as_u64().unwrap_or(0);
        // Answers until the window closes (all are in by then, or late).
        let window_end = Instant::now()
            + Duration::from_millis(
                deadline_ms.saturating_sub(chorus_actors::room_actor::unix_now_ms()),
            );
        tokio::time::sleep_until(window_end).await;
        let answers = stats.answered.load(Ordering::Relaxed) - answered;
        let answer_secs = stats
            .last_verdict_us
            .load(Ordering::Relaxed)
            .saturating_sub(pushed_at) as f64
            / 1e6;
        // Announce once the controller accepts it (just after the deadline).
        let announce_deadline = Instant::now() + Duration::from_secs(QUESTION_SLACK_SECS);
        let announces_before = stats.announces.load(Ordering::Relaxed);
        if let Ok(mut histogram) = stats.announce_latency.lock() {
            if let Some(h) = histogram.as_mut() {
                h.reset();
            }
        }
        loop {
            stats
                .announced_us
                .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            match step("announce").await {
                Ok(_) => break,
                Err(e) if Instant::now() < announce_deadline => {
                    tracing::debug!(error = %e, "announce refused; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.context("announce")),
            }
        }
        let reach_deadline = Instant::now() + Duration::from_secs(ANNOUNCE_WAIT_SECS);
        while stats.announces.load(Ordering::Relaxed) - announces_before < joined
            && Instant::now() < reach_deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let reached = stats.announces.load(Ordering::Relaxed) - announces_before;
        let latency = stats
            .announce_latency
            .lock()
            .ok()
            .and_then(|h| h.as_ref().map(latency_report));
        let report = QuestionReport {
            question: k,
            answers,
            refused: stats.refused.load(Ordering::Relaxed) - refused,
            answer_secs,
            answers_per_sec: if answer_secs > 0.0 {
                answers as f64 / answer_secs
            } else {
                0.0
            },
            announce_reached: reached,
            announce_latency: latency,
        };
        eprintln!(
            "loadgen quiz: question {k}: {} answers in {:.2} s ({:.0}/s); announcement reached {reached}/{joined} viewers, all within {:.1} ms",
            report.answers,
            report.answer_secs,
            report.answers_per_sec,
            report.announce_latency.as_ref().map_or(0.0, |l| l.max_ms),
        );
        reports.push(report);
    }
    let finished = step("finish").await.context("finish")?;
    let report = QuizReport {
        viewers_joined: joined,
        ramp_secs,
        questions: reports,
        winners: finished["winners"].as_u64().unwrap_or(0),
        paid_cents: finished["paid_cents"].as_u64().unwrap_or(0),
        errors: stats.errors.load(Ordering::Relaxed),
    };
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = &args.json {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    stop.cancel();
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(SHUTDOWN_WAIT_SECS), tracker.wait()).await;
    host.close().await;
    Ok(())
}

/// One viewer: joins, answers each question when it arrives, records announcements.
async fn viewer(
    index: usize,
    plan: Arc<Plan>,
    stats: Arc<QuizStats>,
    started: Instant,
    stop: CancellationToken,
) {
    let user = format!("lg-{}-v{index}", plan.run_id);
    let client = async {
        let mut client = Client::connect(plan.config(&user, index).ok()?)
            .await
            .ok()?;
        match client
            .request(RoomRef {
                room_id: plan.room_id.clone(),
            })
            .await
        {
            Ok(_) => Some(client),
            Err(_) => {
                client.close().await;
                None
            }
        }
    };
    let client = tokio::select! {
        _ = stop.cancelled() => None,
        client = client => client,
    };
    stats.settled.fetch_add(1, Ordering::Relaxed);
    let Some(mut client) = client else {
        stats.errors.fetch_add(1, Ordering::Relaxed);
        return;
    };
    stats.joined.fetch_add(1, Ordering::Relaxed);
    let requester = client.requester();
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            event = client.next_event() => event,
        };
        match event {
            Some(ClientEvent::Notification {
                event: Event::QuizQuestion(question),
                ..
            }) => {
                // Every tenth viewer answers the first question wrong, and is then out.
                if question.index > 0 && index % 10 == 9 {
                    continue;
                }
                let option = if question.index == 0 && index % 10 == 9 {
                    (correct(0) + 1) % OPTIONS
                } else {
                    correct(question.index)
                };
                let requester = requester.clone();
                let stats = stats.clone();
                tokio::spawn(async move {
                    let answer = QuizAnswerRequest {
                        quiz_id: question.quiz_id,
                        question: question.index,
                        option,
                    };
                    match requester.request(answer).await {
                        Ok(_) => {
                            stats.answered.fetch_add(1, Ordering::Relaxed);
                            stats
                                .last_verdict_us
                                .fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                        }
                        Err(crate::client::ClientError::Server(_)) => {
                            stats.refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            stats.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            Some(ClientEvent::Notification {
                event: Event::QuizAnnounce(_),
                ..
            }) => {
                let now = started.elapsed().as_micros() as u64;
                let latency = now.saturating_sub(stats.announced_us.load(Ordering::Relaxed));
                if let Ok(mut histogram) = stats.announce_latency.lock() {
                    if let Some(h) = histogram.as_mut() {
                        let _ = h.record(latency.min(LATENCY_US_MAX));
                    }
                }
                stats.announces.fetch_add(1, Ordering::Relaxed);
            }
            Some(ClientEvent::Closed { .. }) | None => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Some(_) => {}
        }
    }
    client.close().await;
}
