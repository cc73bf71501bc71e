//! Token buckets, sans IO: the caller brings the clock (milliseconds), so a
//! bucket's answer is exact for its inputs.

/// A token bucket: `burst` tokens at most, refilled at `rate` per second;
/// each admission takes one.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    rate_per_ms: f64,
    burst: f64,
    tokens: f64,
    last_ms: u64,
}

impl TokenBucket {
    /// A full bucket at `now_ms`.
    pub fn new(rate_per_second: f64, burst: u32, now_ms: u64) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate_per_ms: rate_per_second.max(0.0) / 1000.0,
            burst,
            tokens: burst,
            last_ms: now_ms,
        }
    }

    /// Takes a token at `now_ms`, or says how many milliseconds until one
    /// is there. A clock that steps back refills nothing.
    pub fn try_take(&mut self, now_ms: u64) -> Result<(), u64> {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        self.tokens = (self.tokens + elapsed as f64 * self.rate_per_ms).min(self.burst);
        if self.tokens >= 1.0 - 1e-9 {
            self.tokens -= 1.0;
            return Ok(());
        }
        if self.rate_per_ms <= 0.0 {
            return Err(u64::MAX);
        }
        Err(((1.0 - self.tokens) / self.rate_per_ms).ceil().max(1.0) as u64)
    }
}

/// One gateway's share of a global limit: `rate` and `burst` divided among
/// `gateways` (at least one), the burst never below one.
pub fn global_share(rate: f64, burst: u32, gateways: usize) -> (f64, u32) {
    let n = gateways.max(1) as f64;
    (rate / n, ((f64::from(burst) / n).ceil() as u32).max(1))
}

/// `Retry-After` seconds for a wait of `ms`: whole seconds, at least one.
pub fn retry_after_secs(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let mut b = TokenBucket::new(10.0, 3, 1_000);
        assert_eq!(b.try_take(1_000), Ok(()));
        assert_eq!(b.try_take(1_000), Ok(()));
        assert_eq!(b.try_take(1_000), Ok(()));
        // Empty: one token every 100 ms.
        assert_eq!(b.try_take(1_000), Err(100));
        assert_eq!(b.try_take(1_040), Err(60));
        assert_eq!(b.try_take(1_100), Ok(()));
        assert_eq!(b.try_take(1_100), Err(100));
        // A long pause fills it to the burst, not beyond.
        for _ in 0..3 {
            assert_eq!(b.try_take(60_000), Ok(()));
        }
        assert!(b.try_take(60_000).is_err());
        // A clock stepping back refills nothing.
        assert!(b.try_take(50_000).is_err());
    }

    #[test]
    fn global_shares_and_retry_after() {
        assert_eq!(global_share(100.0, 50, 4), (25.0, 13));
        assert_eq!(global_share(1.0, 1, 3), (1.0 / 3.0, 1));
        assert_eq!(global_share(10.0, 10, 0), (10.0, 10));
        assert_eq!(retry_after_secs(1), 1);
        assert_eq!(retry_after_secs(1_000), 1);
        assert_eq!(retry_after_secs(1_001), 2);
    }

    proptest! {
        /// Over any run of arrivals, what is allowed never exceeds the burst
        /// plus the rate times the time covered.
        #[test]
        fn never_more_than_burst_plus_rate_times_time(
            rate in 0.1f64..1000.0,
            burst in 1u32..100,
            gaps in proptest::collection::vec(0u64..50, 1..500),
        ) {
            let mut b = TokenBucket::new(rate, burst, 0);
            let (mut now, mut allowed) = (0u64, 0u64);
            for g in gaps {
                now += g;
                if b.try_take(now).is_ok() {
                    allowed += 1;
                }
            }
            let bound = f64::from(burst) + rate * now as f64 / 1000.0;
            prop_assert!(allowed as f64 <= bound + 1e-6, "{allowed} > {bound}");
        }

        /// A refused caller that waits the time it was told gets a token.
        #[test]
        fn waiting_the_answer_is_enough(rate in 0.1f64..1000.0, burst in 1u32..10) {
            let mut b = TokenBucket::new(rate, burst, 0);
            let mut now = 0;
            while b.try_take(now).is_ok() {}
            let wait = b.try_take(now).unwrap_err();
            now += wait;
            prop_assert!(b.try_take(now).is_ok());
        }
    }
}
