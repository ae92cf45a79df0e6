//! `tokend run`: the daemon and its socket server, wired. The daemon publishes (its
//! accounts' views, its own state, the metrics); the server answers from them.

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::daemon::Daemon;

/// Runs tokend until SIGTERM or SIGINT (or `shutdown` is cancelled).
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let count = config.accounts.len();
    let path = config.path.clone();
    // Signal streams and file watches first: an early signal or edit is not lost.
    let mut daemon = Daemon::new(config)?;
    // Every descriptor the hard limit allows (the socket's share of them is bounded).
    crate::server::raise_fd_limit();
    // Bound before any account starts: a second daemon fails here, before it asks a
    // provider for anything.
    let listeners = crate::server::bind(&daemon.config().daemon)?;
    daemon.start().await?;
    let server = listeners.spawn(
        daemon.views(),
        daemon.metrics(),
        daemon.info(),
        daemon.config().daemon.max_concurrent_refreshes,
    )?;
    tracing::info!(accounts = count, config = %path.display(), "tokend started");
    daemon.run(shutdown).await;
    server.shutdown().await;
    daemon.shutdown().await;
    Ok(())
}
