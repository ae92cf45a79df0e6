//! The one source of wall-clock time. Scheduling runs on `tokio::time`; wall-clock times
//! (issued_at, expires_at, Retry-After dates) come from here, so tests that pause tokio's
//! clock can make wall time follow it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

#[derive(Clone, Copy, Debug)]
pub enum Clock {
    /// The system's real-time clock.
    System,
    /// Wall time that advances with tokio's (possibly paused) clock, from an anchor,
    /// plus `skew` milliseconds: tests move it to stand for a suspend, during which
    /// the wall clock runs and the monotonic one does not.
    Tokio {
        wall: SystemTime,
        at: Instant,
        skew: &'static AtomicU64,
    },
}

impl Clock {
    /// A clock that follows tokio's time, starting at the real current time.
    pub fn tokio() -> Self {
        Self::tokio_with_skew(Box::leak(Box::default()))
    }

    /// A tokio-following clock whose wall time is ahead by `skew` milliseconds.
    pub fn tokio_with_skew(skew: &'static AtomicU64) -> Self {
        Clock::Tokio {
            wall: SystemTime::now(),
            at: Instant::now(),
            skew,
        }
    }

    pub fn now(&self) -> SystemTime {
        match self {
            Clock::System => SystemTime::now(),
            Clock::Tokio { wall, at, skew } => {
                *wall + at.elapsed() + Duration::from_millis(skew.load(Ordering::Relaxed))
            }
        }
    }
}

/// The latest time RFC 3339 can write: 9999-12-31T23:59:59Z.
const LATEST_RFC3339: u64 = 253_402_300_799;

/// RFC 3339 UTC with seconds, as the json output and the socket API write times. Times
/// before 1970 or after year 9999 (no provider value gets there, but a state file could
/// say anything) are written as the nearest one that exists: this never panics.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .min(LATEST_RFC3339);
    let t = time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .expect("0..=year 9999 is in time's range");
    t.format(&time::format_description::well_known::Rfc3339)
        .expect("a UTC time in years 1970..=9999 formats as RFC 3339")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_is_utc_seconds() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_500);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20Z");
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 40);
        assert_eq!(rfc3339(far), "9999-12-31T23:59:59Z");
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(5);
        assert_eq!(rfc3339(before), "1970-01-01T00:00:00Z");
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let c = Clock::tokio();
        let t0 = c.now();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(
            c.now().duration_since(t0).unwrap(),
            Duration::from_secs(3600)
        );
    }
}
