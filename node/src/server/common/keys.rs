//! Ring keys and member keys.

use chorus_cluster::metadata::NodeId;

/// Bits of a member key that hold the session number; the node id sits above them, so
/// keys are unique across the cluster.
pub const MEMBER_KEY_NODE_SHIFT: u32 = 40;

/// A cluster-wide member key for session `session_key` on node `node`.
pub fn member_key(node: NodeId, session_key: u64) -> u64 {
    (node << MEMBER_KEY_NODE_SHIFT) | (session_key & ((1 << MEMBER_KEY_NODE_SHIFT) - 1))
}

/// The ring key of a room.
pub fn room_key(room_id: &str) -> String {
    format!("room/{room_id}")
}

/// Compares without an early exit, so the time taken does not reveal how much matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
