//! The daemon (`tokend run` without its socket server): the supervisor of the running
//! accounts (`supervisor`), what it is wired to (`wiring`: the [`Control`] stream that
//! signals and file events feed, the clock, how accounts reach providers), reloads and
//! systemd. Everyone else reads account state through `watch` receivers; the socket
//! server is bound and served by the caller (`service`, or a test).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::account::{Accounts, TokenState};
use crate::config::{Account, Config};
use crate::systemd::{self, Notifier};
use crate::watch::Watcher;

mod supervisor;
mod wiring;
use supervisor::Supervisor;
pub use wiring::{system, Connect, Control, Http, Wiring};

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
pub(super) const SHUTDOWN_GRACE: Duration = Duration::from_millis(800);

/// The daemon: its accounts under their supervisor, the config and secret files
/// watched, signals turned into reloads and shutdown, systemd told. The socket server
/// is not part of it: it reads what the daemon publishes ([`Daemon::views`],
/// [`Daemon::info`], [`Daemon::metrics`]), and so can a test, in-process.
///
/// What drives it besides its accounts is its [`Wiring`]: a stream of [`Control`]s
/// (signals and file events, or a test's), the clock, and how it reaches providers
/// ([`Connect`]); so a test runs it in process, on a paused clock, against scripted
/// endpoints, and tells it to reload as SIGHUP does.
///
/// Three steps, so whoever wires it can act between them: [`Daemon::new`] (signal
/// streams and file watches exist before anything starts, so an early signal or edit
/// is not lost), [`Daemon::start`] (the cluster joined, every account started), and
/// [`Daemon::run`] (until [`Control::Stop`] or `shutdown`), then [`Daemon::shutdown`].
pub struct Daemon<C: Connect = Http> {
    /// The config without its accounts (their tasks own them once started).
    config: Config,
    controls: mpsc::Receiver<Control>,
    notifier: Notifier,
    watcher: Option<Watcher>,
    /// The digest of the config file as last read.
    config_text: Option<[u8; 32]>,
    sup: Supervisor<C>,
    info: watch::Sender<Arc<DaemonState>>,
}

impl Daemon<Http> {
    /// The daemon as `tokend run` wires it ([`wiring::system`]): signals, file watches,
    /// the system clock, HTTP. Starts nothing.
    pub fn new(config: Config) -> anyhow::Result<Daemon<Http>> {
        Ok(Daemon::wired(config, system()?))
    }
}

impl<C: Connect> Daemon<C> {
    /// The daemon on `wiring`; watches the config and secret files if the wiring says
    /// so. Starts nothing.
    pub fn wired(config: Config, wiring: Wiring<C>) -> Daemon<C> {
        let Wiring {
            controls,
            sender,
            clock,
            connect,
            watch_files,
        } = wiring;
        // The config file and the secret files are watched from before any account
        // starts or the socket answers: an edit made once tokend answers is never
        // missed. A failed watch leaves SIGHUP.
        let path = config.path.clone();
        let watcher = watch_files.then(|| {
            let on_change = move || {
                // A full stream already holds a look at the files.
                let _ = sender.try_send(Control::FilesChanged);
            };
            Watcher::new(on_change)
                .map_err(|e| {
                    tracing::warn!("failed to watch files for changes ({e}); reload with SIGHUP")
                })
                .ok()
        });
        let mut watcher = watcher.flatten();
        if let Some(w) = &mut watcher {
            let secrets = config
                .accounts
                .iter()
                .flat_map(|a| a.secrets().into_iter().filter_map(|(_, s)| s.path()));
            let files: Vec<PathBuf> = std::iter::once(path.clone()).chain(secrets).collect();
            w.watch_files(files.iter().map(PathBuf::as_path));
        }
        let config_text = read_digest(&path);
        let sup = Supervisor::new(&config, clock, connect);
        let info = watch::Sender::new(Arc::new(DaemonState {
            config: path,
            generation: 1,
            loaded_at: sup.shared.clock.now(),
            last_reload: None,
        }));
        Daemon {
            config,
            controls,
            notifier: Notifier::from_env(),
            watcher,
            config_text,
            sup,
            info,
        }
    }

    /// The config it was made with (its accounts gone once started).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Every account's view, as published (the socket's and the metrics' source).
    pub fn views(&self) -> watch::Receiver<Accounts> {
        self.sup.views.subscribe()
    }

    /// What the daemon says about itself: its config, generation, last reload.
    pub fn info(&self) -> watch::Receiver<Arc<DaemonState>> {
        self.info.subscribe()
    }

    /// The accounts' counters.
    pub fn metrics(&self) -> Arc<crate::account::metrics::Metrics> {
        self.sup.shared.metrics.clone()
    }

    /// Joins the cluster (with `[cluster]`) and starts every account.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let (config, sup) = (&mut self.config, &mut self.sup);
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
        sup.retire_unknown(config);
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
        // Every account's provider is known to the refresh slots before the first
        // account can ask for one: else, on a busy machine, the first accounts of a
        // provider that hangs could take every slot before the last accounts started.
        let shared = sup.shared.clone();
        let _known = shared.slots.know_all(
            accounts
                .iter()
                .map(|a| crate::account::engine::Providers::of(a))
                .collect(),
        );
        shared
            .metrics
            .prepare(accounts.iter().map(|a| a.name.as_str()));
        shared.siblings.reserve(accounts.len());
        for a in accounts {
            let endpoint = sup
                .connect
                .connect(a.clone(), sup.shared.clock)
                .with_context(|| format!("account {}", a.name))?;
            sup.start(a, endpoint, TokenState::default(), false);
        }
        sup.publish();
        Ok(())
    }

    /// Runs until [`Control::Stop`] (SIGTERM, SIGINT) or `shutdown`: reloads on
    /// [`Control::Reload`] (SIGHUP) and on changes of the watched files, tells systemd READY=1 once every account had
    /// its first try (or at `startup_timeout`), then STATUS= and the watchdog.
    pub async fn run(&mut self, shutdown: CancellationToken) {
        let watchdog = systemd::watchdog_interval();
        let mut watchdog_tick =
            tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
        let startup_deadline = Instant::now() + self.config.daemon.startup_timeout;
        let mut ready = false;
        let mut status = String::new();
        loop {
            let summary = self.sup.summary();
            let summarized = Instant::now();
            if !ready && (self.sup.all_attempted() || Instant::now() >= startup_deadline) {
                ready = true;
                trim_heap();
                tracing::info!("ready: {summary}");
                self.notifier.ready(&summary);
                status = summary;
            } else if ready && summary != status {
                self.notifier.status(&summary);
                status = summary;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(control) = self.controls.recv() => {
                    if self.apply(control).await == Control::Stop {
                        break;
                    }
                }
                _ = self.sup.shared.changed.notified() => {
                    // The summary looks at every account: with thousands of accounts
                    // publishing at start, it is made at most every SUMMARY_EVERY.
                    tokio::time::sleep_until(summarized + SUMMARY_EVERY).await;
                }
                _ = tokio::time::sleep_until(startup_deadline), if !ready => {}
                _ = watchdog_tick.tick(), if watchdog.is_some() => self.notifier.watchdog(),
            }
        }
        self.notifier.stopping();
    }

    /// Stops every account (SPEC §6: within a second, longer only for refresh_token
    /// requests on the wire).
    pub async fn shutdown(self) {
        self.sup.shutdown().await;
    }

    /// Acts on `control`; returns [`Control::Stop`] when the daemon is to stop (asked
    /// for now, or while file events were being coalesced).
    async fn apply(&mut self, control: Control) -> Control {
        match control {
            Control::Stop => Control::Stop,
            Control::Reload => {
                // SIGHUP is also how an operator without a working file watch says a
                // secret file changed: its accounts are looked at too.
                tracing::info!("reloading {}", self.config.path.display());
                self.reload();
                self.sup.check_secrets();
                Control::Reload
            }
            Control::FilesChanged => self.files_changed().await,
        }
    }

    /// Reads the config file again and applies it, and watches the files it names.
    fn reload(&mut self) {
        let path = self.config.path.clone();
        self.config_text = self.sup.reload_from(&path, &self.notifier, &self.info);
        if let Some(w) = &mut self.watcher {
            w.watch_files(self.sup.watched_files(&path).iter().map(PathBuf::as_path));
        }
    }

    /// A watched file changed: a reload if the config's text did, and a look at the
    /// secret files either way. Returns [`Control::Stop`] if one came meanwhile.
    async fn files_changed(&mut self) -> Control {
        // Let a burst of events (write, rename, chmod, symlink swap) settle; what else
        // came meanwhile is kept: a reload asked for is done by this one, a stop ends it.
        tokio::time::sleep(WATCH_SETTLE).await;
        let mut then = Control::FilesChanged;
        while let Ok(c) = self.controls.try_recv() {
            match c {
                Control::Stop => return Control::Stop,
                Control::Reload => then = Control::Reload,
                Control::FilesChanged => {}
            }
        }
        // Watched afresh before the file is read: an edit from here on is an event, one
        // made before is in what is read. (Watched afresh after a reload, an edit made
        // while the reload ran, and seen by the old watch only, was lost.)
        if let Some(w) = &mut self.watcher {
            w.rewatch();
        }
        if then == Control::Reload {
            tracing::info!("reloading {}", self.config.path.display());
            self.reload();
        } else if read_digest(&self.config.path) != self.config_text {
            tracing::info!("{} changed: reloading", self.config.path.display());
            self.reload();
        }
        self.sup.check_secrets();
        then
    }
}

/// The SHA-256 of the file at `path`, if it can be read: what tells a change of the
/// config from other events in its directory (kept rather than the text, which is
/// megabytes with thousands of accounts: issue #11).
pub(super) fn read_digest(path: &Path) -> Option<[u8; 32]> {
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
pub(super) fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers; it only walks the allocator's free lists,
    // under the allocator's own locks.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}
