//! The one refresh lifecycle of an account (STYLE.md principle 10), used by `run`
//! (through `task`, which only schedules) and by `once`: take the account's lock in the
//! state directory, restore its saved state, make an attempt, classify the result by
//! SPEC §6's table, save, and deliver (outputs, then hooks).
//!
//! The engine alone owns an account's saved state, and so the only copy of a rotated
//! refresh token. Its rules, each a promise of SPEC §6:
//! - a refresh_token request, once sent, is never abandoned (its answer holds the next
//!   refresh token); the rotated token is saved, fsynced, before the access token that
//!   came with it is published;
//! - a refusal holds the account, and each further refusal in a row doubles the hold;
//! - a local failure (a write, a secret) never turns into another provider request: a
//!   fetched token is kept and only its delivery is retried.
//!
//! Here: opening (the lock, the saved state) and the attempt. What every engine shares
//! is in `shared`; what an attempt's outcome does (save, deliver, hold) in `outcome`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::identity::SiblingKey;
use super::persist::{self, AccountLock, Loaded, Locked, Saved, WaitKind};
use super::schedule::{self, ErrorClass};
use super::slots::RefreshPermit;
use crate::config::{Account, Grant, Secret};
use crate::oauth::dpop::DpopKey;
use crate::oauth::{Endpoint, Token};

mod outcome;
mod shared;

pub use outcome::deliver;
use outcome::dpop_key;
use shared::SiblingCell;
pub use shared::{Common, Providers, Shared, Siblings};

/// How soon an account whose chain another account runs looks again (no request).
const CONFLICT_RECHECK: Duration = Duration::from_secs(5);

/// What one attempt came to.
pub enum Attempt {
    /// A new token, saved and delivered.
    Fresh(Arc<Token>),
    Failed(Failed),
    /// Cancelled before a request was sent.
    Cancelled,
}

pub struct Failed {
    pub class: ErrorClass,
    /// Safe to show: no secret, no token.
    pub message: String,
    /// How long before the next try: a request for most classes, the delivery for a
    /// local failure with a fetched token.
    pub retry_in: Duration,
    /// A token that was fetched but not (all) delivered: its delivery is retried.
    pub fetched: Option<Arc<Token>>,
    /// Whether `fetched` may be served meanwhile (not while its rotated refresh token
    /// is unsaved).
    pub publish: bool,
}

/// Counts a refresh_token request on the wire for as long as it lives.
struct Rotation<'a>(&'a watch::Sender<usize>);

impl<'a> Rotation<'a> {
    fn start(tx: &'a watch::Sender<usize>) -> Self {
        tx.send_modify(|n| *n += 1);
        Rotation(tx)
    }
}

impl Drop for Rotation<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// How `once` found the account.
pub enum Opened<E> {
    Ready(Box<Engine<E>>),
    /// Another tokend holds the account's lock; what it said about itself.
    Busy {
        holder: String,
    },
}

pub struct Engine<E> {
    account: Arc<Account>,
    endpoint: Arc<E>,
    shared: Shared,
    saved: Saved,
    _lock: Option<AccountLock>,
    /// A fetched token whose delivery is not complete.
    undelivered: Option<Arc<Token>>,
    /// Whether `saved` holds a token not yet on disk.
    unsaved: bool,
    /// Local failures in a row (the delivery's own backoff).
    local_failures: u32,
    /// Where accounts that ask for exactly the same share their last token.
    sibling: Option<SiblingCell>,
    /// Another account (named) runs the chain this account's seed began: nothing is sent
    /// until it stops and its chain can be taken over ([`persist::load_for`]).
    conflict: Option<Box<str>>,
    /// `token_binding = "dpop"`: the key the token is bound to (`dpop_key`, or the one
    /// kept in `state_dir`, or the one a cluster's leader shares), or why there is none.
    /// None for a bearer account; boxed, as most accounts are (issue #11).
    dpop: Option<Box<Result<BoundKey, String>>>,
}

/// A DPoP account's key, with its PEM for the cluster's sealed record.
struct BoundKey {
    key: Arc<DpopKey>,
    pem: Secret,
}

impl<E: Endpoint> Engine<E> {
    /// For `run`: waits for the account's lock (a `once` may hold it for a moment),
    /// then starts from the newer of `in_memory` (what the account's previous engine in
    /// this process left, after a reload) and the state file. None if cancelled while
    /// waiting.
    pub async fn open(
        account: Arc<Account>,
        endpoint: Arc<E>,
        shared: Shared,
        in_memory: Option<Saved>,
        cancel: &CancellationToken,
    ) -> Option<Self> {
        let mut lock = None;
        if let Some(dir) = shared.state_dir.clone() {
            let mut told = false;
            loop {
                let (d, n) = (dir.clone(), account.name.clone());
                let tried = tokio::task::spawn_blocking(move || persist::try_lock(&d, &n, "run"))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                match tried {
                    Ok(Locked::Acquired(l)) => {
                        lock = Some(l);
                        break;
                    }
                    Ok(Locked::Busy { holder }) => {
                        if !told {
                            tracing::info!(account = %account.name, "waiting for {holder}, which holds this account in {}", dir.display());
                            told = true;
                        }
                    }
                    Err(e) => {
                        // Without the lock the daemon still works; `once` cannot tell.
                        tracing::error!(account = %account.name, "{e}; going on without the account lock");
                        break;
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => return None,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
        Some(Self::start(account, endpoint, shared, in_memory, lock).await)
    }

    /// For `once`: takes the account's lock if it is free.
    pub async fn try_open(
        account: Arc<Account>,
        endpoint: Arc<E>,
        shared: Shared,
    ) -> std::io::Result<Opened<E>> {
        let mut lock = None;
        if let Some(dir) = shared.state_dir.clone() {
            let n = account.name.clone();
            match tokio::task::spawn_blocking(move || persist::try_lock(&dir, &n, "once"))
                .await
                .map_err(std::io::Error::other)??
            {
                Locked::Acquired(l) => lock = Some(l),
                Locked::Busy { holder } => return Ok(Opened::Busy { holder }),
            }
        }
        Ok(Opened::Ready(Box::new(
            Self::start(account, endpoint, shared, None, lock).await,
        )))
    }

    async fn start(
        account: Arc<Account>,
        endpoint: Arc<E>,
        shared: Shared,
        in_memory: Option<Saved>,
        lock: Option<AccountLock>,
    ) -> Self {
        let on_disk = match shared.state_dir.clone() {
            Some(dir) => {
                let a = account.clone();
                tokio::task::spawn_blocking(move || persist::load_for(&dir, &a))
                    .await
                    .unwrap_or_else(|e| Loaded::Damaged(format!("failed to read the state: {e}")))
            }
            None => Loaded::Missing,
        };
        let now = shared.clock.now();
        let mut conflict = None;
        let mut lost = None;
        let mut saved = match (in_memory, on_disk) {
            (Some(m), Loaded::Found(d)) if d.generation() > m.generation() => d,
            (Some(m), _) => m,
            (None, Loaded::Found(d)) => d,
            (None, Loaded::Missing) => Saved::new(&account),
            (None, Loaded::ChainInUse(other)) => {
                conflict = Some(other.into());
                Saved::new(&account)
            }
            (None, Loaded::Damaged(why)) => {
                lost = Some(why);
                Saved::new(&account)
            }
        };
        if let Some(why) = lost {
            if matches!(account.grant, Grant::RefreshToken { .. }) {
                let reason = format!(
                    "the saved state is damaged ({why}); the refresh token in it may be spent, so the configured one is not sent on a guess: restore the state file, or re-seed with `tokend reseed {}` (or configure a new refresh_token)",
                    account.name
                );
                tracing::error!(account = %account.name, "{reason}");
                saved.lose_chain(&account, reason, now);
            } else {
                tracing::error!(account = %account.name, "the saved state is damaged ({why}); starting without it");
            }
        }
        saved.prepare_chain(&account);
        if saved.held_for_other_credentials(&account) {
            tracing::info!(account = %account.name, "the refused credentials were replaced: the hold ends");
            saved.end_hold();
        }
        let dpop = match account.dpop.is_some() {
            true => {
                let (a, dir) = (account.clone(), shared.state_dir.clone());
                let loaded = tokio::task::spawn_blocking(move || dpop_key(&a, dir.as_deref()))
                    .await
                    .unwrap_or_else(|e| Err(format!("failed to load the DPoP key: {e}")))
                    .map(|(key, pem)| BoundKey {
                        key: Arc::new(key),
                        pem,
                    });
                Some(Box::new(loaded))
            }
            false => None,
        };
        match dpop.as_deref() {
            Some(Err(e)) => tracing::error!(account = %account.name, "{e}"),
            Some(Ok(BoundKey { key, .. }))
                if saved.forget_token_bound_elsewhere(&key.thumbprint()) =>
            {
                tracing::info!(account = %account.name, jkt = %key.thumbprint(), "the saved token is bound to another DPoP key than the account's (dpop_key replaced): not served, a new one is asked for");
            }
            _ => {}
        }
        let engine = Engine {
            dpop,
            sibling: SiblingKey::of(&account).map(|k| shared.siblings.cell(&k)),
            account,
            endpoint,
            shared,
            saved,
            _lock: lock,
            undelivered: None,
            unsaved: false,
            local_failures: 0,
            conflict,
        };
        engine.endpoint.use_dpop_key(engine.dpop_key());
        if engine.saved.chain_lost(&engine.account).is_some() {
            // Kept at once: a restart must find the account held, not a missing state.
            engine.save_quietly().await;
        }
        engine
    }

    pub fn account(&self) -> &Arc<Account> {
        &self.account
    }

    /// The DPoP key the account's tokens are bound to (`token_binding = "dpop"`), for
    /// readers' proofs.
    pub fn dpop_key(&self) -> Option<Arc<DpopKey>> {
        self.bound_key().map(|b| b.key.clone())
    }

    fn bound_key(&self) -> Option<&BoundKey> {
        self.dpop.as_deref()?.as_ref().ok()
    }

    fn now(&self) -> SystemTime {
        self.shared.clock.now()
    }

    fn rotates(&self) -> bool {
        matches!(self.account.grant, Grant::RefreshToken { .. })
    }

    /// The saved token, if issued for this request and valid at least `min_valid` more.
    pub fn saved_token(&self, min_valid: Duration) -> Option<Arc<Token>> {
        self.saved
            .token_valid_for(&self.account, self.now(), min_valid)
    }

    /// When a request may be made for this account's request as configured now, if it
    /// changed on a reload and the last request was also for a change, less than
    /// `min_refresh_interval` ago (a config that flaps between two requests).
    pub fn changed_request_not_before(&self) -> Option<SystemTime> {
        self.saved
            .changed_request_not_before(&self.account)
            .filter(|t| *t > self.now())
    }

    /// Whether the saved token for this request has expired.
    pub fn saved_token_expired(&self) -> bool {
        self.saved
            .token(&self.account)
            .is_some_and(|t| !t.is_valid_at(self.now()))
    }

    /// Until when no request may be made, and why: a saved backoff, hold or rate limit,
    /// or another account's rate limit on the same provider.
    pub fn wait(&self) -> Option<(SystemTime, WaitKind)> {
        let now = self.now();
        let saved = self.saved.wait(now, &self.account.options.schedule);
        let provider = self
            .shared
            .providers
            .gate(self.account.token_url.configured(), now)
            .map(|t| (t, WaitKind::RateLimit));
        saved.into_iter().chain(provider).max_by_key(|(t, _)| *t)
    }

    /// Ends a hold after refused credentials: they changed, or the operator forced a try.
    pub async fn end_hold(&mut self) {
        if self.saved.refusals > 0
            || self
                .saved
                .wait(self.now(), &self.account.options.schedule)
                .is_some()
        {
            self.saved.end_hold();
            self.save_quietly().await;
        }
    }

    /// What other cluster members may take over from this account's state.
    pub fn portable(&self) -> super::persist::Portable {
        let mut p = self.saved.portable();
        p.dpop_key = self.bound_key().map(|b| b.pem.expose().to_owned());
        p
    }

    /// Takes over what another member shared (a newer token, the chain's refresh token,
    /// a hold or rate limit), and saves it. `newer`: the cluster ordered its token after
    /// the one held here (whatever their `issued_at` say). Returns the token if it is new
    /// here; the caller delivers it.
    pub async fn adopt(
        &mut self,
        shared: &super::persist::Portable,
        newer: bool,
    ) -> Option<Arc<Token>> {
        let before = self.saved.generation();
        let token = self.saved.adopt(&self.account, shared, newer);
        if token.is_some() {
            // The key goes with the token it is bound to: taken only with a token taken
            // (one of this member's own, newer, stays with this member's key).
            self.adopt_dpop_key(shared.dpop_key.as_deref()).await;
            self.saved
                .bind_token(self.dpop_key().map(|k| k.thumbprint()));
        }
        if self.saved.generation() != before {
            self.save_quietly().await;
        }
        token
    }

    /// Takes the DPoP key another member shares, if it is another key than this one's:
    /// the shared token is bound to it. Kept in `state_dir` unless `dpop_key` is
    /// configured (that file is the operator's).
    async fn adopt_dpop_key(&mut self, pem: Option<&str>) {
        let (Some(config), Some(pem)) = (self.account.dpop.as_deref(), pem) else {
            return;
        };
        if self
            .bound_key()
            .is_some_and(|mine| mine.pem.expose() == pem)
        {
            return;
        }
        let pem = Secret::new(pem);
        let key = match DpopKey::from_pem(&pem, config.alg) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(account = %self.account.name, "the DPoP key another member shares {e}: not taken");
                return;
            }
        };
        if self
            .dpop_key()
            .is_some_and(|mine| mine.thumbprint() == key.thumbprint())
        {
            return;
        }
        tracing::info!(account = %self.account.name, jkt = %key.thumbprint(), "taking the DPoP key the cluster shares");
        if let (None, Some(dir)) = (&config.key, self.shared.state_dir.clone()) {
            let (name, p) = (self.account.name.clone(), pem.clone());
            let saved =
                tokio::task::spawn_blocking(move || persist::dpop_key::save(&dir, &name, &p))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
            if let Err(e) = saved {
                tracing::error!(account = %self.account.name, "{e}");
            }
        }
        let key = Arc::new(key);
        self.endpoint.use_dpop_key(Some(key.clone()));
        self.dpop = Some(Box::new(Ok(BoundKey { key, pem })));
    }

    /// Whether a fetched token still waits for its delivery.
    pub fn has_undelivered(&self) -> bool {
        self.undelivered.is_some()
    }

    /// Writes the outputs for a token that is already saved (a restored one); runs the
    /// hooks if `hooks`.
    pub async fn deliver(&self, token: Arc<Token>, hooks: bool) -> Result<(), String> {
        deliver(&self.account, token, hooks).await
    }

    /// One attempt: a token from an identical account or from the provider, classified,
    /// saved and delivered. Cancellation is honoured until a request is sent, and for
    /// every grant but refresh_token while it is on the wire.
    pub async fn attempt(&mut self, cancel: &CancellationToken) -> Attempt {
        let shared = self.shared.clone();
        let provider = Providers::of(&self.account);
        let permit = tokio::select! {
            _ = cancel.cancelled() => return Attempt::Cancelled,
            p = shared.slots.acquire(&provider) => p,
        };
        self.attempt_with(permit, cancel).await
    }

    /// [`Engine::attempt`] with a permit of [`Common::semaphore`] already taken: `run`
    /// waits for it before it builds an attempt, so that thousands of accounts due at
    /// once wait with a few bytes each, not a whole request each (issue #11). The
    /// permit goes once the provider answered.
    pub async fn attempt_with(
        &mut self,
        permit: RefreshPermit<'_>,
        cancel: &CancellationToken,
    ) -> Attempt {
        if let Some(refused) = self.chain_blocked().await {
            return Attempt::Failed(refused);
        }
        if let Some(Err(e)) = self.dpop.as_deref() {
            // Without its key a DPoP account asks nothing: a token it cannot prove is
            // worth nothing to its readers.
            let e = e.clone();
            return Attempt::Failed(self.local(e, None, false));
        }
        let cell = self.sibling.clone();
        let mut guard = match &cell {
            Some(c) => Some(tokio::select! {
                _ = cancel.cancelled() => return Attempt::Cancelled,
                g = c.lock() => g,
            }),
            None => None,
        };
        if let Some(t) = guard.as_ref().and_then(|g| g.as_ref()) {
            // Newer than this account's own token (the state keeps whole seconds: the
            // same token read back is not newer), and not yet due itself.
            let newer = self
                .saved
                .token(&self.account)
                .is_none_or(|m| t.access_token != m.access_token && t.issued_at >= m.issued_at);
            let due = t.issued_at
                + schedule::refresh_delay(&self.account.options.schedule, t.lifetime(), 1.0);
            if newer && self.now() < due {
                tracing::debug!(account = %self.account.name, "reusing the token an identical account just fetched");
                let t = t.clone();
                drop(guard);
                return self.accept(t, cancel, Some(permit)).await;
            }
        }
        self.endpoint
            .use_refresh_token(self.saved.refresh_token(&self.account));
        if let Some(url) = self.saved.known_token_url(&self.account) {
            self.endpoint.use_known_token_url(url);
        }
        self.saved.record_request(&self.account, self.now());
        let started = Instant::now();
        let result = if self.rotates() {
            // Its answer holds the only copy of the next refresh token: never abandoned.
            let _on_the_wire = Rotation::start(&self.shared.rotations);
            self.endpoint.fetch().await
        } else {
            tokio::select! {
                _ = cancel.cancelled() => return Attempt::Cancelled,
                r = self.endpoint.fetch() => r,
            }
        };
        self.shared
            .metrics
            .refresh_attempt(&self.account.name, &result, started.elapsed());
        if let Some(url) = self.endpoint.discovered_token_url() {
            // Saved with what follows (the token, or the wait after a failure).
            self.saved.record_token_url(&self.account, &url, self.now());
        }
        match result {
            Ok(token) => {
                let token = Arc::new(token);
                if let Some(g) = guard.as_mut() {
                    **g = Some(token.clone());
                }
                drop(guard);
                self.accept(token, cancel, Some(permit)).await
            }
            Err(e) => {
                drop(permit);
                Attempt::Failed(self.failed(&e).await)
            }
        }
    }

    /// Why no request may be sent for this account's chain, if none may: its state was
    /// damaged (held until re-seeded or given a new seed), or another account runs the
    /// chain its seed began (looked at again each time: it may have stopped since).
    /// Nothing is sent either way: a local failure, with a long wait for the first.
    async fn chain_blocked(&mut self) -> Option<Failed> {
        if let (Some(other), Some(dir)) = (self.conflict.clone(), self.shared.state_dir.clone()) {
            let a = self.account.clone();
            let again = tokio::task::spawn_blocking(move || persist::load_for(&dir, &a))
                .await
                .unwrap_or_else(|_| Loaded::ChainInUse(other.into()));
            match again {
                Loaded::ChainInUse(other) => {
                    self.conflict = Some(other.as_str().into());
                    return Some(Failed {
                        class: ErrorClass::Local,
                        message: format!(
                            "the configured refresh_token began the refresh-token chain of account {other:?}, which runs now: two accounts cannot spend one chain (nothing is sent until it stops; remove one of them, or give this one its own refresh_token)"
                        ),
                        retry_in: CONFLICT_RECHECK,
                        fetched: None,
                        publish: false,
                    });
                }
                Loaded::Found(taken) => {
                    self.conflict = None;
                    self.saved = taken;
                    self.saved.prepare_chain(&self.account);
                }
                Loaded::Missing | Loaded::Damaged(_) => self.conflict = None,
            }
        }
        let reason = self.saved.chain_lost(&self.account)?.to_owned();
        Some(Failed {
            class: ErrorClass::Local,
            message: reason,
            retry_in: schedule::HOLD_CAP,
            fetched: None,
            publish: false,
        })
    }

    /// The operator's `tokend reseed` (SPEC §5): the chain, and any hold or wait, end;
    /// the refresh_token configured now is sent by the next request. Saved at once.
    pub async fn reseed(&mut self) -> std::io::Result<()> {
        self.saved.reseed();
        self.conflict = None;
        tracing::warn!(account = %self.account.name, "re-seeded: the refresh-token chain starts again from the configured refresh_token");
        self.save().await
    }
}
