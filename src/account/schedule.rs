//! When to ask a provider next. Pure: durations and times in, durations out; randomness
//! comes from the caller's RNG so tests can seed it.
//!
//! Failures are classified once, here, into what the refresh loop does about them:
//! try again soon with backoff, wait for the provider's rate limit, or hold off for long
//! because retrying could lock the account (SPEC §6).

use std::time::{Duration, SystemTime};

use rand::Rng;

use crate::config::SchedulePolicy;
pub use crate::oauth::caps::{cap_rate_limit, MAX_LIFETIME, RATE_LIMIT_CAP};
use crate::oauth::Error;

/// The first backoff step and the cap (SPEC §6: from 1 s, capped at 5 min).
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
pub const BACKOFF_CAP: Duration = Duration::from_secs(300);
/// The longest a hold after refused credentials grows to (unless `auth_failure_hold`
/// itself is longer).
pub const HOLD_CAP: Duration = Duration::from_secs(24 * 3600);
/// Refreshes come up to this fraction of the delay early, so accounts configured alike
/// spread out instead of hitting a provider together.
pub const REFRESH_JITTER: f64 = 0.05;
/// No retry sooner than this, however the jitter falls: a floor against a hot loop.
const MIN_RETRY: Duration = Duration::from_millis(100);

/// What a failure means for the next request (SPEC §6, the failure table). Every failure
/// gets exactly one class, here, and each class one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// 5xx, network trouble, a timeout, a 2xx that is no usable token, any other 4xx:
    /// retry with backoff.
    Transient,
    /// 429, or 503 with `Retry-After`: nobody asks this `token_url` before this time
    /// (already capped at [`RATE_LIMIT_CAP`]).
    RateLimited(Option<SystemTime>),
    /// The provider refused the credentials (`invalid_client`, `invalid_grant`,
    /// `unauthorized_client`, `access_denied`, any 401 or 403). Retrying would not help
    /// and could lock the account: hold, and grow the hold.
    Rejected,
    /// Nothing the provider said: a secret unreadable, an output or state write failing.
    /// The provider is not asked again because of it.
    Local,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::RateLimited(_) => "rate_limited",
            ErrorClass::Rejected => "refused",
            ErrorClass::Local => "local",
        }
    }
}

/// The RFC 6749 §5.2 codes (and Auth0's `access_denied`) that mean "these credentials
/// are refused", whatever the HTTP status.
const REFUSED_CODES: [&str; 4] = [
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "access_denied",
];

pub fn classify(e: &Error) -> ErrorClass {
    if matches!(
        e,
        Error::Secret { .. } | Error::Key { .. } | Error::Client(_)
    ) {
        return ErrorClass::Local;
    }
    let status = e.status();
    if status == Some(429) {
        return ErrorClass::RateLimited(e.retry_after());
    }
    if e.oauth_code().is_some_and(|c| REFUSED_CODES.contains(&c)) {
        return ErrorClass::Rejected;
    }
    match status {
        // Glewlwyd, gateways and WAFs answer a wrong secret with a bare 403.
        Some(401 | 403) => ErrorClass::Rejected,
        Some(503) if e.retry_after().is_some() => ErrorClass::RateLimited(e.retry_after()),
        _ => ErrorClass::Transient,
    }
}

/// How long after a successful refresh to refresh again: `refresh_ratio` of the
/// lifetime or `refresh_every`, whichever is sooner, up to `REFRESH_JITTER` early
/// (`jitter` in 0..1), and never sooner than `min_refresh_interval`.
pub fn refresh_delay(policy: &SchedulePolicy, lifetime: Duration, jitter: f64) -> Duration {
    let mut d = lifetime.min(MAX_LIFETIME).mul_f64(policy.refresh_ratio);
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

/// The hold after the `refusals`-th refusal in a row: `auth_failure_hold`, doubled for
/// each further one, up to [`HOLD_CAP`] (SPEC §6). A service account that locks after
/// ten wrong passwords sees ten attempts only after days, not hours.
pub fn hold(policy: &SchedulePolicy, refusals: u32) -> Duration {
    let doublings = refusals.saturating_sub(1).min(20);
    policy
        .auth_failure_hold
        .saturating_mul(1 << doublings)
        .min(hold_cap(policy))
}

/// The longest hold for this policy: [`HOLD_CAP`], or `auth_failure_hold` if longer.
pub fn hold_cap(policy: &SchedulePolicy) -> Duration {
    HOLD_CAP.max(policy.auth_failure_hold)
}

/// How long to wait after a failure of class `class`: `failures` is the count of
/// transient (or local) failures in a row, `refusals` of refusals in a row.
pub fn retry_delay(
    class: ErrorClass,
    failures: u32,
    refusals: u32,
    policy: &SchedulePolicy,
    now: SystemTime,
    rng: &mut impl Rng,
) -> Duration {
    let b = backoff(failures, rng);
    match class {
        ErrorClass::Transient | ErrorClass::Local => b,
        ErrorClass::RateLimited(until) => {
            let wait = until
                .map(|t| cap_rate_limit(t, now))
                .and_then(|t| t.duration_since(now).ok())
                .unwrap_or_default();
            wait.max(b)
        }
        ErrorClass::Rejected => hold(policy, refusals),
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
    fn holds_double_up_to_a_day() {
        let p = policy();
        let holds: Vec<Duration> = (1..=9).map(|n| hold(&p, n)).collect();
        assert_eq!(
            holds[..4],
            [15 * MIN, 30 * MIN, 60 * MIN, 120 * MIN],
            "doubled on each further refusal"
        );
        assert_eq!(hold(&p, 7), 16 * 60 * MIN);
        assert_eq!(hold(&p, 8), 24 * 60 * MIN, "capped at 24 h");
        assert_eq!(hold(&p, u32::MAX), 24 * 60 * MIN);
        let long = SchedulePolicy {
            auth_failure_hold: 48 * 60 * MIN,
            ..p
        };
        assert_eq!(
            hold(&long, 3),
            48 * 60 * MIN,
            "a longer configured hold stands"
        );
    }

    #[test]
    fn rate_limits_are_capped_at_an_hour() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let year_9999 = SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799);
        assert_eq!(cap_rate_limit(year_9999, now), now + 60 * MIN);
        assert_eq!(cap_rate_limit(now - MIN, now), now);
        assert_eq!(cap_rate_limit(now + MIN, now), now + MIN);
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
        assert_eq!(classify(&oauth(403, "access_denied")), ErrorClass::Rejected);
        assert_eq!(classify(&oauth(400, "access_denied")), ErrorClass::Rejected);
        assert_eq!(
            classify(&Error::Http {
                status: 403,
                retry_after: None
            }),
            ErrorClass::Rejected,
            "a bare 403 (Glewlwyd, gateways) is a refusal"
        );
        assert_eq!(
            classify(&Error::Http {
                status: 500,
                retry_after: Some(now + 10 * MIN)
            }),
            ErrorClass::Transient,
            "a 500 is no rate limit, whatever its headers"
        );
        assert_eq!(
            classify(&Error::Http {
                status: 503,
                retry_after: Some(now + 10 * MIN)
            }),
            ErrorClass::RateLimited(Some(now + 10 * MIN))
        );
        assert_eq!(
            classify(&Error::Secret {
                what: "client secret",
                source: crate::config::SecretError::Env("X".into()),
            }),
            ErrorClass::Local
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
            retry_delay(
                ErrorClass::RateLimited(Some(later)),
                1,
                0,
                &p,
                now,
                &mut rng
            ),
            60 * MIN,
            "a rate limit is obeyed for an hour at most"
        );
        let soon = now + 20 * MIN;
        assert_eq!(
            retry_delay(ErrorClass::RateLimited(Some(soon)), 1, 0, &p, now, &mut rng),
            20 * MIN
        );
        assert_eq!(
            retry_delay(ErrorClass::Rejected, 1, 1, &p, now, &mut rng),
            15 * MIN
        );
        assert!(
            retry_delay(ErrorClass::Transient, 1, 0, &p, now, &mut rng) <= Duration::from_secs(1)
        );
        assert!(retry_delay(ErrorClass::Local, 1, 0, &p, now, &mut rng) <= Duration::from_secs(1));
    }
}
