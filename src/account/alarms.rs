//! One timer for every waiting account (issue #11). An account with nothing to do has
//! no task: its state is parked in its inbox (see [`task`](super::task)), and an alarm
//! here wakes it when its plan falls due. One task rings the alarms, and rings all of
//! them when the wall clock jumps (a suspend: the monotonic clock stopped meanwhile, so
//! every plan is looked at again).
//!
//! At most a few accounts run from alarms at once (see [`Alarms::new`]): each holds a
//! permit until it parks again. At start, when every account is due at once, the others wait as the few
//! bytes of their alarm, not as tasks, and what the running ones free is reused by the
//! next, not left as holes between the accounts' long-lived state (issue #11).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{sleep_until, Instant};

use crate::clock::{Clock, WallJumps};

/// What an alarm wakes.
pub trait Sleeper: Send + Sync {
    /// The alarm `key` rang (its time came, or the wall clock jumped): whatever runs
    /// because of it holds `permit` while it runs.
    fn ring(&self, key: AlarmKey, permit: OwnedSemaphorePermit);
}

/// One alarm: its time, and a number that tells alarms of the same time apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AlarmKey(Instant, u64);

/// An alarm and what it wakes.
type Alarm = (AlarmKey, Arc<dyn Sleeper>);

/// The fewest accounts that run from alarms at once.
pub const MIN_AWAKE: usize = 32;

/// The alarms of every parked account, in the order they ring.
pub struct Alarms {
    queue: Mutex<BTreeMap<AlarmKey, Arc<dyn Sleeper>>>,
    next_id: AtomicU64,
    /// Told when an alarm earlier than all others was set.
    rearm: Notify,
    running: OnceLock<()>,
    awake: Arc<Semaphore>,
    /// The wall clock's jumps against tokio's, which ring every alarm.
    jumps: Arc<WallJumps>,
    clock: Clock,
}

impl Alarms {
    /// Alarms under which accounts that may refresh `refreshes` at a time run: twice
    /// as many (at least [`MIN_AWAKE`]), so that one waits for each permit as it frees.
    /// No more: the memory an awake account works with comes back as holes between the
    /// others' long-lived state (issue #11: 256 at once cost 3 MiB more than 32 with
    /// 10,000 accounts, and started them no faster).
    pub fn new(jumps: Arc<WallJumps>, clock: Clock, refreshes: usize) -> Self {
        Alarms {
            queue: Default::default(),
            next_id: Default::default(),
            rearm: Default::default(),
            running: Default::default(),
            awake: Arc::new(Semaphore::new(refreshes.saturating_mul(2).max(MIN_AWAKE))),
            jumps,
            clock,
        }
    }

    /// Sets an alarm that rings `sleeper` at `at`. Needs a tokio runtime (the first
    /// alarm starts the task that rings them).
    pub fn set(self: &Arc<Self>, at: Instant, sleeper: Arc<dyn Sleeper>) -> AlarmKey {
        self.running.get_or_init(|| {
            let seen = self.jumps.seen(self.clock);
            tokio::spawn(ring_alarms(self.clone(), seen));
        });
        let key = AlarmKey(at, self.next_id.fetch_add(1, Ordering::Relaxed));
        let mut q = self
            .queue
            .lock()
            .expect("never poisoned: no panics under the lock");
        let first = q.first_key_value().is_none_or(|(k, _)| key < *k);
        q.insert(key, sleeper);
        drop(q);
        if first {
            self.rearm.notify_one();
        }
        key
    }

    /// Takes an alarm back (one that rang already is gone: nothing happens).
    pub fn unset(&self, key: AlarmKey) {
        self.queue.lock().expect("never poisoned").remove(&key);
    }

    /// How many alarms are set.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.queue.lock().expect("never poisoned").len()
    }

    /// Takes the alarms due at `now` (all of them with `all`), and the time of the next.
    fn take_due(&self, now: Instant, all: bool) -> (Vec<Alarm>, Option<Instant>) {
        let mut q = self.queue.lock().expect("never poisoned");
        let mut due = Vec::new();
        while let Some(entry) = q.first_entry() {
            if !all && entry.key().0 > now {
                break;
            }
            due.push(entry.remove_entry());
        }
        (due, q.first_key_value().map(|(k, _)| k.0))
    }
}

/// Rings alarms as they fall due, and all of them when the wall clock jumps. Lives as
/// long as the runtime.
async fn ring_alarms(alarms: Arc<Alarms>, mut seen: u64) {
    let mut all = false;
    loop {
        // Rung outside the lock: a sleeper may set its next alarm at once. An alarm set
        // meanwhile leaves a permit in `rearm`: none is missed.
        let (due, next) = alarms.take_due(Instant::now(), all);
        for (key, sleeper) in due {
            let permit = alarms.awake.clone().acquire_owned().await;
            sleeper.ring(key, permit.expect("never closed"));
        }
        let next = next.unwrap_or_else(|| Instant::now() + IDLE);
        all = tokio::select! {
            _ = alarms.rearm.notified() => false,
            _ = sleep_until(next) => false,
            now = alarms.jumps.after(seen) => {
                seen = now;
                true
            }
        };
    }
}

/// How long the ringer sleeps with no alarm set.
const IDLE: std::time::Duration = std::time::Duration::from_secs(86_400);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    /// Records which alarms rang, and when.
    #[derive(Default)]
    struct Log(Mutex<Vec<(AlarmKey, Instant)>>, Notify);

    impl Sleeper for Log {
        fn ring(&self, key: AlarmKey, _: OwnedSemaphorePermit) {
            self.0.lock().unwrap().push((key, Instant::now()));
            self.1.notify_one();
        }
    }

    impl Log {
        async fn wait(&self, n: usize) -> Vec<(AlarmKey, Instant)> {
            loop {
                let told = self.1.notified();
                let rung = self.0.lock().unwrap().clone();
                if rung.len() >= n {
                    return rung;
                }
                tokio::time::timeout(Duration::from_secs(86_400), told)
                    .await
                    .expect("rung within a virtual day");
            }
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[tokio::test(start_paused = true)]
    async fn alarms_ring_in_order_at_their_time_and_an_unset_one_never() {
        let alarms = Arc::new(Alarms::new(Arc::default(), Clock::tokio(), 16));
        let log = Arc::new(Log::default());
        let t0 = Instant::now();
        let late = alarms.set(t0 + secs(300), log.clone());
        let gone = alarms.set(t0 + secs(200), log.clone());
        let early = alarms.set(t0 + secs(100), log.clone());
        // Set while the ringer sleeps for a later one: it is woken for this one.
        let first = alarms.set(t0 + secs(10), log.clone());
        alarms.unset(gone);
        assert_eq!(alarms.len(), 3);
        let rung = log.wait(3).await;
        let keys: Vec<_> = rung.iter().map(|r| r.0).collect();
        assert_eq!(keys, [first, early, late]);
        for ((_, at), want) in rung.iter().zip([10, 100, 300]) {
            assert_eq!(*at - t0, secs(want));
        }
        tokio::time::sleep(secs(3600)).await;
        assert_eq!(log.0.lock().unwrap().len(), 3, "the unset alarm never rang");
        assert_eq!(alarms.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wall_clock_jump_rings_every_alarm() {
        static SKEW_MS: AtomicU64 = AtomicU64::new(0);
        let clock = Clock::tokio_with_skew(&SKEW_MS);
        let alarms = Arc::new(Alarms::new(Arc::default(), clock, 16));
        let log = Arc::new(Log::default());
        let t0 = Instant::now();
        alarms.set(t0 + secs(86_000), log.clone());
        alarms.set(t0 + secs(7200), log.clone());
        tokio::time::sleep(secs(60)).await;
        // A suspend of an hour: tokio's clock stood still, the wall clock did not.
        SKEW_MS.store(3_600_000, Ordering::Relaxed);
        let rung = log.wait(2).await;
        assert!(
            rung.iter().all(|(_, at)| *at - t0 < secs(120)),
            "rung at the next look at the wall clock, not at their times"
        );
    }
}
