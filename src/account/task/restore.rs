//! The loop's start: the account's engine opened (its lock waited for, stale
//! temporary files cleaned) and its plan restored from the saved state.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::account::engine::{Engine, Failed};
use crate::account::persist::{Saved, WaitKind};
use crate::account::schedule::{self, ErrorClass};
use crate::account::state::{Status, TokenState};
use crate::oauth::Endpoint;
use crate::output;

impl<'a, E: Endpoint> Task<'a, E> {
    /// Cleans stale temporary files (if asked to), then waits for the account's lock and
    /// opens its engine. None if cancelled meanwhile.
    pub(super) async fn open(&self, in_memory: Option<Box<Saved>>) -> Option<Engine<E>> {
        let parts = self.parts;
        if parts.inbox.clean_stale.swap(false, Ordering::SeqCst) {
            let removed = tokio::task::spawn_blocking({
                let a = parts.account.clone();
                move || output::clean_stale(&a)
            })
            .await
            .unwrap_or(0);
            if removed > 0 {
                tracing::info!(account = %parts.account.name, removed, "removed stale temporary files");
            }
        }
        let engine = Engine::open(
            parts.account.clone(),
            parts.endpoint.clone(),
            parts.shared.clone(),
            in_memory.map(|s| *s),
            self.cancel,
        )
        .await?;
        if let Some(key) = engine.dpop_key() {
            parts.state.send_modify(|s| s.dpop = Some(key));
        }
        Some(engine)
    }

    /// Publishes a saved token that is still valid, without asking the provider, and
    /// plans the first request: when that token is due, and not before a saved backoff,
    /// hold or rate limit ends (so a crash loop is no request loop). A saved token that
    /// expired meanwhile takes its outputs with it (unless `on_expiry = "keep"`).
    pub(super) async fn restore(&mut self, engine: &mut Engine<E>) -> Plan {
        let now = self.now();
        let mut plan = Plan {
            next: Instant::now(),
            hold_until: None,
            redeliver: None,
            last_attempt: None,
        };
        if let Some(token) = engine.saved_token(Duration::ZERO) {
            let jitter = rand::Rng::gen(&mut rand::thread_rng());
            // Scheduled from no later than now: a token "issued" in the future (the wall
            // clock was set back since it was saved) is due by the lifetime it has left,
            // never after it expired.
            let issued = token.issued_at.min(now);
            let due = issued
                + schedule::refresh_delay(
                    &self.account().options.schedule,
                    token.expires_at.duration_since(issued).unwrap_or_default(),
                    jitter,
                );
            let wait = due.duration_since(now).unwrap_or_default();
            plan.next += wait;
            match engine.deliver(token.clone(), false).await {
                Ok(()) => {
                    tracing::info!(
                        account = %self.account().name,
                        expires_in = token.expires_at.duration_since(now).unwrap_or_default().as_secs(),
                        next_refresh_in = wait.as_secs(),
                        "serving the saved token"
                    );
                    self.publish(|s| {
                        s.status = Status::Fresh;
                        s.token = Some(token.clone());
                        s.last_refresh = Some(token.issued_at);
                        s.attempted = true;
                    });
                }
                Err(e) => {
                    // Served on the socket meanwhile; the files are retried.
                    self.publish(|s| {
                        s.token = Some(token.clone());
                        s.last_refresh = Some(token.issued_at);
                    });
                    let f = Failed {
                        class: ErrorClass::Local,
                        message: e,
                        retry_in: schedule::backoff(1, &mut rand::thread_rng()),
                        fetched: Some(token),
                        publish: true,
                    };
                    plan.redeliver = Some(Instant::now() + f.retry_in);
                    self.fail(&f, 1);
                }
            }
        } else if engine.saved_token_expired() {
            tracing::warn!(account = %self.account().name, status = "expired", "the saved token expired while tokend was stopped");
            self.publish(|s| s.status = Status::Expired);
            if let Err(e) = output::remove_all(self.account()) {
                tracing::error!(account = %self.account().name, "{e}");
            }
        } else {
            // Nothing for this request: readers must not see another request's token.
            self.publish(|s| {
                *s = TokenState {
                    dpop: s.dpop.take(),
                    ..TokenState::default()
                }
            });
        }
        if let Some(at) = engine.changed_request_not_before() {
            let wait = at.duration_since(now).unwrap_or_default();
            tracing::info!(
                account = %self.account().name,
                wait = wait.as_secs(),
                "the request changed again within min_refresh_interval: waiting before asking the provider"
            );
            plan.next = plan.next.max(Instant::now() + wait);
        }
        if let Some((until, kind)) = engine.wait() {
            let wait = until.duration_since(now).unwrap_or_default();
            let held = kind == WaitKind::Hold;
            tracing::info!(
                account = %self.account().name,
                wait = wait.as_secs(),
                "{}",
                match kind {
                    WaitKind::Hold => "still holding: the provider refused these credentials before",
                    WaitKind::RateLimit => "still waiting: the provider rate-limited this account",
                    WaitKind::Backoff => "waiting as planned before the restart",
                }
            );
            plan.next = plan.next.max(Instant::now() + wait);
            if held {
                plan.hold_until = Some(plan.next);
            }
        }
        self.publish_next(plan.next);
        plan
    }
}
