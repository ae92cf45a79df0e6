//! The supervisor: owns the map of running accounts, starts their tasks, and turns
//! signals into shutdown. Everyone else reads account state through `watch` receivers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::account::{self, persist, AccountHandle, Accounts, Shared};
use crate::clock::Clock;
use crate::config::{Account, Config, Output};
use crate::oauth::HttpEndpoint;
use crate::oauth::Token;
use crate::output;
use crate::systemd::{self, Notifier};
use crate::watch::Watcher;

/// How long a burst of file events may last before it is looked at.
const WATCH_SETTLE: Duration = Duration::from_millis(200);

/// How long shutdown waits for account tasks (SPEC §6: stop within a second).
const SHUTDOWN_GRACE: Duration = Duration::from_millis(800);

/// Runs the daemon until SIGTERM or SIGINT (or `shutdown` is cancelled).
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Signal streams exist before anything starts, so an early signal is not lost.
    let mut sigterm = signal(SignalKind::terminate()).context("failed to listen for SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("failed to listen for SIGINT")?;
    let mut sighup = signal(SignalKind::hangup()).context("failed to listen for SIGHUP")?;

    let notifier = Notifier::from_env();
    let watchdog = systemd::watchdog_interval();
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));

    // The config file and the secret files are watched; a failed watch leaves SIGHUP.
    let path = config.path.clone();
    let mut config_text = std::fs::read(&path).ok();
    let (watch_tx, mut watch_rx) = mpsc::channel(1);
    let mut watcher = Watcher::new(watch_tx)
        .map_err(|e| tracing::warn!("failed to watch files for changes ({e}); reload with SIGHUP"))
        .ok();

    // Bound before any account starts: a second daemon fails here, before it asks a
    // provider for anything.
    let listeners = crate::server::bind(&config.daemon)?;
    let mut sup = Supervisor::new(&config);
    for a in &config.accounts {
        sup.start(Arc::new(a.clone()), None)?;
    }
    sup.publish();
    let server = listeners.spawn(sup.views.subscribe(), sup.metrics.clone())?;
    if let Some(w) = &mut watcher {
        w.watch_files(sup.watched_files(&path).iter().map(PathBuf::as_path));
    }
    tracing::info!(accounts = config.accounts.len(), config = %path.display(), "tokend started");

    // READY=1 once every account had its first try, or at startup_timeout.
    let startup_deadline = Instant::now() + config.daemon.startup_timeout;
    let mut ready = false;
    let mut status = String::new();
    loop {
        let summary = sup.summary();
        if !ready && (sup.all_attempted() || Instant::now() >= startup_deadline) {
            ready = true;
            tracing::info!("ready: {summary}");
            notifier.ready(&summary);
            status = summary;
        } else if ready && summary != status {
            notifier.status(&summary);
            status = summary;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break }
            _ = sighup.recv() => {
                tracing::info!("SIGHUP: reloading {}", path.display());
                config_text = sup.reload_from(&path, &notifier);
                if let Some(w) = &mut watcher {
                    w.watch_files(sup.watched_files(&path).iter().map(PathBuf::as_path));
                }
            }
            Some(()) = watch_rx.recv() => {
                // Let a burst of events (write, rename, chmod, symlink swap) settle.
                tokio::time::sleep(WATCH_SETTLE).await;
                while watch_rx.try_recv().is_ok() {}
                if std::fs::read(&path).ok() != config_text {
                    tracing::info!("{} changed: reloading", path.display());
                    config_text = sup.reload_from(&path, &notifier);
                    if let Some(w) = &mut watcher {
                        w.watch_files(sup.watched_files(&path).iter().map(PathBuf::as_path));
                    }
                }
                if let Some(w) = &mut watcher {
                    w.rewatch();
                }
                sup.check_secrets();
            }
            _ = sup.shared.changed.notified() => {}
            _ = tokio::time::sleep_until(startup_deadline), if !ready => {}
            _ = watchdog_tick.tick(), if watchdog.is_some() => notifier.watchdog(),
        }
    }
    notifier.stopping();
    server.shutdown().await;
    sup.shutdown().await;
    Ok(())
}

struct Supervisor {
    accounts: BTreeMap<String, AccountHandle>,
    shared: Shared,
    cancel: CancellationToken,
    tracker: TaskTracker,
    views: watch::Sender<Accounts>,
    /// Each account's [`persist::credentials_key`], to notice changed secret files.
    credentials: BTreeMap<String, u64>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Supervisor {
    fn new(config: &Config) -> Self {
        Supervisor {
            accounts: BTreeMap::new(),
            shared: Shared::new(
                config.daemon.max_concurrent_refreshes,
                Clock::System,
                config.daemon.state_dir.clone(),
            ),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            views: watch::Sender::new(Accounts::default()),
            credentials: BTreeMap::new(),
            // TODO(engine): Arc::new(Metrics::new()), also handed to the accounts in Shared.
            metrics: crate::metrics::global().clone(),
        }
    }

    /// Reads, validates and applies the config at `path`, between systemd's
    /// RELOADING=1 and READY=1; an invalid config is logged and changes nothing. Returns
    /// the file's content as read, to tell later whether it changed.
    fn reload_from(&mut self, path: &Path, notifier: &Notifier) -> Option<Vec<u8>> {
        notifier.reloading();
        let text = std::fs::read(path).ok();
        match crate::config::load(path) {
            Ok(new) => {
                self.reload(new);
                self.publish();
                tracing::info!("config reloaded: {}", self.summary());
                self.metrics.config_reload(true);
            }
            Err(e) => {
                tracing::error!("{e}; keeping the running config");
                self.metrics.config_reload(false);
            }
        }
        notifier.ready(&self.summary());
        text
    }

    /// The files whose changes matter: the config and every secret file.
    fn watched_files(&self, config: &Path) -> Vec<PathBuf> {
        let mut files = vec![config.to_owned()];
        for h in self.accounts.values() {
            files.extend(
                h.view
                    .account
                    .secrets()
                    .iter()
                    .filter_map(|(_, s)| s.path()),
            );
        }
        files
    }

    /// Pokes every account whose secrets changed since last looked at.
    fn check_secrets(&mut self) {
        for (name, h) in &self.accounts {
            let key = persist::credentials_key(&h.view.account);
            if self.credentials.insert(name.clone(), key) != Some(key) {
                tracing::info!(account = %name, "a secret changed");
                h.view.credentials_changed();
            }
        }
    }

    fn all_attempted(&self) -> bool {
        self.accounts
            .values()
            .all(|h| h.view.state.borrow().attempted)
    }

    /// One line for systemd's STATUS=: "3 accounts: 2 fresh, 1 failing".
    fn summary(&self) -> String {
        let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
        for h in self.accounts.values() {
            *counts
                .entry(h.view.state.borrow().status.as_str())
                .or_default() += 1;
        }
        let parts: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
        let n = self.accounts.len();
        format!(
            "{n} account{}: {}",
            if n == 1 { "" } else { "s" },
            parts.join(", ")
        )
    }

    /// Tells readers the current set of accounts, and drops the saved state of
    /// accounts that are gone.
    fn publish(&self) {
        if let Some(dir) = &self.shared.state_dir {
            let names: Vec<&str> = self.accounts.keys().map(String::as_str).collect();
            persist::clean(dir, &names);
        }
        let map = self
            .accounts
            .iter()
            .map(|(n, h)| (n.clone(), h.view.clone()))
            .collect();
        self.views.send_replace(Arc::new(map));
    }

    /// Starts an account from its saved state, or from `carry`, the token its previous
    /// configuration held.
    fn start(&mut self, account: Arc<Account>, carry: Option<Arc<Token>>) -> anyhow::Result<()> {
        let saved = self
            .shared
            .state_dir
            .as_deref()
            .and_then(|d| persist::load(d, &account.name));
        let (mut saved, refresh_token) = persist::prepare(&account, saved);
        if let Some(t) = carry {
            saved.token = Some(persist::SavedToken::from_token(&t));
        }
        let endpoint = HttpEndpoint::new(account.clone(), self.shared.clock)
            .with_context(|| format!("account {}", account.name))?
            .with_refresh_token(refresh_token);
        let handle = account::spawn_with_state(
            account.clone(),
            endpoint,
            self.shared.clone(),
            saved,
            self.cancel.child_token(),
            &self.tracker,
        );
        self.credentials
            .insert(account.name.clone(), persist::credentials_key(&account));
        self.accounts.insert(account.name.clone(), handle);
        Ok(())
    }

    /// Applies a new, already validated config: unchanged accounts keep their token and
    /// schedule, changed ones restart, new ones start, removed ones stop.
    fn reload(&mut self, config: Config) {
        let mut wanted: BTreeMap<String, Account> = config
            .accounts
            .into_iter()
            .map(|a| (a.name.clone(), a))
            .collect();
        // Tokens of changed accounts that were issued for the same request: the new
        // task starts from them instead of asking the provider (an output-only change).
        let mut carried: BTreeMap<String, Arc<Token>> = BTreeMap::new();
        let names: Vec<String> = self.accounts.keys().cloned().collect();
        for name in names {
            let old = &self.accounts[&name].view.account;
            if wanted.get(&name).is_some_and(|a| a == &**old) {
                wanted.remove(&name);
                continue;
            }
            let old = self.accounts.remove(&name).expect("name came from the map");
            old.stop();
            let account = &old.view.account;
            match wanted.get(&name) {
                None => {
                    tracing::info!(account = %name, "account removed");
                    self.credentials.remove(&name);
                    if let Err(e) = output::remove_all(account) {
                        tracing::error!(account = %name, "{e}");
                    }
                }
                Some(new) => {
                    tracing::info!(account = %name, "account changed: restarting it");
                    let gone: Vec<Output> = account
                        .outputs
                        .iter()
                        .filter(|o| !new.outputs.iter().any(|n| n.path == o.path))
                        .cloned()
                        .collect();
                    let stale = Account {
                        outputs: gone,
                        ..(**account).clone()
                    };
                    if let Err(e) = output::remove_all(&stale) {
                        tracing::error!(account = %name, "{e}");
                    }
                    if persist::Fingerprint::of(new) == persist::Fingerprint::of(account) {
                        if let Some(t) = old.view.state.borrow().token.clone() {
                            carried.insert(name.clone(), t);
                        }
                    }
                }
            }
        }
        for (name, a) in wanted {
            let carry = carried.remove(&name);
            if let Err(e) = self.start(Arc::new(a), carry) {
                tracing::error!(account = %name, "failed to start: {e:#}");
            }
        }
    }

    async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("account tasks did not stop within {SHUTDOWN_GRACE:?}");
        }
        tracing::info!("tokend stopped");
    }
}
