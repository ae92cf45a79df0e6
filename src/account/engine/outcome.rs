//! After an attempt: what its outcome does to the saved state (accepted, failed,
//! failed locally), the delivery to outputs and hooks and its retry, and the last save
//! when the account stops.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::*;
use crate::account::hooks;
use crate::account::persist::{self, Saved, WaitKind};
use crate::account::schedule::{self, ErrorClass};
use crate::account::slots::RefreshPermit;
use crate::config::{Account, Secret};
use crate::oauth::dpop::DpopKey;
use crate::oauth::{Endpoint, Token};
use crate::output;

impl<E: Endpoint> Engine<E> {
    /// Records a new token (state first), then delivers it.
    pub(super) async fn accept(
        &mut self,
        token: Arc<Token>,
        cancel: &CancellationToken,
        permit: Option<RefreshPermit<'_>>,
    ) -> Attempt {
        self.saved.record(&self.account, &token);
        self.saved
            .bind_token(self.dpop_key().map(|k| k.thumbprint()));
        self.unsaved = true;
        self.undelivered = Some(token);
        self.finish_delivery(!cancel.is_cancelled(), permit).await
    }

    /// Retries the delivery of a fetched token after a local failure (no request).
    pub async fn retry_delivery(&mut self, cancel: &CancellationToken) -> Attempt {
        self.finish_delivery(!cancel.is_cancelled(), None).await
    }

    /// Saves the state if it holds an unsaved token, then writes the outputs and runs
    /// the hooks. A rotated refresh token is on disk before its access token is
    /// published; other grants publish even if the state cannot be saved. The refresh
    /// `permit`, if any, is held until the files are written (not through the hooks):
    /// an attempt in flight holds a few KiB, and with the permit released at the answer,
    /// accounts waiting for the blocking threads that write files piled up by the
    /// thousand at start (issue #11).
    pub(super) async fn finish_delivery(
        &mut self,
        run_hooks: bool,
        permit: Option<RefreshPermit<'_>>,
    ) -> Attempt {
        let Some(token) = self.undelivered.clone() else {
            return Attempt::Cancelled;
        };
        let mut problem = None;
        if self.unsaved {
            match self.save().await {
                Ok(()) => self.unsaved = false,
                Err(e) if self.rotates() => {
                    return Attempt::Failed(self.local(
                        format!("{e}; the new token is kept in memory and published once its refresh token is saved"),
                        Some(token),
                        false,
                    ));
                }
                Err(e) => problem = Some(e.to_string()),
            }
        }
        if let Err(e) = deliver(&self.account, token.clone(), false).await {
            return Attempt::Failed(self.local(
                format!("{e}; the token is kept and only the write is retried"),
                Some(token),
                true,
            ));
        }
        if let Some(e) = problem {
            return Attempt::Failed(self.local(e, Some(token), true));
        }
        self.undelivered = None;
        self.local_failures = 0;
        drop(permit);
        if run_hooks {
            hooks::run(&self.account, token.expires_at).await;
        }
        Attempt::Fresh(token)
    }

    pub(super) fn local(
        &mut self,
        message: String,
        fetched: Option<Arc<Token>>,
        publish: bool,
    ) -> Failed {
        self.local_failures += 1;
        Failed {
            class: ErrorClass::Local,
            message,
            retry_in: schedule::backoff(self.local_failures, &mut rand::thread_rng()),
            fetched,
            publish,
        }
    }

    /// Classifies a failed request, records the wait it leads to, and saves it.
    pub(super) async fn failed(&mut self, e: &crate::oauth::Error) -> Failed {
        let mut saved_link = None;
        if let Some(rt) = e.rotated_refresh_token() {
            // The provider answered, and may have rotated the chain with this answer:
            // its refresh token is kept (and fsynced) whatever else is wrong with it.
            if self.saved.record_rotation(&self.account, rt) {
                saved_link = Some(self.save().await);
            }
        }
        let class = schedule::classify(e);
        let now = self.now();
        let policy = self.account.options.schedule;
        let kind = match class {
            ErrorClass::Local => return self.local(crate::oauth::error_chain(e), None, false),
            ErrorClass::Transient => {
                self.saved.failures += 1;
                WaitKind::Backoff
            }
            ErrorClass::RateLimited(until) => {
                self.saved.failures += 1;
                self.shared
                    .providers
                    .limit(self.account.token_url.configured(), until, now);
                WaitKind::RateLimit
            }
            ErrorClass::Rejected => {
                self.saved.refusals += 1;
                WaitKind::Hold
            }
        };
        let mut retry_in = schedule::retry_delay(
            class,
            self.saved.failures,
            self.saved.refusals,
            &policy,
            now,
            &mut rand::thread_rng(),
        );
        // A refresh_token request that timed out may have been answered by a provider
        // that rotated the chain: its reuse grace window (seconds to a minute) is the
        // only way to learn the next link, so the first retry comes at once.
        let at_risk = self.rotates() && matches!(e, crate::oauth::Error::Timeout { .. });
        if at_risk && self.saved.failures <= 1 {
            retry_in = Duration::ZERO;
        }
        self.saved.record_wait(kind, now + retry_in, &self.account);
        self.save_quietly().await;
        let message = crate::oauth::error_chain(e);
        let message = match (self.rotates(), class) {
            (true, ErrorClass::Rejected) => {
                format!("{message}; the refresh token was refused: configure a new refresh_token")
            }
            _ if at_risk => format!(
                "{message}; the refresh-token chain is at risk: the provider may have rotated it with an answer that never came (retried at once, within its reuse grace window)"
            ),
            _ => message,
        };
        let message = match saved_link {
            Some(Ok(())) => format!("{message}; the rotated refresh token it carried is saved"),
            Some(Err(err)) => format!(
                "{message}; the rotated refresh token it carried is kept in memory, saving it failed: {err}"
            ),
            None => message,
        };
        Failed {
            class,
            message,
            retry_in,
            fetched: None,
            publish: false,
        }
    }

    /// Saves the state, if there is a state directory.
    pub(super) async fn save(&self) -> std::io::Result<()> {
        let Some(dir) = self.shared.state_dir.clone() else {
            return Ok(());
        };
        let (account, saved) = (self.account.clone(), self.saved.clone());
        tokio::task::spawn_blocking(move || persist::save(&dir, &account, &saved))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }

    /// [`Engine::save`] where a failure costs only a request after a restart: logged.
    pub(super) async fn save_quietly(&self) {
        if let Err(e) = self.save().await {
            tracing::error!(account = %self.account.name, "{e}");
        }
    }

    /// Ends the engine: the state is saved one last time, and retired (moved to
    /// `state_dir/retired/`) if the account was removed. The lock goes with `self`.
    /// Returns the state, for the account's next engine in this process (a reload).
    pub async fn close(self, retire: bool) -> Saved {
        if self.unsaved {
            self.save_quietly().await;
        }
        if let (true, Some(dir)) = (retire, self.shared.state_dir.clone()) {
            let name = self.account.name.clone();
            let retired = tokio::task::spawn_blocking(move || persist::retire(&dir, &name))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            if let Err(e) = retired {
                tracing::error!(account = %self.account.name, "failed to retire the state: {e}");
            }
        }
        self.saved
    }
}

/// The DPoP key of a `token_binding = "dpop"` account: `dpop_key`, else the one kept in
/// `state_dir` (made there the first time). Errors name the file, never the key.
pub(super) fn dpop_key(
    account: &Account,
    state_dir: Option<&std::path::Path>,
) -> Result<(DpopKey, Secret), String> {
    let config = account
        .dpop
        .as_ref()
        .expect("called for DPoP accounts only");
    match (&config.key, state_dir) {
        (Some(spec), _) => {
            let pem = spec
                .read()
                .map_err(|e| format!("failed to read the dpop_key: {e}"))?;
            let key = DpopKey::from_pem(&pem, config.alg)
                .map_err(|e| format!("failed to use the dpop_key: {} {e}", spec.describe()))?;
            Ok((key, pem))
        }
        (None, Some(dir)) => persist::dpop_key::load_or_make(dir, &account.name, config.alg),
        (None, None) => Err("token_binding = \"dpop\" without dpop_key needs a state_dir".into()),
    }
}

/// Writes every output of `account` with `token`, then runs its hooks if `hooks`.
pub async fn deliver(account: &Arc<Account>, token: Arc<Token>, hooks: bool) -> Result<(), String> {
    let (a, t) = (account.clone(), token.clone());
    tokio::task::spawn_blocking(move || output::write_all(&a, &t))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        .map_err(|e| e.to_string())?;
    if hooks {
        hooks::run(account, token.expires_at).await;
    }
    Ok(())
}
