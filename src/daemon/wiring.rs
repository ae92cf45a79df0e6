//! What the daemon is wired to besides its config: the [`Control`] stream that tells it
//! to reload or stop (signals and file-watch events in production, a test's sends in
//! process), the clock its accounts time their tokens on, and how it reaches providers
//! ([`Connect`]: HTTP in production, a scripted endpoint in a test). Not the reload
//! itself (`supervisor`), nor the socket server (bound and served by its caller).

use std::sync::Arc;

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::clock::Clock;
use crate::config::Account;
use crate::oauth::{Endpoint, Error, HttpEndpoint, Transports};

/// What the daemon is told from outside its accounts. Every reload, whatever asked for
/// it, takes the one path of [`Control::Reload`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Read the config again and apply it (SIGHUP).
    Reload,
    /// A watched file changed (the config or a secret file): reload if the config's text
    /// did, and look at the secret files.
    FilesChanged,
    /// Stop (SIGTERM, SIGINT).
    Stop,
}

/// How many controls may wait: file events come in bursts and are coalesced when looked
/// at; a signal waits for room (it is never dropped).
const CONTROLS: usize = 16;

/// How the daemon reaches each account's provider.
pub trait Connect: Send + 'static {
    type Endpoint: Endpoint;

    /// The endpoint of `account`, timed on `clock`; an error names what is wrong (a
    /// secret file that cannot be read, a TLS setting), and the account does not start.
    fn connect(&self, account: Arc<Account>, clock: Clock) -> Result<Self::Endpoint, Error>;

    /// A reload was applied: drop what no account uses any more, and discover the token
    /// endpoints again before the next requests (SPEC §1).
    fn reloaded(&self) {}
}

/// HTTP, with one client per transport setting shared by the accounts that use it.
#[derive(Default)]
pub struct Http(Arc<Transports>);

impl Connect for Http {
    type Endpoint = HttpEndpoint;

    fn connect(&self, account: Arc<Account>, clock: Clock) -> Result<HttpEndpoint, Error> {
        HttpEndpoint::new(account, clock, &self.0)
    }

    fn reloaded(&self) {
        self.0.prune();
        self.0.rediscover();
    }
}

/// The daemon's wiring: where its controls come from, its clock, its connector, and
/// whether it watches the config and secret files (sending [`Control::FilesChanged`]).
pub struct Wiring<C> {
    pub(super) controls: mpsc::Receiver<Control>,
    /// A sender of the same stream, for the file watcher.
    pub(super) sender: mpsc::Sender<Control>,
    pub(super) clock: Clock,
    pub(super) connect: C,
    pub(super) watch_files: bool,
}

impl<C: Connect> Wiring<C> {
    /// A wiring on `clock` through `connect`, and the sender of its control stream.
    /// Files are watched unless [`Wiring::without_file_watch`].
    pub fn new(clock: Clock, connect: C) -> (Self, mpsc::Sender<Control>) {
        let (sender, controls) = mpsc::channel(CONTROLS);
        let wiring = Wiring {
            controls,
            sender: sender.clone(),
            clock,
            connect,
            watch_files: true,
        };
        (wiring, sender)
    }

    /// No file watch: reloads come from the control stream only.
    pub fn without_file_watch(mut self) -> Self {
        self.watch_files = false;
        self
    }
}

/// The production wiring: the system clock, HTTP, and SIGHUP, SIGTERM and SIGINT turned
/// into controls. The signals are listened for before this returns, so a signal sent
/// from here on is not lost.
pub fn system() -> anyhow::Result<Wiring<Http>> {
    let mut term = signal(SignalKind::terminate()).context("failed to listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("failed to listen for SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("failed to listen for SIGHUP")?;
    let (wiring, tx) = Wiring::new(Clock::System, Http::default());
    tokio::spawn(async move {
        loop {
            let control = tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: stopping"); Control::Stop }
                _ = int.recv() => { tracing::info!("SIGINT: stopping"); Control::Stop }
                _ = hup.recv() => { tracing::info!("SIGHUP: reloading"); Control::Reload }
            };
            if tx.send(control).await.is_err() {
                break;
            }
        }
    });
    Ok(wiring)
}
