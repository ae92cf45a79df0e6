//! The socket API (SPEC §4): HTTP/1.1 (hyper) over the Unix socket, and the optional
//! TCP `metrics_listen` listener that serves only `/metrics` and `/v1/health`.
//!
//! The server only reads: it holds a `watch::Receiver` of the supervisor's account map
//! and each account's published `TokenState`, and asks for a refresh through
//! [`AccountView::refresh_now`](crate::account::AccountView::refresh_now) (or
//! [`force_refresh`](crate::account::AccountView::force_refresh)). It counts requests in
//! the [`Metrics`] handed to it, and renders them on `/metrics`. Each connection is one
//! task; the kernel names its peer (`peer`), `routes` answers.
//!
//! Everything is bounded ([`Limits`]): connections (past the limit a connection gets a
//! 503 and is closed), the request head (8 KiB, hyper's smallest buffer, else 431) and
//! the time it may take to arrive (which is also the idle keep-alive time), a request
//! that stops moving, request bodies, and how long a `min_valid` request waits.

pub mod api;
mod connection;
mod dpop;
mod listen;
pub mod peer;
mod refresh;
mod reply;
mod routes;
pub mod seats;
mod tokens;

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use listen::{bind_tcp, bind_unix, raise_fd_limit, SocketFile};

#[doc(hidden)]
pub use connection::answer_bytes;
use connection::run;
use peer::Peer;

use crate::account::metrics::Metrics;
use crate::account::Accounts;
use crate::config::DaemonConfig;

/// The bounds of the server. [`Limits::default`] is what the daemon uses; tests pass
/// shorter times.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once, per listener.
    pub max_connections: usize,
    /// A request head must arrive within this; also how long an idle keep-alive
    /// connection stays open.
    pub header_timeout: Duration,
    /// A connection with a request in flight on which no byte moved for this long
    /// (a client that stopped reading or sending) is closed.
    pub stall_timeout: Duration,
    /// A request body must arrive within this.
    pub body_timeout: Duration,
    /// The largest request body taken (the API's bodies are empty).
    pub max_body: usize,
    /// The longest a `min_valid` request waits for a refresh.
    pub max_wait: Duration,
    /// After shutdown is asked for, how long requests in flight may take to finish.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(5),
            max_body: 1024,
            max_wait: Duration::from_secs(60),
            shutdown_grace: Duration::from_millis(200),
        }
    }
}

/// Serves the socket API on `listener` (non-blocking, as [`bind_unix`] makes it) until
/// `cancel`; then closes every connection within [`Limits::shutdown_grace`] and returns.
/// Requests are counted in `metrics`, which `/metrics` renders.
pub async fn serve(
    listener: std::os::unix::net::UnixListener,
    accounts: watch::Receiver<Accounts>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> io::Result<()> {
    serve_with(listener, accounts, metrics, cancel, Limits::default()).await
}

/// [`serve`] with other limits.
pub async fn serve_with(
    listener: std::os::unix::net::UnixListener,
    accounts: watch::Receiver<Accounts>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    limits: Limits,
) -> io::Result<()> {
    serve_daemon(listener, accounts, None, metrics, cancel, limits).await
}

/// [`serve_with`], answering `GET /v1/daemon` from `daemon` (with none, 404).
pub async fn serve_daemon(
    listener: std::os::unix::net::UnixListener,
    accounts: watch::Receiver<Accounts>,
    daemon: Option<watch::Receiver<Arc<crate::daemon::DaemonState>>>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    limits: Limits,
) -> io::Result<()> {
    let listener = UnixListener::from_std(listener)?;
    let seats = seats::Seats::new(limits.max_connections);
    run(listener, accounts, daemon, metrics, cancel, limits, seats).await;
    Ok(())
}

/// Serves `/metrics` and `/v1/health` on a TCP listener (`metrics_listen`, non-blocking)
/// until `cancel`. Every account is shown there by name and status, never a token or an
/// error message.
pub async fn serve_metrics(
    listener: std::net::TcpListener,
    accounts: watch::Receiver<Accounts>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    limits: Limits,
) -> io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    let seats = seats::Seats::new(limits.max_connections);
    run(listener, accounts, None, metrics, cancel, limits, seats).await;
    Ok(())
}

/// The listeners of the daemon, bound before any account starts, so that a second
/// daemon fails before it asks a provider for anything.
pub struct Listeners {
    unix: Option<(std::os::unix::net::UnixListener, SocketFile)>,
    tcp: Option<std::net::TcpListener>,
}

/// Binds `[daemon] socket` and `metrics_listen`, whichever are configured.
pub fn bind(daemon: &DaemonConfig) -> anyhow::Result<Listeners> {
    let unix = daemon
        .socket
        .as_deref()
        .map(|p| bind_unix(p, daemon.socket_mode, daemon.socket_group.as_deref()))
        .transpose()?;
    let tcp = daemon.metrics_listen.map(bind_tcp).transpose()?;
    Ok(Listeners { unix, tcp })
}

impl Listeners {
    /// Starts serving, on threads of their own (one per CPU, up to [`SOCKET_THREADS`]),
    /// each with a single-threaded runtime; the accounts come from the supervisor's map,
    /// the counters from `metrics` (the daemon's, shared with its accounts).
    ///
    /// Why threads of their own: an answer takes microseconds of CPU, so what a request
    /// costs is mostly wake-ups, and a thread that owns its listeners and connections
    /// has the fewest (no hand-offs between worker threads; BENCHMARKS.md). Refreshes
    /// never wait behind the socket, nor the socket behind them.
    ///
    /// Each listener holds at most as many connections as the open-files limit leaves
    /// beside what `max_concurrent_refreshes` refreshes need ([`seats`]).
    pub fn spawn(
        self,
        accounts: watch::Receiver<Accounts>,
        metrics: Arc<Metrics>,
        daemon: watch::Receiver<Arc<crate::daemon::DaemonState>>,
        max_concurrent_refreshes: usize,
    ) -> anyhow::Result<Server> {
        let fd_limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        let mut limits = Limits::default();
        limits.max_connections =
            seats::max_connections_for(limits.max_connections, fd_limit, max_concurrent_refreshes);
        if limits.max_connections < Limits::default().max_connections {
            tracing::info!(
                "the open-files limit ({fd_limit}) allows {} connections per listener",
                limits.max_connections
            );
        }
        let cancel = CancellationToken::new();
        let Listeners { unix, tcp } = self;
        let (unix, socket) = match unix {
            Some((l, file)) => {
                tracing::info!("serving the socket API on {}", file.path().display());
                (Some(l), Some(file))
            }
            None => (None, None),
        };
        if let Some(addr) = tcp.as_ref().and_then(|l| l.local_addr().ok()) {
            tracing::info!("serving /metrics and /v1/health on http://{addr}");
        }
        // The Unix socket's second thread accepts on a copy of its descriptor, once an
        // account binds its tokens with DPoP; both seat their connections in the
        // listener's one set of seats.
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, SOCKET_THREADS);
        let copies: Vec<_> = match &unix {
            Some(l) => (1..threads).filter_map(|_| l.try_clone().ok()).collect(),
            None => Vec::new(),
        };
        let seats = seats::Seats::new(limits.max_connections);
        let serving = Serving {
            accounts,
            metrics,
            daemon,
            limits,
            seats,
            stop: cancel.clone(),
        };
        let mut done = vec![serving.clone().on_thread(unix, tcp, false)?];
        for copy in copies {
            done.push(serving.clone().on_thread(Some(copy), None, true)?);
        }
        Ok(Server {
            cancel,
            done,
            socket,
        })
    }
}

/// How many threads serve the Unix socket at most: one per CPU, up to two. Each owns
/// the connections it accepted (no hand-offs between threads: what a request costs is
/// mostly wake-ups). The second accepts only once an account binds its tokens with
/// DPoP ([`dpop_in`]): two let a CPU-bound answer (a proof's signature) run beside
/// another instead of queueing behind it, but every thread that waits on the listener
/// is woken by each new connection, and all but one find nothing to accept. Without
/// DPoP that cost clients with a connection each a fifth on the p99 and gained them
/// nothing (BENCHMARKS.md, "One socket thread without DPoP").
const SOCKET_THREADS: usize = 2;

/// Waits until an account binds its tokens with DPoP (true), or `stop` (false). Once
/// started, the second thread accepts until the daemon stops.
async fn dpop_in(mut accounts: watch::Receiver<Accounts>, stop: &CancellationToken) -> bool {
    loop {
        if accounts
            .borrow_and_update()
            .keys()
            .any(|a| a.0.dpop.is_some())
        {
            return true;
        }
        tokio::select! {
            _ = stop.cancelled() => return false,
            changed = accounts.changed() => if changed.is_err() {
                return false;
            },
        }
    }
}

/// What every socket thread serves from.
#[derive(Clone)]
struct Serving {
    accounts: watch::Receiver<Accounts>,
    metrics: Arc<Metrics>,
    daemon: watch::Receiver<Arc<crate::daemon::DaemonState>>,
    limits: Limits,
    seats: seats::Seats,
    stop: CancellationToken,
}

impl Serving {
    /// Serves `unix` (and `tcp`) on a thread of its own with a single-threaded runtime,
    /// until `stop`; the receiver hears when the thread is done. `for_dpop`: `unix`
    /// only once an account binds its tokens with DPoP ([`SOCKET_THREADS`]).
    fn on_thread(
        self,
        unix: Option<std::os::unix::net::UnixListener>,
        tcp: Option<std::net::TcpListener>,
        for_dpop: bool,
    ) -> anyhow::Result<tokio::sync::oneshot::Receiver<()>> {
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| anyhow::anyhow!("failed to start the socket server's runtime: {e}"))?;
        let s = self;
        std::thread::Builder::new()
            .name("tokend-socket".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let unix = async {
                        if for_dpop && !dpop_in(s.accounts.clone(), &s.stop).await {
                            return;
                        }
                        match unix.map(UnixListener::from_std) {
                            Some(Ok(l)) => {
                                let daemon = Some(s.daemon.clone());
                                let (accounts, metrics) = (s.accounts.clone(), s.metrics.clone());
                                let (stop, limits) = (s.stop.clone(), s.limits.clone());
                                run(l, accounts, daemon, metrics, stop, limits, s.seats.clone())
                                    .await;
                            }
                            Some(Err(e)) => tracing::error!("the socket server failed: {e}"),
                            None => {}
                        }
                    };
                    let tcp = async {
                        if let Some(l) = tcp {
                            let served = serve_metrics(
                                l,
                                s.accounts.clone(),
                                s.metrics.clone(),
                                s.stop.clone(),
                                s.limits.clone(),
                            );
                            if let Err(e) = served.await {
                                tracing::error!("the metrics listener failed: {e}");
                            }
                        }
                    };
                    tokio::join!(unix, tcp);
                });
                // Connections still open end with the runtime, here.
                drop(runtime);
                let _ = done_tx.send(());
            })
            .map_err(|e| anyhow::anyhow!("failed to start the socket server's thread: {e}"))?;
        Ok(done)
    }
}

/// The running server.
pub struct Server {
    cancel: CancellationToken,
    /// One per thread.
    done: Vec<tokio::sync::oneshot::Receiver<()>>,
    /// Removed when the server is dropped.
    socket: Option<SocketFile>,
}

impl Server {
    /// Stops accepting, lets requests in flight finish (briefly), removes the socket.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let wait = Limits::default().shutdown_grace + Duration::from_millis(100);
        let all = futures_util::future::join_all(self.done);
        if tokio::time::timeout(wait, all).await.is_err() {
            tracing::warn!("the socket server did not stop within {wait:?}");
        }
        drop(self.socket);
    }
}

/// Who is asking.
#[derive(Debug, Clone)]
pub(crate) enum Caller {
    /// A local process on the Unix socket.
    Local(Arc<Peer>),
    /// Anyone on the TCP metrics listener: sees `/metrics` and `/v1/health` only.
    Monitor,
}

impl Caller {
    fn listener(&self) -> &'static str {
        match self {
            Caller::Local(_) => "unix",
            Caller::Monitor => "tcp",
        }
    }
}

/// A listener of either kind.
trait Listen: Send + 'static {
    /// The `listener` label of the request metrics.
    const NAME: &'static str;
    /// Whether to `shutdown(2)` the write side before closing. Not needed on a Unix
    /// socket, where `close` alone tells the peer the same, one system call sooner.
    const SHUTDOWN: bool;
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<Self::Io>> + Send;
    /// Who holds the seat a connection takes (one system call at most).
    fn holder(io: &Self::Io, daemon_uid: u32) -> io::Result<seats::Holder>;
    fn caller(io: &Self::Io, daemon_uid: u32) -> io::Result<Caller>;
    /// Writes what fits without blocking (the "too many connections" answer).
    fn try_write(io: &Self::Io, buf: &[u8]);
}

impl Listen for UnixListener {
    const NAME: &'static str = "unix";
    const SHUTDOWN: bool = false;
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> io::Result<Self::Io> {
        UnixListener::accept(self).await.map(|(s, _)| s)
    }
    fn holder(io: &Self::Io, daemon_uid: u32) -> io::Result<seats::Holder> {
        Ok(match Peer::uid_of(io, daemon_uid)? {
            (_, true) => seats::Holder::Privileged,
            (uid, false) => seats::Holder::User(uid),
        })
    }
    fn caller(io: &Self::Io, daemon_uid: u32) -> io::Result<Caller> {
        Peer::of(io, daemon_uid).map(|p| Caller::Local(Arc::new(p)))
    }
    fn try_write(io: &Self::Io, buf: &[u8]) {
        let _ = io.try_write(buf);
    }
}

impl Listen for TcpListener {
    const NAME: &'static str = "tcp";
    const SHUTDOWN: bool = true;
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> io::Result<Self::Io> {
        let (s, _) = TcpListener::accept(self).await?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }
    fn holder(_: &Self::Io, _: u32) -> io::Result<seats::Holder> {
        Ok(seats::Holder::Remote)
    }
    fn caller(_: &Self::Io, _: u32) -> io::Result<Caller> {
        Ok(Caller::Monitor)
    }
    fn try_write(io: &Self::Io, buf: &[u8]) {
        let _ = io.try_write(buf);
    }
}

/// What every connection of a listener shares.
pub(crate) struct Ctx {
    pub(crate) accounts: watch::Receiver<Accounts>,
    /// What the daemon says about itself (`GET /v1/daemon`); none when the server runs
    /// without a daemon (tests, the fuzz target).
    pub(crate) daemon: Option<watch::Receiver<Arc<crate::daemon::DaemonState>>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) limits: Limits,
    http: http1::Builder,
}

#[cfg(test)]
mod tests {
    use super::connection::BUSY;
    use super::*;

    #[test]
    fn busy_answer_is_well_formed() {
        let text = std::str::from_utf8(BUSY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, body.len());
        let e: api::ErrorBody = serde_json::from_str(body).unwrap();
        assert_eq!(e.error, api::code::BUSY);
    }

    /// The second socket thread accepts only once an account binds its tokens with
    /// DPoP: not while every account is a bearer one, at once when a DPoP account is
    /// published, and never once the server stops.
    #[tokio::test]
    async fn the_second_socket_thread_waits_for_a_dpop_account() {
        use crate::account::registry::ByName;
        use crate::account::state::{published, TokenState};
        use crate::account::AccountView;

        let account = |name: &str, binding: &str| {
            format!(
                "[[account]]\nname = \"{name}\"\ntoken_url = \"https://idp.example/t\"\n\
                 client_id = \"id\"\nclient_secret = {{ env = \"S\" }}\n{binding}"
            )
        };
        let text = format!(
            "[daemon]\nsocket = \"/run/t.sock\"\nstate_dir = \"/var/lib/tokend\"\n{}{}",
            account("bearer", ""),
            account(
                "bound",
                "token_binding = \"dpop\"\nurls = [\"https://fhir.example/r4/\"]\n"
            ),
        );
        let config = crate::config::parse_str(&text, std::path::Path::new("/c.toml")).unwrap();
        let map = |names: &[&str]| -> Accounts {
            let views = config.accounts.iter().filter(|a| names.contains(&&*a.name));
            Arc::new(
                views
                    .map(|a| {
                        let a = Arc::new(a.clone());
                        let (_, state) = published::channel(TokenState::default());
                        (ByName(a.clone()), AccountView::detached(a, state))
                    })
                    .collect(),
            )
        };

        let (publish, accounts) = watch::channel(map(&["bearer"]));
        let stop = CancellationToken::new();
        let mut waiting = Box::pin(dpop_in(accounts.clone(), &stop));
        assert!(futures_util::poll!(&mut waiting).is_pending());
        publish.send(map(&["bearer"])).unwrap();
        assert!(futures_util::poll!(&mut waiting).is_pending());
        publish.send(map(&["bearer", "bound"])).unwrap();
        assert!(waiting.await);
        // Already there: at once.
        assert!(dpop_in(accounts.clone(), &stop).await);

        publish.send(map(&["bearer"])).unwrap();
        let mut waiting = Box::pin(dpop_in(accounts.clone(), &stop));
        assert!(futures_util::poll!(&mut waiting).is_pending());
        stop.cancel();
        assert!(!waiting.await);
        drop(publish);
        assert!(!dpop_in(accounts, &CancellationToken::new()).await);
    }

    /// The fuzz target's entry point answers pipelined requests in order, then closes
    /// the idle connection after `header_timeout` (at once, on the paused clock).
    #[tokio::test(start_paused = true)]
    async fn answer_bytes_serves_a_connection_without_a_socket() {
        let (_tx, accounts) = watch::channel(Accounts::default());
        let peer = Peer {
            uid: 0,
            gid: 0,
            pid: 1,
            groups: Vec::new(),
            privileged: true,
        };
        let request = b"GET /v1/tokens HTTP/1.1\r\nhost: x\r\n\r\n\
                        DELETE /v1/health HTTP/1.1\r\nhost: x\r\n\r\n";
        let answer = answer_bytes(request, accounts, peer, Limits::default()).await;
        let text = String::from_utf8(answer).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("{\"accounts\":[]}\n"), "{text}");
        assert!(
            text.contains("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
    }
}
