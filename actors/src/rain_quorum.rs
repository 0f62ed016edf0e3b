//! The red-packet pool's quorum (SPEC Q): a grant is answered only once a majority of the
//! cluster's members hold it, so that no acknowledged cent is lost when a node dies.
//!
//! Sans-IO, in the style of openraft's `Engine`: the pool's shell feeds inputs in
//! ([`PoolQuorum::granted`], [`PoolQuorum::acked`], [`PoolQuorum::flushed`],
//! [`PoolQuorum::members`], [`PoolQuorum::tick`]) and carries out the [`QuorumCommand`]s it
//! gets back: answer a grab, time one out, flush the own copy. The shell owns the pool
//! ([`crate::rain::RainPool`]), the copies on disk and the replication streams; this core
//! owns the rules:
//!
//! - A member's copy counts for what it has acknowledged at this pool's epoch.
//! - With other members, the own copy counts at once (theirs are the guarantee); alone, the
//!   own copy is the whole majority and counts only once a flush has confirmed it.
//! - Grant `n` (0-based) is committed once a majority holds at least `n + 1` grants; the
//!   refund once a majority holds it.
//! - A pending grab is answered when its grant is committed, or refused at its deadline;
//!   never both, never twice. Grants are answered in order.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::rain::RainState;

/// A node id (as in the cluster's metadata).
pub type NodeId = u64;

/// What a node holds of a rain after a write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// Grants held.
    pub grants: usize,
    /// Whether the refund is held.
    pub refunded: bool,
}

impl Held {
    /// What `state` holds.
    pub fn of(state: &RainState) -> Held {
        Held {
            grants: state.grants.len(),
            refunded: state.refunded_cents.is_some(),
        }
    }
}

/// What the shell does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuorumCommand<R> {
    /// The grant of this grab is on a majority: answer it.
    Answer(R),
    /// The grant did not reach a majority by its deadline: refuse the grab (the client
    /// retries with the same request id, which finds its grant).
    TimedOut(R),
    /// Flush the own copy, which holds this much (alone: it is the majority).
    FlushOwn(Held),
}

#[derive(Debug)]
struct PendingGrab<R> {
    /// Grants that must be on a majority (the grant's index + 1).
    needed: usize,
    deadline_ms: u64,
    reply: R,
}

/// The pool's quorum: what each member holds, and the grabs waiting for a majority.
/// `R` is the shell's handle for answering one grab.
#[derive(Debug)]
pub struct PoolQuorum<R> {
    self_id: NodeId,
    /// The cluster's members (this node included).
    members: BTreeSet<NodeId>,
    /// What each other member holds at this epoch.
    acks: BTreeMap<NodeId, Held>,
    /// What the own copy holds now.
    own: Held,
    /// What a flush has confirmed of the own copy.
    own_flushed: Held,
    /// A flush of the own copy is under way.
    flush_in_flight: bool,
    pending: VecDeque<PendingGrab<R>>,
}

impl<R> PoolQuorum<R> {
    /// The quorum of a pool on node `self_id`, whose own copy holds `own` (flushed).
    pub fn new(self_id: NodeId, members: impl IntoIterator<Item = NodeId>, own: Held) -> Self {
        let mut quorum = PoolQuorum {
            self_id,
            members: BTreeSet::new(),
            acks: BTreeMap::new(),
            own,
            own_flushed: own,
            flush_in_flight: false,
            pending: VecDeque::new(),
        };
        quorum.members(members);
        quorum
    }

    /// The members changed: copies of nodes no longer members stop counting.
    pub fn members(&mut self, members: impl IntoIterator<Item = NodeId>) {
        self.members = members.into_iter().collect();
        self.members.insert(self.self_id);
        self.acks.retain(|id, _| self.members.contains(id));
    }

    /// The other members (the nodes to replicate to).
    pub fn peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.members
            .iter()
            .copied()
            .filter(|id| *id != self.self_id)
    }

    /// Members that must hold a change for it to be committed.
    pub fn majority(&self) -> usize {
        self.members.len() / 2 + 1
    }

    fn alone(&self) -> bool {
        self.members.len() == 1
    }

    /// The own copy now holds `own` (a grant or the refund was written to it).
    pub fn written(&mut self, own: Held) -> Vec<QuorumCommand<R>> {
        self.own = own;
        self.flush_if_needed()
    }

    /// A grab was granted as grant number `index` (0-based); it waits for a majority
    /// until `deadline_ms`.
    pub fn granted(&mut self, index: usize, deadline_ms: u64, reply: R) {
        self.pending.push_back(PendingGrab {
            needed: index + 1,
            deadline_ms,
            reply,
        });
    }

    /// Member `peer` holds `held` at this epoch (acknowledgements only grow).
    pub fn acked(&mut self, peer: NodeId, held: Held) {
        if peer == self.self_id || !self.members.contains(&peer) {
            return;
        }
        let entry = self.acks.entry(peer).or_default();
        entry.grants = entry.grants.max(held.grants);
        entry.refunded |= held.refunded;
    }

    /// A flush of the own copy ended: `Some(held)` if it confirmed `held` on disk.
    pub fn flushed(&mut self, confirmed: Option<Held>) -> Vec<QuorumCommand<R>> {
        self.flush_in_flight = false;
        if let Some(held) = confirmed {
            self.own_flushed.grants = self.own_flushed.grants.max(held.grants);
            self.own_flushed.refunded |= held.refunded;
        }
        Vec::new()
    }

    /// What a majority holds: (grants, refund).
    pub fn committed(&self) -> (usize, bool) {
        // Alone, the own copy is the majority: it counts once it is on disk. With other
        // members, their copies are the guarantee and the own copy counts at once.
        let own = if self.alone() {
            self.own_flushed
        } else {
            self.own
        };
        let mut held: Vec<Held> = self
            .peers()
            .filter_map(|id| self.acks.get(&id).copied())
            .collect();
        held.push(own);
        let majority = self.majority();
        if held.len() < majority {
            return (0, false);
        }
        let mut grants: Vec<usize> = held.iter().map(|h| h.grants).collect();
        grants.sort_unstable_by(|a, b| b.cmp(a));
        let refunds = held.iter().filter(|h| h.refunded).count();
        (grants[majority - 1], refunds >= majority)
    }

    /// Grabs waiting for a majority.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Answers what is committed and times out what is past its deadline (after a batch
    /// of inputs, and on every tick); asks for a flush of the own copy when alone.
    pub fn tick(&mut self, now_ms: u64) -> Vec<QuorumCommand<R>> {
        let mut commands = self.flush_if_needed();
        let (grants, _) = self.committed();
        let mut kept = VecDeque::with_capacity(self.pending.len());
        for pending in self.pending.drain(..) {
            if pending.needed <= grants {
                commands.push(QuorumCommand::Answer(pending.reply));
            } else if now_ms >= pending.deadline_ms {
                commands.push(QuorumCommand::TimedOut(pending.reply));
            } else {
                kept.push_back(pending);
            }
        }
        self.pending = kept;
        commands
    }

    /// Every waiting grab, for refusing them when the pool stops.
    pub fn drain(&mut self) -> Vec<R> {
        self.pending.drain(..).map(|p| p.reply).collect()
    }

    fn flush_if_needed(&mut self) -> Vec<QuorumCommand<R>> {
        if self.alone() && !self.flush_in_flight && self.own != self.own_flushed {
            self.flush_in_flight = true;
            vec![QuorumCommand::FlushOwn(self.own)]
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rain::{RainDefinition, RainPool};

    fn held(grants: usize) -> Held {
        Held {
            grants,
            refunded: false,
        }
    }

    fn answered(commands: &[QuorumCommand<u32>]) -> Vec<u32> {
        commands
            .iter()
            .filter_map(|c| match c {
                QuorumCommand::Answer(r) => Some(*r),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_grant_is_answered_once_a_majority_of_three_holds_it() {
        let mut q = PoolQuorum::new(1, [1, 2, 3], held(0));
        q.written(held(1));
        q.granted(0, 1_000, 7);
        // Only the own copy: 1 of 3.
        assert!(q.tick(10).is_empty());
        q.acked(2, held(1));
        assert_eq!(q.tick(20), vec![QuorumCommand::Answer(7)]);
        assert_eq!(q.pending(), 0);
    }

    #[test]
    fn a_grant_not_on_a_majority_by_its_deadline_is_refused_once() {
        let mut q = PoolQuorum::new(1, [1, 2, 3], held(0));
        q.written(held(1));
        q.granted(0, 100, 7);
        assert!(q.tick(99).is_empty());
        assert_eq!(q.tick(100), vec![QuorumCommand::TimedOut(7)]);
        // A late acknowledgement answers nothing again.
        q.acked(2, held(1));
        assert!(q.tick(101).is_empty());
    }

    #[test]
    fn alone_the_own_copy_counts_only_once_flushed() {
        let mut q = PoolQuorum::new(1, [1], held(0));
        assert_eq!(q.written(held(2)), vec![QuorumCommand::FlushOwn(held(2))]);
        q.granted(0, 1_000, 1);
        q.granted(1, 1_000, 2);
        // One flush at a time.
        assert!(q.tick(1).is_empty());
        assert_eq!(q.committed(), (0, false));
        q.flushed(Some(held(1)));
        assert_eq!(answered(&q.tick(2)), vec![1]);
        // The rest is flushed next.
        q.written(held(2));
        q.flushed(Some(held(2)));
        assert_eq!(answered(&q.tick(3)), vec![2]);
    }

    #[test]
    fn a_failed_flush_is_tried_again() {
        let mut q = PoolQuorum::<u32>::new(1, [1], held(0));
        assert_eq!(q.written(held(1)).len(), 1);
        q.flushed(None);
        assert_eq!(q.tick(1), vec![QuorumCommand::FlushOwn(held(1))]);
    }

    #[test]
    fn copies_of_nodes_that_left_do_not_count() {
        let mut q = PoolQuorum::new(1, [1, 2, 3], held(1));
        q.acked(2, held(1));
        assert_eq!(q.committed().0, 1);
        q.members([1, 3, 4]);
        assert_eq!(q.committed().0, 0);
        // A non-member's acknowledgement is ignored.
        q.acked(2, held(1));
        q.acked(9, held(1));
        assert_eq!(q.committed().0, 0);
        q.acked(4, held(1));
        assert_eq!(q.committed().0, 1);
        q.granted(0, 10, 5);
        assert_eq!(answered(&q.tick(1)), vec![5]);
    }

    #[test]
    fn the_refund_needs_a_majority_too() {
        let mut q = PoolQuorum::<u32>::new(1, [1, 2, 3], held(0));
        q.written(Held {
            grants: 0,
            refunded: true,
        });
        assert_eq!(q.committed(), (0, false));
        q.acked(
            3,
            Held {
                grants: 0,
                refunded: true,
            },
        );
        assert_eq!(q.committed(), (0, true));
    }

    /// Every order of acknowledgements from four peers over a pool of five members:
    /// no grab is answered before a majority holds its grant, every grab is answered or
    /// refused exactly once, and the money in the pool adds up at every step.
    #[test]
    fn invariants_hold_in_every_order_of_acknowledgements() {
        let definition = RainDefinition {
            rain_id: "r".into(),
            room_id: "room".into(),
            creator: "host".into(),
            total_cents: 1_000,
            count: 6,
            start_ms: 0,
            duration_ms: 10_000,
            cap_per_user: 1,
            seed: 9,
        };
        let events: Vec<(NodeId, usize)> = vec![(2, 3), (3, 3), (4, 6), (5, 6)];
        let mut orders = vec![vec![]];
        for _ in 0..events.len() {
            let mut next = Vec::new();
            for order in &orders {
                for i in 0..events.len() {
                    if !order.contains(&i) {
                        let mut o = order.clone();
                        o.push(i);
                        next.push(o);
                    }
                }
            }
            orders = next;
        }
        assert_eq!(orders.len(), 24);
        for order in orders {
            let mut pool = RainPool::create(definition.clone(), 1_000_000, 0).expect("pool");
            let mut q = PoolQuorum::new(1, [1, 2, 3, 4, 5], held(0));
            for user in 0..6u32 {
                let before = pool.state().grants.len();
                pool.grab(1, &format!("u{user}"), &format!("q{user}"));
                let state = pool.state();
                let granted: u64 = state.grants.iter().map(|g| g.amount).sum();
                let left: u64 = state.packets[state.grants.len()..].iter().sum();
                assert_eq!(granted + left, definition.total_cents, "money adds up");
                assert_eq!(state.grants.len(), before + 1);
                q.written(Held::of(state));
                q.granted(before, 100, user);
            }
            let mut answers = BTreeMap::new();
            for (step, &i) in order.iter().enumerate() {
                let (peer, grants) = events[i];
                q.acked(peer, held(grants));
                let (committed, _) = q.committed();
                for command in q.tick(step as u64) {
                    match command {
                        QuorumCommand::Answer(user) => {
                            assert!((user as usize) < committed, "answered before a majority");
                            assert!(answers.insert(user, "answer").is_none(), "answered twice");
                        }
                        QuorumCommand::TimedOut(user) => {
                            assert!(answers.insert(user, "timeout").is_none(), "answered twice");
                        }
                        QuorumCommand::FlushOwn(_) => panic!("not alone"),
                    }
                }
            }
            // All four peers hold all six by the end: everything answered, none refused.
            assert_eq!(answers.len(), 6);
            assert!(answers.values().all(|a| *a == "answer"));
        }
    }
}
