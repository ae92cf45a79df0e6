//! Serving a listener: the accept loop (seats, the busy answer, backoff on EMFILE), one
//! connection's HTTP/1 with its deadlines, and the idle and activity tracking that
//! lets shutdown close idle connections at once.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use peer::Peer;

use crate::account::metrics::Metrics;
use crate::account::Accounts;

/// The bounds of the server. [`Limits::default`] is what the daemon uses; tests pass
use super::*;

/// The answer to a connection past [`Limits::max_connections`].
pub(super) const BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
retry-after: 1\r\nconnection: close\r\ncontent-length: 69\r\n\r\n\
{\"error\":\"busy\",\"message\":\"too many connections; try again shortly\"}\n";

/// How long the accept loop pauses when the process is out of descriptors or memory,
/// rather than spinning on an error that repeats.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `listener` until `cancel`, its connections seated in `seats` (the listener's,
/// shared by every thread that serves it).
pub(super) async fn run<L: Listen>(
    listener: L,
    accounts: watch::Receiver<Accounts>,
    daemon: Option<watch::Receiver<Arc<crate::daemon::DaemonState>>>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    limits: Limits,
    seats: seats::Seats,
) {
    let http = http_builder(&limits);
    let daemon_uid = nix::unistd::geteuid().as_raw();
    let ctx = Arc::new(Ctx {
        accounts,
        daemon,
        metrics,
        limits,
        http,
    });
    let conns = TaskTracker::new();
    let mut last_warning: Option<tokio::time::Instant> = None;
    let mut warn = |msg: String| {
        let now = tokio::time::Instant::now();
        if last_warning.is_none_or(|t| now - t > Duration::from_secs(10)) {
            last_warning = Some(now);
            tracing::warn!("{msg}");
        }
    };
    loop {
        let io = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            r = listener.accept() => r,
        };
        let io = match io {
            Ok(io) => io,
            Err(e) => {
                if !matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
                ) {
                    warn(format!("failed to accept a connection: {e}"));
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
                continue;
            }
        };
        let holder = match L::holder(&io, daemon_uid) {
            Ok(h) => h,
            Err(e) => {
                warn(format!("failed to identify a peer: {e}; closing"));
                continue;
            }
        };
        let Some(seat) = seats.take(holder) else {
            L::try_write(&io, BUSY);
            ctx.metrics.request(L::NAME, 503);
            warn(match holder {
                seats::Holder::User(uid) => format!(
                    "uid {uid} holds its share of connections ({} of {}): refusing its next until some close",
                    seats::Seats::per_peer(ctx.limits.max_connections),
                    ctx.limits.max_connections
                ),
                _ => format!(
                    "{} connections open: refusing more until some close",
                    ctx.limits.max_connections
                ),
            });
            continue;
        };
        let (ctx, cancel) = (ctx.clone(), cancel.clone());
        conns.spawn(async move {
            match L::caller(&io, daemon_uid) {
                Ok(caller) => connection(io, L::SHUTDOWN, caller, &ctx, &cancel).await,
                Err(e) => tracing::warn!("failed to identify a peer: {e}; closing"),
            }
            drop(seat);
        });
    }
    conns.close();
    let wait = ctx.limits.shutdown_grace + Duration::from_millis(50);
    let _ = tokio::time::timeout(wait, conns.wait()).await;
}

/// How every connection speaks HTTP/1.1: the head's size and time bounds of [`Limits`].
pub(super) fn http_builder(limits: &Limits) -> http1::Builder {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(8192);
    http
}

/// Serves `request`, the bytes a client sends on one connection, to `peer` exactly as
/// the socket does, and returns every byte written back until the server closed the
/// connection (the client never closes its side: a limit or the end of the
/// conversation does). For the socket API's fuzz target (`fuzz/`): no socket, no
/// account task; `accounts` holds views such as [`AccountView::detached`] makes.
///
/// [`AccountView::detached`]: crate::account::AccountView::detached
#[doc(hidden)]
pub async fn answer_bytes(
    request: &[u8],
    accounts: watch::Receiver<Accounts>,
    peer: Peer,
    limits: Limits,
) -> Vec<u8> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let ctx = Arc::new(Ctx {
        accounts,
        daemon: None,
        metrics: Arc::new(Metrics::new()),
        http: http_builder(&limits),
        limits,
    });
    let cancel = CancellationToken::new();
    let (client, server) = tokio::io::duplex(64 * 1024);
    let (mut from_server, mut to_server) = tokio::io::split(client);
    let serve = async {
        connection(server, false, Caller::Local(Arc::new(peer)), &ctx, &cancel).await;
    };
    let send = async {
        // Fails once the server closed the connection before reading everything.
        let _ = to_server.write_all(request).await;
        // Kept open: the client waits for its answers.
        to_server
    };
    let mut answer = Vec::new();
    let receive = from_server.read_to_end(&mut answer);
    let (_, _to_server, _) = tokio::join!(serve, send, receive);
    answer
}

/// Serves one connection until the client closes it, a limit closes it, or shutdown.
pub(super) async fn connection<IO>(
    io: IO,
    shutdown: bool,
    caller: Caller,
    ctx: &Arc<Ctx>,
    cancel: &CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::default());
    let io = TokioIo::new(Tracked {
        inner: io,
        activity: activity.clone(),
        shutdown,
    });
    let svc = {
        let (ctx, activity) = (ctx.clone(), activity.clone());
        service_fn(move |req| {
            let (ctx, caller) = (ctx.clone(), caller.clone());
            let busy = activity.busy();
            async move {
                let resp = routes::handle(req, &ctx, &caller).await;
                drop(busy);
                Ok::<_, std::convert::Infallible>(resp)
            }
        })
    };
    let conn = ctx.http.serve_connection(io, svc);
    tokio::pin!(conn);

    let limits = &ctx.limits;
    let watchdog = tokio::time::sleep(limits.stall_timeout);
    tokio::pin!(watchdog);
    let mut seen = activity.progress.load(Ordering::Relaxed);
    let mut closing = false;
    loop {
        tokio::select! {
            biased;
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!("connection closed: {e}");
                }
                return;
            }
            _ = cancel.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
                watchdog.as_mut().reset(tokio::time::Instant::now() + limits.shutdown_grace);
            }
            _ = watchdog.as_mut() => {
                if closing {
                    // It had its grace: drop it, whatever it was doing.
                    return;
                }
                let progress = activity.progress.load(Ordering::Relaxed);
                if progress == seen && activity.in_flight.load(Ordering::Relaxed) == 0 {
                    tracing::debug!("closing a stalled connection");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                    watchdog.as_mut().reset(tokio::time::Instant::now() + limits.shutdown_grace);
                } else {
                    seen = progress;
                    watchdog.as_mut().reset(tokio::time::Instant::now() + limits.stall_timeout);
                }
            }
        }
    }
}

/// Whether a connection is moving: bytes read or written, handlers running.
#[derive(Default)]
pub(super) struct Activity {
    progress: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }
}

/// A request being answered; a handler that waits (`min_valid`) is not a stall.
pub(super) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.progress.fetch_add(1, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream that counts its progress for the stall watchdog.
pub(super) struct Tracked<IO> {
    inner: IO,
    activity: Arc<Activity>,
    /// See [`Listen::SHUTDOWN`].
    shutdown: bool,
}

impl<IO> Tracked<IO> {
    fn moved<T>(&self, r: &Poll<io::Result<T>>) {
        if let Poll::Ready(Ok(_)) = r {
            self.activity.progress.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.moved(&r);
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.moved(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.moved(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shutdown {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
