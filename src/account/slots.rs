//! The refresh slots (`max_concurrent_refreshes`), shared fairly between providers
//! (issue 19): a provider that hangs holds at most its share of them, and accounts of
//! every other provider keep theirs. A slot is held for a token request and the saving
//! and writing of what it brought.
//!
//! A provider's share is the slots divided by the providers that want one now (those
//! with a request in flight or an account waiting), at least one. And while other
//! providers are configured that hold no slot, one slot each is kept free for them (at
//! most half of all): an account of a healthy provider that falls due while a dead one
//! hangs finds a slot at once, without waiting for a dead request to time out. With one
//! provider, it has them all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The slots of one daemon (or one `once`).
pub struct RefreshSlots {
    total: usize,
    state: Mutex<State>,
    /// Told whenever a slot is given back or a provider stops wanting one.
    freed: Notify,
}

#[derive(Default)]
struct State {
    in_use: usize,
    /// Per provider: slots held, accounts waiting.
    providers: HashMap<String, Want>,
    /// The providers of the accounts that run, with how many accounts each.
    known: HashMap<Arc<str>, usize>,
}

/// Why no slot was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// Every slot is in use.
    All,
    /// The provider holds its share (other providers want slots, or are kept one).
    Share,
}

#[derive(Default, Clone, Copy)]
struct Want {
    held: usize,
    waiting: usize,
}

/// A slot held for a provider: given back when dropped.
pub struct RefreshPermit<'a> {
    slots: &'a RefreshSlots,
    provider: String,
}

impl Drop for RefreshPermit<'_> {
    fn drop(&mut self) {
        let mut s = self.slots.lock();
        s.in_use -= 1;
        if let Some(w) = s.providers.get_mut(&self.provider) {
            w.held -= 1;
            if w.held == 0 && w.waiting == 0 {
                s.providers.remove(&self.provider);
            }
        }
        drop(s);
        self.slots.freed.notify_waiters();
    }
}

/// Providers counted as known while accounts start ([`RefreshSlots::know_all`]).
pub struct KnownAll<'a> {
    slots: &'a RefreshSlots,
    providers: Vec<String>,
}

impl Drop for KnownAll<'_> {
    fn drop(&mut self) {
        for p in &self.providers {
            self.slots.forget(p);
        }
    }
}

/// Counts an account that waits for a slot, for as long as it waits (a waiter that is
/// cancelled stops counting too).
struct Waiting<'a> {
    slots: &'a RefreshSlots,
    provider: &'a str,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut s = self.slots.lock();
        if let Some(w) = s.providers.get_mut(self.provider) {
            w.waiting -= 1;
            if w.held == 0 && w.waiting == 0 {
                s.providers.remove(self.provider);
            }
        }
        drop(s);
        self.slots.freed.notify_waiters();
    }
}

impl RefreshSlots {
    pub fn new(total: usize) -> Self {
        RefreshSlots {
            total: total.max(1),
            state: Mutex::default(),
            freed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("never poisoned: no panics under the lock")
    }

    /// Counts an account of `provider` among those that run (see [`RefreshSlots`]);
    /// [`RefreshSlots::forget`] undoes it. Returns the name as kept here, for the
    /// account to hold (one copy per provider, not per account: issue #11).
    pub fn know(&self, provider: &str) -> Arc<str> {
        let mut s = self.lock();
        let name = match s.known.get_key_value(provider) {
            Some((name, _)) => name.clone(),
            None => provider.into(),
        };
        *s.known.entry(name.clone()).or_default() += 1;
        name
    }

    /// Counts the providers of `accounts` as known until the guard is dropped: a start
    /// (or a reload) that starts many accounts holds it while it starts them, so that
    /// the first accounts' requests cannot take every slot before the providers of the
    /// accounts started after them are known.
    pub fn know_all<'a>(&'a self, providers: Vec<String>) -> KnownAll<'a> {
        for p in &providers {
            self.know(p);
        }
        KnownAll {
            slots: self,
            providers,
        }
    }

    /// An account of `provider` stopped.
    pub fn forget(&self, provider: &str) {
        let mut s = self.lock();
        if let Some(n) = s.known.get_mut(provider) {
            *n -= 1;
            if *n == 0 {
                s.known.remove(provider);
            }
        }
        drop(s);
        self.freed.notify_waiters();
    }

    /// A slot for `provider` now, if one is free and the provider is within its share;
    /// else why not.
    pub fn try_acquire(&self, provider: &str) -> Result<RefreshPermit<'_>, Busy> {
        let mut s = self.lock();
        self.take(&mut s, provider, false)
    }

    /// A slot for `provider`, once one is free within its share.
    pub async fn acquire(&self, provider: &str) -> RefreshPermit<'_> {
        {
            let mut s = self.lock();
            if let Ok(p) = self.take(&mut s, provider, false) {
                return p;
            }
            s.providers.entry(provider.to_owned()).or_default().waiting += 1;
        }
        let waiting = Waiting {
            slots: self,
            provider,
        };
        loop {
            // Registered before the state is looked at: no release slips between.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut s = self.lock();
                if let Ok(p) = self.take(&mut s, provider, true) {
                    drop(s);
                    std::mem::forget(waiting);
                    return p;
                }
            }
            freed.await;
        }
    }

    /// Takes a slot for `provider` if one is free and its share allows (`was_waiting`:
    /// the caller is counted among the provider's waiters, and stops being one).
    fn take<'a>(
        &'a self,
        s: &mut State,
        provider: &str,
        was_waiting: bool,
    ) -> Result<RefreshPermit<'a>, Busy> {
        if s.in_use >= self.total {
            return Err(Busy::All);
        }
        let wanting = s.providers.len() + usize::from(!s.providers.contains_key(provider));
        let share = (self.total / wanting).max(1);
        // Kept free for configured providers that hold none now.
        let idle_others = s
            .known
            .keys()
            .map(|p| &**p)
            .filter(|&p| p != provider && s.providers.get(p).is_none_or(|w| w.held == 0))
            .count();
        let reserve = idle_others.min(self.total / 2);
        let held = s.providers.get(provider).map_or(0, |w| w.held);
        if held >= share || (held > 0 && s.in_use + 1 + reserve > self.total) {
            return Err(Busy::Share);
        }
        let w = s.providers.entry(provider.to_owned()).or_default();
        w.held += 1;
        if was_waiting {
            w.waiting -= 1;
        }
        s.in_use += 1;
        Ok(RefreshPermit {
            slots: self,
            provider: provider.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn one_provider_has_every_slot_and_two_share_them() {
        let slots = RefreshSlots::new(16);
        let take = |p: &'static str, n| {
            std::iter::from_fn(|| slots.try_acquire(p).ok())
                .take(n)
                .collect::<Vec<_>>()
        };
        let a = take("a", 100);
        assert_eq!(a.len(), 16, "alone, a provider may use every slot");
        assert_eq!(slots.try_acquire("b").err(), Some(Busy::All));
        drop(a);
        let a = take("a", 8);
        let b = take("b", 4);
        assert_eq!(
            slots.try_acquire("a").err(),
            Some(Busy::Share),
            "two providers: half each, though slots are free"
        );
        let more_b = take("b", 100);
        assert_eq!(more_b.len(), 4);
        drop((a, b, more_b));
        // A configured provider that holds none is kept a slot.
        slots.know("a");
        slots.know("idle");
        let a = take("a", 100);
        assert_eq!(a.len(), 15, "one slot kept for the idle provider");
        assert_eq!(slots.try_acquire("a").err(), Some(Busy::Share));
        let idle = take("idle", 100);
        assert_eq!(idle.len(), 1);
        drop((a, idle));
        slots.forget("a");
        slots.forget("idle");
        let s = slots.lock();
        assert_eq!(s.in_use, 0);
        assert!(
            s.providers.is_empty() && s.known.is_empty(),
            "nothing left behind"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_provider_that_hangs_keeps_at_most_its_share_from_a_waiting_one() {
        let slots = RefreshSlots::new(16);
        // Forty accounts of a dead provider: all of them want a slot.
        let mut hung = Vec::new();
        for _ in 0..16 {
            hung.push(slots.try_acquire("dead").ok().unwrap());
        }
        let mut waiters: Vec<_> = (0..24).map(|_| Box::pin(slots.acquire("dead"))).collect();
        for w in &mut waiters {
            assert!(futures_util::FutureExt::now_or_never(w.as_mut()).is_none());
        }
        assert_eq!(slots.lock().providers["dead"].waiting, 24);
        // The healthy provider's account waits only for the dead one to fall to its share.
        let healthy = slots.acquire("healthy");
        tokio::pin!(healthy);
        assert!(
            tokio::time::timeout(Duration::from_millis(10), healthy.as_mut())
                .await
                .is_err(),
            "every slot is busy"
        );
        drop(hung.pop());
        let got = tokio::time::timeout(Duration::from_millis(10), healthy).await;
        assert!(
            got.is_ok(),
            "the first slot given back goes to the provider under its share"
        );
        for w in &mut waiters {
            assert!(
                futures_util::FutureExt::now_or_never(w.as_mut()).is_none(),
                "the dead provider holds its share and no more"
            );
        }
        drop(waiters);
        assert_eq!(slots.lock().providers["dead"].waiting, 0);
    }
}
