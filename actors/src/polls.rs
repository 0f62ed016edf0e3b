//! A room's polls (SPEC R8), sans-IO: create, vote (once per user, changeable while
//! open), close; tallies kept incrementally; pushes at a bounded rate.
//!
//! Polls are durable: their definitions and every user's vote ride in the room's
//! [`crate::room::RoomDurable`]. Votes are replicated as deltas ([`VoteRecord`]) so a
//! poll with many voters does not send every vote again for each new one; the room
//! acknowledges a vote only once its delta (or a full state containing it) is on another
//! node.

use std::collections::BTreeMap;

use chorus_protocol::{PollInfo, PollState, RoomId, UserId};
use serde::{Deserialize, Serialize};

/// Limits and timing of polls. Every field has its unit last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PollConfig {
    /// Polls one room may hold, open and closed. Default 20.
    pub polls_max: usize,
    /// Polls open at once. Default 3.
    pub open_polls_max: usize,
    /// Longest question, in characters. Default 200.
    pub question_chars_max: usize,
    /// Longest option, in characters. Default 80.
    pub option_chars_max: usize,
    /// Least time between two tally pushes of one poll. Default 1,000.
    pub tally_interval_ms: u64,
    /// Longest a vote waits for others to be replicated with it (group commit).
    /// Default 20.
    pub vote_commit_ms: u64,
}

impl Default for PollConfig {
    fn default() -> Self {
        PollConfig {
            polls_max: 20,
            open_polls_max: 3,
            question_chars_max: 200,
            option_chars_max: 80,
            tally_interval_ms: 1_000,
            vote_commit_ms: 20,
        }
    }
}

/// Fewest and most options of a poll.
pub const POLL_OPTIONS: std::ops::RangeInclusive<usize> = 2..=10;

/// One poll, with every vote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Poll {
    /// Numbered from 1 in the room.
    pub poll_id: u64,
    /// The question.
    pub question: String,
    /// The answers.
    pub options: Vec<String>,
    /// Who created it.
    pub by: UserId,
    /// When, ms since the epoch.
    pub created_at_ms: u64,
    /// When it closed.
    pub closed_at_ms: Option<u64>,
    /// Each voter's option.
    pub votes: BTreeMap<UserId, u8>,
    /// Votes per option (kept in step with `votes`).
    pub tallies: Vec<u64>,
}

impl Poll {
    /// Whether it takes votes.
    pub fn is_open(&self) -> bool {
        self.closed_at_ms.is_none()
    }

    /// The poll as members see it.
    pub fn info(&self, room_id: &RoomId) -> PollInfo {
        PollInfo {
            room_id: room_id.clone(),
            poll_id: self.poll_id,
            question: self.question.clone(),
            options: self.options.clone(),
            tallies: self.tallies.clone(),
            voters: self.votes.len() as u64,
            state: if self.is_open() {
                PollState::Open
            } else {
                PollState::Closed
            },
            by: self.by.clone(),
            created_at_ms: self.created_at_ms,
            closed_at_ms: self.closed_at_ms,
        }
    }

    /// Records `user`'s vote for `option` (a valid index); whether anything changed.
    fn vote(&mut self, user: &str, option: u8) -> bool {
        match self.votes.insert(user.to_string(), option) {
            Some(previous) if previous == option => false,
            Some(previous) => {
                self.tallies[usize::from(previous)] -= 1;
                self.tallies[usize::from(option)] += 1;
                true
            }
            None => {
                self.tallies[usize::from(option)] += 1;
                true
            }
        }
    }
}

/// One vote as replicated: applied in order, it brings a copy of the polls up to date.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoteRecord {
    /// The poll.
    pub poll_id: u64,
    /// The voter.
    pub user: UserId,
    /// The option chosen.
    pub option: u8,
}

/// Why a poll request was refused (mapped to room errors by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollRefusal {
    /// An argument is out of range.
    Invalid(String),
    /// No such poll.
    NoSuchPoll(u64),
    /// The poll is closed.
    Closed(u64),
    /// Too many polls.
    Full(String),
}

/// A room's polls: the durable part (serialized in the room's durable state).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Polls {
    /// By id, at most `polls_max`.
    pub polls: BTreeMap<u64, Poll>,
    /// The latest poll id given.
    pub last_poll_id: u64,
}

/// Trimmed text of 1 to `max` characters without control characters.
fn text(what: &str, value: &str, max: usize) -> Result<String, PollRefusal> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(PollRefusal::Invalid(format!("empty {what}")));
    }
    if trimmed.chars().count() > max {
        return Err(PollRefusal::Invalid(format!(
            "{what} longer than {max} characters"
        )));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(PollRefusal::Invalid(format!(
            "{what} has control characters"
        )));
    }
    Ok(trimmed.to_string())
}

impl Polls {
    /// Opens a poll (the caller checked the creator may).
    pub fn create(
        &mut self,
        config: &PollConfig,
        now_ms: u64,
        by: &str,
        question: &str,
        options: &[String],
    ) -> Result<&Poll, PollRefusal> {
        let question = text("question", question, config.question_chars_max)?;
        if !POLL_OPTIONS.contains(&options.len()) {
            return Err(PollRefusal::Invalid(format!(
                "a poll has {} to {} options, not {}",
                POLL_OPTIONS.start(),
                POLL_OPTIONS.end(),
                options.len()
            )));
        }
        let mut cleaned = Vec::with_capacity(options.len());
        for option in options {
            let option = text("option", option, config.option_chars_max)?;
            if cleaned.contains(&option) {
                return Err(PollRefusal::Invalid(format!(
                    "option {option:?} given twice"
                )));
            }
            cleaned.push(option);
        }
        if self.polls.len() >= config.polls_max {
            return Err(PollRefusal::Full(format!(
                "the room has {} polls, the most it may",
                config.polls_max
            )));
        }
        if self.polls.values().filter(|p| p.is_open()).count() >= config.open_polls_max {
            return Err(PollRefusal::Full(format!(
                "{} polls are open: close one first",
                config.open_polls_max
            )));
        }
        self.last_poll_id += 1;
        let poll = Poll {
            poll_id: self.last_poll_id,
            question,
            tallies: vec![0; cleaned.len()],
            options: cleaned,
            by: by.to_string(),
            created_at_ms: now_ms,
            closed_at_ms: None,
            votes: BTreeMap::new(),
        };
        Ok(self.polls.entry(poll.poll_id).or_insert(poll))
    }

    /// Records a vote (the caller checked the voter is in the room); `Ok(true)` if it
    /// changed anything.
    pub fn vote(&mut self, user: &str, poll_id: u64, option: u32) -> Result<bool, PollRefusal> {
        let poll = self
            .polls
            .get_mut(&poll_id)
            .ok_or(PollRefusal::NoSuchPoll(poll_id))?;
        if !poll.is_open() {
            return Err(PollRefusal::Closed(poll_id));
        }
        let option = u8::try_from(option)
            .ok()
            .filter(|o| usize::from(*o) < poll.options.len())
            .ok_or_else(|| {
                PollRefusal::Invalid(format!(
                    "option {option} is not one of the poll's {} options (0-{})",
                    poll.options.len(),
                    poll.options.len() - 1
                ))
            })?;
        Ok(poll.vote(user, option))
    }

    /// Closes a poll; `Ok(false)` if it was closed already.
    pub fn close(&mut self, now_ms: u64, poll_id: u64) -> Result<bool, PollRefusal> {
        let poll = self
            .polls
            .get_mut(&poll_id)
            .ok_or(PollRefusal::NoSuchPoll(poll_id))?;
        if !poll.is_open() {
            return Ok(false);
        }
        poll.closed_at_ms = Some(now_ms);
        Ok(true)
    }

    /// Closes every open poll (the room ended); returns their ids.
    pub fn close_all(&mut self, now_ms: u64) -> Vec<u64> {
        let mut closed = Vec::new();
        for poll in self.polls.values_mut().filter(|p| p.is_open()) {
            poll.closed_at_ms = Some(now_ms);
            closed.push(poll.poll_id);
        }
        closed
    }

    /// Applies replicated votes, in order (on a copy held for another owner). Votes for
    /// unknown or closed polls are ignored (the full state that follows corrects them).
    pub fn apply(&mut self, votes: &[VoteRecord]) {
        for record in votes {
            if let Some(poll) = self.polls.get_mut(&record.poll_id) {
                if poll.is_open() && usize::from(record.option) < poll.options.len() {
                    poll.vote(&record.user, record.option);
                }
            }
        }
    }

    /// Every poll as members see it, oldest first.
    pub fn infos(&self, room_id: &RoomId) -> Vec<PollInfo> {
        self.polls.values().map(|p| p.info(room_id)).collect()
    }

    /// Checks that tallies agree with votes (for invariant checks).
    pub fn consistent(&self) -> bool {
        self.polls.values().all(|poll| {
            let mut counted = vec![0u64; poll.options.len()];
            for option in poll.votes.values() {
                match counted.get_mut(usize::from(*option)) {
                    Some(count) => *count += 1,
                    None => return false,
                }
            }
            counted == poll.tallies
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn votes_count_once_per_user_and_may_change_while_open() {
        let config = PollConfig::default();
        let mut polls = Polls::default();
        let id = polls
            .create(
                &config,
                0,
                "mod",
                " Tea or coffee? ",
                &options(&["tea", "coffee"]),
            )
            .expect("create")
            .poll_id;
        assert_eq!(polls.polls[&id].question, "Tea or coffee?");
        assert_eq!(polls.vote("ann", id, 0), Ok(true));
        assert_eq!(polls.vote("ann", id, 0), Ok(false), "the same vote again");
        assert_eq!(polls.vote("bob", id, 0), Ok(true));
        assert_eq!(polls.vote("ann", id, 1), Ok(true), "ann changes her mind");
        assert_eq!(polls.polls[&id].tallies, vec![1, 1]);
        assert!(polls.consistent());
        assert!(matches!(
            polls.vote("cy", id, 2),
            Err(PollRefusal::Invalid(_))
        ));
        assert_eq!(polls.vote("cy", 99, 0), Err(PollRefusal::NoSuchPoll(99)));
        assert_eq!(polls.close(5, id), Ok(true));
        assert_eq!(polls.close(6, id), Ok(false));
        assert_eq!(polls.vote("cy", id, 0), Err(PollRefusal::Closed(id)));
        let info = polls.polls[&id].info(&"r".to_string());
        assert_eq!(info.state, PollState::Closed);
        assert_eq!(info.voters, 2);
    }

    #[test]
    fn bad_polls_are_refused_and_counts_are_bounded() {
        let config = PollConfig {
            polls_max: 2,
            open_polls_max: 1,
            ..PollConfig::default()
        };
        let mut polls = Polls::default();
        for bad in [
            options(&["only one"]),
            options(&["a", "a"]),
            options(&["a", ""]),
            options(&["a"; 11]),
        ] {
            assert!(matches!(
                polls.create(&config, 0, "m", "q", &bad),
                Err(PollRefusal::Invalid(_))
            ));
        }
        assert!(polls
            .create(&config, 0, "m", "", &options(&["a", "b"]))
            .is_err());
        let first = polls
            .create(&config, 0, "m", "q1", &options(&["a", "b"]))
            .expect("first")
            .poll_id;
        assert!(matches!(
            polls.create(&config, 0, "m", "q2", &options(&["a", "b"])),
            Err(PollRefusal::Full(_))
        ));
        polls.close(1, first).expect("close");
        polls
            .create(&config, 2, "m", "q2", &options(&["a", "b"]))
            .expect("second");
        polls.close_all(3);
        assert!(matches!(
            polls.create(&config, 4, "m", "q3", &options(&["a", "b"])),
            Err(PollRefusal::Full(_))
        ));
    }

    #[test]
    fn replicated_votes_rebuild_the_same_tallies() {
        let config = PollConfig::default();
        let mut owner = Polls::default();
        let id = owner
            .create(&config, 0, "m", "q", &options(&["a", "b", "c"]))
            .expect("create")
            .poll_id;
        let mut replica = owner.clone();
        let mut log = Vec::new();
        for (user, option) in [("u1", 0u32), ("u2", 2), ("u1", 1), ("u3", 2)] {
            if owner.vote(user, id, option).expect("vote") {
                log.push(VoteRecord {
                    poll_id: id,
                    user: user.into(),
                    option: option as u8,
                });
            }
        }
        replica.apply(&log);
        assert_eq!(replica, owner);
    }
}
