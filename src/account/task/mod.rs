//! The schedule of one account in `run`: wait for the next planned refresh, a "refresh
//! now" poke, the retry of a failed delivery, the token's expiry or cancellation; ask
//! the refresh [`engine`](crate::account::engine) for an attempt; plan the next; publish the
//! state for readers. What an attempt does (lock, save, classify, deliver) lives in the
//! engine, not here.
//!
//! An account runs as a task that catches its own panics: the error is logged and the
//! loop starts again with backoff, from the state its engine last left (the engine
//! lives outside the loop that died). A daemon may hold ten thousand accounts (issue
//! #11), and one that waits has no task: its state is parked in its inbox, with an
//! [`alarm`](crate::account::alarms) for when its plan falls due, and whatever wakes it (the
//! alarm, a poke, a stop) spawns its task again. Accounts of a cluster keep their task
//! (they also wait for news from the cluster).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::account::alarms::{AlarmKey, Sleeper};
use crate::account::coordinator::Coordinator;
use crate::account::engine::{Engine, Shared};
use crate::account::persist::Saved;
use crate::account::state::{published, TokenState};
use crate::config::{Account, Output};
use crate::oauth::{Endpoint, Token};

mod cluster;
mod parking;
mod restore;
mod run;
mod timing;

use cluster::{changed, ClusterNews, Sharing};
use parking::{park, supervise};

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
    /// The operator's `tokend reseed`: the refresh-token chain starts again from the
    /// configured refresh_token, now.
    Reseed,
}

impl Poke {
    fn bit(self) -> u8 {
        match self {
            Poke::Refresh => 1,
            Poke::CredentialsChanged => 2,
            Poke::Force => 4,
            Poke::Reseed => 8,
        }
    }
}

/// What an account's task shares with its handle and its readers: the pokes (a set:
/// pokes that arrive while one is handled coalesce), what to do once stopped, the
/// state the stopped engine left for its successor, and the account itself while it
/// waits without a task. One small allocation per account.
#[derive(Default)]
struct Inbox {
    /// One lock for what is not an atomic (a lock costs every account a word, issue
    /// #11); never held while a parked account resumes, and the only lock taken under
    /// it is the alarms' queue (parking sets the alarm), which takes none.
    held: Mutex<Held>,
    /// Stopped: the account's tasks end (one that starts now is cancelled at once).
    stopped: AtomicBool,
    wake: Notify,
    /// [`Poke::bit`]s not yet looked at.
    pokes: AtomicU8,
    /// Move the saved state to `retired/` (the account was removed).
    retire: AtomicBool,
    /// Look for stale temporary files beside the outputs before the engine opens.
    clean_stale: AtomicBool,
}

/// What an inbox holds under its lock.
#[derive(Default)]
struct Held {
    /// The account while it waits without a task.
    parked: Option<Box<dyn Parked>>,
    /// The cancellation of the task running now, if any (issue #11: an account that
    /// waits holds none).
    run: Option<CancellationToken>,
    /// Outputs to remove (the account's, or those a new config no longer has).
    remove: Vec<Output>,
    /// The engine's state once the task ended, for the account's next instance.
    last: Option<Box<Saved>>,
}

impl Inbox {
    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held
            .lock()
            .expect("never poisoned: no panics under the lock")
    }

    /// Stops the account: cancels its running task, or wakes its parked one to finish.
    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        if let Some(run) = &self.held().run {
            run.cancel();
        }
        self.unpark(None, Woke::Cancelled, None);
    }

    /// The cancellation of a task of this account that starts now (a child of `root`):
    /// cancelled already if the account was stopped.
    fn start_run(&self, root: &CancellationToken) -> CancellationToken {
        let run = root.child_token();
        self.held().run = Some(run.clone());
        if self.stopped.load(Ordering::SeqCst) {
            run.cancel();
        }
        run
    }

    fn poke(&self, poke: Poke) {
        self.pokes.fetch_or(poke.bit(), Ordering::SeqCst);
        self.wake.notify_one();
        self.unpark(None, Woke::Poked, None);
    }

    /// Starts the parked account's task again, if it is parked (with `alarm`: if it is
    /// parked on that alarm); the task holds `permit` until it parks again. Whoever
    /// parks looks at the pokes and the cancellation under the same lock, after they
    /// were set: no wake-up is lost.
    fn unpark(&self, alarm: Option<AlarmKey>, woke: Woke, permit: Option<OwnedSemaphorePermit>) {
        let parked = {
            let slot = &mut self.held().parked;
            if alarm.is_some() && slot.as_ref().map(|p| p.alarm()) != Some(alarm) {
                return;
            }
            slot.take()
        };
        if let Some(p) = parked {
            p.resume(woke, permit);
        }
    }
}

impl Sleeper for Inbox {
    fn ring(&self, key: AlarmKey, permit: OwnedSemaphorePermit) {
        self.unpark(Some(key), Woke::Timer, Some(permit));
    }
}

/// An account parked in its inbox: what wakes it starts its task again.
trait Parked: Send {
    /// The alarm set for it.
    fn alarm(&self) -> Option<AlarmKey>;
    /// Spawns its task, to handle `woke`, holding `permit` until it parks again.
    fn resume(self: Box<Self>, woke: Woke, permit: Option<OwnedSemaphorePermit>);
}

/// A reader's view of a running account (the socket server, readiness, status): its
/// config, its published state, and a way to ask for a refresh. Cheap to clone.
#[derive(Clone)]
pub struct AccountView {
    pub account: Arc<Account>,
    pub state: published::Receiver<TokenState>,
    /// Cluster mode: this member's place in its cluster.
    pub cluster: Option<Arc<dyn crate::account::coordinator::ClusterStatus>>,
    inbox: Arc<Inbox>,
}

impl AccountView {
    /// Asks for a refresh now (still no sooner than `min_refresh_interval` after the
    /// last request, and not while the account is held after a refused credential).
    /// Pokes coalesce.
    pub fn refresh_now(&self) {
        self.inbox.poke(Poke::Refresh);
    }

    /// Asks for one attempt now, ending a hold or a rate-limit wait (SPEC §4
    /// `?force=true`; only for root or the daemon's own user: the caller checks).
    pub fn force_refresh(&self) {
        self.inbox.poke(Poke::Force);
    }

    /// Tells the account one of its secret files changed: a hold after refused
    /// credentials ends, and the provider is asked now.
    pub fn credentials_changed(&self) {
        self.inbox.poke(Poke::CredentialsChanged);
    }

    /// Starts the account's refresh-token chain again from its configured seed, now
    /// (`tokend reseed`; only for root or the daemon's own user: the caller checks).
    pub fn reseed(&self) {
        self.inbox.poke(Poke::Reseed);
    }

    /// A view with no task behind it: its refresh requests go nowhere. For the socket
    /// API's fuzz target (`fuzz/`), which answers requests without running accounts.
    #[doc(hidden)]
    pub fn detached(account: Arc<Account>, state: published::Receiver<TokenState>) -> Self {
        AccountView {
            account,
            state,
            cluster: None,
            inbox: Default::default(),
        }
    }
}

/// The supervisor's end of a running account.
pub struct AccountHandle {
    pub view: AccountView,
}

impl AccountHandle {
    /// Stops the account. A refresh_token request already sent is still awaited and its
    /// answer saved; then `remove` outputs go, and with `retire` the saved state moves
    /// to `retired/`. Returns what a successor must wait for.
    pub fn stop(&self, retire: bool, remove: Vec<Output>) -> Predecessor {
        let inbox = &self.view.inbox;
        inbox.retire.store(retire, Ordering::SeqCst);
        inbox.held().remove = remove;
        inbox.stop();
        Predecessor {
            state: self.view.state.clone(),
            inbox: inbox.clone(),
            state_account: self.view.account.clone(),
        }
    }

    /// Stops the account for the daemon's shutdown (after the token it was spawned with
    /// was cancelled, which a parked account does not see): its last request is
    /// answered and its state saved; nothing is removed.
    pub fn halt(&self) {
        self.view.inbox.stop();
    }
}

/// A stopped (or stopping) account that a new one of the same name starts after: its
/// last request answered and saved, its lock released. Its task is over when the
/// sender of its state is gone.
#[derive(Clone)]
pub struct Predecessor {
    state: published::Receiver<TokenState>,
    inbox: Arc<Inbox>,
    state_account: Arc<Account>,
}

impl Predecessor {
    /// The account as it was configured.
    pub fn account(&self) -> Arc<Account> {
        self.state_account.clone()
    }

    pub fn is_done(&self) -> bool {
        self.state.has_changed().is_err()
    }

    /// Waits until the task is over; the state its engine left, if any.
    async fn finished(mut self) -> Option<Box<Saved>> {
        while self.state.changed().await.is_ok() {}
        self.inbox.held().last.take()
    }
}

/// Starts the refresh loop of `account` on `tracker`, from its saved state if any.
/// Cancelling `cancel` (which many accounts may share) stops a running task; the
/// handle's [`AccountHandle::stop`] or [`AccountHandle::halt`] stops the account
/// whether it runs or waits parked.
pub fn spawn<E: Endpoint>(
    account: Arc<Account>,
    endpoint: E,
    shared: Shared,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> AccountHandle {
    spawn_after(
        account,
        endpoint,
        shared,
        None,
        TokenState::default(),
        cancel,
        tracker,
    )
}

/// Starts the refresh loop of `account` on `tracker` once `after` (the account's
/// previous instance) is done; readers see `initial` until the task publishes.
pub fn spawn_after<E: Endpoint>(
    account: Arc<Account>,
    endpoint: E,
    shared: Shared,
    after: Option<Predecessor>,
    initial: TokenState,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> AccountHandle {
    spawn_coordinated(
        account, endpoint, shared, None, after, initial, true, cancel, tracker,
    )
}

/// [`spawn_after`], for an account whose refreshes `coordinator` shares with other
/// tokend instances (cluster mode). Without `clean_stale` the account does not look for
/// temporary files a killed writer left beside its outputs (the daemon's start does that
/// for all accounts at once: [`output::clean_stale_all`]).
#[allow(clippy::too_many_arguments)]
pub fn spawn_coordinated<E: Endpoint>(
    account: Arc<Account>,
    endpoint: E,
    shared: Shared,
    coordinator: Option<Box<dyn Coordinator>>,
    after: Option<Predecessor>,
    initial: TokenState,
    clean_stale: bool,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> AccountHandle {
    let (state_tx, state_rx) = published::channel(initial);
    let known = KnownProvider::new(&shared, &account);
    let inbox = Arc::new(Inbox {
        clean_stale: AtomicBool::new(clean_stale),
        ..Inbox::default()
    });
    let cluster = coordinator.as_ref().map(|c| c.status());
    let live = Box::new(Live {
        parts: Parts {
            account: account.clone(),
            endpoint: Arc::new(endpoint),
            shared,
            state: state_tx,
            inbox: inbox.clone(),
            root: cancel,
            tracker: tracker.clone(),
            _provider: known,
        },
        engine: Slot::Closed(None),
        coordinator,
        plan: None,
        expired: None,
        timed: None,
        deaths: 0,
        alarm: None,
        next_boot: Duration::ZERO,
    });
    if after.is_none() && live.coordinator.is_none() {
        // Parked at once, due now: the alarms start the tasks, at most
        // a few at a time (see `Alarms::new`; at start every account is due).
        if let Some((live, woke)) = park(live, Instant::now(), &mut None) {
            live.parts
                .tracker
                .clone()
                .spawn(supervise(live, None, Some(woke), None));
        }
    } else {
        tracker.spawn(supervise(live, after, None, None));
    }
    AccountHandle {
        view: AccountView {
            account,
            state: state_rx,
            cluster,
            inbox,
        },
    }
}

/// What an account's task is made of; all of it outlives a loop that dies.
struct Parts<E> {
    account: Arc<Account>,
    endpoint: Arc<E>,
    shared: Shared,
    state: published::Sender<TokenState>,
    inbox: Arc<Inbox>,
    /// Cancelling it stops the account's running task (not a parked one: see
    /// [`AccountHandle::halt`]). Each task runs under a child of it.
    root: CancellationToken,
    /// Where the account's task is spawned again when it wakes.
    tracker: TaskTracker,
    /// Its provider, counted among those kept a refresh slot while the account lives.
    _provider: KnownProvider,
}

/// An account's provider, known to the refresh slots ([`crate::account::slots`]) for as long as
/// this lives.
struct KnownProvider {
    shared: Shared,
    provider: Arc<str>,
}

impl KnownProvider {
    fn new(shared: &Shared, account: &Account) -> Self {
        let provider = shared
            .slots
            .know(&crate::account::engine::Providers::of(account));
        KnownProvider {
            shared: shared.clone(),
            provider,
        }
    }
}

impl Drop for KnownProvider {
    fn drop(&mut self) {
        self.shared.slots.forget(&self.provider);
    }
}

/// An account: what its task works with, kept whole between its tasks (boxed: a parked
/// account is this one allocation and its alarm).
struct Live<E> {
    parts: Parts<E>,
    engine: Slot<E>,
    coordinator: Option<Box<dyn Coordinator>>,
    /// None until the loop has restored (again after a panic).
    plan: Option<Plan>,
    /// The token whose expiry was already acted on.
    expired: Option<Arc<Token>>,
    /// When the held token expires on the boot clock.
    timed: Option<Timed>,
    /// Panics so far (the restart's backoff grows with them).
    deaths: u32,
    /// While parked: its alarm, and when its next request is due on the boot clock.
    alarm: Option<AlarmKey>,
    next_boot: Duration,
}

/// The account's engine, or, until it opens, the state its predecessor left. Not
/// boxed: the engine is the one thing the task holds for its whole life, and one
/// enum for both keeps the task under a 128-byte step of its allocation (issue #11).
#[allow(clippy::large_enum_variant)]
enum Slot<E> {
    Closed(Option<Box<Saved>>),
    Open(Engine<E>),
}

struct Task<'a, E> {
    parts: &'a Parts<E>,
    /// Stops this run of the account.
    cancel: &'a CancellationToken,
    /// The token whose expiry was already acted on, so an expired token is expired
    /// once (a pointer: what a waiting task holds is counted, issue #11).
    expired: Option<Arc<Token>>,
    /// When the held token expires on the boot clock.
    timed: Option<Timed>,
}

/// A token's expiry on the boot clock, taken when the task first saw it: the provider
/// counts its lifetime in real seconds, which a wall clock set since does not change.
#[derive(Clone, Copy)]
struct Timed {
    /// The token's `expires_at` when it was timed (which token this is for).
    expires_at: SystemTime,
    deadline: Duration,
}

/// What the loop waits for next.
struct Plan {
    /// The next request to the provider.
    next: Instant,
    /// The end of a hold after refused credentials (only a credential change or a
    /// forced refresh ends it sooner).
    hold_until: Option<Instant>,
    /// The retry of a failed delivery (no request).
    redeliver: Option<Instant>,
    last_attempt: Option<Instant>,
}

/// What woke a waiting account.
#[derive(Clone, Copy)]
enum Woke {
    Cancelled,
    Poked,
    Cluster,
    Timer,
}

/// How the loop ends.
enum Exit {
    Stop,
    /// Nothing to do until `wake` (or a poke): park (the plan's next request is due at
    /// `next_boot` on the boot clock: a suspend does not delay it).
    Park {
        wake: Instant,
        next_boot: Duration,
    },
}

/// What the loop does after handling a wake-up.
enum Then {
    Wait,
    Stop,
    /// Ask the provider (or take an identical account's token): `force` when the
    /// operator forced it, `leading` when this member leads the account's cluster.
    Attempt {
        force: bool,
        leading: bool,
    },
}

impl<'a, E: Endpoint> Task<'a, E> {
    pub(super) fn account(&self) -> &'a Account {
        &self.parts.account
    }

    pub(super) fn now(&self) -> SystemTime {
        self.parts.shared.clock.now()
    }

    /// Changes the published state and tells the supervisor.
    pub(super) fn publish(&self, f: impl FnOnce(&mut TokenState)) {
        self.parts.state.send_modify(f);
        self.parts.shared.changed.notify_one();
    }

    pub(super) fn publish_next(&self, next: Instant) {
        let at = self.wall(next);
        self.publish(|s| s.next_attempt = Some(at));
    }
}
