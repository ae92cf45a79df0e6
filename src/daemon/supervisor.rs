//! The supervisor: the map of running accounts, their starts and stops, a reload's
//! diff (which accounts start, stop, restart or are renamed), and the summary systemd
//! and the socket are told.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::account::identity::{CredentialsDigest, RequestIdentity};
use crate::account::{
    self, persist, AccountHandle, Accounts, ByName, Predecessor, Shared, TokenState,
};
use crate::clock::Clock;
use crate::config::{Account, Config, Output, SecretReads};
use crate::systemd::Notifier;

use super::wiring::Connect;
use super::{read_digest, trim_heap, DaemonState, ReloadOutcome, SHUTDOWN_GRACE};

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

pub(super) struct Supervisor<C> {
    accounts: BTreeMap<ByName, Running>,
    pub(super) shared: Shared,
    pub(super) cancel: CancellationToken,
    pub(super) tracker: TaskTracker,
    pub(super) views: watch::Sender<Accounts>,
    /// Accounts stopped by a reload whose task may still be finishing (a refresh_token
    /// request on the wire): an account of the same name starts after it.
    pub(super) stopping: BTreeMap<String, Predecessor>,
    /// This tokend in its cluster, with `[cluster]`.
    pub(super) member: Option<crate::cluster::Joined>,
    pub(super) on_cluster_loss: crate::config::OnClusterLoss,
    /// The `[cluster]` joined at start (changes take effect at a restart).
    pub(super) cluster: Option<crate::config::ClusterConfig>,
    /// How accounts reach their providers (HTTP clients, shared by accounts that
    /// connect the same way).
    pub(super) connect: C,
}

/// How long SIGTERM waits for refresh_token requests on the wire (SPEC §6).
const ROTATION_GRACE: Duration = Duration::from_secs(10);

impl<C: Connect> Supervisor<C> {
    pub(super) fn new(config: &Config, clock: Clock, connect: C) -> Self {
        Supervisor {
            accounts: BTreeMap::new(),
            shared: Shared::new(
                config.daemon.max_concurrent_refreshes,
                clock,
                config.daemon.state_dir.clone(),
            ),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            views: watch::Sender::new(Accounts::default()),
            stopping: BTreeMap::new(),
            member: None,
            on_cluster_loss: crate::config::OnClusterLoss::Refresh,
            cluster: config.cluster.clone(),
            connect,
        }
    }

    /// Reads, validates and applies the config at `path`, between systemd's
    /// RELOADING=1 and READY=1; an invalid config, or one with an account that cannot
    /// start, is logged and changes nothing. Returns the digest of the file as read, to
    /// tell later whether it changed.
    pub(super) fn reload_from(
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
    pub(super) fn watched_files(&self, config: &Path) -> Vec<PathBuf> {
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

    /// Pokes every account whose credentials changed since last looked at. A secret file
    /// that several accounts name is read once ([`SecretReads`]).
    pub(super) fn check_secrets(&mut self) {
        let mut reads = SecretReads::default();
        for (name, h) in &mut self.accounts {
            let now = CredentialsDigest::in_memory(&h.view.account, &mut reads);
            if now != h.credentials {
                tracing::info!(account = %name, "a secret changed");
                h.credentials = now;
                h.view.credentials_changed();
            }
        }
    }

    pub(super) fn all_attempted(&self) -> bool {
        self.accounts
            .values()
            .all(|h| h.view.state.borrow().attempted)
    }

    /// One line for systemd's STATUS=: "3 accounts: 2 fresh, 1 failing".
    pub(super) fn summary(&self) -> String {
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
    pub(super) fn publish(&mut self) {
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
    pub(super) fn retire_unknown(&self, config: &Config) {
        if let Some(dir) = &self.shared.state_dir {
            let names: Vec<&str> = config.accounts.iter().map(|a| a.name.as_str()).collect();
            persist::retire_unknown(dir, &names);
        }
    }

    /// Starts an account: after its previous instance, if one is still finishing;
    /// readers see `initial` until it publishes. With `clean_stale` it first removes
    /// temporary files a killed writer left beside its outputs.
    pub(super) fn start(
        &mut self,
        account: Arc<Account>,
        endpoint: C::Endpoint,
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
        let credentials = CredentialsDigest::in_memory(&account, &mut SecretReads::default());
        self.accounts.insert(
            ByName(account.clone()),
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
    pub(super) fn reload(&mut self, config: Config) -> Result<(), String> {
        if config.cluster != self.cluster {
            tracing::warn!("[cluster] changed: that takes effect at the next restart");
        }
        let configured: HashSet<String> = config.accounts.iter().map(|a| a.name.clone()).collect();
        let wanted: Vec<Account> = config
            .accounts
            .into_iter()
            .filter(|a| {
                self.accounts
                    .get(a.name.as_str())
                    .is_none_or(|h| *h.view.account != *a)
            })
            .collect();
        // Every account that starts is built first: a reload is taken whole or not at all.
        let mut ready = Vec::new();
        let mut problems = Vec::new();
        for a in wanted {
            let a = Arc::new(a);
            match self.connect.connect(a.clone(), self.shared.clock) {
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
            .map(ByName::name)
            .filter(|n| !configured.contains(*n))
            .map(str::to_owned)
            .collect();
        for name in removed {
            tracing::info!(account = %name, "account removed");
            let old = self
                .accounts
                .remove(name.as_str())
                .expect("name came from the map");
            let p = old.stop(true, old.view.account.outputs.clone());
            self.stopping.insert(name, p);
        }
        // As at start ([`super::Daemon::start`]): every provider of the accounts that
        // start is known to the refresh slots before the first of them can ask for one.
        let shared = self.shared.clone();
        let _known = shared.slots.know_all(
            ready
                .iter()
                .map(|(_, a, _)| crate::account::engine::Providers::of(a))
                .collect(),
        );
        for (name, new, endpoint) in ready {
            if !self.stopping.contains_key(&name) && !self.accounts.contains_key(name.as_str()) {
                // A renamed account of the refresh_token grant starts after the account
                // it was (whose chain it resumes: persist::load_for), not beside it.
                if let Some(old) = self.renamed_from(&new) {
                    let p = self.stopping.remove(&old).expect("found in the map");
                    tracing::info!(account = %name, from = %old, "the same refresh_token as the removed account {old:?}: starting after it, to resume its chain");
                    self.stopping.insert(name.clone(), p);
                }
            }
            let mut initial = TokenState::default();
            if let Some(old) = self.accounts.remove(name.as_str()) {
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
        // Clients no account uses are dropped; accounts that discover their token
        // endpoint do so again before their next request (SPEC §1: discovery at start
        // and reload).
        self.connect.reloaded();
        Ok(())
    }

    /// A removed account (still stopping) whose configured refresh_token is `new`'s: the
    /// account `new` was renamed from.
    pub(super) fn renamed_from(&self, new: &Account) -> Option<String> {
        let crate::config::Grant::RefreshToken { refresh_token } = &new.grant else {
            return None;
        };
        self.stopping.iter().find_map(|(name, p)| {
            let old = p.account();
            match &old.grant {
                crate::config::Grant::RefreshToken {
                    refresh_token: seed,
                } if seed == refresh_token && !self.accounts.contains_key(name.as_str()) => {
                    Some(name.clone())
                }
                _ => None,
            }
        })
    }

    pub(super) async fn shutdown(self) {
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
