//! etcd's clock as its answers tell it (the `Date` of each answer against this host's):
//! what records are timed by when this member's own clock is off.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

use crate::clock::Clock;

// ---- The backend's clock --------------------------------------------------------------

/// etcd's time as this member sees it: the offset of etcd's clock (its answers' `Date`
/// headers) from this member's wall clock. A `Date` has whole seconds, so each answer
/// only bounds the offset: the server wrote it at some time in `[date, date + 1 s)`,
/// between our sending and our receiving. The intersection of the last answers' bounds
/// narrows it to well under a second within a few answers; bounds that stop agreeing
/// (this member's clock was set, or another etcd member's clock differs) drop the
/// older ones.
#[derive(Debug, Default)]
pub struct BackendClock {
    /// (lowest, highest) offset in milliseconds, one pair per answer, newest last.
    bounds: Mutex<VecDeque<(i64, i64)>>,
}

/// How many answers' bounds are kept.
const CLOCK_SAMPLES: usize = 32;

impl BackendClock {
    /// Records an answer sent at `sent` and received at `received` (this member's
    /// clock) whose `Date` said `date`.
    pub fn observe(&self, date: SystemTime, sent: SystemTime, received: SystemTime) {
        let d = crate::clock::unix_ms(date);
        let lo = d - crate::clock::unix_ms(received);
        let hi = d + 1000 - crate::clock::unix_ms(sent);
        if lo > hi {
            return;
        }
        let mut b = self.bounds.lock().expect("never poisoned");
        b.push_back((lo, hi));
        while b.len() > CLOCK_SAMPLES {
            b.pop_front();
        }
        // Keep the newest samples that agree with each other.
        while b.len() > 1 {
            let (l, h) = intersect(b.iter());
            if l <= h {
                break;
            }
            b.pop_front();
        }
    }

    /// The backend's clock minus this member's, in milliseconds (the middle of what the
    /// answers allow), if any answer came.
    pub fn offset_ms(&self) -> Option<i64> {
        let (l, h) = self.range()?;
        Some(l + (h - l) / 2)
    }

    /// The lowest and highest offset (milliseconds) the answers allow, if any came.
    fn range(&self) -> Option<(i64, i64)> {
        let b = self.bounds.lock().expect("never poisoned");
        (!b.is_empty()).then(|| intersect(b.iter()))
    }

    /// How far apart the offset's bounds still are (milliseconds), if any answer came.
    pub fn uncertainty_ms(&self) -> Option<i64> {
        let (l, h) = self.range()?;
        Some(h - l)
    }

    /// The backend's time now, in Unix milliseconds, by `clock` and the offset.
    pub fn now_ms(&self, clock: Clock) -> Option<i64> {
        Some(crate::clock::unix_ms(clock.now()) + self.offset_ms()?)
    }

    /// The latest the backend's time can be now (Unix milliseconds): by the highest
    /// offset its answers allow. A record timed by it is never taken for younger than
    /// it is, however few answers came yet.
    pub fn latest_ms(&self, clock: Clock) -> Option<i64> {
        let (_, h) = self.range()?;
        Some(crate::clock::unix_ms(clock.now()) + h)
    }
}

fn intersect<'a>(b: impl Iterator<Item = &'a (i64, i64)>) -> (i64, i64) {
    b.fold((i64::MIN, i64::MAX), |(l, h), (bl, bh)| {
        (l.max(*bl), h.min(*bh))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn one_answer_bounds_the_backends_time_and_the_latest_is_never_behind_it() {
        let c = BackendClock::default();
        let clock = Clock::System;
        assert_eq!(c.latest_ms(clock), None, "no answer: nothing known");
        // The backend is 2,300 ms ahead; its Date (whole seconds) came on an answer
        // that took 4 ms.
        let sent = SystemTime::now();
        let received = sent + Duration::from_millis(4);
        let backend_at_reply = crate::clock::unix_ms(sent) + 2 + 2_300;
        let date = SystemTime::UNIX_EPOCH
            + Duration::from_millis((backend_at_reply - backend_at_reply % 1000) as u64);
        c.observe(date, sent, received);
        let mine = crate::clock::unix_ms(clock.now());
        let (latest, middle) = (c.latest_ms(clock).unwrap(), c.now_ms(clock).unwrap());
        let truth = mine + 2_300;
        assert!(
            latest >= truth,
            "latest {latest} is behind the truth {truth}"
        );
        assert!(
            latest - truth <= 1_000,
            "within a Date's second: {}",
            latest - truth
        );
        assert!(middle <= latest);
        assert!(c.uncertainty_ms().unwrap() <= 1_004);
    }
}
