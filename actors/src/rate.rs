//! A sans-IO token bucket: rate limits for requests, comments and grabs.
//!
//! The bucket never reads the clock: every call takes `now_ms` from the caller, so the same
//! inputs give the same answers (tests, chaos replays). It does not decide what to do with a
//! refusal and does not keep per-key maps; callers own those (and their bounds).
//!
//! The arithmetic is exact integers: one token is [`UNITS_PER_TOKEN`] units, so a refill of
//! `r` tokens per second is exactly `r` units per millisecond and fractions of a token carry
//! over from one call to the next without rounding drift.

/// Internal units per token: with 1000 units per token, `refill_per_sec` tokens per second is
/// exactly `refill_per_sec` units per millisecond.
pub const UNITS_PER_TOKEN: u64 = 1000;

/// A token bucket: holds up to `capacity` tokens, refills `refill_per_sec` tokens per second,
/// and each [`try_take`](TokenBucket::try_take) spends one.
///
/// Time going backwards (a caller's clock stepping back) neither panics nor mints tokens:
/// the bucket only refills for time beyond the latest `now_ms` it has seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    /// `capacity × UNITS_PER_TOKEN`.
    capacity_units: u64,
    /// Units added per elapsed millisecond (equal to the refill rate in tokens per second).
    refill_units_per_ms: u64,
    /// Current fill, `0 ..= capacity_units`.
    units: u64,
    /// The latest time the bucket was refilled up to; never decreases.
    refilled_at_ms: u64,
}

impl TokenBucket {
    /// A full bucket of `capacity` tokens refilling `refill_per_sec` tokens per second.
    ///
    /// A capacity of 0 never grants; a rate of 0 grants the initial `capacity` tokens and
    /// then nothing.
    pub fn new(capacity: u32, refill_per_sec: u32, now_ms: u64) -> Self {
        let capacity_units = u64::from(capacity) * UNITS_PER_TOKEN;
        TokenBucket {
            capacity_units,
            refill_units_per_ms: u64::from(refill_per_sec),
            units: capacity_units,
            refilled_at_ms: now_ms,
        }
    }

    /// Spends one token if one is available at `now_ms`; `false` means rate limited (nothing
    /// is spent).
    pub fn try_take(&mut self, now_ms: u64) -> bool {
        self.refill(now_ms);
        if self.units >= UNITS_PER_TOKEN {
            self.units -= UNITS_PER_TOKEN;
            true
        } else {
            false
        }
    }

    /// Whole tokens available at `now_ms`, without spending or updating anything.
    pub fn tokens_available(&self, now_ms: u64) -> u32 {
        let units = self.units_at(now_ms) / UNITS_PER_TOKEN;
        // units ≤ capacity_units = capacity × UNITS_PER_TOKEN, and capacity is a u32.
        u32::try_from(units).unwrap_or(u32::MAX)
    }

    /// Whether the bucket is full at `now_ms` (then it is indistinguishable from a new one,
    /// so a caller may drop it).
    pub fn is_full(&self, now_ms: u64) -> bool {
        self.units_at(now_ms) == self.capacity_units
    }

    /// The most tokens the bucket holds.
    pub fn capacity(&self) -> u32 {
        u32::try_from(self.capacity_units / UNITS_PER_TOKEN).unwrap_or(u32::MAX)
    }

    /// Tokens added per second.
    pub fn refill_per_sec(&self) -> u32 {
        u32::try_from(self.refill_units_per_ms).unwrap_or(u32::MAX)
    }

    /// The fill at `now_ms`; earlier times than the last refill add nothing.
    fn units_at(&self, now_ms: u64) -> u64 {
        let elapsed_ms = now_ms.saturating_sub(self.refilled_at_ms);
        let added = elapsed_ms.saturating_mul(self.refill_units_per_ms);
        self.units.saturating_add(added).min(self.capacity_units)
    }

    fn refill(&mut self, now_ms: u64) {
        self.units = self.units_at(now_ms);
        self.refilled_at_ms = self.refilled_at_ms.max(now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn take_all(bucket: &mut TokenBucket, now_ms: u64) -> u32 {
        let mut taken = 0;
        while bucket.try_take(now_ms) {
            taken += 1;
        }
        taken
    }

    #[test]
    fn a_new_bucket_grants_its_burst_then_refuses() {
        let mut bucket = TokenBucket::new(10, 5, 1_000);
        assert_eq!(take_all(&mut bucket, 1_000), 10);
        assert!(!bucket.try_take(1_000));
        assert_eq!(bucket.tokens_available(1_000), 0);
    }

    #[test]
    fn tokens_come_back_at_the_refill_rate() {
        let mut bucket = TokenBucket::new(10, 5, 0);
        assert_eq!(take_all(&mut bucket, 0), 10);
        // 5 per second: one token every 200 ms.
        assert!(!bucket.try_take(199));
        assert!(bucket.try_take(200));
        assert!(!bucket.try_take(200));
        assert_eq!(take_all(&mut bucket, 1_200), 5);
    }

    #[test]
    fn fractions_of_a_token_carry_over_without_drift() {
        // 3 per second: a token every 333.33 ms. Called every millisecond, over 3 s that is
        // exactly 9 tokens: the fractions carry over, none is lost to rounding.
        // (Capacity 2 so the bucket never overflows: a full bucket rightly wastes refill.)
        let mut bucket = TokenBucket::new(2, 3, 0);
        assert_eq!(take_all(&mut bucket, 0), 2);
        let mut granted = 0;
        for now_ms in 1..=3_000 {
            if bucket.try_take(now_ms) {
                granted += 1;
            }
        }
        assert_eq!(granted, 9);
        assert!(!bucket.try_take(333));
    }

    #[test]
    fn refill_stops_at_capacity() {
        let mut bucket = TokenBucket::new(4, 100, 0);
        assert_eq!(take_all(&mut bucket, 0), 4);
        assert!(bucket.is_full(1_000_000));
        assert_eq!(take_all(&mut bucket, 1_000_000), 4);
    }

    #[test]
    fn time_going_backwards_mints_nothing_and_does_not_panic() {
        let mut bucket = TokenBucket::new(2, 1, 10_000);
        assert_eq!(take_all(&mut bucket, 10_000), 2);
        assert!(!bucket.try_take(0));
        assert!(!bucket.try_take(9_000));
        // Going back then forward again does not count the same second twice.
        assert!(!bucket.try_take(10_999));
        assert!(bucket.try_take(11_000));
        assert!(!bucket.try_take(11_000));
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        let mut bucket = TokenBucket::new(u32::MAX, u32::MAX, 0);
        assert!(bucket.try_take(0));
        assert_eq!(bucket.tokens_available(u64::MAX), u32::MAX);
        assert!(bucket.try_take(u64::MAX));
        assert_eq!(bucket.capacity(), u32::MAX);
        assert_eq!(bucket.refill_per_sec(), u32::MAX);
    }

    #[test]
    fn zero_capacity_never_grants_and_zero_rate_never_refills() {
        let mut empty = TokenBucket::new(0, 1_000, 0);
        assert!(!empty.try_take(0));
        assert!(!empty.try_take(u64::MAX));
        let mut once = TokenBucket::new(1, 0, 0);
        assert!(once.try_take(0));
        assert!(!once.try_take(u64::MAX));
    }

    proptest! {
        #[test]
        fn grants_never_exceed_burst_plus_refill(
            capacity in 0u32..50,
            rate in 0u32..50,
            steps in proptest::collection::vec((0u64..500, any::<bool>()), 1..200),
        ) {
            let start_ms = 1_000_000;
            let mut bucket = TokenBucket::new(capacity, rate, start_ms);
            let mut now_ms = start_ms;
            let mut latest_ms = start_ms;
            let mut granted: u64 = 0;
            for (delta_ms, backwards) in steps {
                now_ms = if backwards { now_ms.saturating_sub(delta_ms) } else { now_ms + delta_ms };
                latest_ms = latest_ms.max(now_ms);
                if bucket.try_take(now_ms) {
                    granted += 1;
                }
                let bound = u64::from(capacity)
                    + (latest_ms - start_ms) * u64::from(rate) / 1_000;
                prop_assert!(granted <= bound, "granted {granted} > bound {bound}");
            }
        }
    }
}
