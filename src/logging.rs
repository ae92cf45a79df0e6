//! Logging: text on stderr, JSON on request, journald when stderr is the journal.
//! The level comes from `RUST_LOG` when set, else from the config (for tokend's own
//! events; other crates stay at `warn`, so no library's trace output can carry a
//! request body).
//!
//! `RUST_LOG` takes levels and targets (`debug`, `warn,tokend=trace`): tracing's
//! `Targets`, not its `EnvFilter`, whose span and field filters need a regex engine
//! (about 0.5 MiB of the binary, resident in every tokend: issue #11).

use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

use crate::config::LogFormat;

pub fn init(format: LogFormat, level: &str) {
    let configured = || {
        format!("warn,tokend={level}")
            .parse::<Targets>()
            .unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO))
    };
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => v.parse().unwrap_or_else(|e| {
            eprintln!("tokend: ignoring RUST_LOG ({e}): it takes levels and targets, such as \"warn,tokend=debug\"");
            configured()
        }),
        _ => configured(),
    };
    let format = match format {
        LogFormat::Auto if stderr_is_journal() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        f => f,
    };
    let registry = tracing_subscriber::registry().with(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let result = match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Journald => match tracing_journald::layer() {
            // Fields go to the journal as they are named, upper-cased, with no prefix:
            // `account` -> ACCOUNT=, `expires_in` -> EXPIRES_IN= (journalctl ACCOUNT=msk).
            Ok(layer) => registry
                .with(
                    layer
                        .with_syslog_identifier("tokend".into())
                        .with_field_prefix(None)
                        // Priorities as syslog uses them: info is 6, debug and trace 7.
                        .with_priority_mappings(tracing_journald::PriorityMappings {
                            info: tracing_journald::Priority::Informational,
                            debug: tracing_journald::Priority::Debug,
                            ..tracing_journald::PriorityMappings::new()
                        }),
                )
                .try_init(),
            Err(e) => {
                eprintln!("tokend: failed to connect to journald ({e}); logging text to stderr");
                registry
                    .with(
                        tracing_subscriber::fmt::layer()
                            .with_ansi(ansi)
                            .with_writer(std::io::stderr),
                    )
                    .try_init()
            }
        },
        _ => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    // Already set (a test that runs two commands in one process): keep the first.
    let _ = result;
}

/// systemd sets `JOURNAL_STREAM=dev:inode` when stderr is connected to the journal.
fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&std::io::stderr())) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}
