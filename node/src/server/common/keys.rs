//! Ring keys and member keys.
//!
//! Everything placed on the ring, and every definition in the cluster's metadata, has
//! one [`ActorKey`]: its text form (`room/<id>`, `rain/<id>`, `quiz/<id>`,
//! `quiz/<id>/state`, `quiz/<id>/shard/<n>`, `user/<id>`, `vm/<id>`, `group/<id>`) is the ring's hash input and the metadata's
//! map key, and [`ActorKey::parse`] reads it back. No other code formats or splits keys.

use chorus_cluster::metadata::NodeId;

/// What a ring or metadata key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorKey<'a> {
    /// A room.
    Room(&'a str),
    /// A red-packet rain (its pool).
    Rain(&'a str),
    /// A quiz show (its controller and definition).
    Quiz(&'a str),
    /// A quiz show's committed state (a definition key, not placed).
    QuizState(&'a str),
    /// One of a quiz show's answer shards.
    QuizShard(&'a str, u32),
    /// A user (its inbox: the user actor).
    User(&'a str),
    /// A voice message (its upload and audio).
    Message(&'a str),
    /// A group conversation (a definition in the metadata: its members).
    Group(&'a str),
}

impl<'a> ActorKey<'a> {
    /// Reads a key's text form; `None` for text that is no key.
    pub fn parse(key: &'a str) -> Option<ActorKey<'a>> {
        if let Some(room_id) = key.strip_prefix("room/") {
            return Some(ActorKey::Room(room_id));
        }
        if let Some(rain_id) = key.strip_prefix("rain/") {
            return Some(ActorKey::Rain(rain_id));
        }
        if let Some(user) = key.strip_prefix("user/") {
            return Some(ActorKey::User(user));
        }
        if let Some(message_id) = key.strip_prefix("vm/") {
            return Some(ActorKey::Message(message_id));
        }
        if let Some(group_id) = key.strip_prefix("group/") {
            return Some(ActorKey::Group(group_id));
        }
        let rest = key.strip_prefix("quiz/")?;
        if let Some(quiz_id) = rest.strip_suffix("/state") {
            return Some(ActorKey::QuizState(quiz_id));
        }
        if let Some((quiz_id, shard)) = rest.rsplit_once("/shard/") {
            return shard.parse().ok().map(|n| ActorKey::QuizShard(quiz_id, n));
        }
        Some(ActorKey::Quiz(rest))
    }

    /// The room it names, if it names one.
    pub fn room(self) -> Option<&'a str> {
        match self {
            ActorKey::Room(room_id) => Some(room_id),
            _ => None,
        }
    }

    /// The rain it names, if it names one.
    pub fn rain(self) -> Option<&'a str> {
        match self {
            ActorKey::Rain(rain_id) => Some(rain_id),
            _ => None,
        }
    }
}

impl std::fmt::Display for ActorKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ActorKey::Room(id) => write!(f, "room/{id}"),
            ActorKey::Rain(id) => write!(f, "rain/{id}"),
            ActorKey::Quiz(id) => write!(f, "quiz/{id}"),
            ActorKey::QuizState(id) => write!(f, "quiz/{id}/state"),
            ActorKey::QuizShard(id, shard) => write!(f, "quiz/{id}/shard/{shard}"),
            ActorKey::User(id) => write!(f, "user/{id}"),
            ActorKey::Message(id) => write!(f, "vm/{id}"),
            ActorKey::Group(id) => write!(f, "group/{id}"),
        }
    }
}

/// The ring key of a user (its user actor).
pub fn user_key(user: &str) -> String {
    ActorKey::User(user).to_string()
}

/// The metadata key of a group conversation.
pub fn group_key(group_id: &str) -> String {
    ActorKey::Group(group_id).to_string()
}

/// The ring key of a voice message.
pub fn message_key(message_id: &str) -> String {
    ActorKey::Message(message_id).to_string()
}

/// Bits of a member key that hold the session number; the node id sits above them, so
/// keys are unique across the cluster.
pub const MEMBER_KEY_NODE_SHIFT: u32 = 40;

/// A cluster-wide member key for session `session_key` on node `node`.
pub fn member_key(node: NodeId, session_key: u64) -> u64 {
    (node << MEMBER_KEY_NODE_SHIFT) | (session_key & ((1 << MEMBER_KEY_NODE_SHIFT) - 1))
}

/// The ring key of a room.
pub fn room_key(room_id: &str) -> String {
    ActorKey::Room(room_id).to_string()
}

/// The ring and definition key of a rain.
pub fn rain_key(rain_id: &str) -> String {
    ActorKey::Rain(rain_id).to_string()
}

/// The ring and definition key of a quiz show.
pub fn quiz_key(quiz_id: &str) -> String {
    ActorKey::Quiz(quiz_id).to_string()
}

/// The definition key of a quiz show's state (phase, keys, counts, payout).
pub fn quiz_state_key(quiz_id: &str) -> String {
    ActorKey::QuizState(quiz_id).to_string()
}

/// The ring key of one of a quiz show's answer shards.
pub fn quiz_shard_key(quiz_id: &str, shard: u32) -> String {
    ActorKey::QuizShard(quiz_id, shard).to_string()
}

/// Compares without an early exit, so the time taken does not reveal how much matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_reads_back_as_itself() {
        let keys = [
            ActorKey::Room("r-1"),
            ActorKey::Rain("rain-7"),
            ActorKey::Quiz("q-2"),
            ActorKey::QuizState("q-2"),
            ActorKey::QuizShard("q-2", 15),
            ActorKey::User("alice"),
            ActorKey::Message("vm-1"),
            ActorKey::Group("g-1"),
        ];
        for key in keys {
            assert_eq!(ActorKey::parse(&key.to_string()), Some(key));
        }
        assert_eq!(room_key("r-1"), "room/r-1");
        assert_eq!(quiz_shard_key("q", 3), "quiz/q/shard/3");
        assert_eq!(ActorKey::parse("nothing/x"), None);
        assert_eq!(ActorKey::parse("quiz/q/shard/x"), None);
        assert_eq!(
            ActorKey::parse("room/r-1").and_then(ActorKey::room),
            Some("r-1")
        );
        assert_eq!(ActorKey::parse("rain/r-1").and_then(ActorKey::room), None);
    }
}
