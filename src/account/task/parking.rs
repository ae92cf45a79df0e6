//! Parking: an account that waits has no task; its state waits in its inbox with an
//! alarm, and whatever wakes it spawns its task again (`supervise`), which catches
//! the loop's panics and restarts it with backoff.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::*;
use crate::account::alarms::{AlarmKey, Sleeper};
use crate::account::schedule::{self};
use crate::account::state::Status;
use crate::config::Account;
use crate::oauth::Endpoint;
use crate::output;

impl<E: Endpoint> Parked for Live<E> {
    fn alarm(&self) -> Option<AlarmKey> {
        self.alarm
    }

    fn resume(self: Box<Self>, woke: Woke, permit: Option<OwnedSemaphorePermit>) {
        let tracker = self.parts.tracker.clone();
        tracker.spawn(supervise(self, None, Some(woke), permit));
    }
}

/// Parks `live` in its inbox with an alarm at `wake`; it is the inbox's now, and the
/// task's place among the accounts awake (`awake`) is given back. Unless it was poked
/// or stopped meanwhile: then it is handed back, with what woke it.
pub(super) fn park<E: Endpoint>(
    mut live: Box<Live<E>>,
    wake: Instant,
    awake: &mut Option<OwnedSemaphorePermit>,
) -> Option<(Box<Live<E>>, Woke)> {
    let inbox = live.parts.inbox.clone();
    let mut held = inbox.held();
    if inbox.stopped.load(Ordering::SeqCst) || live.parts.root.is_cancelled() {
        return Some((live, Woke::Cancelled));
    }
    if inbox.pokes.load(Ordering::SeqCst) != 0 {
        return Some((live, Woke::Poked));
    }
    let sleeper: Arc<dyn Sleeper> = inbox.clone();
    *awake = None;
    live.alarm = Some(live.parts.shared.alarms.set(wake, sleeper));
    held.parked = Some(live);
    held.run = None;
    None
}

/// The account's task: runs its loop (after its predecessor, at the first start), and
/// again (with backoff) whenever the loop panics, until the account parks or is
/// cancelled; then the farewell. The engine lives in `live`, so a restarted loop goes
/// on from the state the dead one left, lock included. `awake`: its place among the
/// accounts awake at once, when an alarm woke it ([`Inbox::unpark`]).
pub(super) async fn supervise<E: Endpoint>(
    mut live: Box<Live<E>>,
    after: Option<Predecessor>,
    woke: Option<Woke>,
    mut awake: Option<OwnedSemaphorePermit>,
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
    let mut woke = woke.map(|w| (w, live.next_boot));
    loop {
        let live_ = &mut *live;
        let mut task = Task {
            parts: &live_.parts,
            cancel: &cancel,
            expired: live_.expired.take(),
            timed: live_.timed.take(),
        };
        let run = task.run(
            &mut live_.engine,
            &mut live_.coordinator,
            &mut live_.plan,
            &mut awake,
            woke.take(),
        );
        let outcome = AssertUnwindSafe(run).catch_unwind().await;
        live_.expired = task.expired.take();
        live_.timed = task.timed.take();
        let died = match outcome {
            Ok(Exit::Stop) => break,
            Ok(Exit::Park { wake, next_boot }) => {
                live.next_boot = next_boot;
                match park(live, wake, &mut awake) {
                    None => return,
                    Some((back, w)) => {
                        live = back;
                        woke = Some((w, next_boot));
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
    parts.inbox.held().run = None;
}

/// After the loop: the engine's last save (and retirement), kept for the account's
/// next instance; then the outputs the supervisor asked to remove.
async fn farewell<E: Endpoint>(parts: &Parts<E>, engine: Slot<E>) {
    let retire = parts.inbox.retire.load(Ordering::SeqCst);
    if let Slot::Open(engine) = engine {
        let saved = engine.close(retire).await;
        parts.inbox.held().last = Some(Box::new(saved));
    }
    let remove = std::mem::take(&mut parts.inbox.held().remove);
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

/// The message of a panic, if it is a string.
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}
