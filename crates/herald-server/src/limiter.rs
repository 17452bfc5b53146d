//! The publish rate limit of each API key (`limits.publish_rate_per_key` publications per second, a
//! burst of one second's worth): `governor`'s keyed GCRA limiter, lock-free per key, so there is no lock
//! that could be poisoned. A refusal is an error (429 with `Retry-After`); nothing fails open.

use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::ApiError;

/// Per-key publication limits; without a rate (0) every publication passes.
pub struct PublishLimiter {
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    rate: u64,
}

impl PublishLimiter {
    /// `rate` publications per second per key (0: no limit; above `u32::MAX`: `u32::MAX`).
    pub fn new(rate: u64) -> Self {
        let per_second = NonZeroU32::new(u32::try_from(rate).unwrap_or(u32::MAX));
        let limiter = per_second.map(|n| RateLimiter::keyed(Quota::per_second(n).allow_burst(n)));
        Self { limiter, rate }
    }

    /// Takes `count` publications from `key`'s allowance, or refuses them all (429).
    pub fn take(&self, key: &str, count: u64) -> Result<(), ApiError> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        if count == 0 {
            return Ok(());
        }
        let refused = || ApiError::Limit(format!("API key {key} may publish {} publications per second", self.rate));
        // More than one second's worth at once can never pass (governor: insufficient capacity).
        let count = u32::try_from(count).ok().and_then(NonZeroU32::new).ok_or_else(refused)?;
        match limiter.check_key_n(&key.to_owned(), count) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(refused()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_one_seconds_worth_then_is_refused() {
        let limiter = PublishLimiter::new(10);
        assert!(limiter.take("a", 6).is_ok());
        assert!(limiter.take("a", 4).is_ok());
        assert!(limiter.take("a", 1).is_err(), "the burst is spent");
        assert!(limiter.take("b", 10).is_ok(), "keys are independent");
        assert!(limiter.take("c", 11).is_err(), "more than a burst never passes");
        assert!(PublishLimiter::new(0).take("a", 1_000_000).is_ok(), "0 is no limit");
    }
}
