//! The loop's clocks: when the held token expires (on the boot clock, so a wall clock
//! set does not move it and a suspend does), what its expiry does, and when the
//! provider may be asked again.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::*;
use crate::account::engine::Engine;
use crate::account::state::Status;
use crate::oauth::{Endpoint, Token};
use crate::output;

impl<'a, E: Endpoint> Task<'a, E> {
    /// Until when the provider (every account on this `token_url`) is rate-limited, on
    /// tokio's clock, if it is now.
    pub(super) fn provider_gate(&self) -> Option<Instant> {
        let now = self.now();
        let until = self
            .parts
            .shared
            .providers
            .gate(self.account().token_url.configured(), now)?;
        let wait = until.duration_since(now).unwrap_or_default();
        tracing::info!(account = %self.account().name, wait = wait.as_secs(), "provider rate-limited: waiting");
        Some(Instant::now() + wait)
    }

    /// The wall-clock time of a point on tokio's clock.
    pub(super) fn wall(&self, at: Instant) -> SystemTime {
        self.now() + at.saturating_duration_since(Instant::now())
    }

    /// The boot-clock time of a point on tokio's clock.
    pub(super) fn boot_at(&self, at: Instant) -> Duration {
        self.parts.shared.clock.boot() + at.saturating_duration_since(Instant::now())
    }

    /// The held token's expiry on the boot clock (timed now if it is new to this task).
    pub(super) fn deadline(&mut self) -> Option<Duration> {
        let expires_at = self.parts.state.borrow().token.as_ref()?.expires_at;
        match self.timed {
            Some(t) if t.expires_at == expires_at => Some(t.deadline),
            _ => {
                let clock = self.parts.shared.clock;
                let left = expires_at.duration_since(clock.now()).unwrap_or_default();
                let deadline = clock.boot() + left;
                self.timed = Some(Timed {
                    expires_at,
                    deadline,
                });
                Some(deadline)
            }
        }
    }

    /// Whether the wall clock was set since the held token was timed: its `expires_at`
    /// is more than two seconds off what the boot clock says is left of it.
    pub(super) fn wall_was_set(&mut self) -> bool {
        let Some(deadline) = self.deadline() else {
            return false;
        };
        let Some(Timed { expires_at, .. }) = self.timed else {
            return false;
        };
        let clock = self.parts.shared.clock;
        let by_boot = clock.now() + deadline.saturating_sub(clock.boot());
        let apart = match by_boot.duration_since(expires_at) {
            Ok(d) => d,
            Err(e) => e.duration(),
        };
        // A token past its time by both clocks is not timed anew: it expired.
        apart > Duration::from_secs(2) && deadline > clock.boot()
    }

    /// Without a cluster: serves the held token with its times moved by as much as the
    /// wall clock was set (written to its outputs and state again, without hooks).
    pub(super) async fn retime_alone(&mut self, engine: &Engine<E>) {
        let Some(deadline) = self.deadline() else {
            return;
        };
        let clock = self.parts.shared.clock;
        let token = {
            let s = self.parts.state.borrow();
            let Some(mine) = s.token.clone() else { return };
            let expires_at = clock.now() + deadline.saturating_sub(clock.boot());
            let lifetime = mine
                .expires_at
                .duration_since(mine.issued_at)
                .unwrap_or_default();
            Arc::new(Token {
                issued_at: expires_at.checked_sub(lifetime).unwrap_or(expires_at),
                expires_at,
                ..(*mine).clone()
            })
        };
        tracing::info!(account = %self.account().name, "the wall clock was set: the token is timed anew by the lifetime it has left");
        if let Err(e) = engine.deliver(token.clone(), false).await {
            tracing::error!(account = %self.account().name, "{e}");
        }
        self.timed = Some(Timed {
            expires_at: token.expires_at,
            deadline,
        });
        self.publish(|s| s.token = Some(token));
    }

    /// Whether the expiry of `t` was acted on already.
    pub(super) fn expiry_handled(&self, t: &Token) -> bool {
        self.expired
            .as_ref()
            .is_some_and(|e| e.expires_at == t.expires_at)
    }

    /// Whether the held token has expired (by the boot clock: the lifetime the
    /// provider gave it has run out) and was not yet acted on.
    pub(super) fn token_expired(&mut self) -> bool {
        let Some(deadline) = self.deadline() else {
            return false;
        };
        let s = self.parts.state.borrow();
        s.token
            .as_ref()
            .is_some_and(|t| !self.expiry_handled(t) && self.parts.shared.clock.boot() >= deadline)
    }

    /// The token expired before a new one came: readers stop getting it, and outputs go
    /// (unless `on_expiry = "keep"`).
    pub(super) fn expire(&mut self) {
        self.expired = self.parts.state.borrow().token.clone();
        let removed = output::remove_all(self.account());
        tracing::warn!(account = %self.account().name, status = "expired", "token expired without renewal");
        self.parts
            .shared
            .metrics
            .token_expired(&self.account().name);
        if let Err(e) = removed {
            tracing::error!(account = %self.account().name, "{e}");
        }
        self.publish(|s| s.status = Status::Expired);
    }

    /// When the held token expires, on tokio's clock, unless that was already handled.
    pub(super) fn expiry_instant(&mut self) -> Option<Instant> {
        let deadline = self.deadline()?;
        let s = self.parts.state.borrow();
        if self.expiry_handled(s.token.as_ref()?) {
            return None;
        }
        let left = deadline.saturating_sub(self.parts.shared.clock.boot());
        Some(Instant::now() + left)
    }
}
