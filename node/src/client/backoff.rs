//! Reconnect delays: exponential backoff with full jitter.
//!
//! Full jitter (a uniform draw between zero and the exponential cap) spreads a crowd of
//! clients that lost the same node over the whole window instead of letting them return
//! in synchronized waves. This module is pure: the caller passes the RNG.

use rand::Rng;

use super::ReconnectPolicy;

/// The delay before reconnect attempt `attempt` (0 for the first retry), in milliseconds:
/// uniform in `0 ..= min(max_backoff_ms, initial_backoff_ms × 2^attempt)`.
pub fn backoff_delay_ms<R: Rng + ?Sized>(
    attempt: u32,
    policy: &ReconnectPolicy,
    rng: &mut R,
) -> u64 {
    rng.random_range(0..=backoff_cap_ms(attempt, policy))
}

/// The upper bound of [`backoff_delay_ms`] for `attempt`.
pub fn backoff_cap_ms(attempt: u32, policy: &ReconnectPolicy) -> u64 {
    let factor = 1u64.checked_shl(attempt).unwrap_or(u64::MAX);
    policy
        .initial_backoff_ms
        .saturating_mul(factor)
        .min(policy.max_backoff_ms)
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    use super::*;

    fn policy() -> ReconnectPolicy {
        ReconnectPolicy {
            enabled: true,
            initial_backoff_ms: 100,
            max_backoff_ms: 5000,
            attempts_max: 10,
        }
    }

    #[test]
    fn cap_doubles_per_attempt_until_the_maximum() {
        let p = policy();
        let caps: Vec<u64> = (0..8).map(|a| backoff_cap_ms(a, &p)).collect();
        assert_eq!(caps, vec![100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        let p = policy();
        assert_eq!(backoff_cap_ms(63, &p), 5000);
        assert_eq!(backoff_cap_ms(64, &p), 5000);
        assert_eq!(backoff_cap_ms(u32::MAX, &p), 5000);
        let mut rng = SmallRng::seed_from_u64(1);
        assert!(backoff_delay_ms(u32::MAX, &p, &mut rng) <= 5000);
    }

    #[test]
    fn delays_stay_within_the_cap_and_use_the_whole_range() {
        let p = policy();
        let mut rng = SmallRng::seed_from_u64(7);
        for attempt in 0..12 {
            let cap = backoff_cap_ms(attempt, &p);
            let draws: Vec<u64> = (0..2000)
                .map(|_| backoff_delay_ms(attempt, &p, &mut rng))
                .collect();
            assert!(draws.iter().all(|d| *d <= cap), "attempt {attempt}");
            // Full jitter: both the low and the high quarter of the window are hit.
            assert!(draws.iter().any(|d| *d <= cap / 4), "attempt {attempt}");
            assert!(
                draws.iter().any(|d| *d >= cap - cap / 4),
                "attempt {attempt}"
            );
        }
    }

    #[test]
    fn same_seed_gives_same_delays() {
        let p = policy();
        let mut a = SmallRng::seed_from_u64(42);
        let mut b = SmallRng::seed_from_u64(42);
        for attempt in 0..10 {
            assert_eq!(
                backoff_delay_ms(attempt, &p, &mut a),
                backoff_delay_ms(attempt, &p, &mut b)
            );
        }
    }

    #[test]
    fn zero_initial_backoff_means_immediate_retries() {
        let p = ReconnectPolicy {
            initial_backoff_ms: 0,
            ..policy()
        };
        let mut rng = SmallRng::seed_from_u64(3);
        assert_eq!(backoff_delay_ms(5, &p, &mut rng), 0);
    }
}
