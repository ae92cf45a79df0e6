//! The loop's cluster side: claiming a link before it is sent, news from the cluster,
//! taking turns, following the leader's shared state, and timing a shared token.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::account::coordinator::{Claim, Coordinator, Turn};
use crate::account::engine::Engine;
use crate::account::persist::WaitKind;
use crate::account::schedule::{self};
use crate::account::state::Status;
use crate::oauth::{Endpoint, Token};

/// How soon a member that does not lead looks again when a refresh is due (the
/// leader's token normally arrives first, through the watch).
const CLUSTER_RECHECK: Duration = Duration::from_secs(5);

/// How soon a leader looks again after the cluster refused its claim for good (another
/// identity spent the seed, a record that does not open): an operator has to act.
const CLUSTER_REFUSED_RECHECK: Duration = Duration::from_secs(60);

/// Counts a chain's claimed refresh as on the wire until its answer is shared: the
/// daemon's shutdown waits for it (`rotations`), as for the request itself.
pub(super) struct Sharing<'a>(&'a tokio::sync::watch::Sender<usize>);

impl<'a> Sharing<'a> {
    pub(super) fn start(tx: &'a tokio::sync::watch::Sender<usize>) -> Self {
        tx.send_modify(|n| *n += 1);
        Sharing(tx)
    }
}

impl Drop for Sharing<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// What news from the cluster means for this member.
pub(super) enum ClusterNews {
    Stop,
    /// Nothing to do now.
    Nothing,
    /// It leads and the token is due.
    Due,
    /// It leads and another member asked for a refresh.
    Asked {
        force: bool,
    },
}

/// Resolves when the coordinator says shared state changed; never without one.
pub(super) async fn changed(c: &mut Option<Box<dyn Coordinator>>) {
    match c {
        Some(c) => c.changed().await,
        None => std::future::pending().await,
    }
}

impl<'a, E: Endpoint> Task<'a, E> {
    /// Cluster mode: claims the link the engine is about to send. `Ok` with the member
    /// whose request with it died mid-way, if any; `Err` when nothing is to be sent now
    /// (`plan` says when to look again).
    pub(super) async fn claim(
        &mut self,
        engine: &mut Engine<E>,
        c: &dyn Coordinator,
        plan: &mut Plan,
    ) -> Result<Option<String>, ()> {
        let name = &self.account().name;
        let claim = c.claim(engine.portable()).await;
        let now = Instant::now();
        match claim {
            Claim::Go { after } => return Ok(after),
            Claim::Wait { until, why } => {
                // Said once per wait (each claim has its own end).
                if plan.next != until {
                    tracing::info!(account = %name, "{why}");
                    self.parts.shared.metrics.cluster_link_wait(name);
                }
                plan.next = until;
            }
            Claim::Lost => {
                self.follow(engine, c, plan).await;
                if plan.next <= now {
                    plan.next = now + Duration::from_secs(1);
                }
            }
            Claim::Refuse(why) => {
                tracing::error!(account = %name, status = "failing", "{why}");
                let w = why.clone();
                self.publish(|s| {
                    s.last_error = Some(w);
                    s.attempted = true;
                });
                plan.next = now + CLUSTER_REFUSED_RECHECK;
            }
        }
        self.settle_status();
        self.publish_next(plan.next);
        Err(())
    }

    /// After an attempt that was not made: the status says what the account holds again.
    pub(super) fn settle_status(&self) {
        let now = self.now();
        self.publish(|s| {
            if s.status == Status::Refreshing {
                s.status = if s.valid_token(now).is_none() && s.token.is_some() {
                    Status::Expired
                } else if s.last_error.is_some() {
                    Status::Failing
                } else if s.token.is_some() {
                    Status::Fresh
                } else {
                    Status::Pending
                };
            }
        });
    }

    /// Cluster mode, on news from the cluster: takes what others shared, and says
    /// whether this member (leading) has a refresh to make now: one another member
    /// asked for, or a due one (a new leader refreshes a due token at once, not at
    /// the next look).
    pub(super) async fn cluster_news(
        &mut self,
        engine: &mut Engine<E>,
        c: &dyn Coordinator,
        plan: &mut Plan,
    ) -> ClusterNews {
        self.follow(engine, c, plan).await;
        // A leader that left frees its key: take the lead now, not when the token
        // falls due (failover within the lease's time to live).
        let turn = tokio::select! {
            _ = self.cancel.cancelled() => return ClusterNews::Stop,
            t = c.turn() => t,
        };
        let leader = match &turn {
            Turn::Lead => Some(c.me().to_owned()),
            Turn::Follow(other) => Some(other.clone()),
            Turn::Alone | Turn::Wait => None,
        };
        self.publish(|s| {
            let c = s.cluster_mut();
            c.degraded = leader.is_none();
            c.leader = leader;
        });
        if turn != Turn::Lead {
            return ClusterNews::Nothing;
        }
        if let Some(force) = c.asked().await {
            return ClusterNews::Asked { force };
        }
        if self.cluster_due(engine) {
            ClusterNews::Due
        } else {
            ClusterNews::Nothing
        }
    }

    /// Cluster mode: whether the account's token is due by its own schedule (or there
    /// is none), and no wait (a hold, a rate limit, a backoff) is on.
    pub(super) fn cluster_due(&self, engine: &Engine<E>) -> bool {
        let now = self.now();
        if engine.wait().is_some_and(|(until, _)| until > now) {
            return false;
        }
        // The published token: timed as the cluster times it.
        let token = self.parts.state.borrow().valid_token(now).cloned();
        match token {
            None => true,
            Some(t) => {
                let policy = &self.account().options.schedule;
                now >= t.issued_at + schedule::refresh_delay(policy, t.lifetime(), 1.0)
            }
        }
    }

    /// Cluster mode: the shared token, timed on this member's clock, when it is valid
    /// and this member serves no valid token.
    pub(super) fn unserved(
        &self,
        shared: &crate::account::coordinator::Shared,
    ) -> Option<Arc<Token>> {
        let (issued_at, expires_at) = shared.times?;
        let now = self.now();
        if expires_at <= now || self.parts.state.borrow().valid_token(now).is_some() {
            return None;
        }
        let t = shared.state.token.as_ref()?.to_token();
        Some(Arc::new(Token {
            issued_at,
            expires_at,
            ..t
        }))
    }

    /// Serves the token the engine adopted from the cluster's `shared` record, timed
    /// to the millisecond, and plans this member's next look by its lifetime.
    async fn serve_adopted(
        &mut self,
        engine: &mut Engine<E>,
        token: Arc<Token>,
        shared: &crate::account::coordinator::Shared,
        plan: &mut Plan,
    ) {
        // Timed to the millisecond (the engine keeps whole seconds).
        let token = match shared.times {
            Some((issued_at, expires_at)) => Arc::new(Token {
                issued_at,
                expires_at,
                ..(*token).clone()
            }),
            None => token,
        };
        let by = shared.fetched_by.clone();
        match engine.deliver(token.clone(), true).await {
            Ok(()) => {
                tracing::info!(account = %self.account().name, refreshed_by = %by, "took the token another member fetched");
            }
            Err(e) => {
                tracing::error!(account = %self.account().name, "{e}");
                plan.redeliver = Some(Instant::now() + Duration::from_secs(1));
            }
        }
        let wall = self.now();
        let lifetime = token.expires_at.duration_since(wall).unwrap_or_default();
        let jitter = rand::Rng::gen(&mut rand::thread_rng());
        let delay = schedule::refresh_delay(&self.account().options.schedule, lifetime, jitter);
        plan.next = Instant::now() + delay;
        self.publish(|s| {
            s.status = Status::Fresh;
            s.token = Some(token.clone());
            s.last_refresh = Some(token.issued_at);
            s.last_error = None;
            s.failures = 0;
            s.attempted = true;
            s.cluster_mut().refreshed_by = Some(by);
        });
    }

    /// Cluster mode: serves the token timed as the cluster times it (by the lifetime it
    /// had left, on the monotonic clock), when that is more than two seconds off its
    /// times now: this member's wall clock was set since. No etcd call: also while cut off.
    pub(super) async fn retime(&mut self, engine: &Engine<E>, c: &dyn Coordinator) {
        let token = {
            let s = self.parts.state.borrow();
            let Some(mine) = s.token.clone() else { return };
            let Some((issued_at, expires_at)) = c.timed(&mine) else {
                return;
            };
            let apart = match expires_at.duration_since(mine.expires_at) {
                Ok(d) => d,
                Err(e) => e.duration(),
            };
            if apart <= Duration::from_secs(2) {
                return;
            }
            Arc::new(Token {
                issued_at,
                expires_at,
                ..(*mine).clone()
            })
        };
        tracing::info!(account = %self.account().name, "the wall clock moved: the shared token is timed anew");
        if let Err(e) = engine.deliver(token.clone(), false).await {
            tracing::error!(account = %self.account().name, "{e}");
        }
        let now = self.now();
        self.publish(|s| {
            if s.status == Status::Expired && token.is_valid_at(now) {
                s.status = Status::Fresh;
            }
            s.token = Some(token);
        });
    }

    /// Cluster mode, when a refresh is due: whose turn it is. `Some(true)` when this
    /// instance leads and should ask the provider, `Some(false)` when it is cut off and
    /// allowed to on its own, `None` when it does not ask (another leads, a fresher
    /// shared token came, or the cluster is out of reach): `plan` says when to look again.
    pub(super) async fn turn(
        &mut self,
        engine: &mut Engine<E>,
        c: &dyn Coordinator,
        plan: &mut Plan,
        force: bool,
        asked: bool,
    ) -> Option<bool> {
        let recheck = Instant::now() + CLUSTER_RECHECK;
        let turn = tokio::select! {
            // etcd may be slow to say it is out of reach: stopping does not wait for it.
            _ = self.cancel.cancelled() => return None,
            t = c.turn() => t,
        };
        match turn {
            Turn::Lead => {
                let me = c.me().to_owned();
                self.publish(|s| {
                    let c = s.cluster_mut();
                    c.leader = Some(me);
                    c.degraded = false;
                });
                // Taking over: a fresh token another member shared, or its hold, first.
                self.follow(engine, c, plan).await;
                let now = Instant::now();
                let held = plan.hold_until.is_some_and(|h| h > now);
                // A wait the cluster shares (a rate limit, a hold) holds asked refreshes too.
                let waiting = engine
                    .wait()
                    .is_some_and(|(until, kind)| until > self.now() && kind != WaitKind::Backoff);
                let due = asked || plan.next <= now || self.cluster_due(engine);
                if !force && (held || waiting || !due) {
                    self.publish_next(plan.next);
                    return None;
                }
                Some(true)
            }
            Turn::Follow(leader) => {
                // Due: look again soon. Asked: readers waiting for the answer see that
                // it comes soon (it normally comes through the watch before that). Said
                // with the leader, in one change: a reader takes the first as the answer.
                if plan.next <= Instant::now() {
                    plan.next = recheck;
                } else if force || asked {
                    plan.next = plan.next.min(recheck);
                }
                let next = self.wall(plan.next);
                self.publish(|s| {
                    let c = s.cluster_mut();
                    c.leader = Some(leader.clone());
                    c.degraded = false;
                    s.next_attempt = Some(next);
                });
                // The leader's token normally comes through the watch; look anyway.
                self.follow(engine, c, plan).await;
                if force || asked {
                    // The leader makes it (exactly one refresh for the cluster).
                    if c.ask_leader(force).await {
                        tracing::info!(account = %self.account().name, leader = %leader, force, "asked the leader for a refresh");
                    }
                }
                self.publish_next(plan.next);
                None
            }
            Turn::Alone => {
                tracing::warn!(account = %self.account().name, "cluster unreachable: refreshing on this member alone (on_cluster_loss = \"refresh\")");
                self.publish(|s| {
                    let c = s.cluster_mut();
                    c.leader = None;
                    c.degraded = true;
                });
                Some(false)
            }
            Turn::Wait => {
                self.publish(|s| {
                    let c = s.cluster_mut();
                    c.leader = None;
                    c.degraded = true;
                });
                plan.next = recheck;
                self.publish_next(plan.next);
                None
            }
        }
    }

    /// Cluster mode: the status says what the coordinator warns of, if it changed.
    fn publish_warning(&self, c: &dyn Coordinator) {
        let warning = c.warning();
        if self.parts.state.borrow().cluster().warning != warning {
            self.publish(|s| s.cluster_mut().warning = warning);
        }
    }

    /// Cluster mode: takes over what other members shared (a newer token is delivered
    /// and served; a hold or rate limit is honoured here too).
    pub(super) async fn follow(
        &mut self,
        engine: &mut Engine<E>,
        c: &dyn Coordinator,
        plan: &mut Plan,
    ) {
        self.publish_warning(c);
        let shared = tokio::select! {
            _ = self.cancel.cancelled() => return,
            s = c.shared() => s,
        };
        // What it read may have been refused (another key, an older generation).
        self.publish_warning(c);
        let Some(shared) = shared else {
            return;
        };
        // The cluster orders tokens by its records' generations, not by this member's
        // wall clock: a clock set back since this member took its token must not make
        // the newer token look older to the engine. (Its times are left as the record
        // timed them: an `issued_at` carried over from before the clock was set made
        // tokens that were issued after they expired, which a restart then scheduled
        // minutes late.)
        let taken = engine.adopt(&shared.state, shared.newer).await;
        if let Some(key) = engine.dpop_key() {
            // The key another member shared goes with its token (SPEC §9).
            if !self
                .parts
                .state
                .borrow()
                .dpop
                .as_ref()
                .is_some_and(|k| Arc::ptr_eq(k, &key))
            {
                self.publish(|s| s.dpop = Some(key));
            }
        }
        if let Some(token) = taken {
            self.serve_adopted(engine, token, &shared, plan).await;
        } else if let Some(token) = self.unserved(&shared) {
            // The cluster's token, which the engine holds already but which is not
            // served: its saved copy looked expired at the start (this member's wall
            // clock was set while it was stopped).
            let by = shared.fetched_by.clone();
            if let Err(e) = engine.deliver(token.clone(), false).await {
                tracing::error!(account = %self.account().name, "{e}");
            }
            tracing::info!(account = %self.account().name, refreshed_by = %by, "serving the cluster's token, timed by the lifetime it has left");
            self.publish(|s| {
                s.status = Status::Fresh;
                s.token = Some(token.clone());
                s.last_refresh = Some(token.issued_at);
                s.attempted = true;
                s.cluster_mut().refreshed_by = Some(by);
            });
        } else {
            self.retime(engine, c).await;
        }
        if let Some((until, kind)) = engine.wait() {
            let wait = until.duration_since(self.now()).unwrap_or_default();
            plan.next = plan.next.max(Instant::now() + wait);
            if kind == WaitKind::Hold {
                plan.hold_until = Some(plan.next);
            }
            // The leader's failure is the account's: shown here too.
            if let Some(e) = &shared.state.last_error {
                let (now, message) = (self.now(), format!("{e} (at {})", shared.fetched_by));
                self.publish(|s| {
                    s.last_error = Some(message);
                    s.attempted = true;
                    s.status = if s.token.is_some() && s.valid_token(now).is_none() {
                        Status::Expired
                    } else {
                        Status::Failing
                    };
                });
            }
        }
        self.publish_next(plan.next);
    }
}
