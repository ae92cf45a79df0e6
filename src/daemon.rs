//! The supervisor: owns the map of running accounts, starts their tasks, and turns
//! signals into shutdown. Everyone else reads account state through `watch` receivers.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::account::identity::{CredentialsDigest, RequestIdentity};
use crate::account::{self, persist, AccountHandle, Accounts, Predecessor, Shared, TokenState};
use crate::clock::Clock;
use crate::config::{Account, Config, Output};
use crate::oauth::{HttpEndpoint, Transports};
use crate::systemd::{self, Notifier};
use crate::watch::Watcher;

/// What the daemon says about itself (`GET /v1/daemon`, `tokend status`): the config
/// it runs, which generation of it, since when, and how the last reload went. Published
/// by the supervisor on a `watch` channel; the socket server reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonState {
    /// The config file (absolute).
    pub config: PathBuf,
    /// 1 at start, one more for each reload that was applied.
    pub generation: u64,
    /// When the running generation was loaded.
    pub loaded_at: std::time::SystemTime,
    /// The last reload asked for (SIGHUP or a change of the file), if any.
    pub last_reload: Option<ReloadOutcome>,
}

/// How a reload went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadOutcome {
    pub at: std::time::SystemTime,
    /// Empty when it was applied; else why it was refused, one line per error as
    /// `tokend check` prints them.
    pub errors: Vec<String>,
}

/// How a burst of file events may last before it is looked at.
const WATCH_SETTLE: Duration = Duration::from_millis(200);

/// How often, at most, the supervisor looks at every account's state for READY and
/// STATUS= (issue #11: at start every account publishes, and each look costs O(accounts)).
const SUMMARY_EVERY: Duration = Duration::from_millis(50);

/// How long shutdown waits for account tasks (SPEC §6: stop within a second).
const SHUTDOWN_GRACE: Duration = Duration::from_millis(800);

/// Runs the daemon until SIGTERM or SIGINT (or `shutdown` is cancelled).
pub async fn run(mut config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Signal streams exist before anything starts, so an early signal is not lost.
    let mut sigterm = signal(SignalKind::terminate()).context("failed to listen for SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("failed to listen for SIGINT")?;
    let mut sighup = signal(SignalKind::hangup()).context("failed to listen for SIGHUP")?;

    let notifier = Notifier::from_env();
    let watchdog = systemd::watchdog_interval();
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));

    // The config file and the secret files are watched, from before any account starts
    // or the socket answers: an edit made once tokend answers is never missed. A failed
    // watch leaves SIGHUP.
    let path = config.path.clone();
    let (watch_tx, mut watch_rx) = mpsc::channel(1);
    let mut watcher = Watcher::new(watch_tx)
        .map_err(|e| tracing::warn!("failed to watch files for changes ({e}); reload with SIGHUP"))
        .ok();
    if let Some(w) = &mut watcher {
        let secrets = config
            .accounts
            .iter()
            .flat_map(|a| a.secrets().into_iter().filter_map(|(_, s)| s.path()));
        let files: Vec<PathBuf> = std::iter::once(path.clone()).chain(secrets).collect();
        w.watch_files(files.iter().map(PathBuf::as_path));
    }
    let mut config_text = read_digest(&path);

    // Every descriptor the hard limit allows (the socket's share of them is bounded).
    crate::server::raise_fd_limit();
    // Bound before any account starts: a second daemon fails here, before it asks a
    // provider for anything.
    let listeners = crate::server::bind(&config.daemon)?;
    let mut sup = Supervisor::new(&config);
    let info = watch::Sender::new(std::sync::Arc::new(DaemonState {
        config: path.clone(),
        generation: 1,
        loaded_at: sup.shared.clock.now(),
        last_reload: None,
    }));
    if let Some(c) = &config.cluster {
        sup.member = Some(crate::cluster::join(
            c,
            config.daemon.state_dir.as_deref(),
            sup.shared.clock,
            sup.cancel.child_token(),
            &sup.tracker,
        )?);
        sup.on_cluster_loss = c.on_cluster_loss;
    }
    sup.retire_unknown(&config);
    let count = config.accounts.len();
    // Each account's config is kept once, behind its Arc (issue #11: not also here).
    let accounts: Vec<Arc<Account>> = std::mem::take(&mut config.accounts)
        .into_iter()
        .map(Arc::new)
        .collect();
    // Temporary files a killed tokend left, for every account at once before any
    // writes: one read of each directory (issue #11).
    let accounts = tokio::task::spawn_blocking(move || {
        let removed = crate::output::clean_stale_all(&accounts);
        for (a, removed) in accounts.iter().zip(removed).filter(|(_, n)| *n > 0) {
            tracing::info!(account = %a.name, removed, "removed stale temporary files");
        }
        accounts
    })
    .await
    .context("failed to look for stale temporary files")?;
    for a in accounts {
        let endpoint = HttpEndpoint::new(a.clone(), sup.shared.clock, &sup.transports)
            .with_context(|| format!("account {}", a.name))?;
        sup.start(a, endpoint, TokenState::default(), false);
    }
    sup.publish();
    let server = listeners.spawn(
        sup.views.subscribe(),
        sup.shared.metrics.clone(),
        info.subscribe(),
        config.daemon.max_concurrent_refreshes,
    )?;
    tracing::info!(accounts = count, config = %path.display(), "tokend started");

    // READY=1 once every account had its first try, or at startup_timeout.
    let startup_deadline = Instant::now() + config.daemon.startup_timeout;
    let mut ready = false;
    let mut status = String::new();
    loop {
        let summary = sup.summary();
        let summarized = Instant::now();
        if !ready && (sup.all_attempted() || Instant::now() >= startup_deadline) {
            ready = true;
            trim_heap();
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
                config_text = sup.reload_from(&path, &notifier, &info);
                if let Some(w) = &mut watcher {
                    w.watch_files(sup.watched_files(&path).iter().map(PathBuf::as_path));
                }
            }
            Some(()) = watch_rx.recv() => {
                // Let a burst of events (write, rename, chmod, symlink swap) settle.
                tokio::time::sleep(WATCH_SETTLE).await;
                while watch_rx.try_recv().is_ok() {}
                if read_digest(&path) != config_text {
                    tracing::info!("{} changed: reloading", path.display());
                    config_text = sup.reload_from(&path, &notifier, &info);
                    if let Some(w) = &mut watcher {
                        w.watch_files(sup.watched_files(&path).iter().map(PathBuf::as_path));
                    }
                }
                if let Some(w) = &mut watcher {
                    w.rewatch();
                }
                sup.check_secrets();
            }
            _ = sup.shared.changed.notified() => {
                // The summary looks at every account: with thousands of accounts
                // publishing at start, it is made at most every SUMMARY_EVERY.
                tokio::time::sleep_until(summarized + SUMMARY_EVERY).await;
            }
            _ = tokio::time::sleep_until(startup_deadline), if !ready => {}
            _ = watchdog_tick.tick(), if watchdog.is_some() => notifier.watchdog(),
        }
    }
    notifier.stopping();
    server.shutdown().await;
    sup.shutdown().await;
    Ok(())
}

/// The SHA-256 of the file at `path`, if it can be read: what tells a change of the
/// config from other events in its directory (kept rather than the text, which is
/// megabytes with thousands of accounts: issue #11).
fn read_digest(path: &Path) -> Option<[u8; 32]> {
    let text = std::fs::read(path).ok()?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &text);
    Some(digest.as_ref().try_into().expect("SHA-256 is 32 bytes"))
}

/// Sets the allocator up for a daemon that lives long with many small objects: glibc
/// gives each thread that allocates an arena of its own (up to eight per core), and
/// what an arena keeps for its thread's next allocations stays resident. One arena for
/// all threads (issue #11): with two, how much of the start's work landed in the second
/// depended on which threads the scheduler ran, and 10,000 accounts took 39 or 44 MiB
/// from run to run; with one, 39 every time (the runtime has two workers, so the
/// arena's lock is seldom contended). Call before any thread starts.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes no pointers; called before other threads exist.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
    }
}

/// Gives the heap's free pages back to the kernel. At start every account's first
/// request is in flight at once (waiting for a permit), and glibc keeps what they freed
/// as resident memory otherwise: with 10,000 accounts, most of the daemon's RSS
/// (issue #11). Done once when ready and after each reload; it costs milliseconds.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers; it only walks the allocator's free lists,
    // under the allocator's own locks.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// A running account, as the supervisor keeps it.
struct Running {
    handle: AccountHandle,
    /// Its credentials as last looked at, to notice changed secret files.
    credentials: [u8; 32],
}

impl std::ops::Deref for Running {
    type Target = AccountHandle;

    fn deref(&self) -> &AccountHandle {
        &self.handle
    }
}

struct Supervisor {
    accounts: BTreeMap<String, Running>,
    shared: Shared,
    cancel: CancellationToken,
    tracker: TaskTracker,
    views: watch::Sender<Accounts>,
    /// Accounts stopped by a reload whose task may still be finishing (a refresh_token
    /// request on the wire): an account of the same name starts after it.
    stopping: BTreeMap<String, Predecessor>,
    /// This tokend in its cluster, with `[cluster]`.
    member: Option<crate::cluster::Joined>,
    on_cluster_loss: crate::config::OnClusterLoss,
    /// The `[cluster]` joined at start (changes take effect at a restart).
    cluster: Option<crate::config::ClusterConfig>,
    /// HTTP clients, shared by accounts that connect the same way.
    transports: Arc<Transports>,
}

/// How long SIGTERM waits for refresh_token requests on the wire (SPEC §6).
const ROTATION_GRACE: Duration = Duration::from_secs(10);

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
            stopping: BTreeMap::new(),
            member: None,
            on_cluster_loss: crate::config::OnClusterLoss::Refresh,
            cluster: config.cluster.clone(),
            transports: Arc::new(Transports::default()),
        }
    }

    /// Reads, validates and applies the config at `path`, between systemd's
    /// RELOADING=1 and READY=1; an invalid config, or one with an account that cannot
    /// start, is logged and changes nothing. Returns the digest of the file as read, to
    /// tell later whether it changed.
    fn reload_from(
        &mut self,
        path: &Path,
        notifier: &Notifier,
        info: &watch::Sender<std::sync::Arc<DaemonState>>,
    ) -> Option<[u8; 32]> {
        notifier.reloading();
        let text = read_digest(path);
        // Refused: what the log says, and the errors one by one.
        let applied = crate::config::load(path)
            .map_err(|e| (e.to_string(), e.0.iter().map(|c| c.to_string()).collect()))
            .and_then(|new| self.reload(new).map_err(|e| (e.clone(), vec![e])));
        let now = self.shared.clock.now();
        match applied {
            Ok(()) => {
                self.publish();
                trim_heap();
                tracing::info!("config reloaded: {}", self.summary());
                self.shared.metrics.config_reload(true);
                info.send_modify(|i| {
                    let i = std::sync::Arc::make_mut(i);
                    i.generation += 1;
                    i.loaded_at = now;
                    i.last_reload = Some(ReloadOutcome {
                        at: now,
                        errors: Vec::new(),
                    });
                });
            }
            Err((e, errors)) => {
                tracing::error!("{e}; keeping the running config");
                self.shared.metrics.config_reload(false);
                info.send_modify(|i| {
                    std::sync::Arc::make_mut(i).last_reload =
                        Some(ReloadOutcome { at: now, errors });
                });
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

    /// Pokes every account whose credentials changed since last looked at.
    fn check_secrets(&mut self) {
        for (name, h) in &mut self.accounts {
            let now = CredentialsDigest::in_memory(&h.view.account);
            if now != h.credentials {
                tracing::info!(account = %name, "a secret changed");
                h.credentials = now;
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

    /// Tells readers the current set of accounts.
    fn publish(&mut self) {
        self.stopping.retain(|_, p| !p.is_done());
        let map = self
            .accounts
            .iter()
            .map(|(n, h)| (n.clone(), h.view.clone()))
            .collect();
        self.views.send_replace(Arc::new(map));
    }

    /// The state of accounts no longer configured goes to `state_dir/retired/` (at
    /// start: they were removed while tokend was down).
    fn retire_unknown(&self, config: &Config) {
        if let Some(dir) = &self.shared.state_dir {
            let names: Vec<&str> = config.accounts.iter().map(|a| a.name.as_str()).collect();
            persist::retire_unknown(dir, &names);
        }
    }

    /// Starts an account: after its previous instance, if one is still finishing;
    /// readers see `initial` until it publishes. With `clean_stale` it first removes
    /// temporary files a killed writer left beside its outputs.
    fn start(
        &mut self,
        account: Arc<Account>,
        endpoint: HttpEndpoint,
        initial: TokenState,
        clean_stale: bool,
    ) {
        let after = self.stopping.remove(&account.name);
        let coordinator = match &self.member {
            Some(m) if account.cluster => {
                Some(m.coordinator(account.clone(), self.on_cluster_loss))
            }
            _ => None,
        };
        let handle = account::spawn_coordinated(
            account.clone(),
            endpoint,
            self.shared.clone(),
            coordinator,
            after,
            initial,
            clean_stale,
            self.cancel.clone(),
            &self.tracker,
        );
        let credentials = CredentialsDigest::in_memory(&account);
        self.accounts.insert(
            account.name.clone(),
            Running {
                handle,
                credentials,
            },
        );
    }

    /// Applies a new, already validated config: unchanged accounts keep their token and
    /// schedule, changed ones restart (after a refresh_token request on the wire is
    /// answered and saved), new ones start, removed ones stop, remove their outputs and
    /// retire their state. If any new or changed account cannot start, nothing changes.
    fn reload(&mut self, config: Config) -> Result<(), String> {
        if config.cluster != self.cluster {
            tracing::warn!("[cluster] changed: that takes effect at the next restart");
        }
        let configured: HashSet<String> = config.accounts.iter().map(|a| a.name.clone()).collect();
        let wanted: Vec<Account> = config
            .accounts
            .into_iter()
            .filter(|a| {
                self.accounts
                    .get(&a.name)
                    .is_none_or(|h| *h.view.account != *a)
            })
            .collect();
        // Every account that starts is built first: a reload is taken whole or not at all.
        let mut ready = Vec::new();
        let mut problems = Vec::new();
        for a in wanted {
            let a = Arc::new(a);
            match HttpEndpoint::new(a.clone(), self.shared.clock, &self.transports) {
                Ok(e) => ready.push((a.name.clone(), a, e)),
                Err(e) => problems.push(format!("account {} cannot start: {e}", a.name)),
            }
        }
        if !problems.is_empty() {
            return Err(format!("reload refused: {}", problems.join("; ")));
        }
        let removed: Vec<String> = self
            .accounts
            .keys()
            .filter(|n| !configured.contains(*n))
            .cloned()
            .collect();
        for name in removed {
            tracing::info!(account = %name, "account removed");
            let old = self.accounts.remove(&name).expect("name came from the map");
            let p = old.stop(true, old.view.account.outputs.clone());
            self.stopping.insert(name, p);
        }
        for (name, new, endpoint) in ready {
            if !self.stopping.contains_key(&name) && !self.accounts.contains_key(&name) {
                // A renamed account of the refresh_token grant starts after the account
                // it was (whose chain it resumes: persist::load_for), not beside it.
                if let Some(old) = self.renamed_from(&new) {
                    let p = self.stopping.remove(&old).expect("found in the map");
                    tracing::info!(account = %name, from = %old, "the same refresh_token as the removed account {old:?}: starting after it, to resume its chain");
                    self.stopping.insert(name.clone(), p);
                }
            }
            let mut initial = TokenState::default();
            if let Some(old) = self.accounts.remove(&name) {
                tracing::info!(account = %name, "account changed: restarting it");
                let gone: Vec<Output> = old
                    .view
                    .account
                    .outputs
                    .iter()
                    .filter(|o| !new.outputs.iter().any(|n| n.path == o.path))
                    .cloned()
                    .collect();
                if RequestIdentity::of(&new) == RequestIdentity::of(&old.view.account) {
                    // The same request: readers keep the token meanwhile.
                    initial = old.view.state.borrow().clone();
                }
                let p = old.stop(false, gone);
                self.stopping.insert(name.clone(), p);
            }
            self.start(new, endpoint, initial, true);
        }
        self.transports.prune();
        // Accounts that discover their token endpoint do so again before their next
        // request (SPEC §1: discovery at start and reload).
        self.transports.rediscover();
        Ok(())
    }

    /// A removed account (still stopping) whose configured refresh_token is `new`'s: the
    /// account `new` was renamed from.
    fn renamed_from(&self, new: &Account) -> Option<String> {
        let crate::config::Grant::RefreshToken { refresh_token } = &new.grant else {
            return None;
        };
        self.stopping.iter().find_map(|(name, p)| {
            let old = p.account();
            match &old.grant {
                crate::config::Grant::RefreshToken {
                    refresh_token: seed,
                } if seed == refresh_token && !self.accounts.contains_key(name) => {
                    Some(name.clone())
                }
                _ => None,
            }
        })
    }

    async fn shutdown(self) {
        self.cancel.cancel();
        // Parked accounts have no task to notice: each is woken to finish.
        for running in self.accounts.values() {
            running.halt();
        }
        self.tracker.close();
        let stopped = tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait()).await;
        if stopped.is_err() && *self.shared.rotations.borrow() > 0 {
            // A refresh_token request is on the wire: its answer holds the only copy of
            // the next refresh token.
            tracing::info!(
                "waiting (up to {ROTATION_GRACE:?}) for a refresh_token request to be answered"
            );
            let left = ROTATION_GRACE.saturating_sub(SHUTDOWN_GRACE);
            if tokio::time::timeout(left, self.tracker.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    "a refresh_token request was not answered within {ROTATION_GRACE:?}"
                );
            }
        } else if stopped.is_err() {
            tracing::warn!("account tasks did not stop within {SHUTDOWN_GRACE:?}");
        }
        tracing::info!("tokend stopped");
    }
}
