//! Red-packet rain (SPEC Q7-Q8), sans-IO and deterministic: splitting the total into
//! packets, serving grabs, refunding the rest, and auditing that the money is exact.
//!
//! # Splitting
//!
//! [`split`] is the "double mean" rule: with `m` cents and `n` packets left, the next packet
//! gets a uniformly random amount in `1 ..= max(1, min(2·⌊m/n⌋ − 1, m − (n − 1)))`, and the
//! last packet gets what is left. Every packet is at least 1 cent, the mean of each draw is
//! about the mean of what is left (so early and late grabbers fare alike), and the sum is
//! the total exactly. The random numbers come from SplitMix64 seeded with the rain's seed,
//! so a rain's packets are a function of (total, count, seed): the split is stored with
//! the rain and can be recomputed to check it.
//!
//! # Grabs
//!
//! [`RainPool::grab`] hands out the packets in order. A grab names the user and a client
//! request id; the same (user, request id) always gets the same grant back (idempotent), so
//! a client that retries after a lost answer is not paid twice. A user gets at most
//! `cap_per_user` packets. The pool answers `not_started` before the start, `ended` after
//! the end (start + duration), `none_left` when every packet is granted, `cap_reached`, or
//! `throttled` when its token bucket (the server side of the throttle) is empty.
//!
//! # Exactness
//!
//! Every grant is a [`Grant`] record; the pool's state is the split plus the grants (and
//! the refund once ended). [`audit`] checks, from that state alone: the split sums to the
//! total and has no packet below 1 cent; each packet is granted at most once, and to the
//! amount the split gives it; no user has more than the cap; granted + refunded + unclaimed
//! = total.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::rate::TokenBucket;

/// Most packets one rain may have.
pub const RAIN_PACKETS_MAX: u32 = 1_000_000;
/// Largest total of one rain, in cents (ten million units of currency).
pub const RAIN_TOTAL_CENTS_MAX: u64 = 1_000_000_000;
/// Longest client request id, in bytes.
pub const REQUEST_ID_BYTES_MAX: usize = 64;

/// Why a rain cannot be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RainError {
    /// The numbers do not make a rain.
    #[error("invalid rain: {0}")]
    Invalid(String),
}

/// A rain as its operator created it (durable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RainDefinition {
    /// The rain's id.
    pub rain_id: String,
    /// The room it rains in.
    pub room_id: String,
    /// Who pays, and gets the rest back.
    pub creator: String,
    /// Cents in all.
    pub total_cents: u64,
    /// Packets.
    pub count: u32,
    /// When grabbing opens, ms since the epoch.
    pub start_ms: u64,
    /// How long it stays open, ms.
    pub duration_ms: u64,
    /// Packets one user may get. Default 3.
    pub cap_per_user: u32,
    /// Seed of the split.
    pub seed: u64,
}

impl RainDefinition {
    /// Checks the numbers.
    ///
    /// # Errors
    ///
    /// [`RainError::Invalid`] saying which rule a number breaks.
    pub fn validate(&self) -> Result<(), RainError> {
        let invalid = |why: String| Err(RainError::Invalid(why));
        if self.count == 0 || self.count > RAIN_PACKETS_MAX {
            return invalid(format!("count must be 1-{RAIN_PACKETS_MAX}"));
        }
        if self.total_cents > RAIN_TOTAL_CENTS_MAX {
            return invalid(format!(
                "total must be at most {RAIN_TOTAL_CENTS_MAX} cents"
            ));
        }
        if self.total_cents < u64::from(self.count) {
            return invalid(format!(
                "{} cents cannot make {} packets of at least 1 cent",
                self.total_cents, self.count
            ));
        }
        if self.duration_ms == 0 {
            return invalid("duration must be positive".into());
        }
        if self.cap_per_user == 0 {
            return invalid("cap per user must be at least 1".into());
        }
        Ok(())
    }

    /// When grabbing closes.
    pub fn end_ms(&self) -> u64 {
        self.start_ms.saturating_add(self.duration_ms)
    }
}

/// SplitMix64: a small, well-mixed, portable generator (the split must never change with
/// a library version).
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `1..=max` (max ≥ 1), without modulo bias.
    fn one_to(&mut self, max: u64) -> u64 {
        let zone = u64::MAX - (u64::MAX % max);
        loop {
            let x = self.next();
            if x < zone {
                return 1 + x % max;
            }
        }
    }
}

/// Splits `total_cents` into `count` packets by the double-mean rule (module docs).
///
/// # Errors
///
/// [`RainError::Invalid`] if `count` is 0 or `total_cents < count`.
pub fn split(total_cents: u64, count: u32, seed: u64) -> Result<Vec<u64>, RainError> {
    if count == 0 || total_cents < u64::from(count) {
        return Err(RainError::Invalid(format!(
            "{total_cents} cents cannot make {count} packets of at least 1 cent"
        )));
    }
    let mut rng = SplitMix64(seed);
    let mut left = total_cents;
    let mut packets = Vec::with_capacity(count as usize);
    for remaining in (2..=u64::from(count)).rev() {
        let double_mean = (left / remaining).saturating_mul(2).saturating_sub(1);
        let max = double_mean.min(left - (remaining - 1)).max(1);
        let amount = rng.one_to(max);
        packets.push(amount);
        left -= amount;
    }
    packets.push(left);
    Ok(packets)
}

/// One granted packet (the ledger's line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Index of the packet in the split.
    pub packet: u32,
    /// Who got it.
    pub user: String,
    /// The client's request id.
    pub request_id: String,
    /// Cents.
    pub amount: u64,
    /// When, ms since the epoch.
    pub at_ms: u64,
}

/// What a grab gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum GrabOutcome {
    /// A packet (or, for a repeated request id, the same packet again).
    Granted {
        /// Cents.
        amount: u64,
        /// Index of the packet.
        packet: u32,
    },
    /// Every packet is taken.
    NoneLeft,
    /// The user has `cap_per_user` packets.
    CapReached,
    /// Too many grabs at once: retry later.
    Throttled,
    /// Before the start.
    NotStarted,
    /// After the end.
    Ended,
}

/// The durable part of a pool: the definition, the split, the grants, the refund.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RainState {
    /// The rain.
    pub definition: RainDefinition,
    /// Packet amounts, in grant order.
    pub packets: Vec<u64>,
    /// Grants, in order (packet `i` is the `i`-th grant).
    pub grants: Vec<Grant>,
    /// Cents refunded to the creator at the end.
    pub refunded_cents: Option<u64>,
}

/// Grants that do not follow the held state (a replica behind or ahead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("grants from {from} do not follow the {held} held")]
pub struct GrantsOutOfStep {
    /// The index of the first grant sent.
    pub from: usize,
    /// Grants held.
    pub held: usize,
}

impl RainState {
    /// Applies grants replicated from the owner: `grants` are the owner's grants from
    /// index `from` on. Grants already held are skipped (a repeated delivery); a gap
    /// refuses the whole batch (the owner then sends its whole state).
    ///
    /// # Errors
    ///
    /// [`GrantsOutOfStep`] when `from` is beyond the grants held.
    pub fn apply_grants(&mut self, from: usize, grants: &[Grant]) -> Result<(), GrantsOutOfStep> {
        let held = self.grants.len();
        if from > held {
            return Err(GrantsOutOfStep { from, held });
        }
        let skip = held - from;
        self.grants.extend(grants.iter().skip(skip).cloned());
        Ok(())
    }
}

/// Serves one rain's grabs. See the module docs.
#[derive(Debug, Clone)]
pub struct RainPool {
    state: RainState,
    /// Grants not yet replicated start at this index.
    replicated: usize,
    /// (user, request id) → grant index.
    by_request: HashMap<(String, String), usize>,
    /// Packets per user.
    per_user: HashMap<String, u32>,
    bucket: TokenBucket,
}

impl RainPool {
    /// A new rain: validated and split.
    ///
    /// # Errors
    ///
    /// [`RainError::Invalid`].
    pub fn create(
        definition: RainDefinition,
        grabs_per_sec: u32,
        now_ms: u64,
    ) -> Result<Self, RainError> {
        definition.validate()?;
        let packets = split(definition.total_cents, definition.count, definition.seed)?;
        Ok(Self::restore(
            RainState {
                definition,
                packets,
                grants: Vec::new(),
                refunded_cents: None,
            },
            grabs_per_sec,
            now_ms,
        ))
    }

    /// Continues from a durable state (another owner's, or this node's before a restart).
    pub fn restore(state: RainState, grabs_per_sec: u32, now_ms: u64) -> Self {
        let mut by_request = HashMap::with_capacity(state.grants.len());
        let mut per_user: HashMap<String, u32> = HashMap::new();
        for (index, grant) in state.grants.iter().enumerate() {
            by_request.insert((grant.user.clone(), grant.request_id.clone()), index);
            *per_user.entry(grant.user.clone()).or_default() += 1;
        }
        let rate = grabs_per_sec.max(1);
        RainPool {
            replicated: state.grants.len(),
            state,
            by_request,
            per_user,
            bucket: TokenBucket::new(rate, rate, now_ms),
        }
    }

    /// A grab by `user` with the client's `request_id`. A grant is recorded in the state
    /// (the caller makes it durable before answering).
    pub fn grab(&mut self, now_ms: u64, user: &str, request_id: &str) -> GrabOutcome {
        // A repeated request gets its grant back whenever it comes.
        if let Some(index) = self
            .by_request
            .get(&(user.to_string(), request_id.to_string()))
        {
            let grant = &self.state.grants[*index];
            return GrabOutcome::Granted {
                amount: grant.amount,
                packet: grant.packet,
            };
        }
        let definition = &self.state.definition;
        if now_ms < definition.start_ms {
            return GrabOutcome::NotStarted;
        }
        if now_ms >= definition.end_ms() || self.state.refunded_cents.is_some() {
            return GrabOutcome::Ended;
        }
        let next = self.state.grants.len();
        if next >= self.state.packets.len() {
            return GrabOutcome::NoneLeft;
        }
        let held = self.per_user.get(user).copied().unwrap_or(0);
        if held >= definition.cap_per_user {
            return GrabOutcome::CapReached;
        }
        if !self.bucket.try_take(now_ms) {
            return GrabOutcome::Throttled;
        }
        let packet = next as u32;
        let amount = self.state.packets[next];
        self.state.grants.push(Grant {
            packet,
            user: user.to_string(),
            request_id: request_id.to_string(),
            amount,
            at_ms: now_ms,
        });
        self.by_request
            .insert((user.to_string(), request_id.to_string()), next);
        *self.per_user.entry(user.to_string()).or_default() += 1;
        GrabOutcome::Granted { amount, packet }
    }

    /// Ends the rain (at or after its end): the unclaimed cents go back to the creator.
    /// Returns the refund; ending twice refunds once.
    pub fn finish(&mut self) -> u64 {
        if let Some(refunded) = self.state.refunded_cents {
            return refunded;
        }
        let unclaimed: u64 = self.state.packets[self.state.grants.len()..].iter().sum();
        self.state.refunded_cents = Some(unclaimed);
        unclaimed
    }

    /// The durable state.
    pub fn state(&self) -> &RainState {
        &self.state
    }

    /// The grants made since the last call, with the index of the first: what must reach
    /// another node before those grabs are answered.
    pub fn take_grant_delta(&mut self) -> (usize, Vec<Grant>) {
        let from = self.replicated;
        self.replicated = self.state.grants.len();
        (from, self.state.grants[from..].to_vec())
    }
}

/// What [`audit`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditReport {
    /// No violation.
    pub ok: bool,
    /// The rain's total, cents.
    pub total: u64,
    /// Cents granted.
    pub granted: u64,
    /// Cents refunded (0 before the end).
    pub refunded: u64,
    /// Cents neither granted nor refunded.
    pub unclaimed: u64,
    /// Packets granted.
    pub grants: u64,
    /// What is wrong, if anything.
    pub violations: Vec<String>,
}

/// Checks a rain's state (module docs), and that every grant in `client_log` (user,
/// amount, as clients saw them succeed) is in the ledger.
pub fn audit(state: &RainState, client_log: &[(String, u64)]) -> AuditReport {
    let definition = &state.definition;
    let mut violations = Vec::new();
    let split_sum: u64 = state.packets.iter().sum();
    if split_sum != definition.total_cents {
        violations.push(format!(
            "the packets sum to {split_sum}, not the total {}",
            definition.total_cents
        ));
    }
    if state.packets.len() != definition.count as usize {
        violations.push(format!(
            "{} packets, not {}",
            state.packets.len(),
            definition.count
        ));
    }
    if state.packets.contains(&0) {
        violations.push("a packet of 0 cents".into());
    }
    let mut seen_packets = BTreeMap::new();
    let mut per_user: HashMap<&str, u32> = HashMap::new();
    for grant in &state.grants {
        if let Some(previous) = seen_packets.insert(grant.packet, &grant.user) {
            violations.push(format!(
                "packet {} granted twice ({previous} and {})",
                grant.packet, grant.user
            ));
        }
        match state.packets.get(grant.packet as usize) {
            Some(amount) if *amount == grant.amount => {}
            Some(amount) => violations.push(format!(
                "packet {} granted as {} cents, split as {amount}",
                grant.packet, grant.amount
            )),
            None => violations.push(format!("packet {} does not exist", grant.packet)),
        }
        *per_user.entry(&grant.user).or_default() += 1;
    }
    for (user, count) in &per_user {
        if *count > definition.cap_per_user {
            violations.push(format!(
                "{user} got {count} packets, above the cap {}",
                definition.cap_per_user
            ));
        }
    }
    let granted: u64 = state.grants.iter().map(|g| g.amount).sum();
    let refunded = state.refunded_cents.unwrap_or(0);
    let unclaimed = definition
        .total_cents
        .checked_sub(granted + refunded)
        .unwrap_or_else(|| {
            violations.push(format!(
                "granted {granted} + refunded {refunded} exceed the total {}",
                definition.total_cents
            ));
            0
        });
    if state.refunded_cents.is_some() && unclaimed != 0 {
        violations.push(format!(
            "ended with {unclaimed} cents neither granted nor refunded"
        ));
    }
    // Every success a client saw is in the ledger (as a multiset per user and amount).
    let mut ledger: HashMap<(&str, u64), u32> = HashMap::new();
    for grant in &state.grants {
        *ledger.entry((&grant.user, grant.amount)).or_default() += 1;
    }
    for (user, amount) in client_log {
        match ledger.get_mut(&(user.as_str(), *amount)) {
            Some(count) if *count > 0 => *count -= 1,
            _ => violations.push(format!(
                "{user} saw a grant of {amount} cents that is not in the ledger"
            )),
        }
    }
    AuditReport {
        ok: violations.is_empty(),
        total: definition.total_cents,
        granted,
        refunded,
        unclaimed,
        grants: state.grants.len() as u64,
        violations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rain(total: u64, count: u32, cap: u32) -> RainDefinition {
        RainDefinition {
            rain_id: "rain-1".into(),
            room_id: "r-1".into(),
            creator: "boss".into(),
            total_cents: total,
            count,
            start_ms: 1_000,
            duration_ms: 10_000,
            cap_per_user: cap,
            seed: 42,
        }
    }

    proptest! {
        #[test]
        fn splits_are_exact_and_at_least_a_cent(total in 1u64..10_000_000, count in 1u32..2_000, seed: u64) {
            prop_assume!(total >= u64::from(count));
            let packets = split(total, count, seed).expect("split");
            prop_assert_eq!(packets.len(), count as usize);
            prop_assert_eq!(packets.iter().sum::<u64>(), total);
            prop_assert!(packets.iter().all(|p| *p >= 1));
            // The same seed gives the same split.
            prop_assert_eq!(split(total, count, seed).expect("again"), packets);
        }

        #[test]
        fn any_grab_sequence_keeps_the_money_exact(
            grabs in proptest::collection::vec((0u8..20, 0u8..6, 0u64..12_000), 1..400),
        ) {
            let mut pool = RainPool::create(rain(10_000, 50, 3), 1_000_000, 0).expect("rain");
            // What clients saw succeed, once per request id (a repeat is the same grant).
            let mut seen = BTreeMap::new();
            let mut times: Vec<u64> = grabs.iter().map(|g| g.2).collect();
            times.sort_unstable();
            for ((user, request, _), now) in grabs.iter().zip(times) {
                let user = format!("u{user}");
                let request = format!("q{request}");
                if let GrabOutcome::Granted { amount, .. } = pool.grab(now, &user, &request) {
                    if let Some(previous) = seen.insert((user, request), amount) {
                        prop_assert_eq!(previous, amount, "a repeat gets the same amount");
                    }
                }
            }
            let seen: Vec<(String, u64)> =
                seen.into_iter().map(|((user, _), amount)| (user, amount)).collect();
            let report = audit(pool.state(), &seen);
            prop_assert!(report.ok, "{:?}", report.violations);
            pool.finish();
            let report = audit(pool.state(), &[]);
            prop_assert!(report.ok, "{:?}", report.violations);
            prop_assert_eq!(report.granted + report.refunded, 10_000);
        }
    }

    #[test]
    fn grabs_answer_each_case() {
        let mut pool = RainPool::create(rain(100, 3, 2), 1_000, 0).expect("rain");
        assert_eq!(pool.grab(500, "ann", "a1"), GrabOutcome::NotStarted);
        let first = pool.grab(1_000, "ann", "a1");
        assert!(matches!(first, GrabOutcome::Granted { packet: 0, .. }));
        assert_eq!(
            pool.grab(1_001, "ann", "a1"),
            first,
            "a repeated request id"
        );
        assert!(matches!(
            pool.grab(1_002, "ann", "a2"),
            GrabOutcome::Granted { packet: 1, .. }
        ));
        assert_eq!(pool.grab(1_003, "ann", "a3"), GrabOutcome::CapReached);
        assert!(matches!(
            pool.grab(1_004, "bob", "b1"),
            GrabOutcome::Granted { packet: 2, .. }
        ));
        assert_eq!(pool.grab(1_005, "cy", "c1"), GrabOutcome::NoneLeft);
        assert_eq!(pool.grab(11_000, "cy", "c2"), GrabOutcome::Ended);
        assert_eq!(
            pool.grab(11_000, "ann", "a1"),
            first,
            "still answered after the end"
        );
        assert_eq!(pool.finish(), 0);
        let report = audit(
            pool.state(),
            &[("ann".into(), pool.state().grants[0].amount)],
        );
        assert!(report.ok, "{:?}", report.violations);
        assert_eq!(report.granted, 100);
    }

    #[test]
    fn the_bucket_throttles_and_refills() {
        let mut pool = RainPool::create(rain(1_000, 100, 100), 10, 0).expect("rain");
        let granted = (0..50)
            .filter(|i| {
                matches!(
                    pool.grab(1_000, &format!("u{i}"), "x"),
                    GrabOutcome::Granted { .. }
                )
            })
            .count();
        assert_eq!(granted, 10, "the burst is the bucket");
        assert_eq!(pool.grab(1_000, "late", "x"), GrabOutcome::Throttled);
        assert!(matches!(
            pool.grab(2_000, "late", "x"),
            GrabOutcome::Granted { .. }
        ));
    }

    #[test]
    fn a_restored_pool_continues_exactly() {
        let mut pool = RainPool::create(rain(5_000, 20, 3), 1_000, 0).expect("rain");
        for i in 0..7 {
            pool.grab(2_000, &format!("u{i}"), "x");
        }
        let mut restored = RainPool::restore(pool.state().clone(), 1_000, 2_000);
        assert_eq!(restored.grab(2_100, "u3", "x"), pool.grab(2_100, "u3", "x"));
        assert_eq!(
            restored.grab(2_100, "new", "x"),
            pool.grab(2_100, "new", "x")
        );
        assert_eq!(restored.state(), pool.state());
    }

    #[test]
    fn a_replica_follows_the_owner_by_grant_deltas() {
        let mut owner = RainPool::create(rain(10_000, 100, 3), 1_000, 0).expect("rain");
        let mut replica = owner.state().clone();
        for round in 0..5 {
            for i in 0..7 {
                owner.grab(2_000, &format!("u{round}-{i}"), "x");
            }
            let (from, grants) = owner.take_grant_delta();
            replica.apply_grants(from, &grants).expect("in step");
            // A repeated delivery changes nothing.
            replica.apply_grants(from, &grants).expect("repeat");
        }
        assert_eq!(&replica, owner.state());
        assert_eq!(
            replica.apply_grants(replica.grants.len() + 1, &[]),
            Err(GrantsOutOfStep { from: 36, held: 35 })
        );
        // The replica, restored as the next owner, continues exactly.
        let mut next = RainPool::restore(replica, 1_000, 3_000);
        assert_eq!(
            next.grab(3_000, "u0-0", "x"),
            owner.grab(3_000, "u0-0", "x")
        );
        assert!(audit(next.state(), &[]).ok);
    }

    #[test]
    fn the_audit_catches_each_violation() {
        let mut pool = RainPool::create(rain(100, 4, 1), 1_000, 0).expect("rain");
        pool.grab(1_000, "ann", "1");
        pool.grab(1_000, "bob", "1");
        let mut state = pool.state().clone();
        let mut twice = state.clone();
        twice.grants.push(Grant {
            user: "cy".into(),
            ..state.grants[0].clone()
        });
        assert!(!audit(&twice, &[]).ok);
        let mut over_cap = state.clone();
        over_cap.grants.push(Grant {
            packet: 2,
            amount: state.packets[2],
            request_id: "2".into(),
            ..state.grants[0].clone()
        });
        assert!(!audit(&over_cap, &[]).ok);
        let mut bad_amount = state.clone();
        bad_amount.grants[1].amount += 1;
        assert!(!audit(&bad_amount, &[]).ok);
        assert!(
            !audit(&state, &[("dan".into(), 5)]).ok,
            "a client's success not in the ledger"
        );
        state.refunded_cents = Some(1);
        assert!(!audit(&state, &[]).ok, "a short refund");
    }

    #[test]
    fn bad_rains_are_refused() {
        assert!(RainPool::create(rain(5, 10, 3), 10, 0).is_err());
        assert!(RainPool::create(rain(100, 0, 3), 10, 0).is_err());
        assert!(RainPool::create(rain(100, 10, 0), 10, 0).is_err());
    }
}
