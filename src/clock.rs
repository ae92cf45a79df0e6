//! The one source of wall-clock time. Scheduling runs on `tokio::time`; wall-clock times
//! (issued_at, expires_at, Retry-After dates) come from here, so tests that pause tokio's
//! clock can make wall time follow it.

use std::pin::pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::Instant;

/// A word wide (every account's endpoint holds one, issue #11): the tokio-following
/// clock of tests lives behind a reference.
#[derive(Clone, Copy, Debug)]
pub enum Clock {
    /// The system's real-time clock.
    System,
    /// Wall time that advances with tokio's (possibly paused) clock (tests).
    Tokio(&'static TokioClock),
}

/// Wall time that advances with tokio's (possibly paused) clock, from an anchor, plus
/// `skew` milliseconds: tests move it to stand for a suspend, during which the wall
/// clock and the boot clock run and the monotonic one does not; plus `set` milliseconds
/// (either way): the wall clock set, which moves no other clock.
#[derive(Debug)]
pub struct TokioClock {
    wall: SystemTime,
    at: Instant,
    skew: &'static AtomicU64,
    set: &'static AtomicI64,
}

impl Clock {
    /// A clock that follows tokio's time, starting at the real current time.
    pub fn tokio() -> Self {
        Self::tokio_with_skew(Box::leak(Box::default()))
    }

    /// A tokio-following clock whose wall time is ahead by `skew` milliseconds (time
    /// the machine slept).
    pub fn tokio_with_skew(skew: &'static AtomicU64) -> Self {
        Self::tokio_with(skew, Box::leak(Box::default()))
    }

    /// A tokio-following clock that slept `skew` milliseconds and whose wall clock was
    /// set `set` milliseconds off (ahead when positive).
    pub fn tokio_with(skew: &'static AtomicU64, set: &'static AtomicI64) -> Self {
        // Leaked, as `skew` and `set` are: a test makes a few clocks.
        Clock::Tokio(Box::leak(Box::new(TokioClock {
            wall: SystemTime::now(),
            at: Instant::now(),
            skew,
            set,
        })))
    }

    pub fn now(&self) -> SystemTime {
        match self {
            Clock::System => SystemTime::now(),
            Clock::Tokio(TokioClock { wall, set, .. }) => {
                let set = set.load(Ordering::Relaxed);
                let t = *wall + self.boot();
                let by = Duration::from_millis(set.unsigned_abs());
                if set >= 0 {
                    t + by
                } else {
                    t - by
                }
            }
        }
    }

    /// The boot clock: time since an arbitrary start that runs on while the machine
    /// sleeps (as the wall clock does) and that nobody sets (as nobody sets the
    /// monotonic one). Only differences mean anything. A token's lifetime runs on it:
    /// the provider counts real seconds, whatever this host's wall clock is set to.
    pub fn boot(&self) -> Duration {
        match self {
            Clock::System => nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
                .map(Duration::from)
                .unwrap_or_else(|_| {
                    // Every Linux has CLOCK_BOOTTIME (2.6.39); the monotonic clock is
                    // the next best: it only misses time asleep.
                    static START: OnceLock<std::time::Instant> = OnceLock::new();
                    START.get_or_init(std::time::Instant::now).elapsed()
                }),
            Clock::Tokio(TokioClock { at, skew, .. }) => {
                at.elapsed() + Duration::from_millis(skew.load(Ordering::Relaxed))
            }
        }
    }
}

/// How often the one watcher compares the wall clock with tokio's.
const JUMP_CHECK: Duration = Duration::from_secs(30);
/// A change of the difference smaller than this is drift, not a suspend or a clock set.
const JUMP_MIN: Duration = Duration::from_secs(2);

/// Tells whoever waits when the wall clock jumped against tokio's monotonic clock: a
/// suspend (the monotonic clock stood still while the wall clock ran on) or the clock
/// being set. Accounts plan on tokio's clock, so a refresh that fell due during a
/// suspend would otherwise wait for the time the machine slept.
///
/// One task checks, every 30 s, for the whole process (issue #11: it was one timer per
/// account); accounts wait on a count of jumps and sleep otherwise (waiting costs an
/// account about 80 bytes, where a `watch` receiver cost 136). The task starts with the
/// first look and ends when this is dropped.
#[derive(Default)]
pub struct WallJumps {
    /// Jumps told so far.
    count: AtomicU64,
    jumped: Notify,
    running: OnceLock<()>,
}

impl WallJumps {
    /// How many jumps of `clock` against tokio's clock were told so far, for
    /// [`WallJumps::after`]. Needs a tokio runtime (it starts the watcher).
    pub fn seen(self: &Arc<Self>, clock: Clock) -> u64 {
        self.running.get_or_init(|| {
            tokio::spawn(watch_jumps(Arc::downgrade(self), clock));
        });
        self.count.load(Ordering::SeqCst)
    }

    /// Resolves once a jump was told after `seen` of them; returns how many now.
    pub async fn after(&self, seen: u64) -> u64 {
        loop {
            // Registered before the count is looked at: no jump slips between.
            let mut jumped = pin!(self.jumped.notified());
            jumped.as_mut().enable();
            let now = self.count.load(Ordering::SeqCst);
            if now != seen {
                return now;
            }
            jumped.await;
        }
    }
}

/// Compares `clock` with tokio's every [`JUMP_CHECK`]; tells `jumps` when the
/// difference moved by [`JUMP_MIN`] or more. Ends once `jumps` is gone.
async fn watch_jumps(jumps: Weak<WallJumps>, clock: Clock) {
    let (wall0, at0) = (clock.now(), Instant::now());
    // Wall time gone by minus tokio time gone by, in milliseconds.
    let offset = || {
        let wall = match clock.now().duration_since(wall0) {
            Ok(d) => d.as_millis() as i128,
            Err(e) => -(e.duration().as_millis() as i128),
        };
        wall - at0.elapsed().as_millis() as i128
    };
    let mut last = offset();
    loop {
        tokio::time::sleep(JUMP_CHECK).await;
        let Some(jumps) = jumps.upgrade() else { return };
        let now = offset();
        if (now - last).unsigned_abs() >= JUMP_MIN.as_millis() {
            tracing::info!(
                by_ms = now - last,
                "the wall clock jumped (a suspend, or the clock was set): accounts look at their plans"
            );
            last = now;
            jumps.count.fetch_add(1, Ordering::SeqCst);
            jumps.jumped.notify_waiters();
        }
    }
}

/// Unix milliseconds of `t`, negative before 1970: how cluster members compare their
/// clocks with their store's and the provider's.
pub fn unix_ms(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
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
    async fn a_wall_clock_jump_is_told_once_and_drift_is_not() {
        static SKEW: AtomicU64 = AtomicU64::new(0);
        let jumps = Arc::new(WallJumps::default());
        let seen = jumps.seen(Clock::tokio_with_skew(&SKEW));
        assert_eq!(
            jumps.seen(Clock::System),
            seen,
            "one watcher for every account"
        );
        let quiet = |jumps: Arc<WallJumps>| async move {
            tokio::time::timeout(Duration::from_secs(100), jumps.after(seen))
                .await
                .is_err()
        };
        assert!(quiet(jumps.clone()).await, "no jump, no news");
        SKEW.store(1000, Ordering::Relaxed);
        assert!(quiet(jumps.clone()).await, "a second is drift");
        SKEW.store(3_600_000, Ordering::Relaxed);
        let now = tokio::time::timeout(Duration::from_secs(31), jumps.after(seen))
            .await
            .expect("told within one check");
        assert_eq!(now, seen + 1);
        let told_once = tokio::time::timeout(Duration::from_secs(100), jumps.after(now)).await;
        assert!(told_once.is_err(), "told once");
        let tasks = || {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        };
        assert_eq!(tasks(), 1, "the watcher");
        drop(jumps);
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert_eq!(tasks(), 0, "the watcher ends with its owner");
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
