//! What a provider can ask of tokend, and no more (SPEC §6): how long a token may live
//! and how long a rate limit is obeyed, whatever a provider's answer says. Read by the
//! response parser here and by the schedule above.

use std::time::{Duration, SystemTime};

/// The longest a provider's rate limit (`Retry-After`, `X-Rate-Limit-Reset`) is obeyed,
/// also when read back from the state directory: one bad header must not silence an
/// account for a year.
pub const RATE_LIMIT_CAP: Duration = Duration::from_secs(3600);

/// The longest lifetime a provider can give a token: any `expires_in` or JWT `exp`
/// beyond it is taken as this.
pub const MAX_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// When a provider's rate limit ends, as obeyed: never more than [`RATE_LIMIT_CAP`]
/// after `now`, and never in the past.
pub fn cap_rate_limit(until: SystemTime, now: SystemTime) -> SystemTime {
    until.clamp(now, now + RATE_LIMIT_CAP)
}
