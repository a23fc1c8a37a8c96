//! Exponential backoff with jitter between attempts of a failing task.

use rand::Rng;
use std::time::Duration;

/// `base * 2^(attempt-1)`, capped at `max`, scaled by a random factor in
/// `[1 - jitter, 1 + jitter]` so retries of many tasks do not stampede.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Delay after the first failure.
    pub base: Duration,
    /// Longest delay.
    pub max: Duration,
    /// Fraction of random spread, 0.0 ..= 1.0.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_millis(500),
            max: Duration::from_secs(60),
            jitter: 0.5,
        }
    }
}

impl RetryPolicy {
    /// Delay before the attempt after `failed_attempt` (1-based).
    pub fn delay(&self, failed_attempt: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << failed_attempt.saturating_sub(1).min(20));
        let capped = exp.min(self.max);
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = if jitter > 0.0 {
            rand::rng().random_range(1.0 - jitter..=1.0 + jitter)
        } else {
            1.0
        };
        capped.mul_f64(factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_caps_and_stays_within_jitter() {
        let policy = RetryPolicy {
            base: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            jitter: 0.5,
        };
        for _ in 0..100 {
            let d = policy.delay(3).as_millis();
            assert!((200..=600).contains(&d), "{d}");
            assert!(policy.delay(30).as_millis() <= 1500);
        }
        let exact = RetryPolicy {
            jitter: 0.0,
            ..policy
        };
        assert_eq!(exact.delay(1), Duration::from_millis(100));
        assert_eq!(exact.delay(2), Duration::from_millis(200));
        assert_eq!(exact.delay(10), Duration::from_millis(1000));
    }
}
