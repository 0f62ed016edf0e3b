//! The quiz controller and the answer shards' judging, sans-IO (SPEC Q1-Q4).
//!
//! One node controls a show (its ring owner); it runs the operator's actions. Each action
//! is a short exchange with this core, in the style of openraft's `Engine`: the shell
//! calls [`QuizControl::push`], [`QuizControl::announce`] or [`QuizControl::finish`] and
//! carries out the [`ControlStep`] it gets back: gather something from the answer shards
//! (their counts for the closed question, their survivors), hand it in
//! ([`QuizControl::counts`], [`QuizControl::survivors`]), then commit the show's next
//! [`QuizState`] (in Raft) and announce the [`Notice`] to the room. The core decides the
//! phases, the question keys, the counts, the revision and the payout; the shell does the
//! I/O.
//!
//! Judging ([`judge`]) runs on the node that holds a viewer's answer shard: it checks the
//! shard, gives revive cards on a viewer's first answer, judges against the open question
//! of the committed state (rules in [`crate::quiz`]), and names the question's key the
//! verdict is sealed with.
//!
//! Invariants (checked by the tests over whole shows): the revision grows by one per
//! committed step; `keys.len()` is the number of questions pushed; counts exist only for
//! announced questions; the results, once there, pay out exactly the prize (or nothing
//! with no winner) and never change.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::quiz::{
    payout, shard_of, AnswerShard, OpenQuestion, QuizDefinition, QuizError, QuizPhase, QuizShow,
    Verdict,
};

/// A show's progress as stored in Raft, written by its controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuizState {
    /// Transitions so far (a node keeps the highest it has seen).
    pub revision: u64,
    /// Where the show is.
    pub phase: QuizPhase,
    /// One key per pushed question, hex (secret until that question is announced).
    pub keys: Vec<String>,
    /// Per announced question, answers in time per option (all shards).
    pub counts: BTreeMap<u32, Vec<u64>>,
    /// After `finish`: cents per winner.
    pub results: Option<BTreeMap<String, u64>>,
}

impl Default for QuizState {
    fn default() -> Self {
        QuizState {
            revision: 0,
            phase: QuizPhase::Waiting,
            keys: Vec::new(),
            counts: BTreeMap::new(),
            results: None,
        }
    }
}

/// The open question of a show in `state`, if one is.
pub fn open_question(definition: &QuizDefinition, state: &QuizState) -> Option<OpenQuestion> {
    let QuizPhase::Asking { k, deadline_ms } = state.phase else {
        return None;
    };
    let question = definition.questions.get(k as usize)?;
    Some(OpenQuestion {
        k,
        deadline_ms,
        correct: question.correct,
        options: question.options.len() as u8,
    })
}

/// What the shell gathers from every answer shard before the action goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gather {
    /// Close `question` on every shard and bring back its counts per option.
    Close {
        /// The question.
        question: u32,
        /// Its number of options.
        options: u8,
    },
    /// Bring back every shard's survivors of all `questions`.
    Survivors {
        /// The show's questions.
        questions: u32,
    },
}

/// What the room is told once a step is committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A question opened.
    Question {
        /// Its index.
        index: u32,
        /// The show's questions.
        questions: u32,
        /// Its text.
        text: String,
        /// Its options.
        options: Vec<String>,
        /// Its deadline.
        deadline_ms: u64,
    },
    /// A question's answer.
    Announce {
        /// The question.
        question: u32,
        /// The right option.
        correct: u8,
        /// The key its verdicts were sealed with (hex).
        key: String,
        /// Answers in time per option.
        counts: Vec<u64>,
        /// Whether it was the last question.
        last: bool,
    },
    /// The prize was split.
    Finished {
        /// Winners.
        winners: u64,
        /// The prize.
        prize_cents: u64,
        /// One winner's share (the first `prize mod winners` get one cent more).
        share_cents: u64,
    },
}

/// What the shell does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlStep {
    /// Gather this from the shards and hand it in.
    Gather(Gather),
    /// Commit this state (Raft), tell every node, then announce the notice to the room.
    Commit {
        /// The show's next state.
        state: QuizState,
        /// What the room hears.
        notice: Notice,
    },
    /// Nothing to do: the action was done before (a repeated `finish`).
    Done,
}

/// What an action waits for between a [`ControlStep::Gather`] and its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Awaiting {
    Counts {
        question: u32,
        options: u8,
        correct: u8,
        phase: QuizPhase,
    },
    Survivors,
}

/// The controller of one show: its definition and committed state.
#[derive(Debug, Clone)]
pub struct QuizControl {
    definition: QuizDefinition,
    state: QuizState,
    awaiting: Option<Awaiting>,
}

impl QuizControl {
    /// The controller of a show at its committed `state`.
    pub fn new(definition: QuizDefinition, state: QuizState) -> Self {
        QuizControl {
            definition,
            state,
            awaiting: None,
        }
    }

    /// The committed state this controller works from.
    pub fn state(&self) -> &QuizState {
        &self.state
    }

    fn show(&self) -> QuizShow {
        QuizShow {
            definition: self.definition.clone(),
            phase: self.state.phase,
        }
    }

    fn next_state(&self) -> QuizState {
        let mut next = self.state.clone();
        next.revision += 1;
        next
    }

    /// Opens the next question at `now_ms`, with `key` (hex, fresh and secret) to seal
    /// its verdicts.
    ///
    /// # Errors
    ///
    /// [`QuizError::Phase`]: before the start, while a question is open, after the last.
    pub fn push(&mut self, now_ms: u64, key: String) -> Result<ControlStep, QuizError> {
        let mut show = self.show();
        let open = show.push(now_ms)?;
        let mut state = self.next_state();
        state.phase = show.phase;
        state.keys.truncate(open.k as usize);
        state.keys.push(key);
        let question = &self.definition.questions[open.k as usize];
        let notice = Notice::Question {
            index: open.k,
            questions: self.definition.questions.len() as u32,
            text: question.text.clone(),
            options: question.options.clone(),
            deadline_ms: open.deadline_ms,
        };
        self.awaiting = None;
        Ok(ControlStep::Commit { state, notice })
    }

    /// Announces the open question's answer at `now_ms` (after its deadline): first the
    /// shards close it and count.
    ///
    /// # Errors
    ///
    /// [`QuizError::Phase`]: no question open, or before its deadline.
    pub fn announce(&mut self, now_ms: u64) -> Result<ControlStep, QuizError> {
        let QuizPhase::Asking { k, .. } = self.state.phase else {
            return Err(QuizError::Phase("no question is open".into()));
        };
        let mut show = self.show();
        let correct = show.announce(now_ms)?;
        let options = self.definition.questions[k as usize].options.len() as u8;
        self.awaiting = Some(Awaiting::Counts {
            question: k,
            options,
            correct,
            phase: show.phase,
        });
        Ok(ControlStep::Gather(Gather::Close {
            question: k,
            options,
        }))
    }

    /// The shards' counts for the question being announced (one vector per shard or
    /// group of shards, added up).
    ///
    /// # Errors
    ///
    /// [`QuizError::Phase`] if no announcement waits for counts.
    pub fn counts(&mut self, parts: &[Vec<u64>]) -> Result<ControlStep, QuizError> {
        let Some(Awaiting::Counts {
            question,
            options,
            correct,
            phase,
        }) = self.awaiting.take()
        else {
            return Err(QuizError::Phase("no announcement waits for counts".into()));
        };
        let mut counts = vec![0u64; usize::from(options)];
        for part in parts {
            for (sum, count) in counts.iter_mut().zip(part) {
                *sum = sum.saturating_add(*count);
            }
        }
        let mut state = self.next_state();
        state.phase = phase;
        state.counts.insert(question, counts.clone());
        let key = state
            .keys
            .get(question as usize)
            .cloned()
            .unwrap_or_default();
        let notice = Notice::Announce {
            question,
            correct,
            key,
            counts,
            last: phase == QuizPhase::Finished,
        };
        Ok(ControlStep::Commit { state, notice })
    }

    /// Splits the prize among the survivors (after the last announcement): first the
    /// shards name them. A show already paid out is [`ControlStep::Done`].
    ///
    /// # Errors
    ///
    /// [`QuizError::Phase`] before the last announcement.
    pub fn finish(&mut self) -> Result<ControlStep, QuizError> {
        if self.state.results.is_some() {
            return Ok(ControlStep::Done);
        }
        if self.state.phase != QuizPhase::Finished {
            return Err(QuizError::Phase(
                "announce the last question's answer first".into(),
            ));
        }
        self.awaiting = Some(Awaiting::Survivors);
        Ok(ControlStep::Gather(Gather::Survivors {
            questions: self.definition.questions.len() as u32,
        }))
    }

    /// The shards' survivors (from every shard).
    ///
    /// # Errors
    ///
    /// [`QuizError::Phase`] if no payout waits for them.
    pub fn survivors(&mut self, winners: &[String]) -> Result<ControlStep, QuizError> {
        if self.awaiting.take() != Some(Awaiting::Survivors) {
            return Err(QuizError::Phase("no payout waits for survivors".into()));
        }
        let paid = payout(self.definition.prize_cents, winners);
        let count = paid.len() as u64;
        let mut state = self.next_state();
        state.results = Some(paid);
        let prize_cents = self.definition.prize_cents;
        let notice = Notice::Finished {
            winners: count,
            prize_cents,
            share_cents: prize_cents.checked_div(count).unwrap_or(0),
        };
        Ok(ControlStep::Commit { state, notice })
    }
}

/// Why an answer got no verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JudgeRefusal {
    /// The answer came to a shard that is not the user's.
    WrongShard,
    /// Refused with this verdict (not current, skipped, eliminated): nothing recorded.
    Refused(Verdict),
    /// The question has no key in the state (a bug: it was pushed with one).
    NoKey,
}

/// A judged answer: the verdict, and the key (hex) of its question to seal it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judged {
    /// The verdict.
    pub verdict: Verdict,
    /// The question's key, hex.
    pub key: String,
}

/// Whether a node must read the committed state before judging an answer to `question`:
/// its state has neither that question open nor a key for it (the controller's phase
/// message has not reached it yet).
pub fn needs_committed_state(state: &QuizState, question: u32) -> bool {
    let known = matches!(state.phase, QuizPhase::Asking { k, .. } if k == question);
    !known && state.keys.len() <= question as usize
}

/// Judges `user`'s answer `option` to `question`, received at `now_ms` by shard number
/// `shard_no` (of `shards`), against the show at `state`.
///
/// # Errors
///
/// See [`JudgeRefusal`].
#[allow(clippy::too_many_arguments)]
pub fn judge(
    definition: &QuizDefinition,
    shards: u32,
    state: &QuizState,
    shard_no: u32,
    shard: &mut AnswerShard,
    now_ms: u64,
    user: &str,
    question: u32,
    option: u8,
) -> Result<Judged, JudgeRefusal> {
    if shard_no >= shards || shard_of(user, shards) != shard_no {
        return Err(JudgeRefusal::WrongShard);
    }
    if !shard.viewers.contains_key(user) {
        if let Some(&cards) = definition.revive_cards.get(user) {
            shard.grant_revive_cards(user, cards);
        }
    }
    let open = open_question(definition, state);
    let verdict = shard.answer(open.as_ref(), now_ms, user, question, option);
    if !verdict.is_judged() {
        return Err(JudgeRefusal::Refused(verdict));
    }
    let key = state
        .keys
        .get(question as usize)
        .cloned()
        .ok_or(JudgeRefusal::NoKey)?;
    Ok(Judged { verdict, key })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quiz::Question;

    fn definition(questions: usize) -> QuizDefinition {
        QuizDefinition {
            quiz_id: "q".into(),
            room_id: "r".into(),
            start_ms: 1_000,
            prize_cents: 1_000,
            questions: (0..questions)
                .map(|i| Question {
                    text: format!("question {i}"),
                    options: vec!["a".into(), "b".into(), "c".into()],
                    correct: (i % 3) as u8,
                })
                .collect(),
            window_ms: 100,
            revive_cards: [("carol".to_string(), 1)].into_iter().collect(),
        }
    }

    fn commit(step: ControlStep) -> (QuizState, Notice) {
        match step {
            ControlStep::Commit { state, notice } => (state, notice),
            other => panic!("expected a commit, got {other:?}"),
        }
    }

    /// The invariants of a committed state.
    fn check(definition: &QuizDefinition, before: &QuizState, after: &QuizState) {
        assert_eq!(
            after.revision,
            before.revision + 1,
            "one revision per commit"
        );
        let pushed = match after.phase {
            QuizPhase::Waiting => 0,
            QuizPhase::Asking { k, .. } | QuizPhase::Announced { k } => k as usize + 1,
            QuizPhase::Finished => definition.questions.len(),
        };
        assert_eq!(after.keys.len(), pushed, "one key per pushed question");
        for question in after.counts.keys() {
            let announced = match after.phase {
                QuizPhase::Asking { k, .. } => *question < k,
                QuizPhase::Announced { k } => *question <= k,
                QuizPhase::Finished => true,
                QuizPhase::Waiting => false,
            };
            assert!(announced, "counts only for announced questions");
        }
        if let Some(results) = &after.results {
            let paid: u64 = results.values().sum();
            assert!(paid == definition.prize_cents || results.is_empty());
            if let Some(earlier) = &before.results {
                assert_eq!(earlier, results, "results never change");
            }
        }
    }

    /// A whole show: three questions, two shards, the controller's commands asserted
    /// and the invariants checked after every commit.
    #[test]
    fn a_show_runs_push_announce_finish_with_its_invariants() {
        let definition = definition(3);
        let mut control = QuizControl::new(definition.clone(), QuizState::default());
        assert!(matches!(
            control.push(999, "k0".into()),
            Err(QuizError::Phase(_))
        ));
        assert!(matches!(control.announce(1_000), Err(QuizError::Phase(_))));
        assert!(matches!(control.finish(), Err(QuizError::Phase(_))));
        let mut shards = [AnswerShard::default(), AnswerShard::default()];
        let users = ["alice", "bob", "carol"];
        let mut now = 1_000;
        for k in 0..3u32 {
            let before = control.state().clone();
            let (state, notice) = commit(control.push(now, format!("key{k}")).expect("push"));
            check(&definition, &before, &state);
            assert!(matches!(notice, Notice::Question { index, questions: 3, .. } if index == k));
            control = QuizControl::new(definition.clone(), state);
            // alice always right, bob wrong at 1, carol wrong at 0 (revived) and at 2.
            for user in users {
                let right = definition.questions[k as usize].correct;
                let option = match (user, k) {
                    ("bob", 1) | ("carol", 0) | ("carol", 2) => (right + 1) % 3,
                    _ => right,
                };
                let shard_no = shard_of(user, 2);
                let judged = judge(
                    &definition,
                    2,
                    control.state(),
                    shard_no,
                    &mut shards[shard_no as usize],
                    now + 10,
                    user,
                    k,
                    option,
                );
                match judged {
                    Ok(j) => assert_eq!(j.key, format!("key{k}")),
                    Err(JudgeRefusal::Refused(Verdict::Eliminated)) => assert_eq!(user, "bob"),
                    Err(other) => panic!("{user} at {k}: {other:?}"),
                }
            }
            assert!(matches!(
                control.announce(now + 50),
                Err(QuizError::Phase(_))
            ));
            now += 100;
            let gather = control.announce(now).expect("announce");
            assert_eq!(
                gather,
                ControlStep::Gather(Gather::Close {
                    question: k,
                    options: 3
                })
            );
            let parts: Vec<Vec<u64>> = shards.iter_mut().map(|s| s.close(k, 3)).collect();
            let before = control.state().clone();
            let (state, notice) = commit(control.counts(&parts).expect("counts"));
            check(&definition, &before, &state);
            let Notice::Announce {
                question,
                key,
                counts,
                last,
                ..
            } = notice
            else {
                panic!("expected an announcement");
            };
            assert_eq!((question, last), (k, k == 2));
            assert_eq!(key, format!("key{k}"));
            assert_eq!(counts.iter().sum::<u64>(), if k == 2 { 2 } else { 3 });
            control = QuizControl::new(definition.clone(), state);
        }
        assert!(matches!(
            control.push(now, "k3".into()),
            Err(QuizError::Phase(_))
        ));
        let gather = control.finish().expect("finish");
        assert_eq!(
            gather,
            ControlStep::Gather(Gather::Survivors { questions: 3 })
        );
        let mut winners = Vec::new();
        for shard in &shards {
            winners.extend(shard.survivors(3));
        }
        let before = control.state().clone();
        let (state, notice) = commit(control.survivors(&winners).expect("survivors"));
        check(&definition, &before, &state);
        assert_eq!(
            notice,
            Notice::Finished {
                winners: 1,
                prize_cents: 1_000,
                share_cents: 1_000
            }
        );
        assert_eq!(
            state.results.as_ref().and_then(|r| r.get("alice")),
            Some(&1_000)
        );
        let mut control = QuizControl::new(definition, state);
        assert_eq!(control.finish(), Ok(ControlStep::Done));
    }

    #[test]
    fn counts_or_survivors_without_an_action_waiting_are_refused() {
        let mut control = QuizControl::new(definition(1), QuizState::default());
        assert!(control.counts(&[vec![1, 2, 3]]).is_err());
        assert!(control.survivors(&["a".into()]).is_err());
    }

    #[test]
    fn counts_from_several_shards_add_up_and_ignore_extra_options() {
        let definition = definition(1);
        let mut control = QuizControl::new(definition.clone(), QuizState::default());
        let (state, _) = commit(control.push(1_000, "k".into()).expect("push"));
        let mut control = QuizControl::new(definition, state);
        control.announce(2_000).expect("announce");
        let (state, _) = commit(
            control
                .counts(&[vec![1, 0, 2], vec![0, 5, 1, 99], vec![u64::MAX, 0, 0]])
                .expect("counts"),
        );
        assert_eq!(state.counts[&0], vec![u64::MAX, 5, 3]);
        assert_eq!(state.phase, QuizPhase::Finished);
    }

    #[test]
    fn judging_checks_the_shard_gives_revive_cards_once_and_names_the_key() {
        let definition = definition(2);
        let mut control = QuizControl::new(definition.clone(), QuizState::default());
        let (state, _) = commit(control.push(1_000, "k0".into()).expect("push"));
        let carol = shard_of("carol", 4);
        let other = (carol + 1) % 4;
        let mut shard = AnswerShard::default();
        let wrong = (definition.questions[0].correct + 1) % 3;
        assert_eq!(
            judge(
                &definition,
                4,
                &state,
                other,
                &mut shard,
                1_001,
                "carol",
                0,
                wrong
            ),
            Err(JudgeRefusal::WrongShard)
        );
        let judged = judge(
            &definition,
            4,
            &state,
            carol,
            &mut shard,
            1_001,
            "carol",
            0,
            wrong,
        )
        .expect("judged");
        assert_eq!(judged.verdict, Verdict::Revived);
        assert_eq!(judged.key, "k0");
        // A repeat gets the same verdict; the card is not given again.
        let again = judge(
            &definition,
            4,
            &state,
            carol,
            &mut shard,
            1_002,
            "carol",
            0,
            0,
        )
        .expect("judged");
        assert_eq!(again.verdict, Verdict::Revived);
        assert_eq!(shard.viewers["carol"].revive_cards, 0);
        // Late, and an answer to a question not open.
        let dave = shard_of("dave", 4);
        let mut shard = AnswerShard::default();
        let late = judge(
            &definition,
            4,
            &state,
            dave,
            &mut shard,
            1_100,
            "dave",
            0,
            0,
        )
        .expect("judged");
        assert_eq!(late.verdict, Verdict::Late);
        assert_eq!(
            judge(
                &definition,
                4,
                &state,
                dave,
                &mut shard,
                1_001,
                "dave",
                1,
                0
            ),
            Err(JudgeRefusal::Refused(Verdict::NotCurrent))
        );
    }

    #[test]
    fn a_node_reads_the_committed_state_only_for_a_question_it_does_not_know() {
        let mut state = QuizState::default();
        assert!(needs_committed_state(&state, 0));
        state.phase = QuizPhase::Asking {
            k: 0,
            deadline_ms: 5,
        };
        state.keys.push("k0".into());
        assert!(!needs_committed_state(&state, 0));
        assert!(needs_committed_state(&state, 1));
        state.phase = QuizPhase::Announced { k: 0 };
        assert!(!needs_committed_state(&state, 0));
    }
}
