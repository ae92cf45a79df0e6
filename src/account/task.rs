//! The refresh loop of one account: wait for the next planned refresh, a "refresh now"
//! poke, the token's expiry or cancellation; fetch under the shared semaphore; write
//! the outputs; run the hooks; plan the next refresh; publish the state.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::SeedableRng as _;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use std::path::PathBuf;

use super::hooks;
use super::persist::{self, Saved};
use super::schedule::{self, ErrorClass};
use super::state::{Status, TokenState};
use crate::clock::Clock;
use crate::config::{Account, Grant};
use crate::oauth::{Endpoint, Token};
use crate::output;

/// What every account task shares.
#[derive(Clone)]
pub struct Shared {
    /// Bounds concurrent token requests (`max_concurrent_refreshes`).
    pub semaphore: Arc<Semaphore>,
    pub clock: Clock,
    /// Woken whenever any account publishes a new state (readiness, STATUS=).
    pub changed: Arc<tokio::sync::Notify>,
    /// Where tokens are kept across restarts (`[daemon] state_dir`).
    pub state_dir: Option<PathBuf>,
    /// Rate limits per provider: accounts that share a `token_url` share its limit.
    pub providers: Arc<Providers>,
    /// Accounts identical in what they ask for share one request.
    pub siblings: Arc<Siblings>,
}

/// How often a waiting task compares the wall clock with its plan (see `run`).
const WALL_CHECK: Duration = Duration::from_secs(30);

/// Why a task is poked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poke {
    /// Refresh now, no sooner than `min_refresh_interval` after the last request, and
    /// not while held after refused credentials.
    Refresh,
    /// A secret file changed: end a hold and ask now.
    CredentialsChanged,
    /// The operator's "I fixed it, try now" (`refresh --force`): one attempt now, even
    /// during a hold after refused credentials or a provider's rate-limit wait.
    Force,
}

/// When each provider may be asked again after a 429.
#[derive(Default)]
pub struct Providers(std::sync::Mutex<std::collections::HashMap<String, SystemTime>>);

impl Providers {
    fn key(url: &url::Url) -> String {
        crate::oauth::request::redacted_url(url)
    }

    /// Records that the provider at `url` asked to wait until `until` (or, with no date,
    /// a short while).
    pub fn limit(&self, url: &url::Url, until: Option<SystemTime>, now: SystemTime) {
        let until = until.unwrap_or(now + Duration::from_secs(1));
        let mut m = self
            .0
            .lock()
            .expect("never poisoned: no panics under the lock");
        let e = m.entry(Self::key(url)).or_insert(until);
        *e = (*e).max(until);
    }

    /// Until when the provider at `url` is not to be asked, if it said so.
    pub fn gate(&self, url: &url::Url) -> Option<SystemTime> {
        self.0
            .lock()
            .expect("never poisoned")
            .get(&Self::key(url))
            .copied()
    }
}

type SiblingCell = Arc<tokio::sync::Mutex<Option<Arc<Token>>>>;

/// The last token fetched for each distinct request, shared by identical accounts.
#[derive(Default)]
pub struct Siblings(std::sync::Mutex<std::collections::HashMap<String, SiblingCell>>);

impl Siblings {
    fn cell(&self, key: &str) -> SiblingCell {
        let mut m = self
            .0
            .lock()
            .expect("never poisoned: no panics under the lock");
        m.entry(key.to_owned()).or_default().clone()
    }
}

/// What makes two accounts' requests the same: endpoint, client, grant, user, scope,
/// parameters, client authentication and where the secrets come from. The
/// refresh_token grant is never shared: each account has its own rotation chain.
fn sibling_key(a: &Account) -> Option<String> {
    if matches!(a.grant, Grant::RefreshToken { .. }) {
        return None;
    }
    // Kept in memory only, never shown: header values count, whatever they are.
    let headers: Vec<(&String, &str)> = a
        .extra_headers
        .iter()
        .map(|(k, v)| (k, v.expose()))
        .collect();
    let secrets: Vec<String> = a
        .secrets()
        .iter()
        .map(|(k, s)| format!("{k}={}", s.describe()))
        .collect();
    Some(format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}|{}",
        persist::Fingerprint::of(a),
        a.client_auth,
        a.basic_encoding,
        a.params_in,
        headers,
        secrets.join(",")
    ))
}

impl Shared {
    pub fn new(max_concurrent_refreshes: usize, clock: Clock, state_dir: Option<PathBuf>) -> Self {
        Shared {
            semaphore: Arc::new(Semaphore::new(max_concurrent_refreshes)),
            clock,
            changed: Default::default(),
            state_dir,
            providers: Default::default(),
            siblings: Default::default(),
        }
    }
}

/// A reader's view of a running account (the socket server, readiness, status): its
/// config, its published state, and a way to ask for a refresh. Cheap to clone.
#[derive(Clone)]
pub struct AccountView {
    pub account: Arc<Account>,
    pub state: watch::Receiver<TokenState>,
    refresh: mpsc::Sender<Poke>,
}

impl AccountView {
    /// Asks for a refresh now (still no sooner than `min_refresh_interval` after the
    /// last request, and not while the account is held after a refused credential).
    /// Pokes coalesce.
    pub fn refresh_now(&self) {
        let _ = self.refresh.try_send(Poke::Refresh);
    }

    /// Asks for one attempt now, ending a hold or a rate-limit wait (SPEC §4
    /// `?force=true`; only for root or the daemon's own user: the caller checks).
    pub fn force_refresh(&self) {
        let _ = self.refresh.try_send(Poke::Force);
    }

    /// Tells the account one of its secret files changed: a hold after refused
    /// credentials ends, and the provider is asked now.
    pub fn credentials_changed(&self) {
        let _ = self.refresh.try_send(Poke::CredentialsChanged);
    }
}

/// The supervisor's end of a running account.
pub struct AccountHandle {
    pub view: AccountView,
    cancel: CancellationToken,
}

impl AccountHandle {
    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

/// Starts the refresh loop of `account` on `tracker`, with no saved state.
pub fn spawn<E: Endpoint>(
    account: Arc<Account>,
    endpoint: E,
    shared: Shared,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> AccountHandle {
    let saved = Saved::new(&account);
    spawn_with_state(account, endpoint, shared, saved, cancel, tracker)
}

/// Starts the refresh loop of `account` on `tracker` from `saved` state (see
/// [`persist::prepare`]): a saved token still valid is published without a request.
pub fn spawn_with_state<E: Endpoint>(
    account: Arc<Account>,
    endpoint: E,
    shared: Shared,
    saved: Saved,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> AccountHandle {
    let (state_tx, state_rx) = watch::channel(TokenState::default());
    let (refresh_tx, refresh_rx) = mpsc::channel(4);
    let task = Task {
        account: account.clone(),
        endpoint,
        shared,
        state: state_tx,
        refresh: refresh_rx,
        cancel: cancel.clone(),
        rng: rand::rngs::StdRng::from_entropy(),
        expired: None,
        sibling_key: sibling_key(&account),
        saved,
    };
    tracker.spawn(task.run());
    AccountHandle {
        view: AccountView {
            account,
            state: state_rx,
            refresh: refresh_tx,
        },
        cancel,
    }
}

struct Task<E> {
    account: Arc<Account>,
    endpoint: E,
    shared: Shared,
    state: watch::Sender<TokenState>,
    refresh: mpsc::Receiver<Poke>,
    cancel: CancellationToken,
    rng: rand::rngs::StdRng,
    /// The expiry already acted on, so an expired token is expired once.
    expired: Option<SystemTime>,
    /// What is kept in the state directory for this account.
    saved: Saved,
    sibling_key: Option<String>,
}

impl<E: Endpoint> Task<E> {
    async fn run(mut self) {
        let name = self.account.name.clone();
        let removed = tokio::task::spawn_blocking({
            let a = self.account.clone();
            move || output::clean_stale(&a)
        })
        .await
        .unwrap_or(0);
        if removed > 0 {
            tracing::info!(account = %name, removed, "removed stale temporary files");
        }

        let (mut next, mut hold_until) = self.restore().await;
        let mut next_wall = self.wall(next);
        let mut last_attempt: Option<Instant> = None;
        loop {
            let expiry = self.expiry_instant();
            let wake = expiry.map_or(next, |e| e.min(next));
            // The monotonic clock stops while the machine sleeps: look at the wall clock
            // now and then, so a refresh that fell due during a suspend happens on resume.
            let wake = wake.min(Instant::now() + WALL_CHECK);
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return,
                Some(poke) = self.refresh.recv() => {
                    let now = Instant::now();
                    match poke {
                        Poke::CredentialsChanged | Poke::Force => {
                            // Ends any hold: the request below sets it anew.
                            tracing::info!(account = %name, "credentials changed: asking the provider now");
                        }
                        Poke::Refresh if hold_until.is_some_and(|h| h > now) => {
                            tracing::info!(account = %name, "refresh asked for, but the account is held after the provider refused its credentials");
                            continue;
                        }
                        Poke::Refresh => {
                            let earliest = last_attempt.map_or(now, |l| l + self.account.schedule.min_refresh_interval);
                            if earliest > now {
                                next = next.min(earliest);
                                next_wall = self.wall(next);
                                self.publish_next(next);
                                continue;
                            }
                        }
                    }
                }
                _ = sleep_until(wake) => {
                    let due = Instant::now() >= next || self.shared.clock.now() >= next_wall;
                    if !due {
                        if self.token_expired() {
                            self.expire();
                        }
                        continue;
                    }
                }
            }

            if !self.wait_for_provider().await {
                return;
            }
            last_attempt = Some(Instant::now());
            self.publish(|s| s.status = Status::Refreshing);
            let Some(result) = self.fetch().await else {
                return;
            };
            let outcome = match result {
                Ok((token, took)) => self.accept(token, took).await,
                Err(e) => {
                    let class = schedule::classify(&e);
                    if let ErrorClass::RateLimited(until) = class {
                        self.shared.providers.limit(
                            &self.account.token_url,
                            until,
                            self.shared.clock.now(),
                        );
                    }
                    Err((class, e.to_string()))
                }
            };
            let now = Instant::now();
            match outcome {
                Ok(delay) => {
                    hold_until = None;
                    next = now + delay;
                }
                Err((class, message)) => {
                    let failures = self.state.borrow().failures + 1;
                    let delay = schedule::retry_delay(
                        class,
                        failures,
                        &self.account.schedule,
                        self.shared.clock.now(),
                        &mut self.rng,
                    );
                    hold_until = (class == ErrorClass::Rejected).then_some(now + delay);
                    next = now + delay;
                    let message = match (&self.account.grant, class) {
                        (Grant::RefreshToken { .. }, ErrorClass::Rejected) => format!(
                            "{message}; the refresh token was refused: configure a new refresh_token"
                        ),
                        _ => message,
                    };
                    self.fail(message, failures, class, delay);
                    if self.shared.state_dir.is_some() {
                        self.saved
                            .set_not_before(Some(self.shared.clock.now() + delay));
                        self.saved.hold_key = (class == ErrorClass::Rejected)
                            .then(|| persist::credentials_key(&self.account));
                        self.save().await;
                    }
                }
            }
            next_wall = self.wall(next);
            self.publish_next(next);
        }
    }

    /// Waits while the provider (every account on this `token_url`) is rate-limited.
    /// False if cancelled meanwhile.
    async fn wait_for_provider(&self) -> bool {
        let Some(until) = self.shared.providers.gate(&self.account.token_url) else {
            return true;
        };
        let wait = until
            .duration_since(self.shared.clock.now())
            .unwrap_or_default();
        if wait.is_zero() {
            return true;
        }
        tracing::info!(account = %self.account.name, wait = wait.as_secs(), "provider rate-limited: waiting");
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }

    /// One token request under the shared semaphore; None if cancelled meanwhile.
    /// Accounts identical in what they ask for share one request: a token an identical
    /// account fetched since this account's own, and not yet due, is reused.
    async fn fetch(&self) -> Option<Result<(Token, Duration), crate::oauth::Error>> {
        let cell = self
            .sibling_key
            .as_ref()
            .map(|k| self.shared.siblings.cell(k));
        let mut guard = match &cell {
            Some(c) => Some(tokio::select! {
                _ = self.cancel.cancelled() => return None,
                g = c.lock() => g,
            }),
            None => None,
        };
        if let Some(t) = guard.as_ref().and_then(|g| g.as_ref()) {
            let mine = self.state.borrow().token.as_ref().map(|m| m.issued_at);
            let due =
                t.issued_at + schedule::refresh_delay(&self.account.schedule, t.lifetime(), 1.0);
            if mine.is_none_or(|m| t.issued_at > m) && self.shared.clock.now() < due {
                tracing::debug!(account = %self.account.name, "reusing the token an identical account just fetched");
                return Some(Ok(((**t).clone(), Duration::ZERO)));
            }
        }
        let _permit = tokio::select! {
            _ = self.cancel.cancelled() => return None,
            p = self.shared.semaphore.acquire() => p.expect("the semaphore is never closed"),
        };
        let started = Instant::now();
        let result = tokio::select! {
            _ = self.cancel.cancelled() => return None,
            r = self.endpoint.fetch() => r,
        };
        // Metrics: one request to the provider, its result and how long it took.
        crate::metrics::global().refresh_attempt(&self.account.name, &result, started.elapsed());
        if let (Some(g), Ok(t)) = (guard.as_mut(), &result) {
            **g = Some(Arc::new(t.clone()));
        }
        Some(result.map(|t| (t, started.elapsed())))
    }

    /// The wall-clock time of a point on tokio's clock.
    fn wall(&self, at: Instant) -> SystemTime {
        self.shared.clock.now() + at.saturating_duration_since(Instant::now())
    }

    /// Whether the held token has expired by the wall clock and was not yet acted on.
    fn token_expired(&self) -> bool {
        let s = self.state.borrow();
        s.token.as_ref().is_some_and(|t| {
            self.expired != Some(t.expires_at) && !t.is_valid_at(self.shared.clock.now())
        })
    }

    /// Publishes a saved token that is still valid, without asking the provider, and
    /// returns when to ask next: when that token is due for refresh, and not before a
    /// saved backoff or hold ends (so a crash loop is no request loop).
    /// Also returns the end of a hold after refused credentials that outlived a restart.
    async fn restore(&mut self) -> (Instant, Option<Instant>) {
        let now = self.shared.clock.now();
        let mut next = Instant::now();
        if let Some(token) = self
            .saved
            .token_valid_for(&self.account, now, Duration::ZERO)
        {
            let token = Arc::new(token);
            let write = tokio::task::spawn_blocking({
                let (a, t) = (self.account.clone(), token.clone());
                move || output::write_all(&a, &t)
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            match write {
                Ok(()) => {
                    let due = token.issued_at
                        + schedule::refresh_delay(
                            &self.account.schedule,
                            token.lifetime(),
                            rand::Rng::gen(&mut self.rng),
                        );
                    let wait = due.duration_since(now).unwrap_or_default();
                    tracing::info!(
                        account = %self.account.name,
                        expires_in = token.expires_at.duration_since(now).unwrap_or_default().as_secs(),
                        next_refresh_in = wait.as_secs(),
                        "serving the saved token"
                    );
                    next += wait;
                    self.publish(|s| {
                        s.status = Status::Fresh;
                        s.token = Some(token.clone());
                        s.last_refresh = Some(token.issued_at);
                        s.attempted = true;
                    });
                }
                Err(e) => tracing::error!(account = %self.account.name, "{e}"),
            }
        }
        let mut hold = None;
        if let Some(nb) = self.saved.not_before() {
            if let Ok(wait) = nb.duration_since(now) {
                let held = self.saved.hold_key.is_some();
                tracing::info!(
                    account = %self.account.name,
                    wait = wait.as_secs(),
                    "{}",
                    if held {
                        "still holding after the provider refused these credentials before the restart"
                    } else {
                        "waiting as planned before the restart"
                    }
                );
                next = next.max(Instant::now() + wait);
                hold = held.then_some(next);
            }
        }
        (next, hold)
    }

    /// Saves this account's state, if there is a state directory. A failure is logged:
    /// the daemon keeps working, at the cost of a request after a restart.
    async fn save(&self) {
        let Some(dir) = self.shared.state_dir.clone() else {
            return;
        };
        let (name, saved) = (self.account.name.clone(), self.saved.clone());
        let result = tokio::task::spawn_blocking(move || persist::save(&dir, &name, &saved))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if let Err(e) = result {
            tracing::error!(account = %self.account.name, "failed to save state: {e}");
        }
    }

    /// Writes the outputs for a new token, runs the hooks and publishes it; returns the
    /// delay to the next refresh.
    async fn accept(
        &mut self,
        token: Token,
        took: Duration,
    ) -> Result<Duration, (ErrorClass, String)> {
        let token = Arc::new(token);
        // The state first: a rotated refresh token must survive a crash right after.
        self.saved.record(&self.account, &token);
        self.save().await;
        let write = tokio::task::spawn_blocking({
            let (a, t) = (self.account.clone(), token.clone());
            move || output::write_all(&a, &t)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if let Err(e) = write {
            // The token is good: keep serving it on the socket while the files are retried.
            self.publish(|s| s.token = Some(token.clone()));
            return Err((ErrorClass::Transient, e.to_string()));
        }
        hooks::run(&self.account).await;

        let now = self.shared.clock.now();
        let lifetime = token.expires_at.duration_since(now).unwrap_or_default();
        let delay = schedule::refresh_delay(
            &self.account.schedule,
            lifetime,
            rand::Rng::gen(&mut self.rng),
        );
        let recovered = self.state.borrow().failures > 0;
        tracing::info!(
            account = %self.account.name,
            status = "fresh",
            expires_in = lifetime.as_secs(),
            next_refresh_in = delay.as_secs(),
            took_ms = took.as_millis() as u64,
            "token refreshed{}",
            if recovered { " (recovered)" } else { "" }
        );
        self.publish(|s| {
            s.status = Status::Fresh;
            s.token = Some(token);
            s.last_refresh = Some(now);
            s.last_error = None;
            s.failures = 0;
            s.attempted = true;
        });
        Ok(delay)
    }

    fn fail(&mut self, message: String, failures: u32, class: ErrorClass, delay: Duration) {
        let now = self.shared.clock.now();
        let changed = self.state.borrow().last_error.as_deref() != Some(&message);
        let retry_in = delay.as_secs();
        match class {
            ErrorClass::Rejected if changed => tracing::error!(
                account = %self.account.name,
                status = "failing",
                retry_in,
                "token request refused: {message}; holding off so a wrong secret cannot lock the account"
            ),
            _ if changed => {
                tracing::warn!(account = %self.account.name, status = "failing", failures, retry_in, "token request failed: {message}")
            }
            _ => {
                tracing::debug!(account = %self.account.name, failures, retry_in, "token request failed again: {message}")
            }
        }
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

    /// The token expired before a new one came: readers stop getting it, and outputs go
    /// (unless `on_expiry = "keep"`).
    fn expire(&mut self) {
        self.expired = self.state.borrow().token.as_ref().map(|t| t.expires_at);
        let removed = output::remove_all(&self.account);
        tracing::warn!(account = %self.account.name, status = "expired", "token expired without renewal");
        if let Err(e) = removed {
            tracing::error!(account = %self.account.name, "{e}");
        }
        self.publish(|s| s.status = Status::Expired);
    }

    /// When the held token expires, on tokio's clock, unless that was already handled.
    fn expiry_instant(&self) -> Option<Instant> {
        let s = self.state.borrow();
        let t = s.token.as_ref()?;
        if self.expired == Some(t.expires_at) {
            return None;
        }
        let left = t
            .expires_at
            .duration_since(self.shared.clock.now())
            .unwrap_or_default();
        Some(Instant::now() + left)
    }

    /// Changes the published state and tells the supervisor.
    fn publish(&self, f: impl FnOnce(&mut TokenState)) {
        self.state.send_modify(f);
        self.shared.changed.notify_one();
    }

    fn publish_next(&self, next: Instant) {
        let at: SystemTime =
            self.shared.clock.now() + next.saturating_duration_since(Instant::now());
        self.publish(|s| s.next_attempt = Some(at));
    }
}
