//! Live quiz (SPEC Q1-Q4), sans-IO and deterministic: the show's phases, judging answers
//! at submit time, per-option counts, and the payout.
//!
//! A show has questions 0..n. The operator pushes question `k` (it opens with a deadline),
//! then announces its answer, then pushes `k + 1`, and so on; after the last announcement
//! the show finishes and the survivors split the prize.
//!
//! # Judging
//!
//! A viewer's progress is the number of questions it has passed in a row (answered right,
//! or wrong and revived). An answer to question `k` is judged when it arrives, in the
//! order that is cheapest first for honest clients (the source's design: the checks an
//! honest client always passes come last):
//!
//! 1. in time (server clock, before the question's deadline), else *late*: eliminated;
//! 2. right or wrong;
//! 3. if wrong: a revive card, if the viewer has one and has not revived in this show;
//!    else eliminated;
//! 4. then the safety checks, which override the above: the show is live, the viewer is
//!    not eliminated, `k` is the current question, and the viewer passed every question
//!    before `k` (no skipping).
//!
//! The order changes the cost, never the outcome: a verdict is recorded only after every
//! check passed. A repeated answer to the same question gets the first verdict back
//! (idempotent) and changes nothing. A viewer who does not answer question `k` in time
//! cannot answer `k + 1` (its progress stays below): not answering eliminates.
//!
//! # Payout
//!
//! The winners are the viewers who passed every question. Each gets `⌊prize / w⌋` cents;
//! the `prize mod w` remaining cents go one each to the first winners in user-id order
//! (bytewise). The amounts sum to the prize exactly; with no winner nothing is paid.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// Default answer window, ms.
pub const ANSWER_WINDOW_MS_DEFAULT: u64 = 10_000;
/// Most questions in a show.
pub const QUESTIONS_MAX: usize = 50;
/// Most options per question.
pub const OPTIONS_MAX: usize = 6;
/// Most users a definition grants revive cards to.
pub const REVIVE_USERS_MAX: usize = 100_000;
/// Longest question or option text, bytes.
pub const QUESTION_TEXT_BYTES_MAX: usize = 500;

/// Why a show cannot be created or an operator action was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuizError {
    /// The definition breaks a rule.
    #[error("invalid quiz: {0}")]
    Invalid(String),
    /// The action does not fit the show's phase.
    #[error("not now: {0}")]
    Phase(String),
}

/// One question (the right option is part of the durable definition, not sent to
/// viewers before the announcement).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Question {
    /// The question.
    pub text: String,
    /// The options, 2 to [`OPTIONS_MAX`].
    pub options: Vec<String>,
    /// Index of the right option.
    pub correct: u8,
}

/// A show as its operator created it (durable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuizDefinition {
    /// The show's id.
    pub quiz_id: String,
    /// The room viewers watch it in.
    pub room_id: String,
    /// When it starts, ms since the epoch.
    pub start_ms: u64,
    /// Cents the survivors split.
    pub prize_cents: u64,
    /// The questions, in order.
    pub questions: Vec<Question>,
    /// Time to answer each question, ms.
    pub window_ms: u64,
    /// Revive cards by user, granted when the user first answers (at most
    /// [`REVIVE_USERS_MAX`] users).
    #[serde(default)]
    pub revive_cards: BTreeMap<String, u32>,
}

impl QuizDefinition {
    /// Checks the definition.
    ///
    /// # Errors
    ///
    /// [`QuizError::Invalid`] saying which rule it breaks.
    pub fn validate(&self) -> Result<(), QuizError> {
        let invalid = |why: String| Err(QuizError::Invalid(why));
        if self.questions.is_empty() || self.questions.len() > QUESTIONS_MAX {
            return invalid(format!("a show has 1-{QUESTIONS_MAX} questions"));
        }
        for (k, question) in self.questions.iter().enumerate() {
            if !(2..=OPTIONS_MAX).contains(&question.options.len()) {
                return invalid(format!("question {k} needs 2-{OPTIONS_MAX} options"));
            }
            if usize::from(question.correct) >= question.options.len() {
                return invalid(format!("question {k}'s right option is not one of them"));
            }
        }
        if self
            .questions
            .iter()
            .flat_map(|q| std::iter::once(&q.text).chain(&q.options))
            .any(|text| text.is_empty() || text.len() > QUESTION_TEXT_BYTES_MAX)
        {
            return invalid(format!(
                "question and option texts have 1-{QUESTION_TEXT_BYTES_MAX} bytes"
            ));
        }
        if self.window_ms == 0 {
            return invalid("the answer window must be positive".into());
        }
        if self.revive_cards.len() > REVIVE_USERS_MAX {
            return invalid(format!(
                "revive cards go to at most {REVIVE_USERS_MAX} users"
            ));
        }
        Ok(())
    }
}

/// Where the show is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum QuizPhase {
    /// Not started: no question pushed yet.
    Waiting,
    /// Question `k` is open until `deadline_ms` (answers after it are late).
    Asking {
        /// The question.
        k: u32,
        /// Its deadline, ms since the epoch.
        deadline_ms: u64,
    },
    /// Question `k`'s answer was announced.
    Announced {
        /// The question.
        k: u32,
    },
    /// The last answer was announced and the prize split.
    Finished,
}

/// The verdict on one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Right: the viewer continues.
    Correct,
    /// Wrong, but a revive card was used: the viewer continues.
    Revived,
    /// Wrong, no card: eliminated.
    Wrong,
    /// After the deadline: eliminated.
    Late,
    /// Refused: no question is open, or it is not this one.
    NotCurrent,
    /// Refused: the viewer did not pass every earlier question (eliminated by not
    /// answering, or trying to skip).
    Skipped,
    /// Refused: the viewer is out.
    Eliminated,
}

impl Verdict {
    /// Whether the viewer goes on to the next question.
    pub fn passes(self) -> bool {
        matches!(self, Verdict::Correct | Verdict::Revived)
    }

    /// The verdict's snake_case name (what is sealed, and what refusals say).
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Correct => "correct",
            Verdict::Revived => "revived",
            Verdict::Wrong => "wrong",
            Verdict::Late => "late",
            Verdict::NotCurrent => "not_current",
            Verdict::Skipped => "skipped",
            Verdict::Eliminated => "eliminated",
        }
    }

    /// Whether the verdict is recorded (the others are refusals that change nothing).
    pub fn is_judged(self) -> bool {
        matches!(
            self,
            Verdict::Correct | Verdict::Revived | Verdict::Wrong | Verdict::Late
        )
    }
}

/// One viewer's state in a show.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Viewer {
    /// Questions passed in a row, from the first.
    pub progress: u32,
    /// The question at which it went out.
    pub eliminated_at: Option<u32>,
    /// Revive cards held.
    pub revive_cards: u32,
    /// The question at which it used a card (at most one per show).
    pub revived_at: Option<u32>,
    /// Verdicts by question (for idempotent repeats and the per-user history).
    pub verdicts: BTreeMap<u32, (u8, Verdict)>,
}

/// The answers of a set of viewers (a shard: the show's answers are split by user over
/// several of these, each on its own node, so more nodes take more answers).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnswerShard {
    /// By user.
    pub viewers: HashMap<String, Viewer>,
    /// Per question, answers per option (judged answers only).
    pub counts: BTreeMap<u32, Vec<u64>>,
}

/// What a shard needs to know of the show to judge (pushed with each question).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenQuestion {
    /// The question.
    pub k: u32,
    /// Its deadline.
    pub deadline_ms: u64,
    /// The right option.
    pub correct: u8,
    /// Its number of options.
    pub options: u8,
}

impl AnswerShard {
    /// Gives `user` revive cards (before or during the show).
    pub fn grant_revive_cards(&mut self, user: &str, cards: u32) {
        let viewer = self.viewers.entry(user.to_string()).or_default();
        viewer.revive_cards = viewer.revive_cards.saturating_add(cards);
    }

    /// Judges `user`'s answer `option` to question `k`, received at `now_ms`, against the
    /// open question (`None`: no question is open). See the module docs for the order.
    pub fn answer(
        &mut self,
        open: Option<&OpenQuestion>,
        now_ms: u64,
        user: &str,
        k: u32,
        option: u8,
    ) -> Verdict {
        // An answer already judged gets its verdict back.
        if let Some((_, verdict)) = self.viewers.get(user).and_then(|v| v.verdicts.get(&k)) {
            return *verdict;
        }
        // Cheapest first: time, then rightness, then the card.
        let Some(open) = open else {
            return Verdict::NotCurrent;
        };
        let late = now_ms >= open.deadline_ms;
        let right = option == open.correct;
        let viewer = self.viewers.get(user);
        let card =
            !late && !right && viewer.is_some_and(|v| v.revive_cards > 0 && v.revived_at.is_none());
        let verdict = match (late, right, card) {
            (true, _, _) => Verdict::Late,
            (false, true, _) => Verdict::Correct,
            (false, false, true) => Verdict::Revived,
            (false, false, false) => Verdict::Wrong,
        };
        // Then the safety checks, which an honest client passes.
        if k != open.k || option >= open.options {
            return Verdict::NotCurrent;
        }
        let progress = viewer.map_or(0, |v| v.progress);
        if viewer.is_some_and(|v| v.eliminated_at.is_some()) {
            return Verdict::Eliminated;
        }
        if progress != k {
            return Verdict::Skipped;
        }
        let viewer = self.viewers.entry(user.to_string()).or_default();
        match verdict {
            Verdict::Correct => viewer.progress += 1,
            Verdict::Revived => {
                viewer.progress += 1;
                viewer.revive_cards -= 1;
                viewer.revived_at = Some(k);
            }
            _ => viewer.eliminated_at = Some(k),
        }
        viewer.verdicts.insert(k, (option, verdict));
        if verdict != Verdict::Late {
            let counts = self
                .counts
                .entry(k)
                .or_insert_with(|| vec![0; usize::from(open.options)]);
            if let Some(count) = counts.get_mut(usize::from(option)) {
                *count += 1;
            }
        }
        verdict
    }

    /// Closes question `k` (its answer is announced; `options` options): every viewer
    /// here who passed the questions before it but did not answer it is eliminated at
    /// `k` (viewers never seen here did not answer question 0 and are out already).
    /// Returns the answers in time per option.
    pub fn close(&mut self, k: u32, options: u8) -> Vec<u64> {
        for viewer in self.viewers.values_mut() {
            if viewer.eliminated_at.is_none()
                && viewer.progress == k
                && !viewer.verdicts.contains_key(&k)
            {
                viewer.eliminated_at = Some(k);
            }
        }
        let mut counts = self.counts.get(&k).cloned().unwrap_or_default();
        counts.resize(usize::from(options).max(counts.len()), 0);
        counts
    }

    /// Takes `viewer` as `user`'s state (a copy from another node) if it is further along
    /// than the one held (more verdicts, or out where the held one is not); per-option
    /// counts follow from the verdicts.
    pub fn merge(&mut self, user: &str, viewer: Viewer) {
        let ahead = match self.viewers.get(user) {
            None => true,
            Some(held) => {
                (viewer.verdicts.len(), viewer.eliminated_at.is_some())
                    > (held.verdicts.len(), held.eliminated_at.is_some())
            }
        };
        if !ahead {
            return;
        }
        if let Some(held) = self.viewers.get(user) {
            Self::count(&mut self.counts, held, false);
        }
        Self::count(&mut self.counts, &viewer, true);
        self.viewers.insert(user.to_string(), viewer);
    }

    /// Adds (or removes) `viewer`'s judged answers in time to `counts`.
    fn count(counts: &mut BTreeMap<u32, Vec<u64>>, viewer: &Viewer, add: bool) {
        for (k, (option, verdict)) in &viewer.verdicts {
            if *verdict == Verdict::Late {
                continue;
            }
            let row = counts.entry(*k).or_default();
            let index = usize::from(*option);
            if row.len() <= index {
                row.resize(index + 1, 0);
            }
            row[index] = if add {
                row[index].saturating_add(1)
            } else {
                row[index].saturating_sub(1)
            };
        }
    }

    /// The users who passed all `questions`.
    pub fn survivors(&self, questions: u32) -> Vec<String> {
        let mut survivors: Vec<String> = self
            .viewers
            .iter()
            .filter(|(_, v)| v.progress >= questions && v.eliminated_at.is_none())
            .map(|(user, _)| user.clone())
            .collect();
        survivors.sort_unstable();
        survivors
    }
}

/// The answer shard of `user` among `shards` (XXH3-64 of the user id, modulo): fixed for
/// a show, since its shard count is stored with it.
pub fn shard_of(user: &str, shards: u32) -> u32 {
    (xxhash_rust::xxh3::xxh3_64(user.as_bytes()) % u64::from(shards.max(1))) as u32
}

/// Splits `prize_cents` among `winners` (any order): equal shares, the remainder one cent
/// each to the first winners in user-id order. Sums to the prize exactly (or to 0 with no
/// winner).
pub fn payout(prize_cents: u64, winners: &[String]) -> BTreeMap<String, u64> {
    let mut sorted: Vec<&String> = winners.iter().collect();
    sorted.sort_unstable();
    sorted.dedup();
    let count = sorted.len() as u64;
    if count == 0 {
        return BTreeMap::new();
    }
    let share = prize_cents / count;
    let remainder = prize_cents % count;
    sorted
        .into_iter()
        .enumerate()
        .map(|(i, user)| (user.clone(), share + u64::from((i as u64) < remainder)))
        .collect()
}

/// The show's controller: phases and the operator's actions (one per show).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuizShow {
    /// The show.
    pub definition: QuizDefinition,
    /// Where it is.
    pub phase: QuizPhase,
}

impl QuizShow {
    /// A new show.
    ///
    /// # Errors
    ///
    /// [`QuizError::Invalid`].
    pub fn create(definition: QuizDefinition) -> Result<Self, QuizError> {
        definition.validate()?;
        Ok(QuizShow {
            definition,
            phase: QuizPhase::Waiting,
        })
    }

    /// The operator pushes the next question at `now_ms`: it opens until now + window.
    ///
    /// # Errors
    ///
    /// [`QuizError::Phase`] before the start, while a question is open, or after the
    /// last.
    pub fn push(&mut self, now_ms: u64) -> Result<OpenQuestion, QuizError> {
        let k = match self.phase {
            QuizPhase::Waiting if now_ms < self.definition.start_ms => {
                return Err(QuizError::Phase("the show has not started".into()))
            }
            QuizPhase::Waiting => 0,
            QuizPhase::Announced { k } => k + 1,
            QuizPhase::Asking { k, .. } => {
                return Err(QuizError::Phase(format!(
                    "question {k} is open: announce its answer first"
                )))
            }
            QuizPhase::Finished => return Err(QuizError::Phase("the show is over".into())),
        };
        let question = self
            .definition
            .questions
            .get(k as usize)
            .ok_or_else(|| QuizError::Phase("no question left".into()))?;
        let deadline_ms = now_ms.saturating_add(self.definition.window_ms);
        self.phase = QuizPhase::Asking { k, deadline_ms };
        Ok(OpenQuestion {
            k,
            deadline_ms,
            correct: question.correct,
            options: question.options.len() as u8,
        })
    }

    /// The open question, if one is.
    pub fn open_question(&self) -> Option<OpenQuestion> {
        match self.phase {
            QuizPhase::Asking { k, deadline_ms } => {
                let question = &self.definition.questions[k as usize];
                Some(OpenQuestion {
                    k,
                    deadline_ms,
                    correct: question.correct,
                    options: question.options.len() as u8,
                })
            }
            _ => None,
        }
    }

    /// The operator announces the open question's answer (after its deadline): returns
    /// the right option. After the last question the show is finished.
    ///
    /// # Errors
    ///
    /// [`QuizError::Phase`] with no open question or before its deadline.
    pub fn announce(&mut self, now_ms: u64) -> Result<u8, QuizError> {
        let QuizPhase::Asking { k, deadline_ms } = self.phase else {
            return Err(QuizError::Phase("no question is open".into()));
        };
        if now_ms < deadline_ms {
            return Err(QuizError::Phase(format!(
                "question {k} is open for {} ms more",
                deadline_ms - now_ms
            )));
        }
        let last = k as usize + 1 == self.definition.questions.len();
        self.phase = if last {
            QuizPhase::Finished
        } else {
            QuizPhase::Announced { k }
        };
        Ok(self.definition.questions[k as usize].correct)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn show(questions: usize) -> QuizShow {
        QuizShow::create(QuizDefinition {
            quiz_id: "q-1".into(),
            room_id: "r-1".into(),
            start_ms: 1_000,
            prize_cents: 100_000,
            questions: (0..questions)
                .map(|k| Question {
                    text: format!("question {k}"),
                    options: vec!["a".into(), "b".into(), "c".into()],
                    correct: (k % 3) as u8,
                })
                .collect(),
            window_ms: 10_000,
            revive_cards: BTreeMap::new(),
        })
        .expect("show")
    }

    #[test]
    fn answers_are_judged_with_revives_elimination_and_idempotent_repeats() {
        let mut show = show(3);
        let mut shard = AnswerShard::default();
        shard.grant_revive_cards("rev", 1);
        assert_eq!(
            show.push(500),
            Err(QuizError::Phase("the show has not started".into()))
        );
        assert_eq!(
            shard.answer(show.open_question().as_ref(), 900, "ann", 0, 0),
            Verdict::NotCurrent
        );
        let q0 = show.push(1_000).expect("q0");
        let open = Some(q0);
        assert_eq!(
            shard.answer(open.as_ref(), 2_000, "ann", 0, 0),
            Verdict::Correct
        );
        assert_eq!(
            shard.answer(open.as_ref(), 2_001, "ann", 0, 1),
            Verdict::Correct,
            "a repeat"
        );
        assert_eq!(
            shard.answer(open.as_ref(), 2_000, "bob", 0, 1),
            Verdict::Wrong
        );
        assert_eq!(
            shard.answer(open.as_ref(), 2_000, "rev", 0, 2),
            Verdict::Revived
        );
        assert_eq!(
            shard.answer(open.as_ref(), 11_000, "late", 0, 0),
            Verdict::Late
        );
        assert_eq!(
            shard.answer(open.as_ref(), 2_000, "skip", 1, 1),
            Verdict::NotCurrent
        );
        assert_eq!(
            shard.counts[&0],
            vec![1, 1, 1],
            "late answers are not counted"
        );
        assert_eq!(
            show.announce(5_000),
            Err(QuizError::Phase(
                "question 0 is open for 6000 ms more".into()
            ))
        );
        assert_eq!(show.announce(11_000), Ok(0));
        let q1 = show.push(12_000).expect("q1");
        let open = Some(q1);
        assert_eq!(
            shard.answer(open.as_ref(), 13_000, "bob", 1, 1),
            Verdict::Eliminated
        );
        assert_eq!(
            shard.answer(open.as_ref(), 13_000, "quiet", 1, 1),
            Verdict::Skipped,
            "did not answer q0"
        );
        // rev used its card: a second wrong answer eliminates.
        assert_eq!(
            shard.answer(open.as_ref(), 13_000, "rev", 1, 0),
            Verdict::Wrong
        );
        assert_eq!(
            shard.answer(open.as_ref(), 13_000, "ann", 1, 1),
            Verdict::Correct
        );
        show.announce(22_000).expect("a1");
        let q2 = show.push(23_000).expect("q2");
        assert_eq!(
            shard.answer(Some(&q2), 24_000, "ann", 2, 2),
            Verdict::Correct
        );
        assert_eq!(show.announce(33_000), Ok(2));
        assert_eq!(show.phase, QuizPhase::Finished);
        assert!(show.push(34_000).is_err());
        assert_eq!(shard.survivors(3), vec!["ann".to_string()]);
    }

    #[test]
    fn closing_a_question_eliminates_who_did_not_answer_it() {
        let mut show = show(2);
        let mut shard = AnswerShard::default();
        shard.grant_revive_cards("idle", 1);
        let q0 = show.push(1_000).expect("q0");
        assert_eq!(
            shard.answer(Some(&q0), 1_500, "ann", 0, 0),
            Verdict::Correct
        );
        assert_eq!(
            shard.answer(Some(&q0), 1_500, "bob", 0, 0),
            Verdict::Correct
        );
        assert_eq!(shard.close(0, 3), vec![2, 0, 0]);
        assert_eq!(
            shard.viewers["idle"].eliminated_at,
            Some(0),
            "did not answer"
        );
        show.announce(11_000).expect("a0");
        let q1 = show.push(12_000).expect("q1");
        assert_eq!(
            shard.answer(Some(&q1), 12_500, "ann", 1, 1),
            Verdict::Correct
        );
        assert_eq!(shard.close(1, 3), vec![0, 1, 0]);
        assert_eq!(shard.viewers["bob"].eliminated_at, Some(1));
        assert_eq!(shard.survivors(2), vec!["ann".to_string()]);
        // A copy elsewhere rebuilds the same counts from the verdicts.
        let mut copy = AnswerShard::default();
        for (user, viewer) in shard.viewers.clone() {
            copy.merge(&user, viewer.clone());
            copy.merge(&user, viewer);
        }
        assert_eq!(copy.close(0, 3), vec![2, 0, 0]);
        assert_eq!(copy.close(1, 3), vec![0, 1, 0]);
        assert_eq!(copy.survivors(2), shard.survivors(2));
    }

    #[test]
    fn the_payout_splits_the_prize_exactly_by_a_fixed_rule() {
        let winners: Vec<String> = ["cy", "ann", "bob"].iter().map(|s| s.to_string()).collect();
        let paid = payout(100, &winners);
        assert_eq!(paid["ann"], 34);
        assert_eq!(paid["bob"], 33);
        assert_eq!(paid["cy"], 33);
        assert!(payout(100, &[]).is_empty());
    }

    proptest! {
        #[test]
        fn payouts_sum_to_the_prize(prize in 0u64..10_000_000_000, winners in 1usize..5_000) {
            let users: Vec<String> = (0..winners).map(|i| format!("u{i}")).collect();
            let paid = payout(prize, &users);
            prop_assert_eq!(paid.values().sum::<u64>(), prize);
            let (min, max) = (paid.values().min().copied(), paid.values().max().copied());
            prop_assert!(max.zip(min).is_some_and(|(max, min)| max - min <= 1));
        }
    }

    #[test]
    fn bad_shows_are_refused() {
        let mut definition = show(1).definition;
        definition.questions[0].correct = 5;
        assert!(QuizShow::create(definition.clone()).is_err());
        definition.questions.clear();
        assert!(QuizShow::create(definition).is_err());
    }
}
