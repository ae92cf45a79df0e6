//! When to ask a provider next. Pure: durations and times in, durations out; randomness
//! comes from the caller's RNG so tests can seed it.
//!
//! Failures are classified once, here, into what the refresh loop does about them:
//! try again soon with backoff, wait for the provider's rate limit, or hold off for long
//! because retrying could lock the account (SPEC §6).

use std::time::{Duration, SystemTime};

use rand::Rng;

use crate::config::SchedulePolicy;
use crate::oauth::Error;

/// The first backoff step and the cap (SPEC §6: from 1 s, capped at 5 min).
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
pub const BACKOFF_CAP: Duration = Duration::from_secs(300);
/// Refreshes come up to this fraction of the delay early, so accounts configured alike
/// spread out instead of hitting a provider together.
pub const REFRESH_JITTER: f64 = 0.05;
/// No retry sooner than this, however the jitter falls: a floor against a hot loop.
const MIN_RETRY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Network trouble, 5xx, a malformed answer, an unreadable secret: retry with backoff.
    Transient,
    /// 429 (or a Retry-After on another status): not before this time.
    RateLimited(Option<SystemTime>),
    /// The provider refused the credentials (invalid_client, invalid_grant,
    /// unauthorized_client, 401). Retrying would not help and could lock the account.
    Rejected,
}

pub fn classify(e: &Error) -> ErrorClass {
    if matches!(
        e.oauth_code(),
        Some("invalid_client" | "invalid_grant" | "unauthorized_client")
    ) {
        return ErrorClass::Rejected;
    }
    match e.status() {
        Some(401) => ErrorClass::Rejected,
        Some(429) => ErrorClass::RateLimited(e.retry_after()),
        _ if e.retry_after().is_some() => ErrorClass::RateLimited(e.retry_after()),
        _ => ErrorClass::Transient,
    }
}

/// How long after a successful refresh to refresh again: `refresh_ratio` of the
/// lifetime or `refresh_every`, whichever is sooner, up to `REFRESH_JITTER` early
/// (`jitter` in 0..1), and never sooner than `min_refresh_interval`.
pub fn refresh_delay(policy: &SchedulePolicy, lifetime: Duration, jitter: f64) -> Duration {
    let mut d = lifetime.mul_f64(policy.refresh_ratio);
    if let Some(every) = policy.refresh_every {
        d = d.min(every);
    }
    let d = d.mul_f64(1.0 - REFRESH_JITTER * jitter.clamp(0.0, 1.0));
    d.max(policy.min_refresh_interval)
}

/// Exponential backoff with full jitter: uniform in [0, min(cap, base x 2^(failures-1))].
pub fn backoff(failures: u32, rng: &mut impl Rng) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    let ceiling = BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_CAP);
    ceiling.mul_f64(rng.gen::<f64>()).max(MIN_RETRY)
}

/// How long to wait after the `failures`-th failure in a row, of class `class`.
pub fn retry_delay(
    class: ErrorClass,
    failures: u32,
    policy: &SchedulePolicy,
    now: SystemTime,
    rng: &mut impl Rng,
) -> Duration {
    let b = backoff(failures, rng);
    match class {
        ErrorClass::Transient => b,
        ErrorClass::RateLimited(until) => {
            let wait = until
                .and_then(|t| t.duration_since(now).ok())
                .unwrap_or_default();
            wait.max(b)
        }
        ErrorClass::Rejected => policy.auth_failure_hold,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const MIN: Duration = Duration::from_secs(60);

    fn policy() -> SchedulePolicy {
        SchedulePolicy::default()
    }

    #[test]
    fn ratio_every_and_floor() {
        let p = policy();
        assert_eq!(refresh_delay(&p, 60 * MIN, 0.0), 48 * MIN);
        assert_eq!(refresh_delay(&p, 60 * MIN, 1.0), (48 * MIN).mul_f64(0.95));
        let p = SchedulePolicy {
            refresh_every: Some(25 * MIN),
            ..policy()
        };
        assert_eq!(
            refresh_delay(&p, 30 * MIN, 0.0),
            24 * MIN,
            "ratio of a 30-min token is sooner"
        );
        assert_eq!(
            refresh_delay(&p, 24 * 60 * MIN, 0.0),
            25 * MIN,
            "every is sooner for a day-long token"
        );
        assert_eq!(
            refresh_delay(&p, Duration::from_secs(10), 0.5),
            Duration::from_secs(30),
            "min_refresh_interval"
        );
    }

    #[test]
    fn backoff_grows_with_full_jitter_and_caps() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for failures in 1..=30u32 {
            let ceiling = Duration::from_secs(1u64 << (failures - 1).min(20)).min(BACKOFF_CAP);
            for _ in 0..50 {
                let b = backoff(failures, &mut rng);
                assert!(
                    b <= ceiling.max(MIN_RETRY),
                    "{failures}: {b:?} > {ceiling:?}"
                );
            }
        }
        let mean = |f: u32, rng: &mut rand::rngs::StdRng| {
            (0..2000)
                .map(|_| backoff(f, rng).as_secs_f64())
                .sum::<f64>()
                / 2000.0
        };
        let (m1, m20) = (mean(1, &mut rng), mean(20, &mut rng));
        assert!((0.4..0.6).contains(&m1), "mean of U(0,1s) = {m1}");
        assert!((135.0..165.0).contains(&m20), "mean of U(0,300s) = {m20}");
    }

    #[test]
    fn classes() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let oauth = |status, code: &str| Error::OAuth {
            status,
            error: code.into(),
            description: None,
            retry_after: None,
        };
        assert_eq!(classify(&oauth(400, "invalid_grant")), ErrorClass::Rejected);
        assert_eq!(
            classify(&oauth(401, "invalid_client")),
            ErrorClass::Rejected
        );
        assert_eq!(
            classify(&oauth(400, "unauthorized_client")),
            ErrorClass::Rejected
        );
        assert_eq!(
            classify(&Error::Http {
                status: 401,
                retry_after: None
            }),
            ErrorClass::Rejected
        );
        assert_eq!(
            classify(&oauth(400, "invalid_scope")),
            ErrorClass::Transient
        );
        assert_eq!(
            classify(&Error::Http {
                status: 503,
                retry_after: None
            }),
            ErrorClass::Transient
        );
        let later = now + 90 * MIN;
        let limited = Error::Http {
            status: 429,
            retry_after: Some(later),
        };
        assert_eq!(classify(&limited), ErrorClass::RateLimited(Some(later)));

        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let p = policy();
        assert_eq!(
            retry_delay(ErrorClass::RateLimited(Some(later)), 1, &p, now, &mut rng),
            90 * MIN
        );
        assert_eq!(
            retry_delay(ErrorClass::Rejected, 1, &p, now, &mut rng),
            15 * MIN
        );
        assert!(retry_delay(ErrorClass::Transient, 1, &p, now, &mut rng) <= Duration::from_secs(1));
    }
}
