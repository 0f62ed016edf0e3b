//! Live quiz (SPEC Q1-Q5) over real node processes: judging at submit time across answer
//! shards on three nodes, sealed verdicts opened only with the announced key, one
//! broadcast per question and announcement, and an exact payout.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::Duration;

use chorus_node::client::Client;
use chorus_protocol::sealed::open_verdict;
use chorus_protocol::{
    ErrorCode, Event, QuizAnnounceEvent, QuizAnswerRequest, QuizQuestionEvent, QuizResultEvent,
};
use common::{
    admin_cli as admin, create_room, expect_event, expect_line, join, three_node_cluster, TestNode,
    DEADLINE,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// Seconds to answer each question: generous, so that answers sent at once are in time on
/// a busy machine.
const WINDOW_SECS: u64 = 5;
const QUESTIONS: u32 = 5;
const OPTIONS: u8 = 3;
const VIEWERS: usize = 120;
const PRIZE_CENTS: u64 = 100_000;

/// `admin` that must succeed and print one JSON value.
async fn admin_json(node: &TestNode, args: &[&str]) -> serde_json::Value {
    let (ok, stdout, stderr) = admin(node, args).await;
    assert!(ok, "chorus admin {args:?}: {stderr}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
}

/// Announces the open question as soon as its deadline has passed (the controller refuses
/// before), polling until the deadline.
async fn announce(node: &TestNode, quiz: &str) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (ok, stdout, stderr) = admin(node, &["quiz", "announce", quiz]).await;
        if ok {
            return serde_json::from_str(stdout.trim()).expect("JSON");
        }
        assert!(
            stderr.contains("open for") && tokio::time::Instant::now() < deadline,
            "announce refused: {stderr}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn now_ms() -> u64 {
    chorus_actors::room_actor::unix_now_ms()
}

/// Waits until the server clock (shared on loopback) is past `deadline_ms`.
async fn until_past(deadline_ms: u64) {
    while now_ms() <= deadline_ms + 50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn questions_file(dir: &std::path::Path, revive: &[String]) -> std::path::PathBuf {
    let questions: Vec<serde_json::Value> = (0..QUESTIONS)
        .map(|k| {
            serde_json::json!({
                "text": format!("question {k}?"),
                "options": ["a", "b", "c"],
                "correct": correct(k),
            })
        })
        .collect();
    let cards: serde_json::Map<String, serde_json::Value> = revive
        .iter()
        .map(|user| (user.clone(), serde_json::json!(1)))
        .collect();
    let path = dir.join("questions.json");
    std::fs::write(
        &path,
        serde_json::json!({"questions": questions, "revive_cards": cards}).to_string(),
    )
    .expect("write questions");
    path
}

fn correct(k: u32) -> u8 {
    ((k * 7 + 1) % u32::from(OPTIONS)) as u8
}

/// What a viewer tries on a question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    Right,
    Wrong,
    /// Right, then again with another option (a duplicate).
    Twice,
    /// After the deadline.
    Late,
    /// Does not answer.
    Silent,
    /// Answers the next question instead (an attempt to skip), then nothing.
    Ahead,
}

/// A fixed, varied plan: most viewers answer right; some go wrong, late, silent or ahead
/// at different questions.
fn plan(viewer: usize, k: u32) -> Attempt {
    let k = k as usize;
    match (viewer * 31 + k * 17) % 23 {
        0 => Attempt::Wrong,
        1 if k > 0 => Attempt::Late,
        2 => Attempt::Silent,
        3 => Attempt::Twice,
        4 if k + 1 < QUESTIONS as usize => Attempt::Ahead,
        5 | 6 if viewer.is_multiple_of(4) => Attempt::Wrong,
        _ => Attempt::Right,
    }
}

fn user(viewer: usize) -> String {
    format!("viewer-{viewer:03}")
}

/// The rules, computed independently of the server: who survives each question, the
/// expected verdict of each answer, the per-option counts.
struct Reference {
    alive: Vec<bool>,
    cards: Vec<u32>,
    counts: BTreeMap<u32, Vec<u64>>,
}

impl Reference {
    /// Applies question `k`; returns each viewer's expected judged verdict, if it answers
    /// and is judged.
    fn question(&mut self, k: u32) -> Vec<Option<&'static str>> {
        let mut counts = vec![0u64; usize::from(OPTIONS)];
        let mut verdicts = Vec::new();
        for viewer in 0..self.alive.len() {
            if !self.alive[viewer] {
                verdicts.push(None);
                continue;
            }
            let verdict = match plan(viewer, k) {
                Attempt::Right | Attempt::Twice => {
                    counts[usize::from(correct(k))] += 1;
                    Some("correct")
                }
                Attempt::Wrong => {
                    counts[usize::from(wrong(k))] += 1;
                    if self.cards[viewer] > 0 {
                        self.cards[viewer] = 0;
                        Some("revived")
                    } else {
                        self.alive[viewer] = false;
                        Some("wrong")
                    }
                }
                Attempt::Late => {
                    self.alive[viewer] = false;
                    Some("late")
                }
                Attempt::Silent | Attempt::Ahead => {
                    self.alive[viewer] = false;
                    None
                }
            };
            verdicts.push(verdict);
        }
        self.counts.insert(k, counts);
        verdicts
    }
}

fn wrong(k: u32) -> u8 {
    (correct(k) + 1) % OPTIONS
}

async fn answer(
    client: &Client,
    quiz: &str,
    question: u32,
    option: u8,
) -> Result<QuizResultEvent, chorus_node::client::ClientError> {
    client
        .request(QuizAnswerRequest {
            quiz_id: quiz.to_string(),
            question,
            option,
        })
        .await
}

fn refused(result: &Result<QuizResultEvent, chorus_node::client::ClientError>) -> bool {
    matches!(result, Err(chorus_node::client::ClientError::Server(e)) if e.code == ErrorCode::QuizRefused.as_u16())
}

/// Q1-Q5 end to end: 120 viewers on three nodes, five questions, right, wrong, late,
/// revived, silent, skipping and duplicate answers; survivors, counts and payout match the
/// rules computed here, and the payout sums to the prize.
#[tokio::test]
async fn a_quiz_over_three_nodes_matches_an_independent_reference() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = three_node_cluster(dir.path()).await;
    let host = nodes[0].client(&nodes[0].ws_url(), "host").await;
    let room = create_room(&host, "Quiz night").await;
    let mut viewers = Vec::new();
    for viewer in 0..VIEWERS {
        let node = &nodes[viewer % 3];
        let client = node.client(&node.ws_url(), &user(viewer)).await;
        join(&client, &room).await;
        viewers.push(client);
    }
    // Every fifth viewer holds a revive card.
    let revive: Vec<String> = (0..VIEWERS).step_by(5).map(user).collect();
    let file = questions_file(dir.path(), &revive);
    let created = admin_json(
        &nodes[1],
        &[
            "quiz",
            "create",
            "--room",
            &room,
            "--prize",
            &PRIZE_CENTS.to_string(),
            "--questions",
            file.to_str().expect("utf8"),
            "--window-secs",
            &WINDOW_SECS.to_string(),
            "--shards",
            "12",
        ],
    )
    .await;
    let quiz = created["quiz_id"].as_str().expect("quiz_id").to_string();
    let mut reference = Reference {
        alive: vec![true; VIEWERS],
        cards: (0..VIEWERS)
            .map(|v| u32::from(v.is_multiple_of(5)))
            .collect(),
        counts: BTreeMap::new(),
    };
    // Answering before the first question is refused.
    assert!(refused(&answer(&viewers[0], &quiz, 0, 0).await));

    for k in 0..QUESTIONS {
        let alive_before = reference.alive.clone();
        let expected = reference.question(k);
        let pushed = admin_json(&nodes[2], &["quiz", "push", &quiz]).await;
        assert_eq!(pushed["question"], k, "{pushed}");
        let deadline_ms = pushed["deadline_ms"].as_u64().expect("deadline");
        // In time: everyone at once.
        let in_time = viewers.iter().enumerate().map(|(viewer, client)| {
            let quiz = quiz.clone();
            async move {
                let attempt = plan(viewer, k);
                let results = match attempt {
                    Attempt::Right => vec![answer(client, &quiz, k, correct(k)).await],
                    Attempt::Wrong => vec![answer(client, &quiz, k, wrong(k)).await],
                    Attempt::Twice => vec![
                        answer(client, &quiz, k, correct(k)).await,
                        answer(client, &quiz, k, wrong(k)).await,
                    ],
                    Attempt::Ahead => vec![answer(client, &quiz, k + 1, correct(k + 1)).await],
                    Attempt::Late | Attempt::Silent => Vec::new(),
                };
                (viewer, attempt, results)
            }
        });
        let mut sealed: BTreeMap<usize, QuizResultEvent> = BTreeMap::new();
        for (viewer, attempt, results) in futures_join(in_time).await {
            let alive = alive_before[viewer];
            match (alive, attempt) {
                (_, Attempt::Late | Attempt::Silent) => {}
                (_, Attempt::Ahead) => assert!(refused(&results[0]), "{viewer} skipped ahead"),
                (false, _) => assert!(
                    refused(&results[0]),
                    "{} is out, yet: {:?}",
                    user(viewer),
                    results[0]
                ),
                (true, _) => {
                    let first = results[0]
                        .as_ref()
                        .unwrap_or_else(|e| panic!("{} answering {k}: {e}", user(viewer)));
                    if let Some(again) = results.get(1) {
                        let again = again.as_ref().expect("a duplicate is answered");
                        assert_eq!(again.sealed, first.sealed, "a duplicate changes nothing");
                    }
                    sealed.insert(viewer, first.clone());
                }
            }
        }
        assert!(
            now_ms() < deadline_ms,
            "the in-time answers took longer than the window"
        );
        // Late: after the deadline, before the announcement.
        until_past(deadline_ms).await;
        for (viewer, client) in viewers.iter().enumerate() {
            if plan(viewer, k) == Attempt::Late {
                let result = answer(client, &quiz, k, correct(k)).await;
                if alive_before[viewer] {
                    sealed.insert(viewer, result.expect("a late answer is judged"));
                } else {
                    assert!(refused(&result));
                }
            }
        }
        let announced = announce(&nodes[0], &quiz).await;
        assert_eq!(
            announced["counts"],
            serde_json::json!(reference.counts[&k]),
            "counts of question {k}"
        );
        // Every viewer gets the question and the announcement; each opens its verdict.
        for (viewer, client) in viewers.iter_mut().enumerate() {
            let question: QuizQuestionEvent = expect_event(client, "quiz.question", |e| match e {
                Event::QuizQuestion(q) if q.index == k => Some(q.clone()),
                _ => None,
            })
            .await;
            assert_eq!(question.options.len(), usize::from(OPTIONS));
            let announcement: QuizAnnounceEvent =
                expect_event(client, "quiz.announce", |e| match e {
                    Event::QuizAnnounce(a) if a.question == k => Some(a.clone()),
                    _ => None,
                })
                .await;
            assert_eq!(announcement.correct, correct(k));
            let opened = sealed.get(&viewer).map(|result| {
                open_verdict(&announcement.key, &quiz, k, &user(viewer), &result.sealed)
                    .expect("opens with the announced key")
            });
            assert_eq!(
                opened.as_deref(),
                expected[viewer],
                "{} on question {k} ({:?})",
                user(viewer),
                plan(viewer, k)
            );
        }
    }

    let finished = admin_json(&nodes[1], &["quiz", "finish", &quiz]).await;
    let survivors: Vec<String> = (0..VIEWERS)
        .filter(|v| reference.alive[*v])
        .map(user)
        .collect();
    assert!(
        !survivors.is_empty() && survivors.len() < VIEWERS / 2,
        "a useful plan: {} survivors",
        survivors.len()
    );
    // Equal shares; the remainder one cent each to the first winners by user id.
    let share = PRIZE_CENTS / survivors.len() as u64;
    let remainder = (PRIZE_CENTS % survivors.len() as u64) as usize;
    let expected: BTreeMap<String, u64> = survivors
        .iter()
        .enumerate()
        .map(|(i, u)| (u.clone(), share + u64::from(i < remainder)))
        .collect();
    assert_eq!(finished["amounts"], serde_json::json!(expected));
    assert_eq!(finished["paid_cents"], PRIZE_CENTS, "the payout is exact");
    // Results are the same from any node, with a user's history.
    let revived = (0..VIEWERS)
        .find(|v| reference.alive[*v] && reference.cards[*v] == 0 && v.is_multiple_of(5))
        .map(user);
    if let Some(revived) = revived {
        let results = admin_json(
            &nodes[2],
            &["--json", "quiz", "results", &quiz, "--user", &revived],
        )
        .await;
        assert_eq!(results["amounts"], serde_json::json!(expected));
        assert!(results["user"]["revived_at"].is_u64(), "{results}");
        assert_eq!(results["user"]["cents"], expected[&revived]);
        let verdicts: BTreeSet<&str> = results["user"]["verdicts"]
            .as_object()
            .expect("verdicts")
            .values()
            .filter_map(|v| v["verdict"].as_str())
            .collect();
        assert_eq!(
            verdicts,
            ["correct", "revived"].into_iter().collect::<BTreeSet<_>>()
        );
    }
    let (ok, stdout, _) = admin(&nodes[0], &["quiz", "results", &quiz]).await;
    assert!(ok && stdout.contains(&format!("{PRIZE_CENTS} of {PRIZE_CENTS} cents paid")));
    // The finish is idempotent and the show over.
    let again = admin_json(&nodes[0], &["quiz", "finish", &quiz]).await;
    assert_eq!(again["amounts"], finished["amounts"]);
    assert!(!admin(&nodes[0], &["quiz", "push", &quiz]).await.0);
}

async fn futures_join<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = futures.collect();
    let mut outputs = Vec::with_capacity(handles.len());
    // Polled together: every answer is on its way before any is awaited to the end.
    let mut pinned: Vec<_> = handles.into_iter().map(Box::pin).collect();
    let mut done: Vec<Option<F::Output>> = (0..pinned.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, future) in pinned.iter_mut().enumerate() {
            if done[i].is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(output) => done[i] = Some(output),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.extend(done.into_iter().flatten());
    outputs
}

/// Q3: a viewer's sealed verdict says nothing before the announcement (no key opens it,
/// right and wrong look alike, neither the question nor the status carries the answer or
/// the key) and opens with the announced key after it; `chorus client answer --wait`
/// prints it.
#[tokio::test]
async fn a_sealed_verdict_opens_only_with_the_announced_key() {
    let node = TestNode::start(&[]).await;
    let host = node.client(&node.ws_url(), "host").await;
    let room = create_room(&host, "Sealed").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = questions_file(dir.path(), &[]);
    let created = admin_json(
        &node,
        &[
            "quiz",
            "create",
            "--room",
            &room,
            "--prize",
            "1000",
            "--questions",
            file.to_str().expect("utf8"),
            "--window-secs",
            "2",
        ],
    )
    .await;
    let quiz = created["quiz_id"].as_str().expect("quiz_id").to_string();
    let mut ann = node.client(&node.ws_url(), "ann").await;
    join(&ann, &room).await;
    let bob = node.client(&node.ws_url(), "bob").await;
    join(&bob, &room).await;
    let pushed = admin_json(&node, &["quiz", "push", &quiz]).await;
    let deadline_ms = pushed["deadline_ms"].as_u64().expect("deadline");

    // carol answers through the CLI and waits for the announcement.
    let mut carol = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args([
            "client",
            "--url",
            &node.ws_url(),
            "--user",
            "carol",
            "answer",
        ])
        .args([&quiz, "0", &correct(0).to_string(), "--room", &room])
        .args(["--wait", "30"])
        .env("CHORUS_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn chorus client answer");
    let mut carol_lines = BufReader::new(carol.stdout.take().expect("stdout")).lines();
    let mut carol_sealed = None;
    while carol_sealed.is_none() {
        let line = tokio::time::timeout(DEADLINE, carol_lines.next_line())
            .await
            .expect("carol's answer in time")
            .expect("read")
            .expect("carol's output ended early");
        let value: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
        assert_ne!(value["kind"], "quiz.verdict", "no verdict before the key");
        if value["sealed"].is_string() {
            carol_sealed = Some(value);
        }
    }

    let right = answer(&ann, &quiz, 0, correct(0))
        .await
        .expect("ann answers");
    let wrong_answer = answer(&bob, &quiz, 0, wrong(0)).await.expect("bob answers");
    let question = expect_event(&mut ann, "quiz.question", |e| match e {
        Event::QuizQuestion(q) => Some(q.clone()),
        _ => None,
    })
    .await;
    // The same result, pushed to ann's session too.
    let pushed_result = expect_event(&mut ann, "quiz.result", |e| match e {
        Event::QuizResult(r) => Some(r.clone()),
        _ => None,
    })
    .await;
    assert_eq!(pushed_result, right);
    assert_eq!(
        right.sealed.len(),
        wrong_answer.sealed.len(),
        "right and wrong look alike"
    );
    // What a viewer holds before the announcement: the question, the status, a zero key,
    // a key of its own making. None of it opens the verdict.
    let question_json = serde_json::to_string(&question).expect("json");
    assert!(!question_json.contains("correct") && !question_json.contains("key"));
    let status = admin_json(&node, &["quiz", "status", &quiz]).await;
    assert!(!status.to_string().contains("key"), "{status}");
    for key in ["00".repeat(32), "ab".repeat(32)] {
        assert!(open_verdict(&key, &quiz, 0, "ann", &right.sealed).is_err());
    }
    assert!(now_ms() < deadline_ms + 1_000);

    until_past(deadline_ms).await;
    let announced = announce(&node, &quiz).await;
    assert_eq!(announced["counts"], serde_json::json!([0, 2, 1]));
    let announcement = expect_event(&mut ann, "quiz.announce", |e| match e {
        Event::QuizAnnounce(a) => Some(a.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        open_verdict(&announcement.key, &quiz, 0, "ann", &right.sealed).expect("opens"),
        "correct"
    );
    assert_eq!(
        open_verdict(&announcement.key, &quiz, 0, "bob", &wrong_answer.sealed).expect("opens"),
        "wrong"
    );
    assert!(
        open_verdict(&announcement.key, &quiz, 0, "bob", &right.sealed).is_err(),
        "another viewer's verdict does not open as mine"
    );
    // carol's CLI opened hers.
    let verdict = expect_line(&mut carol_lines, "carol's verdict", |v| {
        v["kind"] == "quiz.verdict"
    })
    .await;
    assert_eq!(verdict["body"]["verdict"], "correct", "{verdict}");
    let exited = carol.wait_with_output().await.expect("carol exits");
    assert!(
        exited.status.success(),
        "{}",
        String::from_utf8_lossy(&exited.stderr)
    );
}
