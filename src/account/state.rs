//! What an account's task publishes (through a `watch` channel) for readers: the socket
//! server, `status`, readiness. Readers never lock what the task holds.

use std::sync::Arc;
use std::time::SystemTime;

use crate::oauth::dpop::DpopKey;
use crate::oauth::Token;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// No token yet, and no failure yet.
    Pending,
    /// A request is under way.
    Refreshing,
    /// A valid token, and the last request succeeded.
    Fresh,
    /// The last request failed; a token may still be valid.
    Failing,
    /// The token expired and was not renewed.
    Expired,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Refreshing => "refreshing",
            Status::Fresh => "fresh",
            Status::Failing => "failing",
            Status::Expired => "expired",
        }
    }
}

#[derive(Debug, Clone)]
pub struct TokenState {
    pub status: Status,
    pub token: Option<Arc<Token>>,
    /// When the last successful refresh happened.
    pub last_refresh: Option<SystemTime>,
    /// The last failure, as a message safe to show (no secret, no token).
    pub last_error: Option<String>,
    /// When the next request is planned.
    pub next_attempt: Option<SystemTime>,
    /// Failed requests in a row.
    pub failures: u32,
    /// Whether the account has had its first try (for readiness).
    pub attempted: bool,
    /// Cluster mode: who leads, who fetched the token, what is wrong (read it with
    /// [`TokenState::cluster`]). None until a cluster account says any of it: boxed, as
    /// an account outside a cluster has none of it (73 bytes less in each account's
    /// published state, issue 21).
    pub cluster: Option<Box<ClusterState>>,
    /// `token_binding = "dpop"`: the key the token is bound to, for readers' proofs
    /// (SPEC §9). `Debug` shows its kind only.
    pub dpop: Option<Arc<DpopKey>>,
}

impl Default for TokenState {
    fn default() -> Self {
        TokenState {
            status: Status::Pending,
            token: None,
            last_refresh: None,
            last_error: None,
            next_attempt: None,
            failures: 0,
            attempted: false,
            cluster: None,
            dpop: None,
        }
    }
}

/// A cluster account's place in its cluster, as readers see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterState {
    /// The member that refreshes the account now, if known.
    pub leader: Option<String>,
    /// The member that fetched the token served.
    pub refreshed_by: Option<String>,
    /// Cut off from the cluster (refreshing alone, or waiting for it).
    pub degraded: bool,
    /// What is wrong with this member's place in the cluster for this account (another
    /// key, another identity under the name, a refused record, a clock that is off),
    /// safe to show.
    pub warning: Option<String>,
}

/// What an account outside a cluster reads.
static NO_CLUSTER: ClusterState = ClusterState {
    leader: None,
    refreshed_by: None,
    degraded: false,
    warning: None,
};

impl TokenState {
    /// The token, if one is held and still valid at `now`.
    pub fn valid_token(&self, now: SystemTime) -> Option<&Arc<Token>> {
        self.token.as_ref().filter(|t| t.is_valid_at(now))
    }

    /// The account's place in its cluster (all empty outside one).
    pub fn cluster(&self) -> &ClusterState {
        self.cluster.as_deref().unwrap_or(&NO_CLUSTER)
    }

    /// For the account's task: its place in its cluster, to change.
    pub fn cluster_mut(&mut self) -> &mut ClusterState {
        self.cluster.get_or_insert_with(Box::default)
    }
}

/// The channel an account's task publishes its [`TokenState`] on: what
/// `tokio::sync::watch` does (the same methods, the same meaning: readers see the latest
/// state, `changed` waits for a newer one and fails once the task is gone), in about
/// 200 bytes where `watch` takes 456 (it spreads its readers over eight `Notify`s; an
/// account has a handful of readers). One per account: 2.6 MiB with 10,000 accounts
/// (issue #11).
pub mod published {
    use std::ops::Deref;
    use std::pin::pin;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};

    use tokio::sync::Notify;

    /// The low bit of the version: the sender is gone. Versions count in twos.
    const CLOSED: u64 = 1;

    struct Shared<T> {
        value: RwLock<T>,
        /// Changed only under the write lock, so a reader that holds the read lock
        /// sees the version of the value it reads.
        version: AtomicU64,
        changed: Notify,
    }

    impl<T> Shared<T> {
        fn read(&self) -> RwLockReadGuard<'_, T> {
            // A writer that panicked left a whole state (each change is one assignment).
            self.value.read().unwrap_or_else(PoisonError::into_inner)
        }
    }

    /// A new channel holding `initial`.
    pub fn channel<T>(initial: T) -> (Sender<T>, Receiver<T>) {
        let shared = Arc::new(Shared {
            value: RwLock::new(initial),
            version: AtomicU64::new(0),
            changed: Notify::new(),
        });
        let rx = Receiver {
            shared: shared.clone(),
            seen: 0,
        };
        (Sender { shared }, rx)
    }

    /// The sender has gone (the account's task ended).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Closed;

    impl std::fmt::Display for Closed {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("the account's task ended")
        }
    }

    impl std::error::Error for Closed {}

    /// A read of the current value; holds a read lock: not across an `.await`.
    pub struct Ref<'a, T>(RwLockReadGuard<'a, T>);

    impl<T> Deref for Ref<'_, T> {
        type Target = T;

        fn deref(&self) -> &T {
            &self.0
        }
    }

    /// The task's end: one per channel.
    pub struct Sender<T> {
        shared: Arc<Shared<T>>,
    }

    impl<T> Sender<T> {
        /// Changes the value in place and tells every receiver.
        pub fn send_modify(&self, f: impl FnOnce(&mut T)) {
            {
                let mut v = self
                    .shared
                    .value
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                f(&mut v);
                self.shared.version.fetch_add(2, Ordering::SeqCst);
            }
            self.shared.changed.notify_waiters();
        }

        pub fn borrow(&self) -> Ref<'_, T> {
            Ref(self.shared.read())
        }

        /// A receiver that has seen the current value.
        pub fn subscribe(&self) -> Receiver<T> {
            Receiver {
                shared: self.shared.clone(),
                seen: self.shared.version.load(Ordering::SeqCst) & !CLOSED,
            }
        }
    }

    impl<T> Drop for Sender<T> {
        fn drop(&mut self) {
            self.shared.version.fetch_or(CLOSED, Ordering::SeqCst);
            self.shared.changed.notify_waiters();
        }
    }

    /// A reader's end; cheap to clone (a clone has seen what this one has).
    pub struct Receiver<T> {
        shared: Arc<Shared<T>>,
        /// The version last seen, without [`CLOSED`].
        seen: u64,
    }

    impl<T> Clone for Receiver<T> {
        fn clone(&self) -> Self {
            Receiver {
                shared: self.shared.clone(),
                seen: self.seen,
            }
        }
    }

    impl<T> Receiver<T> {
        /// The current value, not marked as seen.
        pub fn borrow(&self) -> Ref<'_, T> {
            Ref(self.shared.read())
        }

        /// The current value, marked as seen.
        pub fn borrow_and_update(&mut self) -> Ref<'_, T> {
            let shared = &*self.shared;
            let v = shared.read();
            self.seen = shared.version.load(Ordering::SeqCst) & !CLOSED;
            Ref(v)
        }

        /// Whether a value not yet seen is there; an error once the sender is gone.
        pub fn has_changed(&self) -> Result<bool, Closed> {
            let v = self.shared.version.load(Ordering::SeqCst);
            if v & CLOSED != 0 {
                return Err(Closed);
            }
            Ok(v != self.seen)
        }

        /// Waits for a value not yet seen and marks it seen; an error once the sender
        /// is gone and every value was seen.
        pub async fn changed(&mut self) -> Result<(), Closed> {
            let shared = &*self.shared;
            loop {
                // Registered before the version is looked at: no change slips between.
                let mut changed = pin!(shared.changed.notified());
                changed.as_mut().enable();
                let v = shared.version.load(Ordering::SeqCst);
                if v & !CLOSED != self.seen {
                    self.seen = v & !CLOSED;
                    return Ok(());
                }
                if v & CLOSED != 0 {
                    return Err(Closed);
                }
                changed.await;
            }
        }

        /// Waits until the value satisfies `f` (the current one included), marks it
        /// seen and returns it; an error if the sender goes first.
        pub async fn wait_for(
            &mut self,
            mut f: impl FnMut(&T) -> bool,
        ) -> Result<Ref<'_, T>, Closed> {
            let shared = &*self.shared;
            loop {
                let mut changed = pin!(shared.changed.notified());
                changed.as_mut().enable();
                {
                    let value = shared.read();
                    let v = shared.version.load(Ordering::SeqCst);
                    self.seen = v & !CLOSED;
                    if f(&value) {
                        return Ok(Ref(value));
                    }
                    if v & CLOSED != 0 {
                        return Err(Closed);
                    }
                }
                changed.await;
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[tokio::test]
        async fn readers_see_the_latest_value_and_the_senders_end() {
            let (tx, mut rx) = channel(0);
            assert_eq!(rx.has_changed(), Ok(false));
            let mut other = rx.clone();
            let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
            let waiter = tokio::spawn(async move {
                let v = *other.wait_for(|v| *v >= 2).await.unwrap();
                seen_tx.send(v).unwrap();
                other.changed().await
            });
            tx.send_modify(|v| *v = 1);
            assert_eq!(rx.has_changed(), Ok(true));
            rx.changed().await.unwrap();
            assert_eq!(*rx.borrow(), 1);
            assert_eq!(rx.has_changed(), Ok(false));
            tx.send_modify(|v| *v = 2);
            assert_eq!(seen_rx.await, Ok(2), "the value that satisfied the wait");
            tx.send_modify(|v| *v = 3);
            drop(tx);
            assert_eq!(
                waiter.await.unwrap(),
                Ok(()),
                "a newer value before the end is still told"
            );
            assert_eq!(*rx.borrow_and_update(), 3);
            assert_eq!(rx.has_changed(), Err(Closed));
            assert_eq!(rx.changed().await, Err(Closed));
            assert!(rx.wait_for(|v| *v > 3).await.is_err());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_a_state_shows_the_dpop_key_kind_only() {
        let (key, pem) = DpopKey::generate(crate::config::DpopAlg::Es256).unwrap();
        let state = TokenState {
            dpop: Some(Arc::new(key)),
            ..TokenState::default()
        };
        let dbg = format!("{state:?}");
        assert!(dbg.contains("EC P-256"), "{dbg}");
        for line in pem.expose().lines().filter(|l| !l.starts_with("-----")) {
            assert!(!dbg.contains(line), "{dbg}");
        }
    }
}
