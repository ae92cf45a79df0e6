//! The schedule of one account in `run`: wait for the next planned refresh, a "refresh
//! now" poke, the retry of a failed delivery, the token's expiry or cancellation; ask
//! the refresh [`engine`](super::engine) for an attempt; plan the next; publish the
//! state for readers. What an attempt does (lock, save, classify, deliver) lives in the
//! engine, not here.
//!
//! An account runs as a task that catches its own panics: the error is logged and the
//! loop starts again with backoff, from the state its engine last left (the engine
//! lives outside the loop that died). A daemon may hold ten thousand accounts (issue
//! #11), and one that waits has no task: its state is parked in its inbox, with an
//! [`alarm`](super::alarms) for when its plan falls due, and whatever wakes it (the
//! alarm, a poke, a stop) spawns its task again. Accounts of a cluster keep their task
//! (they also wait for news from the cluster).

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::FutureExt as _;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::alarms::{AlarmKey, Sleeper};
use super::coordinator::{Claim, Coordinator, Turn};
use super::engine::{Attempt, Engine, Failed, Shared};
use super::persist::{Saved, WaitKind};
use super::schedule::{self, ErrorClass};
use super::state::{published, Status, TokenState};
use crate::config::{Account, Output};
use crate::oauth::{Endpoint, Token};
use crate::output;

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
    /// The account while it waits without a task.
    parked: Mutex<Option<Box<dyn Parked>>>,
    /// Stopped: the account's tasks end (one that starts now is cancelled at once).
    stopped: AtomicBool,
    /// The cancellation of the task running now, if any (issue #11: an account that
    /// waits holds none).
    run: Mutex<Option<CancellationToken>>,
    wake: Notify,
    /// [`Poke::bit`]s not yet looked at.
    pokes: AtomicU8,
    /// Move the saved state to `retired/` (the account was removed).
    retire: AtomicBool,
    /// Outputs to remove (the account's, or those a new config no longer has).
    remove: Mutex<Vec<Output>>,
    /// The engine's state once the task ended, for the account's next instance.
    last: Mutex<Option<Box<Saved>>>,
    /// Look for stale temporary files beside the outputs before the engine opens.
    clean_stale: AtomicBool,
}

impl Inbox {
    /// Stops the account: cancels its running task, or wakes its parked one to finish.
    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        if let Some(run) = &*self.run.lock().expect("never poisoned") {
            run.cancel();
        }
        self.unpark(None, Woke::Cancelled, None);
    }

    /// The cancellation of a task of this account that starts now (a child of `root`):
    /// cancelled already if the account was stopped.
    fn start_run(&self, root: &CancellationToken) -> CancellationToken {
        let run = root.child_token();
        *self.run.lock().expect("never poisoned") = Some(run.clone());
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
            let mut slot = self.parked.lock().expect("never poisoned");
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
    pub cluster: Option<Arc<dyn super::coordinator::ClusterStatus>>,
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
        *inbox.remove.lock().expect("never poisoned") = remove;
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
        self.inbox.last.lock().expect("never poisoned").take()
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
        deaths: 0,
        alarm: None,
        awake: None,
        next_wall: SystemTime::UNIX_EPOCH,
    });
    if after.is_none() && live.coordinator.is_none() {
        // Parked at once, due now: the alarms start the tasks, at most
        // a few at a time (see `Alarms::new`; at start every account is due).
        if let Some((live, woke)) = park(live, Instant::now()) {
            live.parts
                .tracker
                .clone()
                .spawn(supervise(live, None, Some(woke)));
        }
    } else {
        tracker.spawn(supervise(live, after, None));
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

/// An account's provider, known to the refresh slots ([`super::slots`]) for as long as
/// this lives.
struct KnownProvider {
    shared: Shared,
    provider: String,
}

impl KnownProvider {
    fn new(shared: &Shared, account: &Account) -> Self {
        let provider = super::engine::Providers::of(account);
        shared.slots.know(&provider);
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
    /// Panics so far (the restart's backoff grows with them).
    deaths: u32,
    /// While parked: its alarm, and when its next request is due on the wall clock.
    alarm: Option<AlarmKey>,
    /// While it runs because its alarm rang: one of the few places of accounts awake at
    /// once ([`Alarms::new`](super::alarms::Alarms::new)); given back when it parks, or
    /// while it waits for a refresh slot its provider's share does not give it.
    awake: Option<OwnedSemaphorePermit>,
    next_wall: SystemTime,
}

impl<E: Endpoint> Parked for Live<E> {
    fn alarm(&self) -> Option<AlarmKey> {
        self.alarm
    }

    fn resume(mut self: Box<Self>, woke: Woke, permit: Option<OwnedSemaphorePermit>) {
        let tracker = self.parts.tracker.clone();
        self.awake = permit;
        tracker.spawn(supervise(self, None, Some(woke)));
    }
}

/// Parks `live` in its inbox with an alarm at `wake`; it is the inbox's now. Unless it
/// was poked or stopped meanwhile: then it is handed back, with what woke it.
fn park<E: Endpoint>(mut live: Box<Live<E>>, wake: Instant) -> Option<(Box<Live<E>>, Woke)> {
    let inbox = live.parts.inbox.clone();
    let mut slot = inbox.parked.lock().expect("never poisoned");
    if inbox.stopped.load(Ordering::SeqCst) || live.parts.root.is_cancelled() {
        return Some((live, Woke::Cancelled));
    }
    if inbox.pokes.load(Ordering::SeqCst) != 0 {
        return Some((live, Woke::Poked));
    }
    let sleeper: Arc<dyn Sleeper> = inbox.clone();
    live.awake = None;
    live.alarm = Some(live.parts.shared.alarms.set(wake, sleeper));
    *slot = Some(live);
    *inbox.run.lock().expect("never poisoned") = None;
    None
}

/// The account's task: runs its loop (after its predecessor, at the first start), and
/// again (with backoff) whenever the loop panics, until the account parks or is
/// cancelled; then the farewell. The engine lives in `live`, so a restarted loop goes
/// on from the state the dead one left, lock included.
async fn supervise<E: Endpoint>(
    mut live: Box<Live<E>>,
    after: Option<Predecessor>,
    woke: Option<Woke>,
) {
    if let Some(p) = after {
        if !p.is_done() {
            tracing::info!(account = %live.parts.account.name, "waiting for the account's previous configuration to finish its request");
        }
        // Not cancellable: a successor that gave up here could hand an older state on.
        live.engine = Slot::Closed(Box::pin(p.finished()).await);
    }
    if let Some(key) = live.alarm.take() {
        live.parts.shared.alarms.unset(key);
    }
    let cancel = live.parts.inbox.start_run(&live.parts.root);
    let mut woke = woke.map(|w| (w, live.next_wall));
    loop {
        let live_ = &mut *live;
        let mut task = Task {
            parts: &live_.parts,
            cancel: &cancel,
            expired: live_.expired.take(),
        };
        let run = task.run(
            &mut live_.engine,
            &mut live_.coordinator,
            &mut live_.plan,
            &mut live_.awake,
            woke.take(),
        );
        let outcome = AssertUnwindSafe(run).catch_unwind().await;
        live_.expired = task.expired.take();
        let died = match outcome {
            Ok(Exit::Stop) => break,
            Ok(Exit::Park { wake, next_wall }) => {
                live.next_wall = next_wall;
                match park(live, wake) {
                    None => return,
                    Some((back, w)) => {
                        live = back;
                        woke = Some((w, next_wall));
                        continue;
                    }
                }
            }
            Err(payload) => panic_message(payload),
        };
        // Restored again: the loop that died may have left its plan half made.
        live_.plan = None;
        live_.deaths += 1;
        let deaths = live_.deaths;
        let parts = &live_.parts;
        let wait = schedule::backoff(deaths, &mut rand::thread_rng()).max(Duration::from_secs(1));
        tracing::error!(account = %parts.account.name, restart_in = wait.as_secs(), "account task died ({died}): restarting it");
        task.publish(|s| {
            s.status = Status::Failing;
            s.last_error = Some(format!("internal error ({died}); restarting"));
            s.attempted = true;
        });
        let cancelled = Box::pin(async {
            tokio::select! {
                _ = cancel.cancelled() => true,
                _ = tokio::time::sleep(wait) => false,
            }
        });
        if cancelled.await {
            break;
        }
    }
    if let Some(c) = &live.coordinator {
        c.resign().await;
    }
    let Live { parts, engine, .. } = *live;
    Box::pin(farewell(&parts, engine)).await;
    *parts.inbox.run.lock().expect("never poisoned") = None;
}

/// The account's engine, or, until it opens, the state its predecessor left. Not
/// boxed: the engine is the one thing the task holds for its whole life, and one
/// enum for both keeps the task under a 128-byte step of its allocation (issue #11).
#[allow(clippy::large_enum_variant)]
enum Slot<E> {
    Closed(Option<Box<Saved>>),
    Open(Engine<E>),
}

/// After the loop: the engine's last save (and retirement), kept for the account's
/// next instance; then the outputs the supervisor asked to remove.
async fn farewell<E: Endpoint>(parts: &Parts<E>, engine: Slot<E>) {
    let retire = parts.inbox.retire.load(Ordering::SeqCst);
    if let Slot::Open(engine) = engine {
        let saved = engine.close(retire).await;
        *parts.inbox.last.lock().expect("never poisoned") = Some(Box::new(saved));
    }
    let remove = std::mem::take(&mut *parts.inbox.remove.lock().expect("never poisoned"));
    if !remove.is_empty() {
        let gone = Account {
            outputs: remove,
            ..(*parts.account).clone()
        };
        if let Err(e) = output::remove_all(&gone) {
            tracing::error!(account = %gone.name, "{e}");
        }
    }
}

/// How soon a member that does not lead looks again when a refresh is due (the
/// leader's token normally arrives first, through the watch).
const CLUSTER_RECHECK: Duration = Duration::from_secs(5);

/// How soon a leader looks again after the cluster refused its claim for good (another
/// identity spent the seed, a record that does not open): an operator has to act.
const CLUSTER_REFUSED_RECHECK: Duration = Duration::from_secs(60);

/// Counts a chain's claimed refresh as on the wire until its answer is shared: the
/// daemon's shutdown waits for it (`rotations`), as for the request itself.
struct Sharing<'a>(&'a tokio::sync::watch::Sender<usize>);

impl<'a> Sharing<'a> {
    fn start(tx: &'a tokio::sync::watch::Sender<usize>) -> Self {
        tx.send_modify(|n| *n += 1);
        Sharing(tx)
    }
}

impl Drop for Sharing<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// What news from the cluster means for this member.
enum ClusterNews {
    Stop,
    /// Nothing to do now.
    Nothing,
    /// It leads and the token is due.
    Due,
    /// It leads and another member asked for a refresh.
    Asked {
        force: bool,
    },
}

/// Resolves when the coordinator says shared state changed; never without one.
async fn changed(c: &mut Option<Box<dyn Coordinator>>) {
    match c {
        Some(c) => c.changed().await,
        None => std::future::pending().await,
    }
}

/// The message of a panic, if it is a string.
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

struct Task<'a, E> {
    parts: &'a Parts<E>,
    /// Stops this run of the account.
    cancel: &'a CancellationToken,
    /// The token whose expiry was already acted on, so an expired token is expired
    /// once (a pointer: what a waiting task holds is counted, issue #11).
    expired: Option<Arc<Token>>,
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
    /// `next_wall` on the wall clock).
    Park {
        wake: Instant,
        next_wall: SystemTime,
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
    fn account(&self) -> &'a Account {
        &self.parts.account
    }

    fn now(&self) -> SystemTime {
        self.parts.shared.clock.now()
    }

    /// The loop. Everything but the wait itself runs in boxed futures: a waiting task
    /// then holds only its plan and what it waits on, not the largest of what it does
    /// now and then (an attempt holds a whole HTTP request).
    /// Without a coordinator the loop does not wait: it returns to be parked, and goes
    /// on from `resumed` (what woke it) in its next task.
    async fn run(
        &mut self,
        slot: &mut Slot<E>,
        coordinator: &mut Option<Box<dyn Coordinator>>,
        plan: &mut Option<Plan>,
        awake: &mut Option<OwnedSemaphorePermit>,
        mut resumed: Option<(Woke, SystemTime)>,
    ) -> Exit {
        let parts = self.parts;
        if let Slot::Closed(in_memory) = slot {
            let Some(e) = Box::pin(self.open(in_memory.take())).await else {
                return Exit::Stop;
            };
            *slot = Slot::Open(e);
        }
        let Slot::Open(engine) = slot else {
            unreachable!("the engine was opened just above")
        };
        let plan = match plan {
            Some(p) => p,
            None => {
                let p = Box::pin(self.restore(engine)).await;
                // Joining or restarting a cluster: first what the cluster has, as on any
                // news from it (a fresh shared token costs the provider nothing, and the
                // leader is shown from the start, not from the next change).
                resumed = coordinator
                    .is_some()
                    .then(|| (Woke::Cluster, self.wall(p.next)));
                plan.insert(p)
            }
        };
        // The monotonic clock stops while the machine sleeps: when the wall clock jumps,
        // the plan is looked at again, so a refresh that fell due during a suspend
        // happens on resume. One watcher for all accounts; no timer of our own.
        let mut jumps = parts.shared.wall_jumps.seen(parts.shared.clock);
        loop {
            let wake = self
                .expiry_instant()
                .map_or(plan.next, |e| e.min(plan.next));
            let wake = plan.redeliver.map_or(wake, |r| r.min(wake));
            let (woke, next_wall) = match resumed.take() {
                Some(r) => r,
                // Due already (at start, every account is): no round trip to the alarms.
                None if coordinator.is_none() && wake <= Instant::now() => {
                    (Woke::Timer, self.wall(plan.next))
                }
                None if coordinator.is_none() => {
                    return Exit::Park {
                        wake,
                        next_wall: self.wall(plan.next),
                    }
                }
                None => {
                    let next_wall = self.wall(plan.next);
                    let woke = tokio::select! {
                        biased;
                        _ = self.cancel.cancelled() => Woke::Cancelled,
                        _ = parts.inbox.wake.notified() => Woke::Poked,
                        _ = changed(coordinator) => Woke::Cluster,
                        _ = sleep_until(wake) => Woke::Timer,
                        now = parts.shared.wall_jumps.after(jumps) => {
                            jumps = now;
                            Woke::Timer
                        }
                    };
                    (woke, next_wall)
                }
            };
            let then = Box::pin(self.woke(woke, engine, coordinator.as_deref(), plan, next_wall));
            let leading = match then.await {
                Then::Wait => continue,
                Then::Stop => return Exit::Stop,
                Then::Attempt { force, leading } => {
                    match self.provider_gate() {
                        // Parked until the provider may be asked (then it is due still).
                        Some(until) if !force && coordinator.is_none() => {
                            return Exit::Park {
                                wake: until,
                                next_wall: self.wall(plan.next),
                            }
                        }
                        Some(until) if !force => {
                            let waited = tokio::select! {
                                _ = self.cancel.cancelled() => false,
                                _ = sleep_until(until) => true,
                            };
                            if !waited {
                                return Exit::Stop;
                            }
                        }
                        _ => {}
                    }
                    leading
                }
            };
            plan.last_attempt = Some(Instant::now());
            self.publish(|s| s.status = Status::Refreshing);
            // The permit first, in this small loop, then the attempt's state (issue #11:
            // at start every account is due at once, and the heap keeps the shape of
            // the largest crowd it held).
            let provider = super::engine::Providers::of(self.account());
            let permit = match parts.shared.slots.try_acquire(&provider) {
                Ok(p) => p,
                Err(busy) => {
                    if busy == super::slots::Busy::Share {
                        // Its provider holds its share of the slots: it waits as a task,
                        // and the accounts whose alarms ring meanwhile (of other
                        // providers too) are not held back by it (issue 19). Waiting for
                        // a slot that any account may take next, it keeps its place
                        // among the few awake (issue #11: not every account a task).
                        awake.take();
                    }
                    tokio::select! {
                        biased;
                        _ = self.cancel.cancelled() => return Exit::Stop,
                        p = parts.shared.slots.acquire(&provider) => p,
                    }
                }
            };
            // Holding a slot, it needs no place among the awake: the slots bound it.
            awake.take();
            let attempt =
                Box::pin(self.attempt(engine, coordinator.as_deref(), plan, leading, permit));
            if let Then::Stop = attempt.await {
                return Exit::Stop;
            }
        }
    }

    /// Cleans stale temporary files (if asked to), then waits for the account's lock and
    /// opens its engine. None if cancelled meanwhile.
    async fn open(&self, in_memory: Option<Box<Saved>>) -> Option<Engine<E>> {
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

    /// Handles what woke the loop: a poke, news from the cluster, or a timer; says
    /// whether an attempt is due.
    async fn woke(
        &mut self,
        woke: Woke,
        engine: &mut Engine<E>,
        coordinator: Option<&dyn Coordinator>,
        plan: &mut Plan,
        next_wall: SystemTime,
    ) -> Then {
        let name = &self.account().name;
        let cancel = self.cancel;
        let mut force = false;
        // A refresh someone asked for (a poke here, or another member's request to this
        // leader): made even if the schedule says the token is not due.
        let mut asked = false;
        match woke {
            Woke::Cancelled => return Then::Stop,
            Woke::Poked => {
                let pokes = self.parts.inbox.pokes.swap(0, Ordering::SeqCst);
                let now = Instant::now();
                if pokes & Poke::Reseed.bit() != 0 {
                    if let Err(e) = engine.reseed().await {
                        // The next save tries again; the chain starts from the seed
                        // in memory meanwhile.
                        tracing::error!(account = %name, "{e}");
                    }
                }
                if pokes & (Poke::CredentialsChanged.bit() | Poke::Force.bit() | Poke::Reseed.bit())
                    != 0
                {
                    force = pokes & (Poke::Force.bit() | Poke::Reseed.bit()) != 0;
                    tracing::info!(account = %name, "{}", if force {
                        "refresh forced: any hold or rate-limit wait ends for one attempt"
                    } else {
                        "credentials changed: asking the provider now"
                    });
                    engine.end_hold().await;
                    plan.hold_until = None;
                } else if pokes == 0 {
                    // Pokes that came while the last were handled, already taken.
                    return Then::Wait;
                } else if plan.hold_until.is_some_and(|h| h > now) {
                    tracing::info!(account = %name, "refresh asked for, but the account is held after the provider refused its credentials");
                    return Then::Wait;
                } else {
                    let earliest = plan.last_attempt.map_or(now, |l| {
                        l + self.account().options.schedule.min_refresh_interval
                    });
                    if earliest > now {
                        plan.next = plan.next.min(earliest);
                        self.publish_next(plan.next);
                        return Then::Wait;
                    }
                }
                asked = true;
            }
            Woke::Cluster => {
                let Some(c) = coordinator else {
                    return Then::Wait;
                };
                match self.cluster_news(engine, c, plan).await {
                    ClusterNews::Stop => return Then::Stop,
                    ClusterNews::Nothing => return Then::Wait,
                    ClusterNews::Due => {}
                    ClusterNews::Asked { force: f } => {
                        if f {
                            tracing::info!(account = %name, "refresh forced by another member: any hold or rate-limit wait ends for one attempt");
                            engine.end_hold().await;
                            plan.hold_until = None;
                            force = true;
                        } else if plan.hold_until.is_some_and(|h| h > Instant::now()) {
                            tracing::info!(account = %name, "refresh asked for by another member, but the account is held after the provider refused its credentials");
                            return Then::Wait;
                        } else {
                            // No sooner than min_refresh_interval after the last request.
                            let now = Instant::now();
                            let earliest = plan.last_attempt.map_or(now, |l| {
                                l + self.account().options.schedule.min_refresh_interval
                            });
                            if earliest > now {
                                plan.next = plan.next.min(earliest);
                                self.publish_next(plan.next);
                                return Then::Wait;
                            }
                        }
                        asked = true;
                    }
                }
            }
            Woke::Timer => {
                let now = Instant::now();
                if plan.redeliver.is_some_and(|r| r <= now) {
                    plan.redeliver = None;
                    let outcome = engine.retry_delivery(cancel).await;
                    self.handle(outcome, plan);
                    return Then::Wait;
                }
                let due = now >= plan.next || self.now() >= next_wall;
                if !due {
                    if self.token_expired() {
                        if let Some(c) = coordinator {
                            // The cluster times its token by the lifetime it has left: a
                            // wall clock set forward does not expire it (it is timed anew).
                            self.retime(engine, c).await;
                        }
                    }
                    if self.token_expired() {
                        self.expire();
                    }
                    return Then::Wait;
                }
            }
        }

        let mut leading = false;
        if let Some(c) = coordinator {
            match self.turn(engine, c, plan, force, asked).await {
                Some(lead) => leading = lead,
                None => return Then::Wait,
            }
        }
        Then::Attempt { force, leading }
    }

    /// One attempt with `permit`, planned and published; shared with the cluster when
    /// this member `leading`.
    async fn attempt(
        &mut self,
        engine: &mut Engine<E>,
        coordinator: Option<&dyn Coordinator>,
        plan: &mut Plan,
        leading: bool,
        permit: super::slots::RefreshPermit<'_>,
    ) -> Then {
        let name = &self.account().name;
        // Cluster mode: the link is claimed right before it is sent (issue #20), and
        // shutdown waits for its answer to be shared (for a chain, the only copy of the
        // next link), as it waits for the request itself.
        let mut after = None;
        let _sharing = (leading && coordinator.is_some() && self.account().rotates())
            .then(|| Sharing::start(&self.parts.shared.rotations));
        if let (true, Some(c)) = (leading, coordinator) {
            match self.claim(engine, c, plan).await {
                Ok(a) => after = a,
                Err(()) => return Then::Wait,
            }
        }
        let mut outcome = engine.attempt_with(permit, self.cancel).await;
        if matches!(outcome, Attempt::Cancelled) {
            return Then::Stop;
        }
        if let (Some(c), Some((date, received))) =
            (coordinator, self.parts.endpoint.provider_date())
        {
            c.provider_date(date, received);
        }
        if let (Some(dead), Attempt::Failed(f)) = (&after, &mut outcome) {
            if f.class == ErrorClass::Rejected {
                f.message = format!("{}; the refresh token may have been spent by member {dead}, which died mid-request: re-seed (tokend reseed)", f.message);
            }
        }
        let fresh = matches!(outcome, Attempt::Fresh(_));
        self.handle(outcome, plan);
        if let (true, Some(c)) = (leading, coordinator) {
            let mut state = engine.portable();
            state.last_error = self.parts.state.borrow().last_error.clone();
            let expires_at = self
                .parts
                .state
                .borrow()
                .token
                .as_ref()
                .map(|t| t.expires_at);
            if c.share(state, fresh, expires_at).await {
                if fresh {
                    let me = c.me().to_owned();
                    self.publish(|s| s.refreshed_by = Some(me));
                }
            } else {
                tracing::warn!(account = %name, "the shared state moved on while refreshing: taking what is shared");
                self.follow(engine, c, plan).await;
            }
        }
        Then::Wait
    }

    /// Cluster mode: claims the link the engine is about to send. `Ok` with the member
    /// whose request with it died mid-way, if any; `Err` when nothing is to be sent now
    /// (`plan` says when to look again).
    async fn claim(
        &mut self,
        engine: &mut Engine<E>,
        c: &dyn Coordinator,
        plan: &mut Plan,
    ) -> Result<Option<String>, ()> {
        let name = &self.account().name;
        let claim = c.claim(engine.portable()).await;
        let now = Instant::now();
        match claim {
            Claim::Go { after } => return Ok(after),
            Claim::Wait { until, why } => {
                // Said once per wait (each claim has its own end).
                if plan.next != until {
                    tracing::info!(account = %name, "{why}");
                }
                plan.next = until;
            }
            Claim::Lost => {
                self.follow(engine, c, plan).await;
                if plan.next <= now {
                    plan.next = now + Duration::from_secs(1);
                }
            }
            Claim::Refuse(why) => {
                tracing::error!(account = %name, status = "failing", "{why}");
                let w = why.clone();
                self.publish(|s| {
                    s.last_error = Some(w);
                    s.attempted = true;
                });
                plan.next = now + CLUSTER_REFUSED_RECHECK;
            }
        }
        self.settle_status();
        self.publish_next(plan.next);
        Err(())
    }

    /// After an attempt that was not made: the status says what the account holds again.
    fn settle_status(&self) {
        let now = self.now();
        self.publish(|s| {
            if s.status == Status::Refreshing {
                s.status = if s.valid_token(now).is_none() && s.token.is_some() {
                    Status::Expired
                } else if s.last_error.is_some() {
                    Status::Failing
                } else if s.token.is_some() {
                    Status::Fresh
                } else {
                    Status::Pending
                };
            }
        });
    }

    /// Cluster mode, on news from the cluster: takes what others shared, and says
    /// whether this member (leading) has a refresh to make now: one another member
    /// asked for, or a due one (a new leader refreshes a due token at once, not at
    /// the next look).
    async fn cluster_news(
        &mut self,
        engine: &mut Engine<E>,
        c: &dyn Coordinator,
        plan: &mut Plan,
    ) -> ClusterNews {
        self.follow(engine, c, plan).await;
        // A leader that left frees its key: take the lead now, not when the token
        // falls due (failover within the lease's time to live).
        let turn = tokio::select! {
            _ = self.cancel.cancelled() => return ClusterNews::Stop,
            t = c.turn() => t,
        };
        let leader = match &turn {
            Turn::Lead => Some(c.me().to_owned()),
            Turn::Follow(other) => Some(other.clone()),
            Turn::Alone | Turn::Wait => None,
        };
        self.publish(|s| {
            s.degraded = leader.is_none();
            s.leader = leader;
        });
        if turn != Turn::Lead {
            return ClusterNews::Nothing;
        }
        if let Some(force) = c.asked().await {
            return ClusterNews::Asked { force };
        }
        if self.cluster_due(engine) {
            ClusterNews::Due
        } else {
            ClusterNews::Nothing
        }
    }

    /// Cluster mode: whether the account's token is due by its own schedule (or there
    /// is none), and no wait (a hold, a rate limit, a backoff) is on.
    fn cluster_due(&self, engine: &Engine<E>) -> bool {
        let now = self.now();
        if engine.wait().is_some_and(|(until, _)| until > now) {
            return false;
        }
        // The published token: timed as the cluster times it.
        let token = self.parts.state.borrow().valid_token(now).cloned();
        match token {
            None => true,
            Some(t) => {
                let policy = &self.account().options.schedule;
                now >= t.issued_at + schedule::refresh_delay(policy, t.lifetime(), 1.0)
            }
        }
    }

    /// Cluster mode: the shared token, timed on this member's clock, when it is valid
    /// and this member serves no valid token.
    fn unserved(&self, shared: &super::coordinator::Shared) -> Option<Arc<Token>> {
        let (issued_at, expires_at) = shared.times?;
        let now = self.now();
        if expires_at <= now || self.parts.state.borrow().valid_token(now).is_some() {
            return None;
        }
        let t = shared.state.token.as_ref()?.to_token();
        Some(Arc::new(Token {
            issued_at,
            expires_at,
            ..t
        }))
    }

    /// Cluster mode: serves the token timed as the cluster times it (by the lifetime it
    /// had left, on the monotonic clock), when that is more than two seconds off its
    /// times now: this member's wall clock was set since. No etcd call: also while cut off.
    async fn retime(&mut self, engine: &Engine<E>, c: &dyn Coordinator) {
        let token = {
            let s = self.parts.state.borrow();
            let Some(mine) = s.token.clone() else { return };
            let Some((issued_at, expires_at)) = c.timed(&mine) else {
                return;
            };
            let apart = match expires_at.duration_since(mine.expires_at) {
                Ok(d) => d,
                Err(e) => e.duration(),
            };
            if apart <= Duration::from_secs(2) {
                return;
            }
            Arc::new(Token {
                issued_at,
                expires_at,
                ..(*mine).clone()
            })
        };
        tracing::info!(account = %self.account().name, "the wall clock moved: the shared token is timed anew");
        if let Err(e) = engine.deliver(token.clone(), false).await {
            tracing::error!(account = %self.account().name, "{e}");
        }
        let now = self.now();
        self.publish(|s| {
            if s.status == Status::Expired && token.is_valid_at(now) {
                s.status = Status::Fresh;
            }
            s.token = Some(token);
        });
    }

    /// Cluster mode, when a refresh is due: whose turn it is. `Some(true)` when this
    /// instance leads and should ask the provider, `Some(false)` when it is cut off and
    /// allowed to on its own, `None` when it does not ask (another leads, a fresher
    /// shared token came, or the cluster is out of reach): `plan` says when to look again.
    async fn turn(
        &mut self,
        engine: &mut Engine<E>,
        c: &dyn Coordinator,
        plan: &mut Plan,
        force: bool,
        asked: bool,
    ) -> Option<bool> {
        let recheck = Instant::now() + CLUSTER_RECHECK;
        let turn = tokio::select! {
            // etcd may be slow to say it is out of reach: stopping does not wait for it.
            _ = self.cancel.cancelled() => return None,
            t = c.turn() => t,
        };
        match turn {
            Turn::Lead => {
                let me = c.me().to_owned();
                self.publish(|s| {
                    s.leader = Some(me);
                    s.degraded = false;
                });
                // Taking over: a fresh token another member shared, or its hold, first.
                self.follow(engine, c, plan).await;
                let now = Instant::now();
                let held = plan.hold_until.is_some_and(|h| h > now);
                // A wait the cluster shares (a rate limit, a hold) holds asked refreshes too.
                let waiting = engine
                    .wait()
                    .is_some_and(|(until, kind)| until > self.now() && kind != WaitKind::Backoff);
                let due = asked || plan.next <= now || self.cluster_due(engine);
                if !force && (held || waiting || !due) {
                    self.publish_next(plan.next);
                    return None;
                }
                Some(true)
            }
            Turn::Follow(leader) => {
                // Due: look again soon. Asked: readers waiting for the answer see that
                // it comes soon (it normally comes through the watch before that). Said
                // with the leader, in one change: a reader takes the first as the answer.
                if plan.next <= Instant::now() {
                    plan.next = recheck;
                } else if force || asked {
                    plan.next = plan.next.min(recheck);
                }
                let next = self.wall(plan.next);
                self.publish(|s| {
                    s.leader = Some(leader.clone());
                    s.degraded = false;
                    s.next_attempt = Some(next);
                });
                // The leader's token normally comes through the watch; look anyway.
                self.follow(engine, c, plan).await;
                if force || asked {
                    // The leader makes it (exactly one refresh for the cluster).
                    if c.ask_leader(force).await {
                        tracing::info!(account = %self.account().name, leader = %leader, force, "asked the leader for a refresh");
                    }
                }
                self.publish_next(plan.next);
                None
            }
            Turn::Alone => {
                tracing::warn!(account = %self.account().name, "cluster unreachable: refreshing on this member alone (on_cluster_loss = \"refresh\")");
                self.publish(|s| {
                    s.leader = None;
                    s.degraded = true;
                });
                Some(false)
            }
            Turn::Wait => {
                self.publish(|s| {
                    s.leader = None;
                    s.degraded = true;
                });
                plan.next = recheck;
                self.publish_next(plan.next);
                None
            }
        }
    }

    /// Cluster mode: takes over what other members shared (a newer token is delivered
    /// and served; a hold or rate limit is honoured here too).
    async fn follow(&mut self, engine: &mut Engine<E>, c: &dyn Coordinator, plan: &mut Plan) {
        let warning = c.warning();
        if self.parts.state.borrow().cluster_warning != warning {
            self.publish(|s| s.cluster_warning = warning);
        }
        let shared = tokio::select! {
            _ = self.cancel.cancelled() => return,
            s = c.shared() => s,
        };
        let Some(shared) = shared else {
            return;
        };
        let mut state = shared.state.clone();
        if shared.newer {
            // The cluster orders tokens by its records' generations, not by this member's
            // wall clock: one set back since it took its token must not make the newer
            // token look older to the engine.
            let held = engine.portable();
            if let (Some(theirs), Some(held)) = (&state.token, &held.token) {
                if theirs.issued_at_secs() < held.issued_at_secs() {
                    let mut t = theirs.to_token();
                    t.issued_at = held.to_token().issued_at;
                    state.token = Some(super::persist::SavedToken::from_token(&t));
                }
            }
        }
        let taken = engine.adopt(&state).await;
        if let Some(key) = engine.dpop_key() {
            if !self
                .parts
                .state
                .borrow()
                .dpop
                .as_ref()
                .is_some_and(|k| Arc::ptr_eq(k, &key))
            {
                self.publish(|s| s.dpop = Some(key));
            }
        }
        if let Some(token) = taken {
            // Timed to the millisecond (the engine keeps whole seconds).
            let token = match shared.times {
                Some((issued_at, expires_at)) => Arc::new(Token {
                    issued_at,
                    expires_at,
                    ..(*token).clone()
                }),
                None => token,
            };
            let by = shared.fetched_by.clone();
            match engine.deliver(token.clone(), true).await {
                Ok(()) => {
                    tracing::info!(account = %self.account().name, refreshed_by = %by, "took the token another member fetched");
                }
                Err(e) => {
                    tracing::error!(account = %self.account().name, "{e}");
                    plan.redeliver = Some(Instant::now() + Duration::from_secs(1));
                }
            }
            let wall = self.now();
            let lifetime = token.expires_at.duration_since(wall).unwrap_or_default();
            let jitter = rand::Rng::gen(&mut rand::thread_rng());
            let delay = schedule::refresh_delay(&self.account().options.schedule, lifetime, jitter);
            plan.next = Instant::now() + delay;
            self.publish(|s| {
                s.status = Status::Fresh;
                s.token = Some(token.clone());
                s.last_refresh = Some(token.issued_at);
                s.last_error = None;
                s.failures = 0;
                s.attempted = true;
                s.refreshed_by = Some(by);
            });
        } else if let Some(token) = self.unserved(&shared) {
            // The cluster's token, which the engine holds already but which is not
            // served: its saved copy looked expired at the start (this member's wall
            // clock was set while it was stopped).
            let by = shared.fetched_by.clone();
            if let Err(e) = engine.deliver(token.clone(), false).await {
                tracing::error!(account = %self.account().name, "{e}");
            }
            tracing::info!(account = %self.account().name, refreshed_by = %by, "serving the cluster's token, timed by the lifetime it has left");
            self.publish(|s| {
                s.status = Status::Fresh;
                s.token = Some(token.clone());
                s.last_refresh = Some(token.issued_at);
                s.attempted = true;
                s.refreshed_by = Some(by);
            });
        } else {
            self.retime(engine, c).await;
        }
        if let Some((until, kind)) = engine.wait() {
            let wait = until.duration_since(self.now()).unwrap_or_default();
            plan.next = plan.next.max(Instant::now() + wait);
            if kind == WaitKind::Hold {
                plan.hold_until = Some(plan.next);
            }
            // The leader's failure is the account's: shown here too.
            if let Some(e) = &shared.state.last_error {
                let (now, message) = (self.now(), format!("{e} (at {})", shared.fetched_by));
                self.publish(|s| {
                    s.last_error = Some(message);
                    s.attempted = true;
                    s.status = if s.token.is_some() && s.valid_token(now).is_none() {
                        Status::Expired
                    } else {
                        Status::Failing
                    };
                });
            }
        }
        self.publish_next(plan.next);
    }

    /// Publishes a saved token that is still valid, without asking the provider, and
    /// plans the first request: when that token is due, and not before a saved backoff,
    /// hold or rate limit ends (so a crash loop is no request loop). A saved token that
    /// expired meanwhile takes its outputs with it (unless `on_expiry = "keep"`).
    async fn restore(&mut self, engine: &mut Engine<E>) -> Plan {
        let now = self.now();
        let mut plan = Plan {
            next: Instant::now(),
            hold_until: None,
            redeliver: None,
            last_attempt: None,
        };
        if let Some(token) = engine.saved_token(Duration::ZERO) {
            let jitter = rand::Rng::gen(&mut rand::thread_rng());
            let due = token.issued_at
                + schedule::refresh_delay(
                    &self.account().options.schedule,
                    token.lifetime(),
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

    /// Plans and publishes after an attempt or a delivery retry.
    fn handle(&mut self, outcome: Attempt, plan: &mut Plan) {
        let now = Instant::now();
        match outcome {
            Attempt::Cancelled => {}
            Attempt::Fresh(token) => {
                let wall = self.now();
                let lifetime = token.expires_at.duration_since(wall).unwrap_or_default();
                let jitter = rand::Rng::gen(&mut rand::thread_rng());
                let delay =
                    schedule::refresh_delay(&self.account().options.schedule, lifetime, jitter);
                let recovered = self.parts.state.borrow().failures > 0;
                tracing::info!(
                    account = %self.account().name,
                    status = "fresh",
                    expires_in = lifetime.as_secs(),
                    next_refresh_in = delay.as_secs(),
                    "token refreshed{}",
                    if recovered { " (recovered)" } else { "" }
                );
                self.publish(|s| {
                    s.status = Status::Fresh;
                    s.token = Some(token);
                    s.last_refresh = Some(wall);
                    s.last_error = None;
                    s.failures = 0;
                    s.attempted = true;
                });
                plan.next = now + delay;
                plan.hold_until = None;
                plan.redeliver = None;
            }
            Attempt::Failed(f) => {
                let failures = self.parts.state.borrow().failures + 1;
                match (&f.class, &f.fetched) {
                    (ErrorClass::Local, Some(token)) => {
                        // The token is good: serve it, retry only its delivery, and
                        // refresh when it is due as if the files had been written.
                        // (A token whose refresh token is not saved yet is not served.)
                        let lifetime = token
                            .expires_at
                            .duration_since(self.now())
                            .unwrap_or_default();
                        if plan.redeliver.is_none() {
                            if f.publish {
                                let token = token.clone();
                                let wall = self.now();
                                self.publish(|s| {
                                    s.token = Some(token);
                                    s.last_refresh = Some(wall);
                                });
                            }
                            let jitter = rand::Rng::gen(&mut rand::thread_rng());
                            plan.next = now
                                + schedule::refresh_delay(
                                    &self.account().options.schedule,
                                    lifetime,
                                    jitter,
                                );
                        }
                        plan.redeliver = Some(now + f.retry_in);
                    }
                    _ => {
                        plan.next = now + f.retry_in;
                        plan.hold_until = (f.class == ErrorClass::Rejected).then_some(plan.next);
                    }
                }
                self.fail(&f, failures);
            }
        }
        self.publish_next(plan.next);
    }

    /// Until when the provider (every account on this `token_url`) is rate-limited, on
    /// tokio's clock, if it is now.
    fn provider_gate(&self) -> Option<Instant> {
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
    fn wall(&self, at: Instant) -> SystemTime {
        self.now() + at.saturating_duration_since(Instant::now())
    }

    /// Whether the expiry of `t` was acted on already.
    fn expiry_handled(&self, t: &Token) -> bool {
        self.expired
            .as_ref()
            .is_some_and(|e| e.expires_at == t.expires_at)
    }

    /// Whether the held token has expired by the wall clock and was not yet acted on.
    fn token_expired(&self) -> bool {
        let s = self.parts.state.borrow();
        s.token
            .as_ref()
            .is_some_and(|t| !self.expiry_handled(t) && !t.is_valid_at(self.now()))
    }

    fn fail(&mut self, f: &Failed, failures: u32) {
        let now = self.now();
        let message = &f.message;
        let changed = self.parts.state.borrow().last_error.as_deref() != Some(message);
        let retry_in = f.retry_in.as_secs();
        let name = &self.parts.account.name;
        match f.class {
            ErrorClass::Rejected if changed => tracing::error!(
                account = %name,
                status = "failing",
                retry_in,
                "token request refused: {message}; holding off so a wrong secret cannot lock the account"
            ),
            ErrorClass::Local if changed => tracing::error!(
                account = %name,
                status = "failing",
                retry_in,
                "local failure, the provider is not asked again because of it: {message}"
            ),
            _ if changed => {
                tracing::warn!(account = %name, status = "failing", failures, retry_in, "token request failed: {message}")
            }
            _ => {
                tracing::debug!(account = %name, failures, retry_in, "failed again: {message}")
            }
        }
        let message = message.clone();
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
        self.expired = self.parts.state.borrow().token.clone();
        let removed = output::remove_all(self.account());
        tracing::warn!(account = %self.account().name, status = "expired", "token expired without renewal");
        if let Err(e) = removed {
            tracing::error!(account = %self.account().name, "{e}");
        }
        self.publish(|s| s.status = Status::Expired);
    }

    /// When the held token expires, on tokio's clock, unless that was already handled.
    fn expiry_instant(&self) -> Option<Instant> {
        let s = self.parts.state.borrow();
        let t = s.token.as_ref()?;
        if self.expiry_handled(t) {
            return None;
        }
        let left = t.expires_at.duration_since(self.now()).unwrap_or_default();
        Some(Instant::now() + left)
    }

    /// Changes the published state and tells the supervisor.
    fn publish(&self, f: impl FnOnce(&mut TokenState)) {
        self.parts.state.send_modify(f);
        self.parts.shared.changed.notify_one();
    }

    fn publish_next(&self, next: Instant) {
        let at = self.wall(next);
        self.publish(|s| s.next_attempt = Some(at));
    }
}
