//! A scripted [`Endpoint`] for paused-time tests of the refresh schedule, and a harness
//! that runs one account's real refresh task against it through the library API: no
//! sockets, no files (the account has no outputs; the config names a socket so that is
//! allowed), time on tokio's paused clock.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tokend::account::{AccountHandle, Shared, TokenState};
use tokend::clock::Clock;
use tokend::config::Secret;
use tokend::oauth::{Endpoint, Error, Token};

/// Bounds a wait in virtual time: far beyond any schedule under test, and free, since a
/// paused clock jumps to the next timer.
pub const VIRTUAL_DAY: Duration = Duration::from_secs(24 * 3600);

/// One scripted answer.
#[derive(Clone, Debug)]
pub enum Step {
    /// A new token (`tok-<n>`) with this lifetime.
    Token(Duration),
    /// HTTP 500 without an OAuth error.
    ServerError,
    /// 429 asking to come back after this long.
    RetryAfter(Duration),
    /// 400 `invalid_grant`.
    InvalidGrant,
    /// 401 `invalid_client`.
    InvalidClient,
    /// Never answers.
    Hang,
    /// Panics (a bug in whatever handles a request): the account's task dies.
    Panic,
}

struct Script {
    clock: Clock,
    queue: Mutex<VecDeque<Step>>,
    default: Step,
    issued: Mutex<usize>,
    calls: watch::Sender<Vec<Instant>>,
}

/// The endpoint: answers from its queue, then `default`; records when it was asked.
#[derive(Clone)]
pub struct Scripted(Arc<Script>);

impl Scripted {
    pub fn new(clock: Clock, default: Step, queue: impl IntoIterator<Item = Step>) -> Scripted {
        Scripted(Arc::new(Script {
            clock,
            queue: Mutex::new(queue.into_iter().collect()),
            default,
            issued: Mutex::new(0),
            calls: watch::Sender::new(Vec::new()),
        }))
    }

    /// When each request was made, on tokio's clock.
    pub fn calls(&self) -> Vec<Instant> {
        self.0.calls.borrow().clone()
    }

    /// Waits until at least `n` requests were made; panics after a virtual day.
    pub async fn wait_calls(&self, n: usize) -> Vec<Instant> {
        let mut rx = self.0.calls.subscribe();
        let waited = tokio::time::timeout(VIRTUAL_DAY, rx.wait_for(|c| c.len() >= n)).await;
        match waited {
            Ok(Ok(calls)) => calls.clone(),
            _ => panic!(
                "timed out waiting for {n} requests; got {}",
                self.calls().len()
            ),
        }
    }
}

impl Endpoint for Scripted {
    async fn fetch(&self) -> Result<Token, Error> {
        let s = &self.0;
        s.calls.send_modify(|c| c.push(Instant::now()));
        let step = s
            .queue
            .lock()
            .expect("not poisoned")
            .pop_front()
            .unwrap_or_else(|| s.default.clone());
        let now = s.clock.now();
        match step {
            Step::Token(lifetime) => {
                let n = {
                    let mut issued = s.issued.lock().expect("not poisoned");
                    *issued += 1;
                    *issued
                };
                Ok(Token {
                    access_token: Secret::new(format!("tok-{n}")),
                    token_type: "Bearer".into(),
                    issued_at: now,
                    expires_at: now + lifetime,
                    scope: None,
                    refresh_token: None,
                    extra: Default::default(),
                })
            }
            Step::ServerError => Err(Error::Http {
                status: 500,
                retry_after: None,
            }),
            Step::RetryAfter(after) => Err(Error::Http {
                status: 429,
                retry_after: Some(now + after),
            }),
            Step::InvalidGrant => Err(Error::OAuth {
                status: 400,
                error: "invalid_grant".into(),
                description: None,
                retry_after: None,
            }),
            Step::InvalidClient => Err(Error::OAuth {
                status: 401,
                error: "invalid_client".into(),
                description: None,
                retry_after: None,
            }),
            Step::Hang => std::future::pending().await,
            Step::Panic => panic!("scripted panic in the token request"),
        }
    }
}

/// One account's refresh task, running against a [`Scripted`] endpoint.
pub struct Running {
    pub handle: AccountHandle,
    pub endpoint: Scripted,
    pub clock: Clock,
    /// When the task was started, on tokio's clock.
    pub started: Instant,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Running {
    /// Starts an account whose config holds `schedule` (TOML lines such as
    /// `refresh_every = "25m"`), answered by `queue` and then `default`.
    pub fn start(schedule: &str, default: Step, queue: impl IntoIterator<Item = Step>) -> Running {
        Self::start_with_clock(schedule, default, queue, Clock::tokio())
    }

    /// [`Running::start`] with a clock of the test's own (one whose wall time jumps).
    pub fn start_with_clock(
        schedule: &str,
        default: Step,
        queue: impl IntoIterator<Item = Step>,
        clock: Clock,
    ) -> Running {
        let text = format!(
            "[daemon]\nsocket = \"/nonexistent/tokend-test.sock\"\n\n\
             [[account]]\nname = \"acct\"\ntoken_url = \"https://idp.invalid/token\"\n\
             client_id = \"id\"\nclient_secret = \"secret\"\n{schedule}\n"
        );
        let mut config = tokend::config::parse_str(&text, Path::new("/test/config.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        let account = Arc::new(config.accounts.remove(0));
        let endpoint = Scripted::new(clock, default, queue);
        // No state_dir: nothing persists, a restart is not under test here.
        let shared = Shared::new(4, clock, None);
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let started = Instant::now();
        let handle = tokend::account::spawn(
            account,
            endpoint.clone(),
            shared,
            cancel.child_token(),
            &tracker,
        );
        Running {
            handle,
            endpoint,
            clock,
            started,
            cancel,
            tracker,
        }
    }

    pub fn state(&self) -> TokenState {
        self.handle.view.state.borrow().clone()
    }

    /// Waits until the published state satisfies `f`; panics after a virtual day.
    pub async fn wait_state(&self, what: &str, f: impl FnMut(&TokenState) -> bool) -> TokenState {
        let mut rx = self.handle.view.state.clone();
        let waited = tokio::time::timeout(VIRTUAL_DAY, rx.wait_for(f))
            .await
            .map(|r| r.map(|s| s.clone()));
        match waited {
            Ok(Ok(s)) => s,
            _ => panic!("timed out waiting for {what}; state: {:?}", self.state()),
        }
    }

    /// The gaps between consecutive requests.
    pub fn gaps(calls: &[Instant]) -> Vec<Duration> {
        calls.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// Waits until the account has no task (it waits parked); panics after a virtual day.
    pub async fn wait_parked(&self) {
        self.tracker.close();
        tokio::time::timeout(VIRTUAL_DAY, self.tracker.wait())
            .await
            .unwrap_or_else(|_| panic!("the account never parked; state: {:?}", self.state()));
        self.tracker.reopen();
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        // A parked account has no task to see the cancellation: its handle wakes it.
        self.handle.halt();
        self.tracker.close();
        tokio::time::timeout(Duration::from_secs(5), self.tracker.wait())
            .await
            .expect("the account task stops when cancelled");
    }
}

/// A [`Connect`](tokend::daemon::Connect) for an in-process daemon: each account gets
/// the [`Scripted`] endpoint kept under its name (one made with `default` on first
/// use), the same one again when the account restarts, so its calls add up.
#[derive(Clone)]
pub struct ScriptedConnect {
    endpoints: Arc<Mutex<std::collections::HashMap<String, Scripted>>>,
    default: Step,
}

impl ScriptedConnect {
    pub fn new(default: Step) -> ScriptedConnect {
        ScriptedConnect {
            endpoints: Arc::default(),
            default,
        }
    }

    /// Account `name`'s endpoint (made now if it has none yet), with `queue` to answer
    /// first.
    pub fn script(&self, name: &str, clock: Clock, queue: impl IntoIterator<Item = Step>) {
        let e = Scripted::new(clock, self.default.clone(), queue);
        self.endpoints
            .lock()
            .expect("not poisoned")
            .insert(name.to_owned(), e);
    }

    /// Account `name`'s endpoint; panics if it never connected.
    pub fn endpoint(&self, name: &str) -> Scripted {
        self.endpoints.lock().expect("not poisoned")[name].clone()
    }
}

impl tokend::daemon::Connect for ScriptedConnect {
    type Endpoint = Scripted;

    fn connect(
        &self,
        account: Arc<tokend::config::Account>,
        clock: Clock,
    ) -> Result<Scripted, Error> {
        let mut endpoints = self.endpoints.lock().expect("not poisoned");
        Ok(endpoints
            .entry(account.name.clone())
            .or_insert_with(|| Scripted::new(clock, self.default.clone(), []))
            .clone())
    }
}
