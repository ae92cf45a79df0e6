//! This member's clock against etcd's and the provider's: the calibration of etcd's
//! clock at the start, the provider's `Date`s (seen here, or through a record's
//! writer), and the skew said when it is over [`SKEW_LIMIT`]. Not the backend clock's
//! arithmetic itself (that is `etcd::clock`), nor how a record is timed by it
//! (`coordinate`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Member;

/// How well etcd's clock is to be known before a record read is timed by it.
const CALIBRATED: Duration = Duration::from_millis(150);

/// How far apart two clocks may be before it is said (issue #20).
pub const SKEW_LIMIT: Duration = Duration::from_secs(30);

/// What this member knows of the provider's clock.
#[derive(Debug, Default)]
pub(super) struct ProviderClock {
    /// The provider's clock minus this member's (milliseconds), from a `Date` this
    /// member received itself, and when.
    direct: Option<(i64, Instant)>,
    /// The provider's clock minus the backend's (milliseconds), as the latest record
    /// said (measured by its writer).
    via_record: Option<i64>,
    /// Whether the skew was said to be over the limit (it is logged when that changes).
    told: bool,
}

impl Member {
    /// Learns etcd's clock well at the start: reads spread over a second (each
    /// answer's `Date` bounds the offset to its second; answers at many points of a
    /// second narrow it to tens of milliseconds), until the bounds are within
    /// [`CALIBRATED`] or a few seconds passed. A record read at the start (not seen
    /// as it was written) is timed by it.
    pub(super) async fn calibrate(self: Arc<Self>, cancel: CancellationToken) {
        let at = format!("{}/keycheck", self.prefix);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) && !self.calibrated() {
            let _ = self.etcd.get(&at).await;
            tokio::select! {
                _ = cancel.cancelled() => return,
                // Not a divisor of a second: the reads land at ever other points of it.
                _ = tokio::time::sleep(Duration::from_millis(137)) => {}
            }
        }
        self.calibration.send_replace(true);
    }

    /// Whether etcd's clock is known well enough to time records read (not watched).
    fn calibrated(&self) -> bool {
        self.etcd
            .backend_clock()
            .uncertainty_ms()
            .is_some_and(|u| u <= CALIBRATED.as_millis() as i64)
    }

    /// Waits (a few seconds at most, at the start) until etcd's clock is known well.
    pub async fn calibration(&self) {
        let mut rx = self.calibration.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Records the provider's `Date` on an answer received at `received` (this
    /// member's clock).
    pub fn note_provider_date(&self, date: SystemTime, received: SystemTime) {
        // A Date has whole seconds: the middle of the second it names.
        let offset = crate::clock::unix_ms(date) + 500 - crate::clock::unix_ms(received);
        self.provider.lock().expect("never poisoned").direct = Some((offset, Instant::now()));
        self.tell_skew();
    }

    /// Records the provider's clock against etcd's, as a record's writer measured it.
    pub fn note_provider_offset(&self, provider_minus_backend: i64) {
        self.provider.lock().expect("never poisoned").via_record = Some(provider_minus_backend);
        self.tell_skew();
    }

    /// The provider's clock minus the backend's (milliseconds), as this member
    /// measured it, for the records it writes.
    pub fn provider_minus_backend(&self) -> Option<i64> {
        let p = self.provider.lock().expect("never poisoned");
        let (direct, _) = p.direct?;
        Some(direct - self.etcd.backend_clock().offset_ms()?)
    }

    /// This member's clock against the provider's (positive: this member is ahead),
    /// and what it was compared with: the provider's `Date` (seen here, or by the
    /// record's writer through etcd's clock), else etcd's.
    pub fn clock_skew(&self) -> Option<(Duration, bool, &'static str)> {
        let backend = self.etcd.backend_clock().offset_ms();
        let p = self.provider.lock().expect("never poisoned");
        let fresh_direct = p
            .direct
            .filter(|(_, at)| at.elapsed() < Duration::from_secs(3600))
            .map(|(o, _)| o);
        let (other_minus_me, against) = match (fresh_direct, p.via_record, backend) {
            (Some(d), _, _) => (d, "the provider's"),
            (None, Some(r), Some(b)) => (r + b, "the provider's"),
            (None, _, Some(b)) => (b, "etcd's"),
            (None, _, None) => return None,
        };
        let ahead = other_minus_me < 0;
        Some((
            Duration::from_millis(other_minus_me.unsigned_abs()),
            ahead,
            against,
        ))
    }

    /// A sentence on this member's clock when it is off by more than [`SKEW_LIMIT`].
    pub fn skew_warning(&self) -> Option<String> {
        let (by, ahead, against) = self.clock_skew()?;
        (by > SKEW_LIMIT).then(|| {
            format!(
                "this member's clock is {} {} {against} clock: tokens are timed by the lifetime they have left, not by it",
                // Whole seconds: a `Date` tells no more.
                humantime::format_duration(Duration::from_secs((by.as_millis() as u64 + 500) / 1000)),
                if ahead { "ahead of" } else { "behind" },
            )
        })
    }

    /// Logs the clock's skew when it crosses the limit.
    fn tell_skew(&self) {
        let warning = self.skew_warning();
        let mut p = self.provider.lock().expect("never poisoned");
        match (&warning, p.told) {
            (Some(w), false) => {
                tracing::warn!(member = %self.name, "{w}");
                p.told = true;
            }
            (None, true) => {
                tracing::info!(member = %self.name, "this member's clock agrees with the provider's again");
                p.told = false;
            }
            _ => {}
        }
    }
}
