//! The loop itself: wait, handle what woke it, attempt, plan the next; and the
//! restore of the plan from the saved state at the start.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{sleep_until, Instant};

use super::*;
use crate::account::coordinator::Coordinator;
use crate::account::engine::{Attempt, Engine, Failed};
use crate::account::schedule::{self, ErrorClass};
use crate::account::state::Status;
use crate::oauth::Endpoint;

impl<'a, E: Endpoint> Task<'a, E> {
    /// The loop. Everything but the wait itself runs in boxed futures: a waiting task
    /// then holds only its plan and what it waits on, not the largest of what it does
    /// now and then (an attempt holds a whole HTTP request).
    /// Without a coordinator the loop does not wait: it returns to be parked, and goes
    /// on from `resumed` (what woke it) in its next task.
    pub(super) async fn run(
        &mut self,
        slot: &mut Slot<E>,
        coordinator: &mut Option<Box<dyn Coordinator>>,
        plan: &mut Option<Plan>,
        awake: &mut Option<OwnedSemaphorePermit>,
        mut resumed: Option<(Woke, Duration)>,
    ) -> Exit {
        let parts = self.parts;
        if let Slot::Closed(in_memory) = slot {
            let Some(e) = Box::pin(self.open(in_memory.take())).await else {
                return Exit::Stop;
            };
            *slot = Slot::Open(e);
        }
        let Slot::Open(engine) = slot else {
            unreachable!("the engine was opened just above")
        };
        let plan = match plan {
            Some(p) => p,
            None => {
                let p = Box::pin(self.restore(engine)).await;
                // Joining or restarting a cluster: first what the cluster has, as on any
                // news from it (a fresh shared token costs the provider nothing, and the
                // leader is shown from the start, not from the next change).
                resumed = coordinator
                    .is_some()
                    .then(|| (Woke::Cluster, self.boot_at(p.next)));
                plan.insert(p)
            }
        };
        // The monotonic clock stops while the machine sleeps: when the wall clock jumps,
        // the plan is looked at again, so a refresh that fell due during a suspend
        // happens on resume. One watcher for all accounts; no timer of our own.
        let mut jumps = parts.shared.wall_jumps.seen(parts.shared.clock);
        loop {
            let wake = self
                .expiry_instant()
                .map_or(plan.next, |e| e.min(plan.next));
            let wake = plan.redeliver.map_or(wake, |r| r.min(wake));
            let (woke, next_boot) = match resumed.take() {
                Some(r) => r,
                // Due already (at start, every account is): no round trip to the alarms.
                None if coordinator.is_none() && wake <= Instant::now() => {
                    (Woke::Timer, self.boot_at(plan.next))
                }
                None if coordinator.is_none() => {
                    return Exit::Park {
                        wake,
                        next_boot: self.boot_at(plan.next),
                    }
                }
                None => {
                    let next_boot = self.boot_at(plan.next);
                    let woke = tokio::select! {
                        biased;
                        _ = self.cancel.cancelled() => Woke::Cancelled,
                        _ = parts.inbox.wake.notified() => Woke::Poked,
                        _ = changed(coordinator) => Woke::Cluster,
                        _ = sleep_until(wake) => Woke::Timer,
                        now = parts.shared.wall_jumps.after(jumps) => {
                            jumps = now;
                            Woke::Timer
                        }
                    };
                    (woke, next_boot)
                }
            };
            let then = Box::pin(self.woke(woke, engine, coordinator.as_deref(), plan, next_boot));
            let leading = match then.await {
                Then::Wait => continue,
                Then::Stop => return Exit::Stop,
                Then::Attempt { force, leading } => {
                    if let Some(exit) = self.gate(force, coordinator.is_none(), plan).await {
                        return exit;
                    }
                    leading
                }
            };
            plan.last_attempt = Some(Instant::now());
            self.publish(|s| s.status = Status::Refreshing);
            let Some(permit) = self.refresh_permit(awake).await else {
                return Exit::Stop;
            };
            let attempt =
                Box::pin(self.attempt(engine, coordinator.as_deref(), plan, leading, permit));
            if let Then::Stop = attempt.await {
                return Exit::Stop;
            }
        }
    }

    /// Before an attempt (unless `force`d): waits until the provider may be asked
    /// again after a rate limit, parked (`alone`: no cluster news to wait for) or as a
    /// task. `Some` when the loop ends here.
    async fn gate(&self, force: bool, alone: bool, plan: &Plan) -> Option<Exit> {
        let until = self.provider_gate().filter(|_| !force)?;
        if alone {
            // Parked until the provider may be asked (then it is due still).
            return Some(Exit::Park {
                wake: until,
                next_boot: self.boot_at(plan.next),
            });
        }
        tokio::select! {
            _ = self.cancel.cancelled() => Some(Exit::Stop),
            _ = sleep_until(until) => None,
        }
    }

    /// A refresh slot for the account's provider (waited for when none is free); none
    /// when the account is stopped meanwhile. The permit first, in this small loop,
    /// then the attempt's state (issue #11: at start every account is due at once, and
    /// the heap keeps the shape of the largest crowd it held).
    async fn refresh_permit(
        &self,
        awake: &mut Option<OwnedSemaphorePermit>,
    ) -> Option<crate::account::slots::RefreshPermit<'a>> {
        let slots = &self.parts.shared.slots;
        let cancel = self.cancel;
        let provider = crate::account::engine::Providers::of(self.account());
        let permit = match slots.try_acquire(&provider) {
            Ok(p) => p,
            Err(busy) => {
                if busy == crate::account::slots::Busy::Share {
                    // Its provider holds its share of the slots: it waits as a task,
                    // and the accounts whose alarms ring meanwhile (of other providers
                    // too) are not held back by it (issue 19). Waiting for a slot that
                    // any account may take next, it keeps its place among the few
                    // awake (issue #11: not every account a task).
                    awake.take();
                }
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return None,
                    p = slots.acquire(&provider) => p,
                }
            }
        };
        // Holding a slot, it needs no place among the awake: the slots bound it.
        awake.take();
        Some(permit)
    }

    /// Handles what woke the loop: a poke, news from the cluster, or a timer; says
    /// whether an attempt is due.
    pub(super) async fn woke(
        &mut self,
        woke: Woke,
        engine: &mut Engine<E>,
        coordinator: Option<&dyn Coordinator>,
        plan: &mut Plan,
        next_boot: Duration,
    ) -> Then {
        // A refresh someone asked for (a poke here, or another member's request to this
        // leader) is made even if the schedule says the token is not due; a forced one
        // ends any hold.
        let (force, asked) = match woke {
            Woke::Cancelled => return Then::Stop,
            Woke::Poked => match self.poked(engine, plan).await {
                Some(force) => (force, true),
                None => return Then::Wait,
            },
            Woke::Cluster => {
                let Some(c) = coordinator else {
                    return Then::Wait;
                };
                match self.cluster_news(engine, c, plan).await {
                    ClusterNews::Stop => return Then::Stop,
                    ClusterNews::Nothing => return Then::Wait,
                    ClusterNews::Due => (false, false),
                    ClusterNews::Asked { force } => {
                        match self.asked_by_member(engine, plan, force).await {
                            Some(force) => (force, true),
                            None => return Then::Wait,
                        }
                    }
                }
            }
            Woke::Timer => {
                if !self.timer(engine, coordinator, plan, next_boot).await {
                    return Then::Wait;
                }
                (false, false)
            }
        };
        let mut leading = false;
        if let Some(c) = coordinator {
            match self.turn(engine, c, plan, force, asked).await {
                Some(lead) => leading = lead,
                None => return Then::Wait,
            }
        }
        Then::Attempt { force, leading }
    }

    /// The operator's pokes (refresh, force, reseed, credentials changed): `Some(force)`
    /// when a refresh is to be made now.
    async fn poked(&mut self, engine: &mut Engine<E>, plan: &mut Plan) -> Option<bool> {
        let name = &self.account().name;
        let pokes = self.parts.inbox.pokes.swap(0, Ordering::SeqCst);
        if pokes & Poke::Reseed.bit() != 0 {
            if let Err(e) = engine.reseed().await {
                // The next save tries again; the chain starts from the seed in memory
                // meanwhile.
                tracing::error!(account = %name, "{e}");
            }
        }
        if pokes & (Poke::CredentialsChanged.bit() | Poke::Force.bit() | Poke::Reseed.bit()) != 0 {
            let force = pokes & (Poke::Force.bit() | Poke::Reseed.bit()) != 0;
            tracing::info!(account = %name, "{}", if force {
                "refresh forced: any hold or rate-limit wait ends for one attempt"
            } else {
                "credentials changed: asking the provider now"
            });
            engine.end_hold().await;
            plan.hold_until = None;
            return Some(force);
        }
        if pokes == 0 {
            // Pokes that came while the last were handled, already taken.
            return None;
        }
        if plan.hold_until.is_some_and(|h| h > Instant::now()) {
            tracing::info!(account = %name, "refresh asked for, but the account is held after the provider refused its credentials");
            return None;
        }
        (!self.too_soon(plan)).then_some(false)
    }

    /// Another member asked this leader for a refresh (`force`d or not): `Some(force)`
    /// when it is to be made now.
    async fn asked_by_member(
        &mut self,
        engine: &mut Engine<E>,
        plan: &mut Plan,
        force: bool,
    ) -> Option<bool> {
        let name = &self.account().name;
        if force {
            tracing::info!(account = %name, "refresh forced by another member: any hold or rate-limit wait ends for one attempt");
            engine.end_hold().await;
            plan.hold_until = None;
            return Some(true);
        }
        if plan.hold_until.is_some_and(|h| h > Instant::now()) {
            tracing::info!(account = %name, "refresh asked for by another member, but the account is held after the provider refused its credentials");
            return None;
        }
        (!self.too_soon(plan)).then_some(false)
    }

    /// Whether a refresh asked for now comes sooner than `min_refresh_interval` after
    /// the last request: then it is planned for the earliest time allowed.
    fn too_soon(&self, plan: &mut Plan) -> bool {
        let now = Instant::now();
        let earliest = plan.last_attempt.map_or(now, |l| {
            l + self.account().options.schedule.min_refresh_interval
        });
        if earliest > now {
            plan.next = plan.next.min(earliest);
            self.publish_next(plan.next);
        }
        earliest > now
    }

    /// The account's timer rang (or the wall clock jumped): a failed delivery is retried,
    /// a token timed anew or expired; whether a refresh is due.
    async fn timer(
        &mut self,
        engine: &mut Engine<E>,
        coordinator: Option<&dyn Coordinator>,
        plan: &mut Plan,
        next_boot: Duration,
    ) -> bool {
        let now = Instant::now();
        if plan.redeliver.is_some_and(|r| r <= now) {
            plan.redeliver = None;
            let outcome = engine.retry_delivery(self.cancel).await;
            self.handle(outcome, plan);
            return false;
        }
        // Due by the boot clock: a refresh that fell due while the machine slept
        // happens on resume; one for a wall clock set forward does not.
        let due = now >= plan.next || self.parts.shared.clock.boot() >= next_boot;
        if !due {
            if self.wall_was_set() {
                // The token is timed anew by the lifetime it has left: a wall clock set
                // forward does not expire it, one set back does not keep it past its
                // time (the cluster times its token itself).
                match coordinator {
                    Some(c) => self.retime(engine, c).await,
                    None => self.retime_alone(engine).await,
                }
            }
            if self.token_expired() {
                self.expire();
            }
        }
        due
    }

    /// One attempt with `permit`, planned and published; shared with the cluster when
    /// this member `leading`.
    pub(super) async fn attempt(
        &mut self,
        engine: &mut Engine<E>,
        coordinator: Option<&dyn Coordinator>,
        plan: &mut Plan,
        leading: bool,
        permit: crate::account::slots::RefreshPermit<'_>,
    ) -> Then {
        let name = &self.account().name;
        // Cluster mode: the link is claimed right before it is sent (issue #20), and
        // shutdown waits for its answer to be shared (for a chain, the only copy of the
        // next link), as it waits for the request itself.
        let mut after = None;
        let _sharing = (leading && coordinator.is_some() && self.account().rotates())
            .then(|| Sharing::start(&self.parts.shared.rotations));
        if let (true, Some(c)) = (leading, coordinator) {
            match self.claim(engine, c, plan).await {
                Ok(a) => after = a,
                Err(()) => return Then::Wait,
            }
        }
        let mut outcome = engine.attempt_with(permit, self.cancel).await;
        if matches!(outcome, Attempt::Cancelled) {
            return Then::Stop;
        }
        if let (Some(c), Some((date, received))) =
            (coordinator, self.parts.endpoint.provider_date())
        {
            c.provider_date(date, received);
        }
        if let (Some(dead), Attempt::Failed(f)) = (&after, &mut outcome) {
            if f.class == ErrorClass::Rejected {
                f.message = format!("{}; the refresh token may have been spent by member {dead}, which died mid-request: re-seed (tokend reseed)", f.message);
            }
        }
        let fresh = matches!(outcome, Attempt::Fresh(_));
        self.handle(outcome, plan);
        if let (true, Some(c)) = (leading, coordinator) {
            let mut state = engine.portable();
            state.last_error = self.parts.state.borrow().last_error.clone();
            let expires_at = self
                .parts
                .state
                .borrow()
                .token
                .as_ref()
                .map(|t| t.expires_at);
            if c.share(state, fresh, expires_at).await {
                if fresh {
                    let me = c.me().to_owned();
                    self.publish(|s| s.cluster_mut().refreshed_by = Some(me));
                }
            } else {
                tracing::warn!(account = %name, "the shared state moved on while refreshing: taking what is shared");
                self.follow(engine, c, plan).await;
            }
        }
        Then::Wait
    }

    /// Plans and publishes after an attempt or a delivery retry.
    pub(super) fn handle(&mut self, outcome: Attempt, plan: &mut Plan) {
        let now = Instant::now();
        match outcome {
            Attempt::Cancelled => {}
            Attempt::Fresh(token) => {
                let wall = self.now();
                let lifetime = token.expires_at.duration_since(wall).unwrap_or_default();
                let jitter = rand::Rng::gen(&mut rand::thread_rng());
                let delay =
                    schedule::refresh_delay(&self.account().options.schedule, lifetime, jitter);
                let recovered = self.parts.state.borrow().failures > 0;
                tracing::info!(
                    account = %self.account().name,
                    status = "fresh",
                    expires_in = lifetime.as_secs(),
                    next_refresh_in = delay.as_secs(),
                    "token refreshed{}",
                    if recovered { " (recovered)" } else { "" }
                );
                self.publish(|s| {
                    s.status = Status::Fresh;
                    s.token = Some(token);
                    s.last_refresh = Some(wall);
                    s.last_error = None;
                    s.failures = 0;
                    s.attempted = true;
                });
                plan.next = now + delay;
                plan.hold_until = None;
                plan.redeliver = None;
            }
            Attempt::Failed(f) => {
                let failures = self.parts.state.borrow().failures + 1;
                match (&f.class, &f.fetched) {
                    (ErrorClass::Local, Some(token)) => {
                        // The token is good: serve it, retry only its delivery, and
                        // refresh when it is due as if the files had been written.
                        // (A token whose refresh token is not saved yet is not served.)
                        let lifetime = token
                            .expires_at
                            .duration_since(self.now())
                            .unwrap_or_default();
                        if plan.redeliver.is_none() {
                            if f.publish {
                                let token = token.clone();
                                let wall = self.now();
                                self.publish(|s| {
                                    s.token = Some(token);
                                    s.last_refresh = Some(wall);
                                });
                            }
                            let jitter = rand::Rng::gen(&mut rand::thread_rng());
                            plan.next = now
                                + schedule::refresh_delay(
                                    &self.account().options.schedule,
                                    lifetime,
                                    jitter,
                                );
                        }
                        plan.redeliver = Some(now + f.retry_in);
                    }
                    _ => {
                        plan.next = now + f.retry_in;
                        plan.hold_until = (f.class == ErrorClass::Rejected).then_some(plan.next);
                    }
                }
                self.fail(&f, failures);
            }
        }
        self.publish_next(plan.next);
    }

    pub(super) fn fail(&mut self, f: &Failed, failures: u32) {
        let now = self.now();
        let message = &f.message;
        let changed = self.parts.state.borrow().last_error.as_deref() != Some(message);
        let retry_in = f.retry_in.as_secs();
        let name = &self.parts.account.name;
        match f.class {
            ErrorClass::Rejected if changed => tracing::error!(
                account = %name,
                status = "failing",
                retry_in,
                "token request refused: {message}; holding off so a wrong secret cannot lock the account"
            ),
            ErrorClass::Local if changed => tracing::error!(
                account = %name,
                status = "failing",
                retry_in,
                "local failure, the provider is not asked again because of it: {message}"
            ),
            _ if changed => {
                tracing::warn!(account = %name, status = "failing", failures, retry_in, "token request failed: {message}")
            }
            _ => {
                tracing::debug!(account = %name, failures, retry_in, "failed again: {message}")
            }
        }
        let message = message.clone();
        self.publish(|s| {
            s.failures = failures;
            s.attempted = true;
            s.last_error = Some(message);
            s.status = if s.token.is_some() && s.valid_token(now).is_none() {
                Status::Expired
            } else {
                Status::Failing
            };
        });
    }
}
