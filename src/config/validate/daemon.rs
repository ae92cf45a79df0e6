//! `[daemon]`: the socket, the state directory, logging, how many refreshes run at once,
//! the start-up timeout and the metrics listener.
//!
//! Nothing here checks the state directory on disk (`files` does) or binds anything.

use super::Ctx;
use crate::config::raw::RawDaemon;
use crate::config::{DaemonConfig, LogFormat};

/// Validates `[daemon]`; a value in error is reported and left at its default.
pub(super) fn daemon(cx: &mut Ctx<'_>, raw: RawDaemon) -> DaemonConfig {
    let d = DaemonConfig::default();
    let socket_mode = match &raw.socket_mode {
        Some(m) => cx.mode(m, "daemon.socket_mode").unwrap_or(d.socket_mode),
        None => d.socket_mode,
    };
    let log_format = cx.choice(
        &raw.log_format,
        "daemon.log_format",
        &[
            ("auto", LogFormat::Auto),
            ("journald", LogFormat::Journald),
            ("text", LogFormat::Text),
            ("json", LogFormat::Json),
        ],
        d.log_format,
    );
    let log_level = match &raw.log_level {
        Some(l) => {
            let ok = ["error", "warn", "info", "debug", "trace"];
            if !ok.contains(&l.get_ref().as_str()) {
                cx.err(
                    l.span(),
                    "daemon.log_level",
                    format!("{:?} is not one of {}", l.get_ref(), ok.join(" | ")),
                );
            }
            l.get_ref().clone()
        }
        None => d.log_level,
    };
    let max_concurrent_refreshes = match &raw.max_concurrent_refreshes {
        Some(n) if (1..=1024).contains(n.get_ref()) => *n.get_ref() as usize,
        Some(n) => {
            cx.err(
                n.span(),
                "daemon.max_concurrent_refreshes",
                "must be between 1 and 1024",
            );
            d.max_concurrent_refreshes
        }
        None => d.max_concurrent_refreshes,
    };
    let metrics_listen = raw
        .metrics_listen
        .as_ref()
        .and_then(|m| match m.get_ref().parse() {
            Ok(a) => Some(a),
            Err(_) => {
                cx.err(
                    m.span(),
                    "daemon.metrics_listen",
                    "expected an address and port, such as \"127.0.0.1:9464\"",
                );
                None
            }
        });
    let startup_timeout = cx.duration(
        &raw.startup_timeout,
        "daemon.startup_timeout",
        d.startup_timeout,
    );
    DaemonConfig {
        socket: raw.socket.as_ref().map(|s| cx.path(s.get_ref())),
        socket_mode,
        socket_group: raw.socket_group.map(|g| g.into_inner()),
        state_dir: raw.state_dir.as_ref().map(|s| cx.path(s.get_ref())),
        log_format,
        log_level,
        max_concurrent_refreshes,
        startup_timeout,
        metrics_listen,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::tests::{errors, parse, MINIMAL};

    #[test]
    fn daemon_values_are_read_and_checked_where_they_are_written() {
        let c = parse(&format!(
            "[daemon]\nsocket = \"t.sock\"\nmax_concurrent_refreshes = 4\nstartup_timeout = \"1m\"\n\
             metrics_listen = \"127.0.0.1:9464\"\nlog_level = \"debug\"\n{MINIMAL}"
        ))
        .unwrap();
        let d = &c.daemon;
        assert_eq!(
            d.socket.as_deref(),
            Some(std::path::Path::new("/etc/tokend/t.sock"))
        );
        assert_eq!(d.max_concurrent_refreshes, 4);
        assert_eq!(d.startup_timeout, Duration::from_secs(60));
        assert_eq!(d.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(d.log_level, "debug");
        let errs = errors(&format!(
            "[daemon]\nmax_concurrent_refreshes = 0\nmetrics_listen = \"9464\"\nlog_level = \"loud\"\n{MINIMAL}"
        ));
        let got: Vec<_> = errs
            .iter()
            .map(|e| (e.key.as_str(), e.line, e.column))
            .collect();
        assert_eq!(
            got,
            [
                ("daemon.max_concurrent_refreshes", 2, 28),
                ("daemon.metrics_listen", 3, 18),
                ("daemon.log_level", 4, 13),
            ]
        );
        assert_eq!(
            errs[2].message,
            "\"loud\" is not one of error | warn | info | debug | trace"
        );
    }
}
